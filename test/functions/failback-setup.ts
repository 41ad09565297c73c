import fs from 'node:fs';
import path from 'node:path';
import { expect } from 'vitest';
import { ReprotectTargetRunner } from '../../agent/target/reprotect-target';
import { failoverDiskName, type FailoverDeps } from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { pendingResyncCommands, type ProtectionDeps } from '../../shared/reprotect';
import { waitFor } from '../helpers/host';
import { ship, SourceMachine, waitForOperation, waitForPoint, type Api } from '../shared/failover/helpers';
import { quietLogger, type TestDeps } from '../shared/replication/helpers';

// The way to a reprotected machine, shared by the plan failback tests: protect (a point m1; the
// site disks hold later writes the cloud never saw), fail over to m1 and commit, write on the
// failover disks (mirrored in a model), run the site's target in process.

const KiB = 1024;

export interface HomeMachine {
  name: string;
  disks: { id: string; sizeBytes: number }[];
  failoverId: string;
  /** The failed-over machine's disks: what the site must hold after failback. */
  cloud: Map<string, Buffer>;
  sitePath: (disk: string) => string;
}

export interface FailbackWorld {
  api: Api;
  replication: TestDeps;
  sender: MessageSender;
  failover: FailoverDeps;
  protection: ProtectionDeps;
  dir: string;
}

const finished = (o: { status: string }) => o.status !== 'Running' && o.status !== 'Pending';

/** Registers, protects to m1, fails over to m1 and commits each machine. */
export async function protectAndFailOver(
  w: FailbackWorld,
  machines: { name: string; disks: { id: string; sizeBytes: number }[] }[],
  seed: number,
): Promise<HomeMachine[]> {
  const out: HomeMachine[] = [];
  for (const [i, m] of machines.entries()) {
    expect((await w.api('PUT', `machines/${m.name}`, { disks: m.disks })).status).toBe(201);
    const source = new SourceMachine(m.name, m.disks, seed + i);
    source.randomWrites(30, 32 * KiB);
    source.marker('m1', 'crash');
    await ship(w.replication, w.sender, source.cut());
    await waitForPoint(w.api, m.name, 'm1');
    source.randomWrites(10, 32 * KiB);
    const sitePath = (disk: string) => path.join(w.dir, `${m.name}-${disk}.img`);
    for (const d of m.disks) fs.writeFileSync(sitePath(d.id), source.images.get(d.id)!);
    const fo = await w.api('POST', `machines/${m.name}/failover`, { recoveryPoint: 'm1' });
    expect(fo.status, JSON.stringify(fo.body)).toBe(202);
    expect((await waitForOperation(w.api, fo.body.operationId, finished)).status).toBe('Completed');
    const commit = await w.api('POST', `machines/${m.name}/commit`);
    expect((await waitForOperation(w.api, commit.body.operationId, finished)).status).toBe('Completed');
    out.push({
      ...m,
      failoverId: fo.body.failoverId,
      cloud: new Map(m.disks.map((d) => [d.id, Buffer.from(source.markers.get('m1')!.images.get(d.id)!)])),
      sitePath,
    });
  }
  return out;
}

/** Random page writes on each machine's failover disks, mirrored in its model. */
export async function writeFailedOver(
  w: FailbackWorld,
  machines: HomeMachine[],
  random: () => number,
  rounds: number,
): Promise<void> {
  for (const m of machines) {
    for (const d of m.disks) {
      const blob = w.failover.failoverDisks.getPageBlobClient(failoverDiskName(m.name, d.id, m.failoverId));
      for (let i = 0; i < rounds; i++) {
        const len = (1 + Math.floor(random() * 64)) * 512;
        const off = Math.floor(random() * ((d.sizeBytes - len) / 512)) * 512;
        const data = Buffer.alloc(len);
        for (let j = 0; j < len; j += 4) data.writeUInt32LE((random() * 2 ** 32) >>> 0, j);
        await blob.uploadPages(data, off, len);
        data.copy(m.cloud.get(d.id)!, off);
      }
    }
  }
}

/** The site's target role for a machine, in process (what `lifeboat target reprotect` runs). */
export function startTarget(w: FailbackWorld, m: HomeMachine): ReprotectTargetRunner {
  const runner = new ReprotectTargetRunner({
    container: w.protection.reprotect,
    keyRing: w.protection.failover.replication.keyRing(),
    tables: w.protection.tables,
    machine: m.name,
    disks: m.disks.map((d) => ({ id: d.id, path: m.sitePath(d.id) })),
    stateDir: path.join(w.dir, `state-${m.name}`),
    pollMs: 200,
    logger: quietLogger(),
  });
  runner.start();
  return runner;
}

/** Plays the site agent once the failback issued its forward resync: a marker in the new epoch. */
export async function resumeForward(w: FailbackWorld, m: HomeMachine, operationId: string): Promise<void> {
  const command = await waitFor(
    async () => {
      const o = await w.api('GET', `operations/${operationId}`);
      if (o.body.status === 'Failed') throw new Error(`operation ${operationId} failed: ${o.body.error}`);
      return (await pendingResyncCommands(w.failover.tables, m.name))[0];
    },
    `the forward resync command of ${m.name}`,
    45_000,
  );
  const epoch = command.disks[0].epoch;
  expect(command.disks).toEqual(m.disks.map((d) => ({ disk: d.id, epoch })));
  const home = new SourceMachine(m.name, m.disks, 60, epoch);
  for (const d of m.disks) fs.readFileSync(m.sitePath(d.id)).copy(home.images.get(d.id)!);
  home.marker(`home-${epoch}`, 'crash');
  await ship(w.replication, w.sender, home.cut());
}

/** Every site disk of the machine equals its model. */
export function expectSiteHome(m: HomeMachine): void {
  for (const d of m.disks)
    expect(fs.readFileSync(m.sitePath(d.id)).equals(m.cloud.get(d.id)!), `site ${m.name}/${d.id}`).toBe(true);
}
