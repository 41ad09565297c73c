import { z } from 'zod';
import { ConflictError, LifeboatError, ValidationError } from '../errors';
import { activeFailover, type PlanAction, type RecoveryPlan } from '../failover';
import { parseOrThrow, readEntity } from '../replication';
import type { ProtectionDeps } from './context';
import type { FailbackRun } from './failback';
import { failbackRequestSchema } from './failback-request';
import { prepareFailback, type ReprotectEntity } from './reprotect';
import {
  ACTIVE_ROW,
  REPROTECT_ROW,
  releaseMachine,
  type ActiveEntity,
  type ClaimHolderEnded,
} from './tables';

// A recovery plan's failback: every machine of the plan that is reprotected fails back, group by
// group (last group first by default), each machine through the per-machine failback. The checks
// run for every machine before anything changes, so a 409 leaves nothing half-started.
// docs/reprotect.md, "Plan failback".

/** A machine's failback fields (each machine's `cleanup`, `waitSeconds`), and the plan's order and actions. */
export const planFailbackRequestSchema = failbackRequestSchema.extend({
  /** `reverse`: last group first (dependents stop before what they depend on); `forward`: plan order. */
  order: z.enum(['reverse', 'forward']).default('reverse'),
  /** Which of the plan's pre/post actions run: all, only manual and wait steps, or none. */
  actions: z.enum(['all', 'manual-and-wait', 'none']).default('all'),
});

export type PlanFailbackRequest = z.infer<typeof planFailbackRequestSchema>;

export function parsePlanFailbackRequest(body: unknown): PlanFailbackRequest {
  if (body !== undefined && (body === null || typeof body !== 'object' || Array.isArray(body))) {
    throw new ValidationError(
      'The request body must be a JSON object (or empty) with optionally "cleanup", "waitSeconds", "order" and "actions".',
      'body',
    );
  }
  return parseOrThrow(planFailbackRequestSchema, body ?? {});
}

export interface PlanFailbackMember {
  machine: string;
  /** The machine's failback (its operationId is the sub-orchestration's instance id); absent when home. */
  run?: FailbackRun;
  /** Why the machine is skipped (it already failed back). */
  home?: string;
}

export interface PlanFailbackRun {
  plan: string;
  runId: string;
  order: PlanFailbackRequest['order'];
  actions: PlanFailbackRequest['actions'];
  waitSeconds: number;
  /** In the order they run. */
  groups: { name: string; pre: PlanAction[]; post: PlanAction[]; members: PlanFailbackMember[] }[];
}

/** One machine of a plan, checked: ready to fail back (its reprotect row), or already home. */
export interface CheckedMember {
  machine: string;
  row?: ReprotectEntity & { etag: string };
  /** The claim the failback request will move (a reprotect's), to restore if the plan cannot start. */
  active?: ActiveEntity & { etag: string };
  home?: string;
}

/**
 * Checks every machine of the plan: each must be ready to fail back (what POST …/failback checks)
 * or already home (its reprotect row says failed-back and no failover holds it). Throws one 409
 * naming every machine that is neither, and why; nothing is changed.
 */
export async function checkPlanFailback(
  deps: ProtectionDeps,
  plan: RecoveryPlan,
  holderEnded?: ClaimHolderEnded,
): Promise<CheckedMember[]> {
  const table = await deps.tables.get();
  const out: CheckedMember[] = [];
  const problems: string[] = [];
  for (const group of plan.groups) {
    for (const { machine } of group.machines) {
      const row = await readEntity<ReprotectEntity>(table, machine, REPROTECT_ROW);
      if (row?.state === 'failed-back') {
        const failover = await activeFailover(deps.failover.tables, machine).catch(() => undefined);
        if (!failover) {
          out.push({ machine, home: `already failed back (failover ${row.failoverId})` });
          continue;
        }
      }
      try {
        const ready = await prepareFailback(deps, machine, holderEnded);
        const active = await readEntity<ActiveEntity>(table, machine, ACTIVE_ROW);
        out.push({ machine, row: ready, ...(active ? { active } : {}) });
      } catch (err) {
        if (!(err instanceof LifeboatError) || err.status >= 500) throw err;
        problems.push(`${machine} (${err.code}): ${err.message}`);
      }
    }
  }
  if (problems.length > 0) {
    throw new ConflictError(
      `Recovery plan ${plan.name} cannot fail back: ${problems.length} of its machines ${problems.length === 1 ? 'is' : 'are'} not ready. ` +
        `${problems.join(' ')} Nothing was started; fix these and retry.`,
      'plan',
      'PlanNotReadyToFailBack',
    );
  }
  if (out.every((m) => !m.row)) {
    throw new ConflictError(
      `Recovery plan ${plan.name} has nothing to fail back: every machine of it is already home (${out.map((m) => m.machine).join(', ')}).`,
      'plan',
      'NothingToFailBack',
    );
  }
  return out;
}

/**
 * Takes back a failback request that the plan could not start (another machine's request lost a
 * race): the reprotect row returns to its state without the failback flag, and the machine's
 * claim to the reprotect that held it (or is released).
 */
export async function withdrawFailbackRequest(
  deps: ProtectionDeps,
  member: CheckedMember,
  operationId: string,
): Promise<void> {
  const table = await deps.tables.get();
  const row = await readEntity<ReprotectEntity>(table, member.machine, REPROTECT_ROW);
  if (row && row.failbackOperationId === operationId && row.handedOverTo !== operationId) {
    await table.updateEntity(
      {
        partitionKey: member.machine,
        rowKey: REPROTECT_ROW,
        state: member.row!.state,
        failbackOperationId: member.row!.failbackOperationId ?? '',
      },
      'Merge',
    );
  }
  const held = await readEntity<ActiveEntity>(table, member.machine, ACTIVE_ROW);
  if (held?.operationId !== operationId) return;
  if (member.active) {
    await table.updateEntity(
      {
        partitionKey: member.machine,
        rowKey: ACTIVE_ROW,
        kind: member.active.kind,
        operationId: member.active.operationId,
        startedAt: member.active.startedAt,
      },
      'Merge',
      { etag: held.etag },
    );
  } else {
    await releaseMachine(deps.tables, member.machine, operationId);
  }
}
