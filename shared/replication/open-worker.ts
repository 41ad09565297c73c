// A worker thread that opens change logs for WorkerOpener (open.ts): the CPU-heavy part of apply.
import { parentPort, workerData } from 'node:worker_threads';
import { KeyRing, type EncryptionKey } from '../envelope';
import { openChangelog, QuarantineReason, type OpenRequest, type OpenResponse } from './open';

const keyRing = new KeyRing(
  (workerData as { keys: EncryptionKey[] }).keys.map((k) => ({ id: k.id, key: Buffer.from(k.key) })),
);

parentPort!.on('message', (request: OpenRequest) => {
  let response: OpenResponse;
  try {
    const bytes = Buffer.from(request.bytes.buffer, request.bytes.byteOffset, request.bytes.byteLength);
    response = { id: request.id, segment: openChangelog(keyRing, request.name, bytes, request.expect) };
  } catch (err) {
    const e = err as Error;
    response = {
      id: request.id,
      error: {
        quarantine: err instanceof QuarantineReason,
        code: err instanceof QuarantineReason ? err.code : 'Error',
        message: e.message,
      },
    };
  }
  // The write data are views of one plaintext buffer: hand it over instead of copying it.
  const transfer =
    'segment' in response
      ? [
          ...new Set(
            response.segment.records.flatMap((r) =>
              r.type === 'write' ? [r.data.buffer as ArrayBuffer] : [],
            ),
          ),
        ]
      : [];
  try {
    parentPort!.postMessage(response, transfer);
  } catch {
    parentPort!.postMessage(response); // a buffer that cannot be detached: copied instead
  }
});
