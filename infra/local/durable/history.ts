/*
 * History events in the shape the Durable extension hands to an out-of-process orchestrator
 * (DurableTask's HistoryEvent, serialised with PascalCase names), which is what the
 * `durable-functions` library replays: it reads EventType, EventId, Timestamp, IsPlayed and the
 * per-type fields (TaskScheduledId, TimerId, Name, Input, Result, Reason, Details,
 * FailureDetails).
 */

export enum EventType {
  ExecutionStarted = 0,
  ExecutionCompleted = 1,
  ExecutionFailed = 2,
  ExecutionTerminated = 3,
  TaskScheduled = 4,
  TaskCompleted = 5,
  TaskFailed = 6,
  SubOrchestrationInstanceCreated = 7,
  SubOrchestrationInstanceCompleted = 8,
  SubOrchestrationInstanceFailed = 9,
  TimerCreated = 10,
  TimerFired = 11,
  OrchestratorStarted = 12,
  OrchestratorCompleted = 13,
  EventSent = 14,
  EventRaised = 15,
  ContinueAsNew = 16,
  GenericEvent = 17,
  HistoryState = 18,
  ExecutionSuspended = 19,
  ExecutionResumed = 20,
}

export interface FailureDetails {
  ErrorType: string;
  ErrorMessage: string;
  StackTrace?: string;
  IsNonRetriable?: boolean;
  Properties?: Record<string, unknown>;
  InnerFailure?: FailureDetails;
}

export interface HistoryEvent {
  EventType: EventType;
  EventId: number;
  Timestamp: string;
  IsPlayed?: boolean;
  Name?: string;
  Input?: string | null;
  Result?: string | null;
  TaskScheduledId?: number;
  TimerId?: number;
  FireAt?: string;
  InstanceId?: string;
  Reason?: string;
  Details?: string;
  FailureDetails?: FailureDetails;
  OrchestrationStatus?: string;
  ParentInstance?: { InstanceId: string; ExecutionId: string; TaskScheduleId: number; Name: string };
  OrchestrationInstance?: { InstanceId: string; ExecutionId: string };
  /** The inbox row this event came from (engine bookkeeping; not given to the orchestrator). */
  _key?: string;
}

export function event(type: EventType, fields: Partial<HistoryEvent> = {}, at = new Date()): HistoryEvent {
  return { EventType: type, EventId: -1, Timestamp: at.toISOString(), ...fields };
}

/** What an activity or orchestrator threw, as the FailureDetails the library turns into a
 *  TaskFailedError. `wrapActivityHandler` serialises a FailureDetails JSON into the message when
 *  an exception-properties provider is registered; that is unpacked here. */
export function failureOf(err: unknown): FailureDetails {
  const error = err instanceof Error ? err : new Error(typeof err === 'string' ? err : JSON.stringify(err));
  try {
    const parsed = JSON.parse(error.message) as Record<string, unknown>;
    if (parsed && typeof parsed === 'object' && typeof parsed.errorMessage === 'string') {
      return {
        ErrorType: String(parsed.errorType ?? error.name ?? 'Error'),
        ErrorMessage: parsed.errorMessage,
        StackTrace: typeof parsed.stackTrace === 'string' ? parsed.stackTrace : error.stack,
        IsNonRetriable: Boolean(parsed.isNonRetriable),
        Properties: (parsed.properties as Record<string, unknown>) ?? undefined,
      };
    }
  } catch {
    // Not a serialised payload: an ordinary error.
  }
  return {
    ErrorType: error.name || 'Error',
    ErrorMessage: error.message,
    StackTrace: error.stack,
    IsNonRetriable: false,
  };
}

function parseJson(text: string | null | undefined): unknown {
  if (text === undefined || text === null || text === '') return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/**
 * The history as the extension's status API shows it (`historyEvents`): orchestrator episodes
 * left out, each completion merged with its scheduling event (FunctionName, ScheduledTime),
 * payloads parsed and shown only with showHistoryOutput.
 */
export function friendlyHistory(events: HistoryEvent[], showOutput: boolean): Record<string, unknown>[] {
  const scheduled = new Map<number, HistoryEvent>();
  const completed = new Set<number>();
  for (const e of events) {
    if (
      e.EventType === EventType.TaskScheduled ||
      e.EventType === EventType.SubOrchestrationInstanceCreated ||
      e.EventType === EventType.TimerCreated
    ) {
      scheduled.set(e.EventId, e);
    }
    if (e.TaskScheduledId !== undefined) completed.add(e.TaskScheduledId);
    if (e.TimerId !== undefined) completed.add(e.TimerId);
  }
  const out: Record<string, unknown>[] = [];
  for (const e of events) {
    const type = EventType[e.EventType];
    switch (e.EventType) {
      case EventType.OrchestratorStarted:
      case EventType.OrchestratorCompleted:
        break;
      case EventType.TaskScheduled:
      case EventType.SubOrchestrationInstanceCreated:
      case EventType.TimerCreated:
        if (!completed.has(e.EventId)) {
          out.push({
            EventType: type,
            Timestamp: e.Timestamp,
            EventId: e.EventId,
            ...(e.Name ? { FunctionName: e.Name } : {}),
            ...(e.InstanceId ? { InstanceId: e.InstanceId } : {}),
            ...(e.FireAt ? { FireAt: e.FireAt } : {}),
            ...(showOutput && e.Input !== undefined ? { Input: parseJson(e.Input) } : {}),
          });
        }
        break;
      case EventType.ExecutionStarted:
        out.push({
          EventType: type,
          Timestamp: e.Timestamp,
          FunctionName: e.Name,
          ...(showOutput ? { Input: parseJson(e.Input) } : {}),
        });
        break;
      case EventType.TaskCompleted:
      case EventType.SubOrchestrationInstanceCompleted:
      case EventType.TaskFailed:
      case EventType.SubOrchestrationInstanceFailed: {
        const source = scheduled.get(e.TaskScheduledId ?? -1);
        const failed =
          e.EventType === EventType.TaskFailed || e.EventType === EventType.SubOrchestrationInstanceFailed;
        out.push({
          EventType: type,
          Timestamp: e.Timestamp,
          TaskScheduledId: e.TaskScheduledId,
          FunctionName: source?.Name,
          ScheduledTime: source?.Timestamp,
          ...(source?.InstanceId ? { InstanceId: source.InstanceId } : {}),
          ...(failed ? { Reason: e.Reason, Details: e.Details } : {}),
          ...(!failed && showOutput ? { Result: parseJson(e.Result) } : {}),
        });
        break;
      }
      case EventType.TimerFired:
        out.push({ EventType: type, Timestamp: e.Timestamp, TimerId: e.TimerId, FireAt: e.FireAt });
        break;
      case EventType.EventRaised:
        out.push({
          EventType: type,
          Timestamp: e.Timestamp,
          Name: e.Name,
          ...(showOutput ? { Input: parseJson(e.Input) } : {}),
        });
        break;
      case EventType.ExecutionCompleted:
        out.push({
          EventType: type,
          Timestamp: e.Timestamp,
          OrchestrationStatus: e.OrchestrationStatus,
          ...(e.FailureDetails ? { FailureDetails: e.FailureDetails } : {}),
          ...(showOutput || e.OrchestrationStatus === 'Failed' ? { Result: parseJson(e.Result) } : {}),
        });
        break;
      case EventType.ExecutionTerminated:
        out.push({ EventType: type, Timestamp: e.Timestamp, Input: parseJson(e.Input) });
        break;
      default:
        out.push({ EventType: type, Timestamp: e.Timestamp, ...(e.Name ? { Name: e.Name } : {}) });
    }
  }
  return out;
}
