"""One self-contained interactive page of an attribution graph (`attribute --html FILE`): the graph's JSON and
the vendored Cytoscape.js inlined, nothing fetched when it is viewed. Tokens along the bottom (x = position),
neurons at their layer (y), the answer on top; link width by |weight|, colour by sign; a control for how many
value neurons to show (top-N by |score|) or what share of their scores; hovering shows a node's numbers,
clicking opens them in a side panel. Every text from the model or the prompt reaches the page as JSON data and
is put into the document with `textContent`: nothing is parsed as markup."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

LIBRARY = "cytoscape-3.35.0.min.js"


def graph_page(graph: dict[str, Any]) -> str:
    library = resources.files("neuron_attribution.reports").joinpath("vendor", LIBRARY).read_text(encoding="utf-8")
    title = f"{graph['prompt']!r} → {graph['target']['text']!r}"
    return (_PAGE.replace("__TITLE_JSON__", _script_json(title))
            .replace("__GRAPH_JSON__", _script_json(graph))
            .replace("__LIBRARY__", library))


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no "</script>", no "<!--", no line separators."""
    text = json.dumps(value, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>neuron-attribution graph</title>
<style>
body{margin:0;font:13px/1.4 system-ui,sans-serif;display:flex;height:100vh}
#main{flex:1;display:flex;flex-direction:column;min-width:0}
#bar{padding:6px 10px;border-bottom:1px solid #ddd}
#graph{flex:1;min-height:300px}
#side{width:320px;border-left:1px solid #ddd;padding:8px;overflow:auto;white-space:pre-wrap;font-family:monospace}
#hover{position:fixed;pointer-events:none;background:#fffbe6;border:1px solid #ccb;padding:2px 5px;display:none}
</style></head><body>
<div id="main">
 <div id="bar"><b id="title"></b><br>
  show <select id="mode"><option value="top">the top</option><option value="share">a share of</option></select>
  <input id="amount" type="number" min="1" step="1" value="20" style="width:5em">
  <span id="unit">value neurons by |score|</span> · <span id="status">drawing…</span></div>
 <div id="graph"></div>
</div>
<div id="side">Click a node for its numbers.</div>
<div id="hover"></div>
<script>__LIBRARY__</script>
<script>
"use strict";
const GRAPH = __GRAPH_JSON__;
document.getElementById("title").textContent = __TITLE_JSON__ + "  (" + GRAPH.measure + ")";
const valueKinds = new Set(["ffn", "attention"]);
const values = GRAPH.nodes.filter(n => valueKinds.has(n.kind)).sort((a, b) => Math.abs(b.score) - Math.abs(a.score));
const totalScore = values.reduce((s, n) => s + Math.abs(n.score), 0);
const maxWeight = Math.max(1e-9, ...GRAPH.links.map(l => Math.abs(l.weight)));
const maxScore = Math.max(1e-9, ...values.map(n => Math.abs(n.score)));

function chosenValues() {
  const mode = document.getElementById("mode").value;
  const amount = Number(document.getElementById("amount").value);
  if (mode === "top") return new Set(values.slice(0, Math.max(1, Math.floor(amount))).map(n => n.id));
  const wanted = Math.min(100, Math.max(1, amount)) / 100 * totalScore;
  const chosen = new Set(); let running = 0;
  for (const n of values) { if (chosen.size && running >= wanted) break; chosen.add(n.id); running += Math.abs(n.score); }
  return chosen;
}

function colour(x) { return x >= 0 ? "#2f7d32" : "#c0392b"; }

function elements() {
  const shown = chosenValues();
  const links = GRAPH.links.filter(l => (l.kind === "value" && shown.has(l.source)) ||
                                        (l.kind !== "value" && shown.has(l.target)));
  const queries = new Set(links.filter(l => l.kind === "query").map(l => l.source));
  const nodes = GRAPH.nodes.filter(n => n.kind === "token" || n.kind === "answer" || shown.has(n.id) ||
                                        queries.has(n.id));
  const stacked = {};
  const placed = nodes.map(n => {
    const key = n.x + ":" + n.layer; const k = stacked[key] = (stacked[key] || 0) + 1;
    const size = valueKinds.has(n.kind) || n.kind === "query" ? 10 + 20 * Math.abs(n.score) / maxScore : 16;
    const label = n.kind === "token" ? n.text : n.kind === "answer" ? "→ " + n.text : (n.name || n.id);
    return {group: "nodes", data: {id: n.id, label: label, kind: n.kind, size: size,
                                   colour: n.kind === "token" ? "#777" : n.kind === "answer" ? "#1f4e99" :
                                           n.kind === "query" ? "#8e44ad" : colour(n.score)},
            position: {x: 200 * n.x + 34 * (k - 1), y: -40 * n.layer + 6 * (k - 1)}};
  });
  const edges = links.map((l, i) => ({group: "edges", data: {id: "l" + i, source: l.source, target: l.target,
    width: 0.5 + 7 * Math.abs(l.weight) / maxWeight, colour: colour(l.weight), weight: l.weight, kind: l.kind}}));
  return {elements: placed.concat(edges), counts: [placed.length, edges.length]};
}

const cy = cytoscape({container: document.getElementById("graph"), layout: {name: "preset"}, elements: [],
  style: [
    {selector: "node", style: {"background-color": "data(colour)", width: "data(size)", height: "data(size)",
                               label: "data(label)", "font-size": 9, "text-valign": "bottom", "text-halign": "center"}},
    {selector: "edge", style: {width: "data(width)", "line-color": "data(colour)", "curve-style": "bezier",
                               opacity: 0.6, "target-arrow-shape": "triangle", "target-arrow-color": "data(colour)"}}]});

function describe(id) {
  const node = GRAPH.nodes.find(n => n.id === id);
  const incoming = GRAPH.links.filter(l => l.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const outgoing = GRAPH.links.filter(l => l.source === id);
  const lines = Object.entries(node).map(([k, v]) => k + ": " + (Array.isArray(v) ? v.map(t => JSON.stringify(t)).join(" ") : v));
  if (incoming.length) lines.push("", "in:", ...incoming.slice(0, 30).map(l => "  " + l.source + "  " + l.weight.toFixed(4)));
  if (outgoing.length) lines.push("", "out:", ...outgoing.map(l => "  " + l.target + "  " + l.weight.toFixed(4)));
  return lines.join("\\n");
}

function draw() {
  const {elements: items, counts} = elements();
  cy.elements().remove(); cy.add(items); cy.fit(undefined, 30);
  document.getElementById("status").textContent = "drawn " + counts[0] + " nodes, " + counts[1] + " links";
}
const hover = document.getElementById("hover");
cy.on("mouseover", "node, edge", e => {
  const d = e.target.data();
  hover.textContent = e.target.isNode() ? d.id
                    : d.kind + " " + d.source + " → " + d.target + ": " + d.weight.toFixed(4);
  hover.style.display = "block";
});
cy.on("mousemove", e => {
  hover.style.left = (e.originalEvent.clientX + 12) + "px";
  hover.style.top = (e.originalEvent.clientY + 12) + "px";
});
cy.on("mouseout", "node, edge", () => { hover.style.display = "none"; });
cy.on("tap", "node", e => { document.getElementById("side").textContent = describe(e.target.id()); });
document.getElementById("mode").addEventListener("change", e => {
  const share = e.target.value === "share";
  document.getElementById("amount").value = share ? 80 : 20;
  document.getElementById("unit").textContent = share ? "% of the value neurons' |scores|" : "value neurons by |score|";
  draw();
});
document.getElementById("amount").addEventListener("change", draw);
draw();
</script></body></html>
"""
