import { randomUUID } from 'node:crypto';
import { app } from '@azure/functions';
import * as df from 'durable-functions';
import {
  defaultFailoverDeps,
  deleteRecord,
  failoverIdFromUuid,
  listFailovers,
  prepareAction,
  prepareChangePoint,
  prepareFailover,
  releaseMachine,
} from '../../shared/failover';
import { readMachine } from '../../shared/replication';
import { ORCHESTRATION } from '../orchestrations/names';
import '../orchestrations/failover';
import { startOperation } from './operations';
import { claimHolderEnded } from './protection';
import { jsonBody, withErrors } from './respond';

const operationId = () => `op-${randomUUID().replace(/-/g, '').slice(0, 16)}`;

app.http('machines-failover', {
  route: 'machines/{machine}/failover',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultFailoverDeps();
    const machine = request.params.machine;
    const failoverId = failoverIdFromUuid(randomUUID());
    // A failover whose operations ended unfinished no longer holds the machine (docs/failover.md).
    const run = await prepareFailover(
      deps,
      machine,
      await jsonBody(request),
      failoverId,
      claimHolderEnded(df.getClient(context), deps.now),
    );
    return startOperation(
      request,
      context,
      ORCHESTRATION.failover,
      failoverId,
      run,
      { failoverId, machine, kind: run.kind },
      async () => {
        await deleteRecord(deps.tables, machine, failoverId);
        await releaseMachine(deps.tables, machine, failoverId);
      },
    );
  }),
});

// Commit and cancel: the failover's record moves to committing / cancelling (or, if the operation
// that left it there ended, is taken over), then the action's orchestration runs.
for (const action of ['commit', 'cancel'] as const) {
  app.http(`machines-failover-${action}`, {
    route: `machines/{machine}/${action}`,
    methods: ['POST'],
    authLevel: 'function',
    extraInputs: [df.input.durableClient()],
    handler: withErrors(async (request, context) => {
      const id = operationId();
      const deps = defaultFailoverDeps();
      const record = await prepareAction(
        deps,
        request.params.machine,
        action,
        id,
        claimHolderEnded(df.getClient(context), deps.now),
      );
      const input = {
        machine: record.machine,
        failoverId: record.failoverId,
        test: record.kind === 'test',
        // A cancel removes the Azure target the failover created.
        ...(action === 'cancel' && record.targetSpec ? { target: record.targetSpec } : {}),
      };
      return startOperation(request, context, ORCHESTRATION[action], id, input, {
        failoverId: record.failoverId,
        machine: record.machine,
      });
    }),
  });
}

app.http('machines-failover-change-point', {
  route: 'machines/{machine}/change-recovery-point',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const id = operationId();
    const deps = defaultFailoverDeps();
    const { record, run } = await prepareChangePoint(
      deps,
      request.params.machine,
      await jsonBody(request),
      id,
      claimHolderEnded(df.getClient(context), deps.now),
    );
    return startOperation(request, context, ORCHESTRATION.failover, id, run, {
      failoverId: record.failoverId,
      machine: record.machine,
    });
  }),
});

app.http('machines-failovers', {
  route: 'machines/{machine}/failovers',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const deps = defaultFailoverDeps();
    const machine = await readMachine(deps.replication, request.params.machine);
    return { jsonBody: { value: await listFailovers(deps.tables, machine.rowKey) } };
  }),
});
