import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { ReprotectTarget } from '../../../agent/target/reprotect-target';
import { SETTING } from '../../../shared/config';
import { changelogBlobName } from '../../../shared/envelope';
import {
  BlockChecksumTracker,
  CHANGE_BLOCK_BYTES,
  differingRanges,
  pageBlobChecksums,
  protectionDepsFromSettings,
  readSiteChecksums,
  shipPass,
  targetRow,
} from '../../../shared/reprotect';
import { ensureContainer, readRange } from '../../../shared/replication';
import { StorageClients } from '../../../shared/storage';
import { keyRing, quietLogger, testSettings } from '../../shared/replication/helpers';

// Reprotect's data path without the orchestration: the target uploads the site disk's checksums,
// the cloud's first pass ships only the blocks that differ from a snapshot of the failover disk,
// later passes ship what changed between consecutive snapshots (block-checksum tracker: Azurite's
// page-range diff is wrong), and the target applies them in order — resuming after a restart and
// waiting at a missing change log. Bytes are checked against the failover disk at every pass.

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const BLOCK = CHANGE_BLOCK_BYTES;

describe('reprotect passes and the target role', () => {
  const settings = testSettings(connection, 'unused');
  const deps = protectionDepsFromSettings(settings);
  const failoverDisks = new StorageClients(SETTING.replicaStorage, settings)
    .blobService()
    .getContainerClient('failover-disks');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-reprotect-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('first pass ships only differing blocks, delta passes only changed blocks; the target converges, resumes, and waits at gaps', async () => {
    const machine = `rp-${randomUUID().slice(0, 8)}`;
    const ring = keyRing();
    // The failover disk (what the failed-over machine wrote) and the site disk (the old source).
    const failover = randomBytes(SIZE);
    failover.fill(0, 2 * MiB, 2 * MiB + 3 * BLOCK);
    const blob = (await ensureContainer(failoverDisks)).getPageBlobClient(`${machine}/d0/fo-test.img`);
    await blob.create(SIZE);
    await blob.uploadPages(failover, 0, SIZE);
    const site = Buffer.from(failover);
    const stale = [1, 9, 10, 33, 40]; // 33 is inside the zeroed run: the site has data there
    for (const b of stale) randomBytes(BLOCK).copy(site, b * BLOCK);
    const sitePath = path.join(dir, `${machine}-d0.img`);
    fs.writeFileSync(sitePath, site);

    const options = {
      container: deps.reprotect,
      keyRing: ring,
      tables: deps.tables,
      machine,
      epoch: 1,
      disks: [{ id: 'd0', path: sitePath }],
      stateDir: path.join(dir, machine),
      logger: quietLogger(),
    };
    let target = new ReprotectTarget(options);
    await target.uploadChecksums();

    // Pass 1: checksum resync against the site disk.
    const s1 = (await blob.createSnapshot()).snapshot!;
    const siteSums = await readSiteChecksums(deps.reprotect, ring, { machine, disk: 'd0', epoch: 1 });
    const ranges1 = differingRanges(await pageBlobChecksums(blob.withSnapshot(s1), SIZE), siteSums!, SIZE);
    const pass1 = await shipPass(deps.reprotect, ring, {
      machine,
      disk: 'd0',
      epoch: 1,
      firstSeq: 1,
      source: blob.withSnapshot(s1),
      ranges: ranges1,
      markerId: 'pass-1',
    });
    expect(pass1.changedBytes).toBe(stale.length * BLOCK);
    const applied1 = await target.applyAvailable(options.disks[0]);
    expect(applied1).toMatchObject({ appliedSeq: pass1.nextSeq - 1, lastMarkerId: 'pass-1' });
    expect(fs.readFileSync(sitePath).equals(failover)).toBe(true);
    const row = await (
      await deps.tables.get()
    ).getEntity<{ appliedSeq: number; lastMarkerId: string }>(machine, targetRow('d0'));
    expect([row.appliedSeq, row.lastMarkerId]).toEqual([pass1.nextSeq - 1, 'pass-1']);

    // Writes in the failed-over machine (and a cleared range), then pass 2 from the snapshot diff.
    const writes: [number, number][] = [
      [512, 4096],
      [3 * BLOCK + 100 * 512, 70 * 1024],
      [SIZE - 1024, 1024],
    ];
    for (const [off, n] of writes) {
      const data = randomBytes(n);
      data.copy(failover, off);
      await blob.uploadPages(data, off, n);
    }
    await blob.clearPages(MiB, 2 * BLOCK);
    failover.fill(0, MiB, MiB + 2 * BLOCK);
    const s2 = (await blob.createSnapshot()).snapshot!;
    const ranges2 = await new BlockChecksumTracker().changedRanges(blob, SIZE, s1, s2);
    const changedBlocks = new Set<number>();
    for (const [off, n] of [...writes, [MiB, 2 * BLOCK] as [number, number]]) {
      for (let b = Math.floor(off / BLOCK); b <= Math.floor((off + n - 1) / BLOCK); b++) changedBlocks.add(b);
    }
    expect(ranges2.reduce((s, [a, b]) => s + b - a, 0)).toBe(changedBlocks.size * BLOCK);
    const pass2 = await shipPass(deps.reprotect, ring, {
      machine,
      disk: 'd0',
      epoch: 1,
      firstSeq: pass1.nextSeq,
      source: blob.withSnapshot(s2),
      ranges: ranges2,
      markerId: 'pass-2',
    });
    expect(pass2.changedBytes).toBe(changedBlocks.size * BLOCK);

    // The link drops one change log: the target applies up to the gap and waits there.
    const hidden = changelogBlobName({ machine, disk: 'd0', epoch: 1, seq: pass1.nextSeq });
    const hiddenBytes = await deps.reprotect.getBlockBlobClient(hidden).downloadToBuffer();
    await deps.reprotect.getBlockBlobClient(hidden).delete();
    expect((await target.applyAvailable(options.disks[0])).appliedSeq).toBe(pass1.nextSeq - 1);
    await deps.reprotect.getBlockBlobClient(hidden).uploadData(hiddenBytes);

    // A restarted target resumes from its cursor.
    target = new ReprotectTarget(options);
    await target.uploadChecksums(); // already done for this epoch: nothing to upload
    const applied2 = await target.applyAvailable(options.disks[0]);
    expect(applied2).toMatchObject({ appliedSeq: pass2.nextSeq - 1, lastMarkerId: 'pass-2' });
    expect(fs.readFileSync(sitePath).equals(failover)).toBe(true);
    expect((await readRange(blob.withSnapshot(s2), 0, SIZE)).equals(failover)).toBe(true);

    // Identical snapshots: a pass ships no data, only its marker.
    const s3 = (await blob.createSnapshot()).snapshot!;
    expect(await new BlockChecksumTracker().changedRanges(blob, SIZE, s2, s3)).toEqual([]);
  });
});
