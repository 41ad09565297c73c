import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { waitFor } from './harness';

/*
 * The engine inside the local Functions host (infra/local/host.ts) through durableExtension:
 * functions registered with df.app.* and app.http, invoked through @azure/functions-core as the
 * worker invokes them, the durableClient input, and the webhook URLs behind the host key.
 */

const key = 'extension-test-key';
let child: ChildProcess;
let base = '';

beforeAll(async () => {
  child = spawn(
    process.execPath,
    [
      '--import',
      'tsx',
      path.join(__dirname, 'extension-host.ts'),
      inject('azuriteConnectionString'),
      'extensionTests',
      key,
    ],
    {
      stdio: ['ignore', 'pipe', 'pipe'],
      cwd: path.resolve(__dirname, '../../../..'),
      env: { ...process.env, LIFEBOAT_LOG_LEVEL: 'warn' },
    },
  );
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
  const line = await new Promise<string>((resolve, reject) => {
    createInterface({ input: child.stdout! }).once('line', resolve);
    child.once('exit', (code) => reject(new Error(`extension-host exited with ${code}: ${stderr}`)));
  });
  base = `http://127.0.0.1:${(JSON.parse(line) as { port: number }).port}`;
});

afterAll(async () => {
  if (child && child.exitCode === null) {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
  }
});

async function run(name: string, input: unknown) {
  const started = await fetch(`${base}/api/start/${name}?code=${key}`, {
    method: 'POST',
    body: JSON.stringify(input),
  });
  expect(started.status).toBe(202);
  const urls = (await started.json()) as { id: string; statusQueryGetUri: string };
  expect(started.headers.get('location')).toBe(urls.statusQueryGetUri);
  return waitFor(`${name} to finish`, async () => {
    const body = (await (await fetch(`${urls.statusQueryGetUri}&showHistory=true`)).json()) as {
      runtimeStatus: string;
      output: unknown;
      historyEvents: { EventType: string }[];
    };
    return ['Completed', 'Failed'].includes(body.runtimeStatus) ? body : undefined;
  });
}

describe('local Durable engine in the local Functions host', () => {
  it('runs orchestrations registered with df.app through @azure/functions-core', async () => {
    const status = await run('greeter', ['ana', 'bo']);
    expect(status.runtimeStatus).toBe('Completed');
    expect(status.output).toEqual({
      greetings: ['hello ana', 'hello bo'],
      flaky: 'attempt 2',
      child: 'hello child',
    });
    expect(status.historyEvents.map((e) => e.EventType)).toContain('SubOrchestrationInstanceCompleted');
  });

  it('fails an orchestration whose activity throws, with the message in its output', async () => {
    const status = await run('exploder', null);
    expect(status.runtimeStatus).toBe('Failed');
    expect(status.output).toMatch(/^Orchestrator function 'exploder' failed: .*boom from an activity/);
  });

  it('keeps the webhook API behind the host key', async () => {
    const res = await fetch(`${base}/runtime/webhooks/durabletask/instances`);
    expect(res.status).toBe(401);
  });
});
