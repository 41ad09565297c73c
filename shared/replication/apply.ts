import type { TableClient } from '@azure/data-tables';
import type { PageBlobClient } from '@azure/storage-blob';
import { z } from 'zod';
import { changelogBlobName } from '../envelope';
import type { Logger } from '../logger';
import { isDnsLabel } from '../names';
import { Readable } from 'node:stream';
import { coalesceRecords, type MarkerRecord, type Segment, type SegmentRecord } from '../segment';
import { ChecksumIndex, discardChecksumIndex, type FillReport } from './checksum-index';
import { ensureContainer, type ChangelogReady, type ReplicationDeps } from './context';
import { raiseEvent } from './events';
import { QuarantineReason } from './open';
import { readPolicy } from './policy';
import { completeRecoveryPoint, readArrival, recordArrival } from './recovery-points';
import {
  alignedChunks,
  downloadBuffer,
  OrderedPageWriter,
  PAGE_WRITE_BYTES,
  SeedLease,
  seedBlob,
} from './seed-disk';
import {
  isConflict,
  isNotFound,
  isPreconditionFailed,
  MACHINES_PARTITION,
  readEntity,
  TABLES,
  type DiskEntity,
  type MachineEntity,
  type NudgeEntity,
} from './tables';

/** How an apply run ended. */
export type ApplyOutcome =
  /** The next segment is not in the cache (yet): a gap or simply the end of the stream. */
  | 'caught-up'
  /** The time budget ran out; a nudge was sent to continue. */
  | 'budget'
  /** Another applier holds the disk's lease. */
  | 'busy'
  /** A change log failed authentication or its checksum: quarantined, disk marked for resync. */
  | 'quarantined'
  /** The disk needs a resync (before or during this run); nothing more is applied until a new epoch. */
  | 'resync-required'
  /** Another applier took the disk over (its cursor claim won); this run stopped. */
  | 'lost-race'
  /** The message names a disk that is not registered. */
  | 'unknown-disk';

export interface ApplyReport {
  machine: string;
  disk: string;
  outcome: ApplyOutcome;
  epoch: number;
  /** The cursor when the run ended: the last applied seq of `epoch`. */
  appliedSeq: number;
  segments: number;
  /** Change bytes applied: write data plus zeroed/trimmed lengths (after coalescing). */
  bytes: number;
  /** Markers this run recorded the disk's arrival at. */
  markers: string[];
  /** Machine recovery points this run completed. */
  recoveryPoints: string[];
  /** What the idle fill did to the disk's checksum index (when it ran). */
  checksumIndex?: FillReport;
  /** The checksum index is not full: come back to fill it after this many seconds. */
  fillAfterSeconds?: number;
}

const messageSchema = z.looseObject({
  machine: z.string().refine(isDnsLabel),
  disk: z.string().refine(isDnsLabel),
});

/**
 * The `changelog-ready` trigger's work: apply what the disk has pending, then make sure nothing
 * is left stranded (a nudge when the budget ran out, or when a change log arrived just as this
 * run let go of the lease). A malformed message is logged and dropped: retrying cannot fix it.
 */
export async function handleChangelogReady(
  deps: ReplicationDeps,
  body: unknown,
): Promise<ApplyReport | undefined> {
  const parsed = messageSchema.safeParse(typeof body === 'string' ? safeJson(body) : body);
  if (!parsed.success) {
    deps.log.error(
      { body },
      'changelog-ready message dropped: it must be {"machine": "...", "disk": "..."} with DNS-label names',
    );
    return undefined;
  }
  return applyChangelogs(deps, { machine: parsed.data.machine, disk: parsed.data.disk });
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

class LostRaceError extends Error {}

/**
 * The disk row as this applier sees it. Every change goes through `update`, an ETag-checked
 * merge: another applier that claimed the disk (new lease id in the row) makes it throw
 * LostRaceError; other writers (registration marking a resize) are merged and retried.
 */
class DiskCursor {
  constructor(
    private readonly table: TableClient,
    public row: DiskEntity & { etag: string; applierLeaseId?: string },
    private readonly leaseId: string,
  ) {}

  async claim(): Promise<void> {
    for (;;) {
      try {
        const r = await this.table.updateEntity(
          { partitionKey: this.row.partitionKey, rowKey: this.row.rowKey, applierLeaseId: this.leaseId },
          'Merge',
          { etag: this.row.etag },
        );
        this.row.etag = r.etag!;
        this.row.applierLeaseId = this.leaseId;
        return;
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        this.row = (await this.table.getEntity(this.row.partitionKey, this.row.rowKey)) as typeof this.row;
      }
    }
  }

  async update(patch: Partial<DiskEntity>): Promise<void> {
    for (;;) {
      try {
        const r = await this.table.updateEntity(
          { partitionKey: this.row.partitionKey, rowKey: this.row.rowKey, ...patch },
          'Merge',
          {
            etag: this.row.etag,
          },
        );
        this.row = { ...this.row, ...patch, etag: r.etag! };
        return;
      } catch (err) {
        if (!isPreconditionFailed(err)) throw err;
        const fresh = (await this.table.getEntity(this.row.partitionKey, this.row.rowKey)) as typeof this.row;
        if (
          fresh.applierLeaseId !== this.leaseId ||
          fresh.epoch !== this.row.epoch ||
          fresh.appliedSeq !== this.row.appliedSeq
        ) {
          throw new LostRaceError(
            `disk ${this.row.partitionKey}/${this.row.rowKey} was claimed by another applier`,
          );
        }
        // Someone else changed other fields (a resize marking resync): keep theirs, retry ours.
        if (
          fresh.state === 'resync-required' &&
          patch.state !== undefined &&
          patch.state !== 'resync-required'
        ) {
          const { state: _s, stateReason: _r, stateChangedAt: _c, ...rest } = patch;
          patch = rest;
        }
        this.row = fresh;
      }
    }
  }
}

/** A change log fetched and opened: its segment, or why it must not be applied. */
interface Fetched {
  bytes: Buffer;
  segment?: Segment;
  rejected?: QuarantineReason;
}

/** Downloads and opens change logs ahead of the applier, in order, a few at a time. */
class ChangelogFetcher {
  private readonly ahead = new Map<number, Promise<Fetched | undefined>>();

  constructor(
    private readonly deps: ReplicationDeps,
    private readonly machine: string,
    private readonly disk: string,
    private readonly epoch: number,
    private readonly depth: number,
  ) {}

  name(seq: number): string {
    return changelogBlobName({ machine: this.machine, disk: this.disk, epoch: this.epoch, seq });
  }

  private async download(seq: number): Promise<Buffer | undefined> {
    try {
      return await downloadBuffer(this.deps.changelogs.getBlobClient(this.name(seq)));
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }

  private async fetch(seq: number): Promise<Fetched | undefined> {
    const bytes = await this.download(seq);
    if (!bytes) return undefined;
    const address = { machine: this.machine, disk: this.disk, epoch: this.epoch, seq };
    try {
      return { bytes, segment: await this.deps.opener.open(this.name(seq), bytes, address) };
    } catch (err) {
      if (err instanceof QuarantineReason) return { bytes, rejected: err };
      throw err;
    }
  }

  /** The change log `seq`, opened, or undefined when it is not in the cache. */
  async get(seq: number): Promise<Fetched | undefined> {
    for (let s = seq; s < seq + this.depth; s++) {
      if (!this.ahead.has(s)) {
        const p = this.fetch(s);
        p.catch(() => undefined);
        this.ahead.set(s, p);
      }
    }
    const fetched = await this.ahead.get(seq)!;
    this.ahead.delete(seq);
    // Fetched ahead and missing then: it may have arrived since.
    return fetched ?? (await this.fetch(seq));
  }

  clear(): void {
    this.ahead.clear();
  }
}

type ChangeRecord = Exclude<SegmentRecord, MarkerRecord>;

/** One put-pages (write) or clear-pages call. */
export interface PageOp {
  kind: 'write' | 'clear';
  offset: number;
  length: number;
  /** The data of a write, as views of the segment (not copied). */
  pieces: Buffer[];
}

function recordEnd(r: ChangeRecord): number {
  return r.offset + (r.type === 'write' ? r.data.length : r.length);
}

/**
 * The page calls for a marker-free run of records. Overlapping records are resolved by the codec's
 * coalescer (later wins); otherwise order does not matter and the records are only sorted. Adjacent
 * writes within one 4 MiB-aligned window become one put-pages call whose body is the list of the
 * records' buffers (no copy); adjacent zero/trim ranges become one clear-pages call.
 */
export function planPageOps(run: readonly ChangeRecord[]): PageOp[] {
  const sorted = [...run].sort((a, b) => a.offset - b.offset);
  let maxEnd = 0;
  let overlapping = false;
  for (const r of sorted) {
    if (r.offset < maxEnd) overlapping = true;
    maxEnd = Math.max(maxEnd, recordEnd(r));
  }
  const records = overlapping
    ? (coalesceRecords(run as SegmentRecord[], { maxWriteBytes: PAGE_WRITE_BYTES }) as ChangeRecord[])
    : sorted;
  const ops: PageOp[] = [];
  for (const r of records) {
    const last = ops[ops.length - 1];
    if (r.type === 'write') {
      for (const [at, length] of alignedChunks(r.offset, r.data.length)) {
        const piece = r.data.subarray(at - r.offset, at - r.offset + length);
        const window = Math.floor(at / PAGE_WRITE_BYTES);
        const tail = ops[ops.length - 1];
        if (
          tail &&
          tail.kind === 'write' &&
          tail.offset + tail.length === at &&
          Math.floor(tail.offset / PAGE_WRITE_BYTES) === window
        ) {
          tail.pieces.push(piece);
          tail.length += length;
        } else {
          ops.push({ kind: 'write', offset: at, length, pieces: [piece] });
        }
      }
    } else if (last && last.kind === 'clear' && last.offset + last.length === r.offset) {
      last.length += r.length;
    } else {
      ops.push({ kind: 'clear', offset: r.offset, length: r.length, pieces: [] });
    }
  }
  return ops;
}

/** [start, end) of each change of the segment. */
function* changedRanges(segment: Segment): Generator<[number, number]> {
  for (const r of segment.records) if (r.type !== 'marker') yield [r.offset, recordEnd(r)];
}

/** The first byte past every change of the segment (0 when it has none). */
function segmentExtent(segment: Segment): number {
  let end = 0;
  for (const r of segment.records) {
    if (r.type === 'marker') continue;
    end = Math.max(end, r.offset + (r.type === 'write' ? r.data.length : r.length));
  }
  return end;
}

/**
 * Applies the disk's pending change logs to its seed page blob: under the blob's lease, from the
 * cursor on, in order, stopping at a gap, the time budget, or a change log it must not apply.
 * Writes are absolute and the cursor moves only after a segment's pages are all written, so a run
 * killed at any point leaves work the next run redoes to the same bytes.
 */
export async function applyChangelogs(deps: ReplicationDeps, target: ChangelogReady): Promise<ApplyReport> {
  const { machine, disk } = target;
  const log = deps.log.child({ machine, disk });
  const report: ApplyReport = {
    machine,
    disk,
    outcome: 'caught-up',
    epoch: 0,
    appliedSeq: 0,
    segments: 0,
    bytes: 0,
    markers: [],
    recoveryPoints: [],
  };
  const disks = await deps.tables.get(TABLES.disks);
  const initial = await readEntity<DiskEntity & { applierLeaseId?: string }>(disks, machine, disk);
  if (!initial) {
    log.warn('changelog-ready for a disk that is not registered; dropped');
    return { ...report, outcome: 'unknown-disk' };
  }
  const blob = seedBlob(await ensureContainer(deps.seed), machine, disk);
  let lease: SeedLease | undefined;
  try {
    lease = await SeedLease.acquire(blob, deps.tuning.leaseSeconds);
  } catch (err) {
    if (isNotFound(err)) {
      log.error('the seed blob of a registered disk is missing; register the machine again to recreate it');
      return { ...report, outcome: 'unknown-disk' };
    }
    throw err;
  }
  if (!lease) {
    await nudgeWhenBusy(deps, machine, disk);
    return { ...report, outcome: 'busy', epoch: initial.epoch, appliedSeq: initial.appliedSeq };
  }
  let cursor: DiskCursor | undefined;
  try {
    cursor = new DiskCursor(disks, initial as DiskCursor['row'], lease.leaseId);
    await cursor.claim();
    const index = await openIndex(deps, log, blob, { machine, disk, sizeBytes: cursor.row.sizeBytes }, lease);
    try {
      await runApply(deps, log, blob, lease, cursor, index, report);
    } catch (err) {
      // The run's writes are drained (runApply's finally): unless the disk is no longer ours, the
      // index still describes the seed (every region written was forgotten first), so it is kept.
      if (!lease.lost && !(err instanceof LostRaceError)) await index.seal().catch(() => undefined);
      throw err;
    }
    // Every write of the run is done: the index describes the seed as it is now.
    await index.seal();
  } catch (err) {
    if (!(err instanceof LostRaceError)) throw err;
    log.warn('another applier took the disk over; stopping');
    report.outcome = 'lost-race';
  } finally {
    await lease.release();
  }
  if (cursor) {
    report.epoch = cursor.row.epoch;
    report.appliedSeq = cursor.row.appliedSeq;
  }
  if (report.outcome === 'budget') {
    await deps.nudge({ machine, disk });
  } else if (report.outcome === 'caught-up') {
    // A change log that arrived while we held the lease had its message dropped as 'busy'.
    const name = changelogBlobName({ machine, disk, epoch: report.epoch, seq: report.appliedSeq + 1 });
    if (await deps.changelogs.getBlockBlobClient(name).exists()) await deps.nudge({ machine, disk });
    else if (report.fillAfterSeconds !== undefined)
      await nudgeOnce(deps, machine, disk, report.fillAfterSeconds);
  } else if (
    (report.outcome === 'resync-required' || report.outcome === 'quarantined') &&
    report.fillAfterSeconds !== undefined
  ) {
    await nudgeOnce(deps, machine, disk, report.fillAfterSeconds);
  }
  log.info(
    {
      outcome: report.outcome,
      epoch: report.epoch,
      seq: report.appliedSeq,
      segments: report.segments,
      bytes: report.bytes,
    },
    'apply run ended',
  );
  return report;
}

/** What apply needs of the checksum index (a real one, or none when it could not be opened). */
type IndexPort = Pick<ChecksumIndex, 'invalidate' | 'fill' | 'seal' | 'unknownRegions'>;

const NO_INDEX: IndexPort = {
  invalidate: () => Promise.resolve(),
  fill: () => Promise.resolve({ regions: 0, bytesRead: 0, unknown: 0 }),
  seal: () => Promise.resolve(),
  unknownRegions: 0,
};

/**
 * Opens the disk's checksum index. Replication does not depend on it: if it cannot be opened the
 * run goes on without one, once the index is deleted (an index nobody keeps must not be left for
 * the endpoint to trust); only if that fails too does the run fail.
 */
async function openIndex(
  deps: ReplicationDeps,
  log: Logger,
  blob: PageBlobClient,
  { machine, disk, sizeBytes }: { machine: string; disk: string; sizeBytes: number },
  lease: SeedLease,
): Promise<IndexPort> {
  try {
    return await ChecksumIndex.open(deps.seed, blob, machine, disk, sizeBytes, lease);
  } catch (err) {
    if (lease.lost) throw err;
    log.warn(
      { err: String(err) },
      'the checksum index could not be opened; deleting it and applying without it',
    );
    await discardChecksumIndex(deps.seed, machine, disk);
    return NO_INDEX;
  }
}

async function runApply(
  deps: ReplicationDeps,
  log: Logger,
  blob: PageBlobClient,
  lease: SeedLease,
  cursor: DiskCursor,
  index: IndexPort,
  report: ApplyReport,
): Promise<void> {
  const machine = cursor.row.partitionKey;
  const disk = cursor.row.rowKey;
  const deadline = Date.now() + deps.tuning.budgetMs;
  const machineRow = await readEntity<MachineEntity>(
    await deps.tables.get(TABLES.machines),
    MACHINES_PARTITION,
    machine,
  );
  const keepChangeLogs = machineRow ? readPolicy(machineRow.policy).keepChangeLogsHours > 0 : true;
  const leaseId = lease.leaseId;
  const writer = new OrderedPageWriter(deps.tuning.writeConcurrency);
  // An applied change log is deleted in the background (retention sweeps any a crash left).
  const advance = new CursorAdvance(cursor, (name, seq) => {
    if (keepChangeLogs) return;
    void deps.changelogs
      .deleteBlob(name)
      .catch((err) =>
        isNotFound(err)
          ? undefined
          : log.warn({ seq, err: String(err) }, 'could not delete an applied change log'),
      );
  });
  const settle = async () => {
    await writer.drain();
    await advance.settle();
  };
  // Once the disk has been quiet for a while, a run with nothing to apply spends a slice of its
  // time filling the checksum index; otherwise it asks to be woken when the disk may be quiet.
  const nextEpochStart = () => changelogBlobName({ machine, disk, epoch: cursor.row.epoch + 1, seq: 1 });
  const fillIndex = async (next: () => string) => {
    if (deps.tuning.fillMs <= 0 || index.unknownRegions === 0) return;
    const lastApplied = cursor.row.lastAppliedAt ? Date.parse(cursor.row.lastAppliedAt) : 0;
    const quietFor = Date.now() - lastApplied;
    if (report.segments === 0 && quietFor >= deps.tuning.fillQuietMs) {
      report.checksumIndex = await index.fill({
        deadline: Math.min(deadline, Date.now() + deps.tuning.fillMs),
        stop: () => deps.changelogs.getBlockBlobClient(next()).exists(),
      });
      if (report.checksumIndex.unknown > 0) report.fillAfterSeconds = 1;
    } else {
      report.fillAfterSeconds = Math.max(1, Math.ceil((deps.tuning.fillQuietMs - quietFor) / 1000));
    }
  };
  try {
    if (cursor.row.state === 'resync-required' && !(await switchEpoch(deps, log, cursor))) {
      report.outcome = 'resync-required';
      // A resync is coming: its checksum requests are answered from the index.
      await fillIndex(nextEpochStart);
      return;
    }
    let fetcher = new ChangelogFetcher(deps, machine, disk, cursor.row.epoch, deps.tuning.prefetch);
    let epoch = cursor.row.epoch;
    let seq = cursor.row.appliedSeq + 1;
    for (;;) {
      if (lease.lost) throw lease.lost;
      advance.throwIfFailed();
      if (Date.now() >= deadline) {
        await settle();
        report.outcome = 'budget';
        return;
      }
      const name = fetcher.name(seq);
      const fetched = await fetcher.get(seq);
      if (!fetched) {
        await settle();
        if (await switchEpoch(deps, log, cursor)) {
          epoch = cursor.row.epoch;
          seq = 1;
          fetcher = new ChangelogFetcher(deps, machine, disk, epoch, deps.tuning.prefetch);
          continue;
        }
        report.outcome = 'caught-up';
        await fillIndex(() => name);
        return;
      }
      if (!fetched.segment) {
        await settle();
        fetcher.clear();
        await quarantine(deps, log, cursor, name, fetched.bytes, fetched.rejected!, { epoch, seq });
        report.outcome = 'quarantined';
        await fillIndex(nextEpochStart); // the resync is coming
        return;
      }
      const segment = fetched.segment;
      const extent = segmentExtent(segment);
      if (extent > cursor.row.sizeBytes) {
        await settle();
        await markResyncRequired(
          deps,
          cursor,
          `change log ${name} writes up to byte ${extent}, past the disk's registered size of ${cursor.row.sizeBytes} bytes`,
          { epoch, seq },
        );
        log.error({ seq, extent }, 'change log writes past the end of the disk; disk marked for resync');
        report.outcome = 'resync-required';
        await fillIndex(nextEpochStart);
        return;
      }
      if (cursor.row.state === 'resync-required') {
        await settle();
        report.outcome = 'resync-required';
        await fillIndex(nextEpochStart);
        return;
      }

      // The index forgets every region the segment changes before any of its pages is written.
      await index.invalidate(changedRanges(segment));

      let bytesApplied = 0;
      let sawMarker = false;
      let run: ChangeRecord[] = [];
      const flush = async () => {
        for (const op of planPageOps(run)) {
          const { offset, length, pieces } = op;
          const body = pieces.length === 1 ? pieces[0] : () => Readable.from(pieces);
          await writer.submit(offset, offset + length, () =>
            op.kind === 'write'
              ? blob.uploadPages(body, offset, length, { conditions: { leaseId } })
              : blob.clearPages(offset, length, { conditions: { leaseId } }),
          );
          bytesApplied += length;
        }
        run = [];
      };
      for (const record of segment.records) {
        if (record.type !== 'marker') {
          run.push(record);
          continue;
        }
        await flush();
        await writer.drain();
        await arriveAtMarker(deps, log, blob, leaseId, cursor, record, { epoch, seq }, report);
        sawMarker = true;
      }
      await flush();
      const applied = seq;
      const patch: Partial<DiskEntity> = {
        appliedSeq: applied,
        lastSourceTime: segment.header.lastWriteTime,
      };
      if (sawMarker) patch.lastMarkerId = report.markers[report.markers.length - 1];
      if (sawMarker && cursor.row.state === 'initial-sync') {
        patch.state = 'protected';
        patch.stateReason = 'reached its first consistency marker';
        patch.stateChangedAt = new Date().toISOString();
      }
      advance.after(writer.settled(), { seq: applied, name, bytes: bytesApplied, patch });
      report.segments++;
      report.bytes += bytesApplied;
      seq++;
    }
  } finally {
    // On any exit the page writes are over before the caller seals the index or lets go.
    await writer.drain().catch(() => undefined);
  }
}

/** A segment whose pages are submitted: the cursor may pass it once they are written. */
interface AppliedSegment {
  seq: number;
  name: string;
  bytes: number;
  patch: Partial<DiskEntity>;
}

/**
 * Moves the cursor behind the page writes. A segment counts as applied once its pages (and every
 * page before them) are written, in seq order; one table update at a time then carries the newest
 * applied state, so a fast stream costs one cursor update per table round trip rather than one
 * per segment (the cursor may trail the pages, never lead them: re-applying is harmless). A change
 * log is handed to `applied` (to be deleted) only after an update covering it succeeded.
 */
class CursorAdvance {
  private order: Promise<void> = Promise.resolve();
  private waiting: AppliedSegment[] = [];
  private updating?: Promise<void>;
  private failure?: unknown;

  constructor(
    private readonly cursor: DiskCursor,
    private readonly applied: (name: string, seq: number) => void,
  ) {}

  /** Counts `segment` as applied once `written` resolves (after the segments offered before it). */
  after(written: Promise<void>, segment: AppliedSegment): void {
    written.catch(() => undefined);
    this.order = this.order.then(async () => {
      try {
        await written;
      } catch (err) {
        this.failure ??= err;
        return;
      }
      this.waiting.push(segment);
      this.updating ??= this.update().finally(() => {
        this.updating = undefined;
      });
    });
  }

  private async update(): Promise<void> {
    while (this.waiting.length > 0 && this.failure === undefined) {
      const batch = this.waiting;
      this.waiting = [];
      const patch: Partial<DiskEntity> = { lastAppliedAt: new Date().toISOString() };
      let bytes = 0;
      for (const s of batch) {
        Object.assign(patch, s.patch);
        bytes += s.bytes;
      }
      patch.appliedBytes = (this.cursor.row.appliedBytes ?? 0) + bytes;
      try {
        await this.cursor.update(patch);
      } catch (err) {
        this.failure ??= err;
        return;
      }
      for (const s of batch) this.applied(s.name, s.seq);
    }
  }

  throwIfFailed(): void {
    if (this.failure !== undefined) throw this.failure;
  }

  /** Resolves when every offered segment is counted and the cursor is updated; throws a failure. */
  async settle(): Promise<void> {
    await this.order;
    while (this.updating) await this.updating;
    this.throwIfFailed();
  }
}

/** Snapshots the seed blob at a marker and records the disk's arrival, once per marker. */
async function arriveAtMarker(
  deps: ReplicationDeps,
  log: Logger,
  blob: PageBlobClient,
  leaseId: string,
  cursor: DiskCursor,
  marker: MarkerRecord,
  at: { epoch: number; seq: number },
  report: ApplyReport,
): Promise<void> {
  const machine = cursor.row.partitionKey;
  const disk = cursor.row.rowKey;
  const now = new Date();
  if (!(await readArrival(deps.tables, machine, marker.id, disk))) {
    // The lease condition makes the snapshot fail if another applier took the disk: a snapshot
    // taken here holds exactly the records before the marker.
    const snapshot = (await blob.createSnapshot({ conditions: { leaseId } })).snapshot!;
    const recorded = await recordArrival(
      deps.tables,
      {
        machine,
        disk,
        markerId: marker.id,
        kind: marker.kind,
        tag: marker.tag,
        sourceTime: marker.time,
        snapshot,
        ...at,
      },
      now,
    );
    if (!recorded)
      await blob
        .withSnapshot(snapshot)
        .delete()
        .catch(() => undefined);
    else log.info({ seq: at.seq, marker: marker.id, snapshot }, 'disk reached a marker');
  }
  report.markers.push(marker.id);
  const point = await completeRecoveryPoint(deps.tables, machine, marker.id, now);
  if (point) {
    report.recoveryPoints.push(point.id);
    log.info({ seq: at.seq, marker: point.id, type: point.type }, 'recovery point recorded');
  }
}

async function quarantine(
  deps: ReplicationDeps,
  log: Logger,
  cursor: DiskCursor,
  name: string,
  bytes: Buffer,
  reason: QuarantineReason,
  at: { epoch: number; seq: number },
): Promise<void> {
  const machine = cursor.row.partitionKey;
  const disk = cursor.row.rowKey;
  const quarantine = await ensureContainer(deps.quarantine);
  await quarantine.getBlockBlobClient(name).uploadData(bytes, {
    metadata: {
      reason: reason.code.replace(/[^A-Za-z0-9:_-]/g, '_'),
      quarantinedat: new Date().toISOString(),
    },
  });
  await deps.changelogs.deleteBlob(name).catch((err) => {
    if (!isNotFound(err)) throw err;
  });
  log.error(
    { seq: at.seq, epoch: at.epoch, code: reason.code, err: reason.message },
    'change log quarantined',
  );
  await raiseEvent(deps.tables, {
    type: 'segment-quarantined',
    severity: 'error',
    machine,
    disk,
    time: new Date(),
    message:
      `Change log ${name} was moved to the ${deps.quarantine.containerName} container and not applied: ${reason.message} ` +
      'The disk needs a resync.',
    details: { blob: name, epoch: at.epoch, seq: at.seq, code: reason.code },
  });
  await markResyncRequired(
    deps,
    cursor,
    `change log seq ${at.seq} of epoch ${at.epoch} was quarantined (${reason.code})`,
    at,
  );
}

async function markResyncRequired(
  deps: ReplicationDeps,
  cursor: DiskCursor,
  reason: string,
  at: { epoch: number; seq: number },
): Promise<void> {
  await cursor.update({
    state: 'resync-required',
    stateReason: reason,
    stateChangedAt: new Date().toISOString(),
  });
  await raiseEvent(deps.tables, {
    type: 'resync-required',
    severity: 'error',
    machine: cursor.row.partitionKey,
    disk: cursor.row.rowKey,
    time: new Date(),
    message: `Disk ${cursor.row.partitionKey}/${cursor.row.rowKey} needs a resync: ${reason}.`,
    details: { epoch: at.epoch, seq: at.seq, reason },
  });
}

/**
 * Moves the disk to the agent's next epoch once that epoch's first change log is in the cache:
 * a new epoch is a resync, which supersedes whatever of the old epoch was not applied.
 */
async function switchEpoch(deps: ReplicationDeps, log: Logger, cursor: DiskCursor): Promise<boolean> {
  const machine = cursor.row.partitionKey;
  const disk = cursor.row.rowKey;
  const current = cursor.row.epoch;
  const epochs: number[] = [];
  for await (const item of deps.changelogs.listBlobsByHierarchy('/', { prefix: `${machine}/${disk}/` })) {
    if (item.kind !== 'prefix') continue;
    const epoch = Number(item.name.split('/')[2]);
    if (Number.isSafeInteger(epoch) && epoch > current) epochs.push(epoch);
  }
  for (const epoch of epochs.sort((a, b) => a - b)) {
    const first = changelogBlobName({ machine, disk, epoch, seq: 1 });
    if (!(await deps.changelogs.getBlockBlobClient(first).exists())) continue;
    await cursor.update({
      epoch,
      appliedSeq: 0,
      state: 'initial-sync',
      stateReason: `epoch ${epoch} started (initial sync or resync)`,
      stateChangedAt: new Date().toISOString(),
    });
    log.info({ epoch, previous: current }, 'applying a new replication epoch');
    await raiseEvent(deps.tables, {
      type: 'epoch-started',
      severity: 'info',
      machine,
      disk,
      time: new Date(),
      message: `Disk ${machine}/${disk} moved from epoch ${current} to epoch ${epoch}; it is in initial sync until its first marker.`,
      details: { epoch, previous: current },
    });
    return true;
  }
  return false;
}

/**
 * When the lease is busy: the holder re-checks for new work after letting go, so normally nothing
 * is needed; but a holder that died keeps the lease until it expires. One delayed nudge per third
 * of a lease period per disk covers that without multiplying messages.
 */
async function nudgeWhenBusy(deps: ReplicationDeps, machine: string, disk: string): Promise<void> {
  // A dead holder's lease lapses within leaseSeconds of its last renewal: check a few times per period.
  await nudgeOnce(deps, machine, disk, Math.ceil(deps.tuning.leaseSeconds / 3));
}

/**
 * A nudge `delaySeconds` from now, unless one is already due later than now (the nudges table
 * keeps when): many runs asking for the same wake-up send one message.
 */
async function nudgeOnce(
  deps: ReplicationDeps,
  machine: string,
  disk: string,
  delaySeconds: number,
): Promise<void> {
  const now = Date.now();
  // What this process last scheduled spares the table read while it is still ahead.
  const key = `${machine}/${disk}`;
  if ((scheduledNudges.get(key) ?? 0) > now) return;
  const table = await deps.tables.get(TABLES.nudges);
  const row = await readEntity<NudgeEntity>(table, machine, disk);
  if (row && Date.parse(row.notBefore) > now) {
    scheduledNudges.set(key, Date.parse(row.notBefore));
    return;
  }
  const entity: NudgeEntity = {
    partitionKey: machine,
    rowKey: disk,
    notBefore: new Date(now + delaySeconds * 1000).toISOString(),
  };
  // Sent first: a failed send leaves no row claiming a nudge is on its way (a duplicate is harmless).
  await deps.nudge({ machine, disk }, delaySeconds);
  scheduledNudges.set(key, Date.parse(entity.notBefore));
  try {
    if (row) await table.updateEntity(entity, 'Replace', { etag: row.etag });
    else await table.createEntity(entity);
  } catch (err) {
    if (isConflict(err) || isPreconditionFailed(err)) return;
    throw err;
  }
}

/** Per disk, when the nudge this process last scheduled (or saw scheduled) is due. */
const scheduledNudges = new Map<string, number>();
