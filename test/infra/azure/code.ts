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

function settingFromExpr(expr: string, where: string): string | undefined {
  const t = expr.trim();
  const literal = /^(['"`])([A-Za-z_][\w]*)\1$/.exec(t);
  if (literal) return literal[2];
  const constant = /^SETTING\.(\w+)$/.exec(t);
  if (constant) {
    const name = SETTING_VALUES[constant[1]];
    if (!name) throw new Error(`${where}: SETTING.${constant[1]} is not in shared/config.ts`);
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

  for (const file of files) {
    const text = stripTsComments(contents[file] ?? readFileSync(path.join(ROOT, file), 'utf8'));
    const at = (how: string) => `${file}: ${how}`;
    const code = blankStrings(text);
    // [pattern, the setting it names, whether it looks at string literals (else at code only)]
    const patterns: Array<[RegExp, (m: RegExpExecArray) => string | undefined, boolean]> = [
      [/\bprocess\.env\.([A-Za-z_]\w*)/g, (m) => m[1], false],
      [/\bprocess\.env\[\s*(['"])([^'"]+)\1\s*\]/g, (m) => m[2], true],
      [/\b(?:settings|env)\.([A-Za-z_]\w*)\b(?!\s*\()/g, (m) => m[1], false],
      [/\b(?:settings|env)\[\s*(['"])([^'"]+)\1\s*\]/g, (m) => m[2], true],
      [/\brequireSetting\(\s*[^,()]+,\s*(['"])([^'"]+)\1/g, (m) => m[2], true],
      [/\bSETTING\.(\w+)/g, (m) => settingFromExpr(m[0], file), false],
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
        const setting = settingFromExpr(re.source.includes('StorageClients') ? m[1] : expr, file);
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
