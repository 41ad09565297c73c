/**
 * A member that does not answer prepare in time: the marker is aborted (never cut anywhere), the
 * other members' writes go on, the abort event names the slow member, and the next marker
 * commits once the member is back.
 */
import fs from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { MachineAgent } from '../../../agent/mobility/agent';
import { GroupCoordinator, type GroupMarkerResult } from '../../../agent/group/coordinator';
import { GroupParticipant } from '../../../agent/group/participant';
import { GroupMemberClient } from '../../../agent/group/transport';
import { GroupNbdClient } from './nbd-client';
import { credentialOf, silent, startAgent, tempDir, TestSite } from './site';

const SIZE = 128 * 1024;
const MACHINES = ['web', 'app', 'db'];

describe('a slow member aborts the group marker without stalling writes', () => {
  const site = new TestSite();
  const dir = tempDir('group-slow');
  const agents = new Map<string, MachineAgent>();
  const clients = new Map<string, GroupMemberClient>();
  const nbd = new Map<string, GroupNbdClient>();

  beforeAll(async () => {
    await site.start();
    for (const m of MACHINES) {
      const agent = await startAgent(site, dir, m, ['d0'], SIZE);
      agents.set(m, agent);
      clients.set(
        m,
        new GroupMemberClient(new GroupParticipant(agent, { logger: silent }), {
          url: site.url,
          group: 'shop',
          credential: credentialOf(m),
          pollMs: 1_000,
          logger: silent,
        }),
      );
      nbd.set(m, await GroupNbdClient.connect(agent.nbd!.port, 'd0'));
    }
  }, 60_000);

  afterAll(async () => {
    for (const c of clients.values()) await c.stop();
    await Promise.all([...nbd.values()].map((c) => c.close()));
    await Promise.all([...agents.values()].map((a) => a.stop()));
    await site.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('aborts, names db, keeps writing, and commits the next marker once db polls again', async () => {
    const hub = site.hub('shop');
    const coordinator = new GroupCoordinator({
      group: 'shop',
      members: MACHINES.map((m) => hub.link(m)),
      // Long enough for web and app on a loaded machine; db, not polling, costs the first marker this much.
      prepareTimeoutMs: 3_000,
      logger: silent,
    });
    const aborted: (GroupMarkerResult & { message: string })[] = [];
    coordinator.on('aborted', (e: GroupMarkerResult & { message: string }) => aborted.push(e));
    clients.get('web')!.start();
    clients.get('app')!.start();
    // db's agent runs (its disks take writes) but its group client is not polling: it is slow.

    const marker = coordinator.runMarker('crash');
    // Writes issued while the barrier waits for db are held on web (prepared), then go on.
    const during = nbd.get('web')!.write(0, Buffer.alloc(512, 0xaa));
    const first = await marker;
    await during;
    expect(first).toMatchObject({ decision: 'abort', slow: ['db'] });
    expect(aborted).toHaveLength(1);
    expect(aborted[0].message).toContain('db did not answer prepare');

    // Writes continue everywhere after the abort.
    for (const m of MACHINES) await nbd.get(m)!.write(4096, Buffer.alloc(512, 0xbb));

    clients.get('db')!.start();
    const second = await coordinator.runMarker('crash');
    expect(second).toMatchObject({ decision: 'commit', slow: [], refused: [] });
    for (const m of MACHINES) await nbd.get(m)!.write(8192, Buffer.alloc(512, 0xcc));
    for (const a of agents.values()) {
      await a.cutAll();
      await a.settled(30_000);
    }
    for (const m of MACHINES) {
      const ids = site.markers(m, 'd0');
      expect(ids).not.toContain(first.markerId);
      expect(ids).toContain(second.markerId);
      // The committed cut holds the writes acknowledged before it and none after it.
      const image = site.replay(m, 'd0', SIZE, second.markerId);
      expect(image.subarray(4096, 4608).equals(Buffer.alloc(512, 0xbb))).toBe(true);
      expect(image.subarray(8192, 8704).equals(Buffer.alloc(512, 0))).toBe(true);
    }
    // db, once it got the stale prepare (if it did), answered the abort at once: a new marker commits.
    const third = await coordinator.runMarker('crash');
    expect(third.decision).toBe('commit');
  }, 60_000);
});
