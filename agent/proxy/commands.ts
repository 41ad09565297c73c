import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Logger } from 'pino';
import { SETTING, type Settings } from '../../shared/config';
import { ConflictError, LifeboatError, NotFoundError, ValidationError } from '../../shared/errors';
import {
  acknowledgeCommand,
  pendingCommands,
  readCommand,
  type AgentCommand,
} from '../../shared/failover/commands';
import { FailoverTables, type FailoverTableName } from '../../shared/failover/tables';
import { validateName } from '../../shared/names';
import {
  pendingResyncCommands,
  readResyncCommand,
  reportResyncProgress,
  type AgentResyncProgress,
  type ResyncCommand,
} from '../../shared/reprotect/resync';
import { isNotFound } from '../../shared/replication';
import { StorageClients } from '../../shared/storage';
import type { MachineAuthenticator } from './auth';

// Agent commands through the proxy (docs/failover.md, "Planned failover and the agent command
// contract"); the cloud writes them to table `commands` of ReplicaStorage:
//   GET  /v1/machines/{m}/commands            → 200 { value: AgentCommand[] }  (pending, oldest first)
//   POST /v1/machines/{m}/commands/{id}/ack   ← { state: "done" | "failed", message? } → 204
//   POST /v1/machines/{m}/commands/{id}/progress ← { progress: { [disk]: { comparedBytes, shippedBytes } } } → 204
//        (resync commands only: docs/reprotect.md, "The command")
// Same credential rules as segments: 401 without a valid credential, 403 for another machine.
// The answer to GET holds both kinds of command, told apart by `type` ('quiesce', 'resync').

export type CommandAck = { state: 'done' | 'failed'; message?: string };

/** A command as the proxy serves it: planned failover's quiesce, or a cloud-requested resync. */
export type ServedCommand = AgentCommand | ResyncCommand;

export type ResyncProgressReport = Record<string, AgentResyncProgress>;

/** Where the proxy reads and answers a machine's commands. */
export interface CommandStore {
  pending(machine: string): Promise<ServedCommand[]>;
  read(machine: string, commandId: string): Promise<ServedCommand | undefined>;
  acknowledge(machine: string, commandId: string, ack: CommandAck): Promise<void>;
  /** Records a resync command's progress (bytes compared and shipped per disk). */
  reportProgress(machine: string, commandId: string, progress: ResyncProgressReport): Promise<void>;
}

/**
 * The failover tables without creating them: the proxy's identity may read and update rows of
 * `commands`, not create tables (the deployment makes the table; locally the cloud side does on
 * first use, and until then there are no commands).
 */
class ExistingFailoverTables extends FailoverTables {
  constructor(private readonly replica: StorageClients) {
    super(replica);
  }

  override get(name: FailoverTableName): ReturnType<FailoverTables['get']> {
    return Promise.resolve(this.replica.table(name));
  }
}

function storeUnavailable(err: unknown): LifeboatError {
  return new LifeboatError(
    'CommandStoreUnavailable',
    `The proxy could not reach the commands table (${(err as Error).message.split('\n')[0]}); try again shortly.`,
    { status: 503, cause: err },
  );
}

/** The commands table of ReplicaStorage, through the cloud's own functions. */
export class TableCommandStore implements CommandStore {
  private resolved: FailoverTables | undefined;

  constructor(private readonly settings: Settings) {}

  /** Resolved on first use: a proxy whose credentials come from elsewhere may lack ReplicaStorage. */
  private get tables(): FailoverTables {
    return (this.resolved ??= new ExistingFailoverTables(
      new StorageClients(SETTING.replicaStorage, this.settings),
    ));
  }

  async pending(machine: string): Promise<ServedCommand[]> {
    try {
      const [quiesce, resync] = await Promise.all([
        pendingCommands(this.tables, machine),
        pendingResyncCommands(this.tables, machine),
      ]);
      return [...quiesce, ...resync.map(servedResync)].sort((a, b) => a.createdAt.localeCompare(b.createdAt));
    } catch (err) {
      if (isNotFound(err)) return []; // no command was ever issued here
      throw storeUnavailable(err);
    }
  }

  async read(machine: string, commandId: string): Promise<ServedCommand | undefined> {
    try {
      if (commandId.startsWith('resync-')) {
        const resync = await readResyncCommand(this.tables, machine, commandId.slice('resync-'.length));
        if (resync) return resync;
      }
      return await readCommand(this.tables, machine, commandId);
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw storeUnavailable(err);
    }
  }

  async acknowledge(machine: string, commandId: string, ack: CommandAck): Promise<void> {
    try {
      await acknowledgeCommand(this.tables, machine, commandId, ack, new Date());
    } catch (err) {
      if (isNotFound(err))
        throw new NotFoundError(`Machine ${machine} has no command ${commandId}.`, 'command');
      throw storeUnavailable(err);
    }
  }

  async reportProgress(machine: string, commandId: string, progress: ResyncProgressReport): Promise<void> {
    try {
      await reportResyncProgress(this.tables, machine, commandId, { progress }, new Date());
    } catch (err) {
      if (isNotFound(err))
        throw new NotFoundError(`Machine ${machine} has no command ${commandId}.`, 'command');
      throw storeUnavailable(err);
    }
  }
}

/** The agent needs no more than the contract's fields (the progress it reported stays in the table). */
function servedResync(c: ResyncCommand): ResyncCommand {
  const { progress: _progress, ...rest } = c;
  return rest;
}

const COMMAND_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
const MAX_ACK_BYTES = 64 * 1024;
const MAX_MESSAGE_CHARS = 4096;

function validateCommandId(value: string): string {
  if (!COMMAND_ID.test(value)) {
    throw new ValidationError(
      `The command id ${JSON.stringify(value)} is not valid: 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-'.`,
      'command',
      'InvalidName',
    );
  }
  return value;
}

/** An agent's small JSON body, which must be an object; the errors name what was expected. */
function jsonObjectBody(body: Buffer, what: string, example: string, shape: string): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body.toString('utf8'));
  } catch {
    throw new ValidationError(`The ${what} is not JSON; send ${example}.`, 'body');
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new ValidationError(`The ${what} must be a JSON object ${shape}.`, 'body');
  }
  return parsed as Record<string, unknown>;
}

function parseAck(body: Buffer): CommandAck {
  const { state, message, ...rest } = jsonObjectBody(
    body,
    'acknowledgement',
    '{ "state": "done" | "failed", "message"? }',
    '{ "state", "message"? }',
  );
  if (state !== 'done' && state !== 'failed') {
    throw new ValidationError(`state must be "done" or "failed"; got ${JSON.stringify(state)}.`, 'state');
  }
  if (message !== undefined && (typeof message !== 'string' || message.length > MAX_MESSAGE_CHARS)) {
    throw new ValidationError(
      `message must be a string of at most ${MAX_MESSAGE_CHARS} characters.`,
      'message',
    );
  }
  const unknown = Object.keys(rest);
  if (unknown.length > 0) {
    throw new ValidationError(
      `Unknown field ${unknown[0]}; the acknowledgement has state and message.`,
      unknown[0],
    );
  }
  return message === undefined ? { state } : { state, message };
}

function readSmallBody(req: IncomingMessage, max: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let total = 0;
    req.on('data', (c: Buffer) => {
      total += c.length;
      if (total <= max) chunks.push(c);
    });
    req.on('end', () => {
      if (total > max)
        reject(new ValidationError(`The acknowledgement is larger than ${max} bytes.`, 'body'));
      else resolve(Buffer.concat(chunks));
    });
    req.on('error', reject);
  });
}

export interface CommandRouteDeps {
  auth: MachineAuthenticator;
  commands: CommandStore;
  logger: Logger;
  sendJson(res: ServerResponse, status: number, body: unknown): void;
}

async function authorize(deps: CommandRouteDeps, req: IncomingMessage, m: string): Promise<string> {
  const owner = await deps.auth.authenticate(req.headers.authorization);
  const machine = validateName(m, 'machine');
  if (owner !== machine) {
    throw new LifeboatError(
      'Forbidden',
      `The credential belongs to machine ${owner}; it cannot read or answer the commands of machine ${machine}.`,
      { status: 403, target: 'machine' },
    );
  }
  return machine;
}

/** GET /v1/machines/{m}/commands */
export async function getCommands(
  deps: CommandRouteDeps,
  req: IncomingMessage,
  res: ServerResponse,
  m: string,
): Promise<void> {
  const machine = await authorize(deps, req, m);
  deps.sendJson(res, 200, { value: await deps.commands.pending(machine) });
}

/**
 * What an agent's answer about one command needs first: its credential checked for the machine,
 * the command id and the small body validated, and the command found (404 otherwise).
 */
async function commandRequest<T>(
  deps: CommandRouteDeps,
  req: IncomingMessage,
  m: string,
  id: string,
  parse: (body: Buffer) => T,
) {
  const machine = await authorize(deps, req, m);
  const commandId = validateCommandId(id);
  const body = parse(await readSmallBody(req, MAX_ACK_BYTES));
  const command = await deps.commands.read(machine, commandId);
  if (!command) throw new NotFoundError(`Machine ${machine} has no command ${commandId}.`, 'command');
  return { machine, commandId, body, command };
}

/**
 * POST /v1/machines/{m}/commands/{id}/ack. Repeating the same answer is harmless (204); a
 * command already closed otherwise (the cloud superseded it, or another answer came first) is 409.
 */
export async function ackCommand(
  deps: CommandRouteDeps,
  req: IncomingMessage,
  res: ServerResponse,
  m: string,
  id: string,
): Promise<void> {
  const { machine, commandId, body: ack, command } = await commandRequest(deps, req, m, id, parseAck);
  if (command.state !== 'pending' && command.state !== ack.state) {
    throw new ConflictError(
      `Command ${commandId} of machine ${machine} is already ${command.state}${command.message ? ` (${command.message})` : ''}; it cannot become ${ack.state}.`,
      'command',
      'CommandClosed',
    );
  }
  if (command.state === 'pending') await deps.commands.acknowledge(machine, commandId, ack);
  deps.logger.info(
    { machine, command: commandId, type: command.type, state: ack.state, message: ack.message },
    'agent command acknowledged',
  );
  res.writeHead(204);
  res.end();
}

const MAX_PROGRESS_DISKS = 64;

function parseProgress(body: Buffer): ResyncProgressReport {
  const report: { progress?: unknown } = jsonObjectBody(
    body,
    'progress report',
    '{ "progress": { "<disk>": { "comparedBytes", "shippedBytes" } } }',
    '{ "progress": { … } }',
  );
  const unknown = Object.keys(report).filter((k) => k !== 'progress');
  if (unknown.length > 0) {
    throw new ValidationError(
      `Unknown field ${unknown[0]}; the progress report has only "progress".`,
      unknown[0],
    );
  }
  const progress = report.progress;
  if (typeof progress !== 'object' || progress === null || Array.isArray(progress)) {
    throw new ValidationError(
      'progress must be an object of disk → { comparedBytes, shippedBytes }.',
      'progress',
    );
  }
  const entries = Object.entries(progress as Record<string, unknown>);
  if (entries.length === 0 || entries.length > MAX_PROGRESS_DISKS) {
    throw new ValidationError(`progress must name 1 to ${MAX_PROGRESS_DISKS} disks.`, 'progress');
  }
  const out: ResyncProgressReport = {};
  for (const [disk, value] of entries) {
    validateName(disk, 'disk');
    const v = value as Record<string, unknown> | null;
    const bytes = (k: string): number => {
      const n = v?.[k];
      if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
        throw new ValidationError(
          `progress.${disk}.${k} must be a non-negative integer.`,
          `progress.${disk}.${k}`,
        );
      }
      return n;
    };
    if (typeof v !== 'object' || v === null || Array.isArray(v)) {
      throw new ValidationError(
        `progress.${disk} must be an object { comparedBytes, shippedBytes }.`,
        `progress.${disk}`,
      );
    }
    out[disk] = { comparedBytes: bytes('comparedBytes'), shippedBytes: bytes('shippedBytes') };
  }
  return out;
}

/**
 * POST /v1/machines/{m}/commands/{id}/progress: a resync command's progress, written to the
 * command row (`reportResyncProgress`); the cloud's resync operation shows it. 409 once the
 * command is closed, 400 for a command that is not a resync.
 */
export async function reportCommandProgress(
  deps: CommandRouteDeps,
  req: IncomingMessage,
  res: ServerResponse,
  m: string,
  id: string,
): Promise<void> {
  const {
    machine,
    commandId,
    body: progress,
    command,
  } = await commandRequest(deps, req, m, id, parseProgress);
  if (command.type !== 'resync') {
    throw new ValidationError(
      `Command ${commandId} is a ${command.type} command; only resync commands take progress reports.`,
      'command',
    );
  }
  if (command.state !== 'pending') {
    throw new ConflictError(
      `Command ${commandId} of machine ${machine} is already ${command.state}; progress is no longer taken.`,
      'command',
      'CommandClosed',
    );
  }
  await deps.commands.reportProgress(machine, commandId, progress);
  deps.logger.debug({ machine, command: commandId, progress }, 'resync progress reported');
  res.writeHead(204);
  res.end();
}
