import crypto, { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import { Worker } from 'node:worker_threads';
import { LifeboatError } from '../../shared/errors';
import type { DiskSegmenter } from './segmenter';

// Initial replication, resynchronisation and bitmap catch-up are one mechanism: decide which
// blocks the cloud copy may lack, re-read them while the disk is paused (so the record takes its
// place in the write order exactly where the bytes were read), and append them to the disk's
// change stream. New writes keep flowing into the same stream; no marker is cut until the pass
// completes (the segmenter refuses markers outside data mode).

/** Checksums of the cloud copy of a disk: SHA-256 of each `blockSize` block. */
export interface RemoteChecksums {
  readonly blockSize: number;
  /** One 32-byte SHA-256 per block of `[offset, offset+length)` (offset block-aligned; the last block may be short). */
  checksums(range: { offset: number; length: number }): Promise<Buffer[]>;
  /** A new pass begins: forget whatever was fetched for an earlier one (the cloud may have changed). */
  restart?(): void;
}

/** SHA-256 of one block (the one-shot crypto.hash, Node ≥ 20.12, skips a Hash object per block). */
export const blockChecksum: (block: Buffer) => Buffer =
  typeof crypto.hash === 'function'
    ? (block) => crypto.hash('sha256', block, 'buffer')
    : (block) => createHash('sha256').update(block).digest();

const zeroSums = new Map<number, Buffer>();
/** SHA-256 of `length` zero bytes (cached). */
export function zeroChecksum(length: number): Buffer {
  let sum = zeroSums.get(length);
  if (!sum) {
    sum = blockChecksum(Buffer.alloc(length));
    zeroSums.set(length, sum);
  }
  return sum;
}

/** A cloud copy that does not exist yet: every block reads as zeros. */
export class EmptyDiskChecksums implements RemoteChecksums {
  constructor(readonly blockSize = 64 * 1024) {}

  async checksums(range: { offset: number; length: number }): Promise<Buffer[]> {
    const out: Buffer[] = [];
    for (let at = range.offset; at < range.offset + range.length; at += this.blockSize) {
      out.push(zeroChecksum(Math.min(this.blockSize, range.offset + range.length - at)));
    }
    return out;
  }
}

/** No knowledge of the cloud copy: every block differs (a full copy, zero blocks as zero records). */
export class UnknownCloudChecksums implements RemoteChecksums {
  constructor(readonly blockSize = 64 * 1024) {}

  checksums(): Promise<Buffer[]> {
    return Promise.resolve([]);
  }
}

/**
 * The local stand-in for the cloud endpoint: checksums of another image file (a copy of the disk
 * as the cloud holds it). Bytes past the file's end read as zeros.
 */
export class ImageFileChecksums implements RemoteChecksums {
  constructor(
    readonly path: string,
    readonly blockSize = 64 * 1024,
  ) {}

  async checksums(range: { offset: number; length: number }): Promise<Buffer[]> {
    const handle = await fs.promises.open(this.path, 'r').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
    const buf = Buffer.alloc(range.length);
    if (handle) {
      try {
        let done = 0;
        while (done < range.length) {
          const { bytesRead } = await handle.read(buf, done, range.length - done, range.offset + done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
      } finally {
        await handle.close();
      }
    }
    const sums = await hashBlocks(buf, range.length, this.blockSize);
    const out: Buffer[] = [];
    for (let at = 0; at < sums.length; at += 32) out.push(sums.subarray(at, at + 32));
    return out;
  }
}

// ---- SHA-256 of each block of a chunk, on worker threads ----

// A resync hashes the whole disk; on the event loop that would stall the NBD export (~6 ms per
// 8 MiB) and leave the other cores idle. The chunk's memory is transferred to a worker (no copy)
// and hashed there in blockSize slices.
const BLOCK_HASH_WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const crypto = require('node:crypto');
const sha256 = crypto.hash
  ? (b) => crypto.hash('sha256', b, 'buffer')
  : (b) => crypto.createHash('sha256').update(b).digest();
parentPort.on('message', ({ id, data, length, blockSize }) => {
  const buf = Buffer.from(data.buffer, data.byteOffset, length);
  const sums = new Uint8Array(Math.ceil(length / blockSize) * 32);
  for (let at = 0, i = 0; at < length; at += blockSize, i++)
    sums.set(sha256(buf.subarray(at, Math.min(length, at + blockSize))), i * 32);
  parentPort.postMessage({ id, sums }, [sums.buffer]);
});
`;

/** Chunks smaller than this are hashed on the calling thread (a round trip costs more). */
const INLINE_HASH_BYTES = 256 * 1024;

interface BlockHashJob {
  resolve: (sums: Buffer) => void;
  reject: (err: Error) => void;
}

interface BlockHashWorker {
  worker: Worker;
  jobs: Map<number, BlockHashJob>;
}

const hashWorkers: BlockHashWorker[] = [];
let hashJobId = 0;

/**
 * Worker threads for block hashing: one per core, at most 4. They only hash (the event loop keeps
 * reading and serving NBD), and only while a resync runs; on 2 cores the second thread is what
 * lets the local side keep up with the cloud's answers (docs/reprotect.md, "Benchmark").
 */
export function defaultHashThreads(): number {
  return Math.max(1, Math.min(4, os.availableParallelism()));
}

function startBlockHashWorker(): BlockHashWorker {
  const w: BlockHashWorker = {
    worker: new Worker(BLOCK_HASH_WORKER_SOURCE, { eval: true }),
    jobs: new Map(),
  };
  w.worker.unref();
  const failAll = (err: Error): void => {
    const at = hashWorkers.indexOf(w);
    if (at >= 0) hashWorkers.splice(at, 1);
    const jobs = [...w.jobs.values()];
    w.jobs.clear();
    for (const job of jobs) job.reject(err);
  };
  w.worker.on('message', (m: { id: number; sums: Uint8Array }) => {
    const job = w.jobs.get(m.id);
    if (!job) return;
    w.jobs.delete(m.id);
    if (w.jobs.size === 0) w.worker.unref();
    job.resolve(Buffer.from(m.sums.buffer, m.sums.byteOffset, m.sums.byteLength));
  });
  w.worker.on('error', failAll);
  w.worker.on('exit', (code) => failAll(new Error(`a block hash worker exited (code ${code})`)));
  return w;
}

/**
 * SHA-256 of each `blockSize` slice of `data[0, length)` (the last may be short), 32 bytes each,
 * back to back. A large chunk is hashed on a worker thread: if `data` owns its whole ArrayBuffer
 * (a fresh large allocation, as SyncDevice.read returns) it is transferred, and unusable
 * afterwards; otherwise it is copied first.
 */
export function hashBlocks(
  data: Buffer,
  length: number,
  blockSize: number,
  options: { threads?: number } = {},
): Promise<Buffer> {
  if (length < INLINE_HASH_BYTES) {
    const sums = Buffer.allocUnsafe(Math.ceil(length / blockSize) * 32);
    for (let at = 0, i = 0; at < length; at += blockSize, i++)
      blockChecksum(data.subarray(at, Math.min(length, at + blockSize))).copy(sums, i * 32);
    return Promise.resolve(sums);
  }
  const owned = data.byteOffset === 0 && data.byteLength === data.buffer.byteLength;
  const chunk = owned ? data : Buffer.from(data.subarray(0, length));
  const threads = Math.max(1, options.threads ?? defaultHashThreads());
  while (hashWorkers.length < threads) hashWorkers.push(startBlockHashWorker());
  // The least busy of the first `threads` workers.
  let w = hashWorkers[0];
  for (let i = 1; i < threads; i++) if (hashWorkers[i].jobs.size < w.jobs.size) w = hashWorkers[i];
  const id = ++hashJobId;
  return new Promise<Buffer>((resolve, reject) => {
    w.jobs.set(id, { resolve, reject });
    // Referenced while a job is pending, so a process waiting only for a resync does not exit.
    w.worker.ref();
    const view = new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    w.worker.postMessage({ id, data: view, length, blockSize }, [view.buffer as ArrayBuffer]);
  });
}

/** What a sync pass reads from and pauses: the NBD export of the disk, or the raw file for scans. */
export interface SyncDevice {
  readonly size: number;
  /** A new buffer the pass owns from then on (a resync hands it to a hashing thread). */
  read(offset: number, length: number): Promise<Buffer>;
  /** Holds new writes and resolves once those in flight are done (no-op without interposition). */
  pause(): Promise<void>;
  resume(): void;
}

export interface SyncProgress {
  kind: 'resync' | 'catchup';
  totalBytes: number;
  /** Bytes examined (compared, or dirty blocks visited). */
  doneBytes: number;
  /** Bytes appended to the change stream (writes), and of those sent as zero records. */
  shippedBytes: number;
  zeroBytes: number;
  percent: number;
  bytesPerSecond: number;
  etaSeconds: number | null;
  startedAt: number;
}

/** A sync pass stopped because the agent is stopping or the disk left the pass's mode. */
export class SyncInterruptedError extends LifeboatError {
  constructor(message: string) {
    super('SyncInterrupted', message, { status: 503 });
  }
}

export interface SyncPassOptions {
  device: SyncDevice;
  segmenter: DiskSegmenter;
  /** Bytes compared per step (resync: default 8 MiB, read and hashed as one; catch-up: 1 MiB). */
  chunkBytes?: number;
  onProgress?: (p: SyncProgress) => void;
  /** Checked between steps; true stops the pass. */
  shouldStop?: () => boolean;
  /** Called before appending `bytes`; waits while the journal is too full (sync data is throttled, guest writes never are). */
  waitForRoom?: (bytes: number) => Promise<void>;
}

const ZEROS = Buffer.alloc(1024 * 1024);

export function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZEROS.length) {
    const n = Math.min(ZEROS.length, buf.length - at);
    if (!buf.subarray(at, at + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
}

class Progress {
  readonly p: SyncProgress;
  private lastEmit = 0;

  constructor(
    kind: SyncProgress['kind'],
    totalBytes: number,
    private readonly onProgress?: (p: SyncProgress) => void,
  ) {
    this.p = {
      kind,
      totalBytes,
      doneBytes: 0,
      shippedBytes: 0,
      zeroBytes: 0,
      percent: 0,
      bytesPerSecond: 0,
      etaSeconds: null,
      startedAt: Date.now(),
    };
  }

  update(force = false): void {
    const p = this.p;
    const elapsed = Math.max(0.001, (Date.now() - p.startedAt) / 1000);
    p.percent = p.totalBytes === 0 ? 100 : Math.min(100, (100 * p.doneBytes) / p.totalBytes);
    p.bytesPerSecond = p.doneBytes / elapsed;
    p.etaSeconds = p.bytesPerSecond > 0 ? (p.totalBytes - p.doneBytes) / p.bytesPerSecond : null;
    const now = Date.now();
    if (force || now - this.lastEmit >= 200) {
      this.lastEmit = now;
      this.onProgress?.({ ...p });
    }
  }
}

/**
 * Re-reads `[offset, offset+length)` while the disk is paused and appends it, block by block, to
 * the change stream: all-zero blocks as zero records, others as writes.
 */
async function appendConsistent(
  opts: SyncPassOptions,
  offset: number,
  length: number,
  blockSize: number,
  progress: Progress,
): Promise<void> {
  await opts.waitForRoom?.(length);
  const { device, segmenter } = opts;
  await device.pause();
  let accepted: (Promise<void> | void)[] = [];
  try {
    const data = await device.read(offset, length);
    for (let at = 0; at < length; at += blockSize) {
      const n = Math.min(blockSize, length - at);
      const block = data.subarray(at, at + n);
      if (isZero(block)) {
        accepted.push(segmenter.append({ kind: 'zero', offset: offset + at, length: n }));
        progress.p.zeroBytes += n;
      } else {
        accepted.push(segmenter.append({ kind: 'write', offset: offset + at, length: n, data: block }));
      }
      progress.p.shippedBytes += n;
    }
  } finally {
    device.resume();
  }
  await Promise.all(accepted);
  accepted = [];
}

export interface ResyncOptions extends SyncPassOptions {
  remote: RemoteChecksums;
  /** Chunks read and hashed ahead of the comparison (default 4). */
  readAhead?: number;
  /** Worker threads hashing the local side (default: one per core, at most 4). */
  hashThreads?: number;
}

/** Bytes re-read under one pause, at most (rounded down to whole blocks). */
const APPEND_BYTES = 1024 * 1024;

interface ResyncStep {
  offset: number;
  length: number;
  /** 32-byte SHA-256 of each local block, back to back. */
  local: Promise<Buffer>;
  theirs: Promise<Buffer[]>;
}

/**
 * Compares every block of the disk with the cloud copy's checksums and ships those that differ.
 * Resolves once every block was compared (the caller then calls segmenter.finishSync()).
 *
 * A pipeline: `readAhead` chunks are read and hashed on worker threads while
 * the cloud's checksums are fetched and earlier chunks are compared, so the disk, the hashing
 * threads and the link are all busy at once. Blocks that differ are read again under pause before
 * they are appended (the first read was not ordered with the guest's writes).
 */
export async function runResync(opts: ResyncOptions): Promise<SyncProgress> {
  const { device, remote, segmenter } = opts;
  const blockSize = remote.blockSize;
  if (blockSize % 512 !== 0 || blockSize <= 0)
    throw new LifeboatError(
      'InvalidChecksums',
      `The remote checksum block size ${blockSize} is not a multiple of 512.`,
    );
  const chunk = Math.max(blockSize, Math.floor((opts.chunkBytes ?? 8 * 1024 * 1024) / blockSize) * blockSize);
  const depth = Math.max(1, opts.readAhead ?? 4);
  const piece = Math.max(blockSize, Math.floor(APPEND_BYTES / blockSize) * blockSize);
  const progress = new Progress('resync', device.size, opts.onProgress);
  // A stream reset (segments dropped), a new epoch or a new resync request during the pass
  // invalidates what was compared so far: the pass stops and the next one starts from the top.
  const generation = segmenter.syncGeneration;
  remote.restart?.();
  const steps: ResyncStep[] = [];
  let nextOffset = 0;
  // The remote side is asked one range at a time, in order (ApiChecksums fetches ahead itself).
  let remoteChain: Promise<unknown> = Promise.resolve();
  const launch = (): void => {
    while (steps.length < depth && nextOffset < device.size) {
      const offset = nextOffset;
      const length = Math.min(chunk, device.size - offset);
      nextOffset += length;
      const local = device
        .read(offset, length)
        .then((buf) => hashBlocks(buf, length, blockSize, { threads: opts.hashThreads }));
      const theirs = remoteChain.then(() => remote.checksums({ offset, length }));
      remoteChain = theirs.catch(() => undefined);
      // Failures surface when the step is compared; until then they are not unhandled.
      local.catch(() => undefined);
      theirs.catch(() => undefined);
      steps.push({ offset, length, local, theirs });
    }
  };

  launch();
  while (steps.length > 0) {
    const { offset, length, local, theirs } = steps.shift()!;
    if (opts.shouldStop?.() || segmenter.mode !== 'resync' || segmenter.syncGeneration !== generation) {
      throw new SyncInterruptedError(
        `The resync of disk ${segmenter.disk} stopped at byte ${offset} (mode ${segmenter.mode}${segmenter.syncGeneration !== generation ? ', the stream was reset or the resync requested again' : ''}).`,
      );
    }
    launch();
    const [ours, cloud] = await Promise.all([local, theirs]);
    // Runs of differing blocks, re-read under pause and appended (block `count` ends the last run).
    const count = Math.ceil(length / blockSize);
    let runStart = -1;
    for (let i = 0; i <= count; i++) {
      const same =
        i === count || (cloud[i] !== undefined && ours.compare(cloud[i], 0, 32, i * 32, i * 32 + 32) === 0);
      if (!same && runStart < 0) runStart = i;
      if (same && runStart >= 0) {
        // In pieces of at most 1 MiB: the guest's writes wait while a piece is read.
        const end = Math.min(length, i * blockSize);
        for (let from = runStart * blockSize; from < end; from += piece) {
          const n = Math.min(piece, end - from);
          await appendConsistent(opts, offset + from, n, blockSize, progress);
        }
        runStart = -1;
      }
    }
    progress.p.doneBytes += length;
    progress.update();
  }
  if (segmenter.syncGeneration !== generation)
    throw new SyncInterruptedError(
      `The resync of disk ${segmenter.disk} must start over: the stream was reset or the resync requested again.`,
    );
  progress.update(true);
  return progress.p;
}

/** Ships every block marked in the segmenter's bitmap (changed while in bitmap mode). */
export async function runCatchup(opts: SyncPassOptions): Promise<SyncProgress> {
  const { segmenter } = opts;
  const bitmap = segmenter.bitmap;
  const blocksPerStep = Math.max(1, Math.floor((opts.chunkBytes ?? 1024 * 1024) / bitmap.blockSize));
  const progress = new Progress('catchup', bitmap.dirtyBytes, opts.onProgress);
  for (;;) {
    const next = bitmap.runs(blocksPerStep).next();
    if (next.done) break;
    if (opts.shouldStop?.() || segmenter.mode !== 'catchup') {
      throw new SyncInterruptedError(
        `The catch-up of disk ${segmenter.disk} stopped with ${bitmap.count} blocks left (mode ${segmenter.mode}).`,
      );
    }
    const [block, blocks] = next.value;
    const { offset, length } = bitmap.range(block, blocks);
    // Cleared first: if the journal overflows again, bitmap mode re-marks what was not kept.
    for (let b = block; b < block + blocks; b++) bitmap.clear(b);
    try {
      await appendConsistent(opts, offset, length, bitmap.blockSize, progress);
    } catch (err) {
      bitmap.markRange(offset, length);
      throw err;
    }
    progress.p.doneBytes += length;
    progress.update();
  }
  progress.update(true);
  return progress.p;
}
