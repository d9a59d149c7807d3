// The imagegate playground: streamed generations and masked edits against this server's /v1 API. No build step.

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "imagegate.apiKey";

const keyInput = $("api-key");
const statusEl = $("status");
const errorEl = $("error");

// -- settings, status, errors ------------------------------------------------------------------------------------

keyInput.value = localStorage.getItem(KEY_STORAGE) ?? "";
keyInput.addEventListener("change", () => {
  const key = keyInput.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  loadModels();
});

function authHeaders(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

function setStatus(text) {
  statusEl.textContent = text;
}

function showError(message, status) {
  errorEl.textContent = message;
  setStatus("");
  if (status === 401) {
    $("settings").open = true;
    keyInput.focus();
  }
}

function clearError() {
  errorEl.textContent = "";
}

async function httpError(response) {
  let message = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch {
    // not JSON: keep the status line
  }
  showError(message, response.status);
}

// -- tabs ----------------------------------------------------------------------------------------------------------

const tabs = [...document.querySelectorAll('[role="tab"]')];

function selectTab(tab) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (event) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
    if (!step) return;
    const next = tabs[(i + step + tabs.length) % tabs.length];
    selectTab(next);
    next.focus();
  });
});

// -- models --------------------------------------------------------------------------------------------------------

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) {
      await httpError(response);
      return;
    }
    const { data } = await response.json();
    for (const select of document.querySelectorAll(".model-select")) {
      const current = select.value;
      select.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
      if (data.some((m) => m.id === current)) select.value = current;
    }
    document.body.dataset.models = "loaded";
  } catch (error) {
    showError(`Could not list the models: ${error.message}`);
  }
}

// -- Server-Sent Events over fetch ---------------------------------------------------------------------------------

async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const parsed = parseFrame(frame);
        if (parsed) yield parsed;
      }
    }
    const last = parseFrame(buffer + decoder.decode());
    if (last) yield last;
  } finally {
    reader.releaseLock();
  }
}

function parseFrame(frame) {
  let event = "message";
  const data = [];
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

// -- image tiles ---------------------------------------------------------------------------------------------------

function newTile(i) {
  const figure = document.createElement("figure");
  figure.className = "tile";
  figure.dataset.index = String(i);
  figure.dataset.state = "pending";
  figure.dataset.partials = "0";
  const img = document.createElement("img");
  img.alt = `Image ${i + 1}: waiting`;
  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.textContent = `Image ${i + 1}: waiting…`;
  caption.append(label);
  figure.append(img, caption);
  return figure;
}

function makeTiles(gallery, count) {
  gallery.replaceChildren(...Array.from({ length: count }, (_, i) => newTile(i)));
}

function tileFor(gallery, index) {
  let tile = gallery.querySelector(`.tile[data-index="${index}"]`);
  if (!tile) {
    tile = newTile(index);
    gallery.append(tile);
  }
  return tile;
}

function showImage(gallery, payload, final) {
  const index = payload.image_index ?? 0;
  const tile = tileFor(gallery, index);
  const format = payload.output_format || "png";
  const src = `data:image/${format};base64,${payload.b64_json}`;
  const img = tile.querySelector("img");
  const label = tile.querySelector("figcaption span");
  img.src = src;
  if (final) {
    tile.dataset.state = "final";
    img.alt = `Image ${index + 1}`;
    label.textContent = `Image ${index + 1}: done`;
    const link = document.createElement("a");
    link.href = src;
    link.download = `imagegate-${index + 1}.${format === "jpeg" ? "jpg" : format}`;
    link.textContent = "Download";
    link.className = "download";
    tile.querySelector("figcaption").append(link);
  } else {
    const partials = Number(tile.dataset.partials) + 1;
    tile.dataset.partials = String(partials);
    tile.dataset.state = "partial";
    img.alt = `Image ${index + 1}: partial ${partials}`;
    label.textContent = `Image ${index + 1}: partial ${partials}`;
  }
}

// -- one streamed request ------------------------------------------------------------------------------------------

function streamer({ form, run, cancel, gallery, prefix, verb }) {
  let controller = null;
  cancel.addEventListener("click", () => controller?.abort());

  return async function start(url, init, count) {
    clearError();
    controller = new AbortController();
    run.disabled = true;
    cancel.disabled = false;
    form.setAttribute("aria-busy", "true");
    makeTiles(gallery, count);
    setStatus(`${verb}…`);
    let finals = 0;
    try {
      const response = await fetch(url, { ...init, signal: controller.signal });
      if (!response.ok) {
        await httpError(response);
        return;
      }
      for await (const { event, data } of sseEvents(response.body)) {
        const payload = JSON.parse(data);
        if (event === "error" || payload.type === "error") {
          showError(payload.error?.message || "The server reported an error.");
          return;
        }
        if (event === `${prefix}.partial_image`) {
          showImage(gallery, payload, false);
          setStatus(`${verb}… partial image ${payload.partial_image_index + 1} of image ${(payload.image_index ?? 0) + 1}`);
        } else if (event === `${prefix}.completed`) {
          showImage(gallery, payload, true);
          finals += 1;
          setStatus(`${verb}… ${finals} of ${count} done`);
        }
      }
      setStatus(finals ? `Done: ${finals} image${finals === 1 ? "" : "s"}.` : "The stream ended without an image.");
    } catch (error) {
      if (error.name === "AbortError") setStatus("Cancelled");
      else showError(`Request failed: ${error.message}`);
    } finally {
      controller = null;
      for (const tile of gallery.querySelectorAll('.tile[data-state="pending"]')) tile.remove();
      run.disabled = false;
      cancel.disabled = true;
      form.removeAttribute("aria-busy");
    }
  };
}

function numberField(id) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : Number(raw);
}

// -- Generate ------------------------------------------------------------------------------------------------------

const generate = streamer({
  form: $("generate-form"),
  run: $("gen-run"),
  cancel: $("gen-cancel"),
  gallery: $("gen-gallery"),
  prefix: "image_generation",
  verb: "Generating",
});

$("generate-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const body = {
    model: $("gen-model").value || undefined,
    prompt: $("gen-prompt").value,
    negative_prompt: $("gen-negative").value.trim() || undefined,
    size: $("gen-size").value.trim() || undefined,
    num_inference_steps: numberField("gen-steps"),
    guidance_scale: numberField("gen-guidance"),
    seed: numberField("gen-seed"),
    n: numberField("gen-n") ?? 1,
    partial_images: numberField("gen-partials"),
    stream: true,
  };
  generate(
    "/v1/images/generations",
    { method: "POST", headers: authHeaders({ "Content-Type": "application/json" }), body: JSON.stringify(body) },
    body.n,
  );
});

// -- Edit: image, painted mask -------------------------------------------------------------------------------------

const imageCanvas = $("edit-image");
const maskCanvas = $("edit-mask");
const dropZone = $("drop-zone");
let hasImage = false;

async function loadImage(file) {
  clearError();
  try {
    const bitmap = await createImageBitmap(file);
    for (const canvas of [imageCanvas, maskCanvas]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    imageCanvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    clearMask();
    $("canvas-wrap").hidden = false;
    hasImage = true;
    setStatus(`Loaded ${file.name || "image"} (${imageCanvas.width}x${imageCanvas.height}). Paint the area to redraw.`);
  } catch {
    showError("That file is not an image this browser can read.");
  }
}

function clearMask() {
  maskCanvas.getContext("2d").clearRect(0, 0, maskCanvas.width, maskCanvas.height);
}

$("edit-file").addEventListener("change", (event) => {
  const [file] = event.target.files;
  if (file) loadImage(file);
});
dropZone.addEventListener("dragover", (event) => {
  event.preventDefault();
  dropZone.classList.add("over");
});
dropZone.addEventListener("dragleave", () => dropZone.classList.remove("over"));
dropZone.addEventListener("drop", (event) => {
  event.preventDefault();
  dropZone.classList.remove("over");
  const file = [...event.dataTransfer.files].find((f) => f.type.startsWith("image/"));
  if (file) loadImage(file);
});
$("edit-clear").addEventListener("click", clearMask);

let last = null;

function canvasPoint(event) {
  const rect = maskCanvas.getBoundingClientRect();
  return {
    x: ((event.clientX - rect.left) * maskCanvas.width) / rect.width,
    y: ((event.clientY - rect.top) * maskCanvas.height) / rect.height,
    scale: maskCanvas.width / rect.width,
  };
}

function paintTo(point) {
  const ctx = maskCanvas.getContext("2d");
  ctx.strokeStyle = "#e0245e";
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.lineWidth = Number($("edit-brush").value) * point.scale;
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  ctx.lineTo(point.x, point.y);
  ctx.stroke();
  last = point;
}

maskCanvas.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  maskCanvas.setPointerCapture(event.pointerId);
  last = canvasPoint(event);
  paintTo(last);
});
maskCanvas.addEventListener("pointermove", (event) => {
  if (last) paintTo(canvasPoint(event));
});
for (const type of ["pointerup", "pointercancel"]) {
  maskCanvas.addEventListener(type, () => {
    last = null;
  });
}

const toBlob = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));

/** OpenAI's mask: the image's size, opaque everywhere except where painted (alpha 0 there: redraw). */
function maskBlob() {
  const mask = document.createElement("canvas");
  mask.width = maskCanvas.width;
  mask.height = maskCanvas.height;
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.width, mask.height);
  ctx.globalCompositeOperation = "destination-out";
  ctx.drawImage(maskCanvas, 0, 0);
  return toBlob(mask);
}

const edit = streamer({
  form: $("edit-form"),
  run: $("edit-run"),
  cancel: $("edit-cancel"),
  gallery: $("edit-gallery"),
  prefix: "image_edit",
  verb: "Editing",
});

$("edit-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!hasImage) {
    showError("Choose an image first.");
    $("edit-file").focus();
    return;
  }
  const form = new FormData();
  form.append("image", await toBlob(imageCanvas), "image.png");
  form.append("mask", await maskBlob(), "mask.png");
  const fields = {
    model: $("edit-model").value,
    prompt: $("edit-prompt").value,
    size: $("edit-size").value.trim(),
    num_inference_steps: $("edit-steps").value.trim(),
    partial_images: $("edit-partials").value.trim(),
    stream: "true",
  };
  for (const [name, value] of Object.entries(fields)) if (value) form.append(name, value);
  edit("/v1/images/edits", { method: "POST", headers: authHeaders(), body: form }, 1);
});

loadModels();
document.body.dataset.ready = "true";
