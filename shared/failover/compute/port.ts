import type { AzureTarget, MaterialisedDisk, TargetMachine } from '../model';

export interface MaterialiseRequest {
  machine: string;
  failoverId: string;
  test: boolean;
  disk: { id: string; sizeBytes: number; snapshot: string };
  target?: AzureTarget;
}

export interface CreateTargetRequest {
  machine: string;
  failoverId: string;
  test: boolean;
  pointId: string;
  disks: MaterialisedDisk[];
  target?: AzureTarget;
}

export interface CleanupRequest {
  machine: string;
  failoverId: string;
  test: boolean;
  diskIds: string[];
  target?: AzureTarget;
}

export interface StopRequest {
  machine: string;
  failoverId: string;
  test: boolean;
  target?: AzureTarget;
}

/**
 * Where failed-over machines run. Every call is idempotent (activities run at least once) and
 * every name it creates derives from the machine, the disk and the failover id, so `cleanup`
 * can remove all of it from those alone, whatever step a failover reached.
 */
export interface ComputeProvider {
  readonly kind: 'local' | 'azure';
  /** Makes a disk of the target from a seed snapshot (server-side). */
  materialiseDisk(request: MaterialiseRequest): Promise<MaterialisedDisk>;
  /** Creates (and starts) the target machine over the materialised disks. */
  createTarget(request: CreateTargetRequest): Promise<TargetMachine>;
  /** Removes everything the failover created; returns what it deleted. Missing things are fine. */
  cleanup(request: CleanupRequest): Promise<string[]>;
  /** Stops the target machine (failback): no more writes reach its disks once it is stopped. */
  stopTarget(request: StopRequest): Promise<void>;
  /** True once the target is stopped (or gone): every write it acknowledged is on its disks. */
  targetStopped(request: StopRequest): Promise<boolean>;
}

/** The name of a target machine: the source's own name, or an isolated one for a drill. */
export function targetName(machine: string, failoverId: string, test: boolean): string {
  return test ? `${machine}-test-${failoverId.slice(3)}` : machine;
}
