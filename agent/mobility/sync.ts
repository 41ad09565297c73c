import { createHash } from 'node:crypto';
import fs from 'node:fs';
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
}

export function blockChecksum(block: Buffer): Buffer {
  return createHash('sha256').update(block).digest();
}

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
    const buf = Buffer.alloc(range.length);
    const handle = await fs.promises.open(this.path, 'r').catch((err: NodeJS.ErrnoException) => {
      if (err.code === 'ENOENT') return undefined;
      throw err;
    });
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
    const out: Buffer[] = [];
    for (let at = 0; at < range.length; at += this.blockSize)
      out.push(blockChecksum(buf.subarray(at, Math.min(range.length, at + this.blockSize))));
    return out;
  }
}

/** What a sync pass reads from and pauses: the NBD export of the disk, or the raw file for scans. */
export interface SyncDevice {
  readonly size: number;
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
  /** Bytes compared per step (default 1 MiB). */
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

/**
 * Compares every block of the disk with the cloud copy's checksums and ships those that differ.
 * Resolves once every block was compared (the caller then calls segmenter.finishSync()).
 */
export async function runResync(opts: SyncPassOptions & { remote: RemoteChecksums }): Promise<SyncProgress> {
  const { device, remote, segmenter } = opts;
  const blockSize = remote.blockSize;
  if (blockSize % 512 !== 0 || blockSize <= 0)
    throw new LifeboatError(
      'InvalidChecksums',
      `The remote checksum block size ${blockSize} is not a multiple of 512.`,
    );
  const chunk = Math.max(blockSize, Math.floor((opts.chunkBytes ?? 1024 * 1024) / blockSize) * blockSize);
  const progress = new Progress('resync', device.size, opts.onProgress);
  for (let offset = 0; offset < device.size; offset += chunk) {
    if (opts.shouldStop?.() || segmenter.mode !== 'resync') {
      throw new SyncInterruptedError(
        `The resync of disk ${segmenter.disk} stopped at byte ${offset} (mode ${segmenter.mode}).`,
      );
    }
    const length = Math.min(chunk, device.size - offset);
    const [local, theirs] = await Promise.all([
      device.read(offset, length),
      remote.checksums({ offset, length }),
    ]);
    // Runs of differing blocks, re-read under pause and appended.
    let runStart = -1;
    const flushRun = async (end: number): Promise<void> => {
      if (runStart < 0) return;
      await appendConsistent(opts, offset + runStart, end - runStart, blockSize, progress);
      runStart = -1;
    };
    for (let at = 0, i = 0; at < length; at += blockSize, i++) {
      const n = Math.min(blockSize, length - at);
      const same = theirs[i] !== undefined && blockChecksum(local.subarray(at, at + n)).equals(theirs[i]);
      if (!same && runStart < 0) runStart = at;
      if (same) await flushRun(at);
    }
    await flushRun(length);
    progress.p.doneBytes += length;
    progress.update();
  }
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
