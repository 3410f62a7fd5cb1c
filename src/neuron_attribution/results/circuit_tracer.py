"""A circuit (`pipelines.circuit`, schema "neuron-attribution circuit 1") in the JSON that circuit-tracer's frontend
and Neuronpedia's graph viewer read (circuit-tracer 0.5.0, `circuit_tracer.frontend.graph_models.Model`): `metadata`,
`qParams`, `nodes` and `links`. The model's own neurons stand where circuit-tracer has transcoder features:

- an FFN neuron (l, k) at position p: node `l_k_p`, feature_type "cross layer transcoder", feature the Cantor pairing
  of (l, k) as circuit-tracer computes it, its label (`clerp`) "FFN l_k";
- an attention neuron (l, j, n) at source position s: node `l_{N + j·d_h + n}_s` (past the layer's N FFN rows, so
  ids never collide), the same feature_type, labelled "attention l_j_n @s 'token'";
- residual nodes: circuit-tracer's error nodes `0_l_p`, "mlp reconstruction error";
- tokens: `E_{token id}_p`, "embedding"; the answer: `{L+1}_{token id}_{last}`, "logit", is_target_logit.

`influence` carries the node's influence on the answer; `activation` a neuron's flow. Only data: the frontend draws.
"""

from __future__ import annotations

from typing import Any


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def circuit_tracer_graph(graph: dict[str, Any], token_ids: list[int], d_ffn: int, head_dim: int,
                         slug: str = "neuron-attribution") -> dict[str, Any]:
    """`d_ffn`, `head_dim`: the model's FFN rows per layer and head size (attention neurons are numbered past the
    FFN rows)."""
    """`graph` (a circuit) as circuit-tracer's graph JSON; `token_ids`: the prompt's, for the embedding nodes."""
    n_layers = graph["n_layers"]
    target = graph["target"]
    last = len(graph["tokens"]) - 1
    ids: dict[str, str] = {}
    taken: set[str] = set()
    nodes = []
    for node in graph["nodes"]:
        kind, layer, position = node["kind"], node["layer"], node["position"]
        common = {"ctx_idx": position, "influence": node.get("influence")}
        if kind == "ffn":
            row = node["row"]  # in the layer's flat layout (an expert's neurons after the experts before it)
            entry = {"node_id": f"{layer}_{row}_{position}", "feature": _cantor(layer, row), "layer": str(layer),
                     "feature_type": "cross layer transcoder", "clerp": f"FFN {node['neuron']}",
                     "activation": node["flow"], **common}
        elif kind == "attention":
            row = d_ffn + node["head"] * head_dim + node["dim"]
            entry = {"node_id": f"{layer}_{row}_{position}", "feature": _cantor(layer, row), "layer": str(layer),
                     "feature_type": "cross layer transcoder",
                     "clerp": f"attention {layer}_{node['head']}_{node['dim']} @{position} {node['token']!r}",
                     "activation": node["flow"], **common}
        elif kind == "residual":
            entry = {"node_id": f"0_{layer}_{position}", "feature": -1, "layer": str(layer),
                     "feature_type": "mlp reconstruction error", "clerp": node["name"], **common}
        elif kind == "token":
            entry = {"node_id": f"E_{token_ids[position]}_{position}", "feature": position, "layer": "E",
                     "feature_type": "embedding", "clerp": repr(node["text"]), **common}
        else:  # the answer
            entry = {"node_id": f"{n_layers + 1}_{target['id']}_{last}", "feature": target["id"],
                     "layer": str(n_layers + 1), "feature_type": "logit", "is_target_logit": True,
                     "token_prob": target["prob"], "clerp": f"Output {target['text']!r} (p={target['prob']:.3f})",
                     "ctx_idx": last, "influence": 1.0}
        if entry["node_id"] in taken:  # circuit-tracer's error ids can meet a layer-0 neuron's: keep both
            entry["node_id"] += "_error" if kind == "residual" else "_neuron"
        taken.add(entry["node_id"])
        entry["jsNodeId"] = entry["node_id"]
        ids[node["id"]] = entry["node_id"]
        nodes.append(entry)
    links = [{"source": ids[link["source"]], "target": ids[link["target"]], "weight": link["weight"]}
             for link in graph["links"]]
    metadata = {"slug": slug, "scan": f"neuron-attribution {graph['model']}", "transcoder_list": [],
                "prompt_tokens": graph["tokens"], "prompt": graph["prompt"],
                "node_threshold": graph["settings"]["node_threshold"], "schema_version": 1}
    q_params = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q_params, "nodes": nodes, "links": links}



def graphs_listed(listing: dict[str, Any] | None, metadata: dict[str, Any]) -> dict[str, Any]:
    """circuit-tracer's `graph-metadata.json` (the list of graphs its local server offers) with this graph's entry
    added, or put in place of an entry with the same slug."""
    graphs = [g for g in (listing or {}).get("graphs", []) if isinstance(g, dict) and g.get("slug") != metadata["slug"]]
    return {**(listing or {}), "graphs": [*graphs, metadata]}
