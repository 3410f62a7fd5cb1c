"""Value neurons (docs/method.md §2) against an independent float64 computation of the definitions."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from neuron_attribution import UserError
from neuron_attribution import attribute, attribute_batch, project
from neuron_attribution.model.trace import trace_token_ids

from . import reference as ref

ATOL = 1e-5


def _dense_ranking(scores: np.ndarray, k: int) -> list[tuple[int, ...]]:
    flat = scores.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:k]
    return [tuple(int(x) for x in np.unravel_index(i, scores.shape)) for i in order]


@pytest.mark.parametrize("reference_convention", [False, True])
def test_every_score_matches_definition_tiny(tiny_model, token_batches, reference_convention):
    ids = token_batches[1]
    trace = trace_token_ids(tiny_model, [ids])[0]
    target = 17
    result = attribute(tiny_model, ids, target, top_k=20, dense=True, reference=reference_convention)
    shape = tiny_model.shape
    for layer in range(shape.n_layers):
        for neuron in range(shape.d_ffn):
            expected = ref.ffn_neuron_score(tiny_model, trace, layer, neuron, target, reference_convention)
            assert result.dense.ffn[layer, neuron] == pytest.approx(expected, abs=ATOL)
        for head in range(shape.n_heads):
            for dim in range(shape.head_dim):
                for position in range(trace.n_tokens):
                    expected = ref.attention_neuron_score(tiny_model, trace, layer, head, dim, position, target,
                                                          reference_convention)
                    assert result.dense.attention[layer, head, dim, position] == pytest.approx(expected, abs=ATOL)


def test_layer_and_head_scores_tiny(tiny_model, token_batches):
    ids = token_batches[0]
    trace = trace_token_ids(tiny_model, [ids])[0]
    result = attribute(tiny_model, ids, 5, top_k=5)
    attention, ffn = ref.layer_scores(tiny_model, trace, 5)
    assert result.layers.attention == pytest.approx(attention, abs=ATOL)
    assert result.layers.ffn == pytest.approx(ffn, abs=ATOL)
    heads = {(h.layer, h.head): h.score for h in result.heads}
    assert len(heads) == tiny_model.shape.n_layers * tiny_model.shape.n_heads
    for (layer, head), score in heads.items():
        assert score == pytest.approx(ref.head_score(tiny_model, trace, layer, head, 5), abs=ATOL)
    assert [h.score for h in result.heads] == sorted((h.score for h in result.heads), reverse=True)


def test_head_position_scores_match_definition_across_rounds(tiny_model, token_batches, monkeypatch):
    """Each top head's output from one source position, scored as the definition says; with rounds of 3 rows the
    positions are spread over several rounds beside the searches' candidates (a long prompt's are)."""
    from neuron_attribution.scoring import value

    ids = token_batches[0]
    trace = trace_token_ids(tiny_model, [ids])[0]
    monkeypatch.setattr(value, "ROUND_ROWS", 3)
    result = attribute(tiny_model, ids, 5, top_k=5)
    top_heads = [(h.layer, h.head) for h in result.heads[:5]]
    assert [(p.layer, p.head) for p in result.head_positions[:: len(ids)]] == top_heads
    assert len(result.head_positions) == 5 * len(ids)
    for scored in result.head_positions:
        vector = sum(ref.attention_neuron_vector(tiny_model, trace, scored.layer, scored.head, n, scored.position)
                     for n in range(tiny_model.shape.head_dim))
        expected = ref.increase(tiny_model, trace, trace.layer_inputs[scored.layer, -1], vector, 5)
        assert scored.score == pytest.approx(expected, abs=ATOL)


def test_target_probability_is_the_models(tiny_model, token_batches):
    ids = token_batches[2]
    result = attribute(tiny_model, ids, None, top_k=3)
    with torch.no_grad():
        probs = torch.softmax(tiny_model.hf_model(torch.tensor([ids])).logits[0, -1].double(), -1)
    assert result.target.id == int(probs.argmax())
    assert result.target.prob == pytest.approx(float(probs.max()), rel=1e-5)
    assert result.target.rank == 1
    # Sum of all layer scores telescopes to log p(w | h^L) − log p(w | h^0), and log p(w | h^L) is exact.
    total = sum(result.layers.attention) + sum(result.layers.ffn)
    trace = trace_token_ids(tiny_model, [ids])[0]
    start = ref.log_prob(tiny_model, trace, trace.layer_inputs[0, -1], result.target.id)
    assert total == pytest.approx(np.log(result.target.prob) - start, abs=ATOL)


@pytest.mark.parametrize("k", [1, 7, 40])
def test_top_k_equals_dense_tiny(tiny_model, token_batches, k):
    for ids in token_batches:
        result = attribute(tiny_model, ids, 3, top_k=k, dense=True)
        expected_ffn = _dense_ranking(result.dense.ffn, k)
        assert [(n.layer, n.neuron) for n in result.ffn_neurons] == expected_ffn
        assert [n.score for n in result.ffn_neurons] == pytest.approx(
            [float(result.dense.ffn[i]) for i in expected_ffn], abs=1e-5)
        expected_attention = _dense_ranking(result.dense.attention, k)
        assert [(n.layer, n.head, n.dim, n.position) for n in result.attention_neurons] == expected_attention
        assert [n.score for n in result.attention_neurons] == pytest.approx(
            [float(result.dense.attention[i]) for i in expected_attention], abs=1e-5)


def test_batch_equals_single(tiny_model, token_batches):
    together = attribute_batch(tiny_model, token_batches, [3, 4, 5, 6], top_k=10)
    for ids, target, batched in zip(token_batches, [3, 4, 5, 6], together):
        alone = attribute(tiny_model, ids, target, top_k=10)
        assert [(n.layer, n.neuron) for n in alone.ffn_neurons] == [(n.layer, n.neuron) for n in batched.ffn_neurons]
        assert [n.score for n in alone.ffn_neurons] == pytest.approx([n.score for n in batched.ffn_neurons],
                                                                     abs=1e-5)
        assert [n.score for n in alone.attention_neurons] == pytest.approx(
            [n.score for n in batched.attention_neurons], abs=1e-5)
        assert alone.layers.ffn == pytest.approx(batched.layers.ffn, abs=1e-5)


def test_projection_matches_unembedding(tiny_model):
    w = tiny_model.adapter.layer_weights(1)
    norm = tiny_model.adapter.final_norm()
    unembedding, _ = tiny_model.adapter.unembedding
    vector = w.ffn_values[4].double()
    if norm.kind == "layernorm":
        vector = vector - vector.mean()
    logits = unembedding.double() @ (norm.weight.double() * vector)
    projection = project(tiny_model, ("ffn", 1, 4), k=5)
    assert projection.top_ids == logits.topk(5).indices.tolist()
    assert projection.bottom_ids == logits.topk(5, largest=False).indices.tolist()
    with pytest.raises(UserError):
        project(tiny_model, ("ffn", 99, 0))


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_top_k(tiny_model, token_batches, bad):
    with pytest.raises(UserError, match="top_k"):
        attribute(tiny_model, token_batches[0], 3, top_k=bad)


def test_bad_prompts_and_targets(real_model):
    with pytest.raises(UserError, match="empty"):
        attribute(real_model, "   ", top_k=5)
    with pytest.raises(UserError, match="empty"):
        attribute(real_model, "Hello", "  ", top_k=5)
    with pytest.raises(UserError, match="context"):
        attribute(real_model, "word " * 9000, top_k=5)


@pytest.mark.slow
def test_real_model_matches_definition_and_dense(real_model):
    from neuron_attribution.scoring.context import value_context
    from neuron_attribution.scoring import value

    prompt = "The capital of France is"
    result = attribute(real_model, prompt, " Paris", top_k=30)
    assert result.target.text == " Paris" and result.target.rank == 1
    ids = real_model.tokenizer(prompt)["input_ids"]
    trace = trace_token_ids(real_model, [ids])[0]
    for n in result.ffn_neurons[:10]:
        expected = ref.ffn_neuron_score(real_model, trace, n.layer, n.neuron, result.target.id)
        assert n.score == pytest.approx(expected, abs=1e-4)
    for n in result.attention_neurons[:10]:
        expected = ref.attention_neuron_score(real_model, trace, n.layer, n.head, n.dim, n.position,
                                              result.target.id)
        assert n.score == pytest.approx(expected, abs=1e-4)
    attention, ffn = ref.layer_scores(real_model, trace, result.target.id)
    assert result.layers.attention == pytest.approx(attention, abs=1e-4)
    assert result.layers.ffn == pytest.approx(ffn, abs=1e-4)
    top_head = result.heads[0]
    assert top_head.score == pytest.approx(ref.head_score(real_model, trace, top_head.layer, top_head.head,
                                                          result.target.id), abs=1e-4)
    # The fast top-k equals the dense ranking of every neuron.
    ctx = value_context(real_model, trace, result.target.id)
    dense_ffn = value.dense_ffn_scores(ctx).numpy()
    expected = _dense_ranking(dense_ffn, 30)
    assert [(n.layer, n.neuron) for n in result.ffn_neurons] == expected
    assert [n.score for n in result.ffn_neurons] == pytest.approx([float(dense_ffn[i]) for i in expected], abs=1e-5)
    dense_attention = value.dense_attention_scores(ctx).numpy()
    expected = _dense_ranking(dense_attention, 30)
    assert [(n.layer, n.head, n.dim, n.position) for n in result.attention_neurons] == expected
    batched = attribute_batch(real_model, [prompt, "Tim Duncan plays the sport of"], [" Paris", " basketball"],
                              top_k=30)[0]
    assert [n.score for n in batched.ffn_neurons] == pytest.approx([n.score for n in result.ffn_neurons], abs=1e-4)


GPT2_LARGE = os.environ.get("NEURON_ATTRIBUTION_GPT2_LARGE")


@pytest.mark.skipif(not GPT2_LARGE, reason="set NEURON_ATTRIBUTION_GPT2_LARGE to a local GPT2-large directory")
def test_authors_gpt2_large_example():
    """docs/method.md §7: the authors' notebook figures, in their convention (no ln_f bias)."""
    from neuron_attribution import load_model

    model = load_model(GPT2_LARGE)
    result = attribute(model, "Tim Duncan plays the sport of", " basketball", top_k=10, reference=True)
    assert (result.heads[0].layer, result.heads[0].head) == (21, 19)
    assert result.heads[0].score == pytest.approx(0.698, abs=2e-3)
    ffn = [(n.layer, n.neuron, round(n.score, 4)) for n in result.ffn_neurons[:3]]
    assert ffn == [(28, 29, pytest.approx(0.4481, abs=2e-4)), (21, 983, pytest.approx(0.2473, abs=2e-4)),
                   (24, 4743, pytest.approx(0.2323, abs=2e-4))]
    top = result.attention_neurons[0]
    assert (top.layer, top.head, top.dim, top.position) == (21, 19, 7, 1)
    assert top.score == pytest.approx(0.0712, abs=2e-4)
    assert sum(result.layers.attention) == pytest.approx(5.586, abs=5e-3)
    assert sum(result.layers.ffn) == pytest.approx(4.406, abs=5e-3)
