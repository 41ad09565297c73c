// The work queue: a Service Bus namespace with local (SAS) auth turned off, and the
// `changelog-ready` queue. A message is only a nudge ("disk D has work"), so duplicates are
// harmless and duplicate detection is not needed (DESIGN §4).

param name string
param location string
param tags object = {}

@description('Basic has queues, scheduled messages and dead-lettering, which is all Lifeboat uses; Standard adds topics and duplicate detection.')
@allowed(['Basic', 'Standard'])
param sku string = 'Standard'

param queueName string

@description('Peek-lock duration; the Functions host renews the lock while apply runs (host.json maxAutoLockRenewalDuration).')
param lockDuration string = 'PT2M'

@description('Deliveries before a message is dead-lettered.')
@minValue(1)
param maxDeliveryCount int = 10

@description('Time to live of a nudge; expired ones are dead-lettered, never silently dropped.')
param messageTimeToLive string = 'P14D'

resource namespace 'Microsoft.ServiceBus/namespaces@2022-10-01-preview' = {
  name: name
  location: location
  tags: tags
  sku: {
    name: sku
    tier: sku
  }
  properties: {
    disableLocalAuth: true
    minimumTlsVersion: '1.2'
    publicNetworkAccess: 'Enabled'
  }
}

resource queue 'Microsoft.ServiceBus/namespaces/queues@2022-10-01-preview' = {
  parent: namespace
  name: queueName
  properties: {
    lockDuration: lockDuration
    maxDeliveryCount: maxDeliveryCount
    deadLetteringOnMessageExpiration: true
    defaultMessageTimeToLive: messageTimeToLive
    requiresSession: false
    requiresDuplicateDetection: false
    enablePartitioning: false
    maxSizeInMegabytes: 1024
  }
}

output name string = namespace.name
output queueName string = queue.name
// https://<name>.servicebus.windows.net:443/ → <name>.servicebus.windows.net (any Azure cloud)
output fullyQualifiedNamespace string = replace(replace(namespace.properties.serviceBusEndpoint, 'https://', ''), ':443/', '')
