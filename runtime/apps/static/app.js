// The page's token, from its <meta> (the server's POSTs refuse other origins' pages). Everything from the server
// or a file (names, labels, messages) goes into the page as text (textContent, DOM nodes), never as HTML: the
// Content-Security-Policy allows this file's script and no other.
const TOKEN = document.querySelector('meta[name="breakhis-page-token"]').content;
let contract = null, trained = false;
const $ = (id) => document.getElementById(id);

// A server started with --token-file answers 401 until the page sends a token: it is asked for once and kept in
// sessionStorage (this tab only), and sent with every request as "Authorization: Bearer".
async function api(url, opts = {}) {
  const token = sessionStorage.getItem("breakhis-token");
  const headers = { ...(opts.headers || {}), ...(token ? { Authorization: `Bearer ${token}` } : {}) };
  const resp = await fetch(url, { ...opts, headers });
  if (resp.status === 401) {
    $("auth").hidden = false;
    $("auth-error").textContent = token ? "that token was refused" : "";
    throw new Error("an access token is needed");
  }
  return resp;
}

$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem("breakhis-token", $("auth-token").value.trim());
  $("auth").hidden = true;
  loadModel();
});

const loadModel = () => api("/v1/model").then(r => r.json()).then(m => {
  contract = m.contract; trained = m.trained;
  $("model").textContent = `model ${m.name} (${m.trained ? "trained research model, not a diagnostic device" :
    "UNTRAINED"}; ${m.provenance.source}) · backend ${m.backend} · preprocessing ${m.preprocess} · ` +
    `threshold ${m.contract.threshold}`;
  if (!m.trained) {
    $("warning").style.display = "block";
    $("warning").textContent = m.warning || "UNTRAINED model: verdicts are not a diagnosis.";
  }
}).catch((e) => { $("model").textContent = e.message; });
loadModel();

function show(el, on) { el.style.display = on ? "block" : "none"; }

const done = [];  // {name, size, out} of every image classified on this page

async function classifyAll(files) {
  try {
    for (const file of files) await classify(file);  // one after another: the server batches, the page stays calm
  } catch (e) { $("status").textContent = e.message; }
}

async function classify(file) {
  if ($("slide-mode").checked) return classifySlide(file);
  show($("error"), false); show($("verdict"), false); show($("qc"), false);
  $("result").hidden = true; $("slide-result").hidden = true;
  $("status").textContent = `classifying ${file.name} (${(file.size / 1024).toFixed(0)} KB) ...`;
  const body = new FormData(); body.append("file", file);
  const resp = await api("/v1/classify?views=1", { method: "POST", body, headers: { "X-Breakhis-Token": TOKEN } });
  const out = await resp.json().catch(() => ({ error: resp.statusText }));
  const entry = { name: file.name, size: file.size, out, ok: resp.ok };
  done.push(entry);
  addHistory(entry);
  await render(entry);
}

async function classifySlide(file) {
  show($("error"), false); show($("verdict"), false); $("result").hidden = true;
  $("slide-result").hidden = false; $("overlay").hidden = true; $("slide-summary").textContent = "";
  $("status").textContent = `uploading ${file.name} (${(file.size / 1024).toFixed(0)} KB) ...`;
  const body = new FormData(); body.append("file", file);
  const resp = await api("/v1/slide", { method: "POST", body, headers: { "X-Breakhis-Token": TOKEN } });
  let job = await resp.json().catch(() => ({ error: resp.statusText }));
  if (!resp.ok) { $("error").textContent = job.error || "request failed"; show($("error"), true); return; }
  const url = job.status;
  for (;;) {  // progress: fields classified so far
    job = await (await api(url)).json();
    $("slide-progress").max = Math.max(job.total, 1); $("slide-progress").value = job.done;
    $("slide-progress-text").textContent = `${file.name}: ${job.done} / ${job.total || "?"} tissue fields`;
    if (job.state !== "running") break;
    await new Promise((r) => setTimeout(r, 500));
  }
  if (job.state !== "done") { $("error").textContent = job.error; show($("error"), true); return; }  // error, cancelled
  const a = job.result.aggregate;
  const entry = { name: file.name, size: file.size, ok: a.label !== null, slide: job.result,
                  out: { label: a.label || "no verdict", probability: a.value || 0, error: a.note } };
  done.push(entry); addHistory(entry);
  renderSlide(entry);
}

function renderSlide(entry) {
  const out = entry.slide, a = out.aggregate, n = out.counts;
  show($("error"), false); $("result").hidden = true; $("slide-result").hidden = false;
  const v = $("verdict");
  v.className = a.label || ""; show(v, a.label !== null);
  if (a.label === null) { $("error").textContent = a.note; show($("error"), true); }  // no verdict, and why
  v.textContent = `${a.label}  ·  ${a.rule} = ${(a.value || 0).toFixed(4)}  ·  ` +
    (trained ? "research model, not a diagnosis" : "UNTRAINED model: NOT a diagnosis");
  $("status").textContent = `${entry.name}: ${out.size[0]} x ${out.size[1]} px, ${out.levels} level(s)`;
  $("slide-summary").textContent = `${n.fields} fields: ${n.classified} classified, ${n.background} background ` +
    `(${out.tissue_rule}), ${n.errors} errors, ${n.flagged} flagged and ${n.withheld} withheld by the quality ` +
    `check. Verdict rule: ${a.meaning}. Scale: input ` +
    `${out.scale.magnification || "?"}X (${out.scale.source}), model ${out.scale.model_magnification || "?"}X.` +
    (out.warnings.length ? ` Warning: ${out.warnings.join("; ")}` : "");
  $("overlay").src = "data:image/png;base64," + out.overlay_png; $("overlay").hidden = false;
  const stem = entry.name.replace(/\.[^.]*$/, "");
  const save = (data, type, suffix) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(new Blob([data], { type })); link.download = stem + suffix; link.click();
  };
  $("dl-geojson").onclick = () => save(JSON.stringify(out.geojson), "application/geo+json", ".geojson");
  $("dl-csv").onclick = () => save(out.csv, "text/csv", ".csv");
  $("dl-overlay").onclick = () => save(Uint8Array.from(atob(out.overlay_png), (ch) => ch.charCodeAt(0)),
                                       "image/png", ".overlay.png");
  $("dl-slide-json").onclick = () => {
    const { geojson, csv, overlay_png, ...report } = out;
    save(JSON.stringify(report, null, 2), "application/json", ".breakhis-slide.json");
  };
}

function addHistory(entry) {
  $("history-section").hidden = false;
  const row = $("history").insertRow(-1);
  row.insertCell(-1).textContent = entry.name;  // text, never HTML: file names are not trusted
  row.insertCell(-1).textContent = entry.ok ? entry.out.label + (entry.out.advice && entry.out.advice.length ?
    " (quality flag)" : "") : "error";
  row.insertCell(-1).textContent = entry.ok ? entry.out.probability.toFixed(4) : (entry.out.error || "").slice(0, 80);
  const btn = document.createElement("button");
  btn.textContent = "show"; btn.onclick = () => render(entry);
  row.insertCell(-1).appendChild(btn);
}

async function render(entry) {
  if (entry.slide) return renderSlide(entry);
  const out = entry.out;
  show($("error"), false); show($("verdict"), false); show($("qc"), false);
  $("result").hidden = true; $("slide-result").hidden = true;
  $("status").textContent = `${entry.name} (${(entry.size / 1024).toFixed(0)} KB)` +
    (out.conversions && out.conversions.length ? ` · ${out.conversions.join("; ")}` : "") +
    (out.warnings && out.warnings.length ? ` · warning: ${out.warnings.join("; ")}` : "");
  if (out.advice && out.advice.length) {  // the quality check's flags: what to do, above the verdict it marks
    $("qc").textContent = "Quality check: " + out.advice.join("; ");
    show($("qc"), true);
  }
  if (!entry.ok) { $("error").textContent = out.error || "request failed"; show($("error"), true); return; }
  const v = $("verdict");
  v.className = out.label;
  v.textContent = `${out.label}  ·  p(malignant) = ${out.probability.toFixed(4)}  ·  ` +
    (trained ? "research model, not a diagnosis" : "UNTRAINED model: NOT a diagnosis");
  show(v, true);
  await drawImage(out);
  fillRow("patches", out.views.patches); fillRow("preprocessed", out.views.preprocessed);
  $("patches-title").textContent = `Patches of field ${out.views.field + 1} (row-major)`;
  fillTable("fields", ["field", "row", "col", "x", "y", "p(malignant)", "label", "re-checked at FP32", "quality"],
    out.fields.map((f, i) => [i + 1, f.row, f.col, f.x, f.y, f.probability.toFixed(4), f.label || "withheld",
      f.fast_probability == null ? "" : `yes (fast tier: ${f.fast_probability.toFixed(4)})`,
      (f.flags || []).join(", ").replace(/_/g, " ") || "ok"]));
  fillTable("timings", null, Object.entries(out.timings_ms).map(([k, ms]) => [k, ms.toFixed(1)]));
  $("download").onclick = () => {  // the API's JSON, without the page's images
    const { views, ...report } = out;
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([JSON.stringify(report, null, 2)], { type: "application/json" }));
    a.download = entry.name.replace(/\.[^.]*$/, "") + ".breakhis.json";
    a.click();
  };
  $("result").hidden = false;
}

function fillRow(id, images) {
  $(id).replaceChildren(...images.map((src) => { const img = new Image(); img.src = src; return img; }));
}

// A table of text cells: a header row (or, with head null, each row's first cell as its header), every value as
// text.
function fillTable(id, head, rows) {
  const row = (cells, th) => {
    const tr = document.createElement("tr");
    cells.forEach((v, i) => {
      const cell = document.createElement(th || (head === null && i === 0) ? "th" : "td");
      cell.textContent = String(v);
      tr.appendChild(cell);
    });
    return tr;
  };
  $(id).replaceChildren(...(head ? [row(head, true)] : []), ...rows.map((cells) => row(cells, false)));
}

function drawImage(out) {
  // The server's rendering of exactly the pixels it classified (any format, orientation applied), so the grid
  // lies over the tissue that was scored.
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => {
      const c = $("canvas"), ctx = c.getContext("2d"), s = out.views.scale;
      c.width = img.width; c.height = img.height; ctx.drawImage(img, 0, 0);
      ctx.save(); ctx.scale(s, s);
      for (const f of out.fields) {
        // a withheld field (label null) is grey: neither verdict
        const [fill, line] = f.label === null ? ["rgba(108,117,125,0.30)", "#6c757d"] :
          f.label === "Malignant" ? ["rgba(220,53,69,0.18)", "#dc3545"] : ["rgba(25,135,84,0.18)", "#198754"];
        ctx.fillStyle = fill;
        ctx.fillRect(f.x, f.y, f.width, f.height);
        ctx.strokeStyle = "rgba(255,255,255,0.9)"; ctx.lineWidth = 1;
        const [rows, cols] = contract.grid;
        for (let r = 0; r < rows; r++) for (let k = 0; k < cols; k++)
          ctx.strokeRect(f.x + k * contract.stride, f.y + r * contract.stride, contract.patch, contract.patch);
        ctx.strokeStyle = line; ctx.lineWidth = 3;
        ctx.strokeRect(f.x, f.y, f.width, f.height);
        ctx.font = "bold 20px system-ui"; ctx.fillStyle = "#fff";
        ctx.fillText(f.probability.toFixed(3) + (f.label === null ? " withheld" : ""), f.x + 8, f.y + 26);
      }
      ctx.restore();
      resolve();
    };
    img.src = out.views.image;
  });
}

$("file").addEventListener("change", (e) => {
  const files = [...e.target.files];
  e.target.value = "";  // the next choice starts afresh (and the same file can be chosen again)
  classifyAll(files);
});
$("print").addEventListener("click", () => window.print());
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  classifyAll([...e.dataTransfer.files]);
});
