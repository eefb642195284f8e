// The run gallery page: plain DOM code, no framework, no build step. Talks to the Serve app's
// GET /api/run, POST /search, GET /image/<id> and GET /figure/<name>; the embedding map (map.js) to GET /api/map.
"use strict";

const state = { run: null, model: "", k: 8 };
const $ = (id) => document.getElementById(id);

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").title = text;
  $("status").className = isError ? "error" : "";
}

function imageUrl(id) {
  return "/image/" + id.split("/").map(encodeURIComponent).join("/");
}

// A picture with its label; clicking it searches from that stored image.
function tile(id, label, kind, similarity, objectUrl) {
  const box = document.createElement("div");
  box.className = "tile " + kind;
  const img = document.createElement("img");
  img.src = objectUrl || imageUrl(id);
  img.alt = id || "uploaded image";
  img.title = id || "uploaded image";
  if (id) {
    img.dataset.id = id;
    img.addEventListener("click", () => searchById(id));
  }
  box.append(img);
  const caption = document.createElement("span");
  caption.className = "label";
  caption.textContent = label === null ? "?" : label;
  box.append(caption);
  if (similarity !== undefined) {
    const sim = document.createElement("span");
    sim.className = "similarity";
    sim.textContent = similarity.toFixed(3);
    box.append(sim);
  }
  return box;
}

// One query and its neighbours; a neighbour of another class than a labelled query is marked wrong.
function resultRow(answer, objectUrl) {
  const row = document.createElement("div");
  row.className = "result-row";
  row.dataset.query = answer.query.id || "";
  row.append(tile(answer.query.id, answer.query.label, "query", undefined, objectUrl));
  const arrow = document.createElement("span");
  arrow.className = "arrow";
  arrow.textContent = "\u2192";
  row.append(arrow);
  for (const n of answer.neighbours) {
    const kind = answer.query.label === null ? "" : (n.label === answer.query.label ? "right" : "wrong");
    const box = tile(n.id, n.label, "neighbour " + kind, n.similarity);
    row.append(box);
  }
  return row;
}

async function search(fields) {
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) form.append(key, value);
  form.append("k", String(state.k));
  form.append("model", state.model);
  const response = await fetch("/search", { method: "POST", body: form });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || response.statusText);
  return answer;
}

function showSearch(answer, objectUrl, what) {
  const target = $("search-result");
  target.replaceWith(Object.assign(resultRow(answer, objectUrl), { id: "search-result" }));
  setStatus(`${what}: ${answer.neighbours.length} neighbours with ${answer.model} in ${answer.ms} ms`);
  markOnMap(answer.query.id);
  // scroll only when the search row is out of view (a click far down the grid), not for a click on the map beside it
  $("search").scrollIntoView({ behavior: "instant", block: "nearest" });
}

async function searchById(id) {
  setStatus("searching " + id + " ...");
  try {
    showSearch(await search({ id }), null, id);
  } catch (err) {
    setStatus(id + ": " + err.message, true);
  }
}

async function searchUpload(file) {
  setStatus("searching " + file.name + " ...");
  try {
    showSearch(await search({ image: file }), URL.createObjectURL(file), file.name);
  } catch (err) {
    setStatus(file.name + ": " + err.message, true);
  }
}

async function fillGrid() {
  const grid = $("grid");
  grid.textContent = "";
  const answers = await Promise.all(state.run.queries.map((id) => search({ id }).catch((err) => err)));
  for (const answer of answers) {
    if (answer instanceof Error) {
      const line = document.createElement("div");
      line.className = "result-row error";
      line.textContent = answer.message;
      grid.append(line);
    } else {
      grid.append(resultRow(answer));
    }
  }
  const wrong = grid.querySelectorAll(".tile.wrong").length;
  const all = grid.querySelectorAll(".tile.neighbour").length;
  setStatus(`${state.model}: ${all - wrong} of ${all} neighbours of ${answers.length} test queries share their class`);
}

const COLUMNS = [
  ["test acc (probe)", (m) => m.test_acc], ["kNN acc G", (m) => m.knn_acc],
  ["mAP@5 L", (m) => m.L && m.L["map@5"]], ["P@5 L", (m) => m.L && m.L["p@5"]],
  ["mAP@5 G", (m) => m.G && m.G["map@5"]], ["P@5 G", (m) => m.G && m.G["p@5"]],
  ["P@1 G", (m) => m.G && m.G["p@1"]], ["MAP@R G", (m) => m.G && m.G["map@r"]],
];

function renderResults() {
  const { models } = state.run.metrics;
  const table = document.createElement("table");
  const head = table.createTHead().insertRow();
  for (const name of ["model", ...COLUMNS.map((c) => c[0]), "NMI"]) {
    head.append(Object.assign(document.createElement("th"), { textContent: name }));
  }
  const body = table.createTBody();
  for (const [name, entry] of Object.entries(models)) {
    const row = body.insertRow();
    row.dataset.model = name;
    const cells = [name, ...COLUMNS.map((c) => c[1](entry)), (state.run.metrics.clusters[name] || {}).nmi];
    for (const value of cells) {
      row.insertCell().textContent = typeof value === "number" ? value.toFixed(3) : (value ?? "");
    }
    if (name in state.run.models) {
      row.className = "selectable" + (name === state.model ? " selected" : "");
      row.title = "search with " + name;
      row.addEventListener("click", () => pickModel(name));
    }
  }
  $("results").replaceChildren(table);
}

function renderFigures() {
  const figures = state.run.figures.map((name) => {
    const figure = document.createElement("figure");
    const link = Object.assign(document.createElement("a"), { href: "/figure/" + name, target: "_blank" });
    link.append(Object.assign(document.createElement("img"), { src: "/figure/" + name, alt: name }));
    figure.append(link, Object.assign(document.createElement("figcaption"), { textContent: name }));
    return figure;
  });
  $("figures").replaceChildren(...figures);
}

async function pickModel(name) {
  state.model = name;
  $("model").value = name;
  $("upload").disabled = !state.run.models[name];
  $("upload").title = state.run.models[name] ? "" : name + " embeds no new images: search it by clicking images";
  renderResults();
  await fillGrid();
}

async function start() {
  const response = await fetch("/api/run");
  state.run = await response.json();
  $("run-path").textContent = state.run.run;
  for (const name of Object.keys(state.run.models)) {
    $("model").append(Object.assign(document.createElement("option"), { value: name, textContent: name }));
  }
  $("model").addEventListener("change", (event) => pickModel(event.target.value));
  $("k").addEventListener("change", (event) => { state.k = Number(event.target.value); fillGrid(); });
  $("upload").addEventListener("change", (event) => {
    if (event.target.files.length) searchUpload(event.target.files[0]);
  });
  state.k = Number($("k").value);
  renderFigures();
  const map = loadMap().catch((err) => setStatus("cannot load the map: " + err.message, true));
  await pickModel(state.run.default_model);
  await map;
  document.body.dataset.ready = "true";
}

start().catch((err) => setStatus("cannot load the run: " + err.message, true));
