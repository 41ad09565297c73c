import { createDecipheriv, randomBytes } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  CODECS,
  EnvelopeError,
  KeyRing,
  changelogBlobName,
  codecAvailable,
  compressWith,
  decompressWith,
  generateEncryptionKey,
  openEnvelope,
  parseKeyRing,
  readEnvelopeHeader,
  sealEnvelope,
  type Codec,
} from '../../shared/envelope';
import { ConfigError } from '../../shared/errors';

const ring1 = parseKeyRing(generateEncryptionKey('k1'));
const name = changelogBlobName({ machine: 'web-1', disk: 'd0', epoch: 3, seq: 42 });

function diskish(n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i += 4096) b.write('the quick brown fox '.repeat(50), i, Math.min(1000, n - i));
  return b;
}

/** An independent model of the envelope layout: decrypt by hand with node:crypto. */
function openByHand(blob: Buffer, blobName: string, key: Buffer): Buffer {
  const k = blob[6];
  const headerLength = 7 + k + 4 + 12;
  const nonce = blob.subarray(7 + k + 4, headerLength);
  const d = createDecipheriv('aes-256-gcm', key, nonce);
  d.setAAD(Buffer.concat([blob.subarray(0, headerLength), Buffer.from(blobName)]));
  d.setAuthTag(blob.subarray(blob.length - 16));
  return Buffer.concat([d.update(blob.subarray(headerLength, blob.length - 16)), d.final()]);
}

describe('changelogBlobName', () => {
  it('pads seq to 12 digits', () => {
    expect(name).toBe('web-1/d0/3/000000000042.seg');
  });
});

describe('key ring', () => {
  it('parses id:base64 entries; the first is current and all decrypt', () => {
    const a = randomBytes(32);
    const b = randomBytes(32);
    const ring = parseKeyRing(` k2:${a.toString('base64')} , k1:${b.toString('base64')}`);
    expect(ring.current.id).toBe('k2');
    expect(ring.current.key.equals(a)).toBe(true);
    expect(ring.get('k1')!.key.equals(b)).toBe(true);
    expect(ring.ids).toEqual(['k2', 'k1']);
  });

  it.each([
    ['', 'empty'],
    ['k1', 'no colon'],
    [`k1:${randomBytes(16).toString('base64')}`, 'short key'],
    ['k1:not base64!!', 'bad base64'],
    [`k 1:${randomBytes(32).toString('base64')}`, 'bad id'],
    [`k1:${randomBytes(32).toString('base64')},k1:${randomBytes(32).toString('base64')}`, 'duplicate'],
  ])('rejects %j (%s) with a ConfigError naming the setting, never the key', (value) => {
    let err: unknown;
    try {
      parseKeyRing(value);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ConfigError);
    expect((err as ConfigError).target).toBe('LIFEBOAT_ENCRYPTION_KEYS');
    const keyText = value.split(':')[1];
    if (keyText && keyText.length > 10) expect((err as Error).message).not.toContain(keyText.trim());
  });
});

describe('codecs', () => {
  it.each(CODECS.filter((c) => codecAvailable(c)))(
    '%s round-trips and checks the declared length',
    (codec) => {
      fc.assert(
        fc.property(fc.uint8Array({ maxLength: 20000 }), fc.boolean(), (bytes, repetitive) => {
          const data = repetitive ? diskish(bytes.length) : Buffer.from(bytes);
          const packed = compressWith(codec as Codec, data);
          expect(decompressWith(codec as Codec, packed, data.length).equals(data)).toBe(true);
          if (codec !== 'none')
            expect(() => decompressWith(codec as Codec, packed, data.length + 1)).toThrow(EnvelopeError);
        }),
        { numRuns: 40 },
      );
    },
  );

  it('zstd and lz4 load here (they are installed)', () => {
    expect(codecAvailable('zstd')).toBe(true);
    expect(codecAvailable('lz4')).toBe(true);
  });
});

describe('sealEnvelope / openEnvelope', () => {
  it('round-trips every codec and matches an independent decryption of the layout', () => {
    const data = diskish(200_000);
    for (const codec of CODECS) {
      const blob = sealEnvelope(data, { name, keyRing: ring1, codec });
      const header = readEnvelopeHeader(blob);
      expect(header.codec).toBe(codec);
      expect(header.keyId).toBe('k1');
      expect(header.plaintextLength).toBe(data.length);
      expect(openEnvelope(blob, { name, keyRing: ring1 }).equals(data)).toBe(true);
      const payload = openByHand(blob, name, ring1.current.key);
      expect(decompressWith(codec, payload, data.length).equals(data)).toBe(true);
      expect(blob.includes(data.subarray(0, 64))).toBe(false);
    }
  });

  it('stores incompressible data with codec none', () => {
    const data = randomBytes(10_000);
    const blob = sealEnvelope(data, { name, keyRing: ring1 });
    expect(readEnvelopeHeader(blob).codec).toBe('none');
    expect(blob.length).toBe(data.length + 7 + 2 + 4 + 12 + 16);
    expect(openEnvelope(blob, { name, keyRing: ring1 }).equals(data)).toBe(true);
  });

  it('uses a fresh nonce every time', () => {
    const data = diskish(1000);
    const a = sealEnvelope(data, { name, keyRing: ring1 });
    const b = sealEnvelope(data, { name, keyRing: ring1 });
    expect(readEnvelopeHeader(a).nonce.equals(readEnvelopeHeader(b).nonce)).toBe(false);
  });

  it('fails under any other name', () => {
    const data = diskish(5000);
    const blob = sealEnvelope(data, { name, keyRing: ring1 });
    for (const other of [
      changelogBlobName({ machine: 'web-1', disk: 'd0', epoch: 3, seq: 43 }),
      changelogBlobName({ machine: 'web-1', disk: 'd1', epoch: 3, seq: 42 }),
      changelogBlobName({ machine: 'web-2', disk: 'd0', epoch: 3, seq: 42 }),
      changelogBlobName({ machine: 'web-1', disk: 'd0', epoch: 4, seq: 42 }),
      'web-1/d0/3/42',
    ]) {
      expect(() => openEnvelope(blob, { name: other, keyRing: ring1 })).toThrowError(
        expect.objectContaining({ reason: 'authentication-failed', code: 'EnvelopeAuthenticationFailed' }),
      );
    }
  });

  it('fails with another key of the same id, and names a missing key id', () => {
    const data = diskish(5000);
    const blob = sealEnvelope(data, { name, keyRing: ring1 });
    const impostor = parseKeyRing(generateEncryptionKey('k1'));
    expect(() => openEnvelope(blob, { name, keyRing: impostor })).toThrowError(
      expect.objectContaining({ reason: 'authentication-failed' }),
    );
    const other = parseKeyRing(generateEncryptionKey('k9'));
    expect(() => openEnvelope(blob, { name, keyRing: other })).toThrowError(
      /key "k1", which is not in LIFEBOAT_ENCRYPTION_KEYS/,
    );
  });

  it('supports rotation: new blobs use the new key, old blobs still open', () => {
    const k1 = generateEncryptionKey('k1');
    const k2 = generateEncryptionKey('k2');
    const before = parseKeyRing(k1);
    const after = parseKeyRing(`${k2},${k1}`);
    const data = diskish(3000);
    const old = sealEnvelope(data, { name, keyRing: before });
    const fresh = sealEnvelope(data, { name, keyRing: after });
    expect(readEnvelopeHeader(fresh).keyId).toBe('k2');
    expect(openEnvelope(old, { name, keyRing: after }).equals(data)).toBe(true);
    expect(openEnvelope(fresh, { name, keyRing: after }).equals(data)).toBe(true);
    expect(() => openEnvelope(fresh, { name, keyRing: before })).toThrowError(
      expect.objectContaining({ reason: 'unknown-key' }),
    );
  });

  it('detects any single flipped bit (header, nonce, ciphertext or tag)', () => {
    const data = diskish(3000);
    const blob = sealEnvelope(data, { name, keyRing: ring1 });
    fc.assert(
      fc.property(fc.nat({ max: blob.length * 8 - 1 }), (bit) => {
        const bad = Buffer.from(blob);
        bad[bit >> 3] ^= 1 << (bit & 7);
        expect(() => openEnvelope(bad, { name, keyRing: ring1 })).toThrow(EnvelopeError);
      }),
      { numRuns: 300 },
    );
  });

  it('rejects truncation, bad magic and oversize declarations without decrypting', () => {
    const data = diskish(3000);
    const blob = sealEnvelope(data, { name, keyRing: ring1 });
    for (let n = 0; n < 40; n++) {
      expect(() => openEnvelope(blob.subarray(0, n), { name, keyRing: ring1 })).toThrow(EnvelopeError);
    }
    expect(() =>
      openEnvelope(Buffer.concat([Buffer.from('XXXX'), blob.subarray(4)]), { name, keyRing: ring1 }),
    ).toThrowError(expect.objectContaining({ reason: 'bad-magic' }));
    expect(() => openEnvelope(blob, { name, keyRing: ring1, maxPlaintextBytes: 100 })).toThrowError(
      expect.objectContaining({ reason: 'too-large' }),
    );
  });

  it('the key ring constructor refuses wrong key sizes', () => {
    expect(() => new KeyRing([{ id: 'k1', key: Buffer.alloc(16) }])).toThrow(ConfigError);
    expect(() => new KeyRing([])).toThrow(ConfigError);
  });
});
