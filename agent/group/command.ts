import fs from 'node:fs';
import { Command } from 'commander';
import { createLogger } from '../../shared/logger';
import { validateName } from '../../shared/names';
import {
  agentCommand,
  protectAgent,
  readCredential,
  untilSignalStopped,
  type ProtectOptions,
} from '../mobility/command';
import { GroupParticipant } from './participant';
import { GroupMemberClient } from './transport';

/*
 * `lifeboat agent group-member`: `lifeboat agent protect` plus membership of a replication group.
 * The group barrier must hold the agent's own NBD writes, so the member runs in the agent's
 * process: same options as protect (copied from it, so they never drift), plus --group. The
 * member polls the group's coordinator on the proxy (--proxy) with the machine's credential.
 * Mounted by the CLI under `lifeboat agent` (agent/cli.ts).
 */

export interface GroupMemberOptions extends ProtectOptions {
  group: string;
}

/** Runs a protected machine as a member of `opts.group` until SIGINT/SIGTERM. */
export async function runGroupMember(opts: GroupMemberOptions): Promise<void> {
  const group = validateName(opts.group, 'group');
  const { agent, journalDir } = protectAgent(opts);
  const log = createLogger('group');
  await agent.start();
  const participant = new GroupParticipant(agent, {
    freezeCommand: opts.freezeCmd,
    thawCommand: opts.thawCmd,
    logger: log,
  });
  const member = new GroupMemberClient(participant, {
    url: opts.proxy,
    group,
    credential: readCredential(opts.credentialFile),
    ...(opts.proxyCa ? { ca: fs.readFileSync(opts.proxyCa) } : {}),
    logger: log,
  });
  member.start();
  const nbd = agent.status().nbd;
  console.log(
    `Protecting ${opts.machine} as a member of replication group ${group}` +
      `${nbd ? ` (NBD at nbd://${nbd.host}:${nbd.port}/<disk>)` : ''}; journal ${journalDir}; group markers from ${opts.proxy}. Ctrl-C stops cleanly.`,
  );
  await untilSignalStopped("leaving the group's barrier and stopping the agent", async () => {
    await member.stop();
    await agent.stop();
  });
}

/** The `group-member` command, for `lifeboat agent` (the CLI mounts it: agent.addCommand(groupMemberCommand())). */
export function groupMemberCommand(): Command {
  const protect = agentCommand().commands.find((c) => c.name() === 'protect');
  if (!protect) throw new Error('lifeboat agent protect is missing; group-member copies its options.');
  const command = new Command('group-member')
    .description(
      "Protect a machine (as `agent protect` does) as a member of a replication group: group markers from the group's coordinator on the proxy hold this machine's writes for a consistent cut across the group.",
    )
    .requiredOption(
      '--group <name>',
      'the replication group (as created with PUT /api/groups/{group}; the machine must be a member)',
    );
  for (const option of protect.options) command.addOption(option);
  return command.action(async (opts: GroupMemberOptions) => {
    await runGroupMember(opts);
  });
}
