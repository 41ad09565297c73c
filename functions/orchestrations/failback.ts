import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import type {
  FailbackOutcome,
  FailbackRun,
  PassResult,
  ResyncDiskPlan,
  ResyncStatus,
  SiteVerification,
  TargetProgress,
} from '../../shared/reprotect';
import { failureMessage, pollUntil } from './failover';
import { PROTECTION_ACTIVITY, PROTECTION_ORCHESTRATION } from './protection-activities';

// Failback: a planned failover back to the site. Take over from the reprotect loop, stop the
// failover machine (its NBD export lets clients go: every acknowledged write is in the blob),
// final snapshot and pass, wait for the target to apply it, verify the site disks against the
// final snapshot (checksums), report the site ready, resume forward protection in a new epoch
// seeded from the final snapshot, clean up per option, and wait for the agent's first marker of
// the new epoch. Deterministic: time comes from context.df only.

const RETRY = new df.RetryOptions(2000, 3);
/** How long the reprotect loop and the NBD export get to stop. */
const STOP_WAIT_MS = 10 * 60_000;

export function* failbackOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const run = context.df.getInput() as FailbackRun;
  const ref = { machine: run.machine, failoverId: run.failoverId };
  let step = 'starting';
  const base = {
    type: 'failback',
    machine: run.machine,
    failoverId: run.failoverId,
    epoch: run.epoch,
    cleanup: run.cleanup,
  };
  let siteReady = false;
  const status = (state: string, extra: Record<string, unknown> = {}) =>
    context.df.setCustomStatus({ ...base, state, step, siteReady, ...extra });
  const now = () => context.df.currentUtcDateTime.getTime();
  try {
    if (run.waitForHandover) {
      step = 'stopping the reprotect passes';
      status('failing-back');
      yield* pollUntil<boolean>(
        context,
        () =>
          context.df.callActivity(PROTECTION_ACTIVITY.handedOver, {
            machine: run.machine,
            operationId: run.operationId,
          }),
        (done) => done,
        now() + STOP_WAIT_MS,
        () => 'the reprotect operation did not stop its passes within 10 minutes (is it still running?)',
      );
    }

    step = 'stopping the failover machine';
    status('failing-back');
    yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.stopFailoverMachine, RETRY, ref);
    yield* pollUntil<boolean>(
      context,
      () => context.df.callActivity(PROTECTION_ACTIVITY.failoverMachineStopped, ref),
      (stopped) => stopped,
      now() + STOP_WAIT_MS,
      () => `the failover machine of ${run.machine} still serves its disks over NBD after 10 minutes`,
    );

    step = 'shipping the last changes';
    status('failing-back');
    const markerId = `final-${run.operationId}`;
    const finals = (yield context.df.Task.all(
      run.disks.map((disk) =>
        context.df.callActivityWithRetry(PROTECTION_ACTIVITY.reprotectPass, RETRY, {
          machine: run.machine,
          failoverId: run.failoverId,
          epoch: run.epoch,
          disk,
          pass: 0,
          markerId,
        }),
      ),
    )) as PassResult[];
    const finalView = finals.map((f) => ({ disk: f.disk, changedBytes: f.changedBytes, lastSeq: f.lastSeq }));

    step = 'waiting for the site to apply the last changes';
    status('failing-back', { finalPass: finalView });
    const passes = finals.map((f) => ({ disk: f.disk, lastSeq: f.lastSeq }));
    yield* pollUntil<TargetProgress>(
      context,
      () =>
        context.df.callActivity(PROTECTION_ACTIVITY.targetProgress, {
          machine: run.machine,
          epoch: run.epoch,
          passes,
        }),
      (p) => p.applied,
      now() + run.waitSeconds * 1000,
      (p) =>
        `the site's target did not apply the final pass within ${run.waitSeconds} s (${p.disks
          .map((d) => `${d.disk} at seq ${d.appliedSeq} of ${d.targetSeq}`)
          .join(', ')}); is lifeboat target reprotect running? Retry the failback once it is`,
    );

    step = 'verifying the site disks';
    status('failing-back', { finalPass: finalView });
    const verified = yield* pollUntil<SiteVerification>(
      context,
      () =>
        context.df.callActivityWithRetry(PROTECTION_ACTIVITY.verifySite, RETRY, {
          ...ref,
          epoch: run.epoch,
          disks: run.disks,
          finals,
        }),
      (v) => v.ready,
      now() + STOP_WAIT_MS,
      () => 'the target did not upload the site checksums after the final pass',
    );
    if (!verified.ok) {
      const bad = verified.disks
        .filter((d) => d.differing.length > 0)
        .map((d) => `${d.disk} (blocks ${d.differing.join(', ')})`);
      throw new Error(
        `the site disks differ from the final snapshot: ${bad.join('; ')}; the failover machine stays stopped, nothing was cleaned up`,
      );
    }

    step = 'reporting the site ready';
    yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.markFailedBack, RETRY, {
      ...ref,
      operationId: run.operationId,
    });
    siteReady = true;
    status('failed-back', {
      finalPass: finalView,
      verified: verified.disks.map((d) => ({ disk: d.disk, blocks: d.blocks })),
    });

    step = 'resuming forward protection';
    const plans = (yield context.df.callActivityWithRetry(
      PROTECTION_ACTIVITY.resumeForwardProtection,
      RETRY,
      {
        ...ref,
        operationId: run.operationId,
        disks: run.disks,
        finals,
        waitSeconds: run.waitSeconds,
      },
    )) as ResyncDiskPlan[];

    step = 'cleaning up';
    const deleted = (yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.cleanUpFailback, RETRY, {
      ...ref,
      epoch: run.epoch,
      disks: run.disks,
      cleanup: run.cleanup,
    })) as string[];

    step = 'waiting for the agent to resume forward protection';
    const epochs = Object.fromEntries(plans.map((p) => [p.disk, p.targetEpoch]));
    status('resuming-protection', { epochs, deleted });
    const startedAt = context.df.currentUtcDateTime.toISOString();
    const deadline = now() + (run.forwardWaitSeconds ?? run.waitSeconds) * 1000;
    let resync: ResyncStatus;
    let delay = 1000;
    for (;;) {
      resync = (yield context.df.callActivity(PROTECTION_ACTIVITY.resyncProgress, {
        machine: run.machine,
        operationId: run.operationId,
        plans,
        startedAt,
      })) as ResyncStatus;
      if (resync.done || now() >= deadline) break;
      status('resuming-protection', { epochs, deleted, forward: resync });
      yield context.df.createTimer(new Date(Math.min(now() + delay, deadline)));
      delay = Math.min(Math.round(delay * 1.5), 10_000);
    }
    // Done: close the agent's command. Not yet: leave it pending for the agent, free the machine.
    if (resync.done) {
      yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.completeResync, RETRY, {
        machine: run.machine,
        operationId: run.operationId,
        ok: true,
      });
    } else {
      yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.releaseMachine, RETRY, {
        machine: run.machine,
        operationId: run.operationId,
      });
    }
    const forwardProtection = resync.done ? 'protected' : 'waiting-for-agent';
    status('completed', { epochs, deleted, forwardProtection, forward: resync });
    return {
      ok: true,
      machine: run.machine,
      operationId: run.operationId,
      failoverId: run.failoverId,
      state: 'failed-back',
      siteReady: true,
      forwardProtection,
      epochs,
      forwardPlans: plans,
      forwardStartedAt: startedAt,
      deleted,
      finalPass: finalView,
    } satisfies FailbackOutcome & { finalPass: unknown };
  } catch (err) {
    const message = failureMessage(err);
    yield context.df.callActivity(PROTECTION_ACTIVITY.releaseMachine, {
      machine: run.machine,
      operationId: run.operationId,
    });
    status('failed', { error: message });
    if (run.planRun)
      return {
        ok: false,
        machine: run.machine,
        operationId: run.operationId,
        failoverId: run.failoverId,
        step,
        message,
        siteReady,
      } satisfies FailbackOutcome;
    throw new Error(`The failback of ${run.machine} failed while ${step}: ${message}`);
  }
}

df.app.orchestration(PROTECTION_ORCHESTRATION.failback, failbackOrchestrator);
