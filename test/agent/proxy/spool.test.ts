import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Spool } from '../../../agent/proxy/spool';
import { BandwidthLimiter } from '../../../agent/proxy/uploader';
import { parseSize, proxyOptionsFromFlags } from '../../../agent/proxy/command';
import { ConflictError } from '../../../shared/errors';
import { TRAILER_BYTES } from '../../../shared/segment';
import { makeSegment } from './helpers';

let dir: string;
beforeEach(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-spool-'));
});
afterEach(async () => {
  await fs.rm(dir, { recursive: true, force: true });
});

const at = (seq: number, epoch = 1, disk = 'd0') => ({ machine: 'web-1', disk, epoch, seq });
const checksum = (b: Buffer) => Buffer.from(b.subarray(b.length - TRAILER_BYTES));

async function accept(spool: Spool, address: ReturnType<typeof at>, blocks = 1) {
  const seg = makeSegment(address, blocks);
  return spool.accept(address, seg, checksum(seg));
}

describe('Spool', () => {
  it('stores segments durably, in (epoch, seq) order, and finds them again after a restart', async () => {
    const spool = await Spool.open(dir);
    for (const [epoch, seq] of [
      [2, 1],
      [1, 5],
      [1, 3],
      [2, 0],
    ])
      expect(await accept(spool, at(seq, epoch))).toBe('created');
    expect(spool.segments).toBe(4);
    const again = await Spool.open(dir);
    expect(again.disk('web-1', 'd0')!.pending.map((p) => [p.epoch, p.seq])).toEqual([
      [1, 3],
      [1, 5],
      [2, 0],
      [2, 1],
    ]);
    expect(again.bytes).toBe(spool.bytes);
    expect(again.lastAcknowledged('web-1', 'd0')).toEqual({ epoch: 2, seq: 1 });
    const entry = again.next('web-1', 'd0')!;
    expect((await again.read(entry)).equals(makeSegment(at(3), 1))).toBe(true);
  });

  it('answers duplicate for the same bytes and conflict for others, before and after shipping and across restarts', async () => {
    const spool = await Spool.open(dir);
    await accept(spool, at(1));
    expect(await accept(spool, at(1))).toBe('duplicate');
    await expect(accept(spool, at(1), 2)).rejects.toBeInstanceOf(ConflictError);
    await spool.markShipped(spool.next('web-1', 'd0')!);
    expect(spool.segments).toBe(0);
    expect(await fs.readdir(path.join(dir, 'segments', 'web-1', 'd0'))).toEqual([]);
    const reopened = await Spool.open(dir);
    expect(await accept(reopened, at(1))).toBe('duplicate');
    await expect(accept(reopened, at(1), 2)).rejects.toBeInstanceOf(ConflictError);
    expect(reopened.lastAcknowledged('web-1', 'd0')).toEqual({ epoch: 1, seq: 1 });
  });

  it('serialises concurrent puts of the same segment: one created, the rest duplicates', async () => {
    const spool = await Spool.open(dir);
    const results = await Promise.all(Array.from({ length: 8 }, () => accept(spool, at(9))));
    expect(results.filter((r) => r === 'created')).toHaveLength(1);
    expect(results.filter((r) => r === 'duplicate')).toHaveLength(7);
    expect(spool.segments).toBe(1);
  });

  it('discards unacknowledged temp files and already-shipped leftovers on restart', async () => {
    const spool = await Spool.open(dir);
    await accept(spool, at(1));
    await accept(spool, at(2));
    const first = spool.next('web-1', 'd0')!;
    const leftover = await fs.readFile(first.file);
    await spool.markShipped(first);
    // As if killed after the shipped-log line but before the file was removed:
    await fs.writeFile(first.file, leftover);
    await fs.writeFile(path.join(dir, 'tmp', 'abc.part'), 'half a segment');
    const reopened = await Spool.open(dir);
    expect(await fs.readdir(path.join(dir, 'tmp'))).toEqual([]);
    expect(reopened.disk('web-1', 'd0')!.pending.map((p) => p.seq)).toEqual([2]);
  });

  it('ignores a torn last line in the shipped log', async () => {
    const spool = await Spool.open(dir);
    await accept(spool, at(1));
    await spool.markShipped(spool.next('web-1', 'd0')!);
    await fs.appendFile(path.join(dir, 'shipped', 'web-1', 'd0.log'), '1 2 abcd');
    const reopened = await Spool.open(dir);
    expect(reopened.lastAcknowledged('web-1', 'd0')).toEqual({ epoch: 1, seq: 1 });
  });

  it('compacts the shipped log to its window, and asks the cache about older segments', async () => {
    const archive = new Map<number, Buffer>();
    const asked: number[] = [];
    const options = {
      shippedWindow: 3,
      archivedChecksum: async (a: { seq: number }) => {
        asked.push(a.seq);
        return archive.get(a.seq);
      },
    };
    const spool = await Spool.open(dir, options);
    for (let seq = 1; seq <= 10; seq++) {
      await accept(spool, at(seq));
      const entry = spool.next('web-1', 'd0')!;
      archive.set(seq, entry.checksum);
      await spool.markShipped(entry);
    }
    const log = await fs.readFile(path.join(dir, 'shipped', 'web-1', 'd0.log'), 'utf8');
    expect(log.split('\n').filter((l) => /^\d/.test(l)).length).toBeLessThanOrEqual(6);
    const reopened = await Spool.open(dir, options);
    expect(reopened.lastAcknowledged('web-1', 'd0')).toEqual({ epoch: 1, seq: 10 });
    expect(await accept(reopened, at(10))).toBe('duplicate');
    expect(asked).toEqual([]);
    expect(await accept(reopened, at(2))).toBe('duplicate');
    await expect(accept(reopened, at(3), 3)).rejects.toBeInstanceOf(ConflictError);
    expect(asked).toEqual([2, 3]);
    archive.delete(4); // the cache no longer has it (applied and pruned): accept it as new
    expect(await accept(reopened, at(4))).toBe('created');
  });
});

describe('BandwidthLimiter', () => {
  it('spaces uploads so bytes / elapsed never exceeds the cap (simulated clock)', async () => {
    let now = 1000;
    const waits: number[] = [];
    const limiter = new BandwidthLimiter(1_000_000, {
      now: () => now,
      sleep: async (ms) => {
        waits.push(ms);
        now += ms;
      },
    });
    const signal = new AbortController().signal;
    const sizes = [500_000, 2_000_000, 250_000, 250_000, 1_000_000];
    let sent = 0;
    for (const size of sizes) {
      await limiter.take(size, signal);
      // Everything started so far fits within the cap, counting from the first start.
      expect(sent).toBeLessThanOrEqual(((now - 1000) / 1000) * 1_000_000);
      sent += size;
    }
    expect(waits).toEqual([500, 2000, 250, 250]);
  });
});

describe('proxy command options', () => {
  it('parses sizes', () => {
    expect(parseSize('64MiB')).toBe(64 * 1024 * 1024);
    expect(parseSize('10GB')).toBe(10e9);
    expect(parseSize('1048576')).toBe(1048576);
    expect(parseSize('1.5 KiB')).toBe(1536);
    expect(() => parseSize('lots')).toThrow(/size/);
  });

  it('turns flags into startProxy options', () => {
    const base = { spool: 'sp', host: '127.0.0.1', port: 0 };
    expect(proxyOptionsFromFlags({ ...base }, {}).tls).toBe('self-signed');
    expect(proxyOptionsFromFlags({ ...base, insecureHttp: true }, {}).tls).toBe('none');
    expect(proxyOptionsFromFlags({ ...base, tlsCert: 'c.pem', tlsKey: 'k.pem' }, {}).tls).toEqual({
      certFile: 'c.pem',
      keyFile: 'k.pem',
    });
    expect(() => proxyOptionsFromFlags({ ...base, tlsCert: 'c.pem' }, {})).toThrow(/go together/);
    expect(proxyOptionsFromFlags({ ...base, spoolCap: 5, bandwidth: 7 }, {})).toMatchObject({
      spoolCapBytes: 5,
      bandwidthBytesPerSecond: 7,
    });
    expect(path.isAbsolute(proxyOptionsFromFlags({ ...base }, {}).spoolDir)).toBe(true);
  });
});
