import type {
  BlobClient,
  BlobDownloadResponseParsed,
  BlobLeaseClient,
  ContainerClient,
  PageBlobClient,
} from '@azure/storage-blob';
import { statusOf } from './tables';

/** Seed disks: one page blob per protected disk; its snapshots are the recovery points. */
export const SEED_CONTAINER = 'seed-disks';
/** Page blobs take at most 4 MiB per put-pages call; writes are cut at 4 MiB-aligned boundaries. */
export const PAGE_WRITE_BYTES = 4 * 1024 * 1024;

export function seedBlobName(machine: string, disk: string): string {
  return `${machine}/${disk}.img`;
}

export function seedBlob(container: ContainerClient, machine: string, disk: string): PageBlobClient {
  return container.getPageBlobClient(seedBlobName(machine, disk));
}

/** The lease was lost (expired and taken by another applier) or could not be renewed. */
export class LeaseLostError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'LeaseLostError';
  }
}

/**
 * The one-writer-per-disk lease on a seed blob, renewed in the background while held. A failed
 * renewal marks it lost; page writes carrying the lease id then fail too, so a writer that lost
 * its lease can never change the disk.
 */
export class SeedLease {
  private timer?: NodeJS.Timeout;
  private lostError?: Error;
  /** Leases under the same id on blobs that go with the seed (its checksum index), renewed with it. */
  private readonly companions = new Set<BlobLeaseClient>();

  private constructor(
    private readonly client: BlobLeaseClient,
    readonly leaseId: string,
    readonly durationSeconds: number,
    /** The blob's ETag when the lease was taken (leasing does not change it; writes do). */
    readonly acquiredEtag?: string,
  ) {}

  /** Takes the lease, or returns undefined when another writer holds it. */
  static async acquire(blob: PageBlobClient, durationSeconds: number): Promise<SeedLease | undefined> {
    const client = blob.getBlobLeaseClient();
    let etag: string | undefined;
    try {
      etag = (await client.acquireLease(durationSeconds)).etag;
    } catch (err) {
      if (statusOf(err) === 409) return undefined;
      throw err;
    }
    const lease = new SeedLease(client, client.leaseId, durationSeconds, etag);
    lease.startRenewing();
    return lease;
  }

  get lost(): Error | undefined {
    return this.lostError;
  }

  /** Renews (and releases) `client`, a lease taken with this lease's id, together with the seed's. */
  attach(client: BlobLeaseClient): void {
    this.companions.add(client);
  }

  detach(client: BlobLeaseClient): void {
    this.companions.delete(client);
  }

  private startRenewing(): void {
    const every = Math.max(1000, (this.durationSeconds * 1000) / 3);
    this.timer = setInterval(() => {
      this.renew().catch(() => undefined);
    }, every);
    this.timer.unref();
  }

  /** Renews now; throws LeaseLostError when the lease is no longer ours. */
  async renew(): Promise<void> {
    if (this.lostError) throw this.lostError;
    try {
      // Companions first: their leases then lapse before the seed's if renewals stop.
      for (const companion of this.companions) await companion.renewLease();
      await this.client.renewLease();
    } catch (err) {
      this.lostError = new LeaseLostError(
        `The seed blob lease ${this.leaseId} could not be renewed: ${(err as Error).message}`,
        {
          cause: err,
        },
      );
      throw this.lostError;
    }
  }

  async release(): Promise<void> {
    clearInterval(this.timer);
    for (const companion of this.companions) await companion.releaseLease().catch(() => undefined);
    try {
      await this.client.releaseLease();
    } catch {
      /* expired or taken: nothing to release */
    }
  }
}

interface InFlight {
  start: number;
  end: number;
  done: Promise<void>;
}

/**
 * Runs page operations with bounded concurrency while keeping the effect of their order: an
 * operation waits for every earlier one whose range overlaps it, so later data always wins.
 * Non-overlapping operations run in parallel, across record and segment boundaries.
 */
export class OrderedPageWriter {
  private readonly inFlight = new Set<InFlight>();
  private failure?: unknown;

  constructor(private readonly concurrency: number) {}

  get error(): unknown {
    return this.failure;
  }

  /** Starts `op` on [start, end) once overlaps are done and a slot is free; resolves once started. */
  async submit(start: number, end: number, op: () => Promise<unknown>): Promise<void> {
    this.throwIfFailed();
    const overlapping = [...this.inFlight].filter((f) => f.start < end && start < f.end).map((f) => f.done);
    if (overlapping.length > 0) await Promise.all(overlapping);
    while (this.inFlight.size >= this.concurrency) await Promise.race([...this.inFlight].map((f) => f.done));
    this.throwIfFailed();
    const entry: InFlight = { start, end, done: Promise.resolve() };
    entry.done = op().then(
      () => {
        this.inFlight.delete(entry);
      },
      (err) => {
        this.failure ??= err;
        this.inFlight.delete(entry);
      },
    );
    this.inFlight.add(entry);
  }

  /** Resolves when everything submitted so far finished; throws the first failure. */
  async drain(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.all([...this.inFlight].map((f) => f.done));
    this.throwIfFailed();
  }

  /** A promise for what is in flight now (later submissions are not waited for). */
  settled(): Promise<void> {
    const now = [...this.inFlight].map((f) => f.done);
    return Promise.all(now).then(() => this.throwIfFailed());
  }

  private throwIfFailed(): void {
    if (this.failure !== undefined) throw this.failure;
  }
}

/** Splits [offset, offset+length) at PAGE_WRITE_BYTES-aligned boundaries. */
export function* alignedChunks(
  offset: number,
  length: number,
  chunk = PAGE_WRITE_BYTES,
): Generator<[number, number]> {
  let at = offset;
  const end = offset + length;
  while (at < end) {
    const next = Math.min(end, (Math.floor(at / chunk) + 1) * chunk);
    yield [at, next - at];
    at = next;
  }
}

/** Attempts of a whole read (the request itself is also retried by the SDK's pipeline). */
const READ_ATTEMPTS = 3;

/**
 * Downloads [offset, offset+count) of a blob (all of it when count is undefined) into one Buffer
 * (`onResponse` sees the response's headers: metadata, lease state, range).
 * The SDK's resuming stream (maxRetryRequests > 0) costs about twice the CPU of the plain response
 * on the receiving side, so it is off, and a read that fails part-way is retried whole instead.
 * Errors the service answered (404, 412, …) are not retried here.
 */
export async function downloadBuffer(
  blob: BlobClient,
  offset = 0,
  count?: number,
  onResponse?: (response: BlobDownloadResponseParsed) => void,
): Promise<Buffer> {
  for (let attempt = 1; ; attempt++) {
    const response = await blob.download(offset, count, { maxRetryRequests: 0 });
    onResponse?.(response);
    try {
      const chunks: Buffer[] = [];
      for await (const chunk of response.readableStreamBody as AsyncIterable<Buffer>) chunks.push(chunk);
      const bytes = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks);
      if (response.contentLength !== undefined && bytes.length !== response.contentLength)
        throw new Error(`the response ended after ${bytes.length} of ${response.contentLength} bytes`);
      return bytes;
    } catch (err) {
      if (attempt >= READ_ATTEMPTS) throw err;
    }
  }
}

/** Reads [offset, offset+count) of a page blob (or snapshot) in one request. */
export async function readRange(blob: PageBlobClient, offset: number, count: number): Promise<Buffer> {
  if (count === 0) return Buffer.alloc(0);
  return downloadBuffer(blob, offset, count);
}
