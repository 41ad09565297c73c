import { createHash, randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { fileChecksums } from '../../../agent/target/reprotect-target';

// The site disk's block checksums (reprotect's first pass) are read in 8 MiB steps and hashed on
// worker threads: they must equal SHA-256 of each block computed here, across step boundaries,
// with a short last block, and for a file smaller than one step.

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-filesums-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function expected(data: Buffer, block: number): string[] {
  const out: string[] = [];
  for (let at = 0; at < data.length; at += block)
    out.push(
      createHash('sha256')
        .update(data.subarray(at, at + block))
        .digest('hex'),
    );
  return out;
}

describe('fileChecksums', () => {
  it.each([
    ['spanning several 8 MiB steps, short last block', 20 * 1024 * 1024 + 12_345, 64 * 1024],
    ['smaller than one step', 300 * 1024 + 7, 64 * 1024],
    ['a block larger than the step', 9 * 1024 * 1024 + 1, 16 * 1024 * 1024],
    ['an empty file', 0, 64 * 1024],
  ])('%s', async (_name, size, block) => {
    const data = randomBytes(size);
    // Some zero blocks, as a real disk has.
    data.fill(0, Math.min(size, 65_536), Math.min(size, 3 * 65_536));
    const file = path.join(dir, `disk-${size}.img`);
    fs.writeFileSync(file, data);
    const sums = await fileChecksums(file, block);
    expect(sums.map((s) => s.toString('hex'))).toEqual(expected(data, block));
  });
});
