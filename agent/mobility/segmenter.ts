import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { LifeboatError } from '../../shared/errors';
import {
  coalesceRecords,
  decodeSegment,
  encodeSegment,
  MAX_RECORDS,
  MAX_SEGMENT_BYTES,
  RANGE_RECORD_BYTES,
  WRITE_RECORD_HEADER_BYTES,
  encodedHeaderSize,
  TRAILER_BYTES,
  type MarkerKind,
  type MarkerRecord,
  type SegmentRecord,
} from '../../shared/segment';
import { DirtyBitmap } from './bitmap';
import {
  OpenSegmentFile,
  openSegmentFiles,
  readOpenSegment,
  type DiskMode,
  type DiskState,
  type JournalEntry,
  type SegmentJournal,
} from './journal';
import type { ChangeKind, WriteJournal } from './nbd';

export const DEFAULT_SEGMENT_BYTES = 8 * 1024 * 1024;
export const DEFAULT_SEGMENT_AGE_MS = 5_000;
export const DEFAULT_JOURNAL_BYTES = 1024 * 1024 * 1024;
export const DEFAULT_BLOCK_BYTES = 64 * 1024;

/** A change as the segmenter takes it: an NBD WriteChange, or a block re-read by a sync pass. */
export interface Change {
  kind: ChangeKind;
  offset: number;
  length: number;
  data?: Buffer;
}

export interface MarkerSpec {
  id: string;
  kind: MarkerKind;
  time: number;
  tag?: string;
}

export interface SegmenterOptions {
  journal: SegmentJournal;
  /** The disk's state; the segmenter owns and updates it. */
  state: DiskState;
  logger: Logger;
  /** Cut when the open segment reaches this many encoded bytes (default 8 MiB, at most 64 MiB). */
  maxSegmentBytes?: number;
  /** Cut when the open segment's first change is this old (default 5 s). */
  maxSegmentAgeMs?: number;
  /** Journal bound: beyond it the disk goes to bitmap mode (default 1 GiB). */
  maxJournalBytes?: number;
  /** Bitmap granularity (default 64 KiB). */
  blockBytes?: number;
  /** Unwritten open-segment bytes beyond which `append` makes the client wait (default 64 MiB). */
  writeHighWaterBytes?: number;
}

interface OpenSegment {
  seq: number;
  records: SegmentRecord[];
  /** Encoded size if cut now, with room for one marker. */
  bytes: number;
  firstTime: number;
  lastTime: number;
  /** The segment's file, written as changes arrive (absent in bitmap mode and briefly after a reset). */
  file: OpenSegmentFile | undefined;
}

/** The disk's change stream could not be written to its journal. */
export class JournalWriteError extends LifeboatError {
  constructor(message: string, cause?: unknown) {
    super('JournalWriteFailed', message, { status: 500, target: 'journal', cause });
  }
}

const MARKER_ROOM = 13 + 64 + 256;

/**
 * Turns one disk's ordered changes into numbered segments in its journal. It is the NBD export's
 * journal sink (WriteJournal): `append` is called in replication order, `flush` resolves once
 * every change appended before it is durable (in a segment file or the open segment's WAL).
 * Segments are cut on size, on age and at every marker; writes inside a segment are coalesced.
 * When the journal would pass its bound the disk drops to bitmap mode (only dirty blocks are
 * kept) until a catch-up pass re-reads them. Events: 'segment' (JournalEntry), 'mode' (DiskMode),
 * 'fault' (Error).
 */
export class DiskSegmenter extends EventEmitter implements WriteJournal {
  readonly journal: SegmentJournal;
  readonly state: DiskState;
  readonly bitmap: DirtyBitmap;
  readonly maxSegmentBytes: number;
  readonly maxSegmentAgeMs: number;
  readonly maxJournalBytes: number;
  private readonly log: Logger;
  private readonly writeHighWater: number;
  private open: OpenSegment;
  private chain: Promise<void> = Promise.resolve();
  private cuttingBytes = 0;
  private ageTimer: NodeJS.Timeout | undefined;
  private failure: Error | undefined;
  private bitmapSave: Promise<void> | undefined;
  private bitmapSaveNext: Promise<void> | undefined;
  /**
   * Bitmap mode deletes the open segment's file once the bitmap holding its blocks is durable.
   * The file is named by (epoch, seq) and the segment after bitmap mode keeps that seq, so the
   * next open file for it is created only after this (else the late delete would remove it).
   */
  private droppedOpenFile: Promise<void> = Promise.resolve();
  private closed = false;
  /** Segment files sealed in place and not yet fdatasynced (the next flush syncs them together). */
  private unsynced: string[] = [];
  /** Changes appended (for stats). */
  changes = 0;
  /**
   * Moves whenever the stream is reset, a new epoch begins or a resync is (re)requested: a resync
   * pass that began before compared against a cloud copy and a stream that no longer hold, and
   * starts over (runResync checks it between steps).
   */
  syncGeneration = 0;
  /** Stream resets whose clean-up (in the cut chain) has not run yet. */
  private resetsPending = 0;

  constructor(options: SegmenterOptions) {
    super();
    this.journal = options.journal;
    this.state = options.state;
    this.log = options.logger.child({ machine: options.state.machine, disk: options.state.disk });
    this.maxSegmentBytes = Math.min(options.maxSegmentBytes ?? DEFAULT_SEGMENT_BYTES, MAX_SEGMENT_BYTES);
    this.maxSegmentAgeMs = options.maxSegmentAgeMs ?? DEFAULT_SEGMENT_AGE_MS;
    this.maxJournalBytes = options.maxJournalBytes ?? DEFAULT_JOURNAL_BYTES;
    this.writeHighWater = options.writeHighWaterBytes ?? 64 * 1024 * 1024;
    const bitmapFile = this.bitmapPath();
    this.bitmap =
      DirtyBitmap.load(bitmapFile) ??
      new DirtyBitmap(options.state.sizeBytes, options.blockBytes ?? DEFAULT_BLOCK_BYTES);
    this.open = this.newOpen(this.state.nextSeq, this.state.mode !== 'bitmap');
  }

  get mode(): DiskMode {
    return this.state.mode;
  }

  get machine(): string {
    return this.state.machine;
  }

  get disk(): string {
    return this.state.disk;
  }

  /** Encoded bytes in the open segment. */
  get openBytes(): number {
    return this.open.records.length === 0 ? 0 : this.open.bytes;
  }

  get openRecords(): number {
    return this.open.records.length;
  }

  /** Time of the open segment's first change (undefined when empty). */
  get openSince(): number | undefined {
    return this.open.records.length === 0 ? undefined : this.open.firstTime;
  }

  /** Journal bytes including segments being written and the open segment. */
  get backlogBytes(): number {
    return this.journal.bytes + this.cuttingBytes + this.openBytes;
  }

  bitmapPath(): string {
    return path.join(this.journal.dir, 'bitmap.bin');
  }

  // ---- the WriteJournal sink ----

  append(change: Change): Promise<void> | void {
    if (this.failure) throw this.failure;
    this.changes += 1;
    if (this.state.mode === 'bitmap') {
      this.bitmap.markRange(change.offset, change.length);
      return;
    }
    const record: SegmentRecord =
      change.kind === 'write'
        ? { type: 'write', offset: change.offset, data: change.data as Buffer }
        : { type: change.kind, offset: change.offset, length: change.length };
    const size = change.kind === 'write' ? WRITE_RECORD_HEADER_BYTES + change.length : RANGE_RECORD_BYTES;
    if (this.journal.bytes + this.cuttingBytes + this.open.bytes + size > this.maxJournalBytes) {
      this.enterBitmapMode(change);
      return;
    }
    if (
      this.open.records.length > 0 &&
      (this.open.bytes + size > this.maxSegmentBytes || this.open.records.length >= MAX_RECORDS - 1)
    ) {
      void this.cut();
    }
    const now = Date.now();
    const open = this.open;
    if (open.records.length === 0) {
      open.firstTime = now;
      this.ageTimer = setTimeout(() => void this.cut().catch(() => undefined), this.maxSegmentAgeMs);
      this.ageTimer.unref();
    }
    open.records.push(record);
    open.bytes += size;
    open.lastTime = now;
    const file = open.file;
    // (Only right after a stream reset is there briefly no file; the reset writes the records to the new one.)
    file?.append(change);
    if (file && file.pendingBytes > this.writeHighWater)
      return file.waitWritten(file.bytes - this.writeHighWater);
  }

  /** Resolves once every change appended before the call is durable. */
  async flush(): Promise<void> {
    if (this.failure) throw this.failure;
    const waits: Promise<void>[] = [this.chain.then(() => this.syncSealed())];
    if (this.state.mode === 'bitmap') waits.push(this.saveBitmap());
    else if (this.open.file) waits.push(this.open.file.sync());
    await Promise.all(waits);
    if (this.failure) throw this.failure;
  }

  private syncSealed(): Promise<void> {
    if (this.unsynced.length === 0) return Promise.resolve();
    const files = this.unsynced;
    this.unsynced = [];
    return this.journal.syncFiles(files);
  }

  // ---- cutting ----

  /**
   * Closes the open segment (with `marker` as its last record) and writes it to the journal.
   * The seq is assigned synchronously, so the caller may cut several disks in one synchronous
   * step while their exports are paused. Resolves with the seq, or undefined when there was
   * nothing to cut. A marker is refused unless the disk is in data mode.
   */
  cut(marker?: MarkerSpec): Promise<number | undefined> {
    if (this.failure) return Promise.reject(this.failure);
    if (marker && this.state.mode !== 'data') {
      return Promise.reject(
        new LifeboatError(
          'MarkerRefused',
          `Disk ${this.disk} is in ${this.state.mode} mode; markers are cut only in data mode.`,
        ),
      );
    }
    const seg = this.open;
    if (!marker && seg.records.length === 0) return Promise.resolve(undefined);
    if (this.ageTimer) clearTimeout(this.ageTimer);
    this.ageTimer = undefined;
    this.open = this.newOpen(seg.seq + 1, this.state.mode !== 'bitmap');
    this.state.nextSeq = seg.seq + 1;
    const records = seg.records;
    if (marker) {
      const m: MarkerRecord = {
        type: 'marker',
        id: marker.id,
        kind: marker.kind,
        time: marker.time,
        tag: marker.tag ?? '',
      };
      records.push(m);
      if (records.length === 1) seg.firstTime = seg.lastTime = marker.time;
      else seg.lastTime = Math.max(seg.lastTime, marker.time);
      seg.firstTime = Math.min(seg.firstTime, marker.time);
    }
    const epoch = this.state.epoch;
    this.cuttingBytes += seg.bytes;
    const done = this.chain.then(async () => {
      try {
        let entry: JournalEntry;
        if (seg.file && seg.file.identity.epoch === epoch && !coalescingPays(records)) {
          // The file already holds the records in order: complete it in place.
          if (marker) seg.file.appendMarker(records[records.length - 1] as MarkerRecord);
          const first = records.length === 0 ? Date.now() : seg.firstTime;
          const size = await seg.file.seal(first, records.length === 0 ? first : seg.lastTime);
          entry = await this.journal.adopt(epoch, seg.seq, seg.file.file, size);
          await seg.file.removeIndex();
          this.unsynced.push(entry.file);
        } else {
          entry = await this.journal.write(epoch, seg.seq, this.encode(epoch, seg, records));
          await seg.file?.discard();
        }
        this.log.debug(
          { seq: seg.seq, records: records.length, bytes: entry.bytes, marker: marker?.id },
          'segment cut',
        );
        this.emit('segment', entry);
      } catch (err) {
        this.fail(
          new JournalWriteError(
            `Segment ${seg.seq} of disk ${this.disk} could not be written to the journal in ${this.journal.dir} (${(err as Error).message}).`,
            err,
          ),
        );
        throw this.failure;
      } finally {
        this.cuttingBytes -= seg.bytes;
      }
    });
    this.chain = done.catch(() => undefined);
    return done.then(() => seg.seq);
  }

  private encode(epoch: number, seg: OpenSegment, records: SegmentRecord[]): Buffer {
    const header = {
      machine: this.machine,
      disk: this.disk,
      epoch,
      seq: seg.seq,
      firstWriteTime: records.length === 0 ? Date.now() : seg.firstTime,
      lastWriteTime: records.length === 0 ? Date.now() : seg.lastTime,
    };
    try {
      return encodeSegment({ header, records: coalesceRecords(records) });
    } catch {
      // Coalescing can split a range into more records than fit; the original list always fits.
      return encodeSegment({ header, records });
    }
  }

  /** Resolves once every cut started so far is in the journal (or failed). */
  settled(): Promise<void> {
    return this.chain;
  }

  private newOpen(seq: number, withFile: boolean): OpenSegment {
    return {
      seq,
      records: [],
      bytes: encodedHeaderSize(this.state.machine, this.state.disk) + TRAILER_BYTES + MARKER_ROOM,
      firstTime: 0,
      lastTime: 0,
      // While a stream reset is being cleaned up, files of the old stream's cuts may still be
      // pending under the same names: the reset creates the open file once they are gone.
      file: withFile && this.resetsPending === 0 ? this.openFile(seq) : undefined,
    };
  }

  private openFile(seq: number): OpenSegmentFile {
    return OpenSegmentFile.create(
      this.journal.dir,
      { machine: this.state.machine, disk: this.state.disk, epoch: this.state.epoch, seq },
      this.journal.takeSpare(),
    );
  }

  // ---- modes ----

  /** Journal full: keep only which blocks changed from here on (and those of the open segment). */
  private enterBitmapMode(change: Change): void {
    const seg = this.open;
    for (const r of seg.records) {
      if (r.type !== 'marker') this.bitmap.markRange(r.offset, r.type === 'write' ? r.data.length : r.length);
    }
    this.bitmap.markRange(change.offset, change.length);
    if (this.ageTimer) clearTimeout(this.ageTimer);
    this.ageTimer = undefined;
    seg.records = [];
    // The open segment keeps its seq: the next segment after catch-up starts there.
    this.open = { ...seg, records: [], bytes: this.newOpenBytes(), file: undefined };
    this.state.mode = 'bitmap';
    this.log.warn(
      { seq: seg.seq, journalBytes: this.journal.bytes, maxJournalBytes: this.maxJournalBytes },
      'journal full: bitmap mode (dirty blocks only, no markers) until the proxy catches up',
    );
    const oldFile = seg.file;
    const saved = Promise.all([this.saveBitmap(), this.journal.saveState(this.state)]);
    const dropped = saved.then(
      () => oldFile?.discard(),
      (err: Error) =>
        this.fail(
          new JournalWriteError(`The bitmap of disk ${this.disk} could not be saved (${err.message}).`, err),
        ),
    );
    this.droppedOpenFile = Promise.all([this.droppedOpenFile, dropped]).then(
      () => undefined,
      () => undefined,
    );
    this.emit('mode', 'bitmap');
  }

  private newOpenBytes(): number {
    return encodedHeaderSize(this.state.machine, this.state.disk) + TRAILER_BYTES + MARKER_ROOM;
  }

  /**
   * Leaves bitmap mode: changes are journalled again and the bitmap's blocks become the to-do
   * list of a catch-up pass (mode `catchup`; no markers until finishSync).
   */
  async startCatchup(): Promise<void> {
    if (this.state.mode !== 'bitmap') return;
    await Promise.all([this.saveBitmap(), this.droppedOpenFile]);
    if (this.state.mode !== 'bitmap') return;
    this.open = this.newOpen(this.open.seq, true);
    this.state.mode = 'catchup';
    await this.journal.saveState(this.state);
    this.log.info(
      { dirtyBlocks: this.bitmap.count },
      'catch-up: re-reading the blocks changed in bitmap mode',
    );
    this.emit('mode', 'catchup');
  }

  /** Starts (or restarts) a checksum resync: no markers until finishSync. */
  async startResync(reason: string): Promise<void> {
    this.syncGeneration += 1;
    if (this.state.mode === 'bitmap') {
      await this.droppedOpenFile;
      if (this.state.mode === 'bitmap') this.open = this.newOpen(this.open.seq, true);
    }
    this.state.mode = 'resync';
    this.state.resyncReason = reason;
    await this.journal.saveState(this.state);
    this.log.warn({ reason }, 'disk marked for resync');
    this.emit('mode', 'resync');
  }

  /** A catch-up or resync pass completed: back to data mode, markers resume. */
  async finishSync(): Promise<void> {
    if (this.state.mode === 'bitmap' || this.state.mode === 'data') return;
    this.bitmap.clearAll();
    this.state.mode = 'data';
    delete this.state.resyncReason;
    delete this.state.awaitCloudEpoch;
    await Promise.all([this.saveBitmap(), this.journal.saveState(this.state)]);
    this.log.info('sync complete: data mode, markers resume');
    this.emit('mode', 'data');
  }

  /** Persists the bitmap; concurrent callers share one write (group commit). */
  saveBitmap(): Promise<void> {
    if (!this.bitmapSave) return this.startBitmapSave();
    if (!this.bitmapSaveNext) {
      this.bitmapSaveNext = this.bitmapSave
        .then(
          () => undefined,
          () => undefined,
        )
        .then(() => {
          this.bitmapSaveNext = undefined;
          return this.startBitmapSave();
        });
    }
    return this.bitmapSaveNext;
  }

  private startBitmapSave(): Promise<void> {
    const p = this.bitmap.save(this.bitmapPath());
    this.bitmapSave = p;
    const clear = (): void => {
      if (this.bitmapSave === p) this.bitmapSave = undefined;
    };
    p.then(clear, clear);
    return p;
  }

  private fail(err: Error): void {
    if (!this.failure) {
      this.failure = err;
      this.log.error({ err }, err.message);
      if (this.listenerCount('fault') > 0) this.emit('fault', err);
    }
  }

  /**
   * Clean stop: cuts what is open (no marker), waits for the journal, saves the bitmap and
   * marks the state clean. The exports must be closed first.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.ageTimer) clearTimeout(this.ageTimer);
    if (this.state.mode !== 'bitmap') await this.cut().catch(() => undefined);
    await this.chain;
    await this.syncSealed();
    await this.open.file?.discard();
    await this.saveBitmap();
    this.state.nextSeq = this.open.seq;
    this.state.clean = this.failure === undefined;
    await this.journal.saveState(this.state);
  }

  /**
   * A resync the cloud asked for: ends the stream's epoch and begins `epoch` at seq 1. What is
   * open in the old epoch is sealed into the journal (the shipper sends it before the new epoch,
   * the proxy uploads in order, so apply takes it before it moves on); seq 1 of the new epoch is
   * cut at once, empty, so the cloud can switch before any block is compared; the disk is in
   * `resync` mode with `awaitCloudEpoch` set. Persisted before it resolves (a restart continues
   * in the new epoch). Call it with the export paused.
   */
  async startEpoch(epoch: number, reason: string): Promise<void> {
    if (this.failure) throw this.failure;
    if (epoch <= this.state.epoch) return;
    this.syncGeneration += 1;
    const sealed =
      this.state.mode !== 'bitmap' && this.open.records.length > 0 ? this.cut() : Promise.resolve(undefined);
    if (this.ageTimer) clearTimeout(this.ageTimer);
    this.ageTimer = undefined;
    // The open segment of the old epoch (empty, or the one the cut just opened) is abandoned.
    const stale = this.open;
    if (this.state.mode === 'bitmap') {
      for (const r of stale.records)
        if (r.type !== 'marker')
          this.bitmap.markRange(r.offset, r.type === 'write' ? r.data.length : r.length);
    }
    this.state.epoch = epoch;
    this.state.nextSeq = 2;
    this.state.ackedSeq = 0;
    this.state.mode = 'resync';
    this.state.resyncReason = reason;
    this.state.awaitCloudEpoch = epoch;
    this.open = this.newOpen(2, true);
    const now = Date.now();
    const first = encodeSegment({
      header: {
        machine: this.machine,
        disk: this.disk,
        epoch,
        seq: 1,
        firstWriteTime: now,
        lastWriteTime: now,
      },
      records: [],
    });
    const done = this.chain.then(async () => {
      await stale.file?.discard();
      // Seq 1 before the state: a state in the new epoch always has its seq 1 in the journal.
      const entry = await this.journal.write(epoch, 1, first);
      await this.journal.saveState(this.state);
      this.emit('segment', entry);
    });
    this.chain = done.catch((err: Error) =>
      this.fail(
        new JournalWriteError(
          `Epoch ${epoch} of disk ${this.disk} could not be started in ${this.journal.dir} (${err.message}).`,
          err,
        ),
      ),
    );
    await sealed;
    await done;
    this.log.warn({ epoch, reason }, 'new epoch: the stream restarts at seq 1 with a resync');
    this.emit('mode', 'resync');
  }

  /**
   * Drops the open segment and every journalled segment; the stream restarts at `nextSeq`. The
   * swap is synchronous and the clean-up runs in the cut chain, so no segment numbered before the
   * reset can land in the journal after it. Call it with the export paused.
   */
  resetStream(nextSeq: number): Promise<void> {
    this.syncGeneration += 1;
    const old = this.open;
    if (this.ageTimer) clearTimeout(this.ageTimer);
    this.ageTimer = undefined;
    this.open = {
      seq: nextSeq,
      records: [],
      bytes: this.newOpenBytes(),
      firstTime: 0,
      lastTime: 0,
      file: undefined,
    };
    this.state.nextSeq = nextSeq;
    // Until the clean-up below ran, the old stream's cuts of seqs the new stream reuses are still
    // pending in the chain with their open files: segments opened meanwhile get no file of their
    // own (they are encoded from memory when cut), else the old cut would rename or delete it.
    this.resetsPending += 1;
    const done = this.chain.then(async () => {
      try {
        await old.file?.discard();
        await this.journal.clear();
      } finally {
        this.resetsPending -= 1;
      }
      const open = this.open;
      if (this.state.mode !== 'bitmap' && !open.file && this.resetsPending === 0) {
        open.file = this.openFile(open.seq);
        for (const r of open.records) {
          if (r.type === 'write')
            open.file.append({ kind: 'write', offset: r.offset, length: r.data.length, data: r.data });
          else if (r.type !== 'marker')
            open.file.append({ kind: r.type, offset: r.offset, length: r.length });
        }
      }
    });
    this.chain = done.catch(() => undefined);
    return done;
  }
}

/**
 * Whether coalescing the list pays for itself: the bytes that later changes overwrite are at
 * least 1/8 of the bytes the records cover. Only then is the segment re-encoded in memory
 * (coalesced, hashed, written as a new file); otherwise the in-place file is sealed as it is.
 * Overlapping records in a segment are valid (they apply in order, later ones win), and a
 * random-write workload overlaps a few blocks of nearly every segment: re-encoding those costs a
 * second journal write, a SHA-256 on the event loop and an fdatasync per segment to save ~1%.
 */
export function coalescingPays(records: SegmentRecord[]): boolean {
  const ranges: [number, number][] = [];
  let total = 0;
  for (const r of records) {
    if (r.type === 'marker') continue;
    const length = r.type === 'write' ? r.data.length : r.length;
    ranges.push([r.offset, r.offset + length]);
    total += length;
  }
  if (ranges.length < 2) return false;
  ranges.sort((a, b) => a[0] - b[0]);
  let covered = 0;
  let start = -1;
  let end = -1;
  for (const [s, e] of ranges) {
    if (s > end) {
      covered += end - start;
      start = s;
      end = e;
    } else if (e > end) end = e;
  }
  covered += end - start;
  return (total - covered) * 8 >= total;
}

/**
 * Turns open segments left by an unclean stop into journal segments (they hold changes that were
 * appended, some of them acknowledged to a FLUSH). Returns the seqs recovered and whether an open
 * segment was torn (records after an interrupted append dropped) or unreadable.
 */
export async function recoverOpenSegments(
  journal: SegmentJournal,
  state: DiskState,
): Promise<{ recovered: number[]; torn: boolean; damaged: boolean }> {
  const recovered: number[] = [];
  let torn = false;
  let damaged = false;
  for (const open of openSegmentFiles(journal.dir)) {
    const index = open.file.replace(/\.seg$/, '.idx');
    if (open.epoch !== state.epoch || journal.has(open.epoch, open.seq)) {
      // Already in the journal (it was renamed there, or cut from memory), or an abandoned epoch.
      await Promise.all([fs.promises.rm(open.file, { force: true }), fs.promises.rm(index, { force: true })]);
      continue;
    }
    let read: ReturnType<typeof readOpenSegment>;
    let segment: ReturnType<typeof decodeSegment> | undefined;
    try {
      read = readOpenSegment(open.file);
      segment = read.bytes ? decodeSegment(read.bytes) : undefined;
      if (segment && (segment.header.seq !== open.seq || segment.header.disk !== state.disk))
        throw new Error('header mismatch');
    } catch {
      damaged = true;
      await Promise.all([fs.promises.rm(open.file, { force: true }), fs.promises.rm(index, { force: true })]);
      continue;
    }
    torn ||= read.torn;
    if (segment && segment.records.length > 0) {
      let bytes: Buffer;
      try {
        bytes = encodeSegment({ header: segment.header, records: coalesceRecords(segment.records) });
      } catch {
        bytes = read.bytes as Buffer;
      }
      await journal.write(open.epoch, open.seq, bytes);
      recovered.push(open.seq);
      state.nextSeq = Math.max(state.nextSeq, open.seq + 1);
    }
    await Promise.all([fs.promises.rm(open.file, { force: true }), fs.promises.rm(index, { force: true })]);
  }
  // Indexes whose sealed file was renamed into the journal before a crash.
  for (const name of fs.readdirSync(journal.dir)) {
    const file = path.join(journal.dir, name);
    if (/^open-\d{8}-\d{12}\.idx$/.test(name) && !fs.existsSync(file.replace(/\.idx$/, '.seg')))
      await fs.promises.rm(file, { force: true });
  }
  return { recovered, torn, damaged };
}

export type { JournalEntry };
