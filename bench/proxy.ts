import { promises as fs } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { startProxy } from '../agent/proxy/proxy';
import { issueCredential, machineCredentialEntity, MACHINES_TABLE } from '../shared/credentials';
import { DEFAULT_CODEC, generateEncryptionKey, CODECS, type Codec } from '../shared/envelope';
import { SegmentBuilder } from '../shared/segment';
import { StorageClients } from '../shared/storage';
import { startAzurite } from '../infra/local/azurite';
import { diskLikeData } from './compression';
import type { BenchResult } from './types';

// Proxy throughput — segments in over HTTP, to encrypted blobs and notifications out — against the
// limit measured in the same run: plain block-blob uploads of the same sizes, with the same
// concurrency, to the same Azurite.

function makeSegments(disks: number, perDisk: number, segmentBytes: number, machine: string): Buffer[][] {
  const source = diskLikeData(Math.min(64 * 1024 * 1024, disks * perDisk * segmentBytes));
  const writeBytes = Math.min(1024 * 1024, segmentBytes);
  const out: Buffer[][] = [];
  let cursor = 0;
  for (let d = 0; d < disks; d++) {
    const list: Buffer[] = [];
    for (let seq = 1; seq <= perDisk; seq++) {
      const b = new SegmentBuilder({ machine, disk: `d${d}`, epoch: 1, seq });
      for (let w = 0; w < segmentBytes / writeBytes; w++) {
        if (cursor + writeBytes > source.length) cursor = 0;
        b.write(
          (seq * segmentBytes + w * writeBytes) % (1 << 30),
          source.subarray(cursor, cursor + writeBytes),
          Date.now(),
        );
        cursor += writeBytes;
      }
      list.push(b.encode());
    }
    out.push(list);
  }
  return out;
}

const keepAlive = new http.Agent({ keepAlive: true });

function put(
  url: string,
  token: string,
  disk: string,
  seq: number,
  machine: string,
  body: Buffer,
): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      `${url}/v1/machines/${machine}/disks/${disk}/segments/1/${seq}`,
      {
        method: 'PUT',
        agent: keepAlive,
        headers: {
          authorization: `Bearer ${token}`,
          'content-type': 'application/octet-stream',
          'content-length': body.length,
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          res.statusCode === 201
            ? resolve()
            : reject(new Error(`proxy answered ${res.statusCode}: ${Buffer.concat(chunks).toString()}`)),
        );
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

export async function run(options: { quick?: boolean; codec?: Codec } = {}): Promise<BenchResult[]> {
  const disks = 4;
  const perDisk = options.quick ? 6 : 16;
  const segmentBytes = options.quick ? 1024 * 1024 : 4 * 1024 * 1024;
  const folder = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-bench-proxy-'));
  const azurite = await startAzurite({ location: path.join(folder, 'azurite') });
  try {
    const conn = azurite.connectionString;
    const clients = StorageClients.fromConnectionString(conn);
    const machine = 'bench';
    const table = clients.table(MACHINES_TABLE);
    await table.createTable().catch(() => undefined);
    const { token, fields } = issueCredential(machine);
    await table.upsertEntity(machineCredentialEntity(machine, fields), 'Merge');
    const segments = makeSegments(disks, perDisk, segmentBytes, machine);
    const totalBytes = segments.flat().reduce((s, b) => s + b.length, 0);
    const mb = totalBytes / 1e6;

    // Reference: the same sizes as raw block blobs, one stream per disk, sequential within it.
    const raw = clients.blobService().getContainerClient('bench-raw');
    await raw.createIfNotExists();
    const uploadRaw = async (round: number): Promise<number> => {
      const start = process.hrtime.bigint();
      await Promise.all(
        segments.map(async (list, d) => {
          for (const [i, body] of list.entries())
            await raw.getBlockBlobClient(`r${round}/d${d}/${i}.bin`).uploadData(body);
        }),
      );
      return Number(process.hrtime.bigint() - start) / 1e9;
    };
    // Warm up once (JIT, Azurite's first writes), then take the better of two timed rounds.
    await uploadRaw(0);
    const rawSeconds = Math.min(await uploadRaw(1), await uploadRaw(2));

    const proxy = await startProxy({
      spoolDir: path.join(folder, 'spool'),
      host: '127.0.0.1',
      port: 0,
      tls: 'none',
      settings: {
        CacheStorage: conn,
        ReplicaStorage: conn,
        ServiceBusConnection: conn,
        LIFEBOAT_ENCRYPTION_KEYS: generateEncryptionKey('k1'),
      },
      uploadConcurrency: disks,
      codec: options.codec,
      logger: pino({ level: 'warn' }),
    });
    let ackSeconds: number;
    let endSeconds: number;
    try {
      const start = process.hrtime.bigint();
      await Promise.all(
        segments.map(async (list, d) => {
          for (const [i, body] of list.entries()) await put(proxy.url, token, `d${d}`, i + 1, machine, body);
        }),
      );
      ackSeconds = Number(process.hrtime.bigint() - start) / 1e9;
      await proxy.drained();
      endSeconds = Number(process.hrtime.bigint() - start) / 1e9;
    } finally {
      await proxy.stop();
    }
    const rawRate = mb / rawSeconds;
    const reference = `raw Azurite block-blob uploads (${disks} streams, ${segmentBytes / 1024 / 1024} MiB each)`;
    const codec = options.codec ?? DEFAULT_CODEC;
    return [
      {
        name: `proxy segments in → encrypted blobs + notifications out (${codec})`,
        value: mb / endSeconds,
        unit: 'MB/s',
        reference,
        referenceValue: rawRate,
        ratio: mb / endSeconds / rawRate,
      },
      {
        name: `proxy acknowledged (durable in the spool) (${codec})`,
        value: mb / ackSeconds,
        unit: 'MB/s',
        reference,
        referenceValue: rawRate,
        ratio: mb / ackSeconds / rawRate,
      },
    ];
  } finally {
    await azurite.stop();
    await fs.rm(folder, { recursive: true, force: true });
  }
}

if (require.main === module) {
  const codecArg = process.argv.find((a) => a.startsWith('--codec='))?.slice('--codec='.length);
  const codec = CODECS.find((c) => c === codecArg);
  void run({ quick: process.argv.includes('--quick'), codec }).then((rows) => {
    for (const r of rows) {
      console.log(
        `${r.name}: ${r.value.toFixed(1)} ${r.unit} vs ${r.reference} ${r.referenceValue.toFixed(1)} ${r.unit} → ratio ${r.ratio.toFixed(2)}`,
      );
    }
  });
}
