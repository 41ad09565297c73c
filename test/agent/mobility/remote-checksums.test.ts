import { createHash } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { MachineAgent } from '../../../agent/mobility/agent';
import {
  agentCommand,
  protectAgent,
  remoteChecksumsFromFlags,
  type ProtectOptions,
} from '../../../agent/mobility/command';
import { ApiChecksums, ChecksumsRequestError } from '../../../agent/mobility/remote-checksums';
import { ImageFileChecksums, type SyncProgress } from '../../../agent/mobility/sync';
import { startProxy, type RunningProxy } from '../../../agent/proxy/proxy';
import type { HostProcess } from '../../../infra/local/host-process';
import { readRange, replicationDepsFromSettings, seedBlob } from '../../../shared/replication';
import { waitFor } from '../../helpers/host';
import { apiClient, testStack, type Api } from '../../shared/failover/helpers';
import { quietLogger, rng } from '../../shared/replication/helpers';

// Initial sync against a cloud copy that already holds most of the disk: the agent, started from
// `lifeboat agent protect` flags with --api and --api-key-file, compares its blocks with the seed
// disk's checksums from the local host's HTTP API and ships only the blocks that differ; after
// apply the seed disk equals the local image.

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const MiB = 1024 * 1024;
const BLOCK = 64 * KiB;

describe('RemoteChecksums over the HTTP API', () => {
  const stack = testStack(connection, 'sums');
  const machine = `rc-${Math.random().toString(36).slice(2, 8)}`;
  const size = 4 * MiB + 32 * KiB; // 64 full blocks and a short last one
  const work = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-sums-'));
  const random = rng(11);
  const cloud = Buffer.alloc(size);
  const local = Buffer.alloc(size);
  let host: HostProcess;
  let api: Api;
  let apiUrl: string;
  let proxy: RunningProxy | undefined;
  let agent: MachineAgent | undefined;
  let credential: string;

  function fill(buf: Buffer, offset: number, length: number): void {
    for (let i = offset; i < offset + length; i += 4) buf.writeUInt32LE((random() * 2 ** 32) >>> 0, i);
  }

  beforeAll(async () => {
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    apiUrl = `http://127.0.0.1:${host.port}/api`;
    const registered = await api('PUT', `machines/${machine}`, { disks: [{ id: 'd0', sizeBytes: size }] });
    expect(registered.status, JSON.stringify(registered.body)).toBe(201);
    credential = registered.body.credential;
    // The cloud copy: data in blocks 0-39 and 50, zeros elsewhere.
    fill(cloud, 0, 40 * BLOCK);
    fill(cloud, 50 * BLOCK, BLOCK);
    const deps = replicationDepsFromSettings(stack.settings, quietLogger());
    const seed = seedBlob(deps.seed, machine, 'd0');
    await seed.uploadPages(cloud.subarray(0, 40 * BLOCK), 0, 40 * BLOCK);
    await seed.uploadPages(cloud.subarray(50 * BLOCK, 51 * BLOCK), 50 * BLOCK, BLOCK);
  }, 60_000);

  afterAll(async () => {
    await agent?.stop();
    await proxy?.stop();
    await Promise.all(stack.hosts.map((h) => h.stop()));
  });

  it('serves the seed disk checksums across windows, and refuses a wrong key clearly', async () => {
    const sums = new ApiChecksums({ apiUrl, key: stack.key, machine, disk: 'd0', windowBytes: 256 * KiB });
    const got = await sums.checksums({ offset: 0, length: size });
    const expected = [];
    for (let at = 0; at < size; at += BLOCK)
      expected.push(
        createHash('sha256')
          .update(cloud.subarray(at, Math.min(size, at + BLOCK)))
          .digest(),
      );
    expect(got.map((b) => b.toString('hex'))).toEqual(expected.map((b) => b.toString('hex')));
    expect(sums.sizeBytes).toBe(size);
    // The binary answer: 32 bytes per block, each window fetched once (17 windows of 4 blocks).
    expect(sums.requests).toBe(17);
    expect(sums.bytesFetched).toBe(65 * 32);
    // A range in the middle of a window, and past the end of the cloud disk (missing = differs).
    const part = await sums.checksums({ offset: 5 * BLOCK, length: 2 * BLOCK });
    expect(part.map((b) => b.toString('hex'))).toEqual(expected.slice(5, 7).map((b) => b.toString('hex')));
    expect(await sums.checksums({ offset: 66 * BLOCK, length: BLOCK })).toEqual([]);

    const wrong = new ApiChecksums({ apiUrl, key: 'not-the-key', machine, disk: 'd0' });
    const err = await wrong.checksums({ offset: 0, length: BLOCK }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ChecksumsRequestError);
    expect((err as Error).message).toMatch(/401.*--api-key-file/);
    const unknown = new ApiChecksums({ apiUrl, key: stack.key, machine, disk: 'd9' });
    expect(
      ((await unknown.checksums({ offset: 0, length: BLOCK }).catch((e: unknown) => e)) as Error).message,
    ).toMatch(/404/);
  });

  it('reads a JSON answer too (an API without the binary form), and refuses a wrong-sized one', async () => {
    // A stand-in API that ignores Accept and answers hex JSON, as before the binary form.
    const blocks = [createHash('sha256').update('a').digest(), createHash('sha256').update('b').digest()];
    let body: unknown = {
      sizeBytes: 2 * BLOCK,
      blockSize: BLOCK,
      offset: 0,
      length: 2 * BLOCK,
      blocks: blocks.map((b) => b.toString('hex')),
    };
    const accepts: (string | undefined)[] = [];
    const server = http.createServer((req, res) => {
      accepts.push(req.headers.accept);
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body));
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/api`;
      const sums = new ApiChecksums({ apiUrl: url, machine, disk: 'd0' });
      const got = await sums.checksums({ offset: 0, length: 2 * BLOCK });
      expect(got.map((b) => b.toString('hex'))).toEqual(blocks.map((b) => b.toString('hex')));
      expect(accepts[0]).toMatch(/^application\/octet-stream/);
      // One block short of what the disk size says: not trusted.
      body = { ...(body as object), blocks: [blocks[0].toString('hex')] };
      const short = new ApiChecksums({ apiUrl: url, machine, disk: 'd0' });
      const err = await short.checksums({ offset: 0, length: BLOCK }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ChecksumsRequestError);
      expect((err as Error).message).toMatch(/another range or block size/);
    } finally {
      server.close();
    }
  });

  it('keeps today’s behaviour without --api, and wants --api with --api-key-file', () => {
    const keyFile = path.join(work, 'plain.key');
    writeFileSync(keyFile, 'k\n');
    const base = { machine, remoteImage: [] as [string, string][] };
    expect(remoteChecksumsFromFlags(base)('d0')).toBeInstanceOf(ImageFileChecksums);
    expect(remoteChecksumsFromFlags({ ...base, api: apiUrl })('d0')).toBeInstanceOf(ApiChecksums);
    expect(
      remoteChecksumsFromFlags({ ...base, api: apiUrl, remoteImage: [['d0', '/x.img']] })('d0'),
    ).toBeInstanceOf(ImageFileChecksums);
    expect(() => remoteChecksumsFromFlags({ ...base, apiKeyFile: keyFile })).toThrow(
      /--api-key-file needs --api/,
    );
  });

  it('initial sync from `agent protect --api --api-key-file` ships only the blocks that differ', async () => {
    // The local disk: the cloud copy, changed in some blocks.
    cloud.copy(local);
    local[3 * BLOCK + 100] ^= 0xff; // one byte
    fill(local, 10 * BLOCK, 2 * BLOCK); // a run of two blocks
    local.fill(0, 20 * BLOCK, 21 * BLOCK); // data in the cloud, zeros here: a zero record
    fill(local, 45 * BLOCK, BLOCK); // zeros in the cloud, data here
    fill(local, 64 * BLOCK, 32 * KiB); // the short last block
    const differing = [3, 10, 11, 20, 45];
    const expectedShipped = differing.length * BLOCK + 32 * KiB;
    const image = path.join(work, 'd0.img');
    writeFileSync(image, local);
    const credentialFile = path.join(work, 'credential');
    writeFileSync(credentialFile, credential);
    const keyFile = path.join(work, 'api.key');
    writeFileSync(keyFile, `${stack.key}\n`);
    proxy = await startProxy({
      spoolDir: path.join(work, 'spool'),
      host: '127.0.0.1',
      port: 0,
      tls: 'none',
      settings: stack.settings,
      logger: quietLogger(),
      retry: { baseMs: 100, maxMs: 1000 },
    });

    // The flags as `lifeboat agent protect` parses them.
    let parsed: ProtectOptions | undefined;
    const command = agentCommand();
    command.commands
      .find((c) => c.name() === 'protect')!
      .action((opts: ProtectOptions) => {
        parsed = opts;
      });
    await command.parseAsync(
      [
        'protect',
        '--machine',
        machine,
        '--disk',
        `d0=${image}`,
        '--proxy',
        proxy.url,
        '--credential-file',
        credentialFile,
        '--nbd-port',
        '0',
        '--journal-dir',
        path.join(work, 'agent'),
        '--crash-interval',
        '0',
        '--segment-age',
        '1',
        '--api',
        apiUrl,
        '--api-key-file',
        keyFile,
        '--no-progress',
      ],
      { from: 'user' },
    );
    agent = protectAgent(parsed!).agent;
    let progress: SyncProgress | undefined;
    agent.on('progress', (e: { disk: string; progress: SyncProgress }) => (progress = e.progress));
    await agent.start();
    await agent.settled(30_000);

    expect(progress).toMatchObject({
      kind: 'resync',
      doneBytes: size,
      shippedBytes: expectedShipped,
      zeroBytes: BLOCK,
    });
    // Apply brings the seed disk to the local image: the blocks not shipped were already there.
    const deps = replicationDepsFromSettings(stack.settings, quietLogger());
    await waitFor(
      async () =>
        (await readRange(seedBlob(deps.seed, machine, 'd0'), 0, size)).equals(local) ? true : undefined,
      'the seed disk to equal the local image',
      30_000,
    );
  });
});
