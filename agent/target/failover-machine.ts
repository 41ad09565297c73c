import type { ContainerClient } from '@azure/storage-blob';
import type { Logger } from 'pino';
import { ConflictError } from '../../shared/errors';
import {
  activeFailover,
  FAILOVER_TABLES,
  failoverDiskName,
  readLocalTarget,
  type FailoverTables,
  type TargetMachine,
} from '../../shared/failover';
import { createLogger } from '../../shared/logger';
import { isNotFound } from '../../shared/replication';
import { NbdExport, NbdServer } from '../mobility/nbd';
import { PageBlobBacking } from './page-blob-backing';

// The local "running" failover machine: its disks (the failover page blobs) served over NBD, so a
// drill or a failed-over machine can be checked and used with real tools (qemu, nbdsh, fio,
// nbd-client). Writes go straight to the page blobs; reprotect carries them home. The export
// watches the target machine's row: when failback stops the machine (`running` false) it lets
// its clients go and records `exportState: "stopped"`, so every acknowledged write is in the blob
// before the final snapshot.

export interface FailoverMachineOptions {
  tables: FailoverTables;
  /** `failover-disks` in ReplicaStorage. */
  failoverDisks: ContainerClient;
  machine: string;
  /** Default: the machine's active failover. */
  failoverId?: string;
  port?: number;
  host?: string;
  /** How often the target machine's row is checked for a stop (default 1000 ms). */
  pollMs?: number;
  logger?: Logger;
}

export class FailoverMachineExport {
  private timer?: NodeJS.Timeout;
  private stopping?: Promise<void>;
  readonly stopped: Promise<void>;
  private resolveStopped!: () => void;

  private constructor(
    private readonly options: FailoverMachineOptions,
    readonly failoverId: string,
    readonly target: TargetMachine,
    private readonly server: NbdServer,
    private readonly exports: NbdExport[],
    readonly address: { host: string; port: number },
    private readonly log: Logger,
  ) {
    this.stopped = new Promise((r) => (this.resolveStopped = r));
  }

  static async start(options: FailoverMachineOptions): Promise<FailoverMachineExport> {
    const { machine, tables } = options;
    const log = (options.logger ?? createLogger('target')).child({ machine });
    const failoverId = options.failoverId ?? (await activeFailover(tables, machine)).failoverId;
    const target = await readLocalTarget(tables, machine, failoverId);
    if (!target) {
      throw new ConflictError(
        `Failover ${failoverId} of ${machine} has no local target machine (yet); wait until it is failed-over, with LIFEBOAT_COMPUTE=local.`,
        'machine',
      );
    }
    if (!target.running)
      throw new ConflictError(
        `The failover machine ${target.name} is stopped; its disks are no longer served.`,
        'machine',
      );
    const exports: NbdExport[] = [];
    for (const disk of target.disks) {
      const backing = await PageBlobBacking.open(
        options.failoverDisks.getPageBlobClient(failoverDiskName(machine, disk.id, failoverId)),
      );
      exports.push(
        new NbdExport({
          name: disk.id,
          backing,
          description: `${target.name}/${disk.id} (failover ${failoverId})`,
        }),
      );
    }
    const server = new NbdServer({ exports, logger: log });
    const addr = await server.listen({ port: options.port ?? 0, host: options.host ?? '127.0.0.1' });
    const self = new FailoverMachineExport(
      options,
      failoverId,
      target,
      server,
      exports,
      { host: addr.address, port: addr.port },
      log,
    );
    await self.setExportState('serving');
    self.timer = setInterval(() => void self.watch(), options.pollMs ?? 1000);
    log.info(
      { failoverId, nbd: self.address, disks: target.disks.map((d) => d.id) },
      'serving the failover machine over NBD',
    );
    return self;
  }

  private async setExportState(state: 'serving' | 'stopped'): Promise<void> {
    const table = await this.options.tables.get(FAILOVER_TABLES.targets);
    try {
      await table.updateEntity(
        {
          partitionKey: this.options.machine,
          rowKey: this.failoverId,
          exportState: state,
          exportAddress: `${this.address.host}:${this.address.port}`,
          exportUpdatedAt: new Date().toISOString(),
        },
        'Merge',
      );
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }

  private async watch(): Promise<void> {
    try {
      const target = await readLocalTarget(this.options.tables, this.options.machine, this.failoverId);
      if (!target || !target.running) {
        this.log.info(
          { failoverId: this.failoverId },
          'the failover machine was stopped: letting NBD clients go',
        );
        await this.stop();
      }
    } catch (err) {
      this.log.warn({ err }, 'cannot read the target machine row');
    }
  }

  /** Lets clients go (after their requests are answered), then records the stop. */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      clearInterval(this.timer);
      // NbdServer.close() can wait forever for a client that already left (its paused socket never
      // sees the peer's FIN), so it gets a bounded wait: closing the exports is what guarantees
      // no write lands after the stop (new ones are refused, in-flight ones finish into the blob).
      const serverClosed = this.server
        .close()
        .catch((err: unknown) => this.log.warn({ err }, 'closing the NBD server failed'));
      await Promise.race([serverClosed, new Promise((r) => setTimeout(r, 2000).unref())]);
      for (const e of this.exports) await e.close();
      await this.setExportState('stopped');
      this.resolveStopped();
    })();
    return this.stopping;
  }
}
