import fs from 'node:fs';
import path from 'node:path';
import type { ContainerClient } from '@azure/storage-blob';
import type { Logger } from 'pino';
import { changelogBlobName, openEnvelope, type KeyRing } from '../../shared/envelope';
import { createLogger } from '../../shared/logger';
import {
  CHANGE_BLOCK_BYTES,
  REPROTECT_ROW,
  targetRow,
  uploadSiteChecksums,
  type ProtectionTables,
} from '../../shared/reprotect';
import { readEntity } from '../../shared/replication';
import { decodeSegment } from '../../shared/segment';
import { hashBlocks } from '../mobility/sync';

// The target role (ASR's master target): applies the reprotect change logs of a failed-over
// machine to its site disks. First it uploads the site disks' block checksums, so the cloud's
// first pass ships only blocks that really differ; then it applies segments `1, 2, …` of the
// epoch in order, each made durable (fdatasync) before the cursor moves, and reports its cursor
// in the protection table. It resumes from its state file after a crash or a lost link: a
// segment applied twice leaves the same bytes (writes are absolute).

export interface TargetDisk {
  id: string;
  path: string;
}

export interface ReprotectTargetOptions {
  /** `reprotect` in CacheStorage. */
  container: ContainerClient;
  keyRing: KeyRing;
  tables: ProtectionTables;
  machine: string;
  epoch: number;
  disks: TargetDisk[];
  /** Where the per-disk cursors live. */
  stateDir: string;
  pollMs?: number;
  logger?: Logger;
}

interface DiskCursor {
  epoch: number;
  appliedSeq: number;
  lastMarkerId?: string;
  checksumsUploaded: boolean;
}

export interface ApplyReport {
  disk: string;
  appliedSeq: number;
  lastMarkerId?: string;
  appliedBytes: number;
}

/** Bytes read per step of `fileChecksums`, and how many steps are hashed at once. */
const CHECKSUM_CHUNK_BYTES = 8 * 1024 * 1024;
const CHECKSUM_CHUNKS_IN_FLIGHT = 4;

/**
 * SHA-256 per block of a file (the last block may be short): read in 8 MiB steps while earlier
 * steps are hashed on worker threads (`hashBlocks`), so the target's event loop never hashes and
 * both cores work.
 */
export async function fileChecksums(file: string, block = CHANGE_BLOCK_BYTES): Promise<Buffer[]> {
  const fd = await fs.promises.open(file, 'r');
  try {
    const size = (await fd.stat()).size;
    const step = Math.max(block, Math.floor(CHECKSUM_CHUNK_BYTES / block) * block);
    const hashing: Promise<Buffer>[] = [];
    const sums: Buffer[] = [];
    const collect = async () => {
      const packed = await hashing.shift()!;
      for (let at = 0; at < packed.length; at += 32) sums.push(packed.subarray(at, at + 32));
    };
    for (let at = 0; at < size; at += step) {
      const n = Math.min(step, size - at);
      const buf = Buffer.allocUnsafe(n); // filled whole below, then handed to a hashing thread
      for (let done = 0; done < n;) {
        const { bytesRead } = await fd.read(buf, done, n - done, at + done);
        if (bytesRead === 0)
          throw new Error(`${file} ended at byte ${at + done} while its checksums were read`);
        done += bytesRead;
      }
      const hashed = hashBlocks(buf, n, block);
      hashed.catch(() => undefined); // awaited in order by collect(); a failure surfaces there
      hashing.push(hashed);
      if (hashing.length >= CHECKSUM_CHUNKS_IN_FLIGHT) await collect();
    }
    while (hashing.length > 0) await collect();
    return sums;
  } finally {
    await fd.close();
  }
}

export class ReprotectTarget {
  private readonly log: Logger;
  private timer?: NodeJS.Timeout;
  private running?: Promise<void>;
  private stopped = false;

  constructor(private readonly options: ReprotectTargetOptions) {
    this.log = (options.logger ?? createLogger('target')).child({
      machine: options.machine,
      epoch: options.epoch,
    });
    fs.mkdirSync(options.stateDir, { recursive: true });
  }

  private cursorFile(disk: string): string {
    return path.join(this.options.stateDir, `${disk}.json`);
  }

  cursor(disk: string): DiskCursor {
    try {
      const c = JSON.parse(fs.readFileSync(this.cursorFile(disk), 'utf8')) as DiskCursor;
      if (c.epoch === this.options.epoch) return c;
    } catch {
      // first run for this epoch
    }
    return { epoch: this.options.epoch, appliedSeq: 0, checksumsUploaded: false };
  }

  private saveCursor(disk: string, cursor: DiskCursor): void {
    const file = this.cursorFile(disk);
    const tmp = `${file}.tmp`;
    const fd = fs.openSync(tmp, 'w');
    fs.writeSync(fd, JSON.stringify(cursor));
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fs.renameSync(tmp, file);
  }

  private async report(disk: string, cursor: DiskCursor): Promise<void> {
    const table = await this.options.tables.get();
    await table.upsertEntity(
      {
        partitionKey: this.options.machine,
        rowKey: targetRow(disk),
        epoch: cursor.epoch,
        appliedSeq: cursor.appliedSeq,
        ...(cursor.lastMarkerId ? { lastMarkerId: cursor.lastMarkerId } : {}),
        checksumsUploaded: cursor.checksumsUploaded,
        updatedAt: new Date().toISOString(),
      },
      'Merge',
    );
  }

  /** Uploads each site disk's block checksums once per epoch (the first pass compares with them). */
  async uploadChecksums(): Promise<void> {
    for (const d of this.options.disks) {
      const cursor = this.cursor(d.id);
      if (cursor.checksumsUploaded) continue;
      const sums = await fileChecksums(d.path);
      await uploadSiteChecksums(
        this.options.container,
        this.options.keyRing,
        { machine: this.options.machine, disk: d.id, epoch: this.options.epoch },
        sums,
      );
      cursor.checksumsUploaded = true;
      this.saveCursor(d.id, cursor);
      await this.report(d.id, cursor);
      this.log.info({ disk: d.id, blocks: sums.length }, 'site checksums uploaded');
    }
  }

  /** Applies every segment available after the disk's cursor, in order. */
  async applyAvailable(disk: TargetDisk): Promise<ApplyReport> {
    const { machine, epoch, keyRing, container } = this.options;
    const cursor = this.cursor(disk.id);
    let appliedBytes = 0;
    const fd = await fs.promises.open(disk.path, 'r+');
    try {
      for (;;) {
        const seq = cursor.appliedSeq + 1;
        const name = changelogBlobName({ machine, disk: disk.id, epoch, seq });
        let sealed: Buffer;
        try {
          sealed = await container.getBlockBlobClient(name).downloadToBuffer();
        } catch (err) {
          if ((err as { statusCode?: number }).statusCode === 404) break;
          throw err;
        }
        const segment = decodeSegment(openEnvelope(sealed, { name, keyRing }));
        const h = segment.header;
        if (h.machine !== machine || h.disk !== disk.id || h.epoch !== epoch || h.seq !== seq) {
          throw new Error(
            `The reprotect change log ${name} names ${h.machine}/${h.disk} epoch ${h.epoch} seq ${h.seq}; refusing it.`,
          );
        }
        for (const r of segment.records) {
          if (r.type === 'write') {
            await fd.write(r.data, 0, r.data.length, r.offset);
            appliedBytes += r.data.length;
          } else if (r.type === 'zero' || r.type === 'trim') {
            const zeros = Buffer.alloc(Math.min(r.length, 4 * 1024 * 1024));
            for (let at = 0; at < r.length; at += zeros.length)
              await fd.write(zeros, 0, Math.min(zeros.length, r.length - at), r.offset + at);
            appliedBytes += r.length;
          } else cursor.lastMarkerId = r.id;
        }
        await fd.datasync();
        const final = segment.records.find((r) => r.type === 'marker' && r.id.startsWith('final-'));
        if (final && final.type === 'marker') {
          // Failback's final pass: the site's checksums go up before the cursor says it is applied,
          // so the cloud can verify the site disk as soon as it sees the cursor there.
          const sums = await fileChecksums(disk.path);
          await uploadSiteChecksums(
            container,
            keyRing,
            { machine, disk: disk.id, epoch, markerId: final.id },
            sums,
          );
          this.log.info(
            { disk: disk.id, marker: final.id },
            'final pass applied; site checksums uploaded for verification',
          );
        }
        cursor.appliedSeq = seq;
        this.saveCursor(disk.id, cursor);
        await this.report(disk.id, cursor);
      }
    } finally {
      await fd.close();
    }
    return { disk: disk.id, appliedSeq: cursor.appliedSeq, lastMarkerId: cursor.lastMarkerId, appliedBytes };
  }

  /** Uploads the checksums, then applies what arrives every `pollMs` until stopped. */
  start(): void {
    const tick = async () => {
      try {
        await this.uploadChecksums();
        for (const d of this.options.disks) await this.applyAvailable(d);
      } catch (err) {
        this.log.warn({ err }, 'reprotect apply failed; retrying');
      }
    };
    const loop = () => {
      if (this.stopped) return;
      this.running = tick().finally(() => {
        if (!this.stopped) this.timer = setTimeout(loop, this.options.pollMs ?? 1000);
      });
    };
    loop();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.running;
  }
}

/**
 * `lifeboat target reprotect`: follows the machine's reprotect row and runs a ReprotectTarget for
 * its current epoch (a new reprotect starts a new epoch: a fresh cursor and checksum pass).
 */
export class ReprotectTargetRunner {
  private target?: ReprotectTarget;
  private epoch?: number;
  private timer?: NodeJS.Timeout;
  private stopped = false;
  private checking?: Promise<void>;

  constructor(
    private readonly options: Omit<ReprotectTargetOptions, 'epoch' | 'stateDir'> & { stateDir: string },
  ) {}

  private async check(): Promise<void> {
    const table = await this.options.tables.get();
    const row = await readEntity<{ epoch: number; state: string }>(
      table,
      this.options.machine,
      REPROTECT_ROW,
    );
    if (!row || row.epoch === this.epoch || this.stopped) return;
    await this.target?.stop();
    this.epoch = row.epoch;
    this.target = new ReprotectTarget({
      ...this.options,
      epoch: row.epoch,
      stateDir: path.join(this.options.stateDir, `epoch-${row.epoch}`),
    });
    this.target.start();
  }

  start(): void {
    const loop = () => {
      if (this.stopped) return;
      this.checking = this.check()
        .catch((err: unknown) =>
          (this.options.logger ?? createLogger('target')).warn(
            { err },
            'cannot read the reprotect row; retrying',
          ),
        )
        .finally(() => {
          if (!this.stopped) this.timer = setTimeout(loop, this.options.pollMs ?? 1000);
        });
    };
    loop();
  }

  get currentEpoch(): number | undefined {
    return this.epoch;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearTimeout(this.timer);
    await this.checking;
    await this.target?.stop();
  }
}
