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
  beginReprotect: 'reprotect-begin',
  siteChecksumsReady: 'reprotect-site-checksums-ready',
  reprotectPass: 'reprotect-pass',
  targetProgress: 'reprotect-target-progress',
  markProtecting: 'reprotect-mark-protecting',
  handOver: 'reprotect-hand-over',
  releaseMachine: 'protection-release-machine',
  handedOver: 'failback-handed-over',
  stopFailoverMachine: 'failback-stop-failover-machine',
  failoverMachineStopped: 'failback-failover-machine-stopped',
  verifySite: 'failback-verify-site',
  markFailedBack: 'failback-mark-failed-back',
  resumeForwardProtection: 'failback-resume-forward-protection',
  cleanUpFailback: 'failback-clean-up',
} as const satisfies Record<keyof ProtectionActivities, string>;

export const PROTECTION_ORCHESTRATION = {
  resync: 'resync',
  reprotect: 'reprotect',
  failback: 'failback',
  planFailback: 'recovery-plan-failback',
} as const;

/** The event POST …/failback raises on a running reprotect: stop between passes and hand over. */
export const FAILBACK_EVENT = 'failback';

let activities: ProtectionActivities | undefined;
const real = () => (activities ??= createProtectionActivities(defaultProtectionDeps()));

for (const key of Object.keys(PROTECTION_ACTIVITY) as (keyof typeof PROTECTION_ACTIVITY)[]) {
  df.app.activity(PROTECTION_ACTIVITY[key], {
    handler: (input: unknown) => (real()[key] as (input: unknown) => Promise<unknown>)(input),
  });
}
