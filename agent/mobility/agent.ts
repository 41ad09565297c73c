import { spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { ConfigError, ensureError } from '../../shared/errors';
import { createLogger } from '../../shared/logger';
import { validateName } from '../../shared/names';
import { decodeSegment, encodeSegment, isMarkerId, type MarkerKind } from '../../shared/segment';
import { writeFileDurably } from './bitmap';
import {
  CommandClosedError,
  CommandPoller,
  ProxyCommandClient,
  type AgentCommand,
  type AgentResyncProgress,
  type CommandChannel,
  type CommandResult,
  type QuiesceCommand,
  type ResyncCommand,
} from './commands';
import { JournalDamagedError, SegmentJournal, bootId, type DiskMode, type DiskState } from './journal';
import { FileBacking, NbdExport, NbdServer } from './nbd';
import { BlockScanner } from './scan';
import { DiskSegmenter, recoverOpenSegments, type MarkerSpec, type SegmenterOptions } from './segmenter';
import {
  DiskShipper,
  ProxyClient,
  backoffDelay,
  type ProxyClientOptions,
  type RetryPolicy,
  type ShipperStats,
} from './shipper';
import {
  EmptyDiskChecksums,
  SyncInterruptedError,
  UnknownCloudChecksums,
  runCatchup,
  runResync,
  type RemoteChecksums,
  type SyncDevice,
  type SyncProgress,
} from './sync';

export interface AgentDisk {
  /** Disk id (a DNS label); also the NBD export name. */
  id: string;
  /** Image file or block device. */
  path: string;
}

export interface HookResult {
  hook: 'freeze' | 'thaw';
  command: string;
  ok: boolean;
  exitCode: number | null;
  output: string;
  at: number;
}

export interface MarkerEvent {
  id: string;
  kind: MarkerKind;
  time: number;
  tag: string;
  /** The seq of the segment that ends with this marker, per disk. */
  seqs: Record<string, number>;
}

export interface MachineAgentOptions {
  machine: string;
  disks: AgentDisk[];
  /** The machine's journal folder: one sub-folder per disk, plus machine.json and status.json. */
  journalDir: string;
  proxy: ProxyClient | ProxyClientOptions;
  /** 'nbd' (default): serve the disks over NBD and capture every write; 'scan': compare block hashes. */
  source?: 'nbd' | 'scan';
  nbd?: { port?: number; host?: string };
  /** Crash-consistent markers (and, for scans, the scan interval) in seconds; 0 turns them off. Default 300. */
  crashIntervalSeconds?: number;
  /** App-consistent markers in seconds; 0 (default) turns them off. Needs freezeCommand. */
  appIntervalSeconds?: number;
  freezeCommand?: string;
  thawCommand?: string;
  hookTimeoutMs?: number;
  /**
   * Where commands from the cloud (planned failover's quiesce) come from: default, the proxy's
   * command routes with the same URL and credential; false turns polling off. Without proxy
   * options (a ready ProxyClient) there is no default channel.
   */
  commands?: CommandChannel | false;
  /** Command poll interval (default 3 s); the agent also polls after acknowledged segments. */
  commandPollMs?: number;
  /** How long a quiesce waits for every disk to be in data mode before failing (default 10 min). */
  quiesceReadyTimeoutMs?: number;
  /** The cloud copy's checksums for resync (default: an empty cloud disk). Called once per pass. */
  remoteChecksums?: (disk: string, sizeBytes: number) => RemoteChecksums;
  /**
   * Where the agent reads the epoch the cloud's apply is in (the API's GET /machines/{m}). A
   * resync the cloud asked for compares checksums only once the disk is there; without it that
   * resync ships every block.
   */
  cloud?: CloudPosition;
  segment?: Pick<SegmenterOptions, 'maxSegmentBytes' | 'maxSegmentAgeMs' | 'maxJournalBytes' | 'blockBytes'>;
  retry?: RetryPolicy;
  /** Sync passes keep the journal below this fraction of its bound (default 0.5). */
  syncJournalFraction?: number;
  /** How long a clean stop waits for the proxy to take the journal (default 5 s). */
  stopDrainMs?: number;
  logger?: Logger;
  /**
   * Runs while every disk is paused at a marker, after the cut: nothing can change the disks.
   * For consistency checks (tests snapshot the images here).
   */
  whilePaused?: (marker: MarkerSpec) => Promise<void> | void;
}

export interface DiskStatus {
  disk: string;
  path: string;
  sizeBytes: number;
  mode: DiskMode;
  resyncReason?: string;
  epoch: number;
  nextSeq: number;
  ackedSeq: number;
  backlogSegments: number;
  backlogBytes: number;
  dirtyBlocks: number;
  dirtyBytes: number;
  /** Seconds since the oldest change the proxy has not acknowledged (0: nothing pending). */
  lagSeconds: number;
  sync: SyncProgress | null;
  shipper: ShipperStats;
}

export interface AgentStatus {
  machine: string;
  source: 'nbd' | 'scan';
  pid: number;
  startedAt: string;
  updatedAt: string;
  nbd?: { host: string; port: number };
  proxy: string;
  running: boolean;
  /** Age of the newest marker the proxy acknowledged on every disk: the RPO if the site failed now. */
  rpoSeconds: number | null;
  lastMarker: MarkerEvent | null;
  lastSafeMarker: MarkerEvent | null;
  markersCut: number;
  markersSkipped: number;
  lastSkip?: string;
  lastHookFailure?: HookResult;
  /** Set while writes are held after a quiesce (planned failover): new writes wait, unacknowledged. */
  hold?: WriteHold;
  /** The last command carried out, and its answer. */
  lastCommand?: { id: string; type: string; result: CommandResult; at: string };
  disks: DiskStatus[];
}

export interface WriteHold {
  commandId: string;
  failoverId: string;
  markerId: string;
  /** The seq of the segment that ends with the final marker, per disk. */
  seqs: Record<string, number>;
  since: string;
}

interface Protected {
  id: string;
  path: string;
  journal: SegmentJournal;
  segmenter: DiskSegmenter;
  shipper: DiskShipper;
  backing: FileBacking;
  export?: NbdExport;
  device: SyncDevice;
  scanner?: BlockScanner;
  remote: RemoteChecksums;
  sync: SyncProgress | null;
  task?: Promise<void>;
  wake?: () => void;
}

interface MachineFile {
  markerCounter: number;
  /** The last quiesce whose marker was cut (so a command seen again after a restart is not cut twice). */
  quiesced?: WriteHold;
  /** The last resync the cloud asked for, and the marker that ended it once cut. */
  resync?: {
    commandId: string;
    disks: { disk: string; epoch: number }[];
    marker?: { id: string; seqs: Record<string, number>; epochs: Record<string, number> };
  };
}

/** The epoch the cloud's apply has each disk in. */
export interface CloudPosition {
  diskEpoch(disk: string): Promise<number | undefined>;
}

/**
 * The mobility agent for one machine: its disks (each served over NBD or scanned), their
 * journals and shippers, and the machine's one marker sequence. Events: 'marker' (MarkerEvent),
 * 'marker-skipped' ({kind, reason}), 'hook' (HookResult), 'mode' ({disk, mode}), 'fault'.
 */
export class MachineAgent extends EventEmitter {
  readonly machine: string;
  readonly source: 'nbd' | 'scan';
  readonly client: ProxyClient;
  private readonly log: Logger;
  private readonly disks: Protected[] = [];
  private server: NbdServer | undefined;
  private nbdAddress: { host: string; port: number } | undefined;
  private timers: NodeJS.Timeout[] = [];
  private markerChain: Promise<unknown> = Promise.resolve();
  private stopping = false;
  private started = false;
  private machineFile: MachineFile = { markerCounter: 0 };
  private readonly pendingMarkers: MarkerEvent[] = [];
  private lastMarker: MarkerEvent | null = null;
  private lastSafeMarker: MarkerEvent | null = null;
  private markersCut = 0;
  private markersSkipped = 0;
  private lastSkip: string | undefined;
  private lastHookFailure: HookResult | undefined;
  private readonly startedAt = new Date();
  private statusTimer: NodeJS.Timeout | undefined;
  private readonly commands: CommandPoller | undefined;
  private readonly channel: CommandChannel | undefined;
  private hold: WriteHold | undefined;
  private lastCommand: AgentStatus['lastCommand'];

  constructor(private readonly options: MachineAgentOptions) {
    super();
    this.machine = validateName(options.machine, 'machine');
    this.source = options.source ?? 'nbd';
    if (!options.disks.length)
      throw new ConfigError('Name at least one disk to protect: --disk d0=/path/to/image.', 'disk');
    const ids = new Set<string>();
    for (const d of options.disks) {
      validateName(d.id, 'disk');
      if (ids.has(d.id))
        throw new ConfigError(`Disk ${d.id} is listed twice; give each disk its own id.`, 'disk');
      ids.add(d.id);
    }
    if ((options.appIntervalSeconds ?? 0) > 0 && !options.freezeCommand) {
      throw new ConfigError(
        'App-consistent markers need a freeze hook: pass --freeze-cmd (and usually --thaw-cmd), or --app-interval 0.',
        'freezeCommand',
      );
    }
    this.client = options.proxy instanceof ProxyClient ? options.proxy : new ProxyClient(options.proxy);
    this.log = (options.logger ?? createLogger('agent')).child({ machine: this.machine });
    const channel = (this.channel =
      options.commands === false
        ? undefined
        : (options.commands ??
          (options.proxy instanceof ProxyClient
            ? undefined
            : new ProxyCommandClient(options.proxy, this.machine))));
    this.commands = channel
      ? new CommandPoller({
          channel,
          handle: (c) => this.handleCommand(c),
          intervalMs: options.commandPollMs,
          logger: this.log,
        })
      : undefined;
  }

  get statusPath(): string {
    return path.join(this.options.journalDir, 'status.json');
  }

  get nbd(): { host: string; port: number } | undefined {
    return this.nbdAddress;
  }

  /** The disk's segmenter (for tests and tools). */
  segmenter(disk: string): DiskSegmenter {
    return this.get(disk).segmenter;
  }

  shipper(disk: string): DiskShipper {
    return this.get(disk).shipper;
  }

  private get(disk: string): Protected {
    const d = this.disks.find((x) => x.id === disk);
    if (!d) throw new ConfigError(`This agent does not protect a disk ${disk}.`, 'disk');
    return d;
  }

  async start(): Promise<void> {
    if (this.started) return;
    this.started = true;
    fs.mkdirSync(this.options.journalDir, { recursive: true });
    this.machineFile = this.loadMachineFile();
    try {
      for (const spec of this.options.disks) this.disks.push(await this.openDisk(spec));
      if (this.source === 'nbd') {
        this.server = new NbdServer({
          exports: this.disks.map((d) => d.export as NbdExport),
          logger: this.log,
        });
        const addr = await this.server.listen({
          port: this.options.nbd?.port ?? 10809,
          host: this.options.nbd?.host ?? '127.0.0.1',
        });
        this.nbdAddress = { host: addr.address, port: addr.port };
      }
    } catch (err) {
      await this.abortStart();
      throw err;
    }
    for (const d of this.disks) d.task = this.maintain(d);
    const crash = this.options.crashIntervalSeconds ?? 300;
    if (this.source === 'scan') {
      if (crash > 0) this.every(crash, () => this.scanCycle());
    } else {
      if (crash > 0) this.every(crash, () => this.cutMarker('crash'));
      const app = this.options.appIntervalSeconds ?? 0;
      if (app > 0) this.every(app, () => this.cutAppMarker());
    }
    this.commands?.start();
    this.statusTimer = setInterval(() => void this.writeStatus(), 1000);
    this.statusTimer.unref();
    await this.writeStatus();
    this.log.info(
      { disks: this.disks.map((d) => d.id), source: this.source, nbd: this.nbdAddress },
      'agent started',
    );
  }

  private every(seconds: number, fn: () => Promise<unknown>): void {
    const t = setInterval(
      () => void fn().catch((err) => this.log.error({ err }, 'scheduled work failed')),
      seconds * 1000,
    );
    this.timers.push(t);
  }

  private async abortStart(): Promise<void> {
    for (const d of this.disks) {
      await d.export?.close().catch(() => undefined);
      await d.backing.close().catch(() => undefined);
    }
  }

  private loadMachineFile(): MachineFile {
    try {
      const m = JSON.parse(
        fs.readFileSync(path.join(this.options.journalDir, 'machine.json'), 'utf8'),
      ) as MachineFile;
      if (Number.isSafeInteger(m.markerCounter)) return m;
    } catch {
      // first run, or unreadable: marker ids only need to be unique, the time part makes them so
    }
    return { markerCounter: 0 };
  }

  // ---- opening a disk: state, recovery, verdict ----

  private async openDisk(spec: AgentDisk): Promise<Protected> {
    const dir = path.join(this.options.journalDir, spec.id);
    const journal = await SegmentJournal.open(dir);
    const backing = await FileBacking.open(spec.path, { readOnly: this.source === 'scan' });
    const reasons: string[] = [];
    let state: DiskState | undefined;
    try {
      state = journal.loadState();
    } catch (err) {
      reasons.push((err as Error).message);
    }
    if (!state) {
      const fresh = reasons.length === 0;
      state = {
        version: 1,
        machine: this.machine,
        disk: spec.id,
        sizeBytes: backing.size,
        epoch: 0,
        nextSeq: Math.max(1, ...journal.list().map((e) => e.seq + 1)),
        ackedSeq: 0,
        mode: 'resync',
        clean: false,
        updatedAt: new Date().toISOString(),
      };
      if (fresh) reasons.push('initial replication');
    } else {
      if (!state.clean && state.mode !== 'resync') {
        reasons.push(
          'the agent stopped uncleanly: writes may have reached the disk without reaching the journal',
        );
      }
      const rec = await recoverOpenSegments(journal, state);
      if (rec.recovered.length > 0)
        this.log.info(
          { disk: spec.id, seqs: rec.recovered, torn: rec.torn },
          'recovered the open segment written before the stop',
        );
      if (rec.damaged) reasons.push('the open segment file was damaged');
      if (state.sizeBytes !== backing.size) {
        reasons.push(`the disk size changed from ${state.sizeBytes} to ${backing.size} bytes`);
        state.sizeBytes = backing.size;
      }
    }
    const damage = await this.verifyJournal(journal, state);
    if (damage) reasons.push(damage);
    if (state.mode === 'resync' && state.resyncReason && !reasons.includes(state.resyncReason))
      reasons.unshift(state.resyncReason);
    if (reasons.length > 0) {
      state.mode = 'resync';
      state.resyncReason = reasons.join('; ');
    }
    state.clean = false;
    state.bootId = bootId();
    await journal.saveState(state);
    if (state.mode === 'resync')
      this.log.warn({ disk: spec.id, reason: state.resyncReason }, 'disk needs a resync');

    const segmenter = new DiskSegmenter({ journal, state, logger: this.log, ...this.options.segment });
    const shipper = new DiskShipper(segmenter, this.client, this.log, this.options.retry);
    segmenter.on('mode', (mode: DiskMode) => {
      // Catch-up starts only once the proxy has taken a segment (or answered) after this.
      if (mode === 'bitmap') {
        shipper.stats.reachable = undefined;
        shipper.kick();
      }
      this.emit('mode', { disk: spec.id, mode });
      this.wakeDisk(spec.id);
    });
    segmenter.on('fault', (err: Error) => this.emit('fault', { disk: spec.id, error: err }));
    shipper.on('acked', () => {
      this.onAcked();
      this.commands?.poke();
    });
    shipper.on('idle', () => this.wakeDisk(spec.id));
    shipper.on('conflict', (err: Error) => void this.onConflict(spec.id, err));
    let exp: NbdExport | undefined;
    let device: SyncDevice;
    if (this.source === 'nbd') {
      const e = new NbdExport({
        name: spec.id,
        backing,
        journal: segmenter,
        description: `${this.machine}/${spec.id}`,
      });
      e.on('fault', (f: { error: Error; stage: string }) => {
        this.log.error({ disk: spec.id, stage: f.stage, err: f.error }, 'NBD export fault');
        this.emit('fault', { disk: spec.id, error: f.error });
      });
      exp = e;
      device = {
        size: backing.size,
        read: async (offset, length) => {
          const b = Buffer.allocUnsafe(length);
          await e.read(offset, length, b, 0);
          return b;
        },
        pause: () => e.pause(),
        resume: () => e.resume(),
      };
    } else {
      device = {
        size: backing.size,
        read: async (offset, length) => {
          const b = Buffer.allocUnsafe(length);
          await backing.read(b, 0, length, offset);
          return b;
        },
        pause: () => Promise.resolve(),
        resume: () => undefined,
      };
    }
    const remote =
      this.options.remoteChecksums?.(spec.id, backing.size) ??
      new EmptyDiskChecksums(segmenter.bitmap.blockSize);
    const scanner =
      this.source === 'scan'
        ? new BlockScanner({ device, segmenter, remote, blockSize: remote.blockSize })
        : undefined;
    return {
      id: spec.id,
      path: spec.path,
      journal,
      segmenter,
      shipper,
      backing,
      export: exp,
      device,
      scanner,
      remote,
      sync: null,
    };
  }

  /**
   * Checks that the journal holds seqs ackedSeq+1 … nextSeq-1 without gaps and that every
   * segment decodes. A missing or damaged segment is replaced by an empty one (so the cloud side
   * does not wait forever at a gap) and the disk is resynchronised.
   */
  private async verifyJournal(journal: SegmentJournal, state: DiskState): Promise<string | undefined> {
    const entries = journal.list().filter((e) => e.epoch === state.epoch);
    for (const e of journal.list()) if (e.epoch !== state.epoch) await journal.remove(e);
    if (entries.length === 0) return undefined;
    const bad: number[] = [];
    const have = new Set<number>();
    for (const e of entries) {
      have.add(e.seq);
      try {
        const seg = decodeSegment(await journal.read(e));
        if (
          seg.header.seq !== e.seq ||
          seg.header.disk !== state.disk ||
          seg.header.machine !== state.machine
        )
          throw new Error('header mismatch');
      } catch {
        bad.push(e.seq);
      }
    }
    const first = entries[0].seq;
    const last = Math.max(entries[entries.length - 1].seq, state.nextSeq - 1);
    for (let s = first; s <= last; s++) if (!have.has(s)) bad.push(s);
    state.nextSeq = Math.max(state.nextSeq, last + 1);
    if (bad.length === 0) return undefined;
    const now = Date.now();
    for (const seq of bad) {
      const empty = encodeSegment({
        header: {
          machine: state.machine,
          disk: state.disk,
          epoch: state.epoch,
          seq,
          firstWriteTime: now,
          lastWriteTime: now,
        },
        records: [],
      });
      await journal.write(state.epoch, seq, empty);
    }
    return new JournalDamagedError(
      `the journal was damaged (segments ${bad.sort((a, b) => a - b).join(', ')} missing or unreadable)`,
    ).message;
  }

  /** Asks the proxy where the disk stands, then decides: resume, skip what it has, or resync. */
  private async reconcile(d: Protected): Promise<void> {
    const state = d.segmenter.state;
    let attempt = 0;
    for (;;) {
      if (this.stopping) return;
      try {
        const pos = await this.client.getDisk(this.machine, d.id);
        await this.applyProxyPosition(d, pos.epoch, pos.seq);
        return;
      } catch (err) {
        const delay = backoffDelay(attempt++, {
          baseMs: this.options.retry?.baseMs ?? 500,
          maxMs: this.options.retry?.maxMs ?? 60_000,
        });
        d.shipper.stats.reachable = false;
        d.shipper.stats.lastError = ensureError(err).message;
        this.log.warn(
          { disk: d.id, seq: state.nextSeq, delayMs: delay },
          `cannot ask the proxy for the disk's position: ${ensureError(err).message}`,
        );
        await this.waitWake(d, delay);
      }
    }
  }

  private async applyProxyPosition(d: Protected, epoch: number | null, seq: number | null): Promise<void> {
    const { segmenter } = d;
    const state = segmenter.state;
    const acked = seq ?? 0;
    if (epoch !== null && epoch > state.epoch) {
      await this.resetStream(
        d,
        epoch,
        acked + 1,
        `the proxy is at epoch ${epoch}, newer than this agent's ${state.epoch}`,
      );
      // A new epoch another run of this agent began: compare only once the cloud moved there.
      if (this.options.cloud) {
        state.awaitCloudEpoch = epoch;
        await d.journal.saveState(state);
      }
      return;
    }
    if ((epoch === null || epoch === state.epoch) && acked >= state.nextSeq) {
      await this.resetStream(
        d,
        state.epoch,
        acked + 1,
        `the proxy acknowledged seq ${acked}, beyond this agent's last seq ${state.nextSeq - 1} (the agent's state is older than the proxy's)`,
      );
      return;
    }
    const entries = d.journal.list();
    const firstUnacked = entries.length > 0 ? entries[0].seq : state.nextSeq;
    if (epoch === state.epoch || epoch === null) {
      if (acked < firstUnacked - 1) {
        // Segments up to firstUnacked-1 were acknowledged and deleted here, but the proxy does not have them.
        await segmenter.startResync(
          `the proxy reports seq ${seq ?? 'none'} but this agent had seqs up to ${firstUnacked - 1} acknowledged: acknowledged data may have been lost`,
        );
      }
      for (const e of entries) if (e.seq <= acked) await d.journal.remove(e);
      if (acked > state.ackedSeq) state.ackedSeq = acked;
    }
  }

  private async resetStream(d: Protected, epoch: number, nextSeq: number, reason: string): Promise<void> {
    await d.export?.pause();
    try {
      d.segmenter.state.epoch = epoch;
      await d.segmenter.resetStream(nextSeq);
      d.segmenter.state.ackedSeq = nextSeq - 1;
      await d.segmenter.startResync(reason);
    } finally {
      d.export?.resume();
    }
  }

  private async onConflict(disk: string, err: Error): Promise<void> {
    const d = this.get(disk);
    try {
      const pos = await this.client.getDisk(this.machine, disk);
      // Nothing after the conflicting seq was shipped (segments go in order), so the stream
      // continues right after what the proxy holds; the resync re-sends whatever differs.
      const next = (pos.seq ?? 0) + 1;
      await this.resetStream(
        d,
        Math.max(pos.epoch ?? 0, d.segmenter.state.epoch),
        next,
        `the proxy holds other bytes for a segment this agent sent (${err.message})`,
      );
      d.shipper.unhalt();
    } catch (e) {
      this.log.error(
        { disk, err: e },
        'could not recover from a segment conflict; shipping for this disk stays halted',
      );
    }
  }

  // ---- per-disk maintenance: shipping, catch-up, resync ----

  private wakeDisk(disk: string): void {
    const d = this.disks.find((x) => x.id === disk);
    const w = d?.wake;
    if (d) d.wake = undefined;
    w?.();
  }

  private waitWake(d: Protected, ms = 1000): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        d.wake = undefined;
        resolve();
      }, ms);
      d.wake = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }

  private async maintain(d: Protected): Promise<void> {
    await this.reconcile(d);
    if (this.stopping) return;
    d.shipper.start();
    const seg = d.segmenter;
    const fraction = this.options.syncJournalFraction ?? 0.5;
    // Waits while segments (in the journal, or still being cut) would leave no room for the step;
    // with nothing but the open segment pending it goes on (a step larger than the room).
    const waitForRoom = async (bytes: number): Promise<void> => {
      while (
        !this.stopping &&
        seg.backlogBytes + bytes > seg.maxJournalBytes * fraction &&
        seg.backlogBytes > seg.openBytes
      ) {
        await this.waitWake(d, 50);
      }
    };
    // A catch-up step is appended under one pause: it must fit in the room the pass keeps to,
    // or a small journal bound overflows on the pass's own records (back to bitmap mode).
    const catchupBytes = Math.max(
      seg.bitmap.blockSize,
      Math.min(1024 * 1024, Math.floor((seg.maxJournalBytes * fraction) / 2)),
    );
    const pass = {
      device: d.device,
      segmenter: seg,
      shouldStop: () => this.stopping,
      waitForRoom,
      onProgress: (p: SyncProgress) => {
        d.sync = p;
        this.emit('progress', { disk: d.id, progress: p });
      },
    };
    while (!this.stopping) {
      try {
        const mode = seg.mode;
        if (mode === 'resync' && this.source === 'nbd') {
          const epoch = seg.state.epoch;
          const remote =
            seg.state.awaitCloudEpoch !== undefined
              ? await this.awaitCloudEpoch(d, seg.state.awaitCloudEpoch)
              : d.remote;
          this.log.info(
            { disk: d.id, epoch, seq: seg.state.nextSeq, reason: seg.state.resyncReason },
            'resync: comparing block checksums with the cloud copy',
          );
          const p = await runResync({
            ...pass,
            remote,
            shouldStop: () => this.stopping || seg.state.epoch !== epoch,
          });
          d.sync = p;
          await seg.finishSync();
          this.log.info(
            { disk: d.id, comparedBytes: p.doneBytes, shippedBytes: p.shippedBytes, zeroBytes: p.zeroBytes },
            'resync complete',
          );
        } else if (mode === 'catchup') {
          const p = await runCatchup({ ...pass, chunkBytes: catchupBytes });
          d.sync = p;
          if (seg.state.resyncReason) await seg.startResync(seg.state.resyncReason);
          else await seg.finishSync();
          this.log.info({ disk: d.id, shippedBytes: p.shippedBytes }, 'catch-up complete');
        } else if (
          mode === 'bitmap' &&
          d.shipper.stats.reachable === true &&
          d.journal.count === 0 &&
          seg.backlogBytes === 0
        ) {
          await seg.startCatchup();
        } else {
          await this.waitWake(d, 1000);
        }
      } catch (err) {
        if (!(err instanceof SyncInterruptedError))
          this.log.error({ disk: d.id, err }, 'sync pass failed; retrying');
        await this.waitWake(d, 500);
      }
    }
  }

  /**
   * Before a cloud-requested resync compares anything: waits until the cloud's apply moved the
   * disk to the new epoch (from then on the seed changes only by this epoch's segments, which
   * are all applied in order, so a block found equal stays right), then reads fresh checksums.
   * Without a way to ask the cloud, waits until the proxy has seq 1 and ships every block.
   */
  private async awaitCloudEpoch(d: Protected, epoch: number): Promise<RemoteChecksums> {
    const seg = d.segmenter;
    const cloud = this.options.cloud;
    let logged = false;
    for (;;) {
      if (this.stopping || seg.state.epoch !== epoch || seg.mode !== 'resync') {
        throw new SyncInterruptedError(
          `The resync of disk ${d.id} in epoch ${epoch} stopped before the cloud moved there.`,
        );
      }
      if (cloud) {
        try {
          const at = await cloud.diskEpoch(d.id);
          if (at !== undefined && at >= epoch) {
            return (
              this.options.remoteChecksums?.(d.id, d.backing.size) ??
              new UnknownCloudChecksums(seg.bitmap.blockSize)
            );
          }
        } catch (err) {
          this.log.warn(
            { disk: d.id, epoch },
            `cannot read the disk's epoch from the cloud (${ensureError(err).message}); retrying`,
          );
        }
      } else if (seg.state.ackedSeq >= 1) {
        return new UnknownCloudChecksums(seg.bitmap.blockSize);
      }
      if (!logged)
        this.log.info(
          { disk: d.id, epoch },
          'resync: waiting for the cloud to move the disk to the new epoch',
        );
      logged = true;
      await this.waitWake(d, 500);
    }
  }

  private onAcked(): void {
    // A marker is safe once every disk's segment carrying it is acknowledged.
    while (this.pendingMarkers.length > 0) {
      const m = this.pendingMarkers[0];
      const safe = this.disks.every(
        (d) => m.seqs[d.id] === undefined || d.segmenter.state.ackedSeq >= m.seqs[d.id],
      );
      if (!safe) break;
      this.pendingMarkers.shift();
      this.lastSafeMarker = m;
    }
  }

  // ---- markers ----

  /**
   * Cuts a marker across all the machine's disks: pauses every export at one instant, waits for
   * the writes in flight, ends every disk's segment with the same marker record, resumes.
   * Skipped (resolves undefined, emits 'marker-skipped') while any disk is not in data mode.
   */
  cutMarker(
    kind: MarkerKind = 'crash',
    tag = '',
    options: { id?: string } = {},
  ): Promise<MarkerEvent | undefined> {
    if (options.id !== undefined && !isMarkerId(options.id)) {
      return Promise.reject(
        new ConfigError(
          `The marker id ${JSON.stringify(options.id)} is not valid: 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit.`,
          'markerId',
        ),
      );
    }
    const run = this.markerChain.then(() => this.doCutMarker(kind, tag, options.id));
    this.markerChain = run.catch(() => undefined);
    return run;
  }

  private skip(kind: MarkerKind, reason: string): undefined {
    this.markersSkipped += 1;
    this.lastSkip = `${kind} marker skipped: ${reason}`;
    this.log.info({ kind }, this.lastSkip);
    this.emit('marker-skipped', { kind, reason });
    return undefined;
  }

  private notReady(): string | undefined {
    const d = this.disks.find((x) => x.segmenter.mode !== 'data');
    return d ? `disk ${d.id} is in ${d.segmenter.mode} mode` : undefined;
  }

  private async doCutMarker(
    kind: MarkerKind,
    tag: string,
    id?: string,
    final = false,
  ): Promise<MarkerEvent | undefined> {
    if (this.stopping) return undefined;
    if (this.hold && !final)
      return this.skip(
        kind,
        `writes are held for planned failover ${this.hold.failoverId} (marker ${this.hold.markerId} was the last)`,
      );
    const early = this.notReady();
    if (early) return this.skip(kind, early);
    const exps = this.disks.map((d) => d.export).filter((e): e is NbdExport => e !== undefined);
    const drained = Promise.all(exps.map((e) => e.pause()));
    let cuts: Promise<number | undefined>[] = [];
    let spec: MarkerSpec | undefined;
    try {
      await drained;
      const late = this.notReady();
      if (late) return this.skip(kind, late);
      const counter = this.machineFile.markerCounter + 1;
      this.machineFile.markerCounter = counter;
      const time = Date.now();
      spec = { id: id ?? `${kind}-${time.toString(36)}-${counter}`, kind, time, tag };
      const marker = spec;
      cuts = this.disks.map((d) => d.segmenter.cut(marker));
      await this.options.whilePaused?.(marker);
    } finally {
      for (const e of exps) e.resume();
    }
    const seqs = await Promise.all(cuts);
    const event: MarkerEvent = { id: spec.id, kind, time: spec.time, tag, seqs: {} };
    this.disks.forEach((d, i) => (event.seqs[d.id] = seqs[i] as number));
    await writeFileDurably(
      path.join(this.options.journalDir, 'machine.json'),
      JSON.stringify(this.machineFile),
    );
    this.markersCut += 1;
    this.lastMarker = event;
    this.pendingMarkers.push(event);
    this.onAcked();
    this.log.info({ marker: event.id, kind, seqs: event.seqs }, 'marker cut');
    this.emit('marker', event);
    return event;
  }

  /** Freeze hook → app-consistent marker → thaw hook (always). A failed freeze gives a crash-consistent marker. */
  async cutAppMarker(): Promise<MarkerEvent | undefined> {
    const early = this.notReady();
    if (early) return this.skip('app', early);
    const freeze = await this.runHook('freeze', this.options.freezeCommand);
    try {
      if (!freeze || freeze.ok) return await this.cutMarker(freeze ? 'app' : 'crash', freeze ? 'frozen' : '');
      return await this.cutMarker('crash', `freeze failed (exit ${freeze.exitCode})`);
    } finally {
      await this.runHook('thaw', this.options.thawCommand);
    }
  }

  // ---- commands from the cloud: planned failover's quiesce ----

  private async handleCommand(command: AgentCommand): Promise<CommandResult | undefined> {
    let result: CommandResult | undefined;
    if (command.type === 'quiesce') result = await this.quiesce(command);
    else if (command.type === 'resync') result = await this.resync(command);
    else
      result = {
        state: 'failed',
        message: `This agent does not know the command type ${JSON.stringify((command as { type: unknown }).type)}; upgrade the agent.`,
      };
    if (!result) return undefined;
    this.lastCommand = { id: command.id, type: command.type, result, at: new Date().toISOString() };
    this.emit('command', { command, result });
    return result;
  }

  /**
   * Planned failover, site side: freeze hook → hold new writes on every disk (NBD pause, in one
   * synchronous step) → flush the images and journals → cut the final marker with the command's
   * id on every disk → thaw hook (always) → wait until the proxy acknowledged every segment up to
   * the marker → done. Writes stay held (not failed, not acknowledged) until releaseHold() or the
   * agent stops (then they are refused). Every write acknowledged before the hold is before the
   * marker in every disk's stream, so the recovery point at that marker loses none of them.
   *
   * The freeze hook runs before the hold, not inside it: a freeze (fsfreeze, a database
   * checkpoint) writes the application's data to the disks, and with writes held it would wait
   * on itself. The marker is `app` when the freeze hook succeeded; without a hook, or when it
   * failed, it is `crash` (tagged with why): the disks are still exactly as acknowledged.
   */
  async quiesce(command: Pick<QuiesceCommand, 'id' | 'markerId' | 'failoverId'>): Promise<CommandResult> {
    const failed = (message: string): CommandResult => ({ state: 'failed', message });
    if (this.source !== 'nbd') {
      return failed(
        `Machine ${this.machine} is protected by scanning (--scan): the agent cannot hold its writes, so a planned failover cannot guarantee zero data loss; shut the machine down and use an unplanned failover with recoveryPoint "latest".`,
      );
    }
    if (!isMarkerId(command.markerId))
      return failed(`The command's marker id ${JSON.stringify(command.markerId)} is not a valid marker id.`);
    const done = this.machineFile.quiesced;
    if (done && done.commandId === command.id) {
      // Seen again (the answer was lost, or the agent restarted): hold again, never cut twice.
      await this.holdWrites(done);
      return this.finishQuiesce(done);
    }
    if (this.hold)
      return failed(
        `Writes are already held for planned failover ${this.hold.failoverId} (marker ${this.hold.markerId}); release them first.`,
      );
    const readyBy = Date.now() + (this.options.quiesceReadyTimeoutMs ?? 10 * 60_000);
    for (let reason = this.notReady(); reason; reason = this.notReady()) {
      if (this.stopping) return failed('The agent is stopping.');
      if (Date.now() > readyBy)
        return failed(
          `No consistent cut exists yet: ${reason} (initial sync, resync or catch-up still running); retry the planned failover when the disks are in data mode.`,
        );
      await new Promise((r) => setTimeout(r, 200));
    }
    const freeze = await this.runHook('freeze', this.options.freezeCommand);
    let event: MarkerEvent | undefined;
    let hold: WriteHold | undefined;
    try {
      const cut = this.markerChain.then(async () => {
        const exps = this.disks.map((d) => d.export as NbdExport);
        const drained = exps.map((e) => e.pause());
        hold = {
          commandId: command.id,
          failoverId: command.failoverId,
          markerId: command.markerId,
          seqs: {},
          since: new Date().toISOString(),
        };
        this.hold = hold;
        await Promise.all(drained);
        await Promise.all(exps.map((e) => e.flush()));
        const kind: MarkerKind = freeze?.ok ? 'app' : 'crash';
        const tag = !freeze
          ? 'planned failover, no freeze hook'
          : freeze.ok
            ? 'planned failover, frozen'
            : `planned failover, freeze failed (exit ${freeze.exitCode})`;
        return this.doCutMarker(kind, tag, command.markerId, true);
      });
      this.markerChain = cut.catch(() => undefined);
      event = await cut;
    } catch (err) {
      this.releaseHold();
      return failed(`The final marker could not be cut: ${ensureError(err).message}`);
    } finally {
      await this.runHook('thaw', this.options.thawCommand);
    }
    if (!event || !hold) {
      this.releaseHold();
      return failed(`The final marker could not be cut: ${this.lastSkip ?? 'the agent is stopping'}.`);
    }
    hold.seqs = event.seqs;
    this.machineFile.quiesced = hold;
    await writeFileDurably(
      path.join(this.options.journalDir, 'machine.json'),
      JSON.stringify(this.machineFile),
    );
    this.log.info(
      { failoverId: hold.failoverId, marker: event.id, kind: event.kind, seqs: event.seqs },
      'quiesced: final marker cut, writes held',
    );
    const result = await this.finishQuiesce(hold);
    if (result.state === 'done' && freeze && !freeze.ok)
      result.message += ` The freeze hook failed (exit ${freeze.exitCode}), so the point is crash-consistent.`;
    return result;
  }

  /** Holds writes on every disk (idempotent) for an already cut final marker. */
  private async holdWrites(hold: WriteHold): Promise<void> {
    if (this.hold) return;
    this.hold = hold;
    const exps = this.disks.map((d) => d.export as NbdExport);
    const drained = exps.map((e) => e.pause());
    await Promise.all(drained);
  }

  /** Waits until the proxy acknowledged every segment up to the final marker. */
  private async finishQuiesce(hold: WriteHold): Promise<CommandResult> {
    for (;;) {
      const waiting = this.disks.find(
        (d) => hold.seqs[d.id] !== undefined && d.segmenter.state.ackedSeq < hold.seqs[d.id],
      );
      if (!waiting) break;
      if (this.stopping)
        return {
          state: 'failed',
          message: `The agent stopped before the proxy acknowledged disk ${waiting.id} up to the final marker ${hold.markerId}.`,
        };
      await new Promise((r) => setTimeout(r, 100));
    }
    const seqs = Object.entries(hold.seqs)
      .map(([d, seq]) => `${d} seq ${seq}`)
      .join(', ');
    return {
      state: 'done',
      message: `Final marker ${hold.markerId} cut and acknowledged by the proxy (${seqs}); writes are held.`,
    };
  }

  /** Admits the writes held since a quiesce (e.g. the planned failover was cancelled). */
  releaseHold(): void {
    if (!this.hold) return;
    this.hold = undefined;
    for (const d of this.disks) d.export?.resume();
    this.log.info('held writes released');
  }

  // ---- commands from the cloud: resync in a new epoch ----

  /**
   * A resync the cloud asked for (docs/agent.md, "Cloud-requested resync"): each listed disk's
   * stream moves to the command's epoch (what is open in the old one is sealed and shipped
   * first; seq 1 of the new epoch is an empty segment), the checksum resync runs once the cloud
   * applies from that epoch, progress goes to the command, and when every disk is back in data
   * mode a marker is cut and shipped, so recovery points resume. Idempotent: a disk already in
   * the epoch is not moved again; the command and its marker are recorded in machine.json, so a
   * command seen again after a restart carries on (or only waits for its marker) instead of
   * starting over. Resolves undefined when the agent stops meanwhile: the command stays pending.
   */
  async resync(
    command: Pick<ResyncCommand, 'id' | 'operationId' | 'disks'>,
  ): Promise<CommandResult | undefined> {
    const failed = (message: string): CommandResult => ({ state: 'failed', message });
    if (this.source !== 'nbd') {
      return failed(
        `Machine ${this.machine} is protected by scanning (--scan); a resync the cloud asks for is carried out only by an agent serving the disks over NBD.`,
      );
    }
    const targets: { d: Protected; epoch: number }[] = [];
    for (const { disk, epoch } of command.disks) {
      const d = this.disks.find((x) => x.id === disk);
      if (!d)
        return failed(
          `This agent does not protect a disk ${disk} of machine ${this.machine}; it protects ${this.disks.map((x) => x.id).join(', ')}.`,
        );
      if (!Number.isSafeInteger(epoch) || epoch < 1)
        return failed(
          `The command's epoch ${JSON.stringify(epoch)} for disk ${disk} is not a positive integer.`,
        );
      targets.push({ d, epoch });
    }
    let record = this.machineFile.resync;
    if (record?.commandId !== command.id) {
      record = { commandId: command.id, disks: command.disks.map(({ disk, epoch }) => ({ disk, epoch })) };
      this.machineFile.resync = record;
      await writeFileDurably(
        path.join(this.options.journalDir, 'machine.json'),
        JSON.stringify(this.machineFile),
      );
    }
    if (!record.marker) {
      for (const { d, epoch } of targets) {
        if (d.segmenter.state.epoch >= epoch) continue; // moved already (a restart, or the command seen again)
        await d.export?.pause();
        try {
          await d.segmenter.startEpoch(
            epoch,
            `the cloud asked for a resync in epoch ${epoch} (command ${command.id})`,
          );
        } finally {
          d.export?.resume();
        }
        d.sync = null;
        this.pendingMarkers.splice(0); // their seqs were in the old epoch
        this.wakeDisk(d.id);
      }
      const outcome = await this.followResync(command.id, targets);
      if (outcome) return outcome;
      // Every disk compared and shipped its differences: a marker lets recovery points resume.
      for (;;) {
        if (this.stopping) return undefined;
        if (this.hold)
          return failed(
            `Writes are held for planned failover ${this.hold.failoverId}; no marker can end the resync.`,
          );
        const moved = targets.find(({ d, epoch }) => d.segmenter.state.epoch !== epoch);
        if (moved)
          return failed(
            `Disk ${moved.d.id} moved on to epoch ${moved.d.segmenter.state.epoch} before the resync in epoch ${moved.epoch} ended.`,
          );
        const event = await this.cutMarker('crash', `resync ${command.operationId}`).catch(() => undefined);
        if (event) {
          record.marker = {
            id: event.id,
            seqs: event.seqs,
            epochs: Object.fromEntries(this.disks.map((x) => [x.id, x.segmenter.state.epoch])),
          };
          await writeFileDurably(
            path.join(this.options.journalDir, 'machine.json'),
            JSON.stringify(this.machineFile),
          );
          break;
        }
        await new Promise((r) => setTimeout(r, 250)); // another disk is still syncing
      }
    }
    const marker = record.marker;
    for (;;) {
      const waiting = this.disks.find(
        (d) =>
          marker.seqs[d.id] !== undefined &&
          d.segmenter.state.epoch === marker.epochs[d.id] &&
          d.segmenter.state.ackedSeq < marker.seqs[d.id],
      );
      if (!waiting) break;
      if (this.stopping) return undefined;
      await new Promise((r) => setTimeout(r, 100));
    }
    await this.reportResync(command.id, targets).catch(() => undefined);
    const summary = targets
      .map(({ d, epoch }) => `${d.id} epoch ${epoch}: ${d.sync?.shippedBytes ?? 0} bytes shipped`)
      .join(', ');
    return {
      state: 'done',
      message: `Resync complete (${summary}); marker ${marker.id} cut and acknowledged by the proxy.`,
    };
  }

  /** Waits until every disk of the resync is back in data mode in its epoch, reporting progress each second. */
  private async followResync(
    commandId: string,
    targets: { d: Protected; epoch: number }[],
  ): Promise<CommandResult | undefined> {
    let lastReport = 0;
    for (;;) {
      if (this.stopping) return undefined;
      const left = targets.filter(
        ({ d, epoch }) => d.segmenter.state.epoch === epoch && d.segmenter.mode !== 'data',
      );
      const moved = targets.find(({ d, epoch }) => d.segmenter.state.epoch > epoch);
      if (moved)
        return {
          state: 'failed',
          message: `Disk ${moved.d.id} moved on to epoch ${moved.d.segmenter.state.epoch}; this resync (epoch ${moved.epoch}) is superseded.`,
        };
      if (left.length === 0) return undefined;
      if (Date.now() - lastReport >= 1000) {
        lastReport = Date.now();
        try {
          await this.reportResync(commandId, targets);
        } catch (err) {
          if (err instanceof CommandClosedError)
            return {
              state: 'failed',
              message: `The cloud closed the command before the resync ended (${err.message}).`,
            };
          this.log.debug({ command: commandId, err }, 'resync progress not reported');
        }
      }
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  private resyncProgress(targets: { d: Protected; epoch: number }[]): Record<string, AgentResyncProgress> {
    const out: Record<string, AgentResyncProgress> = {};
    for (const { d } of targets) {
      const done = d.segmenter.mode === 'data';
      const p = d.sync?.kind === 'resync' ? d.sync : undefined;
      out[d.id] = {
        comparedBytes: done ? d.segmenter.state.sizeBytes : (p?.doneBytes ?? 0),
        shippedBytes: p?.shippedBytes ?? 0,
      };
    }
    return out;
  }

  private async reportResync(commandId: string, targets: { d: Protected; epoch: number }[]): Promise<void> {
    await this.channel?.reportProgress?.(commandId, this.resyncProgress(targets));
  }

  /** Polls for commands now and carries them out (tests, tools). */
  async pollCommands(): Promise<void> {
    await this.commands?.pollOnce();
  }

  /** Runs a hook with /bin/sh; failures are logged, kept for status and emitted, never thrown. */
  async runHook(hook: 'freeze' | 'thaw', command: string | undefined): Promise<HookResult | undefined> {
    if (!command) return undefined;
    const timeout = this.options.hookTimeoutMs ?? 60_000;
    const result = await new Promise<HookResult>((resolve) => {
      let output = '';
      const child = spawn('/bin/sh', ['-c', command], {
        env: {
          ...process.env,
          LIFEBOAT_HOOK: hook,
          LIFEBOAT_MACHINE: this.machine,
          LIFEBOAT_DISKS: this.disks.map((d) => `${d.id}=${d.path}`).join(' '),
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      const keep = (c: Buffer): void => {
        if (output.length < 4096) output += c.toString('utf8');
      };
      child.stdout.on('data', keep);
      child.stderr.on('data', keep);
      const timer = setTimeout(() => {
        output += `\n(killed after ${timeout} ms)`;
        child.kill('SIGKILL');
      }, timeout);
      child.on('error', (err) => {
        clearTimeout(timer);
        resolve({ hook, command, ok: false, exitCode: null, output: err.message, at: Date.now() });
      });
      child.on('close', (code) => {
        clearTimeout(timer);
        resolve({ hook, command, ok: code === 0, exitCode: code, output: output.trim(), at: Date.now() });
      });
    });
    if (!result.ok) {
      this.lastHookFailure = result;
      this.log.error(
        { hook, exitCode: result.exitCode, output: result.output },
        `${hook} hook failed: ${command}`,
      );
    }
    this.emit('hook', result);
    return result;
  }

  // ---- scan source ----

  /** One scan of every disk (inside freeze/thaw when given), then a marker when all disks are in data mode. */
  scanCycle(): Promise<MarkerEvent | undefined> {
    const run = this.markerChain.then(() => this.doScanCycle());
    this.markerChain = run.catch(() => undefined);
    return run;
  }

  private async doScanCycle(): Promise<MarkerEvent | undefined> {
    if (this.stopping || this.source !== 'scan') return undefined;
    const freeze = await this.runHook('freeze', this.options.freezeCommand);
    let marker: MarkerEvent | undefined;
    const resyncing = this.disks.filter((d) => d.segmenter.mode === 'resync');
    try {
      for (const d of resyncing) await d.scanner?.forget();
      for (const d of this.disks) {
        const r = await (d.scanner as BlockScanner).scan();
        this.log.info({ disk: d.id, seq: d.segmenter.state.nextSeq, ...r }, 'scan done');
      }
      const ready = !this.notReady();
      if (ready && resyncing.length === 0) {
        const frozen = freeze?.ok === true;
        marker = await this.doCutMarker(frozen ? 'app' : 'crash', frozen ? 'scan, frozen' : 'scan');
      } else {
        for (const d of this.disks) {
          await d.segmenter.cut();
          await d.segmenter.flush();
        }
        if (!ready && resyncing.length === 0) this.skip('crash', this.notReady() as string);
      }
    } finally {
      await this.runHook('thaw', this.options.thawCommand);
    }
    for (const d of this.disks) await d.scanner?.commit();
    for (const d of resyncing) if (d.segmenter.mode === 'resync') await d.segmenter.finishSync();
    return marker;
  }

  // ---- status and stop ----

  status(): AgentStatus {
    const now = Date.now();
    return {
      machine: this.machine,
      source: this.source,
      pid: process.pid,
      startedAt: this.startedAt.toISOString(),
      updatedAt: new Date(now).toISOString(),
      nbd: this.nbdAddress,
      proxy: this.client.url.origin,
      running: !this.stopping,
      rpoSeconds: this.lastSafeMarker ? (now - this.lastSafeMarker.time) / 1000 : null,
      lastMarker: this.lastMarker,
      lastSafeMarker: this.lastSafeMarker,
      markersCut: this.markersCut,
      markersSkipped: this.markersSkipped,
      lastSkip: this.lastSkip,
      lastHookFailure: this.lastHookFailure,
      ...(this.hold ? { hold: this.hold } : {}),
      ...(this.lastCommand ? { lastCommand: this.lastCommand } : {}),
      disks: this.disks.map((d) => {
        const s = d.segmenter;
        const oldest = d.journal.list()[0];
        let since = s.openSince;
        if (oldest) {
          try {
            since = fs.statSync(oldest.file).mtimeMs;
          } catch {
            // shipped meanwhile
          }
        }
        return {
          disk: d.id,
          path: d.path,
          sizeBytes: s.state.sizeBytes,
          mode: s.mode,
          resyncReason: s.state.resyncReason,
          epoch: s.state.epoch,
          nextSeq: s.state.nextSeq,
          ackedSeq: s.state.ackedSeq,
          backlogSegments: d.journal.count,
          backlogBytes: s.backlogBytes,
          dirtyBlocks: s.bitmap.count,
          dirtyBytes: s.bitmap.dirtyBytes,
          lagSeconds: since === undefined ? 0 : Math.max(0, (now - since) / 1000),
          sync: s.mode === 'resync' || s.mode === 'catchup' ? d.sync : null,
          shipper: { ...d.shipper.stats },
        };
      }),
    };
  }

  async writeStatus(): Promise<void> {
    const file = this.statusPath;
    const tmp = `${file}.tmp-${process.pid}`;
    try {
      await fs.promises.writeFile(tmp, JSON.stringify(this.status(), null, 2));
      await fs.promises.rename(tmp, file);
    } catch (err) {
      this.log.debug({ err }, 'status file not written');
    }
  }

  /** Resolves once every disk is in data mode and its journal is empty (tests, tools). */
  async settled(timeoutMs = 30_000): Promise<void> {
    const until = Date.now() + timeoutMs;
    for (;;) {
      const busy = this.disks.find(
        (d) =>
          d.segmenter.mode !== 'data' ||
          d.journal.count > 0 ||
          d.segmenter.backlogBytes > d.segmenter.openBytes,
      );
      if (!busy) return;
      if (Date.now() > until)
        throw new Error(
          `disk ${busy.id} did not settle within ${timeoutMs} ms (mode ${busy.segmenter.mode}, ${busy.journal.count} segments waiting)`,
        );
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** Cuts every disk's open segment now (no marker) and waits until it is in the journal. */
  async cutAll(): Promise<void> {
    await Promise.all(this.disks.map((d) => d.segmenter.cut()));
  }

  /**
   * Clean stop: no new markers, NBD clients are let go after their requests are answered, open
   * segments are cut, state is persisted as clean, and the proxy gets a few seconds to take the
   * journal (what it does not take stays for the next start).
   */
  async stop(): Promise<void> {
    if (this.stopping) return;
    this.stopping = true;
    for (const t of this.timers) clearInterval(t);
    if (this.statusTimer) clearInterval(this.statusTimer);
    await this.commands?.stop();
    await this.markerChain;
    // Writes held after a quiesce are refused (never acknowledged) before the clients are let go:
    // the server's close waits for every request to be answered.
    if (this.hold) for (const d of this.disks) await d.export?.close();
    await this.server?.close();
    for (const d of this.disks) {
      if (d.export) await d.export.close();
      else await d.backing.close();
      this.wakeDisk(d.id);
    }
    await Promise.all(this.disks.map((d) => d.task));
    for (const d of this.disks) await d.segmenter.close();
    const drainMs = this.options.stopDrainMs ?? 5_000;
    await Promise.race([
      Promise.all(this.disks.map((d) => d.shipper.drained())),
      new Promise((r) => setTimeout(r, drainMs)),
    ]);
    for (const d of this.disks) {
      await d.shipper.stop();
      await d.journal.saveState(d.segmenter.state);
    }
    this.client.close();
    this.channel?.close();
    await this.writeStatus();
    this.log.info('agent stopped cleanly');
  }
}
