import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  OpenSegmentFile,
  SegmentJournal,
  openSegmentName,
  readOpenSegment,
  type DiskState,
} from '../../../agent/mobility/journal';
import { DiskSegmenter } from '../../../agent/mobility/segmenter';
import { decodeSegment, encodeSegment, type SegmentRecord } from '../../../shared/segment';
import { sectorWrites } from './journal-records';

const identity = (seq: number) => ({ machine: 'm1', disk: 'd0', epoch: 1, seq });

const writes = sectorWrites;

function appendAll(file: OpenSegmentFile, records: SegmentRecord[]): void {
  for (const r of records) {
    if (r.type === 'write')
      file.append({ kind: 'write', offset: r.offset, length: r.data.length, data: r.data });
  }
}

/** A journal holding one acknowledged segment of `records`, removed so its file became a spare. */
async function journalWithSpare(dir: string, records: SegmentRecord[]): Promise<SegmentJournal> {
  const journal = await SegmentJournal.open(dir);
  const old = encodeSegment({ header: { ...identity(1), firstWriteTime: 1, lastWriteTime: 2 }, records });
  const entry = await journal.write(1, 1, old);
  await journal.remove(entry);
  expect(fs.readdirSync(journal.segmentsDir)).toEqual([]);
  return journal;
}

describe('open segments written over spare segment files', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-journal-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('an acknowledged segment file is reused, and the sealed segment is byte-identical to a fresh encoding', async () => {
    const journal = await journalWithSpare(dir, writes(1, 40, 64 * 1024));
    const spare = journal.takeSpare();
    expect(spare).toBeDefined();
    const records = writes(2, 7, 8192); // far shorter than the old segment: its tail must go
    const file = OpenSegmentFile.create(dir, identity(2), spare);
    appendAll(file, records);
    const size = await file.seal(1000, 2000);
    const expected = encodeSegment({
      header: { ...identity(2), firstWriteTime: 1000, lastWriteTime: 2000 },
      records,
    });
    const sealed = fs.readFileSync(file.file);
    expect(size).toBe(expected.length);
    expect(sealed.equals(expected)).toBe(true);
    expect(journal.takeSpare()).toBeUndefined();
  });

  it('recovery from a reused open file takes exactly the records indexed, never the old bytes past them', async () => {
    const old = writes(3, 40, 4096);
    const journal = await journalWithSpare(dir, old);
    const file = OpenSegmentFile.create(dir, identity(2), journal.takeSpare());
    // Same layout as the old segment's first records, so the old bytes after them parse as records.
    const records = old
      .slice(0, 5)
      .map((r, i) => (i === 4 && r.type === 'write' ? { ...r, data: Buffer.alloc(4096, 7) } : r));
    appendAll(file, records);
    await file.sync();
    const read = readOpenSegment(file.file); // as after a crash: not sealed
    expect(read.torn).toBe(false);
    expect(read.records).toBe(5);
    const segment = decodeSegment(read.bytes as Buffer);
    expect(segment.header.seq).toBe(2);
    expect(segment.records).toEqual(records);
    await file.close();
  });

  it('a reused file whose new header was never written holds no records', async () => {
    const journal = await journalWithSpare(dir, writes(4, 10, 4096));
    const spare = journal.takeSpare() as string;
    // What a crash right after taking the spare leaves: the old bytes under the new name, an empty index.
    const name = path.join(dir, openSegmentName(1, 2));
    fs.renameSync(spare, name);
    fs.writeFileSync(name.replace(/\.seg$/, '.idx'), Buffer.alloc(0));
    const read = readOpenSegment(name);
    expect(read.bytes).toBeUndefined();
    expect(read.records).toBe(0);
  });
});

describe('bitmap mode and the open segment file', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-journal-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  // Bitmap mode deletes the open segment's file once the bitmap and state are saved; the segment
  // after catch-up keeps the seq, so its new file has the same name. A slow state save (a busy
  // disk) used to let catch-up create that file first and the late delete remove it: the next cut
  // failed (ENOENT on the rename) and the journal was dead.
  it('catch-up after a slow state save keeps the new open segment file and cuts it', async () => {
    const journal = await SegmentJournal.open(dir);
    const state: DiskState = {
      version: 1,
      machine: 'm1',
      disk: 'd0',
      sizeBytes: 1024 * 1024,
      epoch: 0,
      nextSeq: 1,
      ackedSeq: 0,
      mode: 'data',
      clean: false,
      updatedAt: new Date().toISOString(),
    };
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const save = journal.saveState.bind(journal);
    journal.saveState = (s) => {
      const snapshot = { ...s };
      return gate.then(() => save(snapshot));
    };
    const logger = pino({ level: 'silent' });
    const segmenter = new DiskSegmenter({ journal, state, logger, maxJournalBytes: 64 * 1024 });
    const data = (fill: number) => Buffer.alloc(16 * 1024, fill);
    await segmenter.append({ kind: 'write', offset: 0, length: 16 * 1024, data: data(1) });
    const file = path.join(dir, openSegmentName(0, 1));
    expect(fs.existsSync(file)).toBe(true);
    for (let i = 1; i < 8; i++)
      await segmenter.append({ kind: 'write', offset: i * 16 * 1024, length: 16 * 1024, data: data(i) });
    expect(segmenter.mode).toBe('bitmap');
    const catchup = segmenter.startCatchup();
    await segmenter.saveBitmap(); // the bitmap saves are done; the state save is still held
    release();
    await catchup;
    expect(segmenter.mode).toBe('catchup');
    expect(fs.existsSync(file)).toBe(true);
    const change = data(0xab);
    await segmenter.append({ kind: 'write', offset: 4096, length: change.length, data: change });
    expect(await segmenter.cut()).toBe(1);
    const [entry] = journal.list();
    expect(entry.seq).toBe(1);
    expect(decodeSegment(await journal.read(entry)).records).toEqual([
      { type: 'write', offset: 4096, data: change },
    ]);
    expect(segmenter.bitmap.count).toBeGreaterThan(0); // the blocks of bitmap mode stay to do
    await segmenter.close();
  });
});
