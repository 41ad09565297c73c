import { durableExtension } from './durable/extension';
import type { HostExtensionFactory } from './host';

/** The extensions the local host runs besides HTTP, queues and timers. */
export function localExtensions(): HostExtensionFactory[] {
  return [durableExtension];
}
