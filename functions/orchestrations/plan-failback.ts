import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import type { PlanAction } from '../../shared/failover';
import type { FailbackOutcome, PlanFailbackRun, ResyncStatus } from '../../shared/reprotect';
import './failback';
import { failureMessage } from './failover';
import type { PlanWait } from './names';
import { runPlanAction, type PlanGroupStatus, type PlanStepState, type PlanStepStatus } from './plan';
import { PROTECTION_ACTIVITY, PROTECTION_ORCHESTRATION } from './protection-activities';

// A recovery plan's failback: the groups in the run's order (last group first by default); in a
// group the pre actions, the group's machines in parallel (each the per-machine failback as a
// sub-orchestration, instance id = its operation id), then the post actions. The failbacks do not
// wait for the agent; once every group is home the plan waits (waitSeconds) until each machine's
// site agent resumed forward protection. A failure stops the plan after the group it happened in;
// the machines whose failback never started are released (POST the plan's failback again: the
// machines already home are skipped). Deterministic: time comes from context.df only.

const RETRY = new df.RetryOptions(2000, 3);
const FIRST_POLL_MS = 1000;
const MAX_POLL_MS = 10_000;

type MemberState =
  'pending' | 'failing-back' | 'failed-back' | 'failed' | 'already-home' | 'not-started' | 'protected';

interface MemberStatus {
  state: MemberState;
  operationId?: string;
  failoverId?: string;
  step?: string;
  message?: string;
  epochs?: Record<string, number>;
  forwardProtection?: 'protected' | 'waiting-for-agent';
  deleted?: string[];
}

type StepStatus = PlanStepStatus<'failback', PlanStepState | 'skipped'>;
type GroupStatus = PlanGroupStatus<StepStatus, MemberStatus>;

const runsAction = (mode: PlanFailbackRun['actions'], action: PlanAction) =>
  mode === 'all' || (mode === 'manual-and-wait' && action.type !== 'webhook');

export function* planFailbackOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const input = context.df.getInput() as PlanFailbackRun;
  const runId = context.df.instanceId;
  let state: 'running' | 'waiting-for-approval' | 'waiting-for-agents' | 'completed' | 'failed' = 'running';
  let current: string | undefined;
  let waitingFor: PlanWait | undefined;
  let failure: { group: string; step: string; message: string } | undefined;
  const groups: GroupStatus[] = input.groups.map((g) => ({
    name: g.name,
    state: 'pending',
    steps: [
      ...g.pre.map((a) => ({ name: a.name, phase: 'pre' as const, type: a.type, state: 'pending' as const })),
      { name: 'failback', phase: 'failback' as const, type: 'failback' as const, state: 'pending' as const },
      ...g.post.map((a) => ({
        name: a.name,
        phase: 'post' as const,
        type: a.type,
        state: 'pending' as const,
      })),
    ],
    machines: Object.fromEntries(
      g.members.map((m) => [
        m.machine,
        m.run
          ? { state: 'pending' as const, operationId: m.run.operationId, failoverId: m.run.failoverId }
          : { state: 'already-home' as const, message: m.home },
      ]),
    ),
  }));
  const publish = () =>
    context.df.setCustomStatus({
      type: 'plan-failback',
      plan: input.plan,
      runId,
      order: input.order,
      actions: input.actions,
      state,
      ...(current ? { group: current } : {}),
      ...(waitingFor ? { waitingFor } : {}),
      ...(failure ? { failure } : {}),
      groups,
    });
  const outcomes: Extract<FailbackOutcome, { ok: true }>[] = [];

  function* action(gi: number, a: PlanAction, phase: 'pre' | 'post'): Generator<Task, void, unknown> {
    const group = groups[gi];
    const step = group.steps.find((s) => s.name === a.name && s.phase === phase)!;
    if (!runsAction(input.actions, a)) {
      step.state = 'skipped';
      return;
    }
    step.state = 'running';
    publish();
    try {
      yield* runPlanAction(
        context,
        a,
        { plan: input.plan, run: runId, group: group.name, test: false, operation: 'failback' },
        1,
        (wait) => {
          waitingFor = wait;
          state = wait ? 'waiting-for-approval' : 'running';
          step.state = wait ? 'waiting' : 'running';
          publish();
        },
      );
    } catch (err) {
      step.state = 'failed';
      step.message = failureMessage(err);
      throw Object.assign(new Error(`step ${a.name}: ${step.message}`), { step: a.name });
    }
    step.state = 'succeeded';
    publish();
  }

  function* failBackGroup(gi: number): Generator<Task, void, unknown> {
    const group = groups[gi];
    const step = group.steps.find((s) => s.phase === 'failback')!;
    const runs = input.groups[gi].members.flatMap((m) => (m.run ? [m.run] : []));
    if (runs.length === 0) {
      step.state = 'succeeded';
      return;
    }
    step.state = 'running';
    for (const r of runs) group.machines[r.machine].state = 'failing-back';
    publish();
    const results = (yield context.df.Task.all(
      runs.map((r) =>
        context.df.callSubOrchestrator(
          PROTECTION_ORCHESTRATION.failback,
          { ...r, planRun: runId, forwardWaitSeconds: 0 },
          r.operationId,
        ),
      ),
    )) as FailbackOutcome[];
    const failed: string[] = [];
    for (const o of results) {
      if (o.ok) {
        outcomes.push(o);
        group.machines[o.machine] = {
          state: 'failed-back',
          operationId: o.operationId,
          failoverId: o.failoverId,
          epochs: o.epochs,
          forwardProtection: o.forwardProtection,
          deleted: o.deleted,
        };
      } else {
        group.machines[o.machine] = {
          state: 'failed',
          operationId: o.operationId,
          failoverId: o.failoverId,
          step: o.step,
          message: o.message,
        };
        failed.push(`${o.machine} failed while ${o.step}: ${o.message}`);
      }
    }
    if (failed.length > 0) {
      step.state = 'failed';
      step.message = failed.join('; ');
      throw Object.assign(new Error(step.message), { step: 'failback' });
    }
    step.state = 'succeeded';
    publish();
  }

  try {
    for (let gi = 0; gi < input.groups.length; gi++) {
      const spec = input.groups[gi];
      current = spec.name;
      groups[gi].state = 'running';
      for (const a of spec.pre) yield* action(gi, a, 'pre');
      yield* failBackGroup(gi);
      for (const a of spec.post) yield* action(gi, a, 'post');
      groups[gi].state = 'succeeded';
      publish();
    }
  } catch (err) {
    const group = groups.find((g) => g.state === 'running')!;
    group.state = 'failed';
    const message = failureMessage(err);
    failure = { group: group.name, step: (err as { step?: string }).step ?? 'failback', message };
    // Machines whose failback never started: their reprotect stopped for it; free them.
    const unstarted = input.groups.flatMap((g, gi) =>
      g.members.filter((m) => m.run && groups[gi].machines[m.machine].state === 'pending'),
    );
    for (const m of unstarted) {
      yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.releaseMachine, RETRY, {
        machine: m.machine,
        operationId: m.run!.operationId,
      });
      const g = groups.find((x) => m.machine in x.machines)!;
      g.machines[m.machine] = {
        ...g.machines[m.machine],
        state: 'not-started',
        message: `not started: the plan stopped at group ${group.name}; POST the plan's failback again to continue`,
      };
    }
    state = 'failed';
    waitingFor = undefined;
    publish();
    const notStarted = unstarted.length
      ? ` Not started (their reprotect stopped; POST /api/plans/${input.plan}/failback again to continue, the machines already home are skipped): ${unstarted.map((m) => m.machine).join(', ')}.`
      : '';
    throw new Error(
      `The failback of recovery plan ${input.plan} failed at group ${group.name}, ${failure.step}: ${message}.${notStarted}`,
    );
  }

  // Every machine is home; the site machines start and their agents resume forward protection.
  current = undefined;
  state = 'waiting-for-agents';
  publish();
  const deadline = context.df.currentUtcDateTime.getTime() + input.waitSeconds * 1000;
  const pending = new Set(outcomes.filter((o) => o.forwardProtection !== 'protected').map((o) => o.machine));
  for (const o of outcomes) if (!pending.has(o.machine)) setMember(o.machine, { state: 'protected' });
  let delay = FIRST_POLL_MS;
  while (pending.size > 0) {
    for (const o of outcomes.filter((x) => pending.has(x.machine))) {
      const resync = (yield context.df.callActivity(PROTECTION_ACTIVITY.resyncProgress, {
        machine: o.machine,
        operationId: o.operationId,
        plans: o.forwardPlans,
        startedAt: o.forwardStartedAt,
      })) as ResyncStatus;
      if (resync.done) {
        yield context.df.callActivityWithRetry(PROTECTION_ACTIVITY.completeResync, RETRY, {
          machine: o.machine,
          operationId: o.operationId,
          ok: true,
        });
        pending.delete(o.machine);
        setMember(o.machine, { state: 'protected', forwardProtection: 'protected' });
      }
    }
    const now = context.df.currentUtcDateTime.getTime();
    if (pending.size === 0 || now >= deadline) break;
    publish();
    yield context.df.createTimer(new Date(Math.min(now + delay, deadline)));
    delay = Math.min(Math.round(delay * 1.5), MAX_POLL_MS);
  }
  state = 'completed';
  publish();
  return {
    plan: input.plan,
    runId,
    state: 'failed-back',
    order: input.order,
    groups: groups.map((g) => ({ name: g.name, machines: g.machines })),
    waitingForAgents: [...pending],
  };

  function setMember(machine: string, patch: Partial<MemberStatus>) {
    const g = groups.find((x) => machine in x.machines)!;
    g.machines[machine] = { ...g.machines[machine], ...patch };
  }
}

df.app.orchestration(PROTECTION_ORCHESTRATION.planFailback, planFailbackOrchestrator);
