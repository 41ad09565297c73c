import { randomUUID } from 'node:crypto';
import { app, type HttpRequest } from '@azure/functions';
import * as df from 'durable-functions';
import { defaultProtectionDeps, prepareResync, releaseMachine } from '../../shared/reprotect';
import { PROTECTION_ORCHESTRATION } from '../orchestrations/protection-activities';
import '../orchestrations/resync';
import { startOperation } from './operations';
import { ValidationError } from '../../shared/errors';
import { withErrors } from './respond';

// POST /api/machines/{m}/resync, /reprotect, /failback → 202 + operation (docs/reprotect.md).

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
