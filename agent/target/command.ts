import { Command, InvalidArgumentError } from 'commander';
import { SETTING } from '../../shared/config';
import { failoverDepsFromSettings } from '../../shared/failover';
import { protectionDepsFromSettings } from '../../shared/reprotect';
import { FailoverMachineExport } from './failover-machine';
import { ReprotectTargetRunner, type TargetDisk } from './reprotect-target';

// `lifeboat target …`: the site-side roles of bringing machines home. agent/cli.ts mounts
// targetCommand(). Storage comes from the same settings the functions read (ReplicaStorage,
// CacheStorage, LIFEBOAT_ENCRYPTION_KEYS in the environment): locally they point at Azurite.

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535)
    throw new InvalidArgumentError('a port is an integer from 0 to 65535 (0 picks a free one).');
  return n;
}

function untilSignal(stop: () => Promise<void>): Promise<void> {
  return new Promise((resolve) => {
    const on = (signal: string) => {
      console.error(`${signal}: stopping …`);
      void stop().then(resolve, resolve);
    };
    process.once('SIGINT', on);
    process.once('SIGTERM', on);
  });
}

export function targetCommand(): Command {
  const target = new Command('target').description(
    'Site-side roles for reprotect and failback, and the local failover machine.',
  );
  target
    .command('serve-failover')
    .description(
      `Serve a failed-over machine's disks (the failover page blobs) over NBD, so real tools can use it; stops when failback stops the machine. Reads ${SETTING.replicaStorage} from the environment.`,
    )
    .requiredOption('--machine <name>', 'the protected machine')
    .option('--failover <id>', "the failover (default: the machine's active failover)")
    .option('--nbd-port <port>', 'NBD port (0 picks a free one)', port, 10809)
    .option('--nbd-host <host>', 'NBD listen address', '127.0.0.1')
    .action(async (opts: { machine: string; failover?: string; nbdPort: number; nbdHost: string }) => {
      const deps = failoverDepsFromSettings(process.env);
      const exp = await FailoverMachineExport.start({
        tables: deps.tables,
        failoverDisks: deps.failoverDisks,
        machine: opts.machine,
        failoverId: opts.failover,
        port: opts.nbdPort,
        host: opts.nbdHost,
      });
      console.log(
        `Serving ${exp.target.name} (failover ${exp.failoverId}) on nbd://${exp.address.host}:${exp.address.port}/{${exp.target.disks.map((d) => d.id).join(',')}}`,
      );
      await Promise.race([exp.stopped, untilSignal(() => exp.stop())]);
      console.log('Stopped.');
    });
  target
    .command('reprotect')
    .description(
      `Apply a failed-over machine's reprotect change logs to its site disks (the master target role): uploads the site checksums for the first pass, then applies each pass in order, durably, resuming from its cursor. Reads ${SETTING.replicaStorage}, ${SETTING.cacheStorage} and LIFEBOAT_ENCRYPTION_KEYS from the environment.`,
    )
    .requiredOption('--machine <name>', 'the protected machine')
    .requiredOption(
      '--disk <id=path...>',
      'a site disk (image file or block device) per disk id, e.g. --disk d0=/dev/sdb',
      collectDisk,
      [],
    )
    .requiredOption('--state-dir <dir>', 'where the per-disk cursors are kept')
    .option('--poll-ms <ms>', 'how often new change logs are looked for', (v) => Number(v), 1000)
    .action(async (opts: { machine: string; disk: TargetDisk[]; stateDir: string; pollMs: number }) => {
      const protection = protectionDepsFromSettings(process.env);
      const runner = new ReprotectTargetRunner({
        container: protection.reprotect,
        keyRing: protection.failover.replication.keyRing(),
        tables: protection.tables,
        machine: opts.machine,
        disks: opts.disk,
        stateDir: opts.stateDir,
        pollMs: opts.pollMs,
      });
      runner.start();
      console.log(
        `Applying reprotect change logs of ${opts.machine} to ${opts.disk.map((d) => `${d.id}=${d.path}`).join(', ')}`,
      );
      await untilSignal(() => runner.stop());
      console.log('Stopped.');
    });
  return target;
}

function collectDisk(value: string, previous: TargetDisk[]): TargetDisk[] {
  const at = value.indexOf('=');
  if (at <= 0 || at === value.length - 1)
    throw new InvalidArgumentError('a disk is id=path, e.g. d0=/var/lib/site/d0.img.');
  return [...previous, { id: value.slice(0, at), path: value.slice(at + 1) }];
}
