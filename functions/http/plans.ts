import { randomUUID } from 'node:crypto';
import { app } from '@azure/functions';
import * as df from 'durable-functions';
import { ConflictError, ValidationError } from '../../shared/errors';
import { activeFailover, defaultFailoverDeps, parsePlanRun, readPlan, savePlan } from '../../shared/failover';
import { ORCHESTRATION } from '../orchestrations/names';
import '../orchestrations/plan';
import type { PlanRunInput } from '../orchestrations/plan';
import { startOperation } from './operations';
import { jsonBody, withErrors } from './respond';

app.http('plans-put', {
  route: 'plans/{plan}',
  methods: ['PUT'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const deps = defaultFailoverDeps();
    const { created, plan } = await savePlan(
      deps.tables,
      deps.replication,
      request.params.plan,
      await jsonBody(request),
      deps.now(),
    );
    return { status: created ? 201 : 200, jsonBody: plan };
  }),
});

app.http('plans-get', {
  route: 'plans/{plan}',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => ({
    jsonBody: await readPlan(defaultFailoverDeps().tables, request.params.plan),
  })),
});

app.http('plans-failover', {
  route: 'plans/{plan}/failover',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultFailoverDeps();
    const plan = await readPlan(deps.tables, request.params.plan);
    const text = await request.text();
    const options = parsePlanRun(text.trim() === '' ? undefined : parseJson(text));
    // Refuse at once when a machine of the plan is already failing over (each is claimed again,
    // atomically, when its group starts).
    for (const group of plan.groups) {
      for (const m of group.machines) {
        const active = await activeFailover(deps.tables, m.machine).catch(() => undefined);
        if (active) {
          throw new ConflictError(
            `Machine ${m.machine} of plan ${plan.name} is already failing over (${active.kind} failover ${active.failoverId}, ${active.state}); commit or cancel it first.`,
            'plan',
            'FailoverInProgress',
          );
        }
      }
    }
    const runId = `plan-${plan.name}-${randomUUID().replace(/-/g, '').slice(0, 8)}`;
    const input: PlanRunInput = { plan, ...options };
    return startOperation(request, context, ORCHESTRATION.plan, runId, input, { plan: plan.name });
  }),
});

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ValidationError(`The request body is not valid JSON: ${(err as Error).message}.`, 'body');
  }
}
