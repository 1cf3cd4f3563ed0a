// tokenfan chat page, plus the fetch-based SSE reader the ops page imports.
//
// Why not EventSource: it cannot send `Authorization`, and an API key must
// go as a Bearer token. The reader below does what EventSource does for us:
// it parses the SSE wire format, remembers the last `id:` and reconnects
// with `Last-Event-ID` (backoff 250 ms doubling to 5 s) until the stream
// ends. Model text is only ever inserted as text nodes.

const KEY_STORE = "tokenfan.apiKey";
const CHAT_STORE = { messages: "tokenfan.messages", streamId: "tokenfan.streamId", lastSeq: "tokenfan.lastSeq", model: "tokenfan.model" };
const MAX_TOKENS = 512;
const BACKOFF_MIN_MS = 250;
const BACKOFF_MAX_MS = 5000;
// Worth another try on the same request; anything else is final.
const TRANSIENT = new Set([408, 429, 500, 502, 503, 504]);

// ---------------------------------------------------------------- SSE reader

/** Incremental parser of the text/event-stream format (WHATWG HTML §9.2). */
export class SSEParser {
  constructor(lastEventId = "") {
    this.buffer = "";
    this.data = [];
    this.event = "";
    this.lastEventId = lastEventId;
  }

  /** Feed decoded text; returns the events completed by it. */
  feed(text) {
    this.buffer += text;
    const events = [];
    const eol = /\r\n|\r|\n/g;
    let start = 0;
    let m;
    while ((m = eol.exec(this.buffer)) !== null) {
      // A lone "\r" at the end may be the first half of a split "\r\n".
      if (m[0] === "\r" && m.index === this.buffer.length - 1) break;
      const event = this.line(this.buffer.slice(start, m.index));
      if (event) events.push(event);
      start = m.index + m[0].length;
    }
    this.buffer = this.buffer.slice(start);
    return events;
  }

  /** The body ended: a held-back "\r" was a line end after all. */
  end() {
    return this.buffer.endsWith("\r") ? this.feed("\n") : [];
  }

  line(line) {
    if (line === "") return this.dispatch();
    if (line.startsWith(":")) return null;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
    else if (field === "event") this.event = value;
    else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
    return null;
  }

  dispatch() {
    const event = this.data.length
      ? { type: this.event || "message", data: this.data.join("\n"), id: this.lastEventId }
      : null;
    this.data = [];
    this.event = "";
    return event;
  }
}

export class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

export function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** `{"error": {"message"}}` of a failed answer, else its status line. */
export async function httpError(res) {
  let message = "";
  try {
    message = (await res.json())?.error?.message || "";
  } catch {
    // Not JSON (a proxy's page, say): the status line says enough.
  }
  return new HttpError(res.status, `${message || res.statusText || "Request failed"} (HTTP ${res.status})`);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

async function* bodyEvents(body, parser) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      yield* parser.feed(decoder.decode(value, { stream: true }));
    }
    yield* parser.feed(decoder.decode());
    yield* parser.end();
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Follow an SSE URL until `onEvent` returns true (a terminal event), the
 * server answers 204, or `signal` aborts. A network error or a body that
 * ends early means reconnect. Resolves "terminal" | "finished" | "aborted";
 * rejects with HttpError on a final HTTP error (401, 403, 404, ...).
 */
export async function followEvents(url, { onEvent, onReconnect = () => {}, signal, lastEventId = "" }) {
  let lastId = lastEventId;
  let delay = BACKOFF_MIN_MS;
  for (;;) {
    const outcome = await readOnce(url, lastId, signal, (event) => {
      lastId = event.id;
      delay = BACKOFF_MIN_MS;
      return onEvent(event);
    });
    if (outcome !== "dropped") return outcome;
    if (signal?.aborted) return "aborted";
    onReconnect(delay);
    await sleep(delay, signal);
    if (signal?.aborted) return "aborted";
    delay = Math.min(delay * 2, BACKOFF_MAX_MS);
  }
}

async function readOnce(url, lastId, signal, deliver) {
  const headers = { Accept: "text/event-stream", ...authHeaders() };
  if (lastId) headers["Last-Event-ID"] = lastId;
  let res;
  try {
    res = await fetch(url, { headers, signal, cache: "no-store" });
  } catch {
    return signal?.aborted ? "aborted" : "dropped";
  }
  if (res.status === 204) return "finished";
  if (!res.ok) {
    const err = await httpError(res);
    if (TRANSIENT.has(res.status)) return "dropped";
    throw err;
  }
  const events = bodyEvents(res.body, new SSEParser(lastId));
  // Iterate by hand so only read errors count as a dropped connection;
  // an exception in `deliver` is a bug and must surface, not reconnect.
  for (;;) {
    let step;
    try {
      step = await events.next();
    } catch {
      return signal?.aborted ? "aborted" : "dropped";
    }
    if (step.done) return "dropped";
    if (deliver(step.value)) {
      await events.return();
      return "terminal";
    }
  }
}

// ---------------------------------------------------------------- chat page

const $ = (sel) => document.querySelector(sel);

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Live state, exposed as window.tokenfan for browser tests. */
const state = { streamId: null, lastSeq: 0, reconnects: 0 };
let messages = [];
let current = null; // the AssistantTurn being streamed

const store = {
  load() {
    try {
      messages = JSON.parse(sessionStorage.getItem(CHAT_STORE.messages) || "[]");
    } catch {
      messages = [];
    }
    return sessionStorage.getItem(CHAT_STORE.streamId);
  },
  messages() { sessionStorage.setItem(CHAT_STORE.messages, JSON.stringify(messages)); },
  stream(id) {
    if (id) sessionStorage.setItem(CHAT_STORE.streamId, id);
    else sessionStorage.removeItem(CHAT_STORE.streamId);
  },
  seq() { sessionStorage.setItem(CHAT_STORE.lastSeq, String(state.lastSeq)); },
};

function userTurn(text) {
  const turn = el("article", "turn user");
  turn.append(el("h2", "who", "You"), el("p", "text", text));
  $("#conversation").append(turn);
  return turn;
}

/** One assistant answer and everything shown around it. */
class AssistantTurn {
  constructor(history) {
    this.history = history; // the messages that were (or will be) sent
    this.root = el("article", "turn assistant");
    this.answer = el("p", "answer");
    this.answer.setAttribute("aria-live", "polite");
    this.text = document.createTextNode("");
    this.answer.append(this.text);
    this.root.append(el("h2", "who", "Assistant"), this.answer);
    $("#conversation").append(this.root);
  }

  reset() {
    this.id = null;
    this.stopRequested = false;
    this.root.querySelectorAll(":scope > :not(.who, .answer)").forEach((n) => n.remove());
    this.text.data = "";
  }

  // The optional parts are created when needed and removed when over, so
  // their presence alone tells their state.
  part(className, tag = "p", before = this.answer) {
    let node = this.root.querySelector(`:scope > .${className}`);
    if (!node) {
      node = el(tag, className);
      before ? this.root.insertBefore(node, before) : this.root.append(node);
    }
    return node;
  }

  drop(className) {
    this.root.querySelector(`:scope > .${className}`)?.remove();
  }

  disclosure(text) { this.part("disclosure").textContent = text; }

  queued(position) {
    const node = this.part("queued");
    node.setAttribute("role", "status");
    node.textContent = `Waiting in queue: position ${position}${position === 0 ? " (next)" : ""}`;
  }

  status(text) {
    if (text) this.part("status", "p", null).textContent = text;
    else this.drop("status");
  }

  token(text) { this.text.appendData(text); }

  resumed(worker) {
    this.root.insertBefore(el("p", "note", `continued by worker ${worker}`), this.answer.nextSibling);
  }

  done(event) {
    const usage = event.usage || {};
    const t = event.timings || {};
    const reason = event.finish_reason || "stop";
    const report = this.part("report", "p", null);
    report.dataset.finishReason = reason;
    const stats = [];
    if (usage.completion_tokens !== undefined) stats.push(`${usage.completion_tokens} tokens`);
    if (t.ttft_ms !== undefined && t.ttft_ms !== null) stats.push(`first token ${Math.round(t.ttft_ms)} ms`);
    if (t.tokens_per_s) stats.push(`${Number(t.tokens_per_s).toFixed(1)} tokens/s`);
    if (t.worker) stats.push(`worker ${t.worker}`);
    stats.push(`finish: ${reason}${event.cancel_reason ? ` (${event.cancel_reason})` : ""}`);
    report.textContent = stats.join(" · ");
  }

  error(message, retryable) {
    const banner = this.part("error-banner", "div", null);
    banner.setAttribute("role", "alert");
    banner.replaceChildren(el("p", "message", message));
    if (retryable) {
      const button = el("button", "retry", "Retry");
      button.type = "button";
      button.addEventListener("click", () => retry(this));
      banner.append(button);
    }
  }
}

function setRunning(running) {
  $("#send").disabled = running;
  $("#stop").hidden = !running;
  $("#stop").disabled = false;
}

function streamUrl(id) {
  return `/v1/streams/${encodeURIComponent(id)}`;
}

async function startStream(turn) {
  current = turn;
  state.streamId = null;
  state.lastSeq = 0;
  setRunning(true);
  const body = { messages: turn.history, max_tokens: MAX_TOKENS };
  const model = $("#model").value;
  if (model) body.model = model;
  let res;
  try {
    res = await fetch("/v1/streams", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
    });
  } catch {
    return finish(turn, () => turn.error("Could not reach the server.", true));
  }
  if (res.status !== 201) {
    const err = await httpError(res);
    return finish(turn, () => turn.error(err.message, err.status !== 400 && err.status !== 413));
  }
  const { id } = await res.json().catch(() => ({}));
  if (!id) return finish(turn, () => turn.error("The server answered without a stream id.", true));
  attach(turn, id);
  if (turn.stopRequested) stop();
}

function attach(turn, id) {
  turn.id = id;
  state.streamId = id;
  state.lastSeq = 0;
  store.stream(id);
  store.seq();
  followEvents(streamUrl(id), {
    onEvent: (event) => apply(turn, event),
    onReconnect: () => {
      state.reconnects += 1;
      turn.status("Connection lost, reconnecting…");
    },
  }).then(
    (outcome) => { if (outcome === "finished") finish(turn); },
    (err) => finish(turn, () => turn.error(
      err.status === 404 ? `This stream is gone: it expired or never existed. (HTTP 404)` : err.message,
      err.status === 404 || err.status === 401 || err.status === 403,
    )),
  );
}

/** Apply one SSE event; true when it ends the stream. */
function apply(turn, raw) {
  turn.status("");
  const event = JSON.parse(raw.data);
  const type = event.type || raw.type;
  if (type === "queued") {
    turn.queued(event.position);
    return false;
  }
  // Events carry a seq; replays after a reconnect must not repeat text.
  if (typeof event.seq !== "number" || event.seq <= state.lastSeq) return false;
  state.lastSeq = event.seq;
  store.seq();
  keepScrolled(() => {
    turn.drop("queued");
    if (type === "disclosure") turn.disclosure(event.text);
    else if (type === "token") turn.token(event.text || "");
    else if (type === "meta" && event.resumed) turn.resumed(event.worker);
    else if (type === "done") finish(turn, () => turn.done(event), true);
    else if (type === "error") finish(turn, () => turn.error(event.message || event.code, event.retryable === true));
  });
  return type === "done" || type === "error";
}

/** Follow the growing answer, unless the reader scrolled up to read. */
function keepScrolled(update) {
  const root = document.scrollingElement;
  const atBottom = root.scrollHeight - root.scrollTop - root.clientHeight < 80;
  update();
  if (atBottom) root.scrollTop = root.scrollHeight;
}

function finish(turn, show = () => {}, answered = false) {
  turn.status("");
  turn.drop("queued");
  show();
  if (answered && turn.text.data) {
    messages.push({ role: "assistant", content: turn.text.data });
    store.messages();
  }
  store.stream(null);
  if (current === turn) {
    current = null;
    setRunning(false);
  }
}

function retry(turn) {
  if (current) return;
  turn.reset();
  startStream(turn);
}

function send(text) {
  if (current || !text.trim()) return;
  document.querySelectorAll("#conversation .retry").forEach((b) => b.remove());
  messages.push({ role: "user", content: text });
  store.messages();
  userTurn(text);
  const turn = new AssistantTurn([...messages]);
  document.scrollingElement.scrollTop = document.scrollingElement.scrollHeight;
  startStream(turn);
}

async function stop() {
  const turn = current;
  if (!turn) return;
  $("#stop").disabled = true;
  // Clicked before POST /v1/streams answered: cancel once the id is known.
  if (!turn.id) {
    turn.stopRequested = true;
    return;
  }
  try {
    const res = await fetch(streamUrl(turn.id), { method: "DELETE", headers: authHeaders() });
    if (!res.ok) turn.status(`Could not stop: ${(await httpError(res)).message}`);
  } catch {
    turn.status("Could not stop: the server is unreachable.");
  }
  if (current === turn) $("#stop").disabled = false;
}

async function loadModels() {
  const select = $("#model");
  const wanted = sessionStorage.getItem(CHAT_STORE.model) || select.value;
  try {
    const res = await fetch("/v1/models", { headers: authHeaders() });
    if (!res.ok) return;
    const { data = [] } = await res.json();
    const options = data.map((m) => {
      const option = el("option", "", m.id);
      option.value = m.id;
      return option;
    });
    const fallback = el("option", "", "Default model");
    fallback.value = "";
    select.replaceChildren(fallback, ...options);
    select.value = data.some((m) => m.id === wanted) ? wanted : "";
  } catch {
    // Offline or unauthorised: the default model still works.
  }
}

/** After a reload: show the conversation, re-attach to a running stream. */
function restore() {
  const streamId = store.load();
  for (const m of messages) {
    if (m.role === "user") userTurn(m.content);
    else new AssistantTurn([]).token(m.content);
  }
  if (streamId) {
    // No Last-Event-ID: the server replays from seq 1 into an empty turn.
    const turn = new AssistantTurn([...messages]);
    current = turn;
    setRunning(true);
    attach(turn, streamId);
  }
}

function initChat() {
  window.tokenfan = state;
  const prompt = $("#prompt");
  const key = $("#api-key");
  key.value = apiKey();
  key.addEventListener("input", () => {
    if (key.value) sessionStorage.setItem(KEY_STORE, key.value);
    else sessionStorage.removeItem(KEY_STORE);
  });
  key.addEventListener("change", loadModels);
  $("#model").addEventListener("change", (e) => sessionStorage.setItem(CHAT_STORE.model, e.target.value));
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (current) return;
    send(prompt.value);
    prompt.value = "";
  });
  prompt.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("#composer").requestSubmit();
    }
  });
  $("#stop").addEventListener("click", stop);
  loadModels();
  restore();
}

if (document.getElementById("conversation")) initChat();
