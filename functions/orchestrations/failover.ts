import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import type {
  AbandonedFailover,
  ApplyTarget,
  ChosenPoint,
  FailoverOutcome,
  FailoverRun,
  MaterialisedDisk,
  TargetMachine,
} from '../../shared/failover';
import './activities';
import { ACTIVITY, ORCHESTRATION } from './names';

// The failover orchestrations. Orchestrator code is deterministic: no I/O, no clocks, no random
// outside context.df; everything that touches storage or compute is an activity.

/** Storage and compute steps are retried: three attempts, two seconds apart. */
const RETRY = new df.RetryOptions(2000, 3);
/** Polls for applied change logs or a final marker start at 1 s and back off to 10 s. */
const FIRST_POLL_MS = 1000;
const MAX_POLL_MS = 10_000;

/** The message of an activity's failure without the library's "ErrorType: " prefix. */
export function failureMessage(err: unknown): string {
  const details = (err as { failureDetails?: { errorMessage?: string } }).failureDetails;
  if (details?.errorMessage) return details.errorMessage;
  return err instanceof Error ? err.message : String(err);
}

/** Repeats `probe` on a durable timer until `done`, or throws `timeout()` past the deadline. */
export function* pollUntil<T>(
  context: OrchestrationContext,
  probe: () => Task,
  done: (value: T) => boolean,
  deadlineMs: number,
  timeout: (last: T) => string,
): Generator<Task, T, unknown> {
  let delay = FIRST_POLL_MS;
  for (;;) {
    const value = (yield probe()) as T;
    if (done(value)) return value;
    const now = context.df.currentUtcDateTime.getTime();
    if (now >= deadlineMs) throw new Error(timeout(value));
    yield context.df.createTimer(new Date(Math.min(now + delay, deadlineMs)));
    delay = Math.min(Math.round(delay * 1.5), MAX_POLL_MS);
  }
}

export function* failoverOrchestrator(
  context: OrchestrationContext,
): Generator<Task, FailoverOutcome, unknown> {
  const run = context.df.getInput() as FailoverRun;
  const ref = { machine: run.machine, failoverId: run.failoverId };
  const test = run.kind === 'test';
  const target = run.target;
  let step = 'starting';
  let point: ChosenPoint | undefined;
  const removedAbandoned: { failoverId: string; deleted: string[] }[] = [];
  const report = (state: string, extra: Record<string, unknown> = {}) =>
    context.df.setCustomStatus({
      type: 'failover',
      ...ref,
      kind: run.kind,
      mode: run.mode,
      state,
      step,
      ...(point ? { recoveryPoint: { id: point.id, type: point.type, sourceTime: point.sourceTime } } : {}),
      ...(removedAbandoned.length > 0 ? { removedAbandoned } : {}),
      ...extra,
    });
  const progress = (state: string, extra: { point?: ChosenPoint } = {}) =>
    context.df.callActivity(ACTIVITY.recordProgress, { ...ref, state, ...extra });

  try {
    let abandonedFailovers = run.abandoned;
    if (run.planRun) {
      step = 'claiming the machine';
      report('accepted');
      const claimed = (yield context.df.callActivity(ACTIVITY.beginFailover, {
        ...ref,
        operationId: run.failoverId,
        kind: run.kind,
        selector: run.selector,
        planRun: run.planRun,
        ...(target ? { target } : {}),
      })) as { abandoned?: AbandonedFailover[] };
      abandonedFailovers ??= claimed.abandoned;
    }
    // Failovers of this machine abandoned when their operation ended mid-way: remove what they
    // created (disks, target, commands, record) the way a cancel does, names derived from their ids.
    for (const abandoned of abandonedFailovers ?? []) {
      step = `removing what abandoned failover ${abandoned.failoverId} left`;
      report('accepted');
      const deleted = (yield context.df.callActivityWithRetry(ACTIVITY.cancelFailover, RETRY, {
        machine: run.machine,
        ...abandoned,
      })) as string[];
      removedAbandoned.push({ failoverId: abandoned.failoverId, deleted });
    }
    if (run.mode === 'change-point') {
      step = 'removing the previous target';
      report('changing-point');
      yield context.df.callActivityWithRetry(ACTIVITY.removeTarget, RETRY, { ...ref, test, target });
    }
    const deadline = context.df.currentUtcDateTime.getTime() + run.waitSeconds * 1000;
    if (run.kind === 'planned' && run.mode === 'failover') {
      step = 'quiescing the source';
      report('quiescing');
      yield progress('quiescing');
      const markerId = (yield context.df.callActivity(ACTIVITY.requestQuiesce, ref)) as string;
      report('quiescing', { waitingFor: { marker: markerId } });
      const found: ChosenPoint | null = yield* pollUntil<ChosenPoint | null>(
        context,
        () => context.df.callActivity(ACTIVITY.findPoint, { machine: run.machine, pointId: markerId }),
        (p) => p !== null,
        deadline,
        () =>
          `the agent did not deliver the final marker ${markerId} within ${run.waitSeconds} s ` +
          `(is the agent running and polling the proxy for commands?)`,
      );
      point = found!;
    } else {
      if (run.selector === 'latest') {
        step = 'applying pending change logs';
        report('applying-pending');
        yield progress('applying-pending');
        const targets = (yield context.df.callActivity(ACTIVITY.pendingChangeLogs, {
          machine: run.machine,
        })) as ApplyTarget[];
        report('applying-pending', { applyTargets: targets });
        yield* pollUntil<{ disk: string; appliedSeq: number; targetSeq: number }[]>(
          context,
          () => context.df.callActivity(ACTIVITY.unappliedDisks, { machine: run.machine, targets }),
          (behind) => behind.length === 0,
          deadline,
          (behind) =>
            `pending change logs were not applied within ${run.waitSeconds} s (` +
            behind.map((b) => `disk ${b.disk} at seq ${b.appliedSeq} of ${b.targetSeq}`).join(', ') +
            '); check the apply function and the changelog-ready queue',
        );
      }
      step = 'resolving the recovery point';
      report('resolving');
      point = (yield context.df.callActivity(ACTIVITY.resolvePoint, {
        machine: run.machine,
        selector: run.selector,
      })) as ChosenPoint;
    }

    const chosen: ChosenPoint = point!;
    step = 'materialising disks';
    yield progress('materialising', { point: chosen });
    report('materialising', { disks: chosen.disks.map((d) => ({ id: d.id, state: 'copying' })) });
    const disks = (yield context.df.Task.all(
      chosen.disks.map((disk) =>
        context.df.callActivityWithRetry(ACTIVITY.materialiseDisk, RETRY, { ...ref, test, disk, target }),
      ),
    )) as MaterialisedDisk[];

    step = 'creating the target machine';
    yield progress('creating-target');
    report('creating-target', {
      disks: disks.map((d) => ({ id: d.id, state: 'materialised', resource: d.resource })),
    });
    const machine = (yield context.df.callActivityWithRetry(ACTIVITY.createTarget, RETRY, {
      ...ref,
      test,
      pointId: chosen.id,
      disks,
      target,
    })) as TargetMachine;

    step = 'recording the target machine';
    yield context.df.callActivity(ACTIVITY.completeFailover, { ...ref, point: chosen, target: machine });
    step = 'done';
    report('failed-over', {
      target: { name: machine.name, resource: machine.resource, network: machine.network },
    });
    return { ok: true, ...ref, point: chosen, target: machine };
  } catch (err) {
    const message = failureMessage(err);
    const failedStep = step;
    step = 'cleaning up';
    report('failed', { error: { step: failedStep, message } });
    yield context.df.callActivityWithRetry(ACTIVITY.failFailover, RETRY, {
      ...ref,
      test,
      target,
      step: failedStep,
      message,
    });
    report('failed', { error: { step: failedStep, message } });
    if (run.planRun) return { ok: false, ...ref, step: failedStep, message };
    throw new Error(
      `Failover ${run.failoverId} of ${run.machine} failed while ${failedStep}: ${message}. ` +
        'Everything it created was removed and the machine is free for a new failover.',
    );
  }
}

export interface FailoverActionRun {
  machine: string;
  failoverId: string;
  test: boolean;
  target?: FailoverRun['target'];
}

/** Commit: the failover is final; its point may be released by retention. */
export function* commitOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const run = context.df.getInput() as FailoverActionRun;
  context.df.setCustomStatus({
    type: 'commit',
    machine: run.machine,
    failoverId: run.failoverId,
    state: 'committing',
  });
  yield context.df.callActivityWithRetry(ACTIVITY.commitFailover, RETRY, run);
  context.df.setCustomStatus({
    type: 'commit',
    machine: run.machine,
    failoverId: run.failoverId,
    state: 'committed',
  });
  return { machine: run.machine, failoverId: run.failoverId, state: 'committed' };
}

/** Cancel: removes every blob and record the failover created and frees the machine. */
export function* cancelOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const run = context.df.getInput() as FailoverActionRun;
  context.df.setCustomStatus({
    type: 'cancel',
    machine: run.machine,
    failoverId: run.failoverId,
    state: 'cancelling',
  });
  const deleted = (yield context.df.callActivityWithRetry(ACTIVITY.cancelFailover, RETRY, run)) as string[];
  context.df.setCustomStatus({
    type: 'cancel',
    machine: run.machine,
    failoverId: run.failoverId,
    state: 'cancelled',
  });
  return { machine: run.machine, failoverId: run.failoverId, state: 'cancelled', deleted };
}

df.app.orchestration(ORCHESTRATION.failover, failoverOrchestrator);
df.app.orchestration(ORCHESTRATION.commit, commitOrchestrator);
df.app.orchestration(ORCHESTRATION.cancel, cancelOrchestrator);
