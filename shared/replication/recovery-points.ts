import { ValidationError } from '../errors';
import type { MarkerKind } from '../segment';
import type { Page } from './events';
import {
  arrivalKey,
  insertIfAbsent,
  listPartition,
  MACHINES_PARTITION,
  odataString,
  readEntity,
  recoveryPointKey,
  TABLES,
  type ArrivalEntity,
  type MachineEntity,
  type RecoveryPointEntity,
  type ReplicationTables,
} from './tables';

export type RecoveryPointType = 'crash-consistent' | 'app-consistent' | 'group-consistent';

const TYPE_OF_KIND: Record<string, RecoveryPointType> = {
  crash: 'crash-consistent',
  app: 'app-consistent',
  group: 'group-consistent',
};

/** A machine recovery point: one snapshot per disk, all cut at the same marker. */
export interface RecoveryPoint {
  id: string;
  type: RecoveryPointType;
  /** When the cut was taken on the source machine. */
  sourceTime: string;
  /** When the last disk's snapshot was recorded. */
  createdAt: string;
  tag: string;
  disks: { id: string; snapshot: string }[];
}

export function toRecoveryPoint(e: RecoveryPointEntity): RecoveryPoint {
  const snapshots = JSON.parse(e.snapshots) as Record<string, string>;
  return {
    id: e.markerId,
    type: TYPE_OF_KIND[e.kind] ?? 'crash-consistent',
    sourceTime: new Date(e.sourceTime).toISOString(),
    createdAt: e.createdAt,
    tag: e.tag,
    disks: Object.entries(snapshots).map(([id, snapshot]) => ({ id, snapshot })),
  };
}

export interface MarkerArrival {
  machine: string;
  disk: string;
  markerId: string;
  kind: MarkerKind;
  tag: string;
  /** Marker time, ms since 1970. */
  sourceTime: number;
  snapshot: string;
  epoch: number;
  seq: number;
}

/** The arrival row of a disk at a marker, if recorded. */
export async function readArrival(
  tables: ReplicationTables,
  machine: string,
  markerId: string,
  disk: string,
): Promise<ArrivalEntity | undefined> {
  return readEntity<ArrivalEntity>(await tables.get(TABLES.arrivals), machine, arrivalKey(markerId, disk));
}

/**
 * Records that a disk reached a marker with `snapshot` (insert-if-absent, keyed by marker and
 * disk). Returns false when it was already recorded, with another snapshot the caller should drop.
 */
export async function recordArrival(
  tables: ReplicationTables,
  arrival: MarkerArrival,
  now: Date,
): Promise<boolean> {
  const entity: ArrivalEntity = {
    partitionKey: arrival.machine,
    rowKey: arrivalKey(arrival.markerId, arrival.disk),
    markerId: arrival.markerId,
    disk: arrival.disk,
    kind: arrival.kind,
    tag: arrival.tag,
    sourceTime: arrival.sourceTime,
    snapshot: arrival.snapshot,
    epoch: arrival.epoch,
    seq: arrival.seq,
    arrivedAt: now.toISOString(),
  };
  return insertIfAbsent(await tables.get(TABLES.arrivals), entity);
}

/** Every disk's arrival at `markerId`. */
export async function arrivalsAt(
  tables: ReplicationTables,
  machine: string,
  markerId: string,
): Promise<ArrivalEntity[]> {
  // '~' (0x7e) separates marker and disk; '\x7f' is the first string after every `{markerId}~…`.
  return listPartition<ArrivalEntity>(await tables.get(TABLES.arrivals), machine, {
    from: `${markerId}~`,
    to: `${markerId}\x7f`,
  });
}

/**
 * Records the machine's recovery point at `markerId` once every registered disk has arrived
 * there. Exactly once: the row is keyed by the marker and inserted only if absent, and every
 * caller computes it from the same arrival rows. Returns the point when this call created it.
 */
export async function completeRecoveryPoint(
  tables: ReplicationTables,
  machine: string,
  markerId: string,
  now: Date,
): Promise<RecoveryPoint | undefined> {
  const machineRow = await readEntity<MachineEntity>(
    await tables.get(TABLES.machines),
    MACHINES_PARTITION,
    machine,
  );
  if (!machineRow) return undefined;
  const diskIds = JSON.parse(machineRow.diskIds) as string[];
  const arrivals = await arrivalsAt(tables, machine, markerId);
  const byDisk = new Map(arrivals.map((a) => [a.disk, a]));
  if (!diskIds.every((d) => byDisk.has(d))) return undefined;
  const sourceTime = Math.max(...diskIds.map((d) => byDisk.get(d)!.sourceTime));
  const first = byDisk.get(diskIds[0])!;
  const entity: RecoveryPointEntity = {
    partitionKey: machine,
    rowKey: recoveryPointKey(sourceTime, markerId),
    markerId,
    kind: first.kind,
    tag: first.tag,
    sourceTime,
    createdAt: now.toISOString(),
    snapshots: JSON.stringify(Object.fromEntries(diskIds.map((d) => [d, byDisk.get(d)!.snapshot]))),
  };
  const created = await insertIfAbsent(await tables.get(TABLES.recoveryPoints), entity);
  return created ? toRecoveryPoint(entity) : undefined;
}

export interface RecoveryPointQuery {
  type?: string;
  top?: number;
  continuationToken?: string;
}

const KIND_OF_TYPE: Record<string, string> = {
  'crash-consistent': 'crash',
  crash: 'crash',
  'app-consistent': 'app',
  app: 'app',
  'group-consistent': 'group',
  group: 'group',
};

/** A machine's recovery points, newest first, a page at a time. */
export async function listRecoveryPoints(
  tables: ReplicationTables,
  machine: string,
  query: RecoveryPointQuery = {},
): Promise<Page<RecoveryPoint>> {
  const clauses = [`PartitionKey eq ${odataString(machine)}`];
  if (query.type !== undefined) {
    const kind = KIND_OF_TYPE[query.type];
    if (!kind) {
      throw new ValidationError(
        `type must be crash-consistent, app-consistent or group-consistent; got ${JSON.stringify(query.type)}.`,
        'type',
      );
    }
    clauses.push(`kind eq ${odataString(kind)}`);
  }
  const table = await tables.get(TABLES.recoveryPoints);
  const pages = table
    .listEntities<RecoveryPointEntity>({ queryOptions: { filter: clauses.join(' and ') } })
    .byPage({ maxPageSize: query.top ?? 100, continuationToken: query.continuationToken });
  const first = await pages.next();
  if (first.done || !first.value) return { value: [] };
  const page = first.value as RecoveryPointEntity[] & { continuationToken?: string };
  return { value: page.map(toRecoveryPoint), continuationToken: page.continuationToken };
}

/** Every recovery point row of a machine, newest first. */
export async function allRecoveryPoints(
  tables: ReplicationTables,
  machine: string,
): Promise<RecoveryPointEntity[]> {
  return (await listPartition<RecoveryPointEntity>(await tables.get(TABLES.recoveryPoints), machine)).sort(
    (a, b) => (a.rowKey < b.rowKey ? -1 : a.rowKey > b.rowKey ? 1 : 0),
  );
}

/** The newest recovery point of a machine (optionally of one kind). */
export async function latestRecoveryPoint(
  tables: ReplicationTables,
  machine: string,
  kind?: MarkerKind,
): Promise<RecoveryPointEntity | undefined> {
  const clauses = [`PartitionKey eq ${odataString(machine)}`];
  if (kind) clauses.push(`kind eq ${odataString(kind)}`);
  const table = await tables.get(TABLES.recoveryPoints);
  for await (const page of table
    .listEntities<RecoveryPointEntity>({ queryOptions: { filter: clauses.join(' and ') } })
    .byPage({ maxPageSize: 1 })) {
    if (page.length > 0) return page[0];
  }
  return undefined;
}
