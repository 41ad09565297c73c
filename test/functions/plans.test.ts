import { randomUUID } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { HostProcess } from '../../infra/local/host-process';
import {
  beginFailover,
  failoverDepsFromSettings,
  failoverDiskName,
  readLocalTarget,
  readRecord,
  releaseMachine,
  resolveRecoveryPoint,
  updateRecord,
} from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { readRange } from '../../shared/replication';
import {
  apiClient,
  queueSender,
  ship,
  SourceMachine,
  testStack,
  waitForOperation,
  waitForPoint,
  type Api,
  type Operation,
} from '../shared/failover/helpers';
import { quietLogger, testDeps } from '../shared/replication/helpers';

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;
const suffix = randomUUID().slice(0, 6);

/** A webhook receiver on a free loopback port: `/ok` answers 200, `/fail` 500 until `failing` is false. */
function webhookServer() {
  const hits: { path: string; body: unknown; at: number }[] = [];
  const state = { failing: true };
  const server = http.createServer((req, res) => {
    let text = '';
    req.on('data', (c) => (text += c));
    req.on('end', () => {
      hits.push({ path: req.url ?? '', body: text ? JSON.parse(text) : undefined, at: hits.length });
      if (req.url === '/fail' && state.failing) {
        res.writeHead(500, { 'content-type': 'text/plain' });
        res.end('the change-freeze service is down');
      } else {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end('{"ok":true}');
      }
    });
  });
  return {
    hits,
    state,
    listen: () =>
      new Promise<string>((r) =>
        server.listen(0, '127.0.0.1', () => r(`http://127.0.0.1:${(server.address() as AddressInfo).port}`)),
      ),
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

describe('recovery plans over HTTP through the local host', () => {
  const stack = testStack(connection, 'plans');
  const replication = testDeps(connection);
  const deps = failoverDepsFromSettings(stack.settings, { replication, log: quietLogger() });
  const hooks = webhookServer();
  let hookBase: string;
  let host: HostProcess;
  let api: Api;
  let sender: MessageSender;
  const disks = [{ id: 'd0', sizeBytes: 1 * MiB }];
  const machines = ['web', 'app', 'db'].map(
    (name, i) => new SourceMachine(`${name}-${suffix}`, disks, 10 + i),
  );

  beforeAll(async () => {
    hookBase = await hooks.listen();
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    sender = queueSender(stack);
    for (const m of machines) {
      expect((await api('PUT', `machines/${m.machine}`, { disks })).status).toBe(201);
      m.randomWrites(30);
      m.marker('p1', 'crash');
      await ship(replication, sender, m.cut());
    }
    for (const m of machines) await waitForPoint(api, m.machine, 'p1');
  });

  afterAll(async () => {
    await sender?.close();
    await Promise.all(stack.hosts.map((h) => h.stop()));
    await hooks.close();
  });

  const [web, appServer, db] = machines;

  it('rejects bad plans: invalid body 400, unknown machine 404, unknown plan 404, approve when not waiting 409', async () => {
    const bad: [unknown, number, string][] = [
      [{}, 400, 'groups'],
      [{ groups: [] }, 400, 'groups'],
      [
        { groups: [{ name: 'g1', machines: [web.machine], pre: [{ type: 'teleport', name: 'x' }] }] },
        400,
        'groups[0].pre[0].type',
      ],
      [
        { groups: [{ name: 'g1', pre: [{ type: 'webhook', name: 'x', url: 'ftp://example' }] }] },
        400,
        'groups[0].pre[0].url',
      ],
      [
        {
          groups: [
            { name: 'g1', machines: [web.machine] },
            { name: 'g2', machines: [web.machine] },
          ],
        },
        400,
        'groups[1].machines[0]',
      ],
      [{ groups: [{ name: 'g1', machines: [`ghost-${suffix}`] }] }, 404, 'groups[0].machines[0]'],
    ];
    for (const [body, status, target] of bad) {
      const res = await api('PUT', `plans/bad-${suffix}`, body);
      expect(res.status, JSON.stringify(res.body)).toBe(status);
      expect(res.body.error.target).toBe(target);
    }
    expect((await api('POST', `plans/none-${suffix}/failover`, {})).status).toBe(404);
    expect((await api('POST', 'operations/nothing-here/approve')).status).toBe(404);
  });

  it('three groups (webhook, manual approved over HTTP, wait) run in order; the host killed mid-plan resumes and finishes', async () => {
    const plan = {
      description: 'web after app after db',
      groups: [
        {
          name: 'data',
          machines: [db.machine],
          pre: [
            { type: 'webhook', name: 'announce', url: `${hookBase}/ok`, retries: 1, retryIntervalSeconds: 1 },
          ],
        },
        {
          name: 'apps',
          machines: [appServer.machine],
          pre: [
            { type: 'manual', name: 'check-db', instructions: 'Check the database answers, then approve.' },
          ],
        },
        { name: 'front', machines: [web.machine], pre: [{ type: 'wait', name: 'settle', seconds: 2 }] },
      ],
    };
    const put = await api('PUT', `plans/drill-${suffix}`, plan);
    expect(put.status, JSON.stringify(put.body)).toBe(201);
    expect((await api('PUT', `plans/drill-${suffix}`, plan)).status).toBe(200);

    const started = await api('POST', `plans/drill-${suffix}/failover`, { test: true });
    expect(started.status).toBe(202);
    const id = started.body.operationId as string;
    const early = await api('POST', `operations/${id}/retry`);
    expect(early.status).toBe(409);

    const waiting = await waitForOperation(api, id, (op) => op.progress?.waitingFor?.type === 'manual');
    // Group 1 is done, group 2 waits at its manual step, group 3 has not started.
    expect(waiting.progress.groups[0].state).toBe('succeeded');
    expect(waiting.progress.groups[0].machines[db.machine].state).toBe('failed-over');
    expect(waiting.progress.groups[1].machines[appServer.machine].state).toBe('pending');
    expect(waiting.progress.groups[2].state).toBe('pending');
    expect(waiting.progress.waitingFor).toMatchObject({ group: 'apps', step: 'check-db' });
    expect(hooks.hits.filter((h) => h.path === '/ok')).toHaveLength(1);
    expect(hooks.hits[0].body).toMatchObject({
      plan: `drill-${suffix}`,
      group: 'data',
      step: 'announce',
      test: true,
    });
    expect((await api('GET', `machines/${appServer.machine}/failovers`)).body.value).toEqual([]);

    // Kill the host mid-plan, start a new one, approve over HTTP.
    await host.kill();
    host = await stack.start();
    const wrongStep = await api('POST', `operations/${id}/approve`, { step: 'something-else' });
    expect(wrongStep.status).toBe(409);
    const approve = await api('POST', `operations/${id}/approve`, { by: 'operator', comment: 'db answers' });
    expect(approve.status, JSON.stringify(approve.body)).toBe(202);

    const done = await waitForOperation(api, id);
    expect(done.status, done.error).toBe('Completed');
    expect(done.progress.state).toBe('completed');
    const order = [db, appServer, web].map(
      (m) =>
        done.progress.groups.flatMap((g: any) => (g.machines[m.machine] ? [g.machines[m.machine]] : []))[0],
    );
    for (const [i, m] of [db, appServer, web].entries()) {
      expect(order[i].state).toBe('failed-over');
      const target = await readLocalTarget(deps.tables, m.machine, order[i].failoverId);
      expect(target?.test).toBe(true);
      const bytes = await readRange(
        deps.failoverDisks.getPageBlobClient(failoverDiskName(m.machine, 'd0', order[i].failoverId)),
        0,
        MiB,
      );
      expect(bytes.equals(m.markers.get('p1')!.images.get('d0')!)).toBe(true);
    }
    // Group order: each group's failovers were claimed after the previous group's.
    const records = await Promise.all(
      [db, appServer, web].map(async (m, i) =>
        (await api('GET', `machines/${m.machine}/failovers`)).body.value.find(
          (r: any) => r.failoverId === order[i].failoverId,
        ),
      ),
    );
    expect(records[0].createdAt <= records[1].createdAt && records[1].createdAt <= records[2].createdAt).toBe(
      true,
    );
    // The drills are ended machine by machine.
    for (const m of [db, appServer, web]) {
      const cancel = await api('POST', `machines/${m.machine}/cancel`);
      expect(cancel.status).toBe(202);
      expect((await waitForOperation(api, cancel.body.operationId)).status).toBe('Completed');
    }
  });

  it('a failing webhook is retried, the plan reports which group and step failed and why; retry, then abort', async () => {
    const plan = {
      groups: [
        { name: 'first', machines: [web.machine] },
        {
          name: 'second',
          machines: [db.machine],
          pre: [
            {
              type: 'webhook',
              name: 'freeze-changes',
              url: `${hookBase}/fail`,
              retries: 2,
              retryIntervalSeconds: 1,
              timeoutSeconds: 5,
            },
          ],
        },
      ],
    };
    expect((await api('PUT', `plans/failing-${suffix}`, plan)).status).toBe(201);
    const started = await api('POST', `plans/failing-${suffix}/failover`, { test: true });
    expect(started.status).toBe(202);
    const id = started.body.operationId as string;
    const isWaiting = (op: Operation) => op.progress?.waitingFor?.type === 'decision';
    const failed = await waitForOperation(api, id, isWaiting);
    expect(failed.progress.failure).toMatchObject({
      group: 'second',
      step: 'freeze-changes',
      phase: 'pre',
      attempt: 1,
    });
    expect(failed.progress.failure.message).toMatch(/webhook freeze-changes .* answered 500/);
    expect(failed.progress.failure.message).toContain('the change-freeze service is down');
    expect(failed.progress.failure.message).toContain('3 attempts');
    expect(hooks.hits.filter((h) => h.path === '/fail')).toHaveLength(3);
    expect(failed.progress.groups[0].machines[web.machine].state).toBe('failed-over');
    expect(failed.progress.groups[1].machines[db.machine].state).toBe('pending');

    // Retry the step: it fails again (three more calls), and waits again.
    expect((await api('POST', `operations/${id}/retry`)).status).toBe(202);
    const again = await waitForOperation(
      api,
      id,
      (op) => isWaiting(op) && op.progress.failure?.attempt === 2,
    );
    expect(again.progress.failure.step).toBe('freeze-changes');
    expect(hooks.hits.filter((h) => h.path === '/fail')).toHaveLength(6);

    // Abort: the plan ends Failed with the whole story.
    expect((await api('POST', `operations/${id}/abort`)).status).toBe(202);
    const end = await waitForOperation(api, id);
    expect(end.status).toBe('Failed');
    expect(end.error).toMatch(
      /aborted at group second, step freeze-changes after attempt 2: webhook freeze-changes/,
    );
    expect(end.progress.state).toBe('aborted');
    expect((await api('POST', `machines/${db.machine}/cancel`)).status).toBe(404);
    expect(
      (await waitForOperation(api, (await api('POST', `machines/${web.machine}/cancel`)).body.operationId))
        .status,
    ).toBe('Completed');
  });

  it('a busy machine refuses the start (409); failed machines are reported with their step and reason (onFailure abort) and left clean', async () => {
    // db is already failing over (a drill started by hand): the plan's failover of db fails.
    const manual = await api('POST', `machines/${db.machine}/failover`, { recoveryPoint: 'p1', test: true });
    expect(manual.status).toBe(202);
    await waitForOperation(api, manual.body.operationId);
    expect(
      (
        await api('PUT', `plans/busy-${suffix}`, {
          groups: [{ name: 'only', machines: [appServer.machine, db.machine] }],
        })
      ).status,
    ).toBe(201);
    // The start refuses at once while a machine is busy...
    const refused = await api('POST', `plans/busy-${suffix}/failover`, { test: true });
    expect(refused.status).toBe(409);
    expect(refused.body.error.message).toContain(db.machine);
    // Free db; then a run whose point does not exist fails on every machine, and aborts at once.
    await waitForOperation(api, (await api('POST', `machines/${db.machine}/cancel`)).body.operationId);
    const run = await api('POST', `plans/busy-${suffix}/failover`, {
      test: true,
      recoveryPoint: 'no-such-point',
      onFailure: 'abort',
    });
    expect(run.status).toBe(202);
    const end = await waitForOperation(api, run.body.operationId);
    expect(end.status).toBe('Failed');
    expect(end.error).toMatch(
      new RegExp(
        `machine ${appServer.machine} failed while resolving the recovery point: Machine ${appServer.machine} has no recovery point matching point no-such-point`,
      ),
    );
    expect(end.progress.failure.machines.map((m: any) => m.machine).sort()).toEqual(
      [appServer.machine, db.machine].sort(),
    );
    // Nothing is left: both machines are free.
    for (const m of [appServer, db])
      expect((await api('POST', `machines/${m.machine}/cancel`)).status).toBe(404);
  });

  it("a plan's failover of a machine first removes what an abandoned failover of that machine left", async () => {
    const solo = new SourceMachine(`solo-${suffix}`, disks, 20);
    expect((await api('PUT', `machines/${solo.machine}`, { disks })).status).toBe(201);
    solo.randomWrites(20);
    solo.marker('p1', 'crash');
    await ship(replication, sender, solo.cut());
    await waitForPoint(api, solo.machine, 'p1');
    // An abandoned failover (a later failover cleared its claim, then failed before removing its
    // disk): its record says so, its disk is still there, the machine is free.
    const dead = 'fo-00000000abcd';
    await beginFailover(
      deps.tables,
      { machine: solo.machine, failoverId: dead, operationId: dead, kind: 'test', selector: { id: 'p1' } },
      new Date(),
    );
    await updateRecord(deps.tables, solo.machine, dead, { state: 'abandoned' }, new Date());
    await releaseMachine(deps.tables, solo.machine, dead);
    const point = await resolveRecoveryPoint(replication, solo.machine, { id: 'p1' });
    await deps.compute.materialiseDisk({
      machine: solo.machine,
      failoverId: dead,
      test: true,
      disk: point.disks[0]!,
    });
    const blobs = async () => {
      const names: string[] = [];
      for await (const b of deps.failoverDisks.listBlobsFlat({ prefix: `${solo.machine}/` }))
        names.push(b.name);
      return names;
    };
    expect(await blobs()).toEqual([failoverDiskName(solo.machine, 'd0', dead)]);

    expect(
      (await api('PUT', `plans/solo-${suffix}`, { groups: [{ name: 'only', machines: [solo.machine] }] }))
        .status,
    ).toBe(201);
    const run = await api('POST', `plans/solo-${suffix}/failover`, { test: true, recoveryPoint: 'p1' });
    expect(run.status, JSON.stringify(run.body)).toBe(202);
    const end = await waitForOperation(api, run.body.operationId);
    expect(end.status, end.error).toBe('Completed');
    expect(await readRecord(deps.tables, solo.machine, dead)).toBeUndefined();
    const left = await blobs();
    expect(left).toHaveLength(1);
    expect(left[0]).not.toContain(dead);
    await waitForOperation(api, (await api('POST', `machines/${solo.machine}/cancel`)).body.operationId);
    expect(await blobs()).toEqual([]);
  });

  it('a member held by a failover that never started is a 409 within the grace, then the plan takes it and fails it over', async () => {
    const held = new SourceMachine(`held-${suffix}`, disks, 21);
    expect((await api('PUT', `machines/${held.machine}`, { disks })).status).toBe(201);
    held.randomWrites(20);
    held.marker('p1', 'crash');
    await ship(replication, sender, held.cut());
    await waitForPoint(api, held.machine, 'p1');
    expect(
      (await api('PUT', `plans/held-${suffix}`, { groups: [{ name: 'only', machines: [held.machine] }] }))
        .status,
    ).toBe(201);
    // A starter that died after claiming: the rows exist, no orchestration does.
    const dead = 'fo-00000000dead';
    await beginFailover(
      deps.tables,
      { machine: held.machine, failoverId: dead, operationId: dead, kind: 'test', selector: { id: 'p1' } },
      new Date(),
    );
    const early = await api('POST', `plans/held-${suffix}/failover`, { test: true, recoveryPoint: 'p1' });
    expect(early.status).toBe(409);
    expect(early.body.error.message).toContain(dead);

    // The same claim, past the grace (its record last moved 5 minutes ago).
    await updateRecord(
      deps.tables,
      held.machine,
      dead,
      { state: 'accepted' },
      new Date(Date.now() - 5 * 60_000),
    );
    const run = await api('POST', `plans/held-${suffix}/failover`, { test: true, recoveryPoint: 'p1' });
    expect(run.status, JSON.stringify(run.body)).toBe(202);
    const end = await waitForOperation(api, run.body.operationId);
    expect(end.status, end.error).toBe('Completed');
    const member = end.progress.groups[0].machines[held.machine];
    expect(member.state).toBe('failed-over');
    expect(member.failoverId).not.toBe(dead);
    const bytes = await readRange(
      deps.failoverDisks.getPageBlobClient(failoverDiskName(held.machine, 'd0', member.failoverId)),
      0,
      MiB,
    );
    expect(bytes.equals(held.markers.get('p1')!.images.get('d0')!)).toBe(true);
    // The abandoned failover was removed by the member's failover; its cancel leaves nothing.
    expect(await readRecord(deps.tables, held.machine, dead)).toBeUndefined();
    await waitForOperation(api, (await api('POST', `machines/${held.machine}/cancel`)).body.operationId);
    expect((await api('GET', `machines/${held.machine}/failovers`)).body.value).toEqual([]);
  });
});
