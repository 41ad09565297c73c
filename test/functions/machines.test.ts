import { createHash, randomUUID } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { spawnLocalHost, type HostProcess } from '../../infra/local/host-process';
import { verifyCredential } from '../../shared/credentials';
import { createMessageSender } from '../../shared/messaging';
import {
  MACHINES_PARTITION,
  readEntity,
  seedBlob,
  TABLES,
  type MachineEntity,
} from '../../shared/replication';
import { waitFor } from '../helpers/host';
import { generateWorkload, testDeps, testSettings, uploadSegment } from '../shared/replication/helpers';
import { isolatedAppRoot } from '../shared/failover/helpers';

const root = path.resolve(__dirname, '../..');
// A task hub of its own: no other test file's host takes this file's orchestrations.
const appRoot = isolatedAppRoot(`machinesapi${randomUUID().slice(0, 8)}`);
const key = `key-${randomUUID()}`;
const connection = inject('azuriteConnectionString');
const suffix = randomUUID().slice(0, 8);
const queue = `changelog-api-${suffix}`;
const KiB = 1024;
const MiB = 1024 * KiB;
// Wednesdays at noon: far enough not to fire during a test (the local host's timers cannot wait > 24.8 days).
const NEVER = '0 0 12 * * 3';

describe('replication HTTP API (local host, real app)', () => {
  const settings = testSettings(connection, queue, {
    LIFEBOAT_RETENTION_SCHEDULE: NEVER,
    LIFEBOAT_RPO_SCHEDULE: NEVER,
    LIFEBOAT_APPLY_LEASE_SECONDS: '15',
    LIFEBOAT_LOG_LEVEL: 'warn',
  });
  const deps = testDeps(connection);
  let host: HostProcess;
  let base: string;

  const call = async (method: string, route: string, body?: unknown) => {
    const res = await fetch(`${base}/api/${route}`, {
      method,
      headers: { 'x-functions-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    return { status: res.status, body: text ? JSON.parse(text) : undefined };
  };
  const machine = (name: string) => `${name}-${suffix}`;

  beforeAll(async () => {
    host = await spawnLocalHost(
      {
        appRoot,
        entryPoint: path.join(root, 'functions/index.ts'),
        settings,
        port: 0,
        functionKey: key,
        lockSeconds: 10,
      },
      (line) => (process.env.TEST_HOST_LOG ? process.stderr.write(`${line}\n`) : undefined),
    );
    base = `http://127.0.0.1:${host.port}`;
  });
  afterAll(async () => host?.stop());

  it('registers the replication functions', () => {
    expect(host.functions).toEqual(
      expect.arrayContaining([
        'machines-register',
        'machines-list',
        'machines-get',
        'machines-recovery-points',
        'machines-disk-checksums',
        'events-list',
        'apply-changelogs',
        'retention',
        'rpo-monitor',
      ]),
    );
  });

  it('registers a machine: 201 with the credential once, seed blobs, a hash in the machines table', async () => {
    const name = machine('web');
    const res = await call('PUT', `machines/${name}`, {
      disks: [
        { id: 'd0', sizeBytes: 2 * MiB },
        { id: 'd1', sizeBytes: 1 * MiB },
      ],
      policy: { crashConsistentIntervalSeconds: 60, retentionHours: 48, rpoThresholdSeconds: 600 },
    });
    expect(res.status).toBe(201);
    expect(res.body.credential).toMatch(new RegExp(`^lbm1\\.${name}\\.[A-Za-z0-9_-]{43}$`));
    expect(res.body.machine).toMatchObject({
      name,
      health: 'initial-sync',
      policy: {
        crashConsistentIntervalSeconds: 60,
        appConsistentIntervalMinutes: 60,
        retentionHours: 48,
        rpoThresholdSeconds: 600,
      },
      rpo: { seconds: null, thresholdSeconds: 600, breached: false },
    });
    const row = await readEntity<MachineEntity>(
      await deps.tables.get(TABLES.machines),
      MACHINES_PARTITION,
      name,
    );
    expect(verifyCredential(res.body.credential, row!.credentialHash)).toBe(true);
    expect(JSON.stringify(row)).not.toContain(res.body.credential);
    expect((await seedBlob(deps.seed, name, 'd0').getProperties()).contentLength).toBe(2 * MiB);
    expect((await seedBlob(deps.seed, name, 'd1').getProperties()).contentLength).toBe(1 * MiB);

    const again = await call('PUT', `machines/${name}`, {
      disks: [
        { id: 'd0', sizeBytes: 2 * MiB },
        { id: 'd1', sizeBytes: 1 * MiB },
      ],
    });
    expect(again.status, JSON.stringify(again.body)).toBe(200);
    expect(again.body.credential).toBeUndefined();
    expect(again.body.machine.policy.retentionHours).toBe(24); // the policy is replaced, defaults filled

    const rotated = await call('PUT', `machines/${name}`, {
      disks: [
        { id: 'd0', sizeBytes: 2 * MiB },
        { id: 'd1', sizeBytes: 1 * MiB },
      ],
      rotateCredential: true,
    });
    expect(rotated.status).toBe(200);
    const row2 = await readEntity<MachineEntity>(
      await deps.tables.get(TABLES.machines),
      MACHINES_PARTITION,
      name,
    );
    expect(verifyCredential(rotated.body.credential, row2!.credentialHash)).toBe(true);
    expect(verifyCredential(res.body.credential, row2!.credentialHash)).toBe(false);

    const got = await call('GET', `machines/${name}`);
    expect(got.status).toBe(200);
    expect(got.body.disks).toEqual([
      expect.objectContaining({
        id: 'd0',
        sizeBytes: 2 * MiB,
        state: 'initial-sync',
        epoch: 0,
        appliedSeq: 0,
        backlog: { segments: 0, bytes: 0 },
      }),
      expect.objectContaining({
        id: 'd1',
        sizeBytes: 1 * MiB,
        state: 'initial-sync',
        epoch: 0,
        appliedSeq: 0,
      }),
    ]);
    const list = await call('GET', 'machines');
    expect(list.status).toBe(200);
    expect(list.body.value.map((m: { name: string }) => m.name)).toContain(name);
  });

  it('answers bad names 400 and unknown machines 404, with messages naming the field', async () => {
    const bad = await call('PUT', 'machines/Bad_Name', { disks: [{ id: 'd0', sizeBytes: MiB }] });
    expect(bad.status).toBe(400);
    expect(bad.body.error).toMatchObject({ code: 'InvalidName', target: 'machine' });
    expect(bad.body.error.message).toContain('machine must be a DNS-style label');
    expect((await call('GET', 'machines/UPPER')).status).toBe(400);

    for (const route of [
      `machines/nobody-${suffix}`,
      `machines/nobody-${suffix}/recovery-points`,
      `machines/nobody-${suffix}/disks/d0/checksums`,
    ]) {
      const res = await call('GET', route);
      expect(res.status, route).toBe(404);
      expect(res.body.error).toMatchObject({ code: 'NotFound', target: 'machine' });
      expect(res.body.error.message).toContain(`nobody-${suffix} is not registered`);
    }
    expect((await call('GET', 'events?machine=NOT_OK')).status).toBe(400);
  });

  it('rejects invalid registrations with 400 and the offending field', async () => {
    const name = machine('invalid');
    const disk = { id: 'd0', sizeBytes: MiB };
    const cases: [unknown, string, string][] = [
      [{ disks: [disk], policy: { retentionHours: 0 } }, 'policy.retentionHours', 'at least 1 hours'],
      [{ disks: [disk], policy: { retentionHours: 361 } }, 'policy.retentionHours', 'at most 360'],
      [
        { disks: [disk], policy: { crashConsistentIntervalSeconds: 5 } },
        'policy.crashConsistentIntervalSeconds',
        'at least 10',
      ],
      [
        { disks: [disk], policy: { appConsistentIntervalMinutes: 721 } },
        'policy.appConsistentIntervalMinutes',
        'at most 720',
      ],
      [{ disks: [disk], policy: { dailyRetentionDays: 366 } }, 'policy.dailyRetentionDays', 'at most 365'],
      [
        { disks: [disk], policy: { rpoThresholdSeconds: 'fast' } },
        'policy.rpoThresholdSeconds',
        'must be a number',
      ],
      [{ disks: [disk], policy: { retention: 5 } }, 'policy.retention', 'unknown field'],
      [{ disks: [{ id: 'd0', sizeBytes: 1000 }] }, 'disks[0].sizeBytes', 'multiple of 512'],
      [{ disks: [{ id: 'd0', sizeBytes: 0 }] }, 'disks[0].sizeBytes', 'positive'],
      [{ disks: [{ id: 'd0', sizeBytes: 16 * 1024 ** 4 }] }, 'disks[0].sizeBytes', '8 TiB'],
      [{ disks: [disk, { id: 'D1', sizeBytes: MiB }] }, 'disks[1].id', 'DNS-style label'],
      [{ disks: [disk, disk] }, 'disks[1].id', 'unique'],
      [{ disks: [] }, 'disks', 'at least one disk'],
      [{ policy: {} }, 'disks', 'list of disks'],
      [[1, 2], 'body', 'JSON object'],
      ['{not json', 'body', 'not valid JSON'],
      ['', 'body', 'empty'],
    ];
    for (const [body, target, text] of cases) {
      const res = await call('PUT', `machines/${name}`, body);
      expect(res.status, JSON.stringify(body)).toBe(400);
      expect(res.body.error.target, JSON.stringify(body)).toBe(target);
      expect(res.body.error.message, JSON.stringify(body)).toContain(text);
    }
    expect((await call('GET', `machines/${name}`)).status).toBe(404); // nothing was registered
  });

  it('refuses to shrink or drop a disk (409); growing one marks it for resync; adding one starts its initial sync', async () => {
    const name = machine('resize');
    expect(
      (
        await call('PUT', `machines/${name}`, {
          disks: [
            { id: 'd0', sizeBytes: MiB },
            { id: 'd1', sizeBytes: MiB },
          ],
        })
      ).status,
    ).toBe(201);
    const shrink = await call('PUT', `machines/${name}`, {
      disks: [
        { id: 'd0', sizeBytes: MiB / 2 },
        { id: 'd1', sizeBytes: MiB },
      ],
    });
    expect(shrink.status).toBe(409);
    expect(shrink.body.error).toMatchObject({ code: 'DiskShrinkRefused', target: 'disks[0].sizeBytes' });
    expect(shrink.body.error.message).toContain('cannot shrink');
    const drop = await call('PUT', `machines/${name}`, { disks: [{ id: 'd0', sizeBytes: MiB }] });
    expect(drop.status).toBe(409);
    expect(drop.body.error).toMatchObject({ code: 'DiskRemovalRefused', target: 'disks' });

    const grow = await call('PUT', `machines/${name}`, {
      disks: [
        { id: 'd0', sizeBytes: 2 * MiB },
        { id: 'd1', sizeBytes: MiB },
        { id: 'd2', sizeBytes: 512 * KiB },
      ],
    });
    expect(grow.status).toBe(200);
    expect(grow.body.machine.health).toBe('resync-required');
    expect(grow.body.machine.disks.map((d: { id: string; state: string }) => [d.id, d.state])).toEqual([
      ['d0', 'resync-required'],
      ['d1', 'initial-sync'],
      ['d2', 'initial-sync'],
    ]);
    expect((await seedBlob(deps.seed, name, 'd0').getProperties()).contentLength).toBe(2 * MiB);
    expect((await seedBlob(deps.seed, name, 'd2').getProperties()).contentLength).toBe(512 * KiB);
    const events = await call('GET', `events?machine=${name}`);
    expect(events.body.value.map((e: { type: string }) => e.type)).toEqual(
      expect.arrayContaining(['machine-registered', 'disk-resized', 'disk-added']),
    );
  });

  it('returns per-block checksums of a seed disk that match the bytes, in pages', async () => {
    const name = machine('sums');
    await call('PUT', `machines/${name}`, { disks: [{ id: 'd0', sizeBytes: 1 * MiB + 64 * KiB }] });
    const image = Buffer.alloc(MiB + 64 * KiB);
    const blob = seedBlob(deps.seed, name, 'd0');
    for (const [offset, length] of [
      [0, 4 * KiB],
      [100 * KiB, 200 * KiB],
      [MiB + 60 * KiB, 4 * KiB],
    ]) {
      const data = Buffer.alloc(length, (offset / 512) % 251);
      data.copy(image, offset);
      await blob.uploadPages(data, offset, length);
    }
    const blockSize = 64 * KiB;
    const expected = Array.from({ length: image.length / blockSize }, (_, i) =>
      createHash('sha256')
        .update(image.subarray(i * blockSize, (i + 1) * blockSize))
        .digest('hex'),
    );
    const all = await call('GET', `machines/${name}/disks/d0/checksums?blockSize=${blockSize}`);
    expect(all.status).toBe(200);
    expect(all.body).toMatchObject({
      algorithm: 'sha256',
      blockSize,
      offset: 0,
      sizeBytes: image.length,
      length: image.length,
    });
    expect(all.body.blocks).toEqual(expected);
    expect(all.body.nextOffset).toBeUndefined();
    const part = await call(
      'GET',
      `machines/${name}/disks/d0/checksums?blockSize=${blockSize}&offset=${blockSize}&length=${3 * blockSize}`,
    );
    expect(part.body.blocks).toEqual(expected.slice(1, 4));
    expect(part.body.nextOffset).toBe(4 * blockSize);
    const bad = await call('GET', `machines/${name}/disks/d0/checksums?blockSize=1000`);
    expect(bad.status).toBe(400);
    expect(bad.body.error.target).toBe('blockSize');
    expect((await call('GET', `machines/${name}/disks/d0/checksums?offset=7`)).body.error.target).toBe(
      'offset',
    );
    expect((await call('GET', `machines/${name}/disks/d9/checksums`)).status).toBe(404);
  });

  it('answers the checksums as 32 raw bytes per block when asked for application/octet-stream', async () => {
    const name = machine('binsums');
    const size = 2 * MiB + 12 * KiB; // 32 blocks of 64 KiB and a short last one
    await call('PUT', `machines/${name}`, { disks: [{ id: 'd0', sizeBytes: size }] });
    const image = Buffer.alloc(size);
    const blob = seedBlob(deps.seed, name, 'd0');
    for (const [offset, length] of [
      [64 * KiB, 64 * KiB],
      [300 * KiB, 512 * KiB],
      [2 * MiB, 12 * KiB],
    ]) {
      const data = Buffer.alloc(length);
      for (let i = 0; i < length; i++) data[i] = (offset + i * 7 + (i >> 9)) % 253;
      data.copy(image, offset);
      await blob.uploadPages(data, offset, length);
    }
    const blockSize = 64 * KiB;
    // SHA-256 of each block of the model, computed here: 33 digests back to back.
    const expected = Buffer.concat(
      Array.from({ length: Math.ceil(size / blockSize) }, (_, i) =>
        createHash('sha256')
          .update(image.subarray(i * blockSize, Math.min(size, (i + 1) * blockSize)))
          .digest(),
      ),
    );
    const get = (query: string) =>
      fetch(`${base}/api/machines/${name}/disks/d0/checksums?${query}`, {
        headers: { 'x-functions-key': key, accept: 'application/octet-stream' },
      });

    const all = await get(`blockSize=${blockSize}`);
    expect(all.status).toBe(200);
    expect(all.headers.get('content-type')).toBe('application/octet-stream');
    const body = Buffer.from(await all.arrayBuffer());
    expect(body.length).toBe(33 * 32);
    expect(body.equals(expected)).toBe(true);
    expect({
      algorithm: all.headers.get('x-lifeboat-algorithm'),
      sizeBytes: all.headers.get('x-lifeboat-size-bytes'),
      blockSize: all.headers.get('x-lifeboat-block-size'),
      offset: all.headers.get('x-lifeboat-offset'),
      length: all.headers.get('x-lifeboat-length'),
      nextOffset: all.headers.get('x-lifeboat-next-offset'),
    }).toEqual({
      algorithm: 'sha256',
      sizeBytes: String(size),
      blockSize: String(blockSize),
      offset: '0',
      length: String(size),
      nextOffset: null,
    });

    const part = await get(`blockSize=${blockSize}&offset=${2 * blockSize}&length=${3 * blockSize}`);
    expect(Buffer.from(await part.arrayBuffer()).equals(expected.subarray(2 * 32, 5 * 32))).toBe(true);
    expect(part.headers.get('x-lifeboat-next-offset')).toBe(String(5 * blockSize));
    // The same answer as the JSON one, block for block.
    const json = await call('GET', `machines/${name}/disks/d0/checksums?blockSize=${blockSize}`);
    expect(Buffer.from(json.body.blocks.join(''), 'hex').equals(expected)).toBe(true);

    // Bad parameters are still a JSON 400 that names the field.
    for (const [query, target] of [
      ['blockSize=1000', 'blockSize'],
      ['offset=7', 'offset'],
      ['length=-1', 'length'],
    ]) {
      const bad = await get(query);
      expect(bad.status).toBe(400);
      expect(((await bad.json()) as { error: { target: string } }).error.target).toBe(target);
    }
    expect(
      (
        await fetch(`${base}/api/machines/${name}/disks/d9/checksums`, {
          headers: { 'x-functions-key': key, accept: 'application/octet-stream' },
        })
      ).status,
    ).toBe(404);
  });

  it('lists recovery points newest first, by type, a page at a time', async () => {
    const name = machine('points');
    const disks = [{ id: 'd0', sizeBytes: 512 * KiB }];
    await call('PUT', `machines/${name}`, { disks });
    const workload = generateWorkload({
      machine: name,
      disks,
      ops: 200,
      seed: 11,
      markerEvery: 15,
      recordsPerSegment: 10,
    });
    const sender = createMessageSender(settings, 'ServiceBusConnection', queue);
    for (const s of workload.segments.get('d0')!) {
      await uploadSegment(deps, s);
      await sender.send({ body: { machine: name, disk: 'd0', epoch: s.header.epoch, seq: s.header.seq } });
    }
    const total = workload.markers.length;
    expect(total).toBeGreaterThan(4);
    await waitFor(async () => {
      const res = await call('GET', `machines/${name}/recovery-points?top=1000`);
      return res.body.value.length === total ? true : undefined;
    }, 'every recovery point');
    const ids: string[] = [];
    let token: string | undefined;
    do {
      const res = await call(
        'GET',
        `machines/${name}/recovery-points?top=3${token ? `&continuationToken=${encodeURIComponent(token)}` : ''}`,
      );
      expect(res.status).toBe(200);
      expect(res.body.value.length).toBeLessThanOrEqual(3);
      ids.push(...res.body.value.map((p: { id: string }) => p.id));
      token = res.body.continuationToken;
    } while (token);
    expect(ids).toEqual(workload.markers.map((m) => m.id).reverse());
    const app = await call('GET', `machines/${name}/recovery-points?type=app-consistent&top=1000`);
    expect(app.body.value.map((p: { id: string }) => p.id)).toEqual(
      workload.markers
        .filter((m) => m.kind === 'app')
        .map((m) => m.id)
        .reverse(),
    );
    expect((await call('GET', `machines/${name}/recovery-points?type=weird`)).body.error.target).toBe('type');
    expect((await call('GET', `machines/${name}/recovery-points?top=0`)).body.error.target).toBe('top');
    // The cursor trails the pages (and so the last recovery point) by a table update.
    const lastSeq = workload.segments.get('d0')!.length;
    const status = await waitFor(async () => {
      const res = await call('GET', `machines/${name}`);
      return res.body.disks[0].appliedSeq === lastSeq ? res : undefined;
    }, 'the cursor at the last change log');
    expect(status.body).toMatchObject({
      health: expect.stringMatching(/protected|critical/),
      latestRecoveryPoint: { id: workload.markers.at(-1)!.id },
    });
    expect(status.body.disks[0]).toMatchObject({
      state: 'protected',
      epoch: 1,
      appliedSeq: lastSeq,
      backlog: { segments: 0 },
    });
    await sender.close();
  });
});
