import type { HttpRequest, HttpResponseInit, InvocationContext } from '@azure/functions';
import { ensureError, LifeboatError, ValidationError } from '../../shared/errors';

type Handler = (request: HttpRequest, context: InvocationContext) => Promise<HttpResponseInit>;

/** `{ error: { code, message, target } }` with the error's status. */
export function errorResponse(err: LifeboatError): HttpResponseInit {
  return {
    status: err.status,
    jsonBody: {
      error: { code: err.code, message: err.message, ...(err.target ? { target: err.target } : {}) },
    },
  };
}

/**
 * Wraps an HTTP handler so a LifeboatError becomes its JSON error response. Anything else is
 * rethrown: the host answers 500 with a correlation id and logs the details.
 */
export function withErrors(handler: Handler): Handler {
  return async (request, context) => {
    try {
      return await handler(request, context);
    } catch (err) {
      if (err instanceof LifeboatError && err.status < 500) return errorResponse(err);
      throw ensureError(err);
    }
  };
}

/** The request's JSON body, or a 400 that says what is wrong with it. */
export async function jsonBody(request: HttpRequest): Promise<unknown> {
  const text = await request.text();
  if (text.trim() === '') throw new ValidationError('The request body is empty; send a JSON object.', 'body');
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new ValidationError(`The request body is not valid JSON: ${(err as Error).message}.`, 'body');
  }
}

/** An optional integer query parameter within [min, max]. */
export function intQuery(request: HttpRequest, name: string, min: number, max: number): number | undefined {
  const raw = request.query.get(name);
  if (raw === null || raw === '') return undefined;
  const value = Number(raw);
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new ValidationError(
      `${name} must be a whole number from ${min} to ${max}; got ${JSON.stringify(raw)}.`,
      name,
    );
  }
  return value;
}

/** A page of results with the continuation token in the body and as `x-ms-continuation`. */
export function pageResponse<T>(page: { value: T[]; continuationToken?: string }): HttpResponseInit {
  return {
    status: 200,
    jsonBody: {
      value: page.value,
      ...(page.continuationToken ? { continuationToken: page.continuationToken } : {}),
    },
  };
}
