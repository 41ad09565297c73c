import { randomUUID } from 'node:crypto';
import { app } from '@azure/functions';
import * as df from 'durable-functions';
import { ConflictError, ValidationError } from '../../shared/errors';
import {
  activeFailover,
  clearStaleFailoverClaim,
  defaultFailoverDeps,
  parsePlanRun,
  readPlan,
  savePlan,
} from '../../shared/failover';
import {
  checkPlanFailback,
  defaultProtectionDeps,
  parsePlanFailbackRequest,
  releaseMachine,
  requestFailback,
  withdrawFailbackRequest,
  type CheckedMember,
  type PlanFailbackMember,
  type PlanFailbackRun,
  type ReprotectDisk,
} from '../../shared/reprotect';
import { ORCHESTRATION } from '../orchestrations/names';
import '../orchestrations/plan';
import '../orchestrations/plan-failback';
import type { PlanRunInput } from '../orchestrations/plan';
import { PROTECTION_ORCHESTRATION } from '../orchestrations/protection-activities';
import { startOperation } from './operations';
import { claimHolderEnded, operationId, runningReprotect, wakeReprotect } from './protection';
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
    // atomically, when its group starts); a failover whose operations ended unfinished no longer
    // holds it: it becomes abandoned here and the member's failover removes what it left
    // (docs/failover.md, "Stale claims").
    const holderEnded = claimHolderEnded(df.getClient(context), deps.now);
    for (const group of plan.groups) {
      for (const m of group.machines) {
        if (await clearStaleFailoverClaim(deps.tables, m.machine, deps.now(), holderEnded)) continue;
        const active = await activeFailover(deps.tables, m.machine).catch(() => undefined);
        const holder = active ? `${active.kind} failover ${active.failoverId}, ${active.state}` : 'starting';
        throw new ConflictError(
          `Machine ${m.machine} of plan ${plan.name} is already failing over (${holder}); commit or cancel it first.`,
          'plan',
          'FailoverInProgress',
        );
      }
    }
    const runId = `plan-${plan.name}-${randomUUID().replace(/-/g, '').slice(0, 8)}`;
    const input: PlanRunInput = { plan, ...options };
    return startOperation(request, context, ORCHESTRATION.plan, runId, input, { plan: plan.name });
  }),
});

// POST /api/plans/{plan}/failback: every reprotected machine of the plan fails back, group by group
// (docs/reprotect.md, "Plan failback"). Every machine is checked first (one 409 lists those not
// ready, nothing changed); then each machine's failback is requested at once — its reprotect stops
// and hands over, as for POST /api/machines/{m}/failback — and the plan orchestration runs them.
app.http('plans-failback', {
  route: 'plans/{plan}/failback',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultProtectionDeps();
    const plan = await readPlan(deps.failover.tables, request.params.plan);
    const text = await request.text();
    const options = parsePlanFailbackRequest(text.trim() === '' ? undefined : parseJson(text));
    const client = df.getClient(context);
    const checked = await checkPlanFailback(deps, plan, claimHolderEnded(client, deps.now));
    const runId = `plan-${plan.name}-failback-${randomUUID().replace(/-/g, '').slice(0, 8)}`;
    const members = new Map<string, PlanFailbackMember>();
    const requested: { member: CheckedMember; id: string; reprotect?: string }[] = [];
    try {
      for (const member of checked) {
        if (!member.row) {
          members.set(member.machine, {
            machine: member.machine,
            ...(member.home ? { home: member.home } : {}),
          });
          continue;
        }
        const id = operationId();
        const reprotect = await runningReprotect(deps, client, member.machine);
        await requestFailback(deps, member.row, id);
        requested.push({ member, id, ...(reprotect ? { reprotect } : {}) });
        members.set(member.machine, {
          machine: member.machine,
          run: {
            machine: member.machine,
            operationId: id,
            failoverId: member.row.failoverId,
            epoch: member.row.epoch,
            disks: JSON.parse(member.row.disks) as ReprotectDisk[],
            cleanup: options.cleanup,
            waitForHandover: reprotect !== undefined,
            waitSeconds: options.waitSeconds,
          },
        });
      }
    } catch (err) {
      // Another request changed a machine meanwhile: take back what this one asked, then answer.
      for (const r of requested) await withdrawFailbackRequest(deps, r.member, r.id).catch(() => undefined);
      throw err;
    }
    for (const r of requested) if (r.reprotect) await wakeReprotect(client, r.reprotect, r.id);
    const ordered = options.order === 'reverse' ? [...plan.groups].reverse() : plan.groups;
    const input: PlanFailbackRun = {
      plan: plan.name,
      runId,
      order: options.order,
      actions: options.actions,
      waitSeconds: options.waitSeconds,
      groups: ordered.map((g) => ({
        name: g.name,
        pre: g.pre,
        post: g.post,
        members: g.machines.map((m) => members.get(m.machine)!),
      })),
    };
    return startOperation(
      request,
      context,
      PROTECTION_ORCHESTRATION.planFailback,
      runId,
      input,
      {
        plan: plan.name,
        order: options.order,
        machines: Object.fromEntries(
          [...members.values()].map((m) => [
            m.machine,
            m.run ? { operationId: m.run.operationId } : { home: m.home },
          ]),
        ),
      },
      async () => {
        for (const r of requested) await releaseMachine(deps.tables, r.member.machine, r.id);
      },
    );
  }),
});

function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ValidationError(`The request body is not valid JSON: ${(err as Error).message}.`, 'body');
  }
}
