import { randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import type { ReprotectTargetRunner } from '../../agent/target/reprotect-target';
import type { HostProcess } from '../../infra/local/host-process';
import { failoverDepsFromSettings, readRecord } from '../../shared/failover';
import type { MessageSender } from '../../shared/messaging';
import { activeOperation, protectionDepsFromSettings } from '../../shared/reprotect';
import {
  apiClient,
  queueSender,
  testStack,
  waitForOperation,
  type Api,
  type Operation,
} from '../shared/failover/helpers';
import { quietLogger, rng, testDeps } from '../shared/replication/helpers';
import {
  expectSiteHome,
  protectAndFailOver,
  resumeForward,
  startTarget,
  writeFailedOver,
} from './failback-setup';

// A plan failback that fails half-way, through HTTP on the local host: the site target of the
// machine in the group that runs first is down, so its failback fails (waiting for the target);
// the plan stops there, reports that machine's step and reason, and releases the machine of the
// next group, whose failback never started. With the target back, POSTing the plan's failback
// again brings both home from where they stopped: every site disk equals its model.

const connection = inject('azuriteConnectionString');
const KiB = 1024;
const suffix = randomUUID().slice(0, 6);

describe('plan failback that fails half-way', () => {
  const stack = testStack(connection, 'planfbfail');
  const replication = testDeps(connection);
  const failover = failoverDepsFromSettings(stack.settings, { replication, log: quietLogger() });
  const protection = protectionDepsFromSettings(stack.settings, { failover, log: quietLogger() });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-planfbfail-'));
  const runners: ReprotectTargetRunner[] = [];
  let host: HostProcess;
  let api: Api;
  let sender: MessageSender;

  beforeAll(async () => {
    host = await stack.start();
    api = apiClient(() => host.port, stack.key);
    sender = queueSender(stack);
  });

  afterAll(async () => {
    await Promise.all(runners.map((r) => r.stop()));
    await sender?.close();
    await Promise.all(stack.hosts.map((h) => h.stop()));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const finished = (o: Operation) => o.status !== 'Running' && o.status !== 'Pending';

  it('stops at the failed machine, frees the unstarted one, and a second POST brings both home', async () => {
    const w = { api, replication, sender, failover, protection, dir };
    const [inner, outer] = await protectAndFailOver(
      w,
      [
        { name: `inner-${suffix}`, disks: [{ id: 'd0', sizeBytes: 256 * KiB }] },
        { name: `outer-${suffix}`, disks: [{ id: 'd0', sizeBytes: 256 * KiB }] },
      ],
      70,
    );
    const plan = `tiers-${suffix}`;
    const put = await api('PUT', `plans/${plan}`, {
      groups: [
        { name: 'inner', machines: [inner.name] },
        { name: 'outer', machines: [outer.name] },
      ],
    });
    expect(put.status, JSON.stringify(put.body)).toBe(201);
    const random = rng(11);
    await writeFailedOver(w, [inner, outer], random, 8);
    const targets = new Map([inner, outer].map((m) => [m.name, startTarget(w, m)]));
    runners.push(...targets.values());
    const reprotects = new Map<string, string>();
    for (const m of [inner, outer]) {
      const rp = await api('POST', `machines/${m.name}/reprotect`, { intervalSeconds: 1 });
      expect(rp.status, JSON.stringify(rp.body)).toBe(202);
      reprotects.set(m.name, rp.body.operationId);
    }
    for (const id of reprotects.values()) {
      const o = await waitForOperation(api, id, (x) => x.progress?.lastAppliedPass >= 1 || finished(x));
      expect(o.status, o.error).toBe('Running');
    }
    await writeFailedOver(w, [inner, outer], random, 8);

    // The outer group runs first (reverse order); its site target is down.
    await targets.get(outer.name)!.stop();
    const first = await api('POST', `plans/${plan}/failback`, { waitSeconds: 10 });
    expect(first.status, JSON.stringify(first.body)).toBe(202);
    const failed = await waitForOperation(api, first.body.operationId, finished, 60_000);
    expect(failed.status).toBe('Failed');
    expect(failed.error).toContain(
      `${outer.name} failed while waiting for the site to apply the last changes`,
    );
    expect(failed.error).toContain(`Not started`);
    expect(failed.error).toContain(inner.name);
    expect(failed.progress).toMatchObject({
      state: 'failed',
      failure: { group: 'outer', step: 'failback' },
      groups: [
        {
          name: 'outer',
          state: 'failed',
          machines: {
            [outer.name]: { state: 'failed', step: 'waiting for the site to apply the last changes' },
          },
        },
        { name: 'inner', state: 'pending', machines: { [inner.name]: { state: 'not-started' } } },
      ],
    });
    // Nothing holds either machine; the inner machine's reprotect handed over to the failback.
    for (const m of [inner, outer]) expect(await activeOperation(protection.tables, m.name)).toBeUndefined();
    expect((await waitForOperation(api, reprotects.get(inner.name)!, finished)).output).toMatchObject({
      state: 'handed-over',
    });

    // The target comes back (it resumes from its cursor); the plan's failback again brings both home.
    runners.push(startTarget(w, outer));
    const second = await api('POST', `plans/${plan}/failback`, { waitSeconds: 60 });
    expect(second.status, JSON.stringify(second.body)).toBe(202);
    expect(Object.keys(second.body.machines).sort()).toEqual([inner.name, outer.name].sort());
    for (const m of [outer, inner]) await resumeForward(w, m, second.body.operationId);
    const done = await waitForOperation(api, second.body.operationId, finished, 60_000);
    expect(done.status, done.error).toBe('Completed');
    expect(done.output).toMatchObject({
      state: 'failed-back',
      waitingForAgents: [],
      groups: [
        { name: 'outer', machines: { [outer.name]: { state: 'protected' } } },
        { name: 'inner', machines: { [inner.name]: { state: 'protected' } } },
      ],
    });
    for (const m of [inner, outer]) {
      expectSiteHome(m);
      expect((await readRecord(failover.tables, m.name, m.failoverId))?.state).toBe('failed-back');
    }
  }, 120_000);
});
