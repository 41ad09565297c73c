import { randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { spawnLocalHost, type HostProcess } from '../../../infra/local/host-process';
import { applyRecordsToImage } from '../../../shared/disk-model';
import { createMessageSender, type MessageSender } from '../../../shared/messaging';
import type { MarkerKind, Segment, SegmentRecord } from '../../../shared/segment';
import type { ReplicationDeps } from '../../../shared/replication';
import { waitFor } from '../../helpers/host';
import { rng, testSettings, uploadSegment } from '../replication/helpers';

export const repoRoot = path.resolve(__dirname, '../../..');
// Wednesdays at noon: the timers do not fire during a test.
export const NEVER = '0 0 12 * * 3';

/**
 * An app root of its own for a test file: the repository's host.json with a task hub of its own
 * (all test files share one Azurite), so two files' engines never take each other's work.
 */
export function isolatedAppRoot(hub: string): string {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-app-'));
  const hostJson = JSON.parse(readFileSync(path.join(repoRoot, 'host.json'), 'utf8')) as {
    extensions: { durableTask: { hubName: string } };
  };
  hostJson.extensions.durableTask.hubName = hub;
  writeFileSync(path.join(dir, 'host.json'), JSON.stringify(hostJson));
  return dir;
}

export interface TestStack {
  settings: Record<string, string>;
  key: string;
  start(): Promise<HostProcess>;
  hosts: HostProcess[];
}

export function testStack(connection: string, name: string, extra: Record<string, string> = {}): TestStack {
  const suffix = randomUUID().slice(0, 8);
  const settings = testSettings(connection, `changelog-${name}-${suffix}`, {
    LIFEBOAT_RETENTION_SCHEDULE: NEVER,
    LIFEBOAT_RPO_SCHEDULE: NEVER,
    LIFEBOAT_APPLY_LEASE_SECONDS: '15',
    LIFEBOAT_LOG_LEVEL: 'warn',
    ...extra,
  });
  const appRoot = isolatedAppRoot(`${name.replace(/[^a-z0-9]/gi, '')}${suffix.replace(/-/g, '')}`);
  const key = `key-${randomUUID()}`;
  const hosts: HostProcess[] = [];
  return {
    settings,
    key,
    hosts,
    start: async () => {
      const host = await spawnLocalHost(
        {
          appRoot,
          entryPoint: path.join(repoRoot, 'functions/index.ts'),
          settings,
          port: 0,
          functionKey: key,
          lockSeconds: 5,
          maxDeliveryCount: 20,
        },
        (line) => (process.env.TEST_HOST_LOG ? process.stderr.write(`${line}\n`) : undefined),
      );
      hosts.push(host);
      return host;
    },
  };
}

/** JSON over the host's HTTP API with the function key. */
export function apiClient(port: () => number, key: string) {
  return async (method: string, route: string, body?: unknown): Promise<{ status: number; body: any }> => {
    const res = await fetch(`http://127.0.0.1:${port()}/api/${route}`, {
      method,
      headers: { 'x-functions-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body),
    });
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = text ? JSON.parse(text) : undefined;
    } catch {
      /* not JSON */
    }
    return { status: res.status, body: parsed };
  };
}

export type Api = ReturnType<typeof apiClient>;

export interface Operation {
  operationId: string;
  name: string;
  status: string;
  progress: any;
  output?: any;
  error?: string;
}

/** Polls GET /api/operations/{id} until `until` holds (default: the operation finished). */
export async function waitForOperation(
  api: Api,
  id: string,
  until: (op: Operation) => boolean = (op) => ['Completed', 'Failed', 'Terminated'].includes(op.status),
  timeoutMs = 45_000,
): Promise<Operation> {
  return waitFor(
    async () => {
      const res = await api('GET', `operations/${id}`);
      return res.status === 200 && until(res.body as Operation) ? (res.body as Operation) : undefined;
    },
    `operation ${id}`,
    timeoutMs,
  );
}

/**
 * A protected machine's write stream and its independent model: writes go into agent-format
 * segments (seq continuing per disk), markers cut all disks at once and snapshot the model.
 */
export class SourceMachine {
  readonly images: Map<string, Buffer>;
  readonly markers = new Map<string, { kind: MarkerKind; time: number; images: Map<string, Buffer> }>();
  private readonly seq = new Map<string, number>();
  private readonly pending = new Map<string, SegmentRecord[]>();
  private readonly random: () => number;
  time: number;

  constructor(
    readonly machine: string,
    readonly disks: { id: string; sizeBytes: number }[],
    seed: number,
    readonly epoch = 1,
  ) {
    this.images = new Map(disks.map((d) => [d.id, Buffer.alloc(d.sizeBytes)]));
    for (const d of disks) {
      this.seq.set(d.id, 0);
      this.pending.set(d.id, []);
    }
    this.random = rng(seed);
    this.time = Date.UTC(2026, 0, 1);
  }

  protected add(disk: string, record: SegmentRecord): void {
    this.pending.get(disk)!.push(record);
    applyRecordsToImage(this.images.get(disk)!, [record]);
  }

  /** `count` random writes and zeroes over the disks. */
  randomWrites(count: number, maxBytes = 64 * 1024): void {
    for (let i = 0; i < count; i++) {
      this.time += 1 + Math.floor(this.random() * 20);
      const disk = this.disks[Math.floor(this.random() * this.disks.length)];
      const sectors = disk.sizeBytes / 512;
      const len = Math.min(sectors, 1 + Math.floor((this.random() * maxBytes) / 512));
      const offset = Math.floor(this.random() * (sectors - len + 1)) * 512;
      if (this.random() < 0.85) {
        const data = Buffer.alloc(len * 512);
        for (let j = 0; j < data.length; j += 4) data.writeUInt32LE((this.random() * 2 ** 32) >>> 0, j);
        this.add(disk.id, { type: 'write', offset, data });
      } else {
        this.add(disk.id, { type: 'zero', offset, length: len * 512 });
      }
    }
  }

  /** One known write (the planned-failover test's "last acknowledged write"). */
  write(disk: string, offset: number, data: Buffer): void {
    this.time += 1;
    this.add(disk, { type: 'write', offset, data });
  }

  /** A consistency marker across every disk; returns its source time. */
  marker(id: string, kind: MarkerKind = 'crash'): number {
    this.time += 10;
    for (const d of this.disks) this.add(d.id, { type: 'marker', id, kind, time: this.time, tag: '' });
    this.markers.set(id, {
      kind,
      time: this.time,
      images: new Map([...this.images].map(([k, v]) => [k, Buffer.from(v)])),
    });
    return this.time;
  }

  /** Cuts what is pending into one segment per disk (the next seq of each). */
  cut(): Segment[] {
    const out: Segment[] = [];
    for (const d of this.disks) {
      const records = this.pending.get(d.id)!;
      if (records.length === 0) continue;
      const seq = this.seq.get(d.id)! + 1;
      this.seq.set(d.id, seq);
      out.push({
        header: {
          machine: this.machine,
          disk: d.id,
          epoch: this.epoch,
          seq,
          firstWriteTime: this.time - 1,
          lastWriteTime: this.time,
        },
        records,
      });
      this.pending.set(d.id, []);
    }
    return out;
  }
}

/** Uploads segments as the proxy does and, unless `nudge` is false, sends their changelog-ready messages. */
export async function ship(
  deps: ReplicationDeps,
  sender: MessageSender,
  segments: Segment[],
  nudge = true,
): Promise<void> {
  for (const s of segments) {
    await uploadSegment(deps, s);
    if (nudge)
      await sender.send({
        body: { machine: s.header.machine, disk: s.header.disk, epoch: s.header.epoch, seq: s.header.seq },
      });
  }
}

export function queueSender(stack: TestStack): MessageSender {
  return createMessageSender(stack.settings, 'ServiceBusConnection', stack.settings.ChangelogQueueName);
}

/** Waits until the machine lists a recovery point with this id. */
export async function waitForPoint(
  api: Api,
  machine: string,
  pointId: string,
  timeoutMs = 30_000,
): Promise<void> {
  await waitFor(
    async () => {
      const res = await api('GET', `machines/${machine}/recovery-points?top=1000`);
      return res.status === 200 && (res.body.value as { id: string }[]).some((p) => p.id === pointId)
        ? true
        : undefined;
    },
    `recovery point ${pointId} of ${machine}`,
    timeoutMs,
  );
}
