import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { startAzurite, type RunningAzurite } from '../infra/local/azurite';
import { spawnLocalHost, type HostProcess } from '../infra/local/host-process';
import { DEFAULT_CHANGELOG_QUEUE, SETTING, type Settings } from '../shared/config';
import { createLogger } from '../shared/logger';
import { startProxy, type RunningProxy } from './proxy/proxy';

export interface UpOptions {
  dataDir: string;
  port: number;
  blobPort: number;
  queuePort: number;
  tablePort: number;
  /** The proxy's port; the proxy listens on 127.0.0.1 with a self-signed certificate. */
  proxyPort: number;
  /** The function app's root (host.json, package.json); this package by default. */
  appRoot: string;
  /** Where the host's JSON log lines go (by default a file in the data folder). */
  onHostLog?: (line: string) => void;
  /** Where the proxy logs (JSON lines); stderr by default. */
  proxyLogFile?: string;
}

export interface RunningStack {
  azurite: RunningAzurite;
  host: HostProcess;
  proxy: RunningProxy;
  settings: Settings;
  functionKey: string;
  dataDir: string;
  apiUrl: string;
  stop(): Promise<void>;
}

/** Reads a secret kept in the data folder, creating it once (mode 0600) when absent. */
function keptSecret(file: string, make: () => string): string {
  if (existsSync(file)) return readFileSync(file, 'utf8').trim();
  const value = make();
  writeFileSync(file, `${value}\n`, { mode: 0o600 });
  return value;
}

/** The folder `lifeboat up` keeps its data in: `--data`, else LIFEBOAT_HOME, else `.lifeboat/`. */
export function resolveDataDir(flag: string | undefined, env: Settings = process.env): string {
  return path.resolve(flag ?? env.LIFEBOAT_HOME ?? '.lifeboat');
}

/**
 * The embedded stack: Azurite on disk under the data folder, the local Functions host running
 * this package's entry point against it, and the proxy in this process. A second start reuses the data, the local
 * function key and the local encryption keys.
 */
export async function startStack(options: UpOptions, env: Settings = process.env): Promise<RunningStack> {
  mkdirSync(options.dataDir, { recursive: true });
  const functionKey =
    env.LIFEBOAT_LOCAL_KEY ||
    keptSecret(path.join(options.dataDir, 'local.key'), () => randomBytes(24).toString('base64url'));
  const encryptionKeys =
    env[SETTING.encryptionKeys] ||
    keptSecret(
      path.join(options.dataDir, 'encryption.keys'),
      () => `local1:${randomBytes(32).toString('base64')}`,
    );
  const azurite = await startAzurite({
    location: path.join(options.dataDir, 'azurite'),
    ports: { blob: options.blobPort, queue: options.queuePort, table: options.tablePort },
  });
  const settings: Settings = {
    [SETTING.functionsStorage]: azurite.connectionString,
    [SETTING.cacheStorage]: azurite.connectionString,
    [SETTING.replicaStorage]: azurite.connectionString,
    [SETTING.serviceBus]: azurite.connectionString,
    [SETTING.changelogQueue]: env[SETTING.changelogQueue] || DEFAULT_CHANGELOG_QUEUE,
    [SETTING.encryptionKeys]: encryptionKeys,
    [SETTING.compute]: env[SETTING.compute] || 'local',
  };
  let host: HostProcess | undefined;
  let proxy: RunningProxy;
  try {
    host = await spawnLocalHost(
      { appRoot: options.appRoot, settings, port: options.port, functionKey },
      options.onHostLog,
    );
    proxy = await startProxy({
      spoolDir: path.join(options.dataDir, 'proxy-spool'),
      host: '127.0.0.1',
      port: options.proxyPort,
      settings,
      logger: createLogger('proxy', {}, options.proxyLogFile),
    });
  } catch (err) {
    await host?.stop();
    await azurite.stop();
    throw err;
  }
  return {
    azurite,
    host,
    proxy,
    settings,
    functionKey,
    dataDir: options.dataDir,
    apiUrl: `http://127.0.0.1:${host.port}/api`,
    stop: async () => {
      await proxy.stop();
      await host.stop();
      await azurite.stop();
    },
  };
}
