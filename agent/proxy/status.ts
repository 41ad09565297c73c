import type { Spool } from './spool';
import type { UploadError, Uploader } from './uploader';

/** Counters kept by the ingest server. */
export interface IngestCounters {
  created: number;
  duplicates: number;
  conflicts: number;
  /** Answered 4xx other than 409 (bad credential, name, size or segment). */
  rejected: number;
  /** Answered 429/503 because the spool was full or busy. */
  throttled: number;
  bytesReceived: number;
}

export interface DiskStatus {
  machine: string;
  disk: string;
  backlogSegments: number;
  backlogBytes: number;
  /** Age of the oldest segment not yet shipped, in seconds (0 when none). */
  oldestUnshippedAgeSeconds: number;
  lastAcknowledged: { epoch: number; seq: number } | null;
  lastShipped: { epoch: number; seq: number } | null;
}

/** `GET /v1/status`. */
export interface ProxyStatus {
  version: 1;
  startedAt: string;
  uptimeSeconds: number;
  tls: { mode: 'certificate' | 'self-signed' | 'none'; fingerprint256: string | null };
  spool: { folder: string; bytes: number; segments: number; capBytes: number; full: boolean };
  ingest: IngestCounters;
  upload: {
    segmentsShipped: number;
    bytesShipped: number;
    bytesUploaded: number;
    bytesPerSecond: number;
    activeDisks: number;
    errors: number;
    lastError: UploadError | null;
  };
  disks: DiskStatus[];
}

export function buildStatus(input: {
  startedAt: number;
  tls: ProxyStatus['tls'];
  spool: Spool;
  capBytes: number;
  ingest: IngestCounters;
  uploader: Uploader;
}): ProxyStatus {
  const now = Date.now();
  const up = input.uploader.getStats();
  return {
    version: 1,
    startedAt: new Date(input.startedAt).toISOString(),
    uptimeSeconds: Math.round((now - input.startedAt) / 1000),
    tls: input.tls,
    spool: {
      folder: input.spool.root,
      bytes: input.spool.bytes,
      segments: input.spool.segments,
      capBytes: input.capBytes,
      full: input.spool.bytes >= input.capBytes,
    },
    ingest: { ...input.ingest },
    upload: {
      segmentsShipped: up.segmentsShipped,
      bytesShipped: up.bytesShipped,
      bytesUploaded: up.bytesUploaded,
      bytesPerSecond: Math.round(up.bytesPerSecond),
      activeDisks: up.activeDisks,
      errors: up.errors,
      lastError: up.lastError ?? null,
    },
    disks: input.spool
      .diskSpools()
      .map((d) => ({
        machine: d.machine,
        disk: d.disk,
        backlogSegments: d.pending.length,
        backlogBytes: d.pendingBytes,
        oldestUnshippedAgeSeconds:
          d.pending.length === 0
            ? 0
            : Math.max(0, (now - d.pending.reduce((m, p) => Math.min(m, p.receivedAt), now)) / 1000),
        lastAcknowledged: input.spool.lastAcknowledged(d.machine, d.disk) ?? null,
        lastShipped: d.lastShipped ?? null,
      }))
      .sort((a, b) => (a.machine + '/' + a.disk < b.machine + '/' + b.disk ? -1 : 1)),
  };
}
