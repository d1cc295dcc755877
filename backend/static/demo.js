// Upload page for the parsing API: POST api/parse?overlay=1 once per photo (or per change of the display settings).
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;   // GET api/info: model version, upload limit, legend
let photo = null;  // the File last chosen

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function swatch(color, kind) {
  const span = document.createElement("span");
  span.className = kind === "outline" ? "swatch outline" : "swatch";
  if (kind !== "outline") span.style.background = color;
  return span;
}

function renderLegend(present) {
  const list = $("legend");
  list.replaceChildren();
  if (!info) return;
  for (const entry of info.legend) {
    const li = document.createElement("li");
    li.dataset.label = entry.label;
    if (present.has(entry.label)) li.className = "present";
    li.append(swatch(entry.color, entry.kind), document.createTextNode(entry.label));
    list.append(li);
  }
}

function renderTables(result) {
  const parts = $("parts").tBodies[0];
  parts.replaceChildren();
  const sorted = [...result.parts].sort((a, b) => (a.person ?? 1e9) - (b.person ?? 1e9) || b.score - a.score);
  for (const part of sorted) {
    const row = parts.insertRow();
    const name = cell(row, "");
    name.append(swatch(part.color, "fill"), document.createTextNode(" " + part.label));
    cell(row, part.person === null ? "–" : "#" + part.person);
    cell(row, part.score.toFixed(3), "num");
    cell(row, part.area.toLocaleString(), "num");
  }
  const humans = $("humans").tBodies[0];
  humans.replaceChildren();
  for (const human of result.humans) {
    const row = humans.insertRow();
    cell(row, "#" + human.id);
    cell(row, human.score.toFixed(3), "num");
    cell(row, human.bbox.join(", "));
  }
  $("parts-section").hidden = false;
}

async function loadInfo() {
  try {
    const response = await fetch("api/info");
    if (!response.ok) throw new Error((await response.json()).message || response.statusText);
    info = await response.json();
    $("model").textContent = `Model ${info.model_version} · uploads up to ${(info.max_upload_bytes / 1048576).toFixed(0)} MB`;
    renderLegend(new Set());
  } catch (err) {
    setStatus("Could not reach the backend: " + err.message, true);
  }
}

async function parsePhoto() {
  if (!photo) return;
  if (info && photo.size > info.max_upload_bytes) {
    setStatus(`${photo.name} is ${(photo.size / 1048576).toFixed(1)} MB: the limit is ${(info.max_upload_bytes / 1048576).toFixed(0)} MB.`, true);
    return;
  }
  const query = new URLSearchParams({ overlay: "1", alpha: $("alpha").value, outline: $("outline").checked ? "1" : "0" });
  const form = new FormData();
  form.append("file", photo);
  setStatus(`Parsing ${photo.name}…`);
  const started = performance.now();
  let result;
  try {
    const response = await fetch("api/parse?" + query, { method: "POST", body: form });
    result = await response.json().catch(() => ({ message: `HTTP ${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(result.message || result.error);
  } catch (err) {
    setStatus(`${photo.name}: ${err.message}`, true);
    return;
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  $("overlay").src = result.overlay_png;
  $("result").hidden = false;
  $("caption").textContent = `${photo.name} · ${result.width}×${result.height}`;
  renderTables(result);
  renderLegend(new Set([...result.parts, ...result.humans].map((item) => item.label)));
  const people = result.humans.length === 1 ? "1 person" : `${result.humans.length} people`;
  setStatus(`${people}, ${result.parts.length} parts in ${seconds} s${result.cached ? " (cached)" : ""}.`);
}

$("file").addEventListener("change", (event) => {
  photo = event.target.files[0] || null;
  parsePhoto();
});
$("alpha").addEventListener("input", () => { $("alpha-value").textContent = Number($("alpha").value).toFixed(2); });
$("alpha").addEventListener("change", parsePhoto);
$("outline").addEventListener("change", parsePhoto);
loadInfo();
