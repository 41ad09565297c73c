import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { blockChecksum } from '../../agent/mobility/sync';
import { FailoverMachineExport } from '../../agent/target/failover-machine';
import type { HostProcess } from '../../infra/local/host-process';
import {
  FAILOVER_TABLES,
  failoverDepsFromSettings,
  failoverDiskName,
  readRecord,
} from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { pendingResyncCommands } from '../../shared/reprotect';
import { readEntity, readRange, seedBlob, TABLES, type DiskEntity } from '../../shared/replication';
import { waitFor } from '../helpers/host';
import { runTool } from '../agent/mobility/nbd-harness';
import {
  apiClient,
  queueSender,
  repoRoot,
  ship,
  SourceMachine,
  testStack,
  waitForOperation,
  waitForPoint,
  type Api,
  type Operation,
} from '../shared/failover/helpers';
import { quietLogger, testDeps } from '../shared/replication/helpers';

// The whole way home, through HTTP, the target CLI and the NBD export: protect → write → failover
// → commit → write in the failed-over machine over NBD (nbdsh) → reprotect (the target killed and
// restarted mid-way) → failback while a writer is still writing → forward protection resumes in a
// new epoch without a full copy. At each step every disk's bytes equal an independent model.

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 64 * KiB;
const suffix = randomUUID().slice(0, 6);
const t0 = Date.now();
const step = (what: string) =>
  process.env.TEST_STEPS ? console.error(`${((Date.now() - t0) / 1000).toFixed(1)} s: ${what}`) : undefined;

/** Replays an nbdsh write log: (1 off n data) = attempted write, (3) = the attempt was acknowledged. */
function replayLog(file: string, model: Buffer): { acked: number; pending?: { off: number; data: Buffer } } {
  const log = fs.existsSync(file) ? fs.readFileSync(file) : Buffer.alloc(0);
  let pending: { off: number; data: Buffer } | undefined;
  let acked = 0;
  for (let at = 0; at + 13 <= log.length;) {
    const kind = log.readUInt8(at);
    const off = Number(log.readBigUInt64LE(at + 1));
    const n = log.readUInt32LE(at + 9);
    at += 13;
    if (kind === 1) {
      if (at + n > log.length) break; // torn attempt record: never acknowledged
      pending = { off, data: log.subarray(at, at + n) };
      at += n;
    } else if (kind === 2) {
      model.fill(0, off, off + n);
      acked++;
    } else if (kind === 3 && pending) {
      pending.data.copy(model, pending.off);
      pending = undefined;
      acked++;
    }
  }
  return { acked, ...(pending ? { pending } : {}) };
}

/** An nbdsh script: `count` writes (and some zeroes) or, with count 0, writes until disconnected. */
function writerScript(
  dir: string,
  name: string,
  seed: number,
  count: number,
): { script: string; log: string } {
  const script = path.join(dir, `${name}.py`);
  const log = path.join(dir, `${name}.log`);
  fs.writeFileSync(
    script,
    `
import random, struct, time
random.seed(${seed})
out = open(${JSON.stringify(log)}, 'ab')
size = h.get_size()
i = 0
try:
    while ${count} == 0 or i < ${count}:
        i += 1
        if i % 7 == 0:
            n = random.randint(1, 32) * 512
            off = random.randrange(0, (size - n) // 512) * 512
            h.zero(n, off)
            out.write(struct.pack('<BQI', 2, off, n)); out.flush()
            continue
        n = random.randint(1, 24) * 512
        off = random.randrange(0, (size - n) // 512) * 512
        data = random.randbytes(n)
        out.write(struct.pack('<BQI', 1, off, n) + data); out.flush()
        h.pwrite(data, off)
        out.write(struct.pack('<BQI', 3, 0, 0)); out.flush()
        if ${count} == 0:
            time.sleep(0.01)
    h.flush()
except Exception:
    pass
out.close()
`,
  );
  return { script, log };
}

describe('reprotect and failback through the local host', () => {
  const stack = testStack(connection, 'reprotect');
  const replication = testDeps(connection);
  const failover = failoverDepsFromSettings(stack.settings, { replication, log: quietLogger() });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-rpfb-'));
  let host: HostProcess;
  let api: Api;
  let sender: MessageSender;
  let target: ChildProcess | undefined;
  let exp: FailoverMachineExport | undefined;
  const disks = [
    { id: 'd0', sizeBytes: 1 * MiB },
    { id: 'd1', sizeBytes: 512 * KiB },
  ];
  const sitePath = (disk: string) => path.join(dir, `site-${disk}.img`);

  beforeAll(async () => {
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    sender = queueSender(stack);
  });

  afterAll(async () => {
    target?.kill('SIGKILL');
    await exp?.stop().catch(() => undefined);
    await sender?.close();
    await Promise.all(stack.hosts.map((h) => h.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  function startTarget(machine: string): ChildProcess {
    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        path.join(repoRoot, 'agent/cli.ts'),
        'target',
        'reprotect',
        '--machine',
        machine,
        ...disks.flatMap((d) => ['--disk', `${d.id}=${sitePath(d.id)}`]),
        '--state-dir',
        path.join(dir, 'target-state'),
        '--poll-ms',
        '200',
      ],
      {
        env: { ...process.env, ...stack.settings, LIFEBOAT_LOG_LEVEL: 'warn' },
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    child.stdout!.on('data', (b: Buffer) =>
      process.env.TEST_HOST_LOG ? process.stderr.write(b) : undefined,
    );
    child.stderr!.on('data', (b: Buffer) =>
      process.env.TEST_HOST_LOG ? process.stderr.write(b) : undefined,
    );
    return child;
  }

  async function killTarget(): Promise<void> {
    const child = target!;
    target = undefined;
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await gone;
  }

  const op = (id: string, until: (op: Operation) => boolean, timeoutMs = 45_000) =>
    waitForOperation(api, id, until, timeoutMs);
  const failoverBlob = (machine: string, disk: string, failoverId: string) =>
    failover.failoverDisks.getPageBlobClient(failoverDiskName(machine, disk, failoverId));
  const differingBlocks = (a: Buffer, b: Buffer) => {
    let n = 0;
    for (let at = 0; at < a.length; at += BLOCK)
      if (!a.subarray(at, at + BLOCK).equals(b.subarray(at, at + BLOCK))) n++;
    return n;
  };

  it('protect → failover → commit → NBD writes → reprotect (target killed and restarted) → failback under writes → forward protection resumes', async () => {
    const machine = `home-${suffix}`;
    const source = new SourceMachine(machine, disks, 21);
    expect((await api('PUT', `machines/${machine}`, { disks })).status).toBe(201);

    // 1. Protect: the seed equals the source at m1. Writes after m1 reach the site disk only.
    source.randomWrites(60, 32 * KiB);
    source.marker('m1', 'crash');
    await ship(replication, sender, source.cut());
    await waitForPoint(api, machine, 'm1');
    for (const d of disks) {
      expect(
        (await readRange(seedBlob(replication.seed, machine, d.id), 0, d.sizeBytes)).equals(
          source.markers.get('m1')!.images.get(d.id)!,
        ),
      ).toBe(true);
    }
    source.randomWrites(20, 32 * KiB);
    const site = new Map(disks.map((d) => [d.id, Buffer.from(source.images.get(d.id)!)]));
    for (const d of disks) fs.writeFileSync(sitePath(d.id), site.get(d.id)!);

    step('failover');
    // 2. Failover to m1 and commit: the failover disks equal m1.
    const fo = await api('POST', `machines/${machine}/failover`, { recoveryPoint: 'm1' });
    expect(fo.status, JSON.stringify(fo.body)).toBe(202);
    const failoverId = fo.body.failoverId as string;
    expect(
      (await op(fo.body.operationId, (o) => o.status !== 'Running' && o.status !== 'Pending')).status,
    ).toBe('Completed');
    const early = await api('POST', `machines/${machine}/reprotect`);
    expect(early.status).toBe(409);
    expect(early.body.error.code).toBe('FailoverNotCommitted');
    const commit = await api('POST', `machines/${machine}/commit`);
    expect(
      (await op(commit.body.operationId, (o) => o.status !== 'Running' && o.status !== 'Pending')).status,
    ).toBe('Completed');
    const cloud = new Map(disks.map((d) => [d.id, Buffer.from(source.markers.get('m1')!.images.get(d.id)!)]));
    for (const d of disks)
      expect(
        (await readRange(failoverBlob(machine, d.id, failoverId), 0, d.sizeBytes)).equals(cloud.get(d.id)!),
      ).toBe(true);

    step('nbd writes');
    // 3. The failed-over machine runs: writes through its NBD export.
    exp = await FailoverMachineExport.start({
      tables: failover.tables,
      failoverDisks: failover.failoverDisks,
      machine,
      failoverId,
      pollMs: 100,
      logger: quietLogger(),
    });
    const uri = (disk: string) => `nbd://127.0.0.1:${exp!.address.port}/${disk}`;
    const nbdWrites = async (name: string, seed: number, count: number) => {
      for (const [i, d] of disks.entries()) {
        const w = writerScript(dir, `${name}-${d.id}`, seed + i, count);
        await runTool('nbdsh', ['-u', uri(d.id), '-c', `exec(open(${JSON.stringify(w.script)}).read())`]);
        expect(replayLog(w.log, cloud.get(d.id)!).pending).toBeUndefined();
      }
    };
    await nbdWrites('w1', 100, 40);
    for (const d of disks)
      expect(
        (await readRange(failoverBlob(machine, d.id, failoverId), 0, d.sizeBytes)).equals(cloud.get(d.id)!),
      ).toBe(true);

    step('reprotect');
    // 4. Reprotect: the first pass ships only the blocks where the site differs.
    expect((await api('POST', `machines/${machine}/failback`)).body.error.code).toBe('NotReprotected');
    target = startTarget(machine);
    const rp = await api('POST', `machines/${machine}/reprotect`, { intervalSeconds: 1 });
    expect(rp.status, JSON.stringify(rp.body)).toBe(202);
    const reprotectId = rp.body.operationId as string;
    expect((await api('POST', `machines/${machine}/reprotect`)).body.error.code).toBe('OperationInProgress');
    expect((await api('POST', `machines/${machine}/resync`)).status).toBe(409);
    const protecting = await op(
      reprotectId,
      (o) => o.progress?.lastAppliedPass >= 1 || o.status === 'Failed',
    );
    expect(protecting.status, protecting.error).toBe('Running');
    for (const d of disks) {
      const first = protecting.progress.firstPass.find((p: { disk: string }) => p.disk === d.id);
      expect(first.changedBytes, `first pass of ${d.id}`).toBe(
        differingBlocks(site.get(d.id)!, cloud.get(d.id)!) * BLOCK,
      );
    }
    for (const d of disks)
      expect(
        fs.readFileSync(sitePath(d.id)).equals(cloud.get(d.id)!),
        `site ${d.id} after the first pass`,
      ).toBe(true);
    expect((await readRecord(failover.tables, machine, failoverId))?.state).toBe('reprotected');

    step('target killed');
    // 5. The target dies; the machine keeps writing; a pass is shipped but waits; the target comes
    //    back and resumes from its cursor.
    await killTarget();
    await nbdWrites('w2', 200, 30);
    // The pass after the one under way when the writes ended snapshots all of them.
    const after = ((await api('GET', `operations/${reprotectId}`)).body.progress.pass as number) + 1;
    const stuck = await op(reprotectId, (o) => o.progress?.state === 'waiting-for-target');
    expect(
      stuck.progress.target.some(
        (t: { appliedSeq: number; targetSeq: number }) => t.appliedSeq < t.targetSeq,
      ),
    ).toBe(true);
    target = startTarget(machine);
    await op(reprotectId, (o) => o.progress?.lastAppliedPass >= after);
    for (const d of disks)
      expect(fs.readFileSync(sitePath(d.id)).equals(cloud.get(d.id)!), `site ${d.id} after the restart`).toBe(
        true,
      );

    step('failback');
    // 6. Failback while writers are still writing: every write acknowledged before the stop comes home.
    const writers = disks.map((d, i) => {
      const w = writerScript(dir, `w3-${d.id}`, 300 + i, 0);
      const child = spawn(
        'nbdsh',
        ['-u', uri(d.id), '-c', `exec(open(${JSON.stringify(w.script)}).read())`],
        {
          stdio: ['ignore', 'ignore', 'pipe'],
          env: { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH ?? ''}`, LC_ALL: 'C' },
        },
      );
      child.stderr!.on('data', (b: Buffer) =>
        process.env.TEST_HOST_LOG ? process.stderr.write(b) : undefined,
      );
      return { disk: d.id, log: w.log, done: new Promise((r) => child.once('exit', r)) };
    });
    await waitFor(
      () => (writers.every((w) => fs.existsSync(w.log) && fs.statSync(w.log).size > 4096) ? true : undefined),
      'the writers to write',
    );
    const fb = await api('POST', `machines/${machine}/failback`, { waitSeconds: 60 });
    expect(fb.status, JSON.stringify(fb.body)).toBe(202);
    expect((await api('POST', `machines/${machine}/failback`)).status).toBe(409);
    await Promise.all(writers.map((w) => w.done));
    step('writers gone');
    const maybe = new Map<string, { off: number; data: Buffer }>();
    for (const w of writers) {
      const { acked, pending } = replayLog(w.log, cloud.get(w.disk)!);
      expect(acked).toBeGreaterThan(0);
      if (pending) maybe.set(w.disk, pending);
    }

    step('forward resync');
    // The agent's side of forward protection: pick up the command, compare with the cloud's
    // checksums (the seed is now the final snapshot: nothing differs), ship a marker in the new epoch.
    const command = await waitFor(
      async () => {
        const failed = await api('GET', `operations/${fb.body.operationId}`);
        if (failed.body.status === 'Failed') throw new Error(`the failback failed: ${failed.body.error}`);
        return (await pendingResyncCommands(failover.tables, machine))[0];
      },
      'the forward resync command',
      45_000,
    );
    expect(command.disks).toEqual(disks.map((d) => ({ disk: d.id, epoch: 2 })));
    const home = new SourceMachine(machine, disks, 22, 2);
    for (const d of disks) {
      const bytes = fs.readFileSync(sitePath(d.id));
      // A write in flight at the stop may or may not have landed; the site must hold one of the two.
      if (!bytes.equals(cloud.get(d.id)!) && maybe.has(d.id))
        maybe.get(d.id)!.data.copy(cloud.get(d.id)!, maybe.get(d.id)!.off);
      expect(bytes.equals(cloud.get(d.id)!), `site ${d.id} after failback`).toBe(true);
      bytes.copy(home.images.get(d.id)!);
      const res = await api('GET', `machines/${machine}/disks/${d.id}/checksums?blockSize=${BLOCK}`);
      expect(res.status).toBe(200);
      const theirs = res.body.blocks as string[];
      const differing = theirs.filter(
        (sum, i) => blockChecksum(bytes.subarray(i * BLOCK, (i + 1) * BLOCK)).toString('hex') !== sum,
      );
      expect(differing, `blocks of ${d.id} to resync`).toEqual([]);
    }
    home.marker('h1', 'crash');
    await ship(replication, sender, home.cut());
    const done = await op(
      fb.body.operationId,
      (o) => o.status !== 'Running' && o.status !== 'Pending',
      60_000,
    );
    expect(done.status, done.error).toBe('Completed');
    expect(done.output).toMatchObject({
      state: 'failed-back',
      siteReady: true,
      forwardProtection: 'protected',
      epochs: { d0: 2, d1: 2 },
    });
    expect(
      (await op(reprotectId, (o) => o.status !== 'Running' && o.status !== 'Pending')).output,
    ).toMatchObject({ state: 'handed-over', failbackOperationId: fb.body.operationId });
    expect((await readRecord(failover.tables, machine, failoverId))?.state).toBe('failed-back');
    for (const d of disks) {
      const row = await readEntity<DiskEntity>(await replication.tables.get(TABLES.disks), machine, d.id);
      expect([row?.epoch, row?.state]).toEqual([2, 'protected']);
      expect(
        (await readRange(seedBlob(replication.seed, machine, d.id), 0, d.sizeBytes)).equals(cloud.get(d.id)!),
      ).toBe(true);
      expect(await failoverBlob(machine, d.id, failoverId).exists()).toBe(false);
    }
    expect(
      await readEntity(await failover.tables.get(FAILOVER_TABLES.targets), machine, failoverId),
    ).toBeUndefined();
    await exp.stopped;

    step('forward protection');
    // 7. Forward protection goes on from the site: new writes, a new point, the seed equals the model.
    home.randomWrites(40, 32 * KiB);
    home.marker('h2', 'app');
    await ship(replication, sender, home.cut());
    await waitForPoint(api, machine, 'h2');
    for (const d of disks) {
      expect(
        (await readRange(seedBlob(replication.seed, machine, d.id), 0, d.sizeBytes)).equals(
          home.markers.get('h2')!.images.get(d.id)!,
        ),
      ).toBe(true);
    }
    // The machine can fail over again: the old failover no longer holds it.
    expect((await api('POST', `machines/${machine}/reprotect`)).body.error.code).toBe('NotFailedOver');
    step('done');
  }, 120_000);
});
