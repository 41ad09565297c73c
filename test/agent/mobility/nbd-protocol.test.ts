/**
 * Raw-socket tests of the handshake, malformed input, ordering, flush and pause/resume. The client
 * here is written from the protocol document, independently of the server's encoders.
 */
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  FileBacking,
  NbdExport,
  NbdServer,
  type BlockBacking,
  type WriteChange,
  type WriteJournal,
} from '../../../agent/mobility/nbd';
import {
  DiskModel,
  RecordingJournal,
  assertSameBytes,
  prng,
  replay,
  runTool,
  startNbd,
  type RunningNbd,
} from './nbd-harness';

const MiB = 1024 * 1024;
const OPT_MAGIC = Buffer.from('IHAVEOPT');
const REP_MAGIC = 0x3e889045565a9n;

/** A minimal NBD client speaking bytes on a socket. */
class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: (() => void)[] = [];
  closed = false;
  readonly closedPromise: Promise<void>;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    this.closedPromise = new Promise((resolve) =>
      socket.on('close', () => {
        this.closed = true;
        this.wake();
        resolve();
      }),
    );
    socket.on('error', () => undefined);
  }

  static async connect(port: number, clientFlags = 3): Promise<RawClient> {
    const socket = net.connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const c = new RawClient(socket);
    const greeting = await c.read(18);
    expect(greeting.subarray(0, 8).toString()).toBe('NBDMAGIC');
    expect(greeting.subarray(8, 16)).toEqual(OPT_MAGIC);
    expect(greeting.readUInt16BE(16) & 3).toBe(3); // FIXED_NEWSTYLE | NO_ZEROES
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(clientFlags);
    socket.write(flags);
    return c;
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  get pending(): number {
    return this.buf.length;
  }

  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed with ${this.buf.length}/${n} bytes`);
      await new Promise<void>((r) => this.waiters.push(r));
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    OPT_MAGIC.copy(h, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([h, data]));
  }

  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    expect(h.readBigUInt64BE(0)).toBe(REP_MAGIC);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** NBD_OPT_GO (or INFO); returns the replies up to the final ACK or error. */
  async go(name: string, option = 7, infos: number[] = []): Promise<{ type: number; data: Buffer }[]> {
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    d.writeUInt16BE(infos.length, 4 + n.length);
    infos.forEach((t, i) => d.writeUInt16BE(t, 6 + n.length + 2 * i));
    this.sendOption(option, d);
    const replies = [];
    for (;;) {
      const r = await this.optionReply();
      replies.push(r);
      if (r.type !== 3) return replies;
    }
  }

  request(
    type: number,
    handle: number,
    offset: number | bigint,
    length: number,
    payload?: Buffer,
    flags = 0,
    magic = 0x25609513,
  ): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(magic, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(handle), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([h, payload]) : h);
  }

  async reply(readLength = 0): Promise<{ error: number; handle: number; data: Buffer }> {
    const h = await this.read(16);
    expect(h.readUInt32BE(0)).toBe(0x67446698);
    const error = h.readUInt32BE(4);
    const handle = Number(h.readBigUInt64BE(8));
    return {
      error,
      handle,
      data: error === 0 && readLength > 0 ? await this.read(readLength) : Buffer.alloc(0),
    };
  }

  close(): void {
    this.socket.destroy();
  }
}

const READ = 0,
  WRITE = 1,
  DISC = 2,
  FLUSH = 3,
  TRIM = 4,
  WRITE_ZEROES = 6,
  BLOCK_STATUS = 7;
const FUA = 1,
  DF = 4,
  FAST_ZERO = 16;
const EPERM = 1,
  EINVAL = 22,
  ENOSPC = 28;

const ticks = async (n = 20): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

describe('NBD handshake and malformed input', () => {
  let nbd: RunningNbd;
  beforeAll(async () => {
    nbd = await startNbd([
      { name: 'd0', sizeBytes: 2 * MiB, description: 'disk zero' },
      { name: 'd1', sizeBytes: 1 * MiB },
      { name: 'ro', sizeBytes: 1 * MiB, readOnly: true },
    ]);
  });
  afterAll(async () => {
    await nbd?.stop();
  });

  it('answers LIST, INFO, unsupported and malformed options, then GO', async () => {
    const c = await RawClient.connect(nbd.port);
    c.sendOption(3); // LIST
    const names: string[] = [];
    for (;;) {
      const r = await c.optionReply();
      if (r.type === 1) break;
      expect(r.type).toBe(2);
      const len = r.data.readUInt32BE(0);
      names.push(r.data.subarray(4, 4 + len).toString());
      if (r.data.subarray(4, 4 + len).toString() === 'd0')
        expect(r.data.subarray(4 + len).toString()).toBe('disk zero');
    }
    expect(names.sort()).toEqual(['d0', 'd1', 'ro']);

    c.sendOption(3, Buffer.from('x'));
    expect((await c.optionReply()).type).toBe(0x80000003); // ERR_INVALID
    for (const unsupported of [5, 8, 9, 10, 11, 4242]) {
      c.sendOption(unsupported);
      const r = await c.optionReply();
      expect(r.option).toBe(unsupported);
      expect(r.type).toBe(0x80000001); // ERR_UNSUP
    }
    c.sendOption(4242, Buffer.alloc(100_000)); // longer than the server keeps: discarded
    expect((await c.optionReply()).type).toBe(0x80000009); // ERR_TOO_BIG

    const unknown = await c.go('nope', 6);
    expect(unknown.at(-1)?.type).toBe(0x80000006); // ERR_UNKNOWN
    const bad = Buffer.alloc(10);
    bad.writeUInt32BE(1000, 0); // name length beyond the option
    c.sendOption(7, bad);
    expect((await c.optionReply()).type).toBe(0x80000003);

    const info = await c.go('d1', 6, [1, 2, 3]); // INFO with NAME, DESCRIPTION, BLOCK_SIZE
    expect(info.at(-1)?.type).toBe(1);
    const byType = new Map(info.slice(0, -1).map((r) => [r.data.readUInt16BE(0), r.data]));
    expect(Number(byType.get(0)?.readBigUInt64BE(2))).toBe(1 * MiB);
    const flags = byType.get(0)?.readUInt16BE(10) as number;
    expect(flags & 0b1_0110_1101).toBe(0b1_0110_1101); // HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN
    expect(flags & 2).toBe(0); // not read-only
    const bs = byType.get(3) as Buffer;
    expect([bs.readUInt32BE(2), bs.readUInt32BE(6), bs.readUInt32BE(10)]).toEqual([512, 4096, 32 * MiB]);
    expect(byType.get(1)?.subarray(2).toString()).toBe('d1');

    const go = await c.go('d1');
    expect(go.at(-1)?.type).toBe(1);
    c.request(READ, 7, 0, 4096);
    expect(await c.reply(4096)).toMatchObject({ error: 0, handle: 7 });
    c.request(DISC, 8, 0, 0);
    await c.closedPromise;
  });

  it('serves EXPORT_NAME with and without NO_ZEROES, closes on an unknown name, ABORT, and unknown client flags', async () => {
    const a = await RawClient.connect(nbd.port, 3);
    a.sendOption(1, Buffer.from('d0'));
    const r = await a.read(10);
    expect(Number(r.readBigUInt64BE(0))).toBe(2 * MiB);
    a.request(READ, 1, 512, 512);
    expect((await a.reply(512)).error).toBe(0);
    a.close();

    const b = await RawClient.connect(nbd.port, 1); // no NO_ZEROES: 124 zero bytes follow
    b.sendOption(1, Buffer.from('d1'));
    const rb = await b.read(134);
    expect(rb.subarray(10).equals(Buffer.alloc(124))).toBe(true);
    b.close();

    const c = await RawClient.connect(nbd.port);
    c.sendOption(1, Buffer.from('missing'));
    await c.closedPromise;

    const d = await RawClient.connect(nbd.port);
    d.sendOption(2); // ABORT
    expect((await d.optionReply()).type).toBe(1);
    await d.closedPromise;

    const e = await RawClient.connect(nbd.port, 0x80);
    await e.closedPromise;
  });

  it('answers bad requests with EINVAL/ENOSPC/EPERM, closes on bad magic, and keeps serving another client', async () => {
    const good = await RawClient.connect(nbd.port);
    await good.go('d0');
    const bad = await RawClient.connect(nbd.port);
    await bad.go('d0');

    const size = 2 * MiB;
    bad.request(READ, 1, size, 512);
    bad.request(READ, 2, size - 512, 1024);
    bad.request(READ, 3, 0xffffffffffffff00n, 512);
    bad.request(READ, 4, 100, 512);
    bad.request(READ, 5, 0, 1000);
    bad.request(READ, 6, 0, 33 * MiB); // larger than the maximum payload: never allocated
    bad.request(READ, 7, 0, 512, undefined, DF);
    bad.request(WRITE, 8, size - 512, 1024, Buffer.alloc(1024, 1));
    bad.request(WRITE, 9, 512, 100, Buffer.alloc(100, 1));
    bad.request(TRIM, 10, size, 512);
    bad.request(WRITE_ZEROES, 11, 0, 512, undefined, FAST_ZERO);
    bad.request(BLOCK_STATUS, 12, 0, 512);
    bad.request(99, 13, 0, 512);
    const expected: Record<number, number> = {
      1: EINVAL,
      2: EINVAL,
      3: EINVAL,
      4: EINVAL,
      5: EINVAL,
      6: EINVAL,
      7: EINVAL,
      8: ENOSPC,
      9: EINVAL,
      10: ENOSPC,
      11: EINVAL,
      12: EINVAL,
      13: EINVAL,
    };
    for (let i = 0; i < 13; i++) {
      const r = await bad.reply();
      expect(r.error, `handle ${r.handle}`).toBe(expected[r.handle]);
    }

    // An oversized write: its 33 MiB payload is consumed without being kept, then EINVAL, and the
    // connection stays in step.
    bad.request(WRITE, 20, 0, 33 * MiB, Buffer.alloc(33 * MiB, 7));
    expect(await bad.reply()).toMatchObject({ handle: 20, error: EINVAL });
    bad.request(WRITE, 21, 4096, 512, Buffer.alloc(512, 0x21));
    expect(await bad.reply()).toMatchObject({ handle: 21, error: 0 });

    // Mid-stream garbage: the connection is dropped.
    bad.request(READ, 22, 0, 512, undefined, 0, 0xdeadbeef);
    await bad.closedPromise;

    // The other client never noticed; a real tool still works too.
    good.request(WRITE, 1, 8192, 4096, Buffer.alloc(4096, 0x42), FUA);
    expect(await good.reply()).toMatchObject({ handle: 1, error: 0 });
    good.request(READ, 2, 4096, 8192);
    const r = await good.reply(8192);
    expect(r.data.subarray(0, 512).equals(Buffer.alloc(512, 0x21))).toBe(true);
    expect(r.data.subarray(4096).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    await runTool('qemu-io', ['-f', 'raw', nbd.uri('d0'), '-c', 'read -P 0x42 8192 4096']);

    // Only the valid writes reached the journal.
    expect(nbd.journal('d0').changes.map((c) => [c.kind, c.offset, c.length])).toEqual([
      ['write', 4096, 512],
      ['write', 8192, 4096],
    ]);

    const ro = await RawClient.connect(nbd.port);
    await ro.go('ro');
    ro.request(WRITE, 1, 0, 512, Buffer.alloc(512));
    ro.request(TRIM, 2, 0, 512);
    ro.request(WRITE_ZEROES, 3, 0, 512);
    for (let i = 0; i < 3; i++) expect((await ro.reply()).error).toBe(EPERM);
    expect(nbd.journal('ro').changes).toHaveLength(0);
    ro.close();

    // A client that dies half-way through a write payload changes nothing.
    const dying = await RawClient.connect(nbd.port);
    await dying.go('d1');
    dying.request(WRITE, 1, 0, 65536, Buffer.alloc(1000, 9));
    await new Promise((r) => setTimeout(r, 20));
    dying.close();
    good.request(READ, 3, 0, 512);
    expect((await good.reply(512)).error).toBe(0);
    expect(nbd.journal('d1').changes).toHaveLength(0);
    good.close();
  });
});

/** Delays each backing write by a seeded random time, so completions come back out of order. */
class JitteryBacking implements BlockBacking {
  private readonly rand = prng(9);
  constructor(private readonly inner: BlockBacking) {}
  get size() {
    return this.inner.size;
  }
  get readOnly() {
    return this.inner.readOnly;
  }
  read(into: Buffer, at: number, length: number, offset: number) {
    return this.inner.read(into, at, length, offset);
  }
  async write(data: Buffer, offset: number) {
    await new Promise((r) => setTimeout(r, Math.floor(this.rand() * 4)));
    return this.inner.write(data, offset);
  }
  async writeZeroes(offset: number, length: number) {
    await new Promise((r) => setTimeout(r, Math.floor(this.rand() * 4)));
    return this.inner.writeZeroes(offset, length);
  }
  sync() {
    return this.inner.sync();
  }
  close() {
    return this.inner.close();
  }
}

describe('NBD ordering, flush and pause', () => {
  let dir: string;
  let server: NbdServer;
  let port: number;
  const journals = new Map<string, WriteJournal>();
  const exps = new Map<string, NbdExport>();
  const gates: { append?: () => Promise<void> | void; flush?: () => Promise<void> } = {};

  /** A recording journal whose append/flush can be held open by the test. */
  class GatedJournal extends RecordingJournal {
    override append(change: WriteChange): Promise<void> | void {
      super.append(change);
      return gates.append?.();
    }
    override async flush(): Promise<void> {
      await gates.flush?.();
      return super.flush();
    }
  }

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(process.env.TMPDIR ?? '/tmp', 'lifeboat-nbd-order-'));
    for (const name of ['a', 'b', 'jitter']) {
      const image = path.join(dir, `${name}.img`);
      fs.writeFileSync(image, '');
      fs.truncateSync(image, 2 * MiB);
      const journal = name === 'jitter' ? new RecordingJournal() : new GatedJournal();
      const base = await FileBacking.open(image);
      const backing = name === 'jitter' ? new JitteryBacking(base) : base;
      exps.set(name, new NbdExport({ name, backing, journal }));
      journals.set(name, journal);
    }
    server = new NbdServer({ exports: [...exps.values()] });
    port = (await server.listen({ port: 0 })).port;
  });
  afterAll(async () => {
    await server?.close();
    for (const e of exps.values()) await e.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const image = (name: string) => fs.readFileSync(path.join(dir, `${name}.img`));
  const recorded = (name: string) => (journals.get(name) as RecordingJournal).changes;

  it('applies overlapping pipelined writes in arrival order even when the backing store completes them out of order', async () => {
    const c = await RawClient.connect(port);
    await c.go('jitter');
    const model = new DiskModel(2 * MiB);
    const rand = prng(31);
    const n = 300;
    for (let i = 0; i < n; i++) {
      const length = (1 + Math.floor(rand() * 16)) * 512;
      const offset = Math.floor(rand() * 64) * 512; // 32 KiB hot zone
      if (rand() < 0.8) {
        const data = Buffer.alloc(length, (i % 250) + 1);
        c.request(WRITE, i, offset, length, data);
        model.write(offset, data);
      } else {
        c.request(WRITE_ZEROES, i, offset, length);
        model.zero(offset, length);
      }
    }
    const handles = new Set<number>();
    for (let i = 0; i < n; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      handles.add(r.handle);
    }
    expect(handles.size).toBe(n);
    c.request(FLUSH, n, 0, 0);
    expect((await c.reply()).error).toBe(0);
    assertSameBytes(image('jitter'), model.bytes, 'backing image');
    assertSameBytes(replay(recorded('jitter'), 2 * MiB), model.bytes, 'journal replay');
    expect(exps.get('jitter')?.stats.peakInFlight).toBeGreaterThan(1);
    c.close();
  });

  it('answers FLUSH and FUA writes only after the journal flush completed', async () => {
    const c = await RawClient.connect(port);
    await c.go('a');
    const gate = deferred();
    gates.flush = () => gate.promise;
    const flushesBefore = (journals.get('a') as RecordingJournal).flushes;
    c.request(WRITE, 1, 0, 4096, Buffer.alloc(4096, 1));
    expect(await c.reply()).toMatchObject({ handle: 1, error: 0 });
    c.request(FLUSH, 2, 0, 0);
    c.request(WRITE, 3, 4096, 4096, Buffer.alloc(4096, 3), FUA);
    c.request(WRITE, 4, 8192, 4096, Buffer.alloc(4096, 4));
    // The plain write is answered; FLUSH and the FUA write wait for the journal.
    expect(await c.reply()).toMatchObject({ handle: 4, error: 0 });
    await ticks();
    expect(c.pending).toBe(0);
    gates.flush = undefined;
    gate.resolve();
    const rest = [await c.reply(), await c.reply()].map((r) => r.handle).sort();
    expect(rest).toEqual([2, 3]);
    expect((journals.get('a') as RecordingJournal).flushes).toBeGreaterThan(flushesBefore);
    c.close();
  });

  it('pause holds new writes out of the journal and the backing store until resume; reads and flushes go on', async () => {
    const c = await RawClient.connect(port);
    await c.go('b');
    const before = recorded('b').length;
    const imageBefore = image('b');
    await server.pause(['b']);
    expect(exps.get('b')?.stats.paused).toBe(true);
    for (let i = 0; i < 10; i++)
      c.request(WRITE, 100 + i, 65536 + i * 4096, 4096, Buffer.alloc(4096, 0x60 + i));
    c.request(TRIM, 110, 0, 4096);
    await vi.waitFor(() => expect(exps.get('b')?.stats.held).toBe(11));
    c.request(READ, 200, 65536, 4096);
    expect(await c.reply(4096)).toMatchObject({ handle: 200, error: 0, data: Buffer.alloc(4096) });
    c.request(FLUSH, 201, 0, 0);
    expect(await c.reply()).toMatchObject({ handle: 201, error: 0 });
    await ticks();
    expect(c.pending).toBe(0); // no write was answered
    expect(recorded('b').length).toBe(before);
    assertSameBytes(image('b'), imageBefore, 'backing image while paused');

    server.resume(['b']);
    const handles = [];
    for (let i = 0; i < 11; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      handles.push(r.handle);
    }
    expect(handles.sort()).toEqual([100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110]);
    const appended = recorded('b').slice(before);
    expect(appended.map((x) => x.offset)).toEqual([
      ...Array.from({ length: 10 }, (_, i) => 65536 + i * 4096),
      0,
    ]);
    const img = image('b');
    for (let i = 0; i < 10; i++)
      expect(
        img.subarray(65536 + i * 4096, 65536 + (i + 1) * 4096).equals(Buffer.alloc(4096, 0x60 + i)),
      ).toBe(true);
    c.close();
  });

  it('pause resolves only once in-flight writes reached the journal, across several exports at one instant', async () => {
    const ca = await RawClient.connect(port);
    await ca.go('a');
    const cb = await RawClient.connect(port);
    await cb.go('b');
    const accept = deferred();
    gates.append = () => accept.promise;
    const beforeA = recorded('a').length;
    const beforeB = recorded('b').length;
    ca.request(WRITE, 1, 0, 512, Buffer.alloc(512, 0xa1));
    cb.request(WRITE, 1, 0, 512, Buffer.alloc(512, 0xb1));
    await vi.waitFor(() => expect(recorded('a').length + recorded('b').length).toBe(beforeA + beforeB + 2));

    let drained = false;
    const paused = server.pause(['a', 'b']).then(() => (drained = true));
    // Arrives after the cut: held, on both disks.
    ca.request(WRITE, 2, 512, 512, Buffer.alloc(512, 0xa2));
    cb.request(WRITE, 2, 512, 512, Buffer.alloc(512, 0xb2));
    await vi.waitFor(() => expect(exps.get('a')!.stats.held + exps.get('b')!.stats.held).toBe(2));
    await ticks();
    expect(drained).toBe(false); // the journal has not accepted the first writes yet
    gates.append = undefined;
    accept.resolve();
    await paused;
    // The cut: exactly the writes sent before pause, on both disks.
    expect(
      recorded('a')
        .slice(beforeA)
        .map((x) => x.data?.[0]),
    ).toEqual([0xa1]);
    expect(
      recorded('b')
        .slice(beforeB)
        .map((x) => x.data?.[0]),
    ).toEqual([0xb1]);
    expect((await ca.reply()).handle).toBe(1);
    expect((await cb.reply()).handle).toBe(1);

    server.resume(['a', 'b']);
    expect(await ca.reply()).toMatchObject({ handle: 2, error: 0 });
    expect(await cb.reply()).toMatchObject({ handle: 2, error: 0 });
    expect(
      recorded('a')
        .slice(beforeA)
        .map((x) => x.data?.[0]),
    ).toEqual([0xa1, 0xa2]);
    expect(
      recorded('b')
        .slice(beforeB)
        .map((x) => x.data?.[0]),
    ).toEqual([0xb1, 0xb2]);
    ca.close();
    cb.close();
  });

  it('quiesce runs the cut between pause and resume', async () => {
    const lengths: number[] = [];
    const result = await server.quiesce(['a', 'b'], () => {
      lengths.push(recorded('a').length, recorded('b').length);
      expect(exps.get('a')?.stats.paused).toBe(true);
      return 'marker-1';
    });
    expect(result).toBe('marker-1');
    expect(exps.get('a')?.stats.paused).toBe(false);
    expect(() => exps.get('a')?.resume()).toThrow(/not paused/);
  });
});
