// Line charts drawn as SVG: one path per series, a y axis from 0 to the
// series' maximum (or a fixed one, e.g. 100 for percentages), the time
// window along x. Drawn by hand rather than with a chart library: the
// console needs a few small time series, and this is ~100 lines that
// work under the strict Content-Security-Policy without vendoring anything.

import { h, svg, fill } from './ui.js';

const W = 600;
const H = 170;
const LEFT = 56;
const RIGHT = 8;
const TOP = 8;
const BOTTOM = 22;

/**
 * A chart: `lineChart({title, format, max, test})` returns {el, set}.
 * `set(series, from, to, top)` draws [{label, points: [[at_ms, value], …]}]
 * over the window from..to (ms; default: the data's own extent), the y axis
 * up to `top` (default: the chart's `max`, else a round number above the data).
 * `format(v)` turns a value into text (axis and latest value).
 */
export function lineChart({ title, format = String, max, test }) {
  const latest = h('span', { class: 'chart-latest' });
  const plot = svg('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': title });
  const legend = h('div', { class: 'chart-legend' });
  const el = h('figure', { class: 'chart-box', data: { test } },
    h('figcaption', {}, h('span', {}, title), latest), plot, legend);

  function set(series, from, to, top = max) {
    const all = series.flatMap((s) => s.points);
    if (!all.length) {
      fill(plot, svg('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'chart-empty' }, 'no data yet'));
      fill(latest);
      fill(legend);
      return;
    }
    const t0 = from ?? Math.min(...all.map((p) => p[0]));
    const t1 = Math.max(to ?? Math.max(...all.map((p) => p[0])), t0 + 1);
    top = top || niceMax(Math.max(...all.map((p) => p[1])));
    const x = (t) => LEFT + ((t - t0) / (t1 - t0)) * (W - LEFT - RIGHT);
    const y = (v) => TOP + (1 - Math.min(v, top) / top) * (H - TOP - BOTTOM);

    const grid = [0, 0.5, 1].map((f) => [
      svg('line', { x1: LEFT, x2: W - RIGHT, y1: y(top * f), y2: y(top * f), class: 'chart-grid' }),
      svg('text', { x: LEFT - 4, y: y(top * f) + 4, 'text-anchor': 'end', class: 'chart-axis' }, format(top * f)),
    ]);
    const times = [
      svg('text', { x: LEFT, y: H - 6, class: 'chart-axis' }, clock(t0)),
      svg('text', { x: W - RIGHT, y: H - 6, 'text-anchor': 'end', class: 'chart-axis' }, clock(t1)),
    ];
    const lines = series.map((s, i) => svg('path', { d: pathOf(s.points, x, y), class: `chart-line s${i}` }));
    fill(plot, grid, times, lines);

    fill(latest, series.filter((s) => s.points.length).map((s, i) => h('span', { class: `chart-key s${i}` },
      `${series.length > 1 ? `${s.label} ` : ''}${format(s.points[s.points.length - 1][1])}`)));
    fill(legend, series.length > 1 ? series.map((s, i) => h('span', { class: `chart-key s${i}` }, s.label)) : null);
    plot.setAttribute('aria-label', `${title}: ${latest.textContent}`);
  }

  set([]);
  return { el, set };
}

/** The path through the points, broken where samples are missing. */
function pathOf(points, x, y) {
  if (!points.length) return '';
  const gaps = points.slice(1).map((p, i) => p[0] - points[i][0]).sort((a, b) => a - b);
  const usual = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 0;
  let d = '';
  points.forEach(([t, v], i) => {
    const jump = i === 0 || (usual > 0 && t - points[i - 1][0] > usual * 4);
    d += `${jump ? 'M' : 'L'}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
  });
  return d;
}

/** 1, 2 or 5 times a power of ten, at or above v. */
function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}
