import { changelogBlobName } from '../envelope';
import { NotFoundError } from '../errors';
import { validateName } from '../names';
import { ensureContainer, type ReplicationDeps } from './context';
import { readPolicy, type ReplicationPolicy } from './policy';
import { latestRecoveryPoint, toRecoveryPoint, type RecoveryPoint } from './recovery-points';
import {
  listPartition,
  MACHINES_PARTITION,
  readEntity,
  TABLES,
  type DiskEntity,
  type DiskState,
  type MachineEntity,
  type MachineHealth,
} from './tables';

export interface Backlog {
  /** Change logs in the cache past the cursor (current epoch, and any newer one). */
  segments: number;
  bytes: number;
  /** Upload time of the oldest pending change log. */
  oldestPendingAt?: string;
}

export interface DiskStatus {
  id: string;
  sizeBytes: number;
  state: DiskState;
  stateReason?: string;
  epoch: number;
  /** The cursor: last applied seq of `epoch` (0 = none yet). */
  appliedSeq: number;
  lastAppliedAt?: string;
  /** Source time of the last applied change. */
  lastSourceTime?: string;
  appliedBytes: number;
  backlog?: Backlog;
}

export interface MachineStatus {
  name: string;
  group?: string;
  registeredAt: string;
  updatedAt: string;
  health: MachineHealth;
  rpo: {
    /** now − source time of the latest recovery point; null before the first point. */
    seconds: number | null;
    thresholdSeconds: number;
    breached: boolean;
  };
  policy: ReplicationPolicy;
  latestRecoveryPoint?: RecoveryPoint;
  latestAppConsistentPoint?: RecoveryPoint;
  backlog?: Backlog;
  disks: DiskStatus[];
}

/** The worst state wins: resync-required, then critical (RPO breached), then initial-sync. */
export function machineHealth(diskStates: DiskState[], rpoBreached: boolean): MachineHealth {
  if (diskStates.includes('resync-required')) return 'resync-required';
  if (rpoBreached) return 'critical';
  if (diskStates.includes('initial-sync')) return 'initial-sync';
  return 'protected';
}

/** What waits in the cache for a disk: change logs past its cursor. */
export async function diskBacklog(deps: ReplicationDeps, disk: DiskEntity): Promise<Backlog> {
  const changelogs = await ensureContainer(deps.changelogs);
  const backlog: Backlog = { segments: 0, bytes: 0 };
  let oldest: Date | undefined;
  const cursorName = changelogBlobName({
    machine: disk.partitionKey,
    disk: disk.rowKey,
    epoch: disk.epoch,
    seq: disk.appliedSeq,
  });
  for await (const blob of changelogs.listBlobsFlat({ prefix: `${disk.partitionKey}/${disk.rowKey}/` })) {
    const parts = blob.name.split('/');
    const epoch = Number(parts[2]);
    if (!(epoch > disk.epoch || (epoch === disk.epoch && blob.name > cursorName))) continue;
    backlog.segments++;
    backlog.bytes += blob.properties.contentLength ?? 0;
    const at = blob.properties.createdOn ?? blob.properties.lastModified;
    if (at && (!oldest || at < oldest)) oldest = at;
  }
  if (oldest) backlog.oldestPendingAt = oldest.toISOString();
  return backlog;
}

function diskStatus(d: DiskEntity, backlog?: Backlog): DiskStatus {
  return {
    id: d.rowKey,
    sizeBytes: d.sizeBytes,
    state: d.state,
    ...(d.stateReason ? { stateReason: d.stateReason } : {}),
    epoch: d.epoch,
    appliedSeq: d.appliedSeq,
    ...(d.lastAppliedAt ? { lastAppliedAt: d.lastAppliedAt } : {}),
    ...(d.lastSourceTime !== undefined && d.lastSourceTime !== null
      ? { lastSourceTime: new Date(d.lastSourceTime).toISOString() }
      : {}),
    appliedBytes: d.appliedBytes ?? 0,
    ...(backlog ? { backlog } : {}),
  };
}

/** The registered disks of a machine, in registration order. */
export async function machineDisks(deps: ReplicationDeps, machine: MachineEntity): Promise<DiskEntity[]> {
  const rows = await listPartition<DiskEntity>(await deps.tables.get(TABLES.disks), machine.rowKey);
  const order = JSON.parse(machine.diskIds) as string[];
  return order
    .map((id) => rows.find((r) => r.rowKey === id))
    .filter((r): r is (typeof rows)[number] => r !== undefined);
}

export async function readMachine(
  deps: ReplicationDeps,
  name: string,
): Promise<MachineEntity & { etag: string }> {
  validateName(name, 'machine');
  const row = await readEntity<MachineEntity>(
    await deps.tables.get(TABLES.machines),
    MACHINES_PARTITION,
    name,
  );
  if (!row) {
    throw new NotFoundError(
      `Machine ${name} is not registered; register it with PUT /api/machines/${name}.`,
      'machine',
    );
  }
  return row;
}

/** A machine's protection state; `withBacklog` lists the cache to count pending change logs. */
export async function machineStatus(
  deps: ReplicationDeps,
  row: MachineEntity,
  now: Date,
  options: { withBacklog: boolean },
): Promise<MachineStatus> {
  const policy = readPolicy(row.policy);
  const [disks, latest, latestApp] = await Promise.all([
    machineDisks(deps, row),
    latestRecoveryPoint(deps.tables, row.rowKey),
    latestRecoveryPoint(deps.tables, row.rowKey, 'app'),
  ]);
  const backlogs = options.withBacklog
    ? await Promise.all(disks.map((d) => diskBacklog(deps, d)))
    : undefined;
  const seconds = latest ? Math.max(0, Math.round((now.getTime() - latest.sourceTime) / 1000)) : null;
  const breached = seconds !== null && seconds > policy.rpoThresholdSeconds;
  const status: MachineStatus = {
    name: row.rowKey,
    ...(row.group ? { group: row.group } : {}),
    registeredAt: row.registeredAt,
    updatedAt: row.updatedAt,
    health: machineHealth(
      disks.map((d) => d.state),
      breached,
    ),
    rpo: { seconds, thresholdSeconds: policy.rpoThresholdSeconds, breached },
    policy,
    ...(latest ? { latestRecoveryPoint: toRecoveryPoint(latest) } : {}),
    ...(latestApp ? { latestAppConsistentPoint: toRecoveryPoint(latestApp) } : {}),
    disks: disks.map((d, i) => diskStatus(d, backlogs?.[i])),
  };
  if (backlogs) {
    const oldest = backlogs
      .map((b) => b.oldestPendingAt)
      .filter((t): t is string => !!t)
      .sort()[0];
    status.backlog = {
      segments: backlogs.reduce((n, b) => n + b.segments, 0),
      bytes: backlogs.reduce((n, b) => n + b.bytes, 0),
      ...(oldest ? { oldestPendingAt: oldest } : {}),
    };
  }
  return status;
}

export async function getMachineStatus(
  deps: ReplicationDeps,
  name: string,
  now: Date = new Date(),
): Promise<MachineStatus> {
  return machineStatus(deps, await readMachine(deps, name), now, { withBacklog: true });
}

/** Every registered machine (without the cache listing per disk). */
export async function listMachineStatuses(
  deps: ReplicationDeps,
  now: Date = new Date(),
): Promise<MachineStatus[]> {
  const rows = await listPartition<MachineEntity>(await deps.tables.get(TABLES.machines), MACHINES_PARTITION);
  // A machines row without a policy is a credential row written by someone else, not a registration.
  return Promise.all(
    rows
      .filter((r) => typeof r.policy === 'string')
      .map((r) => machineStatus(deps, r, now, { withBacklog: false })),
  );
}
