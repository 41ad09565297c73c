// The gitignore rules `func azure functionapp publish` applies to .funcignore, enough of them to
// answer "does this path ship?": comments, negation, leading-slash and inner-slash anchoring,
// trailing-slash directories, `*`, `?` and `**`; a file under an excluded folder is excluded.

interface Rule {
  negate: boolean;
  dirOnly: boolean;
  regex: RegExp;
}

function globToRegex(glob: string, anchored: boolean): RegExp {
  let re = '';
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i];
    if (c === '*' && glob[i + 1] === '*') {
      re += '.*';
      i++;
      if (glob[i + 1] === '/') i++;
    } else if (c === '*') re += '[^/]*';
    else if (c === '?') re += '[^/]';
    else re += c.replace(/[.+^${}()|[\]\\]/g, '\\$&');
  }
  return new RegExp(anchored ? `^${re}$` : `(^|/)${re}$`);
}

export function parseFuncignore(text: string): Rule[] {
  const rules: Rule[] = [];
  for (const raw of text.split(/\r?\n/)) {
    let line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const negate = line.startsWith('!');
    if (negate) line = line.slice(1);
    const dirOnly = line.endsWith('/');
    if (dirOnly) line = line.slice(0, -1);
    const anchored = line.includes('/');
    if (line.startsWith('/')) line = line.slice(1);
    rules.push({ negate, dirOnly, regex: globToRegex(line, anchored) });
  }
  return rules;
}

/** True when `relPath` (forward slashes, relative to the app root) is left out of the package. */
export function isIgnored(rules: Rule[], relPath: string): boolean {
  const parts = relPath.split('/');
  for (let n = 1; n <= parts.length; n++) {
    const candidate = parts.slice(0, n).join('/');
    const isDir = n < parts.length;
    let ignored = false;
    for (const rule of rules) {
      if (rule.dirOnly && !isDir) continue;
      if (rule.regex.test(candidate)) ignored = !rule.negate;
    }
    if (ignored) return true;
  }
  return false;
}
