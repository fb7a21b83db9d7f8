// The upload page: pick or drop photos, each is sent to POST /v1/tags on its own (the server
// batches concurrent photos anyway) and shown with its tags as probability bars. Clicking a tag
// asks POST /v1/explain (Accept: image/png) why, and shows the heatmap over the photo (for a
// people tag, the faces the detector found, boxed); clicking it again shows the photo. A tag can
// be marked wrong (POST /v1/feedback), and a custom tag taught from photos
// (POST /v1/custom-tags/NAME/examples), with its estimated precision and recall. Tags come in
// the language chosen in the switch (first the browser's own, when the server has it), sent as
// ?lang=; a tag's path stays its English id, what /v1/explain and /v1/feedback are given.
"use strict";

const KEY_STORAGE = "phototag.apiKey";
const LANG_STORAGE = "phototag.lang";
const PARALLEL = 4;

const $ = (selector) => document.querySelector(selector);
const modelSelect = $("#model");
const langSelect = $("#lang");
const keyInput = $("#api-key");
const topK = $("#top-k");
const drop = $("#drop");
const statusLine = $("#status");

function authHeaders() {
  const key = keyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function say(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: authHeaders() });
  if (!response.ok) {
    modelSelect.replaceChildren(new Option("(unavailable)", ""));
    say(response.status === 401 ? "This server needs an API key: enter it above." : await errorText(response), true);
    return;
  }
  const listing = await response.json();
  const previous = modelSelect.value;
  const sizes = await Promise.all(listing.models.map(modelSize));
  modelSelect.replaceChildren(
    ...listing.models.map((m, i) => new Option(`${m.id} (${m.name}, ${sizes[i]})`, m.id)),
  );
  modelSelect.value = listing.models.some((m) => m.id === previous) ? previous : listing.default;
  showLanguages(listing.languages, listing.default_language);
  say("");
  loadCustomTags();
}

// The language switch: the one chosen before on this browser, else the first of the browser's
// languages the server has labels for (de-AT counts as de), else the server's default.
function showLanguages(languages, serverDefault) {
  const codes = languages.map((l) => l.code);
  const browser = (navigator.languages || [navigator.language || ""])
    .map((l) => l.toLowerCase().split("-")[0])
    .find((l) => codes.includes(l));
  const stored = localStorage.getItem(LANG_STORAGE);
  langSelect.replaceChildren(...languages.map((l) => new Option(`${l.name} (${l.code})`, l.code)));
  langSelect.value = codes.includes(stored) ? stored : browser || serverDefault;
}

// What a model tags with: its vocabulary's tags over its classes ("522 tags (1000 classes)"), or,
// without a vocabulary, its classes, which are then its tags.
async function modelSize(model) {
  const classes = `${model.num_classes} classes`;
  const response = await fetch(`/v1/model?model=${encodeURIComponent(model.id)}`, { headers: authHeaders() });
  if (!response.ok) return classes;
  const info = await response.json();
  return info.vocabulary ? `${info.vocabulary.length} tags (${classes})` : `${model.num_classes} tags`;
}

// The `tag` /v1/explain takes: a vocabulary tag's or class's label, and the path of a tag from
// elsewhere (people/person from the face detector, custom/NAME), which a label could shadow.
function explainParam(tag) {
  const path = tag.path || [tag.label];
  return ["people", "custom"].includes(path[0]) ? path.join("/") : path[path.length - 1];
}

function addCard(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  card.querySelector(".filename").textContent = file.name;
  card.querySelector(".filename").title = file.name;
  const img = card.querySelector("img");
  img.src = URL.createObjectURL(file);
  img.dataset.photo = img.src;
  img.onerror = () => img.replaceWith(Object.assign(document.createElement("span"), {
    className: "no-preview", textContent: "no preview",
  }));
  $("#results").prepend(card);
  return card;
}

async function explainTag(card, item, file, model, tag) {
  const label = tag.label;
  const img = card.querySelector(".thumb img");
  const why = card.querySelector(".why");
  const active = item.classList.contains("explained");
  for (const other of card.querySelectorAll(".tag.explained")) {
    other.classList.remove("explained");
    other.setAttribute("aria-pressed", "false");
  }
  if (img && img.dataset.heatmap) URL.revokeObjectURL(img.dataset.heatmap);
  if (img) { img.src = img.dataset.photo; delete img.dataset.heatmap; img.classList.remove("heatmap"); }
  card.classList.remove("explaining");
  why.textContent = "";
  why.classList.remove("error");
  if (active) return;  // a second click on the same tag: back to the photo
  item.classList.add("explained");
  item.setAttribute("aria-pressed", "true");
  why.textContent = `finding where “${label}” is…`;
  const form = new FormData();
  form.append("file", file, file.name);
  const params = new URLSearchParams({ tag: explainParam(tag), model: model.id });
  if (langSelect.value) params.set("lang", langSelect.value);
  try {
    const response = await fetch(`/v1/explain?${params}`, {
      method: "POST", body: form, headers: { ...authHeaders(), Accept: "image/png" },
    });
    if (!item.classList.contains("explained")) return;  // another click came first
    if (!response.ok) {
      why.textContent = await errorText(response);
      why.classList.add("error");
      return;
    }
    const faces = response.headers.get("X-Faces");  // a people tag: faces, not a heatmap
    const url = URL.createObjectURL(await response.blob());
    if (img) {
      img.src = url;
      img.dataset.heatmap = url;
      img.dataset.tag = label;
      img.classList.add("heatmap");
      card.classList.add("explaining");
    }
    if (faces === null) why.textContent = `where the network saw “${label}”`;
    else if (faces === "0") why.textContent = `no face found: “${label}” comes from the faces the detector finds`;
    else why.textContent = `the ${faces === "1" ? "face" : `${faces} faces`} the detector found: “${label}” comes from faces, not the network`;
  } catch (error) {
    why.textContent = `network error: ${error.message}`;
    why.classList.add("error");
  }
}

function modelParams() {
  const params = new URLSearchParams();
  if (modelSelect.value) params.set("model", modelSelect.value);
  return params;
}

function percent(value) {
  return value === null || value === undefined ? "n/a" : `${Math.round(value * 100)}%`;
}

function describeTag(tag) {
  const e = tag.estimate;
  const precision = e.precision === null ? "n/a (add photos without it)" : percent(e.precision);
  const stale = tag.stale ? " — stale: the model changed, teach it again" : "";
  return `${tag.name}: ${tag.positives} with, ${tag.negatives} without; estimated precision ${precision}, recall ${percent(e.recall)}${stale}`;
}

async function loadCustomTags() {
  const response = await fetch(`/v1/custom-tags?${modelParams()}`, { headers: authHeaders() });
  if (!response.ok) return;
  const listing = await response.json();
  $("#custom-tags").replaceChildren(...listing.tags.map((tag) => {
    const item = document.createElement("li");
    item.textContent = describeTag(tag);
    item.dataset.name = tag.name;
    item.classList.toggle("stale", tag.stale);
    return item;
  }));
}

async function teachTag(event) {
  event.preventDefault();
  const name = $("#teach-name").value.trim();
  const positives = [...$("#teach-positive").files];
  const negatives = [...$("#teach-negative").files];
  const line = $("#teach-status");
  line.classList.remove("error");
  if (!positives.length && !negatives.length) {
    line.textContent = "Choose photos with the tag (and, better, some without it).";
    line.classList.add("error");
    return;
  }
  const form = new FormData();
  for (const file of positives) form.append("positive", file, file.name);
  for (const file of negatives) form.append("negative", file, file.name);
  line.textContent = `Teaching ${name}…`;
  const response = await fetch(`/v1/custom-tags/${encodeURIComponent(name)}/examples?${modelParams()}`, {
    method: "POST", body: form, headers: authHeaders(),
  });
  if (!response.ok) {
    line.textContent = await errorText(response);
    line.classList.add("error");
    return;
  }
  line.textContent = `Taught ${describeTag(await response.json())}`;
  $("#teach-positive").value = "";
  $("#teach-negative").value = "";
  loadCustomTags();
}

async function markWrong(card, item, tag) {
  const form = new FormData();
  form.append("file", card.file, card.file.name);
  form.append("tag", (tag.path || [tag.label]).join("/"));
  form.append("verdict", "wrong");
  const response = await fetch(`/v1/feedback?${modelParams()}`, { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) {
    say(await errorText(response), true);
    return;
  }
  item.remove();
  say(`Marked “${tag.label}” wrong for ${card.file.name}.`);
  loadCustomTags();
}

function showTags(card, result, model, file, language) {
  const list = card.querySelector(".tags");
  if (language) list.lang = language;  // the labels' language (CJK fonts, hyphenation)
  if (result.error) {
    card.classList.add("failed");
    card.querySelector(".state").textContent = result.error.message;
    return;
  }
  card.querySelector(".state").textContent = `${model.id} · ${model.version}`;
  list.replaceChildren(...result.tags.map((tag) => {
    const item = document.createElement("li");
    item.className = "tag";
    const percent = (tag.probability * 100).toFixed(1);
    item.innerHTML = '<span class="tag-name"><span class="tag-parents"></span><span class="tag-label"></span></span><span class="bar"><span></span></span><span class="tag-value"></span>';
    const names = tag.path_labels || tag.path || [tag.label];  // in the tags' language
    item.querySelector(".tag-parents").textContent = names.slice(0, -1).map((p) => `${p} › `).join("");
    item.querySelector(".tag-label").textContent = tag.label;
    item.querySelector(".tag-name").title = names.join(" › ");
    item.querySelector(".bar span").style.width = `${percent}%`;
    item.querySelector(".tag-value").textContent = `${percent}%`;
    item.dataset.probability = tag.probability;
    if (file) {
      item.tabIndex = 0;
      item.setAttribute("role", "button");
      item.setAttribute("aria-pressed", "false");
      item.title = `Why “${tag.label}”? Click to see where in the photo`;
      item.addEventListener("click", () => explainTag(card, item, file, model, tag));
      item.addEventListener("keydown", (event) => {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); item.click(); }
      });
    }
    const wrong = Object.assign(document.createElement("button"), {
      type: "button", className: "tag-wrong", textContent: "✗", title: "Wrong tag for this photo",
    });
    wrong.setAttribute("aria-label", `${tag.label} is wrong`);
    wrong.addEventListener("click", (event) => {
      event.stopPropagation();  // marking a tag wrong is not asking why
      markWrong(card, item, tag);
    });
    wrong.addEventListener("keydown", (event) => event.stopPropagation());
    item.append(wrong);
    return item;
  }));
  if (result.faces && file) showFaces(card, result.faces, file);
}

// PHOTOTAG_NAMES=on: each face the server found, with its name, or a field to name it
// (POST /v1/people/NAME/examples with the photo and the face's box); then the photo is tagged
// again, so the name shows among its tags.
function showFaces(card, faces, file) {
  const list = Object.assign(document.createElement("ol"), { className: "faces" });
  list.replaceChildren(...faces.map((face, i) => {
    const item = Object.assign(document.createElement("li"), { className: "face" });
    if (face.name) {
      item.textContent = `face ${i + 1}: ${face.name} (${percent(face.probability)})`;
      return item;
    }
    const form = document.createElement("form");
    const input = Object.assign(document.createElement("input"), {
      className: "face-name", placeholder: `face ${i + 1}: who is it?`, required: true,
      pattern: "[A-Za-z0-9][A-Za-z0-9_\\-]{0,47}", title: "letters, digits, - or _",
    });
    const button = Object.assign(document.createElement("button"), { type: "submit", textContent: "Name" });
    form.append(input, button);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      nameFace(card, face, file, input.value.trim());
    });
    item.append(form);
    return item;
  }));
  card.querySelector(".faces")?.remove();
  card.querySelector(".tags").after(list);
}

async function nameFace(card, face, file, name) {
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("box", [face.left, face.top, face.right, face.bottom].map((v) => v.toFixed(1)).join(","));
  const response = await fetch(`/v1/people/${encodeURIComponent(name)}/examples`, {
    method: "POST", body: form, headers: authHeaders(),
  });
  if (!response.ok) {
    say(`Could not name the face: ${await errorText(response)}`, true);
    return;
  }
  say(`Named ${name} on ${file.name}.`);
  card.remove();
  tagOne(file);
}

async function tagOne(file) {
  const card = addCard(file);
  card.file = file;
  const form = new FormData();
  form.append("file", file, file.name);
  const params = new URLSearchParams({ top_k: topK.value || "5" });
  if (modelSelect.value) params.set("model", modelSelect.value);
  if (langSelect.value) params.set("lang", langSelect.value);
  try {
    const response = await fetch(`/v1/tags?${params}`, { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      showTags(card, { error: { message: await errorText(response) } });
      return;
    }
    const body = await response.json();
    showTags(card, body.results[0], body.model, file, response.headers.get("Content-Language"));
  } catch (error) {
    showTags(card, { error: { message: `network error: ${error.message}` } });
  }
}

async function tagAll(files) {
  const queue = [...files];
  say(`Tagging ${queue.length} photo${queue.length === 1 ? "" : "s"}…`);
  const worker = async () => {
    while (queue.length) await tagOne(queue.shift());
  };
  await Promise.all(Array.from({ length: Math.min(PARALLEL, queue.length) }, worker));
  say(`Done: ${files.length} photo${files.length === 1 ? "" : "s"}.`);
}

$("#files").addEventListener("change", (event) => {
  const files = [...event.target.files];  // copied: clearing the input empties its FileList
  event.target.value = "";  // so picking the same photo again fires "change" again
  if (files.length) tagAll(files);
});
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  const files = [...event.dataTransfer.files];
  if (files.length) tagAll(files);
});
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); $("#files").click(); }
});

modelSelect.addEventListener("change", loadCustomTags);
langSelect.addEventListener("change", () => localStorage.setItem(LANG_STORAGE, langSelect.value));
$("#teach-form").addEventListener("submit", teachTag);

keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  loadModels();
});
loadModels();
