/**
 * Proxy faults: down for a while (the journal absorbs it), down long enough to overflow the
 * journal (bitmap mode, then catch-up with the right bytes and markers again), 429 + Retry-After,
 * and a 409 conflict (the disk is resynchronised against the cloud copy).
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { MachineAgent } from '../../../agent/mobility/agent';
import { parseRetryAfter } from '../../../agent/mobility/shipper';
import { blockChecksum, type RemoteChecksums } from '../../../agent/mobility/sync';
import { encodeSegment } from '../../../shared/segment';
import { MiB, TestProxy, assertSameBytes, makeImage, newAgent, tempDir, waitFor } from './agent-harness';

const TOOL_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}`, LC_ALL: 'C' };

/** Random aio writes / zeroes / trims with 8 in flight; waits for all and flushes. */
const AIO = String.raw`
import os, random, nbd
random.seed(SEED)
size = h.get_size()
def done(err):
    if err.value != 0:
        raise Exception('I/O error %d' % err.value)
    return 1
for i in range(OPS):
    while h.aio_in_flight() >= 8:
        h.poll(-1)
    l = random.randint(1, MAXSECT) * 512
    o = random.randrange(0, (size - l) // 512) * 512
    r = random.random()
    if r < 0.8:
        h.aio_pwrite(bytearray(os.urandom(l)), o, done)
    elif r < 0.9:
        h.aio_zero(l, o, done)
    else:
        h.aio_trim(l, o, done)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
`;

function workload(uri: string, seed: number, ops: number, maxSectors = 64): Promise<void> {
  const script = AIO.replace('SEED', String(seed))
    .replace('OPS', String(ops))
    .replace('MAXSECT', String(maxSectors));
  return new Promise((resolve, reject) => {
    const child = spawn('nbdsh', ['-u', uri, '-c', script], {
      env: TOOL_ENV,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`nbdsh exited ${code}: ${err}`))));
  });
}

/** The cloud copy's checksums, computed from what the proxy holds (replayed with the reference model). */
class ProxyReplayChecksums implements RemoteChecksums {
  readonly blockSize = 64 * 1024;
  constructor(
    private readonly proxy: TestProxy,
    private readonly disk: string,
    private readonly size: number,
  ) {}
  async checksums(range: { offset: number; length: number }): Promise<Buffer[]> {
    const image = this.proxy.replay(this.disk, this.size);
    const out: Buffer[] = [];
    for (let at = range.offset; at < range.offset + range.length; at += this.blockSize)
      out.push(blockChecksum(image.subarray(at, Math.min(range.offset + range.length, at + this.blockSize))));
    return out;
  }
}

describe('agent under proxy faults', () => {
  let dir: string;
  let proxy: TestProxy;
  let agent: MachineAgent | undefined;
  const size = 4 * MiB;
  let image: string;
  const snapshots = new Map<string, Buffer>();
  /**
   * Every 'mode' event since the agent was created. A mode event comes after the mode is saved,
   * so it trails `status().mode` (and the initial sync's 'data' can come after `settled()`).
   */
  let modes: string[] = [];

  beforeEach(async () => {
    dir = tempDir('faults');
    proxy = new TestProxy();
    await proxy.start();
    image = makeImage(dir, 'd0', size);
    snapshots.clear();
    modes = [];
  });
  afterEach(async () => {
    await agent?.stop();
    agent = undefined;
    await proxy.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function start(
    extra: Parameters<typeof newAgent>[1] extends infer T ? Partial<T> : never = {},
  ): Promise<void> {
    agent = newAgent(proxy, {
      disks: [{ id: 'd0', path: image }],
      journalDir: path.join(dir, 'journal'),
      whilePaused: (m) => void snapshots.set(m.id, fs.readFileSync(image)),
      ...extra,
    });
    agent.on('mode', (e: { mode: string }) => modes.push(e.mode));
    return agent.start();
  }

  function checkMarkers(markers: string[]): void {
    expect(proxy.markers('d0')).toEqual(markers);
    for (const id of markers)
      assertSameBytes(proxy.replay('d0', size, id), snapshots.get(id) as Buffer, `disk at marker ${id}`);
    assertSameBytes(proxy.replay('d0', size), fs.readFileSync(image), 'final disk');
  }

  it('absorbs a proxy outage in the journal and ships everything, markers included, when it returns', async () => {
    await start();
    await agent!.settled();
    const uri = `nbd://127.0.0.1:${agent!.nbd?.port}/d0`;
    proxy.behaviour = 'down';
    const markers: string[] = [];
    for (let round = 0; round < 3; round++) {
      await workload(uri, 100 + round, 300);
      markers.push((await agent!.cutMarker('crash'))!.id);
    }
    await agent!.cutAll();
    await waitFor(
      () => agent!.status().disks[0].shipper.reachable === false,
      'the shipper to notice the outage',
    );
    const during = agent!.status().disks[0];
    expect(during.mode).toBe('data');
    expect(during.backlogSegments).toBeGreaterThan(3);
    expect(proxy.answers.created).toBe(0);
    proxy.behaviour = 'up';
    await agent!.settled();
    checkMarkers(markers);
    expect(agent!.status().rpoSeconds).not.toBeNull();
  });

  it('overflows into bitmap mode, catches up with the right bytes, then cuts markers again', async () => {
    await start({ segment: { maxJournalBytes: 512 * 1024, maxSegmentBytes: 64 * 1024 } });
    await agent!.settled();
    const uri = `nbd://127.0.0.1:${agent!.nbd?.port}/d0`;
    const skipped: string[] = [];
    agent!.on('marker-skipped', (e: { reason: string }) => skipped.push(e.reason));
    const markers: string[] = [];
    const m0 = await agent!.cutMarker('crash');
    expect(m0, skipped.join('; ')).toBeDefined();
    markers.push(m0!.id);
    proxy.behaviour = 'down';
    await workload(uri, 7, 600);
    expect(agent!.status().disks[0].mode).toBe('bitmap');
    expect(agent!.status().disks[0].dirtyBlocks).toBeGreaterThan(0);
    expect(await agent!.cutMarker('crash')).toBeUndefined();
    expect(skipped[0]).toMatch(/bitmap mode/);
    // Back online, with writes going on during the catch-up.
    proxy.behaviour = 'up';
    const during = workload(uri, 8, 400);
    let finished = false;
    void during.finally(() => (finished = true));
    while (!finished) {
      const m = await agent!.cutMarker('crash');
      if (m) markers.push(m.id);
      await new Promise((r) => setTimeout(r, 20));
    }
    await during;
    // The mode is 'data' a moment before its event: wait for both (no writes now, so no later mode).
    await waitFor(
      () => agent!.status().disks[0].mode === 'data' && modes[modes.length - 1] === 'data',
      'the catch-up to finish',
    );
    markers.push((await agent!.cutMarker('crash'))!.id);
    await agent!.settled();
    expect(modes).toContain('bitmap');
    expect(modes).toContain('catchup');
    expect(modes[modes.length - 1]).toBe('data');
    checkMarkers(markers);
  });

  it('honours 429 + Retry-After and delivers every segment once the proxy accepts again', async () => {
    expect(parseRetryAfter('3')).toBe(3000);
    expect(parseRetryAfter(new Date(Date.now() + 60_000).toUTCString())).toBeGreaterThan(50_000);
    await start();
    await agent!.settled();
    const uri = `nbd://127.0.0.1:${agent!.nbd?.port}/d0`;
    proxy.behaviour = 'throttle';
    await workload(uri, 3, 300);
    const m = (await agent!.cutMarker('crash'))!.id;
    await waitFor(() => proxy.answers.throttled > 0, 'a 429');
    proxy.behaviour = 'up';
    await agent!.settled();
    checkMarkers([m]);
  });

  it('resynchronises a disk whose segment conflicts with what the proxy holds', async () => {
    await start({ remoteChecksums: () => new ProxyReplayChecksums(proxy, 'd0', size) });
    await agent!.settled();
    // The initial sync's 'data' event can come after settled(): see it before counting modes.
    await waitFor(() => modes[modes.length - 1] === 'data', 'the initial sync to end');
    const uri = `nbd://127.0.0.1:${agent!.nbd?.port}/d0`;
    const first = (await agent!.cutMarker('crash'))!;
    await agent!.settled();
    // Someone else's segment at the next seq: different bytes.
    const seq = first.seqs.d0 + 1;
    const now = Date.now();
    proxy.disk('d0').set(
      seq,
      encodeSegment({
        header: { machine: 'm1', disk: 'd0', epoch: 0, seq, firstWriteTime: now, lastWriteTime: now },
        records: [{ type: 'write', offset: 0, data: Buffer.alloc(64 * 1024, 0xee) }],
      }),
    );
    const before = modes.length;
    await workload(uri, 9, 200);
    await agent!.cutAll();
    await waitFor(() => proxy.answers.conflict > 0, 'a 409');
    await waitFor(() => modes.slice(before).includes('data'), 'the resync to finish');
    const m = (await agent!.cutMarker('crash'))!.id;
    await agent!.settled();
    expect(modes.slice(before)).toEqual(['resync', 'data']);
    assertSameBytes(
      proxy.replay('d0', size, m),
      snapshots.get(m) as Buffer,
      'disk at the marker after the resync',
    );
    assertSameBytes(proxy.replay('d0', size), fs.readFileSync(image), 'final disk');
  });
});
