import type { MachineAgent } from '../mobility/agent';
import type { NbdServer } from '../mobility/nbd';
import type { MarkerSpec } from '../mobility/segmenter';
import { ConfigError } from '../../shared/errors';

/**
 * What the group barrier needs from a machine's agent: hold every disk's new writes (and so
 * their acknowledgements) and drain the ones in flight; cut every disk at a given marker while
 * held; let writes go.
 */
export interface WriteHold {
  readonly disks: readonly string[];
  /** Every export stops admitting writes in one synchronous step; resolves once drained. */
  hold(): Promise<void>;
  /** Ends every disk's segment with `marker` in one synchronous step (only while held). */
  cut(marker: MarkerSpec): Promise<Record<string, number>>;
  release(): void;
  /** Why no consistent cut exists now (a disk not in data mode), or undefined. */
  notReady(): string | undefined;
}

/**
 * The WriteHold of a running MachineAgent, composed from its public surface (`segmenter(disk)`,
 * `status()`) and its NBD server. MachineAgent does not expose the server yet; until the hook
 * asked for in docs/groups.md ("Agent hook") lands, this reads the `server` field. The check
 * below fails fast if that field is renamed, instead of silently cutting without a pause.
 */
export function agentWriteHold(agent: MachineAgent): WriteHold {
  const server = (agent as unknown as { server?: NbdServer }).server;
  if (!server || typeof server.pause !== 'function' || typeof server.resume !== 'function') {
    throw new ConfigError(
      `The agent of machine ${agent.machine} has no NBD server to pause (not started, or a scan-source agent); ` +
        'group markers need an NBD agent that has been started.',
      'source',
    );
  }
  const disks = agent.status().disks.map((d) => d.disk);
  return {
    disks,
    hold: () => server.pause(),
    release: () => server.resume(),
    notReady() {
      for (const d of disks) {
        const mode = agent.segmenter(d).mode;
        if (mode !== 'data') return `disk ${d} is in ${mode} mode`;
      }
      return undefined;
    },
    async cut(marker) {
      // All cuts start in this synchronous step, so every disk's segment ends at the same point.
      const cuts = disks.map((d) => agent.segmenter(d).cut(marker));
      const seqs = await Promise.all(cuts);
      return Object.fromEntries(disks.map((d, i) => [d, seqs[i] as number]));
    },
  };
}
