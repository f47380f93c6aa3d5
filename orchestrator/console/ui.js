// Small DOM helpers shared by the pages. Everything is built with
// createElement and textContent: text from the server is never parsed as
// HTML. Handlers are attached with addEventListener (the page's
// Content-Security-Policy forbids inline handlers and style attributes).

/**
 * h('button', {class: 'x', on: {click: fn}, data: {test: 'y'}}, 'text', child…)
 * Props: `class`, `text`, `on` (events), `data` (data-* attributes), any
 * other key is set as an attribute (true: present, false/null: left out).
 * Children may be strings, nodes, arrays, or null/false (skipped).
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** An SVG element, with attributes as h() takes them. */
export function svg(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  applyProps(el, props);
  append(el, children);
  return el;
}

function applyProps(el, props) {
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'on') {
      for (const [ev, fn] of Object.entries(v)) el.addEventListener(ev, fn);
    } else if (k === 'data') {
      for (const [dk, dv] of Object.entries(v)) if (dv != null) el.dataset[dk] = dv;
    } else if (k === 'text') {
      el.textContent = v;
    } else if (k === 'value' && 'value' in el) {
      el.value = v;
    } else if (k === 'checked' || k === 'selected') {
      el[k] = Boolean(v);
    } else {
      el.setAttribute(k, v === true ? '' : String(v));
    }
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces the element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// ----- messages --------------------------------------------------------------

/**
 * Shows a message in the message area at the top of the page. Errors stay
 * until dismissed; other messages go after a few seconds.
 */
export function notify(text, kind = 'info') {
  const area = document.getElementById('messages');
  const close = h('button', { class: 'link', 'aria-label': 'Dismiss message' }, '×');
  const msg = h('div', { class: `msg msg-${kind}`, role: kind === 'error' ? 'alert' : 'status', data: { test: `msg-${kind}`, at: Date.now() } },
    h('span', {}, text), close);
  close.addEventListener('click', () => msg.remove());
  area.append(msg);
  // Keep the area short: the oldest messages go first.
  while (area.children.length > 4) area.firstElementChild.remove();
  if (kind !== 'error') setTimeout(() => msg.remove(), 6000);
  return msg;
}

/** Leaves the messages of the last moment (e.g. "saved" before a page change), removes older ones. */
export function clearMessages() {
  for (const m of document.querySelectorAll('#messages .msg')) {
    if (Date.now() - Number(m.dataset.at) > 1500) m.remove();
  }
}

/** Shows a failed request: what was tried, and the server's own reason. */
export function showError(err, what) {
  const status = err && err.status ? ` (${err.status})` : '';
  const field = err && err.field ? ` [${err.field}]` : '';
  const text = `${what ? `${what}: ` : ''}${(err && err.message) || err}${field}${status}`;
  notify(text, 'error');
}

// ----- controls ----------------------------------------------------------------

/**
 * A button running an async action: disabled while it runs, a failure
 * shown in the message area with the server's reason.
 */
export function button(label, action, props = {}) {
  const { confirm, what, ...attrs } = props;
  const b = h('button', { type: 'button', ...attrs }, label);
  b.addEventListener('click', async () => {
    if (confirm && !window.confirm(confirm)) return;
    b.disabled = true;
    try {
      await action(b);
    } catch (e) {
      showError(e, what || label);
    } finally {
      b.disabled = false;
    }
  });
  return b;
}

/**
 * A form whose submit runs `action(values)` (values: name → string, or
 * boolean for checkboxes); a failure names the field the server blamed.
 */
export function form(props, children, action) {
  const f = h('form', { novalidate: false, ...props }, children);
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    for (const bad of f.querySelectorAll('[aria-invalid]')) bad.removeAttribute('aria-invalid');
    const values = {};
    for (const el of f.elements) {
      if (!el.name) continue;
      values[el.name] = el.type === 'checkbox' ? el.checked : el.value;
    }
    const submit = f.querySelector('button[type=submit]');
    if (submit) submit.disabled = true;
    try {
      await action(values, f);
    } catch (e) {
      showError(e, props['aria-label'] || 'request');
      const field = e && e.field && fieldFor(f, e.field);
      if (field) {
        field.setAttribute('aria-invalid', 'true');
        field.focus();
      }
    } finally {
      if (submit) submit.disabled = false;
    }
  });
  return f;
}

/**
 * The input the server's `field` path names, or the nearest one above it:
 * `containers[0].env.A` → containers[0].env.A, containers[0].env, containers[0], containers.
 */
function fieldFor(f, path) {
  const parts = path.split(/(?=[.[])/);
  for (let n = parts.length; n > 0; n -= 1) {
    const el = f.querySelector(`[data-field="${CSS.escape(parts.slice(0, n).join(''))}"]`);
    if (el) return el;
  }
  return null;
}

let fieldSeq = 0;

/** A labelled input: field('Name', {name: 'name', required: true}). */
export function field(label, props = {}, hint) {
  const id = props.id || `f${++fieldSeq}`;
  const tag = props.tag || 'input';
  const opts = props.options;
  const attrs = { ...props, id, tag: undefined, options: undefined };
  if (!attrs['data-field'] && props.name) attrs['data-field'] = props.name;
  const input = h(tag, attrs,
    opts ? opts.map(([v, t]) => h('option', { value: v, selected: v === props.value }, t)) : null);
  if (props.type === 'checkbox') {
    return h('div', { class: 'field check' }, input, h('label', { for: id }, label),
      hint ? h('small', {}, hint) : null);
  }
  return h('div', { class: 'field' }, h('label', { for: id }, label), input,
    hint ? h('small', { id: `${id}-hint` }, hint) : null);
}

/** A button that copies `text`, for secrets and commands shown once. */
export function copyButton(text, label = 'Copy') {
  return button(label, async (b) => {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
    } else {
      // No clipboard API over plain http to a remote host: select the
      // text for the operator to copy instead.
      const pre = b.previousElementSibling;
      if (pre) window.getSelection().selectAllChildren(pre);
      notify('Selected: press Ctrl+C to copy', 'info');
      return;
    }
    notify('Copied', 'ok');
  }, { class: 'small' });
}

/** A box that shows a secret once, with a copy button. */
export function secretBox(title, text, note, test) {
  return h('div', { class: 'secret', role: 'status', data: { test } },
    h('strong', {}, title),
    h('p', {}, note || 'Shown only now: copy it before leaving this page.'),
    h('div', { class: 'copyline' }, h('code', { class: 'copytext' }, text), copyButton(text)));
}

// ----- tables and badges ---------------------------------------------------------

/** A scrollable table; `rows` are <tr> elements (or arrays of cells). */
export function table(headers, rows, props = {}) {
  const body = h('tbody', {}, rows.map((r) => (r instanceof Node ? r : h('tr', {}, r.map((c) => h('td', {}, c))))));
  const t = h('table', props,
    h('thead', {}, h('tr', {}, headers.map((c) => (c instanceof Node ? c : h('th', { scope: 'col' }, c))))),
    body);
  return h('div', { class: 'table-wrap' }, t);
}

const GOOD = new Set(['online', 'running', 'succeeded', 'healthy', 'ok', 'updated', 'active', 'enabled']);
const BAD = new Set(['offline', 'failed', 'unhealthy', 'denied', 'rolled_back', 'aborted', 'revoked', 'exited', 'absent']);
const BUSY = new Set(['pending', 'sent', 'received', 'in_progress', 'pulling', 'starting', 'retrying',
  'updating', 'ready', 'rolling_back', 'waiting_approval', 'paused', 'created', 'restarting', 'cut']);

/** A status word in a coloured pill (the colour only repeats the word). */
export function badge(word) {
  const w = String(word ?? '');
  const kind = GOOD.has(w) ? 'good' : BAD.has(w) ? 'bad' : BUSY.has(w) ? 'busy' : 'plain';
  return h('span', { class: `badge ${kind}` }, w.replace(/_/g, ' '));
}

/** Key=value chips. */
export function labelChips(labels, max = Infinity) {
  const entries = Object.entries(labels || {});
  const shown = entries.slice(0, max).map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`));
  if (entries.length > max) shown.push(h('span', { class: 'chip more' }, `+${entries.length - max}`));
  return h('span', { class: 'chips' }, shown);
}

/** A progress bar with its numbers in words beside it. */
export function progress(value, max, text, test) {
  return h('span', { class: 'progress', data: { test } },
    h('progress', { value: String(value), max: String(Math.max(max, 1)), 'aria-label': text }),
    h('span', {}, text));
}

/** A definition list from [term, description] pairs (null descriptions skipped). */
export function dl(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter((p) => p && p[1] !== null && p[1] !== undefined && p[1] !== '')
    .map(([t, d]) => [h('dt', {}, t), h('dd', {}, d)]));
}

// ----- formatting ------------------------------------------------------------------

export function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

export function percent(n) {
  return n === null || n === undefined || Number.isNaN(n) ? '–' : `${Number(n).toFixed(n < 10 ? 1 : 0)} %`;
}

export function time(ms) {
  return ms ? new Date(ms).toLocaleString() : '–';
}

function agoText(ms) {
  if (!ms) return 'never';
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 5) return 'just now';
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

/** "3 min ago", kept current by a ticker, with the exact time on hover. */
export function ago(ms) {
  return h('time', { datetime: ms ? new Date(ms).toISOString() : null, title: time(ms), data: { at: ms || 0 } }, agoText(ms));
}

setInterval(() => {
  for (const t of document.querySelectorAll('time[data-at]')) t.textContent = agoText(Number(t.dataset.at));
}, 10000);

/**
 * Runs `fn` at most once per `ms`: the first call runs at once, calls during
 * the wait are merged into one run at its end. For refetches that a chatty
 * fleet would otherwise trigger hundreds of times a second.
 */
export function throttle(fn, ms) {
  let timer = null;
  let pending = false;
  let last = 0;
  const run = () => {
    timer = null;
    pending = false;
    last = Date.now();
    fn();
  };
  const t = () => {
    if (timer) {
      pending = true;
      return;
    }
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(run, wait);
  };
  t.cancel = () => {
    clearTimeout(timer);
    timer = null;
    return pending;
  };
  return t;
}

/** A section with a heading; `actions` go beside the heading. */
export function section(title, actions, ...body) {
  return h('section', { class: 'card' },
    h('div', { class: 'card-head' }, h('h2', {}, title), actions ? h('div', { class: 'actions' }, actions) : null),
    body);
}

/** A placeholder until data arrives; pages replace it. */
export function loading(what = 'Loading…') {
  return h('p', { class: 'muted', role: 'status' }, what);
}
