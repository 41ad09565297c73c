import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { writeFileDurably } from './bitmap';
import type { DiskSegmenter } from './segmenter';
import { blockChecksum, isZero, type RemoteChecksums, type SyncDevice } from './sync';

// The scan change source, for disks the agent cannot interpose on: read every block, hash it
// (SHA-256: the fastest of the hashes node offers on this hardware, see docs/agent.md), compare
// with the previous scan, and append the changed blocks to the change stream as writes (all-zero
// blocks as zero records). The previous scan's hashes are kept in the disk's journal folder and
// replaced only after the segment carrying the changes is durable.

const MAGIC = 0x4c424853; // "LBHS"
const HEADER_BYTES = 24;

export interface ScanResult {
  scannedBytes: number;
  changedBlocks: number;
  zeroBlocks: number;
  shippedBytes: number;
}

export class BlockHashes {
  constructor(
    readonly blockSize: number,
    readonly diskSize: number,
    readonly digests: Buffer,
  ) {}

  get blockCount(): number {
    return Math.ceil(this.diskSize / this.blockSize);
  }

  get(block: number): Buffer {
    return this.digests.subarray(block * 32, block * 32 + 32);
  }

  encode(): Buffer {
    const out = Buffer.alloc(HEADER_BYTES + this.digests.length);
    out.writeUInt32LE(MAGIC, 0);
    out.writeUInt32LE(this.blockSize, 4);
    out.writeBigUInt64LE(BigInt(this.diskSize), 8);
    this.digests.copy(out, HEADER_BYTES);
    out.writeUInt32LE(crc32(this.digests), 16);
    return out;
  }

  /** The saved hashes, or undefined when missing, damaged or made for another geometry (rescan all). */
  static load(file: string, blockSize: number, diskSize: number): BlockHashes | undefined {
    let bytes: Buffer;
    try {
      bytes = fs.readFileSync(file);
    } catch {
      return undefined;
    }
    if (bytes.length < HEADER_BYTES || bytes.readUInt32LE(0) !== MAGIC) return undefined;
    if (bytes.readUInt32LE(4) !== blockSize || Number(bytes.readBigUInt64LE(8)) !== diskSize)
      return undefined;
    const digests = bytes.subarray(HEADER_BYTES);
    if (digests.length !== Math.ceil(diskSize / blockSize) * 32 || crc32(digests) !== bytes.readUInt32LE(16))
      return undefined;
    return new BlockHashes(blockSize, diskSize, Buffer.from(digests));
  }
}

export interface BlockScannerOptions {
  device: SyncDevice;
  segmenter: DiskSegmenter;
  blockSize?: number;
  /** Read per step (default 1 MiB). */
  chunkBytes?: number;
  /** What to compare with when there is no previous scan (default: an all-zero cloud copy). */
  remote?: RemoteChecksums;
}

/** Scans one disk: compares block hashes with the previous scan and appends what changed. */
export class BlockScanner {
  readonly blockSize: number;
  private pending: BlockHashes | undefined;

  constructor(private readonly options: BlockScannerOptions) {
    this.blockSize = options.blockSize ?? options.remote?.blockSize ?? 64 * 1024;
  }

  get hashesPath(): string {
    return path.join(this.options.segmenter.journal.dir, 'scan.hashes');
  }

  /**
   * One scan. Changed blocks are appended to the segmenter's open segment; call `commit()` once
   * the segment that carries them is in the journal (e.g. after the marker cut).
   */
  async scan(): Promise<ScanResult> {
    const { device, segmenter } = this.options;
    const blockSize = this.blockSize;
    const previous = BlockHashes.load(this.hashesPath, blockSize, device.size);
    const next = new BlockHashes(
      blockSize,
      device.size,
      Buffer.alloc(Math.ceil(device.size / blockSize) * 32),
    );
    const chunk = Math.max(
      blockSize,
      Math.floor((this.options.chunkBytes ?? 1024 * 1024) / blockSize) * blockSize,
    );
    const result: ScanResult = { scannedBytes: 0, changedBlocks: 0, zeroBlocks: 0, shippedBytes: 0 };
    for (let offset = 0; offset < device.size; offset += chunk) {
      const length = Math.min(chunk, device.size - offset);
      const data = await device.read(offset, length);
      const theirs = previous
        ? undefined
        : await (this.options.remote?.checksums({ offset, length }) ?? Promise.resolve(undefined));
      const accepted: (Promise<void> | void)[] = [];
      for (let at = 0, i = 0; at < length; at += blockSize, i++) {
        const block = data.subarray(at, Math.min(length, at + blockSize));
        const b = (offset + at) / blockSize;
        const sum = blockChecksum(block);
        sum.copy(next.digests, b * 32);
        const before = previous ? previous.get(b) : theirs ? theirs[i] : undefined;
        const zero = isZero(block);
        if (before ? before.equals(sum) : zero) continue;
        result.changedBlocks += 1;
        result.shippedBytes += block.length;
        if (zero) {
          result.zeroBlocks += 1;
          accepted.push(segmenter.append({ kind: 'zero', offset: offset + at, length: block.length }));
        } else {
          accepted.push(
            segmenter.append({
              kind: 'write',
              offset: offset + at,
              length: block.length,
              data: Buffer.from(block),
            }),
          );
        }
      }
      await Promise.all(accepted);
      result.scannedBytes += length;
    }
    this.pending = next;
    return result;
  }

  /** Keeps the last scan's hashes as the base of the next one. */
  async commit(): Promise<void> {
    if (!this.pending) return;
    await writeFileDurably(this.hashesPath, this.pending.encode());
    this.pending = undefined;
  }

  /** Forgets the saved hashes (after bitmap mode or a resync the next scan starts from the remote copy). */
  async forget(): Promise<void> {
    this.pending = undefined;
    await fs.promises.rm(this.hashesPath, { force: true });
  }
}
