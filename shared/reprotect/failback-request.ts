import { z } from 'zod';

/**
 * The body of a machine's failback (POST /api/machines/{m}/failback); a plan's failback takes the
 * same fields for each of its machines, and more (plan-failback.ts). docs/reprotect.md.
 */
export const failbackRequestSchema = z.strictObject({
  /** Delete the failover machine and its disks once its site disks are verified. */
  cleanup: z.boolean({ error: 'must be true or false' }).default(true),
  /** How long to wait for the site's target, and then for the agent to resume protection. */
  waitSeconds: z
    .number()
    .int()
    .min(10)
    .max(7 * 86_400)
    .default(3600),
});

export type FailbackRequest = z.infer<typeof failbackRequestSchema>;
