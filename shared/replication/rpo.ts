import type { ReplicationDeps } from './context';
import { raiseEvent } from './events';
import { machineStatus } from './status';
import {
  isPreconditionFailed,
  listPartition,
  MACHINES_PARTITION,
  TABLES,
  type MachineEntity,
  type MachineHealth,
} from './tables';

export interface RpoCheck {
  machine: string;
  /** now − source time of the latest recovery point; null before the first one. */
  rpoSeconds: number | null;
  thresholdSeconds: number;
  breached: boolean;
  health: MachineHealth;
  backlogSegments: number;
  backlogBytes: number;
  /** The event this check raised, if the machine crossed its threshold either way. */
  event?: 'rpo-breached' | 'rpo-recovered';
}

function describeBacklog(segments: number, bytes: number, oldest?: string): string {
  if (segments === 0) return 'no change logs are waiting to be applied';
  return `${segments} change log(s) (${(bytes / 1048576).toFixed(1)} MiB) wait to be applied${oldest ? `, the oldest since ${oldest}` : ''}`;
}

/**
 * The RPO timer's work: for each machine (or only `options.machines`), the current RPO and apply backlog; an event when the
 * RPO passes the policy's threshold and another when it comes back under it. The transition is
 * written with an ETag check first, so two monitors racing raise each event once.
 */
export async function monitorRpo(
  deps: ReplicationDeps,
  now: Date,
  options: { machines?: readonly string[] } = {},
): Promise<RpoCheck[]> {
  const machines = await deps.tables.get(TABLES.machines);
  const rows = await listPartition<MachineEntity>(machines, MACHINES_PARTITION);
  const checks: RpoCheck[] = [];
  for (const row of rows) {
    if (typeof row.policy !== 'string') continue;
    if (options.machines && !options.machines.includes(row.rowKey)) continue;
    try {
      const status = await machineStatus(deps, row, now, { withBacklog: true });
      const backlog = status.backlog ?? { segments: 0, bytes: 0 };
      const check: RpoCheck = {
        machine: row.rowKey,
        rpoSeconds: status.rpo.seconds,
        thresholdSeconds: status.rpo.thresholdSeconds,
        breached: status.rpo.breached,
        health: status.health,
        backlogSegments: backlog.segments,
        backlogBytes: backlog.bytes,
      };
      const was = row.rpoBreached === true;
      const transitions = (row.rpoTransitions ?? 0) + (was !== check.breached ? 1 : 0);
      try {
        await machines.updateEntity(
          {
            partitionKey: MACHINES_PARTITION,
            rowKey: row.rowKey,
            rpoSeconds: check.rpoSeconds ?? -1,
            rpoBreached: check.breached,
            rpoCheckedAt: now.toISOString(),
            rpoTransitions: transitions,
            backlogSegments: backlog.segments,
            backlogBytes: backlog.bytes,
          },
          'Merge',
          { etag: row.etag },
        );
      } catch (err) {
        if (isPreconditionFailed(err)) {
          checks.push(check); // another monitor (or a registration) got there first; it raises the event
          continue;
        }
        throw err;
      }
      if (was !== check.breached) {
        check.event = check.breached ? 'rpo-breached' : 'rpo-recovered';
        const backlogText = describeBacklog(backlog.segments, backlog.bytes, backlog.oldestPendingAt);
        await raiseEvent(deps.tables, {
          id: `rpo-${row.rowKey}-${transitions}`,
          type: check.event,
          severity: check.breached ? 'error' : 'info',
          machine: row.rowKey,
          time: now,
          message: check.breached
            ? `Machine ${row.rowKey} has an RPO of ${check.rpoSeconds} s, above its threshold of ${check.thresholdSeconds} s: ` +
              `the latest recovery point is from ${status.latestRecoveryPoint?.sourceTime}; ${backlogText}.`
            : `Machine ${row.rowKey} is back within its RPO threshold of ${check.thresholdSeconds} s (RPO ${check.rpoSeconds} s).`,
          details: {
            rpoSeconds: check.rpoSeconds,
            thresholdSeconds: check.thresholdSeconds,
            backlogSegments: backlog.segments,
            backlogBytes: backlog.bytes,
          },
        });
        deps.log.warn(
          { machine: row.rowKey, rpoSeconds: check.rpoSeconds, event: check.event },
          'RPO threshold crossed',
        );
      }
      checks.push(check);
    } catch (err) {
      deps.log.error(
        { machine: row.rowKey, err: String(err) },
        'RPO check failed for a machine; the next run retries',
      );
    }
  }
  return checks;
}
