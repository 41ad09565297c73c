import { ConflictError, LifeboatError } from '../errors';
import { activeFailover, type FailoverRecord } from '../failover';
import { readEntity, readMachine } from '../replication';
import type { ProtectionDeps } from './context';
import { activeOperation, claimMachine, REPROTECT_ROW } from './tables';

// The preconditions of reprotect and failback (the 409s), checked before anything starts.

export interface ReprotectEntity {
  partitionKey: string;
  rowKey: string;
  failoverId: string;
  operationId: string;
  state: 'starting' | 'protecting' | 'failing-back' | 'failed-back';
}

/** The machine's committed failover; 409 when there is none or it is not committed. */
export async function committedFailover(deps: ProtectionDeps, machine: string): Promise<FailoverRecord> {
  let record: FailoverRecord;
  try {
    record = await activeFailover(deps.failover.tables, machine);
  } catch (err) {
    if (err instanceof LifeboatError && err.status === 404) {
      throw new ConflictError(
        `Machine ${machine} has no failover to reprotect; fail it over and commit first (POST /api/machines/${machine}/failover, then /commit).`,
        'machine',
        'NotFailedOver',
      );
    }
    throw err;
  }
  if (record.state !== 'committed') {
    throw new ConflictError(
      `Failover ${record.failoverId} of ${machine} is ${record.state}, not committed; commit it (POST /api/machines/${machine}/commit) before reprotect.`,
      'machine',
      'FailoverNotCommitted',
    );
  }
  return record;
}

/** POST …/reprotect: 404 (machine), 409 (no committed failover, another operation running). */
export async function prepareReprotect(deps: ProtectionDeps, machine: string, operationId: string): Promise<FailoverRecord> {
  await readMachine(deps.failover.replication, machine);
  const record = await committedFailover(deps, machine);
  await claimMachine(deps.tables, machine, 'reprotect', operationId, deps.now());
  return record;
}

/** POST …/failback: 404 (machine), 409 (not reprotected, or another failback running). */
export async function prepareFailback(deps: ProtectionDeps, machine: string): Promise<ReprotectEntity> {
  await readMachine(deps.failover.replication, machine);
  const row = await readEntity<ReprotectEntity>(await deps.tables.get(), machine, REPROTECT_ROW);
  const active = await activeOperation(deps.tables, machine);
  if (!row || row.state !== 'protecting') {
    const why = row ? `its reprotect is ${row.state}` : 'it is not reprotected';
    throw new ConflictError(
      `Machine ${machine} cannot fail back: ${why}. Reprotect it first (POST /api/machines/${machine}/reprotect) and wait until the site disks caught up.`,
      'machine',
      'NotReprotected',
    );
  }
  if (active && active.kind !== 'reprotect') {
    throw new ConflictError(
      `Machine ${machine} is already running a ${active.kind} (operation ${active.operationId}); wait until it finishes and retry.`,
      'machine',
      'OperationInProgress',
    );
  }
  return row;
}
