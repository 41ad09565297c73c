import { z } from 'zod';
import { ValidationError } from '../errors';
import { isDnsLabel } from '../names';

/** A page blob's largest size (8 TiB); a seed disk is one page blob. */
export const MAX_DISK_BYTES = 8 * 1024 ** 4;
export const PAGE_BYTES = 512;
export const MAX_DISKS = 64;

const dnsLabel = (what: string) =>
  z.string().refine(isDnsLabel, {
    error: `must be a DNS-style label (lower-case letters, digits and '-', 1-63 characters, not starting or ending with '-'); it names the ${what}`,
  });

const wholeNumber = (min: number, max: number, unit: string, why = '') =>
  z
    .number({ error: `must be a number of ${unit}` })
    .int({ error: `must be a whole number of ${unit}` })
    .min(min, { error: `must be at least ${min} ${unit}${why}` })
    .max(max, { error: `must be at most ${max} ${unit}${why}` });

/** The replication policy of a machine; every field has a default. */
export const policySchema = z.strictObject({
  /** Crash-consistent markers: every 5 minutes by default (as ASR), down to 10 seconds. */
  crashConsistentIntervalSeconds: wholeNumber(10, 3600, 'seconds').default(300),
  /** App-consistent markers (after the freeze hook): 0 = off, up to every 12 hours. */
  appConsistentIntervalMinutes: wholeNumber(
    0,
    720,
    'minutes',
    ' (0 turns app-consistent points off)',
  ).default(60),
  /** Every recovery point younger than this is kept (up to 15 days). */
  retentionHours: wholeNumber(1, 360, 'hours', ' (every point is kept for up to 15 days)').default(24),
  /** Beyond retentionHours: the latest point of each UTC hour younger than this is kept. */
  hourlyRetentionHours: wholeNumber(0, 360, 'hours').default(0),
  /** Beyond that: the latest point of each UTC day younger than this is kept (up to a year). */
  dailyRetentionDays: wholeNumber(0, 365, 'days').default(0),
  /** An RPO above this raises an event and makes the machine `critical`. */
  rpoThresholdSeconds: wholeNumber(30, 7 * 24 * 3600, 'seconds').default(900),
  /** Applied change logs are kept this long for point-in-time work; 0 deletes them once applied. */
  keepChangeLogsHours: wholeNumber(0, 360, 'hours').default(0),
});

export type ReplicationPolicy = z.infer<typeof policySchema>;

export const diskSchema = z.strictObject({
  id: dnsLabel('disk'),
  sizeBytes: z
    .number({ error: 'must be a number of bytes' })
    .int({ error: 'must be a whole number of bytes' })
    .positive({ error: 'must be positive' })
    .multipleOf(PAGE_BYTES, { error: `must be a multiple of ${PAGE_BYTES} bytes (a page blob's page)` })
    .max(MAX_DISK_BYTES, { error: `must be at most ${MAX_DISK_BYTES} bytes (8 TiB, the page blob limit)` }),
});

export type DiskSpec = z.infer<typeof diskSchema>;

export const registrationSchema = z
  .strictObject({
    disks: z
      .array(diskSchema, { error: 'must be a list of disks ({ "id": "d0", "sizeBytes": 1073741824 })' })
      .min(1, { error: 'must list at least one disk' })
      .max(MAX_DISKS, { error: `must list at most ${MAX_DISKS} disks` }),
    policy: policySchema.default(policySchema.parse({})),
    /** Replication group (multi-machine consistency); optional. */
    group: dnsLabel('replication group').optional(),
    /** Issue a new agent credential on re-registration (the old one stops working). */
    rotateCredential: z.boolean({ error: 'must be true or false' }).optional(),
  })
  .superRefine((body, ctx) => {
    const seen = new Set<string>();
    body.disks.forEach((disk, i) => {
      if (seen.has(disk.id)) {
        ctx.addIssue({
          code: 'custom',
          path: ['disks', i, 'id'],
          message: `repeats disk id ${JSON.stringify(disk.id)}; disk ids must be unique`,
        });
      }
      seen.add(disk.id);
    });
  });

export type RegistrationRequest = z.infer<typeof registrationSchema>;

function fieldName(path: readonly PropertyKey[], root: string): string {
  let out = root;
  for (const part of path)
    out += typeof part === 'number' ? `[${part}]` : out ? `.${String(part)}` : String(part);
  return out;
}

function describeIssue(issue: z.core.$ZodIssue): string {
  switch (issue.code) {
    case 'unrecognized_keys':
      return `has unknown field${issue.keys.length > 1 ? 's' : ''} ${issue.keys.map((k) => JSON.stringify(k)).join(', ')}`;
    case 'invalid_type':
      return issue.message.startsWith('must')
        ? issue.message
        : `must be ${article(issue.expected)} ${issue.expected}`;
    default:
      return issue.message;
  }
}

function article(word: string): string {
  return /^[aeiou]/.test(word) ? 'an' : 'a';
}

/**
 * Parses with `schema`, or throws a ValidationError whose message and target name the first
 * offending field (e.g. `policy.retentionHours`, `disks[1].sizeBytes`).
 */
export function parseOrThrow<S extends z.ZodType>(schema: S, value: unknown, root = ''): z.infer<S> {
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const unknownKey = issue.code === 'unrecognized_keys' && issue.keys.length === 1 ? [issue.keys[0]] : [];
  const field = fieldName([...issue.path, ...unknownKey], root) || 'body';
  const where = issue.code === 'unrecognized_keys' ? fieldName(issue.path, root) || 'the body' : field;
  throw new ValidationError(`${where} ${describeIssue(issue)}.`, field, 'InvalidInput');
}

export function parseRegistration(body: unknown): RegistrationRequest {
  if (body === null || typeof body !== 'object' || Array.isArray(body)) {
    throw new ValidationError(
      'The request body must be a JSON object with "disks" and optionally "policy".',
      'body',
    );
  }
  return parseOrThrow(registrationSchema, body);
}

/** The stored policy (fills defaults added since it was stored). */
export function readPolicy(json: string): ReplicationPolicy {
  return policySchema.parse({ ...policySchema.parse({}), ...(JSON.parse(json) as object) });
}
