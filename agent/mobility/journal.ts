import fs from 'node:fs';
import path from 'node:path';
import { crc32 } from 'node:zlib';
import { ConfigError, LifeboatError } from '../../shared/errors';
import type { ChangeKind } from './nbd';
import { syncDir, writeFileDurably } from './bitmap';

// A disk's on-disk journal (docs/agent.md, "Journal"): one folder per disk holding
//   state.json                the disk's replication state (mode, epoch, seqs, clean-stop flag)
//   segments/{epoch}-{seq}.seg encoded segments waiting for the proxy's acknowledgement
//   wal-{epoch}-{seq}.log     the open (not yet cut) segment's changes, fdatasynced on FLUSH
//   bitmap.bin                the dirty-block bitmap (bitmap mode and catch-up)
//   scan.hashes               the previous scan's block hashes (scan source)

/** What a disk's replication is doing. Markers are cut only in `data` mode. */
export type DiskMode = 'data' | 'bitmap' | 'catchup' | 'resync';

export interface DiskState {
  version: 1;
  machine: string;
  disk: string;
  sizeBytes: number;
  epoch: number;
  /** Seq of the open segment: the next segment cut gets it. */
  nextSeq: number;
  /** Highest seq the proxy acknowledged (0: none yet). */
  ackedSeq: number;
  mode: DiskMode;
  /** Why the disk is in `resync` mode. */
  resyncReason?: string;
  /** True only between a clean stop and the next start. */
  clean: boolean;
  /** Kernel boot id of the last run (tells a process crash from a machine crash in the logs). */
  bootId?: string;
  updatedAt: string;
}

/** The journal could not be read back as written: the disk has to be resynchronised. */
export class JournalDamagedError extends LifeboatError {
  constructor(message: string) {
    super('JournalDamaged', message, { status: 500, target: 'journal' });
  }
}

export interface JournalEntry {
  epoch: number;
  seq: number;
  bytes: number;
  file: string;
}

const SEGMENT_FILE = /^(\d{8})-(\d{12})\.seg$/;
const WAL_FILE = /^wal-(\d{8})-(\d{12})\.log$/;

function segmentName(epoch: number, seq: number): string {
  return `${String(epoch).padStart(8, '0')}-${String(seq).padStart(12, '0')}.seg`;
}

export function walName(epoch: number, seq: number): string {
  return `wal-${String(epoch).padStart(8, '0')}-${String(seq).padStart(12, '0')}.log`;
}

export function bootId(): string | undefined {
  try {
    return fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    return undefined;
  }
}

/**
 * The segment store of one disk: encoded segments in seq order, each written durably (temporary
 * file, fdatasync, rename, fsync of the folder) before it counts, and removed only after the
 * proxy acknowledged it.
 */
export class SegmentJournal {
  private readonly entries = new Map<string, JournalEntry>();
  private totalBytes = 0;
  private stateChain: Promise<void> = Promise.resolve();
  readonly segmentsDir: string;

  private constructor(readonly dir: string) {
    this.segmentsDir = path.join(dir, 'segments');
  }

  static async open(dir: string): Promise<SegmentJournal> {
    try {
      fs.mkdirSync(path.join(dir, 'segments'), { recursive: true });
    } catch (err) {
      throw new ConfigError(`The journal folder ${dir} cannot be created (${(err as Error).message}); pass a writable --journal-dir.`, 'journalDir');
    }
    const journal = new SegmentJournal(dir);
    for (const name of fs.readdirSync(journal.segmentsDir)) {
      const m = SEGMENT_FILE.exec(name);
      const file = path.join(journal.segmentsDir, name);
      if (!m) {
        // Leftover temporary files of an interrupted write never counted.
        if (name.includes('.tmp-')) fs.rmSync(file, { force: true });
        continue;
      }
      const entry = { epoch: Number(m[1]), seq: Number(m[2]), bytes: fs.statSync(file).size, file };
      journal.entries.set(name, entry);
      journal.totalBytes += entry.bytes;
    }
    return journal;
  }

  /** Bytes of segments waiting for acknowledgement. */
  get bytes(): number {
    return this.totalBytes;
  }

  get count(): number {
    return this.entries.size;
  }

  /** Waiting segments, oldest (epoch, seq) first. */
  list(): JournalEntry[] {
    return [...this.entries.values()].sort((a, b) => a.epoch - b.epoch || a.seq - b.seq);
  }

  has(epoch: number, seq: number): boolean {
    return this.entries.has(segmentName(epoch, seq));
  }

  async write(epoch: number, seq: number, bytes: Buffer): Promise<JournalEntry> {
    const name = segmentName(epoch, seq);
    const file = path.join(this.segmentsDir, name);
    await writeFileDurably(file, bytes);
    const previous = this.entries.get(name);
    if (previous) this.totalBytes -= previous.bytes;
    const entry = { epoch, seq, bytes: bytes.length, file };
    this.entries.set(name, entry);
    this.totalBytes += entry.bytes;
    return entry;
  }

  read(entry: JournalEntry): Promise<Buffer> {
    return fs.promises.readFile(entry.file);
  }

  async remove(entry: JournalEntry): Promise<void> {
    const name = segmentName(entry.epoch, entry.seq);
    if (!this.entries.delete(name)) return;
    this.totalBytes -= entry.bytes;
    await fs.promises.rm(entry.file, { force: true });
  }

  /** Removes every segment (a resync starts a new epoch; the old stream is abandoned). */
  async clear(): Promise<void> {
    for (const e of this.list()) await this.remove(e);
    await syncDir(this.segmentsDir);
  }

  statePath(): string {
    return path.join(this.dir, 'state.json');
  }

  loadState(): DiskState | undefined {
    let text: string;
    try {
      text = fs.readFileSync(this.statePath(), 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      const state = JSON.parse(text) as DiskState;
      if (state.version !== 1 || !Number.isSafeInteger(state.nextSeq) || !Number.isSafeInteger(state.ackedSeq)) throw new Error('bad fields');
      return state;
    } catch (err) {
      throw new JournalDamagedError(`The disk state file ${this.statePath()} is damaged (${(err as Error).message}); the disk needs a resync.`);
    }
  }

  /** Saves the state durably; saves run one after another, each writing the state as it is then. */
  saveState(state: DiskState): Promise<void> {
    const run = this.stateChain.then(() =>
      writeFileDurably(this.statePath(), JSON.stringify({ ...state, updatedAt: new Date().toISOString() }, null, 2)),
    );
    this.stateChain = run.catch(() => undefined);
    return run;
  }

  /** WAL files left by an earlier run, oldest first. */
  walFiles(): { epoch: number; seq: number; file: string }[] {
    const out: { epoch: number; seq: number; file: string }[] = [];
    for (const name of fs.readdirSync(this.dir)) {
      const m = WAL_FILE.exec(name);
      if (m) out.push({ epoch: Number(m[1]), seq: Number(m[2]), file: path.join(this.dir, name) });
    }
    return out.sort((a, b) => a.epoch - b.epoch || a.seq - b.seq);
  }
}

// ---- the write-ahead log of the open segment ----

const WAL_MAGIC = 0x4c425731; // "LBW1"
const WAL_HEADER_BYTES = 24;
const KIND_CODE: Record<ChangeKind, number> = { write: 1, zero: 2, trim: 3 };
const KIND_NAME: Record<number, ChangeKind> = { 1: 'write', 2: 'zero', 3: 'trim' };
const MAX_IOVECS = 1024;

export interface WalRecord {
  kind: ChangeKind;
  offset: number;
  length: number;
  data?: Buffer;
}

/**
 * Appends the open segment's changes to a file so a FLUSH can be acknowledged with one fdatasync
 * instead of a segment cut. Records: u32 magic, u8 kind, 3 zero bytes, u32 length, u64 offset,
 * u32 CRC-32 (of the 20 header bytes before it and the data), then the data of a write.
 */
export class WalWriter {
  private queue: Buffer[] = [];
  private queuedBytes = 0;
  private appended = 0;
  private written = 0;
  private writing = false;
  private failure: Error | undefined;
  private waiters: { target: number; resolve: () => void; reject: (e: Error) => void }[] = [];
  private position = 0;
  private closed = false;

  private constructor(
    readonly file: string,
    private readonly fd: number,
  ) {}

  static create(file: string): WalWriter {
    return new WalWriter(file, fs.openSync(file, 'w'));
  }

  /** Bytes appended (header and data). */
  get bytes(): number {
    return this.appended;
  }

  get pendingBytes(): number {
    return this.queuedBytes;
  }

  append(record: WalRecord): void {
    if (this.failure) throw this.failure;
    const header = Buffer.alloc(WAL_HEADER_BYTES);
    header.writeUInt32LE(WAL_MAGIC, 0);
    header.writeUInt8(KIND_CODE[record.kind], 4);
    header.writeUInt32LE(record.length, 8);
    header.writeBigUInt64LE(BigInt(record.offset), 12);
    let crc = crc32(header.subarray(0, 20));
    if (record.kind === 'write' && record.data) crc = crc32(record.data, crc);
    header.writeUInt32LE(crc, 20);
    this.queue.push(header);
    let n = WAL_HEADER_BYTES;
    if (record.kind === 'write' && record.data) {
      this.queue.push(record.data);
      n += record.data.length;
    }
    this.queuedBytes += n;
    this.appended += n;
    if (!this.writing) void this.writeLoop();
  }

  /** Resolves once everything appended so far has been handed to the kernel. */
  waitWritten(target = this.appended): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.written >= target) return Promise.resolve();
    return new Promise((resolve, reject) => this.waiters.push({ target, resolve, reject }));
  }

  /** Resolves once everything appended before the call is durable. */
  async sync(): Promise<void> {
    await this.waitWritten();
    if (this.closed) return;
    await new Promise<void>((resolve, reject) => fs.fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.waitWritten().catch(() => undefined);
    this.closed = true;
    await new Promise<void>((resolve) => fs.close(this.fd, () => resolve()));
  }

  /** Closes and deletes the file (its changes are durable in a segment now). */
  async discard(): Promise<void> {
    await this.close();
    await fs.promises.rm(this.file, { force: true });
  }

  private async writeLoop(): Promise<void> {
    this.writing = true;
    try {
      while (this.queue.length > 0) {
        const batch = this.queue.splice(0, MAX_IOVECS);
        let bytes = 0;
        for (const b of batch) bytes += b.length;
        this.queuedBytes -= bytes;
        await writevAll(this.fd, batch, this.position);
        this.position += bytes;
        this.written += bytes;
        this.waiters = this.waiters.filter((w) => {
          if (w.target > this.written) return true;
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

/**
 * Reads a WAL back. A torn last record (cut short or failing its CRC at the very end) is what an
 * interrupted append leaves and is dropped; `torn` says so. Damage before the end throws.
 */
export function readWal(file: string): { records: WalRecord[]; torn: boolean } {
  const bytes = fs.readFileSync(file);
  const records: WalRecord[] = [];
  let at = 0;
  while (at < bytes.length) {
    if (bytes.length - at < WAL_HEADER_BYTES) return { records, torn: true };
    const kind = KIND_NAME[bytes.readUInt8(at + 4)];
    const length = bytes.readUInt32LE(at + 8);
    const offset = Number(bytes.readBigUInt64LE(at + 12));
    const dataBytes = kind === 'write' ? length : 0;
    const end = at + WAL_HEADER_BYTES + dataBytes;
    const valid = bytes.readUInt32LE(at) === WAL_MAGIC && kind !== undefined && end <= bytes.length;
    let crcOk = false;
    if (valid) {
      let crc = crc32(bytes.subarray(at, at + 20));
      if (dataBytes > 0) crc = crc32(bytes.subarray(at + WAL_HEADER_BYTES, end), crc);
      crcOk = crc === bytes.readUInt32LE(at + 20);
    }
    if (!valid || !crcOk) {
      if (!valid && end > bytes.length && bytes.readUInt32LE(at) === WAL_MAGIC) return { records, torn: true };
      if (valid && end === bytes.length) return { records, torn: true };
      throw new JournalDamagedError(`The write-ahead log ${file} is damaged at byte ${at}; the disk needs a resync.`);
    }
    records.push(
      kind === 'write'
        ? { kind, offset, length, data: Buffer.from(bytes.subarray(at + WAL_HEADER_BYTES, end)) }
        : { kind, offset, length },
    );
    at = end;
  }
  return { records, torn: false };
}
