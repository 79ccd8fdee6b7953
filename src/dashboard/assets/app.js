// rlft dashboard: polls the JSON API (docs/dashboard.md) and draws with uPlot.
"use strict";

const COLORS = ["#3565d6", "#e8590c", "#2b8a3e", "#ae3ec9", "#d6336c", "#0b7285", "#5c940d", "#862e9c"];
// Metrics shown first, in this order; any other numeric metric follows.
const KEY_METRICS = [
  "objective/scores", "eval/score", "objective/kl", "beta", "train/loss", "eval/loss",
  "loss/policy", "loss/value", "policy/clipfrac", "policy/approxkl", "objective/entropy",
  "response/length_mean", "response/stop_rate", "val/explained_variance",
  "accuracy", "margin", "eval/accuracy", "mean_reward",
  "rewards/accuracies", "rewards/margins", "eval/rewards/accuracies", "rewards/chosen", "rewards/rejected",
  "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_s",
];
const NOT_PLOTTED = new Set(["step", "elapsed", "epoch"]);

const state = { runs: [], shown: new Set(), data: {}, rollouts: {}, charts: {}, initialised: false };

const $ = (id) => document.getElementById(id);

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(url + ": " + r.status);
  return r.json();
}

function color(name) {
  const i = state.runs.findIndex((r) => r.name === name);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

async function refreshRuns() {
  const { runs } = await getJSON("/api/runs");
  state.runs = runs;
  if (!state.initialised && runs.length) {
    runs.slice(0, 4).forEach((r) => state.shown.add(r.name));
    state.initialised = true;
  }
  const box = $("runs");
  box.innerHTML = runs.length ? "" : '<div class="empty">no runs under the given folders</div>';
  for (const r of runs) {
    const el = document.createElement("div");
    el.className = "run";
    el.style.opacity = state.shown.has(r.name) ? 1 : 0.45;
    el.innerHTML = `<span class="swatch" style="background:${color(r.name)}"></span>
      <div><div class="name">${esc(r.name)}</div>
      <div class="meta">${r.kind} · step ${r.last_step} · <span class="badge ${r.status}">${r.status}</span></div></div>`;
    el.onclick = () => { state.shown.has(r.name) ? state.shown.delete(r.name) : state.shown.add(r.name); refreshRuns(); draw(); };
    box.appendChild(el);
  }
  const sel = $("rrun"), keep = sel.value;
  const withRollouts = runs.filter((r) => r.has_rollouts);
  sel.innerHTML = withRollouts.map((r) => `<option>${esc(r.name)}</option>`).join("");
  if (withRollouts.some((r) => r.name === keep)) sel.value = keep;
}

async function pull(kind, name) {
  const store = kind === "metrics" ? state.data : state.rollouts;
  const cur = store[name] || (store[name] = { rows: [], offset: 0 });
  const res = await getJSON(`/api/${kind}?run=${encodeURIComponent(name)}&offset=${cur.offset}`);
  // Per-reward lines {"reward": name, "value": v} become a `reward/<name>` metric.
  const rows = kind === "metrics"
    ? res.rows.map((r) => (typeof r.reward === "string" && typeof r.value === "number" ? { step: r.step, ["reward/" + r.reward]: r.value } : r))
    : res.rows;
  if (rows.length) cur.rows.push(...rows);
  cur.offset = res.offset;
  return res.rows.length;
}

function ema(values, alpha) {
  let prev = null;
  return values.map((v) => {
    if (v == null || !isFinite(v)) return v;
    prev = prev == null ? v : alpha * prev + (1 - alpha) * v;
    return prev;
  });
}

function metricKeys() {
  const keys = new Set();
  for (const name of state.shown) {
    for (const row of (state.data[name] || {}).rows || []) {
      for (const [k, v] of Object.entries(row)) if (typeof v === "number" && !NOT_PLOTTED.has(k) && !k.startsWith("time/")) keys.add(k);
    }
  }
  const first = KEY_METRICS.filter((k) => keys.has(k));
  return first.concat([...keys].filter((k) => !first.includes(k)).sort());
}

function fmt(v) {
  if (v == null || !isFinite(v)) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : v.toFixed(a < 1 ? 4 : 2);
}

// A series of so few points is drawn with markers: one point makes no line at all (an
// `rlft rm` run's evaluation, a run's step-0 and final eval score), two or three barely one.
const MARKERS_BELOW = 5;
function fewPoints(values) {
  let n = 0;
  for (const v of values) if (v != null) n++;
  return n < MARKERS_BELOW;
}

function draw() {
  const xkey = $("xaxis").value, alpha = +$("smooth").value;
  const keys = metricKeys(), box = $("charts");
  let points = 0;
  for (const k of Object.keys(state.charts)) if (!keys.includes(k)) { state.charts[k].plot.destroy(); state.charts[k].el.remove(); delete state.charts[k]; }
  const shown = [...state.shown].filter((n) => state.data[n]);
  for (const key of keys) {
    // One x grid across runs: the union of x values; each run contributes its own series.
    const xs = new Set();
    const perRun = shown.map((n) => {
      const rows = state.data[n].rows.filter((r) => typeof r[key] === "number" && typeof r[xkey] === "number");
      rows.forEach((r) => xs.add(r[xkey]));
      return rows;
    });
    const x = [...xs].sort((a, b) => a - b);
    const series = perRun.map((rows) => {
      const m = new Map(rows.map((r) => [r[xkey], r[key]]));
      points += rows.length;
      return ema(x.map((v) => (m.has(v) ? m.get(v) : null)), alpha);
    });
    const last = perRun.map((rows) => rows.length ? rows[rows.length - 1][key] : null).filter((v) => v != null);
    let c = state.charts[key];
    const width = Math.max(320, (box.clientWidth || 800) / Math.max(1, Math.floor((box.clientWidth || 800) / 360)) - 28);
    if (!c || c.runs !== shown.join("|")) {
      if (c) { c.plot.destroy(); c.el.remove(); }
      const el = document.createElement("div");
      el.className = "chart";
      el.dataset.metric = key;
      el.innerHTML = `<h3>${esc(key)}<span class="last"></span></h3>`;
      box.appendChild(el);
      const opts = {
        width, height: 180, legend: { show: false },
        scales: { x: { time: false } },
        axes: [{ stroke: "#6b7385", grid: { stroke: "#eef0f4" } }, { stroke: "#6b7385", grid: { stroke: "#eef0f4" }, size: 56 }],
        series: [{ label: xkey }].concat(shown.map((n) => ({
          label: n, stroke: color(n), width: 2, spanGaps: true,
          points: { show: (u, i) => fewPoints(u.data[i]), size: 7, fill: color(n) },
        }))),
      };
      c = state.charts[key] = { el, runs: shown.join("|"), plot: new uPlot(opts, [x].concat(series), el) };
    } else {
      c.plot.setData([x].concat(series));
    }
    c.el.dataset.points = perRun.reduce((s, r) => s + r.length, 0);
    c.el.dataset.markers = series.some(fewPoints) ? "1" : "0";
    c.el.querySelector(".last").textContent = last.length ? fmt(last[last.length - 1]) : "";
  }
  // Keep chart order stable: key metrics first.
  keys.forEach((k) => state.charts[k] && box.appendChild(state.charts[k].el));
  if (!keys.length) box.innerHTML = '<div class="empty panel">no metrics yet</div>';
  const s = $("summary");
  s.dataset.charts = keys.length;
  s.dataset.points = points;
  drawRollouts();
}

function drawRollouts() {
  const name = $("rrun").value, data = state.rollouts[name];
  const rows = data ? data.rows : [];
  const steps = [...new Set(rows.map((r) => r.step))].sort((a, b) => b - a);
  const sel = $("rstep"), keep = sel.value;
  sel.innerHTML = '<option value="">all</option>' + steps.map((s) => `<option>${s}</option>`).join("");
  sel.value = steps.map(String).includes(keep) ? keep : "";
  const f = $("rfilter").value.toLowerCase();
  const shown = rows
    .filter((r) => (sel.value === "" || String(r.step) === sel.value))
    .filter((r) => !f || (r.prompt + " " + r.completion).toLowerCase().includes(f))
    .slice(-300).reverse();
  $("rollouts").tBodies[0].innerHTML = shown.map((r) => `<tr>
    <td class="num">${r.step}</td><td class="text">${esc(r.prompt)}</td><td class="text">${esc(r.completion)}</td>
    <td class="num ${r.score > 0 ? "good" : "bad"}">${fmt(r.score)}</td><td class="num">${fmt(r.kl)}</td><td class="num">${fmt(r.advantage)}</td></tr>`).join("");
  $("rcount").textContent = `${shown.length} of ${rows.length} rollouts`;
  $("summary").dataset.rolloutRows = shown.length;
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

async function tick() {
  try {
    await refreshRuns();
    for (const r of state.runs) {
      await pull("metrics", r.name);
      if (r.has_rollouts) await pull("rollouts", r.name);
    }
    draw();
    $("live").textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    $("summary").dataset.ready = "1";
  } catch (e) {
    $("live").textContent = "disconnected: " + e.message;
  }
}

$("smooth").oninput = () => { $("smoothv").textContent = (+$("smooth").value).toFixed(2); draw(); };
$("xaxis").onchange = () => { Object.values(state.charts).forEach((c) => { c.plot.destroy(); c.el.remove(); }); state.charts = {}; draw(); };
$("rrun").onchange = drawRollouts;
$("rstep").onchange = drawRollouts;
$("rfilter").oninput = drawRollouts;
tick();
setInterval(tick, 2000);
