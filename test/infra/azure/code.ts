// What the code reads from its settings, found by reading the sources of functions/ and shared/
// (what the Function App runs), and what the built entry point registers with the Functions host.
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { SETTING } from '../../../shared/config';
import { installFunctionsCore } from '../../../infra/local/functions-core';

export const ROOT = path.resolve(__dirname, '../../..');

/** Folders whose code runs inside the Function App. */
export const APP_SOURCE_DIRS = ['functions', 'shared'];

export interface CodeSettings {
  /** Setting name → where it is read ("shared/logger.ts: process.env.LIFEBOAT_LOG_LEVEL"). */
  reads: Map<string, string[]>;
  /** Suffixes of identity-based settings the code understands: `NAME__<suffix>`. */
  identitySuffixes: Set<string>;
  /** Setting names the code hands to a storage or Service Bus client as a connection. */
  connections: Map<string, string[]>;
}

export function listTsFiles(dir: string): string[] {
  const abs = path.join(ROOT, dir);
  const out: string[] = [];
  for (const entry of readdirSync(abs)) {
    const rel = path.join(dir, entry);
    if (statSync(path.join(ROOT, rel)).isDirectory()) out.push(...listTsFiles(rel));
    else if (entry.endsWith('.ts') && !entry.endsWith('.d.ts')) out.push(rel);
  }
  return out.sort();
}

/** Drops block comments and whole-line `//` comments (enough for prose that names settings). */
function stripTsComments(text: string): string {
  return text.replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
}

/**
 * The same text with the contents of string literals blanked out (quotes kept), so that prose in
 * messages ("set it in local.settings.json") is not taken for property access. Template literal
 * substitutions (`${…}`) are kept: they are code.
 */
function blankStrings(text: string): string {
  let out = '';
  let i = 0;
  const template = (): void => {
    out += '`';
    i++;
    while (i < text.length && text[i] !== '`') {
      if (text[i] === '\\') {
        out += '  ';
        i += 2;
      } else if (text[i] === '$' && text[i + 1] === '{') {
        out += '${';
        i += 2;
        let depth = 1;
        while (i < text.length && depth > 0) {
          const c = text[i];
          if (c === "'" || c === '"') quoted(c);
          else if (c === '`') template();
          else {
            if (c === '{') depth++;
            if (c === '}') depth--;
            out += c;
            i++;
          }
        }
      } else {
        out += text[i] === '\n' ? '\n' : ' ';
        i++;
      }
    }
    out += '`';
    i++;
  };
  const quoted = (q: string): void => {
    out += q;
    i++;
    while (i < text.length && text[i] !== q && text[i] !== '\n') {
      out += text[i] === '\\' ? '  ' : ' ';
      i += text[i] === '\\' ? 2 : 1;
    }
    out += q;
    i++;
  };
  while (i < text.length) {
    const c = text[i];
    if (c === "'" || c === '"') quoted(c);
    else if (c === '`') template();
    else {
      out += c;
      i++;
    }
  }
  return out;
}

const SETTING_VALUES: Record<string, string> = SETTING;

/**
 * Setting-name constants declared in the sources: objects named like `SETTING` /
 * `REPLICATION_SETTING` (`{ key: 'NAME' }`) and strings named like `TELEMETRY_SETTING`.
 */
export type SettingConstants = Map<string, string | Record<string, string>>;

export function settingConstants(sources: string[]): SettingConstants {
  const constants: SettingConstants = new Map([['SETTING', SETTING_VALUES]]);
  for (const text of sources) {
    for (const m of text.matchAll(/\bexport\s+const\s+([A-Z0-9_]*SETTINGS?)\s*=\s*\{([^}]*)\}/g)) {
      const values: Record<string, string> = {};
      for (const e of stripTsComments(m[2]).matchAll(/(\w+)\s*:\s*(['"])([^'"]+)\2/g)) values[e[1]] = e[3];
      constants.set(m[1], values);
    }
    for (const m of text.matchAll(/\bexport\s+const\s+([A-Z0-9_]*SETTINGS?)\s*=\s*(['"])([^'"]+)\2/g))
      constants.set(m[1], m[3]);
  }
  return constants;
}

function settingFromExpr(expr: string, where: string, constants: SettingConstants): string | undefined {
  const t = expr.trim();
  const literal = /^(['"`])([A-Za-z_][\w]*)\1$/.exec(t);
  if (literal) return literal[2];
  const member = /^([A-Z0-9_]*SETTINGS?)(?:\.(\w+))?$/.exec(t);
  const constant = member ? constants.get(member[1]) : undefined;
  if (member && constant !== undefined) {
    if (typeof constant === 'string') return member[2] ? undefined : constant;
    if (!member[2]) return undefined; // the whole table (Object.values(SETTING), its declaration)
    const name = constant[member[2]];
    if (!name) throw new Error(`${where}: ${t} does not name a setting`);
    return name;
  }
  return undefined; // a variable: a generic helper (storage.ts, messaging.ts), resolved by its callers
}

function add(map: Map<string, string[]>, key: string, where: string): void {
  const list = map.get(key) ?? [];
  if (!list.includes(where)) list.push(where);
  map.set(key, list);
}

/** Reads the given sources (paths relative to the repository root; contents may be supplied). */
export function scanSettings(files: string[], contents: Record<string, string> = {}): CodeSettings {
  const result: CodeSettings = { reads: new Map(), identitySuffixes: new Set(), connections: new Map() };
  // The declared names are the contract (DESIGN §2), read or not yet.
  for (const name of Object.values(SETTING_VALUES)) add(result.reads, name, 'shared/config.ts: SETTING');

  const texts = new Map(
    files.map((file) => [
      file,
      stripTsComments(contents[file] ?? readFileSync(path.join(ROOT, file), 'utf8')),
    ]),
  );
  const constants = settingConstants([...texts.values()]);
  for (const [file, text] of texts) {
    const at = (how: string) => `${file}: ${how}`;
    const code = blankStrings(text);
    // [pattern, the setting it names, whether it looks at string literals (else at code only)]
    const patterns: Array<[RegExp, (m: RegExpExecArray) => string | undefined, boolean]> = [
      [/\bprocess\.env\.([A-Za-z_]\w*)/g, (m) => m[1], false],
      [/\bprocess\.env\[\s*(['"])([^'"]+)\1\s*\]/g, (m) => m[2], true],
      [/\b(?:settings|env)\.([A-Za-z_]\w*)\b(?!\s*\()/g, (m) => m[1], false],
      [/\b(?:settings|env)\[\s*(['"])([^'"]+)\1\s*\]/g, (m) => m[2], true],
      [/\brequireSetting\(\s*[^,()]+,\s*(['"])([^'"]+)\1/g, (m) => m[2], true],
      [
        /\b[A-Z0-9_]*SETTINGS?\b(?:\.\w+)?/g,
        (m) => (constants.has(m[0].split('.')[0]) ? settingFromExpr(m[0], file, constants) : undefined),
        false,
      ],
      // Binding expressions (`queueName: '%ChangelogQueueName%'`) and binding connections.
      [/(['"`])%([A-Za-z_]\w*)%\1/g, (m) => m[2], true],
      [/\bconnection\s*:\s*(['"])([A-Za-z_]\w*)\1/g, (m) => m[2], true],
    ];
    for (const [re, name, literals] of patterns) {
      const source = literals ? text : code;
      for (let m = re.exec(source); m; m = re.exec(source)) {
        const setting = name(m);
        if (setting) add(result.reads, setting, at(m[0]));
      }
    }
    for (const m of text.matchAll(/`\$\{[^}]+\}__(\w+)`/g)) result.identitySuffixes.add(m[1]);
    // A call given an inline settings object (`{ connection: value }`) is not about app settings.
    const connectionCalls: RegExp[] = [
      /\bnew\s+StorageClients\(\s*([^,)]+)(?:,\s*(\{))?/g,
      /\bresolveStorageConnection\(\s*(?:(\{)[^)]*?|[^,()]+),\s*([^,)]+)/g,
      /\bcreateMessageSender\(\s*(?:(\{)[^)]*?|[^,()]+),\s*([^,)]+)/g,
      /\bcredentialFor\(\s*(?:(\{)[^)]*?|[^,()]+),\s*([^,)]+)/g,
      /\bconnection\s*:\s*([^,}\n]+)/g,
    ];
    for (const re of connectionCalls) {
      for (const m of text.matchAll(re)) {
        const groups = m.slice(1);
        if (groups.includes('{')) continue;
        const expr = groups.filter((g) => g !== undefined).pop()!;
        const setting = settingFromExpr(re.source.includes('StorageClients') ? m[1] : expr, file, constants);
        if (setting) add(result.connections, setting, at(m[0].trim()));
      }
    }
  }
  return result;
}

export function scanAppSources(): CodeSettings {
  return scanSettings(APP_SOURCE_DIRS.flatMap(listTsFiles));
}

/** Relative imports of a TypeScript module, as repository paths of .ts files. */
export function relativeImports(file: string): string[] {
  const text = stripTsComments(readFileSync(path.join(ROOT, file), 'utf8'));
  const specs = [
    ...text.matchAll(/^\s*import\s+(?:type\s+)?(?:[^'"]*?\sfrom\s+)?['"]([^'"]+)['"]/gm),
    ...text.matchAll(/^\s*export\s+(?:type\s+)?[^'";]*?\sfrom\s+['"]([^'"]+)['"]/gm),
    ...text.matchAll(/\brequire\(\s*['"]([^'"]+)['"]\s*\)/g),
    ...text.matchAll(/\bimport\(\s*['"]([^'"]+)['"]\s*\)/g),
  ]
    .filter((m) => !/^\s*import\s+type\b/.test(m[0]) && !/^\s*export\s+type\b/.test(m[0]))
    .map((m) => m[1])
    .filter((s) => s.startsWith('.'));
  return specs.map((spec) => {
    const base = path.join(path.dirname(file), spec);
    for (const candidate of [`${base}.ts`, path.join(base, 'index.ts')]) {
      try {
        if (statSync(path.join(ROOT, candidate)).isFile()) return candidate;
      } catch {
        /* try the next form */
      }
    }
    throw new Error(`${file} imports ${spec}, which is not a .ts module`);
  });
}

/** Every module the entry point loads, following relative imports. */
export function importClosure(entry: string): string[] {
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    relativeImports(file).forEach(visit);
  };
  visit(entry);
  return [...seen].sort();
}

export interface RegisteredBinding {
  function: string;
  type: string;
  direction?: string;
  properties: Record<string, unknown>;
}

/**
 * Loads the built entry point the Azure host loads (package.json `main`), with the local host's
 * `@azure/functions-core`, and returns every binding of every function it registers.
 */
export function registeredBindings(): RegisteredBinding[] {
  const registry = installFunctionsCore();
  const main = (JSON.parse(readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { main: string }).main;
  createRequire(path.join(ROOT, 'package.json'))(path.join(ROOT, main));
  const bindings: RegisteredBinding[] = [];
  for (const fn of registry.functions.values()) {
    for (const [name, binding] of Object.entries(fn.metadata.bindings)) {
      const { type, direction, ...properties } = binding as { type?: string; direction?: unknown } & Record<
        string,
        unknown
      >;
      bindings.push({
        function: fn.name,
        type: String(type ?? name),
        direction: direction === undefined ? undefined : String(direction),
        properties,
      });
    }
  }
  return bindings;
}

/** The site proxy's code (what the proxy identity's grants must cover). */
export const PROXY_SOURCE_DIR = 'agent/proxy';

export interface StorageOperations {
  /** Storage permissions relative to `Microsoft.Storage/storageAccounts/blobServices/`. */
  blob: Set<string>;
  table: Set<'read' | 'write'>;
  /**
   * The agent-command rows (table `commands`), read and answered through the shared functions of
   * shared/failover/commands.ts rather than SDK calls in the file itself.
   */
  commands: Set<'read' | 'write'>;
  /** The replication groups (table `groups`), read through shared/groups' readGroupsTable. */
  groups: Set<'read'>;
  /** Events (table `events`) the proxy adds through agent/group/site.ts's recordAbort. */
  events: Set<'add'>;
  /** Where each permission comes from. */
  at: Map<string, string[]>;
}

/** Which blob and table permissions the calls in these files need (SDK method → permission). */
export function storageOperations(files: string[], contents: Record<string, string> = {}): StorageOperations {
  const ops: StorageOperations = {
    blob: new Set(),
    table: new Set(),
    commands: new Set(),
    groups: new Set(),
    events: new Set(),
    at: new Map(),
  };
  const rules: Array<[RegExp, 'blob' | 'table', string]> = [
    [/\.createIfNotExists\(/g, 'blob', 'containers/write'],
    [
      /\.(?:download|downloadToBuffer|downloadToFile|getProperties|exists|listBlobsFlat|listBlobsByHierarchy)\(/g,
      'blob',
      'containers/blobs/read',
    ],
    [
      /\.(?:upload|uploadData|uploadFile|uploadStream|stageBlock|commitBlockList|setMetadata|setHTTPHeaders|syncCopyFromURL|beginCopyFromURL)\(/g,
      'blob',
      'containers/blobs/write',
    ],
    [/\.appendBlock\(/g, 'blob', 'containers/blobs/add/action'],
    [/\.deleteIfExists\(/g, 'blob', 'containers/blobs/delete'],
    [/\.(?:getEntity|listEntities)\b/g, 'table', 'read'],
    [
      /\.(?:createEntity|upsertEntity|updateEntity|deleteEntity|submitTransaction|createTable)\b/g,
      'table',
      'write',
    ],
  ];
  for (const file of files) {
    const text = blankStrings(stripTsComments(contents[file] ?? readFileSync(path.join(ROOT, file), 'utf8')));
    for (const [re, service, permission] of rules) {
      for (const m of text.matchAll(re)) {
        if (service === 'blob') ops.blob.add(permission);
        else ops.table.add(permission as 'read' | 'write');
        add(ops.at, `${service} ${permission}`, `${file}: ${m[0]}`);
      }
    }
    for (const [re, permission] of [
      [/\b(?:pendingCommands|readCommand)\(/g, 'read'],
      [/\backnowledgeCommand\(/g, 'write'],
    ] as const) {
      for (const m of text.matchAll(re)) {
        ops.commands.add(permission);
        add(ops.at, `commands ${permission}`, `${file}: ${m[0]}`);
      }
    }
    for (const m of text.matchAll(/\breadGroupsTable\(/g)) {
      ops.groups.add('read');
      add(ops.at, 'groups read', `${file}: ${m[0]}`);
    }
    for (const m of text.matchAll(/\brecordAbort\(/g)) {
      ops.events.add('add');
      add(ops.at, 'events add', `${file}: ${m[0]}`);
    }
  }
  return ops;
}

export function proxyStorageOperations(): StorageOperations {
  // The proxy also runs the site's group coordinators (agent/group/site.ts).
  return storageOperations([...listTsFiles(PROXY_SOURCE_DIR), 'agent/group/site.ts']);
}
