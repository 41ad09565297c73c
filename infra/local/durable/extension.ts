import type { Settings } from '../../../shared/config';
import { SETTING } from '../../../shared/config';
import { StorageClients } from '../../../shared/storage';
import { fromTypedData, type FunctionRegistry, type RpcParameterBinding } from '../functions-core';
import type { HostExtensionFactory } from '../host';
import { DurableEngine, type DurableFunctionInvoker } from './engine';

/*
 * Wiring of the Durable engine into the local Functions host: an invoker over the functions
 * `df.app.orchestration` / `df.app.activity` registered through @azure/functions-core (called
 * with RPC-shaped data, as the worker is), the `durableClient` input, and the extension's
 * webhook routes. Add `durableExtension` to the host's extensions to turn it on.
 */

const TRIGGER = {
  orchestration: 'orchestrationTrigger',
  activity: 'activityTrigger',
  entity: 'entityTrigger',
} as const;
const CLIENT_BINDINGS = new Set(['durableclient', 'orchestrationclient']);

export function registryInvoker(registry: FunctionRegistry): DurableFunctionInvoker {
  const invoke = async (name: string, value: unknown): Promise<unknown> => {
    const fn = registry.get(name);
    const response = await registry.invoke(name, {
      inputData: [
        { name: fn.trigger.name, data: value === undefined ? null : { json: JSON.stringify(value) } },
      ],
      triggerMetadata: {},
    });
    return fromTypedData(response.returnValue);
  };
  return {
    has: (kind, name) =>
      registry.functions.get(name)?.trigger.type.toLowerCase() === TRIGGER[kind].toLowerCase(),
    orchestrator: (name, triggerInput) => invoke(name, triggerInput),
    activity: (name, input) => invoke(name, input),
  };
}

/** The task hub from host.json (`extensions.durableTask.hubName`, `%Setting%` resolved). */
export function hubNameOf(hubName: string | undefined, settings: Settings): string {
  const raw = hubName ?? 'TestHubName';
  return raw.replace(/%([^%]+)%/g, (_, name: string) => settings[name] ?? '');
}

export const durableExtension: HostExtensionFactory = ({
  registry,
  settings,
  hostJson,
  baseUrl,
  functionKey,
  logger,
}) => {
  const functions = [...registry.functions.values()];
  const durable = functions.some(
    (f) =>
      Object.values(TRIGGER).some((t) => t.toLowerCase() === f.trigger.type.toLowerCase()) ||
      Object.values(f.metadata.bindings).some((b) => CLIENT_BINDINGS.has(String(b.type).toLowerCase())),
  );
  if (!durable) return undefined;
  const engine = new DurableEngine({
    storage: new StorageClients(SETTING.functionsStorage, settings),
    hubName: hubNameOf(hostJson.extensions?.durableTask?.hubName, settings),
    invoker: registryInvoker(registry),
    baseUrl,
    functionKey,
    log: (level, msg, fields) => logger[level](fields ?? {}, msg),
  });
  return {
    extraInputs: (fn) => {
      const inputs: RpcParameterBinding[] = [];
      for (const [name, binding] of Object.entries(fn.metadata.bindings)) {
        if (CLIENT_BINDINGS.has(String(binding.type).toLowerCase()) && binding.direction !== 'out') {
          inputs.push({ name, data: { json: JSON.stringify(engine.clientBindingData()) } });
        }
      }
      return inputs;
    },
    handleHttp: (req, res) => engine.handleHttp(req, res),
    start: () => engine.start(),
    stop: () => engine.stop(),
  };
};
