// Resync, reprotect and failback: the cloud side of bringing machines home. docs/reprotect.md.
export * from './tables';
export * from './context';
export * from './resync';
export * from './activities';
export * from './changes';
export * from './ship';
export * from './reprotect';
export * from './passes';
export * from './failback';
export * from './failback-request';
export * from './plan-failback';
