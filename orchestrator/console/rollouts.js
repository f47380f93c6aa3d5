// Rollouts: the list, a new rollout, and one rollout's live progress per
// batch and per device with its actions.

import { get, post, enc, qs, getPage } from './api.js';
import { h, fill, section, table, badge, dl, ago, time, throttle, button, form, field, showError, notify, loading, progress } from './ui.js';

const FINAL = new Set(['succeeded', 'failed', 'rolled_back', 'aborted', 'superseded']);

/** The actions a rollout in `phase` takes (as core/rollout.rs allows them). */
function actionsFor(phase) {
  if (FINAL.has(phase)) return [];
  const a = [];
  if (phase === 'running' || phase === 'waiting_approval') a.push('pause');
  if (phase === 'paused') a.push('resume');
  if (phase === 'waiting_approval') a.push('approve');
  a.push('abort');
  if (phase !== 'rolling_back') a.push('rollback');
  return a;
}

const ACTION_TEXT = {
  pause: ['Pause', null],
  resume: ['Resume', null],
  approve: ['Approve next batch', null],
  abort: ['Abort', 'Abort this rollout? Devices keep what they run now (as overrides); the assignment goes back to what it was.'],
  rollback: ['Roll back', 'Roll back? Every device this rollout moved goes back to the release it ran before.'],
};

function counted(c) {
  const of = c.total - c.skipped;
  const extra = [c.updating && `${c.updating} updating`, c.failed && `${c.failed} failed`, c.skipped && `${c.skipped} skipped`,
    c.rolled_back && `${c.rolled_back} rolled back`].filter(Boolean).join(', ');
  return progress(c.updated, of, `${c.updated}/${of} updated${extra ? `, ${extra}` : ''}`);
}

/** The app a rollout moves, or for an agent rollout the agent version. */
function target(r) {
  return r.agent_version ? h('span', { data: { test: 'rollout-agent' } }, `agent ${r.agent_version}`)
    : h('a', { href: `#/apps/${enc(r.app)}` }, r.app);
}

function rolloutRow(r) {
  return h('tr', { data: { test: 'rollout-row', rollout: r.id } },
    h('td', {}, h('a', { href: `#/rollouts/${enc(r.id)}`, class: 'mono' }, r.id.slice(0, 8)), h('span', { class: 'sub' }, ago(r.created_at_ms))),
    h('td', {}, target(r), h('span', { class: 'sub' }, `release ${r.from_release || '–'} → ${r.to_release}`)),
    h('td', {}, badge(r.phase)),
    h('td', {}, counted(r.counts)),
    h('td', { class: 'opt' }, `${Math.min(r.current_batch + 1, r.batches.length)} of ${r.batches.length}`),
    h('td', { class: 'opt mono' }, r.selector || '(every device)'));
}

export const rolloutList = {
  title: 'Rollouts',
  mount(el, ctx) {
    const appFilter = h('input', { id: 'rollout-app', type: 'search', placeholder: 'app name', value: ctx.query.get('app') || '' });
    const body = h('tbody');
    const t = table(['Rollout', 'App', 'Phase', 'Progress', h('th', { class: 'opt', scope: 'col' }, 'Batch'), h('th', { class: 'opt', scope: 'col' }, 'Selector')], []);
    t.querySelector('table').replaceChild(body, t.querySelector('tbody'));
    const filter = h('form', { class: 'inline', role: 'search' }, h('div', { class: 'field' }, h('label', { for: 'rollout-app' }, 'App'), appFilter),
      h('button', { type: 'submit' }, 'Filter'));
    fill(el, h('div', { class: 'page-head' }, h('h1', {}, 'Rollouts'),
      ctx.can('operator') ? h('a', { id: 'rollout-new', class: 'button primary', href: '#/rollouts/_new' }, 'New rollout') : null),
    h('div', { class: 'card' }, filter, t));

    let rows = new Map();
    async function load() {
      try {
        const list = await get(`/api/v1/rollouts${qs({ app: appFilter.value.trim() })}`);
        rows = new Map(list.map((r) => [r.id, rolloutRow(r)]));
        fill(body, list.length ? [...rows.values()] : h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No rollouts.')));
      } catch (e) {
        showError(e, 'reading rollouts');
      }
    }
    filter.addEventListener('submit', (ev) => {
      ev.preventDefault();
      ctx.setQuery({ app: appFilter.value.trim() });
      load();
    });
    load();
    return {
      snapshot: load,
      changes(list) {
        for (const c of list) {
          if (c.kind !== 'rollout') continue;
          const r = c.rollout;
          if (appFilter.value.trim() && r.app !== appFilter.value.trim()) continue;
          const row = rolloutRow(r);
          if (rows.has(r.id)) rows.get(r.id).replaceWith(row);
          else {
            if (!rows.size) fill(body);
            body.prepend(row);
          }
          rows.set(r.id, row);
        }
      },
    };
  },
};

export const rolloutNew = {
  title: 'New rollout',
  mount(el, ctx) {
    const app = h('select', { id: 'rollout-app-select', name: 'app', required: true, 'data-field': 'app' });
    const release = h('select', { id: 'rollout-release', name: 'release', 'data-field': 'release' });
    const matchHint = h('small', { class: 'muted', role: 'status' });
    const f = form({ id: 'rollout-form', 'aria-label': 'creating the rollout' }, [
      h('div', { class: 'form-cols' },
        h('div', { class: 'field' }, h('label', { for: 'rollout-app-select' }, 'App'), app),
        h('div', { class: 'field' }, h('label', { for: 'rollout-release' }, 'Release'), release),
        h('div', { class: 'field' }, h('label', { for: 'rollout-selector' }, 'Selector'),
          h('input', { id: 'rollout-selector', name: 'selector', class: 'mono', placeholder: 'empty: the app\'s assignment', 'data-field': 'selector' }), matchHint),
        field('Batches', { name: 'batches', class: 'mono', placeholder: '1,50%', 'data-field': 'batches' },
          'Sizes in order, counts or percentages; the first is the canary, the last takes the rest. Empty: one batch.'),
        field('Max unavailable', { name: 'max_unavailable', class: 'mono', placeholder: 'no limit', 'data-field': 'max_unavailable' }, 'A count or a percentage.'),
        field('Success threshold (%)', { name: 'success_threshold_percent', type: 'number', min: 0, max: 100, value: '100', 'data-field': 'success_threshold_percent' }),
        field('On failure', { tag: 'select', name: 'on_failure', value: 'rollback', 'data-field': 'on_failure',
          options: [['rollback', 'roll back'], ['pause', 'pause'], ['continue', 'continue']] }),
        field('Device timeout (s)', { name: 'device_timeout_secs', type: 'number', min: 1, value: '600', 'data-field': 'device_timeout_secs' }),
        field('Minimum ready time (s)', { name: 'min_ready_secs', type: 'number', min: 0, value: '0', 'data-field': 'min_ready_secs' })),
      field('Wait for approval between batches', { name: 'approval', type: 'checkbox' }),
      h('button', { type: 'submit', class: 'primary' }, 'Start rollout'),
    ], async (v) => {
      const size = (s) => (/^\d+$/.test(s) ? Number(s) : s);
      const body = {
        app: v.app,
        release: Number(v.release) || 0,
        batches: v.batches.split(',').map((s) => s.trim()).filter(Boolean).map(size),
        success_threshold_percent: Number(v.success_threshold_percent),
        on_failure: v.on_failure,
        device_timeout_secs: Number(v.device_timeout_secs),
        min_ready_secs: Number(v.min_ready_secs),
        approval: v.approval,
      };
      if (v.selector.trim()) body.selector = v.selector.trim();
      if (v.max_unavailable.trim()) body.max_unavailable = size(v.max_unavailable.trim());
      const r = await post('/api/v1/rollouts', body);
      notify(`Rollout of ${r.app} release ${r.to_release} started.`, 'ok');
      ctx.go(`#/rollouts/${enc(r.id)}`);
    });
    fill(el, h('h1', {}, 'New rollout'),
      ctx.can('operator') ? null : h('p', { class: 'msg msg-error' }, 'Only operators and admins start rollouts: the server will refuse this.'),
      h('div', { class: 'card' }, f));

    async function loadReleases() {
      if (!app.value) return;
      try {
        const rels = await get(`/api/v1/apps/${enc(app.value)}/releases`);
        fill(release, h('option', { value: '0' }, 'latest'), rels.slice().reverse().map((r) => h('option', { value: r.number }, `release ${r.number} (${new Date(r.created_at_ms).toLocaleDateString()})`)));
        const sel = (apps.find((a) => a.spec.name === app.value) || {}).assignment_selector;
        f.elements.selector.placeholder = sel !== undefined ? `empty: the assignment's, ${sel || 'every device'}` : 'empty: every device';
        countMatches();
      } catch (e) {
        showError(e, 'reading releases');
      }
    }
    async function countMatches() {
      const sel = f.elements.selector.value.trim();
      if (!sel) {
        matchHint.textContent = '';
        return;
      }
      try {
        const p = await getPage(`/api/v1/devices${qs({ selector: sel, limit: 1 })}`);
        matchHint.textContent = `matches ${p.total} device${p.total === 1 ? '' : 's'} now`;
      } catch (e) {
        matchHint.textContent = e.message;
      }
    }
    let timer = null;
    f.elements.selector.addEventListener('input', () => {
      clearTimeout(timer);
      timer = setTimeout(countMatches, 400);
    });
    app.addEventListener('change', loadReleases);
    let apps = [];
    (async () => {
      try {
        apps = await get('/api/v1/apps');
        const want = ctx.query.get('app');
        fill(app, apps.length ? apps.map((a) => h('option', { value: a.spec.name, selected: a.spec.name === want }, a.spec.name))
          : h('option', { value: '' }, 'no apps defined'));
        loadReleases();
      } catch (e) {
        showError(e, 'reading apps');
      }
    })();
    return { unmount() { clearTimeout(timer); } };
  },
};

export const rolloutDetail = {
  title: ([id]) => `Rollout ${id.slice(0, 8)}`,
  mount(el, ctx) {
    const [id] = ctx.params;
    const base = `/api/v1/rollouts/${enc(id)}`;
    const phase = h('span', { data: { test: 'rollout-phase' } });
    const actions = h('div', { class: 'actions' });
    const summary = h('div', {}, loading());
    const batches = h('div', { data: { test: 'rollout-batches' } });
    const stateFilter = h('select', { id: 'rollout-device-state', 'aria-label': 'Device state' },
      ['', 'pending', 'updating', 'ready', 'updated', 'failed', 'rolling_back', 'rolled_back', 'skipped']
        .map((s) => h('option', { value: s }, s ? s.replace(/_/g, ' ') : 'every state')));
    const devicesEl = h('div', { data: { test: 'rollout-devices' } });
    fill(el,
      h('div', { class: 'page-head' }, h('h1', {}, 'Rollout ', h('span', { class: 'mono' }, id.slice(0, 8)), phase), actions),
      section('Summary', null, summary),
      section('Batches', null, batches),
      section('Devices', stateFilter, devicesEl));

    function draw(r) {
      fill(phase, badge(r.phase));
      fill(summary, dl([
        [r.agent_version ? 'Agent' : 'App', target(r)],
        ['Release', `${r.from_release || 'none'} → ${r.to_release}`],
        ['Selector', h('code', {}, r.selector || '(every device)')],
        ['Progress', counted(r.counts)],
        ['Why', r.reason ? h('span', { class: r.phase === 'succeeded' ? null : 'warn' }, r.reason) : null],
        ['On failure', r.on_failure.replace(/_/g, ' ')],
        ['Approval', r.approval ? 'between batches' : 'not needed'],
        ['Started', [time(r.created_at_ms), ` by ${r.author}`]],
        ['Finished', r.finished_at_ms ? time(r.finished_at_ms) : null],
        ['Id', h('code', {}, r.id)],
      ]));
      fill(batches, table(['Batch', 'Progress', 'Devices'], r.batches.map((b, i) => h('tr', { data: { test: 'batch-row', batch: i } },
        h('td', {}, `${i + 1}${i === 0 && r.batches.length > 1 ? ' (canary)' : ''}`, i === r.current_batch && !FINAL.has(r.phase) ? [' ', badge(r.phase === 'waiting_approval' ? 'waiting_approval' : 'running')] : null),
        h('td', {}, counted(b)),
        h('td', { class: 'num' }, String(b.total))))));
      if (ctx.can('operator')) {
        fill(actions, actionsFor(r.phase).map((a) => button(ACTION_TEXT[a][0], async () => {
          draw(await post(`${base}/${a}`));
          notify(`Rollout ${a === 'rollback' ? 'rolling back' : `${a}${a.endsWith('e') ? 'd' : 'ed'}`}.`, 'ok');
        }, { data: { action: a }, class: a === 'abort' || a === 'rollback' ? 'danger' : a === 'approve' ? 'primary' : null, confirm: ACTION_TEXT[a][1] || undefined, what: `${a} rollout` })));
      }
    }

    async function loadDevices() {
      try {
        const list = await get(`${base}/devices${qs({ state: stateFilter.value, limit: 500 })}`);
        fill(devicesEl, list.length ? table(['Device', 'Batch', 'State', 'Why'], list.map((d) => h('tr', { data: { test: 'rollout-device', device: d.device } },
          h('td', {}, h('a', { href: `#/devices/${enc(d.device)}` }, d.device)),
          h('td', { class: 'num' }, String(d.batch + 1)),
          h('td', {}, badge(d.state)),
          h('td', {}, d.reason || '')))) : h('p', { class: 'muted' }, 'No device in this state.'),
        list.length === 500 ? h('p', { class: 'muted' }, 'The first 500; filter by state to see others.') : null);
      } catch (e) {
        showError(e, 'reading the rollout\'s devices');
      }
    }
    stateFilter.addEventListener('change', loadDevices);

    async function load() {
      try {
        draw(await get(base));
      } catch (e) {
        showError(e, `reading rollout ${id}`);
        if (e.status === 404) fill(summary, h('p', { class: 'warn' }, `No rollout ${id}.`));
        return;
      }
      loadDevices();
    }
    const reloadDevices = throttle(loadDevices, 2000);
    load();
    return {
      snapshot: load,
      changes(list) {
        const mine = list.filter((c) => c.kind === 'rollout' && c.rollout.id === id);
        if (mine.length) {
          draw(mine[mine.length - 1].rollout);
          reloadDevices();
        }
      },
      unmount() { reloadDevices.cancel(); },
    };
  },
};
