"""Faithfulness beside every score (#34 item 2): each measured_change equals switching that neuron or head off in a
copy of the model's weights (or, for a position-specific attention neuron, zeroing its value at that position with
a hook of this test's own), computed independently here."""

from __future__ import annotations

import copy

import pytest
import torch

from neuron_attribution import UserError, attribute
from neuron_attribution.results.attribution import Attribution
from neuron_attribution.results.layout import attribution_tables

from .conftest import tiny_gpt2, tiny_llama

IDS = [5, 17, 3, 99, 42, 7, 250]
TARGET = 11


def _log_prob(hf_model, ids: list[int], target: int, contrast: int | None = None) -> float:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, -1].double()
    log_probs = torch.log_softmax(logits, -1)
    return float(log_probs[target] - (0.0 if contrast is None else log_probs[contrast]))


def _ffn_off_in_weights(model, layer: int, neuron: int):
    twin = copy.deepcopy(model.hf_model)
    with torch.no_grad():
        if model.shape.family == "gpt2":
            twin.transformer.h[layer].mlp.c_proj.weight[neuron, :] = 0  # Conv1D: the neuron's output row
        else:
            twin.model.layers[layer].mlp.down_proj.weight[:, neuron] = 0  # the neuron's output column
    return twin


def _head_off_in_weights(model, layer: int, head: int):
    twin = copy.deepcopy(model.hf_model)
    d_h = model.shape.head_dim
    with torch.no_grad():
        if model.shape.family == "gpt2":
            twin.transformer.h[layer].attn.c_proj.weight[head * d_h:(head + 1) * d_h, :] = 0
        else:
            twin.model.layers[layer].self_attn.o_proj.weight[:, head * d_h:(head + 1) * d_h] = 0
    return twin


def _value_zeroed_at(model, layer: int, head: int, dim: int, position: int):
    """GPT-2 has one value head per query head: zeroing the value state v[position, head, dim] in c_attn's output
    removes exactly the neuron's contribution at every query."""
    d, d_h = model.shape.d_model, model.shape.head_dim

    def hook(module, args, output):
        output = output.clone()
        output[:, position, 2 * d + head * d_h + dim] = 0
        return output
    return model.hf_model.transformer.h[layer].attn.c_attn.register_forward_hook(hook)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_every_measured_change_equals_an_independent_ablation(make):
    model = make()
    result = attribute(model, IDS, TARGET, top_k=12, measure=4)
    before = _log_prob(model.hf_model, IDS, TARGET)
    for n in result.ffn_neurons[:4]:
        expected = _log_prob(_ffn_off_in_weights(model, n.layer, n.neuron), IDS, TARGET) - before
        assert n.measured_change == pytest.approx(expected, abs=2e-5), n
    for h in result.heads[:4]:
        expected = _log_prob(_head_off_in_weights(model, h.layer, h.head), IDS, TARGET) - before
        assert h.measured_change == pytest.approx(expected, abs=2e-5), h
    assert all(n.measured_change is None for n in result.ffn_neurons[4:] + result.attention_neurons[4:])
    assert any(abs(n.measured_change) > 1e-3 for n in result.ffn_neurons[:4] + result.heads[:4])
    if model.shape.family == "gpt2":
        for n in result.attention_neurons[:4]:
            handle = _value_zeroed_at(model, n.layer, n.head, n.dim, n.position)
            try:
                expected = _log_prob(model.hf_model, IDS, TARGET) - before
            finally:
                handle.remove()
            assert n.measured_change == pytest.approx(expected, abs=2e-5), n
    assert result.measured_top == 4 and result.measured_together is not None
    if model.shape.family == "gpt2":  # all the measured value neurons together: one weight copy and the hooks
        twin = copy.deepcopy(model.hf_model)
        with torch.no_grad():
            for n in result.ffn_neurons[:4]:
                twin.transformer.h[n.layer].mlp.c_proj.weight[n.neuron, :] = 0
        original, model.hf_model = model.hf_model, twin
        handles = [_value_zeroed_at(model, n.layer, n.head, n.dim, n.position) for n in result.attention_neurons[:4]]
        try:
            expected = _log_prob(twin, IDS, TARGET) - before
        finally:
            for handle in handles:
                handle.remove()
            model.hf_model = original
        assert result.measured_together == pytest.approx(expected, abs=2e-5)


def test_measured_changes_with_a_contrast_and_in_every_output():
    model = tiny_llama()
    result = attribute(model, IDS, TARGET, contrast=12, top_k=6, measure=2)
    n = result.ffn_neurons[0]
    twin = _ffn_off_in_weights(model, n.layer, n.neuron)
    expected = _log_prob(twin, IDS, TARGET, 12) - _log_prob(model.hf_model, IDS, TARGET, 12)
    assert n.measured_change == pytest.approx(expected, abs=2e-5)
    data = result.to_dict()
    assert data["ffn_neurons"][0]["measured_change"] == n.measured_change
    assert "measured_change" not in data["ffn_neurons"][3] and data["measured_top"] == 2
    assert "measured_change" in data["heads"][0] and "measured_change" not in data["heads"][5]
    again = Attribution.from_dict(data)
    assert again.ffn_neurons[0].measured_change == n.measured_change and again.measured_together == \
        result.measured_together
    tables = {t.title.split(" (")[0]: t for t in attribution_tables(result, 4)}
    ffn = tables["Top FFN value neurons"]
    column = [c.name for c in ffn.columns].index("off alone")
    assert ffn.rows[0][column] == f"{n.measured_change:+.4f}" and ffn.rows[3][column] == ""
    assert "switched off alone" in ffn.caption and "log p(target) − log p(contrast)" in ffn.caption


def test_rank_by_measured_reranks_the_measured_top():
    model = tiny_llama()
    scored = attribute(model, IDS, TARGET, top_k=10, measure=5)
    ranked = attribute(model, IDS, TARGET, top_k=10, measure=5, rank_by="measured")
    for kind in ("ffn_neurons", "attention_neurons", "heads"):
        top = getattr(ranked, kind)[:5]
        assert [x.measured_change for x in top] == sorted(x.measured_change for x in top)
        assert {str(x.index) for x in top} == {str(x.index) for x in getattr(scored, kind)[:5]}
        assert [str(x.index) for x in getattr(ranked, kind)[5:]] == [str(x.index) for x in getattr(scored, kind)[5:]]
    with pytest.raises(UserError, match="give measure=N"):
        attribute(model, IDS, TARGET, rank_by="measured")
    with pytest.raises(UserError, match="first answer token"):
        attribute(model, IDS, TARGET, measure=2, answer_tokens="all")


def test_run_tables_carry_the_measured_change():
    from types import SimpleNamespace

    from neuron_attribution.results.tables import tables_of

    model = tiny_llama()
    measured = attribute(model, IDS, TARGET, top_k=5, measure=2)
    plain = attribute(model, IDS, TARGET, top_k=5)
    fact = SimpleNamespace(answer="x", type_name="t", source="s", line=1)
    tables = tables_of([(0, fact, measured), (1, fact, plain)])
    column = tables["ffn_neurons"].column("measured_change").to_pylist()
    assert column[:2] == [n.measured_change for n in measured.ffn_neurons[:2]] and column[2:] == [None] * 8
    assert tables["heads"].column("measured_change").to_pylist()[0] == measured.heads[0].measured_change


def test_neurons_reading_the_first_token_are_flagged_and_hidden_from_the_graph():
    """#34 item 3: a query or attention value neuron whose reading sits at position 0 — the attention sink, where
    massive activations live — carries sink: true in every output; graphs leave sinks out unless asked."""
    from neuron_attribution.results.tables import tables_of

    model = tiny_llama()
    result = attribute(model, IDS, TARGET, top_k=200, query_top=10, query_via="attention")
    sinks = [n for n in result.attention_neurons if n.position == 0]
    assert sinks and all(n.sink for n in sinks) and not any(n.sink for n in result.attention_neurons if n.position)
    assert all(q.sink == (q.position == 0) for q in result.query_neurons)
    data = result.to_dict()
    assert all(row["sink"] == (row["position"] == 0) for row in data["attention_neurons"])
    assert Attribution.from_dict(data).attention_neurons[0].sink == result.attention_neurons[0].sink
    hidden, shown = result.graph(top=200), result.graph(top=200, sinks=True)
    assert not any(node.get("sink") for node in hidden["nodes"])
    assert any(node.get("sink") for node in shown["nodes"]) and hidden["sinks_hidden"] > 0 == shown["sinks_hidden"]
    from types import SimpleNamespace
    table = tables_of([(0, SimpleNamespace(answer="x", type_name="t", source="s", line=1), result)])
    assert table["attention_neurons"].column("sink").to_pylist() == [n.sink for n in result.attention_neurons]
    rows = {t.title.split(" (")[0]: t for t in attribution_tables(result, 200)}["Top attention value neurons"]
    assert any("⚓" in str(cell) for row in rows.rows for cell in row) and "attention sink" in rows.notes[0]
