import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { ReprotectTargetRunner } from '../../agent/target/reprotect-target';
import type { HostProcess } from '../../infra/local/host-process';
import { failoverDepsFromSettings, readRecord } from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { protectionDepsFromSettings, REPROTECT_ROW, type ReprotectEntity } from '../../shared/reprotect';
import { readEntity, readRange, seedBlob } from '../../shared/replication';
import {
  apiClient,
  queueSender,
  testStack,
  waitForOperation,
  type Api,
  type Operation,
} from '../shared/failover/helpers';
import { quietLogger, rng, testDeps } from '../shared/replication/helpers';
import {
  expectSiteHome,
  protectAndFailOver,
  resumeForward,
  startTarget,
  writeFailedOver,
} from './failback-setup';

// A recovery plan's failback through HTTP on the local host: two machines in two groups fail over
// and commit, their failed-over disks are written, both are reprotected to site disks (in-process
// targets), then POST /api/plans/{plan}/failback brings both home, last group first, with the
// plan's webhook and manual steps; the site disks equal the model of each machine. On the way: a
// plan failback before every machine is reprotected is one 409 naming the machines and changes
// nothing, and a terminated reprotect no longer holds its machine.

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const suffix = randomUUID().slice(0, 6);

describe('plan failback through the local host', () => {
  const stack = testStack(connection, 'planfailback');
  const replication = testDeps(connection);
  const failover = failoverDepsFromSettings(stack.settings, { replication, log: quietLogger() });
  const protection = protectionDepsFromSettings(stack.settings, { failover, log: quietLogger() });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-planfb-'));
  const runners: ReprotectTargetRunner[] = [];
  const hooks: { body: { group?: string; operation?: string }; operation: string | undefined }[] = [];
  const hookServer = http.createServer((req, res) => {
    let text = '';
    req.on('data', (c: Buffer) => (text += c.toString()));
    req.on('end', () => {
      hooks.push({
        body: JSON.parse(text || 'null'),
        operation: req.headers['x-lifeboat-operation'] as string,
      });
      res.writeHead(200).end('ok');
    });
  });
  let host: HostProcess;
  let api: Api;
  let sender: MessageSender;

  beforeAll(async () => {
    await new Promise<void>((r) => hookServer.listen(0, '127.0.0.1', r));
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    sender = queueSender(stack);
  });

  afterAll(async () => {
    await Promise.all(runners.map((r) => r.stop()));
    await sender?.close();
    await Promise.all(stack.hosts.map((h) => h.stop()));
    hookServer.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const op = (id: string, until: (o: Operation) => boolean, timeoutMs = 45_000) =>
    waitForOperation(api, id, until, timeoutMs);
  const finished = (o: Operation) => o.status !== 'Running' && o.status !== 'Pending';

  it('fails a plan of two groups back, last group first, site disks equal to each machine', async () => {
    const hookUrl = `http://127.0.0.1:${(hookServer.address() as AddressInfo).port}/hook`;
    const specs = [
      { name: `db-${suffix}`, disks: [{ id: 'd0', sizeBytes: 512 * KiB }] },
      {
        name: `web-${suffix}`,
        disks: [
          { id: 'd0', sizeBytes: 512 * KiB },
          { id: 'd1', sizeBytes: 256 * KiB },
        ],
      },
    ];
    const w = { api, replication, sender, failover, protection, dir };
    const machines = await protectAndFailOver(w, specs, 40);
    const [db, web] = machines;
    const plan = `app-${suffix}`;
    const put = await api('PUT', `plans/${plan}`, {
      groups: [
        {
          name: 'data',
          machines: [db.name],
          pre: [{ type: 'webhook', name: 'hook-data', url: hookUrl, retries: 0 }],
        },
        {
          name: 'front',
          machines: [web.name],
          pre: [{ type: 'webhook', name: 'hook-front', url: hookUrl, retries: 0 }],
          post: [{ type: 'manual', name: 'check-front', instructions: 'check the front end' }],
        },
      ],
    });
    expect(put.status, JSON.stringify(put.body)).toBe(201);

    // Nothing is reprotected: one 409 naming both machines.
    const none = await api('POST', `plans/${plan}/failback`);
    expect(none.status).toBe(409);
    expect(none.body.error.code).toBe('PlanNotReadyToFailBack');
    expect(none.body.error.message).toContain(db.name);
    expect(none.body.error.message).toContain(web.name);

    // The failed-over machines write; the site's targets run in process.
    const random = rng(7);
    await writeFailedOver(w, machines, random, 10);
    for (const m of machines) runners.push(startTarget(w, m));

    // A terminated reprotect keeps no claim: the next reprotect of the machine is accepted.
    const first = await api('POST', `machines/${web.name}/reprotect`, { intervalSeconds: 1 });
    expect(first.status, JSON.stringify(first.body)).toBe(202);
    expect((await api('POST', `machines/${web.name}/reprotect`)).body.error.code).toBe('OperationInProgress');
    const terminate = await fetch(
      (first.body.management.terminatePostUri as string).replace('{text}', 'test%20terminates%20it'),
      { method: 'POST' },
    );
    expect(terminate.status).toBe(202);
    await op(first.body.operationId, (o) => o.status === 'Terminated');

    // Only the db machine is reprotected: the plan's failback is refused and changes nothing.
    const reprotects = new Map<string, string>();
    const rpDb = await api('POST', `machines/${db.name}/reprotect`, { intervalSeconds: 1 });
    expect(rpDb.status, JSON.stringify(rpDb.body)).toBe(202);
    reprotects.set(db.name, rpDb.body.operationId);
    await op(rpDb.body.operationId, (o) => o.progress?.lastAppliedPass >= 1 || o.status === 'Failed');
    const half = await api('POST', `plans/${plan}/failback`);
    expect(half.status).toBe(409);
    expect(half.body.error.message).toContain(web.name);
    expect(half.body.error.message).not.toContain(`${db.name} (`);
    const dbRow = await readEntity<ReprotectEntity>(await protection.tables.get(), db.name, REPROTECT_ROW);
    expect([dbRow?.state, dbRow?.failbackOperationId]).toEqual(['protecting', undefined]);
    expect((await api('GET', `operations/${rpDb.body.operationId}`)).body.status).toBe('Running');

    const rpWeb = await api('POST', `machines/${web.name}/reprotect`, { intervalSeconds: 1 });
    expect(rpWeb.status, JSON.stringify(rpWeb.body)).toBe(202);
    reprotects.set(web.name, rpWeb.body.operationId);
    for (const id of reprotects.values()) {
      const o = await op(id, (x) => x.progress?.lastAppliedPass >= 1 || x.status === 'Failed');
      expect(o.status, o.error).toBe('Running');
    }
    for (const m of machines) expectSiteHome(m);

    // More writes after the last pass: only the failback's final pass carries them.
    await writeFailedOver(w, machines, random, 10);

    const fb = await api('POST', `plans/${plan}/failback`, { waitSeconds: 60 });
    expect(fb.status, JSON.stringify(fb.body)).toBe(202);
    expect(fb.body.order).toBe('reverse');
    const again = await api('POST', `plans/${plan}/failback`);
    expect(again.status).toBe(409);

    // The manual step of the front group (which runs first) waits for approval.
    const waiting = await op(
      fb.body.operationId,
      (o) => o.progress?.waitingFor?.type === 'manual' || finished(o),
    );
    expect(waiting.progress.waitingFor, waiting.error).toMatchObject({ group: 'front', step: 'check-front' });
    expect(waiting.progress.groups[0].machines[web.name].state).toBe('failed-back');
    expect(waiting.progress.groups[1].machines[db.name].state).toBe('pending');
    expect((await api('POST', `operations/${fb.body.operationId}/approve`, { by: 'test' })).status).toBe(202);

    // Play each site agent: once the failback issued its resync command, a marker in epoch 2.
    for (const m of machines) await resumeForward(w, m, fb.body.operationId);

    const done = await op(fb.body.operationId, finished, 60_000);
    expect(done.status, done.error).toBe('Completed');
    expect(done.output).toMatchObject({
      state: 'failed-back',
      order: 'reverse',
      waitingForAgents: [],
      groups: [
        { name: 'front', machines: { [web.name]: { state: 'protected', forwardProtection: 'protected' } } },
        { name: 'data', machines: { [db.name]: { state: 'protected', forwardProtection: 'protected' } } },
      ],
    });
    // Webhooks: front before data, each told it runs in a failback.
    expect(hooks.map((h) => [h.body.group, h.body.operation, h.operation])).toEqual([
      ['front', 'failback', 'failback'],
      ['data', 'failback', 'failback'],
    ]);

    for (const m of machines) {
      expect((await readRecord(failover.tables, m.name, m.failoverId))?.state).toBe('failed-back');
      const reprotect = await op(reprotects.get(m.name)!, finished);
      expect(reprotect.output).toMatchObject({ state: 'handed-over' });
      expectSiteHome(m);
      for (const d of m.disks) {
        const model = m.cloud.get(d.id)!;
        expect(
          (await readRange(seedBlob(replication.seed, m.name, d.id), 0, d.sizeBytes)).equals(model),
          `seed ${m.name}/${d.id}`,
        ).toBe(true);
      }
    }
    // Every machine is home: nothing left to fail back.
    const home = await api('POST', `plans/${plan}/failback`);
    expect([home.status, home.body.error.code]).toEqual([409, 'NothingToFailBack']);
  }, 150_000);
});
