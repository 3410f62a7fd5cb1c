"""Metrics, per-row interventions, the evaluation protocols and fact files, checked against computations
written here."""

from __future__ import annotations

import json

import pytest
import torch

from neuron_attribution import UserError
from neuron_attribution.datasets import Fact, load_facts, packaged_datasets
from neuron_attribution.model.prompts import Sentence
from neuron_attribution.pipelines.evaluate import evaluate_sentences
from neuron_attribution.scoring.methods import resolve_methods
from neuron_attribution.model.interventions import Ablation, ablated, last_logits_each
from neuron_attribution.results.metrics import GoldScores, Metrics
from neuron_attribution.model.trace import trace_token_ids

from . import reference
from .test_baselines import _dense_ranking, reference_scores


def test_gold_scores_and_metrics():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 5.0]])
    scores = GoldScores.of(logits, torch.tensor([2, 0]))
    assert scores.reciprocal_rank.tolist() == [0.5, 0.5]  # ties count as not above the gold token
    expected = torch.log_softmax(logits.double(), -1)[[0, 1], [2, 0]]
    assert torch.allclose(scores.log_prob, expected)
    original = Metrics.of(scores)
    worse = Metrics.of(GoldScores.of(torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 5.0]]), torch.tensor([2, 0])),
                       original)
    assert worse.mrr == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert worse.mrr_decrease == pytest.approx((0.5 - worse.mrr) / 0.5)
    assert worse.prob_decrease == pytest.approx((original.prob - worse.prob) / original.prob)
    assert worse.log_prob_drop == pytest.approx(original.log_prob - worse.log_prob)


def test_a_different_ablation_per_row_equals_each_alone(tiny_model, token_batches):
    ids = [token_batches[0], token_batches[1], token_batches[3], token_batches[1]]
    ablations = [Ablation(ffn=[(0, 3), (2, 5)]), Ablation(heads=[(1, 2)]),
                 Ablation(attention_at=[(2, 1, 3, 2), (1, 3, 0, 0)], attention=[(0, 1, 1)]), Ablation()]
    together = last_logits_each(tiny_model, ids, ablations, batch_size=4)
    for row, (prompt, ablation) in enumerate(zip(ids, ablations)):
        with ablated(tiny_model, ablation), torch.inference_mode():
            alone = tiny_model.hf_model(torch.tensor([prompt])).logits[0, -1].float()
        assert torch.allclose(together[row], alone, atol=1e-5), row


def _sentences(model, token_batches, types=("a", "b", "a")):
    result = []
    for ids, kind in zip(token_batches, types):
        trace = trace_token_ids(model, [ids])[0]
        fact = Fact("", "", kind, "test", 0)
        result.append(Sentence(fact, ids, int(trace.logits.argmax())))
    return result


def _gold_prob(model, ids, target, ablation):
    with ablated(model, ablation), torch.inference_mode():
        logits = model.hf_model(torch.tensor([ids])).logits[0, -1].double()
    return float(torch.softmax(logits, -1)[target])


def test_compare_switches_off_each_methods_top_neurons(tiny_model, token_batches):
    sentences = _sentences(tiny_model, token_batches)
    state = {k: v.clone() for k, v in tiny_model.hf_model.state_dict().items()}
    result = evaluate_sentences(tiny_model, sentences, methods="log_prob_increase,norm", top=4)
    assert list(result.methods) == ["original", "log_prob_increase", "norm"]
    n = tiny_model.shape.d_ffn
    for key in ("log_prob_increase", "norm"):
        probs, originals = [], []
        for sentence in sentences:
            trace = trace_token_ids(tiny_model, [sentence.ids])[0]
            best = _dense_ranking(reference_scores(tiny_model, trace, sentence.target)[key], 4)
            probs.append(_gold_prob(tiny_model, sentence.ids, sentence.target,
                                    Ablation(ffn=[divmod(i, n) for i in best])))
            originals.append(_gold_prob(tiny_model, sentence.ids, sentence.target, Ablation()))
        assert result.methods[key].prob == pytest.approx(sum(probs) / len(probs), abs=1e-6)
        assert result.methods["original"].prob == pytest.approx(sum(originals) / len(originals), abs=1e-6)
    assert all(torch.equal(state[k], v) for k, v in tiny_model.hf_model.state_dict().items())


def test_value_protocol_switches_off_the_top_value_neurons(tiny_model, token_batches):
    sentence = _sentences(tiny_model, token_batches[:1])[0]
    result = evaluate_sentences(tiny_model, [sentence], protocol="value", top=6)
    assert set(result.methods) == {"original", "value", "random"}
    trace = trace_token_ids(tiny_model, [sentence.ids])[0]
    s = tiny_model.shape
    ffn = reference_scores(tiny_model, trace, sentence.target)["log_prob_increase"]
    attention = {(l, h, n, p): reference.attention_neuron_score(tiny_model, trace, l, h, n, p, sentence.target)
                 for l in range(s.n_layers) for h in range(s.n_heads) for n in range(s.head_dim)
                 for p in range(trace.n_tokens)}
    best_attention = sorted(attention, key=lambda key: -attention[key])[:4]
    best_ffn = [divmod(i, s.d_ffn) for i in _dense_ranking(ffn, 2)]
    expected = _gold_prob(tiny_model, sentence.ids, sentence.target,
                          Ablation(ffn=best_ffn, attention_at=best_attention))
    assert result.methods["value"].prob == pytest.approx(expected, abs=1e-6)


def test_query_and_heads_protocols(tiny_model, token_batches):
    sentences = _sentences(tiny_model, token_batches)
    query = evaluate_sentences(tiny_model, sentences, protocol="query", top=5)
    assert set(query.methods) == {"original", "query", "random"} and query.top == 5
    heads = evaluate_sentences(tiny_model, sentences, protocol="heads", top=2)
    assert set(heads.methods) == {"original", "heads:a", "heads:b", "random"}
    assert set(heads.by_type) == {"a", "b", "random"} and set(heads.by_type["a"]) == {"a", "b"}
    # type b has one sentence: its heads are that sentence's two best heads by the definition
    b = sentences[1]
    trace = trace_token_ids(tiny_model, [b.ids])[0]
    s = tiny_model.shape
    scores = {(l, h): reference.head_score(tiny_model, trace, l, h, b.target)
              for l in range(s.n_layers) for h in range(s.n_heads)}
    assert heads.heads["b"] == sorted(scores, key=lambda key: -scores[key])[:2]
    expected = _gold_prob(tiny_model, b.ids, b.target, Ablation(heads=heads.heads["b"]))
    assert heads.by_type["b"]["b"].prob == pytest.approx(expected, abs=1e-6)
    payload = json.loads(json.dumps(heads.to_dict()))
    assert payload["by_type"]["a"]["b"]["mrr"] == heads.by_type["a"]["b"].mrr


def test_methods_as_a_user_names_them(monkeypatch, capsys):
    """`--methods all` is the paper's comparison: its eight methods in the order of its table (docs/method.md §4)
    and the random control (integrated gradients is an extra you name); an unknown name is one line, exit 2,
    before any model loads."""
    from neuron_attribution.cli import datasets as cli_datasets

    from .conftest import run_cli

    assert resolve_methods("all") == ["log_prob_increase", "log_probability", "prob_increase", "norm", "coefficient",
                                      "rank", "coefficient_x_norm", "coefficient_x_rank", "random"]
    assert resolve_methods(" norm,integrated_gradients ") == ["norm", "integrated_gradients"]

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_datasets, "load_driver_model", must_not_load)
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--dataset", "sample", "--methods", "norm,magic")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "known: all, log_prob_increase" in err, err


def test_fact_files(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text('{"prompt": "A", "answer": "b", "type": "t"}\n'
                    "not json\n"
                    '{"prompt": "A"}\n'
                    "\n"
                    '{"prompt": "A", "answer": "  "}\n'
                    '["a list"]\n'
                    '{"prompt": "C", "answer": "d"}\n')
    facts, skipped = load_facts(str(path))
    assert [(f.prompt, f.answer, f.type, f.line) for f in facts] == [("A", "b", "t", 1), ("C", "d", None, 7)]
    assert [(s.line, s.reason) for s in skipped] == [
        (2, "not valid JSON (Expecting value)"), (3, "missing or non-text field 'answer'"), (5, "empty answer"),
        (6, "not a JSON object")]
    with pytest.raises(UserError, match=r"facts.jsonl:2: not valid JSON"):
        load_facts(str(path), on_error="stop")


def test_dataset_names_stay_inside_the_package(tmp_path, monkeypatch):
    assert "sample" in packaged_datasets()
    facts, skipped = load_facts("sample")
    assert len(facts) >= 50 and not skipped
    monkeypatch.chdir(tmp_path)
    for name in ("../sample", "../../data/sample", "sample.jsonl", "/etc/passwd-nope"):
        with pytest.raises(UserError, match="no dataset"):
            load_facts(name)


def test_a_dataset_argument_may_list_types_and_files(tmp_path, monkeypatch):
    """#35 item 5: `--dataset capital,language` (refused before) reads both types' facts, in order, each file once;
    a file may stand in the list; a file whose name holds a comma is that file; a bad part is named."""
    capital, _ = load_facts("capital")
    language, _ = load_facts("language")
    both, skipped = load_facts("capital, language,capital")
    assert not skipped
    assert [(f.prompt, f.answer) for f in both] == [(f.prompt, f.answer) for f in capital + language]
    assert {f.type_name for f in both} == {"capital", "language"}
    mine = tmp_path / "mine.jsonl"
    mine.write_text('{"prompt": "A", "answer": "b", "type": "t"}\n')
    facts, _ = load_facts(f"capital,{mine}")
    assert len(facts) == len(capital) + 1 and facts[-1].prompt == "A"
    odd = tmp_path / "a,b.jsonl"
    odd.write_text('{"prompt": "C", "answer": "d"}\n')
    assert [f.prompt for f in load_facts(str(odd))[0]] == ["C"]
    with pytest.raises(UserError, match="no dataset 'nope'"):
        load_facts("capital,nope")
    with pytest.raises(UserError, match="empty name between commas"):
        load_facts("capital,,language")
