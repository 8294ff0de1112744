// dicom_node web UI: the parse page and the dashboard. Plain JavaScript, no build step.
// Everything shown from the server goes in with textContent, never innerHTML.
"use strict";

const READY_REFRESH_MS = 10000;
const JOBS_REFRESH_MS = 3000;
const PAGE_SIZE = 25;
const MAX_STUDY_PHOTOS = 8;  // POST /api/v1/tbsa combines at most this many parsings

// ------------------------------------------------------------------ shared

function $(id) { return document.getElementById(id); }

function show(el, visible) { el.hidden = !visible; }

function showError(message) {
  const box = $("error");
  box.textContent = message;
  show(box, Boolean(message));
}

// A readable sentence from a failed request: the API's {"error", "message"} when there is one.
async function errorMessage(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.message || body.error || "";
  } catch (_) { /* not JSON */ }
  const what = {
    400: "The request was not accepted",
    401: "Sign-in required",
    404: "Not found",
    409: "Not possible now",
    413: "The file is too large",
    415: "This file type is not supported",
    503: "The node cannot do this right now",
  }[response.status] || `The node answered ${response.status}`;
  return detail ? `${what}: ${detail}` : `${what}.`;
}

function redirectToLogin() {
  location.href = "/login?next=" + encodeURIComponent(location.pathname);
}

// The answer's JSON; an error status throws a readable Error unless it is in `accepted` (e.g. 503 of /readyz).
async function fetchJSON(url, options, accepted) {
  let response;
  try {
    response = await fetch(url, Object.assign({ credentials: "same-origin" }, options || {}));
  } catch (err) {
    throw new Error("The node cannot be reached (is it running?).");
  }
  if (response.status === 401) { redirectToLogin(); throw new Error("Sign-in required."); }
  if (!response.ok && !(accepted || []).includes(response.status)) throw new Error(await errorMessage(response));
  return { status: response.status, body: await response.json() };
}

async function refreshReadiness() {
  const badge = $("ready-badge");
  try {
    const { body } = await fetchJSON("/readyz", {}, [503]);
    const failed = Object.entries(body.checks).filter(([, c]) => !c.ok);
    badge.textContent = body.ready ? "ready" : "not ready";
    badge.className = "badge " + (body.ready ? "badge-ok" : "badge-bad");
    badge.title = Object.entries(body.checks).map(([k, c]) => `${k}: ${c.detail}`).join("\n");
    // "no model" (the node started before its weights were installed): say how to install them
    const model = body.checks.model;
    const banner = $("model-banner");
    if (banner) {
      const missing = Boolean(model && !model.ok && model.detail.includes("no model"));
      const how = model && model.detail.includes(": install ") ? model.detail.slice(model.detail.indexOf(": install ") + 2) : "";
      $("model-banner-how").textContent = how ? how.charAt(0).toUpperCase() + how.slice(1) + "." : "";
      show(banner, missing);
    }
    const note = $("not-ready");
    if (note) {
      note.textContent = failed.length ? "Not ready: " + failed.map(([k, c]) => `${k}: ${c.detail}`).join("; ") : "";
      show(note, failed.length > 0);
    }
  } catch (err) {
    badge.textContent = "unreachable";
    badge.className = "badge badge-bad";
    badge.title = err.message;
  }
}

function percent(fraction) {
  return fraction === null || fraction === undefined ? "–" : (100 * fraction).toFixed(2) + " %";
}

function formatTime(epochSeconds) {
  if (epochSeconds === null || epochSeconds === undefined) return "–";
  const d = new Date(epochSeconds * 1000);
  const sameDay = d.toDateString() === new Date().toDateString();
  return sameDay ? d.toLocaleTimeString() : d.toLocaleString();
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

// ------------------------------------------------------------------ parse page

const parsePage = {
  classColors: null,
  maxUploadBytes: null,
  objectUrls: [],
  timer: null,

  async init() {
    const input = $("file-input");
    const zone = $("drop-zone");
    input.addEventListener("change", () => { if (input.files.length) this.parse(input.files[0]); });
    ["dragenter", "dragover"].forEach((type) => zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.add("drag");
    }));
    ["dragleave", "drop"].forEach((type) => zone.addEventListener(type, (e) => {
      e.preventDefault();
      zone.classList.remove("drag");
    }));
    zone.addEventListener("drop", (e) => {
      if (e.dataTransfer && e.dataTransfer.files.length) this.parse(e.dataTransfer.files[0]);
    });
    const slider = $("opacity");
    slider.addEventListener("input", () => this.applyOpacity());
    this.applyOpacity();
    try {
      const [classes, info] = await Promise.all([fetchJSON("/api/v1/classes"), fetchJSON("/api/v1/info")]);
      this.classColors = Object.fromEntries(classes.body.map((c) => [c.index, c.color]));
      this.maxUploadBytes = info.body.max_upload_bytes;
    } catch (err) {
      showError(err.message);
    }
  },

  applyOpacity() {
    const value = Number($("opacity").value);
    $("seg-img").style.opacity = String(value / 100);
    $("opacity-value").textContent = value + "%";
  },

  progress(text, fraction) {
    show($("progress"), true);
    $("progress-text").textContent = text;
    const bar = $("progress-bar");
    if (fraction === null) {
      bar.classList.add("indeterminate");
      bar.style.width = "";
    } else {
      bar.classList.remove("indeterminate");
      bar.style.width = Math.round(100 * fraction) + "%";
    }
  },

  stopProgress() {
    clearInterval(this.timer);
    this.timer = null;
    show($("progress"), false);
    $("progress-time").textContent = "";
  },

  parse(file) {
    showError("");
    show($("warning"), false);
    $("file-name").textContent = `${file.name} (${(file.size / 1e6).toFixed(2)} MB)`;
    if (this.maxUploadBytes !== null && file.size > this.maxUploadBytes) {
      showError(`The file is too large: ${(file.size / 1e6).toFixed(1)} MB, this node takes up to ` +
                `${(this.maxUploadBytes / 1e6).toFixed(1)} MB.`);
      return;
    }
    $("file-input").disabled = true;
    const browserShows = /^image\/(jpeg|png)$/.test(file.type);
    const form = new FormData();
    form.append("image", file, file.name);
    const url = "/api/predict?format=json" + (browserShows ? "" : "&include_original=true");

    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    xhr.responseType = "json";
    const started = Date.now();
    this.progress("Uploading…", null);  // indeterminate until the browser reports upload progress
    xhr.upload.onprogress = (e) => {
      if (e.lengthComputable) this.progress("Uploading…", e.loaded / e.total);
    };
    xhr.upload.onload = () => this.progress("Parsing on the node…", null);
    clearInterval(this.timer);
    this.timer = setInterval(() => {
      $("progress-time").textContent = ((Date.now() - started) / 1000).toFixed(0) + " s";
    }, 500);
    xhr.onerror = () => this.failed("The node cannot be reached (is it running?).");
    xhr.onload = async () => {
      if (xhr.status === 401) { redirectToLogin(); return; }
      if (xhr.status !== 200) {
        const body = xhr.response || {};
        const response = new Response(JSON.stringify(body), { status: xhr.status });
        this.failed(await errorMessage(response));
        return;
      }
      this.stopProgress();
      $("file-input").disabled = false;
      this.show(file, xhr.response, browserShows);
    };
    xhr.send(form);
  },

  failed(message) {
    this.stopProgress();
    $("file-input").disabled = false;
    $("file-input").value = "";
    showError(message);
  },

  blobUrl(blob) {
    const url = URL.createObjectURL(blob);
    this.objectUrls.push(url);
    return url;
  },

  pngUrl(base64) {
    const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
    return this.blobUrl(new Blob([bytes], { type: "image/png" }));
  },

  show(file, answer, browserShows) {
    this.objectUrls.forEach((u) => URL.revokeObjectURL(u));
    this.objectUrls = [];
    const meta = answer.metadata;
    const stem = (meta.source || "photo").replace(/\.[^.]*$/, "");
    const originalUrl = browserShows ? this.blobUrl(file) : this.pngUrl(answer.images.original_png);
    const colorUrl = this.pngUrl(answer.images.color_png);
    const overlayUrl = this.pngUrl(answer.images.overlay_png);
    const jsonUrl = this.blobUrl(new Blob([JSON.stringify(answer.report, null, 1)], { type: "application/json" }));

    $("original-img").src = originalUrl;
    $("seg-base").src = originalUrl;
    $("seg-img").src = colorUrl;
    this.applyOpacity();

    // With a kept parsing, the JSON comes from the node: it then holds the lesion painted since.
    const parsing = meta.parsing;
    const jsonHref = parsing ? `/api/v1/parsings/${encodeURIComponent(parsing.id)}/report.json` : jsonUrl;
    const links = { "download-color": [colorUrl, "_color.png"], "download-overlay": [overlayUrl, "_overlay.png"],
                    "download-json": [jsonHref, ".json"] };
    for (const [id, [href, suffix]] of Object.entries(links)) {
      $(id).href = href;
      $(id).download = stem + suffix;
    }

    const size = meta.image_size;
    const persons = meta.person_count === 1 ? "1 person" : `${meta.person_count} persons`;
    $("summary").textContent = `${persons} · ${size.width}×${size.height} px · parsed in ` +
      `${(meta.inference_s || 0).toFixed(2)} s · model ${meta.model.digest.slice(0, 12)}` +
      (meta.model.untrained ? " (untrained)" : "");
    const warning = $("warning");
    warning.textContent = meta.warning || "";
    show(warning, Boolean(meta.warning));

    const body = $("stats-body");
    body.replaceChildren();
    for (const region of meta.regions) {
      const row = document.createElement("tr");
      const swatchCell = cell(row, "");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      const rgb = this.classColors && this.classColors[region.class_index];
      if (rgb) swatch.style.background = `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
      swatchCell.appendChild(swatch);
      cell(row, region.label);
      cell(row, region.pixels.toLocaleString(), "num");
      cell(row, percent(region.image_fraction), "num");
      cell(row, percent(region.person_fraction), "num");
      body.appendChild(row);
    }
    if (!meta.regions.length) {
      const row = document.createElement("tr");
      const td = cell(row, "No body region found.");
      td.colSpan = 5;
      body.appendChild(row);
    }
    show($("results"), true);
    if (parsing) studyPanel.remember(parsing, meta.source || file.name);
    lesionPainter.start(parsing, size.width, size.height, stem);
    $("results").dataset.ready = "true";
  },
};

// ------------------------------------------------------------------ lesion painting

// The lesion is painted on a canvas at the photo's natural size laid over the shown photo; strokes are kept
// as a stack (undo replays the rest). After each change the mask goes to the node as a PNG, and the
// per-region table and %TBSA come back computed from the kept parsing (no network run).
const lesionPainter = {
  parsingId: null,
  strokes: [],
  current: null,
  seq: 0,  // increases with every change of mask or settings; the answer shown is for data-shown
  inFlight: false,
  dirty: false,
  observer: null,

  init() {
    const canvas = $("lesion-canvas");
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    ["pointerup", "pointercancel"].forEach((type) => canvas.addEventListener(type, (e) => this.up(e)));
    $("brush-size").addEventListener("input", () => { $("brush-size-value").textContent = $("brush-size").value + " px"; });
    $("undo-stroke").addEventListener("click", () => { this.strokes.pop(); this.redraw(); this.changed(); });
    $("clear-lesion").addEventListener("click", () => { this.strokes = []; this.redraw(); this.changed(); });
    ["lesion-view", "lesion-age", "tbsa-method"].forEach((id) => $(id).addEventListener("change", () => {
      if (this.parsingId && this.strokes.length) this.changed();
    }));
    const img = $("original-img");
    this.observer = new ResizeObserver(() => this.fit());
    this.observer.observe(img);
    img.addEventListener("load", () => this.fit());
  },

  start(parsing, width, height, stem) {
    this.parsingId = parsing ? parsing.id : null;
    this.strokes = [];
    this.current = null;
    this.seq = 0;
    const canvas = $("lesion-canvas");
    canvas.width = width;
    canvas.height = height;
    this.redraw();
    this.fit();
    const section = $("lesion");
    section.dataset.shown = "0";
    section.dataset.pending = "false";
    show(section, Boolean(parsing));
    $("lesion-body").replaceChildren();
    this.renderTbsa(null);
    this.error("");
    const sr = $("download-sr");
    if (parsing && parsing.sr_available) {
      sr.href = `/api/v1/parsings/${encodeURIComponent(parsing.id)}/sr.dcm`;
      sr.download = stem + "_sr.dcm";
    }
    show(sr, Boolean(parsing && parsing.sr_available));
    show($("sr-hint"), Boolean(parsing && !parsing.sr_available));
    this.buttons();
  },

  // the canvas covers exactly the photo as shown (the image scales with the page)
  fit() {
    const img = $("original-img");
    const canvas = $("lesion-canvas");
    canvas.style.width = img.clientWidth + "px";
    canvas.style.height = img.clientHeight + "px";
  },

  buttons() {
    $("undo-stroke").disabled = !this.strokes.length;
    $("clear-lesion").disabled = !this.strokes.length;
  },

  point(e) {
    const canvas = $("lesion-canvas");
    const rect = canvas.getBoundingClientRect();
    return [(e.clientX - rect.left) * canvas.width / rect.width, (e.clientY - rect.top) * canvas.height / rect.height];
  },

  down(e) {
    if (!this.parsingId || (e.pointerType === "mouse" && e.button !== 0)) return;
    e.preventDefault();
    const canvas = $("lesion-canvas");
    canvas.setPointerCapture(e.pointerId);
    const scale = canvas.width / canvas.getBoundingClientRect().width;  // brush size is in screen pixels
    this.current = { erase: $("tool-erase").checked, width: Number($("brush-size").value) * scale,
                     points: [this.point(e)] };
    this.strokes.push(this.current);
    this.draw(this.current, 0);
  },

  move(e) {
    if (!this.current) return;
    e.preventDefault();
    this.current.points.push(this.point(e));
    this.draw(this.current, this.current.points.length - 2);
  },

  up(e) {
    if (!this.current) return;
    e.preventDefault();
    this.current = null;
    this.changed();
  },

  // one stroke from point `from` on (0: the whole stroke, with its round start)
  draw(stroke, from) {
    const ctx = $("lesion-canvas").getContext("2d");
    ctx.save();
    ctx.globalCompositeOperation = stroke.erase ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "rgb(255, 0, 90)";
    ctx.lineWidth = stroke.width;
    ctx.lineCap = ctx.lineJoin = "round";
    const pts = stroke.points;
    if (from === 0) {
      ctx.beginPath();
      ctx.arc(pts[0][0], pts[0][1], stroke.width / 2, 0, 2 * Math.PI);
      ctx.fill();
    }
    if (pts.length > 1) {
      ctx.beginPath();
      ctx.moveTo(pts[Math.max(from, 0)][0], pts[Math.max(from, 0)][1]);
      for (let i = Math.max(from, 0) + 1; i < pts.length; i++) ctx.lineTo(pts[i][0], pts[i][1]);
      ctx.stroke();
    }
    ctx.restore();
  },

  redraw() {
    const canvas = $("lesion-canvas");
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    for (const stroke of this.strokes) this.draw(stroke, 0);
  },

  // the mask as a PNG at the photo's size: white where painted (alpha at least half), black elsewhere
  maskBlob() {
    const canvas = $("lesion-canvas");
    const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    const mask = new ImageData(canvas.width, canvas.height);
    const out = mask.data;
    for (let i = 0; i < painted.length; i += 4) {
      const v = painted[i + 3] >= 128 ? 255 : 0;
      out[i] = out[i + 1] = out[i + 2] = v;
      out[i + 3] = 255;
    }
    const offscreen = document.createElement("canvas");
    offscreen.width = canvas.width;
    offscreen.height = canvas.height;
    offscreen.getContext("2d").putImageData(mask, 0, 0);
    return new Promise((resolve) => offscreen.toBlob(resolve, "image/png"));
  },

  changed() {
    this.seq += 1;
    this.buttons();
    this.send();
  },

  // One request at a time; changes made meanwhile are sent together when it returns.
  async send() {
    if (!this.parsingId) return;
    if (this.inFlight) { this.dirty = true; return; }
    this.inFlight = true;
    const section = $("lesion");
    section.dataset.pending = "true";
    try {
      do {
        this.dirty = false;
        const seq = this.seq;
        const parsingId = this.parsingId;
        const png = await (await this.maskBlob()).arrayBuffer();  // bytes, not a Blob: devtools see the body
        const params = new URLSearchParams({ tbsa_method: $("tbsa-method").value });
        if ($("lesion-view").value) params.set("view", $("lesion-view").value);
        if ($("lesion-age").value !== "" && $("lesion-age").validity.valid) params.set("age_years", $("lesion-age").value);
        const { body } = await fetchJSON(`/api/v1/parsings/${encodeURIComponent(parsingId)}/lesion?${params}`,
                                         { method: "POST", headers: { "Content-Type": "image/png" }, body: png });
        studyPanel.painted(parsingId, params.get("view") || "", body.lesion_mask.lesion_pixels);
        if (parsingId !== this.parsingId) return;  // another photo was parsed meanwhile
        if (seq === this.seq) {
          this.render(body);
          section.dataset.shown = String(seq);
        }
        this.error("");
      } while (this.dirty);
    } catch (err) {
      this.error(err.message);
    } finally {
      this.inFlight = false;
      section.dataset.pending = "false";
    }
  },

  error(message) {
    const box = $("lesion-error");
    box.textContent = message;
    show(box, Boolean(message));
  },

  render(answer) {
    const body = $("lesion-body");
    body.replaceChildren();
    const hit = answer.lesion.filter((r) => r.lesion_pixels > 0);
    for (const region of hit) {
      const row = document.createElement("tr");
      const swatchCell = cell(row, "");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      const rgb = parsePage.classColors && parsePage.classColors[region.class_index];
      if (rgb) swatch.style.background = `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
      swatchCell.appendChild(swatch);
      cell(row, region.label);
      cell(row, region.region_pixels.toLocaleString("en-US"), "num");
      cell(row, region.lesion_pixels.toLocaleString("en-US"), "num");
      cell(row, region.lesion_percent.toFixed(2) + " %", "num");
      body.appendChild(row);
    }
    if (!hit.length) {
      const row = document.createElement("tr");
      cell(row, answer.lesion_mask.lesion_pixels ? "The lesion covers no body region." : "No lesion painted.").colSpan = 5;
      body.appendChild(row);
    }
    this.renderTbsa(answer.tbsa);
  },

  renderTbsa(tbsa) {
    $("tbsa-percent").textContent = tbsa ? tbsa.percent.toFixed(2) + " %" : "–";
    $("tbsa-visible").textContent = tbsa ? `of the body surface; ${tbsa.visible_percent.toFixed(1)} % of it ` +
      "was seen as skin in this photo" : "";
    $("tbsa-detail").textContent = tbsa ? `${tbsa.method} chart, age group ${tbsa.age_group}, ${tbsa.view} view` : "";
    const list = $("tbsa-warnings");
    list.replaceChildren();
    for (const warning of tbsa ? tbsa.warnings : []) {
      const item = document.createElement("li");
      item.textContent = warning;
      list.appendChild(item);
    }
    $("tbsa-note").textContent = tbsa ? tbsa.note.charAt(0).toUpperCase() + tbsa.note.slice(1) + "." : "";
  },
};

// ------------------------------------------------------------------ study %TBSA

// The parsings made on this page (in this page's memory only): those with a lesion sent can be ticked and
// combined by the node into one %TBSA estimate (POST /api/v1/tbsa), e.g. a front and a back photo.
const studyPanel = {
  photos: [],  // {id, source, view ("" = from the photo), lesionPixels (null: no mask sent yet), expiresAt, checked}
  combined: 0,  // how many answers were shown (data-combined)

  init() {
    $("study-combine").addEventListener("click", () => this.combine());
  },

  remember(parsing, source) {
    this.photos = this.photos.filter((p) => p.id !== parsing.id);
    this.photos.push({ id: parsing.id, source, view: "", lesionPixels: null, checked: true,
                       expiresAt: Date.now() + 1000 * parsing.expires_in_s });
    this.render();
  },

  // a lesion mask was sent for this parsing, with this view ("" = the photo's, else anterior)
  painted(id, view, lesionPixels) {
    const photo = this.photos.find((p) => p.id === id);
    if (!photo) return;
    const changed = photo.lesionPixels !== lesionPixels || photo.view !== view;
    photo.view = view;
    photo.lesionPixels = lesionPixels;
    if (changed && photo.checked && this.combined) show($("study-stale"), true);
    this.render();
  },

  usable() {
    const now = Date.now();
    this.photos = this.photos.filter((p) => p.expiresAt > now);  // the node has forgotten them
    return this.photos.filter((p) => p.lesionPixels !== null);
  },

  render() {
    const usable = this.usable();
    const list = $("study-list");
    list.replaceChildren();
    for (const photo of usable) {
      const item = document.createElement("li");
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = photo.checked;
      box.dataset.parsing = photo.id;
      box.addEventListener("change", () => { photo.checked = box.checked; this.buttons(); });
      const text = document.createElement("span");
      text.textContent = photo.source;
      const detail = document.createElement("span");
      detail.className = "hint";
      detail.textContent = `${photo.view || "view from the photo"} · ${photo.lesionPixels.toLocaleString("en-US")} ` +
        "lesion px";
      label.append(box, text, detail);
      item.appendChild(label);
      list.appendChild(item);
    }
    show($("study"), usable.length > 0);
    this.buttons();
  },

  chosen() {
    return this.usable().filter((p) => p.checked);
  },

  buttons() {
    const count = this.chosen().length;
    $("study-combine").disabled = count === 0 || count > MAX_STUDY_PHOTOS;
    $("study-hint").textContent = count > MAX_STUDY_PHOTOS ? `at most ${MAX_STUDY_PHOTOS} photos` :
      count === 1 ? "1 photo ticked" : `${count} photos ticked`;
  },

  async combine() {
    const chosen = this.chosen();
    if (!chosen.length) { this.render(); return; }
    const request = { parsings: chosen.map((p) => p.id), method: $("tbsa-method").value };
    if ($("lesion-age").value !== "" && $("lesion-age").validity.valid) request.age_years = Number($("lesion-age").value);
    const button = $("study-combine");
    button.disabled = true;
    try {
      const { body } = await fetchJSON("/api/v1/tbsa", { method: "POST", headers: { "Content-Type": "application/json" },
                                                          body: JSON.stringify(request) });
      this.error("");
      this.show(body);
    } catch (err) {
      this.error(err.message);
    } finally {
      this.render();
    }
  },

  error(message) {
    const box = $("study-error");
    box.textContent = message;
    show(box, Boolean(message));
  },

  show(answer) {
    const sources = Object.fromEntries(this.photos.map((p) => [p.id, p.source]));
    $("study-percent").textContent = answer.percent.toFixed(2) + " %";
    $("study-visible").textContent = `of the body surface; ${answer.visible_percent.toFixed(1)} % of it was seen as ` +
      "skin in these photos";
    const how = { request: "given", dicom: "from the DICOM header", assumed: "assumed" };
    const photos = answer.photos.map((p) => `${sources[p.parsing] || p.source}: ${p.view} (${how[p.view_from]})`);
    $("study-detail").textContent = `${answer.method} chart, age group ${answer.age_group}, ${answer.view} ` +
      `view${answer.view === "both" ? "s" : ""} · ${photos.join("; ")}`;
    const list = $("study-warnings");
    list.replaceChildren();
    for (const warning of answer.warnings) {
      const item = document.createElement("li");
      item.textContent = warning;
      list.appendChild(item);
    }
    $("study-note").textContent = answer.note.charAt(0).toUpperCase() + answer.note.slice(1) + ".";
    const body = $("study-body");
    body.replaceChildren();
    for (const region of answer.regions) {
      const row = document.createElement("tr");
      cell(row, region.view);
      cell(row, region.region);
      cell(row, region.chart_percent.toFixed(2), "num");
      cell(row, percent(region.visible_share), "num");
      cell(row, percent(region.lesion_share), "num");
      cell(row, region.contribution_percent.toFixed(2), "num");
      body.appendChild(row);
    }
    show($("study-stale"), false);
    show($("study-result"), true);
    this.combined += 1;
    $("study").dataset.combined = String(this.combined);
  },
};

// ------------------------------------------------------------------ dashboard

const dashboard = {
  offset: 0,
  total: 0,
  timer: null,

  init() {
    $("state-filter").addEventListener("change", () => { this.offset = 0; this.refresh(); });
    $("prev-page").addEventListener("click", () => { this.offset = Math.max(0, this.offset - PAGE_SIZE); this.refresh(); });
    $("next-page").addEventListener("click", () => { this.offset += PAGE_SIZE; this.refresh(); });
    this.refresh();
    this.timer = setInterval(() => this.refresh(), JOBS_REFRESH_MS);
  },

  async refresh() {
    const state = $("state-filter").value;
    const params = new URLSearchParams({ limit: PAGE_SIZE, offset: this.offset });
    if (state) params.append("state", state);
    try {
      const { body } = await fetchJSON("/api/v1/jobs?" + params);
      showError("");
      this.render(body);
    } catch (err) {
      showError(err.message);
    }
  },

  render(page) {
    const c = page.counts;
    $("count-total").textContent = Object.values(c).reduce((a, b) => a + b, 0);
    $("count-waiting").textContent = c.received + c.parsing + c.encoding;
    $("count-dispatching").textContent = c.dispatching;
    $("count-done").textContent = c.done;
    $("count-failed").textContent = c.failed;
    this.total = page.total;

    const body = $("jobs-body");
    body.replaceChildren();
    for (const job of page.jobs) body.appendChild(this.row(job));
    show($("no-jobs"), page.jobs.length === 0);
    const first = page.jobs.length ? page.offset + 1 : 0;
    $("page-info").textContent = `${first}–${page.offset + page.jobs.length} of ${page.total}`;
    $("prev-page").disabled = page.offset === 0;
    $("next-page").disabled = page.offset + page.jobs.length >= page.total;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
    $("jobs-table").dataset.loaded = "true";
  },

  row(job) {
    const row = document.createElement("tr");
    row.dataset.jobId = job.id;
    row.dataset.state = job.state;
    cell(row, String(job.id), "num");
    const stateCell = cell(row, "");
    const badge = document.createElement("span");
    badge.className = "state state-" + job.state;
    badge.textContent = job.state;
    stateCell.appendChild(badge);
    const ae = cell(row, job.calling_ae);
    ae.title = job.calling_host;
    cell(row, formatTime(job.received_at));
    cell(row, formatTime(job.updated_at));
    cell(row, job.parse_s === null ? "–" : job.parse_s.toFixed(2), "num");
    cell(row, job.destinations.length ? job.destinations.join(", ") : "–");
    const reason = cell(row, job.reason || "", "reason");
    reason.title = job.reason || "";
    const action = cell(row, "");
    if (job.state === "failed") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "retry";
      button.textContent = "Retry";
      button.addEventListener("click", () => this.retry(job.id, button));
      action.appendChild(button);
    }
    return row;
  },

  async retry(jobId, button) {
    button.disabled = true;
    button.textContent = "Retrying…";
    try {
      await fetchJSON(`/api/v1/jobs/${jobId}/retry`, { method: "POST" });
      showError("");
    } catch (err) {
      showError(`Job ${jobId}: ${err.message}`);
      button.disabled = false;
      button.textContent = "Retry";
    }
    this.refresh();
  },
};

// ------------------------------------------------------------------ start

document.addEventListener("DOMContentLoaded", () => {
  refreshReadiness();
  setInterval(refreshReadiness, READY_REFRESH_MS);
  const page = document.body.dataset.page;
  if (page === "parse") { lesionPainter.init(); studyPanel.init(); parsePage.init(); }
  if (page === "dashboard") dashboard.init();
});
