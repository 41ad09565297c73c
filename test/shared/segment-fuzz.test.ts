import { createHash } from 'node:crypto';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  encodeSegment,
  MAX_DISK_BYTES,
  MAX_RECORDS,
  MAX_SEGMENT_BYTES,
  MAX_TIME_MS,
  MAX_WRITE_BYTES,
  SEGMENT_FORMAT_REASONS,
  type MarkerKind,
  type Segment,
  type SegmentRecord,
} from '../../shared/segment';
import { prng } from '../helpers/random';

// Fuzzes the decoder with mutated and random inputs. The decoding runs in a worker thread so a
// hang shows up as a failed test (a deadline on each batch) rather than a stuck run; the worker
// also counts every Buffer allocation the decoder makes.

const INPUTS = 120_000;
const STREAMED_EVERY = 5; // every 5th input is also decoded in random chunks
const BATCH = 4_000;
const BATCH_DEADLINE_MS = 20_000; // a hang detector (a batch takes well under a second), not a speed requirement
const SEED = Number(process.env.SEGMENT_FUZZ_SEED ?? 0x5e6e17);

interface Outcome {
  ok: boolean;
  formatError?: boolean;
  reason?: string;
  byteOffset?: number;
  error?: string;
  canonical?: boolean;
  dataBytes?: number;
  largestAllocation: number;
}

const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
require(workerData.tsx).register();
const seg = require(workerData.codec);
let largest = 0;
for (const name of ['alloc', 'allocUnsafe', 'allocUnsafeSlow']) {
  const original = Buffer[name];
  Buffer[name] = function (size, ...rest) {
    if (size > largest) largest = size;
    return original.call(Buffer, size, ...rest);
  };
}
function decode(input, cuts) {
  if (cuts === null) return seg.decodeSegment(input);
  const decoder = new seg.SegmentDecoder();
  const parts = [];
  let from = 0;
  for (const at of [...cuts, input.length]) {
    parts.push(...decoder.push(input.subarray(from, at)));
    from = at;
  }
  decoder.end();
  return { header: parts[0].header, records: parts.slice(1).map((p) => p.record) };
}
function run(input, cuts) {
  largest = 0;
  let segment;
  try {
    segment = decode(input, cuts);
  } catch (err) {
    const formatError = err instanceof seg.SegmentFormatError;
    return { ok: false, formatError, reason: err && err.reason, byteOffset: err && err.byteOffset,
      error: formatError ? undefined : String((err && err.stack) || err), largestAllocation: largest };
  }
  const largestAllocation = largest;
  let dataBytes = 0;
  for (const r of segment.records) if (r.type === 'write') dataBytes += r.data.length;
  return { ok: true, canonical: seg.encodeSegment(segment).equals(input), dataBytes, largestAllocation };
}
parentPort.on('message', ({ id, cases }) => {
  const outcomes = cases.map(({ bytes, cuts }) => {
    const input = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    return { whole: run(input, null), streamed: cuts ? run(input, cuts) : undefined };
  });
  parentPort.postMessage({ id, outcomes });
});
`;

const random = prng(SEED);
const int = (n: number): number => Math.floor(random() * n);
const pick = <T>(items: readonly T[]): T => items[int(items.length)];
const bytes = (n: number): Buffer => {
  const b = Buffer.allocUnsafe(n);
  for (let i = 0; i < n; i++) b[i] = int(256);
  return b;
};

function randomSegment(): Segment {
  const label = (): string => pick(['m', 'web-1', 'db', 'd0', 'sda', 'x'.repeat(63), 'a-b-c']);
  const records: SegmentRecord[] = [];
  for (let n = int(7); n > 0; n--) {
    const offset = int(4096) * 512;
    switch (int(4)) {
      case 0:
        records.push({ type: 'write', offset, data: bytes((1 + int(3)) * 512) });
        break;
      case 1:
        records.push({ type: 'zero', offset, length: (1 + int(64)) * 512 });
        break;
      case 2:
        records.push({ type: 'trim', offset, length: (1 + int(64)) * 512 });
        break;
      default:
        records.push({
          type: 'marker',
          id: pick(['rp-1', 'A', '2026.11.21_x', 'z'.repeat(64)]),
          kind: pick<MarkerKind>(['crash', 'app', 'group']),
          time: int(2 ** 40),
          tag: pick(['', 'fsfreeze', 'é', '\u{1f600}', 'pg-checkpoint ok']),
        });
    }
  }
  const t = int(2 ** 40);
  return {
    header: {
      machine: label(),
      disk: label(),
      epoch: int(5),
      seq: int(1e6),
      firstWriteTime: t,
      lastWriteTime: t + int(1000),
    },
    records,
  };
}

/** Positions and widths of every fixed field in an encoded segment, so rewrites hit real fields. */
function fieldsOf(segment: Segment): { pos: number; size: number }[] {
  const fields = [4, 2, 2, 8, 8, 8, 8, 4, 4, 1, 1].reduce<{ pos: number; size: number }[]>((acc, size) => {
    const last = acc[acc.length - 1];
    acc.push({ pos: last ? last.pos + last.size : 0, size });
    return acc;
  }, []);
  let pos = 50;
  for (const name of [segment.header.machine, segment.header.disk]) {
    fields.push({ pos: pos + int(name.length), size: 1 });
    pos += name.length;
  }
  for (const r of segment.records) {
    fields.push({ pos, size: 1 });
    if (r.type === 'write') {
      fields.push(
        { pos: pos + 1, size: 8 },
        { pos: pos + 9, size: 4 },
        { pos: pos + 13 + int(r.data.length), size: 1 },
      );
      pos += 13 + r.data.length;
    } else if (r.type === 'marker') {
      const tag = Buffer.byteLength(r.tag);
      fields.push(
        { pos: pos + 1, size: 1 },
        { pos: pos + 2, size: 8 },
        { pos: pos + 10, size: 1 },
        { pos: pos + 11, size: 2 },
      );
      fields.push({ pos: pos + 13 + int(r.id.length), size: 1 });
      if (tag > 0) fields.push({ pos: pos + 13 + r.id.length + int(tag), size: 1 });
      pos += 13 + r.id.length + tag;
    } else {
      fields.push({ pos: pos + 1, size: 8 }, { pos: pos + 9, size: 8 });
      pos += 17;
    }
  }
  return fields;
}

function interesting(size: number, current: bigint): bigint {
  const max = (1n << BigInt(8 * size)) - 1n;
  const common = [0n, 1n, 511n, 512n, 513n, max, current + 1n, current - 1n, current + 512n, current - 512n];
  const wide: Record<number, bigint[]> = {
    1: [2n, 3n, 4n, 5n, 9n, 63n, 64n, 65n],
    2: [255n, 256n, 257n, 0x8000n],
    4: [
      BigInt(MAX_RECORDS),
      BigInt(MAX_RECORDS + 1),
      BigInt(MAX_WRITE_BYTES),
      BigInt(MAX_WRITE_BYTES + 512),
      BigInt(MAX_SEGMENT_BYTES),
      current + 13n,
      current - 13n,
      current + 14n,
      current - 17n,
    ],
    8: [
      2n ** 32n,
      2n ** 53n - 1n,
      2n ** 53n,
      BigInt(MAX_DISK_BYTES),
      BigInt(MAX_DISK_BYTES - 512),
      BigInt(MAX_TIME_MS),
      BigInt(MAX_TIME_MS + 1),
    ],
  };
  const choices = [...common, ...wide[size]];
  const value = random() < 0.15 ? BigInt(int(2 ** 31)) * BigInt(int(2 ** 31)) : pick(choices);
  return ((value % (max + 1n)) + (max + 1n)) % (max + 1n);
}

function readField(b: Buffer, pos: number, size: number): bigint {
  return size === 8 ? b.readBigUInt64LE(pos) : BigInt(b.readUIntLE(pos, size));
}

function writeField(b: Buffer, pos: number, size: number, value: bigint): void {
  if (size === 8) b.writeBigUInt64LE(value, pos);
  else b.writeUIntLE(Number(value), pos, size);
}

function reseal(b: Buffer): Buffer {
  if (b.length >= 32) {
    createHash('sha256')
      .update(b.subarray(0, b.length - 32))
      .digest()
      .copy(b, b.length - 32);
  }
  return b;
}

function mutate(pool: { segment: Segment; bytes: Buffer }[]): Buffer {
  const { segment, bytes: original } = pick(pool);
  const b = Buffer.from(original);
  const op = random();
  if (op < 0.05) return b; // unmodified
  if (op < 0.15) {
    for (let n = 1 + int(3); n > 0; n--) b[int(b.length)] ^= 1 << int(8);
    return b; // bit flips, caught by the checksum or earlier
  }
  if (op < 0.3) {
    for (let n = 1 + int(3); n > 0; n--) b[int(b.length - 32)] ^= 1 << int(8);
    return reseal(b); // bit flips past the checksum
  }
  if (op < 0.6) {
    const fields = fieldsOf(segment);
    for (let n = 1 + (random() < 0.2 ? 1 : 0); n > 0; n--) {
      const { pos, size } = pick(fields);
      writeField(b, pos, size, interesting(size, readField(b, pos, size)));
    }
    return reseal(b); // a field rewritten to an edge value
  }
  if (op < 0.68) {
    const cut = b.subarray(0, int(b.length));
    return random() < 0.5 ? cut : reseal(Buffer.from(cut)); // truncated
  }
  if (op < 0.72) return Buffer.concat([b, bytes(1 + int(40))]); // trailing garbage
  if (op < 0.82) {
    const at = int(b.length - 32);
    const out =
      random() < 0.5
        ? Buffer.concat([b.subarray(0, at), bytes(1 + int(16)), b.subarray(at)])
        : Buffer.concat([b.subarray(0, at), b.subarray(at + 1 + int(16))]);
    return reseal(out); // bytes inserted or deleted
  }
  if (op < 0.87) {
    const other = pick(pool).bytes;
    const out = Buffer.concat([b.subarray(0, int(b.length)), other.subarray(int(other.length))]);
    return random() < 0.5 ? out : reseal(out); // two segments spliced
  }
  if (op < 0.94) return bytes(int(300)); // noise
  const noise = bytes(50 + int(300)); // noise behind a valid prefix
  b.copy(noise, 0, 0, 8);
  return random() < 0.5 ? noise : reseal(noise);
}

describe('segment decoder fuzzing', () => {
  let worker: Worker;

  beforeAll(() => {
    worker = new Worker(WORKER_SOURCE, {
      eval: true,
      workerData: {
        tsx: require.resolve('tsx/cjs/api'),
        codec: path.resolve(__dirname, '../../shared/segment/index.ts'),
      },
    });
  });
  afterAll(async () => {
    await worker.terminate();
  });

  function decodeBatch(id: number, cases: { bytes: Buffer; cuts: number[] | null }[]) {
    return new Promise<{ whole: Outcome; streamed?: Outcome }[]>((resolve, reject) => {
      const timer = setTimeout(() => {
        void worker.terminate();
        reject(
          new Error(
            `the decoder did not finish batch ${id} (seed ${SEED}) within ${BATCH_DEADLINE_MS} ms: it hangs`,
          ),
        );
      }, BATCH_DEADLINE_MS);
      const onError = (err: Error) => {
        clearTimeout(timer);
        reject(err);
      };
      const onMessage = (msg: { id: number; outcomes: { whole: Outcome; streamed?: Outcome }[] }) => {
        if (msg.id !== id) return;
        clearTimeout(timer);
        worker.off('message', onMessage);
        worker.off('error', onError);
        resolve(msg.outcomes);
      };
      worker.on('message', onMessage);
      worker.once('error', onError);
      worker.postMessage({ id, cases });
    });
  }

  it(`decodes ${INPUTS} mutated and random inputs without crashing, hanging or over-allocating`, async () => {
    const pool = Array.from({ length: 300 }, () => {
      const segment = randomSegment();
      return { segment, bytes: encodeSegment(segment) };
    });
    const reasons = new Map<string, number>();
    const problems: string[] = [];
    let accepted = 0;
    let streamed = 0;
    const decoderReasons = SEGMENT_FORMAT_REASONS.filter((r) => r !== 'invalid-record');

    for (let start = 0; start < INPUTS; start += BATCH) {
      const cases = Array.from({ length: Math.min(BATCH, INPUTS - start) }, (_, i) => {
        const input = mutate(pool);
        let cuts: number[] | null = null;
        if ((start + i) % STREAMED_EVERY === 0) {
          cuts = Array.from({ length: 1 + int(8) }, () => int(input.length + 1)).sort((a, b) => a - b);
        }
        return { bytes: input, cuts };
      });
      const outcomes = await decodeBatch(start, cases);
      outcomes.forEach(({ whole, streamed: chunkwise }, i) => {
        const input = cases[i].bytes;
        const where = `input ${start + i} (seed ${SEED}) ${input.toString('hex').slice(0, 400)}`;
        for (const o of chunkwise ? [whole, chunkwise] : [whole]) {
          if (o.largestAllocation > input.length) {
            problems.push(`allocated ${o.largestAllocation} bytes for a ${input.length}-byte ${where}`);
          }
          if (o.ok && (!o.canonical || o.dataBytes! > input.length)) {
            problems.push(`accepted but does not re-encode to the same bytes: ${where}`);
          }
          if (!o.ok && (!o.formatError || !decoderReasons.includes(o.reason as never))) {
            problems.push(
              `threw something other than a SegmentFormatError (${o.error ?? o.reason}): ${where}`,
            );
          }
          if (!o.ok && (o.byteOffset === undefined || o.byteOffset > input.length)) {
            problems.push(`reported byte ${o.byteOffset} outside the ${input.length}-byte ${where}`);
          }
        }
        if (chunkwise) {
          streamed++;
          if (
            chunkwise.ok !== whole.ok ||
            chunkwise.reason !== whole.reason ||
            chunkwise.byteOffset !== whole.byteOffset
          ) {
            problems.push(
              `chunked decoding disagrees (${chunkwise.reason}@${chunkwise.byteOffset} vs ${whole.reason}@${whole.byteOffset}) with cuts ${cases[i].cuts}: ${where}`,
            );
          }
        }
        if (whole.ok) accepted++;
        else reasons.set(whole.reason!, (reasons.get(whole.reason!) ?? 0) + 1);
      });
    }

    if (process.env.SEGMENT_FUZZ_REPORT) console.log({ accepted, streamed, reasons });
    expect(problems.slice(0, 5)).toEqual([]);
    expect(streamed).toBeGreaterThanOrEqual(INPUTS / STREAMED_EVERY);
    expect(accepted).toBeGreaterThan(INPUTS * 0.03);
    // The mutations reach every structural check, not only the checksum.
    const seen = [...reasons.keys()].sort();
    expect(seen).toEqual([...decoderReasons].sort());
  }, 180_000);
});
