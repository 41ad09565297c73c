/*
 * Resync against rsync: a source image and a stale copy that differs in 1% of its 64 KiB blocks
 * (chosen at random, each rewritten with new random data). Lifeboat's resync pass (the agent's
 * runResync: SHA-256 per 64 KiB block of both sides, differing blocks encoded as segments and
 * written durably) versus `rsync --inplace --no-whole-file --stats` between the same two files, in
 * the same run (--ignore-times: both files have the same size and time, and the point is the delta
 * transfer, not rsync's quick check). Bytes sent: for the resync, the encoded segments plus the checksum list as the
 * cloud endpoint serves it (hex JSON); for rsync, its total bytes sent plus received. Targets:
 * fewer bytes and less time than rsync (ratio ≥ 1 on both).
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import type { DiskSegmenter } from '../agent/mobility/segmenter';
import { runResync, type RemoteChecksums, type SyncDevice } from '../agent/mobility/sync';
import { encodeSegment, type SegmentRecord } from '../shared/segment';
import type { BenchResult } from './types';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
/** Bytes of one block's checksum in the endpoint's JSON answer: 64 hex digits, quotes, a comma. */
const CHECKSUM_JSON_BYTES = 67;

function exec(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(
      cmd,
      args,
      { maxBuffer: 64 * MiB, env: { ...process.env, LC_ALL: 'C' } },
      (err, stdout, stderr) =>
        err ? reject(new Error(`${cmd} failed: ${err.message}\n${stderr}`)) : resolve(stdout),
    ),
  );
}

/** The source image (random data) and its stale copy; returns the blocks that differ. */
function makeImages(source: string, stale: string, size: number, fraction: number, seed: number): number {
  const chunk = Buffer.alloc(16 * MiB);
  const src = fs.openSync(source, 'w');
  const old = fs.openSync(stale, 'w');
  for (let at = 0; at < size; at += chunk.length) {
    const n = Math.min(chunk.length, size - at);
    randomFillSync(chunk, 0, n);
    fs.writeSync(src, chunk, 0, n, at);
    fs.writeSync(old, chunk, 0, n, at);
  }
  const blocks = size / BLOCK;
  const want = Math.round(blocks * fraction);
  let state = seed >>> 0;
  const next = () => {
    state = (state * 1664525 + 1013904223) >>> 0;
    return state / 2 ** 32;
  };
  const changed = new Set<number>();
  while (changed.size < want) changed.add(Math.floor(next() * blocks));
  const block = Buffer.alloc(BLOCK);
  for (const b of changed) {
    randomFillSync(block);
    fs.writeSync(src, block, 0, BLOCK, b * BLOCK);
  }
  fs.fsyncSync(src);
  fs.fsyncSync(old);
  fs.closeSync(src);
  fs.closeSync(old);
  return changed.size;
}

/**
 * The cloud side of the comparison: the seed disk's checksums, computed elsewhere (the checksum
 * endpoint runs in the function app), here on a worker thread over the stale copy, a few ranges
 * ahead of the agent — as rsync's receiver hashes in its own process.
 */
class WorkerChecksums implements RemoteChecksums {
  private readonly worker: Worker;
  private readonly waiting = new Map<number, (sums: Buffer[]) => void>();
  private readonly asked = new Map<number, Promise<Buffer[]>>();

  constructor(
    file: string,
    readonly blockSize: number,
    private readonly size: number,
  ) {
    this.worker = new Worker(
      `const { parentPort, workerData } = require('node:worker_threads');
       const fs = require('node:fs');
       const { createHash } = require('node:crypto');
       const fd = fs.openSync(workerData.file, 'r');
       parentPort.on('message', ({ offset, length }) => {
         const buf = Buffer.alloc(length);
         let done = 0;
         while (done < length) { const n = fs.readSync(fd, buf, done, length - done, offset + done); if (n === 0) break; done += n; }
         const sums = Buffer.alloc(Math.ceil(length / workerData.block) * 32);
         for (let at = 0, i = 0; at < length; at += workerData.block, i++)
           createHash('sha256').update(buf.subarray(at, Math.min(length, at + workerData.block))).digest().copy(sums, i * 32);
         parentPort.postMessage({ offset, sums }, [sums.buffer]);
       });`,
      { eval: true, workerData: { file, block: blockSize } },
    );
    this.worker.on('message', ({ offset, sums }: { offset: number; sums: Uint8Array }) => {
      const b = Buffer.from(sums.buffer, sums.byteOffset, sums.byteLength);
      const out: Buffer[] = [];
      for (let at = 0; at < b.length; at += 32) out.push(b.subarray(at, at + 32));
      this.waiting.get(offset)?.(out);
      this.waiting.delete(offset);
    });
  }

  private ask(offset: number, length: number): Promise<Buffer[]> {
    let p = this.asked.get(offset);
    if (!p) {
      p = new Promise((resolve) => this.waiting.set(offset, resolve));
      this.asked.set(offset, p);
      this.worker.postMessage({ offset, length });
    }
    return p;
  }

  checksums(range: { offset: number; length: number }): Promise<Buffer[]> {
    for (let k = 1; k <= 4; k++) {
      const at = range.offset + k * range.length;
      if (at < this.size) this.ask(at, Math.min(range.length, this.size - at));
    }
    const p = this.ask(range.offset, range.length);
    void p.then(() => this.asked.delete(range.offset));
    return p;
  }

  close(): Promise<number> {
    return this.worker.terminate();
  }
}

/**
 * Where the resync appends: segments of at most 8 MiB (the agent's default), encoded with the
 * shared codec and written durably to one journal file. Stands in for the agent's DiskSegmenter,
 * whose journal is being reworked; runResync itself is the agent's.
 */
class SegmentSink {
  readonly mode = 'resync';
  readonly disk = 'd0';
  bytes = 0;
  private records: SegmentRecord[] = [];
  private pending = 0;
  private seq = 1;
  private readonly fd: number;

  constructor(file: string) {
    this.fd = fs.openSync(file, 'w');
  }

  append(
    change:
      | { kind: 'write'; offset: number; length: number; data: Buffer }
      | { kind: 'zero'; offset: number; length: number },
  ): void {
    if (change.kind === 'write')
      this.records.push({ type: 'write', offset: change.offset, data: Buffer.from(change.data) });
    else this.records.push({ type: 'zero', offset: change.offset, length: change.length });
    this.pending += change.kind === 'write' ? change.length : 16;
    if (this.pending >= 8 * MiB) this.cut();
  }

  cut(): void {
    if (this.records.length === 0) return;
    const now = Date.now();
    const bytes = encodeSegment({
      header: {
        machine: 'bench',
        disk: 'd0',
        epoch: 1,
        seq: this.seq++,
        firstWriteTime: now,
        lastWriteTime: now,
      },
      records: this.records,
    });
    fs.writeSync(this.fd, bytes);
    fs.fdatasyncSync(this.fd);
    this.bytes += bytes.length;
    this.records = [];
    this.pending = 0;
  }

  close(): void {
    this.cut();
    fs.closeSync(this.fd);
  }
}

async function resyncPass(
  dir: string,
  source: string,
  stale: string,
  size: number,
): Promise<{ seconds: number; bytes: number; shipped: number }> {
  const sink = new SegmentSink(path.join(dir, 'journal.seg'));
  const fd = await fs.promises.open(source, 'r');
  const device: SyncDevice = {
    size,
    read: async (offset, length) => {
      const b = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) done += (await fd.read(b, done, length - done, offset + done)).bytesRead;
      return b;
    },
    pause: () => Promise.resolve(),
    resume: () => undefined,
  };
  const t0 = process.hrtime.bigint();
  const remote = new WorkerChecksums(stale, BLOCK, size);
  const progress = await runResync({
    device,
    segmenter: sink as unknown as DiskSegmenter,
    remote,
    chunkBytes: 4 * MiB,
  });
  sink.close();
  await remote.close();
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  await fd.close();
  return {
    seconds,
    bytes: sink.bytes + (size / BLOCK) * CHECKSUM_JSON_BYTES,
    shipped: progress.shippedBytes,
  };
}

async function rsyncPass(source: string, target: string): Promise<{ seconds: number; bytes: number }> {
  const t0 = process.hrtime.bigint();
  const out = await exec('rsync', [
    '--inplace',
    '--no-whole-file',
    '--ignore-times',
    '--stats',
    source,
    target,
  ]);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const num = (label: string) => {
    const m = new RegExp(`${label}: ([\\d,]+)`).exec(out);
    if (!m) throw new Error(`rsync --stats printed no "${label}":\n${out}`);
    return Number(m[1].replace(/,/g, ''));
  };
  return { seconds, bytes: num('Total bytes sent') + num('Total bytes received') };
}

export async function run({ quick }: { quick: boolean }): Promise<BenchResult[]> {
  const size = quick ? 256 * MiB : 2048 * MiB;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-bench-resync-'));
  try {
    const source = path.join(dir, 'source.img');
    const stale = path.join(dir, 'stale.img');
    const changed = makeImages(source, stale, size, 0.01, 2026);
    // Our pass first (it leaves the stale copy untouched), then rsync updates a copy of it.
    const ours = await resyncPass(dir, source, stale, size);
    if (ours.shipped !== changed * BLOCK)
      throw new Error(`the resync shipped ${ours.shipped} bytes; ${changed * BLOCK} differ`);
    const theirs = await rsyncPass(source, stale);
    const label = `${size / MiB} MiB, ${changed} of ${size / BLOCK} 64 KiB blocks changed`;
    return [
      {
        name: `resync ${label}: bytes sent`,
        value: ours.bytes / MiB,
        unit: 'MiB',
        reference: 'rsync --inplace --no-whole-file (sent + received)',
        referenceValue: theirs.bytes / MiB,
        ratio: theirs.bytes / ours.bytes,
      },
      {
        name: `resync ${label}: time`,
        value: ours.seconds,
        unit: 's',
        reference: 'rsync --inplace --no-whole-file',
        referenceValue: theirs.seconds,
        ratio: theirs.seconds / ours.seconds,
      },
    ];
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (require.main === module) {
  void run({ quick: process.argv.includes('--quick') }).then((rows) => {
    for (const r of rows) {
      console.log(
        `${r.name}: ${r.value.toFixed(2)} ${r.unit}  vs ${r.reference}: ${r.referenceValue.toFixed(2)} ${r.unit}  ratio ${r.ratio.toFixed(2)}`,
      );
    }
  });
}
