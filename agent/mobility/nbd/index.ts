export { NbdServer, type NbdServerOptions, type ListenOptions } from './server';
export {
  NbdExport,
  type NbdExportOptions,
  type OpenFileExportOptions,
  type ExportFault,
  type ExportStats,
} from './export';
export { FileBacking, type BlockBacking, type FileBackingOptions } from './backing';
export {
  AppendFileJournal,
  FileAppender,
  DISCARD_JOURNAL,
  readJournalFile,
  type AppendFileJournalOptions,
  type ChangeKind,
  type WriteChange,
  type WriteJournal,
} from './journal';
export { MIN_BLOCK_SIZE, PREFERRED_BLOCK_SIZE, MAX_PAYLOAD_SIZE } from './protocol';
