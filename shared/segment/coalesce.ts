import {
  MAX_WRITE_BYTES,
  SECTOR_BYTES,
  type MarkerRecord,
  type SegmentRecord,
  type WriteRecord,
  type ZeroRecord,
  type TrimRecord,
} from './format';

export interface CoalesceOptions {
  /**
   * Largest write to produce (a multiple of 512); longer merged runs are split. Defaults to
   * MAX_WRITE_BYTES; the apply function passes the page blob's 4 MiB put-pages limit.
   */
  maxWriteBytes?: number;
}

type ChangeRecord = WriteRecord | ZeroRecord | TrimRecord;

interface Piece {
  start: number;
  end: number;
  record: ChangeRecord;
}

/**
 * Rewrites records into an equivalent, smaller list: between two markers, later records win where
 * they overlap, and what is left is emitted in offset order as non-overlapping ranges, with
 * adjacent writes merged into one write and adjacent zero (or trim) ranges merged into one range.
 * Markers stay where they are and nothing moves across one, so every prefix that ends at a marker
 * leaves the disk exactly as the original records did. Zero and trim stay distinct. Merged write
 * data is copied into new buffers; a write that survives whole or in one piece is a view of the
 * original data.
 */
export function coalesceRecords(
  records: readonly SegmentRecord[],
  options: CoalesceOptions = {},
): SegmentRecord[] {
  const maxWriteBytes = options.maxWriteBytes ?? MAX_WRITE_BYTES;
  if (
    !Number.isSafeInteger(maxWriteBytes) ||
    maxWriteBytes < SECTOR_BYTES ||
    maxWriteBytes % SECTOR_BYTES !== 0
  ) {
    throw new RangeError(
      `coalesceRecords: maxWriteBytes must be a positive multiple of ${SECTOR_BYTES}; got ${maxWriteBytes}`,
    );
  }
  const out: SegmentRecord[] = [];
  let run: ChangeRecord[] = [];
  for (const record of records) {
    if (record.type === 'marker') {
      emitRun(run, maxWriteBytes, out);
      run = [];
      out.push(record as MarkerRecord);
    } else {
      run.push(record);
    }
  }
  emitRun(run, maxWriteBytes, out);
  return out;
}

function rangeEnd(record: ChangeRecord): number {
  return record.offset + (record.type === 'write' ? record.data.length : record.length);
}

/** The final state of the disk ranges a run touched, as pieces in offset order. */
function finalPieces(run: ChangeRecord[]): Piece[] {
  const byStart = run.map((_, i) => i).sort((a, b) => run[a].offset - run[b].offset || a - b);
  const points = new Set<number>();
  for (const record of run) {
    points.add(record.offset);
    points.add(rangeEnd(record));
  }
  const boundaries = [...points].sort((a, b) => a - b);
  // Max-heap of run indices (later record = higher index = wins); ended ones are dropped lazily.
  const heap = new MaxHeap();
  const pieces: Piece[] = [];
  let next = 0;
  for (let k = 0; k + 1 < boundaries.length; k++) {
    const at = boundaries[k];
    while (next < byStart.length && run[byStart[next]].offset <= at) heap.push(byStart[next++]);
    while (heap.size > 0 && rangeEnd(run[heap.top()]) <= at) heap.pop();
    if (heap.size === 0) continue;
    const record = run[heap.top()];
    const end = boundaries[k + 1];
    const last = pieces[pieces.length - 1];
    // Consecutive intervals won by the same record form one piece.
    if (last !== undefined && last.record === record && last.end === at) last.end = end;
    else pieces.push({ start: at, end, record });
  }
  return pieces;
}

function emitRun(run: ChangeRecord[], maxWriteBytes: number, out: SegmentRecord[]): void {
  if (run.length === 0) return;
  const pieces = finalPieces(run);
  let i = 0;
  while (i < pieces.length) {
    const type = pieces[i].record.type;
    let j = i + 1;
    while (j < pieces.length && pieces[j].record.type === type && pieces[j].start === pieces[j - 1].end) j++;
    const start = pieces[i].start;
    const end = pieces[j - 1].end;
    if (type === 'write') emitWrites(pieces.slice(i, j), maxWriteBytes, out);
    else out.push({ type, offset: start, length: end - start });
    i = j;
  }
}

/** Emits contiguous write pieces as writes of at most maxWriteBytes each. */
function emitWrites(pieces: Piece[], maxWriteBytes: number, out: SegmentRecord[]): void {
  const runEnd = pieces[pieces.length - 1].end;
  let p = 0;
  for (let chunkStart = pieces[0].start; chunkStart < runEnd;) {
    const chunkEnd = Math.min(runEnd, chunkStart + maxWriteBytes);
    const slices: Buffer[] = [];
    while (p < pieces.length && pieces[p].start < chunkEnd) {
      const piece = pieces[p];
      const record = piece.record as WriteRecord;
      const from = Math.max(piece.start, chunkStart);
      const to = Math.min(piece.end, chunkEnd);
      slices.push(record.data.subarray(from - record.offset, to - record.offset));
      if (piece.end <= chunkEnd) p++;
      else break;
    }
    const data = slices.length === 1 ? slices[0] : Buffer.concat(slices, chunkEnd - chunkStart);
    out.push({ type: 'write', offset: chunkStart, data });
    chunkStart = chunkEnd;
  }
}

class MaxHeap {
  private readonly items: number[] = [];

  get size(): number {
    return this.items.length;
  }

  top(): number {
    return this.items[0];
  }

  push(value: number): void {
    const items = this.items;
    let i = items.push(value) - 1;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (items[parent] >= value) break;
      items[i] = items[parent];
      i = parent;
    }
    items[i] = value;
  }

  pop(): void {
    const items = this.items;
    const last = items.pop()!;
    if (items.length === 0) return;
    let i = 0;
    for (;;) {
      const left = 2 * i + 1;
      if (left >= items.length) break;
      const right = left + 1;
      const child = right < items.length && items[right] > items[left] ? right : left;
      if (items[child] <= last) break;
      items[i] = items[child];
      i = child;
    }
    items[i] = last;
  }
}
