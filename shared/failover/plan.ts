import { z } from 'zod';
import { NotFoundError, ValidationError } from '../errors';
import { isDnsLabel, validateName } from '../names';
import {
  MACHINES_PARTITION,
  readEntity,
  TABLES,
  type MachineEntity,
  type ReplicationDeps,
} from '../replication';
import { parseOrThrow } from '../replication/policy';
import {
  azureTargetSchema,
  requireObject,
  selectorSchema,
  toSelector,
  type AzureTarget,
  type RecoveryPointSelector,
} from './model';
import { FAILOVER_TABLES, PLANS_PARTITION, type FailoverTables } from './tables';

const label = (what: string) =>
  z.string({ error: `must be a string naming the ${what}` }).refine(isDnsLabel, {
    error: `must be a DNS-style label (lower-case letters, digits and '-', 1-63 characters); it names the ${what}`,
  });

const seconds = (min: number, max: number) =>
  z
    .number({ error: 'must be a number of seconds' })
    .int({ error: 'must be a whole number of seconds' })
    .min(min, { error: `must be at least ${min} seconds` })
    .max(max, { error: `must be at most ${max} seconds` });

const webhookSchema = z.strictObject({
  type: z.literal('webhook'),
  name: label('step'),
  url: z.url({ protocol: /^https?$/, error: 'must be an http or https URL' }),
  method: z.enum(['POST', 'PUT', 'GET']).default('POST'),
  headers: z.record(z.string(), z.string()).optional(),
  /** Sent as JSON; by default the plan, run, group and step. */
  body: z.unknown().optional(),
  timeoutSeconds: seconds(1, 600).default(30),
  /** Further attempts after the first fails. */
  retries: z.number().int().min(0).max(10).default(3),
  retryIntervalSeconds: seconds(1, 3600).default(5),
});

const manualSchema = z.strictObject({
  type: z.literal('manual'),
  name: label('step'),
  instructions: z.string().max(2000).default(''),
  /** Fail the step when nobody approves within this long; no timeout when absent. */
  timeoutSeconds: seconds(1, 30 * 86_400).optional(),
});

const waitSchema = z.strictObject({
  type: z.literal('wait'),
  name: label('step'),
  seconds: seconds(1, 7 * 86_400),
});

export const actionSchema = z.discriminatedUnion('type', [webhookSchema, manualSchema, waitSchema], {
  error: 'must be an action with "type" webhook, manual or wait',
});

export type PlanAction = z.infer<typeof actionSchema>;
export type WebhookAction = z.infer<typeof webhookSchema>;

const planMachineSchema = z.union(
  [
    label('machine'),
    z.strictObject({
      machine: label('machine'),
      recoveryPoint: selectorSchema.optional(),
      target: azureTargetSchema.optional(),
    }),
  ],
  { error: 'must be a machine name or { "machine": name, "recoveryPoint"?, "target"? }' },
);

const groupSchema = z.strictObject({
  name: label('group'),
  machines: z.array(planMachineSchema).max(100).default([]),
  pre: z.array(actionSchema).max(20).default([]),
  post: z.array(actionSchema).max(20).default([]),
});

export const planSchema = z
  .strictObject({
    description: z.string().max(1000).default(''),
    /** Default recovery point for every machine (each machine may name its own). */
    recoveryPoint: selectorSchema.default('latest-processed'),
    groups: z.array(groupSchema).min(1, { error: 'must list at least one group' }).max(50),
    target: azureTargetSchema.optional(),
  })
  .superRefine((plan, ctx) => {
    const machines = new Map<string, string>();
    const groups = new Set<string>();
    plan.groups.forEach((g, gi) => {
      if (groups.has(g.name)) {
        ctx.addIssue({
          code: 'custom',
          path: ['groups', gi, 'name'],
          message: `repeats group ${g.name}; group names must be unique`,
        });
      }
      groups.add(g.name);
      g.machines.forEach((m, mi) => {
        const name = typeof m === 'string' ? m : m.machine;
        const first = machines.get(name);
        if (first) {
          ctx.addIssue({
            code: 'custom',
            path: ['groups', gi, 'machines', mi],
            message: `repeats machine ${name} (already in ${first}); a machine fails over once per plan`,
          });
        }
        machines.set(name, `group ${g.name}`);
      });
      const steps = new Set<string>();
      [...g.pre, ...g.post].forEach((a) => {
        if (steps.has(a.name)) {
          ctx.addIssue({
            code: 'custom',
            path: ['groups', gi],
            message: `repeats step ${a.name}; step names must be unique within a group`,
          });
        }
        steps.add(a.name);
      });
    });
  });

export type PlanBody = z.infer<typeof planSchema>;

/** A plan as stored and as the orchestration runs it: every default filled in. */
export interface RecoveryPlan {
  name: string;
  description: string;
  groups: {
    name: string;
    machines: { machine: string; recoveryPoint: RecoveryPointSelector; target?: AzureTarget }[];
    pre: PlanAction[];
    post: PlanAction[];
  }[];
  updatedAt: string;
}

export function parsePlan(name: string, body: unknown, now: Date): RecoveryPlan {
  validateName(name, 'plan');
  requireObject(body, '"groups" (each { name, machines, pre, post })');
  const parsed = parseOrThrow(planSchema, body);
  const fallback = toSelector(parsed.recoveryPoint);
  return {
    name,
    description: parsed.description,
    groups: parsed.groups.map((g) => ({
      name: g.name,
      machines: g.machines.map((m) =>
        typeof m === 'string'
          ? { machine: m, recoveryPoint: fallback, ...(parsed.target ? { target: parsed.target } : {}) }
          : {
              machine: m.machine,
              recoveryPoint: m.recoveryPoint ? toSelector(m.recoveryPoint) : fallback,
              ...((m.target ?? parsed.target) ? { target: m.target ?? parsed.target } : {}),
            },
      ),
      pre: g.pre,
      post: g.post,
    })),
    updatedAt: now.toISOString(),
  };
}

interface PlanEntity {
  partitionKey: string;
  rowKey: string;
  plan: string;
  updatedAt: string;
}

/** Validates and stores a plan; every machine it names must be registered (404 otherwise). */
export async function savePlan(
  tables: FailoverTables,
  replication: ReplicationDeps,
  name: string,
  body: unknown,
  now: Date,
): Promise<{ created: boolean; plan: RecoveryPlan }> {
  const plan = parsePlan(name, body, now);
  const machines = await replication.tables.get(TABLES.machines);
  for (const [gi, group] of plan.groups.entries()) {
    for (const [mi, m] of group.machines.entries()) {
      if (!(await readEntity<MachineEntity>(machines, MACHINES_PARTITION, m.machine))) {
        throw new NotFoundError(
          `Machine ${m.machine} (groups[${gi}].machines[${mi}]) is not registered; register it with PUT /api/machines/${m.machine} first.`,
          `groups[${gi}].machines[${mi}]`,
        );
      }
    }
  }
  const table = await tables.get(FAILOVER_TABLES.plans);
  const existing = await readEntity<PlanEntity>(table, PLANS_PARTITION, name);
  await table.upsertEntity(
    { partitionKey: PLANS_PARTITION, rowKey: name, plan: JSON.stringify(plan), updatedAt: plan.updatedAt },
    'Replace',
  );
  return { created: !existing, plan };
}

export async function readPlan(tables: FailoverTables, name: string): Promise<RecoveryPlan> {
  validateName(name, 'plan');
  const row = await readEntity<PlanEntity>(await tables.get(FAILOVER_TABLES.plans), PLANS_PARTITION, name);
  if (!row)
    throw new NotFoundError(
      `Recovery plan ${name} does not exist; create it with PUT /api/plans/${name}.`,
      'plan',
    );
  return JSON.parse(row.plan) as RecoveryPlan;
}

export const planRunSchema = z.strictObject({
  test: z.boolean({ error: 'must be true or false' }).default(false),
  planned: z.boolean({ error: 'must be true or false' }).default(false),
  /** Overrides every machine's recovery point. */
  recoveryPoint: selectorSchema.optional(),
  /** On a failed step: wait for retry/abort over HTTP (default), or abort at once. */
  onFailure: z.enum(['wait', 'abort']).default('wait'),
  waitSeconds: seconds(1, 86_400).default(900),
});

export function parsePlanRun(body: unknown) {
  if (body !== undefined && (body === null || typeof body !== 'object' || Array.isArray(body))) {
    throw new ValidationError('The request body must be a JSON object (or empty).', 'body');
  }
  const parsed = parseOrThrow(planRunSchema, body ?? {});
  if (parsed.test && parsed.planned) {
    throw new ValidationError(
      'planned cannot be combined with test: a drill never quiesces the source.',
      'planned',
    );
  }
  return { ...parsed, recoveryPoint: parsed.recoveryPoint ? toSelector(parsed.recoveryPoint) : undefined };
}
