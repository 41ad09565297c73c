import { readFileSync } from 'node:fs';
import path from 'node:path';
import { ServiceBusClient } from '@azure/service-bus';
import { SETTING, changelogQueueName, type Settings } from './config';
import { credentialFor, StorageClients } from './storage';

export interface DependencyCheck {
  ok: boolean;
  detail: string;
}

export interface HealthReport {
  status: 'healthy' | 'degraded';
  versions: Record<string, string>;
  checks: Record<string, DependencyCheck>;
}

function versionOf(pkg: string): string {
  try {
    if (pkg !== 'lifeboat')
      return (JSON.parse(readFileSync(require.resolve(`${pkg}/package.json`), 'utf8')) as { version: string })
        .version;
    // Our own package.json is one or two folders up, from the source or from dist/.
    for (let dir = path.dirname(__dirname), i = 0; i < 3; i++, dir = path.dirname(dir)) {
      try {
        const manifest = JSON.parse(readFileSync(path.join(dir, 'package.json'), 'utf8')) as {
          name: string;
          version: string;
        };
        if (manifest.name === 'lifeboat') return manifest.version;
      } catch {
        /* keep looking upwards */
      }
    }
  } catch {
    /* reported as unknown */
  }
  return 'unknown';
}

async function check(what: () => Promise<string>): Promise<DependencyCheck> {
  try {
    return { ok: true, detail: await what() };
  } catch (err) {
    return { ok: false, detail: err instanceof Error ? err.message.split('\n')[0] : String(err) };
  }
}

const TIMEOUT_MS = 5000;

function withTimeout<T>(promise: Promise<T>, what: string): Promise<T> {
  return Promise.race([
    promise,
    new Promise<T>((_, reject) =>
      setTimeout(
        () => reject(new Error(`${what} did not answer within ${TIMEOUT_MS} ms`)),
        TIMEOUT_MS,
      ).unref(),
    ),
  ]);
}

async function checkStorage(settings: Settings, name: string): Promise<string> {
  const blobs = new StorageClients(name, settings).blobService();
  const iterator = blobs.listContainers().byPage({ maxPageSize: 1 });
  await withTimeout(iterator.next(), `${name} blob storage`);
  return `${name}: blob service reachable`;
}

async function checkQueue(settings: Settings): Promise<string> {
  const name = SETTING.serviceBus;
  const queue = changelogQueueName(settings);
  const value = settings[name];
  if ((value && /Endpoint=sb:\/\//i.test(value)) || settings[`${name}__fullyQualifiedNamespace`]) {
    const client = value
      ? new ServiceBusClient(value)
      : new ServiceBusClient(settings[`${name}__fullyQualifiedNamespace`]!, credentialFor(settings, name));
    try {
      const receiver = client.createReceiver(queue);
      await withTimeout(receiver.peekMessages(1), `Service Bus queue ${queue}`);
      await receiver.close();
    } finally {
      await client.close();
    }
    return `Service Bus queue ${queue} reachable`;
  }
  const client = new StorageClients(name, settings).queueService().getQueueClient(queue);
  await withTimeout(client.createIfNotExists(), `queue ${queue}`);
  return `storage queue ${queue} reachable (local mode)`;
}

/** Liveness plus whether storage and the work queue can be reached with the configured settings. */
export async function checkHealth(settings: Settings): Promise<HealthReport> {
  const checks: Record<string, DependencyCheck> = {};
  const storageSettings = [SETTING.functionsStorage, SETTING.replicaStorage, SETTING.cacheStorage];
  const results = await Promise.all([
    ...storageSettings.map((name) => check(() => checkStorage(settings, name))),
    check(() => checkQueue(settings)),
  ]);
  storageSettings.forEach((name, i) => (checks[name] = results[i]));
  checks.queue = results[storageSettings.length];
  return {
    status: Object.values(checks).every((c) => c.ok) ? 'healthy' : 'degraded',
    versions: {
      lifeboat: versionOf('lifeboat'),
      node: process.version,
      '@azure/functions': versionOf('@azure/functions'),
      'durable-functions': versionOf('durable-functions'),
    },
    checks,
  };
}
