import { randomUUID } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { ConflictError, ValidationError, ensureError } from '../../../shared/errors';
import type { StorageClients } from '../../../shared/storage';
import { EventType, event, failureOf, friendlyHistory, type HistoryEvent } from './history';
import {
  serveDurableHttp,
  WEBHOOK_PREFIX,
  RPC_PREFIX,
  type ManagementApi,
  type StatusQuery,
} from './http-api';
import { QueuePump, type Log } from './pump';
import {
  DurableStore,
  PAYLOAD_LIMIT,
  PayloadTooLargeError,
  TERMINAL,
  checkPayload,
  instanceIdProblem,
  type InboxRow,
  type InstanceRecord,
  type OutboxItem,
  type RuntimeStatus,
} from './store';
import {
  HTTP_ACTIVITY,
  completeTurn,
  interpretInvocation,
  interpretInvocationError,
  outstanding,
  prepareTurn,
  terminateTurn,
  triggerInput,
  type InvocationOutcome,
  type TurnResult,
} from './turn';

export interface DurableFunctionInvoker {
  /** Calls the registered orchestrator function `name` with the orchestration trigger's value
   *  (DurableOrchestrationBindingInfo: history, input, instanceId, isReplaying, parentInstanceId,
   *  upperSchemaVersion, timer settings) and resolves with what its handler returned (the
   *  OrchestratorState, as an object or JSON text). An orchestrator that throws rejects with the
   *  library's OrchestrationFailureError. */
  orchestrator(name: string, triggerInput: unknown): Promise<unknown>;
  /** Calls the registered activity with its input; resolves with its result or rejects with the thrown error. */
  activity(name: string, input: unknown): Promise<unknown>;
  /** Which orchestrations / activities / entities exist (to reject unknown names with a clear error). */
  has(kind: 'orchestration' | 'activity' | 'entity', name: string): boolean;
}

export interface DurableEngineOptions {
  storage: StorageClients;
  /** Task hub; prefixes the engine's tables and queues (sanitised to valid names). */
  hubName: string;
  invoker: DurableFunctionInvoker;
  /** The Functions host's origin, e.g. http://127.0.0.1:7071 (known once it listens). */
  baseUrl: () => string;
  /** The local key; webhook URLs carry it as ?code= so they pass the host's check. */
  functionKey?: string;
  log?: Log;
  /** Queue poll interval while busy (default 50 ms); it backs off to maxPollIntervalMs when idle. */
  pollIntervalMs?: number;
  maxPollIntervalMs?: number;
  /** Lease of a received work item (visibility timeout, renewed while it runs); default 30 s.
   *  After a crash, work a dead process held comes back after at most this long. */
  visibilityTimeoutMs?: number;
  maxConcurrentActivities?: number;
  maxConcurrentOrchestrations?: number;
  /** The loopback endpoint DurableClient reaches through `rpcBaseUrl` (like the extension's
   *  local RPC endpoint on 127.0.0.1:17071). Port 0 picks a free one; false leaves rpcBaseUrl out,
   *  so the client uses the webhook URLs instead. */
  rpc?: { host?: string; port?: number } | false;
}

/** Timers due within this window also get an in-process timeout, so they fire on time (queue
 *  visibility has one-second granularity); the queue message stays as the durable copy. */
const LOCAL_TIMER_WINDOW_MS = 10 * 60_000;
const MAX_QUEUE_DELAY_S = 6 * 24 * 3600;
const HISTORY_CACHE_SIZE = 256;
const WAKE_SAFETY_DELAY_S = 5;

interface ActivityMessage {
  i: string;
  e: string;
  t: number;
  s: number;
}
interface TimerMessage {
  i: string;
  e: string;
  t: number;
  f: string;
}
interface ControlMessage {
  i: string;
}

class Semaphore {
  private waiting: (() => void)[] = [];
  constructor(private free: number) {}
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.free > 0) this.free--;
    else await new Promise<void>((resolve) => this.waiting.push(resolve));
    try {
      return await fn();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.free++;
    }
  }
}

function parseJson(text: string | undefined): unknown {
  if (text === undefined) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/**
 * A Durable Functions back end for the local host: runs orchestrations written with the
 * `durable-functions` library by replaying their history through the library itself and
 * executing the actions it returns, with instances, history and pending work in Azurite tables
 * and queues (see docs/local-durable.md).
 */
export class DurableEngine implements ManagementApi {
  readonly store: DurableStore;
  private readonly log: Log;
  private readonly invoker: DurableFunctionInvoker;
  private readonly control: QueuePump;
  private readonly activityPump: QueuePump;
  private readonly timerPump: QueuePump;
  private readonly turns = new Map<
    string,
    { running?: Promise<void>; queued?: Promise<void>; recover: boolean }
  >();
  private readonly turnSlots: Semaphore;
  private readonly historyCache = new Map<string, { executionId: string; events: HistoryEvent[] }>();
  private readonly runningActivities = new Set<string>();
  /** Instances whose committed outbox (at this ETag) this process already handed out. */
  private readonly dispatched = new Map<string, string>();
  private readonly localTimers = new Map<string, NodeJS.Timeout>();
  private readonly background = new Set<Promise<unknown>>();
  private rpcServer?: http.Server;
  private rpcUrl?: string;
  private started = false;
  private stopping = false;

  constructor(private readonly options: DurableEngineOptions) {
    if (!options.hubName || !/[A-Za-z0-9]/.test(options.hubName)) {
      throw new ValidationError(
        `The task hub name '${options.hubName}' is not usable; give letters and digits.`,
        'hubName',
      );
    }
    this.store = new DurableStore(options.storage, options.hubName);
    this.log = options.log ?? (() => undefined);
    this.invoker = options.invoker;
    this.turnSlots = new Semaphore(options.maxConcurrentOrchestrations ?? 16);
    const common = {
      visibilityMs: options.visibilityTimeoutMs ?? 30_000,
      minPollMs: options.pollIntervalMs ?? 50,
      maxPollMs: options.maxPollIntervalMs ?? 1000,
      maxDeliveries: 20,
      log: this.log,
    };
    this.control = new QueuePump({
      ...common,
      queue: this.store.control,
      concurrency: 64,
      handle: (body) => this.scheduleTurn((body as ControlMessage).i),
    });
    this.activityPump = new QueuePump({
      ...common,
      queue: this.store.activities,
      concurrency: options.maxConcurrentActivities ?? 8,
      handle: (body) => this.runActivity(body as ActivityMessage),
    });
    this.timerPump = new QueuePump({
      ...common,
      queue: this.store.timers,
      concurrency: 16,
      handle: (body) => this.onTimerMessage(body as TimerMessage),
    });
  }

  get hubName(): string {
    return this.options.hubName;
  }

  /** Creates the tables and queues, starts the loopback RPC endpoint and the work pumps, and
   *  resumes every unfinished instance (re-handing out work a crashed process held). */
  async start(): Promise<void> {
    if (this.started) return;
    await this.store.create();
    if (this.options.rpc !== false) {
      const host = this.options.rpc?.host ?? '127.0.0.1';
      const server = http.createServer((req, res) => {
        void serveDurableHttp(this, req, res, RPC_PREFIX).then((handled) => {
          if (!handled) {
            res.writeHead(404, { 'content-type': 'application/json' });
            res.end(
              JSON.stringify({ error: { code: 'NotFound', message: `No Durable API serves ${req.url}.` } }),
            );
          }
        });
      });
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(this.options.rpc ? (this.options.rpc.port ?? 0) : 0, host, () => resolve());
      });
      this.rpcServer = server;
      const { port } = server.address() as AddressInfo;
      this.rpcUrl = `http://${host}:${port}${RPC_PREFIX}/`;
    }
    this.started = true;
    this.stopping = false;
    this.control.start();
    this.activityPump.start();
    this.timerPump.start();
    this.track(this.recoverAll());
  }

  /** Stops taking work, waits for in-flight turns and activities; everything else stays queued. */
  async stop(): Promise<void> {
    if (!this.started) return;
    this.stopping = true;
    for (const timer of this.localTimers.values()) clearTimeout(timer);
    this.localTimers.clear();
    await Promise.all([this.control.stop(), this.activityPump.stop(), this.timerPump.stop()]);
    await Promise.allSettled([...this.background]);
    await Promise.allSettled([...this.turns.values()].flatMap((t) => [t.running, t.queued]));
    if (this.rpcServer) {
      const server = this.rpcServer;
      server.closeAllConnections?.();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      this.rpcServer = undefined;
      this.rpcUrl = undefined;
    }
    this.started = false;
  }

  private track<T>(promise: Promise<T>): void {
    const p = promise.catch((err) =>
      this.log('error', 'A Durable background task failed.', { error: String(err) }),
    );
    this.background.add(p);
    void p.finally(() => this.background.delete(p));
  }

  private webhookBase(): string {
    return `${this.options.baseUrl().replace(/\/+$/, '')}${WEBHOOK_PREFIX}`;
  }

  /** The `durableClient` input binding's value (what df.getClient(context) parses). */
  clientBindingData(): Record<string, unknown> {
    const base = this.webhookBase();
    const key = this.options.functionKey;
    const code = key ? `code=${encodeURIComponent(key)}` : '';
    const common = `taskHub=${encodeURIComponent(this.hubName)}&connection=Storage${code ? `&${code}` : ''}`;
    const instance = `${base}/instances/INSTANCEID`;
    const data: Record<string, unknown> = {
      taskHubName: this.hubName,
      creationUrls: {
        createNewInstancePostUri: `${base}/orchestrators/{functionName}[/{instanceId}]${code ? `?${code}` : ''}`,
        waitOnNewInstancePostUri: `${base}/orchestrators/{functionName}[/{instanceId}]?timeout={timeoutInSeconds}&pollingInterval={intervalInSeconds}${code ? `&${code}` : ''}`,
      },
      managementUrls: {
        id: 'INSTANCEID',
        statusQueryGetUri: `${instance}?${common}`,
        sendEventPostUri: `${instance}/raiseEvent/{eventName}?${common}`,
        terminatePostUri: `${instance}/terminate?reason={text}&${common}`,
        rewindPostUri: `${instance}/rewind?reason={text}&${common}`,
        purgeHistoryDeleteUri: `${instance}?${common}`,
        restartPostUri: `${instance}/restart?${common}`,
        suspendPostUri: `${instance}/suspend?reason={text}&${common}`,
        resumePostUri: `${instance}/resume?reason={text}&${common}`,
      },
      baseUrl: base,
      requiredQueryStringParameters: code,
      httpBaseUrl: base,
    };
    if (this.rpcUrl) data.rpcBaseUrl = this.rpcUrl;
    return data;
  }

  /** Serves the extension's webhook API (`/runtime/webhooks/durabletask/...`); false when the
   *  request is for something else. The host checks the function key before calling this. */
  handleHttp(req: http.IncomingMessage, res: http.ServerResponse): Promise<boolean> {
    return serveDurableHttp(this, req, res, WEBHOOK_PREFIX);
  }

  /** The management URLs for one instance (createCheckStatusResponse's payload). */
  managementPayload(instanceId: string): Record<string, string> {
    const urls = this.clientBindingData().managementUrls as Record<string, string>;
    const out: Record<string, string> = {};
    for (const [k, v] of Object.entries(urls))
      out[k] = v.replace('INSTANCEID', encodeURIComponent(instanceId));
    out.id = instanceId;
    return out;
  }

  // ---------------------------------------------------------------- management

  async startNew(name: string, options: { instanceId?: string; input?: string } = {}): Promise<string> {
    if (!this.invoker.has('orchestration', name)) {
      throw new ValidationError(
        `The function '${name}' doesn't exist, is disabled, or is not an orchestrator function.`,
        'functionName',
      );
    }
    const instanceId = options.instanceId ?? randomUUID().replace(/-/g, '');
    const problem = instanceIdProblem(instanceId);
    if (problem) throw new ValidationError(`Invalid instance id '${instanceId}': ${problem}.`, 'instanceId');
    if (options.input !== undefined) {
      try {
        JSON.parse(options.input);
      } catch {
        throw new ValidationError('The orchestration input must be JSON.', 'input');
      }
      try {
        checkPayload('The orchestration input', options.input);
      } catch (err) {
        throw new ValidationError((err as Error).message, 'input');
      }
    }
    const now = new Date().toISOString();
    const rec = this.newRecord(instanceId, name, options.input, now);
    if (!(await this.store.insertInstance(rec))) {
      const existing = await this.store.getInstance(instanceId);
      if (existing && !TERMINAL.has(existing.status)) {
        throw new ConflictError(
          `An orchestration with instance ID '${instanceId}' already exists and is ${existing.status}.`,
          'instanceId',
        );
      }
      if (existing) {
        await this.store.deleteHistory(instanceId);
        rec.etag = existing.etag;
        if (!(await this.store.replaceInstance(rec))) {
          throw new ConflictError(
            `The orchestration instance '${instanceId}' changed while it was being restarted; try again.`,
            'instanceId',
          );
        }
      } else if (!(await this.store.insertInstance(rec))) {
        throw new ConflictError(
          `An orchestration with instance ID '${instanceId}' was just created by another request.`,
          'instanceId',
        );
      }
      this.historyCache.delete(instanceId);
    }
    this.log('info', `Started orchestration ${name}.`, { instanceId });
    await this.wake(instanceId);
    return instanceId;
  }

  private newRecord(
    instanceId: string,
    name: string,
    input: string | undefined,
    now: string,
  ): InstanceRecord {
    return {
      instanceId,
      name,
      status: 'Pending',
      executionId: randomUUID().replace(/-/g, ''),
      input,
      createdTime: now,
      lastUpdatedTime: now,
      historyCount: 0,
      nextEventId: 0,
      actionCount: 0,
      retries: {},
      outbox: [],
      consumed: [],
    };
  }

  async getStatus(instanceId: string, query: StatusQuery = {}): Promise<Record<string, unknown> | undefined> {
    if (instanceIdProblem(instanceId)) return undefined;
    const rec = await this.store.getInstance(instanceId);
    if (!rec) return undefined;
    const status = this.statusOf(rec, query.showInput !== false);
    if (query.showHistory) {
      const events = rec.status === 'ContinuedAsNew' ? [] : await this.loadHistory(rec);
      const history = friendlyHistory(events, query.showHistoryOutput === true);
      status.historyEvents = history;
      // The JS client reads `history` (azure-functions-durable-js#620); give it both.
      status.history = history;
    }
    return status;
  }

  private statusOf(rec: InstanceRecord, showInput: boolean): Record<string, unknown> {
    return {
      name: rec.name,
      instanceId: rec.instanceId,
      runtimeStatus: rec.status,
      input: showInput ? parseJson(rec.input) : null,
      customStatus: parseJson(rec.customStatus),
      output: parseJson(rec.output),
      createdTime: rec.createdTime,
      lastUpdatedTime: rec.lastUpdatedTime,
    };
  }

  async listStatus(query: StatusQuery = {}): Promise<Record<string, unknown>[]> {
    const rows = await this.store.listInstances(this.filterOf(query));
    rows.sort((a, b) => (a.createdTime < b.createdTime ? -1 : a.createdTime > b.createdTime ? 1 : 0));
    return rows.map((r) => this.statusOf(r, query.showInput !== false));
  }

  private filterOf(query: StatusQuery): string | undefined {
    const parts: string[] = [];
    if (query.runtimeStatus?.length)
      parts.push(`(${query.runtimeStatus.map((s) => `status eq '${s.replace(/'/g, "''")}'`).join(' or ')})`);
    if (query.createdTimeFrom) parts.push(`createdTime ge '${query.createdTimeFrom.toISOString()}'`);
    if (query.createdTimeTo) parts.push(`createdTime le '${query.createdTimeTo.toISOString()}'`);
    return parts.length ? parts.join(' and ') : undefined;
  }

  async raiseEvent(
    instanceId: string,
    eventName: string,
    data: string | undefined,
  ): Promise<'accepted' | 'notFound' | 'gone'> {
    if (data !== undefined) {
      try {
        JSON.parse(data);
      } catch {
        throw new ValidationError('The event data must be JSON.', 'body');
      }
      try {
        checkPayload(`The data of event ${eventName}`, data);
      } catch (err) {
        throw new ValidationError((err as Error).message, 'body');
      }
    }
    return this.request(
      instanceId,
      `event-${randomUUID()}`,
      event(EventType.EventRaised, { Name: eventName, Input: data ?? null }),
    );
  }

  terminate(instanceId: string, reason: string | undefined): Promise<'accepted' | 'notFound' | 'gone'> {
    return this.request(
      instanceId,
      `terminate-${randomUUID()}`,
      event(EventType.ExecutionTerminated, { Input: reason ?? '' }),
    );
  }

  suspend(instanceId: string, reason: string | undefined): Promise<'accepted' | 'notFound' | 'gone'> {
    return this.request(
      instanceId,
      `suspend-${randomUUID()}`,
      event(EventType.ExecutionSuspended, { Reason: reason ?? '' }),
    );
  }

  resume(instanceId: string, reason: string | undefined): Promise<'accepted' | 'notFound' | 'gone'> {
    return this.request(
      instanceId,
      `resume-${randomUUID()}`,
      event(EventType.ExecutionResumed, { Reason: reason ?? '' }),
    );
  }

  private async request(
    instanceId: string,
    key: string,
    ev: HistoryEvent,
  ): Promise<'accepted' | 'notFound' | 'gone'> {
    if (instanceIdProblem(instanceId)) return 'notFound';
    const rec = await this.store.getInstance(instanceId);
    if (!rec) return 'notFound';
    if (TERMINAL.has(rec.status)) return 'gone';
    await this.deliver(instanceId, { key, event: ev });
    return 'accepted';
  }

  /** Deletes a finished instance's row, history and inbox; 0 when there is none. */
  async purge(instanceId: string): Promise<number> {
    if (instanceIdProblem(instanceId)) return 0;
    const rec = await this.store.getInstance(instanceId);
    if (!rec) return 0;
    if (!TERMINAL.has(rec.status)) {
      throw new ConflictError(
        `The orchestration instance '${instanceId}' is ${rec.status}; terminate it before purging its history.`,
        'instanceId',
      );
    }
    await this.store.deleteHistory(instanceId);
    await this.store.deleteInbox(instanceId);
    await this.store.deleteInstance(instanceId);
    this.historyCache.delete(instanceId);
    this.dispatched.delete(instanceId);
    return 1;
  }

  async purgeBy(query: StatusQuery): Promise<number> {
    const rows = await this.store.listInstances(this.filterOf(query));
    let deleted = 0;
    for (const row of rows) if (TERMINAL.has(row.status)) deleted += await this.purge(row.instanceId);
    return deleted;
  }

  // ---------------------------------------------------------------- turns

  /**
   * Nudges an instance: a control-queue message, delayed so it is only a safety net (it retries
   * the turn if the in-process one fails), and a turn right away in this process.
   */
  private async wake(instanceId: string): Promise<void> {
    await this.store.control.sendMessage(JSON.stringify({ i: instanceId } satisfies ControlMessage), {
      messageTimeToLive: -1,
      visibilityTimeout: WAKE_SAFETY_DELAY_S,
    });
    if (this.started && !this.stopping) this.track(this.scheduleTurn(instanceId));
  }

  /** Records an event for an instance and nudges it. */
  private async deliver(instanceId: string, row: Omit<InboxRow, 'consumed' | 'arrivedAt'>): Promise<void> {
    await this.store.addInbox(instanceId, row);
    await this.wake(instanceId);
  }

  /** Runs a turn for the instance after any running one; wakes that arrive while a turn waits
   *  share it (it will see their events). */
  private scheduleTurn(instanceId: string, recover = false): Promise<void> {
    let slot = this.turns.get(instanceId);
    if (!slot) {
      slot = { recover: false };
      this.turns.set(instanceId, slot);
    }
    if (recover) slot.recover = true;
    if (slot.queued) return slot.queued;
    const s = slot;
    const previous = s.running ?? Promise.resolve();
    const queued = previous
      .catch(() => undefined)
      .then(async () => {
        s.queued = undefined;
        const doRecover = s.recover;
        s.recover = false;
        const run = this.turnSlots.run(() => this.turn(instanceId, doRecover));
        s.running = run;
        try {
          await run;
        } finally {
          if (s.running === run) s.running = undefined;
          if (!s.running && !s.queued && this.turns.get(instanceId) === s) this.turns.delete(instanceId);
        }
      });
    s.queued = queued;
    return queued;
  }

  private async loadHistory(rec: InstanceRecord): Promise<HistoryEvent[]> {
    const cached = this.historyCache.get(rec.instanceId);
    let events: HistoryEvent[];
    if (cached && cached.executionId === rec.executionId && cached.events.length <= rec.historyCount) {
      const rest = await this.store.readHistory(
        rec.instanceId,
        rec.executionId,
        cached.events.length,
        rec.historyCount,
      );
      events = rest.length ? [...cached.events, ...rest] : cached.events;
    } else {
      events = await this.store.readHistory(rec.instanceId, rec.executionId, 0, rec.historyCount);
    }
    this.remember(rec.instanceId, rec.executionId, events);
    return events;
  }

  private remember(instanceId: string, executionId: string, events: HistoryEvent[]): void {
    this.historyCache.delete(instanceId);
    this.historyCache.set(instanceId, { executionId, events });
    if (this.historyCache.size > HISTORY_CACHE_SIZE) {
      const oldest = this.historyCache.keys().next().value;
      if (oldest !== undefined) this.historyCache.delete(oldest);
    }
  }

  /**
   * One orchestrator turn. Commit order: history rows (at indexes past the committed count, so
   * an uncommitted attempt is invisible and overwritten), then the instance row with an ETag
   * check (the commit point: status, counters, outbox), then the outbox (idempotent: messages,
   * child instances, inbox rows), then the consumed inbox rows are flagged and the outbox cleared.
   * A crash anywhere repeats only idempotent steps.
   */
  private async turn(instanceId: string, recover: boolean): Promise<void> {
    let [rec, inbox] = await Promise.all([
      this.store.getInstance(instanceId),
      this.store.newInbox(instanceId),
    ]);
    if (!rec) return;
    if ((rec.outbox.length || rec.consumed.length) && this.dispatched.get(instanceId) !== rec.etag) {
      rec = await this.finish(rec, true);
      if (!rec) return;
      inbox = await this.store.newInbox(instanceId);
    }
    if (TERMINAL.has(rec.status)) {
      if (inbox.length)
        await this.store.markConsumed(
          instanceId,
          inbox.map((r) => r.key),
        );
      return;
    }
    const history =
      rec.status === 'ContinuedAsNew' && rec.historyCount === 0 ? [] : await this.loadHistory(rec);
    const seen = new Set(history.map((e) => e._key).filter((k): k is string => !!k));
    const relevant: InboxRow[] = [];
    const stale: string[] = [];
    for (const row of inbox) {
      if ((row.executionId && row.executionId !== rec.executionId) || seen.has(row.key)) stale.push(row.key);
      else relevant.push(row);
    }
    const now = new Date();
    const keyed = (row: InboxRow): HistoryEvent => ({ ...row.event, _key: row.key });

    const termination = relevant.find((r) => r.event.EventType === EventType.ExecutionTerminated);
    if (termination) {
      const result = terminateTurn(rec, termination.event.Input ?? null, now);
      result.history[1]._key = termination.key;
      result.record.consumed = [...relevant.map((r) => r.key), ...stale];
      this.log('info', `Terminated orchestration ${rec.name}.`, { instanceId });
      await this.commit(rec, history, result);
      return;
    }

    let suspended = rec.status === 'Suspended';
    const work: InboxRow[] = [];
    const controls: InboxRow[] = [];
    for (const row of relevant) {
      if (row.event.EventType === EventType.ExecutionSuspended) {
        suspended = true;
        controls.push(row);
      } else if (row.event.EventType === EventType.ExecutionResumed) {
        suspended = false;
        controls.push(row);
      } else work.push(row);
    }
    if (suspended) {
      if (rec.status !== 'Suspended' || controls.length) {
        const events = [
          event(EventType.OrchestratorStarted, {}, now),
          ...controls.map(keyed),
          event(EventType.OrchestratorCompleted, {}, now),
        ];
        const record: InstanceRecord = {
          ...rec,
          status: 'Suspended',
          lastUpdatedTime: now.toISOString(),
          historyCount: rec.historyCount + events.length,
          consumed: [...controls.map((r) => r.key), ...stale],
          outbox: [],
        };
        await this.commit(rec, history, { history: events, record, continuedAsNew: false });
      } else if (stale.length) {
        await this.store.markConsumed(instanceId, stale);
      }
      return;
    }
    const resumed = rec.status === 'Suspended';
    if (work.length === 0 && controls.length === 0 && rec.historyCount > 0 && !resumed) {
      if (stale.length) await this.store.markConsumed(instanceId, stale);
      if (recover && rec.status === 'Running') await this.redispatch(rec, history);
      return;
    }

    const has = this.invoker.has.bind(this.invoker);
    const prepared = prepareTurn(rec, history, [...controls, ...work].map(keyed), now, has);
    let outcome: InvocationOutcome;
    if (!has('orchestration', rec.name)) {
      const message = `The function '${rec.name}' doesn't exist, is disabled, or is not an orchestrator function.`;
      outcome = { ok: false, message, details: { ErrorType: 'Error', ErrorMessage: message } };
    } else {
      try {
        outcome = interpretInvocation(
          await this.invoker.orchestrator(rec.name, triggerInput(rec, history, prepared)),
        );
      } catch (err) {
        outcome = interpretInvocationError(err);
      }
    }
    let result: TurnResult;
    try {
      result = completeTurn(rec, history, prepared, outcome, has);
    } catch (err) {
      const e = ensureError(err);
      result = completeTurn(
        rec,
        history,
        prepared,
        { ok: false, message: e.message, details: failureOf(e) },
        has,
      );
    }
    result.record.consumed = [...relevant.map((r) => r.key), ...stale];
    if (result.record.status === 'Failed') {
      this.log('warn', `Orchestration ${rec.name} failed.`, {
        instanceId,
        output: parseJson(result.record.output),
      });
    }
    await this.commit(rec, history, result);
    if (recover && result.record.status === 'Running')
      await this.redispatch(result.record, [...history, ...result.history]);
  }

  private async commit(before: InstanceRecord, history: HistoryEvent[], result: TurnResult): Promise<void> {
    const rec = result.record;
    if (result.history.length)
      await this.store.writeHistory(rec.instanceId, before.executionId, before.historyCount, result.history);
    rec.etag = before.etag;
    if (!(await this.store.replaceInstance(rec))) {
      this.historyCache.delete(rec.instanceId);
      throw new Error(
        `Orchestration instance ${rec.instanceId} changed during a turn; the turn will be retried.`,
      );
    }
    if (result.continuedAsNew) this.historyCache.delete(rec.instanceId);
    else this.remember(rec.instanceId, rec.executionId, [...history, ...result.history]);
    await this.finish(rec);
  }

  /**
   * Hands out a committed turn's outbox and flags its inbox rows (all idempotent, so in
   * parallel). The row keeps the outbox until the next commit replaces it: this process
   * remembers it handed it out (by ETag), while a process that starts after a crash hands it out
   * again. A finished instance gets no next commit, so its outbox is cleared here.
   */
  private async finish(
    rec: InstanceRecord,
    clear = TERMINAL.has(rec.status),
  ): Promise<InstanceRecord | undefined> {
    await Promise.all([
      ...rec.outbox.map((item) => this.dispatch(rec, item)),
      rec.consumed.length ? this.store.markConsumed(rec.instanceId, rec.consumed) : undefined,
    ]);
    if (!clear) {
      this.dispatched.set(rec.instanceId, rec.etag!);
      return rec;
    }
    this.dispatched.delete(rec.instanceId);
    rec.outbox = [];
    rec.consumed = [];
    if (await this.store.replaceInstance(rec)) return rec;
    return this.store.getInstance(rec.instanceId);
  }

  private async dispatch(rec: InstanceRecord, item: OutboxItem): Promise<void> {
    const id = rec.instanceId;
    const e = rec.executionId;
    switch (item.k) {
      case 'activity':
        await this.sendActivity({ i: id, e, t: item.taskId, s: item.seq });
        return;
      case 'timer':
        await this.scheduleTimer({ i: id, e, t: item.timerId, f: item.fireAt });
        return;
      case 'sub':
        await this.createChild(rec, item);
        return;
      case 'fail': {
        const details = { ErrorType: item.errorType, ErrorMessage: item.message };
        await this.deliver(id, {
          key: `${item.sub ? 'sub' : 'task'}-${e}-${item.taskId}`,
          executionId: e,
          event: event(item.sub ? EventType.SubOrchestrationInstanceFailed : EventType.TaskFailed, {
            TaskScheduledId: item.taskId,
            Reason: item.message,
            Details: '',
            FailureDetails: details,
          }),
        });
        return;
      }
      case 'parent': {
        const output = parseJson(rec.output);
        const message =
          rec.status === 'Terminated'
            ? `Orchestration '${rec.instanceId}' was terminated: ${String(output)}`
            : typeof output === 'string'
              ? output
              : JSON.stringify(output);
        await this.deliver(item.parentId, {
          key: `sub-${item.parentExecutionId}-${item.taskId}`,
          executionId: item.parentExecutionId,
          event: item.ok
            ? event(EventType.SubOrchestrationInstanceCompleted, {
                TaskScheduledId: item.taskId,
                Result: rec.output ?? 'null',
              })
            : event(EventType.SubOrchestrationInstanceFailed, {
                TaskScheduledId: item.taskId,
                Reason: message,
                Details: '',
                FailureDetails: { ErrorType: 'Error', ErrorMessage: message },
              }),
        });
        return;
      }
      case 'wake':
        await this.wake(id);
        return;
      case 'cleanup':
        await this.store.deleteHistory(id, item.executionId);
        return;
    }
  }

  private async createChild(parent: InstanceRecord, item: Extract<OutboxItem, { k: 'sub' }>): Promise<void> {
    const cached = this.historyCache.get(parent.instanceId);
    const creation =
      cached && cached.executionId === parent.executionId && cached.events[item.seq]
        ? cached.events[item.seq]
        : await this.store.readHistoryEvent(parent.instanceId, parent.executionId, item.seq);
    if (!creation) return;
    const now = new Date().toISOString();
    const child = this.newRecord(item.childId, creation.Name ?? '', creation.Input ?? undefined, now);
    child.executionId = item.childExecutionId;
    child.parent = { instanceId: parent.instanceId, executionId: parent.executionId, taskId: item.taskId };
    for (let attempt = 0; ; attempt++) {
      const existing = await this.store.getInstance(item.childId);
      if (!existing) {
        if (await this.store.insertInstance(child)) break;
      } else if (
        existing.parent?.instanceId === parent.instanceId &&
        existing.parent.executionId === parent.executionId &&
        existing.parent.taskId === item.taskId
      ) {
        break; // created by an earlier hand-out of this same outbox item
      } else if (!TERMINAL.has(existing.status)) {
        const message = `An orchestration with instance ID '${item.childId}' already exists and is ${existing.status}.`;
        await this.dispatch(parent, {
          k: 'fail',
          taskId: item.taskId,
          sub: true,
          message,
          errorType: 'Error',
        });
        return;
      } else {
        await this.store.deleteHistory(item.childId, existing.executionId);
        child.etag = existing.etag;
        if (await this.store.replaceInstance(child)) {
          this.historyCache.delete(item.childId);
          break;
        }
      }
      if (attempt >= 3) throw new Error(`Could not create sub-orchestration instance ${item.childId}.`);
    }
    await this.wake(item.childId);
  }

  /** After a restart: hand out again whatever an instance is waiting for (activities and timers
   *  with no recorded completion). Duplicates are harmless: a recorded completion is never redone. */
  private async redispatch(rec: InstanceRecord, history: HistoryEvent[]): Promise<void> {
    const { activities, timers } = outstanding(history);
    for (const [taskId, seq] of activities)
      await this.sendActivity({ i: rec.instanceId, e: rec.executionId, t: taskId, s: seq });
    for (const [timerId, fireAt] of timers)
      await this.scheduleTimer({ i: rec.instanceId, e: rec.executionId, t: timerId, f: fireAt });
  }

  private async recoverAll(): Promise<void> {
    const filter =
      ["'Pending'", "'Running'", "'ContinuedAsNew'", "'Suspended'"]
        .map((s) => `status eq ${s}`)
        .join(' or ') + ' or hasOutbox eq true';
    const rows = await this.store.listInstances(filter);
    if (rows.length) this.log('info', `Resuming ${rows.length} unfinished orchestration(s).`);
    await Promise.all(
      rows.map((r) =>
        this.scheduleTurn(r.instanceId, true).catch((err) =>
          this.log('error', 'Could not resume an orchestration.', {
            instanceId: r.instanceId,
            error: String(err),
          }),
        ),
      ),
    );
  }

  // ---------------------------------------------------------------- activities

  private async sendActivity(message: ActivityMessage): Promise<void> {
    await this.store.activities.sendMessage(JSON.stringify(message), { messageTimeToLive: -1 });
    this.activityPump.kick();
  }

  private async runActivity(msg: ActivityMessage): Promise<void> {
    const key = `task-${msg.e}-${msg.t}`;
    const running = `${msg.i}|${key}`;
    // A second message for a task this process is running (handed out again after a restart)
    // is dropped: the running one records the completion.
    if (this.runningActivities.has(running)) return;
    this.runningActivities.add(running);
    try {
      await this.executeActivity(msg, key);
    } finally {
      this.runningActivities.delete(running);
    }
  }

  private async executeActivity(msg: ActivityMessage, key: string): Promise<void> {
    const [recorded, rec, scheduled] = await Promise.all([
      this.store.hasInbox(msg.i, key),
      this.store.getInstance(msg.i),
      this.store.readHistoryEvent(msg.i, msg.e, msg.s),
    ]);
    if (recorded) {
      // Its completion is recorded: never run it again; just make sure the instance heard.
      await this.wake(msg.i);
      return;
    }
    if (!rec || rec.executionId !== msg.e || TERMINAL.has(rec.status)) return;
    if (!scheduled || scheduled.EventType !== EventType.TaskScheduled || scheduled.EventId !== msg.t) return;
    const name = scheduled.Name ?? '';
    let completion: HistoryEvent;
    try {
      const input =
        scheduled.Input === null || scheduled.Input === undefined ? undefined : JSON.parse(scheduled.Input);
      let result: unknown;
      if (name === HTTP_ACTIVITY) result = await callHttp(input as HttpRequestSpec);
      else if (!this.invoker.has('activity', name)) {
        throw new Error(
          `The activity function '${name}' doesn't exist, is disabled, or is not an activity function.`,
        );
      } else result = await this.invoker.activity(name, input);
      const text = result === undefined ? 'null' : JSON.stringify(result);
      checkPayload(`The result of activity ${name}`, text);
      completion = event(EventType.TaskCompleted, { TaskScheduledId: msg.t, Result: text });
    } catch (err) {
      const details = failureOf(err);
      if (err instanceof PayloadTooLargeError) details.ErrorMessage = err.message;
      completion = event(EventType.TaskFailed, {
        TaskScheduledId: msg.t,
        Reason: `Activity function '${name}' failed: ${details.ErrorMessage}`,
        Details: details.StackTrace ?? '',
        FailureDetails: details,
      });
    }
    await this.deliver(msg.i, { key, executionId: msg.e, event: completion });
  }

  // ---------------------------------------------------------------- timers

  private async scheduleTimer(msg: TimerMessage): Promise<void> {
    const delay = Date.parse(msg.f) - Date.now();
    const visibility = Math.min(Math.max(Math.ceil(delay / 1000), 0), MAX_QUEUE_DELAY_S);
    const sent = await this.store.timers.sendMessage(JSON.stringify(msg), {
      visibilityTimeout: visibility > 0 ? visibility : undefined,
      messageTimeToLive: -1,
    });
    const key = `${msg.i}|${msg.e}|${msg.t}`;
    if (delay <= LOCAL_TIMER_WINDOW_MS && !this.stopping && !this.localTimers.has(key)) {
      const timer = setTimeout(
        () => {
          this.localTimers.delete(key);
          if (this.stopping) return;
          this.track(
            this.fireWhenDue(msg).then(() =>
              this.store.timers.deleteMessage(sent.messageId, sent.popReceipt).catch(() => undefined),
            ),
          );
        },
        Math.max(0, delay),
      );
      this.localTimers.set(key, timer);
    } else if (visibility === 0) {
      this.timerPump.kick();
    }
  }

  private async onTimerMessage(msg: TimerMessage): Promise<void> {
    const remaining = Date.parse(msg.f) - Date.now();
    if (remaining > 1000) {
      // A timer longer than a queue message can wait: wait again.
      await this.store.timers.sendMessage(JSON.stringify(msg), {
        visibilityTimeout: Math.min(Math.ceil(remaining / 1000), MAX_QUEUE_DELAY_S),
        messageTimeToLive: -1,
      });
      return;
    }
    // Queue visibility has one-second granularity: never fire before the due time.
    await this.fireWhenDue(msg);
  }

  /** Fires the timer once its due time has come (a Node timer can wake a millisecond early). */
  private async fireWhenDue(msg: TimerMessage): Promise<void> {
    for (let left = Date.parse(msg.f) - Date.now(); left > 0; left = Date.parse(msg.f) - Date.now())
      await new Promise((r) => setTimeout(r, left));
    await this.fireTimer(msg);
  }

  private async fireTimer(msg: TimerMessage): Promise<void> {
    const rec = await this.store.getInstance(msg.i);
    if (!rec || rec.executionId !== msg.e || TERMINAL.has(rec.status)) return;
    await this.deliver(msg.i, {
      key: `timer-${msg.e}-${msg.t}`,
      executionId: msg.e,
      event: event(EventType.TimerFired, { TimerId: msg.t, FireAt: msg.f }),
    });
  }
}

interface HttpRequestSpec {
  method?: string;
  uri: string;
  content?: string;
  headers?: Record<string, string>;
  tokenSource?: unknown;
  asynchronousPatternEnabled?: boolean;
}

/** The built-in HTTP activity behind context.df.callHttp: the request, and with the
 *  asynchronous pattern, polling of a 202's Location until the answer is final. */
async function callHttp(
  spec: HttpRequestSpec,
): Promise<{ statusCode: number; headers: Record<string, string>; content: string }> {
  if (spec.tokenSource) {
    throw new Error(
      'callHttp with a managed-identity token source is not supported by the local Durable engine.',
    );
  }
  let res = await fetch(spec.uri, {
    method: spec.method ?? 'GET',
    headers: spec.headers,
    body: spec.content,
  });
  for (
    let polls = 0;
    res.status === 202 &&
    spec.asynchronousPatternEnabled !== false &&
    res.headers.get('location') &&
    polls < 10_000;
    polls++
  ) {
    const retryAfter = Number(res.headers.get('retry-after') ?? '1');
    await new Promise((r) =>
      setTimeout(r, Math.min(Math.max(Number.isFinite(retryAfter) ? retryAfter : 1, 0), 60) * 1000),
    );
    const location = new URL(res.headers.get('location')!, spec.uri).href;
    await res.body?.cancel();
    res = await fetch(location, { method: 'GET', headers: spec.headers });
  }
  const headers: Record<string, string> = {};
  res.headers.forEach((v, k) => (headers[k] = v));
  return { statusCode: res.status, headers, content: await res.text() };
}

export { PAYLOAD_LIMIT };
export type { RuntimeStatus };
