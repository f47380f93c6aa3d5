// The Drover console: sign-in, the hash router, and the live change stream.
//
// Pages are modules (overview.js, devices.js, …). Each exports page
// objects {title, mount(el, ctx)}; mount returns {changes(list),
// snapshot(), query(params), unmount()} (all optional):
//   changes(list)  a batch of Change objects from the stream (at most one
//                  batch per 250 ms), to update what is shown in place;
//   snapshot()     read everything again (after `lagged`, or a reconnect);
//   query(params)  the hash's ?query changed on the same page;
//   unmount()      the page is left: stop timers.
// ctx: {params, query, session, can(role), go(hash), setQuery(obj), recentEvents}.
//
// Test hooks (ids and data-test attributes a browser test may rely on):
//   sign-in:    #signin-form, #signin-token, #signin-submit, [data-test=signin-error]
//   header:     [data-test=whoami] (name and role), #sign-out, [data-test=live-status]
//               (data-state="live" | "connecting" | "down"), #nav a[data-nav=<page>]
//   messages:   #messages, [data-test=msg-error], [data-test=msg-ok], [data-test=msg-info]
//   every page: main h1 (its title), main[data-page=<page>]
//   overview:   [data-test=count-total|count-online|count-offline|count-apps], [data-test=rollouts-active],
//               [data-test=failed-ops], [data-test=recent-events]
//   devices:    #device-filter (form), #device-status, #device-q, #device-selector,
//               [data-test=device-total], tr[data-test=device-row][data-device=<id>]
//               (cells [data-test=status|cpu|memory]), #device-prev, #device-next
//   device:     [data-test=device-status], [data-test=inventory], [data-test=labels],
//               #label-form, tr[data-test=app-row][data-app=<name>] with
//               button[data-action=start|stop|restart|pause|unpause|remove|redeploy|override]
//               ([data-test=container][data-container=<name>] inside),
//               #deploy-form, #deploy-app, #deploy-submit, [data-test=op-result] (data-status),
//               [data-test=chart-cpu|chart-memory|chart-disk], #chart-range,
//               [data-test=container-metrics], #log-app, #log-container, #log-follow,
//               pre#log-tail, [data-test=events], [data-test=operations], #revoke-device
//   apps:       tr[data-test=app-row][data-app=<name>], #app-new (link),
//               #app-form, #app-json-form, #app-compose-form (tabs: button[data-tab=form|json|compose]),
//               [data-test=app-spec], [data-test=releases], #diff-from, #diff-to, [data-test=diff],
//               [data-test=assignment], #assign-form, #unassign, #edit-spec (button),
//               #edit-spec-form, #delete-app
//   rollouts:   tr[data-test=rollout-row][data-rollout=<id>], #rollout-new (link), #rollout-form,
//               [data-test=rollout-phase], [data-test=rollout-batches] (tr[data-test=batch-row]),
//               #rollout-device-state, [data-test=rollout-devices],
//               tr[data-test=rollout-device][data-device=<id>], [data-test=rollout-agent] (an agent rollout),
//               button[data-action=pause|resume|approve|abort|rollback]
//   jobs:       tr[data-test=job-row][data-job=<id>] (cell [data-test=job-phase]), #job-new (link),
//               #job-form (#job-selector, #job-image, #job-command, #job-env, #job-timeout,
//               #job-concurrency, #job-submit), [data-test=job-error][data-field=<field>],
//               [data-test=job-phase], [data-test=job-counts], [data-test=job-devices]
//               tr[data-test=job-device][data-device=<id>][data-state=<state>] (cells
//               [data-test=state|exit-code|error], pre[data-test=output-tail]), #job-cancel
//   rules:      tr[data-test=rule-row][data-rule=<name>] (cell [data-test=enabled]), #rule-new (link),
//               #rule-form / #rule-edit-form (textarea #rule-form-json / #rule-edit-form-json),
//               [data-test=rule-error], button[data-action=enable|disable|delete|edit],
//               [data-test=rule-state], [data-test=rule-spec],
//               [data-test=firings] tr[data-test=firing-row][data-seq=<seq>][data-rule=<name>]
//               (cell [data-test=outcome])
//   operations: #ops-filter, tr[data-test=op-row][data-op=<id>] (cell [data-test=status])
//   audit:      #audit-filter, tr[data-test=audit-row]
//   access:     #token-form, [data-test=token-secret], #enroll-form, [data-test=enroll-token],
//               [data-test=agent-command], #mqtt-user-form, [data-test=mqtt-password],
//               #registry-form, tr[data-test=token-row|enroll-row|mqtt-user-row|registry-row]

import * as api from './api.js';
import { h, fill, notify, showError, field, clearMessages } from './ui.js';
import { overview } from './overview.js';
import { devices } from './devices.js';
import { device } from './device.js';
import { appList, appNew, appDetail } from './apps.js';
import { rolloutList, rolloutNew, rolloutDetail } from './rollouts.js';
import { jobList, jobNew, jobDetail } from './jobs.js';
import { ruleList, ruleNew, ruleDetail } from './rules.js';
import { operations } from './operations.js';
import { audit } from './audit.js';
import { access } from './access.js';

// [pattern, page, nav entry it belongs to]. Patterns match the hash path.
const ROUTES = [
  [/^\/$/, overview, 'overview'],
  [/^\/devices$/, devices, 'devices'],
  [/^\/devices\/([^/]+)$/, device, 'devices'],
  [/^\/apps$/, appList, 'apps'],
  [/^\/apps\/_new$/, appNew, 'apps'], // '_' never starts a name
  [/^\/apps\/([^/]+)$/, appDetail, 'apps'],
  [/^\/rollouts$/, rolloutList, 'rollouts'],
  [/^\/rollouts\/_new$/, rolloutNew, 'rollouts'],
  [/^\/rollouts\/([^/]+)$/, rolloutDetail, 'rollouts'],
  [/^\/jobs$/, jobList, 'jobs'],
  [/^\/jobs\/_new$/, jobNew, 'jobs'],
  [/^\/jobs\/([^/]+)$/, jobDetail, 'jobs'],
  [/^\/rules$/, ruleList, 'rules'],
  [/^\/rules\/_new$/, ruleNew, 'rules'],
  [/^\/rules\/([^/]+)$/, ruleDetail, 'rules'],
  [/^\/operations$/, operations, 'operations'],
  [/^\/audit$/, audit, 'audit'],
  [/^\/access$/, access, 'access'],
];

const NAV = [
  ['overview', '#/', 'Overview', 'viewer'],
  ['devices', '#/devices', 'Devices', 'viewer'],
  ['apps', '#/apps', 'Apps', 'viewer'],
  ['rollouts', '#/rollouts', 'Rollouts', 'viewer'],
  ['jobs', '#/jobs', 'Jobs', 'viewer'],
  ['rules', '#/rules', 'Rules', 'viewer'],
  ['operations', '#/operations', 'Operations', 'viewer'],
  ['access', '#/access', 'Access', 'viewer'],
  ['audit', '#/audit', 'Audit log', 'admin'],
];

const RANK = { viewer: 1, operator: 2, admin: 3 };

let session = null; // {name, role, csrf, expires_at_ms}

// Whether this browser signed in before, and until when: the session
// cookie is HttpOnly, so without this hint the only way to know would be
// a request that answers 401 to every first visit.
const HINT = 'drover.session-until';
let current = null; // {route, path, page (what mount returned)}

const main = () => document.getElementById('main');

/** May the signed-in caller do what needs `role`? (The server decides; this only hides controls.) */
function can(role) {
  return Boolean(session) && RANK[session.role] >= RANK[role];
}

// ----- session -------------------------------------------------------------------

async function start() {
  document.getElementById('sign-out').addEventListener('click', signOut);
  document.getElementById('nav-toggle').addEventListener('click', toggleNav);
  api.onSignedOut(() => {
    if (session) {
      notify('Your session has ended: sign in again.', 'error');
      signedOut();
    }
  });
  if (!(Number(localStorage.getItem(HINT)) > Date.now())) {
    localStorage.removeItem(HINT);
    showSignIn();
    return;
  }
  try {
    const s = await api.get('/api/v1/session');
    signedIn(s);
  } catch (e) {
    if (e.status !== 401) showError(e, 'checking the session');
    localStorage.removeItem(HINT);
    showSignIn();
  }
}

function signedIn(s) {
  session = s;
  api.setCsrf(s.csrf);
  localStorage.setItem(HINT, String(s.expires_at_ms || Date.now() + 3600000));
  fill(document.getElementById('whoami'), h('span', {}, s.name), ' ', h('span', { class: 'badge plain' }, s.role));
  document.getElementById('whoami').hidden = false;
  document.getElementById('sign-out').hidden = false;
  renderNav();
  window.addEventListener('hashchange', route);
  route();
  live.start();
}

function signedOut() {
  session = null;
  api.setCsrf('');
  localStorage.removeItem(HINT);
  live.stop();
  window.removeEventListener('hashchange', route);
  if (current && current.page && current.page.unmount) current.page.unmount();
  current = null;
  showSignIn();
}

async function signOut() {
  try {
    await api.del('/api/v1/session');
  } catch (e) {
    if (e.status !== 401) showError(e, 'signing out');
  }
  signedOut();
}

function showSignIn() {
  document.getElementById('whoami').hidden = true;
  document.getElementById('sign-out').hidden = true;
  document.getElementById('nav').hidden = true;
  document.getElementById('nav-toggle').hidden = true;
  document.title = 'Sign in · Drover';
  const error = h('p', { class: 'msg msg-error', role: 'alert', data: { test: 'signin-error' }, hidden: true });
  const f = h('form', { id: 'signin-form', class: 'signin card', 'aria-labelledby': 'signin-title' },
    h('h1', { id: 'signin-title' }, 'Sign in to Drover'),
    h('p', {}, 'Paste an API token. The first admin token is in ',
      h('code', {}, '<data-dir>/admin.token'), ' on the orchestrator (',
      h('code', {}, 'drover tokens create NAME --role viewer'), ' makes more).'),
    field('API token', { id: 'signin-token', name: 'token', type: 'password', required: true, autocomplete: 'off' }),
    error,
    h('button', { id: 'signin-submit', type: 'submit', class: 'primary' }, 'Sign in'));
  f.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    error.hidden = true;
    const submit = f.querySelector('button');
    submit.disabled = true;
    try {
      const s = await api.post('/api/v1/session', { token: f.elements.token.value.trim() });
      f.reset();
      signedIn(s);
    } catch (e) {
      error.textContent = e.status === 401 ? `Not signed in: ${e.message}` : `Sign-in failed: ${e.message}`;
      error.hidden = false;
      f.elements.token.focus();
    } finally {
      submit.disabled = false;
    }
  });
  const m = main();
  m.dataset.page = 'signin';
  fill(m, f);
  f.elements.token.focus();
}

// ----- navigation ----------------------------------------------------------------------

function renderNav() {
  const nav = document.getElementById('nav');
  fill(nav, h('ul', {}, NAV.filter(([, , , role]) => can(role)).map(([key, href, label]) =>
    h('li', {}, h('a', { href, data: { nav: key } }, label)))));
  nav.hidden = false;
  document.getElementById('nav-toggle').hidden = false;
}

function toggleNav() {
  const b = document.getElementById('nav-toggle');
  const open = b.getAttribute('aria-expanded') !== 'true';
  b.setAttribute('aria-expanded', String(open));
  document.body.classList.toggle('nav-open', open);
}

/** The hash as {path, query}: '#/devices?status=online' → '/devices', URLSearchParams. */
function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, q = ''] = raw.split('?');
  return { path: path || '/', query: new URLSearchParams(q) };
}

function route() {
  if (!session) return;
  const { path, query } = parseHash();
  // Same page, other query: let the page follow without being rebuilt.
  if (current && current.path === path && current.page && current.page.query) {
    current.page.query(query);
    return;
  }
  if (current && current.page && current.page.unmount) current.page.unmount();
  clearMessages();
  document.body.classList.remove('nav-open');
  document.getElementById('nav-toggle').setAttribute('aria-expanded', 'false');

  const found = ROUTES.map(([re, page, nav]) => [path.match(re), page, nav]).find(([m]) => m);
  const m = main();
  const el = h('div', { class: 'page' });
  fill(m, el);
  for (const a of document.querySelectorAll('#nav a')) {
    if (found && a.dataset.nav === found[2]) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!found) {
    m.dataset.page = 'not-found';
    fill(el, h('h1', {}, 'Not found'), h('p', {}, 'No page at ', h('code', {}, path), '. ', h('a', { href: '#/' }, 'Go to the overview')));
    current = { path, page: null };
    return;
  }
  const [match, page, nav] = found;
  m.dataset.page = nav;
  const params = match.slice(1).map(decodeURIComponent);
  const ctx = {
    params,
    query,
    session,
    can,
    go: (hash) => { location.hash = hash; },
    // Puts the page's state into the address without a new history entry
    // or a hashchange (the page already shows it).
    setQuery: (obj) => {
      const q = api.qs(obj);
      history.replaceState(null, '', `#${path}${q}`);
    },
    recentEvents: recentEvents.list,
  };
  document.title = `${typeof page.title === 'function' ? page.title(params) : page.title} · Drover`;
  let mounted = null;
  try {
    mounted = page.mount(el, ctx) || null;
  } catch (e) {
    showError(e, 'showing the page');
  }
  current = { path, page: mounted };
  // Move focus to the new page's heading, for keyboard and screen-reader users.
  const h1 = el.querySelector('h1');
  if (h1) {
    h1.tabIndex = -1;
    h1.focus({ preventScroll: true });
  }
}

// ----- the live change stream ----------------------------------------------------------

/**
 * One EventSource on /api/v1/changes for the whole console. Changes are
 * batched and handed to the page at most every 250 ms; `lagged` (the server
 * dropped some for us) and a reconnect after an error make the page read
 * its data again. EventSource reconnects by itself after a network error
 * (also across an orchestrator restart); when the server refuses the
 * stream (401 after the session ended, 503) it stops, and we check the
 * session and open a new one after a growing, jittered pause.
 */
const live = {
  es: null,
  queue: [],
  timer: null,
  retry: null,
  failures: 0,
  hadError: false,

  start() {
    this.stop();
    this.setState('connecting');
    // Every kind but `logs` and `telemetry`: at 10,000 devices those are
    // ~1,000 changes a second that no page needs fleet-wide. The device page
    // follows its own device's logs and telemetry on a stream of its own; the
    // devices page re-reads the rows it shows on a timer.
    const es = new EventSource('/api/v1/changes?coalesce=true&kinds=device,inventory,state,operation,event,app,rollout,rule_firing,job');
    this.es = es;
    es.onopen = () => {
      this.setState('live');
      this.failures = 0;
      if (this.hadError) {
        this.hadError = false;
        this.snapshot();
      }
    };
    es.onmessage = (ev) => {
      let change;
      try {
        change = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (change.kind === 'lagged') {
        this.queue = [];
        this.snapshot();
        return;
      }
      this.queue.push(change);
      if (!this.timer) this.timer = setTimeout(() => this.flush(), 250);
    };
    es.onerror = () => {
      this.hadError = true;
      if (es.readyState === EventSource.CLOSED) {
        // Refused, not dropped: find out whether we are still signed in.
        this.setState('down');
        this.failures += 1;
        const wait = Math.min(30000, 1000 * 2 ** this.failures) * (0.5 + Math.random() / 2);
        this.retry = setTimeout(async () => {
          try {
            await api.get('/api/v1/session');
            if (session) this.start();
          } catch (e) {
            if (e.status !== 401 && session) this.start(); // 401: signedOut() took over
          }
        }, wait);
      } else {
        this.setState('connecting');
      }
    };
  },

  stop() {
    if (this.es) this.es.close();
    this.es = null;
    clearTimeout(this.timer);
    clearTimeout(this.retry);
    this.timer = null;
    this.queue = [];
    this.setState('down');
  },

  flush() {
    this.timer = null;
    const batch = this.queue;
    this.queue = [];
    recentEvents.add(batch);
    if (current && current.page && current.page.changes) {
      try {
        current.page.changes(batch);
      } catch (e) {
        console.error(e);
      }
    }
  },

  snapshot() {
    if (current && current.page && current.page.snapshot) current.page.snapshot();
  },

  setState(state) {
    const el = document.getElementById('live-status');
    el.dataset.state = state;
    el.textContent = { live: 'Live', connecting: 'Connecting…', down: 'Offline' }[state];
    el.title = {
      live: 'Receiving changes as they happen',
      connecting: 'Reconnecting to the change stream',
      down: 'Not receiving changes; the page shows what it last read',
    }[state];
  },
};

/** The newest device events seen on the stream, for the overview. */
const recentEvents = {
  list: [],
  add(batch) {
    for (const c of batch) {
      if (c.kind === 'event') this.list.unshift({ device: c.device, ...c.event });
    }
    this.list.length = Math.min(this.list.length, 50);
  },
};

start();
