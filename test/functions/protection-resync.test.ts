import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, inject, it } from 'vitest';
import { blockChecksum } from '../../agent/mobility/sync';
import { spawnLocalHost, type HostProcess } from '../../infra/local/host-process';
import { beginFailover, failoverDepsFromSettings, updateRecord } from '../../shared/failover';
import { createMessageSender, type MessageSender } from '../../shared/messaging';
import {
  claimMachine,
  pendingResyncCommands,
  protectionDepsFromSettings,
  reportResyncProgress,
  type ResyncCommand,
  type ResyncStatus,
} from '../../shared/reprotect';
import { seedBlob, TABLES, type DiskEntity } from '../../shared/replication';
import type { Segment, SegmentRecord } from '../../shared/segment';
import { waitFor } from '../helpers/host';
import { readWhole, rng, testDeps, testSettings, uploadSegment } from '../shared/replication/helpers';
import { isolatedAppRoot } from '../shared/failover/helpers';

// The resync operation through the local host: the cloud issues a resync command with a new
// epoch; a stand-in for the agent (the part of the mobility agent that polls commands is not
// here yet) compares its image with the seed disk's checksums from the HTTP endpoint and ships
// only differing 64 KiB blocks in that epoch; the operation completes once apply reached a marker
// of the new epoch, with progress in its status.

const root = path.resolve(__dirname, '../..');
// A task hub of its own: no other test file's host takes this file's orchestrations.
const appRoot = isolatedAppRoot(`protectionresync${randomUUID().slice(0, 8)}`);
const key = `key-${randomUUID()}`;
const connection = inject('azuriteConnectionString');
const suffix = randomUUID().slice(0, 8);
const queue = `changelog-resync-${suffix}`;
const NEVER = '0 0 12 * * 3';
const MiB = 1024 * 1024;
const BLOCK = 64 * 1024;
const SIZE = 4 * MiB;

describe('POST /api/machines/{m}/resync', () => {
  const settings = testSettings(connection, queue, {
    LIFEBOAT_RETENTION_SCHEDULE: NEVER,
    LIFEBOAT_RPO_SCHEDULE: NEVER,
    LIFEBOAT_LOG_LEVEL: 'warn',
  });
  const deps = testDeps(connection);
  const failover = failoverDepsFromSettings(settings, { replication: deps });
  const protection = protectionDepsFromSettings(settings, { failover });
  let host: HostProcess;
  let sender: MessageSender;
  const url = (p: string) => `http://127.0.0.1:${host.port}/api${p}`;
  const call = (method: string, p: string, body?: unknown) =>
    fetch(url(p), {
      method,
      headers: { 'x-functions-key': key, 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });

  beforeAll(async () => {
    host = await spawnLocalHost(
      {
        appRoot,
        entryPoint: path.join(root, 'functions/index.ts'),
        settings,
        port: 0,
        functionKey: key,
        lockSeconds: 5,
      },
      (line) => (process.env.TEST_HOST_LOG ? process.stderr.write(`${line}\n`) : undefined),
    );
    sender = createMessageSender(settings, 'ServiceBusConnection', queue);
  });
  afterAll(async () => {
    await sender?.close();
    await host?.stop();
  });

  const ship = async (
    machine: string,
    disk: string,
    epoch: number,
    seq: number,
    records: SegmentRecord[],
  ) => {
    const now = Date.now();
    const segment: Segment = {
      header: { machine, disk, epoch, seq, firstWriteTime: now, lastWriteTime: now },
      records,
    };
    await uploadSegment(deps, segment);
    await sender.send({ body: { machine, disk, epoch, seq } });
  };
  const marker = (id: string): SegmentRecord => ({
    type: 'marker',
    id,
    kind: 'crash',
    time: Date.now(),
    tag: '',
  });
  const diskRow = async (machine: string, disk: string) =>
    (await deps.tables.get(TABLES.disks)).getEntity<DiskEntity>(machine, disk);

  /** The agent's side: checksums from the cloud endpoint, differing blocks shipped in the command's epoch. */
  const actAsAgent = async (
    machine: string,
    image: Buffer,
  ): Promise<{ command: ResyncCommand; shipped: number }> => {
    const command = await waitFor(
      async () => (await pendingResyncCommands(failover.tables, machine))[0],
      'a resync command',
    );
    let shipped = 0;
    for (const { disk, epoch } of command.disks) {
      const res = await call('GET', `/machines/${machine}/disks/${disk}/checksums?blockSize=${BLOCK}`);
      expect(res.status).toBe(200);
      const theirs = ((await res.json()) as { blocks: string[] }).blocks;
      const records: SegmentRecord[] = [];
      for (let i = 0; i < theirs.length; i++) {
        const block = image.subarray(i * BLOCK, (i + 1) * BLOCK);
        if (blockChecksum(block).toString('hex') !== theirs[i]) {
          records.push({ type: 'write', offset: i * BLOCK, data: Buffer.from(block) });
          shipped += block.length;
        }
      }
      await reportResyncProgress(
        failover.tables,
        machine,
        command.id,
        { progress: { [disk]: { comparedBytes: SIZE, shippedBytes: shipped } } },
        new Date(),
      );
      await ship(machine, disk, epoch, 1, [...records, marker(`resync-${epoch}-${suffix}`)]);
    }
    return { command, shipped };
  };

  const waitOperation = async (statusUri: string) =>
    waitFor(
      async () => {
        const op = (await (await fetch(statusUri, { headers: { 'x-functions-key': key } })).json()) as {
          status: string;
          progress: ResyncStatus & { state: string };
          error?: string;
        };
        return op.status === 'Completed' || op.status === 'Failed' ? op : undefined;
      },
      'the resync operation to finish',
      40_000,
    );

  it('ships only the differing blocks in a new epoch, reports progress, refuses a second concurrent resync, and ships nothing for identical disks', async () => {
    const machine = `resync-${suffix}`;
    expect(
      (await call('PUT', `/machines/${machine}`, { disks: [{ id: 'd0', sizeBytes: SIZE }] })).status,
    ).toBe(201);

    // Forward replication in epoch 0: the model image and the seed agree after a marker.
    const random = rng(8);
    const image = Buffer.alloc(SIZE);
    for (let i = 0; i < SIZE; i += 4096)
      if (random() < 0.5) image.fill(Math.floor(random() * 255) + 1, i, i + 4096);
    await ship(machine, 'd0', 0, 1, [
      { type: 'write', offset: 0, data: Buffer.from(image) },
      marker(`m0-${suffix}`),
    ]);
    await waitFor(
      async () => ((await diskRow(machine, 'd0')).state === 'protected' ? true : undefined),
      'epoch 0 to apply',
    );

    // Writes the cloud never got (a quarantined change log): the disk is marked resync-required.
    const changed = [3, 17, 40, 41];
    for (const b of changed) image.fill(0xa0 + b, b * BLOCK + 512, b * BLOCK + 4096);
    await (
      await deps.tables.get(TABLES.disks)
    ).updateEntity(
      { partitionKey: machine, rowKey: 'd0', state: 'resync-required', stateReason: 'test' },
      'Merge',
    );

    const started = await call('POST', `/machines/${machine}/resync`);
    expect(started.status).toBe(202);
    const op = (await started.json()) as { operationId: string; statusUri: string; disks: string[] };
    expect(op.disks).toEqual(['d0']);

    const second = await call('POST', `/machines/${machine}/resync`, { disks: ['d0'] });
    expect(second.status).toBe(409);
    const conflict = (await second.json()) as { error: { code: string; message: string } };
    expect(conflict.error.code).toBe('OperationInProgress');
    expect(conflict.error.message).toContain(op.operationId);

    const { command, shipped } = await actAsAgent(machine, image);
    expect(command.disks).toEqual([{ disk: 'd0', epoch: 1 }]);
    expect(shipped).toBe(changed.length * BLOCK);
    const done = await waitOperation(op.statusUri);
    expect(done.error).toBeUndefined();
    expect(done.status).toBe('Completed');
    expect(done.progress.state).toBe('completed');
    expect(done.progress.percent).toBe(100);
    expect(done.progress.bytesCompared).toBe(SIZE);
    expect(done.progress.bytesShipped).toBe(changed.length * BLOCK);
    const row = await diskRow(machine, 'd0');
    expect([row.epoch, row.state]).toEqual([1, 'protected']);
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), SIZE)).equals(image)).toBe(true);

    // Identical disks: the next resync (all disks, none marked) ships no data.
    const again = await call('POST', `/machines/${machine}/resync`, {});
    expect(again.status).toBe(202);
    const op2 = (await again.json()) as { statusUri: string };
    const second2 = await actAsAgent(machine, image);
    expect(second2.command.disks).toEqual([{ disk: 'd0', epoch: 2 }]);
    expect(second2.shipped).toBe(0);
    const done2 = await waitOperation(op2.statusUri);
    expect(done2.status).toBe('Completed');
    expect(done2.progress.bytesShipped).toBe(0);
    expect((await diskRow(machine, 'd0')).epoch).toBe(2);
    expect((await readWhole(seedBlob(deps.seed, machine, 'd0'), SIZE)).equals(image)).toBe(true);
  });

  it('answers 404 for an unknown disk and 400 for a bad body', async () => {
    const machine = `resync-bad-${suffix}`;
    expect(
      (await call('PUT', `/machines/${machine}`, { disks: [{ id: 'd0', sizeBytes: MiB }] })).status,
    ).toBe(201);
    const unknown = await call('POST', `/machines/${machine}/resync`, { disks: ['d9'] });
    expect(unknown.status).toBe(404);
    expect(((await unknown.json()) as { error: { message: string } }).error.message).toContain('d9');
    const bad = await call('POST', `/machines/${machine}/resync`, { disks: 'd0' });
    expect(bad.status).toBe(400);
    expect((await call('POST', `/machines/nobody-${suffix}/resync`)).status).toBe(404);
  });

  it('reprotect and failback: 409 before a committed failover, without reprotect, and during another operation', async () => {
    const machine = `rp-pre-${suffix}`;
    expect(
      (await call('PUT', `/machines/${machine}`, { disks: [{ id: 'd0', sizeBytes: MiB }] })).status,
    ).toBe(201);
    const error = async (res: Response) =>
      ((await res.json()) as { error: { code: string; message: string } }).error;

    const none = await call('POST', `/machines/${machine}/reprotect`);
    expect(none.status).toBe(409);
    expect(await error(none)).toMatchObject({ code: 'NotFailedOver' });

    const back = await call('POST', `/machines/${machine}/failback`);
    expect(back.status).toBe(409);
    const backError = await error(back);
    expect(backError.code).toBe('NotReprotected');
    expect(backError.message).toContain('/reprotect');

    // A failover that is failed-over but not committed.
    const failoverId = `fo-${suffix}abcd`;
    await beginFailover(
      failover.tables,
      { machine, failoverId, operationId: failoverId, kind: 'unplanned', selector: 'latest' },
      new Date(),
    );
    await updateRecord(failover.tables, machine, failoverId, { state: 'failed-over' }, new Date());
    const early = await call('POST', `/machines/${machine}/reprotect`);
    expect(early.status).toBe(409);
    const earlyError = await error(early);
    expect(earlyError.code).toBe('FailoverNotCommitted');
    expect(earlyError.message).toContain('/commit');

    // Committed, but a resync holds the machine.
    await updateRecord(failover.tables, machine, failoverId, { state: 'committed' }, new Date());
    await claimMachine(protection.tables, machine, 'resync', 'op-test-holder', new Date());
    const busy = await call('POST', `/machines/${machine}/reprotect`);
    expect(busy.status).toBe(409);
    expect(await error(busy)).toMatchObject({ code: 'OperationInProgress' });
    expect((await error(await call('POST', `/machines/${machine}/resync`))).message).toContain(
      'op-test-holder',
    );
  });
});
