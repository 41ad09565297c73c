// Replication groups: membership, group recovery points computed from per-disk marker arrivals.
// docs/groups.md describes the design; the barrier that cuts group markers is agent/group.
export * from './model';
export * from './points';
export * from './failover';
