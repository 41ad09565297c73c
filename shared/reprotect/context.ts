import type { ContainerClient } from '@azure/storage-blob';
import { SETTING, type Settings } from '../config';
import { defaultFailoverDeps, failoverDepsFromSettings, type FailoverDeps } from '../failover';
import { createLogger, type Logger } from '../logger';
import { StorageClients } from '../storage';
import { ProtectionTables } from './tables';

/** Reprotect change logs (cloud → site), CacheStorage: `{machine}/{disk}/{epoch}/{seq:012}.seg`. */
export const REPROTECT_CONTAINER = 'reprotect';

/** Everything resync, reprotect and failback need; activities get it from their factory. */
export interface ProtectionDeps {
  failover: FailoverDeps;
  tables: ProtectionTables;
  /** `reprotect` in CacheStorage: the encrypted change logs the site's target role applies. */
  reprotect: ContainerClient;
  now: () => Date;
  log: Logger;
}

export function protectionDepsFromSettings(
  settings: Settings = process.env,
  overrides: { failover?: FailoverDeps; now?: () => Date; log?: Logger } = {},
): ProtectionDeps {
  const replica = new StorageClients(SETTING.replicaStorage, settings);
  const cache = new StorageClients(SETTING.cacheStorage, settings);
  return {
    failover: overrides.failover ?? failoverDepsFromSettings(settings),
    tables: new ProtectionTables(replica),
    reprotect: cache.blobService().getContainerClient(REPROTECT_CONTAINER),
    now: overrides.now ?? (() => new Date()),
    log: overrides.log ?? createLogger('protection'),
  };
}

let processDeps: ProtectionDeps | undefined;

/** The process-wide dependencies of the protection functions, from process.env on first use. */
export function defaultProtectionDeps(): ProtectionDeps {
  return (processDeps ??= protectionDepsFromSettings(process.env, { failover: defaultFailoverDeps() }));
}
