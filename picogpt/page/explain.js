// picogpt explain: draws the views of one forward pass from the JSON in #picogpt-data.
// Every piece of text from the data goes into the page as text (textContent, canvas fillText, attribute
// values), never as markup, so a prompt that holds HTML or a script shows as the text it is.
"use strict";

const data = JSON.parse(document.getElementById("picogpt-data").textContent);
const nLayer = data.model.n_layer, nHead = data.model.n_head, nSeq = data.ids.length;
// The logits are float32 numbers written in their shortest decimal form: back to exactly those float32s.
data.next_logits = data.next_logits.map(Math.fround);
if (data.ablated_logits) data.ablated_logits = data.ablated_logits.map(Math.fround);

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function percent(p) {
  if (p === 0) return "0%";
  if (p < 0.0001) return p.toExponential(1).replace("e", "×10^");
  return (100 * p).toFixed(p < 0.001 ? 3 : p < 0.1 ? 2 : 1) + "%";
}

function label(id) {
  const known = data.vocab[String(id)];
  return known === undefined ? "#" + id : known;
}

function tokenSpan(id, big) {
  return el("span", { className: "token" + (big ? " big" : ""), text: label(id), title: "token " + id });
}

function bar(p, width) {
  const b = el("span", { className: "bar" });
  b.style.width = Math.max(1, Math.round(p * width)) + "px";
  return b;
}

// -- the header, the footer, and where the math lives ---------------------------------------------------

function drawHeader() {
  document.getElementById("prompt").textContent = data.prompt;
  document.title = "picogpt explain: " + data.prompt;
  const m = data.model;
  const rows = [
    ["model", m.name + (m.file ? " (" + m.file + ")" : "")],
    ["shape", `${m.n_layer} layers, ${m.n_head} heads, width ${m.n_embd}, context ${m.n_ctx}, vocabulary ${m.n_vocab}`],
    ["parameters", m.n_params.toLocaleString("en-US") + (m.weights === "bf16" ? " (matrices stored as bfloat16)" : " (float32)")],
    ["prompt", `${nSeq} token${nSeq === 1 ? "" : "s"}`],
  ];
  const about = document.getElementById("about");
  for (const [term, value] of rows) about.append(el("dt", { text: term }), el("dd", { text: value }));
  const made = document.getElementById("made");
  made.append("Made by picogpt " + data.picogpt + (data.command ? " with " : "."));
  if (data.command) made.append(el("code", { text: data.command }));
}

function drawMath() {
  for (const box of document.querySelectorAll(".math")) {
    box.append(el("div", { className: "where", text: "Where the math lives:" }));
    for (const ref of data.sources[box.dataset.view]) {
      box.append(el("div", {},
        el("code", { text: ref.function }), " in ", el("code", { text: `${ref.file}:${ref.line}` }), ": ",
        ref.equation, el("br"), el("code", { text: ref.code })));
    }
  }
}

// -- 1. tokens ---------------------------------------------------------------------------------------

let query = nSeq - 1;  // the token whose attention is shown in the focus panel

function drawTokens() {
  const box = document.getElementById("tokens");
  data.tokens.forEach((text, i) => {
    const button = el("button", { type: "button", "data-position": String(i), title: `position ${i}, token ${data.ids[i]}` },
      el("span", { text }), el("span", { className: "id", text: String(data.ids[i]) }));
    button.addEventListener("click", () => { query = i; drawAttention(); });
    box.append(button);
  });
}

// -- 2. attention ------------------------------------------------------------------------------------

const layerSelect = document.getElementById("layer"), headSelect = document.getElementById("head");

function weights(layer, head, q) {  // [q + 1] weights of query q over keys 0..q; head "all" = the mean
  if (head !== "all") return data.attention[layer][head][q];
  const mean = new Array(q + 1).fill(0);
  for (let h = 0; h < nHead; h++) data.attention[layer][h][q].forEach((w, k) => { mean[k] += w / nHead; });
  return mean;
}

function selected() {
  return [Number(layerSelect.value), headSelect.value === "all" ? "all" : Number(headSelect.value)];
}

function color(w) {  // white to the accent blue
  const t = Math.sqrt(Math.min(1, Math.max(0, w)));
  return `rgb(${Math.round(255 - 229 * t)},${Math.round(255 - 169 * t)},${Math.round(255 - 79 * t)})`;
}

const grid = { cell: 0, left: 0, top: 0 };

function drawAttention() {
  const [layer, head] = selected();
  const canvas = document.getElementById("attention-grid");
  const ctx = canvas.getContext("2d");
  const font = "12px ui-monospace, Menlo, Consolas, monospace";
  ctx.font = font;
  const labelWidth = Math.ceil(Math.max(...data.tokens.map(t => ctx.measureText(t).width))) + 10;
  grid.cell = Math.max(8, Math.min(36, Math.floor(560 / nSeq)));
  grid.left = labelWidth + 22;
  grid.top = labelWidth + 22;
  const ratio = window.devicePixelRatio || 1;
  const axisWidth = 150;  // room for the axis titles along a short prompt's grid
  const width = grid.left + Math.max(nSeq * grid.cell, axisWidth) + 4;
  const height = grid.top + Math.max(nSeq * grid.cell, axisWidth) + 4;
  canvas.width = width * ratio; canvas.height = height * ratio;
  canvas.style.width = width + "px"; canvas.style.height = height + "px";
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  for (let q = 0; q < nSeq; q++) {
    const row = weights(layer, head, q);
    for (let k = 0; k < nSeq; k++) {
      ctx.fillStyle = k <= q ? color(row[k]) : "#f1f3f4";
      ctx.fillRect(grid.left + k * grid.cell, grid.top + q * grid.cell, grid.cell - 1, grid.cell - 1);
    }
  }
  ctx.strokeStyle = "#1a56b0"; ctx.lineWidth = 2;  // the focused query's row
  ctx.strokeRect(grid.left - 1, grid.top + query * grid.cell - 1, nSeq * grid.cell + 1, grid.cell + 1);
  ctx.font = font; ctx.fillStyle = "#1d1d1f"; ctx.textBaseline = "middle";
  const size = Math.min(12, grid.cell);
  ctx.font = `${size}px ui-monospace, Menlo, Consolas, monospace`;
  data.tokens.forEach((t, i) => {
    ctx.textAlign = "right";
    ctx.fillText(t, grid.left - 4, grid.top + (i + 0.5) * grid.cell);
    ctx.save();
    ctx.translate(grid.left + (i + 0.5) * grid.cell, grid.top - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(t, 0, 0);
    ctx.restore();
  });
  ctx.font = "bold 12px system-ui, sans-serif"; ctx.fillStyle = "#5f6368";
  ctx.textAlign = "left"; ctx.fillText("key (attends to) →", grid.left, 10);
  ctx.save(); ctx.translate(10, grid.top); ctx.rotate(Math.PI / 2);
  ctx.fillText("query (this token) →", 0, 0); ctx.restore();
  drawFocus(layer, head);
  for (const b of document.querySelectorAll("#tokens button")) b.classList.toggle("selected", Number(b.dataset.position) === query);
  for (const c of document.querySelectorAll("#overview canvas")) {
    c.classList.toggle("selected", Number(c.dataset.layer) === layer && (head === "all" || Number(c.dataset.head) === head));
  }
}

function drawFocus(layer, head) {
  const box = document.getElementById("focus");
  const row = weights(layer, head, query);
  const order = row.map((w, k) => [w, k]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).slice(0, 8);
  const table = el("table");
  for (const [w, k] of order) {
    table.append(el("tr", {}, el("td", {}, el("span", { className: "token", text: data.tokens[k] })),
      el("td", { className: "mono", text: `pos ${k}` }), el("td", { text: percent(w) }), el("td", {}, bar(w, 120))));
  }
  const headName = head === "all" ? "all heads (mean)" : `head ${head}`;
  box.replaceChildren(el("div", {}, "Query ", el("span", { className: "token", text: data.tokens[query] }),
    ` (position ${query}) in layer ${layer}, ${headName}, attends to:`), table);
}

function attentionHover(event) {
  const canvas = event.currentTarget, rect = canvas.getBoundingClientRect();
  const k = Math.floor((event.clientX - rect.left - grid.left) / grid.cell);
  const q = Math.floor((event.clientY - rect.top - grid.top) / grid.cell);
  const hover = document.getElementById("hover");
  if (q < 0 || q >= nSeq || k < 0 || k >= nSeq) { hover.textContent = ""; return null; }
  const [layer, head] = selected();
  hover.textContent = k <= q
    ? `query ${q} “${data.tokens[q]}” → key ${k} “${data.tokens[k]}”: ${percent(weights(layer, head, q)[k])}`
    : `query ${q} “${data.tokens[q]}” cannot see key ${k}, a later token (causal mask)`;
  return q;
}

function drawOverview() {
  const box = document.getElementById("overview");
  box.style.gridTemplateColumns = `auto repeat(${nHead}, auto)`;
  const px = Math.max(1, Math.min(16, Math.floor(64 / nSeq)));  // about 64 pixels a head
  box.append(el("span"));
  for (let h = 0; h < nHead; h++) box.append(el("span", { className: "label", text: `head ${h}` }));
  for (let layer = 0; layer < nLayer; layer++) {
    box.append(el("span", { className: "label", text: `layer ${layer}` }));
    for (let h = 0; h < nHead; h++) {
      const c = el("canvas", { "data-layer": String(layer), "data-head": String(h), title: `layer ${layer}, head ${h}` });
      c.width = c.height = nSeq * px;
      const ctx = c.getContext("2d");
      for (let q = 0; q < nSeq; q++) {
        const row = data.attention[layer][h][q];
        for (let k = 0; k <= q; k++) { ctx.fillStyle = color(row[k]); ctx.fillRect(k * px, q * px, px, px); }
      }
      c.addEventListener("click", () => { layerSelect.value = String(layer); headSelect.value = String(h); drawAttention(); });
      box.append(c);
    }
  }
}

function setUpAttention() {
  for (let layer = 0; layer < nLayer; layer++) layerSelect.append(el("option", { value: String(layer), text: String(layer) }));
  headSelect.append(el("option", { value: "all", text: "all heads (mean)" }));
  for (let h = 0; h < nHead; h++) headSelect.append(el("option", { value: String(h), text: String(h) }));
  headSelect.value = "0";
  layerSelect.addEventListener("change", drawAttention);
  headSelect.addEventListener("change", drawAttention);
  const canvas = document.getElementById("attention-grid");
  canvas.addEventListener("mousemove", attentionHover);
  canvas.addEventListener("click", event => { const q = attentionHover(event); if (q !== null) { query = q; drawAttention(); } });
  drawOverview();
  drawAttention();
}

// -- 3. logit lens -------------------------------------------------------------------------------------

function drawLens() {
  const table = document.getElementById("lens");
  const head = el("tr", {}, el("th", { text: "after ↓ / position →" }));
  data.tokens.forEach((t, i) => head.append(el("th", { title: `position ${i}` }, el("span", { className: "token", text: t }))));
  table.append(head);
  const detail = document.getElementById("lens-detail");
  for (let row = 0; row <= nLayer; row++) {
    const name = row === 0 ? "the embedding" : row === nLayer ? `block ${row - 1} (the output)` : `block ${row - 1}`;
    const tr = el("tr", { className: row === nLayer ? "output" : "" }, el("th", { text: name }));
    for (let pos = 0; pos < nSeq; pos++) {
      const ids = data.lens.ids[row][pos], probs = data.lens.probs[row][pos];
      const top5 = ids.map((id, j) => `${label(id)}  ${percent(probs[j])}`).join("\n");
      const td = el("td", { title: top5, "data-row": String(row), "data-position": String(pos) },
        `${label(ids[0])} ${percent(probs[0])}`);
      td.style.background = color(probs[0]);
      td.addEventListener("click", () => {
        for (const c of table.querySelectorAll("td.selected")) c.classList.remove("selected");
        td.classList.add("selected");
        const list = el("table");
        ids.forEach((id, j) => list.append(el("tr", {}, el("td", {}, tokenSpan(id)), el("td", { text: percent(probs[j]) }),
          el("td", {}, bar(probs[j], 120)))));
        detail.replaceChildren(el("div", {}, `After ${name}, at position ${pos} (`, el("span", { className: "token", text: data.tokens[pos] }),
          "), the top 5 next tokens:"), list);
      });
      tr.append(td);
    }
    table.append(tr);
  }
}

// -- 4. the next token: picogpt.generate's filters, step for step ----------------------------------------
// apply_repetition_penalty, then choose_next (logits / temperature, top_k_filter, top_p_filter, softmax64).
// The logits are float32 and so is picogpt's arithmetic on them until the softmax: Math.fround rounds each
// result as float32 arithmetic would, so the surviving set and the probabilities are picogpt's (NumPy sums
// the softmax's terms pairwise, this loop in order: the last bits can differ, about 1e-16 relative).

function softmax64(logits) {
  let max = -Infinity;
  for (const x of logits) if (x > max) max = x;
  const exps = logits.map(x => Math.exp(x - max));
  let sum = 0;
  for (const e of exps) sum += e;
  return exps.map(e => e / sum);
}

function nextDistribution(rawLogits, settings) {
  const { temperature, topK, topP, penalty } = settings;
  const logits = Float64Array.from(rawLogits);
  const n = logits.length;
  if (penalty !== 1) {
    const p = Math.fround(penalty);
    for (const id of new Set(data.ids)) logits[id] = logits[id] > 0 ? Math.fround(logits[id] / p) : Math.fround(logits[id] * p);
  }
  if (temperature === 0) {  // greedy: the most likely token, ties to the lowest id
    let best = 0;
    for (let i = 1; i < n; i++) if (logits[i] > logits[best]) best = i;
    const probs = new Float64Array(n); probs[best] = 1;
    return probs;
  }
  const t = Math.fround(temperature);
  for (let i = 0; i < n; i++) logits[i] = Math.fround(logits[i] / t);
  if (topK !== null && topK < n) {
    const kth = Float64Array.from(logits).sort().reverse()[topK - 1];
    for (let i = 0; i < n; i++) if (!(logits[i] >= kth)) logits[i] = -Infinity;
  }
  if (topP !== null && topP < 1) {
    const order = Array.from(logits.keys()).sort((a, b) => (logits[b] - logits[a]) || (a - b));
    const sortedProbs = softmax64(order.map(i => logits[i]));
    let cumulative = 0;
    const keep = new Uint8Array(n);
    order.forEach((id, j) => { cumulative += sortedProbs[j]; keep[id] = cumulative - sortedProbs[j] < topP ? 1 : 0; });
    for (let i = 0; i < n; i++) if (!keep[i]) logits[i] = -Infinity;
  }
  return Float64Array.from(softmax64(Array.from(logits)));
}

function readSettings() {
  const number = (id, fallback) => {
    const text = document.getElementById(id).value.trim();
    const value = Number(text);
    return text === "" || !Number.isFinite(value) ? fallback : value;
  };
  const topK = number("top-k", null);
  return {
    temperature: Math.max(0, number("temperature", 1)),
    topK: topK === null || topK < 1 ? null : Math.floor(topK),
    topP: Math.min(1, Math.max(0.0001, number("top-p", 1))),
    penalty: Math.max(0.0001, number("penalty", 1)),
  };
}

const modelProbs = softmax64(data.next_logits);
const modelOrder = Array.from(modelProbs.keys()).sort((a, b) => modelProbs[b] - modelProbs[a] || a - b);

function drawNext() {
  const settings = readSettings();
  const probs = nextDistribution(data.next_logits, settings);
  let survivors = 0;
  for (const p of probs) if (p > 0) survivors++;
  const summary = document.getElementById("next-summary");
  const ignored = settings.temperature === 0 && (settings.topK !== null || settings.topP < 1)
    ? " (temperature 0 is greedy: top-k and top-p choose nothing, and picogpt refuses them with it)" : "";
  summary.textContent = `${survivors.toLocaleString("en-US")} of ${probs.length.toLocaleString("en-US")} tokens can be drawn${ignored}`;
  const shown = Array.from(probs.keys()).filter(i => probs[i] > 0).sort((a, b) => probs[b] - probs[a] || a - b).slice(0, 20);
  for (const id of modelOrder.slice(0, 20)) if (!shown.includes(id) && shown.length < 30) shown.push(id);
  const table = document.getElementById("next-table");
  table.replaceChildren(el("tr", {}, el("th", { text: "token" }), el("th", { text: "id" }),
    el("th", { text: "model (T=1)" }), el("th", { text: "with these settings" }), el("th")));
  for (const id of shown) {
    table.append(el("tr", { className: probs[id] > 0 ? "" : "out", "data-id": String(id), "data-p": String(probs[id]) },
      el("td", {}, tokenSpan(id)), el("td", { className: "mono", text: String(id) }), el("td", { text: percent(modelProbs[id]) }),
      el("td", { text: probs[id] > 0 ? percent(probs[id]) : "filtered out" }), el("td", {}, bar(probs[id], 160))));
  }
}

function setUpNext() {
  document.getElementById("n-vocab").textContent = data.next_logits.length.toLocaleString("en-US");
  document.getElementById("greedy").replaceChildren(label(modelOrder[0]));
  for (const id of ["temperature", "top-k", "top-p", "penalty"]) document.getElementById(id).addEventListener("input", drawNext);
  drawNext();
}

// -- 5. ablation ----------------------------------------------------------------------------------------

function drawAblation() {
  const box = document.getElementById("ablation");
  if (!data.ablated.length) {
    box.append(el("p", {}, "To see what a head does, write the page again with it switched off: ",
      el("code", { text: "picogpt explain \"…\" --ablate LAYER.HEAD[,LAYER.HEAD…]" }),
      ". This section then shows the next token with and without it."));
    return;
  }
  const heads = data.ablated.map(([l, h]) => `${l}.${h}`).join(", ");
  const ablatedProbs = softmax64(data.ablated_logits);
  const order = Array.from(ablatedProbs.keys()).sort((a, b) => ablatedProbs[b] - ablatedProbs[a] || a - b);
  box.append(el("p", {}, `The next token with every head, and with the output of head${data.ablated.length > 1 ? "s" : ""} `,
    el("code", { text: heads }), " (layer.head) set to zero, as Hugging Face's head_mask does. Greedy decoding takes ",
    tokenSpan(modelOrder[0]), " with every head and ", tokenSpan(order[0]), " without."));
  const ids = [];
  for (const id of modelOrder.slice(0, 10).concat(order.slice(0, 10))) if (!ids.includes(id)) ids.push(id);
  ids.sort((a, b) => Math.max(modelProbs[b], ablatedProbs[b]) - Math.max(modelProbs[a], ablatedProbs[a]) || a - b);
  const table = el("table", { className: "comparison", id: "ablation-table" },
    el("tr", {}, el("th", { text: "token" }), el("th", { text: "every head" }), el("th", { text: "without " + heads }), el("th", { text: "change" })));
  for (const id of ids) {
    const change = ablatedProbs[id] - modelProbs[id];
    table.append(el("tr", { "data-id": String(id) }, el("td", {}, tokenSpan(id)), el("td", { text: percent(modelProbs[id]) }),
      el("td", { text: percent(ablatedProbs[id]) }), el("td", { text: (change >= 0 ? "+" : "−") + percent(Math.abs(change)) })));
  }
  box.append(table);
}

drawHeader();
drawTokens();
setUpAttention();
drawLens();
setUpNext();
drawAblation();
drawMath();
window.picogpt = { data, nextDistribution, readSettings };  // for notebooks' browsers and the tests
