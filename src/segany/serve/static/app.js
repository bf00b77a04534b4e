// segany web tool. Plain JavaScript, no build step.
//
// The server computes the image embedding once (POST /api/images); the page downloads it together with
// the ONNX decoder and runs the decoder here (onnxruntime-web) for the hover preview, so the mask under
// the cursor follows it without a round trip. Clicks and boxes go to the server (/predict), which
// returns COCO RLE masks, scores and a logits handle used to refine the mask with the next click.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = [[61, 139, 253], [229, 83, 75], [87, 171, 90], [219, 171, 9], [163, 113, 247],
  [57, 197, 207], [246, 130, 52], [236, 90, 170]];

const S = {
  file: null, imageId: null, width: 0, height: 0, bitmap: null,
  info: null, session: null, embedding: null, extraInputs: {}, inputSize: null,
  points: [], box: null, text: null, history: [],
  candidates: [], selected: -1, everything: null, hover: null,
  accepted: [], negative: false, drag: null,
  stats: { decoderMs: [], lastDecoderMs: null, hoverRuns: 0 },
};
window.segany = S; // for tests and the console

// -- small helpers ------------------------------------------------------------------------------------

function status(text, error = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", error);
}

async function api(path, options = {}) {
  const res = await fetch(path, options);
  if (!res.ok) {
    let detail = res.statusText;
    try { const body = await res.json(); detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail); } catch (_) { /* not JSON */ }
    const err = new Error(`${res.status}: ${detail}`);
    err.status = res.status;
    throw err;
  }
  return res;
}

function download(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// COCO compressed RLE string -> run lengths (pycocotools' rleFrString).
function rleCounts(s) {
  const counts = [];
  let p = 0;
  while (p < s.length) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      p++; k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  return counts;
}

// RLE {size: [H, W], counts} -> row-major Uint8Array H*W of 0/1 (RLE runs are column-major).
function decodeRle(rle) {
  const [h, w] = rle.size;
  const out = new Uint8Array(h * w);
  let i = 0, v = 0;
  for (const n of rleCounts(rle.counts)) {
    if (v) for (let j = i; j < i + n; j++) out[(j % h) * w + ((j / h) | 0)] = 1;
    i += n; v ^= 1;
  }
  return out;
}

// A 0/1 (or logits > 0) mask of w x h -> a canvas coloured where set.
function maskCanvas(mask, w, h, color, alpha = 130, threshold = 0.5) {
  const c = document.createElement("canvas");
  c.width = w; c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  const d = img.data;
  for (let i = 0; i < w * h; i++) {
    if (mask[i] > threshold) {
      d[4 * i] = color[0]; d[4 * i + 1] = color[1]; d[4 * i + 2] = color[2]; d[4 * i + 3] = alpha;
    }
  }
  ctx.putImageData(img, 0, 0);
  return c;
}

function imageXY(ev) {
  const r = $("overlay").getBoundingClientRect();
  return [
    Math.min(S.width - 1, Math.max(0, (ev.clientX - r.left) * S.width / r.width)),
    Math.min(S.height - 1, Math.max(0, (ev.clientY - r.top) * S.height / r.height)),
  ];
}

// -- loading an image ---------------------------------------------------------------------------------

async function openFile(file) {
  if (!file) return;
  S.file = file;
  status(`Uploading ${file.name}…`);
  document.body.dataset.ready = "0";
  try {
    const res = await api("/api/images", {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const meta = await res.json();
    S.bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    Object.assign(S, { imageId: meta.image_id, width: meta.width, height: meta.height });
    resetPrompts(false);
    S.accepted = [];
    S.everything = null;
    setupCanvases();
    status(`${file.name}: ${meta.width}×${meta.height}. Loading the decoder…`);
    await loadDecoder();
    status(`${file.name}: ${meta.width}×${meta.height}. Hover, click or drag.`);
  } catch (e) {
    status(`Could not open ${file.name}: ${e.message}`, true);
  }
  document.body.dataset.ready = "1";
  updateButtons();
}

async function reuploadIfEvicted(fn) {
  // The server's cache is bounded: an image can be evicted while the page still shows it.
  try { return await fn(); } catch (e) {
    if (e.status !== 404 || !S.file) throw e;
    await api("/api/images", { method: "POST", body: S.file,
      headers: { "Content-Type": S.file.type || "application/octet-stream" } });
    return fn();
  }
}

function setupCanvases() {
  $("hint").hidden = true;
  $("canvases").hidden = false;
  for (const id of ["image", "overlay"]) { $(id).width = S.width; $(id).height = S.height; }
  $("image").getContext("2d").drawImage(S.bitmap, 0, 0, S.width, S.height);
  fitCanvases();
  render();
}

// Show the image as large as the stage allows (small images are enlarged too); the overlay follows.
function fitCanvases() {
  if (!S.width) return;
  const stage = $("stage").getBoundingClientRect();
  const scale = Math.min((stage.width - 16) / S.width, (window.innerHeight - stage.top - 24) / S.height);
  const c = $("image");
  c.style.width = `${Math.max(1, Math.floor(S.width * scale))}px`;
  c.style.height = `${Math.max(1, Math.floor(S.height * scale))}px`;
}

async function loadDecoder() {
  if (typeof ort === "undefined") {
    $("decoder-info").textContent = "In-browser decoder unavailable (onnxruntime-web not installed: run scripts/setup.sh). Clicks still work.";
    return;
  }
  if (!S.info) S.info = await (await api("/api/info")).json();
  if (!S.session) {
    ort.env.wasm.wasmPaths = "/vendor/ort/";
    ort.env.wasm.numThreads = 1; // threads need cross-origin isolation; one is plenty for the decoder
    const model = await (await api("/api/decoder.onnx?first_prompt_only=true")).arrayBuffer();
    S.session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
  }
  const res = await reuploadIfEvicted(() => api(`/api/images/${S.imageId}/embedding?dtype=float32`));
  const shape = res.headers.get("X-Embedding-Shape").split(",").map(Number);
  S.inputSize = res.headers.get("X-Input-Size").split(",").map(Number);
  S.embedding = new ort.Tensor("float32", new Float32Array(await res.arrayBuffer()), shape);
  // SAM 2's decoder also reads the image's high-resolution features, SAM-HQ's its fused HQ features
  // (info.extra_decoder_inputs).
  S.extraInputs = {};
  for (const name of S.info.extra_decoder_inputs || []) {
    const r = await reuploadIfEvicted(() => api(`/api/images/${S.imageId}/embedding?dtype=float32&part=${name}`));
    const dims = r.headers.get("X-Embedding-Shape").split(",").map(Number);
    S.extraInputs[name] = new ort.Tensor("float32", new Float32Array(await r.arrayBuffer()), dims);
  }
  $("decoder-info").textContent = `In-browser decoder ready (${S.info.model}).`;
}

// -- the in-browser decoder (hover) -------------------------------------------------------------------

// One point at image pixel (x, y) -> the best of the 3 multimask outputs, as h x w logits in the resized
// frame (orig_im_size = input size keeps the output small; it is stretched over the image when drawn).
// size = [S.height, S.width] decodes in the image's own frame instead (what the server's masks are in).
async function decodeHover(x, y, size = null) {
  const [ih, iw] = S.inputSize;
  const [h, w] = size || S.inputSize;
  const side = S.info.low_res_side;
  const feeds = {
    image_embeddings: S.embedding,
    ...S.extraInputs,
    point_coords: new ort.Tensor("float32", new Float32Array([x * iw / S.width, y * ih / S.height, 0, 0]), [1, 2, 2]),
    point_labels: new ort.Tensor("float32", new Float32Array([1, -1]), [1, 2]),
    mask_input: new ort.Tensor("float32", new Float32Array(side * side), [1, 1, side, side]),
    has_mask_input: new ort.Tensor("float32", new Float32Array([0]), [1]),
    orig_im_size: new ort.Tensor("float32", new Float32Array([h, w]), [2]),
  };
  const t0 = performance.now();
  const out = await S.session.run(feeds);
  const ms = performance.now() - t0;
  S.stats.decoderMs.push(ms);
  S.stats.lastDecoderMs = ms;
  S.stats.hoverRuns++;
  const iou = out.iou_predictions.data;
  let best = 1;
  for (let i = 2; i < iou.length; i++) if (iou[i] > iou[best]) best = i;
  const masks = out.masks.data;
  return { logits: masks.subarray(best * h * w, (best + 1) * h * w), w, h, ms, best, iou: iou[best] };
}
S.decode = decodeHover; // for tests and the console: await segany.decode(x, y, [segany.height, segany.width])

let hoverPending = null, hoverRunning = false, hoverInside = false;
async function hover(x, y) {
  hoverPending = [x, y];
  if (hoverRunning || !S.session || !S.embedding) return;
  hoverRunning = true;
  try {
    while (hoverPending) {
      const [px, py] = hoverPending;
      hoverPending = null;
      const m = await decodeHover(px, py);
      if (!hoverInside) break; // the pointer left while the decoder ran: draw nothing
      S.hover = maskCanvas(m.logits, m.w, m.h, [255, 255, 255], 90, 0);
      $("decoder-info").textContent = `In-browser decoder: ${m.ms.toFixed(1)} ms per call.`;
      render();
    }
  } catch (e) {
    status(`Decoder error: ${e.message}`, true);
  } finally {
    hoverRunning = false;
  }
}

// -- prompts -> server predictions --------------------------------------------------------------------

function pushHistory() {
  S.history.push({ points: S.points.slice(), box: S.box, text: S.text, candidates: S.candidates, selected: S.selected });
}

async function predict() {
  if (!S.points.length && !S.box && !S.text) {
    S.candidates = []; S.selected = -1; render(); updateButtons(); return;
  }
  const prev = S.candidates[S.selected];
  const instances = Number($("instances").value);
  const body = {
    points: S.points.map((p) => [p[0], p[1]]),
    labels: S.points.map((p) => p[2]),
    box: S.box,
    // Refine the mask picked so far (its low-res logits), as SAM was trained to.
    // (A mask zoomed in on, prev.crop, is refined only with zoom-in: a text prompt sees the whole image.)
    mask_input: prev && prev.logits && S.points.length > 1 && !(S.text && prev.crop) ? prev.logits : null,
    // One output for a box (the official guidance: a box is not ambiguous), three for points alone.
    multimask: !S.text && !S.box,
    text: S.text,
    // Later clicks and boxes on a crop around the object (RITM's zoom-in); a text is answered on the whole image.
    zoom_in: $("zoom-in").checked && !S.text,
  };
  // A text alone may ask for one mask per object it names.
  if (S.text && instances > 0 && !S.points.length && !S.box) { body.instances = instances; body.mask_input = null; }
  status("Predicting…");
  const send = () => api(`/api/images/${S.imageId}/predict`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  try {
    let res;
    try {
      res = await reuploadIfEvicted(send);
    } catch (e) {
      if (!(body.mask_input && e.status === 404)) throw e;
      body.mask_input = null; // the logits handle expired (or the image was re-uploaded): start afresh
      res = await reuploadIfEvicted(send);
    }
    const out = await res.json();
    S.candidates = out.masks.map((m, i) => ({ ...m, mask: decodeRle(m.segmentation), color: COLORS[i % COLORS.length] }));
    if (!S.candidates.length) {
      S.selected = -1;
      status(`Nothing matches “${S.text}”.`);
    } else {
      S.selected = S.candidates.reduce((b, c, i, a) => (c.score > a[b].score ? i : b), 0);
      status(`${S.candidates.length} candidates; best score ${S.candidates[S.selected].score.toFixed(3)}.`);
    }
  } catch (e) {
    status(`Prediction failed: ${e.message}`, true);
  }
  renderCandidates();
  render();
  updateButtons();
}

function resetPrompts(keepHistory = true) {
  if (keepHistory && (S.points.length || S.box)) pushHistory();
  S.points = []; S.box = null; S.text = null; S.candidates = []; S.selected = -1; S.hover = null;
  $("text").value = "";
  if (!keepHistory) S.history = [];
  renderCandidates();
  render();
  updateButtons();
}

// -- everything (server side) --------------------------------------------------------------------------

async function everything() {
  if (S.everything) { S.everything = null; render(); updateButtons(); return; } // toggles the view
  status("Segmenting everything (server)…");
  $("everything").disabled = true;
  try {
    const body = {
      points_per_side: Number($("density").value),
      // Empty: the server's default for the model's family (SAM 0.88, SAM 2 0.8).
      pred_iou_thresh: $("pred-iou-thresh").value === "" ? null : Number($("pred-iou-thresh").value),
      stability_score_thresh: Number($("stability-thresh").value),
    };
    const res = await reuploadIfEvicted(() => api(`/api/images/${S.imageId}/everything`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    }));
    const out = await res.json();
    S.everything = out.masks.map((m, i) => {
      const mask = decodeRle(m.segmentation);
      return { ...m, score: m.predicted_iou, mask,
        canvas: maskCanvas(mask, S.width, S.height, COLORS[i % COLORS.length], 110) };
    });
    if (!out.total) {
      // Say why: what each filter removed, and what to change.
      S.everything = null;
      status(`No masks: ${out.summary}. Lower the IoU / stability thresholds and try again.`, true);
    } else {
      status(`${S.everything.length} masks (of ${out.total}). Click one to select it.`);
    }
  } catch (e) {
    status(`Everything failed: ${e.message}`, true);
  }
  render();
  updateButtons();
}

function pickEverything(x, y) {
  const i = Math.round(y) * S.width + Math.round(x);
  // The smallest mask under the cursor: the most specific object.
  let best = null;
  for (const m of S.everything) if (m.mask[i] && (!best || m.area < best.area)) best = m;
  if (!best) return;
  S.candidates = [{ ...best, color: COLORS[0] }];
  S.selected = 0;
  renderCandidates();
  render();
  updateButtons();
}

// -- drawing ------------------------------------------------------------------------------------------

const maskCanvasCache = new WeakMap();
function candidateCanvas(c) {
  if (!maskCanvasCache.has(c)) maskCanvasCache.set(c, maskCanvas(c.mask, S.width, S.height, c.color, 140));
  return maskCanvasCache.get(c);
}

function render() {
  const ctx = $("overlay").getContext("2d");
  ctx.clearRect(0, 0, S.width, S.height);
  ctx.imageSmoothingEnabled = true;
  if (S.everything) for (const m of S.everything) ctx.drawImage(m.canvas, 0, 0);
  for (const a of S.accepted) ctx.drawImage(candidateCanvas(a), 0, 0);
  const sel = S.candidates[S.selected];
  if (sel) ctx.drawImage(candidateCanvas(sel), 0, 0);
  if (S.hover && !S.drag) ctx.drawImage(S.hover, 0, 0, S.width, S.height);
  const r = Math.max(4, Math.round(Math.min(S.width, S.height) / 80));
  for (const [x, y, label] of S.points) {
    ctx.beginPath();
    ctx.arc(x, y, r, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#2ecc40" : "#ff4136";
    ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  const box = S.drag ? S.drag.box : S.box;
  if (box) {
    ctx.lineWidth = Math.max(2, r / 2);
    ctx.strokeStyle = "#2ecc40";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
  }
}

function renderCandidates() {
  const el = $("candidates");
  el.innerHTML = "";
  S.candidates.forEach((c, i) => {
    const b = document.createElement("button");
    b.className = i === S.selected ? "active" : "";
    b.dataset.index = i;
    const thumb = document.createElement("canvas");
    thumb.width = 96; thumb.height = Math.max(1, Math.round(96 * S.height / S.width));
    const t = thumb.getContext("2d");
    t.drawImage(S.bitmap, 0, 0, thumb.width, thumb.height);
    t.drawImage(candidateCanvas(c), 0, 0, thumb.width, thumb.height);
    const label = document.createElement("span");
    label.textContent = c.score.toFixed(3);
    b.append(thumb, label);
    b.addEventListener("click", () => { S.selected = i; renderCandidates(); render(); });
    el.appendChild(b);
  });
}

function updateButtons() {
  const has = !!S.imageId;
  $("undo").disabled = !S.history.length;
  $("reset").disabled = !(S.points.length || S.box || S.text || S.candidates.length);
  $("text").disabled = $("find").disabled = !has;
  $("everything").disabled = !has;
  $("everything").classList.toggle("active", !!S.everything);
  const sel = S.candidates[S.selected];
  for (const id of ["dl-mask", "dl-cutout"]) $(id).disabled = !sel;
  $("dl-json").disabled = !(sel || S.accepted.length);
  $("annotate").hidden = !(S.info && S.info.annotation_mode);
  $("accept").disabled = !sel;
  $("save").disabled = !S.accepted.length;
  $("accepted-info").textContent = `${S.accepted.length} accepted mask${S.accepted.length === 1 ? "" : "s"}.`;
}

// -- downloads and annotation -------------------------------------------------------------------------

function selectedMask() { return S.candidates[S.selected]; }

function downloadMaskPng() {
  const c = selectedMask();
  const canvas = maskCanvas(c.mask, S.width, S.height, [255, 255, 255], 255);
  const ctx = canvas.getContext("2d");
  ctx.globalCompositeOperation = "destination-over"; // black background behind the white mask
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, S.width, S.height);
  canvas.toBlob((blob) => download(blob, "mask.png"), "image/png");
}

function downloadCutout() {
  const c = selectedMask();
  const [x, y, w, h] = c.bbox.map(Math.round);
  if (w < 1 || h < 1) { status("The mask is empty.", true); return; }
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(S.bitmap, x, y, w, h, 0, 0, w, h);
  const img = ctx.getImageData(0, 0, w, h);
  for (let r = 0; r < h; r++) for (let q = 0; q < w; q++) {
    if (!c.mask[(y + r) * S.width + x + q]) img.data[4 * (r * w + q) + 3] = 0;
  }
  ctx.putImageData(img, 0, 0);
  canvas.toBlob((blob) => download(blob, "cutout.png"), "image/png");
}

function sa1bRecords() {
  const masks = S.accepted.length ? S.accepted : [selectedMask()];
  return masks.map((m) => ({
    segmentation: m.segmentation, predicted_iou: m.score,
    point_coords: (m.points || S.points).map((p) => [p[0], p[1]]),
  }));
}

function downloadJson() {
  const records = sa1bRecords();
  const doc = {
    image: { image_id: parseInt(S.imageId.slice(0, 13), 16), width: S.width, height: S.height,
      file_name: S.file ? S.file.name : "image" },
    annotations: records.map((r, i) => {
      const m = S.accepted.length ? S.accepted[i] : selectedMask();
      return { id: i + 1, segmentation: r.segmentation, bbox: m.bbox, area: m.area,
        predicted_iou: r.predicted_iou, point_coords: r.point_coords };
    }),
  };
  download(new Blob([JSON.stringify(doc)], { type: "application/json" }), "masks.sa1b.json");
}

function accept() {
  const c = selectedMask();
  S.accepted.push({ ...c, points: S.points.slice(), color: COLORS[(S.accepted.length + 3) % COLORS.length] });
  resetPrompts(false);
  status(`${S.accepted.length} accepted; click the next object.`);
}

async function save() {
  const name = $("dataset").value.trim();
  try {
    const res = await reuploadIfEvicted(() => api(`/api/datasets/${encodeURIComponent(name)}/annotations`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ image_id: S.imageId, masks: sa1bRecords() }),
    }));
    const out = await res.json();
    status(`Saved ${out.count} masks to ${out.dataset}/${out.annotations}.`);
  } catch (e) {
    status(`Save failed: ${e.message}`, true);
  }
}

// -- events -------------------------------------------------------------------------------------------

function bindEvents() {
  $("file").addEventListener("change", (e) => openFile(e.target.files[0]));
  const stage = $("stage");
  stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("dragover"); });
  stage.addEventListener("dragleave", () => stage.classList.remove("dragover"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("dragover");
    if (e.dataTransfer.files.length) openFile(e.dataTransfer.files[0]);
  });
  $("mode").addEventListener("click", () => {
    S.negative = !S.negative;
    $("mode").textContent = S.negative ? "Negative" : "Positive";
    $("mode").classList.toggle("active", S.negative);
  });
  $("undo").addEventListener("click", () => {
    const prev = S.history.pop();
    if (!prev) return;
    Object.assign(S, { points: prev.points, box: prev.box, text: prev.text, candidates: prev.candidates,
      selected: prev.selected });
    $("text").value = S.text || "";
    renderCandidates(); render(); updateButtons();
  });
  $("reset").addEventListener("click", () => resetPrompts(true));
  $("text-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const t = $("text").value.trim();
    if (!S.imageId || t === (S.text || "")) return;
    pushHistory();
    S.text = t || null;
    predict();
  });
  $("everything").addEventListener("click", everything);
  $("dl-mask").addEventListener("click", downloadMaskPng);
  $("dl-cutout").addEventListener("click", downloadCutout);
  $("dl-json").addEventListener("click", downloadJson);
  $("accept").addEventListener("click", accept);
  $("save").addEventListener("click", save);

  const ov = $("overlay");
  ov.addEventListener("mousedown", (e) => {
    if (e.button !== 0) return;
    const [x, y] = imageXY(e);
    S.drag = { x, y, box: null, moved: false };
  });
  ov.addEventListener("mousemove", (e) => {
    const [x, y] = imageXY(e);
    if (S.drag) {
      const r = ov.getBoundingClientRect();
      const px = Math.hypot(x - S.drag.x, y - S.drag.y) * r.width / S.width; // in screen pixels
      if (px > 5) S.drag.moved = true;
      if (S.drag.moved) {
        S.drag.box = [Math.min(x, S.drag.x), Math.min(y, S.drag.y), Math.max(x, S.drag.x), Math.max(y, S.drag.y)];
        render();
      }
      return;
    }
    hoverInside = true;
    if (!S.everything) hover(x, y);
  });
  ov.addEventListener("mouseleave", () => { hoverInside = false; hoverPending = null; S.hover = null; render(); });
  window.addEventListener("mouseup", (e) => {
    if (!S.drag) return;
    const drag = S.drag;
    S.drag = null;
    if (drag.moved && drag.box) {
      pushHistory();
      S.box = drag.box;
      predict();
      return;
    }
    if (e.target !== ov) return;
    const [x, y] = imageXY(e);
    if (S.everything) { pickEverything(x, y); return; }
    pushHistory();
    S.points.push([Math.round(x), Math.round(y), e.shiftKey || S.negative ? 0 : 1]);
    predict();
  });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z") $("undo").click();
    if (e.key === "Escape") resetPrompts(true);
  });
}

bindEvents();
$("zoom-in").addEventListener("change", () => { $("zoom-in").dataset.touched = "1"; });
window.addEventListener("resize", fitCanvases);
api("/api/info").then((r) => r.json()).then((info) => {
  S.info = info;
  // The generator's default for this model's family, unless the user typed a threshold already.
  if ($("pred-iou-thresh").value === "" && info.pred_iou_thresh != null) $("pred-iou-thresh").value = info.pred_iou_thresh;
  // Zoom-in ticked where the server says a crop's embedding is cheap, unless the user set the box already.
  if (!$("zoom-in").dataset.touched) $("zoom-in").checked = !!info.zoom_in_default;
  updateButtons();
}).catch(() => {});
