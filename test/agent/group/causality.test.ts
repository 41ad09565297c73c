/**
 * Causality oracle for group markers: chains of records across three machines, where each step
 * is written only after the previous step (on another machine) was acknowledged. At every
 * committed group marker, the replayed segments of every member must hold a prefix of every
 * chain (no step without the step it depends on), and each disk must equal the model of the
 * writes sent to it, up to the cut.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { MachineAgent } from '../../../agent/mobility/agent';
import { GroupCoordinator, localLink, type GroupMarkerResult } from '../../../agent/group/coordinator';
import { GroupParticipant } from '../../../agent/group/participant';
import { GroupMemberClient } from '../../../agent/group/transport';
import { GroupNbdClient } from './nbd-client';
import { credentialOf, silent, startAgent, tempDir, TestSite } from './site';

const SIZE = 256 * 1024;
const BLOCK = 512;
const MAGIC = 0x4c424752;

interface DiskRef {
  machine: string;
  disk: string;
}

/** Per disk: the writes sent on its one connection, in order (= the order the export admits them). */
class DiskLog {
  readonly writes: { offset: number; data: Buffer }[] = [];
  constructor(
    readonly ref: DiskRef,
    readonly client: GroupNbdClient,
  ) {}

  write(slot: number, chain: number, step: number): Promise<void> {
    const data = Buffer.alloc(BLOCK, (chain * 31 + step) & 0xff);
    data.writeUInt32LE(MAGIC, 0);
    data.writeUInt32LE(chain, 4);
    data.writeUInt32LE(step, 8);
    data.writeUInt32LE(this.writes.length, 12);
    this.writes.push({ offset: slot * BLOCK, data });
    return this.client.write(slot * BLOCK, data);
  }

  /** The model image after the first `count` writes. */
  model(count: number): Buffer {
    const image = Buffer.alloc(SIZE);
    for (const w of this.writes.slice(0, count)) w.data.copy(image, w.offset);
    return image;
  }
}

/** Reads (chain, step, index) of every record slot in an image. */
function records(image: Buffer): { chain: number; step: number; index: number }[] {
  const out = [];
  for (let o = 0; o < image.length; o += BLOCK) {
    if (image.readUInt32LE(o) === MAGIC)
      out.push({
        chain: image.readUInt32LE(o + 4),
        step: image.readUInt32LE(o + 8),
        index: image.readUInt32LE(o + 12),
      });
  }
  return out;
}

const MACHINES = ['app-a', 'app-b', 'app-c'];
const DISKS: Record<string, string[]> = { 'app-a': ['d0', 'd1'], 'app-b': ['d0'], 'app-c': ['d0'] };
const CHAINS = 8;
const STEPS = 400;

/** Where step `step` of chain `chain` goes: machines in turn; on app-a, alternate disks. */
function placeOf(chain: number, step: number): { machine: string; disk: string; slot: number } {
  const machine = MACHINES[(chain + step) % 3];
  const disks = DISKS[machine];
  return { machine, disk: disks[step % disks.length], slot: chain };
}

async function waitUntil(check: () => boolean): Promise<void> {
  for (let i = 0; !check(); i++) {
    if (i > 1500) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('group markers keep causality across machines', () => {
  const site = new TestSite();
  const dir = tempDir('group-causality');
  const agents = new Map<string, MachineAgent>();
  const participants = new Map<string, GroupParticipant>();
  const logs = new Map<string, DiskLog>();

  beforeAll(async () => {
    await site.start();
    for (const m of MACHINES) {
      const agent = await startAgent(site, dir, m, DISKS[m], SIZE);
      agents.set(m, agent);
      participants.set(m, new GroupParticipant(agent, { logger: silent }));
      for (const d of DISKS[m]) {
        logs.set(
          `${m}/${d}`,
          new DiskLog({ machine: m, disk: d }, await GroupNbdClient.connect(agent.nbd!.port, d)),
        );
      }
    }
  }, 60_000);

  afterAll(async () => {
    await Promise.all([...logs.values()].map((l) => l.client.close()));
    await Promise.all([...agents.values()].map((a) => a.stop()));
    await site.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('over HTTP: thousands of chained records, every committed cut is a prefix of every chain and equals the model', async () => {
    const hub = site.hub('app');
    const outcomes = new Set<string>();
    hub.on(
      'outcome',
      (o: { machine: string; markerId: string; cut: boolean }) =>
        o.cut && outcomes.add(`${o.markerId}/${o.machine}`),
    );
    const clients = MACHINES.map(
      (m) =>
        new GroupMemberClient(participants.get(m)!, {
          url: site.url,
          group: 'app',
          credential: credentialOf(m),
          pollMs: 2_000,
          logger: silent,
        }),
    );
    for (const c of clients) c.start();
    const coordinator = new GroupCoordinator({
      group: 'app',
      members: MACHINES.map((m) => hub.link(m)),
      prepareTimeoutMs: 3_000,
      logger: silent,
    });

    let writing = true;
    const chains = Array.from({ length: CHAINS }, async (_, chain) => {
      for (let step = 0; step < STEPS; step++) {
        const p = placeOf(chain, step);
        await logs.get(`${p.machine}/${p.disk}`)!.write(p.slot, chain, step);
      }
    });
    const results: GroupMarkerResult[] = [];
    const markers = (async () => {
      while (writing) {
        results.push(await coordinator.runMarker('crash'));
        await new Promise((r) => setTimeout(r, 5));
      }
      results.push(await coordinator.runMarker('crash'));
    })();
    await Promise.all(chains);
    writing = false;
    await markers;
    // A commit is a decision; each member reports its cut afterwards.
    const last = results[results.length - 1];
    if (last.decision === 'commit')
      await waitUntil(() => MACHINES.every((m) => outcomes.has(`${last.markerId}/${m}`)));
    for (const c of clients) await c.stop();
    for (const a of agents.values()) await a.cutAll();
    for (const a of agents.values()) await a.settled(30_000);

    const committed = results.filter((r) => r.decision === 'commit');
    expect(committed.length).toBeGreaterThanOrEqual(3);
    // Some cut must land in the middle of the workload, or the oracle proves nothing.
    let midway = 0;
    for (const r of committed) {
      // Latest step of every chain visible in the cut, over all members.
      const latest = new Map<string, number>();
      for (const m of MACHINES) {
        for (const d of DISKS[m]) {
          const image = site.replay(m, d, SIZE, r.markerId);
          const recs = records(image);
          const log = logs.get(`${m}/${d}`)!;
          const prefix = recs.length === 0 ? 0 : Math.max(...recs.map((x) => x.index)) + 1;
          expect(
            image.equals(log.model(prefix)),
            `${m}/${d} at ${r.markerId} equals the model of its first ${prefix} writes`,
          ).toBe(true);
          for (const x of recs) latest.set(`${x.chain}/${m}/${d}`, x.step);
        }
      }
      for (let chain = 0; chain < CHAINS; chain++) {
        const top = Math.max(
          -1,
          ...MACHINES.flatMap((m) => DISKS[m].map((d) => latest.get(`${chain}/${m}/${d}`) ?? -1)),
        );
        if (top > 0 && top < STEPS - 1) midway++;
        // Every step before `top` happened before it, so each slot must show its last step ≤ top.
        for (let step = Math.max(0, top - 6); step < top; step++) {
          const p = placeOf(chain, step);
          const shown = latest.get(`${chain}/${p.machine}/${p.disk}`) ?? -1;
          let expected = -1;
          for (let s = top; s >= 0; s--) {
            const q = placeOf(chain, s);
            if (q.machine === p.machine && q.disk === p.disk) {
              expected = s;
              break;
            }
          }
          expect(
            shown,
            `chain ${chain} at ${r.markerId}: ${p.machine}/${p.disk} shows step ${shown}, needs ${expected} (top ${top})`,
          ).toBe(expected);
        }
      }
    }
    expect(midway).toBeGreaterThan(0);
    // Aborted markers are never cut anywhere.
    const aborted = new Set(results.filter((r) => r.decision === 'abort').map((r) => r.markerId));
    for (const m of MACHINES)
      for (const d of DISKS[m]) for (const id of site.markers(m, d)) expect(aborted.has(id)).toBe(false);
    // Every committed marker is on every disk of every member.
    for (const m of MACHINES)
      for (const d of DISKS[m])
        expect(site.markers(m, d)).toEqual(expect.arrayContaining(committed.map((r) => r.markerId)));
  }, 90_000);

  it('in process: app-consistent markers freeze every member inside the barrier; one failed freeze makes the point crash-consistent', async () => {
    const hooks = `${dir}/hooks.log`;
    const members = MACHINES.map(
      (m) =>
        new GroupParticipant(agents.get(m)!, {
          logger: silent,
          freezeCommand:
            m === 'app-c'
              ? `echo freeze-$LIFEBOAT_MACHINE >> ${hooks}; test -e ${dir}/c-ok`
              : `echo freeze-$LIFEBOAT_MACHINE >> ${hooks}`,
          thawCommand: `echo thaw-$LIFEBOAT_MACHINE >> ${hooks}`,
        }),
    );
    const coordinator = new GroupCoordinator({
      group: 'app',
      members: members.map(localLink),
      logger: silent,
    });
    const first = await coordinator.runMarker('app');
    expect(first.decision).toBe('commit');
    expect(first.consistency).toBe('crash');
    expect(first.unfrozen).toEqual(['app-c']);
    fs.writeFileSync(`${dir}/c-ok`, '');
    const second = await coordinator.runMarker('app');
    expect(second).toMatchObject({ decision: 'commit', consistency: 'app', unfrozen: [] });
    const lines = fs.readFileSync(hooks, 'utf8').trim().split('\n');
    for (const m of MACHINES) {
      expect(lines.filter((l) => l === `freeze-${m}`)).toHaveLength(2);
      expect(lines.filter((l) => l === `thaw-${m}`)).toHaveLength(2);
    }
    for (const a of agents.values()) await a.settled(30_000);
    const tags = site
      .decoded('app-b', 'd0')
      .flatMap((s) =>
        s.records.flatMap((r) =>
          r.type === 'marker' && (r.id === first.markerId || r.id === second.markerId)
            ? [[r.id, r.kind, r.tag]]
            : [],
        ),
      );
    expect(tags).toEqual([
      [first.markerId, 'group', 'group=app;consistency=crash'],
      [second.markerId, 'group', 'group=app;consistency=app'],
    ]);
  }, 60_000);
});
