// Apps: the list, a new app (from a form, from JSON or from a Compose
// file), and one app's spec, releases (with a diff of any two) and fleet
// assignment.

import { get, put, del, request, enc, qs, getPage } from './api.js';
import {
  h, fill, section, table, badge, dl, ago, time, throttle, button, form, field, showError, notify, loading, labelChips,
} from './ui.js';

export const appList = {
  title: 'Apps',
  mount(el, ctx) {
    const list = h('div', {}, loading());
    fill(el, h('div', { class: 'page-head' }, h('h1', {}, 'Apps'),
      ctx.can('admin') ? h('a', { id: 'app-new', class: 'button primary', href: '#/apps/_new' }, 'New app') : null),
    h('div', { class: 'card' }, list));

    async function load() {
      try {
        const apps = await get('/api/v1/apps');
        apps.sort((a, b) => a.spec.name.localeCompare(b.spec.name));
        fill(list, apps.length ? table(['App', 'Containers', 'Release', 'Assigned to', 'Privileges', 'Changed'], apps.map((a) => h('tr', { data: { test: 'app-row', app: a.spec.name } },
          h('td', {}, h('a', { href: `#/apps/${enc(a.spec.name)}` }, a.spec.name), Object.keys(a.spec.labels || {}).length ? h('span', { class: 'sub' }, labelChips(a.spec.labels, 3)) : null),
          h('td', {}, a.spec.containers.map((c) => h('span', { class: 'sub mono' }, `${c.name}: ${c.image}`))),
          h('td', { class: 'num' }, String(a.latest_release)),
          h('td', { class: 'mono' }, a.assignment_selector === undefined ? h('span', { class: 'muted' }, '–') : a.assignment_selector || 'every device'),
          h('td', {}, a.privileges.length ? h('span', { class: 'warn' }, a.privileges.join(', ')) : h('span', { class: 'muted' }, 'none')),
          h('td', {}, ago(a.updated_at_ms))))) :
          h('p', { class: 'empty' }, 'No apps yet.', ctx.can('admin') ? [' ', h('a', { href: '#/apps/_new' }, 'Define one.')] : null));
      } catch (e) {
        showError(e, 'reading apps');
      }
    }
    const reload = throttle(load, 1000);
    load();
    return {
      snapshot: load,
      changes(l) { if (l.some((c) => c.kind === 'app')) reload(); },
      unmount() { reload.cancel(); },
    };
  },
};

// ----- new app ---------------------------------------------------------------------

/** Splits a command line as a shell would, without expansion: quotes group words. */
export function splitCommand(s) {
  const words = [];
  let cur = null;
  let quote = null;
  for (const ch of s) {
    if (quote) {
      if (ch === quote) quote = null;
      else cur += ch;
    } else if (ch === '"' || ch === '\'') {
      quote = ch;
      cur = cur ?? '';
    } else if (/\s/.test(ch)) {
      if (cur !== null) words.push(cur);
      cur = null;
    } else {
      cur = (cur ?? '') + ch;
    }
  }
  if (quote) throw new Error(`unclosed ${quote} in the command`);
  if (cur !== null) words.push(cur);
  return words;
}

/** "[IP:]HOST:CONTAINER[/udp]" → a port mapping. */
function parsePort(line) {
  const [addr, proto = 'tcp'] = line.split('/');
  const parts = addr.split(':');
  if (parts.length < 2 || parts.length > 3 || !['tcp', 'udp'].includes(proto)) {
    throw new Error(`port ${JSON.stringify(line)}: write HOST:CONTAINER, IP:HOST:CONTAINER, optionally /udp`);
  }
  const [container, host] = [Number(parts.pop()), Number(parts.pop())];
  const mapping = { host, container, protocol: proto };
  if (parts.length) mapping.host_ip = parts[0];
  return mapping;
}

const lines = (s) => s.split('\n').map((l) => l.trim()).filter(Boolean);

/** The app spec the form describes (one container). */
function specFromForm(v) {
  const c = { name: v.container || 'main', image: v.image.trim(), restart: v.restart };
  if (v.command.trim()) c.command = splitCommand(v.command.trim());
  const env = {};
  for (const l of lines(v.env)) {
    const i = l.indexOf('=');
    if (i < 1) throw new Error(`environment line ${JSON.stringify(l)}: write KEY=VALUE`);
    env[l.slice(0, i)] = l.slice(i + 1);
  }
  if (Object.keys(env).length) c.env = env;
  const ports = lines(v.ports).map(parsePort);
  if (ports.length) c.ports = ports;
  if (v.memory_mb) c.memory_mb = Number(v.memory_mb);
  if (v.cpus) c.cpus = Number(v.cpus);
  return { name: v.name.trim(), containers: [c] };
}

const TEMPLATE = JSON.stringify({
  name: 'web',
  containers: [{ name: 'main', image: 'registry.example:5000/web:1', env: { GREETING: 'hi' }, restart: 'unless-stopped', memory_mb: 64 }],
}, null, 2);

const COMPOSE = `services:
  web:
    image: registry.example:5000/web:1
    ports: ["8080:80"]
    restart: unless-stopped
`;

export const appNew = {
  title: 'New app',
  mount(el, ctx) {
    const created = (app) => {
      notify(`App ${app.spec.name} saved (release ${app.latest_release}).`, 'ok');
      ctx.go(`#/apps/${enc(app.spec.name)}`);
    };
    const c = 'containers[0]';
    const forms = {
      form: form({ id: 'app-form', 'aria-label': 'creating the app' }, [
        h('div', { class: 'form-cols' },
          field('App name', { name: 'name', required: true, 'data-field': 'name', placeholder: 'web', class: 'mono' }),
          field('Container name', { name: 'container', value: 'main', 'data-field': `${c}.name`, class: 'mono' }),
          field('Image', { name: 'image', required: true, 'data-field': `${c}.image`, placeholder: '127.0.0.1:5000/drover/busybox:2', class: 'mono' }),
          field('Restart', { tag: 'select', name: 'restart', 'data-field': `${c}.restart`, value: 'unless-stopped',
            options: [['unless-stopped', 'unless-stopped'], ['always', 'always'], ['on-failure', 'on-failure'], ['no', 'no']] }),
          field('Memory limit (MB)', { name: 'memory_mb', type: 'number', min: 6, 'data-field': `${c}.memory_mb` }),
          field('CPUs', { name: 'cpus', type: 'number', min: 0.01, step: 0.01, 'data-field': `${c}.cpus` })),
        field('Command', { name: 'command', 'data-field': `${c}.command`, class: 'mono', placeholder: 'sh -c "echo hi; sleep 3600"' },
          'Optional; overrides the image\'s CMD. Quotes group words, as in a shell.'),
        field('Environment', { tag: 'textarea', name: 'env', 'data-field': `${c}.env`, placeholder: 'KEY=value' }, 'One KEY=VALUE a line.'),
        field('Ports', { tag: 'textarea', name: 'ports', 'data-field': `${c}.ports`, placeholder: '8080:80\n127.0.0.1:5353:53/udp' },
          'One [IP:]HOST:CONTAINER[/udp] a line.'),
        h('p', { class: 'muted' }, 'Volumes, devices, health checks, more containers: use JSON or Compose.'),
        h('button', { type: 'submit', class: 'primary' }, 'Create app'),
      ], async (v) => created((await request('POST', '/api/v1/apps', { body: specFromForm(v) })).data)),

      json: form({ id: 'app-json-form', 'aria-label': 'creating the app from JSON' }, [
        field('App spec (JSON)', { tag: 'textarea', name: 'json', class: 'tall', value: TEMPLATE, 'data-field': 'json', spellcheck: 'false' },
          'The body of POST /api/v1/apps: see the README or /api/v1/openapi.json for every field.'),
        h('button', { type: 'submit', class: 'primary' }, 'Create app'),
      ], async (v) => {
        let spec;
        try {
          spec = JSON.parse(v.json);
        } catch (e) {
          throw new Error(`not valid JSON: ${e.message}`);
        }
        created((await request('POST', '/api/v1/apps', { body: spec })).data);
      }),

      compose: form({ id: 'app-compose-form', 'aria-label': 'importing the Compose file' }, [
        h('div', { class: 'form-cols' },
          field('App name', { name: 'name', placeholder: 'from the file\'s name:', class: 'mono' }),
          field('Compose file', { name: 'file', type: 'file', accept: '.yml,.yaml,text/yaml,application/yaml' }),
          field('Replace an existing app of that name', { name: 'replace', type: 'checkbox' })),
        field('docker-compose.yml', { tag: 'textarea', name: 'yaml', class: 'tall', value: COMPOSE, 'data-field': 'services', spellcheck: 'false' },
          'image, command, environment, ports, volumes, restart, healthcheck, depends_on, limits; anything else is refused by name.'),
        h('button', { type: 'submit', class: 'primary' }, 'Import'),
      ], async (v) => {
        const r = await request('POST', `/api/v1/apps/import${qs({ name: v.name.trim(), replace: v.replace ? 'true' : '' })}`,
          { text: v.yaml, contentType: 'application/yaml' });
        created(r.data);
      }),
    };
    // A chosen file fills the text area, where it can still be edited.
    forms.compose.elements.file.addEventListener('change', async (ev) => {
      const file = ev.target.files[0];
      if (file) forms.compose.elements.yaml.value = await file.text();
    });

    const tabs = Object.keys(forms).map((k) => h('button', { type: 'button', data: { tab: k }, 'aria-pressed': String(k === 'form') },
      { form: 'Form', json: 'JSON', compose: 'Compose file' }[k]));
    const show = (k) => {
      for (const t of tabs) t.setAttribute('aria-pressed', String(t.dataset.tab === k));
      for (const [name, f] of Object.entries(forms)) f.hidden = name !== k;
    };
    for (const t of tabs) t.addEventListener('click', () => show(t.dataset.tab));
    show('form');
    fill(el, h('h1', {}, 'New app'),
      ctx.can('admin') ? null : h('p', { class: 'msg msg-error' }, 'Only admins define apps: the server will refuse this.'),
      h('div', { class: 'card' }, h('div', { class: 'tabs', role: 'group', 'aria-label': 'How to describe the app' }, tabs), Object.values(forms)));
  },
};

// ----- one app -------------------------------------------------------------------------

/**
 * A line diff (longest common subsequence) of two texts: [{op: ' '|'+'|'-', line}].
 * Specs are small; past 2,000 lines a side the diff is whole-text.
 */
export function diffLines(a, b) {
  const x = a.split('\n');
  const y = b.split('\n');
  if (x.length > 2000 || y.length > 2000) return [...x.map((l) => ({ op: '-', line: l })), ...y.map((l) => ({ op: '+', line: l }))];
  // lcs[i][j]: the common length of x[i..] and y[j..]
  const lcs = Array.from({ length: x.length + 1 }, () => new Uint16Array(y.length + 1));
  for (let i = x.length - 1; i >= 0; i -= 1) {
    for (let j = y.length - 1; j >= 0; j -= 1) {
      lcs[i][j] = x[i] === y[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < x.length || j < y.length) {
    if (i < x.length && j < y.length && x[i] === y[j]) {
      out.push({ op: ' ', line: x[i] });
      i += 1;
      j += 1;
    } else if (i < x.length && (j === y.length || lcs[i + 1][j] >= lcs[i][j + 1])) {
      out.push({ op: '-', line: x[i] });
      i += 1;
    } else {
      out.push({ op: '+', line: y[j] });
      j += 1;
    }
  }
  return out;
}

/** Keeps `context` unchanged lines around each change; longer runs become one '…' line. */
export function collapse(diff, context = 3) {
  const out = [];
  let run = [];
  const flush = (atStart, atEnd) => {
    const keepHead = atStart ? 0 : context;
    const keepTail = atEnd ? 0 : context;
    if (run.length > keepHead + keepTail + 1) {
      out.push(...run.slice(0, keepHead), { op: '…', line: `${run.length - keepHead - keepTail} unchanged lines` }, ...run.slice(run.length - keepTail));
    } else {
      out.push(...run);
    }
    run = [];
  };
  diff.forEach((l) => {
    if (l.op === ' ') {
      run.push(l);
    } else {
      flush(out.length === 0, false);
      out.push(l);
    }
  });
  flush(out.length === 0, true);
  return out;
}

const pretty = (spec) => JSON.stringify(spec, null, 2);

export const appDetail = {
  title: ([name]) => name,
  mount(el, ctx) {
    const [name] = ctx.params;
    const base = `/api/v1/apps/${enc(name)}`;
    const admin = ctx.can('admin');
    const operator = ctx.can('operator');

    const meta = h('div', {}, loading());
    const spec = h('pre', { class: 'block', data: { test: 'app-spec' } });
    const releases = h('div', { data: { test: 'releases' } });
    const diffFrom = h('select', { id: 'diff-from', 'aria-label': 'Older release' });
    const diffTo = h('select', { id: 'diff-to', 'aria-label': 'Newer release' });
    const diff = h('pre', { class: 'block diff', data: { test: 'diff' } });
    const assignment = h('div', { data: { test: 'assignment' } });
    const assignRelease = h('select', { id: 'assign-release', name: 'release', 'data-field': 'release' });
    let app = null;
    let rels = [];

    const editForm = admin ? form({ id: 'edit-spec-form', 'aria-label': 'saving the spec', hidden: true }, [
      field('Spec (JSON)', { tag: 'textarea', name: 'json', class: 'tall', spellcheck: 'false', 'data-field': 'json' },
        'Saving makes a new release; devices get it when it is deployed, assigned or rolled out.'),
      h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, 'Save as new release'),
        button('Cancel', () => { editForm.hidden = true; })),
    ], async (v) => {
      let body;
      try {
        body = JSON.parse(v.json);
      } catch (e) {
        throw new Error(`not valid JSON: ${e.message}`);
      }
      const saved = await put(base, body);
      editForm.hidden = true;
      notify(`Saved: release ${saved.latest_release}.`, 'ok');
      load();
    }) : null;

    const assignForm = operator ? form({ id: 'assign-form', class: 'inline', 'aria-label': 'setting the assignment' }, [
      field('Selector', { name: 'selector', class: 'mono', placeholder: 'env=prod (empty: every device)', 'data-field': 'selector' }),
      h('div', { class: 'field' }, h('label', { for: 'assign-release' }, 'Release'), assignRelease),
      field('Run', { tag: 'select', name: 'run', options: [['running', 'running'], ['stopped', 'stopped']], value: 'running', 'data-field': 'run' }),
      h('button', { type: 'submit', class: 'primary' }, 'Assign'),
    ], async (v) => {
      await put(`${base}/assignment`, { selector: v.selector.trim(), release: Number(v.release) || 0, run: v.run });
      notify(`${name} is assigned to the devices matching ${v.selector.trim() || 'everything'}.`, 'ok');
      reload();
    }) : null;

    fill(el,
      h('div', { class: 'page-head' }, h('h1', {}, h('span', { class: 'mono' }, name)),
        h('div', { class: 'actions' },
          operator ? h('a', { class: 'button', href: `#/rollouts/_new?app=${enc(name)}` }, 'Roll out…') : null,
          admin ? button('Edit spec', () => {
            editForm.elements.json.value = pretty(app.spec);
            editForm.hidden = false;
            editForm.elements.json.focus();
          }, { id: 'edit-spec' }) : null,
          admin ? button('Delete app', async () => {
            await del(base);
            notify(`App ${name} deleted.`, 'ok');
            ctx.go('#/apps');
          }, { id: 'delete-app', class: 'danger', confirm: `Delete app ${name}? Only an app deployed nowhere can be deleted.` }) : null)),
      editForm,
      h('div', { class: 'grid' }, section('App', null, meta), section('Fleet assignment', null, assignment, assignForm)),
      section('Spec', null, spec),
      section('Releases', null, releases,
        h('h3', {}, 'Difference between two releases'),
        h('div', { class: 'actions' }, h('label', { for: 'diff-from' }, 'From'), diffFrom, h('label', { for: 'diff-to' }, 'to'), diffTo),
        diff));

    function drawDiff() {
      const a = rels.find((r) => String(r.number) === diffFrom.value);
      const b = rels.find((r) => String(r.number) === diffTo.value);
      if (!a || !b) {
        fill(diff, 'Only one release so far.');
        return;
      }
      const d = diffLines(pretty(a.spec), pretty(b.spec));
      const changed = d.some((l) => l.op !== ' ');
      fill(diff, changed ? collapse(d).map((l) => h('span', { class: { '+': 'add', '-': 'del', ' ': 'same', '…': 'same' }[l.op] }, `${l.op} ${l.line}`))
        : 'The two releases have the same spec.');
    }
    diffFrom.addEventListener('change', drawDiff);
    diffTo.addEventListener('change', drawDiff);

    async function loadAssignment() {
      // Only an app with an assignment has one to read (no 404 to ask).
      if (!app || app.assignment_selector === undefined) {
        fill(assignment, h('p', { class: 'muted' }, 'No assignment: the app runs only where it was deployed by hand.'));
        return;
      }
      try {
        const a = await get(`${base}/assignment`);
        fill(assignment, dl([
          ['Selector', h('code', {}, a.selector || '(every device)')],
          ['Release', String(a.release)],
          ['Run', a.run],
          ['Matching', `${a.matching.length} device${a.matching.length === 1 ? '' : 's'}`],
          ['Placed by it', String(a.assigned.length)],
          ['Overridden on', a.overridden.length ? a.overridden.map((d) => h('a', { href: `#/devices/${enc(d)}`, class: 'chip' }, d)) : 'none'],
          ['Changed', [ago(a.updated_at_ms), ` by ${a.author}`]],
        ]), operator ? button('Delete assignment', async () => {
          await del(`${base}/assignment`);
          notify(`The assignment of ${name} is gone; the app is removed where it put it.`, 'ok');
          reload();
        }, { id: 'unassign', class: 'danger small', confirm: `Delete the assignment of ${name}? The app is removed from the devices it put it on.` }) : null);
        if (assignForm) {
          assignForm.elements.selector.value = a.selector;
          assignForm.elements.run.value = a.run;
        }
      } catch (e) {
        if (e.status === 404) fill(assignment, h('p', { class: 'muted' }, 'No assignment: the app runs only where it was deployed by hand.'));
        else showError(e, 'reading the assignment');
      }
    }

    async function load() {
      try {
        [app, rels] = await Promise.all([get(base), get(`${base}/releases`)]);
      } catch (e) {
        showError(e, `reading app ${name}`);
        if (e.status === 404) fill(meta, h('p', { class: 'warn' }, `No app ${name}.`));
        return;
      }
      fill(meta, dl([
        ['Latest release', String(app.latest_release)],
        ['Containers', String(app.spec.containers.length)],
        ['Privileges', app.privileges.length ? h('span', { class: 'warn' }, app.privileges.join(', ')) : 'none (unprivileged)'],
        ['Labels', Object.keys(app.spec.labels || {}).length ? labelChips(app.spec.labels) : null],
        ['Created', time(app.created_at_ms)],
        ['Changed', ago(app.updated_at_ms)],
      ]));
      fill(spec, pretty(app.spec));
      const newestFirst = rels.slice().reverse();
      fill(releases, table(['Release', 'Made by', 'When', 'Images'], newestFirst.map((r) => h('tr', { data: { test: 'release-row', release: r.number } },
        h('td', { class: 'num' }, String(r.number), r.number === app.latest_release ? [' ', badge('latest')] : null),
        h('td', {}, r.author), h('td', {}, ago(r.created_at_ms)),
        h('td', {}, r.spec.containers.map((c) => h('span', { class: 'sub mono' }, c.image)))))));
      const opt = (sel, pick) => fill(sel, newestFirst.map((r) => h('option', { value: r.number, selected: r.number === pick }, `release ${r.number}`)));
      opt(diffTo, newestFirst[0] && newestFirst[0].number);
      opt(diffFrom, (newestFirst[1] || newestFirst[0] || {}).number);
      drawDiff();
      const keep = assignRelease.value;
      fill(assignRelease, h('option', { value: '0' }, 'latest'), newestFirst.map((r) => h('option', { value: r.number, selected: String(r.number) === keep }, String(r.number))));
    }

    // How many devices a selector matches, as the operator types it.
    if (assignForm) {
      const hint = h('small', { class: 'muted', role: 'status' });
      assignForm.append(hint);
      let timer = null;
      assignForm.elements.selector.addEventListener('input', () => {
        clearTimeout(timer);
        timer = setTimeout(async () => {
          try {
            const p = await getPage(`/api/v1/devices${qs({ selector: assignForm.elements.selector.value.trim(), limit: 1 })}`);
            hint.textContent = `matches ${p.total} device${p.total === 1 ? '' : 's'} now`;
          } catch (e) {
            hint.textContent = e.message;
          }
        }, 400);
      });
    }

    const reload = throttle(async () => { await load(); loadAssignment(); }, 1000);
    reload();
    return {
      snapshot: reload,
      changes(l) { if (l.some((c) => c.kind === 'app' && c.name === name)) reload(); },
      unmount() { reload.cancel(); },
    };
  },
};
