import type { ClaimHolderEnded } from '../claims';
import { readMachine } from '../replication';
import type { FailoverDeps } from './context';
import {
  parseChangePoint,
  parseFailoverRequest,
  toSelector,
  type FailoverRecord,
  type FailoverRun,
} from './model';
import { resolveRecoveryPoint } from './recovery-point';
import { abandonedFailovers, beginAction, beginFailover } from './records';

/**
 * The synchronous half of POST /machines/{m}/failover: validates the body (400), checks the
 * machine (404) and, for every selector but `latest`, that the point exists (404), then claims
 * the machine (409, unless `holderEnded` says the failover holding it ended unfinished: then
 * that one is abandoned). Returns the orchestration's input, with the machine's abandoned
 * failovers for it to remove first.
 */
export async function prepareFailover(
  deps: FailoverDeps,
  machine: string,
  body: unknown,
  failoverId: string,
  holderEnded?: ClaimHolderEnded,
): Promise<FailoverRun> {
  const request = parseFailoverRequest(body);
  await readMachine(deps.replication, machine);
  const selector = toSelector(request.recoveryPoint);
  if (selector !== 'latest' && !request.planned)
    await resolveRecoveryPoint(deps.replication, machine, selector);
  const kind = request.test ? 'test' : request.planned ? 'planned' : 'unplanned';
  await beginFailover(
    deps.tables,
    {
      machine,
      failoverId,
      operationId: failoverId,
      kind,
      selector,
      ...(request.target ? { target: request.target } : {}),
    },
    deps.now(),
    holderEnded,
  );
  const abandoned = await abandonedFailovers(deps.tables, machine);
  return {
    machine,
    failoverId,
    kind,
    selector,
    waitSeconds: request.waitSeconds,
    ...(request.target ? { target: request.target } : {}),
    mode: 'failover',
    ...(abandoned.length > 0 ? { abandoned } : {}),
  };
}

/**
 * POST …/change-recovery-point: 400, 404 (machine, point, no active failover), 409 (state; one
 * whose operation ended half-way may be started again, as `holderEnded` tells).
 */
export async function prepareChangePoint(
  deps: FailoverDeps,
  machine: string,
  body: unknown,
  operationId: string,
  holderEnded?: ClaimHolderEnded,
): Promise<{ record: FailoverRecord; run: FailoverRun }> {
  const request = parseChangePoint(body);
  await readMachine(deps.replication, machine);
  const selector = toSelector(request.recoveryPoint);
  if (selector !== 'latest') await resolveRecoveryPoint(deps.replication, machine, selector);
  const record = await beginAction(
    deps.tables,
    machine,
    'change-recovery-point',
    operationId,
    deps.now(),
    holderEnded,
  );
  return {
    record,
    run: {
      machine,
      failoverId: record.failoverId,
      kind: record.kind,
      selector,
      waitSeconds: request.waitSeconds,
      ...(record.targetSpec ? { target: record.targetSpec } : {}),
      mode: 'change-point',
    },
  };
}

/**
 * POST …/commit and …/cancel: 404 (machine, no active failover), 409 (state; a commit or cancel
 * whose operation ended unfinished may be started again, as `holderEnded` tells).
 */
export async function prepareAction(
  deps: FailoverDeps,
  machine: string,
  action: 'commit' | 'cancel',
  operationId: string,
  holderEnded?: ClaimHolderEnded,
): Promise<FailoverRecord> {
  await readMachine(deps.replication, machine);
  return beginAction(deps.tables, machine, action, operationId, deps.now(), holderEnded);
}
