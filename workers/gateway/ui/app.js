// Conveyor's live page: recent jobs, one job's events as they happen, a ping form and the dead
// letters, all through the gateway's /api/v1 (docs/gateway.md). No build step, no library.
// Everything from the gateway reaches the DOM as text (textContent, append, setAttribute).
"use strict";

const KEY_STORAGE = "conveyor.apiKey";
const JOBS_EVERY_MS = 2000;
const DEAD_LETTERS_EVERY_MS = 5000;
const TERMINAL_TYPES = new Set(["complete", "error"]);
const MAX_REOPENS = 5;

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** An element with attributes (null ones left out) and children (strings become text). */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value != null) node.setAttribute(name, String(value));
  }
  node.append(...children.map((child) => child ?? ""));
  return node;
}

function setText(node, text) {
  const value = String(text ?? "");
  if (node.textContent !== value) node.textContent = value;
}

function shortId(id) {
  return id.length > 12 ? id.slice(0, 8) : id;
}

/** `2026-11-22T10:00:00.123Z` -> `2026-11-22 10:00:00Z`, the whole value kept as a tooltip. */
function shortTime(iso) {
  return iso ? String(iso).replace("T", " ").replace(/\.\d+/, "") : "";
}

function showMessage(node, text, kind = "ok") {
  setText(node, text);
  node.dataset.kind = kind;
  node.hidden = !text;
}

// --- The gateway -----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, data = null) {
    super(message);
    this.status = status;
    this.data = data;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function showAuthNotice(needed) {
  const notice = $("auth-notice");
  if (needed && notice.hidden) $("api-key").focus();
  notice.hidden = !needed;
}

/** One call to the gateway; resolves to the envelope's `data`, throws ApiError with its `error`. */
async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, `gateway unreachable (${err.message})`);
  }
  let envelope = null;
  try {
    envelope = await response.json();
  } catch {
    // not JSON: described by its status below
  }
  showAuthNotice(response.status === 401);
  if (!response.ok || envelope?.success !== true) {
    throw new ApiError(response.status, describeFailure(response, envelope), envelope?.data);
  }
  return envelope.data ?? {};
}

function describeFailure(response, envelope) {
  let text = envelope?.error || response.statusText || "request failed";
  const problems = envelope?.data?.problems;
  if (Array.isArray(problems) && problems.length) text += `: ${problems.join("; ")}`;
  const retryAfter = response.headers.get("Retry-After");
  if (retryAfter) text += ` (retry after ${retryAfter} s)`;
  return `${text} [HTTP ${response.status}]`;
}

/** Runs `fn` now and every `ms` while the page is visible; a call made while one runs makes
 * one more run after it, so "refresh at once" is never lost. */
function poller(fn, ms) {
  let running = null;
  let again = false;
  function run() {
    if (running) {
      again = true;
      return running;
    }
    running = (async () => {
      do {
        again = false;
        await fn();
      } while (again);
    })().finally(() => {
      running = null;
    });
    return running;
  }
  setInterval(() => document.hidden || run(), ms);
  document.addEventListener("visibilitychange", () => document.hidden || run());
  return run;
}

/** Puts one row per item into `tbody` in the items' order, keeping the rows of known job ids
 * (so a click or a button in flight is not lost to a refresh). */
function syncRows(tbody, items, build, update) {
  const existing = new Map([...tbody.rows].map((row) => [row.dataset.jobId, row]));
  const placed = new Set();
  let previous = null;
  for (const item of items) {
    const id = String(item.job_id ?? "");
    if (!id || placed.has(id)) continue;
    placed.add(id);
    const row = existing.get(id) ?? build(id);
    existing.delete(id);
    update(row, item);
    const wanted = previous ? previous.nextSibling : tbody.firstChild;
    if (row !== wanted) tbody.insertBefore(row, wanted);
    previous = row;
  }
  for (const row of existing.values()) row.remove();
}

function listOf(data, name) {
  return Array.isArray(data?.[name]) ? data[name] : [];
}

// --- Recent jobs -----------------------------------------------------------------------------

const refreshJobs = poller(async () => {
  try {
    const data = await api("GET", "/api/v1/jobs?limit=50");
    const jobs = listOf(data, "jobs");
    syncRows($("jobs-body"), jobs, buildJobRow, updateJobRow);
    setText($("jobs-state"), `${jobs.length} · ${new Date().toLocaleTimeString()}`);
    showMessage($("jobs-error"), "");
    $("jobs-body").classList.remove("stale");
  } catch (err) {
    showMessage($("jobs-error"), err.message, "error");
    $("jobs-body").classList.add("stale");
  }
}, JOBS_EVERY_MS);

function buildJobRow(id) {
  const row = el("tr", { "data-job-id": id, tabindex: "0" },
    el("td", {}, el("code", { title: id }, shortId(id))), el("td"),
    el("td", {}, el("span", { class: "badge" })), el("td"));
  row.addEventListener("click", () => selectJob(id));
  row.addEventListener("keydown", (event) => event.key === "Enter" && selectJob(id));
  return row;
}

function updateJobRow(row, job) {
  const [, task, status, submitted] = row.cells;
  row.dataset.status = job.status ?? "";
  row.classList.toggle("selected", row.dataset.jobId === current?.id);
  setText(task, job.task);
  setText(status.firstChild, job.status);
  status.firstChild.dataset.status = job.status ?? "";
  setText(submitted, shortTime(job.submitted_at));
  submitted.title = job.submitted_at ?? "";
  if (row.dataset.jobId === current?.id && !current.ended) showStatus(job.status);
}

// --- One job ---------------------------------------------------------------------------------

/** The selected job: {id, token, source, lastSeq, text, ended, reopens, failedWith}. */
let current = null;

function selectJob(id, token = null) {
  if (!id || current?.id === id) return;
  if (current?.source) current.source.close();
  const job = {
    id, token, source: null, lastSeq: null, text: "", ended: false, reopens: 0, failedWith: null,
  };
  current = job;
  history.replaceState(null, "", `#job=${enc(id)}`);
  for (const row of $("jobs-body").rows) row.classList.toggle("selected", row.dataset.jobId === id);

  $("job").dataset.jobId = id;
  setText($("job-id"), id);
  $("job-empty").hidden = true;
  $("job-detail").hidden = false;
  setText($("job-task"), "");
  showStatus("");
  showMessage($("job-error"), "");
  $("job-gaps").replaceChildren();
  $("job-events").replaceChildren();
  $("job-text").replaceChildren();
  const result = $("job-result");
  setText(result, "(not finished)");
  result.className = "muted";
  delete result.dataset.success;

  loadJob(job);
  follow(job);
}

function showStatus(status) {
  const badge = $("job-status");
  setText(badge, status);
  badge.dataset.status = status ?? "";
}

function setStream(job, state) {
  if (job !== current) return;
  const node = $("job-stream");
  node.dataset.state = state;
  setText(node, state);
}

/** Follows the job's server-sent events; with an API key, through a token for this job. */
async function follow(job) {
  const params = new URLSearchParams();
  if (apiKey()) {
    let token = job.token;
    job.token = null; // used once: a reopened stream asks for a fresh one
    if (!token) {
      try {
        token = (await api("POST", `/api/v1/jobs/${enc(job.id)}/token`)).events_token;
      } catch (err) {
        if (job !== current) return;
        showMessage($("job-error"), `No events token: ${err.message}`, "error");
        setStream(job, "failed");
        return;
      }
    }
    if (job !== current) return;
    params.set("token", token);
  }
  if (job.lastSeq != null) params.set("from_seq", job.lastSeq);
  const query = params.size ? `?${params}` : "";
  const source = new EventSource(`/api/v1/jobs/${enc(job.id)}/events${query}`);
  job.source = source;
  setStream(job, "connecting");
  source.onopen = () => setStream(job, "live");
  source.onmessage = (message) => onEvent(job, message);
  source.addEventListener("gap", (message) => onGap(job, message));
  source.onerror = () => onStreamError(job, source);
}

function onEvent(job, message) {
  if (job !== current) return;
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    addNote(`An unreadable event: ${message.data.slice(0, 200)}`);
    return;
  }
  const seq = Number(event.seq ?? message.lastEventId);
  if (job.lastSeq != null && seq <= job.lastSeq) return; // already shown
  job.lastSeq = seq;
  const data = event.data ?? {};

  const list = $("job-events");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.append(el("li", {
    "data-seq": seq, "data-event": event.event, "data-type": event.type, title: event.timestamp,
  },
  el("span", { class: "seq" }, String(seq)),
  el("span", { class: "name" }, event.event),
  el("span", { class: "type", "data-type": event.type }, event.type),
  el("code", { class: "data" }, JSON.stringify(data))));
  if (atBottom) list.scrollTop = list.scrollHeight;

  if (String(event.event).endsWith("_start") && job.text) placeText(job, 0, ""); // a new attempt
  if (typeof data.delta === "string") placeText(job, data.offset, data.delta);
  if (TERMINAL_TYPES.has(event.type)) {
    job.ended = true;
    job.source?.close();
    setStream(job, "ended");
    showResult(job, 10);
  }
}

/** The streamed text: `delta` is the text from `offset` on (a hole left by a gap is shown as
 * ░, so later text still sits at its offset). */
function placeText(job, offset, delta) {
  const pre = $("job-text");
  const at = Number.isInteger(offset) && offset >= 0 ? offset : job.text.length;
  if (at === job.text.length) {
    job.text += delta;
    pre.append(delta);
  } else {
    job.text = job.text.slice(0, at).padEnd(at, "░") + delta;
    pre.textContent = job.text;
  }
  pre.scrollTop = pre.scrollHeight;
}

function onGap(job, message) {
  if (job !== current) return;
  let gap = {};
  try {
    gap = JSON.parse(message.data);
  } catch {
    // shown without its numbers
  }
  const expired = gap.to_seq == null; // every event from from_seq on is gone
  const note = addNote(expired
    ? `Events from ${gap.from_seq ?? "?"} on have expired from this job's history.`
    : `Events ${gap.from_seq ?? "?"} to ${gap.to_seq} were trimmed from this job's history ` +
      "and cannot be shown; the result below is whole.");
  note.dataset.fromSeq = gap.from_seq ?? "";
  note.dataset.toSeq = gap.to_seq ?? "";
  if (Number.isInteger(gap.to_seq)) job.lastSeq = Math.max(job.lastSeq ?? gap.to_seq, gap.to_seq);
  if (expired) { // nothing more will come: the result is all there is
    job.ended = true;
    job.source?.close();
    setStream(job, "ended");
    showResult(job, 10);
  }
}

function addNote(text) {
  const note = el("p", { class: "gap", role: "note" }, text);
  $("job-gaps").append(note);
  return note;
}

/** The browser reconnects by itself (with Last-Event-ID) while the source is CONNECTING; CLOSED
 * means the gateway refused it (an HTTP error, 204 after the end, an expired token). */
async function onStreamError(job, source) {
  if (job !== current || job.ended || job.source !== source) return;
  if (source.readyState === EventSource.CONNECTING) {
    setStream(job, "reconnecting");
    return;
  }
  source.close();
  job.source = null;
  if (await showResult(job, 1)) {
    job.ended = true;
    setStream(job, "ended");
    return;
  }
  if (job !== current) return;
  if ([401, 403, 404].includes(job.failedWith)) {
    setStream(job, "failed"); // the job's error says why
    return;
  }
  if (++job.reopens > MAX_REOPENS) {
    setStream(job, "lost");
    showMessage($("job-error"),
      "The event stream keeps closing before the job ends: select the job again to retry.", "error");
    return;
  }
  setStream(job, "reconnecting");
  await sleep(1000 * job.reopens);
  if (job === current) follow(job);
}

/** GET the job; shows task, status and, once there, its result. */
async function loadJob(job) {
  let data;
  try {
    data = await api("GET", `/api/v1/jobs/${enc(job.id)}`);
  } catch (err) {
    job.failedWith = err.status;
    if (job === current) showMessage($("job-error"), err.message, "error");
    return null;
  }
  job.failedWith = null;
  if (job !== current) return null;
  setText($("job-task"), data.task);
  showStatus(data.status);
  if (data.result != null) {
    const result = $("job-result");
    setText(result, JSON.stringify(data.result, null, 2));
    result.className = data.result.success === false ? "failed" : "";
    result.dataset.success = String(data.result.success);
    if (data.result.success === false) {
      showMessage($("job-error"), `Failed: ${data.result.error ?? "no error given"}`, "error");
    }
  }
  return data;
}

/** True once the job's result is shown; asks up to `tries` times, half a second apart. */
async function showResult(job, tries) {
  for (let i = 0; i < tries; i++) {
    if (i) await sleep(500);
    const data = await loadJob(job);
    if (job !== current || !data) return false;
    if (data.result != null) return true;
  }
  return false;
}

// --- Submit ----------------------------------------------------------------------------------

$("submit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = event.submitter ?? event.target.querySelector("button");
  const status = $("submit-status");
  const payload = {
    message: $("ping-message").value,
    hold_s: Number($("ping-hold").value || 0),
  };
  button.disabled = true;
  showMessage(status, "Submitting…");
  try {
    const data = await api("POST", "/api/v1/jobs", { task: "maintenance.ping", payload });
    showMessage(status, `Submitted ${data.job_id}`);
    selectJob(data.job_id, data.events_token);
    refreshJobs();
  } catch (err) {
    showMessage(status, err.message, "error");
  } finally {
    button.disabled = false;
  }
});

// --- Dead letters ----------------------------------------------------------------------------

const refreshDeadLetters = poller(async () => {
  try {
    const data = await api("GET", "/api/v1/dead-letters?limit=50");
    const rows = listOf(data, "dead_letters");
    syncRows($("dead-letters-body"), rows, buildDeadLetterRow, updateDeadLetterRow);
    setText($("dl-state"), `${rows.length} · ${new Date().toLocaleTimeString()}`);
    showMessage($("dl-error"), "");
    $("dead-letters-body").classList.remove("stale");
  } catch (err) {
    showMessage($("dl-error"), err.message, "error");
    $("dead-letters-body").classList.add("stale");
  }
}, DEAD_LETTERS_EVERY_MS);

function buildDeadLetterRow(id) {
  return el("tr", { "data-job-id": id },
    el("td", {}, el("code", { title: id }, shortId(id))), el("td"), el("td"),
    el("td", { class: "clip" }), el("td"), el("td", { class: "resubmitted" }));
}

function updateDeadLetterRow(row, letter) {
  const [, task, reason, error, failed, resubmitted] = row.cells;
  setText(task, letter.task);
  setText(reason, letter.reason);
  setText(error, letter.error);
  error.title = letter.error ?? "";
  setText(failed, shortTime(letter.failed_at));
  failed.title = letter.failed_at ?? "";
  showResubmitted(row, resubmitted, letter.resubmitted_job_id ?? "");
}

function showResubmitted(row, cell, newId) {
  if (row.dataset.resubmitted === newId && cell.firstChild) return; // a Retry may be in flight
  row.dataset.resubmitted = newId;
  if (newId) {
    const link = el("button", { type: "button", class: "link", title: newId }, shortId(newId));
    link.addEventListener("click", () => selectJob(newId));
    cell.replaceChildren(link);
  } else {
    const button = el("button", { type: "button", class: "retry" }, "Retry");
    button.addEventListener("click", () => retry(row, cell, button));
    cell.replaceChildren(button);
  }
}

async function retry(row, cell, button) {
  const id = row.dataset.jobId;
  const status = $("dl-status");
  button.disabled = true;
  setText(button, "Retrying…");
  try {
    const data = await api("POST", "/api/v1/dead-letters/retry", { job_id: id });
    const done = listOf(data, "retried").find((item) => item.dead_letter === id);
    if (done?.status !== "resubmitted" || !done.job_id) {
      throw new ApiError(200, done?.error ?? `not resubmitted (${done?.status ?? "no answer"})`);
    }
    const newId = done.job_id;
    showMessage(status, `Dead letter ${id} resubmitted as ${newId}`);
    showResubmitted(row, cell, newId);
    selectJob(newId);
    refreshJobs();
    refreshDeadLetters();
  } catch (err) {
    showMessage(status, `Retry of ${id}: ${err.message}`, "error");
    const already = err.data?.resubmitted_job_id; // 409: another retry was first
    if (already) {
      showResubmitted(row, cell, already);
    } else {
      button.disabled = false;
      setText(button, "Retry");
    }
  }
}

// --- The API key, and start ------------------------------------------------------------------

/** Another key may be another tenant: nothing shown under the old one is kept. */
function useKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("api-key").value = key;
  showAuthNotice(false);
  $("jobs-body").replaceChildren();
  $("dead-letters-body").replaceChildren();
  refreshJobs();
  refreshDeadLetters();
  if (current) {
    const id = current.id;
    current.source?.close();
    current = null;
    selectJob(id);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  useKey($("api-key").value.trim());
});
$("key-clear").addEventListener("click", () => useKey(""));

function selectFromHash() {
  const match = /^#job=(.+)$/.exec(location.hash);
  if (match) selectJob(decodeURIComponent(match[1]));
}

$("api-key").value = apiKey();
setText($("gateway-url"), location.origin);
window.addEventListener("hashchange", selectFromHash);
selectFromHash();
refreshJobs();
refreshDeadLetters();
