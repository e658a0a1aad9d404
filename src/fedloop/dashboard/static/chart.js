// A line chart in inline SVG: rounds on x, one line per series. No library, works offline.

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 480;
const HEIGHT = 220;
const PAD = { left: 52, right: 12, top: 10, bottom: 28 };
const MAX_MARKERS = 200; // dots with tooltips; a longer run gets lines only

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (parent) parent.appendChild(node);
  return node;
}

/**
 * A "nice" axis over [lo, hi]: ends and ticks on multiples of 1, 2 or 5 times a power of ten.
 * With `integers`, the step is a whole number (rounds).
 */
export function scale(lo, hi, count = 5, integers = false) {
  const raw = (hi - lo) / Math.max(1, count - 1);
  const power = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw) ?? raw;
  if (integers) step = Math.max(1, Math.round(step));
  const first = Math.floor(lo / step + 1e-9);
  const last = Math.ceil(hi / step - 1e-9);
  const digits = Math.max(0, -Math.floor(Math.log10(step)) + 1);
  const ticks = [];
  for (let i = first; i <= last; i += 1) ticks.push(Number((i * step).toFixed(digits)));
  return { lo: first * step, hi: last * step, ticks };
}

export function format(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs >= 1e5 || abs < 1e-3)) return value.toExponential(2);
  return Number(value.toPrecision(4)).toString();
}

/**
 * Draw `series` ([{name, points: [[round, value], ...], mean?}]) into a new <figure>.
 * The figure carries data-metric and data-points (the number of points drawn).
 */
export function lineChart(title, metric, series) {
  const figure = document.createElement("figure");
  figure.className = "chart";
  figure.dataset.metric = metric;
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.appendChild(caption);

  const all = series.flatMap((s) => s.points).filter(([, y]) => Number.isFinite(y));
  figure.dataset.points = String(all.length);
  const svg = el("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": `${title}, ${all.length} points`,
  });
  figure.appendChild(svg);
  if (all.length === 0) return figure;

  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
  if (y1 === y0) {
    const pad = Math.abs(y0) * 0.1 || 1;
    [y0, y1] = [y0 - pad, y1 + pad];
  }
  const xs = scale(x0, x1, 8, true);
  const ys = scale(y0, y1, 5);
  [x0, x1, y0, y1] = [xs.lo, xs.hi, ys.lo, ys.hi];
  const plotW = WIDTH - PAD.left - PAD.right;
  const plotH = HEIGHT - PAD.top - PAD.bottom;
  const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * plotW;
  const sy = (y) => PAD.top + (1 - (y - y0) / (y1 - y0)) * plotH;

  for (const v of ys.ticks) {
    el("line", { class: "grid", x1: PAD.left, x2: WIDTH - PAD.right, y1: sy(v), y2: sy(v) }, svg);
    const label = el("text", { x: PAD.left - 6, y: sy(v) + 4, "text-anchor": "end" }, svg);
    label.textContent = format(v);
  }
  for (const v of xs.ticks) {
    const label = el("text", { x: sx(v), y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, svg);
    label.textContent = String(v);
  }
  const xlabel = el("text", { x: WIDTH - PAD.right, y: HEIGHT - 2, "text-anchor": "end" }, svg);
  xlabel.textContent = "round";
  el("line", { class: "axis", x1: PAD.left, x2: PAD.left, y1: PAD.top, y2: HEIGHT - PAD.bottom }, svg);
  el("line", {
    class: "axis", x1: PAD.left, x2: WIDTH - PAD.right,
    y1: HEIGHT - PAD.bottom, y2: HEIGHT - PAD.bottom,
  }, svg);

  const legend = document.createElement("ul");
  legend.className = "legend";
  const markers = all.length <= MAX_MARKERS;
  series.forEach((s, i) => {
    const colour = s.mean ? "cmean" : `c${i % 10}`;
    const points = s.points.filter(([, y]) => Number.isFinite(y)).sort((a, b) => a[0] - b[0]);
    if (points.length === 0) return;
    const d = points
      .map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`)
      .join(" ");
    const path = el("path", { class: `series ${colour}${s.mean ? " mean" : ""}`, d }, svg);
    path.dataset.series = s.name;
    if (markers) {
      for (const [x, y] of points) {
        const dot = el("circle", { class: colour, cx: sx(x), cy: sy(y), r: s.mean ? 3 : 2.2 }, svg);
        el("title", {}, dot).textContent = `${s.name}, round ${x}: ${format(y)}`;
      }
    }
    if (series.length > 1) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = `swatch ${colour}`;
      item.append(swatch, document.createTextNode(s.name));
      legend.appendChild(item);
    }
  });
  if (legend.childElementCount) figure.appendChild(legend);
  return figure;
}
