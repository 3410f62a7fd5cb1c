"""Query neurons and query layers (docs/method.md §3) against loops over the definitions."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import UserError, attribute, interpret_query_neuron, split_queries
from neuron_attribution import AttentionNeuron
from neuron_attribution.pipelines.queries import query_scores
from neuron_attribution.scoring import query
from neuron_attribution.model.trace import trace_token_ids

from . import reference as ref


def _as_tuples(result, k, shape=None):
    """Value neurons as tuples; FFN neurons by their row in the layer's flat layout (`shape`: a mixture's)."""
    attention = [(n.layer, n.head, n.dim, n.position, n.score) for n in result.attention_neurons[:k]]
    ffn = [(n.layer, n.neuron if shape is None else shape.ffn_row(n.index), n.score) for n in result.ffn_neurons[:k]]
    return attention, ffn


def _check_against_reference(model, ids, target, k, atol, via="both", layers=True, weights_from=None):
    """Every FFN neuron's query score through the chosen path against the loops of tests/reference.py over the
    model's activations and the weights of `weights_from` (default: its own) (and, with `layers`, the query
    layers, whose reference assumes the residual is exactly the sum of its parts)."""
    result = attribute(model, ids, target, top_k=10_000, query_top=k, query_via=via)
    assert result.query_via == via and result.to_dict()["query_via"] == via
    trace = trace_token_ids(model, [ids])[0]
    attention, ffn = _as_tuples(result, k, model.shape)
    weights = weights_from or model
    parts = ref.query_ffn(weights, trace, attention if via != "ffn" else [], ffn if via != "attention" else [])
    total = sum(parts.values())
    by_neuron = {(q.layer, model.shape.ffn_row(q.index)): q for q in result.query_neurons}
    assert len(by_neuron) == model.shape.n_layers * model.shape.d_ffn  # top_k covers every FFN neuron here
    gated = "gate" in model.adapter.layer_weights(0).ffn_subkeys
    for (layer, neuron), q in by_neuron.items():
        assert q.score == pytest.approx(float(total[layer, neuron]), abs=atol)
        if via == "ffn":
            assert q.attention_score is None
        else:
            assert q.attention_score == pytest.approx(float(parts["value"][layer, neuron]), abs=atol)
        if via == "attention":
            assert q.ffn_score is None and q.gate_score is None and q.up_score is None
        elif gated:
            assert q.gate_score == pytest.approx(float(parts["gate"][layer, neuron]), abs=atol)
            assert q.up_score == pytest.approx(float(parts["up"][layer, neuron]), abs=atol)
        else:
            assert q.gate_score is None and q.up_score is None
    row = result.to_dict()["query_neurons"][0]
    if not gated or via == "attention":  # keys of parts that do not exist are left out, not nulled
        assert "gate_score" not in row
    assert ("ffn_score" in row) == (via != "attention") and ("attention_score" in row) == (via != "ffn")
    scores = [q.score for q in result.query_neurons]
    assert scores == sorted(scores, reverse=True)
    if not layers:
        return result
    expected_layers = ref.query_layers(weights, trace, attention, ffn)
    for kind, taken in (("for_ffn", via != "attention"), ("for_attention", via != "ffn")):
        rows = getattr(result.query_layers, kind)
        assert len(rows) == (1 + 2 * model.shape.n_layers if taken else 0)
        for row in rows:
            # a ratio of sums of float32 dot products: a relative error where the parts are large (OLMo)
            assert row.score == pytest.approx(expected_layers.get((kind, row.component, row.layer), 0.0), abs=atol,
                                              rel=2e-5)
    return result


@pytest.mark.parametrize("via", ["attention", "ffn", "both"])
def test_query_scores_match_definition_tiny(tiny_model, token_batches, via):
    for ids in token_batches[:2]:
        _check_against_reference(tiny_model, ids, 11, k=8, atol=1e-5, via=via)


def test_query_layers_sum_to_value_scores_once(tiny_model, token_batches):
    """Every share of one value neuron, over all components and (SwiGLU) both subkeys, adds up to its score
    exactly once: the gate/up split by elasticity hands it out once, not once per subkey."""
    result = attribute(tiny_model, token_batches[0], 11, top_k=50, query_top=6, query_via="both")
    attention_total = sum(r.score for r in result.query_layers.for_attention)
    assert attention_total == pytest.approx(sum(n.score for n in result.attention_neurons[:6]), abs=1e-5)
    ffn_total = sum(r.score for r in result.query_layers.for_ffn)
    assert ffn_total == pytest.approx(sum(n.score for n in result.ffn_neurons[:6]), abs=1e-5)
    if "gate" in tiny_model.adapter.layer_weights(0).ffn_subkeys:
        gate = sum(r.gate_score for r in result.query_layers.for_ffn)
        up = sum(r.up_score for r in result.query_layers.for_ffn)
        assert gate + up == pytest.approx(ffn_total, abs=1e-5) and abs(gate) > 1e-3 and abs(up) > 1e-3


def test_query_path_changes_the_stored_ranking(tiny_model, token_batches):
    """The stored top-k is ranked by the chosen path: not one list re-labelled."""
    ids = token_batches[1]
    rankings = {via: [(q.layer, q.neuron) for q in attribute(tiny_model, ids, 11, top_k=10, query_top=8,
                                                             query_via=via).query_neurons]
                for via in ("attention", "ffn", "both")}
    assert len({tuple(r) for r in rankings.values()}) == 3


def test_swiglu_split_is_the_elasticity_split():
    """SiLU: e_gate = 1 + g(1 − σ(g)); the split's weights add up to 1; an undefined split is NaN."""
    silu = torch.nn.SiLU()
    values = [-3.0, -0.5, 0.3, 2.0, 7.0]
    gate, up = query.swiglu_split(silu, torch.tensor(values))
    for g, w_gate, w_up in zip(values, gate.tolist(), up.tolist()):
        sigma = 1 / (1 + torch.exp(torch.tensor(-g, dtype=torch.float64)))
        elasticity = 1 + g * (1 - float(sigma))
        assert w_gate == pytest.approx(elasticity / (1 + elasticity), rel=1e-6)
        assert w_gate + w_up == pytest.approx(1.0)
    # e_gate = -1 near g = -2.2: the two paths cancel; SiLU(0) = 0: no relative change to split.
    root = torch.linspace(-2.5, -2.0, 200001, dtype=torch.float64)
    near = root[(1 + root * (1 - torch.sigmoid(root)) + 1).abs().argmin()]
    gate, up = query.swiglu_split(silu, torch.stack([torch.tensor(0.0, dtype=torch.float64), near]))
    assert bool(gate.isnan().all()) and bool(up.isnan().all())


def test_gqa_uses_the_kv_head_the_query_head_reads(token_batches):
    """Heads 1 and 3 of the tiny Llama read KV heads 0 and 1: a mapping by head index would be wrong."""
    from .conftest import tiny_llama

    model = tiny_llama()
    ids = token_batches[1]
    trace = trace_token_ids(model, [ids])[0]
    neurons = [(2, 1, 3, 4, 0.7), (2, 3, 5, 2, -0.4), (1, 1, 0, 6, 0.3)]
    attention = [AttentionNeuron(l, h, d, p, "", s, 0.0) for l, h, d, p, s in neurons]
    scores = query_scores(model, trace, [], attention)
    right = ref.query_ffn(model, trace, neurons, [])["value"]
    wrong = ref.query_ffn(model, trace, neurons, [], kv_head_of=lambda head: head % model.shape.n_kv_heads)
    assert torch.allclose(scores.attention.double(), right, atol=1e-6)
    assert not torch.allclose(scores.attention.double(), wrong["value"], atol=1e-3)


def test_near_zero_denominator_is_skipped_and_reported():
    key = torch.tensor([1.0, 0.0, 0.0])
    orthogonal = query.SubkeyReading("value", 1, 0, key, torch.tensor([0.0, 2.0, 1.0]), 0.5, False, "attention x")
    fine = query.SubkeyReading("value", 1, 0, key, torch.tensor([0.3, 2.0, 1.0]), 0.5, False, "attention y")
    kept, skipped = query.usable([orthogonal, fine])
    assert kept == [fine] and skipped == ["attention x"]


def test_query_top_bad_zero_and_clamped(tiny_model, token_batches):
    for bad in (-1, 1.5, True):
        with pytest.raises(UserError, match="query_top"):
            attribute(tiny_model, token_batches[0], 3, query_top=bad)
    full, skipped = (attribute(tiny_model, token_batches[0], 3, top_k=5, query_top=q) for q in (30, 0))
    assert skipped.query_neurons == [] and skipped.query_layers.for_ffn == skipped.query_layers.for_attention == []
    assert skipped.ffn_neurons == full.ffn_neurons and full.query_neurons  # value neurons unchanged
    result = attribute(tiny_model, token_batches[2], 3, top_k=5, query_top=10**6)  # clamped to every neuron
    assert len(result.query_neurons) == 5


def test_query_value_split(tiny_model, token_batches):
    result = attribute(tiny_model, token_batches[1], 3, top_k=20)
    split = split_queries(result, tiny_model.shape.n_layers)
    values = {(n.layer, n.neuron) for n in result.ffn_neurons}
    assert set(split.query_value) == {(q.layer, q.neuron) for q in result.query_neurons} & values
    assert len(split.query_only) + len(split.query_value) == 20
    assert sum(split.query_only_per_layer) == len(split.query_only)


def test_interpret_query_neuron_through_head(tiny_model):
    s = tiny_model.shape
    w_in = tiny_model.adapter.layer_weights(0)
    w = tiny_model.adapter.layer_weights(2)
    vector = w_in.ffn_values[5].double()
    norm = w.attention_norm
    if norm.kind == "layernorm":
        normed = torch.nn.functional.layer_norm(vector, vector.shape, norm.weight.double(), None, norm.eps)
    else:
        normed = vector / (vector.pow(2).mean() + norm.eps).sqrt() * norm.weight.double()
    head = 3
    carried = (w.value_weight[head // (s.n_heads // s.n_kv_heads)].double() @ normed) @ w.output_weight[head].double()
    final = tiny_model.adapter.final_norm()
    if final.kind == "layernorm":
        carried = carried - carried.mean()
    logits = tiny_model.adapter.unembedding[0].double() @ (final.weight.double() * carried)
    projection = interpret_query_neuron(tiny_model, 0, 5, 2, head, k=4)
    assert projection.top_ids == logits.topk(4).indices.tolist()
    with pytest.raises(UserError):
        interpret_query_neuron(tiny_model, 0, 5, 2, 99)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["attention", "both"])
def test_query_scores_match_definition_real_model(real_model, via):
    """The paper's query neurons (through the top-30 attention value neurons) on SmolLM2: the top-50 and their
    scores against a loop over the definition; "both" adds the FFN path with its gate/up split."""
    from neuron_attribution import attribute as run

    prompt = "The capital of France is"
    ids = real_model.tokenizer(prompt)["input_ids"]
    result = run(real_model, prompt, " Paris", top_k=100, query_via=via)
    trace = trace_token_ids(real_model, [ids])[0]
    attention, ffn = _as_tuples(result, 30)
    parts = _vectorised_reference(real_model, trace, attention, ffn if via == "both" else [])
    total = sum(parts.values())
    for q in result.query_neurons[:50]:
        assert q.score == pytest.approx(float(total[q.layer, q.neuron]), abs=1e-4)
        if via == "both":
            assert q.gate_score == pytest.approx(float(parts["gate"][q.layer, q.neuron]), abs=1e-4)
    flat = total.reshape(-1)
    expected = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:50]
    got = [q.layer * real_model.shape.d_ffn + q.neuron for q in result.query_neurons[:50]]
    assert got == expected


def _vectorised_reference(model, trace, attention, ffn):
    """ref.query_ffn with the innermost neuron loop vectorised (the real model has 46k FFN neurons)."""
    shape = model.shape
    parts = {}
    last = trace.n_tokens - 1
    readings = [("value", l, p, ref.attention_subkey(model, l, h, d), trace.layer_inputs[l, p].double(), s)
                for l, h, d, p, s in attention]
    for l, k, s in ffn:
        middle = trace.layer_inputs[l, last].double() + trace.attention_outputs[l, last].double()
        shares = ref.swiglu_shares(model, trace, l, k)
        readings += [(name, l, last, key, middle, s * shares[name])
                     for name, key in ref.ffn_subkeys(model, l, k).items()]
    for name, layer, position, key, h, score in readings:
        total = parts.setdefault(name, torch.zeros(shape.n_layers, shape.d_ffn, dtype=torch.float64))
        for i in range(layer):
            values = model.adapter.layer_weights(i).ffn_values.double()
            total[i] += trace.ffn_coefficients[i, position].double() * (values @ key) / float(h @ key) * score
    return parts


def test_query_neurons_carry_where_they_act_and_their_sign(tiny_model, token_batches):
    """#26 item 6: each query neuron names the position that holds the largest part of its score (an attention
    value neuron's source position, or the last one for the FFN path) and its coefficient there; with that
    coefficient, interpret_query_neuron reads the end of the projection the neuron actually writes."""
    ids, k = token_batches[1], 6
    result = attribute(tiny_model, ids, 11, top_k=10_000, query_top=k, query_via="both")
    trace = trace_token_ids(tiny_model, [ids])[0]
    attention, ffn = _as_tuples(result, k)
    last = trace.n_tokens - 1
    by_position = {}  # the reference loops, one source position at a time
    for position in sorted({a[3] for a in attention} | {last}):
        parts = ref.query_ffn(tiny_model, trace, [a for a in attention if a[3] == position],
                              ffn if position == last else [])
        by_position[position] = sum(parts.values())
    tokens = result.tokens
    for q in result.query_neurons[:40]:
        shares = {p: abs(float(t[q.layer, q.neuron])) for p, t in by_position.items()}
        best = max(shares.values())
        assert shares[q.position] == pytest.approx(best, abs=1e-6)
        assert q.token == tokens[q.position]
        assert q.coefficient == pytest.approx(float(trace.ffn_coefficients[q.layer, q.position, q.neuron]), abs=1e-6)
    assert len({q.position for q in result.query_neurons}) > 1  # the tiny prompt spreads them over positions
    assert "position" in result.to_dict()["query_neurons"][0]
    q = next(q for q in result.query_neurons if q.coefficient < 0 and q.layer < tiny_model.shape.n_layers - 1)
    plain = interpret_query_neuron(tiny_model, q.layer, q.neuron, q.layer + 1, 0, k=3)
    signed = interpret_query_neuron(tiny_model, q.layer, q.neuron, q.layer + 1, 0, k=3, coefficient=q.coefficient)
    assert signed.top_ids == plain.bottom_ids and signed.bottom_ids == plain.top_ids


@pytest.mark.parametrize("via", ["attention", "ffn", "both"])
def test_query_links_are_each_value_neurons_share(via):
    """Every link (query neuron → value neuron) against the reference loop run on that value neuron alone; a
    query neuron's links add up to its score."""
    from .conftest import tiny_llama

    model, ids, target, k = tiny_llama(), [5, 17, 3, 99, 42, 7], 11, 4
    result = attribute(model, ids, target, top_k=6, query_top=k, query_via=via)
    trace = trace_token_ids(model, [ids])[0]
    attention, ffn = _as_tuples(result, k)
    links = {(link.query, link.value): link.share for link in result.query_links}
    assert links and len(result.query_links) == len(links)
    expected = {}
    for neuron in (attention if via != "ffn" else []):
        shares = sum(ref.query_ffn(model, trace, [neuron], []).values())
        expected[f"{neuron[0]}_{neuron[1]}_{neuron[2]}@{neuron[3]}"] = shares
    for neuron in (ffn if via != "attention" else []):
        expected[f"{neuron[0]}_{neuron[1]}"] = sum(ref.query_ffn(model, trace, [], [neuron]).values())
    for q in result.query_neurons:
        name = f"{q.layer}_{q.neuron}"
        for value, shares in expected.items():
            assert links.get((name, value), 0.0) == pytest.approx(float(shares[q.layer, q.neuron]), abs=1e-5)
        assert sum(s for (query, _), s in links.items() if query == name) == pytest.approx(q.score, abs=1e-5)
