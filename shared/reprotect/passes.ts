import type { PageBlobClient } from '@azure/storage-blob';
import { NotFoundError } from '../errors';
import { activeFailover, failoverDiskName, updateRecord, type FailoverRecord } from '../failover';
import { plain, readEntity, statusOf } from '../replication';
import { changeTrackerFor, differingRanges, pageBlobChecksums } from './changes';
import type { ProtectionDeps } from './context';
import type { ReprotectEntity } from './reprotect';
import { readSiteChecksums, shipPass } from './ship';
import { passRow, REPROTECT_ROW, targetRow } from './tables';

// The cloud side of reprotect, as activities: begin (a new epoch of reprotect change logs), one
// pass per disk (snapshot the failover disk, the ranges that changed since the previous pass's
// snapshot — or, on the first pass, the blocks whose checksums differ from the site disk's — and
// ship them), the target's progress, and the hand-over to failback. Each activity is safe to run
// again: a pass is identified by its marker id, and its snapshot and first seq are recorded before
// anything is shipped, so a rerun ships the same bytes under the same seqs.

export interface ReprotectDisk {
  id: string;
  sizeBytes: number;
}

/** The input of the reprotect orchestration (each continue-as-new carries the next pass). */
export interface ReprotectRun {
  machine: string;
  operationId: string;
  failoverId: string;
  /** The epoch of this reprotect's change logs (the target's cursor is per epoch). */
  epoch: number;
  disks: ReprotectDisk[];
  /** Seconds between passes. */
  intervalSeconds: number;
  /** The pass this execution ships (1 = the checksum pass). */
  pass: number;
  /** Totals over the passes so far. */
  shippedBytes: number;
  sealedBytes: number;
  startedAt?: string;
  /** What the first (checksum) pass shipped per disk: only the blocks that differed from the site. */
  firstPass?: { disk: string; changedBytes: number; segments: number }[];
}

/** The cloud's record of a disk's last pass (`pass-{d}`). */
export interface PassEntity {
  partitionKey: string;
  rowKey: string;
  epoch: number;
  pass: number;
  markerId: string;
  snapshot: string;
  previousSnapshot?: string;
  firstSeq: number;
  /** The seq after the pass's last one; set once shipped. */
  nextSeq?: number;
  shipped: boolean;
  changedBytes?: number;
  sealedBytes?: number;
  segments?: number;
}

export interface PassResult {
  disk: string;
  pass: number;
  markerId: string;
  snapshot: string;
  firstSeq: number;
  /** The last seq of the pass: the target has applied the pass once its cursor reaches it. */
  lastSeq: number;
  changedBytes: number;
  sealedBytes: number;
  segments: number;
}

/** The target's report for a disk (`target-{d}`, written by `lifeboat target reprotect`). */
export interface TargetEntity {
  partitionKey: string;
  rowKey: string;
  epoch: number;
  appliedSeq: number;
  lastMarkerId?: string;
  checksumsUploaded?: boolean;
  updatedAt?: string;
}

export function failoverDiskBlob(
  deps: ProtectionDeps,
  machine: string,
  disk: string,
  failoverId: string,
): PageBlobClient {
  return deps.failover.failoverDisks.getPageBlobClient(failoverDiskName(machine, disk, failoverId));
}

/** The marker id of a regular pass, and of failback's final pass. */
export const passMarkerId = (epoch: number, pass: number) => `pass-${epoch}-${pass}`;
export const finalMarkerId = (operationId: string) => `final-${operationId}`;

/**
 * Starts (or resumes) the reprotect of a committed failover: the epoch of its change logs (one
 * more than the last reprotect's, so the target starts a fresh cursor and checksum pass), the
 * reprotect row, and the failover record's state.
 */
export async function beginReprotect(
  deps: ProtectionDeps,
  input: { machine: string; operationId: string; failoverId: string },
): Promise<{ epoch: number; disks: ReprotectDisk[] }> {
  const table = await deps.tables.get();
  const record = await activeFailover(deps.failover.tables, input.machine);
  if (record.failoverId !== input.failoverId) {
    throw new NotFoundError(
      `Failover ${input.failoverId} of ${input.machine} is no longer the active one (${record.failoverId} is).`,
      'machine',
    );
  }
  const disks = failoverDisks(record);
  const row = await readEntity<ReprotectEntity>(table, input.machine, REPROTECT_ROW);
  if (row && row.operationId === input.operationId) return { epoch: row.epoch, disks };
  const epoch = (row?.epoch ?? 0) + 1;
  const entity: ReprotectEntity = {
    partitionKey: input.machine,
    rowKey: REPROTECT_ROW,
    failoverId: input.failoverId,
    operationId: input.operationId,
    state: 'starting',
    epoch,
    disks: JSON.stringify(disks),
    startedAt: deps.now().toISOString(),
  };
  await table.upsertEntity(entity, 'Replace');
  await updateRecord(
    deps.failover.tables,
    input.machine,
    input.failoverId,
    { state: 'reprotecting' },
    deps.now(),
  );
  return { epoch, disks };
}

export function failoverDisks(record: FailoverRecord): ReprotectDisk[] {
  const disks = record.target?.disks ?? record.point?.disks;
  if (!disks || disks.length === 0)
    throw new NotFoundError(`Failover ${record.failoverId} of ${record.machine} has no disks.`, 'machine');
  return disks.map((d) => ({ id: d.id, sizeBytes: d.sizeBytes }));
}

/** Whether the target uploaded every disk's site checksums for the epoch (the first pass needs them). */
export async function siteChecksumsReady(
  deps: ProtectionDeps,
  input: { machine: string; epoch: number; disks: ReprotectDisk[] },
): Promise<boolean> {
  for (const d of input.disks) {
    const name = `${input.machine}/${d.id}/${input.epoch}/site-checksums.bin`;
    if (!(await deps.reprotect.getBlockBlobClient(name).exists())) return false;
  }
  return true;
}

async function deleteSnapshot(blob: PageBlobClient, snapshot: string | undefined): Promise<void> {
  if (!snapshot) return;
  try {
    await blob.withSnapshot(snapshot).delete();
  } catch (err) {
    if (statusOf(err) !== 404) throw err;
  }
}

function toResult(row: PassEntity): PassResult {
  return {
    disk: row.rowKey.slice('pass-'.length),
    pass: row.pass,
    markerId: row.markerId,
    snapshot: row.snapshot,
    firstSeq: row.firstSeq,
    lastSeq: (row.nextSeq ?? row.firstSeq) - 1,
    changedBytes: row.changedBytes ?? 0,
    sealedBytes: row.sealedBytes ?? 0,
    segments: row.segments ?? 0,
  };
}

/** Ships a recorded pass (its snapshot and first seq are fixed) and records it shipped. */
async function shipRecorded(
  deps: ProtectionDeps,
  machine: string,
  failoverId: string,
  disk: ReprotectDisk,
  row: PassEntity,
): Promise<PassEntity> {
  const blob = failoverDiskBlob(deps, machine, disk.id, failoverId);
  const source = blob.withSnapshot(row.snapshot);
  let ranges;
  if (row.previousSnapshot) {
    ranges = await changeTrackerFor(deps.failover.compute.kind).changedRanges(
      blob,
      disk.sizeBytes,
      row.previousSnapshot,
      row.snapshot,
    );
  } else {
    const site = await readSiteChecksums(deps.reprotect, deps.failover.replication.keyRing(), {
      machine,
      disk: disk.id,
      epoch: row.epoch,
    });
    if (!site)
      throw new Error(
        `The site checksums of ${machine}/${disk.id} (reprotect epoch ${row.epoch}) are missing; is lifeboat target reprotect running?`,
      );
    ranges = differingRanges(await pageBlobChecksums(source, disk.sizeBytes), site, disk.sizeBytes);
  }
  const shipped = await shipPass(deps.reprotect, deps.failover.replication.keyRing(), {
    machine,
    disk: disk.id,
    epoch: row.epoch,
    firstSeq: row.firstSeq,
    source,
    ranges,
    markerId: row.markerId,
  });
  const done: PassEntity = {
    ...row,
    nextSeq: shipped.nextSeq,
    shipped: true,
    changedBytes: shipped.changedBytes,
    sealedBytes: shipped.sealedBytes,
    segments: shipped.segments,
  };
  await (await deps.tables.get()).upsertEntity(done, 'Replace');
  // The snapshot before this pass's is no longer needed: the next pass diffs against this one.
  await deleteSnapshot(blob, row.previousSnapshot);
  return done;
}

/**
 * One pass of one disk: snapshot the failover disk, ship what changed since the previous pass
 * (or what differs from the site, on the epoch's first pass), ending with `markerId`.
 */
export async function runPass(
  deps: ProtectionDeps,
  input: {
    machine: string;
    failoverId: string;
    epoch: number;
    disk: ReprotectDisk;
    pass: number;
    markerId: string;
  },
): Promise<PassResult> {
  const table = await deps.tables.get();
  const { machine, failoverId, epoch, disk } = input;
  const stored = await readEntity<PassEntity>(table, machine, passRow(disk.id));
  let row: PassEntity | undefined = stored && stored.epoch === epoch ? plain(stored) : undefined;
  if (row && row.markerId === input.markerId) {
    return toResult(row.shipped ? row : await shipRecorded(deps, machine, failoverId, disk, row));
  }
  // A pass recorded but not shipped (a run that stopped mid-way) goes out first: its seqs are taken.
  if (row && !row.shipped) row = await shipRecorded(deps, machine, failoverId, disk, row);
  const blob = failoverDiskBlob(deps, machine, disk.id, failoverId);
  const snapshot = (await blob.createSnapshot()).snapshot!;
  const next: PassEntity = {
    partitionKey: machine,
    rowKey: passRow(disk.id),
    epoch,
    pass: input.pass,
    markerId: input.markerId,
    snapshot,
    ...(row ? { previousSnapshot: row.snapshot } : {}),
    firstSeq: row?.nextSeq ?? 1,
    shipped: false,
  };
  await table.upsertEntity(next, 'Replace');
  return toResult(await shipRecorded(deps, machine, failoverId, disk, next));
}

export interface TargetProgress {
  /** Every disk's target applied through `lastSeq`. */
  applied: boolean;
  disks: { disk: string; appliedSeq: number; targetSeq: number; lastMarkerId?: string; updatedAt?: string }[];
  /** Set when failback asked the reprotect loop to stop (its operation id). */
  failbackOperationId?: string;
}

/** The target's cursors against the passes' last seqs, and whether failback asked to take over. */
export async function targetProgress(
  deps: ProtectionDeps,
  input: { machine: string; epoch: number; passes: { disk: string; lastSeq: number }[] },
): Promise<TargetProgress> {
  const table = await deps.tables.get();
  const disks: TargetProgress['disks'] = [];
  for (const p of input.passes) {
    const row = await readEntity<TargetEntity>(table, input.machine, targetRow(p.disk));
    const appliedSeq = row && row.epoch === input.epoch ? row.appliedSeq : 0;
    disks.push({
      disk: p.disk,
      appliedSeq,
      targetSeq: p.lastSeq,
      ...(row?.lastMarkerId ? { lastMarkerId: row.lastMarkerId } : {}),
      ...(row?.updatedAt ? { updatedAt: row.updatedAt } : {}),
    });
  }
  const reprotect = await readEntity<ReprotectEntity>(table, input.machine, REPROTECT_ROW);
  return {
    applied: disks.every((d) => d.appliedSeq >= d.targetSeq),
    disks,
    ...(reprotect?.failbackOperationId && reprotect.epoch === input.epoch
      ? { failbackOperationId: reprotect.failbackOperationId }
      : {}),
  };
}

/** After the first pass is applied: the site holds the failover disks; failback may start. */
export async function markProtecting(
  deps: ProtectionDeps,
  input: { machine: string; operationId: string; failoverId: string },
): Promise<void> {
  const table = await deps.tables.get();
  const row = await readEntity<ReprotectEntity>(table, input.machine, REPROTECT_ROW);
  if (!row || row.operationId !== input.operationId || row.state !== 'starting') return;
  await table.updateEntity(
    {
      partitionKey: input.machine,
      rowKey: REPROTECT_ROW,
      state: 'protecting',
      protectingSince: deps.now().toISOString(),
    },
    'Merge',
    {
      etag: row.etag,
    },
  );
  await updateRecord(
    deps.failover.tables,
    input.machine,
    input.failoverId,
    { state: 'reprotected' },
    deps.now(),
  );
}

/** The reprotect loop stops for failback: it ships nothing more; failback continues from the pass rows. */
export async function handOver(
  deps: ProtectionDeps,
  input: { machine: string; operationId: string; failbackOperationId: string },
): Promise<void> {
  const table = await deps.tables.get();
  const row = await readEntity<ReprotectEntity>(table, input.machine, REPROTECT_ROW);
  if (!row || row.failbackOperationId !== input.failbackOperationId) return;
  await table.updateEntity(
    { partitionKey: input.machine, rowKey: REPROTECT_ROW, handedOverTo: input.failbackOperationId },
    'Merge',
  );
}
