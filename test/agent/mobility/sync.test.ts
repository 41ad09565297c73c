/**
 * Initial replication = resync: only blocks whose checksum differs from the cloud copy are
 * shipped (all-zero ones as zero records), writes keep replicating during the pass, no marker is
 * cut before it completes, and progress is reported. Also the scan source with freeze/thaw hooks.
 */
import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { MachineAgent } from '../../../agent/mobility/agent';
import type { DiskSegmenter } from '../../../agent/mobility/segmenter';
import {
  ImageFileChecksums,
  runResync,
  SyncInterruptedError,
  type RemoteChecksums,
  type SyncDevice,
  type SyncProgress,
} from '../../../agent/mobility/sync';
import { prng } from '../../helpers/random';
import {
  MiB,
  TestProxy,
  assertSameBytes,
  makeImage,
  newAgent,
  runTool,
  tempDir,
  waitFor,
} from './agent-harness';

const BLOCK = 64 * 1024;

describe('initial replication and scanning', () => {
  let dir: string;
  let proxy: TestProxy;
  let agent: MachineAgent | undefined;

  beforeEach(async () => {
    dir = tempDir('sync');
    proxy = new TestProxy();
    await proxy.start();
  });
  afterEach(async () => {
    await agent?.stop();
    agent = undefined;
    await proxy.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('ships only differing blocks, zero blocks as zero records, keeps replicating writes, cuts no marker until done', async () => {
    const size = 8 * MiB;
    const blocks = size / BLOCK;
    // The local disk: random data with some all-zero blocks.
    const local = randomBytes(size);
    for (let b = 0; b < blocks; b += 5) local.fill(0, b * BLOCK, (b + 1) * BLOCK);
    // The cloud copy: equal except for every 7th block (stale data) — some of those are zero locally.
    const cloud = Buffer.from(local);
    const differing = new Set<number>();
    for (let b = 0; b < blocks; b += 7) {
      randomBytes(BLOCK).copy(cloud, b * BLOCK);
      differing.add(b);
    }
    const image = makeImage(dir, 'd0', size, (buf) => local.copy(buf));
    const cloudFile = makeImage(dir, 'cloud', size, (buf) => cloud.copy(buf));
    const progress: SyncProgress[] = [];
    const skipped: string[] = [];
    agent = newAgent(proxy, {
      disks: [{ id: 'd0', path: image }],
      journalDir: path.join(dir, 'journal'),
      remoteChecksums: () => new ImageFileChecksums(cloudFile, BLOCK),
    });
    agent.on('progress', (e: { progress: SyncProgress }) => progress.push(e.progress));
    agent.on('marker-skipped', (e: { reason: string }) => skipped.push(e.reason));
    await agent.start();
    // Writes while the sync runs (it may finish first on a fast machine; markers are tried throughout).
    // They land only in blocks that differ anyway and are not zero, so whichever comes first — the
    // write or the sync's comparison — the sync ships exactly the differing blocks.
    const uri = `nbd://127.0.0.1:${agent.nbd?.port}/d0`;
    const writes = runTool('nbdsh', [
      '-u',
      uri,
      '-c',
      `
import os, random
random.seed(5)
blocks = [b for b in range(0, ${blocks}, 7) if b % 5 != 0]
for i in range(300):
    n = random.randint(1, 16) * 512
    b = random.choice(blocks)
    h.pwrite(os.urandom(n), b * ${BLOCK} + random.randrange(0, (${BLOCK} - n) // 512 + 1) * 512)
h.flush()
`,
    ]);
    let marker: string | undefined;
    while (!marker) {
      const m = await agent.cutMarker('crash');
      if (m) marker = m.id;
      else await new Promise((r) => setTimeout(r, 5));
    }
    await writes;
    const last = (await agent.cutMarker('crash'))!.id;
    await agent.settled();

    // Markers were refused while the initial sync ran.
    expect(skipped.length).toBeGreaterThan(0);
    expect(skipped[0]).toMatch(/resync mode/);
    // The first marker comes after every sync record.
    const segs = proxy.decoded('d0');
    const firstMarkerSeg = segs.findIndex((s) => s.records.some((r) => r.type === 'marker'));
    expect(segs[firstMarkerSeg].records.some((r) => r.type === 'marker' && r.id === marker)).toBe(true);
    // What the sync shipped, before the first marker: exactly the differing blocks (writes coalesced later may merge).
    const final = progress[progress.length - 1];
    expect(final.percent).toBe(100);
    expect(final.doneBytes).toBe(size);
    expect(final.shippedBytes).toBe(differing.size * BLOCK);
    const zeroDiffering = [...differing].filter((b) => b % 5 === 0).length;
    expect(final.zeroBytes).toBe(zeroDiffering * BLOCK);
    const zeroRecords = segs
      .slice(0, firstMarkerSeg + 1)
      .flatMap((s) => s.records.filter((r) => r.type === 'zero'));
    expect(zeroRecords.length).toBeGreaterThan(0);
    // Replayed onto the cloud copy, the stream reproduces the disk.
    assertSameBytes(
      proxy.replay('d0', size, last, cloud),
      fs.readFileSync(image),
      'cloud copy after sync and writes',
    );
  });

  it('scan source: ships changed blocks between scans, zeroed blocks as zero records, inside freeze/thaw hooks', async () => {
    const size = 2 * MiB;
    const image = makeImage(dir, 'd0', size, (b) => randomBytes(MiB).copy(b));
    const hookLog = path.join(dir, 'hooks.log');
    agent = newAgent(proxy, {
      disks: [{ id: 'd0', path: image }],
      journalDir: path.join(dir, 'journal'),
      source: 'scan',
      freezeCommand: `echo freeze >> ${hookLog}`,
      thawCommand: `echo thaw >> ${hookLog}`,
    });
    await agent.start();
    // First scan = initial sync against an empty cloud disk; no marker yet.
    expect(await agent.scanCycle()).toBeUndefined();
    await waitFor(() => agent!.status().disks[0].mode === 'data', 'the first scan to complete');
    const m1 = await agent.scanCycle();
    expect(m1?.kind).toBe('app');
    assertSameBytes(proxy.replay('d0', size), fs.readFileSync(image), 'after the first scans');
    // Change some blocks, zero one, scan again.
    const fd = fs.openSync(image, 'r+');
    fs.writeSync(fd, randomBytes(4096), 0, 4096, 3 * BLOCK + 512);
    fs.writeSync(fd, Buffer.alloc(BLOCK), 0, BLOCK, 5 * BLOCK);
    fs.writeSync(fd, randomBytes(BLOCK), 0, BLOCK, 20 * BLOCK);
    fs.closeSync(fd);
    const before = proxy.decoded('d0').length;
    const m2 = (await agent.scanCycle())!;
    await agent.settled();
    const fresh = proxy
      .decoded('d0')
      .slice(before)
      .flatMap((s) => s.records);
    expect(fresh.filter((r) => r.type === 'write').map((r) => (r.type === 'write' ? r.offset : -1))).toEqual([
      3 * BLOCK,
      20 * BLOCK,
    ]);
    expect(fresh.filter((r) => r.type === 'zero').map((r) => (r.type === 'zero' ? r.offset : -1))).toEqual([
      5 * BLOCK,
    ]);
    assertSameBytes(proxy.replay('d0', size, m2.id), fs.readFileSync(image), 'after the third scan');
    expect(fs.readFileSync(hookLog, 'utf8').trim().split('\n')).toEqual([
      'freeze',
      'thaw',
      'freeze',
      'thaw',
      'freeze',
      'thaw',
    ]);
  });

  it('a failed freeze hook is reported, thaw still runs, and the marker is crash-consistent', async () => {
    const size = MiB;
    const image = makeImage(dir, 'd0', size);
    const hookLog = path.join(dir, 'hooks.log');
    agent = newAgent(proxy, {
      disks: [{ id: 'd0', path: image }],
      journalDir: path.join(dir, 'journal'),
      freezeCommand: 'echo cannot freeze >&2; exit 3',
      thawCommand: `echo thaw >> ${hookLog}`,
      appIntervalSeconds: 3600,
    });
    await agent.start();
    await agent.settled();
    const m = (await agent.cutAppMarker())!;
    expect(m.kind).toBe('crash');
    expect(m.tag).toMatch(/freeze failed \(exit 3\)/);
    const s = agent.status();
    expect(s.lastHookFailure?.hook).toBe('freeze');
    expect(s.lastHookFailure?.output).toMatch(/cannot freeze/);
    expect(fs.readFileSync(hookLog, 'utf8').trim()).toBe('thaw');
  });
});

describe('runResync (the comparison pipeline, against an independent model)', () => {
  const KiB = 1024;
  const BLK = 64 * KiB;
  // 3 MiB + 5 blocks + 1.5 KiB: 1 MiB chunks, the last chunk and the last block short.
  const size = 3 * MiB + 5 * BLK + 3 * 512;

  function model(seed: number): { local: Buffer; cloud: Buffer; differing: Set<number> } {
    const random = prng(seed);
    const local = Buffer.alloc(size);
    for (let i = 0; i < size; i++) local[i] = (random() * 256) | 0;
    // The cloud copy is shorter than the disk by the last block and a half: missing = differs.
    const cloud = Buffer.from(local.subarray(0, size - BLK - 3 * 512));
    const differing = new Set<number>();
    const change = (block: number, edit: (b: Buffer) => void) => {
      edit(local.subarray(block * BLK, Math.min(size, (block + 1) * BLK)));
      differing.add(block);
    };
    for (const b of [15, 16, 17]) change(b, (x) => (x[100] ^= 0xff)); // a run across a chunk boundary
    change(3, (x) => x.fill(0)); // data in the cloud, zeros here: a zero record
    change(47, (x) => (x[x.length - 1] ^= 1)); // the last block of a chunk
    const blocks = Math.ceil(size / BLK);
    differing.add(blocks - 2); // past the cloud copy's end
    differing.add(blocks - 1); // the short last block
    return { local, cloud, differing };
  }

  /** SHA-256 of the cloud copy's blocks, computed here; nothing past its end. */
  const remoteOf = (cloud: Buffer): RemoteChecksums => ({
    blockSize: BLK,
    checksums: async ({ offset, length }) => {
      const out: Buffer[] = [];
      for (let at = offset; at < Math.min(offset + length, cloud.length); at += BLK)
        out.push(
          createHash('sha256')
            .update(cloud.subarray(at, Math.min(cloud.length, at + BLK)))
            .digest(),
        );
      return out;
    },
  });

  /** `shared`: the device hands out views of one buffer (copied before hashing, never detached). */
  async function pass(shared: boolean, seed: number) {
    const { local, cloud, differing } = model(seed);
    const appended: { kind: string; offset: number; length: number; data?: Buffer }[] = [];
    let pauses = 0;
    const device: SyncDevice = {
      size,
      read: async (offset, length) =>
        shared
          ? local.subarray(offset, offset + length)
          : Buffer.from(local.subarray(offset, offset + length)),
      pause: async () => void pauses++,
      resume: () => undefined,
    };
    const segmenter = {
      mode: 'resync',
      disk: 'd0',
      append: (c: { kind: string; offset: number; length: number; data?: Buffer }) =>
        void appended.push({ ...c, data: c.data && Buffer.from(c.data) }),
    };
    const progress = await runResync({
      device,
      segmenter: segmenter as unknown as DiskSegmenter,
      remote: remoteOf(cloud),
      chunkBytes: MiB,
      readAhead: 3,
      hashThreads: 2,
    });
    return { local, cloud, differing, appended, progress, pauses };
  }

  for (const shared of [false, true]) {
    it(`appends exactly the differing blocks, zero blocks as zero records (${shared ? 'views of one buffer' : 'fresh buffers'})`, async () => {
      const { local, cloud, differing, appended, progress, pauses } = await pass(shared, shared ? 1 : 2);
      const blocksOf = (r: { offset: number; length: number }) => {
        const out: number[] = [];
        for (let at = r.offset; at < r.offset + r.length; at += BLK) out.push(at / BLK);
        return out;
      };
      expect(appended.flatMap(blocksOf).sort((a, b) => a - b)).toEqual([...differing].sort((a, b) => a - b));
      // Replaying the records over the cloud copy gives the disk.
      const replayed = Buffer.alloc(size);
      cloud.copy(replayed);
      for (const r of appended) {
        if (r.kind === 'zero') replayed.fill(0, r.offset, r.offset + r.length);
        else r.data!.copy(replayed, r.offset);
      }
      expect(replayed.equals(local)).toBe(true);
      expect(appended.filter((r) => r.kind === 'zero').map((r) => r.offset)).toEqual([3 * BLK]);
      const differingBytes = [...differing].reduce((n, b) => n + Math.min(BLK, size - b * BLK), 0);
      expect(progress).toMatchObject({ doneBytes: size, shippedBytes: differingBytes, zeroBytes: BLK });
      // One pause per run re-read: 3, 15-17 (split at the chunk boundary: 15 | 16-17), 47, the last two.
      expect(pauses).toBe(5);
    });
  }

  it('stops between chunks when asked, with a typed error', async () => {
    const { local, cloud } = model(3);
    let steps = 0;
    const err = await runResync({
      device: {
        size,
        read: async (offset, length) => Buffer.from(local.subarray(offset, offset + length)),
        pause: async () => undefined,
        resume: () => undefined,
      },
      segmenter: { mode: 'resync', disk: 'd0', append: () => undefined } as unknown as DiskSegmenter,
      remote: remoteOf(cloud),
      chunkBytes: MiB,
      shouldStop: () => ++steps > 2,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SyncInterruptedError);
    expect((err as Error).message).toMatch(/stopped at byte 2097152/);
  });
});
