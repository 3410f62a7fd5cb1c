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
    package = resources.files("neuron_attribution.reports")
    library = package.joinpath("vendor", LIBRARY).read_text(encoding="utf-8")
    code = package.joinpath("assets", "graph.js").read_text(encoding="utf-8")
    title = f"{graph['prompt']!r} → {graph['target']['text']!r}"
    parts = {"__TITLE_JSON__": _script_json(title), "__GRAPH_JSON__": _script_json(graph),
             "__GRAPH_CODE__": code, "__LIBRARY__": library}
    # one pass: a prompt that contains a placeholder's name stays text
    return re.sub("__(?:TITLE_JSON|GRAPH_JSON|GRAPH_CODE|LIBRARY)__", lambda m: parts[m.group(0)], _PAGE)


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
