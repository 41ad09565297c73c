import { createHash, randomBytes } from 'node:crypto';
import {
  coalesceRecords,
  decodeSegment,
  encodeSegment,
  SegmentBuilder,
  SegmentDecoder,
  type Segment,
  type SegmentRecord,
} from '../shared/segment';
import type { BenchResult } from './types';

// How close is the segment codec to the floor every codec pays — copying the bytes once and
// hashing them with SHA-256? Encode, whole-buffer decode and 64 KiB-chunk streaming decode are
// each compared with `Buffer.copy` + SHA-256 of the same bytes, measured in the same run.

const MB = 1e6;

/** Best of `rounds` timings, in seconds (the least disturbed by the other work on the machine). */
function best(rounds: number, fn: () => void): number {
  let fastest = Infinity;
  for (let i = 0; i < rounds; i++) {
    const start = process.hrtime.bigint();
    fn();
    fastest = Math.min(fastest, Number(process.hrtime.bigint() - start) / 1e9);
  }
  return fastest;
}

/** A segment filled to `bytes` with writes of `writeBytes` at scattered offsets. */
function segmentOf(bytes: number, writeBytes: number): Segment {
  const builder = new SegmentBuilder({ machine: 'bench', disk: 'd0', epoch: 1, seq: 1 }, { maxBytes: bytes });
  const data = randomBytes(writeBytes * 64);
  for (let i = 0; ; i++) {
    const record: SegmentRecord = {
      type: 'write',
      offset: ((i * 7919) % 4096) * writeBytes,
      data: data.subarray((i % 64) * writeBytes, ((i % 64) + 1) * writeBytes),
    };
    if (!builder.fits(record)) break;
    builder.add(record, 1_700_000_000_000 + i);
  }
  return builder.toSegment();
}

export async function run(options: { quick: boolean }): Promise<BenchResult[]> {
  const size = options.quick ? 8 * 1024 * 1024 : 64 * 1024 * 1024;
  const rounds = options.quick ? 3 : 7;
  const results: BenchResult[] = [];

  for (const writeBytes of [4096, 1024 * 1024]) {
    const segment = segmentOf(size, writeBytes);
    const encoded = encodeSegment(segment);
    const label = `${(encoded.length / 1024 / 1024) | 0} MiB segment of ${writeBytes >= 1024 * 1024 ? '1 MiB' : '4 KiB'} writes`;

    // The reference: one copy of the same bytes into a fresh buffer, and a SHA-256 over them.
    const reference = best(rounds, () => {
      const copy = Buffer.allocUnsafe(encoded.length);
      encoded.copy(copy);
      createHash('sha256').update(copy).digest();
    });
    const referenceRate = encoded.length / reference / MB;
    const add = (name: string, seconds: number): void => {
      const value = encoded.length / seconds / MB;
      results.push({
        name: `${name}, ${label}`,
        value,
        unit: 'MB/s',
        reference: 'Buffer.copy + SHA-256 of the same bytes',
        referenceValue: referenceRate,
        ratio: value / referenceRate,
      });
    };

    add(
      'encodeSegment',
      best(rounds, () => encodeSegment(segment)),
    );
    add(
      'decodeSegment',
      best(rounds, () => decodeSegment(encoded)),
    );
    add(
      'SegmentDecoder in 64 KiB chunks',
      best(rounds, () => {
        const decoder = new SegmentDecoder();
        for (let at = 0; at < encoded.length; at += 65536) decoder.push(encoded.subarray(at, at + 65536));
        decoder.end();
      }),
    );
    if (writeBytes === 4096) {
      // Coalescing overlapping 4 KiB writes (the offsets above repeat) before applying.
      add(
        'coalesceRecords',
        best(rounds, () => coalesceRecords(segment.records, { maxWriteBytes: 4 * 1024 * 1024 })),
      );
    }
  }
  return results;
}
