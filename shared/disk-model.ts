import type { SegmentRecord } from './segment';

/**
 * The reference model of a disk: applies records, in order, to an in-memory image and returns
 * it (changed in place). Writes copy their data; zero and trim ranges read as zeros afterwards
 * (Lifeboat stores a trim as zeros, since page blobs clear to zero); markers change nothing.
 * Deliberately naive — tests use it as the independent model the real apply path must match.
 */
export function applyRecordsToImage(image: Buffer, records: Iterable<SegmentRecord>): Buffer {
  for (const record of records) {
    if (record.type === 'marker') continue;
    const length = record.type === 'write' ? record.data.length : record.length;
    if (record.offset < 0 || record.offset + length > image.length) {
      throw new RangeError(
        `${record.type} at ${record.offset}+${length} is outside the ${image.length}-byte image`,
      );
    }
    if (record.type === 'write') record.data.copy(image, record.offset);
    else image.fill(0, record.offset, record.offset + length);
  }
  return image;
}
