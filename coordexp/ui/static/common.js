// Shared by every page. Values from the API are always put in with textContent (never innerHTML):
// a desc such as "<img onerror=...>" shows as text.
"use strict";
const params = new URLSearchParams(location.search);
if (params.get("token")) sessionStorage.setItem("coordexp_token", params.get("token"));
const TOKEN = sessionStorage.getItem("coordexp_token") || "";
const COLORS = { match: "#19c24a", fp: "#ff3030", missed: "#ff9a1a", gt: "#4aa3ff", pred: "#ff3030" };

function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(path, opts = {}) {
  opts.headers = Object.assign({}, opts.headers || {}, TOKEN ? { Authorization: "Bearer " + TOKEN } : {});
  const r = await fetch(path, opts);
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error((body && body.detail) || r.statusText);
  return body;
}

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}

function fmt(v, nd = 4) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(nd);
  return String(v);
}
function signed(v) { return v === null || v === undefined ? "-" : (v >= 0 ? "+" : "") + v.toFixed(4); }
function when(t) { return t ? new Date(t * 1000).toISOString().slice(0, 16).replace("T", " ") : "-"; }
function verdictClass(v) { return v === "better" ? "better" : v === "worse" ? "worse" : "noise"; }

function table(head, rows, attrs = {}) {
  const t = el("table", attrs);
  t.append(el("thead", {}, el("tr", {}, ...head.map(h => el("th", {}, h)))));
  const tb = el("tbody");
  for (const r of rows) tb.append(r instanceof Node ? r : el("tr", {}, ...r.map(c => c instanceof Node ? c : el("td", {}, c))));
  t.append(tb);
  return t;
}
function td(v, cls) { return el("td", cls ? { class: cls } : {}, v); }

// Draw an image and its objects. mode "both": preds matched green, false positives red, missed GT orange;
// "gt": GT only (blue); "pred": predictions only (red). Sets data-drawn (counts per colour) for tests.
function drawImage(canvas, src, gt, pred, mode = "both", maxW = 460) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const s = Math.min(1, maxW / img.naturalWidth) * (img.naturalWidth < 256 ? 3 : 1);
      canvas.width = Math.round(img.naturalWidth * s); canvas.height = Math.round(img.naturalHeight * s);
      const g = canvas.getContext("2d");
      g.imageSmoothingEnabled = false;
      g.drawImage(img, 0, 0, canvas.width, canvas.height);
      const counts = { match: 0, fp: 0, missed: 0, gt: 0, pred: 0 };
      const box = (o, kind) => {
        counts[kind]++;
        const [x1, y1, x2, y2] = o.bbox.map(v => v * s);
        g.strokeStyle = COLORS[kind]; g.lineWidth = 2; g.strokeRect(x1, y1, x2 - x1, y2 - y1);
        g.font = "11px sans-serif"; g.fillStyle = COLORS[kind];
        g.fillText(String(o.desc), x1 + 2, Math.max(10, y1 - 3));  // fillText draws text, never markup
      };
      if (mode === "gt") gt.forEach(o => box(o, "gt"));
      else if (mode === "pred") pred.forEach(o => box(o, "pred"));
      else {
        pred.forEach(o => box(o, o.match === null || o.match === undefined ? "fp" : "match"));
        gt.forEach(o => { if (o.match === null || o.match === undefined) box(o, "missed"); });
      }
      canvas.dataset.drawn = JSON.stringify(counts);
      resolve(counts);
    };
    img.onerror = () => { canvas.dataset.drawn = "error"; resolve(null); };
    img.src = withToken(src);
  });
}

function legend() {
  return el("div", { class: "legend" },
    ...[["match", "match (TP)"], ["fp", "false positive"], ["missed", "missed GT"]].map(([k, t]) =>
      el("span", {}, el("span", { class: "sw", style: "background:" + COLORS[k] }), t)));
}

function header(active) {
  const links = [["/", "Runs"], ["/jobs", "Jobs"], ["/infer", "Inference"]];
  document.body.prepend(el("header", {}, el("b", {}, "CoordExp runs"),
    ...links.map(([h, t]) => el("a", { href: withToken(h), class: active === h ? "active" : "" }, t))));
}
// The viewer's model (/api/model) as a small table, not a JSON blob.
function modelTable(m) {
  if (!m.configured) return el("p", { class: "muted" }, "No model configured: start the viewer with --url HOST:PORT or --local CKPT.");
  const rows = [["name", m.name], ["backend", m.backend], ["where", m.where], ["checkpoint", m.checkpoint || "-"],
    ["checkpoint sha256", m.checkpoint_sha256 ? m.checkpoint_sha256.slice(0, 16) + "…" : "-"],
    ["prompt", m.prompt_variant || "-"], ["max new tokens", m.max_new_tokens + (m.served_limit ? " (served limit " + m.served_limit + ")" : "")]];
  if (m.error) rows.push(["error", m.error]);
  return table(["model", ""], rows, { id: "model-table" });
}
function showError(where, e) { where.replaceChildren(el("p", { class: "err" }, String(e.message || e))); }
