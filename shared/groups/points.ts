import type { TableClient } from '@azure/data-tables';
import { NotFoundError } from '../errors';
import { validateName } from '../names';
import {
  insertIfAbsent,
  isNotFound,
  listPartition,
  MACHINES_PARTITION,
  odataString,
  readEntity,
  recoveryPointKey,
  TABLES,
  type ArrivalEntity,
  type MachineEntity,
  type ReplicationTables,
} from '../replication';
import { SETTING } from '../config';
import { StorageClients } from '../storage';
import {
  applyMembership,
  currentMembers,
  membersAt,
  parseGroupRequest,
  type GroupPolicy,
  type Membership,
} from './model';

// Tables (ReplicaStorage), beside the replication tables:
//   groups       PK "groups"  RK {group}                     members, policy, membership history
//   grouppoints  PK {group}   RK {invertedTime}~{markerId}   a group recovery point (newest first)
export const GROUP_TABLES = { groups: 'groups', points: 'grouppoints' } as const;
const GROUPS_PARTITION = 'groups';

export interface GroupEntity {
  partitionKey: string;
  rowKey: string;
  /** JSON GroupPolicy */
  policy: string;
  /** JSON Membership[] */
  memberships: string;
  createdAt: string;
  updatedAt: string;
}

export interface GroupPointEntity {
  partitionKey: string;
  rowKey: string;
  markerId: string;
  consistency: 'crash' | 'app';
  sourceTime: number;
  createdAt: string;
  /** JSON: machine → { disk → snapshot } */
  members: string;
}

/** A group recovery point: every disk of every member (at the marker) applied the marker. */
export interface GroupRecoveryPoint {
  id: string;
  type: 'group-crash-consistent' | 'group-app-consistent';
  sourceTime: string;
  createdAt: string;
  /** Per member: its own recovery point at the marker (the id is the marker id). */
  members: { machine: string; recoveryPoint: string; disks: { id: string; snapshot: string }[] }[];
}

export interface Group {
  name: string;
  members: string[];
  policy: GroupPolicy;
  memberships: Membership[];
  createdAt: string;
  updatedAt: string;
}

/** Where groups live: the replication tables (arrivals, machines) and the two group tables. */
export class GroupStore {
  private readonly created = new Map<string, Promise<unknown>>();

  constructor(
    readonly replication: ReplicationTables,
    private readonly table: (name: string) => TableClient,
  ) {}

  static fromSettings(
    replication: ReplicationTables,
    settings: Record<string, string | undefined> = process.env,
  ): GroupStore {
    const storage = new StorageClients(SETTING.replicaStorage, settings);
    return new GroupStore(replication, (n) => storage.table(n));
  }

  async get(name: string): Promise<TableClient> {
    const client = this.table(name);
    let p = this.created.get(name);
    if (!p) {
      p = client.createTable().catch((err) => {
        this.created.delete(name);
        throw err;
      });
      this.created.set(name, p);
    }
    await p;
    return client;
  }
}

function toGroup(e: GroupEntity): Group {
  const memberships = JSON.parse(e.memberships) as Membership[];
  return {
    name: e.rowKey,
    members: currentMembers(memberships),
    policy: JSON.parse(e.policy) as GroupPolicy,
    memberships,
    createdAt: e.createdAt,
    updatedAt: e.updatedAt,
  };
}

/** Creates or updates a group. Returns created = true on first PUT. */
export async function putGroup(
  store: GroupStore,
  name: string,
  body: unknown,
  now = new Date(),
): Promise<{ created: boolean; group: Group }> {
  validateName(name, 'group');
  const request = parseGroupRequest(body);
  const table = await store.get(GROUP_TABLES.groups);
  const existing = await readEntity<GroupEntity>(table, GROUPS_PARTITION, name);
  const history = existing ? (JSON.parse(existing.memberships) as Membership[]) : [];
  const entity: GroupEntity = {
    partitionKey: GROUPS_PARTITION,
    rowKey: name,
    policy: JSON.stringify(request.policy),
    memberships: JSON.stringify(applyMembership(history, request.members, now.getTime())),
    createdAt: existing?.createdAt ?? now.toISOString(),
    updatedAt: now.toISOString(),
  };
  if (existing) await table.updateEntity(entity, 'Replace', { etag: existing.etag });
  else if (!(await insertIfAbsent(table, entity))) return putGroup(store, name, body, now);
  return { created: !existing, group: toGroup(entity) };
}

export async function readGroup(store: GroupStore, name: string): Promise<Group> {
  validateName(name, 'group');
  const e = await readEntity<GroupEntity>(await store.get(GROUP_TABLES.groups), GROUPS_PARTITION, name);
  if (!e)
    throw new NotFoundError(
      `There is no replication group ${name}; create it with PUT /api/groups/${name}.`,
      'group',
    );
  return toGroup(e);
}

export async function listGroups(store: GroupStore): Promise<Group[]> {
  return (await listPartition<GroupEntity>(await store.get(GROUP_TABLES.groups), GROUPS_PARTITION)).map(
    toGroup,
  );
}

/**
 * The groups as a site proxy reads them (it may only read the table: no table creation). None
 * while the table does not exist yet.
 */
export async function readGroupsTable(table: TableClient): Promise<Group[]> {
  try {
    return (await listPartition<GroupEntity>(table, GROUPS_PARTITION)).map(toGroup);
  } catch (err) {
    if (isNotFound(err)) return [];
    throw err;
  }
}

function toPoint(e: GroupPointEntity): GroupRecoveryPoint {
  const members = JSON.parse(e.members) as Record<string, Record<string, string>>;
  return {
    id: e.markerId,
    type: e.consistency === 'app' ? 'group-app-consistent' : 'group-crash-consistent',
    sourceTime: new Date(e.sourceTime).toISOString(),
    createdAt: e.createdAt,
    members: Object.entries(members).map(([machine, disks]) => ({
      machine,
      recoveryPoint: e.markerId,
      disks: Object.entries(disks).map(([id, snapshot]) => ({ id, snapshot })),
    })),
  };
}

const TAG = /^group=([a-z0-9-]+);consistency=(crash|app)$/;

/**
 * Records the group points that became complete: from the per-disk marker arrivals the apply
 * function records, a group marker (kind 'group', tag naming this group) is a point once every
 * disk of every machine that was a member at the marker's time has arrived there. Looks only at
 * markers no older than the newest recorded point: disks apply in order, so once a newer marker
 * is complete everywhere, an older incomplete one (an aborted or half-cut marker) never will be.
 */
export async function refreshGroupPoints(
  store: GroupStore,
  group: string,
  now = new Date(),
): Promise<GroupRecoveryPoint[]> {
  const g = await readGroup(store, group);
  const pointsTable = await store.get(GROUP_TABLES.points);
  const newest = await newestPoint(pointsTable, group);
  const arrivalsTable = await store.replication.get(TABLES.arrivals);
  const tag = (c: string) => odataString(`group=${group};consistency=${c}`);
  const filter = `kind eq 'group' and (tag eq ${tag('crash')} or tag eq ${tag('app')})${newest ? ` and sourceTime ge ${newest.sourceTime}` : ''}`;
  const byMarker = new Map<string, ArrivalEntity[]>();
  for await (const a of arrivalsTable.listEntities<ArrivalEntity>({ queryOptions: { filter } })) {
    let list = byMarker.get(a.markerId);
    if (!list) byMarker.set(a.markerId, (list = []));
    list.push(a);
  }
  const machinesTable = await store.replication.get(TABLES.machines);
  const disksOf = new Map<string, string[] | undefined>();
  const created: GroupRecoveryPoint[] = [];
  for (const [markerId, arrivals] of byMarker) {
    const time = arrivals[0].sourceTime;
    const members = membersAt(g.memberships, time);
    if (members.length === 0) continue;
    const snapshots: Record<string, Record<string, string>> = {};
    let complete = true;
    for (const m of members) {
      if (!disksOf.has(m)) {
        const row = await readEntity<MachineEntity>(machinesTable, MACHINES_PARTITION, m);
        disksOf.set(m, row ? (JSON.parse(row.diskIds) as string[]) : undefined);
      }
      const disks = disksOf.get(m);
      const mine = new Map(arrivals.filter((a) => a.partitionKey === m).map((a) => [a.disk, a.snapshot]));
      if (!disks || !disks.every((d) => mine.has(d))) {
        complete = false;
        break;
      }
      snapshots[m] = Object.fromEntries(disks.map((d) => [d, mine.get(d) as string]));
    }
    if (!complete) continue;
    const consistency = TAG.exec(arrivals[0].tag)?.[2] === 'app' ? 'app' : 'crash';
    const entity: GroupPointEntity = {
      partitionKey: group,
      rowKey: recoveryPointKey(time, markerId),
      markerId,
      consistency,
      sourceTime: time,
      createdAt: now.toISOString(),
      members: JSON.stringify(snapshots),
    };
    if (await insertIfAbsent(pointsTable, entity)) created.push(toPoint(entity));
  }
  return created;
}

async function newestPoint(table: TableClient, group: string): Promise<GroupPointEntity | undefined> {
  for await (const page of table
    .listEntities<GroupPointEntity>({ queryOptions: { filter: `PartitionKey eq ${odataString(group)}` } })
    .byPage({ maxPageSize: 1 })) {
    if (page.length > 0) return page[0];
  }
  return undefined;
}

/** The group's recovery points, newest first (after recording any that became complete). */
export async function listGroupPoints(
  store: GroupStore,
  group: string,
  options: { type?: 'crash' | 'app'; top?: number } = {},
): Promise<GroupRecoveryPoint[]> {
  await refreshGroupPoints(store, group);
  const rows = await listPartition<GroupPointEntity>(await store.get(GROUP_TABLES.points), group);
  return rows
    .filter((r) => !options.type || r.consistency === options.type)
    .sort((a, b) => (a.rowKey < b.rowKey ? -1 : a.rowKey > b.rowKey ? 1 : 0))
    .slice(0, options.top ?? 100)
    .map(toPoint);
}

/** Resolves `latest-group-processed`, `latest-group-app-consistent` or a point id. */
export async function resolveGroupPoint(
  store: GroupStore,
  group: string,
  which: string,
): Promise<GroupRecoveryPoint> {
  const points = await listGroupPoints(store, group, { top: 1000 });
  const point =
    which === 'latest-group-processed'
      ? points[0]
      : which === 'latest-group-app-consistent'
        ? points.find((p) => p.type === 'group-app-consistent')
        : points.find((p) => p.id === which);
  if (!point) {
    throw new NotFoundError(
      `Group ${group} has no recovery point ${JSON.stringify(which)}; use latest-group-processed, latest-group-app-consistent or an id from GET /api/groups/${group}/recovery-points.`,
      'recoveryPoint',
    );
  }
  return point;
}
