import { z } from 'zod';
import type { ClaimHolderEnded } from '../claims';
import { ConflictError } from '../errors';
import {
  abandonedFailovers,
  beginFailover,
  deleteRecord,
  releaseMachine,
  requireObject,
  type FailoverDeps,
  type FailoverKind,
  type FailoverRun,
} from '../failover';
import { parseOrThrow } from '../replication/policy';
import { isMarkerId } from '../segment';
import { readGroup, resolveGroupPoint, type GroupRecoveryPoint, type GroupStore } from './points';

// Group failover: every member of a group point fails over to its own recovery point at that
// point's marker (the same id on every member). The synchronous half (validation, 404s, claiming
// every member or none: 409) lives here; the orchestration group-failover runs the members'
// failovers in parallel.

export const groupFailoverRequestSchema = z.strictObject({
  recoveryPoint: z.union(
    [
      z.enum(['latest-group-processed', 'latest-group-app-consistent']),
      z.string().refine(isMarkerId, {
        error:
          'must be latest-group-processed, latest-group-app-consistent or a group recovery point id (from GET /api/groups/{group}/recovery-points)',
      }),
    ],
    { error: 'must be latest-group-processed, latest-group-app-consistent or a group recovery point id' },
  ),
  /** A drill: every member gets an isolated target, replication is untouched, end it with cancel per member. */
  test: z.boolean({ error: 'must be true or false' }).default(false),
  waitSeconds: z
    .number({ error: 'must be a number of seconds' })
    .int({ error: 'must be a whole number of seconds' })
    .min(1)
    .max(86_400)
    .default(900),
});

export type GroupFailoverRequest = z.infer<typeof groupFailoverRequestSchema>;

export function parseGroupFailoverRequest(body: unknown): GroupFailoverRequest {
  requireObject(
    body,
    '"recoveryPoint" (latest-group-processed, latest-group-app-consistent or a group point id) and optionally "test"',
  );
  return parseOrThrow(groupFailoverRequestSchema, body);
}

/** The input of the group-failover orchestration. */
export interface GroupFailoverRun {
  group: string;
  /** The operation id (the orchestration's instance id). */
  runId: string;
  point: { id: string; type: GroupRecoveryPoint['type']; sourceTime: string };
  test: boolean;
  /** One machine failover per member of the point, each with its own failover id. */
  members: FailoverRun[];
}

/**
 * POST /api/groups/{g}/failover, synchronous half: 400 (body), 404 (group, point), then claims
 * every member of the point for this run; if one is already failing over, releases the claims
 * it made and answers 409 naming that member (a member held by a failover whose operations
 * ended unfinished is taken, as `holderEnded` allows: docs/failover.md, "Stale claims").
 * `failoverId(machine)` gives each member's id.
 */
export async function prepareGroupFailover(
  deps: FailoverDeps,
  store: GroupStore,
  group: string,
  body: unknown,
  runId: string,
  failoverId: (machine: string) => string,
  holderEnded?: ClaimHolderEnded,
): Promise<GroupFailoverRun> {
  const request = parseGroupFailoverRequest(body);
  await readGroup(store, group);
  const point = await resolveGroupPoint(store, group, request.recoveryPoint);
  const kind: FailoverKind = request.test ? 'test' : 'unplanned';
  const members: FailoverRun[] = point.members.map((m) => ({
    machine: m.machine,
    failoverId: failoverId(m.machine),
    kind,
    selector: { id: m.recoveryPoint },
    waitSeconds: request.waitSeconds,
    mode: 'failover',
    // Set so that a member's failure comes back as a result (the group reports every member).
    planRun: runId,
  }));
  const claimed: FailoverRun[] = [];
  try {
    for (const run of members) {
      await beginFailover(
        deps.tables,
        {
          machine: run.machine,
          failoverId: run.failoverId,
          operationId: runId,
          kind,
          selector: run.selector,
          planRun: runId,
        },
        deps.now(),
        holderEnded,
      );
      claimed.push(run);
      const abandoned = await abandonedFailovers(deps.tables, run.machine);
      if (abandoned.length > 0) run.abandoned = abandoned;
    }
  } catch (err) {
    await releaseGroupClaims(deps, claimed);
    if (err instanceof ConflictError) {
      throw new ConflictError(`Group ${group} cannot fail over: ${err.message}`, 'group', err.code);
    }
    throw err;
  }
  return {
    group,
    runId,
    point: { id: point.id, type: point.type, sourceTime: point.sourceTime },
    test: request.test,
    members,
  };
}

/** Undoes the claims of a group failover that did not start. */
export async function releaseGroupClaims(
  deps: FailoverDeps,
  runs: Pick<FailoverRun, 'machine' | 'failoverId'>[],
): Promise<void> {
  for (const r of runs) {
    await deleteRecord(deps.tables, r.machine, r.failoverId);
    await releaseMachine(deps.tables, r.machine, r.failoverId);
  }
}
