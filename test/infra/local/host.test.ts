import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { randomUUID } from 'node:crypto';
import { QueueServiceClient } from '@azure/storage-queue';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { spawnLocalHost, type HostProcess } from '../../../infra/local/host-process';
import { nextOccurrence } from '../../../infra/local/timer-trigger';
import { createMessageSender } from '../../../shared/messaging';
import { readJsonLines, waitFor } from '../../helpers/host';

const appRoot = path.resolve(__dirname, '../../fixtures/host-app');
const key = 'test-key-' + randomUUID();

describe('local Functions host', () => {
  const connection = inject('azuriteConnectionString');
  const outDir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-host-'));
  const suffix = randomUUID().slice(0, 8);
  const settings = {
    AzureWebJobsStorage: connection,
    ServiceBusConnection: connection,
    TestQueue: `collect-${suffix}`,
    FailingQueue: `fails-${suffix}`,
    TEST_OUT_DIR: outDir,
  };
  let host: HostProcess;
  let base: string;

  beforeAll(async () => {
    host = await spawnLocalHost(
      {
        appRoot,
        entryPoint: path.join(appRoot, 'index.ts'),
        settings,
        port: 0,
        functionKey: key,
        maxDeliveryCount: 3,
        lockSeconds: 5,
      },
      () => undefined,
    );
    base = `http://127.0.0.1:${host.port}`;
  });
  afterAll(async () => host?.stop());

  it('registers every function of the app through @azure/functions', () => {
    expect(host.functions.sort()).toEqual([
      'always-fails',
      'anon',
      'boom',
      'collect',
      'echo',
      'send',
      'tick',
    ]);
  });

  it('routes with parameters, query, body, status and headers', async () => {
    const res = await fetch(`${base}/api/echo/alpha/beta?x=1&code=${key}`, { method: 'POST', body: 'hello' });
    expect(res.status).toBe(201);
    expect(res.headers.get('x-echo')).toBe('yes');
    expect(await res.json()).toEqual({
      method: 'POST',
      params: { name: 'alpha', rest: 'beta' },
      query: { x: '1', code: key },
      body: 'hello',
    });
    const optional = await fetch(`${base}/api/echo/alpha`, { headers: { 'x-functions-key': key } });
    expect((await optional.json()).params).toEqual({ name: 'alpha' });
  });

  it('answers unknown routes 404, wrong methods 405, missing or wrong keys 401', async () => {
    const unknown = await fetch(`${base}/api/nowhere`, { headers: { 'x-functions-key': key } });
    expect(unknown.status).toBe(404);
    expect((await unknown.json()).error.message).toContain('/api/nowhere');
    const method = await fetch(`${base}/api/echo/a`, {
      method: 'DELETE',
      headers: { 'x-functions-key': key },
    });
    expect(method.status).toBe(405);
    expect(method.headers.get('allow')).toContain('GET');
    expect((await fetch(`${base}/api/echo/a`)).status).toBe(401);
    expect((await fetch(`${base}/api/echo/a?code=wrong`)).status).toBe(401);
    expect((await fetch(`${base}/api/echo/a`, { headers: { 'x-functions-key': 'nope' } })).status).toBe(401);
    expect(await (await fetch(`${base}/api/open`)).text()).toBe('open');
  });

  it("turns a handler's error into a 500 with a correlation id and no stack or message", async () => {
    const res = await fetch(`${base}/api/boom`, { headers: { 'x-functions-key': key } });
    expect(res.status).toBe(500);
    const text = await res.text();
    const body = JSON.parse(text);
    expect(body.error.correlationId).toMatch(/^[0-9a-f-]{36}$/);
    expect(body.error.message).toContain(body.error.correlationId);
    expect(text).not.toContain('secret internal detail');
    expect(text).not.toMatch(/at .*\.ts:\d+/);
  });

  it('feeds a Service Bus-queue function from the Azurite queue, with message id and delivery count', async () => {
    const sender = createMessageSender(settings, 'ServiceBusConnection', settings.TestQueue);
    await sender.send({ body: { n: 1 }, messageId: 'm-1' });
    await sender.send({ body: { n: 2 }, messageId: 'm-2' });
    // and through a function, with the same helper
    expect(
      (
        await fetch(`${base}/api/send`, {
          method: 'POST',
          body: '{"n":3}',
          headers: { 'x-functions-key': key },
        })
      ).status,
    ).toBe(202);
    const lines = await waitFor(() => {
      const got = readJsonLines<{ message: { n: number }; id: string; count: number }>(
        path.join(outDir, 'collected.jsonl'),
      );
      return got.length >= 3 ? got : undefined;
    }, 'three collected messages');
    expect(lines.map((l) => l.message.n).sort()).toEqual([1, 2, 3]);
    expect(lines.find((l) => l.message.n === 1)).toMatchObject({ id: 'm-1', count: 1 });
  });

  it('moves a message that always fails to the poison queue after maxDeliveryCount tries', async () => {
    const sender = createMessageSender(settings, 'ServiceBusConnection', settings.FailingQueue);
    await sender.send({ body: { doomed: true }, messageId: 'doomed-1' });
    const poison = QueueServiceClient.fromConnectionString(connection).getQueueClient(
      `${settings.FailingQueue}-poison`,
    );
    const peeked = await waitFor(async () => {
      const r = await poison.peekMessages({ numberOfMessages: 1 }).catch(() => undefined);
      return r && r.peekedMessageItems.length > 0 ? r.peekedMessageItems : undefined;
    }, 'the poisoned message');
    expect(JSON.parse(peeked[0].messageText)).toMatchObject({
      messageId: 'doomed-1',
      body: { doomed: true },
    });
    const attempts = readJsonLines<{ count: number }>(path.join(outDir, 'failures.jsonl'));
    expect(attempts.map((a) => a.count)).toEqual([1, 2, 3]);
  });

  it('fires a timer function on its schedule', async () => {
    const ticks = await waitFor(() => {
      const got = readJsonLines<{ at: string }>(path.join(outDir, 'ticks.jsonl'));
      return got.length >= 2 ? got : undefined;
    }, 'two timer ticks');
    const seconds = ticks.map((t) => new Date(t.at).getUTCSeconds());
    expect(new Set(seconds).size).toBe(seconds.length); // one firing per scheduled second
  });

  it('computes six-field NCRONTAB occurrences in UTC, including ones further away than a timer can wait', () => {
    const from = new Date('2026-11-21T10:00:07Z');
    expect(nextOccurrence('*/5 * * * * *', from).toISOString()).toBe('2026-11-21T10:00:10.000Z');
    expect(nextOccurrence('0 0 12 * * 3', from).toISOString()).toBe('2026-11-25T12:00:00.000Z');
    expect(nextOccurrence('0 0 0 1 1 *', from).toISOString()).toBe('2027-01-01T00:00:00.000Z');
    expect(() => nextOccurrence('0 * * * *', from)).toThrow(/six fields/);
  });
});
