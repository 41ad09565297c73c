import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import {
  credentialMachine,
  hashCredential,
  issueCredential,
  verifyCredential,
} from '../../../shared/credentials';
import { startProxy, type RunningProxy } from '../../../agent/proxy/proxy';
import {
  makeSegment,
  quietLogger,
  registerMachine,
  request,
  segmentPath,
  testSettings,
  uniqueName,
} from './helpers';

const conn = inject('azuriteConnectionString');
const MAX = 64 * 1024;

let proxy: RunningProxy;
let spoolDir: string;
const alpha = uniqueName('alpha');
const beta = uniqueName('beta');
let alphaToken: string;
let betaToken: string;

async function spoolFiles(): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    for (const e of await fs.readdir(dir, { withFileTypes: true }).catch(() => [])) {
      if (e.isDirectory()) await walk(path.join(dir, e.name));
      else out.push(path.join(dir, e.name));
    }
  };
  await walk(path.join(spoolDir, 'segments'));
  await walk(path.join(spoolDir, 'tmp'));
  return out;
}

beforeAll(async () => {
  spoolDir = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-proxy-ingest-'));
  alphaToken = await registerMachine(conn, alpha);
  betaToken = await registerMachine(conn, beta);
  proxy = await startProxy({
    spoolDir,
    host: '127.0.0.1',
    port: 0,
    tls: 'none',
    settings: testSettings(conn),
    maxSegmentBytes: MAX,
    logger: quietLogger,
    retry: { initialDelayMs: 50, maxDelayMs: 500 },
  });
});

afterAll(async () => {
  await proxy?.stop();
  await fs.rm(spoolDir, { recursive: true, force: true });
});

describe('credentials', () => {
  it('issues a random token naming its machine, stores only a hash, verifies exactly', () => {
    const a = issueCredential('web-1');
    const b = issueCredential('web-1');
    expect(a.token).not.toBe(b.token);
    expect(credentialMachine(a.token)).toBe('web-1');
    expect(a.fields.credentialHash).toBe(hashCredential(a.token));
    expect(a.fields.credentialHash).not.toContain(a.token.split('.')[2]);
    expect(verifyCredential(a.token, a.fields.credentialHash)).toBe(true);
    expect(verifyCredential(b.token, a.fields.credentialHash)).toBe(false);
    expect(verifyCredential(a.token, undefined)).toBe(false);
    expect(verifyCredential(a.token, 'sha256:short')).toBe(false);
    expect(credentialMachine('Bearer nonsense')).toBeUndefined();
    expect(credentialMachine(`lbm1.Web_1.${a.token.split('.')[2]}`)).toBeUndefined();
  });
});

describe('ingest: accepting segments', () => {
  it('201 when durable, 200 for the same bytes, 409 for different bytes; GET reports the last acknowledged', async () => {
    const address = { machine: alpha, disk: 'd0', epoch: 1, seq: 1 };
    const seg = makeSegment(address);
    const first = await request(proxy.url, 'PUT', segmentPath(address), { token: alphaToken, body: seg });
    expect(first.status).toBe(201);
    expect(first.json).toMatchObject({ machine: alpha, disk: 'd0', epoch: 1, seq: 1, result: 'created' });
    const again = await request(proxy.url, 'PUT', segmentPath(address), { token: alphaToken, body: seg });
    expect(again.status).toBe(200);
    const other = makeSegment(address, 3);
    const conflict = await request(proxy.url, 'PUT', segmentPath(address), {
      token: alphaToken,
      body: other,
    });
    expect(conflict.status).toBe(409);
    expect(conflict.json.error.code).toBe('SegmentConflict');

    const next = { ...address, seq: 2 };
    expect(
      (
        await request(proxy.url, 'PUT', segmentPath(next), {
          token: alphaToken,
          body: makeSegment(next),
          chunked: true,
        })
      ).status,
    ).toBe(201);
    const disk = await request(proxy.url, 'GET', `/v1/machines/${alpha}/disks/d0`, { token: alphaToken });
    expect(disk.status).toBe(200);
    expect(disk.json).toMatchObject({ machine: alpha, disk: 'd0', epoch: 1, seq: 2 });

    // After upload the segment has left the spool, and is still recognised.
    await proxy.drained();
    expect(
      (await request(proxy.url, 'PUT', segmentPath(address), { token: alphaToken, body: seg })).status,
    ).toBe(200);
    expect(
      (await request(proxy.url, 'PUT', segmentPath(address), { token: alphaToken, body: other })).status,
    ).toBe(409);
    const unknown = await request(proxy.url, 'GET', `/v1/machines/${alpha}/disks/d9`, { token: alphaToken });
    expect(unknown.json).toMatchObject({ epoch: null, seq: null, pendingSegments: 0 });
  });

  it('reports spool, backlog and upload counters on GET /v1/status', async () => {
    const status = await request(proxy.url, 'GET', '/v1/status');
    expect(status.status).toBe(200);
    expect(status.json.spool).toMatchObject({ segments: 0, bytes: 0 });
    expect(status.json.upload.segmentsShipped).toBeGreaterThanOrEqual(2);
    expect(status.json.ingest.created).toBeGreaterThanOrEqual(2);
    expect(status.json.disks.find((d: { machine: string }) => d.machine === alpha)).toMatchObject({
      disk: 'd0',
      backlogSegments: 0,
      lastShipped: { epoch: 1, seq: 2 },
    });
  });
});

describe('ingest: bad input is refused with a clear JSON error and nothing is spooled', () => {
  const address = () => ({ machine: alpha, disk: 'd1', epoch: 1, seq: 7 });

  async function expectRefused(
    reply: Promise<Awaited<ReturnType<typeof request>>>,
    status: number,
    code: string,
    target?: string,
  ): Promise<string> {
    const before = proxy.status().ingest.created;
    const r = await reply;
    expect(r.status).toBe(status);
    expect(r.headers['content-type']).toMatch(/application\/json/);
    expect(r.json.error.code).toBe(code);
    expect(typeof r.json.error.message).toBe('string');
    expect(r.json.error.message.length).toBeGreaterThan(20);
    if (target) expect(r.json.error.target).toBe(target);
    expect(proxy.status().ingest.created).toBe(before);
    expect(await spoolFiles()).toEqual([]);
    return r.json.error.message;
  }

  it('401 without a credential, with a malformed one, or a wrong secret', async () => {
    const a = address();
    const body = makeSegment(a);
    const msg = await expectRefused(request(proxy.url, 'PUT', segmentPath(a), { body }), 401, 'Unauthorized');
    expect(msg).toMatch(/Authorization: Bearer/);
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body, headers: { authorization: 'Basic abc' } }),
      401,
      'Unauthorized',
    );
    const forged = `${alphaToken.slice(0, -4)}AAAA`;
    const wrong = await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body, token: forged }),
      401,
      'Unauthorized',
    );
    expect(wrong).toContain(alpha);
    const unregistered = issueCredential(uniqueName('ghost')).token;
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body, token: unregistered }),
      401,
      'Unauthorized',
    );
    await expectRefused(request(proxy.url, 'GET', `/v1/machines/${alpha}/disks/d1`), 401, 'Unauthorized');
  });

  it("403 with another machine's valid credential", async () => {
    const a = address();
    const msg = await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: makeSegment(a), token: betaToken }),
      403,
      'Forbidden',
      'machine',
    );
    expect(msg).toContain(beta);
    await expectRefused(
      request(proxy.url, 'GET', `/v1/machines/${alpha}/disks/d1`, { token: betaToken }),
      403,
      'Forbidden',
    );
  });

  it('400 for bad names and numbers, naming the field', async () => {
    const body = makeSegment(address());
    await expectRefused(
      request(proxy.url, 'PUT', `/v1/machines/${alpha}/disks/D_1/segments/1/7`, { body, token: alphaToken }),
      400,
      'InvalidName',
      'disk',
    );
    await expectRefused(
      request(proxy.url, 'PUT', `/v1/machines/${alpha}/disks/-d/segments/1/7`, { body, token: alphaToken }),
      400,
      'InvalidName',
      'disk',
    );
    await expectRefused(
      request(proxy.url, 'PUT', `/v1/machines/${alpha}/disks/d1/segments/x/7`, { body, token: alphaToken }),
      400,
      'InvalidNumber',
      'epoch',
    );
    await expectRefused(
      request(proxy.url, 'PUT', `/v1/machines/${alpha}/disks/d1/segments/1/-7`, { body, token: alphaToken }),
      400,
      'InvalidNumber',
      'seq',
    );
    await expectRefused(
      request(proxy.url, 'PUT', `/v1/machines/${alpha}/disks/d1/segments/1/99999999999999999`, {
        body,
        token: alphaToken,
      }),
      400,
      'InvalidNumber',
      'seq',
    );
    await expectRefused(
      request(proxy.url, 'PUT', `/v1/machines/Alpha/disks/d1/segments/1/7`, { body, token: alphaToken }),
      400,
      'InvalidName',
      'machine',
    );
  });

  it('413 for an oversized body, declared or streamed', async () => {
    const a = address();
    const big = Buffer.alloc(MAX + 1, 1);
    const declared = await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: big, token: alphaToken }),
      413,
      'PayloadTooLarge',
    );
    expect(declared).toContain(String(MAX));
    const huge = Buffer.alloc(4 * MAX, 2);
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: huge, token: alphaToken, chunked: true }),
      413,
      'PayloadTooLarge',
    );
  });

  it('400 for a corrupted segment (checksum, truncation, garbage) and for a header that does not match the URL', async () => {
    const a = address();
    const seg = makeSegment(a);
    const flipped = Buffer.from(seg);
    flipped[200] ^= 0x10;
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: flipped, token: alphaToken }),
      400,
      'InvalidSegment',
      'segment',
    );
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: seg.subarray(0, seg.length - 1), token: alphaToken }),
      400,
      'InvalidSegment',
    );
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: Buffer.from('hello'), token: alphaToken }),
      400,
      'InvalidSegment',
    );
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: Buffer.alloc(0), token: alphaToken }),
      400,
      'InvalidSegment',
    );
    for (const [field, wrong] of [
      ['seq', { ...a, seq: 8 }],
      ['epoch', { ...a, epoch: 2 }],
      ['disk', { ...a, disk: 'd2' }],
    ] as const) {
      const msg = await expectRefused(
        request(proxy.url, 'PUT', segmentPath(a), { body: makeSegment(wrong), token: alphaToken }),
        400,
        'SegmentHeaderMismatch',
        field,
      );
      expect(msg).toContain(field);
    }
    const foreign = makeSegment({ ...a, machine: beta });
    await expectRefused(
      request(proxy.url, 'PUT', segmentPath(a), { body: foreign, token: alphaToken }),
      400,
      'SegmentHeaderMismatch',
      'machine',
    );
  });

  it('404 for unknown routes and 405 for wrong methods', async () => {
    expect((await request(proxy.url, 'GET', '/v2/anything')).status).toBe(404);
    expect((await request(proxy.url, 'POST', '/v1/status')).status).toBe(405);
    expect((await request(proxy.url, 'GET', segmentPath(address()), { token: alphaToken })).status).toBe(405);
  });
});

describe('TLS', () => {
  it('serves HTTPS with a self-signed certificate an agent can pin', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-proxy-tls-'));
    const tlsProxy = await startProxy({
      spoolDir: dir,
      host: '127.0.0.1',
      port: 0,
      settings: testSettings(conn),
      logger: quietLogger,
    });
    try {
      expect(tlsProxy.url).toMatch(/^https:/);
      expect(tlsProxy.fingerprint256).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
      await expect(request(tlsProxy.url, 'GET', '/v1/status')).rejects.toThrow(/self.signed|certificate/i);
      const a = { machine: alpha, disk: 'tls0', epoch: 1, seq: 1 };
      const r = await request(tlsProxy.url, 'PUT', segmentPath(a), {
        body: makeSegment(a),
        token: alphaToken,
        ca: tlsProxy.certificate,
      });
      expect(r.status).toBe(201);
      const status = await request(tlsProxy.url, 'GET', '/v1/status', { ca: tlsProxy.certificate });
      expect(status.json.tls).toEqual({ mode: 'self-signed', fingerprint256: tlsProxy.fingerprint256 });
      await tlsProxy.drained();
    } finally {
      await tlsProxy.stop();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

describe('request limits', () => {
  it('answers 429 with Retry-After while too many segment bytes are being received, and accepts again after', async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-proxy-429-'));
    const small = await startProxy({
      spoolDir: dir,
      host: '127.0.0.1',
      port: 0,
      tls: 'none',
      settings: testSettings(conn),
      logger: quietLogger,
      maxBufferedBytes: 10_000,
    });
    try {
      const slow = { machine: alpha, disk: 'lim0', epoch: 1, seq: 1 };
      const slowBody = makeSegment(slow);
      // Start a request and hold its body half-sent.
      const http = await import('node:http');
      const held = http.request(`${small.url}${segmentPath(slow)}`, {
        method: 'PUT',
        agent: false,
        headers: { authorization: `Bearer ${alphaToken}`, 'content-length': String(slowBody.length) },
      });
      const heldReply = new Promise<number>((resolve, reject) => {
        held.on('response', (res) => {
          res.resume();
          resolve(res.statusCode ?? 0);
        });
        held.on('error', reject);
      });
      held.write(slowBody.subarray(0, 100));
      const other = { ...slow, seq: 2 };
      let r = await request(small.url, 'PUT', segmentPath(other), {
        token: alphaToken,
        body: makeSegment(other),
      });
      // A PUT that got in before the held request reached the handler stored the segment.
      let stored = r.status === 201;
      for (let i = 0; i < 50 && r.status !== 429; i++) {
        // The held request may not have reached the handler yet.
        await new Promise((res) => setTimeout(res, 20));
        r = await request(small.url, 'PUT', segmentPath(other), {
          token: alphaToken,
          body: makeSegment(other),
        });
        stored ||= r.status === 201;
      }
      expect(r.status).toBe(429);
      expect(r.json.error.code).toBe('TooManyRequests');
      expect(Number(r.headers['retry-after'])).toBeGreaterThanOrEqual(1);
      held.end(slowBody.subarray(100));
      expect(await heldReply).toBe(201);
      // Accepted now: new (201), or the same bytes as the one stored before the limit (200).
      expect(
        (await request(small.url, 'PUT', segmentPath(other), { token: alphaToken, body: makeSegment(other) }))
          .status,
      ).toBe(stored ? 200 : 201);
      await small.drained();
    } finally {
      await small.stop();
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
