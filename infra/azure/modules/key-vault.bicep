// Key Vault (RBAC, no access policies) holding the change-log encryption key ring. The Function
// App reads it through a Key Vault reference; the value never appears in app settings.

param name string
param location string
param tags object = {}

@description('"id:base64key[,id:base64key…]", current key first (DESIGN §2, Envelope).')
@secure()
param encryptionKeys string

param secretName string = 'lifeboat-encryption-keys'

@description('Purge protection keeps a deleted vault recoverable for the retention period and makes tear-down leave it behind.')
param purgeProtection bool = false

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    // The property accepts only true or absent.
    enablePurgeProtection: purgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = {
  parent: vault
  name: secretName
  properties: {
    value: encryptionKeys
    contentType: 'id:base64key list, current key first'
  }
}

output name string = vault.name
output secretName string = secret.name
// Versionless: after a rotation the app picks up the newest version on restart.
output secretUri string = secret.properties.secretUri
