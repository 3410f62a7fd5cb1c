"""The eight FFN scorers against straightforward float64 computations of docs/method.md §4, their exact top-k
against the dense ranking, and integrated gradients' completeness."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution.scoring.context import value_context
from neuron_attribution.scoring.methods.integrated_gradients import IntegratedGradients
from neuron_attribution.scoring.methods import METHODS, create_scorers, default_methods
from neuron_attribution.scoring.methods.base import MethodResources
from neuron_attribution.scoring.ranks import VocabularyRanks
from neuron_attribution.model.trace import trace_token_ids

from . import reference


def _context(model, ids, target=None):
    trace = trace_token_ids(model, [ids])[0]
    return trace, value_context(model, trace, int(trace.logits.argmax()) if target is None else target)


def _ranks(model, depth):
    adapter = model.adapter
    norm = adapter.final_norm()
    return VocabularyRanks(adapter.ffn_value_stack, norm, adapter.unembedding_matrix, depth=depth, batch=7)


class _Resources(MethodResources):
    """Resources with vocabulary ranks of a chosen depth (shallow depths force the exact fallbacks)."""

    def __init__(self, model, ranks=None, seed=0):
        super().__init__(model, seed)
        self._ranks = ranks

    def ranks(self):
        return self._ranks


def static_scorers(model, ranks=None, seed=0):
    """Every method in `all` (the static ones and the random control), built through the registry."""
    keys = [k for k in default_methods() if ranks is not None or not METHODS[k].needs_ranks]
    return create_scorers(keys, _Resources(model, ranks, seed))


def _projection_rank(model, vector, target):
    """Rank of target in U(γ ⊙ centre(vector)), from the top, rank 1 = highest; float64."""
    norm = model.adapter.final_norm()
    v = vector.double()
    if norm.kind == "layernorm":
        v = v - v.mean()
    projected = model.adapter.unembedding[0].double() @ (norm.weight.double() * v)
    return int((projected > projected[target]).sum()) + 1


def reference_scores(model, trace, target) -> dict[str, torch.Tensor]:
    """Every static method's score of every FFN neuron, one neuron at a time."""
    s = model.shape
    out = {key: torch.zeros(s.n_layers, s.d_ffn, dtype=torch.float64)
           for key in ("log_prob_increase", "log_probability", "prob_increase", "norm", "coefficient", "rank",
                       "coefficient_x_norm", "coefficient_x_rank")}
    for layer in range(s.n_layers):
        values = model.adapter.layer_weights(layer).ffn_values
        base = trace.layer_inputs[layer, -1].double() + trace.attention_outputs[layer, -1].double()
        base_log_prob = reference.log_prob(model, trace, base, target)
        for k in range(s.d_ffn):
            m = float(trace.ffn_coefficients[layer, -1, k])
            vector = m * values[k].double()
            increase = reference.increase(model, trace, base, vector, target)
            out["log_prob_increase"][layer, k] = increase
            out["log_probability"][layer, k] = reference.log_prob(model, trace, vector, target)
            out["prob_increase"][layer, k] = torch.tensor(base_log_prob + increase).exp() - \
                torch.tensor(base_log_prob).exp()
            norm = float(values[k].double().norm())
            out["norm"][layer, k] = norm
            out["coefficient"][layer, k] = m
            out["rank"][layer, k] = -_projection_rank(model, values[k], target)
            out["coefficient_x_norm"][layer, k] = abs(m) * norm
            out["coefficient_x_rank"][layer, k] = abs(m) / _projection_rank(model, vector, target) if m else 0.0
    return out


def _dense_ranking(scores: torch.Tensor, k: int) -> list[int]:
    flat = scores.reshape(-1).tolist()
    return sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]


def test_every_scorer_matches_its_definition(tiny_model, token_batches):
    ids = token_batches[0]
    trace, ctx = _context(tiny_model, ids)
    expected = reference_scores(tiny_model, trace, ctx.target)
    scorers = static_scorers(tiny_model, _ranks(tiny_model, depth=5))
    for key, want in expected.items():
        got = scorers[key].scores(ctx).double()
        tolerance = 1e-6 if key == "prob_increase" else 1e-5
        assert torch.allclose(got, want, atol=tolerance, rtol=1e-5), key


@pytest.mark.parametrize("depth", [3, 40])
def test_exact_top_k_equals_the_dense_ranking(tiny_model, token_batches, depth):
    """Shallow kept depths force the rank scorers through their exact fallbacks; the vocabulary-sized ones
    go through their bounds. Every top-k must equal the ranking of the straightforward scores."""
    for ids in token_batches[:2]:
        trace, ctx = _context(tiny_model, ids)
        expected = reference_scores(tiny_model, trace, ctx.target)
        scorers = static_scorers(tiny_model, _ranks(tiny_model, depth))
        for key, want in expected.items():
            for k in (1, 7, 25):
                got = scorers[key].top(ctx, k).tolist()
                dense = _dense_ranking(want, k)
                if key == "rank":  # integer scores: ties are common, broken by the lower index
                    assert got == dense, (key, k)
                else:  # float32 against float64: near-ties may swap, the scores may not differ
                    flat = want.reshape(-1)
                    assert torch.allclose(flat[got], flat[dense], atol=1e-6, rtol=1e-6), (key, k)


def test_vocabulary_ranks_read_off_the_kept_extremes(tiny_model):
    ranks = _ranks(tiny_model, depth=6)
    full_top, full_bottom = ranks.full(11)
    known_top, known_bottom = ranks.known(11)
    shallow = known_top > 0
    assert shallow.any() and (~shallow).any()
    assert torch.equal(known_top[shallow], full_top.reshape(-1)[shallow])
    assert bool((full_top.reshape(-1)[~shallow] > 6).all())
    deep = known_bottom > 0
    assert torch.equal(known_bottom[deep], full_bottom.reshape(-1)[deep])


def test_random_control_is_seeded_per_sentence(tiny_model, token_batches):
    _, first = _context(tiny_model, token_batches[0])
    _, second = _context(tiny_model, token_batches[1])
    scorer = static_scorers(tiny_model, seed=3)["random"]
    assert torch.equal(scorer.top(first, 10), scorer.top(first, 10))
    assert not torch.equal(scorer.top(first, 10), scorer.top(second, 10))
    assert not torch.equal(scorer.top(first, 10), static_scorers(tiny_model, seed=4)["random"].top(first, 10))


def _prob_with_last_coefficients(model, ids, layer, coefficients, target) -> float:
    """p(target) when layer's last-position FFN coefficients are replaced: a hook written here."""
    def hook(module, args):
        hidden = args[0].clone()
        hidden[:, -1, :] = coefficients
        return (hidden, *args[1:])

    handle = model.adapter.mlp_output_projection(layer).register_forward_pre_hook(hook)
    try:
        with torch.inference_mode():
            logits = model.hf_model(torch.tensor([ids])).logits[0, -1].double()
    finally:
        handle.remove()
    return float(torch.softmax(logits, -1)[target])


def test_integrated_gradients_completeness(tiny_model, token_batches):
    """Per layer, the attributions sum to p(w | m) − p(w | 0) up to the midpoint rule's error, which shrinks
    with more steps."""
    ids = token_batches[1]
    trace, ctx = _context(tiny_model, ids)
    state = {k: v.clone() for k, v in tiny_model.hf_model.state_dict().items()}
    for layer in range(tiny_model.shape.n_layers):
        m = trace.ffn_coefficients[layer, -1]
        full = _prob_with_last_coefficients(tiny_model, ids, layer, m, ctx.target)
        empty = _prob_with_last_coefficients(tiny_model, ids, layer, torch.zeros_like(m), ctx.target)
        coarse = float(IntegratedGradients(tiny_model, steps=20).layer_scores(ids, layer, m, ctx.target).sum())
        fine = float(IntegratedGradients(tiny_model, steps=200).layer_scores(ids, layer, m, ctx.target).sum())
        assert coarse == pytest.approx(full - empty, rel=0.02, abs=2e-4)
        assert abs(fine - (full - empty)) <= abs(coarse - (full - empty)) + 1e-6
    scores = IntegratedGradients(tiny_model, steps=4).scores(ctx)
    assert scores.shape == (tiny_model.shape.n_layers, tiny_model.shape.d_ffn)
    assert all(torch.equal(state[k], v) for k, v in tiny_model.hf_model.state_dict().items())


@pytest.mark.slow
def test_bounded_top_k_on_the_real_model(real_model):
    """On SmolLM2 the bounds of the vocabulary-sized baselines must still give the dense ranking."""
    ids = real_model.tokenizer("The capital of France is")["input_ids"]
    _, ctx = _context(real_model, ids)
    scorers = static_scorers(real_model)
    for key in ("log_probability", "prob_increase"):
        dense = scorers[key].scores(ctx).reshape(-1)
        got = scorers[key].top(ctx, 10)
        assert got.tolist() == _dense_ranking(dense, 10), key


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "gpt_neox"])
def test_every_fast_top_k_is_certified_on_other_families(family, token_batches):
    """#23 item 1: every method's fast top-k equals the ranking of its own dense scores (each neuron scored
    exactly), on a soft-capped Gemma 2, post-norms and a parallel block. Gemma 2's unembedding is scaled up so
    that logits reach far past its cap of 3, where the tangent of the log-probability baseline is no bound
    (it fell short of the exact score by up to 45 there)."""
    from .conftest import tiny_family

    model = tiny_family(family)
    if family == "gemma2":
        with torch.no_grad():
            model.hf_model.lm_head.weight.mul_(30.0)
        model.adapter.forget_weights()
    for ids in token_batches[:3]:
        trace, ctx = _context(model, ids)
        scorers = static_scorers(model, _ranks(model, depth=5))
        for key, scorer in scorers.items():
            if key == "random":
                continue
            dense = scorer.scores(ctx).reshape(-1)
            if key == "log_probability":  # its bound holds for every neuron, as the search assumes
                assert bool((scorer._bounds(ctx).reshape(-1) >= dense - 1e-5).all()), family
            for k in (1, 7, 25, 60, 79):
                got = scorer.top(ctx, k)
                want = _dense_ranking(dense, k)
                assert torch.allclose(dense[got], dense[torch.tensor(want)], atol=1e-6, rtol=1e-6), (family, key, k)
