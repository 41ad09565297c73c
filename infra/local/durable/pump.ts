import type { DequeuedMessageItem, QueueClient } from '@azure/storage-queue';

export type Log = (level: 'info' | 'warn' | 'error', msg: string, fields?: object) => void;

export interface PumpOptions {
  queue: QueueClient;
  /** Messages handled at once. */
  concurrency: number;
  /** How long a received message stays invisible; renewed while its handler runs. */
  visibilityMs: number;
  /** Poll interval while busy; doubles up to maxPollMs while the queue stays empty. */
  minPollMs: number;
  maxPollMs: number;
  /** Deliveries after which a message that keeps failing is dropped (and logged). */
  maxDeliveries: number;
  handle(body: unknown): Promise<void>;
  log: Log;
}

/**
 * Feeds queue messages to a handler: at-least-once, the visibility timeout as the lease (renewed
 * while the handler runs), the message deleted only after the handler resolved. A handler that
 * throws leaves its message to come back after a short back-off.
 */
export class QueuePump {
  private running = false;
  private readonly inflight = new Set<Promise<void>>();
  private loopDone?: Promise<void>;
  private wake?: () => void;
  private idleMs: number;

  constructor(private readonly options: PumpOptions) {
    this.idleMs = options.minPollMs;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    this.loopDone = this.loop();
  }

  /** Polls again now (something was just enqueued). */
  kick(): void {
    this.idleMs = this.options.minPollMs;
    this.wake?.();
  }

  async stop(): Promise<void> {
    this.running = false;
    this.wake?.();
    await this.loopDone;
    await Promise.allSettled([...this.inflight]);
  }

  private sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(done, ms);
      function done() {
        clearTimeout(timer);
        resolve();
      }
      this.wake = done;
    }).then(() => {
      this.wake = undefined;
    });
  }

  private async loop(): Promise<void> {
    const { queue, concurrency, visibilityMs, minPollMs, maxPollMs, log } = this.options;
    while (this.running) {
      const free = concurrency - this.inflight.size;
      if (free <= 0) {
        await Promise.race([...this.inflight, this.sleep(maxPollMs)]);
        continue;
      }
      let messages: DequeuedMessageItem[] = [];
      try {
        const res = await queue.receiveMessages({
          numberOfMessages: Math.min(32, free),
          visibilityTimeout: Math.ceil(visibilityMs / 1000),
        });
        messages = res.receivedMessageItems;
      } catch (err) {
        if (this.running)
          log('warn', `Could not read queue ${queue.name}; retrying.`, { error: String(err) });
        await this.sleep(maxPollMs);
        continue;
      }
      for (const message of messages) {
        const task = this.process(message).finally(() => {
          this.inflight.delete(task);
          this.wake?.();
        });
        this.inflight.add(task);
      }
      if (messages.length > 0) {
        this.idleMs = minPollMs;
      } else {
        await this.sleep(this.idleMs);
        this.idleMs = Math.min(this.idleMs * 2, maxPollMs);
      }
    }
  }

  private async process(message: DequeuedMessageItem): Promise<void> {
    const { queue, visibilityMs, log, maxDeliveries } = this.options;
    let popReceipt = message.popReceipt;
    // Renewals and the final delete take turns, so the delete always has the latest receipt.
    let chain: Promise<unknown> = Promise.resolve();
    const serial = <T>(op: () => Promise<T>): Promise<T> => {
      const next = chain.then(op, op);
      chain = next.catch(() => undefined);
      return next;
    };
    const renew = setInterval(
      () => {
        void serial(async () => {
          const res = await queue.updateMessage(
            message.messageId,
            popReceipt,
            undefined,
            Math.ceil(visibilityMs / 1000),
          );
          popReceipt = res.popReceipt!;
        }).catch((err) =>
          log('warn', `Could not extend the lease of a message on ${queue.name}.`, { error: String(err) }),
        );
      },
      Math.max(250, visibilityMs / 3),
    );
    try {
      let body: unknown;
      try {
        body = JSON.parse(message.messageText);
      } catch {
        log('error', `Dropping a malformed message on ${queue.name}.`, {
          text: message.messageText.slice(0, 200),
        });
        body = undefined;
      }
      if (body !== undefined) await this.options.handle(body);
      clearInterval(renew);
      await serial(() => queue.deleteMessage(message.messageId, popReceipt));
    } catch (err) {
      clearInterval(renew);
      if (message.dequeueCount >= maxDeliveries) {
        log('error', `Dropping a message on ${queue.name} after ${message.dequeueCount} failed deliveries.`, {
          error: String(err),
          text: message.messageText.slice(0, 200),
        });
        await serial(() => queue.deleteMessage(message.messageId, popReceipt)).catch(() => undefined);
        return;
      }
      log('warn', `Handling a message on ${queue.name} failed; it will be retried.`, { error: String(err) });
      const backoff = Math.min(2 ** message.dequeueCount, 30);
      await serial(() => queue.updateMessage(message.messageId, popReceipt, undefined, backoff)).catch(
        () => undefined,
      );
    } finally {
      clearInterval(renew);
    }
  }
}
