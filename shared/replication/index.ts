// The cloud replication pipeline: registration and policy, apply of change logs to seed disks,
// recovery points, retention, RPO monitoring, the read model and block checksums for resync.
// docs/replication.md describes the design; docs/api.md the HTTP endpoints.
export * from './context';
export * from './policy';
export * from './tables';
export * from './seed-disk';
export * from './events';
export * from './recovery-points';
export * from './registration';
export * from './apply';
export * from './open';
export * from './retention';
export * from './rpo';
export * from './status';
export * from './checksums';
export * from './checksum-index';
