// One device: inventory, labels, apps with their containers and actions,
// telemetry charts, a live log tail, its operations and events.

import { get, post, patch, del, enc, qs } from './api.js';
import {
  h, fill, section, table, badge, dl, ago, time, bytes, percent, throttle,
  button, form, field, showError, notify, loading,
} from './ui.js';
import { lineChart } from './chart.js';

const RANGES = [['900000', 'Last 15 minutes'], ['3600000', 'Last hour'], ['21600000', 'Last 6 hours'], ['86400000', 'Last 24 hours']];
const MAX_LOG_LINES = 2000;

/** The actions that make sense for an app in run state `run`. */
function actionsFor(run) {
  if (run === 'running') return ['stop', 'restart', 'pause', 'remove'];
  if (run === 'paused') return ['unpause', 'stop', 'remove'];
  return ['start', 'remove'];
}

export const device = {
  title: ([id]) => id,
  mount(el, ctx) {
    const [id] = ctx.params;
    const base = `/api/v1/devices/${enc(id)}`;
    const operator = ctx.can('operator');

    // ----- layout: static parts are built once, live parts redrawn ------------------
    const statusEl = h('span', { data: { test: 'device-status' } });
    const headActions = h('div', { class: 'actions' });
    const inventory = h('div', { data: { test: 'inventory' } }, loading());
    const labels = h('div', { data: { test: 'labels' } });
    const apps = h('div', { data: { test: 'apps' } });
    const opResult = h('p', { data: { test: 'op-result' }, role: 'status', 'aria-live': 'polite' });
    const ops = h('div', { data: { test: 'operations' } });
    const events = h('div', { data: { test: 'events' } });
    const deploySelect = h('select', { id: 'deploy-app', name: 'app', required: true, 'data-field': 'app' });

    const labelForm = operator ? form({ id: 'label-form', class: 'inline', 'aria-label': 'setting a label' }, [
      field('Key', { name: 'key', required: true, placeholder: 'env', class: 'mono' }),
      field('Value', { name: 'value', placeholder: 'prod', class: 'mono' }),
      h('button', { type: 'submit' }, 'Set label'),
    ], async (v, f) => {
      const dev = await patch(`${base}/labels`, { set: { [v.key.trim()]: v.value.trim() } });
      f.reset();
      draw(dev);
    }) : null;

    const deployForm = operator ? form({ id: 'deploy-form', class: 'inline', 'aria-label': 'deploying' }, [
      h('div', { class: 'field' }, h('label', { for: 'deploy-app' }, 'App'), deploySelect),
      h('button', { id: 'deploy-submit', type: 'submit', class: 'primary' }, 'Deploy'),
    ], async (v) => {
      const op = await post(`${base}/apps`, { app: v.app });
      follow(op);
    }) : null;

    // Charts
    const range = h('select', { id: 'chart-range', 'aria-label': 'Time range' }, RANGES.map(([v, t]) => h('option', { value: v, selected: v === '3600000' }, t)));
    const charts = {
      cpu: lineChart({ title: 'CPU', format: (v) => percent(v), max: 100, test: 'chart-cpu' }),
      memory: lineChart({ title: 'Memory', format: bytes, test: 'chart-memory' }),
      disk: lineChart({ title: 'Disk', format: bytes, test: 'chart-disk' }),
    };
    const chartNote = h('p', { class: 'muted' });
    const containerMetrics = h('div', { data: { test: 'container-metrics' } });

    // Logs
    const logApp = h('select', { id: 'log-app', 'aria-label': 'App' });
    const logContainer = h('select', { id: 'log-container', 'aria-label': 'Container' });
    const logFollow = h('input', { id: 'log-follow', type: 'checkbox', checked: true });
    const logPre = h('pre', { id: 'log-tail', class: 'block logs', data: { test: 'log-tail' }, tabindex: '0', 'aria-label': 'Log lines', 'aria-live': 'off' });

    fill(el,
      h('div', { class: 'page-head' }, h('h1', {}, h('span', { class: 'mono' }, id), statusEl), headActions),
      h('div', { class: 'grid' },
        section('Inventory', null, inventory),
        section('Labels', null, labels, labelForm,
          operator ? h('small', { class: 'muted' }, 'Labels you set win over the device\'s own on the same key.') : null)),
      section('Apps', null, apps, deployForm, opResult),
      section('Telemetry', range, h('div', { class: 'charts' }, charts.cpu.el, charts.memory.el, charts.disk.el), chartNote, containerMetrics),
      section('Logs', h('div', { class: 'actions' }, logApp, logContainer,
        h('label', {}, logFollow, ' Follow'), button('Reload', () => loadLogs())), logPre),
      h('div', { class: 'grid' },
        section('Operations', h('a', { href: `#/operations?device=${enc(id)}` }, 'All'), ops),
        section('Events', null, events)));

    let dev = null;

    // ----- device, inventory, labels, apps ------------------------------------------
    function draw(d) {
      dev = d;
      fill(statusEl, badge(d.online ? 'online' : 'offline'));
      const inv = d.inventory || {};
      const tel = d.telemetry && d.telemetry.host;
      const obs = d.observed || {};
      fill(inventory, dl([
        ['Hostname', inv.hostname],
        ['Last seen', ago(d.last_seen_ms)],
        ['First seen', time(d.first_seen_ms)],
        ['OS', [inv.os, inv.kernel].filter(Boolean).join(' · ')],
        ['Architecture', inv.arch],
        ['Platform', d.platform || h('span', { class: 'sub' }, 'unknown: deploys are not checked against image platforms')],
        ['CPUs', inv.cpus],
        ['Memory', inv.memory_bytes ? bytes(inv.memory_bytes) : null],
        ['Disk', inv.disk_total_bytes ? `${bytes(inv.disk_free_bytes)} free of ${bytes(inv.disk_total_bytes)}` : null],
        ['Docker', inv.docker_error ? h('span', { class: 'warn' }, inv.docker_error) : inv.docker_version],
        ['Agent', inv.agent_version],
        ['Uptime', tel ? `${Math.floor(tel.uptime_s / 3600)} h ${Math.floor((tel.uptime_s % 3600) / 60)} min` : null],
        ['Generation', `${d.applied_generation} applied of ${d.desired_generation}${d.applied_generation < d.desired_generation ? ' (applying)' : ''}`],
        ['Credential', d.credential ? badge(d.credential) : null],
        ['Storage', obs.storage_error ? h('span', { class: 'warn' }, obs.storage_error) : null],
        ['Docker error', obs.docker_error ? h('span', { class: 'warn' }, obs.docker_error) : null],
      ]));

      const keys = [...new Set([...Object.keys(d.device_labels || {}), ...Object.keys(d.operator_labels || {})])].sort();
      fill(labels, keys.length ? table(['Key', 'Value', 'Set by', ''], keys.map((k) => {
        const mine = k in (d.operator_labels || {});
        return h('tr', {},
          h('td', { class: 'mono' }, k),
          h('td', { class: 'mono' }, d.labels[k] ?? ''),
          h('td', {}, mine ? (k in (d.device_labels || {}) ? 'operator (over the device\'s)' : 'operator') : 'device'),
          h('td', {}, operator && mine ? button('Remove', async () => draw(await patch(`${base}/labels`, { remove: [k] })),
            { class: 'small', 'aria-label': `Remove label ${k}`, what: `removing label ${k}` }) : null));
      })) : h('p', { class: 'muted' }, 'No labels.'));

      drawApps(d);
      drawLogChoices(d);
      fill(headActions, ctx.can('admin') && d.credential === 'active'
        ? button('Revoke credential', async () => {
          await post(`${base}/revoke`);
          notify(`Device ${id} is revoked: disconnected and refused from now on.`, 'ok');
          reload();
        }, { id: 'revoke-device', class: 'danger', confirm: `Revoke ${id}? It is disconnected at once and refused until it re-enrolls with a token made for it.` })
        : null);
    }

    function drawApps(d) {
      const desired = (d.desired && d.desired.apps) || [];
      const observed = (d.observed && d.observed.apps) || [];
      const names = [...new Set([...desired.map((a) => a.spec.name), ...observed.map((a) => a.name)])].sort();
      const focused = document.activeElement && document.activeElement.dataset && document.activeElement.dataset.action
        ? [document.activeElement.closest('tr') && document.activeElement.closest('tr').dataset.app, document.activeElement.dataset.action] : null;
      fill(apps, names.length ? table(['App', 'Wanted', 'Phase', 'Containers', operator ? 'Actions' : ''], names.map((name) => {
        const want = desired.find((a) => a.spec.name === name);
        const seen = observed.find((a) => a.name === name);
        const containers = (seen && seen.containers) || [];
        const priv = (d.privileges || {})[name] || [];
        return h('tr', { data: { test: 'app-row', app: name } },
          h('td', {}, h('a', { href: `#/apps/${enc(name)}` }, name),
            h('span', { class: 'sub' }, `release ${(seen && seen.release) || (want && want.release) || '–'}${want && seen && want.release && seen.release && want.release !== seen.release ? ` (wants ${want.release})` : ''}`),
            priv.length ? h('span', { class: 'sub warn' }, `privileges: ${priv.join(', ')}`) : null),
          h('td', {}, want ? want.run : h('span', { class: 'muted' }, 'removing')),
          h('td', {}, seen ? badge(seen.phase) : badge('pending'),
            seen && seen.error ? h('span', { class: 'sub warn' }, seen.error) : null,
            seen && seen.attempts ? h('span', { class: 'sub' }, `attempt ${seen.attempts}${seen.next_retry_at_ms ? `, next ${new Date(seen.next_retry_at_ms).toLocaleTimeString()}` : ''}`) : null),
          h('td', {}, containers.length ? containers.map((c) => h('div', { data: { test: 'container', container: c.name } },
            h('strong', {}, c.name), ' ', badge(c.state), c.health ? [' ', badge(c.health)] : null,
            c.restarts ? h('span', { class: 'muted' }, ` ${c.restarts} restarts`) : null,
            c.exit_code !== undefined && c.exit_code !== null && c.state !== 'running' ? h('span', { class: 'muted' }, ` exit ${c.exit_code}`) : null,
            h('span', { class: 'sub mono' }, c.image),
            c.error ? h('span', { class: 'sub warn' }, c.error) : null)) : h('span', { class: 'muted' }, '–')),
          h('td', {}, operator && want ? h('div', { class: 'actions' },
            actionsFor(want.run).map((a) => actionButton(name, a)),
            actionButton(name, 'redeploy'),
            assigned.has(name) ? actionButton(name, 'override') : null) : null));
      })) : h('p', { class: 'muted' }, 'No apps on this device.'));
      if (focused) {
        const b = apps.querySelector(`tr[data-app="${CSS.escape(focused[0] || '')}"] button[data-action="${focused[1]}"]`);
        if (b) b.focus();
      }
    }

    function actionButton(app, action) {
      const label = { redeploy: 'Redeploy', override: 'Follow assignment' }[action] || action[0].toUpperCase() + action.slice(1);
      const confirm = action === 'remove' ? `Remove ${app} from ${id}? Its containers are deleted.` : undefined;
      const title = action === 'override' ? 'After a deploy or removal by hand, let the app\'s fleet assignment manage it here again' : undefined;
      return button(label, async () => {
        if (action === 'override') {
          draw(await del(`${base}/apps/${enc(app)}/override`));
          notify(`${app} on ${id} follows its assignment again.`, 'ok');
          return;
        }
        const op = action === 'remove' ? await del(`${base}/apps/${enc(app)}`)
          : action === 'redeploy' ? await post(`${base}/apps`, { app })
            : await post(`${base}/apps/${enc(app)}/${action}`);
        follow(op);
      }, { class: action === 'remove' ? 'small danger' : 'small', data: { action }, confirm, title, 'aria-label': `${label} ${app}`, what: `${action} ${app}` });
    }

    async function loadDevice() {
      try {
        draw(await get(base));
      } catch (e) {
        showError(e, `reading device ${id}`);
        if (e.status === 404) fill(inventory, h('p', { class: 'warn' }, `No device ${id}.`));
      }
    }
    const reload = throttle(loadDevice, 1000);

    let assigned = new Set(); // apps with a fleet assignment

    async function loadApps() {
      if (!operator) return;
      try {
        const list = await get('/api/v1/apps');
        assigned = new Set(list.filter((a) => a.assignment_selector !== undefined).map((a) => a.spec.name));
        const keep = deploySelect.value;
        fill(deploySelect, list.length ? list.map((a) => h('option', { value: a.spec.name, selected: a.spec.name === keep }, a.spec.name))
          : h('option', { value: '' }, 'no apps defined'));
      } catch (e) {
        showError(e, 'reading apps');
      }
    }

    // ----- operations ------------------------------------------------------------------
    let opList = [];
    let followed = null; // the operation the last action started

    function follow(op) {
      followed = op.id;
      upsertOp(op);
    }

    function upsertOp(op) {
      opList = [op, ...opList.filter((o) => o.id !== op.id)].sort((a, b) => b.created_at_ms - a.created_at_ms).slice(0, 20);
      drawOps();
      if (op.id === followed) {
        const p = op.progress;
        const pct = p && p.total_bytes ? ` ${Math.round((100 * p.current_bytes) / p.total_bytes)} %` : '';
        opResult.dataset.status = op.status;
        fill(opResult, `${op.op} ${op.app}: `, badge(op.status),
          p ? ` ${p.step} ${p.container}${pct}` : '', op.detail ? ` — ${op.detail}` : '');
      }
    }

    function drawOps() {
      fill(ops, opList.length ? table(['When', 'Operation', 'Status'], opList.map((o) => h('tr', { data: { test: 'op-row', op: o.id } },
        h('td', {}, ago(o.created_at_ms)),
        h('td', {}, `${o.op} ${o.app}`, h('span', { class: 'sub' }, `generation ${o.generation}`)),
        h('td', { data: { test: 'status' } }, badge(o.status), o.detail ? h('span', { class: 'sub' }, o.detail) : null)))) :
        h('p', { class: 'muted' }, 'No operations yet.'));
    }

    async function loadOps() {
      try {
        opList = await get(`/api/v1/operations${qs({ device: id, limit: 20 })}`);
        drawOps();
        const f = opList.find((o) => o.id === followed);
        if (f) upsertOp(f);
      } catch (e) {
        showError(e, 'reading operations');
      }
    }

    // ----- events ----------------------------------------------------------------------
    let eventList = [];
    function drawEvents() {
      fill(events, eventList.length ? table(['When', 'Event', 'Detail'], eventList.slice(0, 50).map((e) => h('tr', {},
        h('td', {}, ago(e.at_ms)),
        h('td', {}, badge(e.kind), h('span', { class: 'sub' }, [e.app, e.container].filter(Boolean).join('/'))),
        h('td', {}, e.detail || '')))) : h('p', { class: 'muted' }, 'No events.'));
    }
    async function loadEvents() {
      try {
        eventList = await get(`${base}/events?limit=50`);
        drawEvents();
      } catch (e) {
        showError(e, 'reading events');
      }
    }

    // ----- telemetry -------------------------------------------------------------------
    // Samples as {at_ms, cpu, cpu_max, memory, memory_total, disk, disk_total},
    // oldest first: the history's points (averages, and maxima over a
    // bucket), then the live samples as they come.
    let samples = [];
    let bucketed = false; // the history answered with 5-minute buckets

    /** A live telemetry sample (contract: Telemetry). */
    function sampleOf(t) {
      const h0 = t.host;
      return { at_ms: t.at_ms, cpu: h0.cpu_percent, cpu_max: h0.cpu_percent, memory: h0.memory_used_bytes,
        memory_total: h0.memory_total_bytes, disk: h0.disk_used_bytes, disk_total: h0.disk_total_bytes };
    }

    /** A history point (contract: TelemetryPoint, each metric {avg, max}). */
    function pointOf(p) {
      const h0 = p.host;
      return { at_ms: p.at_ms, cpu: h0.cpu_percent.avg, cpu_max: h0.cpu_percent.max, memory: h0.memory_used_bytes.avg,
        memory_total: h0.memory_total_bytes, disk: h0.disk_used_bytes.avg, disk_total: h0.disk_total_bytes };
    }

    function drawCharts() {
      const span = Number(range.value);
      const now = Date.now();
      const from = now - span;
      samples = samples.filter((s) => s.at_ms >= from);
      const pts = (key) => samples.map((s) => [s.at_ms, s[key]]);
      const last = samples[samples.length - 1];
      // Over 5-minute buckets a peak hides in the average: draw both.
      charts.cpu.set(bucketed ? [{ label: 'average', points: pts('cpu') }, { label: 'peak', points: pts('cpu_max') }]
        : [{ label: 'CPU', points: pts('cpu') }], from, now);
      // Memory and disk are drawn against their totals.
      charts.memory.set([{ label: 'used', points: pts('memory') }], from, now, last && last.memory_total);
      charts.disk.set([{ label: 'used', points: pts('disk') }], from, now, last && last.disk_total);
      chartNote.textContent = last
        ? `${bucketed ? 'Averages (and CPU peaks) over 5 minutes, then live samples. ' : ''}Memory total ${bytes(last.memory_total)}, disk total ${bytes(last.disk_total)}.`
        : 'No telemetry from this device in this window.';
    }
    const redrawCharts = throttle(drawCharts, 1000);

    async function loadTelemetry() {
      const since = Date.now() - Number(range.value);
      try {
        const r = await get(`${base}/telemetry${qs({ since_ms: since, resolution: 'auto' })}`);
        bucketed = r.resolution !== 'raw';
        samples = r.points.map(pointOf);
      } catch (e) {
        showError(e, 'reading telemetry');
        if (!samples.length && dev && dev.telemetry) samples = [sampleOf(dev.telemetry)];
      }
      drawCharts();
    }

    function drawContainerMetrics(t) {
      const list = (t && t.containers) || [];
      fill(containerMetrics, list.length ? table(['Container', h('th', { class: 'num', scope: 'col' }, 'CPU'), h('th', { class: 'num', scope: 'col' }, 'Memory')],
        list.map((c) => h('tr', {}, h('td', {}, `${c.app}/${c.container}`), h('td', { class: 'num' }, percent(c.cpu_percent)),
          h('td', { class: 'num' }, `${bytes(c.memory_bytes)}${c.memory_limit_bytes ? ` of ${bytes(c.memory_limit_bytes)}` : ''}`)))) : null);
    }

    range.addEventListener('change', loadTelemetry);

    // ----- logs ------------------------------------------------------------------------
    // The tail from the history, then each `logs` change's batch as it comes.
    let logLines = 0;

    function drawLogChoices(d) {
      const desired = ((d.desired && d.desired.apps) || []).map((a) => a.spec);
      const keep = logApp.value;
      fill(logApp, desired.length ? desired.map((s) => h('option', { value: s.name, selected: s.name === keep }, s.name))
        : h('option', { value: '' }, 'no apps'));
      const spec = desired.find((s) => s.name === logApp.value);
      const keepC = logContainer.value;
      fill(logContainer, h('option', { value: '' }, 'all containers'),
        spec ? spec.containers.map((c) => h('option', { value: c.name, selected: c.name === keepC }, c.name)) : null);
      // The app shown is gone from the device: show the first one's.
      if (keep && logApp.value !== keep) loadLogs();
    }

    function logLine(l, container) {
      const at = new Date(l.at_ms).toLocaleTimeString();
      return h('span', { class: l.stream === 'stderr' ? 'log-err' : null },
        h('span', { class: 'log-time' }, `${at} `), container ? `${container} | ` : '', l.line, '\n');
    }

    function appendLogs(lines, container) {
      const atBottom = logPre.scrollTop + logPre.clientHeight >= logPre.scrollHeight - 20;
      logPre.append(...lines.map((l) => logLine(l, container)));
      logLines += lines.length;
      while (logLines > MAX_LOG_LINES) {
        logPre.firstChild.remove();
        logLines -= 1;
      }
      if (logFollow.checked && atBottom) logPre.scrollTop = logPre.scrollHeight;
    }

    async function loadLogs() {
      const app = logApp.value;
      if (!app) {
        fill(logPre, 'No app to read logs of.');
        logLines = 0;
        return;
      }
      try {
        const lines = await get(`${base}/logs${qs({ app, container: logContainer.value, tail: 200 })}`);
        fill(logPre);
        logLines = 0;
        if (!lines.length) fill(logPre, h('span', { class: 'muted' }, 'No log lines yet.\n'));
        appendLogs(lines);
        logPre.scrollTop = logPre.scrollHeight;
      } catch (e) {
        showError(e, `reading logs of ${app}`);
      }
    }
    logApp.addEventListener('change', () => { drawLogChoices(dev); loadLogs(); });

    // Log lines come on a stream of this device's own: the console's
    // fleet-wide feed leaves them out (10,000 devices' logs would flood
    // every open tab). After a reconnect the tail is read again.
    function onLogs(c) {
      const b = c.batch;
      if (b.app === logApp.value && (!logContainer.value || b.container === logContainer.value)) {
        const lines = b.dropped
          ? [...b.lines, { at_ms: Date.now(), stream: 'stderr', line: `[${b.dropped} lines dropped by the agent]` }] : b.lines;
        appendLogs(lines, logContainer.value ? null : b.container);
      }
    }
    function onTelemetry(t) {
      if (!samples.length || t.at_ms > samples[samples.length - 1].at_ms) samples.push(sampleOf(t));
      drawContainerMetrics(t);
      redrawCharts();
    }
    // This device's log lines and telemetry: the console's fleet-wide feed
    // carries neither (see live.start in app.js).
    const logStream = new EventSource(`/api/v1/changes${qs({ device: id, kinds: 'logs,telemetry' })}`);
    let logStreamDown = false;
    logStream.onmessage = (m) => {
      const c = JSON.parse(m.data);
      if (c.kind === 'logs') onLogs(c);
      else if (c.kind === 'telemetry') onTelemetry(c.telemetry);
      else if (c.kind === 'lagged') { loadLogs(); loadTelemetry(); }
    };
    logStream.onerror = () => { logStreamDown = true; };
    logStream.onopen = () => {
      if (logStreamDown) { loadLogs(); loadTelemetry(); }
      logStreamDown = false;
    };
    logContainer.addEventListener('change', loadLogs);

    // ----- start -------------------------------------------------------------------------
    async function snapshot() {
      await loadApps();
      await loadDevice();
      loadOps();
      loadEvents();
      loadTelemetry();
      loadLogs();
      if (dev) drawContainerMetrics(dev.telemetry);
    }
    snapshot();

    return {
      snapshot,
      changes(list) {
        for (const c of list) {
          if (c.kind === 'app') loadApps().then(() => dev && drawApps(dev));
          if (c.device !== id && !(c.kind === 'operation' && c.operation.device === id)) continue;
          switch (c.kind) {
            case 'device':
              fill(statusEl, badge(c.online ? 'online' : 'offline'));
              reload();
              break;
            case 'state':
            case 'inventory':
              reload();
              break;
            case 'operation':
              upsertOp(c.operation);
              break;
            case 'event':
              eventList.unshift(c.event);
              eventList.length = Math.min(eventList.length, 50);
              drawEvents();
              break;
            default:
          }
        }
      },
      unmount() {
        reload.cancel();
        redrawCharts.cancel();
        logStream.close();
      },
    };
  },
};
