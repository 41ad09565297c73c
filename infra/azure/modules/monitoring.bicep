// Log Analytics + workspace-based Application Insights with local (instrumentation-key-only)
// ingestion turned off: telemetry is accepted only from identities holding Monitoring Metrics
// Publisher, so the connection string in app settings is not a credential.

param logAnalyticsName string
param appInsightsName string
param location string
param tags object = {}

@minValue(30)
param retentionInDays int = 30

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: retentionInDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    DisableLocalAuth: true
  }
}

output appInsightsName string = appInsights.name
output connectionString string = appInsights.properties.ConnectionString
output workspaceName string = workspace.name
