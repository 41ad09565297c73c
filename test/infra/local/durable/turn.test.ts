import * as df from 'durable-functions';
import type { OrchestrationContext } from 'durable-functions';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { EventType, event, failureOf, type HistoryEvent } from '../../../../infra/local/durable/history';
import type { InstanceRecord } from '../../../../infra/local/durable/store';
import {
  completeTurn,
  interpretInvocation,
  interpretInvocationError,
  prepareTurn,
  triggerInput,
  type InvocationOutcome,
} from '../../../../infra/local/durable/turn';
import { LibraryInvoker } from './harness';

/*
 * The engine's turn functions against the real library, without storage: completions are
 * delivered in random orders and groupings (fast-check), and the orchestration must always
 * reach the same result. This is what catches a wrong event id for a retry timer or a
 * re-attempt: the library would wait forever for an id the engine never completes.
 */

const invoker = new LibraryInvoker()
  .addOrchestration('mixed', function* (context: OrchestrationContext) {
    const retry = new df.RetryOptions(10, 4);
    const a = context.df.callActivityWithRetry('flaky', retry, 'a');
    const b = context.df.callActivity('ok', 'b');
    yield context.df.Task.any([a, b]);
    const c = context.df.callActivityWithRetry('flaky', retry, 'c');
    const d = context.df.callActivity('ok', 'd');
    const t = context.df.createTimer(new Date(context.df.currentUtcDateTime.getTime() + 5));
    const e = context.df.callActivityWithRetry('flaky', retry, 'e');
    yield context.df.Task.all([c, d, t, e]);
    let g = '';
    try {
      yield context.df.callActivityWithRetry('broken', new df.RetryOptions(10, 2), 'g');
    } catch (err) {
      g = (err as Error).message;
    }
    const f: string = yield context.df.callActivityWithRetry('flaky', retry, 'f');
    const aResult: string = yield a;
    const bResult: string = yield b;
    return { a: aResult, b: bResult, c: c.result, d: d.result, e: e.result, f, g };
  })
  .addActivity('ok', { handler: () => 'unused' });

const has = (kind: string, name: string) =>
  kind === 'orchestration' ? name === 'mixed' : ['ok', 'flaky', 'broken'].includes(name);

interface Pending {
  event: () => HistoryEvent;
}

async function run(choices: number[]): Promise<InstanceRecord> {
  const attempts = new Map<string, number>();
  const activity = (name: string, key: string): { ok: true; value: string } | { ok: false; error: Error } => {
    const n = (attempts.get(key) ?? 0) + 1;
    attempts.set(key, n);
    if (name === 'ok') return { ok: true, value: `${key}!` };
    if (name === 'flaky' && n >= 3) return { ok: true, value: `${key} on ${n}` };
    return { ok: false, error: new Error(`${key} failed ${n}`) };
  };
  let rec: InstanceRecord = {
    instanceId: 'sim',
    name: 'mixed',
    status: 'Pending',
    executionId: 'e1',
    createdTime: new Date(0).toISOString(),
    lastUpdatedTime: new Date(0).toISOString(),
    historyCount: 0,
    nextEventId: 0,
    actionCount: 0,
    retries: {},
    outbox: [],
    consumed: [],
  };
  let history: HistoryEvent[] = [];
  let clock = Date.parse('2030-01-01T00:00:00Z');
  let pending: Pending[] = [];
  let step = 0;
  const pick = () => choices[step++ % choices.length];
  for (let turn = 0; turn < 300; turn++) {
    let incoming: HistoryEvent[] = [];
    if (turn > 0) {
      if (pending.length === 0) break;
      const count = 1 + (pick() % pending.length);
      for (let i = 0; i < count; i++) {
        const [chosen] = pending.splice(pick() % pending.length, 1);
        incoming.push(chosen.event());
      }
    }
    clock += 20;
    const now = new Date(clock);
    incoming = incoming.map((e, i) => ({ ...e, _key: `k${turn}-${i}` }));
    const prepared = prepareTurn(rec, history, incoming, now, has);
    let outcome: InvocationOutcome;
    try {
      outcome = interpretInvocation(
        await invoker.orchestrator('mixed', triggerInput(rec, history, prepared)),
      );
    } catch (err) {
      outcome = interpretInvocationError(err);
    }
    const result = completeTurn(rec, history, prepared, outcome, has);
    history = [...history, ...result.history];
    rec = result.record;
    for (const item of rec.outbox) {
      if (item.k === 'activity') {
        const scheduled = history[item.seq];
        const key = JSON.parse(scheduled.Input!) as string;
        pending.push({
          event: () => {
            const r = activity(scheduled.Name!, key);
            return r.ok
              ? event(EventType.TaskCompleted, {
                  TaskScheduledId: item.taskId,
                  Result: JSON.stringify(r.value),
                })
              : event(EventType.TaskFailed, {
                  TaskScheduledId: item.taskId,
                  Reason: r.error.message,
                  FailureDetails: failureOf(r.error),
                });
          },
        });
      } else if (item.k === 'timer') {
        pending.push({
          event: () => event(EventType.TimerFired, { TimerId: item.timerId, FireAt: item.fireAt }),
        });
      } else if (item.k !== 'parent') {
        throw new Error(`unexpected outbox item ${JSON.stringify(item)}`);
      }
    }
    if (rec.status === 'Completed' || rec.status === 'Failed') break;
  }
  pending = [];
  return rec;
}

describe('orchestrator turns (pure): event ids under any completion order', () => {
  it('always completes with the same result, however completions are grouped and ordered', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(fc.nat({ max: 1000 }), { minLength: 50, maxLength: 50 }), async (choices) => {
        const rec = await run(choices);
        expect(rec.status, rec.output).toBe('Completed');
        expect(JSON.parse(rec.output!)).toEqual({
          a: 'a on 3',
          b: 'b!',
          c: 'c on 3',
          d: 'd!',
          e: 'e on 3',
          f: 'f on 3',
          g: expect.stringContaining('g failed 2'),
        });
      }),
      { numRuns: 150 },
    );
  });
});
