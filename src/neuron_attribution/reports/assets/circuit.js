"use strict";
// Draws a circuit (the "neuron-attribution circuit 1" JSON of `attribute --graph`) with Cytoscape.js: layers up
// the page (an axis with their numbers on the left; layers without a node take no row), positions across it (the prompt's tokens at the bottom), the
// answer on top. Node size by |flow|, link width by |weight|, colour by sign; residual nodes and sink neurons
// (reading the first token) only when asked. Hovering a node highlights its links; "strongest path" marks the path
// from a token to the answer whose links carry the largest product of fractions (each link's weight over its
// target's total incoming |weight|): the share of the answer the path explains. Texts only ever become labels or
// textContent, never markup.
function CircuitView(container, graph, onTap) {
  const byId = new Map(graph.nodes.map(n => [n.id, n]));
  const maxWeight = Math.max(1e-12, ...graph.links.map(l => Math.abs(l.weight)));
  const maxFlow = Math.max(1e-12, ...graph.nodes.filter(n => n.kind === "ffn" || n.kind === "attention")
                                             .map(n => Math.abs(n.flow)));
  const colour = x => x >= 0 ? "#2f7d32" : "#c0392b";
  const yStep = 40;
  // one row per layer that holds a node (tokens below, the answer above), so that a few deep layers stay readable
  const rows = [...new Set(graph.nodes.map(n => n.kind === "token" ? -1 : n.layer))].sort((a, b) => a - b);
  const y = layer => -yStep * rows.indexOf(layer);
  const labelOf = n => n.kind === "token" ? n.text : n.kind === "answer" ? "→ " + n.text : n.kind === "residual" ? "rest" : n.name;
  // room for a label: about 5 units a character at the 8-unit font, so that labels side by side never overlap
  const room = n => Math.max(24, 5.2 * String(labelOf(n)).length + 6);
  function visible(options) {
    return n => (options.residuals || n.kind !== "residual") && (options.sinks || !n.sink);
  }
  function elements(options) {
    const nodes = graph.nodes.filter(visible(options));
    const shown = new Set(nodes.map(n => n.id));
    const links = graph.links.filter(l => shown.has(l.source) && shown.has(l.target));
    // a cell per (position, layer row), its nodes side by side; each position's column as wide as its widest cell
    const cells = new Map();
    for (const n of nodes) {
      const key = n.x + ":" + (n.kind === "token" ? -1 : n.layer);
      if (!cells.has(key)) cells.set(key, []);
      cells.get(key).push(n);
    }
    const width = new Map();
    for (const cell of cells.values()) {
      const x = cell[0].x, needed = cell.reduce((sum, n) => sum + room(n), 0);
      width.set(x, Math.max(width.get(x) || 60, needed));
    }
    const start = new Map();
    let left = 0;
    for (let x = 0; x < graph.tokens.length; x++) { start.set(x, left); left += (width.get(x) || 60) + 12; }
    const where = new Map();
    for (const cell of cells.values()) {
      const x = cell[0].x, used = cell.reduce((sum, n) => sum + room(n), 0);
      let at = start.get(x) + ((width.get(x) || 60) - used) / 2;
      for (const n of cell) {
        where.set(n.id, {x: at + room(n) / 2, y: y(n.kind === "token" ? -1 : n.layer)});
        at += room(n);
      }
    }
    const items = nodes.map(n => ({group: "nodes", position: where.get(n.id), data: {
      id: n.id, kind: n.kind, label: labelOf(n),
      size: n.kind === "ffn" || n.kind === "attention" ? 7 + 13 * Math.min(1, Math.abs(n.flow) / maxFlow) : 12,
      colour: n.kind === "token" ? "#777" : n.kind === "answer" ? "#1f4e99" : n.kind === "residual" ? "#bbb" :
        n.kind === "attention" ? "#e67e22" : "#16a085"}}));
    // the layer axis, left of position 0: every row's layer (the rows skip layers that hold no node)
    for (const layer of rows) {
      items.push({group: "nodes", position: {x: -40, y: y(layer)}, selectable: false, grabbable: false,
                  data: {id: "axis:" + layer, kind: "axis", size: 1, colour: "#fff",
                         label: layer === graph.n_layers ? "out" : layer < 0 ? "tokens" : "layer " + layer}});
    }
    links.forEach((l, i) => items.push({group: "edges", data: {id: "c" + i, source: l.source, target: l.target,
      weight: l.weight, width: 0.4 + 6 * Math.abs(l.weight) / maxWeight,
      colour: l.kind === "residual" ? "#ccc" : colour(l.weight)}}));
    return {items, counts: [nodes.length, links.length]};
  }

  const cy = cytoscape({container: container, layout: {name: "preset"}, elements: [], style: [
    {selector: "node", style: {"background-color": "data(colour)", width: "data(size)", height: "data(size)",
                               label: "data(label)", "font-size": 8, "text-valign": "bottom", "text-halign": "center",
                               "min-zoomed-font-size": 6}},
    {selector: "node[kind = 'axis']", style: {"font-size": 10, color: "#555", "text-valign": "center",
                                              "text-halign": "left"}},
    {selector: "edge", style: {width: "data(width)", "line-color": "data(colour)", "target-arrow-color": "data(colour)",
                               "target-arrow-shape": "triangle", "curve-style": "bezier", opacity: 0.6}},
    {selector: ".dim", style: {opacity: 0.12}},
    {selector: "edge.lit", style: {opacity: 1, "z-index": 9}},
    {selector: ".path", style: {"border-width": 3, "border-color": "#f1c40f", "line-color": "#f1c40f",
                                "target-arrow-color": "#f1c40f", opacity: 1, "z-index": 10}}]});
  cy.on("mouseover", "node", e => {
    const lit = e.target.connectedEdges();
    cy.elements().addClass("dim"); lit.removeClass("dim").addClass("lit"); lit.connectedNodes().removeClass("dim");
  });
  cy.on("mouseout", "node", () => cy.elements().removeClass("dim lit"));
  cy.on("tap", "node", e => { if (e.target.data("kind") !== "axis" && onTap) onTap(byId.get(e.target.id())); });

  function strongestPath() {
    const incoming = new Map();
    for (const l of graph.links) incoming.set(l.target, (incoming.get(l.target) || 0) + Math.abs(l.weight));
    const best = new Map([["answer", {value: 1, next: null}]]);
    const order = graph.nodes.filter(n => n.kind !== "residual" && n.kind !== "answer")
                             .sort((a, b) => (b.kind === "token" ? -1 : b.layer) - (a.kind === "token" ? -1 : a.layer));
    for (const n of order) {
      for (const l of graph.links.filter(l => l.source === n.id && best.has(l.target))) {
        const value = best.get(l.target).value * Math.abs(l.weight) / incoming.get(l.target);
        if (!best.has(n.id) || value > best.get(n.id).value) best.set(n.id, {value: value, next: l.target});
      }
    }
    const tokens = graph.nodes.filter(n => n.kind === "token" && best.has(n.id));
    if (!tokens.length) return {ids: [], value: 0};
    let at = tokens.reduce((a, b) => best.get(a.id).value >= best.get(b.id).value ? a : b).id;
    const ids = [at], value = best.get(at).value;
    while (best.get(at).next) { ids.push(best.get(at).next); at = best.get(at).next; }
    return {ids, value};
  }

  return {
    cy, node: id => byId.get(id), strongestPath,
    draw(options) {
      const {items, counts} = elements(options);
      cy.elements().remove(); cy.add(items); cy.fit(undefined, 25);
      return counts;
    },
    markPath(ids) {
      cy.elements().removeClass("path");
      ids.forEach((id, i) => {
        cy.getElementById(id).addClass("path");
        if (i + 1 < ids.length) cy.edges().filter(e => e.source().id() === id && e.target().id() === ids[i + 1]).addClass("path");
      });
    },
  };
}
