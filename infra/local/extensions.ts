import type { HostExtensionFactory } from './host';

/** The extensions the local host runs besides HTTP, queues and timers (Durable joins here). */
export function localExtensions(): HostExtensionFactory[] {
  return [];
}
