/*
 * Resync against rsync: a source image and a stale copy that differs in 1% of its 64 KiB blocks
 * (chosen at random, each rewritten with new random data). Lifeboat's resync pass (the agent's
 * runResync: SHA-256 per 64 KiB block of both sides, the local side hashed on worker threads, the
 * cloud's checksums fetched over loopback HTTP through the agent's ApiChecksums from a stand-in
 * endpoint on its own thread, differing blocks encoded as segments and written durably) versus
 * `rsync --inplace --no-whole-file --stats` between the same two files, in the same run
 * (--ignore-times: both files have the same size and time, and the point is the delta transfer,
 * not rsync's quick check). Bytes sent: for the resync, the encoded segments plus every byte of
 * the checksum requests and answers on the wire (binary, 32 bytes per block, HTTP headers
 * included); for rsync, its total bytes sent plus received. Targets: fewer bytes and less time
 * than rsync (ratio ≥ 1 on both).
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { ApiChecksums } from '../agent/mobility/remote-checksums';
import type { DiskSegmenter } from '../agent/mobility/segmenter';
import { runResync, type SyncDevice } from '../agent/mobility/sync';
import { encodeSegment, type SegmentRecord } from '../shared/segment';
import type { BenchResult } from './types';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;

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
 * The cloud side: the checksum endpoint's binary answer (docs/api.md) for the stale copy, served
 * over loopback HTTP. Each window is read in 256 KiB pieces and hashed in 64 KiB slices on one of
 * `threads` hashing threads (the endpoint is stateless, so the agent's windows in flight are
 * computed side by side, as a function app serves concurrent requests); rsync's receiver likewise
 * hashes in its own process. The agent reads it through its real client (ApiChecksums). Counts the
 * bytes on the wire both ways (request and response headers included).
 */
class CloudChecksumServer {
  private readonly worker: Worker;
  readonly url: Promise<string>;

  constructor(file: string, size: number, threads: number) {
    this.worker = new Worker(
      `const { parentPort, workerData, Worker } = require('node:worker_threads');
       const http = require('node:http');
       const { file, size, threads } = workerData;
       // Hashing threads: each reads its window by descriptor in 256 KiB pieces, 64 KiB slices.
       const hashers = Array.from({ length: threads }, () => {
         const w = new Worker(\`
           const { parentPort, workerData } = require('node:worker_threads');
           const fs = require('node:fs');
           const crypto = require('node:crypto');
           const sha256 = crypto.hash ? (b) => crypto.hash('sha256', b, 'buffer')
             : (b) => crypto.createHash('sha256').update(b).digest();
           const fd = fs.openSync(workerData.file, 'r');
           const piece = Buffer.allocUnsafeSlow(256 * 1024);
           parentPort.postMessage('ready');
           parentPort.on('message', ({ id, offset, end, blockSize }) => {
             const sums = new Uint8Array(Math.ceil((end - offset) / blockSize) * 32);
             for (let at = offset; at < end; at += piece.length) {
               const n = Math.min(piece.length, end - at);
               for (let done = 0; done < n; ) done += fs.readSync(fd, piece, done, n - done, at + done);
               for (let b = 0; b < n; b += blockSize)
                 sums.set(sha256(piece.subarray(b, Math.min(n, b + blockSize))),
                   ((at - offset + b) / blockSize) * 32);
             }
             parentPort.postMessage({ id, sums }, [sums.buffer]);
           });\`, { eval: true, workerData: { file } });
         const h = { w, jobs: new Map(), ready: new Promise((r) => w.once('message', r)) };
         w.on('message', (m) => { if (m !== 'ready') { h.jobs.get(m.id)(m.sums); h.jobs.delete(m.id); } });
         return h;
       });
       let nextId = 0;
       const hash = (offset, end, blockSize) => {
         const h = hashers.reduce((a, b) => (b.jobs.size < a.jobs.size ? b : a));
         const id = nextId++;
         return new Promise((resolve) => {
           h.jobs.set(id, resolve);
           h.w.postMessage({ id, offset, end, blockSize });
         });
       };
       const sockets = new Set();
       const server = http.createServer(async (req, res) => {
         const q = new URL(req.url, 'http://cloud').searchParams;
         const blockSize = Number(q.get('blockSize')), offset = Number(q.get('offset'));
         const end = Math.min(size, offset + Number(q.get('length')));
         const sums = Buffer.from(await hash(offset, end, blockSize));
         res.writeHead(200, {
           'content-type': 'application/octet-stream', 'content-length': sums.length,
           'x-lifeboat-algorithm': 'sha256', 'x-lifeboat-size-bytes': String(size),
           'x-lifeboat-block-size': String(blockSize), 'x-lifeboat-offset': String(offset),
           'x-lifeboat-length': String(end - offset),
           ...(end < size ? { 'x-lifeboat-next-offset': String(end) } : {}),
         });
         res.end(sums);
       });
       server.on('connection', (s) => sockets.add(s));
       // Up before the pass starts, as the cloud endpoint is.
       Promise.all(hashers.map((h) => h.ready)).then(() =>
         server.listen(0, '127.0.0.1', () => parentPort.postMessage({ port: server.address().port })));
       parentPort.on('message', () => {
         let bytes = 0;
         for (const s of sockets) bytes += s.bytesRead + s.bytesWritten;
         parentPort.postMessage({ bytes });
       });`,
      { eval: true, workerData: { file, size, threads } },
    );
    this.url = new Promise((resolve) =>
      this.worker.once('message', (m: { port: number }) => resolve(`http://127.0.0.1:${m.port}/api`)),
    );
  }

  /** Bytes sent and received on the server's connections so far. */
  wireBytes(): Promise<number> {
    const answer = new Promise<number>((resolve) =>
      this.worker.once('message', (m: { bytes: number }) => resolve(m.bytes)),
    );
    this.worker.postMessage('bytes');
    return answer;
  }

  close(): Promise<number> {
    return this.worker.terminate();
  }
}

/**
 * Where the resync appends: segments of at most 8 MiB (the agent's default), encoded with the
 * shared codec and written durably (write + fdatasync, off the event loop) to one journal file.
 * Stands in for the agent's DiskSegmenter, whose journal is being reworked; runResync itself is
 * the agent's.
 */
class SegmentSink {
  readonly mode = 'resync';
  readonly disk = 'd0';
  bytes = 0;
  private records: SegmentRecord[] = [];
  private pending = 0;
  private seq = 1;
  private written: Promise<void> = Promise.resolve();

  constructor(private readonly file: fs.promises.FileHandle) {}

  append(
    change:
      | { kind: 'write'; offset: number; length: number; data: Buffer }
      | { kind: 'zero'; offset: number; length: number },
  ): Promise<void> | void {
    if (change.kind === 'write')
      this.records.push({ type: 'write', offset: change.offset, data: Buffer.from(change.data) });
    else this.records.push({ type: 'zero', offset: change.offset, length: change.length });
    this.pending += change.kind === 'write' ? change.length : 16;
    if (this.pending >= 8 * MiB) return this.cut();
  }

  /** Encodes the open segment and writes it durably (one write and one fdatasync per segment). */
  cut(): Promise<void> {
    if (this.records.length === 0) return this.written;
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
    this.bytes += bytes.length;
    this.records = [];
    this.pending = 0;
    const at = this.bytes - bytes.length;
    this.written = this.written.then(async () => {
      await this.file.write(bytes, 0, bytes.length, at);
      await this.file.datasync();
    });
    return this.written;
  }

  async close(): Promise<void> {
    await this.cut();
    await this.file.close();
  }
}

async function resyncPass(
  dir: string,
  source: string,
  stale: string,
  size: number,
): Promise<{ seconds: number; bytes: number; shipped: number; cpuSeconds: number }> {
  const cloud = new CloudChecksumServer(stale, size, 2);
  const apiUrl = await cloud.url;
  const fd = await fs.promises.open(source, 'r');
  // The agent's file-backed device (agent.ts): a fresh buffer per read.
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
  try {
    const t0 = process.hrtime.bigint();
    const cpu0 = process.cpuUsage(); // every thread of this process: the agent's and the cloud's
    const sink = new SegmentSink(await fs.promises.open(path.join(dir, 'journal.seg'), 'w'));
    const remote = new ApiChecksums({ apiUrl, machine: 'bench', disk: 'd0', blockSize: BLOCK });
    const progress = await runResync({
      device,
      segmenter: sink as unknown as DiskSegmenter,
      remote,
    });
    await sink.close();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const cpu = process.cpuUsage(cpu0);
    if (remote.bytesFetched !== (size / BLOCK) * 32)
      throw new Error(
        `the agent fetched ${remote.bytesFetched} bytes of checksums for ${size / BLOCK} blocks`,
      );
    const checksumBytes = await cloud.wireBytes();
    return {
      seconds,
      bytes: sink.bytes + checksumBytes,
      shipped: progress.shippedBytes,
      cpuSeconds: (cpu.user + cpu.system) / 1e6,
    };
  } finally {
    await fd.close();
    await cloud.close();
  }
}

async function rsyncPass(
  source: string,
  target: string,
): Promise<{ seconds: number; bytes: number; cpuSeconds: number }> {
  const t0 = process.hrtime.bigint();
  // bash's `times` prints the CPU time of its children (rsync's sender, generator and receiver).
  const out = await exec('bash', [
    '-c',
    'rsync "$@" && times',
    'rsync',
    '--inplace',
    '--no-whole-file',
    '--ignore-times',
    '--stats',
    source,
    target,
  ]);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const times = [
    ...out
      .trim()
      .split('\n')
      .pop()!
      .matchAll(/(\d+)m([\d.]+)s/g),
  ];
  if (times.length !== 2) throw new Error(`bash's times printed no children's CPU time:\n${out}`);
  const cpuSeconds = times.reduce((sum, m) => sum + Number(m[1]) * 60 + Number(m[2]), 0);
  const num = (label: string) => {
    const m = new RegExp(`${label}: ([\\d,]+)`).exec(out);
    if (!m) throw new Error(`rsync --stats printed no "${label}":\n${out}`);
    return Number(m[1].replace(/,/g, ''));
  };
  return { seconds, bytes: num('Total bytes sent') + num('Total bytes received'), cpuSeconds };
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
      {
        // Why the time depends on the load: SHA-256 of both sides costs more CPU than rsync's
        // xxh128 and rolling checksum, so on a busy machine the share of CPU decides.
        name: `resync ${label}: CPU time (user + system, all threads)`,
        value: ours.cpuSeconds,
        unit: 's',
        reference: 'rsync --inplace --no-whole-file (all processes)',
        referenceValue: theirs.cpuSeconds,
        ratio: theirs.cpuSeconds / ours.cpuSeconds,
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
