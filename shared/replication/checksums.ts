import type { PageBlobClient } from '@azure/storage-blob';
import { NotFoundError, ValidationError } from '../errors';
import { validateName } from '../names';
import {
  digestOfZeros,
  INDEX_BLOCK_BYTES,
  readChecksumIndex,
  sha256,
  type IndexedDigests,
} from './checksum-index';
import type { ReplicationDeps } from './context';
import { readRange, seedBlob } from './seed-disk';
import { isNotFound, readEntity, TABLES, type DiskEntity } from './tables';

// Per-block checksums of a seed disk, for the agent's initial sync and resync: the agent hashes
// its own blocks the same way and ships only blocks whose checksums differ.
//
// Block i covers [offset + i*blockSize, min(end, offset + (i+1)*blockSize)); its checksum is the
// SHA-256 of exactly those bytes. At the index's block size (64 KiB, the agent's) the digests the
// applier keeps in the disk's checksum index are used where it knows them (checksum-index.ts);
// other blocks are read and hashed now. Ranges the page blob never wrote read as zeros and are
// hashed without being downloaded. The digests travel as 32 raw bytes each (the agent's binary answer) or
// as hex in JSON (for people and older agents).

export const CHECKSUM_ALGORITHM = 'sha256';
/** Bytes of one block's digest in the binary answer. */
export const CHECKSUM_BYTES = 32;
export const DEFAULT_BLOCK_BYTES = 1024 * 1024;
export const MIN_BLOCK_BYTES = 4096;
export const MAX_BLOCK_BYTES = 4 * 1024 * 1024;
/** Most blocks in one answer; ask again from `nextOffset` for the rest. */
export const MAX_BLOCKS_PER_REQUEST = 16_384;
/** Bytes per ranged read of the seed blob. */
const READ_BYTES = 4 * 1024 * 1024;

export interface ChecksumRequest {
  machine: string;
  disk: string;
  blockSize?: number;
  offset?: number;
  /** Bytes to cover; defaults to the rest of the disk (bounded by MAX_BLOCKS_PER_REQUEST). */
  length?: number;
  /** Read a recovery-point snapshot instead of the current seed disk. */
  snapshot?: string;
  concurrency?: number;
}

export interface BlockChecksums {
  machine: string;
  disk: string;
  algorithm: typeof CHECKSUM_ALGORITHM;
  sizeBytes: number;
  blockSize: number;
  offset: number;
  length: number;
  /** The blocks' SHA-256 digests, 32 bytes each, in order. */
  digests: Buffer;
  /** Where the next request should start, when the disk goes on. */
  nextOffset?: number;
  snapshot?: string;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Runs `tasks` with at most `limit` at a time. */
async function runLimited<T>(items: T[], limit: number, task: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async () => {
    while (next < items.length) await task(items[next++]);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

async function writtenRanges(
  blob: PageBlobClient,
  offset: number,
  length: number,
): Promise<[number, number][]> {
  const ranges: [number, number][] = [];
  // The SDK's page range end is inclusive.
  for await (const r of blob.listPageRanges(offset, length)) ranges.push([r.start, r.end + 1]);
  return ranges.sort((a, b) => a[0] - b[0]);
}

/** SHA-256 per block of the disk (or one of its snapshots), computed in parallel over ranges. */
export async function blockChecksums(
  deps: ReplicationDeps,
  request: ChecksumRequest,
): Promise<BlockChecksums> {
  const { machine, disk } = request;
  validateName(machine, 'machine');
  validateName(disk, 'disk');
  const blockSize = request.blockSize ?? DEFAULT_BLOCK_BYTES;
  if (!isPowerOfTwo(blockSize) || blockSize < MIN_BLOCK_BYTES || blockSize > MAX_BLOCK_BYTES) {
    throw new ValidationError(
      `blockSize must be a power of two from ${MIN_BLOCK_BYTES} to ${MAX_BLOCK_BYTES} bytes; got ${request.blockSize}.`,
      'blockSize',
    );
  }
  const row = await readEntity<DiskEntity>(await deps.tables.get(TABLES.disks), machine, disk);
  if (!row) throw new NotFoundError(`Disk ${disk} of machine ${machine} is not registered.`, 'disk');
  const size = row.sizeBytes;
  const offset = request.offset ?? 0;
  if (!Number.isSafeInteger(offset) || offset < 0 || offset % blockSize !== 0 || offset > size) {
    throw new ValidationError(
      `offset must be a multiple of blockSize (${blockSize}) from 0 to the disk size ${size}; got ${request.offset}.`,
      'offset',
    );
  }
  const maxLength = Math.min(size - offset, MAX_BLOCKS_PER_REQUEST * blockSize);
  if (request.length !== undefined && (!Number.isSafeInteger(request.length) || request.length < 0)) {
    throw new ValidationError(
      `length must be a non-negative whole number of bytes; got ${request.length}.`,
      'length',
    );
  }
  const wanted = request.length === undefined ? maxLength : Math.ceil(request.length / blockSize) * blockSize;
  const length = Math.min(wanted, maxLength);
  const end = offset + length;

  let blob = seedBlob(deps.seed, machine, disk);
  if (request.snapshot) blob = blob.withSnapshot(request.snapshot);
  const count = Math.ceil(length / blockSize);
  let indexed: IndexedDigests | undefined;
  if (blockSize === INDEX_BLOCK_BYTES && !request.snapshot && length > 0)
    indexed = await readChecksumIndex(deps.seed, machine, disk, size, offset, end);
  const allKnown = indexed !== undefined && indexed.known.every(Boolean);
  let ranges: [number, number][];
  try {
    ranges = length > 0 && !allKnown ? await writtenRanges(blob, offset, length) : [];
  } catch (err) {
    if (isNotFound(err))
      throw new NotFoundError(
        `Snapshot ${request.snapshot} of disk ${machine}/${disk} does not exist.`,
        'snapshot',
      );
    throw err;
  }

  const digests = indexed?.digests ?? Buffer.alloc(count * CHECKSUM_BYTES);
  // Which blocks touch written pages; the rest hash as zeros.
  const written = new Array<boolean>(count).fill(false);
  for (const [s, e] of ranges) {
    const first = Math.max(0, Math.floor((s - offset) / blockSize));
    const last = Math.min(count - 1, Math.floor((Math.min(e, end) - 1 - offset) / blockSize));
    for (let i = first; i <= last; i++) written[i] = true;
  }
  // Runs of written blocks, cut into reads of at most READ_BYTES.
  const reads: { first: number; blocks: number }[] = [];
  const perRead = Math.max(1, Math.floor(READ_BYTES / blockSize));
  for (let i = 0; i < count; i++) {
    if (indexed?.known[i]) continue;
    if (!written[i]) {
      digestOfZeros(Math.min(blockSize, end - (offset + i * blockSize))).copy(digests, i * CHECKSUM_BYTES);
      continue;
    }
    const last = reads[reads.length - 1];
    if (last && last.first + last.blocks === i && last.blocks < perRead) last.blocks++;
    else reads.push({ first: i, blocks: 1 });
  }
  await runLimited(reads, request.concurrency ?? 8, async (read) => {
    const start = offset + read.first * blockSize;
    const bytes = Math.min(read.blocks * blockSize, end - start);
    const data = await readRange(blob, start, bytes);
    for (let b = 0; b < read.blocks; b++) {
      const from = b * blockSize;
      sha256(data.subarray(from, Math.min(from + blockSize, bytes))).copy(
        digests,
        (read.first + b) * CHECKSUM_BYTES,
      );
    }
  });
  return {
    machine,
    disk,
    algorithm: CHECKSUM_ALGORITHM,
    sizeBytes: size,
    blockSize,
    offset,
    length,
    digests,
    ...(end < size ? { nextOffset: end } : {}),
    ...(request.snapshot ? { snapshot: request.snapshot } : {}),
  };
}

/** The JSON answer: the same fields with one hex digest per block in `blocks`. */
export function checksumsJson(sums: BlockChecksums): Omit<BlockChecksums, 'digests'> & { blocks: string[] } {
  const { digests, ...rest } = sums;
  const blocks: string[] = [];
  for (let at = 0; at < digests.length; at += CHECKSUM_BYTES)
    blocks.push(digests.toString('hex', at, at + CHECKSUM_BYTES));
  return { ...rest, blocks };
}

/** The binary answer's headers: the JSON answer's other fields (docs/api.md). */
export function checksumsHeaders(sums: BlockChecksums): Record<string, string> {
  return {
    'content-type': 'application/octet-stream',
    'x-lifeboat-algorithm': sums.algorithm,
    'x-lifeboat-size-bytes': String(sums.sizeBytes),
    'x-lifeboat-block-size': String(sums.blockSize),
    'x-lifeboat-offset': String(sums.offset),
    'x-lifeboat-length': String(sums.length),
    ...(sums.nextOffset !== undefined ? { 'x-lifeboat-next-offset': String(sums.nextOffset) } : {}),
    ...(sums.snapshot ? { 'x-lifeboat-snapshot': sums.snapshot } : {}),
  };
}
