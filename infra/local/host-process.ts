import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import type { LocalHostOptions } from './host';

export interface HostProcess {
  port: number;
  child: ChildProcess;
  functions: string[];
  /** SIGTERM and wait for a clean exit. */
  stop(): Promise<void>;
  /** SIGKILL, as a crash would. */
  kill(): Promise<void>;
}

/** The host's process entry: the compiled JS when we run compiled, the TS source under tsx otherwise. */
function entry(): { script: string; execArgv: string[] } {
  const compiled = __filename.endsWith('.js');
  return compiled
    ? { script: path.join(__dirname, 'host-main.js'), execArgv: [] }
    : { script: path.join(__dirname, 'host-main.ts'), execArgv: ['--import', 'tsx'] };
}

/**
 * Starts the local Functions host as a child process and resolves once it listens. Its log lines
 * (JSON on stderr) go to `onLog`, or to this process's stderr.
 */
export function spawnLocalHost(
  options: LocalHostOptions,
  onLog?: (line: string) => void,
): Promise<HostProcess> {
  const { script, execArgv } = entry();
  const child = spawn(process.execPath, [...execArgv, script], {
    env: { ...process.env, LIFEBOAT_HOST_CONFIG: JSON.stringify(options) },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  const tail: string[] = [];
  readline.createInterface({ input: child.stderr! }).on('line', (line) => {
    tail.push(line);
    if (tail.length > 30) tail.shift();
    if (onLog) onLog(line);
    else process.stderr.write(`${line}\n`);
  });
  return new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child.stdout! });
    lines.on('line', (line) => {
      let ready: { ready?: boolean; port?: number; functions?: string[] } | undefined;
      try {
        ready = JSON.parse(line);
      } catch {
        return;
      }
      if (!ready?.ready) return;
      resolve({
        port: ready.port!,
        child,
        functions: ready.functions ?? [],
        stop: async () => {
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
          await exited;
        },
        kill: async () => {
          if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
          await exited;
        },
      });
    });
    child.once('exit', (code, signal) =>
      reject(
        new Error(
          `The local Functions host exited (${signal ?? code}) before it was ready:\n${tail.join('\n')}`,
        ),
      ),
    );
  });
}
