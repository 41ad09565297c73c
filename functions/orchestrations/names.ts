// Orchestration, activity and event names: the contract between starters, orchestrators and the
// activities they call. Constants, so a rename is one change.

export const ORCHESTRATION = {
  failover: 'failover',
  commit: 'failover-commit',
  cancel: 'failover-cancel',
  plan: 'recovery-plan',
} as const;

/** Activity names, keyed like the functions of createFailoverActivities. */
export const ACTIVITY = {
  beginFailover: 'failover-begin',
  recordProgress: 'failover-record-progress',
  requestQuiesce: 'failover-request-quiesce',
  findPoint: 'failover-find-point',
  pendingChangeLogs: 'failover-pending-changelogs',
  unappliedDisks: 'failover-unapplied-disks',
  resolvePoint: 'failover-resolve-point',
  materialiseDisk: 'failover-materialise-disk',
  createTarget: 'failover-create-target',
  removeTarget: 'failover-remove-target',
  completeFailover: 'failover-complete',
  failFailover: 'failover-fail',
  commitFailover: 'failover-commit-record',
  cancelFailover: 'failover-cancel-cleanup',
  callWebhook: 'plan-call-webhook',
} as const;

/** What a plan waits for: `waitingFor.event` in its custom status names the event to raise. */
export type PlanWait =
  | {
      type: 'manual';
      event: string;
      group: string;
      step: string;
      instructions: string;
      timeoutSeconds?: number;
    }
  | { type: 'decision'; event: string };

/** Group failover (functions/orchestrations/group-failover.ts): every member to one group point. */
export const GROUP_ORCHESTRATION = { failover: 'group-failover' } as const;
