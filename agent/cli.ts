#!/usr/bin/env node
/*
 * The `lifeboat` command: the composition root that wires the embedded stack (Azurite, the local
 * Functions host, the proxy) and the site-side roles together. Nothing imports it.
 */
import { createWriteStream, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { groupMemberCommand } from './group/command';
import { agentCommand } from './mobility/command';
import { proxyCommand } from './proxy/command';
import { targetCommand } from './target/command';
import { formatReport, runDemo } from './demo/demo';
import { resolveDataDir, startStack } from './up';

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535)
    throw new InvalidArgumentError('a port is an integer from 0 to 65535 (0 picks a free one).');
  return n;
}

const program = new Command('lifeboat').description(
  'Lifeboat: disaster recovery for on-premises machines into Azure.',
);

program
  .command('up')
  .description('Run Lifeboat locally: Azurite, the local Functions host and the proxy, until Ctrl-C.')
  .option('--data <dir>', 'data folder (default: $LIFEBOAT_HOME or .lifeboat)')
  .option('--port <port>', 'Functions HTTP port', port, 7071)
  .option('--blob-port <port>', 'Azurite blob port', port, 10000)
  .option('--queue-port <port>', 'Azurite queue port', port, 10001)
  .option('--table-port <port>', 'Azurite table port', port, 10002)
  .option('--proxy-port <port>', 'proxy port (agents send segments here)', port, 9443)
  .action(
    async (opts: {
      data?: string;
      port: number;
      blobPort: number;
      queuePort: number;
      tablePort: number;
      proxyPort: number;
    }) => {
      const dataDir = resolveDataDir(opts.data);
      mkdirSync(dataDir, { recursive: true });
      const hostLog = createWriteStream(path.join(dataDir, 'host.log'), { flags: 'a' });
      console.log(`Starting Lifeboat (data in ${dataDir}) …`);
      const stack = await startStack({
        dataDir,
        port: opts.port,
        blobPort: opts.blobPort,
        queuePort: opts.queuePort,
        tablePort: opts.tablePort,
        proxyPort: opts.proxyPort,
        appRoot: path.resolve(__dirname, '..', '..'),
        onHostLog: (line) => hostLog.write(`${line}\n`),
      });
      let stopping = false;
      const stop = (signal: string) => {
        if (stopping) return;
        stopping = true;
        console.log(`\n${signal}: stopping Lifeboat …`);
        stack.stop().then(
          () => {
            console.log('Stopped.');
            hostLog.end(() => process.exit(0));
          },
          (err) => {
            console.error(
              `Lifeboat did not stop cleanly: ${err instanceof Error ? err.message : String(err)}`,
            );
            process.exit(1);
          },
        );
      };
      process.on('SIGINT', () => stop('SIGINT'));
      process.on('SIGTERM', () => stop('SIGTERM'));
      const { ports } = stack.azurite;
      console.log(
        [
          'Lifeboat is running.',
          `  API         ${stack.apiUrl}   (health: ${stack.apiUrl}/health)`,
          `  Functions   ${stack.host.functions.length} registered: ${stack.host.functions.join(', ')}`,
          `  Local key   ${stack.functionKey}   (send as x-functions-key or ?code=)`,
          `  Proxy       ${stack.proxy.url}${stack.proxy.fingerprint256 ? `   (certificate SHA-256 ${stack.proxy.fingerprint256})` : ''}`,
          `  Azurite     blob ${ports.blob}, queue ${ports.queue}, table ${ports.table} on 127.0.0.1`,
          `  Data        ${dataDir}   (host log: ${path.join(dataDir, 'host.log')})`,
          'Press Ctrl-C to stop.',
        ].join('\n'),
      );
    },
  );

program
  .command('demo')
  .description('Show Lifeboat doing its whole job on this machine, narrated, ending with a report.')
  .option('--data <dir>', 'folder for the demo (emptied first)', '.lifeboat-demo')
  .option('--short', 'small disks and few rounds (CI)', false)
  .option('--json <file>', 'also write the report as JSON to this file')
  .action(async (opts: { data: string; short: boolean; json?: string }) => {
    const report = await runDemo({
      dataDir: path.resolve(opts.data),
      short: opts.short,
      appRoot: path.resolve(__dirname, '..', '..'),
      out: (line) => console.log(line),
      progressBars: Boolean(process.stdout.isTTY),
    });
    console.log(formatReport(report));
    if (opts.json) writeFileSync(opts.json, `${JSON.stringify(report, null, 2)}\n`);
    process.exit(report.ok ? 0 : 1);
  });

program.addCommand(proxyCommand());
program.addCommand(agentCommand().addCommand(groupMemberCommand()));
program.addCommand(targetCommand());

program.parseAsync(process.argv).catch((err) => {
  console.error(`lifeboat: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
});
