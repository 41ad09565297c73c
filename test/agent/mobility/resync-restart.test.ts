/**
 * A resync pass must compare against the cloud copy as it is: when the change stream is reset
 * under a running pass (segments dropped) the pass starts over, and a second pass never reuses
 * checksum windows fetched for an earlier one. Checked with an independent model: the cloud image
 * plus every journalled record applied in seq order must equal the local disk.
 */
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { SegmentJournal, type DiskState } from '../../../agent/mobility/journal';
import { ApiChecksums } from '../../../agent/mobility/remote-checksums';
import { DiskSegmenter } from '../../../agent/mobility/segmenter';
import {
  EmptyDiskChecksums,
  SyncInterruptedError,
  runResync,
  type ResyncOptions,
  type SyncDevice,
} from '../../../agent/mobility/sync';
import { decodeSegment } from '../../../shared/segment';
import { prng } from '../../helpers/random';

const KiB = 1024;
const MiB = 1024 * KiB;
const BLOCK = 64 * KiB;

function randomImage(seed: number, size: number): Buffer {
  const rand = prng(seed);
  const out = Buffer.alloc(size);
  for (let i = 0; i < size; i += 4) out.writeUInt32LE((rand() * 2 ** 32) >>> 0, i);
  return out;
}

function deviceOver(image: Buffer): SyncDevice {
  return {
    size: image.length,
    read: (offset, length) => Promise.resolve(Buffer.from(image.subarray(offset, offset + length))),
    pause: () => Promise.resolve(),
    resume: () => undefined,
  };
}

async function newSegmenter(dir: string, size: number, maxSegmentBytes?: number): Promise<DiskSegmenter> {
  const journal = await SegmentJournal.open(dir);
  const state: DiskState = {
    version: 1,
    machine: 'm1',
    disk: 'd0',
    sizeBytes: size,
    epoch: 1,
    nextSeq: 1,
    ackedSeq: 0,
    mode: 'resync',
    clean: false,
    updatedAt: new Date().toISOString(),
  };
  return new DiskSegmenter({ journal, state, logger: pino({ level: 'silent' }), maxSegmentBytes });
}

/** Applies every journalled segment, in seq order, to `cloud` (the model of the seed disk). */
async function applyJournal(segmenter: DiskSegmenter, cloud: Buffer): Promise<void> {
  await segmenter.cut();
  await segmenter.settled();
  for (const entry of segmenter.journal.list()) {
    for (const r of decodeSegment(await segmenter.journal.read(entry)).records) {
      if (r.type === 'write') r.data.copy(cloud, r.offset);
      else if (r.type === 'zero' || r.type === 'trim') cloud.fill(0, r.offset, r.offset + r.length);
    }
  }
}

/** Runs passes as the agent's sync loop does: an interrupted pass is started again. */
async function resyncUntilDone(opts: ResyncOptions): Promise<number> {
  for (let pass = 1; pass <= 4; pass++) {
    try {
      await runResync(opts);
      return pass;
    } catch (err) {
      if (!(err instanceof SyncInterruptedError)) throw err;
    }
  }
  throw new Error('the resync never completed');
}

describe('resync against a changing stream and cloud', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-resync-restart-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  // A segment conflict (or a proxy ahead of the agent) resets the stream while the resync runs:
  // the journal is dropped, records the pass had already appended for the blocks compared so far
  // with it. The pass used to carry on from where it was and finish — those blocks never reached
  // the cloud, and markers resumed over a wrong copy.
  it('starts the pass over when the stream is reset under it', async () => {
    const size = 4 * MiB;
    const local = randomImage(1, size);
    const cloud = Buffer.alloc(size); // nothing there yet
    const segmenter = await newSegmenter(dir, size, 256 * KiB);
    let steps = 0;
    let reset: Promise<void> | undefined;
    await resyncUntilDone({
      device: deviceOver(local),
      segmenter,
      remote: new EmptyDiskChecksums(BLOCK),
      chunkBytes: MiB,
      readAhead: 1,
      shouldStop: () => {
        if (++steps === 3) {
          // Chunks 0 and 1 are in the stream (partly cut into journal segments); the proxy
          // refuses a segment and the agent resets the stream, as onConflict does.
          reset = Promise.all([segmenter.resetStream(1), segmenter.startResync('conflict')]).then(
            () => undefined,
          );
        }
        return false;
      },
    });
    await reset;
    await applyJournal(segmenter, cloud);
    expect(cloud.equals(local)).toBe(true);
    await segmenter.close();
  });

  // ApiChecksums keeps the next windows in flight. A pass that stopped early left windows fetched
  // for it in that map, and the next pass compared against them although the cloud had changed
  // since (applied a conflicting segment, or a stream reset dropped what would have fixed it).
  it('a new pass never compares against checksum windows fetched for an earlier one', async () => {
    const size = 8 * MiB;
    const local = randomImage(2, size);
    const cloud = Buffer.from(local); // the cloud holds the disk already
    let served = 0;
    let allServed!: () => void;
    const fourServed = new Promise<void>((r) => (allServed = r));
    const server = http.createServer((req, res) => {
      const url = new URL(req.url ?? '/', 'http://x');
      const offset = Number(url.searchParams.get('offset'));
      const length = Math.min(Number(url.searchParams.get('length')), Math.max(0, size - offset));
      const sums: Buffer[] = [];
      for (let at = offset; at < offset + length; at += BLOCK)
        sums.push(
          createHash('sha256')
            .update(cloud.subarray(at, Math.min(size, at + BLOCK)))
            .digest(),
        );
      res.writeHead(200, {
        'content-type': 'application/octet-stream',
        'x-lifeboat-size-bytes': String(size),
        'x-lifeboat-block-size': String(BLOCK),
        'x-lifeboat-offset': String(offset),
        'x-lifeboat-algorithm': 'sha256',
      });
      res.end(Buffer.concat(sums));
      if (++served === 4) allServed();
    });
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const port = (server.address() as AddressInfo).port;
      const remote = new ApiChecksums({
        apiUrl: `http://127.0.0.1:${port}/api`,
        machine: 'm1',
        disk: 'd0',
        blockSize: BLOCK,
        windowBytes: MiB,
        windowsAhead: 2,
      });
      const segmenter = await newSegmenter(dir, size);
      const device = deviceOver(local);
      // Pass 1 stops at its second step; by then windows 0-3 were asked for.
      let steps = 0;
      await expect(
        runResync({
          device,
          segmenter,
          remote,
          chunkBytes: MiB,
          readAhead: 1,
          shouldStop: () => ++steps >= 2,
        }),
      ).rejects.toBeInstanceOf(SyncInterruptedError);
      await fourServed;
      // The cloud changes under windows 2 and 3 (fetched ahead by pass 1, never compared).
      cloud.fill(0x5a, 2 * MiB + 3 * BLOCK, 3 * MiB + 5 * BLOCK);
      await runResync({ device, segmenter, remote, chunkBytes: MiB, readAhead: 1 });
      await applyJournal(segmenter, cloud);
      expect(cloud.equals(local)).toBe(true);
      await segmenter.close();
    } finally {
      await new Promise<void>((r) => server.close(() => r()));
    }
  });

  // The agent resets the stream to the proxy's seq + 1 (a conflict), which reuses seqs the old
  // stream's cuts still pending in the chain hold open files for. Writes appended right after the
  // reset (the resync's, or the guest's) cut new segments whose open files took the same names:
  // the old cut renamed the new file into segments/ (and the reset's clear then deleted it), and
  // the next cut failed with ENOENT — a JournalWriteError, the disk's journal dead.
  it('segments cut right after a stream reset to lower seqs keep their own files and records', async () => {
    const segmenter = await newSegmenter(dir, 8 * MiB, 64 * KiB);
    const faults: Error[] = [];
    segmenter.on('fault', (err: Error) => faults.push(err));
    const block = (fill: number) => Buffer.alloc(48 * KiB, fill);
    for (let i = 0; i < 12; i++)
      await segmenter.append({ kind: 'write', offset: i * 64 * KiB, length: 48 * KiB, data: block(i + 1) });
    const reset = segmenter.resetStream(1);
    const model = Buffer.alloc(8 * MiB);
    for (let i = 0; i < 12; i++) {
      const data = block(0x80 + i);
      data.copy(model, (20 + i) * 64 * KiB);
      await segmenter.append({ kind: 'write', offset: (20 + i) * 64 * KiB, length: data.length, data });
    }
    await reset;
    const cloud = Buffer.alloc(8 * MiB);
    await applyJournal(segmenter, cloud);
    expect(faults).toEqual([]);
    expect(segmenter.journal.list().map((e) => e.seq)).toEqual(
      Array.from({ length: segmenter.journal.count }, (_, i) => i + 1),
    );
    expect(cloud.equals(model)).toBe(true);
    await segmenter.close();
  });
});
