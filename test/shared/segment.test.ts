import { createHash } from 'node:crypto';
import { Readable } from 'node:stream';
import fc from 'fast-check';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { ValidationError } from '../../shared/errors';
import {
  decodeSegment,
  decodeSegmentStream,
  encodeSegment,
  MAX_DISK_BYTES,
  MAX_RECORDS,
  MAX_SEGMENT_BYTES,
  MAX_TAG_BYTES,
  MAX_TIME_MS,
  MAX_WRITE_BYTES,
  SegmentBuilder,
  SegmentDecoder,
  SegmentFormatError,
  type MarkerKind,
  type Segment,
  type SegmentFormatReason,
  type SegmentRecord,
  type SegmentStreamPart,
} from '../../shared/segment';

// ---- arbitraries ------------------------------------------------------------------------------

/** Deterministic bytes from a seed, so large data does not slow fast-check's generation. */
function pattern(length: number, seed: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  let x = seed | 1;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

const label = fc.stringMatching(/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/);
const safeNat = fc.oneof(fc.constantFrom(0, 1, Number.MAX_SAFE_INTEGER), fc.maxSafeNat());
const time = fc.oneof(fc.constantFrom(0, MAX_TIME_MS), fc.integer({ min: 0, max: MAX_TIME_MS }));
const sectorsOnDisk = MAX_DISK_BYTES / 512;

const writeRecord: fc.Arbitrary<SegmentRecord> = fc
  .record({
    sectors: fc.integer({ min: 1, max: 6 }),
    at: fc.integer({ min: 0, max: sectorsOnDisk - 6 }),
    seed: fc.integer(),
  })
  .map(({ sectors, at, seed }) => ({ type: 'write', offset: at * 512, data: pattern(sectors * 512, seed) }));

const rangeRecord: fc.Arbitrary<SegmentRecord> = fc
  .record({
    type: fc.constantFrom('zero' as const, 'trim' as const),
    at: fc.integer({ min: 0, max: sectorsOnDisk - 1 }),
    sectors: fc.integer({ min: 1, max: sectorsOnDisk }),
  })
  .map(({ type, at, sectors }) => ({
    type,
    offset: at * 512,
    length: Math.min(sectors, sectorsOnDisk - at) * 512,
  }));

const markerRecord: fc.Arbitrary<SegmentRecord> = fc.record({
  type: fc.constant('marker' as const),
  id: fc.stringMatching(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/),
  kind: fc.constantFrom<MarkerKind>('crash', 'app', 'group'),
  time,
  tag: fc.string({ unit: 'binary', maxLength: 64 }).filter((t) => Buffer.byteLength(t) <= MAX_TAG_BYTES),
});

const record = fc.oneof(writeRecord, rangeRecord, markerRecord);

const segment: fc.Arbitrary<Segment> = fc
  .record({
    machine: label,
    disk: label,
    epoch: safeNat,
    seq: safeNat,
    times: fc.tuple(time, time),
    records: fc.array(record, { maxLength: 12 }),
  })
  .map(({ machine, disk, epoch, seq, times, records }) => ({
    header: {
      machine,
      disk,
      epoch,
      seq,
      firstWriteTime: Math.min(...times),
      lastWriteTime: Math.max(...times),
    },
    records,
  }));

/** Splits `bytes` at the given cut points (taken modulo its length). */
function chunked(bytes: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => c % (bytes.length + 1)))].sort((a, b) => a - b);
  const chunks: Buffer[] = [];
  let from = 0;
  for (const p of points) {
    chunks.push(bytes.subarray(from, p));
    from = p;
  }
  chunks.push(bytes.subarray(from));
  return chunks;
}

async function collect(
  source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
): Promise<SegmentStreamPart[]> {
  const parts: SegmentStreamPart[] = [];
  for await (const part of decodeSegmentStream(source)) parts.push(part);
  return parts;
}

function partsToSegment(parts: SegmentStreamPart[]): Segment {
  const header = parts.find((p) => p.type === 'header');
  if (header?.type !== 'header') throw new Error('no header part');
  return {
    header: header.header,
    records: parts.flatMap((p) => (p.type === 'record' ? [p.record] : [])),
  };
}

/** Deep equality that compares write data with Buffer.equals (vitest walks big buffers key by key). */
function expectSameSegment(actual: Segment, expected: Segment): void {
  expect(actual.header).toEqual(expected.header);
  expect(actual.records.length).toBe(expected.records.length);
  actual.records.forEach((r, i) => expectSameRecord(r, expected.records[i]));
}

function expectSameRecord(actual: SegmentRecord, expected: SegmentRecord): void {
  if (actual.type === 'write' && expected.type === 'write') {
    expect(actual.offset).toBe(expected.offset);
    expect(actual.data.equals(expected.data)).toBe(true);
  } else {
    expect(actual).toEqual(expected);
  }
}

/** Recomputes the SHA-256 trailer so a test reaches the structural checks behind it. */
function reseal(bytes: Buffer): Buffer {
  createHash('sha256')
    .update(bytes.subarray(0, bytes.length - 32))
    .digest()
    .copy(bytes, bytes.length - 32);
  return bytes;
}

function reasonOf(fn: () => unknown): SegmentFormatReason | undefined {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(SegmentFormatError);
    return (err as SegmentFormatError).reason;
  }
  return undefined;
}

// ---- tests ------------------------------------------------------------------------------------

describe('segment round trip', () => {
  it('decodes what it encodes, for random segments', () => {
    fc.assert(
      fc.property(segment, (s) => {
        const bytes = encodeSegment(s);
        expectSameSegment(decodeSegment(bytes), s);
        // Canonical: the decoded segment encodes to the very same bytes.
        expect(encodeSegment(decodeSegment(bytes)).equals(bytes)).toBe(true);
      }),
      { numRuns: 400 },
    );
  });

  it('streams to the same segment however the bytes are chunked', async () => {
    await fc.assert(
      fc.asyncProperty(segment, fc.array(fc.nat(), { maxLength: 40 }), async (s, cuts) => {
        const bytes = encodeSegment(s);
        const parts = await collect(chunked(bytes, cuts));
        expectSameSegment(partsToSegment(parts), s);
        const last = parts[parts.length - 1];
        expect(last.type).toBe('verified');
        if (last.type === 'verified') {
          expect(last.byteLength).toBe(bytes.length);
          expect(last.checksum.equals(bytes.subarray(bytes.length - 32))).toBe(true);
          expect(last.recordCount).toBe(s.records.length);
        }
      }),
      { numRuns: 300 },
    );
  });

  it('streams byte by byte and from a Node Readable', async () => {
    const s = fc.sample(segment, { numRuns: 1, seed: 7 })[0];
    s.records.push({ type: 'write', offset: 4096, data: pattern(8192, 3) });
    const bytes = encodeSegment(s);
    const single = chunked(
      bytes,
      Array.from({ length: bytes.length }, (_, i) => i),
    );
    expectSameSegment(partsToSegment(await collect(single)), s);
    expectSameSegment(partsToSegment(await collect(Readable.from(chunked(bytes, [100, 5000])))), s);
    // Any Uint8Array works, not only Buffers.
    expectSameSegment(partsToSegment(await collect([new Uint8Array(bytes)])), s);
  });

  it('writes the documented byte layout', () => {
    const bytes = encodeSegment({
      header: {
        machine: 'web-1',
        disk: 'd0',
        epoch: 2 ** 32 + 5,
        seq: 7,
        firstWriteTime: 1000,
        lastWriteTime: 2000,
      },
      records: [
        { type: 'write', offset: 512, data: Buffer.alloc(512, 0xab) },
        { type: 'zero', offset: 2 ** 40, length: 1024 },
        { type: 'trim', offset: 0, length: 512 },
        { type: 'marker', id: 'rp-1', kind: 'app', time: 3000, tag: 'é' },
      ],
    });
    // Built by hand from docs/segment-format.md, independently of the encoder.
    const expected = Buffer.alloc(50 + 5 + 2 + (13 + 512) + 17 + 17 + (13 + 4 + 2) + 32);
    expected.write('LBSG', 0, 'latin1');
    expected.writeUInt16LE(1, 4);
    expected.writeUInt16LE(0, 6);
    expected.writeBigUInt64LE(2n ** 32n + 5n, 8);
    expected.writeBigUInt64LE(7n, 16);
    expected.writeBigUInt64LE(1000n, 24);
    expected.writeBigUInt64LE(2000n, 32);
    expected.writeUInt32LE(4, 40);
    expected.writeUInt32LE(13 + 512 + 17 + 17 + 13 + 4 + 2, 44);
    expected[48] = 5;
    expected[49] = 2;
    expected.write('web-1d0', 50, 'latin1');
    let p = 57;
    expected[p] = 1;
    expected.writeBigUInt64LE(512n, p + 1);
    expected.writeUInt32LE(512, p + 9);
    expected.fill(0xab, p + 13, p + 13 + 512);
    p += 13 + 512;
    expected[p] = 2;
    expected.writeBigUInt64LE(2n ** 40n, p + 1);
    expected.writeBigUInt64LE(1024n, p + 9);
    p += 17;
    expected[p] = 3;
    expected.writeBigUInt64LE(0n, p + 1);
    expected.writeBigUInt64LE(512n, p + 9);
    p += 17;
    expected[p] = 4;
    expected[p + 1] = 2;
    expected.writeBigUInt64LE(3000n, p + 2);
    expected[p + 10] = 4;
    expected.writeUInt16LE(2, p + 11);
    expected.write('rp-1', p + 13, 'latin1');
    expected.write('é', p + 17, 'utf8');
    p += 19;
    createHash('sha256').update(expected.subarray(0, p)).digest().copy(expected, p);
    expect(bytes.toString('hex')).toBe(expected.toString('hex'));
  });

  it('round-trips the bounds: an empty segment, and one at exactly the size limit', () => {
    const header = { machine: 'm', disk: 'd', epoch: 0, seq: 0, firstWriteTime: 0, lastWriteTime: 0 };
    expect(encodeSegment({ header, records: [] }).length).toBe(50 + 2 + 32);
    expectSameSegment(decodeSegment(encodeSegment({ header, records: [] })), { header, records: [] });
    // Two writes as large as fit, then markers whose tags fill the last few hundred bytes.
    const first = MAX_WRITE_BYTES;
    const second = Math.floor((MAX_SEGMENT_BYTES - (50 + 2 + 32) - 2 * 13 - first) / 512) * 512;
    const records: SegmentRecord[] = [
      { type: 'write', offset: 0, data: Buffer.alloc(first, 1) },
      { type: 'write', offset: first, data: Buffer.alloc(second, 2) },
    ];
    let left = MAX_SEGMENT_BYTES - (50 + 2 + 32) - 2 * 13 - first - second;
    while (left > 0) {
      const tag = Math.min(MAX_TAG_BYTES, left - 14);
      records.push({ type: 'marker', id: 'm', kind: 'crash', time: 1, tag: 't'.repeat(tag) });
      left -= 14 + tag;
    }
    const s: Segment = { header, records };
    const bytes = encodeSegment(s);
    expect(bytes.length).toBe(MAX_SEGMENT_BYTES);
    expectSameSegment(decodeSegment(bytes), s);
  });
});

describe('segment encoder validation', () => {
  const header = { machine: 'web-1', disk: 'd0', epoch: 1, seq: 1, firstWriteTime: 10, lastWriteTime: 20 };
  const encodeWith =
    (records: SegmentRecord[], h: Partial<typeof header> = {}) =>
    () =>
      encodeSegment({ header: { ...header, ...h }, records });

  it.each<[string, () => unknown, SegmentFormatReason]>([
    ['an upper-case machine name', encodeWith([], { machine: 'Web' }), 'invalid-name'],
    ['a disk id over 63 characters', encodeWith([], { disk: 'd'.repeat(64) }), 'invalid-name'],
    ['a negative epoch', encodeWith([], { epoch: -1 }), 'invalid-number'],
    ['a sequence number past 2^53', encodeWith([], { seq: 2 ** 53 }), 'invalid-number'],
    ['a fractional time', encodeWith([], { firstWriteTime: 1.5 }), 'invalid-number'],
    ['a time past the last valid Date', encodeWith([], { lastWriteTime: MAX_TIME_MS + 1 }), 'invalid-number'],
    ['a first write after the last', encodeWith([], { firstWriteTime: 30 }), 'invalid-times'],
    [
      'a misaligned write offset',
      encodeWith([{ type: 'write', offset: 100, data: Buffer.alloc(512) }]),
      'misaligned',
    ],
    [
      'a misaligned write length',
      encodeWith([{ type: 'write', offset: 0, data: Buffer.alloc(513) }]),
      'misaligned',
    ],
    ['an empty write', encodeWith([{ type: 'write', offset: 0, data: Buffer.alloc(0) }]), 'out-of-range'],
    ['a misaligned trim', encodeWith([{ type: 'trim', offset: 0, length: 100 }]), 'misaligned'],
    [
      'a zero range past the largest disk',
      encodeWith([{ type: 'zero', offset: MAX_DISK_BYTES, length: 512 }]),
      'out-of-range',
    ],
    [
      'a write over the data limit',
      encodeWith([{ type: 'write', offset: 0, data: Buffer.alloc(MAX_WRITE_BYTES + 512) }]),
      'too-large',
    ],
    [
      'data that is not a Buffer',
      encodeWith([{ type: 'write', offset: 0, data: 'x' as unknown as Buffer }]),
      'invalid-record',
    ],
    [
      'an unknown record type',
      encodeWith([{ type: 'punch', offset: 0 } as unknown as SegmentRecord]),
      'unknown-record-type',
    ],
    [
      'an unknown marker kind',
      encodeWith([{ type: 'marker', id: 'm', kind: 'fs' as MarkerKind, time: 0, tag: '' }]),
      'unknown-marker-kind',
    ],
    [
      'a marker id with a slash',
      encodeWith([{ type: 'marker', id: 'a/b', kind: 'app', time: 0, tag: '' }]),
      'invalid-marker',
    ],
    [
      'a marker tag with a lone surrogate',
      encodeWith([{ type: 'marker', id: 'm', kind: 'app', time: 0, tag: 'x\ud800' }]),
      'invalid-marker',
    ],
    [
      'a marker tag over the limit',
      encodeWith([{ type: 'marker', id: 'm', kind: 'app', time: 0, tag: 'é'.repeat(129) }]),
      'too-large',
    ],
  ])('rejects %s', (_name, fn, reason) => {
    expect(reasonOf(fn)).toBe(reason);
  });

  it('rejects more records than the limit and more bytes than the limit', () => {
    const marker: SegmentRecord = { type: 'marker', id: 'm', kind: 'crash', time: 0, tag: '' };
    expect(reasonOf(encodeWith(new Array<SegmentRecord>(MAX_RECORDS + 1).fill(marker)))).toBe('too-large');
    const big: SegmentRecord = { type: 'write', offset: 0, data: Buffer.alloc(MAX_WRITE_BYTES) };
    expect(reasonOf(encodeWith([big, big]))).toBe('too-large');
  });

  it('raises a ValidationError with a code, a 400 status and a message that names the problem', () => {
    try {
      encodeWith([{ type: 'zero', offset: 0, length: 100 }])();
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(ValidationError);
      const e = err as SegmentFormatError;
      expect(e.code).toBe('InvalidSegment');
      expect(e.status).toBe(400);
      expect(e.reason).toBe('misaligned');
      expect(e.message).toMatch(/zero record #0 .*multiples of 512/);
    }
  });
});

describe('segment decoder rejects malformed bytes', () => {
  // One of each record, so every field has a known position.
  const base = encodeSegment({
    header: { machine: 'web-1', disk: 'd0', epoch: 3, seq: 9, firstWriteTime: 100, lastWriteTime: 200 },
    records: [
      { type: 'write', offset: 1024, data: pattern(1024, 1) },
      { type: 'zero', offset: 0, length: 512 },
      { type: 'trim', offset: 4096, length: 4096 },
      { type: 'marker', id: 'rp-1', kind: 'crash', time: 150, tag: 'ok' },
    ],
  });
  const W = 57; // write record (after the 50-byte fixed header and 'web-1' + 'd0')
  const Z = W + 13 + 1024;
  const T = Z + 17;
  const M = T + 17;

  /** A copy of `base` changed by `edit`, with the trailer recomputed unless `keepTrailer`. */
  function mutated(edit: (b: Buffer) => void, keepTrailer = false): Buffer {
    const b = Buffer.from(base);
    edit(b);
    return keepTrailer ? b : reseal(b);
  }

  it.each<[string, Buffer, SegmentFormatReason]>([
    ['a wrong magic', mutated((b) => b.write('LBSX', 0, 'latin1')), 'bad-magic'],
    ['version 2', mutated((b) => b.writeUInt16LE(2, 4)), 'unsupported-version'],
    ['a reserved flag', mutated((b) => b.writeUInt16LE(0x8000, 6)), 'reserved-bits'],
    ['an epoch past 2^53', mutated((b) => b.writeBigUInt64LE(2n ** 53n, 8)), 'invalid-number'],
    [
      'a time past the last Date',
      mutated((b) => b.writeBigUInt64LE(BigInt(MAX_TIME_MS) + 1n, 32)),
      'invalid-number',
    ],
    ['the first write after the last', mutated((b) => b.writeBigUInt64LE(300n, 24)), 'invalid-times'],
    ['more records than the limit', mutated((b) => b.writeUInt32LE(MAX_RECORDS + 1, 40)), 'too-large'],
    ['a 4 GiB record section', mutated((b) => b.writeUInt32LE(0xffffffff, 44)), 'too-large'],
    ['more records than the bytes can hold', mutated((b) => b.writeUInt32LE(200, 40)), 'totals-mismatch'],
    ['one record more than there are', mutated((b) => b.writeUInt32LE(5, 40)), 'totals-mismatch'],
    ['one record fewer than there are', mutated((b) => b.writeUInt32LE(3, 40)), 'totals-mismatch'],
    ['an empty machine name', mutated((b) => (b[48] = 0)), 'invalid-name'],
    ['a 64-character disk id', mutated((b) => (b[49] = 64)), 'invalid-name'],
    ['an upper-case machine name', mutated((b) => (b[50] = 0x57)), 'invalid-name'],
    ['a non-ASCII disk id', mutated((b) => (b[55] = 0xe9)), 'invalid-name'],
    ['an unknown record type', mutated((b) => (b[Z] = 9)), 'unknown-record-type'],
    ['a misaligned write offset', mutated((b) => b.writeBigUInt64LE(1000n, W + 1)), 'misaligned'],
    ['a misaligned write length', mutated((b) => b.writeUInt32LE(1000, W + 9)), 'misaligned'],
    [
      'a write longer than the data limit',
      mutated((b) => b.writeUInt32LE(MAX_WRITE_BYTES + 512, W + 9)),
      'too-large',
    ],
    [
      'a write longer than the declared bytes',
      mutated((b) => b.writeUInt32LE(4096, W + 9)),
      'exceeds-declared',
    ],
    [
      'a record section shorter than its records',
      mutated((b) => b.writeUInt32LE(b.readUInt32LE(44) - 512, 44)),
      'exceeds-declared',
    ],
    ['an empty zero range', mutated((b) => b.writeBigUInt64LE(0n, Z + 9)), 'out-of-range'],
    [
      'a trim past the largest disk',
      mutated((b) => b.writeBigUInt64LE(BigInt(MAX_DISK_BYTES), T + 1)),
      'out-of-range',
    ],
    ['a trim length past 2^53', mutated((b) => b.writeBigUInt64LE(2n ** 60n, T + 9)), 'invalid-number'],
    ['an unknown marker kind', mutated((b) => (b[M + 1] = 4)), 'unknown-marker-kind'],
    [
      'a marker time past the last Date',
      mutated((b) => b.writeBigUInt64LE(2n ** 63n, M + 2)),
      'invalid-number',
    ],
    ['an empty marker id', mutated((b) => (b[M + 10] = 0)), 'invalid-marker'],
    ['a marker id with a slash', mutated((b) => (b[M + 13] = 0x2f)), 'invalid-marker'],
    ['a marker tag that is not UTF-8', mutated((b) => (b[M + 17] = 0xff)), 'invalid-marker'],
    [
      'a marker tag longer than the limit',
      mutated((b) => b.writeUInt16LE(MAX_TAG_BYTES + 1, M + 11)),
      'too-large',
    ],
    [
      'a marker tag longer than the declared bytes',
      mutated((b) => b.writeUInt16LE(3, M + 11)),
      'exceeds-declared',
    ],
    ['a flipped data bit', mutated((b) => (b[W + 20] ^= 1), true), 'bad-checksum'],
    ['a flipped trailer bit', mutated((b) => (b[b.length - 1] ^= 0x80), true), 'bad-checksum'],
    ['a cut-off trailer', base.subarray(0, base.length - 1), 'truncated'],
    ['a cut-off write', base.subarray(0, W + 100), 'truncated'],
    ['a cut-off header', base.subarray(0, 20), 'truncated'],
    ['nothing at all', Buffer.alloc(0), 'truncated'],
    ['a byte after the trailer', Buffer.concat([base, Buffer.from([0])]), 'trailing-bytes'],
    ['two segments back to back', Buffer.concat([base, base]), 'trailing-bytes'],
    ['three bytes of something else', Buffer.from('GET'), 'bad-magic'],
  ])('rejects %s', async (_name, bytes, reason) => {
    expect(reasonOf(() => decodeSegment(bytes))).toBe(reason);
    // The streaming decoder reaches the same verdict, one byte at a time.
    const single = chunked(
      bytes,
      Array.from({ length: bytes.length }, (_, i) => i),
    );
    await expect(collect(single)).rejects.toMatchObject({ reason });
  });

  it('accepts the unmutated base (the cases above differ from it only in the field named)', () => {
    expect(decodeSegment(base).records).toHaveLength(4);
    expect(decodeSegment(reseal(Buffer.from(base))).records).toHaveLength(4);
  });

  it('points at the offending byte and says what to do', () => {
    try {
      decodeSegment(mutated((b) => b.writeBigUInt64LE(1000n, W + 1)));
      expect.unreachable();
    } catch (err) {
      const e = err as SegmentFormatError;
      expect(e.byteOffset).toBe(W);
      expect(e.message).toBe(
        `The segment is not valid at byte ${W}: the segment's write record #0 has offset 1000 and length 1024; ` +
          'both must be multiples of 512 bytes; the bytes are corrupt or come from an incompatible sender, so send the segment again.',
      );
    }
  });

  it('does not yield the verified part, and throws, when the trailer does not match', async () => {
    const bytes = mutated((b) => (b[W + 20] ^= 1), true);
    const seen: string[] = [];
    const chunks = [bytes.subarray(0, bytes.length - 32), bytes.subarray(bytes.length - 32)];
    await expect(
      (async () => {
        for await (const part of decodeSegmentStream(chunks)) seen.push(part.type);
      })(),
    ).rejects.toMatchObject({ reason: 'bad-checksum' });
    expect(seen).toEqual(['header', 'record', 'record', 'record', 'record']);
  });

  it('withholds the verified part until the source ends, so trailing bytes in a later chunk fail the segment', async () => {
    const seen: string[] = [];
    await expect(
      (async () => {
        for await (const part of decodeSegmentStream([base, Buffer.from([1])])) seen.push(part.type);
      })(),
    ).rejects.toMatchObject({ reason: 'trailing-bytes' });
    expect(seen).not.toContain('verified');
  });

  it('stays failed after an error', () => {
    const decoder = new SegmentDecoder();
    expect(() => decoder.push(Buffer.from('XXXX'))).toThrow(SegmentFormatError);
    expect(() => decoder.push(base)).toThrow(/segment magic/);
    expect(() => decoder.end()).toThrow(/segment magic/);
    expect(decoder.verified).toBe(false);
  });

  it('rejects a wrong magic or version from the first bytes, before the header is complete', () => {
    const decoder = new SegmentDecoder();
    expect(decoder.push(base.subarray(0, 5))).toEqual([]);
    expect(() => decoder.push(Buffer.from([9, 0]))).toThrow(
      expect.objectContaining({ reason: 'unsupported-version' }),
    );
  });
});

describe('segment decoder allocation', () => {
  const spies: { mockRestore(): void }[] = [];
  let largest = 0;
  function watchAllocations(): void {
    largest = 0;
    for (const name of ['alloc', 'allocUnsafe', 'allocUnsafeSlow'] as const) {
      const original = Buffer[name].bind(Buffer) as (size: number, ...rest: unknown[]) => Buffer;
      spies.push(
        vi.spyOn(Buffer, name).mockImplementation(((size: number, ...rest: unknown[]) => {
          largest = Math.max(largest, size);
          return original(size, ...rest);
        }) as never),
      );
    }
  }
  afterEach(() => {
    while (spies.length) spies.pop()!.mockRestore();
  });

  /** A header that declares a record section of `payload` bytes and one huge write, then stops. */
  function hugeDeclaration(payload: number, writeLength: number): Buffer {
    const b = Buffer.alloc(50 + 2 + 13 + 600);
    b.write('LBSG', 0, 'latin1');
    b.writeUInt16LE(1, 4);
    b.writeUInt32LE(1, 40);
    b.writeUInt32LE(payload, 44);
    b[48] = 1;
    b[49] = 1;
    b.write('md', 50, 'latin1');
    b[52] = 1;
    b.writeUInt32LE(writeLength, 52 + 9);
    return b;
  }

  it('waits for a declared 32 MiB write without allocating for it, and reports the truncation', () => {
    const bytes = hugeDeclaration(MAX_SEGMENT_BYTES - 200, MAX_WRITE_BYTES);
    watchAllocations();
    const decoder = new SegmentDecoder();
    for (let i = 0; i < bytes.length; i += 7) decoder.push(bytes.subarray(i, i + 7));
    expect(() => decoder.end()).toThrow(expect.objectContaining({ reason: 'truncated' }));
    expect(largest).toBeLessThanOrEqual(bytes.length);
  });

  it('rejects declared lengths past the bounds as soon as the header or record header arrives', () => {
    const inputs = [
      hugeDeclaration(0xffffffff, 512).subarray(0, 50),
      hugeDeclaration(MAX_SEGMENT_BYTES - 200, 0xfffffe00).subarray(0, 65),
      hugeDeclaration(4096, MAX_WRITE_BYTES).subarray(0, 65),
    ];
    watchAllocations();
    const decoder = new SegmentDecoder();
    expect(() => decoder.push(inputs[0])).toThrow(expect.objectContaining({ reason: 'too-large' }));
    const second = new SegmentDecoder();
    expect(() => second.push(inputs[1])).toThrow(expect.objectContaining({ reason: 'too-large' }));
    const third = new SegmentDecoder();
    expect(() => third.push(inputs[2])).toThrow(expect.objectContaining({ reason: 'exceeds-declared' }));
    expect(largest).toBeLessThanOrEqual(65);
  });
});

describe('SegmentBuilder', () => {
  const identity = { machine: 'db-1', disk: 'sda', epoch: 1, seq: 12 };

  it('knows its encoded size after every record and builds what it was given', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(record, time), { maxLength: 10 }), (items) => {
        const builder = new SegmentBuilder(identity);
        for (const [r, t] of items) {
          expect(builder.fits(r)).toBe(true);
          const predicted = builder.sizeWith(r);
          builder.add(r, r.type === 'marker' ? r.time : t);
          expect(builder.encodedSize).toBe(predicted);
        }
        const bytes = builder.encode();
        expect(bytes.length).toBe(builder.encodedSize);
        const decoded = decodeSegment(bytes);
        expect(decoded.records.length).toBe(items.length);
        decoded.records.forEach((r, i) => expectSameRecord(r, items[i][0]));
        if (items.length > 0) {
          const times = items.map(([r, t]) => (r.type === 'marker' ? r.time : t));
          expect(decoded.header.firstWriteTime).toBe(Math.min(...times));
          expect(decoded.header.lastWriteTime).toBe(Math.max(...times));
        }
      }),
      { numRuns: 200 },
    );
  });

  it('lets a sender cut on size and on count', () => {
    const builder = new SegmentBuilder(identity, { maxBytes: 4096, maxRecords: 3 });
    const w = (offset: number): SegmentRecord => ({ type: 'write', offset, data: Buffer.alloc(1024) });
    builder.write(0, Buffer.alloc(1024), 1).write(1024, Buffer.alloc(1024), 2);
    expect(builder.fits(w(2048))).toBe(true);
    builder.add(w(2048), 3);
    expect(builder.fits({ type: 'zero', offset: 0, length: 512 })).toBe(false); // count
    expect(reasonOf(() => builder.zero(0, 512, 4))).toBe('too-large');
    expect(builder.recordCount).toBe(3);
    expect(builder.encode().length).toBeLessThanOrEqual(4096);

    const small = new SegmentBuilder(identity, { maxBytes: 2048 });
    small.write(0, Buffer.alloc(1024), 1);
    expect(small.fits(w(1024))).toBe(false); // size
    expect(reasonOf(() => small.add(w(1024), 2))).toBe('too-large');
  });

  it('validates its identity, options and records up front', () => {
    expect(reasonOf(() => new SegmentBuilder({ ...identity, machine: 'DB' }))).toBe('invalid-name');
    expect(reasonOf(() => new SegmentBuilder({ ...identity, seq: -1 }))).toBe('invalid-number');
    expect(reasonOf(() => new SegmentBuilder(identity, { maxBytes: MAX_SEGMENT_BYTES + 1 }))).toBe(
      'out-of-range',
    );
    const builder = new SegmentBuilder(identity);
    expect(reasonOf(() => builder.trim(1, 512, 1))).toBe('misaligned');
    expect(reasonOf(() => builder.write(0, Buffer.alloc(512), -5))).toBe('invalid-number');
    expect(builder.recordCount).toBe(0);
  });

  it('takes header times from the records, and stamps an empty segment with one time', () => {
    const { header } = decodeSegment(
      new SegmentBuilder(identity).marker({ id: 'x', kind: 'group', time: 5 }).encode(),
    );
    expect(header.firstWriteTime).toBe(5);
    const empty = new SegmentBuilder(identity).toSegment().header;
    expect(empty.firstWriteTime).toBe(empty.lastWriteTime);
  });
});
