import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startProxy, type RunningProxy } from '../../../agent/proxy/proxy';
import { CHANGELOG_CONTAINER, changelogBlobName, openEnvelope, parseKeyRing } from '../../../shared/envelope';
import { StorageClients } from '../../../shared/storage';
import { startAzurite, type RunningAzurite } from '../../../infra/local/azurite';
import {
  eventually,
  listBlobNames,
  makeSegment,
  quietLogger,
  readNotices,
  registerMachine,
  request,
  segmentPath,
  testSettings,
  uniqueName,
} from './helpers';

// The cache (blob + queue) lives in a private Azurite this file stops and starts; credentials stay
// in the shared one, as ReplicaStorage would while only the cache link is down.
const replica = inject('azuriteConnectionString');
let folder: string;
let cache: RunningAzurite;

async function stopCache(): Promise<void> {
  await cache.stop();
}

async function startCache(): Promise<void> {
  cache = await startAzurite({ location: path.join(folder, 'azurite'), ports: cache?.ports });
}

beforeAll(async () => {
  folder = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-proxy-outage-'));
  await startCache();
});

afterAll(async () => {
  await cache?.stop();
  await fs.rm(folder, { recursive: true, force: true });
});

async function startTestProxy(
  spoolDir: string,
  settings: Record<string, string>,
  extra: { spoolCapBytes?: number } = {},
): Promise<RunningProxy> {
  return startProxy({
    spoolDir,
    host: '127.0.0.1',
    port: 0,
    tls: 'none',
    settings,
    logger: quietLogger,
    retry: { initialDelayMs: 50, maxDelayMs: 400 },
    ...extra,
  });
}

async function verifyCache(
  settings: Record<string, string>,
  machine: string,
  sent: Map<string, Buffer>,
): Promise<void> {
  const clients = StorageClients.fromConnectionString(cache.connectionString);
  const container = clients.blobService().getContainerClient(CHANGELOG_CONTAINER);
  expect((await listBlobNames(container, `${machine}/`)).sort()).toEqual([...sent.keys()].sort());
  const keyRing = parseKeyRing(settings.LIFEBOAT_ENCRYPTION_KEYS);
  for (const [name, segment] of sent) {
    const blob = await container.getBlockBlobClient(name).downloadToBuffer();
    expect(openEnvelope(blob, { name, keyRing }).equals(segment)).toBe(true);
  }
  const notices = await readNotices(clients.queueService().getQueueClient(settings.ChangelogQueueName));
  expect(notices.map((n) => n.messageId).sort()).toEqual(
    [...sent.keys()].map((n) => n.replace(/\/0*(\d+)\.seg$/, '/$1')).sort(),
  );
}

describe('cache outage', () => {
  it('the spool absorbs segments while the cache is down, then drains when it returns', async () => {
    const machine = uniqueName('out');
    const token = await registerMachine(replica, machine);
    const settings = testSettings(cache.connectionString, { ReplicaStorage: replica });
    const spoolDir = path.join(folder, 'spool-a');
    const proxy = await startTestProxy(spoolDir, settings);
    const sent = new Map<string, Buffer>();
    const put = async (disk: string, seq: number): Promise<number> => {
      const address = { machine, disk, epoch: 1, seq };
      const body = makeSegment(address);
      const r = await request(proxy.url, 'PUT', segmentPath(address), { token, body });
      if (r.status === 201) sent.set(changelogBlobName(address), body);
      return r.status;
    };
    try {
      for (let seq = 1; seq <= 4; seq++)
        for (const disk of ['d0', 'd1']) expect(await put(disk, seq)).toBe(201);
      await proxy.drained();

      await stopCache();
      for (let seq = 5; seq <= 16; seq++)
        for (const disk of ['d0', 'd1']) expect(await put(disk, seq)).toBe(201);
      await eventually(
        () => proxy.status().upload.errors > 2,
        20_000,
        'upload errors while the cache is down',
      );
      const status = proxy.status();
      expect(status.spool.segments).toBeGreaterThanOrEqual(22);
      expect(status.upload.lastError?.machine).toBe(machine);
      expect(status.disks.filter((d) => d.machine === machine).every((d) => d.backlogSegments >= 11)).toBe(
        true,
      );

      await startCache();
      await proxy.drained();
      expect(proxy.status().spool.segments).toBe(0);
      await verifyCache(settings, machine, sent);
    } finally {
      await proxy.stop();
    }
  });

  it('a full spool answers 503 with Retry-After and drops nothing; it drains once the cache is back', async () => {
    const machine = uniqueName('full');
    const token = await registerMachine(replica, machine);
    const settings = testSettings(cache.connectionString, { ReplicaStorage: replica });
    const segmentSize = makeSegment({ machine, disk: 'd0', epoch: 1, seq: 1 }).length;
    await stopCache();
    const proxy = await startTestProxy(path.join(folder, 'spool-b'), settings, {
      spoolCapBytes: 5 * segmentSize + 100,
    });
    const sent = new Map<string, Buffer>();
    const refused: number[] = [];
    try {
      for (let seq = 1; seq <= 9; seq++) {
        const address = { machine, disk: 'd0', epoch: 1, seq };
        const body = makeSegment(address);
        const r = await request(proxy.url, 'PUT', segmentPath(address), { token, body });
        if (r.status === 201) sent.set(changelogBlobName(address), body);
        else {
          expect(r.status).toBe(503);
          expect(r.json.error.code).toBe('SpoolFull');
          expect(r.json.error.message).toMatch(/spool is full/);
          expect(Number(r.headers['retry-after'])).toBeGreaterThanOrEqual(1);
          refused.push(seq);
        }
      }
      expect(sent.size).toBe(5);
      expect(refused).toEqual([6, 7, 8, 9]);
      expect(proxy.status().spool).toMatchObject({ segments: 5, full: false });
      expect(proxy.status().ingest.throttled).toBe(4);

      await startCache();
      await proxy.drained();
      // The agent retries what was refused; now there is room.
      for (const seq of refused) {
        const address = { machine, disk: 'd0', epoch: 1, seq };
        const body = makeSegment(address);
        const r = await request(proxy.url, 'PUT', segmentPath(address), { token, body });
        expect(r.status).toBe(201);
        sent.set(changelogBlobName(address), body);
      }
      await proxy.drained();
      await verifyCache(settings, machine, sent);
    } finally {
      await proxy.stop();
    }
  });
});
