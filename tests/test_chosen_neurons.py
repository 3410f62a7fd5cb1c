"""Scoring chosen neurons (`score_neurons`, `attribute --neurons`) and the sign-aware `promoted_tokens`, against
independent computations of the definitions."""

from __future__ import annotations

import html
import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from neuron_attribution import AttentionIndex, FfnIndex, HeadIndex, UserError, attribute
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings
from neuron_attribution.pipelines.score import score_neurons
from neuron_attribution.reports.terminal import print_attribution

from . import reference


def test_every_neuron_of_a_tiny_model_equals_its_dense_score(tiny_model, token_batches):
    ids, target = token_batches[0], 7
    result = attribute(tiny_model, ids, target, top_k=3, dense=True)
    s = tiny_model.shape
    ffn = [FfnIndex(l, n) for l in range(s.n_layers) for n in range(s.d_ffn)]
    attention = [AttentionIndex(l, h, d, p) for l in range(s.n_layers) for h in range(s.n_heads)
                 for d in range(s.head_dim) for p in range(len(ids))]
    heads = [HeadIndex(l, h) for l in range(s.n_layers) for h in range(s.n_heads)]
    scores = score_neurons(tiny_model, ids, target, [*ffn, *attention, *heads])
    got = torch.tensor(scores.scores[0], dtype=torch.float64)
    n_ffn, n_attention = len(ffn), len(attention)
    assert torch.allclose(got[:n_ffn], torch.from_numpy(result.dense.ffn).double().reshape(-1), atol=2e-6)
    assert torch.allclose(got[n_ffn: n_ffn + n_attention],
                          torch.from_numpy(result.dense.attention).double().reshape(-1), atol=2e-6)
    by_head = {(h.layer, h.head): h.score for h in result.heads}
    assert got[n_ffn + n_attention:].tolist() == pytest.approx([by_head[h] for h in heads], abs=2e-6)
    trace = trace_token_ids(tiny_model, [ids])[0]  # a neuron without a position: its output from every position
    whole = score_neurons(tiny_model, ids, target, [AttentionIndex(1, 2, 3)]).scores[0][0]
    vector = sum(reference.attention_neuron_vector(tiny_model, trace, 1, 2, 3, p) for p in range(len(ids)))
    assert whole == pytest.approx(reference.increase(tiny_model, trace, trace.layer_inputs[1, -1], vector, target),
                                  abs=2e-6)


def test_many_prompts_and_every_way_of_naming_a_neuron(tiny_model, token_batches):
    prompts, targets = token_batches[:3], [7, 11, None]
    named = [FfnIndex(1, 3), ("ffn", 1, 3), "1_3", ("attention", 0, 1, 2, 0), "0_1_2@0", ("head", 2, 1), "2.1"]
    scores = score_neurons(tiny_model, prompts, targets, named)
    assert len(scores.scores) == 3 and all(len(row) == len(named) for row in scores.scores)
    for row, prompt, target in zip(scores.scores, prompts, targets):
        assert row[0] == row[1] == row[2] and row[3] == row[4] and row[5] == row[6]
        alone = score_neurons(tiny_model, prompt, target, [FfnIndex(1, 3)]).scores[0][0]
        assert row[0] == pytest.approx(alone, abs=1e-6)  # batching prompts changes nothing
    assert [t.id for t in scores.targets[:2]] == [7, 11]
    assert scores.coefficients[0][5] is None  # a head has no single coefficient
    for bad in (["99_1"], [("ffn", 0)], ["0_1_2@40"], [("tensor", 1, 2)], []):
        with pytest.raises(UserError):
            score_neurons(tiny_model, prompts[0], 7, bad)
    with pytest.raises(UserError, match="3 prompts but 2 targets"):
        score_neurons(tiny_model, prompts, [7, 11], ["1_3"])


@pytest.mark.slow
def test_chosen_neurons_on_the_real_model(real_model):
    """A sample of 50 FFN and 50 attention neurons, and heads, against the float64 computation of the
    definition; and the top-k entries of `attribute` again."""
    prompt, target = "The capital of France is", " Paris"
    result = attribute(real_model, prompt, target, top_k=10)
    ids = real_model.tokenizer(prompt)["input_ids"]
    trace = trace_token_ids(real_model, [ids])[0]
    s, generator = real_model.shape, torch.Generator().manual_seed(5)
    ffn = [FfnIndex(int(l), int(n)) for l, n in zip(torch.randint(0, s.n_layers, (50,), generator=generator),
                                                   torch.randint(0, s.d_ffn, (50,), generator=generator))]
    attention = [AttentionIndex(*(int(torch.randint(0, m, (1,), generator=generator)) for m in
                                  (s.n_layers, s.n_heads, s.head_dim, len(ids)))) for _ in range(50)]
    top = [n.index for n in result.ffn_neurons] + [n.index for n in result.attention_neurons]
    scores = score_neurons(real_model, prompt, target, [*ffn, *attention, HeadIndex(23, 4), *top]).scores[0]
    wid = result.target.id
    want = [reference.ffn_neuron_score(real_model, trace, n.layer, n.neuron, wid) for n in ffn]
    want += [reference.attention_neuron_score(real_model, trace, *n, wid) for n in attention]
    want.append(reference.head_score(real_model, trace, 23, 4, wid))
    assert scores[:101] == pytest.approx(want, abs=2e-5)
    assert scores[101:] == pytest.approx([n.score for n in [*result.ffn_neurons, *result.attention_neurons]],
                                         abs=1e-5)


def _promoted(model, neuron, k=10) -> list[str]:
    """Top tokens of the vocabulary projection of the neuron's signed contribution m·fc2, float64."""
    norm = model.adapter.final_norm()
    vector = neuron.coefficient * model.adapter.layer_weights(neuron.layer).ffn_values[neuron.neuron].double()
    if norm.kind == "layernorm":
        vector = vector - vector.mean()
    logits = model.adapter.unembedding[0].double() @ (norm.weight.double() * vector)
    return [model.tokenizer.decode([int(i)]) for i in logits.topk(k).indices]


@pytest.mark.slow
def test_promoted_tokens_mean_one_thing_everywhere(real_model, tmp_path):
    result = attribute(real_model, "The capital of France is", " Paris", top_k=12)
    assert any(n.coefficient < 0 for n in result.ffn_neurons) and any(n.coefficient > 0 for n in result.ffn_neurons)
    for n in result.ffn_neurons:
        assert n.promoted_tokens == _promoted(real_model, n), n
        assert n.promoted_tokens == (n.top_tokens if n.coefficient >= 0 else n.bottom_tokens)
    as_json = result.to_dict()["ffn_neurons"]
    assert [n["promoted_tokens"] for n in as_json] == [n.promoted_tokens for n in result.ffn_neurons]
    out = io.StringIO()
    print_attribution(Console(file=out, width=250), result, rows=12)
    text = out.getvalue()
    for n in result.ffn_neurons:
        line = next(line for line in text.splitlines() if f" {n.layer}_{n.neuron} " in line)
        assert " ".join(repr(t) for t in n.promoted_tokens[:6]) in line
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "The capital of France is", "answer": "Paris", "type": "capital"}) + "\n")
    run_dataset(real_model, tmp_path / "run", RunArguments(str(facts)), settings=run_settings(real_model, 12))
    table = pq.read_table(tmp_path / "run" / "ffn_neurons.parquet").to_pydict()
    assert table["promoted_tokens"] == [n.promoted_tokens for n in result.ffn_neurons]
    from neuron_attribution.pipelines.analyze import analyze_run
    from neuron_attribution.reports.html import render_html

    page = render_html(analyze_run(tmp_path / "run", interventions=False), {})
    for n in result.ffn_neurons[:5]:  # the report's examples: each neuron's first six promoted tokens
        assert html.escape(" ".join(repr(t) for t in n.promoted_tokens[:6]), quote=True) in page, n
