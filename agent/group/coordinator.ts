import { randomBytes } from 'node:crypto';
import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import { ensureError } from '../../shared/errors';
import { createLogger } from '../../shared/logger';
import { validateName } from '../../shared/names';
import type { GroupParticipant } from './participant';
import {
  groupMarkerId,
  groupMarkerTag,
  type Decision,
  type DecisionOutcome,
  type GroupConsistency,
  type PrepareAnswer,
  type PrepareCommand,
} from './protocol';

/** How the coordinator reaches one member: in process, or over HTTP (transport.ts). */
export interface MemberLink {
  readonly machine: string;
  prepare(command: PrepareCommand): Promise<PrepareAnswer>;
  decide(decision: Decision): Promise<DecisionOutcome | undefined>;
}

/** A member agent in the same process. */
export function localLink(participant: GroupParticipant): MemberLink {
  return {
    machine: participant.machine,
    prepare: (c) => participant.prepare(c),
    decide: (d) => participant.decide(d),
  };
}

export interface GroupMarkerResult {
  group: string;
  markerId: string;
  consistency: GroupConsistency;
  decision: 'commit' | 'abort';
  /** When every member was holding (commit) or when the coordinator gave up (abort). */
  time: number;
  /** Members that did not answer prepare within the timeout. */
  slow: string[];
  /** Members that answered "cannot prepare", with their reasons. */
  refused: { machine: string; reason: string }[];
  /** Members whose freeze hook failed (the marker is then crash-consistent). */
  unfrozen: string[];
  /** From sending prepare to the decision, ms. */
  barrierMs: number;
}

export interface GroupCoordinatorOptions {
  group: string;
  members: MemberLink[];
  /** How long members get to answer prepare (default 2 s); also bounds how long they hold writes. */
  prepareTimeoutMs?: number;
  /** For app-consistent markers, added to the timeout for the freeze hooks (default 60 s). */
  freezeAllowanceMs?: number;
  /** Scheduled markers run only while this holds (the site proxy: while members poll it). */
  shouldRun?: () => boolean;
  logger?: Logger;
}

/**
 * Runs group markers: a two-phase barrier across the members. Prepare goes to every member at
 * once; when every member is holding writes before the timeout, commit goes to all (each cuts
 * at the same marker id and time); otherwise abort, which only lets writes go. One marker at a
 * time. Events: 'committed' and 'aborted' (GroupMarkerResult); an abort names the slow members.
 */
export class GroupCoordinator extends EventEmitter {
  readonly group: string;
  private members: MemberLink[];
  private readonly log: Logger;
  private readonly nonce = randomBytes(3).toString('hex');
  private counter = 0;
  private chain: Promise<unknown> = Promise.resolve();
  private timers: NodeJS.Timeout[] = [];
  private lastResult: GroupMarkerResult | undefined;

  constructor(private readonly options: GroupCoordinatorOptions) {
    super();
    this.group = validateName(options.group, 'group');
    this.members = [...options.members];
    this.log = (options.logger ?? createLogger('group')).child({ group: this.group });
  }

  get memberNames(): string[] {
    return this.members.map((m) => m.machine);
  }

  get last(): GroupMarkerResult | undefined {
    return this.lastResult;
  }

  /** Membership changes take effect at the next marker. */
  setMembers(members: MemberLink[]): void {
    this.members = [...members];
  }

  /** Runs one group marker (after any marker still running). */
  runMarker(consistency: GroupConsistency = 'crash'): Promise<GroupMarkerResult> {
    const run = this.chain.then(() => this.barrier(consistency));
    this.chain = run.catch(() => undefined);
    return run;
  }

  /** Group markers on the group policy's intervals (seconds; 0 = off). */
  schedule(crashIntervalSeconds: number, appIntervalSeconds = 0): void {
    const every = (seconds: number, consistency: GroupConsistency): void => {
      if (seconds <= 0) return;
      const t = setInterval(() => {
        if (this.options.shouldRun && !this.options.shouldRun()) return;
        void this.runMarker(consistency).catch((err) => this.log.error({ err }, 'group marker failed'));
      }, seconds * 1000);
      t.unref();
      this.timers.push(t);
    };
    every(crashIntervalSeconds, 'crash');
    every(appIntervalSeconds, 'app');
  }

  async stop(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    await this.chain;
  }

  private async barrier(consistency: GroupConsistency): Promise<GroupMarkerResult> {
    const started = Date.now();
    const members = this.members;
    const markerId = groupMarkerId(started, ++this.counter, this.nonce);
    const timeoutMs =
      (this.options.prepareTimeoutMs ?? 2_000) +
      (consistency === 'app' ? (this.options.freezeAllowanceMs ?? 60_000) : 0);
    const command: PrepareCommand = { group: this.group, markerId, consistency, holdMs: timeoutMs };
    const answers = new Map<string, PrepareAnswer>();
    let timer: NodeJS.Timeout | undefined;
    const deadline = new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)));
    let refusedEarly!: () => void;
    const anyRefusal = new Promise<void>((r) => (refusedEarly = r));
    const all = Promise.all(
      members.map(async (m) => {
        let a: PrepareAnswer;
        try {
          a = await m.prepare(command);
        } catch (err) {
          a = { machine: m.machine, markerId, prepared: false, reason: ensureError(err).message };
        }
        answers.set(m.machine, a);
        if (!a.prepared) refusedEarly();
      }),
    );
    await Promise.race([all, deadline, anyRefusal]);
    clearTimeout(timer);
    // Decided once; answers arriving later do not change it.
    const snapshot = new Map(answers);
    const slow = members.filter((m) => !snapshot.has(m.machine)).map((m) => m.machine);
    const refused = [...snapshot.values()]
      .filter((a) => !a.prepared)
      .map((a) => ({ machine: a.machine, reason: a.reason ?? 'not prepared' }));
    const unfrozen =
      consistency === 'app'
        ? [...snapshot.values()].filter((a) => a.prepared && a.frozen !== true).map((a) => a.machine)
        : [];
    const commit = members.length > 0 && slow.length === 0 && refused.length === 0;
    const time = Date.now();
    const effective: GroupConsistency = consistency === 'app' && unfrozen.length === 0 ? 'app' : 'crash';
    const decision: Decision = {
      group: this.group,
      markerId,
      decision: commit ? 'commit' : 'abort',
      time,
      tag: groupMarkerTag(this.group, effective),
    };
    const barrierMs = time - started;
    // Members that answer late get the same abort through their link (their hold also expires).
    await Promise.all(
      members.map((m) =>
        m.decide(decision).catch((err) => {
          this.log.warn(
            { member: m.machine, marker: markerId, err: ensureError(err).message },
            'could not deliver the group decision; the member lets writes go when its hold expires',
          );
          return undefined;
        }),
      ),
    );
    const result: GroupMarkerResult = {
      group: this.group,
      markerId,
      consistency: effective,
      decision: decision.decision,
      time,
      slow,
      refused,
      unfrozen,
      barrierMs,
    };
    this.lastResult = result;
    if (commit) {
      this.log.info(
        { marker: markerId, consistency: effective, members: members.length, barrierMs },
        'group marker committed',
      );
      this.emit('committed', result);
    } else {
      const who = [
        ...slow.map((m) => `${m} did not answer prepare within ${timeoutMs} ms`),
        ...refused.map((r) => `${r.machine} could not prepare (${r.reason})`),
      ];
      const message =
        members.length === 0
          ? `group ${this.group} has no members`
          : `group marker ${markerId} aborted: ${who.join('; ')}`;
      this.log.warn({ marker: markerId, slow, refused }, message);
      this.emit('aborted', { ...result, message });
    }
    return result;
  }
}
