import { z } from 'zod';
import { ValidationError } from '../errors';
import { isDnsLabel } from '../names';

/** The most members a group may have (the barrier is measured up to 64 on one host). */
export const MAX_GROUP_MEMBERS = 128;

export const groupPolicySchema = z.strictObject({
  /** Crash-consistent group markers, seconds; 0 = off. */
  crashConsistentIntervalSeconds: z.number().int().min(0).max(86_400).default(300),
  /** App-consistent group markers (every member's freeze hook), minutes; 0 = off. */
  appConsistentIntervalMinutes: z.number().int().min(0).max(10_080).default(0),
  /** How long members get to answer prepare before the marker is aborted, ms. */
  prepareTimeoutMs: z.number().int().min(50).max(60_000).default(2_000),
});

export type GroupPolicy = z.infer<typeof groupPolicySchema>;

export const groupRequestSchema = z.strictObject({
  members: z
    .array(z.string().refine(isDnsLabel, { message: 'must be machine names (DNS-style labels)' }))
    .min(1, { message: 'must list at least one machine' })
    .max(MAX_GROUP_MEMBERS, { message: `must list at most ${MAX_GROUP_MEMBERS} machines` }),
  policy: groupPolicySchema.default(groupPolicySchema.parse({})),
});

export type GroupRequest = z.infer<typeof groupRequestSchema>;

/** Parses `PUT /api/groups/{group}`; the 400 names the first wrong field. */
export function parseGroupRequest(body: unknown): GroupRequest {
  const r = groupRequestSchema.safeParse(body);
  if (!r.success) {
    const issue = r.error.issues[0];
    const target = issue.path.join('.') || 'body';
    throw new ValidationError(`${target} ${issue.message}.`, target);
  }
  const seen = new Set<string>();
  for (const m of r.data.members) {
    if (seen.has(m))
      throw new ValidationError(`members lists machine ${m} twice; list each machine once.`, 'members');
    seen.add(m);
  }
  return r.data;
}

/**
 * One machine's time in the group. Membership rules (docs/groups.md): a group point includes
 * exactly the machines that were members when its marker was cut (joinedAt ≤ marker time <
 * leftAt). Joining does not change points already taken; leaving does not remove the machine
 * from them (its own recovery points at those markers stay in its retention, and a group failover
 * to such a point still fails it over).
 */
export interface Membership {
  machine: string;
  /** ms since 1970 */
  joinedAt: number;
  leftAt?: number;
}

/** Applies a new member list to the history at `now`: new names join, missing names leave. */
export function applyMembership(history: Membership[], members: string[], now: number): Membership[] {
  const wanted = new Set(members);
  const next = history.map((m) =>
    m.leftAt === undefined && !wanted.has(m.machine) ? { ...m, leftAt: now } : m,
  );
  const current = new Set(next.filter((m) => m.leftAt === undefined).map((m) => m.machine));
  for (const m of members) if (!current.has(m)) next.push({ machine: m, joinedAt: now });
  return next;
}

/** The members at `time` (a marker's time). */
export function membersAt(history: Membership[], time: number): string[] {
  return [
    ...new Set(
      history
        .filter((m) => m.joinedAt <= time && (m.leftAt === undefined || time < m.leftAt))
        .map((m) => m.machine),
    ),
  ].sort();
}

export function currentMembers(history: Membership[]): string[] {
  return history.filter((m) => m.leftAt === undefined).map((m) => m.machine);
}
