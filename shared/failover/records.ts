import type { TableClient, TableEntityResult } from '@azure/data-tables';
import { deleteClaim, holdersEnded, type ClaimHolder, type ClaimHolderEnded } from '../claims';
import { ConflictError, NotFoundError } from '../errors';
import {
  insertIfAbsent,
  isConflict,
  isNotFound,
  isPreconditionFailed,
  listPartition,
  readEntity,
} from '../replication';
import {
  nextState,
  type AbandonedFailover,
  type AzureTarget,
  type ChosenPoint,
  type FailoverAction,
  type FailoverKind,
  type FailoverRecord,
  type FailoverState,
  type RecoveryPointSelector,
  type TargetMachine,
} from './model';
import { ACTIVE_ROW, FAILOVER_TABLES, type FailoverTables } from './tables';

interface LockEntity {
  partitionKey: string;
  rowKey: string;
  failoverId: string;
  operationId: string;
  kind: FailoverKind;
  createdAt: string;
}

interface RecordEntity {
  partitionKey: string;
  rowKey: string;
  kind: FailoverKind;
  state: FailoverState;
  operationId: string;
  selector: string;
  point?: string;
  target?: string;
  error?: string;
  planRun?: string;
  targetSpec?: string;
  createdAt: string;
  updatedAt: string;
  committedAt?: string;
}

function toRecord(e: RecordEntity): FailoverRecord {
  return {
    machine: e.partitionKey,
    failoverId: e.rowKey,
    kind: e.kind,
    state: e.state,
    operationId: e.operationId,
    selector: JSON.parse(e.selector) as RecoveryPointSelector,
    ...(e.point ? { point: JSON.parse(e.point) as ChosenPoint } : {}),
    ...(e.target ? { target: JSON.parse(e.target) as TargetMachine } : {}),
    ...(e.error ? { error: JSON.parse(e.error) as FailoverRecord['error'] } : {}),
    ...(e.planRun ? { planRun: e.planRun } : {}),
    ...(e.targetSpec ? { targetSpec: JSON.parse(e.targetSpec) as AzureTarget } : {}),
    createdAt: e.createdAt,
    updatedAt: e.updatedAt,
    ...(e.committedAt ? { committedAt: e.committedAt } : {}),
  };
}

export interface BeginFailover {
  machine: string;
  failoverId: string;
  operationId: string;
  kind: FailoverKind;
  selector: RecoveryPointSelector;
  planRun?: string;
  target?: AzureTarget;
}

/**
 * The states of a failover whose operation, once ended, has left it unfinished: nothing but that
 * operation would ever move it on, so its claim is stale. A failed-over, committed (or later)
 * failover holds the machine with no operation running, and `committing` is left alone because
 * clearing it would let a new failover remove a machine the operator meant to keep.
 */
const UNFINISHED: readonly FailoverState[] = [
  'accepted',
  'quiescing',
  'applying-pending',
  'materialising',
  'creating-target',
  'changing-point',
  'cancelling',
];

/**
 * Clears the `active` row of a failover whose operations all ended without releasing it (or never
 * started: the starter died between the claim and the start). Its record, if unfinished, becomes
 * `abandoned` first (ETag-checked), so whatever it created stays known until the machine's next
 * failover removes it; a `failed` one already cleaned up and stays as history. True when the row
 * is gone.
 */
async function clearStaleClaim(
  table: TableClient,
  held: TableEntityResult<LockEntity>,
  now: Date,
  holderEnded: ClaimHolderEnded | undefined,
): Promise<boolean> {
  if (!holderEnded) return false;
  const record = await readEntity<RecordEntity>(table, held.partitionKey, held.failoverId);
  if (record && record.state !== 'failed' && !UNFINISHED.includes(record.state)) return false;
  // The failover's own orchestration, the operation that claimed it (a group run), and the one
  // driving its current state (a change of point, a cancel): every one must have ended.
  const startedAt = record?.updatedAt ?? held.createdAt;
  const ids = new Set([held.operationId, held.failoverId, ...(record ? [record.operationId] : [])]);
  const holders: ClaimHolder[] = [...ids].map((operationId) => ({ operationId, startedAt }));
  if (!(await holdersEnded(holders, holderEnded))) return false;
  if (record && record.state !== 'failed') {
    const error = {
      step: record.state,
      message:
        `its operation (${[...ids].join(', ')}) ended without finishing (terminated, failed or never started) ` +
        `while ${record.state}; the next failover of ${held.partitionKey} removes what it created`,
    };
    try {
      await table.updateEntity(
        {
          partitionKey: held.partitionKey,
          rowKey: held.failoverId,
          state: 'abandoned' satisfies FailoverState,
          error: JSON.stringify(error),
          updatedAt: now.toISOString(),
        },
        'Merge',
        { etag: record.etag },
      );
    } catch (err) {
      if (isPreconditionFailed(err) || isNotFound(err)) return false;
      throw err;
    }
  }
  return deleteClaim(table, held);
}

/**
 * Clears the machine's failover claim if the failover holding it ended unfinished (as
 * `beginFailover` does before its 409), for a starter that claims later, inside its orchestration
 * (a recovery plan). True when no claim holds the machine now.
 */
export async function clearStaleFailoverClaim(
  tables: FailoverTables,
  machine: string,
  now: Date,
  holderEnded: ClaimHolderEnded,
): Promise<boolean> {
  const table = await tables.get(FAILOVER_TABLES.failovers);
  const held = await readEntity<LockEntity>(table, machine, ACTIVE_ROW);
  return !held || clearStaleClaim(table, held, now, holderEnded);
}

/**
 * Claims the machine for a failover: inserts the `active` row if absent (a second failover of
 * the machine gets a 409 naming the first, unless `holderEnded` says the first's operations
 * ended without finishing: then its claim is cleared and it becomes `abandoned`), then the record.
 * Idempotent for the same failover id (an activity that runs twice).
 */
export async function beginFailover(
  tables: FailoverTables,
  begin: BeginFailover,
  now: Date,
  holderEnded?: ClaimHolderEnded,
): Promise<FailoverRecord> {
  const table = await tables.get(FAILOVER_TABLES.failovers);
  const lock: LockEntity = {
    partitionKey: begin.machine,
    rowKey: ACTIVE_ROW,
    failoverId: begin.failoverId,
    operationId: begin.operationId,
    kind: begin.kind,
    createdAt: now.toISOString(),
  };
  for (let attempt = 0; !(await insertIfAbsent(table, lock)); attempt++) {
    const held = await readEntity<LockEntity>(table, begin.machine, ACTIVE_ROW);
    if (!held) continue;
    if (held.failoverId === begin.failoverId) break;
    if (attempt < 3 && (await clearStaleClaim(table, held, now, holderEnded))) continue;
    const record = await readRecord(tables, begin.machine, held.failoverId);
    throw new ConflictError(
      `Machine ${begin.machine} is already failing over (${held.kind} failover ${held.failoverId}, ` +
        `${record?.state ?? 'starting'}, operation ${held.operationId}); ` +
        `commit or cancel it (POST /api/machines/${begin.machine}/commit or /cancel) before starting another.`,
      'machine',
      'FailoverInProgress',
    );
  }
  const entity: RecordEntity = {
    partitionKey: begin.machine,
    rowKey: begin.failoverId,
    kind: begin.kind,
    state: 'accepted',
    operationId: begin.operationId,
    selector: JSON.stringify(begin.selector),
    ...(begin.planRun ? { planRun: begin.planRun } : {}),
    ...(begin.target ? { targetSpec: JSON.stringify(begin.target) } : {}),
    createdAt: now.toISOString(),
    updatedAt: now.toISOString(),
  };
  await insertIfAbsent(table, entity);
  return toRecord((await readEntity<RecordEntity>(table, begin.machine, begin.failoverId))!);
}

/** The machine's abandoned failovers (what the next failover removes before its own steps). */
export async function abandonedFailovers(
  tables: FailoverTables,
  machine: string,
): Promise<AbandonedFailover[]> {
  return (await listFailovers(tables, machine))
    .filter((r) => r.state === 'abandoned')
    .map((r) => ({
      failoverId: r.failoverId,
      test: r.kind === 'test',
      ...(r.targetSpec ? { target: r.targetSpec } : {}),
    }));
}

export async function readRecord(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
): Promise<FailoverRecord | undefined> {
  const row = await readEntity<RecordEntity>(
    await tables.get(FAILOVER_TABLES.failovers),
    machine,
    failoverId,
  );
  return row ? toRecord(row) : undefined;
}

/** The machine's active failover (404 when there is none). */
export async function activeFailover(
  tables: FailoverTables,
  machine: string,
): Promise<FailoverRecord & { etag: string }> {
  const table = await tables.get(FAILOVER_TABLES.failovers);
  const lock = await readEntity<LockEntity>(table, machine, ACTIVE_ROW);
  const row = lock ? await readEntity<RecordEntity>(table, machine, lock.failoverId) : undefined;
  if (!lock || !row) {
    throw new NotFoundError(
      `Machine ${machine} has no active failover; start one with POST /api/machines/${machine}/failover.`,
      'machine',
    );
  }
  return { ...toRecord(row), etag: row.etag };
}

/** Every failover record of a machine (the active one and the history), newest first. */
export async function listFailovers(tables: FailoverTables, machine: string): Promise<FailoverRecord[]> {
  const rows = await listPartition<RecordEntity>(await tables.get(FAILOVER_TABLES.failovers), machine);
  return rows
    .filter((r) => r.rowKey !== ACTIVE_ROW)
    .map(toRecord)
    .sort((a, b) => b.createdAt.localeCompare(a.createdAt));
}

/**
 * The actions that may start again when the operation of an action in progress ended without
 * finishing it (its starter died, or it was terminated): a commit is retried, a cancel is retried,
 * and a change of point that stopped half-way may be cancelled or started again.
 */
const RESUMABLE: Partial<Record<FailoverState, readonly FailoverAction[]>> = {
  committing: ['commit'],
  cancelling: ['cancel'],
  'changing-point': ['cancel', 'change-recovery-point'],
};

/**
 * Starts an action on the machine's active failover: checks the state machine and moves the
 * record with an ETag check, so two racing requests cannot both start one (409 for the loser).
 * An action in progress whose operation ended (`holderEnded`) may be taken over (`RESUMABLE`).
 */
export async function beginAction(
  tables: FailoverTables,
  machine: string,
  action: FailoverAction,
  operationId: string,
  now: Date,
  holderEnded?: ClaimHolderEnded,
): Promise<FailoverRecord> {
  const record = await activeFailover(tables, machine);
  let next = nextState(record, action);
  if (
    !next.ok &&
    RESUMABLE[record.state]?.includes(action) &&
    (await holdersEnded([{ operationId: record.operationId, startedAt: record.updatedAt }], holderEnded))
  ) {
    next = {
      ok: true,
      state: action === 'commit' ? 'committing' : action === 'cancel' ? 'cancelling' : 'changing-point',
    };
  }
  if (!next.ok) throw new ConflictError(next.reason, 'machine', 'InvalidFailoverState');
  const table = await tables.get(FAILOVER_TABLES.failovers);
  try {
    await table.updateEntity(
      {
        partitionKey: machine,
        rowKey: record.failoverId,
        state: next.state,
        operationId,
        updatedAt: now.toISOString(),
      },
      'Merge',
      { etag: record.etag },
    );
  } catch (err) {
    if (isPreconditionFailed(err) || isNotFound(err)) {
      throw new ConflictError(
        `Failover ${record.failoverId} of ${machine} changed while this ${action} was starting; read its state and retry.`,
        'machine',
        'InvalidFailoverState',
      );
    }
    throw err;
  }
  return { ...record, state: next.state, operationId };
}

/** Progress written by the failover's own orchestration (one writer at a time: no ETag). */
export async function updateRecord(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
  change: {
    state: FailoverState;
    point?: ChosenPoint;
    target?: TargetMachine | null;
    error?: FailoverRecord['error'];
    committedAt?: string;
  },
  now: Date,
): Promise<void> {
  const table = await tables.get(FAILOVER_TABLES.failovers);
  await table.updateEntity(
    {
      partitionKey: machine,
      rowKey: failoverId,
      state: change.state,
      ...(change.point ? { point: JSON.stringify(change.point) } : {}),
      ...(change.target !== undefined ? { target: change.target ? JSON.stringify(change.target) : '' } : {}),
      ...(change.error ? { error: JSON.stringify(change.error) } : {}),
      ...(change.committedAt ? { committedAt: change.committedAt } : {}),
      updatedAt: now.toISOString(),
    },
    'Merge',
  );
}

/** Frees the machine for another failover, if `failoverId` still holds it. */
export async function releaseMachine(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
): Promise<boolean> {
  const table = await tables.get(FAILOVER_TABLES.failovers);
  const lock = await readEntity<LockEntity>(table, machine, ACTIVE_ROW);
  if (!lock || lock.failoverId !== failoverId) return false;
  try {
    await table.deleteEntity(machine, ACTIVE_ROW, { etag: (lock as TableEntityResult<LockEntity>).etag });
    return true;
  } catch (err) {
    if (isNotFound(err) || isPreconditionFailed(err) || isConflict(err)) return false;
    throw err;
  }
}

/** Deletes the failover's record (cancel removes every record a failover created). */
export async function deleteRecord(
  tables: FailoverTables,
  machine: string,
  failoverId: string,
): Promise<boolean> {
  try {
    await (await tables.get(FAILOVER_TABLES.failovers)).deleteEntity(machine, failoverId);
    return true;
  } catch (err) {
    if (isNotFound(err)) return false;
    throw err;
  }
}
