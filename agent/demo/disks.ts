import { execFileSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';

/** The e2fsprogs tools the demo uses when they exist (Debian: e2fsprogs). */
const TOOL_DIRS = ['/usr/sbin', '/sbin', '/usr/bin', '/bin'];

export function findTool(name: string): string | undefined {
  for (const dir of TOOL_DIRS) {
    const candidate = path.join(dir, name);
    if (existsSync(candidate)) return candidate;
  }
  return undefined;
}

export const BLOCK = 4096;

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A sample disk: an image file, with an ext4 file system on it when mkfs.ext4 and debugfs exist. */
export interface SampleDisk {
  id: string;
  path: string;
  sizeBytes: number;
  filesystem: boolean;
}

function sampleFiles(dir: string, seed: number): void {
  mkdirSync(path.join(dir, 'etc'), { recursive: true });
  mkdirSync(path.join(dir, 'var', 'data'), { recursive: true });
  writeFileSync(path.join(dir, 'etc', 'hostname'), 'lifeboat-demo\n');
  writeFileSync(path.join(dir, 'README.txt'), `Sample machine for the Lifeboat demo (seed ${seed}).\n`);
  for (let i = 0; i < 8; i++)
    writeFileSync(path.join(dir, 'var', 'data', `table-${i}.db`), randomBytes(96 * 1024));
}

/**
 * Creates the demo machine's disks in `dir`: d0 with an ext4 file system holding a few files (or
 * random data without e2fsprogs), d1 a raw data disk.
 */
export function createSampleDisks(dir: string, sizes: { d0: number; d1: number }): SampleDisk[] {
  mkdirSync(dir, { recursive: true });
  const mkfs = findTool('mkfs.ext4');
  const d0 = path.join(dir, 'd0.img');
  const d1 = path.join(dir, 'd1.img');
  writeFileSync(d0, Buffer.alloc(0));
  execFileSync('truncate', ['-s', String(sizes.d0), d0]);
  let filesystem = false;
  if (mkfs && findTool('debugfs')) {
    const content = path.join(dir, 'd0-content');
    sampleFiles(content, 1);
    execFileSync(mkfs, ['-q', '-F', '-b', String(BLOCK), '-E', 'nodiscard', '-d', content, d0], {
      stdio: 'pipe',
    });
    filesystem = true;
  } else {
    writeFileSync(d0, Buffer.concat([randomBytes(sizes.d0 / 2), Buffer.alloc(sizes.d0 / 2)]));
  }
  const data = Buffer.alloc(sizes.d1);
  randomBytes(sizes.d1 / 4).copy(data, 0);
  writeFileSync(d1, data);
  return [
    { id: 'd0', path: d0, sizeBytes: sizes.d0, filesystem },
    { id: 'd1', path: d1, sizeBytes: sizes.d1, filesystem: false },
  ];
}

/**
 * Produces the next version of a disk as a real workload would leave it: on the file-system disk,
 * files written with debugfs into a shadow copy; on a raw disk, random blocks. Returns the 4 KiB
 * blocks that changed, which the caller writes through the agent's NBD export.
 */
export function nextVersion(
  disk: SampleDisk,
  shadowDir: string,
  round: number,
): { offset: number; data: Buffer }[] {
  const current = readFileSync(disk.path);
  const shadow = path.join(shadowDir, `${disk.id}.next`);
  copyFileSync(disk.path, shadow);
  if (disk.filesystem) {
    const debugfs = findTool('debugfs')!;
    const file = path.join(shadowDir, `round-${round}.log`);
    writeFileSync(
      file,
      Buffer.concat([Buffer.from(`round ${round}\n`), randomBytes(40 * 1024 + round * 4096)]),
    );
    execFileSync(debugfs, ['-w', '-R', `write ${file} /var/data/round-${round}.log`, shadow], {
      stdio: 'pipe',
    });
    // Delete the previous round's file, when there is one (debugfs reports a missing file and goes on).
    if (round > 1)
      execFileSync(debugfs, ['-w', '-R', `rm /var/data/round-${round - 1}.log`, shadow], { stdio: 'pipe' });
  } else {
    const image = readFileSync(shadow);
    for (let i = 0; i < 24; i++) {
      const block = Math.floor(Math.random() * (disk.sizeBytes / BLOCK));
      randomBytes(BLOCK).copy(image, block * BLOCK);
    }
    writeFileSync(shadow, image);
  }
  const next = readFileSync(shadow);
  const changes: { offset: number; data: Buffer }[] = [];
  for (let offset = 0; offset < next.length; offset += BLOCK) {
    const a = current.subarray(offset, offset + BLOCK);
    const b = next.subarray(offset, offset + BLOCK);
    if (!a.equals(b)) changes.push({ offset, data: Buffer.from(b) });
  }
  return changes;
}

/** Runs `e2fsck -fn` on an image; undefined when the tool is not installed. */
export function checkFilesystem(image: string): { ok: boolean; output: string } | undefined {
  const fsck = findTool('e2fsck');
  if (!fsck) return undefined;
  try {
    const output = execFileSync(fsck, ['-f', '-n', image], { stdio: 'pipe' }).toString();
    return { ok: true, output };
  } catch (err) {
    const e = err as { stdout?: Buffer; stderr?: Buffer };
    return { ok: false, output: `${e.stdout?.toString() ?? ''}${e.stderr?.toString() ?? ''}` };
  }
}
