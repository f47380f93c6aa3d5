// Operations: every deploy, start, stop, restart, pause, unpause and remove, newest
// first, with their outcome; live as they move on.

import { get, enc, qs } from './api.js';
import { h, fill, table, badge, ago, showError } from './ui.js';

function opRow(o) {
  const p = o.progress;
  const pct = p && p.total_bytes ? ` ${Math.round((100 * p.current_bytes) / p.total_bytes)} %` : '';
  return h('tr', { data: { test: 'op-row', op: o.id } },
    h('td', {}, ago(o.created_at_ms)),
    h('td', {}, h('a', { href: `#/devices/${enc(o.device)}` }, o.device)),
    h('td', {}, h('a', { href: `#/apps/${enc(o.app)}` }, o.app)),
    h('td', {}, o.op),
    h('td', { data: { test: 'status' } }, badge(o.status)),
    h('td', {}, o.detail || '', p ? h('span', { class: 'sub' }, `${p.step} ${p.container}${pct}`) : null),
    h('td', { class: 'opt num' }, String(o.generation)),
    h('td', { class: 'opt mono' }, o.id.slice(0, 8)));
}

export const operations = {
  title: 'Operations',
  mount(el, ctx) {
    const device = h('input', { id: 'ops-device', name: 'device', type: 'search', class: 'mono', value: ctx.query.get('device') || '', placeholder: 'every device' });
    const status = h('select', { id: 'ops-status', name: 'status' },
      ['', 'pending', 'sent', 'received', 'in_progress', 'succeeded', 'failed', 'superseded']
        .map((s) => h('option', { value: s, selected: s === (ctx.query.get('status') || '') }, s ? s.replace(/_/g, ' ') : 'every status')));
    const limit = h('select', { id: 'ops-limit', name: 'limit' }, ['50', '100', '500', '1000'].map((n) => h('option', { value: n }, n)));
    const filter = h('form', { id: 'ops-filter', class: 'inline card', role: 'search', 'aria-label': 'Filter operations' },
      h('div', { class: 'field' }, h('label', { for: 'ops-device' }, 'Device'), device),
      h('div', { class: 'field' }, h('label', { for: 'ops-status' }, 'Status'), status),
      h('div', { class: 'field' }, h('label', { for: 'ops-limit' }, 'Newest'), limit),
      h('button', { type: 'submit', class: 'primary' }, 'Apply'));
    const body = h('tbody');
    const t = table(['When', 'Device', 'App', 'Operation', 'Status', 'Detail', h('th', { class: 'opt num', scope: 'col' }, 'Gen.'), h('th', { class: 'opt', scope: 'col' }, 'Id')], []);
    t.querySelector('table').replaceChild(body, t.querySelector('tbody'));
    fill(el, h('h1', {}, 'Operations'), filter, h('div', { class: 'card' }, t));

    let rows = new Map();
    const wanted = (o) => (!device.value.trim() || o.device === device.value.trim()) && (!status.value || o.status === status.value);

    async function load() {
      try {
        // The status filter is applied here: the API filters by device only.
        const list = (await get(`/api/v1/operations${qs({ device: device.value.trim(), limit: limit.value })}`)).filter(wanted);
        rows = new Map(list.map((o) => [o.id, opRow(o)]));
        fill(body, list.length ? [...rows.values()] : h('tr', {}, h('td', { colspan: 8, class: 'empty' }, 'No operations.')));
      } catch (e) {
        showError(e, 'reading operations');
      }
    }
    filter.addEventListener('submit', (ev) => {
      ev.preventDefault();
      ctx.setQuery({ device: device.value.trim(), status: status.value });
      load();
    });
    status.addEventListener('change', () => filter.requestSubmit());
    load();
    return {
      snapshot: load,
      changes(list) {
        for (const c of list) {
          if (c.kind !== 'operation') continue;
          const o = c.operation;
          const old = rows.get(o.id);
          if (!wanted(o)) {
            if (old) {
              old.remove();
              rows.delete(o.id);
            }
            continue;
          }
          const row = opRow(o);
          if (old) old.replaceWith(row);
          else {
            if (!rows.size) fill(body);
            body.prepend(row);
            if (rows.size >= Number(limit.value)) body.lastElementChild.remove();
          }
          rows.set(o.id, row);
        }
      },
    };
  },
};
