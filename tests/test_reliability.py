"""Reliability and security: kill -9 again and again, random and malformed input never shows a traceback,
repeated work gives identical numbers, nothing trusted implicitly, nothing written outside the output."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuron_attribution import attribute, cli, load_model
from neuron_attribution.settings import DEFAULT_MEMORY_BUDGET
from neuron_attribution.pipelines.result_memory import RESULT_BYTES_PER_NEURON
from neuron_attribution.datasets import load_facts
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings
from neuron_attribution.results.tables import TABLES

from .test_loading import saved_tiny_llama  # noqa: F401  (fixture)


def _cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "neuron_attribution.cli", *args]


@pytest.mark.slow
def test_kills_then_resume(real_model, tmp_path):
    """SIGKILL 10 times during a run (the one SIGKILL-resume test; #37 merged a second into it): half at random moments, half just after the call wrote a part of its own (so
    kills land between parts however long start-up takes on the machine); after each, the finished parts are
    readable and hold each sentence at most once; the last call completes, and the tables equal an uninterrupted
    run's."""
    directory = tmp_path / "killed"
    arguments = ["run", "--dataset", "sample", "--limit", "3", "--top", "10", "--batch-size", "2"]
    chance = random.Random(11)
    interrupted = 0
    mid_run = 0  # kills that landed after this call had written a part of its own, the run unfinished
    for i in range(10):
        before = _parts(directory)
        process = subprocess.Popen(_cli_command(*arguments, "--out", str(directory)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        if i % 2:  # at a random moment: mostly during start-up (3 to 8 s, machine by machine)
            time.sleep(chance.uniform(1.5, 5.0))
        else:  # just after this call wrote a part of its own, whatever the machine's start-up takes
            deadline = time.monotonic() + 120
            while process.poll() is None and not _parts(directory) - before and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(chance.uniform(0.0, 1.0))
        if process.poll() is None:
            written = _parts(directory) - before
            os.killpg(process.pid, signal.SIGKILL)
            interrupted += 1
            mid_run += bool(written)
        process.wait()
        seen: list[int] = []
        for part in (directory / "parts").glob("part-*"):
            for table in TABLES:
                pq.read_metadata(part / f"{table}.parquet")
            seen += pq.read_table(part / "sentences.parquet").column("sentence_id").to_pylist()
        assert len(seen) == len(set(seen))
    assert interrupted >= 5, interrupted
    assert mid_run >= 2, mid_run  # not only kills during start-up: kills between parts, the case resuming is for
    final = subprocess.run(_cli_command(*arguments, "--out", str(directory)), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr
    reference = tmp_path / "reference"
    run_dataset(real_model, reference, RunArguments("sample", 3, "skip"), settings=run_settings(real_model, 10), batch_size=2)
    for table in TABLES:
        assert pq.read_table(directory / f"{table}.parquet").equals(pq.read_table(reference / f"{table}.parquet"))
    ids = pq.read_table(directory / "sentences.parquet").column("sentence_id").to_pylist()
    assert ids == list(range(len(ids))) and len(ids) == 16  # 3 of each type; month has only 1 fact in sample


def _parts(directory) -> set[str]:
    """The finished parts in a run directory (a part is renamed into place whole)."""
    return {p.name for p in (directory / "parts").glob("part-*")} if (directory / "parts").is_dir() else set()


@pytest.mark.slow
def test_repeated_work_gives_identical_numbers(real_model):
    first = attribute(real_model, "The capital of France is", "Paris", top_k=50).to_dict()
    second = attribute(real_model, "The capital of France is", "Paris", top_k=50).to_dict()
    assert first == second


class _WouldLoad(Exception):
    """Raised instead of loading a model: the arguments got past every check."""


FLAGS = ["--model", "--top", "--limit", "--json", "--dataset", "--methods", "--protocol", "--on-error", "--out",
         "--batch-size", "--target", "--query-top", "--show", "--backend", "--workers", "--per-type", "--seed",
         "--reference", "--no-interventions", "--allow-pickle", "-k", "-m", "--nope"]
WORDS = ["attribute", "evaluate", "run", "analyze", "datasets", "info", "predict", "demo", "sample", "../sample",
         "all", "norm,magic", "0", "-3", "1e9", "ray", "stop", "", " ", "<script>", "\x00", "nan", "/nonexistent",
         "value", "heads", "knowledge", "ünïcode"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(FLAGS), st.sampled_from(WORDS), st.text(max_size=12)), max_size=7))
def test_random_arguments_never_show_a_traceback(monkeypatch, tmp_path, arguments):
    def refuse(*_args, **_kwargs):
        raise _WouldLoad

    monkeypatch.setattr("neuron_attribution.model.loading.load", refuse)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["neuron-attribution", *arguments])
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            cli.main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except _WouldLoad:
        return  # every check passed; what follows needs the model
    assert code in (0, 2), (arguments, err.getvalue())
    assert "Traceback" not in err.getvalue() + out.getvalue()
    if code == 2 and err.getvalue().startswith("error:"):
        assert len(err.getvalue().strip().splitlines()) == 1


LINE = st.one_of(
    st.text(max_size=40),
    st.dictionaries(st.sampled_from(["prompt", "answer", "type", "other"]),
                    st.one_of(st.text(max_size=10), st.integers(), st.none(), st.lists(st.integers(), max_size=2)),
                    max_size=4).map(json.dumps),
    st.just('{"prompt": "A", "answer": "b"}'),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINE, max_size=12))
def test_malformed_dataset_lines_are_counted_never_raised(tmp_path, lines):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines) + "\n",
                    encoding="utf-8")
    facts, skipped = load_facts(str(path))
    non_blank = [i + 1 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if line.strip()]
    assert sorted([f.line for f in facts] + [s.line for s in skipped]) == non_blank
    assert all(f.prompt.strip() and f.answer.strip() for f in facts)


def test_trust_remote_code_is_never_implied(saved_tiny_llama, monkeypatch):  # noqa: F811
    import transformers

    seen: list[bool] = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(saved_tiny_llama)
    assert seen == [False]
    load_model(saved_tiny_llama, trust_remote_code=True)
    assert seen == [False, True]


@pytest.mark.slow
def test_nothing_is_written_outside_the_output_directory(tmp_path):
    work, data = tmp_path / "work", tmp_path / "data"
    work.mkdir()
    data.mkdir()
    facts = data / "facts.jsonl"
    facts.write_text('{"prompt": "The capital of France is", "answer": "Paris", "type": "capital"}\n')
    before = {p for p in tmp_path.rglob("*")}
    out = work / "out"
    for args in (["run", "--dataset", str(facts), "--out", str(out), "--top", "10"],
                 ["analyze", str(out), "--per-type", "1"],
                 ["evaluate", "--dataset", str(facts), "--methods", "norm", "--json", str(out / "ev.json")]):
        result = subprocess.run(_cli_command(*args), cwd=work, capture_output=True, text=True, timeout=600,
                                env={**os.environ, "MPLCONFIGDIR": str(out / ".matplotlib")})
        assert result.returncode == 0, result.stderr
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(out in p.parents or p == out for p in created), sorted(map(str, created))


def test_a_small_memory_budget_changes_batching_not_results(tiny_model, token_batches):
    from neuron_attribution.scoring.exact import EXACT_BATCH, rows_per_product

    ids = token_batches[3]
    budget = 3 * 2 * 4 * 257  # three rows per vocabulary-sized product
    assert rows_per_product(257, budget) == 3
    assert rows_per_product(257, DEFAULT_MEMORY_BUDGET) == EXACT_BATCH
    wide = attribute(tiny_model, ids, top_k=20, query_top=0).to_dict()
    returned = 2 * 20 * RESULT_BYTES_PER_NEURON  # the 20 neurons of each kind count against the budget too
    narrow = attribute(tiny_model, ids, top_k=20, query_top=0, memory_budget=returned + budget).to_dict()
    for key, identity in (("ffn_neurons", ("layer", "neuron")), ("attention_neurons", ("layer", "head", "dim",
                                                                                    "position"))):
        assert [[n[f] for f in identity] for n in narrow[key]] == [[n[f] for f in identity] for n in wide[key]]
        assert [n["score"] for n in narrow[key]] == pytest.approx([n["score"] for n in wide[key]], abs=1e-6)
    assert [h["score"] for h in narrow["heads"]] == pytest.approx([h["score"] for h in wide["heads"]], abs=1e-6)


def test_the_memory_budget_reaches_the_scoring(tiny_model, token_batches, monkeypatch):
    """The budget travels as an argument: the product sizes follow it, call by call, with no global state."""
    from neuron_attribution.scoring import exact

    seen = []
    real = exact.rows_per_product
    monkeypatch.setattr(exact, "rows_per_product", lambda vocabulary, budget: seen.append(budget) or real(
        vocabulary, budget))
    attribute(tiny_model, token_batches[0], top_k=3, query_top=0, memory_budget=12345)
    attribute(tiny_model, token_batches[0], top_k=3, query_top=0)
    returned = 2 * 3 * RESULT_BYTES_PER_NEURON  # what the returned neurons take goes to them, the rest to products
    assert set(seen) == {12345 - returned, DEFAULT_MEMORY_BUDGET - returned}


def test_a_budget_too_small_for_one_row_names_the_smallest_that_works(tiny_model, token_batches):
    from neuron_attribution import UserError
    from neuron_attribution.scoring.buffers import check_budget

    smallest = 2 * 4 * 257  # one row of logits and one of bases, float32
    returned = 2 * 3 * RESULT_BYTES_PER_NEURON  # and the 3 neurons of each kind returned: 6KB
    with pytest.raises(UserError, match=r"^--max-memory 8.0[0-9]*KB is too small: returning 6 neurons with their "
                                        r"parts takes about 6KB and one row of the vocabulary-sized products \(257 "
                                        r"tokens\) 2.01KB; give at least 8.01KB, or ask for fewer \(--top, top_k: 2 "
                                        r"of each kind fit\)$"):
        attribute(tiny_model, token_batches[0], top_k=3, query_top=0, memory_budget=returned + smallest - 1)
    assert attribute(tiny_model, token_batches[0], top_k=3, query_top=0, memory_budget=returned + smallest).ffn_neurons
    with pytest.raises(UserError, match=r"^--max-memory 2.0[0-9]*KB is too small: .* give at least 2.01KB$"):
        check_budget(smallest - 1, 257)  # the products' own check, where a GPU's free memory caps the budget


def test_a_prompt_longer_than_the_context_names_both_lengths(tiny_model):
    from neuron_attribution import UserError

    with pytest.raises(UserError, match=r"^the prompt has 65 tokens; the model's context holds 64$"):
        attribute(tiny_model, [3] * 65, 7, top_k=3)


def test_scoring_leaves_the_callers_flush_to_zero_setting_as_it_was(tiny_model, token_batches):
    """Scoring flushes denormals while it runs (they are slow and contribute nothing); the caller's thread gets
    its own setting back, whichever it was."""
    from neuron_attribution.scoring.exact import flushes_denormals

    try:
        for setting in (False, True):
            torch.set_flush_denormal(setting)
            attribute(tiny_model, token_batches[0], top_k=3)
            assert flushes_denormals() == setting
            assert (float(torch.tensor(1e-40) * 1.0) == 0.0) == setting
    finally:
        torch.set_flush_denormal(False)


def test_ray_backend_without_ray_says_how_to_install(monkeypatch):
    import builtins

    from neuron_attribution.execution import ray_backend

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    monkeypatch.setattr(sys, "argv", ["neuron-attribution", "evaluate", "--dataset", "sample", "--backend", "ray"])
    err = io.StringIO()
    with redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    assert err.getvalue().strip() == f"error: {ray_backend.INSTALL_HINT}"


def test_device_auto_places_the_model_through_accelerate(saved_tiny_llama):  # noqa: F811
    model = load_model(saved_tiny_llama, device="auto")
    assert model.device.type == "cpu"  # accelerate's placement; with no GPU everything stays on the CPU
    result = attribute(model, [3, 1, 4, 1, 5], top_k=3)
    reference = attribute(load_model(saved_tiny_llama), [3, 1, 4, 1, 5], top_k=3)
    assert [n.score for n in result.ffn_neurons] == pytest.approx([n.score for n in reference.ffn_neurons])
