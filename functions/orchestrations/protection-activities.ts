import * as df from 'durable-functions';
import {
  createProtectionActivities,
  defaultProtectionDeps,
  type ProtectionActivities,
} from '../../shared/reprotect';

// The resync, reprotect and failback activities, wired to the process's dependencies on first use.

export const PROTECTION_ACTIVITY = {
  issueResync: 'resync-issue',
  resyncProgress: 'resync-progress',
  completeResync: 'resync-complete',
} as const satisfies Record<keyof ProtectionActivities, string>;

export const PROTECTION_ORCHESTRATION = {
  resync: 'resync',
  reprotect: 'reprotect',
  failback: 'failback',
} as const;

let activities: ProtectionActivities | undefined;
const real = () => (activities ??= createProtectionActivities(defaultProtectionDeps()));

for (const key of Object.keys(PROTECTION_ACTIVITY) as (keyof typeof PROTECTION_ACTIVITY)[]) {
  df.app.activity(PROTECTION_ACTIVITY[key], {
    handler: (input: unknown) => (real()[key] as (input: unknown) => Promise<unknown>)(input),
  });
}
