import type { TableClient } from '@azure/data-tables';
import type { StorageClients } from '../storage';

// The failover state in Table storage (ReplicaStorage). docs/failover.md lists every field.
//
//   failovers       PK {machine}  RK "active"        the machine's one active failover (insert-if-absent = the 409)
//                   PK {machine}  RK {failoverId}    a failover record: kind, state, point, target, error
//   targetmachines  PK {machine}  RK {failoverId}    a target machine of the local compute provider
//   plans           PK "plans"    RK {plan}          a recovery plan (JSON)
//   commands        PK {machine}  RK {commandId}     commands for the agent (quiesce), served by the proxy

export const FAILOVER_TABLES = {
  failovers: 'failovers',
  targets: 'targetmachines',
  plans: 'plans',
  commands: 'commands',
} as const;

export type FailoverTableName = (typeof FAILOVER_TABLES)[keyof typeof FAILOVER_TABLES];

export const ACTIVE_ROW = 'active';
export const PLANS_PARTITION = 'plans';

/** The table clients of the failover state, each table created on first use. */
export class FailoverTables {
  private readonly clients = new Map<string, Promise<TableClient>>();

  constructor(private readonly storage: StorageClients) {}

  get(name: FailoverTableName): Promise<TableClient> {
    let client = this.clients.get(name);
    if (!client) {
      const c = this.storage.table(name);
      client = c.createTable().then(
        () => c,
        (err) => {
          this.clients.delete(name);
          throw err;
        },
      );
      this.clients.set(name, client);
    }
    return client;
  }
}
