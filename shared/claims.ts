import type { TableClient } from '@azure/data-tables';
import { isNotFound, isPreconditionFailed } from './replication/tables';

// A claim is a table row inserted if absent: the machine's one running operation of a kind (the
// protection `active` row, the failover `active` row). Its holder is supposed to remove it when it
// ends; these helpers let a starter clear the claim of a holder that ended without doing so.
// docs/reprotect.md ("A claim whose holder ended") and docs/failover.md ("Stale claims").

/** An operation (orchestration instance) holding a claim, and when it took it. */
export interface ClaimHolder {
  operationId: string;
  startedAt: string;
}

/**
 * Whether the operation holding a claim has ended without releasing it (its orchestration was
 * terminated, failed or completed, or never started). The HTTP starters answer it from the
 * durable client's runtime status; without it a claim is only ever released by its holder.
 */
export type ClaimHolderEnded = (holder: ClaimHolder) => Promise<boolean>;

/** True when every holder has ended (false without a way to ask). */
export async function holdersEnded(
  holders: readonly ClaimHolder[],
  holderEnded: ClaimHolderEnded | undefined,
): Promise<boolean> {
  if (!holderEnded) return false;
  for (const holder of holders) if (!(await holderEnded(holder))) return false;
  return true;
}

/**
 * Deletes a claim row, ETag-checked so a claim that changed since it was read stays. True when the
 * row is gone.
 */
export async function deleteClaim(
  table: TableClient,
  row: { partitionKey: string; rowKey: string; etag?: string },
): Promise<boolean> {
  try {
    await table.deleteEntity(row.partitionKey, row.rowKey, { etag: row.etag ?? '*' });
    return true;
  } catch (err) {
    if (isNotFound(err)) return true;
    if (isPreconditionFailed(err)) return false;
    throw err;
  }
}
