import { EventEmitter } from 'node:events';
import type { Logger } from 'pino';
import type { HookResult, MachineAgent } from '../mobility/agent';
import { ensureError } from '../../shared/errors';
import { createLogger } from '../../shared/logger';
import type { Decision, DecisionOutcome, PrepareAnswer, PrepareCommand } from './protocol';
import { agentWriteHold, type WriteHold } from './write-hold';

export interface GroupParticipantOptions {
  /** App-consistent group markers run these around the barrier (freeze before holding, thaw after). */
  freezeCommand?: string;
  thawCommand?: string;
  logger?: Logger;
  /** For tests: a WriteHold other than the agent's own. */
  hold?: WriteHold;
}

interface Held {
  markerId: string;
  frozen: boolean | undefined;
  timer: NodeJS.Timeout;
  released: boolean;
  settle: () => void;
  done: Promise<void>;
}

/**
 * A machine's side of the group barrier. prepare: (freeze hook, for app-consistent markers) →
 * hold every disk's new writes and drain the ones in flight → answer. decide: commit cuts every
 * disk at the group marker and lets writes go; abort only lets writes go. The hold ends by
 * itself after the command's holdMs, so a lost coordinator never stalls the machine, and a
 * commit that arrives after that is refused (the member then lacks the marker, so no group point
 * forms from it). Events: 'held' ({markerId}), 'cut' (DecisionOutcome), 'released' ({markerId,
 * reason}).
 */
export class GroupParticipant extends EventEmitter {
  readonly machine: string;
  private readonly log: Logger;
  private writeHold: WriteHold | undefined;
  private held: Held | undefined;
  private chain: Promise<unknown> = Promise.resolve();
  /** Markers this member already answered: a repeated prepare is answered, not re-run. */
  private readonly answered = new Map<string, PrepareAnswer>();

  constructor(
    readonly agent: MachineAgent,
    private readonly options: GroupParticipantOptions = {},
  ) {
    super();
    this.machine = agent.machine;
    this.log = (options.logger ?? createLogger('group')).child({ machine: this.machine });
    this.writeHold = options.hold;
  }

  private get gate(): WriteHold {
    this.writeHold ??= agentWriteHold(this.agent);
    return this.writeHold;
  }

  /** Phase 1. Markers are taken one at a time; a prepare waits for the previous hold to end. */
  prepare(command: PrepareCommand): Promise<PrepareAnswer> {
    const received = Date.now();
    const run = this.chain.then(() => this.doPrepare(command, received));
    this.chain = run.then(
      () => this.held?.done,
      () => undefined,
    );
    return run;
  }

  private async doPrepare(command: PrepareCommand, received: number): Promise<PrepareAnswer> {
    const { markerId } = command;
    const seen = this.answered.get(markerId);
    if (seen) return seen;
    const answer = (prepared: boolean, extra: Partial<PrepareAnswer> = {}): PrepareAnswer => {
      const a = { machine: this.machine, markerId, prepared, ...extra };
      this.answered.set(markerId, a);
      if (this.answered.size > 64) this.answered.delete(this.answered.keys().next().value as string);
      return a;
    };
    let gate: WriteHold;
    try {
      gate = this.gate;
    } catch (err) {
      return answer(false, { reason: ensureError(err).message });
    }
    const early = gate.notReady();
    if (early) return answer(false, { reason: early });
    let frozen: boolean | undefined;
    if (command.consistency === 'app' && this.options.freezeCommand) {
      const r: HookResult | undefined = await this.agent.runHook('freeze', this.options.freezeCommand);
      frozen = r?.ok ?? false;
    } else if (command.consistency === 'app') {
      frozen = false;
    }
    const remaining = command.holdMs - (Date.now() - received);
    if (remaining <= 0) {
      await this.thaw(frozen);
      return answer(false, { frozen, reason: 'the freeze hook took the whole hold budget' });
    }
    let settle!: () => void;
    const done = new Promise<void>((r) => (settle = r));
    const held: Held = {
      markerId,
      frozen,
      released: false,
      settle,
      done,
      timer: setTimeout(
        () => void this.release(held, `held writes for ${command.holdMs} ms without a decision`),
        remaining,
      ),
    };
    this.held = held;
    try {
      await gate.hold();
    } catch (err) {
      await this.release(held, `could not hold writes: ${ensureError(err).message}`);
      return answer(false, { frozen, reason: ensureError(err).message });
    }
    if (held.released) return answer(false, { frozen, reason: 'the hold ended before the disks drained' });
    const late = gate.notReady();
    if (late) {
      await this.release(held, late);
      return answer(false, { frozen, reason: late });
    }
    this.emit('held', { markerId });
    return answer(true, frozen === undefined ? {} : { frozen });
  }

  /** Phase 2. A decision for a marker this member no longer holds changes nothing. */
  async decide(decision: Decision): Promise<DecisionOutcome> {
    const held = this.held;
    const outcome = (cut: boolean, extra: Partial<DecisionOutcome> = {}): DecisionOutcome => ({
      machine: this.machine,
      markerId: decision.markerId,
      cut,
      ...extra,
    });
    if (!held || held.markerId !== decision.markerId || held.released) {
      if (decision.decision === 'abort' && !this.answered.has(decision.markerId)) {
        // Aborted before this member saw prepare: a prepare arriving now is refused at once.
        this.answered.set(decision.markerId, {
          machine: this.machine,
          markerId: decision.markerId,
          prepared: false,
          reason: 'aborted before prepare arrived',
        });
      }
      if (decision.decision === 'commit') {
        this.log.warn(
          { marker: decision.markerId },
          'group commit arrived after this member let writes go; not cutting',
        );
        return outcome(false, {
          reason: 'not holding writes for this marker (hold expired or never prepared)',
        });
      }
      return outcome(false, { reason: 'aborted' });
    }
    if (decision.decision === 'abort') {
      await this.release(held, 'aborted by the coordinator');
      return outcome(false, { reason: 'aborted' });
    }
    clearTimeout(held.timer);
    let seqs: Record<string, number> | undefined;
    let failure: string | undefined;
    const cutting = this.gate.cut({
      id: decision.markerId,
      kind: 'group',
      time: decision.time,
      tag: decision.tag,
    });
    // The cut records are in every segment once cut() has been called; writes may go now.
    await this.release(
      held,
      'committed',
      cutting.then(
        (s) => {
          seqs = s;
        },
        (err) => {
          failure = ensureError(err).message;
        },
      ),
    );
    if (failure !== undefined) {
      this.log.error({ marker: decision.markerId, err: failure }, 'group marker cut failed');
      return outcome(false, { reason: failure });
    }
    const result = outcome(true, { seqs });
    this.log.info({ marker: decision.markerId, seqs }, 'group marker cut');
    this.emit('cut', result);
    return result;
  }

  private async release(held: Held, reason: string, after?: Promise<void>): Promise<void> {
    if (held.released) return;
    held.released = true;
    clearTimeout(held.timer);
    this.gate.release();
    if (this.held === held) this.held = undefined;
    this.emit('released', { markerId: held.markerId, reason });
    if (reason !== 'committed')
      this.log.info({ marker: held.markerId, reason }, 'group marker hold ended without a cut');
    await after;
    await this.thaw(held.frozen);
    held.settle();
  }

  private async thaw(frozen: boolean | undefined): Promise<void> {
    if (frozen === undefined || !this.options.freezeCommand) return;
    await this.agent.runHook('thaw', this.options.thawCommand);
  }
}
