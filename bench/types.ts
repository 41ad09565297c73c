/** One measured figure beside the limit it is compared with, measured in the same run. */
export interface BenchResult {
  name: string;
  value: number;
  unit: string;
  /** What the reference is (raw Azurite page writes, nbdkit, rsync, memcpy…). */
  reference: string;
  referenceValue: number;
  /** value / referenceValue, oriented so that 1.0 means "as fast as the reference". */
  ratio: number;
}

export interface Bench {
  name: string;
  run(options: { quick: boolean }): Promise<BenchResult[]>;
}
