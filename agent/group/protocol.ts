import { ValidationError } from '../../shared/errors';
import { validateName } from '../../shared/names';

/*
 * The group barrier's messages (coordinator ↔ member agent). docs/groups.md describes the
 * protocol; the HTTP transport (transport.ts) carries these objects as JSON.
 */

/** What a group marker promises: crash-consistent, or app-consistent (every member froze). */
export type GroupConsistency = 'crash' | 'app';

/** Phase 1: hold new write acknowledgements, drain in-flight writes, report back. */
export interface PrepareCommand {
  group: string;
  markerId: string;
  consistency: GroupConsistency;
  /**
   * How long the member may hold writes for this marker, counted from when it received the
   * command. Past it the member lets writes go without cutting: a late commit is ignored.
   */
  holdMs: number;
}

/** A member's answer to prepare. */
export interface PrepareAnswer {
  machine: string;
  markerId: string;
  /** True when the member is holding writes with every disk drained. */
  prepared: boolean;
  /** For app-consistent markers: whether the member's freeze hook succeeded. */
  frozen?: boolean;
  /** Why the member could not prepare (a disk not in data mode, a hook, …). */
  reason?: string;
}

/** Phase 2: every member cuts at the same marker (commit), or lets writes go (abort). */
export interface Decision {
  group: string;
  markerId: string;
  decision: 'commit' | 'abort';
  /** The marker's time (ms since 1970), the same on every member. */
  time: number;
  /** The marker record's tag (see groupMarkerTag). */
  tag: string;
}

/** What a member did with the decision. */
export interface DecisionOutcome {
  machine: string;
  markerId: string;
  /** True when the member cut every disk at the marker. */
  cut: boolean;
  /** The seq of the segment ending with the marker, per disk (when cut). */
  seqs?: Record<string, number>;
  reason?: string;
}

/**
 * The tag of a group marker record: names the group and the consistency, so the cloud can tell
 * which group a marker belongs to and whether the point is app-consistent.
 */
export function groupMarkerTag(group: string, consistency: GroupConsistency): string {
  return `group=${group};consistency=${consistency}`;
}

export function parseGroupMarkerTag(
  tag: string,
): { group: string; consistency: GroupConsistency } | undefined {
  const m = /^group=([a-z0-9-]+);consistency=(crash|app)$/.exec(tag);
  return m ? { group: m[1], consistency: m[2] as GroupConsistency } : undefined;
}

/** Group marker ids: short (the segment format bounds them), unique per coordinator run. */
export function groupMarkerId(time: number, counter: number, nonce: string): string {
  return `group-${time.toString(36)}-${nonce}-${counter}`;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function parsePrepare(body: unknown): PrepareCommand {
  if (!isObject(body)) throw new ValidationError('A prepare command must be a JSON object.', 'body');
  const { group, markerId, consistency, holdMs } = body;
  if (typeof markerId !== 'string' || !/^[a-z0-9-]{1,64}$/.test(markerId))
    throw new ValidationError('markerId must be 1–64 characters a-z, 0-9, -.', 'markerId');
  if (consistency !== 'crash' && consistency !== 'app')
    throw new ValidationError('consistency must be crash or app.', 'consistency');
  if (typeof holdMs !== 'number' || !Number.isFinite(holdMs) || holdMs <= 0)
    throw new ValidationError('holdMs must be a positive number of milliseconds.', 'holdMs');
  return { group: validateName(String(group), 'group'), markerId, consistency, holdMs };
}

export function parseDecision(body: unknown): Decision {
  if (!isObject(body)) throw new ValidationError('A decision must be a JSON object.', 'body');
  const { group, markerId, decision, time, tag } = body;
  if (typeof markerId !== 'string') throw new ValidationError('markerId must be a string.', 'markerId');
  if (decision !== 'commit' && decision !== 'abort')
    throw new ValidationError('decision must be commit or abort.', 'decision');
  if (typeof time !== 'number' || typeof tag !== 'string')
    throw new ValidationError('time and tag are required.', 'time');
  return { group: validateName(String(group), 'group'), markerId, decision, time, tag };
}

export function parsePrepareAnswer(body: unknown, machine: string, markerId: string): PrepareAnswer {
  if (!isObject(body)) throw new ValidationError('A prepare answer must be a JSON object.', 'body');
  return {
    machine,
    markerId,
    prepared: body.prepared === true,
    ...(typeof body.frozen === 'boolean' ? { frozen: body.frozen } : {}),
    ...(typeof body.reason === 'string' ? { reason: body.reason.slice(0, 500) } : {}),
  };
}
