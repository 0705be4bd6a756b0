// The ldm-serve web page: a form over the native jobs API (/v1/jobs), its progress events, and a gallery.
// Plain JavaScript, no framework, nothing fetched from elsewhere. Every API call goes through api(), which sends
// the key (kept in sessionStorage) and turns refusals into ApiError with the server's own words.
"use strict";

const KEY_STORE = "ldm-serve.key";
const GALLERY_SIZE = 24;
const $ = (id) => document.getElementById(id);
const state = {
  job: null, // id of the job this page is following
  abort: null, // AbortController of its event stream
  init: null, // the input image (data URL) for img2img / inpaint
  masked: false, // whether the mask has paint on it
  images: new Map(), // image URL -> Promise of {blob, url (object URL)}
};
// Server field names -> the form control to point at when a request is refused.
const FIELD_CONTROLS = {
  prompt: "prompt", negative_prompt: "negative_prompt", sampler: "sampler", steps: "steps", scale: "scale",
  seed: "seed", width: "width", height: "height", n: "n", n_iter: "n", strength: "strength", previews: "previews",
  init_image: "init-image", mask: "mask", Authorization: "key",
};

class ApiError extends Error {
  constructor(status, message, field, retryAfter) {
    super(message);
    this.status = status;
    this.field = field;
    this.retryAfter = retryAfter;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// API calls and the key

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let field = null;
  try {
    const body = await response.json();
    message = body.detail ?? body.error?.message ?? message;
    field = body.field ?? body.error?.param ?? null;
  } catch {
    // not JSON (a proxy's page, say): the status line says enough
  }
  if (typeof message !== "string") message = JSON.stringify(message);
  return new ApiError(response.status, message, field, response.headers.get("Retry-After"));
}

async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORE);
    const headers = new Headers(options.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...options, headers });
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status !== 401) throw error;
    sessionStorage.removeItem(KEY_STORE);
    const reason = key ? `The server refused this API key: ${error.message}`
      : `This server needs an API key: ${error.message}`;
    showMessage(reason);
    sessionStorage.setItem(KEY_STORE, await askKey(reason, error));
    hideMessage();
  }
}

let keyPrompt = null; // one question at a time, shared by the calls that need the answer

function askKey(reason, error) {
  if (keyPrompt) return keyPrompt;
  const dialog = $("key-dialog");
  $("key-reason").textContent = reason;
  $("key").value = "";
  dialog.returnValue = "";
  keyPrompt = new Promise((resolve, reject) => {
    dialog.addEventListener("close", () => {
      keyPrompt = null;
      const key = $("key").value.trim();
      if (dialog.returnValue === "ok" && key) resolve(key);
      else reject(error);
    }, { once: true });
  });
  dialog.showModal();
  $("key").focus();
  return keyPrompt;
}

async function getJson(path, options) {
  return (await api(path, options)).json();
}

// ---------------------------------------------------------------------------------------------------------------
// Messages

function describe(error) {
  if (error instanceof ApiError) {
    const words = {
      401: "Not authorised", 404: "Not found", 409: "Conflict", 410: "Gone", 413: "Too large",
      415: "Wrong content type", 422: "Refused", 429: "Too many requests", 503: "Unavailable",
    };
    let text = `${words[error.status] || `Error ${error.status}`}: ${error.message}`;
    if (error.retryAfter && !/retry in/i.test(text)) text += ` (retry in ${error.retryAfter} s)`;
    return text;
  }
  if (error instanceof TypeError) return `Cannot reach the server: ${error.message}`;
  return String(error?.message || error);
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
}

function hideMessage() {
  $("message").hidden = true;
}

function showError(error) {
  if (error?.name === "AbortError") return;
  showMessage(describe(error));
  const control = error instanceof ApiError && $(FIELD_CONTROLS[error.field]);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    if (!control.disabled && control.offsetParent !== null) control.focus();
  }
}

function clearInvalid() {
  for (const el of document.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

// ---------------------------------------------------------------------------------------------------------------
// The form

async function loadDefaults() {
  const d = await getJson("/web/defaults");
  const sampler = $("sampler");
  sampler.replaceChildren(...d.samplers.map((name) => new Option(name, name, false, name === d.sampler)));
  Object.assign($("steps"), { value: d.steps, max: d.limits.max_steps });
  $("scale").value = d.scale;
  $("n").max = d.limits.max_images;
  $("width").value = d.width;
  $("height").value = d.height;
  $("prompt").maxLength = $("negative_prompt").maxLength = d.limits.max_prompt;
  $("model").textContent = `model: ${d.model}`;
  $("change-key").hidden = !sessionStorage.getItem(KEY_STORE);
}

function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler: $("sampler").value || undefined,
    steps: numberOf("steps"),
    scale: numberOf("scale"),
    n: numberOf("n"),
    seed: $("random-seed").checked ? -1 : numberOf("seed"),
  };
  if ($("previews").checked) body.previews = true; // sent only when asked: older servers refuse the field
  if (state.init) {
    Object.assign(body, { kind: state.masked ? "inpaint" : "img2img", init_image: state.init,
      strength: Number($("strength").value) });
    if (state.masked) body.mask = maskDataUrl();
  } else {
    Object.assign(body, { kind: "txt2img", width: numberOf("width"), height: numberOf("height") });
  }
  return body;
}

async function generate() {
  if (state.job) return;
  clearInvalid();
  hideMessage();
  let job;
  try {
    job = await getJson("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
    });
  } catch (error) {
    showError(error);
    return;
  }
  await follow(job);
}

async function cancel() {
  if (!state.job) return;
  $("cancel").disabled = true;
  try {
    await api(`/v1/jobs/${state.job}`, { method: "DELETE" });
  } catch (error) {
    showError(error);
    $("cancel").disabled = !state.job;
  }
}

function setRunning(jobId) {
  state.job = jobId;
  $("generate").disabled = Boolean(jobId);
  $("cancel").disabled = !jobId;
}

// ---------------------------------------------------------------------------------------------------------------
// Following a job: server-sent events read with fetch (EventSource cannot send the key)

async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: JSON.parse(data.join("\n")) } : null;
}

async function follow(job) {
  setRunning(job.id);
  state.abort = new AbortController();
  $("preview").hidden = true;
  showProgress(job);
  $("progress-area").scrollIntoView({ block: "nearest" }); // below the form on a phone
  try {
    const ended = await watch(job.id, state.abort.signal);
    if (ended) await showJob(await getJson(`/v1/jobs/${job.id}`));
  } catch (error) {
    showError(error);
  } finally {
    setRunning(null);
    refreshGallery();
  }
}

// Reads the job's events until `done` (true); a dropped connection (a server restart) is retried, since the
// job is kept. False when the server drains with the job still queued.
async function watch(jobId, signal) {
  for (let attempt = 0; attempt < 30; attempt++) {
    try {
      const response = await api(`/v1/jobs/${jobId}/events`, { signal, headers: { Accept: "text/event-stream" } });
      for await (const event of readEvents(response)) {
        if (event.name === "progress") showProgress(event.data);
        else if (event.name === "done") return true;
        else if (event.name === "shutdown") {
          showMessage("The server is shutting down; this job stays queued and runs after its restart.", "info");
          return false;
        }
      }
    } catch (error) {
      if (error instanceof ApiError || signal.aborted) throw error;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  throw new Error("lost the connection to the server while following the job");
}

function showProgress(view) {
  $("progress-area").hidden = false;
  const bar = $("progress");
  const progress = view.progress;
  if (view.status === "queued") {
    $("progress-text").textContent = `Queued${view.position ? ` (position ${view.position})` : ""}`;
    bar.removeAttribute("value"); // indeterminate
  } else if (progress && progress.steps) {
    const eta = progress.eta_seconds == null ? "" : ` · about ${formatSeconds(progress.eta_seconds)} left`;
    $("progress-text").textContent = `Step ${progress.step} of ${progress.steps}${eta}`;
    bar.max = progress.steps;
    bar.value = progress.step;
  } else {
    $("progress-text").textContent = view.status === "running" ? "Starting…" : statusWords(view);
  }
  const preview = view.preview ?? progress?.preview;
  if (typeof preview === "string" && preview.startsWith("data:image/")) {
    $("preview").src = preview;
    $("preview").hidden = false;
  }
}

function formatSeconds(seconds) {
  return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

function statusWords(view) {
  const words = { succeeded: "Done", cancelled: "Cancelled", failed: "Failed", queued: "Queued", running: "Running" };
  return words[view.status] || view.status;
}

// ---------------------------------------------------------------------------------------------------------------
// Showing a job's images

function loadImage(url) {
  if (!state.images.has(url)) {
    const promise = api(url).then(async (response) => {
      const blob = await response.blob();
      return { blob, url: URL.createObjectURL(blob) };
    });
    promise.catch(() => state.images.delete(url)); // a later look may succeed
    state.images.set(url, promise);
  }
  return state.images.get(url);
}

function summary(view) {
  const r = view.request || {};
  const parts = [view.kind, `seed ${r.seed}`, r.sampler, `${r.steps} steps`, `scale ${r.scale}`,
    `${r.width}×${r.height}`];
  if (r.strength != null && view.kind !== "txt2img") parts.push(`strength ${r.strength}`);
  return parts.join(" · ");
}

async function showJob(view) {
  $("result-empty").hidden = true;
  $("preview").hidden = true; // the images replace it
  const bar = $("progress");
  if (view.status === "succeeded") bar.value = bar.max;
  $("progress-text").textContent = statusWords(view) + (view.error ? `: ${view.error}` : "");
  const head = $("result-summary");
  head.replaceChildren(element("strong", {}, view.request?.prompt || "(empty prompt)"),
    element("span", { className: "muted" }, ` ${summary(view)}`), seedButton(view.request?.seed));
  const results = $("results");
  results.dataset.jobId = view.id;
  results.dataset.status = view.status;
  markShown();
  results.replaceChildren();
  if (view.status !== "succeeded") {
    const text = view.expired ? "This job's images have expired." : `${statusWords(view)}.`;
    results.append(element("p", { className: "muted" }, view.error ? `Failed: ${view.error}` : text));
    return;
  }
  const figures = (view.images || []).map((url, k) => imageFigure(view, url, k));
  results.append(...figures);
  await Promise.all(figures.map((f) => f.loaded));
}

function seedButton(seed) {
  const button = element("button", { type: "button", className: "link" }, "use this seed");
  button.addEventListener("click", () => {
    $("random-seed").checked = false;
    $("seed").disabled = false;
    $("seed").value = seed;
    $("seed").focus();
  });
  return button;
}

function imageFigure(view, url, k) {
  const img = element("img", { alt: `image ${k + 1} of "${view.request?.prompt || ""}"` });
  const download = element("a", { className: "button download", download: `ldm-${view.id.slice(0, 8)}-${k}.png` },
    "Download PNG");
  const use = element("button", { type: "button", className: "use" }, "Use as input");
  const details = element("details", {}, element("summary", {}, "Parameters"));
  const figure = element("figure", { className: "result" }, img,
    element("figcaption", {}, details, element("div", { className: "row" }, download, use)));
  Object.assign(figure.dataset, { jobId: view.id, index: String(k) });
  figure.loaded = loadImage(url).then(async ({ blob, url: objectUrl }) => {
    img.src = objectUrl;
    download.href = objectUrl;
    use.addEventListener("click", () => useAsInput(blob));
    const text = (await pngText(blob)).parameters;
    details.append(element("pre", {}, text || summary(view)));
    await img.decode();
  }).catch((error) => figure.append(element("p", { className: "error-text" }, describe(error))));
  return figure;
}

function element(tag, props, ...children) {
  const el = Object.assign(document.createElement(tag), props);
  el.append(...children);
  return el;
}

// The PNG's text chunks (tEXt, and uncompressed iTXt): "parameters" holds the settings, as A1111 writes them.
async function pngText(blob) {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  const view = new DataView(bytes.buffer);
  const latin1 = new TextDecoder("latin1");
  const utf8 = new TextDecoder();
  const texts = {};
  for (let pos = 8; pos + 12 <= bytes.length;) {
    const length = view.getUint32(pos);
    const type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
    const data = bytes.subarray(pos + 8, pos + 8 + length);
    const zero = data.indexOf(0);
    if (type === "tEXt" && zero > 0) {
      texts[latin1.decode(data.subarray(0, zero))] = latin1.decode(data.subarray(zero + 1));
    } else if (type === "iTXt" && zero > 0 && data[zero + 1] === 0) {
      let start = data.indexOf(0, zero + 3); // end of the language tag
      start = data.indexOf(0, start + 1); // end of the translated keyword
      texts[latin1.decode(data.subarray(0, zero))] = utf8.decode(data.subarray(start + 1));
    } else if (type === "IEND") {
      break;
    }
    pos += 12 + length;
  }
  return texts;
}

// ---------------------------------------------------------------------------------------------------------------
// The input image and its mask (img2img / inpaint)

async function useAsInput(blob) {
  state.init = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
  const img = $("init-image");
  img.src = state.init;
  await img.decode();
  const canvas = $("mask");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  clearMask();
  $("input-panel").hidden = false;
  for (const id of ["width", "height"]) $(id).disabled = true; // img2img keeps the input's size
  $("input-panel").scrollIntoView({ block: "nearest" });
  $("strength").focus();
}

function removeInput() {
  state.init = null;
  clearMask();
  $("input-panel").hidden = true;
  for (const id of ["width", "height"]) $(id).disabled = false;
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.masked = false;
  $("mode").textContent = "img2img";
}

function setupBrush() {
  const canvas = $("mask");
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    paint(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = point(event);
    paint(last, next);
    last = next;
  });
  for (const type of ["pointerup", "pointercancel"]) canvas.addEventListener(type, () => { last = null; });
  setupKeyboardBrush(canvas);
}

// The brush from the keyboard: arrows move it (by half its size), Space paints there, Shift+arrows paint a line.
function setupKeyboardBrush(canvas) {
  const cursor = $("brush-cursor");
  let at = null;
  const show = () => {
    const size = brushWidth() / canvas.width * 100;
    Object.assign(cursor.style, { left: `${at[0] / canvas.width * 100}%`, top: `${at[1] / canvas.height * 100}%`,
      width: `${size}%`, height: `${size / canvas.height * canvas.width}%` });
    cursor.hidden = false;
  };
  canvas.addEventListener("focus", () => {
    at ??= [canvas.width / 2, canvas.height / 2];
    show();
  });
  canvas.addEventListener("blur", () => { cursor.hidden = true; });
  canvas.addEventListener("keydown", (event) => {
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    if (event.key === " " || event.key === "Spacebar") {
      paint(at, at);
    } else if (moves[event.key]) {
      const step = Math.max(1, brushWidth() / 2);
      const next = [at[0] + moves[event.key][0] * step, at[1] + moves[event.key][1] * step]
        .map((v, i) => Math.min(Math.max(v, 0), i ? canvas.height : canvas.width));
      if (event.shiftKey) paint(at, next);
      at = next;
    } else {
      return;
    }
    event.preventDefault();
    show();
  });
}

function brushWidth() {
  return Math.max(1, $("mask").width * Number($("brush").value) / 100);
}

function paint(from, to) {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  ctx.strokeStyle = "#ff3b30";
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.lineWidth = brushWidth();
  ctx.beginPath();
  ctx.moveTo(...from);
  ctx.lineTo(...to);
  ctx.stroke();
  state.masked = true;
  $("mode").textContent = "inpaint";
}

// The painted canvas as the API's mask: white where painted (repaint), black elsewhere, soft at the edges.
function maskDataUrl() {
  const canvas = $("mask");
  const { width, height } = canvas;
  const painted = canvas.getContext("2d").getImageData(0, 0, width, height).data;
  const out = element("canvas", { width, height });
  const ctx = out.getContext("2d");
  const mask = ctx.createImageData(width, height);
  for (let i = 0; i < painted.length; i += 4) {
    mask.data[i] = mask.data[i + 1] = mask.data[i + 2] = painted[i + 3];
    mask.data[i + 3] = 255;
  }
  ctx.putImageData(mask, 0, 0);
  return out.toDataURL("image/png");
}

// ---------------------------------------------------------------------------------------------------------------
// The gallery: the server's recent jobs, so it survives a reload and a server restart

async function refreshGallery() {
  let jobs;
  try {
    jobs = (await getJson(`/v1/jobs?limit=${GALLERY_SIZE}`)).jobs;
  } catch (error) {
    showError(error);
    return;
  }
  const list = $("gallery");
  list.replaceChildren(...jobs.map(galleryItem));
  if (!jobs.length) list.append(element("li", { className: "muted" }, "No jobs yet."));
}

function galleryItem(view) {
  const thumb = element("span", { className: "thumb" });
  const created = new Date(view.created * 1000);
  const today = created.toDateString() === new Date().toDateString();
  const when = today ? created.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : created.toLocaleDateString();
  const button = element("button", { type: "button", className: "job" }, thumb,
    element("span", { className: "job-prompt" }, view.request?.prompt || "(empty prompt)"),
    element("span", { className: "job-meta" }, `${statusWords(view)} · ${view.kind} · ${when}`));
  Object.assign(button.dataset, { jobId: view.id, status: view.status });
  button.title = summary(view);
  if (view.id === $("results").dataset.jobId) button.setAttribute("aria-current", "true");
  button.addEventListener("click", () => openJob(view));
  if (view.images?.length) {
    loadImage(view.images[0]).then(({ url }) => {
      thumb.append(element("img", { src: url, alt: "" }));
    }).catch(() => thumb.append("no image"));
  } else {
    thumb.append(view.expired ? "expired" : statusWords(view).toLowerCase());
  }
  return element("li", {}, button);
}

// The gallery item of the job the result area shows.
function markShown() {
  for (const item of document.querySelectorAll(".job")) {
    if (item.dataset.jobId === $("results").dataset.jobId) item.setAttribute("aria-current", "true");
    else item.removeAttribute("aria-current");
  }
}

async function openJob(view) {
  hideMessage();
  if ((view.status === "queued" || view.status === "running") && !state.job) {
    await follow(view);
  } else {
    try {
      await showJob(await getJson(`/v1/jobs/${view.id}`));
    } catch (error) {
      showError(error);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Wiring

function wire() {
  const form = $("form");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    generate();
  });
  form.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      generate();
    }
  });
  $("cancel").addEventListener("click", cancel);
  $("random-seed").addEventListener("change", () => {
    $("seed").disabled = $("random-seed").checked;
    if (!$("seed").disabled && $("seed").value === "") $("seed").value = 0;
  });
  $("strength").addEventListener("input", () => { $("strength-value").value = $("strength").value; });
  $("brush").addEventListener("input", () => { $("brush-value").value = `${$("brush").value}%`; });
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-input").addEventListener("click", removeInput);
  $("refresh").addEventListener("click", refreshGallery);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    $("key-dialog").close("ok");
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close(""));
  $("change-key").addEventListener("click", async () => {
    try {
      sessionStorage.setItem(KEY_STORE, await askKey("Enter another API key.", null));
      await start();
    } catch {
      // kept the old key
    }
  });
  setupBrush();
}

async function start() {
  try {
    await loadDefaults();
  } catch (error) {
    showError(error);
    return;
  }
  await refreshGallery();
}

wire();
start();
