/** Helpers for the agent tests: a contract-faithful in-test proxy that records segments, replay, images. */
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { applyRecordsToImage } from '../../../shared/disk-model';
import { decodeSegment, type Segment } from '../../../shared/segment';
import { MachineAgent, type MachineAgentOptions } from '../../../agent/mobility/agent';

export const MiB = 1024 * 1024;
export const CREDENTIAL = `lbm1.m1.${'A'.repeat(43)}`;

export type ProxyBehaviour = 'up' | 'down' | 'throttle';

/**
 * The agent ↔ proxy contract of DESIGN §2, in memory: 201 new, 200 same bytes, 409 other bytes,
 * 429 + Retry-After when throttling; 'down' resets every connection (unreachable).
 */
export class TestProxy {
  readonly segments = new Map<string, Map<number, Buffer>>();
  behaviour: ProxyBehaviour = 'up';
  retryAfterSeconds = 1;
  answers = { created: 0, duplicate: 0, conflict: 0, throttled: 0, refused: 0 };
  private server!: http.Server;
  url = '';

  async start(port = 0): Promise<void> {
    this.server = http.createServer((req, res) => this.handle(req, res));
    await new Promise<void>((resolve) => this.server.listen(port, '127.0.0.1', resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  disk(disk: string): Map<number, Buffer> {
    let m = this.segments.get(disk);
    if (!m) this.segments.set(disk, (m = new Map()));
    return m;
  }

  /** Decoded segments of a disk, in seq order; throws on a gap. */
  decoded(disk: string): Segment[] {
    const m = this.disk(disk);
    const seqs = [...m.keys()].sort((a, b) => a - b);
    seqs.forEach((s, i) => {
      if (i > 0 && s !== seqs[i - 1] + 1)
        throw new Error(`disk ${disk}: gap between seq ${seqs[i - 1]} and ${s}`);
    });
    return seqs.map((s) => decodeSegment(m.get(s) as Buffer));
  }

  /**
   * Replays a disk's segments onto `base` (default zeros) with the reference disk model, up to
   * and including the marker `upTo` (all when omitted). Throws if the marker is not there.
   */
  replay(disk: string, size: number, upTo?: string, base?: Buffer): Buffer {
    const image = base ? Buffer.from(base) : Buffer.alloc(size);
    for (const seg of this.decoded(disk)) {
      const at = upTo === undefined ? -1 : seg.records.findIndex((r) => r.type === 'marker' && r.id === upTo);
      applyRecordsToImage(image, at === -1 ? seg.records : seg.records.slice(0, at + 1));
      if (at !== -1) return image;
    }
    if (upTo !== undefined) throw new Error(`disk ${disk}: marker ${upTo} not received`);
    return image;
  }

  markers(disk: string): string[] {
    return this.decoded(disk).flatMap((s) => s.records.flatMap((r) => (r.type === 'marker' ? [r.id] : [])));
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    if (this.behaviour === 'down') {
      this.answers.refused++;
      req.socket.destroy();
      return;
    }
    const send = (status: number, body: unknown, headers: Record<string, string> = {}): void => {
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(JSON.stringify(body));
    };
    if (req.headers.authorization !== `Bearer ${CREDENTIAL}`)
      return send(401, { error: { code: 'Unauthorized', message: 'bad credential' } });
    const parts = (req.url ?? '').split('/').slice(1);
    if (req.method === 'GET' && parts.length === 5 && parts[0] === 'v1') {
      const m = this.disk(parts[4]);
      const seqs = [...m.keys()];
      return send(200, {
        machine: parts[2],
        disk: parts[4],
        epoch: seqs.length ? 0 : null,
        seq: seqs.length ? Math.max(...seqs) : null,
      });
    }
    if (req.method === 'PUT' && parts.length === 8 && parts[5] === 'segments') {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        if (this.behaviour === 'throttle') {
          this.answers.throttled++;
          return send(
            429,
            { error: { code: 'TooManyRequests', message: 'slow down' } },
            { 'retry-after': String(this.retryAfterSeconds) },
          );
        }
        const body = Buffer.concat(chunks);
        let header;
        try {
          header = decodeSegment(body).header;
        } catch (err) {
          return send(400, { error: { code: 'InvalidSegment', message: (err as Error).message } });
        }
        const seq = Number(parts[7]);
        if (header.seq !== seq || header.disk !== parts[4] || header.machine !== parts[2])
          return send(400, { error: { message: 'header mismatch' } });
        const m = this.disk(parts[4]);
        const existing = m.get(seq);
        if (existing) {
          if (existing.equals(body)) {
            this.answers.duplicate++;
            return send(200, { result: 'duplicate' });
          }
          this.answers.conflict++;
          return send(409, { error: { code: 'Conflict', message: 'other bytes' } });
        }
        m.set(seq, body);
        this.answers.created++;
        send(201, { result: 'created' });
      });
      return;
    }
    send(404, { error: { message: 'no route' } });
  }
}

export function tempDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `lifeboat-${prefix}-`));
}

export function makeImage(dir: string, name: string, size: number, fill?: (b: Buffer) => void): string {
  const file = path.join(dir, `${name}.img`);
  const b = Buffer.alloc(size);
  fill?.(b);
  fs.writeFileSync(file, b);
  return file;
}

export const silentLogger = pino({ level: process.env.TEST_LOG_LEVEL ?? 'silent' });

export function newAgent(
  proxy: TestProxy,
  options: Partial<MachineAgentOptions> & Pick<MachineAgentOptions, 'disks' | 'journalDir'>,
): MachineAgent {
  return new MachineAgent({
    machine: 'm1',
    proxy: { url: proxy.url, credential: CREDENTIAL },
    nbd: { port: 0 },
    crashIntervalSeconds: 0,
    retry: { baseMs: 20, maxMs: 200 },
    logger: silentLogger,
    ...options,
    segment: { maxSegmentBytes: 256 * 1024, maxSegmentAgeMs: 200, ...options.segment },
  });
}

/** Waits until `check` returns true (polling); fails with `what` after `ms`. */
export async function waitFor(check: () => boolean, what: string, ms = 30_000): Promise<void> {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export { assertSameBytes, prng, runTool } from './nbd-harness';
