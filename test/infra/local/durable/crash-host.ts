/*
 * A host process for the crash test: a Durable engine on the given Azurite and task hub, with a
 * pipeline orchestration whose activities log every start and finish to files in `dir`, so the
 * test can count executions across SIGKILLs. Prints one JSON line once it is ready.
 *
 *   node --import tsx crash-host.ts <connectionString> <hubName> <dir>
 */
import { appendFileSync, existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import * as df from 'durable-functions';
import type { OrchestrationContext } from 'durable-functions';
import { StorageClients } from '../../../../shared/storage';
import { DurableEngine } from '../../../../infra/local/durable/engine';
import { LibraryInvoker } from './harness';

const [connectionString, hubName, dir] = process.argv.slice(2);
const log = (file: string, line: string) => appendFileSync(path.join(dir, file), `${line}\n`);
const lines = (file: string) =>
  existsSync(path.join(dir, file))
    ? readFileSync(path.join(dir, file), 'utf8').split('\n').filter(Boolean)
    : [];

const invoker = new LibraryInvoker()
  .addActivity('step', {
    handler: async (input: unknown) => {
      const { key, ms } = input as { key: string; ms: number };
      log('runs.log', `start ${key}`);
      await new Promise((r) => setTimeout(r, ms));
      log('runs.log', `done ${key}`);
      return `${key}!`;
    },
  })
  .addActivity('flaky', {
    handler: (key: unknown) => {
      log('runs.log', `start ${String(key)}`);
      const attempt = lines('runs.log').filter((l) => l === `start ${String(key)}`).length;
      if (attempt < 3) throw new Error(`attempt ${attempt} failed`);
      log('runs.log', `done ${String(key)}`);
      return `flaky ok on attempt ${attempt}`;
    },
  })
  .addOrchestration('pipeline', function* (context: OrchestrationContext) {
    const durations = context.df.getInput() as number[];
    context.df.setCustomStatus('fan-out');
    const steps: string[] = yield context.df.Task.all(
      durations.map((ms, i) => context.df.callActivity('step', { key: `step-${i}`, ms })),
    );
    const flaky: string = yield context.df.callActivityWithRetry(
      'flaky',
      new df.RetryOptions(100, 5),
      'flaky',
    );
    context.df.setCustomStatus('timer');
    yield context.df.createTimer(new Date(context.df.currentUtcDateTime.getTime() + 2500));
    context.df.setCustomStatus('waiting-for-go');
    const go: string = yield context.df.waitForExternalEvent('go');
    const last: string = yield context.df.callActivity('step', { key: 'finish', ms: 1 });
    return { steps, flaky, go, last };
  });

async function main(): Promise<void> {
  const engine = new DurableEngine({
    storage: StorageClients.fromConnectionString(connectionString),
    hubName,
    invoker,
    baseUrl: () => 'http://127.0.0.1:9',
    pollIntervalMs: 20,
    maxPollIntervalMs: 200,
    visibilityTimeoutMs: 3000,
    log: (level, msg, fields) => process.stderr.write(`${level} ${msg} ${JSON.stringify(fields ?? {})}\n`),
  });
  await engine.start();
  process.stdout.write(`${JSON.stringify({ ready: true, client: engine.clientBindingData() })}\n`);
}

main().catch((err) => {
  process.stderr.write(`crash-host failed: ${String(err)}\n`);
  process.exit(1);
});
