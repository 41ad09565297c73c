/**
 * The agent as a real process (`lifeboat agent protect` through agent/mobility/command.ts):
 * SIGKILL and restart never silently skip data — a flush acknowledged before the kill reaches the
 * proxy from the journal, the disk is marked for resync and converges on the disk's bytes — and a
 * SIGTERM is a clean stop that resumes without a resync.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { AgentStatus } from '../../../agent/mobility/agent';
import {
  CREDENTIAL,
  MiB,
  TestProxy,
  assertSameBytes,
  makeImage,
  runTool,
  tempDir,
  waitFor,
} from './agent-harness';

const ROOT = path.resolve(__dirname, '../../..');
const COMMAND = path.join(ROOT, 'agent/mobility/command.ts');

interface AgentProcess {
  child: ChildProcess;
  log: () => string;
  exited: Promise<number | null>;
}

describe('agent process: kill, stop, restart', () => {
  let dir: string;
  let proxy: TestProxy;
  let image: string;
  let journalDir: string;
  let credFile: string;
  const size = 4 * MiB;
  const running: AgentProcess[] = [];

  beforeEach(async () => {
    dir = tempDir('restart');
    proxy = new TestProxy();
    await proxy.start();
    image = makeImage(dir, 'd0', size);
    journalDir = path.join(dir, 'journal');
    credFile = path.join(dir, 'credential');
    fs.writeFileSync(credFile, `${CREDENTIAL}\n`);
  });
  afterEach(async () => {
    for (const p of running) if (p.child.exitCode === null) p.child.kill('SIGKILL');
    await Promise.all(running.map((p) => p.exited));
    running.length = 0;
    await proxy.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function spawnAgent(remoteImage: string): AgentProcess {
    fs.rmSync(path.join(journalDir, 'status.json'), { force: true });
    const args = [
      '--import',
      'tsx',
      COMMAND,
      'protect',
      '--machine',
      'm1',
      '--disk',
      `d0=${image}`,
      '--proxy',
      proxy.url,
      '--credential-file',
      credFile,
      '--nbd-port',
      '0',
      '--journal-dir',
      journalDir,
      '--crash-interval',
      '0',
      '--segment-age',
      '1',
      '--segment-max',
      '256KiB',
      '--remote-image',
      `d0=${remoteImage}`,
      '--no-progress',
    ];
    const child = spawn(process.execPath, args, {
      cwd: ROOT,
      env: { ...process.env, LIFEBOAT_LOG_LEVEL: 'info' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let log = '';
    child.stdout!.on('data', (c: Buffer) => (log += c.toString()));
    child.stderr!.on('data', (c: Buffer) => (log += c.toString()));
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    const p = { child, log: () => log, exited };
    running.push(p);
    return p;
  }

  function status(): AgentStatus | undefined {
    try {
      return JSON.parse(fs.readFileSync(path.join(journalDir, 'status.json'), 'utf8')) as AgentStatus;
    } catch {
      return undefined;
    }
  }

  async function serving(p: AgentProcess): Promise<string> {
    await waitFor(() => status()?.nbd !== undefined || p.child.exitCode !== null, 'the agent to serve NBD');
    if (p.child.exitCode !== null) throw new Error(`agent exited: ${p.log()}`);
    return `nbd://127.0.0.1:${status()!.nbd!.port}/d0`;
  }

  async function settled(p: AgentProcess): Promise<void> {
    await waitFor(() => {
      if (p.child.exitCode !== null) throw new Error(`agent exited: ${p.log()}`);
      const d = status()?.disks[0];
      return d !== undefined && d.mode === 'data' && d.backlogSegments === 0 && d.backlogBytes === 0;
    }, 'the agent to settle');
  }

  /** Writes `data` at `offset` with nbdsh; with flush the call returns only after the FLUSH was acknowledged. */
  async function nbdWrite(
    uri: string,
    writes: { offset: number; data: Buffer }[],
    flush: boolean,
  ): Promise<void> {
    const file = path.join(dir, `w-${Date.now()}-${Math.random()}.bin`);
    fs.writeFileSync(file, Buffer.concat(writes.map((w) => w.data)));
    const plan = writes.map((w) => [w.offset, w.data.length]);
    const script = `
import json
data = open(${JSON.stringify(file)}, 'rb').read()
at = 0
for off, n in json.loads(${JSON.stringify(JSON.stringify(plan))}):
    h.pwrite(data[at:at + n], off)
    at += n
${flush ? 'h.flush()' : ''}
h.shutdown()
`;
    await runTool('nbdsh', ['-u', uri, '-c', script]);
  }

  function randomWrites(count: number, lo: number, hi: number): { offset: number; data: Buffer }[] {
    const out: { offset: number; data: Buffer }[] = [];
    for (let i = 0; i < count; i++) {
      const n = (1 + Math.floor(Math.random() * 32)) * 512;
      out.push({
        offset: lo + Math.floor(Math.random() * ((hi - lo - n) / 512)) * 512,
        data: randomBytes(n),
      });
    }
    return out;
  }

  it('after SIGKILL, data acknowledged by a FLUSH reaches the proxy from the journal, and the disk is marked for resync', async () => {
    // The "cloud copy" is the disk itself here, so the resync ships nothing: whatever the proxy
    // gets after the restart came from the journal.
    let p = spawnAgent(image);
    const uri = await serving(p);
    await settled(p);
    proxy.behaviour = 'down';
    const flushed = randomWrites(200, 0, 2 * MiB);
    await nbdWrite(uri, flushed, true);
    // Unflushed writes elsewhere, then the kill.
    const unflushed = nbdWrite(uri, randomWrites(400, 2 * MiB, size), false).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 50));
    p.child.kill('SIGKILL');
    await p.exited;
    await unflushed;
    expect(proxy.answers.created).toBe(0);

    proxy.behaviour = 'up';
    p = spawnAgent(image);
    await serving(p);
    await settled(p);
    expect(p.log()).toMatch(/disk needs a resync/);
    expect(p.log()).toMatch(/stopped uncleanly/);
    const model = Buffer.alloc(2 * MiB);
    for (const w of flushed) w.data.copy(model, w.offset);
    assertSameBytes(proxy.replay('d0', size).subarray(0, 2 * MiB), model, 'flushed region as replicated');
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
  }, 120_000); // several agent starts and settles: room for a loaded machine

  it('SIGTERM stops cleanly and resumes without resync; SIGKILL then restart converges on the disk bytes', async () => {
    const replica = path.join(dir, 'replica.img');
    let p = spawnAgent(replica);
    let uri = await serving(p);
    await settled(p);
    await nbdWrite(uri, randomWrites(300, 0, size), true);
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
    expect(p.log()).toMatch(/Stopped cleanly/);

    // Clean restart: no resync; the proxy is down while writes continue, then the agent is killed.
    p = spawnAgent(replica);
    uri = await serving(p);
    await settled(p);
    expect(p.log()).not.toMatch(/needs a resync/);
    proxy.behaviour = 'down';
    await nbdWrite(uri, randomWrites(300, 0, size), true);
    const inFlight = nbdWrite(uri, randomWrites(600, 0, size), false).catch(() => undefined);
    await new Promise((r) => setTimeout(r, 50));
    p.child.kill('SIGKILL');
    await p.exited;
    await inFlight;

    // The cloud copy as the proxy has it, for the resync to compare with.
    proxy.behaviour = 'up';
    fs.writeFileSync(replica, proxy.replay('d0', size));
    p = spawnAgent(replica);
    await serving(p);
    await settled(p);
    expect(p.log()).toMatch(/stopped uncleanly/);
    assertSameBytes(proxy.replay('d0', size), fs.readFileSync(image), 'replica after the restart');
    p.child.kill('SIGTERM');
    expect(await p.exited).toBe(0);
  }, 120_000); // several agent starts and settles: room for a loaded machine
});
