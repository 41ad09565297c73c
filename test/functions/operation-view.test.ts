import type * as df from 'durable-functions';
import { describe, expect, it } from 'vitest';
import { operationView } from '../../functions/http/operations';

/** A status as the durable client returns it. */
const status = (runtimeStatus: string, output: unknown, customStatus?: unknown) =>
  ({
    name: 'reprotect',
    instanceId: 'op-1',
    createdTime: new Date('2026-11-22T07:00:00.000Z'),
    lastUpdatedTime: new Date('2026-11-22T07:01:00.000Z'),
    input: null,
    output,
    runtimeStatus,
    customStatus,
  }) as df.DurableOrchestrationStatus;

describe('GET /api/operations/{id} view', () => {
  it('shows an operation between two executions (ContinuedAsNew) as Running, with its progress', () => {
    const view = operationView('op-1', status('ContinuedAsNew', null, { state: 'passes', pass: 3 }));
    expect(view).toEqual({
      operationId: 'op-1',
      name: 'reprotect',
      status: 'Running',
      createdTime: '2026-11-22T07:00:00.000Z',
      lastUpdatedTime: '2026-11-22T07:01:00.000Z',
      progress: { state: 'passes', pass: 3 },
    });
  });

  it('passes the other statuses through, with the output of a completed one and the error of a failed one', () => {
    for (const s of ['Pending', 'Running', 'Completed', 'Failed', 'Terminated'])
      expect(operationView('op-1', status(s, null)).status).toBe(s);
    expect(operationView('op-1', status('Completed', { epoch: 4 }))).toMatchObject({ output: { epoch: 4 } });
    const failed = operationView('op-1', status('Failed', 'the site target stopped answering'));
    expect(failed).toMatchObject({
      status: 'Failed',
      error: 'the site target stopped answering',
      progress: null,
    });
    expect(failed).not.toHaveProperty('output');
  });
});
