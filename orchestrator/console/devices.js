// Devices: filtered and paged by the server (?status=&q=&selector=&offset=&limit=,
// the total in X-Total-Count), so 10,000 devices cost one page of rows.
// Live changes touch only the rows on screen: anything that may change the
// page (a device going online or offline, a new device, a state report)
// re-reads the page at most every two seconds. Telemetry is not on the
// console's feed (10,000 devices send ~1,000 samples a second): the CPU and
// memory cells come from re-reading the page every 10 s, the agents'
// telemetry period, while the tab is visible.

import { getPage, qs } from './api.js';
import { h, fill, badge, labelChips, ago, percent, bytes, throttle, showError, table } from './ui.js';

const SIZES = ['25', '50', '100', '200'];

/** "2 running, 1 failed" from a device's observed apps. */
export function appSummary(d) {
  const apps = (d.observed && d.observed.apps) || [];
  const wanted = (d.desired && d.desired.apps) || [];
  if (!apps.length && !wanted.length) return h('span', { class: 'muted' }, 'none');
  const byPhase = {};
  for (const a of apps) byPhase[a.phase] = (byPhase[a.phase] || 0) + 1;
  const parts = Object.entries(byPhase).map(([phase, n]) => h('span', {}, `${n} `, badge(phase)));
  const missing = wanted.filter((w) => !apps.some((a) => a.name === w.spec.name)).length;
  if (missing) parts.push(h('span', {}, `${missing} `, badge('pending')));
  return h('span', { class: 'chips' }, parts);
}

function memText(host) {
  return host && host.memory_total_bytes ? `${bytes(host.memory_used_bytes)} / ${bytes(host.memory_total_bytes)}` : '–';
}

export const devices = {
  title: 'Devices',
  mount(el, ctx) {
    // The filters live in the address (#/devices?status=online&q=pi&page=2).
    const state = {
      status: ctx.query.get('status') || '',
      q: ctx.query.get('q') || '',
      selector: ctx.query.get('selector') || '',
      page: Math.max(1, Number(ctx.query.get('page')) || 1),
      size: SIZES.includes(ctx.query.get('size')) ? ctx.query.get('size') : '50',
    };
    const status = h('select', { id: 'device-status', name: 'status' },
      [['', 'All'], ['online', 'Online'], ['offline', 'Offline']].map(([v, t]) => h('option', { value: v, selected: v === state.status }, t)));
    const text = h('input', { id: 'device-q', name: 'q', type: 'search', value: state.q, placeholder: 'id or hostname', maxlength: 256 });
    const selector = h('input', { id: 'device-selector', name: 'selector', value: state.selector, placeholder: 'env=prod,region in (eu,us)', class: 'mono' });
    const size = h('select', { id: 'device-size', name: 'size' }, SIZES.map((s) => h('option', { value: s, selected: s === state.size }, s)));
    const filter = h('form', { id: 'device-filter', class: 'inline card', role: 'search', 'aria-label': 'Filter devices' },
      h('div', { class: 'field' }, h('label', { for: 'device-status' }, 'Status'), status),
      h('div', { class: 'field' }, h('label', { for: 'device-q' }, 'Search'), text),
      h('div', { class: 'field' }, h('label', { for: 'device-selector' }, 'Label selector'), selector),
      h('div', { class: 'field' }, h('label', { for: 'device-size' }, 'Per page'), size),
      h('button', { type: 'submit', class: 'primary' }, 'Apply'));
    const total = h('span', { class: 'muted', data: { test: 'device-total' }, role: 'status' });
    const body = h('tbody');
    const prev = h('button', { id: 'device-prev', type: 'button' }, '← Previous');
    const next = h('button', { id: 'device-next', type: 'button' }, 'Next →');
    const pageInfo = h('span', { class: 'muted' });
    const headers = ['Device', 'Status', 'Labels', 'Apps', h('th', { class: 'num', scope: 'col' }, 'CPU'),
      h('th', { class: 'num opt', scope: 'col' }, 'Memory'), h('th', { class: 'opt', scope: 'col' }, 'Last seen'), h('th', { class: 'opt', scope: 'col' }, 'Arch / agent')];
    const t = table(headers, [], { 'aria-label': 'Devices' });
    t.querySelector('table').replaceChild(body, t.querySelector('tbody'));
    fill(el, h('div', { class: 'page-head' }, h('h1', {}, 'Devices'), total), filter,
      h('div', { class: 'card' }, t, h('div', { class: 'pager' }, prev, pageInfo, next)));

    let shown = new Map(); // device id → its <tr>
    let lastTotal = 0;
    let seq = 0; // answers to older requests are dropped

    function row(d) {
      const host = d.telemetry && d.telemetry.host;
      const inv = d.inventory || {};
      return h('tr', { data: { test: 'device-row', device: d.id } },
        h('td', {}, h('a', { href: `#/devices/${encodeURIComponent(d.id)}` }, d.id),
          inv.hostname && inv.hostname !== d.id ? h('span', { class: 'sub' }, inv.hostname) : null),
        h('td', { data: { test: 'status' } }, badge(d.online ? 'online' : 'offline')),
        h('td', {}, labelChips(d.labels, 4)),
        h('td', {}, appSummary(d)),
        h('td', { class: 'num', data: { test: 'cpu' } }, host ? percent(host.cpu_percent) : '–'),
        h('td', { class: 'num opt', data: { test: 'memory' } }, memText(host)),
        h('td', { class: 'opt' }, ago(d.last_seen_ms)),
        h('td', { class: 'opt' }, [d.platform || inv.arch, inv.agent_version].filter(Boolean).join(' · ') || '–'));
    }

    async function load() {
      const mine = ++seq;
      const offset = (state.page - 1) * Number(state.size);
      const path = `/api/v1/devices${qs({ status: state.status, q: state.q, selector: state.selector, offset, limit: state.size })}`;
      let page;
      try {
        page = await getPage(path);
      } catch (e) {
        if (mine === seq) showError(e, 'reading devices');
        return;
      }
      if (mine !== seq) return;
      lastTotal = page.total;
      const pages = Math.max(1, Math.ceil(page.total / Number(state.size)));
      if (state.page > pages && page.total > 0) {
        // The list shrank under us: show its last page.
        state.page = pages;
        load();
        return;
      }
      // Keep keyboard focus on the same device's link across a redraw.
      const focused = document.activeElement && document.activeElement.closest('tr[data-device]');
      const focusedId = focused && body.contains(focused) ? focused.dataset.device : null;
      shown = new Map(page.items.map((d) => [d.id, row(d)]));
      fill(body, shown.size ? [...shown.values()] :
        h('tr', {}, h('td', { colspan: 8, class: 'empty' }, page.total ? 'No devices on this page.' : 'No device matches these filters.')));
      if (focusedId && shown.has(focusedId)) shown.get(focusedId).querySelector('a').focus();
      const first = page.total ? offset + 1 : 0;
      total.textContent = `${page.total.toLocaleString()} device${page.total === 1 ? '' : 's'}` +
        (page.total ? ` · showing ${first}–${offset + page.items.length}` : '');
      pageInfo.textContent = `Page ${state.page} of ${pages}`;
      prev.disabled = state.page <= 1;
      next.disabled = state.page >= pages;
    }

    function apply() {
      ctx.setQuery({ status: state.status, q: state.q, selector: state.selector,
        page: state.page > 1 ? state.page : '', size: state.size !== '50' ? state.size : '' });
      load();
    }

    filter.addEventListener('submit', (ev) => {
      ev.preventDefault();
      Object.assign(state, { status: status.value, q: text.value.trim(), selector: selector.value.trim(), size: size.value, page: 1 });
      apply();
    });
    status.addEventListener('change', () => filter.requestSubmit());
    size.addEventListener('change', () => filter.requestSubmit());
    // Search as you type, once typing pauses.
    let typing = null;
    text.addEventListener('input', () => {
      clearTimeout(typing);
      typing = setTimeout(() => filter.requestSubmit(), 300);
    });
    prev.addEventListener('click', () => { state.page -= 1; apply(); });
    next.addEventListener('click', () => { state.page += 1; apply(); });

    const reload = throttle(load, 2000);
    load();
    const refresh = setInterval(() => {
      if (document.visibilityState === 'visible') reload();
    }, 10000);

    return {
      snapshot: load,
      query(q) {
        Object.assign(state, { status: q.get('status') || '', q: q.get('q') || '', selector: q.get('selector') || '', page: Math.max(1, Number(q.get('page')) || 1) });
        status.value = state.status;
        text.value = state.q;
        selector.value = state.selector;
        load();
      },
      changes(list) {
        for (const c of list) {
          const tr = c.device && shown.get(c.device);
          if (c.kind === 'device') {
            if (tr) fill(tr.querySelector('[data-test=status]'), badge(c.online ? 'online' : 'offline'));
            // Counts and a status filter may change with it.
            reload();
          } else if (c.kind === 'inventory' && !tr && lastTotal < state.page * Number(state.size)) {
            reload(); // maybe a new device that belongs on this (last) page
          } else if ((c.kind === 'state' || c.kind === 'inventory') && tr) {
            reload();
          }
        }
      },
      unmount() {
        reload.cancel();
        clearInterval(refresh);
        clearTimeout(typing);
      },
    };
  },
};
