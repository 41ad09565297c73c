import { randomUUID } from 'node:crypto';
import { describe, expect, inject, it } from 'vitest';
import {
  completeRecoveryPoint,
  getMachineStatus,
  listEvents,
  monitorRpo,
  recordArrival,
  registerMachine,
  seedBlob,
} from '../../../shared/replication';
import { testDeps, uploadSegment, type TestDeps } from './helpers';

const connection = inject('azuriteConnectionString');

async function point(deps: TestDeps, machine: string, id: string, time: number) {
  const snapshot = (await seedBlob(deps.seed, machine, 'd0').createSnapshot()).snapshot!;
  await recordArrival(
    deps.tables,
    {
      machine,
      disk: 'd0',
      markerId: id,
      kind: 'crash',
      tag: '',
      sourceTime: time,
      snapshot,
      epoch: 1,
      seq: 1,
    },
    new Date(time),
  );
  await completeRecoveryPoint(deps.tables, machine, id, new Date(time));
}

describe('RPO monitor (injectable clock)', () => {
  it('raises a breach event when the stream stalls past the threshold and a recovery event when it resumes', async () => {
    const deps = testDeps(connection);
    const machine = `rpo-${randomUUID().slice(0, 8)}`;
    await registerMachine(deps, machine, {
      disks: [{ id: 'd0', sizeBytes: 64 * 1024 }],
      policy: { rpoThresholdSeconds: 60 },
    });
    const mine = async (at: number) => (await monitorRpo(deps, new Date(at), { machines: [machine] }))[0];
    const t0 = Date.UTC(2027, 0, 4, 12, 0, 0);

    // Before any recovery point: no RPO yet, nothing to report.
    expect(await mine(t0)).toMatchObject({ rpoSeconds: null, breached: false, health: 'initial-sync' });
    // Points keep coming every 20 s: within the threshold.
    for (let i = 0; i < 3; i++) {
      await point(deps, machine, `m${i}`, t0 + i * 20_000);
      expect(await mine(t0 + i * 20_000 + 10_000)).toMatchObject({ rpoSeconds: 10, breached: false });
    }
    // The stream stalls; change logs pile up in the cache.
    await uploadSegment(deps, {
      header: { machine, disk: 'd0', epoch: 0, seq: 1, firstWriteTime: t0, lastWriteTime: t0 },
      records: [{ type: 'zero', offset: 0, length: 512 }],
    });
    await uploadSegment(deps, {
      header: { machine, disk: 'd0', epoch: 0, seq: 2, firstWriteTime: t0, lastWriteTime: t0 },
      records: [{ type: 'zero', offset: 0, length: 512 }],
    });
    const last = t0 + 40_000;
    expect(await mine(last + 50_000)).toMatchObject({ rpoSeconds: 50, breached: false });
    const breach = await mine(last + 61_000);
    expect(breach).toMatchObject({
      rpoSeconds: 61,
      breached: true,
      health: 'critical',
      backlogSegments: 2,
      event: 'rpo-breached',
    });
    expect((await getMachineStatus(deps, machine, new Date(last + 61_000))).health).toBe('critical');
    // Still breached: no second event.
    const still = await mine(last + 300_000);
    expect(still.breached).toBe(true);
    expect(still.event).toBeUndefined();

    // The stream resumes.
    await point(deps, machine, 'm9', last + 320_000);
    const recovered = await mine(last + 325_000);
    expect(recovered).toMatchObject({ rpoSeconds: 5, breached: false, event: 'rpo-recovered' });
    const fine = await mine(last + 330_000);
    expect(fine.breached).toBe(false);
    expect(fine.event).toBeUndefined();

    const events = (await listEvents(deps.tables, { machine })).value.filter((e) =>
      e.type.startsWith('rpo-'),
    );
    expect(events.map((e) => e.type)).toEqual(['rpo-recovered', 'rpo-breached']);
    expect(events[1]).toMatchObject({
      severity: 'error',
      time: new Date(last + 61_000).toISOString(),
      details: { rpoSeconds: 61, thresholdSeconds: 60, backlogSegments: 2 },
    });
    expect(events[1].message).toContain('above its threshold of 60 s');
    expect(events[1].message).toContain('2 change log(s)');

    // A second stall and recovery make a second pair of events, even with two monitors racing.
    const racing = await Promise.all([mine(last + 400_000), mine(last + 400_000)]);
    expect(racing.filter((c) => c.event === 'rpo-breached')).toHaveLength(1);
    await point(deps, machine, 'm10', last + 410_000);
    await mine(last + 411_000);
    const again = (await listEvents(deps.tables, { machine })).value.filter((e) => e.type.startsWith('rpo-'));
    expect(again.map((e) => e.type)).toEqual([
      'rpo-recovered',
      'rpo-breached',
      'rpo-recovered',
      'rpo-breached',
    ]);
  });
});
