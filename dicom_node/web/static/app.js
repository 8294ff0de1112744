// dicom_node web UI: the parse page and the dashboard. Plain JavaScript, no build step.
// Everything shown from the server goes in with textContent, never innerHTML.
"use strict";

const READY_REFRESH_MS = 10000;
const JOBS_REFRESH_MS = 3000;
const PAGE_SIZE = 25;

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

    const links = { "download-color": [colorUrl, "_color.png"], "download-overlay": [overlayUrl, "_overlay.png"],
                    "download-json": [jsonUrl, ".json"] };
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
    $("results").dataset.ready = "true";
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
  if (page === "parse") parsePage.init();
  if (page === "dashboard") dashboard.init();
});
