import { ConfigError } from './errors';

/** The environment the settings are read from; tests and the local host pass their own. */
export type Settings = Record<string, string | undefined>;

/** Setting names, shared by the code, `local.settings.json.sample` and the Bicep app settings. */
export const SETTING = {
  functionsStorage: 'AzureWebJobsStorage',
  cacheStorage: 'CacheStorage',
  replicaStorage: 'ReplicaStorage',
  serviceBus: 'ServiceBusConnection',
  changelogQueue: 'ChangelogQueueName',
  encryptionKeys: 'LIFEBOAT_ENCRYPTION_KEYS',
  compute: 'LIFEBOAT_COMPUTE',
} as const;

export const DEFAULT_CHANGELOG_QUEUE = 'changelog-ready';

/** Reads a required setting, failing fast with a message that names it. */
export function requireSetting(settings: Settings, name: string): string {
  const value = settings[name];
  if (value === undefined || value.trim() === '') {
    throw new ConfigError(
      `The setting ${name} is missing; set it in the environment (or local.settings.json).`,
      name,
    );
  }
  return value;
}

export function changelogQueueName(settings: Settings = process.env): string {
  return settings[SETTING.changelogQueue] || DEFAULT_CHANGELOG_QUEUE;
}
