import { randomUUID, timingSafeEqual } from 'node:crypto';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { bySpecificity, compileRoute, type CompiledRoute } from './routes';
import type {
  FunctionRegistry,
  RegisteredFunction,
  RpcHttpData,
  RpcParameterBinding,
} from './functions-core';

/** Largest request body the local host accepts, as the Functions host's default limit (100 MB). */
export const MAX_REQUEST_BYTES = 100 * 1024 * 1024;

export interface HttpTriggerServerOptions {
  registry: FunctionRegistry;
  routePrefix: string;
  /** The key for `authLevel: 'function'` / `'admin'`, sent as `x-functions-key` or `?code=`. */
  functionKey: string;
  /** Extra input bindings the host supplies (the Durable client), by binding type. */
  extraInputs: (fn: RegisteredFunction) => RpcParameterBinding[];
  /** Routes served by the host itself before the functions (the Durable management API). */
  systemHandler?: (req: http.IncomingMessage, res: http.ServerResponse) => Promise<boolean>;
  log: (level: 'info' | 'warn' | 'error', message: string, fields?: object) => void;
}

interface HttpRoute {
  fn: RegisteredFunction;
  route: CompiledRoute;
  methods: Set<string>;
  authLevel: string;
}

export function sendJson(
  res: http.ServerResponse,
  status: number,
  body: unknown,
  headers: http.OutgoingHttpHeaders = {},
) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers });
  res.end(text);
}

export function errorBody(code: string, message: string, extra: object = {}) {
  return { error: { code, message, ...extra } };
}

function keyMatches(expected: string, given: string | undefined | null): boolean {
  if (!given) return false;
  const a = Buffer.from(expected);
  const b = Buffer.from(given);
  return a.length === b.length && timingSafeEqual(a, b);
}

/** True when the request carries the host key (header or `code` query parameter). */
export function hasFunctionKey(req: http.IncomingMessage, url: URL, key: string): boolean {
  const header = req.headers['x-functions-key'];
  return (
    keyMatches(key, Array.isArray(header) ? header[0] : header) ||
    keyMatches(key, url.searchParams.get('code'))
  );
}

async function readBody(req: http.IncomingMessage, limit: number): Promise<Buffer | 'too-large'> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > limit) return 'too-large';
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

/**
 * Serves every `httpTrigger` registration on `/{routePrefix}/{route}` with the Functions host's
 * behaviour: route templates, method checks, function-key auth, and errors that never leak a stack.
 */
export class HttpTriggerServer {
  private readonly routes: HttpRoute[];
  private server?: http.Server;

  constructor(private readonly options: HttpTriggerServerOptions) {
    this.routes = options.registry.byTriggerType('httpTrigger').map((fn) => ({
      fn,
      route: compileRoute(String(fn.trigger.route ?? fn.name)),
      methods: new Set(
        ((fn.trigger.methods as string[] | undefined) ?? ['GET', 'POST']).map((m) => m.toUpperCase()),
      ),
      authLevel: String(fn.trigger.authLevel ?? 'function').toLowerCase(),
    }));
    this.routes.sort((a, b) => bySpecificity(a.route, b.route));
  }

  get port(): number {
    return (this.server?.address() as AddressInfo).port;
  }

  listen(port: number, host: string): Promise<void> {
    this.server = http.createServer((req, res) => {
      this.handle(req, res).catch((err) => {
        this.options.log('error', 'unhandled error serving a request', { err: String(err) });
        if (!res.headersSent)
          sendJson(res, 500, errorBody('InternalError', 'The local host failed to serve the request.'));
        else res.destroy();
      });
    });
    this.server.keepAliveTimeout = 5000;
    return new Promise((resolve, reject) => {
      this.server!.once('error', reject);
      this.server!.listen(port, host, () => resolve());
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      if (!this.server) return resolve();
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const host = req.headers.host ?? `127.0.0.1:${this.port}`;
    const url = new URL(req.url ?? '/', `http://${host}`);
    if (this.options.systemHandler) {
      const isSystemPath = url.pathname.startsWith('/runtime/');
      if (isSystemPath && !hasFunctionKey(req, url, this.options.functionKey)) {
        return sendJson(
          res,
          401,
          errorBody('Unauthorized', 'A valid function key is required (x-functions-key header or ?code=).'),
        );
      }
      if (isSystemPath && (await this.options.systemHandler(req, res))) return;
    }
    const prefix = this.options.routePrefix ? `/${this.options.routePrefix}` : '';
    if (prefix && !(url.pathname === prefix || url.pathname.startsWith(`${prefix}/`))) {
      return sendJson(res, 404, errorBody('NotFound', `No function serves ${url.pathname}.`));
    }
    const path = url.pathname.slice(prefix.length);
    const matches = this.routes
      .map((r) => ({ r, params: r.route.match(path) }))
      .filter((m): m is { r: HttpRoute; params: Record<string, string> } => m.params !== undefined);
    if (matches.length === 0) {
      return sendJson(res, 404, errorBody('NotFound', `No function serves ${url.pathname}.`));
    }
    const method = (req.method ?? 'GET').toUpperCase();
    const match = matches.find((m) => m.r.methods.has(method));
    if (!match) {
      const allowed = [...new Set(matches.flatMap((m) => [...m.r.methods]))].join(', ');
      return sendJson(
        res,
        405,
        errorBody('MethodNotAllowed', `${method} is not allowed on ${url.pathname}; use ${allowed}.`),
        {
          allow: allowed,
        },
      );
    }
    const { r, params } = match;
    if (r.authLevel !== 'anonymous' && !hasFunctionKey(req, url, this.options.functionKey)) {
      return sendJson(
        res,
        401,
        errorBody('Unauthorized', 'A valid function key is required (x-functions-key header or ?code=).'),
      );
    }
    const body = await readBody(req, MAX_REQUEST_BYTES);
    if (body === 'too-large') {
      return sendJson(
        res,
        413,
        errorBody('RequestTooLarge', `The request body is larger than ${MAX_REQUEST_BYTES} bytes.`),
      );
    }
    await this.invoke(r.fn, req, url, params, body, res);
  }

  private async invoke(
    fn: RegisteredFunction,
    req: http.IncomingMessage,
    url: URL,
    params: Record<string, string>,
    body: Buffer,
    res: http.ServerResponse,
  ): Promise<void> {
    const headers: Record<string, string> = {};
    for (const [name, value] of Object.entries(req.headers)) {
      if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
    }
    const query: Record<string, string> = {};
    for (const [name, value] of url.searchParams) query[name] = value;
    const httpData: RpcHttpData = {
      method: req.method ?? 'GET',
      url: url.toString(),
      headers,
      query,
      params,
      body: body.length > 0 ? { bytes: body } : undefined,
    };
    const invocationId = randomUUID();
    try {
      const response = await this.options.registry.invoke(fn.name, {
        invocationId,
        inputData: [{ name: fn.trigger.name, data: { http: httpData } }, ...this.options.extraInputs(fn)],
        triggerMetadata: {},
      });
      const out =
        response.returnValue?.http ?? response.outputData?.find((o) => o.name === '$return')?.data?.http;
      if (!out) {
        res.writeHead(204);
        return void res.end();
      }
      const status = Number(out.statusCode ?? 200) || 200;
      const bytes = out.body?.bytes ? Buffer.from(out.body.bytes) : Buffer.from(out.body?.string ?? '');
      res.writeHead(status, { ...(out.headers ?? {}), 'content-length': bytes.length });
      res.end(bytes);
    } catch (err) {
      // The Functions host answers 500 without the exception; we add a correlation id to find the log line.
      this.options.log('error', `function ${fn.name} failed`, {
        function: fn.name,
        invocationId,
        err: err instanceof Error ? err.stack : String(err),
      });
      if (!res.headersSent) {
        sendJson(
          res,
          500,
          errorBody(
            'InternalError',
            `The function failed; look for correlation id ${invocationId} in the host log.`,
            {
              correlationId: invocationId,
            },
          ),
        );
      }
    }
  }
}
