import { createHash } from 'node:crypto';
import type { PageBlobClient } from '@azure/storage-blob';
import { readRange } from '../replication';

// Change tracking on the Azure side: what changed on a failover disk between two of its
// snapshots. In Azure the managed-disk / page-blob incremental diff answers it; Azurite answers a
// page-range diff with the blob's full ranges (DESIGN §5), so locally the two snapshots' block
// checksums are compared instead. Same interface, chosen by capability (the compute provider).

/** [start, end) in bytes. */
export type ByteRange = [number, number];

export const CHANGE_BLOCK_BYTES = 64 * 1024;
const READ_BYTES = 4 * 1024 * 1024;

export interface ChangeTracker {
  readonly kind: 'page-range-diff' | 'block-checksums';
  /** The ranges of `blob` that may differ between snapshot `previous` and snapshot `current`. */
  changedRanges(
    blob: PageBlobClient,
    sizeBytes: number,
    previous: string,
    current: string,
  ): Promise<ByteRange[]>;
}

/** Sorted, merged, cut to whole blocks of `block` bytes within [0, size). */
export function blockAligned(ranges: ByteRange[], size: number, block = CHANGE_BLOCK_BYTES): ByteRange[] {
  const out: ByteRange[] = [];
  for (const [s, e] of [...ranges].sort((a, b) => a[0] - b[0])) {
    const start = Math.floor(s / block) * block;
    const end = Math.min(size, Math.ceil(e / block) * block);
    const last = out[out.length - 1];
    if (last && start <= last[1]) last[1] = Math.max(last[1], end);
    else if (start < end) out.push([start, end]);
  }
  return out;
}

/** Azure: the service's page-range diff (written and cleared ranges since `previous`). */
export class PageRangeDiffTracker implements ChangeTracker {
  readonly kind = 'page-range-diff' as const;

  async changedRanges(
    blob: PageBlobClient,
    sizeBytes: number,
    previous: string,
    current: string,
  ): Promise<ByteRange[]> {
    const diff = await blob.withSnapshot(current).getPageRangesDiff(0, sizeBytes, previous);
    const ranges: ByteRange[] = [];
    for (const r of [...(diff.pageRange ?? []), ...(diff.clearRange ?? [])])
      ranges.push([r.offset, r.offset + (r.count ?? 0)]);
    return blockAligned(ranges, sizeBytes);
  }
}

/** SHA-256 of each block of a page blob (or snapshot); unwritten ranges hash as zeros unread. */
export async function pageBlobChecksums(
  blob: PageBlobClient,
  sizeBytes: number,
  block = CHANGE_BLOCK_BYTES,
): Promise<Buffer[]> {
  const count = Math.ceil(sizeBytes / block);
  const written = new Array<boolean>(count).fill(false);
  for await (const r of blob.listPageRanges(0, sizeBytes)) {
    for (let i = Math.floor(r.start / block); i <= Math.floor(r.end / block) && i < count; i++)
      written[i] = true;
  }
  const zero = new Map<number, Buffer>();
  const sums: Buffer[] = new Array(count);
  const reads: [number, number][] = [];
  const perRead = Math.max(1, READ_BYTES / block);
  for (let i = 0; i < count; i++) {
    const n = Math.min(block, sizeBytes - i * block);
    if (!written[i]) {
      let z = zero.get(n);
      if (!z) zero.set(n, (z = createHash('sha256').update(Buffer.alloc(n)).digest()));
      sums[i] = z;
      continue;
    }
    const last = reads[reads.length - 1];
    if (last && last[0] + last[1] === i && last[1] < perRead) last[1]++;
    else reads.push([i, 1]);
  }
  let next = 0;
  const worker = async () => {
    while (next < reads.length) {
      const [first, blocks] = reads[next++];
      const start = first * block;
      const data = await readRange(blob, start, Math.min(blocks * block, sizeBytes - start));
      for (let b = 0; b < blocks; b++)
        sums[first + b] = createHash('sha256')
          .update(data.subarray(b * block, (b + 1) * block))
          .digest();
    }
  };
  await Promise.all(Array.from({ length: 8 }, worker));
  return sums;
}

/** The blocks whose checksums differ, as merged byte ranges. */
export function differingRanges(
  a: Buffer[],
  b: Buffer[],
  sizeBytes: number,
  block = CHANGE_BLOCK_BYTES,
): ByteRange[] {
  const ranges: ByteRange[] = [];
  const count = Math.ceil(sizeBytes / block);
  for (let i = 0; i < count; i++) {
    if (a[i] && b[i] && a[i].equals(b[i])) continue;
    ranges.push([i * block, Math.min(sizeBytes, (i + 1) * block)]);
  }
  return blockAligned(ranges, sizeBytes, block);
}

/** Local (Azurite): compare the block checksums of the two snapshots. */
export class BlockChecksumTracker implements ChangeTracker {
  readonly kind = 'block-checksums' as const;

  async changedRanges(
    blob: PageBlobClient,
    sizeBytes: number,
    previous: string,
    current: string,
  ): Promise<ByteRange[]> {
    const [before, after] = await Promise.all([
      pageBlobChecksums(blob.withSnapshot(previous), sizeBytes),
      pageBlobChecksums(blob.withSnapshot(current), sizeBytes),
    ]);
    return differingRanges(before, after, sizeBytes);
  }
}

/** The tracker the compute provider's storage supports. */
export function changeTrackerFor(compute: 'local' | 'azure'): ChangeTracker {
  return compute === 'azure' ? new PageRangeDiffTracker() : new BlockChecksumTracker();
}
