/**
 * Write order and consistent cuts: random multi-request workloads from real NBD clients (nbdsh,
 * aio) while markers are cut; the segments the proxy received, replayed with the reference disk
 * model up to each marker, must equal the disk as it was at that marker (read while the exports
 * were paused for the cut), and on two disks every marker must be one consistent cut.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { MachineAgent } from '../../../agent/mobility/agent';
import { MiB, TestProxy, assertSameBytes, makeImage, newAgent, tempDir } from './agent-harness';

const TOOL_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}`, LC_ALL: 'C' };

/** nbdsh aio workload: random writes, zeroes, trims, flushes and reads with up to 16 in flight. */
const AIO = String.raw`
import os, random, nbd, json
random.seed(SEED)
errors = []
def done(err):
    if err.value != 0:
        errors.append(err.value)
    return 1
size = h.get_size()
lo, hi = LO, min(HI, size)
for i in range(OPS):
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    r = random.random()
    l = random.randint(1, 64) * 512
    o = lo + random.randrange(0, (hi - lo - l) // 512) * 512
    if r < 0.7:
        h.aio_pwrite(bytearray(os.urandom(l)), o, done, nbd.CMD_FLAG_FUA if random.random() < 0.05 else 0)
    elif r < 0.8:
        h.aio_zero(l, o, done)
    elif r < 0.9:
        h.aio_trim(l, o, done)
    elif r < 0.93:
        h.aio_flush(done)
    else:
        h.aio_pread(bytearray(l), o, done)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
print(json.dumps({'errors': errors}))
`;

/** Causal chain across two disks: block k of d1 gets generation g only after d0's block k has it. */
const CHAIN = String.raw`
import random, struct, nbd, json
random.seed(SEED)
h0 = nbd.NBD(); h0.connect_uri(U0)
h1 = nbd.NBD(); h1.connect_uri(U1)
for g in range(1, GENS + 1):
    k = random.randrange(0, BLOCKS)
    data = struct.pack('<Q', g) * 512
    h0.pwrite(data, k * 4096)
    h1.pwrite(data, k * 4096)
h0.flush(); h1.flush()
h0.shutdown(); h1.shutdown()
print(json.dumps({'gens': GENS}))
`;

function runNbdsh(args: string[]): { done: Promise<string>; finished: () => boolean } {
  let finished = false;
  const child = spawn('nbdsh', args, { env: TOOL_ENV, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  child.stderr.on('data', (c: Buffer) => (err += c.toString()));
  const done = new Promise<string>((resolve, reject) =>
    child.on('close', (code) => {
      finished = true;
      if (code === 0) resolve(out);
      else reject(new Error(`nbdsh exited ${code}: ${err}`));
    }),
  );
  return { done, finished: () => finished };
}

function aio(uri: string, seed: number, ops: number, lo: number, hi: number) {
  const script = AIO.replace('SEED', String(seed))
    .replace('OPS', String(ops))
    .replace('LO', String(lo))
    .replace('HI', String(hi));
  return runNbdsh(['-u', uri, '-c', script]);
}

describe('markers over NBD', () => {
  let dir: string;
  let proxy: TestProxy;
  let agent: MachineAgent | undefined;

  beforeEach(async () => {
    dir = tempDir('markers');
    proxy = new TestProxy();
    await proxy.start();
  });
  afterEach(async () => {
    await agent?.stop();
    agent = undefined;
    await proxy.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('replaying the segments up to any marker reproduces the disk as it was at that marker', async () => {
    const size = 4 * MiB;
    const image = makeImage(dir, 'd0', size);
    const snapshots = new Map<string, Buffer>();
    agent = newAgent(proxy, {
      disks: [{ id: 'd0', path: image }],
      journalDir: path.join(dir, 'journal'),
      whilePaused: (m) => void snapshots.set(m.id, fs.readFileSync(image)),
    });
    await agent.start();
    await agent.settled();
    const uri = `nbd://127.0.0.1:${agent.nbd?.port}/d0`;
    const work = aio(uri, 7, 3000, 0, size);
    const markers: string[] = [];
    while (!work.finished()) {
      const m = await agent.cutMarker('crash');
      if (m) markers.push(m.id);
      await new Promise((r) => setTimeout(r, 15));
    }
    expect(JSON.parse(await work.done).errors).toEqual([]);
    const last = await agent.cutMarker('crash');
    markers.push(last!.id);
    await agent.settled();

    expect(markers.length).toBeGreaterThan(5);
    expect(proxy.markers('d0')).toEqual(markers);
    for (const id of markers) {
      assertSameBytes(proxy.replay('d0', size, id), snapshots.get(id) as Buffer, `disk at marker ${id}`);
    }
    assertSameBytes(proxy.replay('d0', size), fs.readFileSync(image), 'final disk');
    // Overlapping writes inside a segment were coalesced: fewer write records than writes sent.
    const segs = proxy.decoded('d0');
    expect(segs.length).toBeGreaterThan(markers.length);
  });

  it('every marker is one consistent cut across two disks with concurrent writers', async () => {
    const size = 4 * MiB;
    const images = { d0: makeImage(dir, 'd0', size), d1: makeImage(dir, 'd1', size) };
    const snapshots = new Map<string, { d0: Buffer; d1: Buffer }>();
    agent = newAgent(proxy, {
      disks: [
        { id: 'd0', path: images.d0 },
        { id: 'd1', path: images.d1 },
      ],
      journalDir: path.join(dir, 'journal'),
      whilePaused: (m) =>
        void snapshots.set(m.id, { d0: fs.readFileSync(images.d0), d1: fs.readFileSync(images.d1) }),
    });
    await agent.start();
    await agent.settled();
    const port = agent.nbd?.port;
    const blocks = 256; // the chain uses the first MiB; the noise writers the rest
    const chain = runNbdsh([
      '-c',
      CHAIN.replace('SEED', '11')
        .replace('U0', JSON.stringify(`nbd://127.0.0.1:${port}/d0`))
        .replace('U1', JSON.stringify(`nbd://127.0.0.1:${port}/d1`))
        .replaceAll('GENS', '1500')
        .replace('BLOCKS', String(blocks)),
    ]);
    const noise = [
      aio(`nbd://127.0.0.1:${port}/d0`, 21, 1500, MiB, size),
      aio(`nbd://127.0.0.1:${port}/d1`, 22, 1500, MiB, size),
    ];
    const markers: string[] = [];
    while (!chain.finished() || noise.some((n) => !n.finished())) {
      const m = await agent.cutMarker('crash');
      if (m) markers.push(m.id);
      await new Promise((r) => setTimeout(r, 10));
    }
    await chain.done;
    for (const n of noise) expect(JSON.parse(await n.done).errors).toEqual([]);
    markers.push((await agent.cutMarker('crash'))!.id);
    await agent.settled();

    expect(markers.length).toBeGreaterThan(5);
    expect(proxy.markers('d0')).toEqual(markers);
    expect(proxy.markers('d1')).toEqual(markers);
    let crossings = 0;
    for (const id of markers) {
      const r0 = proxy.replay('d0', size, id);
      const r1 = proxy.replay('d1', size, id);
      const snap = snapshots.get(id)!;
      assertSameBytes(r0, snap.d0, `d0 at marker ${id}`);
      assertSameBytes(r1, snap.d1, `d1 at marker ${id}`);
      // Independently of the snapshots: no generation on d1 without the same one on d0 first.
      for (let k = 0; k < blocks; k++) {
        const g0 = Number(r0.readBigUInt64LE(k * 4096));
        const g1 = Number(r1.readBigUInt64LE(k * 4096));
        expect(g1, `marker ${id} block ${k}`).toBeLessThanOrEqual(g0);
        if (g1 < g0) crossings++;
      }
    }
    // Markers fell between the two writes of a generation, so the check had something to catch.
    expect(crossings).toBeGreaterThan(0);
    assertSameBytes(proxy.replay('d0', size), fs.readFileSync(images.d0), 'final d0');
    assertSameBytes(proxy.replay('d1', size), fs.readFileSync(images.d1), 'final d1');
  });
});
