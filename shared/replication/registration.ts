import type { PageBlobClient } from '@azure/storage-blob';
import { issueCredential } from '../credentials';
import { ConflictError } from '../errors';
import { validateName } from '../names';
import { discardChecksumIndex } from './checksum-index';
import { ensureContainer, type ReplicationDeps } from './context';
import { raiseEvent } from './events';
import { parseRegistration, type RegistrationRequest } from './policy';
import { SeedLease, seedBlob } from './seed-disk';
import { machineStatus, type MachineStatus } from './status';
import {
  insertIfAbsent,
  isConflict,
  isPreconditionFailed,
  listPartition,
  MACHINES_PARTITION,
  readEntity,
  statusOf,
  TABLES,
  type DiskEntity,
  type MachineEntity,
} from './tables';

export interface RegistrationResult {
  /** True when this call registered the machine (201), false for a re-registration (200). */
  created: boolean;
  machine: MachineStatus;
  /** The agent credential: returned only when issued (first registration or rotateCredential). */
  credential?: string;
}

/**
 * Registers a machine (or updates its registration): validates the request against what is
 * registered (a disk cannot shrink or disappear), creates seed page blobs for new disks, grows
 * resized ones and marks them for resync, and issues the agent credential on first registration.
 * The machine row is written last, so a machine is listed only once its disks exist.
 */
export async function registerMachine(
  deps: ReplicationDeps,
  name: string,
  body: unknown,
  now: Date = new Date(),
): Promise<RegistrationResult> {
  // The RPO monitor also writes the machine row; a lost ETag race is retried from a fresh read.
  for (let attempt = 1; ; attempt++) {
    try {
      return await registerOnce(deps, name, body, now);
    } catch (err) {
      if (!(err instanceof RowChanged) || attempt >= 5) throw err instanceof RowChanged ? err.conflict : err;
    }
  }
}

class RowChanged extends Error {
  constructor(readonly conflict: ConflictError) {
    super(conflict.message);
  }
}

async function registerOnce(
  deps: ReplicationDeps,
  name: string,
  body: unknown,
  now: Date,
): Promise<RegistrationResult> {
  validateName(name, 'machine');
  const request = parseRegistration(body);
  const machines = await deps.tables.get(TABLES.machines);
  const disksTable = await deps.tables.get(TABLES.disks);
  const existing = await readEntity<MachineEntity>(machines, MACHINES_PARTITION, name);
  const registered = existing?.policy !== undefined ? existing : undefined;
  const existingDisks = registered ? await listPartition<DiskEntity>(disksTable, name) : [];
  const registeredIds = registered ? (JSON.parse(registered.diskIds) as string[]) : [];
  checkAgainstRegistered(request, registeredIds, existingDisks);

  const container = await ensureContainer(deps.seed);
  for (const [i, spec] of request.disks.entries()) {
    const blob = seedBlob(container, name, spec.id);
    const row = existingDisks.find((d) => d.rowKey === spec.id);
    if (!row || !registeredIds.includes(spec.id)) {
      await ensureSeedBlob(blob, spec.sizeBytes, `disks[${i}]`);
      // A new disk: an index left by an earlier disk of the same name describes other bytes.
      await discardChecksumIndex(container, name, spec.id);
      const created = await insertIfAbsent<DiskEntity>(disksTable, {
        partitionKey: name,
        rowKey: spec.id,
        sizeBytes: spec.sizeBytes,
        epoch: 0,
        appliedSeq: 0,
        state: 'initial-sync',
        stateReason: 'registered; waiting for the initial sync',
        stateChangedAt: now.toISOString(),
        appliedBytes: 0,
        registeredAt: now.toISOString(),
      });
      if (created && registered) {
        await raiseEvent(deps.tables, {
          type: 'disk-added',
          severity: 'info',
          machine: name,
          disk: spec.id,
          time: now,
          message: `Disk ${name}/${spec.id} (${spec.sizeBytes} bytes) was added; it starts in initial sync.`,
        });
      }
    } else if (spec.sizeBytes > row.sizeBytes) {
      await growSeedBlob(blob, spec.sizeBytes, `disks[${i}].sizeBytes`);
      const reason = `resized from ${row.sizeBytes} to ${spec.sizeBytes} bytes`;
      await updateDiskRow(deps, name, spec.id, {
        sizeBytes: spec.sizeBytes,
        state: 'resync-required',
        stateReason: reason,
        stateChangedAt: now.toISOString(),
      });
      await raiseEvent(deps.tables, {
        type: 'disk-resized',
        severity: 'warning',
        machine: name,
        disk: spec.id,
        time: now,
        message: `Disk ${name}/${spec.id} was ${reason}; it needs a resync before new recovery points are made.`,
        details: { previousSizeBytes: row.sizeBytes, sizeBytes: spec.sizeBytes },
      });
    }
  }

  const diskIds = request.disks.map((d) => d.id);
  let credential: string | undefined;
  let row: MachineEntity;
  if (!registered) {
    const issued = issueCredential(name, now);
    credential = issued.token;
    row = {
      partitionKey: MACHINES_PARTITION,
      rowKey: name,
      policy: JSON.stringify(request.policy),
      diskIds: JSON.stringify(diskIds),
      ...(request.group ? { group: request.group } : {}),
      registeredAt: now.toISOString(),
      updatedAt: now.toISOString(),
      ...issued.fields,
    };
    try {
      if (existing) await machines.updateEntity(row, 'Merge', { etag: existing.etag });
      else await machines.createEntity(row);
    } catch (err) {
      if (isConflict(err) || isPreconditionFailed(err)) {
        throw new ConflictError(
          `Machine ${name} is being registered by another request at the same time; retry.`,
          'machine',
        );
      }
      throw err;
    }
    await raiseEvent(deps.tables, {
      type: 'machine-registered',
      severity: 'info',
      machine: name,
      time: now,
      message: `Machine ${name} was registered with ${diskIds.length} disk(s); replication starts with the initial sync.`,
    });
  } else {
    const fields: Partial<MachineEntity> = {
      policy: JSON.stringify(request.policy),
      diskIds: JSON.stringify(diskIds),
      group: request.group ?? '',
      updatedAt: now.toISOString(),
    };
    if (request.rotateCredential) {
      const issued = issueCredential(name, now);
      credential = issued.token;
      Object.assign(fields, issued.fields);
    }
    try {
      await machines.updateEntity({ partitionKey: MACHINES_PARTITION, rowKey: name, ...fields }, 'Merge', {
        etag: registered.etag,
      });
    } catch (err) {
      if (isPreconditionFailed(err)) {
        throw new RowChanged(
          new ConflictError(
            `Machine ${name} changed while this registration was applied; send it again.`,
            'machine',
          ),
        );
      }
      throw err;
    }
    row = { ...registered, ...fields } as MachineEntity;
  }
  const machine = await machineStatus(deps, row, now, { withBacklog: false });
  return { created: !registered, machine, ...(credential ? { credential } : {}) };
}

function checkAgainstRegistered(
  request: RegistrationRequest,
  registeredIds: string[],
  rows: DiskEntity[],
): void {
  const requested = new Set(request.disks.map((d) => d.id));
  const removed = registeredIds.filter((id) => !requested.has(id));
  if (removed.length > 0) {
    throw new ConflictError(
      `disks must still list ${removed.map((d) => JSON.stringify(d)).join(', ')}: a registered disk cannot be removed by re-registering.`,
      'disks',
      'DiskRemovalRefused',
    );
  }
  request.disks.forEach((spec, i) => {
    const row = rows.find((r) => r.rowKey === spec.id);
    if (row && registeredIds.includes(spec.id) && spec.sizeBytes < row.sizeBytes) {
      throw new ConflictError(
        `disks[${i}].sizeBytes is ${spec.sizeBytes}, smaller than the registered ${row.sizeBytes} bytes of disk ${spec.id}: ` +
          'a protected disk cannot shrink (register the smaller disk under a new id instead).',
        `disks[${i}].sizeBytes`,
        'DiskShrinkRefused',
      );
    }
  });
}

/** Creates the seed page blob (all zeros), or checks a leftover one from an interrupted registration. */
async function ensureSeedBlob(blob: PageBlobClient, sizeBytes: number, field: string): Promise<void> {
  try {
    await blob.create(sizeBytes, { conditions: { ifNoneMatch: '*' } });
    return;
  } catch (err) {
    const status = statusOf(err);
    if (status !== 409 && status !== 412) throw err;
  }
  const props = await blob.getProperties();
  if ((props.contentLength ?? 0) < sizeBytes) await growSeedBlob(blob, sizeBytes, field);
}

/** Grows a seed blob; takes the lease briefly so no apply is writing meanwhile. */
async function growSeedBlob(blob: PageBlobClient, sizeBytes: number, field: string): Promise<void> {
  const lease = await SeedLease.acquire(blob, 15);
  if (!lease) {
    throw new ConflictError(
      `The seed disk for ${field} is being written by the apply function; retry the registration in a few seconds.`,
      field,
      'DiskBusy',
    );
  }
  try {
    await blob.resize(sizeBytes, { conditions: { leaseId: lease.leaseId } });
  } finally {
    await lease.release();
  }
}

async function updateDiskRow(
  deps: ReplicationDeps,
  machine: string,
  disk: string,
  patch: Partial<DiskEntity>,
): Promise<void> {
  // A plain merge without ETag: the applier's ETag check notices and keeps this state.
  const table = await deps.tables.get(TABLES.disks);
  await table.updateEntity({ partitionKey: machine, rowKey: disk, ...patch }, 'Merge');
}
