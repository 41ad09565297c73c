import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { startAzurite } from '../infra/local/azurite';
import { spawnLocalHost, type HostProcess } from '../infra/local/host-process';
import { generateEncryptionKey } from '../shared/envelope';
import type { ContainerClient } from '@azure/storage-blob';
import { SETTING } from '../shared/config';
import { StorageClients } from '../shared/storage';
import { createLogger } from '../shared/logger';
import {
  completeRecoveryPoint,
  ensureContainer,
  PAGE_WRITE_BYTES,
  recordArrival,
  registerMachine,
  replicationDepsFromSettings,
  seedBlob,
  type ReplicationDeps,
} from '../shared/replication';
import type { BenchResult } from './types';

// Recovery time: from the failover request to the target machine recorded with its disks
// materialised, through the local Functions host, the Durable engine and HTTP, beside the raw
// server-side copy of the very same snapshots measured in the same run on the same Azurite. The
// difference is the orchestration's overhead (HTTP, turns, activities, table writes, polling).

const MiB = 1024 * 1024;
const NEVER = '0 0 12 * * 3';
const root = path.resolve(__dirname, '..', __filename.endsWith('.js') ? '..' : '');

interface Machine {
  name: string;
  disks: { id: string; sizeBytes: number; snapshot: string }[];
}

/** Registers a machine, writes `bytesPerDisk` of data into each seed disk, and records point `p1`. */
async function protectedMachine(
  deps: ReplicationDeps,
  name: string,
  disks: number,
  bytesPerDisk: number,
): Promise<Machine> {
  const ids = Array.from({ length: disks }, (_, i) => `d${i}`);
  await registerMachine(deps, name, { disks: ids.map((id) => ({ id, sizeBytes: bytesPerDisk })) });
  const data = randomBytes(PAGE_WRITE_BYTES);
  const out: Machine = { name, disks: [] };
  for (const id of ids) {
    const blob = seedBlob(await ensureContainer(deps.seed), name, id);
    const writes: Promise<unknown>[] = [];
    for (let at = 0; at < bytesPerDisk; at += PAGE_WRITE_BYTES) {
      const n = Math.min(PAGE_WRITE_BYTES, bytesPerDisk - at);
      data.writeUInt32LE(at / 512, 0); // every piece differs
      writes.push(blob.uploadPages(Buffer.from(data.subarray(0, n)), at, n));
      if (writes.length >= 8) await Promise.all(writes.splice(0));
    }
    await Promise.all(writes);
    const { snapshot } = await blob.createSnapshot();
    await recordArrival(
      deps.tables,
      {
        machine: name,
        disk: id,
        markerId: 'p1',
        kind: 'app',
        tag: '',
        sourceTime: Date.now(),
        snapshot: snapshot!,
        epoch: 1,
        seq: 1,
      },
      new Date(),
    );
    out.disks.push({ id, sizeBytes: bytesPerDisk, snapshot: snapshot! });
  }
  await completeRecoveryPoint(deps.tables, name, 'p1', new Date());
  return out;
}

/** The raw reference: server-side copies of every disk's snapshot, all in parallel, in the same account. */
async function rawCopy(
  deps: ReplicationDeps,
  dest: ContainerClient,
  machines: Machine[],
  tag: string,
): Promise<number> {
  await ensureContainer(dest);
  const t0 = performance.now();
  await Promise.all(
    machines.flatMap((m) =>
      m.disks.map(async (d) => {
        const src = seedBlob(deps.seed, m.name, d.id).withSnapshot(d.snapshot);
        const poller = await dest
          .getPageBlobClient(`${tag}/${m.name}/${d.id}.img`)
          .beginCopyFromURL(src.url, { intervalInMs: 50 });
        await poller.pollUntilDone();
      }),
    ),
  );
  return (performance.now() - t0) / 1000;
}

async function waitForOperation(
  base: string,
  key: string,
  id: string,
): Promise<{ status: string; error?: string }> {
  for (;;) {
    const op = (await (
      await fetch(`${base}/operations/${id}`, { headers: { 'x-functions-key': key } })
    ).json()) as {
      status: string;
      error?: string;
    };
    if (['Completed', 'Failed', 'Terminated'].includes(op.status)) return op;
    await new Promise((r) => setTimeout(r, 25));
  }
}

export async function run(options: { quick: boolean }): Promise<BenchResult[]> {
  const folder = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-bench-recovery-'));
  const azurite = await startAzurite({ location: folder });
  let host: HostProcess | undefined;
  try {
    const key = `bench-${Date.now()}`;
    const settings: Record<string, string> = {
      AzureWebJobsStorage: azurite.connectionString,
      CacheStorage: azurite.connectionString,
      ReplicaStorage: azurite.connectionString,
      ServiceBusConnection: azurite.connectionString,
      ChangelogQueueName: 'changelog-ready',
      LIFEBOAT_ENCRYPTION_KEYS: generateEncryptionKey('bench'),
      LIFEBOAT_RETENTION_SCHEDULE: NEVER,
      LIFEBOAT_RPO_SCHEDULE: NEVER,
      LIFEBOAT_LOG_LEVEL: 'warn',
    };
    const previous = process.env.LIFEBOAT_LOG_LEVEL;
    process.env.LIFEBOAT_LOG_LEVEL = 'warn';
    const deps = replicationDepsFromSettings(settings, createLogger('bench'));
    if (previous === undefined) delete process.env.LIFEBOAT_LOG_LEVEL;
    else process.env.LIFEBOAT_LOG_LEVEL = previous;
    const rawCopies = new StorageClients(SETTING.replicaStorage, settings)
      .blobService()
      .getContainerClient('bench-raw-copies');
    const compiled = __filename.endsWith('.js');
    host = await spawnLocalHost(
      {
        appRoot: root,
        entryPoint: compiled
          ? path.join(root, 'dist/functions/index.js')
          : path.join(root, 'functions/index.ts'),
        settings,
        port: 0,
        functionKey: key,
      },
      () => undefined,
    );
    const base = `http://127.0.0.1:${host.port}/api`;
    const post = async (route: string, body: unknown) => {
      const res = await fetch(`${base}/${route}`, {
        method: 'POST',
        headers: { 'x-functions-key': key, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
      const json = (await res.json()) as { operationId: string; error?: { message: string } };
      if (res.status !== 202) throw new Error(`POST ${route} answered ${res.status}: ${json.error?.message}`);
      return json.operationId;
    };
    const results: BenchResult[] = [];

    // One machine with 1 GiB and 8 GiB written (quick: 64 MiB), over two disks.
    for (const written of options.quick ? [64 * MiB] : [1024 * MiB, 8192 * MiB]) {
      const single = await protectedMachine(deps, `bench-one-${written / MiB}`, 2, written / 2);
      const rawOne = await rawCopy(deps, rawCopies, [single], `one-${written / MiB}`);
      const t0 = performance.now();
      const op = await waitForOperation(
        base,
        key,
        await post(`machines/${single.name}/failover`, { recoveryPoint: 'p1', test: true }),
      );
      const oneSeconds = (performance.now() - t0) / 1000;
      if (op.status !== 'Completed') throw new Error(`the failover ended ${op.status}: ${op.error}`);
      const label = written >= 1024 * MiB ? `${written / (1024 * MiB)} GiB` : `${written / MiB} MiB`;
      console.log(
        `  one machine (${label}): recovery ${oneSeconds.toFixed(2)} s, raw copy ${rawOne.toFixed(2)} s, orchestration overhead ${(oneSeconds - rawOne).toFixed(2)} s`,
      );
      results.push({
        name: `recovery time, 1 machine, ${label} written (2 disks)`,
        value: oneSeconds,
        unit: 's',
        reference: 'raw server-side copy of the same snapshots',
        referenceValue: rawOne,
        ratio: rawOne / oneSeconds,
      });
    }

    // A plan of 20 machines (quick: 4) in two groups, 16 MiB each (quick: 8 MiB).
    const count = options.quick ? 4 : 20;
    const each = options.quick ? 8 * MiB : 16 * MiB;
    const machines: Machine[] = [];
    for (let i = 0; i < count; i++) machines.push(await protectedMachine(deps, `bench-plan-${i}`, 1, each));
    const half = Math.ceil(count / 2);
    const groups = [
      { name: 'first', machines: machines.slice(0, half).map((m) => m.name) },
      { name: 'second', machines: machines.slice(half).map((m) => m.name) },
    ];
    const put = await fetch(`${base}/plans/bench`, {
      method: 'PUT',
      headers: { 'x-functions-key': key, 'content-type': 'application/json' },
      body: JSON.stringify({ recoveryPoint: 'p1', groups }),
    });
    if (!put.ok) throw new Error(`PUT plan answered ${put.status}`);
    const rawPlan =
      (await rawCopy(deps, rawCopies, machines.slice(0, half), 'plan-a')) +
      (await rawCopy(deps, rawCopies, machines.slice(half), 'plan-b'));
    const p0 = performance.now();
    const planOp = await waitForOperation(
      base,
      key,
      await post('plans/bench/failover', { test: true, onFailure: 'abort' }),
    );
    const planSeconds = (performance.now() - p0) / 1000;
    if (planOp.status !== 'Completed') throw new Error(`the plan ended ${planOp.status}: ${planOp.error}`);
    console.log(
      `  plan of ${count} machines: recovery ${planSeconds.toFixed(2)} s, raw copy ${rawPlan.toFixed(2)} s, orchestration overhead ${(planSeconds - rawPlan).toFixed(2)} s (${((planSeconds - rawPlan) / count).toFixed(3)} s per machine)`,
    );
    results.push({
      name: `recovery time, plan of ${count} machines (2 groups, ${each / MiB} MiB each)`,
      value: planSeconds,
      unit: 's',
      reference: 'raw server-side copies of the same snapshots, group by group',
      referenceValue: rawPlan,
      ratio: rawPlan / planSeconds,
    });
    return results;
  } finally {
    await host?.stop();
    await azurite.stop();
    await fs.rm(folder, { recursive: true, force: true });
  }
}
