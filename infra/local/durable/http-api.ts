import type http from 'node:http';
import { LifeboatError } from '../../../shared/errors';
import { PAYLOAD_LIMIT, TERMINAL, type RuntimeStatus } from './store';

/*
 * The Durable extension's HTTP management API, as DurableClient and the URLs of
 * createCheckStatusResponse use it. The same routes are served under two prefixes: the public
 * webhook path (behind the host's function key) and the loopback RPC path `rpcBaseUrl` names.
 *
 *   POST   {p}/orchestrators/{name}[/{instanceId}]        start (202 + management URLs; 409 if running)
 *   GET    {p}/instances/{id}?showHistory&showHistoryOutput&showInput
 *   GET    {p}/instances?runtimeStatus&createdTimeFrom&createdTimeTo&top (+ x-ms-continuation-token)
 *   POST   {p}/instances/{id}/raiseEvent/{event}          202 / 404 / 410
 *   POST   {p}/instances/{id}/terminate|suspend|resume?reason=
 *   DELETE {p}/instances/{id}                             purge (200 {instancesDeleted} / 404)
 *   DELETE {p}/instances?filters                          purge by filter
 */

export const WEBHOOK_PREFIX = '/runtime/webhooks/durabletask';
export const RPC_PREFIX = '/durabletask';

export interface StatusQuery {
  showHistory?: boolean;
  showHistoryOutput?: boolean;
  showInput?: boolean;
  runtimeStatus?: RuntimeStatus[];
  createdTimeFrom?: Date;
  createdTimeTo?: Date;
}

type Outcome = 'accepted' | 'notFound' | 'gone';

export interface ManagementApi {
  startNew(name: string, options: { instanceId?: string; input?: string }): Promise<string>;
  getStatus(instanceId: string, query: StatusQuery): Promise<Record<string, unknown> | undefined>;
  listStatus(query: StatusQuery): Promise<Record<string, unknown>[]>;
  raiseEvent(instanceId: string, eventName: string, data: string | undefined): Promise<Outcome>;
  terminate(instanceId: string, reason: string | undefined): Promise<Outcome>;
  suspend(instanceId: string, reason: string | undefined): Promise<Outcome>;
  resume(instanceId: string, reason: string | undefined): Promise<Outcome>;
  purge(instanceId: string): Promise<number>;
  purgeBy(query: StatusQuery): Promise<number>;
  managementPayload(instanceId: string): Record<string, string>;
}

function send(
  res: http.ServerResponse,
  status: number,
  body?: unknown,
  headers: http.OutgoingHttpHeaders = {},
): void {
  if (body === undefined) {
    res.writeHead(status, headers);
    res.end();
    return;
  }
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', ...headers });
  res.end(JSON.stringify(body));
}

function error(res: http.ServerResponse, status: number, code: string, message: string): void {
  send(res, status, { error: { code, message } });
}

async function readBody(req: http.IncomingMessage): Promise<string | 'too-large'> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > PAYLOAD_LIMIT * 4) return 'too-large';
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function flag(url: URL, name: string): boolean | undefined {
  const v = url.searchParams.get(name);
  if (v === null) return undefined;
  return v.toLowerCase() === 'true';
}

function date(url: URL, name: string): Date | undefined {
  const v = url.searchParams.get(name);
  if (!v) return undefined;
  const d = new Date(v);
  if (Number.isNaN(d.getTime()))
    throw new HttpProblem(400, 'InvalidInput', `${name} must be an ISO-8601 time.`);
  return d;
}

class HttpProblem extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

function queryOf(url: URL): StatusQuery {
  const statuses = (url.searchParams.getAll('runtimeStatus') ?? [])
    .flatMap((v) => v.split(','))
    .map((s) => s.trim())
    .filter(Boolean);
  return {
    showHistory: flag(url, 'showHistory'),
    showHistoryOutput: flag(url, 'showHistoryOutput'),
    showInput: flag(url, 'showInput'),
    runtimeStatus: statuses.length ? (statuses as RuntimeStatus[]) : undefined,
    createdTimeFrom: date(url, 'createdTimeFrom'),
    createdTimeTo: date(url, 'createdTimeTo'),
  };
}

function decode(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw new HttpProblem(400, 'InvalidInput', `The path segment '${segment}' is not valid URL encoding.`);
  }
}

const RUNNING: ReadonlySet<string> = new Set(['Pending', 'Running', 'ContinuedAsNew', 'Suspended']);

/** Serves one request if its path is under `prefix`; false otherwise. */
export async function serveDurableHttp(
  api: ManagementApi,
  req: http.IncomingMessage,
  res: http.ServerResponse,
  prefix: string,
): Promise<boolean> {
  const url = new URL(req.url ?? '/', 'http://local');
  if (url.pathname !== prefix && !url.pathname.startsWith(`${prefix}/`)) return false;
  const parts = url.pathname.slice(prefix.length).split('/').filter(Boolean);
  const method = (req.method ?? 'GET').toUpperCase();
  try {
    await route(api, req, res, url, method, parts);
  } catch (err) {
    if (res.headersSent) {
      res.destroy();
    } else if (err instanceof HttpProblem) {
      error(res, err.status, err.code, err.message);
    } else if (err instanceof LifeboatError && err.status < 500) {
      error(res, err.status, err.code, err.message);
    } else {
      error(
        res,
        500,
        'InternalError',
        `The Durable engine could not serve ${method} ${url.pathname}: ${(err as Error).message}`,
      );
    }
  }
  return true;
}

async function route(
  api: ManagementApi,
  req: http.IncomingMessage,
  res: http.ServerResponse,
  url: URL,
  method: string,
  parts: string[],
): Promise<void> {
  const [collection, ...rest] = parts;
  const notAllowed = (allowed: string) => {
    throw new HttpProblem(
      405,
      'MethodNotAllowed',
      `${method} is not allowed on ${url.pathname}; use ${allowed}.`,
    );
  };

  if (collection === 'orchestrators' && (rest.length === 1 || rest.length === 2)) {
    if (method !== 'POST') return notAllowed('POST');
    const body = await readBody(req);
    if (body === 'too-large')
      throw new HttpProblem(413, 'PayloadTooLarge', 'The orchestration input is too large.');
    const name = decode(rest[0]);
    const instanceId = await api.startNew(name, {
      instanceId: rest[1] !== undefined ? decode(rest[1]) : undefined,
      input: body.trim() === '' ? undefined : body,
    });
    const payload = api.managementPayload(instanceId);
    const timeout = Number(url.searchParams.get('timeout') ?? '');
    if (Number.isFinite(timeout) && timeout > 0) {
      const interval = Math.max(Number(url.searchParams.get('pollingInterval') ?? '1') || 1, 0.05) * 1000;
      const deadline = Date.now() + timeout * 1000;
      for (;;) {
        const status = await api.getStatus(instanceId, {});
        if (status && TERMINAL.has(status.runtimeStatus as RuntimeStatus)) {
          return send(res, 200, status.runtimeStatus === 'Completed' ? status.output : status);
        }
        if (Date.now() + interval > deadline) break;
        await new Promise((r) => setTimeout(r, interval));
      }
    }
    return send(res, 202, payload, { location: payload.statusQueryGetUri, 'retry-after': '10' });
  }

  if (collection !== 'instances') {
    if (collection === 'entities')
      throw new HttpProblem(
        501,
        'NotSupported',
        'Durable entities are not supported by the local Durable engine.',
      );
    throw new HttpProblem(404, 'NotFound', `No Durable API serves ${url.pathname}.`);
  }

  if (rest.length === 0) {
    const query = queryOf(url);
    if (method === 'GET') {
      const all = await api.listStatus(query);
      const top = Number(url.searchParams.get('top') ?? '');
      const token = req.headers['x-ms-continuation-token'];
      const offset = typeof token === 'string' && /^\d+$/.test(token) ? Number(token) : 0;
      if (Number.isInteger(top) && top > 0) {
        const page = all.slice(offset, offset + top);
        const headers =
          offset + top < all.length ? { 'x-ms-continuation-token': String(offset + top) } : undefined;
        return send(res, 200, page, headers);
      }
      return send(res, 200, all.slice(offset));
    }
    if (method === 'DELETE') {
      const deleted = await api.purgeBy(query);
      return deleted > 0
        ? send(res, 200, { instancesDeleted: deleted })
        : send(res, 404, { instancesDeleted: 0 });
    }
    return notAllowed('GET, DELETE');
  }

  const instanceId = decode(rest[0]);
  if (rest.length === 1) {
    if (method === 'GET') {
      const status = await api.getStatus(instanceId, queryOf(url));
      if (!status)
        throw new HttpProblem(404, 'NotFound', `No orchestration instance with ID '${instanceId}' exists.`);
      const runtime = String(status.runtimeStatus);
      if (RUNNING.has(runtime)) {
        const location = api.managementPayload(instanceId).statusQueryGetUri;
        return send(res, 202, status, { location, 'retry-after': '10' });
      }
      const failedAs500 = runtime === 'Failed' && flag(url, 'returnInternalServerErrorOnFailure') === true;
      return send(res, failedAs500 ? 500 : 200, status);
    }
    if (method === 'DELETE') {
      const deleted = await api.purge(instanceId);
      if (deleted === 0)
        throw new HttpProblem(404, 'NotFound', `No orchestration instance with ID '${instanceId}' exists.`);
      return send(res, 200, { instancesDeleted: deleted });
    }
    return notAllowed('GET, DELETE');
  }

  const operation = rest[1];
  if (method !== 'POST') return notAllowed('POST');
  let outcome: Outcome;
  const reason = url.searchParams.get('reason') ?? undefined;
  if (operation === 'raiseEvent' && rest.length === 3) {
    const body = await readBody(req);
    if (body === 'too-large') throw new HttpProblem(413, 'PayloadTooLarge', 'The event data is too large.');
    outcome = await api.raiseEvent(instanceId, decode(rest[2]), body.trim() === '' ? undefined : body);
  } else if (rest.length === 2 && operation === 'terminate') {
    outcome = await api.terminate(instanceId, reason);
  } else if (rest.length === 2 && operation === 'suspend') {
    outcome = await api.suspend(instanceId, reason);
  } else if (rest.length === 2 && operation === 'resume') {
    outcome = await api.resume(instanceId, reason);
  } else if (rest.length === 2 && (operation === 'rewind' || operation === 'restart')) {
    throw new HttpProblem(501, 'NotSupported', `${operation} is not supported by the local Durable engine.`);
  } else {
    throw new HttpProblem(404, 'NotFound', `No Durable API serves ${url.pathname}.`);
  }
  if (outcome === 'notFound')
    throw new HttpProblem(404, 'NotFound', `No orchestration instance with ID '${instanceId}' exists.`);
  if (outcome === 'gone')
    throw new HttpProblem(410, 'Gone', `The orchestration instance '${instanceId}' has already finished.`);
  return send(res, 202);
}
