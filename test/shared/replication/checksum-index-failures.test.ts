import { createHash } from 'node:crypto';
import type { TableClient } from '@azure/data-tables';
import { describe, expect, inject, it, vi } from 'vitest';
import { PageBlobClient } from '@azure/storage-blob';
import {
  applyChangelogs,
  ChecksumIndex,
  INDEX_BLOCK_BYTES,
  SeedLease,
  seedBlob,
  readChecksumIndex,
  registerMachine,
  TABLES,
  type ReplicationDeps,
} from '../../../shared/replication';
import { oneDiskWorkload, testDeps, uniqueMachine, uploadSegment, type TestDeps } from './helpers';

// Failures around the checksum index: a lost nudge, a failed run, an index that cannot be opened,
// and the cost of filling a large disk that is mostly never written.

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;

async function knownBlocks(deps: ReplicationDeps, machine: string, disk: string, size: number) {
  const indexed = await readChecksumIndex(deps.seed, machine, disk, size, 0, size);
  return indexed ? indexed.known.filter(Boolean).length : 0;
}

describe('checksum index failures and costs', () => {
  it('a fill nudge whose send failed is sent again when the run is retried', async () => {
    const deps = testDeps(connection, { fillQuietMs: 30_000 });
    const machine = uniqueMachine('r2nudge');
    const size = 4 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const workload = oneDiskWorkload(machine, size, { ops: 20, seed: 3 });
    for (const s of workload.segments.get('d0')!) await uploadSegment(deps, s);
    // The queue refuses the first message (a transient failure): the run throws, and the
    // Functions host retries the same changelog-ready message.
    let failures = 1;
    const flaky: TestDeps = {
      ...deps,
      nudge: async (message, delaySeconds) => {
        if (failures-- > 0) throw new Error('queue unavailable');
        deps.nudges.push({ message, delaySeconds });
      },
    };
    await expect(applyChangelogs(flaky, { machine, disk: 'd0' })).rejects.toThrow('queue unavailable');
    const retried = await applyChangelogs(flaky, { machine, disk: 'd0' });
    expect(retried.fillAfterSeconds).toBeGreaterThan(0);
    // Something must be on its way to wake the disk for its fill; the nudges row says one is,
    // so nothing is sent, and nothing will come until the agent writes again.
    expect(deps.nudges).toHaveLength(1);
  });

  it('a run that fails after writing forgets only the regions it wrote, not the whole index', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const cold = testDeps(connection, { fillMs: 0 });
    const machine = uniqueMachine('r2fail');
    const size = 16 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    // An empty disk, fully indexed.
    await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(await knownBlocks(deps, machine, 'd0', size)).toBe(size / INDEX_BLOCK_BYTES);

    // One small change log (the first 4 KiB), applied by a run whose cursor update fails with a
    // transient error after the page writes (a 503 from the table service, say).
    const workload = oneDiskWorkload(machine, 1 * MiB, { ops: 3, seed: 5 });
    const segment = workload.segments.get('d0')![0];
    await uploadSegment(deps, segment);
    const disks = await deps.tables.get(TABLES.disks);
    let updates = 0;
    const failing = new Proxy(disks, {
      get(target, prop, receiver) {
        if (prop === 'updateEntity')
          return (...args: Parameters<TableClient['updateEntity']>) => {
            // The update that moves the cursor past the applied change log (its pages are written).
            if ('lastAppliedAt' in args[0] && ++updates === 1)
              return Promise.reject(new Error('table service unavailable'));
            return target.updateEntity(...args);
          };
        const value = Reflect.get(target, prop, receiver) as unknown;
        return typeof value === 'function' ? (value as (...a: unknown[]) => unknown).bind(target) : value;
      },
    });
    const flaky: ReplicationDeps = {
      ...cold,
      tables: {
        get: async (name: string) => (name === TABLES.disks ? failing : deps.tables.get(name as never)),
      } as unknown as ReplicationDeps['tables'],
    };
    await expect(applyChangelogs(flaky, { machine, disk: 'd0' })).rejects.toThrow(
      'table service unavailable',
    );
    // The retry applies the change log again (fill off, so nothing is refilled).
    await applyChangelogs(cold, { machine, disk: 'd0' });
    // Only the regions the change log touched (within the first MiB) should have been forgotten.
    expect(await knownBlocks(deps, machine, 'd0', size)).toBeGreaterThanOrEqual(
      (size - 1 * MiB) / INDEX_BLOCK_BYTES,
    );
  });

  it('applies without the index when it cannot be opened, after deleting it', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const machine = uniqueMachine('idxopen');
    const size = 4 * MiB;
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    await applyChangelogs(deps, { machine, disk: 'd0' }); // an index, filled
    expect(await knownBlocks(deps, machine, 'd0', size)).toBe(size / INDEX_BLOCK_BYTES);
    const workload = oneDiskWorkload(machine, size, { ops: 40, seed: 9 });
    for (const s of workload.segments.get('d0')!) await uploadSegment(deps, s);
    const open = ChecksumIndex.open;
    ChecksumIndex.open = () => Promise.reject(new Error('index storage unavailable'));
    try {
      const report = await applyChangelogs(deps, { machine, disk: 'd0' });
      expect(report.segments).toBe(workload.segments.get('d0')!.length);
    } finally {
      ChecksumIndex.open = open;
    }
    const seed = await seedBlob(deps.seed, machine, 'd0').downloadToBuffer(0, size);
    expect(seed.equals(workload.final.get('d0')!)).toBe(true);
    // Nobody kept it during that run: it is gone, not left for the endpoint to trust.
    expect(await readChecksumIndex(deps.seed, machine, 'd0', size, 0, size)).toBeUndefined();
  });

  it('fills a large disk that is mostly never written with one listing per 4 GiB and reads only what was written', async () => {
    const deps = testDeps(connection, { fillQuietMs: 0 });
    const machine = uniqueMachine('idxsparse');
    const size = 40 * 1024 * MiB + 64 * 1024; // 40 GiB and a block: 40,961 regions
    await registerMachine(deps, machine, { disks: [{ id: 'd0', sizeBytes: size }], policy: {} });
    const seed = seedBlob(deps.seed, machine, 'd0');
    const written = [0, 17 * 1024 * MiB + 5 * 4096, size - 4096];
    for (const at of written) await seed.uploadPages(Buffer.alloc(4096, 0x42), at, 4096);
    // Calls go through as usual; the spy records which blob each was made on.
    const spy = vi.spyOn(PageBlobClient.prototype, 'listPageRanges');
    let report;
    let listings;
    const lease = (await SeedLease.acquire(seed, 15))!;
    try {
      const index = await ChecksumIndex.open(deps.seed, seed, machine, 'd0', size, lease);
      report = await index.fill({ deadline: Date.now() + 120_000 });
      listings = spy.mock.contexts.filter((blob) => blob.name.endsWith('.img')).length;
    } finally {
      spy.mockRestore();
      await lease.release();
    }
    expect(report).toMatchObject({ unknown: 0, regions: 40 * 1024 + 1 });
    expect(listings).toBe(Math.ceil((40 * 1024 + 1) / 4096));
    // Three regions read (the last one is the short region of one block).
    expect(report.bytesRead).toBe(2 * MiB + 64 * 1024);
    // Every written block's digest, and zero blocks around them.
    const zero = createHash('sha256').update(Buffer.alloc(INDEX_BLOCK_BYTES)).digest();
    for (const at of written) {
      const block = Math.floor(at / INDEX_BLOCK_BYTES) * INDEX_BLOCK_BYTES;
      const bytes = await seed.downloadToBuffer(block, Math.min(INDEX_BLOCK_BYTES, size - block));
      const got = (await readChecksumIndex(
        deps.seed,
        machine,
        'd0',
        size,
        block,
        Math.min(size, block + 2 * INDEX_BLOCK_BYTES),
      ))!;
      expect(got.known[0]).toBe(true);
      expect(got.digests.subarray(0, 32).equals(createHash('sha256').update(bytes).digest())).toBe(true);
      if (got.known.length > 1) expect(got.digests.subarray(32, 64).equals(zero)).toBe(true);
    }
  });
});
