// cxr web viewer: plain JS against the REST API of cxr.service.app (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
// cool colours for findings and boxes, so they stand out on the warm heatmap
const COLOURS = ["#4ea1ff", "#50dc78", "#dc5aff", "#00e5ff", "#ffffff", "#a0ff40"];
const PAGE = 20;
const state = { current: null, page: 0, heatImages: {} };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.setAttribute("style", v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

// Access token (cxr serve --tokens): asked for on the first 401, kept for this tab only.
function authHeaders(headers = {}) {
  const token = sessionStorage.getItem("cxr-token");
  return token ? { ...headers, Authorization: `Bearer ${token}` } : headers;
}

async function api(url, options = {}, retried = false) {
  const response = await fetch(url, { ...options, headers: authHeaders(options.headers) });
  if (response.status === 401 && !retried) {
    const token = window.prompt("This server needs an access token:");
    if (token) {
      sessionStorage.setItem("cxr-token", token.trim());
      return api(url, options, true);
    }
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

// An image from the API: a plain URL on an open server; with a token, fetched with it (an <img>
// cannot send an Authorization header) and shown from a blob URL.
async function setImage(img, url) {
  if (!sessionStorage.getItem("cxr-token") || url.startsWith("data:")) { img.src = url; return; }
  const response = await fetch(url, { headers: authHeaders() });
  if (response.ok) img.src = URL.createObjectURL(await response.blob());
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// ---------------------------------------------------------------- viewer

// Grey heatmap PNG (0..255) -> coloured, alpha-by-heat overlay on the canvas.
function drawHeat(name) {
  const canvas = $("heat");
  const ctx = canvas.getContext("2d");
  const src = state.heatImages[name];
  if (!src) { ctx.clearRect(0, 0, canvas.width, canvas.height); return; }
  const img = new Image();
  img.onload = () => {
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const v = px[i] / 255;  // warm ramp (red -> yellow); cool parts stay transparent
      px[i] = 255; px[i + 1] = Math.round(255 * Math.max(0, v * 2 - 1)); px[i + 2] = 0;
      px[i + 3] = Math.round(230 * Math.min(1, Math.max(0, (v - 0.2) / 0.6)));
    }
    ctx.putImageData(data, 0, 0);
    canvas.dataset.drawn = name;
  };
  img.src = src;
}

function drawBoxes(findings, size) {
  const svg = $("boxes");
  const [h, w] = size;
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  findings.forEach((f, k) => {
    for (const b of f.boxes || []) {
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", b.x); r.setAttribute("y", b.y);
      r.setAttribute("width", b.w); r.setAttribute("height", b.h);
      r.setAttribute("fill", "none"); r.setAttribute("stroke", COLOURS[k % COLOURS.length]);
      r.setAttribute("stroke-width", 2.5);
      r.setAttribute("vector-effect", "non-scaling-stroke");
      const t = document.createElementNS(ns, "title"); t.textContent = f.disease; r.append(t);
      svg.append(r);
    }
  });
  svg.style.display = $("show-boxes").checked ? "" : "none";
}

function showFindings(findings, scores, call, abnormal) {
  const box = $("findings");
  box.replaceChildren();
  // the study-level answer first: a study called abnormal may name no finding above its threshold
  if (call && abnormal != null)
    box.append(el("p", { class: "study" }, `Study: ${call} (p abnormal ${abnormal.toFixed(2)})`));
  if (!findings.length) box.append(el("p", { class: "muted" }, "No finding above its threshold."));
  findings.forEach((f, k) => {
    const colour = COLOURS[k % COLOURS.length];
    // each context word with the annotator's confidence in it (of that field's words)
    const sure = f.confidence || {};
    const word = (w, field) => (w && sure[field] != null ? `${w} ${sure[field].toFixed(2)}` : w);
    // what was measured for it (Cardiomegaly: the cardiothoracic ratio from the anatomy model)
    const measured = Object.entries(f.measurements || {}).map(([k, v]) => `${k.replace(/_/g, " ")} ${v.toFixed(2)}`);
    const chips = [word(f.side, "side"), ...(f.location || []).map((w, i) => (i ? w : word(w, "location"))),
                   word(f.severity, "severity"), f.organ, ...measured].filter(Boolean)
      .map((c) => el("span", { class: "chip" }, c));
    box.append(el("div", { class: "finding", style: `--c:${colour}`, "data-disease": f.disease },
      el("div", {}, el("span", { class: "name" }, f.disease), " ",
         el("span", { class: "score muted" }, f.score.toFixed(2))),
      el("div", { class: "bar" }, el("span", { style: `width:${Math.round(f.score * 100)}%` })),
      f.annotation ? el("div", { class: "annotation" }, f.annotation) : null,
      chips.length ? el("div", {}, ...chips) : null,
      // why something is not there (an AP film gets no cardiothoracic ratio)
      ...(f.notes || []).map((n) => el("div", { class: "note muted" }, n)),
      f.boxes && f.boxes.length ? el("div", { class: "muted" }, `${f.boxes.length} box(es)`) : null));
  });
  const table = $("scores");
  table.replaceChildren();
  Object.entries(scores || {}).sort((a, b) => b[1] - a[1]).forEach(([name, s]) =>
    table.append(el("tr", {}, el("td", {}, name), el("td", {}, s.toFixed(3)))));
}

// Show one image: `item` = {findings, scores, image_size, heatmaps, id?, embedding?}, `src` = image.
function show(item, src, subject) {
  state.current = item;
  state.heatImages = item.heatmaps || {};
  $("placeholder").hidden = true;
  $("stage").hidden = false;
  $("subject").textContent = subject;
  const base = $("base");
  base.onload = () => drawBoxes(item.findings, item.image_size || [base.naturalHeight, base.naturalWidth]);
  setImage(base, src);
  const select = $("heat-select");
  select.replaceChildren();
  const names = Object.keys(state.heatImages);
  for (const name of names) select.append(el("option", { value: name }, name));
  if (!names.length) select.append(el("option", { value: "" }, "none"));
  drawHeat(names[0]);
  showFindings(item.findings, item.scores, item.call, item.abnormal);
  $("report-panel").hidden = true;
  $("more-like").disabled = !(item.id || item.embedding);
}

async function annotate(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) { setStatus("Choose a PNG, JPEG or DICOM file first.", true); return; }
  const form = new FormData();
  form.append("file", file);
  const store = $("store").checked;
  setStatus(`Reading ${file.name}…`);
  $("annotate").disabled = true;
  try {
    const r = await api(`/annotate?heatmap=true&image=true&embedding=true&store=${store}`,
                        { method: "POST", body: form });
    show(r, r.image, r.filename);
    markActive(r.id);
    const notes = (r.quality && r.quality.notes) || [];
    setStatus(`${r.findings.length} finding(s) in ${r.filename}` + (store ? ` (archive id ${r.id})` : "")
              + (notes.length ? ` — ${notes.join("; ")}` : ""));
    if (store) { loadStudies(); loadVocabulary(); }
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("annotate").disabled = false;
  }
}

function markActive(id) {
  for (const li of document.querySelectorAll("#studies li")) {
    li.classList.toggle("active", String(li.dataset.id) === String(id));
  }
}

async function openStudy(id) {
  setStatus(`Opening #${id}…`);
  try {
    const r = await api(`/studies/${id}?heatmap=true`);
    show(r, r.image_url, `#${r.id}`);
    markActive(r.id);
    setStatus(`#${r.id}: ${r.findings.length} finding(s)`);
    await loadReport(r.id);
  } catch (e) {
    setStatus(e.message, true);
  }
}

// ---------------------------------------------------------------- the study's report

const MODEL_SAYS = { found: "the model found it", "not found": "the model did not find it",
                     "not read": "no model here reads it" };

// The report text with each mined mention marked: its certainty as the style, the disease as
// label and tooltip; a mention the model did not find (report says X, model does not) stands out.
function markedReport(text, mentions) {
  const spans = new Map();  // "start:end" -> the mentions there (one phrase may name two diseases)
  for (const m of mentions) {
    if (!m.span) continue;
    const key = m.span.join(":");
    if (!spans.has(key)) spans.set(key, []);
    spans.get(key).push(m);
  }
  const ordered = [...spans.values()].sort((a, b) => a[0].span[0] - b[0].span[0]);
  const nodes = [];
  let at = 0;
  for (const group of ordered) {
    const [start, end] = group[0].span;
    if (start < at || end > text.length) continue;  // overlapping or stale: leave it unmarked
    if (start > at) nodes.push(document.createTextNode(text.slice(at, start)));
    const m = group[0];
    const diseases = group.map((g) => g.disease).join(", ");
    const disagree = group.some((g) => g.certainty === "positive" && g.model === "not found");
    const tip = group.map((g) => `${g.disease}: ${g.certainty}; ${MODEL_SAYS[g.model] || g.model}`)
      .join("\n");
    nodes.push(el("mark", { class: `mention ${m.certainty}${disagree ? " disagree" : ""}`,
                            title: tip, "data-disease": diseases, "data-certainty": m.certainty },
                  text.slice(start, end)));
    at = end;
  }
  nodes.push(document.createTextNode(text.slice(at)));
  return nodes;
}

async function loadReport(id) {
  const panel = $("report-panel");
  let r;
  try {
    r = await api(`/studies/${id}/report`);
  } catch (e) {
    panel.hidden = true;
    return;
  }
  if (!state.current || state.current.id !== id) return;  // another image was opened meanwhile
  panel.hidden = false;
  $("report-note").textContent = r.note || "";
  const box = $("report-text");
  if (r.report) box.replaceChildren(...markedReport(r.report, r.mentions));
  else box.replaceChildren(el("p", { class: "muted" },
    r.report === "" ? "The report was not stored." : "No report for this study."));
  panel.querySelector(".legend").hidden = !r.report;  // a key to marks only where there are marks
  const list = $("disagreements");
  list.replaceChildren();
  for (const d of r.report_only) list.append(el("li", { class: "report-only" }, `Report says ${d}, the model does not`));
  for (const d of r.model_only) list.append(el("li", { class: "model-only" }, `Model says ${d}, the report does not`));
  if (r.report && !r.report_only.length && !r.model_only.length) {
    list.append(el("li", { class: "agree" }, "Report and model agree"));
  }
  // beside each of the model's findings: what the report says of it
  const says = new Map(r.model_findings.map((f) => [f.disease, f.report]));
  for (const div of document.querySelectorAll("#findings .finding")) {
    const word = says.get(div.dataset.disease);
    if (!word || word === "no report") continue;
    const cls = word === "positive" ? "agree" : "model-only";
    const text = word === "positive" ? "in the report" : word === "not mentioned"
      ? "not in the report" : `report: ${word}`;
    div.querySelector(".report-says")?.remove();
    div.append(el("div", { class: `report-says ${cls}` }, text));
  }
}

// ---------------------------------------------------------------- archive and search

function label(item) {
  const top = item.findings[0];
  return top ? `${top.disease} ${top.score.toFixed(2)}` : "no finding";
}

async function loadStudies() {
  try {
    const r = await api(`/studies?limit=${PAGE}&offset=${state.page * PAGE}`);
    $("total").textContent = `(${r.total})`;
    $("page").textContent = r.total ? `${state.page + 1} / ${Math.ceil(r.total / PAGE)}` : "";
    $("prev").disabled = state.page === 0;
    $("next").disabled = (state.page + 1) * PAGE >= r.total;
    const list = $("studies");
    list.replaceChildren();
    for (const item of r.items) {
      list.append(el("li", { "data-id": item.id, onclick: () => openStudy(item.id) },
        el("span", {}, `#${item.id} `), el("span", { class: "muted" }, label(item))));
    }
    if (state.current) markActive(state.current.id);
  } catch (e) {
    setStatus(e.message, true);
  }
}

async function loadVocabulary() {
  try {
    const v = await api("/vocabulary");
    for (const [id, values] of [["f-finding", v.diseases], ["f-location", v.locations],
                                ["f-severity", v.severities]]) {
      const select = $(id);
      const keep = select.value;
      while (select.options.length > 1) select.remove(1);
      for (const value of values) select.append(el("option", {}, value));
      select.value = keep;
    }
  } catch (e) { /* menus stay as they are */ }
}

function showResults(items, title) {
  $("search-title").textContent = title;
  const list = $("results");
  list.replaceChildren();
  for (const item of items) {
    const extra = item.distance !== null && item.distance !== undefined
      ? `distance ${item.distance.toFixed(3)}` : label(item);
    const img = el("img", { alt: `image ${item.id}`, loading: "lazy" });
    setImage(img, item.image_url);
    list.append(el("li", { "data-id": item.id, onclick: () => openStudy(item.id) }, img,
      el("div", { class: "caption" }, `#${item.id} · ${extra}`)));
  }
}

async function search(event) {
  event.preventDefault();
  const params = new URLSearchParams();
  const fields = { q: "q", finding: "f-finding", side: "f-side", location: "f-location",
                   severity: "f-severity", min_score: "f-min", report: "f-report",
                   disagree: "f-disagree" };
  for (const [key, id] of Object.entries(fields)) if ($(id).value) params.set(key, $(id).value);
  try {
    const r = await api(`/search?${params}`);
    showResults(r.items, `${r.items.length} image(s) match` +
      (params.toString() ? ` ${decodeURIComponent(params.toString()).replaceAll("&", ", ")}` : ""));
  } catch (e) {
    $("search-title").textContent = e.message;
  }
}

async function moreLikeThis() {
  const item = state.current;
  if (!item) return;
  try {
    const r = item.id
      ? await api(`/search?like_id=${item.id}&k=12`)
      : await api("/search/similar", { method: "POST", headers: { "Content-Type": "application/json" },
                                       body: JSON.stringify({ embedding: item.embedding, k: 12 }) });
    showResults(r.items, `${r.items.length} image(s) most like ${item.id ? "#" + item.id : item.filename}`);
    $("search").scrollIntoView({ behavior: "smooth" });
  } catch (e) {
    $("search-title").textContent = e.message;
  }
}

async function loadHealth() {
  try {
    const h = await api("/health");
    $("model").textContent = `model ${h.model_id} · ${h.archive.images} indexed image(s)`;
  } catch (e) {
    $("model").textContent = `service not ready: ${e.message}`;
  }
}

function setOpacity() {
  const v = $("opacity").value;
  $("heat").style.opacity = v / 100;
  $("opacity-value").textContent = `${v}%`;
}

$("upload-form").addEventListener("submit", annotate);
$("search-form").addEventListener("submit", search);
$("more-like").addEventListener("click", moreLikeThis);
$("opacity").addEventListener("input", setOpacity);
$("heat-select").addEventListener("change", (e) => drawHeat(e.target.value));
$("show-boxes").addEventListener("change", (e) => { $("boxes").style.display = e.target.checked ? "" : "none"; });
$("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); loadStudies(); });
$("next").addEventListener("click", () => { state.page += 1; loadStudies(); });
setOpacity();
loadHealth();
loadStudies();
loadVocabulary();
