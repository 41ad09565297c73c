import { app } from '@azure/functions';
import {
  blockChecksums,
  checksumsHeaders,
  checksumsJson,
  defaultReplicationDeps,
  getMachineStatus,
  listMachineStatuses,
  listRecoveryPoints,
  readMachine,
  registerMachine,
} from '../../shared/replication';
import { intQuery, jsonBody, pageResponse, withErrors } from './respond';

app.http('machines-register', {
  route: 'machines/{machine}',
  methods: ['PUT'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const result = await registerMachine(
      defaultReplicationDeps(),
      request.params.machine,
      await jsonBody(request),
    );
    return { status: result.created ? 201 : 200, jsonBody: result };
  }),
});

app.http('machines-list', {
  route: 'machines',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async () => ({
    jsonBody: { value: await listMachineStatuses(defaultReplicationDeps()) },
  })),
});

app.http('machines-get', {
  route: 'machines/{machine}',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => ({
    jsonBody: await getMachineStatus(defaultReplicationDeps(), request.params.machine),
  })),
});

app.http('machines-recovery-points', {
  route: 'machines/{machine}/recovery-points',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const deps = defaultReplicationDeps();
    const machine = await readMachine(deps, request.params.machine);
    const page = await listRecoveryPoints(deps.tables, machine.rowKey, {
      type: request.query.get('type') ?? undefined,
      top: intQuery(request, 'top', 1, 1000),
      continuationToken: request.query.get('continuationToken') ?? undefined,
    });
    return pageResponse(page);
  }),
});

app.http('machines-disk-checksums', {
  route: 'machines/{machine}/disks/{disk}/checksums',
  methods: ['GET'],
  authLevel: 'function',
  handler: withErrors(async (request) => {
    const deps = defaultReplicationDeps();
    await readMachine(deps, request.params.machine);
    const checksums = await blockChecksums(deps, {
      machine: request.params.machine,
      disk: request.params.disk,
      blockSize: intQuery(request, 'blockSize', 1, Number.MAX_SAFE_INTEGER),
      offset: intQuery(request, 'offset', 0, Number.MAX_SAFE_INTEGER),
      length: intQuery(request, 'length', 0, Number.MAX_SAFE_INTEGER),
      snapshot: request.query.get('snapshot') ?? undefined,
    });
    if (!(request.headers.get('accept') ?? '').includes('application/octet-stream'))
      return { jsonBody: checksumsJson(checksums) };
    // The agent's answer: 32 raw bytes per block, the rest of the JSON fields as headers.
    return {
      headers: checksumsHeaders(checksums),
      body: checksums.digests,
    };
  }),
});
