import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import zlib from 'node:zlib';
import { SETTING, requireSetting, type Settings } from './config';
import { ConfigError, LifeboatError } from './errors';

// The envelope of a cache blob: the segment bytes, compressed, then sealed with AES-256-GCM under
// a key from LIFEBOAT_ENCRYPTION_KEYS and bound to the blob's name. docs/envelope.md is the
// byte-level description.
//
//   offset  size  field
//   0       4     magic "LBEV"
//   4       1     version (1)
//   5       1     codec id: 0 none, 1 gzip, 2 brotli, 3 zstd, 4 lz4
//   6       1     key id length k (1..64)
//   7       k     key id (ASCII)
//   7+k     4     plaintext length (u32 LE): the size of the segment before compression
//   11+k    12    nonce
//   23+k    n     ciphertext (the compressed bytes)
//   23+k+n  16    GCM tag
//
// AAD = the header (bytes 0 .. 23+k, nonce included) followed by the UTF-8 blob name, so a blob
// copied to another name, or a header with an edited codec, key id or length, fails to open.

export const ENVELOPE_MAGIC = Buffer.from('LBEV', 'latin1');
export const ENVELOPE_VERSION = 1;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const KEY_BYTES = 32;
export const MAX_KEY_ID_LENGTH = 64;
/** Default bound on what opening an envelope will allocate for the plaintext (the segment limit). */
export const DEFAULT_MAX_PLAINTEXT_BYTES = 64 * 1024 * 1024;

/** The cache container and the blob name of a segment: the name every envelope is bound to. */
export const CHANGELOG_CONTAINER = 'changelogs';

export interface SegmentAddress {
  machine: string;
  disk: string;
  epoch: number;
  seq: number;
}

/** `{machine}/{disk}/{epoch}/{seq:012}.seg`: the blob name, and the canonical AAD string. */
export function changelogBlobName(address: SegmentAddress): string {
  return `${address.machine}/${address.disk}/${address.epoch}/${String(address.seq).padStart(12, '0')}.seg`;
}

export const CODECS = ['none', 'gzip', 'brotli', 'zstd', 'lz4'] as const;
export type Codec = (typeof CODECS)[number];
const CODEC_ID: Record<Codec, number> = { none: 0, gzip: 1, brotli: 2, zstd: 3, lz4: 4 };

/**
 * The codec chosen by measurement (bench/compression.ts, docs/envelope.md): on disk-like data zstd
 * level 1 ran at ~350 MB/s and 2.6x, lz4 ~280 MB/s and 2.0x, brotli q1 ~200 MB/s and 2.6x, gzip-6
 * ~38 MB/s and 2.8x. When the native module is missing, sealing falls back to brotli q1 (pure Node).
 */
export const DEFAULT_CODEC: Codec = 'zstd';
export const FALLBACK_CODEC: Codec = 'brotli';

export type EnvelopeErrorReason =
  | 'bad-magic'
  | 'unsupported-version'
  | 'unknown-codec'
  | 'codec-unavailable'
  | 'truncated'
  | 'unknown-key'
  | 'authentication-failed'
  | 'too-large'
  | 'decompression-failed';

/**
 * A blob that is not a valid envelope, was sealed under another name or key, or was altered.
 * `reason` is stable; the code is EnvelopeAuthenticationFailed for a wrong name/key/tampering,
 * EnvelopeUnknownKey when the key id is not in the ring, EnvelopeInvalid otherwise.
 */
export class EnvelopeError extends LifeboatError {
  readonly reason: EnvelopeErrorReason;

  constructor(reason: EnvelopeErrorReason, message: string, target?: string) {
    const code =
      reason === 'authentication-failed'
        ? 'EnvelopeAuthenticationFailed'
        : reason === 'unknown-key'
          ? 'EnvelopeUnknownKey'
          : 'EnvelopeInvalid';
    super(code, message, { status: 500, target });
    this.reason = reason;
  }
}

// ---- keys ----

export interface EncryptionKey {
  id: string;
  key: Buffer;
}

const KEY_ID = /^[A-Za-z0-9._-]{1,64}$/;

/** The keys this process may use: the first encrypts, all of them decrypt (rotation). */
export class KeyRing {
  readonly current: EncryptionKey;
  private readonly byId: Map<string, EncryptionKey>;

  constructor(keys: readonly EncryptionKey[]) {
    if (keys.length === 0)
      throw new ConfigError('An encryption key ring needs at least one key.', SETTING.encryptionKeys);
    this.byId = new Map();
    for (const k of keys) {
      if (!KEY_ID.test(k.id)) {
        throw new ConfigError(
          `Encryption key id ${JSON.stringify(k.id)} is invalid: use 1-64 letters, digits, '.', '_' or '-'.`,
          SETTING.encryptionKeys,
        );
      }
      if (k.key.length !== KEY_BYTES) {
        throw new ConfigError(
          `Encryption key ${k.id} must be ${KEY_BYTES} bytes, got ${k.key.length}.`,
          SETTING.encryptionKeys,
        );
      }
      if (this.byId.has(k.id)) {
        throw new ConfigError(
          `Encryption key id ${k.id} appears twice in ${SETTING.encryptionKeys}.`,
          SETTING.encryptionKeys,
        );
      }
      this.byId.set(k.id, { id: k.id, key: Buffer.from(k.key) });
    }
    this.current = this.byId.get(keys[0].id)!;
  }

  get(id: string): EncryptionKey | undefined {
    return this.byId.get(id);
  }

  get ids(): string[] {
    return [...this.byId.keys()];
  }
}

/**
 * Parses `id:base64key[,id:base64key…]` (each key 32 bytes, standard base64). The messages name
 * the setting and the key id, never the key.
 */
export function parseKeyRing(value: string, setting: string = SETTING.encryptionKeys): KeyRing {
  const keys: EncryptionKey[] = [];
  const entries = value
    .split(',')
    .map((e) => e.trim())
    .filter((e) => e !== '');
  if (entries.length === 0) {
    throw new ConfigError(`${setting} is empty: set it to "k1:<base64 of 32 random bytes>".`, setting);
  }
  for (const [i, entry] of entries.entries()) {
    const colon = entry.indexOf(':');
    if (colon <= 0) {
      throw new ConfigError(
        `${setting} entry ${i + 1} is not "id:base64key" (for example "k1:<base64 of 32 bytes>").`,
        setting,
      );
    }
    const id = entry.slice(0, colon).trim();
    const text = entry.slice(colon + 1).trim();
    const key = Buffer.from(text, 'base64');
    if (!/^[A-Za-z0-9+/]+={0,2}$/.test(text) || key.toString('base64') !== text || key.length !== KEY_BYTES) {
      throw new ConfigError(
        `${setting} key ${JSON.stringify(id)} is not ${KEY_BYTES} bytes of standard base64 ` +
          `(generate one with: node -e "console.log(require('crypto').randomBytes(32).toString('base64'))").`,
        setting,
      );
    }
    keys.push({ id, key });
  }
  return new KeyRing(keys);
}

export function keyRingFromSettings(settings: Settings = process.env): KeyRing {
  return parseKeyRing(requireSetting(settings, SETTING.encryptionKeys));
}

/** A new `id:base64` entry for LIFEBOAT_ENCRYPTION_KEYS (for local set-up and tests). */
export function generateEncryptionKey(id = 'k1'): string {
  return `${id}:${randomBytes(KEY_BYTES).toString('base64')}`;
}

// ---- codecs ----

interface NativeCodec {
  compress(data: Buffer): Buffer;
  decompress(data: Buffer, expectedLength: number): Buffer;
}

type NativeLoad = { codec?: NativeCodec; error?: Error };
const native = new Map<Codec, NativeLoad>();

function loadNative(codec: 'zstd' | 'lz4'): NativeLoad {
  let loaded = native.get(codec);
  if (loaded) return loaded;
  try {
    if (codec === 'zstd') {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const zstd = require('zstd-napi') as typeof import('zstd-napi');
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const binding = require('zstd-napi/binding') as { getFrameContentSize(b: Uint8Array): number | null };
      loaded = {
        codec: {
          compress: (data) => zstd.compress(data, { compressionLevel: 1 }),
          decompress: (data, expected) => {
            if (binding.getFrameContentSize(data) !== expected)
              throw new Error('zstd frame size differs from the header');
            return zstd.decompress(data);
          },
        },
      };
    } else {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const lz4 = require('lz4-napi') as typeof import('lz4-napi');
      loaded = {
        codec: {
          compress: (data) => lz4.compressSync(data),
          decompress: (data, expected) => {
            if (data.length < 4 || data.readUInt32LE(0) !== expected)
              throw new Error('lz4 size prefix differs from the header');
            return lz4.uncompressSync(data);
          },
        },
      };
    }
  } catch (err) {
    loaded = { error: err as Error };
  }
  native.set(codec, loaded);
  return loaded;
}

/** True when this process can compress and decompress with `codec`. */
export function codecAvailable(codec: Codec): boolean {
  return codec === 'zstd' || codec === 'lz4' ? loadNative(codec).codec !== undefined : true;
}

/** `preferred` when it can run here, otherwise the pure-Node fallback. */
export function usableCodec(preferred: Codec): Codec {
  return codecAvailable(preferred) ? preferred : FALLBACK_CODEC;
}

export function compressWith(codec: Codec, data: Buffer): Buffer {
  switch (codec) {
    case 'none':
      return data;
    case 'gzip':
      return zlib.gzipSync(data, { level: 6 });
    case 'brotli':
      return zlib.brotliCompressSync(data, {
        params: {
          [zlib.constants.BROTLI_PARAM_QUALITY]: 1,
          [zlib.constants.BROTLI_PARAM_SIZE_HINT]: data.length,
        },
      });
    case 'zstd':
    case 'lz4': {
      const loaded = loadNative(codec);
      if (!loaded.codec) throw codecUnavailable(codec, loaded.error);
      return loaded.codec.compress(data);
    }
  }
}

/** Decompresses, allocating no more than `expectedLength`, and checks the result has that length. */
export function decompressWith(codec: Codec, data: Buffer, expectedLength: number): Buffer {
  let out: Buffer;
  try {
    switch (codec) {
      case 'none':
        out = data;
        break;
      case 'gzip':
        out = zlib.gunzipSync(data, { maxOutputLength: Math.max(1, expectedLength) });
        break;
      case 'brotli':
        out = zlib.brotliDecompressSync(data, { maxOutputLength: Math.max(1, expectedLength) });
        break;
      case 'zstd':
      case 'lz4': {
        const loaded = loadNative(codec);
        if (!loaded.codec) throw codecUnavailable(codec, loaded.error);
        out = loaded.codec.decompress(data, expectedLength);
        break;
      }
    }
  } catch (err) {
    if (err instanceof EnvelopeError) throw err;
    throw new EnvelopeError(
      'decompression-failed',
      `The ${codec} payload did not decompress: ${(err as Error).message}.`,
    );
  }
  if (out.length !== expectedLength) {
    throw new EnvelopeError(
      'decompression-failed',
      `The ${codec} payload decompressed to ${out.length} bytes, the header says ${expectedLength}.`,
    );
  }
  return out;
}

function codecUnavailable(codec: Codec, cause?: Error): EnvelopeError {
  const pkg = codec === 'zstd' ? 'zstd-napi' : 'lz4-napi';
  return new EnvelopeError(
    'codec-unavailable',
    `The ${codec} codec needs the native module ${pkg}, which did not load here` +
      `${cause ? ` (${cause.message.split('\n')[0]})` : ''}; reinstall it (npm rebuild ${pkg}).`,
  );
}

// ---- sealing and opening ----

export interface SealOptions {
  /** The blob name the envelope is bound to (see changelogBlobName). */
  name: string;
  keyRing: KeyRing;
  /** Defaults to DEFAULT_CODEC; falls back to FALLBACK_CODEC when the native module is missing. */
  codec?: Codec;
}

export interface OpenOptions {
  name: string;
  keyRing: KeyRing;
  /** Refuse envelopes declaring a larger plaintext (default DEFAULT_MAX_PLAINTEXT_BYTES). */
  maxPlaintextBytes?: number;
}

export interface EnvelopeHeader {
  version: number;
  codec: Codec;
  keyId: string;
  plaintextLength: number;
  nonce: Buffer;
  /** Bytes of header before the ciphertext. */
  headerLength: number;
}

function aad(header: Buffer, name: string): Buffer {
  return Buffer.concat([header, Buffer.from(name, 'utf8')]);
}

/**
 * Compresses and encrypts `plaintext` for the blob `name`. If compression does not make the data
 * smaller (already-compressed or random blocks), the envelope stores it with codec `none`.
 */
export function sealEnvelope(plaintext: Buffer, options: SealOptions): Buffer {
  if (plaintext.length > 0xffffffff) {
    throw new EnvelopeError(
      'too-large',
      `A ${plaintext.length}-byte plaintext does not fit an envelope (4 GiB limit).`,
    );
  }
  let codec = usableCodec(options.codec ?? DEFAULT_CODEC);
  let payload = compressWith(codec, plaintext);
  if (codec !== 'none' && payload.length >= plaintext.length) {
    codec = 'none';
    payload = plaintext;
  }
  const { id, key } = options.keyRing.current;
  const keyId = Buffer.from(id, 'latin1');
  const header = Buffer.alloc(7 + keyId.length + 4 + NONCE_BYTES);
  ENVELOPE_MAGIC.copy(header, 0);
  header[4] = ENVELOPE_VERSION;
  header[5] = CODEC_ID[codec];
  header[6] = keyId.length;
  keyId.copy(header, 7);
  header.writeUInt32LE(plaintext.length, 7 + keyId.length);
  const nonce = randomBytes(NONCE_BYTES);
  nonce.copy(header, 11 + keyId.length);
  const cipher = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: TAG_BYTES });
  cipher.setAAD(aad(header, options.name));
  const body = cipher.update(payload);
  const rest = cipher.final();
  return Buffer.concat([header, body, rest, cipher.getAuthTag()]);
}

/** Reads the header without decrypting (codec, key id, declared size). */
export function readEnvelopeHeader(blob: Buffer): EnvelopeHeader {
  if (blob.length < 7)
    throw new EnvelopeError('truncated', `The blob is ${blob.length} bytes, too short for an envelope.`);
  if (!blob.subarray(0, 4).equals(ENVELOPE_MAGIC)) {
    throw new EnvelopeError(
      'bad-magic',
      'The blob does not start with the envelope magic "LBEV"; it is not a Lifeboat envelope.',
    );
  }
  const version = blob[4];
  if (version !== ENVELOPE_VERSION) {
    throw new EnvelopeError(
      'unsupported-version',
      `Envelope version ${version} is not supported (this build reads ${ENVELOPE_VERSION}).`,
    );
  }
  const codec = CODECS.find((c) => CODEC_ID[c] === blob[5]);
  if (!codec) throw new EnvelopeError('unknown-codec', `Envelope codec id ${blob[5]} is unknown.`);
  const k = blob[6];
  if (k < 1 || k > MAX_KEY_ID_LENGTH)
    throw new EnvelopeError('truncated', `Envelope key id length ${k} is out of range.`);
  const headerLength = 7 + k + 4 + NONCE_BYTES;
  if (blob.length < headerLength + TAG_BYTES) {
    throw new EnvelopeError(
      'truncated',
      `The blob is ${blob.length} bytes, shorter than its header and tag.`,
    );
  }
  return {
    version,
    codec,
    keyId: blob.toString('latin1', 7, 7 + k),
    plaintextLength: blob.readUInt32LE(7 + k),
    nonce: Buffer.from(blob.subarray(11 + k, headerLength)),
    headerLength,
  };
}

/**
 * Decrypts and decompresses an envelope sealed for `name`. Fails with EnvelopeError when the
 * blob was sealed under another name or key, was altered, or declares more than the limit.
 */
export function openEnvelope(blob: Buffer, options: OpenOptions): Buffer {
  const header = readEnvelopeHeader(blob);
  const max = options.maxPlaintextBytes ?? DEFAULT_MAX_PLAINTEXT_BYTES;
  if (header.plaintextLength > max) {
    throw new EnvelopeError(
      'too-large',
      `The envelope declares ${header.plaintextLength} bytes, more than the ${max}-byte limit.`,
    );
  }
  const key = options.keyRing.get(header.keyId);
  if (!key) {
    throw new EnvelopeError(
      'unknown-key',
      `Blob ${options.name} is sealed with key ${JSON.stringify(header.keyId)}, which is not in ${SETTING.encryptionKeys} ` +
        `(known: ${options.keyRing.ids.join(', ')}); add the old key after the current one to keep reading it.`,
      options.name,
    );
  }
  const decipher = createDecipheriv('aes-256-gcm', key.key, header.nonce, { authTagLength: TAG_BYTES });
  decipher.setAAD(aad(blob.subarray(0, header.headerLength), options.name));
  decipher.setAuthTag(blob.subarray(blob.length - TAG_BYTES));
  let payload: Buffer;
  try {
    const body = decipher.update(blob.subarray(header.headerLength, blob.length - TAG_BYTES));
    const rest = decipher.final(); // GCM is a stream mode: empty, but it checks the tag
    payload = rest.length === 0 ? body : Buffer.concat([body, rest]);
  } catch {
    throw new EnvelopeError(
      'authentication-failed',
      `Blob ${options.name} failed authentication under key ${header.keyId}: it was sealed for another name or key, or altered.`,
      options.name,
    );
  }
  return decompressWith(header.codec, payload, header.plaintextLength);
}
