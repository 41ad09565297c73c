import type { ContainerClient, PageBlobClient } from '@azure/storage-blob';
import { changelogBlobName, openEnvelope, sealEnvelope, type KeyRing } from '../envelope';
import { ensureContainer, readRange } from '../replication';
import { encodeSegment, type SegmentRecord } from '../segment';
import { CHANGE_BLOCK_BYTES, type ByteRange } from './changes';

// Reprotect change logs travel like forward ones: segments of the same format, sealed in an
// envelope bound to their name `{machine}/{disk}/{epoch}/{seq:012}.seg`, in the `reprotect`
// container of CacheStorage. Each pass ends with a marker record: the target reports the passes it
// applied completely.

/** Cut a segment once it holds this many bytes of writes. */
export const REPROTECT_SEGMENT_BYTES = 8 * 1024 * 1024;
const READ_BYTES = 4 * 1024 * 1024;
const ZERO_BLOCK = Buffer.alloc(CHANGE_BLOCK_BYTES);

export interface ShipPassInput {
  machine: string;
  disk: string;
  epoch: number;
  /** The first seq this pass writes. */
  firstSeq: number;
  /** The snapshot of the failover disk the pass reads. */
  source: PageBlobClient;
  ranges: ByteRange[];
  markerId: string;
}

export interface ShipPassResult {
  /** The seq after the last one written. */
  nextSeq: number;
  segments: number;
  /** Bytes of writes plus zeroed bytes, and the sealed bytes uploaded. */
  changedBytes: number;
  sealedBytes: number;
}

/** Reads the ranges from the snapshot and uploads them as sealed segments ending with a marker. */
export async function shipPass(
  container: ContainerClient,
  keyRing: KeyRing,
  input: ShipPassInput,
): Promise<ShipPassResult> {
  await ensureContainer(container);
  let seq = input.firstSeq;
  let records: SegmentRecord[] = [];
  let pending = 0;
  let changedBytes = 0;
  let sealedBytes = 0;
  const flush = async (marker: boolean) => {
    if (marker)
      records.push({ type: 'marker', id: input.markerId, kind: 'crash', time: Date.now(), tag: 'reprotect' });
    if (records.length === 0) return;
    const now = Date.now();
    const header = {
      machine: input.machine,
      disk: input.disk,
      epoch: input.epoch,
      seq,
      firstWriteTime: now,
      lastWriteTime: now,
    };
    const name = changelogBlobName(header);
    const sealed = sealEnvelope(encodeSegment({ header, records }), { name, keyRing });
    await container.getBlockBlobClient(name).uploadData(sealed);
    sealedBytes += sealed.length;
    seq++;
    records = [];
    pending = 0;
  };
  for (const [start, end] of input.ranges) {
    for (let at = start; at < end; at += READ_BYTES) {
      const n = Math.min(READ_BYTES, end - at);
      const data = await readRange(input.source, at, n);
      for (let b = 0; b < n; b += CHANGE_BLOCK_BYTES) {
        const block = data.subarray(b, Math.min(n, b + CHANGE_BLOCK_BYTES));
        if (block.equals(ZERO_BLOCK.subarray(0, block.length)))
          records.push({ type: 'zero', offset: at + b, length: block.length });
        else {
          records.push({ type: 'write', offset: at + b, data: block });
          pending += block.length;
        }
        changedBytes += block.length;
        if (pending >= REPROTECT_SEGMENT_BYTES) await flush(false);
      }
    }
  }
  await flush(true);
  return { nextSeq: seq, segments: seq - input.firstSeq, changedBytes, sealedBytes };
}

/** The site disk's block checksums, uploaded by the target for the first (checksum) pass. */
export function siteChecksumsName(machine: string, disk: string, epoch: number): string {
  return `${machine}/${disk}/${epoch}/site-checksums.bin`;
}

/** The site disk's block checksums after it applied failback's final pass (`markerId`): the verification. */
export function finalChecksumsName(machine: string, disk: string, epoch: number, markerId: string): string {
  return `${machine}/${disk}/${epoch}/checksums-${markerId}.bin`;
}

export async function uploadSiteChecksums(
  container: ContainerClient,
  keyRing: KeyRing,
  address: { machine: string; disk: string; epoch: number; markerId?: string },
  sums: Buffer[],
): Promise<void> {
  await ensureContainer(container);
  const name = address.markerId
    ? finalChecksumsName(address.machine, address.disk, address.epoch, address.markerId)
    : siteChecksumsName(address.machine, address.disk, address.epoch);
  await container
    .getBlockBlobClient(name)
    .uploadData(sealEnvelope(Buffer.concat(sums), { name, keyRing, codec: 'none' }));
}

/** The site checksums (of the first pass, or after `markerId`), or undefined while the target has not uploaded them. */
export async function readSiteChecksums(
  container: ContainerClient,
  keyRing: KeyRing,
  address: { machine: string; disk: string; epoch: number; markerId?: string },
): Promise<Buffer[] | undefined> {
  const name = address.markerId
    ? finalChecksumsName(address.machine, address.disk, address.epoch, address.markerId)
    : siteChecksumsName(address.machine, address.disk, address.epoch);
  let sealed: Buffer;
  try {
    sealed = await container.getBlockBlobClient(name).downloadToBuffer();
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return undefined;
    throw err;
  }
  const plain = openEnvelope(sealed, { name, keyRing });
  const out: Buffer[] = [];
  for (let at = 0; at < plain.length; at += 32) out.push(plain.subarray(at, at + 32));
  return out;
}
