// tokenfan ops page: one snapshot, then a `snapshot` SSE event per second.
// Every value goes in as text (textContent), never as HTML.

import { apiKey, authHeaders, followEvents, httpError } from "/static/chat.js";
import { Chart, seriesOf } from "/static/ops.charts.js";

const KEY_STORE = "tokenfan.apiKey";
// No snapshot for this long: say the view is stale.
const STALE_MS = 5000;

const $ = (sel) => document.querySelector(sel);
let controller = null;
let lastUpdate = 0;
// The charts' samples: the API's last 15 minutes, then one per feed event.
let samples = [];
let spanS = 900;
let charts = null;

function makeCharts() {
  const make = (id, unit) => new Chart($(id), { unit, spanS });
  charts = {
    tokens: make("#chart-tokens"), streams: make("#chart-streams"), ttft: make("#chart-ttft", "s"),
    slots: make("#chart-slots"), errors: make("#chart-errors"),
  };
}

function drawCharts() {
  if (!charts) makeCharts();
  const now = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  samples = samples.filter((s) => s.time >= now - spanS);
  const series = seriesOf(samples);
  for (const [name, chart] of Object.entries(charts)) chart.draw(series[name], now);
}

function addSample(sample) {
  if (!sample || (samples.length && sample.time <= samples[samples.length - 1].time)) return;
  samples.push(sample);
  drawCharts();
}

async function loadHistory(signal) {
  const res = await fetch("/v1/ops/history", { headers: authHeaders(), signal, cache: "no-store" });
  if (!res.ok) throw await httpError(res);
  const body = await res.json();
  spanS = body.span_s || spanS;
  samples = body.samples || [];
  drawCharts();
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  return td;
}

function row(...cells) {
  const tr = document.createElement("tr");
  tr.append(...cells);
  return tr;
}

function fill(selector, items, render, emptyText) {
  const tbody = $(selector);
  const columns = tbody.closest("table").querySelectorAll("thead th").length;
  if (!items || items.length === 0) {
    const td = cell(emptyText, "empty");
    td.colSpan = columns;
    tbody.replaceChildren(row(td));
  } else {
    tbody.replaceChildren(...items.map(render));
  }
}

const number = (n, digits = 0) => (typeof n === "number" ? n.toFixed(digits) : "");
const clock = (epoch) => (epoch ? new Date(epoch * 1000).toLocaleTimeString() : "");
const shortId = (id) => (id && id.length > 14 ? `${id.slice(0, 12)}…` : id || "");
const plural = (n = 0, noun) => `${n} ${noun}${n === 1 ? "" : "s"}`;
const ago = (now, then) => (then ? `${Math.max(0, now - then).toFixed(1)} s ago` : "");

function streamRow(s) {
  const tr = row(
    cell(shortId(s.id), "id"), cell(s.model), cell(s.status), cell(s.worker),
    cell(number(s.tokens), "num tokens"), cell(number(s.tokens_per_s, 1), "num tps"),
    cell(`${number(s.age_s, 1)} s`, "num age"),
  );
  tr.dataset.streamId = s.id;
  tr.firstChild.title = s.id;
  return tr;
}

function workerRow(w, now) {
  const state = cell(w.state, `state-${w.state}`);
  const stream = cell(shortId(w.stream), "id");
  stream.title = w.stream || "";
  const tr = row(
    cell(w.name), cell(w.model), state, stream, cell(w.host),
    cell(String(w.pid ?? ""), "num"), cell(number(w.jobs), "num"), cell(ago(now, w.last_seen), "num"),
  );
  tr.dataset.worker = w.name;
  return tr;
}

function modelRow(m) {
  const tr = row(cell(m.name), cell(number(m.queue_depth), "num"), cell(number(m.workers_live), "num"));
  if (m.workers_live === 0) tr.className = "alert";
  return tr;
}

function errorRow(e) {
  const stream = cell(shortId(e.stream_id), "id");
  stream.title = e.stream_id || "";
  return row(cell(clock(e.time)), stream, cell(e.code), cell(e.message, "message"));
}

function render(snap) {
  const now = snap.time || Date.now() / 1000;
  fill("#models tbody", snap.models, modelRow, "No models");
  fill("#workers tbody", snap.workers, (w) => workerRow(w, now), "No live workers");
  fill("#streams tbody", snap.streams, streamRow, "No active streams");
  // Newest first, as an operator reads them.
  const errors = [...(snap.errors || [])].sort((a, b) => (b.time || 0) - (a.time || 0));
  fill("#errors tbody", errors, errorRow, "No recent errors");
  const t = snap.totals || {};
  $("#totals").textContent = [
    plural(t.active_streams, "active stream"), `${t.queued ?? 0} queued`, plural(t.workers_live, "live worker"),
  ].join(" · ");
  const updated = $("#updated");
  updated.textContent = clock(now);
  updated.dateTime = new Date(now * 1000).toISOString();
  lastUpdate = Date.now();
  markStale();
}

function markStale() {
  const stale = lastUpdate > 0 && Date.now() - lastUpdate > STALE_MS;
  $(".updated").classList.toggle("stale", stale);
  $("#updated").title = stale ? "No update for a while: the live feed is reconnecting" : "";
}

function status(text) {
  $("#ops-status").textContent = text;
}

async function loadSnapshot(signal) {
  const res = await fetch("/v1/ops/snapshot", { headers: authHeaders(), signal, cache: "no-store" });
  if (!res.ok) throw await httpError(res);
  render(await res.json());
}

async function connect() {
  controller?.abort();
  controller = new AbortController();
  const { signal } = controller;
  status("");
  try {
    await loadSnapshot(signal);
    await loadHistory(signal);
    await followEvents("/v1/ops/events", {
      signal,
      onEvent: (event) => {
        status("");
        if (event.type === "snapshot") {
          const snap = JSON.parse(event.data);
          render(snap);
          addSample(snap.sample);
        }
        return false;
      },
      onReconnect: () => status("Live feed lost, reconnecting…"),
    });
    if (!signal.aborted) retryLater(signal, "The live feed ended; reconnecting in 5 s.");
  } catch (err) {
    if (signal.aborted) return;
    const auth = err.status === 401 || err.status === 403;
    if (!err.status) retryLater(signal, "Could not reach the server; retrying in 5 s.");
    else if (err.status >= 500 || err.status === 429) retryLater(signal, `${err.message}; retrying in 5 s.`);
    else status(auth ? `${err.message} Enter the admin key above.` : err.message);
  }
}

function retryLater(signal, text) {
  status(text);
  setTimeout(() => signal.aborted || connect(), 5000);
}

function init() {
  const key = $("#api-key");
  key.value = apiKey();
  key.addEventListener("input", () => {
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value);
    else sessionStorage.removeItem(KEY_STORE);
  });
  key.addEventListener("change", connect);
  setInterval(markStale, 1000);
  connect();
}

init();
