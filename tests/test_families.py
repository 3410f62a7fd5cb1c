"""Every supported block shape (docs/method.md §1), on tiny random models of each family, against the float64
loops of tests/reference.py: the decomposition, every neuron's score, layer and head scores, the exact top-k,
query shares and interventions. Parallel blocks (GPT-J, Phi-2, Pythia), post-norms (Gemma 2/3, OLMo 2), Gemma's
1 + γ gains and √d embedding, fused projections (Phi-3) and soft-capped logits (Gemma 2) are all covered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_attribution import UserError, attribute
from neuron_attribution.model.interventions import Ablation, ablated
from neuron_attribution.model.loaded import LoadedModel
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.scoring import value
from neuron_attribution.scoring.context import value_context

from . import reference as ref
from .conftest import tiny_family
from .tiny_families import ALL_VARIANTS
from .test_query import _check_against_reference

ATOL = 1e-5


@pytest.fixture(scope="module", params=ALL_VARIANTS)
def family_model(request) -> LoadedModel:
    return tiny_family(request.param)


IDS = [5, 17, 3, 99, 42, 7, 250]


def _close(a, b, tol=1e-5) -> bool:
    a, b = a.double(), b.double()
    return float((a - b).norm()) <= tol * max(1.0, float(b.norm()))


def test_declared_shape(family_model):
    shape, kind = family_model.shape, ref.model_type(family_model)
    assert shape.parallel == ref.is_parallel(family_model)
    assert shape.post_norms == ref.has_post_norms(family_model)
    assert shape.logit_softcap == (3.0 if kind == "gemma2" else None)


def test_info_names_the_declared_block():
    from neuron_attribution.model.describe import describe_model

    blocks = {family: describe_model(tiny_family(family))["block"] for family in
              ("granite", "cohere", "olmo2", "gemma2", "bloom", "falcon")}
    assert blocks["granite"] == "sequential, sublayer outputs × 0.4, logits × 0.4"
    assert blocks["cohere"] == "parallel attention and FFN, logits × 0.5"
    assert blocks["olmo2"] == "sequential, no norms before the sublayers, post-sublayer norms"
    assert blocks["gemma2"] == "sequential, post-sublayer norms, norm gains 1 + γ, logits soft-capped at 3"
    assert blocks["bloom"] == "sequential, sublayer modules add the residual themselves"
    assert blocks["falcon"] == "parallel attention and FFN"


def test_decomposition(family_model):
    model = family_model
    trace = trace_token_ids(model, [IDS])[0]
    rebuilt = trace.layer_inputs[0] + trace.attention_outputs.sum(0) + trace.ffn_outputs.sum(0)
    assert _close(rebuilt, trace.final_residual)
    last = trace.n_tokens - 1
    for layer in range(model.shape.n_layers):
        # Every FFN neuron's vector (with the post-norm's frozen scale), summed, is the FFN output, at every
        # position; the attention neurons' vectors at the last position sum to the attention output.
        for position in range(trace.n_tokens):
            total = sum(ref.ffn_vector(model, trace, layer, k, position) for k in range(model.shape.d_ffn))
            raw = ref.raw_ffn_output(model, trace, layer, position)
            factor = ref.post_norm_factor(model, layer, "ffn", raw)
            bias = model.adapter.layer_weights(layer).ffn_bias
            if bias is not None:
                total = total + bias.double() * (1.0 if factor is None else factor)
            assert _close(total, trace.ffn_outputs[layer, position])
        raw = ref.raw_attention_output(model, trace, layer)
        factor = ref.post_norm_factor(model, layer, "attention", raw)
        assert _close(raw if factor is None else raw * factor, trace.attention_outputs[layer, last])
    with torch.no_grad():
        logits = model.hf_model(torch.tensor([IDS])).logits[0, -1].double()
    assert float((ref.final_logits(model, trace, trace.final_residual[-1]) - logits).abs().max()) < 1e-4
    assert float((trace.logits.double() - logits).abs().max()) < 1e-4


def check_every_neuron_and_head(model, ids, target, atol, weights_from=None):
    """Every FFN and attention neuron's dense score and every head's score against the float64 loops over the
    model's activations and the weights of `weights_from` (default: the model's own)."""
    trace = trace_token_ids(model, [ids])[0]
    result = attribute(model, ids, target, top_k=10, dense=True)
    s, weights = model.shape, weights_from or model
    for layer in range(s.n_layers):
        for neuron in range(s.d_ffn):
            expected = ref.ffn_neuron_score(weights, trace, layer, neuron, target)
            assert result.dense.ffn[layer, neuron] == pytest.approx(expected, abs=atol), (layer, neuron)
        for head in range(s.n_heads):
            for dim in range(s.head_dim):
                for position in range(trace.n_tokens):
                    expected = ref.attention_neuron_score(weights, trace, layer, head, dim, position, target)
                    assert result.dense.attention[layer, head, dim, position] == pytest.approx(expected, abs=atol)
    for h in result.heads:
        assert h.score == pytest.approx(ref.head_score(weights, trace, h.layer, h.head, target), abs=atol)
    return trace, result


def test_every_score_matches_definition(family_model):
    model, target = family_model, 11
    trace, result = check_every_neuron_and_head(model, IDS, target, ATOL)
    attention, ffn = ref.layer_scores(model, trace, target)
    assert result.layers.attention == pytest.approx(attention, abs=ATOL)
    assert result.layers.ffn == pytest.approx(ffn, abs=ATOL)
    with torch.no_grad():
        probs = torch.softmax(model.hf_model(torch.tensor([IDS])).logits[0, -1].double(), -1)
    assert result.target.prob == pytest.approx(float(probs[target]), rel=1e-4)


def _dense_ranking(scores: np.ndarray, k: int) -> list[tuple[int, ...]]:
    flat = scores.reshape(-1)
    order = sorted(range(flat.size), key=lambda i: (-flat[i], i))[:k]
    return [tuple(int(x) for x in np.unravel_index(i, scores.shape)) for i in order]


@pytest.mark.parametrize("k", [1, 12])
def test_top_k_equals_dense(family_model, k):
    """Under soft-capped logits (Gemma 2) the tangent bound does not hold; the top-k is certified by the
    Lipschitz bound instead, and must still equal the dense ranking."""
    for target in (3, 200):
        result = attribute(family_model, IDS, target, top_k=k, dense=True)
        rows = [(n.layer, family_model.shape.ffn_row(n.index)) for n in result.ffn_neurons]
        assert rows == _dense_ranking(result.dense.ffn, k)
        assert [(n.layer, n.head, n.dim, n.position) for n in result.attention_neurons] == \
            _dense_ranking(result.dense.attention, k)


def test_every_bound_holds(family_model):
    """The top-k is certified only if each neuron's bound is at least its exact score. Under Gemma 2's
    soft-capped logits the concavity (tangent) bound is broken by dozens of neurons here, so the Lipschitz
    bound must be the one in use."""
    trace = trace_token_ids(family_model, [IDS])[0]
    for target in (3, 200, 11):
        ctx = value_context(family_model, trace, target)
        assert bool((value.dense_ffn_scores(ctx) <= value.ffn_bounds(ctx) + 1e-5).all())
        assert bool((value.dense_attention_scores(ctx) <= value.attention_bounds(ctx) + 1e-5).all())


def test_softcapped_top_k_differs_from_an_uncapped_readout():
    """The cap is real in the tiny Gemma 2: scores with and without it differ, so the test above has teeth."""
    model = tiny_family("gemma2")
    capped = attribute(model, IDS, 3, top_k=5, dense=True).dense.ffn
    model.hf_model.config.final_logit_softcapping = None
    try:
        uncapped = attribute(LoadedModel.from_hf(model.hf_model, name="uncapped"), IDS, 3, top_k=5, dense=True)
    finally:
        model.hf_model.config.final_logit_softcapping = 3.0
    assert float(np.abs(capped - uncapped.dense.ffn).max()) > 1e-3


@pytest.mark.parametrize("via", ["attention", "both"])
def test_query_shares_match_definition(family_model, via):
    _check_against_reference(family_model, IDS, 11, k=6, atol=1e-5, via=via)


def check_ffn_neuron_ablation(model, weights_from=None, linear_output: bool = True):
    """Switching off layer 1's most active FFN neuron zeroes its coefficient, moves no other one, and (where the
    FFN's output is linear in its coefficients) takes exactly its vector out of the output (the float64 loop
    over the weights of `weights_from`, default the model's own)."""
    weights = weights_from or model
    before = trace_token_ids(model, [IDS])[0]
    row = int(before.ffn_coefficients[1, -1].abs().argmax())  # active at the last position (an expert chosen there)
    with ablated(model, Ablation.of([model.shape.ffn_index(1, row)])):
        after = trace_token_ids(model, [IDS])[0]
    assert float(after.ffn_coefficients[1, :, row].abs().max()) == 0.0
    assert torch.equal(after.layer_inputs[1], before.layer_inputs[1])
    others = [k for k in range(model.shape.d_ffn) if k != row]
    # In a parallel block the FFN reads h^{l-1}, which did not move; in a sequential one, h^{l-1} + A^l, which
    # did not move either: the other neurons of the layer keep their coefficients exactly.
    assert torch.allclose(after.ffn_coefficients[1][:, others], before.ffn_coefficients[1][:, others], atol=1e-6)
    if linear_output:
        expected = ref.raw_ffn_output(weights, before, 1, -1) - before.ffn_coefficients[1, -1, row].double() * \
            ref.ffn_values(weights, 1)[row]
        assert _close(ref.raw_ffn_output(weights, after, 1, -1), expected)
    return before


def test_interventions_change_exactly_the_targeted_neurons(family_model):
    model = family_model
    before = check_ffn_neuron_ablation(model)

    with ablated(model, Ablation(attention=[(0, 1, 3)])):
        after = trace_token_ids(model, [IDS])[0]
    s = model.shape
    kv = 1 // s.heads_per_kv_head
    removed = (before.attention_weights[0, 1] * before.value_states[0, :, kv, 3]).sum().double() * \
        model.adapter.layer_weights(0).output_weight[1, 3].double()
    raw_after = ref.raw_attention_output(model, before, 0) - removed
    factor = ref.post_norm_factor(model, 0, "attention", raw_after)
    assert _close(after.attention_outputs[0, -1], raw_after if factor is None else raw_after * factor)


def test_unsupported_block_is_a_one_line_error():
    """JetMoE's experts (a mixture of attention heads too) are a block shape no adapter declares: refused,
    never scored."""
    from transformers import JetMoeConfig, JetMoeForCausalLM
    config = JetMoeConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_key_value_heads=2,
                          kv_channels=8, vocab_size=64, num_local_experts=2, num_experts_per_tok=1)
    lacks = r"\(a mixture-of-experts FFN of a kind no adapter declares\)"
    with pytest.raises(UserError, match=rf"unsupported architecture 'jetmoe' {lacks}; supported: .*gemma3_text"):
        LoadedModel.from_hf(JetMoeForCausalLM(config), name="moe")


# --- the second real model: Gemma 3 270M (sandwich norms, 1 + γ gains, √d embedding, one KV head) ------------

@pytest.fixture(scope="module")
def gemma():
    from neuron_attribution import load_model
    return load_model("gemma-3-270m")


@pytest.mark.slow
def test_gemma_matches_definition_and_certifies_its_top_k(gemma):
    prompt_ids = gemma.tokenizer("The capital of Japan is")["input_ids"]
    assert prompt_ids[0] == gemma.tokenizer.bos_token_id  # its tokenizer adds BOS; it stays position 0
    result = attribute(gemma, "The capital of Japan is", " Tokyo", top_k=30)
    assert result.target.text == " Tokyo" and result.target.rank == 1
    assert result.target.prob == pytest.approx(0.248, abs=0.01)
    trace = trace_token_ids(gemma, [prompt_ids])[0]
    rebuilt = trace.layer_inputs[0] + trace.attention_outputs.sum(0) + trace.ffn_outputs.sum(0)
    assert _close(rebuilt, trace.final_residual, 1e-5)
    for layer in (0, 17):
        raw = ref.raw_attention_output(gemma, trace, layer)
        assert _close(raw * ref.post_norm_factor(gemma, layer, "attention", raw), trace.attention_outputs[layer, -1],
                      1e-4)
    target = result.target.id
    for n in result.ffn_neurons[:8]:
        assert n.score == pytest.approx(ref.ffn_neuron_score(gemma, trace, n.layer, n.neuron, target), abs=1e-4)
    for n in result.attention_neurons[:8]:
        expected = ref.attention_neuron_score(gemma, trace, n.layer, n.head, n.dim, n.position, target)
        assert n.score == pytest.approx(expected, abs=1e-4)
    attention, ffn = ref.layer_scores(gemma, trace, target)
    assert result.layers.attention == pytest.approx(attention, abs=1e-4)
    assert result.layers.ffn == pytest.approx(ffn, abs=1e-4)
    # The certificate of the exact top-k: every neuron left out whose bound exceeds the k-th score returned
    # scores (exactly) no higher than it.
    ctx = value_context(gemma, trace, target)
    for bounds, returned, evaluate in (
            (value.ffn_bounds(ctx), result.ffn_neurons, lambda flat: value.evaluate_ffn(ctx, flat)),
            (value.attention_bounds(ctx), result.attention_neurons, lambda flat: value.evaluate_attention(ctx, flat))):
        kth = returned[-1].score
        flat = bounds.reshape(-1).clone()
        if returned is result.ffn_neurons:
            chosen = [n.layer * gemma.shape.d_ffn + n.neuron for n in returned]
        else:
            chosen = [int(np.ravel_multi_index((n.layer, n.head, n.dim, n.position), bounds.shape)) for n in returned]
        flat[chosen] = -float("inf")
        contenders = (flat > kth).nonzero().squeeze(-1)
        assert contenders.numel() < 2000
        if contenders.numel():
            assert float(evaluate(contenders).max()) <= kth + 1e-6
