import { randomUUID } from 'node:crypto';
import type { PageBlobClient } from '@azure/storage-blob';
import { applyRecordsToImage } from '../../../shared/disk-model';
import {
  changelogBlobName,
  generateEncryptionKey,
  parseKeyRing,
  sealEnvelope,
  type KeyRing,
} from '../../../shared/envelope';
import { createLogger } from '../../../shared/logger';
import { encodeSegment, type MarkerKind, type Segment, type SegmentRecord } from '../../../shared/segment';
import {
  applyChangelogs,
  ensureContainer,
  readRange,
  replicationDepsFromSettings,
  WorkerOpener,
  type ApplyReport,
  type ApplyTuning,
  type ChangelogReady,
  type ReplicationDeps,
} from '../../../shared/replication';
import { prng } from '../../helpers/random';

export const KEYS = generateEncryptionKey('test1');

/** The settings of a test: every storage setting on the one Azurite, a queue of its own. */
export function testSettings(
  connection: string,
  queue: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return {
    AzureWebJobsStorage: connection,
    CacheStorage: connection,
    ReplicaStorage: connection,
    ServiceBusConnection: connection,
    ChangelogQueueName: queue,
    LIFEBOAT_ENCRYPTION_KEYS: KEYS,
    ...extra,
  };
}

export interface TestDeps extends ReplicationDeps {
  nudges: { message: ChangelogReady; delaySeconds?: number }[];
}

/** Real storage, a recording nudge port, quiet logs. */
export function testDeps(connection: string, tuning: Partial<ApplyTuning> = {}): TestDeps {
  const deps = replicationDepsFromSettings(testSettings(connection, 'unused'), quietLogger());
  const nudges: TestDeps['nudges'] = [];
  // A fill budget no loaded machine runs out of: a test's one idle run fills the whole index.
  const t = { ...deps.tuning, leaseSeconds: 15, fillMs: 60_000, ...tuning };
  return {
    ...deps,
    tuning: t,
    opener: t.openWorkers > 0 ? new WorkerOpener(deps.keyRing, t.openWorkers) : deps.opener,
    nudges,
    nudge: async (message, delaySeconds) => {
      nudges.push({ message, delaySeconds });
    },
  };
}

/** A machine name of its own for one test. */
export function uniqueMachine(prefix: string): string {
  return `${prefix}-${randomUUID().slice(0, 8)}`;
}

/** Applies until the disk has nothing more to do (the way re-enqueued messages would). */
export async function applyUntilIdle(deps: TestDeps, machine: string, disk: string): Promise<ApplyReport[]> {
  const reports: ApplyReport[] = [];
  for (let i = 0; i < 1000; i++) {
    deps.nudges.length = 0;
    const report = await applyChangelogs(deps, { machine, disk });
    reports.push(report);
    if (report.outcome !== 'budget' && deps.nudges.length === 0) return reports;
  }
  throw new Error('apply did not become idle');
}

export function quietLogger() {
  const previous = process.env.LIFEBOAT_LOG_LEVEL;
  process.env.LIFEBOAT_LOG_LEVEL = process.env.TEST_LOG_LEVEL ?? 'silent';
  const log = createLogger('test');
  if (previous === undefined) delete process.env.LIFEBOAT_LOG_LEVEL;
  else process.env.LIFEBOAT_LOG_LEVEL = previous;
  return log;
}

export function keyRing(): KeyRing {
  return parseKeyRing(KEYS);
}

/** Seals a segment exactly as the proxy does and uploads it under its name. */
export async function uploadSegment(
  deps: ReplicationDeps,
  segment: Segment,
  ring: KeyRing = keyRing(),
): Promise<string> {
  const name = changelogBlobName(segment.header);
  const sealed = sealEnvelope(encodeSegment(segment), { name, keyRing: ring });
  await (await ensureContainer(deps.changelogs)).getBlockBlobClient(name).uploadData(sealed);
  return name;
}

export async function readWhole(blob: PageBlobClient, size: number): Promise<Buffer> {
  return readRange(blob, 0, size);
}

// ---- a seeded random workload and its independent model ----

export const rng = prng;

export interface WorkloadDisk {
  id: string;
  sizeBytes: number;
}

export interface WorkloadMarker {
  id: string;
  kind: MarkerKind;
  time: number;
  /** The model of every disk at the marker. */
  images: Map<string, Buffer>;
}

export interface Workload {
  machine: string;
  epoch: number;
  /** Segments per disk, seq 1, 2, … */
  segments: Map<string, Segment[]>;
  markers: WorkloadMarker[];
  /** The model of every disk after all segments. */
  final: Map<string, Buffer>;
}

export interface WorkloadOptions {
  machine: string;
  disks: WorkloadDisk[];
  ops: number;
  seed: number;
  epoch?: number;
  /** A marker across all disks every this many operations (on average). */
  markerEvery?: number;
  /** Records per segment (on average). */
  recordsPerSegment?: number;
  /** Largest write, bytes. */
  maxWriteBytes?: number;
  startTime?: number;
}

/**
 * Overlapping writes, zeroes and trims at random 512-byte-aligned places on several disks, with
 * crash/app markers cut across all disks; segments are cut at random points (also across
 * markers). The model applies each record to a plain Buffer as it is generated.
 */
export function generateWorkload(options: WorkloadOptions): Workload {
  const random = rng(options.seed);
  const int = (n: number) => Math.floor(random() * n);
  const epoch = options.epoch ?? 1;
  const markerEvery = options.markerEvery ?? 100;
  const perSegment = options.recordsPerSegment ?? 40;
  const maxWrite = options.maxWriteBytes ?? 128 * 1024;
  let time = options.startTime ?? Date.UTC(2026, 0, 1);
  const images = new Map(options.disks.map((d) => [d.id, Buffer.alloc(d.sizeBytes)]));
  const pending = new Map<string, SegmentRecord[]>(options.disks.map((d) => [d.id, []]));
  const segments = new Map<string, Segment[]>(options.disks.map((d) => [d.id, []]));
  const times = new Map<string, { first: number; last: number }>();
  const markers: WorkloadMarker[] = [];

  const cut = (disk: string) => {
    const records = pending.get(disk)!;
    if (records.length === 0) return;
    const list = segments.get(disk)!;
    const t = times.get(disk)!;
    list.push({
      header: {
        machine: options.machine,
        disk,
        epoch,
        seq: list.length + 1,
        firstWriteTime: t.first,
        lastWriteTime: t.last,
      },
      records,
    });
    pending.set(disk, []);
    times.delete(disk);
  };
  const add = (disk: string, record: SegmentRecord) => {
    pending.get(disk)!.push(record);
    const t = times.get(disk);
    times.set(disk, t ? { first: t.first, last: time } : { first: time, last: time });
    applyRecordsToImage(images.get(disk)!, [record]);
    if (random() < 1 / perSegment) cut(disk);
  };

  for (let op = 0; op < options.ops; op++) {
    time += 1 + int(50);
    const disk = options.disks[int(options.disks.length)];
    const sectors = disk.sizeBytes / 512;
    const big = random() < 0.05;
    const lengthSectors = Math.max(1, Math.min(sectors, big ? 1 + int(maxWrite / 512) : 1 + int(16)));
    const offset = int(sectors - lengthSectors + 1) * 512;
    const length = lengthSectors * 512;
    const kind = random();
    if (kind < 0.7) {
      const data = Buffer.alloc(length);
      for (let i = 0; i < length; i += 4) data.writeUInt32LE((random() * 2 ** 32) >>> 0, i);
      add(disk.id, { type: 'write', offset, data });
    } else if (kind < 0.85) {
      add(disk.id, { type: 'zero', offset, length });
    } else {
      add(disk.id, { type: 'trim', offset, length });
    }
    if (random() < 1 / markerEvery) {
      const marker = {
        id: `m${String(markers.length + 1).padStart(5, '0')}`,
        kind: (random() < 0.25 ? 'app' : 'crash') as MarkerKind,
        time,
      };
      for (const d of options.disks) add(d.id, { type: 'marker', ...marker, tag: '' });
      markers.push({ ...marker, images: new Map([...images].map(([id, img]) => [id, Buffer.from(img)])) });
    }
  }
  for (const d of options.disks) cut(d.id);
  return { machine: options.machine, epoch, segments, markers, final: images };
}

/** A workload on one disk `d0` of `sizeBytes`, without markers (the checksum index tests' kind). */
export function oneDiskWorkload(
  machine: string,
  sizeBytes: number,
  options: { ops: number; seed: number; recordsPerSegment?: number },
): Workload {
  return generateWorkload({ machine, disks: [{ id: 'd0', sizeBytes }], markerEvery: 1000, ...options });
}

/** Fisher-Yates with the given random source. */
export function shuffle<T>(items: T[], random: () => number): T[] {
  const out = items.slice();
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/**
 * Runs `act` while every call of `target[method]` first awaits `before(this, args)` and then runs
 * as usual: a test's way to make something happen at one exact point inside the code under test.
 */
export async function interleaving<T extends object, M extends keyof T, R>(
  target: T,
  method: M,
  before: (self: T) => Promise<void>,
  act: () => Promise<R>,
): Promise<R> {
  const original = target[method] as (...args: unknown[]) => Promise<unknown>;
  const hooked = async function (this: T, ...args: unknown[]) {
    await before(this);
    return original.apply(this, args);
  };
  Object.assign(target, { [method]: hooked });
  try {
    return await act();
  } finally {
    Object.assign(target, { [method]: original });
  }
}
