import { readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { compressWith, codecAvailable, decompressWith, type Codec } from '../shared/envelope';
import type { BenchResult } from './types';

// Which codec should seal cache blobs? Compresses disk-like data (real files from this machine's
// /usr — executables, libraries, text — interleaved with zero blocks, as on a used file system)
// with each codec, and prints MB/s and ratio against a plain memory copy of the same bytes.

/** Disk-like test data: 4 KiB blocks of real files, one in five blocks zero, deterministic. */
export function diskLikeData(bytes: number): Buffer {
  const out = Buffer.alloc(bytes);
  const files: string[] = [];
  const walk = (dir: string, depth: number): void => {
    if (files.length > 4000 || depth > 4) return;
    let entries: string[];
    try {
      entries = readdirSync(dir).sort();
    } catch {
      return;
    }
    for (const e of entries) {
      const p = path.join(dir, e);
      try {
        const st = statSync(p);
        if (st.isDirectory()) walk(p, depth + 1);
        else if (st.isFile() && st.size > 0 && st.size < 16 * 1024 * 1024) files.push(p);
      } catch {
        /* unreadable: skip */
      }
    }
  };
  for (const root of ['/usr/bin', '/usr/lib', '/usr/share']) walk(root, 0);
  let pos = 0;
  let block = 0;
  for (const f of files) {
    if (pos >= bytes) break;
    let data: Buffer;
    try {
      data = readFileSync(f);
    } catch {
      continue;
    }
    for (let off = 0; off < data.length && pos < bytes; off += 4096) {
      if (block++ % 5 === 4) pos += Math.min(4096, bytes - pos); // a zero block
      if (pos >= bytes) break;
      pos += data.copy(out, pos, off, Math.min(off + 4096, data.length));
      pos = Math.min(bytes, Math.ceil(pos / 512) * 512);
    }
  }
  if (pos < bytes) {
    // Too few files here: fill the rest with a deterministic mix of text-like and random-ish bytes.
    let x = 0x9e3779b9;
    for (let i = pos; i < bytes; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      out[i] = (i >> 12) % 3 === 0 ? 0 : (i >> 12) % 3 === 1 ? 97 + ((x >>> 16) % 26) : x >>> 24;
    }
  }
  return out;
}

function timeIt(minMs: number, fn: () => void): number {
  let n = 0;
  const start = process.hrtime.bigint();
  let elapsed = 0;
  while (elapsed < minMs || n < 2) {
    fn();
    n++;
    elapsed = Number(process.hrtime.bigint() - start) / 1e6;
  }
  return elapsed / n;
}

export async function run(options: { quick?: boolean } = {}): Promise<BenchResult[]> {
  const size = options.quick ? 8 * 1024 * 1024 : 32 * 1024 * 1024;
  const minMs = options.quick ? 300 : 1500;
  const data = diskLikeData(size);
  const mb = size / 1e6;
  const copyMs = timeIt(minMs, () => {
    Buffer.from(data);
  });
  const copyRate = mb / (copyMs / 1000);
  const results: BenchResult[] = [];
  for (const codec of ['zstd', 'lz4', 'gzip', 'brotli'] as Codec[]) {
    if (!codecAvailable(codec)) continue;
    let compressed: Buffer = Buffer.alloc(0);
    const ms = timeIt(minMs, () => {
      compressed = compressWith(codec, data);
    });
    const dms = timeIt(minMs, () => {
      decompressWith(codec, compressed, data.length);
    });
    const rate = mb / (ms / 1000);
    const label =
      codec === 'zstd' ? 'zstd-1' : codec === 'gzip' ? 'gzip-6' : codec === 'brotli' ? 'brotli-q1' : 'lz4';
    results.push(
      {
        name: `compress ${label}`,
        value: rate,
        unit: 'MB/s',
        reference: 'memcpy',
        referenceValue: copyRate,
        ratio: rate / copyRate,
      },
      {
        name: `decompress ${label}`,
        value: mb / (dms / 1000),
        unit: 'MB/s',
        reference: 'memcpy',
        referenceValue: copyRate,
        ratio: mb / (dms / 1000) / copyRate,
      },
      {
        name: `ratio ${label}`,
        value: data.length / compressed.length,
        unit: 'x',
        reference: 'none',
        referenceValue: 1,
        ratio: data.length / compressed.length,
      },
    );
  }
  return results;
}

if (require.main === module) {
  void run({ quick: process.argv.includes('--quick') }).then((rows) => {
    for (const r of rows) {
      console.log(
        `${r.name.padEnd(22)} ${r.value.toFixed(1).padStart(9)} ${r.unit.padEnd(5)} (${r.reference} ${r.referenceValue.toFixed(1)}, ratio ${r.ratio.toFixed(3)})`,
      );
    }
  });
}
