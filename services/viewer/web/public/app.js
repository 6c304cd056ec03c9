// The WSI Toolkit viewer: the slide list (live) and one slide in deep zoom with its overlays.
// Plain DOM and OpenSeadragon; every value from the server is set as text, never as HTML.
"use strict";

const QC_COLOURS = {
  background: "#9e9e9e", blur: "#1e88e5", pen: "#8e24aa", fat: "#fdd835",
  underexposed: "#3e2723", overexposed: "#00bcd4", rejected: "#e53935",
};
const PAGE = 25;
const POLL_MS = 2000;

const state = {
  offset: 0, total: 0, cursor: null, poll: null, listVersion: 0,
  viewer: null, slide: null, mpp: 0, prediction: null,
  attention: null, tissue: null, qc: null, overlayRun: null,
};

const $ = (selector) => document.querySelector(selector);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function say(text) { $("#message").textContent = text || ""; }

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (response.status === 401) {
    $("#login").hidden = false;
    throw new Error("sign in first");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function fixed(value, digits) { return value === null || value === undefined ? "" : Number(value).toFixed(digits); }

// -- the list -------------------------------------------------------------------------------------
function listQuery() {
  const params = new URLSearchParams({ limit: PAGE, offset: state.offset });
  const q = $("#q").value.trim();
  if (q) params.set("q", q);
  if ($("#status").value) params.set("status", $("#status").value);
  if ($("#model").value) params.set("model", $("#model").value);
  return params;
}

function fillSelect(select, values) {
  const chosen = select.value;
  while (select.options.length > 1) select.remove(1);
  for (const value of values) select.add(new Option(value, value));
  select.value = values.includes(chosen) ? chosen : "";
}

function qcText(slide) {
  if (!slide.qc_tiles) return "";
  const reasons = Object.entries(slide.qc_rejected || {}).map(([reason, n]) => `${reason} ${n}`).join(", ");
  return `${slide.qc_accepted}/${slide.qc_tiles}` + (reasons ? ` (${reasons})` : "");
}

function slideRow(slide) {
  const row = element("tr");
  row.dataset.slideId = slide.slide_id;
  const link = element("a", slide.slide_id.slice(0, 12));
  link.href = `#/slide/${slide.slide_id}`;
  link.title = slide.slide_id;
  const first = element("td");
  first.append(link);
  row.append(first);
  row.append(element("td", (slide.upload_keys || []).join(", ")));
  const status = element("td");
  status.append(element("span", slide.status, `status status-${slide.status}`));
  row.append(status);
  row.append(element("td", slide.label, slide.label ? `label-${slide.label}` : ""));
  row.append(element("td", fixed(slide.probability, 3), "num"));
  row.append(element("td", slide.model_version));
  row.append(element("td", fixed(slide.tissue_area_mm2, 1), "num"));
  row.append(element("td", qcText(slide)));
  row.append(element("td", slide.status_reason || ""));
  row.append(element("td", (slide.changed_at || "").replace("T", " ").slice(0, 19)));
  return row;
}

async function loadList() {
  try {
    const data = await api(`/api/slides?${listQuery()}`);
    state.total = data.total;
    state.cursor = state.cursor || data.cursor;
    fillSelect($("#status"), data.statuses);
    fillSelect($("#model"), data.model_versions);
    $("#slides tbody").replaceChildren(...data.slides.map(slideRow));
    const last = Math.min(state.offset + data.slides.length, data.total);
    $("#range").textContent = data.total ? `${state.offset + 1}-${last} of ${data.total}` : "no slides";
    $("#prev").disabled = state.offset === 0;
    $("#next").disabled = last >= data.total;
    state.listVersion += 1;
    document.body.dataset.listVersion = String(state.listVersion);
    say("");
  } catch (error) {
    say(error.message);
  }
}

async function pollChanges() {
  if (!state.cursor) return;
  try {
    const data = await api(`/api/changes?since=${encodeURIComponent(state.cursor)}`);
    $("#live").classList.remove("stale");
    state.cursor = data.cursor;
    if (data.slides.length && !$("#list-page").hidden) await loadList();
  } catch (error) {
    $("#live").classList.add("stale");
  }
}

// -- one slide ------------------------------------------------------------------------------------
function fact(list, name, value) {
  if (value === null || value === undefined || value === "") return;
  list.append(element("dt", name), element("dd", value));
}

function predictionRows(slide) {
  return slide.predictions.map((p) => {
    const row = element("tr");
    const pick = element("input");
    pick.type = "radio";
    pick.name = "prediction";
    pick.checked = state.prediction && p.prediction_id === state.prediction.prediction_id;
    pick.addEventListener("change", () => choosePrediction(p));
    const cell = element("td");
    cell.append(pick);
    row.append(cell, element("td", p.tiling_run_id.slice(-10)), element("td", p.model_version));
    row.append(element("td", p.label, `label-${p.label}`), element("td", fixed(p.probability, 3), "num"));
    row.append(element("td", fixed(p.threshold, 3), "num"), element("td", `${p.tiles_scored}/${p.tiles_total}`, "num"));
    const downloads = element("td");
    const query = new URLSearchParams({ run: p.tiling_run_id, model: p.model_version });
    for (const kind of ["geojson", "h5"]) {
      const link = element("a", kind === "geojson" ? "QuPath GeoJSON" : "h5");
      link.href = `/api/slides/${slide.slide_id}/download/${kind}?${query}`;
      link.className = `download-${kind}`;
      downloads.append(link, " ");
    }
    row.append(downloads);
    return row;
  });
}

function runRows(slide) {
  return slide.runs.map((r) => {
    const row = element("tr");
    row.append(element("td", r.tiling_run_id.slice(-10)), element("td", r.origin));
    row.append(element("td", r.target_mpp), element("td", r.qc_tiles ? `${r.qc_accepted}/${r.qc_tiles}` : ""));
    return row;
  });
}

function gallery(slide, prediction) {
  const items = (prediction ? prediction.top_tiles || [] : []).map((tile, index) => {
    const button = element("button");
    button.type = "button";
    button.title = `attention ${Number(tile.attention).toPrecision(3)} at (${tile.x}, ${tile.y})`;
    const image = element("img");
    image.alt = `top tile ${index + 1}`;
    image.src = `/api/slides/${slide.slide_id}/top-tiles/${prediction.prediction_id}/${index + 1}.jpeg`;
    button.append(image);
    button.addEventListener("click", () => goTo(tile.x, tile.y, tile.size));
    return button;
  });
  $("#gallery").replaceChildren(...items);
}

function goTo(x, y, size) {
  const item = state.viewer && state.viewer.world.getItemAt(0);
  if (!item) return;
  const margin = size * 1.5;
  const rect = item.imageToViewportRectangle(x - margin, y - margin, size + 2 * margin, size + 2 * margin);
  state.viewer.viewport.fitBounds(rect);
}

// Tissue and QC belong to a tiling run: they follow the run of the prediction shown.
async function loadRunOverlays(run) {
  const slideId = state.slide.slide_id;
  const query = `run=${encodeURIComponent(run || "")}`;
  const [tissue, qc] = await Promise.allSettled([
    api(`/api/slides/${slideId}/tissue?${query}`),
    api(`/api/slides/${slideId}/qc?${query}`),
  ]);
  state.overlayRun = run;
  state.tissue = tissue.status === "fulfilled" ? tissue.value : null;
  state.qc = qc.status === "fulfilled" ? qc.value : null;
  legend();
}

async function choosePrediction(prediction) {
  state.prediction = prediction;
  state.attention = null;
  gallery(state.slide, prediction);
  if (prediction) {
    const query = new URLSearchParams({ run: prediction.tiling_run_id, model: prediction.model_version });
    if (prediction.tiling_run_id !== state.overlayRun) await loadRunOverlays(prediction.tiling_run_id);
    state.attention = await api(`/api/slides/${state.slide.slide_id}/attention?${query}`);
  }
  draw();
}

async function showSlide(slideId) {
  $("#list-page").hidden = true;
  $("#slide-page").hidden = false;
  delete document.body.dataset.slideReady;
  try {
    const slide = await api(`/api/slides/${slideId}`);
    const image = await api(`/api/slides/${slideId}/image`);
    state.slide = slide;
    state.mpp = image.mpp || 0;
    $("#slide-title").textContent = (slide.upload_keys || [])[0] || slide.slide_id.slice(0, 12);
    const facts = element("dl");
    facts.id = "slide-facts";
    fact(facts, "Slide id", slide.slide_id);
    fact(facts, "Status", slide.status);
    fact(facts, "Reason", slide.status_reason);
    fact(facts, "Size", `${image.width} x ${image.height} px`);
    fact(facts, "MPP", image.mpp ? `${Number(image.mpp).toFixed(4)} µm/px` : "unknown");
    fact(facts, "ICC profile", image.icc_profile ? "applied (to sRGB)" : "none in the file");
    fact(facts, "Tissue", slide.tissue_area_mm2 ? `${fixed(slide.tissue_area_mm2, 2)} mm²` : "");
    fact(facts, "QC accepted", qcText(slide));
    $("#slide-facts").replaceWith(facts);
    const current = slide.predictions.filter((p) => p.tiling_run_id === slide.tiling_run_id);
    state.prediction = (current.length ? current : slide.predictions).slice(-1)[0] || null;
    $("#predictions tbody").replaceChildren(...predictionRows(slide));
    $("#runs tbody").replaceChildren(...runRows(slide));
    openViewer(slideId);
    await loadRunOverlays(state.prediction ? state.prediction.tiling_run_id : slide.tiling_run_id);
    await choosePrediction(state.prediction);
    document.body.dataset.overlaysReady = "1";
    say("");
  } catch (error) {
    say(error.message);
  }
}

function legend() {
  const counts = state.qc ? state.qc.rejected_by_reason : {};
  const parts = Object.entries(counts).map(([reason, n]) => {
    const part = element("span");
    const swatch = element("i");
    swatch.style.background = QC_COLOURS[reason] || QC_COLOURS.rejected;
    part.append(swatch, `${reason} ${n}`);
    return part;
  });
  $("#qc-legend").replaceChildren(...parts);
}

function openViewer(slideId) {
  const source = `/slides/${slideId}.dzi`;
  if (state.viewer) {
    state.viewer.open(source);
    return;
  }
  state.viewer = OpenSeadragon({
    element: $("#osd"),
    prefixUrl: "/static/openseadragon/images/",
    tileSources: source,
    showNavigator: true,
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
  });
  for (const event of ["animation", "update-viewport", "resize", "open"]) state.viewer.addHandler(event, draw);
  state.viewer.addHandler("open", () => {
    const item = state.viewer.world.getItemAt(0);
    item.addHandler("fully-loaded-change", (event) => {
      if (event.fullyLoaded) document.body.dataset.slideReady = "1";
    });
  });
}

// -- overlays: one canvas over the viewer, redrawn on every viewport change -------------------------
function screenRect(item, x, y, size) {
  const a = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
  const b = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x + size, y + size));
  const left = Math.round(a.x);
  const top = Math.round(a.y);
  return [left, top, Math.max(1, Math.round(b.x) - left), Math.max(1, Math.round(b.y) - top)];
}

function drawTissue(context, item) {
  context.globalAlpha = 1;
  context.strokeStyle = "#00a651";
  context.lineWidth = 2;
  for (const feature of state.tissue.features || []) {
    const geometry = feature.geometry || {};
    const polygons = geometry.type === "MultiPolygon" ? geometry.coordinates : [geometry.coordinates || []];
    context.beginPath();
    for (const polygon of polygons) {
      for (const ring of polygon) {
        ring.forEach(([x, y], index) => {
          const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
          if (index === 0) context.moveTo(p.x, p.y);
          else context.lineTo(p.x, p.y);
        });
        context.closePath();
      }
    }
    context.stroke();
  }
}

function draw() {
  const canvas = $("#overlay");
  const viewer = state.viewer;
  if (!viewer) return;
  canvas.width = viewer.container.clientWidth;
  canvas.height = viewer.container.clientHeight;
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const item = viewer.world.getItemAt(0);
  if (!item) return;
  if ($("#show-heatmap").checked && state.attention) {
    context.globalAlpha = Number($("#opacity").value) / 100;
    for (const [x, y, colour] of state.attention.tiles) {
      context.fillStyle = colour;
      context.fillRect(...screenRect(item, x, y, state.attention.tile_size));
    }
  }
  if ($("#show-qc").checked && state.qc) {
    context.globalAlpha = 0.6;
    for (const [x, y, reason] of state.qc.rejected) {
      context.fillStyle = QC_COLOURS[reason] || QC_COLOURS.rejected;
      context.fillRect(...screenRect(item, x, y, state.qc.tile_size));
    }
  }
  if ($("#show-tissue").checked && state.tissue) drawTissue(context, item);
  scaleBar(viewer, item);
}

function scaleBar(viewer, item) {
  const bar = $("#scalebar");
  if (!state.mpp) {
    bar.hidden = true;
    return;
  }
  bar.hidden = false;
  const screenPerImage = item.viewportToImageZoom(viewer.viewport.getZoom(true));
  const micronsPerScreenPx = state.mpp / screenPerImage;
  const target = 120 * micronsPerScreenPx;
  const power = 10 ** Math.floor(Math.log10(target));
  const length = [5, 2, 1].map((m) => m * power).find((v) => v <= target) || power;
  bar.querySelector(".bar").style.width = `${Math.round(length / micronsPerScreenPx)}px`;
  bar.querySelector("span").textContent = length >= 1000 ? `${length / 1000} mm` : `${length} µm`;
}

// The test hook: where a level-0 point is on screen (element pixels of the viewer).
window.wsiViewer = {
  state,
  screenPoint(x, y) {
    const item = state.viewer.world.getItemAt(0);
    const p = item.imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
    const box = $("#osd").getBoundingClientRect();
    return { x: box.left + p.x, y: box.top + p.y };
  },
};

// -- routing --------------------------------------------------------------------------------------
function route() {
  const match = location.hash.match(/^#\/slide\/([0-9a-f]{32})$/);
  if (match) {
    showSlide(match[1]);
    return;
  }
  $("#slide-page").hidden = true;
  $("#list-page").hidden = false;
  loadList();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.offset = 0;
    loadList();
  });
  for (const id of ["#status", "#model"]) $(id).addEventListener("change", () => { state.offset = 0; loadList(); });
  $("#prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); loadList(); });
  $("#next").addEventListener("click", () => { state.offset += PAGE; loadList(); });
  for (const id of ["#show-heatmap", "#show-tissue", "#show-qc"]) $(id).addEventListener("change", draw);
  $("#opacity").addEventListener("input", draw);
  window.addEventListener("hashchange", route);
  state.poll = setInterval(pollChanges, POLL_MS);
  route();
});
