import type { OrchestrationContext } from 'durable-functions';
import * as df from 'durable-functions';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { LibraryInvoker, startTestHost, waitFor, type TestHost } from './harness';

/*
 * The management API over HTTP, as a starter function and a browser/curl use it: the URLs that
 * createCheckStatusResponse returns, with the host's key check in front.
 */

const attempts = new Map<string, number>();

const invoker = new LibraryInvoker()
  .addActivity('square', { handler: (n: unknown) => (n as number) ** 2 })
  .addActivity('flakyOnce', {
    handler: (key: unknown) => {
      const n = (attempts.get(String(key)) ?? 0) + 1;
      attempts.set(String(key), n);
      if (n < 3) throw new Error(`attempt ${n} failed`);
      return n;
    },
  })
  .addOrchestration('sample', function* (context: OrchestrationContext) {
    // The acceptance sample: fan-out/fan-in, a retried activity, a durable timer, an event.
    const numbers = context.df.getInput() as number[];
    const squares: number[] = yield context.df.Task.all(
      numbers.map((n) => context.df.callActivity('square', n)),
    );
    const tries: number = yield context.df.callActivityWithRetry(
      'flakyOnce',
      new df.RetryOptions(50, 4),
      context.df.instanceId,
    );
    yield context.df.createTimer(new Date(context.df.currentUtcDateTime.getTime() + 200));
    context.df.setCustomStatus('awaiting approval');
    const approval: { by: string } = yield context.df.waitForExternalEvent('approval');
    return { squares, tries, approvedBy: approval.by };
  })
  .addOrchestration('idle', function* (context: OrchestrationContext) {
    yield context.df.waitForExternalEvent('never');
    return 'never';
  });

let host: TestHost;

beforeAll(async () => {
  host = await startTestHost(inject('azuriteConnectionString'), 'httpApiTests', invoker);
});

afterAll(async () => {
  await host?.stop();
});

async function getJson(url: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(url);
  const text = await res.text();
  return { status: res.status, body: text ? (JSON.parse(text) as Record<string, unknown>) : {} };
}

describe('local Durable engine: HTTP management API', () => {
  it('runs the sample started by an HTTP starter, driven through the createCheckStatusResponse URLs', async () => {
    const started = await host.startViaHttp('sample', [1, 2, 3]);
    expect(started.status).toBe(202);
    const urls = started.body;
    expect(urls.statusQueryGetUri.startsWith(`${host.baseUrl}/runtime/webhooks/durabletask/instances/`)).toBe(
      true,
    );
    expect(urls.statusQueryGetUri).toContain(`code=${host.key}`);

    // Poll the status URL until the orchestration waits for the approval.
    await waitFor('awaiting approval', async () => {
      const { status, body } = await getJson(urls.statusQueryGetUri);
      expect(status).toBe(202);
      return body.customStatus === 'awaiting approval';
    });
    const raise = await fetch(urls.sendEventPostUri.replace('{eventName}', 'approval'), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ by: 'ops' }),
    });
    expect(raise.status).toBe(202);

    const done = await waitFor('completion', async () => {
      const { status, body } = await getJson(
        `${urls.statusQueryGetUri}&showHistory=true&showHistoryOutput=true`,
      );
      return status === 200 ? body : undefined;
    });
    expect(done.runtimeStatus).toBe('Completed');
    expect(done.output).toEqual({ squares: [1, 4, 9], tries: 3, approvedBy: 'ops' });
    const events = (done.historyEvents as { EventType: string }[]).map((e) => e.EventType);
    expect(events).toContain('TimerFired');
    expect(events).toContain('EventRaised');
    expect(events.filter((e) => e === 'TaskFailed')).toHaveLength(2);

    // The history is readable through the client too.
    const viaClient = await host.client.getStatus(urls.id, { showHistory: true, showHistoryOutput: true });
    expect((viaClient.history as { EventType: string }[]).map((e) => e.EventType)).toEqual(events);

    // Events to a finished instance are gone; purge through its URL; then it is not found.
    const late = await fetch(urls.sendEventPostUri.replace('{eventName}', 'approval'), {
      method: 'POST',
      body: '{}',
    });
    expect(late.status).toBe(410);
    const purge = await fetch(urls.purgeHistoryDeleteUri, { method: 'DELETE' });
    expect(purge.status).toBe(200);
    expect(await purge.json()).toEqual({ instancesDeleted: 1 });
    expect((await getJson(urls.statusQueryGetUri)).status).toBe(404);
  });

  it('terminates through the terminate URL and answers 404/409/410 as the extension does', async () => {
    const started = await host.startViaHttp('idle', null);
    const urls = started.body;
    const again = await fetch(
      `${host.baseUrl}/runtime/webhooks/durabletask/orchestrators/idle/${urls.id}?code=${host.key}`,
      {
        method: 'POST',
      },
    );
    expect(again.status).toBe(409);
    const terminate = await fetch(
      urls.terminatePostUri.replace('{text}', encodeURIComponent('no longer needed')),
      { method: 'POST' },
    );
    expect(terminate.status).toBe(202);
    const status = await waitFor('terminated', async () => {
      const { body } = await getJson(urls.statusQueryGetUri);
      return body.runtimeStatus === 'Terminated' ? body : undefined;
    });
    expect(status.output).toBe('no longer needed');
    const twice = await fetch(urls.terminatePostUri.replace('{text}', 'again'), { method: 'POST' });
    expect(twice.status).toBe(410);
    const missing = urls.statusQueryGetUri.replace(encodeURIComponent(urls.id), 'no-such-instance');
    expect((await getJson(missing)).status).toBe(404);
    const withoutInput = await getJson(`${urls.statusQueryGetUri}&showInput=false`);
    expect(withoutInput.body.input).toBeNull();
  });

  it('lists instances page by page with a continuation token', async () => {
    for (let i = 0; i < 3; i++) await host.client.startNew('idle');
    const base = `${host.baseUrl}/runtime/webhooks/durabletask/instances?code=${host.key}&runtimeStatus=Running,Pending`;
    const seen: string[] = [];
    let token: string | null = null;
    do {
      const res: Response = await fetch(`${base}&top=2`, {
        headers: token ? { 'x-ms-continuation-token': token } : {},
      });
      expect(res.status).toBe(200);
      const page = (await res.json()) as { instanceId: string; runtimeStatus: string }[];
      expect(page.length).toBeLessThanOrEqual(2);
      expect(page.every((s) => s.runtimeStatus === 'Running' || s.runtimeStatus === 'Pending')).toBe(true);
      seen.push(...page.map((s) => s.instanceId));
      token = res.headers.get('x-ms-continuation-token');
    } while (token);
    expect(seen.length).toBeGreaterThanOrEqual(3);
    expect(new Set(seen).size).toBe(seen.length);
    const viaClient = await host.client.getStatusBy({
      runtimeStatus: [df.OrchestrationRuntimeStatus.Running, df.OrchestrationRuntimeStatus.Pending],
    });
    expect(new Set(viaClient.map((s) => s.instanceId))).toEqual(new Set(seen));
    for (const id of seen) await host.client.terminate(id, 'cleanup');
  });

  it('is behind the host key, and says what it does not support', async () => {
    const anonymous = await fetch(`${host.baseUrl}/runtime/webhooks/durabletask/instances`);
    expect(anonymous.status).toBe(401);
    const entities = await fetch(
      `${host.baseUrl}/runtime/webhooks/durabletask/entities/counter/k?code=${host.key}`,
    );
    expect(entities.status).toBe(501);
    const wrongMethod = await fetch(
      `${host.baseUrl}/runtime/webhooks/durabletask/orchestrators/idle?code=${host.key}`,
    );
    expect(wrongMethod.status).toBe(405);
    const unknown = await fetch(
      `${host.baseUrl}/runtime/webhooks/durabletask/orchestrators/nope?code=${host.key}`,
      { method: 'POST' },
    );
    expect(unknown.status).toBe(400);
    expect(((await unknown.json()) as { error: { message: string } }).error.message).toContain(
      "'nope' doesn't exist",
    );
  });
});
