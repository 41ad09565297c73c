/*
 * The local Functions host with the Durable extension, on the test app in ./app. Prints one JSON
 * line `{ "port": … }` once listening.   node --import tsx extension-host.ts <connectionString> <hub> <key>
 */
import path from 'node:path';
import { startLocalHost } from '../../../../infra/local/host';
import { durableExtension } from '../../../../infra/local/durable/extension';

const [connectionString, hub, key] = process.argv.slice(2);
const appRoot = path.join(__dirname, 'app');

startLocalHost(
  {
    appRoot,
    entryPoint: path.join(appRoot, 'index.ts'),
    port: 0,
    functionKey: key,
    settings: { AzureWebJobsStorage: connectionString, DURABLE_TEST_HUB: hub, LIFEBOAT_LOG_LEVEL: 'warn' },
  },
  [durableExtension],
).then(
  (host) => process.stdout.write(`${JSON.stringify({ port: host.port })}\n`),
  (err) => {
    process.stderr.write(`extension-host failed: ${err instanceof Error ? err.stack : String(err)}\n`);
    process.exit(1);
  },
);
