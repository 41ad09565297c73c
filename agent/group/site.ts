import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import { SETTING, type Settings } from '../../shared/config';
import { ensureError } from '../../shared/errors';
import { GROUP_TABLES, readGroupsTable, type Group } from '../../shared/groups';
import { createLogger } from '../../shared/logger';
import { raiseEvent, ReplicationTables, type EventType } from '../../shared/replication';
import { StorageClients } from '../../shared/storage';
import { GroupCoordinator, type GroupMarkerResult } from './coordinator';
import { BarrierHub, type Authorize } from './transport';

/*
 * The group coordinators of a site, run by the proxy (docs/groups.md): one BarrierHub and one
 * GroupCoordinator per group in the cloud's `groups` table (read every refreshMs), markers on the
 * group policy's intervals, and an event in the cloud's `events` table when a marker is aborted,
 * naming the slow or refusing members. The proxy mounts `owns`/`handle` ahead of its own routes
 * (long polls must not count against its request limit).
 *
 * Several proxies may serve a site and every one reads the table; a proxy runs a group's markers
 * only while a member has polled it within ACTIVE_MS, so only the proxy the members use
 * coordinates (members of one group must use the same proxy).
 */

const ACTIVE_MS = 120_000;

/** Where the site's groups come from: the `groups` table, or a list in tests. */
export type GroupSource = () => Promise<Pick<Group, 'name' | 'members' | 'policy'>[]>;

/** Where abort events go (the cloud `events` table by default). */
export type GroupEventSink = (event: GroupAbortEvent) => Promise<void>;

export interface GroupAbortEvent {
  group: string;
  markerId: string;
  /** The members the abort names (slow or refusing). */
  members: string[];
  message: string;
  time: Date;
}

/** The event type of an aborted group marker in GET /api/events. */
export const GROUP_MARKER_ABORTED = 'group-marker-aborted';

export interface SiteGroupsOptions {
  groups: GroupSource;
  authorize: Authorize;
  events?: GroupEventSink;
  /** How often the group list is read again (default 30 s). */
  refreshMs?: number;
  logger?: Logger;
}

interface Running {
  hub: BarrierHub;
  coordinator: GroupCoordinator;
  policyKey: string;
  membersKey: string;
  /** The culprits of the last abort, to raise one event per change rather than per marker. */
  lastCulprits: string;
}

export class SiteGroups {
  private readonly running = new Map<string, Running>();
  private readonly log: Logger;
  private timer: NodeJS.Timeout | undefined;
  private refreshing: Promise<void> = Promise.resolve();
  private lastError = '';

  constructor(private readonly options: SiteGroupsOptions) {
    this.log = options.logger ?? createLogger('group');
  }

  /**
   * The proxy's groups from its settings: ReplicaStorage's `groups` table (read) and `events`
   * table (add). Undefined when ReplicaStorage is not configured.
   */
  static fromSettings(settings: Settings, authorize: Authorize, logger?: Logger): SiteGroups | undefined {
    let storage: StorageClients;
    try {
      storage = new StorageClients(SETTING.replicaStorage, settings);
    } catch {
      return undefined;
    }
    const table = storage.table(GROUP_TABLES.groups);
    const tables = new ReplicationTables(storage);
    return new SiteGroups({
      groups: () => readGroupsTable(table),
      authorize,
      events: (e) => recordAbort(tables, e),
      logger,
    });
  }

  start(): void {
    if (this.timer) return;
    void this.refresh();
    this.timer = setInterval(() => void this.refresh(), this.options.refreshMs ?? 30_000);
    this.timer.unref();
  }

  /** The coordinator of a group (after a refresh), for status and tests. */
  coordinator(group: string): GroupCoordinator | undefined {
    return this.running.get(group)?.coordinator;
  }

  /** Reads the group list and starts, updates or stops coordinators to match. */
  refresh(): Promise<void> {
    this.refreshing = this.refreshing.then(() => this.sync()).catch(() => undefined);
    return this.refreshing;
  }

  private async sync(): Promise<void> {
    let groups: Awaited<ReturnType<GroupSource>>;
    try {
      groups = await this.options.groups();
      this.lastError = '';
    } catch (err) {
      const message = ensureError(err).message.split('\n')[0];
      if (message !== this.lastError)
        this.log.warn(
          { err: message },
          'cannot read the replication groups; group markers keep their last settings',
        );
      this.lastError = message;
      return;
    }
    const seen = new Set<string>();
    for (const g of groups) {
      seen.add(g.name);
      const policyKey = JSON.stringify(g.policy);
      const membersKey = [...g.members].sort().join(',');
      let r = this.running.get(g.name);
      if (r && r.policyKey !== policyKey) {
        await r.coordinator.stop();
        r.coordinator = this.coordinate(g, r.hub);
        r.policyKey = policyKey;
        r.membersKey = membersKey;
      } else if (r && r.membersKey !== membersKey) {
        r.coordinator.setMembers(g.members.map((m) => r!.hub.link(m)));
        r.membersKey = membersKey;
      } else if (!r) {
        const hub = new BarrierHub(g.name, this.options.authorize, this.log);
        r = { hub, coordinator: this.coordinate(g, hub), policyKey, membersKey, lastCulprits: '' };
        this.running.set(g.name, r);
      }
    }
    for (const [name, r] of this.running) {
      if (seen.has(name)) continue;
      this.running.delete(name);
      r.hub.close();
      await r.coordinator.stop();
    }
  }

  private coordinate(g: Pick<Group, 'name' | 'members' | 'policy'>, hub: BarrierHub): GroupCoordinator {
    const coordinator = new GroupCoordinator({
      group: g.name,
      members: g.members.map((m) => hub.link(m)),
      prepareTimeoutMs: g.policy.prepareTimeoutMs,
      logger: this.log,
      // Only the proxy the members poll coordinates.
      shouldRun: () => Object.values(hub.lastSeen()).some((t) => Date.now() - t < ACTIVE_MS),
    });
    coordinator.on('committed', () => {
      const r = this.running.get(g.name);
      if (r) r.lastCulprits = '';
    });
    coordinator.on('aborted', (result: GroupMarkerResult & { message: string }) => {
      const members = [...result.slow, ...result.refused.map((x) => x.machine)].sort();
      const r = this.running.get(g.name);
      const key = members.join(',');
      if (members.length === 0 || !r || r.lastCulprits === key) return;
      r.lastCulprits = key;
      const event: GroupAbortEvent = {
        group: g.name,
        markerId: result.markerId,
        members,
        message: result.message,
        time: new Date(result.time),
      };
      this.options
        .events?.(event)
        .catch((err) =>
          this.log.warn(
            { err: ensureError(err).message, marker: result.markerId },
            'cannot record the group marker event',
          ),
        );
    });
    coordinator.schedule(g.policy.crashConsistentIntervalSeconds, g.policy.appConsistentIntervalMinutes * 60);
    return coordinator;
  }

  /** Whether a request is a group route (/v1/groups/…). */
  owns(url: string | undefined): boolean {
    return (url ?? '').startsWith('/v1/groups/');
  }

  /** Serves a group route: the group's hub, or 404 naming the groups this proxy coordinates. */
  async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const group = (req.url ?? '').split('?')[0].split('/')[3] ?? '';
    const r = this.running.get(group);
    if (r && (await r.hub.handle(req, res))) return;
    req.resume();
    res.writeHead(404, { 'content-type': 'application/json' });
    res.end(
      JSON.stringify({
        error: {
          code: 'NotFound',
          message: `This proxy coordinates no replication group ${JSON.stringify(group)} (it reads the groups table every ${Math.round((this.options.refreshMs ?? 30_000) / 1000)} s; create the group with PUT /api/groups/${group}).`,
          target: 'group',
        },
      }),
    );
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.refreshing;
    for (const r of this.running.values()) {
      r.hub.close();
      await r.coordinator.stop();
    }
    this.running.clear();
  }
}

/**
 * One warning event per member the abort names, in the cloud `events` table (the proxy identity
 * may only add rows there). The id is the marker's and the member's, so a retry adds nothing.
 */
export async function recordAbort(tables: ReplicationTables, e: GroupAbortEvent): Promise<void> {
  for (const machine of e.members) {
    await raiseEvent(tables, {
      // Not in shared/replication's EventType union yet (docs/groups.md).
      type: GROUP_MARKER_ABORTED as EventType,
      severity: 'warning',
      machine,
      message: e.message,
      time: e.time,
      details: { group: e.group, markerId: e.markerId, members: e.members },
      id: `${e.markerId}-${machine}`,
    });
  }
}
