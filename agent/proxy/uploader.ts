import type { ContainerClient } from '@azure/storage-blob';
import type { Logger } from 'pino';
import {
  changelogBlobName,
  openEnvelope,
  sealEnvelope,
  type Codec,
  type KeyRing,
  type SegmentAddress,
} from '../../shared/envelope';
import { LifeboatError, ensureError } from '../../shared/errors';
import type { MessageSender } from '../../shared/messaging';
import { TRAILER_BYTES } from '../../shared/segment';
import type { Spool, SpooledSegment } from './spool';

// Ships spooled segments: per disk strictly in (epoch, seq) order, disks concurrently. For each
// segment: compress + encrypt (bound to the blob name), upload, send `changelog-ready`, and only
// then mark it shipped and delete it from the spool. A crash anywhere repeats the upload and the
// message on restart (the blob is overwritten with the same plaintext; the message is a nudge
// with a stable messageId), and never loses a segment.

export interface RetryOptions {
  /** First delay after a failure (default 250 ms); doubles up to maxDelayMs, with jitter. */
  initialDelayMs?: number;
  /** Longest delay between attempts (default 30 s). Attempts never stop while running. */
  maxDelayMs?: number;
}

export interface ChangelogNotice {
  machine: string;
  disk: string;
  epoch: number;
  seq: number;
}

export interface UploaderDeps {
  spool: Spool;
  container: ContainerClient;
  sender: MessageSender;
  keyRing: KeyRing;
  codec?: Codec;
  logger: Logger;
  /** Disks shipped at the same time (default 4). */
  concurrency?: number;
  /** Upload bandwidth cap in bytes of envelope per second (default: none). */
  bandwidthBytesPerSecond?: number;
  retry?: RetryOptions;
}

export interface UploadError {
  at: string;
  operation: 'upload' | 'notify' | 'spool';
  machine: string;
  disk: string;
  epoch: number;
  seq: number;
  message: string;
}

export interface UploaderStats {
  segmentsShipped: number;
  /** Segment bytes shipped (before compression). */
  bytesShipped: number;
  /** Envelope bytes uploaded (after compression and encryption), retries included. */
  bytesUploaded: number;
  /** Segment bytes per second over the last 10 s. */
  bytesPerSecond: number;
  errors: number;
  lastError?: UploadError;
  activeDisks: number;
}

class Stopped extends Error {}

/**
 * Spaces uploads so the average rate stays under the cap: each upload may start once the
 * previous ones' bytes have "drained" at the capped rate.
 */
export class BandwidthLimiter {
  private next = 0;
  constructor(
    private readonly bytesPerSecond: number,
    private readonly clock: { now(): number; sleep(ms: number, signal: AbortSignal): Promise<void> } = {
      now: Date.now,
      sleep,
    },
  ) {}

  async take(bytes: number, signal: AbortSignal): Promise<void> {
    const now = this.clock.now();
    const start = Math.max(now, this.next);
    this.next = start + (bytes / this.bytesPerSecond) * 1000;
    if (start > now) await this.clock.sleep(start - now, signal);
  }
}

/** Bytes per second over a sliding window. */
export class RateMeter {
  private readonly samples: { at: number; bytes: number }[] = [];
  constructor(private readonly windowMs = 10_000) {}

  add(bytes: number): void {
    this.samples.push({ at: Date.now(), bytes });
    this.trim();
  }

  rate(): number {
    this.trim();
    const total = this.samples.reduce((s, x) => s + x.bytes, 0);
    return total / (this.windowMs / 1000);
  }

  private trim(): void {
    const floor = Date.now() - this.windowMs;
    while (this.samples.length > 0 && this.samples[0].at < floor) this.samples.shift();
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new Stopped());
    const timer = setTimeout(() => {
      signal.removeEventListener('abort', onAbort);
      resolve();
    }, ms);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(new Stopped());
    };
    signal.addEventListener('abort', onAbort, { once: true });
  });
}

export function noticeId(address: SegmentAddress): string {
  return `${address.machine}/${address.disk}/${address.epoch}/${address.seq}`;
}

export class Uploader {
  private readonly controller = new AbortController();
  private readonly ready: string[] = [];
  private readonly queued = new Set<string>();
  private readonly active = new Set<string>();
  private readonly workers = new Set<Promise<void>>();
  private readonly limiter?: BandwidthLimiter;
  private readonly meter = new RateMeter();
  private readonly concurrency: number;
  private readonly initialDelayMs: number;
  private readonly maxDelayMs: number;
  private containerReady = false;
  private idleWaiters: (() => void)[] = [];
  private readonly stats = {
    segmentsShipped: 0,
    bytesShipped: 0,
    bytesUploaded: 0,
    errors: 0,
    lastError: undefined as UploadError | undefined,
  };

  constructor(private readonly deps: UploaderDeps) {
    this.concurrency = Math.max(1, deps.concurrency ?? 4);
    this.initialDelayMs = deps.retry?.initialDelayMs ?? 250;
    this.maxDelayMs = deps.retry?.maxDelayMs ?? 30_000;
    if (deps.bandwidthBytesPerSecond && deps.bandwidthBytesPerSecond > 0) {
      this.limiter = new BandwidthLimiter(deps.bandwidthBytesPerSecond);
    }
  }

  /** Schedules every disk with spooled segments (after a restart, the spool is the to-do list). */
  start(): void {
    for (const d of this.deps.spool.diskSpools()) if (d.pending.length > 0) this.schedule(d.machine, d.disk);
  }

  /** A new segment arrived for the disk. */
  schedule(machine: string, disk: string): void {
    const key = `${machine}/${disk}`;
    if (this.controller.signal.aborted || this.queued.has(key)) return;
    this.queued.add(key);
    this.ready.push(key);
    this.pump();
  }

  private pump(): void {
    while (this.workers.size < this.concurrency) {
      const i = this.ready.findIndex((k) => !this.active.has(k));
      if (i < 0) break;
      const [key] = this.ready.splice(i, 1);
      this.queued.delete(key);
      this.active.add(key);
      const [machine, disk] = key.split('/');
      const worker: Promise<void> = this.shipNext(machine, disk).finally(() => {
        this.active.delete(key);
        this.workers.delete(worker);
        if (this.deps.spool.next(machine, disk)) this.schedule(machine, disk);
        this.pump();
        if (this.workers.size === 0 && this.ready.length === 0) this.wakeIdle();
      });
      this.workers.add(worker);
    }
  }

  private wakeIdle(): void {
    const waiters = this.idleWaiters;
    this.idleWaiters = [];
    for (const w of waiters) w();
  }

  /** Resolves once the spool is empty and nothing is in flight. */
  async drained(): Promise<void> {
    while (this.deps.spool.segments > 0 || this.workers.size > 0) {
      if (this.controller.signal.aborted) throw new Error('The uploader stopped before the spool drained.');
      await new Promise<void>((resolve) => {
        this.idleWaiters.push(resolve);
        setTimeout(resolve, 200).unref();
      });
    }
  }

  getStats(): UploaderStats {
    return {
      segmentsShipped: this.stats.segmentsShipped,
      bytesShipped: this.stats.bytesShipped,
      bytesUploaded: this.stats.bytesUploaded,
      bytesPerSecond: this.meter.rate(),
      errors: this.stats.errors,
      lastError: this.stats.lastError,
      activeDisks: this.active.size,
    };
  }

  /** Stops after the current step of each worker; whatever is left stays in the spool. */
  async stop(): Promise<void> {
    this.controller.abort();
    this.wakeIdle();
    await Promise.allSettled([...this.workers]);
  }

  /** Ships one segment of the disk (one per turn, so disks share the workers fairly). */
  private async shipNext(machine: string, disk: string): Promise<void> {
    const entry = this.deps.spool.next(machine, disk);
    if (!entry) return;
    const log = this.deps.logger.child({ machine, disk, epoch: entry.epoch, seq: entry.seq });
    try {
      await this.ship(entry, log);
    } catch (err) {
      if (err instanceof Stopped) return;
      // Only a local spool failure gets here (Azure calls retry forever); wait, then try again.
      this.recordError('spool', entry, err, log);
      await sleep(this.maxDelayMs, this.controller.signal).catch(() => undefined);
    }
  }

  private async ship(entry: SpooledSegment, log: Logger): Promise<void> {
    const signal = this.controller.signal;
    const plaintext = await this.deps.spool.read(entry);
    const name = changelogBlobName(entry);
    const envelope = sealEnvelope(plaintext, { name, keyRing: this.deps.keyRing, codec: this.deps.codec });
    if (this.limiter) await this.limiter.take(envelope.length, signal);
    await this.retry('upload', entry, log, async () => {
      await this.ensureContainer();
      await this.deps.container.getBlockBlobClient(name).uploadData(envelope, {
        blobHTTPHeaders: { blobContentType: 'application/octet-stream' },
        abortSignal: signal,
      });
      this.stats.bytesUploaded += envelope.length;
    });
    const notice: ChangelogNotice = {
      machine: entry.machine,
      disk: entry.disk,
      epoch: entry.epoch,
      seq: entry.seq,
    };
    await this.retry('notify', entry, log, () =>
      this.deps.sender.send({ body: notice, messageId: noticeId(entry) }),
    );
    if (signal.aborted) throw new Stopped();
    await this.deps.spool.markShipped(entry);
    this.stats.segmentsShipped++;
    this.stats.bytesShipped += entry.bytes;
    this.meter.add(entry.bytes);
    log.debug({ bytes: entry.bytes, blobBytes: envelope.length, blob: name }, 'segment shipped');
  }

  private async ensureContainer(): Promise<void> {
    if (this.containerReady) return;
    await this.deps.container.createIfNotExists({ abortSignal: this.controller.signal });
    this.containerReady = true;
  }

  private async retry(
    operation: 'upload' | 'notify',
    entry: SpooledSegment,
    log: Logger,
    fn: () => Promise<void>,
  ): Promise<void> {
    const signal = this.controller.signal;
    for (let attempt = 0; ; attempt++) {
      if (signal.aborted) throw new Stopped();
      try {
        await fn();
        return;
      } catch (err) {
        if (signal.aborted) throw new Stopped();
        if ((err as { statusCode?: number }).statusCode === 404) this.containerReady = false;
        this.recordError(operation, entry, err, log, attempt);
        const ceiling = Math.min(this.maxDelayMs, this.initialDelayMs * 2 ** Math.min(attempt, 20));
        await sleep(ceiling / 2 + Math.random() * (ceiling / 2), signal);
      }
    }
  }

  private recordError(
    operation: UploadError['operation'],
    entry: SpooledSegment,
    err: unknown,
    log: Logger,
    attempt = 0,
  ): void {
    const message = ensureError(err).message.split('\n')[0];
    this.stats.errors++;
    this.stats.lastError = {
      at: new Date().toISOString(),
      operation,
      machine: entry.machine,
      disk: entry.disk,
      epoch: entry.epoch,
      seq: entry.seq,
      message,
    };
    log.warn({ operation, attempt, err: message }, `${operation} failed; retrying`);
  }
}

/**
 * The checksum (segment trailer) of what the cache holds for `address`, or undefined when there is
 * no blob: lets the spool recognise a re-sent segment older than its shipped log.
 */
export async function cachedChecksum(
  container: ContainerClient,
  keyRing: KeyRing,
  address: SegmentAddress,
): Promise<Buffer | undefined> {
  const name = changelogBlobName(address);
  let data: Buffer;
  try {
    data = await container.getBlockBlobClient(name).downloadToBuffer();
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return undefined;
    throw new LifeboatError(
      'CacheUnavailable',
      `The proxy could not read ${name} from the cache to compare a re-sent segment (${ensureError(err).message.split('\n')[0]}); retry later.`,
      { status: 503, cause: err },
    );
  }
  const plaintext = openEnvelope(data, { name, keyRing });
  return Buffer.from(plaintext.subarray(plaintext.length - TRAILER_BYTES));
}
