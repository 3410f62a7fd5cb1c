"""The multi-hop circuit (#34 item 1): one node per (neuron, position), every link's fraction equal to a float64 loop
over the definition (docs/method.md §3b), and flow conserved at every node, on tiny Llama, GPT-2, Gemma 2
(post-norms) and Mixtral."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.pipelines.circuit import CircuitSettings, circuit

from . import reference as ref
from .conftest import tiny_family, tiny_gpt2, tiny_llama

IDS = [5, 17, 3, 99, 42, 7, 250]
def _in_bfloat16(model):
    model.hf_model.to(torch.bfloat16)
    return model


MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gemma2": lambda: tiny_family("gemma2"),
          "mixtral": lambda: tiny_family("mixtral"), "mixtral-bfloat16": lambda: _in_bfloat16(tiny_family("mixtral"))}
EVERYTHING = CircuitSettings(values=8, per_node=5, max_nodes=40, node_threshold=1.0, edge_threshold=1.0)


def _attention_rows(model, ids) -> torch.Tensor:
    """(L, H, T, T): the model's own attention weights, as transformers returns them (eager attention)."""
    with torch.inference_mode():
        output = model.hf_model(torch.tensor([ids]), output_attentions=True, use_cache=False)
    return torch.stack([weights[0].float() for weights in output.attentions])


def _parse(model, node: dict) -> tuple:
    if node["kind"] == "ffn":
        return "ffn", node["layer"], model.shape.ffn_row(__import__("neuron_attribution").parse_neuron(node["neuron"]))
    return "attention", node["layer"], (node["head"], node["dim"])


def _swiglu_shares_at(model, trace, layer, row, position) -> dict[str, float]:
    keys = ref._neuron_keys(model, layer, row)
    if "gate" not in keys:
        return {name: 1.0 for name in keys}
    g = float(keys["gate"] @ ref._input_norm(model, layer, ref.ffn_base(model, trace, layer, position)))
    h = 1e-6
    slope = (ref.gate_activation(model, g + h) - ref.gate_activation(model, g - h)) / (2 * h)
    elasticity = g * slope / ref.gate_activation(model, g)
    return {"gate": elasticity / (1 + elasticity), "up": 1 / (1 + elasticity)}


def _attention_vector(model, trace, rows, layer, head, dim, source, query) -> torch.Tensor:
    """α_{query,head,source} · v_{source,kv,dim} · W_O[head, dim], behind a post-norm its frozen factor at query."""
    shape = model.shape
    w = model.adapter.layer_weights(layer)
    kv = shape.kv_head_of(head)
    vector = (rows[layer, head, query, source].double() * trace.value_states[layer, source, kv, dim].double()
              * w.output_weight[head, dim].double())
    if not ref.has_post_norms(model):
        return vector
    raw = torch.einsum("hs,shn,hnd->d", rows[layer, :, query, :].double(),
                       trace.value_states[layer][:, torch.tensor([shape.kv_head_of(h) for h in range(shape.n_heads)])]
                       .double(), w.output_weight.double())
    if w.output_bias is not None:
        raw = raw + w.output_bias.double()
    return vector * ref.post_norm_factor(model, layer, "attention", raw)


def _expected_fraction(model, trace, rows, target: dict, source: dict) -> float:
    kind, layer, which = _parse(model, target)
    p = target["position"]
    if kind == "ffn":
        own = not ref.is_parallel(model)
        keys = ref.ffn_subkeys(model, layer, which)
        shares = _swiglu_shares_at(model, trace, layer, which, p)
    else:
        own = False
        keys = {"value": ref.attention_subkey(model, layer, *which)}
        shares = {"value": 1.0}
    base = ref.residual_components_sum(trace, layer, p, own)
    if source["kind"] == "token":
        u = trace.layer_inputs[0, p].double()
    elif source["kind"] == "ffn":
        _, s_layer, s_row = _parse(model, source)
        u = ref.ffn_vector(model, trace, s_layer, s_row, p)
    else:
        _, s_layer, (head, dim) = _parse(model, source)
        u = _attention_vector(model, trace, rows, s_layer, head, dim, source["position"], p)
    return sum(shares[name] * float(u @ key) / float(base @ key) for name, key in keys.items())


@pytest.mark.parametrize("family", list(MAKERS))
def test_every_link_is_its_definition_and_flow_is_conserved(family):
    model = MAKERS[family]()
    graph = circuit(model, IDS, 11, settings=EVERYTHING)
    trace = trace_token_ids(model, [IDS])[0]
    rows = _attention_rows(model, IDS)
    nodes = {n["id"]: n for n in graph["nodes"]}
    incoming, outgoing = defaultdict(float), defaultdict(float)
    for link in graph["links"]:
        incoming[link["target"]] += link["weight"]
        outgoing[link["source"]] += link["weight"]
    neurons = [n for n in graph["nodes"] if n["kind"] in ("ffn", "attention")]
    assert len(neurons) > 8 and len({n["id"] for n in neurons}) == len(neurons)  # one node per (neuron, position)
    upstream_ffn = [n for n in neurons if n["kind"] == "ffn" and "score" not in n]
    assert upstream_ffn, "FFN neurons upstream of the value neurons"
    for node in neurons:
        scale = max(1.0, abs(node["flow"]))
        assert incoming[node["id"]] == pytest.approx(node["flow"], abs=1e-9 * scale)  # residual node included
        assert outgoing[node["id"]] == pytest.approx(node["flow"], abs=1e-9 * scale)
    assert incoming["answer"] == pytest.approx(nodes["answer"]["flow"], abs=1e-9)
    checked = 0
    for link in graph["links"]:
        if link["kind"] != "input":
            continue
        target, source = nodes[link["target"]], nodes[link["source"]]
        expected = _expected_fraction(model, trace, rows, target, source)
        assert link["weight"] / target["flow"] == pytest.approx(expected, abs=2e-5, rel=1e-4), (source, target)
        checked += 1
    assert checked > 20


def test_pruning_keeps_flow_conserved_and_paths_from_tokens_to_the_answer():
    model = tiny_llama()
    graph = circuit(model, IDS, 11)  # the default thresholds, 0.8 and 0.98
    incoming, outgoing = defaultdict(float), defaultdict(float)
    sources = defaultdict(set)
    for link in graph["links"]:
        incoming[link["target"]] += link["weight"]
        outgoing[link["source"]] += link["weight"]
        sources[link["target"]].add(link["source"])
    for node in graph["nodes"]:
        if node["kind"] in ("ffn", "attention"):
            assert incoming[node["id"]] == pytest.approx(outgoing[node["id"]], abs=1e-9)

    def longest(node_id: str) -> int:  # links on the longest path from a token to this node
        if node_id.startswith("token:"):
            return 0
        lengths = [longest(s) + 1 for s in sources[node_id] if not s.startswith("residual:")]
        return max(lengths, default=-10**6)

    assert longest("answer") >= 3
    assert 0 < graph["completeness"] <= 1
    replacement, completeness = _circuit_tracer_scores(graph)
    assert graph["replacement_score"] == pytest.approx(replacement, rel=1e-9)
    assert graph["completeness_score"] == pytest.approx(completeness, rel=1e-9)
    assert 0 < graph["replacement_score"] < 1 and 0 < graph["completeness_score"] < 1


def _circuit_tracer_scores(graph: dict) -> tuple[float, float]:
    """circuit-tracer's compute_graph_scores, as a loop over the graph's JSON: influence flows from the answer (1)
    down every link by the link's |weight| over its target's incoming |weight| (residual links included)."""
    incoming = defaultdict(float)
    for link in graph["links"]:
        incoming[link["target"]] += abs(link["weight"])
    order = sorted((n for n in graph["nodes"]), key=lambda n: (-n["layer"], n["kind"] == "attention"))
    influence = defaultdict(float, {"answer": 1.0})
    for node in order:  # consumers (higher layers; in a layer the FFN) before their inputs
        for link in graph["links"]:
            if link["target"] == node["id"]:
                influence[link["source"]] += influence[node["id"]] * abs(link["weight"]) / incoming[node["id"]]
    kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
    tokens = sum(v for k, v in influence.items() if kinds[k] == "token")
    residual = sum(v for k, v in influence.items() if kinds[k] == "residual")
    shares, weights = [], []
    for node_id, total in incoming.items():
        drawn = sum(abs(l["weight"]) for l in graph["links"]
                    if l["target"] == node_id and kinds[l["source"]] != "residual")
        shares.append(drawn / total)
        weights.append(influence[node_id])
    return tokens / (tokens + residual), sum(s * w for s, w in zip(shares, weights)) / sum(weights)


def test_the_eiffel_circuit_on_the_default_model(real_model):
    """The issue's case: "The Eiffel Tower is located in the city of" → " Paris" on SmolLM2. FFN value neurons get
    links from other neurons, paths of three links or more run from a token to the answer, no (neuron, position)
    is two nodes, and flow is conserved at every node."""
    graph = circuit(real_model, "The Eiffel Tower is located in the city of", " Paris")
    nodes = {n["id"]: n for n in graph["nodes"]}
    assert len(nodes) == len(graph["nodes"])
    sources, incoming, outgoing = defaultdict(set), defaultdict(float), defaultdict(float)
    for link in graph["links"]:
        sources[link["target"]].add(link["source"])
        incoming[link["target"]] += link["weight"]
        outgoing[link["source"]] += link["weight"]
    value_ffn = [n for n in graph["nodes"] if n["kind"] == "ffn" and "score" in n]
    fed = [n for n in value_ffn if any(s.startswith(("ffn:", "attention:")) for s in sources[n["id"]])]
    assert value_ffn and len(fed) == len(value_ffn)
    for node in graph["nodes"]:
        if node["kind"] in ("ffn", "attention"):
            assert incoming[node["id"]] == pytest.approx(outgoing[node["id"]], abs=1e-7)
    memo: dict[str, int] = {}

    def longest(node_id: str) -> int:
        if node_id.startswith("token:"):
            return 0
        if node_id not in memo:
            memo[node_id] = max([longest(s) + 1 for s in sources[node_id] if not s.startswith("residual:")],
                                default=-10**6)
        return memo[node_id]

    assert longest("answer") >= 3


def test_a_circuit_under_options_that_measure_starts_from_the_scores():
    """`attribute --rank-by measured --measure N --html FILE` hands its options to the circuit, which measures
    nothing and starts from the top value neurons by score: the same graph as with the default options."""
    from neuron_attribution.settings import ScoringOptions

    model = tiny_llama()
    plain = circuit(model, IDS, 11)
    measured = circuit(model, IDS, 11, options=ScoringOptions(rank_by="measured", measure=3))
    assert [n["id"] for n in measured["nodes"]] == [n["id"] for n in plain["nodes"]]
