import { randomUUID } from 'node:crypto';
import Module from 'node:module';

/*
 * The module the Azure Functions Node worker provides to `@azure/functions` as
 * `@azure/functions-core`. Providing it here is what lets the local host run the very same
 * registrations (`app.http`, `app.serviceBusQueue`, `app.timer`, `df.app.*`) the Azure host runs:
 * the library hands us each function's binding metadata and handler, and its own programming
 * model turns our RPC-shaped invocation requests into the arguments the handler expects.
 */

export interface RpcTypedData {
  string?: string | null;
  json?: string | null;
  bytes?: Uint8Array | null;
  http?: RpcHttpData | null;
  int?: number | null;
  double?: number | null;
}

export interface RpcHttpData {
  method?: string | null;
  url?: string | null;
  headers?: Record<string, string> | null;
  body?: RpcTypedData | null;
  params?: Record<string, string> | null;
  query?: Record<string, string> | null;
  statusCode?: string | null;
  cookies?: unknown[] | null;
}

export interface RpcBindingInfo {
  type?: string | null;
  direction?: 'in' | 'out' | 'inout' | null;
  [property: string]: unknown;
}

export interface FunctionMetadata {
  name: string;
  bindings: Record<string, RpcBindingInfo>;
  retryOptions?: unknown;
}

export interface RpcParameterBinding {
  name: string;
  data: RpcTypedData | null | undefined;
}

export interface RpcInvocationRequest {
  invocationId?: string;
  functionId?: string;
  inputData?: RpcParameterBinding[];
  triggerMetadata?: Record<string, RpcTypedData>;
  retryContext?: { retryCount: number; maxRetryCount: number } | null;
}

export interface RpcInvocationResponse {
  invocationId?: string;
  outputData?: RpcParameterBinding[];
  returnValue?: RpcTypedData | null;
}

type FunctionCallback = (...args: unknown[]) => unknown;
type LogLevel = 'trace' | 'debug' | 'information' | 'warning' | 'error' | 'critical' | 'none';
export type HostLog = (
  level: LogLevel,
  category: 'user' | 'system',
  message: string,
  fields?: object,
) => void;

interface InvocationModel {
  getArguments(): Promise<{ context: unknown; inputs: unknown[] }>;
  invokeFunction(context: unknown, inputs: unknown[], callback: FunctionCallback): Promise<unknown>;
  getResponse(context: unknown, result: unknown): Promise<RpcInvocationResponse>;
}

interface ProgrammingModel {
  name: string;
  version: string;
  getInvocationModel(coreContext: unknown): InvocationModel;
  getCapabilities?(capabilities: Record<string, string>): Promise<Record<string, string>>;
}

export interface RegisteredFunction {
  name: string;
  metadata: FunctionMetadata;
  callback: FunctionCallback;
  /** The trigger binding's name and properties (route, methods, queueName, schedule, …). */
  trigger: RpcBindingInfo & { name: string; type: string };
}

class Disposable {
  constructor(private callback?: () => void) {}
  dispose(): void {
    this.callback?.();
    this.callback = undefined;
  }
}

/** What `@azure/functions` registered with the local host, and how to invoke it. */
export class FunctionRegistry {
  readonly functions = new Map<string, RegisteredFunction>();
  private model?: ProgrammingModel;
  private readonly hooks = new Map<string, Set<(context: unknown) => unknown>>();
  log: HostLog = () => undefined;

  register(metadata: FunctionMetadata, callback: FunctionCallback): Disposable {
    const entry = Object.entries(metadata.bindings).find(([, b]) => /trigger$/i.test(b.type ?? ''));
    if (!entry) throw new Error(`Function ${metadata.name} has no trigger binding.`);
    if (this.functions.has(metadata.name)) {
      throw new Error(`A function named ${metadata.name} is already registered.`);
    }
    const [bindingName, binding] = entry;
    this.functions.set(metadata.name, {
      name: metadata.name,
      metadata,
      callback,
      trigger: { ...binding, name: bindingName, type: String(binding.type) },
    });
    return new Disposable(() => this.functions.delete(metadata.name));
  }

  setProgrammingModel(model: ProgrammingModel): void {
    this.model = model;
  }

  registerHook(name: string, callback: (context: unknown) => unknown): Disposable {
    let set = this.hooks.get(name);
    if (!set) this.hooks.set(name, (set = new Set()));
    set.add(callback);
    return new Disposable(() => set.delete(callback));
  }

  async runHooks(name: string, context: object): Promise<void> {
    for (const hook of this.hooks.get(name) ?? []) await hook({ hookData: {}, ...context });
  }

  byTriggerType(type: string): RegisteredFunction[] {
    return [...this.functions.values()].filter((f) => f.trigger.type.toLowerCase() === type.toLowerCase());
  }

  get(name: string): RegisteredFunction {
    const fn = this.functions.get(name);
    if (!fn) throw new Error(`No function named ${name} is registered.`);
    return fn;
  }

  /**
   * Invokes a function exactly as the worker does: the programming model builds the handler's
   * arguments from RPC data, runs pre/post invocation hooks around it, and converts the result.
   */
  async invoke(name: string, request: RpcInvocationRequest): Promise<RpcInvocationResponse> {
    const fn = this.get(name);
    if (!this.model) throw new Error('No programming model was registered (is @azure/functions loaded?).');
    const invocationId = request.invocationId ?? randomUUID();
    const coreContext = {
      invocationId,
      request: { ...request, invocationId, functionId: name },
      metadata: fn.metadata,
      state: undefined as string | undefined,
      log: (level: LogLevel, category: 'user' | 'system', message: string) =>
        this.log(level, category, message, { function: name, invocationId }),
    };
    const model = this.model.getInvocationModel(coreContext);
    const { context, inputs } = await model.getArguments();
    const pre = { invocationContext: context, inputs, functionCallback: fn.callback };
    coreContext.state = 'preInvocationHooks';
    await this.runHooks('preInvocation', pre);
    coreContext.state = 'invocation';
    let result: unknown;
    let error: unknown;
    try {
      result = await model.invokeFunction(context, pre.inputs, pre.functionCallback);
    } catch (err) {
      error = err;
    }
    coreContext.state = 'postInvocationHooks';
    const post = { invocationContext: context, inputs: pre.inputs, result, error };
    await this.runHooks('postInvocation', post);
    coreContext.state = undefined;
    if (post.error) throw post.error;
    return model.getResponse(context, post.result);
  }
}

let installed: FunctionRegistry | undefined;

/**
 * Makes `require('@azure/functions-core')` resolve to the local host's implementation, for this
 * process, and returns the registry it fills. Call it before loading the app's entry point.
 */
export function installFunctionsCore(): FunctionRegistry {
  if (installed) return installed;
  const registry = new FunctionRegistry();
  const coreApi = {
    version: '3.10.1-lifeboat-local',
    registerFunction: (metadata: FunctionMetadata, callback: FunctionCallback) =>
      registry.register(metadata, callback),
    setProgrammingModel: (model: ProgrammingModel) => registry.setProgrammingModel(model),
    getProgrammingModel: () => registry['model'],
    registerHook: (name: string, callback: (context: unknown) => unknown) =>
      registry.registerHook(name, callback),
    log: (level: LogLevel, category: 'user' | 'system', message: string) =>
      registry.log(level, category, message),
    Disposable,
  };
  const loader = Module as unknown as {
    _load: (request: string, parent: unknown, isMain: boolean) => unknown;
  };
  const original = loader._load;
  loader._load = function (request: string, parent: unknown, isMain: boolean) {
    if (request === '@azure/functions-core') return coreApi;
    return original.call(this, request, parent, isMain);
  };
  installed = registry;
  return registry;
}

/** Reads the value an RPC typed datum carries (as the library does), for host-side use. */
export function fromTypedData(data: RpcTypedData | null | undefined): unknown {
  if (!data) return undefined;
  if (data.string !== undefined && data.string !== null) return data.string;
  if (data.json !== undefined && data.json !== null) return JSON.parse(data.json);
  if (data.bytes) return Buffer.from(data.bytes);
  if (data.int !== undefined && data.int !== null) return data.int;
  if (data.double !== undefined && data.double !== null) return data.double;
  return undefined;
}

export function jsonData(value: unknown): RpcTypedData {
  return { json: JSON.stringify(value ?? null) };
}
