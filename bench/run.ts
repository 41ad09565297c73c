/*
 * `npm run bench [-- --quick] [-- --only name,name]`: runs every benchmark in bench/, prints each
 * figure beside its reference and the ratio, and writes bench/results.json and bench/results.md.
 */
import { existsSync, readdirSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import type { BenchResult } from './types';

const NOT_BENCHES = new Set(['run', 'types', 'tools']);

function discover(): string[] {
  return readdirSync(__dirname)
    .filter((f) => /\.(js|ts)$/.test(f) && !f.endsWith('.d.ts') && !f.endsWith('.map'))
    .map((f) => f.replace(/\.(js|ts)$/, ''))
    .filter((name) => !NOT_BENCHES.has(name) && !name.startsWith('_'))
    .sort();
}

function fmt(n: number): string {
  return Math.abs(n) >= 100 ? n.toFixed(0) : Math.abs(n) >= 1 ? n.toFixed(2) : n.toPrecision(3);
}

async function main(): Promise<void> {
  const opts = new Command('bench')
    .option('--quick', 'small sizes, for CI smoke runs', false)
    .option('--only <names>', 'comma-separated benchmark names')
    .parse(process.argv)
    .opts<{ quick: boolean; only?: string }>();
  const wanted = opts.only?.split(',').map((s) => s.trim());
  const names = discover().filter((n) => !wanted || wanted.includes(n));
  const all: (BenchResult & { bench: string })[] = [];
  const failures: { bench: string; error: string }[] = [];
  for (const name of names) {
    process.stdout.write(`\n== ${name}${opts.quick ? ' (quick)' : ''}\n`);
    try {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const mod = require(path.join(__dirname, name)) as {
        run?: (o: { quick: boolean }) => Promise<BenchResult[]>;
      };
      if (typeof mod.run !== 'function') continue;
      for (const r of await mod.run({ quick: opts.quick })) {
        all.push({ bench: name, ...r });
        console.log(
          `  ${r.name}: ${fmt(r.value)} ${r.unit}  vs ${r.reference}: ${fmt(r.referenceValue)} ${r.unit}  ratio ${fmt(r.ratio)}`,
        );
      }
    } catch (err) {
      const error = err instanceof Error ? err.message : String(err);
      failures.push({ bench: name, error });
      console.error(`  FAILED: ${error}`);
    }
  }
  const meta = {
    date: new Date().toISOString(),
    quick: opts.quick,
    node: process.version,
    cpus: os.cpus().length,
    host: os.platform(),
  };
  writeFileSync(
    path.join(benchDir(), 'results.json'),
    `${JSON.stringify({ ...meta, results: all, failures }, null, 2)}\n`,
  );
  const rows = all.map(
    (r) =>
      `| ${r.bench} | ${r.name} | ${fmt(r.value)} ${r.unit} | ${r.reference} | ${fmt(r.referenceValue)} ${r.unit} | ${fmt(r.ratio)} |`,
  );
  writeFileSync(
    path.join(benchDir(), 'results.md'),
    [
      `Benchmarks, ${meta.date}${opts.quick ? ' (quick)' : ''}, Node ${meta.node}, ${meta.cpus} cores`,
      '',
      '| bench | figure | value | reference | reference value | ratio |',
      '| --- | --- | --- | --- | --- | --- |',
      ...rows,
      '',
    ].join('\n'),
  );
  console.log(
    `\nWrote ${path.join(benchDir(), 'results.json')} and results.md (${all.length} figures, ${failures.length} failures).`,
  );
  // Some benchmarks leave handles behind (servers, child processes being reaped); the run is over.
  process.exit(failures.length > 0 ? 1 : 0);
}

/** bench/ in the source tree, whether we run from dist/bench or from bench/. */
function benchDir(): string {
  const source = path.resolve(__dirname, '..', '..', 'bench');
  return existsSync(source) && __dirname.includes(`${path.sep}dist${path.sep}`) ? source : __dirname;
}

void main();
