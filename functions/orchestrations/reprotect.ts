import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import type { PassResult, ReprotectRun, TargetProgress } from '../../shared/reprotect';
import { failureMessage } from './failover';
import { FAILBACK_EVENT, PROTECTION_ACTIVITY, PROTECTION_ORCHESTRATION } from './protection-activities';

// Reprotect: the failed-over machine is the source, the site disks the target. One execution per
// pass (continue-as-new): snapshot every failover disk and ship what changed (the first pass: what
// differs from the site's checksums), wait until the site's target applied it, then a durable
// timer — or failback's event — before the next. It runs until failback takes over; a failing
// step (storage, the link) is retried on the next round, and a stopped target is simply waited
// for: its cursor says where it resumes. Deterministic: time comes from context.df only.

const RETRY = new df.RetryOptions(2000, 3);
const FIRST_POLL_MS = 1000;
const MAX_POLL_MS = 10_000;
/** After a failed round, wait this long before the next attempt. */
const RETRY_ROUND_MS = 15_000;

export function* reprotectOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const run = context.df.getInput() as ReprotectRun;
  const startedAt = run.startedAt ?? context.df.currentUtcDateTime.toISOString();
  const base = {
    type: 'reprotect',
    machine: run.machine,
    failoverId: run.failoverId,
    epoch: run.epoch,
    pass: run.pass,
    startedAt,
  };
  const status = (state: string, extra: Record<string, unknown> = {}) =>
    context.df.setCustomStatus({
      ...base,
      state,
      shippedBytes: run.shippedBytes,
      sealedBytes: run.sealedBytes,
      firstPass: run.firstPass,
      ...extra,
    });
  const ref = { machine: run.machine, operationId: run.operationId };

  /** Stops for failback: record the hand-over and end (the failback orchestration continues). */
  function* handOver(failbackOperationId: string): Generator<Task, unknown, unknown> {
    yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.handOver, RETRY, {
      ...ref,
      failbackOperationId,
    });
    status('handed-over', { failbackOperationId });
    return {
      machine: run.machine,
      state: 'handed-over',
      failbackOperationId,
      passes: run.pass - 1,
      shippedBytes: run.shippedBytes,
    };
  }

  let epoch = run.epoch;
  let disks = run.disks;
  let lastError: string | undefined;
  try {
    if (run.pass === 1 && epoch === 0) {
      status('starting');
      const begun = (yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.beginReprotect, RETRY, {
        ...ref,
        failoverId: run.failoverId,
      })) as { epoch: number; disks: ReprotectRun['disks'] };
      epoch = begun.epoch;
      disks = begun.disks;
      base.epoch = epoch;
    }
    const next: ReprotectRun = { ...run, epoch, disks, startedAt };

    // Failback asked while we were away (between executions, or before the first pass)?
    const before = (yield context.df.callActivity(PROTECTION_ACTIVITY.targetProgress, {
      machine: run.machine,
      epoch,
      passes: [],
    })) as TargetProgress;
    if (before.failbackOperationId) return yield* handOver(before.failbackOperationId);

    if (run.pass === 1) {
      // The checksum pass needs the site's checksums: the target uploads them when it starts.
      let delay = FIRST_POLL_MS;
      for (;;) {
        const ready = (yield context.df.callActivity(PROTECTION_ACTIVITY.siteChecksumsReady, {
          machine: run.machine,
          epoch,
          disks,
        })) as boolean;
        if (ready) break;
        status('waiting-for-target', {
          waitingFor: 'the site checksums (is lifeboat target reprotect running at the site?)',
        });
        const now = context.df.currentUtcDateTime.getTime();
        yield context.df.createTimer(new Date(now + delay));
        delay = Math.min(Math.round(delay * 1.5), MAX_POLL_MS);
        const progress = (yield context.df.callActivity(PROTECTION_ACTIVITY.targetProgress, {
          machine: run.machine,
          epoch,
          passes: [],
        })) as TargetProgress;
        if (progress.failbackOperationId) return yield* handOver(progress.failbackOperationId);
      }
    }

    status('shipping');
    const markerId = `pass-${epoch}-${run.pass}`;
    const results = (yield context.df.Task.all(
      disks.map((disk) =>
        context.df.callActivityWithRetry(PROTECTION_ACTIVITY.reprotectPass, RETRY, {
          machine: run.machine,
          failoverId: run.failoverId,
          epoch,
          disk,
          pass: run.pass,
          markerId,
        }),
      ),
    )) as PassResult[];
    next.shippedBytes += results.reduce((s, r) => s + r.changedBytes, 0);
    next.sealedBytes += results.reduce((s, r) => s + r.sealedBytes, 0);
    if (run.pass === 1)
      next.firstPass = results.map((r) => ({
        disk: r.disk,
        changedBytes: r.changedBytes,
        segments: r.segments,
      }));
    const passes = results.map((r) => ({ disk: r.disk, lastSeq: r.lastSeq }));
    const passView = results.map((r) => ({
      disk: r.disk,
      changedBytes: r.changedBytes,
      firstSeq: r.firstSeq,
      lastSeq: r.lastSeq,
    }));

    // Wait for the target (however long it is away: it resumes from its cursor).
    let delay = FIRST_POLL_MS;
    for (;;) {
      const progress = (yield context.df.callActivity(PROTECTION_ACTIVITY.targetProgress, {
        machine: run.machine,
        epoch,
        passes,
      })) as TargetProgress;
      if (progress.failbackOperationId) return yield* handOver(progress.failbackOperationId);
      if (progress.applied) break;
      context.df.setCustomStatus({
        ...base,
        state: 'waiting-for-target',
        firstPass: next.firstPass,
        shippedBytes: next.shippedBytes,
        sealedBytes: next.sealedBytes,
        lastPass: passView,
        target: progress.disks,
      });
      const now = context.df.currentUtcDateTime.getTime();
      yield context.df.createTimer(new Date(now + delay));
      delay = Math.min(Math.round(delay * 1.5), MAX_POLL_MS);
    }
    if (run.pass === 1)
      yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.markProtecting, RETRY, {
        ...ref,
        failoverId: run.failoverId,
      });
    context.df.setCustomStatus({
      ...base,
      state: 'protecting',
      firstPass: next.firstPass,
      shippedBytes: next.shippedBytes,
      sealedBytes: next.sealedBytes,
      lastPass: passView,
      lastAppliedPass: run.pass,
      nextPassAt: new Date(
        context.df.currentUtcDateTime.getTime() + run.intervalSeconds * 1000,
      ).toISOString(),
    });
    // Between passes: the interval, or failback's event (which only wakes us: the row decides).
    const timer = context.df.createTimer(
      new Date(context.df.currentUtcDateTime.getTime() + run.intervalSeconds * 1000),
    );
    const event = context.df.waitForExternalEvent(FAILBACK_EVENT);
    const winner = yield context.df.Task.any([timer, event]);
    if (winner !== timer) timer.cancel();
    context.df.continueAsNew({ ...next, pass: run.pass + 1 });
    return undefined;
  } catch (err) {
    lastError = failureMessage(err);
  }
  // A failed round: report it, wait, and try the same pass again (its activities are idempotent).
  status('retrying', { lastError });
  yield context.df.createTimer(new Date(context.df.currentUtcDateTime.getTime() + RETRY_ROUND_MS));
  context.df.continueAsNew({ ...run, epoch, disks, startedAt });
  return undefined;
}

df.app.orchestration(PROTECTION_ORCHESTRATION.reprotect, reprotectOrchestrator);
