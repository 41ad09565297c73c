import type { ContainerClient } from '@azure/storage-blob';
import { ensureContainer, isNotFound, readEntity, seedBlob } from '../../replication';
import type { MaterialisedDisk, TargetMachine } from '../model';
import { FAILOVER_TABLES, type FailoverTables } from '../tables';
import {
  targetName,
  type CleanupRequest,
  type ComputeProvider,
  type CreateTargetRequest,
  type MaterialiseRequest,
  type StopRequest,
} from './port';

/** Failover disks: page blobs `{machine}/{disk}/{failoverId}.img`, in ReplicaStorage beside the seeds. */
export const FAILOVER_DISKS_CONTAINER = 'failover-disks';

export function failoverDiskName(machine: string, disk: string, failoverId: string): string {
  return `${machine}/${disk}/${failoverId}.img`;
}

/** The network a local target joins: a shared recovery network, or one of its own for a drill. */
export function localNetwork(failoverId: string, test: boolean): string {
  return test ? `isolated-${failoverId}` : 'recovery';
}

export interface TargetMachineEntity {
  partitionKey: string;
  rowKey: string;
  name: string;
  running: boolean;
  /** Set by a serving NBD export of the machine's disks (agent/target/failover-machine.ts). */
  exportState?: 'serving' | 'stopped';
  test: boolean;
  network: string;
  pointId: string;
  /** JSON array of MaterialisedDisk. */
  disks: string;
  createdAt: string;
}

export interface LocalComputeDeps {
  /** `seed-disks`. */
  seed: ContainerClient;
  /** `failover-disks`, same account as the seeds so the copy is server-side. */
  failoverDisks: ContainerClient;
  tables: FailoverTables;
  /** Copy status poll interval (ms). */
  pollMs?: number;
}

/**
 * The `local` compute provider (Azurite): a failover disk is a server-side copy of the seed
 * snapshot, and the target machine is a row in `targetmachines` (running, disks, network, test).
 */
export class LocalComputeProvider implements ComputeProvider {
  readonly kind = 'local' as const;

  constructor(private readonly deps: LocalComputeDeps) {}

  async materialiseDisk(request: MaterialiseRequest): Promise<MaterialisedDisk> {
    const { machine, failoverId, disk } = request;
    const source = seedBlob(this.deps.seed, machine, disk.id).withSnapshot(disk.snapshot);
    const name = failoverDiskName(machine, disk.id, failoverId);
    const target = (await ensureContainer(this.deps.failoverDisks)).getPageBlobClient(name);
    const poller = await target.beginCopyFromURL(source.url, { intervalInMs: this.deps.pollMs ?? 250 });
    const result = await poller.pollUntilDone();
    if (result.copyStatus !== undefined && result.copyStatus !== 'success') {
      throw new Error(
        `The copy of ${machine}/${disk.id} at snapshot ${disk.snapshot} ended ${result.copyStatus}.`,
      );
    }
    return {
      id: disk.id,
      sizeBytes: disk.sizeBytes,
      snapshot: disk.snapshot,
      resource: `${FAILOVER_DISKS_CONTAINER}/${name}`,
    };
  }

  async createTarget(request: CreateTargetRequest): Promise<TargetMachine> {
    const { machine, failoverId, test } = request;
    const entity: TargetMachineEntity = {
      partitionKey: machine,
      rowKey: failoverId,
      name: targetName(machine, failoverId, test),
      running: true,
      test,
      network: localNetwork(failoverId, test),
      pointId: request.pointId,
      disks: JSON.stringify(request.disks),
      createdAt: new Date().toISOString(),
    };
    const table = await this.deps.tables.get(FAILOVER_TABLES.targets);
    await table.upsertEntity(entity, 'Replace');
    return toTargetMachine(entity);
  }

  async cleanup(request: CleanupRequest): Promise<string[]> {
    const { machine, failoverId } = request;
    const deleted: string[] = [];
    const table = await this.deps.tables.get(FAILOVER_TABLES.targets);
    try {
      await table.deleteEntity(machine, failoverId);
      deleted.push(`${FAILOVER_TABLES.targets}/${machine}/${failoverId}`);
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
    const container = await ensureContainer(this.deps.failoverDisks);
    const names = new Set(request.diskIds.map((d) => failoverDiskName(machine, d, failoverId)));
    // Also any disk of this failover not in the list (a disk added since): names end in the id.
    for await (const blob of container.listBlobsFlat({ prefix: `${machine}/` })) {
      if (blob.name.endsWith(`/${failoverId}.img`)) names.add(blob.name);
    }
    for (const name of names) {
      const response = await container.getPageBlobClient(name).deleteIfExists({ deleteSnapshots: 'include' });
      if (response.succeeded) deleted.push(`${FAILOVER_DISKS_CONTAINER}/${name}`);
    }
    return deleted;
  }

  /** `running: false` on the target row: its NBD export (if any) lets its clients go. */
  async stopTarget(request: StopRequest): Promise<void> {
    const table = await this.deps.tables.get(FAILOVER_TABLES.targets);
    const row = await readEntity<TargetMachineEntity>(table, request.machine, request.failoverId);
    if (!row || !row.running) return;
    await table.updateEntity(
      {
        partitionKey: request.machine,
        rowKey: request.failoverId,
        running: false,
        stoppedAt: new Date().toISOString(),
      },
      'Merge',
    );
  }

  /** Stopped once no NBD export of the machine serves: every acknowledged write is in the blob. */
  async targetStopped(request: StopRequest): Promise<boolean> {
    const row = await readEntity<TargetMachineEntity>(
      await this.deps.tables.get(FAILOVER_TABLES.targets),
      request.machine,
      request.failoverId,
    );
    return !row || (!row.running && row.exportState !== 'serving');
  }
}

export function toTargetMachine(e: TargetMachineEntity): TargetMachine {
  return {
    name: e.name,
    provider: 'local',
    resource: `${FAILOVER_TABLES.targets}/${e.partitionKey}/${e.rowKey}`,
    network: e.network,
    running: e.running,
    test: e.test,
    disks: JSON.parse(e.disks) as MaterialisedDisk[],
  };
}

/** The local target machine of a failover, if it exists. */
export async function readLocalTarget(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
): Promise<TargetMachine | undefined> {
  const row = await readEntity<TargetMachineEntity>(
    await tables.get(FAILOVER_TABLES.targets),
    machine,
    failoverId,
  );
  return row ? toTargetMachine(row) : undefined;
}
