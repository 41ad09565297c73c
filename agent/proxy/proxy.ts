import http from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { BlobServiceClient, newPipeline, type ContainerClient } from '@azure/storage-blob';
import type { Logger } from 'pino';
import { SETTING, changelogQueueName, type Settings } from '../../shared/config';
import { MACHINES_TABLE } from '../../shared/credentials';
import {
  CHANGELOG_CONTAINER,
  DEFAULT_CODEC,
  keyRingFromSettings,
  usableCodec,
  type Codec,
  type KeyRing,
} from '../../shared/envelope';
import { ConfigError } from '../../shared/errors';
import { createLogger } from '../../shared/logger';
import { createMessageSender, type MessageSender } from '../../shared/messaging';
import { MAX_SEGMENT_BYTES } from '../../shared/segment';
import { StorageClients } from '../../shared/storage';
import { SiteGroups } from '../group/site';
import { MachineAuthenticator, TableCredentialLookup, type CredentialLookup } from './auth';
import { TableCommandStore, type CommandStore } from './commands';
import { createIngestHandler } from './server';
import { Spool } from './spool';
import { buildStatus, type IngestCounters, type ProxyStatus } from './status';
import { loadCertificate, selfSignedCertificate, type CertificateFiles, type LoadedCertificate } from './tls';
import { Uploader, cachedChecksum, type RetryOptions } from './uploader';

export const DEFAULT_PROXY_PORT = 9443;

export interface ProxyOptions {
  /** The spool folder (created if missing); restarting on the same folder resumes its uploads. */
  spoolDir: string;
  /** Address to listen on (default 0.0.0.0: agents connect from other machines). */
  host?: string;
  /** Port (default 9443); 0 picks a free one. */
  port?: number;
  /**
   * TLS: certificate files, 'self-signed' (default: made with openssl and kept in the spool's
   * tls/ folder; on a loopback address without openssl, plain HTTP with a warning), or 'none'
   * (plain HTTP: tests and trusted local set-ups only).
   */
  tls?: CertificateFiles | 'self-signed' | 'none';
  /** Where CacheStorage, ReplicaStorage, ServiceBusConnection, ChangelogQueueName and LIFEBOAT_ENCRYPTION_KEYS come from. */
  settings?: Settings;
  keyRing?: KeyRing;
  /** Default zstd (measured, docs/envelope.md); falls back to brotli without the native module. */
  codec?: Codec;
  /** Largest segment accepted (default and at most the segment format's 64 MiB). */
  maxSegmentBytes?: number;
  /** Spool size above which new segments get 503 + Retry-After (default 10 GiB). */
  spoolCapBytes?: number;
  /** Requests handled at once before answering 429 (default 64). */
  maxConcurrentRequests?: number;
  /** Segment bytes held in memory by requests being received before answering 429 (default 1 GiB). */
  maxBufferedBytes?: number;
  /** Disks uploaded at the same time (default 4). */
  uploadConcurrency?: number;
  /** Upload cap in bytes per second (default none). */
  bandwidthBytesPerSecond?: number;
  retry?: RetryOptions;
  /** How long a machine's credential hash is cached (default 30 s). */
  credentialCacheMs?: number;
  logger?: Logger;
  /** Overrides for what is otherwise built from `settings`. */
  credentials?: CredentialLookup;
  /** Agent commands (default: table `commands` of ReplicaStorage). */
  commands?: CommandStore;
  container?: ContainerClient;
  sender?: MessageSender;
  /** Replication group coordinators (default: from ReplicaStorage's groups table); false = none. */
  groups?: SiteGroups | false;
}

export interface RunningProxy {
  /** e.g. https://127.0.0.1:9443 */
  url: string;
  port: number;
  /** SHA-256 fingerprint of the TLS certificate, for agents to pin; undefined over plain HTTP. */
  fingerprint256?: string;
  /** The PEM certificate (self-signed or configured), for agents to trust. */
  certificate?: Buffer;
  spool: Spool;
  status(): ProxyStatus;
  /** Resolves once every spooled segment is uploaded and notified. */
  drained(): Promise<void>;
  stop(): Promise<void>;
}

/** A blob client from the one factory, with the SDK's own retries off: the uploader retries. */
function cacheContainer(settings: Settings): ContainerClient {
  const base = new StorageClients(SETTING.cacheStorage, settings).blobService();
  const service = new BlobServiceClient(
    base.url,
    newPipeline(base.credential, { retryOptions: { maxTries: 1, tryTimeoutInMs: 10 * 60_000 } }),
  );
  return service.getContainerClient(CHANGELOG_CONTAINER);
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host.startsWith('127.');
}

async function resolveTls(
  options: ProxyOptions,
  host: string,
  logger: Logger,
): Promise<{ mode: ProxyStatus['tls']['mode']; certificate?: LoadedCertificate }> {
  const tls = options.tls ?? 'self-signed';
  if (tls === 'none') {
    logger.warn('TLS is off (--insecure-http): credentials and segments cross the network in clear text');
    return { mode: 'none' };
  }
  if (tls === 'self-signed') {
    const certificate = await selfSignedCertificate(path.join(options.spoolDir, 'tls'), [host]);
    if (certificate) return { mode: 'self-signed', certificate };
    if (!isLoopback(host)) {
      throw new ConfigError(
        'The proxy needs a TLS certificate: openssl is not installed to make a self-signed one. ' +
          'Pass --tls-cert and --tls-key, or listen on 127.0.0.1 for plain local HTTP.',
        'tls',
      );
    }
    logger.warn(
      'openssl is not installed, so no self-signed certificate: serving plain HTTP on the loopback address only',
    );
    return { mode: 'none' };
  }
  return { mode: 'certificate', certificate: await loadCertificate(tls) };
}

/** Starts the proxy: opens (and rescans) the spool, resumes uploads, then listens. */
export async function startProxy(options: ProxyOptions): Promise<RunningProxy> {
  const settings = options.settings ?? process.env;
  const logger = options.logger ?? createLogger('proxy');
  const host = options.host ?? '0.0.0.0';
  const maxSegmentBytes = options.maxSegmentBytes ?? MAX_SEGMENT_BYTES;
  if (!Number.isSafeInteger(maxSegmentBytes) || maxSegmentBytes < 1 || maxSegmentBytes > MAX_SEGMENT_BYTES) {
    throw new ConfigError(
      `maxSegmentBytes must be from 1 to ${MAX_SEGMENT_BYTES}; got ${maxSegmentBytes}.`,
      'maxSegmentBytes',
    );
  }
  const spoolCapBytes = options.spoolCapBytes ?? 10 * 1024 ** 3;
  const keyRing = options.keyRing ?? keyRingFromSettings(settings);
  const codec = usableCodec(options.codec ?? DEFAULT_CODEC);
  if (codec !== (options.codec ?? DEFAULT_CODEC)) {
    logger.warn(
      { codec },
      `the ${options.codec ?? DEFAULT_CODEC} codec's native module did not load; compressing with ${codec}`,
    );
  }
  const container = options.container ?? cacheContainer(settings);
  const sender =
    options.sender ?? createMessageSender(settings, SETTING.serviceBus, changelogQueueName(settings));
  const lookup =
    options.credentials ??
    new TableCredentialLookup(new StorageClients(SETTING.replicaStorage, settings).table(MACHINES_TABLE));
  const tls = await resolveTls(options, host, logger);

  const spool = await Spool.open(options.spoolDir, {
    archivedChecksum: (address) => cachedChecksum(container, keyRing, address),
  });
  const up = new Uploader({
    spool,
    container,
    sender,
    keyRing,
    codec,
    logger,
    concurrency: options.uploadConcurrency,
    bandwidthBytesPerSecond: options.bandwidthBytesPerSecond,
    retry: options.retry,
  });
  if (spool.segments > 0)
    logger.info({ segments: spool.segments, bytes: spool.bytes }, 'resuming uploads from the spool');
  up.start();

  const startedAt = Date.now();
  const counters: IngestCounters = {
    created: 0,
    duplicates: 0,
    conflicts: 0,
    rejected: 0,
    throttled: 0,
    bytesReceived: 0,
  };
  const tlsStatus = { mode: tls.mode, fingerprint256: tls.certificate?.fingerprint256 ?? null };
  const status = (): ProxyStatus =>
    buildStatus({
      startedAt,
      tls: tlsStatus,
      spool,
      capBytes: spoolCapBytes,
      ingest: counters,
      uploader: up,
    });
  const auth = new MachineAuthenticator(lookup, options.credentialCacheMs);
  const groups =
    options.groups === false
      ? undefined
      : (options.groups ?? SiteGroups.fromSettings(settings, (a, m) => auth.authorize(a, m), logger));
  groups?.start();
  const handler = createIngestHandler({
    groups,
    spool,
    uploader: up,
    auth,
    commands: options.commands ?? new TableCommandStore(settings),
    logger,
    maxSegmentBytes,
    spoolCapBytes,
    maxConcurrentRequests: options.maxConcurrentRequests ?? 64,
    maxBufferedBytes: options.maxBufferedBytes ?? 1024 ** 3,
    counters,
    status,
  });
  const server = tls.certificate
    ? https.createServer({ cert: tls.certificate.cert, key: tls.certificate.key }, handler)
    : http.createServer(handler);
  // A 64 MiB segment over a slow site link can take minutes.
  server.requestTimeout = 15 * 60_000;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? DEFAULT_PROXY_PORT, host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const shownHost =
    host === '0.0.0.0' || host === '::' ? '127.0.0.1' : host.includes(':') ? `[${host}]` : host;
  const url = `${tls.certificate ? 'https' : 'http'}://${shownHost}:${port}`;
  logger.info(
    { url, tls: tls.mode, fingerprint256: tls.certificate?.fingerprint256, spool: spool.root, codec },
    'proxy listening',
  );

  let stopping: Promise<void> | undefined;
  return {
    url,
    port,
    fingerprint256: tls.certificate?.fingerprint256,
    certificate: tls.certificate?.cert,
    spool,
    status,
    drained: () => up.drained(),
    stop: () =>
      (stopping ??= (async () => {
        await new Promise<void>((resolve) => {
          server.close(() => resolve());
          server.closeAllConnections();
        });
        await groups?.stop();
        await up.stop();
        if (!options.sender) await sender.close();
      })()),
  };
}
