import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import { LifeboatError, ValidationError, ensureError } from '../../shared/errors';
import { validateName } from '../../shared/names';
import { TRAILER_BYTES, decodeSegment } from '../../shared/segment';
import type { MachineAuthenticator } from './auth';
import { ackCommand, getCommands, reportCommandProgress, type CommandStore } from './commands';
import type { Spool } from './spool';
import type { IngestCounters, ProxyStatus } from './status';
import type { Uploader } from './uploader';

// The agent ↔ proxy API (DESIGN §2, docs/proxy.md):
//   PUT /v1/machines/{m}/disks/{d}/segments/{epoch}/{seq}  201 new · 200 same bytes · 409 other bytes
//   GET /v1/machines/{m}/disks/{d}                          last acknowledged (epoch, seq)
//   GET /v1/status                                          spool, backlog, upload rate, errors
//   GET /v1/machines/{m}/commands, POST …/commands/{id}/ack, POST …/commands/{id}/progress
//                                                            agent commands (commands.ts)
// A segment is checked (credential, names, size, its own checksum, header = URL) before a byte of
// it reaches the spool, and acknowledged only once it is durable there.

export interface IngestServerDeps {
  spool: Spool;
  uploader: Uploader;
  auth: MachineAuthenticator;
  commands: CommandStore;
  logger: Logger;
  maxSegmentBytes: number;
  spoolCapBytes: number;
  maxConcurrentRequests: number;
  /** Segment bytes held in memory by requests being received; beyond it, 429. */
  maxBufferedBytes: number;
  counters: IngestCounters;
  status(): ProxyStatus;
  /** Replication group barrier routes (/v1/groups/…, agent/group/site.ts): long polls, so outside the request limit. */
  groups?: {
    owns(url: string | undefined): boolean;
    handle(req: IncomingMessage, res: ServerResponse): Promise<void>;
  };
}

class PayloadTooLargeError extends LifeboatError {
  constructor(limit: number) {
    super(
      'PayloadTooLarge',
      `The segment is larger than this proxy's limit of ${limit} bytes; cut smaller segments.`,
      {
        status: 413,
        target: 'body',
      },
    );
  }
}

class ThrottledError extends LifeboatError {
  constructor(
    code: string,
    message: string,
    status: 429 | 503,
    readonly retryAfterSeconds: number,
  ) {
    super(code, message, { status });
  }
}

function parseCount(value: string, field: 'epoch' | 'seq'): number {
  const n = /^\d{1,16}$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n)) {
    throw new ValidationError(
      `${field} must be a non-negative integer (at most 2^53-1); got ${JSON.stringify(value)}.`,
      field,
      'InvalidNumber',
    );
  }
  return n;
}

function sendJson(
  res: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  if (res.headersSent) return;
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

/**
 * Reads the body, refusing more than `max` bytes: on overflow it stops keeping data and rejects
 * at once (the rest of the upload is discarded as it arrives, and the connection is closed).
 */
function readBody(req: IncomingMessage, max: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let total = 0;
    let over = false;
    req.on('data', (chunk: Buffer) => {
      total += chunk.length;
      if (over) return;
      if (total > max) {
        over = true;
        chunks.length = 0;
        reject(new PayloadTooLargeError(max));
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (!over) resolve(Buffer.concat(chunks, total));
    });
    req.on('error', (err) => {
      if (!over) reject(err);
    });
  });
}

export function createIngestHandler(
  deps: IngestServerDeps,
): (req: IncomingMessage, res: ServerResponse) => void {
  let inFlight = 0;
  let reservedBytes = 0;

  function retryAfterForSpool(excess: number): number {
    const rate = deps.uploader.getStats().bytesPerSecond;
    if (rate <= 0) return 10;
    return Math.min(60, Math.max(1, Math.ceil(excess / rate)));
  }

  async function putSegment(
    req: IncomingMessage,
    res: ServerResponse,
    m: string,
    d: string,
    e: string,
    s: string,
  ): Promise<void> {
    const owner = await deps.auth.authenticate(req.headers.authorization);
    const machine = validateName(m, 'machine');
    const disk = validateName(d, 'disk');
    const epoch = parseCount(e, 'epoch');
    const seq = parseCount(s, 'seq');
    if (owner !== machine) {
      throw new LifeboatError(
        'Forbidden',
        `The credential belongs to machine ${owner}; it cannot send segments for machine ${machine}.`,
        {
          status: 403,
          target: 'machine',
        },
      );
    }
    const declared =
      req.headers['content-length'] === undefined ? undefined : Number(req.headers['content-length']);
    if (declared !== undefined && declared > deps.maxSegmentBytes)
      throw new PayloadTooLargeError(deps.maxSegmentBytes);
    const reserve = declared ?? deps.maxSegmentBytes;
    if (reservedBytes > 0 && reservedBytes + reserve > deps.maxBufferedBytes) {
      throw new ThrottledError(
        'TooManyRequests',
        `The proxy is receiving ${reservedBytes} bytes of segments already (its limit is ${deps.maxBufferedBytes}); retry shortly.`,
        429,
        1,
      );
    }
    const excess = deps.spool.bytes + reservedBytes + reserve - deps.spoolCapBytes;
    if (excess > 0) {
      throw new ThrottledError(
        'SpoolFull',
        `The proxy's spool is full (${deps.spool.bytes} of ${deps.spoolCapBytes} bytes waiting for upload); retry later.`,
        503,
        retryAfterForSpool(excess),
      );
    }
    reservedBytes += reserve;
    let body: Buffer;
    try {
      body = await readBody(req, deps.maxSegmentBytes);
    } finally {
      reservedBytes -= reserve;
    }
    deps.counters.bytesReceived += body.length;
    const { header } = decodeSegment(body);
    for (const [field, inUrl, inHeader] of [
      ['machine', machine, header.machine],
      ['disk', disk, header.disk],
      ['epoch', epoch, header.epoch],
      ['seq', seq, header.seq],
    ] as const) {
      if (inUrl !== inHeader) {
        throw new ValidationError(
          `The segment's header says ${field} ${JSON.stringify(inHeader)} but the URL says ${JSON.stringify(inUrl)}; send each segment to its own URL.`,
          field,
          'SegmentHeaderMismatch',
        );
      }
    }
    const address = { machine, disk, epoch, seq };
    let result;
    try {
      result = await deps.spool.accept(
        address,
        body,
        Buffer.from(body.subarray(body.length - TRAILER_BYTES)),
      );
    } catch (err) {
      if (err instanceof LifeboatError) throw err;
      throw new ThrottledError(
        'SpoolUnavailable',
        `The proxy could not store the segment in its spool (${ensureError(err).message}); retry later.`,
        503,
        10,
      );
    }
    const log = deps.logger.child({ machine, disk, epoch, seq });
    if (result === 'created') {
      deps.counters.created++;
      log.info({ bytes: body.length }, 'segment acknowledged');
      deps.uploader.schedule(machine, disk);
      sendJson(res, 201, { machine, disk, epoch, seq, result });
    } else {
      deps.counters.duplicates++;
      log.debug({ bytes: body.length }, 'duplicate segment');
      sendJson(res, 200, { machine, disk, epoch, seq, result });
    }
  }

  async function getDisk(req: IncomingMessage, res: ServerResponse, m: string, d: string): Promise<void> {
    const owner = await deps.auth.authenticate(req.headers.authorization);
    const machine = validateName(m, 'machine');
    const disk = validateName(d, 'disk');
    if (owner !== machine) {
      throw new LifeboatError(
        'Forbidden',
        `The credential belongs to machine ${owner}; it cannot read machine ${machine}.`,
        {
          status: 403,
          target: 'machine',
        },
      );
    }
    const last = deps.spool.lastAcknowledged(machine, disk);
    const spooled = deps.spool.disk(machine, disk);
    sendJson(res, 200, {
      machine,
      disk,
      epoch: last?.epoch ?? null,
      seq: last?.seq ?? null,
      pendingSegments: spooled?.pending.length ?? 0,
      pendingBytes: spooled?.pendingBytes ?? 0,
    });
  }

  async function route(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const pathname = new URL(req.url ?? '/', 'http://proxy').pathname;
    let parts: string[];
    try {
      parts = pathname.split('/').slice(1).map(decodeURIComponent);
    } catch {
      throw new ValidationError(`The path ${pathname} is not validly percent-encoded.`, 'path');
    }
    const method = req.method ?? 'GET';
    const allow = (allowed: string): void => {
      if (method !== allowed) {
        throw new LifeboatError(
          'MethodNotAllowed',
          `${method} is not supported on ${pathname}; use ${allowed}.`,
          { status: 405 },
        );
      }
    };
    if (parts.length === 2 && parts[0] === 'v1' && parts[1] === 'status') {
      allow('GET');
      return sendJson(res, 200, deps.status());
    }
    if (parts[0] === 'v1' && parts[1] === 'machines' && parts[3] === 'commands') {
      const commandDeps = { auth: deps.auth, commands: deps.commands, logger: deps.logger, sendJson };
      if (parts.length === 4) {
        allow('GET');
        return getCommands(commandDeps, req, res, parts[2]);
      }
      if (parts.length === 6 && parts[5] === 'ack') {
        allow('POST');
        return ackCommand(commandDeps, req, res, parts[2], parts[4]);
      }
      if (parts.length === 6 && parts[5] === 'progress') {
        allow('POST');
        return reportCommandProgress(commandDeps, req, res, parts[2], parts[4]);
      }
    }
    if (parts[0] === 'v1' && parts[1] === 'machines' && parts[3] === 'disks') {
      if (parts.length === 5) {
        allow('GET');
        return getDisk(req, res, parts[2], parts[4]);
      }
      if (parts.length === 8 && parts[5] === 'segments') {
        allow('PUT');
        return putSegment(req, res, parts[2], parts[4], parts[6], parts[7]);
      }
    }
    throw new LifeboatError(
      'NotFound',
      `No route ${method} ${pathname}; the proxy serves PUT /v1/machines/{machine}/disks/{disk}/segments/{epoch}/{seq}, ` +
        'GET /v1/machines/{machine}/disks/{disk}, GET /v1/machines/{machine}/commands, ' +
        'POST /v1/machines/{machine}/commands/{id}/ack, POST /v1/machines/{machine}/commands/{id}/progress and GET /v1/status.',
      { status: 404 },
    );
  }

  return (req, res) => {
    if (deps.groups?.owns(req.url)) return void deps.groups.handle(req, res);
    if (inFlight >= deps.maxConcurrentRequests) {
      deps.counters.throttled++;
      res.setHeader('connection', 'close');
      sendJson(
        res,
        429,
        {
          error: {
            code: 'TooManyRequests',
            message: `The proxy is handling ${inFlight} requests already; retry shortly.`,
          },
        },
        { 'retry-after': '1' },
      );
      req.resume();
      return;
    }
    inFlight++;
    route(req, res)
      .catch((err: unknown) => {
        const error = err instanceof LifeboatError ? err : undefined;
        const status = error?.status ?? 500;
        const headers: Record<string, string> = {};
        if (err instanceof ThrottledError) {
          headers['retry-after'] = String(err.retryAfterSeconds);
          deps.counters.throttled++;
        } else if (status === 503) {
          headers['retry-after'] = '10';
        } else if (status === 409) {
          deps.counters.conflicts++;
        } else if (status >= 400 && status < 500) {
          deps.counters.rejected++;
        }
        if (!req.complete) {
          // The body was not (fully) read: discard the rest and do not reuse the connection.
          headers.connection = 'close';
          req.resume();
        }
        const message = error ? error.message : `Internal error: ${ensureError(err).message}`;
        const log = status >= 500 ? deps.logger.error.bind(deps.logger) : deps.logger.warn.bind(deps.logger);
        log({ status, code: error?.code ?? 'InternalError', url: req.url, method: req.method }, message);
        sendJson(
          res,
          status,
          { error: { code: error?.code ?? 'InternalError', message, target: error?.target } },
          headers,
        );
      })
      .finally(() => {
        inFlight--;
      });
  };
}
