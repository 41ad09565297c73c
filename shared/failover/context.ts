import { DefaultAzureCredential } from '@azure/identity';
import type { ContainerClient } from '@azure/storage-blob';
import { SETTING, type Settings } from '../config';
import { ConfigError } from '../errors';
import { createLogger, type Logger } from '../logger';
import {
  defaultReplicationDeps,
  replicationDepsFromSettings,
  SEED_CONTAINER,
  type ReplicationDeps,
} from '../replication';
import { StorageClients } from '../storage';
import { AzureComputeProvider } from './compute/azure';
import { FAILOVER_DISKS_CONTAINER, LocalComputeProvider } from './compute/local';
import type { ComputeProvider } from './compute/port';
import { FailoverTables } from './tables';

/** Everything the failover domain needs; activities get it from their factory. */
export interface FailoverDeps {
  replication: ReplicationDeps;
  tables: FailoverTables;
  /** `failover-disks` in ReplicaStorage. */
  failoverDisks: ContainerClient;
  compute: ComputeProvider;
  /** Outgoing HTTP for webhook steps. */
  fetch: typeof fetch;
  now: () => Date;
  log: Logger;
}

export type ComputeKind = 'local' | 'azure';

export function computeKind(settings: Settings): ComputeKind {
  const raw = (settings[SETTING.compute] ?? 'local').trim() || 'local';
  if (raw !== 'local' && raw !== 'azure') {
    throw new ConfigError(
      `The setting ${SETTING.compute} must be local or azure; got ${JSON.stringify(raw)}.`,
      SETTING.compute,
    );
  }
  return raw;
}

export function failoverDepsFromSettings(
  settings: Settings = process.env,
  overrides: Partial<Pick<FailoverDeps, 'compute' | 'fetch' | 'now' | 'log'>> & {
    replication?: ReplicationDeps;
  } = {},
): FailoverDeps {
  const replica = new StorageClients(SETTING.replicaStorage, settings);
  const replication = overrides.replication ?? replicationDepsFromSettings(settings);
  const tables = new FailoverTables(replica);
  const failoverDisks = replica.blobService().getContainerClient(FAILOVER_DISKS_CONTAINER);
  const seed = replica.blobService().getContainerClient(SEED_CONTAINER);
  const compute =
    overrides.compute ??
    (computeKind(settings) === 'azure'
      ? new AzureComputeProvider({ credential: new DefaultAzureCredential(), seed })
      : new LocalComputeProvider({ seed, failoverDisks, tables }));
  return {
    replication,
    tables,
    failoverDisks,
    compute,
    fetch: overrides.fetch ?? fetch,
    now: overrides.now ?? (() => new Date()),
    log: overrides.log ?? createLogger('failover'),
  };
}

let processDeps: FailoverDeps | undefined;

/** The process-wide dependencies of the failover functions, from process.env on first use. */
export function defaultFailoverDeps(): FailoverDeps {
  return (processDeps ??= failoverDepsFromSettings(process.env, { replication: defaultReplicationDeps() }));
}
