/** Shared helpers for the NBD server tests: a temp image, a recording journal, a disk model, tools. */
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { NbdExport, NbdServer, type WriteChange, type WriteJournal } from '../../../agent/mobility/nbd';
import { prng } from '../../helpers/random';

/** Records every change in the order the server appends it; data is copied to be safe. */
export class RecordingJournal implements WriteJournal {
  readonly changes: WriteChange[] = [];
  flushes = 0;
  append(change: WriteChange): void {
    this.changes.push({ ...change, data: change.data ? Buffer.from(change.data) : undefined });
  }
  async flush(): Promise<void> {
    this.flushes += 1;
  }
}

/** An independent model of a disk: a byte array that operations are applied to. */
export class DiskModel {
  readonly bytes: Buffer;
  constructor(size: number) {
    this.bytes = Buffer.alloc(size);
  }
  write(offset: number, data: Buffer): void {
    data.copy(this.bytes, offset);
  }
  fill(offset: number, length: number, value: number): void {
    this.bytes.fill(value, offset, offset + length);
  }
  zero(offset: number, length: number): void {
    this.bytes.fill(0, offset, offset + length);
  }
}

/** Applies a journal's changes, in order, to a zero image of `size` bytes. */
export function replay(changes: readonly WriteChange[], size: number): Buffer {
  const img = Buffer.alloc(size);
  let lastSeq = 0;
  for (const c of changes) {
    if (c.seq !== lastSeq + 1) throw new Error(`journal seq ${c.seq} follows ${lastSeq}`);
    lastSeq = c.seq;
    if (c.kind === 'write') {
      if (!c.data || c.data.length !== c.length)
        throw new Error(`write ${c.seq} has ${c.data?.length} bytes for ${c.length}`);
      c.data.copy(img, c.offset);
    } else img.fill(0, c.offset, c.offset + c.length);
  }
  return img;
}

/** First differing byte of two buffers, for readable failures (-1 when equal). */
export function firstDifference(a: Buffer, b: Buffer): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  const step = 4096;
  for (let i = 0; i < a.length; i += step) {
    if (!a.subarray(i, i + step).equals(b.subarray(i, i + step))) {
      for (let j = i; j < i + step; j++) if (a[j] !== b[j]) return j;
    }
  }
  return -1;
}

export { prng };

export interface DiskSpec {
  name: string;
  sizeBytes: number;
  readOnly?: boolean;
  description?: string;
  journal?: WriteJournal;
}

export interface RunningNbd {
  dir: string;
  port: number;
  server: NbdServer;
  exports: Map<string, { exp: NbdExport; image: string; journal: WriteJournal }>;
  uri(name: string): string;
  image(name: string): Buffer;
  journal(name: string): RecordingJournal;
  stop(): Promise<void>;
}

export async function startNbd(disks: DiskSpec[]): Promise<RunningNbd> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-nbd-'));
  const exports = new Map<string, { exp: NbdExport; image: string; journal: WriteJournal }>();
  for (const d of disks) {
    const image = path.join(dir, `${d.name}.img`);
    fs.writeFileSync(image, '');
    fs.truncateSync(image, d.sizeBytes);
    const journal = d.journal ?? new RecordingJournal();
    const exp = await NbdExport.openFile({
      name: d.name,
      path: image,
      readOnly: d.readOnly,
      description: d.description,
      journal,
    });
    exports.set(d.name, { exp, image, journal });
  }
  const server = new NbdServer({ exports: [...exports.values()].map((e) => e.exp) });
  const { port } = await server.listen({ port: 0, host: '127.0.0.1' });
  const get = (name: string) => {
    const e = exports.get(name);
    if (!e) throw new Error(`no disk ${name}`);
    return e;
  };
  return {
    dir,
    port,
    server,
    exports,
    uri: (name) => `nbd://127.0.0.1:${port}/${name}`,
    image: (name) => fs.readFileSync(get(name).image),
    journal: (name) => get(name).journal as RecordingJournal,
    async stop() {
      await server.close();
      for (const e of exports.values()) await e.exp.close();
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Debian's python3 has the libnbd bindings; a pyenv python3 first on PATH would not. */
const TOOL_ENV = { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}`, LC_ALL: 'C' };

export interface ToolResult {
  stdout: string;
  stderr: string;
}

/** Runs a real client asynchronously (the server shares this process, so never block it). */
export function runTool(
  cmd: string,
  args: string[],
  options: { timeoutMs?: number } = {},
): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { env: TOOL_ENV, maxBuffer: 64 * 1024 * 1024, timeout: options.timeoutMs ?? 50_000 },
      (err, stdout, stderr) => {
        if (err) {
          reject(
            new Error(
              `${cmd} ${args.join(' ')} failed: ${err.message}\nstdout: ${stdout}\nstderr: ${stderr}`,
            ),
          );
        } else resolve({ stdout, stderr });
      },
    );
  });
}

export function assertSameBytes(actual: Buffer, expected: Buffer, what: string): void {
  const at = firstDifference(actual, expected);
  if (at !== -1) {
    throw new Error(
      `${what} differs at byte ${at} (sizes ${actual.length}/${expected.length}): got ${actual.subarray(at, at + 8).toString('hex')}, expected ${expected.subarray(at, at + 8).toString('hex')}`,
    );
  }
}
