import { randomUUID } from 'node:crypto';
import { ServiceBusClient, type ServiceBusSender } from '@azure/service-bus';
import type { QueueClient } from '@azure/storage-queue';
import type { Settings } from './config';
import { ConfigError } from './errors';
import { StorageClients, credentialFor } from './storage';

export interface OutgoingMessage {
  body: unknown;
  /** Defaults to a random id; Service Bus duplicate detection and the local host both use it. */
  messageId?: string;
  /** Deliver no earlier than this many seconds from now. */
  delaySeconds?: number;
}

/**
 * The one way Lifeboat sends a queue message. In Azure it is a Service Bus queue; locally the
 * same setting names an Azurite storage queue, which the local Functions host feeds to the
 * `serviceBusQueue` trigger of the same name.
 */
export interface MessageSender {
  readonly queueName: string;
  send(message: OutgoingMessage): Promise<void>;
  close(): Promise<void>;
}

/**
 * What the local host stores in an Azurite queue message: the body plus the Service Bus
 * properties the trigger metadata carries.
 */
export interface LocalQueueEnvelope {
  messageId: string;
  body: unknown;
  enqueuedTimeUtc: string;
}

export const POISON_SUFFIX = '-poison';

export class StorageQueueSender implements MessageSender {
  private created?: Promise<unknown>;

  constructor(
    readonly queueName: string,
    private readonly queue: QueueClient,
  ) {}

  async send(message: OutgoingMessage): Promise<void> {
    this.created ??= this.queue.createIfNotExists().catch((err) => {
      this.created = undefined;
      throw err;
    });
    await this.created;
    const envelope: LocalQueueEnvelope = {
      messageId: message.messageId ?? randomUUID(),
      body: message.body,
      enqueuedTimeUtc: new Date().toISOString(),
    };
    await this.queue.sendMessage(JSON.stringify(envelope), {
      visibilityTimeout: message.delaySeconds ? Math.ceil(message.delaySeconds) : undefined,
      messageTimeToLive: -1,
    });
  }

  async close(): Promise<void> {}
}

export class ServiceBusQueueSender implements MessageSender {
  private readonly sender: ServiceBusSender;

  constructor(
    readonly queueName: string,
    private readonly client: ServiceBusClient,
  ) {
    this.sender = client.createSender(queueName);
  }

  async send(message: OutgoingMessage): Promise<void> {
    const sbMessage = {
      body: message.body,
      messageId: message.messageId ?? randomUUID(),
      contentType: 'application/json',
    };
    if (message.delaySeconds && message.delaySeconds > 0) {
      await this.sender.scheduleMessages(sbMessage, new Date(Date.now() + message.delaySeconds * 1000));
    } else {
      await this.sender.sendMessages(sbMessage);
    }
  }

  async close(): Promise<void> {
    await this.sender.close();
    await this.client.close();
  }
}

/** True when the setting's value is a Service Bus (not a storage) connection string. */
function isServiceBusConnectionString(value: string): boolean {
  return /(^|;)\s*Endpoint=sb:\/\//i.test(value);
}

/**
 * Chooses the adapter from the setting's shape: a Service Bus connection string or
 * `NAME__fullyQualifiedNamespace` → Service Bus; a storage connection string (Azurite locally)
 * → a storage queue of the same name.
 */
export function createMessageSender(
  settings: Settings,
  settingName: string,
  queueName: string,
): MessageSender {
  const value = settings[settingName];
  const namespace = settings[`${settingName}__fullyQualifiedNamespace`];
  if (value && isServiceBusConnectionString(value)) {
    return new ServiceBusQueueSender(queueName, new ServiceBusClient(value));
  }
  if (namespace) {
    return new ServiceBusQueueSender(
      queueName,
      new ServiceBusClient(namespace, credentialFor(settings, settingName)),
    );
  }
  if (value || settings[`${settingName}__queueServiceUri`] || settings[`${settingName}__accountName`]) {
    const queue = new StorageClients(settingName, settings).queueService().getQueueClient(queueName);
    return new StorageQueueSender(queueName, queue);
  }
  throw new ConfigError(
    `The setting ${settingName} is missing: set it to a Service Bus connection string, ` +
      `${settingName}__fullyQualifiedNamespace for identity-based access, or an Azurite connection string locally.`,
    settingName,
  );
}
