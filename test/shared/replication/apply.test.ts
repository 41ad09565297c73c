import { PageBlobClient } from '@azure/storage-blob';
import { describe, expect, inject, it } from 'vitest';
import { changelogBlobName } from '../../../shared/envelope';
import { waitFor } from '../../helpers/host';
import {
  applyChangelogs,
  ensureContainer,
  handleChangelogReady,
  listEvents,
  listRecoveryPoints,
  readEntity,
  registerMachine,
  seedBlob,
  TABLES,
  type ApplyReport,
  type DiskEntity,
} from '../../../shared/replication';
import {
  applyUntilIdle,
  uniqueMachine,
  generateWorkload,
  readWhole,
  rng,
  shuffle,
  testDeps,
  uploadSegment,
  type TestDeps,
  type Workload,
} from './helpers';

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;

async function register(deps: TestDeps, machine: string, disks: { id: string; sizeBytes: number }[]) {
  return registerMachine(deps, machine, { disks, policy: { crashConsistentIntervalSeconds: 10 } });
}

async function expectRecoveryPointsMatch(deps: TestDeps, workload: Workload, sizes: Map<string, number>) {
  const points = (await listRecoveryPoints(deps.tables, workload.machine, { top: 1000 })).value;
  expect(points.map((p) => p.id)).toEqual(workload.markers.map((m) => m.id).reverse());
  for (const point of points) {
    const marker = workload.markers.find((m) => m.id === point.id)!;
    expect(point.sourceTime).toBe(new Date(marker.time).toISOString());
    expect(point.type).toBe(marker.kind === 'app' ? 'app-consistent' : 'crash-consistent');
    for (const { id, snapshot } of point.disks) {
      const bytes = await readWhole(
        seedBlob(deps.seed, workload.machine, id).withSnapshot(snapshot),
        sizes.get(id)!,
      );
      expect(bytes.equals(marker.images.get(id)!), `disk ${id} at ${point.id}`).toBe(true);
    }
  }
}

describe('apply (in-process, against Azurite)', () => {
  it('applies a random two-disk workload: seeds equal the model, every recovery point equals the model at its marker', async () => {
    const deps = testDeps(connection, { openWorkers: 1 }); // change logs opened on a worker thread
    const machine = uniqueMachine('apply');
    const disks = [
      { id: 'd0', sizeBytes: 2 * MiB },
      { id: 'd1', sizeBytes: 3 * MiB },
    ];
    await register(deps, machine, disks);
    const workload = generateWorkload({ machine, disks, ops: 600, seed: 1, markerEvery: 80 });
    for (const [, segments] of workload.segments) for (const s of segments) await uploadSegment(deps, s);
    for (const d of disks) {
      const reports = await applyUntilIdle(deps, machine, d.id);
      expect(reports.at(-1)!.outcome).toBe('caught-up');
      expect(reports.at(-1)!.appliedSeq).toBe(workload.segments.get(d.id)!.length);
      expect(
        (await readWhole(seedBlob(deps.seed, machine, d.id), d.sizeBytes)).equals(workload.final.get(d.id)!),
      ).toBe(true);
    }
    await expectRecoveryPointsMatch(deps, workload, new Map(disks.map((d) => [d.id, d.sizeBytes])));
    const row = await readEntity<DiskEntity>(await deps.tables.get(TABLES.disks), machine, 'd0');
    expect(row!.state).toBe('protected');
    // Applied change logs are deleted (keepChangeLogsHours = 0), in the background.
    await waitFor(async () => {
      const left: string[] = [];
      for await (const b of deps.changelogs.listBlobsFlat({ prefix: `${machine}/` })) left.push(b.name);
      return left.length === 0 ? true : undefined;
    }, 'the applied change logs to be deleted');
  });

  it('stops at a gap and continues when the missing change log arrives; duplicates change nothing', async () => {
    const deps = testDeps(connection);
    const machine = uniqueMachine('gap');
    const disks = [{ id: 'd0', sizeBytes: 1 * MiB }];
    await register(deps, machine, disks);
    const workload = generateWorkload({
      machine,
      disks,
      ops: 300,
      seed: 2,
      recordsPerSegment: 10,
      markerEvery: 50,
    });
    const segments = workload.segments.get('d0')!;
    expect(segments.length).toBeGreaterThan(6);
    const random = rng(7);
    // Upload all but seq 3 in a shuffled order, applying in between.
    for (const s of shuffle(segments, random)) {
      if (s.header.seq === 3) continue;
      await uploadSegment(deps, s);
      await handleChangelogReady(deps, { machine, disk: 'd0', epoch: 1, seq: s.header.seq });
    }
    let report = await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(report).toMatchObject({ outcome: 'caught-up', appliedSeq: 2 });
    await uploadSegment(deps, segments[2]);
    report = (await applyUntilIdle(deps, machine, 'd0')).at(-1)!;
    expect(report).toMatchObject({ outcome: 'caught-up', appliedSeq: segments.length });
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), MiB)).equals(workload.final.get('d0')!)).toBe(
      true,
    );
    // A duplicate message and a re-uploaded old change log change nothing.
    await uploadSegment(deps, segments[0]);
    report = await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(report).toMatchObject({ outcome: 'caught-up', segments: 0 });
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), MiB)).equals(workload.final.get('d0')!)).toBe(
      true,
    );
    await expectRecoveryPointsMatch(deps, workload, new Map([['d0', MiB]]));
  });

  it('a run that dies mid-segment leaves work the next run redoes to the same bytes', async () => {
    const deps = testDeps(connection, { writeConcurrency: 2 });
    const machine = uniqueMachine('crash');
    const disks = [
      { id: 'd0', sizeBytes: 2 * MiB },
      { id: 'd1', sizeBytes: 2 * MiB },
    ];
    await register(deps, machine, disks);
    const workload = generateWorkload({
      machine,
      disks,
      ops: 400,
      seed: 3,
      recordsPerSegment: 60,
      markerEvery: 40,
    });
    for (const [, segments] of workload.segments) for (const s of segments) await uploadSegment(deps, s);
    // Page writes start failing after a few hundred, as if the process died mid-segment.
    const upload = PageBlobClient.prototype.uploadPages;
    for (const [i, cutAfter] of [37, 51, 25].entries()) {
      let calls = 0;
      PageBlobClient.prototype.uploadPages = function (
        this: PageBlobClient,
        ...args: Parameters<typeof upload>
      ) {
        if (++calls > cutAfter)
          return Promise.reject(Object.assign(new Error('killed'), { statusCode: 500 }));
        return upload.apply(this, args);
      };
      try {
        await expect(applyChangelogs(deps, { machine, disk: disks[i % 2].id })).rejects.toThrow('killed');
      } finally {
        PageBlobClient.prototype.uploadPages = upload;
      }
    }
    for (const d of disks) await applyUntilIdle(deps, machine, d.id);
    for (const d of disks) {
      expect(
        (await readWhole(seedBlob(deps.seed, machine, d.id), d.sizeBytes)).equals(workload.final.get(d.id)!),
      ).toBe(true);
    }
    await expectRecoveryPointsMatch(deps, workload, new Map(disks.map((d) => [d.id, d.sizeBytes])));
  });

  it('racing appliers on one disk: one holds the lease, the other backs off; the disk ends equal to the model', async () => {
    const deps = testDeps(connection, { writeConcurrency: 4 });
    const machine = uniqueMachine('race');
    const disks = [{ id: 'd0', sizeBytes: 2 * MiB }];
    await register(deps, machine, disks);
    const workload = generateWorkload({
      machine,
      disks,
      ops: 400,
      seed: 4,
      recordsPerSegment: 15,
      markerEvery: 60,
    });
    const segments = workload.segments.get('d0')!;
    const appliers: Promise<ApplyReport>[] = [];
    const outcomes: string[] = [];
    // Upload in order while many appliers start on every upload.
    for (const s of segments) {
      await uploadSegment(deps, s);
      for (let k = 0; k < 3; k++)
        appliers.push(
          applyChangelogs(deps, { machine, disk: 'd0' }).then((r) => (outcomes.push(r.outcome), r)),
        );
    }
    await Promise.all(appliers);
    expect(outcomes).toContain('busy');
    await applyUntilIdle(deps, machine, 'd0');
    expect(
      (await readWhole(seedBlob(deps.seed, machine, 'd0'), 2 * MiB)).equals(workload.final.get('d0')!),
    ).toBe(true);
    await expectRecoveryPointsMatch(deps, workload, new Map([['d0', 2 * MiB]]));
  });

  it('quarantines a tampered change log: nothing of it applied, an event, the disk marked for resync', async () => {
    const deps = testDeps(connection, { openWorkers: 1 });
    const machine = uniqueMachine('tamper');
    const disks = [{ id: 'd0', sizeBytes: 1 * MiB }];
    await register(deps, machine, disks);
    const workload = generateWorkload({
      machine,
      disks,
      ops: 120,
      seed: 5,
      recordsPerSegment: 20,
      markerEvery: 1000,
    });
    const segments = workload.segments.get('d0')!;
    await uploadSegment(deps, segments[0]);
    expect((await applyChangelogs(deps, { machine, disk: 'd0' })).appliedSeq).toBe(1);
    const before = await readWhole(seedBlob(deps.seed, machine, 'd0'), MiB);
    // Flip one byte of the ciphertext of seq 2.
    const name = await uploadSegment(deps, segments[1]);
    const blob = (await ensureContainer(deps.changelogs)).getBlockBlobClient(name);
    const sealed = await blob.downloadToBuffer();
    sealed[sealed.length - 40] ^= 0x01;
    await blob.uploadData(sealed);
    await uploadSegment(deps, segments[2]);
    const report = await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(report).toMatchObject({ outcome: 'quarantined', appliedSeq: 1, segments: 0 });
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), MiB)).equals(before)).toBe(true);
    expect(await blob.exists()).toBe(false);
    const quarantined = await (
      await ensureContainer(deps.quarantine)
    )
      .getBlockBlobClient(name)
      .downloadToBuffer();
    expect(quarantined.equals(sealed)).toBe(true);
    const row = await readEntity<DiskEntity>(await deps.tables.get(TABLES.disks), machine, 'd0');
    expect(row).toMatchObject({ state: 'resync-required', appliedSeq: 1 });
    const events = (await listEvents(deps.tables, { machine })).value;
    expect(events.map((e) => e.type)).toEqual(
      expect.arrayContaining(['segment-quarantined', 'resync-required']),
    );
    expect(events.find((e) => e.type === 'segment-quarantined')!.message).toContain(name);
    // Later messages apply nothing of the old epoch...
    expect(await applyChangelogs(deps, { machine, disk: 'd0' })).toMatchObject({
      outcome: 'resync-required',
      segments: 0,
    });
    // ...until the agent starts a new epoch (a resync): then it applies and the disk recovers.
    const resync = generateWorkload({
      machine,
      disks,
      ops: 50,
      seed: 6,
      epoch: 2,
      recordsPerSegment: 10,
      markerEvery: 20,
    });
    const image = Buffer.from(before);
    for (const s of resync.segments.get('d0')!) await uploadSegment(deps, s);
    const after = (await applyUntilIdle(deps, machine, 'd0')).at(-1)!;
    expect(after).toMatchObject({
      outcome: 'caught-up',
      epoch: 2,
      appliedSeq: resync.segments.get('d0')!.length,
    });
    // The new epoch's writes land on top of what was there: compare against the old image + the new stream.
    const { applyRecordsToImage } = await import('../../../shared/disk-model');
    for (const s of resync.segments.get('d0')!) applyRecordsToImage(image, s.records);
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), MiB)).equals(image)).toBe(true);
    const healed = await readEntity<DiskEntity>(await deps.tables.get(TABLES.disks), machine, 'd0');
    expect(healed!.state).toBe(resync.markers.length > 0 ? 'protected' : 'initial-sync');
    expect(changelogBlobName({ machine, disk: 'd0', epoch: 2, seq: 1 })).toContain('/2/');
  });

  it('a change log past the end of the disk marks the disk for resync without applying it', async () => {
    const deps = testDeps(connection);
    const machine = uniqueMachine('range');
    await register(deps, machine, [{ id: 'd0', sizeBytes: 64 * 1024 }]);
    await uploadSegment(deps, {
      header: { machine, disk: 'd0', epoch: 1, seq: 1, firstWriteTime: 1, lastWriteTime: 1 },
      records: [{ type: 'write', offset: 64 * 1024, data: Buffer.alloc(512, 7) }],
    });
    // Epoch 0 is empty: the applier moves to epoch 1 first.
    const report = await applyChangelogs(deps, { machine, disk: 'd0' });
    expect(report).toMatchObject({ outcome: 'resync-required', appliedSeq: 0 });
    const events = (await listEvents(deps.tables, { machine, type: 'resync-required' })).value;
    expect(events[0].message).toContain('past the disk');
  });
});
