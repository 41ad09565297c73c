import { NotFoundError } from '../errors';
import {
  allRecoveryPoints,
  ensureContainer,
  latestRecoveryPoint,
  listPartition,
  odataString,
  TABLES,
  toRecoveryPoint,
  type DiskEntity,
  type RecoveryPointEntity,
  type ReplicationDeps,
} from '../replication';
import { describeSelector, type ChosenPoint, type RecoveryPointSelector } from './model';

/** The point row with this marker id, if the machine has it. */
export async function findRecoveryPoint(
  deps: ReplicationDeps,
  machine: string,
  pointId: string,
): Promise<RecoveryPointEntity | undefined> {
  const table = await deps.tables.get(TABLES.recoveryPoints);
  const filter = `PartitionKey eq ${odataString(machine)} and markerId eq ${odataString(pointId)}`;
  for await (const row of table.listEntities<RecoveryPointEntity>({ queryOptions: { filter } })) return row;
  return undefined;
}

/** The newest point whose source time is at or before `time` (rows come newest first). */
async function pointAtOrBefore(
  deps: ReplicationDeps,
  machine: string,
  time: Date,
): Promise<RecoveryPointEntity | undefined> {
  const rows = await allRecoveryPoints(deps.tables, machine);
  return rows.find((r) => Number(r.sourceTime) <= time.getTime());
}

/**
 * Resolves a selector against the machine's recovery points as they are now. `latest` resolves
 * like `latest-processed`: the caller applies what is pending first (pendingChangeLogs).
 * Unknown points are a 404 that names the selector.
 */
export async function resolveRecoveryPoint(
  deps: ReplicationDeps,
  machine: string,
  selector: RecoveryPointSelector,
): Promise<ChosenPoint> {
  let row: RecoveryPointEntity | undefined;
  if (selector === 'latest' || selector === 'latest-processed')
    row = await latestRecoveryPoint(deps.tables, machine);
  else if (selector === 'latest-app-consistent') row = await latestRecoveryPoint(deps.tables, machine, 'app');
  else if ('id' in selector) row = await findRecoveryPoint(deps, machine, selector.id);
  else row = await pointAtOrBefore(deps, machine, new Date(selector.time));
  if (!row) {
    throw new NotFoundError(
      `Machine ${machine} has no recovery point matching ${describeSelector(selector)}; ` +
        `list its points with GET /api/machines/${machine}/recovery-points.`,
      'recoveryPoint',
    );
  }
  const point = toRecoveryPoint(row);
  const sizes = new Map(
    (await listPartition<DiskEntity>(await deps.tables.get(TABLES.disks), machine)).map((d) => [
      d.rowKey,
      d.sizeBytes,
    ]),
  );
  return {
    id: point.id,
    type: point.type,
    sourceTime: point.sourceTime,
    disks: point.disks.map((d) => ({ ...d, sizeBytes: sizes.get(d.id) ?? 0 })),
  };
}

/** Per disk: the cursor a disk must reach so that everything in the cache now is applied. */
export interface ApplyTarget {
  disk: string;
  epoch: number;
  seq: number;
}

function seqOf(name: string): { epoch: number; seq: number } | undefined {
  const m = /\/(\d+)\/(\d+)\.seg$/.exec(name);
  return m ? { epoch: Number(m[1]), seq: Number(m[2]) } : undefined;
}

/**
 * What `latest` waits for: for each disk, the last seq of the unbroken run of change logs in the
 * cache after its cursor (a gap stops the run: apply could not pass it either). Change logs still
 * in the proxy's spool are not visible here; they belong to the next point.
 */
export async function pendingChangeLogs(deps: ReplicationDeps, machine: string): Promise<ApplyTarget[]> {
  const disks = await listPartition<DiskEntity>(await deps.tables.get(TABLES.disks), machine);
  const changelogs = await ensureContainer(deps.changelogs);
  const targets: ApplyTarget[] = [];
  for (const disk of disks) {
    const present = new Set<number>();
    const prefix = `${machine}/${disk.rowKey}/${disk.epoch}/`;
    for await (const blob of changelogs.listBlobsFlat({ prefix })) {
      const at = seqOf(blob.name);
      if (at && at.epoch === disk.epoch && at.seq > disk.appliedSeq) present.add(at.seq);
    }
    let seq = disk.appliedSeq;
    while (present.has(seq + 1)) seq++;
    targets.push({ disk: disk.rowKey, epoch: disk.epoch, seq });
  }
  return targets;
}

/** Disks whose cursor has not reached its target yet (empty = everything pending is applied). */
export async function unappliedDisks(
  deps: ReplicationDeps,
  machine: string,
  targets: readonly ApplyTarget[],
): Promise<{ disk: string; appliedSeq: number; targetSeq: number }[]> {
  const disks = new Map(
    (await listPartition<DiskEntity>(await deps.tables.get(TABLES.disks), machine)).map((d) => [d.rowKey, d]),
  );
  const behind = [];
  for (const t of targets) {
    const d = disks.get(t.disk);
    if (!d) continue;
    const reached = d.epoch > t.epoch || (d.epoch === t.epoch && d.appliedSeq >= t.seq);
    if (!reached) behind.push({ disk: t.disk, appliedSeq: d.appliedSeq, targetSeq: t.seq });
  }
  return behind;
}
