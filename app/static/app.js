// The upload page: pick or drop photos, each is sent to POST /v1/tags on its own (the server
// batches concurrent photos anyway) and shown with its tags as probability bars.
"use strict";

const KEY_STORAGE = "phototag.apiKey";
const PARALLEL = 4;

const $ = (selector) => document.querySelector(selector);
const modelSelect = $("#model");
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
  modelSelect.replaceChildren(
    ...listing.models.map((m) => new Option(`${m.id} (${m.name}, ${m.num_classes} tags)`, m.id)),
  );
  modelSelect.value = listing.models.some((m) => m.id === previous) ? previous : listing.default;
  say("");
}

function addCard(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  card.querySelector(".filename").textContent = file.name;
  card.querySelector(".filename").title = file.name;
  const img = card.querySelector("img");
  img.src = URL.createObjectURL(file);
  img.onerror = () => img.replaceWith(Object.assign(document.createElement("span"), {
    className: "no-preview", textContent: "no preview",
  }));
  $("#results").prepend(card);
  return card;
}

function showTags(card, result, model) {
  const list = card.querySelector(".tags");
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
    const parents = (tag.path || []).slice(0, -1);
    item.querySelector(".tag-parents").textContent = parents.map((p) => `${p} › `).join("");
    item.querySelector(".tag-label").textContent = tag.label;
    item.querySelector(".tag-name").title = (tag.path || [tag.label]).join(" › ");
    item.querySelector(".bar span").style.width = `${percent}%`;
    item.querySelector(".tag-value").textContent = `${percent}%`;
    item.dataset.probability = tag.probability;
    return item;
  }));
}

async function tagOne(file) {
  const card = addCard(file);
  const form = new FormData();
  form.append("file", file, file.name);
  const params = new URLSearchParams({ top_k: topK.value || "5" });
  if (modelSelect.value) params.set("model", modelSelect.value);
  try {
    const response = await fetch(`/v1/tags?${params}`, { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) {
      showTags(card, { error: { message: await errorText(response) } });
      return;
    }
    const body = await response.json();
    showTags(card, body.results[0], body.model);
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

keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
  loadModels();
});
loadModels();
