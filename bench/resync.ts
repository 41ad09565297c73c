/*
 * Resync against rsync: a source image and a stale copy that differs in 1% of its 64 KiB blocks
 * (chosen at random, each rewritten with new random data). The stale copy is the cloud's seed
 * disk, a page blob in Azurite, whose checksum index the applier filled while idle (timed too,
 * beside a plain read of the disk). Lifeboat's resync pass (the agent's runResync: SHA-256 per
 * 64 KiB block of the source on worker threads, the cloud's checksums fetched over loopback HTTP
 * through the agent's ApiChecksums from the endpoint's own code, differing blocks encoded as
 * segments and written durably) versus `rsync --inplace --no-whole-file --stats` between the same
 * two files, in the same run (--ignore-times: both files have the same size and time, and the
 * point is the delta transfer, not rsync's quick check). Our pass runs twice: with the index,
 * and with none (the endpoint then reads and hashes its disk while the agent waits). Bytes sent:
 * for the resync, the encoded segments plus every byte of the checksum requests and answers on
 * the wire (binary, 32 bytes per block, HTTP headers included); for rsync, its total bytes sent
 * plus received. Targets: fewer bytes and less time than rsync (ratio ≥ 1 on both).
 */
import { execFile } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import http from 'node:http';
import type net from 'node:net';
import { ApiChecksums } from '../agent/mobility/remote-checksums';
import type { DiskSegmenter } from '../agent/mobility/segmenter';
import { runResync, type SyncDevice } from '../agent/mobility/sync';
import { startAzurite } from '../infra/local/azurite';
import { generateEncryptionKey } from '../shared/envelope';
import { createLogger } from '../shared/logger';
import {
  applyChangelogs,
  blockChecksums,
  checksumsHeaders,
  discardChecksumIndex,
  ensureContainer,
  readChecksumIndex,
  readRange,
  registerMachine,
  replicationDepsFromSettings,
  seedBlob,
  type ReplicationDeps,
} from '../shared/replication';
import { encodeSegment, type SegmentRecord } from '../shared/segment';
import { measured } from './tools';
import type { BenchResult } from './types';

const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const MACHINE = 'bench';
const DISK = 'd0';

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
function makeImages(source: string, stale: string, size: number, fraction: number, seed: number): number[] {
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
  return [...changed].sort((a, b) => a - b);
}

/** Drops a file's pages from the page cache, so each pass reads its disk as a resync would. */
async function evict(file: string): Promise<void> {
  await exec('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
}

/** The stale copy's bytes of the changed blocks, to undo rsync's in-place update between runs. */
function saveBlocks(file: string, blocks: number[]): () => void {
  const fd = fs.openSync(file, 'r');
  const saved = blocks.map((b) => {
    const data = Buffer.alloc(BLOCK);
    fs.readSync(fd, data, 0, BLOCK, b * BLOCK);
    return data;
  });
  fs.closeSync(fd);
  return () => {
    const out = fs.openSync(file, 'r+');
    blocks.forEach((b, i) => fs.writeSync(out, saved[i], 0, BLOCK, b * BLOCK));
    fs.fsyncSync(out);
    fs.closeSync(out);
  };
}

/**
 * The cloud side: the checksum endpoint's code (blockChecksums, its binary answer and headers)
 * behind a loopback HTTP server in this process, over the stale copy held as a seed disk in
 * Azurite. The agent reads it through its real client (ApiChecksums). Counts the bytes on the
 * wire both ways (request and response headers included).
 */
class CloudChecksumServer {
  private readonly server: http.Server;
  private readonly sockets = new Set<net.Socket>();
  readonly url: Promise<string>;

  constructor(deps: ReplicationDeps, machine: string, disk: string) {
    this.server = http.createServer((req, res) => {
      const q = new URL(req.url ?? '/', 'http://cloud').searchParams;
      const num = (name: string) => (q.has(name) ? Number(q.get(name)) : undefined);
      blockChecksums(deps, {
        machine,
        disk,
        blockSize: num('blockSize'),
        offset: num('offset'),
        length: num('length'),
      }).then(
        (sums) => {
          res.writeHead(200, { ...checksumsHeaders(sums), 'content-length': sums.digests.length });
          res.end(sums.digests);
        },
        (err: unknown) => {
          res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(String(err));
        },
      );
    });
    this.server.on('connection', (socket) => this.sockets.add(socket));
    this.url = new Promise((resolve) =>
      this.server.listen(0, '127.0.0.1', () =>
        resolve(`http://127.0.0.1:${(this.server.address() as net.AddressInfo).port}/api`),
      ),
    );
  }

  /** Bytes sent and received on the server's connections so far. */
  wireBytes(): number {
    let bytes = 0;
    for (const s of this.sockets) bytes += s.bytesRead + s.bytesWritten;
    return bytes;
  }

  async close(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise((resolve) => this.server.close(resolve));
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

/** One resync pass of the agent against the cloud's checksums; CPU counts Azurite's too. */
async function resyncPass(
  dir: string,
  source: string,
  size: number,
  cloudDeps: ReplicationDeps,
  azuritePid: number,
): Promise<{ seconds: number; bytes: number; shipped: number; cpuSeconds: number }> {
  const cloud = new CloudChecksumServer(cloudDeps, MACHINE, DISK);
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
    let progress: Awaited<ReturnType<typeof runResync>> | undefined;
    let sink: SegmentSink | undefined;
    let remote: ApiChecksums | undefined;
    // Every thread of this process (the agent's and the endpoint's) and Azurite.
    const m = await measured(azuritePid, async () => {
      sink = new SegmentSink(await fs.promises.open(path.join(dir, 'journal.seg'), 'w'));
      remote = new ApiChecksums({ apiUrl, machine: MACHINE, disk: DISK, blockSize: BLOCK });
      progress = await runResync({ device, segmenter: sink as unknown as DiskSegmenter, remote });
      await sink.close();
    });
    if (remote!.bytesFetched !== (size / BLOCK) * 32)
      throw new Error(
        `the agent fetched ${remote!.bytesFetched} bytes of checksums for ${size / BLOCK} blocks`,
      );
    return {
      seconds: m.seconds,
      bytes: sink!.bytes + cloud.wireBytes(),
      shipped: progress!.shippedBytes,
      cpuSeconds: m.clientCpu + m.azuriteCpu,
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

/** Copies the stale image into the seed disk, 4 MiB put-pages, 8 at a time. */
async function uploadSeed(deps: ReplicationDeps, file: string, size: number): Promise<void> {
  const blob = seedBlob(deps.seed, MACHINE, DISK);
  const fd = await fs.promises.open(file, 'r');
  try {
    let next = 0;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        const chunk = Buffer.allocUnsafe(4 * MiB);
        while (next < size) {
          const at = next;
          next += chunk.length;
          const n = Math.min(chunk.length, size - at);
          await fd.read(chunk, 0, n, at);
          await blob.uploadPages(chunk.subarray(0, n), at, n);
        }
      }),
    );
  } finally {
    await fd.close();
  }
}

/** Reads the whole seed disk (4 MiB ranges, 8 at a time) without hashing: the fill's reference. */
async function readSeed(deps: ReplicationDeps, size: number): Promise<void> {
  const blob = seedBlob(deps.seed, MACHINE, DISK);
  let next = 0;
  await Promise.all(
    Array.from({ length: 8 }, async () => {
      while (next < size) {
        const at = next;
        next += 4 * MiB;
        await readRange(blob, at, Math.min(4 * MiB, size - at));
      }
    }),
  );
}

export async function run({ quick }: { quick: boolean }): Promise<BenchResult[]> {
  const size = quick ? 256 * MiB : 2048 * MiB;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-bench-resync-'));
  const azurite = await startAzurite({ location: path.join(dir, 'azurite') });
  const previousLevel = process.env.LIFEBOAT_LOG_LEVEL;
  process.env.LIFEBOAT_LOG_LEVEL = 'warn';
  try {
    const conn = azurite.connectionString;
    const base = replicationDepsFromSettings(
      {
        CacheStorage: conn,
        ReplicaStorage: conn,
        ServiceBusConnection: conn,
        LIFEBOAT_ENCRYPTION_KEYS: generateEncryptionKey('bench'),
      },
      createLogger('bench-resync'),
    );
    // The fill runs to the end in one go here (a deployed applier does 2 s per idle run).
    const deps: ReplicationDeps = {
      ...base,
      tuning: { ...base.tuning, budgetMs: 3_600_000, fillMs: 3_600_000, fillQuietMs: 0 },
      nudge: async () => undefined,
    };
    await ensureContainer(deps.changelogs);
    await registerMachine(deps, MACHINE, { disks: [{ id: DISK, sizeBytes: size }] });

    const source = path.join(dir, 'source.img');
    const stale = path.join(dir, 'stale.img');
    const changedBlocks = makeImages(source, stale, size, 0.01, 2026);
    const changed = changedBlocks.length;
    const restoreStale = saveBlocks(stale, changedBlocks);
    await uploadSeed(deps, stale, size);
    // The applier's idle work after replicating: fill the disk's checksum index.
    const fill = await measured(azurite.pid, async () => {
      const report = await applyChangelogs(deps, { machine: MACHINE, disk: DISK });
      if (report.checksumIndex?.unknown !== 0)
        throw new Error(`the checksum index was not filled: ${JSON.stringify(report.checksumIndex)}`);
    });
    const rawRead = await measured(azurite.pid, () => readSeed(deps, size));
    // The pass labelled "from the index" must really have one to read.
    const indexed = await readChecksumIndex(deps.seed, MACHINE, DISK, size, 0, size);
    if (!indexed || !indexed.known.every(Boolean))
      throw new Error('the checksum index does not know every block after the fill');

    // Our pass with the index (as after replication) and rsync, alternately, twice each, every
    // pass starting with the files out of the page cache; each side's faster run counts. rsync
    // updates the stale file in place, so its changed blocks are put back after each run.
    const ours: Awaited<ReturnType<typeof resyncPass>>[] = [];
    const rsyncs: Awaited<ReturnType<typeof rsyncPass>>[] = [];
    for (let i = 0; i < 2; i++) {
      await evict(source);
      ours.push(await resyncPass(dir, source, size, deps, azurite.pid));
      await evict(source);
      await evict(stale);
      rsyncs.push(await rsyncPass(source, stale));
      restoreStale();
    }
    // Then with no index (the endpoint reads and hashes its seed disk while the agent waits).
    await discardChecksumIndex(deps.seed, MACHINE, DISK);
    await evict(source);
    const cold = await resyncPass(dir, source, size, deps, azurite.pid);
    for (const pass of [...ours, cold])
      if (pass.shipped !== changed * BLOCK)
        throw new Error(`the resync shipped ${pass.shipped} bytes; ${changed * BLOCK} differ`);
    const fastest = <T extends { seconds: number }>(runs: T[]) =>
      runs.reduce((a, b) => (b.seconds < a.seconds ? b : a));
    const warm = fastest(ours);
    const theirs = fastest(rsyncs);
    const label = `${size / MiB} MiB, ${changed} of ${size / BLOCK} 64 KiB blocks changed`;
    const rsync = 'rsync --inplace --no-whole-file';
    const row = (name: string, value: number, unit: string, reference: string, referenceValue: number) => ({
      name,
      value,
      unit,
      reference,
      referenceValue,
      ratio: referenceValue / value,
    });
    return [
      row(
        `resync ${label}: bytes sent`,
        warm.bytes / MiB,
        'MiB',
        `${rsync} (sent + received)`,
        theirs.bytes / MiB,
      ),
      row(`resync ${label}: time (cloud checksums from the index)`, warm.seconds, 's', rsync, theirs.seconds),
      // What it costs on a busy machine: the CPU of the agent, the endpoint and Azurite.
      row(
        `resync ${label}: CPU time (agent + endpoint + Azurite)`,
        warm.cpuSeconds,
        's',
        `${rsync} (all processes)`,
        theirs.cpuSeconds,
      ),
      // Without an index (just failed back, or LIFEBOAT_CHECKSUM_FILL_SECONDS=0): the endpoint
      // reads its seed disk from storage and hashes it while the agent waits.
      row(
        `resync ${label}: time (no index: cloud hashes its disk)`,
        cold.seconds,
        's',
        rsync,
        theirs.seconds,
      ),
      // The index's price, paid while the applier is idle: against reading the disk once. Timed
      // as one fill (deployed, it runs in 2 s slices a second apart once the disk is quiet).
      row(
        `checksum index fill ${size / MiB} MiB: time (one run)`,
        fill.seconds,
        's',
        'reading the seed disk (4 MiB ranges, 8 at a time, no hashing)',
        rawRead.seconds,
      ),
    ];
  } finally {
    if (previousLevel === undefined) delete process.env.LIFEBOAT_LOG_LEVEL;
    else process.env.LIFEBOAT_LOG_LEVEL = previousLevel;
    await azurite.stop();
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
