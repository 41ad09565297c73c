import { randomUUID } from 'node:crypto';
import { app, type HttpRequest } from '@azure/functions';
import * as df from 'durable-functions';
import { z } from 'zod';
import {
  activeOperation,
  defaultProtectionDeps,
  failbackRequestSchema,
  prepareFailback,
  prepareReprotect,
  prepareResync,
  releaseMachine,
  requestFailback,
  type ClaimHolderEnded,
  type FailbackRun,
  type ProtectionDeps,
  type ReprotectDisk,
  type ReprotectRun,
} from '../../shared/reprotect';
import { parseOrThrow } from '../../shared/replication';
import { FAILBACK_EVENT, PROTECTION_ORCHESTRATION } from '../orchestrations/protection-activities';
import '../orchestrations/resync';
import '../orchestrations/reprotect';
import '../orchestrations/failback';
import { startOperation } from './operations';
import { ValidationError } from '../../shared/errors';
import { withErrors } from './respond';

// POST /api/machines/{m}/resync, /reprotect, /failback → 202 + operation (docs/reprotect.md).

export const operationId = () => `op-${randomUUID().replace(/-/g, '').slice(0, 16)}`;

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
    const run = await prepareResync(
      deps,
      request.params.machine,
      await optionalBody(request),
      id,
      claimHolderEnded(df.getClient(context), deps.now),
    );
    return startOperation(
      request,
      context,
      PROTECTION_ORCHESTRATION.resync,
      id,
      run,
      { machine: run.machine, disks: run.disks },
      () => releaseMachine(deps.tables, run.machine, id),
    );
  }),
});

// Reprotect runs until failback takes over; failback asks it to stop (row flag + event) and
// continues from its pass rows (docs/reprotect.md).

const reprotectRequestSchema = z.strictObject({
  /** Seconds between passes (snapshot, changed ranges, ship). */
  intervalSeconds: z.number().int().min(1).max(86_400).default(300),
});

function parseBody<T extends z.ZodType>(schema: T, body: unknown, fields: string): z.infer<T> {
  if (body !== undefined && (body === null || typeof body !== 'object' || Array.isArray(body))) {
    throw new ValidationError(
      `The request body must be a JSON object (or empty) with optionally ${fields}.`,
      'body',
    );
  }
  return parseOrThrow(schema, body ?? {});
}

const RUNNING = new Set<string>([
  df.OrchestrationRuntimeStatus.Running,
  df.OrchestrationRuntimeStatus.Pending,
  df.OrchestrationRuntimeStatus.ContinuedAsNew,
]);
const ENDED = new Set<string>([
  df.OrchestrationRuntimeStatus.Completed,
  df.OrchestrationRuntimeStatus.Failed,
  df.OrchestrationRuntimeStatus.Terminated,
  df.OrchestrationRuntimeStatus.Canceled,
]);
/** A claim with no orchestration behind it is left alone this long (its starter may be starting it). */
const START_GRACE_MS = 60_000;

/**
 * Whether a claim's holder ended without releasing the machine: its orchestration terminated,
 * failed or completed, or never started (the starter died between the claim and the start).
 */
export function claimHolderEnded(client: df.DurableClient, now: () => Date): ClaimHolderEnded {
  return async (held) => {
    let status: df.DurableOrchestrationStatus;
    try {
      status = await client.getStatus(held.operationId);
    } catch (err) {
      if (!/\b404\b/.test((err as Error).message)) throw err;
      return now().getTime() - Date.parse(held.startedAt) > START_GRACE_MS;
    }
    return ENDED.has(status.runtimeStatus);
  };
}

/** The machine's reprotect operation, when it holds the machine and its orchestration runs. */
export async function runningReprotect(
  deps: ProtectionDeps,
  client: df.DurableClient,
  machine: string,
): Promise<string | undefined> {
  const active = await activeOperation(deps.tables, machine);
  if (active?.kind !== 'reprotect') return undefined;
  const status = await client.getStatus(active.operationId).catch(() => undefined);
  return status !== undefined && RUNNING.has(status.runtimeStatus) ? active.operationId : undefined;
}

/** Wakes a reprotect from its interval; the row flag (requestFailback) is what it obeys. */
export async function wakeReprotect(
  client: df.DurableClient,
  reprotectId: string,
  failbackId: string,
): Promise<void> {
  await client.raiseEvent(reprotectId, FAILBACK_EVENT, { operationId: failbackId }).catch(() => undefined);
}

app.http('machines-reprotect', {
  route: 'machines/{machine}/reprotect',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultProtectionDeps();
    const machine = request.params.machine;
    const body = parseBody(reprotectRequestSchema, await optionalBody(request), '"intervalSeconds"');
    const id = operationId();
    const record = await prepareReprotect(
      deps,
      machine,
      id,
      claimHolderEnded(df.getClient(context), deps.now),
    );
    const run: ReprotectRun = {
      machine,
      operationId: id,
      failoverId: record.failoverId,
      epoch: 0,
      disks: [],
      intervalSeconds: body.intervalSeconds,
      pass: 1,
      shippedBytes: 0,
      sealedBytes: 0,
    };
    return startOperation(
      request,
      context,
      PROTECTION_ORCHESTRATION.reprotect,
      id,
      run,
      { machine, failoverId: record.failoverId },
      () => releaseMachine(deps.tables, machine, id),
    );
  }),
});

app.http('machines-failback', {
  route: 'machines/{machine}/failback',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultProtectionDeps();
    const machine = request.params.machine;
    const body = parseBody(failbackRequestSchema, await optionalBody(request), '"cleanup" and "waitSeconds"');
    const client = df.getClient(context);
    const row = await prepareFailback(deps, machine, claimHolderEnded(client, deps.now));
    const id = operationId();
    const reprotect = await runningReprotect(deps, client, machine);
    await requestFailback(deps, row, id);
    if (reprotect) await wakeReprotect(client, reprotect, id);
    const reprotectRunning = reprotect !== undefined;
    const run: FailbackRun = {
      machine,
      operationId: id,
      failoverId: row.failoverId,
      epoch: row.epoch,
      disks: JSON.parse(row.disks) as ReprotectDisk[],
      cleanup: body.cleanup,
      waitForHandover: reprotectRunning,
      waitSeconds: body.waitSeconds,
    };
    return startOperation(
      request,
      context,
      PROTECTION_ORCHESTRATION.failback,
      id,
      run,
      { machine, failoverId: row.failoverId },
      () => releaseMachine(deps.tables, machine, id),
    );
  }),
});
