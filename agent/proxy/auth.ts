import type { TableClient } from '@azure/data-tables';
import { credentialMachine, MACHINES_PARTITION, verifyCredential } from '../../shared/credentials';
import { ForbiddenError, LifeboatError, UnauthorizedError } from '../../shared/errors';

/** Where the proxy finds a machine's credential hash (the `machines` table in ReplicaStorage). */
export interface CredentialLookup {
  credentialHash(machine: string): Promise<string | undefined>;
}

/** Reads `credentialHash` from the machines row registration wrote. */
export class TableCredentialLookup implements CredentialLookup {
  constructor(private readonly table: TableClient) {}

  async credentialHash(machine: string): Promise<string | undefined> {
    try {
      const row = await this.table.getEntity<{ credentialHash?: string }>(MACHINES_PARTITION, machine, {
        queryOptions: { select: ['credentialHash'] },
      });
      return typeof row.credentialHash === 'string' ? row.credentialHash : undefined;
    } catch (err) {
      const status = (err as { statusCode?: number }).statusCode;
      if (status === 404) return undefined;
      throw new LifeboatError(
        'CredentialStoreUnavailable',
        `The proxy could not read machine credentials from the machines table (${(err as Error).message.split('\n')[0]}); try again shortly.`,
        { status: 503, cause: err },
      );
    }
  }
}

interface Cached {
  hash: string | undefined;
  fetchedAt: number;
}

/**
 * Checks `Authorization: Bearer <token>` against the hash registration stored. Hashes are cached
 * for `ttlMs`; a token that does not match its cached hash triggers one re-read (at most once a
 * second per machine), so a freshly re-registered machine is accepted at once.
 */
export class MachineAuthenticator {
  private readonly cache = new Map<string, Cached>();

  constructor(
    private readonly lookup: CredentialLookup,
    private readonly ttlMs = 30_000,
  ) {}

  private async hash(machine: string, fresh: boolean): Promise<string | undefined> {
    const cached = this.cache.get(machine);
    const now = Date.now();
    if (cached && now - cached.fetchedAt < (fresh ? 1000 : this.ttlMs)) return cached.hash;
    const hash = await this.lookup.credentialHash(machine);
    this.cache.set(machine, { hash, fetchedAt: now });
    return hash;
  }

  /** Returns the machine the credential belongs to; throws 401 when it is missing or wrong. */
  async authenticate(authorization: string | undefined): Promise<string> {
    if (!authorization) {
      throw new UnauthorizedError(
        'The request has no credential: send "Authorization: Bearer <credential>" with the credential registration issued for this machine.',
      );
    }
    const m = /^Bearer\s+(\S+)\s*$/i.exec(authorization);
    const token = m?.[1];
    const machine = token ? credentialMachine(token) : undefined;
    if (!token || !machine) {
      throw new UnauthorizedError(
        'The Authorization header is not "Bearer <credential>" with a Lifeboat machine credential (lbm1.<machine>.<secret>).',
      );
    }
    if (verifyCredential(token, await this.hash(machine, false))) return machine;
    if (verifyCredential(token, await this.hash(machine, true))) return machine;
    throw new UnauthorizedError(
      `The credential for machine ${machine} is not valid (wrong, revoked by re-registration, or the machine is not registered); ` +
        'use the credential from the latest registration.',
    );
  }

  /** 401 unless the credential is valid, 403 unless it belongs to `machine`. */
  async authorize(authorization: string | undefined, machine: string): Promise<void> {
    const owner = await this.authenticate(authorization);
    if (owner !== machine) {
      throw new ForbiddenError(
        `The credential belongs to machine ${owner}; it cannot send data for machine ${machine}.`,
      );
    }
  }
}
