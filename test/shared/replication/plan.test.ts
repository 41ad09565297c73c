import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { applyRecordsToImage } from '../../../shared/disk-model';
import { OrderedPageWriter, PAGE_WRITE_BYTES, planPageOps, type PageOp } from '../../../shared/replication';
import type { SegmentRecord } from '../../../shared/segment';

const SECTOR = 512;
const DISK = 12 * 1024 * 1024; // three 4 MiB windows

type ChangeRecord = Exclude<SegmentRecord, { type: 'marker' }>;

const record: fc.Arbitrary<ChangeRecord> = fc
  .record({
    kind: fc.constantFrom('write', 'write', 'zero', 'trim'),
    start: fc.integer({ min: 0, max: DISK / SECTOR - 1 }),
    sectors: fc.oneof(fc.integer({ min: 1, max: 16 }), fc.integer({ min: 1, max: 3 * 8192 })),
    fill: fc.integer({ min: 1, max: 255 }),
  })
  .map(({ kind, start, sectors, fill }) => {
    const n = Math.min(sectors, DISK / SECTOR - start);
    const offset = start * SECTOR;
    return kind === 'write'
      ? { type: 'write' as const, offset, data: Buffer.alloc(n * SECTOR, fill) }
      : { type: kind as 'zero' | 'trim', offset, length: n * SECTOR };
  });

function applyOps(image: Buffer, ops: PageOp[]): void {
  for (const op of ops) {
    if (op.kind === 'clear') image.fill(0, op.offset, op.offset + op.length);
    else Buffer.concat(op.pieces).copy(image, op.offset);
  }
}

describe('planPageOps', () => {
  it('gives the bytes of applying the records in order, with non-overlapping calls within 4 MiB windows', () => {
    fc.assert(
      fc.property(fc.array(record, { minLength: 0, maxLength: 30 }), fc.boolean(), (records, adjacent) => {
        // Half the time, make the run a sequence of adjacent writes (the no-overlap fast path).
        let run = records;
        if (adjacent) {
          let at = records[0]?.offset ?? 0;
          run = records
            .filter((r) => r.type === 'write')
            .map((r) => {
              const data = (r as { data: Buffer }).data.subarray(
                0,
                Math.min((r as { data: Buffer }).data.length, DISK - at),
              );
              const out = { type: 'write' as const, offset: at, data };
              at += data.length;
              return out;
            })
            .filter((r) => r.data.length > 0);
        }
        const expected = applyRecordsToImage(Buffer.alloc(DISK, 0xee), run);
        const ops = planPageOps(run);
        const actual = Buffer.alloc(DISK, 0xee);
        // Any order of the calls gives the same bytes: they do not overlap.
        applyOps(actual, [...ops].reverse());
        expect(actual.equals(expected)).toBe(true);
        const sorted = [...ops].sort((a, b) => a.offset - b.offset);
        for (let i = 1; i < sorted.length; i++)
          expect(sorted[i].offset).toBeGreaterThanOrEqual(sorted[i - 1].offset + sorted[i - 1].length);
        for (const op of ops) {
          if (op.kind !== 'write') continue;
          expect(op.length).toBeLessThanOrEqual(PAGE_WRITE_BYTES);
          expect(Math.floor(op.offset / PAGE_WRITE_BYTES)).toBe(
            Math.floor((op.offset + op.length - 1) / PAGE_WRITE_BYTES),
          );
          expect(op.pieces.reduce((n, p) => n + p.length, 0)).toBe(op.length);
        }
      }),
      { numRuns: 150 },
    );
  });
});

describe('OrderedPageWriter', () => {
  it('runs overlapping operations in submission order and others in parallel, within the limit', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.record({
            start: fc.integer({ min: 0, max: 60 }),
            len: fc.integer({ min: 1, max: 8 }),
            delay: fc.integer({ min: 0, max: 3 }),
          }),
          {
            maxLength: 25,
          },
        ),
        async (ops) => {
          const writer = new OrderedPageWriter(3);
          const image = new Array<number>(70).fill(-1);
          const expected = new Array<number>(70).fill(-1);
          let running = 0;
          let peak = 0;
          for (const [i, op] of ops.entries()) {
            for (let b = op.start; b < op.start + op.len; b++) expected[b] = i;
            await writer.submit(op.start, op.start + op.len, async () => {
              running++;
              peak = Math.max(peak, running);
              await new Promise((r) => setTimeout(r, op.delay));
              for (let b = op.start; b < op.start + op.len; b++) image[b] = i;
              running--;
            });
          }
          await writer.drain();
          expect(image).toEqual(expected);
          expect(peak).toBeLessThanOrEqual(3);
        },
      ),
      { numRuns: 40 },
    );
  });
});
