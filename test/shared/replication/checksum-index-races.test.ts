import { createHash } from 'node:crypto';
import { BlobClient, PageBlobClient } from '@azure/storage-blob';
import { describe, expect, inject, it } from 'vitest';
import {
  applyChangelogs,
  blockChecksums,
  ChecksumIndex,
  discardChecksumIndex,
  ensureContainer,
  INDEX_BLOCK_BYTES,
  readChecksumIndex,
  registerMachine,
  SeedLease,
  seedBlob,
} from '../../../shared/replication';
import { interleaving, readWhole, testDeps, uniqueMachine } from './helpers';

// Races around the checksum index (found in review): the property is the feature's own —
// whatever digest the index claims for a block is the SHA-256 of what the seed holds there.

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function sha(data: Buffer): Buffer {
  return createHash('sha256').update(data).digest();
}

/** Blocks in [offset, offset + digests) whose claimed digest differs from the seed's bytes. */
function wrongClaims(
  claimed: { digests: Buffer; known: boolean[] },
  seedBytes: Buffer,
  offset: number,
): number[] {
  const wrong: number[] = [];
  claimed.known.forEach((k, i) => {
    if (!k) return;
    const at = offset + i * INDEX_BLOCK_BYTES;
    const want = sha(seedBytes.subarray(at, Math.min(seedBytes.length, at + INDEX_BLOCK_BYTES)));
    if (!claimed.digests.subarray(i * 32, i * 32 + 32).equals(want)) wrong.push(at / INDEX_BLOCK_BYTES);
  });
  return wrong;
}

describe('checksum index races', () => {
  it('a stalled applier that lost the seed cannot take the index from the applier that holds the seed', async () => {
    // Long leases: no renewal tick lands inside the test (the scenario does not depend on one).
    const deps = testDeps(connection, { leaseSeconds: 60, fillQuietMs: 0 });
    const machine = uniqueMachine('idxzombie');
    const size = 2 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    await ensureContainer(deps.changelogs);
    const seed = seedBlob(deps.seed, machine, 'd0');
    await seed.uploadPages(Buffer.alloc(MiB, 1), 0, MiB);

    // Applier A takes the seed lease and claims the cursor, then stalls (a frozen host, a long GC)
    // for longer than the lease just before it opens the index. Meanwhile its seed lease lapses and
    // applier C takes the disk over and opens the index under its own lease.
    let c: SeedLease | undefined;
    let indexC: ChecksumIndex | undefined;
    let stalled = false;
    // A resumes: its open breaks C's index lease, and with nothing to apply it fills the index
    // from the seed; nothing in open, runApply's caught-up path or fill asks whether A still
    // holds the seed.
    // (A fix may instead make this run fail: it no longer holds the seed.)
    await interleaving(
      PageBlobClient.prototype,
      'create',
      async (blob) => {
        if (stalled || !blob.name.endsWith('.sums')) return;
        stalled = true;
        await seed.getBlobLeaseClient().breakLease(0); // A's lease lapses
        c = (await SeedLease.acquire(seed, 60))!;
        indexC = await ChecksumIndex.open(deps.seed, seed, machine, 'd0', size, c);
      },
      () => applyChangelogs(deps, { machine, disk: 'd0' }).catch(() => undefined),
    );
    expect(stalled).toBe(true);

    try {
      // C, the seed's rightful writer, applies a segment to region 0: it forgets the region first
      // (its bitmap has the region unknown, so no request and nothing fails), then writes.
      await indexC!.invalidate([[0, INDEX_BLOCK_BYTES]]);
      await seed.uploadPages(Buffer.alloc(INDEX_BLOCK_BYTES, 2), 0, INDEX_BLOCK_BYTES, {
        conditions: { leaseId: c!.leaseId },
      });

      // A resync now asks for the checksums: every claimed digest must be the seed's.
      const seedBytes = await readWhole(seed, size);
      const claimed = (await readChecksumIndex(deps.seed, machine, 'd0', size, 0, size))!;
      expect(wrongClaims(claimed, seedBytes, 0)).toEqual([]);
      const sums = await blockChecksums(deps, { machine, disk: 'd0', blockSize: INDEX_BLOCK_BYTES });
      expect(sums.digests.subarray(0, 32).equals(sha(seedBytes.subarray(0, INDEX_BLOCK_BYTES)))).toBe(true);
    } finally {
      await c?.release();
    }
  });

  it("a stalled applier's fill cannot mark regions known across the failback's copy onto the seed", async () => {
    const deps = testDeps(connection, { leaseSeconds: 60 });
    const machine = uniqueMachine('idxcopy');
    const size = 2 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const seed = seedBlob(deps.seed, machine, 'd0');
    await seed.uploadPages(Buffer.alloc(MiB, 1), 0, MiB);
    // What the failback copies onto the seed (its final snapshot, here a blob beside it).
    const source = deps.seed.getPageBlobClient(`${machine}/final.img`);
    await source.create(size);
    await source.uploadPages(Buffer.alloc(MiB, 0x33), 0, MiB);

    // Applier A takes the seed lease, then stalls past it before opening the index.
    const a = (await SeedLease.acquire(seed, 60))!;
    await seed.getBlobLeaseClient().breakLease(0);
    // The failback takes the seed and discards the index (resumeForwardProtection's order).
    const failback = (await SeedLease.acquire(seed, 60))!;
    try {
      await discardChecksumIndex(deps.seed, machine, 'd0');
      // A resumes: open creates a fresh index under A's id (nothing to break), and the fill hashes
      // the seed; the copy lands between the fill's reads and its writes.
      const copy = async () => {
        const poller = await seed.beginCopyFromURL(source.url, {
          intervalInMs: 50,
          conditions: { leaseId: failback.leaseId },
        });
        await poller.pollUntilDone();
      };
      // (A fix may instead refuse the open or the fill: A no longer holds the seed.)
      const indexA = await ChecksumIndex.open(deps.seed, seed, machine, 'd0', size, a).catch(() => undefined);
      let copied = false;
      await interleaving(
        PageBlobClient.prototype,
        'uploadPages',
        async (blob) => {
          if (copied || !blob.name.endsWith('.sums')) return;
          copied = true;
          await copy();
        },
        async () => indexA?.fill({ deadline: Date.now() + 60_000 }).catch(() => undefined),
      );
      if (!copied) await copy();
    } finally {
      await a.release();
      await failback.release();
    }
    // The failback's resync compares against this: every claimed digest must be the seed's.
    const seedBytes = await readWhole(seed, size);
    expect(seedBytes.subarray(0, MiB).equals(Buffer.alloc(MiB, 0x33))).toBe(true);
    const claimed = await readChecksumIndex(deps.seed, machine, 'd0', size, 0, size);
    if (claimed) expect(wrongClaims(claimed, seedBytes, 0)).toEqual([]);
  });

  it('the endpoint never pairs the bitmap of one index with the digests of a rebuilt one', async () => {
    // 4 GiB is 4096 regions: a one-page bitmap. One more MiB needs a second bitmap page, so every
    // digest of the rebuilt index sits 512 bytes (one region) further on.
    const oldSize = 4 * GiB;
    const newSize = 4 * GiB + MiB;
    const deps = testDeps(connection, { leaseSeconds: 60 });
    const machine = uniqueMachine('idxshift');
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: oldSize }], policy: {} });
    const seed = seedBlob(deps.seed, machine, 'd0');
    // Region 0 never written (zeros); region 1 holds data.
    await seed.uploadPages(Buffer.alloc(MiB, 0x5a), MiB, MiB);

    // The old index knows regions 0 and 1 (the first fill batch).
    const firstBatchOnly = () => {
      let asked = 0;
      return async () => ++asked > 1;
    };
    const lease = (await SeedLease.acquire(seed, 60))!;
    try {
      const index = await ChecksumIndex.open(deps.seed, seed, machine, 'd0', oldSize, lease);
      await index.fill({ deadline: Date.now() + 60_000, stop: firstBatchOnly() });
    } finally {
      await lease.release();
    }

    // An endpoint request that read the disk row before the disk grew reads the old index's
    // bitmap; then the disk grows and an applier rebuilds and fills the index for the new size;
    // then the request reads its digests, at the old layout's offsets, from the new blob.
    let indexReads = 0;
    const claimed = await interleaving(
      BlobClient.prototype,
      'download',
      async (blob) => {
        if (!blob.name.endsWith('.sums') || ++indexReads !== 2) return;
        const grower = (await SeedLease.acquire(seed, 60))!;
        try {
          await seed.resize(newSize, { conditions: { leaseId: grower.leaseId } });
          const rebuilt = await ChecksumIndex.open(deps.seed, seed, machine, 'd0', newSize, grower);
          await rebuilt.fill({ deadline: Date.now() + 60_000, stop: firstBatchOnly() });
        } finally {
          await grower.release();
        }
      },
      () => readChecksumIndex(deps.seed, machine, 'd0', oldSize, MiB, 2 * MiB),
    );
    expect(indexReads).toBeGreaterThanOrEqual(2);
    const seedBytes = Buffer.alloc(2 * MiB);
    (await seed.downloadToBuffer(0, 2 * MiB)).copy(seedBytes);
    // Region 1 holds 0x5a bytes; an agent whose region 1 is now zeros must be told they differ.
    // (Today each of its 16 blocks is claimed with the digest of a zero block: region 0's digest
    // in the rebuilt index, read through the old layout's offsets.)
    if (claimed) expect(wrongClaims(claimed, seedBytes, MiB)).toEqual([]);
  });
});
