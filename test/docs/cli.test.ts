import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const root = path.resolve(__dirname, '../..');
const cli = path.join(root, 'dist/agent/cli.js');

function help(args: string[]): string {
  return execFileSync(process.execPath, [cli, ...args, '--help'], { encoding: 'utf8' });
}

/** Every command path of the built CLI with the long options its --help lists. */
function commands(args: string[] = []): { path: string; options: string[] }[] {
  const text = help(args);
  const options = [...text.matchAll(/^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)/gm)]
    .map((m) => m[1])
    .filter((o) => o !== '--help');
  const section = text.split(/^Commands:$/m)[1] ?? '';
  const subs = [...section.matchAll(/^ {2}([a-z][a-z-]*)/gm)].map((m) => m[1]).filter((c) => c !== 'help');
  return [
    { path: ['lifeboat', ...args].join(' '), options },
    ...subs.flatMap((sub) => commands([...args, sub])),
  ];
}

describe('docs/cli.md', () => {
  it('documents every command and every option the CLI has', () => {
    const doc = readFileSync(path.join(root, 'docs/cli.md'), 'utf8');
    const missing: string[] = [];
    for (const c of commands()) {
      if (c.path !== 'lifeboat' && !doc.includes(`\`${c.path}\``)) missing.push(c.path);
      for (const option of c.options) if (!doc.includes(`\`${option}`)) missing.push(`${c.path} ${option}`);
    }
    expect(missing).toEqual([]);
  });
});
