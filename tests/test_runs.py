"""Whole-dataset runs: the filter, the Parquet tables, resuming after any interruption, refusing a mismatch."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from neuron_attribution import UserError, attribute
from neuron_attribution.datasets import Fact
from neuron_attribution.pipelines.filter import _check
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings
from neuron_attribution.results.tables import TABLES

FACTS = [
    {"prompt": "The capital of France is", "answer": "Paris", "type": "capital"},
    {"prompt": "The capital of Italy is", "answer": "Rome", "type": "capital"},
    {"prompt": "The capital of France is", "answer": "Oslo", "type": "capital"},  # the model does not say this
    {"prompt": "The official language of Spain is", "answer": "Spanish", "type": "language"},
    {"prompt": "The official language of France is", "answer": "French", "type": "language"},
    {"prompt": "Berlin is a city in the country of", "answer": "Germany", "type": "country"},
    {"prompt": "Tokyo is a city in the country of", "answer": "Japan", "type": "country"},
]


def test_filter_rules():
    fact = Fact("p", "a", "color", "f", 1)
    logits = torch.arange(30.0)  # token 29 is the top prediction
    assert _check(fact, [1], 29, logits, [3, 29]).kept
    dropped = _check(fact, [1], 15, logits, [])
    assert not dropped.kept and dropped.rank == 15 and "not in the top 10" in dropped.reason
    beaten = _check(fact, [1], 25, logits, [26])
    assert beaten.rank == 5 and not beaten.kept and "candidate" in beaten.reason
    assert _check(fact, [1], 25, logits, [24, 25]).kept


@pytest.fixture(scope="module")
def facts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("facts") / "facts.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    return path


def _tables(directory: Path) -> dict:
    return {name: pq.read_table(directory / f"{name}.parquet").to_pydict() for name in TABLES}


@pytest.fixture(scope="module")
def finished_run(real_model, facts_file, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("run")
    run_dataset(real_model, directory, RunArguments(str(facts_file), None, "skip"), settings=run_settings(real_model, 20), batch_size=4)
    return directory


@pytest.mark.slow
def test_run_tables_hold_what_attribute_gives(real_model, finished_run):
    record = json.loads((finished_run / "run.json").read_text())
    assert record["complete"] and record["kept"] == {"capital": 2, "language": 2, "country": 2}
    assert record["facts"] == {"capital": 3, "language": 2, "country": 2}
    filtered = json.loads((finished_run / "filter.json").read_text())["facts"]
    assert [f["kept"] for f in filtered] == [True, True, False, True, True, True, True]
    tables = _tables(finished_run)
    sentences = tables["sentences"]
    assert sentences["sentence_id"] == list(range(6))
    assert sentences["type"] == ["capital", "capital", "language", "language", "country", "country"]
    expected = attribute(real_model, "The official language of Spain is", "Spanish", top_k=20)
    ffn = [(l, n, s) for i, l, n, s in zip(tables["ffn_neurons"]["sentence_id"], tables["ffn_neurons"]["layer"],
                                          tables["ffn_neurons"]["neuron"], tables["ffn_neurons"]["score"]) if i == 2]
    assert [(l, n) for l, n, _ in ffn] == [(x.layer, x.neuron) for x in expected.ffn_neurons]
    assert [s for *_, s in ffn] == pytest.approx([x.score for x in expected.ffn_neurons], abs=1e-5)
    for kind, rows in (("ffn_neurons", expected.ffn_neurons), ("attention_neurons", expected.attention_neurons)):
        table = tables[kind]
        mine = [i == 2 for i in table["sentence_id"]]
        for column in ("direct_score", "normaliser_change"):
            stored = [v for v, m in zip(table[column], mine) if m]
            assert stored == pytest.approx([getattr(x, column) for x in rows], abs=1e-5), (kind, column)
        # A run pads sentences into batches: float32 rounding then differs from a lone prompt's by ~1e-7, which
        # can swap tokens whose pushes are that close; ranks within a few places, the clear ends the same.
        ranks = [v for v, m in zip(table["target_push_rank"], mine) if m]
        assert all(abs(a - b) <= 5 for a, b in zip(ranks, [x.target_push_rank for x in rows], strict=True)), kind
        for column in ("suppressed_tokens", "promoted_tokens"):
            stored = [v[:3] for v, m in zip(table[column], mine) if m]
            assert stored == [getattr(x, column)[:3] for x in rows], (kind, column)
    heads = [s for i, s in zip(tables["heads"]["sentence_id"], tables["heads"]["score"]) if i == 2]
    assert heads == pytest.approx([h.score for h in expected.heads], abs=1e-5)
    assert set(tables["attention_neurons"]) >= {"sentence_id", "type", "layer", "head", "dim", "position", "token",
                                                 "score", "coefficient"}
    assert set(tables["query_neurons"]) >= {"sentence_id", "type", "layer", "neuron", "score", "attention_score",
                                             "ffn_score", "gate_score", "up_score", "position", "token", "coefficient"}
    assert all(p is not None for p in tables["query_neurons"]["position"])
    assert len(tables["layers"]["layer"]) == 6 * real_model.shape.n_layers


@pytest.mark.slow
def test_a_different_run_into_the_same_directory_is_refused(real_model, finished_run, facts_file):
    with pytest.raises(UserError, match="holds a different run .*scoring.top_k: 20 there, 5 now"):
        run_dataset(real_model, finished_run, RunArguments(str(facts_file), None, "skip"), settings=run_settings(real_model, 5))
    with pytest.raises(UserError, match="holds a different run .*limit"):
        run_dataset(real_model, finished_run, RunArguments(str(facts_file), 1, "skip"), settings=run_settings(real_model, 20))


@pytest.mark.slow
def test_lost_and_truncated_parts_are_recomputed(real_model, finished_run, facts_file, tmp_path):
    before = _tables(finished_run)
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    parts = sorted((copy / "parts").iterdir())
    assert len(parts) == 2
    shutil.rmtree(parts[0])  # a part that never got written
    damaged = parts[1] / "ffn_neurons.parquet"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a truncated file
    (copy / "parts" / ".tmp-leftover").mkdir()  # what a crash mid-write leaves behind
    summary = run_dataset(real_model, copy, RunArguments(str(facts_file), None, "skip"), settings=run_settings(real_model, 20), batch_size=4)
    assert summary.attributed == 6 and summary.already_done == 0
    assert _tables(copy) == before
    assert not (copy / "parts" / ".tmp-leftover").exists()
    again = run_dataset(real_model, copy, RunArguments(str(facts_file), None, "skip"), settings=run_settings(real_model, 20), batch_size=4)
    assert again.attributed == 0 and again.already_done == 6


@pytest.mark.slow
def test_ctrl_c_says_what_is_saved_and_how_to_resume(real_model, facts_file, finished_run, tmp_path):
    """#26 item 9: Ctrl-C (SIGINT) during `run` ends with exit 130 and one line naming the saved sentences and
    the way to resume; the same command then finishes with the numbers of an uninterrupted run."""
    directory = tmp_path / "stopped"
    command = [sys.executable, "-m", "neuron_attribution.cli", "run", "--dataset", str(facts_file), "--out",
               str(directory), "--top", "20", "--batch-size", "4"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((directory / "parts").glob("part-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 130, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("run stopped: ") and "sentences are saved in" in line and "run the same command" in line
    assert "Traceback" not in stderr
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    reference = _tables(finished_run)
    tables = _tables(directory)
    for name in TABLES:
        assert tables[name] == reference[name], name


@pytest.mark.slow
def test_run_bad_input(tmp_path, facts_file, cli):
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"prompt": "The capital of France is", "answer": "Oslo", "type": "capital"}\n')
    result = cli("run", "--dataset", str(unknown), "--out", str(tmp_path / "empty"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: no sentence is left after the filter")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = cli("run", "--dataset", str(facts_file), "--out", str(blocker / "run"))
    assert result.returncode == 2 and result.stderr.startswith("error: cannot write to")
    result = cli("run", "--dataset", "../capital")
    assert result.returncode == 2 and result.stderr.startswith("error: no dataset '../capital'")
    not_a_run = tmp_path / "not-a-run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("mine")
    result = cli("run", "--dataset", str(facts_file), "--out", str(not_a_run))
    assert result.returncode == 2 and "is not empty and holds no run" in result.stderr
    result = cli("analyze", str(not_a_run))
    assert result.returncode == 2 and "holds no readable run.json" in result.stderr


TWO_FACTS = FACTS[:2]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--query-top", "0"), ("--query-via", "ffn"), ("--query-via", "both"),
                                   ("--answer-tokens", "all"), ("--on-error", "stop"), ("--rank-by", "direct")],
                         ids=lambda f: " ".join(f))
def test_every_documented_option_value_works_through_run_and_analyze(tmp_path, flags, cli):
    """Each value `run --help` offers (beyond the defaults, which the other tests use) gives a run that
    `analyze` reads: `--query-top 0` once crashed after all the work, sorting a query table with no columns."""
    facts = tmp_path / "two.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in TWO_FACTS))
    directory = tmp_path / "run"
    result = cli("run", "--dataset", str(facts), "--out", str(directory), "--top", "20", *flags)
    assert result.returncode == 0, result.stderr
    tables = _tables(directory)
    assert tables["sentences"]["sentence_id"] == [0, 1]
    queries = tables["query_neurons"]
    assert {"sentence_id", "layer", "neuron", "score"} <= set(queries)
    assert len(queries["sentence_id"]) == (0 if flags == ("--query-top", "0") else 2 * 20)
    analysed = cli("analyze", str(directory), "--out", str(tmp_path / "analysis"), "--no-interventions")
    assert analysed.returncode == 0, analysed.stderr
    assert (tmp_path / "analysis" / "report.html").exists()


def test_a_run_identity_holds_every_setting():
    """Each field of the settings (the model spec and the scoring options, those added later too) is part of
    what a resumed run must match: changing any one of them changes the identity."""
    from dataclasses import fields, replace

    from neuron_attribution.settings import ModelSpec, ScoringOptions, Settings

    from .conftest import tiny_llama

    model = tiny_llama()
    arguments = RunArguments("sample")
    base = Settings(ModelSpec(name="m", dtype="float32", device="cpu"), ScoringOptions())
    identity = arguments.identity(model, base, 8)
    changed = {"name": "other", "dtype": "bfloat16", "device": "cuda", "allow_pickle": True,
               "trust_remote_code": True, "quantization": "bnb-4bit", "top_k": 7, "query_top": 3, "memory_budget": 12345, "reference": True,
               "query_via": "both", "answer_tokens": "all", "rank_by": "direct", "budget_fixed": True, "measure": 3}
    for part, kind in (("model", ModelSpec), ("scoring", ScoringOptions)):
        for field in fields(kind):
            other = replace(base, **{part: replace(getattr(base, part), **{field.name: changed[field.name]})})
            moved = {k for k, v in arguments.identity(model, other, 8).items() if identity[k] != v}
            assert moved == {f"{part}.{field.name}"}, field.name
    assert arguments.identity(model, base, 4)["batch_size"] == 4


@pytest.mark.slow
def test_the_scoring_budget_is_fixed_when_a_run_starts_and_kept_on_resume(real_model, finished_run, facts_file,
                                                                          tmp_path):
    """On a GPU the budget depends on the memory free at the moment; a run fixes it once (recorded in run.json)
    and a resumed call uses the recorded one, so its parts batch, and round, as the first call's did."""
    from neuron_attribution.execution import LocalBackend
    from neuron_attribution.pipelines.run import PartWork

    settings = run_settings(real_model, 20)
    record = json.loads((finished_run / "run.json").read_text())
    assert record["memory_budget_in_use"] == settings.scoring.memory_budget  # on a CPU: the cap itself
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    shutil.rmtree(sorted((copy / "parts").iterdir())[0])
    record["memory_budget_in_use"] = settings.scoring.memory_budget - 1  # as if fixed on a GPU with less free
    (copy / "run.json").write_text(json.dumps(record))

    class Watching(LocalBackend):
        items: list = []

        def map(self, function, items):
            self.items.extend(items)
            return super().map(function, items)

    backend = Watching(real_model, settings)
    summary = run_dataset(real_model, copy, RunArguments(str(facts_file), None, "skip"), batch_size=4,
                          backend=backend)
    assert summary.attributed == 4
    assert backend.items and all(isinstance(w, PartWork) and w.memory_budget == settings.scoring.memory_budget - 1
                                 for w in backend.items)
    assert json.loads((copy / "run.json").read_text())["memory_budget_in_use"] == settings.scoring.memory_budget - 1
    assert _tables(copy) == _tables(finished_run)


@pytest.mark.slow
def test_run_names_the_lines_it_skips(tmp_path, cli):
    """As evaluate and attribute --prompts do: by file and line, with the reason."""
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps(TWO_FACTS[0]) + "\nnot json\n" + json.dumps(TWO_FACTS[1]) + "\n")
    result = cli("run", "--dataset", str(facts), "--out", str(tmp_path / "run"), "--top", "5", "--query-top", "0")
    assert result.returncode == 0, result.stderr
    assert "Skipped 1:" in result.stdout and f"{facts}:2: not valid JSON" in result.stdout.replace("\n", "")
