import type { ProtectionDeps } from './context';
import {
  cleanUpFailback,
  failoverMachineStopped,
  handedOver,
  markFailedBack,
  resumeForwardProtection,
  stopFailoverMachine,
  verifySite,
} from './failback';
import {
  beginReprotect,
  handOver,
  markProtecting,
  runPass,
  siteChecksumsReady,
  targetProgress,
  type PassResult,
  type ReprotectDisk,
} from './passes';
import { completeResync, issueResync, resyncProgress, type ResyncDiskPlan, type ResyncRun } from './resync';
import { releaseMachine } from './tables';

/**
 * The activities of the resync, reprotect and failback orchestrations, built over their
 * dependencies (the function app wires the real ones). Each is safe to run again.
 */
export function createProtectionActivities(deps: ProtectionDeps) {
  return {
    issueResync: (run: ResyncRun) => issueResync(deps, run),
    resyncProgress: (input: {
      machine: string;
      operationId: string;
      plans: ResyncDiskPlan[];
      startedAt: string;
    }) => resyncProgress(deps, input),
    completeResync: (input: { machine: string; operationId: string; ok: boolean; message?: string }) =>
      completeResync(deps, input),

    beginReprotect: (input: { machine: string; operationId: string; failoverId: string }) =>
      beginReprotect(deps, input),
    siteChecksumsReady: (input: { machine: string; epoch: number; disks: ReprotectDisk[] }) =>
      siteChecksumsReady(deps, input),
    reprotectPass: (input: {
      machine: string;
      failoverId: string;
      epoch: number;
      disk: ReprotectDisk;
      pass: number;
      markerId: string;
    }) => runPass(deps, input),
    targetProgress: (input: {
      machine: string;
      epoch: number;
      passes: { disk: string; lastSeq: number }[];
    }) => targetProgress(deps, input),
    markProtecting: (input: { machine: string; operationId: string; failoverId: string }) =>
      markProtecting(deps, input),
    handOver: (input: { machine: string; operationId: string; failbackOperationId: string }) =>
      handOver(deps, input),
    releaseMachine: (input: { machine: string; operationId: string }) =>
      releaseMachine(deps.tables, input.machine, input.operationId),

    handedOver: (input: { machine: string; operationId: string }) => handedOver(deps, input),
    stopFailoverMachine: (input: { machine: string; failoverId: string }) => stopFailoverMachine(deps, input),
    failoverMachineStopped: (input: { machine: string; failoverId: string }) =>
      failoverMachineStopped(deps, input),
    verifySite: (input: {
      machine: string;
      failoverId: string;
      epoch: number;
      disks: ReprotectDisk[];
      finals: PassResult[];
    }) => verifySite(deps, input),
    markFailedBack: (input: { machine: string; failoverId: string; operationId: string }) =>
      markFailedBack(deps, input),
    resumeForwardProtection: (input: {
      machine: string;
      operationId: string;
      failoverId: string;
      disks: ReprotectDisk[];
      finals: PassResult[];
      waitSeconds: number;
    }) => resumeForwardProtection(deps, input),
    cleanUpFailback: (input: {
      machine: string;
      failoverId: string;
      epoch: number;
      disks: ReprotectDisk[];
      cleanup: boolean;
    }) => cleanUpFailback(deps, input),
  };
}

export type ProtectionActivities = ReturnType<typeof createProtectionActivities>;
