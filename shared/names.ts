import { ValidationError } from './errors';

const DNS_LABEL = /^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/;

/** True when `value` is a DNS-style label, the form of every machine name and disk id. */
export function isDnsLabel(value: unknown): value is string {
  return typeof value === 'string' && DNS_LABEL.test(value);
}

/** Checks a machine name, disk id or other identifier; the error names the field. */
export function validateName(value: unknown, field: string): string {
  if (!isDnsLabel(value)) {
    throw new ValidationError(
      `${field} must be a DNS-style label (lower-case letters, digits and '-', 1-63 characters, not starting or ending with '-'); got ${JSON.stringify(value)}`,
      field,
      'InvalidName',
    );
  }
  return value;
}
