// The playground's Admin tab: a live, read-only view of this server from its existing APIs — /ready (backends),
// /v1/models, /admin/keys (virtual keys and their usage) and /v1/jobs (an admin sees every key's jobs).
// Every value goes into the page as textContent: nothing the server returns is parsed as HTML.

const $ = (id) => document.getElementById(id);

const REFRESH_MS = 5000;
const JOB_LIMIT = 10;

const panel = $("panel-admin");
const content = $("admin-content");
const message = $("admin-message");
const updated = $("admin-updated");
const auto = $("admin-auto");
const keyInput = $("api-key");

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** "HTTP 403: <the server's error message>" (OpenAI's error envelope), or the status line. */
async function errorMessage(response) {
  let text = response.statusText;
  try {
    const body = await response.json();
    if (body?.error?.message) text = body.error.message.replace(/\.$/, "");
  } catch {
    // not JSON: keep the status line
  }
  return `HTTP ${response.status}${text ? `: ${text}` : ""}`;
}

async function getJson(url, { auth = true, okStatuses = [] } = {}) {
  const response = await fetch(url, { headers: auth ? authHeaders() : {}, cache: "no-store" });
  if (!response.ok && !okStatuses.includes(response.status)) {
    throw new Error(`${url}: ${await errorMessage(response)}`);
  }
  return response.json();
}

// -- formatting ----------------------------------------------------------------------------------------------------

const DASH = "—";

function when(value) {
  if (value === null || value === undefined) return DASH;
  const date = typeof value === "number" ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? String(value) : date.toLocaleString();
}

const count = (value) => (value === null || value === undefined ? DASH : Number(value).toLocaleString());
const yesNo = (value) => (value === undefined ? DASH : value ? "yes" : "no");
const list = (values) => (values?.length ? values.join(", ") : DASH);

function keyStatus(key) {
  if (key.revoked_at) return "revoked";
  if (!key.active) return "inactive";
  if (key.expires_at && new Date(key.expires_at) <= new Date()) return "expired";
  return "active";
}

function keyLimits(key) {
  const parts = [];
  if (key.rpm !== null) parts.push(`${key.rpm} rpm`);
  if (key.max_concurrent !== null) parts.push(`${key.max_concurrent} at once`);
  if (key.expires_at) parts.push(`expires ${when(key.expires_at)}`);
  return parts.length ? parts.join(", ") : "none";
}

function periodUsage(key) {
  const used = key.period_usage.images;
  const quota = key.image_quota === null ? "no quota" : `of ${count(key.image_quota)}`;
  return `${count(used)} ${quota} / ${key.quota_period}`;
}

function jobProgress(job) {
  if (job.progress) return `${job.progress.percent}% (${job.progress.step}/${job.progress.total})`;
  return job.status === "succeeded" ? "100%" : DASH;
}

// -- tables --------------------------------------------------------------------------------------------------------

/** A cell: its column name travels as data-label (the phone layout shows it) and data-field (for tests). */
function cell(label, field, text, badge = false) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.dataset.field = field;
  if (badge) {
    const span = document.createElement("span");
    span.className = "badge";
    span.dataset.value = text;
    span.textContent = text.replaceAll("_", " ");
    td.append(span);
  } else {
    td.textContent = text;
  }
  return td;
}

/** Replaces a table's rows: one per item, each cell from [label, field, text, badge?]; a notice when empty. */
function fill(table, items, id, cells, empty) {
  const tbody = table.tBodies[0];
  if (!items.length) {
    const td = document.createElement("td");
    td.colSpan = table.tHead.rows[0].cells.length;
    td.className = "empty";
    td.textContent = empty;
    const tr = document.createElement("tr");
    tr.append(td);
    tbody.replaceChildren(tr);
    return;
  }
  tbody.replaceChildren(
    ...items.map((item) => {
      const tr = document.createElement("tr");
      tr.dataset.id = id(item);
      tr.append(...cells(item).map((args) => cell(...args)));
      return tr;
    }),
  );
}

function renderReady(ready) {
  const badge = $("admin-readiness");
  badge.dataset.value = ready.status;
  badge.textContent = ready.status.replaceAll("_", " ");
  fill(
    $("admin-backends"),
    ready.backends,
    (b) => b.name,
    (b) => [
      ["Name", "name", b.name],
      ["State", "state", b.state, true],
      ["Models", "models", list(b.models)],
      ["In flight", "outstanding", count(b.outstanding)],
      ["Queued", "queued", count(b.queued)],
      ["Weight", "weight", String(b.weight)],
      ["Recent failures", "recent_failures", count(b.recent_failures)],
      ["Cooldown", "cooldown", b.cooldown_seconds_left > 0 ? `${b.cooldown_seconds_left.toFixed(1)} s left` : DASH],
      ["Training", "training", b.training ? "training a LoRA" : "no"],
      ["Detail", "detail", b.detail || DASH],
    ],
    "No backend is configured.",
  );
}

function renderModels(models, ready) {
  const byId = new Map(models.map((m) => [m.id, m]));
  for (const id of Object.keys(ready.models)) if (!byId.has(id)) byId.set(id, { id });
  fill(
    $("admin-models"),
    [...byId.values()],
    (m) => m.id,
    (m) => [
      ["Model", "id", m.id],
      ["Ready backends", "ready", count(ready.models[m.id] ?? 0)],
      ["Family", "family", m.family ?? DASH],
      ["Tasks", "tasks", list(m.tasks)],
      ["LoRA", "lora", yesNo(m.lora)],
      ["Default steps", "default_steps", count(m.default_steps)],
    ],
    "No model is configured.",
  );
}

function renderKeys(keys) {
  fill(
    $("admin-keys"),
    keys,
    (k) => k.id,
    (k) => [
      ["Alias", "alias", k.alias],
      ["ID", "id", k.id],
      ["Prefix", "prefix", `${k.prefix}…`],
      ["Status", "status", keyStatus(k), true],
      ["Models", "models", list(k.models)],
      ["Requests", "requests", count(k.usage.requests)],
      ["Images", "images", count(k.usage.images)],
      ["This period", "period", periodUsage(k)],
      ["Limits", "limits", keyLimits(k)],
      ["Created", "created_at", when(k.created_at)],
    ],
    "No virtual key yet.",
  );
}

function renderJobs(jobs) {
  fill(
    $("admin-jobs"),
    jobs,
    (j) => j.id,
    (j) => [
      ["ID", "id", j.id],
      ["Kind", "kind", j.kind.replace("image.", "")],
      ["Model", "model", j.model],
      ["Status", "status", j.status, true],
      ["Progress", "progress", jobProgress(j)],
      ["Attempts", "attempts", count(j.attempts)],
      ["Created", "created_at", when(j.created_at)],
      ["Ended", "completed_at", when(j.completed_at)],
      ["Error", "error", j.error ? `${j.error.code}: ${j.error.message}` : DASH],
    ],
    "No job yet.",
  );
}

// -- refresh -------------------------------------------------------------------------------------------------------

/** No admin data on screen: a refused credential, or another key entered. */
function clear(access, text) {
  panel.dataset.access = access;
  content.hidden = true;
  for (const table of content.querySelectorAll("table")) table.tBodies[0].replaceChildren();
  message.textContent = text;
  updated.textContent = "";
}

let generation = 0; // bumped when the key changes: answers to requests made with the previous key are dropped

async function load() {
  const asked = generation;
  // The admin API decides who is an admin: a 401 or 403 here, and nothing else is asked for.
  const keysResponse = await fetch("/admin/keys", { headers: authHeaders(), cache: "no-store" });
  if (asked !== generation) return;
  if (keysResponse.status === 401) {
    const why = await errorMessage(keysResponse);
    clear("unauthorized", `No valid API key: the admin API answered ${why}. Enter an admin key under Settings.`);
    return;
  }
  if (keysResponse.status === 403) {
    const why = await errorMessage(keysResponse);
    const text = `This API key is not an admin credential: the admin API answered ${why}. Enter an admin key under Settings.`;
    clear("forbidden", text);
    return;
  }
  if (!keysResponse.ok) throw new Error(`/admin/keys: ${await errorMessage(keysResponse)}`);
  const [keys, ready, models, jobs] = await Promise.all([
    keysResponse.json(),
    getJson("/ready", { auth: false, okStatuses: [503] }), // 503 while not ready: the body still says why
    getJson("/v1/models"),
    getJson(`/v1/jobs?limit=${JOB_LIMIT}`),
  ]);
  if (asked !== generation) return;
  renderReady(ready);
  renderModels(models.data, ready);
  renderKeys(keys.data);
  renderJobs(jobs.data);
  panel.dataset.access = "admin";
  content.hidden = false;
  message.textContent = "";
  updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

let running = null;

async function refreshOnce() {
  panel.setAttribute("aria-busy", "true");
  try {
    await load();
  } catch (error) {
    // Keep the last good data on screen, and say that it is stale.
    message.textContent = `Could not refresh: ${error.message}`;
  } finally {
    panel.removeAttribute("aria-busy");
    panel.dataset.refreshes = String(Number(panel.dataset.refreshes ?? 0) + 1);
  }
}

/** One refresh at a time: a call while one runs waits for it instead of starting another. */
function refresh() {
  if (!running) {
    const current = refreshOnce().finally(() => {
      if (running === current) running = null;
    });
    running = current;
  }
  return running;
}

const visible = () => !panel.hidden && document.visibilityState === "visible";

$("admin-refresh").addEventListener("click", refresh);
// The tab's own script shows and hides the panel: refresh as soon as it is shown.
new MutationObserver(() => {
  if (visible()) refresh();
}).observe(panel, { attributes: true, attributeFilter: ["hidden"] });
keyInput.addEventListener("change", () => {
  generation += 1;
  running = null; // a refresh still under way answers for the previous key: do not wait for it
  clear("unknown", "");
  if (visible()) refresh();
});
document.addEventListener("visibilitychange", () => {
  if (visible() && auto.checked) refresh();
});
setInterval(() => {
  if (visible() && auto.checked) refresh();
}, REFRESH_MS);
