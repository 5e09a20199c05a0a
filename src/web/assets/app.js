// hexveil merchant dashboard. Plain JavaScript, no dependencies; talks only to this server's
// /api/v1/ with the merchant's API key, which is kept in sessionStorage (this tab only).
"use strict";

const KEY_STORE = "hexveil.apiKey";
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#edf8b1", "#c7e9b4", "#7fcdbb", "#41b6c4", "#1d91c0", "#225ea8", "#0c2c84"];
const HOUR = 3600000;
const DAY = 86400000;

const state = {
  key: null, me: null, privacy: null, cells: new Map(), points: [], area: [],
  times: [], mapTime: null, selected: null, range: null, granularity: "hour",
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path) {
  let res;
  try {
    res = await fetch(path, { headers: { Authorization: "Bearer " + state.key }, cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, "The server cannot be reached. Check your connection and try again.");
  }
  let body = null;
  try { body = await res.json(); } catch (e) { body = null; }
  if (!res.ok) {
    const msg = body && body.error ? body.error : "The server answered " + res.status + ".";
    throw new ApiError(res.status, msg);
  }
  return body;
}

function fmtTime(ms, granularity) {
  const d = new Date(ms);
  if (granularity === "day") {
    return d.toLocaleDateString(undefined, { weekday: "short", day: "numeric", month: "short", timeZone: "UTC" });
  }
  return d.toLocaleString(undefined, { weekday: "short", hour: "2-digit", minute: "2-digit" });
}

function fmtInterval(p) {
  return Math.round(p.ci95_low) + "–" + Math.round(p.ci95_high);
}

function describe(p) {
  if (!p) return "no count released yet";
  if (p.suppressed) {
    return "suppressed: fewer than " + state.privacy.threshold + " (95% interval " + fmtInterval(p) + ")";
  }
  const what = state.granularity === "day" ? " distinct visitors that day" : " devices";
  return p.count + what + " (95% interval " + fmtInterval(p) + ")";
}

// ---- sign in / out --------------------------------------------------------------------------

function showError(msg) {
  const e = $("signin-error");
  e.textContent = msg;
  e.hidden = false;
}

async function signIn(key) {
  state.key = key;
  $("signin-error").hidden = true;
  try {
    state.me = await api("/api/v1/me");
  } catch (e) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORE);
    if (e.status === 401) {
      showError("That API key was not accepted. Check that you copied all of it (it starts with hvk_) and that it has not been revoked.");
    } else if (e.status === 429) {
      showError("Too many requests with this key. " + e.message);
    } else {
      showError("Sign-in failed: " + e.message);
    }
    $("signin").hidden = false;
    $("dashboard").hidden = true;
    $("api-key").focus();
    return;
  }
  sessionStorage.setItem(KEY_STORE, key);
  $("signin").hidden = true;
  $("dashboard").hidden = false;
  $("who").hidden = false;
  $("merchant-name").textContent = state.me.name;
  state.cells = new Map(state.me.area.map((c) => [c.cell, c]));
  try {
    state.privacy = await api("/api/v1/privacy");
    renderPrivacy();
    await Promise.all([loadTraffic(), loadOffers()]);
  } catch (e) {
    status("Could not load your data: " + e.message);
  }
}

function signOut() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  state.me = null;
  $("dashboard").hidden = true;
  $("who").hidden = true;
  $("signin").hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
}

function status(msg) { $("status").textContent = msg; }

// ---- data -----------------------------------------------------------------------------------

function currentRange() {
  const now = state.me.server_time;
  const period = $("period").value;
  if (period === "day") {
    const end = Math.floor(now / HOUR) * HOUR + HOUR;
    return { start: end - 24 * HOUR, end, granularity: "hour" };
  }
  const days = period === "week" ? 7 : 30;
  const end = Math.floor(now / DAY) * DAY + DAY;
  return { start: end - days * DAY, end, granularity: "day" };
}

async function loadTraffic() {
  const r = currentRange();
  state.range = r;
  state.granularity = r.granularity;
  $("period-hint").textContent = r.granularity === "day"
    ? "Days come from a release of their own, once per UTC day after it ends: distinct people per area that day (someone who stays three hours counts once), 95% of counts within ±"
      + Math.round(state.privacy.daily_ci95_half_width) + "."
    : "Hours are released once each, after the hour ends: distinct people per area and hour, 95% of counts within ±"
      + Math.round(state.privacy.ci95_half_width) + ".";
  const qs = "start=" + r.start + "&end=" + r.end + "&granularity=" + r.granularity;
  status("Loading…");
  const [cells, area] = await Promise.all([
    api("/api/v1/foot-traffic?" + qs),
    api("/api/v1/foot-traffic/area?" + qs),
  ]);
  state.points = cells.points;
  state.area = area.points;
  state.times = [...new Set(state.points.map((p) => p.bucket_start))].sort((a, b) => b - a);
  if (!state.times.includes(state.mapTime)) state.mapTime = state.times.length ? state.times[0] : null;
  const sel = $("map-time");
  sel.replaceChildren();
  for (const t of state.times) sel.append(el("option", { value: String(t) }, fmtTime(t, state.granularity)));
  if (!state.times.length) sel.append(el("option", { value: "" }, "nothing released yet"));
  if (state.mapTime !== null) sel.value = String(state.mapTime);
  if (state.times.length) {
    status("Released counts for " + state.times.length + (state.granularity === "day" ? " days." : " hours."));
  } else {
    const due = new Date(Math.floor(state.me.server_time / state.me.bucket_ms) * state.me.bucket_ms
      + state.me.bucket_ms + state.me.grace_ms);
    status("Nothing has been released for this period yet. The current period is released at "
      + due.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" }) + ".");
  }
  renderMap();
  renderChart();
}

const DAY_MS = 86400000;

// Released offer statistics of the newest released UTC day (within the last two weeks).
async function loadOfferStats() {
  const end = Math.floor(Date.now() / DAY_MS) * DAY_MS + DAY_MS;
  const r = await api("/api/v1/offer-stats?start=" + (end - 14 * DAY_MS) + "&end=" + end);
  const latest = r.stats.reduce((d, s) => Math.max(d, s.day), 0);
  const byOffer = new Map(r.stats.filter((s) => s.day === latest).map((s) => [s.offer_id, s]));
  return { latest, byOffer };
}

function fmtReleased(v, low, high) {
  return Math.max(0, v) + " (95%: " + Math.round(low) + "–" + Math.round(high) + ")";
}

async function loadOffers() {
  const data = await api("/api/v1/offers");
  const stats = await loadOfferStats();
  $("stats-day").textContent = stats.latest
    ? "Delivered on " + new Date(stats.latest).toISOString().slice(0, 10) + " (UTC)"
    : "Delivered (no day released yet)";
  const tbody = $("offers").querySelector("tbody");
  tbody.replaceChildren();
  if (!data.offers.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: "5" }, "You have no offers yet."));
    tbody.append(tr);
  }
  for (const o of data.offers) {
    const tr = el("tr");
    const first = el("td");
    first.append(el("strong", {}, o.title));
    if (o.body) first.append(el("div", { class: "offer-body" }, o.body));
    tr.append(first);
    const valid = new Date(o.valid_from).toLocaleDateString() + " – " + new Date(o.valid_until).toLocaleDateString();
    tr.append(el("td", {}, valid));
    tr.append(el("td", { class: "num" }, String(o.max_notifications_per_day)));
    const st = stats.byOffer.get(o.offer_id);
    tr.append(el("td", { class: "num released" }, st ? fmtReleased(st.deliveries, st.deliveries_ci95_low, st.deliveries_ci95_high) : "not released yet"));
    tr.append(el("td", { class: "num released" }, st ? fmtReleased(st.opens, st.opens_ci95_low, st.opens_ci95_high) : "not released yet"));
    tbody.append(tr);
  }
}

// ---- map ------------------------------------------------------------------------------------

function colour(count, max) {
  const t = state.privacy.threshold;
  if (max <= t) return PALETTE[0];
  const f = Math.min(1, Math.max(0, (count - t) / (max - t)));
  return PALETTE[Math.min(PALETTE.length - 1, Math.floor(f * PALETTE.length))];
}

function projection(cells) {
  const lat0 = cells.reduce((s, c) => s + c.boundary[0][0], 0) / cells.length;
  const k = Math.cos((lat0 * Math.PI) / 180);
  const xy = ([lat, lng]) => [lng * k, -lat];
  let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
  for (const c of cells) for (const p of c.boundary) {
    const [x, y] = xy(p);
    minX = Math.min(minX, x); maxX = Math.max(maxX, x); minY = Math.min(minY, y); maxY = Math.max(maxY, y);
  }
  const size = 1000, pad = 10;
  const s = (size - 2 * pad) / Math.max(maxX - minX, maxY - minY);
  const ox = pad + ((size - 2 * pad) - (maxX - minX) * s) / 2;
  const oy = pad + ((size - 2 * pad) - (maxY - minY) * s) / 2;
  return { size, f: (p) => { const [x, y] = xy(p); return [ox + (x - minX) * s, oy + (y - minY) * s]; } };
}

function hatchDefs() {
  const defs = el("svg:defs");
  const pat = el("svg:pattern", { id: "hatch", width: "10", height: "10", patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" });
  pat.append(el("svg:rect", { width: "10", height: "10", fill: "#e9ecef" }));
  pat.append(el("svg:line", { x1: "0", y1: "0", x2: "0", y2: "10", stroke: "#868e96", "stroke-width": "4" }));
  defs.append(pat);
  return defs;
}

function renderMap() {
  const svg = $("map");
  const cells = state.me.area;
  svg.replaceChildren(hatchDefs());
  // A detail line describes the period it was read in: a new period starts without one.
  if ($("cell-detail").dataset.time !== String(state.mapTime)) $("cell-detail").textContent = "";
  if (!cells.length) return;
  const proj = projection(cells);
  svg.setAttribute("viewBox", "0 0 " + proj.size + " " + proj.size);
  const at = new Map(state.points.filter((p) => p.bucket_start === state.mapTime).map((p) => [p.cell, p]));
  const max = Math.max(state.privacy.threshold * 2, ...[...at.values()].filter((p) => !p.suppressed).map((p) => p.count));
  state.max = max;
  const pins = [];
  for (const c of cells) {
    const pts = c.boundary.map(proj.f);
    const poly = el("svg:polygon", { points: pts.map((p) => p[0].toFixed(1) + "," + p[1].toFixed(1)).join(" "),
      tabindex: "0", role: "button", "data-cell": c.cell });
    const p = at.get(c.cell);
    let cls = "cell";
    if (!p) cls += " nodata";
    else if (p.suppressed) cls += " suppressed";
    else poly.setAttribute("fill", colour(p.count, max));
    if (state.selected === c.cell) cls += " selected";
    poly.setAttribute("class", cls);
    const label = "Area " + c.cell + (c.location ? " (your location)" : "") + ": " + describe(p);
    poly.setAttribute("aria-label", label);
    poly.append(el("svg:title", {}, label));
    const centre = pts.reduce((a, q) => [a[0] + q[0] / pts.length, a[1] + q[1] / pts.length], [0, 0]);
    poly.addEventListener("mousemove", (ev) => showTip(ev, c, p));
    poly.addEventListener("mouseleave", hideTip);
    poly.addEventListener("focus", () => { $("cell-detail").textContent = label; });
    poly.addEventListener("blur", hideTip);
    poly.addEventListener("click", () => selectCell(c.cell));
    poly.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); selectCell(c.cell); }
    });
    svg.append(poly);
    if (c.location) pins.push(centre);
  }
  for (const [x, y] of pins) svg.append(el("svg:circle", { class: "pin", cx: x.toFixed(1), cy: y.toFixed(1), r: "9" }));
  renderLegend(max);
}

function showTip(ev, c, p) {
  const tip = $("tooltip");
  const wrap = $("map").parentElement.getBoundingClientRect();
  tip.textContent = describe(p);
  tip.hidden = false;
  // Centred on the pointer, but never past either edge of the window (phones).
  const half = tip.offsetWidth / 2;
  const x = Math.min(Math.max(ev.clientX, half + 4), window.innerWidth - half - 4);
  tip.style.left = (x - wrap.left) + "px";
  tip.style.top = (ev.clientY - wrap.top) + "px";
  $("cell-detail").textContent = "Area " + c.cell + (c.location ? " (your location)" : "") + ": " + describe(p);
  $("cell-detail").dataset.time = String(state.mapTime);
}

function hideTip() { $("tooltip").hidden = true; }
// A tooltip placed for one window width must not hang off a narrower one.
window.addEventListener("resize", hideTip);

function renderLegend(max) {
  const lg = $("legend");
  lg.replaceChildren();
  const t = state.privacy.threshold;
  const step = (max - t) / PALETTE.length;
  PALETTE.forEach((colour, i) => {
    const item = el("span");
    const sw = el("span", { class: "sw" });
    sw.style.background = colour;
    item.append(sw, Math.round(t + i * step) + (i === PALETTE.length - 1 ? "+" : "–" + Math.round(t + (i + 1) * step)));
    lg.append(item);
  });
  const sup = el("span", { class: "legend-suppressed" });
  const s = el("svg:svg", { width: "18", height: "14", "aria-hidden": "true" });
  s.append(hatchDefs());
  s.append(el("svg:rect", { width: "18", height: "14", fill: "url(#hatch)", stroke: "#8a96a3" }));
  sup.append(s, "suppressed (fewer than " + t + ")");
  lg.append(sup);
  const nd = el("span");
  const ndsw = el("span", { class: "sw" });
  ndsw.style.background = "#eef1f4";
  nd.append(ndsw, "not released yet");
  lg.append(nd);
  const pin = el("span", {}, "● your location");
  lg.append(pin);
}

function selectCell(cell) {
  state.selected = cell;
  $("whole-area").disabled = false;
  $("series-name").textContent = "area " + cell;
  for (const poly of $("map").querySelectorAll(".cell")) {
    poly.classList.toggle("selected", poly.getAttribute("data-cell") === cell);
  }
  renderChart();
}

// ---- chart ----------------------------------------------------------------------------------

function renderChart() {
  const svg = $("chart");
  const W = 640, H = 300, L = 48, R = 12, T = 14, B = 36;
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.replaceChildren();
  const series = (state.selected ? state.points.filter((p) => p.cell === state.selected) : state.area)
    .slice().sort((a, b) => a.bucket_start - b.bucket_start);
  $("chart-title").textContent = "Over time: " + (state.selected ? "area " + state.selected : "your whole area");
  if (!series.length) {
    svg.append(el("svg:text", { x: String(W / 2), y: String(H / 2), "text-anchor": "middle" }, "Nothing released yet for this period."));
    $("chart-desc").textContent = "No released counts in this period.";
    return;
  }
  const r = state.range;
  const step = r.granularity === "day" ? DAY : HOUR;
  const x = (t) => L + ((t + step / 2 - r.start) / (r.end - r.start)) * (W - L - R);
  const ymax = Math.max(state.privacy.threshold * 1.5, ...series.map((p) => p.ci95_high));
  const y = (v) => H - B - (v / ymax) * (H - T - B);
  // grid and y axis
  const ticks = 4;
  for (let i = 0; i <= ticks; i++) {
    const v = Math.round((ymax * i) / ticks);
    svg.append(el("svg:line", { class: "grid-line", x1: String(L), x2: String(W - R), y1: y(v).toFixed(1), y2: y(v).toFixed(1) }));
    svg.append(el("svg:text", { x: String(L - 6), y: (y(v) + 4).toFixed(1), "text-anchor": "end" }, String(v)));
  }
  svg.append(el("svg:line", { class: "axis", x1: String(L), x2: String(W - R), y1: String(H - B), y2: String(H - B) }));
  // band
  const top = series.map((p) => x(p.bucket_start).toFixed(1) + "," + y(p.ci95_high).toFixed(1));
  const bottom = series.slice().reverse().map((p) => x(p.bucket_start).toFixed(1) + "," + y(p.ci95_low).toFixed(1));
  svg.append(el("svg:path", { class: "band", d: "M" + top.join(" L") + " L" + bottom.join(" L") + " Z" }));
  // Days are few and far apart (a band through one day has no width): each gets its interval.
  if (r.granularity === "day") {
    for (const p of series) {
      const px = x(p.bucket_start).toFixed(1);
      svg.append(el("svg:line", { class: "ci", x1: px, x2: px, y1: y(p.ci95_low).toFixed(1), y2: y(p.ci95_high).toFixed(1) }));
    }
  }
  // threshold
  const ty = y(state.privacy.threshold).toFixed(1);
  svg.append(el("svg:line", { class: "thr", x1: String(L), x2: String(W - R), y1: ty, y2: ty }));
  svg.append(el("svg:text", { x: String(W - R), y: (Number(ty) - 4).toFixed(1), "text-anchor": "end" }, "suppression threshold " + state.privacy.threshold));
  // line through released counts, broken at suppressed points
  let d = "", pen = false;
  for (const p of series) {
    if (p.suppressed) { pen = false; continue; }
    d += (pen ? " L" : "M") + x(p.bucket_start).toFixed(1) + "," + y(p.count).toFixed(1);
    pen = true;
  }
  if (d) svg.append(el("svg:path", { class: "line", d }));
  for (const p of series) {
    const c = el("svg:circle", { class: "pt" + (p.suppressed ? " suppressed" : ""), cx: x(p.bucket_start).toFixed(1),
      cy: y(p.suppressed ? 0 : p.count).toFixed(1), r: "3.5" });
    c.append(el("svg:title", {}, fmtTime(p.bucket_start, r.granularity) + ": " + describe(p)));
    svg.append(c);
  }
  // x labels
  const every = Math.max(1, Math.ceil(series.length / 6));
  series.forEach((p, i) => {
    if (i % every) return;
    svg.append(el("svg:text", { x: x(p.bucket_start).toFixed(1), y: String(H - B + 16), "text-anchor": "middle" },
      fmtTime(p.bucket_start, r.granularity)));
  });
  const last = series[series.length - 1];
  $("chart-desc").textContent = series.length + " released points; latest (" + fmtTime(last.bucket_start, r.granularity) + "): " + describe(last) + ".";
}

// ---- privacy panel --------------------------------------------------------------------------

function renderPrivacy() {
  const p = state.privacy;
  $("cell-area").textContent = p.cell_area_km2.toFixed(2);
  const box = $("privacy-text");
  box.replaceChildren();
  box.append(el("p", {}, p.explanation));
  box.append(el("h3", {}, "They are"));
  const is = el("ul");
  is.append(el("li", {}, "Counts of distinct phones whose owners agreed to be counted, per area of about " + p.cell_area_km2.toFixed(2) + " km² and per " + p.bucket + "."));
  is.append(el("li", {}, "Noisy on purpose: random noise (" + p.mechanism.replace("_", " ") + ", standard deviation " + p.noise_std_dev.toFixed(1) + ") is added before you see anything. 95% of counts are within ±" + Math.round(p.ci95_half_width) + " of the truth; the shaded band shows each interval."));
  is.append(el("li", {}, "Published once per period, after it ends; looking at them again costs nobody any privacy."));
  box.append(is);
  box.append(el("h3", {}, "They are not"));
  const not = el("ul");
  not.append(el("li", {}, "Not individuals: no device, name or route is ever shown, and each phone counts in at most " + p.max_cells_per_bucket + " areas per period."));
  not.append(el("li", {}, "Not exact: small differences between areas or hours may be noise alone."));
  not.append(el("li", {}, "Not zero when suppressed: counts below " + p.threshold + " are hidden, so a hatched area may have had a few visitors. Hiding them is for readability only — the noise is what protects people, and a suppressed count is as safe to show as any other. Sums over several cells (the whole area, a coarser cell) add every released value, suppressed ones included."));
  not.append(el("li", {}, "Not everyone: people who did not agree to be counted are never included."));
  box.append(not);
  box.append(el("p", {}, "Daily figures are not sums of hours: they are a release of their own — distinct phones per area and UTC day, each phone in at most "
    + p.max_cells_per_day + " areas a day — published once after the day ends, with noise of standard deviation " + p.daily_noise_std_dev.toFixed(1)
    + " (95% within ±" + Math.round(p.daily_ci95_half_width) + "; adding up 24 hourly counts would be ±" + Math.round(p.day_total_ci95_half_width) + ")."));
  box.append(el("p", {}, "Your offers' delivered and opened figures are released the same way: once per UTC day, with noise (standard deviation "
    + p.offer_stats_noise_std_dev.toFixed(1) + "), never as exact counts."));
  box.append(el("h3", {}, "The arithmetic"));
  box.append(el("p", { id: "budget-text" }, p.budget_explanation));
  box.append(el("p", {}, "The guarantee: whatever you look at — foot traffic and offer figures together — what can be learned about any one person is bounded by ε = "
    + p.epsilon_per_device_per_day.toFixed(2) + " for any 24 hours of their life (δ = " + p.delta + "), within the operator's promise of ε ≤ "
    + p.max_epsilon_per_device_per_day + "."));
}

// ---- wiring ---------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) { showError("Enter your API key."); return; }
    signIn(key);
  });
  $("sign-out").addEventListener("click", signOut);
  $("period").addEventListener("change", () => { state.mapTime = null; loadTraffic().catch((e) => status(e.message)); });
  $("map-time").addEventListener("change", (ev) => { state.mapTime = Number(ev.target.value); renderMap(); });
  $("whole-area").addEventListener("click", () => {
    state.selected = null;
    $("whole-area").disabled = true;
    $("series-name").textContent = "the whole area";
    renderMap();
    renderChart();
  });
  setInterval(() => {
    if (!state.key || !state.me) return;
    api("/api/v1/me").then((me) => { state.me.server_time = me.server_time; return loadTraffic(); })
      .catch((e) => status(e.message));
  }, 60000);
  const saved = sessionStorage.getItem(KEY_STORE);
  if (saved) signIn(saved);
});
