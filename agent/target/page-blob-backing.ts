import type { PageBlobClient } from '@azure/storage-blob';
import { ConfigError } from '../../shared/errors';
import type { BlockBacking } from '../mobility/nbd';

// A page blob as an NBD export's storage: the failover disk of a locally "running" failover
// machine. Every write is a put-pages (or clear-pages) that the storage service has made durable
// before the NBD client gets its reply, so FLUSH has nothing left to do.

const PAGE = 512;
/** Page blobs take at most 4 MiB per put-pages call. */
const MAX_PUT = 4 * 1024 * 1024;

interface InFlight {
  start: number;
  end: number;
  done: Promise<void>;
}

export class PageBlobBacking implements BlockBacking {
  private readonly inFlight = new Set<InFlight>();
  private closed = false;

  private constructor(
    readonly blob: PageBlobClient,
    readonly size: number,
    readonly readOnly: boolean,
  ) {}

  static async open(blob: PageBlobClient, options: { readOnly?: boolean } = {}): Promise<PageBlobBacking> {
    let size: number;
    try {
      size = (await blob.getProperties()).contentLength ?? 0;
    } catch (err) {
      throw new ConfigError(
        `The failover disk ${blob.containerName}/${blob.name} cannot be opened (${(err as Error).message}); check that the failover exists and the storage connection.`,
        'blob',
      );
    }
    return new PageBlobBacking(blob, size, options.readOnly ?? false);
  }

  /** Runs `op` once every in-flight operation overlapping [start, end) finished: later writes win. */
  private async ordered(start: number, end: number, op: () => Promise<void>): Promise<void> {
    if (this.closed) throw new Error(`The failover disk ${this.blob.name} is closed.`);
    const overlapping = [...this.inFlight]
      .filter((f) => f.start < end && start < f.end)
      .map((f) => f.done.catch(() => undefined));
    const entry: InFlight = { start, end, done: Promise.resolve() };
    entry.done = Promise.all(overlapping).then(op);
    this.inFlight.add(entry);
    try {
      await entry.done;
    } finally {
      this.inFlight.delete(entry);
    }
  }

  async read(into: Buffer, at: number, length: number, offset: number): Promise<void> {
    if (length === 0) return;
    await this.ordered(offset, offset + length, async () => {
      const response = await this.blob.download(offset, length);
      let pos = at;
      for await (const chunk of response.readableStreamBody as AsyncIterable<Buffer>) {
        chunk.copy(into, pos);
        pos += chunk.length;
      }
      if (pos - at !== length)
        throw new Error(`Short read of ${this.blob.name} at ${offset}: ${pos - at} of ${length} bytes.`);
    });
  }

  async write(data: Buffer, offset: number): Promise<void> {
    const start = Math.floor(offset / PAGE) * PAGE;
    const end = Math.ceil((offset + data.length) / PAGE) * PAGE;
    await this.ordered(start, end, async () => {
      let body = data;
      if (start !== offset || end !== offset + data.length) {
        // Unaligned: read the edge pages and merge (clients normally honour the 512-byte minimum).
        body = Buffer.alloc(end - start);
        const edge = await this.blob.downloadToBuffer(start, end - start);
        edge.copy(body);
        data.copy(body, offset - start);
      }
      for (let at = 0; at < body.length; at += MAX_PUT) {
        const n = Math.min(MAX_PUT, body.length - at);
        await this.blob.uploadPages(body.subarray(at, at + n), start + at, n);
      }
    });
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const start = Math.ceil(offset / PAGE) * PAGE;
    const end = Math.floor((offset + length) / PAGE) * PAGE;
    if (start >= end) return this.write(Buffer.alloc(length), offset);
    if (start > offset) await this.write(Buffer.alloc(start - offset), offset);
    await this.ordered(start, end, async () => {
      for (let at = start; at < end; at += MAX_PUT)
        await this.blob.clearPages(at, Math.min(MAX_PUT, end - at));
    });
    if (offset + length > end) await this.write(Buffer.alloc(offset + length - end), end);
  }

  async sync(): Promise<void> {
    // Each put-pages was durable when it returned; wait for those still in flight.
    await Promise.all([...this.inFlight].map((f) => f.done.catch(() => undefined)));
  }

  async close(): Promise<void> {
    await this.sync();
    this.closed = true;
  }
}
