/**
 * Replication groups over HTTP through the local host: three members' segments, with group
 * markers cut at the same id on every disk, go through the real apply path (cache blobs,
 * changelog-ready messages, the apply function); group points appear; a group failover makes
 * every member's failover disks equal to that member's model at the cut, byte for byte; a member
 * that cannot fail over is named with its step and reason. Plus the 400/404/409s of the API.
 */
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { HostProcess } from '../../infra/local/host-process';
import {
  beginFailover,
  failoverDepsFromSettings,
  failoverDiskName,
  FAILOVER_TABLES,
  readLocalTarget,
  readRecord,
  resolveRecoveryPoint,
} from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { odataString, readRange, TABLES } from '../../shared/replication';
import { waitFor } from '../helpers/host';
import {
  apiClient,
  queueSender,
  ship,
  SourceMachine,
  testStack,
  waitForOperation,
  type Api,
} from '../shared/failover/helpers';
import { quietLogger, testDeps } from '../shared/replication/helpers';

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const suffix = randomUUID().slice(0, 6);

/** One member's write stream and its independent model; group markers cut every disk at once. */
class Member extends SourceMachine {
  readonly cuts = new Map<string, Map<string, Buffer>>();

  /** The group marker record the barrier's commit cuts: same id, time and tag on every disk. */
  groupMarker(group: string, id: string, time: number, consistency: 'crash' | 'app'): void {
    this.time = Math.max(this.time, time);
    const tag = `group=${group};consistency=${consistency}`;
    for (const d of this.disks) this.add(d.id, { type: 'marker', id, kind: 'group', time, tag });
    this.cuts.set(id, new Map([...this.images].map(([k, v]) => [k, Buffer.from(v)])));
  }
}

describe('replication groups over HTTP through the local host', () => {
  const stack = testStack(connection, 'groups');
  const replication = testDeps(connection);
  const deps = failoverDepsFromSettings(stack.settings, { replication, log: quietLogger() });
  let host: HostProcess;
  let api: Api;
  let sender: MessageSender;
  const group = `app-${suffix}`;
  const members = [
    new Member(`web-${suffix}`, [{ id: 'd0', sizeBytes: 256 * KiB }], 11),
    new Member(
      `api-${suffix}`,
      [
        { id: 'd0', sizeBytes: 256 * KiB },
        { id: 'd1', sizeBytes: 128 * KiB },
      ],
      12,
    ),
    new Member(
      `db-${suffix}`,
      [
        { id: 'd0', sizeBytes: 128 * KiB },
        { id: 'd1', sizeBytes: 256 * KiB },
      ],
      13,
    ),
  ];
  const marks = { g1: `group-${suffix}-1`, g2: `group-${suffix}-2`, g3: `group-${suffix}-3` };

  async function groupPointIds(): Promise<string[]> {
    const res = await api('GET', `groups/${group}/recovery-points`);
    expect(res.status, JSON.stringify(res.body)).toBe(200);
    return (res.body.value as { id: string }[]).map((p) => p.id);
  }

  beforeAll(async () => {
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    sender = queueSender(stack);
    for (const m of members)
      expect((await api('PUT', `machines/${m.machine}`, { disks: m.disks, group })).status).toBe(201);
    const put = await api('PUT', `groups/${group}`, {
      members: members.map((m) => m.machine),
      policy: { crashConsistentIntervalSeconds: 60 },
    });
    expect(put.status, JSON.stringify(put.body)).toBe(201);
    // Marker times are after the members joined (the cloud's clock).
    const t0 = Date.now() + 1000;
    for (const m of members) {
      m.randomWrites(40);
      m.groupMarker(group, marks.g1, t0, 'crash');
      m.randomWrites(30);
      await ship(replication, sender, m.cut());
      m.randomWrites(30);
      m.groupMarker(group, marks.g2, t0 + 1000, 'app');
      m.randomWrites(20);
      // g3: cut by web and api only (db never got the commit): no group point may form from it.
      if (m !== members[2]) m.groupMarker(group, marks.g3, t0 + 2000, 'crash');
      m.randomWrites(10);
      await ship(replication, sender, m.cut());
    }
    await waitFor(
      async () => ((await groupPointIds()).length >= 2 ? true : undefined),
      'two group points',
      40_000,
    );
  }, 60_000);

  afterAll(async () => {
    await sender?.close();
    await Promise.all(stack.hosts.map((h) => h.stop()));
  });

  async function expectDisksAt(member: Member, failoverId: string, markerId: string): Promise<void> {
    for (const d of member.disks) {
      const bytes = await readRange(
        deps.failoverDisks.getPageBlobClient(failoverDiskName(member.machine, d.id, failoverId)),
        0,
        d.sizeBytes,
      );
      expect(
        bytes.equals(member.cuts.get(markerId)!.get(d.id)!),
        `${member.machine}/${d.id} of ${failoverId} at ${markerId}`,
      ).toBe(true);
    }
    expect((await readLocalTarget(deps.tables, member.machine, failoverId))?.running).toBe(true);
  }

  async function groupFailover(
    body: unknown,
  ): Promise<{ operationId: string; members: { machine: string; failoverId: string }[] }> {
    const res = await api('POST', `groups/${group}/failover`, body);
    expect(res.status, JSON.stringify(res.body)).toBe(202);
    expect(res.body.statusUri).toMatch(new RegExp(`/api/operations/${res.body.operationId}$`));
    return res.body;
  }

  async function cancelAll(): Promise<void> {
    for (const m of members) {
      const res = await api('POST', `machines/${m.machine}/cancel`);
      if (res.status === 404) continue;
      expect(res.status, JSON.stringify(res.body)).toBe(202);
      expect((await waitForOperation(api, res.body.operationId)).status).toBe('Completed');
    }
  }

  it('group points: one per marker every disk of every member applied; GET shows members and the latest points', async () => {
    expect(await groupPointIds()).toEqual([marks.g2, marks.g1]);
    const app = await api('GET', `groups/${group}/recovery-points?type=app`);
    expect(app.body.value.map((p: { id: string }) => p.id)).toEqual([marks.g2]);
    const g = await api('GET', `groups/${group}`);
    expect(g.status).toBe(200);
    expect(g.body.members.map((m: { machine: string }) => m.machine).sort()).toEqual(
      members.map((m) => m.machine).sort(),
    );
    expect(g.body.latestGroupPoint.id).toBe(marks.g2);
    expect(g.body.latestAppConsistentGroupPoint.id).toBe(marks.g2);
    expect(
      g.body.latestGroupPoint.members.find((m: { machine: string }) => m.machine === members[1].machine)
        .disks,
    ).toHaveLength(2);
  });

  it('rejects bad input on PUT/GET/POST with a 400/404 naming the field', async () => {
    const machines = members.map((m) => m.machine);
    const cases: [string, string, unknown, number, string][] = [
      ['PUT', `groups/${group}`, {}, 400, 'members'],
      ['PUT', `groups/${group}`, { members: [] }, 400, 'members'],
      ['PUT', `groups/${group}`, { members: 'web' }, 400, 'members'],
      ['PUT', `groups/${group}`, { members: ['Not_A_Name'] }, 400, 'members.0'],
      ['PUT', `groups/${group}`, { members: [machines[0], machines[0]] }, 400, 'members'],
      ['PUT', `groups/${group}`, { members: machines, policy: { turbo: true } }, 400, 'policy'],
      [
        'PUT',
        `groups/${group}`,
        { members: machines, policy: { prepareTimeoutMs: 1 } },
        400,
        'policy.prepareTimeoutMs',
      ],
      ['PUT', `groups/${group}`, { members: machines, extra: 1 }, 400, 'body'],
      ['PUT', `groups/${group}`, '{"members":', 400, 'body'],
      ['PUT', 'groups/Bad_Group', { members: machines }, 400, 'group'],
      ['GET', `groups/nobody-${suffix}`, undefined, 404, 'group'],
      ['GET', 'groups/Bad_Group', undefined, 400, 'group'],
      ['GET', `groups/nobody-${suffix}/recovery-points`, undefined, 404, 'group'],
      ['POST', `groups/nobody-${suffix}/failover`, { recoveryPoint: 'latest-group-processed' }, 404, 'group'],
      ['POST', `groups/${group}/failover`, { recoveryPoint: 'no-such-point' }, 404, 'recoveryPoint'],
      ['POST', `groups/${group}/failover`, { recoveryPoint: marks.g3 }, 404, 'recoveryPoint'],
      ['POST', `groups/${group}/failover`, {}, 400, 'recoveryPoint'],
      ['POST', `groups/${group}/failover`, { recoveryPoint: 'not a point!' }, 400, 'recoveryPoint'],
      [
        'POST',
        `groups/${group}/failover`,
        { recoveryPoint: 'latest-group-processed', test: 'yes' },
        400,
        'test',
      ],
      [
        'POST',
        `groups/${group}/failover`,
        { recoveryPoint: 'latest-group-processed', planned: true },
        400,
        'planned',
      ],
      ['POST', `groups/${group}/failover`, '[1,', 400, 'body'],
      ['POST', `groups/${group}/failover`, [], 400, 'body'],
    ];
    for (const [method, route, body, status, target] of cases) {
      const res = await api(method, route, body);
      expect(res.status, `${method} ${route} ${JSON.stringify(body)}: ${JSON.stringify(res.body)}`).toBe(
        status,
      );
      expect(
        res.body.error.target,
        `${method} ${route} ${JSON.stringify(body)}: ${JSON.stringify(res.body)}`,
      ).toBe(target);
      expect(res.body.error.message.length).toBeGreaterThan(20);
    }
    // Nothing was claimed by the refused requests.
    for (const m of members) expect((await api('POST', `machines/${m.machine}/cancel`)).status).toBe(404);
    // The group is unchanged.
    expect((await api('GET', `groups/${group}`)).body.members).toHaveLength(3);
  });

  it('test group failover to latest-group-processed: every member equals its model at the cut; 409 while members are failed over', async () => {
    const started = await groupFailover({ recoveryPoint: 'latest-group-processed', test: true });
    expect(started.members.map((m) => m.machine).sort()).toEqual(members.map((m) => m.machine).sort());
    const again = await api('POST', `groups/${group}/failover`, { recoveryPoint: marks.g1 });
    expect(again.status).toBe(409);
    expect(again.body.error.message).toMatch(/already failing over/);
    const op = await waitForOperation(api, started.operationId);
    expect(op.status, op.error ?? JSON.stringify(op.progress)).toBe('Completed');
    expect(op.output).toMatchObject({
      group,
      state: 'failed-over',
      recoveryPoint: { id: marks.g2, type: 'group-app-consistent' },
    });
    for (const m of members) {
      const { failoverId } = started.members.find((x) => x.machine === m.machine)!;
      await expectDisksAt(m, failoverId, marks.g2);
      const record = await readRecord(deps.tables, m.machine, failoverId);
      expect(record).toMatchObject({ state: 'failed-over', kind: 'test', point: { id: marks.g2 } });
      expect((await readLocalTarget(deps.tables, m.machine, failoverId))?.test).toBe(true);
    }
    // A member's own failover is refused too.
    expect(
      (await api('POST', `machines/${members[0].machine}/failover`, { recoveryPoint: 'latest-processed' }))
        .status,
    ).toBe(409);
    await cancelAll();
  });

  it('group failover to a point id; then a member whose point is gone fails by name while the others fail over', async () => {
    const started = await groupFailover({ recoveryPoint: marks.g1 });
    const op = await waitForOperation(api, started.operationId);
    expect(op.status, op.error ?? JSON.stringify(op.progress)).toBe('Completed');
    for (const m of members) {
      const { failoverId } = started.members.find((x) => x.machine === m.machine)!;
      await expectDisksAt(m, failoverId, marks.g1);
      expect((await readRecord(deps.tables, m.machine, failoverId))?.kind).toBe('unplanned');
    }
    await cancelAll();

    // db's own recovery point at g2 disappears (e.g. its retention): its failover fails, named.
    const db = members[2];
    const points = await replication.tables.get(TABLES.recoveryPoints);
    for await (const row of points.listEntities({
      queryOptions: {
        filter: `PartitionKey eq ${odataString(db.machine)} and markerId eq ${odataString(marks.g2)}`,
      },
    })) {
      await points.deleteEntity(row.partitionKey as string, row.rowKey as string);
    }
    const failing = await groupFailover({ recoveryPoint: marks.g2, test: true });
    const failed = await waitForOperation(api, failing.operationId);
    expect(failed.status).toBe('Failed');
    expect(failed.error).toContain(`member ${db.machine}`);
    expect(failed.error).toMatch(/resolving the recovery point/);
    const status = failed.progress.members as { machine: string; state: string; step?: string }[];
    expect(status.find((m) => m.machine === db.machine)).toMatchObject({
      state: 'failed',
      step: 'resolving the recovery point',
    });
    for (const m of members.slice(0, 2)) {
      expect(status.find((s) => s.machine === m.machine)?.state).toBe('failed-over');
      await expectDisksAt(m, failing.members.find((x) => x.machine === m.machine)!.failoverId, marks.g2);
    }
    // db is free again; the others stay failed over until cancelled.
    expect((await api('POST', `machines/${db.machine}/cancel`)).status).toBe(404);
    await cancelAll();
  });

  it('a member held by a group failover that never started is taken after the grace period, and what it made is removed', async () => {
    const held = members[1];
    const dead = 'fo-00000000dead';
    const claim = (at: Date) =>
      beginFailover(
        deps.tables,
        {
          machine: held.machine,
          failoverId: dead,
          operationId: `group-${group}-deadbeef`,
          kind: 'test',
          selector: { id: marks.g1 },
          planRun: `group-${group}-deadbeef`,
        },
        at,
      );
    // Just claimed: its starter may still be starting it.
    await claim(new Date());
    const early = await api('POST', `groups/${group}/failover`, { recoveryPoint: marks.g1, test: true });
    expect(early.status).toBe(409);
    expect(early.body.error.message).toContain(held.machine);
    // The same claim, minutes old, with a disk its run had materialised before it died.
    const failovers = await deps.tables.get(FAILOVER_TABLES.failovers);
    const old = new Date(Date.now() - 5 * 60_000).toISOString();
    await failovers.updateEntity({ partitionKey: held.machine, rowKey: 'active', createdAt: old }, 'Merge');
    await failovers.updateEntity({ partitionKey: held.machine, rowKey: dead, updatedAt: old }, 'Merge');
    const point = await resolveRecoveryPoint(replication, held.machine, { id: marks.g1 });
    await deps.compute.materialiseDisk({
      machine: held.machine,
      failoverId: dead,
      test: true,
      disk: point.disks[0]!,
    });

    const started = await groupFailover({ recoveryPoint: marks.g1, test: true });
    const op = await waitForOperation(api, started.operationId);
    expect(op.status, op.error ?? JSON.stringify(op.progress)).toBe('Completed');
    const mine = started.members.find((m) => m.machine === held.machine)!.failoverId;
    await expectDisksAt(held, mine, marks.g1);
    const member = (await api('GET', `operations/${mine}`)).body;
    expect(member.progress.removedAbandoned[0].failoverId).toBe(dead);
    expect(member.progress.removedAbandoned[0].deleted).toContain(
      `failover-disks/${failoverDiskName(held.machine, point.disks[0]!.id, dead)}`,
    );
    expect(await readRecord(deps.tables, held.machine, dead)).toBeUndefined();
    await cancelAll();
    const blobs: string[] = [];
    for await (const b of deps.failoverDisks.listBlobsFlat({ prefix: `${held.machine}/` }))
      blobs.push(b.name);
    expect(blobs).toEqual([]);
  });
});
