import { existsSync } from 'node:fs';
import path from 'node:path';
import { Worker } from 'node:worker_threads';
import { EnvelopeError, KeyRing, openEnvelope, type EncryptionKey } from '../envelope';
import { decodeSegment, SegmentFormatError, type Segment, type SegmentRecord } from '../segment';

/** Where a change log must be: the segment inside has to say the same. */
export interface ChangelogAddress {
  machine: string;
  disk: string;
  epoch: number;
  seq: number;
}

/** A change log that must not be applied (it goes to quarantine); `code` says why. */
export class QuarantineReason extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'QuarantineReason';
  }
}

/**
 * Decrypts and authenticates a change log under its own name, decompresses it, decodes it (the
 * SHA-256 trailer checked) and checks its header names the same place. Throws QuarantineReason
 * when any of that fails.
 */
export function openChangelog(
  keyRing: KeyRing,
  name: string,
  bytes: Buffer,
  expect: ChangelogAddress,
): Segment {
  let segment: Segment;
  try {
    segment = decodeSegment(openEnvelope(bytes, { name, keyRing }));
  } catch (err) {
    if (err instanceof EnvelopeError) throw new QuarantineReason(err.code, err.message);
    if (err instanceof SegmentFormatError)
      throw new QuarantineReason(`InvalidSegment:${err.reason}`, err.message);
    throw err;
  }
  const h = segment.header;
  if (
    h.machine !== expect.machine ||
    h.disk !== expect.disk ||
    h.epoch !== expect.epoch ||
    h.seq !== expect.seq
  ) {
    throw new QuarantineReason(
      'SegmentMislabelled',
      `The segment inside ${name} says ${h.machine}/${h.disk} epoch ${h.epoch} seq ${h.seq}; it does not belong under this name.`,
    );
  }
  return segment;
}

/** Opens change logs: inline, or on worker threads so the event loop keeps moving pages. */
export interface ChangelogOpener {
  open(name: string, bytes: Buffer, expect: ChangelogAddress): Promise<Segment>;
}

export function inlineOpener(keyRing: () => KeyRing): ChangelogOpener {
  return { open: async (name, bytes, expect) => openChangelog(keyRing(), name, bytes, expect) };
}

export interface OpenRequest {
  id: number;
  name: string;
  bytes: Uint8Array;
  expect: ChangelogAddress;
}

export type OpenResponse =
  | { id: number; segment: Segment }
  | { id: number; error: { quarantine: boolean; code: string; message: string } };

/**
 * The worker's entry: the compiled JS next to this file, or (running from source, in tests and
 * the local host) a small script that registers tsx's CommonJS hook and loads the TypeScript.
 */
function workerEntry(): { script: string; eval: boolean } | undefined {
  const js = path.join(__dirname, 'open-worker.js');
  if (__filename.endsWith('.js') && existsSync(js)) return { script: js, eval: false };
  const ts = path.join(__dirname, 'open-worker.ts');
  if (!existsSync(ts)) return undefined;
  try {
    require.resolve('tsx/cjs');
  } catch {
    return undefined;
  }
  return { script: `require('tsx/cjs'); require(${JSON.stringify(ts)});`, eval: true };
}

/** Buffers arrive from a worker as plain Uint8Arrays: make the write data Buffers again. */
function revive(segment: Segment): Segment {
  const records = segment.records.map((r): SegmentRecord => {
    if (r.type !== 'write' || Buffer.isBuffer(r.data)) return r;
    const u8 = r.data as Uint8Array;
    return { ...r, data: Buffer.from(u8.buffer, u8.byteOffset, u8.byteLength) };
  });
  return { header: segment.header, records };
}

/**
 * A small pool of worker threads that open change logs (decrypt, decompress, hash, decode). Falls
 * back to opening inline if no worker can be started here.
 */
export class WorkerOpener implements ChangelogOpener {
  private readonly workers: Worker[] = [];
  private readonly pending = new Map<number, { resolve: (s: Segment) => void; reject: (e: Error) => void }>();
  private nextId = 1;
  private turn = 0;
  private fallback?: ChangelogOpener;

  constructor(
    private readonly keyRing: () => KeyRing,
    private readonly size: number,
  ) {}

  private start(): void {
    const entry = workerEntry();
    if (!entry) {
      this.fallback = inlineOpener(this.keyRing);
      return;
    }
    const ring = this.keyRing();
    const keys: EncryptionKey[] = ring.ids.map((id) => ring.get(id)!);
    for (let i = 0; i < this.size; i++) {
      const worker = new Worker(entry.script, { eval: entry.eval, workerData: { keys } });
      worker.unref();
      worker.on('message', (m: OpenResponse) => this.settle(m));
      worker.on('error', (err) => this.failAll(err));
      worker.on('exit', (code) => {
        if (this.pending.size > 0)
          this.failAll(new Error(`a change log worker exited (code ${code}) with work in hand`));
      });
      this.workers.push(worker);
    }
  }

  private settle(m: OpenResponse): void {
    const waiter = this.pending.get(m.id);
    if (!waiter) return;
    this.pending.delete(m.id);
    if ('segment' in m) waiter.resolve(revive(m.segment));
    else if (m.error.quarantine) waiter.reject(new QuarantineReason(m.error.code, m.error.message));
    else waiter.reject(new Error(m.error.message));
  }

  private failAll(err: Error): void {
    for (const [id, waiter] of this.pending) {
      this.pending.delete(id);
      waiter.reject(err);
    }
    for (const w of this.workers) void w.terminate();
    this.workers.length = 0;
    this.fallback = inlineOpener(this.keyRing);
  }

  async open(name: string, bytes: Buffer, expect: ChangelogAddress): Promise<Segment> {
    if (this.workers.length === 0 && !this.fallback) this.start();
    if (this.fallback) return this.fallback.open(name, bytes, expect);
    const id = this.nextId++;
    const worker = this.workers[this.turn++ % this.workers.length];
    return new Promise<Segment>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ id, name, bytes, expect } satisfies OpenRequest);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
    this.workers.length = 0;
  }
}
