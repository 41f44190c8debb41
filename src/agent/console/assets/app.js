"use strict";
// edgeadapt on-site console: one page, five hash routes, plain DOM (no frameworks, works offline).
// A sign-in view replaces the nav and the routes whenever the agent asks for a sign-in.
// Server data is only ever put into the page with textContent / attributes, never innerHTML.

const API = "/console/api";
const VIEWS = ["label", "classes", "adapt", "versions", "device"];
const POSITIONAL_KEYS = "123456789abcdefghijklmnopqrstuvwxyz";
const QUEUE_LIMIT = 50;
const GRID_LIMIT = 200;
const PREFETCH = 3;
const THUMB = 128; // px; width/height attributes so the grid lays out before thumbnails arrive
const EMPTY_POLL_MS = 15000;
const RELISTEN_MS = 5000;
const SVG_NS = "http://www.w3.org/2000/svg";

const state = {
  session: null, view: null, // session: {user, csrf, classes, device_id}
  // signedOut: the sign-in form is up (or about to be); sessionSeq counts started sessions, so
  // that a 401 answering a request of an earlier session does not end the current one.
  signedOut: false, sessionSeq: 0,
  keys: { byKey: new Map(), hint: new Map(), rule: "" },
  // label: queue = [{image, reason, likely}] best first; handled = ids labelled or skipped here (a stale
  // queue never shows them again); current = {image, reason, likely, from: "queue" | "grid"}; busy = a
  // label/skip request is in flight, so further keys are ignored.
  queue: [], handled: new Set(), current: null, busy: false, labelled: 0, skipped: 0,
  sessionLabels: new Map(), // image id -> class labelled from this page
  prefetched: new Map(), // image id -> Image, keeps the browser cache warm
  queueSeq: 0, emptyTimer: null, gridSeq: 0, gridImages: new Map(),
  events: null, reopenTimer: null, running: false, // adapt
  serving: null, confirmResolve: null, messageTimer: null,
};

// ---------------------------------------------------------------- DOM helpers

const $ = (id) => document.getElementById(id);

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

// el("td", {class: "num", "data-id": 3}, "text", otherNode): attributes are set verbatim.
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  return append(node, children);
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  return append(node, children);
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    node.setAttribute(key, value === true ? "" : String(value));
  }
}

// ---------------------------------------------------------------- formatting

function pct(x, digits = 1) {
  return typeof x === "number" && Number.isFinite(x) ? `${(x * 100).toFixed(digits)}%` : "n/a";
}

function points(before, after) {
  if (typeof before !== "number" || typeof after !== "number") return "n/a";
  const d = (after - before) * 100;
  return `${d >= 0 ? "+" : "−"}${Math.abs(d).toFixed(1)} pts`;
}

function when(ms) {
  if (typeof ms !== "number") return "–";
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function parseJson(text) {
  try { return JSON.parse(text); } catch { return null; }
}

// ---------------------------------------------------------------- API

class ApiError extends Error {
  // data: the JSON body, if any; retryAfter: seconds from a Retry-After header, else null.
  constructor(status, message, data = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.data = data;
    this.retryAfter = retryAfter;
  }
}

// Every call goes through here so that CSRF, credentials and error reporting are uniform.
// anonymous: a call that needs no session (GET session, sign-in): no CSRF token, and a 401 is
// its answer (sign-in needed, wrong password) rather than the loss of the session.
async function api(path, { method = "GET", body, anonymous = false } = {}) {
  const seq = state.sessionSeq;
  const opts = { method, credentials: "same-origin", headers: { Accept: "application/json" } };
  if (method !== "GET") {
    opts.headers["Content-Type"] = "application/json";
    if (!anonymous) opts.headers["X-CSRF-Token"] = state.session ? state.session.csrf : "";
    opts.body = JSON.stringify(body || {});
  }
  const res = await fetch(API + path, opts).catch((err) => {
    throw new ApiError(0, `Cannot reach the agent (${err.message}).`);
  });
  const data = parseJson(await res.text());
  if (res.status === 401 && !anonymous) {
    if (seq === state.sessionSeq) signedOut("expired");
    throw new ApiError(401, "Sign-in needed.", data);
  }
  if (!res.ok) {
    const retry = Number.parseInt(res.headers.get("Retry-After") || "", 10);
    const retryAfter = Number.isFinite(retry) ? retry : null;
    const text = data && typeof data.error === "string" ? data.error
      : retryAfter !== null ? `${res.status} ${res.statusText}: try again in ${retryAfter} s`
      : `${res.status} ${res.statusText}`;
    throw new ApiError(res.status, text, data, retryAfter);
  }
  return data;
}

const imageUrl = (id) => `${API}/traffic/${encodeURIComponent(id)}/image`;
const thumbUrl = (id) => `${API}/traffic/${encodeURIComponent(id)}/thumbnail`;

// ---------------------------------------------------------------- message bar

function showMessage(text, kind = "error", link = null) {
  const bar = $("message");
  clearTimeout(state.messageTimer);
  bar.className = kind === "ok" ? "ok" : "error";
  bar.setAttribute("role", kind === "ok" ? "status" : "alert");
  bar.replaceChildren(append(el("span", { id: "message-text" }, text), [link ? " " : null]));
  if (link) bar.append(link);
  bar.append(el("button", { id: "message-close", type: "button", "aria-label": "Dismiss" }, "×"));
  bar.hidden = false;
  if (kind === "ok") state.messageTimer = setTimeout(hideMessage, 6000);
}

function hideMessage() {
  clearTimeout(state.messageTimer);
  $("message").hidden = true;
}

// Errors are shown while signed in; a 401 has already put up the sign-in form and its notice,
// and a late error from an earlier session's request would only hide that notice.
function report(err, context) {
  if ((err && err.status === 401) || state.signedOut) return;
  const text = err && err.message ? err.message : String(err);
  showMessage(context ? `${context}: ${text}` : text, "error");
}

// ---------------------------------------------------------------- confirm dialog

// In-page modal instead of window.confirm, so that browser tests can click it.
function confirmDialog(text, yesLabel = "Yes") {
  if (state.confirmResolve) state.confirmResolve(false);
  $("confirm-text").textContent = text;
  $("confirm-yes").textContent = yesLabel;
  $("confirm").hidden = false;
  $("confirm-no").focus(); // the safe choice has the focus
  return new Promise((resolve) => { state.confirmResolve = resolve; });
}

function closeConfirm(answer) {
  $("confirm").hidden = true;
  const resolve = state.confirmResolve;
  state.confirmResolve = null;
  if (resolve) resolve(answer);
}

// ---------------------------------------------------------------- routing

const LOADERS = { label: loadLabel, classes: loadClasses, adapt: loadAdapt, versions: loadVersions, device: loadDevice };

function route() {
  if (state.signedOut || !state.session) return; // the sign-in view stays until a session starts
  const name = location.hash.replace(/^#/, "");
  const view = VIEWS.includes(name) ? name : "label";
  state.view = view;
  document.body.dataset.view = view;
  for (const v of VIEWS) {
    $(`view-${v}`).hidden = v !== view;
    const link = $(`nav-${v}`);
    link.classList.toggle("active", v === view);
    if (v === view) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  if (view !== "adapt") closeEvents(); // live progress only while someone looks at it
  if (view !== "label") clearTimeout(state.emptyTimer);
  runLoader(view);
}

// Loaders mark their section loading/ready/error so tests can wait on data-state.
async function runLoader(view) {
  if (state.signedOut || !state.session) return;
  const section = $(`view-${view}`);
  section.dataset.state = "loading";
  try {
    await LOADERS[view]();
    section.dataset.state = "ready";
  } catch (err) {
    section.dataset.state = "error";
    report(err);
  }
}

// ---------------------------------------------------------------- keys

// One key per class: the class name itself when every name is one character (and names stay
// distinct ignoring case), else 1-9 then a-z in class order.
function buildKeyMap(classes) {
  const byKey = new Map();
  const hint = new Map();
  const single = classes.length > 0 && classes.every((c) => [...c].length === 1 && c.trim() !== "");
  const distinct = new Set(classes.map((c) => c.toLowerCase())).size === classes.length;
  let rule;
  if (single && distinct) {
    for (const c of classes) { byKey.set(c.toLowerCase(), c); hint.set(c, c); }
    rule = "Keys: press a class's own name to label the image (letters in either case).";
  } else {
    classes.slice(0, POSITIONAL_KEYS.length).forEach((c, i) => { byKey.set(POSITIONAL_KEYS[i], c); hint.set(c, POSITIONAL_KEYS[i]); });
    rule = "Keys: class names are longer than one character, so keys 1–9 then a–z label, in class order (shown on each button).";
    const rest = classes.length - POSITIONAL_KEYS.length;
    if (rest > 0) rule += ` The last ${rest} classes have no key: tap them.`;
  }
  rule += " Enter confirms the model's guess; Backspace skips. One press labels at once: there is no undo.";
  return { byKey, hint, rule };
}

// What the focused element is: typing into a field swallows every key; a focused control
// (link, checkbox, other button) keeps its own Enter.
function focusKind(target) {
  if (!(target instanceof Element)) return "free";
  if (target.closest("textarea, select, [contenteditable]")) return "typing";
  if (target.matches("input") && !["checkbox", "radio", "range", "button"].includes(target.type)) return "typing";
  if (target.closest("a[href], button, input") && !target.closest(".label-action, #class-buttons")) return "control";
  return "free";
}

function onKeyDown(e) {
  if (e.key === "Escape" && !$("confirm").hidden) { closeConfirm(false); return; }
  if (state.view !== "label" || state.signedOut || !$("confirm").hidden) return;
  if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
  const kind = focusKind(e.target);
  if (kind === "typing" || (kind === "control" && e.key === "Enter")) return;
  let action = null;
  if (e.key === "Enter") action = confirmGuess;
  else if (e.key === "Backspace") action = skipCurrent;
  else if ([...e.key].length === 1) {
    const cls = state.keys.byKey.get(e.key.toLowerCase());
    if (cls !== undefined) action = () => labelCurrent(cls);
  }
  if (!action) return;
  e.preventDefault(); // also stops Enter from clicking a focused button a second time
  if (e.repeat) return; // a held key labels one image only
  action();
}

// ---------------------------------------------------------------- label: queue and current image

async function loadLabel() {
  await Promise.all([refreshQueue(), loadGrid()]);
}

async function refreshQueue() {
  const seq = ++state.queueSeq;
  const data = await api(`/queue?limit=${QUEUE_LIMIT}`);
  if (seq !== state.queueSeq) return; // a newer refresh is under way
  $("queue-rule").textContent = data.rule ? `Queue order: ${data.rule}` : "";
  state.queue = (data.queue || []).filter((q) => q && q.image && !state.handled.has(q.image.id));
  if (!state.current) showNext();
  else { renderQueueCount(); prefetchNext(); }
  scheduleEmptyPoll();
}

// Background refresh after each label: the ordering depends on what is labelled.
function refreshQueueQuietly() {
  refreshQueue().catch((err) => report(err, "Updating the label queue failed"));
}

function scheduleEmptyPoll() {
  clearTimeout(state.emptyTimer);
  if (state.queue.length || state.view !== "label" || state.signedOut) return;
  state.emptyTimer = setTimeout(refreshQueueQuietly, EMPTY_POLL_MS);
}

function pendingQueue() {
  const currentId = state.current ? state.current.image.id : null;
  return state.queue.filter((q) => !state.handled.has(q.image.id) && q.image.id !== currentId);
}

function showNext() {
  const next = state.queue.find((q) => !state.handled.has(q.image.id));
  setCurrent(next ? { image: next.image, reason: next.reason, likely: next.likely, from: "queue" } : null);
}

function setCurrent(current) {
  state.current = current;
  renderCurrent();
  renderQueueCount();
  prefetchNext();
  markCurrentFigure();
}

function renderQueueCount() {
  const n = state.queue.filter((q) => !state.handled.has(q.image.id)).length;
  const more = state.queue.length >= QUEUE_LIMIT ? "+" : "";
  $("queue-count").textContent = n ? `${n}${more} in the queue` : "queue empty";
}

// Warm the browser cache with the next full images so the next key press shows one at once.
function prefetchNext() {
  for (const q of pendingQueue().slice(0, PREFETCH)) {
    const id = q.image.id;
    if (state.prefetched.has(id)) continue;
    state.prefetched.set(id, Object.assign(new Image(), { decoding: "async", src: imageUrl(id) }));
  }
  while (state.prefetched.size > 4 * PREFETCH) { // oldest first (Map keeps insertion order)
    state.prefetched.delete(state.prefetched.keys().next().value);
  }
}

function renderCurrent() {
  const cur = state.current;
  const img = $("current-image");
  $("queue-empty").hidden = !!cur;
  $("back-to-queue").hidden = !cur || cur.from !== "grid";
  if (!cur) {
    img.hidden = true;
    img.removeAttribute("src");
    delete img.dataset.id;
    for (const id of ["current-name", "guess-confidence", "current-top", "current-reason"]) $(id).textContent = "";
    $("guess-class").textContent = "–";
    updateLabelControls();
    return;
  }
  const image = cur.image;
  img.hidden = false;
  img.dataset.id = String(image.id);
  img.alt = `Image ${image.id}${image.name ? ` (${image.name})` : ""}`;
  img.src = imageUrl(image.id);
  $("current-name").textContent = [`Image ${image.id}`, image.name, when(image.at_ms)].filter(Boolean).join(" · ");
  $("guess-class").textContent = image.predicted ?? "–";
  $("guess-confidence").textContent = pct(image.confidence);
  $("current-top").textContent = (image.top || []).map(([c, p]) => `${c} ${pct(p, 0)}`).join(" · ");
  $("current-reason").textContent = reasonText(cur, image);
  updateLabelControls();
}

function reasonText(cur, image) {
  const cls = labelledClass(image);
  if (cls !== undefined) return `Already labelled${cls ? ` as ${cls}` : ""}: pick another image or go back to the queue.`;
  if (cur.from === "grid") return `Picked from the traffic below${image.skipped ? " (skipped earlier)" : ""}.`;
  // likely: the class the image most likely is, by the model and the answers given for images
  // the model guessed alike; it differs from the guess where those answers named another class.
  const likely = cur.likely || image.predicted;
  const which = likely === image.predicted ? `class ${likely}` : `probably ${likely} (answers for images the model takes for ${image.predicted} were mostly ${likely}), and ${likely}`;
  if (cur.reason === "class_short") return `Why now: ${which} needs more labels before it can take part in adaptation.`;
  if (cur.reason === "few_labels") return `Why now: ${which} has fewer labels than the other classes.`;
  return cur.reason ? `Why now: ${cur.reason}.` : "";
}

// The class an image was labelled as: undefined when unlabelled, "" when labelled but the class
// is unknown to this page (the traffic API gives the sample id only; a `label` field is used if sent).
function labelledClass(image) {
  if (state.sessionLabels.has(image.id)) return state.sessionLabels.get(image.id);
  if (image.sample === null || image.sample === undefined) return undefined;
  return typeof image.label === "string" ? image.label : "";
}

function updateLabelControls() {
  const cur = state.current;
  const open = !!cur && labelledClass(cur.image) === undefined;
  const guess = cur ? cur.image.predicted : null;
  for (const button of $("class-buttons").querySelectorAll("button[data-class]")) {
    button.disabled = !open || state.busy;
    button.classList.toggle("guess", open && button.dataset.class === guess);
  }
  $("confirm-guess").disabled = !open || state.busy || !state.session.classes.includes(guess);
  $("skip").disabled = !open || state.busy;
  $("label-panel").classList.toggle("busy", state.busy);
}

function buildClassButtons(classes) {
  const frag = document.createDocumentFragment();
  for (const c of classes) {
    const key = state.keys.hint.get(c);
    const showKey = key !== undefined && key !== c;
    frag.append(el("button", {
      type: "button", class: "class-button", "data-class": c, "data-key": key,
      title: key !== undefined ? `Label as ${c} (key ${key})` : `Label as ${c}`, disabled: true,
    }, el("span", { class: "class-name" }, c), showKey ? el("kbd", null, key) : null));
  }
  $("class-buttons").replaceChildren(frag);
  $("class-buttons").classList.toggle("wide", classes.some((c) => c.length > 3)); // room for long names
  $("key-rule").textContent = state.keys.rule;
}

function confirmGuess() {
  if (state.current) labelCurrent(state.current.image.predicted);
}

// Label (cls given) or skip the current image, then move on to the next queued one.
async function decide(cls) {
  const cur = state.current;
  if (!cur || state.busy || labelledClass(cur.image) !== undefined) return;
  const id = cur.image.id;
  const skip = cls === null;
  await withBusy(async () => {
    try {
      const res = await api(`/traffic/${encodeURIComponent(id)}/${skip ? "skip" : "label"}`,
        { method: "POST", body: skip ? {} : { class: cls } });
      if (skip) {
        $("skipped-count").textContent = String(++state.skipped);
        $("last-action").textContent = `Last: image ${id} skipped.`;
        const shown = state.gridImages.get(id);
        if (shown) shown.skipped = true;
      } else {
        const split = res && res.sample && res.sample.split === "validation" ? ", held out for validation" : "";
        state.sessionLabels.set(id, cls);
        $("labelled-count").textContent = String(++state.labelled);
        $("last-action").textContent = `Last labelled: image ${id} as ${cls}${split} (undo not available).`;
      }
      markFigure(id);
      advance(id);
    } catch (err) {
      report(err, skip ? `Skipping image ${id} failed` : `Labelling image ${id} as ${cls} failed`);
      // 409: a sample already; 404: no longer kept (or labelled). Nothing more to do with it.
      if (err.status === 409) markDuplicate(id);
      if (err.status === 409 || err.status === 404) advance(id);
    }
  });
}

const labelCurrent = (cls) => decide(cls);
const skipCurrent = () => decide(null);

// The grid shows a duplicate as labelled (class unknown to this page).
function markDuplicate(id) {
  const shown = state.gridImages.get(id);
  if (shown && (shown.sample === null || shown.sample === undefined)) shown.sample = -1;
  markFigure(id);
}

async function withBusy(fn) {
  state.busy = true;
  updateLabelControls();
  try { await fn(); } finally {
    state.busy = false;
    updateLabelControls();
  }
}

function advance(id) {
  state.handled.add(id);
  state.prefetched.delete(id);
  showNext();
  refreshQueueQuietly();
}

// ---------------------------------------------------------------- label: traffic grid

function gridParams() {
  const params = new URLSearchParams({ limit: String(GRID_LIMIT) });
  const cls = $("filter-class").value;
  if (cls) params.set("class", cls);
  const max = Number($("filter-confidence").value);
  if (max < 1) params.set("max_confidence", String(max));
  if ($("filter-unlabelled").checked) params.set("unlabelled", "true");
  return params;
}

async function loadGrid() {
  const seq = ++state.gridSeq;
  const started = performance.now();
  delete document.body.dataset.gridLoadedMs;
  document.body.dataset.gridState = "loading";
  const data = await api(`/traffic?${gridParams()}`).catch((err) => {
    if (seq === state.gridSeq) document.body.dataset.gridState = "error";
    throw err;
  });
  if (seq !== state.gridSeq) return; // filters changed meanwhile
  const images = data.images || [];
  renderGrid(images);
  const kept = data.kept;
  $("traffic-kept").textContent = kept
    ? `showing ${images.length} · ${kept.count} of at most ${kept.limit} recent images kept`
    : `showing ${images.length}`;
  waitForVisibleThumbs(seq, started);
}

function renderGrid(images) {
  state.gridImages = new Map(images.map((img) => [img.id, img]));
  const frag = document.createDocumentFragment(); // one insertion, one layout
  for (const image of images) frag.append(thumbFigure(image));
  if (!images.length) frag.append(el("p", { class: "muted empty-grid" }, "No images match these filters."));
  $("traffic-grid").replaceChildren(frag);
  markCurrentFigure();
}

function thumbFigure(image) {
  const picture = image.has_thumbnail
    ? el("img", { src: thumbUrl(image.id), loading: "lazy", decoding: "async", width: THUMB, height: THUMB, alt: `Image ${image.id}` })
    : el("div", { class: "no-thumb" }, "no preview");
  const fig = el("figure", { class: "thumb", "data-id": image.id, title: image.name || null },
    picture,
    el("figcaption", null,
      el("span", { class: "cls" }, image.predicted ?? "?"),
      el("span", { class: "conf" }, pct(image.confidence, 0)),
      el("span", { class: "status" })));
  applyFigureState(fig, image);
  return fig;
}

function applyFigureState(fig, image) {
  const cls = labelledClass(image);
  fig.classList.toggle("labelled", cls !== undefined);
  fig.classList.toggle("skipped", cls === undefined && !!image.skipped);
  const status = fig.querySelector(".status");
  status.textContent = cls !== undefined ? `labelled${cls ? ` ${cls}` : ""}` : image.skipped ? "skipped" : "";
  if (cls) fig.dataset.label = cls;
}

function findFigure(id) {
  return $("traffic-grid").querySelector(`figure[data-id="${CSS.escape(String(id))}"]`);
}

function markFigure(id) {
  const fig = findFigure(id);
  const image = state.gridImages.get(id);
  if (fig && image) applyFigureState(fig, image);
}

function markCurrentFigure() {
  for (const fig of $("traffic-grid").querySelectorAll("figure.current")) fig.classList.remove("current");
  const fig = state.current && findFigure(state.current.image.id);
  if (fig) fig.classList.add("current");
}

// Time from the fetch start until every thumbnail in the viewport has loaded (or failed).
function waitForVisibleThumbs(seq, started) {
  const height = window.innerHeight || document.documentElement.clientHeight;
  const width = window.innerWidth || document.documentElement.clientWidth;
  const visible = [...$("traffic-grid").querySelectorAll("img")].filter((img) => {
    const r = img.getBoundingClientRect();
    return r.width > 0 && r.bottom > 0 && r.top < height && r.right > 0 && r.left < width;
  });
  const pending = visible.filter((img) => !img.complete);
  const finish = () => {
    if (seq !== state.gridSeq) return;
    document.body.dataset.gridLoadedMs = String(Math.round(performance.now() - started));
    document.body.dataset.gridState = "ready";
  };
  let left = pending.length;
  if (!left) { finish(); return; }
  const one = () => { if (--left === 0) finish(); };
  for (const img of pending) {
    img.addEventListener("load", one, { once: true });
    img.addEventListener("error", one, { once: true });
  }
}

function onGridClick(e) {
  const fig = e.target.closest("figure[data-id]");
  if (!fig) return;
  const image = state.gridImages.get(Number(fig.dataset.id)) || state.gridImages.get(fig.dataset.id);
  if (!image) return;
  setCurrent({ image, reason: null, from: "grid" });
  if (document.activeElement instanceof HTMLElement) document.activeElement.blur();
  const panel = $("label-panel");
  if (panel.getBoundingClientRect().top < 0) panel.scrollIntoView({ behavior: "smooth", block: "start" });
}

// Rebuilt at each sign-in (the classes may have changed); keeps the choice if it still exists.
function buildClassFilter(classes) {
  const select = $("filter-class");
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "All classes"), ...classes.map((c) => el("option", { value: c }, c)));
  select.value = classes.includes(chosen) ? chosen : "";
}

function onFilterChange(e) {
  const max = Number($("filter-confidence").value);
  $("filter-confidence-value").textContent = max < 1 ? `≤ ${pct(max, 0)}` : "any";
  if (e && e.type === "input") return; // the slider reloads on release only
  if (e && e.target instanceof HTMLElement) e.target.blur(); // give the keys back to labelling
  loadGrid().catch((err) => report(err, "Loading recent traffic failed"));
}

// ---------------------------------------------------------------- classes

async function loadClasses() {
  const data = await api("/classes");
  const rows = data.classes || [];
  const min = Number(data.min_samples) || 0;
  const taking = rows.filter((r) => r.takes_part);
  $("classes-summary").textContent =
    `${taking.length} of ${rows.length} classes take part in the next run. A class takes part once it has ${min} training labels.`;
  const frag = document.createDocumentFragment();
  for (const r of rows) {
    frag.append(el("tr", { class: r.takes_part ? "takes-part" : null, "data-class": r.class },
      el("th", { scope: "row" }, r.class),
      el("td", { class: "num" }, r.train),
      el("td", { class: "num" }, r.validation),
      el("td", null, r.takes_part ? "yes" : "no"),
      el("td", { class: "num" }, r.missing ? r.missing : "–")));
  }
  $("classes-body").replaceChildren(frag);
  drawClassChart($("classes-chart"), rows, min);
}

// Horizontal bars of training labels, with a vertical line at min_samples.
function drawClassChart(root, rows, min) {
  const W = 640, LABEL = labelWidth(rows.map((r) => r.class)), RIGHT = 40, ROW = 22, TOP = 22;
  const max = Math.max(min, 1, ...rows.map((r) => Number(r.train) || 0));
  const scale = (W - LABEL - RIGHT) / max;
  const H = TOP + rows.length * ROW + 6;
  setAttrs(root, { viewBox: `0 0 ${W} ${H}`, width: "100%", preserveAspectRatio: "xMinYMin meet" });
  const parts = [];
  rows.forEach((r, i) => {
    const y = TOP + i * ROW;
    const w = (Number(r.train) || 0) * scale;
    parts.push(
      svg("text", { x: LABEL - 8, y: y + ROW / 2, class: "axis-label", "text-anchor": "end", "dominant-baseline": "middle" }, r.class),
      svg("rect", { x: LABEL, y: y + 3, width: Math.max(w, 0), height: ROW - 6, rx: 2, class: r.takes_part ? "bar part" : "bar" }),
      svg("text", { x: LABEL + w + 5, y: y + ROW / 2, class: "value", "dominant-baseline": "middle" }, r.train));
  });
  const x = LABEL + min * scale;
  parts.push(
    svg("line", { x1: x, x2: x, y1: TOP - 4, y2: H - 2, class: "min-line" }),
    svg("text", { x, y: TOP - 8, class: "min-label", "text-anchor": "middle" }, `min ${min}`));
  root.replaceChildren(...parts);
}

function labelWidth(labels) {
  const longest = Math.max(1, ...labels.map((l) => String(l).length));
  return Math.min(220, Math.max(40, longest * 8 + 16));
}

// ---------------------------------------------------------------- adapt

async function loadAdapt() {
  const data = await api("/adapt");
  renderRunning(data.running || null);
  renderLast(data.last || null);
  openEvents();
}

async function startAdapt() {
  const ok = await confirmDialog(
    "Start adaptation now? The agent trains a new version from the labelled samples and serves it only if the gate passes it.",
    "Start adaptation");
  if (!ok) return;
  try {
    const res = await api("/adapt", { method: "POST", body: {} });
    const started = (res && res.started) || {};
    renderRunning({ method: started.method, step: 0, steps: started.steps });
    showMessage(`Adaptation started (${started.method || "default method"}, ${started.steps ?? "?"} steps).`, "ok");
  } catch (err) {
    report(err, "Adaptation did not start");
  }
  openEvents();
}

function renderRunning(run) {
  const progress = $("adapt-progress");
  state.running = !!run;
  $("start-adapt").disabled = !!run;
  progress.max = run ? Math.max(Number(run.steps) || 0, 1) : 1;
  progress.value = run ? Math.min(Number(run.step) || 0, progress.max) : 0;
  $("adapt-status").textContent = run
    ? `Training (${run.method || "?"}): step ${run.step ?? 0} of ${run.steps ?? "?"}.` : "No run in progress.";
}

// Server-Sent Events: `progress` while training, `done` with the result, `idle` when nothing
// runs. The server ends the stream after `done` or `idle`; we then listen again a little later
// (a run can also start from the fleet, the CLI or a label count) instead of letting
// EventSource's own retry look like a lost connection.
function openEvents() {
  clearTimeout(state.reopenTimer);
  if (state.events || state.signedOut || state.view !== "adapt") return;
  const source = new EventSource(`${API}/adapt/events`);
  state.events = source;
  const live = $("adapt-live");
  source.addEventListener("open", () => { live.textContent = ""; });
  source.addEventListener("progress", (e) => {
    const run = parseJson(e.data);
    if (run) renderRunning(run);
    live.textContent = "live";
  });
  source.addEventListener("done", (e) => {
    endStream();
    renderRunning(null);
    $("adapt-progress").value = 1;
    $("adapt-status").textContent = "Run finished.";
    renderLast(parseJson(e.data));
  });
  source.addEventListener("idle", () => {
    endStream();
    // A run we showed as going ended while nobody listened: fetch its result.
    if (state.running) loadAdapt().catch((err) => report(err));
  });
  source.addEventListener("error", () => {
    if (state.events !== source) return;
    if (source.readyState === EventSource.CONNECTING) { live.textContent = "reconnecting…"; return; }
    // Refused (an expired session, say): ask once in plain JSON to learn why.
    closeEvents();
    live.textContent = "live progress stopped";
    api("/adapt").then(() => endStream(), (err) => report(err, "Live progress stopped"));
  });
}

function endStream() {
  closeEvents();
  if (state.view === "adapt" && !state.signedOut) state.reopenTimer = setTimeout(openEvents, RELISTEN_MS);
}

function closeEvents() {
  clearTimeout(state.reopenTimer);
  if (state.events) state.events.close();
  state.events = null;
}

// `last` is a RunResult, {error}, or null (no run yet).
function renderLast(last) {
  const box = $("verdict");
  const kind = !last ? "" : last.error ? "failed" : last.promoted ? "promoted" : "rejected";
  box.className = `verdict ${kind}`.trim();
  if (last && last.version !== undefined) box.dataset.version = String(last.version);
  const v = last && last.version !== null && last.version !== undefined ? `version ${last.version}` : null;
  const title = !last ? "No adaptation run yet."
    : last.error ? `Failed: ${last.error}`
    : last.promoted ? `Promoted: ${v || "the new version"} is now served`
    : `Rejected: ${v ? `${v} did not pass the gate and is not served` : "the served version stays"}`;
  box.replaceChildren(el("p", { class: "verdict-title" }, title));
  const reasons = (last && last.reasons) || [];
  if (reasons.length) box.append(el("ul", { class: "reasons" }, reasons.map((r) => el("li", null, r))));
  renderMetrics(kind === "promoted" || kind === "rejected" ? last : null);
}

// The gate's checks; each pair is [adapted, reference].
const GATE_CHECKS = [
  ["seen_validation", "Seen classes: validation accuracy", "served version"],
  ["unseen_rate", "Traffic predicted as an unseen class", "source model"],
  ["reference_unseen", "Unseen classes: reference accuracy", "source model"],
];

function renderMetrics(run) {
  const metrics = (run && run.metrics) || {};
  const gate = metrics.gate || {};
  const body = $("gate-body");
  body.replaceChildren(...GATE_CHECKS.map(([key, name, ref]) => {
    const pair = Array.isArray(gate[key]) ? gate[key] : null;
    if (!pair) return el("tr", null, el("th", { scope: "row" }, name), el("td", { class: "num muted", colspan: 3 }, "not checked"));
    return el("tr", { "data-check": key },
      el("th", { scope: "row" }, name, el("span", { class: "muted small" }, ` (before = ${ref})`)),
      el("td", { class: "num" }, pct(pair[1])), el("td", { class: "num" }, pct(pair[0])),
      el("td", { class: "num" }, points(pair[1], pair[0])));
  }));
  const details = [];
  if (run && run.method) details.push(["method", run.method]);
  if (typeof metrics.seconds === "number") details.push(["took", `${metrics.seconds.toFixed(1)} s`]);
  $("run-details").replaceChildren(...kvNodes(details));
  renderChart(metrics, gate);
  drawPairChart($("health-chart"), healthRows(metrics.health || {}));
}

// The health indicators: accuracy on the reference samples of unseen classes, the share of
// traffic predicted as an unseen class, and agreement with the source model's predictions;
// [adapted, source] pairs except the agreement (the source agrees with itself on every image).
const HEALTH = [
  ["reference_unseen", "Unseen, reference"],
  ["predicted_unseen_rate", "Traffic as unseen"],
  ["source_agreement", "Agrees with source"],
];

function healthRows(health) {
  return HEALTH.filter(([key]) => health[key] !== null && health[key] !== undefined).map(([key, label]) => {
    const v = health[key];
    return Array.isArray(v) ? { label, before: v[1], after: v[0] } : { label, before: 1, after: v };
  });
}

function renderChart(metrics, gate) {
  const perClass = metrics.per_class && typeof metrics.per_class === "object" ? metrics.per_class : null;
  let rows;
  if (perClass && Object.keys(perClass).length) {
    const order = state.session.classes.filter((c) => c in perClass)
      .concat(Object.keys(perClass).filter((c) => !state.session.classes.includes(c)));
    rows = order.map((c) => ({ label: c, before: perClass[c]?.[1], after: perClass[c]?.[0] }));
    $("chart-title").textContent = "Accuracy per class (validation samples)";
    $("legend-before").textContent = "before (source)";
  } else {
    rows = GATE_CHECKS.filter(([key]) => Array.isArray(gate[key]))
      .map(([key, name]) => ({ label: name, before: gate[key][1], after: gate[key][0] }));
    $("chart-title").textContent = "Gate figures";
    $("legend-before").textContent = "before (reference)";
  }
  drawPairChart($("per-class-chart"), rows);
}

// Grouped horizontal bars, before and after, on a 0-100 % scale.
function drawPairChart(root, rows) {
  const W = 640, LABEL = labelWidth(rows.map((r) => r.label)), RIGHT = 56, BAR = 10, ROW = 2 * BAR + 10, TOP = 20;
  const span = W - LABEL - RIGHT;
  const H = TOP + Math.max(rows.length, 1) * ROW + 4;
  setAttrs(root, { viewBox: `0 0 ${W} ${H}`, width: "100%", preserveAspectRatio: "xMinYMin meet" });
  const parts = [];
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    const x = LABEL + t * span;
    parts.push(svg("line", { x1: x, x2: x, y1: TOP - 4, y2: H - 2, class: "grid-line" }),
      svg("text", { x, y: TOP - 8, class: "tick", "text-anchor": "middle" }, `${t * 100}%`));
  }
  if (!rows.length) parts.push(svg("text", { x: LABEL, y: TOP + 16, class: "value" }, "No figures for this run."));
  rows.forEach((r, i) => {
    const y = TOP + i * ROW + 4;
    parts.push(svg("text", { x: LABEL - 8, y: y + BAR, class: "axis-label", "text-anchor": "end", "dominant-baseline": "middle" }, r.label));
    [["before", r.before, y], ["after", r.after, y + BAR]].forEach(([kind, v, by]) => {
      const ok = typeof v === "number" && Number.isFinite(v);
      const w = ok ? Math.max(0, Math.min(1, v)) * span : 0;
      parts.push(svg("rect", { x: LABEL, y: by, width: w, height: BAR - 1, class: `bar ${kind}` }),
        svg("text", { x: LABEL + w + 4, y: by + BAR / 2, class: "value small", "dominant-baseline": "middle" }, pct(v, 0)));
    });
  });
  root.replaceChildren(...parts);
}

// ---------------------------------------------------------------- versions

async function loadVersions() {
  const data = await api("/versions");
  state.serving = data.serving;
  const versions = (data.versions || []).slice().sort((a, b) => b.id - a.id); // newest first
  $("serving-line").textContent = `Serving version ${data.serving}${data.serving === 0 ? " (the source model)" : ""}.`;
  $("rollback-source").disabled = data.serving === 0;
  $("rollback-source").title = data.serving === 0 ? "The source model is served already" : "";
  $("versions-body").replaceChildren(...versions.map(versionRow));
}

function versionRow(v) {
  const served = v.id === state.serving;
  const seen = v.metrics && v.metrics.gate && Array.isArray(v.metrics.gate.seen_validation)
    ? `${pct(v.metrics.gate.seen_validation[1])} → ${pct(v.metrics.gate.seen_validation[0])}` : "–";
  const samples = v.samples ? `${v.samples.train} / ${v.samples.validation}` : "–";
  const why = v.status === "rejected" ? "Rejected by the gate: a rejected version cannot be served"
    : served ? "This version is served now" : null;
  const button = el("button", {
    type: "button", class: "rollback", "data-version": v.id, disabled: !!why, title: why,
  }, "Roll back to this");
  const reasons = (v.reasons || []).length
    ? el("ul", { class: "reasons small" }, v.reasons.map((r) => el("li", null, r))) : null;
  return el("tr", { class: [served ? "serving" : "", v.status].join(" ").trim(), "data-version": v.id },
    el("th", { scope: "row" }, `${v.id}`, served ? el("span", { class: "badge" }, "serving") : null),
    el("td", null, el("span", { class: `status ${v.status}` }, v.status), reasons),
    el("td", null, v.method || "–"),
    el("td", null, when(v.created_ms)),
    el("td", { class: "num" }, samples),
    el("td", null, seen),
    el("td", null, button));
}

async function rollback(to, what) {
  const from = state.serving === null ? "the current version" : `version ${state.serving}`;
  const ok = await confirmDialog(`Serve ${what} instead of ${from}?`, "Roll back");
  if (!ok) return;
  try {
    const res = await api("/rollback", { method: "POST", body: { to } });
    showMessage(`Now serving version ${res.serving}${res.serving === 0 ? " (the source model)" : ""}.`, "ok");
  } catch (err) {
    report(err, "Rollback failed");
  }
  await runLoader("versions");
}

function onVersionsClick(e) {
  const button = e.target.closest("button.rollback[data-version]");
  if (!button || button.disabled) return;
  const id = button.dataset.version;
  // Version 0 is the source model; the API names it "source".
  if (id === "0") rollback("source", "the source model (version 0)");
  else rollback(id, `version ${id}`);
}

// ---------------------------------------------------------------- device

async function loadDevice() {
  const data = await api("/device");
  const { events, ...info } = data || {};
  $("device-info").replaceChildren(...kvNodes(flatten(info).map(([k, v]) => [k, formatValue(k, v)])));
  const list = (events || []).map((ev) => {
    const payload = ev.payload === undefined ? "" : JSON.stringify(ev.payload);
    return el("li", { "data-id": ev.id },
      el("span", { class: "ev-time" }, when(ev.at_ms)),
      el("strong", { class: "ev-kind" }, ev.kind),
      el("code", { class: "ev-payload", title: payload }, payload.length > 160 ? `${payload.slice(0, 157)}…` : payload));
  });
  $("device-events").replaceChildren(...(list.length ? list : [el("li", { class: "muted" }, "No events.")]));
}

// Nested objects become dotted keys; a big object (a per-class table, say) stays on one line.
function flatten(obj, prefix = "", out = []) {
  for (const [k, v] of Object.entries(obj || {})) {
    const key = prefix ? `${prefix}.${k}` : k;
    const nested = v && typeof v === "object" && !Array.isArray(v);
    if (nested && Object.keys(v).length <= 6) flatten(v, key, out);
    else out.push([key, v]);
  }
  return out;
}

function formatValue(key, v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "number") {
    if (/bytes$/.test(key)) return bytes(v);
    if (/(_ms|\.ms)$/.test(key) && v > 1e12) return when(v);
    return Number.isInteger(v) ? v.toLocaleString() : String(Math.round(v * 1000) / 1000);
  }
  if (Array.isArray(v)) return v.map((x) => (typeof x === "object" ? JSON.stringify(x) : String(x))).join(", ");
  if (typeof v === "object") return Object.entries(v).map(([a, b]) => `${a}: ${typeof b === "object" ? JSON.stringify(b) : b}`).join(" · ");
  return String(v);
}

function kvNodes(pairs) {
  return pairs.flatMap(([k, v]) => [el("dt", null, k), el("dd", null, v)]);
}

// ---------------------------------------------------------------- session, sign-in and start-up

// What the message bar says once the agent has answered GET session, by why it was asked:
// `login` when it asks for a sign-in, `resumed` when it starts a session itself (a console that
// needs no sign-in: loopback with no users). [text, kind], or null for nothing.
const SESSION_NOTICES = {
  start: { login: null, resumed: null },
  expired: {
    login: ["Your session expired: sign in again.", "error"],
    resumed: ["Your session expired and a new one has started: repeat the last step if it did not take effect.", "error"],
  },
  logout: {
    login: ["You are logged out.", "ok"],
    resumed: ["You are logged out. This console needs no sign-in here, so a new session has started.", "ok"],
  },
};

function notify(notice) {
  if (notice) showMessage(notice[0], notice[1]);
}

// Asks the agent for the session. `why`: "start", "expired" (a call answered 401) or "logout".
async function resume(why) {
  const notices = SESSION_NOTICES[why];
  let session;
  try {
    session = await api("/session", { anonymous: true });
  } catch (err) {
    if (err.status === 401) {
      showLogin(why);
      notify(notices.login);
    } else if (why === "start") {
      report(err, "Could not start the console");
    } else {
      showLogin(why);
      showMessage(err.message, "error");
    }
    return;
  }
  startSession(session);
  notify(notices.resumed);
}

// The session ended (a 401, or logging out): once per session, stop everything live and ask
// the agent whether a sign-in is needed.
function signedOut(why) {
  if (state.signedOut) return;
  state.signedOut = true;
  document.body.dataset.session = "signed-out";
  closeEvents();
  clearTimeout(state.emptyTimer);
  closeConfirm(false);
  resume(why);
}

// The sign-in view replaces the nav, the user and every other view. After an expiry the user
// name is filled in; after logging out it is cleared (the next person may be someone else).
function showLogin(why) {
  state.signedOut = true;
  state.view = "login";
  document.body.dataset.view = "login";
  document.body.dataset.session = "login";
  for (const v of VIEWS) $(`view-${v}`).hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  const view = $("view-login");
  view.hidden = false;
  view.dataset.state = "ready";
  const user = $("login-user");
  if (why === "logout") user.value = "";
  else if (!user.value && state.session && state.session.user) user.value = state.session.user;
  $("login-password").value = "";
  $("login-submit").disabled = false;
  (user.value ? $("login-password") : user).focus();
}

async function signIn(e) {
  e.preventDefault(); // the form never posts itself
  const view = $("view-login");
  if (view.dataset.state === "loading") return;
  const userInput = $("login-user");
  const passwordInput = $("login-password");
  const user = userInput.value.trim();
  const password = passwordInput.value;
  if (!user || !password) {
    showMessage("Enter your user name and password.", "error");
    (user ? passwordInput : userInput).focus();
    return;
  }
  view.dataset.state = "loading";
  $("login-submit").disabled = true;
  let session;
  try {
    session = await api("/login", { method: "POST", body: { user, password }, anonymous: true });
  } catch (err) {
    // 401: wrong user name or password; 429: too many failures, the agent says for how long.
    view.dataset.state = "error";
    $("login-submit").disabled = false;
    showMessage(`${err.status === 429 ? "Sign-in refused" : "Sign-in failed"}: ${err.message}`, "error");
    passwordInput.value = ""; // the user name stays
    passwordInput.focus();
    return;
  }
  passwordInput.value = "";
  view.dataset.state = "ready";
  startSession(session);
}

// After GET session or a sign-in answers: the header, the class keys and buttons, then the route.
function startSession(session) {
  const classes = (session.classes = session.classes || []);
  if (state.session && state.session.user !== session.user) resetSessionCounts();
  state.session = session;
  state.signedOut = false;
  state.sessionSeq++;
  document.body.dataset.session = "signed-in";
  hideMessage();
  $("view-login").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  $("user").textContent = session.user || "?";
  $("device-id").textContent = session.device_id || "?";
  state.keys = buildKeyMap(classes);
  buildClassButtons(classes);
  buildClassFilter(classes);
  updateLabelControls(); // an image shown before the session ended can be labelled again
  route();
}

// The counters are per person: a different user starts them again.
function resetSessionCounts() {
  state.labelled = 0;
  state.skipped = 0;
  $("labelled-count").textContent = "0";
  $("skipped-count").textContent = "0";
  $("last-action").textContent = "";
}

function logout() {
  api("/logout", { method: "POST", body: {} })
    .then(() => signedOut("logout"), (err) => report(err, "Logging out failed"));
}

function wireEvents() {
  document.addEventListener("keydown", onKeyDown);
  window.addEventListener("hashchange", route);
  $("message").addEventListener("click", (e) => { if (e.target.id === "message-close") hideMessage(); });
  $("login-form").addEventListener("submit", signIn);
  $("confirm-yes").addEventListener("click", () => closeConfirm(true));
  $("confirm-no").addEventListener("click", () => closeConfirm(false));
  $("confirm").addEventListener("click", (e) => { if (e.target.id === "confirm") closeConfirm(false); });
  $("class-buttons").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-class]");
    if (!button || button.disabled) return;
    button.blur(); // keeps a later Enter from pressing this button again
    labelCurrent(button.dataset.class);
  });
  $("confirm-guess").addEventListener("click", (e) => { e.currentTarget.blur(); confirmGuess(); });
  $("skip").addEventListener("click", (e) => { e.currentTarget.blur(); skipCurrent(); });
  $("back-to-queue").addEventListener("click", (e) => { e.currentTarget.blur(); showNext(); });
  $("current-image").addEventListener("error", () => {
    if (state.current) $("current-name").textContent += " — the image could not be loaded (no longer kept?)";
  });
  $("traffic-grid").addEventListener("click", onGridClick);
  for (const id of ["filter-class", "filter-unlabelled", "filter-confidence"]) $(id).addEventListener("change", onFilterChange);
  $("filter-confidence").addEventListener("input", onFilterChange);
  for (const [id, view] of [["refresh-traffic", "label"], ["refresh-classes", "classes"], ["refresh-device", "device"]]) {
    $(id).addEventListener("click", () => runLoader(view));
  }
  $("start-adapt").addEventListener("click", startAdapt);
  $("rollback-source").addEventListener("click", () => rollback("source", "the source model (version 0)"));
  $("versions-body").addEventListener("click", onVersionsClick);
  $("logout").addEventListener("click", logout);
}

function boot() {
  wireEvents();
  resume("start");
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
else boot();
