/*
 * Process entry for the local Functions host, so that `lifeboat up` (and tests) run it as a child
 * process that can be stopped, killed and restarted like the real host. Configuration arrives as
 * JSON in LIFEBOAT_HOST_CONFIG; once listening it prints one JSON line `{"ready":true,"port":…}`.
 */
import { createLogger } from '../../shared/logger';
import { startLocalHost, type LocalHostOptions } from './host';
import { localExtensions } from './extensions';

async function main(): Promise<void> {
  const raw = process.env.LIFEBOAT_HOST_CONFIG;
  if (!raw) throw new Error('LIFEBOAT_HOST_CONFIG is not set; start the host through `lifeboat up`.');
  const options = JSON.parse(raw) as LocalHostOptions;
  const logger = createLogger('local-host');
  const host = await startLocalHost({ ...options, logger }, localExtensions());
  process.stdout.write(
    `${JSON.stringify({ ready: true, port: host.port, functions: [...host.registry.functions.keys()] })}\n`,
  );
  let stopping = false;
  const stop = (signal: string) => {
    if (stopping) return;
    stopping = true;
    logger.info({ signal }, 'local Functions host stopping');
    host.stop().then(
      () => process.exit(0),
      (err) => {
        logger.error({ err: String(err) }, 'local Functions host did not stop cleanly');
        process.exit(1);
      },
    );
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((err) => {
  process.stderr.write(
    `local Functions host failed to start: ${err instanceof Error ? err.stack : String(err)}\n`,
  );
  process.exit(1);
});
