import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { HostProcess } from '../../infra/local/host-process';
import {
  acknowledgeCommand,
  beginFailover,
  FAILOVER_DISKS_CONTAINER,
  FAILOVER_TABLES,
  failoverDepsFromSettings,
  failoverDiskName,
  pendingCommands,
  readLocalTarget,
  readRecord,
  resolveRecoveryPoint,
} from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { isConflict, readEntity, readRange, seedBlob } from '../../shared/replication';
import { waitFor } from '../helpers/host';
import {
  apiClient,
  queueSender,
  ship,
  SourceMachine,
  testStack,
  waitForOperation,
  waitForPoint,
  type Api,
} from '../shared/failover/helpers';
import { quietLogger, testDeps } from '../shared/replication/helpers';

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;
const suffix = randomUUID().slice(0, 6);

describe('failover over HTTP through the local host', () => {
  const stack = testStack(connection, 'failover');
  const replication = testDeps(connection);
  const deps = failoverDepsFromSettings(stack.settings, { replication, log: quietLogger() });
  let host: HostProcess;
  let api: Api;
  let sender: MessageSender;
  const disks = [
    { id: 'd0', sizeBytes: 2 * MiB },
    { id: 'd1', sizeBytes: 1 * MiB },
  ];
  const alpha = new SourceMachine(`alpha-${suffix}`, disks, 1);

  beforeAll(async () => {
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    sender = queueSender(stack);
    expect((await api('PUT', `machines/${alpha.machine}`, { disks })).status).toBe(201);
    // Three points: m1 crash, m2 app, m3 crash.
    alpha.randomWrites(60);
    alpha.marker('m1', 'crash');
    await ship(replication, sender, alpha.cut());
    alpha.randomWrites(60);
    alpha.marker('m2', 'app');
    alpha.randomWrites(30);
    await ship(replication, sender, alpha.cut());
    alpha.randomWrites(40);
    alpha.marker('m3', 'crash');
    alpha.randomWrites(10); // after the last marker: in no point
    await ship(replication, sender, alpha.cut());
    await waitForPoint(api, alpha.machine, 'm3');
  });

  afterAll(async () => {
    await sender?.close();
    await Promise.all(stack.hosts.map((h) => h.stop()));
  });

  /** Every failover disk equals the model at the marker, byte for byte. */
  async function expectDisksAt(source: SourceMachine, failoverId: string, markerId: string) {
    const marker = source.markers.get(markerId)!;
    for (const d of source.disks) {
      const blob = deps.failoverDisks.getPageBlobClient(failoverDiskName(source.machine, d.id, failoverId));
      const bytes = await readRange(blob, 0, d.sizeBytes);
      expect(
        bytes.equals(marker.images.get(d.id)!),
        `${source.machine}/${d.id} of ${failoverId} at ${markerId}`,
      ).toBe(true);
    }
    const target = await readLocalTarget(deps.tables, source.machine, failoverId);
    expect(target?.running).toBe(true);
    expect(target?.disks.map((d) => d.id)).toEqual(source.disks.map((d) => d.id));
  }

  async function failover(machine: string, body: unknown) {
    const res = await api('POST', `machines/${machine}/failover`, body);
    expect(res.status, JSON.stringify(res.body)).toBe(202);
    expect(res.body.statusUri).toMatch(new RegExp(`/api/operations/${res.body.operationId}$`));
    return res.body as { operationId: string; failoverId: string };
  }

  async function completed(id: string) {
    const op = await waitForOperation(api, id);
    expect(op.status, op.error ?? JSON.stringify(op.progress)).toBe('Completed');
    return op;
  }

  /** What the failover left behind: failover blobs, target row, failover rows. */
  async function leftovers(machine: string, failoverId: string) {
    const blobs: string[] = [];
    for await (const b of deps.failoverDisks.listBlobsFlat({ prefix: `${machine}/` }))
      if (b.name.includes(failoverId)) blobs.push(b.name);
    const targets = await deps.tables.get(FAILOVER_TABLES.targets);
    const failovers = await deps.tables.get(FAILOVER_TABLES.failovers);
    const commands = await deps.tables.get(FAILOVER_TABLES.commands);
    const rows = [];
    for (const [table, filter] of [
      [targets, `PartitionKey eq '${machine}'`],
      [failovers, `PartitionKey eq '${machine}'`],
      [commands, `PartitionKey eq '${machine}'`],
    ] as const) {
      for await (const e of table.listEntities({ queryOptions: { filter } }))
        rows.push(`${table.tableName}/${e.rowKey}`);
    }
    return { blobs, rows };
  }

  it('rejects bad input: unknown machine or point 404, invalid body 400, each with a message', async () => {
    const cases: [string, unknown, number, string][] = [
      [`nobody-${suffix}`, { recoveryPoint: 'latest' }, 404, 'machine'],
      [alpha.machine, { recoveryPoint: 'no-such-point' }, 404, 'recoveryPoint'],
      [alpha.machine, { recoveryPoint: { time: '2000-01-01T00:00:00Z' } }, 404, 'recoveryPoint'],
      [alpha.machine, {}, 400, 'recoveryPoint'],
      [alpha.machine, { recoveryPoint: 'latest', turbo: true }, 400, 'turbo'],
      [alpha.machine, { recoveryPoint: { time: 'yesterday' } }, 400, 'recoveryPoint.time'],
      [alpha.machine, { recoveryPoint: 'not a point!' }, 400, 'recoveryPoint'],
      [alpha.machine, { recoveryPoint: 'latest', test: true, planned: true }, 400, 'planned'],
      [alpha.machine, '[1,2', 400, 'body'],
      ['Bad_Name', { recoveryPoint: 'latest' }, 400, 'machine'],
    ];
    for (const [machine, body, status, target] of cases) {
      const res = await api('POST', `machines/${machine}/failover`, body);
      expect(res.status, `${machine} ${JSON.stringify(body)}: ${JSON.stringify(res.body)}`).toBe(status);
      expect(res.body.error.target).toBe(target);
      expect(res.body.error.message.length).toBeGreaterThan(20);
    }
    for (const action of ['commit', 'cancel']) {
      const res = await api('POST', `machines/${alpha.machine}/${action}`);
      expect(res.status).toBe(404);
      expect(res.body.error.message).toMatch(/no active failover/);
    }
    expect((await api('GET', 'operations/no-such-operation')).status).toBe(404);
  });

  it('test failover to latest-app-consistent: isolated target, 409 for a second one, replication keeps making points, cancel removes everything', async () => {
    const started = await failover(alpha.machine, { recoveryPoint: 'latest-app-consistent', test: true });
    const second = await api('POST', `machines/${alpha.machine}/failover`, { recoveryPoint: 'm1' });
    expect(second.status).toBe(409);
    expect(second.body.error.message).toContain(started.failoverId);
    const op = await completed(started.operationId);
    expect(op.output.point.id).toBe('m2');
    await expectDisksAt(alpha, started.failoverId, 'm2');
    const target = await readLocalTarget(deps.tables, alpha.machine, started.failoverId);
    expect(target?.test).toBe(true);
    expect(target?.name).not.toBe(alpha.machine);
    expect(target?.network).toMatch(/^isolated-/);

    // Replication goes on during the drill: a new point appears.
    alpha.randomWrites(20);
    alpha.marker('m4', 'crash');
    await ship(replication, sender, alpha.cut());
    await waitForPoint(api, alpha.machine, 'm4');

    // Commit is not for drills.
    const commit = await api('POST', `machines/${alpha.machine}/commit`);
    expect(commit.status).toBe(409);
    expect(commit.body.error.message).toMatch(/cancel/);

    expect((await leftovers(alpha.machine, started.failoverId)).blobs).toHaveLength(2);
    const cancel = await api('POST', `machines/${alpha.machine}/cancel`);
    expect(cancel.status).toBe(202);
    const cancelled = await completed(cancel.body.operationId);
    expect(cancelled.output.deleted).toEqual(
      expect.arrayContaining([
        `${FAILOVER_DISKS_CONTAINER}/${failoverDiskName(alpha.machine, 'd0', started.failoverId)}`,
        `${FAILOVER_DISKS_CONTAINER}/${failoverDiskName(alpha.machine, 'd1', started.failoverId)}`,
        `${FAILOVER_TABLES.targets}/${alpha.machine}/${started.failoverId}`,
      ]),
    );
    expect(await leftovers(alpha.machine, started.failoverId)).toEqual({ blobs: [], rows: [] });
    // The seed and its points are untouched.
    const points = await api('GET', `machines/${alpha.machine}/recovery-points`);
    expect(points.body.value.map((p: { id: string }) => p.id)).toEqual(['m4', 'm3', 'm2', 'm1']);
  });

  it('test failover to latest-processed and to { time }, each equal to the model at its point', async () => {
    const a = await failover(alpha.machine, { recoveryPoint: 'latest-processed', test: true });
    expect((await completed(a.operationId)).output.point.id).toBe('m4');
    await expectDisksAt(alpha, a.failoverId, 'm4');
    await completed((await api('POST', `machines/${alpha.machine}/cancel`)).body.operationId);

    const between = new Date(alpha.markers.get('m2')!.time + 1).toISOString();
    const b = await failover(alpha.machine, { recoveryPoint: { time: between }, test: true });
    expect((await completed(b.operationId)).output.point.id).toBe('m2');
    await expectDisksAt(alpha, b.failoverId, 'm2');
    await completed((await api('POST', `machines/${alpha.machine}/cancel`)).body.operationId);
    expect(await leftovers(alpha.machine, b.failoverId)).toEqual({ blobs: [], rows: [] });
  });

  it('failover to latest applies what is pending first; change recovery point; commit; then 409s', async () => {
    // Change logs in the cache that nobody announced: `latest` must get them applied.
    alpha.randomWrites(30);
    alpha.marker('m5', 'crash');
    await ship(replication, sender, alpha.cut(), false);
    const started = await failover(alpha.machine, { recoveryPoint: 'latest' });
    const op = await completed(started.operationId);
    expect(op.output.point.id).toBe('m5');
    expect(op.progress.state).toBe('failed-over');
    await expectDisksAt(alpha, started.failoverId, 'm5');
    const target = await readLocalTarget(deps.tables, alpha.machine, started.failoverId);
    expect(target).toMatchObject({ name: alpha.machine, test: false, network: 'recovery' });

    // Change the point: by id, then by time.
    const change = await api('POST', `machines/${alpha.machine}/change-recovery-point`, {
      recoveryPoint: 'm1',
    });
    expect(change.status).toBe(202);
    expect((await completed(change.body.operationId)).output.point.id).toBe('m1');
    await expectDisksAt(alpha, started.failoverId, 'm1');
    expect(
      (await api('POST', `machines/${alpha.machine}/change-recovery-point`, { recoveryPoint: 'nope' }))
        .status,
    ).toBe(404);
    expect((await api('POST', `machines/${alpha.machine}/change-recovery-point`, {})).status).toBe(400);
    const between = new Date(alpha.markers.get('m3')!.time + 5).toISOString();
    const change2 = await api('POST', `machines/${alpha.machine}/change-recovery-point`, {
      recoveryPoint: { time: between },
    });
    expect((await completed(change2.body.operationId)).output.point.id).toBe('m3');
    await expectDisksAt(alpha, started.failoverId, 'm3');

    const commit = await api('POST', `machines/${alpha.machine}/commit`);
    expect(commit.status).toBe(202);
    await completed(commit.body.operationId);
    expect((await readRecord(deps.tables, alpha.machine, started.failoverId))?.state).toBe('committed');

    const late = await api('POST', `machines/${alpha.machine}/change-recovery-point`, {
      recoveryPoint: 'm2',
    });
    expect(late.status).toBe(409);
    expect(late.body.error.message).toMatch(/committed/);
    expect((await api('POST', `machines/${alpha.machine}/cancel`)).status).toBe(409);
    expect((await api('POST', `machines/${alpha.machine}/commit`)).status).toBe(409);
    const again = await api('POST', `machines/${alpha.machine}/failover`, { recoveryPoint: 'latest' });
    expect(again.status).toBe(409);
    const list = await api('GET', `machines/${alpha.machine}/failovers`);
    expect(list.body.value[0]).toMatchObject({
      failoverId: started.failoverId,
      state: 'committed',
      kind: 'unplanned',
    });
  });

  it('planned failover: the agent quiesces on the command, cuts the final marker, and no acknowledged write is lost', async () => {
    const beta = new SourceMachine(`beta-${suffix}`, disks, 2);
    expect((await api('PUT', `machines/${beta.machine}`, { disks })).status).toBe(201);
    beta.randomWrites(50);
    beta.marker('b1', 'app');
    await ship(replication, sender, beta.cut());
    await waitForPoint(api, beta.machine, 'b1');

    const started = await failover(beta.machine, { recoveryPoint: 'latest', planned: true, waitSeconds: 60 });
    // The agent's side, as the proxy would serve it: pick up the command...
    const [command] = await waitFor(async () => {
      const list = await pendingCommands(deps.tables, beta.machine);
      return list.length > 0 ? list : undefined;
    }, 'the quiesce command');
    expect(command).toMatchObject({ type: 'quiesce', markerKind: 'app', failoverId: started.failoverId });
    const progress = (await api('GET', `operations/${started.operationId}`)).body.progress;
    expect(progress).toMatchObject({ state: 'quiescing', step: 'quiescing the source' });
    // ...the last writes it acknowledged before quiescing, then the final marker.
    beta.randomWrites(40);
    const last = Buffer.alloc(4096, 0xab);
    beta.write('d1', MiB - 4096, last);
    beta.write('d0', 0, Buffer.alloc(512, 0xcd));
    beta.marker(command.markerId, 'app');
    await ship(replication, sender, beta.cut());
    await acknowledgeCommand(deps.tables, beta.machine, command.id, { state: 'done' }, new Date());

    const op = await completed(started.operationId);
    expect(op.output.point).toMatchObject({ id: command.markerId, type: 'app-consistent' });
    await expectDisksAt(beta, started.failoverId, command.markerId);
    const d1 = await readRange(
      deps.failoverDisks.getPageBlobClient(failoverDiskName(beta.machine, 'd1', started.failoverId)),
      MiB - 4096,
      4096,
    );
    expect(d1.equals(last)).toBe(true);
    const table = await deps.tables.get(FAILOVER_TABLES.commands);
    expect((await readEntity<{ state: string }>(table, beta.machine, command.id))?.state).toBe('done');
  });

  it('a planned failover whose agent never answers fails clearly and frees the machine', async () => {
    const gamma = new SourceMachine(`gamma-${suffix}`, disks, 3);
    expect((await api('PUT', `machines/${gamma.machine}`, { disks })).status).toBe(201);
    const started = await failover(gamma.machine, { recoveryPoint: 'latest', planned: true, waitSeconds: 2 });
    const op = await waitForOperation(api, started.operationId);
    expect(op.status).toBe('Failed');
    expect(op.error).toMatch(/quiescing the source/);
    expect(op.error).toMatch(/did not deliver the final marker/);
    expect((await readRecord(deps.tables, gamma.machine, started.failoverId))?.state).toBe('failed');
    expect((await leftovers(gamma.machine, started.failoverId)).blobs).toEqual([]);
    expect((await api('POST', `machines/${gamma.machine}/cancel`)).status).toBe(404);
  });

  it('a terminated test failover does not hold the machine: the next one removes what it left, and after its cancel nothing of either is left', async () => {
    const delta = new SourceMachine(`delta-${suffix}`, disks, 4);
    expect((await api('PUT', `machines/${delta.machine}`, { disks })).status).toBe(201);
    delta.randomWrites(40);
    delta.marker('d1', 'crash');
    await ship(replication, sender, delta.cut());
    await waitForPoint(api, delta.machine, 'd1');

    // The test holds disk d0's seed lease (another applier, as far as apply knows), so the change
    // logs shipped next stay unapplied and a failover to `latest` waits in applying-pending.
    // The applier that recorded d1 may still hold the lease for a moment (it lets go after its
    // cursor update): take it once it is free.
    const lease = seedBlob(replication.seed, delta.machine, 'd0').getBlobLeaseClient();
    await waitFor(
      () =>
        lease.acquireLease(-1).then(
          () => true,
          (err: unknown) => {
            if (isConflict(err)) return undefined;
            throw err;
          },
        ),
      "the applier to let go of d0's seed lease",
    );
    delta.randomWrites(10);
    delta.marker('d2', 'crash');
    await ship(replication, sender, delta.cut());
    const first = await api('POST', `machines/${delta.machine}/failover`, {
      recoveryPoint: 'latest',
      test: true,
      waitSeconds: 3600,
    });
    expect(first.status, JSON.stringify(first.body)).toBe(202);
    const a = first.body.failoverId as string;
    await waitFor(async () => {
      const op = await api('GET', `operations/${a}`);
      return op.body.progress?.state === 'applying-pending' ? true : undefined;
    }, 'the first failover waiting for pending change logs');
    // What a failover terminated while creating its target leaves (a moment the test cannot hit
    // from outside), made by the same compute provider under its failover id: disks and target.
    const point = await resolveRecoveryPoint(replication, delta.machine, { id: 'd1' });
    const made = [];
    for (const disk of point.disks)
      made.push(
        await deps.compute.materialiseDisk({ machine: delta.machine, failoverId: a, test: true, disk }),
      );
    await deps.compute.createTarget({
      machine: delta.machine,
      failoverId: a,
      test: true,
      pointId: point.id,
      disks: made,
    });
    expect((await leftovers(delta.machine, a)).blobs).toHaveLength(2);

    // While it runs, it holds the machine.
    const refused = await api('POST', `machines/${delta.machine}/failover`, {
      recoveryPoint: 'd1',
      test: true,
    });
    expect(refused.status).toBe(409);
    expect(refused.body.error.code).toBe('FailoverInProgress');

    const terminate = await fetch(
      (first.body.management.terminatePostUri as string).replace('{text}', 'test%20terminates%20it'),
      { method: 'POST' },
    );
    expect(terminate.status).toBe(202);
    await waitForOperation(api, a);
    expect((await api('GET', `operations/${a}`)).body.status).toBe('Terminated');

    // The next test failover is accepted at once; it first removes what the terminated one left.
    const b = await failover(delta.machine, { recoveryPoint: 'd1', test: true });
    const op = await completed(b.operationId);
    expect(op.output.point.id).toBe('d1');
    await expectDisksAt(delta, b.failoverId, 'd1');
    const removed = op.progress.removedAbandoned as { failoverId: string; deleted: string[] }[];
    expect(removed.map((r) => r.failoverId)).toEqual([a]);
    expect(removed[0]!.deleted).toEqual(
      expect.arrayContaining([
        `${FAILOVER_DISKS_CONTAINER}/${failoverDiskName(delta.machine, 'd0', a)}`,
        `${FAILOVER_DISKS_CONTAINER}/${failoverDiskName(delta.machine, 'd1', a)}`,
        `${FAILOVER_TABLES.targets}/${delta.machine}/${a}`,
        `${FAILOVER_TABLES.failovers}/${delta.machine}/${a}`,
      ]),
    );
    expect(await readRecord(deps.tables, delta.machine, a)).toBeUndefined();
    expect((await leftovers(delta.machine, a)).blobs).toEqual([]);

    const cancel = await api('POST', `machines/${delta.machine}/cancel`);
    expect(cancel.status).toBe(202);
    await completed(cancel.body.operationId);
    // No failover disk of either, and no target, failover or command row of the machine.
    expect(await leftovers(delta.machine, a)).toEqual({ blobs: [], rows: [] });
    expect(await leftovers(delta.machine, b.failoverId)).toEqual({ blobs: [], rows: [] });
    await lease.releaseLease();
  });

  it('a claim whose failover never started holds the machine for a grace period only', async () => {
    const epsilon = new SourceMachine(`epsilon-${suffix}`, disks, 5);
    expect((await api('PUT', `machines/${epsilon.machine}`, { disks })).status).toBe(201);
    epsilon.randomWrites(20);
    epsilon.marker('e1', 'app');
    await ship(replication, sender, epsilon.cut());
    await waitForPoint(api, epsilon.machine, 'e1');

    // A starter that died after claiming: the rows exist, no orchestration does.
    const claim = (failoverId: string, at: Date) =>
      beginFailover(
        deps.tables,
        {
          machine: epsilon.machine,
          failoverId,
          operationId: failoverId,
          kind: 'test',
          selector: { id: 'e1' },
        },
        at,
      );
    await claim('fo-000000000001', new Date());
    const fresh = await api('POST', `machines/${epsilon.machine}/failover`, {
      recoveryPoint: 'e1',
      test: true,
    });
    expect(fresh.status).toBe(409);
    expect(fresh.body.error.message).toContain('fo-000000000001');
    await (await deps.tables.get(FAILOVER_TABLES.failovers)).deleteEntity(epsilon.machine, 'active');
    await (await deps.tables.get(FAILOVER_TABLES.failovers)).deleteEntity(epsilon.machine, 'fo-000000000001');

    await claim('fo-000000000002', new Date(Date.now() - 5 * 60_000));
    const b = await failover(epsilon.machine, { recoveryPoint: 'e1', test: true });
    await completed(b.operationId);
    await expectDisksAt(epsilon, b.failoverId, 'e1');
    expect(await readRecord(deps.tables, epsilon.machine, 'fo-000000000002')).toBeUndefined();
    await completed((await api('POST', `machines/${epsilon.machine}/cancel`)).body.operationId);
    expect(await leftovers(epsilon.machine, b.failoverId)).toEqual({ blobs: [], rows: [] });
  });

  it('a commit or cancel whose operation never started may be started again after the grace period', async () => {
    const zeta = new SourceMachine(`zeta-${suffix}`, disks, 6);
    expect((await api('PUT', `machines/${zeta.machine}`, { disks })).status).toBe(201);
    zeta.randomWrites(20);
    zeta.marker('z1', 'crash');
    await ship(replication, sender, zeta.cut());
    await waitForPoint(api, zeta.machine, 'z1');
    const failovers = await deps.tables.get(FAILOVER_TABLES.failovers);
    /** The record as a starter leaves it when it dies after moving the state, before starting. */
    const deadAction = (failoverId: string, state: string, minutesAgo: number) =>
      failovers.updateEntity(
        {
          partitionKey: zeta.machine,
          rowKey: failoverId,
          state,
          operationId: 'op-0000000000dead',
          updatedAt: new Date(Date.now() - minutesAgo * 60_000).toISOString(),
        },
        'Merge',
      );

    const drill = await failover(zeta.machine, { recoveryPoint: 'z1', test: true });
    await completed(drill.operationId);
    await deadAction(drill.failoverId, 'cancelling', 0);
    const early = await api('POST', `machines/${zeta.machine}/cancel`);
    expect(early.status).toBe(409);
    expect(early.body.error.code).toBe('InvalidFailoverState');
    await deadAction(drill.failoverId, 'cancelling', 5);
    const cancel = await api('POST', `machines/${zeta.machine}/cancel`);
    expect(cancel.status, JSON.stringify(cancel.body)).toBe(202);
    await completed(cancel.body.operationId);
    expect(await leftovers(zeta.machine, drill.failoverId)).toEqual({ blobs: [], rows: [] });

    const real = await failover(zeta.machine, { recoveryPoint: 'z1' });
    await completed(real.operationId);
    await deadAction(real.failoverId, 'committing', 5);
    // A committing failover is never abandoned: a new failover is still refused.
    expect(
      (await api('POST', `machines/${zeta.machine}/failover`, { recoveryPoint: 'z1', test: true })).status,
    ).toBe(409);
    const commit = await api('POST', `machines/${zeta.machine}/commit`);
    expect(commit.status, JSON.stringify(commit.body)).toBe(202);
    await completed(commit.body.operationId);
    expect(await readRecord(deps.tables, zeta.machine, real.failoverId)).toMatchObject({
      state: 'committed',
      operationId: commit.body.operationId,
    });
  });
});
