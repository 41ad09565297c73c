import path from 'node:path';
import { Command, InvalidArgumentError } from 'commander';
import { CODECS, type Codec } from '../../shared/envelope';
import { DEFAULT_PROXY_PORT, startProxy, type ProxyOptions } from './proxy';

const UNITS: Record<string, number> = {
  '': 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  kib: 1024,
  m: 1e6,
  mb: 1e6,
  mib: 1024 ** 2,
  g: 1e9,
  gb: 1e9,
  gib: 1024 ** 3,
  t: 1e12,
  tb: 1e12,
  tib: 1024 ** 4,
};

/** "64MiB", "10GB", "1048576" → bytes. */
export function parseSize(value: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(value);
  const unit = m ? UNITS[m[2].toLowerCase()] : undefined;
  if (!m || unit === undefined)
    throw new InvalidArgumentError('a size is a number with an optional unit: 512KiB, 64MiB, 10GiB, 5MB.');
  return Math.floor(Number(m[1]) * unit);
}

function positiveInt(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1) throw new InvalidArgumentError('expected a whole number of at least 1.');
  return n;
}

function port(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535)
    throw new InvalidArgumentError('a port is an integer from 0 to 65535 (0 picks a free one).');
  return n;
}

function codec(value: string): Codec {
  if (!(CODECS as readonly string[]).includes(value))
    throw new InvalidArgumentError(`one of ${CODECS.join(', ')}.`);
  return value as Codec;
}

interface ProxyFlags {
  spool: string;
  host: string;
  port: number;
  tlsCert?: string;
  tlsKey?: string;
  insecureHttp?: boolean;
  spoolCap?: number;
  maxSegment?: number;
  bandwidth?: number;
  uploadConcurrency?: number;
  codec?: Codec;
}

/** Turns the flags into startProxy options (exported for tests). */
export function proxyOptionsFromFlags(flags: ProxyFlags, env: NodeJS.ProcessEnv = process.env): ProxyOptions {
  if ((flags.tlsCert === undefined) !== (flags.tlsKey === undefined)) {
    throw new InvalidArgumentError('--tls-cert and --tls-key go together.');
  }
  if (flags.insecureHttp && flags.tlsCert)
    throw new InvalidArgumentError('--insecure-http and --tls-cert exclude each other.');
  return {
    spoolDir: path.resolve(flags.spool),
    host: flags.host,
    port: flags.port,
    tls: flags.insecureHttp
      ? 'none'
      : flags.tlsCert
        ? { certFile: flags.tlsCert, keyFile: flags.tlsKey! }
        : 'self-signed',
    settings: env,
    spoolCapBytes: flags.spoolCap,
    maxSegmentBytes: flags.maxSegment,
    bandwidthBytesPerSecond: flags.bandwidth,
    uploadConcurrency: flags.uploadConcurrency,
    codec: flags.codec,
  };
}

/**
 * `lifeboat proxy`: the process server. Storage, queue and key settings come from the environment
 * (CacheStorage, ReplicaStorage, ServiceBusConnection, ChangelogQueueName,
 * LIFEBOAT_ENCRYPTION_KEYS); the rest from flags, each with an environment default.
 */
export function proxyCommand(): Command {
  const env = process.env;
  return new Command('proxy')
    .description(
      'Run the proxy (process server): receive segments from agents, spool, compress, encrypt, upload to the cache, notify.',
    )
    .option(
      '--spool <dir>',
      'spool folder ($LIFEBOAT_PROXY_SPOOL)',
      env.LIFEBOAT_PROXY_SPOOL ?? path.join('.lifeboat', 'proxy-spool'),
    )
    .option(
      '--host <address>',
      'address to listen on ($LIFEBOAT_PROXY_HOST)',
      env.LIFEBOAT_PROXY_HOST ?? '0.0.0.0',
    )
    .option(
      '--port <port>',
      'port to listen on ($LIFEBOAT_PROXY_PORT)',
      port,
      env.LIFEBOAT_PROXY_PORT ? port(env.LIFEBOAT_PROXY_PORT) : DEFAULT_PROXY_PORT,
    )
    .option(
      '--tls-cert <file>',
      'PEM certificate ($LIFEBOAT_PROXY_TLS_CERT); default: a self-signed one in the spool',
      env.LIFEBOAT_PROXY_TLS_CERT,
    )
    .option('--tls-key <file>', 'PEM private key ($LIFEBOAT_PROXY_TLS_KEY)', env.LIFEBOAT_PROXY_TLS_KEY)
    .option('--insecure-http', 'serve plain HTTP (tests and trusted local set-ups only)', false)
    .option(
      '--spool-cap <size>',
      'spool size that triggers 503 + Retry-After ($LIFEBOAT_PROXY_SPOOL_CAP, default 10GiB)',
      parseSize,
      env.LIFEBOAT_PROXY_SPOOL_CAP ? parseSize(env.LIFEBOAT_PROXY_SPOOL_CAP) : undefined,
    )
    .option('--max-segment <size>', 'largest segment accepted (default 64MiB)', parseSize)
    .option(
      '--bandwidth <size>',
      'upload cap per second, e.g. 20MB ($LIFEBOAT_PROXY_BANDWIDTH, default none)',
      parseSize,
      env.LIFEBOAT_PROXY_BANDWIDTH ? parseSize(env.LIFEBOAT_PROXY_BANDWIDTH) : undefined,
    )
    .option('--upload-concurrency <n>', 'disks uploaded at once (default 4)', positiveInt)
    .option('--codec <codec>', `compression: ${CODECS.join('|')} (default zstd)`, codec)
    .action(async (flags: ProxyFlags) => {
      const proxy = await startProxy(proxyOptionsFromFlags(flags));
      const lines = [`Lifeboat proxy listening on ${proxy.url}`, `  spool ${proxy.spool.root}`];
      if (proxy.fingerprint256)
        lines.push(`  TLS certificate SHA-256 ${proxy.fingerprint256} (pin this in agents)`);
      else lines.push('  WARNING: plain HTTP; credentials and data are not encrypted in transit.');
      console.log(lines.join('\n'));
      let stopping = false;
      const stop = (signal: string): void => {
        if (stopping) return;
        stopping = true;
        console.log(`${signal}: stopping the proxy (spooled segments upload on the next start) …`);
        proxy.stop().then(
          () => process.exit(0),
          (err: unknown) => {
            console.error(
              `The proxy did not stop cleanly: ${err instanceof Error ? err.message : String(err)}`,
            );
            process.exit(1);
          },
        );
      };
      process.on('SIGINT', () => stop('SIGINT'));
      process.on('SIGTERM', () => stop('SIGTERM'));
    });
}
