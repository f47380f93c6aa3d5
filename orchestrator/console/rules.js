// Rules: the list (enable, disable, delete), a new rule and an edit from
// JSON, one rule with its firings, and the fleet's recent firings, live
// from the change stream (kind `rule_firing`).

import { get, post, put, del, enc, qs } from './api.js';
import {
  h, fill, section, table, badge, dl, ago, button, form, field, showError, notify, loading,
} from './ui.js';

const FIRINGS = 50;

// The README's example: a valid rule to start from.
const TEMPLATE = JSON.stringify({
  name: 'revive-web',
  trigger: { type: 'app_state', app: 'web' },
  selector: 'site=lab',
  condition: "app.containers.exists(c, c.state != 'running')",
  actions: [
    { type: 'start', app: 'web' },
    { type: 'publish', topic: 'alerts/web', payload: { severity: 'warning' } },
  ],
  cooldown_secs: 60,
}, null, 2);

/** The trigger's parameters in words: "app web", "for 300 s", "filter a/#". */
function triggerText(t) {
  const extra = [];
  if (t.app) extra.push(`app ${t.app}`);
  if (t.for_secs) extra.push(`for ${t.for_secs} s`);
  if (t.kinds && t.kinds.length) extra.push(t.kinds.join(', '));
  if (t.filter) extra.push(`filter ${t.filter}`);
  return extra.join('; ');
}

/** One action in a few words: "start web", "publish alerts/web". */
function actionText(a) {
  const what = a.app || a.rollout || a.topic || a.url || (a.key !== undefined ? `${a.key}=${a.value}` : '');
  return `${a.type.replace(/_/g, ' ')}${what ? ` ${what}` : ''}`;
}

const state = (r) => (r.enabled ? 'enabled' : 'disabled');

/** Enable/disable and delete buttons for one rule; `done` runs after a change. */
function ruleControls(r, done) {
  const flip = r.enabled ? 'disable' : 'enable';
  return h('div', { class: 'actions' },
    button(r.enabled ? 'Disable' : 'Enable', async () => {
      const saved = await put(`/api/v1/rules/${enc(r.name)}`, { ...r, enabled: !r.enabled });
      notify(`Rule ${saved.name} ${state(saved)}.`, 'ok');
      done(saved);
    }, { class: 'small', data: { action: flip }, what: `${flip} rule ${r.name}`, 'aria-label': `${r.enabled ? 'Disable' : 'Enable'} rule ${r.name}` }),
    button('Delete', async () => {
      await del(`/api/v1/rules/${enc(r.name)}`);
      notify(`Rule ${r.name} deleted.`, 'ok');
      done(null);
    }, { class: 'small danger', data: { action: 'delete' }, confirm: `Delete rule ${r.name}? Its firings stay.`, what: `delete rule ${r.name}`, 'aria-label': `Delete rule ${r.name}` }));
}

/**
 * A form taking a rule as JSON. A refusal is shown beside the text too,
 * naming the field the server blamed, and the field's key is selected in
 * the text.
 */
function ruleForm(id, label, value, submitText, save) {
  const error = h('p', { class: 'msg msg-error', role: 'alert', data: { test: 'rule-error' }, hidden: true });
  const f = form({ id, 'aria-label': label }, [
    field('Rule (JSON)', { id: `${id}-json`, tag: 'textarea', name: 'json', class: 'tall', value, 'data-field': 'json', spellcheck: 'false' },
      'Triggers, conditions (CEL) and actions: see the README, "Rules", or /api/v1/openapi.json.'),
    error,
    h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary' }, submitText)),
  ], async (v) => {
    error.hidden = true;
    const text = f.elements.json;
    try {
      let rule;
      try {
        rule = JSON.parse(v.json);
      } catch (e) {
        throw new Error(`not valid JSON: ${e.message}`);
      }
      await save(rule);
    } catch (e) {
      error.textContent = e.field ? `${e.field}: ${e.message}` : e.message;
      error.hidden = false;
      text.setAttribute('aria-invalid', 'true');
      // The blamed key (`actions[0].topic` → "topic"), where it first appears.
      const key = e.field && e.field.split(/[.[\]]/).filter((p) => p && !/^\d+$/.test(p)).pop();
      const at = key ? text.value.indexOf(`"${key}"`) : -1;
      text.focus();
      if (at >= 0) text.setSelectionRange(at, at + key.length + 2);
      throw e;
    }
  });
  return f;
}

/** A firing as a table row. */
function firingRow(f) {
  return h('tr', { data: { test: 'firing-row', seq: f.seq, rule: f.rule } },
    h('td', {}, ago(f.at_ms)),
    h('td', {}, h('a', { href: `#/rules/${enc(f.rule)}` }, f.rule),
      f.chain && f.chain.length ? h('span', { class: 'sub' }, `after ${f.chain.join(' → ')}`) : null),
    h('td', {}, f.device ? h('a', { href: `#/devices/${enc(f.device)}` }, f.device) : h('span', { class: 'muted' }, '–')),
    h('td', { class: 'opt' }, f.trigger.replace(/_/g, ' ')),
    h('td', { data: { test: 'outcome' } }, badge(f.outcome), f.detail ? h('span', { class: 'sub' }, f.detail) : null),
    h('td', {}, f.actions.length ? f.actions.map((a) => h('span', { class: 'sub' }, badge(a.ok ? 'ok' : 'failed'), ' ',
      h('span', { class: 'mono' }, a.action.replace(/_/g, ' ')), a.detail ? `: ${a.detail}` : '')) : h('span', { class: 'muted' }, 'none ran')));
}

/**
 * Recent firings (of one rule, or of every rule when `rule` is empty) in a
 * table that live changes prepend to.
 */
function firingsTable(rule) {
  const body = h('tbody');
  const t = table(['When', 'Rule', 'Device', h('th', { class: 'opt', scope: 'col' }, 'Trigger'), 'Outcome', 'Actions'], []);
  t.querySelector('table').replaceChild(body, t.querySelector('tbody'));
  const box = h('div', { data: { test: 'firings' } }, t);
  const seen = new Set();
  const empty = () => fill(body, h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No firings yet.')));
  empty();

  async function load() {
    try {
      const path = rule ? `/api/v1/rules/${enc(rule)}/firings` : '/api/v1/rule-firings';
      const list = await get(`${path}${qs({ limit: FIRINGS })}`);
      seen.clear();
      for (const f of list) seen.add(f.seq);
      if (list.length) fill(body, list.map(firingRow));
      else empty();
    } catch (e) {
      showError(e, 'reading rule firings');
    }
  }
  function changes(list) {
    for (const c of list) {
      if (c.kind !== 'rule_firing' || (rule && c.firing.rule !== rule) || seen.has(c.firing.seq)) continue;
      if (!seen.size) fill(body);
      seen.add(c.firing.seq);
      body.prepend(firingRow(c.firing));
      if (body.children.length > FIRINGS) body.lastElementChild.remove();
    }
  }
  return { el: box, load, changes };
}

export const ruleList = {
  title: 'Rules',
  mount(el, ctx) {
    const operator = ctx.can('operator');
    const list = h('div', {}, loading());
    const firings = firingsTable('');
    fill(el,
      h('div', { class: 'page-head' }, h('h1', {}, 'Rules'),
        operator ? h('a', { id: 'rule-new', class: 'button primary', href: '#/rules/_new' }, 'New rule') : null),
      h('div', { class: 'card' }, list),
      section('Recent firings', null, firings.el));

    async function load() {
      try {
        const rules = await get('/api/v1/rules');
        rules.sort((a, b) => a.name.localeCompare(b.name));
        const headers = ['Rule', 'State', 'Trigger', h('th', { class: 'opt', scope: 'col' }, 'Selector'), 'Condition', 'Actions',
          h('th', { class: 'opt num', scope: 'col' }, 'Cooldown'), operator ? h('th', { scope: 'col' }, h('span', { class: 'muted' }, 'Change')) : null]
          .filter(Boolean);
        fill(list, rules.length ? table(headers, rules.map((r) => h('tr', { data: { test: 'rule-row', rule: r.name } },
          h('td', {}, h('a', { href: `#/rules/${enc(r.name)}` }, r.name)),
          h('td', { data: { test: 'enabled' } }, badge(state(r))),
          h('td', {}, r.trigger.type.replace(/_/g, ' '), triggerText(r.trigger) ? h('span', { class: 'sub mono' }, triggerText(r.trigger)) : null),
          h('td', { class: 'opt mono' }, r.selector || h('span', { class: 'muted' }, r.trigger.type === 'mqtt' ? '–' : 'every device')),
          h('td', { class: 'mono' }, r.condition || h('span', { class: 'muted' }, 'always')),
          h('td', {}, r.actions.map((a) => h('span', { class: 'sub mono' }, actionText(a)))),
          h('td', { class: 'opt num' }, `${r.cooldown_secs} s`),
          operator ? h('td', {}, ruleControls(r, load)) : null))) :
          h('p', { class: 'empty' }, 'No rules yet.', operator ? [' ', h('a', { href: '#/rules/_new' }, 'Define one.')] : null));
      } catch (e) {
        showError(e, 'reading rules');
      }
    }
    const snapshot = () => {
      load();
      firings.load();
    };
    snapshot();
    return { snapshot, changes: firings.changes };
  },
};

export const ruleNew = {
  title: 'New rule',
  mount(el, ctx) {
    const f = ruleForm('rule-form', 'creating the rule', TEMPLATE, 'Create rule', async (rule) => {
      const saved = await post('/api/v1/rules', rule);
      notify(`Rule ${saved.name} created (${state(saved)}).`, 'ok');
      ctx.go(`#/rules/${enc(saved.name)}`);
    });
    fill(el, h('h1', {}, 'New rule'),
      ctx.can('operator') ? null : h('p', { class: 'msg msg-error' }, 'Only operators and admins define rules: the server will refuse this.'),
      h('div', { class: 'card' }, f));
  },
};

export const ruleDetail = {
  title: ([name]) => `Rule ${name}`,
  mount(el, ctx) {
    const [name] = ctx.params;
    const base = `/api/v1/rules/${enc(name)}`;
    const operator = ctx.can('operator');
    const status = h('span', { data: { test: 'rule-state' } });
    const actions = h('div', { class: 'actions' });
    const facts = h('div', {}, loading());
    const spec = h('pre', { class: 'block', data: { test: 'rule-spec' } });
    const firings = firingsTable(name);
    let rule = null;

    const editForm = operator ? ruleForm('rule-edit-form', 'saving the rule', '', 'Save rule', async (body) => {
      draw(await put(base, body));
      editForm.hidden = true;
      notify(`Rule ${name} saved.`, 'ok');
    }) : null;
    if (editForm) editForm.hidden = true;

    fill(el,
      h('div', { class: 'page-head' }, h('h1', {}, 'Rule ', h('span', { class: 'mono' }, name), status), actions),
      editForm,
      h('div', { class: 'grid' }, section('Rule', null, facts), section('As JSON', null, spec)),
      section('Recent firings', null, firings.el));

    function draw(r) {
      rule = r;
      fill(status, badge(state(r)));
      fill(facts, dl([
        ['Trigger', [r.trigger.type.replace(/_/g, ' '), triggerText(r.trigger) ? ` (${triggerText(r.trigger)})` : '']],
        ['Selector', r.trigger.type === 'mqtt' ? null : h('code', {}, r.selector || '(every device)')],
        ['Condition', h('code', {}, r.condition || '(always)')],
        ['Actions', r.actions.map((a) => h('span', { class: 'chip' }, actionText(a)))],
        ['Cooldown', `${r.cooldown_secs} s`],
      ]));
      fill(spec, JSON.stringify(r, null, 2));
      if (operator) {
        fill(actions,
          button('Edit', () => {
            editForm.hidden = !editForm.hidden;
            if (editForm.hidden) return;
            editForm.elements.json.value = JSON.stringify(rule, null, 2);
            editForm.elements.json.focus();
          }, { data: { action: 'edit' }, 'aria-controls': 'rule-edit-form' }),
          ruleControls(r, (saved) => (saved ? draw(saved) : ctx.go('#/rules'))));
      }
    }

    async function load() {
      try {
        draw(await get(base));
      } catch (e) {
        showError(e, `reading rule ${name}`);
        if (e.status === 404) fill(facts, h('p', { class: 'warn' }, `No rule ${name}.`));
      }
    }
    const snapshot = () => {
      load();
      firings.load();
    };
    snapshot();
    return { snapshot, changes: firings.changes };
  },
};
