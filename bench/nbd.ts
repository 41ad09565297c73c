/*
 * NBD server throughput: fio's nbd engine (libnbd) writes through our server — with a journal that
 * appends every change to a file and fdatasyncs on flush — and through `nbdkit file` on the same
 * image, with the same client and job, in the same run. Prints each figure with nbdkit's as the
 * reference; the target is a ratio of at least 0.7.
 *
 * The journal runs twice: appending to a new file, and writing the same records over a file
 * written (and so cached) beforehand. The difference is the cost of new page-cache pages, which on
 * the dev VM is most of the journal's cost: guest memory freed earlier has been reported to the
 * host (virtio-balloon free page reporting), so every new page is a hypervisor fault.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  AppendFileJournal,
  FileAppender,
  NbdExport,
  NbdServer,
  type WriteChange,
  type WriteJournal,
} from '../agent/mobility/nbd';
import { exec, fioWrite, median, preallocatedImage, startNbdkit } from './tools';
import type { BenchResult } from './types';

const MiB = 1024 * 1024;

interface Workload {
  name: string;
  unit: 'MiB/s' | 'IOPS';
  args: string[];
}

interface Target {
  uri: string;
  /** CPU seconds the server has used so far. */
  cpuSeconds(): number;
  stop(): Promise<void>;
}

interface Sample {
  /** IOPS or MiB/s, per the workload's unit. */
  rate: number;
  /** Server CPU seconds per GiB written: what the server costs, robust to a busy machine. */
  cpuPerGiB: number;
}

/**
 * The AppendFileJournal's records (32-byte header, then the data), written from the start of a
 * file that already holds `bytes` written bytes: the same append path over cached pages.
 */
class CachedFileJournal implements WriteJournal {
  private readonly out: FileAppender;
  private constructor(private readonly fd: number) {
    this.out = new FileAppender(fd, 0);
  }

  static open(file: string, bytes: number): CachedFileJournal {
    const fd = fs.openSync(file, 'w+');
    const chunk = Buffer.alloc(4 * MiB, 1);
    for (let at = 0; at < bytes; at += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, at);
    // Clean, so the run does not start near the kernel's dirty-page limit.
    fs.fdatasyncSync(fd);
    return new CachedFileJournal(fd);
  }

  append(change: WriteChange): Promise<void> | void {
    const header = Buffer.alloc(32);
    header.writeUInt32BE(0x4c424a31, 0);
    header.writeUInt32BE(change.length, 8);
    header.writeBigUInt64BE(BigInt(change.offset), 12);
    header.writeBigUInt64BE(BigInt(change.seq), 20);
    if (change.data) this.out.append(header, change.data);
    else this.out.append(header);
    if (this.out.pendingBytes > 64 * MiB) return this.out.waitWritten(this.out.appended - 64 * MiB);
  }

  flush(): Promise<void> {
    return this.out.sync();
  }

  async close(): Promise<void> {
    await this.flush().catch(() => undefined);
    fs.closeSync(this.fd);
  }
}

async function startLifeboat(
  image: string,
  journalFile: string | undefined,
  cachedBytes?: number,
): Promise<Target> {
  if (journalFile) fs.rmSync(journalFile, { force: true });
  const journal = !journalFile
    ? undefined
    : cachedBytes
      ? CachedFileJournal.open(journalFile, cachedBytes)
      : await AppendFileJournal.open(journalFile);
  const exp = await NbdExport.openFile({ name: 'disk', path: image, journal });
  const server = new NbdServer({ exports: [exp] });
  const { port } = await server.listen({ port: 0 });
  const start = process.cpuUsage();
  return {
    uri: `nbd://127.0.0.1:${port}/disk`,
    cpuSeconds() {
      const u = process.cpuUsage(start);
      return (u.user + u.system) / 1e6;
    },
    async stop() {
      await server.close();
      await exp.close();
      await journal?.close();
      if (journalFile) fs.rmSync(journalFile, { force: true });
    },
  };
}

async function fio(target: Target, workload: Workload, seconds: number, size: number): Promise<Sample> {
  const cpuBefore = target.cpuSeconds();
  const job = await fioWrite(target.uri, workload.args, seconds, size);
  const cpu = target.cpuSeconds() - cpuBefore;
  return {
    rate: workload.unit === 'IOPS' ? job.iops : job.bytesPerSecond / MiB,
    cpuPerGiB: cpu / (job.ioBytes / (1024 * MiB)),
  };
}

type ServerKind = 'nbdkit' | 'lifeboat+journal' | 'lifeboat+cached journal' | 'lifeboat';

const LABELS: Record<Exclude<ServerKind, 'nbdkit'>, string> = {
  lifeboat: 'no journal',
  'lifeboat+journal': 'journal appended to a file',
  'lifeboat+cached journal': 'journal written over a cached file',
};

export async function run(opts: { quick: boolean }): Promise<BenchResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-bench-nbd-'));
  const image = path.join(dir, 'disk.img');
  const journalFile = path.join(dir, 'journal.bin');
  const size = opts.quick ? 256 * MiB : 1024 * MiB;
  const seconds = opts.quick ? 3 : 8;
  const rounds = opts.quick ? 2 : 3;
  const workloads: Workload[] = [
    {
      name: 'random write 4 KiB, 32 in flight',
      unit: 'IOPS',
      args: ['--rw=randwrite', '--bs=4k', '--iodepth=32'],
    },
    {
      name: 'random write 64 KiB, 16 in flight',
      unit: 'MiB/s',
      args: ['--rw=randwrite', '--bs=64k', '--iodepth=16'],
    },
    {
      name: 'sequential write 1 MiB, 8 in flight',
      unit: 'MiB/s',
      args: ['--rw=write', '--bs=1m', '--iodepth=8'],
    },
    {
      // A guest that flushes (a database): every flush is an fdatasync of image and journal.
      name: 'random write 4 KiB, 32 in flight, FLUSH every 64 writes',
      unit: 'IOPS',
      args: ['--rw=randwrite', '--bs=4k', '--iodepth=32', '--fsync=64'],
    },
  ];
  const results: BenchResult[] = [];
  try {
    preallocatedImage(image, size);
    for (const w of workloads) {
      const samples: Record<ServerKind, Sample[]> = {
        nbdkit: [],
        'lifeboat+journal': [],
        'lifeboat+cached journal': [],
        lifeboat: [],
      };
      for (let round = 0; round < rounds; round++) {
        // Rotate the order so no server always runs first; start each run with no dirty pages.
        const order: ServerKind[] = ['nbdkit', 'lifeboat+journal', 'lifeboat+cached journal', 'lifeboat'];
        for (let k = 0; k < round; k++) order.push(order.shift() as ServerKind);
        for (const which of order) {
          await exec('sync', []);
          const target =
            which === 'nbdkit'
              ? await startNbdkit(image)
              : await startLifeboat(
                  image,
                  which === 'lifeboat' ? undefined : journalFile,
                  // Room for the whole run's records (fio writes at most a few GiB in it).
                  which === 'lifeboat+cached journal' ? (opts.quick ? 3072 : 8192) * MiB : undefined,
                );
          try {
            samples[which].push(await fio(target, w, seconds, size));
          } finally {
            await target.stop();
          }
        }
      }
      const ref = median(samples.nbdkit.map((x) => x.rate));
      const refCpu = median(samples.nbdkit.map((x) => x.cpuPerGiB));
      for (const which of ['lifeboat+journal', 'lifeboat+cached journal', 'lifeboat'] as const) {
        const label = `${w.name}, ${LABELS[which]}`;
        const v = median(samples[which].map((x) => x.rate));
        const cpu = median(samples[which].map((x) => x.cpuPerGiB));
        results.push({
          name: label,
          value: v,
          unit: w.unit,
          reference: 'nbdkit file, same fio job',
          referenceValue: ref,
          ratio: ref > 0 ? v / ref : 0,
        });
        // Oriented like the others: nbdkit's cost over ours, so 1.0 means "as cheap as nbdkit".
        results.push({
          name: `${label}: server CPU`,
          value: cpu,
          unit: 'CPU s/GiB',
          reference: 'nbdkit file CPU',
          referenceValue: refCpu,
          ratio: cpu > 0 ? refCpu / cpu : 0,
        });
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}

if (require.main === module) {
  void run({ quick: process.argv.includes('--quick') }).then((rows) => {
    for (const r of rows) {
      console.log(
        `${r.name}: ${r.value.toFixed(0)} ${r.unit}  vs ${r.reference}: ${r.referenceValue.toFixed(0)} ${r.unit}  ratio ${r.ratio.toFixed(2)}`,
      );
    }
  });
}
