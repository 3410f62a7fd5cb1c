"""An attribution as a graph (`Attribution.graph()`, `attribute --graph FILE`): the circuit behind the answer
as nodes and links, in the JSON schema of the README ("The attribution graph"). Nodes: the prompt's tokens
(x = position), attention value neurons (at their source positions), FFN value neurons and query FFN neurons
(y = layer), and the answer; links: each value neuron's score into the answer, each query neuron's share in the
value neurons it activates, each attention neuron's source token. Only data: a viewer draws it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import UserError

if TYPE_CHECKING:
    from .attribution import AttentionNeuron, Attribution, FfnNeuron

SCHEMA = "neuron-attribution graph 1"
DEFAULT_TOP = 20


def attribution_graph(result: Attribution, top: int | None = DEFAULT_TOP, share: float | None = None,
                      sinks: bool = False) -> dict[str, Any]:
    """The graph of the value neurons that matter most: the `top` by |score| (FFN and attention ranked
    together), or, with `share`, the fewest whose |scores| make up that share of all the returned value
    neurons' |scores|; and the query neurons linked to them (as many, by |score|). Neurons that read the first
    token (`sink`) are left out unless `sinks`; `sinks_hidden` counts them."""
    hidden = 0 if sinks else sum(1 for n in [*result.attention_neurons, *result.query_neurons] if n.sink)
    if not sinks:
        result = _without_sinks(result)
    values = _chosen_values(result, top, share)
    last = len(result.tokens) - 1
    n_layers = len(result.layers.ffn)
    nodes = [{"id": f"token:{p}", "kind": "token", "position": p, "x": p, "layer": -1, "text": text}
             for p, text in enumerate(result.tokens)]
    links = []
    chosen_ids = {}
    for neuron in values:
        node = _value_node(neuron, last)
        chosen_ids[node["name"]] = node["id"]
        nodes.append(node)
        links.append({"source": node["id"], "target": "answer", "kind": "value", "weight": neuron.score})
        if node["kind"] == "attention":
            links.append({"source": f"token:{neuron.position}", "target": node["id"], "kind": "source",
                          "weight": neuron.score})
    queries = _chosen_queries(result, set(chosen_ids), len(values))
    for q in queries:
        name = str(q.index)
        nodes.append({"id": f"query:{name}", "kind": "query", "name": name, "layer": q.layer, "neuron": q.neuron,
                      "expert": q.expert,
                      "x": last if q.position is None else q.position, "score": q.score,
                      "position": q.position, "token": q.token, "coefficient": q.coefficient, "sink": q.sink})
    names = {str(q.index) for q in queries}
    links += [{"source": f"query:{link.query}", "target": chosen_ids[link.value], "kind": "query",
               "weight": link.share}
              for link in result.query_links if link.query in names and link.value in chosen_ids]
    nodes.append({"id": "answer", "kind": "answer", "text": result.target.text, "token_id": result.target.id,
                  "prob": result.target.prob, "layer": n_layers, "x": last})
    return {"schema": SCHEMA, "prompt": result.prompt, "model": result.model, "tokens": result.tokens,
            "target": result.target.to_dict(), "measure": _measure(result), "query_via": result.query_via,
            "n_layers": n_layers, "nodes": nodes, "links": links, "sinks_hidden": hidden}


def _without_sinks(result: Attribution) -> Attribution:
    from dataclasses import replace

    return replace(result, attention_neurons=[n for n in result.attention_neurons if not n.sink],
                   query_neurons=[q for q in result.query_neurons if not q.sink])


def _chosen_values(result: Attribution, top: int | None, share: float | None) -> list[FfnNeuron | AttentionNeuron]:
    if (top is None) == (share is None):
        raise UserError("give the graph either a number of value neurons (top) or a share of their scores")
    if top is not None and top < 1:
        raise UserError(f"the graph's top must be a positive number, got {top}")
    if share is not None and not 0 < share <= 1:
        raise UserError(f"the graph's share must be in (0, 1], got {share}")
    ranked = sorted([*result.ffn_neurons, *result.attention_neurons], key=lambda n: -abs(n.score))
    if top is not None:
        return ranked[:top]
    total, running, chosen = sum(abs(n.score) for n in ranked), 0.0, []
    for neuron in ranked:
        if chosen and running >= share * total:
            break
        chosen.append(neuron)
        running += abs(neuron.score)
    return chosen


def _value_node(neuron: FfnNeuron | AttentionNeuron, last: int) -> dict[str, Any]:
    common = {"layer": neuron.layer, "score": neuron.score, "measured_change": neuron.measured_change,
              "coefficient": neuron.coefficient,
              "direct_score": neuron.direct_score, "target_push_rank": neuron.target_push_rank,
              "promoted_tokens": neuron.promoted_tokens[:10], "suppressed_tokens": neuron.suppressed_tokens[:10]}
    if neuron.token_scores is not None:
        common["token_scores"] = neuron.token_scores
    if hasattr(neuron, "neuron"):
        name = str(neuron.index)
        return {"id": f"ffn:{name}", "kind": "ffn", "name": name, "neuron": neuron.neuron, "expert": neuron.expert,
                "x": last, **common}
    name = f"{neuron.layer}_{neuron.head}_{neuron.dim}@{neuron.position}"
    return {"id": f"attention:{name}", "kind": "attention", "name": name, "head": neuron.head, "dim": neuron.dim,
            "position": neuron.position, "token": neuron.token, "x": neuron.position, "sink": neuron.sink, **common}


def _chosen_queries(result: Attribution, values: set[str], count: int):
    linked = {link.query for link in result.query_links if link.value in values}
    ranked = sorted((q for q in result.query_neurons if str(q.index) in linked),
                    key=lambda q: -abs(q.score))
    return ranked[:count]


def _measure(result: Attribution) -> str:
    if result.target.contrast is not None:
        return "increase of log p(target) − log p(contrast)"
    return "log-probability increase"
