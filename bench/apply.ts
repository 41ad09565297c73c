import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startAzurite } from '../infra/local/azurite';
import {
  changelogBlobName,
  generateEncryptionKey,
  parseKeyRing,
  sealEnvelope,
  type KeyRing,
} from '../shared/envelope';
import { createLogger } from '../shared/logger';
import {
  applyChangelogs,
  ensureContainer,
  planPageOps,
  registerMachine,
  WorkerOpener,
  replicationDepsFromSettings,
  type ReplicationDeps,
} from '../shared/replication';
import { encodeSegment, SegmentBuilder, type Segment } from '../shared/segment';
import { diskLikeData } from './compression';
import { measured } from './tools';
import type { BenchResult } from './types';

// Apply throughput — encrypted change logs in the cache → pages of the seed disk — against the
// limit measured in the same run: raw uploadPages of exactly the page writes apply makes, with the
// same concurrency, to the same Azurite. Then apply lag under a steady churn of 20 MB/s (ASR's
// per-disk maximum) and 54 MB/s (ASR's per-machine peak).

const MiB = 1024 * 1024;
const CONCURRENCY = 8;

interface Stream {
  segments: Segment[];
  /** Change bytes (write data) in the stream. */
  bytes: number;
}

/** Segments of `segmentBytes`, made of 1 MiB writes marching through the disk, disk-like data. */
function makeStream(
  machine: string,
  disk: string,
  diskBytes: number,
  totalBytes: number,
  segmentBytes: number,
  firstSeq = 1,
  startAt = 0,
): Stream {
  const source = diskLikeData(Math.min(64 * MiB, totalBytes));
  const writeBytes = Math.min(MiB, segmentBytes);
  const segments: Segment[] = [];
  let at = startAt;
  let from = 0;
  for (let seq = firstSeq; (seq - firstSeq) * segmentBytes < totalBytes; seq++) {
    const b = new SegmentBuilder({ machine, disk, epoch: 1, seq });
    for (let w = 0; w < segmentBytes / writeBytes; w++) {
      if (from + writeBytes > source.length) from = 0;
      if (at + writeBytes > diskBytes) at = 0;
      b.write(at, source.subarray(from, from + writeBytes), Date.now());
      at += writeBytes;
      from += writeBytes;
    }
    segments.push(b.toSegment());
  }
  return { segments, bytes: segments.length * segmentBytes };
}

async function upload(deps: ReplicationDeps, ring: KeyRing, segment: Segment): Promise<void> {
  const name = changelogBlobName(segment.header);
  await deps.changelogs
    .getBlockBlobClient(name)
    .uploadData(sealEnvelope(encodeSegment(segment), { name, keyRing: ring }));
}

/** The page writes apply makes for a stream, in order (the same planning, the same sizes). */
function pageWrites(stream: Stream): [number, Buffer][] {
  const out: [number, Buffer][] = [];
  for (const s of stream.segments) {
    const run = s.records.filter((r) => r.type !== 'marker');
    for (const op of planPageOps(run))
      if (op.kind === 'write') out.push([op.offset, Buffer.concat(op.pieces)]);
  }
  return out;
}

async function rawUploadPages(
  deps: ReplicationDeps,
  name: string,
  diskBytes: number,
  writes: [number, Buffer][],
): Promise<void> {
  const blob = deps.seed.getPageBlobClient(name);
  await blob.create(diskBytes);
  let next = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (next < writes.length) {
        const [at, data] = writes[next++];
        await blob.uploadPages(data, at, data.length);
      }
    }),
  );
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
}

/**
 * A producer uploads one segment every segmentBytes/churn seconds (and nudges); the applier runs
 * whenever nudged, as the trigger would. Lag = time from a segment's upload to the cursor passing it.
 */
async function churn(
  deps: ReplicationDeps,
  ring: KeyRing,
  machine: string,
  disk: string,
  diskBytes: number,
  mbPerSecond: number,
  seconds: number,
  segmentBytes: number,
) {
  const stream = makeStream(machine, disk, diskBytes, mbPerSecond * 1e6 * seconds, segmentBytes);
  const uploadedAt = new Map<number, number>();
  const lags: number[] = [];
  let produced = 0;
  let pending = false;
  let applying: Promise<void> = Promise.resolve();
  const kick = () => {
    if (pending) return;
    pending = true;
    applying = applying.then(async () => {
      pending = false;
      const report = await applyChangelogs(deps, { machine, disk });
      const done = Date.now();
      for (const [seq, at] of uploadedAt) {
        if (seq <= report.appliedSeq) {
          lags.push((done - at) / 1000);
          uploadedAt.delete(seq);
        }
      }
      if (uploadedAt.size > 0) kick();
    });
  };
  const interval = (segmentBytes / (mbPerSecond * 1e6)) * 1000;
  const start = Date.now();
  for (const [i, segment] of stream.segments.entries()) {
    const due = start + i * interval;
    if (due > Date.now()) await new Promise((r) => setTimeout(r, due - Date.now()));
    await upload(deps, ring, segment);
    uploadedAt.set(segment.header.seq, Date.now());
    produced += segmentBytes;
    kick();
  }
  const offeredSeconds = (Date.now() - start) / 1000;
  while (uploadedAt.size > 0) await applying;
  const totalSeconds = (Date.now() - start) / 1000;
  return {
    offered: produced / 1e6 / offeredSeconds,
    applied: produced / 1e6 / totalSeconds,
    p50: percentile(lags, 50),
    p95: percentile(lags, 95),
    max: Math.max(...lags),
  };
}

export async function run(options: { quick?: boolean } = {}): Promise<BenchResult[]> {
  const quick = options.quick ?? false;
  const diskBytes = quick ? 64 * MiB : 256 * MiB;
  const totalBytes = quick ? 64 * MiB : 256 * MiB;
  const segmentBytes = 4 * MiB;
  const folder = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-bench-apply-'));
  const azurite = await startAzurite({ location: path.join(folder, 'azurite') });
  const previousLevel = process.env.LIFEBOAT_LOG_LEVEL;
  process.env.LIFEBOAT_LOG_LEVEL = 'warn';
  try {
    const conn = azurite.connectionString;
    const keys = generateEncryptionKey('bench');
    const ring = parseKeyRing(keys);
    const base = replicationDepsFromSettings(
      {
        CacheStorage: conn,
        ReplicaStorage: conn,
        ServiceBusConnection: conn,
        LIFEBOAT_ENCRYPTION_KEYS: keys,
      },
      createLogger('bench-apply'),
    );
    const deps: ReplicationDeps = {
      ...base,
      tuning: { ...base.tuning, writeConcurrency: CONCURRENCY, budgetMs: 3_600_000 },
      nudge: async () => undefined,
    };
    await ensureContainer(deps.changelogs);
    await ensureContainer(deps.seed);
    const machine = 'bench';
    await registerMachine(deps, machine, {
      disks: [
        { id: 'd0', sizeBytes: diskBytes },
        { id: 'd1', sizeBytes: diskBytes },
        { id: 'd2', sizeBytes: diskBytes },
        { id: 'd3', sizeBytes: diskBytes },
        { id: 'warm', sizeBytes: 8 * MiB },
      ],
    });
    // Warm up (JIT, the worker thread, Azurite's first writes) on a disk of its own.
    const workerDeps: ReplicationDeps = { ...deps, opener: new WorkerOpener(deps.keyRing, 1) };
    for (const s of makeStream(machine, 'warm', 8 * MiB, 8 * MiB, segmentBytes).segments)
      await upload(deps, ring, s);
    await applyChangelogs(workerDeps, { machine, disk: 'warm' });

    // Throughput: the whole backlog in the cache, one apply run per disk; raw and apply
    // alternate, and each side's faster run counts (the page cache and Azurite warm up).
    const stream = makeStream(machine, 'd0', diskBytes, totalBytes, segmentBytes);
    const again = makeStream(machine, 'd3', diskBytes, totalBytes, segmentBytes);
    for (const s of [...stream.segments, ...again.segments]) await upload(deps, ring, s);
    const writes = pageWrites(stream);
    const raw = (n: number) =>
      measured(azurite.pid, () => rawUploadPages(deps, `raw/r${n}.img`, diskBytes, writes));
    const apply = (disk: string) =>
      measured(azurite.pid, async () => {
        const report = await applyChangelogs(deps, { machine, disk });
        if (report.appliedSeq !== stream.segments.length)
          throw new Error(`apply stopped at ${report.appliedSeq} (${report.outcome})`);
      });
    const faster = <T extends { seconds: number }>(a: T, b: T) => (a.seconds <= b.seconds ? a : b);
    const rawFirst = await raw(1);
    const appliedFirst = await apply('d0');
    const rawSecond = await raw(2);
    const applied = faster(appliedFirst, await apply('d3'));
    const rawBest = faster(rawFirst, rawSecond);
    const rawRate = stream.bytes / 1e6 / rawBest.seconds;
    const applyRate = stream.bytes / 1e6 / applied.seconds;
    const perGB = (cpu: number) => cpu / (stream.bytes / 1e9);
    const results: BenchResult[] = [
      {
        name: `apply: encrypted change logs → seed disk (${segmentBytes / MiB} MiB segments, ${CONCURRENCY} writes in flight)`,
        value: applyRate,
        unit: 'MB/s',
        reference: `raw uploadPages of the same page writes, ${CONCURRENCY} in flight`,
        referenceValue: rawRate,
        ratio: applyRate / rawRate,
      },
      // Azurite is one Node process (one core for its JavaScript): its CPU per GB bounds the rate.
      // Apply also makes it serve the change logs' downloads, deletes and cursor updates.
      {
        name: 'apply: Azurite CPU per GB of change data (downloads, pages, deletes, cursor)',
        value: perGB(applied.azuriteCpu),
        unit: 'CPU s/GB',
        reference: 'Azurite CPU per GB of the raw uploadPages',
        referenceValue: perGB(rawBest.azuriteCpu),
        ratio: rawBest.azuriteCpu / applied.azuriteCpu,
      },
      {
        name: 'apply: applier CPU per GB (download, decrypt, decompress, verify, upload)',
        value: perGB(applied.clientCpu),
        unit: 'CPU s/GB',
        reference: 'client CPU per GB of the raw uploadPages',
        referenceValue: perGB(rawBest.clientCpu),
        ratio: rawBest.clientCpu / applied.clientCpu,
      },
    ];

    // The same with change logs opened on a worker thread (LIFEBOAT_APPLY_OPEN_WORKERS=1).
    const second = makeStream(machine, 'd2', diskBytes, totalBytes, segmentBytes);
    for (const s of second.segments) await upload(deps, ring, s);
    const onWorker = await measured(azurite.pid, async () => {
      const report = await applyChangelogs(workerDeps, { machine, disk: 'd2' });
      if (report.appliedSeq !== second.segments.length)
        throw new Error(`apply stopped at ${report.appliedSeq}`);
    });
    const rawThird = await raw(3);
    const rawRate2 = stream.bytes / 1e6 / Math.min(rawBest.seconds, rawThird.seconds);
    const workerRate = second.bytes / 1e6 / onWorker.seconds;
    results.push({
      name: 'apply with change logs opened on 1 worker thread',
      value: workerRate,
      unit: 'MB/s',
      reference: `raw uploadPages of the same page writes, ${CONCURRENCY} in flight`,
      referenceValue: rawRate2,
      ratio: workerRate / rawRate2,
    });

    // Lag under a steady churn, on the second disk.
    const seconds = quick ? 6 : 20;
    for (const mbps of [20, 54]) {
      const c = await churn(deps, ring, machine, 'd1', diskBytes, mbps, seconds, segmentBytes);
      const oneSegment = segmentBytes / (mbps * 1e6);
      results.push(
        {
          name: `apply rate under ${mbps} MB/s churn (${seconds} s)`,
          value: c.applied,
          unit: 'MB/s',
          reference: 'offered churn',
          referenceValue: c.offered,
          ratio: c.applied / c.offered,
        },
        {
          name: `apply lag p95 at ${mbps} MB/s churn (p50 ${c.p50.toFixed(2)} s, max ${c.max.toFixed(2)} s)`,
          value: c.p95,
          unit: 's',
          reference: 'one segment of churn',
          referenceValue: oneSegment,
          ratio: oneSegment / Math.max(c.p95, 1e-9),
        },
      );
    }
    return results;
  } finally {
    if (previousLevel === undefined) delete process.env.LIFEBOAT_LOG_LEVEL;
    else process.env.LIFEBOAT_LOG_LEVEL = previousLevel;
    await azurite.stop();
    await fs.rm(folder, { recursive: true, force: true });
  }
}

if (require.main === module) {
  void run({ quick: process.argv.includes('--quick') }).then((rows) => {
    for (const r of rows) {
      console.log(
        `${r.name}: ${r.value.toFixed(2)} ${r.unit} vs ${r.reference} ${r.referenceValue.toFixed(2)} ${r.unit} → ratio ${r.ratio.toFixed(2)}`,
      );
    }
  });
}
