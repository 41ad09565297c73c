import { ConfigError, LifeboatError } from '../../shared/errors';
import { backoffDelay } from './shipper';
import type { RemoteChecksums } from './sync';

// The cloud copy's block checksums over the HTTP API (docs/api.md):
//   GET {api}/machines/{machine}/disks/{disk}/checksums?blockSize=65536&offset=…&length=…
//   x-functions-key: <key>, accept: application/octet-stream
//   →  32 bytes of SHA-256 per block; sizeBytes, blockSize, offset in x-lifeboat-* headers
// (an API that answers JSON instead — { sizeBytes, blockSize, offset, blocks: [hex…] } — is read too).
// A resync asks for 8 MiB at a time; this reads a larger window per request (default 64 MiB,
// 1,024 checksums) and keeps the next windows in flight while the current one is compared.

export interface ApiChecksumsOptions {
  /** The API base, e.g. https://func-lifeboat.azurewebsites.net/api (a bare origin gets /api). */
  apiUrl: string;
  /** The function key, sent as x-functions-key (none for an API without keys). */
  key?: string;
  machine: string;
  disk: string;
  /** Default 64 KiB, the agent's block size. */
  blockSize?: number;
  /** Bytes of checksums fetched per request (default 64 MiB; at most 16,384 blocks). */
  windowBytes?: number;
  /**
   * Windows requested ahead of the one being compared (default 2): the endpoint is stateless, so
   * the cloud computes them side by side while the agent hashes its own blocks.
   */
  windowsAhead?: number;
  /** Per-request timeout (default 120 s: the cloud reads the seed blob's written ranges). */
  timeoutMs?: number;
  /** Attempts per window on 5xx/429/network errors before the error reaches the resync (default 4). */
  attempts?: number;
}

/** The API refused the request in a way retrying will not fix (bad key, unknown disk, bad input). */
export class ChecksumsRequestError extends LifeboatError {
  constructor(message: string, status: number) {
    super('ChecksumsRequestFailed', message, { status, target: 'api' });
  }
}

interface Window {
  offset: number;
  /** Checksums of the blocks from `offset` on (fewer than asked at the cloud disk's end). */
  blocks: Buffer[];
}

/** Normalises the --api value to the API base with no trailing slash. */
export function apiBase(apiUrl: string): URL {
  let url: URL;
  try {
    url = new URL(apiUrl);
  } catch {
    throw new ConfigError(
      `The API URL ${JSON.stringify(apiUrl)} is not a URL; pass --api https://<function app>/api.`,
      'api',
    );
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:')
    throw new ConfigError(`The API URL ${apiUrl} must start with https:// (or http:// locally).`, 'api');
  let p = url.pathname.replace(/\/+$/, '');
  if (p === '') p = '/api';
  url.pathname = p;
  url.search = '';
  return url;
}

/** RemoteChecksums of a disk's seed copy in the cloud, read through the HTTP API. */
export class ApiChecksums implements RemoteChecksums {
  readonly blockSize: number;
  private readonly base: URL;
  private readonly windowBytes: number;
  private current: Window | undefined;
  private readonly windowsAhead: number;
  /** Windows requested ahead of the one being compared, by offset. */
  private readonly ahead = new Map<number, Promise<Window>>();
  /** Bumped by restart(): windows fetched before it are never kept. */
  private generation = 0;
  /** The cloud disk's size, once an answer told it. */
  sizeBytes: number | undefined;
  /** Requests made and response body bytes received (for tests, status and the benchmark). */
  requests = 0;
  bytesFetched = 0;

  constructor(private readonly options: ApiChecksumsOptions) {
    this.base = apiBase(options.apiUrl);
    this.blockSize = options.blockSize ?? 64 * 1024;
    this.windowsAhead = Math.max(0, options.windowsAhead ?? 2);
    const window = options.windowBytes ?? 64 * 1024 * 1024;
    this.windowBytes = Math.max(
      this.blockSize,
      Math.min(16_384, Math.floor(window / this.blockSize)) * this.blockSize,
    );
  }

  async checksums(range: { offset: number; length: number }): Promise<Buffer[]> {
    if (range.offset % this.blockSize !== 0) {
      throw new LifeboatError(
        'InvalidChecksumRange',
        `Checksums are asked from offset ${range.offset}, which is not a multiple of the block size ${this.blockSize}.`,
      );
    }
    const out: Buffer[] = [];
    const end = range.offset + range.length;
    for (let at = range.offset; at < end; at += this.blockSize) {
      if (this.sizeBytes !== undefined && at >= this.sizeBytes) break; // past the cloud disk: differs
      const window = await this.windowAt(at);
      const sum = window.blocks[(at - window.offset) / this.blockSize];
      if (sum === undefined) break;
      out.push(sum);
    }
    return out;
  }

  /**
   * A new resync pass: the cloud copy may have changed since the windows held were fetched (a
   * block found equal in an old window may differ now), so they are all dropped.
   */
  restart(): void {
    this.generation += 1;
    this.current = undefined;
    this.ahead.clear();
  }

  private async windowAt(offset: number): Promise<Window> {
    const within = (w: Window | undefined): boolean =>
      w !== undefined && offset >= w.offset && offset < w.offset + this.windowBytes;
    const generation = this.generation;
    let current: Window;
    if (this.current && within(this.current)) current = this.current;
    else {
      const start = offset - (offset % this.windowBytes);
      const fetching = this.ahead.get(start);
      // Windows behind this one will not be asked for again.
      for (const at of [...this.ahead.keys()]) if (at <= start) this.ahead.delete(at);
      current = await (fetching ?? this.fetchWindow(start));
      // A restart meanwhile: this window serves the caller of an old pass, but is not kept.
      if (generation !== this.generation) return current;
      this.current = current;
    }
    // Keep the next windows in flight: the cloud computes them while this one is compared.
    for (let k = 1; k <= this.windowsAhead; k++) {
      const next = current.offset + k * this.windowBytes;
      if (this.sizeBytes !== undefined && next >= this.sizeBytes) break;
      if (this.ahead.has(next)) continue;
      const window = this.fetchWindow(next);
      window.catch(() => undefined); // an error shows when the window is needed
      this.ahead.set(next, window);
    }
    return current;
  }

  private async fetchWindow(offset: number): Promise<Window> {
    if (this.sizeBytes !== undefined && offset >= this.sizeBytes) return { offset, blocks: [] };
    const attempts = this.options.attempts ?? 4;
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.request(offset);
      } catch (err) {
        if (err instanceof ChecksumsRequestError || attempt + 1 >= attempts) throw err;
        await new Promise((r) => setTimeout(r, backoffDelay(attempt, { baseMs: 500, maxMs: 10_000 })));
      }
    }
  }

  private async request(offset: number): Promise<Window> {
    const { machine, disk } = this.options;
    const url = new URL(
      `${this.base.pathname}/machines/${encodeURIComponent(machine)}/disks/${encodeURIComponent(disk)}/checksums`,
      this.base,
    );
    url.searchParams.set('blockSize', String(this.blockSize));
    url.searchParams.set('offset', String(offset));
    url.searchParams.set('length', String(this.windowBytes));
    this.requests++;
    let res: Response;
    try {
      res = await fetch(url, {
        headers: {
          accept: 'application/octet-stream, application/json;q=0.5',
          ...(this.options.key ? { 'x-functions-key': this.options.key } : {}),
        },
        signal: AbortSignal.timeout(this.options.timeoutMs ?? 120_000),
      });
    } catch (err) {
      throw new LifeboatError(
        'ChecksumsUnavailable',
        `The Lifeboat API at ${this.base.origin} cannot be reached for the checksums of ${machine}/${disk} (${(err as Error).message}); the resync retries.`,
        { status: 503, target: 'api' },
      );
    }
    const body = Buffer.from(await res.arrayBuffer());
    this.bytesFetched += body.length;
    if (res.status !== 200) {
      const text = body.toString('utf8');
      let message = text.slice(0, 300);
      try {
        message = (JSON.parse(text) as { error?: { message?: string } }).error?.message ?? message;
      } catch {
        // not JSON
      }
      const what = `The Lifeboat API answered ${res.status} to GET ${url.pathname}: ${message}`;
      if (res.status === 401 || res.status === 403)
        throw new ChecksumsRequestError(`${what} (pass the function key with --api-key-file)`, res.status);
      if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429)
        throw new ChecksumsRequestError(what, res.status);
      throw new LifeboatError('ChecksumsUnavailable', what, { status: 503, target: 'api' });
    }
    const answer = (res.headers.get('content-type') ?? '').startsWith('application/octet-stream')
      ? binaryAnswer(res.headers, body)
      : jsonAnswer(body);
    const expected =
      answer === undefined
        ? -1
        : Math.ceil(Math.min(this.windowBytes, answer.sizeBytes - offset) / this.blockSize);
    if (
      answer === undefined ||
      answer.blockSize !== this.blockSize ||
      answer.offset !== offset ||
      answer.digests.length !== Math.max(0, expected) * 32
    ) {
      throw new ChecksumsRequestError(
        `The Lifeboat API answered GET ${url.pathname} with checksums for another range or block size, or not as SHA-256.`,
        502,
      );
    }
    this.sizeBytes = answer.sizeBytes;
    const blocks: Buffer[] = [];
    for (let at = 0; at < answer.digests.length; at += 32) blocks.push(answer.digests.subarray(at, at + 32));
    return { offset, blocks };
  }
}

interface ChecksumAnswer {
  sizeBytes: number;
  blockSize: number;
  offset: number;
  /** 32 bytes per block. */
  digests: Buffer;
}

/** The binary answer: raw digests, the rest in x-lifeboat-* headers (undefined when malformed). */
function binaryAnswer(headers: Headers, body: Buffer): ChecksumAnswer | undefined {
  const num = (name: string): number => {
    const raw = headers.get(`x-lifeboat-${name}`);
    return raw !== null && /^\d+$/.test(raw) ? Number(raw) : NaN;
  };
  const answer = {
    sizeBytes: num('size-bytes'),
    blockSize: num('block-size'),
    offset: num('offset'),
    digests: body,
  };
  if (headers.get('x-lifeboat-algorithm') !== 'sha256') return undefined;
  return Number.isSafeInteger(answer.sizeBytes) &&
    Number.isSafeInteger(answer.blockSize) &&
    Number.isSafeInteger(answer.offset)
    ? answer
    : undefined;
}

/** The JSON answer of an API without the binary form. */
function jsonAnswer(body: Buffer): ChecksumAnswer | undefined {
  let json: { sizeBytes?: unknown; blockSize?: unknown; offset?: unknown; blocks?: unknown };
  try {
    json = JSON.parse(body.toString('utf8')) as typeof json;
  } catch {
    return undefined;
  }
  if (
    typeof json.sizeBytes !== 'number' ||
    typeof json.blockSize !== 'number' ||
    typeof json.offset !== 'number' ||
    !Array.isArray(json.blocks) ||
    !json.blocks.every((b) => typeof b === 'string' && /^[0-9a-f]{64}$/.test(b))
  )
    return undefined;
  return {
    sizeBytes: json.sizeBytes,
    blockSize: json.blockSize,
    offset: json.offset,
    digests: Buffer.from((json.blocks as string[]).join(''), 'hex'),
  };
}

/**
 * The epoch the cloud's apply has each disk in, from GET {api}/machines/{machine} (its `disks`:
 * `{ id, epoch, state, appliedSeq, … }`). A cloud-requested resync compares checksums only once
 * the disk is in the new epoch (docs/agent.md, "Cloud-requested resync").
 */
export class ApiDiskEpochs {
  private readonly base: URL;

  constructor(
    private readonly options: Pick<ApiChecksumsOptions, 'apiUrl' | 'key' | 'machine' | 'timeoutMs'>,
  ) {
    this.base = apiBase(options.apiUrl);
  }

  async diskEpoch(disk: string): Promise<number | undefined> {
    const url = new URL(
      `${this.base.pathname}/machines/${encodeURIComponent(this.options.machine)}`,
      this.base,
    );
    let res: Response;
    try {
      res = await fetch(url, {
        headers: this.options.key ? { 'x-functions-key': this.options.key } : {},
        signal: AbortSignal.timeout(this.options.timeoutMs ?? 30_000),
      });
    } catch (err) {
      throw new LifeboatError(
        'ApiUnavailable',
        `The Lifeboat API at ${this.base.origin} cannot be reached for machine ${this.options.machine} (${(err as Error).message}).`,
        { status: 503, target: 'api' },
      );
    }
    const text = await res.text();
    if (res.status !== 200) {
      throw new LifeboatError(
        'ApiUnavailable',
        `The Lifeboat API answered ${res.status} to GET ${url.pathname}: ${text.slice(0, 300)}`,
        {
          status: res.status === 401 || res.status === 403 ? res.status : 503,
          target: 'api',
        },
      );
    }
    const body = JSON.parse(text) as { disks?: { id?: unknown; epoch?: unknown }[] };
    const row = body.disks?.find((d) => d.id === disk);
    return typeof row?.epoch === 'number' ? row.epoch : undefined;
  }
}
