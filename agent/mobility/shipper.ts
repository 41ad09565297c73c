import { EventEmitter } from 'node:events';
import http from 'node:http';
import https from 'node:https';
import type { Logger } from 'pino';
import { ConfigError, LifeboatError } from '../../shared/errors';
import type { JournalEntry } from './journal';
import type { DiskSegmenter } from './segmenter';

// Agent → proxy (DESIGN §2): PUT /v1/machines/{m}/disks/{d}/segments/{epoch}/{seq} answers 201
// (new), 200 (duplicate), 409 (other bytes at that seq), 429/503 + Retry-After (full);
// GET /v1/machines/{m}/disks/{d} answers the last acknowledged (epoch, seq).

export interface ProxyClientOptions {
  /** e.g. https://proxy.example:9443 */
  url: string;
  /** The machine's credential (lbm1.{machine}.{secret}), sent as a Bearer token. */
  credential: string;
  /** PEM certificate(s) to trust, e.g. the proxy's self-signed certificate. */
  ca?: string | Buffer;
  /** Per-request timeout (default 120 s). */
  timeoutMs?: number;
}

/** The proxy could not be reached or asked to retry later; `retryAfterMs` when it said so. */
export class ProxyUnavailableError extends LifeboatError {
  constructor(
    message: string,
    readonly retryAfterMs?: number,
    readonly httpStatus?: number,
  ) {
    super('ProxyUnavailable', message, { status: 503, target: 'proxy' });
  }
}

/** The proxy holds different bytes at this seq: the streams diverged; the disk needs a resync. */
export class ProxyConflictError extends LifeboatError {
  constructor(message: string) {
    super('SegmentConflict', message, { status: 409, target: 'segment' });
  }
}

export interface AckedPosition {
  epoch: number | null;
  seq: number | null;
}

/** A small HTTP(S) client for the proxy's agent API. */
export class ProxyClient {
  readonly url: URL;
  private readonly agent: http.Agent;
  private readonly credential: string;
  private readonly timeoutMs: number;

  constructor(options: ProxyClientOptions) {
    let url: URL;
    try {
      url = new URL(options.url);
    } catch {
      throw new ConfigError(
        `The proxy URL ${JSON.stringify(options.url)} is not a URL; pass --proxy https://host:9443.`,
        'proxy',
      );
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') {
      throw new ConfigError(
        `The proxy URL ${options.url} must start with https:// (or http:// for a trusted local set-up).`,
        'proxy',
      );
    }
    if (!/^\S+$/.test(options.credential ?? '')) {
      throw new ConfigError(
        'The agent credential is empty or has spaces; pass the file registration wrote with --credential-file.',
        'credential',
      );
    }
    this.url = url;
    this.credential = options.credential;
    this.timeoutMs = options.timeoutMs ?? 120_000;
    this.agent =
      url.protocol === 'https:'
        ? new https.Agent({ keepAlive: true, maxSockets: 16, ca: options.ca })
        : new http.Agent({ keepAlive: true, maxSockets: 16 });
  }

  async putSegment(
    machine: string,
    disk: string,
    epoch: number,
    seq: number,
    body: Buffer,
  ): Promise<'created' | 'duplicate'> {
    const path = `/v1/machines/${machine}/disks/${disk}/segments/${epoch}/${seq}`;
    const res = await this.request('PUT', path, body);
    if (res.status === 201) return 'created';
    if (res.status === 200) return 'duplicate';
    if (res.status === 409) {
      throw new ProxyConflictError(
        `The proxy already holds different bytes for ${machine}/${disk} segment ${epoch}/${seq}: ${errorMessage(res.body)}`,
      );
    }
    throw this.failure(res, `PUT ${path}`);
  }

  async getDisk(machine: string, disk: string): Promise<AckedPosition> {
    const path = `/v1/machines/${machine}/disks/${disk}`;
    const res = await this.request('GET', path);
    if (res.status !== 200) throw this.failure(res, `GET ${path}`);
    const body = JSON.parse(res.body.toString('utf8')) as { epoch?: unknown; seq?: unknown };
    const num = (v: unknown): number | null =>
      typeof v === 'number' && Number.isSafeInteger(v) && v >= 0 ? v : null;
    return { epoch: num(body.epoch), seq: num(body.seq) };
  }

  close(): void {
    this.agent.destroy();
  }

  private failure(
    res: { status: number; headers: http.IncomingHttpHeaders; body: Buffer },
    what: string,
  ): LifeboatError {
    const retryAfter = parseRetryAfter(res.headers['retry-after']);
    const message = `The proxy answered ${res.status} to ${what}: ${errorMessage(res.body)}`;
    // 4xx other than 408/429 will not go away by itself, but the agent keeps the data and retries
    // slowly so that fixing the credential or the proxy resumes shipping.
    return new ProxyUnavailableError(message, retryAfter, res.status);
  }

  private request(
    method: string,
    path: string,
    body?: Buffer,
  ): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: Buffer }> {
    const target = new URL(path, this.url);
    const lib = this.url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const req = lib.request(
        target,
        {
          method,
          agent: this.agent,
          timeout: this.timeoutMs,
          headers: {
            authorization: `Bearer ${this.credential}`,
            ...(body
              ? { 'content-type': 'application/octet-stream', 'content-length': String(body.length) }
              : {}),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () =>
            resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks) }),
          );
          res.on('error', (err) =>
            reject(
              new ProxyUnavailableError(
                `The proxy at ${this.url.origin} broke off the answer (${err.message}).`,
              ),
            ),
          );
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer within ${this.timeoutMs} ms`)));
      req.on('error', (err) =>
        reject(
          new ProxyUnavailableError(
            `The proxy at ${this.url.origin} cannot be reached (${err.message}); the agent keeps the data and retries.`,
          ),
        ),
      );
      req.end(body);
    });
  }
}

function errorMessage(body: Buffer): string {
  try {
    const parsed = JSON.parse(body.toString('utf8')) as { error?: { message?: string } };
    if (parsed.error?.message) return parsed.error.message;
  } catch {
    // not JSON
  }
  return body.toString('utf8').slice(0, 200) || '(no message)';
}

/** Retry-After as milliseconds: delta-seconds or an HTTP date. */
export function parseRetryAfter(value: string | string[] | undefined): number | undefined {
  const v = Array.isArray(value) ? value[0] : value;
  if (v === undefined) return undefined;
  if (/^\d+$/.test(v.trim())) return Number(v.trim()) * 1000;
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}

export interface RetryPolicy {
  /** First backoff (default 500 ms). */
  baseMs?: number;
  /** Longest backoff (default 60 s). */
  maxMs?: number;
}

/** Exponential backoff with full jitter in [delay/2, delay]. */
export function backoffDelay(attempt: number, policy: Required<RetryPolicy>): number {
  const delay = Math.min(policy.maxMs, policy.baseMs * 2 ** Math.min(attempt, 30));
  return Math.round(delay / 2 + (Math.random() * delay) / 2);
}

export interface ShipperStats {
  reachable: boolean | undefined;
  lastError?: string;
  shippedSegments: number;
  shippedBytes: number;
  duplicates: number;
  retries: number;
  /** Bytes per second over the last shipped segments. */
  bytesPerSecond: number;
  halted?: string;
}

/**
 * Ships one disk's journal to the proxy in seq order, one segment at a time, and deletes a
 * segment only after the proxy acknowledged it (201 or 200). Unreachable / 429 / 503: waits
 * (Retry-After if given, else exponential backoff with jitter) and retries the same segment.
 * 409: halts and emits 'conflict' (the disk needs a resync). Events: 'acked' (JournalEntry),
 * 'idle' (journal empty and the proxy reachable), 'conflict' (ProxyConflictError), 'unreachable'.
 */
export class DiskShipper extends EventEmitter {
  private stopped = true;
  private wake: (() => void) | undefined;
  private loop: Promise<void> | undefined;
  private readonly retry: Required<RetryPolicy>;
  private readonly log: Logger;
  private halted: string | undefined;
  private recent: { at: number; bytes: number }[] = [];
  /** Reused for reading segments back (one segment is shipped at a time). */
  private readBuffer: Buffer | undefined;
  readonly stats: ShipperStats = {
    reachable: undefined,
    shippedSegments: 0,
    shippedBytes: 0,
    duplicates: 0,
    retries: 0,
    bytesPerSecond: 0,
  };

  constructor(
    private readonly segmenter: DiskSegmenter,
    private readonly client: ProxyClient,
    logger: Logger,
    retry: RetryPolicy = {},
  ) {
    super();
    this.retry = { baseMs: retry.baseMs ?? 500, maxMs: retry.maxMs ?? 60_000 };
    this.log = logger.child({ machine: segmenter.machine, disk: segmenter.disk });
    segmenter.on('segment', () => this.kick());
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.kick();
    await this.loop;
  }

  /** Wakes the loop (a new segment, or a retry delay to cut short). */
  kick(): void {
    const w = this.wake;
    this.wake = undefined;
    w?.();
  }

  /** Clears a 409 halt after the stream was reset; shipping resumes. */
  unhalt(): void {
    this.halted = undefined;
    delete this.stats.halted;
    this.kick();
  }

  /** Resolves once the journal is empty (every cut segment acknowledged). */
  async drained(): Promise<void> {
    while (this.segmenter.journal.count > 0 || this.segmenter.backlogBytes > this.segmenter.openBytes) {
      await new Promise<void>((resolve) => {
        const done = (): void => {
          this.off('acked', done);
          this.off('idle', done);
          resolve();
        };
        this.on('acked', done);
        this.on('idle', done);
      });
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.wake = undefined;
        resolve();
      }, ms);
      this.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  private async run(): Promise<void> {
    let attempt = 0;
    while (!this.stopped) {
      const entry = this.halted ? undefined : this.segmenter.journal.list()[0];
      if (!entry) {
        if (!this.halted && this.segmenter.mode === 'bitmap' && this.stats.reachable !== true) {
          // Nothing to ship, but catch-up needs to know the proxy is back.
          try {
            await this.client.getDisk(this.segmenter.machine, this.segmenter.disk);
            this.setReachable(true);
            attempt = 0;
          } catch (err) {
            this.setUnreachable(err as Error);
            await this.sleep(backoffDelay(attempt++, this.retry));
            continue;
          }
        }
        if (!this.halted && this.stats.reachable === true) this.emit('idle');
        await new Promise<void>((resolve) => (this.wake = resolve));
        continue;
      }
      try {
        await this.ship(entry);
        attempt = 0;
      } catch (err) {
        if (err instanceof ProxyConflictError) {
          this.halted = err.message;
          this.stats.halted = err.message;
          this.log.error({ seq: entry.seq, epoch: entry.epoch }, err.message);
          this.emit('conflict', err, entry);
          continue;
        }
        this.stats.retries += 1;
        this.setUnreachable(err as Error);
        const retryAfter = err instanceof ProxyUnavailableError ? err.retryAfterMs : undefined;
        const delay = retryAfter !== undefined ? retryAfter : backoffDelay(attempt, this.retry);
        attempt += 1;
        this.log.warn(
          { seq: entry.seq, delayMs: delay, attempt },
          `segment not shipped, retrying: ${(err as Error).message}`,
        );
        await this.sleep(delay);
      }
    }
  }

  private async ship(entry: JournalEntry): Promise<void> {
    const { machine, disk, state } = this.segmenter;
    let bytes: Buffer;
    // The read buffer is reused only after an answer came back (the request body was sent
    // whole); a failed request may leave a write pending on a closing socket, so it is dropped.
    const scratch = this.readBuffer;
    this.readBuffer = undefined;
    try {
      bytes = await this.segmenter.journal.read(entry, scratch);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return; // removed by a stream reset meanwhile
      throw err;
    }
    const result = await this.client.putSegment(machine, disk, entry.epoch, entry.seq, bytes);
    this.readBuffer = scratch && bytes.buffer === scratch.buffer ? scratch : bytes;
    await this.segmenter.journal.remove(entry);
    // Segments of an epoch the stream has left (shipped before the new epoch's seq 1) do not move the cursor.
    if (entry.epoch === state.epoch && entry.seq > state.ackedSeq) state.ackedSeq = entry.seq;
    this.stats.shippedSegments += 1;
    this.stats.shippedBytes += bytes.length;
    if (result === 'duplicate') this.stats.duplicates += 1;
    const now = Date.now();
    this.recent.push({ at: now, bytes: bytes.length });
    this.recent = this.recent.filter((r) => now - r.at < 10_000);
    const span = Math.max(1, now - this.recent[0].at) / 1000;
    this.stats.bytesPerSecond =
      this.recent.length > 1 ? this.recent.reduce((s, r) => s + r.bytes, 0) / span : 0;
    this.setReachable(true);
    this.log.debug(
      { seq: entry.seq, epoch: entry.epoch, bytes: bytes.length, result },
      'segment acknowledged',
    );
    this.emit('acked', entry);
  }

  private setReachable(value: true): void {
    if (this.stats.reachable !== true) this.log.info('proxy reachable');
    this.stats.reachable = value;
    delete this.stats.lastError;
  }

  private setUnreachable(err: Error): void {
    if (this.stats.reachable !== false) this.emit('unreachable', err);
    this.stats.reachable = false;
    this.stats.lastError = err.message;
  }
}
