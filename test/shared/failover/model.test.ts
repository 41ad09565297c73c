import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ValidationError } from '../../../shared/errors';
import {
  failoverIdFromUuid,
  IN_PROGRESS,
  isFailoverId,
  nextState,
  parseFailoverRequest,
  parsePlan,
  parsePlanRun,
  type FailoverKind,
  type FailoverState,
} from '../../../shared/failover';

const STATES: FailoverState[] = [
  'accepted',
  'quiescing',
  'applying-pending',
  'materialising',
  'creating-target',
  'failed-over',
  'changing-point',
  'committing',
  'committed',
  'cancelling',
  'failed',
];
const KINDS: FailoverKind[] = ['test', 'planned', 'unplanned'];

describe('failover state machine', () => {
  it('allows each action only from failed-over (cancel also from failed); drills cannot be committed', () => {
    for (const state of STATES) {
      for (const kind of KINDS) {
        const record = { state, kind, machine: 'm', failoverId: 'fo-000000000000' };
        const commit = nextState(record, 'commit');
        const change = nextState(record, 'change-recovery-point');
        const cancel = nextState(record, 'cancel');
        expect(commit.ok).toBe(state === 'failed-over' && kind !== 'test');
        expect(change.ok).toBe(state === 'failed-over');
        expect(cancel.ok).toBe(state === 'failed-over' || state === 'failed');
        if (commit.ok) expect(commit.state).toBe('committing');
        if (change.ok) expect(change.state).toBe('changing-point');
        if (cancel.ok) expect(cancel.state).toBe('cancelling');
        for (const r of [commit, change, cancel])
          if (!r.ok) expect(r.reason).toMatch(/^(Test failover|Failover) fo-000000000000 of m /);
        if (IN_PROGRESS.includes(state)) expect((cancel as { reason: string }).reason).toMatch(/wait until/);
      }
    }
    const committed = nextState(
      { state: 'committed', kind: 'unplanned', machine: 'm', failoverId: 'fo-000000000000' },
      'change-recovery-point',
    );
    expect(committed).toEqual({
      ok: false,
      reason: expect.stringContaining('cannot change its recovery point'),
    });
  });

  it('failover ids are fo- and 12 lower-case hex digits', () => {
    fc.assert(fc.property(fc.uuid(), (u) => isFailoverId(failoverIdFromUuid(u))));
  });
});

describe('failover request validation', () => {
  it('reads every kind of recovery point', () => {
    expect(parseFailoverRequest({ recoveryPoint: 'latest' }).recoveryPoint).toBe('latest');
    expect(parseFailoverRequest({ recoveryPoint: 'm00001', test: true })).toMatchObject({
      test: true,
      planned: false,
      waitSeconds: 900,
    });
    expect(
      parseFailoverRequest({ recoveryPoint: { time: '2026-01-01T00:00:00+01:00' } }).recoveryPoint,
    ).toEqual({ time: '2026-01-01T00:00:00+01:00' });
  });

  it.each([
    [{ recoveryPoint: 5 }, 'recoveryPoint'],
    [{ recoveryPoint: { time: 'noon' } }, 'recoveryPoint.time'],
    [{ recoveryPoint: { when: 'x' } }, 'recoveryPoint'],
    [{ recoveryPoint: 'latest', planned: 'yes' }, 'planned'],
    [{ recoveryPoint: 'latest', waitSeconds: 0 }, 'waitSeconds'],
    [{ recoveryPoint: 'latest', target: { location: 'x' } }, 'target.subscriptionId'],
    [[], 'body'],
  ])('rejects %j naming %s', (body, target) => {
    try {
      parseFailoverRequest(body);
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(ValidationError);
      expect((err as ValidationError).target).toBe(target);
    }
  });
});

describe('recovery plan validation', () => {
  const now = new Date('2026-01-01T00:00:00Z');

  it('fills defaults: the plan point, action timeouts and retries', () => {
    const plan = parsePlan(
      'p',
      {
        recoveryPoint: 'latest-app-consistent',
        groups: [
          {
            name: 'g1',
            machines: ['a', { machine: 'b', recoveryPoint: { time: '2026-01-01T00:00:00Z' } }],
            pre: [{ type: 'webhook', name: 'hook', url: 'https://example.test/x' }],
            post: [
              { type: 'manual', name: 'ok' },
              { type: 'wait', name: 'w', seconds: 5 },
            ],
          },
        ],
      },
      now,
    );
    expect(plan.groups[0].machines).toEqual([
      { machine: 'a', recoveryPoint: 'latest-app-consistent' },
      { machine: 'b', recoveryPoint: { time: '2026-01-01T00:00:00.000Z' } },
    ]);
    expect(plan.groups[0].pre[0]).toMatchObject({
      method: 'POST',
      timeoutSeconds: 30,
      retries: 3,
      retryIntervalSeconds: 5,
    });
    expect(plan.groups[0].post[0]).toMatchObject({ type: 'manual', instructions: '' });
  });

  it.each([
    [{ groups: [{ name: 'g', pre: [{ type: 'wait', name: 'w', seconds: 0 }] }] }, 'groups[0].pre[0].seconds'],
    [{ groups: [{ name: 'g' }, { name: 'g' }] }, 'groups[1].name'],
    [
      {
        groups: [
          {
            name: 'g',
            pre: [{ type: 'wait', name: 'x', seconds: 1 }],
            post: [{ type: 'manual', name: 'x' }],
          },
        ],
      },
      'groups[0]',
    ],
    [{ groups: [{ name: 'G' }] }, 'groups[0].name'],
    [{ groups: [{ name: 'g', machines: ['a', 'a'] }] }, 'groups[0].machines[1]'],
  ])('rejects %j naming %s', (body, target) => {
    expect(() => parsePlan('p', body, now)).toThrow(expect.objectContaining({ target }));
  });

  it('plan runs: defaults, and planned with test refused', () => {
    expect(parsePlanRun(undefined)).toMatchObject({ test: false, planned: false, onFailure: 'wait' });
    expect(() => parsePlanRun({ test: true, planned: true })).toThrow(
      expect.objectContaining({ target: 'planned' }),
    );
    expect(() => parsePlanRun({ onFailure: 'ignore' })).toThrow(
      expect.objectContaining({ target: 'onFailure' }),
    );
  });
});
