/**
 * Group recovery points through the cloud apply path: three real agents write chained records,
 * the group barrier cuts markers, their segments are sealed and applied to seed disks in Azurite
 * exactly as the pipeline does, and the group points are computed from the per-disk arrivals.
 * Every member's snapshot at every group point must equal the agent segments replayed with the
 * reference model; a marker that one member never cut gives no point; joining members are not
 * in older points.
 */
import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import { describe, expect, inject, it } from 'vitest';
import { GroupCoordinator, localLink, type MemberLink } from '../../../agent/group/coordinator';
import { GroupParticipant } from '../../../agent/group/participant';
import type { MachineAgent } from '../../../agent/mobility/agent';
import { GroupStore, listGroupPoints, putGroup, readGroup, resolveGroupPoint } from '../../../shared/groups';
import { registerMachine, seedBlob } from '../../../shared/replication';
import { GroupNbdClient } from '../../agent/group/nbd-client';
import { silent, startAgent, tempDir, TestSite } from '../../agent/group/site';
import { applyUntilIdle, readWhole, testDeps, testSettings, uploadSegment } from '../replication/helpers';

const connection = inject('azuriteConnectionString');
const SIZE = 128 * 1024;

describe('group recovery points (agents → segments → apply in Azurite → group points)', () => {
  it('a point per committed marker, each member equal to the model at the cut; an uncut marker gives none', async () => {
    const suffix = randomUUID().slice(0, 6);
    const machines = ['a', 'b', 'c'].map((m) => `grp-${m}-${suffix}`);
    const group = `grp-${suffix}`;
    const site = new TestSite();
    await site.start();
    const dir = tempDir('group-points');
    const agents: MachineAgent[] = [];
    const clients: GroupNbdClient[] = [];
    try {
      for (const m of machines) {
        const agent = await startAgent(site, dir, m, ['d0', 'd1'], SIZE);
        agents.push(agent);
        clients.push(
          await GroupNbdClient.connect(agent.nbd!.port, 'd0'),
          await GroupNbdClient.connect(agent.nbd!.port, 'd1'),
        );
      }
      const links = agents.map((a) => localLink(new GroupParticipant(a, { logger: silent })));
      // Prepare answers get ample time: a loaded machine must not turn a commit into an abort.
      const coordinator = new GroupCoordinator({
        group,
        members: links,
        prepareTimeoutMs: 10_000,
        logger: silent,
      });

      // Chained writes: step i goes to machine i % 3 only after step i-1 was acknowledged.
      let writing = true;
      const chain = (async () => {
        for (let step = 0; step < 600; step++) {
          const block = Buffer.alloc(512, step & 0xff);
          block.writeUInt32LE(step, 0);
          await clients[(step % 3) * 2 + (step % 2)].write((step % 64) * 512, block);
        }
        writing = false;
      })();
      const committed: string[] = [];
      while (writing) {
        const r = await coordinator.runMarker(committed.length % 2 ? 'app' : 'crash');
        if (r.decision === 'commit') committed.push(r.markerId);
        await new Promise((resolve) => setTimeout(resolve, 40));
      }
      await chain;
      // A marker only two members cut: the third's link refuses prepare. No point may form.
      const refusing: MemberLink = {
        machine: machines[2],
        prepare: async (c) => ({
          machine: machines[2],
          markerId: c.markerId,
          prepared: false,
          reason: 'test',
        }),
        decide: async () => undefined,
      };
      const partial = await new GroupCoordinator({
        group,
        members: [links[0], links[1], refusing],
        logger: silent,
      }).runMarker('crash');
      expect(partial.decision).toBe('abort');
      const last = await coordinator.runMarker('crash');
      expect(last.decision).toBe('commit');
      committed.push(last.markerId);
      for (const a of agents) {
        await a.cutAll();
        await a.settled(30_000);
      }

      // The cloud side.
      const deps = testDeps(connection);
      const store = GroupStore.fromSettings(deps.tables, testSettings(connection, 'unused'));
      const created = await putGroup(
        store,
        group,
        { members: machines, policy: { crashConsistentIntervalSeconds: 60 } },
        new Date(Date.now() - 3_600_000),
      );
      expect(created.created).toBe(true);
      for (const m of machines) {
        await registerMachine(deps, m, {
          disks: [
            { id: 'd0', sizeBytes: SIZE },
            { id: 'd1', sizeBytes: SIZE },
          ],
          group,
        });
        for (const d of ['d0', 'd1']) {
          for (const s of site.decoded(m, d)) await uploadSegment(deps, s);
          await applyUntilIdle(deps, m, d);
        }
      }
      const points = await listGroupPoints(store, group, { top: 1000 });
      expect(points.map((p) => p.id).sort()).toEqual([...committed].sort());
      expect(points.map((p) => p.id)).not.toContain(partial.markerId);
      for (const p of points) {
        expect(p.members.map((x) => x.machine).sort()).toEqual([...machines].sort());
        for (const member of p.members) {
          for (const disk of member.disks) {
            const bytes = await readWhole(
              seedBlob(deps.seed, member.machine, disk.id).withSnapshot(disk.snapshot),
              SIZE,
            );
            expect(
              bytes.equals(site.replay(member.machine, disk.id, SIZE, p.id)),
              `${member.machine}/${disk.id} at ${p.id}`,
            ).toBe(true);
          }
        }
      }
      // Causality at each point, on the cloud copies: the newest step anywhere implies all before it.
      for (const p of points) {
        const steps: number[] = [];
        for (const member of p.members) {
          for (const disk of member.disks) {
            const bytes = await readWhole(
              seedBlob(deps.seed, member.machine, disk.id).withSnapshot(disk.snapshot),
              SIZE,
            );
            for (let o = 0; o < SIZE; o += 512)
              if (bytes[o + 1] === (bytes.readUInt32LE(o) >> 8) % 256 && bytes.readUInt32LE(o) > 0)
                steps.push(bytes.readUInt32LE(o));
          }
        }
        const top = Math.max(0, ...steps);
        for (let s = Math.max(1, top - 63); s <= top; s++)
          expect(steps, `step ${s} missing under ${top} at ${p.id}`).toContain(s);
      }
      expect((await resolveGroupPoint(store, group, 'latest-group-processed')).id).toBe(last.markerId);
      const app = await resolveGroupPoint(store, group, 'latest-group-app-consistent').catch(() => undefined);
      if (app) expect(app.type).toBe('group-app-consistent');

      // Membership: a machine that joins now is not part of points already taken.
      await putGroup(store, group, { members: [...machines, `grp-d-${suffix}`] });
      const g = await readGroup(store, group);
      expect(g.members).toContain(`grp-d-${suffix}`);
      const again = await listGroupPoints(store, group, { top: 1000 });
      expect(again.map((p) => p.id).sort()).toEqual([...committed].sort());
      expect(again.every((p) => p.members.length === 3)).toBe(true);
    } finally {
      await Promise.all(clients.map((c) => c.close()));
      await Promise.all(agents.map((a) => a.stop()));
      await site.stop();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  }, 90_000);
});
