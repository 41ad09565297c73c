// The segment codec: the one binary format for change data, agent → proxy → cache → apply.
// docs/segment-format.md describes the bytes.
export * from './format';
export { encodeSegment, SegmentBuilder, type SegmentBuilderOptions, type SegmentIdentity } from './encode';
export {
  decodeSegment,
  decodeSegmentStream,
  SegmentDecoder,
  type SegmentPart,
  type SegmentStreamPart,
  type VerifiedSegment,
} from './decode';
export { coalesceRecords, type CoalesceOptions } from './coalesce';
