/*
 * The function app's one entry point (package.json "main"). Importing a module registers its
 * triggers with @azure/functions / durable-functions; the Azure host and the local host both load
 * exactly this file.
 */
import './telemetry';
import './http/health';
import './http/machines';
import './http/events';
import './replication/apply';
import './replication/retention';
import './replication/rpo';
import './orchestrations/failover';
import './orchestrations/plan';
import './http/failover';
import './http/plans';
import './http/operations';
import './http/protection';
import './http/groups';
