// One storage account: identity-only (no shared keys, no public blobs), with the containers and
// tables Lifeboat expects to exist, and an optional lifecycle rule that deletes stale block blobs.

@description('Storage account name: 3–24 lowercase letters and digits, globally unique.')
@minLength(3)
@maxLength(24)
param name string

param location string
param tags object = {}

@description('Redundancy. Page blobs (seed disks) are supported on LRS, ZRS and GRS.')
@allowed(['Standard_LRS', 'Standard_ZRS', 'Standard_GRS', 'Standard_RAGRS'])
param sku string = 'Standard_LRS'

@description('Blob containers to create.')
param containers array = []

@description('Tables to create.')
param tables array = []

@description('Delete block blobs under `deletePrefixes` this many days after their last change; 0 turns the rule off.')
@minValue(0)
param deleteAfterDays int = 0

@description('Prefixes (container/path) the lifecycle rule applies to.')
param deletePrefixes array = []

resource account 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: name
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: sku }
  properties: {
    accessTier: 'Hot'
    // Entra ID only: no account keys, no SAS signed with them, nothing to leak into settings.
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    // Site proxies upload over the internet; private endpoints are a later option (docs/deploy.md).
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource blobContainers 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = [
  for container in containers: {
    parent: blobService
    name: container
    properties: { publicAccess: 'None' }
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: account
  name: 'default'
}

resource stateTables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [
  for table in tables: {
    parent: tableService
    name: table
  }
]

resource lifecycle 'Microsoft.Storage/storageAccounts/managementPolicies@2023-05-01' = if (deleteAfterDays > 0) {
  parent: account
  name: 'default'
  properties: {
    policy: {
      rules: [
        {
          name: 'delete-stale-blobs'
          enabled: true
          type: 'Lifecycle'
          definition: {
            filters: {
              blobTypes: ['blockBlob']
              prefixMatch: deletePrefixes
            }
            actions: {
              baseBlob: {
                delete: { daysAfterModificationGreaterThan: deleteAfterDays }
              }
            }
          }
        }
      ]
    }
  }
  dependsOn: [blobContainers]
}

output name string = account.name
output id string = account.id
output blobEndpoint string = account.properties.primaryEndpoints.blob
output queueEndpoint string = account.properties.primaryEndpoints.queue
output tableEndpoint string = account.properties.primaryEndpoints.table
