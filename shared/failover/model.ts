import { z } from 'zod';
import { ValidationError } from '../errors';
import { isDnsLabel } from '../names';
import { parseOrThrow } from '../replication/policy';
import { isMarkerId } from '../segment';

// ---- recovery point selectors ----

/** Which recovery point a failover uses (DESIGN.md §2). */
export type RecoveryPointSelector =
  'latest' | 'latest-processed' | 'latest-app-consistent' | { id: string } | { time: string };

export const selectorSchema = z.union(
  [
    z.enum(['latest', 'latest-processed', 'latest-app-consistent']),
    z.string().refine(isMarkerId, {
      error:
        'must be latest, latest-processed, latest-app-consistent, a recovery point id (a marker id: letters, digits, ".", "_", "-", up to 64) or { "time": ISO-8601 }',
    }),
    z.strictObject({
      time: z.iso.datetime({ offset: true, error: 'must be an ISO-8601 time such as 2026-01-01T12:00:00Z' }),
    }),
  ],
  {
    error:
      'must be latest, latest-processed, latest-app-consistent, a recovery point id or { "time": ISO-8601 }',
  },
);

export function toSelector(value: z.infer<typeof selectorSchema>): RecoveryPointSelector {
  if (typeof value === 'object') return { time: new Date(value.time).toISOString() };
  if (value === 'latest' || value === 'latest-processed' || value === 'latest-app-consistent') return value;
  return { id: value };
}

export function describeSelector(s: RecoveryPointSelector): string {
  if (typeof s === 'string') return s;
  return 'id' in s ? `point ${s.id}` : `the newest point at or before ${s.time}`;
}

// ---- the Azure target (only the azure compute provider reads it) ----

const armId = z.string().regex(/^\/subscriptions\/[^/]+\/resourceGroups\/[^/]+\/providers\/.+$/i, {
  error: 'must be an Azure resource id (/subscriptions/…/resourceGroups/…/providers/…)',
});

export const azureTargetSchema = z.strictObject({
  subscriptionId: z.string().min(1),
  resourceGroup: z.string().min(1).max(90),
  location: z.string().min(1),
  /** The subnet the target's NIC joins (real failover). */
  subnetId: armId,
  /** The storage account holding the seed disks (managed disk import needs its id). */
  storageAccountId: armId,
  vmSize: z.string().min(1).default('Standard_D2s_v5'),
  osType: z.enum(['Linux', 'Windows']).default('Linux'),
  /** Address space of the isolated network a test failover creates. */
  testAddressPrefix: z.string().default('10.250.0.0/24'),
});

export type AzureTarget = z.infer<typeof azureTargetSchema>;

// ---- requests ----

const seconds = (min: number, max: number) =>
  z
    .number({ error: 'must be a number of seconds' })
    .int({ error: 'must be a whole number of seconds' })
    .min(min, { error: `must be at least ${min} seconds` })
    .max(max, { error: `must be at most ${max} seconds` });

export const failoverRequestSchema = z
  .strictObject({
    recoveryPoint: selectorSchema,
    /** A drill: isolated names and network, replication untouched, ended by cancel. */
    test: z.boolean({ error: 'must be true or false' }).default(false),
    /** Quiesce the source through the agent first: zero data loss. */
    planned: z.boolean({ error: 'must be true or false' }).default(false),
    /** How long `latest` waits for pending change logs, and planned failover for the final marker. */
    waitSeconds: seconds(1, 86_400).default(900),
    target: azureTargetSchema.optional(),
  })
  .superRefine((body, ctx) => {
    if (body.planned && body.test) {
      ctx.addIssue({
        code: 'custom',
        path: ['planned'],
        message: 'cannot be combined with test: a drill never quiesces the source',
      });
    }
  });

export type FailoverRequestBody = z.infer<typeof failoverRequestSchema>;

export const changePointSchema = z.strictObject({
  recoveryPoint: selectorSchema,
  waitSeconds: seconds(1, 86_400).default(900),
});

export function requireObject(body: unknown, what: string): void {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new ValidationError(`The request body must be a JSON object with ${what}.`, 'body');
  }
}

export function parseFailoverRequest(body: unknown): FailoverRequestBody {
  requireObject(body, '"recoveryPoint" and optionally "test", "planned", "waitSeconds", "target"');
  return parseOrThrow(failoverRequestSchema, body);
}

export function parseChangePoint(body: unknown): z.infer<typeof changePointSchema> {
  requireObject(body, '"recoveryPoint"');
  return parseOrThrow(changePointSchema, body);
}

// ---- failover records ----

export type FailoverKind = 'test' | 'planned' | 'unplanned';

/**
 * The life of a failover. In progress: accepted → quiescing (planned) / applying-pending
 * (`latest`) → materialising → creating-target. Then failed-over, which commit makes committed
 * (final) and change-point takes through changing-point back to failed-over; cancel (from
 * failed-over or failed) removes everything and the record. A failure cleans up and ends failed.
 * A failover whose operation ended mid-way is abandoned when another failover clears its claim.
 */
export type FailoverState =
  | 'accepted'
  | 'quiescing'
  | 'applying-pending'
  | 'materialising'
  | 'creating-target'
  | 'failed-over'
  | 'changing-point'
  | 'committing'
  | 'committed'
  | 'cancelling'
  | 'failed'
  // Its operation ended (terminated, failed, never started) while it was in progress, and a new
  // failover cleared its claim: what it created may remain until the machine's next failover
  // removes it with the record (docs/failover.md, "Stale claims").
  | 'abandoned'
  // After commit (docs/reprotect.md): reprotect replicates the failover disks back to the site
  // (reprotecting until its first pass is applied, then reprotected); failback stops the failover
  // machine, ships the last changes and verifies the site (failing-back), then failed-back (final).
  | 'reprotecting'
  | 'reprotected'
  | 'failing-back'
  | 'failed-back';

export const IN_PROGRESS: readonly FailoverState[] = [
  'accepted',
  'quiescing',
  'applying-pending',
  'materialising',
  'creating-target',
  'changing-point',
  'committing',
  'cancelling',
];

/** The states of a committed failover on its way home (reprotect, failback). */
export const AFTER_COMMIT: readonly FailoverState[] = [
  'reprotecting',
  'reprotected',
  'failing-back',
  'failed-back',
];

export type FailoverAction = 'commit' | 'change-recovery-point' | 'cancel';

/** The state an action moves a failover to, or why it may not (the 409's message). */
export function nextState(
  record: { state: FailoverState; kind: FailoverKind; machine: string; failoverId: string },
  action: FailoverAction,
): { ok: true; state: FailoverState } | { ok: false; reason: string } {
  const { state, kind, machine, failoverId } = record;
  const name = `${kind === 'test' ? 'Test failover' : 'Failover'} ${failoverId} of ${machine}`;
  if (state === 'committed' || AFTER_COMMIT.includes(state)) {
    return {
      ok: false,
      reason: `${name} is already committed${state === 'committed' ? '' : ` (${state})`}; a committed failover cannot ${action === 'commit' ? 'be committed again' : action === 'cancel' ? 'be cancelled' : 'change its recovery point'}.`,
    };
  }
  if (IN_PROGRESS.includes(state)) {
    return {
      ok: false,
      reason: `${name} is ${state}; wait until it is failed-over (GET its operation) and retry.`,
    };
  }
  switch (action) {
    case 'commit':
      if (kind === 'test')
        return { ok: false, reason: `${name} is a test failover; end it with cancel, not commit.` };
      return state === 'failed-over'
        ? { ok: true, state: 'committing' }
        : { ok: false, reason: `${name} is ${state}; only a failed-over machine can be committed.` };
    case 'change-recovery-point':
      return state === 'failed-over'
        ? { ok: true, state: 'changing-point' }
        : {
            ok: false,
            reason: `${name} is ${state}; only a failed-over machine can change its recovery point.`,
          };
    case 'cancel':
      return state === 'failed-over' || state === 'failed'
        ? { ok: true, state: 'cancelling' }
        : { ok: false, reason: `${name} is ${state} and cannot be cancelled.` };
  }
}

/** A disk materialised for a failover: where it lives (a blob name or an ARM id). */
export interface MaterialisedDisk {
  id: string;
  sizeBytes: number;
  resource: string;
  snapshot: string;
}

/** The target machine a compute provider created. */
export interface TargetMachine {
  name: string;
  provider: 'local' | 'azure';
  /** The provider's id of the machine (table row key or VM resource id). */
  resource: string;
  network: string;
  running: boolean;
  test: boolean;
  disks: MaterialisedDisk[];
}

export interface ChosenPoint {
  id: string;
  type: string;
  sourceTime: string;
  disks: { id: string; snapshot: string; sizeBytes: number }[];
}

/** What GET returns and the orchestrations report; the table row holds the same as JSON fields. */
export interface FailoverRecord {
  machine: string;
  failoverId: string;
  kind: FailoverKind;
  state: FailoverState;
  operationId: string;
  selector: RecoveryPointSelector;
  point?: ChosenPoint;
  target?: TargetMachine;
  /** Set by a failed step: which step and why. */
  error?: { step: string; message: string };
  /** The plan run that started it, if any. */
  planRun?: string;
  /** The Azure target it was started with (azure compute provider). */
  targetSpec?: AzureTarget;
  createdAt: string;
  updatedAt: string;
  committedAt?: string;
}

export const FAILOVER_ID = /^fo-[a-z0-9]{12}$/;

export function isFailoverId(value: string): boolean {
  return FAILOVER_ID.test(value);
}

/** `fo-` + 12 hex digits from a uuid (random in HTTP, `context.df.newGuid` in orchestrations). */
export function failoverIdFromUuid(uuid: string): string {
  return `fo-${uuid.replace(/-/g, '').slice(0, 12).toLowerCase()}`;
}

export function isMachineName(value: string): boolean {
  return isDnsLabel(value);
}

/** An abandoned failover of the machine, for the next failover to remove (as a cancel does). */
export interface AbandonedFailover {
  failoverId: string;
  test: boolean;
  target?: AzureTarget;
}

/** The input of the failover orchestration (a machine's failover, or a change of its point). */
export interface FailoverRun {
  machine: string;
  failoverId: string;
  kind: FailoverKind;
  selector: RecoveryPointSelector;
  waitSeconds: number;
  target?: AzureTarget;
  mode: 'failover' | 'change-point';
  /** Set when a plan runs it: a failure is returned as a result rather than thrown. */
  planRun?: string;
  /** The machine's abandoned failovers: their disks, target, commands and records go first. */
  abandoned?: AbandonedFailover[];
}

/** What the failover orchestration returns. */
export type FailoverOutcome =
  | { ok: true; machine: string; failoverId: string; point: ChosenPoint; target: TargetMachine }
  | { ok: false; machine: string; failoverId: string; step: string; message: string };
