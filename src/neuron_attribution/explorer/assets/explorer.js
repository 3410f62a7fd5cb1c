"use strict";
// The explorer's pages, built from the JSON API with DOM calls. Every text from the model, a prompt or a run goes
// in through text nodes (el() below), never as markup; links are built from fixed paths and encoded parameters.

const explorer = window.explorer = {};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}
function fmt(x, digits = 4) { return typeof x === "number" ? x.toFixed(digits) : "–"; }
function quoted(text) { return JSON.stringify(text); }
function num(x, digits) { return el("td", {class: "num"}, fmt(x, digits)); }
function neuronLink(name) { return el("a", {href: "/neuron/" + encodeURIComponent(name)}, name); }
function promptLink(prompt, target, text) {
  const query = new URLSearchParams({prompt: prompt});
  if (target) query.set("target", target);
  return el("a", {href: "/?" + query.toString()}, text || prompt);
}
function table(headers, rows, id) {
  return el("table", {id: id},
    el("thead", {}, el("tr", {}, headers.map(h => el("th", {class: h.startsWith("#") ? "num" : null}, h.replace(/^#/, ""))))),
    el("tbody", {}, rows));
}
function tokenList(tokens) { return el("span", {class: "tok"}, (tokens || []).map(quoted).join(" ")); }

// -- talking to the server --------------------------------------------------------------------------------------

let inFlight = 0;
async function api(path, body) {
  inFlight += 1; watchQueue();
  try {
    const response = await fetch(path, body === undefined ? {} :
      {method: "POST", headers: {"content-type": "application/json"}, body: JSON.stringify(body)});
    let data;
    try { data = await response.json(); } catch (e) { data = {error: "the server sent no JSON (" + response.status + ")"}; }
    if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
    return data;
  } finally { inFlight -= 1; }
}
let watching = false;
async function watchQueue() {
  // While this page waits for the model, say how many requests are ahead: the server answers this at once.
  if (watching) return;
  watching = true;
  const shown = document.getElementById("queue");
  try {
    while (inFlight > 0) {
      await new Promise(r => setTimeout(r, 300));
      if (inFlight === 0) break;
      try {
        const q = await (await fetch("/api/queue")).json();
        shown.textContent = q.pending > 1 ? "model busy: " + (q.pending - 1) + " other request(s) queued · " + (q.running || "")
                                          : q.pending === 1 ? "model: " + (q.running || "working") : "";
        shown.dataset.pending = q.pending;
      } catch (e) { shown.textContent = "server not answering"; }
    }
  } finally { watching = false; shown.textContent = ""; }
}
function fail(where, error) {
  where.replaceChildren(el("span", {class: "error"}, "Error: " + error.message));
}

// -- the prompt view ----------------------------------------------------------------------------------------------

async function promptView(params) {
  const view = document.getElementById("view");
  const field = (id, value) => el("input", {id: id, value: value || "", size: 28});
  const form = el("form", {class: "prompt", id: "prompt-form"},
    el("label", {for: "prompt"}, "Prompt"), el("textarea", {id: "prompt"}),
    el("label", {for: "target"}, "Answer"), field("target", params.get("target")),
    el("label", {for: "contrast"}, "rather than"), field("contrast", params.get("contrast")),
    el("label", {for: "answer-tokens"}, "Answer tokens"),
    el("select", {id: "answer-tokens"}, el("option", {value: "first"}, "first (the paper's)"),
       el("option", {value: "all"}, "all (teacher forcing)")),
    el("label", {for: "query-via"}, "Query neurons via"),
    el("select", {id: "query-via"}, el("option", {value: ""}, "the server's choice"),
       el("option", {value: "attention"}, "attention value neurons (the paper's)"),
       el("option", {value: "ffn"}, "FFN value neurons"), el("option", {value: "both"}, "both")),
    el("label", {for: "top"}, "Neurons"), el("input", {id: "top", type: "number", min: 1, max: 1000, value: params.get("top") || 100}),
    el("div", {class: "buttons"}, el("button", {id: "go", type: "submit"}, "Attribute"),
       el("span", {class: "muted"}, "  answer empty: the model's top prediction")));
  form.querySelector("#prompt").value = params.get("prompt") || "The capital of France is";
  if (params.get("answer_tokens")) form.querySelector("#answer-tokens").value = params.get("answer_tokens");
  if (params.get("query_via")) form.querySelector("#query-via").value = params.get("query_via");
  const status = el("div", {class: "status", id: "status"});
  const results = el("div", {id: "results"});
  view.replaceChildren(form, status, results);
  form.addEventListener("submit", event => { event.preventDefault(); submit(); });
  async function submit() {
    const query = currentQuery();
    const shown = new URLSearchParams({prompt: query.prompt});
    for (const key of ["target", "contrast"]) if (query[key]) shown.set(key, query[key]);
    if (query.answer_tokens !== "first") shown.set("answer_tokens", query.answer_tokens);
    if (query.query_via) shown.set("query_via", query.query_via);
    history.replaceState(null, "", "/?" + shown.toString());
    status.replaceChildren(el("span", {class: "waiting"}, "Attributing…"));
    const started = performance.now();
    try {
      const data = await api("/api/attribute", query);
      status.textContent = "Attributed in " + ((performance.now() - started) / 1000).toFixed(2) + " s (model work " +
                           data.seconds.toFixed(2) + " s)";
      status.dataset.done = "1";
      renderPrompt(results, data, query);
    } catch (error) { fail(status, error); }
  }
  if (params.get("prompt")) submit();
}

function currentQuery() {
  const value = id => document.getElementById(id).value;
  return {prompt: value("prompt"), target: value("target") || null, contrast: value("contrast") || null,
          answer_tokens: value("answer-tokens"), top: Math.max(1, Math.floor(Number(value("top")) || 100)),
          query_via: value("query-via") || null};
}

// What the page scored when it is not exactly what was typed: a leading space added (the word as the model
// writes it after the prompt), or an answer of several tokens of which only the first is scored.
function answerNote(target, query) {
  const typed = query.target || "";
  const notes = [];
  if (typed && !/^\s/.test(typed) && /^\s/.test(target.answer || target.text))
    notes.push("a leading space was added to " + quoted(typed) + " (the word as the model writes it after the prompt)");
  if (target.answer && !target.tokens)
    notes.push("the answer " + quoted(target.answer) + " is " + target.n_answer_tokens + " tokens and only the first, " +
               quoted(target.text) + ", is scored; “Answer tokens: all” scores every one");
  if (target.tokens)
    notes.push("every answer token is scored where it is predicted; scores are their sums, coefficients one per token");
  return notes.length ? el("div", {class: "warning", id: "answer-note"}, "Note: " + notes.join("; ")) : null;
}

function renderPrompt(results, data, query) {
  explorer.data = data;
  const target = data.target;
  const summary = el("div", {class: "summary", id: "summary"},
    el("div", {class: "tokens"}, data.tokens.map((t, i) => el("span", {title: "position " + i}, t))),
    answerNote(target, query),
    el("div", {}, target.answer ? ["Answer ", el("b", {class: "tok"}, quoted(target.answer)), ", first token "] : "Answer ",
       el("b", {class: "tok"}, quoted(target.text)), " (id " + target.id + "): p = ",
       el("b", {id: "target-prob"}, fmt(target.prob, 6)), ", rank " + target.rank,
       target.contrast ? " · rather than " + quoted(target.contrast.text) + " (p = " + fmt(target.contrast.prob, 6) + ")" : "",
       " · scores: " + data.graph.measure + " · query neurons via " + data.query_via + " value neurons"),
    el("div", {id: "predictions"}, "Top predictions: ",
       data.predictions.map(p => el("span", {class: "tok"}, quoted(p.token) + " " + fmt(p.prob, 3) + "  "))));
  const side = el("div", {id: "side"}, el("p", {class: "muted"}, "Click a node for its numbers; select neurons to switch them off or amplify them."));
  const graphBox = el("div", {class: "graph-box"},
    el("div", {class: "graph-bar"}, "show ",
       el("select", {id: "mode"}, el("option", {value: "top"}, "the top"), el("option", {value: "share"}, "a share of")),
       " ", el("input", {id: "amount", type: "number", min: 1, step: 1, value: 20, size: 5}), " ",
       el("span", {id: "unit"}, "value neurons by |score|"), " · ",
       el("label", {title: "neurons that read the first token, the attention sink"},
          el("input", {id: "sinks", type: "checkbox"}), " show sinks ⚓"), " · ",
       el("span", {id: "graph-status"}, "drawing…"),
       el("span", {class: "muted"}, "  · green raises the answer, red lowers it; purple: query neurons")),
    el("div", {id: "graph"}));
  const selection = el("div", {class: "selection", id: "selection"});
  results.replaceChildren(summary, el("div", {class: "workspace"}, graphBox, side), selection,
    circuitSection(data, side),
    el("h2", {}, "Layers"), layerBars(data.layers, "layers"),
    el("div", {class: "grid"},
      el("div", {}, el("h2", {}, "Top heads"), headsTable(data.heads)),
      el("div", {}, el("h2", {}, "Top FFN value neurons"), neuronTable(data.ffn_neurons, "ffn-table")),
      el("div", {}, el("h2", {}, "Top attention value neurons"), neuronTable(data.attention_neurons, "attention-table")),
      el("div", {}, el("h2", {}, "Top query neurons"), queryTable(data.query_neurons))));

  const picked = explorer.picked = new Set();
  const graph = explorer.graph = NeuronGraph(document.getElementById("graph"), data.graph, node => showNode(side, node, graph));
  bindGraphControls(graph, () => graph.setPicked([...picked].map(graphId).filter(Boolean)));
  renderSelection();
}

// The multi-hop circuit (docs/method.md §3b), drawn by the same code as `attribute --html`: layers up, positions
// across; residual nodes and sinks behind toggles; the strongest path on request; a click shows a node in the panel.
function circuitSection(data, side) {
  if (!data.circuit) return el("div", {class: "muted", id: "circuit-note"}, "No circuit: " + data.circuit_note);
  const status = el("span", {id: "circuit-status"}, "drawing…"), path = el("span", {id: "circuit-path"});
  const residuals = el("input", {id: "circuit-residuals", type: "checkbox"}), sinks = el("input", {id: "circuit-sinks", type: "checkbox"});
  const box = el("div", {id: "circuit"});
  const section = el("div", {class: "circuit-box"},
    el("h2", {}, "Circuit"),
    el("div", {class: "graph-bar"}, el("label", {}, residuals, " show residual nodes"), " · ",
       el("label", {title: "neurons that read the first token, the attention sink"}, sinks, " show sinks ⚓"), " · ",
       el("button", {id: "circuit-strongest", onclick: () => {
         const found = view.strongestPath();
         view.markPath(found.ids);
         path.textContent = found.ids.map(id => (view.node(id) || {}).name || id).join(" → ") + " (share " + fmt(found.value) + ")";
       }}, "highlight the strongest path"), " ", path, " · ", status,
       el("div", {class: "muted"}, "Green: FFN neurons, orange: attention neurons at their source positions, grey: tokens; links are the share of a node's flow each input supplies (exact; completeness " + fmt(data.circuit.completeness) + ")")),
    box);
  let view = null;
  const draw = () => {
    const counts = view.draw({residuals: residuals.checked, sinks: sinks.checked});
    status.textContent = "drawn " + counts[0] + " nodes, " + counts[1] + " links";
  };
  residuals.addEventListener("change", draw); sinks.addEventListener("change", draw);
  requestAnimationFrame(() => {
    view = CircuitView(box, data.circuit, node => showCircuitNode(side, node));
    draw();
  });
  return section;
}

function showCircuitNode(side, node) {
  const rows = [];
  const add = (label, value) => { if (value !== null && value !== undefined) rows.push(label + ": " + value); };
  add("position", node.position + " " + quoted(node.token));
  add("score (into the answer)", node.score === undefined ? null : fmt(node.score));
  add("flow passed on", fmt(node.flow)); add("influence on the answer", node.influence === undefined ? null : fmt(node.influence));
  if (node.sink) rows.push("⚓ reads the first token, the attention sink");
  const named = node.kind === "ffn" ? node.neuron : node.kind === "attention" ? node.name : null;
  side.replaceChildren(el("h3", {id: "side-title"}, (node.kind === "ffn" ? "FFN neuron " : node.kind === "attention" ? "attention neuron " : node.kind + " ") + (node.name || node.text || "")),
    named ? el("div", {}, neuronLink(named.replace(/@\d+$/, "")), "  ", pickButton(named)) : null,
    el("div", {class: "numbers", id: "side-numbers"}, rows.join("\n")));
}

function graphId(name) {
  for (const prefix of ["ffn:", "attention:", "query:"]) if (explorer.graph.node(prefix + name)) return prefix + name;
  return null;
}

function togglePick(name) {
  const picked = explorer.picked;
  if (picked.has(name)) picked.delete(name); else picked.add(name);
  explorer.graph.setPicked([...picked].map(graphId).filter(Boolean));
  renderSelection();
}
function pickButton(name) {
  return el("button", {class: "pick", "data-neuron": name, onclick: () => togglePick(name)}, "select");
}

// The N value neurons with the largest |score|, FFN and attention together, in place of the selection.
function selectTop(count) {
  const data = explorer.data;
  const ranked = [...data.ffn_neurons, ...data.attention_neurons].sort((a, b) => Math.abs(b.score) - Math.abs(a.score));
  explorer.topCount = count;
  explorer.picked.clear();
  for (const n of ranked.slice(0, count)) explorer.picked.add(n.name);
  explorer.graph.setPicked([...explorer.picked].map(graphId).filter(Boolean));
  renderSelection();
}

function renderSelection() {
  const box = document.getElementById("selection");
  const picked = [...explorer.picked];
  const chips = picked.map(name => el("span", {class: "chip"}, name,
                                      el("button", {title: "remove", onclick: () => togglePick(name)}, "×")));
  const result = el("div", {id: "intervention"});
  const scale = el("input", {id: "scale", type: "number", step: "any", value: 2, size: 4});
  const topCount = el("input", {id: "top-count", type: "number", min: 1, step: 1, value: explorer.topCount || 10, size: 4});
  topCount.addEventListener("change", () => { explorer.topCount = topCount.value; });
  const run = async value => {
    result.replaceChildren(el("span", {class: "waiting"}, "Running the model…"));
    try {
      const data = await api("/api/intervene", {...currentQuery(), neurons: picked, scale: value});
      showIntervention(result, data);
    } catch (error) { fail(result, error); }
  };
  box.replaceChildren(el("b", {}, "Selected: "), el("span", {id: "picked"}, picked.length ? chips : el("span", {class: "muted"}, "none (use a node's or a row's “select”)")),
    el("div", {},
       el("button", {id: "switch-off", disabled: picked.length ? null : "disabled", onclick: () => run(0)}, "switch off"),
       " ", el("button", {id: "amplify", disabled: picked.length ? null : "disabled",
                          onclick: () => run(Number(scale.value))}, "amplify ×"), scale,
       " ", el("button", {id: "measure", disabled: picked.length ? null : "disabled", onclick: measure,
                          title: "switch each off alone: its measured change of log p(answer), beside its score"},
               "measure each alone"),
       " ", el("button", {id: "clear", onclick: () => { explorer.picked.clear(); explorer.graph.setPicked([]); renderSelection(); }}, "clear")),
    el("div", {},
       el("button", {id: "select-top", title: "select the N value neurons (FFN and attention) with the largest |score|",
                     onclick: () => selectTop(Math.max(1, Math.floor(Number(topCount.value) || 1)))}, "select the top"),
       " ", topCount, " value neurons by |score|"),
    result);
  async function measure() {
    result.replaceChildren(el("span", {class: "waiting"}, "Switching each off alone…"));
    try {
      showMeasured(result, await api("/api/measure", {...currentQuery(), neurons: picked}));
    } catch (error) { fail(result, error); }
  }
}

function scoreOf(name) {
  const node = explorer.graph.node(graphId(name) || "");
  return node && node.score !== undefined ? node.score : null;
}

function showMeasured(box, data) {
  const what = "log p(" + quoted(data.target.text) + ")" + (data.contrast ? " − log p(" + quoted(data.contrast) + ")" : "");
  box.replaceChildren(
    el("div", {}, "Each switched off alone: the change of " + what + ", beside its score (a score is the frozen-norm, first-order effect; switching off lets the rest of the model respond)"),
    table(["neuron", "#score", "#off alone"],
      data.alone.map(row => el("tr", {}, el("td", {}, row.neuron), num(scoreOf(row.neuron)), num(row.measured_change))),
      "measured"),
    el("div", {}, "All " + data.alone.length + " off together: ", el("b", {id: "measured-together"}, fmt(data.together, 4))),
    el("div", {class: "muted"}, "model work " + data.seconds.toFixed(2) + " s"));
}

function showIntervention(box, data) {
  const before = data.before, after = data.after;
  const change = after.prob - before.prob;
  box.replaceChildren(
    el("div", {}, (data.scale === 0 ? "Switched off " : "Scaled ×" + data.scale + ": ") + data.neurons.join(", ")),
    el("div", {}, "p(", el("span", {class: "tok"}, quoted(data.target.text)), ") ", fmt(before.prob, 6), " → ",
       el("b", {id: "after-prob", "data-prob": String(after.prob)}, fmt(after.prob, 6)),
       el("span", {class: change >= 0 ? "pos" : "neg"}, " (" + (change >= 0 ? "+" : "") + fmt(change, 6) + ")"),
       ", rank " + before.rank + " → ", el("b", {id: "after-rank"}, String(after.rank))),
    el("div", {id: "after-predictions"}, "Top predictions now: ",
       after.predictions.map(p => el("span", {class: "tok"}, quoted(p.token) + " " + fmt(p.prob, 4) + "  "))),
    el("div", {class: "muted"}, (data.answer_tokens > 1 ? "the first of the answer's " + data.answer_tokens + " tokens · " : "") +
                                "model work " + data.seconds.toFixed(2) + " s"));
}

function showNode(side, node, graph) {
  const rows = [];
  const add = (label, value) => { if (value !== null && value !== undefined) rows.push(label + ": " + value); };
  let name = null;
  if (node.kind === "token") { add("token", quoted(node.text)); add("position", node.position); }
  else if (node.kind === "answer") { add("answer", quoted(node.text)); add("token id", node.token_id); add("p", fmt(node.prob, 6)); }
  else {
    name = node.name;
    add("score", fmt(node.score)); add("switched off alone", node.measured_change == null ? null : fmt(node.measured_change)); add("coefficient", fmt(node.coefficient));
    if (node.sink) rows.push("⚓ reads the first token, the attention sink");
    if (node.kind !== "query") {
      add("direct part", fmt(node.direct_score)); add("answer's push rank", node.target_push_rank);
    }
    if (node.position !== null && node.position !== undefined) add("source position", node.position + " " + quoted(node.token));
    if (node.token_scores) add("per answer token", node.token_scores.map(x => fmt(x)).join(", "));
  }
  const incoming = graph.incoming(node.id).filter(l => l.kind === "query");
  const outgoing = explorer.data.graph.links.filter(l => l.source === node.id && l.kind === "query");
  side.replaceChildren(...[
    el("h3", {id: "side-title"}, node.kind + " " + (name || node.id)),
    name ? el("div", {}, neuronLink(node.kind === "query" ? name : name.replace(/@\d+$/, "")), "  ", pickButton(name)) : null,
    el("div", {class: "numbers", id: "side-numbers"}, rows.join("\n")),
    node.promoted_tokens ? el("div", {}, el("h3", {}, "Promotes"), tokenList(node.promoted_tokens)) : null,
    node.suppressed_tokens ? el("div", {}, el("h3", {}, "Suppresses"), tokenList(node.suppressed_tokens)) : null,
    incoming.length ? el("div", {}, el("h3", {}, "Its query neurons (share of its score)"),
      table(["query neuron", "#share"], incoming.slice(0, 15).map(l =>
        el("tr", {}, el("td", {}, neuronLink(l.source.slice(6))), num(l.weight)))) ) : null,
    outgoing.length ? el("div", {}, el("h3", {}, "Activates (share of their scores)"),
      table(["value neuron", "#share"], outgoing.map(l =>
        el("tr", {}, el("td", {}, l.target.replace(/^[a-z]+:/, "")), num(l.weight))))) : null].filter(Boolean));
}

function neuronTable(neurons, id) {
  return table(["neuron", "#score", "#coef.", "where", "promotes", ""], neurons.map(n => el("tr", {},
    el("td", {}, neuronLink(n.name.replace(/@\d+$/, ""))), num(n.score), num(n.coefficient, 2),
    el("td", {class: "tok"}, n.token !== undefined ? "@" + n.position + " " + quoted(n.token) : "last"),
    el("td", {}, tokenList((n.promoted_tokens || []).slice(0, 4))), el("td", {}, pickButton(n.name)))), id);
}
function queryTable(neurons) {
  return table(["neuron", "#score", "where", ""], neurons.map(q => el("tr", {},
    el("td", {}, neuronLink(q.name)), num(q.score),
    el("td", {class: "tok"}, q.position === null || q.position === undefined ? "" : "@" + q.position + " " + quoted(q.token)),
    el("td", {}, pickButton(q.name)))), "query-table");
}
function headsTable(heads) {
  return table(["head", "#score", "strongest sources", ""], heads.map(h => el("tr", {},
    el("td", {}, neuronLink(h.name)), num(h.score),
    el("td", {class: "tok"}, h.sources.map(s => "@" + s.position + " " + quoted(s.token)).join("  ")),
    el("td", {}, pickButton(h.name)))), "heads");
}

function layerBars(layers, id, width = 900, height = 150) {
  // Per layer, the attention (blue) and FFN (orange) layer scores as bars up (raise the answer) or down.
  const n = layers.ffn.length;
  const most = Math.max(1e-9, ...layers.ffn.map(Math.abs), ...layers.attention.map(Math.abs));
  const slot = (width - 50) / n, middle = (height - 14) / 2, scale = (middle - 4) / most;
  const every = [1, 2, 5, 10, 20, 50].find(k => k * slot >= 7 * String(n - 1).length + 6) || 100;
  const chart = svg("svg", {width: width, height: height, id: id, role: "img"});
  chart.append(svg("line", {x1: 40, x2: width, y1: middle, y2: middle, stroke: "#999"}));
  chart.append(svg("text", {x: 0, y: 10}, "+" + most.toFixed(2)), svg("text", {x: 0, y: height - 16}, "−" + most.toFixed(2)));
  for (let layer = 0; layer < n; layer++) {
    [["attention", "#3b6fb6", 0], ["ffn", "#e08a1e", 1]].forEach(([kind, colour, k]) => {
      const value = layers[kind][layer];
      const bar = svg("rect", {x: 40 + layer * slot + k * slot * 0.42, width: slot * 0.4, fill: colour,
                               y: value >= 0 ? middle - value * scale : middle, height: Math.abs(value) * scale});
      bar.append(svg("title", {}, kind + " layer " + layer + ": " + value.toFixed(4)));
      chart.append(bar);
    });
    // a label every `every` layers, so that two never touch (about 7 px a digit, 6 px apart)
    if (layer % every === 0) chart.append(svg("text", {x: 40 + (layer + 0.4) * slot, y: height - 2, "text-anchor": "middle",
                                                   "font-size": 11}, String(layer)));
  }
  return el("div", {}, chart, el("div", {class: "muted"}, "blue: attention layers, orange: FFN layers (hover for values)"));
}

// -- neuron pages ---------------------------------------------------------------------------------------------

async function neuronView(name) {
  const view = document.getElementById("view");
  view.replaceChildren(el("p", {class: "waiting"}, "Loading " + name + "…"));
  let data;
  try { data = await api("/api/neuron/" + encodeURIComponent(name)); } catch (error) { return fail(view, error); }
  explorer.data = data;
  const expert = data.expert === null || data.expert === undefined ? "" : ", expert " + data.expert;
  const titles = {ffn: "FFN neuron " + data.name + " (layer " + data.layer + expert + ", neuron " + data.neuron + ")",
                  attention: "Attention neuron " + data.name + " (layer " + data.layer + ", head " + data.head + ", dim " + data.dim + ")",
                  head: "Head " + data.name + " (layer " + data.layer + ", head " + data.head + ")"};
  const parts = [el("h2", {id: "neuron-title"}, titles[data.kind])];
  if (data.kind === "head") {
    parts.push(el("h3", {}, "Its neurons, read in the vocabulary (top and bottom 3 tokens of each)"),
      table(["neuron", "top", "bottom"], data.neurons.map(n => el("tr", {},
        el("td", {}, neuronLink(n.name)), el("td", {}, tokenList(n.top_tokens)), el("td", {}, tokenList(n.bottom_tokens)))), "head-neurons"));
  } else {
    const p = data.projection;
    parts.push(el("p", {class: "muted"}, "Its vector through the final norm's gain and the unembedding. With a positive coefficient it " +
                                        "promotes the top tokens, with a negative one the bottom ones."),
      el("div", {class: "grid"},
        el("div", {}, el("h3", {}, "Top of the projection"), table(["token", "#logit"], p.top_tokens.map((t, i) =>
          el("tr", {}, el("td", {class: "tok"}, quoted(t)), num(p.top_values[i], 3))), "top-tokens")),
        el("div", {}, el("h3", {}, "Bottom of the projection"), table(["token", "#logit"], p.bottom_tokens.map((t, i) =>
          el("tr", {}, el("td", {class: "tok"}, quoted(t)), num(p.bottom_values[i], 3))), "bottom-tokens"))));
  }
  if (!data.runs.length) parts.push(el("p", {class: "muted"}, "No runs loaded: start `neuron-attribution serve --run DIR` to see this neuron across a run's sentences."));
  for (const run of data.runs) parts.push(runSection(data, run));
  view.replaceChildren(...parts);
}

function runSection(data, run) {
  const label = data.kind === "head" ? "top " + run.top_k + " heads" : "top " + run.top_k;
  const histograms = {};
  const pushes = data.kind === "ffn" || data.kind === "attention";  // a value neuron: which end of its projection it pushes
  for (const bin of run.histogram) (histograms[bin.type] = histograms[bin.type] || []).push(bin);
  return el("section", {class: "run-section", "data-run": run.run},
    el("h2", {}, "Run ", el("a", {href: "/run/" + run.run}, run.name), ": in the " + label + " of ",
       el("span", {class: "hits"}, String(run.hits)), " of " + run.sentences + " sentences"),
    el("h3", {}, "By knowledge type"),
    table(["type", "#sentences with it", "#share", "#mean score", "#median", "#min", "#max", "distribution",
           ...(pushes ? ["#pushes top / bottom end", "#wins by suppressing ↓"] : [])],
      run.per_type.map(t => el("tr", {}, el("td", {}, t.type), el("td", {class: "num"}, t.hits + " / " + t.sentences),
        el("td", {class: "num"}, (100 * t.hits / t.sentences).toFixed(0) + "%"), num(t.mean), num(t.median), num(t.min), num(t.max),
        el("td", {}, histogram(histograms[t.type] || [])),
        pushes ? el("td", {class: "num"}, t.top_end + " / " + t.bottom_end) : null,
        pushes ? el("td", {class: "num"}, String(t.by_suppressing)) : null))
    , "per-type-" + run.run),
    pushes ? el("p", {class: "muted"}, "In a sentence the neuron pushes the top end of its projection (above) where its coefficient is positive, " +
                "the bottom end where it is negative; push rank: the answer's rank among the tokens its contribution raises; " +
                "↓: it raises the answer's log p by pushing the probable competitors down (push rank in the lower half of the vocabulary).") : null,
    data.kind === "attention" ? el("p", {class: "muted"}, "Counted by sentence: in each, the neuron's best source position (highest score) stands for it; the scores are that position's.") : null,
    el("h3", {}, "Sentences (best scores first" + (run.sentences_with.length < run.hits ? "; the best " + run.sentences_with.length + " of " + run.hits : "") + ")"),
    table(["sentence", "answer", "type", "#rank", "#score", ...(pushes ? ["#coef.", "pushes", "#push rank"] : []),
           data.kind === "attention" ? "source" : ""],
      run.sentences_with.map(s => el("tr", {}, el("td", {}, promptLink(s.prompt, s.target_text)),
        el("td", {class: "tok"}, quoted(s.target_text)), el("td", {}, s.type), el("td", {class: "num"}, s.rank),
        num(s.score),
        pushes ? num(s.coefficient, 3) : null,
        pushes ? el("td", {class: "pushes"}, s.coefficient >= 0 ? "top end" : "bottom end") : null,
        pushes ? el("td", {class: "num"}, s.target_push_rank === null || s.target_push_rank === undefined ? "" :
                    s.target_push_rank.toLocaleString("en") + (s.wins_by_suppressing ? " ↓" : "")) : null,
        el("td", {class: "tok"}, s.position !== undefined ? "@" + s.position + " " + quoted(s.token) + (s.positions > 1 ? " (best of " + s.positions + " positions)" : "") : ""))),
      "sentences-" + run.run));
}

function histogram(bins) {
  const width = 120, height = 26, count = 20;
  const chart = svg("svg", {width: width, height: height});
  const most = Math.max(1, ...bins.map(b => b.count));
  for (const b of bins) {
    const bar = svg("rect", {x: b.bin * width / count, width: width / count - 1, y: height - height * b.count / most,
                             height: height * b.count / most, fill: "#3b6fb6"});
    bar.append(svg("title", {}, b.count + " with score " + (b.lo + b.bin * b.width / count).toFixed(3) + " to " +
                              (b.lo + (b.bin + 1) * b.width / count).toFixed(3)));
    chart.append(bar);
  }
  return chart;
}

// -- search ---------------------------------------------------------------------------------------------------

async function searchView(q) {
  const view = document.getElementById("view");
  document.getElementById("search").value = q;
  view.replaceChildren(el("p", {class: "waiting"}, "Searching…"));
  let data;
  try { data = await api("/api/search?" + new URLSearchParams({q: q}).toString()); } catch (error) { return fail(view, error); }
  if (data.neuron) { location.replace("/neuron/" + encodeURIComponent(data.neuron)); return; }
  explorer.data = data;
  const found = (rows, id) => table(["neuron", "#z", "#centred logit"], rows.map(r => el("tr", {},
    el("td", {}, neuronLink(r.name)), num(r.z, 2), num(r.centred_logit, 3))), id);
  const other = data.other_variant;
  const parts = [el("h2", {}, "Neurons that single out ", el("span", {class: "tok"}, quoted(data.token)), " (token " + data.token_id + ")"),
    other ? el("div", {class: "warning", id: "other-variant"}, "Searched ", el("span", {class: "tok"}, quoted(data.token)),
               " (id " + data.token_id + ", no leading space). After a space the word is another token, ",
               el("span", {class: "tok"}, quoted(other.token)), " (id " + other.token_id + "): ",
               el("a", {href: "/search?" + new URLSearchParams({q: other.query}).toString(), id: "other-variant-link"},
                  "search " + other.query), ". Quotes keep a space: ' Paris'.") : null];
  // what the runs found first: it is the short list, the weight tables below are long
  if (data.runs.length) {
    parts.push(el("h2", {}, "In the loaded runs: value neurons that promoted it"),
      table(["run", "neuron", "kind", "#sentences", "#mean score"], data.runs.map(r => el("tr", {},
        el("td", {}, el("a", {href: "/run/" + r.run}, String(r.run))), el("td", {}, neuronLink(r.name)), el("td", {}, r.kind),
        el("td", {class: "num"}, r.sentences), num(r.mean))), "run-promoting"));
  } else {
    parts.push(el("p", {class: "muted", id: "run-promoting"}, "No loaded run has a value neuron that promoted it."));
  }
  parts.push(el("h2", {}, "From the weights"),
    el("p", {class: "muted"}, "Every neuron: the token's logit in the neuron's vocabulary projection, less the mean " +
                              "over the vocabulary, in standard deviations of that projection (z). High z: the neuron raises the " +
                              "token when its coefficient is positive; low z: when it is negative."));
  for (const kind of ["ffn", "attention"]) {
    parts.push(el("div", {class: "grid"},
      el("div", {}, el("h3", {}, (kind === "ffn" ? "FFN" : "Attention") + " neurons, highest z"), found(data[kind].promote, kind + "-promote")),
      el("div", {}, el("h3", {}, (kind === "ffn" ? "FFN" : "Attention") + " neurons, lowest z"), found(data[kind].suppress, kind + "-suppress"))));
  }
  view.replaceChildren(...parts);
}

// -- the run view ---------------------------------------------------------------------------------------------

async function runView(run) {
  const view = document.getElementById("view");
  view.replaceChildren(el("p", {class: "waiting"}, "Loading run " + run + "…"));
  let data;
  try { data = await api("/api/runs/" + run); } catch (error) { return fail(view, error); }
  explorer.data = data;
  const byType = key => { const out = {}; for (const row of data[key]) (out[row.type] = out[row.type] || []).push(row); return out; };
  const layers = byType("layers"), heads = byType("heads"), neurons = byType("neurons");
  const filter = el("select", {id: "type-filter"}, el("option", {value: ""}, "every type"),
                    data.types.map(t => el("option", {value: t.type}, t.type)));
  const body = el("tbody");
  const fill = () => body.replaceChildren(...data.sentences.filter(s => !filter.value || s.type === filter.value).map(s =>
    el("tr", {}, el("td", {class: "num"}, s.sentence_id), el("td", {}, s.type), el("td", {}, promptLink(s.prompt, s.target_text)),
       el("td", {class: "tok"}, quoted(s.target_text)), num(s.target_prob, 3), el("td", {class: "num"}, s.target_rank))));
  filter.addEventListener("change", fill);
  fill();
  view.replaceChildren(
    el("h2", {id: "run-title"}, "Run " + data.name), el("p", {class: "muted"}, data.path + " · model " + data.model + " · dataset " +
       data.dataset + " · " + data.sentences.length + " sentences · top " + data.top + " neurons kept per sentence"),
    table(["type", "#sentences", "#mean p(answer)"], data.types.map(t => el("tr", {}, el("td", {}, t.type),
      el("td", {class: "num"}, t.sentences), num(t.mean_prob, 3))), "types"),
    el("h2", {}, "Layer scores, mean per sentence"),
    el("div", {class: "grid"}, Object.entries(layers).map(([type, rows]) => el("div", {}, el("h3", {}, type),
      layerBars({attention: rows.map(r => r.attention), ffn: rows.map(r => r.ffn)}, "layers-" + type, 420, 110)))),
    el("h2", {}, "Top heads per type (mean score)"),
    el("div", {class: "grid"}, Object.entries(heads).map(([type, rows]) => el("div", {}, el("h3", {}, type),
      table(["head", "#mean"], rows.map(h => el("tr", {}, el("td", {}, neuronLink(h.name)), num(h.mean))))))),
    el("h3", {}, "Heads in the top " + 10 + " of several types"),
    table(["head", "types"], data.shared_heads.map(h => el("tr", {}, el("td", {}, neuronLink(h.name)), el("td", {}, h.types.join(", ")))), "shared-heads"),
    el("h2", {}, "FFN value neurons most often in a sentence's top 10"),
    el("div", {class: "grid"}, Object.entries(neurons).map(([type, rows]) => el("div", {}, el("h3", {}, type),
      table(["neuron", "#sentences", "#mean", "pushes"], rows.map(n => el("tr", {}, el("td", {}, neuronLink(n.name)),
        el("td", {class: "num"}, n.sentences), num(n.mean),
        el("td", {class: "pushes"}, n.bottom_end === 0 ? "top end" : n.bottom_end === n.sentences ? "bottom end" :
                                    "top end in " + (n.sentences - n.bottom_end) + ", bottom in " + n.bottom_end))))))),
    el("p", {class: "muted"}, "pushes: the end of the neuron's vocabulary projection its contribution raises in those sentences (its coefficient's sign)"),
    el("h2", {}, "Sentences ", filter),
    el("table", {id: "run-sentences"}, el("thead", {}, el("tr", {}, ["#", "type", "prompt (opens its attribution)", "answer", "p", "rank"].map(h => el("th", {}, h)))), body));
}

// -- start ----------------------------------------------------------------------------------------------------

async function start() {
  try {
    const info = await api("/api/info");
    document.getElementById("model").textContent = info.model + " · " + info.shape.n_layers + " layers";
    document.getElementById("run-links").replaceChildren(...info.runs.map(r =>
      el("a", {href: "/run/" + r.run, title: r.path}, "run " + r.run + ": " + r.name + " ")));
  } catch (error) { document.getElementById("model").textContent = "server not answering"; }
  const path = location.pathname, params = new URLSearchParams(location.search);
  if (path.startsWith("/neuron/")) return neuronView(decodeURIComponent(path.slice(8)));
  if (path.startsWith("/run/")) return runView(Number(path.slice(5)));
  if (path === "/search") return searchView(params.get("q") || "");
  return promptView(params);
}
start();
