// Overview: device counts, rollouts in progress, recent failed operations
// and the newest device events.

import { get, getPage } from './api.js';
import { h, fill, section, table, badge, progress, ago, throttle, showError, loading } from './ui.js';

const FINAL = new Set(['succeeded', 'failed', 'rolled_back', 'aborted', 'superseded']);

export const overview = {
  title: 'Overview',
  mount(el, ctx) {
    const counts = h('div', { class: 'stats' }, loading());
    const rollouts = h('div', { data: { test: 'rollouts-active' } }, loading());
    const failed = h('div', { data: { test: 'failed-ops' } }, loading());
    const events = h('div', { data: { test: 'recent-events' } }, loading());
    fill(el,
      h('h1', {}, 'Overview'),
      counts,
      h('div', { class: 'grid' },
        section('Rollouts in progress', h('a', { href: '#/rollouts' }, 'All rollouts'), rollouts),
        section('Recent failed operations', h('a', { href: '#/operations' }, 'All operations'), failed),
        section('Recent device events', null, events)));

    let seeded = []; // events from the devices' own recent lists

    async function loadCounts() {
      const [all, online, apps] = await Promise.all([
        getPage('/api/v1/devices?limit=1'),
        getPage('/api/v1/devices?limit=1&status=online'),
        get('/api/v1/apps'),
      ]);
      const stat = (n, label, href, kind, test) =>
        h('a', { class: `stat ${kind}`, href, data: { test } }, h('strong', {}, n.toLocaleString()), h('span', {}, label));
      fill(counts,
        stat(all.total, 'devices', '#/devices', '', 'count-total'),
        stat(online.total, 'online', '#/devices?status=online', 'good', 'count-online'),
        stat(all.total - online.total, 'offline', '#/devices?status=offline', all.total > online.total ? 'bad' : '', 'count-offline'),
        stat(apps.length, 'apps', '#/apps', '', 'count-apps'));
    }

    let active = new Map();
    function drawRollouts() {
      const list = [...active.values()].sort((a, b) => b.created_at_ms - a.created_at_ms);
      fill(rollouts, list.length ? table(['Rollout', 'Phase', 'Progress'], list.map((r) => h('tr', { data: { test: 'rollout-row', rollout: r.id } },
        h('td', {}, h('a', { href: `#/rollouts/${encodeURIComponent(r.id)}` }, `${r.app} → release ${r.to_release}`),
          h('span', { class: 'sub' }, `batch ${Math.min(r.current_batch + 1, r.batches.length)} of ${r.batches.length}`)),
        h('td', {}, badge(r.phase)),
        h('td', {}, progress(r.counts.updated, r.counts.total - r.counts.skipped,
          `${r.counts.updated}/${r.counts.total - r.counts.skipped} updated${r.counts.failed ? `, ${r.counts.failed} failed` : ''}`))))) :
        h('p', { class: 'muted' }, 'No rollout is running.'));
    }
    async function loadRollouts() {
      const list = await get('/api/v1/rollouts');
      active = new Map(list.filter((r) => !FINAL.has(r.phase)).map((r) => [r.id, r]));
      drawRollouts();
    }

    let failedOps = [];
    function drawFailed() {
      fill(failed, failedOps.length ? table(['When', 'Device', 'Operation', 'Why'], failedOps.slice(0, 10).map((o) => h('tr', { data: { test: 'op-row', op: o.id } },
        h('td', {}, ago(o.updated_at_ms)),
        h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(o.device)}` }, o.device)),
        h('td', {}, `${o.op} ${o.app}`),
        h('td', {}, o.detail || '')))) :
        h('p', { class: 'muted' }, 'No failed operation among the latest 500.'));
    }
    async function loadFailed() {
      const ops = await get('/api/v1/operations?limit=500');
      failedOps = ops.filter((o) => o.status === 'failed');
      drawFailed();
    }

    function drawEvents() {
      const seen = new Set();
      const list = [...ctx.recentEvents, ...seeded]
        .filter((e) => {
          const key = `${e.device}|${e.at_ms}|${e.kind}|${e.detail}`;
          if (seen.has(key)) return false;
          seen.add(key);
          return true;
        })
        .sort((a, b) => b.at_ms - a.at_ms)
        .slice(0, 15);
      fill(events, list.length ? table(['When', 'Device', 'Event'], list.map((e) => h('tr', {},
        h('td', {}, ago(e.at_ms)),
        h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(e.device)}` }, e.device)),
        h('td', {}, badge(e.kind), ' ', [e.app, e.container].filter(Boolean).join('/'), ' ', h('span', { class: 'sub' }, e.detail || ''))))) :
        h('p', { class: 'muted' }, 'No device event yet.'));
    }
    async function loadEvents() {
      // The first devices' own latest events; the stream adds newer ones.
      const page = await getPage('/api/v1/devices?limit=50');
      seeded = page.items.flatMap((d) => (d.recent_events || []).map((e) => ({ device: d.id, ...e })));
      drawEvents();
    }

    const failures = (what) => (e) => showError(e, what);
    function snapshot() {
      loadCounts().catch(failures('reading device counts'));
      loadRollouts().catch(failures('reading rollouts'));
      loadFailed().catch(failures('reading operations'));
      loadEvents().catch(failures('reading device events'));
    }
    const refreshCounts = throttle(() => loadCounts().catch(failures('reading device counts')), 3000);
    snapshot();

    return {
      snapshot,
      changes(list) {
        let events = false;
        for (const c of list) {
          if (c.kind === 'device' || (c.kind === 'inventory')) refreshCounts();
          else if (c.kind === 'app') refreshCounts();
          else if (c.kind === 'rollout') {
            if (FINAL.has(c.rollout.phase)) active.delete(c.rollout.id);
            else active.set(c.rollout.id, c.rollout);
            drawRollouts();
          } else if (c.kind === 'operation' && c.operation.status === 'failed') {
            failedOps = [c.operation, ...failedOps.filter((o) => o.id !== c.operation.id)];
            drawFailed();
          } else if (c.kind === 'event') events = true;
        }
        if (events) drawEvents();
      },
      unmount() {
        refreshCounts.cancel();
      },
    };
  },
};
