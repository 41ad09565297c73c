import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { NbdClient } from '../../agent/demo/nbd-client';
import { MachineAgent } from '../../agent/mobility/agent';
import { startProxy, type RunningProxy } from '../../agent/proxy/proxy';
import type { HostProcess } from '../../infra/local/host-process';
import { applyRecordsToImage } from '../../shared/disk-model';
import { CHANGELOG_CONTAINER, keyRingFromSettings, openEnvelope } from '../../shared/envelope';
import { FAILOVER_DISKS_CONTAINER, failoverDiskName } from '../../shared/failover';
import { readCommand } from '../../shared/failover/commands';
import { FailoverTables } from '../../shared/failover/tables';
import { readRange } from '../../shared/replication';
import { decodeSegment } from '../../shared/segment';
import { StorageClients } from '../../shared/storage';
import { waitFor } from '../helpers/host';
import { rng } from '../shared/replication/helpers';
import { apiClient, testStack, waitForOperation, type Api } from '../shared/failover/helpers';
import { quietLogger } from './proxy/helpers';

// Planned failover with the real site side: the agent (MachineAgent over NBD) ships to the real
// proxy, the local host applies, a planned failover issues the quiesce command, the proxy serves
// it, the agent holds writes, cuts the final marker with the command's id and ships it, and the
// failover disks hold every write the agent acknowledged — compared with the source images and
// an independent model of the acknowledged writes. The cache's segments, decrypted and replayed,
// give the source images too.

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const MiB = 1024 * 1024;

describe('planned failover through the real agent and proxy', () => {
  const stack = testStack(connection, 'planned');
  const machine = `pf-${Math.random().toString(36).slice(2, 8)}`;
  const disks = [
    { id: 'd0', sizeBytes: 2 * MiB },
    { id: 'd1', sizeBytes: 1 * MiB },
  ];
  const work = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-planned-'));
  const hookLog = path.join(work, 'hooks.log');
  const images = new Map(disks.map((d) => [d.id, path.join(work, `${d.id}.img`)]));
  /** The acknowledged writes applied in order: what the disks must hold at the final marker. */
  const model = new Map<string, Buffer>();
  const random = rng(7);
  let host: HostProcess;
  let api: Api;
  let proxy: RunningProxy;
  let agent: MachineAgent;
  let credential: string;

  function randomBytes(n: number): Buffer {
    const b = Buffer.alloc(n);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE((random() * 2 ** 32) >>> 0, i);
    return b;
  }

  beforeAll(async () => {
    for (const d of disks) {
      const image = Buffer.alloc(d.sizeBytes);
      randomBytes(256 * KiB).copy(image, 64 * KiB); // some data, the rest zeros
      writeFileSync(images.get(d.id)!, image);
      model.set(d.id, Buffer.from(image));
    }
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    // Applied change logs are kept (keepChangeLogsHours), so the test can read the cache afterwards.
    const registered = await api('PUT', `machines/${machine}`, { disks, policy: { keepChangeLogsHours: 1 } });
    expect(registered.status, JSON.stringify(registered.body)).toBe(201);
    credential = registered.body.credential;
    proxy = await startProxy({
      spoolDir: path.join(work, 'spool'),
      host: '127.0.0.1',
      port: 0,
      tls: 'none',
      settings: stack.settings,
      logger: quietLogger,
      retry: { baseMs: 100, maxMs: 1000 },
    });
    agent = new MachineAgent({
      machine,
      disks: disks.map((d) => ({ id: d.id, path: images.get(d.id)! })),
      journalDir: path.join(work, 'agent'),
      proxy: { url: proxy.url, credential },
      nbd: { port: 0, host: '127.0.0.1' },
      crashIntervalSeconds: 0,
      freezeCommand: `echo freeze >> ${hookLog}`,
      thawCommand: `echo thaw >> ${hookLog}`,
      commandPollMs: 500,
      segment: { maxSegmentAgeMs: 200 },
      retry: { baseMs: 100, maxMs: 1000 },
      logger: quietLogger,
    });
    await agent.start();
    await agent.settled(30_000); // initial sync against an empty cloud disk
  }, 60_000);

  afterAll(async () => {
    await agent?.stop();
    await proxy?.stop();
    await Promise.all(stack.hosts.map((h) => h.stop()));
  });

  it('serves commands only to their machine, with JSON errors', async () => {
    const other = await api('PUT', `machines/${machine}-x`, { disks: [{ id: 'd0', sizeBytes: MiB }] });
    const get = (token: string | undefined, m = machine) =>
      fetch(`${proxy.url}/v1/machines/${m}/commands`, {
        headers: token ? { authorization: `Bearer ${token}` } : {},
      });
    const ack = (body: unknown, id = 'quiesce-nope') =>
      fetch(`${proxy.url}/v1/machines/${machine}/commands/${id}/ack`, {
        method: 'POST',
        headers: { authorization: `Bearer ${credential}`, 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
    const mine = await get(credential);
    expect(mine.status).toBe(200);
    expect(await mine.json()).toEqual({ value: [] });
    const none = await get(undefined);
    expect(none.status).toBe(401);
    expect((await none.json()).error.code).toBe('Unauthorized');
    const foreign = await get(other.body.credential);
    expect(foreign.status).toBe(403);
    expect((await foreign.json()).error).toMatchObject({ code: 'Forbidden', target: 'machine' });
    const unknown = await ack({ state: 'done' });
    expect(unknown.status).toBe(404);
    expect((await unknown.json()).error.target).toBe('command');
    const bad = await ack({ state: 'maybe' });
    expect(bad.status).toBe(400);
    expect((await bad.json()).error.target).toBe('state');
    expect((await ack({ state: 'done' }, 'bad%20id')).status).toBe(400);
  });

  it('quiesces on the command: the failover disks hold every acknowledged write, and the cache replays to the source', async () => {
    const nbd = agent.nbd!;
    const clients = new Map<string, NbdClient>();
    for (const d of disks) clients.set(d.id, await NbdClient.connect(nbd.host, nbd.port, d.id));
    // Writers: sequential writes per disk; a write enters the model only once the agent answered it.
    let acknowledged = 0;
    let writing = true;
    const writers = disks.map(async (d) => {
      const client = clients.get(d.id)!;
      while (writing) {
        const sectors = 1 + Math.floor(random() * 64);
        const offset = Math.floor(random() * (d.sizeBytes / 512 - sectors + 1)) * 512;
        const data = randomBytes(sectors * 512);
        try {
          await client.write(offset, data);
        } catch {
          return; // refused when the agent stops: never acknowledged
        }
        data.copy(model.get(d.id)!, offset);
        acknowledged++;
      }
    });
    await waitFor(() => (acknowledged >= 50 ? true : undefined), '50 acknowledged writes');

    const started = await api('POST', `machines/${machine}/failover`, {
      recoveryPoint: 'latest',
      planned: true,
      waitSeconds: 60,
    });
    expect(started.status, JSON.stringify(started.body)).toBe(202);
    const { operationId, failoverId } = started.body as { operationId: string; failoverId: string };
    const op = await waitForOperation(api, operationId, undefined, 60_000);
    expect(op.status, op.error ?? JSON.stringify(op.progress)).toBe('Completed');
    writing = false;

    const status = agent.status();
    const markerId = `planned-${failoverId}`;
    expect(status.hold).toMatchObject({ failoverId, markerId });
    expect(status.lastCommand?.result.state).toBe('done');
    expect(op.output.point).toMatchObject({ id: markerId, type: 'app-consistent' });
    expect(readFileSync(hookLog, 'utf8').trim().split('\n')).toEqual(['freeze', 'thaw']);
    const command = await readCommand(
      new FailoverTables(new StorageClients('ReplicaStorage', stack.settings)),
      machine,
      `quiesce-${failoverId}`,
    );
    expect(command?.state).toBe('done');

    // Writes are held: the source images are the model, and so are the failover disks.
    const replica = new StorageClients('ReplicaStorage', stack.settings).blobService();
    const failoverDisks = replica.getContainerClient(FAILOVER_DISKS_CONTAINER);
    for (const d of disks) {
      const source = readFileSync(images.get(d.id)!);
      expect(source.equals(model.get(d.id)!), `source ${d.id} = acknowledged writes`).toBe(true);
      const blob = failoverDisks.getPageBlobClient(failoverDiskName(machine, d.id, failoverId));
      const failedOver = await readRange(blob, 0, d.sizeBytes);
      expect(failedOver.equals(source), `failover disk ${d.id} = source`).toBe(true);
    }
    expect(acknowledged).toBeGreaterThan(50);

    // The cache: every segment the proxy uploaded, opened and replayed in order, is the source.
    await proxy.drained();
    const keyRing = keyRingFromSettings(stack.settings);
    const cache = new StorageClients('CacheStorage', stack.settings)
      .blobService()
      .getContainerClient(CHANGELOG_CONTAINER);
    for (const d of disks) {
      const segments = [];
      for await (const b of cache.listBlobsFlat({ prefix: `${machine}/${d.id}/` })) {
        const plaintext = openEnvelope(await cache.getBlobClient(b.name).downloadToBuffer(), {
          name: b.name,
          keyRing,
        });
        segments.push(decodeSegment(plaintext));
      }
      segments.sort((a, b) => a.header.epoch - b.header.epoch || a.header.seq - b.header.seq);
      expect(segments.map((s) => s.header.seq)).toEqual(segments.map((_, i) => i + 1));
      const last = segments[segments.length - 1].records.at(-1);
      expect(last).toMatchObject({ type: 'marker', id: markerId, kind: 'app' });
      const replayed = applyRecordsToImage(
        Buffer.alloc(d.sizeBytes),
        segments.flatMap((s) => s.records),
      );
      expect(replayed.equals(readFileSync(images.get(d.id)!)), `cache replay of ${d.id}`).toBe(true);
    }

    await agent.stop(); // held writes are refused, never acknowledged
    await Promise.race([Promise.all(writers), new Promise((r) => setTimeout(r, 5000))]);
    for (const d of disks) {
      const source = readFileSync(images.get(d.id)!);
      expect(source.equals(model.get(d.id)!), `source ${d.id} after stop`).toBe(true);
    }
  });
});
