import { closeCommands, deleteCommands, issueQuiesce } from './commands';
import type { FailoverDeps } from './context';
import type {
  AbandonedFailover,
  AzureTarget,
  ChosenPoint,
  FailoverRecord,
  FailoverKind,
  FailoverState,
  MaterialisedDisk,
  RecoveryPointSelector,
  TargetMachine,
} from './model';
import {
  findRecoveryPoint,
  pendingChangeLogs,
  resolveRecoveryPoint,
  unappliedDisks,
  type ApplyTarget,
} from './recovery-point';
import {
  abandonedFailovers,
  beginFailover,
  deleteRecord,
  readRecord,
  releaseMachine,
  updateRecord,
  type BeginFailover,
} from './records';
import { isNotFound, listPartition, TABLES, type DiskEntity } from '../replication';
import type { WebhookAction } from './plan';

export interface MachineRef {
  machine: string;
  failoverId: string;
}

export interface ProgressInput extends MachineRef {
  state: FailoverState;
  point?: ChosenPoint;
  target?: TargetMachine | null;
}

export interface MaterialiseInput extends MachineRef {
  test: boolean;
  disk: { id: string; sizeBytes: number; snapshot: string };
  target?: AzureTarget;
}

export interface CreateTargetInput extends MachineRef {
  test: boolean;
  pointId: string;
  disks: MaterialisedDisk[];
  target?: AzureTarget;
}

export interface CleanupInput extends MachineRef {
  test: boolean;
  target?: AzureTarget;
}

export interface FailInput extends CleanupInput {
  step: string;
  message: string;
}

export interface WebhookInput {
  action: WebhookAction;
  /** What the default body carries. */
  context: { plan: string; run: string; group: string; step: string; test: boolean; operation?: 'failback' };
}

export interface WebhookResult {
  status: number;
  body: string;
}

/** A failover's disks: those of the chosen point, or all registered ones before a point is chosen. */
async function failoverDiskIds(deps: FailoverDeps, machine: string, failoverId: string): Promise<string[]> {
  const record = await readRecord(deps.tables, machine, failoverId);
  const registered = (
    await listPartition<DiskEntity>(await deps.replication.tables.get(TABLES.disks), machine)
  ).map((d) => d.rowKey);
  return [...new Set([...(record?.point?.disks.map((d) => d.id) ?? []), ...registered])];
}

/**
 * The activities of the failover and plan orchestrations, built over their dependencies (the
 * function app wires the real ones; tests may pass their own). Each is safe to run again: an
 * activity runs at least once.
 */
export function createFailoverActivities(deps: FailoverDeps) {
  return {
    /**
     * Claims the machine (409 when another failover holds it) and creates the record; with the
     * machine's abandoned failovers, for the orchestration to remove first.
     */
    beginFailover: async (
      input: BeginFailover,
    ): Promise<FailoverRecord & { abandoned: AbandonedFailover[] }> => ({
      ...(await beginFailover(deps.tables, input, deps.now())),
      abandoned: await abandonedFailovers(deps.tables, input.machine),
    }),

    recordProgress: async (input: ProgressInput): Promise<void> => {
      await updateRecord(
        deps.tables,
        input.machine,
        input.failoverId,
        { state: input.state, point: input.point, target: input.target },
        deps.now(),
      );
    },

    /** Writes the quiesce command the agent picks up through the proxy; returns the marker id. */
    requestQuiesce: async (input: MachineRef): Promise<string> =>
      (await issueQuiesce(deps.tables, input.machine, input.failoverId, deps.now())).markerId,

    /** The point with this id, once every disk has applied its marker; null before that. */
    findPoint: async (input: { machine: string; pointId: string }): Promise<ChosenPoint | null> =>
      (await findRecoveryPoint(deps.replication, input.machine, input.pointId))
        ? resolveRecoveryPoint(deps.replication, input.machine, { id: input.pointId })
        : null,

    /** What `latest` must wait for; nudges apply for every disk that has work. */
    pendingChangeLogs: async (input: { machine: string }): Promise<ApplyTarget[]> => {
      const targets = await pendingChangeLogs(deps.replication, input.machine);
      const behind = await unappliedDisks(deps.replication, input.machine, targets);
      for (const b of behind) {
        const t = targets.find((x) => x.disk === b.disk)!;
        await deps.replication.nudge({
          machine: input.machine,
          disk: b.disk,
          epoch: t.epoch,
          seq: b.appliedSeq + 1,
        });
      }
      return targets;
    },

    unappliedDisks: async (input: { machine: string; targets: ApplyTarget[] }) =>
      unappliedDisks(deps.replication, input.machine, input.targets),

    resolvePoint: async (input: { machine: string; selector: RecoveryPointSelector }): Promise<ChosenPoint> =>
      resolveRecoveryPoint(deps.replication, input.machine, input.selector),

    materialiseDisk: async (input: MaterialiseInput): Promise<MaterialisedDisk> =>
      deps.compute.materialiseDisk(input),

    createTarget: async (input: CreateTargetInput): Promise<TargetMachine> =>
      deps.compute.createTarget(input),

    /** Removes the target and disks of a failover (before a change of point, or on failure). */
    removeTarget: async (input: CleanupInput): Promise<string[]> =>
      deps.compute.cleanup({
        ...input,
        diskIds: await failoverDiskIds(deps, input.machine, input.failoverId),
      }),

    /** The failover reached its target: failed-over; a planned failover's command is done. */
    completeFailover: async (
      input: MachineRef & { point: ChosenPoint; target: TargetMachine },
    ): Promise<void> => {
      await updateRecord(
        deps.tables,
        input.machine,
        input.failoverId,
        { state: 'failed-over', point: input.point, target: input.target },
        deps.now(),
      );
      await closeCommands(deps.tables, input.machine, input.failoverId, 'done', deps.now());
    },

    /** A step failed: remove what the failover created, record why, free the machine. */
    failFailover: async (input: FailInput): Promise<string[]> => {
      const deleted = await deps.compute.cleanup({
        ...input,
        diskIds: await failoverDiskIds(deps, input.machine, input.failoverId),
      });
      await closeCommands(deps.tables, input.machine, input.failoverId, 'superseded', deps.now());
      try {
        await updateRecord(
          deps.tables,
          input.machine,
          input.failoverId,
          { state: 'failed', target: null, error: { step: input.step, message: input.message } },
          deps.now(),
        );
      } catch (err) {
        // No record: the failover never claimed the machine (another one holds it).
        if (!isNotFound(err)) throw err;
      }
      await releaseMachine(deps.tables, input.machine, input.failoverId);
      return deleted;
    },

    commitFailover: async (input: MachineRef): Promise<void> => {
      const now = deps.now();
      await updateRecord(
        deps.tables,
        input.machine,
        input.failoverId,
        { state: 'committed', committedAt: now.toISOString() },
        now,
      );
    },

    /** Cancel: removes every blob and record the failover created, and frees the machine. */
    cancelFailover: async (input: CleanupInput): Promise<string[]> => {
      const deleted = await deps.compute.cleanup({
        ...input,
        diskIds: await failoverDiskIds(deps, input.machine, input.failoverId),
      });
      deleted.push(...(await deleteCommands(deps.tables, input.machine, input.failoverId)));
      if (await deleteRecord(deps.tables, input.machine, input.failoverId)) {
        deleted.push(`failovers/${input.machine}/${input.failoverId}`);
      }
      if (await releaseMachine(deps.tables, input.machine, input.failoverId)) {
        deleted.push(`failovers/${input.machine}/active`);
      }
      return deleted;
    },

    /** One attempt of a webhook step; a non-2xx answer or a timeout fails it (the orchestration retries). */
    callWebhook: async (input: WebhookInput): Promise<WebhookResult> => {
      const { action, context } = input;
      const body = action.method === 'GET' ? undefined : JSON.stringify(action.body ?? context);
      let response: Response;
      try {
        response = await deps.fetch(action.url, {
          method: action.method,
          headers: {
            'content-type': 'application/json',
            // A plan's actions run again in its failback: a script can tell which way it runs.
            'x-lifeboat-operation': context.operation ?? 'failover',
            ...action.headers,
          },
          body,
          signal: AbortSignal.timeout(action.timeoutSeconds * 1000),
        });
      } catch (err) {
        const e = err as Error;
        const why =
          e.name === 'TimeoutError'
            ? `did not answer within ${action.timeoutSeconds} s`
            : `could not be reached (${e.message})`;
        throw new Error(`webhook ${action.name} (${action.method} ${action.url}) ${why}`);
      }
      const text = (await response.text()).slice(0, 500);
      if (!response.ok) {
        throw new Error(
          `webhook ${action.name} (${action.method} ${action.url}) answered ${response.status} ${response.statusText}${text ? `: ${text}` : ''}`,
        );
      }
      return { status: response.status, body: text };
    },
  };
}

export type FailoverActivities = ReturnType<typeof createFailoverActivities>;
export type { ApplyTarget, BeginFailover, FailoverKind };
