// A small reader for the subset of Bicep that infra/azure uses: resource, module, var and param
// declarations, objects of `key: value` entries, single-quoted strings with `${}` interpolation.
// It does not evaluate anything; it hands back the source text of each declaration and property
// so the checks can compare expressions. Anything it cannot read makes it throw, never guess.

export interface BicepResource {
  symbol: string;
  type: string;
  apiVersion: string;
  existing: boolean;
  /** The `if (…)` condition, without the parentheses, when the resource is conditional. */
  condition?: string;
  /** The `for … in …` header when the resource is a loop. */
  loop?: string;
  /** Top-level properties of the body: name, scope, parent, properties, dependsOn… */
  props: Record<string, string>;
}

export interface BicepModule {
  symbol: string;
  path: string;
  params: Record<string, string>;
}

export interface BicepParam {
  name: string;
  type: string;
  decorators: string[];
  defaultValue?: string;
}

export interface BicepFile {
  resources: BicepResource[];
  modules: BicepModule[];
  vars: Record<string, string>;
  params: Record<string, BicepParam>;
  outputs: Record<string, string>;
}

/** Index just after the closing quote of the string that opens at `i`. */
function skipString(text: string, i: number): number {
  if (text.startsWith("'''", i)) {
    const end = text.indexOf("'''", i + 3);
    if (end < 0) throw new Error(`Unterminated multi-line string at ${i}`);
    return end + 3;
  }
  for (let j = i + 1; j < text.length; j++) {
    const c = text[j];
    if (c === '\\') j++;
    else if (c === "'") return j + 1;
    else if (c === '$' && text[j + 1] === '{') j = skipBalanced(text, j + 1) - 1;
  }
  throw new Error(`Unterminated string at ${i}: ${text.slice(i, i + 40)}`);
}

const CLOSE: Record<string, string> = { '{': '}', '[': ']', '(': ')' };

/** `text[i]` is an opening bracket; returns the index just after its matching close. */
export function skipBalanced(text: string, i: number): number {
  const stack = [CLOSE[text[i]]];
  if (!stack[0]) throw new Error(`Expected a bracket at ${i}, found ${JSON.stringify(text[i])}`);
  for (let j = i + 1; j < text.length; j++) {
    const c = text[j];
    if (c === "'") {
      j = skipString(text, j) - 1;
    } else if (CLOSE[c]) {
      stack.push(CLOSE[c]);
    } else if (c === '}' || c === ']' || c === ')') {
      if (stack.pop() !== c) throw new Error(`Unbalanced ${c} at ${j}`);
      if (stack.length === 0) return j + 1;
    }
  }
  throw new Error(`Unclosed bracket opened at ${i}`);
}

/** Removes `//` and block comments, leaving strings (which may hold `https://`) alone. */
export function stripComments(text: string): string {
  let out = '';
  for (let i = 0; i < text.length;) {
    if (text[i] === "'") {
      const end = skipString(text, i);
      out += text.slice(i, end);
      i = end;
    } else if (text.startsWith('//', i)) {
      while (i < text.length && text[i] !== '\n') i++;
    } else if (text.startsWith('/*', i)) {
      const end = text.indexOf('*/', i + 2);
      i = end < 0 ? text.length : end + 2;
    } else {
      out += text[i++];
    }
  }
  return out;
}

/** The entries of an object literal `{ … }` (given with its braces): key → value source text. */
export function objectEntries(source: string): Record<string, string> {
  const text = source.trim();
  if (!text.startsWith('{') || skipBalanced(text, 0) !== text.length) {
    throw new Error(`Not an object literal: ${text.slice(0, 60)}`);
  }
  const entries: Record<string, string> = {};
  const body = text.slice(1, -1);
  let start = 0;
  const flush = (end: number) => {
    const entry = body.slice(start, end).trim();
    start = end + 1;
    if (entry === '') return;
    const nested = /^resource\s+(\w+)\s/.exec(entry);
    if (nested) {
      entries[`resource ${nested[1]}`] = entry;
      return;
    }
    const m = /^('(?:[^'\\]|\\.)*'|[A-Za-z_][\w-]*)\s*:\s*([\s\S]+)$/.exec(entry);
    if (!m) throw new Error(`Cannot read object entry: ${entry.slice(0, 80)}`);
    const key = m[1].startsWith("'") ? m[1].slice(1, -1) : m[1];
    if (key in entries) throw new Error(`Duplicate key ${key}`);
    entries[key] = m[2].trim();
  };
  for (let i = 0; i < body.length; i++) {
    const c = body[i];
    if (c === "'") i = skipString(body, i) - 1;
    else if (CLOSE[c]) i = skipBalanced(body, i) - 1;
    else if (c === '\n' || c === ',') flush(i);
  }
  flush(body.length);
  return entries;
}

/** Reads the value expression that starts at `i`: up to the end of the line, brackets balanced. */
function readValue(text: string, i: number): { value: string; end: number } {
  let j = i;
  while (j < text.length && text[j] !== '\n') {
    const c = text[j];
    if (c === "'") j = skipString(text, j);
    else if (CLOSE[c]) j = skipBalanced(text, j);
    else j++;
  }
  return { value: text.slice(i, j).trim(), end: j };
}

export function parseBicep(source: string): BicepFile {
  const text = stripComments(source);
  const file: BicepFile = { resources: [], modules: [], vars: {}, params: {}, outputs: {} };
  let decorators: string[] = [];
  for (let i = 0; i < text.length;) {
    // Each declaration starts a line; skip whitespace.
    while (i < text.length && /\s/.test(text[i])) i++;
    if (i >= text.length) break;
    const rest = text.slice(i);
    let m: RegExpExecArray | null;
    if (rest.startsWith('@')) {
      const name = /^@[\w.]+/.exec(rest)![0];
      let end = i + name.length;
      if (text[end] === '(') end = skipBalanced(text, end);
      decorators.push(text.slice(i, end));
      i = end;
      continue;
    }
    if ((m = /^targetScope\s*=\s*/.exec(rest))) {
      i = readValue(text, i + m[0].length).end;
    } else if ((m = /^param\s+(\w+)\s+(\w+)[ \t]*(=[ \t]*)?/.exec(rest))) {
      const param: BicepParam = { name: m[1], type: m[2], decorators };
      i += m[0].length;
      if (m[3]) {
        const { value, end } = readValue(text, i);
        param.defaultValue = value;
        i = end;
      }
      file.params[param.name] = param;
    } else if ((m = /^var\s+(\w+)\s*=\s*/.exec(rest))) {
      const { value, end } = readValue(text, i + m[0].length);
      file.vars[m[1]] = value;
      i = end;
    } else if ((m = /^output\s+(\w+)\s+\w+\s*=\s*/.exec(rest))) {
      const { value, end } = readValue(text, i + m[0].length);
      file.outputs[m[1]] = value;
      i = end;
    } else if ((m = /^module\s+(\w+)\s+'([^']+)'\s*=\s*/.exec(rest))) {
      const start = i + m[0].length;
      if (text[start] !== '{') throw new Error(`Module ${m[1]}: only plain modules are supported`);
      const end = skipBalanced(text, start);
      const props = objectEntries(text.slice(start, end));
      file.modules.push({
        symbol: m[1],
        path: m[2],
        params: props.params ? objectEntries(props.params) : {},
      });
      i = end;
    } else if ((m = /^resource\s+(\w+)\s+'([^'@]+)@([^']+)'\s+(existing\s+)?=\s*/.exec(rest))) {
      const resource: Omit<BicepResource, 'props'> = {
        symbol: m[1],
        type: m[2],
        apiVersion: m[3],
        existing: Boolean(m[4]),
      };
      let j = i + m[0].length;
      let loopEnd: number | undefined;
      if (text.startsWith('if', j)) {
        const open = text.indexOf('(', j);
        const close = skipBalanced(text, open);
        resource.condition = text.slice(open + 1, close - 1).trim();
        j = close;
        while (/\s/.test(text[j])) j++;
      } else if (text[j] === '[') {
        loopEnd = skipBalanced(text, j);
        const header = /^\[\s*(for\s[^:]+):\s*/.exec(text.slice(j));
        if (!header) throw new Error(`Resource ${resource.symbol}: cannot read its loop`);
        resource.loop = header[1].trim();
        j += header[0].length;
      }
      if (text[j] !== '{')
        throw new Error(`Resource ${resource.symbol}: expected "{" at ${text.slice(j, j + 30)}`);
      const end = skipBalanced(text, j);
      const props = objectEntries(text.slice(j, end));
      file.resources.push({ ...resource, props });
      // Nested child resources (`resource x 'config' = {…}`) stay inside their parent's text.
      i = loopEnd ?? end;
    } else if ((m = /^(type|func|import|metadata|extension)\b/.exec(rest))) {
      throw new Error(`Unsupported Bicep declaration "${m[1]}" — extend test/infra/azure/bicep.ts`);
    } else {
      throw new Error(`Cannot read Bicep at: ${rest.slice(0, 60)}`);
    }
    if (!rest.startsWith('@')) decorators = [];
  }
  return file;
}

/** The text of a single-quoted Bicep string literal, or undefined if `expr` is not one. */
export function stringLiteral(expr: string): string | undefined {
  const t = expr.trim();
  if (!t.startsWith("'") || skipString(t, 0) !== t.length || t.includes('${')) return undefined;
  return t.slice(1, -1).replace(/\\'/g, "'").replace(/\\\\/g, '\\');
}

/** Resolves an expression that is a literal, a `var`, or a field of a var object (`names.x`). */
export function resolveExpr(file: BicepFile, expr: string): string {
  const literal = stringLiteral(expr);
  if (literal !== undefined) return literal;
  const t = expr.trim();
  const dotted = /^(\w+)\.(\w+)$/.exec(t);
  if (dotted && file.vars[dotted[1]]?.startsWith('{')) {
    const inner = objectEntries(file.vars[dotted[1]])[dotted[2]];
    if (inner !== undefined) return resolveExpr(file, inner);
  }
  if (/^\w+$/.test(t) && file.vars[t] !== undefined) return resolveExpr(file, file.vars[t]);
  // Not a constant (it depends on a parameter, a token, an output): compare it as written.
  return t;
}
