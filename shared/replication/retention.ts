import { changelogBlobName } from '../envelope';
import type { ReplicationDeps } from './context';
import { ensureContainer } from './context';
import { readPolicy, type ReplicationPolicy } from './policy';
import { allRecoveryPoints } from './recovery-points';
import { seedBlob, seedBlobName } from './seed-disk';
import {
  isNotFound,
  listPartition,
  MACHINES_PARTITION,
  TABLES,
  type ArrivalEntity,
  type DiskEntity,
  type MachineEntity,
  type RecoveryPointEntity,
  type TableName,
} from './tables';

const HOUR_MS = 3_600_000;
const DAY_MS = 24 * HOUR_MS;
/** A snapshot younger than this may belong to an apply run that has not recorded it yet. */
export const ORPHAN_GRACE_MS = 15 * 60_000;

export interface RetainedPoint {
  key: string;
  sourceTime: number;
  kind: string;
}

/**
 * Which recovery points the policy keeps at `now` (pure; `points` in any order):
 * - every point younger than retentionHours;
 * - the latest point of each UTC hour, while younger than hourlyRetentionHours;
 * - the latest point of each UTC day, while younger than dailyRetentionDays;
 * - always the latest point, and the latest app-consistent point.
 */
export function pointsToKeep(
  points: readonly RetainedPoint[],
  policy: ReplicationPolicy,
  now: Date,
): Set<string> {
  const t = now.getTime();
  const keep = new Set<string>();
  const newest = (list: readonly RetainedPoint[]) =>
    list.reduce<RetainedPoint | undefined>(
      (best, p) => (!best || p.sourceTime > best.sourceTime ? p : best),
      undefined,
    );
  const latest = newest(points);
  if (latest) keep.add(latest.key);
  const latestApp = newest(points.filter((p) => p.kind === 'app'));
  if (latestApp) keep.add(latestApp.key);
  const latestPer = (bucketMs: number) => {
    const byBucket = new Map<number, RetainedPoint>();
    for (const p of points) {
      const bucket = Math.floor(p.sourceTime / bucketMs);
      const best = byBucket.get(bucket);
      if (!best || p.sourceTime > best.sourceTime) byBucket.set(bucket, p);
    }
    return [...byBucket.values()];
  };
  for (const p of points) if (t - p.sourceTime < policy.retentionHours * HOUR_MS) keep.add(p.key);
  if (policy.hourlyRetentionHours > 0) {
    for (const p of latestPer(HOUR_MS))
      if (t - p.sourceTime < policy.hourlyRetentionHours * HOUR_MS) keep.add(p.key);
  }
  if (policy.dailyRetentionDays > 0) {
    for (const p of latestPer(DAY_MS))
      if (t - p.sourceTime < policy.dailyRetentionDays * DAY_MS) keep.add(p.key);
  }
  return keep;
}

// Points other parts still need. Their tables belong to failover and groups, which build on this
// module, so retention reads them by name rather than importing them.
const FAILOVERS_TABLE = 'failovers';
const GROUP_POINTS_TABLE = 'grouppoints';
/** Failover states before commit (and drills until cancelled): the record's point may be used again. */
const UNCOMMITTED = new Set([
  'accepted',
  'quiescing',
  'applying-pending',
  'materialising',
  'creating-target',
  'failed-over',
  'changing-point',
  'committing',
  'cancelling',
]);
const SELECTOR_KEYWORDS = new Set(['latest', 'latest-processed', 'latest-app-consistent']);

/** A group point row, as retention reads it. */
export interface GroupPointRow extends RetainedPoint {
  group: string;
  rowKey: string;
  /** The machines it lists (the members at its marker). */
  members: string[];
}

/**
 * What other parts hold, per machine: marker ids of failovers' points; group points listing it,
 * per group. And the group point rows themselves, per group.
 */
export interface RetentionHolds {
  failovers: Map<string, Set<string>>;
  groupPoints: Map<string, Map<string, RetainedPoint[]>>;
  groupRows: Map<string, GroupPointRow[]>;
}

/**
 * Reads the holds: every uncommitted failover's chosen point, its selector when that names a
 * point, and a planned failover's final marker (`planned-{failoverId}`); and every group point,
 * under each member machine it lists.
 */
export async function readRetentionHolds(deps: ReplicationDeps): Promise<RetentionHolds> {
  const holds: RetentionHolds = { failovers: new Map(), groupPoints: new Map(), groupRows: new Map() };
  const failovers = await deps.tables.get(FAILOVERS_TABLE as TableName);
  for await (const r of failovers.listEntities<{
    partitionKey: string;
    rowKey: string;
    kind?: string;
    state?: string;
    point?: string;
    selector?: string;
  }>()) {
    if (r.rowKey === 'active' || !r.state || !UNCOMMITTED.has(r.state)) continue;
    const held = holds.failovers.get(r.partitionKey) ?? new Set<string>();
    holds.failovers.set(r.partitionKey, held);
    if (r.point) held.add((JSON.parse(r.point) as { id: string }).id);
    const selector = r.selector ? (JSON.parse(r.selector) as unknown) : undefined;
    if (typeof selector === 'string' && !SELECTOR_KEYWORDS.has(selector)) held.add(selector);
    if (selector && typeof selector === 'object' && typeof (selector as { id?: unknown }).id === 'string')
      held.add((selector as { id: string }).id);
    if (r.kind === 'planned') held.add(`planned-${r.rowKey}`);
  }
  const groupPoints = await deps.tables.get(GROUP_POINTS_TABLE as TableName);
  for await (const g of groupPoints.listEntities<{
    partitionKey: string;
    rowKey: string;
    markerId: string;
    consistency: string;
    sourceTime: number;
    members: string;
  }>()) {
    const point = {
      key: g.markerId,
      sourceTime: g.sourceTime,
      kind: g.consistency === 'app' ? 'app' : 'crash',
    };
    const members = Object.keys(JSON.parse(g.members) as Record<string, unknown>);
    for (const machine of members) {
      const groups = holds.groupPoints.get(machine) ?? new Map<string, RetainedPoint[]>();
      holds.groupPoints.set(machine, groups);
      groups.set(g.partitionKey, [...(groups.get(g.partitionKey) ?? []), point]);
    }
    const rows = holds.groupRows.get(g.partitionKey) ?? [];
    holds.groupRows.set(g.partitionKey, rows);
    rows.push({ ...point, group: g.partitionKey, rowKey: g.rowKey, members });
  }
  return holds;
}

/**
 * The marker ids retention keeps for `machine` beyond its own policy: the points its uncommitted
 * failovers use, and its points at the group points that the same policy keeps in each of its
 * groups (the latest and latest app-consistent group point, those in the windows), so a group
 * failover to them finds every member's point.
 */
export function heldMarkers(
  holds: RetentionHolds,
  machine: string,
  policy: ReplicationPolicy,
  now: Date,
): Set<string> {
  const held = new Set(holds.failovers.get(machine) ?? []);
  for (const points of holds.groupPoints.get(machine)?.values() ?? [])
    for (const marker of pointsToKeep(points, policy, now)) held.add(marker);
  return held;
}

export interface RetentionReport {
  machines: number;
  pointsDeleted: number;
  snapshotsDeleted: number;
  /** Arrivals at markers that never became a recovery point, past the retention window. */
  incompleteArrivalsDeleted: number;
  /** Snapshots that no arrival row refers to (taken, then the applier died before recording). */
  orphanSnapshotsDeleted: number;
  changeLogsDeleted: number;
  /** Points the policy alone would have pruned, kept for a failover or a group point. */
  heldPoints: number;
  /** Group point rows no member's policy keeps and whose member points are all gone. */
  groupPointsDeleted: number;
}

/** The retention timer's work, for every registered machine (or only `options.machines`). */
export async function applyRetention(
  deps: ReplicationDeps,
  now: Date,
  options: { machines?: readonly string[] } = {},
): Promise<RetentionReport> {
  const report: RetentionReport = {
    machines: 0,
    pointsDeleted: 0,
    snapshotsDeleted: 0,
    incompleteArrivalsDeleted: 0,
    orphanSnapshotsDeleted: 0,
    changeLogsDeleted: 0,
    heldPoints: 0,
    groupPointsDeleted: 0,
  };
  const holds = await readRetentionHolds(deps);
  const machines = await listPartition<MachineEntity>(
    await deps.tables.get(TABLES.machines),
    MACHINES_PARTITION,
  );
  /** The marker ids of each machine's points left after its retention. */
  const remaining = new Map<string, Set<string>>();
  for (const machine of machines) {
    if (typeof machine.policy !== 'string') continue;
    if (options.machines && !options.machines.includes(machine.rowKey)) continue;
    report.machines++;
    try {
      remaining.set(machine.rowKey, await retainMachine(deps, machine, now, report, holds));
    } catch (err) {
      deps.log.error(
        { machine: machine.rowKey, err: String(err) },
        'retention failed for a machine; the next run retries',
      );
    }
  }
  try {
    await pruneGroupPoints(deps, holds, machines, remaining, now, report, options.machines);
  } catch (err) {
    deps.log.error({ err: String(err) }, 'group point retention failed; the next run retries');
  }
  deps.log.info({ ...report }, 'retention run ended');
  return report;
}

async function deleteSnapshot(
  deps: ReplicationDeps,
  machine: string,
  disk: string,
  snapshot: string,
): Promise<boolean> {
  try {
    await seedBlob(deps.seed, machine, disk).withSnapshot(snapshot).delete();
    return true;
  } catch (err) {
    if (isNotFound(err)) return false;
    throw err;
  }
}

async function deleteRow(
  table: Awaited<ReturnType<ReplicationDeps['tables']['get']>>,
  pk: string,
  rk: string,
): Promise<void> {
  try {
    await table.deleteEntity(pk, rk);
  } catch (err) {
    if (!isNotFound(err)) throw err;
  }
}

/**
 * Group point rows: a row goes once no member's policy keeps it among its group's points (the
 * rule `heldMarkers` applies to the member points) and no member has its own point at that marker
 * any more, since a group failover to it could not fail over anyone. The newest row of a group
 * always stays: refreshGroupPoints scans arrivals from it. Only groups listing a machine in
 * `scope`, when given.
 */
async function pruneGroupPoints(
  deps: ReplicationDeps,
  holds: RetentionHolds,
  machines: readonly MachineEntity[],
  remaining: Map<string, Set<string>>,
  now: Date,
  report: RetentionReport,
  scope: readonly string[] | undefined,
): Promise<void> {
  const policies = new Map<string, ReplicationPolicy>();
  for (const m of machines) if (typeof m.policy === 'string') policies.set(m.rowKey, readPolicy(m.policy));
  const markersOf = async (machine: string): Promise<Set<string>> => {
    let markers = remaining.get(machine);
    if (!markers) {
      markers = new Set((await allRecoveryPoints(deps.tables, machine)).map((p) => p.markerId));
      remaining.set(machine, markers);
    }
    return markers;
  };
  const table = await deps.tables.get(GROUP_POINTS_TABLE as TableName);
  for (const [group, rows] of holds.groupRows) {
    const members = new Set(rows.flatMap((r) => r.members));
    if (scope && !scope.some((m) => members.has(m))) continue;
    const kept = new Set<string>();
    for (const m of members) {
      const policy = policies.get(m);
      if (policy) for (const marker of pointsToKeep(rows, policy, now)) kept.add(marker);
    }
    const newest = rows.reduce((a, b) => (b.sourceTime > a.sourceTime ? b : a));
    for (const row of rows) {
      if (row === newest || kept.has(row.key)) continue;
      const left = await Promise.all(row.members.map(async (m) => (await markersOf(m)).has(row.key)));
      if (left.some(Boolean)) continue;
      await deleteRow(table, group, row.rowKey);
      report.groupPointsDeleted++;
      deps.log.debug({ group, marker: row.key }, 'group point pruned');
    }
  }
}

/** Prunes one machine's points by its policy and the holds; returns the marker ids left. */
async function retainMachine(
  deps: ReplicationDeps,
  machine: MachineEntity,
  now: Date,
  report: RetentionReport,
  holds: RetentionHolds,
): Promise<Set<string>> {
  const name = machine.rowKey;
  const policy = readPolicy(machine.policy);
  const log = deps.log.child({ machine: name });
  const pointsTable = await deps.tables.get(TABLES.recoveryPoints);
  const arrivalsTable = await deps.tables.get(TABLES.arrivals);
  await ensureContainer(deps.seed);

  const points = await allRecoveryPoints(deps.tables, name);
  const keep = pointsToKeep(
    points.map((p) => ({ key: p.rowKey, sourceTime: p.sourceTime, kind: p.kind })),
    policy,
    now,
  );
  const held = heldMarkers(holds, name, policy, now);
  for (const p of points) {
    if (keep.has(p.rowKey) || !held.has(p.markerId)) continue;
    keep.add(p.rowKey);
    report.heldPoints++;
  }
  let arrivals = await listPartition<ArrivalEntity>(arrivalsTable, name);
  const byMarker = new Map<string, ArrivalEntity[]>();
  for (const a of arrivals) byMarker.set(a.markerId, [...(byMarker.get(a.markerId) ?? []), a]);

  const pruned = new Set<string>();
  for (const point of points as RecoveryPointEntity[]) {
    if (keep.has(point.rowKey)) continue;
    // The row goes first: a point is never offered whose snapshots are being deleted.
    await deleteRow(pointsTable, name, point.rowKey);
    report.pointsDeleted++;
    const snapshots = JSON.parse(point.snapshots) as Record<string, string>;
    for (const [disk, snapshot] of Object.entries(snapshots)) {
      if (await deleteSnapshot(deps, name, disk, snapshot)) report.snapshotsDeleted++;
    }
    for (const a of byMarker.get(point.markerId) ?? []) {
      if (a.snapshot !== snapshots[a.disk] && (await deleteSnapshot(deps, name, a.disk, a.snapshot)))
        report.snapshotsDeleted++;
      await deleteRow(arrivalsTable, name, a.rowKey);
    }
    pruned.add(point.markerId);
    log.debug({ marker: point.markerId }, 'recovery point pruned');
  }

  // Arrivals whose marker never completed (a disk never got there) and that are past the window.
  const pointMarkers = new Set(points.map((p) => p.markerId));
  for (const [markerId, list] of byMarker) {
    if (pointMarkers.has(markerId) || pruned.has(markerId)) continue;
    if (list.some((a) => now.getTime() - a.sourceTime < policy.retentionHours * HOUR_MS)) continue;
    for (const a of list) {
      await deleteSnapshot(deps, name, a.disk, a.snapshot);
      await deleteRow(arrivalsTable, name, a.rowKey);
      report.incompleteArrivalsDeleted++;
    }
    pruned.add(markerId);
  }
  arrivals = arrivals.filter((a) => !pruned.has(a.markerId));

  // Snapshots nobody recorded: an applier died between taking and recording one.
  const referenced = new Set(arrivals.map((a) => `${seedBlobName(name, a.disk)}@${a.snapshot}`));
  for await (const item of deps.seed.listBlobsFlat({ prefix: `${name}/`, includeSnapshots: true })) {
    if (!item.snapshot || referenced.has(`${item.name}@${item.snapshot}`)) continue;
    const takenAt = Date.parse(item.snapshot);
    if (!Number.isFinite(takenAt) || now.getTime() - takenAt < ORPHAN_GRACE_MS) continue;
    try {
      await deps.seed.getPageBlobClient(item.name).withSnapshot(item.snapshot).delete();
      report.orphanSnapshotsDeleted++;
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }

  await pruneChangeLogs(deps, name, policy, now, report);
  return new Set(points.filter((p) => keep.has(p.rowKey)).map((p) => p.markerId));
}

/**
 * Applied change logs that are no longer wanted: older epochs, and applied ones older than
 * keepChangeLogsHours (those left by a run that died between its cursor and its delete, too).
 */
async function pruneChangeLogs(
  deps: ReplicationDeps,
  machine: string,
  policy: ReplicationPolicy,
  now: Date,
  report: RetentionReport,
): Promise<void> {
  const changelogs = await ensureContainer(deps.changelogs);
  const disks = await listPartition<DiskEntity>(await deps.tables.get(TABLES.disks), machine);
  for (const disk of disks) {
    const cursorName = changelogBlobName({
      machine,
      disk: disk.rowKey,
      epoch: disk.epoch,
      seq: disk.appliedSeq,
    });
    for await (const blob of changelogs.listBlobsFlat({ prefix: `${machine}/${disk.rowKey}/` })) {
      const epoch = Number(blob.name.split('/')[2]);
      const applied = epoch < disk.epoch || (epoch === disk.epoch && blob.name <= cursorName);
      if (!applied) continue;
      const age = now.getTime() - (blob.properties.lastModified?.getTime() ?? 0);
      if (epoch === disk.epoch && age < policy.keepChangeLogsHours * HOUR_MS) continue;
      try {
        await changelogs.deleteBlob(blob.name);
        report.changeLogsDeleted++;
      } catch (err) {
        if (!isNotFound(err)) throw err;
      }
    }
  }
}
