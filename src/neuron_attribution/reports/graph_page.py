"""One self-contained interactive page of an attribution graph (`attribute --html FILE`): the graph's JSON and
the vendored Cytoscape.js inlined, nothing fetched when it is viewed. Tokens along the bottom (x = position),
neurons at their layer (y), the answer on top; link width by |weight|, colour by sign; a control for how many
value neurons to show (top-N by |score|) or what share of their scores; hovering shows a node's numbers,
clicking opens them in a side panel. Every text from the model or the prompt reaches the page as JSON data and
is put into the document with `textContent`: nothing is parsed as markup."""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any

LIBRARY = "cytoscape-3.35.0.min.js"


def graph_page(graph: dict[str, Any]) -> str:
    title = f"{graph['prompt']!r} → {graph['target']['text']!r}"
    return _inline(_PAGE, "graph.js", {"__TITLE_JSON__": _script_json(title), "__GRAPH_JSON__": _script_json(graph)})


def circuit_page(graph: dict[str, Any]) -> str:
    """One self-contained page of a circuit (`attribute --html` without --one-hop): its header says the prompt,
    the answer, its probability and the top predictions; layers up the page, positions across."""
    return _inline(_CIRCUIT_PAGE, "circuit.js", {"__GRAPH_JSON__": _script_json(graph)})


def _inline(template: str, code: str, parts: dict[str, str]) -> str:
    """The template with the vendored library, the drawing code `code` (reports/assets) and `parts` put in, in one
    pass: a prompt that contains a placeholder's name stays text."""
    package = resources.files("neuron_attribution.reports")
    parts = {**parts, "__LIBRARY__": package.joinpath("vendor", LIBRARY).read_text(encoding="utf-8"),
             "__GRAPH_CODE__": package.joinpath("assets", code).read_text(encoding="utf-8")}
    return re.sub("|".join(re.escape(name) for name in parts), lambda m: parts[m.group(0)], template)


# The head both pages share: nothing may be fetched, only the inlined scripts run.
_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>neuron-attribution __KIND__</title>
<style>
body{margin:0;font:13px/1.4 system-ui,sans-serif;display:flex;height:100vh}
#main{flex:1;display:flex;flex-direction:column;min-width:0}
#bar{padding:6px 10px;border-bottom:1px solid #ddd}
#graph{flex:1;min-height:300px}
"""


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element: no "</script>", no "<!--", no line separators."""
    text = json.dumps(value, ensure_ascii=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


_PAGE = _HEAD.replace("__KIND__", "graph") + """#side{width:320px;border-left:1px solid #ddd;padding:8px;overflow:auto;white-space:pre-wrap;font-family:monospace}
</style></head><body>
<div id="main">
 <div id="bar"><b id="title"></b><br>
  show <select id="mode"><option value="top">the top</option><option value="share">a share of</option></select>
  <input id="amount" type="number" min="1" step="1" value="20" style="width:5em">
  <span id="unit">value neurons by |score|</span> ·
  <label title="neurons that read the first token, the attention sink"><input id="sinks" type="checkbox"> show sinks ⚓</label> ·
  <span id="graph-status">drawing…</span></div>
 <div id="graph"></div>
</div>
<div id="side">Click a node for its numbers.</div>
<script>__LIBRARY__</script>
<script>__GRAPH_CODE__</script>
<script>
"use strict";
const GRAPH = __GRAPH_JSON__;
document.getElementById("title").textContent = __TITLE_JSON__ + "  (" + GRAPH.measure + ")";
const side = document.getElementById("side");
const view = NeuronGraph(document.getElementById("graph"), GRAPH, node => { side.textContent = view.describe(node.id); });
bindGraphControls(view);
</script></body></html>
"""

_CIRCUIT_PAGE = _HEAD.replace("__KIND__", "circuit") + """#side{width:340px;border-left:1px solid #ddd;padding:8px;overflow:auto;white-space:pre-wrap;font-family:monospace}
.key{display:inline-block;width:10px;height:10px;border-radius:5px;margin:0 3px 0 8px;vertical-align:middle}
</style></head><body>
<div id="main">
 <div id="bar"><b id="title"></b> <span id="answer"></span><br><span id="predictions"></span><br>
  <label><input id="residuals" type="checkbox"> show residual nodes</label> ·
  <label title="neurons that read the first token, the attention sink"><input id="sinks" type="checkbox"> show sinks ⚓</label> ·
  <button id="strongest">highlight the strongest path</button> <span id="path"></span> ·
  <span id="graph-status">drawing…</span><br>
  <span class="key" style="background:#16a085"></span>FFN neuron<span class="key" style="background:#e67e22"></span>attention
  neuron (at its source position)<span class="key" style="background:#777"></span>token<span class="key"
  style="background:#bbb"></span>rest of a layer's input<span class="key" style="background:#1f4e99"></span>answer ·
  links: green raise, red lower the answer; width by |weight|; layers up, positions across</div>
 <div id="graph"></div>
</div>
<div id="side">Hover a node to light its links; click it for its numbers.</div>
<script>__LIBRARY__</script>
<script>__GRAPH_CODE__</script>
<script>
"use strict";
const GRAPH = __GRAPH_JSON__;
const text = (id, value) => { document.getElementById(id).textContent = value; };
text("title", JSON.stringify(GRAPH.prompt) + " → " + JSON.stringify(GRAPH.target.text));
text("answer", "p = " + GRAPH.target.prob.toFixed(4) + ", rank " + GRAPH.target.rank + " · completeness " +
     GRAPH.completeness.toFixed(4));
text("predictions", "Top predictions: " + GRAPH.predictions.map(p => JSON.stringify(p.token) + " " + p.prob.toFixed(3)).join("  "));
const side = document.getElementById("side");
const view = CircuitView(document.getElementById("graph"), GRAPH, node => { side.textContent = describe(node); });
function describe(n) {
  const lines = [(n.kind === "ffn" ? "FFN neuron " : n.kind === "attention" ? "attention neuron " : n.kind + " ") + (n.name || n.text || "")];
  const add = (label, value) => { if (value !== undefined && value !== null) lines.push(label + ": " + value); };
  if (n.kind !== "answer") add("layer", n.layer < 0 ? null : n.layer);
  add("position", n.position + " " + JSON.stringify(GRAPH.tokens[n.position]));
  add("score (into the answer)", n.score === undefined ? null : n.score.toFixed(4));
  add("flow passed on", n.flow === undefined ? null : n.flow.toFixed(4));
  add("influence on the answer", n.influence === undefined ? null : n.influence.toFixed(4));
  if (n.sink) lines.push("⚓ reads the first token, the attention sink");
  const name = id => { const m = view.node(id) || {}; return m.name || m.text || id; };
  const inLinks = GRAPH.links.filter(l => l.target === n.id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
  const outLinks = GRAPH.links.filter(l => l.source === n.id);
  if (inLinks.length) lines.push("", "from:", ...inLinks.map(l => "  " + name(l.source) + "  " + l.weight.toFixed(4)));
  if (outLinks.length) lines.push("", "to:", ...outLinks.map(l => "  " + name(l.target) + "  " + l.weight.toFixed(4)));
  return lines.join("\\n");
}
function draw() {
  const counts = view.draw({residuals: document.getElementById("residuals").checked,
                            sinks: document.getElementById("sinks").checked});
  text("graph-status", "drawn " + counts[0] + " nodes, " + counts[1] + " links");
}
for (const id of ["residuals", "sinks"]) document.getElementById(id).addEventListener("change", draw);
document.getElementById("strongest").addEventListener("click", () => {
  const path = view.strongestPath();
  view.markPath(path.ids);
  text("path", path.ids.map(id => (view.node(id) || {}).name || id).join(" → ") + " (share " + path.value.toFixed(4) + ")");
});
draw();
</script></body></html>
"""
