/**
 * The proxy runs the site's group coordinators: it reads the group (members, policy) from the
 * cloud's groups table, serves the barrier routes to members with their real machine credentials,
 * cuts markers on the policy's interval, and when a member stops answering, aborts and records an
 * event naming it in the cloud's events table; once the member is back, markers commit again.
 */
import fs from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { GroupParticipant } from '../../../agent/group/participant';
import { GROUP_MARKER_ABORTED } from '../../../agent/group/site';
import { GroupMemberClient } from '../../../agent/group/transport';
import { MachineAgent } from '../../../agent/mobility/agent';
import { startProxy, type RunningProxy } from '../../../agent/proxy/proxy';
import { SETTING } from '../../../shared/config';
import { GroupStore, putGroup } from '../../../shared/groups';
import { listEvents, ReplicationTables } from '../../../shared/replication';
import { StorageClients } from '../../../shared/storage';
import { quietLogger, registerMachine, testSettings, uniqueName } from '../proxy/helpers';
import { waitFor } from '../../helpers/host';
import { silent, tempDir } from './site';

const connection = inject('azuriteConnectionString');
const SIZE = 64 * 1024;

describe('the proxy coordinates the groups of the groups table', () => {
  const settings = testSettings(connection);
  const tables = new ReplicationTables(new StorageClients(SETTING.replicaStorage, settings));
  const group = uniqueName('shop');
  const machines = ['web', 'app', 'db'].map((m) => uniqueName(m));
  const tokens = new Map<string, string>();
  const agents = new Map<string, MachineAgent>();
  const participants = new Map<string, GroupParticipant>();
  const clients = new Map<string, GroupMemberClient>();
  const cuts = new Map<string, Set<string>>();
  const dir = tempDir('site-groups');
  let proxy: RunningProxy;

  const member = (m: string) =>
    new GroupMemberClient(participants.get(m)!, {
      url: proxy.url,
      group,
      credential: tokens.get(m)!,
      pollMs: 1_000,
      logger: silent,
    });

  beforeAll(async () => {
    for (const m of machines) tokens.set(m, await registerMachine(connection, m));
    const store = GroupStore.fromSettings(tables, settings);
    await putGroup(store, group, {
      members: machines,
      // A prepare timeout long enough that a loaded machine never makes web or app miss one.
      policy: { crashConsistentIntervalSeconds: 1, prepareTimeoutMs: 3_000 },
    });
    proxy = await startProxy({
      spoolDir: path.join(dir, 'spool'),
      host: '127.0.0.1',
      port: 0,
      tls: 'none',
      settings,
      logger: quietLogger,
    });
    for (const m of machines) {
      const file = path.join(dir, `${m}.img`);
      fs.writeFileSync(file, Buffer.alloc(SIZE));
      const agent = new MachineAgent({
        machine: m,
        disks: [{ id: 'd0', path: file }],
        journalDir: path.join(dir, `${m}-journal`),
        proxy: { url: proxy.url, credential: tokens.get(m)! },
        nbd: { port: 0 },
        crashIntervalSeconds: 0,
        retry: { baseMs: 20, maxMs: 200 },
        logger: silent,
        segment: { maxSegmentBytes: 64 * 1024, maxSegmentAgeMs: 200 },
      });
      await agent.start();
      await agent.settled(30_000);
      agents.set(m, agent);
      const participant = new GroupParticipant(agent, { logger: silent });
      participant.on('cut', (o: { markerId: string; cut: boolean }) => {
        if (!o.cut) return;
        let s = cuts.get(o.markerId);
        if (!s) cuts.set(o.markerId, (s = new Set()));
        s.add(m);
      });
      participants.set(m, participant);
      clients.set(m, member(m));
    }
  }, 60_000);

  afterAll(async () => {
    for (const c of clients.values()) await c.stop();
    await Promise.all([...agents.values()].map((a) => a.stop()));
    await proxy?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const committedOnAll = (after = new Set<string>()) =>
    [...cuts].filter(([id, s]) => !after.has(id) && s.size === machines.length).map(([id]) => id);

  it('serves the barrier routes with machine credentials only, and 404s an unknown group', async () => {
    const base = `${proxy.url}/v1/groups`;
    const noCredential = await fetch(`${base}/${group}/members/${machines[0]}/commands?waitMs=0`);
    expect(noCredential.status).toBe(401);
    const otherMachine = await fetch(`${base}/${group}/members/${machines[0]}/commands?waitMs=0`, {
      headers: { authorization: `Bearer ${tokens.get(machines[1])}` },
    });
    expect(otherMachine.status).toBe(403);
    const ok = await fetch(`${base}/${group}/members/${machines[0]}/commands?waitMs=0`, {
      headers: { authorization: `Bearer ${tokens.get(machines[0])}` },
    });
    expect(ok.status === 204 || ok.status === 200).toBe(true);
    await ok.arrayBuffer();
    const unknown = await fetch(`${base}/no-such-group/members/${machines[0]}/commands?waitMs=0`, {
      headers: { authorization: `Bearer ${tokens.get(machines[0])}` },
    });
    expect(unknown.status).toBe(404);
    expect(((await unknown.json()) as { error: { message: string } }).error.message).toMatch(
      /no replication group/,
    );
  });

  it('cuts markers on the policy interval; a silent member aborts them with an event naming it; it commits again once back', async () => {
    for (const c of clients.values()) c.start();
    await waitFor(
      async () => (committedOnAll().length >= 2 ? true : undefined),
      'two committed markers',
      20_000,
    );

    // db stops answering: its agent keeps running, its group client is gone.
    const db = machines[2];
    await clients.get(db)!.stop();
    const event = await waitFor(
      async () => (await listEvents(tables, { machine: db, type: GROUP_MARKER_ABORTED })).value[0],
      'the abort event',
      20_000,
    );
    expect(event).toMatchObject({ type: GROUP_MARKER_ABORTED, severity: 'warning', machine: db });
    expect(event.message).toContain(`${db} did not answer prepare`);
    expect(event.details).toMatchObject({ group, members: [db] });
    // The aborted marker was cut nowhere.
    expect(cuts.get(event.details!.markerId as string)).toBeUndefined();
    // The others are not blamed.
    for (const m of machines.slice(0, 2))
      expect((await listEvents(tables, { machine: m, type: GROUP_MARKER_ABORTED })).value).toEqual([]);

    const before = new Set(cuts.keys());
    clients.set(db, member(db));
    clients.get(db)!.start();
    await waitFor(
      async () => (committedOnAll(before).length >= 1 ? true : undefined),
      'a marker committed after db is back',
      20_000,
    );
  }, 60_000);
});
