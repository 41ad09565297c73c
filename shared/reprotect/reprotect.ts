import { ConflictError, LifeboatError } from '../errors';
import { activeFailover, type FailoverRecord } from '../failover';
import { readEntity, readMachine } from '../replication';
import type { ProtectionDeps } from './context';
import {
  activeOperation,
  claimMachine,
  clearEndedClaim,
  REPROTECT_ROW,
  type ClaimHolderEnded,
} from './tables';

// The preconditions of reprotect and failback (the 409s), checked before anything starts.

export interface ReprotectEntity {
  partitionKey: string;
  rowKey: string;
  failoverId: string;
  operationId: string;
  state: 'starting' | 'protecting' | 'failing-back' | 'failed-back';
  /** The epoch of this reprotect's change logs and the target's cursor. */
  epoch: number;
  /** JSON array of { id, sizeBytes }. */
  disks: string;
  startedAt: string;
  protectingSince?: string;
  /** Set by POST …/failback: the reprotect loop stops and hands over to this operation. */
  failbackOperationId?: string;
  /** Set by the reprotect loop once it stopped for that failback. */
  handedOverTo?: string;
  /** JSON of the forward-protection epochs failback chose (kept so a rerun chooses the same). */
  forwardPlans?: string;
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
  // A reprotect that stopped (failed, terminated) may be started again: a new epoch, a new checksum pass.
  if (record.state !== 'committed' && record.state !== 'reprotecting' && record.state !== 'reprotected') {
    throw new ConflictError(
      `Failover ${record.failoverId} of ${machine} is ${record.state}, not committed; commit it (POST /api/machines/${machine}/commit) before reprotect.`,
      'machine',
      'FailoverNotCommitted',
    );
  }
  return record;
}

/** POST …/reprotect: 404 (machine), 409 (no committed failover, another operation running). */
export async function prepareReprotect(
  deps: ProtectionDeps,
  machine: string,
  operationId: string,
  holderEnded?: ClaimHolderEnded,
): Promise<FailoverRecord> {
  await readMachine(deps.failover.replication, machine);
  const record = await committedFailover(deps, machine);
  await claimMachine(deps.tables, machine, 'reprotect', operationId, deps.now(), holderEnded);
  return record;
}

/** POST …/failback: 404 (machine), 409 (not reprotected, or another failback running). */
export async function prepareFailback(
  deps: ProtectionDeps,
  machine: string,
  holderEnded?: ClaimHolderEnded,
): Promise<ReprotectEntity & { etag: string }> {
  await readMachine(deps.failover.replication, machine);
  const row = await readEntity<ReprotectEntity>(await deps.tables.get(), machine, REPROTECT_ROW);
  let active = await activeOperation(deps.tables, machine);
  // A failback or resync that ended without releasing the machine (terminated) holds it no more.
  if (active && active.kind !== 'reprotect' && (await clearEndedClaim(deps.tables, active, holderEnded)))
    active = undefined;
  if (active && active.kind !== 'reprotect') {
    throw new ConflictError(
      `Machine ${machine} is already running a ${active.kind} (operation ${active.operationId}); wait until it finishes (GET /api/operations/${active.operationId}) and retry.`,
      'machine',
      'OperationInProgress',
    );
  }
  // A failback that failed (nothing holds the machine) may be retried: it resumes from the pass rows.
  const retry = row?.state === 'failing-back' && !active;
  if (!row || (row.state !== 'protecting' && !retry)) {
    const why = row ? `its reprotect is ${row.state}` : 'it is not reprotected';
    throw new ConflictError(
      `Machine ${machine} cannot fail back: ${why}. Reprotect it first (POST /api/machines/${machine}/reprotect) and wait until the site disks caught up.`,
      'machine',
      'NotReprotected',
    );
  }
  return row;
}
