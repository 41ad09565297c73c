import { randomUUID } from 'node:crypto';
import { app, type HttpRequest } from '@azure/functions';
import * as df from 'durable-functions';
import { defaultProtectionDeps, prepareFailback, prepareReprotect, prepareResync, releaseMachine } from '../../shared/reprotect';
import { PROTECTION_ORCHESTRATION } from '../orchestrations/protection-activities';
import '../orchestrations/resync';
import { startOperation } from './operations';
import { LifeboatError, ValidationError } from '../../shared/errors';
import { errorResponse, withErrors } from './respond';

// POST /api/machines/{m}/resync, /reprotect, /failback → 202 + operation (docs/reprotect.md).

/** 501: the operation exists in the API but not yet in this build. */
class NotImplementedError extends LifeboatError {
  constructor(message: string) {
    super('NotImplemented', message, { status: 501 });
  }
}

const operationId = () => `op-${randomUUID().replace(/-/g, '').slice(0, 16)}`;

/** An optional JSON body: undefined when empty. */
async function optionalBody(request: HttpRequest): Promise<unknown> {
  const text = await request.text();
  if (text.trim() === '') return undefined;
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ValidationError(`The request body is not valid JSON: ${(err as Error).message}.`, 'body');
  }
}

app.http('machines-resync', {
  route: 'machines/{machine}/resync',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultProtectionDeps();
    const id = operationId();
    const run = await prepareResync(deps, request.params.machine, await optionalBody(request), id);
    return startOperation(request, context, PROTECTION_ORCHESTRATION.resync, id, run, { machine: run.machine, disks: run.disks }, () =>
      releaseMachine(deps.tables, run.machine, id),
    );
  }),
});

// Reprotect and failback: the preconditions (404, 409) are checked; the orchestrations that run
// the passes and the failback are not built yet (docs/reprotect.md), so a valid request gets 501.

app.http('machines-reprotect', {
  route: 'machines/{machine}/reprotect',
  methods: ['POST'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const deps = defaultProtectionDeps();
    const id = operationId();
    const record = await prepareReprotect(deps, request.params.machine, id);
    await releaseMachine(deps.tables, request.params.machine, id);
    return errorResponse(new NotImplementedError(
      `Reprotect of ${request.params.machine} (failover ${record.failoverId}) is not available yet: its orchestration is not built. ` +
        'The data path exists: lifeboat target and the reprotect passes (docs/reprotect.md).',
    ));
  }),
});

app.http('machines-failback', {
  route: 'machines/{machine}/failback',
  methods: ['POST'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    await prepareFailback(defaultProtectionDeps(), request.params.machine);
    return errorResponse(new NotImplementedError(`Failback of ${request.params.machine} is not available yet: its orchestration is not built (docs/reprotect.md).`));
  }),
});
