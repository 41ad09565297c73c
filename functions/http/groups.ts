import { randomUUID } from 'node:crypto';
import { app } from '@azure/functions';
import * as df from 'durable-functions';
import { NotFoundError } from '../../shared/errors';
import { defaultFailoverDeps, failoverIdFromUuid } from '../../shared/failover';
import {
  GroupStore,
  listGroupPoints,
  prepareGroupFailover,
  putGroup,
  readGroup,
  releaseGroupClaims,
  type GroupStore as Store,
} from '../../shared/groups';
import { defaultReplicationDeps, getMachineStatus } from '../../shared/replication';
import '../orchestrations/group-failover';
import { GROUP_ORCHESTRATION } from '../orchestrations/names';
import { startOperation } from './operations';
import { claimHolderEnded } from './protection';
import { intQuery, jsonBody, withErrors } from './respond';

let store: Store | undefined;
const groups = (): Store => (store ??= GroupStore.fromSettings(defaultReplicationDeps().tables));

app.http('groups-put', {
  route: 'groups/{group}',
  methods: ['PUT'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const result = await putGroup(groups(), request.params.group, await jsonBody(request));
    return { status: result.created ? 201 : 200, jsonBody: result.group };
  }),
});

app.http('groups-get', {
  route: 'groups/{group}',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const group = await readGroup(groups(), request.params.group);
    const deps = defaultReplicationDeps();
    const members = await Promise.all(
      group.members.map(async (m) => {
        try {
          const s = await getMachineStatus(deps, m);
          return { machine: m, registered: true, health: s.health, rpoSeconds: s.rpo.seconds };
        } catch (err) {
          if (err instanceof NotFoundError)
            return { machine: m, registered: false, health: 'not-registered', rpoSeconds: null };
          throw err;
        }
      }),
    );
    const points = await listGroupPoints(groups(), group.name, { top: 50 });
    const order = ['not-registered', 'resync-required', 'critical', 'initial-sync', 'protected'];
    const health =
      members.map((m) => m.health).sort((a, b) => order.indexOf(a) - order.indexOf(b))[0] ?? 'protected';
    return {
      jsonBody: {
        ...group,
        health,
        members,
        latestGroupPoint: points[0] ?? null,
        latestAppConsistentGroupPoint: points.find((p) => p.type === 'group-app-consistent') ?? null,
      },
    };
  }),
});

app.http('groups-recovery-points', {
  route: 'groups/{group}/recovery-points',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const type = request.query.get('type');
    const points = await listGroupPoints(groups(), request.params.group, {
      type:
        type === 'app' || type === 'group-app-consistent'
          ? 'app'
          : type === 'crash' || type === 'group-crash-consistent'
            ? 'crash'
            : undefined,
      top: intQuery(request, 'top', 1, 1000),
    });
    return { jsonBody: { value: points } };
  }),
});

app.http('groups-failover', {
  route: 'groups/{group}/failover',
  methods: ['POST'],
  authLevel: 'function',
  extraInputs: [df.input.durableClient()],
  handler: withErrors(async (request, context) => {
    const deps = defaultFailoverDeps();
    const group = request.params.group;
    const runId = `group-${group}-${randomUUID().replace(/-/g, '').slice(0, 8)}`;
    const run = await prepareGroupFailover(
      deps,
      groups(),
      group,
      await jsonBody(request),
      runId,
      () => failoverIdFromUuid(randomUUID()),
      claimHolderEnded(df.getClient(context), deps.now),
    );
    return startOperation(
      request,
      context,
      GROUP_ORCHESTRATION.failover,
      runId,
      run,
      {
        group,
        recoveryPoint: run.point.id,
        members: run.members.map((m) => ({ machine: m.machine, failoverId: m.failoverId })),
      },
      () => releaseGroupClaims(deps, run.members),
    );
  }),
});
