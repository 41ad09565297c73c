/** fio's nbd engine (libnbd) drives the server: random writes with verification. */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { assertSameBytes, replay, runTool, startNbd, type RunningNbd } from './nbd-harness';

const MiB = 1024 * 1024;

describe('NBD server with fio', () => {
  let nbd: RunningNbd;
  beforeAll(async () => {
    nbd = await startNbd([{ name: 'fio', sizeBytes: 32 * MiB }]);
  });
  afterAll(async () => {
    await nbd?.stop();
  });

  it('the nbd engine is present in this fio build', async () => {
    const { stdout } = await runTool('fio', ['--enghelp=nbd']);
    expect(stdout).toMatch(/uri/);
  });

  it('randwrite with crc32c verification and read-back, 16 in flight', async () => {
    const { stdout } = await runTool('fio', [
      '--name=lifeboat-nbd',
      '--ioengine=nbd',
      `--uri=${nbd.uri('fio')}`,
      '--rw=randwrite',
      '--bs=4k',
      '--bsrange=4k-64k',
      '--size=16m',
      '--iodepth=16',
      '--verify=crc32c',
      '--do_verify=1',
      '--verify_fatal=1',
      '--verify_state_save=0', // no state file in the working directory
      '--randrepeat=1',
      '--random_generator=tausworthe64',
      '--output-format=json',
    ]);
    const result = JSON.parse(stdout.slice(stdout.indexOf('{')));
    const job = result.jobs[0];
    expect(job.error).toBe(0);
    expect(job.write.io_bytes).toBeGreaterThanOrEqual(16 * MiB);
    expect(job.read.io_bytes).toBeGreaterThan(0); // the verify pass read everything back
    const journal = nbd.journal('fio');
    expect(journal.changes.length).toBeGreaterThan(100);
    assertSameBytes(replay(journal.changes, 32 * MiB), nbd.image('fio'), 'journal replay vs backing');
    expect(nbd.exports.get('fio')?.exp.stats.peakInFlight).toBeGreaterThan(1);
  });
});
