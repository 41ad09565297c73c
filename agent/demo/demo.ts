import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { SingleBar, Presets } from 'cli-progress';
import { MachineAgent, type MarkerEvent } from '../mobility/agent';
import { ApiChecksums, ApiDiskEpochs } from '../mobility/remote-checksums';
import { FailoverMachineExport } from '../target/failover-machine';
import { ReprotectTargetRunner } from '../target/reprotect-target';
import type { SyncProgress } from '../mobility/sync';
import { createLogger } from '../../shared/logger';
import { failoverDepsFromSettings } from '../../shared/failover';
import { FAILOVER_DISKS_CONTAINER, failoverDiskName } from '../../shared/failover/compute/local';
import { protectionDepsFromSettings } from '../../shared/reprotect';
import { StorageClients } from '../../shared/storage';
import { startStack, type RunningStack } from '../up';
import { NbdClient } from './nbd-client';
import { checkFilesystem, createSampleDisks, nextVersion, sha256, type SampleDisk } from './disks';

export interface DemoOptions {
  dataDir: string;
  /** Smaller disks and fewer rounds (CI runs this). */
  short: boolean;
  appRoot: string;
  /** Where narration goes (a line at a time). */
  out: (line: string) => void;
  /** Draw progress bars (a terminal); off for CI and logs. */
  progressBars: boolean;
}

export interface DemoStep {
  name: string;
  ok: boolean;
  seconds: number;
  detail?: string;
}

export interface DemoReport {
  ok: boolean;
  machine: string;
  steps: DemoStep[];
  figures: {
    /** Largest RPO the API reported while the workload ran, in seconds. */
    rpoSecondsMax: number | null;
    /** Bytes the workload wrote through NBD, and bytes the agent shipped for them (initial sync included). */
    bytesWritten: number;
    bytesShipped: number;
    recoveryPoints: number;
    /** Request-to-ready time of the (test) failover, in seconds, when it ran. */
    recoveryTimeSeconds: number | null;
  };
  verifications: { name: string; ok: boolean; detail: string }[];
  where: Record<string, string>;
}

class DemoFailure extends Error {}

const MACHINE = 'demo-web';

/** Calls the Lifeboat HTTP API with the local key; errors carry the API's own message. */
export class ApiClient {
  constructor(
    readonly baseUrl: string,
    private readonly key: string,
  ) {}

  async call<T>(method: string, route: string, body?: unknown): Promise<{ status: number; body: T }> {
    const res = await fetch(`${this.baseUrl}/${route}`, {
      method,
      headers: {
        'x-functions-key': this.key,
        ...(body === undefined ? {} : { 'content-type': 'application/json' }),
      },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    const parsed = (text ? JSON.parse(text) : undefined) as T;
    if (res.status >= 400) {
      const message = (parsed as { error?: { message?: string } } | undefined)?.error?.message ?? text;
      throw new DemoFailure(`${method} /api/${route} answered ${res.status}: ${message}`);
    }
    return { status: res.status, body: parsed };
  }
}

async function until<T>(what: string, timeoutMs: number, probe: () => Promise<T | undefined>): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value !== undefined) return value;
    if (Date.now() > deadline)
      throw new DemoFailure(`Timed out after ${Math.round(timeoutMs / 1000)} s waiting for ${what}.`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

interface Operation {
  operationId: string;
  status: string;
  progress: unknown;
  output?: { point?: { id: string }; deleted?: string[] } & Record<string, unknown>;
  error?: string;
}

/** Starts a life-cycle operation and waits for it to finish, narrating its progress. */
async function runOperation(
  api: ApiClient,
  route: string,
  body: unknown,
  say: (line: string) => void,
  onProgress?: (progress: { step?: string; state?: string }) => Promise<void>,
): Promise<{ started: { operationId: string; failoverId?: string }; op: Operation; seconds: number }> {
  const begun = Date.now();
  const { body: started } = await api.call<{ operationId: string; failoverId?: string }>('POST', route, body);
  let lastProgress = '';
  const op = await until(`operation ${started.operationId}`, 180_000, async () => {
    const { body: current } = await api.call<Operation>('GET', `operations/${started.operationId}`);
    const p = (current.progress ?? {}) as { step?: string; state?: string };
    const progress = p.step ?? p.state ?? '';
    if (progress && progress !== lastProgress) {
      lastProgress = progress;
      say(`  … ${progress}`);
    }
    await onProgress?.(p);
    return ['Completed', 'Failed', 'Terminated'].includes(current.status) ? current : undefined;
  });
  if (op.status !== 'Completed')
    throw new DemoFailure(`Operation ${started.operationId} ${op.status}: ${op.error ?? 'no reason given'}`);
  return { started, op, seconds: (Date.now() - begun) / 1000 };
}

interface RecoveryPoint {
  id: string;
  type: string;
  sourceTime: string;
  disks: { id: string; snapshot: string }[];
}

/**
 * The whole job on one machine, narrated: the embedded stack, two sample disks (one with a real
 * file system), protection over the HTTP API, initial sync, a write workload through the agent's
 * NBD export, recovery points and RPO, and the checks of each recovery step.
 */
export async function runDemo(options: DemoOptions): Promise<DemoReport> {
  const say = options.out;
  const report: DemoReport = {
    ok: false,
    machine: MACHINE,
    steps: [],
    figures: {
      rpoSecondsMax: null,
      bytesWritten: 0,
      bytesShipped: 0,
      recoveryPoints: 0,
      recoveryTimeSeconds: null,
    },
    verifications: [],
    where: { data: options.dataDir },
  };
  const sizes = options.short
    ? { d0: 16 * 1024 * 1024, d1: 8 * 1024 * 1024 }
    : { d0: 128 * 1024 * 1024, d1: 64 * 1024 * 1024 };
  const rounds = options.short ? 3 : 6;
  const totalSteps = 10;
  let stepNo = 0;
  const step = async <T>(name: string, run: () => Promise<T>): Promise<T> => {
    stepNo++;
    say(`\n[${stepNo}/${totalSteps}] ${name} …`);
    const started = Date.now();
    try {
      const value = await run();
      report.steps.push({ name, ok: true, seconds: (Date.now() - started) / 1000 });
      return value;
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      report.steps.push({ name, ok: false, seconds: (Date.now() - started) / 1000, detail: message });
      say(`  ✗ ${name} failed: ${message}`);
      say(
        `    Look at the host log (${report.where.hostLog ?? 'in the data folder'}) and the agent journal (${report.where.journal ?? ''}).`,
      );
      throw err;
    }
  };
  const verify = (name: string, ok: boolean, detail: string) => {
    report.verifications.push({ name, ok, detail });
    say(`  ${ok ? '✓' : '✗'} ${name}: ${detail}`);
  };

  rmSync(options.dataDir, { recursive: true, force: true });
  mkdirSync(options.dataDir, { recursive: true });
  let stack: RunningStack | undefined;
  let agent: MachineAgent | undefined;
  try {
    stack = await step(
      'Starting the embedded stack (Azurite, the local Functions host, the proxy)',
      async () => {
        report.where.hostLog = path.join(options.dataDir, 'host.log');
        report.where.proxyLog = path.join(options.dataDir, 'proxy.log');
        report.where.agentLog = path.join(options.dataDir, 'agent.log');
        const { createWriteStream } = await import('node:fs');
        const hostLog = createWriteStream(report.where.hostLog, { flags: 'a' });
        const s = await startStack(
          {
            dataDir: path.join(options.dataDir, 'stack'),
            port: 0,
            blobPort: 0,
            queuePort: 0,
            tablePort: 0,
            proxyPort: 0,
            appRoot: options.appRoot,
            onHostLog: (l) => hostLog.write(`${l}\n`),
            proxyLogFile: report.where.proxyLog,
          },
          { ...process.env, LIFEBOAT_LOCAL_KEY: '' },
        );
        say(`  API ${s.apiUrl}, proxy ${s.proxy.url}, ${s.host.functions.length} functions registered`);
        return s;
      },
    );
    const api = new ApiClient(stack.apiUrl, stack.functionKey);

    const disks = await step(
      'Creating two sample disks (d0 with an ext4 file system and files, d1 raw data)',
      async () => {
        const created = createSampleDisks(path.join(options.dataDir, 'disks'), sizes);
        for (const d of created)
          say(`  ${d.id}: ${d.path}, ${d.sizeBytes / 1048576} MiB${d.filesystem ? ', ext4' : ''}`);
        if (!created[0].filesystem)
          say('  (mkfs.ext4/debugfs not installed: d0 holds raw data, and the file-system check is skipped)');
        return created;
      },
    );

    const credential = await step(
      `Protecting machine ${MACHINE} through the HTTP API (PUT /api/machines/${MACHINE})`,
      async () => {
        const { body } = await api.call<{ credential: string; machine: { health: string } }>(
          'PUT',
          `machines/${MACHINE}`,
          {
            disks: disks.map((d) => ({ id: d.id, sizeBytes: d.sizeBytes })),
            policy: { crashConsistentIntervalSeconds: 10, rpoThresholdSeconds: 120, retentionHours: 24 },
          },
        );
        say(
          `  registered; health ${body.machine.health}; agent credential issued (shown once, kept by the demo)`,
        );
        return body.credential;
      },
    );

    const newAgent = () =>
      new MachineAgent({
        machine: MACHINE,
        disks: disks.map((d) => ({ id: d.id, path: d.path })),
        journalDir: path.join(options.dataDir, 'agent'),
        proxy: { url: stack!.proxy.url, credential, ca: stack!.proxy.certificate },
        nbd: { port: 0, host: '127.0.0.1' },
        crashIntervalSeconds: 0,
        remoteChecksums: (disk) =>
          new ApiChecksums({ apiUrl: stack!.apiUrl, key: stack!.functionKey, machine: MACHINE, disk }),
        cloud: new ApiDiskEpochs({ apiUrl: stack!.apiUrl, key: stack!.functionKey, machine: MACHINE }),
        logger: createLogger('agent', { machine: MACHINE }, report.where.agentLog),
      });

    await step(
      'Initial sync: the agent compares block checksums and ships what the cloud lacks',
      async () => {
        report.where.journal = path.join(options.dataDir, 'agent');
        agent = newAgent();
        const bar = options.progressBars
          ? new SingleBar(
              {
                format: '  {bar} {percentage}% | {value}/{total} MiB | {rate} MiB/s | ETA {eta_formatted}',
                hideCursor: true,
              },
              Presets.shades_classic,
            )
          : undefined;
        const progress = new Map<string, SyncProgress>();
        const total = disks.reduce((n, d) => n + d.sizeBytes, 0);
        bar?.start(Math.round(total / 1048576), 0, { rate: '0' });
        let lastPrinted = -1;
        agent.on('progress', (e: { disk: string; progress: SyncProgress }) => {
          progress.set(e.disk, e.progress);
          const done = [...progress.values()].reduce((n, p) => n + p.doneBytes, 0);
          const rate = [...progress.values()].reduce((n, p) => n + p.bytesPerSecond, 0);
          const percent = Math.floor((done / total) * 100);
          if (bar) bar.update(Math.round(done / 1048576), { rate: (rate / 1048576).toFixed(1) });
          else if (percent >= lastPrinted + 25) {
            lastPrinted = percent;
            say(
              `  ${percent}% compared (${(done / 1048576).toFixed(1)} of ${(total / 1048576).toFixed(0)} MiB)`,
            );
          }
        });
        await agent.start();
        // A fresh disk starts in resync mode; it is in sync once every disk is back in data mode.
        await until('the initial sync to finish', 300_000, async () =>
          agent!.status().disks.every((d) => d.mode === 'data') ? true : undefined,
        );
        bar?.stop();
        const shipped = [...progress.values()].reduce((n, p) => n + p.shippedBytes, 0);
        report.figures.bytesShipped += shipped;
        say(
          `  in sync: ${(shipped / 1048576).toFixed(1)} MiB shipped for ${(total / 1048576).toFixed(0)} MiB of disks (zero blocks travel as zero records)`,
        );
      },
    );

    const expected = new Map<string, Record<string, string>>();
    const markers: MarkerEvent[] = [];
    await step(
      `Running a write workload through the agent's NBD export (${rounds} rounds, a recovery point after each)`,
      async () => {
        const nbd = agent!.status().nbd!;
        const shadow = path.join(options.dataDir, 'shadow');
        mkdirSync(shadow, { recursive: true });
        const clients = new Map<string, NbdClient>();
        for (const d of disks) clients.set(d.id, await NbdClient.connect(nbd.host, nbd.port, d.id));
        for (let round = 1; round <= rounds; round++) {
          let written = 0;
          for (const d of disks) {
            const client = clients.get(d.id)!;
            for (const change of nextVersion(d, shadow, round)) {
              await client.write(change.offset, change.data);
              written += change.data.length;
            }
            await client.flush();
          }
          report.figures.bytesWritten += written;
          const marker = await agent!.cutMarker('crash', `demo round ${round}`);
          if (!marker)
            throw new DemoFailure(
              `The agent did not cut a marker after round ${round} (see its status: lifeboat agent status --journal-dir ${report.where.journal}).`,
            );
          markers.push(marker);
          expected.set(
            marker.id,
            Object.fromEntries(disks.map((d: SampleDisk) => [d.id, sha256(readFileSync(d.path))])),
          );
          say(
            `  round ${round}: ${(written / 1024).toFixed(0)} KiB written and flushed; marker ${marker.id} cut on both disks`,
          );
        }
        for (const c of clients.values()) await c.close();
      },
    );

    await step('Waiting for the recovery points to arrive in the cloud, and reading the RPO', async () => {
      const last = markers[markers.length - 1];
      const points = await until(`recovery point ${last.id}`, 180_000, async () => {
        const { body } = await api.call<{ value: RecoveryPoint[] }>(
          'GET',
          `machines/${MACHINE}/recovery-points`,
        );
        const machine = await api.call<{ rpo: { seconds: number | null } }>('GET', `machines/${MACHINE}`);
        const rpo = machine.body.rpo.seconds;
        if (rpo !== null) report.figures.rpoSecondsMax = Math.max(report.figures.rpoSecondsMax ?? 0, rpo);
        return body.value.some((p) => p.id === last.id) ? body.value : undefined;
      });
      report.figures.recoveryPoints = points.length;
      for (const p of points.slice(0, 3)) say(`  ${p.id}  ${p.type}  source time ${p.sourceTime}`);
      say(`  ${points.length} recovery points; RPO now ${report.figures.rpoSecondsMax ?? '?'} s`);
      const seed = StorageClients.fromConnectionString(stack!.azurite.connectionString)
        .blobService()
        .getContainerClient('seed-disks');
      for (const m of markers) {
        const point = points.find((p) => p.id === m.id);
        if (!point) {
          verify(`recovery point ${m.id}`, false, 'missing');
          continue;
        }
        for (const d of disks) {
          const snapshot = point.disks.find((x) => x.id === d.id)?.snapshot;
          const bytes = snapshot
            ? await seed.getBlobClient(`${MACHINE}/${d.id}.img`).withSnapshot(snapshot).downloadToBuffer()
            : Buffer.alloc(0);
          const same = sha256(bytes) === expected.get(m.id)![d.id];
          let detail = same
            ? `snapshot equals the source at the marker (sha256 ${expected.get(m.id)![d.id].slice(0, 12)}…)`
            : 'snapshot differs from the source at the marker';
          let ok = same;
          if (d.filesystem && m === markers[markers.length - 1]) {
            const image = path.join(options.dataDir, `${m.id}-${d.id}.img`);
            writeFileSync(image, bytes);
            const fsck = checkFilesystem(image);
            if (fsck) {
              ok &&= fsck.ok;
              detail += fsck.ok
                ? '; e2fsck -fn finds the file system clean'
                : `; e2fsck -fn: ${fsck.output.trim().split('\n').slice(-2).join(' ')}`;
            }
          }
          verify(`point ${m.id} disk ${d.id}`, ok, detail);
        }
      }
    });

    const storage = StorageClients.fromConnectionString(stack.azurite.connectionString).blobService();
    /** Compares a failover's disks with the source at its point, and checks the file system. */
    const verifyFailoverDisks = async (label: string, failoverId: string, pointId: string) => {
      const want = expected.get(pointId);
      for (const d of disks) {
        const blob = storage
          .getContainerClient(FAILOVER_DISKS_CONTAINER)
          .getBlobClient(failoverDiskName(MACHINE, d.id, failoverId));
        const bytes = await blob.downloadToBuffer();
        let ok = want !== undefined && sha256(bytes) === want[d.id];
        let detail = want
          ? ok
            ? `equals the source at ${pointId}`
            : `differs from the source at ${pointId}`
          : `point ${pointId} was not cut by this demo`;
        if (d.filesystem) {
          const image = path.join(options.dataDir, `${failoverId}-${d.id}.img`);
          writeFileSync(image, bytes);
          const fsck = checkFilesystem(image);
          if (fsck) {
            ok &&= fsck.ok;
            detail += fsck.ok
              ? '; e2fsck -fn: clean'
              : `; e2fsck -fn: ${fsck.output.trim().split('\n').slice(-2).join(' ')}`;
          }
        }
        verify(`${label} disk ${d.id}`, ok, detail);
      }
    };

    await step(
      'Test failover (a drill) to the latest recovery point, checking its disks, then cleaning it up',
      async () => {
        const { started, op, seconds } = await runOperation(
          api,
          `machines/${MACHINE}/failover`,
          { recoveryPoint: 'latest', test: true },
          say,
        );
        report.figures.recoveryTimeSeconds = seconds;
        const pointId = op.output?.point?.id ?? '';
        say(`  drill ${started.failoverId} ready in ${seconds.toFixed(1)} s at point ${pointId}`);
        await verifyFailoverDisks('drill', started.failoverId!, pointId);
        const { op: cancelled } = await runOperation(api, `machines/${MACHINE}/cancel`, undefined, say);
        const left = [];
        for await (const b of storage
          .getContainerClient(FAILOVER_DISKS_CONTAINER)
          .listBlobsFlat({ prefix: `${MACHINE}/` })) {
          if (b.name.includes(started.failoverId!)) left.push(b.name);
        }
        verify(
          'drill clean-up',
          left.length === 0,
          `${cancelled.output?.deleted?.length ?? 0} blobs and records removed; ${left.length} left`,
        );
      },
    );

    await step('Failover for real (the site is "lost"): latest point, then commit', async () => {
      await agent!.stop();
      agent = undefined;
      say('  agent stopped: the protected machine is gone; everything it acknowledged is in the cloud');
      const { started, op, seconds } = await runOperation(
        api,
        `machines/${MACHINE}/failover`,
        { recoveryPoint: 'latest' },
        say,
      );
      report.figures.recoveryTimeSeconds = seconds;
      const pointId = op.output?.point?.id ?? '';
      const lastMarker = markers[markers.length - 1].id;
      say(`  failover ${started.failoverId} ready in ${seconds.toFixed(1)} s at point ${pointId}`);
      verify(
        'no data loss',
        pointId === lastMarker,
        pointId === lastMarker
          ? `failed over to the last marker the agent cut (${lastMarker})`
          : `point ${pointId}, but the last marker was ${lastMarker}`,
      );
      await verifyFailoverDisks('failover', started.failoverId!, pointId);
      await runOperation(api, `machines/${MACHINE}/commit`, undefined, say);
      say('  committed: the machine now runs from its failover disks');
    });

    await step(
      'Bringing it home: the failed-over machine keeps working, reprotect replicates it back, failback',
      async () => {
        const failoverDeps = failoverDepsFromSettings(stack!.settings);
        const protection = protectionDepsFromSettings(stack!.settings);
        const quiet = createLogger('target', { machine: MACHINE }, path.join(options.dataDir, 'target.log'));
        // The failed-over machine runs from its failover disks; locally they are served over NBD.
        const running = await FailoverMachineExport.start({
          tables: failoverDeps.tables,
          failoverDisks: failoverDeps.failoverDisks,
          machine: MACHINE,
          port: 0,
          pollMs: 200,
          logger: quiet,
        });
        say(
          `  the failed-over machine's disks are served at nbd://${running.address.host}:${running.address.port}/{${running.target.disks.map((d) => d.id).join(',')}}`,
        );
        // Its disks now: the site disks as they were at the last point (the site stopped there).
        const models = new Map<string, SampleDisk>();
        const modelDir = path.join(options.dataDir, 'failed-over');
        mkdirSync(modelDir, { recursive: true });
        for (const d of disks) {
          const model = path.join(modelDir, `${d.id}.img`);
          copyFileSync(d.path, model);
          models.set(d.id, { ...d, path: model });
        }
        const work = async (round: number) => {
          let written = 0;
          for (const d of disks) {
            const model = models.get(d.id)!;
            const client = await NbdClient.connect(running.address.host, running.address.port, d.id);
            for (const change of nextVersion(model, modelDir, round)) {
              await client.write(change.offset, change.data);
              written += change.data.length;
            }
            await client.flush();
            await client.close();
            copyFileSync(path.join(modelDir, `${d.id}.next`), model.path);
          }
          return written;
        };
        say(`  the failed-over machine wrote ${((await work(100)) / 1024).toFixed(0)} KiB`);
        const runner = new ReprotectTargetRunner({
          container: protection.reprotect,
          keyRing: protection.failover.replication.keyRing(),
          tables: protection.tables,
          machine: MACHINE,
          disks: disks.map((d) => ({ id: d.id, path: d.path })),
          stateDir: path.join(options.dataDir, 'target-state'),
          pollMs: 200,
          logger: quiet,
        });
        runner.start();
        try {
          const { body: rp } = await api.call<{ operationId: string }>(
            'POST',
            `machines/${MACHINE}/reprotect`,
            { intervalSeconds: 2 },
          );
          say(`  reprotect ${rp.operationId} started; the site target applies its passes`);
          await until('the first reprotect pass to be applied at the site', 180_000, async () => {
            const { body: op } = await api.call<Operation>('GET', `operations/${rp.operationId}`);
            if (op.status === 'Failed') throw new DemoFailure(`reprotect failed: ${op.error}`);
            const p = op.progress as { lastAppliedPass?: number } | null;
            return (p?.lastAppliedPass ?? 0) >= 1 ? true : undefined;
          });
          say('  first pass applied: only the blocks that differ from the site disks travelled');
          say(`  the failed-over machine wrote ${((await work(101)) / 1024).toFixed(0)} KiB more`);
          // Once the site is verified, the failback asks the site's agent to resume forward
          // protection in a new epoch: the demo starts the agent again, as an operator would.
          const { op, seconds } = await runOperation(
            api,
            `machines/${MACHINE}/failback`,
            { waitSeconds: 120 },
            say,
            async (progress) => {
              if (agent || progress.state !== 'resuming-protection') return;
              agent = newAgent();
              await agent.start();
              say('  the site agent is running again; it picks up the forward resync from the cloud');
            },
          );
          await running.stopped;
          say(
            `  failback done in ${seconds.toFixed(1)} s; forward protection: ${String(op.output?.forwardProtection)}`,
          );
          verify(
            'forward protection resumed',
            op.output?.forwardProtection === 'protected',
            `${String(op.output?.forwardProtection)}; epochs ${JSON.stringify(op.output?.epochs ?? {})}`,
          );
          verify(
            'site ready',
            op.output?.siteReady === true,
            op.output?.siteReady
              ? 'the failback verified the site disks against the final snapshot'
              : 'not reported ready',
          );
          for (const d of disks) {
            const same = sha256(readFileSync(d.path)) === sha256(readFileSync(models.get(d.id)!.path));
            verify(
              `site disk ${d.id} after failback`,
              same,
              same
                ? 'equals the failed-over machine at its stop: no write lost'
                : 'differs from the failed-over machine',
            );
          }
        } finally {
          await runner.stop();
          await running.stop().catch(() => undefined);
        }
      },
    );

    await step(
      'Forward protection from the site: new writes, a new recovery point, equal to the site disks',
      async () => {
        if (!agent) throw new DemoFailure('The site agent is not running.');
        const nbd = agent.status().nbd!;
        const shadow = path.join(options.dataDir, 'shadow-home');
        mkdirSync(shadow, { recursive: true });
        for (const d of disks) {
          const client = await NbdClient.connect(nbd.host, nbd.port, d.id);
          for (const change of nextVersion(d, shadow, 200)) await client.write(change.offset, change.data);
          await client.flush();
          await client.close();
        }
        const marker = await agent.cutMarker('crash', 'back home');
        if (!marker) throw new DemoFailure('The agent did not cut a marker after failback.');
        const want = Object.fromEntries(disks.map((d) => [d.id, sha256(readFileSync(d.path))]));
        const point = await until(`recovery point ${marker.id}`, 120_000, async () => {
          const { body } = await api.call<{ value: RecoveryPoint[] }>(
            'GET',
            `machines/${MACHINE}/recovery-points`,
          );
          return body.value.find((p) => p.id === marker.id);
        });
        const seed = StorageClients.fromConnectionString(stack!.azurite.connectionString)
          .blobService()
          .getContainerClient('seed-disks');
        for (const d of disks) {
          const snapshot = point.disks.find((x) => x.id === d.id)?.snapshot;
          const bytes = snapshot
            ? await seed.getBlobClient(`${MACHINE}/${d.id}.img`).withSnapshot(snapshot).downloadToBuffer()
            : Buffer.alloc(0);
          const same = sha256(bytes) === want[d.id];
          verify(
            `point ${marker.id} disk ${d.id}`,
            same,
            same ? 'equals the site disk: protected again' : 'differs from the site disk',
          );
        }
      },
    );

    report.ok = report.steps.every((s) => s.ok) && report.verifications.every((v) => v.ok);
  } catch (err) {
    if (!(err instanceof DemoFailure)) say(`  (${err instanceof Error ? err.stack : String(err)})`);
    report.ok = false;
  } finally {
    await agent?.stop().catch(() => undefined);
    await stack?.stop().catch(() => undefined);
  }
  return report;
}

export function formatReport(report: DemoReport): string {
  const f = report.figures;
  const lines = [
    '',
    `Lifeboat demo report — ${report.ok ? 'all verifications passed' : 'FAILED'}`,
    `  RPO seen (max)         ${f.rpoSecondsMax ?? 'n/a'} s`,
    `  Recovery time          ${f.recoveryTimeSeconds === null ? 'n/a' : `${f.recoveryTimeSeconds.toFixed(1)} s`}`,
    `  Bytes written          ${(f.bytesWritten / 1048576).toFixed(2)} MiB through NBD`,
    `  Bytes shipped (sync)   ${(f.bytesShipped / 1048576).toFixed(2)} MiB`,
    `  Recovery points        ${f.recoveryPoints}`,
    `  Verifications          ${report.verifications.filter((v) => v.ok).length}/${report.verifications.length} passed`,
    `  Steps                  ${report.steps.map((s) => `${s.ok ? '✓' : '✗'} ${s.name.split(' (')[0]} (${s.seconds.toFixed(1)} s)`).join('\n                         ')}`,
    'Where to look next:',
    ...Object.entries(report.where).map(([k, v]) => `  ${k.padEnd(10)} ${v}`),
    '  docs/       README.md, docs/architecture.md, docs/api.md',
  ];
  return lines.join('\n');
}
