import * as df from 'durable-functions';
import {
  createFailoverActivities,
  defaultFailoverDeps,
  type FailoverActivities,
} from '../../shared/failover';
import { ACTIVITY } from './names';

// The failover and plan activities, wired to the process's dependencies on first use.
let activities: FailoverActivities | undefined;
const real = () => (activities ??= createFailoverActivities(defaultFailoverDeps()));

for (const key of Object.keys(ACTIVITY) as (keyof typeof ACTIVITY)[]) {
  df.app.activity(ACTIVITY[key], {
    handler: (input: unknown) => (real()[key] as (input: unknown) => Promise<unknown>)(input),
  });
}
