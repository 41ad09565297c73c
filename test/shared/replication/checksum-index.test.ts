import { createHash } from 'node:crypto';
import { PageBlobClient } from '@azure/storage-blob';
import { describe, expect, inject, it } from 'vitest';
import { applyRecordsToImage } from '../../../shared/disk-model';
import {
  applyChangelogs,
  blockChecksums,
  ChecksumIndex,
  discardChecksumIndex,
  INDEX_BLOCK_BYTES,
  readChecksumIndex,
  registerMachine,
  REGION_BYTES,
  SeedLease,
  seedBlob,
} from '../../../shared/replication';
import type { Segment } from '../../../shared/segment';
import {
  applyUntilIdle,
  oneDiskWorkload,
  readWhole,
  testDeps,
  uniqueMachine,
  uploadSegment,
  type TestDeps,
} from './helpers';

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;

/** SHA-256 of each 64 KiB block of `image` (the last may be short): the independent answer. */
function modelDigests(image: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let at = 0; at < image.length; at += INDEX_BLOCK_BYTES)
    out.push(
      createHash('sha256')
        .update(image.subarray(at, Math.min(image.length, at + INDEX_BLOCK_BYTES)))
        .digest(),
    );
  return out;
}

/** What the index says of the whole disk: per block, its digest or undefined. */
async function indexView(deps: TestDeps, machine: string, disk: string, size: number) {
  const indexed = await readChecksumIndex(deps.seed, machine, disk, size, 0, size);
  if (!indexed) return undefined;
  return indexed.known.map((k, i) => (k ? indexed.digests.subarray(i * 32, i * 32 + 32) : undefined));
}

/** What the index claims per block: nothing at all when it is absent or not trusted. */
async function claimsOf(deps: TestDeps, machine: string, disk: string, size: number) {
  return (
    (await indexView(deps, machine, disk, size)) ??
    new Array<Buffer | undefined>(Math.ceil(size / INDEX_BLOCK_BYTES)).fill(undefined)
  );
}

/** Every digest the index claims to know equals the block's digest in `image`; returns how many. */
function expectKnownTrue(view: (Buffer | undefined)[], image: Buffer): number {
  const want = modelDigests(image);
  expect(view.length).toBe(want.length);
  let known = 0;
  view.forEach((d, i) => {
    if (!d) return;
    known++;
    expect(d.equals(want[i]), `block ${i}`).toBe(true);
  });
  return known;
}

async function expectEndpointMatches(deps: TestDeps, machine: string, disk: string, image: Buffer) {
  const sums = await blockChecksums(deps, { machine, disk, blockSize: INDEX_BLOCK_BYTES });
  expect(sums.nextOffset).toBeUndefined();
  expect(sums.digests.equals(Buffer.concat(modelDigests(image)))).toBe(true);
}

function imageAfter(size: number, segments: Segment[]): Buffer {
  const image = Buffer.alloc(size);
  for (const s of segments) applyRecordsToImage(image, s.records);
  return image;
}

describe('checksum index', () => {
  it('answers what the seed holds through random workloads: forgotten on writes, filled when idle', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const cold = testDeps(connection, { fillMs: 0 });
    const machine = uniqueMachine('idx');
    // Not a whole number of regions, and a short last block.
    const size = 64 * MiB + 70 * 1024;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const workload = oneDiskWorkload(machine, size, { ops: 500, seed: 11, recordsPerSegment: 25 });
    const segments = workload.segments.get('d0')!;
    expect(segments.length).toBeGreaterThan(6);
    // The last segment comes later: it touches some regions, not all.
    const half = segments.length - 1;

    // All but the last segment applied with the fill off: the index knows nothing, the endpoint hashes the seed.
    for (const s of segments.slice(0, half)) await uploadSegment(deps, s);
    await applyUntilIdle(cold, machine, 'd0');
    const middle = imageAfter(size, segments.slice(0, half));
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), size)).equals(middle)).toBe(true);
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), middle)).toBe(0);
    await expectEndpointMatches(deps, machine, 'd0', middle);

    // An idle run fills it: every block known, every digest the model's.
    const filled = await applyUntilIdle(deps, machine, 'd0');
    expect(filled[0].checksumIndex).toMatchObject({ unknown: 0 });
    expect(filled[0].checksumIndex!.regions).toBe(Math.ceil(size / REGION_BYTES));
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), middle)).toBe(
      Math.ceil(size / INDEX_BLOCK_BYTES),
    );
    await expectEndpointMatches(deps, machine, 'd0', middle);

    // The last segment, fill off again: the regions it wrote are forgotten, the rest still known.
    for (const s of segments.slice(half)) await uploadSegment(deps, s);
    await applyUntilIdle(cold, machine, 'd0');
    const final = workload.final.get('d0')!;
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), size)).equals(final)).toBe(true);
    const partly = await claimsOf(deps, machine, 'd0', size);
    const known = expectKnownTrue(partly, final);
    expect(known).toBeGreaterThan(0);
    expect(known).toBeLessThan(partly.length);
    await expectEndpointMatches(deps, machine, 'd0', final);

    await applyUntilIdle(deps, machine, 'd0');
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), final)).toBe(partly.length);
    await expectEndpointMatches(deps, machine, 'd0', final);
  });

  it('waits for the disk to be quiet before filling, with one delayed nudge however many runs ask', async () => {
    const deps = testDeps(connection, { fillQuietMs: 30_000 });
    const machine = uniqueMachine('idxquiet');
    const size = 4 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const workload = oneDiskWorkload(machine, size, { ops: 60, seed: 8 });
    for (const s of workload.segments.get('d0')!) await uploadSegment(deps, s);
    const busy = await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(busy.segments).toBeGreaterThan(0);
    expect(busy.checksumIndex).toBeUndefined();
    expect(busy.fillAfterSeconds).toBeGreaterThanOrEqual(29);
    expect(deps.nudges).toEqual([{ message: { machine, disk: 'd0' }, delaySeconds: busy.fillAfterSeconds }]);
    // Nothing applied since, but not quiet long enough: no fill, and no second nudge.
    const early = await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(early.segments).toBe(0);
    expect(early.checksumIndex).toBeUndefined();
    expect(deps.nudges).toHaveLength(1);
    // Once quiet (the same disk seen by an applier with a shorter quiet period), the run fills.
    const quiet = await applyChangelogs(testDeps(connection, { fillQuietMs: 0 }), { machine, disk: 'd0' });
    expect(quiet.checksumIndex).toMatchObject({ unknown: 0, regions: size / REGION_BYTES });
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), workload.final.get('d0')!)).toBe(
      size / INDEX_BLOCK_BYTES,
    );
  });

  it('never claims a stale digest while pages are being written, nor after a run that failed mid-way', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const machine = uniqueMachine('idxkill');
    const size = 2 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const workload = oneDiskWorkload(machine, size, { ops: 300, seed: 5, recordsPerSegment: 30 });
    const segments = workload.segments.get('d0')!;
    await uploadSegment(deps, segments[0]);
    await applyUntilIdle(deps, machine, 'd0'); // applied and filled
    for (const s of segments.slice(1)) await uploadSegment(deps, s);
    const real = {
      uploadPages: PageBlobClient.prototype.uploadPages,
      clearPages: PageBlobClient.prototype.clearPages,
    };
    const restore = () => Object.assign(PageBlobClient.prototype, real);
    for (const cutAfter of [3, 17, 40]) {
      // Page write number `cutAfter` (writes and clears alike) lands, then the applier hangs;
      // while it hangs (holding the disk and the index) a resync reads the index; then the
      // applier dies.
      let calls = 0;
      // Writes run several at a time: the hang starts once every earlier one has settled too, so
      // the seed holds still while the test reads it.
      const earlier: Promise<unknown>[] = [];
      let hung!: () => void;
      const hanging = new Promise<void>((resolve) => (hung = resolve));
      let resume!: () => void;
      const resumed = new Promise<void>((resolve) => (resume = resolve));
      // Every later write, and the hung one, fail once the applier is let go of.
      const die = resumed.then(() => Promise.reject(Object.assign(new Error('killed'), { statusCode: 500 })));
      die.catch(() => undefined);
      const hangAfterCut = (write: (...args: never[]) => Promise<unknown>) =>
        async function (this: PageBlobClient, ...args: never[]) {
          const n = ++calls;
          if (n > cutAfter) return die;
          const landing = write.apply(this, args);
          if (n < cutAfter) earlier.push(landing.catch(() => undefined));
          const response = await landing;
          if (n === cutAfter) {
            await Promise.all(earlier);
            hung();
            await resumed;
            return die;
          }
          return response;
        };
      Object.assign(PageBlobClient.prototype, {
        uploadPages: hangAfterCut(real.uploadPages),
        clearPages: hangAfterCut(real.clearPages),
      });
      const run = applyChangelogs(deps, { machine, disk: 'd0' });
      run.catch(() => undefined);
      try {
        await hanging;
        const seed = await readWhole(seedBlob(deps.seed, machine, 'd0'), size);
        const during = await indexView(deps, machine, 'd0', size);
        expect(during).toBeDefined(); // held by its applier: trusted
        expectKnownTrue(during!, seed);
        await expectEndpointMatches(deps, machine, 'd0', seed);
        resume();
        await expect(run).rejects.toThrow('killed');
      } finally {
        restore();
      }
      // The failed run's writes were drained and the index sealed: what it still claims is true.
      const after = await readWhole(seedBlob(deps.seed, machine, 'd0'), size);
      expectKnownTrue(await claimsOf(deps, machine, 'd0', size), after);
      await expectEndpointMatches(deps, machine, 'd0', after);
    }
    await applyUntilIdle(deps, machine, 'd0');
    // Runs until none asks to come back for the fill (the delayed nudges a deduplicated table
    // row may have folded into one sent earlier).
    for (let i = 0; (await applyChangelogs(deps, { machine, disk: 'd0' })).fillAfterSeconds; i++)
      expect(i).toBeLessThan(5);
    const final = workload.final.get('d0')!;
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), final)).toBe(size / INDEX_BLOCK_BYTES);
  });

  it('is not trusted once the seed was written by something that does not keep it (an older build)', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const machine = uniqueMachine('idxforeign');
    const size = 2 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const seed = seedBlob(deps.seed, machine, 'd0');
    const image = Buffer.alloc(size);
    await applyUntilIdle(deps, machine, 'd0'); // an empty disk, fully indexed
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), image)).toBe(size / INDEX_BLOCK_BYTES);
    // A writer that takes the seed lease and writes pages, and never touches the index.
    const other = (await SeedLease.acquire(seed, 15))!;
    await seed.uploadPages(Buffer.alloc(4096, 9), 0, 4096, { conditions: { leaseId: other.leaseId } });
    Buffer.alloc(4096, 9).copy(image);
    expect(await indexView(deps, machine, 'd0', size)).toBeUndefined();
    await other.release();
    expect(await indexView(deps, machine, 'd0', size)).toBeUndefined();
    await expectEndpointMatches(deps, machine, 'd0', image);
    // The next applier starts the index over and fills it from what the seed holds.
    await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), image)).toBe(size / INDEX_BLOCK_BYTES);
    await expectEndpointMatches(deps, machine, 'd0', image);
  });

  it('fences out an applier that lost the seed: its index writes fail and change nothing', async () => {
    const deps = testDeps(connection);
    const machine = uniqueMachine('idxfence');
    const size = 2 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const seed = seedBlob(deps.seed, machine, 'd0');
    const data = Buffer.alloc(MiB, 7);
    await seed.uploadPages(data, 0, data.length);
    const image = Buffer.alloc(size);
    data.copy(image);

    const a = (await SeedLease.acquire(seed, 15))!;
    const indexA = await ChecksumIndex.open(deps.seed, seed, machine, 'd0', size, a);
    expect((await indexA.fill({ deadline: Date.now() + 60_000 })).unknown).toBe(0);
    // A's seed lease lapses and B takes the disk over.
    await seed.getBlobLeaseClient().breakLease(0);
    const b = (await SeedLease.acquire(seed, 15))!;
    try {
      await ChecksumIndex.open(deps.seed, seed, machine, 'd0', size, b);
      await expect(indexA.invalidate([[0, 512]])).rejects.toMatchObject({ statusCode: 412 });
      await expect(a.renew()).rejects.toThrow(/could not be renewed/);
      expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', size), image)).toBe(
        size / INDEX_BLOCK_BYTES,
      );
    } finally {
      await a.release();
      await b.release();
    }
  });

  it('is rebuilt when the disk grows, and discarded (lease and all) before the seed is replaced', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const machine = uniqueMachine('idxgrow');
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: 2 * MiB }], policy: {} });
    const seed = seedBlob(deps.seed, machine, 'd0');
    await seed.uploadPages(Buffer.alloc(4096, 3), MiB, 4096);
    await applyUntilIdle(deps, machine, 'd0');
    expect(await indexView(deps, machine, 'd0', 2 * MiB)).toBeDefined();

    const grown = 2 * MiB + 64 * 1024 + 512;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: grown }], policy: {} });
    // Laid out for the old size: not used.
    expect(await indexView(deps, machine, 'd0', grown)).toBeUndefined();
    const image = Buffer.alloc(grown);
    Buffer.alloc(4096, 3).copy(image, MiB);
    await expectEndpointMatches(deps, machine, 'd0', image);
    await applyUntilIdle(deps, machine, 'd0');
    expect(expectKnownTrue(await claimsOf(deps, machine, 'd0', grown), image)).toBe(
      Math.ceil(grown / INDEX_BLOCK_BYTES),
    );

    // An applier's lease on the index does not keep it from being discarded.
    const lease = (await SeedLease.acquire(seed, 15))!;
    await ChecksumIndex.open(deps.seed, seed, machine, 'd0', grown, lease);
    await discardChecksumIndex(deps.seed, machine, 'd0');
    expect(await indexView(deps, machine, 'd0', grown)).toBeUndefined();
    await lease.release();
    await expectEndpointMatches(deps, machine, 'd0', image);
  });
});
