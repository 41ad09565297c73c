import { ValidationError } from '../errors';
import { isDnsLabel } from '../names';

// The segment format, version 1. docs/segment-format.md is the byte-level description; the
// constants and checks here are the single source both the encoder and the decoder use, so
// anything encodeSegment accepts decodes, and anything the decoder accepts re-encodes to the
// same bytes.

export const SEGMENT_MAGIC = Buffer.from('LBSG', 'latin1');
export const SEGMENT_VERSION = 1;
/** Every offset and length on a disk is a whole number of these. */
export const SECTOR_BYTES = 512;

/** Largest encoded segment (header, records and trailer). */
export const MAX_SEGMENT_BYTES = 64 * 1024 * 1024;
/** Largest data carried by one write record. */
export const MAX_WRITE_BYTES = 32 * 1024 * 1024;
/** Most records in one segment (bounds what a decoder builds in memory). */
export const MAX_RECORDS = 131_072;
/** Highest disk address a record may touch (exclusive): 256 TiB, far beyond any Azure disk. */
export const MAX_DISK_BYTES = 2 ** 48;
/** Longest marker id, in characters (ASCII). */
export const MAX_MARKER_ID_LENGTH = 64;
/** Longest marker tag, in UTF-8 bytes. */
export const MAX_TAG_BYTES = 256;
/** Latest time a segment may carry: the largest valid JavaScript Date, in ms since 1970. */
export const MAX_TIME_MS = 8.64e15;

export const HEADER_FIXED_BYTES = 50;
export const TRAILER_BYTES = 32;
export const WRITE_RECORD_HEADER_BYTES = 13;
export const RANGE_RECORD_BYTES = 17;
export const MARKER_RECORD_HEADER_BYTES = 13;
/** Smallest possible record: a marker with a one-character id and an empty tag. */
export const MIN_RECORD_BYTES = MARKER_RECORD_HEADER_BYTES + 1;

export const RECORD_TYPE = { write: 1, zero: 2, trim: 3, marker: 4 } as const;
export const MARKER_KIND_CODE = { crash: 1, app: 2, group: 3 } as const;

export type MarkerKind = keyof typeof MARKER_KIND_CODE;
export const MARKER_KINDS: readonly MarkerKind[] = ['crash', 'app', 'group'];

/** Who and where a segment belongs to; times are integer milliseconds since 1970 (UTC). */
export interface SegmentHeader {
  machine: string;
  disk: string;
  /** Replication epoch: bumped on resync/reprotect; a non-negative safe integer. */
  epoch: number;
  /** Position in the disk's change stream within the epoch; a non-negative safe integer. */
  seq: number;
  firstWriteTime: number;
  lastWriteTime: number;
}

export interface WriteRecord {
  type: 'write';
  offset: number;
  data: Buffer;
}

/** Reads as zeros afterwards. */
export interface ZeroRecord {
  type: 'zero';
  offset: number;
  length: number;
}

/** The guest discarded the range; Lifeboat stores it as zeros (page blobs clear to zero). */
export interface TrimRecord {
  type: 'trim';
  offset: number;
  length: number;
}

/** A consistency point: everything before it in the machine's write stream is in the cut. */
export interface MarkerRecord {
  type: 'marker';
  id: string;
  kind: MarkerKind;
  time: number;
  tag: string;
}

export type RangeRecord = ZeroRecord | TrimRecord;
export type SegmentRecord = WriteRecord | ZeroRecord | TrimRecord | MarkerRecord;

export interface Segment {
  header: SegmentHeader;
  records: SegmentRecord[];
}

export type SegmentFormatReason =
  | 'bad-magic'
  | 'unsupported-version'
  | 'reserved-bits'
  | 'invalid-name'
  | 'invalid-number'
  | 'invalid-times'
  | 'misaligned'
  | 'out-of-range'
  | 'too-large'
  | 'totals-mismatch'
  | 'exceeds-declared'
  | 'unknown-record-type'
  | 'unknown-marker-kind'
  | 'invalid-marker'
  | 'invalid-record'
  | 'truncated'
  | 'trailing-bytes'
  | 'bad-checksum';

export const SEGMENT_FORMAT_REASONS: readonly SegmentFormatReason[] = [
  'bad-magic',
  'unsupported-version',
  'reserved-bits',
  'invalid-name',
  'invalid-number',
  'invalid-times',
  'misaligned',
  'out-of-range',
  'too-large',
  'totals-mismatch',
  'exceeds-declared',
  'unknown-record-type',
  'unknown-marker-kind',
  'invalid-marker',
  'invalid-record',
  'truncated',
  'trailing-bytes',
  'bad-checksum',
];

/**
 * A segment that cannot be encoded, or bytes that are not a valid segment. `reason` is a stable
 * code (see docs/segment-format.md); `byteOffset` is where in the input the decoder stopped.
 */
export class SegmentFormatError extends ValidationError {
  readonly reason: SegmentFormatReason;
  readonly byteOffset?: number;

  constructor(reason: SegmentFormatReason, message: string, byteOffset?: number) {
    super(message, 'segment', 'InvalidSegment');
    this.reason = reason;
    this.byteOffset = byteOffset;
  }
}

/**
 * Where a check runs: `byteOffset` set means decoding (the message blames the bytes), unset
 * means encoding (the message blames the caller's segment).
 */
export interface CheckContext {
  byteOffset?: number;
  what: string;
}

export function formatError(
  reason: SegmentFormatReason,
  detail: string,
  ctx: CheckContext,
): SegmentFormatError {
  if (ctx.byteOffset === undefined) {
    return new SegmentFormatError(reason, `Cannot encode the segment: ${ctx.what} ${detail}.`);
  }
  return new SegmentFormatError(
    reason,
    `The segment is not valid at byte ${ctx.byteOffset}: ${ctx.what} ${detail}; ` +
      'the bytes are corrupt or come from an incompatible sender, so send the segment again.',
    ctx.byteOffset,
  );
}

export function checkName(value: unknown, ctx: CheckContext): string {
  if (!isDnsLabel(value)) {
    throw formatError(
      'invalid-name',
      `is ${JSON.stringify(value)}, not a DNS-style label (lower-case letters, digits and '-', 1-63 characters)`,
      ctx,
    );
  }
  return value;
}

export function checkSafeCount(value: unknown, ctx: CheckContext): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw formatError('invalid-number', `is ${String(value)}, not a non-negative safe integer`, ctx);
  }
  return value;
}

export function checkTime(value: unknown, ctx: CheckContext): number {
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0 || value > MAX_TIME_MS) {
    throw formatError(
      'invalid-number',
      `is ${String(value)}, not a time in integer milliseconds between 1970 and ${MAX_TIME_MS}`,
      ctx,
    );
  }
  return value;
}

export function checkHeader(header: SegmentHeader): void {
  const ctx = (what: string): CheckContext => ({ what });
  if (header === null || typeof header !== 'object') {
    throw formatError('invalid-record', 'is missing', ctx('the header'));
  }
  checkName(header.machine, ctx('the machine name'));
  checkName(header.disk, ctx('the disk id'));
  checkSafeCount(header.epoch, ctx('the epoch'));
  checkSafeCount(header.seq, ctx('the sequence number'));
  checkTime(header.firstWriteTime, ctx('the first write time'));
  checkTime(header.lastWriteTime, ctx('the last write time'));
  if (header.firstWriteTime > header.lastWriteTime) {
    throw formatError(
      'invalid-times',
      `(${header.firstWriteTime}) is after the last write time (${header.lastWriteTime}); the first must not be later`,
      ctx('the first write time'),
    );
  }
}

/** Checks a disk range; `maxLength` bounds the length (the data limit for writes). */
export function checkRange(offset: unknown, length: unknown, maxLength: number, ctx: CheckContext): void {
  if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0) {
    throw formatError('invalid-number', `has offset ${String(offset)}, not a non-negative safe integer`, ctx);
  }
  if (typeof length !== 'number' || !Number.isSafeInteger(length) || length < 0) {
    throw formatError('invalid-number', `has length ${String(length)}, not a non-negative safe integer`, ctx);
  }
  if (offset % SECTOR_BYTES !== 0 || length % SECTOR_BYTES !== 0) {
    throw formatError(
      'misaligned',
      `has offset ${offset} and length ${length}; both must be multiples of ${SECTOR_BYTES} bytes`,
      ctx,
    );
  }
  if (length === 0) {
    throw formatError(
      'out-of-range',
      `is empty; a range must cover at least one ${SECTOR_BYTES}-byte sector`,
      ctx,
    );
  }
  if (length > maxLength) {
    throw formatError('too-large', `is ${length} bytes long, more than the limit of ${maxLength}`, ctx);
  }
  if (offset + length > MAX_DISK_BYTES) {
    throw formatError(
      'out-of-range',
      `ends at byte ${offset + length}, past the largest disk address ${MAX_DISK_BYTES}`,
      ctx,
    );
  }
}

const MARKER_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function isMarkerId(value: unknown): value is string {
  return typeof value === 'string' && MARKER_ID.test(value);
}

/** Checks a marker's fields and returns the tag's UTF-8 bytes. */
export function checkMarker(record: MarkerRecord, ctx: CheckContext): Buffer {
  if (!isMarkerId(record.id)) {
    throw formatError(
      'invalid-marker',
      `has id ${JSON.stringify(record.id)}; an id is 1-${MAX_MARKER_ID_LENGTH} characters of A-Z, a-z, 0-9, '.', '_' or '-', starting with a letter or digit`,
      ctx,
    );
  }
  if (!Object.prototype.hasOwnProperty.call(MARKER_KIND_CODE, record.kind)) {
    throw formatError(
      'unknown-marker-kind',
      `has kind ${JSON.stringify(record.kind)}; the kinds are ${MARKER_KINDS.join(', ')}`,
      ctx,
    );
  }
  checkTime(record.time, ctx);
  if (typeof record.tag !== 'string') {
    throw formatError('invalid-marker', `has tag ${String(record.tag)}, not a string`, ctx);
  }
  const tag = Buffer.from(record.tag, 'utf8');
  if (tag.length > MAX_TAG_BYTES) {
    throw formatError(
      'too-large',
      `has a ${tag.length}-byte tag, more than the limit of ${MAX_TAG_BYTES}`,
      ctx,
    );
  }
  // A lone surrogate would be replaced while encoding and decode as a different string.
  if (tag.toString('utf8') !== record.tag) {
    throw formatError('invalid-marker', 'has a tag that is not well-formed Unicode', ctx);
  }
  return tag;
}

/** Checks one record for encoding and returns its encoded size in bytes. */
export function checkRecord(record: SegmentRecord, ctx: CheckContext): number {
  if (record === null || typeof record !== 'object') {
    throw formatError('invalid-record', `is ${String(record)}, not a record`, ctx);
  }
  switch (record.type) {
    case 'write':
      if (!Buffer.isBuffer(record.data)) {
        throw formatError('invalid-record', 'has data that is not a Buffer', ctx);
      }
      checkRange(record.offset, record.data.length, MAX_WRITE_BYTES, ctx);
      return WRITE_RECORD_HEADER_BYTES + record.data.length;
    case 'zero':
    case 'trim':
      checkRange(record.offset, record.length, MAX_DISK_BYTES, ctx);
      return RANGE_RECORD_BYTES;
    case 'marker': {
      const tag = checkMarker(record, ctx);
      return MARKER_RECORD_HEADER_BYTES + record.id.length + tag.length;
    }
    default:
      throw formatError(
        'unknown-record-type',
        `has type ${JSON.stringify((record as { type?: unknown }).type)}; the types are write, zero, trim and marker`,
        ctx,
      );
  }
}

/** Encoded size of a record (validating it). */
export function encodedRecordSize(record: SegmentRecord): number {
  return checkRecord(record, { what: `the ${describeRecord(record)}` });
}

/** Encoded size of a header for these names (both DNS labels, so ASCII). */
export function encodedHeaderSize(machine: string, disk: string): number {
  return HEADER_FIXED_BYTES + machine.length + disk.length;
}

export function describeRecord(record: SegmentRecord, index?: number): string {
  const type = record !== null && typeof record === 'object' ? String(record.type) : 'record';
  return index === undefined ? `${type} record` : `${type} record #${index}`;
}
