// The search page: upload an image or click a result; every call goes to this page's own server, which
// relays it to Seldon. No framework, nothing from a CDN.
"use strict";
const $ = (id) => document.getElementById(id);
let thumbnails = false;

function say(text, kind) {
  const box = $("message");
  box.textContent = text || "";
  box.className = "message" + (kind ? " " + kind : "");
}

async function status() {
  try {
    const response = await fetch("/api/status");
    const body = await response.json();
    if (!body.ready) throw new Error(body.message || "the search server is not ready");
    thumbnails = body.thumbnails;
    const bundle = body.bundle_version ? `gallery v${body.bundle_version}` : `index ${body.index_sha256}`;
    $("status").textContent = `ready: ${body.index_size} images`;
    $("status").className = "status";
    $("version").textContent = `model ${body.model_name || "?"} v${body.model_version || "?"} · ${bundle}`;
  } catch (err) {
    $("status").textContent = err.message;
    $("status").className = "status bad";
  }
}

function show(answer, title, queryUrl) {
  const result = answer.results[0];
  $("query").hidden = false;
  $("query-title").textContent = title;
  $("query-img").src = queryUrl || "";
  $("predicted").textContent = result.predicted
    ? `predicted ${result.predicted.label} (${(100 * result.predicted.probability).toFixed(1)} %)` : "";
  const grid = $("grid");
  grid.replaceChildren();
  for (const n of result.neighbours) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.id = n.id;
    card.title = `${n.path} — click for more like this`;
    const img = document.createElement("img");
    img.alt = n.path;
    if (thumbnails) img.src = "/thumb/" + n.path.split("/").map(encodeURIComponent).join("/");
    const label = document.createElement("div");
    label.className = "label";
    label.textContent = n.label || "(no label)";
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${n.rank} · score ${n.score.toFixed(4)} · id ${n.id}`;
    card.append(img, label, score);
    card.addEventListener("click", () => more(n, img.src));
    grid.append(card);
  }
  $("version").textContent = `model ${answer.model_name || "?"} v${answer.model_version || "?"} · ` +
    (answer.bundle_version ? `gallery v${answer.bundle_version}` : `index ${answer.index_sha256}`);
  say(`${result.neighbours.length} nearest images`, "");
}

async function call(url, options) {
  say("searching…", "busy");
  try {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `the page's server answered ${response.status}`);
    return body;
  } catch (err) {
    $("grid").replaceChildren();
    say(err.message === "Failed to fetch" ? "the page's server cannot be reached" : err.message, "error");
    return null;
  }
}

async function search(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value);
  form.append("labels", $("labels").value);
  const answer = await call("/api/search", {method: "POST", body: form});
  if (answer) show(answer, file.name, URL.createObjectURL(file));
}

async function more(neighbour, thumb) {
  const answer = await call("/api/more", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify({id: neighbour.id, k: Number($("k").value),
                                                                labels: $("labels").value})});
  if (answer) show(answer, `more like ${neighbour.path}`, thumb);
}

$("file").addEventListener("change", (e) => search(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); search(e.dataTransfer.files[0]); });
status();
setInterval(status, 15000);
