import fs from 'node:fs';
import { ConfigError } from '../../../shared/errors';

export type ChangeKind = 'write' | 'zero' | 'trim';

/** One mutation of an export, as delivered to its journal. */
export interface WriteChange {
  /** Export-local sequence number: 1, 2, 3, … in the order changes are appended (replication order). */
  readonly seq: number;
  readonly kind: ChangeKind;
  /** Byte offset, a multiple of 512. */
  readonly offset: number;
  /** Byte length, a multiple of 512 (for 'zero' and 'trim' it may exceed the 32 MiB payload limit). */
  readonly length: number;
  /** The written bytes (`length` of them) for 'write'; absent for 'zero' and 'trim'. Never mutated. */
  readonly data?: Buffer;
}

/**
 * The sink every mutating command of an export passes through, in replication order.
 *
 * - `append` is called synchronously, once per change, in the export's total order (see
 *   docs/nbd.md). It returns nothing, or a promise that settles once the journal has *accepted*
 *   the change (for backpressure: the client's reply waits for it). A throw or a rejection fails
 *   the client's request with EIO; a synchronous throw also keeps the change out of the backing
 *   store, so backing and journal stay identical.
 * - `flush` resolves once every change appended before the call is durable. FLUSH requests and
 *   FUA writes are answered only after it (and the backing store's fdatasync) resolved.
 */
export interface WriteJournal {
  append(change: WriteChange): Promise<void> | void;
  flush(): Promise<void>;
}

/** A journal that keeps nothing: for exports whose changes nobody replicates. */
export const DISCARD_JOURNAL: WriteJournal = {
  append() {},
  flush: () => Promise.resolve(),
};

const RECORD_MAGIC = 0x4c424a31; // "LBJ1"
const RECORD_HEADER_BYTES = 32;
const KIND_CODES: Record<ChangeKind, number> = { write: 1, zero: 2, trim: 3 };
const KIND_NAMES: Record<number, ChangeKind> = { 1: 'write', 2: 'zero', 3: 'trim' };
const MAX_IOVECS = 1024;

export interface AppendFileJournalOptions {
  /** Appends beyond this many unwritten bytes make `append` return a promise (backpressure). */
  highWaterBytes?: number;
}

/**
 * Appends buffers to a file at increasing positions from one writer loop, batched into large
 * positional writev calls. It keeps references to the buffers until they are written (no copy).
 * Shared by every append-only file of the agent (this sink, the open segment and its index).
 */
export class FileAppender {
  private queue: Buffer[] = [];
  private queuedBytes = 0;
  private appendedBytes = 0;
  private writtenBytes = 0;
  private writing = false;
  private failure: Error | undefined;
  private waiters: { target: number; resolve: () => void; reject: (e: Error) => void }[] = [];

  constructor(
    readonly fd: number,
    private position: number,
  ) {}

  /** Bytes appended so far (written or queued). */
  get appended(): number {
    return this.appendedBytes;
  }

  /** Bytes queued and not yet handed to the kernel. */
  get pendingBytes(): number {
    return this.queuedBytes;
  }

  /** File position after everything appended so far. */
  get end(): number {
    return this.position + this.queuedBytes;
  }

  append(...buffers: Buffer[]): void {
    if (this.failure) throw this.failure;
    for (const b of buffers) {
      this.queue.push(b);
      this.queuedBytes += b.length;
      this.appendedBytes += b.length;
    }
    if (!this.writing) void this.writeLoop();
  }

  /** Resolves once the first `target` appended bytes have been handed to the kernel. */
  waitWritten(target = this.appendedBytes): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.writtenBytes >= target) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ target, resolve, reject }));
  }

  /** Resolves once everything appended before the call is durable (written, then fdatasync). */
  async sync(): Promise<void> {
    await this.waitWritten();
    await new Promise<void>((resolve, reject) =>
      fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())),
    );
  }

  private async writeLoop(): Promise<void> {
    this.writing = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, MAX_IOVECS);
        let bytes = 0;
        for (const b of batch) bytes += b.length;
        await writevAll(this.fd, batch, this.position);
        this.queuedBytes -= bytes;
        this.position += bytes;
        this.writtenBytes += bytes;
        this.waiters = this.waiters.filter((w) => {
          if (w.target > this.writtenBytes) return true;
          w.resolve();
          return false;
        });
      }
    } catch (err) {
      this.failure = err as Error;
      for (const w of this.waiters) w.reject(this.failure);
      this.waiters = [];
    } finally {
      this.writing = false;
    }
  }
}

/**
 * A simple durable sink: every change is appended to one file (32-byte header, then the data of
 * a write), batched into large positional writes, and `flush` fdatasyncs the file. It is the
 * reference sink for benchmarks and tests, not the segment format of docs/DESIGN.md.
 *
 * Record header (big-endian): u32 magic "LBJ1", u8 kind (1 write, 2 zero, 3 trim), 3 bytes zero,
 * u32 length, u64 offset, u64 seq, u32 zero.
 */
export class AppendFileJournal implements WriteJournal {
  private readonly out: FileAppender;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    position: number,
    private readonly highWaterBytes: number,
  ) {
    this.out = new FileAppender(fd, position);
  }

  static async open(path: string, options: AppendFileJournalOptions = {}): Promise<AppendFileJournal> {
    const fd = await new Promise<number>((resolve, reject) =>
      fs.open(path, 'a+', (err, d) => (err ? reject(err) : resolve(d))),
    ).catch((err: Error) => {
      throw new ConfigError(
        `The journal file ${path} cannot be opened for appending (${err.message}).`,
        'journal',
      );
    });
    const size = fs.fstatSync(fd).size;
    return new AppendFileJournal(path, fd, size, options.highWaterBytes ?? 64 * 1024 * 1024);
  }

  append(change: WriteChange): Promise<void> | void {
    const header = Buffer.alloc(RECORD_HEADER_BYTES);
    header.writeUInt32BE(RECORD_MAGIC, 0);
    header.writeUInt8(KIND_CODES[change.kind], 4);
    header.writeUInt32BE(change.length, 8);
    header.writeBigUInt64BE(BigInt(change.offset), 12);
    header.writeBigUInt64BE(BigInt(change.seq), 20);
    if (change.kind === 'write' && change.data) this.out.append(header, change.data);
    else this.out.append(header);
    if (this.out.pendingBytes > this.highWaterBytes)
      return this.out.waitWritten(this.out.appended - this.highWaterBytes);
  }

  flush(): Promise<void> {
    return this.out.sync();
  }

  async close(): Promise<void> {
    await this.flush().catch(() => undefined);
    await new Promise<void>((resolve) => fs.close(this.fd, () => resolve()));
  }
}

async function writevAll(fd: number, buffers: Buffer[], position: number): Promise<void> {
  let rest = buffers;
  while (rest.length > 0) {
    const n = await new Promise<number>((resolve, reject) =>
      fs.writev(fd, rest, position, (err, written) => (err ? reject(err) : resolve(written))),
    );
    position += n;
    let skip = n;
    const next: Buffer[] = [];
    for (const b of rest) {
      if (skip >= b.length) skip -= b.length;
      else {
        next.push(skip > 0 ? b.subarray(skip) : b);
        skip = 0;
      }
    }
    rest = next;
  }
}

/** Reads back the changes of an AppendFileJournal file, in order. */
export function readJournalFile(path: string): WriteChange[] {
  const file = fs.readFileSync(path);
  const changes: WriteChange[] = [];
  let at = 0;
  while (at < file.length) {
    if (file.length - at < RECORD_HEADER_BYTES || file.readUInt32BE(at) !== RECORD_MAGIC) {
      throw new ConfigError(`The journal file ${path} is damaged at byte ${at}.`, 'journal');
    }
    const kind = KIND_NAMES[file.readUInt8(at + 4)];
    const length = file.readUInt32BE(at + 8);
    const offset = Number(file.readBigUInt64BE(at + 12));
    const seq = Number(file.readBigUInt64BE(at + 20));
    at += RECORD_HEADER_BYTES;
    if (kind === 'write') {
      if (file.length - at < length)
        throw new ConfigError(`The journal file ${path} ends inside a record.`, 'journal');
      changes.push({ seq, kind, offset, length, data: file.subarray(at, at + length) });
      at += length;
    } else {
      changes.push({ seq, kind, offset, length });
    }
  }
  return changes;
}
