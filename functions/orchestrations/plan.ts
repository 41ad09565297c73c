import * as df from 'durable-functions';
import type { OrchestrationContext, Task } from 'durable-functions';
import {
  failoverIdFromUuid,
  type FailoverOutcome,
  type FailoverRun,
  type PlanAction,
  type RecoveryPlan,
  type RecoveryPointSelector,
} from '../../shared/failover';
import './activities';
import './failover';
import { failureMessage } from './failover';
import { ACTIVITY, ORCHESTRATION, type PlanWait } from './names';

// The recovery plan orchestration: groups in order; in each, the pre actions one by one, the
// group's machines in parallel (each a failover sub-orchestration), then the post actions. A
// failed step stops the plan with a failure that says which group, step and machine, and why;
// the operator retries the step or aborts (POST /api/operations/{id}/retry | /abort).

export interface PlanRunInput {
  plan: RecoveryPlan;
  test: boolean;
  planned: boolean;
  recoveryPoint?: RecoveryPointSelector;
  onFailure: 'wait' | 'abort';
  waitSeconds: number;
}

export type PlanStepState = 'pending' | 'running' | 'waiting' | 'succeeded' | 'failed';

/**
 * A step of a plan group in a plan run's custom status (a failover or a failback run): a pre or
 * post action, or the group's machines step (`Machines`: 'failover' or 'failback').
 */
export interface PlanStepStatus<Machines extends string, State extends string> {
  name: string;
  phase: 'pre' | Machines | 'post';
  type: PlanAction['type'] | Machines;
  state: State;
  message?: string;
}

/** A plan group in a plan run's custom status: its steps in order and each machine's progress. */
export interface PlanGroupStatus<Step, Machine> {
  name: string;
  state: 'pending' | 'running' | 'succeeded' | 'failed';
  steps: Step[];
  machines: Record<string, Machine>;
}

interface StepStatus extends PlanStepStatus<'failover', PlanStepState> {
  attempts: number;
}

interface MachineStatus {
  state: 'pending' | 'running' | 'failed-over' | 'failed';
  failoverId?: string;
  target?: string;
  step?: string;
  message?: string;
}

type GroupStatus = PlanGroupStatus<StepStatus, MachineStatus>;

export interface PlanFailure {
  group: string;
  step: string;
  phase: StepStatus['phase'];
  /** The machines that failed (a failover step). */
  machines?: { machine: string; failoverId: string; step: string; message: string }[];
  message: string;
  attempt: number;
}

class StepFailed extends Error {
  constructor(
    message: string,
    readonly machines?: PlanFailure['machines'],
  ) {
    super(message);
  }
}

/** What a plan action knows of its run (a webhook's default body; `operation` only for a failback). */
export interface ActionContext {
  plan: string;
  run: string;
  group: string;
  test: boolean;
  operation?: 'failback';
}

/**
 * Runs one plan action: a webhook (retried by the Durable retry policy), a wait (a durable
 * timer), or a manual step (waits for POST /api/operations/{id}/approve; `onWait` is told what
 * it waits for, then undefined when the wait ends). A failure throws with a sentence saying why.
 */
export function* runPlanAction(
  context: OrchestrationContext,
  action: PlanAction,
  ctx: ActionContext,
  attempt: number,
  onWait: (wait: PlanWait | undefined) => void,
): Generator<Task, void, unknown> {
  switch (action.type) {
    case 'webhook': {
      const retry = new df.RetryOptions(action.retryIntervalSeconds * 1000, action.retries + 1);
      try {
        yield context.df.callActivityWithRetry(ACTIVITY.callWebhook, retry, {
          action,
          context: { ...ctx, step: action.name },
        });
      } catch (err) {
        throw new StepFailed(`${failureMessage(err)} (${action.retries + 1} attempts)`);
      }
      return;
    }
    case 'wait': {
      const at = context.df.currentUtcDateTime.getTime() + action.seconds * 1000;
      yield context.df.createTimer(new Date(at));
      return;
    }
    case 'manual': {
      const wait: PlanWait = {
        type: 'manual',
        event: `approve-${ctx.group}-${action.name}-${attempt}`,
        group: ctx.group,
        step: action.name,
        instructions: action.instructions,
        ...(action.timeoutSeconds ? { timeoutSeconds: action.timeoutSeconds } : {}),
      };
      onWait(wait);
      const approval = context.df.waitForExternalEvent(wait.event);
      if (action.timeoutSeconds) {
        const timer = context.df.createTimer(
          new Date(context.df.currentUtcDateTime.getTime() + action.timeoutSeconds * 1000),
        );
        const winner = yield context.df.Task.any([approval, timer]);
        onWait(undefined);
        if (winner === timer)
          throw new StepFailed(
            `manual step ${action.name} was not approved within ${action.timeoutSeconds} s`,
          );
        timer.cancel();
      } else {
        yield approval;
        onWait(undefined);
      }
      return;
    }
  }
}

export function* planOrchestrator(context: OrchestrationContext): Generator<Task, unknown, unknown> {
  const input = context.df.getInput() as PlanRunInput;
  const { plan } = input;
  const runId = context.df.instanceId;
  let state: 'running' | 'waiting-for-approval' | 'waiting-for-decision' | 'completed' | 'aborted' =
    'running';
  let current = 0;
  let waitingFor: PlanWait | undefined;
  let failure: PlanFailure | undefined;
  let events = 0;
  const groups: GroupStatus[] = plan.groups.map((g) => ({
    name: g.name,
    state: 'pending',
    steps: [
      ...g.pre.map((a) => ({
        name: a.name,
        phase: 'pre' as const,
        type: a.type,
        state: 'pending' as PlanStepState,
        attempts: 0,
      })),
      {
        name: 'failover',
        phase: 'failover' as const,
        type: 'failover' as const,
        state: 'pending' as PlanStepState,
        attempts: 0,
      },
      ...g.post.map((a) => ({
        name: a.name,
        phase: 'post' as const,
        type: a.type,
        state: 'pending' as PlanStepState,
        attempts: 0,
      })),
    ],
    machines: Object.fromEntries(g.machines.map((m) => [m.machine, { state: 'pending' as const }])),
  }));
  const publish = () =>
    context.df.setCustomStatus({
      type: 'plan',
      plan: plan.name,
      runId,
      test: input.test,
      state,
      group: groups[current]?.name,
      ...(waitingFor ? { waitingFor } : {}),
      ...(failure ? { failure } : {}),
      groups,
    });

  /** Runs one step; on failure waits for the operator's decision (or aborts) and retries. */
  function* guarded(
    group: GroupStatus,
    step: StepStatus,
    body: (attempt: number) => Generator<Task, void, unknown>,
  ): Generator<Task, void, unknown> {
    for (;;) {
      step.attempts++;
      step.state = 'running';
      step.message = undefined;
      publish();
      try {
        yield* body(step.attempts);
        step.state = 'succeeded';
        publish();
        return;
      } catch (err) {
        const message = err instanceof StepFailed ? err.message : failureMessage(err);
        step.state = 'failed';
        step.message = message;
        failure = {
          group: group.name,
          step: step.name,
          phase: step.phase,
          ...(err instanceof StepFailed && err.machines ? { machines: err.machines } : {}),
          message,
          attempt: step.attempts,
        };
        const where = `group ${group.name}, step ${step.name}`;
        if (input.onFailure === 'abort') {
          state = 'aborted';
          group.state = 'failed';
          publish();
          throw new Error(`Recovery plan ${plan.name} failed at ${where}: ${message}`);
        }
        state = 'waiting-for-decision';
        waitingFor = { type: 'decision', event: `decision-${++events}` };
        publish();
        const decision = (yield context.df.waitForExternalEvent(waitingFor.event)) as {
          action?: string;
        } | null;
        waitingFor = undefined;
        if (decision?.action !== 'retry') {
          state = 'aborted';
          group.state = 'failed';
          publish();
          throw new Error(
            `Recovery plan ${plan.name} was aborted at ${where} after attempt ${step.attempts}: ${message}`,
          );
        }
        failure = undefined;
        state = 'running';
      }
    }
  }

  function* runAction(
    group: GroupStatus,
    action: PlanAction,
    attempt: number,
  ): Generator<Task, void, unknown> {
    yield* runPlanAction(
      context,
      action,
      { plan: plan.name, run: runId, group: group.name, test: input.test },
      attempt,
      (wait) => {
        waitingFor = wait;
        if (wait) {
          state = 'waiting-for-approval';
          group.steps.find((s) => s.name === action.name)!.state = 'waiting';
          publish();
        } else state = 'running';
      },
    );
  }

  function* failoverMachines(gi: number, attempt: number): Generator<Task, void, unknown> {
    const group = groups[gi];
    const todo = plan.groups[gi].machines.filter((m) => group.machines[m.machine].state !== 'failed-over');
    const runs: FailoverRun[] = todo.map((m) => ({
      machine: m.machine,
      failoverId: failoverIdFromUuid(context.df.newGuid(`${runId}/${m.machine}/${attempt}`)),
      kind: input.test ? 'test' : input.planned ? 'planned' : 'unplanned',
      selector: input.recoveryPoint ?? m.recoveryPoint,
      waitSeconds: input.waitSeconds,
      ...(m.target ? { target: m.target } : {}),
      mode: 'failover',
      planRun: runId,
    }));
    for (const r of runs) group.machines[r.machine] = { state: 'running', failoverId: r.failoverId };
    publish();
    const outcomes = (yield context.df.Task.all(
      runs.map((r) => context.df.callSubOrchestrator(ORCHESTRATION.failover, r, r.failoverId)),
    )) as FailoverOutcome[];
    const failed: NonNullable<PlanFailure['machines']> = [];
    for (const o of outcomes) {
      if (o.ok) {
        group.machines[o.machine] = { state: 'failed-over', failoverId: o.failoverId, target: o.target.name };
      } else {
        group.machines[o.machine] = {
          state: 'failed',
          failoverId: o.failoverId,
          step: o.step,
          message: o.message,
        };
        failed.push({ machine: o.machine, failoverId: o.failoverId, step: o.step, message: o.message });
      }
    }
    if (failed.length > 0) {
      throw new StepFailed(
        failed.map((f) => `machine ${f.machine} failed while ${f.step}: ${f.message}`).join('; '),
        failed,
      );
    }
  }

  for (let gi = 0; gi < plan.groups.length; gi++) {
    current = gi;
    const group = groups[gi];
    const spec = plan.groups[gi];
    group.state = 'running';
    for (const action of spec.pre) {
      yield* guarded(
        group,
        group.steps.find((s) => s.name === action.name && s.phase === 'pre')!,
        (attempt) => runAction(group, action, attempt),
      );
    }
    if (spec.machines.length > 0) {
      yield* guarded(
        group,
        group.steps.find((s) => s.phase === 'failover')!,
        (attempt) => failoverMachines(gi, attempt),
      );
    } else {
      group.steps.find((s) => s.phase === 'failover')!.state = 'succeeded';
    }
    for (const action of spec.post) {
      yield* guarded(
        group,
        group.steps.find((s) => s.name === action.name && s.phase === 'post')!,
        (attempt) => runAction(group, action, attempt),
      );
    }
    group.state = 'succeeded';
  }
  state = 'completed';
  publish();
  return {
    plan: plan.name,
    runId,
    state,
    groups: groups.map((g) => ({ name: g.name, machines: g.machines })),
  };
}

df.app.orchestration(ORCHESTRATION.plan, planOrchestrator);
