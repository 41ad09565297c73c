import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import type { FailoverOutcome } from '../../shared/failover';
import type { GroupFailoverRun } from '../../shared/groups';
import './failover';
import { GROUP_ORCHESTRATION, ORCHESTRATION } from './names';

// Group failover: every member of the group point fails over to its own recovery point at the
// point's marker, in parallel, each as the machine failover sub-orchestration (instance id = its
// failover id, so each member's progress is also GET /api/operations/{failoverId}). The members
// were claimed by the HTTP starter; a member that fails is cleaned up by its own orchestration
// and reported here by name, step and reason. Members that succeeded stay failed over.

interface MemberStatus {
  machine: string;
  failoverId: string;
  state: 'running' | 'failed-over' | 'failed';
  target?: string;
  step?: string;
  message?: string;
}

export function* groupFailoverOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const run = context.df.getInput() as GroupFailoverRun;
  const members: MemberStatus[] = run.members.map((m) => ({
    machine: m.machine,
    failoverId: m.failoverId,
    state: 'running',
  }));
  const publish = (state: string) =>
    context.df.setCustomStatus({
      type: 'group-failover',
      group: run.group,
      test: run.test,
      recoveryPoint: run.point,
      state,
      members,
    });
  publish('failing-over');

  const outcomes = (yield context.df.Task.all(
    run.members.map((m) => context.df.callSubOrchestrator(ORCHESTRATION.failover, m, m.failoverId)),
  )) as FailoverOutcome[];
  for (const o of outcomes) {
    const s = members.find((m) => m.machine === o.machine)!;
    if (o.ok) Object.assign(s, { state: 'failed-over', target: o.target.name });
    else Object.assign(s, { state: 'failed', step: o.step, message: o.message });
  }
  const failed = members.filter((m) => m.state === 'failed');
  if (failed.length > 0) {
    publish('failed');
    const ok = members.filter((m) => m.state === 'failed-over').map((m) => `${m.machine} (${m.failoverId})`);
    throw new Error(
      `Group failover ${run.runId} of group ${run.group} to ${run.point.id} failed for ` +
        failed
          .map((f) => `member ${f.machine} (failover ${f.failoverId}) while ${f.step}: ${f.message}`)
          .join('; ') +
        '. The failed members were cleaned up and are free' +
        (ok.length > 0
          ? `; ${ok.join(', ')} failed over to ${run.point.id} and stay so (commit or cancel each with POST /api/machines/{m}/commit or /cancel).`
          : '.'),
    );
  }
  publish('failed-over');
  return { group: run.group, recoveryPoint: run.point, test: run.test, state: 'failed-over', members };
}

df.app.orchestration(GROUP_ORCHESTRATION.failover, groupFailoverOrchestrator);
