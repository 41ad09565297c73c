/** The file-append journal, journal faults, and backing-store configuration errors. */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AppendFileJournal,
  FileBacking,
  NbdExport,
  NbdServer,
  readJournalFile,
  type WriteChange,
} from '../../../agent/mobility/nbd';
import { ConfigError } from '../../../shared/errors';
import { DiskModel, assertSameBytes, prng, replay, runTool } from './nbd-harness';

const MiB = 1024 * 1024;

describe('AppendFileJournal behind a served disk', () => {
  let dir: string;
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-nbd-journal-'));
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('records every change durably and in order; the file replays to the image', async () => {
    const image = path.join(dir, 'd.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 4 * MiB);
    const journalFile = path.join(dir, 'd.journal');
    // A tiny high-water mark exercises append backpressure.
    const journal = await AppendFileJournal.open(journalFile, { highWaterBytes: 64 * 1024 });
    const exp = await NbdExport.openFile({ name: 'd', path: image, journal });
    const server = new NbdServer({ exports: [exp] });
    const { port } = await server.listen({ port: 0 });
    try {
      const model = new DiskModel(4 * MiB);
      const rand = prng(5);
      const args = ['-f', 'raw', `nbd://127.0.0.1:${port}/d`];
      for (let i = 0; i < 120; i++) {
        const length = (1 + Math.floor(rand() * 256)) * 512;
        const offset = Math.floor(rand() * ((4 * MiB - length) / 512)) * 512;
        if (rand() < 0.75) {
          const p = 1 + Math.floor(rand() * 255);
          args.push('-c', `aio_write -P ${p} ${offset} ${length}`, '-c', 'aio_flush');
          model.fill(offset, length, p);
        } else {
          args.push('-c', `discard ${offset} ${length}`);
          model.zero(offset, length);
        }
      }
      await runTool('qemu-io', args);
      // Everything the client saw flushed is in the file already, before close.
      const changes = readJournalFile(journalFile);
      expect(changes.length).toBe(120);
      assertSameBytes(replay(changes, 4 * MiB), model.bytes, 'journal file replay');
      assertSameBytes(fs.readFileSync(image), model.bytes, 'backing image');
    } finally {
      await server.close();
      await exp.close();
      await journal.close();
    }
  });

  it('a journal that refuses a change fails the request with EIO and keeps it out of the image', async () => {
    const image = path.join(dir, 'f.img');
    fs.writeFileSync(image, '');
    fs.truncateSync(image, 1 * MiB);
    const accepted: WriteChange[] = [];
    const faults: string[] = [];
    const exp = await NbdExport.openFile({
      name: 'f',
      path: image,
      journal: {
        append(c) {
          if (c.offset === 0) throw new Error('journal full');
          accepted.push(c);
        },
        flush: async () => undefined,
      },
    });
    exp.on('fault', (f: { stage: string; error: Error }) => faults.push(`${f.stage}: ${f.error.message}`));
    const server = new NbdServer({ exports: [exp] });
    const { port } = await server.listen({ port: 0 });
    try {
      const script = `
import nbd
try:
    h.pwrite(b'\\x01' * 4096, 0)
    print('ok')
except nbd.Error as e:
    print(e.errno)
h.pwrite(b'\\x02' * 4096, 4096)
print(h.pread(8192, 0)[4096:4100].hex())
`;
      const { stdout } = await runTool('nbdsh', ['-u', `nbd://127.0.0.1:${port}/f`, '-c', script]);
      expect(stdout.trim().split('\n')).toEqual(['EIO', '02020202']);
      expect(faults).toEqual(['journal: journal full']);
      expect(accepted.map((c) => [c.seq, c.offset])).toEqual([[1, 4096]]);
      const img = fs.readFileSync(image);
      expect(img.subarray(0, 4096).equals(Buffer.alloc(4096))).toBe(true);
    } finally {
      await server.close();
      await exp.close();
    }
  });

  it('rejects unusable backings and names with errors that say what to do', async () => {
    const odd = path.join(dir, 'odd.img');
    fs.writeFileSync(odd, Buffer.alloc(1000));
    await expect(FileBacking.open(odd)).rejects.toThrow(/multiple of 512/);
    await expect(FileBacking.open(path.join(dir, 'missing.img'))).rejects.toBeInstanceOf(ConfigError);
    await expect(FileBacking.open(dir)).rejects.toThrow(/cannot be opened.*EISDIR/);
    const ok = path.join(dir, 'ok.img');
    fs.writeFileSync(ok, Buffer.alloc(4096));
    await expect(FileBacking.open(ok, { size: 8192 })).rejects.toThrow(/larger than/);
    const backing = await FileBacking.open(ok);
    expect(() => new NbdExport({ name: '', backing })).toThrow(/export name/);
    const a = new NbdExport({ name: 'x', backing });
    expect(() => new NbdServer({ exports: [a, new NbdExport({ name: 'x', backing })] })).toThrow(
      /already served/,
    );
    await backing.close();
  });
});
