// The embedding map: the t-SNE points of RUN/eval/map.json (GET /api/map) drawn on a canvas, coloured by
// class or by K-Means cluster. Hovering a point shows its image (GET /image/<id>); clicking it runs the page's
// search from that test image (searchById, app.js). Plain DOM code, no framework, no build step.
"use strict";

// matplotlib's tab10 and tab20, the colours of tsne.png and clusters.png (lib/plots.category_colours)
const TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"];
const TAB20 = ["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78", "#2ca02c", "#98df8a", "#d62728", "#ff9896",
               "#9467bd", "#c5b0d5", "#8c564b", "#c49c94", "#e377c2", "#f7b6d2", "#7f7f7f", "#c7c7c7",
               "#bcbd22", "#dbdb8d", "#17becf", "#9edae5"];
const PAD = 10; // CSS pixels between the outermost points and the canvas edge
const HOVER_RADIUS = 10; // CSS pixels: the nearest point within this distance of the pointer is the one hovered

const embeddingMap = { data: null, colourBy: "label", screen: [], hovered: -1, marked: -1 };

function categoryColours(n) {
  if (n <= 10) return TAB10.slice(0, Math.max(n, 1));
  if (n <= 20) return TAB20.slice(0, n);
  return Array.from({ length: n }, (_, i) => `hsl(${Math.round((300 * i) / (n - 1))}, 75%, 45%)`);
}

function groupNames() {
  const { data, colourBy } = embeddingMap;
  return colourBy === "label" ? data.classes : Array.from({ length: data.clusters }, (_, c) => "cluster " + c);
}

// Canvas pixels of every point, scaled uniformly (t-SNE distances mean the same along both axes), y up.
function project(width, height) {
  const { x, y } = embeddingMap.data;
  const low = (values) => values.reduce((a, b) => Math.min(a, b)), high = (values) => values.reduce((a, b) => Math.max(a, b));
  const [minX, maxX, minY, maxY] = [low(x), high(x), low(y), high(y)];
  const scale = Math.min((width - 2 * PAD) / Math.max(maxX - minX, 1e-9), (height - 2 * PAD) / Math.max(maxY - minY, 1e-9));
  const offsetX = (width - scale * (maxX - minX)) / 2;
  const offsetY = (height - scale * (maxY - minY)) / 2;
  return x.map((xi, i) => [offsetX + scale * (xi - minX), height - offsetY - scale * (y[i] - minY)]);
}

function pointRadius(n) {
  return n <= 500 ? 3.5 : n <= 3000 ? 2.5 : 1.7;
}

function sizeCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

function drawMap() {
  const { data, colourBy } = embeddingMap;
  if (!data) return;
  const box = $("map-box");
  const width = box.clientWidth, height = box.clientHeight;
  const context = sizeCanvas($("map"), width, height);
  sizeCanvas($("map-marks"), width, height);
  embeddingMap.screen = project(width, height);
  const colours = categoryColours(groupNames().length);
  const groups = data[colourBy];
  const radius = pointRadius(data.id.length);
  context.globalAlpha = 0.8; // dense regions read as dense, and a point under another still shows
  embeddingMap.screen.forEach(([px, py], i) => {
    context.fillStyle = colours[groups[i]];
    context.beginPath();
    context.arc(px, py, radius, 0, 2 * Math.PI);
    context.fill();
  });
  drawLegend(colours, groups);
  drawMarks();
}

function drawLegend(colours, groups) {
  const counts = new Array(colours.length).fill(0);
  for (const g of groups) counts[g] += 1;
  const entries = groupNames().map((name, g) => {
    const entry = Object.assign(document.createElement("span"), { className: "legend-entry" });
    const swatch = Object.assign(document.createElement("span"), { className: "swatch" });
    swatch.style.background = colours[g];
    entry.append(swatch, `${name} (${counts[g]})`);
    return entry;
  });
  $("map-legend").replaceChildren(...entries);
}

// Rings around the hovered point and the point last searched from (on a canvas of their own, so moving the
// pointer never redraws the thousands of points below).
function drawMarks() {
  const canvas = $("map-marks");
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const radius = pointRadius(embeddingMap.data.id.length) + 3;
  for (const [index, colour] of [[embeddingMap.marked, "#000"], [embeddingMap.hovered, "#263238"]]) {
    if (index < 0) continue;
    const [px, py] = embeddingMap.screen[index];
    context.strokeStyle = colour;
    context.lineWidth = 2;
    context.beginPath();
    context.arc(px, py, radius, 0, 2 * Math.PI);
    context.stroke();
  }
}

// The point nearest to a pointer at canvas position (cx, cy) within HOVER_RADIUS, or -1.
function pointNear(cx, cy) {
  let best = -1, bestDistance = HOVER_RADIUS * HOVER_RADIUS;
  embeddingMap.screen.forEach(([px, py], i) => {
    const distance = (px - cx) ** 2 + (py - cy) ** 2;
    if (distance <= bestDistance) { best = i; bestDistance = distance; }
  });
  return best;
}

// Where the page drew test image `id`, in the window's coordinates (as a mouse event's clientX/Y), or null.
function mapPoint(id) {
  const index = embeddingMap.data ? embeddingMap.data.id.indexOf(id) : -1;
  if (index < 0) return null;
  const rect = $("map-marks").getBoundingClientRect();
  const [px, py] = embeddingMap.screen[index];
  return { x: rect.left + px, y: rect.top + py };
}

// Ring the point of a test image that was searched from (nothing when it is not on the map).
function markOnMap(id) {
  if (!embeddingMap.data) return;
  embeddingMap.marked = id ? embeddingMap.data.id.indexOf(id) : -1;
  drawMarks();
}

function hover(event) {
  const rect = $("map-marks").getBoundingClientRect();
  const index = pointNear(event.clientX - rect.left, event.clientY - rect.top);
  if (index === embeddingMap.hovered) return;
  embeddingMap.hovered = index;
  const tip = $("map-tip");
  $("map-marks").style.cursor = index < 0 ? "default" : "pointer";
  if (index < 0) {
    tip.hidden = true;
  } else {
    const { data } = embeddingMap;
    const id = data.id[index];
    tip.querySelector("img").src = imageUrl(id);
    tip.querySelector("img").alt = id;
    tip.querySelector("span").textContent = `${data.classes[data.label[index]]}, cluster ${data.cluster[index]}`;
    tip.dataset.id = id;
    const [px, py] = embeddingMap.screen[index];
    tip.hidden = false;
    // beside the point, on the side with room
    tip.style.left = (px < rect.width / 2 ? px + 12 : px - 12 - tip.offsetWidth) + "px";
    tip.style.top = Math.max(0, Math.min(py - 40, rect.height - tip.offsetHeight)) + "px";
  }
  drawMarks();
}

function leave() {
  embeddingMap.hovered = -1;
  $("map-tip").hidden = true;
  drawMarks();
}

function clickMap(event) {
  const rect = $("map-marks").getBoundingClientRect();
  const index = pointNear(event.clientX - rect.left, event.clientY - rect.top);
  if (index >= 0) searchById(embeddingMap.data.id[index]);
}

// Fetch the map and draw it; a run without one gets a line saying why instead.
async function loadMap() {
  const response = await fetch("/api/map");
  const answer = await response.json();
  if (!response.ok) {
    $("map-box").replaceChildren(Object.assign(document.createElement("p"),
      { className: "map-missing", textContent: "no map: " + (answer.error || response.statusText) }));
    $("map-box").classList.add("missing");
    return;
  }
  embeddingMap.data = answer;
  $("map-model").textContent = answer.model + "'s";
  $("map-colour").addEventListener("change", (event) => { embeddingMap.colourBy = event.target.value; drawMap(); });
  const marks = $("map-marks");
  marks.addEventListener("mousemove", hover);
  marks.addEventListener("mouseleave", leave);
  marks.addEventListener("click", clickMap);
  new ResizeObserver(() => drawMap()).observe($("map-box"));
  drawMap();
  $("map-box").dataset.points = String(answer.id.length);
}
