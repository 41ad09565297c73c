import { createHash, randomBytes } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import type { ContainerClient } from '@azure/storage-blob';
import type { QueueClient } from '@azure/storage-queue';
import pino from 'pino';
import { issueCredential, machineCredentialEntity, MACHINES_TABLE } from '../../../shared/credentials';
import { generateEncryptionKey } from '../../../shared/envelope';
import type { LocalQueueEnvelope } from '../../../shared/messaging';
import { SegmentBuilder } from '../../../shared/segment';
import { StorageClients } from '../../../shared/storage';

export const quietLogger = pino({ level: process.env.LIFEBOAT_TEST_LOG ?? 'silent' });

export function testSettings(
  connectionString: string,
  extra: Record<string, string> = {},
): Record<string, string> {
  return {
    CacheStorage: connectionString,
    ReplicaStorage: connectionString,
    ServiceBusConnection: connectionString,
    ChangelogQueueName: `changelog-${randomBytes(4).toString('hex')}`,
    LIFEBOAT_ENCRYPTION_KEYS: generateEncryptionKey('k1'),
    ...extra,
  };
}

/** A name unique to this run, so test files sharing one Azurite do not meet. */
export function uniqueName(prefix: string): string {
  return `${prefix}-${randomBytes(3).toString('hex')}`;
}

/** Registers `machine` the way registration does: a credential hash in the machines table. */
export async function registerMachine(replicaConnection: string, machine: string): Promise<string> {
  const table = StorageClients.fromConnectionString(replicaConnection).table(MACHINES_TABLE);
  await table.createTable().catch(() => undefined);
  const { token, fields } = issueCredential(machine);
  await table.upsertEntity(machineCredentialEntity(machine, fields), 'Merge');
  return token;
}

/**
 * A valid segment whose write data carries a recognisable plaintext pattern (so a test can look
 * for it in blobs): `blocks` 4 KiB writes of text-like, compressible data.
 */
export function makeSegment(
  address: { machine: string; disk: string; epoch: number; seq: number },
  blocks = 2,
): Buffer {
  const builder = new SegmentBuilder(address);
  for (let i = 0; i < blocks; i++) {
    const tag = `${address.machine}/${address.disk}/${address.epoch}/${address.seq}/${i} `;
    const data = Buffer.alloc(4096, `PLAINTEXT-MARKER ${tag}${'lorem ipsum dolor sit amet '.repeat(3)}`);
    builder.write((address.seq * blocks + i) * 4096, data, 1_700_000_000_000 + address.seq);
  }
  return builder.encode();
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: Buffer;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any -- replies are checked field by field
  json: any;
}

/** One HTTP(S) request; a reply that arrives before the body was all sent still counts. */
export function request(
  base: string,
  method: string,
  path: string,
  options: {
    token?: string;
    body?: Buffer;
    headers?: Record<string, string>;
    ca?: Buffer;
    chunked?: boolean;
  } = {},
): Promise<Reply> {
  const url = new URL(path, base);
  const headers: Record<string, string> = { ...(options.headers ?? {}) };
  if (options.token) headers.authorization = `Bearer ${options.token}`;
  if (options.body && !options.chunked) headers['content-length'] = String(options.body.length);
  const lib = url.protocol === 'https:' ? https : http;
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = lib.request(url, { method, headers, ca: options.ca, agent: false }, (res) => {
      answered = true;
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => {
        const body = Buffer.concat(chunks);
        let json: unknown;
        try {
          json = JSON.parse(body.toString('utf8'));
        } catch {
          json = undefined;
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body, json });
      });
      res.on('error', reject);
    });
    req.on('error', (err) => {
      if (!answered) reject(err);
    });
    if (options.body) {
      if (options.chunked) {
        for (let i = 0; i < options.body.length; i += 65536) req.write(options.body.subarray(i, i + 65536));
        req.end();
      } else req.end(options.body);
    } else req.end();
  });
}

export function segmentPath(a: { machine: string; disk: string; epoch: number; seq: number }): string {
  return `/v1/machines/${a.machine}/disks/${a.disk}/segments/${a.epoch}/${a.seq}`;
}

/** Every message in an Azurite queue (as the local host stores them), removing none. */
export async function readNotices(queue: QueueClient): Promise<LocalQueueEnvelope[]> {
  const out: LocalQueueEnvelope[] = [];
  if (!(await queue.exists())) return out;
  for (;;) {
    const got = await queue.receiveMessages({ numberOfMessages: 32, visibilityTimeout: 600 });
    if (got.receivedMessageItems.length === 0) break;
    for (const m of got.receivedMessageItems) out.push(JSON.parse(m.messageText) as LocalQueueEnvelope);
  }
  return out;
}

export async function listBlobNames(container: ContainerClient, prefix: string): Promise<string[]> {
  const names: string[] = [];
  if (!(await container.exists())) return names;
  for await (const b of container.listBlobsFlat({ prefix })) names.push(b.name);
  return names;
}

/** Waits (polling) until `check` returns true; fails after `ms`. */
export async function eventually(
  check: () => Promise<boolean> | boolean,
  ms = 30_000,
  what = 'condition',
): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
