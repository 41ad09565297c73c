import type { TableClient } from '@azure/data-tables';
import { deleteClaim, holdersEnded, type ClaimHolderEnded } from '../claims';
import { ConflictError } from '../errors';
import { insertIfAbsent, isNotFound, isPreconditionFailed, readEntity } from '../replication';
import type { StorageClients } from '../storage';

// The protection state in Table storage (ReplicaStorage). docs/reprotect.md lists every field.
//
//   protection   PK {machine}  RK "active"      the machine's one running resync/reprotect/failback (insert-if-absent = the 409)
//                PK {machine}  RK "reprotect"   the reprotect state: failover, epoch, per-disk last snapshot and seq
//                PK {machine}  RK "target-{d}"  what the site's target role applied of disk d (written by the target)
//                PK {machine}  RK "pass-{d}"    the cloud side of disk d's last reprotect pass: snapshot, seqs, shipped

export const PROTECTION_TABLE = 'protection';
export const ACTIVE_ROW = 'active';
export const REPROTECT_ROW = 'reprotect';
export const targetRow = (disk: string) => `target-${disk}`;
export const passRow = (disk: string) => `pass-${disk}`;

export type ProtectionKind = 'resync' | 'reprotect' | 'failback';

export interface ActiveEntity {
  partitionKey: string;
  rowKey: string;
  kind: ProtectionKind;
  operationId: string;
  startedAt: string;
}

/** The table client of the protection state, created on first use. */
export class ProtectionTables {
  private client?: Promise<TableClient>;

  constructor(private readonly storage: StorageClients) {}

  get(): Promise<TableClient> {
    if (!this.client) {
      const c = this.storage.table(PROTECTION_TABLE);
      this.client = c.createTable().then(
        () => c,
        (err) => {
          this.client = undefined;
          throw err;
        },
      );
    }
    return this.client;
  }
}

export type { ClaimHolderEnded } from '../claims';

/**
 * Removes a claim whose holder ended (`holderEnded`), ETag-checked so a claim that changed
 * meanwhile stays. True when the claim is gone.
 */
export async function clearEndedClaim(
  tables: ProtectionTables,
  held: ActiveEntity & { etag?: string },
  holderEnded: ClaimHolderEnded | undefined,
): Promise<boolean> {
  if (!(await holdersEnded([held], holderEnded))) return false;
  return deleteClaim(await tables.get(), held);
}

/**
 * Claims the machine for one protection operation. A second one gets a 409 naming the first
 * (unless `holderEnded` says the first ended without releasing it: then its claim is cleared);
 * the same operation claiming again (an activity run twice) succeeds.
 */
export async function claimMachine(
  tables: ProtectionTables,
  machine: string,
  kind: ProtectionKind,
  operationId: string,
  now: Date,
  holderEnded?: ClaimHolderEnded,
): Promise<void> {
  const table = await tables.get();
  const entity: ActiveEntity = {
    partitionKey: machine,
    rowKey: ACTIVE_ROW,
    kind,
    operationId,
    startedAt: now.toISOString(),
  };
  for (let attempt = 0; ; attempt++) {
    if (await insertIfAbsent(table, entity)) return;
    const held = await readEntity<ActiveEntity>(table, machine, ACTIVE_ROW);
    if (!held) continue;
    if (held.operationId === operationId) return;
    if (attempt < 3 && (await clearEndedClaim(tables, held, holderEnded))) continue;
    throw new ConflictError(
      `Machine ${machine} is already running a ${held.kind} (operation ${held.operationId}, started ${held.startedAt}); ` +
        `wait until it finishes (GET /api/operations/${held.operationId}) and retry.`,
      'machine',
      'OperationInProgress',
    );
  }
}

/** The running operation of a machine, if any. */
export async function activeOperation(
  tables: ProtectionTables,
  machine: string,
): Promise<ActiveEntity | undefined> {
  return readEntity<ActiveEntity>(await tables.get(), machine, ACTIVE_ROW);
}

/** Frees the machine if `operationId` still holds it. */
export async function releaseMachine(
  tables: ProtectionTables,
  machine: string,
  operationId: string,
): Promise<void> {
  const table = await tables.get();
  const held = await readEntity<ActiveEntity>(table, machine, ACTIVE_ROW);
  if (!held || held.operationId !== operationId) return;
  try {
    await table.deleteEntity(machine, ACTIVE_ROW, { etag: held.etag });
  } catch (err) {
    if (!isNotFound(err) && !isPreconditionFailed(err)) throw err;
  }
}
