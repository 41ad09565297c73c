import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { objectEntries } from './bicep';
import { loadInfra } from './checks';
import {
  APP_SOURCE_DIRS,
  ROOT,
  importClosure,
  listTsFiles,
  registeredBindings,
  type RegisteredBinding,
} from './code';
import { isIgnored, parseFuncignore } from './funcignore';

// What `func azure functionapp publish` / `azd deploy` ship must be what the Azure host needs:
// package.json "main" is the built entry point, it and every module it loads are in dist/ and in
// the package, host.json is shipped, and sources, tests and local secrets are not.

const read = (rel: string) => readFileSync(path.join(ROOT, rel), 'utf8');
const pkg = JSON.parse(read('package.json')) as {
  main: string;
  dependencies: Record<string, string>;
  engines?: { node?: string };
};
const tsconfig = JSON.parse(read('tsconfig.json')) as {
  compilerOptions: { outDir: string; rootDir: string; module: string };
  include: string[];
};
const rules = parseFuncignore(read('.funcignore'));
const ENTRY = 'functions/index.ts';

/** dist/ path tsc writes for a source file. */
function built(source: string): string {
  const rel = path.relative(path.join(ROOT, tsconfig.compilerOptions.rootDir), path.join(ROOT, source));
  return path.join(tsconfig.compilerOptions.outDir, rel).replace(/\.ts$/, '.js').split(path.sep).join('/');
}

/** Minimal reader for azure.yaml: `a.b.c` → scalar value, by indentation. */
function yamlScalars(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  const stack: Array<{ indent: number; key: string }> = [];
  let block: number | undefined;
  for (const line of text.split('\n')) {
    if (/^\s*(#|$)/.test(line)) continue;
    const indent = line.length - line.trimStart().length;
    if (block !== undefined && indent > block) continue; // inside a `run: |` block
    block = undefined;
    const m = /^(\s*)([\w-]+):\s*(.*)$/.exec(line);
    if (!m) continue;
    while (stack.length && stack[stack.length - 1].indent >= indent) stack.pop();
    const key = [...stack.map((s) => s.key), m[2]].join('.');
    const value = m[3].trim();
    if (value === '') stack.push({ indent, key: m[2] });
    else if (value === '|' || value === '>') block = indent;
    else out[key] = value.replace(/^['"]|['"]$/g, '');
  }
  return out;
}

describe('the published package', () => {
  let bindings: RegisteredBinding[];
  beforeAll(() => {
    bindings = registeredBindings();
  });

  it('has package.json "main" pointing at the compiled functions/index.ts', () => {
    expect(tsconfig.compilerOptions.module.toLowerCase()).toMatch(/^node16|^nodenext|^commonjs/);
    expect(tsconfig.include).toEqual(expect.arrayContaining(APP_SOURCE_DIRS));
    expect(pkg.main).toBe(built(ENTRY));
    expect(existsSync(path.join(ROOT, pkg.main)), `${pkg.main} (run npm run build)`).toBe(true);
    expect(pkg.engines?.node).toMatch(/20/);
  });

  it('has every module the entry point loads compiled into dist/ and not left out by .funcignore', () => {
    const closure = importClosure(ENTRY);
    expect(closure).toContain('functions/http/health.ts');
    for (const source of closure) {
      expect(
        APP_SOURCE_DIRS.some((d) => source.startsWith(`${d}/`)),
        `${source} is in functions/ or shared/`,
      ).toBe(true);
      const js = built(source);
      expect(existsSync(path.join(ROOT, js)), `${js} exists (npm run build)`).toBe(true);
      expect(isIgnored(rules, js), `${js} ships`).toBe(false);
      expect(isIgnored(rules, source), `${source} stays out`).toBe(true);
    }
  });

  it('registers, from the entry point, every function the sources declare', () => {
    const closure = new Set(importClosure(ENTRY));
    const declared: string[] = [];
    for (const file of listTsFiles('functions')) {
      const text = read(file);
      const names = [...text.matchAll(/\b(?:df\.)?app\.(?:\w+\.)?\w+\(\s*(['"])([^'"]+)\1/g)].map(
        (m) => m[2],
      );
      if (names.length === 0) continue;
      expect(closure.has(file), `${file} registers ${names.join(', ')} but ${ENTRY} does not import it`).toBe(
        true,
      );
      declared.push(...names);
    }
    const registered = new Set(bindings.map((b) => b.function));
    for (const name of declared) expect(registered, `function ${name}`).toContain(name);
  });

  it('ships host.json, package.json and the production dependencies, not sources, tests or local secrets', () => {
    for (const kept of [
      'host.json',
      'package.json',
      'dist/functions/index.js',
      'dist/shared/config.js',
      'node_modules/@azure/functions/package.json',
    ]) {
      expect(isIgnored(rules, kept), `${kept} ships`).toBe(false);
    }
    for (const dep of Object.keys(pkg.dependencies)) {
      expect(isIgnored(rules, `node_modules/${dep}/package.json`), `dependency ${dep} ships`).toBe(false);
    }
    for (const left of [
      'functions/index.ts',
      'shared/config.ts',
      'test/infra/azure/package.test.ts',
      'infra/azure/main.bicep',
      'docs/deploy.md',
      'local.settings.json',
      '.lifeboat/local.key',
      'tsconfig.json',
      'dist/functions/index.js.map',
      'dist/agent/cli.js',
      'dist/infra/local/host.js',
    ]) {
      expect(isIgnored(rules, left), `${left} stays out`).toBe(true);
    }
  });

  it('has a host.json the Azure host accepts for these functions', () => {
    const host = JSON.parse(read('host.json')) as {
      version: string;
      extensionBundle: { id: string; version: string };
      extensions: {
        http?: { routePrefix?: string };
        durableTask?: {
          hubName?: string;
          storageProvider?: { type?: string; connectionName?: string; connectionStringName?: string };
        };
      };
    };
    expect(host.version).toBe('2.0');
    expect(host.extensionBundle.id).toBe('Microsoft.Azure.Functions.ExtensionBundle');
    expect(host.extensionBundle.version).toMatch(/^\[4\./);
    expect(host.extensions.http?.routePrefix).toBe('api');
    const durable = host.extensions.durableTask;
    expect(durable?.hubName).toMatch(/^[A-Za-z][A-Za-z0-9]{2,44}$/);
    const provider = durable?.storageProvider;
    if (provider) {
      expect(provider.type ?? 'AzureStorage').toBe('AzureStorage');
      // Identity-based AzureWebJobsStorage__* settings are what infra/azure provides.
      expect(provider.connectionName ?? provider.connectionStringName ?? 'AzureWebJobsStorage').toBe(
        'AzureWebJobsStorage',
      );
    }
    const triggerTypes = new Set(bindings.filter((b) => /Trigger$/.test(b.type)).map((b) => b.type));
    const supported = [
      'httpTrigger',
      'serviceBusTrigger',
      'timerTrigger',
      'orchestrationTrigger',
      'activityTrigger',
      'entityTrigger',
    ];
    for (const t of triggerTypes)
      expect(supported, `trigger ${t} has settings and roles in infra/azure`).toContain(t);
  });

  it('reads .funcignore with gitignore rules (the reason its folders are anchored)', () => {
    const loose = parseFuncignore('functions/\n*.ts\n!keep.ts\n/dist/x/\n# comment\n');
    expect(isIgnored(loose, 'node_modules/@azure/functions/index.js')).toBe(true);
    expect(isIgnored(loose, 'a/b.ts')).toBe(true);
    expect(isIgnored(loose, 'keep.ts')).toBe(false);
    expect(isIgnored(loose, 'dist/x/y.js')).toBe(true);
    expect(isIgnored(loose, 'other/dist/x/y.js')).toBe(false);
    expect(isIgnored(rules, 'node_modules/@azure/functions/index.js')).toBe(false);
  });

  it('has azure.yaml deploy this package to the Function App in infra/azure', () => {
    const yaml = yamlScalars(read('azure.yaml'));
    expect(yaml['infra.provider']).toBe('bicep');
    expect(existsSync(path.join(ROOT, yaml['infra.path'], `${yaml['infra.module']}.bicep`))).toBe(true);
    const services = Object.keys(yaml)
      .filter((k) => /^services\.[\w-]+\.host$/.test(k))
      .map((k) => k.split('.')[1]);
    expect(services).toHaveLength(1);
    const service = services[0];
    expect(yaml[`services.${service}.host`]).toBe('function');
    expect(yaml[`services.${service}.language`]).toMatch(/^(ts|js)$/);
    expect(path.resolve(ROOT, yaml[`services.${service}.project`])).toBe(ROOT);

    const infra = loadInfra();
    const site = infra.modules['modules/function-app.bicep'].resources.find(
      (r) => r.type === 'Microsoft.Web/sites',
    )!;
    expect(site.props.tags).toContain(`'azd-service-name': '${service}'`);
    const runtime = objectEntries(
      objectEntries(objectEntries(site.props.properties).functionAppConfig).runtime,
    );
    expect(runtime.version).toBe("'20'");
    const params = JSON.parse(read('infra/azure/main.parameters.json')) as {
      parameters: Record<string, unknown>;
    };
    for (const name of Object.keys(params.parameters))
      expect(infra.main.params, `parameter ${name}`).toHaveProperty(name);
    for (const p of Object.values(infra.main.params)) {
      if (p.defaultValue === undefined)
        expect(params.parameters, `required parameter ${p.name}`).toHaveProperty(p.name);
    }
  });
});
