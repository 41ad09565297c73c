import { randomBytes } from 'node:crypto';
import { promises as fs, constants as fsConstants } from 'node:fs';
import path from 'node:path';
import { ConflictError } from '../../shared/errors';
import type { SegmentAddress } from '../../shared/envelope';
import { isDnsLabel } from '../../shared/names';

// The proxy's spool: every acknowledged segment lives here, durably, until it is in the cache and
// its notification is sent. Layout under the spool folder:
//
//   segments/{machine}/{disk}/{epoch}.{seq}.seg   acknowledged, waiting for upload
//   shipped/{machine}/{disk}.log                  "{epoch} {seq} {checksum hex}" per shipped segment
//   tmp/                                          files being received (never acknowledged)
//
// A segment is acknowledged only after its file is written, fsynced, renamed into segments/ and
// the folder fsynced. The shipped log remembers recent shipped segments (and the last one), so a
// re-sent segment is still recognised as a duplicate or a conflict after it left the spool.

/** A segment's identity: its SHA-256 trailer, which covers every other byte of it. */
export type Checksum = Buffer;

export interface SpooledSegment extends SegmentAddress {
  bytes: number;
  checksum: Checksum;
  /** When it was acknowledged (or found at start-up), ms since 1970. */
  receivedAt: number;
  file: string;
}

export interface DiskSpool {
  machine: string;
  disk: string;
  /** Waiting for upload, ordered by (epoch, seq). */
  pending: SpooledSegment[];
  pendingBytes: number;
  /** Recently shipped: `${epoch}/${seq}` → checksum hex, oldest first. */
  shipped: Map<string, string>;
  /** The shipped log was compacted: older shipped segments are no longer listed. */
  compacted: boolean;
  lastShipped?: { epoch: number; seq: number };
  shippedLogLines: number;
}

export type AcceptResult = 'created' | 'duplicate';

export interface SpoolOptions {
  /** Shipped segments remembered per disk (default 4096). */
  shippedWindow?: number;
  /**
   * Asked when a re-sent segment is older than the shipped log remembers: the checksum of what
   * the cache holds under that name, or undefined if nothing is there.
   */
  archivedChecksum?: (address: SegmentAddress) => Promise<Checksum | undefined>;
}

const SEGMENT_FILE = /^(\d{1,16})\.(\d{1,16})\.seg$/;

export function compareAddress(a: { epoch: number; seq: number }, b: { epoch: number; seq: number }): number {
  return a.epoch - b.epoch || a.seq - b.seq;
}

async function fsyncPath(p: string): Promise<void> {
  const handle = await fs.open(p, fsConstants.O_RDONLY);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/** mkdir -p that fsyncs each parent whose listing changed, so the new folders survive a crash. */
async function ensureDir(dir: string): Promise<void> {
  try {
    await fs.access(dir);
    return;
  } catch {
    /* create below */
  }
  const parent = path.dirname(dir);
  if (parent !== dir) await ensureDir(parent);
  try {
    await fs.mkdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  await fsyncPath(parent);
}

export class Spool {
  private readonly disks = new Map<string, DiskSpool>();
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly shippedWindow: number;
  private totalBytes = 0;
  private totalSegments = 0;

  private constructor(
    readonly root: string,
    private readonly options: SpoolOptions,
  ) {
    this.shippedWindow = options.shippedWindow ?? 4096;
  }

  /** Opens (creating if needed) the spool at `root`, rescanning what a previous run left. */
  static async open(root: string, options: SpoolOptions = {}): Promise<Spool> {
    const spool = new Spool(path.resolve(root), options);
    await spool.rescan();
    return spool;
  }

  get bytes(): number {
    return this.totalBytes;
  }

  get segments(): number {
    return this.totalSegments;
  }

  diskSpools(): DiskSpool[] {
    return [...this.disks.values()];
  }

  disk(machine: string, disk: string): DiskSpool | undefined {
    return this.disks.get(`${machine}/${disk}`);
  }

  /** The next segment to upload for a disk (lowest epoch, then seq). */
  next(machine: string, disk: string): SpooledSegment | undefined {
    return this.disk(machine, disk)?.pending[0];
  }

  /** The highest (epoch, seq) ever acknowledged for the disk, whether still spooled or shipped. */
  lastAcknowledged(machine: string, disk: string): { epoch: number; seq: number } | undefined {
    const d = this.disk(machine, disk);
    if (!d) return undefined;
    const spooled = d.pending[d.pending.length - 1];
    if (!spooled) return d.lastShipped;
    if (!d.lastShipped) return { epoch: spooled.epoch, seq: spooled.seq };
    return compareAddress(spooled, d.lastShipped) > 0
      ? { epoch: spooled.epoch, seq: spooled.seq }
      : d.lastShipped;
  }

  private dirs() {
    return {
      segments: path.join(this.root, 'segments'),
      shipped: path.join(this.root, 'shipped'),
      tmp: path.join(this.root, 'tmp'),
    };
  }

  private diskState(machine: string, disk: string): DiskSpool {
    const key = `${machine}/${disk}`;
    let d = this.disks.get(key);
    if (!d) {
      d = {
        machine,
        disk,
        pending: [],
        pendingBytes: 0,
        shipped: new Map(),
        compacted: false,
        shippedLogLines: 0,
      };
      this.disks.set(key, d);
    }
    return d;
  }

  private async rescan(): Promise<void> {
    const { segments, shipped, tmp } = this.dirs();
    await ensureDir(segments);
    await ensureDir(shipped);
    await ensureDir(tmp);
    // Files still in tmp/ were never acknowledged: the sender will send them again.
    for (const f of await fs.readdir(tmp)) await fs.rm(path.join(tmp, f), { force: true, recursive: true });

    for (const machine of await fs.readdir(shipped)) {
      if (!isDnsLabel(machine)) continue;
      for (const f of await fs.readdir(path.join(shipped, machine))) {
        const m = /^(.+)\.log$/.exec(f);
        if (m && isDnsLabel(m[1]))
          await this.loadShippedLog(this.diskState(machine, m[1]), path.join(shipped, machine, f));
      }
    }
    for (const machine of await fs.readdir(segments)) {
      if (!isDnsLabel(machine)) continue;
      for (const disk of await fs.readdir(path.join(segments, machine))) {
        if (!isDnsLabel(disk)) continue;
        const dir = path.join(segments, machine, disk);
        const d = this.diskState(machine, disk);
        for (const f of await fs.readdir(dir)) {
          const m = SEGMENT_FILE.exec(f);
          if (!m) continue;
          const epoch = Number(m[1]);
          const seq = Number(m[2]);
          const file = path.join(dir, f);
          if (d.shipped.has(`${epoch}/${seq}`)) {
            // Shipped, but the run stopped before the file was removed.
            await fs.rm(file, { force: true });
            continue;
          }
          const handle = await fs.open(file, 'r');
          try {
            const { size } = await handle.stat();
            const checksum = Buffer.alloc(32);
            await handle.read(checksum, 0, 32, Math.max(0, size - 32));
            const entry: SpooledSegment = {
              machine,
              disk,
              epoch,
              seq,
              bytes: size,
              checksum,
              receivedAt: Date.now(),
              file,
            };
            this.insertPending(d, entry);
          } finally {
            await handle.close();
          }
        }
      }
    }
    for (const d of this.disks.values()) {
      if (d.shippedLogLines > 2 * this.shippedWindow) await this.compact(d);
    }
  }

  private async loadShippedLog(d: DiskSpool, file: string): Promise<void> {
    const text = await fs.readFile(file, 'utf8');
    for (const line of text.split('\n')) {
      if (line === '#compacted') {
        d.compacted = true;
        continue;
      }
      const last = /^#last (\d{1,16}) (\d{1,16})$/.exec(line);
      if (last) {
        const at = { epoch: Number(last[1]), seq: Number(last[2]) };
        if (!d.lastShipped || compareAddress(at, d.lastShipped) > 0) d.lastShipped = at;
        continue;
      }
      const m = /^(\d{1,16}) (\d{1,16}) ([0-9a-f]{64})$/.exec(line);
      if (!m) continue; // a torn last line after a crash: that segment is still in segments/
      this.rememberShipped(d, Number(m[1]), Number(m[2]), m[3]);
      d.shippedLogLines++;
    }
  }

  private rememberShipped(d: DiskSpool, epoch: number, seq: number, checksumHex: string): void {
    const key = `${epoch}/${seq}`;
    d.shipped.delete(key);
    d.shipped.set(key, checksumHex);
    if (d.shipped.size > this.shippedWindow) {
      d.shipped.delete(d.shipped.keys().next().value!);
      d.compacted = true;
    }
    if (!d.lastShipped || compareAddress({ epoch, seq }, d.lastShipped) > 0) d.lastShipped = { epoch, seq };
  }

  private insertPending(d: DiskSpool, entry: SpooledSegment): void {
    let i = d.pending.length;
    while (i > 0 && compareAddress(d.pending[i - 1], entry) > 0) i--;
    d.pending.splice(i, 0, entry);
    d.pendingBytes += entry.bytes;
    this.totalBytes += entry.bytes;
    this.totalSegments++;
  }

  private async withLock<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const previous = this.locks.get(key) ?? Promise.resolve();
    const run = previous.then(fn, fn);
    const settled = run.catch(() => undefined);
    this.locks.set(key, settled);
    try {
      return await run;
    } finally {
      if (this.locks.get(key) === settled) this.locks.delete(key);
    }
  }

  /**
   * Stores a verified segment durably. Resolves 'created' once it is on disk (fsynced), or
   * 'duplicate' if the same bytes were accepted before; throws ConflictError for different bytes
   * under an existing (machine, disk, epoch, seq).
   */
  async accept(address: SegmentAddress, data: Buffer, checksum: Checksum): Promise<AcceptResult> {
    const { machine, disk, epoch, seq } = address;
    return this.withLock(`${machine}/${disk}/${epoch}/${seq}`, async () => {
      const d = this.diskState(machine, disk);
      const known = await this.knownChecksum(d, address);
      if (known) {
        if (known.equals(checksum)) return 'duplicate';
        throw new ConflictError(
          `Segment ${seq} of epoch ${epoch} for ${machine}/${disk} was already accepted with different bytes; ` +
            'a sequence number can carry only one segment (start a new epoch to resend different data).',
          'seq',
          'SegmentConflict',
        );
      }
      const { segments, tmp } = this.dirs();
      const temp = path.join(tmp, `${randomBytes(8).toString('hex')}.part`);
      const handle = await fs.open(temp, 'wx');
      try {
        await handle.writeFile(data);
        await handle.sync();
      } finally {
        await handle.close();
      }
      const dir = path.join(segments, machine, disk);
      await ensureDir(dir);
      const file = path.join(dir, `${epoch}.${seq}.seg`);
      await fs.rename(temp, file);
      await fsyncPath(dir);
      this.insertPending(d, {
        machine,
        disk,
        epoch,
        seq,
        bytes: data.length,
        checksum,
        receivedAt: Date.now(),
        file,
      });
      return 'created';
    });
  }

  private async knownChecksum(d: DiskSpool, address: SegmentAddress): Promise<Checksum | undefined> {
    const pending = d.pending.find((p) => p.epoch === address.epoch && p.seq === address.seq);
    if (pending) return pending.checksum;
    const shipped = d.shipped.get(`${address.epoch}/${address.seq}`);
    if (shipped) return Buffer.from(shipped, 'hex');
    if (
      d.compacted &&
      d.lastShipped &&
      compareAddress(address, d.lastShipped) <= 0 &&
      this.options.archivedChecksum
    ) {
      return this.options.archivedChecksum(address);
    }
    return undefined;
  }

  async read(entry: SpooledSegment): Promise<Buffer> {
    return fs.readFile(entry.file);
  }

  /**
   * Records that `entry` is in the cache and notified, then removes its file. The log line is
   * fsynced first: a crash in between leaves a file that the next start removes.
   */
  async markShipped(entry: SpooledSegment): Promise<void> {
    const d = this.diskState(entry.machine, entry.disk);
    const dir = path.join(this.dirs().shipped, entry.machine);
    await ensureDir(dir);
    const log = path.join(dir, `${entry.disk}.log`);
    const handle = await fs.open(log, 'a');
    try {
      await handle.write(`${entry.epoch} ${entry.seq} ${entry.checksum.toString('hex')}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    d.shippedLogLines++;
    this.rememberShipped(d, entry.epoch, entry.seq, entry.checksum.toString('hex'));
    const i = d.pending.indexOf(entry);
    if (i >= 0) {
      d.pending.splice(i, 1);
      d.pendingBytes -= entry.bytes;
      this.totalBytes -= entry.bytes;
      this.totalSegments--;
    }
    await fs.rm(entry.file, { force: true });
    if (d.shippedLogLines > 2 * this.shippedWindow) await this.compact(d);
  }

  /** Rewrites a disk's shipped log with only the remembered window (atomically). */
  private async compact(d: DiskSpool): Promise<void> {
    const dir = path.join(this.dirs().shipped, d.machine);
    const log = path.join(dir, `${d.disk}.log`);
    const temp = path.join(this.dirs().tmp, `${randomBytes(8).toString('hex')}.log`);
    const lines = [...d.shipped].map(([key, hex]) => `${key.replace('/', ' ')} ${hex}`);
    // The last shipped position survives even if it fell out of the window.
    const last = d.lastShipped ? `#last ${d.lastShipped.epoch} ${d.lastShipped.seq}\n` : '';
    const handle = await fs.open(temp, 'w');
    try {
      await handle.writeFile(`#compacted\n${last}${lines.join('\n')}\n`);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temp, log);
    await fsyncPath(dir);
    d.compacted = true;
    d.shippedLogLines = lines.length;
  }
}
