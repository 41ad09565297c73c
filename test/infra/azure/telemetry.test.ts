import { createRequire } from 'node:module';
import { ManagedIdentityCredential } from '@azure/identity';
import { describe, expect, it } from 'vitest';
import { ConfigError } from '../../../shared/errors';
import {
  AZURE_MONITOR_PACKAGE,
  OTEL_API_PACKAGE,
  getTelemetry,
  startTelemetry,
  telemetryRequested,
} from '../../../shared/telemetry';

// The Azure Monitor exporter cannot run here (no Application Insights), so the "on" path is driven
// through a stand-in for the two packages, behind the same loader the real ones come through.
function fakeOtel(missing: string[] = []) {
  const gauges = new Map<string, Array<(r: { observe(v: number, a?: object): void }) => void>>();
  const spans: Array<{
    name: string;
    attributes: object;
    status?: { code: number };
    exception?: Error;
    ended: boolean;
  }> = [];
  const monitorCalls: unknown[] = [];
  let shutdowns = 0;
  const api = {
    trace: {
      getTracerProvider: () => ({}),
      getTracer: () => ({
        startActiveSpan: <T>(name: string, options: { attributes: object }, fn: (span: unknown) => T): T => {
          const record: (typeof spans)[number] = { name, attributes: options.attributes, ended: false };
          spans.push(record);
          return fn({
            recordException: (e: Error) => (record.exception = e),
            setStatus: (s: { code: number }) => (record.status = s),
            end: () => (record.ended = true),
          });
        },
      }),
    },
    metrics: {
      getMeter: () => ({
        createObservableGauge: (name: string) => ({
          addCallback: (cb: (r: { observe(v: number, a?: object): void }) => void) =>
            gauges.set(name, [...(gauges.get(name) ?? []), cb]),
        }),
      }),
    },
  };
  const monitor = {
    useAzureMonitor: (options: unknown) => monitorCalls.push(options),
    shutdownAzureMonitor: async () => void shutdowns++,
  };
  const observe = (name: string) => {
    const seen: Array<[number, object | undefined]> = [];
    for (const cb of gauges.get(name) ?? []) cb({ observe: (v, a) => seen.push([v, a]) });
    return seen;
  };
  const load = (name: string): unknown => {
    if (missing.includes(name)) return requireMissing(name);
    if (name === AZURE_MONITOR_PACKAGE) return monitor;
    if (name === OTEL_API_PACKAGE) return api;
    const err = new Error(`Cannot find module '${name}'`) as NodeJS.ErrnoException;
    err.code = 'MODULE_NOT_FOUND';
    throw err;
  };
  return { load, spans, monitorCalls, observe, shutdowns: () => shutdowns };
}

/** Throws the error Node throws for a package that is not installed (checked below against Node itself). */
function requireMissing(name: string): never {
  const err = new Error(
    `Cannot find module '${name}'\nRequire stack:\n- ${__filename}`,
  ) as NodeJS.ErrnoException;
  err.code = 'MODULE_NOT_FOUND';
  throw err;
}

const connectionString =
  'InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=https://example.invalid/';

describe('telemetry', () => {
  it('is off unless asked, and then loads nothing', () => {
    const loaded: string[] = [];
    for (const value of [undefined, '', 'off', 'false', '0']) {
      const t = startTelemetry(
        { LIFEBOAT_TELEMETRY: value, APPLICATIONINSIGHTS_CONNECTION_STRING: connectionString },
        { load: (n) => loaded.push(n) },
      );
      expect(t.enabled).toBe(false);
    }
    expect(loaded).toEqual([]);
    expect(getTelemetry().enabled).toBe(false);
  });

  it('refuses a value that is neither on nor off, naming the setting', () => {
    expect(() => telemetryRequested({ LIFEBOAT_TELEMETRY: 'yes please' })).toThrow(ConfigError);
    expect(() => startTelemetry({ LIFEBOAT_TELEMETRY: 'verbose' })).toThrow(
      /LIFEBOAT_TELEMETRY is "verbose"; set it to "on" or "off"/,
    );
  });

  it('recognises a package that is not installed the way Node reports it', () => {
    const name = '@lifeboat/not-an-installed-package';
    const real = (() => {
      try {
        createRequire(__filename)(name);
      } catch (err) {
        return err as NodeJS.ErrnoException;
      }
      throw new Error('expected require to fail');
    })();
    let fake: NodeJS.ErrnoException | undefined;
    try {
      requireMissing(name);
    } catch (err) {
      fake = err as NodeJS.ErrnoException;
    }
    expect(fake?.code).toBe(real.code);
    expect(real.message.split('\n')[0]).toBe(fake?.message.split('\n')[0]);
  });

  it('says clearly that the exporter package is missing, and the app keeps running', async () => {
    const warnings: string[] = [];
    const t = startTelemetry(
      { LIFEBOAT_TELEMETRY: 'on', APPLICATIONINSIGHTS_CONNECTION_STRING: connectionString },
      { load: fakeOtel([AZURE_MONITOR_PACKAGE]).load, warn: (m) => warnings.push(m) },
    );
    expect(t.enabled).toBe(false);
    expect(t.reason).toMatch(
      /the package @azure\/monitor-opentelemetry is not installed; add @azure\/monitor-opentelemetry and @opentelemetry\/api to package\.json/,
    );
    expect(warnings).toHaveLength(1);
    await expect(t.span('apply', { machine: 'm1' }, async () => 42)).resolves.toBe(42);
    t.recordRpo('m1', 5);
  });

  it('says so when on without a connection string', () => {
    const warnings: string[] = [];
    const t = startTelemetry(
      { LIFEBOAT_TELEMETRY: 'on' },
      { load: fakeOtel().load, warn: (m) => warnings.push(m) },
    );
    expect(t.enabled).toBe(false);
    expect(warnings[0]).toMatch(/APPLICATIONINSIGHTS_CONNECTION_STRING is not set/);
  });

  it('exports with the app identity, records spans and the lag, backlog and RPO gauges', async () => {
    const otel = fakeOtel();
    const t = startTelemetry(
      {
        LIFEBOAT_TELEMETRY: 'on',
        APPLICATIONINSIGHTS_CONNECTION_STRING: connectionString,
        APPLICATIONINSIGHTS_AUTHENTICATION_STRING:
          'ClientId=11111111-2222-3333-4444-555555555555;Authorization=AAD',
      },
      { load: otel.load },
    );
    expect(t.enabled).toBe(true);
    expect(getTelemetry()).toBe(t);
    expect(t.reason).toMatch(/with Entra ID, without per-invocation spans/);
    const options = otel.monitorCalls[0] as {
      azureMonitorExporterOptions: { connectionString: string; credential: unknown };
    };
    expect(options.azureMonitorExporterOptions.connectionString).toBe(connectionString);
    expect(options.azureMonitorExporterOptions.credential).toBeInstanceOf(ManagedIdentityCredential);

    await expect(t.span('apply', { machine: 'm1', disk: 'd0' }, async () => 'done')).resolves.toBe('done');
    await expect(
      t.span('failover', { machine: 'm1' }, async () => Promise.reject(new Error('no capacity'))),
    ).rejects.toThrow('no capacity');
    expect(otel.spans.map((s) => [s.name, s.ended, s.status?.code])).toEqual([
      ['apply', true, undefined],
      ['failover', true, 2],
    ]);
    expect(otel.spans[1].exception?.message).toBe('no capacity');

    t.recordApplyLag('m1', 'd0', 3.5);
    t.recordApplyLag('m1', 'd0', 1.25);
    t.recordBacklog('m1', 'd1', 7);
    t.recordRpo('m1', 42);
    t.recordRpo('m2', 900);
    expect(otel.observe('lifeboat.apply.lag')).toEqual([[1.25, { machine: 'm1', disk: 'd0' }]]);
    expect(otel.observe('lifeboat.apply.backlog')).toEqual([[7, { machine: 'm1', disk: 'd1' }]]);
    expect(otel.observe('lifeboat.rpo')).toEqual([
      [42, { machine: 'm1' }],
      [900, { machine: 'm2' }],
    ]);
    await t.shutdown();
    expect(otel.shutdowns()).toBe(1);
  });

  it('rejects an authentication string that is not Entra ID', () => {
    expect(() =>
      startTelemetry(
        {
          LIFEBOAT_TELEMETRY: 'on',
          APPLICATIONINSIGHTS_CONNECTION_STRING: connectionString,
          APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=x',
        },
        { load: fakeOtel().load },
      ),
    ).toThrow(/must read "ClientId=<client id>;Authorization=AAD"/);
  });
});
