import { randomBytes, randomUUID } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, inject, it } from 'vitest';
import { FailoverMachineExport } from '../../../agent/target/failover-machine';
import { PageBlobBacking } from '../../../agent/target/page-blob-backing';
import {
  FAILOVER_TABLES,
  failoverDepsFromSettings,
  failoverDiskName,
  readLocalTarget,
  type FailoverDeps,
} from '../../../shared/failover';
import { ensureContainer, readRange } from '../../../shared/replication';
import { runTool } from '../mobility/nbd-harness';
import { testSettings } from '../../shared/replication/helpers';

// The local "running" failover machine: its failover page blob served over NBD through the
// agent's NBD server, driven by nbdsh (libnbd); the blob must equal an independent model, and a
// stop recorded on the target machine's row lets the clients go.

const connection = inject('azuriteConnectionString');
const MiB = 1024 * 1024;
const SIZE = 2 * MiB;

describe('failover machine over NBD (page-blob backing)', () => {
  const deps: FailoverDeps = failoverDepsFromSettings(testSettings(connection, 'unused'));
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'lifeboat-target-'));
  afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('reads and writes the failover disk through nbdsh, bytes equal the model; a stop lets clients go', async () => {
    const machine = `fm-${randomUUID().slice(0, 8)}`;
    const failoverId = `fo-${randomUUID().replace(/-/g, '').slice(0, 12)}`;
    const model = randomBytes(SIZE);
    model.fill(0, MiB, MiB + 256 * 1024);
    const blob = (await ensureContainer(deps.failoverDisks)).getPageBlobClient(
      failoverDiskName(machine, 'd0', failoverId),
    );
    await blob.create(SIZE);
    await blob.uploadPages(model, 0, SIZE);
    await deps.compute.createTarget({
      machine,
      failoverId,
      test: false,
      pointId: 'p1',
      disks: [
        {
          id: 'd0',
          sizeBytes: SIZE,
          snapshot: 's',
          resource: `failover-disks/${failoverDiskName(machine, 'd0', failoverId)}`,
        },
      ],
    });

    const exp = await FailoverMachineExport.start({
      tables: deps.tables,
      failoverDisks: deps.failoverDisks,
      machine,
      failoverId,
      pollMs: 100,
    });
    const uri = `nbd://127.0.0.1:${exp.address.port}/d0`;
    // Writes of random sizes and places (libnbd keeps them 512-aligned), zeroes, a flush; then read all back.
    const script = path.join(dir, 'writes.py');
    const writesFile = path.join(dir, 'writes.bin');
    fs.writeFileSync(
      script,
      `
import random, struct
random.seed(11)
out = open(${JSON.stringify(writesFile)}, 'wb')
for i in range(120):
    if i % 10 == 9:
        n = random.randint(1, 64) * 512
        off = random.randrange(0, (${SIZE} - n) // 512) * 512
        h.zero(n, off)
        out.write(struct.pack('<BQI', 2, off, n))
        continue
    n = random.randint(1, 40) * 512
    off = random.randrange(0, (${SIZE} - n) // 512) * 512
    data = random.randbytes(n)
    h.pwrite(data, off)
    out.write(struct.pack('<BQI', 1, off, n) + data)
h.flush()
out.close()
`,
    );
    await runTool('nbdsh', ['-u', uri, '-c', `exec(open(${JSON.stringify(script)}).read())`]);
    const log = fs.readFileSync(writesFile);
    for (let at = 0; at < log.length;) {
      const kind = log.readUInt8(at);
      const off = Number(log.readBigUInt64LE(at + 1));
      const n = log.readUInt32LE(at + 9);
      at += 13;
      if (kind === 1) {
        log.copy(model, off, at, at + n);
        at += n;
      } else model.fill(0, off, off + n);
    }
    expect((await readRange(blob, 0, SIZE)).equals(model)).toBe(true);
    const read = await runTool('nbdsh', [
      '-u',
      uri,
      '-c',
      `import sys, hashlib; print(hashlib.sha256(h.pread(${SIZE}, 0)).hexdigest())`,
    ]);
    const { createHash } = await import('node:crypto');
    expect(read.stdout.trim()).toBe(createHash('sha256').update(model).digest('hex'));

    // Failback stops the machine: the export lets its clients go and records it.
    await (
      await deps.tables.get(FAILOVER_TABLES.targets)
    ).updateEntity({ partitionKey: machine, rowKey: failoverId, running: false }, 'Merge');
    await exp.stopped;
    const row = await (
      await deps.tables.get(FAILOVER_TABLES.targets)
    ).getEntity<{ exportState: string }>(machine, failoverId);
    expect(row.exportState).toBe('stopped');
    await expect(runTool('nbdsh', ['-u', uri, '-c', 'pass'], { timeoutMs: 10_000 })).rejects.toThrow();
    expect((await readLocalTarget(deps.tables, machine, failoverId))?.running).toBe(false);
  });

  it('page-blob backing: unaligned writes and zeroes merge with their edge pages, reads see them', async () => {
    const blob = (await ensureContainer(deps.failoverDisks)).getPageBlobClient(
      `unaligned-${randomUUID()}.img`,
    );
    await blob.create(MiB);
    const model = randomBytes(MiB);
    await blob.uploadPages(model, 0, MiB);
    const backing = await PageBlobBacking.open(blob);
    expect(backing.size).toBe(MiB);
    const writes: [number, number][] = [
      [3, 700],
      [4096 + 100, 9000],
      [MiB - 10, 10],
    ];
    await Promise.all(
      writes.map(async ([off, n]) => {
        const data = randomBytes(n);
        data.copy(model, off);
        await backing.write(data, off);
      }),
    );
    await backing.writeZeroes(20_001, 70_000);
    model.fill(0, 20_001, 90_001);
    const back = Buffer.alloc(MiB);
    await backing.read(back, 0, MiB, 0);
    expect(back.equals(model)).toBe(true);
    expect((await readRange(blob, 0, MiB)).equals(model)).toBe(true);
    await backing.close();
  });
});
