/*
 * Mobility agent write throughput: fio's nbd engine (libnbd) writes through the full agent — NBD
 * export, segmenter, on-disk journal, shipper to a stub proxy that takes every segment — and
 * through `nbdkit file` on the same image, with the same client and job, in the same run. The
 * target is a ratio of at least 0.7 of nbdkit while journaling (issue 3).
 *
 * The stub proxy runs in a child process (this file with --stub-proxy): a real proxy is another
 * machine, and one in the agent's process would put the receiving side of every segment on the
 * agent's event loop. The journal bound is raised so that a burst faster than shipping stays in
 * data mode for the whole run (the figure is the write rate while journaling); what was shipped
 * during the run is printed beside it.
 */
import { fork } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { MachineAgent } from '../agent/mobility/agent';
import { exec, fioWrite, median, startNbdkit as startReferenceNbdkit } from './tools';
import type { BenchResult } from './types';

const MiB = 1024 * 1024;
/** Journal bound for the benchmark runs. */
const JOURNAL_BYTES = 16 * 1024 * MiB;
const CREDENTIAL = `lbm1.bench.${'A'.repeat(43)}`;

interface Workload {
  name: string;
  unit: 'MiB/s' | 'IOPS';
  args: string[];
}

interface Target {
  uri: string;
  /** MiB the stub proxy has taken so far (the agent only). */
  shippedMiB?: () => Promise<number>;
  /** CPU seconds the server has used so far (for the agent: this process, which runs it). */
  cpuSeconds(): number;
  stop(): Promise<void>;
  /** Why the run does not count (the agent left data mode), if it does not. */
  spoiled(): string | undefined;
}

/** Takes every segment (201) and reports the highest seq it took: the proxy contract, minus the spool. */
function serveStubProxy(): void {
  const acked = new Map<string, { epoch: number; seq: number }>();
  let bytes = 0;
  const server = http.createServer((req, res) => {
    const parts = (req.url ?? '').split('/').slice(1);
    if (req.method === 'GET') {
      const last = acked.get(parts[4]);
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ epoch: last?.epoch ?? null, seq: last?.seq ?? null }));
      return;
    }
    req.on('data', (c: Buffer) => (bytes += c.length));
    req.on('end', () => {
      acked.set(parts[4], { epoch: Number(parts[6]), seq: Number(parts[7]) });
      res.writeHead(201, { 'content-type': 'application/json' });
      res.end('{"result":"created"}');
    });
  });
  server.listen(0, '127.0.0.1', () => process.send?.({ port: (server.address() as net.AddressInfo).port }));
  process.on('message', (m) => {
    if (m === 'bytes') process.send?.({ bytes });
  });
  process.on('disconnect', () => process.exit(0));
}

/** The stub proxy in a child process. */
async function startStubProxy(): Promise<{
  url: string;
  bytes: () => Promise<number>;
  stop: () => Promise<void>;
}> {
  const child = fork(__filename, ['--stub-proxy'], {
    stdio: ['ignore', 'ignore', 'ignore', 'ipc'],
    execArgv: [],
  });
  const port = await new Promise<number>((resolve, reject) => {
    child.once('message', (m: { port: number }) => resolve(m.port));
    child.once('exit', (code) => reject(new Error(`the stub proxy exited (code ${code})`)));
  });
  return {
    url: `http://127.0.0.1:${port}`,
    bytes: () =>
      new Promise<number>((resolve) => {
        child.once('message', (m: { bytes: number }) => resolve(m.bytes));
        child.send('bytes');
      }),
    stop: async () => {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

async function startAgent(image: string, dir: string): Promise<Target> {
  const journalDir = path.join(dir, 'journal');
  fs.rmSync(journalDir, { recursive: true, force: true });
  const proxy = await startStubProxy();
  const agent = new MachineAgent({
    machine: 'bench',
    disks: [{ id: 'd0', path: image }],
    journalDir,
    proxy: { url: proxy.url, credential: CREDENTIAL },
    nbd: { port: 0 },
    crashIntervalSeconds: 0,
    // Room for the whole run's writes (the image's folder has it): see the note at the top.
    segment: { maxJournalBytes: JOURNAL_BYTES },
    logger: pino({ level: 'silent' }),
  });
  await agent.start();
  // The initial sync of an all-zero image ships zero records; writes are measured in data mode.
  await agent.settled(120_000);
  const modes: string[] = [];
  agent.on('mode', (m: { mode: string }) => modes.push(m.mode));
  const nbd = agent.nbd as { host: string; port: number };
  const start = process.cpuUsage();
  return {
    uri: `nbd://127.0.0.1:${nbd.port}/d0`,
    cpuSeconds() {
      const u = process.cpuUsage(start);
      return (u.user + u.system) / 1e6;
    },
    shippedMiB: async () => (await proxy.bytes()) / MiB,
    spoiled: () => (modes.length > 0 ? `the agent left data mode (${modes.join(', ')})` : undefined),
    async stop() {
      await agent.stop();
      await proxy.stop();
      fs.rmSync(journalDir, { recursive: true, force: true });
    },
  };
}

interface Sample {
  /** IOPS or MiB/s, per the workload's unit. */
  rate: number;
  /** MiB/s written by the client. */
  writtenMiBps: number;
  /** MiB/s the stub proxy took during the run (the agent only). */
  shippedMiBps?: number;
  /** Server CPU seconds per GiB written: what the server costs, robust to a busy machine. */
  cpuPerGiB: number;
}

/** nbdkit's file plugin on the same image: the reference. */
async function startNbdkit(image: string): Promise<Target> {
  const nbdkit = await startReferenceNbdkit(image);
  return {
    uri: nbdkit.uri,
    cpuSeconds: () => nbdkit.cpuSeconds(),
    spoiled: () => undefined,
    stop: () => nbdkit.stop(),
  };
}

async function fio(target: Target, workload: Workload, seconds: number, size: number): Promise<Sample> {
  const shippedBefore = await target.shippedMiB?.();
  const cpuBefore = target.cpuSeconds();
  const job = await fioWrite(target.uri, workload.args, seconds, size);
  const cpu = target.cpuSeconds() - cpuBefore;
  const shippedAfter = await target.shippedMiB?.();
  const writtenMiBps = job.bytesPerSecond / MiB;
  const runSeconds = job.runtimeSeconds;
  return {
    rate: workload.unit === 'IOPS' ? job.iops : writtenMiBps,
    writtenMiBps,
    cpuPerGiB: cpu / (job.ioBytes / (1024 * MiB)),
    shippedMiBps:
      shippedBefore !== undefined && shippedAfter !== undefined
        ? (shippedAfter - shippedBefore) / runSeconds
        : undefined,
  };
}

export async function run(opts: { quick: boolean }): Promise<BenchResult[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-bench-agent-'));
  const image = path.join(dir, 'disk.img');
  const size = opts.quick ? 256 * MiB : 1024 * MiB;
  const seconds = opts.quick ? 3 : 8;
  const rounds = opts.quick ? 2 : 3;
  const workloads: Workload[] = [
    {
      name: 'sequential write 1 MiB, 8 in flight',
      unit: 'MiB/s',
      args: ['--rw=write', '--bs=1m', '--iodepth=8'],
    },
    {
      name: 'random write 4 KiB, 32 in flight',
      unit: 'IOPS',
      args: ['--rw=randwrite', '--bs=4k', '--iodepth=32'],
    },
  ];
  const results: BenchResult[] = [];
  try {
    // Fully written, so neither server pays the file system's block allocation.
    const fd = fs.openSync(image, 'w');
    const chunk = Buffer.alloc(4 * MiB);
    for (let at = 0; at < size; at += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, at);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    for (const w of workloads) {
      const samples = { nbdkit: [] as Sample[], agent: [] as Sample[] };
      for (let round = 0; round < rounds; round++) {
        const order: ('nbdkit' | 'agent')[] = round % 2 === 0 ? ['nbdkit', 'agent'] : ['agent', 'nbdkit'];
        for (const which of order) {
          await exec('sync', []);
          const target = which === 'nbdkit' ? await startNbdkit(image) : await startAgent(image, dir);
          try {
            samples[which].push(await fio(target, w, seconds, size));
            const spoiled = target.spoiled();
            if (spoiled) throw new Error(`${w.name}: ${spoiled}; the figure would not measure journaling`);
          } finally {
            await target.stop();
          }
        }
      }
      const ref = median(samples.nbdkit.map((x) => x.rate));
      const v = median(samples.agent.map((x) => x.rate));
      results.push({
        name: `${w.name}, agent (segments journalled and shipped)`,
        value: v,
        unit: w.unit,
        reference: 'nbdkit file, same fio job',
        referenceValue: ref,
        ratio: ref > 0 ? v / ref : 0,
      });
      // Oriented like the others: nbdkit's cost over ours, so 1.0 means "as cheap as nbdkit".
      const cpu = median(samples.agent.map((x) => x.cpuPerGiB));
      const refCpu = median(samples.nbdkit.map((x) => x.cpuPerGiB));
      results.push({
        name: `${w.name}, agent: server CPU`,
        value: cpu,
        unit: 'CPU s/GiB',
        reference: 'nbdkit file CPU',
        referenceValue: refCpu,
        ratio: cpu > 0 ? refCpu / cpu : 0,
      });
      // Shipping to a proxy on the same 2 cores is not the target, but a burst faster than it
      // grows the journal; this shows by how much (1.0: shipped as fast as written).
      const written = median(samples.agent.map((x) => x.writtenMiBps));
      const shipped = median(samples.agent.map((x) => x.shippedMiBps ?? 0));
      results.push({
        name: `${w.name}, agent: shipped to the stub proxy during the run`,
        value: shipped,
        unit: 'MiB/s',
        reference: "the agent's journalled write rate",
        referenceValue: written,
        ratio: written > 0 ? shipped / written : 0,
      });
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}

if (require.main === module && process.argv.includes('--stub-proxy')) {
  serveStubProxy();
} else if (require.main === module) {
  void run({ quick: process.argv.includes('--quick') }).then((rows) => {
    for (const r of rows) {
      console.log(
        `${r.name}: ${r.value.toFixed(0)} ${r.unit}  vs ${r.reference}: ${r.referenceValue.toFixed(0)} ${r.unit}  ratio ${r.ratio.toFixed(2)}`,
      );
    }
  });
}
