import { ManagedIdentityCredential, type TokenCredential } from '@azure/identity';
import type { Settings } from './config';
import { ConfigError } from './errors';

// OpenTelemetry export to Application Insights: traces (spans around HTTP, queue and orchestration
// work, plus the Azure SDK and HTTP instrumentation the distro adds) and three gauges — apply lag
// and backlog per disk, RPO per machine. Off unless LIFEBOAT_TELEMETRY asks for it (the Bicep sets
// it on in Azure; locally it stays off). The exporter packages are loaded only when asked, with a
// synchronous require so they can patch modules before the app loads them; when they are not
// installed the app runs on without telemetry and says so once.

/** The setting that switches telemetry on (`on`) or off (`off`, the default). */
export const TELEMETRY_SETTING = 'LIFEBOAT_TELEMETRY';

export const AZURE_MONITOR_PACKAGE = '@azure/monitor-opentelemetry';
export const OTEL_API_PACKAGE = '@opentelemetry/api';
export const FUNCTIONS_INSTRUMENTATION_PACKAGE = '@azure/functions-opentelemetry-instrumentation';

export type TelemetryAttributes = Record<string, string | number | boolean>;

export interface Telemetry {
  readonly enabled: boolean;
  /** Why telemetry is on or off, for the start-up log and the health report. */
  readonly reason: string;
  /** Runs `work` inside a span; a failure is recorded on the span and rethrown. */
  span<T>(name: string, attributes: TelemetryAttributes, work: () => Promise<T>): Promise<T>;
  /** Seconds between a segment's last write on the site and its application to the seed disk. */
  recordApplyLag(machine: string, disk: string, seconds: number): void;
  /** Change logs waiting to be applied for a disk. */
  recordBacklog(machine: string, disk: string, segments: number): void;
  /** Current RPO of a machine in seconds (now − source time of its latest recovery point). */
  recordRpo(machine: string, seconds: number): void;
  /** Flushes and stops the exporters. */
  shutdown(): Promise<void>;
}

/** Loads a package by name; tests pass their own. */
export type PackageLoader = (name: string) => unknown;

export interface TelemetryOptions {
  load?: PackageLoader;
  warn?: (message: string) => void;
}

// The few shapes of @opentelemetry/api and @azure/monitor-opentelemetry used here. They are
// declared locally because the packages are optional (not in package.json yet).
interface Span {
  recordException(error: Error): void;
  setStatus(status: { code: number; message?: string }): void;
  end(): void;
}
interface Tracer {
  startActiveSpan<T>(name: string, options: { attributes: TelemetryAttributes }, fn: (span: Span) => T): T;
}
interface ObservableResult {
  observe(value: number, attributes?: TelemetryAttributes): void;
}
interface ObservableGauge {
  addCallback(callback: (result: ObservableResult) => void): void;
}
interface Meter {
  createObservableGauge(name: string, options: { description: string; unit: string }): ObservableGauge;
}
interface OtelApi {
  trace: { getTracer(name: string, version?: string): Tracer; getTracerProvider(): unknown };
  metrics: { getMeter(name: string, version?: string): Meter };
}
interface AzureMonitor {
  useAzureMonitor(options: {
    azureMonitorExporterOptions: { connectionString: string; credential?: TokenCredential };
    enableLiveMetrics?: boolean;
  }): void;
  shutdownAzureMonitor?(): Promise<void>;
}

const SPAN_STATUS_ERROR = 2;

function isMissingModule(err: unknown, name: string): boolean {
  const e = err as NodeJS.ErrnoException;
  return e?.code === 'MODULE_NOT_FOUND' && typeof e.message === 'string' && e.message.includes(`'${name}'`);
}

function defaultLoad(name: string): unknown {
  // A variable name keeps TypeScript from resolving the optional packages at build time.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  return require(name);
}

class DisabledTelemetry implements Telemetry {
  readonly enabled = false;
  constructor(readonly reason: string) {}
  span<T>(_name: string, _attributes: TelemetryAttributes, work: () => Promise<T>): Promise<T> {
    return work();
  }
  recordApplyLag(): void {}
  recordBacklog(): void {}
  recordRpo(): void {}
  async shutdown(): Promise<void> {}
}

class ExportingTelemetry implements Telemetry {
  readonly enabled = true;
  private readonly tracer: Tracer;
  private readonly lag = new Map<string, { value: number; attributes: TelemetryAttributes }>();
  private readonly backlog = new Map<string, { value: number; attributes: TelemetryAttributes }>();
  private readonly rpo = new Map<string, { value: number; attributes: TelemetryAttributes }>();

  constructor(
    readonly reason: string,
    api: OtelApi,
    private readonly monitor: AzureMonitor,
  ) {
    this.tracer = api.trace.getTracer('lifeboat');
    const meter = api.metrics.getMeter('lifeboat');
    const gauge = (
      name: string,
      description: string,
      unit: string,
      values: Map<string, { value: number; attributes: TelemetryAttributes }>,
    ) =>
      meter.createObservableGauge(name, { description, unit }).addCallback((result) => {
        for (const { value, attributes } of values.values()) result.observe(value, attributes);
      });
    gauge(
      'lifeboat.apply.lag',
      'Seconds from a segment’s last write on the site to its application',
      's',
      this.lag,
    );
    gauge('lifeboat.apply.backlog', 'Change logs waiting to be applied', '{segment}', this.backlog);
    gauge('lifeboat.rpo', 'Current recovery point objective of a machine', 's', this.rpo);
  }

  span<T>(name: string, attributes: TelemetryAttributes, work: () => Promise<T>): Promise<T> {
    return this.tracer.startActiveSpan(name, { attributes }, async (span) => {
      try {
        return await work();
      } catch (err) {
        const error = err instanceof Error ? err : new Error(String(err));
        span.recordException(error);
        span.setStatus({ code: SPAN_STATUS_ERROR, message: error.message });
        throw err;
      } finally {
        span.end();
      }
    });
  }

  recordApplyLag(machine: string, disk: string, seconds: number): void {
    this.lag.set(`${machine}/${disk}`, { value: seconds, attributes: { machine, disk } });
  }

  recordBacklog(machine: string, disk: string, segments: number): void {
    this.backlog.set(`${machine}/${disk}`, { value: segments, attributes: { machine, disk } });
  }

  recordRpo(machine: string, seconds: number): void {
    this.rpo.set(machine, { value: seconds, attributes: { machine } });
  }

  async shutdown(): Promise<void> {
    await this.monitor.shutdownAzureMonitor?.();
  }
}

/** `ClientId=<id>;Authorization=AAD` (the Functions host's own format) → a managed identity credential. */
export function telemetryCredential(settings: Settings): TokenCredential | undefined {
  const auth = settings.APPLICATIONINSIGHTS_AUTHENTICATION_STRING;
  if (!auth) return undefined;
  const fields = new Map(
    auth
      .split(';')
      .map((part) => part.split('=').map((s) => s.trim()))
      .filter((kv) => kv.length === 2 && kv[0] !== '')
      .map(([k, v]) => [k.toLowerCase(), v] as const),
  );
  if (fields.get('authorization')?.toLowerCase() !== 'aad') {
    throw new ConfigError(
      'APPLICATIONINSIGHTS_AUTHENTICATION_STRING must read "ClientId=<client id>;Authorization=AAD".',
      'APPLICATIONINSIGHTS_AUTHENTICATION_STRING',
    );
  }
  const clientId = fields.get('clientid');
  return clientId ? new ManagedIdentityCredential({ clientId }) : new ManagedIdentityCredential();
}

/** Whether the setting asks for telemetry; a value that is neither on nor off is a configuration error. */
export function telemetryRequested(settings: Settings): boolean {
  const value = (settings.LIFEBOAT_TELEMETRY ?? '').trim().toLowerCase();
  if (value === '' || value === 'off' || value === 'false' || value === '0') return false;
  if (value === 'on' || value === 'true' || value === '1') return true;
  throw new ConfigError(
    `${TELEMETRY_SETTING} is ${JSON.stringify(settings.LIFEBOAT_TELEMETRY)}; set it to "on" or "off".`,
    TELEMETRY_SETTING,
  );
}

let current: Telemetry = new DisabledTelemetry(`${TELEMETRY_SETTING} is not set`);

/** The telemetry started by `startTelemetry` (a no-op until then). */
export function getTelemetry(): Telemetry {
  return current;
}

/**
 * Starts the export when LIFEBOAT_TELEMETRY=on: call it first thing in the entry point, before
 * other modules load, so the distro can instrument them. Never throws for a missing package or
 * connection string (the app keeps running and the reason is reported); throws ConfigError for a
 * malformed setting.
 */
export function startTelemetry(settings: Settings = process.env, options: TelemetryOptions = {}): Telemetry {
  const warn =
    options.warn ?? ((message: string) => process.emitWarning(message, { code: 'LIFEBOAT_TELEMETRY' }));
  const load = options.load ?? defaultLoad;
  if (!telemetryRequested(settings)) {
    current = new DisabledTelemetry(`${TELEMETRY_SETTING} is off`);
    return current;
  }
  const connectionString = settings.APPLICATIONINSIGHTS_CONNECTION_STRING;
  if (!connectionString) {
    current = new DisabledTelemetry(
      `${TELEMETRY_SETTING} is on but APPLICATIONINSIGHTS_CONNECTION_STRING is not set, so there is nowhere to send telemetry`,
    );
    warn(`Telemetry is off: ${current.reason}.`);
    return current;
  }
  const credential = telemetryCredential(settings);
  let monitor: AzureMonitor;
  let api: OtelApi;
  try {
    monitor = load(AZURE_MONITOR_PACKAGE) as AzureMonitor;
    api = load(OTEL_API_PACKAGE) as OtelApi;
  } catch (err) {
    const missing = [AZURE_MONITOR_PACKAGE, OTEL_API_PACKAGE].find((name) => isMissingModule(err, name));
    if (!missing) throw err;
    current = new DisabledTelemetry(
      `${TELEMETRY_SETTING} is on but the package ${missing} is not installed; add ${AZURE_MONITOR_PACKAGE} and ${OTEL_API_PACKAGE} to package.json dependencies and redeploy`,
    );
    warn(`Telemetry is off: ${current.reason}.`);
    return current;
  }
  monitor.useAzureMonitor({
    azureMonitorExporterOptions: { connectionString, credential },
    enableLiveMetrics: false,
  });
  const reasons = [`exporting to Application Insights${credential ? ' with Entra ID' : ''}`];
  try {
    // Spans for every invocation (HTTP, Service Bus, timers, orchestrations), when installed.
    const { AzureFunctionsInstrumentation } = load(FUNCTIONS_INSTRUMENTATION_PACKAGE) as {
      AzureFunctionsInstrumentation: new () => unknown;
    };
    const { registerInstrumentations } = load('@opentelemetry/instrumentation') as {
      registerInstrumentations(options: { tracerProvider: unknown; instrumentations: unknown[] }): void;
    };
    registerInstrumentations({
      tracerProvider: api.trace.getTracerProvider(),
      instrumentations: [new AzureFunctionsInstrumentation()],
    });
    reasons.push('with per-invocation spans');
  } catch (err) {
    if (
      !isMissingModule(err, FUNCTIONS_INSTRUMENTATION_PACKAGE) &&
      !isMissingModule(err, '@opentelemetry/instrumentation')
    )
      throw err;
    reasons.push(
      `without per-invocation spans (${FUNCTIONS_INSTRUMENTATION_PACKAGE} is not installed; the host still records each invocation)`,
    );
  }
  current = new ExportingTelemetry(reasons.join(', '), api, monitor);
  return current;
}
