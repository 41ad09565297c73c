/**
 * The journal across a crash at the seams of a cut, and spare-file reuse against a concurrent
 * reader. Real files; the expected bytes are an independent encoding of the same records.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  OpenSegmentFile,
  SegmentJournal,
  openSegmentName,
  type DiskState,
} from '../../../agent/mobility/journal';
import { recoverOpenSegments } from '../../../agent/mobility/segmenter';
import { decodeSegment, encodeSegment, type SegmentRecord } from '../../../shared/segment';
import { sectorWrites } from './journal-records';

const identity = (seq: number) => ({ machine: 'm1', disk: 'd0', epoch: 1, seq });

// Gaps between the writes: recovery coalesces adjacent ones.
const writes = (seed: number, count: number, bytes: number) => sectorWrites(seed, count, bytes, 2 * bytes);

function appendAll(file: OpenSegmentFile, records: SegmentRecord[]): void {
  for (const r of records) {
    if (r.type === 'write')
      file.append({ kind: 'write', offset: r.offset, length: r.data.length, data: r.data });
  }
}

function stateAt(nextSeq: number): DiskState {
  return {
    version: 1,
    machine: 'm1',
    disk: 'd0',
    sizeBytes: 64 * 1024 * 1024,
    epoch: 1,
    nextSeq,
    ackedSeq: nextSeq - 1,
    mode: 'data',
    clean: false,
    updatedAt: new Date().toISOString(),
  };
}

describe('a crash between sealing an open segment and renaming it into the journal', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-journal-crash-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  // seal() used to delete the side index before the segmenter renamed the sealed file into
  // segments/: a crash in between left open-{e}-{s}.seg without its index, and recovery (which
  // reads only indexed records) dropped every record — records a FLUSH had acknowledged — and
  // did not even report the segment as torn.
  for (const reused of [false, true]) {
    it(`keeps the records a FLUSH acknowledged (${reused ? 'over a spare' : 'new file'})`, async () => {
      const journal = await SegmentJournal.open(dir);
      let spare: string | undefined;
      if (reused) {
        const old = writes(9, 30, 64 * 1024);
        const entry = await journal.write(
          1,
          1,
          encodeSegment({ header: { ...identity(1), firstWriteTime: 1, lastWriteTime: 2 }, records: old }),
        );
        await journal.remove(entry);
        spare = journal.takeSpare();
        expect(spare).toBeDefined();
      }
      const records = writes(10, 6, 8192);
      const file = OpenSegmentFile.create(dir, identity(2), spare);
      appendAll(file, records);
      await file.sync(); // the FLUSH is acknowledged here
      await file.seal(1000, 2000);
      // The process dies here: journal.adopt never ran. A new process opens the journal.
      const reopened = await SegmentJournal.open(dir);
      const state = stateAt(2);
      const rec = await recoverOpenSegments(reopened, state);
      expect(rec.damaged).toBe(false);
      expect(rec.recovered).toEqual([2]);
      const [entry] = reopened.list();
      expect(entry.seq).toBe(2);
      expect(decodeSegment(await reopened.read(entry)).records).toEqual(records);
      expect(state.nextSeq).toBe(3);
      // Nothing of the open segment is left behind.
      expect(fs.readdirSync(dir).filter((n) => n.startsWith('open-'))).toEqual([]);
    });
  }

  it('an index left behind by a crash after the rename is removed at recovery', async () => {
    const journal = await SegmentJournal.open(dir);
    const records = writes(11, 3, 4096);
    const file = OpenSegmentFile.create(dir, identity(2));
    appendAll(file, records);
    await file.sync();
    const size = await file.seal(1000, 2000);
    await journal.adopt(1, 2, file.file, size);
    // crash before the index was removed
    const reopened = await SegmentJournal.open(dir);
    const rec = await recoverOpenSegments(reopened, stateAt(3));
    expect(rec.recovered).toEqual([]);
    expect(reopened.list().map((e) => e.seq)).toEqual([2]);
    expect(decodeSegment(await reopened.read(reopened.list()[0])).records).toEqual(records);
    expect(fs.readdirSync(dir).filter((n) => n.startsWith('open-'))).toEqual([]);
    expect(fs.existsSync(path.join(dir, openSegmentName(1, 2)))).toBe(false);
  });
});

describe('a segment removed (acknowledged) while it is being read', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-journal-race-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  // The shipper reads segment S (a retry) while the proxy position check acknowledges and removes
  // it. remove() used to keep the file as a spare and the next open segment was written over it
  // through a new name: the reader's descriptor still pointed at that inode, so it read the next
  // segment's bytes labelled as seq S (the proxy answers 409 for the changed bytes and the shipper
  // halts). A reader must get S's bytes or ENOENT, never another segment's.
  it('the reader gets the segment it asked for or ENOENT, never bytes of a later segment', async () => {
    const journal = await SegmentJournal.open(dir);
    for (let round = 0; round < 40; round++) {
      const records = writes(100 + round, 16, 64 * 1024);
      const seq = round + 1;
      const bytes = encodeSegment({
        header: { ...identity(seq), firstWriteTime: 1, lastWriteTime: 2 },
        records,
      });
      const entry = await journal.write(1, seq, bytes);
      const reading = journal.read(entry).then(
        (b) => Buffer.from(b),
        (err: NodeJS.ErrnoException) => err,
      );
      await journal.remove(entry);
      const spare = journal.takeSpare();
      if (spare) {
        // The next open segment is written over the spare, synchronously here.
        const file = OpenSegmentFile.create(dir, identity(1000 + round), spare);
        const fd = fs.openSync(file.file, 'r+');
        fs.writeSync(fd, Buffer.alloc(bytes.length, 0xee), 0, bytes.length, 0);
        fs.closeSync(fd);
        await file.discard();
      }
      const got = await reading;
      if (got instanceof Error) expect(got.code).toBe('ENOENT');
      else expect(got.equals(bytes)).toBe(true);
    }
  });

  it('a read of an entry no longer in the journal fails with ENOENT', async () => {
    const journal = await SegmentJournal.open(dir);
    const bytes = encodeSegment({
      header: { ...identity(1), firstWriteTime: 1, lastWriteTime: 2 },
      records: writes(7, 2, 4096),
    });
    const entry = await journal.write(1, 1, bytes);
    const removing = journal.remove(entry);
    await expect(journal.read(entry)).rejects.toMatchObject({ code: 'ENOENT' });
    await removing;
  });
});
