import { readFileSync } from 'node:fs';
import path from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { MACHINES_TABLE } from '../../../shared/credentials';
import { objectEntries, parseBicep, stringLiteral } from './bicep';
import {
  APP_NEEDS,
  BUILT_IN_ROLES,
  appSettingsOf,
  checkRoles,
  checkSecrets,
  checkSettings,
  connectionsUsed,
  grantsIn,
  loadInfra,
  type Infra,
} from './checks';
import {
  ROOT,
  proxyStorageOperations,
  registeredBindings,
  scanAppSources,
  scanSettings,
  storageOperations,
  type CodeSettings,
  type RegisteredBinding,
} from './code';

const mainText = readFileSync(path.join(ROOT, 'infra/azure/main.bicep'), 'utf8');

/** main.bicep with `edit` applied; fails the test if the text to replace is not there. */
function mutated(from: string | RegExp, to: string): Infra {
  const text = mainText.replace(from, to);
  if (text === mainText) throw new Error(`main.bicep does not contain ${String(from)}`);
  return loadInfra({ 'main.bicep': text });
}

describe('infra/azure against the code', () => {
  let infra: Infra;
  let code: CodeSettings;
  let bindings: RegisteredBinding[];

  beforeAll(() => {
    infra = loadInfra();
    code = scanAppSources();
    bindings = registeredBindings();
  });

  it('loads the built entry point and reads its bindings', () => {
    expect(bindings.length).toBeGreaterThan(0);
    expect(bindings.some((b) => b.function === 'health' && b.type === 'httpTrigger')).toBe(true);
  });

  it('provides every setting the code reads, and no setting the code does not read', () => {
    expect(checkSettings(infra, code, bindings)).toEqual([]);
  });

  it('grants each identity exactly the roles the code needs, on the narrowest resource', () => {
    expect(checkRoles(infra)).toEqual([]);
  });

  it('keeps secrets, shared keys and connection strings out of app settings', () => {
    expect(checkSecrets(infra)).toEqual([]);
  });

  it('declares a need for every connection the code uses', () => {
    const declared = new Set(APP_NEEDS.map((n) => n.setting));
    for (const connection of connectionsUsed(code, bindings).keys()) expect(declared).toContain(connection);
  });

  it('derives the proxy grants from the storage calls in agent/proxy', () => {
    const proxy = proxyStorageOperations();
    expect([...proxy.blob].sort()).toEqual([
      'containers/blobs/read',
      'containers/blobs/write',
      'containers/write',
    ]);
    expect([...proxy.table]).toEqual(['read']);
    expect([...proxy.commands].sort()).toEqual(['read', 'write']);
    expect([...proxy.groups]).toEqual(['read']);
    expect([...proxy.events]).toEqual(['add']);
  });

  it('names each built-in role by the id Azure gives it', () => {
    const roles = objectEntries(infra.main.vars.roles);
    for (const [key, value] of Object.entries(roles)) {
      const name = BUILT_IN_ROLES[stringLiteral(value)!];
      expect(name, `roles.${key}`).toBeDefined();
      const normalise = (s: string) =>
        s
          .toLowerCase()
          .replace(/^azure/, '')
          .replace(/[^a-z]/g, '');
      expect(normalise(name), `roles.${key}`).toBe(normalise(key));
    }
  });

  it('gives the same settings to `func start` users in local.settings.json.sample', () => {
    const sample = JSON.parse(readFileSync(path.join(ROOT, 'local.settings.json.sample'), 'utf8')) as {
      Values: Record<string, string>;
    };
    const keys = Object.keys(sample.Values);
    const local = new Set(['FUNCTIONS_WORKER_RUNTIME']);
    for (const name of code.reads.keys()) {
      if (name.startsWith('APPLICATIONINSIGHTS_')) continue; // telemetry stays off locally
      expect(
        keys.some((k) => k === name || k.startsWith(`${name}__`)),
        `${name} in local.settings.json.sample`,
      ).toBe(true);
    }
    for (const key of keys) {
      if (local.has(key)) continue;
      expect(code.reads.has(key) || code.reads.has(key.split('__')[0]), `${key} is read by the code`).toBe(
        true,
      );
    }
    expect(sample.Values.LIFEBOAT_TELEMETRY).toBe('off');
  });

  it('builds the Flex Consumption app, the queue, the storage and the vault as the design says', () => {
    const site = infra.modules['modules/function-app.bicep'].resources.find(
      (r) => r.type === 'Microsoft.Web/sites',
    )!;
    const config = objectEntries(objectEntries(site.props.properties).functionAppConfig);
    expect(objectEntries(config.runtime)).toEqual({ name: "'node'", version: "'20'" });
    const storage = objectEntries(objectEntries(config.deployment).storage);
    expect(storage.type).toBe("'blobContainer'");
    expect(objectEntries(storage.authentication)).toEqual({
      type: "'UserAssignedIdentity'",
      userAssignedIdentityResourceId: 'identityId',
    });
    const plan = infra.modules['modules/function-app.bicep'].resources.find(
      (r) => r.type === 'Microsoft.Web/serverfarms',
    )!;
    expect(objectEntries(plan.props.sku)).toEqual({ tier: "'FlexConsumption'", name: "'FC1'" });

    const queue = infra.modules['modules/service-bus.bicep'].resources.find(
      (r) => r.type === 'Microsoft.ServiceBus/namespaces/queues',
    )!;
    const queueProps = objectEntries(queue.props.properties);
    expect(queueProps.deadLetteringOnMessageExpiration).toBe('true');
    expect(queueProps.lockDuration).toBe('lockDuration');
    expect(queueProps.maxDeliveryCount).toBe('maxDeliveryCount');
    expect(stringLiteral(infra.main.vars.changelogQueueName)).toBe('changelog-ready');

    const modules = Object.fromEntries(infra.main.modules.map((m) => [m.symbol, m.params]));
    expect(modules.cacheStorage.containers).toBe("[changelogContainer, 'quarantine']");
    expect(modules.cacheStorage.deleteAfterDays).toBe('changeLogRetentionDays');
    expect(modules.replicaStorage.containers).toBe("['seed-disks', 'failover-disks']");
    expect(infra.main.vars.replicaTables).toBe('[machinesTable, commandsTable, groupsTable, eventsTable]');
    expect(stringLiteral(infra.main.vars.machinesTable)).toBe(MACHINES_TABLE);
    expect(infra.main.params.encryptionKeys.decorators).toContain('@secure()');
    expect(appSettingsOf(infra).LIFEBOAT_ENCRYPTION_KEYS).toBe(
      "'@Microsoft.KeyVault(SecretUri=${keyVault.outputs.secretUri})'",
    );
  });

  it('reads role assignments back as principal, role and resource', () => {
    const grants = grantsIn(infra).map((g) => `${g.principal} | ${g.role} | ${g.target}`);
    expect(grants).toContain(
      "appIdentity | Storage Table Data Contributor | storageAccount 'stlbrepl${token}'",
    );
    expect(grants).toContain("proxyIdentity | Storage Table Data Reader | table 'stlbrepl${token}'/machines");
    expect(grants).toContain(
      "proxyIdentity | Storage Table Data Contributor | table 'stlbrepl${token}'/commands",
    );
    expect(grants).toContain(
      "param proxyServicePrincipalId | custom: containers/blobs/read, containers/blobs/write, containers/write | container 'stlbcache${token}'/changelogs",
    );
    expect(grants).toContain("proxyIdentity | Storage Table Data Reader | table 'stlbrepl${token}'/groups");
    expect(grants).toContain(
      "proxyIdentity | custom: tables/entities/add/action, tables/write | table 'stlbrepl${token}'/events",
    );
    expect(grants.filter((g) => !g.startsWith('appIdentity'))).toHaveLength(12);
  });
});

describe('the checks catch mistakes', () => {
  let code: CodeSettings;
  let bindings: RegisteredBinding[];
  beforeAll(() => {
    code = scanAppSources();
    bindings = registeredBindings();
  });

  it('a connection string with an account key in app settings', () => {
    const infra = mutated(
      '  ChangelogQueueName: serviceBus.outputs.queueName\n',
      "  ChangelogQueueName: serviceBus.outputs.queueName\n  CacheStorage: 'DefaultEndpointsProtocol=https;AccountName=x;AccountKey=abc=='\n",
    );
    expect(checkSecrets(infra).join('\n')).toMatch(/CacheStorage holds a storage account key/);
    expect(checkSettings(infra, code, bindings).join('\n')).toMatch(/CacheStorage is set directly/);
  });

  it('a key fetched with listKeys, or the secure parameter itself, in app settings', () => {
    const listed = mutated(
      'LIFEBOAT_COMPUTE: compute',
      "LIFEBOAT_COMPUTE: compute\n  X_KEY: listKeys(hostAccount.id, '2023-05-01').keys[0].value",
    );
    expect(checkSecrets(listed).join('\n')).toMatch(/X_KEY holds a list\* function/);
    const raw = mutated(/LIFEBOAT_ENCRYPTION_KEYS: '[^\n]+'/, 'LIFEBOAT_ENCRYPTION_KEYS: encryptionKeys');
    const problems = checkSecrets(raw).join('\n');
    expect(problems).toMatch(/holds the secure parameter encryptionKeys/);
    expect(problems).toMatch(/must be a Key Vault reference/);
  });

  it('a Service Bus shared access key', () => {
    const infra = mutated(
      / {2}ServiceBusConnection__fullyQualifiedNamespace: [^\n]+\n/,
      "  ServiceBusConnection__fullyQualifiedNamespace: 'Endpoint=sb://x.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey=abc'\n",
    );
    expect(checkSecrets(infra).join('\n')).toMatch(/shared access key/);
  });

  it('a setting the code reads that the app does not get, and one the app gets that nothing reads', () => {
    const infra = mutated('  LIFEBOAT_LOG_LEVEL: logLevel\n', "  LIFEBOAT_UNUSED: 'x'\n");
    const problems = checkSettings(infra, code, bindings).join('\n');
    expect(problems).toMatch(/The code reads LIFEBOAT_LOG_LEVEL \(shared\/logger\.ts/);
    expect(problems).toMatch(/App setting LIFEBOAT_UNUSED is provided, but no code/);
  });

  it('a new setting in the code', () => {
    const extra = scanSettings(['functions/http/health.ts'], {
      'functions/http/health.ts': "const region = requireSetting(settings, 'LIFEBOAT_TARGET_REGION');",
    });
    const problems = checkSettings(
      loadInfra(),
      { ...code, reads: new Map([...code.reads, ...extra.reads]) },
      bindings,
    );
    expect(problems.join('\n')).toMatch(
      /The code reads LIFEBOAT_TARGET_REGION \(functions\/http\/health\.ts/,
    );
  });

  it('a missing endpoint, credential or client id of an identity-based connection', () => {
    const infra = mutated('  ReplicaStorage__tableServiceUri: replicaStorage.outputs.tableEndpoint\n', '');
    expect(checkSettings(infra, code, bindings).join('\n')).toMatch(
      /ReplicaStorage__tableServiceUri is missing/,
    );
    const wrongId = mutated(
      'CacheStorage__clientId: appIdentity.properties.clientId',
      'CacheStorage__clientId: proxyIdentity.properties.clientId',
    );
    expect(checkSettings(wrongId, code, bindings).join('\n')).toMatch(
      /CacheStorage__clientId must be appIdentity/,
    );
  });

  it('a missing role, and a role too wide', () => {
    // The function app module lists it in dependsOn; drop that too so the Bicep stays coherent.
    const text = mainText
      .replace(/resource appCacheBlobs [\s\S]*?\n}\n/, '')
      .replace('    appCacheBlobs\n', '');
    expect(checkRoles(loadInfra({ 'main.bicep': text })).join('\n')).toMatch(
      /Missing role assignment: appIdentity has Storage Blob Data Contributor on storageAccount 'stlbcache\$\{token\}'/,
    );
    const wide = mutated(
      'scope: changelogsContainer\n  properties: {\n    roleDefinitionId: changeLogWriter.id\n    principalId: proxyIdentity',
      'scope: cacheAccount\n  properties: {\n    roleDefinitionId: changeLogWriter.id\n    principalId: proxyIdentity',
    );
    const problems = checkRoles(wide).join('\n');
    expect(problems).toMatch(
      /proxyIdentityWritesChangeLogs grants more than the code needs: proxyIdentity has custom: [^\n]* on storageAccount/,
    );
    const owner = mutated(
      '// Role assignments: the site proxy',
      "resource tooMuch 'Microsoft.Authorization/roleAssignments@2022-04-01' = {\n  name: guid('x')\n  properties: {\n    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '8e3af657-a8ff-443c-a75c-2fe8c4bcb635')\n    principalId: appIdentity.properties.principalId\n    principalType: 'ServicePrincipal'\n  }\n}\n// Role assignments: the site proxy",
    );
    expect(checkRoles(owner).join('\n')).toMatch(
      /tooMuch grants more than the code needs: appIdentity has Owner on resource group/,
    );
  });

  it('a Service Bus trigger on a connection with no receive grant', () => {
    const problems = checkSettings(loadInfra(), code, [
      ...bindings,
      {
        function: 'apply-elsewhere',
        type: 'serviceBusTrigger',
        properties: { connection: 'OtherBus', queueName: 'other' },
      },
    ]).join('\n');
    expect(problems).toMatch(/The code reads OtherBus/);
    expect(problems).toMatch(/declare what it needs/);
    expect(problems).toMatch(/apply-elsewhere is triggered by Service Bus through OtherBus/);
    expect(problems).toMatch(/listens on other/);
  });

  it('a proxy that starts deleting change logs, or writing the machines table', () => {
    const deleting = storageOperations(['agent/proxy/uploader.ts'], {
      'agent/proxy/uploader.ts':
        'await container.getBlockBlobClient(name).uploadData(b); await blob.deleteIfExists();',
    });
    const problems = checkRoles(loadInfra(), deleting).join('\n');
    expect(problems).toMatch(
      /Missing role assignment: proxyIdentity has custom: containers\/blobs\/delete, containers\/blobs\/write on container/,
    );
    const writing = storageOperations(['agent/proxy/auth.ts'], {
      'agent/proxy/auth.ts': 'await this.table.upsertEntity(row);',
    });
    expect(checkRoles(loadInfra(), writing).join('\n')).toMatch(
      /Missing role assignment: proxyIdentity has Storage Table Data Contributor on table/,
    );
  });

  it('shared keys left on in a storage account', () => {
    const storage = readFileSync(
      path.join(ROOT, 'infra/azure/modules/storage-account.bicep'),
      'utf8',
    ).replace('allowSharedKeyAccess: false', 'allowSharedKeyAccess: true');
    expect(checkSecrets(loadInfra({ 'modules/storage-account.bicep': storage })).join('\n')).toMatch(
      /must set allowSharedKeyAccess: false/,
    );
    expect(parseBicep(storage).resources.length).toBeGreaterThan(0);
  });
});
