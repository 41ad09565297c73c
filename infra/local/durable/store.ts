import { RestError, type TableClient, type TableEntity, type TableEntityResult } from '@azure/data-tables';
import type { QueueClient } from '@azure/storage-queue';
import type { StorageClients } from '../../../shared/storage';
import type { HistoryEvent } from './history';

/*
 * Persistence of the local Durable engine in Azurite: three tables and three queues per task hub.
 *
 *   {Hub}DfInstances  one row per instance: status, input/output, counters, and the turn's
 *                     outbox (the commit point of every orchestrator turn)
 *   {Hub}DfHistory    one row per history event, RowKey `{executionId}:{seq:08}`
 *   {Hub}DfInbox      events waiting for the orchestrator (completions, timers, raised events),
 *                     RowKey deterministic per event so a duplicate write is a no-op; rows stay
 *                     (flagged consumed) as the record that an activity's completion was saved
 *   {hub}-df-control  "instance X has work" nudges; {hub}-df-activities; {hub}-df-timers
 *
 * The names differ from the Azure Storage provider's ({hub}Instances, {hub}-control-00, …) on
 * purpose, so `func start` and the local engine can share one Azurite without reading each
 * other's rows.
 */

/** Largest JSON payload (input, output, result, event data) stored, in characters. */
export const PAYLOAD_LIMIT = 200_000;
/** Largest custom status, as the Azure Storage provider's 16 KB limit. */
export const CUSTOM_STATUS_LIMIT = 16_000;
const CHUNK = 30_000;

export type RuntimeStatus =
  'Pending' | 'Running' | 'Completed' | 'ContinuedAsNew' | 'Failed' | 'Terminated' | 'Suspended';
export const TERMINAL: ReadonlySet<RuntimeStatus> = new Set(['Completed', 'Failed', 'Terminated']);

export interface RetryPolicy {
  firstRetryIntervalInMilliseconds: number;
  maxNumberOfAttempts: number;
  backoffCoefficient?: number;
  maxRetryIntervalInMilliseconds?: number;
  retryTimeoutInMilliseconds?: number;
}

/** A task scheduled with a retry policy, keyed in `retries` by its current attempt's task id
 *  (or by the retry timer's id while it waits). */
export interface RetryState {
  kind: 'activity' | 'orchestration';
  /** History index of the first attempt's TaskScheduled / SubOrchestrationInstanceCreated event. */
  firstSeq: number;
  policy: RetryPolicy;
  /** The attempt that is running, or (while the timer waits) the attempt that just failed. */
  attempt: number;
  firstAttemptAt: string;
  waitingOnTimer: boolean;
}

/** Work a committed turn still has to hand out; every item is idempotent. */
export type OutboxItem =
  | { k: 'activity'; taskId: number; seq: number }
  | { k: 'timer'; timerId: number; fireAt: string }
  | { k: 'sub'; taskId: number; seq: number; childId: string; childExecutionId: string }
  | { k: 'fail'; taskId: number; sub: boolean; message: string; errorType: string }
  | {
      k: 'parent';
      parentId: string;
      parentExecutionId: string;
      taskId: number;
      ok: boolean;
      result?: string;
      message?: string;
    }
  | { k: 'wake' }
  | { k: 'cleanup'; executionId: string };

export interface InstanceRecord {
  instanceId: string;
  name: string;
  status: RuntimeStatus;
  executionId: string;
  /** JSON text, or undefined for none. */
  input?: string;
  output?: string;
  customStatus?: string;
  createdTime: string;
  lastUpdatedTime: string;
  parent?: { instanceId: string; executionId: string; taskId: number };
  /** Committed history events of the current execution. */
  historyCount: number;
  nextEventId: number;
  /** Top-level actions of the current execution already turned into history. */
  actionCount: number;
  retries: Record<string, RetryState>;
  outbox: OutboxItem[];
  /** Inbox row keys the last committed turn consumed (flagged after the commit). */
  consumed: string[];
  etag?: string;
}

export interface InboxRow {
  key: string;
  /** The execution the event belongs to; absent for raised events and control requests. */
  executionId?: string;
  arrivedAt: string;
  consumed: boolean;
  event: HistoryEvent;
}

export class PayloadTooLargeError extends Error {}

export function hubNames(hubName: string) {
  let base = hubName.replace(/[^A-Za-z0-9]/g, '');
  if (!/^[A-Za-z]/.test(base)) base = `h${base}`;
  base = base.slice(0, 40);
  if (base.length < 3) base = `${base}hub`;
  const lower = base.toLowerCase();
  return {
    instances: `${base}DfInstances`,
    history: `${base}DfHistory`,
    inbox: `${base}DfInbox`,
    control: `${lower}-df-control`,
    activities: `${lower}-df-activities`,
    timers: `${lower}-df-timers`,
  };
}

/** Instance ids become table keys: these characters are not allowed there (nor by Azure). */
export function instanceIdProblem(id: string): string | undefined {
  if (id.length === 0) return 'an instance id must not be empty';
  if (id.length > 256) return 'an instance id must be at most 256 characters';
  // eslint-disable-next-line no-control-regex
  if (/[/\\#?\u0000-\u001f\u007f-\u009f]/.test(id))
    return "an instance id must not contain '/', '\\', '#', '?' or control characters";
  if (id.startsWith('@')) return "an instance id must not start with '@' (reserved for entities)";
  return undefined;
}

type Entity = TableEntity<Record<string, unknown>>;

function putText(entity: Record<string, unknown>, name: string, text: string | undefined): void {
  if (text === undefined) return;
  if (text.length <= CHUNK) {
    entity[name] = text;
    return;
  }
  const parts = Math.ceil(text.length / CHUNK);
  entity[`${name}__n`] = parts;
  for (let i = 0; i < parts; i++)
    entity[i === 0 ? name : `${name}__${i}`] = text.slice(i * CHUNK, (i + 1) * CHUNK);
}

function getText(entity: Record<string, unknown>, name: string): string | undefined {
  const first = entity[name];
  if (typeof first !== 'string') return undefined;
  const parts = entity[`${name}__n`];
  if (typeof parts !== 'number') return first;
  let text = first;
  for (let i = 1; i < parts; i++) text += String(entity[`${name}__${i}`] ?? '');
  return text;
}

export function isStatus(err: unknown, ...codes: number[]): boolean {
  return err instanceof RestError && codes.includes(err.statusCode ?? -1);
}

export function historyKey(executionId: string, seq: number): string {
  return `${executionId}:${String(seq).padStart(8, '0')}`;
}

function odataString(value: string): string {
  return `'${value.replace(/'/g, "''")}'`;
}

async function listAll(
  table: TableClient,
  filter: string,
): Promise<TableEntityResult<Record<string, unknown>>[]> {
  const rows: TableEntityResult<Record<string, unknown>>[] = [];
  for await (const row of table.listEntities<Record<string, unknown>>({ queryOptions: { filter } }))
    rows.push(row);
  return rows;
}

export class DurableStore {
  readonly names: ReturnType<typeof hubNames>;
  readonly instances: TableClient;
  readonly history: TableClient;
  readonly inbox: TableClient;
  readonly control: QueueClient;
  readonly activities: QueueClient;
  readonly timers: QueueClient;

  constructor(storage: StorageClients, hubName: string) {
    this.names = hubNames(hubName);
    this.instances = storage.table(this.names.instances);
    this.history = storage.table(this.names.history);
    this.inbox = storage.table(this.names.inbox);
    const queues = storage.queueService();
    this.control = queues.getQueueClient(this.names.control);
    this.activities = queues.getQueueClient(this.names.activities);
    this.timers = queues.getQueueClient(this.names.timers);
  }

  async create(): Promise<void> {
    const tables = [this.instances, this.history, this.inbox].map(async (t) => {
      try {
        await t.createTable();
      } catch (err) {
        if (!isStatus(err, 409)) throw err;
      }
    });
    const queues = [this.control, this.activities, this.timers].map((q) => q.createIfNotExists());
    await Promise.all([...tables, ...queues]);
  }

  // ---- instances ----

  private toInstance(row: Record<string, unknown>): InstanceRecord {
    const state = JSON.parse(getText(row, 'state') ?? '{}') as Partial<InstanceRecord>;
    return {
      instanceId: String(row.partitionKey),
      name: String(row.name),
      status: row.status as RuntimeStatus,
      executionId: String(row.executionId),
      input: getText(row, 'input'),
      output: getText(row, 'output'),
      customStatus: getText(row, 'customStatus'),
      createdTime: String(row.createdTime),
      lastUpdatedTime: String(row.lastUpdatedTime),
      parent: state.parent,
      historyCount: Number(row.historyCount ?? 0),
      nextEventId: Number(row.nextEventId ?? 0),
      actionCount: Number(row.actionCount ?? 0),
      retries: state.retries ?? {},
      outbox: state.outbox ?? [],
      consumed: state.consumed ?? [],
      etag: typeof row.etag === 'string' ? row.etag : undefined,
    };
  }

  private fromInstance(rec: InstanceRecord): Entity {
    const entity: Entity = {
      partitionKey: rec.instanceId,
      rowKey: '',
      name: rec.name,
      status: rec.status,
      executionId: rec.executionId,
      createdTime: rec.createdTime,
      lastUpdatedTime: rec.lastUpdatedTime,
      historyCount: rec.historyCount,
      nextEventId: rec.nextEventId,
      actionCount: rec.actionCount,
      hasOutbox: rec.outbox.length > 0 || rec.consumed.length > 0,
    };
    putText(entity, 'input', rec.input);
    putText(entity, 'output', rec.output);
    putText(entity, 'customStatus', rec.customStatus);
    putText(
      entity,
      'state',
      JSON.stringify({
        parent: rec.parent,
        retries: rec.retries,
        outbox: rec.outbox,
        consumed: rec.consumed,
      }),
    );
    return entity;
  }

  async getInstance(instanceId: string): Promise<InstanceRecord | undefined> {
    try {
      const row = await this.instances.getEntity<Record<string, unknown>>(instanceId, '');
      return this.toInstance(row);
    } catch (err) {
      if (isStatus(err, 404)) return undefined;
      throw err;
    }
  }

  /** Inserts a new instance; false when one with that id exists. */
  async insertInstance(rec: InstanceRecord): Promise<boolean> {
    try {
      const res = await this.instances.createEntity(this.fromInstance(rec));
      rec.etag = res.etag;
      return true;
    } catch (err) {
      if (isStatus(err, 409)) return false;
      throw err;
    }
  }

  /** Replaces the row if its ETag still matches; false when someone else changed it. */
  async replaceInstance(rec: InstanceRecord): Promise<boolean> {
    try {
      const res = await this.instances.updateEntity(this.fromInstance(rec), 'Replace', {
        etag: rec.etag ?? '*',
      });
      rec.etag = res.etag;
      return true;
    } catch (err) {
      if (isStatus(err, 412, 404)) return false;
      throw err;
    }
  }

  async deleteInstance(instanceId: string): Promise<void> {
    try {
      await this.instances.deleteEntity(instanceId, '');
    } catch (err) {
      if (!isStatus(err, 404)) throw err;
    }
  }

  async listInstances(filter?: string): Promise<InstanceRecord[]> {
    const rows: InstanceRecord[] = [];
    for await (const row of this.instances.listEntities<Record<string, unknown>>(
      filter ? { queryOptions: { filter } } : {},
    )) {
      rows.push(this.toInstance(row));
    }
    return rows;
  }

  // ---- history ----

  /** Writes events at `from`, `from+1`, … of the execution (upsert: rows past the committed
   *  count are leftovers of an uncommitted turn and are overwritten). */
  async writeHistory(
    instanceId: string,
    executionId: string,
    from: number,
    events: HistoryEvent[],
  ): Promise<void> {
    const actions = events.map((event, i) => {
      const entity: Entity = { partitionKey: instanceId, rowKey: historyKey(executionId, from + i) };
      putText(entity, 'event', JSON.stringify(event));
      return ['upsert', entity, 'Replace'] as const;
    });
    for (let i = 0; i < actions.length;) {
      // A transaction holds at most 100 operations and 4 MB.
      let size = 0;
      let j = i;
      while (j < actions.length && j - i < 100) {
        const next = JSON.stringify(actions[j][1]).length * 2;
        if (j > i && size + next > 3_500_000) break;
        size += next;
        j++;
      }
      await this.history.submitTransaction(actions.slice(i, j).map((a) => [...a]));
      i = j;
    }
  }

  async readHistory(
    instanceId: string,
    executionId: string,
    from: number,
    to: number,
  ): Promise<HistoryEvent[]> {
    if (to <= from) return [];
    const filter =
      `PartitionKey eq ${odataString(instanceId)} and RowKey ge ${odataString(historyKey(executionId, from))}` +
      ` and RowKey lt ${odataString(historyKey(executionId, to))}`;
    const rows = await listAll(this.history, filter);
    rows.sort((a, b) => (a.rowKey! < b.rowKey! ? -1 : 1));
    if (rows.length !== to - from) {
      throw new Error(
        `History of ${instanceId} is incomplete: expected ${to - from} events from ${from}, found ${rows.length}.`,
      );
    }
    return rows.map((r) => JSON.parse(getText(r, 'event') ?? 'null') as HistoryEvent);
  }

  async readHistoryEvent(
    instanceId: string,
    executionId: string,
    seq: number,
  ): Promise<HistoryEvent | undefined> {
    try {
      const row = await this.history.getEntity<Record<string, unknown>>(
        instanceId,
        historyKey(executionId, seq),
      );
      return JSON.parse(getText(row, 'event') ?? 'null') as HistoryEvent;
    } catch (err) {
      if (isStatus(err, 404)) return undefined;
      throw err;
    }
  }

  /** Deletes history rows of one execution, or of all executions when none is given. */
  async deleteHistory(instanceId: string, executionId?: string): Promise<void> {
    let filter = `PartitionKey eq ${odataString(instanceId)}`;
    if (executionId) {
      filter += ` and RowKey ge ${odataString(`${executionId}:`)} and RowKey lt ${odataString(`${executionId};`)}`;
    }
    await this.deleteRows(this.history, instanceId, filter);
  }

  private async deleteRows(table: TableClient, partitionKey: string, filter: string): Promise<void> {
    const rows = await listAll(table, filter);
    for (let i = 0; i < rows.length; i += 100) {
      const batch = rows
        .slice(i, i + 100)
        .map((r) => ['delete', { partitionKey, rowKey: r.rowKey! }] as ['delete', Entity]);
      try {
        await table.submitTransaction(batch);
      } catch (err) {
        if (!isStatus(err, 404)) throw err;
        for (const [, e] of batch) {
          await table.deleteEntity(e.partitionKey, e.rowKey).catch((e2) => {
            if (!isStatus(e2, 404)) throw e2;
          });
        }
      }
    }
  }

  // ---- inbox ----

  /** Records an event for an instance; false when an event with that key was already recorded. */
  async addInbox(instanceId: string, row: Omit<InboxRow, 'consumed' | 'arrivedAt'>): Promise<boolean> {
    const text = JSON.stringify(row.event);
    if (text.length > PAYLOAD_LIMIT * 2)
      throw new PayloadTooLargeError(`The event for ${instanceId} is too large to store.`);
    const entity: Entity = {
      partitionKey: instanceId,
      rowKey: row.key,
      consumed: false,
      arrivedAt: new Date().toISOString(),
    };
    if (row.executionId) entity.executionId = row.executionId;
    putText(entity, 'event', text);
    try {
      await this.inbox.createEntity(entity);
      return true;
    } catch (err) {
      if (isStatus(err, 409)) return false;
      throw err;
    }
  }

  async hasInbox(instanceId: string, key: string): Promise<boolean> {
    try {
      await this.inbox.getEntity(instanceId, key, { queryOptions: { select: ['consumed'] } });
      return true;
    } catch (err) {
      if (isStatus(err, 404)) return false;
      throw err;
    }
  }

  async newInbox(instanceId: string): Promise<InboxRow[]> {
    const rows = await listAll(
      this.inbox,
      `PartitionKey eq ${odataString(instanceId)} and consumed eq false`,
    );
    const result = rows.map((r) => ({
      key: r.rowKey!,
      executionId: typeof r.executionId === 'string' ? r.executionId : undefined,
      arrivedAt: String(r.arrivedAt),
      consumed: false,
      event: JSON.parse(getText(r, 'event') ?? 'null') as HistoryEvent,
    }));
    result.sort((a, b) =>
      a.arrivedAt < b.arrivedAt ? -1 : a.arrivedAt > b.arrivedAt ? 1 : a.key < b.key ? -1 : 1,
    );
    return result;
  }

  async markConsumed(instanceId: string, keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += 100) {
      const batch = keys
        .slice(i, i + 100)
        .map(
          (rowKey) =>
            ['update', { partitionKey: instanceId, rowKey, consumed: true }, 'Merge'] as [
              'update',
              Entity,
              'Merge',
            ],
        );
      try {
        await this.inbox.submitTransaction(batch);
      } catch (err) {
        if (!isStatus(err, 404)) throw err;
        // A row was purged meanwhile: flag the others one by one.
        for (const [, e] of batch) {
          await this.inbox.updateEntity(e, 'Merge').catch((e2) => {
            if (!isStatus(e2, 404)) throw e2;
          });
        }
      }
    }
  }

  async deleteInbox(instanceId: string): Promise<void> {
    await this.deleteRows(this.inbox, instanceId, `PartitionKey eq ${odataString(instanceId)}`);
  }
}

export function checkPayload(what: string, text: string | undefined, limit = PAYLOAD_LIMIT): void {
  if (text !== undefined && text.length > limit) {
    throw new PayloadTooLargeError(
      `${what} is ${text.length} characters of JSON; the local Durable engine stores at most ${limit}. ` +
        'Keep large data in blob storage and pass its name instead.',
    );
  }
}
