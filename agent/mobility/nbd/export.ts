import { EventEmitter } from 'node:events';
import { ConfigError, ConflictError } from '../../../shared/errors';
import { FileBacking, type BlockBacking } from './backing';
import { DISCARD_JOURNAL, type ChangeKind, type WriteChange, type WriteJournal } from './journal';
import {
  MAX_STRING_BYTES,
  NBD_EIO,
  NBD_ESHUTDOWN,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
} from './protocol';

export interface NbdExportOptions {
  /** The export name clients ask for (1–4096 UTF-8 bytes, no NUL); usually the disk id. */
  name: string;
  backing: BlockBacking;
  /** Where every change goes, in order. Defaults to a journal that discards. */
  journal?: WriteJournal;
  /** Refuse writes (EPERM) and advertise NBD_FLAG_READ_ONLY. Forced on by a read-only backing. */
  readOnly?: boolean;
  /** Shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION. */
  description?: string;
}

export interface OpenFileExportOptions extends Omit<NbdExportOptions, 'backing'> {
  path: string;
  /** Export size; defaults to the file or device size. */
  size?: number;
  /** See FileBackingOptions.inlineWriteBytes. */
  inlineWriteBytes?: number;
}

/** A problem the agent must react to (typically by resynchronising the disk). */
export interface ExportFault {
  error: Error;
  /** The change that failed, when the fault concerns one. */
  change?: WriteChange;
  /** Which side failed: applying to the backing store, the journal, or a flush of either. */
  stage: 'backing' | 'journal' | 'flush';
}

export interface ExportStats {
  /** Changes appended to the journal so far (the last seq). */
  appended: number;
  /** Mutations admitted and not yet both applied and accepted by the journal. */
  inFlight: number;
  /** The most mutations ever in flight at once (shows that requests ran concurrently). */
  peakInFlight: number;
  /** Mutations waiting because the export is paused. */
  held: number;
  paused: boolean;
}

interface InFlight {
  readonly start: number;
  readonly end: number;
  /** Settles (never rejects) once the backing write finished, successfully or not. */
  applied: Promise<unknown>;
  /** Settles (never rejects) once applied and accepted by the journal; the entry then leaves the set. */
  settled: Promise<unknown>;
}

const noop = (): void => undefined;

/**
 * One disk served over NBD, and the one place where its changes are ordered.
 *
 * Every mutation gets its sequence number and is appended to the journal synchronously, at the
 * moment its request (header and payload) has been received and admitted. That order is the
 * replication order: it is a total order over all connections, and a write acknowledged before
 * another was sent is always admitted first. A mutation that overlaps an earlier in-flight one
 * is applied to the backing store only after the earlier one finished, so overlapping writes land
 * in the backing store in journal order; disjoint ones run in parallel. Emits 'fault'
 * (ExportFault) when the backing store or the journal fails.
 */
export class NbdExport extends EventEmitter {
  readonly name: string;
  readonly description?: string;
  readonly readOnly: boolean;
  readonly size: number;
  readonly backing: BlockBacking;
  readonly journal: WriteJournal;

  private lastSeq = 0;
  private peakInFlight = 0;
  private readonly inflight = new Set<InFlight>();
  private pauseDepth = 0;
  private held: { admit: () => void; refuse: () => void }[] = [];
  private drainWaiters: (() => void)[] = [];
  private syncing: Promise<void> | undefined;
  private nextSync: Promise<void> | undefined;
  private closed = false;

  constructor(options: NbdExportOptions) {
    super();
    const nameBytes = Buffer.byteLength(options.name ?? '', 'utf8');
    if (nameBytes === 0 || nameBytes > MAX_STRING_BYTES || options.name.includes('\0')) {
      throw new ConfigError(
        `The NBD export name ${JSON.stringify(options.name)} is not valid; use 1 to ${MAX_STRING_BYTES} UTF-8 bytes without NUL (usually the disk id).`,
        'name',
      );
    }
    if (
      options.description !== undefined &&
      Buffer.byteLength(options.description, 'utf8') > MAX_STRING_BYTES
    ) {
      throw new ConfigError(
        `The description of NBD export ${options.name} is longer than ${MAX_STRING_BYTES} bytes.`,
        'description',
      );
    }
    this.name = options.name;
    this.description = options.description;
    this.backing = options.backing;
    this.size = options.backing.size;
    this.readOnly = (options.readOnly ?? false) || options.backing.readOnly;
    this.journal = options.journal ?? DISCARD_JOURNAL;
  }

  /** Opens an image file or block device and serves it under `name`. */
  static async openFile(options: OpenFileExportOptions): Promise<NbdExport> {
    const { path, size, inlineWriteBytes, ...rest } = options;
    const backing = await FileBacking.open(path, { readOnly: rest.readOnly, size, inlineWriteBytes });
    try {
      return new NbdExport({ ...rest, backing });
    } catch (err) {
      await backing.close();
      throw err;
    }
  }

  /** The transmission flags this export advertises. */
  get transmissionFlags(): number {
    // CAN_MULTI_CONN is correct: all connections share one export, one descriptor and one
    // journal, and a FLUSH covers every change admitted before it on any connection.
    let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_CAN_MULTI_CONN;
    if (this.readOnly) flags |= NBD_FLAG_READ_ONLY;
    else flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    return flags;
  }

  get stats(): ExportStats {
    return {
      appended: this.lastSeq,
      inFlight: this.inflight.size,
      peakInFlight: this.peakInFlight,
      held: this.held.length,
      paused: this.pauseDepth > 0,
    };
  }

  get paused(): boolean {
    return this.pauseDepth > 0;
  }

  /**
   * Stops admitting mutations from this moment (synchronously): new ones are held, not failed.
   * Resolves once every mutation admitted before the call has been applied to the backing store
   * and accepted by the journal, so the journal then ends at a consistent cut. Pauses nest: each
   * pause() needs its resume(). To cut several disks at one instant, call pause() on all of them
   * in the same synchronous step (NbdServer.pause does) and await the promises afterwards.
   */
  pause(): Promise<void> {
    this.pauseDepth += 1;
    return this.drained();
  }

  /** Undoes one pause(); when none is left, held mutations are admitted in their arrival order. */
  resume(): void {
    if (this.pauseDepth === 0) {
      throw new ConflictError(
        `NBD export ${this.name} is not paused; call resume() once per pause().`,
        'export',
      );
    }
    this.pauseDepth -= 1;
    if (this.pauseDepth > 0) return;
    const held = this.held;
    this.held = [];
    for (const h of held) h.admit();
  }

  /** Resolves when no admitted mutation is in flight. */
  drained(): Promise<void> {
    if (this.inflight.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /**
   * Applies a validated write ('write' with data), zero or trim. Resolves with an NBD error
   * number (0 on success); never rejects. With `fua` it resolves only once this change and every
   * change admitted before it are durable in both the backing store and the journal.
   */
  mutate(
    kind: ChangeKind,
    offset: number,
    length: number,
    data: Buffer | undefined,
    fua: boolean,
  ): Promise<number> {
    if (this.closed) return Promise.resolve(NBD_ESHUTDOWN);
    if (this.pauseDepth === 0) return this.admit(kind, offset, length, data, fua);
    return new Promise((resolve) =>
      this.held.push({
        admit: () => resolve(this.admit(kind, offset, length, data, fua)),
        refuse: () => resolve(NBD_ESHUTDOWN),
      }),
    );
  }

  /** Reads validated bytes; waits for earlier in-flight mutations that overlap the range. */
  read(offset: number, length: number, into: Buffer, at: number): Promise<void> {
    const end = offset + length;
    let deps: Promise<unknown>[] | undefined;
    for (const e of this.inflight) {
      if (e.start < end && offset < e.end) (deps ??= []).push(e.applied);
    }
    if (!deps) return this.backing.read(into, at, length, offset);
    return Promise.all(deps).then(() => this.backing.read(into, at, length, offset));
  }

  /**
   * Resolves once every mutation admitted before the call is durable in the backing store and
   * the journal (NBD_CMD_FLUSH). Concurrent flushes share one fdatasync + journal flush.
   */
  async flush(): Promise<void> {
    if (this.inflight.size > 0) await Promise.all(Array.from(this.inflight, (e) => e.settled));
    await this.syncAll();
  }

  /**
   * Stops serving: held mutations are refused (ESHUTDOWN), in-flight ones finish, both sides are
   * flushed and the backing store is closed. The journal is the caller's to close.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const held = this.held;
    this.held = [];
    for (const h of held) h.refuse();
    await this.drained();
    await this.syncAll().catch(noop);
    await this.backing.close();
  }

  private admit(
    kind: ChangeKind,
    offset: number,
    length: number,
    data: Buffer | undefined,
    fua: boolean,
  ): Promise<number> {
    const end = offset + length;
    let deps: Promise<unknown>[] | undefined;
    for (const e of this.inflight) {
      if (e.start < end && offset < e.end) (deps ??= []).push(e.applied);
    }
    const change: WriteChange =
      kind === 'write'
        ? { seq: ++this.lastSeq, kind, offset, length, data }
        : { seq: ++this.lastSeq, kind, offset, length };

    let accepted: Promise<void> | void;
    try {
      accepted = this.journal.append(change);
    } catch (err) {
      // Not in the journal, so not in the backing store either.
      this.lastSeq -= 1;
      this.fault({ error: err as Error, change, stage: 'journal' });
      return Promise.resolve(NBD_EIO);
    }

    const apply = (): Promise<void> =>
      kind === 'write'
        ? this.backing.write(data as Buffer, offset)
        : this.backing.writeZeroes(offset, length);
    const appliedResult = deps ? Promise.all(deps).then(apply) : apply();
    const before = fua && this.inflight.size > 0 ? Array.from(this.inflight, (e) => e.settled) : undefined;

    const entry: InFlight = {
      start: offset,
      end,
      applied: appliedResult.then(noop, noop),
      settled: undefined as never,
    };
    this.inflight.add(entry);
    if (this.inflight.size > this.peakInFlight) this.peakInFlight = this.inflight.size;

    const backingDone = appliedResult.then(
      () => 0,
      (err: Error) => {
        this.fault({ error: err, change, stage: 'backing' });
        return NBD_EIO;
      },
    );
    const journalDone =
      accepted === undefined
        ? 0
        : Promise.resolve(accepted).then(
            () => 0,
            (err: Error) => {
              this.fault({ error: err, change, stage: 'journal' });
              return NBD_EIO;
            },
          );
    const result = Promise.all([backingDone, journalDone]).then(([a, b]) => a || b);
    entry.settled = result.then(() => {
      this.inflight.delete(entry);
      if (this.inflight.size === 0 && this.drainWaiters.length > 0) {
        const waiters = this.drainWaiters;
        this.drainWaiters = [];
        for (const w of waiters) w();
      }
    });
    if (!fua) return result;
    return result.then(async (errno) => {
      if (errno !== 0) return errno;
      if (before) await Promise.all(before);
      return this.syncAll().then(
        () => 0,
        () => NBD_EIO,
      );
    });
  }

  /** Group commit: joins the sync that has not started yet, or starts one. */
  private syncAll(): Promise<void> {
    if (!this.syncing) return this.startSync();
    if (!this.nextSync) {
      this.nextSync = this.syncing.then(noop, noop).then(() => {
        this.nextSync = undefined;
        return this.startSync();
      });
    }
    return this.nextSync;
  }

  private startSync(): Promise<void> {
    const p = Promise.all([this.backing.sync(), this.journal.flush()]).then(noop);
    this.syncing = p;
    const clear = (): void => {
      if (this.syncing === p) this.syncing = undefined;
    };
    p.then(clear, (err: Error) => {
      clear();
      this.fault({ error: err, stage: 'flush' });
    });
    return p;
  }

  private fault(f: ExportFault): void {
    if (this.listenerCount('fault') > 0) this.emit('fault', f);
  }
}
