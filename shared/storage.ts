import { DefaultAzureCredential, ManagedIdentityCredential, type TokenCredential } from '@azure/identity';
import { TableClient, TableServiceClient } from '@azure/data-tables';
import { BlobServiceClient } from '@azure/storage-blob';
import { QueueServiceClient } from '@azure/storage-queue';
import { ConfigError } from './errors';
import type { Settings } from './config';

/**
 * How a connection setting is given, by the Functions convention: `NAME` holds a connection
 * string (Azurite's included), or `NAME__blobServiceUri` / `NAME__queueServiceUri` /
 * `NAME__tableServiceUri` / `NAME__serviceUri` / `NAME__accountName` name endpoints reached with
 * an Azure AD identity (`NAME__credential=managedidentity` + `NAME__clientId` for a user-assigned
 * identity, otherwise DefaultAzureCredential).
 */
export type StorageConnection =
  | { kind: 'connectionString'; connectionString: string }
  | {
      kind: 'identity';
      endpoints: { blob?: string; queue?: string; table?: string };
      credential: TokenCredential;
    };

export type StorageService = 'blob' | 'queue' | 'table';

const AZURITE_DEFAULT =
  'DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;' +
  'AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;' +
  'BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;' +
  'TableEndpoint=http://127.0.0.1:10002/devstoreaccount1';

export function credentialFor(settings: Settings, name: string): TokenCredential {
  const kind = settings[`${name}__credential`];
  const clientId = settings[`${name}__clientId`];
  if (kind && kind.toLowerCase() === 'managedidentity') {
    return clientId ? new ManagedIdentityCredential({ clientId }) : new ManagedIdentityCredential();
  }
  return new DefaultAzureCredential(clientId ? { managedIdentityClientId: clientId } : undefined);
}

export function resolveStorageConnection(settings: Settings, name: string): StorageConnection {
  const direct = settings[name];
  if (direct && direct.trim() !== '') {
    const value = direct.trim();
    return {
      kind: 'connectionString',
      connectionString: value === 'UseDevelopmentStorage=true' ? AZURITE_DEFAULT : value,
    };
  }
  const account = settings[`${name}__accountName`];
  const endpoints = {
    blob:
      settings[`${name}__blobServiceUri`] ??
      settings[`${name}__serviceUri`] ??
      (account ? `https://${account}.blob.core.windows.net` : undefined),
    queue:
      settings[`${name}__queueServiceUri`] ??
      (account ? `https://${account}.queue.core.windows.net` : undefined),
    table:
      settings[`${name}__tableServiceUri`] ??
      (account ? `https://${account}.table.core.windows.net` : undefined),
  };
  if (!endpoints.blob && !endpoints.queue && !endpoints.table) {
    throw new ConfigError(
      `The storage setting ${name} is missing: set ${name} to a connection string (UseDevelopmentStorage=true for Azurite) ` +
        `or ${name}__blobServiceUri / ${name}__accountName for identity-based access.`,
      name,
    );
  }
  return { kind: 'identity', endpoints, credential: credentialFor(settings, name) };
}

function endpointOf(
  connection: StorageConnection & { kind: 'identity' },
  service: StorageService,
  name: string,
): string {
  const url = connection.endpoints[service];
  if (!url) {
    throw new ConfigError(
      `The storage setting ${name} has no ${service} endpoint; set ${name}__${service}ServiceUri.`,
      name,
    );
  }
  return url;
}

/** The one storage-client factory: every part of Lifeboat gets its clients here. */
export class StorageClients {
  private readonly connection: StorageConnection;
  private blobs?: BlobServiceClient;
  private queues?: QueueServiceClient;

  constructor(
    readonly settingName: string,
    settings: Settings = process.env,
  ) {
    this.connection = resolveStorageConnection(settings, settingName);
  }

  static fromConnectionString(connectionString: string): StorageClients {
    return new StorageClients('connection', { connection: connectionString });
  }

  blobService(): BlobServiceClient {
    if (!this.blobs) {
      this.blobs =
        this.connection.kind === 'connectionString'
          ? BlobServiceClient.fromConnectionString(this.connection.connectionString)
          : new BlobServiceClient(
              endpointOf(this.connection, 'blob', this.settingName),
              this.connection.credential,
            );
    }
    return this.blobs;
  }

  queueService(): QueueServiceClient {
    if (!this.queues) {
      this.queues =
        this.connection.kind === 'connectionString'
          ? QueueServiceClient.fromConnectionString(this.connection.connectionString)
          : new QueueServiceClient(
              endpointOf(this.connection, 'queue', this.settingName),
              this.connection.credential,
            );
    }
    return this.queues;
  }

  tableService(): TableServiceClient {
    return this.connection.kind === 'connectionString'
      ? TableServiceClient.fromConnectionString(this.connection.connectionString, {
          allowInsecureConnection: true,
        })
      : new TableServiceClient(
          endpointOf(this.connection, 'table', this.settingName),
          this.connection.credential,
        );
  }

  table(tableName: string): TableClient {
    return this.connection.kind === 'connectionString'
      ? TableClient.fromConnectionString(this.connection.connectionString, tableName, {
          allowInsecureConnection: true,
        })
      : new TableClient(
          endpointOf(this.connection, 'table', this.settingName),
          tableName,
          this.connection.credential,
        );
  }
}
