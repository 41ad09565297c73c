import { CronExpressionParser } from 'cron-parser';
import type { Settings } from '../../shared/config';
import type { FunctionRegistry, RegisteredFunction } from './functions-core';
import { resolveBindingExpression } from './queue-trigger';

const MAX_TIMEOUT_MS = 2 ** 31 - 1;

export interface TimerTriggerOptions {
  registry: FunctionRegistry;
  settings: Settings;
  log: (level: 'info' | 'warn' | 'error', message: string, fields?: object) => void;
}

/** Parses a six-field NCRONTAB schedule (`{second} {minute} {hour} {day} {month} {day-of-week}`). */
export function nextOccurrence(schedule: string, after: Date): Date {
  const fields = schedule.trim().split(/\s+/);
  if (fields.length !== 6) {
    throw new Error(
      `Timer schedule "${schedule}" must have six fields (second minute hour day month day-of-week).`,
    );
  }
  return CronExpressionParser.parse(schedule, { currentDate: after, tz: 'UTC' }).next().toDate();
}

/**
 * Runs `timerTrigger` functions on their NCRONTAB schedules. One invocation of a function runs at
 * a time; an occurrence missed while the previous run was still going is reported as past due.
 */
export class TimerTriggers {
  private readonly timers = new Map<string, NodeJS.Timeout>();
  private readonly running = new Map<string, Promise<void>>();
  private stopped = false;

  constructor(private readonly options: TimerTriggerOptions) {}

  start(): void {
    for (const fn of this.options.registry.byTriggerType('timerTrigger')) {
      const schedule = resolveBindingExpression(String(fn.trigger.schedule), this.options.settings);
      nextOccurrence(schedule, new Date()); // fail fast on a bad schedule
      this.arm(fn, schedule, undefined);
      if (fn.trigger.runOnStartup) void this.fire(fn, schedule, undefined, new Date());
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const timer of this.timers.values()) clearTimeout(timer);
    await Promise.allSettled([...this.running.values()]);
  }

  private arm(
    fn: RegisteredFunction,
    schedule: string,
    last: Date | undefined,
    due = nextOccurrence(schedule, new Date()),
  ): void {
    if (this.stopped) return;
    const delay = Math.max(0, due.getTime() - Date.now());
    // setTimeout holds at most 2^31-1 ms (24.8 days); a later occurrence waits in steps.
    if (delay > MAX_TIMEOUT_MS) {
      this.timers.set(
        fn.name,
        setTimeout(() => this.arm(fn, schedule, last, due), MAX_TIMEOUT_MS),
      );
      return;
    }
    this.timers.set(
      fn.name,
      setTimeout(() => {
        // A Node timer can wake a millisecond before Date.now() reaches its time; firing then would
        // run the occurrence early and arm the same one again.
        if (Date.now() < due.getTime()) return this.arm(fn, schedule, last, due);
        void this.fire(fn, schedule, last, due).then(() => this.arm(fn, schedule, due));
      }, delay),
    );
  }

  private async fire(
    fn: RegisteredFunction,
    schedule: string,
    last: Date | undefined,
    due: Date,
  ): Promise<void> {
    if (this.running.has(fn.name) || this.stopped) return;
    const now = new Date();
    const input = {
      Schedule: { AdjustForDST: true },
      ScheduleStatus: {
        Last: (last ?? due).toISOString(),
        Next: nextOccurrence(schedule, now).toISOString(),
        LastUpdated: now.toISOString(),
      },
      IsPastDue: now.getTime() - due.getTime() > 1000,
    };
    const run = this.options.registry
      .invoke(fn.name, { inputData: [{ name: fn.trigger.name, data: { json: JSON.stringify(input) } }] })
      .then(
        () => undefined,
        (err) =>
          this.options.log('error', `timer function ${fn.name} failed`, {
            function: fn.name,
            err: String(err),
          }),
      )
      .finally(() => this.running.delete(fn.name));
    this.running.set(fn.name, run);
    await run;
  }
}
