import { createHash, timingSafeEqual, type Hash } from 'node:crypto';
import {
  checkName,
  checkRange,
  checkSafeCount,
  checkTime,
  formatError,
  HEADER_FIXED_BYTES,
  isMarkerId,
  MARKER_KINDS,
  MARKER_RECORD_HEADER_BYTES,
  MAX_DISK_BYTES,
  MAX_MARKER_ID_LENGTH,
  MAX_RECORDS,
  MAX_SEGMENT_BYTES,
  MAX_TAG_BYTES,
  MAX_WRITE_BYTES,
  MIN_RECORD_BYTES,
  RANGE_RECORD_BYTES,
  RECORD_TYPE,
  SEGMENT_MAGIC,
  SEGMENT_VERSION,
  SegmentFormatError,
  TRAILER_BYTES,
  WRITE_RECORD_HEADER_BYTES,
  type CheckContext,
  type Segment,
  type SegmentFormatReason,
  type SegmentHeader,
  type SegmentRecord,
} from './format';

/** What the decoder hands out as bytes arrive. None of it is trustworthy until `end()` returns. */
export type SegmentPart =
  | {
      type: 'header';
      header: SegmentHeader;
      recordCount: number;
      /** Bytes of the record section. */
      payloadBytes: number;
      /** Size of the whole encoded segment, known from the header. */
      byteLength: number;
    }
  | { type: 'record'; index: number; record: SegmentRecord };

/** Proof that the whole segment arrived and its SHA-256 trailer matched. */
export interface VerifiedSegment {
  header: SegmentHeader;
  recordCount: number;
  byteLength: number;
  /** The SHA-256 trailer (of every byte before it). */
  checksum: Buffer;
}

export type SegmentStreamPart = SegmentPart | ({ type: 'verified' } & VerifiedSegment);

const TWO_32 = 2 ** 32;
const MAX_NAME_LENGTH = 63;

function readU64(buf: Buffer, pos: number): number {
  // Exact below 2^53; anything above is rejected by the range checks, which is all it is used for.
  return buf.readUInt32LE(pos + 4) * TWO_32 + buf.readUInt32LE(pos);
}

/**
 * The unread input: a list of chunks, consumed from the front. Bytes are hashed one chunk at a
 * time as chunks are used up (so a segment in one buffer is hashed in one call).
 */
class ChunkQueue {
  available = 0;
  consumed = 0;
  private readonly chunks: Buffer[] = [];
  private head = 0;
  private hashedTo = 0;
  private hashing = true;

  constructor(private readonly hash: Hash) {}

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.available += chunk.length;
  }

  /** The next `n` (≤ available) bytes as [buffer, position], without consuming them. */
  peek(n: number): [Buffer, number] {
    const first = this.chunks[0];
    if (first.length - this.head >= n) return [first, this.head];
    return [this.gather(n), 0];
  }

  /** Consumes and returns the next `n` (≤ available) bytes: a view when they are contiguous. */
  take(n: number): Buffer {
    const first = this.chunks[0];
    const out = first.length - this.head >= n ? first.subarray(this.head, this.head + n) : this.gather(n);
    this.skip(n);
    return out;
  }

  skip(n: number): void {
    this.available -= n;
    this.consumed += n;
    while (n > 0) {
      const first = this.chunks[0];
      const rest = first.length - this.head;
      if (n < rest) {
        this.head += n;
        return;
      }
      if (this.hashing && this.hashedTo < first.length) {
        this.hash.update(this.hashedTo === 0 ? first : first.subarray(this.hashedTo));
      }
      this.chunks.shift();
      this.head = 0;
      this.hashedTo = 0;
      n -= rest;
    }
  }

  /** Hashes everything consumed so far; later bytes (the trailer) are not hashed. */
  stopHashing(): void {
    const first = this.chunks[0];
    if (first !== undefined && this.head > this.hashedTo) {
      this.hash.update(first.subarray(this.hashedTo, this.head));
    }
    this.hashedTo = this.head;
    this.hashing = false;
  }

  private gather(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    let pos = this.head;
    for (let i = 0; filled < n; i++) {
      const chunk = this.chunks[i];
      const count = Math.min(n - filled, chunk.length - pos);
      chunk.copy(out, filled, pos, pos + count);
      filled += count;
      pos = 0;
    }
    return out;
  }
}

const enum State {
  Header,
  Names,
  RecordStart,
  RecordFixed,
  MarkerTail,
  WriteData,
  Trailer,
  Done,
}

const FIXED_BYTES: Record<number, number> = {
  [RECORD_TYPE.write]: WRITE_RECORD_HEADER_BYTES,
  [RECORD_TYPE.zero]: RANGE_RECORD_BYTES,
  [RECORD_TYPE.trim]: RANGE_RECORD_BYTES,
  [RECORD_TYPE.marker]: MARKER_RECORD_HEADER_BYTES,
};

const tagDecoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/**
 * Incremental segment decoder. `push` each chunk as it arrives and act on the parts it returns
 * (the header first, then records in order); then call `end()`, which throws unless the whole
 * segment arrived, nothing followed it and its SHA-256 trailer matched. Records are not to be
 * trusted (applied, acknowledged) before `end()` returns. Every malformation throws a
 * SegmentFormatError, and the decoder then stays failed. Declared lengths are checked against
 * the bounds and the header's totals before the decoder waits for (or copies) the bytes, and it
 * never allocates more than it has been given. Write data may be views of the pushed chunks: do
 * not change a chunk after pushing it.
 */
export class SegmentDecoder {
  private readonly hash = createHash('sha256');
  private readonly queue = new ChunkQueue(this.hash);
  private state = State.Header;
  private failure: SegmentFormatError | undefined;
  private header: SegmentHeader | undefined;
  private machineLength = 0;
  private diskLength = 0;
  private recordCount = 0;
  private recordsLeft = 0;
  private payloadLeft = 0;
  private byteLength = 0;
  private index = 0;
  private recordStart = 0;
  private recordType = 0;
  private pending = 0;
  private writeOffset = 0;
  private markerKind = 0;
  private markerTime = 0;
  private markerIdLength = 0;
  private checksum: Buffer | undefined;

  /** True once the trailer arrived and matched. */
  get verified(): boolean {
    return this.state === State.Done && this.failure === undefined;
  }

  push(chunk: Uint8Array): SegmentPart[] {
    if (this.failure) throw this.failure;
    if (!(chunk instanceof Uint8Array)) {
      throw new TypeError(
        'SegmentDecoder.push takes a Buffer or Uint8Array (a stream with an encoding set yields strings)',
      );
    }
    this.queue.push(
      Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength),
    );
    const parts: SegmentPart[] = [];
    try {
      this.run(parts);
    } catch (err) {
      if (err instanceof SegmentFormatError) this.failure = err;
      throw err;
    }
    return parts;
  }

  /** Declares the input complete; returns the verified summary or throws SegmentFormatError. */
  end(): VerifiedSegment {
    if (this.failure) throw this.failure;
    if (this.state !== State.Done || this.header === undefined || this.checksum === undefined) {
      const declared = this.header ? `, of the ${this.byteLength} its header declares` : '';
      this.failure = this.error(
        'truncated',
        `ends after ${this.queue.consumed + this.queue.available} bytes${declared}, in ${this.describeState()}`,
        this.queue.consumed + this.queue.available,
      );
      throw this.failure;
    }
    return {
      header: this.header,
      recordCount: this.recordCount,
      byteLength: this.byteLength,
      checksum: this.checksum,
    };
  }

  private run(parts: SegmentPart[]): void {
    const q = this.queue;
    for (;;) {
      switch (this.state) {
        case State.Header: {
          this.checkPrefix();
          if (q.available < HEADER_FIXED_BYTES) return;
          const [b, p] = q.peek(HEADER_FIXED_BYTES);
          this.parseHeaderFixed(b, p);
          q.skip(HEADER_FIXED_BYTES);
          this.state = State.Names;
          break;
        }
        case State.Names: {
          const n = this.machineLength + this.diskLength;
          if (q.available < n) return;
          const names = q.take(n);
          const header = this.header!;
          header.machine = names.toString('latin1', 0, this.machineLength);
          header.disk = names.toString('latin1', this.machineLength, n);
          checkName(header.machine, { byteOffset: HEADER_FIXED_BYTES, what: 'the machine name' });
          checkName(header.disk, {
            byteOffset: HEADER_FIXED_BYTES + this.machineLength,
            what: 'the disk id',
          });
          parts.push({
            type: 'header',
            header: this.header!,
            recordCount: this.recordCount,
            payloadBytes: this.payloadLeft,
            byteLength: this.byteLength,
          });
          this.state = State.RecordStart;
          break;
        }
        case State.RecordStart: {
          if (this.recordsLeft === 0) {
            if (this.payloadLeft > 0) {
              throw this.error(
                'totals-mismatch',
                `has ${this.payloadLeft} bytes after its last declared record (#${this.recordCount - 1})`,
                q.consumed,
              );
            }
            q.stopHashing();
            this.state = State.Trailer;
            break;
          }
          if (this.payloadLeft === 0) {
            throw this.error(
              'totals-mismatch',
              `ends its record bytes after ${this.index} of the ${this.recordCount} records its header declares`,
              q.consumed,
            );
          }
          if (q.available < 1) return;
          const [b, p] = q.peek(1);
          this.recordStart = q.consumed;
          this.recordType = b[p];
          const fixed = FIXED_BYTES[this.recordType];
          if (fixed === undefined) {
            throw this.error(
              'unknown-record-type',
              `has record #${this.index} of unknown type ${this.recordType}`,
              q.consumed,
            );
          }
          if (fixed > this.payloadLeft) {
            throw this.recordError(
              'exceeds-declared',
              `needs ${fixed} bytes but only ${this.payloadLeft} of the declared record bytes are left`,
            );
          }
          this.state = State.RecordFixed;
          break;
        }
        case State.RecordFixed: {
          const fixed = FIXED_BYTES[this.recordType];
          if (q.available < fixed) return;
          const [b, p] = q.peek(fixed);
          this.parseRecordFixed(b, p, parts);
          break;
        }
        case State.MarkerTail: {
          if (q.available < this.pending) return;
          const bytes = q.take(this.pending);
          this.payloadLeft -= this.pending;
          const id = bytes.toString('latin1', 0, this.markerIdLength);
          if (!isMarkerId(id)) {
            throw this.recordError(
              'invalid-marker',
              `has id ${JSON.stringify(id)}, which is not a valid marker id`,
            );
          }
          let tag: string;
          try {
            tag = tagDecoder.decode(bytes.subarray(this.markerIdLength));
          } catch {
            throw this.recordError('invalid-marker', 'has a tag that is not valid UTF-8');
          }
          this.emit(parts, {
            type: 'marker',
            id,
            kind: MARKER_KINDS[this.markerKind - 1],
            time: this.markerTime,
            tag,
          });
          break;
        }
        case State.WriteData: {
          if (q.available < this.pending) return;
          const offset = this.writeOffset;
          const data = q.take(this.pending);
          this.payloadLeft -= this.pending;
          this.emit(parts, { type: 'write', offset, data });
          break;
        }
        case State.Trailer: {
          if (q.available < TRAILER_BYTES) return;
          const at = q.consumed;
          const expected = q.take(TRAILER_BYTES);
          const actual = this.hash.digest();
          if (!timingSafeEqual(actual, expected)) {
            throw this.error('bad-checksum', 'has a SHA-256 trailer that does not match its contents', at);
          }
          this.checksum = actual;
          this.state = State.Done;
          break;
        }
        case State.Done:
          if (q.available > 0) {
            throw this.error(
              'trailing-bytes',
              `is followed by ${q.available} more bytes after its trailer`,
              q.consumed,
            );
          }
          return;
      }
    }
  }

  /** Rejects a wrong magic or version as soon as those bytes arrive, even in a short input. */
  private checkPrefix(): void {
    const q = this.queue;
    const n = Math.min(q.available, 6);
    if (n === 0) return;
    const [b, p] = q.peek(n);
    for (let i = 0; i < Math.min(n, 4); i++) {
      if (b[p + i] !== SEGMENT_MAGIC[i]) {
        throw this.error('bad-magic', `does not start with the segment magic "LBSG"`, i);
      }
    }
    if (n === 6) {
      const version = b.readUInt16LE(p + 4);
      if (version !== SEGMENT_VERSION) {
        throw this.error(
          'unsupported-version',
          `has format version ${version}; this decoder reads version ${SEGMENT_VERSION}`,
          4,
        );
      }
    }
  }

  private parseHeaderFixed(b: Buffer, p: number): void {
    const flags = b.readUInt16LE(p + 6);
    if (flags !== 0) {
      throw this.error(
        'reserved-bits',
        `has reserved flags 0x${flags.toString(16)} set; version ${SEGMENT_VERSION} defines none`,
        6,
      );
    }
    const header: SegmentHeader = {
      machine: '',
      disk: '',
      epoch: checkSafeCount(readU64(b, p + 8), { byteOffset: 8, what: 'the epoch' }),
      seq: checkSafeCount(readU64(b, p + 16), { byteOffset: 16, what: 'the sequence number' }),
      firstWriteTime: checkTime(readU64(b, p + 24), { byteOffset: 24, what: 'the first write time' }),
      lastWriteTime: checkTime(readU64(b, p + 32), { byteOffset: 32, what: 'the last write time' }),
    };
    if (header.firstWriteTime > header.lastWriteTime) {
      throw this.error(
        'invalid-times',
        `has its first write time (${header.firstWriteTime}) after its last (${header.lastWriteTime})`,
        24,
      );
    }
    this.header = header;
    const recordCount = b.readUInt32LE(p + 40);
    const payloadBytes = b.readUInt32LE(p + 44);
    this.machineLength = b[p + 48];
    this.diskLength = b[p + 49];
    if (this.machineLength < 1 || this.machineLength > MAX_NAME_LENGTH) {
      throw this.error(
        'invalid-name',
        `declares a machine name of ${this.machineLength} characters; names are 1-${MAX_NAME_LENGTH}`,
        48,
      );
    }
    if (this.diskLength < 1 || this.diskLength > MAX_NAME_LENGTH) {
      throw this.error(
        'invalid-name',
        `declares a disk id of ${this.diskLength} characters; ids are 1-${MAX_NAME_LENGTH}`,
        49,
      );
    }
    if (recordCount > MAX_RECORDS) {
      throw this.error(
        'too-large',
        `declares ${recordCount} records, more than the limit of ${MAX_RECORDS}`,
        40,
      );
    }
    const byteLength =
      HEADER_FIXED_BYTES + this.machineLength + this.diskLength + payloadBytes + TRAILER_BYTES;
    if (byteLength > MAX_SEGMENT_BYTES) {
      throw this.error(
        'too-large',
        `declares ${byteLength} bytes in all, more than the limit of ${MAX_SEGMENT_BYTES}`,
        44,
      );
    }
    if (recordCount * MIN_RECORD_BYTES > payloadBytes || (recordCount === 0 && payloadBytes > 0)) {
      throw this.error(
        'totals-mismatch',
        `declares ${recordCount} records in ${payloadBytes} bytes, which cannot both be true`,
        40,
      );
    }
    this.recordCount = recordCount;
    this.recordsLeft = recordCount;
    this.payloadLeft = payloadBytes;
    this.byteLength = byteLength;
  }

  private parseRecordFixed(b: Buffer, p: number, parts: SegmentPart[]): void {
    const q = this.queue;
    const ctx: CheckContext = {
      byteOffset: this.recordStart,
      what: `the segment's ${recordName(this.recordType)} record #${this.index}`,
    };
    switch (this.recordType) {
      case RECORD_TYPE.write: {
        const offset = readU64(b, p + 1);
        const length = b.readUInt32LE(p + 9);
        checkRange(offset, length, MAX_WRITE_BYTES, ctx);
        if (WRITE_RECORD_HEADER_BYTES + length > this.payloadLeft) {
          throw this.recordError(
            'exceeds-declared',
            `carries ${length} bytes of data but only ${this.payloadLeft - WRITE_RECORD_HEADER_BYTES} of the declared record bytes are left`,
          );
        }
        q.skip(WRITE_RECORD_HEADER_BYTES);
        this.payloadLeft -= WRITE_RECORD_HEADER_BYTES;
        this.writeOffset = offset;
        this.pending = length;
        this.state = State.WriteData;
        return;
      }
      case RECORD_TYPE.zero:
      case RECORD_TYPE.trim: {
        const offset = readU64(b, p + 1);
        const length = readU64(b, p + 9);
        checkRange(offset, length, MAX_DISK_BYTES, ctx);
        q.skip(RANGE_RECORD_BYTES);
        this.payloadLeft -= RANGE_RECORD_BYTES;
        const type = this.recordType === RECORD_TYPE.zero ? 'zero' : 'trim';
        this.emit(parts, { type, offset, length });
        return;
      }
      default: {
        const kind = b[p + 1];
        if (kind < 1 || kind > MARKER_KINDS.length) {
          throw this.recordError('unknown-marker-kind', `has unknown kind ${kind}`);
        }
        const time = checkTime(readU64(b, p + 2), ctx);
        const idLength = b[p + 10];
        const tagLength = b.readUInt16LE(p + 11);
        if (idLength < 1 || idLength > MAX_MARKER_ID_LENGTH) {
          throw this.recordError(
            'invalid-marker',
            `declares an id of ${idLength} characters; ids are 1-${MAX_MARKER_ID_LENGTH}`,
          );
        }
        if (tagLength > MAX_TAG_BYTES) {
          throw this.recordError(
            'too-large',
            `declares a ${tagLength}-byte tag, more than the limit of ${MAX_TAG_BYTES}`,
          );
        }
        if (MARKER_RECORD_HEADER_BYTES + idLength + tagLength > this.payloadLeft) {
          throw this.recordError(
            'exceeds-declared',
            `needs ${MARKER_RECORD_HEADER_BYTES + idLength + tagLength} bytes but only ${this.payloadLeft} of the declared record bytes are left`,
          );
        }
        q.skip(MARKER_RECORD_HEADER_BYTES);
        this.payloadLeft -= MARKER_RECORD_HEADER_BYTES;
        this.markerKind = kind;
        this.markerTime = time;
        this.markerIdLength = idLength;
        this.pending = idLength + tagLength;
        this.state = State.MarkerTail;
        return;
      }
    }
  }

  private emit(parts: SegmentPart[], record: SegmentRecord): void {
    parts.push({ type: 'record', index: this.index, record });
    this.index++;
    this.recordsLeft--;
    this.state = State.RecordStart;
  }

  private error(reason: SegmentFormatReason, detail: string, byteOffset: number): SegmentFormatError {
    return formatError(reason, detail, { byteOffset, what: 'the segment' });
  }

  private recordError(reason: SegmentFormatReason, detail: string): SegmentFormatError {
    return formatError(reason, detail, {
      byteOffset: this.recordStart,
      what: `the segment's ${recordName(this.recordType)} record #${this.index}`,
    });
  }

  private describeState(): string {
    switch (this.state) {
      case State.Header:
      case State.Names:
        return 'the middle of its header';
      case State.Trailer:
        return 'the middle of its trailer';
      default:
        return `record #${this.index} of ${this.recordCount}`;
    }
  }
}

function recordName(type: number): string {
  return (
    (Object.keys(RECORD_TYPE) as (keyof typeof RECORD_TYPE)[]).find((k) => RECORD_TYPE[k] === type) ??
    'unknown'
  );
}

/**
 * Decodes a whole segment held in memory, verifying its checksum before returning. Write data
 * are views of `bytes` (no copy): copy them if `bytes` will be reused.
 */
export function decodeSegment(bytes: Uint8Array): Segment {
  const decoder = new SegmentDecoder();
  const records: SegmentRecord[] = [];
  let header: SegmentHeader | undefined;
  for (const part of decoder.push(bytes)) {
    if (part.type === 'header') header = part.header;
    else records.push(part.record);
  }
  decoder.end();
  return { header: header!, records };
}

/**
 * Decodes a segment from a stream of chunks (a Node Readable, a fetch body, an array), yielding
 * the header, then each record, then — only once the source ended and the trailer matched — a
 * final `verified` part. Anything malformed throws a SegmentFormatError from the iterator;
 * records are not to be trusted until the `verified` part arrives.
 */
export async function* decodeSegmentStream(
  source: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
): AsyncGenerator<SegmentStreamPart, VerifiedSegment, undefined> {
  const decoder = new SegmentDecoder();
  for await (const chunk of source) {
    for (const part of decoder.push(chunk)) yield part;
  }
  const verified = decoder.end();
  yield { type: 'verified', ...verified };
  return verified;
}
