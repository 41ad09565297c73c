import { ConflictError } from '../errors';
import { readRecord, releaseMachine as releaseFailover, updateRecord } from '../failover';
import {
  discardChecksumIndex,
  isPreconditionFailed,
  readEntity,
  SeedLease,
  seedBlob,
  TABLES,
  type DiskEntity,
} from '../replication';
import { pageBlobChecksums } from './changes';
import type { ProtectionDeps } from './context';
import { failoverDiskBlob, type PassResult, type ReprotectDisk } from './passes';
import type { ReprotectEntity } from './reprotect';
import { issueResync, type ResyncDiskPlan } from './resync';
import { readSiteChecksums } from './ship';
import { ACTIVE_ROW, claimMachine, REPROTECT_ROW, type ActiveEntity } from './tables';

// Failback, the cloud side: take over from the reprotect loop, stop the failover machine, ship the
// last changes, verify the site against the final snapshot, and resume forward protection from
// the site in a new epoch whose seed is the final snapshot (a server-side copy), so the agent's
// checksum resync finds nothing to ship. docs/reprotect.md.

export interface FailbackRun {
  machine: string;
  operationId: string;
  failoverId: string;
  /** The reprotect epoch (of the change logs the target applies). */
  epoch: number;
  disks: ReprotectDisk[];
  /** Delete the failover machine and its disks once the site is verified (default true). */
  cleanup: boolean;
  /** Wait for the reprotect loop to hand over (it was running when failback was asked). */
  waitForHandover: boolean;
  /** How long to wait for the target, and then for forward protection to resume. */
  waitSeconds: number;
  /**
   * How long to wait for the agent's first marker of the new epoch (default `waitSeconds`). A plan
   * passes 0: the site machine may only start once the plan is done, so the plan waits instead.
   */
  forwardWaitSeconds?: number;
  /** Under a plan's failback (its run id): a failure is returned, not thrown, so the plan reports every machine. */
  planRun?: string;
}

/** What a failback under a plan returns (the per-machine failback throws its failure instead). */
export type FailbackOutcome =
  | {
      ok: true;
      machine: string;
      operationId: string;
      failoverId: string;
      state: 'failed-back';
      siteReady: true;
      forwardProtection: 'protected' | 'waiting-for-agent';
      epochs: Record<string, number>;
      /** The forward-protection epochs and baselines (for resyncProgress). */
      forwardPlans: ResyncDiskPlan[];
      forwardStartedAt: string;
      deleted: string[];
    }
  | {
      ok: false;
      machine: string;
      operationId: string;
      failoverId: string;
      step: string;
      message: string;
      siteReady: boolean;
    };

/**
 * The synchronous half of POST …/failback, after the 409 checks: asks the reprotect loop to stop
 * (the row's `failbackOperationId`, ETag-checked so two failbacks cannot both start) and moves the
 * machine's claim from the reprotect to this failback.
 */
export async function requestFailback(
  deps: ProtectionDeps,
  row: ReprotectEntity & { etag: string },
  operationId: string,
): Promise<void> {
  const table = await deps.tables.get();
  const machine = row.partitionKey;
  try {
    await table.updateEntity(
      {
        partitionKey: machine,
        rowKey: REPROTECT_ROW,
        state: 'failing-back',
        failbackOperationId: operationId,
      },
      'Merge',
      { etag: row.etag },
    );
  } catch (err) {
    if (!isPreconditionFailed(err)) throw err;
    throw new ConflictError(
      `The reprotect of ${machine} changed while this failback was starting; read its state and retry.`,
      'machine',
      'OperationInProgress',
    );
  }
  const held = await readEntity<ActiveEntity>(table, machine, ACTIVE_ROW);
  if (!held) {
    await claimMachine(deps.tables, machine, 'failback', operationId, deps.now());
    return;
  }
  await table.updateEntity(
    {
      partitionKey: machine,
      rowKey: ACTIVE_ROW,
      kind: 'failback',
      operationId,
      startedAt: deps.now().toISOString(),
    },
    'Merge',
    { etag: held.etag },
  );
}

/** Whether the reprotect loop stopped for this failback. */
export async function handedOver(
  deps: ProtectionDeps,
  input: { machine: string; operationId: string },
): Promise<boolean> {
  const row = await readEntity<ReprotectEntity>(await deps.tables.get(), input.machine, REPROTECT_ROW);
  return row?.handedOverTo === input.operationId;
}

/**
 * Stops the failover machine through the compute provider. Locally: `running` false on its
 * target row, which makes its NBD export let its clients go. Azure: the VM is deallocated.
 */
export async function stopFailoverMachine(
  deps: ProtectionDeps,
  input: { machine: string; failoverId: string },
): Promise<void> {
  await updateRecord(
    deps.failover.tables,
    input.machine,
    input.failoverId,
    { state: 'failing-back' },
    deps.now(),
  );
  const record = await readRecord(deps.failover.tables, input.machine, input.failoverId);
  await deps.failover.compute.stopTarget({
    machine: input.machine,
    failoverId: input.failoverId,
    test: false,
    ...(record?.targetSpec ? { target: record.targetSpec } : {}),
  });
}

/** True once the failover machine is stopped: every write it acknowledged is on its disks. */
export async function failoverMachineStopped(
  deps: ProtectionDeps,
  input: { machine: string; failoverId: string },
): Promise<boolean> {
  const record = await readRecord(deps.failover.tables, input.machine, input.failoverId);
  return deps.failover.compute.targetStopped({
    machine: input.machine,
    failoverId: input.failoverId,
    test: false,
    ...(record?.targetSpec ? { target: record.targetSpec } : {}),
  });
}

export interface SiteVerification {
  /** False while the target has not uploaded its checksums after the final pass. */
  ready: boolean;
  ok: boolean;
  disks: { disk: string; blocks: number; differing: number[] }[];
}

/** Compares the site disks' checksums after the final pass with the final snapshots'. */
export async function verifySite(
  deps: ProtectionDeps,
  input: { machine: string; failoverId: string; epoch: number; disks: ReprotectDisk[]; finals: PassResult[] },
): Promise<SiteVerification> {
  const out: SiteVerification = { ready: true, ok: true, disks: [] };
  for (const d of input.disks) {
    const final = input.finals.find((f) => f.disk === d.id)!;
    const site = await readSiteChecksums(deps.reprotect, deps.failover.replication.keyRing(), {
      machine: input.machine,
      disk: d.id,
      epoch: input.epoch,
      markerId: final.markerId,
    });
    if (!site) return { ready: false, ok: false, disks: [] };
    const cloud = await pageBlobChecksums(
      failoverDiskBlob(deps, input.machine, d.id, input.failoverId).withSnapshot(final.snapshot),
      d.sizeBytes,
    );
    const differing: number[] = [];
    for (let i = 0; i < Math.max(cloud.length, site.length); i++)
      if (!cloud[i] || !site[i] || !cloud[i].equals(site[i])) differing.push(i);
    if (differing.length > 0) out.ok = false;
    out.disks.push({ disk: d.id, blocks: cloud.length, differing: differing.slice(0, 20) });
  }
  return out;
}

/** The site holds the machine again: the failover record and the reprotect row say so. */
export async function markFailedBack(
  deps: ProtectionDeps,
  input: { machine: string; failoverId: string; operationId: string },
): Promise<void> {
  await updateRecord(
    deps.failover.tables,
    input.machine,
    input.failoverId,
    { state: 'failed-back' },
    deps.now(),
  );
  await (
    await deps.tables.get()
  ).updateEntity(
    {
      partitionKey: input.machine,
      rowKey: REPROTECT_ROW,
      state: 'failed-back',
      failedBackAt: deps.now().toISOString(),
    },
    'Merge',
  );
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/**
 * Seeds forward protection from the final snapshot: each disk's seed page blob becomes a
 * server-side copy of it (under the seed's lease, so no applier writes meanwhile), and the disk
 * row moves to the new epoch (cursor 0, initial-sync) the way apply moves it when an epoch's
 * seq 1 arrives, so nothing left of the old epoch is applied on top. Then the agent's resync
 * command for that epoch: its checksum pass against the seed finds the site disk equal.
 * Idempotent: the epochs are chosen once and kept on the reprotect row.
 */
export async function resumeForwardProtection(
  deps: ProtectionDeps,
  input: {
    machine: string;
    operationId: string;
    failoverId: string;
    disks: ReprotectDisk[];
    finals: PassResult[];
    waitSeconds: number;
  },
): Promise<ResyncDiskPlan[]> {
  const table = await deps.tables.get();
  const replication = deps.failover.replication;
  const disksTable = await replication.tables.get(TABLES.disks);
  const row = await readEntity<ReprotectEntity>(table, input.machine, REPROTECT_ROW);
  let plans: ResyncDiskPlan[];
  if (row?.forwardPlans) plans = JSON.parse(row.forwardPlans) as ResyncDiskPlan[];
  else {
    plans = [];
    for (const d of input.disks) {
      const disk = await readEntity<DiskEntity>(disksTable, input.machine, d.id);
      const epoch = disk?.epoch ?? 0;
      plans.push({
        disk: d.id,
        sizeBytes: d.sizeBytes,
        fromEpoch: epoch,
        targetEpoch: epoch + 1,
        baselineAppliedBytes: disk?.appliedBytes ?? 0,
      });
    }
    await table.updateEntity(
      { partitionKey: input.machine, rowKey: REPROTECT_ROW, forwardPlans: JSON.stringify(plans) },
      'Merge',
    );
  }
  for (const plan of plans) {
    const disk = await readEntity<DiskEntity>(disksTable, input.machine, plan.disk);
    if (disk && disk.epoch >= plan.targetEpoch) continue; // seeded by an earlier run
    const final = input.finals.find((f) => f.disk === plan.disk)!;
    const seed = seedBlob(replication.seed, input.machine, plan.disk);
    let lease: SeedLease | undefined;
    for (let i = 0; !lease; i++) {
      lease = await SeedLease.acquire(seed, replication.tuning.leaseSeconds);
      if (!lease) {
        if (i > 4 * replication.tuning.leaseSeconds)
          throw new Error(
            `The seed disk of ${input.machine}/${plan.disk} stays leased by an applier; retry later.`,
          );
        await sleep(500);
      }
    }
    try {
      const source = failoverDiskBlob(deps, input.machine, plan.disk, input.failoverId).withSnapshot(
        final.snapshot,
      );
      // The copy replaces the seed's bytes behind the applier's back: its checksum index goes first.
      await discardChecksumIndex(replication.seed, input.machine, plan.disk);
      const poller = await seed.beginCopyFromURL(source.url, {
        intervalInMs: 250,
        conditions: { leaseId: lease.leaseId },
      });
      const copied = await poller.pollUntilDone();
      if (copied.copyStatus !== undefined && copied.copyStatus !== 'success') {
        throw new Error(
          `The copy of the final snapshot of ${input.machine}/${plan.disk} to its seed disk ended ${copied.copyStatus}.`,
        );
      }
      await disksTable.updateEntity(
        {
          partitionKey: input.machine,
          rowKey: plan.disk,
          epoch: plan.targetEpoch,
          appliedSeq: 0,
          state: 'initial-sync',
          stateReason: `epoch ${plan.targetEpoch} seeded from the failback's final snapshot (failover ${input.failoverId})`,
          stateChangedAt: deps.now().toISOString(),
          applierLeaseId: lease.leaseId,
        },
        'Merge',
      );
    } finally {
      await lease.release();
    }
  }
  return issueResync(
    deps,
    {
      machine: input.machine,
      operationId: input.operationId,
      disks: plans.map((p) => p.disk),
      waitSeconds: input.waitSeconds,
    },
    plans,
  );
}

/**
 * Removes the failover machine and its disks (per option), the reprotect change logs of the
 * epoch, and frees the machine for a future failover. Returns what it deleted.
 */
export async function cleanUpFailback(
  deps: ProtectionDeps,
  input: { machine: string; failoverId: string; epoch: number; disks: ReprotectDisk[]; cleanup: boolean },
): Promise<string[]> {
  const deleted: string[] = [];
  if (input.cleanup) {
    const record = await readRecord(deps.failover.tables, input.machine, input.failoverId);
    deleted.push(
      ...(await deps.failover.compute.cleanup({
        machine: input.machine,
        failoverId: input.failoverId,
        test: false,
        diskIds: input.disks.map((d) => d.id),
        ...(record?.targetSpec ? { target: record.targetSpec } : {}),
      })),
    );
  }
  for (const d of input.disks) {
    for await (const blob of deps.reprotect.listBlobsFlat({
      prefix: `${input.machine}/${d.id}/${input.epoch}/`,
    })) {
      await deps.reprotect.getBlockBlobClient(blob.name).deleteIfExists();
    }
  }
  await releaseFailover(deps.failover.tables, input.machine, input.failoverId);
  return deleted;
}
