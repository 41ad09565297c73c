import { app } from '@azure/functions';
import {
  applyRetention,
  defaultReplicationDeps,
  DEFAULT_RETENTION_SCHEDULE,
  REPLICATION_SETTING,
} from '../../shared/replication';

// Prune recovery points and their snapshots by each machine's policy (every 15 minutes).
app.timer('retention', {
  schedule: process.env[REPLICATION_SETTING.retentionSchedule] || DEFAULT_RETENTION_SCHEDULE,
  handler: async () => {
    await applyRetention(defaultReplicationDeps(), new Date());
  },
});
