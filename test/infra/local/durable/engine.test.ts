import http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as df from 'durable-functions';
import type { OrchestrationContext } from 'durable-functions';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { LibraryInvoker, startTestHost, waitFor, waitForDone, type TestHost } from './harness';

const invoker = new LibraryInvoker();
const counts = new Map<string, number>();
const bump = (key: string) => {
  const n = (counts.get(key) ?? 0) + 1;
  counts.set(key, n);
  return n;
};

invoker
  .addActivity('double', { handler: (n: unknown) => (n as number) * 2 })
  .addActivity('echo', { handler: (v: unknown) => v })
  .addActivity('nothing', { handler: () => undefined })
  .addActivity('flaky', {
    handler: (key: unknown) => {
      const n = bump(String(key));
      if (n < 3) throw new Error(`flaky failure ${n}`);
      return `ok after ${n}`;
    },
  })
  .addActivity('broken', {
    handler: (key: unknown) => {
      bump(String(key));
      throw new Error('the disk is on fire');
    },
  })
  .addActivity('slow', {
    handler: async (ms: unknown) => {
      await new Promise((r) => setTimeout(r, ms as number));
      return 'slow done';
    },
  })
  .addOrchestration('fanOut', function* (context: OrchestrationContext) {
    const items = context.df.getInput() as number[];
    const first: number = yield context.df.callActivity('double', items[0]);
    const doubled: number[] = yield context.df.Task.all(
      items.map((n) => context.df.callActivity('double', n)),
    );
    return { first, doubled, sum: doubled.reduce((a, b) => a + b, 0) };
  })
  .addOrchestration('payloads', function* (context: OrchestrationContext) {
    const text: string = yield context.df.callActivity('echo', 'plain "quoted" text');
    const obj: unknown = yield context.df.callActivity('echo', { a: [1, 2], b: null });
    const none: unknown = yield context.df.callActivity('nothing');
    return { text, obj, none: none === undefined ? 'undefined' : none, input: context.df.getInput() };
  })
  .addOrchestration('retrying', function* (context: OrchestrationContext) {
    const options = new df.RetryOptions(50, 3);
    options.backoffCoefficient = 2;
    const [a, b]: string[] = yield context.df.Task.all([
      context.df.callActivityWithRetry('flaky', options, `${context.df.instanceId}-a`),
      context.df.callActivityWithRetry('flaky', options, `${context.df.instanceId}-b`),
    ]);
    const after: number = yield context.df.callActivity('double', 21);
    return { a, b, after };
  })
  .addOrchestration('retryExhausted', function* (context: OrchestrationContext) {
    try {
      yield context.df.callActivityWithRetry('broken', new df.RetryOptions(20, 2), context.df.instanceId);
      return 'unexpected';
    } catch (err) {
      return `caught: ${(err as Error).message}`;
    }
  })
  .addOrchestration('timer', function* (context: OrchestrationContext) {
    const start = context.df.currentUtcDateTime;
    const fireAt = new Date(start.getTime() + 300);
    yield context.df.createTimer(fireAt);
    return { waitedAtLeast: context.df.currentUtcDateTime.getTime() >= fireAt.getTime() };
  })
  .addOrchestration('approval', function* (context: OrchestrationContext) {
    context.df.setCustomStatus({ stage: 'waiting' });
    const first: unknown = yield context.df.waitForExternalEvent('approve');
    const second: unknown = yield context.df.waitForExternalEvent('approve');
    context.df.setCustomStatus({ stage: 'approved' });
    return { first, second };
  })
  .addOrchestration('race', function* (context: OrchestrationContext) {
    const { wait, ms } = context.df.getInput() as { wait: number; ms: number };
    const timer = context.df.createTimer(new Date(context.df.currentUtcDateTime.getTime() + wait));
    const work = context.df.callActivity('slow', ms);
    const winner: unknown = yield context.df.Task.any([work, timer]);
    if (winner === work) {
      timer.cancel();
      return `work: ${work.result as string}`;
    }
    return 'timeout';
  })
  .addOrchestration('eventOrTimeout', function* (context: OrchestrationContext) {
    const timer = context.df.createTimer(new Date(context.df.currentUtcDateTime.getTime() + 200));
    const event = context.df.waitForExternalEvent('never');
    const winner: unknown = yield context.df.Task.any([event, timer]);
    return winner === timer ? 'timed out' : 'event';
  })
  .addOrchestration('child', function* (context: OrchestrationContext) {
    const input = context.df.getInput() as { n: number; failUntil?: number; key?: string };
    if (input.failUntil !== undefined && bump(input.key!) < input.failUntil) throw new Error('child says no');
    const doubled: number = yield context.df.callActivity('double', input.n);
    return { doubled, parent: context.df.parentInstanceId ?? null, me: context.df.instanceId };
  })
  .addOrchestration('parent', function* (context: OrchestrationContext) {
    const plain: { doubled: number; parent: string; me: string } = yield context.df.callSubOrchestrator(
      'child',
      { n: 5 },
    );
    const named: { doubled: number } = yield context.df.callSubOrchestrator(
      'child',
      { n: 6 },
      `${context.df.instanceId}-named`,
    );
    const retried: { doubled: number } = yield context.df.callSubOrchestratorWithRetry(
      'child',
      new df.RetryOptions(20, 3),
      {
        n: 7,
        failUntil: 2,
        key: `${context.df.instanceId}-retry`,
      },
    );
    let failure = '';
    try {
      yield context.df.callSubOrchestrator('child', {
        n: 1,
        failUntil: 99,
        key: `${context.df.instanceId}-fail`,
      });
    } catch (err) {
      failure = (err as Error).message;
    }
    return { plain, named: named.doubled, retried: retried.doubled, failure };
  })
  .addOrchestration('counter', function* (context: OrchestrationContext) {
    const n = context.df.getInput() as number;
    const doubled: number = yield context.df.callActivity('double', n);
    if (n < 3) {
      context.df.continueAsNew(n + 1);
      return undefined;
    }
    return { n, doubled };
  })
  .addOrchestration('catcher', function* (context: OrchestrationContext) {
    try {
      yield context.df.callActivity('broken', `${context.df.instanceId}-catch`);
      return 'unexpected';
    } catch (err) {
      return { caught: (err as Error).message };
    }
  })
  .addOrchestration('thrower', function* (context: OrchestrationContext) {
    yield context.df.callActivity('broken', `${context.df.instanceId}-throw`);
    return 'unreachable';
  })
  .addOrchestration('throwsItself', function* (context: OrchestrationContext) {
    yield context.df.callActivity('double', 1);
    throw new Error('orchestrator gave up');
  })
  .addOrchestration('missingActivity', function* (context: OrchestrationContext) {
    try {
      yield context.df.callActivity('doesNotExist', 1);
      return 'unexpected';
    } catch (err) {
      return (err as Error).message;
    }
  })
  .addOrchestration('forever', function* (context: OrchestrationContext) {
    yield context.df.waitForExternalEvent('never');
    return 'done';
  })
  .addOrchestration('fetcher', function* (context: OrchestrationContext) {
    const url = context.df.getInput() as string;
    const res: df.DurableHttpResponse = yield context.df.callHttp({
      method: 'POST',
      url,
      body: { ask: 'status' },
    });
    return { status: res.statusCode, content: res.content };
  })
  .addOrchestration('entityUser', function* (context: OrchestrationContext) {
    context.df.signalEntity(new df.EntityId('counter', 'k'), 'add', 1);
    yield context.df.callActivity('double', 1);
    return 'done';
  });

let host: TestHost;

beforeAll(async () => {
  host = await startTestHost(inject('azuriteConnectionString'), 'engineTests', invoker);
});

afterAll(async () => {
  await host?.stop();
});

describe('local Durable engine: orchestrations through the durable-functions library', () => {
  it('fans out and in over activities', async () => {
    const id = await host.client.startNew('fanOut', { input: [1, 2, 3, 4, 5] });
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Completed');
    expect(status.output).toEqual({ first: 2, doubled: [2, 4, 6, 8, 10], sum: 30 });
    const completed = (
      status.history as { EventType: string; FunctionName?: string; Result?: unknown }[]
    ).filter((e) => e.EventType === 'TaskCompleted');
    expect(completed).toHaveLength(6);
    expect(completed.every((e) => e.FunctionName === 'double')).toBe(true);
  });

  it('passes strings, objects and undefined through activities unchanged', async () => {
    const id = await host.client.startNew('payloads', { input: 'a "string" input' });
    const status = await waitForDone(host.client, id);
    expect(status.output).toEqual({
      text: 'plain "quoted" text',
      obj: { a: [1, 2], b: null },
      none: null,
      input: 'a "string" input',
    });
    expect(status.input).toBe('a "string" input');
  });

  it('retries a failing activity under a retry policy, in parallel, then goes on', async () => {
    const id = await host.client.startNew('retrying');
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Completed');
    expect(status.output).toEqual({ a: 'ok after 3', b: 'ok after 3', after: 42 });
    expect(counts.get(`${id}-a`)).toBe(3);
    expect(counts.get(`${id}-b`)).toBe(3);
    const events = (status.history as { EventType: string }[]).map((e) => e.EventType);
    expect(events.filter((e) => e === 'TaskFailed')).toHaveLength(4);
    expect(events.filter((e) => e === 'TimerFired')).toHaveLength(4);
  });

  it('gives up after the last attempt and the orchestrator can catch it', async () => {
    const id = await host.client.startNew('retryExhausted');
    const status = await waitForDone(host.client, id);
    expect(status.output).toMatch(/^caught: .*the disk is on fire/);
    expect(counts.get(id)).toBe(2);
  });

  it('waits on a durable timer', async () => {
    const id = await host.client.startNew('timer');
    const status = await waitForDone(host.client, id);
    expect(status.output).toEqual({ waitedAtLeast: true });
    expect((status.history as { EventType: string }[]).some((e) => e.EventType === 'TimerFired')).toBe(true);
  });

  it('waits for external events (one raised before the wait is kept) and shows custom status', async () => {
    const id = await host.client.startNew('approval');
    await waitFor('custom status', async () => {
      const s = await host.client.getStatus(id);
      return (s.customStatus as { stage?: string } | null)?.stage === 'waiting';
    });
    await host.client.raiseEvent(id, 'approve', { by: 'alice' });
    await host.client.raiseEvent(id, 'approve', 'bob');
    const status = await waitForDone(host.client, id);
    expect(status.output).toEqual({ first: { by: 'alice' }, second: 'bob' });
    expect(status.customStatus).toEqual({ stage: 'approved' });
  });

  it('races an activity against a timer (Task.any): the activity wins', async () => {
    const id = await host.client.startNew('race', { input: { wait: 60 * 60_000, ms: 20 } });
    const status = await waitForDone(host.client, id);
    expect(status.output).toBe('work: slow done');
  });

  it('races an event against a timer (Task.any): the timer wins', async () => {
    const id = await host.client.startNew('eventOrTimeout');
    const status = await waitForDone(host.client, id);
    expect(status.output).toBe('timed out');
  });

  it('runs sub-orchestrations: default and given ids, with retry, and failure propagation', async () => {
    const id = await host.client.startNew('parent');
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Completed');
    const out = status.output as {
      plain: { doubled: number; parent: string; me: string };
      named: number;
      retried: number;
      failure: string;
    };
    expect(out.plain.doubled).toBe(10);
    expect(out.plain.parent).toBe(id);
    expect(out.plain.me).toBe(`${id}:0`);
    expect(out.named).toBe(12);
    expect(out.retried).toBe(14);
    const failures = (status.history as { EventType: string }[]).filter(
      (e) => e.EventType === 'SubOrchestrationInstanceFailed',
    );
    expect(failures).toHaveLength(2); // one retried attempt, one failure that propagated
    expect(out.failure).toContain('child says no');
    const named = await host.client.getStatus(`${id}-named`);
    expect(named.runtimeStatus).toBe('Completed');
  });

  it('continues as new until done, keeping only the last execution', async () => {
    const id = await host.client.startNew('counter', { input: 0 });
    const status = await waitForDone(host.client, id);
    expect(status.output).toEqual({ n: 3, doubled: 6 });
    expect(status.input).toBe(3);
    const started = (status.history as { EventType: string }[]).filter(
      (e) => e.EventType === 'ExecutionStarted',
    );
    expect(started).toHaveLength(1);
  });

  it('lets an orchestrator catch an activity failure', async () => {
    const id = await host.client.startNew('catcher');
    const status = await waitForDone(host.client, id);
    expect((status.output as { caught: string }).caught).toContain('the disk is on fire');
  });

  it('fails the instance with the error message when an activity failure is not handled', async () => {
    const id = await host.client.startNew('thrower');
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Failed');
    expect(status.output).toMatch(/^Orchestrator function 'thrower' failed: .*the disk is on fire/);
  });

  it('fails the instance when the orchestrator throws', async () => {
    const id = await host.client.startNew('throwsItself');
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Failed');
    expect(status.output).toBe("Orchestrator function 'throwsItself' failed: orchestrator gave up");
  });

  it('fails a call to an unknown activity with a clear message', async () => {
    const id = await host.client.startNew('missingActivity');
    const status = await waitForDone(host.client, id);
    expect(status.output).toContain("The activity function 'doesNotExist' doesn't exist");
  });

  it('fails clearly on durable entities, which it does not support', async () => {
    const id = await host.client.startNew('entityUser');
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Failed');
    expect(status.output).toContain('Durable entities');
  });

  it('suspends and resumes: events wait while suspended', async () => {
    const id = await host.client.startNew('approval');
    await waitFor('running', async () => (await host.client.getStatus(id)).runtimeStatus === 'Running');
    await host.client.suspend(id, 'maintenance');
    await waitFor('suspended', async () => (await host.client.getStatus(id)).runtimeStatus === 'Suspended');
    await host.client.raiseEvent(id, 'approve', 1);
    await host.client.raiseEvent(id, 'approve', 2);
    await new Promise((r) => setTimeout(r, 300));
    expect((await host.client.getStatus(id)).runtimeStatus).toBe('Suspended');
    await host.client.resume(id, 'back');
    const status = await waitForDone(host.client, id);
    expect(status.output).toEqual({ first: 1, second: 2 });
  });

  it('makes HTTP calls with callHttp, following a 202 Location until the answer is final', async () => {
    let polls = 0;
    const server = http.createServer((req, res) => {
      if (req.url === '/start' && req.method === 'POST') {
        res.writeHead(202, { location: '/poll', 'retry-after': '0' }).end();
      } else if (req.url === '/poll') {
        polls++;
        if (polls < 2) res.writeHead(202, { location: '/poll', 'retry-after': '0' }).end();
        else res.writeHead(200, { 'content-type': 'application/json' }).end('{"state":"ready"}');
      } else res.writeHead(404).end();
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/start`;
      const id = await host.client.startNew('fetcher', { input: url });
      const status = await waitForDone(host.client, id);
      expect(status.output).toEqual({ status: 200, content: '{"state":"ready"}' });
      expect(polls).toBe(2);
    } finally {
      server.close();
    }
  });

  it('terminates a waiting instance; later events are refused as gone', async () => {
    const id = await host.client.startNew('forever');
    await waitFor('running', async () => (await host.client.getStatus(id)).runtimeStatus === 'Running');
    await host.client.terminate(id, 'operator cancelled');
    const status = await waitForDone(host.client, id);
    expect(status.runtimeStatus).toBe('Terminated');
    expect(status.output).toBe('operator cancelled');
    await host.client.raiseEvent(id, 'never', 1); // 410: resolves without effect, as with the extension
    expect((await host.client.getStatus(id)).runtimeStatus).toBe('Terminated');
  });

  it('purges a finished instance and refuses to purge a running one', async () => {
    const done = await host.client.startNew('fanOut', { input: [1] });
    await waitForDone(host.client, done);
    const running = await host.client.startNew('forever');
    await expect(host.client.purgeInstanceHistory(running)).rejects.toThrow(/409/);
    const result = await host.client.purgeInstanceHistory(done);
    expect(result.instancesDeleted).toBe(1);
    await expect(host.client.getStatus(done)).rejects.toThrow(/404/);
    const again = await host.client.purgeInstanceHistory(done);
    expect(again.instancesDeleted).toBe(0);
    await host.client.terminate(running, 'cleanup');
  });

  it('starts with a given instance id, refuses a duplicate while it runs, and restarts a finished one', async () => {
    const id = `fixed-${Date.now()}`;
    await host.client.startNew('forever', { instanceId: id });
    await expect(host.client.startNew('forever', { instanceId: id })).rejects.toThrow(/409/);
    await host.client.terminate(id, 'stop');
    await waitForDone(host.client, id);
    await host.client.startNew('fanOut', { instanceId: id, input: [21] });
    const status = await waitForDone(host.client, id);
    expect(status.output).toEqual({ first: 42, doubled: [42], sum: 42 });
  });

  it('rejects unknown orchestrators and bad instance ids', async () => {
    await expect(host.client.startNew('noSuchOrchestrator')).rejects.toThrow(/400/);
    await expect(host.client.startNew('fanOut', { instanceId: 'x'.repeat(300), input: [1] })).rejects.toThrow(
      /400/,
    );
  });

  it('shows status with and without history, input and history output', async () => {
    const id = await host.client.startNew('fanOut', { input: [7] });
    await waitForDone(host.client, id);
    const plain = await host.client.getStatus(id);
    expect(plain.name).toBe('fanOut');
    expect(plain.input).toEqual([7]);
    expect(plain.history).toBeUndefined();
    const withHistory = await host.client.getStatus(id, { showHistory: true });
    const types = (withHistory.history as { EventType: string; Result?: unknown }[]).map((e) => e.EventType);
    expect(types[0]).toBe('ExecutionStarted');
    expect(types.at(-1)).toBe('ExecutionCompleted');
    expect((withHistory.history as { Result?: unknown }[]).every((e) => e.Result === undefined)).toBe(true);
    const withOutput = await host.client.getStatus(id, { showHistory: true, showHistoryOutput: true });
    const last = (withOutput.history as { EventType: string; Result?: unknown }[]).at(-1)!;
    expect(last.Result).toEqual({ first: 14, doubled: [14], sum: 14 });
  });

  it('lists instances, all and by status', async () => {
    const waiting = await host.client.startNew('forever');
    await waitFor('running', async () => (await host.client.getStatus(waiting)).runtimeStatus === 'Running');
    const all = await host.client.getStatusAll();
    expect(all.some((s) => s.instanceId === waiting)).toBe(true);
    const running = await host.client.getStatusBy({ runtimeStatus: [df.OrchestrationRuntimeStatus.Running] });
    expect(running.every((s) => s.runtimeStatus === 'Running')).toBe(true);
    expect(running.some((s) => s.instanceId === waiting)).toBe(true);
    const completed = await host.client.getStatusBy({
      runtimeStatus: [df.OrchestrationRuntimeStatus.Completed],
    });
    expect(completed.length).toBeGreaterThan(0);
    expect(completed.every((s) => s.runtimeStatus === 'Completed')).toBe(true);
    await host.client.terminate(waiting, 'done');
  });
});
