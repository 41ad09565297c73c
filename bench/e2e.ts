/*
 * End-to-end churn and RPO: the whole local path in one process — fio's nbd engine writes at a
 * steady offered rate (20 MB/s, ASR's per-disk maximum, then 54 MB/s, its per-machine peak)
 * through the agent's NBD export; the agent journals, cuts crash markers at a fixed interval and
 * ships to the proxy; the proxy uploads to Azurite; the local Functions host applies to the seed
 * disk and records recovery points. Per rate: the client's achieved rate and the seed disk's
 * apply rate against the offered rate, each marker's cut → recovery point time against the marker
 * interval, and what the proxy had acknowledged but the cloud had not applied when writes stopped.
 */
import { createWriteStream, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ApiClient } from '../agent/demo/demo';
import { MachineAgent, type MarkerEvent } from '../agent/mobility/agent';
import { startStack, type RunningStack } from '../agent/up';
import { createLogger } from '../shared/logger';
import { exec, preallocatedImage } from './tools';
import type { BenchResult } from './types';

const MiB = 1024 * 1024;
const MACHINE = 'bench-e2e';
const DISK = 'd0';

interface Sample {
  /** ms since 1970, when the answer arrived. */
  at: number;
  appliedBytes: number;
  rpoSeconds: number | null;
}

interface MachineView {
  rpo: { seconds: number | null };
  backlog?: { segments: number; bytes: number };
  disks: { id: string; appliedBytes: number; state: string }[];
}

interface PointView {
  id: string;
  sourceTime: string;
  createdAt: string;
}

interface Phase {
  offered: number;
  achieved: number;
  applyRate: number;
  rpo: number[];
  missing: number;
  apiRpoMax: number;
  backlogBytes: number;
  /** Of backlogBytes, what was still in the proxy's spool (not yet uploaded to the cache). */
  spoolBytes: number;
  agentBacklogBytes: number;
  drainSeconds: number;
}

function percentile(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function allPoints(api: ApiClient): Promise<PointView[]> {
  const out: PointView[] = [];
  let token: string | undefined;
  do {
    const query = `top=1000${token ? `&continuationToken=${encodeURIComponent(token)}` : ''}`;
    const { body } = await api.call<{ value: PointView[]; continuationToken?: string }>(
      'GET',
      `machines/${MACHINE}/recovery-points?${query}`,
    );
    out.push(...body.value);
    token = body.continuationToken;
  } while (token);
  return out;
}

async function machineView(api: ApiClient): Promise<MachineView> {
  return (await api.call<MachineView>('GET', `machines/${MACHINE}`)).body;
}

function applied(view: MachineView): number {
  return view.disks.find((d) => d.id === DISK)?.appliedBytes ?? 0;
}

/** Offered `mbps` for `seconds` through NBD, markers every `intervalSeconds`, then drain. */
async function phase(
  stack: RunningStack,
  api: ApiClient,
  agent: MachineAgent,
  uri: string,
  diskBytes: number,
  mbps: number,
  seconds: number,
  intervalSeconds: number,
  drainLimitMs: number,
): Promise<Phase> {
  const markers: MarkerEvent[] = [];
  const cut = async () => {
    const m = await agent.cutMarker('crash', `e2e ${mbps} MB/s`);
    if (m) markers.push(m);
  };
  const samples: Sample[] = [];
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      try {
        const view = await machineView(api);
        samples.push({ at: Date.now(), appliedBytes: applied(view), rpoSeconds: view.rpo.seconds });
      } catch {
        // a slow or failed status read leaves a gap in the samples, nothing more
      }
      await sleep(1000);
    }
  })();
  const start = Date.now();
  const timer = setInterval(() => void cut(), intervalSeconds * 1000);
  let fioOut: string;
  try {
    fioOut = await exec('fio', [
      '--name=e2e',
      '--ioengine=nbd',
      `--uri=${uri}`,
      `--size=${diskBytes}`,
      '--rw=randwrite',
      '--bs=64k',
      '--iodepth=4',
      `--rate=${mbps * 1_000_000}`,
      '--time_based',
      `--runtime=${seconds}`,
      '--randrepeat=0',
      // Fresh data per write, half compressible: repeated buffers would compress to nothing.
      '--refill_buffers',
      '--buffer_compress_percentage=50',
      '--output-format=json',
    ]);
  } finally {
    clearInterval(timer);
  }
  const end = Date.now();
  await cut();
  // What the proxy took but the cloud has not applied, the moment writes stopped.
  const [proxyStatus, view] = [stack.proxy.status(), await machineView(api)];
  const backlogBytes = proxyStatus.spool.bytes + (view.backlog?.bytes ?? 0);
  const agentBacklogBytes = agent.status().disks.reduce((n, d) => n + d.backlogBytes, 0);

  // Drain: every marker's recovery point recorded, or the limit.
  const wanted = new Set(markers.map((m) => m.id));
  let points: PointView[] = [];
  const drainUntil = Date.now() + drainLimitMs;
  for (;;) {
    points = (await allPoints(api)).filter((p) => wanted.has(p.id));
    if (points.length === wanted.size || Date.now() > drainUntil) break;
    await sleep(500);
  }
  const drainSeconds = (Date.now() - end) / 1000;
  sampling = false;
  await sampler;

  const job = JSON.parse(fioOut.slice(fioOut.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio reported error ${job.error}`);
  const achieved = job.write.bw_bytes / 1e6;

  // Apply rate in steady state: the slope of the applied bytes from 40% into the window to its
  // end, so the pipeline's fill-up time is not counted as slowness.
  const from = samples.find((s) => s.at >= start + 0.4 * (end - start));
  const to = [...samples].reverse().find((s) => s.at <= end + 500);
  const applyRate =
    from && to && to.at > from.at
      ? (to.appliedBytes - from.appliedBytes) / 1e6 / ((to.at - from.at) / 1000)
      : 0;

  const rpo = points.map((p) => (Date.parse(p.createdAt) - Date.parse(p.sourceTime)) / 1000);
  // A point still missing at the drain limit counts with what it has waited so far (a lower bound).
  const givenUp = Date.now();
  const recorded = new Set(points.map((p) => p.id));
  for (const m of markers) if (!recorded.has(m.id)) rpo.push((givenUp - m.time) / 1000);
  const apiRpos = samples.map((s) => s.rpoSeconds).filter((s): s is number => s !== null);
  return {
    offered: mbps,
    achieved,
    applyRate,
    rpo,
    missing: wanted.size - points.length,
    apiRpoMax: apiRpos.length > 0 ? Math.max(...apiRpos) : NaN,
    backlogBytes,
    spoolBytes: proxyStatus.spool.bytes,
    agentBacklogBytes,
    drainSeconds,
  };
}

export async function run(options: { quick?: boolean } = {}): Promise<BenchResult[]> {
  const quick = options.quick ?? false;
  const diskBytes = quick ? 256 * MiB : 1024 * MiB;
  const seconds = quick ? 12 : 60;
  const intervalSeconds = quick ? 3 : 5;
  const drainLimitMs = quick ? 30_000 : 180_000;
  const folder = await fs.mkdtemp(path.join(os.tmpdir(), 'lifeboat-bench-e2e-'));
  const previousLevel = process.env.LIFEBOAT_LOG_LEVEL;
  process.env.LIFEBOAT_LOG_LEVEL = 'warn';
  const hostLog = createWriteStream(path.join(folder, 'host.log'), { flags: 'a' });
  let stack: RunningStack | undefined;
  let agent: MachineAgent | undefined;
  let failed = false;
  try {
    stack = await startStack(
      {
        dataDir: path.join(folder, 'stack'),
        port: 0,
        blobPort: 0,
        queuePort: 0,
        tablePort: 0,
        proxyPort: 0,
        appRoot: path.resolve(__dirname, '..', '..'),
        onHostLog: (l) => hostLog.write(`${l}\n`),
        proxyLogFile: path.join(folder, 'proxy.log'),
      },
      { ...process.env, LIFEBOAT_LOCAL_KEY: '' },
    );
    const api = new ApiClient(stack.apiUrl, stack.functionKey);
    const image = path.join(folder, 'disk.img');
    preallocatedImage(image, diskBytes);
    const { body } = await api.call<{ credential: string }>('PUT', `machines/${MACHINE}`, {
      disks: [{ id: DISK, sizeBytes: diskBytes }],
      policy: { crashConsistentIntervalSeconds: 10, rpoThresholdSeconds: 120, retentionHours: 24 },
    });
    agent = new MachineAgent({
      machine: MACHINE,
      disks: [{ id: DISK, path: image }],
      journalDir: path.join(folder, 'agent'),
      proxy: { url: stack.proxy.url, credential: body.credential, ca: stack.proxy.certificate },
      nbd: { port: 0, host: '127.0.0.1' },
      // The bench cuts the markers itself, so each cut's time is known.
      crashIntervalSeconds: 0,
      logger: createLogger('agent', { machine: MACHINE }, path.join(folder, 'agent.log')),
    });
    await agent.start();
    // Initial sync of an all-zero image (zero records), then one marker so the disk is protected.
    const syncUntil = Date.now() + 300_000;
    while (!agent.status().disks.every((d) => d.mode === 'data')) {
      if (Date.now() > syncUntil) throw new Error('The initial sync did not finish within 300 s.');
      await sleep(250);
    }
    const first = await agent.cutMarker('crash', 'e2e start');
    if (!first) throw new Error(`The agent skipped the first marker: ${agent.status().lastSkip ?? ''}`);
    for (;;) {
      if ((await allPoints(api)).some((p) => p.id === first.id)) break;
      if (Date.now() > syncUntil) throw new Error('The first recovery point did not arrive within 300 s.');
      await sleep(500);
    }
    const nbd = agent.status().nbd as { host: string; port: number };
    const uri = `nbd://127.0.0.1:${nbd.port}/${DISK}`;

    const results: BenchResult[] = [];
    for (const mbps of [20, 54]) {
      const p = await phase(stack, api, agent, uri, diskBytes, mbps, seconds, intervalSeconds, drainLimitMs);
      const p95 = percentile(p.rpo, 95);
      const churnPerInterval = mbps * intervalSeconds;
      const missing =
        p.missing > 0 ? `, ${p.missing} not recorded by the drain limit count as their wait so far` : '';
      results.push(
        {
          name: `${mbps} MB/s offered for ${seconds} s through NBD (fio randwrite 64 KiB): written at the client`,
          value: p.achieved,
          unit: 'MB/s',
          reference: 'offered rate',
          referenceValue: p.offered,
          ratio: p.achieved / p.offered,
        },
        {
          name: `${mbps} MB/s: applied to the seed disk (steady-state slope)`,
          value: p.applyRate,
          unit: 'MB/s',
          reference: 'offered rate',
          referenceValue: p.offered,
          ratio: p.applyRate / p.offered,
        },
        {
          name: `${mbps} MB/s: RPO p95, marker cut → recovery point recorded (p50 ${percentile(p.rpo, 50).toFixed(2)} s, max ${Math.max(...p.rpo).toFixed(2)} s, ${p.rpo.length} points${missing})`,
          value: p95,
          unit: 's',
          reference: 'marker interval',
          referenceValue: intervalSeconds,
          ratio: intervalSeconds / p95,
        },
        {
          name: `${mbps} MB/s: largest RPO the API reported during the run`,
          value: p.apiRpoMax,
          unit: 's',
          reference: 'marker interval',
          referenceValue: intervalSeconds,
          ratio: intervalSeconds / p.apiRpoMax,
        },
        {
          name: `${mbps} MB/s: backlog when writes stopped, acknowledged by the proxy but not applied (encoded bytes: ${(p.spoolBytes / 1e6).toFixed(1)} MB in the proxy's spool, the rest in the cache; ${(p.agentBacklogBytes / 1e6).toFixed(1)} MB more in the agent's journal; ${p.missing > 0 ? `not all applied ${p.drainSeconds.toFixed(0)} s after writes stopped` : `all applied ${p.drainSeconds.toFixed(1)} s after writes stopped`})`,
          value: p.backlogBytes / 1e6,
          unit: 'MB',
          reference: 'churn in one marker interval',
          referenceValue: churnPerInterval,
          ratio: churnPerInterval / Math.max(p.backlogBytes / 1e6, 1e-6),
        },
      );
    }
    return results;
  } catch (err) {
    failed = true;
    throw new Error(`${err instanceof Error ? err.message : String(err)} (logs in ${folder})`);
  } finally {
    await agent?.stop().catch(() => undefined);
    await stack?.stop().catch(() => undefined);
    hostLog.end();
    if (previousLevel === undefined) delete process.env.LIFEBOAT_LOG_LEVEL;
    else process.env.LIFEBOAT_LOG_LEVEL = previousLevel;
    // A failed run keeps its logs (host, proxy, agent) and drops the data.
    for (const data of failed ? ['stack', 'agent', 'disk.img'] : [''])
      await fs.rm(path.join(folder, data), { recursive: true, force: true });
  }
}
