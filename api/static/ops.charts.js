// A small SVG line chart of our own for the ops page: no library, no CDN, no build step.
// One chart = a few named series over a shared time axis (the last `spanS` seconds).
// The drawing scales with its box (viewBox), so it reads the same on a phone and a desktop.

const SVG = "http://www.w3.org/2000/svg";
const W = 320;
const H = 120;
const PAD = { left: 34, right: 6, top: 6, bottom: 16 };
const COLOURS = ["#2f7bd9", "#d9822f", "#2fa36b", "#c0392b", "#8e44ad", "#7f8c8d"];

function el(name, attrs = {}) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  return node;
}

const niceMax = (v) => {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
};

const label = (v, unit) => (unit === "s" ? (v >= 1 ? `${v.toFixed(1)}s` : `${Math.round(v * 1000)}ms`)
  : (v >= 1000 ? `${(v / 1000).toFixed(1)}k` : String(Math.round(v * 10) / 10)));

export class Chart {
  // `figure`: an element holding a <figcaption>; the SVG and the legend go in after it.
  constructor(figure, { unit = "", spanS = 900 } = {}) {
    this.figure = figure;
    this.unit = unit;
    this.spanS = spanS;
    this.svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", preserveAspectRatio: "none" });
    this.legend = document.createElement("ul");
    this.legend.className = "legend";
    figure.append(this.svg, this.legend);
  }

  // series: {name: [[time, value|null], ...]}; `now`: the right edge (epoch seconds).
  draw(series, now) {
    const names = Object.keys(series).sort();
    const t0 = now - this.spanS;
    const values = names.flatMap((n) => series[n].filter(([t, v]) => t >= t0 && v != null).map(([, v]) => v));
    const max = niceMax(Math.max(0, ...values));
    const x = (t) => PAD.left + ((t - t0) / this.spanS) * (W - PAD.left - PAD.right);
    const y = (v) => H - PAD.bottom - (v / max) * (H - PAD.top - PAD.bottom);
    const parts = [
      el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(0), y2: y(0), class: "axis" }),
      el("line", { x1: PAD.left, x2: W - PAD.right, y1: y(max), y2: y(max), class: "grid" }),
    ];
    const top = el("text", { x: PAD.left - 3, y: y(max) + 4, "text-anchor": "end", class: "tick" });
    top.textContent = label(max, this.unit);
    const zero = el("text", { x: PAD.left - 3, y: y(0), "text-anchor": "end", class: "tick" });
    zero.textContent = "0";
    const left = el("text", { x: PAD.left, y: H - 3, class: "tick" });
    left.textContent = `-${Math.round(this.spanS / 60)} min`;
    const right = el("text", { x: W - PAD.right, y: H - 3, "text-anchor": "end", class: "tick" });
    right.textContent = "now";
    parts.push(top, zero, left, right);
    const items = [];
    names.forEach((name, i) => {
      const colour = COLOURS[i % COLOURS.length];
      const points = series[name].filter(([t]) => t >= t0);
      let d = "";
      let pen = false;
      for (const [t, v] of points) {  // a null is a gap in the line, not a zero
        if (v == null) { pen = false; continue; }
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      }
      const last = [...points].reverse().find(([, v]) => v != null);
      parts.push(el("path", { d, stroke: colour, class: "line", "data-series": name,
        "data-points": points.length, "data-last": last ? last[1] : "" }));
      const li = document.createElement("li");
      li.style.setProperty("--swatch", colour);
      li.textContent = `${name} ${last ? label(last[1], this.unit) : "–"}`;
      li.dataset.series = name;
      items.push(li);
    });
    this.svg.replaceChildren(...parts);
    this.legend.replaceChildren(...items);
    this.figure.dataset.max = String(max);
  }
}

// Samples (from /v1/ops/history and the feed) into each chart's series.
export function seriesOf(samples) {
  const keyed = (field) => {
    const names = new Set(samples.flatMap((s) => Object.keys(s[field] || {})));
    return Object.fromEntries([...names].map((n) => [n, samples.map((s) => [s.time, (s[field] || {})[n] ?? 0])]));
  };
  const plain = (fields) => Object.fromEntries(
    Object.entries(fields).map(([name, f]) => [name, samples.map((s) => [s.time, s[f] ?? null])]));
  return {
    tokens: keyed("tokens_per_s"),
    streams: plain({ running: "running", queued: "queued" }),
    ttft: plain({ p50: "ttft_p50", p95: "ttft_p95" }),
    slots: keyed("slots_busy"),
    errors: keyed("errors"),
  };
}
