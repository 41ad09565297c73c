/* Helpers the benchmarks share: running a reference tool, nbdkit as the NBD reference server. */
import { execFile, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { freePort } from '../infra/local/azurite';

const MiB = 1024 * 1024;

/** Runs a command (fio, rsync, sync …) and resolves with its standard output. */
export function exec(cmd: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) =>
    execFile(
      cmd,
      args,
      { maxBuffer: 64 * MiB, env: { ...process.env, LC_ALL: 'C' } },
      (err, stdout, stderr) =>
        err ? reject(new Error(`${cmd} failed: ${err.message}\n${stderr}`)) : resolve(stdout),
    ),
  );
}

/** A fully written image, so no server under test pays the file system's block allocation. */
export function preallocatedImage(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  const chunk = Buffer.alloc(4 * MiB);
  for (let at = 0; at < size; at += chunk.length)
    fs.writeSync(fd, chunk, 0, Math.min(chunk.length, size - at), at);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export interface Nbdkit {
  uri: string;
  /** CPU seconds nbdkit has used so far (utime + stime from /proc). */
  cpuSeconds(): number;
  stop(): Promise<void>;
}

/** Starts `nbdkit file` on an image, on a free loopback port, ready once it accepts a connection. */
export async function startNbdkit(image: string): Promise<Nbdkit> {
  const port = await freePort();
  const child = spawn(
    'nbdkit',
    ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), 'file', `file=${image}`],
    {
      stdio: 'ignore',
    },
  );
  for (let i = 0; ; i++) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) break;
    if (i > 100) throw new Error('nbdkit did not start listening');
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    uri: `nbd://127.0.0.1:${port}/`,
    cpuSeconds() {
      return processCpuSeconds(child.pid!);
    },
    async stop() {
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await exited;
    },
  };
}

/** What one fio write job through an NBD URI reports (the fields the benchmarks read). */
export interface FioWrite {
  iops: number;
  bytesPerSecond: number;
  ioBytes: number;
  runtimeSeconds: number;
}

/** Runs a time-based fio job with the nbd engine against `uri` and returns its write figures. */
export async function fioWrite(
  uri: string,
  args: string[],
  seconds: number,
  size: number,
): Promise<FioWrite> {
  const out = await exec('fio', [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--size=${size}`,
    '--time_based',
    `--runtime=${seconds}`,
    '--output-format=json',
    ...args,
  ]);
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio reported error ${job.error}`);
  return {
    iops: job.write.iops,
    bytesPerSecond: job.write.bw_bytes,
    ioBytes: job.write.io_bytes,
    runtimeSeconds: job.write.runtime / 1000,
  };
}

/** CPU seconds a process has used: utime + stime, fields 14 and 15 of /proc/PID/stat (ticks of 10 ms). */
export function processCpuSeconds(pid: number): number {
  const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** Wall time and CPU seconds of Azurite and of this process (all its threads) over `work`. */
export async function measured(azuritePid: number, work: () => Promise<unknown>) {
  const azurite = processCpuSeconds(azuritePid);
  const own = process.cpuUsage();
  const start = process.hrtime.bigint();
  await work();
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  const used = process.cpuUsage(own);
  return {
    seconds,
    azuriteCpu: processCpuSeconds(azuritePid) - azurite,
    clientCpu: (used.user + used.system) / 1e6,
  };
}
