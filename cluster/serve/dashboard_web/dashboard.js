// The page of `chimera dashboard`: polls the run's JSON every 2 s and draws it. No libraries:
// the charts are SVG made here, and every piece of text goes in with textContent (never as
// HTML), since genomes, workers, errors and the report are data.
"use strict";

const POLL_MS = 2000;
const MAX_ROWS = 500; // rows drawn at once: a 10,000-candidate run stays responsive
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

const COLUMNS = [ // [key, heading, format, numeric]
  ["id", "id", String, true],
  ["status", "status", String, false],
  ["summary", "genome", String, false],
  ["val_bpb", "val bpb", (v) => v.toFixed(4), true],
  ["params", "params", count, true],
  ["tokens_per_second", "tok/s", (v) => Math.round(v).toLocaleString(), true],
  ["wall_seconds", "wall s", (v) => v.toFixed(1), true],
  ["rung", "rung", String, true],
  ["worker", "worker", String, false],
  ["origin", "parents: what changed", String, false],
];
const state = { rows: [], progress: [], sort: { key: "val_bpb", dir: 1 }, filter: "",
                selected: null, seen: null, bestId: null, promotedPolls: 0 };

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function count(n) {
  if (n === null || n === undefined) return "-";
  return n >= 1e6 ? (n / 1e6).toFixed(2) + "M" : n >= 1e3 ? (n / 1e3).toFixed(0) + "K" : String(n);
}

function fixed(v, digits) { // null stays null (shown as "-" or left out)
  return v === null || v === undefined ? null : v.toFixed(digits);
}

function seconds(s) {
  if (s === null || s === undefined) return "-";
  return s < 120 ? s.toFixed(1) + " s" : s < 7200 ? (s / 60).toFixed(1) + " min"
    : (s / 3600).toFixed(2) + " h";
}

function pairs(dl, entries) {
  dl.replaceChildren();
  for (const [key, value] of entries) {
    if (value === null || value === undefined) continue;
    dl.append(el("dt", key), el("dd", typeof value === "object" ? JSON.stringify(value)
                                                                 : String(value)));
  }
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

// ---------------------------------------------------------------------------- charts
function svgNode(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

// A frame with axes for points {x, y}; returns a function mapping data to pixels. `logX`: a
// logarithmic x axis (parameter counts span decades).
function frame(svg, points, xLabel, yLabel, logX) {
  svg.replaceChildren();
  const [width, height] = svg.getAttribute("viewBox").split(" ").slice(2).map(Number);
  const pad = { left: 52, right: 24, top: 10, bottom: 34 };
  const fx = logX ? Math.log10 : (v) => v;
  const xs = points.map((p) => fx(p.x)), ys = points.map((p) => p.y);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y0 -= 0.01; y1 += 0.01; }
  const sx = (v) => pad.left + (fx(v) - x0) / (x1 - x0) * (width - pad.left - pad.right);
  const sy = (v) => height - pad.bottom - (v - y0) / (y1 - y0) * (height - pad.top - pad.bottom);
  svg.append(svgNode("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right,
                               y2: height - pad.bottom, class: "axis" }),
             svgNode("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom,
                               class: "axis" }));
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + (x1 - x0) * i / 4, yv = y0 + (y1 - y0) * i / 4;
    const xShown = logX ? 10 ** xv : xv;
    svg.append(svgNode("text", { x: pad.left + (width - pad.left - pad.right) * i / 4,
                                 y: height - pad.bottom + 14, "text-anchor": "middle" },
                       Math.abs(xShown) >= 1e4 || (xShown !== 0 && Math.abs(xShown) < 0.01)
                         ? xShown.toExponential(1) : String(+xShown.toFixed(2))),
               svgNode("text", { x: pad.left - 4, y: sy(yv) + 4, "text-anchor": "end" },
                       yv.toFixed(3)));
  }
  svg.append(svgNode("text", { x: width / 2, y: height - 4, "text-anchor": "middle" }, xLabel),
             svgNode("text", { x: 12, y: height / 2, transform: `rotate(-90 12 ${height / 2})`,
                               "text-anchor": "middle" }, yLabel));
  return { sx, sy };
}

function polyline(svg, points, scale, className, stepped) {
  const coords = [];
  points.forEach((p, i) => {
    if (stepped && i > 0) coords.push(`${scale.sx(p.x)},${scale.sy(points[i - 1].y)}`);
    coords.push(`${scale.sx(p.x)},${scale.sy(p.y)}`);
  });
  svg.append(svgNode("polyline", { points: coords.join(" "), class: className }));
}

function dots(svg, points, scale, className, radius) {
  for (const p of points) {
    const dot = svgNode("circle", { cx: scale.sx(p.x), cy: scale.sy(p.y), r: radius,
                                    class: className });
    if (p.title) dot.append(svgNode("title", {}, p.title));
    svg.append(dot);
  }
}

function empty(svg, text) {
  svg.replaceChildren(svgNode("text", { x: 20, y: 30 }, text));
}

// Best so far: each result that scored is a dot; the line is the best bpb up to it.
function drawProgress() {
  const svg = $("progress"), axis = Number($("progress-axis").value);
  const scored = state.progress.filter((p) => p[3] !== null)
    .map((p) => ({ x: p[axis], y: p[3], title: `bpb ${p[3].toFixed(4)}` }));
  if (!scored.length) return empty(svg, "no result scored yet");
  let best = Infinity;
  const line = scored.map((p) => ({ x: p.x, y: (best = Math.min(best, p.y)) }));
  const label = ["results finished", "worker-hours of training", "training FLOPs"][axis];
  const scale = frame(svg, scored, label, "validation bpb", false);
  dots(svg, scored, scale, "dot", 2.5);
  polyline(svg, line, scale, "line", true);
}

// The Pareto front of fewer parameters and lower bpb, by one sweep in parameter order (the
// two-objective case of search.pareto, O(n log n) where its general sort is O(n^2)).
function paretoFront(points) {
  const sorted = [...points].sort((a, b) => a.x - b.x || a.y - b.y);
  const front = [];
  for (const p of sorted) if (!front.length || p.y < front[front.length - 1].y) front.push(p);
  return front;
}

function drawPareto(rows) {
  const svg = $("pareto");
  const points = rows.filter((r) => r.comparable && r.params)
    .map((r) => ({ x: r.params, y: r.val_bpb, title: `#${r.id} ${r.summary}` }));
  if (!points.length) return empty(svg, "no candidate trained to the full budget yet");
  const front = paretoFront(points);
  const scale = frame(svg, points, "parameters (log)", "validation bpb", true);
  dots(svg, points.filter((p) => !front.includes(p)), scale, "dot", 2.5);
  polyline(svg, front, scale, "front-line", true);
  dots(svg, front, scale, "front", 3.5);
}

// ---------------------------------------------------------------------------- the run
function drawRun(run) {
  $("run-name").textContent = run.name;
  document.title = `${run.name} · Chimera dashboard`;
  const best = run.best ? `best #${run.best.id} ${run.best.val_bpb.toFixed(4)} bpb ` +
    `(${run.best.summary}, ${count(run.best.params)})` : "no result yet";
  const budget = run.budget, parts = [best, `${run.candidates} candidates`];
  if (run.elapsed_seconds !== null) parts.push(`${seconds(run.elapsed_seconds)} elapsed`);
  if (budget.train_flops) {
    parts.push(`compute ${budget.train_flops_spent.toExponential(2)} / ` +
               `${budget.train_flops.toExponential(2)} FLOPs`);
  }
  $("summary").textContent = parts.join(" · ");
  $("counts").replaceChildren(...Object.entries(run.counts).filter(([, n]) => n)
    .map(([status, n]) => el("span", `${status} ${n}`, `chip status-${status}`)));
  const s = run.settings;
  pairs($("settings"), [["space", s.space], ["strategy", s.strategy],
    ["objectives", (s.objectives || []).join(", ")], ["population", s.population],
    ["candidate budget", s.candidate_budget], ["hurdles", s.hurdles],
    ["max params", s.max_params], ["workers", s.in_process ? "in process" : s.workers],
    ["corpus", s.corpus], ["seed", s.seed],
    ["tokenizer", s.tokenizer && `${s.tokenizer}, ${s.vocab_size} tokens`],
    ["session limits", Object.entries(budget).filter(([k, v]) => v && k !== "train_flops_spent")
      .map(([k, v]) => `${k} ${v}`).join(", ") || "none"]]);
}

// ---------------------------------------------------------------------------- the table
function compare(key, dir) {
  return (a, b) => {
    const x = a[key], y = b[key];
    if (x === y) return a.id - b.id;
    if (x === null || x === undefined) return 1; // missing values last, either way
    if (y === null || y === undefined) return -1;
    return (x < y ? -1 : 1) * dir;
  };
}

function drawHead() {
  const row = $("leaderboard").tHead.rows[0];
  row.replaceChildren(...COLUMNS.map(([key, heading, , numeric]) => {
    const arrow = state.sort.key === key ? (state.sort.dir > 0 ? " ▲" : " ▼") : "";
    const th = el("th", heading + arrow, numeric ? "num" : "");
    th.dataset.key = key;
    th.addEventListener("click", () => {
      state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : 1 };
      drawHead();
      drawTable();
    });
    return th;
  }));
}

function drawTable() {
  const rows = state.rows.filter((r) => !state.filter || r.status === state.filter)
    .sort(compare(state.sort.key, state.sort.dir));
  const body = $("leaderboard").tBodies[0];
  body.replaceChildren(...rows.slice(0, MAX_ROWS).map((r) => {
    const tr = el("tr", null, r.id === state.selected ? "selected" : "");
    tr.dataset.id = r.id;
    for (const [key, , format, numeric] of COLUMNS) {
      const value = r[key];
      const td = el("td", value === null || value === undefined ? "-" : format(value),
                    numeric ? "num" : key === "origin" ? "wrap" : "");
      if (key === "status") td.className = `status-${value}`;
      tr.append(td);
    }
    tr.addEventListener("click", () => select(r.id));
    return tr;
  }));
  $("shown").textContent = rows.length > MAX_ROWS
    ? `first ${MAX_ROWS} of ${rows.length}; sort or filter for the others` : `${rows.length}`;
}

function drawFilter() {
  const menu = $("status-filter");
  const statuses = [...new Set(state.rows.map((r) => r.status))].sort();
  const have = [...menu.options].map((o) => o.value);
  for (const status of statuses.filter((s) => !have.includes(s))) {
    const option = el("option", status);
    option.value = status;
    menu.append(option);
  }
}

function drawWorkers() {
  const running = state.rows.filter((r) => r.status === "running")
    .sort((a, b) => String(a.worker).localeCompare(String(b.worker)) || a.id - b.id);
  const now = Date.now() / 1000;
  const body = $("workers").tBodies[0];
  body.replaceChildren(...running.map((r) => {
    const tr = el("tr");
    tr.append(el("td", r.worker || "-"), el("td", `#${r.id}`, "link"), el("td", r.summary),
              el("td", r.started_at ? seconds(now - r.started_at) : "-"));
    tr.addEventListener("click", () => select(r.id));
    return tr;
  }));
  if (!running.length) {
    const tr = el("tr");
    tr.append(el("td", "idle", "muted"));
    body.append(tr);
  }
}

// ---------------------------------------------------------------------------- one candidate
async function select(id) {
  state.selected = id;
  for (const tr of $("leaderboard").tBodies[0].rows) {
    tr.classList.toggle("selected", Number(tr.dataset.id) === id);
  }
  try {
    await drawDetail();
  } catch (err) {
    $("detail-panel").hidden = false;
    $("detail-title").textContent = `candidate #${id}: ${err.message}`;
  }
  $("detail-panel").scrollIntoView({ block: "nearest" });
}

async function drawDetail() {
  if (state.selected === null) return;
  const c = await getJson(`/api/candidates/${state.selected}`);
  $("detail-panel").hidden = false;
  $("detail-title").textContent = `candidate #${c.id}: ${c.summary} · ${c.status}` +
    (c.val_bpb !== null ? ` · ${fixed(c.val_bpb, 4)} bpb` : "");
  pairs($("detail-genome"), Object.entries(c.genome));
  pairs($("detail-timings"), [["operator", `${c.operator}, generation ${c.generation}`],
    ["worker", c.worker], ["attempts", c.attempts], ["reused from", c.reused_from],
    ["queued", seconds(c.timings.queued_seconds)], ["ran", seconds(c.timings.running_seconds)],
    ["training", seconds(c.timings.training_seconds)], ["steps", c.steps],
    ["tokens", count(c.tokens)], ["tokens/s", fixed(c.tokens_per_second, 0)],
    ["params", count(c.params)], ["training FLOPs", c.train_flops?.toExponential(2)],
    ["peak memory MB", fixed(c.peak_memory_mb, 0)],
    ["children", c.children.map((n) => "#" + n).join(" ") || null]]);
  $("detail-error").hidden = !c.error;
  $("detail-error").textContent = c.error || "";
  drawParents(c);
  const rungHead = ["rung", "status", "steps", "tokens", "val bpb", "wall s"];
  $("detail-rungs").tHead.rows[0].replaceChildren(...rungHead.map((h) => el("th", h)));
  $("detail-rungs").tBodies[0].replaceChildren(...c.rungs.map((r) => {
    const tr = el("tr");
    tr.append(...[r.rung, r.status, r.steps, count(r.tokens), fixed(r.val_bpb, 4),
                  fixed(r.wall_seconds, 1)].map((v) => el("td", v ?? "-")));
    return tr;
  }));
  const curve = c.loss_curve.filter((p) => p[1] !== null).map(([x, y]) => ({ x, y }));
  if (!curve.length) empty($("detail-loss"), "no loss curve (yet)");
  else polyline($("detail-loss"), curve, frame($("detail-loss"), curve, "step", "loss"), "line");
}

function drawParents(c) {
  const items = c.parents.map((p) => {
    const li = el("li");
    const link = el("span", `#${p.id}`, "link");
    link.addEventListener("click", () => select(p.id));
    const score = fixed(p.val_bpb, 4) ?? p.status;
    li.append(link, el("span", p.summary === undefined ? " (not in this run)"
      : ` ${p.summary} (${score}): ${p.changes || "no expressed change"}`));
    return li;
  });
  if (!items.length) items.push(el("li", `none: ${c.operator}`, "muted"));
  $("detail-parents").replaceChildren(...items);
}

// ---------------------------------------------------------------------------- lineage, promoted
async function drawLineage(bestId) {
  const list = $("lineage");
  if (bestId === null) return list.replaceChildren(el("li", "no result yet", "muted"));
  const lineage = await getJson(`/api/lineage/${bestId}`);
  list.replaceChildren(...lineage.nodes.map((n) => {
    const li = el("li");
    const link = el("span", `#${n.id}`, "link");
    link.addEventListener("click", () => select(n.id));
    li.append(link, el("span", ` gen ${n.generation} ${n.summary} · ` +
      `${n.val_bpb === null ? n.status : n.val_bpb.toFixed(4)} · ${n.origin}`));
    return li;
  }));
}

async function drawPromoted() {
  const promoted = await getJson("/api/promoted");
  $("promoted-panel").hidden = false;
  $("promoted-serve").textContent = `Chat with it: ${promoted.serve}`;
  // the numbers and the small objects (scores, timings); the rest is in the report
  const small = ([, v]) => typeof v !== "object" || JSON.stringify(v).length < 160;
  pairs($("promoted-metrics"), Object.entries(promoted.metrics || {}).filter(small));
  $("promoted-report").textContent = promoted.report || "(report.md not written yet)";
}

// ---------------------------------------------------------------------------- polling
async function poll() {
  try {
    const [run, data] = await Promise.all([getJson("/api/run"), getJson("/api/candidates")]);
    drawRun(run);
    if (data.updated_at !== state.seen) { // redrawn only when the run has changed
      state.seen = data.updated_at;
      state.rows = data.candidates;
      state.progress = data.progress;
      drawFilter();
      drawTable();
      drawProgress();
      drawPareto(data.candidates);
      const bestId = run.best ? run.best.id : null;
      if (bestId !== state.bestId || bestId === null) await drawLineage((state.bestId = bestId));
      await drawDetail();
    }
    drawWorkers(); // each time: how long each has trained grows with no change to the run
    if (run.promoted && state.promotedPolls++ % 5 === 0) await drawPromoted();
    $("status").textContent = `updated ${new Date(run.updated_at * 1000).toLocaleTimeString()}`;
  } catch (err) {
    $("status").textContent = `cannot reach the dashboard server (${err.message}); retrying`;
  }
  setTimeout(poll, POLL_MS);
}

$("status-filter").addEventListener("change", (event) => {
  state.filter = event.target.value;
  drawTable();
});
$("progress-axis").addEventListener("change", drawProgress);
drawHead();
poll();
