import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { QueueServiceClient } from '@azure/storage-queue';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { spawnLocalHost, type HostProcess } from '../../infra/local/host-process';
import { createMessageSender } from '../../shared/messaging';
import { listRecoveryPoints, seedBlob, type MachineStatus } from '../../shared/replication';
import { waitFor } from '../helpers/host';
import {
  generateWorkload,
  readWhole,
  rng,
  shuffle,
  testDeps,
  testSettings,
  uploadSegment,
} from '../shared/replication/helpers';
import { isolatedAppRoot } from '../shared/failover/helpers';

const root = path.resolve(__dirname, '../..');
// A task hub of its own: no other test file's host takes this file's orchestrations.
const appRoot = isolatedAppRoot(`replication${randomUUID().slice(0, 8)}`);
const key = `key-${randomUUID()}`;
const connection = inject('azuriteConnectionString');
const suffix = randomUUID().slice(0, 8);
const queue = `changelog-oracle-${suffix}`;
const MiB = 1024 * 1024;
// Wednesdays at noon: does not fire during the test (the local host cannot wait longer than 24.8 days).
const NEVER = '0 0 12 * * 3';

describe('the oracle: random workload → segments → encrypted blobs → queue → apply in the local host', () => {
  const settings = testSettings(connection, queue, {
    LIFEBOAT_RETENTION_SCHEDULE: NEVER,
    LIFEBOAT_RPO_SCHEDULE: NEVER,
    LIFEBOAT_APPLY_LEASE_SECONDS: '15',
    // A short budget so runs end mid-stream and re-enqueue themselves.
    LIFEBOAT_APPLY_BUDGET_SECONDS: '2',
    LIFEBOAT_LOG_LEVEL: 'warn',
  });
  const hosts: HostProcess[] = [];
  const start = async () => {
    const host = await spawnLocalHost(
      {
        appRoot,
        entryPoint: path.join(root, 'functions/index.ts'),
        settings,
        port: 0,
        functionKey: key,
        lockSeconds: 5,
        maxDeliveryCount: 20,
      },
      (line) => (process.env.TEST_HOST_LOG ? process.stderr.write(`${line}\n`) : undefined),
    );
    hosts.push(host);
    return host;
  };
  afterAll(async () => {
    await Promise.all(hosts.map((h) => h.stop()));
  });

  it('recovery points equal the model at their markers, and seeds the model at the end, despite duplicates, reordering, delays, a killed host and racing hosts', async () => {
    const deps = testDeps(connection);
    const machine = `oracle-${suffix}`;
    const disks = [
      { id: 'd0', sizeBytes: 2 * MiB },
      { id: 'd1', sizeBytes: 2 * MiB },
    ];
    const first = await start();
    const put = await fetch(`http://127.0.0.1:${first.port}/api/machines/${machine}`, {
      method: 'PUT',
      headers: { 'x-functions-key': key, 'content-type': 'application/json' },
      body: JSON.stringify({ disks, policy: { crashConsistentIntervalSeconds: 10 } }),
    });
    expect(put.status).toBe(201);

    const workload = generateWorkload({
      machine,
      disks,
      ops: 2500,
      seed: 2026,
      markerEvery: 70,
      recordsPerSegment: 25,
      maxWriteBytes: 256 * 1024,
    });
    const random = rng(99);
    // Interleave the disks, and reorder uploads within windows of five per disk.
    const perDisk = [...workload.segments.values()].map((list) =>
      list.flatMap((_, i) => (i % 5 === 0 ? shuffle(list.slice(i, i + 5), random) : [])),
    );
    const order = shuffle(
      perDisk.flatMap((list, d) => list.map((s, i) => ({ s, at: i + random() * 3, d }))),
      random,
    )
      .sort((a, b) => a.at - b.at)
      .map((x) => x.s);
    const sender = createMessageSender(settings, 'ServiceBusConnection', queue);
    const status = async (port: number): Promise<MachineStatus> =>
      (
        await fetch(`http://127.0.0.1:${port}/api/machines/${machine}`, {
          headers: { 'x-functions-key': key },
        })
      ).json() as Promise<MachineStatus>;

    const t0 = Date.now();
    const mark = (what: string) =>
      process.env.TEST_TRACE && process.stderr.write(`${((Date.now() - t0) / 1000).toFixed(1)}s ${what}\n`);
    let host = first;
    let killed = false;
    for (const [i, segment] of order.entries()) {
      await uploadSegment(deps, segment);
      const body = {
        machine,
        disk: segment.header.disk,
        epoch: segment.header.epoch,
        seq: segment.header.seq,
      };
      const copies = 1 + Math.floor(random() * 3);
      for (let c = 0; c < copies; c++)
        await sender.send({ body, delaySeconds: random() < 0.2 ? 1 + Math.floor(random() * 3) : undefined });
      if (!killed && i >= order.length / 3) {
        // Kill the host while it is applying, then run two hosts on the same queue.
        await waitFor(
          async () => ((await status(host.port)).disks.some((d) => d.appliedSeq > 0) ? true : undefined),
          'apply to start',
        );
        mark('killing');
        await host.kill();
        killed = true;
        host = await start();
        await start();
      }
    }
    await sender.close();
    mark('uploaded');

    const counts = new Map([...workload.segments].map(([d, list]) => [d, list.length]));
    await waitFor(
      async () => {
        const s = await status(host.port);
        return s.disks.every((d) => d.appliedSeq === counts.get(d.id)) ? s : undefined;
      },
      'both disks to apply every segment',
      50_000,
    );

    mark('applied');
    for (const d of disks) {
      const seed = await readWhole(seedBlob(deps.seed, machine, d.id), d.sizeBytes);
      expect(seed.equals(workload.final.get(d.id)!), `seed ${d.id}`).toBe(true);
    }
    const points = (await listRecoveryPoints(deps.tables, machine, { top: 1000 })).value;
    expect(points.map((p) => p.id)).toEqual(workload.markers.map((m) => m.id).reverse());
    expect(workload.markers.length).toBeGreaterThan(20);
    for (const point of points) {
      const marker = workload.markers.find((m) => m.id === point.id)!;
      expect(point.disks.map((d) => d.id).sort()).toEqual(['d0', 'd1']);
      for (const { id, snapshot } of point.disks) {
        const bytes = await readWhole(seedBlob(deps.seed, machine, id).withSnapshot(snapshot), 2 * MiB);
        expect(bytes.equals(marker.images.get(id)!), `${id} at ${point.id}`).toBe(true);
      }
    }
    // No message was poisoned.
    const poison = QueueServiceClient.fromConnectionString(connection).getQueueClient(`${queue}-poison`);
    const peeked = await poison
      .peekMessages({ numberOfMessages: 1 })
      .catch(() => ({ peekedMessageItems: [] }));
    expect(peeked.peekedMessageItems).toEqual([]);
  }, 120_000);
});
