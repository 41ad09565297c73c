// The rules that keep infra/azure in step with the code. Each check returns the problems it found
// as sentences (empty = fine), so the tests can also feed it broken Bicep and see it complain.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { MACHINES_TABLE } from '../../../shared/credentials';
import { FAILOVER_TABLES } from '../../../shared/failover/tables';
import { CHANGELOG_CONTAINER } from '../../../shared/envelope';
import { GROUP_TABLES } from '../../../shared/groups/points';
import { TABLES } from '../../../shared/replication/tables';
import {
  objectEntries,
  parseBicep,
  resolveExpr,
  stringLiteral,
  type BicepFile,
  type BicepResource,
} from './bicep';
import {
  ROOT,
  proxyStorageOperations,
  type CodeSettings,
  type RegisteredBinding,
  type StorageOperations,
} from './code';

export const INFRA_DIR = 'infra/azure';

/** Built-in roles by id (the names are what the checks and their messages use). */
export const BUILT_IN_ROLES: Record<string, string> = {
  'b7e6dc6d-f1e8-4753-8033-0f276bb0955b': 'Storage Blob Data Owner',
  'ba92f5b4-2d11-453d-a403-e96b0029c9fe': 'Storage Blob Data Contributor',
  '2a2b9908-6ea1-4ae2-8e65-a410df84e7d1': 'Storage Blob Data Reader',
  '974c5e8b-45b9-4653-ba55-5f855dd0fb88': 'Storage Queue Data Contributor',
  '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3': 'Storage Table Data Contributor',
  '76199698-9eea-4c19-bc75-cec21354c6b6': 'Storage Table Data Reader',
  '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39': 'Azure Service Bus Data Sender',
  '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0': 'Azure Service Bus Data Receiver',
  '090c5cfd-751d-490a-894a-3ce6f1109419': 'Azure Service Bus Data Owner',
  '4633458b-17de-408a-b874-0445c86b69e6': 'Key Vault Secrets User',
  '00482a5a-887f-4fb3-b363-3b7fe8e74483': 'Key Vault Administrator',
  '3913510d-42f4-4e42-8a64-420c390055eb': 'Monitoring Metrics Publisher',
  '8e3af657-a8ff-443c-a75c-2fe8c4bcb635': 'Owner',
  'b24988ac-6180-42a0-ab88-20f7382dd24c': 'Contributor',
};

/** How a custom role reads back: its permissions relative to `…/storageAccounts/blobServices/`. */
export function customRole(permissions: Iterable<string>): string {
  return `custom: ${[...permissions].sort().join(', ')}`;
}

type StorageService = 'blob' | 'queue' | 'table';

/**
 * What each identity must be able to do, and why. A grant is on the account (or queue, secret…)
 * that the named setting points at. Adding a connection to the code without a line here fails
 * the tests; so does a grant in main.bicep that is not here (least privilege both ways).
 */
export interface Need {
  /** The setting whose resource the role is on. */
  setting: string;
  role: string;
  /** Which resource of that setting: the storage account, a container or table in it, the queue, the secret, the component. */
  on: 'account' | { container: string } | { table: string } | 'queue' | 'secret' | 'appInsights';
  /** The storage service the grant is for (the setting must give that service's endpoint). */
  service?: StorageService;
  why: string;
}

export const APP_NEEDS: Need[] = [
  {
    setting: 'AzureWebJobsStorage',
    role: 'Storage Blob Data Owner',
    on: 'account',
    service: 'blob',
    why: 'the Functions host (keys, leases) and the Flex deployment package; the host requires Owner',
  },
  {
    setting: 'AzureWebJobsStorage',
    role: 'Storage Queue Data Contributor',
    on: 'account',
    service: 'queue',
    why: 'Durable task hub control and work-item queues',
  },
  {
    setting: 'AzureWebJobsStorage',
    role: 'Storage Table Data Contributor',
    on: 'account',
    service: 'table',
    why: 'Durable task hub instances and history',
  },
  {
    setting: 'CacheStorage',
    role: 'Storage Blob Data Contributor',
    on: 'account',
    service: 'blob',
    why: 'apply reads and deletes change logs; health lists containers (needs the account scope)',
  },
  {
    setting: 'ReplicaStorage',
    role: 'Storage Blob Data Contributor',
    on: 'account',
    service: 'blob',
    why: 'seed and failover page blobs: writes, leases, snapshots, copies; health lists containers',
  },
  {
    setting: 'ReplicaStorage',
    role: 'Storage Table Data Contributor',
    on: 'account',
    service: 'table',
    why: 'state tables (machines, disks, recoverypoints, groups, plans, failovers, events)',
  },
  {
    setting: 'ServiceBusConnection',
    role: 'Azure Service Bus Data Receiver',
    on: 'queue',
    why: 'the apply trigger on changelog-ready, and the health check peek',
  },
  {
    setting: 'ServiceBusConnection',
    role: 'Azure Service Bus Data Sender',
    on: 'queue',
    why: 'apply re-enqueues itself when it stops at its time budget (DESIGN §1.3)',
  },
  {
    setting: 'LIFEBOAT_ENCRYPTION_KEYS',
    role: 'Key Vault Secrets User',
    on: 'secret',
    why: 'the Key Vault reference that supplies the key ring',
  },
  {
    setting: 'APPLICATIONINSIGHTS_CONNECTION_STRING',
    role: 'Monitoring Metrics Publisher',
    on: 'appInsights',
    why: 'Entra-authenticated telemetry (local auth is off)',
  },
];

/**
 * The proxy's grants follow from the storage calls in agent/proxy (proxyStorageOperations): today
 * it creates the changelogs container if missing, uploads change logs and reads one back to
 * compare a re-sent segment, reads the machines table, and reads and answers agent commands in the
 * commands table — no delete, no list, no other table writes.
 */
export function proxyNeeds(proxy: StorageOperations = proxyStorageOperations()): Need[] {
  const needs: Need[] = [
    {
      setting: 'CacheStorage',
      role: customRole(proxy.blob),
      on: { container: CHANGELOG_CONTAINER },
      service: 'blob',
      why: 'upload encrypted change logs, and read one back to compare a re-sent segment',
    },
    {
      setting: 'ServiceBusConnection',
      role: 'Azure Service Bus Data Sender',
      on: 'queue',
      why: 'send changelog-ready',
    },
  ];
  if (proxy.table.size > 0) {
    needs.push({
      setting: 'ReplicaStorage',
      role: proxy.table.has('write') ? 'Storage Table Data Contributor' : 'Storage Table Data Reader',
      on: { table: MACHINES_TABLE },
      service: 'table',
      why: 'read credential hashes to authenticate agents',
    });
  }
  if (proxy.commands.size > 0) {
    needs.push({
      setting: 'ReplicaStorage',
      role: proxy.commands.has('write') ? 'Storage Table Data Contributor' : 'Storage Table Data Reader',
      on: { table: FAILOVER_TABLES.commands },
      service: 'table',
      why: "serve agent commands (planned failover's quiesce) and record the agents' answers",
    });
  }
  if (proxy.groups.size > 0) {
    needs.push({
      setting: 'ReplicaStorage',
      role: 'Storage Table Data Reader',
      on: { table: GROUP_TABLES.groups },
      service: 'table',
      why: "run the site's replication group coordinators (members, policy)",
    });
  }
  if (proxy.events.size > 0) {
    needs.push({
      setting: 'ReplicaStorage',
      role: customRole(['tables/write', 'tables/entities/add/action']),
      on: { table: TABLES.events },
      service: 'table',
      why: 'record an event naming the slow member when a group marker is aborted (create the table if missing, add rows)',
    });
  }
  return needs;
}

/** Settings the Functions host itself reads (not our code). */
export const HOST_READ_SETTINGS = new Set([
  'APPLICATIONINSIGHTS_CONNECTION_STRING',
  'APPLICATIONINSIGHTS_AUTHENTICATION_STRING',
]);

/** Suffixes the Functions host and its extensions understand for identity-based connections. */
export const HOST_IDENTITY_SUFFIXES = new Set([
  'blobServiceUri',
  'queueServiceUri',
  'tableServiceUri',
  'serviceUri',
  'accountName',
  'fullyQualifiedNamespace',
  'credential',
  'clientId',
]);

/** Settings the platform sets on every app; code may read them without the template providing them. */
export function isPlatformSetting(name: string): boolean {
  return /^(WEBSITE_|FUNCTIONS_|AZURE_FUNCTIONS_|APPSETTING_|CONTAINER_NAME$|HOME$)/.test(name);
}

export interface Infra {
  main: BicepFile;
  /** Module files by the path main.bicep uses (`modules/storage-account.bicep`). */
  modules: Record<string, BicepFile>;
  /** Raw text of every file, for whole-text rules. */
  texts: Record<string, string>;
}

export function loadInfra(overrides: Record<string, string> = {}): Infra {
  const read = (rel: string) => overrides[rel] ?? readFileSync(path.join(ROOT, INFRA_DIR, rel), 'utf8');
  const texts: Record<string, string> = { 'main.bicep': read('main.bicep') };
  const main = parseBicep(texts['main.bicep']);
  const modules: Record<string, BicepFile> = {};
  for (const m of main.modules) {
    if (!(m.path in modules)) {
      texts[m.path] = read(m.path);
      modules[m.path] = parseBicep(texts[m.path]);
    }
  }
  return { main, modules, texts };
}

export function appSettingsOf(infra: Infra): Record<string, string> {
  const source = infra.main.vars.appSettings;
  if (!source) throw new Error('main.bicep has no `var appSettings = { … }`');
  return objectEntries(source);
}

function moduleBySymbol(infra: Infra, symbol: string) {
  const m = infra.main.modules.find((x) => x.symbol === symbol);
  if (!m) throw new Error(`main.bicep has no module ${symbol}`);
  return m;
}

/** `hostStorage.outputs.blobEndpoint` → the module symbol and output name. */
function moduleOutput(expr: string): { module: string; output: string } | undefined {
  const m = /^(\w+)\.outputs\.(\w+)$/.exec(expr.trim());
  return m ? { module: m[1], output: m[2] } : undefined;
}

/** The identity the Function App runs as (the `identityId` its module gets). */
export function appIdentitySymbol(infra: Infra): string {
  const site = infra.main.modules.find((m) => 'appSettings' in m.params);
  if (!site) throw new Error('No module in main.bicep receives appSettings (the Function App).');
  const m = /^(\w+)\.id$/.exec(site.params.identityId ?? '');
  if (!m) throw new Error('The Function App module must get `identityId: <identity>.id`.');
  return m[1];
}

// ---------------------------------------------------------------------------------------------
// Where each setting points (as Bicep expressions), so grants can be matched to settings
// ---------------------------------------------------------------------------------------------

function targetOfNeed(infra: Infra, settings: Record<string, string>, need: Need): string {
  const resolveModuleParam = (symbol: string, param: string) => {
    const value = moduleBySymbol(infra, symbol).params[param];
    if (value === undefined) throw new Error(`Module ${symbol} has no parameter ${param}`);
    return resolveExpr(infra.main, value);
  };
  if (need.on === 'secret') {
    const ref = /^'@Microsoft\.KeyVault\(SecretUri=\$\{(\w+)\.outputs\.secretUri\}\)'$/.exec(
      settings[need.setting] ?? '',
    );
    if (!ref) throw new Error(`${need.setting} is not a Key Vault reference to a module's secretUri output`);
    return `secret ${resolveModuleParam(ref[1], 'name')}/${resolveModuleParam(ref[1], 'secretName')}`;
  }
  if (need.on === 'appInsights') {
    const out = moduleOutput(settings[need.setting] ?? '');
    if (!out) throw new Error(`${need.setting} does not come from a module output`);
    return `appInsights ${resolveModuleParam(out.module, 'appInsightsName')}`;
  }
  if (need.on === 'queue') {
    const ns = moduleOutput(settings[`${need.setting}__fullyQualifiedNamespace`] ?? '');
    const queue = moduleOutput(settings.ChangelogQueueName ?? '');
    if (!ns || !queue)
      throw new Error(
        `${need.setting}__fullyQualifiedNamespace and ChangelogQueueName must come from module outputs`,
      );
    if (ns.module !== queue.module)
      throw new Error('The queue name and the namespace come from different modules');
    return `queue ${resolveModuleParam(ns.module, 'name')}/${resolveModuleParam(queue.module, 'queueName')}`;
  }
  const service = need.service ?? 'blob';
  const endpoint = moduleOutput(settings[`${need.setting}__${service}ServiceUri`] ?? '');
  if (!endpoint)
    throw new Error(`${need.setting}__${service}ServiceUri must come from a storage module's output`);
  const account = resolveModuleParam(endpoint.module, 'name');
  if (need.on === 'account') return `storageAccount ${account}`;
  if ('container' in need.on) return `container ${account}/${need.on.container}`;
  return `table ${account}/${need.on.table}`;
}

function resourceBySymbol(infra: Infra, symbol: string): BicepResource {
  const r = infra.main.resources.find((x) => x.symbol === symbol);
  if (!r) throw new Error(`main.bicep has no resource ${symbol}`);
  return r;
}

/** Describes a role assignment's scope the way targetOfNeed describes a need's. */
function targetOfScope(infra: Infra, symbol: string | undefined): string {
  if (!symbol) return 'resource group';
  const r = resourceBySymbol(infra, symbol);
  const name = resolveExpr(infra.main, r.props.name ?? '');
  const parent = (x: BicepResource) => resourceBySymbol(infra, x.props.parent ?? '');
  switch (r.type) {
    case 'Microsoft.Storage/storageAccounts':
      return `storageAccount ${name}`;
    case 'Microsoft.Storage/storageAccounts/blobServices/containers':
    case 'Microsoft.Storage/storageAccounts/tableServices/tables': {
      const account = resolveExpr(infra.main, parent(parent(r)).props.name ?? '');
      return `${r.type.endsWith('containers') ? 'container' : 'table'} ${account}/${name}`;
    }
    case 'Microsoft.ServiceBus/namespaces/queues':
      return `queue ${resolveExpr(infra.main, parent(r).props.name ?? '')}/${name}`;
    case 'Microsoft.KeyVault/vaults/secrets':
      return `secret ${resolveExpr(infra.main, parent(r).props.name ?? '')}/${name}`;
    case 'Microsoft.Insights/components':
      return `appInsights ${name}`;
    default:
      return `${r.type} ${name}`;
  }
}

export interface Grant {
  principal: string;
  role: string;
  target: string;
  symbol: string;
}

/** Every role assignment in main.bicep, read back as principal / role / target. */
export function grantsIn(infra: Infra): Grant[] {
  const roles = infra.main.vars.roles ? objectEntries(infra.main.vars.roles) : {};
  const grants: Grant[] = [];
  for (const r of infra.main.resources.filter((x) => x.type === 'Microsoft.Authorization/roleAssignments')) {
    if (r.loop) throw new Error(`${r.symbol}: write role assignments one by one so they can be checked`);
    const props = objectEntries(r.props.properties ?? '{}');
    const definition = props.roleDefinitionId ?? '';
    let role: string;
    const builtIn = /^subscriptionResourceId\('Microsoft\.Authorization\/roleDefinitions',\s*(.+)\)$/.exec(
      definition,
    );
    const custom = /^(\w+)\.id$/.exec(definition);
    if (builtIn) {
      const key = /^roles\.(\w+)$/.exec(builtIn[1].trim());
      const id = key ? stringLiteral(roles[key[1]] ?? '') : stringLiteral(builtIn[1]);
      if (!id) throw new Error(`${r.symbol}: role ${builtIn[1]} is not in var roles`);
      role = BUILT_IN_ROLES[id] ?? `unknown built-in role ${id}`;
    } else if (custom) {
      const def = resourceBySymbol(infra, custom[1]);
      const perms = objectEntries(def.props.properties ?? '{}').permissions ?? '[]';
      const all = [...perms.matchAll(/'([^']*\/[^']*)'/g)].map((m) => m[1]);
      // Blob or table permissions, relative to their service (one service per custom role).
      const prefix =
        [
          'Microsoft.Storage/storageAccounts/blobServices/',
          'Microsoft.Storage/storageAccounts/tableServices/',
        ].find((x) => all[0]?.startsWith(x)) ?? '';
      const other = all.find((p) => !prefix || !p.startsWith(prefix));
      role = other ? `custom with ${other}` : customRole(all.map((p) => p.slice(prefix.length)));
    } else {
      throw new Error(`${r.symbol}: cannot read roleDefinitionId ${definition}`);
    }
    const principal =
      /^(\w+)\.properties\.principalId$/.exec(props.principalId ?? '')?.[1] ?? `param ${props.principalId}`;
    if (props.principalType !== "'ServicePrincipal'")
      throw new Error(`${r.symbol}: principalType must be 'ServicePrincipal'`);
    grants.push({ principal, role, target: targetOfScope(infra, r.props.scope), symbol: r.symbol });
  }
  return grants;
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

function where(list: string[] | undefined): string {
  return list && list.length ? ` (${list.slice(0, 3).join('; ')})` : '';
}

/** Connections the code and the registered bindings use, plus the host's own. */
export function connectionsUsed(code: CodeSettings, bindings: RegisteredBinding[]): Map<string, string[]> {
  const used = new Map(code.connections);
  for (const b of bindings) {
    const c = b.properties.connection;
    if (typeof c === 'string' && c)
      used.set(c, [...(used.get(c) ?? []), `function ${b.function}: ${b.type}`]);
  }
  used.set('AzureWebJobsStorage', [
    ...(used.get('AzureWebJobsStorage') ?? []),
    'the Functions host and the Durable task hub',
  ]);
  return used;
}

export function checkSettings(infra: Infra, code: CodeSettings, bindings: RegisteredBinding[]): string[] {
  const problems: string[] = [];
  const settings = appSettingsOf(infra);
  const reads = new Map(code.reads);
  for (const b of bindings) {
    for (const value of Object.values(b.properties)) {
      if (typeof value !== 'string') continue;
      for (const m of value.matchAll(/%([A-Za-z_]\w*)%/g))
        reads.set(m[1], [...(reads.get(m[1]) ?? []), `function ${b.function}: ${b.type}`]);
    }
  }
  const connections = connectionsUsed(code, bindings);
  for (const c of connections.keys()) if (!reads.has(c)) reads.set(c, connections.get(c)!);
  const keys = Object.keys(settings);

  for (const [name, at] of reads) {
    if (isPlatformSetting(name)) continue;
    if (!(name in settings) && !keys.some((k) => k.startsWith(`${name}__`))) {
      problems.push(
        `The code reads ${name}${where(at)}, but the Function App's settings (infra/azure/main.bicep, var appSettings) do not provide it.`,
      );
    }
  }
  const suffixes = new Set([...code.identitySuffixes, ...HOST_IDENTITY_SUFFIXES]);
  for (const key of keys) {
    const split = /^(.+?)__(\w+)$/.exec(key);
    if (reads.has(key) || HOST_READ_SETTINGS.has(key)) continue;
    if (split && reads.has(split[1])) {
      if (!suffixes.has(split[2]))
        problems.push(
          `App setting ${key}: neither the code nor the Functions host reads the suffix __${split[2]}.`,
        );
      continue;
    }
    problems.push(
      `App setting ${key} is provided, but no code in functions/ or shared/ (nor the Functions host) reads it.`,
    );
  }

  const app = appIdentitySymbol(infra);
  const needed = new Map<string, Set<StorageService | 'servicebus'>>();
  for (const n of APP_NEEDS) {
    if (n.on === 'secret' || n.on === 'appInsights') continue;
    const set = needed.get(n.setting) ?? new Set();
    set.add(n.on === 'queue' ? 'servicebus' : (n.service ?? 'blob'));
    needed.set(n.setting, set);
  }
  for (const [connection, at] of connections) {
    if (!needed.has(connection)) {
      problems.push(
        `The code uses ${connection} as a connection${where(at)}; declare what it needs in test/infra/azure/checks.ts (APP_NEEDS) and grant it in main.bicep.`,
      );
    }
  }
  for (const [connection, services] of needed) {
    if (connection in settings) {
      problems.push(
        `App setting ${connection} is set directly (a connection string); use identity-based ${connection}__… settings.`,
      );
    }
    if (stringLiteral(settings[`${connection}__credential`] ?? '') !== 'managedidentity') {
      problems.push(`App setting ${connection}__credential must be 'managedidentity'.`);
    }
    if ((settings[`${connection}__clientId`] ?? '').trim() !== `${app}.properties.clientId`) {
      problems.push(
        `App setting ${connection}__clientId must be ${app}.properties.clientId (the identity the app runs as).`,
      );
    }
    for (const service of services) {
      const key =
        service === 'servicebus'
          ? `${connection}__fullyQualifiedNamespace`
          : `${connection}__${service}ServiceUri`;
      if (!(key in settings) && !(service !== 'servicebus' && `${connection}__accountName` in settings)) {
        problems.push(
          `App setting ${key} is missing: the code needs the ${service} endpoint of ${connection}.`,
        );
      }
    }
  }
  for (const b of bindings.filter((x) => x.type === 'serviceBusTrigger')) {
    const c = String(b.properties.connection ?? '');
    if (!APP_NEEDS.some((n) => n.setting === c && n.role === 'Azure Service Bus Data Receiver')) {
      problems.push(
        `Function ${b.function} is triggered by Service Bus through ${c}, but APP_NEEDS grants no Azure Service Bus Data Receiver for it.`,
      );
    }
    if (b.properties.queueName !== '%ChangelogQueueName%') {
      problems.push(
        `Function ${b.function} listens on ${String(b.properties.queueName)}; only %ChangelogQueueName% exists in infra/azure.`,
      );
    }
  }
  return problems;
}

function needKey(principal: string, role: string, target: string): string {
  return `${principal} has ${role} on ${target}`;
}

export function checkRoles(infra: Infra, proxy: StorageOperations = proxyStorageOperations()): string[] {
  const problems: string[] = [];
  const settings = appSettingsOf(infra);
  let grants: Grant[];
  try {
    grants = grantsIn(infra);
  } catch (err) {
    return [(err as Error).message];
  }
  const app = appIdentitySymbol(infra);
  const proxies = [...new Set(grants.map((g) => g.principal))].filter((p) => p !== app);
  const expected = new Map<string, string>();
  const add = (principal: string, needs: Need[]) => {
    for (const n of needs) {
      try {
        expected.set(needKey(principal, n.role, targetOfNeed(infra, settings, n)), n.why);
      } catch (err) {
        problems.push(`Cannot place the grant "${n.role}" for ${n.setting}: ${(err as Error).message}.`);
      }
    }
  };
  add(app, APP_NEEDS);
  const identities = infra.main.resources
    .filter((r) => r.type === 'Microsoft.ManagedIdentity/userAssignedIdentities')
    .map((r) => r.symbol);
  const proxyIdentity = identities.find((s) => s !== app);
  if (!proxyIdentity)
    problems.push('main.bicep must create a separate user-assigned identity for the site proxy.');
  const proxyParam = proxies.find((p) => p.startsWith('param '));
  if (!proxyParam)
    problems.push('main.bicep must grant the proxy service principal (a parameter) its access.');
  for (const p of [proxyIdentity, proxyParam]) if (p) add(p, proxyNeeds(proxy));

  const actual = new Map(grants.map((g) => [needKey(g.principal, g.role, g.target), g.symbol]));
  for (const [key, why] of expected)
    if (!actual.has(key)) problems.push(`Missing role assignment: ${key} (needed for ${why}).`);
  for (const [key, symbol] of actual) {
    if (!expected.has(key))
      problems.push(`Role assignment ${symbol} grants more than the code needs: ${key}.`);
  }
  return problems;
}

const SECRET_PATTERNS: Array<[RegExp, string]> = [
  [/AccountKey\s*=/i, 'a storage account key'],
  [/SharedAccessKey(Name)?\s*=/i, 'a Service Bus shared access key'],
  [/SharedAccessSignature|[?&]sig=/i, 'a SAS token'],
  [/\blist(Keys|ConnectionStrings|AccountSas|ServiceSas|Secrets)\b/i, 'a list* function that returns keys'],
  [/\b(primary|secondary)(Key|ConnectionString|MasterKey)\b/i, 'a key property'],
  [/Password\s*=|\bpassword\b/i, 'a password'],
  [/InstrumentationKey\s*=/i, 'a literal instrumentation key'],
];

export function checkSecrets(infra: Infra): string[] {
  const problems: string[] = [];
  const settings = appSettingsOf(infra);
  const secureParams = Object.values(infra.main.params)
    .filter((p) => p.decorators.some((d) => /^@secure\b/.test(d)))
    .map((p) => p.name);
  for (const [key, value] of Object.entries(settings)) {
    for (const [re, what] of SECRET_PATTERNS) {
      if (re.test(value)) problems.push(`App setting ${key} holds ${what}: ${value}`);
    }
    for (const p of secureParams) {
      if (new RegExp(`\\b${p}\\b`).test(value))
        problems.push(
          `App setting ${key} holds the secure parameter ${p}; put it in Key Vault and use a reference.`,
        );
    }
    if (/DefaultEndpointsProtocol|Endpoint=sb:/i.test(value))
      problems.push(`App setting ${key} holds a connection string.`);
  }
  if (
    !/^'@Microsoft\.KeyVault\(SecretUri=\$\{\w+\.outputs\.secretUri\}\)'$/.test(
      settings.LIFEBOAT_ENCRYPTION_KEYS ?? '',
    )
  ) {
    problems.push(
      'LIFEBOAT_ENCRYPTION_KEYS must be a Key Vault reference: @Microsoft.KeyVault(SecretUri=${keyVault.outputs.secretUri}).',
    );
  }
  for (const [file, text] of Object.entries(infra.texts)) {
    if (
      /\blist(Keys|ConnectionStrings|AccountSas|ServiceSas)\s*\(|\.list(Keys|ConnectionStrings)\(/.test(text)
    ) {
      problems.push(`${file} calls a list* function that returns keys.`);
    }
  }
  for (const [name, value] of Object.entries(infra.main.outputs)) {
    for (const p of secureParams)
      if (new RegExp(`\\b${p}\\b`).test(value))
        problems.push(`Output ${name} exposes the secure parameter ${p}.`);
  }
  // Shared keys and local auth are off where they exist, so no key can be fetched at all.
  const require = (file: string, type: string, property: RegExp, what: string) => {
    const parsed = infra.modules[file] ?? (file === 'main.bicep' ? infra.main : undefined);
    const resources = parsed?.resources.filter((r) => r.type === type && !r.existing) ?? [];
    if (resources.length === 0) problems.push(`${file} defines no ${type}.`);
    for (const r of resources)
      if (!property.test(r.props.properties ?? '')) problems.push(`${file}: ${r.symbol} must set ${what}.`);
  };
  require('modules/storage-account.bicep', 'Microsoft.Storage/storageAccounts', /\ballowSharedKeyAccess:\s*false\b/, 'allowSharedKeyAccess: false');
  require('modules/storage-account.bicep', 'Microsoft.Storage/storageAccounts', /\ballowBlobPublicAccess:\s*false\b/, 'allowBlobPublicAccess: false');
  require('modules/service-bus.bicep', 'Microsoft.ServiceBus/namespaces', /\bdisableLocalAuth:\s*true\b/, 'disableLocalAuth: true');
  require('modules/key-vault.bicep', 'Microsoft.KeyVault/vaults', /\benableRbacAuthorization:\s*true\b/, 'enableRbacAuthorization: true');
  require('modules/monitoring.bicep', 'Microsoft.Insights/components', /\bDisableLocalAuth:\s*true\b/, 'DisableLocalAuth: true (the connection string in app settings is then not a credential)');
  // What is checked here is what is deployed: the site's appsettings are exactly the module parameter.
  const site = infra.main.modules.find((m) => 'appSettings' in m.params);
  if (site?.params.appSettings !== 'appSettings')
    problems.push('The Function App module must receive `appSettings: appSettings`.');
  return problems;
}
