import { spawn, type ChildProcess } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';

/** Azurite's well-known development account (public, documented by Microsoft). */
export const DEV_ACCOUNT = 'devstoreaccount1';
export const DEV_KEY =
  'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

export interface AzuritePorts {
  blob: number;
  queue: number;
  table: number;
}

export interface AzuriteOptions {
  /** Folder for Azurite's on-disk data (created if missing). */
  location: string;
  /** Ports to listen on; 0 (or omitted) picks a free port. */
  ports?: Partial<AzuritePorts>;
  host?: string;
  /** Where Azurite's own output goes; by default it is discarded. */
  logFile?: string;
}

export interface RunningAzurite {
  ports: AzuritePorts;
  host: string;
  location: string;
  connectionString: string;
  pid: number;
  stop(): Promise<void>;
}

export function azuriteConnectionString(host: string, ports: AzuritePorts): string {
  return [
    'DefaultEndpointsProtocol=http',
    `AccountName=${DEV_ACCOUNT}`,
    `AccountKey=${DEV_KEY}`,
    `BlobEndpoint=http://${host}:${ports.blob}/${DEV_ACCOUNT}`,
    `QueueEndpoint=http://${host}:${ports.queue}/${DEV_ACCOUNT}`,
    `TableEndpoint=http://${host}:${ports.table}/${DEV_ACCOUNT}`,
  ].join(';');
}

/** Finds a port nothing listens on right now by binding to port 0 and releasing it. */
export async function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.once('error', reject);
    server.listen(0, host, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

async function waitForPort(host: string, port: number, deadline: number, child: ChildProcess): Promise<void> {
  for (;;) {
    if (child.exitCode !== null) {
      throw new Error(`Azurite exited with code ${child.exitCode} before listening on ${host}:${port}`);
    }
    const open = await new Promise<boolean>((resolve) => {
      const socket = net.connect(port, host);
      socket.once('connect', () => {
        socket.destroy();
        resolve(true);
      });
      socket.once('error', () => resolve(false));
    });
    if (open) return;
    if (Date.now() > deadline)
      throw new Error(`Azurite did not listen on ${host}:${port} within the time limit`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Starts Azurite's blob, queue and table services from the npm package, persisting on disk in
 * `location` (in-memory mode keeps every overwritten page and grows without bound under page
 * writes). Resolves once all three ports accept connections.
 */
export async function startAzurite(options: AzuriteOptions): Promise<RunningAzurite> {
  const host = options.host ?? '127.0.0.1';
  mkdirSync(options.location, { recursive: true });
  const ports: AzuritePorts = {
    blob: options.ports?.blob || (await freePort(host)),
    queue: options.ports?.queue || (await freePort(host)),
    table: options.ports?.table || (await freePort(host)),
  };
  const bin = require.resolve('azurite/dist/src/azurite.js');
  const args = [
    bin,
    '--location',
    options.location,
    '--blobHost',
    host,
    '--queueHost',
    host,
    '--tableHost',
    host,
    '--blobPort',
    String(ports.blob),
    '--queuePort',
    String(ports.queue),
    '--tablePort',
    String(ports.table),
    '--skipApiVersionCheck',
    '--disableTelemetry',
    '--loose',
  ];
  if (!options.logFile) args.push('--silent');
  else args.push('--debug', path.resolve(options.logFile));
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'], cwd: options.location });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => {
    stderr = (stderr + d.toString()).slice(-4000);
  });
  const deadline = Date.now() + 30_000;
  try {
    for (const port of [ports.blob, ports.queue, ports.table]) await waitForPort(host, port, deadline, child);
  } catch (err) {
    child.kill('SIGKILL');
    throw new Error(`${(err as Error).message}${stderr ? `\nAzurite said: ${stderr.trim()}` : ''}`);
  }
  return {
    ports,
    host,
    location: options.location,
    connectionString: azuriteConnectionString(host, ports),
    pid: child.pid!,
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null || child.signalCode !== null) return resolve();
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
        child.once('exit', () => {
          clearTimeout(timer);
          resolve();
        });
        child.kill('SIGTERM');
      }),
  };
}
