import type { TableClient } from '@azure/data-tables';
import { insertIfAbsent, isNotFound, listPartition, readEntity } from '../replication';
import { FAILOVER_TABLES, type FailoverTables } from './tables';

/**
 * Commands for a protected machine's agent, written by the cloud and served by the proxy:
 *
 *   GET  /v1/machines/{m}/commands              → { value: AgentCommand[] } (state "pending" only)
 *   POST /v1/machines/{m}/commands/{id}/ack     ← { state: "done" | "failed", message? }
 *
 * The one command today is `quiesce` (planned failover): the agent holds new writes, flushes,
 * runs its freeze hook, cuts an app-consistent marker with the command's `markerId` on every
 * disk, ships everything up to it, and keeps holding writes (the source is about to be shut
 * down). The cloud does not need the ack to proceed: the recovery point with that marker id is
 * the proof. docs/failover.md has the whole contract.
 */
export interface AgentCommand {
  id: string;
  machine: string;
  type: 'quiesce';
  /** The marker to cut; the recovery point of the planned failover gets this id. */
  markerId: string;
  markerKind: 'app';
  /** After cutting the marker: keep holding writes until the machine is shut down. */
  then: 'hold-writes';
  failoverId: string;
  state: 'pending' | 'done' | 'failed' | 'superseded';
  message?: string;
  createdAt: string;
  updatedAt: string;
}

interface CommandEntity extends Omit<AgentCommand, 'id' | 'machine'> {
  partitionKey: string;
  rowKey: string;
}

function fromEntity(e: CommandEntity): AgentCommand {
  return {
    id: e.rowKey,
    machine: e.partitionKey,
    type: e.type,
    markerId: e.markerId,
    markerKind: e.markerKind,
    then: e.then,
    failoverId: e.failoverId,
    state: e.state,
    ...(e.message ? { message: e.message } : {}),
    createdAt: e.createdAt,
    updatedAt: e.updatedAt,
  };
}

/** The command id and marker id of a failover's quiesce (deterministic: retries reuse them). */
export function quiesceIds(failoverId: string): { commandId: string; markerId: string } {
  return { commandId: `quiesce-${failoverId}`, markerId: `planned-${failoverId}` };
}

/** Issues the quiesce command of a planned failover (idempotent). */
export async function issueQuiesce(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
  now: Date,
): Promise<AgentCommand> {
  const { commandId, markerId } = quiesceIds(failoverId);
  const entity: CommandEntity = {
    partitionKey: machine,
    rowKey: commandId,
    type: 'quiesce',
    markerId,
    markerKind: 'app',
    then: 'hold-writes',
    failoverId,
    state: 'pending',
    createdAt: now.toISOString(),
    updatedAt: now.toISOString(),
  };
  const table = await tables.get(FAILOVER_TABLES.commands);
  await insertIfAbsent(table, entity);
  return fromEntity((await readEntity<CommandEntity>(table, machine, commandId))!);
}

/** What the proxy serves the agent: the machine's pending commands, oldest first. */
export async function pendingCommands(tables: FailoverTables, machine: string): Promise<AgentCommand[]> {
  const rows = await listPartition<CommandEntity>(await tables.get(FAILOVER_TABLES.commands), machine);
  // The table also holds other kinds of command (resync: shared/reprotect/resync.ts), read by their own functions.
  return rows
    .filter((r) => r.state === 'pending' && r.type === 'quiesce')
    .map(fromEntity)
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** The agent's answer, relayed by the proxy. */
export async function acknowledgeCommand(
  tables: FailoverTables,
  machine: string,
  commandId: string,
  result: { state: 'done' | 'failed'; message?: string },
  now: Date,
): Promise<void> {
  const table = await tables.get(FAILOVER_TABLES.commands);
  await table.updateEntity(
    {
      partitionKey: machine,
      rowKey: commandId,
      state: result.state,
      ...(result.message ? { message: result.message } : {}),
      updatedAt: now.toISOString(),
    },
    'Merge',
  );
}

export async function readCommand(
  tables: FailoverTables,
  machine: string,
  commandId: string,
): Promise<AgentCommand | undefined> {
  const row = await readEntity<CommandEntity>(await tables.get(FAILOVER_TABLES.commands), machine, commandId);
  return row ? fromEntity(row) : undefined;
}

/** Deletes a failover's commands (cancel removes every record a failover created). */
export async function deleteCommands(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
): Promise<string[]> {
  const table: TableClient = await tables.get(FAILOVER_TABLES.commands);
  const { commandId } = quiesceIds(failoverId);
  try {
    await table.deleteEntity(machine, commandId);
    return [`commands/${machine}/${commandId}`];
  } catch (err) {
    if (isNotFound(err)) return [];
    throw err;
  }
}

/**
 * Closes a failover's command if the agent has not answered it: `done` once the marker's point
 * arrived, `superseded` when the failover stopped waiting (the agent then ignores it).
 */
export async function closeCommands(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
  state: 'done' | 'superseded',
  now: Date,
): Promise<void> {
  const { commandId } = quiesceIds(failoverId);
  const command = await readCommand(tables, machine, commandId);
  if (!command || command.state !== 'pending') return;
  await (
    await tables.get(FAILOVER_TABLES.commands)
  ).updateEntity({ partitionKey: machine, rowKey: commandId, state, updatedAt: now.toISOString() }, 'Merge');
}
