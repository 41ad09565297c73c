import { execFile } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';

const root = path.resolve(__dirname, '../..');

describe('lifeboat demo --short', () => {
  it('runs to its report with every verification passed and every figure present', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'lifeboat-demo-'));
    const reportFile = path.join(dir, 'report.json');
    const stdout = await new Promise<string>((resolve, reject) =>
      execFile(
        process.execPath,
        [
          path.join(root, 'dist/agent/cli.js'),
          'demo',
          '--short',
          '--data',
          path.join(dir, 'data'),
          '--json',
          reportFile,
        ],
        { timeout: 240_000, maxBuffer: 16 * 1024 * 1024 },
        (err, out, errOut) =>
          err
            ? reject(new Error(`demo failed: ${err.message}\n${out}\n${errOut.slice(-3000)}`))
            : resolve(out),
      ),
    );
    expect(stdout).toContain('Lifeboat demo report — all verifications passed');
    const report = JSON.parse(readFileSync(reportFile, 'utf8'));
    expect(report.ok).toBe(true);
    expect(report.steps.every((s: { ok: boolean }) => s.ok)).toBe(true);
    expect(report.verifications.length).toBeGreaterThan(0);
    expect(report.verifications.every((v: { ok: boolean }) => v.ok)).toBe(true);
    expect(report.figures.recoveryPoints).toBeGreaterThanOrEqual(3);
    expect(report.figures.rpoSecondsMax).toEqual(expect.any(Number));
    expect(report.figures.bytesWritten).toBeGreaterThan(0);
    expect(report.figures.bytesShipped).toBeGreaterThan(0);
  }, 300_000);
});
