import { z } from 'zod';
import { NotFoundError, ValidationError } from '../errors';
import { FAILOVER_TABLES, type FailoverTables } from '../failover';
import {
  insertIfAbsent,
  listPartition,
  parseOrThrow,
  readEntity,
  readMachine,
  TABLES,
  type DiskEntity,
} from '../replication';
import type { ProtectionDeps } from './context';
import { claimMachine, releaseMachine, type ClaimHolderEnded } from './tables';

// Resync asked for by the cloud (POST /api/machines/{m}/resync, or a disk marked resync-required):
// the cloud picks the next epoch of each disk and tells the agent through the command channel;
// the agent restarts the disk's stream at that epoch with a checksum resync (only blocks whose
// SHA-256 differs from the seed disk's cross the wire) and reports progress on the command; apply
// moves the disk to the new epoch when its first change log arrives. The resync is complete when
// every disk applied a marker of its new epoch: recovery points resume.

export const resyncRequestSchema = z.strictObject({
  /** Disks to resync; default: those marked resync-required, or every disk when none is. */
  disks: z.array(z.string()).min(1, { error: 'must name at least one disk' }).optional(),
  /** How long to wait for the agent to finish before failing the operation. */
  waitSeconds: z
    .number()
    .int()
    .min(10)
    .max(7 * 86_400)
    .default(86_400),
});

export interface ResyncRun {
  machine: string;
  operationId: string;
  disks: string[];
  waitSeconds: number;
}

export interface ResyncDiskPlan {
  disk: string;
  sizeBytes: number;
  fromEpoch: number;
  targetEpoch: number;
  /** The disk row's appliedBytes when the resync started (bytes shipped are counted from it). */
  baselineAppliedBytes: number;
}

/** The agent's progress per disk, as it reports it on the command. */
export interface AgentResyncProgress {
  comparedBytes: number;
  shippedBytes: number;
}

export interface DiskResyncStatus {
  disk: string;
  sizeBytes: number;
  targetEpoch: number;
  epoch: number;
  state: string;
  comparedBytes: number;
  shippedBytes: number;
  done: boolean;
}

/** What the resync orchestration shows in its custom status. */
export interface ResyncStatus {
  percent: number;
  bytesTotal: number;
  bytesCompared: number;
  bytesShipped: number;
  etaSeconds: number | null;
  done: boolean;
  disks: DiskResyncStatus[];
}

/**
 * The command the agent picks up through the proxy (`GET /v1/machines/{m}/commands`): restart
 * each listed disk's stream at `epoch`, seq 1, with a checksum resync against the seed disk.
 */
export interface ResyncCommand {
  id: string;
  machine: string;
  type: 'resync';
  operationId: string;
  disks: { disk: string; epoch: number }[];
  state: 'pending' | 'done' | 'failed' | 'superseded';
  progress?: Record<string, AgentResyncProgress>;
  message?: string;
  createdAt: string;
  updatedAt: string;
}

interface ResyncCommandEntity {
  partitionKey: string;
  rowKey: string;
  type: 'resync';
  operationId: string;
  /** JSON array of { disk, epoch }. */
  disks: string;
  state: ResyncCommand['state'];
  /** JSON object disk → AgentResyncProgress, written by the agent's reports. */
  progress?: string;
  message?: string;
  createdAt: string;
  updatedAt: string;
}

export const resyncCommandId = (operationId: string) => `resync-${operationId}`;

function toCommand(e: ResyncCommandEntity): ResyncCommand {
  return {
    id: e.rowKey,
    machine: e.partitionKey,
    type: 'resync',
    operationId: e.operationId,
    disks: JSON.parse(e.disks) as ResyncCommand['disks'],
    state: e.state,
    ...(e.progress ? { progress: JSON.parse(e.progress) as ResyncCommand['progress'] } : {}),
    ...(e.message ? { message: e.message } : {}),
    createdAt: e.createdAt,
    updatedAt: e.updatedAt,
  };
}

export async function readResyncCommand(
  tables: FailoverTables,
  machine: string,
  operationId: string,
): Promise<ResyncCommand | undefined> {
  const row = await readEntity<ResyncCommandEntity>(
    await tables.get(FAILOVER_TABLES.commands),
    machine,
    resyncCommandId(operationId),
  );
  return row && row.type === 'resync' ? toCommand(row) : undefined;
}

/** The machine's pending resync commands, oldest first (what the proxy serves the agent). */
export async function pendingResyncCommands(
  tables: FailoverTables,
  machine: string,
): Promise<ResyncCommand[]> {
  const rows = await listPartition<ResyncCommandEntity>(await tables.get(FAILOVER_TABLES.commands), machine);
  return rows
    .filter((r) => r.type === 'resync' && r.state === 'pending')
    .map(toCommand)
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** The agent's progress report (relayed by the proxy); `state` done/failed closes the command. */
export async function reportResyncProgress(
  tables: FailoverTables,
  machine: string,
  commandId: string,
  report: { progress?: Record<string, AgentResyncProgress>; state?: 'done' | 'failed'; message?: string },
  now: Date,
): Promise<void> {
  await (
    await tables.get(FAILOVER_TABLES.commands)
  ).updateEntity(
    {
      partitionKey: machine,
      rowKey: commandId,
      ...(report.progress ? { progress: JSON.stringify(report.progress) } : {}),
      ...(report.state ? { state: report.state } : {}),
      ...(report.message ? { message: report.message } : {}),
      updatedAt: now.toISOString(),
    },
    'Merge',
  );
}

function diskIdsOf(machine: { diskIds: string }): string[] {
  return JSON.parse(machine.diskIds) as string[];
}

/**
 * The synchronous half of POST …/resync: validates the body (400), the machine and disks (404),
 * chooses the disks and claims the machine (409 while another operation runs).
 */
export async function prepareResync(
  deps: ProtectionDeps,
  machine: string,
  body: unknown,
  operationId: string,
  holderEnded?: ClaimHolderEnded,
): Promise<ResyncRun> {
  if (body !== undefined && (body === null || typeof body !== 'object' || Array.isArray(body))) {
    throw new ValidationError(
      'The request body must be a JSON object (or empty) with optionally "disks" and "waitSeconds".',
      'body',
    );
  }
  const request = parseOrThrow(resyncRequestSchema, body ?? {});
  const row = await readMachine(deps.failover.replication, machine);
  const registered = diskIdsOf(row);
  let disks: string[];
  if (request.disks) {
    for (const d of request.disks) {
      if (!registered.includes(d)) {
        throw new NotFoundError(
          `Machine ${machine} has no disk ${JSON.stringify(d)}; its disks are ${registered.join(', ')}.`,
          'disks',
        );
      }
    }
    disks = [...new Set(request.disks)];
  } else {
    const rows = await listPartition<DiskEntity>(
      await deps.failover.replication.tables.get(TABLES.disks),
      machine,
    );
    const required = rows.filter((r) => r.state === 'resync-required').map((r) => r.rowKey);
    disks = required.length > 0 ? registered.filter((d) => required.includes(d)) : registered;
  }
  await claimMachine(deps.tables, machine, 'resync', operationId, deps.now(), holderEnded);
  return { machine, operationId, disks, waitSeconds: request.waitSeconds };
}

/**
 * Picks each disk's next epoch (or takes `given`, failback's) and writes the agent's command
 * (idempotent: a rerun reuses it).
 */
export async function issueResync(
  deps: ProtectionDeps,
  run: ResyncRun,
  given?: ResyncDiskPlan[],
): Promise<ResyncDiskPlan[]> {
  const disksTable = await deps.failover.replication.tables.get(TABLES.disks);
  const commands = await deps.failover.tables.get(FAILOVER_TABLES.commands);
  const existing = await readEntity<ResyncCommandEntity & { plans?: string }>(
    commands,
    run.machine,
    resyncCommandId(run.operationId),
  );
  if (existing?.plans) return JSON.parse(existing.plans) as ResyncDiskPlan[];
  const plans: ResyncDiskPlan[] = given ? [...given] : [];
  for (const disk of given ? [] : run.disks) {
    const row = await readEntity<DiskEntity>(disksTable, run.machine, disk);
    if (!row) throw new NotFoundError(`Disk ${disk} of machine ${run.machine} is not registered.`, 'disk');
    plans.push({
      disk,
      sizeBytes: row.sizeBytes,
      fromEpoch: row.epoch,
      targetEpoch: row.epoch + 1,
      baselineAppliedBytes: row.appliedBytes ?? 0,
    });
  }
  const now = deps.now().toISOString();
  const entity: ResyncCommandEntity & { plans: string } = {
    partitionKey: run.machine,
    rowKey: resyncCommandId(run.operationId),
    type: 'resync',
    operationId: run.operationId,
    disks: JSON.stringify(plans.map((p) => ({ disk: p.disk, epoch: p.targetEpoch }))),
    plans: JSON.stringify(plans),
    state: 'pending',
    createdAt: now,
    updatedAt: now,
  };
  if (!(await insertIfAbsent(commands, entity))) {
    const again = await readEntity<{ plans: string }>(commands, run.machine, entity.rowKey);
    return JSON.parse(again!.plans) as ResyncDiskPlan[];
  }
  return plans;
}

/**
 * Where the resync stands: the agent's reports (bytes compared and shipped) where it sent them,
 * what apply has seen otherwise. A disk is done once it applied a marker of its new epoch.
 */
export async function resyncProgress(
  deps: ProtectionDeps,
  input: { machine: string; operationId: string; plans: ResyncDiskPlan[]; startedAt: string },
): Promise<ResyncStatus> {
  const disksTable = await deps.failover.replication.tables.get(TABLES.disks);
  const command = await readResyncCommand(deps.failover.tables, input.machine, input.operationId);
  const disks: DiskResyncStatus[] = [];
  for (const plan of input.plans) {
    const row = await readEntity<DiskEntity>(disksTable, input.machine, plan.disk);
    const epoch = row?.epoch ?? plan.fromEpoch;
    const state = row?.state ?? 'unknown';
    const done = epoch >= plan.targetEpoch && state === 'protected';
    const reported = command?.progress?.[plan.disk];
    const applied =
      epoch >= plan.targetEpoch ? Math.max(0, (row?.appliedBytes ?? 0) - plan.baselineAppliedBytes) : 0;
    disks.push({
      disk: plan.disk,
      sizeBytes: plan.sizeBytes,
      targetEpoch: plan.targetEpoch,
      epoch,
      state,
      comparedBytes: done ? plan.sizeBytes : Math.min(plan.sizeBytes, reported?.comparedBytes ?? 0),
      shippedBytes: Math.max(reported?.shippedBytes ?? 0, applied),
      done,
    });
  }
  const bytesTotal = disks.reduce((s, d) => s + d.sizeBytes, 0);
  const bytesCompared = disks.reduce((s, d) => s + d.comparedBytes, 0);
  const done = disks.every((d) => d.done);
  const elapsed = Math.max(0.001, (deps.now().getTime() - Date.parse(input.startedAt)) / 1000);
  const rate = bytesCompared / elapsed;
  return {
    percent: done
      ? 100
      : bytesTotal === 0
        ? 0
        : Math.min(99.9, Math.round((1000 * bytesCompared) / bytesTotal) / 10),
    bytesTotal,
    bytesCompared,
    bytesShipped: disks.reduce((s, d) => s + d.shippedBytes, 0),
    etaSeconds: done ? 0 : rate > 0 ? Math.round((bytesTotal - bytesCompared) / rate) : null,
    done,
    disks,
  };
}

/** Ends the resync: closes the command (unless the agent did) and frees the machine. */
export async function completeResync(
  deps: ProtectionDeps,
  input: { machine: string; operationId: string; ok: boolean; message?: string },
): Promise<void> {
  const command = await readResyncCommand(deps.failover.tables, input.machine, input.operationId);
  if (command?.state === 'pending') {
    await reportResyncProgress(
      deps.failover.tables,
      input.machine,
      command.id,
      { state: input.ok ? 'done' : 'failed', ...(input.message ? { message: input.message } : {}) },
      deps.now(),
    );
  }
  await releaseMachine(deps.tables, input.machine, input.operationId);
}
