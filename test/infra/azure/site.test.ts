import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, listTsFiles, scanSettings } from './code';

// deploy/site (systemd units and example configuration) must match the CLI they start.

const read = (rel: string) => readFileSync(path.join(ROOT, rel), 'utf8');
const INSTALL = '/opt/lifeboat/current/';

/** KEY=value lines of an environment file (comments and blanks skipped). */
function envFile(rel: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of read(rel).split('\n')) {
    const m = /^([A-Za-z_][\w]*)=(.*)$/.exec(line.trim());
    if (m) out[m[1]] = m[2];
  }
  return out;
}

/** The ExecStart command of a unit, continuation lines joined. */
function execStart(rel: string): string {
  const m = /^ExecStart=((?:.*\\\n)*.*)$/m.exec(read(rel));
  if (!m) throw new Error(`${rel} has no ExecStart`);
  return m[1].replace(/\\\n\s*/g, ' ');
}

function flagsOf(text: string): string[] {
  return [...text.matchAll(/(?:^|\s)(--[a-z][\w-]*)/g)].map((m) => m[1]);
}

describe('site installation files', () => {
  it('start the built CLI with commands and flags it has', () => {
    const proxy = execStart('deploy/site/lifeboat-proxy.service');
    const agent = execStart('deploy/site/lifeboat-agent@.service');
    for (const command of [proxy, agent]) {
      const script = command.split(/\s+/)[1];
      expect(script.startsWith(INSTALL)).toBe(true);
      expect(existsSync(path.join(ROOT, script.slice(INSTALL.length))), `${script} (npm run build)`).toBe(
        true,
      );
    }
    expect(proxy).toMatch(/cli\.js proxy$/);
    expect(agent).toMatch(/cli\.js agent protect /);
    const agentSource = read('agent/mobility/command.ts');
    const example = envFile('deploy/site/agent.env.example');
    for (const flag of [
      ...flagsOf(agent),
      ...flagsOf(example.LIFEBOAT_AGENT_DISKS),
      ...flagsOf(example.LIFEBOAT_AGENT_ARGS),
    ]) {
      expect(agentSource, `lifeboat agent protect ${flag}`).toMatch(new RegExp(`'${flag}[ ']`));
    }
    for (const variable of agent.matchAll(/\$\{?(\w+)\}?/g))
      expect(example, `agent.env.example sets ${variable[1]}`).toHaveProperty(variable[1]);
  });

  it('give the proxy only settings it reads', () => {
    const proxyFiles = [...listTsFiles('agent/proxy'), ...listTsFiles('shared')];
    const reads = scanSettings(proxyFiles).reads;
    const azureIdentity = new Set(['AZURE_TENANT_ID', 'AZURE_CLIENT_ID', 'AZURE_CLIENT_CERTIFICATE_PATH']);
    const settings = {
      ...envFile('deploy/site/proxy.env.example'),
      ...envFile('deploy/site/proxy.secrets.env.example'),
    };
    for (const key of Object.keys(settings)) {
      const base = key.split('__')[0];
      expect(reads.has(key) || reads.has(base) || azureIdentity.has(key), `${key} is read by the proxy`).toBe(
        true,
      );
    }
    for (const needed of [
      'CacheStorage',
      'ReplicaStorage',
      'ServiceBusConnection',
      'LIFEBOAT_ENCRYPTION_KEYS',
    ]) {
      expect(
        Object.keys(settings).some((k) => k === needed || k.startsWith(`${needed}__`)),
        needed,
      ).toBe(true);
    }
    expect(Object.keys(envFile('deploy/site/proxy.secrets.env.example'))).toEqual([
      'LIFEBOAT_ENCRYPTION_KEYS',
    ]);
    const unit = read('deploy/site/lifeboat-proxy.service');
    expect(settings.LIFEBOAT_PROXY_SPOOL.startsWith('/var/lib/lifeboat/proxy/')).toBe(true);
    expect(unit).toMatch(/^StateDirectory=lifeboat\/proxy$/m);
    expect(unit).toMatch(/^ReadWritePaths=\/var\/lib\/lifeboat\/proxy$/m);
  });
});
