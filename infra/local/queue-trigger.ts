import type { QueueClient, DequeuedMessageItem } from '@azure/storage-queue';
import type { Settings } from '../../shared/config';
import { POISON_SUFFIX, type LocalQueueEnvelope } from '../../shared/messaging';
import { StorageClients } from '../../shared/storage';
import type { FunctionRegistry, RegisteredFunction, RpcTypedData } from './functions-core';

export interface QueueTriggerOptions {
  registry: FunctionRegistry;
  settings: Settings;
  /** Deliveries before a message goes to `<queue>-poison` (Service Bus' MaxDeliveryCount). */
  maxDeliveryCount: number;
  /** The peek-lock: how long a received message stays invisible while its handler runs. */
  lockSeconds: number;
  /** How many handler invocations may run at once per queue (host.json maxConcurrentCalls). */
  maxConcurrentCalls: number;
  log: (level: 'info' | 'warn' | 'error', message: string, fields?: object) => void;
}

/** Resolves `%SettingName%` in binding properties, as the Functions host does. */
export function resolveBindingExpression(value: string, settings: Settings): string {
  return value.replace(/%([^%]+)%/g, (_, name: string) => {
    const resolved = settings[name];
    if (resolved === undefined)
      throw new Error(`Binding expression %${name}% names a setting that is not set.`);
    return resolved;
  });
}

function parseEnvelope(text: string): LocalQueueEnvelope | undefined {
  try {
    const parsed = JSON.parse(text) as LocalQueueEnvelope;
    if (parsed && typeof parsed === 'object' && typeof parsed.messageId === 'string') return parsed;
  } catch {
    /* not ours: treated as a plain body below */
  }
  return undefined;
}

function bodyData(body: unknown): RpcTypedData {
  return typeof body === 'string' ? { string: body } : { json: JSON.stringify(body ?? null) };
}

/**
 * Feeds one `serviceBusTrigger` function from the Azurite queue of the same name, with Service
 * Bus semantics: at-least-once, the visibility timeout as the peek-lock (renewed while the handler
 * runs), the delivery count in the trigger metadata, and `<queue>-poison` after
 * `maxDeliveryCount` failed deliveries.
 */
class QueueFeeder {
  private running = true;
  private readonly inFlight = new Set<Promise<void>>();
  private loop?: Promise<void>;
  private wake?: () => void;

  constructor(
    private readonly fn: RegisteredFunction,
    private readonly queue: QueueClient,
    private readonly poison: QueueClient,
    private readonly options: QueueTriggerOptions,
  ) {}

  async start(): Promise<void> {
    await this.queue.createIfNotExists();
    await this.poison.createIfNotExists();
    this.loop = this.run();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.wake?.();
    await this.loop;
    await Promise.allSettled([...this.inFlight]);
  }

  private async run(): Promise<void> {
    let idleMs = 50;
    while (this.running) {
      const capacity = this.options.maxConcurrentCalls - this.inFlight.size;
      if (capacity <= 0) {
        await Promise.race(this.inFlight);
        continue;
      }
      let messages: DequeuedMessageItem[] = [];
      try {
        const received = await this.queue.receiveMessages({
          numberOfMessages: Math.min(32, capacity),
          visibilityTimeout: this.options.lockSeconds,
        });
        messages = received.receivedMessageItems;
      } catch (err) {
        this.options.log('warn', `cannot receive from queue ${this.queue.name}; retrying`, {
          err: String(err),
        });
      }
      for (const message of messages) {
        const work = this.deliver(message).finally(() => this.inFlight.delete(work));
        this.inFlight.add(work);
      }
      if (messages.length > 0) {
        idleMs = 50;
        continue;
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, idleMs);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      idleMs = Math.min(idleMs * 2, 1000);
    }
  }

  private async deliver(message: DequeuedMessageItem): Promise<void> {
    const envelope = parseEnvelope(message.messageText);
    const messageId = envelope?.messageId ?? message.messageId;
    const fields = {
      function: this.fn.name,
      queue: this.queue.name,
      messageId,
      deliveryCount: message.dequeueCount,
    };
    let popReceipt = message.popReceipt;
    if (message.dequeueCount > this.options.maxDeliveryCount) {
      await this.poison.sendMessage(message.messageText, { messageTimeToLive: -1 });
      await this.queue.deleteMessage(message.messageId, popReceipt);
      this.options.log(
        'warn',
        `message moved to ${this.poison.name} after ${this.options.maxDeliveryCount} deliveries`,
        fields,
      );
      return;
    }
    // Renew the lock while the handler runs, like the Service Bus trigger's auto lock renewal.
    const renewEvery = Math.max(1, this.options.lockSeconds / 2) * 1000;
    let renewal = Promise.resolve();
    const renewer = setInterval(() => {
      renewal = renewal.then(async () => {
        try {
          const r = await this.queue.updateMessage(
            message.messageId,
            popReceipt,
            undefined,
            this.options.lockSeconds,
          );
          popReceipt = r.popReceipt!;
        } catch (err) {
          this.options.log('warn', 'could not renew the message lock', { ...fields, err: String(err) });
        }
      });
    }, renewEvery);
    let failed: unknown;
    try {
      await this.options.registry.invoke(this.fn.name, {
        inputData: [
          { name: this.fn.trigger.name, data: bodyData(envelope ? envelope.body : message.messageText) },
        ],
        triggerMetadata: {
          MessageId: { string: messageId },
          DeliveryCount: { int: message.dequeueCount },
          EnqueuedTimeUtc: { string: envelope?.enqueuedTimeUtc ?? message.insertedOn.toISOString() },
          ExpiresAtUtc: { string: message.expiresOn.toISOString() },
          ContentType: { string: 'application/json' },
        },
      });
    } catch (err) {
      failed = err;
    } finally {
      clearInterval(renewer);
      await renewal;
    }
    try {
      if (failed === undefined) {
        await this.queue.deleteMessage(message.messageId, popReceipt);
      } else {
        this.options.log('warn', `function ${this.fn.name} failed; the message will be delivered again`, {
          ...fields,
          err: failed instanceof Error ? failed.message : String(failed),
        });
        // Abandon: make it visible again after a short pause rather than the full lock time.
        await this.queue.updateMessage(message.messageId, popReceipt, undefined, 1);
      }
    } catch (err) {
      this.options.log('warn', 'lost the message lock; the message will be delivered again', {
        ...fields,
        err: String(err),
      });
    }
  }
}

export class QueueTriggers {
  private readonly feeders: QueueFeeder[] = [];

  constructor(private readonly options: QueueTriggerOptions) {}

  async start(): Promise<void> {
    for (const fn of this.options.registry.byTriggerType('serviceBusTrigger')) {
      const queueName = resolveBindingExpression(String(fn.trigger.queueName), this.options.settings);
      const connection = String(fn.trigger.connection ?? 'ServiceBusConnection');
      const service = new StorageClients(connection, this.options.settings).queueService();
      const feeder = new QueueFeeder(
        fn,
        service.getQueueClient(queueName),
        service.getQueueClient(`${queueName}${POISON_SUFFIX}`),
        this.options,
      );
      await feeder.start();
      this.feeders.push(feeder);
    }
  }

  async stop(): Promise<void> {
    await Promise.all(this.feeders.map((f) => f.stop()));
  }
}
