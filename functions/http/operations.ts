import { app, type HttpRequest, type HttpResponseInit, type InvocationContext } from '@azure/functions';
import * as df from 'durable-functions';
import { ConflictError, NotFoundError, ValidationError } from '../../shared/errors';
import type { PlanWait } from '../orchestrations/names';
import { withErrors } from './respond';

/** Starts an orchestration and answers 202 with the operation id and its status URL. */
export async function startOperation(
  request: HttpRequest,
  context: InvocationContext,
  orchestration: string,
  operationId: string,
  input: unknown,
  extra: Record<string, unknown> = {},
  onStartFailed?: () => Promise<unknown>,
): Promise<HttpResponseInit> {
  const client = df.getClient(context);
  try {
    await client.startNew(orchestration, { instanceId: operationId, input });
  } catch (err) {
    await onStartFailed?.().catch(() => undefined);
    throw err;
  }
  const management = (await client.createCheckStatusResponse(request, operationId).json()) as Record<
    string,
    unknown
  >;
  const statusUri = new URL(`/api/operations/${encodeURIComponent(operationId)}`, request.url).toString();
  return {
    status: 202,
    headers: { location: statusUri, 'retry-after': '2' },
    jsonBody: { operationId, statusUri, ...extra, management },
  };
}

export interface OperationView {
  operationId: string;
  name: string;
  status: string;
  createdTime: string;
  lastUpdatedTime: string;
  progress: unknown;
  output?: unknown;
  error?: string;
}

async function readOperation(context: InvocationContext, id: string): Promise<OperationView> {
  if (!/^[A-Za-z0-9:._-]{1,200}$/.test(id)) {
    throw new ValidationError(
      `Operation id ${JSON.stringify(id)} is not valid; use the operationId a start returned.`,
      'id',
    );
  }
  let status: df.DurableOrchestrationStatus;
  try {
    status = await df.getClient(context).getStatus(id);
  } catch (err) {
    if (/\b404\b/.test((err as Error).message)) {
      throw new NotFoundError(`Operation ${id} does not exist (or was purged).`, 'id');
    }
    throw err;
  }
  return operationView(id, status);
}

/** What GET /api/operations/{id} answers for an orchestration's status. */
export function operationView(id: string, status: df.DurableOrchestrationStatus): OperationView {
  const failed = status.runtimeStatus === df.OrchestrationRuntimeStatus.Failed;
  return {
    operationId: id,
    name: status.name,
    // ContinuedAsNew is the moment between two executions of a long operation (reprotect's
    // passes): to its caller the operation is still running.
    status:
      status.runtimeStatus === df.OrchestrationRuntimeStatus.ContinuedAsNew
        ? df.OrchestrationRuntimeStatus.Running
        : status.runtimeStatus,
    createdTime: new Date(status.createdTime).toISOString(),
    lastUpdatedTime: new Date(status.lastUpdatedTime).toISOString(),
    progress: status.customStatus ?? null,
    ...(failed
      ? { error: String(status.output) }
      : status.output !== undefined && status.output !== null
        ? { output: status.output }
        : {}),
  };
}

/** Raises the event the operation waits for, if it waits for one of `type`. */
async function answerWait(
  request: HttpRequest,
  context: InvocationContext,
  type: PlanWait['type'],
  payload: (wait: PlanWait, body: Record<string, unknown>) => unknown,
): Promise<HttpResponseInit> {
  const id = request.params.id;
  const op = await readOperation(context, id);
  const wait = (op.progress as { waitingFor?: PlanWait } | null)?.waitingFor;
  const text = await request.text();
  let body: Record<string, unknown> = {};
  if (text.trim() !== '') {
    try {
      body = JSON.parse(text) as Record<string, unknown>;
    } catch {
      throw new ValidationError('The request body is not valid JSON.', 'body');
    }
    if (body === null || typeof body !== 'object' || Array.isArray(body)) {
      throw new ValidationError('The request body must be a JSON object (or empty).', 'body');
    }
  }
  const running = op.status === 'Running' || op.status === 'Pending';
  if (!running || wait?.type !== type) {
    const what = type === 'manual' ? 'an approval' : 'a retry or abort decision';
    throw new ConflictError(
      `Operation ${id} is not waiting for ${what} (it is ${op.status}${wait ? `, waiting for ${wait.type}` : ''}).`,
      'id',
      'NotWaiting',
    );
  }
  if (
    type === 'manual' &&
    wait.type === 'manual' &&
    typeof body.step === 'string' &&
    body.step !== wait.step
  ) {
    throw new ConflictError(
      `Operation ${id} waits for approval of step ${wait.step}, not ${body.step}.`,
      'step',
      'NotWaiting',
    );
  }
  await df.getClient(context).raiseEvent(id, wait.event, payload(wait, body));
  return { status: 202, jsonBody: { operationId: id, answered: wait } };
}

app.http('operations-get', {
  route: 'operations/{id}',
  methods: ['GET'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => ({
    jsonBody: await readOperation(context, request.params.id),
  })),
});

app.http('operations-approve', {
  route: 'operations/{id}/approve',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors((request, context) =>
    answerWait(request, context, 'manual', (_wait, body) => ({
      approved: true,
      ...(typeof body.by === 'string' ? { by: body.by } : {}),
      ...(typeof body.comment === 'string' ? { comment: body.comment } : {}),
    })),
  ),
});

app.http('operations-retry', {
  route: 'operations/{id}/retry',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors((request, context) =>
    answerWait(request, context, 'decision', () => ({ action: 'retry' })),
  ),
});

app.http('operations-abort', {
  route: 'operations/{id}/abort',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors((request, context) =>
    answerWait(request, context, 'decision', () => ({ action: 'abort' })),
  ),
});
