import { app } from '@azure/functions';
import { SETTING } from '../../shared/config';
import { defaultReplicationDeps, handleChangelogReady } from '../../shared/replication';

// "Disk D has work": apply its pending change logs to its seed disk (shared/replication/apply.ts).
app.serviceBusQueue('apply-changelogs', {
  connection: SETTING.serviceBus,
  queueName: `%${SETTING.changelogQueue}%`,
  handler: async (message) => {
    await handleChangelogReady(defaultReplicationDeps(), message);
  },
});
