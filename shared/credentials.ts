import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { isDnsLabel } from './names';

// Agent credentials. Registration (`PUT /api/machines/{machine}`) issues one per machine and
// stores only its hash in the `machines` table; the proxy reads that hash to check the bearer
// token an agent presents. The token names its machine, so a proxy can tell a wrong secret (401)
// from another machine's valid credential (403) with one row read.
//
// Token:  lbm1.{machine}.{secret}   secret = 32 random bytes, base64url (43 characters)
// Hash:   sha256:{base64url of SHA-256 over the whole token}
// A plain SHA-256 is enough: the secret is 256 random bits, so there is nothing to brute-force,
// and a slow password hash would only cost the proxy CPU on every request.

export const CREDENTIAL_PREFIX = 'lbm1';
const SECRET_BYTES = 32;
const HASH_PREFIX = 'sha256:';

/** Where registration stores machines, and the row fields the proxy reads. */
export const MACHINES_TABLE = 'machines';
export const MACHINES_PARTITION = 'machines';

/**
 * The credential fields of a `machines` row (PartitionKey MACHINES_PARTITION, RowKey = machine
 * name). Registration writes them with a merge, alongside its own fields; the proxy reads
 * `credentialHash` only. Replacing the hash (re-registration) revokes the old token; a proxy
 * notices within its cache time (30 s by default).
 */
export interface MachineCredentialFields {
  /** `sha256:` + base64url SHA-256 of the token; never the token itself. */
  credentialHash: string;
  /** ISO-8601 time the credential was issued. */
  credentialIssuedAt: string;
}

export interface MachineCredentialEntity extends MachineCredentialFields {
  partitionKey: string;
  rowKey: string;
}

export interface IssuedCredential {
  /** Hand to the agent once (registration response); never store it. */
  token: string;
  /** Store this in the machines row. */
  fields: MachineCredentialFields;
}

export function hashCredential(token: string): string {
  return HASH_PREFIX + createHash('sha256').update(token, 'utf8').digest('base64url');
}

/** Issues a new random credential for `machine` (a DNS-label name). */
export function issueCredential(machine: string, now: Date = new Date()): IssuedCredential {
  if (!isDnsLabel(machine))
    throw new TypeError(`issueCredential needs a DNS-label machine name, got ${JSON.stringify(machine)}`);
  const token = `${CREDENTIAL_PREFIX}.${machine}.${randomBytes(SECRET_BYTES).toString('base64url')}`;
  return { token, fields: { credentialHash: hashCredential(token), credentialIssuedAt: now.toISOString() } };
}

/** The row (keys + credential fields) to merge into the machines table for `machine`. */
export function machineCredentialEntity(
  machine: string,
  fields: MachineCredentialFields,
): MachineCredentialEntity {
  return { partitionKey: MACHINES_PARTITION, rowKey: machine, ...fields };
}

/** The machine a token claims to belong to, or undefined if it is not shaped like a credential. */
export function credentialMachine(token: string): string | undefined {
  const parts = token.split('.');
  if (parts.length !== 3 || parts[0] !== CREDENTIAL_PREFIX) return undefined;
  if (!isDnsLabel(parts[1]) || !/^[A-Za-z0-9_-]{43}$/.test(parts[2])) return undefined;
  return parts[1];
}

/** True when `token` hashes to `storedHash`; the comparison takes the same time whatever differs. */
export function verifyCredential(token: string, storedHash: string | undefined): boolean {
  if (!storedHash || !storedHash.startsWith(HASH_PREFIX)) return false;
  const expected = Buffer.from(storedHash.slice(HASH_PREFIX.length), 'base64url');
  const actual = createHash('sha256').update(token, 'utf8').digest();
  if (expected.length !== actual.length) return false;
  return timingSafeEqual(expected, actual);
}
