import { randomUUID } from 'node:crypto';
import { describe, expect, inject, it } from 'vitest';
import { beginFailover, failoverDepsFromSettings, updateRecord } from '../../../shared/failover';
import {
  allRecoveryPoints,
  applyRetention,
  completeRecoveryPoint,
  recordArrival,
  recoveryPointKey,
  registerMachine,
  seedBlob,
  type TableName,
} from '../../../shared/replication';
import { quietLogger, testDeps, testSettings, type TestDeps } from './helpers';

// Retention keeps what other parts still use: the point of a failover that is not committed (and a
// planned failover's final marker point), and a machine's points at the group points its group
// still keeps. The clock is injected: the policy alone would prune every one of these points.

const connection = inject('azuriteConnectionString');
const HOUR = 3_600_000;
const policy = {
  crashConsistentIntervalSeconds: 300,
  retentionHours: 1,
  hourlyRetentionHours: 0,
  dailyRetentionDays: 0,
  keepChangeLogsHours: 0,
};

/** Snapshots the seed and records a point at source time `time`, as apply does. */
async function makePoint(deps: TestDeps, machine: string, id: string, time: number): Promise<string> {
  const snapshot = (await seedBlob(deps.seed, machine, 'd0').createSnapshot()).snapshot!;
  await recordArrival(
    deps.tables,
    {
      machine,
      disk: 'd0',
      markerId: id,
      kind: 'crash',
      tag: '',
      sourceTime: time,
      snapshot,
      epoch: 1,
      seq: 1,
    },
    new Date(time),
  );
  await completeRecoveryPoint(deps.tables, machine, id, new Date(time));
  return snapshot;
}

const pointIds = async (deps: TestDeps, machine: string) =>
  (await allRecoveryPoints(deps.tables, machine)).map((p) => p.markerId).sort();
const snapshotExists = (deps: TestDeps, machine: string, snapshot: string) =>
  seedBlob(deps.seed, machine, 'd0').withSnapshot(snapshot).exists();

describe('retention holds (injectable clock)', () => {
  const deps = testDeps(connection);
  const failover = failoverDepsFromSettings(testSettings(connection, 'unused'), {
    replication: deps,
    log: quietLogger(),
  });
  const t0 = Math.floor(Date.now() / HOUR) * HOUR - 48 * HOUR;
  const register = async (machine: string) =>
    registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: 64 * 1024 }], policy });

  it("keeps an uncommitted failover's point and a planned failover's marker point; after commit they are pruned", async () => {
    const machine = `hold-${randomUUID().slice(0, 8)}`;
    const planned = `plan-${randomUUID().slice(0, 8)}`;
    await register(machine);
    await register(planned);
    const p1 = await makePoint(deps, machine, 'p1', t0);
    const p2 = await makePoint(deps, machine, 'p2', t0 + 10 * 60_000);
    await makePoint(deps, machine, 'p3', t0 + 3 * HOUR);
    const failoverId = 'fo-000000000001';
    await beginFailover(
      failover.tables,
      { machine, failoverId, operationId: failoverId, kind: 'unplanned', selector: 'latest-processed' },
      new Date(t0 + 4 * HOUR),
    );
    await updateRecord(
      failover.tables,
      machine,
      failoverId,
      {
        state: 'failed-over',
        point: {
          id: 'p1',
          type: 'crash-consistent',
          sourceTime: new Date(t0).toISOString(),
          disks: [{ id: 'd0', snapshot: p1, sizeBytes: 64 * 1024 }],
        },
      },
      new Date(t0 + 4 * HOUR),
    );
    // A planned failover still quiescing: its record has no point yet, only the marker it waits for.
    const plannedId = 'fo-000000000002';
    const marker = await makePoint(deps, planned, `planned-${plannedId}`, t0);
    await makePoint(deps, planned, 'q2', t0 + 3 * HOUR);
    await beginFailover(
      failover.tables,
      {
        machine: planned,
        failoverId: plannedId,
        operationId: plannedId,
        kind: 'planned',
        selector: 'latest',
      },
      new Date(t0 + 4 * HOUR),
    );
    await updateRecord(failover.tables, planned, plannedId, { state: 'quiescing' }, new Date(t0 + 4 * HOUR));

    const now = new Date(t0 + 5 * HOUR);
    const first = await applyRetention(deps, now, { machines: [machine, planned] });
    expect(first.heldPoints).toBe(2);
    expect(await pointIds(deps, machine)).toEqual(['p1', 'p3']);
    expect(await snapshotExists(deps, machine, p1)).toBe(true);
    expect(await snapshotExists(deps, machine, p2)).toBe(false);
    expect(await pointIds(deps, planned)).toEqual([`planned-${plannedId}`, 'q2']);
    expect(await snapshotExists(deps, planned, marker)).toBe(true);

    // Commit (and the planned one fails over, commits): the points are the policy's again.
    await updateRecord(failover.tables, machine, failoverId, { state: 'committed' }, now);
    await updateRecord(failover.tables, planned, plannedId, { state: 'committed' }, now);
    const second = await applyRetention(deps, now, { machines: [machine, planned] });
    expect(second.heldPoints).toBe(0);
    expect(await pointIds(deps, machine)).toEqual(['p3']);
    expect(await snapshotExists(deps, machine, p1)).toBe(false);
    expect(await pointIds(deps, planned)).toEqual(['q2']);
    expect(await snapshotExists(deps, planned, marker)).toBe(false);
  });

  it("keeps a member's points at the group points its group keeps (the latest), and lets older ones go", async () => {
    const machine = `grp-${randomUUID().slice(0, 8)}`;
    const group = `g-${randomUUID().slice(0, 8)}`;
    await register(machine);
    const g1 = await makePoint(deps, machine, 'g1', t0);
    await makePoint(deps, machine, 'own1', t0 + 3 * HOUR);
    const groupPoints = await deps.tables.get('grouppoints' as TableName);
    const addGroupPoint = async (markerId: string, time: number, snapshot: string) =>
      groupPoints.createEntity({
        partitionKey: group,
        rowKey: recoveryPointKey(time, markerId),
        markerId,
        consistency: 'crash',
        sourceTime: time,
        createdAt: new Date(time).toISOString(),
        members: JSON.stringify({ [machine]: { d0: snapshot } }),
      });
    await addGroupPoint('g1', t0, g1);

    // g1 is the group's latest point: kept though the machine's own policy would prune it.
    const report = await applyRetention(deps, new Date(t0 + 5 * HOUR), { machines: [machine] });
    expect(report.heldPoints).toBe(1);
    expect(await pointIds(deps, machine)).toEqual(['g1', 'own1']);
    expect(await snapshotExists(deps, machine, g1)).toBe(true);

    // A newer group point: g1 is now past the window and not the latest; g2 is held.
    const g2 = await makePoint(deps, machine, 'g2', t0 + 6 * HOUR);
    await addGroupPoint('g2', t0 + 6 * HOUR, g2);
    await makePoint(deps, machine, 'own2', t0 + 9 * HOUR);
    await applyRetention(deps, new Date(t0 + 11 * HOUR), { machines: [machine] });
    expect(await pointIds(deps, machine)).toEqual(['g2', 'own2']);
    expect(await snapshotExists(deps, machine, g1)).toBe(false);
    expect(await snapshotExists(deps, machine, g2)).toBe(true);
  });

  it('prunes a group point row once no member keeps it and its member points are gone; a member point held by a failover keeps the row', async () => {
    const a = `gpa-${randomUUID().slice(0, 8)}`;
    const b = `gpb-${randomUUID().slice(0, 8)}`;
    const group = `g-${randomUUID().slice(0, 8)}`;
    await register(a);
    await register(b);
    const groupPoints = await deps.tables.get('grouppoints' as TableName);
    /** A group marker both members applied: each member's point, then the group point row. */
    const groupPoint = async (markerId: string, time: number) => {
      const members = {
        [a]: { d0: await makePoint(deps, a, markerId, time) },
        [b]: { d0: await makePoint(deps, b, markerId, time) },
      };
      await groupPoints.createEntity({
        partitionKey: group,
        rowKey: recoveryPointKey(time, markerId),
        markerId,
        consistency: 'crash',
        sourceTime: time,
        createdAt: new Date(time).toISOString(),
        members: JSON.stringify(members),
      });
    };
    const groupPointIds = async () => {
      const ids: string[] = [];
      for await (const row of groupPoints.listEntities<{ markerId: string }>({
        queryOptions: { filter: `PartitionKey eq '${group}'` },
      }))
        ids.push(row.markerId);
      return ids.sort();
    };
    const run = (hours: number) => applyRetention(deps, new Date(t0 + hours * HOUR), { machines: [a, b] });

    await groupPoint('g1', t0);
    await groupPoint('g2', t0 + 6 * HOUR);
    // b fails over to g1 and has not committed: its point g1 is held, so the row stays.
    const failoverId = 'fo-00000000g001';
    await beginFailover(
      failover.tables,
      { machine: b, failoverId, operationId: failoverId, kind: 'unplanned', selector: { id: 'g1' } },
      new Date(t0 + 7 * HOUR),
    );
    const held = await run(11);
    expect(held.groupPointsDeleted).toBe(0);
    expect(await pointIds(deps, a)).toEqual(['g2']);
    expect(await pointIds(deps, b)).toEqual(['g1', 'g2']);
    expect(await groupPointIds()).toEqual(['g1', 'g2']);

    // Committed: b's g1 goes, and with it the row; g2, the latest, stays with its member points.
    await updateRecord(failover.tables, b, failoverId, { state: 'committed' }, new Date(t0 + 12 * HOUR));
    const pruned = await run(12);
    expect(pruned.groupPointsDeleted).toBe(1);
    expect(await pointIds(deps, b)).toEqual(['g2']);
    expect(await groupPointIds()).toEqual(['g2']);

    // g3 is newer: g2 is no longer kept by the members' policy, its points and its row go together.
    await groupPoint('g3', t0 + 20 * HOUR);
    const next = await run(23);
    expect(next.groupPointsDeleted).toBe(1);
    expect(await groupPointIds()).toEqual(['g3']);
    expect(await pointIds(deps, a)).toEqual(['g3']);
    // The latest group point row stays (the members' policy keeps it) even with its member points gone.
    for (const m of [a, b]) {
      const points = await deps.tables.get('recoverypoints' as TableName);
      for (const p of await allRecoveryPoints(deps.tables, m)) await points.deleteEntity(m, p.rowKey);
    }
    expect((await run(48)).groupPointsDeleted).toBe(0);
    expect(await groupPointIds()).toEqual(['g3']);
  });
});
