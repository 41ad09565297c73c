import { EventEmitter } from 'node:events';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import https from 'node:https';
import type { Logger } from 'pino';
import { ensureError, LifeboatError, NotFoundError, ValidationError } from '../../shared/errors';
import { createLogger } from '../../shared/logger';
import { validateName } from '../../shared/names';
import type { MemberLink } from './coordinator';
import type { GroupParticipant } from './participant';
import {
  parseDecision,
  parsePrepare,
  parsePrepareAnswer,
  type Decision,
  type DecisionOutcome,
  type PrepareAnswer,
  type PrepareCommand,
} from './protocol';

/*
 * The barrier over HTTP. Members call the coordinator (never the other way round), with their
 * machine credential, so the only listening port is the proxy's, the one agents already reach:
 *
 *   GET  /v1/groups/{g}/members/{m}/commands?waitMs=N      long poll: 200 PrepareCommand | 204
 *   POST /v1/groups/{g}/members/{m}/markers/{id}/prepared   PrepareAnswer → 200 Decision (held until decided)
 *   POST /v1/groups/{g}/members/{m}/markers/{id}/outcome    DecisionOutcome → 204
 *
 * A prepare therefore costs one response on an open poll, and the decision one response on the
 * open POST: two one-way network delays per member, no connection set-up.
 */

const MAX_WAIT_MS = 30_000;

interface Pending {
  command: PrepareCommand;
  delivered: boolean;
  answer?: (a: PrepareAnswer) => void;
  decision?: Decision;
  decided?: (d: Decision) => void;
}

interface Mailbox {
  pending: Pending | undefined;
  poll: ((c: PrepareCommand | undefined) => void) | undefined;
  lastSeen: number;
}

export type Authorize = (authorization: string | undefined, machine: string) => Promise<void>;

/**
 * The coordinator's end of the HTTP transport (mounted on the proxy's server). `link(machine)`
 * gives the GroupCoordinator a MemberLink whose prepare waits for that member to poll and answer.
 * Emits 'outcome' (DecisionOutcome) when a member reports what it did with a commit.
 */
export class BarrierHub extends EventEmitter {
  private readonly boxes = new Map<string, Mailbox>();
  private readonly log: Logger;

  constructor(
    readonly group: string,
    private readonly authorize: Authorize,
    logger?: Logger,
  ) {
    super();
    validateName(group, 'group');
    this.log = (logger ?? createLogger('group')).child({ group });
  }

  private box(machine: string): Mailbox {
    let b = this.boxes.get(machine);
    if (!b) this.boxes.set(machine, (b = { pending: undefined, poll: undefined, lastSeen: 0 }));
    return b;
  }

  /** When each member last polled (ms since 1970; 0 = never): the group's health. */
  lastSeen(): Record<string, number> {
    return Object.fromEntries([...this.boxes].map(([m, b]) => [m, b.lastSeen]));
  }

  link(machine: string): MemberLink {
    validateName(machine, 'machine');
    return {
      machine,
      prepare: (command) =>
        new Promise<PrepareAnswer>((resolve) => {
          const b = this.box(machine);
          const p: Pending = { command, delivered: false, answer: resolve };
          b.pending = p;
          if (b.poll) {
            const poll = b.poll;
            b.poll = undefined;
            p.delivered = true;
            poll(command);
          }
        }),
      decide: (decision) =>
        new Promise<DecisionOutcome | undefined>((resolve) => {
          const b = this.box(machine);
          const p = b.pending;
          if (!p || p.command.markerId !== decision.markerId) return resolve(undefined);
          p.decision = decision;
          if (!p.delivered || !p.decided) {
            // Never delivered or never answered: nothing to tell; a late answer gets this decision.
            if (!p.delivered) b.pending = undefined;
            return resolve(undefined);
          }
          // Delivered on the member's open POST; its outcome comes later, as an 'outcome' event.
          p.decided(decision);
          resolve(undefined);
        }),
    };
  }

  /** Serves a group route; false when the request is not one (the proxy then routes it). */
  async handle(req: IncomingMessage, res: ServerResponse): Promise<boolean> {
    const url = new URL(req.url ?? '/', 'http://proxy');
    const parts = url.pathname.split('/').slice(1);
    if (parts[0] !== 'v1' || parts[1] !== 'groups' || parts[2] !== this.group || parts[3] !== 'members')
      return false;
    try {
      const machine = validateName(parts[4], 'machine');
      await this.authorize(req.headers.authorization, machine);
      const b = this.box(machine);
      b.lastSeen = Date.now();
      if (req.method === 'GET' && parts.length === 6 && parts[5] === 'commands') {
        const waitMs = Math.min(
          MAX_WAIT_MS,
          Math.max(0, Number(url.searchParams.get('waitMs') ?? 25_000) || 0),
        );
        const command = await this.nextCommand(b, waitMs, res);
        if (!command) res.writeHead(204).end();
        else send(res, 200, command);
        return true;
      }
      if (req.method === 'POST' && parts.length === 8 && parts[5] === 'markers') {
        const markerId = parts[6];
        const body = await readJson(req);
        if (parts[7] === 'prepared') {
          const answer = parsePrepareAnswer(body, machine, markerId);
          send(res, 200, await this.onPrepared(b, answer));
          return true;
        }
        if (parts[7] === 'outcome') {
          const p = b.pending;
          if (p && p.command.markerId === markerId) b.pending = undefined;
          this.emit('outcome', { ...(body as DecisionOutcome), machine, markerId });
          res.writeHead(204).end();
          return true;
        }
      }
      throw new NotFoundError(`No group route ${req.method} ${url.pathname}.`);
    } catch (err) {
      const e =
        err instanceof LifeboatError ? err : new LifeboatError('InternalError', ensureError(err).message);
      if (e.status >= 500) this.log.error({ err }, 'group route failed');
      if (!res.headersSent)
        send(res, e.status, {
          error: { code: e.code, message: e.message, ...(e.target ? { target: e.target } : {}) },
        });
      return true;
    }
  }

  private nextCommand(b: Mailbox, waitMs: number, res: ServerResponse): Promise<PrepareCommand | undefined> {
    const p = b.pending;
    if (p && !p.delivered && !p.decision) {
      p.delivered = true;
      return Promise.resolve(p.command);
    }
    if (waitMs === 0) return Promise.resolve(undefined);
    return new Promise((resolve) => {
      b.poll?.(undefined);
      let timer: NodeJS.Timeout | undefined = undefined;
      const done = (c: PrepareCommand | undefined): void => {
        clearTimeout(timer);
        if (b.poll === done) b.poll = undefined;
        resolve(c);
      };
      timer = setTimeout(() => done(undefined), waitMs);
      b.poll = done;
      res.on('close', () => {
        if (b.poll === done) {
          b.poll = undefined;
          clearTimeout(timer);
        }
      });
    });
  }

  private onPrepared(b: Mailbox, answer: PrepareAnswer): Promise<Decision> {
    const p = b.pending;
    if (!p || p.command.markerId !== answer.markerId) {
      // Unknown or long decided: the only safe answer is abort.
      return Promise.resolve({
        group: this.group,
        markerId: answer.markerId,
        decision: 'abort',
        time: Date.now(),
        tag: '',
      });
    }
    if (p.decision) return Promise.resolve(p.decision);
    return new Promise<Decision>((resolve) => {
      p.decided = resolve;
      p.answer?.(answer);
    });
  }

  /** Ends every open poll (at shutdown). */
  close(): void {
    for (const b of this.boxes.values()) b.poll?.(undefined);
  }
}

function send(res: ServerResponse, status: number, body: unknown): void {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

async function readJson(req: IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req) {
    size += (c as Buffer).length;
    if (size > 64 * 1024) throw new ValidationError('The request body is larger than 64 KiB.', 'body');
    chunks.push(c as Buffer);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  try {
    return text ? JSON.parse(text) : {};
  } catch {
    throw new ValidationError('The request body is not valid JSON.', 'body');
  }
}

export interface GroupMemberClientOptions {
  /** The coordinator's base URL (the proxy's, e.g. https://proxy.site:9443). */
  url: string;
  group: string;
  credential: string;
  /** Long-poll length (default 25 s). */
  pollMs?: number;
  logger?: Logger;
  /** PEM certificate(s) to trust for an https coordinator (the proxy's self-signed certificate). */
  ca?: string | Buffer;
}

interface Reply {
  status: number;
  text(): Promise<string>;
  json(): Promise<unknown>;
}

/** The member's end: polls the coordinator, runs the participant, posts answers and outcomes. */
export class GroupMemberClient {
  private running = false;
  private loop: Promise<void> | undefined;
  private readonly abort = new AbortController();
  private readonly log: Logger;
  private readonly base: string;
  /** Kept-alive connections: a prepare and its answer cost no connection set-up. */
  private readonly connections: http.Agent;

  constructor(
    private readonly participant: GroupParticipant,
    private readonly options: GroupMemberClientOptions,
  ) {
    validateName(options.group, 'group');
    this.base = `${options.url.replace(/\/$/, '')}/v1/groups/${options.group}/members/${participant.machine}`;
    this.connections = this.base.startsWith('https:')
      ? new https.Agent({ keepAlive: true, ca: options.ca })
      : new http.Agent({ keepAlive: true });
    this.log = (options.logger ?? createLogger('group')).child({
      machine: participant.machine,
      group: options.group,
    });
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.abort.abort();
    await this.loop;
    this.connections.destroy();
  }

  private call(method: string, path: string, body?: unknown): Promise<Reply> {
    const url = new URL(`${this.base}${path}`);
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise<Reply>((resolve, reject) => {
      const req = (url.protocol === 'https:' ? https : http).request(
        url,
        {
          method,
          agent: this.connections,
          signal: this.abort.signal,
          headers: {
            authorization: `Bearer ${this.options.credential}`,
            ...(payload ? { 'content-type': 'application/json', 'content-length': payload.length } : {}),
          },
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', reject);
          res.on('end', () => {
            const text = Buffer.concat(chunks).toString('utf8');
            resolve({
              status: res.statusCode ?? 0,
              text: async () => text,
              json: async () => JSON.parse(text) as unknown,
            });
          });
        },
      );
      req.on('error', reject);
      req.end(payload);
    });
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (this.running) {
      try {
        const res = await this.call('GET', `/commands?waitMs=${this.options.pollMs ?? 25_000}`);
        if (res.status === 204) {
          failures = 0;
          continue;
        }
        if (res.status !== 200)
          throw new Error(`the coordinator answered ${res.status}: ${await res.text()}`);
        failures = 0;
        const command = parsePrepare(await res.json());
        void this.serve(command);
      } catch (err) {
        if (!this.running) return;
        failures += 1;
        const delay = Math.min(5_000, 100 * 2 ** Math.min(failures, 6));
        this.log.warn(
          { err: ensureError(err).message, delayMs: delay },
          'cannot reach the group coordinator',
        );
        await new Promise((r) => setTimeout(r, delay));
      }
    }
  }

  private async serve(command: PrepareCommand): Promise<void> {
    const answer = await this.participant.prepare(command);
    let decision: Decision;
    try {
      const res = await this.call('POST', `/markers/${command.markerId}/prepared`, answer);
      if (res.status !== 200) throw new Error(`the coordinator answered ${res.status}: ${await res.text()}`);
      decision = parseDecision(await res.json());
    } catch (err) {
      // No decision: abort locally (the hold would also expire by itself).
      decision = {
        group: command.group,
        markerId: command.markerId,
        decision: 'abort',
        time: Date.now(),
        tag: '',
      };
      if (this.running)
        this.log.warn(
          { marker: command.markerId, err: ensureError(err).message },
          'no group decision; letting writes go',
        );
    }
    const outcome = await this.participant.decide(decision);
    if (decision.decision === 'commit')
      await this.call('POST', `/markers/${command.markerId}/outcome`, outcome).catch(() => undefined);
  }
}
