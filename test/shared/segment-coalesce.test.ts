import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { applyRecordsToImage } from '../../shared/disk-model';
import {
  coalesceRecords,
  encodeSegment,
  MAX_WRITE_BYTES,
  type MarkerKind,
  type SegmentRecord,
} from '../../shared/segment';

const SECTOR = 512;
const DISK_SECTORS = 64;
const DISK_BYTES = DISK_SECTORS * SECTOR;

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

/** Records on a small disk, so overlaps, adjacency and markers are frequent. */
const record: fc.Arbitrary<SegmentRecord> = fc
  .record({
    kind: fc.constantFrom('write', 'write', 'write', 'zero', 'trim', 'marker'),
    at: fc.integer({ min: 0, max: DISK_SECTORS - 1 }),
    sectors: fc.integer({ min: 1, max: 12 }),
    seed: fc.integer(),
    markerKind: fc.constantFrom<MarkerKind>('crash', 'app', 'group'),
  })
  .map(({ kind, at, sectors, seed, markerKind }): SegmentRecord => {
    const length = Math.min(sectors, DISK_SECTORS - at) * SECTOR;
    const offset = at * SECTOR;
    if (kind === 'write') return { type: 'write', offset, data: pattern(length, seed) };
    if (kind === 'marker')
      return { type: 'marker', id: `m${seed >>> 0}`, kind: markerKind, time: 1, tag: '' };
    return { type: kind as 'zero' | 'trim', offset, length };
  });

const maxWriteBytes = fc.constantFrom(SECTOR, 2 * SECTOR, 4096, MAX_WRITE_BYTES);

/**
 * A second model that tells trim from zero (trim fills 0xEE), so the tests also prove that
 * coalescing never turns one into the other.
 */
function applyDistinguishingTrim(image: Buffer, records: SegmentRecord[]): Buffer {
  for (const r of records) {
    if (r.type === 'write') r.data.copy(image, r.offset);
    else if (r.type === 'zero') image.fill(0, r.offset, r.offset + r.length);
    else if (r.type === 'trim') image.fill(0xee, r.offset, r.offset + r.length);
  }
  return image;
}

/** The image after each marker, and at the end. */
function snapshotsAtMarkers(
  initial: Buffer,
  records: SegmentRecord[],
  apply: typeof applyDistinguishingTrim,
): Buffer[] {
  const snapshots: Buffer[] = [];
  const image = Buffer.from(initial);
  let run: SegmentRecord[] = [];
  for (const r of records) {
    if (r.type === 'marker') {
      apply(image, run);
      run = [];
      snapshots.push(Buffer.from(image));
    } else {
      run.push(r);
    }
  }
  apply(image, run);
  snapshots.push(image);
  return snapshots;
}

function end(r: SegmentRecord): number {
  if (r.type === 'marker') throw new Error('no range');
  return r.offset + (r.type === 'write' ? r.data.length : r.length);
}

describe('coalesceRecords', () => {
  it('leaves the disk exactly as the original records do, at every marker and at the end', () => {
    fc.assert(
      fc.property(fc.array(record, { maxLength: 60 }), fc.integer(), maxWriteBytes, (records, seed, max) => {
        const initial = pattern(DISK_BYTES, seed);
        const coalesced = coalesceRecords(records, { maxWriteBytes: max });

        const expected = snapshotsAtMarkers(initial, records, applyDistinguishingTrim);
        const actual = snapshotsAtMarkers(initial, coalesced, applyDistinguishingTrim);
        expect(actual.length).toBe(expected.length);
        actual.forEach((image, i) => expect(image.equals(expected[i])).toBe(true));

        // And with the shared reference model (trim reads as zeros).
        const a = applyRecordsToImage(Buffer.from(initial), records);
        const b = applyRecordsToImage(Buffer.from(initial), coalesced);
        expect(b.equals(a)).toBe(true);
      }),
      { numRuns: 1000 },
    );
  });

  it('keeps markers in place and emits sorted, non-overlapping, maximally merged ranges between them', () => {
    fc.assert(
      fc.property(fc.array(record, { maxLength: 60 }), maxWriteBytes, (records, max) => {
        const coalesced = coalesceRecords(records, { maxWriteBytes: max });
        expect(coalesced.filter((r) => r.type === 'marker')).toEqual(
          records.filter((r) => r.type === 'marker'),
        );
        // Only markers separate runs, so the output is still a valid segment body.
        encodeSegment({
          header: { machine: 'm', disk: 'd', epoch: 0, seq: 0, firstWriteTime: 0, lastWriteTime: 0 },
          records: coalesced,
        });
        let previous: SegmentRecord | undefined;
        for (const r of coalesced) {
          if (r.type === 'marker') {
            previous = undefined;
            continue;
          }
          if (r.type === 'write') expect(r.data.length).toBeLessThanOrEqual(max);
          if (previous !== undefined) {
            expect(r.offset).toBeGreaterThanOrEqual(end(previous));
            if (r.offset === end(previous) && r.type === previous.type) {
              // Adjacent same-kind ranges exist only where a write was split at maxWriteBytes.
              expect(r.type).toBe('write');
              if (previous.type === 'write') expect(previous.data.length).toBe(max);
            }
          }
          previous = r;
        }
      }),
      { numRuns: 1000 },
    );
  });

  it('merges overlapping and adjacent writes, with later data winning', () => {
    const a = Buffer.alloc(1024, 0xaa);
    const b = Buffer.alloc(1024, 0xbb);
    const out = coalesceRecords([
      { type: 'write', offset: 0, data: a },
      { type: 'write', offset: 512, data: b },
      { type: 'write', offset: 1536, data: Buffer.alloc(512, 0xcc) },
    ]);
    expect(out).toHaveLength(1);
    expect(out[0]).toMatchObject({ type: 'write', offset: 0 });
    const data = (out[0] as { data: Buffer }).data;
    expect(
      data.equals(
        Buffer.concat([Buffer.alloc(512, 0xaa), Buffer.alloc(1024, 0xbb), Buffer.alloc(512, 0xcc)]),
      ),
    ).toBe(true);
  });

  it('cuts writes by later zero and trim ranges, and never merges across a marker', () => {
    const marker: SegmentRecord = { type: 'marker', id: 'rp', kind: 'crash', time: 5, tag: '' };
    const out = coalesceRecords([
      { type: 'write', offset: 0, data: Buffer.alloc(2048, 1) },
      { type: 'zero', offset: 512, length: 512 },
      { type: 'trim', offset: 1024, length: 512 },
      marker,
      { type: 'write', offset: 2048, data: Buffer.alloc(512, 2) },
      { type: 'zero', offset: 0, length: 512 },
      { type: 'zero', offset: 512, length: 512 },
    ]);
    expect(
      out.map((r) => (r.type === 'marker' ? 'marker' : `${r.type}@${r.offset}+${end(r) - r.offset}`)),
    ).toEqual([
      'write@0+512',
      'zero@512+512',
      'trim@1024+512',
      'write@1536+512',
      'marker',
      'zero@0+1024',
      'write@2048+512',
    ]);
  });

  it('passes a write through as a view when nothing overlaps it, and returns nothing for nothing', () => {
    const data = Buffer.alloc(4096, 3);
    const [only] = coalesceRecords([{ type: 'write', offset: 8192, data }]);
    expect(only.type === 'write' && only.data.buffer === data.buffer).toBe(true);
    expect(coalesceRecords([])).toEqual([]);
    expect(() => coalesceRecords([], { maxWriteBytes: 1000 })).toThrow(RangeError);
  });

  it('handles a large random workload of small writes', () => {
    const sectors = 2048; // 1 MiB disk
    const records: SegmentRecord[] = [];
    let x = 12345;
    const next = (n: number): number => {
      x = (Math.imul(x, 1103515245) + 12345) >>> 0;
      return x % n;
    };
    /** Data that names its record and sector, cheaply. */
    const stamped = (count: number, i: number): Buffer => {
      const data = Buffer.alloc(count * SECTOR, i & 0xff);
      for (let s = 0; s < count; s++) data.writeUInt32LE(i * 16 + s, s * SECTOR);
      return data;
    };
    for (let i = 0; i < 30_000; i++) {
      const at = next(sectors - 8);
      const r = next(1000);
      if (r < 850) records.push({ type: 'write', offset: at * SECTOR, data: stamped(1 + next(8), i) });
      else if (r < 950) records.push({ type: 'zero', offset: at * SECTOR, length: (1 + next(8)) * SECTOR });
      else if (r < 995) records.push({ type: 'trim', offset: at * SECTOR, length: (1 + next(8)) * SECTOR });
      else records.push({ type: 'marker', id: `m${i}`, kind: 'crash', time: i, tag: '' });
    }
    const initial = pattern(sectors * SECTOR, 99);
    const coalesced = coalesceRecords(records, { maxWriteBytes: 4 * 1024 * 1024 });
    expect(records.filter((r) => r.type === 'marker').length).toBeGreaterThan(50);
    expect(coalesced.length).toBeLessThan(records.length);
    const expected = snapshotsAtMarkers(initial, records, applyDistinguishingTrim);
    const actual = snapshotsAtMarkers(initial, coalesced, applyDistinguishingTrim);
    expect(actual.length).toBe(expected.length);
    actual.forEach((image, i) => expect(image.equals(expected[i])).toBe(true));
  });
});

describe('applyRecordsToImage (the reference disk model)', () => {
  it('writes, zeroes, reads trims as zeros, and ignores markers', () => {
    const image = Buffer.alloc(2048, 9);
    applyRecordsToImage(image, [
      { type: 'write', offset: 0, data: Buffer.alloc(1024, 1) },
      { type: 'marker', id: 'x', kind: 'app', time: 0, tag: '' },
      { type: 'zero', offset: 512, length: 512 },
      { type: 'trim', offset: 1536, length: 512 },
    ]);
    const expected = Buffer.concat([
      Buffer.alloc(512, 1),
      Buffer.alloc(512, 0),
      Buffer.alloc(512, 9),
      Buffer.alloc(512, 0),
    ]);
    expect(image.equals(expected)).toBe(true);
  });

  it('refuses ranges outside the image', () => {
    expect(() =>
      applyRecordsToImage(Buffer.alloc(512), [{ type: 'zero', offset: 512, length: 512 }]),
    ).toThrow(RangeError);
  });
});
