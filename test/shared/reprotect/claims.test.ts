import { randomUUID } from 'node:crypto';
import { describe, expect, inject, it } from 'vitest';
import {
  ACTIVE_ROW,
  activeOperation,
  claimMachine,
  protectionDepsFromSettings,
  type ActiveEntity,
} from '../../../shared/reprotect';
import { quietLogger, testSettings } from '../replication/helpers';

// One protection operation per machine: a second claim is a 409 unless the holder ended (the
// starter's durable-client check says so), and a claim that changed meanwhile is never cleared.

const deps = protectionDepsFromSettings(testSettings(inject('azuriteConnectionString'), 'unused'), {
  log: quietLogger(),
});

describe('protection claims', () => {
  it('409 while the holder runs; cleared and taken when the holder ended', async () => {
    const machine = `claim-${randomUUID().slice(0, 8)}`;
    const now = new Date();
    await claimMachine(deps.tables, machine, 'reprotect', 'op-a', now);
    await claimMachine(deps.tables, machine, 'reprotect', 'op-a', now); // the same operation again
    const asked: string[] = [];
    const running = async (held: ActiveEntity) => (asked.push(held.operationId), false);
    await expect(claimMachine(deps.tables, machine, 'failback', 'op-b', now, running)).rejects.toMatchObject({
      status: 409,
      code: 'OperationInProgress',
    });
    expect(asked).toEqual(['op-a']);
    await expect(claimMachine(deps.tables, machine, 'failback', 'op-b', now)).rejects.toMatchObject({
      status: 409,
    });
    const ended = async (held: ActiveEntity) => held.operationId === 'op-a';
    await claimMachine(deps.tables, machine, 'failback', 'op-b', now, ended);
    expect(await activeOperation(deps.tables, machine)).toMatchObject({
      kind: 'failback',
      operationId: 'op-b',
    });
  });

  it('keeps a claim that changed while the holder was being checked', async () => {
    const machine = `claim-${randomUUID().slice(0, 8)}`;
    const now = new Date();
    await claimMachine(deps.tables, machine, 'reprotect', 'op-a', now);
    // The check says op-a ended, but meanwhile op-a's row was rewritten (a new ETag).
    const racing = async () => {
      await (
        await deps.tables.get()
      ).updateEntity(
        { partitionKey: machine, rowKey: ACTIVE_ROW, startedAt: new Date().toISOString() },
        'Merge',
      );
      return true;
    };
    await expect(claimMachine(deps.tables, machine, 'resync', 'op-c', now, racing)).rejects.toMatchObject({
      status: 409,
    });
    expect(await activeOperation(deps.tables, machine)).toMatchObject({ operationId: 'op-a' });
  });
});
