/*
 * Group markers on one host: N in-process MachineAgents (one 1 MiB disk each, served over NBD on
 * loopback), the coordinator talking to them over the HTTP transport (BarrierHub on a local
 * server, GroupMemberClient per agent). Each agent's disk gets a closed-loop 4 KiB write stream
 * from a pipelined NBD client (latency = request sent → reply received). Reported per group
 * size: write p50/p99 while group markers run back to back, beside the same workload with no
 * markers, and markers per second. Agents run in process (64 agent processes do not fit the
 * 2-core dev VM's memory and start-up time); the NBD and HTTP paths are real sockets.
 */
import fs from 'node:fs';
import { GroupCoordinator } from '../agent/group/coordinator';
import { GroupParticipant } from '../agent/group/participant';
import { GroupMemberClient } from '../agent/group/transport';
import type { MachineAgent } from '../agent/mobility/agent';
import { GroupNbdClient } from '../test/agent/group/nbd-client';
import { credentialOf, silent, startAgent, tempDir, TestSite } from '../test/agent/group/site';
import type { BenchResult } from './types';

const SIZE = 1024 * 1024;
const PACE_MS = 250;

function percentile(sorted: number[], p: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
}

const now = (): number => Number(process.hrtime.bigint()) / 1e6;

async function workload(
  clients: GroupNbdClient[],
  ms: number,
  spans?: [number, number][],
): Promise<number[]> {
  const latencies: number[] = [];
  const until = Date.now() + ms;
  const block = Buffer.alloc(4096, 7);
  await Promise.all(
    clients.map(async (c, i) => {
      let k = i;
      while (Date.now() < until) {
        const t = now();
        await c.write((k++ * 4096) % SIZE, block);
        const end = now();
        latencies.push(end - t);
        spans?.push([t, end]);
      }
    }),
  );
  return latencies.sort((a, b) => a - b);
}

async function measure(n: number, ms: number): Promise<BenchResult[]> {
  const site = new TestSite();
  await site.start();
  const dir = tempDir(`bench-groups-${n}`);
  const agents: MachineAgent[] = [];
  const clients: GroupNbdClient[] = [];
  const members: GroupMemberClient[] = [];
  try {
    const names = Array.from({ length: n }, (_, i) => `bench-m${i}`);
    for (const m of names) {
      const a = await startAgent(site, dir, m, ['d0'], SIZE);
      agents.push(a);
      clients.push(await GroupNbdClient.connect(a.nbd!.port, 'd0'));
    }
    const hub = site.hub('bench');
    for (const a of agents) {
      const c = new GroupMemberClient(new GroupParticipant(a, { logger: silent }), {
        url: site.url,
        group: 'bench',
        credential: credentialOf(a.machine),
        pollMs: 5_000,
        logger: silent,
      });
      c.start();
      members.push(c);
    }
    const coordinator = new GroupCoordinator({
      group: 'bench',
      members: names.map((m) => hub.link(m)),
      prepareTimeoutMs: 5_000,
      logger: silent,
    });
    await coordinator.runMarker('crash'); // warm up connections

    const base = await workload(clients, ms);
    let markers = 0;
    let aborted = 0;
    let running = true;
    const loop = (async () => {
      while (running) {
        const r = await coordinator.runMarker('crash');
        if (r.decision === 'commit') markers++;
        else aborted++;
      }
    })();
    const started = Date.now();
    const withMarkers = await workload(clients, ms);
    running = false;
    await loop;
    const rate = markers / ((Date.now() - started) / 1000);

    // Paced markers (every PACE_MS, well above the barrier time): the latency of the writes that
    // overlap a barrier — the added latency a write sees when a group marker meets it.
    const windows: [number, number][] = [];
    const spans: [number, number][] = [];
    let pacing = true;
    const paced = (async () => {
      while (pacing) {
        await new Promise((r) => setTimeout(r, PACE_MS));
        if (!pacing) break;
        const t = now();
        const r = await coordinator.runMarker('crash');
        if (r.decision === 'commit') windows.push([t, now()]);
        else aborted++;
      }
    })();
    await workload(clients, ms, spans);
    pacing = false;
    await paced;
    const atMarker = spans
      .filter(([a, b]) => windows.some(([w0, w1]) => a < w1 && b > w0))
      .map(([a, b]) => b - a)
      .sort((x, y) => x - y);
    if (aborted > 0) process.stdout.write(`  (${aborted} markers aborted for ${n} machines)\n`);
    const row = (what: string, p: number): BenchResult => {
      const v = percentile(withMarkers, p);
      const ref = percentile(base, p);
      return {
        name: `group of ${n}: write ${what} with back-to-back group markers`,
        value: v,
        unit: 'ms',
        reference: `same workload, no markers (${what})`,
        referenceValue: ref,
        ratio: ref / v,
      };
    };
    const paceRow = (what: string, p: number): BenchResult => {
      const v = percentile(atMarker, p);
      const ref = percentile(base, p);
      return {
        name: `group of ${n}: write ${what} of writes meeting a marker (one per ${PACE_MS} ms, ${windows.length} markers, ${atMarker.length} writes)`,
        value: v,
        unit: 'ms',
        reference: `same workload, no markers (${what})`,
        referenceValue: ref,
        ratio: ref / v,
      };
    };
    return [
      row('p50', 50),
      row('p99', 99),
      paceRow('p50', 50),
      paceRow('p99', 99),
      {
        name: `group of ${n}: group markers committed`,
        value: rate,
        unit: 'markers/s',
        reference: 'one marker per second (a 1 s group RPO)',
        referenceValue: 1,
        ratio: rate,
      },
    ];
  } finally {
    for (const m of members) await m.stop();
    await Promise.all(clients.map((c) => c.close()));
    await Promise.all(agents.map((a) => a.stop()));
    await site.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export async function run({ quick }: { quick: boolean }): Promise<BenchResult[]> {
  const sizes = quick ? [4, 16] : [4, 16, 64];
  const out: BenchResult[] = [];
  for (const n of sizes) out.push(...(await measure(n, quick ? 2_000 : 5_000)));
  return out;
}

if (require.main === module) {
  void run({ quick: process.argv.includes('--quick') }).then((r) => console.table(r));
}
