// UniME-V2 search page: vanilla JS, no dependencies. Talks to /v1/info and /v1/search on this origin.
"use strict";

const KEY = "unime-api-key";
const $ = (id) => document.getElementById(id);
let info = null;          // /v1/info, once loaded
let image = null;         // query image as a data: URL
let retry = null;         // what to run again once a new key is entered

class AuthError extends Error {}

function show(el, on) { el.hidden = !on; }

function setError(msg) { $("error").textContent = msg || ""; show($("error"), !!msg); }

function askKey(msg) {
  $("key-message").textContent = msg;
  show($("key-form"), true);
  show($("change-key"), false);
  $("api-key").value = "";
  $("api-key").focus();
}

async function api(path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, {method: body === undefined ? "GET" : "POST", headers,
                                  body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON */ }
  if (resp.status === 401) {
    askKey("API key missing or wrong. Enter the server's API key.");
    throw new AuthError("API key missing or wrong");
  }
  if (!resp.ok) {
    const detail = data && data.detail ? data.detail : resp.statusText;
    throw new Error(`Error ${resp.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return data;
}

async function loadInfo() {
  try {
    info = await api("v1/info");
  } catch (e) {
    $("server-info").textContent = e instanceof AuthError ? "API key needed" : String(e.message || e);
    return false;
  }
  const name = (m) => String(m || "?").replace(/\/+$/, "").split("/").pop();
  const parts = [`embedder ${name(info.embedder.model)}`];
  if (info.index && info.index.count !== undefined) parts.push(`${info.index.count} candidates`);
  parts.push(info.reranker ? `reranker ${name(info.reranker.model)}` : "no reranker");
  $("server-info").textContent = parts.join(" · ");
  show($("rerank-label"), !!info.reranker);
  $("rerank").disabled = !info.reranker;
  if (!info.reranker) $("rerank").checked = false;
  if (info.limits && info.limits.max_top_k) $("top-k").max = info.limits.max_top_k;
  show($("change-key"), !!info.auth);
  return true;
}

// ---- query image: drop zone and file picker
function mimeOf(b64) {
  const sig = {"iVBOR": "image/png", "/9j/": "image/jpeg", "R0lG": "image/gif", "UklG": "image/webp", "Qk": "image/bmp"};
  for (const [p, m] of Object.entries(sig)) if (b64.startsWith(p)) return m;
  return "image/png";
}

function setImage(file) {
  setError("");
  if (!file) return;
  if (!file.type.startsWith("image/")) { setError(`${file.name} is not an image`); return; }
  const limit = info && info.limits && info.limits.max_image_bytes;
  if (limit && file.size > limit) { setError(`${file.name} is ${file.size} bytes; the limit is ${limit}`); return; }
  const reader = new FileReader();
  reader.onload = () => {
    image = reader.result;
    $("drop-preview").src = image;
    show($("drop-preview"), true);
    show($("clear-image"), true);
    $("drop-hint").textContent = file.name;
  };
  reader.readAsDataURL(file);
}

function clearImage() {
  image = null;
  $("q-image").value = "";
  show($("drop-preview"), false);
  show($("clear-image"), false);
  $("drop-hint").innerHTML = "Drop an image here, or <u>choose a file</u>";
}

// ---- search and results
function card(hit, reranked) {
  const li = document.createElement("li");
  li.className = "card";
  if (hit.image || hit.has_image) {
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    if (hit.image) {
      const img = document.createElement("img");
      img.src = `data:${mimeOf(hit.image)};base64,${hit.image}`;
      img.alt = `image of ${hit.id}`;
      thumb.append(img);
    } else {
      thumb.classList.add("none");
      thumb.textContent = "image not available";
    }
    li.append(thumb);
  }
  const body = document.createElement("div");
  body.className = "body";
  const head = document.createElement("p");
  head.className = "id";
  head.textContent = `#${hit.rank} · ${hit.id}` + (hit.task ? ` · ${hit.task}` : "");
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = hit.text || "";
  const scores = document.createElement("p");
  scores.className = "scores";
  const s = document.createElement("span");
  s.className = "score";
  s.textContent = `embedder ${hit.score.toFixed(4)}`;
  scores.append(s);
  if (reranked) {
    const r = document.createElement("span");
    r.className = "rerank-score";
    r.textContent = hit.rerank_score == null ? "reranker n/a"
      : `reranker ${hit.rerank_score.toFixed(4)}` + (hit.embed_rank !== hit.rank ? ` (was #${hit.embed_rank})` : "");
    scores.append(r);
  }
  body.append(head, text, scores);
  li.append(body);
  return li;
}

async function search() {
  setError("");
  const text = $("q-text").value.trim();
  if (!text && !image) { setError("Enter a query text and/or choose an image."); return; }
  const query = {text: text || null, image: image};
  const instruction = $("q-instruction").value.trim();
  if (instruction) query.instruction = instruction;
  const req = {query, top_k: Number($("top-k").value) || 10, rerank: $("rerank").checked && !$("rerank").disabled,
               include_image: true};
  $("search-btn").disabled = true;
  $("status").textContent = "Searching…";
  const t0 = performance.now();
  try {
    const res = await api("v1/search", req);
    const rt = performance.now() - t0;
    const t = res.timings_ms || {};
    const steps = ["embed", "search", "rerank"].filter((k) => k in t).map((k) => `${k} ${t[k].toFixed(0)}`);
    $("status").textContent = `${res.results.length} results${res.reranked ? ", reranked" : ""} · server ` +
      `${(t.total || 0).toFixed(0)} ms (${steps.join(", ")}) · round trip ${rt.toFixed(0)} ms`;
    $("results").replaceChildren(...res.results.map((h) => card(h, res.reranked)));
  } catch (e) {
    $("status").textContent = "";
    if (e instanceof AuthError) retry = search;
    else setError(String(e.message || e));
  } finally {
    $("search-btn").disabled = false;
  }
}

function init() {
  const drop = $("drop"), file = $("q-image");
  drop.addEventListener("click", (e) => { if (e.target.id !== "clear-image") file.click(); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); setImage(e.dataTransfer.files[0]); });
  file.addEventListener("change", () => setImage(file.files[0]));
  $("clear-image").addEventListener("click", clearImage);
  $("q-text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) search(); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); search(); });
  $("change-key").addEventListener("click", () => askKey("Enter the server's API key."));
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("api-key").value.trim());
    show($("key-form"), false);
    setError("");
    if (await loadInfo() && retry) { const again = retry; retry = null; again(); }
  });
  loadInfo();
}

init();
