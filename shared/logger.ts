import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * The one logger: structured JSON lines on stderr (stdout stays free for command output), level
 * from LIFEBOAT_LOG_LEVEL (default `info`). Replication code adds machine/disk/seq as bindings:
 * `log.child({ machine, disk }).info({ seq }, 'segment applied')`.
 */
export function createLogger(component: string, bindings: Record<string, unknown> = {}): Logger {
  return pino(
    { name: 'lifeboat', level: process.env.LIFEBOAT_LOG_LEVEL ?? 'info', base: { component, ...bindings } },
    pino.destination({ fd: 2, sync: false }),
  );
}
