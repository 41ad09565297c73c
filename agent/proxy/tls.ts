import { execFile } from 'node:child_process';
import { X509Certificate } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { ConfigError } from '../../shared/errors';

export interface CertificateFiles {
  certFile: string;
  keyFile: string;
}

export interface LoadedCertificate {
  cert: Buffer;
  key: Buffer;
  /** SHA-256 fingerprint (colon-separated hex), what an agent pins for a self-signed proxy. */
  fingerprint256: string;
}

export async function loadCertificate(files: CertificateFiles): Promise<LoadedCertificate> {
  let cert: Buffer;
  let key: Buffer;
  try {
    [cert, key] = await Promise.all([fs.readFile(files.certFile), fs.readFile(files.keyFile)]);
  } catch (err) {
    throw new ConfigError(
      `The proxy could not read its TLS certificate or key (${(err as Error).message}); check --tls-cert and --tls-key.`,
      'tls',
    );
  }
  let fingerprint256: string;
  try {
    fingerprint256 = new X509Certificate(cert).fingerprint256;
  } catch (err) {
    throw new ConfigError(`${files.certFile} is not a PEM certificate (${(err as Error).message}).`, 'tls');
  }
  return { cert, key, fingerprint256 };
}

/**
 * A self-signed certificate for local use, made once with the `openssl` command and kept in
 * `dir` (Node has no certificate generator). Resolves undefined when openssl is not installed.
 */
export async function selfSignedCertificate(
  dir: string,
  hostNames: string[] = [],
): Promise<LoadedCertificate | undefined> {
  const files = { certFile: path.join(dir, 'proxy-cert.pem'), keyFile: path.join(dir, 'proxy-key.pem') };
  try {
    await fs.access(files.certFile);
    await fs.access(files.keyFile);
    return await loadCertificate(files);
  } catch {
    /* make one below */
  }
  await fs.mkdir(dir, { recursive: true });
  const names = new Set([
    'localhost',
    os.hostname(),
    ...hostNames.filter((h) => !/^[\d.:]+$/.test(h) && h !== ''),
  ]);
  const ips = new Set([
    '127.0.0.1',
    '::1',
    ...hostNames.filter((h) => /^[\d.:]+$/.test(h) && h !== '0.0.0.0' && h !== '::'),
  ]);
  const san = [...[...names].map((n) => `DNS:${n}`), ...[...ips].map((ip) => `IP:${ip}`)].join(',');
  const temp = {
    certFile: `${files.certFile}.${process.pid}.tmp`,
    keyFile: `${files.keyFile}.${process.pid}.tmp`,
  };
  try {
    await promisify(execFile)('openssl', [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:prime256v1',
      '-nodes',
      '-days',
      '825',
      '-subj',
      '/CN=lifeboat-proxy',
      '-addext',
      `subjectAltName=${san}`,
      '-keyout',
      temp.keyFile,
      '-out',
      temp.certFile,
    ]);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new ConfigError(
      `openssl could not make a self-signed certificate: ${(err as Error).message}`,
      'tls',
    );
  }
  await fs.chmod(temp.keyFile, 0o600);
  await fs.rename(temp.keyFile, files.keyFile);
  await fs.rename(temp.certFile, files.certFile);
  return loadCertificate(files);
}
