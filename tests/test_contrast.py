"""Contrastive targets (docs/method.md §2): every score is for log p(target) − log p(contrast), which is linear
in a neuron's coefficient, so the top-k needs no vocabulary-sized product per neuron."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_attribution import UserError, attribute, score_neurons
from neuron_attribution.datasets import PromptLine, load_prompt_lines
from neuron_attribution.pipelines.prompts_file import attribute_lines
from neuron_attribution.results.attribution import Attribution
from neuron_attribution.settings import ScoringOptions

from .conftest import TINY_VOCAB, tiny_family, tiny_gpt2, tiny_llama
from .test_families import _dense_ranking

IDS = [5, 17, 3, 99, 42, 7, 250]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, lambda: tiny_family("gemma2"), lambda: tiny_family("gptj"),
                                  lambda: tiny_family("gemma3_text")],
                         ids=["gpt2", "llama", "gemma2-softcap", "gptj-parallel", "gemma3-post-norms"])
def test_contrast_is_the_difference_of_the_two_targets(make):
    model = make()
    target, contrast = 11, 40
    both = attribute(model, IDS, target, top_k=10, dense=True, contrast=contrast)
    alone = attribute(model, IDS, target, top_k=10, dense=True)
    other = attribute(model, IDS, contrast, top_k=10, dense=True)
    assert np.abs(both.dense.ffn - (alone.dense.ffn - other.dense.ffn)).max() < 1e-5
    assert np.abs(both.dense.attention - (alone.dense.attention - other.dense.attention)).max() < 1e-5
    assert both.layers.ffn == pytest.approx(np.subtract(alone.layers.ffn, other.layers.ffn).tolist(), abs=1e-5)
    assert both.layers.attention == pytest.approx(
        np.subtract(alone.layers.attention, other.layers.attention).tolist(), abs=1e-5)
    by_head = {(h.layer, h.head): h.score for h in alone.heads}
    def in_order(heads):
        return sorted(heads, key=lambda h: (h.layer, h.head))

    for h, o in zip(in_order(both.heads), in_order(other.heads)):
        assert h.score == pytest.approx(by_head[(h.layer, h.head)] - o.score, abs=1e-5)
    # The fast top-k is the dense ranking.
    assert [(n.layer, n.neuron) for n in both.ffn_neurons] == _dense_ranking(both.dense.ffn, 10)
    assert [(n.layer, n.head, n.dim, n.position) for n in both.attention_neurons] == \
        _dense_ranking(both.dense.attention, 10)
    assert both.target.contrast.id == contrast and both.target.id == target
    # Vocabulary projections (computed once per neuron in the contrastive path) are the neuron's own.
    again = attribute(model, IDS, target, top_k=10, contrast=contrast)
    wide = {(n.layer, n.neuron): n for n in attribute(model, IDS, target, top_k=10_000).ffn_neurons}
    for n, m in zip(both.ffn_neurons, again.ffn_neurons):
        own = wide[(n.layer, n.neuron)]
        assert n.top_tokens == m.top_tokens == own.top_tokens and n.bottom_tokens == own.bottom_tokens
    assert both.target.contrast.prob == pytest.approx(other.target.prob, rel=1e-6)
    assert both.target.contrast.rank == other.target.rank


def test_contrast_json_round_trip_and_omitted_without_one(tmp_path):
    model = tiny_llama()
    result = attribute(model, IDS, 11, top_k=3, contrast=40)
    data = result.to_dict()
    assert set(data["target"]["contrast"]) == {"text", "id", "prob", "rank"}
    result.save(tmp_path / "a.json")
    assert Attribution.load(tmp_path / "a.json").target.contrast == result.target.contrast
    assert "contrast" not in attribute(model, IDS, 11, top_k=3).to_dict()["target"]


def test_contrast_equal_to_the_target_is_refused():
    model = tiny_llama()
    with pytest.raises(UserError, match="contrast .* is the target's own first token"):
        attribute(model, IDS, 11, top_k=3, contrast=11)


@pytest.mark.slow
def test_contrast_on_the_real_model(real_model, tmp_path):
    """SmolLM2: the contrastive top-50 equals an independent float64 ranking of the linear scores over every
    neuron, and the scores equal score(Paris) − score(London) of the same neurons."""
    prompt = "The capital of France is"
    result = attribute(real_model, prompt, " Paris", top_k=50, contrast=" London", query_top=0)
    ids = real_model.tokenizer(prompt)["input_ids"]
    from neuron_attribution.model.trace import trace_token_ids
    trace = trace_token_ids(real_model, [ids])[0]
    norm = real_model.adapter.final_norm()
    h = trace.final_residual[-1].double()
    scale = 1 / (h.pow(2).mean() + norm.eps).sqrt()
    unembedding = real_model.adapter.unembedding[0]
    direction = (unembedding[result.target.id] - unembedding[result.target.contrast.id]).double() * \
        norm.weight.double() * scale
    values = torch.stack([real_model.adapter.layer_weights(l).ffn_values.double()
                          for l in range(real_model.shape.n_layers)])  # (L, N, d)
    linear = trace.ffn_coefficients[:, -1].double() * (values @ direction)
    assert [(n.layer, n.neuron) for n in result.ffn_neurons] == _dense_ranking(linear.numpy(), 50)
    assert [n.score for n in result.ffn_neurons] == pytest.approx(
        [float(linear[n.layer, n.neuron]) for n in result.ffn_neurons], abs=1e-4)
    chosen = [n.index for n in result.ffn_neurons[:10]] + [n.index for n in result.attention_neurons[:10]]
    paris, london = (score_neurons(real_model, prompt, t, chosen).as_array()[0] for t in (" Paris", " London"))
    expected = [n.score for n in result.ffn_neurons[:10]] + [n.score for n in result.attention_neurons[:10]]
    assert (paris - london).tolist() == pytest.approx(expected, abs=1e-4)
    # Lines of a prompts file may carry their own contrast.
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "The capital of France is", "target": " Paris", "contrast": " London"}\n'
                    '{"prompt": "The capital of Japan is", "target": " Tokyo", "contrast": " Tokyo"}\n')
    lines, skipped = load_prompt_lines(path)
    results, not_usable = attribute_lines(real_model, lines, ScoringOptions(top_k=5, query_top=0))
    assert len(results) == 1 and results[0][1].target.contrast.text == " London"
    assert len(not_usable) == 1 and "contrast" in not_usable[0].reason
    # Dataset lines for `run`: a contrast whose first token is the answer's is skipped before anything runs.
    from neuron_attribution.datasets import Fact
    from neuron_attribution.model.prompts import encode_facts
    sentences, skipped = encode_facts(real_model, [Fact(prompt, "Paris", "capital", "f", 1, "Paris!"),
                                                   Fact(prompt, "Paris", "capital", "f", 2, " London")])
    assert [s.fact.line for s in sentences] == [2] and "contrast" in skipped[0].reason


def test_prompts_file_contrast_equal_to_top_prediction_skips_only_that_line():
    """#23 item 6: a line without a target whose contrast is the model's top prediction is known to be bad
    only after the forward pass; it is skipped with its reason, the other lines of its batch are attributed."""
    model = tiny_llama()
    prompts = [[5, 9, 11], [7, 3, 2, 8], [1, 4]]
    top = int(attribute(model, prompts[1], top_k=1, query_top=0).target.id)
    lines = [PromptLine(p, None, "p.jsonl", i + 1, contrast=(top if i == 1 else (top + 1) % TINY_VOCAB))
             for i, p in enumerate(prompts)]
    results, skipped = attribute_lines(model, lines, ScoringOptions(top_k=3, query_top=0), batch_size=8)
    assert [line.line for line, _ in results] == [1, 3]
    assert [(s.line, s.source) for s in skipped] == [(2, "p.jsonl")] and "contrast" in skipped[0].reason
    with pytest.raises(UserError, match=r"^p\.jsonl:2: "):
        attribute_lines(model, lines, ScoringOptions(top_k=3, query_top=0), on_error="stop")


def test_score_neurons_takes_a_contrast():
    """#26 item 9: score_neurons scores log p(target) − log p(contrast) for chosen neurons, as attribute does:
    the difference of the two targets' own scores, the log-normaliser cancelling."""
    model = tiny_llama()
    chosen = ["1_3", "2_17", "0_1_2@3", "2_0_5"]
    target, rival = (score_neurons(model, IDS, t, chosen).as_array()[0] for t in (11, 40))
    both = score_neurons(model, IDS, 11, chosen, contrast=40)
    assert both.as_array()[0].tolist() == pytest.approx((target - rival).tolist(), abs=1e-5)
    many = score_neurons(model, [IDS, IDS[:4]], [11, 12], chosen, contrast=[40, 41])
    alone = score_neurons(model, IDS[:4], 12, chosen, contrast=41)
    assert many.as_array()[1].tolist() == pytest.approx(alone.as_array()[0].tolist(), abs=1e-6)
