/** Interop with qemu-io and nbdinfo against real image files. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DiskModel, assertSameBytes, prng, replay, runTool, startNbd, type RunningNbd } from './nbd-harness';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

describe('NBD server with qemu-io and nbdinfo', () => {
  let nbd: RunningNbd;

  beforeAll(async () => {
    nbd = await startNbd([
      { name: 'd0', sizeBytes: SIZE, description: 'first disk' },
      { name: 'd1', sizeBytes: 4 * MiB },
      { name: 'ro', sizeBytes: 1 * MiB, readOnly: true },
    ]);
  });
  afterAll(async () => {
    await nbd?.stop();
  });

  it('nbdinfo reports size, block sizes, flags and the export list', async () => {
    const info = JSON.parse((await runTool('nbdinfo', ['--json', nbd.uri('d0')])).stdout);
    const e = info.exports[0];
    expect(e['export-name']).toBe('d0');
    expect(e['export-size']).toBe(SIZE);
    expect(e.description).toBe('first disk');
    expect(e.block_size_minimum).toBe(512);
    expect(e.block_size_preferred).toBe(4096);
    expect(e.block_size_maximum).toBe(32 * MiB);
    expect(e.is_read_only).toBe(false);
    expect(e.can_flush).toBe(true);
    expect(e.can_fua).toBe(true);
    expect(e.can_trim).toBe(true);
    expect(e.can_zero).toBe(true);
    expect(e.can_multi_conn).toBe(true);

    const ro = JSON.parse((await runTool('nbdinfo', ['--json', nbd.uri('ro')])).stdout).exports[0];
    expect(ro.is_read_only).toBe(true);
    expect(ro['export-size']).toBe(1 * MiB);

    const list = JSON.parse(
      (await runTool('nbdinfo', ['--list', '--json', `nbd://127.0.0.1:${nbd.port}`])).stdout,
    );
    const names = list.exports.map((x: { 'export-name': string }) => x['export-name']).sort();
    expect(names).toEqual(['d0', 'd1', 'ro']);
    const sizes = Object.fromEntries(
      list.exports.map((x: { 'export-name': string; 'export-size': number }) => [
        x['export-name'],
        x['export-size'],
      ]),
    );
    expect(sizes).toEqual({ d0: SIZE, d1: 4 * MiB, ro: 1 * MiB });

    const size = (await runTool('nbdinfo', ['--size', nbd.uri('d1')])).stdout.trim();
    expect(Number(size)).toBe(4 * MiB);
  });

  it('random writes, write -z, discard, flush and read-after-write match an independent model', async () => {
    const model = new DiskModel(SIZE);
    const rand = prng(0x1b0a7);
    const cmds: string[] = [];
    const sector = 512;
    for (let i = 0; i < 160; i++) {
      const length = (1 + Math.floor(rand() * 128)) * sector; // up to 64 KiB
      const offset = Math.floor(rand() * ((SIZE - length) / sector)) * sector;
      const r = rand();
      if (r < 0.6) {
        const pattern = 1 + Math.floor(rand() * 255);
        cmds.push(`write -P ${pattern} ${offset} ${length}`);
        model.fill(offset, length, pattern);
        cmds.push(`read -P ${pattern} ${offset} ${length}`);
      } else if (r < 0.8) {
        cmds.push(`write -z ${offset} ${length}`);
        model.zero(offset, length);
        cmds.push(`read -P 0 ${offset} ${length}`);
      } else {
        cmds.push(`discard ${offset} ${length}`);
        model.zero(offset, length);
        cmds.push(`read -P 0 ${offset} ${length}`);
      }
      if (i % 20 === 19) cmds.push('flush');
    }
    // A large zeroing beyond the 32 MiB payload limit is not possible on 8 MiB; zero most of it.
    cmds.push(`write -z ${MiB} ${6 * MiB}`);
    model.zero(MiB, 6 * MiB);
    cmds.push(`write -P 0x5a -f ${2 * MiB} 65536`); // FUA write
    model.fill(2 * MiB, 65536, 0x5a);
    cmds.push('flush');

    const args = ['-f', 'raw', nbd.uri('d0')];
    for (const c of cmds) args.push('-c', c);
    const { stdout, stderr } = await runTool('qemu-io', args);
    expect(stdout + stderr).not.toMatch(/fail|error|mismatch/i);

    assertSameBytes(nbd.image('d0'), model.bytes, 'backing image');
    assertSameBytes(replay(nbd.journal('d0').changes, SIZE), model.bytes, 'journal replay');
    expect(nbd.journal('d0').flushes).toBeGreaterThanOrEqual(9);
  });

  it('overlapping aio writes land in the backing image in journal order', async () => {
    const rand = prng(77);
    const cmds: string[] = [];
    for (let round = 0; round < 12; round++) {
      for (let i = 0; i < 16; i++) {
        const length = (1 + Math.floor(rand() * 64)) * 512;
        const offset = Math.floor(rand() * 64) * 4096; // a 256 KiB hot zone: many overlaps
        cmds.push(
          rand() < 0.8
            ? `aio_write -P ${1 + Math.floor(rand() * 255)} ${offset} ${length}`
            : `aio_write -z ${offset} ${length}`,
        );
      }
      cmds.push('aio_flush');
    }
    const args = ['-f', 'raw', nbd.uri('d1')];
    for (const c of cmds) args.push('-c', c);
    const { stdout, stderr } = await runTool('qemu-io', args);
    expect(stdout + stderr).not.toMatch(/fail|error/i);
    const journal = nbd.journal('d1');
    expect(journal.changes.length).toBeGreaterThanOrEqual(12 * 16);
    assertSameBytes(replay(journal.changes, 4 * MiB), nbd.image('d1'), 'journal replay vs backing');
  });

  it('a read-only export serves reads and refuses writes', async () => {
    const { stdout } = await runTool('qemu-io', [
      '-r',
      '-f',
      'raw',
      nbd.uri('ro'),
      '-c',
      'read -P 0 0 65536',
    ]);
    expect(stdout).toMatch(/read 65536\/65536 bytes/);
    await expect(
      runTool('qemu-io', ['-f', 'raw', nbd.uri('ro'), '-c', 'write -P 1 0 4096']),
    ).rejects.toThrow();
    expect(nbd.journal('ro').changes).toHaveLength(0);
  });
});
