import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { describe, expect, it } from 'vitest';

const root = path.resolve(__dirname, '../..');
const cli = path.join(root, 'dist/agent/cli.js');

/** Runs `lifeboat up` (the built CLI, as `npm start` does) until it prints its summary. */
async function up(dataDir: string) {
  const env = { ...process.env };
  delete env.LIFEBOAT_LOCAL_KEY;
  const child = spawn(
    process.execPath,
    [
      cli,
      'up',
      '--data',
      dataDir,
      '--port',
      '0',
      '--blob-port',
      '0',
      '--queue-port',
      '0',
      '--table-port',
      '0',
      '--proxy-port',
      '0',
    ],
    {
      env,
      stdio: ['ignore', 'pipe', 'pipe'],
    },
  );
  const output: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  await new Promise<void>((resolve, reject) => {
    readline.createInterface({ input: child.stdout }).on('line', (line) => {
      output.push(line);
      if (line.startsWith('Press Ctrl-C')) resolve();
    });
    void exited.then((code) => reject(new Error(`lifeboat up exited ${code}: ${stderr}`)));
  });
  const text = output.join('\n');
  return {
    child,
    output,
    exited,
    api: /API\s+(\S+)/.exec(text)![1],
    key: /Local key\s+(\S+)/.exec(text)![1],
  };
}

describe('lifeboat up', () => {
  it('starts Azurite and the host, reports health, stops on SIGTERM, and reuses its data', async () => {
    expect(existsSync(cli), 'run `npm run build` first (npm test does)').toBe(true);
    const dataDir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-up-'));
    const first = await up(dataDir);
    expect(first.output.join('\n')).toContain(dataDir);
    expect(first.output.join('\n')).toMatch(/Proxy\s+https?:\/\/127\.0\.0\.1:\d+/);
    const health = await fetch(`${first.api}/health`);
    const report = await health.json();
    expect(health.status).toBe(200);
    expect(report.status).toBe('healthy');
    expect(Object.values(report.checks).every((c) => (c as { ok: boolean }).ok)).toBe(true);
    expect(report.versions.lifeboat).toBe(
      JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')).version,
    );
    first.child.kill('SIGTERM');
    expect(await first.exited).toBe(0);
    expect(first.output.at(-1)).toBe('Stopped.');

    const second = await up(dataDir);
    expect(second.key).toBe(first.key);
    expect(readFileSync(path.join(dataDir, 'local.key'), 'utf8').trim()).toBe(first.key);
    second.child.kill('SIGINT');
    expect(await second.exited).toBe(0);
  });
});
