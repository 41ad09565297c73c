import { createRequire } from 'node:module';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { HttpRequest, InvocationContext, type HttpResponse } from '@azure/functions';
import * as df from 'durable-functions';
import type { ActivityHandler, DurableClient, OrchestrationHandler } from 'durable-functions';
import { StorageClients } from '../../../../shared/storage';
import {
  DurableEngine,
  type DurableEngineOptions,
  type DurableFunctionInvoker,
} from '../../../../infra/local/durable/engine';

/*
 * Test wiring without the local Functions host: the handlers are wrapped exactly as
 * df.app.orchestration / df.app.activity wrap them (createOrchestrator, wrapActivityHandler) and
 * called with (triggerInput, InvocationContext) as the host calls them.
 */

const load = createRequire(__filename);
const { createOrchestrator } = load('durable-functions/lib/src/util/testingUtils') as {
  createOrchestrator: (
    fn: OrchestrationHandler,
  ) => (trigger: unknown, context: InvocationContext) => Promise<unknown>;
};
const { wrapActivityHandler } = load('durable-functions/lib/src/app') as {
  wrapActivityHandler: (
    fn: ActivityHandler,
  ) => (input: unknown, context: InvocationContext) => Promise<unknown>;
};

type Wrapped = (input: unknown, context: InvocationContext) => Promise<unknown>;

export class LibraryInvoker implements DurableFunctionInvoker {
  private readonly orchestrations = new Map<string, Wrapped>();
  private readonly activities = new Map<string, Wrapped>();
  /** Orchestrator invocations, for tests that look at replay. */
  orchestratorCalls = 0;

  addOrchestration(name: string, handler: OrchestrationHandler): this {
    this.orchestrations.set(name, createOrchestrator(handler));
    return this;
  }

  /** Takes what df.app.activity takes ({ handler }). */
  addActivity(name: string, options: { handler: ActivityHandler }): this {
    this.activities.set(name, wrapActivityHandler(options.handler));
    return this;
  }

  has(kind: 'orchestration' | 'activity' | 'entity', name: string): boolean {
    if (kind === 'orchestration') return this.orchestrations.has(name);
    if (kind === 'activity') return this.activities.has(name);
    return false;
  }

  private context(name: string, type: string): InvocationContext {
    return new InvocationContext({
      functionName: name,
      invocationId: `${name}-${Math.random().toString(36).slice(2)}`,
      logHandler: () => undefined,
      options: { trigger: { name: 'trigger', type } },
    });
  }

  async orchestrator(name: string, triggerInput: unknown): Promise<unknown> {
    this.orchestratorCalls++;
    const fn = this.orchestrations.get(name);
    if (!fn) throw new Error(`No orchestration ${name}`);
    // The worker hands the trigger over as JSON; do the same so nothing relies on object identity.
    return fn(JSON.parse(JSON.stringify(triggerInput)), this.context(name, 'orchestrationTrigger'));
  }

  async activity(name: string, input: unknown): Promise<unknown> {
    const fn = this.activities.get(name);
    if (!fn) throw new Error(`No activity ${name}`);
    return fn(input, this.context(name, 'activityTrigger'));
  }
}

/** A durable client exactly as a function with a durableClient input gets it. */
export function clientFor(engine: DurableEngine | Record<string, unknown>): DurableClient {
  const clientInput = df.input.durableClient();
  const context = new InvocationContext({ functionName: 'starter', options: { extraInputs: [clientInput] } });
  context.extraInputs.set(clientInput, engine instanceof DurableEngine ? engine.clientBindingData() : engine);
  return df.getClient(context);
}

export interface TestHost {
  engine: DurableEngine;
  client: DurableClient;
  invoker: LibraryInvoker;
  baseUrl: string;
  key: string;
  /** Starts `name` through an HTTP starter that answers with createCheckStatusResponse. */
  startViaHttp(name: string, input: unknown): Promise<{ status: number; body: Record<string, string> }>;
  stop(): Promise<void>;
}

/**
 * A stand-in for the local Functions host: an HTTP server that checks the key on
 * /runtime/... and hands those requests to engine.handleHttp, plus one HTTP starter function.
 */
export async function startTestHost(
  connectionString: string,
  hubName: string,
  invoker: LibraryInvoker,
  options: Partial<DurableEngineOptions> = {},
): Promise<TestHost> {
  const key = 'test-key-123';
  let baseUrl = '';
  const engine = new DurableEngine({
    storage: StorageClients.fromConnectionString(connectionString),
    hubName,
    invoker,
    baseUrl: () => baseUrl,
    functionKey: key,
    pollIntervalMs: 20,
    maxPollIntervalMs: 200,
    visibilityTimeoutMs: 5000,
    ...options,
  });
  const server = http.createServer((req, res) => {
    void (async () => {
      const url = new URL(req.url ?? '/', baseUrl);
      if (url.pathname.startsWith('/runtime/')) {
        if (url.searchParams.get('code') !== key && req.headers['x-functions-key'] !== key) {
          res.writeHead(401).end();
          return;
        }
        if (await engine.handleHttp(req, res)) return;
      }
      const match = /^\/api\/start\/([^/]+)$/.exec(url.pathname);
      if (match && req.method === 'POST') {
        const chunks: Buffer[] = [];
        for await (const c of req) chunks.push(c as Buffer);
        const body = Buffer.concat(chunks).toString('utf8');
        const request = new HttpRequest({
          method: 'POST',
          url: url.href,
          body: { string: body },
          headers: { 'content-type': 'application/json' },
        });
        const client = clientFor(engine);
        const instanceId = await client.startNew(match[1], { input: body ? JSON.parse(body) : undefined });
        const response: HttpResponse = client.createCheckStatusResponse(request, instanceId);
        const headers: Record<string, string> = {};
        response.headers.forEach((v, k) => (headers[k] = v));
        res.writeHead(response.status, headers);
        res.end(await response.text());
        return;
      }
      res.writeHead(404).end();
    })().catch((err) => {
      res.writeHead(500).end(String(err));
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  await engine.start();
  return {
    engine,
    client: clientFor(engine),
    invoker,
    baseUrl,
    key,
    async startViaHttp(name, input) {
      const res = await fetch(`${baseUrl}/api/start/${name}`, {
        method: 'POST',
        body: JSON.stringify(input),
      });
      return { status: res.status, body: (await res.json()) as Record<string, string> };
    },
    async stop() {
      await engine.stop();
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}

/** Polls the client until the instance reaches a final state. */
export async function waitForDone(
  client: DurableClient,
  instanceId: string,
  timeoutMs = 30_000,
): Promise<df.DurableOrchestrationStatus> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const status = await client.getStatus(instanceId, { showHistory: true, showHistoryOutput: true });
    if (['Completed', 'Failed', 'Terminated'].includes(status.runtimeStatus)) return status;
    if (Date.now() > deadline)
      throw new Error(
        `Instance ${instanceId} still ${status.runtimeStatus} after ${timeoutMs} ms: ${JSON.stringify(status)}`,
      );
    await new Promise((r) => setTimeout(r, 25));
  }
}

export async function waitFor<T>(
  what: string,
  probe: () => Promise<T | undefined | false>,
  timeoutMs = 20_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}
