import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { ConfigError } from '../../shared/errors';

const MAGIC = 0x4c42424d; // "LBBM"
const HEADER_BYTES = 24;

/**
 * Which blocks of a disk changed without their data being kept: the state of a disk in bitmap
 * mode (journal full), and the to-do list of a catch-up pass. One bit per block.
 *
 * File layout (little-endian): u32 magic "LBBM", u32 block size, u64 disk size, u32 CRC-32 of
 * the bits, u32 zero, then the bits (bit i of byte j = block 8j+i).
 */
export class DirtyBitmap {
  readonly blockCount: number;
  private readonly bits: Uint8Array;
  private dirty = 0;

  constructor(
    readonly diskSize: number,
    readonly blockSize: number,
    bits?: Uint8Array,
  ) {
    if (!Number.isSafeInteger(blockSize) || blockSize < 512 || blockSize % 512 !== 0) {
      throw new ConfigError(
        `The bitmap block size must be a positive multiple of 512 bytes; got ${blockSize}.`,
        'blockSize',
      );
    }
    this.blockCount = Math.ceil(diskSize / blockSize);
    this.bits = bits ?? new Uint8Array(Math.ceil(this.blockCount / 8));
    if (bits) for (let i = 0; i < bits.length; i++) this.dirty += popcount(bits[i]);
  }

  /** Blocks marked. */
  get count(): number {
    return this.dirty;
  }

  get dirtyBytes(): number {
    return this.dirty * this.blockSize;
  }

  /** Marks every block that `[offset, offset+length)` touches. */
  markRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.min(this.blockCount - 1, Math.floor((offset + length - 1) / this.blockSize));
    for (let b = first; b <= last; b++) this.mark(b);
  }

  mark(block: number): void {
    const byte = block >>> 3;
    const bit = 1 << (block & 7);
    if ((this.bits[byte] & bit) === 0) {
      this.bits[byte] |= bit;
      this.dirty += 1;
    }
  }

  markAll(): void {
    for (let b = 0; b < this.blockCount; b++) this.mark(b);
  }

  has(block: number): boolean {
    return (this.bits[block >>> 3] & (1 << (block & 7))) !== 0;
  }

  clear(block: number): void {
    const byte = block >>> 3;
    const bit = 1 << (block & 7);
    if ((this.bits[byte] & bit) !== 0) {
      this.bits[byte] &= ~bit;
      this.dirty -= 1;
    }
  }

  clearAll(): void {
    this.bits.fill(0);
    this.dirty = 0;
  }

  /** The first marked block at or after `from`, or -1. */
  next(from: number): number {
    for (let b = from; b < this.blockCount;) {
      if (this.bits[b >>> 3] === 0 && (b & 7) === 0) {
        b += 8;
        continue;
      }
      if (this.has(b)) return b;
      b += 1;
    }
    return -1;
  }

  /** Marked runs as [firstBlock, blockCount] of at most `maxBlocks` blocks, in order. */
  *runs(maxBlocks: number): Generator<[number, number]> {
    let b = this.next(0);
    while (b !== -1) {
      let n = 1;
      while (n < maxBlocks && b + n < this.blockCount && this.has(b + n)) n++;
      yield [b, n];
      b = this.next(b + n);
    }
  }

  /** Byte range of `blocks` blocks from `block`, clipped to the disk. */
  range(block: number, blocks: number): { offset: number; length: number } {
    const offset = block * this.blockSize;
    return { offset, length: Math.min(this.diskSize, offset + blocks * this.blockSize) - offset };
  }

  encode(): Buffer {
    const out = Buffer.alloc(HEADER_BYTES + this.bits.length);
    out.writeUInt32LE(MAGIC, 0);
    out.writeUInt32LE(this.blockSize, 4);
    out.writeBigUInt64LE(BigInt(this.diskSize), 8);
    Buffer.from(this.bits.buffer, this.bits.byteOffset, this.bits.length).copy(out, HEADER_BYTES);
    out.writeUInt32LE(crc32(out.subarray(HEADER_BYTES)), 16);
    return out;
  }

  static decode(bytes: Buffer, where: string): DirtyBitmap {
    if (bytes.length < HEADER_BYTES || bytes.readUInt32LE(0) !== MAGIC) {
      throw new ConfigError(
        `The dirty-block bitmap ${where} is damaged (bad header); the disk needs a resync.`,
        'bitmap',
      );
    }
    const blockSize = bytes.readUInt32LE(4);
    const diskSize = Number(bytes.readBigUInt64LE(8));
    const bits = bytes.subarray(HEADER_BYTES);
    if (
      bits.length !== Math.ceil(Math.ceil(diskSize / blockSize) / 8) ||
      crc32(bits) !== bytes.readUInt32LE(16)
    ) {
      throw new ConfigError(
        `The dirty-block bitmap ${where} is damaged (length or checksum); the disk needs a resync.`,
        'bitmap',
      );
    }
    return new DirtyBitmap(diskSize, blockSize, new Uint8Array(bits));
  }

  /** Writes the bitmap durably (temporary file, fsync, rename, fsync of the folder). */
  async save(file: string): Promise<void> {
    await writeFileDurably(file, this.encode());
  }

  static load(file: string): DirtyBitmap | undefined {
    let bytes: Buffer;
    try {
      bytes = fs.readFileSync(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    return DirtyBitmap.decode(bytes, file);
  }
}

function popcount(x: number): number {
  let n = 0;
  while (x) {
    x &= x - 1;
    n++;
  }
  return n;
}

/** Replaces `file` atomically and durably with `data`. */
let tmpCounter = 0;

export async function writeFileDurably(file: string, data: Buffer | string): Promise<void> {
  const tmp = `${file}.tmp-${process.pid}-${++tmpCounter}`;
  const handle = await fs.promises.open(tmp, 'w');
  try {
    await handle.writeFile(data);
    await handle.datasync();
  } finally {
    await handle.close();
  }
  await fs.promises.rename(tmp, file);
  await syncDir(path.dirname(file));
}

export async function syncDir(dir: string): Promise<void> {
  const handle = await fs.promises.open(dir, 'r');
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}
