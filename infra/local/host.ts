import { readFileSync } from 'node:fs';
import path from 'node:path';
import type { Settings } from '../../shared/config';
import { createLogger, type Logger } from '../../shared/logger';
import {
  installFunctionsCore,
  type FunctionRegistry,
  type RegisteredFunction,
  type RpcParameterBinding,
} from './functions-core';
import { HttpTriggerServer } from './http-trigger';
import { QueueTriggers } from './queue-trigger';
import { TimerTriggers } from './timer-trigger';

export interface LocalHostOptions {
  /** The folder holding host.json and package.json (the function app's root). */
  appRoot: string;
  /** The entry point to load; defaults to package.json's `main` under `appRoot`. */
  entryPoint?: string;
  /** App settings; copied into process.env before the app loads, as the Functions host does. */
  settings: Settings;
  port: number;
  bindHost?: string;
  functionKey: string;
  /** Service Bus MaxDeliveryCount for local queues (default 10, as Service Bus). */
  maxDeliveryCount?: number;
  /** Peek-lock duration for local queues, in seconds (default 30). */
  lockSeconds?: number;
  logger?: Logger;
}

export interface LocalHost {
  registry: FunctionRegistry;
  port: number;
  baseUrl: string;
  stop(): Promise<void>;
}

interface HostJson {
  extensions?: {
    http?: { routePrefix?: string };
    serviceBus?: { maxConcurrentCalls?: number };
    durableTask?: { hubName?: string };
  };
}

/** Extra services a host can attach (the Durable engine is one): inputs for bindings and system routes. */
export interface HostExtension {
  extraInputs(fn: RegisteredFunction): RpcParameterBinding[];
  handleHttp?: HttpTriggerServerHandle;
  start(): Promise<void>;
  stop(): Promise<void>;
}
type HttpTriggerServerHandle = ConstructorParameters<typeof HttpTriggerServer>[0]['systemHandler'];

export type HostExtensionFactory = (context: {
  registry: FunctionRegistry;
  settings: Settings;
  hostJson: HostJson;
  baseUrl: () => string;
  functionKey: string;
  logger: Logger;
}) => HostExtension | undefined;

/**
 * Runs a Functions app locally: loads its entry point with `@azure/functions-core` provided by
 * us, then serves its HTTP triggers, feeds its Service Bus triggers from Azurite queues, runs its
 * timers, and lets extensions (Durable) drive the rest.
 */
export async function startLocalHost(
  options: LocalHostOptions,
  extensions: HostExtensionFactory[] = [],
): Promise<LocalHost> {
  const logger = options.logger ?? createLogger('local-host');
  const hostJson = JSON.parse(readFileSync(path.join(options.appRoot, 'host.json'), 'utf8')) as HostJson;
  const bindHost = options.bindHost ?? '127.0.0.1';
  const settings: Settings = { ...process.env, ...options.settings };
  Object.assign(process.env, options.settings);

  const registry = installFunctionsCore();
  registry.log = (level, category, message, fields) => {
    const method =
      level === 'error' || level === 'critical'
        ? 'error'
        : level === 'warning'
          ? 'warn'
          : level === 'debug' || level === 'trace'
            ? 'debug'
            : 'info';
    logger[method]({ category, ...fields }, message);
  };
  const entryPoint =
    options.entryPoint ??
    path.join(
      options.appRoot,
      (JSON.parse(readFileSync(path.join(options.appRoot, 'package.json'), 'utf8')) as { main: string }).main,
    );
  // The app must load through Node's CommonJS loader, where our @azure/functions-core answers.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  require(entryPoint);
  await registry.runHooks('appStart', { functionAppDirectory: options.appRoot });

  const log = (level: 'info' | 'warn' | 'error', message: string, fields?: object) =>
    logger[level](fields ?? {}, message);
  let port = options.port;
  const baseUrl = () => `http://${bindHost}:${port}`;
  const active = extensions
    .map((factory) =>
      factory({ registry, settings, hostJson, baseUrl, functionKey: options.functionKey, logger }),
    )
    .filter((e): e is HostExtension => e !== undefined);

  const http = new HttpTriggerServer({
    registry,
    routePrefix: hostJson.extensions?.http?.routePrefix ?? 'api',
    functionKey: options.functionKey,
    extraInputs: (fn) => active.flatMap((e) => e.extraInputs(fn)),
    systemHandler: async (req, res) => {
      for (const e of active) if (e.handleHttp && (await e.handleHttp(req, res))) return true;
      return false;
    },
    log,
  });
  await http.listen(options.port, bindHost);
  port = http.port;
  // The Durable client and the Functions library build absolute URLs from this, as in Azure.
  process.env.WEBSITE_HOSTNAME = `${bindHost}:${port}`;

  const queues = new QueueTriggers({
    registry,
    settings,
    maxDeliveryCount: options.maxDeliveryCount ?? 10,
    lockSeconds: options.lockSeconds ?? 30,
    maxConcurrentCalls: hostJson.extensions?.serviceBus?.maxConcurrentCalls ?? 8,
    log,
  });
  const timers = new TimerTriggers({ registry, settings, log });
  for (const e of active) await e.start();
  await queues.start();
  timers.start();
  logger.info({ port, functions: [...registry.functions.keys()] }, 'local Functions host started');

  let stopping: Promise<void> | undefined;
  return {
    registry,
    port,
    baseUrl: baseUrl(),
    stop: () =>
      (stopping ??= (async () => {
        await http.close();
        await timers.stop();
        await queues.stop();
        for (const e of active) await e.stop();
        await registry.runHooks('appTerminate', {});
      })()),
  };
}
