import { randomUUID } from 'node:crypto';
import { EventType, event, failureOf, type FailureDetails, type HistoryEvent } from './history';
import {
  CUSTOM_STATUS_LIMIT,
  PAYLOAD_LIMIT,
  PayloadTooLargeError,
  checkPayload,
  type InstanceRecord,
  type OutboxItem,
  type RetryPolicy,
  type RetryState,
  type RuntimeStatus,
} from './store';

/*
 * One orchestrator turn, as pure functions around the call into the library:
 *   prepareTurn   orders the new events and performs the engine's own scheduling that the
 *                 library expects to see event ids for (retry timers and re-attempts);
 *   triggerInput  what the orchestration trigger hands the library;
 *   completeTurn  turns the library's OrchestratorState (or its failure) into history events,
 *                 an outbox and the instance's next state.
 *
 * Event ids. The library numbers every task it schedules with a counter (sequenceNumber): each
 * yielded atomic task in the order its action appears (Task.all/any children depth-first),
 * external-event waits excepted; a retried task also takes a number for its retry timer when a
 * failure is replayed, and one for the next attempt when that timer fires. The engine keeps the
 * same counter (`nextEventId`). The library allocates retry numbers while it replays the failure,
 * before any user code that event resumes, so the engine puts those events first in the turn,
 * and the final retry timers (whose replay fails the task and may resume user code) last.
 */

/** The replay schema this engine speaks: V3 (flat action list with compound actions, timer and
 *  HTTP-polling support). V4 adds entity locks, which the engine does not support. */
export const UPPER_SCHEMA_VERSION = 2;
/** So large that the library never splits a timer (the engine keeps any timer durable itself). */
export const MAXIMUM_SHORT_TIMER_DURATION = '3650.00:00:00';
export const LONG_RUNNING_TIMER_INTERVAL = '3.00:00:00';
export const HTTP_ACTIVITY = 'BuiltIn::HttpActivity';

enum ActionType {
  CallActivity = 0,
  CallActivityWithRetry = 1,
  CallSubOrchestrator = 2,
  CallSubOrchestratorWithRetry = 3,
  ContinueAsNew = 4,
  CreateTimer = 5,
  WaitForExternalEvent = 6,
  CallEntity = 7,
  CallHttp = 8,
  SignalEntity = 9,
  WhenAny = 11,
  WhenAll = 12,
  LockEntities = 13,
  ReleaseEntities = 14,
}

interface Action {
  actionType: ActionType;
  functionName?: string;
  input?: unknown;
  instanceId?: string;
  retryOptions?: RetryPolicy;
  fireAt?: string;
  httpRequest?: Record<string, unknown>;
  compoundActions?: Action[];
}

export interface OrchestratorState {
  isDone: boolean;
  actions: Action[][];
  output?: unknown;
  error?: string;
  customStatus?: unknown;
}

type Has = (kind: 'orchestration' | 'activity' | 'entity', name: string) => boolean;

/** A history event plus the outbox item it needs once its history index is known. */
interface Scheduled {
  event: HistoryEvent;
  outbox?: (seq: number) => OutboxItem;
}

export interface PreparedTurn {
  now: Date;
  /** OrchestratorStarted, ExecutionStarted on the first turn, then the new events in replay order. */
  events: HistoryEvent[];
  scheduled: Scheduled[];
  nextEventId: number;
  retries: Record<string, RetryState>;
  status: RuntimeStatus;
}

export interface TurnResult {
  history: HistoryEvent[];
  record: InstanceRecord;
  /** Set when the orchestration continued as new (history of the old execution is dropped). */
  continuedAsNew: boolean;
}

/** Input for actions whose `input` went through the library's processInput: strings arrive
 *  already JSON-encoded, anything else is a value. */
function processedInputText(input: unknown): string | null {
  if (input === undefined) return null;
  return typeof input === 'string' ? input : JSON.stringify(input);
}

function valueText(value: unknown): string | null {
  if (value === undefined) return null;
  return JSON.stringify(value);
}

export function retryDelayMs(policy: RetryPolicy, failedAttempt: number): number {
  const backoff = policy.backoffCoefficient ?? 1;
  let delay = policy.firstRetryIntervalInMilliseconds * Math.pow(backoff, failedAttempt - 1);
  const max = policy.maxRetryIntervalInMilliseconds;
  if (max !== undefined && max > 0 && delay > max) delay = max;
  return Math.max(0, Math.min(delay, 2 ** 31));
}

function isFinalRetry(state: RetryState): boolean {
  return state.attempt >= state.policy.maxNumberOfAttempts;
}

export function prepareTurn(
  rec: InstanceRecord,
  history: HistoryEvent[],
  incoming: HistoryEvent[],
  now: Date,
  has: Has,
): PreparedTurn {
  const retries: Record<string, RetryState> = structuredClone(rec.retries);
  let nextEventId = rec.nextEventId;
  const events: HistoryEvent[] = [event(EventType.OrchestratorStarted, {}, now)];
  if (rec.historyCount === 0) {
    events.push(
      event(
        EventType.ExecutionStarted,
        {
          Name: rec.name,
          Input: rec.input ?? null,
          OrchestrationInstance: { InstanceId: rec.instanceId, ExecutionId: rec.executionId },
          ...(rec.parent
            ? {
                ParentInstance: {
                  InstanceId: rec.parent.instanceId,
                  ExecutionId: rec.parent.executionId,
                  TaskScheduleId: rec.parent.taskId,
                  Name: '',
                },
              }
            : {}),
        },
        now,
      ),
    );
  }

  const first: HistoryEvent[] = [];
  const middle: HistoryEvent[] = [];
  const last: HistoryEvent[] = [];
  for (const e of incoming) {
    const failed =
      e.EventType === EventType.TaskFailed || e.EventType === EventType.SubOrchestrationInstanceFailed;
    const succeeded =
      e.EventType === EventType.TaskCompleted || e.EventType === EventType.SubOrchestrationInstanceCompleted;
    const taskRetry = e.TaskScheduledId !== undefined ? retries[e.TaskScheduledId] : undefined;
    const timerRetry =
      e.EventType === EventType.TimerFired && e.TimerId !== undefined ? retries[e.TimerId] : undefined;
    if (failed && taskRetry && !taskRetry.waitingOnTimer) first.push(e);
    else if (succeeded && taskRetry && !taskRetry.waitingOnTimer) {
      delete retries[e.TaskScheduledId!];
      middle.push(e);
    } else if (timerRetry && timerRetry.waitingOnTimer) (isFinalRetry(timerRetry) ? last : first).push(e);
    else middle.push(e);
  }

  const scheduled: Scheduled[] = [];
  const byIndex = (seq: number) => (seq < history.length ? history[seq] : undefined);
  for (const e of first) {
    if (e.EventType === EventType.TimerFired) {
      const state = retries[e.TimerId!];
      delete retries[e.TimerId!];
      const source = byIndex(state.firstSeq);
      const id = nextEventId++;
      const next: RetryState = { ...state, attempt: state.attempt + 1, waitingOnTimer: false };
      retries[id] = next;
      const timeout = state.policy.retryTimeoutInMilliseconds;
      const expired =
        timeout !== undefined && timeout > 0 && now.getTime() - Date.parse(state.firstAttemptAt) >= timeout;
      const name = source?.Name ?? '';
      const registered =
        state.kind === 'activity'
          ? name === HTTP_ACTIVITY || has('activity', name)
          : has('orchestration', name);
      const failure = expired
        ? `The retry timeout (${timeout} ms) of ${name} expired before attempt ${next.attempt}.`
        : !registered
          ? notRegistered(state.kind, name)
          : undefined;
      if (state.kind === 'activity') {
        scheduled.push({
          event: event(
            EventType.TaskScheduled,
            { EventId: id, Name: name, Input: source?.Input ?? null },
            now,
          ),
          outbox: (seq) =>
            failure
              ? { k: 'fail', taskId: id, sub: false, message: failure, errorType: 'Error' }
              : { k: 'activity', taskId: id, seq },
        });
      } else {
        const childId = source?.InstanceId ?? `${rec.instanceId}:${id}`;
        const childExecutionId = randomUUID().replace(/-/g, '');
        scheduled.push({
          event: event(
            EventType.SubOrchestrationInstanceCreated,
            { EventId: id, Name: name, InstanceId: childId, Input: source?.Input ?? null },
            now,
          ),
          outbox: (seq) =>
            failure
              ? { k: 'fail', taskId: id, sub: true, message: failure, errorType: 'Error' }
              : { k: 'sub', taskId: id, seq, childId, childExecutionId },
        });
      }
    } else {
      const state = retries[e.TaskScheduledId!];
      delete retries[e.TaskScheduledId!];
      const id = nextEventId++;
      const delay = isFinalRetry(state) ? 0 : retryDelayMs(state.policy, state.attempt);
      const fireAt = new Date(now.getTime() + delay).toISOString();
      retries[id] = { ...state, waitingOnTimer: true };
      scheduled.push({
        event: event(EventType.TimerCreated, { EventId: id, FireAt: fireAt }, now),
        outbox: () => ({ k: 'timer', timerId: id, fireAt }),
      });
    }
  }
  for (const e of last) delete retries[e.TimerId!];

  const status: RuntimeStatus =
    rec.status === 'Pending' || rec.status === 'ContinuedAsNew' ? 'Running' : rec.status;
  return { now, events: [...events, ...first, ...middle, ...last], scheduled, nextEventId, retries, status };
}

/** The orchestration trigger's value: DurableOrchestrationBindingInfo as the extension sends it. */
export function triggerInput(
  rec: InstanceRecord,
  history: HistoryEvent[],
  turn: PreparedTurn,
): Record<string, unknown> {
  const strip = (e: HistoryEvent, played: boolean) => {
    const { _key, ...rest } = e;
    void _key;
    return { ...rest, IsPlayed: played };
  };
  return {
    history: [...history.map((e) => strip(e, true)), ...turn.events.map((e) => strip(e, false))],
    input: rec.input === undefined ? undefined : JSON.parse(rec.input),
    instanceId: rec.instanceId,
    isReplaying: history.length > 0,
    parentInstanceId: rec.parent?.instanceId,
    maximumShortTimerDuration: MAXIMUM_SHORT_TIMER_DURATION,
    longRunningTimerIntervalDuration: LONG_RUNNING_TIMER_INTERVAL,
    defaultHttpAsyncRequestSleepTimeMillseconds: 30_000,
    upperSchemaVersion: UPPER_SCHEMA_VERSION,
  };
}

function notRegistered(kind: 'activity' | 'orchestration', name: string): string {
  return kind === 'activity'
    ? `The activity function '${name}' doesn't exist, is disabled, or is not an activity function.`
    : `The function '${name}' doesn't exist, is disabled, or is not an orchestrator function.`;
}

const OUT_OF_PROC_LABEL = '\n\n$OutOfProcData$:';

/** What the orchestrator call produced: a state, or a failure with the library's state attached. */
export type InvocationOutcome =
  | { ok: true; state: OrchestratorState }
  | { ok: false; message: string; details: FailureDetails; state?: OrchestratorState };

export function interpretInvocation(result: unknown): InvocationOutcome {
  const value = typeof result === 'string' ? (JSON.parse(result) as unknown) : result;
  const state = JSON.parse(JSON.stringify(value ?? null)) as OrchestratorState | null;
  if (!state || typeof state !== 'object' || !Array.isArray(state.actions)) {
    const message = `The orchestrator returned ${JSON.stringify(value)?.slice(0, 200)}, not an orchestrator state.`;
    return { ok: false, message, details: { ErrorType: 'Error', ErrorMessage: message } };
  }
  if (state.error !== undefined && state.error !== null) {
    return {
      ok: false,
      message: String(state.error),
      details: { ErrorType: 'Error', ErrorMessage: String(state.error) },
      state,
    };
  }
  return { ok: true, state };
}

/** An orchestrator that throws rejects with OrchestrationFailureError: the message, then the
 *  label, then the OrchestratorState as JSON. */
export function interpretInvocationError(err: unknown): InvocationOutcome {
  const details = failureOf(err);
  const text = err instanceof Error ? err.message : String(err);
  const at = text.indexOf(OUT_OF_PROC_LABEL);
  if (at < 0) return { ok: false, message: details.ErrorMessage, details };
  let state: OrchestratorState | undefined;
  try {
    state = JSON.parse(text.slice(at + OUT_OF_PROC_LABEL.length)) as OrchestratorState;
  } catch {
    state = undefined;
  }
  // The library passes a flag, not the error, as the first part of the message (it reads
  // "false"); the orchestrator's own error message is the state's `error`.
  const message =
    state?.error !== undefined && state.error !== null ? String(state.error) : text.slice(0, at);
  const failure = (state as { failureDetails?: FailureDetails } | undefined)?.failureDetails;
  return { ok: false, message, details: failure ?? { ...details, ErrorMessage: message }, state };
}

class UnsupportedAction extends Error {}

export function completeTurn(
  rec: InstanceRecord,
  history: HistoryEvent[],
  turn: PreparedTurn,
  outcome: InvocationOutcome,
  has: Has,
): TurnResult {
  const now = turn.now;
  let nextEventId = turn.nextEventId;
  const retries = turn.retries;
  const scheduled: Scheduled[] = [...turn.scheduled];
  let continueAsNew: { input: string | null } | undefined;
  let failure: { message: string; details: FailureDetails } | undefined;
  let customStatus = rec.customStatus;
  let actionCount = rec.actionCount;

  if (outcome.state?.customStatus !== undefined)
    customStatus = valueText(outcome.state.customStatus) ?? undefined;

  if (!outcome.ok) {
    failure = { message: outcome.message, details: outcome.details };
  } else {
    const state = outcome.state;
    const actions = state.actions[0] ?? [];
    try {
      const walk = (action: Action): void => {
        switch (action.actionType) {
          case ActionType.WhenAll:
          case ActionType.WhenAny:
            for (const child of action.compoundActions ?? []) walk(child);
            return;
          case ActionType.WaitForExternalEvent:
            return;
          case ActionType.ContinueAsNew:
            continueAsNew = { input: processedInputText(action.input) };
            return;
          case ActionType.CallActivity:
          case ActionType.CallActivityWithRetry:
          case ActionType.CallHttp: {
            const id = nextEventId++;
            const http = action.actionType === ActionType.CallHttp;
            const name = http ? HTTP_ACTIVITY : String(action.functionName);
            const input = http ? JSON.stringify(action.httpRequest ?? {}) : processedInputText(action.input);
            checkPayload(`The input of activity ${name}`, input ?? undefined);
            if (action.actionType === ActionType.CallActivityWithRetry) {
              retries[id] = {
                kind: 'activity',
                firstSeq: -1,
                policy: action.retryOptions!,
                attempt: 1,
                firstAttemptAt: now.toISOString(),
                waitingOnTimer: false,
              };
            }
            const missing = !http && !has('activity', name) ? notRegistered('activity', name) : undefined;
            scheduled.push({
              event: event(EventType.TaskScheduled, { EventId: id, Name: name, Input: input }, now),
              outbox: (seq) => {
                if (retries[id] && retries[id].firstSeq === -1) retries[id].firstSeq = seq;
                return missing
                  ? { k: 'fail', taskId: id, sub: false, message: missing, errorType: 'Error' }
                  : { k: 'activity', taskId: id, seq };
              },
            });
            return;
          }
          case ActionType.CallSubOrchestrator:
          case ActionType.CallSubOrchestratorWithRetry: {
            const id = nextEventId++;
            const name = String(action.functionName);
            const input = valueText(action.input);
            checkPayload(`The input of sub-orchestration ${name}`, input ?? undefined);
            const childId = action.instanceId || `${rec.instanceId}:${id}`;
            const childExecutionId = randomUUID().replace(/-/g, '');
            if (action.actionType === ActionType.CallSubOrchestratorWithRetry) {
              retries[id] = {
                kind: 'orchestration',
                firstSeq: -1,
                policy: action.retryOptions!,
                attempt: 1,
                firstAttemptAt: now.toISOString(),
                waitingOnTimer: false,
              };
            }
            const missing = !has('orchestration', name) ? notRegistered('orchestration', name) : undefined;
            scheduled.push({
              event: event(
                EventType.SubOrchestrationInstanceCreated,
                { EventId: id, Name: name, InstanceId: childId, Input: input },
                now,
              ),
              outbox: (seq) => {
                if (retries[id] && retries[id].firstSeq === -1) retries[id].firstSeq = seq;
                return missing
                  ? { k: 'fail', taskId: id, sub: true, message: missing, errorType: 'Error' }
                  : { k: 'sub', taskId: id, seq, childId, childExecutionId };
              },
            });
            return;
          }
          case ActionType.CreateTimer: {
            const id = nextEventId++;
            const fireAt = new Date(action.fireAt as string).toISOString();
            scheduled.push({
              event: event(EventType.TimerCreated, { EventId: id, FireAt: fireAt }, now),
              outbox: () => ({ k: 'timer', timerId: id, fireAt }),
            });
            return;
          }
          case ActionType.CallEntity:
          case ActionType.SignalEntity:
          case ActionType.LockEntities:
          case ActionType.ReleaseEntities:
            throw new UnsupportedAction(
              'Durable entities (callEntity, signalEntity, lock) are not supported by the local Durable engine.',
            );
          default:
            throw new UnsupportedAction(
              `The orchestrator returned an action of unknown type ${String(action.actionType)}.`,
            );
        }
      };
      const fresh = actions.slice(actionCount);
      actionCount = actions.length;
      if (state.isDone) {
        for (const a of fresh) if (a.actionType === ActionType.ContinueAsNew) walk(a);
      } else {
        for (const a of fresh) walk(a);
      }
      if (state.isDone && !continueAsNew) {
        const output = valueText(state.output);
        checkPayload('The orchestration output', output ?? undefined);
      }
      if (customStatus !== undefined) checkPayload('The custom status', customStatus, CUSTOM_STATUS_LIMIT);
    } catch (err) {
      if (!(err instanceof UnsupportedAction || err instanceof PayloadTooLargeError)) throw err;
      failure = { message: err.message, details: failureOf(err) };
      scheduled.length = turn.scheduled.length;
    }
  }

  const record: InstanceRecord = {
    ...rec,
    status: turn.status,
    lastUpdatedTime: now.toISOString(),
    nextEventId,
    actionCount,
    retries,
    customStatus:
      customStatus !== undefined && customStatus.length <= CUSTOM_STATUS_LIMIT
        ? customStatus
        : rec.customStatus,
    outbox: [],
    consumed: [],
  };

  if (continueAsNew && !failure) {
    checkPayloadOrFail(continueAsNew.input);
    record.status = 'ContinuedAsNew';
    record.executionId = randomUUID().replace(/-/g, '');
    record.input = continueAsNew.input ?? undefined;
    record.output = undefined;
    record.historyCount = 0;
    record.nextEventId = 0;
    record.actionCount = 0;
    record.retries = {};
    record.outbox = [{ k: 'cleanup', executionId: rec.executionId }, { k: 'wake' }];
    return { history: [], record, continuedAsNew: true };
  }

  const newHistory: HistoryEvent[] = [...turn.events];
  const outbox: OutboxItem[] = [];
  const base = rec.historyCount;
  for (const s of scheduled) {
    const seq = base + newHistory.length;
    newHistory.push(s.event);
    if (s.outbox) outbox.push(s.outbox(seq));
  }
  const done = failure !== undefined || (outcome.ok && outcome.state.isDone);
  if (failure) {
    const message = `Orchestrator function '${rec.name}' failed: ${failure.message}`;
    record.status = 'Failed';
    record.output = JSON.stringify(message);
    newHistory.push(
      event(
        EventType.ExecutionCompleted,
        { OrchestrationStatus: 'Failed', Result: record.output, FailureDetails: failure.details },
        now,
      ),
    );
  } else if (done && outcome.ok) {
    record.status = 'Completed';
    record.output = valueText(outcome.state.output) ?? 'null';
    newHistory.push(
      event(EventType.ExecutionCompleted, { OrchestrationStatus: 'Completed', Result: record.output }, now),
    );
  }
  newHistory.push(event(EventType.OrchestratorCompleted, {}, now));
  if (done) {
    record.retries = {};
    // A finished orchestration hands out nothing it scheduled in its last turn but tells its parent.
    outbox.length = 0;
    if (rec.parent) {
      outbox.push({
        k: 'parent',
        parentId: rec.parent.instanceId,
        parentExecutionId: rec.parent.executionId,
        taskId: rec.parent.taskId,
        ok: record.status === 'Completed',
      });
    }
  }
  record.historyCount = base + newHistory.length;
  record.outbox = outbox;
  return { history: newHistory, record, continuedAsNew: false };
}

function checkPayloadOrFail(text: string | null): void {
  if (text !== null) checkPayload('The continue-as-new input', text, PAYLOAD_LIMIT);
}

/** A turn that only applies a termination request. */
export function terminateTurn(rec: InstanceRecord, reason: string | null, now: Date): TurnResult {
  const output = JSON.stringify(reason ?? '');
  const history: HistoryEvent[] = [
    event(EventType.OrchestratorStarted, {}, now),
    event(EventType.ExecutionTerminated, { Input: output }, now),
    event(EventType.ExecutionCompleted, { OrchestrationStatus: 'Terminated', Result: output }, now),
    event(EventType.OrchestratorCompleted, {}, now),
  ];
  const record: InstanceRecord = {
    ...rec,
    status: 'Terminated',
    output,
    lastUpdatedTime: now.toISOString(),
    historyCount: rec.historyCount + history.length,
    retries: {},
    outbox: rec.parent
      ? [
          {
            k: 'parent',
            parentId: rec.parent.instanceId,
            parentExecutionId: rec.parent.executionId,
            taskId: rec.parent.taskId,
            ok: false,
          },
        ]
      : [],
    consumed: [],
  };
  return { history, record, continuedAsNew: false };
}

/** Ids of tasks and timers scheduled in `history` that have no completion in it. */
export function outstanding(history: HistoryEvent[]): {
  activities: Map<number, number>;
  timers: Map<number, string>;
  subs: Map<number, number>;
} {
  const activities = new Map<number, number>();
  const timers = new Map<number, string>();
  const subs = new Map<number, number>();
  history.forEach((e, seq) => {
    if (e.EventType === EventType.TaskScheduled) activities.set(e.EventId, seq);
    else if (e.EventType === EventType.TimerCreated) timers.set(e.EventId, e.FireAt!);
    else if (e.EventType === EventType.SubOrchestrationInstanceCreated) subs.set(e.EventId, seq);
  });
  for (const e of history) {
    if (e.TaskScheduledId !== undefined) {
      activities.delete(e.TaskScheduledId);
      subs.delete(e.TaskScheduledId);
    }
    if (e.EventType === EventType.TimerFired && e.TimerId !== undefined) timers.delete(e.TimerId);
  }
  return { activities, timers, subs };
}
