import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { NbdClient } from '../../agent/demo/nbd-client';
import { MachineAgent } from '../../agent/mobility/agent';
import { ApiChecksums, ApiDiskEpochs } from '../../agent/mobility/remote-checksums';
import { startProxy, type RunningProxy } from '../../agent/proxy/proxy';
import type { HostProcess } from '../../infra/local/host-process';
import { FailoverTables } from '../../shared/failover/tables';
import { readRange, SEED_CONTAINER, seedBlob } from '../../shared/replication';
import { readResyncCommand } from '../../shared/reprotect/resync';
import { StorageClients } from '../../shared/storage';
import { waitFor } from '../helpers/host';
import { rng } from '../shared/replication/helpers';
import { apiClient, testStack, waitForOperation, type Api } from '../shared/failover/helpers';
import { quietLogger } from './proxy/helpers';

// The cloud's resync command carried out by the real agent through the real proxy and the local
// host: after the seed disk was made to differ from the source (garbage written into it
// server-side, in blocks the agent never wrote), POST /resync issues the command; the agent moves
// the disk to the new epoch, waits until apply is there, compares checksums through the API,
// ships exactly the differing 64 KiB blocks, reports progress, cuts a marker and answers. The
// seed then equals the source image byte for byte, and recovery points resume in the new epoch.

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const MiB = 1024 * 1024;
const BLOCK = 64 * KiB;
const SIZE = 4 * MiB;

describe('the resync command through the real agent and proxy', () => {
  const stack = testStack(connection, 'resynccmd');
  const machine = `rs-${Math.random().toString(36).slice(2, 8)}`;
  const work = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-resync-cmd-'));
  const image = path.join(work, 'd0.img');
  const random = rng(11);
  let host: HostProcess;
  let api: Api;
  let proxy: RunningProxy;
  let agent: MachineAgent;
  const seed = () =>
    seedBlob(
      new StorageClients('ReplicaStorage', stack.settings).blobService().getContainerClient(SEED_CONTAINER),
      machine,
      'd0',
    );

  function randomBytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE((random() * 2 ** 32) >>> 0, i);
    return b;
  }

  const diskRow = async () =>
    (
      (await api('GET', `machines/${machine}`)).body as {
        disks: { id: string; epoch: number; state: string }[];
      }
    ).disks[0];

  /** Cuts a marker and waits until its recovery point exists. */
  async function point(): Promise<string> {
    const marker = await agent.cutMarker('crash');
    expect(marker).toBeDefined();
    await waitFor(async () => {
      const res = await api('GET', `machines/${machine}/recovery-points`);
      return (res.body.value as { id: string }[]).some((p) => p.id === marker!.id) ? true : undefined;
    }, `recovery point ${marker!.id}`);
    return marker!.id;
  }

  beforeAll(async () => {
    const source = Buffer.alloc(SIZE);
    randomBytes(MiB).copy(source, 0); // the first MiB data, the rest zeros
    writeFileSync(image, source);
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    const registered = await api('PUT', `machines/${machine}`, { disks: [{ id: 'd0', sizeBytes: SIZE }] });
    expect(registered.status, JSON.stringify(registered.body)).toBe(201);
    proxy = await startProxy({
      spoolDir: path.join(work, 'spool'),
      host: '127.0.0.1',
      port: 0,
      tls: 'none',
      settings: stack.settings,
      logger: quietLogger,
      retry: { baseMs: 100, maxMs: 1000 },
    });
    const apiUrl = `http://127.0.0.1:${host.port}/api`;
    agent = new MachineAgent({
      machine,
      disks: [{ id: 'd0', path: image }],
      journalDir: path.join(work, 'agent'),
      proxy: { url: proxy.url, credential: registered.body.credential },
      nbd: { port: 0, host: '127.0.0.1' },
      crashIntervalSeconds: 0,
      commandPollMs: 300,
      remoteChecksums: (disk) => new ApiChecksums({ apiUrl, key: stack.key, machine, disk }),
      cloud: new ApiDiskEpochs({ apiUrl, key: stack.key, machine }),
      segment: { maxSegmentAgeMs: 200 },
      retry: { baseMs: 100, maxMs: 1000 },
      logger: quietLogger,
    });
    await agent.start();
    await agent.settled(30_000); // initial sync against the (all-zero) seed
    await point();
  }, 60_000);

  afterAll(async () => {
    await agent?.stop(); // lets the test's NBD client go
    await proxy?.stop();
    await Promise.all(stack.hosts.map((h) => h.stop()));
  });

  it('moves the disk to a new epoch, ships exactly the differing blocks, and recovery points resume', async () => {
    // Writes through NBD, replicated in epoch 0.
    const nbd = await NbdClient.connect(agent.nbd!.host, agent.nbd!.port, 'd0');
    for (let i = 0; i < 20; i++) {
      const sectors = 1 + Math.floor(random() * 32);
      const offset = Math.floor(random() * (SIZE / 512 - sectors)) * 512;
      await nbd.write(offset, randomBytes(sectors * 512));
    }
    await point();
    expect((await readRange(seed(), 0, SIZE)).equals(readFileSync(image))).toBe(true);

    // The seed made to differ server-side, in blocks the source has data in and in zero blocks.
    const damaged = [2, 9, 30, 47, 63];
    for (const b of damaged) await seed().uploadPages(randomBytes(BLOCK), b * BLOCK, BLOCK);
    // A write that reaches the cloud in the old epoch while the resync is asked for.
    await nbd.write(5 * BLOCK, randomBytes(4 * KiB));

    const started = await api('POST', `machines/${machine}/resync`, { waitSeconds: 60 });
    expect(started.status, JSON.stringify(started.body)).toBe(202);
    const { operationId } = started.body as { operationId: string };
    // Writes while the agent resyncs (into damaged blocks, which differ either way, so the count
    // below does not depend on when they were applied).
    for (let i = 0; i < 10; i++)
      await nbd.write(damaged[i % damaged.length] * BLOCK + (i % 8) * 8 * KiB, randomBytes(4 * KiB));
    const op = await waitForOperation(api, operationId, undefined, 45_000);
    expect(op.status, op.error ?? JSON.stringify(op.progress)).toBe('Completed');
    expect(op.progress).toMatchObject({ percent: 100, bytesCompared: SIZE });

    // The command, answered through the proxy with the agent's progress.
    const command = await readResyncCommand(
      new FailoverTables(new StorageClients('ReplicaStorage', stack.settings)),
      machine,
      operationId,
    );
    expect(command?.state).toBe('done');
    expect(command?.disks).toEqual([{ disk: 'd0', epoch: 1 }]);
    // Shipped: exactly the damaged blocks (the writes since were replicated as ordinary writes).
    expect(command?.progress?.d0).toEqual({ comparedBytes: SIZE, shippedBytes: damaged.length * BLOCK });
    expect(agent.status().lastCommand).toMatchObject({
      id: command!.id,
      type: 'resync',
      result: { state: 'done' },
    });
    const status = agent.status().disks[0];
    expect([status.epoch, status.mode]).toEqual([1, 'data']);

    // Recovery points resume in epoch 1, and the seed is the source image.
    await nbd.write(100 * 512, randomBytes(4 * KiB));
    await point(); // a recovery point of epoch 1 (the disk row is there, protected)
    const row = await diskRow();
    expect([row.epoch, row.state]).toEqual([1, 'protected']);
    expect((await readRange(seed(), 0, SIZE)).equals(readFileSync(image))).toBe(true);
  }, 60_000);
});
