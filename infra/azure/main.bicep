// Lifeboat in Azure: one resource group holding the Function App (Flex Consumption, Node 20), its
// storage, the work queue, the key vault and monitoring, plus the identities of the app and of the
// site proxies with role assignments for exactly what the code does.
//
// Layout: resource definitions live in modules/; everything that decides access — identities,
// app settings, role assignments — is in this file, in one place, and test/infra/azure checks it
// against the code (settings read, roles needed, no secrets in settings).
//
// Deploy: `azd up`, or `az deployment group create` (docs/deploy.md).

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

@description('Short environment name (the azd environment); part of every resource name.')
@minLength(1)
@maxLength(24)
param environmentName string

param location string = resourceGroup().location

@description('Change-log encryption key ring "id:base64key[,id:base64key…]" (32-byte keys, current first). Stored only in Key Vault; the site proxies hold the same ring.')
@secure()
param encryptionKeys string

@description('Object id of the Entra service principal the on-site proxies sign in as (certificate credential). Empty: only the proxy managed identity gets access.')
param proxyServicePrincipalId string = ''

@description('Failover compute provider (LIFEBOAT_COMPUTE). `azure` needs the ARM compute provider and its role grants, which are not built yet.')
@allowed(['local', 'azure'])
param compute string = 'local'

@allowed(['trace', 'debug', 'info', 'warn', 'error', 'fatal'])
param logLevel string = 'info'

@description('OpenTelemetry export to Application Insights (LIFEBOAT_TELEMETRY).')
@allowed(['on', 'off'])
param telemetry string = 'on'

@description('Redundancy of the replica account (seed disks, recovery-point snapshots, state tables).')
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_RAGRS'])
param replicaStorageSku string = 'Standard_LRS'

@description('Change logs older than this are deleted by a lifecycle rule (apply deletes the ones it has applied sooner).')
@minValue(1)
param changeLogRetentionDays int = 7

@allowed(['Basic', 'Standard'])
param serviceBusSku string = 'Standard'

@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@allowed([512, 2048, 4096])
param instanceMemoryMB int = 2048

param keyVaultPurgeProtection bool = false

// Apply and timer tuning. The defaults are the code's own (shared/replication/context.ts).
@description('Apply time budget per run, seconds (LIFEBOAT_APPLY_BUDGET_SECONDS); keep it under host.json functionTimeout.')
@minValue(1)
@maxValue(3600)
param applyBudgetSeconds int = 240

@description('Seed-blob lease while applying, seconds (LIFEBOAT_APPLY_LEASE_SECONDS).')
@minValue(15)
@maxValue(60)
param applyLeaseSeconds int = 30

@description('Page writes in flight per disk (LIFEBOAT_APPLY_WRITE_CONCURRENCY).')
@minValue(1)
@maxValue(64)
param applyWriteConcurrency int = 8

@description('Worker threads that decrypt, decompress and decode change logs (LIFEBOAT_APPLY_OPEN_WORKERS); 0 = on the main thread. One worker measured 1.5x the inline rate (docs/replication.md).')
@minValue(0)
@maxValue(8)
param applyOpenWorkers int = 1

@description('Seconds per run an applier with nothing to apply spends filling the disk\'s checksum index (LIFEBOAT_CHECKSUM_FILL_SECONDS); 0 = never, and resyncs hash the whole seed disk on request (docs/replication.md).')
@minValue(0)
@maxValue(60)
param checksumFillSeconds int = 2

@description('NCRONTAB schedule of the retention timer (LIFEBOAT_RETENTION_SCHEDULE).')
param retentionSchedule string = '0 */15 * * * *'

@description('NCRONTAB schedule of the RPO monitor (LIFEBOAT_RPO_SCHEDULE).')
param rpoSchedule string = '0 * * * * *'

param tags object = {}

// ---------------------------------------------------------------------------------------------
// Names (the storage layout is DESIGN §2)
// ---------------------------------------------------------------------------------------------

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var allTags = union(tags, { 'azd-env-name': environmentName, application: 'lifeboat' })

var names = {
  appIdentity: 'id-lifeboat-app-${token}'
  proxyIdentity: 'id-lifeboat-proxy-${token}'
  hostStorage: 'stlbhost${token}'
  cacheStorage: 'stlbcache${token}'
  replicaStorage: 'stlbrepl${token}'
  serviceBus: 'sb-lifeboat-${token}'
  keyVault: 'kv-lb-${token}'
  logAnalytics: 'log-lifeboat-${token}'
  appInsights: 'appi-lifeboat-${token}'
  plan: 'plan-lifeboat-${token}'
  functionApp: 'func-lifeboat-${token}'
}

var changelogQueueName = 'changelog-ready'
var changelogContainer = 'changelogs'
var deploymentContainer = 'app-package'
var encryptionKeysSecretName = 'lifeboat-encryption-keys'
var machinesTable = 'machines'
var commandsTable = 'commands'
var groupsTable = 'groups'
var eventsTable = 'events'
// The code creates the state tables it uses on first use; `machines`, `commands`, `groups` and
// `events` are made here because the proxy's grants are scoped to them, and a role assignment
// needs its scope to exist.
var replicaTables = [machinesTable, commandsTable, groupsTable, eventsTable]

// Built-in role definition ids (test/infra/azure checks each against its name).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  storageTableDataReader: '76199698-9eea-4c19-bc75-cec21354c6b6'
  serviceBusDataSender: '69a216fc-b8fb-44d8-bc22-1f3c2cd27a39'
  serviceBusDataReceiver: '4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// ---------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------

resource appIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.appIdentity
  location: location
  tags: allTags
}

// For a proxy running in Azure (or federated); on-site proxies use proxyServicePrincipalId.
resource proxyIdentity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: names.proxyIdentity
  location: location
  tags: allTags
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'lifeboat-monitoring'
  params: {
    logAnalyticsName: names.logAnalytics
    appInsightsName: names.appInsights
    location: location
    tags: allTags
  }
}

// AzureWebJobsStorage: the Functions host, the Durable task hub and the deployment package.
module hostStorage 'modules/storage-account.bicep' = {
  name: 'lifeboat-host-storage'
  params: {
    name: names.hostStorage
    location: location
    tags: allTags
    containers: [deploymentContainer]
  }
}

// CacheStorage: encrypted change logs from the site proxies, deleted once stale.
module cacheStorage 'modules/storage-account.bicep' = {
  name: 'lifeboat-cache-storage'
  params: {
    name: names.cacheStorage
    location: location
    tags: allTags
    // quarantine: change logs that failed authentication or their checksum (kept, never applied)
    containers: [changelogContainer, 'quarantine']
    deleteAfterDays: changeLogRetentionDays
    deletePrefixes: ['${changelogContainer}/']
  }
}

// ReplicaStorage: seed and failover page blobs (snapshots = recovery points) and the state tables.
module replicaStorage 'modules/storage-account.bicep' = {
  name: 'lifeboat-replica-storage'
  params: {
    name: names.replicaStorage
    location: location
    tags: allTags
    sku: replicaStorageSku
    containers: ['seed-disks', 'failover-disks']
    tables: replicaTables
  }
}

module serviceBus 'modules/service-bus.bicep' = {
  name: 'lifeboat-service-bus'
  params: {
    name: names.serviceBus
    location: location
    tags: allTags
    sku: serviceBusSku
    queueName: changelogQueueName
  }
}

module keyVault 'modules/key-vault.bicep' = {
  name: 'lifeboat-key-vault'
  params: {
    name: names.keyVault
    location: location
    tags: allTags
    encryptionKeys: encryptionKeys
    secretName: encryptionKeysSecretName
    purgeProtection: keyVaultPurgeProtection
  }
}

// ---------------------------------------------------------------------------------------------
// App settings: identity-based connections only; no keys, SAS or connection strings with keys.
// test/infra/azure reads this object: every key must be a setting the code (or the Functions
// host) reads, and every setting the code reads must be here.
// ---------------------------------------------------------------------------------------------

var appSettings = {
  AzureWebJobsStorage__blobServiceUri: hostStorage.outputs.blobEndpoint
  AzureWebJobsStorage__queueServiceUri: hostStorage.outputs.queueEndpoint
  AzureWebJobsStorage__tableServiceUri: hostStorage.outputs.tableEndpoint
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: appIdentity.properties.clientId
  CacheStorage__blobServiceUri: cacheStorage.outputs.blobEndpoint
  CacheStorage__credential: 'managedidentity'
  CacheStorage__clientId: appIdentity.properties.clientId
  ReplicaStorage__blobServiceUri: replicaStorage.outputs.blobEndpoint
  ReplicaStorage__tableServiceUri: replicaStorage.outputs.tableEndpoint
  ReplicaStorage__credential: 'managedidentity'
  ReplicaStorage__clientId: appIdentity.properties.clientId
  ServiceBusConnection__fullyQualifiedNamespace: serviceBus.outputs.fullyQualifiedNamespace
  ServiceBusConnection__credential: 'managedidentity'
  ServiceBusConnection__clientId: appIdentity.properties.clientId
  ChangelogQueueName: serviceBus.outputs.queueName
  LIFEBOAT_ENCRYPTION_KEYS: '@Microsoft.KeyVault(SecretUri=${keyVault.outputs.secretUri})'
  LIFEBOAT_COMPUTE: compute
  LIFEBOAT_LOG_LEVEL: logLevel
  LIFEBOAT_TELEMETRY: telemetry
  LIFEBOAT_APPLY_BUDGET_SECONDS: string(applyBudgetSeconds)
  LIFEBOAT_APPLY_LEASE_SECONDS: string(applyLeaseSeconds)
  LIFEBOAT_APPLY_WRITE_CONCURRENCY: string(applyWriteConcurrency)
  LIFEBOAT_APPLY_OPEN_WORKERS: string(applyOpenWorkers)
  LIFEBOAT_CHECKSUM_FILL_SECONDS: string(checksumFillSeconds)
  LIFEBOAT_RETENTION_SCHEDULE: retentionSchedule
  LIFEBOAT_RPO_SCHEDULE: rpoSchedule
  APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.connectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${appIdentity.properties.clientId};Authorization=AAD'
}

module functionApp 'modules/function-app.bicep' = {
  name: 'lifeboat-function-app'
  params: {
    name: names.functionApp
    planName: names.plan
    location: location
    tags: allTags
    identityId: appIdentity.id
    deploymentContainerUrl: '${hostStorage.outputs.blobEndpoint}${deploymentContainer}'
    appSettings: appSettings
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
  }
  // The host starts as soon as the app exists: give it its data access first.
  dependsOn: [
    appHostBlobs
    appHostQueues
    appHostTables
    appCacheBlobs
    appReplicaBlobs
    appReplicaTables
    appQueueReceive
    appQueueSend
    appKeySecret
    appTelemetry
  ]
}

// ---------------------------------------------------------------------------------------------
// Scopes for the role assignments (the resources above, by name)
// ---------------------------------------------------------------------------------------------

resource hostAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: names.hostStorage
}

resource cacheAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: names.cacheStorage
}

resource cacheBlobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' existing = {
  parent: cacheAccount
  name: 'default'
}

resource changelogsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' existing = {
  parent: cacheBlobService
  name: changelogContainer
}

resource replicaAccount 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: names.replicaStorage
}

resource replicaTableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' existing = {
  parent: replicaAccount
  name: 'default'
}

resource machinesTableScope 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = {
  parent: replicaTableService
  name: machinesTable
}

resource commandsTableScope 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = {
  parent: replicaTableService
  name: commandsTable
}

resource groupsTableScope 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = {
  parent: replicaTableService
  name: groupsTable
}

resource eventsTableScope 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' existing = {
  parent: replicaTableService
  name: eventsTable
}

resource serviceBusNamespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' existing = {
  name: names.serviceBus
}

resource changelogQueue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' existing = {
  parent: serviceBusNamespace
  name: changelogQueueName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = {
  name: names.keyVault
}

resource encryptionKeysSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = {
  parent: vault
  name: encryptionKeysSecretName
}

resource appInsightsScope 'Microsoft.Insights/components@2020-02-02' existing = {
  name: names.appInsights
}

// What the proxy does in the changelogs container (agent/proxy): create it if missing (an
// existing container answers 409, which needs containers/write to be allowed to ask), upload
// change logs, and read one back to compare a re-sent segment. No built-in role stops there:
// Storage Blob Data Contributor would add delete, move and container delete.
resource changeLogWriter 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'lifeboat-change-log-writer')
  properties: {
    roleName: 'Lifeboat change-log writer (${resourceGroup().name}, ${token})'
    description: 'Upload and read back blobs in one container, and create that container; no list, no delete. Site proxies hold it on the changelogs container.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/write'
        ]
        notActions: []
        dataActions: [
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/read'
          'Microsoft.Storage/storageAccounts/blobServices/containers/blobs/write'
        ]
        notDataActions: []
      }
    ]
    assignableScopes: [resourceGroup().id]
  }
}

// What the proxy does in the events table (agent/group/site.ts: an aborted group marker names the
// slow member): create it if missing (an existing table answers 409, which needs tables/write to
// be allowed to ask) and insert rows. Storage Table Data Contributor would add read, update and
// delete of every event.
resource eventWriter 'Microsoft.Authorization/roleDefinitions@2022-04-01' = {
  name: guid(resourceGroup().id, 'lifeboat-event-writer')
  properties: {
    roleName: 'Lifeboat event writer (${resourceGroup().name}, ${token})'
    description: 'Insert rows into one table, and create that table; no read, update or delete. Site proxies hold it on the events table.'
    type: 'CustomRole'
    permissions: [
      {
        actions: [
          'Microsoft.Storage/storageAccounts/tableServices/tables/write'
        ]
        notActions: []
        dataActions: [
          'Microsoft.Storage/storageAccounts/tableServices/tables/entities/add/action'
        ]
        notDataActions: []
      }
    ]
    assignableScopes: [resourceGroup().id]
  }
}

// ---------------------------------------------------------------------------------------------
// Role assignments: the Function App's identity
// ---------------------------------------------------------------------------------------------

// Functions host (keys, singleton leases, deployment package) — the host requires Blob Data Owner.
resource appHostBlobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostAccount.id, appIdentity.id, roles.storageBlobDataOwner)
  scope: hostAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [hostStorage]
}

// Durable task hub: control and work-item queues.
resource appHostQueues 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostAccount.id, appIdentity.id, roles.storageQueueDataContributor)
  scope: hostAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [hostStorage]
}

// Durable task hub: instances and history tables.
resource appHostTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(hostAccount.id, appIdentity.id, roles.storageTableDataContributor)
  scope: hostAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [hostStorage]
}

// Apply reads and deletes change logs, quarantines bad ones; health lists containers (account scope).
resource appCacheBlobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(cacheAccount.id, appIdentity.id, roles.storageBlobDataContributor)
  scope: cacheAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [cacheStorage]
}

// Seed and failover page blobs: page writes, leases, snapshots, copies.
resource appReplicaBlobs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(replicaAccount.id, appIdentity.id, roles.storageBlobDataContributor)
  scope: replicaAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataContributor)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

// State tables: machines, disks, recovery points, marker arrivals, events, apply nudges …
resource appReplicaTables 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(replicaAccount.id, appIdentity.id, roles.storageTableDataContributor)
  scope: replicaAccount
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

// The apply trigger, and the health check's peek.
resource appQueueReceive 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(changelogQueue.id, appIdentity.id, roles.serviceBusDataReceiver)
  scope: changelogQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataReceiver)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [serviceBus]
}

// Apply re-enqueues itself when it stops at its time budget.
resource appQueueSend 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(changelogQueue.id, appIdentity.id, roles.serviceBusDataSender)
  scope: changelogQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [serviceBus]
}

// The Key Vault reference behind LIFEBOAT_ENCRYPTION_KEYS: this one secret only.
resource appKeySecret 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(encryptionKeysSecret.id, appIdentity.id, roles.keyVaultSecretsUser)
  scope: encryptionKeysSecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [keyVault]
}

// Entra-authenticated telemetry ingestion (local auth is off on Application Insights).
resource appTelemetry 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsightsScope.id, appIdentity.id, roles.monitoringMetricsPublisher)
  scope: appInsightsScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: appIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [monitoring]
}

// ---------------------------------------------------------------------------------------------
// Role assignments: the site proxy (managed identity, and the service principal when given)
// ---------------------------------------------------------------------------------------------

// Upload encrypted change logs (and read one back): on the changelogs container only.
resource proxyIdentityWritesChangeLogs 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(changelogsContainer.id, proxyIdentity.id, 'lifeboat-change-log-writer')
  scope: changelogsContainer
  properties: {
    roleDefinitionId: changeLogWriter.id
    principalId: proxyIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [cacheStorage]
}

// Notify apply: send only, on the changelog-ready queue only.
resource proxyIdentitySends 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(changelogQueue.id, proxyIdentity.id, roles.serviceBusDataSender)
  scope: changelogQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: proxyIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [serviceBus]
}

// Check agent credentials: read the machines table only (credential hashes).
resource proxyIdentityReadsMachines 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(machinesTableScope.id, proxyIdentity.id, roles.storageTableDataReader)
  scope: machinesTableScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataReader)
    principalId: proxyIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

// Serve agent commands (planned failover's quiesce) and record the agent's answer: read and
// update rows of the commands table only.
resource proxyIdentityAnswersCommands 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(commandsTableScope.id, proxyIdentity.id, roles.storageTableDataContributor)
  scope: commandsTableScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: proxyIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

// Run the site's group coordinators (agent/group/site.ts): read the groups table (members, policy).
resource proxyIdentityReadsGroups 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(groupsTableScope.id, proxyIdentity.id, roles.storageTableDataReader)
  scope: groupsTableScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataReader)
    principalId: proxyIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

// Record an event when a group marker is aborted (names the slow member): add rows only.
resource proxyIdentityRecordsEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(eventsTableScope.id, proxyIdentity.id, 'lifeboat-event-writer')
  scope: eventsTableScope
  properties: {
    roleDefinitionId: eventWriter.id
    principalId: proxyIdentity.properties.principalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

resource proxyPrincipalWritesChangeLogs 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(proxyServicePrincipalId)) {
  name: guid(changelogsContainer.id, proxyServicePrincipalId, 'lifeboat-change-log-writer')
  scope: changelogsContainer
  properties: {
    roleDefinitionId: changeLogWriter.id
    principalId: proxyServicePrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [cacheStorage]
}

resource proxyPrincipalSends 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(proxyServicePrincipalId)) {
  name: guid(changelogQueue.id, proxyServicePrincipalId, roles.serviceBusDataSender)
  scope: changelogQueue
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.serviceBusDataSender)
    principalId: proxyServicePrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [serviceBus]
}

resource proxyPrincipalReadsMachines 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(proxyServicePrincipalId)) {
  name: guid(machinesTableScope.id, proxyServicePrincipalId, roles.storageTableDataReader)
  scope: machinesTableScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataReader)
    principalId: proxyServicePrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

resource proxyPrincipalAnswersCommands 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(proxyServicePrincipalId)) {
  name: guid(commandsTableScope.id, proxyServicePrincipalId, roles.storageTableDataContributor)
  scope: commandsTableScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: proxyServicePrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

resource proxyPrincipalReadsGroups 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(proxyServicePrincipalId)) {
  name: guid(groupsTableScope.id, proxyServicePrincipalId, roles.storageTableDataReader)
  scope: groupsTableScope
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataReader)
    principalId: proxyServicePrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

resource proxyPrincipalRecordsEvents 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(proxyServicePrincipalId)) {
  name: guid(eventsTableScope.id, proxyServicePrincipalId, 'lifeboat-event-writer')
  scope: eventsTableScope
  properties: {
    roleDefinitionId: eventWriter.id
    principalId: proxyServicePrincipalId
    principalType: 'ServicePrincipal'
  }
  dependsOn: [replicaStorage]
}

// ---------------------------------------------------------------------------------------------
// Outputs (azd stores them in the environment; docs/deploy.md uses them for the site proxy)
// ---------------------------------------------------------------------------------------------

output AZURE_FUNCTION_APP_NAME string = functionApp.outputs.name
output LIFEBOAT_API_URL string = 'https://${functionApp.outputs.defaultHostName}/api'
output LIFEBOAT_CACHE_BLOB_ENDPOINT string = cacheStorage.outputs.blobEndpoint
output LIFEBOAT_REPLICA_TABLE_ENDPOINT string = replicaStorage.outputs.tableEndpoint
output LIFEBOAT_SERVICE_BUS_NAMESPACE string = serviceBus.outputs.fullyQualifiedNamespace
output LIFEBOAT_CHANGELOG_QUEUE string = serviceBus.outputs.queueName
output LIFEBOAT_PROXY_IDENTITY_CLIENT_ID string = proxyIdentity.properties.clientId
output LIFEBOAT_KEY_VAULT_NAME string = keyVault.outputs.name
output LIFEBOAT_ENCRYPTION_KEYS_SECRET string = keyVault.outputs.secretName
output LIFEBOAT_APP_INSIGHTS_NAME string = monitoring.outputs.appInsightsName
