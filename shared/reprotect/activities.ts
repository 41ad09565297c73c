import type { ProtectionDeps } from './context';
import { completeResync, issueResync, resyncProgress, type ResyncDiskPlan, type ResyncRun } from './resync';

/**
 * The activities of the resync, reprotect and failback orchestrations, built over their
 * dependencies (the function app wires the real ones). Each is safe to run again.
 */
export function createProtectionActivities(deps: ProtectionDeps) {
  return {
    issueResync: (run: ResyncRun) => issueResync(deps, run),
    resyncProgress: (input: { machine: string; operationId: string; plans: ResyncDiskPlan[]; startedAt: string }) =>
      resyncProgress(deps, input),
    completeResync: (input: { machine: string; operationId: string; ok: boolean; message?: string }) => completeResync(deps, input),
  };
}

export type ProtectionActivities = ReturnType<typeof createProtectionActivities>;
