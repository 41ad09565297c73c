import type { TableClient, TableEntityResult } from '@azure/data-tables';
import { MACHINES_PARTITION, MACHINES_TABLE } from '../credentials';
import type { StorageClients } from '../storage';

// The replication state in Table storage (ReplicaStorage). docs/replication.md lists every field.
//
//   machines        PK "machines"  RK {machine}                 registration, policy, credential hash, RPO state
//   disks           PK {machine}   RK {disk}                    size, epoch, cursor (appliedSeq), state
//   markerarrivals  PK {machine}   RK {markerId}~{disk}         a disk reached a marker: its snapshot
//   recoverypoints  PK {machine}   RK {invertedTime}~{markerId} a machine recovery point (newest first)
//   events          PK "events"    RK {invertedTime}~{id}       replication events (newest first)
//   applynudges     PK {machine}   RK {disk}                    when a busy-disk retry nudge was last sent

export const TABLES = {
  machines: MACHINES_TABLE,
  disks: 'disks',
  arrivals: 'markerarrivals',
  recoveryPoints: 'recoverypoints',
  events: 'events',
  nudges: 'applynudges',
} as const;

export type TableName = (typeof TABLES)[keyof typeof TABLES];

export { MACHINES_PARTITION };
export const EVENTS_PARTITION = 'events';

/** Replication state of one disk. */
export type DiskState = 'initial-sync' | 'protected' | 'resync-required';
/** Health of a machine, worst first: what an operator must act on. */
export type MachineHealth = 'resync-required' | 'critical' | 'initial-sync' | 'protected';

export interface MachineEntity {
  partitionKey: string;
  rowKey: string;
  /** The replication policy, JSON (see policy.ts). */
  policy: string;
  /** JSON array of disk ids, in registration order. */
  diskIds: string;
  group?: string;
  registeredAt: string;
  updatedAt: string;
  credentialHash: string;
  credentialIssuedAt: string;
  /** Written by the RPO monitor. */
  rpoSeconds?: number;
  rpoBreached?: boolean;
  rpoCheckedAt?: string;
  /** Count of breach/recovery transitions; makes each transition's event id unique and idempotent. */
  rpoTransitions?: number;
  backlogSegments?: number;
  backlogBytes?: number;
}

export interface DiskEntity {
  partitionKey: string;
  rowKey: string;
  sizeBytes: number;
  /** Replication epoch being applied. */
  epoch: number;
  /** Last applied segment seq in `epoch`; 0 = nothing applied yet (an epoch's first segment is seq 1). */
  appliedSeq: number;
  state: DiskState;
  stateReason?: string;
  stateChangedAt?: string;
  /** When the last segment was applied (wall clock of the applier). */
  lastAppliedAt?: string;
  /** Source time (ms since 1970) of the last applied segment's last write. */
  lastSourceTime?: number;
  lastMarkerId?: string;
  /** Change bytes applied so far (writes plus zeroed ranges). */
  appliedBytes?: number;
  registeredAt: string;
}

export interface ArrivalEntity {
  partitionKey: string;
  rowKey: string;
  markerId: string;
  disk: string;
  kind: string;
  tag: string;
  /** The marker's time, ms since 1970: the source time of the cut. */
  sourceTime: number;
  /** The seed blob snapshot holding the disk at the marker. */
  snapshot: string;
  epoch: number;
  seq: number;
  arrivedAt: string;
}

export interface RecoveryPointEntity {
  partitionKey: string;
  rowKey: string;
  markerId: string;
  kind: string;
  tag: string;
  sourceTime: number;
  createdAt: string;
  /** JSON object disk id → snapshot id. */
  snapshots: string;
}

export interface EventEntity {
  partitionKey: string;
  rowKey: string;
  id: string;
  type: string;
  severity: 'info' | 'warning' | 'error';
  machine: string;
  disk?: string;
  message: string;
  time: string;
  /** JSON object with type-specific details. */
  details?: string;
}

export interface NudgeEntity {
  partitionKey: string;
  rowKey: string;
  notBefore: string;
}

/** Keys sort as strings; a fixed-width inverted time makes the newest row come first. */
const TIME_WIDTH = 16;
// The latest JavaScript time (ms): below 2^53, so the subtraction is exact.
const MAX_TIME = 8_640_000_000_000_000;

export function invertedTimeKey(timeMs: number): string {
  return String(MAX_TIME - Math.max(0, Math.floor(timeMs))).padStart(TIME_WIDTH, '0');
}

export function recoveryPointKey(sourceTime: number, markerId: string): string {
  return `${invertedTimeKey(sourceTime)}~${markerId}`;
}

export function arrivalKey(markerId: string, disk: string): string {
  return `${markerId}~${disk}`;
}

/** The table clients of the replication state, each table created on first use. */
export class ReplicationTables {
  private readonly clients = new Map<string, TableClient>();
  private readonly created = new Map<string, Promise<void>>();

  constructor(private readonly storage: StorageClients) {}

  async get(name: TableName): Promise<TableClient> {
    let client = this.clients.get(name);
    if (!client) {
      client = this.storage.table(name);
      this.clients.set(name, client);
    }
    let created = this.created.get(name);
    if (!created) {
      const c = client;
      created = c.createTable().catch((err) => {
        this.created.delete(name);
        throw err;
      });
      this.created.set(name, created);
    }
    await created;
    return client;
  }
}

/** The HTTP status of a storage SDK error (RestError, from whichever copy of the pipeline). */
export function statusOf(err: unknown): number | undefined {
  const status = (err as { statusCode?: unknown } | null)?.statusCode;
  return typeof status === 'number' ? status : undefined;
}

export const isNotFound = (err: unknown): boolean => statusOf(err) === 404;
export const isConflict = (err: unknown): boolean => statusOf(err) === 409;
export const isPreconditionFailed = (err: unknown): boolean => statusOf(err) === 412;

/** Reads one entity, or undefined when it does not exist. */
export async function readEntity<T extends object>(
  table: TableClient,
  partitionKey: string,
  rowKey: string,
): Promise<TableEntityResult<T> | undefined> {
  try {
    return await table.getEntity<T>(partitionKey, rowKey);
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
}

/** Inserts an entity unless one with its keys exists; true when this call inserted it. */
export async function insertIfAbsent<T extends { partitionKey: string; rowKey: string }>(
  table: TableClient,
  entity: T,
): Promise<boolean> {
  try {
    await table.createEntity(entity);
    return true;
  } catch (err) {
    if (isConflict(err)) return false;
    throw err;
  }
}

/** Every entity of a partition (or of a key range within it). */
export async function listPartition<T extends object>(
  table: TableClient,
  partitionKey: string,
  range?: { from: string; to: string },
): Promise<TableEntityResult<T>[]> {
  const pk = odataString(partitionKey);
  const filter = range
    ? `PartitionKey eq ${pk} and RowKey ge ${odataString(range.from)} and RowKey lt ${odataString(range.to)}`
    : `PartitionKey eq ${pk}`;
  const out: TableEntityResult<T>[] = [];
  for await (const entity of table.listEntities<T>({ queryOptions: { filter } })) out.push(entity);
  return out;
}

export function odataString(value: string): string {
  return `'${value.replace(/'/g, "''")}'`;
}

/** Strips the service's metadata so an entity can be returned or compared as plain data. */
export function plain<T extends object>(entity: TableEntityResult<T>): T {
  const {
    etag: _etag,
    timestamp: _timestamp,
    ...rest
  } = entity as TableEntityResult<T> & { timestamp?: string };
  return rest as unknown as T;
}
