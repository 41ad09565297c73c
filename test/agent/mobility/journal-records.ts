import type { SegmentRecord } from '../../../shared/segment';
import { prng } from '../../helpers/random';

/**
 * `count` seeded write records of `bytes` each (every 512-byte sector one random byte value), the
 * i-th at `i * stride`: a stride larger than `bytes` leaves gaps, so recovery does not merge them.
 */
export function sectorWrites(seed: number, count: number, bytes: number, stride = bytes): SegmentRecord[] {
  const rand = prng(seed);
  const out: SegmentRecord[] = [];
  for (let i = 0; i < count; i++) {
    const data = Buffer.alloc(bytes);
    for (let j = 0; j < bytes; j += 512) data.fill(Math.floor(rand() * 256), j, j + 512);
    out.push({ type: 'write', offset: i * stride, data });
  }
  return out;
}
