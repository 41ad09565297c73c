import http from 'node:http';
import https from 'node:https';
import type { Logger } from 'pino';
import { LifeboatError, ensureError } from '../../shared/errors';
import type { AgentCommand as QuiesceCommand } from '../../shared/failover/commands';
import type { AgentResyncProgress, ResyncCommand } from '../../shared/reprotect/resync';
import { ProxyUnavailableError, type ProxyClientOptions } from './shipper';

// The agent's side of the command channel (docs/failover.md, "Planned failover and the agent
// command contract"): poll the proxy for the machine's pending commands, carry each out once,
// and answer it.
//   GET  /v1/machines/{m}/commands            → { value: AgentCommand[] }
//   POST /v1/machines/{m}/commands/{id}/ack   ← { state: "done" | "failed", message? } → 204
//   POST /v1/machines/{m}/commands/{id}/progress ← { progress: { [disk]: { comparedBytes, shippedBytes } } } (resync)

/** What the proxy serves: planned failover's `quiesce`, or a cloud-requested `resync`. */
export type AgentCommand = QuiesceCommand | ResyncCommand;
export type { QuiesceCommand, ResyncCommand, AgentResyncProgress };

export interface CommandResult {
  state: 'done' | 'failed';
  message?: string;
}

/** Where the agent reads its commands and answers them. */
export interface CommandChannel {
  pending(): Promise<AgentCommand[]>;
  acknowledge(commandId: string, result: CommandResult): Promise<void>;
  /** A resync command's progress per disk (best effort; absent: progress is not reported). */
  reportProgress?(commandId: string, progress: Record<string, AgentResyncProgress>): Promise<void>;
  close(): void;
}

/** The command was closed meanwhile (404, 409): answering again is pointless. */
export class CommandClosedError extends LifeboatError {
  constructor(message: string) {
    super('CommandClosed', message, { status: 409, target: 'command' });
  }
}

function errorMessage(body: Buffer): string {
  try {
    const parsed = JSON.parse(body.toString('utf8')) as { error?: { message?: string } };
    if (parsed.error?.message) return parsed.error.message;
  } catch {
    // not JSON
  }
  return body.toString('utf8').slice(0, 200) || '(no message)';
}

/** The proxy's command routes, with the machine's credential (as for segments). */
export class ProxyCommandClient implements CommandChannel {
  private readonly url: URL;
  private readonly agent: http.Agent;

  constructor(
    private readonly options: ProxyClientOptions,
    private readonly machine: string,
  ) {
    this.url = new URL(options.url);
    this.agent =
      this.url.protocol === 'https:'
        ? new https.Agent({ keepAlive: true, maxSockets: 2, ca: options.ca })
        : new http.Agent({ keepAlive: true, maxSockets: 2 });
  }

  async pending(): Promise<AgentCommand[]> {
    const path = `/v1/machines/${this.machine}/commands`;
    const res = await this.request('GET', path);
    if (res.status !== 200) throw this.failure(res, `GET ${path}`);
    const body = JSON.parse(res.body.toString('utf8')) as { value?: unknown };
    if (!Array.isArray(body.value))
      throw new ProxyUnavailableError(`The proxy answered GET ${path} without a "value" list.`);
    return body.value as AgentCommand[];
  }

  async acknowledge(commandId: string, result: CommandResult): Promise<void> {
    const path = `/v1/machines/${this.machine}/commands/${encodeURIComponent(commandId)}/ack`;
    const res = await this.request('POST', path, Buffer.from(JSON.stringify(result)));
    if (res.status === 204 || res.status === 200) return;
    if (res.status === 404 || res.status === 409) {
      throw new CommandClosedError(
        `The proxy answered ${res.status} to POST ${path}: ${errorMessage(res.body)}`,
      );
    }
    throw this.failure(res, `POST ${path}`);
  }

  async reportProgress(commandId: string, progress: Record<string, AgentResyncProgress>): Promise<void> {
    const path = `/v1/machines/${this.machine}/commands/${encodeURIComponent(commandId)}/progress`;
    const res = await this.request('POST', path, Buffer.from(JSON.stringify({ progress })));
    if (res.status === 204 || res.status === 200) return;
    if (res.status === 404 || res.status === 409) {
      throw new CommandClosedError(
        `The proxy answered ${res.status} to POST ${path}: ${errorMessage(res.body)}`,
      );
    }
    throw this.failure(res, `POST ${path}`);
  }

  close(): void {
    this.agent.destroy();
  }

  private failure(res: { status: number; body: Buffer }, what: string): ProxyUnavailableError {
    return new ProxyUnavailableError(
      `The proxy answered ${res.status} to ${what}: ${errorMessage(res.body)}`,
      undefined,
      res.status,
    );
  }

  private request(method: string, path: string, body?: Buffer): Promise<{ status: number; body: Buffer }> {
    const lib = this.url.protocol === 'https:' ? https : http;
    const timeout = this.options.timeoutMs ?? 30_000;
    return new Promise((resolve, reject) => {
      const req = lib.request(
        new URL(path, this.url),
        {
          method,
          agent: this.agent,
          timeout,
          headers: {
            authorization: `Bearer ${this.options.credential}`,
            ...(body ? { 'content-type': 'application/json', 'content-length': String(body.length) } : {}),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
          res.on('error', (err) =>
            reject(
              new ProxyUnavailableError(
                `The proxy at ${this.url.origin} broke off the answer (${err.message}).`,
              ),
            ),
          );
        },
      );
      req.on('timeout', () => req.destroy(new Error(`no answer within ${timeout} ms`)));
      req.on('error', (err) =>
        reject(
          new ProxyUnavailableError(
            `The proxy at ${this.url.origin} cannot be reached for commands (${err.message}).`,
          ),
        ),
      );
      req.end(body);
    });
  }
}

export interface CommandPollerOptions {
  channel: CommandChannel;
  /**
   * Carries a command out; resolves with the answer to send (never meant to throw), or undefined
   * to leave the command pending unanswered (the agent is stopping: the next start carries it on).
   */
  handle(command: AgentCommand): Promise<CommandResult | undefined>;
  /** Poll interval (default 3 s). */
  intervalMs?: number;
  /** poke() polls at once only if the last poll is at least this old (default 1 s). */
  minGapMs?: number;
  logger: Logger;
}

/**
 * Polls for pending commands every few seconds (and on poke(), e.g. after a segment was
 * acknowledged), carries each command out once per process, and answers it; an answer that
 * could not be delivered is resent (not the command re-run) while the command is still pending.
 */
export class CommandPoller {
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private stopped = true;
  private lastPoll = 0;
  private again = false;
  /** Commands carried out by this process, with their answer (resent while still pending). */
  private readonly results = new Map<string, CommandResult>();
  private readonly active = new Set<string>();
  private readonly log: Logger;
  lastError: string | undefined;

  constructor(private readonly options: CommandPollerOptions) {
    this.log = options.logger;
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.schedule(0);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    await this.running;
  }

  /** Polls soon (cheap: at most once per minGapMs). */
  poke(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    const gap = this.options.minGapMs ?? 1000;
    if (Date.now() - this.lastPoll >= gap) this.schedule(0);
  }

  /** Polls now and resolves once the commands found are carried out and answered (tests, tools). */
  async pollOnce(): Promise<void> {
    while (this.running) await this.running;
    this.running = this.poll();
    try {
      await this.running;
    } finally {
      this.running = undefined;
    }
  }

  private schedule(ms: number): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.stopped || this.running) return;
      this.running = this.poll().finally(() => {
        this.running = undefined;
        if (this.stopped) return;
        const next = this.again ? 0 : (this.options.intervalMs ?? 3000);
        this.again = false;
        this.schedule(next);
      });
    }, ms);
    this.timer.unref();
  }

  private async poll(): Promise<void> {
    this.lastPoll = Date.now();
    let commands: AgentCommand[];
    try {
      commands = await this.options.channel.pending();
      this.lastError = undefined;
    } catch (err) {
      this.lastError = ensureError(err).message;
      this.log.debug({ err }, 'command poll failed');
      return;
    }
    for (const command of commands) {
      if (this.stopped) return;
      if (command.state !== 'pending' || this.active.has(command.id)) continue;
      let result = this.results.get(command.id);
      if (!result) {
        this.active.add(command.id);
        this.log.info(
          command.type === 'resync'
            ? {
                command: command.id,
                type: command.type,
                operationId: command.operationId,
                disks: command.disks,
              }
            : {
                command: command.id,
                type: command.type,
                markerId: command.markerId,
                failoverId: command.failoverId,
              },
          'agent command received',
        );
        try {
          result = await this.options.handle(command);
        } catch (err) {
          result = { state: 'failed', message: ensureError(err).message };
        } finally {
          this.active.delete(command.id);
        }
        if (!result) {
          this.log.info({ command: command.id }, 'agent command left pending (the agent is stopping)');
          continue;
        }
        this.results.set(command.id, result);
        (result.state === 'done' ? this.log.info : this.log.error).call(
          this.log,
          { command: command.id, ...result },
          `agent command ${result.state}`,
        );
      }
      try {
        await this.options.channel.acknowledge(command.id, result);
      } catch (err) {
        if (err instanceof CommandClosedError) {
          this.log.warn({ command: command.id }, err.message);
          continue;
        }
        this.lastError = ensureError(err).message;
        this.log.warn(
          { command: command.id, err },
          'the answer to a command was not delivered; resending at the next poll',
        );
      }
    }
  }
}
