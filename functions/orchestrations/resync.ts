import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import type { ResyncDiskPlan, ResyncRun, ResyncStatus } from '../../shared/reprotect';
import { failureMessage } from './failover';
import { PROTECTION_ACTIVITY, PROTECTION_ORCHESTRATION } from './protection-activities';

// Resync: tell the agent to restart the disks' streams in a new epoch with a checksum resync, then
// follow the progress (the agent's reports and apply's cursor) until every disk applied a marker
// of its new epoch. Deterministic: time comes from context.df only.

const FIRST_POLL_MS = 1000;
const MAX_POLL_MS = 10_000;

export function* resyncOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const run = context.df.getInput() as ResyncRun;
  const startedAt = context.df.currentUtcDateTime.toISOString();
  const base = { type: 'resync', machine: run.machine, disks: run.disks };
  context.df.setCustomStatus({ ...base, state: 'issuing' });
  try {
    const plans = (yield context.df.callActivity(PROTECTION_ACTIVITY.issueResync, run)) as ResyncDiskPlan[];
    const deadline = context.df.currentUtcDateTime.getTime() + run.waitSeconds * 1000;
    let delay = FIRST_POLL_MS;
    let status: ResyncStatus;
    for (;;) {
      status = (yield context.df.callActivity(PROTECTION_ACTIVITY.resyncProgress, {
        machine: run.machine,
        operationId: run.operationId,
        plans,
        startedAt,
      })) as ResyncStatus;
      context.df.setCustomStatus({ ...base, state: status.done ? 'completing' : 'resyncing', ...status });
      if (status.done) break;
      const now = context.df.currentUtcDateTime.getTime();
      if (now >= deadline) {
        const behind = status.disks
          .filter((d) => !d.done)
          .map((d) => `${d.disk} (epoch ${d.epoch}, ${d.state})`);
        throw new Error(
          `the resync did not complete within ${run.waitSeconds} s: ${behind.join(', ')} did not apply a marker of the new epoch ` +
            '(is the agent running and polling the proxy for commands?)',
        );
      }
      yield context.df.createTimer(new Date(Math.min(now + delay, deadline)));
      delay = Math.min(Math.round(delay * 1.5), MAX_POLL_MS);
    }
    yield context.df.callActivity(PROTECTION_ACTIVITY.completeResync, {
      machine: run.machine,
      operationId: run.operationId,
      ok: true,
    });
    context.df.setCustomStatus({ ...base, state: 'completed', ...status });
    return {
      machine: run.machine,
      state: 'completed',
      epochs: Object.fromEntries(plans.map((p) => [p.disk, p.targetEpoch])),
      ...status,
    };
  } catch (err) {
    const message = failureMessage(err);
    yield context.df.callActivity(PROTECTION_ACTIVITY.completeResync, {
      machine: run.machine,
      operationId: run.operationId,
      ok: false,
      message,
    });
    context.df.setCustomStatus({ ...base, state: 'failed', error: message });
    throw new Error(`The resync of ${run.machine} failed: ${message}`);
  }
}

df.app.orchestration(PROTECTION_ORCHESTRATION.resync, resyncOrchestrator);
