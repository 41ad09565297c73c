import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import type { DurableClient } from 'durable-functions';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { StorageClients } from '../../../../shared/storage';
import { DurableStore } from '../../../../infra/local/durable/store';
import { EventType } from '../../../../infra/local/durable/history';
import { clientFor, waitFor } from './harness';

const HUB = 'restartTests';
const dir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-durable-crash-'));
const children: ChildProcess[] = [];

afterAll(() => {
  for (const child of children)
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

/** Starts a host process; resolves with a client for it once it is ready. */
async function startHost(): Promise<{ child: ChildProcess; client: DurableClient }> {
  const script = path.join(__dirname, 'crash-host.ts');
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', script, inject('azuriteConnectionString'), HUB, dir],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
      cwd: path.resolve(__dirname, '../../../..'),
    },
  );
  children.push(child);
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const line = await new Promise<string>((resolve, reject) => {
    const rl = createInterface({ input: child.stdout! });
    rl.once('line', resolve);
    child.once('exit', (code) =>
      reject(new Error(`crash-host exited with ${code} before it was ready: ${stderr}`)),
    );
  });
  const ready = JSON.parse(line) as { client: Record<string, unknown> };
  return { child, client: clientFor(ready.client) };
}

async function kill(child: ChildProcess): Promise<void> {
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.kill('SIGKILL');
  await exited;
}

function runs(): string[] {
  const file = path.join(dir, 'runs.log');
  return existsSync(file) ? readFileSync(file, 'utf8').split('\n').filter(Boolean) : [];
}

const starts = (log: string[], key: string) => log.filter((l) => l === `start ${key}`).length;

/** Activity keys whose completion (or failure) the engine has recorded, read from storage. */
async function recordedCompletions(store: DurableStore, instanceId: string): Promise<Map<string, number>> {
  const inputs = new Map<number, string>();
  for await (const row of store.history.listEntities<Record<string, unknown>>({
    queryOptions: { filter: `PartitionKey eq '${instanceId}'` },
  })) {
    const e = JSON.parse(String(row.event)) as { EventType: number; EventId: number; Input?: string };
    if (e.EventType === EventType.TaskScheduled && e.Input) {
      const input = JSON.parse(e.Input) as { key?: string } | string;
      inputs.set(e.EventId, typeof input === 'string' ? input : String(input.key));
    }
  }
  const recorded = new Map<string, number>();
  for await (const row of store.inbox.listEntities<Record<string, unknown>>({
    queryOptions: { filter: `PartitionKey eq '${instanceId}'` },
  })) {
    const e = JSON.parse(String(row.event)) as { EventType: number; TaskScheduledId?: number };
    if (
      (e.EventType === EventType.TaskCompleted || e.EventType === EventType.TaskFailed) &&
      e.TaskScheduledId !== undefined
    ) {
      const key = inputs.get(e.TaskScheduledId);
      if (key) recorded.set(key, (recorded.get(key) ?? 0) + 1);
    }
  }
  return recorded;
}

describe('local Durable engine: a host killed with SIGKILL mid-run', () => {
  it('resumes on restart, completes once, and never re-runs an activity whose completion was recorded', async () => {
    const store = new DurableStore(
      StorageClients.fromConnectionString(inject('azuriteConnectionString')),
      HUB,
    );

    // 1. Start the pipeline; kill the host while the slow fan-out steps run.
    let host = await startHost();
    // Slow steps long enough that a loaded machine still kills the host while they sleep.
    const durations = [30, 60, 90, 12_000, 12_000];
    const instanceId = await host.client.startNew('pipeline', { input: durations });
    await waitFor('fast steps done and slow ones started', async () => {
      const log = runs();
      return (
        ['step-0', 'step-1', 'step-2'].every((k) => log.includes(`done ${k}`)) &&
        log.includes('start step-3') &&
        log.includes('start step-4')
      );
    });
    // Let the fast completions be recorded (the slow steps are still sleeping).
    await waitFor(
      'fast completions recorded',
      async () => (await recordedCompletions(store, instanceId)).size >= 3,
    );
    await kill(host.child);
    const recordedAtFirstKill = await recordedCompletions(store, instanceId);
    const runsAtFirstKill = runs();
    expect(runsAtFirstKill.includes('done step-3')).toBe(false);

    // 2. Restart; kill again while the orchestration waits on its durable timer.
    host = await startHost();
    await waitFor(
      'the timer stage',
      async () => (await host.client.getStatus(instanceId)).customStatus === 'timer',
      60_000,
    );
    await kill(host.child);
    const recordedAtSecondKill = await recordedCompletions(store, instanceId);
    const runsAtSecondKill = runs();

    // 3. Restart; the timer fires, the orchestration waits for the event, which we raise.
    host = await startHost();
    await waitFor(
      'waiting for go',
      async () => (await host.client.getStatus(instanceId)).customStatus === 'waiting-for-go',
      30_000,
    );
    await host.client.raiseEvent(instanceId, 'go', 'go!');
    const status = await waitFor(
      'completion',
      async () => {
        const s = await host.client.getStatus(instanceId, { showHistory: true });
        return s.runtimeStatus === 'Completed' || s.runtimeStatus === 'Failed' ? s : undefined;
      },
      30_000,
    );
    await kill(host.child);

    expect(status.runtimeStatus).toBe('Completed');
    expect(status.output).toEqual({
      steps: ['step-0!', 'step-1!', 'step-2!', 'step-3!', 'step-4!'],
      flaky: 'flaky ok on attempt 3',
      go: 'go!',
      last: 'finish!',
    });
    const history = status.history as { EventType: string }[];
    expect(history.filter((e) => e.EventType === 'ExecutionCompleted')).toHaveLength(1);

    // No activity whose completion was recorded before a kill ran again afterwards.
    const finalRuns = runs();
    for (const [snapshot, recorded] of [
      [runsAtFirstKill, recordedAtFirstKill],
      [runsAtSecondKill, recordedAtSecondKill],
    ] as const) {
      for (const key of recorded.keys()) {
        if (key === 'flaky') continue; // one key, several attempts: checked below
        expect(starts(finalRuns, key), `${key} re-ran after its completion was recorded`).toBe(
          starts(snapshot, key),
        );
      }
    }
    expect(recordedAtFirstKill.has('step-3')).toBe(false);
    expect(starts(finalRuns, 'step-3')).toBeGreaterThanOrEqual(1);
    expect(finalRuns.filter((l) => l === 'done step-3').length).toBeGreaterThanOrEqual(1);
    // Each recorded flaky attempt ran once: three attempts in all, no matter the kills.
    expect(starts(finalRuns, 'flaky')).toBe(3);
    expect(starts(finalRuns, 'finish')).toBe(1);
  }, 150_000);
});
