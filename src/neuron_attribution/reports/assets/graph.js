"use strict";
// Draws an attribution graph (the README's "neuron-attribution graph 1" JSON) with Cytoscape.js: the prompt's
// tokens along the bottom (x = position), neurons at their layer (y), the answer on top; node size by |score|,
// link width by |weight|, colour by sign. Shared by `attribute --html` pages and the explorer. Texts only ever
// become Cytoscape labels or textContent, never markup.
function NeuronGraph(container, graph, onTap) {
  const valueKinds = new Set(["ffn", "attention"]);
  const allValues = graph.nodes.filter(n => valueKinds.has(n.kind))
                               .sort((a, b) => Math.abs(b.score) - Math.abs(a.score));
  // Neurons reading the first token (the attention sink) are drawn only when asked for (#sinks).
  let showSinks = false, values = allValues.filter(n => !n.sink);
  let totalScore = values.reduce((s, n) => s + Math.abs(n.score), 0);
  function setSinks(shown) {
    showSinks = shown;
    values = allValues.filter(n => shown || !n.sink);
    totalScore = values.reduce((s, n) => s + Math.abs(n.score), 0);
  }
  const maxWeight = Math.max(1e-9, ...graph.links.map(l => Math.abs(l.weight)));
  const maxScore = Math.max(1e-9, ...values.map(n => Math.abs(n.score)));
  const byId = new Map(graph.nodes.map(n => [n.id, n]));

  function chosenValues(mode, amount) {
    if (mode === "top") return new Set(values.slice(0, Math.max(1, Math.floor(amount))).map(n => n.id));
    const wanted = Math.min(100, Math.max(1, amount)) / 100 * totalScore;
    const chosen = new Set(); let running = 0;
    for (const n of values) {
      if (chosen.size && running >= wanted) break;
      chosen.add(n.id); running += Math.abs(n.score);
    }
    return chosen;
  }
  function colour(x) { return x >= 0 ? "#2f7d32" : "#c0392b"; }

  function elements(mode, amount) {
    const shown = chosenValues(mode, amount);
    const links = graph.links.filter(l => ((l.kind === "value" && shown.has(l.source)) ||
                                           (l.kind !== "value" && shown.has(l.target))) &&
                                          (showSinks || !(byId.get(l.source) || {}).sink));
    const queries = new Set(links.filter(l => l.kind === "query" && (showSinks || !byId.get(l.source).sink))
                                 .map(l => l.source));
    const nodes = graph.nodes.filter(n => n.kind === "token" || n.kind === "answer" || shown.has(n.id) ||
                                          queries.has(n.id));
    // Columns are positions, rows are layers, in a frame about the size of the drawing area so labels stay
    // readable; neurons sharing a cell spread across the cell (and over two rows when they are many).
    const xStep = 1000 / Math.max(1, graph.tokens.length), yStep = Math.max(560, 28 * (graph.n_layers + 2)) / (graph.n_layers + 2);
    const cells = {};
    for (const n of nodes) (cells[n.x + ":" + n.layer] = cells[n.x + ":" + n.layer] || []).push(n);
    const where = new Map();
    for (const cell of Object.values(cells)) {
      const count = cell.length, rows = count * 16 > 0.85 * xStep ? 2 : 1, perRow = Math.ceil(count / rows);
      cell.forEach((n, i) => {
        const column = i % perRow, row = Math.floor(i / perRow);
        const dx = perRow > 1 ? (column / (perRow - 1) - 0.5) * 0.85 * xStep : 0;
        where.set(n.id, {x: xStep * n.x + dx, y: -yStep * n.layer + (rows > 1 ? (row - 0.5) * 0.4 * yStep : 0)});
      });
    }
    const placed = nodes.map(n => {
      const size = valueKinds.has(n.kind) || n.kind === "query" ? 7 + 13 * Math.min(1, Math.abs(n.score) / maxScore) : 14;
      const label = n.kind === "token" ? n.text : n.kind === "answer" ? "→ " + n.text : (n.name || n.id);
      return {group: "nodes", data: {id: n.id, label: label, kind: n.kind, size: size,
                                     colour: n.kind === "token" ? "#777" : n.kind === "answer" ? "#1f4e99" :
                                             n.kind === "query" ? "#8e44ad" : colour(n.score)},
              position: where.get(n.id)};
    });
    const edges = links.map((l, i) => ({group: "edges", data: {id: "l" + i, source: l.source, target: l.target,
      width: 0.5 + 7 * Math.abs(l.weight) / maxWeight, colour: colour(l.weight), weight: l.weight, kind: l.kind}}));
    return {items: placed.concat(edges), counts: [placed.length, edges.length]};
  }

  const cy = cytoscape({container: container, layout: {name: "preset"}, elements: [],
    style: [
      {selector: "node", style: {"background-color": "data(colour)", width: "data(size)", height: "data(size)",
                                 label: "data(label)", "font-size": 8, "text-valign": "bottom", "text-halign": "center"}},
      {selector: "node.picked", style: {"border-width": 4, "border-color": "#f39c12"}},
      {selector: "node.focused", style: {"overlay-opacity": 0.15, "overlay-color": "#1f4e99"}},
      {selector: "edge", style: {width: "data(width)", "line-color": "data(colour)", "curve-style": "bezier",
                                 opacity: 0.6, "target-arrow-shape": "triangle", "target-arrow-color": "data(colour)"}}]});

  const hover = document.createElement("div");
  hover.className = "graph-hover";
  hover.style.cssText = "position:fixed;pointer-events:none;background:#fffbe6;border:1px solid #ccb;" +
                        "padding:2px 5px;display:none;font:12px monospace;z-index:10";
  document.body.appendChild(hover);
  function hoverText(target) {
    const d = target.data();
    if (!target.isNode()) return d.kind + " " + d.source + " → " + d.target + ": " + d.weight.toFixed(4);
    const n = byId.get(d.id);
    const parts = [n.kind === "token" ? "token " + JSON.stringify(n.text) + " @" + n.position : d.id];
    if (typeof n.score === "number") parts.push("score " + n.score.toFixed(4));
    if (typeof n.coefficient === "number") parts.push("coefficient " + n.coefficient.toFixed(3));
    if (n.kind === "answer") parts.push("p " + n.prob.toFixed(4));
    return parts.join(" · ");
  }
  cy.on("mouseover", "node, edge", e => { hover.textContent = hoverText(e.target); hover.style.display = "block"; });
  cy.on("mousemove", e => {
    hover.style.left = (e.originalEvent.clientX + 12) + "px";
    hover.style.top = (e.originalEvent.clientY + 12) + "px";
  });
  cy.on("mouseout", "node, edge", () => { hover.style.display = "none"; });
  cy.on("tap", "node", e => {
    cy.nodes().removeClass("focused"); e.target.addClass("focused");
    if (onTap) onTap(byId.get(e.target.id()));
  });

  // A node's panel as lines of text: names and numbers a reader wants, never a dump of the node's keys.
  function describe(id) {
    const n = byId.get(id), lines = [];
    const add = (label, value) => { if (value !== null && value !== undefined && value !== "") lines.push(label + ": " + value); };
    const number = (x, digits = 4) => typeof x === "number" ? (x >= 0 ? "+" : "") + x.toFixed(digits) : null;
    const tokens = list => (list || []).map(t => JSON.stringify(t)).join(" ");
    const kinds = {ffn: "FFN value neuron", attention: "attention value neuron", query: "query FFN neuron"};
    if (n.kind === "token") { lines.push("token " + JSON.stringify(n.text)); add("position", n.position); }
    else if (n.kind === "answer") {
      lines.push("answer " + JSON.stringify(n.text)); add("token id", n.token_id); add("p", n.prob.toFixed(6));
    } else {
      lines.push(kinds[n.kind] + " " + n.name);
      add("score", number(n.score)); add("switched off alone", number(n.measured_change));
      add("coefficient", number(n.coefficient, 3)); add("direct part", number(n.direct_score));
      add("answer's push rank", n.target_push_rank);
      if (n.position !== null && n.position !== undefined)
        add(n.kind === "query" ? "acts at" : "reads source position", n.position + " " + JSON.stringify(n.token));
      if (n.sink) lines.push("⚓ reads the first token, the attention sink");
      add("promotes", tokens(n.promoted_tokens)); add("suppresses", tokens(n.suppressed_tokens));
    }
    const label = other => { const m = byId.get(other); return m ? (m.name || (m.kind === "token" ? JSON.stringify(m.text) : m.kind)) : other; };
    const incoming = graph.links.filter(l => l.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight));
    const outgoing = graph.links.filter(l => l.source === id);
    if (incoming.length) lines.push("", "from:", ...incoming.slice(0, 30).map(l => "  " + label(l.source) + "  " + number(l.weight)));
    if (outgoing.length) lines.push("", "to:", ...outgoing.map(l => "  " + label(l.target) + "  " + number(l.weight)));
    return lines.join("\n");
  }

  return {
    cy: cy, node: id => byId.get(id), describe: describe,
    incoming: id => graph.links.filter(l => l.target === id).sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)),
    // Draws the top `amount` value neurons by |score| (mode "top") or those making up `amount` percent of their
    // |scores| (mode "share"); returns [nodes, links] drawn.
    draw: function (mode, amount, sinks) {
      setSinks(Boolean(sinks));
      const {items, counts} = elements(mode, amount);
      cy.resize(); cy.elements().remove(); cy.add(items); cy.fit(undefined, 30);
      return counts;
    },
    sinksHidden: () => allValues.filter(n => n.sink).length +
                       graph.nodes.filter(n => n.kind === "query" && n.sink).length,
    setPicked: function (ids) {
      cy.nodes().removeClass("picked");
      for (const id of ids) cy.getElementById(id).addClass("picked");
    },
  };
}

// The controls beside a graph: #mode (top / share), #amount, #unit, #sinks (a checkbox: draw the neurons that read
// the first token) and #graph-status, which reports what was drawn and how many sink neurons are hidden.
// `afterDraw` runs after each drawing (the explorer marks its selected neurons again).
function bindGraphControls(view, afterDraw) {
  const mode = document.getElementById("mode"), amount = document.getElementById("amount");
  const sinks = document.getElementById("sinks");
  function draw() {
    const counts = view.draw(mode.value, Number(amount.value), sinks && sinks.checked);
    if (afterDraw) afterDraw();
    const hidden = sinks && !sinks.checked ? view.sinksHidden() : 0;
    document.getElementById("graph-status").textContent = "drawn " + counts[0] + " nodes, " + counts[1] + " links" +
      (hidden ? " (" + hidden + " sink neurons hidden)" : "");
  }
  if (sinks) sinks.addEventListener("change", draw);
  mode.addEventListener("change", () => {
    const share = mode.value === "share";
    amount.value = share ? 80 : 20;
    document.getElementById("unit").textContent = share ? "% of the value neurons' |scores|" : "value neurons by |score|";
    draw();
  });
  amount.addEventListener("change", draw);
  draw();
}
