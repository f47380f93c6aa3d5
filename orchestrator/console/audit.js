// The audit log (admins): who did what, when, with what outcome.

import { get, qs } from './api.js';
import { h, fill, table, badge, time, showError } from './ui.js';

export const audit = {
  title: 'Audit log',
  mount(el, ctx) {
    const actor = h('input', { id: 'audit-actor', name: 'actor', type: 'search', value: ctx.query.get('actor') || '', placeholder: 'token name' });
    const outcome = h('select', { id: 'audit-outcome', name: 'outcome' },
      [['', 'any outcome'], ['ok', 'ok'], ['denied', 'denied'], ['failed', 'failed']]
        .map(([v, t]) => h('option', { value: v, selected: v === (ctx.query.get('outcome') || '') }, t)));
    const limit = h('select', { id: 'audit-limit', name: 'limit' }, ['100', '500', '2000'].map((n) => h('option', { value: n }, n)));
    const filter = h('form', { id: 'audit-filter', class: 'inline card', role: 'search', 'aria-label': 'Filter the audit log' },
      h('div', { class: 'field' }, h('label', { for: 'audit-actor' }, 'Who'), actor),
      h('div', { class: 'field' }, h('label', { for: 'audit-outcome' }, 'Outcome'), outcome),
      h('div', { class: 'field' }, h('label', { for: 'audit-limit' }, 'Newest'), limit),
      h('button', { type: 'submit', class: 'primary' }, 'Apply'));
    const list = h('div');
    fill(el, h('h1', {}, 'Audit log'), filter, h('div', { class: 'card' }, list));

    async function load() {
      try {
        const entries = await get(`/api/v1/audit${qs({ actor: actor.value.trim(), outcome: outcome.value, limit: limit.value })}`);
        fill(list, entries.length ? table(['When', 'Who', 'What', 'Outcome', 'Detail'], entries.map((e) => h('tr', { data: { test: 'audit-row' } },
          h('td', {}, time(e.at_ms)),
          h('td', {}, e.actor, e.role ? h('span', { class: 'sub' }, e.role) : null),
          h('td', {}, h('span', { class: 'mono' }, e.action), e.command ? h('span', { class: 'sub' }, e.command) : null),
          h('td', {}, badge(e.outcome), e.status ? h('span', { class: 'sub' }, String(e.status)) : null),
          h('td', {}, e.detail || '')))) : h('p', { class: 'empty' }, 'Nothing recorded that matches.'));
      } catch (e) {
        showError(e, 'reading the audit log');
      }
    }
    filter.addEventListener('submit', (ev) => {
      ev.preventDefault();
      ctx.setQuery({ actor: actor.value.trim(), outcome: outcome.value });
      load();
    });
    outcome.addEventListener('change', () => filter.requestSubmit());
    load();
    return { snapshot: load };
  },
};
