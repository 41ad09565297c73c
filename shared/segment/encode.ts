import { createHash } from 'node:crypto';
import {
  checkHeader,
  checkName,
  checkRecord,
  checkSafeCount,
  checkTime,
  describeRecord,
  encodedHeaderSize,
  formatError,
  HEADER_FIXED_BYTES,
  MARKER_KIND_CODE,
  MAX_RECORDS,
  MAX_SEGMENT_BYTES,
  RECORD_TYPE,
  SEGMENT_MAGIC,
  SEGMENT_VERSION,
  TRAILER_BYTES,
  type MarkerKind,
  type MarkerRecord,
  type Segment,
  type SegmentHeader,
  type SegmentRecord,
} from './format';

const TWO_32 = 2 ** 32;

function writeU64(buf: Buffer, value: number, pos: number): void {
  const high = Math.floor(value / TWO_32);
  buf.writeUInt32LE(value - high * TWO_32, pos);
  buf.writeUInt32LE(high, pos + 4);
}

/**
 * Encodes a segment into one buffer of exactly its encoded size, validating every field the way
 * the decoder does. Throws SegmentFormatError when the segment breaks a rule or a bound.
 */
export function encodeSegment(segment: Segment): Buffer {
  const { header, records } = segment ?? ({} as Segment);
  checkHeader(header);
  if (!Array.isArray(records)) {
    throw formatError('invalid-record', 'is not an array', { what: 'the record list' });
  }
  if (records.length > MAX_RECORDS) {
    throw formatError('too-large', `has ${records.length} records, more than the limit of ${MAX_RECORDS}`, {
      what: 'the segment',
    });
  }
  const headerBytes = encodedHeaderSize(header.machine, header.disk);
  let payloadBytes = 0;
  for (let i = 0; i < records.length; i++) {
    payloadBytes += checkRecord(records[i], { what: `the ${describeRecord(records[i], i)}` });
  }
  const total = headerBytes + payloadBytes + TRAILER_BYTES;
  if (total > MAX_SEGMENT_BYTES) {
    throw formatError(
      'too-large',
      `would be ${total} bytes, more than the limit of ${MAX_SEGMENT_BYTES}; cut it into smaller segments`,
      { what: 'the segment' },
    );
  }

  const buf = Buffer.allocUnsafe(total);
  SEGMENT_MAGIC.copy(buf, 0);
  buf.writeUInt16LE(SEGMENT_VERSION, 4);
  buf.writeUInt16LE(0, 6);
  writeU64(buf, header.epoch, 8);
  writeU64(buf, header.seq, 16);
  writeU64(buf, header.firstWriteTime, 24);
  writeU64(buf, header.lastWriteTime, 32);
  buf.writeUInt32LE(records.length, 40);
  buf.writeUInt32LE(payloadBytes, 44);
  buf.writeUInt8(header.machine.length, 48);
  buf.writeUInt8(header.disk.length, 49);
  let pos = HEADER_FIXED_BYTES;
  pos += buf.write(header.machine, pos, 'latin1');
  pos += buf.write(header.disk, pos, 'latin1');

  for (const record of records) {
    switch (record.type) {
      case 'write':
        buf[pos] = RECORD_TYPE.write;
        writeU64(buf, record.offset, pos + 1);
        buf.writeUInt32LE(record.data.length, pos + 9);
        pos += 13;
        pos += record.data.copy(buf, pos);
        break;
      case 'zero':
      case 'trim':
        buf[pos] = RECORD_TYPE[record.type];
        writeU64(buf, record.offset, pos + 1);
        writeU64(buf, record.length, pos + 9);
        pos += 17;
        break;
      case 'marker': {
        buf[pos] = RECORD_TYPE.marker;
        buf[pos + 1] = MARKER_KIND_CODE[record.kind];
        writeU64(buf, record.time, pos + 2);
        buf[pos + 10] = record.id.length;
        const tagLength = Buffer.byteLength(record.tag, 'utf8');
        buf.writeUInt16LE(tagLength, pos + 11);
        pos += 13;
        pos += buf.write(record.id, pos, 'latin1');
        pos += buf.write(record.tag, pos, 'utf8');
        break;
      }
    }
  }
  createHash('sha256').update(buf.subarray(0, pos)).digest().copy(buf, pos);
  return buf;
}

/** What a builder is constructed with: the header fields that do not depend on the records. */
export type SegmentIdentity = Pick<SegmentHeader, 'machine' | 'disk' | 'epoch' | 'seq'>;

export interface SegmentBuilderOptions {
  /** Cut-off for `fits`/`add`, in encoded bytes; at most (and by default) MAX_SEGMENT_BYTES. */
  maxBytes?: number;
  /** Cut-off for `fits`/`add`, in records; at most (and by default) MAX_RECORDS. */
  maxRecords?: number;
}

/**
 * Accumulates records for one segment and always knows its encoded size, so a sender can cut a
 * segment when the next record would not fit. The builder keeps references to write data: do not
 * change a buffer after adding it. The header's first/last write times are the earliest and
 * latest `time` given to `add` (a marker's own time counts).
 */
export class SegmentBuilder {
  readonly identity: SegmentIdentity;
  readonly maxBytes: number;
  readonly maxRecords: number;
  private readonly records: SegmentRecord[] = [];
  private readonly headerBytes: number;
  private payloadBytes = 0;
  private firstTime: number | undefined;
  private lastTime: number | undefined;

  constructor(identity: SegmentIdentity, options: SegmentBuilderOptions = {}) {
    checkName(identity.machine, { what: 'the machine name' });
    checkName(identity.disk, { what: 'the disk id' });
    checkSafeCount(identity.epoch, { what: 'the epoch' });
    checkSafeCount(identity.seq, { what: 'the sequence number' });
    this.identity = {
      machine: identity.machine,
      disk: identity.disk,
      epoch: identity.epoch,
      seq: identity.seq,
    };
    this.headerBytes = encodedHeaderSize(identity.machine, identity.disk);
    this.maxBytes = boundedOption(options.maxBytes, MAX_SEGMENT_BYTES, 'maxBytes');
    this.maxRecords = boundedOption(options.maxRecords, MAX_RECORDS, 'maxRecords');
  }

  get recordCount(): number {
    return this.records.length;
  }

  /** Size in bytes of `encode()`'s result right now. */
  get encodedSize(): number {
    return this.headerBytes + this.payloadBytes + TRAILER_BYTES;
  }

  /** The encoded size after adding `record` (validates the record). */
  sizeWith(record: SegmentRecord): number {
    return this.encodedSize + checkRecord(record, { what: `the ${describeRecord(record)}` });
  }

  /** Whether `record` can be added without passing maxBytes or maxRecords. */
  fits(record: SegmentRecord): boolean {
    return this.records.length < this.maxRecords && this.sizeWith(record) <= this.maxBytes;
  }

  /**
   * Appends a record that happened at `time` (ms since 1970; a marker's own time by default).
   * Throws SegmentFormatError for an invalid record, or with reason 'too-large' when it does not fit.
   */
  add(record: SegmentRecord, time: number = record.type === 'marker' ? record.time : Date.now()): this {
    const size = checkRecord(record, { what: `the ${describeRecord(record, this.records.length)}` });
    checkTime(time, { what: 'the record time' });
    if (this.records.length >= this.maxRecords || this.encodedSize + size > this.maxBytes) {
      throw formatError(
        'too-large',
        `does not fit: the segment would pass its limit of ${this.maxBytes} bytes or ${this.maxRecords} records; start a new segment`,
        { what: `the ${describeRecord(record, this.records.length)}` },
      );
    }
    this.records.push(record);
    this.payloadBytes += size;
    this.firstTime = this.firstTime === undefined ? time : Math.min(this.firstTime, time);
    this.lastTime = this.lastTime === undefined ? time : Math.max(this.lastTime, time);
    return this;
  }

  write(offset: number, data: Buffer, time?: number): this {
    return this.add({ type: 'write', offset, data }, time);
  }

  zero(offset: number, length: number, time?: number): this {
    return this.add({ type: 'zero', offset, length }, time);
  }

  trim(offset: number, length: number, time?: number): this {
    return this.add({ type: 'trim', offset, length }, time);
  }

  marker(marker: { id: string; kind: MarkerKind; time: number; tag?: string }): this {
    const record: MarkerRecord = {
      type: 'marker',
      id: marker.id,
      kind: marker.kind,
      time: marker.time,
      tag: marker.tag ?? '',
    };
    return this.add(record, marker.time);
  }

  /** The segment so far. With no records, both header times are now. */
  toSegment(): Segment {
    const now = this.firstTime === undefined ? Date.now() : 0;
    return {
      header: {
        ...this.identity,
        firstWriteTime: this.firstTime ?? now,
        lastWriteTime: this.lastTime ?? now,
      },
      records: this.records.slice(),
    };
  }

  encode(): Buffer {
    return encodeSegment(this.toSegment());
  }
}

function boundedOption(value: number | undefined, limit: number, name: string): number {
  if (value === undefined) return limit;
  if (!Number.isSafeInteger(value) || value < 1 || value > limit) {
    throw formatError('out-of-range', `is ${value}; it must be an integer from 1 to ${limit}`, {
      what: `the builder option ${name}`,
    });
  }
  return value;
}
