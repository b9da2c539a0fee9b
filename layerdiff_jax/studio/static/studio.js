// The studio page: forms -> JSON requests to the studio's API (layerdiff_jax/studio/server.py), jobs polled
// until they finish, documents drawn from their layer images. No framework and nothing from the internet.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const POLL_MS = 150;
let current = null; // the document shown: what GET /api/documents/<id> returns

function showError(message) {
  $("#error").textContent = message || "";
}

function showStatus(message) {
  $("#status").textContent = message || "";
}

async function api(method, path, body, raw = false) {
  const options = { method };
  if (body !== undefined) {
    options.body = raw ? body : JSON.stringify(body);
    options.headers = { "Content-Type": raw ? "application/octet-stream" : "application/json" };
  }
  const response = await fetch(path, options);
  const reply = await response.json();
  if (!response.ok) throw new Error(reply.error || `${method} ${path}: HTTP ${response.status}`);
  return reply;
}

// A job runs in the server's queue: poll it, saying where it is, until it is done (the job) or failed (throws).
async function waitFor(jobId, what) {
  for (;;) {
    const job = await api("GET", `/api/jobs/${jobId}`);
    if (job.state === "done") return job;
    if (job.state === "failed") throw new Error(job.error);
    showStatus(job.state === "queued"
      ? `${what}: waiting (${job.queue_position} request(s) ahead)`
      : `${what}: running ${job.run_s.toFixed(1)} s`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

// How long a finished job took, and how much of it was compiling programs for new shapes.
function took(job) {
  return `in ${job.run_s.toFixed(1)} s` + (job.compile_s > 0.05 ? ` (${job.compile_s.toFixed(1)} s compiling)` : "");
}

// ------------------------------------------------------------------ the prompt rows

function addLayerRow(prompt = "") {
  const row = $("#layer-row-template").content.firstElementChild.cloneNode(true);
  $(".layer-prompt", row).value = prompt;
  $(".remove-layer", row).onclick = () => { row.remove(); numberRows(); };
  $(".move-up", row).onclick = () => { if (row.previousElementSibling) row.parentNode.insertBefore(row, row.previousElementSibling); numberRows(); };
  $(".move-down", row).onclick = () => { if (row.nextElementSibling) row.parentNode.insertBefore(row.nextElementSibling, row); numberRows(); };
  $("#layer-rows").appendChild(row);
  numberRows();
}

function numberRows() {
  document.querySelectorAll("#layer-rows .layer-row").forEach((row, i) => { $(".row-name", row).textContent = `layer ${i + 1}`; });
}

function layerPrompts() {
  return [...document.querySelectorAll("#layer-rows .layer-prompt")].map((input) => input.value.trim()).filter(Boolean);
}

function showSplit(split) {
  $("#background-prompt").value = split.background_prompt;
  $("#layer-rows").replaceChildren();
  split.layer_prompts.forEach((prompt) => addLayerRow(prompt));
}

async function splitPrompt() {
  showSplit(await api("POST", "/api/split", { prompt: $("#global-prompt").value }));
}

// ------------------------------------------------------------------ generating

function numberOrNull(selector) {
  const text = $(selector).value.trim();
  return text === "" ? null : Number(text);
}

// The settings of the form; steps and guidance left empty are the model's defaults (null).
function settings() {
  return { seed: numberOrNull("#seed") ?? 0, steps: numberOrNull("#steps"), guidance: numberOrNull("#guidance") };
}

async function generate() {
  if (layerPrompts().length === 0) await splitPrompt(); // a global prompt alone: its split, shown before generating
  const body = {
    prompt: $("#global-prompt").value,
    background_prompt: $("#background-prompt").value.trim() || null,
    layer_prompts: layerPrompts(),
    candidates: numberOrNull("#candidates") ?? 1,
    ...settings(),
  };
  const job = await waitFor((await api("POST", "/api/generate", body)).job, "generating");
  showCandidates(job.result.documents);
  showDocument(job.result.documents[0]);
  showStatus(`${job.result.documents.length} candidate(s) ${took(job)}`);
}

function showCandidates(documents) {
  const list = $("#candidates-list");
  list.replaceChildren();
  for (const doc of documents) {
    const img = document.createElement("img");
    img.className = "candidate";
    img.src = doc.composite;
    img.alt = doc.id;
    img.dataset.id = doc.id;
    img.onclick = () => run(async () => showDocument(await api("GET", `/api/documents/${doc.id}`)));
    list.appendChild(img);
  }
}

// ------------------------------------------------------------------ a document

function showDocument(doc) {
  current = doc;
  $("#document").hidden = false;
  $("#document-name").textContent = `${doc.id} (${doc.origin})`;
  $("#document-prompt").textContent = doc.global_prompt;
  $("#version").textContent = `version ${doc.version + 1} of ${doc.versions}`;
  $("#undo").disabled = !doc.can_undo;
  $("#redo").disabled = !doc.can_redo;
  for (const kind of ["ora", "psd", "zip"]) $(`#export-${kind}`).href = `/api/documents/${doc.id}/export/${kind}`;
  document.querySelectorAll(".candidate").forEach((img) => img.classList.toggle("selected", img.dataset.id === doc.id));

  const stack = $("#composite-stack");
  const visible = new Map([...document.querySelectorAll(".layer-card")].map((card) => [card.dataset.index, $(".visible", card).checked]));
  stack.replaceChildren();
  const cards = $("#layers");
  cards.replaceChildren();
  for (const layer of doc.layers) {
    const shown = visible.get(String(layer.index)) ?? true;
    const img = document.createElement("img");
    img.src = layer.image;
    img.alt = `layer ${layer.index}`;
    img.hidden = !shown;
    stack.appendChild(img);
    cards.appendChild(layerCard(doc, layer, img, shown));
  }
}

function layerCard(doc, layer, stackImage, shown) {
  const card = $("#layer-card-template").content.firstElementChild.cloneNode(true);
  card.dataset.index = layer.index;
  $("h3", card).textContent = `${layer.index === 0 ? "background" : `layer ${layer.index}`}: ${layer.prompt}`;
  $(".layer-image", card).src = layer.image;
  const mask = $(".layer-mask", card);
  if (layer.mask) mask.src = layer.mask; else mask.hidden = true;
  const visible = $(".visible", card);
  visible.checked = shown;
  visible.onchange = () => { stackImage.hidden = !visible.checked; };
  $(".regenerate", card).onclick = () => run(() => edit(doc, layer.index, "regenerate", {
    prompt: $(".new-prompt", card).value.trim() || null,
    seed: Number($(".edit-seed", card).value),
  }));
  $(".restyle", card).onclick = () => run(() => edit(doc, layer.index, "restyle", {
    style: $(".style", card).value.trim(),
    strength: Number($(".strength", card).value),
    seed: Number($(".edit-seed", card).value),
  }));
  return card;
}

async function edit(doc, index, kind, body) {
  const { steps, guidance } = settings();
  const submitted = await api("POST", `/api/documents/${doc.id}/layers/${index}/${kind}`, { ...body, steps, guidance });
  const job = await waitFor(submitted.job, kind === "regenerate" ? `regenerating layer ${index}` : `restyling layer ${index}`);
  showDocument(job.result.documents[0]);
  showStatus(`${kind === "regenerate" ? "regenerated" : "restyled"} layer ${index} ${took(job)}`);
}

async function move(direction) {
  showDocument(await api("POST", `/api/documents/${current.id}/${direction}`));
}

async function openFile(file) {
  const data = await file.arrayBuffer();
  const doc = await api("POST", `/api/open?name=${encodeURIComponent(file.name)}`, data, true);
  showCandidates([doc]);
  showDocument(doc);
  showStatus(`opened ${file.name}`);
}

// ------------------------------------------------------------------ wiring

// Runs one action from a control: its error becomes the page's one error line; the page goes on working.
async function run(action) {
  showError("");
  try {
    await action();
  } catch (error) {
    showStatus("");
    showError(error.message);
  }
}

async function start() {
  const info = await api("GET", "/api/info");
  $("#model-info").textContent =
    `${info.checkpoint}: up to ${info.max_layers} layers at ${info.size.join("x")}; ` +
    `${info.steps} steps, guidance ${info.guidance} (${info.settings_from})`;
  $("#steps").placeholder = info.steps;
  $("#guidance").placeholder = info.guidance;
  $("#candidates").max = info.max_candidates;
  $("#split-button").onclick = () => run(splitPrompt);
  $("#add-layer").onclick = () => addLayerRow();
  $("#generate-button").onclick = () => run(generate);
  $("#undo").onclick = () => run(() => move("undo"));
  $("#redo").onclick = () => run(() => move("redo"));
  $("#open-file").onchange = (event) => { if (event.target.files[0]) run(() => openFile(event.target.files[0])); };
  document.body.dataset.ready = "true"; // for tests: the page is wired
}

run(start);
