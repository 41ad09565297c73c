import { randomUUID } from 'node:crypto';
import type { ReplicationTables } from './tables';
import {
  EVENTS_PARTITION,
  insertIfAbsent,
  invertedTimeKey,
  odataString,
  TABLES,
  type EventEntity,
} from './tables';

/** The replication events an operator sees in `GET /api/events`. */
export type EventType =
  | 'machine-registered'
  | 'disk-added'
  | 'disk-resized'
  | 'segment-quarantined'
  | 'resync-required'
  | 'epoch-started'
  | 'rpo-breached'
  | 'rpo-recovered';

export interface ReplicationEvent {
  id: string;
  type: EventType;
  severity: 'info' | 'warning' | 'error';
  machine: string;
  disk?: string;
  message: string;
  time: string;
  details?: Record<string, unknown>;
}

export interface NewEvent {
  type: EventType;
  severity: ReplicationEvent['severity'];
  machine: string;
  disk?: string;
  message: string;
  time: Date;
  details?: Record<string, unknown>;
  /** A deterministic id makes raising the same event twice harmless. */
  id?: string;
}

/** Records an event; with the same id and time, a second call changes nothing. */
export async function raiseEvent(tables: ReplicationTables, event: NewEvent): Promise<ReplicationEvent> {
  const id = event.id ?? randomUUID();
  const entity: EventEntity = {
    partitionKey: EVENTS_PARTITION,
    rowKey: `${invertedTimeKey(event.time.getTime())}~${id}`,
    id,
    type: event.type,
    severity: event.severity,
    machine: event.machine,
    disk: event.disk,
    message: event.message,
    time: event.time.toISOString(),
    details: event.details ? JSON.stringify(event.details) : undefined,
  };
  await insertIfAbsent(await tables.get(TABLES.events), entity);
  return toEvent(entity);
}

function toEvent(e: EventEntity): ReplicationEvent {
  return {
    id: e.id,
    type: e.type as EventType,
    severity: e.severity,
    machine: e.machine,
    ...(e.disk ? { disk: e.disk } : {}),
    message: e.message,
    time: e.time,
    ...(e.details ? { details: JSON.parse(e.details) as Record<string, unknown> } : {}),
  };
}

export interface EventQuery {
  machine?: string;
  type?: string;
  top?: number;
  continuationToken?: string;
}

export interface Page<T> {
  value: T[];
  continuationToken?: string;
}

/** Events, newest first, optionally for one machine and/or of one type, a page at a time. */
export async function listEvents(
  tables: ReplicationTables,
  query: EventQuery = {},
): Promise<Page<ReplicationEvent>> {
  const table = await tables.get(TABLES.events);
  const clauses = [`PartitionKey eq ${odataString(EVENTS_PARTITION)}`];
  if (query.machine) clauses.push(`machine eq ${odataString(query.machine)}`);
  if (query.type) clauses.push(`type eq ${odataString(query.type)}`);
  const pages = table
    .listEntities<EventEntity>({ queryOptions: { filter: clauses.join(' and ') } })
    .byPage({ maxPageSize: query.top ?? 100, continuationToken: query.continuationToken });
  const first = await pages.next();
  if (first.done || !first.value) return { value: [] };
  const page = first.value as EventEntity[] & { continuationToken?: string };
  return { value: page.map(toEvent), continuationToken: page.continuationToken };
}
