import { describe, expect, it } from 'vitest';
import { ValidationError } from '../../../shared/errors';
import { parseOrThrow } from '../../../shared/replication';
import { failbackRequestSchema, parsePlanFailbackRequest } from '../../../shared/reprotect';

/** The ValidationError a parse throws (its target names the field). */
function rejection(parse: () => unknown): ValidationError {
  try {
    parse();
  } catch (err) {
    if (err instanceof ValidationError) return err;
    throw err;
  }
  throw new Error('expected a ValidationError');
}

describe('failback request bodies', () => {
  it("a plan's failback takes a machine's failback fields, with the same defaults and limits, and its own", () => {
    expect(parseOrThrow(failbackRequestSchema, {})).toEqual({ cleanup: true, waitSeconds: 3600 });
    expect(parsePlanFailbackRequest(undefined)).toEqual({
      cleanup: true,
      waitSeconds: 3600,
      order: 'reverse',
      actions: 'all',
    });
    expect(parsePlanFailbackRequest({ cleanup: false, waitSeconds: 10, order: 'forward' })).toMatchObject({
      cleanup: false,
      waitSeconds: 10,
      order: 'forward',
    });
    for (const [body, field] of [
      [{ cleanup: 'yes' }, 'cleanup'],
      [{ waitSeconds: 9 }, 'waitSeconds'],
      [{ waitSeconds: 7 * 86_400 + 1 }, 'waitSeconds'],
      [{ waitSeconds: 60.5 }, 'waitSeconds'],
      [{ bogus: 1 }, 'bogus'],
    ] as const) {
      const machine = rejection(() => parseOrThrow(failbackRequestSchema, body));
      const plan = rejection(() => parsePlanFailbackRequest(body));
      expect(machine.target).toBe(field);
      expect(plan.target).toBe(field);
      expect(plan.message).toBe(machine.message);
    }
    // The plan's fields are the plan's only: a machine's failback refuses them.
    expect(rejection(() => parseOrThrow(failbackRequestSchema, { order: 'reverse' })).target).toBe('order');
    expect(rejection(() => parsePlanFailbackRequest({ order: 'sideways' })).target).toBe('order');
    expect(rejection(() => parsePlanFailbackRequest([])).target).toBe('body');
  });
});
