import fs from 'node:fs';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';
import { crc32 } from 'node:zlib';
import { ConfigError, LifeboatError } from '../../shared/errors';
import {
  encodeSegment,
  HEADER_FIXED_BYTES,
  RANGE_RECORD_BYTES,
  RECORD_TYPE,
  TRAILER_BYTES,
  WRITE_RECORD_HEADER_BYTES,
  type MarkerRecord,
  type SegmentIdentity,
} from '../../shared/segment';
import { FileAppender, type ChangeKind } from './nbd';
import { syncDir, writeFileDurably } from './bitmap';

// A disk's on-disk journal (docs/agent.md, "Journal"): one folder per disk holding
//   state.json                the disk's replication state (mode, epoch, seqs, clean-stop flag)
//   segments/{epoch}-{seq}.seg encoded segments waiting for the proxy's acknowledgement
//   open-{epoch}-{seq}.seg    the open (not yet cut) segment, written in place; fdatasynced on FLUSH
//   open-{epoch}-{seq}.idx    a CRC-32 per record of the open segment (exact crash recovery)
//   spares/spare-{n}.seg      acknowledged segment files kept for reuse as open segments
//   bitmap.bin                the dirty-block bitmap (bitmap mode and catch-up)
//   scan.hashes               the previous scan's block hashes (scan source)

/** What a disk's replication is doing. Markers are cut only in `data` mode. */
export type DiskMode = 'data' | 'bitmap' | 'catchup' | 'resync';

export interface DiskState {
  version: 1;
  machine: string;
  disk: string;
  sizeBytes: number;
  epoch: number;
  /** Seq of the open segment: the next segment cut gets it. */
  nextSeq: number;
  /** Highest seq the proxy acknowledged (0: none yet). */
  ackedSeq: number;
  mode: DiskMode;
  /** Why the disk is in `resync` mode. */
  resyncReason?: string;
  /**
   * A resync the cloud asked for (a new epoch): the checksum comparison waits until the cloud's
   * apply has moved the disk to this epoch (docs/agent.md, "Cloud-requested resync").
   */
  awaitCloudEpoch?: number;
  /** True only between a clean stop and the next start. */
  clean: boolean;
  /** Kernel boot id of the last run (tells a process crash from a machine crash in the logs). */
  bootId?: string;
  updatedAt: string;
}

/** The journal could not be read back as written: the disk has to be resynchronised. */
export class JournalDamagedError extends LifeboatError {
  constructor(message: string) {
    super('JournalDamaged', message, { status: 500, target: 'journal' });
  }
}

export interface JournalEntry {
  epoch: number;
  seq: number;
  bytes: number;
  file: string;
}

const SEGMENT_FILE = /^(\d{8})-(\d{12})\.seg$/;

/**
 * Acknowledged segment files kept for reuse (at most this many). An open segment written over a
 * spare overwrites pages that are already in the page cache instead of allocating new ones: on
 * the dev VM a new page-cache page costs a hypervisor fault (freed guest memory is reported to the
 * host), ~3 CPU s per GiB against ~0.1 for overwriting a cached page (docs/agent.md, Throughput).
 */
const MAX_SPARES = 8;

function segmentName(epoch: number, seq: number): string {
  return `${String(epoch).padStart(8, '0')}-${String(seq).padStart(12, '0')}.seg`;
}

export function bootId(): string | undefined {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * The segment store of one disk: encoded segments in seq order, each written durably (temporary
 * file, fdatasync, rename, fsync of the folder) before it counts, and removed only after the
 * proxy acknowledged it.
 */
export class SegmentJournal {
  private readonly entries = new Map<string, JournalEntry>();
  private totalBytes = 0;
  private stateChain: Promise<void> = Promise.resolve();
  private readonly spares: string[] = [];
  /** Reads in progress, by file (such a file is never kept as a spare). */
  private readonly readers = new Map<string, number>();
  private spareCounter = 0;
  readonly segmentsDir: string;
  readonly sparesDir: string;

  private constructor(readonly dir: string) {
    this.segmentsDir = path.join(dir, 'segments');
    this.sparesDir = path.join(dir, 'spares');
  }

  static async open(dir: string): Promise<SegmentJournal> {
    try {
      fs.mkdirSync(path.join(dir, 'segments'), { recursive: true });
      // Spares of an earlier run are not reused: start with none.
      fs.rmSync(path.join(dir, 'spares'), { recursive: true, force: true });
      fs.mkdirSync(path.join(dir, 'spares'));
    } catch (err) {
      throw new ConfigError(
        `The journal folder ${dir} cannot be created (${(err as Error).message}); pass a writable --journal-dir.`,
        'journalDir',
      );
    }
    const journal = new SegmentJournal(dir);
    for (const name of fs.readdirSync(journal.segmentsDir)) {
      const m = SEGMENT_FILE.exec(name);
      const file = path.join(journal.segmentsDir, name);
      if (!m) {
        // Leftover temporary files of an interrupted write never counted.
        if (name.includes('.tmp-')) fs.rmSync(file, { force: true });
        continue;
      }
      const entry = { epoch: Number(m[1]), seq: Number(m[2]), bytes: fs.statSync(file).size, file };
      journal.entries.set(name, entry);
      journal.totalBytes += entry.bytes;
    }
    return journal;
  }

  /** Bytes of segments waiting for acknowledgement. */
  get bytes(): number {
    return this.totalBytes;
  }

  get count(): number {
    return this.entries.size;
  }

  /** Waiting segments, oldest (epoch, seq) first. */
  list(): JournalEntry[] {
    return [...this.entries.values()].sort((a, b) => a.epoch - b.epoch || a.seq - b.seq);
  }

  has(epoch: number, seq: number): boolean {
    return this.entries.has(segmentName(epoch, seq));
  }

  async write(epoch: number, seq: number, bytes: Buffer): Promise<JournalEntry> {
    const name = segmentName(epoch, seq);
    const file = path.join(this.segmentsDir, name);
    await writeFileDurably(file, bytes);
    const previous = this.entries.get(name);
    if (previous) this.totalBytes -= previous.bytes;
    const entry = { epoch, seq, bytes: bytes.length, file };
    this.entries.set(name, entry);
    this.totalBytes += entry.bytes;
    return entry;
  }

  /**
   * Takes a sealed segment file (an OpenSegmentFile) into the journal by renaming it. Neither the
   * file nor the rename is durable yet: the caller syncs them with `syncFiles` before it
   * acknowledges a FLUSH.
   */
  async adopt(epoch: number, seq: number, sealedFile: string, bytes: number): Promise<JournalEntry> {
    const name = segmentName(epoch, seq);
    const file = path.join(this.segmentsDir, name);
    await fs.promises.rename(sealedFile, file);
    const previous = this.entries.get(name);
    if (previous) this.totalBytes -= previous.bytes;
    const entry = { epoch, seq, bytes, file };
    this.entries.set(name, entry);
    this.totalBytes += bytes;
    return entry;
  }

  /** Makes adopted segment files and their names durable (one fdatasync each, one folder fsync). */
  async syncFiles(files: string[]): Promise<void> {
    await Promise.all(
      files.map(async (file) => {
        let handle: fs.promises.FileHandle;
        try {
          handle = await fs.promises.open(file, 'r');
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT') return; // acknowledged and removed already
          throw err;
        }
        try {
          await handle.datasync();
        } finally {
          await handle.close();
        }
      }),
    );
    await syncDir(this.segmentsDir);
  }

  /**
   * The segment's bytes. One positional read of the known size (readFile reads in 512 KiB pieces,
   * each a round trip through libuv's thread pool, which the NBD export keeps busy). With
   * `scratch` large enough, the bytes land in it (a view of it is returned): the shipper reuses
   * one buffer instead of allocating — and faulting in — 8 MiB per segment.
   */
  async read(entry: JournalEntry, scratch?: Buffer): Promise<Buffer> {
    // Registered before the first await: remove() then deletes the file instead of keeping it as
    // a spare, so no open segment is written over the inode this read holds. An entry already
    // removed is not opened at all (its file may be on its way to becoming a spare).
    const name = segmentName(entry.epoch, entry.seq);
    if (this.entries.get(name)?.file !== entry.file) {
      const err: NodeJS.ErrnoException = new Error(
        `Segment ${name} is no longer in the journal ${this.segmentsDir} (acknowledged or dropped).`,
      );
      err.code = 'ENOENT';
      throw err;
    }
    this.readers.set(entry.file, (this.readers.get(entry.file) ?? 0) + 1);
    try {
      return await this.readFile(entry.file, scratch);
    } finally {
      const left = (this.readers.get(entry.file) ?? 1) - 1;
      if (left > 0) this.readers.set(entry.file, left);
      else this.readers.delete(entry.file);
    }
  }

  private async readFile(file: string, scratch?: Buffer): Promise<Buffer> {
    const handle = await fs.promises.open(file, 'r');
    try {
      const size = (await handle.stat()).size;
      const out = scratch && scratch.length >= size ? scratch.subarray(0, size) : Buffer.allocUnsafe(size);
      let at = 0;
      while (at < size) {
        const { bytesRead } = await handle.read(out, at, size - at, at);
        if (bytesRead === 0) return out.subarray(0, at);
        at += bytesRead;
      }
      return out;
    } finally {
      await handle.close();
    }
  }

  async remove(entry: JournalEntry): Promise<void> {
    const name = segmentName(entry.epoch, entry.seq);
    if (!this.entries.delete(name)) return;
    this.totalBytes -= entry.bytes;
    // A file being read is deleted, not reused: the reader's descriptor keeps its bytes intact.
    if (this.spares.length < MAX_SPARES && !this.readers.has(entry.file)) {
      const spare = path.join(this.sparesDir, `spare-${++this.spareCounter}.seg`);
      try {
        await fs.promises.rename(entry.file, spare);
        this.spares.push(spare);
        return;
      } catch {
        // Not kept for reuse; removed below.
      }
    }
    await fs.promises.rm(entry.file, { force: true });
  }

  /** A spare file to write the next open segment over (its old bytes are overwritten), if any. */
  takeSpare(): string | undefined {
    return this.spares.pop();
  }

  /** Removes every segment (a resync starts a new epoch; the old stream is abandoned). */
  async clear(): Promise<void> {
    for (const e of this.list()) await this.remove(e);
    await syncDir(this.segmentsDir);
  }

  statePath(): string {
    return path.join(this.dir, 'state.json');
  }

  loadState(): DiskState | undefined {
    let text: string;
    try {
      text = fs.readFileSync(this.statePath(), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const state = JSON.parse(text) as DiskState;
      if (
        state.version !== 1 ||
        !Number.isSafeInteger(state.nextSeq) ||
        !Number.isSafeInteger(state.ackedSeq)
      )
        throw new Error('bad fields');
      return state;
    } catch (err) {
      throw new JournalDamagedError(
        `The disk state file ${this.statePath()} is damaged (${(err as Error).message}); the disk needs a resync.`,
      );
    }
  }

  /** Saves the state durably; saves run one after another, each writing the state as it is then. */
  saveState(state: DiskState): Promise<void> {
    const run = this.stateChain.then(() =>
      writeFileDurably(
        this.statePath(),
        JSON.stringify({ ...state, updatedAt: new Date().toISOString() }, null, 2),
      ),
    );
    this.stateChain = run.catch(() => undefined);
    return run;
  }
}

// ---- the open segment, written in place ----

const OPEN_FILE = /^open-(\d{8})-(\d{12})\.seg$/;

export function openSegmentName(epoch: number, seq: number): string {
  return `open-${String(epoch).padStart(8, '0')}-${String(seq).padStart(12, '0')}.seg`;
}

function indexName(segmentFile: string): string {
  return segmentFile.replace(/\.seg$/, '.idx');
}

/** Bytes of an encoded segment's header for these names (the codec's own rule, via an empty segment). */
function headerBytes(
  identity: SegmentIdentity,
  firstWriteTime: number,
  lastWriteTime: number,
  recordCount: number,
  payloadBytes: number,
): Buffer {
  const empty = encodeSegment({ header: { ...identity, firstWriteTime, lastWriteTime }, records: [] });
  const header = Buffer.from(empty.subarray(0, empty.length - TRAILER_BYTES));
  // recordCount and payloadBytes (docs/segment-format.md, "Header").
  header.writeUInt32LE(recordCount, 40);
  header.writeUInt32LE(payloadBytes, 44);
  return header;
}

function writeRecordBytes(change: OpenChange): Buffer {
  if (change.kind === 'write') {
    const h = Buffer.allocUnsafe(WRITE_RECORD_HEADER_BYTES);
    h[0] = RECORD_TYPE.write;
    h.writeUIntLE(change.offset, 1, 6);
    h.writeUInt16LE(0, 7);
    h.writeUInt32LE(change.length, 9);
    return h;
  }
  const h = Buffer.allocUnsafe(RANGE_RECORD_BYTES);
  h[0] = RECORD_TYPE[change.kind];
  h.writeUIntLE(change.offset, 1, 6);
  h.writeUInt16LE(0, 7);
  h.writeUIntLE(change.length, 9, 6);
  h.writeUInt16LE(0, 15);
  return h;
}

export interface OpenChange {
  kind: ChangeKind;
  offset: number;
  length: number;
  data?: Buffer;
}

/**
 * The open segment of a disk, written as its final journal file while changes arrive: a
 * provisional header (zero totals), then each record in the segment encoding, appended without
 * copying the data. A side index holds a CRC-32 per record, so recovery after a crash keeps
 * exactly the records whose bytes are intact. A FLUSH fdatasyncs both files; the cut writes
 * the marker, patches the header's totals and times, appends the SHA-256 trailer (hashed off the
 * main thread) and fdatasyncs — then the journal renames the file into `segments/`.
 */
export class OpenSegmentFile {
  private readonly out: FileAppender;
  private readonly index: FileAppender;
  private readonly headerLength: number;
  private records = 0;
  private closed = false;
  /** For a reused spare: its rename into place, made durable by the first FLUSH that counts on it. */
  private placed: Promise<void> | undefined;

  private constructor(
    readonly file: string,
    readonly identity: SegmentIdentity,
    private readonly fd: number,
    private readonly indexFd: number,
    private readonly reused: boolean,
  ) {
    const header = headerBytes(identity, 0, 0, 0, 0);
    this.headerLength = header.length;
    this.out = new FileAppender(fd, 0);
    this.index = new FileAppender(indexFd, 0);
    this.out.append(header);
  }

  /**
   * Creates the open segment's files. With `spare` (an acknowledged segment file) the segment is
   * written over it: old bytes past what is written are never read as records (recovery stops at
   * the new index, which always starts empty), and the seal truncates the file to the segment.
   */
  static create(dir: string, identity: SegmentIdentity, spare?: string): OpenSegmentFile {
    const file = path.join(dir, openSegmentName(identity.epoch, identity.seq));
    let fd: number | undefined;
    if (spare) {
      try {
        fs.renameSync(spare, file);
        fd = fs.openSync(file, 'r+');
      } catch {
        fd = undefined;
      }
    }
    const reused = fd !== undefined;
    fd ??= fs.openSync(file, 'w+');
    const indexFd = fs.openSync(indexName(file), 'w');
    return new OpenSegmentFile(file, identity, fd, indexFd, reused);
  }

  /** Bytes appended (header and records). */
  get bytes(): number {
    return this.out.appended;
  }

  get pendingBytes(): number {
    return this.out.pendingBytes;
  }

  append(change: OpenChange): void {
    const head = writeRecordBytes(change);
    let crc = crc32(head);
    if (change.kind === 'write' && change.data) {
      crc = crc32(change.data, crc);
      this.out.append(head, change.data);
    } else this.out.append(head);
    this.addIndex(crc);
  }

  appendMarker(marker: MarkerRecord): void {
    const one = encodeSegment({
      header: { ...this.identity, firstWriteTime: 0, lastWriteTime: 0 },
      records: [marker],
    });
    const bytes = Buffer.from(one.subarray(this.headerLength, one.length - TRAILER_BYTES));
    this.out.append(bytes);
    this.addIndex(crc32(bytes));
  }

  private addIndex(crc: number): void {
    const entry = Buffer.allocUnsafe(4);
    entry.writeUInt32LE(crc, 0);
    this.index.append(entry);
    this.records += 1;
  }

  /** Resolves once the first `target` bytes are handed to the kernel (backpressure). */
  waitWritten(target: number): Promise<void> {
    return this.out.waitWritten(target);
  }

  /** Resolves once every record appended before the call is durable. */
  async sync(): Promise<void> {
    if (this.closed) return;
    // Overwriting a file in place does not commit its rename, as a new file's allocation would.
    if (this.reused && !this.placed) {
      const placed = syncDir(path.dirname(this.file));
      this.placed = placed;
      placed.catch(() => {
        if (this.placed === placed) this.placed = undefined; // the next FLUSH tries again
      });
    }
    await Promise.all([this.out.sync(), this.index.sync(), this.placed]);
  }

  /** Completes the file as an encoded segment (not yet durable: see syncFiles); returns its size. */
  async seal(firstWriteTime: number, lastWriteTime: number): Promise<number> {
    await this.out.waitWritten();
    const payload = this.out.appended - this.headerLength;
    const header = headerBytes(this.identity, firstWriteTime, lastWriteTime, this.records, payload);
    await writeAt(this.fd, header, 0);
    const total = this.out.appended;
    // Read back and hashed on a worker thread: the event loop neither copies nor hashes 8 MiB.
    const digest = await hashFilePrefix(this.fd, total);
    await writeAt(this.fd, digest, total);
    if (this.reused) await truncate(this.fd, total + TRAILER_BYTES);
    // No fdatasync here: the segmenter syncs sealed segments in batches, at the next FLUSH (or stop).
    // The index stays until the file is renamed into the journal (removeIndex): a crash before
    // that recovers the records from the open file through it, as before the seal.
    await this.close();
    return total + TRAILER_BYTES;
  }

  /** Deletes the side index; call it once the sealed file is in the journal under its final name. */
  async removeIndex(): Promise<void> {
    await fs.promises.rm(indexName(this.file), { force: true });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await Promise.all([this.out.waitWritten(), this.index.waitWritten()]).catch(() => undefined);
    this.closed = true;
    await Promise.all(
      [this.fd, this.indexFd].map((fd) => new Promise<void>((resolve) => fs.close(fd, () => resolve()))),
    );
  }

  /** Closes and deletes the files (the changes are in a segment now, or abandoned). */
  async discard(): Promise<void> {
    await this.close();
    await Promise.all([
      fs.promises.rm(this.file, { force: true }),
      fs.promises.rm(indexName(this.file), { force: true }),
    ]);
  }
}

function truncate(fd: number, length: number): Promise<void> {
  return new Promise((resolve, reject) => fs.ftruncate(fd, length, (err) => (err ? reject(err) : resolve())));
}

function writeAt(fd: number, data: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fs.write(fd, data, 0, data.length, position, (err, n) =>
      err ? reject(err) : n === data.length ? resolve() : reject(new Error('short write')),
    ),
  );
}

// ---- SHA-256 of a file prefix, on a worker thread ----

// The worker reads the sealed file (through the page cache, by descriptor: descriptors are
// per process) in 1 MiB pieces and hashes them. The event loop only posts the request: webcrypto's
// digest would copy the whole segment on the event loop first, and reading it back there means an
// 8 MiB allocation per cut.
const HASH_WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const fs = require('node:fs');
const { createHash } = require('node:crypto');
const piece = Buffer.allocUnsafe(1024 * 1024);
parentPort.on('message', ({ id, fd, length }) => {
  try {
    const hash = createHash('sha256');
    let at = 0;
    while (at < length) {
      const n = fs.readSync(fd, piece, 0, Math.min(piece.length, length - at), at);
      if (n === 0) throw new Error('the open segment file is shorter than what was written to it');
      hash.update(piece.subarray(0, n));
      at += n;
    }
    parentPort.postMessage({ id, digest: hash.digest() });
  } catch (err) {
    parentPort.postMessage({ id, error: String(err && err.message || err) });
  }
});
`;

interface HashJob {
  resolve: (digest: Buffer) => void;
  reject: (err: Error) => void;
}

let hashWorker: Worker | undefined;
let hashJobs = new Map<number, HashJob>();
let hashJobId = 0;

function startHashWorker(): Worker {
  const worker = new Worker(HASH_WORKER_SOURCE, { eval: true });
  worker.unref();
  const failAll = (err: Error): void => {
    if (hashWorker === worker) hashWorker = undefined;
    const jobs = hashJobs;
    hashJobs = new Map();
    for (const job of jobs.values()) job.reject(err);
  };
  worker.on('message', (m: { id: number; digest?: Uint8Array; error?: string }) => {
    const job = hashJobs.get(m.id);
    if (!job) return;
    hashJobs.delete(m.id);
    if (hashJobs.size === 0) worker.unref();
    if (m.digest) job.resolve(Buffer.from(m.digest.buffer, m.digest.byteOffset, m.digest.byteLength));
    else job.reject(new Error(m.error ?? 'the hash worker failed'));
  });
  worker.on('error', failAll);
  worker.on('exit', (code) => failAll(new Error(`the hash worker exited (code ${code})`)));
  return worker;
}

/** SHA-256 of the first `length` bytes of the open file `fd`, computed on a worker thread. */
export function hashFilePrefix(fd: number, length: number): Promise<Buffer> {
  const worker = (hashWorker ??= startHashWorker());
  const id = ++hashJobId;
  return new Promise<Buffer>((resolve, reject) => {
    hashJobs.set(id, { resolve, reject });
    // Referenced while a job is pending, so a process waiting only for a cut does not exit.
    worker.ref();
    worker.postMessage({ id, fd, length });
  });
}

/**
 * Reads back an open segment left by an unclean stop: the records whose bytes match their index
 * CRC, in order, up to the first that does not (an interrupted append: never acknowledged, since a
 * FLUSH fdatasyncs both files first). Bytes past the last indexed record are never records (an
 * append whose index entry was not written, or the old bytes of a reused spare file). `torn` says
 * indexed records were dropped. The result is a valid
 * encoded segment (header totals patched, trailer computed), or undefined when the header itself
 * is not there.
 */
export function readOpenSegment(file: string): { bytes: Buffer | undefined; records: number; torn: boolean } {
  const data = fs.readFileSync(file);
  let index: Buffer;
  try {
    index = fs.readFileSync(indexName(file));
  } catch {
    index = Buffer.alloc(0);
  }
  if (data.length < HEADER_FIXED_BYTES) return { bytes: undefined, records: 0, torn: data.length > 0 };
  const headerLength = HEADER_FIXED_BYTES + data[48] + data[49];
  if (data.length < headerLength) return { bytes: undefined, records: 0, torn: true };
  // A reused spare whose new header was not written yet still starts with its old one: nothing of
  // this segment was written after it (the header is the file's first append).
  const named = OPEN_FILE.exec(path.basename(file));
  if (
    named &&
    (Number(data.readBigUInt64LE(8)) !== Number(named[1]) ||
      Number(data.readBigUInt64LE(16)) !== Number(named[2]))
  )
    return { bytes: undefined, records: 0, torn: index.length > 0 };
  let at = headerLength;
  let count = 0;
  while (at < data.length && (count + 1) * 4 <= index.length) {
    const type = data[at];
    let size = 0;
    if (type === RECORD_TYPE.write && at + WRITE_RECORD_HEADER_BYTES <= data.length)
      size = WRITE_RECORD_HEADER_BYTES + data.readUInt32LE(at + 9);
    else if (
      (type === RECORD_TYPE.zero || type === RECORD_TYPE.trim) &&
      at + RANGE_RECORD_BYTES <= data.length
    )
      size = RANGE_RECORD_BYTES;
    else if (type === RECORD_TYPE.marker && at + 13 <= data.length)
      size = 13 + data[at + 10] + data.readUInt16LE(at + 11);
    if (
      size === 0 ||
      at + size > data.length ||
      crc32(data.subarray(at, at + size)) !== index.readUInt32LE(count * 4)
    )
      break;
    at += size;
    count += 1;
  }
  const torn = count < Math.floor(index.length / 4);
  const now = Date.now();
  const epoch = Number(data.readBigUInt64LE(8));
  const seq = Number(data.readBigUInt64LE(16));
  const machine = data.toString('latin1', HEADER_FIXED_BYTES, HEADER_FIXED_BYTES + data[48]);
  const disk = data.toString('latin1', HEADER_FIXED_BYTES + data[48], headerLength);
  const header = headerBytes({ machine, disk, epoch, seq }, now, now, count, at - headerLength);
  const body = Buffer.concat([header, data.subarray(headerLength, at)]);
  const bytes = Buffer.concat([body, createHash('sha256').update(body).digest()]);
  return { bytes, records: count, torn };
}

/** Open segments left by an earlier run, oldest first. */
export function openSegmentFiles(dir: string): { epoch: number; seq: number; file: string }[] {
  const out: { epoch: number; seq: number; file: string }[] = [];
  for (const name of fs.readdirSync(dir)) {
    const m = OPEN_FILE.exec(name);
    if (m) out.push({ epoch: Number(m[1]), seq: Number(m[2]), file: path.join(dir, name) });
  }
  return out.sort((a, b) => a.epoch - b.epoch || a.seq - b.seq);
}
