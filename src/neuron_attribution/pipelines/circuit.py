"""The circuit behind an answer (docs/method.md §3b): a multi-hop graph of the model's own neurons, exact by
construction. From the answer back: the top value neurons (FFN at the last position, attention neurons at their
source positions), then each node's inputs — earlier FFN neurons at the position it reads, attention neurons by
their source positions, token embeddings — with the fractions of `scoring.circuit`, down to the tokens. One node
per (neuron, position). A node passes on `flow`: a value neuron its score, any other node the sum of its outgoing
links. Its incoming links carry fraction × flow; what the drawn links leave out (the biases, the components not
drawn) goes to a residual node of its layer and position, so that at every node incoming = outgoing.

The graph is grown greedily (reverse topological order, the `per_node` strongest inputs of each node, at most
`max_nodes` neurons) and then pruned by influence on the answer as circuit-tracer prunes its graphs: with every
node's incoming weights normalised by their absolute sum, a node's influence is the sum over paths to the answer of
the products of normalised weights; neurons are kept until `node_threshold` of the total influence is covered and
links until `edge_threshold` is. Flows are recomputed on what is kept, so conservation holds exactly after pruning.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..model.forward import FAST_ATTENTION_FROM_TOKENS
from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_prompt, token_texts
from ..model.trace import Trace, trace_token_ids
from ..results.attribution import Attribution, reads_the_sink
from ..scoring.circuit import CircuitInputs, Inputs, Reader, attention_reader, ffn_reader, strongest_inputs
from ..settings import ScoringOptions
from .attribute import attribute_trace

SCHEMA = "neuron-attribution circuit 1"


@dataclass(frozen=True, order=True)
class Node:
    """A neuron at a position, a token, or the answer. `row`: an FFN neuron's row in its layer's flat layout, an
    attention neuron's head·d_h + dim; `position`: where it reads (an attention neuron: its source position)."""

    kind: str  # "ffn", "attention", "token", "answer"
    layer: int
    row: int
    position: int


@dataclass
class CircuitSettings:
    values: int = 20  # value neurons (FFN and attention, by |score|) the graph starts from
    per_node: int = 6  # strongest inputs drawn per node
    max_nodes: int = 150  # neurons expanded at most
    node_threshold: float = 0.8  # share of the total influence the kept neurons cover
    edge_threshold: float = 0.98  # share of the total influence the kept links cover


@dataclass
class Circuit:
    """Nodes, links with fractions of their target's flow, and the flows."""

    answer_total: float  # the sum of the scores of the top `values` value neurons of each kind: what reaches the answer
    fractions: dict[Node, dict[Node, float]] = field(default_factory=dict)  # target -> {source: fraction}
    scores: dict[Node, float] = field(default_factory=dict)  # value nodes -> score
    influence: dict[Node, float] = field(default_factory=dict)

    def flows(self) -> dict[Node, float]:
        """Each node's outgoing total: value nodes their score, others the sum of their links' weights."""
        flow: dict[Node, float] = defaultdict(float)
        for node, score in self.scores.items():
            flow[node] += score
        for target in sorted(self.fractions, key=_topological_key):
            for source, fraction in self.fractions[target].items():
                flow[source] += fraction * flow[target]
        return dict(flow)


def _topological_key(node: Node) -> tuple[int, int]:
    """Consumers before their inputs: higher layers first; in a layer the FFN (which reads the layer's attention
    output in a sequential block) before the attention; tokens last."""
    return (-node.layer, {"ffn": 0, "attention": 1, "token": 2}.get(node.kind, 3))


def circuit(model: LoadedModel, prompt: Prompt, target: str | int | None = None, *,
            settings: CircuitSettings | None = None, options: ScoringOptions | None = None,
            contrast: str | int | None = None) -> dict[str, Any]:
    """The circuit of `prompt` → `target` as a graph (README, "Circuits"): nodes, links, flows, influence and its
    completeness. Prompts under 64 tokens (every query's attention rows are read)."""
    settings = settings or CircuitSettings()
    ids = encode_prompt(model, prompt)
    if len(ids) >= FAST_ATTENTION_FROM_TOKENS:
        raise UserError(f"a circuit reads every position's attention rows: prompts under {FAST_ATTENTION_FROM_TOKENS} "
                        f"tokens (this one has {len(ids)})")
    options = options or ScoringOptions()
    # the value neurons the graph starts from; query neurons are the graph's own business here
    options = options.overridden(top_k=settings.values, query_top=0, measure=0, answer_tokens="first",
                                 rank_by="score" if options.rank_by == "measured" else options.rank_by)
    # one forward pass for both: the value neurons' scores and every position's internals and attention rows
    (trace,) = trace_token_ids(model, [ids], every_attention_row=True)
    result = attribute_trace(model, prompt, ids, trace, target, options, contrast=contrast)
    inputs = circuit_inputs(model, trace)
    grown = grow(inputs, result, settings)
    pruned = prune(grown, settings)
    return graph_of(model, result, pruned, settings)


def circuit_inputs(model: LoadedModel, trace: Trace) -> CircuitInputs:
    adapter = model.adapter
    return CircuitInputs(trace, trace.attention_rows,
                         [adapter.layer_weights(layer) for layer in range(model.shape.n_layers)],
                         adapter.ffn_value_stack, adapter.output_weight_stack, model.shape, model.shape.parallel,
                         adapter.ffn_activation)


def value_nodes(inputs: CircuitInputs, result: Attribution, count: int) -> dict[Node, float]:
    shape, last = inputs.shape, inputs.trace.n_tokens - 1
    ranked = sorted([*result.ffn_neurons, *result.attention_neurons], key=lambda n: -abs(n.score))[:count]
    nodes = {}
    for n in ranked:
        if hasattr(n, "neuron"):
            nodes[Node("ffn", n.layer, shape.ffn_row(n.index), last)] = n.score
        else:
            nodes[Node("attention", n.layer, n.head * shape.head_dim + n.dim, n.position)] = n.score
    return nodes


def reader_of(inputs: CircuitInputs, node: Node) -> Reader:
    if node.kind == "ffn":
        return ffn_reader(inputs, node.layer, node.row, node.position)
    head, dim = divmod(node.row, inputs.shape.head_dim)
    return attention_reader(inputs, node.layer, head, dim, node.position)


def grow(inputs: CircuitInputs, result: Attribution, settings: CircuitSettings) -> Circuit:
    """The graph before pruning: from the value nodes back, hop by hop, each node's `per_node` inputs with the
    largest fractions in magnitude (its weights are its fractions times its flow, so the order is the same) and
    its token's; at most `max_nodes` neurons, the ones fewer hops from the answer first. A hop's nodes are read
    together (`scoring.circuit.fractions`)."""
    scores = value_nodes(inputs, result, settings.values)
    grown = Circuit(sum(n.score for n in [*result.ffn_neurons, *result.attention_neurons]), scores=dict(scores))
    frontier, seen = list(scores), set(scores)
    while frontier:
        readers = [reader_of(inputs, n) for n in frontier]
        for node, found in zip(frontier, strongest_inputs(inputs, readers, settings.per_node)):
            grown.fractions[node] = _as_nodes(node, found)
        following = []
        for node in frontier:
            for source in grown.fractions[node]:
                if source in seen or (source.kind != "token" and len(seen) >= settings.max_nodes):
                    continue
                seen.add(source)
                if source.kind != "token":
                    following.append(source)
        frontier = following
    for target, sources in grown.fractions.items():
        grown.fractions[target] = {s: f for s, f in sources.items() if s in seen}
    return grown


def _as_nodes(node: Node, found: Inputs) -> dict[Node, float]:
    """The node's token and its strongest inputs as nodes, with their fractions."""
    chosen = {Node("token", -1, -1, node.position): found.token}
    for layer, row, fraction in found.ffn:
        chosen[Node("ffn", layer, row, node.position)] = fraction
    for layer, row, source, fraction in found.attention:
        chosen[Node("attention", layer, row, source)] = fraction
    return chosen


def prune(grown: Circuit, settings: CircuitSettings) -> Circuit:
    """Neurons and links kept by influence on the answer (circuit-tracer's rule); flows recomputed on them."""
    influence = _influence(grown)
    neurons = sorted((n for n in influence if n.kind in ("ffn", "attention")), key=lambda n: -influence[n])
    kept = _covering(neurons, [influence[n] for n in neurons], settings.node_threshold)
    kept |= {n for n in influence if n.kind == "token"}
    links = [(target, source) for target, sources in grown.fractions.items() for source in sources
             if target in kept and source in kept and source.kind != "token"]
    weights = [influence[t] * _normalised(grown, t, s) for t, s in links]
    # links from tokens are the graph's ground: every kept neuron keeps its token's
    kept_links = _covering(links, weights, settings.edge_threshold) | \
        {(t, s) for t, sources in grown.fractions.items() for s in sources if s.kind == "token" and t in kept}
    fractions = {t: {s: f for s, f in grown.fractions[t].items() if (t, s) in kept_links} for t in grown.fractions
                 if t in kept}
    pruned = Circuit(grown.answer_total, fractions, {n: s for n, s in grown.scores.items() if n in kept})
    return _reachable(pruned, influence)


def _reachable(circuit: Circuit, influence: dict[Node, float]) -> Circuit:
    """Only nodes with a path to the answer (a neuron whose every link was pruned leaves)."""
    alive = set(circuit.scores)
    for target in sorted(circuit.fractions, key=_topological_key):
        if target in alive:
            alive |= set(circuit.fractions[target])
    circuit.fractions = {t: s for t, s in circuit.fractions.items() if t in alive}
    circuit.influence = {n: v for n, v in influence.items() if n in alive}
    return circuit


def _normalised(circuit: Circuit, target: Node, source: Node) -> float:
    """|weight of source → target| over the absolute sum of target's incoming weights, its residual included."""
    sources = circuit.fractions.get(target, {})
    drawn = sum(abs(f) for f in sources.values())
    rest = abs(1.0 - sum(sources.values()))
    total = drawn + rest
    return abs(sources.get(source, 0.0)) / total if total else 0.0


def _influence(circuit: Circuit) -> dict[Node, float]:
    """Sum over paths to the answer of the products of normalised incoming weights."""
    answer_total = sum(abs(s) for s in circuit.scores.values()) + abs(circuit.answer_total - sum(circuit.scores.values()))
    influence: dict[Node, float] = defaultdict(float)
    for node, score in circuit.scores.items():
        influence[node] += abs(score) / answer_total if answer_total else 0.0
    for target in sorted(circuit.fractions, key=_topological_key):
        for source in circuit.fractions[target]:
            influence[source] += influence[target] * _normalised(circuit, target, source)
    return dict(influence)


def graph_scores(circuit: Circuit) -> tuple[float, float]:
    """circuit-tracer's two scores of a graph (its `compute_graph_scores`), on the kept graph with its residual
    nodes as the error nodes. Replacement: of the influence that reaches the graph's leaves, the share at tokens
    rather than residual nodes. Completeness: over the nodes with inputs (the neurons and the answer, weighted by
    their influence; the answer by 1), the share of each node's normalised input that comes from drawn nodes."""
    influence = _influence(circuit)
    scores = circuit.scores
    answer_rest = abs(circuit.answer_total - sum(scores.values()))
    answer_abs = sum(abs(v) for v in scores.values()) + answer_rest
    residual = answer_rest / answer_abs if answer_abs else 0.0
    drawn_share = {None: 1.0 - residual}  # the answer
    for target, sources in circuit.fractions.items():
        drawn = sum(abs(f) for f in sources.values())
        rest = abs(1.0 - sum(sources.values()))
        total = drawn + rest
        residual += influence.get(target, 0.0) * (rest / total if total else 0.0)
        drawn_share[target] = drawn / total if total else 1.0
    tokens = sum(v for n, v in influence.items() if n.kind == "token")
    weights = {n: (1.0 if n is None else influence.get(n, 0.0)) for n in drawn_share}
    weighted = sum(weights.values())
    return (tokens / (tokens + residual) if tokens + residual else 0.0,
            sum(drawn_share[n] * w for n, w in weights.items()) / weighted if weighted else 0.0)


def _covering(items: list, weights: list[float], threshold: float) -> set:
    """The largest-weight items whose weights make up `threshold` of their total (at least one)."""
    order = sorted(range(len(items)), key=lambda i: -weights[i])
    total, running, kept = sum(weights), 0.0, set()
    for i in order:
        if kept and running >= threshold * total:
            break
        kept.add(items[i])
        running += weights[i]
    return kept


def graph_of(model: LoadedModel, result: Attribution, circuit: Circuit, settings: CircuitSettings) -> dict[str, Any]:
    """The circuit as JSON data: nodes with flows and influence, links with weights, residual nodes."""
    shape = model.shape
    flow = circuit.flows()
    tokens = result.tokens
    n_layers = shape.n_layers
    nodes, links = [], []
    ids: dict[Node, str] = {}
    for node in sorted(flow, key=lambda n: (n.layer, n.position, n.kind, n.row)):
        node_id = _node_id(shape, node)
        ids[node] = node_id
        entry: dict[str, Any] = {"id": node_id, "kind": node.kind, "layer": node.layer, "position": node.position,
                                 "x": node.position, "flow": flow[node], "influence": circuit.influence.get(node, 0.0),
                                 "token": tokens[node.position]}
        if node.kind == "ffn":
            index = shape.ffn_index(node.layer, node.row)
            entry.update(name=f"{index}@{node.position}", neuron=str(index), row=node.row)
        elif node.kind == "attention":
            head, dim = divmod(node.row, shape.head_dim)
            entry.update(name=f"{node.layer}_{head}_{dim}@{node.position}", head=head, dim=dim,
                         sink=reads_the_sink(node.position))
        else:
            entry.update(name=repr(tokens[node.position]), text=tokens[node.position])
        if node in circuit.scores:
            entry["score"] = circuit.scores[node]
        nodes.append(entry)
    residuals: dict[str, float] = defaultdict(float)
    for target in circuit.fractions:
        for source, fraction in circuit.fractions[target].items():
            links.append({"source": ids[source], "target": ids[target], "kind": "input",
                          "weight": fraction * flow[target]})
        rest = (1.0 - sum(circuit.fractions[target].values())) * flow[target]
        residual = f"residual:{target.layer}@{target.position}"
        residuals[residual] += rest
        links.append({"source": residual, "target": ids[target], "kind": "residual", "weight": rest})
    last = len(tokens) - 1
    for node, score in circuit.scores.items():
        links.append({"source": ids[node], "target": "answer", "kind": "value", "weight": score})
    answer_rest = circuit.answer_total - sum(circuit.scores.values())
    residuals[f"residual:{n_layers}@{last}"] += answer_rest
    links.append({"source": f"residual:{n_layers}@{last}", "target": "answer", "kind": "residual",
                  "weight": answer_rest})
    for residual, total in residuals.items():
        layer, position = (int(x) for x in residual.split(":")[1].split("@"))
        nodes.append({"id": residual, "kind": "residual", "layer": layer, "position": position, "x": position,
                      "flow": total, "name": f"rest of layer {layer} @ {position}"})
    nodes.append({"id": "answer", "kind": "answer", "layer": n_layers, "position": last, "x": last,
                  "text": result.target.text, "token_id": result.target.id, "prob": result.target.prob,
                  "flow": circuit.answer_total})
    token_flow = sum(abs(n["flow"]) for n in nodes if n["kind"] == "token")
    rest_flow = sum(abs(link["weight"]) for link in links if link["kind"] == "residual")
    replacement, influence_completeness = graph_scores(circuit)
    return {"schema": SCHEMA, "prompt": result.prompt, "model": result.model, "tokens": tokens,
            "target": result.target.to_dict(), "predictions": [p.__dict__ for p in result.predictions[:5]],
            "n_layers": n_layers, "settings": settings.__dict__,
            "completeness": token_flow / (token_flow + rest_flow) if token_flow + rest_flow else 0.0,
            "replacement_score": replacement, "completeness_score": influence_completeness,
            "nodes": nodes, "links": links}


def _node_id(shape, node: Node) -> str:
    if node.kind == "token":
        return f"token:{node.position}"
    if node.kind == "ffn":
        return f"ffn:{shape.ffn_index(node.layer, node.row)}@{node.position}"
    head, dim = divmod(node.row, shape.head_dim)
    return f"attention:{node.layer}_{head}_{dim}@{node.position}"

