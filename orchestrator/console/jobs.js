// Edge jobs: the list, a new job, and one job's live progress per device
// with its exit code and output tail.

import { get, post, enc } from './api.js';
import { h, fill, section, table, badge, dl, ago, time, throttle, button, form, field, showError, notify, loading, progress } from './ui.js';

function counted(c) {
  const done = c.succeeded + c.failed + c.timed_out + c.cancelled + c.expired;
  const extra = [c.running && `${c.running} running`, c.pending + c.dispatched && `${c.pending + c.dispatched} pending`,
    c.failed && `${c.failed} failed`, c.timed_out && `${c.timed_out} timed out`, c.cancelled && `${c.cancelled} cancelled`,
    c.expired && `${c.expired} expired`].filter(Boolean).join(', ');
  return progress(done, c.total, `${c.succeeded}/${c.total} succeeded${extra ? `, ${extra}` : ''}`, 'job-counts');
}

const commandText = (cmd) => (cmd.length ? cmd.join(' ') : '(the image\'s own)');

function jobRow(j) {
  return h('tr', { data: { test: 'job-row', job: j.id } },
    h('td', {}, h('a', { href: `#/jobs/${enc(j.id)}`, class: 'mono' }, j.id.slice(0, 8)), h('span', { class: 'sub' }, ago(j.created_at_ms))),
    h('td', {}, h('span', { class: 'mono' }, j.image), h('span', { class: 'sub mono' }, commandText(j.command))),
    h('td', { data: { test: 'job-phase' } }, badge(j.phase)),
    h('td', {}, counted(j.counts)),
    h('td', { class: 'opt mono' }, j.selector || '(every device)'),
    h('td', { class: 'opt' }, j.created_by));
}

export const jobList = {
  title: 'Jobs',
  mount(el, ctx) {
    const body = h('tbody');
    const t = table(['Job', 'Image and command', 'Phase', 'Progress', h('th', { class: 'opt', scope: 'col' }, 'Selector'),
      h('th', { class: 'opt', scope: 'col' }, 'By')], []);
    t.querySelector('table').replaceChild(body, t.querySelector('tbody'));
    fill(el, h('div', { class: 'page-head' }, h('h1', {}, 'Jobs'),
      ctx.can('operator') ? h('a', { id: 'job-new', class: 'button primary', href: '#/jobs/_new' }, 'New job') : null),
    h('div', { class: 'card' }, t));

    let rows = new Map();
    async function load() {
      try {
        const list = await get('/api/v1/jobs');
        rows = new Map(list.map((j) => [j.id, jobRow(j)]));
        fill(body, list.length ? [...rows.values()] : h('tr', {}, h('td', { colspan: 6, class: 'empty' }, 'No jobs.')));
      } catch (e) {
        showError(e, 'reading jobs');
      }
    }
    load();
    return {
      snapshot: load,
      changes(list) {
        for (const c of list) {
          if (c.kind !== 'job') continue;
          const row = jobRow(c.job);
          if (rows.has(c.job.id)) rows.get(c.job.id).replaceWith(row);
          else {
            if (!rows.size) fill(body);
            body.prepend(row);
          }
          rows.set(c.job.id, row);
        }
      },
    };
  },
};

/** The command field: a JSON array if it starts with '[', else words split on spaces. */
function parseCommand(text) {
  const s = text.trim();
  if (!s) return [];
  if (s.startsWith('[')) {
    let v;
    try {
      v = JSON.parse(s);
    } catch (e) {
      throw Object.assign(new Error(`not a JSON array: ${e.message}`), { field: 'command' });
    }
    if (!Array.isArray(v) || v.some((a) => typeof a !== 'string')) {
      throw Object.assign(new Error('must be a JSON array of strings'), { field: 'command' });
    }
    return v;
  }
  return s.split(/\s+/);
}

/** K=V per line into an object; blank lines skipped. */
function parseEnv(text) {
  const env = {};
  for (const [i, raw] of text.split('\n').entries()) {
    const line = raw.trim();
    if (!line) continue;
    const at = line.indexOf('=');
    if (at < 1) throw Object.assign(new Error(`line ${i + 1}: NAME=value expected`), { field: 'env' });
    env[line.slice(0, at)] = line.slice(at + 1);
  }
  return env;
}

export const jobNew = {
  title: 'New job',
  mount(el, ctx) {
    const f = form({ id: 'job-form', 'aria-label': 'creating the job' }, [
      h('div', { class: 'form-cols' },
        field('Selector', { id: 'job-selector', name: 'selector', class: 'mono', placeholder: 'empty: every device' }),
        field('Image', { id: 'job-image', name: 'image', class: 'mono', required: true, placeholder: 'registry/repo:tag' }),
        field('Timeout (s)', { id: 'job-timeout', name: 'timeout_secs', type: 'number', min: 1, value: '300' }),
        field('Concurrency', { id: 'job-concurrency', name: 'concurrency', type: 'number', min: 1, placeholder: 'every device at once' })),
      field('Command', { id: 'job-command', name: 'command', class: 'mono', placeholder: 'sh -c "…" as ["sh", "-c", "…"]' },
        'Words split on spaces, or a JSON array of strings if it starts with [. Empty: the image\'s own.'),
      field('Environment', { id: 'job-env', name: 'env', tag: 'textarea', class: 'mono', placeholder: 'NAME=value, one a line' },
        'Values are not shown again: only the names are kept in the job\'s view.'),
      h('button', { id: 'job-submit', type: 'submit', class: 'primary' }, 'Run job'),
    ], async (v) => {
      for (const old of f.querySelectorAll('[data-test=job-error]')) old.remove();
      try {
        await submit(v);
      } catch (e) {
        // The server's reason beside the field it names (the form marks it too).
        const name = e && e.field && e.field.split(/[.[]/)[0];
        const input = name && f.querySelector(`[data-field="${CSS.escape(name)}"]`);
        if (input) input.closest('.field').append(h('small', { class: 'warn', role: 'alert', data: { test: 'job-error', field: name } }, e.message));
        throw e;
      }
    });
    async function submit(v) {
      const body = {
        selector: v.selector.trim(),
        image: v.image.trim(),
        command: parseCommand(v.command),
        env: parseEnv(v.env),
        timeout_secs: Number(v.timeout_secs),
      };
      if (v.concurrency.trim()) body.concurrency = Number(v.concurrency);
      const j = await post('/api/v1/jobs', body);
      notify(`Job ${j.id.slice(0, 8)} sent to ${j.counts.total} device${j.counts.total === 1 ? '' : 's'}.`, 'ok');
      ctx.go(`#/jobs/${enc(j.id)}`);
    }
    fill(el, h('h1', {}, 'New job'),
      ctx.can('operator') ? null : h('p', { class: 'msg msg-error' }, 'Only operators and admins run jobs: the server will refuse this.'),
      h('div', { class: 'card' }, ctx.can('operator') ? f : null));
  },
};

function deviceRow(d) {
  return h('tr', { data: { test: 'job-device', device: d.device, state: d.state } },
    h('td', {}, h('a', { href: `#/devices/${enc(d.device)}` }, d.device)),
    h('td', { data: { test: 'state' } }, badge(d.state), d.error ? h('span', { class: 'sub warn', data: { test: 'error' } }, d.error) : null),
    h('td', { class: 'num', data: { test: 'exit-code' } }, d.exit_code === undefined || d.exit_code === null ? '–' : String(d.exit_code)),
    h('td', {}, d.started_at_ms ? time(d.started_at_ms) : '–', h('span', { class: 'sub' }, d.finished_at_ms ? time(d.finished_at_ms) : '')),
    h('td', {}, h('pre', { class: 'block', data: { test: 'output-tail' } }, d.output_tail || '')));
}

export const jobDetail = {
  title: ([id]) => `Job ${id.slice(0, 8)}`,
  mount(el, ctx) {
    const [id] = ctx.params;
    const base = `/api/v1/jobs/${enc(id)}`;
    const phase = h('span', { data: { test: 'job-phase' } });
    const actions = h('div', { class: 'actions' });
    const summary = h('div', {}, loading());
    const devicesEl = h('div', { data: { test: 'job-devices' } });
    fill(el,
      h('div', { class: 'page-head' }, h('h1', {}, 'Job ', h('span', { class: 'mono' }, id.slice(0, 8)), phase), actions),
      section('Spec', null, summary),
      section('Devices', null, devicesEl));

    function draw(j) {
      fill(phase, badge(j.phase));
      fill(summary, dl([
        ['Image', h('code', {}, j.image)],
        ['Command', h('code', { data: { test: 'job-command' } }, commandText(j.command))],
        ['Environment', j.env_names.length ? h('code', {}, j.env_names.join(', ')) : null],
        ['Selector', h('code', {}, j.selector || '(every device)')],
        ['Progress', counted(j.counts)],
        ['Timeout', `${j.timeout_secs} s`],
        ['Concurrency', String(j.concurrency)],
        ['Started', [time(j.created_at_ms), ` by ${j.created_by}`]],
        ['Finished', j.finished_at_ms ? time(j.finished_at_ms) : null],
        ['Expires', j.phase === 'running' ? time(j.expires_at_ms) : null],
        ['Id', h('code', {}, j.id)],
      ]));
      fill(actions, ctx.can('operator') && j.phase === 'running'
        ? button('Cancel', async () => {
          draw(await post(`${base}/cancel`));
          notify('Job cancelled.', 'ok');
        }, { id: 'job-cancel', class: 'danger', confirm: 'Cancel this job? Running containers are killed; devices not sent it yet never run it.', what: 'cancel job' })
        : null);
      if (j.devices && j.devices.length) {
        fill(devicesEl, table(['Device', 'State', 'Exit code', 'Started / finished', 'Output'], j.devices.map(deviceRow)));
      }
    }

    async function load() {
      try {
        draw(await get(base));
      } catch (e) {
        showError(e, `reading job ${id}`);
        if (e.status === 404) fill(summary, h('p', { class: 'warn' }, `No job ${id}.`));
      }
    }
    // A `job` change carries the counts without the devices: read the job
    // again for them, at most every second.
    const reload = throttle(load, 1000);
    load();
    return {
      snapshot: load,
      changes(list) {
        if (list.some((c) => c.kind === 'job' && c.job.id === id)) reload();
      },
      unmount() { reload.cancel(); },
    };
  },
};
