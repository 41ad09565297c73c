// Failover: recovery-point resolution, failover records and their state machine, recovery plans,
// agent commands, and the compute providers (local, azure). docs/failover.md describes it.
export * from './model';
export * from './tables';
export * from './records';
export * from './recovery-point';
export * from './commands';
export * from './plan';
export * from './context';
export * from './service';
export * from './activities';
export * from './compute/port';
export * from './compute/local';
export * from './compute/azure';
