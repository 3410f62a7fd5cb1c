"""Multi-token answers by teacher forcing (docs/method.md §2): every neuron's score is the sum of its
single-token scores at the predicting positions, computed here from independent single-token attributions of
the teacher-forced prompts (token ids, so tokenisation cannot drift)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron_attribution import UserError, attribute
from neuron_attribution.results.attribution import Attribution

from .conftest import tiny_family, tiny_gpt2, tiny_llama
from .test_families import _dense_ranking

PROMPT = [5, 17, 3, 99, 42]
ANSWER = [11, 40, 7]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama, lambda: tiny_family("gemma2"), lambda: tiny_family("phi")],
                         ids=["gpt2", "llama", "gemma2", "phi-parallel"])
def test_all_tokens_is_the_sum_of_the_teacher_forced_single_tokens(make):
    model = make()
    s = model.shape
    n_ffn, width = s.n_layers * s.d_ffn, len(PROMPT) + len(ANSWER) - 1
    n_attention = s.n_layers * s.n_heads * s.head_dim * width
    result = attribute(model, PROMPT, ANSWER, top_k=max(n_ffn, n_attention), answer_tokens="all", query_top=0)
    singles = [attribute(model, PROMPT + ANSWER[:i], token, top_k=5, dense=True, query_top=0)
               for i, token in enumerate(ANSWER)]
    ffn = np.stack([r.dense.ffn for r in singles])  # (m, L, N)
    attention = np.zeros((len(ANSWER), s.n_layers, s.n_heads, s.head_dim, width))
    for i, r in enumerate(singles):
        attention[i, ..., : r.dense.attention.shape[-1]] = r.dense.attention
    assert len(result.ffn_neurons) == n_ffn and len(result.attention_neurons) == n_attention
    for n in result.ffn_neurons:
        assert n.token_scores == pytest.approx(ffn[:, n.layer, n.neuron].tolist(), abs=1e-5)
        assert n.score == pytest.approx(float(ffn[:, n.layer, n.neuron].sum()), abs=1e-5)
    for n in result.attention_neurons:
        expected = attention[:, n.layer, n.head, n.dim, n.position]
        assert n.token_scores == pytest.approx(expected.tolist(), abs=1e-5)
        assert n.score == pytest.approx(float(expected.sum()), abs=1e-5)
    assert [(n.layer, n.neuron) for n in result.ffn_neurons[:15]] == _dense_ranking(ffn.sum(0), 15)
    assert [(n.layer, n.head, n.dim, n.position) for n in result.attention_neurons[:15]] == \
        _dense_ranking(attention.sum(0), 15)
    assert result.layers.ffn == pytest.approx(np.sum([r.layers.ffn for r in singles], 0).tolist(), abs=1e-5)
    assert result.layers.attention == pytest.approx(np.sum([r.layers.attention for r in singles], 0).tolist(),
                                                    abs=1e-5)
    # Per-token probabilities are the model's own at each teacher-forced position.
    with torch.no_grad():
        logits = model.hf_model(torch.tensor([PROMPT + ANSWER[:-1]])).logits[0].double()
    for i, token in enumerate(result.target.tokens):
        probs = torch.softmax(logits[len(PROMPT) - 1 + i], -1)
        assert token.id == ANSWER[i] and token.prob == pytest.approx(float(probs[ANSWER[i]]), rel=1e-4)


def test_top_k_with_queries_and_json_round_trip(tmp_path):
    model = tiny_llama()
    result = attribute(model, PROMPT, ANSWER, top_k=10, answer_tokens="all", query_via="both")
    assert result.query_neurons and len(result.target.tokens) == 3 and result.target.n_answer_tokens == 3
    data = result.to_dict()
    assert [t["id"] for t in data["target"]["tokens"]] == ANSWER
    assert len(data["ffn_neurons"][0]["token_scores"]) == 3
    result.save(tmp_path / "a.json")
    back = Attribution.load(tmp_path / "a.json")
    assert back.target.tokens == result.target.tokens and back.ffn_neurons[0].token_scores == \
        result.ffn_neurons[0].token_scores
    single = attribute(model, PROMPT, ANSWER[0], top_k=3).to_dict()
    assert "tokens" not in single["target"] and "token_scores" not in single["ffn_neurons"][0]
    first = attribute(model, PROMPT, ANSWER[0], top_k=10, answer_tokens="all")  # one token: the same scores
    plain = attribute(model, PROMPT, ANSWER[0], top_k=10)
    assert [n.score for n in first.ffn_neurons] == pytest.approx([n.score for n in plain.ffn_neurons], abs=1e-6)


@pytest.mark.parametrize("answer, answer_tokens, message", [
    ([], "all", "the answer has no tokens"),
    (None, "all", "needs the answer"),
    (ANSWER, "every", "answer_tokens must be one of first, all"),
])
def test_bad_answers(answer, answer_tokens, message):
    with pytest.raises(UserError, match=message):
        attribute(tiny_llama(), PROMPT, answer, top_k=3, answer_tokens=answer_tokens)


def test_contrast_with_all_tokens_is_refused():
    with pytest.raises(UserError, match="contrast applies to a single answer token"):
        attribute(tiny_llama(), PROMPT, ANSWER, top_k=3, answer_tokens="all", contrast=9)


def test_a_coefficient_per_answer_token_and_the_whole_answer_named():
    """#35 item 7: 26_168 was scored at two positions but had one coefficient. Every neuron carries its
    coefficient at each predicting position (a trace of that teacher-forced prefix, read independently), an
    attention neuron None where the position comes before its source; the target names the whole answer."""
    from neuron_attribution.model.trace import trace_token_ids

    model = tiny_llama()
    s = model.shape
    result = attribute(model, PROMPT, ANSWER, top_k=400, answer_tokens="all", query_top=0)
    traces = [trace_token_ids(model, [PROMPT + ANSWER[:i]])[0] for i in range(len(ANSWER))]
    assert result.target.answer == "".join(result.tokens[len(PROMPT):]) + result.target.tokens[-1].text
    assert result.target.to_dict()["answer"] == result.target.answer
    for n in result.ffn_neurons:
        expected = [float(t.ffn_coefficients[n.layer, -1, n.neuron]) for t in traces]
        assert n.token_coefficients == pytest.approx(expected, rel=1e-4, abs=1e-5)  # batched vs alone
        assert n.coefficient == pytest.approx(expected[0], rel=1e-4, abs=1e-5)
    late = 0
    for n in result.attention_neurons:
        kv = s.kv_head_of(n.head)
        expected = [None if n.position >= t.n_tokens else
                    float(t.attention_weights[n.layer, n.head, n.position] * t.value_states[n.layer, n.position, kv, n.dim])
                    for t in traces]
        assert [c is None for c in n.token_coefficients] == [e is None for e in expected]
        late += n.position >= len(PROMPT)
        assert [c for c in n.token_coefficients if c is not None] == \
            pytest.approx([e for e in expected if e is not None], rel=1e-4, abs=1e-6)
    assert late  # attention neurons inside the answer, unseen by the first predicting position
    single = attribute(model, PROMPT, ANSWER[0], top_k=5, query_top=0)
    assert single.target.answer is None and "answer" not in single.target.to_dict()
    assert all(n.token_coefficients is None for n in single.ffn_neurons)
