import fs from 'node:fs';
import path from 'node:path';
import { MultiBar, Presets, type SingleBar } from 'cli-progress';
import { Command, InvalidArgumentError } from 'commander';
import { ConfigError } from '../../shared/errors';
import { createLogger } from '../../shared/logger';
import { MachineAgent, type AgentStatus, type DiskStatus } from './agent';
import { ApiChecksums, ApiDiskEpochs } from './remote-checksums';
import { ImageFileChecksums, type RemoteChecksums } from './sync';

// `lifeboat agent …`: protect a machine's disks against a proxy, and show the agent's status.
// agent/cli.ts mounts agentCommand(); this file also runs on its own (node command.js protect …).

function integer(min: number, max: number) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max)
      throw new InvalidArgumentError(`expected an integer from ${min} to ${max}.`);
    return n;
  };
}

/** 512MiB, 1GiB, 65536 … */
export function parseBytes(value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|K|M|G|T)?$/i.exec(value.trim());
  if (!m) throw new InvalidArgumentError('expected a size such as 65536, 512MiB or 2GiB.');
  const unit = (m[2] ?? 'B').toUpperCase().replace('IB', '');
  const mult: Record<string, number> = { B: 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };
  return Math.floor(Number(m[1]) * mult[unit]);
}

function collectPair(value: string, previous: [string, string][]): [string, string][] {
  const at = value.indexOf('=');
  if (at <= 0 || at === value.length - 1)
    throw new InvalidArgumentError(`expected id=path (e.g. d0=/dev/sdb); got ${JSON.stringify(value)}.`);
  return [...previous, [value.slice(0, at), value.slice(at + 1)]];
}

function defaultJournalDir(machine: string): string {
  return path.resolve(process.env.LIFEBOAT_HOME ?? '.lifeboat', 'agent', machine);
}

/** The credential from a file: the bare token, or registration's JSON answer ({ "credential": … }). */
export function readCredential(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8').trim();
  } catch (err) {
    throw new ConfigError(
      `The credential file ${file} cannot be read (${(err as Error).message}); save the credential registration returned there.`,
      'credentialFile',
    );
  }
  if (text.startsWith('{')) {
    try {
      const parsed = JSON.parse(text) as { credential?: unknown; token?: unknown };
      const token = parsed.credential ?? parsed.token;
      if (typeof token === 'string') return token;
    } catch {
      // fall through
    }
    throw new ConfigError(
      `The credential file ${file} is JSON without a "credential" field.`,
      'credentialFile',
    );
  }
  if (!text)
    throw new ConfigError(
      `The credential file ${file} is empty; save the credential registration returned there.`,
      'credentialFile',
    );
  return text;
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(u === 0 ? 0 : 1)} ${units[u]}`;
}

function formatSeconds(s: number | null | undefined): string {
  if (s === null || s === undefined || !Number.isFinite(s)) return '-';
  if (s < 60) return `${s.toFixed(0)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, '0')}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
}

function diskLine(d: DiskStatus): string {
  if (d.sync) {
    return (
      `${d.mode} ${d.sync.percent.toFixed(1)}% compared ${formatBytes(d.sync.doneBytes)} shipped ${formatBytes(d.sync.shippedBytes)} ` +
      `${formatBytes(d.sync.bytesPerSecond)}/s ETA ${formatSeconds(d.sync.etaSeconds)}`
    );
  }
  return `${d.mode} backlog ${d.backlogSegments} seg / ${formatBytes(d.backlogBytes)}${d.dirtyBlocks ? ` dirty ${formatBytes(d.dirtyBytes)}` : ''}`;
}

/** The status as a readable table. */
export function formatStatus(status: AgentStatus): string {
  const lines: string[] = [];
  const age = (Date.now() - Date.parse(status.updatedAt)) / 1000;
  lines.push(
    `machine ${status.machine}  source ${status.source}  proxy ${status.proxy}${status.nbd ? `  nbd ${status.nbd.host}:${status.nbd.port}` : ''}` +
      `  ${status.running ? (age > 10 ? `(no update for ${formatSeconds(age)}: agent not running?)` : 'running') : 'stopped'}`,
  );
  lines.push(
    `RPO ${formatSeconds(status.rpoSeconds)}  markers cut ${status.markersCut}, skipped ${status.markersSkipped}` +
      `${status.lastMarker ? `  last ${status.lastMarker.kind} ${status.lastMarker.id} at ${new Date(status.lastMarker.time).toISOString()}` : ''}`,
  );
  if (status.lastSkip) lines.push(`last skip: ${status.lastSkip}`);
  if (status.lastHookFailure) {
    const h = status.lastHookFailure;
    lines.push(
      `last hook failure: ${h.hook} (${h.command}) exit ${h.exitCode} at ${new Date(h.at).toISOString()}: ${h.output.split('\n')[0]}`,
    );
  }
  const header = ['DISK', 'MODE', 'SEQ', 'ACKED', 'BACKLOG', 'DIRTY', 'LAG', 'PROXY', 'SYNC'];
  const rows = status.disks.map((d) => [
    d.disk,
    d.mode,
    String(d.nextSeq - 1),
    String(d.ackedSeq),
    `${d.backlogSegments} / ${formatBytes(d.backlogBytes)}`,
    d.dirtyBlocks ? formatBytes(d.dirtyBytes) : '-',
    formatSeconds(d.lagSeconds),
    d.shipper.halted
      ? 'halted'
      : d.shipper.reachable === false
        ? 'unreachable'
        : d.shipper.reachable
          ? 'ok'
          : '?',
    d.sync ? `${d.sync.percent.toFixed(1)}% ETA ${formatSeconds(d.sync.etaSeconds)}` : '-',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const fmt = (r: string[]): string =>
    r
      .map((c, i) => c.padEnd(widths[i]))
      .join('  ')
      .trimEnd();
  lines.push(fmt(header));
  for (const r of rows) lines.push(fmt(r));
  for (const d of status.disks) {
    if (d.resyncReason) lines.push(`${d.disk}: resync because ${d.resyncReason}`);
    if (d.shipper.lastError) lines.push(`${d.disk}: ${d.shipper.lastError}`);
  }
  return lines.join('\n');
}

/** Reads status files: of one machine, or every machine under $LIFEBOAT_HOME/agent. */
export function readStatusFiles(options: { journalDir?: string; machine?: string }): AgentStatus[] {
  const dirs: string[] = [];
  if (options.journalDir) dirs.push(options.journalDir);
  else if (options.machine) dirs.push(defaultJournalDir(options.machine));
  else {
    const root = path.resolve(process.env.LIFEBOAT_HOME ?? '.lifeboat', 'agent');
    if (fs.existsSync(root)) for (const m of fs.readdirSync(root)) dirs.push(path.join(root, m));
  }
  const out: AgentStatus[] = [];
  for (const dir of dirs) {
    try {
      out.push(JSON.parse(fs.readFileSync(path.join(dir, 'status.json'), 'utf8')) as AgentStatus);
    } catch {
      // no agent has run there
    }
  }
  return out;
}

export interface ProtectOptions {
  machine: string;
  disk: [string, string][];
  proxy: string;
  credentialFile: string;
  proxyCa?: string;
  nbdPort: number;
  nbdHost: string;
  journalDir?: string;
  journalMax: number;
  segmentMax: number;
  segmentAge: number;
  crashInterval: number;
  appInterval: number;
  freezeCmd?: string;
  thawCmd?: string;
  scan?: boolean;
  remoteImage: [string, string][];
  api?: string;
  apiKeyFile?: string;
  progress: boolean;
}

/** The function key from a file (its first line). */
export function readApiKey(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8').trim().split('\n')[0].trim();
  } catch (err) {
    throw new ConfigError(
      `The API key file ${file} cannot be read (${(err as Error).message}); save the function key (or the local key of lifeboat up) there.`,
      'apiKeyFile',
    );
  }
  if (!text)
    throw new ConfigError(`The API key file ${file} is empty; save the function key there.`, 'apiKeyFile');
  return text;
}

/**
 * Where a resync gets the cloud copy's checksums: --remote-image for that disk, else the API
 * (--api, --api-key-file), else an empty cloud disk (every non-zero block is sent).
 */
export function remoteChecksumsFromFlags(
  opts: Pick<ProtectOptions, 'machine' | 'remoteImage' | 'api' | 'apiKeyFile'>,
): (disk: string) => RemoteChecksums {
  if (opts.apiKeyFile && !opts.api)
    throw new ConfigError('--api-key-file needs --api <url> (the Lifeboat API the key is for).', 'api');
  const remotes = new Map(opts.remoteImage);
  const key = opts.apiKeyFile ? readApiKey(opts.apiKeyFile) : undefined;
  return (disk) => {
    const image = remotes.get(disk);
    if (image) return new ImageFileChecksums(path.resolve(image));
    if (opts.api) return new ApiChecksums({ apiUrl: opts.api, key, machine: opts.machine, disk });
    return new ImageFileChecksums('/nonexistent/empty-cloud-disk');
  };
}

/** The agent `lifeboat agent protect` runs, from its flags. */
export function protectAgent(opts: ProtectOptions): { agent: MachineAgent; journalDir: string } {
  const credential = readCredential(opts.credentialFile);
  const journalDir = path.resolve(opts.journalDir ?? defaultJournalDir(opts.machine));
  const ca = opts.proxyCa ? fs.readFileSync(opts.proxyCa) : undefined;
  const agent = new MachineAgent({
    machine: opts.machine,
    disks: opts.disk.map(([id, p]) => ({ id, path: path.resolve(p) })),
    journalDir,
    proxy: { url: opts.proxy, credential, ca },
    source: opts.scan ? 'scan' : 'nbd',
    nbd: { port: opts.nbdPort, host: opts.nbdHost },
    crashIntervalSeconds: opts.crashInterval,
    appIntervalSeconds: opts.appInterval,
    freezeCommand: opts.freezeCmd,
    thawCommand: opts.thawCmd,
    segment: {
      maxJournalBytes: opts.journalMax,
      maxSegmentBytes: opts.segmentMax,
      maxSegmentAgeMs: opts.segmentAge * 1000,
    },
    remoteChecksums: remoteChecksumsFromFlags(opts),
    ...(opts.api
      ? {
          cloud: new ApiDiskEpochs({
            apiUrl: opts.api,
            key: opts.apiKeyFile ? readApiKey(opts.apiKeyFile) : undefined,
            machine: opts.machine,
          }),
        }
      : {}),
    logger: createLogger('agent'),
  });
  return { agent, journalDir };
}

/** Shows sync progress bars (TTY) or a line every 10 s, until stopped. */
function startProgress(agent: MachineAgent): () => void {
  if (!process.stdout.isTTY) {
    const t = setInterval(() => {
      const s = agent.status();
      console.log(
        `[${new Date().toISOString()}] RPO ${formatSeconds(s.rpoSeconds)} | ` +
          s.disks.map((d) => `${d.disk}: ${diskLine(d)}`).join(' | '),
      );
    }, 10_000);
    return () => clearInterval(t);
  }
  const multi = new MultiBar(
    {
      format:
        '{disk} {mode} [{bar}] {percentage}% | {rate}/s | ETA {etaText} | backlog {backlog} | RPO {rpo}',
      hideCursor: true,
      clearOnComplete: false,
      stopOnComplete: false,
    },
    Presets.shades_classic,
  );
  const bars = new Map<string, SingleBar>();
  const render = (): void => {
    const s = agent.status();
    for (const d of s.disks) {
      const payload = {
        disk: d.disk,
        mode: d.mode.padEnd(7),
        rate: d.sync ? formatBytes(d.sync.bytesPerSecond) : formatBytes(d.shipper.bytesPerSecond),
        etaText: d.sync ? formatSeconds(d.sync.etaSeconds) : '-',
        backlog: `${d.backlogSegments} seg ${formatBytes(d.backlogBytes)}${d.dirtyBlocks ? ` +${formatBytes(d.dirtyBytes)} dirty` : ''}`,
        rpo: formatSeconds(s.rpoSeconds),
      };
      const value = d.sync ? Math.floor(d.sync.percent) : 100;
      let bar = bars.get(d.disk);
      if (!bar) {
        bar = multi.create(100, value, payload);
        bars.set(d.disk, bar);
      } else bar.update(value, payload);
    }
  };
  const t = setInterval(render, 500);
  render();
  return () => {
    clearInterval(t);
    render();
    multi.stop();
  };
}

async function protect(opts: ProtectOptions): Promise<void> {
  const { agent, journalDir } = protectAgent(opts);
  await agent.start();
  const s = agent.status();
  console.log(
    `Protecting ${opts.machine}: ${s.disks.map((d) => `${d.disk} (${formatBytes(d.sizeBytes)}, ${d.mode})`).join(', ')}` +
      `${s.nbd ? ` over NBD at nbd://${s.nbd.host}:${s.nbd.port}/<disk>` : ' by scanning'}; journal ${journalDir}. Ctrl-C stops cleanly.`,
  );
  const stopProgress = opts.progress ? startProgress(agent) : () => undefined;
  await untilSignalStopped('stopping the agent (draining writes, saving state)', async () => {
    stopProgress();
    await agent.stop();
    console.log('Stopped cleanly.');
  });
}

/**
 * Waits for SIGINT or SIGTERM, then runs `stop` once (saying what it does); a failed stop is
 * reported and sets a non-zero exit code. Resolves when the stop has finished either way.
 */
export function untilSignalStopped(doing: string, stop: () => Promise<void>): Promise<void> {
  return new Promise<void>((resolve) => {
    let stopping = false;
    const onSignal = (signal: string): void => {
      if (stopping) return;
      stopping = true;
      console.log(`\n${signal}: ${doing} …`);
      stop().then(
        () => resolve(),
        (err: unknown) => {
          console.error(
            `The agent did not stop cleanly: ${err instanceof Error ? err.message : String(err)}`,
          );
          process.exitCode = 1;
          resolve();
        },
      );
    };
    process.on('SIGINT', () => onSignal('SIGINT'));
    process.on('SIGTERM', () => onSignal('SIGTERM'));
  });
}

/** `lifeboat agent …` */
export function agentCommand(): Command {
  const agent = new Command('agent').description(
    "The mobility agent: replicate a machine's disks to a proxy.",
  );
  agent
    .command('protect')
    .description(
      'Serve disks over NBD (or scan them), journal every change, and ship it to the proxy until Ctrl-C.',
    )
    .requiredOption('--machine <name>', 'machine name (as registered)')
    .requiredOption(
      '--disk <id=path>',
      'disk id and image file or block device (repeat for each disk)',
      collectPair,
      [],
    )
    .requiredOption('--proxy <url>', 'proxy URL, e.g. https://proxy:9443')
    .requiredOption('--credential-file <file>', "file holding the machine's credential from registration")
    .option('--proxy-ca <file>', 'PEM certificate to trust for the proxy (its self-signed certificate)')
    .option('--nbd-port <port>', 'NBD port (0 picks a free one)', integer(0, 65535), 10809)
    .option('--nbd-host <host>', 'NBD listen address', '127.0.0.1')
    .option('--journal-dir <dir>', 'journal folder (default $LIFEBOAT_HOME/agent/<machine>)')
    .option('--journal-max <size>', 'journal bound before bitmap mode', parseBytes, 1024 ** 3)
    .option('--segment-max <size>', 'cut a segment at this size', parseBytes, 8 * 1024 ** 2)
    .option('--segment-age <seconds>', 'cut a segment when its first change is this old', integer(1, 3600), 5)
    .option(
      '--crash-interval <seconds>',
      'crash-consistent marker (or scan) interval; 0 = off',
      integer(0, 86_400),
      300,
    )
    .option(
      '--app-interval <seconds>',
      'app-consistent marker interval (needs --freeze-cmd); 0 = off',
      integer(0, 86_400),
      0,
    )
    .option('--freeze-cmd <command>', 'run before an app-consistent marker (e.g. "fsfreeze -f /data")')
    .option('--thaw-cmd <command>', 'run after it, always (e.g. "fsfreeze -u /data")')
    .option('--scan', 'scan the disks for changed blocks instead of serving them over NBD')
    .option(
      '--remote-image <id=path>',
      'a local copy of the cloud disk to compare checksums with during resync (default: --api, else an empty cloud disk)',
      collectPair,
      [],
    )
    .option(
      '--api <url>',
      "the Lifeboat API (e.g. https://<function app>/api): initial sync and resync compare with the cloud copy's block checksums and send only blocks that differ",
    )
    .option('--api-key-file <file>', 'file holding the function key for --api (sent as x-functions-key)')
    .option('--no-progress', 'no progress display')
    .action(async (opts: ProtectOptions) => {
      await protect(opts);
    });
  agent
    .command('status')
    .description("Show the agents' replication status (from their status files).")
    .option('--machine <name>', 'one machine (default: every machine under $LIFEBOAT_HOME/agent)')
    .option('--journal-dir <dir>', "the agent's journal folder")
    .option('--json', 'print JSON')
    .action((opts: { machine?: string; journalDir?: string; json?: boolean }) => {
      const statuses = readStatusFiles(opts);
      if (opts.json) {
        console.log(
          JSON.stringify(opts.machine || opts.journalDir ? (statuses[0] ?? null) : statuses, null, 2),
        );
        return;
      }
      if (statuses.length === 0) {
        console.log('No agent status found: start one with `lifeboat agent protect`, or pass --journal-dir.');
        process.exitCode = 1;
        return;
      }
      console.log(statuses.map(formatStatus).join('\n\n'));
    });
  return agent;
}

if (require.main === module) {
  agentCommand()
    .parseAsync(process.argv)
    .catch((err: unknown) => {
      console.error(`lifeboat agent: ${err instanceof Error ? err.message : String(err)}`);
      process.exit(1);
    });
}
