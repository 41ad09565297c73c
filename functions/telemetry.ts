// Imported first by the entry point, so OpenTelemetry (when LIFEBOAT_TELEMETRY=on) instruments
// everything loaded after it.
import { startTelemetry } from '../shared/telemetry';

startTelemetry(process.env);
