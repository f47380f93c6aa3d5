// The REST client. Requests go to the same origin with the session cookie
// (set by POST /api/v1/session, HttpOnly: this code never sees it); every
// mutating request also carries the session's CSRF token in X-Drover-CSRF,
// which the server demands. Failures become an ApiError carrying the
// server's own message ({"error": {"status", "message", "field"}}).

let csrf = '';
let signedOut = () => {};

/** Remembers the CSRF token of the current session ('' once signed out). */
export function setCsrf(token) {
  csrf = token || '';
}

/** Called when a request answers 401: the session is gone or expired. */
export function onSignedOut(fn) {
  signedOut = fn;
}

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status; // 0: the server could not be reached
    this.field = field || null;
  }
}

/** encodeURIComponent, for one path segment. */
export const enc = encodeURIComponent;

/** '?a=1&b=x' from an object, leaving out empty values. */
export function qs(params) {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== '') p.set(k, String(v));
  }
  const s = p.toString();
  return s ? `?${s}` : '';
}

/**
 * One request. `body` is sent as JSON unless `text` (with its
 * `contentType`) is given. Resolves to {status, data, headers}; data is the
 * parsed JSON, or null for an empty answer (204).
 */
export async function request(method, path, { body, text, contentType } = {}) {
  const headers = { Accept: 'application/json' };
  let payload;
  if (text !== undefined) {
    headers['Content-Type'] = contentType || 'text/plain';
    payload = text;
  } else if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  if (method !== 'GET' && method !== 'HEAD') headers['X-Drover-CSRF'] = csrf;
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, credentials: 'same-origin' });
  } catch (e) {
    throw new ApiError(0, `cannot reach the orchestrator (${e.message})`);
  }
  const raw = await res.text();
  let data = null;
  if (raw) {
    try {
      data = JSON.parse(raw);
    } catch {
      data = raw;
    }
  }
  if (!res.ok) {
    const err = data && data.error;
    const message = (err && err.message) || (typeof data === 'string' && data.trim())
      || `${res.status} ${res.statusText}`;
    // Sign-in itself answers 401 for a bad token: that is not a lost session.
    if (res.status === 401 && !path.startsWith('/api/v1/session')) signedOut();
    throw new ApiError(res.status, message, err && err.field);
  }
  return { status: res.status, data, headers: res.headers };
}

export const get = async (path) => (await request('GET', path)).data;
export const post = async (path, body) => (await request('POST', path, { body })).data;
export const put = async (path, body) => (await request('PUT', path, { body })).data;
export const patch = async (path, body) => (await request('PATCH', path, { body })).data;
export const del = async (path) => (await request('DELETE', path)).data;

/** A GET of a list whose answer says its full size in X-Total-Count. */
export async function getPage(path) {
  const r = await request('GET', path);
  const total = Number(r.headers.get('X-Total-Count'));
  return { items: r.data || [], total: Number.isFinite(total) ? total : (r.data || []).length };
}
