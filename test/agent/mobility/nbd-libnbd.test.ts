/** Interop with libnbd's tools: nbdsh (sync and aio, several connections) and nbdcopy. */
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DiskModel, assertSameBytes, prng, replay, runTool, startNbd, type RunningNbd } from './nbd-harness';

const MiB = 1024 * 1024;

/** nbdsh script: runs ops from a JSON file with up to DEPTH requests in flight on one connection. */
const AIO_SCRIPT = String.raw`
import json, sys, nbd
ops = json.load(open(OPS))
data = open(DATA, 'rb').read()
errors = []
def done(err):
    if err.value != 0:
        errors.append(err.value)
    return 1
for op in ops:
    while h.aio_in_flight() >= DEPTH:
        h.poll(-1)
    k = op['k']
    flags = nbd.CMD_FLAG_FUA if op.get('fua') else 0
    if k == 'w':
        buf = bytearray(data[op['d']:op['d'] + op['l']])
        h.aio_pwrite(buf, op['o'], done, flags)
    elif k == 'z':
        h.aio_zero(op['l'], op['o'], done, flags)
    elif k == 't':
        h.aio_trim(op['l'], op['o'], done, flags)
    elif k == 'f':
        h.aio_flush(done)
    elif k == 'r':
        h.aio_pread(bytearray(op['l']), op['o'], done)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
print(json.dumps({'errors': errors, 'ops': len(ops)}))
`;

interface Op {
  k: 'w' | 'z' | 't' | 'f' | 'r';
  o: number;
  l: number;
  d?: number;
  fua?: boolean;
}

/** Random ops over a hot zone so in-flight requests overlap; write data is appended to `data`. */
function makeOps(
  seed: number,
  count: number,
  zone: number,
  data: Buffer[],
  dataOffset: { at: number },
): Op[] {
  const rand = prng(seed);
  const ops: Op[] = [];
  for (let i = 0; i < count; i++) {
    const r = rand();
    const l = (1 + Math.floor(rand() * 32)) * 512;
    const o = Math.floor(rand() * ((zone - l) / 512)) * 512;
    if (r < 0.65) {
      const bytes = randomBytes(l);
      data.push(bytes);
      ops.push({ k: 'w', o, l, d: dataOffset.at, fua: rand() < 0.05 });
      dataOffset.at += l;
    } else if (r < 0.77) ops.push({ k: 'z', o, l });
    else if (r < 0.87) ops.push({ k: 't', o, l });
    else if (r < 0.9) ops.push({ k: 'f', o: 0, l: 0 });
    else ops.push({ k: 'r', o, l });
  }
  return ops;
}

async function runAio(nbd: RunningNbd, name: string, opsFile: string, dataFile: string, depth: number) {
  const script = AIO_SCRIPT.replace('OPS', JSON.stringify(opsFile))
    .replace('DATA', JSON.stringify(dataFile))
    .replace(/DEPTH/g, String(depth));
  const { stdout } = await runTool('nbdsh', ['-u', nbd.uri(name), '-c', script]);
  return JSON.parse(stdout.trim().split('\n').pop() as string) as { errors: number[]; ops: number };
}

describe('NBD server with nbdsh and nbdcopy', () => {
  let nbd: RunningNbd;

  beforeAll(async () => {
    nbd = await startNbd([
      { name: 'sync', sizeBytes: 4 * MiB },
      { name: 'aio', sizeBytes: 8 * MiB },
      { name: 'multi', sizeBytes: 4 * MiB },
      { name: 'copy', sizeBytes: 24 * MiB },
      { name: 'ro', sizeBytes: 1 * MiB, readOnly: true },
    ]);
  });
  afterAll(async () => {
    await nbd?.stop();
  });

  it('pwrite, pread, trim, zero, flush and FUA through nbdsh; errors with strict mode off', async () => {
    const script = String.raw`
import json, nbd, errno
out = {}
h.pwrite(b'\xab' * 8192, 4096)
h.pwrite(b'\xcd' * 4096, 8192, nbd.CMD_FLAG_FUA)
h.trim(4096, 4096)
h.zero(1024, 0)
h.zero(512, 12288, nbd.CMD_FLAG_NO_HOLE)
h.flush()
out['read'] = h.pread(16384, 0).hex()
h.set_strict_mode(0)
def code(f):
    try:
        f()
        return 0
    except nbd.Error as e:
        return e.errno
size = h.get_size()
out['write_past_end'] = code(lambda: h.pwrite(b'x' * 4096, size - 2048))
out['read_past_end'] = code(lambda: h.pread(4096, size))
out['unaligned_write'] = code(lambda: h.pwrite(b'x' * 100, 512))
out['unaligned_offset'] = code(lambda: h.pread(512, 100))
out['oversized_read'] = code(lambda: h.pread(33 * 1024 * 1024, 0))
out['trim_past_end'] = code(lambda: h.trim(8192, size - 4096))
out['still_works'] = h.pread(512, 8192).hex() == 'cd' * 512
print(json.dumps(out))
`;
    const { stdout } = await runTool('nbdsh', ['-u', nbd.uri('sync'), '-c', script]);
    const out = JSON.parse(stdout.trim().split('\n').pop() as string);
    const model = new DiskModel(4 * MiB);
    model.fill(4096, 8192, 0xab);
    model.fill(8192, 4096, 0xcd);
    model.zero(4096, 4096);
    model.zero(0, 1024);
    model.zero(12288, 512);
    expect(out.read).toBe(model.bytes.subarray(0, 16384).toString('hex'));
    expect(out).toMatchObject({
      write_past_end: 'ENOSPC',
      read_past_end: 'EINVAL',
      unaligned_write: 'EINVAL',
      unaligned_offset: 'EINVAL',
      oversized_read: 'EINVAL',
      trim_past_end: 'ENOSPC',
      still_works: true,
    });
    assertSameBytes(nbd.image('sync'), model.bytes, 'backing image');
    assertSameBytes(replay(nbd.journal('sync').changes, 4 * MiB), model.bytes, 'journal replay');
    expect(nbd.journal('sync').changes.map((c) => c.kind)).toEqual([
      'write',
      'write',
      'trim',
      'zero',
      'zero',
    ]);
  });

  it('a read-only export answers EPERM to writes', async () => {
    const script = `
import nbd
h.set_strict_mode(0)
try:
    h.pwrite(b'x' * 512, 0)
    print('no error')
except nbd.Error as e:
    print(e.errno)
`;
    const { stdout } = await runTool('nbdsh', ['-u', nbd.uri('ro'), '-c', script]);
    expect(stdout.trim()).toBe('EPERM');
    expect(nbd.journal('ro').changes).toHaveLength(0);
  });

  it('randomised aio with 64 requests in flight over overlapping ranges matches the model and the journal', async () => {
    const size = 8 * MiB;
    const data: Buffer[] = [];
    const ops = makeOps(0x5eed, 1500, 2 * MiB, data, { at: 0 });
    const opsFile = path.join(nbd.dir, 'aio-ops.json');
    const dataFile = path.join(nbd.dir, 'aio-data.bin');
    fs.writeFileSync(opsFile, JSON.stringify(ops));
    fs.writeFileSync(dataFile, Buffer.concat(data));
    const result = await runAio(nbd, 'aio', opsFile, dataFile, 64);
    expect(result.errors).toEqual([]);

    // One connection: the server serialises overlapping writes in arrival = issue order, so the
    // sequential model is exact.
    const model = new DiskModel(size);
    const all = Buffer.concat(data);
    for (const op of ops) {
      if (op.k === 'w') model.write(op.o, all.subarray(op.d as number, (op.d as number) + op.l));
      else if (op.k === 'z' || op.k === 't') model.zero(op.o, op.l);
    }
    assertSameBytes(nbd.image('aio'), model.bytes, 'backing image');
    const journal = nbd.journal('aio');
    expect(journal.changes).toHaveLength(ops.filter((o) => o.k === 'w' || o.k === 'z' || o.k === 't').length);
    assertSameBytes(replay(journal.changes, size), model.bytes, 'journal replay');
    expect(nbd.exports.get('aio')?.exp.stats.peakInFlight).toBeGreaterThan(1);
  });

  it('four concurrent connections writing overlapping ranges: the journal replays to the final image', async () => {
    const size = 4 * MiB;
    const runs = [];
    for (let c = 0; c < 4; c++) {
      const data: Buffer[] = [];
      const ops = makeOps(1000 + c, 600, 1 * MiB, data, { at: 0 });
      const opsFile = path.join(nbd.dir, `multi-${c}.json`);
      const dataFile = path.join(nbd.dir, `multi-${c}.bin`);
      fs.writeFileSync(opsFile, JSON.stringify(ops));
      fs.writeFileSync(dataFile, Buffer.concat(data));
      runs.push(runAio(nbd, 'multi', opsFile, dataFile, 32));
    }
    const results = await Promise.all(runs);
    for (const r of results) expect(r.errors).toEqual([]);
    const journal = nbd.journal('multi');
    expect(journal.changes.length).toBeGreaterThan(1500);
    assertSameBytes(replay(journal.changes, size), nbd.image('multi'), 'journal replay vs backing');
    expect(nbd.exports.get('multi')?.exp.stats.peakInFlight).toBeGreaterThan(1);
  });

  it('nbdcopy copies a file into the export and back out', async () => {
    const size = 24 * MiB;
    const src = Buffer.alloc(size);
    const rand = prng(42);
    // Random data with zero runs, so nbdcopy's zero detection sends WRITE_ZEROES too.
    for (let at = 0; at < size; at += 256 * 1024) {
      if (rand() < 0.7) randomBytes(256 * 1024).copy(src, at);
    }
    const srcFile = path.join(nbd.dir, 'copy-src.bin');
    const outFile = path.join(nbd.dir, 'copy-out.bin');
    fs.writeFileSync(srcFile, src);
    // Pre-fill the export with junk so zero ranges must actually be written.
    await runTool('nbdsh', ['-u', nbd.uri('copy'), '-c', `h.pwrite(b'\\xee' * (1024 * 1024), 0)`]);
    await runTool('nbdcopy', ['--flush', srcFile, nbd.uri('copy')]);
    await runTool('nbdcopy', [nbd.uri('copy'), outFile]);
    assertSameBytes(fs.readFileSync(outFile), src, 'copied-out file');
    assertSameBytes(nbd.image('copy'), src, 'backing image');
    assertSameBytes(replay(nbd.journal('copy').changes, size), src, 'journal replay');
  });
});
