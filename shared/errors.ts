/**
 * One error type per failure class. Every error a user can meet carries a stable `code`, an HTTP
 * status for the API boundary, and optionally the `target` (field or resource) it is about.
 */
export class LifeboatError extends Error {
  readonly code: string;
  readonly status: number;
  readonly target?: string;

  constructor(
    code: string,
    message: string,
    options: { status?: number; target?: string; cause?: unknown } = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.status = options.status ?? 500;
    this.target = options.target;
  }
}

/** The caller sent something invalid (400). */
export class ValidationError extends LifeboatError {
  constructor(message: string, target?: string, code = 'InvalidInput') {
    super(code, message, { status: 400, target });
  }
}

export class NotFoundError extends LifeboatError {
  constructor(message: string, target?: string) {
    super('NotFound', message, { status: 404, target });
  }
}

/** The request conflicts with the current state (409). */
export class ConflictError extends LifeboatError {
  constructor(message: string, target?: string, code = 'Conflict') {
    super(code, message, { status: 409, target });
  }
}

export class UnauthorizedError extends LifeboatError {
  constructor(message: string) {
    super('Unauthorized', message, { status: 401 });
  }
}

export class ForbiddenError extends LifeboatError {
  constructor(message: string) {
    super('Forbidden', message, { status: 403 });
  }
}

/** A setting is missing or malformed; raised at start-up so misconfiguration fails fast. */
export class ConfigError extends LifeboatError {
  constructor(message: string, setting?: string) {
    super('InvalidConfiguration', message, { status: 500, target: setting });
  }
}

/** Normalises anything thrown into an Error (the library's `ensureErrorType`). */
export function ensureError(err: unknown): Error {
  if (err instanceof Error) return err;
  if (typeof err === 'string') return new Error(err);
  try {
    return new Error(`Non-error thrown: ${JSON.stringify(err)}`);
  } catch {
    return new Error(`Non-error thrown: ${String(err)}`);
  }
}
