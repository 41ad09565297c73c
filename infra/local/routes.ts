/**
 * Azure Functions route templates (`machines/{machine}/recovery-points`, `{name?}`, `{*rest}`,
 * `{id:int}`) compiled to matchers, so the local host routes exactly as the Functions host does.
 */
export interface CompiledRoute {
  template: string;
  /** Literal segments first, then fewer parameters: more specific routes win, as in ASP.NET. */
  specificity: number[];
  match(path: string): Record<string, string> | undefined;
}

const PARAM = /^\{(\*)?([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?(\?)?\}$/;

const CONSTRAINTS: Record<string, RegExp> = {
  int: /^-?\d+$/,
  long: /^-?\d+$/,
  bool: /^(true|false)$/i,
  guid: /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i,
  alpha: /^[A-Za-z]+$/,
};

export function compileRoute(template: string): CompiledRoute {
  const parts = template
    .replace(/^\/+|\/+$/g, '')
    .split('/')
    .filter(Boolean);
  let literals = 0;
  const pieces = parts.map((part) => {
    const m = PARAM.exec(part);
    if (!m) {
      literals++;
      return { literal: part.toLowerCase() };
    }
    const [, star, name, constraint, optional] = m;
    if (constraint && !CONSTRAINTS[constraint]) {
      throw new Error(`Route ${template}: unsupported constraint :${constraint}`);
    }
    return { name, catchAll: Boolean(star), optional: Boolean(optional), constraint };
  });
  return {
    template,
    specificity: [literals, -pieces.length],
    match(path: string) {
      const segments = path
        .replace(/^\/+|\/+$/g, '')
        .split('/')
        .filter(Boolean);
      const params: Record<string, string> = {};
      let i = 0;
      for (const piece of pieces) {
        if ('literal' in piece) {
          if ((segments[i] ?? '').toLowerCase() !== piece.literal) return undefined;
          i++;
          continue;
        }
        if (piece.catchAll) {
          const rest = segments.slice(i).map(decodeURIComponent).join('/');
          if (rest) params[piece.name!] = rest;
          i = segments.length;
          continue;
        }
        const segment = segments[i];
        if (segment === undefined) {
          if (piece.optional) continue;
          return undefined;
        }
        const value = decodeURIComponent(segment);
        if (piece.constraint && !CONSTRAINTS[piece.constraint].test(value)) return undefined;
        params[piece.name!] = value;
        i++;
      }
      return i === segments.length ? params : undefined;
    },
  };
}

/** Orders routes so that the most specific template is tried first. */
export function bySpecificity(a: CompiledRoute, b: CompiledRoute): number {
  return b.specificity[0] - a.specificity[0] || b.specificity[1] - a.specificity[1];
}
