"""The command line as a user meets it: reports, JSON fields outside tools read, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron_attribution.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_attribute_json_fields(tmp_path, real_model, cli):
    out = tmp_path / "paris.json"
    result = cli("attribute", "The capital of France is", "--target", "Paris", "--top", "12", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Top FFN value neurons" in result.stdout and "' Paris'" in result.stdout
    data = json.loads(out.read_text())
    assert data["prompt"] == "The capital of France is"
    assert data["tokens"] == ["The", " capital", " of", " France", " is"]
    assert set(data["target"]) >= {"text", "id", "prob", "rank"} and data["target"]["text"] == " Paris"
    assert len(data["layers"]["attention"]) == len(data["layers"]["ffn"]) == 30
    assert len(data["heads"]) == 30 * 9
    assert set(data["heads"][0]) == {"layer", "head", "score", "direct_score", "normaliser_change"}
    parts = {"direct_score", "normaliser_change", "target_push_rank", "suppressed_tokens", "promoted_tokens"}
    for key, fields in (("ffn_neurons", {"layer", "neuron", "score", "coefficient", "top_tokens", "bottom_tokens",
                                         *parts}),
                        ("attention_neurons", {"layer", "head", "dim", "position", "token", "score",
                                               "coefficient", "sink", *parts})):
        rows = data[key]
        assert len(rows) == 12 and set(rows[0]) == fields
        assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    queries = data["query_neurons"]
    assert len(queries) == 12
    # The default path is the paper's: through the attention value neurons only.
    assert data["query_via"] == "attention" and data["rank_by"] == "score" and data["vocab_size"] == 49152
    first = data["ffn_neurons"][0]
    assert first["direct_score"] - first["normaliser_change"] == pytest.approx(first["score"], abs=1e-6)
    assert set(queries[0]) == {"layer", "neuron", "score", "attention_score", "position", "token", "coefficient",
                               "sink"}
    assert data["measured_top"] == 0 and data["measured_together"] is None  # no --measure: nothing measured
    assert all(q["score"] == q["attention_score"] for q in queries)
    assert data["query_layers"]["for_ffn"] == []
    rows = data["query_layers"]["for_attention"]
    assert {row["component"] for row in rows} == {"embedding", "attention", "ffn"}
    assert set(rows[0]) >= {"component", "layer", "score"}


@pytest.mark.parametrize("args, message", [
    (["attribute", ""], "error: the prompt is empty"),
    (["attribute", "Hello", "--top", "0"], "error: --top must be a positive number"),
    (["attribute", "Hello", "--query-top", "-1"], "error: --query-top must be 0 or more (0: no query neurons)"),
    (["attribute", "Hello", "--target", " "], "error: the target is empty"),
    (["info", "--model", "/nonexistent/model"], "error: no such model path: /nonexistent/model"),
    (["attribute", "Hello", "--query-via", "heads"], "error: query_via must be one of attention, ffn, both, got "
                                                     "'heads'"),
    (["attribute", "Hello", "--answer-tokens", "some"], "error: answer_tokens must be one of first, all, got 'some'"),
    (["attribute", "Hello", "--rank-by", "logit"], "error: rank_by must be one of score, direct, measured, got 'logit'"),
    (["attribute", "The capital of France is", "--target", " Paris", "--contrast", "Paris"],
     "error: the contrast ' Paris' is the target's own first token; a contrast must differ"),
    (["attribute", "The capital of France is", "--answer-tokens", "all"],
     "error: --answer-tokens all needs the answer (text or token ids), not the top prediction"),
])
def test_bad_input_exits_2_in_one_line(args, message, real_model, cli):
    result = cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_an_unwritable_run_directory_is_refused_before_the_model_loads(tmp_path, cli, no_model_loads):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("run", "--dataset", "sample", "--out", str(blocker / "run"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: cannot write to {blocker / 'run'}: {blocker} is not a directory"
    assert "filtering" not in result.stdout and not (blocker.parent / "run").exists()


def test_unknown_flag_exits_2():
    result = run("attribute", "Hello", "--no-such-flag")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_evaluate_json_fields(tmp_path, real_model, cli):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "answer": "Paris", "type": "capital"}\n'
                     '{"prompt": "The capital of Italy is", "answer": "Rome"}\n'
                     "{broken\n"
                     '{"prompt": "One plus one equals", "answer": ""}\n')
    out = tmp_path / "evaluation.json"
    result = cli("evaluate", "--dataset", str(facts), "--methods", "log_prob_increase,norm,random", "--top", "5",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "log_prob_increase" in result.stdout and "Skipped 2" in result.stdout
    data = json.loads(out.read_text())
    assert data["n_sentences"] == 2 and data["top"] == 5 and data["model"] == "SmolLM2-135M-Instruct"
    assert list(data["methods"]) == ["original", "log_prob_increase", "norm", "random"]
    assert set(data["methods"]["norm"]) >= {"mrr", "prob", "log_prob", "mrr_decrease", "prob_decrease"}
    assert data["n_skipped"] == 2 and [s["line"] for s in data["skipped"]] == [3, 4]
    assert data["methods"]["log_prob_increase"]["prob"] < data["methods"]["original"]["prob"]


@pytest.mark.parametrize("args, message", [
    (["evaluate", "--dataset", "sample", "--methods", "norm,magic"], "error: unknown method 'magic'; known: all, "),
    (["evaluate", "--dataset", "../sample"], "error: no dataset '../sample': not a packaged dataset"),
    (["evaluate", "--dataset", "sample", "--protocol", "guess"], "error: unknown protocol 'guess'"),
    (["evaluate", "--dataset", "sample", "--limit", "0"], "error: --limit must be a positive number"),
    (["evaluate", "--dataset", "sample", "--on-error", "maybe"], "error: --on-error must be skip or stop"),
])
def test_evaluate_bad_input(args, message, cli, no_model_loads):
    result = cli(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_evaluate_stops_at_a_malformed_line(tmp_path, cli, no_model_loads):
    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "A", "answer": "b"}\n{"prompt": 3, "answer": "b"}\n')
    result = cli("evaluate", "--dataset", str(facts), "--on-error", "stop")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: {facts}:2: missing or non-text field 'prompt'"


@pytest.mark.slow
def test_a_token_id_target_and_a_fragment_warning(tmp_path, real_model, cli):
    out = tmp_path / "id.json"
    result = cli("attribute", "The capital of France is", "--target-id", "42", "--top", "5", "--query-top", "0",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["target"]["id"] == 42
    for args, message in ((("--target-id", "99999999"), "error: target id 99999999 is outside the vocabulary"),
                          (("--target-id", "-5"), "error: --target-id -5: a token id is 0 or more"),
                          (("--target-id", "7", "--target", "Paris"), "error: give --target (answer text) or")):
        failed = cli("attribute", "The capital of France is", *args)
        assert failed.returncode == 2 and failed.stderr.startswith(message), failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
    fragment = cli("attribute", "The capital of France is", "--target", "zqxjvkw", "--top", "3", "--query-top", "0")
    assert fragment.returncode == 0, fragment.stderr
    assert "Warning: the answer is" in fragment.stdout and "only its first" in fragment.stdout
    whole = cli("attribute", "The capital of France is", "--target", " Paris", "--top", "3", "--query-top", "0")
    assert "Warning" not in whole.stdout


def test_a_top_that_reaches_every_ffn_neuron_is_announced_as_dense_scoring():
    from neuron_attribution.cli.common import console, warn_if_dense

    from .conftest import tiny_llama

    shape = tiny_llama().shape  # 3 layers × 40 FFN neurons
    with console.capture() as captured:
        warn_if_dense(shape, 119)
    assert captured.get() == ""
    with console.capture() as captured:
        warn_if_dense(shape, 100_000_000)
    text = " ".join(captured.get().split())
    assert "Warning: --top 100000000 reaches the model's 120 FFN neurons (3 layers × 40)" in text
    assert "as slow as dense scoring" in text


def test_chosen_neurons_with_a_contrast(tmp_path, real_model, cli):
    """#26 item 9: `--neurons` takes `--contrast` as attribute does: each score is the change of
    log p(target) − log p(contrast), the numbers of score_neurons(contrast=...)."""
    from neuron_attribution import score_neurons

    out = tmp_path / "chosen.json"
    result = cli("attribute", "The capital of France is", "-t", " Paris", "--contrast", " London", "--neurons",
                 "27_846,23_4_38@3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "rather than ' London'" in result.stdout
    expected = score_neurons(real_model, "The capital of France is", " Paris", ["27_846", "23_4_38@3"],
                             contrast=" London").scores[0]
    assert json.loads(out.read_text())["scores"][0] == pytest.approx(expected, abs=1e-6)
    plain = score_neurons(real_model, "The capital of France is", " Paris", ["27_846", "23_4_38@3"]).scores[0]
    assert abs(expected[0] - plain[0]) > 0.1  # the contrast changes the numbers


def test_the_clis_defaults_are_the_librarys():
    """The CLI's option defaults are the library's constants, not literals that could drift from them."""
    import inspect

    from neuron_attribution.cli import datasets, explorer, single
    from neuron_attribution.settings import (DEFAULT_MAX_MEMORY, DEFAULT_MEMORY_BUDGET, DEFAULT_QUERY_TOP,
                                             DEFAULT_QUERY_VIA, DEFAULT_RUN_TOP, DEFAULT_TOP_K, ScoringOptions,
                                             parse_size)

    assert parse_size(DEFAULT_MAX_MEMORY) == DEFAULT_MEMORY_BUDGET == ScoringOptions().memory_budget
    assert (DEFAULT_TOP_K, DEFAULT_QUERY_TOP, DEFAULT_QUERY_VIA) == \
        (ScoringOptions().top_k, ScoringOptions().query_top, ScoringOptions().query_via)
    defaults = {name: inspect.signature(command).parameters
                for name, command in (("attribute", single.attribute), ("run", datasets.run),
                                      ("evaluate", datasets.evaluate), ("serve", explorer.serve))}
    assert defaults["attribute"]["top"].default == DEFAULT_TOP_K and defaults["run"]["top"].default == DEFAULT_RUN_TOP
    for parameters in defaults.values():
        assert parameters["query_top"].default == DEFAULT_QUERY_TOP
        assert parameters["max_memory"].default == DEFAULT_MAX_MEMORY
