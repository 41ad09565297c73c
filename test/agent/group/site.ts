/** A site for the group tests: a recording proxy for several machines with the barrier hub mounted. */
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { MachineAgent } from '../../../agent/mobility/agent';
import { BarrierHub } from '../../../agent/group/transport';
import { UnauthorizedError } from '../../../shared/errors';
import { applyRecordsToImage } from '../../../shared/disk-model';
import { decodeSegment, type Segment } from '../../../shared/segment';

export const silent = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });

export function credentialOf(machine: string): string {
  return `lbm1.${machine}.${'B'.repeat(43)}`;
}

export class TestSite {
  /** machine/disk → seq → segment bytes */
  readonly segments = new Map<string, Map<number, Buffer>>();
  readonly hubs = new Map<string, BarrierHub>();
  private server!: http.Server;
  url = '';

  async start(): Promise<void> {
    this.server = http.createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    for (const h of this.hubs.values()) h.close();
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  hub(group: string): BarrierHub {
    let h = this.hubs.get(group);
    if (!h)
      this.hubs.set(
        group,
        (h = new BarrierHub(
          group,
          async (authorization, machine) => {
            if (authorization !== `Bearer ${credentialOf(machine)}`)
              throw new UnauthorizedError('bad credential');
          },
          silent,
        )),
      );
    return h;
  }

  decoded(machine: string, disk: string): Segment[] {
    const m = this.segments.get(`${machine}/${disk}`) ?? new Map<number, Buffer>();
    const seqs = [...m.keys()].sort((a, b) => a - b);
    seqs.forEach((s, i) => {
      if (i > 0 && s !== seqs[i - 1] + 1) throw new Error(`${machine}/${disk}: gap at ${s}`);
    });
    return seqs.map((s) => decodeSegment(m.get(s) as Buffer));
  }

  markers(machine: string, disk: string): string[] {
    return this.decoded(machine, disk).flatMap((s) =>
      s.records.flatMap((r) => (r.type === 'marker' ? [r.id] : [])),
    );
  }

  /** The disk replayed with the reference model up to and including `marker`. */
  replay(machine: string, disk: string, size: number, marker: string): Buffer {
    const image = Buffer.alloc(size);
    for (const seg of this.decoded(machine, disk)) {
      const at = seg.records.findIndex((r) => r.type === 'marker' && r.id === marker);
      applyRecordsToImage(image, at === -1 ? seg.records : seg.records.slice(0, at + 1));
      if (at !== -1) return image;
    }
    throw new Error(`${machine}/${disk}: marker ${marker} not received`);
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const parts = (req.url ?? '').split('?')[0].split('/').slice(1);
    if (parts[1] === 'groups') {
      const hub = this.hubs.get(parts[2]);
      if (hub && (await hub.handle(req, res))) return;
    }
    const send = (status: number, body: unknown): void => {
      res.writeHead(status, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    const machine = parts[2];
    if (req.headers.authorization !== `Bearer ${credentialOf(machine)}`)
      return send(401, { error: { message: 'bad credential' } });
    const key = `${machine}/${parts[4]}`;
    let m = this.segments.get(key);
    if (!m) this.segments.set(key, (m = new Map()));
    if (req.method === 'GET' && parts.length === 5) {
      const seqs = [...m.keys()];
      return send(200, {
        machine,
        disk: parts[4],
        epoch: seqs.length ? 0 : null,
        seq: seqs.length ? Math.max(...seqs) : null,
      });
    }
    if (req.method === 'PUT' && parts[5] === 'segments') {
      const chunks: Buffer[] = [];
      for await (const c of req) chunks.push(c as Buffer);
      const body = Buffer.concat(chunks);
      const seq = Number(parts[7]);
      const existing = m.get(seq);
      if (existing)
        return existing.equals(body)
          ? send(200, { result: 'duplicate' })
          : send(409, { error: { message: 'other bytes' } });
      m.set(seq, body);
      return send(201, { result: 'created' });
    }
    send(404, { error: { message: 'no route' } });
  }
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `lifeboat-${prefix}-`));
}

/** A started agent for `machine` with `disks` zero-filled images of `size` bytes, in data mode. */
export async function startAgent(
  site: TestSite,
  dir: string,
  machine: string,
  disks: string[],
  size: number,
): Promise<MachineAgent> {
  const agentDisks = disks.map((id) => {
    const file = path.join(dir, `${machine}-${id}.img`);
    fs.writeFileSync(file, Buffer.alloc(size));
    return { id, path: file };
  });
  const agent = new MachineAgent({
    machine,
    disks: agentDisks,
    journalDir: path.join(dir, `${machine}-journal`),
    proxy: { url: site.url, credential: credentialOf(machine) },
    nbd: { port: 0 },
    crashIntervalSeconds: 0,
    retry: { baseMs: 20, maxMs: 200 },
    logger: silent,
    segment: { maxSegmentBytes: 256 * 1024, maxSegmentAgeMs: 200 },
  });
  await agent.start();
  await agent.settled(30_000);
  return agent;
}
