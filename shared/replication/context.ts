import type { ContainerClient } from '@azure/storage-blob';
import { SETTING, changelogQueueName, type Settings } from '../config';
import { CHANGELOG_CONTAINER, keyRingFromSettings, type KeyRing } from '../envelope';
import { createLogger, type Logger } from '../logger';
import { createMessageSender, type MessageSender } from '../messaging';
import { StorageClients } from '../storage';
import { inlineOpener, WorkerOpener, type ChangelogOpener } from './open';
import { SEED_CONTAINER } from './seed-disk';
import { ReplicationTables } from './tables';

/** Where tampered or unreadable change logs are moved (CacheStorage), under their own names. */
export const QUARANTINE_CONTAINER = 'quarantine';

/** The `changelog-ready` message: "disk D of machine M has work". Extra fields are ignored. */
export interface ChangelogReady {
  machine: string;
  disk: string;
  epoch?: number;
  seq?: number;
}

/** Tuning of the apply function; the settings override the defaults. */
export interface ApplyTuning {
  /** Stop and re-enqueue after this long (the function's time budget). */
  budgetMs: number;
  /** Seed blob lease duration (15–60 s); renewed every third of it. */
  leaseSeconds: number;
  /** Page writes in flight per disk. */
  writeConcurrency: number;
  /** Change logs fetched (and opened) ahead of the one being applied. */
  prefetch: number;
  /** Worker threads that open change logs; 0 opens them on the main thread. */
  openWorkers: number;
  /** Time per run spent filling the checksum index once caught up (0: never fill). */
  fillMs: number;
  /** The fill waits until nothing was applied to the disk for this long (it yields to replication). */
  fillQuietMs: number;
}

/** Optional settings of the replication functions (defaults in parentheses). */
export const REPLICATION_SETTING = {
  /** Apply's time budget per run, seconds (240). */
  budgetSeconds: 'LIFEBOAT_APPLY_BUDGET_SECONDS',
  /** Seed blob lease, seconds (30). */
  leaseSeconds: 'LIFEBOAT_APPLY_LEASE_SECONDS',
  /** Page writes in flight per disk (8). */
  writeConcurrency: 'LIFEBOAT_APPLY_WRITE_CONCURRENCY',
  /** Worker threads that decrypt, decompress and decode change logs (0 = on the main thread). */
  openWorkers: 'LIFEBOAT_APPLY_OPEN_WORKERS',
  /** Seconds per run an applier with nothing to apply spends filling the checksum index (2; 0 = off). */
  fillSeconds: 'LIFEBOAT_CHECKSUM_FILL_SECONDS',
  /** NCRONTAB schedule of the retention timer (every 15 minutes). */
  retentionSchedule: 'LIFEBOAT_RETENTION_SCHEDULE',
  /** NCRONTAB schedule of the RPO monitor (every minute). */
  rpoSchedule: 'LIFEBOAT_RPO_SCHEDULE',
} as const;

export const DEFAULT_RETENTION_SCHEDULE = '0 */15 * * * *';
export const DEFAULT_RPO_SCHEDULE = '0 * * * * *';

export const DEFAULT_TUNING: ApplyTuning = {
  openWorkers: 0,
  budgetMs: 240_000,
  leaseSeconds: 30,
  writeConcurrency: 8,
  prefetch: 4,
  fillMs: 2000,
  fillQuietMs: 10_000,
};

function numberSetting(settings: Settings, name: string, fallback: number, min: number, max: number): number {
  const raw = settings[name];
  if (raw === undefined || raw.trim() === '') return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min || value > max) {
    throw new Error(
      `The setting ${name} must be a number from ${min} to ${max}; got ${JSON.stringify(raw)}.`,
    );
  }
  return value;
}

export function tuningFromSettings(settings: Settings): ApplyTuning {
  return {
    budgetMs:
      numberSetting(settings, REPLICATION_SETTING.budgetSeconds, DEFAULT_TUNING.budgetMs / 1000, 1, 3600) *
      1000,
    leaseSeconds: numberSetting(
      settings,
      REPLICATION_SETTING.leaseSeconds,
      DEFAULT_TUNING.leaseSeconds,
      15,
      60,
    ),
    writeConcurrency: numberSetting(
      settings,
      REPLICATION_SETTING.writeConcurrency,
      DEFAULT_TUNING.writeConcurrency,
      1,
      64,
    ),
    prefetch: DEFAULT_TUNING.prefetch,
    openWorkers: numberSetting(settings, REPLICATION_SETTING.openWorkers, DEFAULT_TUNING.openWorkers, 0, 16),
    fillMs:
      numberSetting(settings, REPLICATION_SETTING.fillSeconds, DEFAULT_TUNING.fillMs / 1000, 0, 600) * 1000,
    fillQuietMs: DEFAULT_TUNING.fillQuietMs,
  };
}

/** Everything the replication domain needs, built once per process from the settings. */
export interface ReplicationDeps {
  tables: ReplicationTables;
  /** `seed-disks` in ReplicaStorage. */
  seed: ContainerClient;
  /** `changelogs` in CacheStorage. */
  changelogs: ContainerClient;
  /** `quarantine` in CacheStorage. */
  quarantine: ContainerClient;
  /** The envelope keys (read on first use: only apply needs them). */
  keyRing: () => KeyRing;
  /** Opens change logs (decrypt, decompress, decode): inline or on worker threads. */
  opener: ChangelogOpener;
  /** Sends a `changelog-ready` nudge (re-enqueue), optionally delayed. */
  nudge: (message: ChangelogReady, delaySeconds?: number) => Promise<void>;
  tuning: ApplyTuning;
  log: Logger;
}

const ensured = new WeakMap<ContainerClient, Promise<unknown>>();

/** Creates the container on first use (once per process). */
export async function ensureContainer(container: ContainerClient): Promise<ContainerClient> {
  let p = ensured.get(container);
  if (!p) {
    p = container.createIfNotExists().catch((err) => {
      ensured.delete(container);
      throw err;
    });
    ensured.set(container, p);
  }
  await p;
  return container;
}

export function replicationDepsFromSettings(settings: Settings = process.env, log?: Logger): ReplicationDeps {
  const replica = new StorageClients(SETTING.replicaStorage, settings);
  const cache = new StorageClients(SETTING.cacheStorage, settings);
  let keyRing: KeyRing | undefined;
  let sender: MessageSender | undefined;
  const tuning = tuningFromSettings(settings);
  const ring = () => (keyRing ??= keyRingFromSettings(settings));
  return {
    tables: new ReplicationTables(replica),
    seed: replica.blobService().getContainerClient(SEED_CONTAINER),
    changelogs: cache.blobService().getContainerClient(CHANGELOG_CONTAINER),
    quarantine: cache.blobService().getContainerClient(QUARANTINE_CONTAINER),
    keyRing: ring,
    opener: tuning.openWorkers > 0 ? new WorkerOpener(ring, tuning.openWorkers) : inlineOpener(ring),
    nudge: async (message, delaySeconds) => {
      sender ??= createMessageSender(settings, SETTING.serviceBus, changelogQueueName(settings));
      await sender.send({ body: message, delaySeconds });
    },
    tuning,
    log: log ?? createLogger('replication'),
  };
}

let processDeps: ReplicationDeps | undefined;

/** The process-wide dependencies the function triggers use, built from process.env on first use. */
export function defaultReplicationDeps(): ReplicationDeps {
  return (processDeps ??= replicationDepsFromSettings(process.env));
}
