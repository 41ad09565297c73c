import { app } from '@azure/functions';
import { validateName } from '../../shared/names';
import { defaultReplicationDeps, listEvents } from '../../shared/replication';
import { intQuery, pageResponse, withErrors } from './respond';

app.http('events-list', {
  route: 'events',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const machine = request.query.get('machine');
    const page = await listEvents(defaultReplicationDeps().tables, {
      machine: machine === null ? undefined : validateName(machine, 'machine'),
      type: request.query.get('type') ?? undefined,
      top: intQuery(request, 'top', 1, 1000),
      continuationToken: request.query.get('continuationToken') ?? undefined,
    });
    return pageResponse(page);
  }),
});
