import { randomUUID } from 'node:crypto';
import { describe, expect, inject, it } from 'vitest';
import { changelogBlobName } from '../../../shared/envelope';
import {
  allRecoveryPoints,
  applyRetention,
  completeRecoveryPoint,
  ensureContainer,
  listPartition,
  recordArrival,
  registerMachine,
  seedBlob,
  TABLES,
  type ArrivalEntity,
  type ReplicationPolicy,
} from '../../../shared/replication';
import { testDeps, uploadSegment, type TestDeps } from './helpers';

const connection = inject('azuriteConnectionString');
const HOUR = 3_600_000;
const DAY = 24 * HOUR;

interface Made {
  id: string;
  time: number;
  kind: 'crash' | 'app';
}

/** Takes real snapshots and records them as the apply function does, at source time `time`. */
async function makePoint(
  deps: TestDeps,
  machine: string,
  disks: string[],
  point: Made,
  now: Date,
): Promise<Record<string, string>> {
  const snapshots: Record<string, string> = {};
  for (const disk of disks) {
    const snapshot = (await seedBlob(deps.seed, machine, disk).createSnapshot()).snapshot!;
    snapshots[disk] = snapshot;
    await recordArrival(
      deps.tables,
      {
        machine,
        disk,
        markerId: point.id,
        kind: point.kind,
        tag: '',
        sourceTime: point.time,
        snapshot,
        epoch: 1,
        seq: 1,
      },
      now,
    );
  }
  await completeRecoveryPoint(deps.tables, machine, point.id, now);
  return snapshots;
}

/** The policy as a reader of docs/replication.md would apply it, by calendar hour and day. */
function expectedKept(history: Made[], policy: ReplicationPolicy, now: number): string[] {
  const keep = new Set<string>();
  const newestFirst = [...history].sort((a, b) => b.time - a.time);
  if (newestFirst[0]) keep.add(newestFirst[0].id);
  const app = newestFirst.find((p) => p.kind === 'app');
  if (app) keep.add(app.id);
  const seenHour = new Set<string>();
  const seenDay = new Set<string>();
  for (const p of newestFirst) {
    const age = now - p.time;
    if (age < policy.retentionHours * HOUR) keep.add(p.id);
    const hour = new Date(p.time).toISOString().slice(0, 13);
    if (!seenHour.has(hour)) {
      seenHour.add(hour);
      if (age < policy.hourlyRetentionHours * HOUR) keep.add(p.id);
    }
    const day = new Date(p.time).toISOString().slice(0, 10);
    if (!seenDay.has(day)) {
      seenDay.add(day);
      if (age < policy.dailyRetentionDays * DAY) keep.add(p.id);
    }
  }
  return newestFirst.filter((p) => keep.has(p.id)).map((p) => p.id);
}

async function snapshotsOf(deps: TestDeps, machine: string): Promise<string[]> {
  const out: string[] = [];
  for await (const b of deps.seed.listBlobsFlat({ prefix: `${machine}/`, includeSnapshots: true }))
    if (b.snapshot) out.push(`${b.name}@${b.snapshot}`);
  return out.sort();
}

describe('retention over a simulated fortnight (injectable clock)', () => {
  it('keeps exactly what the policy says, the latest app-consistent point, and deletes the rest with their snapshots', async () => {
    const deps = testDeps(connection);
    const machine = `ret-${randomUUID().slice(0, 8)}`;
    const policy = {
      crashConsistentIntervalSeconds: 300,
      retentionHours: 6,
      hourlyRetentionHours: 30,
      dailyRetentionDays: 5,
      keepChangeLogsHours: 0,
    };
    const reg = await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: 64 * 1024 }], policy });
    const fullPolicy = reg.machine.policy;
    const start = Math.floor(Date.now() / HOUR) * HOUR + 17 * 60_000; // points at :17 and :47 past the hour
    const history: Made[] = [];
    const snapshotsById = new Map<string, string>();
    let n = 0;
    // Two points an hour for 14 days; app-consistent every 8 hours during the first three days only.
    for (let t = start; t < start + 14 * DAY; t += 30 * 60_000) {
      const point: Made = {
        id: `p${String(++n).padStart(4, '0')}`,
        time: t,
        kind: n % 16 === 0 && t < start + 3 * DAY ? 'app' : 'crash',
      };
      history.push(point);
      const snaps = await makePoint(deps, machine, ['d0'], point, new Date(t));
      snapshotsById.set(point.id, `${machine}/d0.img@${snaps.d0}`);
      // Retention runs every 6 simulated hours.
      if ((t - start) % (6 * HOUR) === 0 || t + 30 * 60_000 >= start + 14 * DAY) {
        const now = t + 60_000;
        const report = await applyRetention(deps, new Date(now), { machines: [machine] });
        expect(report.machines).toBe(1);
        const kept = (await allRecoveryPoints(deps.tables, machine)).map((p) => p.markerId);
        expect(kept, `after the run at +${((now - start) / HOUR).toFixed(1)} h`).toEqual(
          expectedKept(history, fullPolicy, now),
        );
        expect(await snapshotsOf(deps, machine)).toEqual(kept.map((id) => snapshotsById.get(id)!).sort());
      }
    }
    const kept = (await allRecoveryPoints(deps.tables, machine)).map((p) => p.markerId);
    const lastApp = [...history].reverse().find((p) => p.kind === 'app')!;
    expect(kept).toContain(lastApp.id); // 11 days old, kept because it is the latest app-consistent point
    // 6 h of every point (12), the hourly tier up to 30 h, the daily tier up to 5 days, and the app point.
    expect(kept.length).toBeGreaterThan(12 + 24);
    expect(kept.length).toBeLessThan(12 + 24 + 5 + 2);
    const arrivals = await listPartition<ArrivalEntity>(await deps.tables.get(TABLES.arrivals), machine);
    expect(arrivals.map((a) => a.markerId).sort()).toEqual([...kept].sort());
  });

  it('cleans orphaned snapshots after a grace period, incomplete arrivals past the window, and applied change logs', async () => {
    const deps = testDeps(connection);
    const machine = `orph-${randomUUID().slice(0, 8)}`;
    await registerMachine(deps, machine, {
      disks: [
        { id: 'd0', sizeBytes: 64 * 1024 },
        { id: 'd1', sizeBytes: 64 * 1024 },
      ],
      policy: { retentionHours: 1 },
    });
    const now = Date.now();
    // A snapshot nobody recorded (the applier died in between).
    const orphan = (await seedBlob(deps.seed, machine, 'd0').createSnapshot()).snapshot!;
    // A marker only d0 reached (d1 never did): an incomplete arrival.
    const lone = (await seedBlob(deps.seed, machine, 'd0').createSnapshot()).snapshot!;
    await recordArrival(
      deps.tables,
      {
        machine,
        disk: 'd0',
        markerId: 'lone',
        kind: 'crash',
        tag: '',
        sourceTime: now,
        snapshot: lone,
        epoch: 0,
        seq: 1,
      },
      new Date(now),
    );
    // A complete point, the latest: always kept.
    await makePoint(deps, machine, ['d0', 'd1'], { id: 'whole', time: now, kind: 'crash' }, new Date(now));
    // An applied change log left behind (the run died between cursor and delete) and a pending one.
    await deps.tables
      .get(TABLES.disks)
      .then((t) => t.updateEntity({ partitionKey: machine, rowKey: 'd1', epoch: 1, appliedSeq: 1 }, 'Merge'));
    const header = { machine, disk: 'd1', epoch: 1, firstWriteTime: 1, lastWriteTime: 1 };
    await uploadSegment(deps, {
      header: { ...header, seq: 1 },
      records: [{ type: 'zero', offset: 0, length: 512 }],
    });
    await uploadSegment(deps, {
      header: { ...header, seq: 2 },
      records: [{ type: 'zero', offset: 0, length: 512 }],
    });

    const early = await applyRetention(deps, new Date(now + 60_000), { machines: [machine] });
    expect(early.orphanSnapshotsDeleted).toBe(0); // within the grace period: maybe a run still recording it
    expect(early.incompleteArrivalsDeleted).toBe(0);
    expect(early.changeLogsDeleted).toBe(1);

    const later = await applyRetention(deps, new Date(now + 2 * HOUR), { machines: [machine] });
    expect(later.incompleteArrivalsDeleted).toBe(1);
    expect(later.orphanSnapshotsDeleted).toBe(1);
    const left = await snapshotsOf(deps, machine);
    expect(left.some((s) => s.endsWith(orphan) || s.endsWith(lone))).toBe(false);
    expect(left).toHaveLength(2); // the complete point's two snapshots
    expect((await allRecoveryPoints(deps.tables, machine)).map((p) => p.markerId)).toEqual(['whole']);
    const changelogs = await ensureContainer(deps.changelogs);
    expect(await changelogs.getBlockBlobClient(changelogBlobName({ ...header, seq: 1 })).exists()).toBe(
      false,
    );
    expect(await changelogs.getBlockBlobClient(changelogBlobName({ ...header, seq: 2 })).exists()).toBe(true);
  });
});
