import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { TestProject } from 'vitest/node';
import { startAzurite, type RunningAzurite } from '../infra/local/azurite';

declare module 'vitest' {
  export interface ProvidedContext {
    azuriteConnectionString: string;
  }
}

let azurite: RunningAzurite | undefined;
let folder: string | undefined;

/** One Azurite for the whole run, on free ports, on disk in a temporary folder. */
export async function setup(project: TestProject): Promise<void> {
  folder = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-azurite-'));
  azurite = await startAzurite({ location: folder });
  project.provide('azuriteConnectionString', azurite.connectionString);
}

export async function teardown(): Promise<void> {
  await azurite?.stop();
  if (folder) rmSync(folder, { recursive: true, force: true });
}
