import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { startProxy, type RunningProxy } from '../../../agent/proxy/proxy';
import {
  CHANGELOG_CONTAINER,
  EnvelopeError,
  changelogBlobName,
  generateEncryptionKey,
  openEnvelope,
  parseKeyRing,
  readEnvelopeHeader,
} from '../../../shared/envelope';
import { decodeSegment } from '../../../shared/segment';
import { StorageClients } from '../../../shared/storage';
import {
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

const conn = inject('azuriteConnectionString');
const clients = StorageClients.fromConnectionString(conn);
const container = clients.blobService().getContainerClient(CHANGELOG_CONTAINER);

let proxy: RunningProxy;
let spoolDir: string;
let settings: Record<string, string>;
const machines = [uniqueName('app'), uniqueName('db')];
const disks = ['d0', 'd1', 'd2'];
const tokens = new Map<string, string>();
const sent = new Map<string, Buffer>(); // blob name → segment bytes

beforeAll(async () => {
  spoolDir = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-proxy-upload-'));
  for (const m of machines) tokens.set(m, await registerMachine(conn, m));
  settings = testSettings(conn);
  proxy = await startProxy({
    spoolDir,
    host: '127.0.0.1',
    port: 0,
    tls: 'none',
    settings,
    logger: quietLogger,
    uploadConcurrency: 3,
    retry: { initialDelayMs: 50, maxDelayMs: 500 },
  });
});

afterAll(async () => {
  await proxy?.stop();
  await fs.rm(spoolDir, { recursive: true, force: true });
});

describe('uploads from two agents, several disks', () => {
  it('every segment lands once, encrypted and bound to its name, with one notification', async () => {
    // Two agents stream concurrently, each disk in order.
    await Promise.all(
      machines.flatMap((machine) =>
        disks.map(async (disk) => {
          for (let seq = 1; seq <= 6; seq++) {
            const address = { machine, disk, epoch: 2, seq };
            const body = makeSegment(address, 1 + (seq % 3));
            const r = await request(proxy.url, 'PUT', segmentPath(address), {
              token: tokens.get(machine),
              body,
            });
            expect(r.status).toBe(201);
            sent.set(changelogBlobName(address), body);
          }
        }),
      ),
    );
    await proxy.drained();

    const names = (await Promise.all(machines.map((m) => listBlobNames(container, `${m}/`)))).flat().sort();
    expect(names).toEqual([...sent.keys()].sort());

    const keyRing = parseKeyRing(settings.LIFEBOAT_ENCRYPTION_KEYS);
    for (const [name, segment] of sent) {
      const blob = await container.getBlockBlobClient(name).downloadToBuffer();
      // No plaintext: neither the recognisable write data nor any 32-byte window of the segment.
      expect(blob.includes(Buffer.from('PLAINTEXT-MARKER'))).toBe(false);
      expect(blob.includes(Buffer.from('lorem ipsum'))).toBe(false);
      for (let i = 0; i + 32 <= segment.length; i += 512)
        expect(blob.includes(segment.subarray(i, i + 32))).toBe(false);
      expect(readEnvelopeHeader(blob)).toMatchObject({
        codec: 'zstd',
        keyId: 'k1',
        plaintextLength: segment.length,
      });
      const plain = openEnvelope(blob, { name, keyRing });
      expect(plain.equals(segment)).toBe(true);
      expect(decodeSegment(plain).header.seq).toBe(Number(name.slice(-16, -4)));
    }

    const notices = await readNotices(clients.queueService().getQueueClient(settings.ChangelogQueueName));
    const ids = notices.map((n) => n.messageId).sort();
    const expected = [...sent.keys()].map((n) => n.replace(/\/0*(\d+)\.seg$/, '/$1')).sort();
    expect(ids).toEqual(expected);
    const lastSeq = new Map<string, number>();
    for (const n of notices) {
      const [machine, disk, epoch, seq] = n.messageId.split('/');
      expect(n.body).toEqual({ machine, disk, epoch: Number(epoch), seq: Number(seq) });
      // Within a disk, notifications go out in sequence order.
      expect(Number(seq)).toBeGreaterThan(lastSeq.get(`${machine}/${disk}`) ?? 0);
      lastSeq.set(`${machine}/${disk}`, Number(seq));
    }
  });

  it('a blob fails to decrypt with another key, or copied to another name', async () => {
    const [name, segment] = [...sent][0];
    const blob = await container.getBlockBlobClient(name).downloadToBuffer();
    const wrongRing = parseKeyRing(generateEncryptionKey('k1'));
    expect(() => openEnvelope(blob, { name, keyRing: wrongRing })).toThrow(EnvelopeError);

    // Copy the blob server-side to the name of another segment: it must not open there.
    const keyRing = parseKeyRing(settings.LIFEBOAT_ENCRYPTION_KEYS);
    const victim = [...sent.keys()][1];
    const copy = container.getBlockBlobClient(`${victim}.copy`);
    await copy.syncCopyFromURL(container.getBlockBlobClient(name).url).catch(async () => {
      await copy.uploadData(blob); // Azurite without SAS: copy by download + upload
    });
    const moved = await copy.downloadToBuffer();
    expect(moved.equals(blob)).toBe(true);
    expect(() => openEnvelope(moved, { name: victim, keyRing })).toThrowError(
      expect.objectContaining({ code: 'EnvelopeAuthenticationFailed' }),
    );
    expect(openEnvelope(moved, { name, keyRing }).equals(segment)).toBe(true);
    await copy.delete();
  });
});
