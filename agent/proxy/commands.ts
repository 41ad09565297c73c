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
import { isNotFound } from '../../shared/replication';
import { StorageClients } from '../../shared/storage';
import type { MachineAuthenticator } from './auth';

// Agent commands through the proxy (docs/failover.md, "Planned failover and the agent command
// contract"); the cloud writes them to table `commands` of ReplicaStorage:
//   GET  /v1/machines/{m}/commands            → 200 { value: AgentCommand[] }  (pending, oldest first)
//   POST /v1/machines/{m}/commands/{id}/ack   ← { state: "done" | "failed", message? } → 204
// Same credential rules as segments: 401 without a valid credential, 403 for another machine.

export type CommandAck = { state: 'done' | 'failed'; message?: string };

/** Where the proxy reads and answers a machine's commands. */
export interface CommandStore {
  pending(machine: string): Promise<AgentCommand[]>;
  read(machine: string, commandId: string): Promise<AgentCommand | undefined>;
  acknowledge(machine: string, commandId: string, ack: CommandAck): Promise<void>;
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

  async pending(machine: string): Promise<AgentCommand[]> {
    try {
      return await pendingCommands(this.tables, machine);
    } catch (err) {
      if (isNotFound(err)) return []; // no command was ever issued here
      throw storeUnavailable(err);
    }
  }

  async read(machine: string, commandId: string): Promise<AgentCommand | undefined> {
    try {
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

function parseAck(body: Buffer): CommandAck {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body.toString('utf8'));
  } catch {
    throw new ValidationError(
      'The acknowledgement is not JSON; send { "state": "done" | "failed", "message"? }.',
      'body',
    );
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new ValidationError('The acknowledgement must be a JSON object { "state", "message"? }.', 'body');
  }
  const { state, message, ...rest } = parsed as Record<string, unknown>;
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
  const machine = await authorize(deps, req, m);
  const commandId = validateCommandId(id);
  const ack = parseAck(await readSmallBody(req, MAX_ACK_BYTES));
  const command = await deps.commands.read(machine, commandId);
  if (!command) throw new NotFoundError(`Machine ${machine} has no command ${commandId}.`, 'command');
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
