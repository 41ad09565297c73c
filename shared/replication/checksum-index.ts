import crypto, { createHash, randomUUID } from 'node:crypto';
import type { BlobDownloadResponseParsed, ContainerClient, PageBlobClient } from '@azure/storage-blob';
import type { SeedLease } from './seed-disk';
import { downloadBuffer, PAGE_WRITE_BYTES, readRange, seedBlob } from './seed-disk';
import { isNotFound, statusOf } from './tables';

// The checksum index: SHA-256 of every 64 KiB block of a seed disk, kept by the applier so that a
// resync's checksum requests are answered from a small blob instead of reading and hashing the
// whole disk while the agent waits.
//
// One page blob per disk beside the seed (`{machine}/{disk}.sums`): a validity bitmap (one bit per
// 1 MiB region of the disk, rounded up to whole 512-byte pages), then 512 bytes of digests per
// region (16 blocks × 32 bytes). A region's digests count only while its bit is set, and a digest
// of all zeros never counts (a page the index never wrote reads as zeros, so a fresh index knows
// nothing).
//
// Crash safety: the applier clears a region's bit, durably, before it writes any page of that
// region; it sets bits only after writing the region's digests, computed from the seed while no
// page write is in flight (the idle fill), and only after renewing the seed lease (nobody else
// can have written the seed since the reads). So a set bit always means "these digests are the
// region's bytes now". Fencing: the index blob carries a lease with the seed lease's id, taken
// only by an applier that has just renewed the seed lease; it breaks a lease an applier that lost
// the disk left. Writers that know nothing of the index (a rollback to an older build, a copy
// into the seed): each applier run ends by recording the seed's ETag in the index (`seedetag`);
// an applier that finds another ETag rebuilds the index from nothing, and the endpoint trusts an
// index only while its applier holds it (leased) or while the seed's ETag is the recorded one.

/** The block size the index keeps (the agent's resync block). */
export const INDEX_BLOCK_BYTES = 64 * 1024;
const DIGEST_BYTES = 32;
const PAGE_BYTES = 512;
/** Bytes of disk per 512-byte page of digests. */
export const REGION_BYTES = (PAGE_BYTES / DIGEST_BYTES) * INDEX_BLOCK_BYTES;
const BLOCKS_PER_REGION = REGION_BYTES / INDEX_BLOCK_BYTES;
/** Bumped when the layout changes; an index of another version is rebuilt. */
const LAYOUT_VERSION = '1';
/** The shortest blob lease Azure grants. */
const MIN_LEASE_SECONDS = 15;
/** Regions the fill reads per ranged read. */
const FILL_READ_REGIONS = PAGE_WRITE_BYTES / REGION_BYTES;
/** Regions to read that the fill settles (digests, then bits) at a time. */
const FILL_BATCH_REGIONS = 16;
/** Regions whose page ranges the fill lists at once (one bitmap page: 4 GiB of disk). */
const FILL_WINDOW_REGIONS = PAGE_BYTES * 8;

export function checksumIndexName(machine: string, disk: string): string {
  return `${machine}/${disk}.sums`;
}

function indexBlob(container: ContainerClient, machine: string, disk: string): PageBlobClient {
  return container.getPageBlobClient(checksumIndexName(machine, disk));
}

/** SHA-256 of one block (the one-shot crypto.hash, Node ≥ 20.12, skips a Hash object per block). */
export const sha256: (data: Buffer) => Buffer =
  typeof crypto.hash === 'function'
    ? (data) => crypto.hash('sha256', data, 'buffer')
    : (data) => createHash('sha256').update(data).digest();

/** Where things are in an index for a disk of `sizeBytes`. */
class Layout {
  readonly regions: number;
  readonly bitmapBytes: number;
  readonly blobBytes: number;

  readonly blocks: number;

  constructor(readonly sizeBytes: number) {
    this.blocks = Math.ceil(sizeBytes / INDEX_BLOCK_BYTES);
    this.regions = Math.ceil(sizeBytes / REGION_BYTES);
    this.bitmapBytes = Math.max(PAGE_BYTES, Math.ceil(this.regions / 8 / PAGE_BYTES) * PAGE_BYTES);
    this.blobBytes = this.bitmapBytes + this.regions * PAGE_BYTES;
  }

  /** A new index's metadata: the layout, and a generation that tells it from a rebuilt one. */
  metadata(seedEtag: string): IndexMetadata {
    return {
      layout: LAYOUT_VERSION,
      sizebytes: String(this.sizeBytes),
      generation: randomUUID(),
      seedetag: seedEtag,
    };
  }

  matches(metadata: Record<string, string> | undefined, blobBytes: number | undefined): boolean {
    return (
      metadata?.layout === LAYOUT_VERSION &&
      metadata?.sizebytes === String(this.sizeBytes) &&
      blobBytes === this.blobBytes
    );
  }

  /** Offset in the blob of the digest of block `block`. */
  digestAt(block: number): number {
    return this.bitmapBytes + block * DIGEST_BYTES;
  }

  /** Bytes of block `block` (the disk's last block may be short). */
  blockBytes(block: number): number {
    return Math.min(INDEX_BLOCK_BYTES, this.sizeBytes - block * INDEX_BLOCK_BYTES);
  }
}

/** The index blob's metadata (lower case: Azure's metadata names). */
interface IndexMetadata extends Record<string, string> {
  layout: string;
  sizebytes: string;
  generation: string;
  /** The seed's ETag when an applier last let go of the disk. */
  seedetag: string;
}

/** How many bits of a byte are set. */
const BITS_SET = Uint8Array.from({ length: 256 }, (_, b) => {
  let n = 0;
  for (let v = b; v; v >>= 1) n += v & 1;
  return n;
});

function bit(bitmap: Buffer, region: number): boolean {
  return (bitmap[region >> 3] & (1 << (region & 7))) !== 0;
}

const zeroDigests = new Map<number, Buffer>();
/** SHA-256 of `bytes` zero bytes (cached). */
export function digestOfZeros(bytes: number): Buffer {
  let d = zeroDigests.get(bytes);
  if (!d) zeroDigests.set(bytes, (d = sha256(Buffer.alloc(bytes))));
  return d;
}

export interface FillReport {
  /** Regions whose digests were written this time. */
  regions: number;
  /** Seed bytes read (regions the seed never wrote are hashed as zeros without a read). */
  bytesRead: number;
  /** Regions still unknown. */
  unknown: number;
}

/**
 * The applier's handle on a disk's index, opened under its seed lease: clears regions before
 * their pages are written and fills unknown regions when there is nothing to apply.
 */
export class ChecksumIndex {
  private known = 0;
  /** Whether the run has written (or was about to write) the seed since open. */
  private touched = false;

  private constructor(
    private readonly blob: PageBlobClient,
    private readonly seed: PageBlobClient,
    private readonly layout: Layout,
    private readonly lease: SeedLease,
    private readonly metadata: IndexMetadata,
    private readonly bitmap: Buffer,
    /** The seed's ETag when the index was opened. */
    private readonly openedEtag: string,
  ) {
    for (let i = 0; i < bitmap.length; i++) this.known += BITS_SET[bitmap[i]];
  }

  private get leaseId(): string {
    return this.lease.leaseId;
  }

  /**
   * Opens the index of a disk whose seed lease `lease` holds (taken just before, with nothing
   * written since), and takes the index's lease under the same id. An index for another size or
   * layout, or one that knows something while its recorded seed ETag is not the seed's (someone
   * wrote the seed without keeping the index), is replaced by one that knows nothing.
   */
  static async open(
    container: ContainerClient,
    seed: PageBlobClient,
    machine: string,
    disk: string,
    sizeBytes: number,
    lease: SeedLease,
  ): Promise<ChecksumIndex> {
    const blob = indexBlob(container, machine, disk);
    const layout = new Layout(sizeBytes);
    // Nobody else can write the seed while we hold its lease: its ETag stays this until we write.
    const seedEtag =
      lease.acquiredEtag ?? (await seed.getProperties({ conditions: { leaseId: lease.leaseId } })).etag ?? '';
    const leaseClient = blob.getBlobLeaseClient(lease.leaseId);
    // A second shorter than the seed's (when allowed): if renewals stop, the index's lapses first.
    const seconds = Math.max(MIN_LEASE_SECONDS, lease.durationSeconds - 1);
    const create = async () => {
      try {
        await blob.create(layout.blobBytes, {
          metadata: layout.metadata(seedEtag),
          conditions: { ifNoneMatch: '*' },
        });
      } catch (err) {
        const status = statusOf(err);
        if (status !== 409 && status !== 412) throw err; // created meanwhile: take that one
      }
    };
    for (let attempt = 1; ; attempt++) {
      try {
        await leaseClient.acquireLease(seconds);
      } catch (err) {
        if (attempt >= 4) throw err;
        if (isNotFound(err)) {
          await create();
          continue;
        }
        if (statusOf(err) !== 409) throw err;
        // Held by an applier that lost the seed: break it now (it can no longer write either),
        // provided the seed is still ours this very moment.
        await lease.renew();
        await blob.getBlobLeaseClient().breakLease(0);
        continue;
      }
      lease.attach(leaseClient);
      let response: BlobDownloadResponseParsed | undefined;
      const bitmap = Buffer.from(
        await downloadBuffer(blob, 0, layout.bitmapBytes, (r) => (response = r)).catch((err) => {
          lease.detach(leaseClient);
          throw err;
        }),
      );
      const metadata = response?.metadata as IndexMetadata | undefined;
      // An index that knows nothing cannot be stale (runs that leave it so do not seal it).
      if (
        layout.matches(metadata, totalBytes(response)) &&
        (metadata?.seedetag === seedEtag || bitmap.every((b) => b === 0))
      )
        return new ChecksumIndex(blob, seed, layout, lease, metadata!, bitmap, seedEtag);
      // Another size or layout, or the seed was written by something that does not keep the
      // index (a crash mid-run, an older build, a copy): start over with one that knows nothing.
      await blob.delete({ conditions: { leaseId: lease.leaseId } });
      lease.detach(leaseClient);
      if (attempt >= 4)
        throw new Error(`The checksum index of ${machine}/${disk} does not match after ${attempt} rebuilds.`);
      await create();
    }
  }

  /**
   * Records the seed's ETag as the one this index describes. Called when the run's writes are
   * all done (before the leases go): until the seed changes, the index can be trusted without
   * its applier.
   */
  async seal(): Promise<void> {
    if (this.known === 0) return; // it claims nothing; the next applier takes it as it is
    // Untouched since open, the seed's ETag is still the one open saw.
    const etag = this.touched
      ? ((await this.seed.getProperties({ conditions: { leaseId: this.leaseId } })).etag ?? '')
      : this.openedEtag;
    if (etag === this.metadata.seedetag) return;
    this.metadata.seedetag = etag;
    await this.blob.setMetadata(this.metadata, { conditions: { leaseId: this.leaseId } });
  }

  /** Regions whose digests are not known. */
  get unknownRegions(): number {
    return this.layout.regions - this.known;
  }

  /**
   * Forgets, durably, every region that [start, end) of each range touches. Must resolve before
   * any page of those ranges is written. Costs a request only when a region was known.
   */
  async invalidate(ranges: Iterable<readonly [number, number]>): Promise<void> {
    this.touched = true;
    const pages = new Set<number>();
    for (const [start, end] of ranges) {
      if (end <= start) continue;
      const last = Math.min(this.layout.regions - 1, Math.floor((end - 1) / REGION_BYTES));
      for (let r = Math.floor(start / REGION_BYTES); r <= last; r++) {
        if (!bit(this.bitmap, r)) continue;
        this.bitmap[r >> 3] &= ~(1 << (r & 7));
        this.known--;
        pages.add(Math.floor((r >> 3) / PAGE_BYTES));
      }
    }
    if (pages.size === 0) return;
    // Only the bitmap pages that changed, runs of adjacent ones as one write each.
    const sorted = [...pages].sort((x, y) => x - y);
    const writes: Promise<void>[] = [];
    for (let i = 0; i < sorted.length;) {
      let j = i + 1;
      while (j < sorted.length && sorted[j] === sorted[j - 1] + 1) j++;
      writes.push(this.writeBitmap(sorted[i] * PAGE_BYTES, (sorted[j - 1] + 1) * PAGE_BYTES));
      i = j;
    }
    await Promise.all(writes);
  }

  /** Writes the pages of the bitmap that hold bytes [from, to). */
  private async writeBitmap(from: number, to: number): Promise<void> {
    const start = Math.floor(from / PAGE_BYTES) * PAGE_BYTES;
    const end = Math.ceil(to / PAGE_BYTES) * PAGE_BYTES;
    await this.writePages(this.bitmap.subarray(start, end), start);
  }

  private async writePages(data: Buffer, offset: number): Promise<void> {
    for (let at = 0; at < data.length; at += PAGE_WRITE_BYTES) {
      const n = Math.min(PAGE_WRITE_BYTES, data.length - at);
      await this.blob.uploadPages(data.subarray(at, at + n), offset + at, n, {
        conditions: { leaseId: this.leaseId },
      });
    }
  }

  /**
   * Computes the digests of unknown regions from the seed (which nothing may write meanwhile) and
   * marks them known, in order, until every region is known, `deadline` (epoch ms) passes, or
   * `stop` answers true (checked between batches: new work arrived).
   */
  async fill(options: { deadline: number; stop?: () => Promise<boolean> }): Promise<FillReport> {
    const report: FillReport = { regions: 0, bytesRead: 0, unknown: 0 };
    const { layout } = this;
    let r = 0;
    while (r < layout.regions) {
      if (bit(this.bitmap, r)) {
        r++;
        continue;
      }
      if (Date.now() >= options.deadline || (options.stop && (await options.stop()))) break;
      // Which regions of the window (one bitmap page's worth) the seed ever wrote: one listing.
      const windowEnd = Math.min(
        layout.regions,
        (Math.floor(r / FILL_WINDOW_REGIONS) + 1) * FILL_WINDOW_REGIONS,
      );
      const listedFrom = r;
      const listed = await this.writtenRegions(r, windowEnd);
      const written = (region: number) => listed[region - listedFrom];
      // A batch: the next unknown regions in a row, up to FILL_BATCH_REGIONS that need a read
      // (regions never written are hashed as zeros and cost nothing but their digests).
      while (r < windowEnd && !bit(this.bitmap, r)) {
        const first = r;
        let reads = 0;
        while (r < windowEnd && !bit(this.bitmap, r) && reads < FILL_BATCH_REGIONS) {
          if (written(r)) reads++;
          r++;
        }
        const digests = await this.hashRegions(first, r, written, report);
        await this.writePages(digests, layout.digestAt(first * BLOCKS_PER_REGION));
        // Still the seed's only writer since the reads (a renewal fails once anyone else leased it).
        await this.lease.renew();
        for (let i = first; i < r; i++) this.bitmap[i >> 3] |= 1 << (i & 7);
        this.known += r - first;
        await this.writeBitmap(first >> 3, ((r - 1) >> 3) + 1);
        report.regions += r - first;
        if (r < windowEnd && !bit(this.bitmap, r)) {
          if (Date.now() >= options.deadline || (options.stop && (await options.stop()))) {
            report.unknown = this.unknownRegions;
            return report;
          }
        }
      }
    }
    report.unknown = this.unknownRegions;
    return report;
  }

  /** Per region of [first, end): whether the seed ever wrote a page of it. */
  private async writtenRegions(first: number, end: number): Promise<boolean[]> {
    const out = new Array<boolean>(end - first).fill(false);
    const start = first * REGION_BYTES;
    const stop = Math.min(this.layout.sizeBytes, end * REGION_BYTES);
    for await (const range of this.seed.listPageRanges(start, stop - start)) {
      const last = Math.min(end - 1, Math.floor(range.end / REGION_BYTES));
      for (let r = Math.max(first, Math.floor(range.start / REGION_BYTES)); r <= last; r++)
        out[r - first] = true;
    }
    return out;
  }

  /** The digest pages of regions [first, end), read from the seed where `written(region)`. */
  private async hashRegions(
    first: number,
    end: number,
    written: (region: number) => boolean,
    report: FillReport,
  ): Promise<Buffer> {
    const { layout, seed } = this;
    const out = Buffer.alloc((end - first) * PAGE_BYTES);
    const put = (block: number, digest: Buffer) =>
      digest.copy(out, (block - first * BLOCKS_PER_REGION) * DIGEST_BYTES);
    const reads: Promise<void>[] = [];
    for (let r = first; r < end;) {
      if (!written(r)) {
        const from = r * BLOCKS_PER_REGION;
        const to = Math.min(layout.blocks, (r + 1) * BLOCKS_PER_REGION);
        for (let b = from; b < to; b++) put(b, digestOfZeros(layout.blockBytes(b)));
        r++;
        continue;
      }
      // A run of written regions, read FILL_READ_REGIONS at a time.
      let last = r + 1;
      while (last < end && last - r < FILL_READ_REGIONS && written(last)) last++;
      const from = r * REGION_BYTES;
      const to = Math.min(layout.sizeBytes, last * REGION_BYTES);
      reads.push(
        readRange(seed, from, to - from).then((data) => {
          report.bytesRead += data.length;
          const blocksFrom = from / INDEX_BLOCK_BYTES;
          for (let at = 0, i = 0; at < data.length; at += INDEX_BLOCK_BYTES, i++)
            put(blocksFrom + i, sha256(data.subarray(at, Math.min(data.length, at + INDEX_BLOCK_BYTES))));
        }),
      );
      if (reads.length >= 4) await Promise.all(reads.splice(0));
      r = last;
    }
    await Promise.all(reads);
    return out;
  }
}

/** What the index knows of a range of blocks. */
export interface IndexedDigests {
  /** 32 bytes per block of the range; meaningful only where `known`. */
  digests: Buffer;
  known: boolean[];
}

/** The blob's whole size, from a ranged download's Content-Range ("bytes a-b/total"). */
function totalBytes(response: BlobDownloadResponseParsed | undefined): number | undefined {
  const total = /\/(\d+)$/.exec(response?.contentRange ?? '')?.[1];
  return total === undefined ? undefined : Number(total);
}

/** Reads a range of the index with the blob's metadata and lease state (one request). */
async function readIndexRange(
  blob: PageBlobClient,
  offset: number,
  count: number,
): Promise<{ bytes: Buffer; response: BlobDownloadResponseParsed }> {
  let response: BlobDownloadResponseParsed | undefined;
  const bytes = await downloadBuffer(blob, offset, count, (r) => (response = r));
  return { bytes, response: response! };
}

/**
 * The index's digests for blocks [offset, end) of a disk of `sizeBytes` (64 KiB-aligned offset),
 * or undefined when the disk has no index this can trust. Read-only: anyone may call it while an
 * applier works. The index counts if its applier holds it (leased) or the seed's ETag is the one
 * it recorded; a digest counts only if its region's bit was set when read and it is not all
 * zeros; bitmap and digests must come from the same generation of the blob. Any failure to read
 * the index is "no index" (the caller hashes the seed instead).
 */
export async function readChecksumIndex(
  container: ContainerClient,
  machine: string,
  disk: string,
  sizeBytes: number,
  offset: number,
  end: number,
): Promise<IndexedDigests | undefined> {
  const layout = new Layout(sizeBytes);
  const blob = indexBlob(container, machine, disk);
  const firstBlock = offset / INDEX_BLOCK_BYTES;
  const blocks = Math.ceil((end - offset) / INDEX_BLOCK_BYTES);
  if (blocks <= 0) return { digests: Buffer.alloc(0), known: [] };
  const firstRegion = Math.floor(firstBlock / BLOCKS_PER_REGION);
  const lastRegion = Math.floor((firstBlock + blocks - 1) / BLOCKS_PER_REGION);
  try {
    // The bitmap first: digests read after it are at least as new as the bits say.
    const bits = await readIndexRange(blob, firstRegion >> 3, (lastRegion >> 3) - (firstRegion >> 3) + 1);
    const metadata = bits.response.metadata;
    if (!layout.matches(metadata, totalBytes(bits.response))) return undefined;
    if (bits.response.leaseState !== 'leased') {
      const seedEtag = (await seedBlob(container, machine, disk).getProperties()).etag;
      if (metadata?.seedetag !== seedEtag) return undefined;
    }
    const sums = await readIndexRange(blob, layout.digestAt(firstBlock), blocks * DIGEST_BYTES);
    if (sums.response.metadata?.generation !== metadata?.generation) return undefined;
    const digests = sums.bytes;
    const known = new Array<boolean>(blocks);
    const base = (firstRegion >> 3) * 8;
    for (let i = 0; i < blocks; i++) {
      const region = Math.floor((firstBlock + i) / BLOCKS_PER_REGION);
      let nonZero = false;
      for (let j = i * DIGEST_BYTES; j < (i + 1) * DIGEST_BYTES && !nonZero; j++) nonZero = digests[j] !== 0;
      known[i] = nonZero && bit(bits.bytes, region - base);
    }
    return { digests, known };
  } catch {
    return undefined;
  }
}

/**
 * Deletes a disk's index, for a writer that replaces the seed's bytes some other way (the
 * failback's copy) while it holds the seed lease. A lease an applier left on the index is broken.
 */
export async function discardChecksumIndex(
  container: ContainerClient,
  machine: string,
  disk: string,
): Promise<void> {
  const blob = indexBlob(container, machine, disk);
  for (let attempt = 1; ; attempt++) {
    try {
      await blob.delete();
      return;
    } catch (err) {
      if (isNotFound(err)) return;
      if ((statusOf(err) !== 412 && statusOf(err) !== 409) || attempt >= 5) throw err;
      await blob
        .getBlobLeaseClient()
        .breakLease(0)
        .catch((e) => {
          if (!isNotFound(e) && statusOf(e) !== 409) throw e;
        });
    }
  }
}
