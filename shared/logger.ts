import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * The one logger: structured JSON lines on stderr (stdout stays free for command output), or
 * appended to `file` when given; level from LIFEBOAT_LOG_LEVEL (default `info`). Replication code
 * adds machine/disk/seq as bindings: `log.child({ machine, disk }).info({ seq }, 'segment applied')`.
 */
export function createLogger(
  component: string,
  bindings: Record<string, unknown> = {},
  file?: string,
): Logger {
  return pino(
    { name: 'lifeboat', level: process.env.LIFEBOAT_LOG_LEVEL ?? 'info', base: { component, ...bindings } },
    file
      ? pino.destination({ dest: file, append: true, mkdir: true, sync: false })
      : pino.destination({ fd: 2, sync: false }),
  );
}
