import { app } from '@azure/functions';
import {
  defaultReplicationDeps,
  DEFAULT_RPO_SCHEDULE,
  monitorRpo,
  REPLICATION_SETTING,
} from '../../shared/replication';

// Current RPO and backlog per machine; an event when a threshold is crossed either way (every minute).
app.timer('rpo-monitor', {
  schedule: process.env[REPLICATION_SETTING.rpoSchedule] || DEFAULT_RPO_SCHEDULE,
  handler: async () => {
    await monitorRpo(defaultReplicationDeps(), new Date());
  },
});
