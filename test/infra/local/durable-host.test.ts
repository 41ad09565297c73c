import { randomUUID } from 'node:crypto';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, inject, it } from 'vitest';
import { spawnLocalHost, type HostProcess } from '../../../infra/local/host-process';
import { readJsonLines, waitFor } from '../../helpers/host';

const appRoot = path.resolve(__dirname, '../../fixtures/durable-app');
const key = `key-${randomUUID()}`;

interface Run {
  activity: string;
  input: number | string;
  phase?: string;
  pid: number;
}

interface CheckStatus {
  id: string;
  statusQueryGetUri: string;
  sendEventPostUri: string;
  terminatePostUri: string;
  purgeHistoryDeleteUri: string;
}

interface HistoryEvent {
  EventType: string;
  FunctionName?: string;
  Result?: unknown;
  Input?: unknown;
}

function settings(outDir: string, hub: string, delayMs: number) {
  const connection = inject('azuriteConnectionString');
  return {
    AzureWebJobsStorage: connection,
    FIXTURE_HUB: hub,
    TEST_OUT_DIR: outDir,
    ACTIVITY_DELAY_MS: String(delayMs),
  };
}

async function start(outDir: string, hub: string, delayMs = 0): Promise<HostProcess> {
  return spawnLocalHost(
    {
      appRoot,
      entryPoint: path.join(appRoot, 'index.ts'),
      settings: settings(outDir, hub, delayMs),
      port: 0,
      functionKey: key,
    },
    () => undefined,
  );
}

async function status(uri: string) {
  const res = await fetch(uri);
  return {
    http: res.status,
    body: (await res.json()) as { runtimeStatus: string; output: unknown; customStatus: unknown },
  };
}

describe('Durable Functions on the local host', () => {
  let host: HostProcess | undefined;
  afterEach(async () => host?.stop());

  it('runs the sample orchestration started over HTTP to its output, with readable history', async () => {
    const outDir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-df-'));
    host = await start(outDir, `sample${randomUUID().slice(0, 6)}`);
    const base = `http://127.0.0.1:${host.port}/api`;
    const started = await fetch(`${base}/samples?code=${key}`, {
      method: 'POST',
      body: JSON.stringify({ n: 5 }),
    });
    expect(started.status).toBe(202);
    const check = (await started.json()) as CheckStatus;
    expect(started.headers.get('location')).toBe(check.statusQueryGetUri);

    await waitFor(async () => {
      const s = await status(check.statusQueryGetUri);
      return (s.body.customStatus as { stage?: string } | null)?.stage === 'waiting-for-approval'
        ? s
        : undefined;
    }, 'the orchestration to wait for approval');
    const raised = await fetch(check.sendEventPostUri.replace('{eventName}', 'approval'), {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ by: 'operator' }),
    });
    expect(raised.status).toBe(202);

    const done = await waitFor(async () => {
      const s = await status(check.statusQueryGetUri);
      return s.body.runtimeStatus === 'Completed' ? s : undefined;
    }, 'the orchestration to complete');
    expect(done.http).toBe(200);
    expect(done.body.output).toEqual({
      sum: 30,
      flaky: 'succeeded on attempt 3',
      approval: { by: 'operator' },
    });

    const runs = readJsonLines<Run>(path.join(outDir, 'runs.jsonl'));
    expect(runs.filter((r) => r.activity === 'flaky')).toHaveLength(3);
    expect(
      runs
        .filter((r) => r.activity === 'double' && r.phase === 'end')
        .map((r) => r.input)
        .sort(),
    ).toEqual([1, 2, 3, 4, 5]);

    const history = (await (await fetch(`${base}/samples/${check.id}/history?code=${key}`)).json()) as {
      history: HistoryEvent[];
    };
    const types = history.history.map((e) => e.EventType);
    expect(types[0]).toBe('ExecutionStarted');
    expect(types.at(-1)).toBe('ExecutionCompleted');
    expect(types.filter((t) => t === 'TaskCompleted')).toHaveLength(6);
    expect(types).toContain('TimerFired');
    expect(types).toContain('EventRaised');
  });

  it('resumes after the host is SIGKILLed mid-run: completes once, recorded activities never run again', async () => {
    const outDir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-df-kill-'));
    const hub = `kill${randomUUID().slice(0, 6)}`;
    host = await start(outDir, hub, 400);
    let base = `http://127.0.0.1:${host.port}/api`;
    const check = (await (
      await fetch(`${base}/samples?code=${key}`, { method: 'POST', body: JSON.stringify({ n: 12 }) })
    ).json()) as CheckStatus;
    const firstPid = host.child.pid!;
    await waitFor(() => {
      const ended = readJsonLines<Run>(path.join(outDir, 'runs.jsonl')).filter((r) => r.phase === 'end');
      return ended.length >= 3 ? ended : undefined;
    }, 'a few activities to finish');
    // An activity's result reaches the history a moment after the activity ends: wait until some
    // are recorded (the kill must come after recorded ones, and may come before the rest).
    const before = await waitFor(async () => {
      const h = (await (await fetch(`${base}/samples/${check.id}/history?code=${key}`)).json()) as {
        history: HistoryEvent[];
      };
      return h.history.some((e) => e.EventType === 'TaskCompleted') ? h : undefined;
    }, 'an activity result in the history');
    await host.kill();
    const recorded = new Set(
      before.history.filter((e) => e.EventType === 'TaskCompleted').map((e) => (e.Result as number) / 2),
    );
    expect(recorded.size).toBeGreaterThan(0);

    host = await start(outDir, hub, 0);
    base = `http://127.0.0.1:${host.port}/api`;
    const statusUri = check.statusQueryGetUri.replace(/127\.0\.0\.1:\d+/, `127.0.0.1:${host.port}`);
    await waitFor(async () => {
      const s = await status(statusUri);
      return (s.body.customStatus as { stage?: string } | null)?.stage === 'waiting-for-approval'
        ? s
        : undefined;
    }, 'the resumed orchestration to wait for approval');
    await fetch(
      check.sendEventPostUri
        .replace(/127\.0\.0\.1:\d+/, `127.0.0.1:${host.port}`)
        .replace('{eventName}', 'approval'),
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: '"after-restart"',
      },
    );
    const done = await waitFor(async () => {
      const s = await status(statusUri);
      return s.body.runtimeStatus === 'Completed' ? s : undefined;
    }, 'the resumed orchestration to complete');
    expect(done.body.output).toEqual({
      sum: 156,
      flaky: 'succeeded on attempt 3',
      approval: 'after-restart',
    });

    const runs = readJsonLines<Run>(path.join(outDir, 'runs.jsonl'));
    const rerunAfterRestart = runs.filter(
      (r) => r.activity === 'double' && r.pid !== firstPid && recorded.has(r.input as number),
    );
    expect(rerunAfterRestart).toEqual([]);
    const ends = runs
      .filter((r) => r.activity === 'double' && r.phase === 'end')
      .map((r) => r.input as number);
    expect(new Set(ends)).toEqual(new Set([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]));
    const history = (await (await fetch(`${base}/samples/${check.id}/history?code=${key}`)).json()) as {
      history: HistoryEvent[];
    };
    expect(history.history.filter((e) => e.EventType === 'ExecutionCompleted')).toHaveLength(1);
  });
});
