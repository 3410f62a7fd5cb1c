"""What a researcher meets in a first afternoon: readable files, clean re-runs, one-line reprs and errors, a
report that speaks of the data it was given, evaluate filtering as the paper does, help texts shown whole."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_attribution import UserError, attribute
from neuron_attribution.datasets import load_facts
from neuron_attribution.files import write_json
from neuron_attribution.pipelines.evaluate import evaluate
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings
from neuron_attribution.reports import html

from .test_report import _hand_made_analysis
from .test_runs import FACTS


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode


def test_json_is_written_as_it_is_encoded_and_whole_or_not_at_all(tmp_path, monkeypatch):
    """write_json streams the encoding (every neuron's result is hundreds of MB of text): the file's bytes equal
    json.dumps(indent=2, ensure_ascii=False) and a newline, in more than one write; a payload that fails part-way
    leaves the old file as it was and no temporary file."""
    from neuron_attribution import files

    payload = {"ffn_neurons": [{"layer": i, "tokens": [" Paris", "é", "\u00a0", "<|end|>"], "score": i / 7,
                                "none": None, "nested": {"x": [True, False]}} for i in range(3000)],
               "text": "quote \" and \\ and \n", "empty": [], "nothing": {}}
    writes = []
    real_chunks = files.write_chunks_atomic
    monkeypatch.setattr(files, "write_chunks_atomic",
                        lambda path, chunks: real_chunks(path, (writes.append(len(c)) or c for c in chunks)))
    path = tmp_path / "a.json"
    write_json(path, payload)
    assert path.read_bytes() == (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    assert len(writes) > 5 and max(writes) < 2 * 65536 * 4
    write_json(path, {"b": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": [1] * 100000 + [object()]})
    assert json.loads(path.read_text()) == {"b": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_attribute_json_is_readable_by_others(tmp_path, real_model, cli):
    previous = os.umask(0o022)
    try:
        result = cli("attribute", "The capital of France is", "--top", "3", "--query-top", "0", "--json",
                     str(tmp_path / "a.json"))
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


def _facts(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_a_run_that_fails_leaves_nothing_and_says_what_was_skipped(real_model, tmp_path):
    facts = _facts(tmp_path / "bad.jsonl", ["{not json", '{"prompt": "x"}', "[1, 2]"])
    with pytest.raises(UserError) as error:
        run_dataset(real_model, tmp_path / "out", RunArguments(str(facts)))
    assert "3 lines skipped" in str(error.value) and "bad.jsonl:1: not valid JSON" in str(error.value)
    assert not (tmp_path / "out").exists()
    unknown = _facts(tmp_path / "unknown.jsonl", [{"prompt": "The capital of France is", "answer": "Oslo"}])
    with pytest.raises(UserError, match="1 facts checked, none known"):
        run_dataset(real_model, tmp_path / "out", RunArguments(str(unknown)))
    assert not (tmp_path / "out").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError):  # a directory the user made and filled is never removed
        run_dataset(real_model, mine, RunArguments(str(unknown)))
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_overwrite_replaces_a_different_run(real_model, tmp_path):
    facts = _facts(tmp_path / "facts.jsonl", FACTS[:2])
    out = tmp_path / "run"
    run_dataset(real_model, out, RunArguments(str(facts)), settings=run_settings(real_model, 5))
    with pytest.raises(UserError, match="--overwrite"):
        run_dataset(real_model, out, RunArguments(str(facts)), settings=run_settings(real_model, 7))
    summary = run_dataset(real_model, out, RunArguments(str(facts)), settings=run_settings(real_model, 7),
                          overwrite=True)
    assert summary.attributed == 2 and json.loads((out / "run.json").read_text())["top"] == 7


def test_short_repr_and_clear_errors_for_wrong_types(tiny_model, token_batches):
    assert "\n" not in repr(tiny_model) and "layers=3" in repr(tiny_model) and "device=cpu" in repr(tiny_model)
    with pytest.raises(UserError, match="a target is answer text .* not tuple"):
        attribute(tiny_model, token_batches[0], (1, 2))
    with pytest.raises(UserError, match="a prompt is text"):
        attribute(tiny_model, 42, 1)


def test_the_report_speaks_of_the_types_it_was_given():
    analysis = _hand_made_analysis()
    page = html.render_html(analysis, {})
    assert "language, capital and country" not in page  # the run has none of them
    analysis.counts = {"capital": 1, "country": 1}
    assert html._shared_heads_html(analysis).startswith("<p>Heads in the top 10 of capital and country alike")


def _extent(artist, renderer):
    return artist.get_window_extent(renderer)


def test_figures_have_no_overlapping_titles_legends_and_bars(monkeypatch):
    """Every figure is laid out by matplotlib's constrained layout; the suptitle, the subplot titles, the legend
    and the bars must not cover one another."""
    analysis = _hand_made_analysis()
    analysis.counts = {f"type {i}": 1 for i in range(4)}
    analysis.interventions = {}
    for kind in analysis.counts:
        analysis.layers[kind] = analysis.layers[next(iter(analysis.layers))]
        analysis.value_histograms[kind] = {"attention": [1, 2], "ffn": [3, 4]}
        analysis.query_histograms[kind] = {"query_only": [1, 0], "query_value": [0, 1]}
        analysis.sharing[kind] = {"ffn_value": 0.5, "attention_value": 0.9, "query": 1.0}
        analysis.head_overlap[kind] = {other: 1 for other in analysis.counts}
        analysis.interventions[kind] = {row: {"mrr_decrease": 1.0} for row in
                                        ("value", "random (value)", "query", "random (query)")}
    figures = []
    monkeypatch.setattr(html, "_png", lambda figure: figures.append(figure) or b"")
    for draw in html.FIGURES.values():
        draw(analysis)
    assert len(figures) == len(html.FIGURES)
    for figure in figures:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        titles = [axis.title for axis in figure.axes if axis.get_visible() and axis.get_title()]
        boxes = [_extent(t, renderer) for t in titles]
        if figure._suptitle is not None:
            boxes.append(_extent(figure._suptitle, renderer))
        for legend in figure.legends:
            boxes.append(_extent(legend, renderer))
            bars = [patch for axis in figure.axes for patch in axis.patches]
            assert not [b for b in bars if _extent(b, renderer).overlaps(_extent(legend, renderer))]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert not a.overlaps(b), (figure._suptitle.get_text() if figure._suptitle else "", a, b)


@pytest.mark.slow
def test_evaluate_filters_like_the_paper_unless_told_not_to(real_model, tmp_path, cli):
    facts = _facts(tmp_path / "facts.jsonl", FACTS[:3])  # the third: the model does not say "Oslo"
    loaded, _ = load_facts(str(facts))
    filtered = evaluate(real_model, loaded, methods="norm", top=2)
    assert filtered.n_sentences == 2
    assert filtered.filter == {"checked": 3, "kept": 2, "by_type": {"capital": {"checked": 3, "kept": 2}}}
    assert filtered.to_dict()["filter"]["kept"] == 2
    everything = evaluate(real_model, loaded, methods="norm", top=2, filter=False)
    assert everything.n_sentences == 3 and everything.filter is None
    shown = cli("evaluate", "--dataset", str(facts), "--methods", "norm", "--top", "2")
    assert shown.returncode == 0, shown.stderr
    assert "Kept by the filter (the model knows the fact): 2 of 3 (capital 2/3)" in " ".join(shown.stdout.split())


def test_help_texts_keep_their_brackets(cli):
    shown = cli("run", "--help")
    assert shown.returncode == 0
    assert "neuron-attribution[ray]" in "".join(shown.stdout.split())


@pytest.mark.slow
def test_many_prompts_in_one_process(real_model, tmp_path, cli):
    lines = [{"prompt": "The capital of France is", "target": " Paris"}, {"prompt": "The capital of Italy is"},
             "{broken", {"prompt": "The capital of Spain is", "target": ""},
             {"prompt": "The largest planet is", "target": 7042, "contrast": "kept for later"}]
    path = _facts(tmp_path / "prompts.jsonl", lines)
    done = cli("attribute", "--prompts", str(path), "--json-dir", str(tmp_path / "out"), "--top", "5")
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line-000001.json", "line-000002.json",
                                                                     "line-000005.json"]
    shown = " ".join(done.stdout.split())
    assert "Skipped 2:" in shown and f"{path}:3: not valid JSON" in shown and f"{path}:4: the target is empty" in shown
    expected = attribute(real_model, "The capital of France is", " Paris", top_k=5)
    saved = json.loads((tmp_path / "out" / "line-000001.json").read_text())
    assert [n["score"] for n in saved["ffn_neurons"]] == pytest.approx([n.score for n in expected.ffn_neurons],
                                                                       abs=1e-5)
    assert json.loads((tmp_path / "out" / "line-000005.json").read_text())["target"]["id"] == 7042
    stopped = cli("attribute", "--prompts", str(path), "--on-error", "stop")
    assert stopped.returncode == 2 and stopped.stderr.strip() == f"error: {path}:3: not valid JSON " \
        "(Expecting property name enclosed in double quotes)"


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["datasets"], ["run", "--help"]])
def test_light_commands_do_not_load_torch_or_transformers(args):
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "neuron_attribution.cli", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-1000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "import time:" in line}
    assert not {name for name in loaded if name.split(".")[0] in ("torch", "transformers")}


def test_the_cli_leaves_the_collector_of_a_python_user_as_it_found_it(monkeypatch, capsys):
    """#23 item 9: the entry point tunes the garbage collector for its own process (the start-up figures in the
    README); a notebook or script that runs the CLI in-process, or calls the library, finds the collector as it
    left it afterwards — thresholds and nothing frozen — whether the command loaded a model or failed."""
    import gc

    from neuron_attribution.cli.common import collection_deferred, settle_heap

    from .conftest import run_cli

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    try:
        assert run_cli(monkeypatch, capsys, "datasets")[0] == 0
        assert run_cli(monkeypatch, capsys, "attribute", "x", "--top", "0")[0] == 2
        with collection_deferred():
            settle_heap()  # what a command does once its model is loaded
        settle_heap()  # in-process, outside the entry point: nothing
        assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.slow  # a fresh Python process, which imports torch and transformers: 8 s
def test_no_process_wide_side_effects(tmp_path):
    """#23 item 8: importing the report module chooses no matplotlib backend (pyplot stays unloaded, also while
    drawing), and loading a model leaves transformers' progress bars as the caller had them."""
    script = f"""
import sys
from pathlib import Path
import torch
from transformers.utils import logging
import neuron_attribution.reports.html as html
from neuron_attribution import load_model
from tests.conftest import tiny_llama
assert "matplotlib.pyplot" not in sys.modules
png = html._png(html._new_figure(figsize=(2, 2)))
assert png[1:4] == b"PNG" and "matplotlib.pyplot" not in sys.modules
model = tiny_llama()
model.hf_model.save_pretrained(Path({str(tmp_path)!r}) / "m")
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({{"a": 0, "[UNK]": 1}}, unk_token="[UNK]"))
                        ).save_pretrained(Path({str(tmp_path)!r}) / "m")
assert logging.is_progress_bar_enabled()
load_model(Path({str(tmp_path)!r}) / "m")
assert logging.is_progress_bar_enabled()
print("ok")
"""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_filter_progress_counts_what_its_summary_counts(real_model):
    """#26 item 9: with `run --limit` the filter stops checking a type once it has enough; its progress bar
    counted every fact run through the model (48/48) while the summary counted those checked (30)."""
    from neuron_attribution.datasets import load_facts
    from neuron_attribution.pipelines.filter import filter_facts

    facts, _ = load_facts("sample")
    calls: list[tuple[int, int]] = []
    checked, _ = filter_facts(real_model, facts, enough=1, batch_size=4,
                              progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (len(checked), len(checked))
    assert all(done <= total for done, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(checked) < len(facts)  # `enough` did cut the checking short


def test_report_says_how_many_sentences_it_shows_and_draws_emoji_type_names_without_warnings(tmp_path):
    """#26 item 8: the sentence list per type says how many of how many it shows; type names with emoji are drawn
    without the characters the font lacks, and without a warning; the page keeps the full name."""
    import dataclasses
    import warnings

    from .test_report import EVIL

    fancy = "capital 🏙️"

    def renamed(value):
        if isinstance(value, dict):
            return {fancy if key == EVIL else key: renamed(item) for key, item in value.items()}
        return value

    analysis = _hand_made_analysis()
    analysis = dataclasses.replace(analysis, **{f.name: renamed(getattr(analysis, f.name))
                                                 for f in dataclasses.fields(analysis)
                                                 if isinstance(getattr(analysis, f.name), dict)})
    analysis.counts[fancy] = 5
    analysis.interventions[fancy].update({row: dict(analysis.interventions[fancy]["original"], mrr_decrease=0.5)
                                          for row in ("value", "random (value)", "query", "random (query)")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = html.write_report(analysis, tmp_path).read_text(encoding="utf-8")
    assert "the first 1 of 5 sentences of this type" in page
    assert fancy in page
    assert html._drawable(fancy) == "capital"


def test_messages_name_options_as_each_surface_spells_them():
    """#35 item 9: an error names an option as the Python API spells it; the CLI says the flag, a page its control
    (options it has no control for keep the Python spelling)."""
    from neuron_attribution.errors import for_a_page, for_the_command_line

    message = "a contrast applies to a single answer token; use answer_tokens='first' with it (rank_by='direct')"
    assert for_the_command_line(message) == ("a contrast applies to a single answer token; use --answer-tokens first "
                                             "with it (--rank-by direct)")
    assert for_a_page(message, {"answer_tokens": "Answer tokens"}) == (
        "a contrast applies to a single answer token; use “Answer tokens: first” with it (rank_by='direct')")
    assert for_the_command_line("not a neuron: '25-1120'") == "not a neuron: '25-1120'"  # not an option


def test_work_refused_before_any_progress_prints_no_empty_line(capsys):
    """#35 item 9: `run`'s errors started with a blank line: the progress bar, started before the run was refused,
    printed its empty self on the way out. It now appears with the first progress only."""
    from neuron_attribution import UserError
    from neuron_attribution.cli.common import progress_bar

    with pytest.raises(UserError), progress_bar():
        raise UserError("refused")
    assert capsys.readouterr().out == ""
    with progress_bar() as progress:
        progress("sentences", 1, 2)
    assert "sentences" in capsys.readouterr().out


def test_scoring_every_neuron_reports_its_progress(monkeypatch):
    """#35 item 11: `--top 100000000` ran 13 min with no progress. Exact scoring reports (what, done, total) to a
    reporter the surface sets (the CLI draws a bar with an ETA from it): done rises to the total, which counts every
    row scored; without a reporter nothing is reported."""
    from neuron_attribution import attribute
    from neuron_attribution.scoring import progress

    from .conftest import tiny_llama

    model = tiny_llama()
    monkeypatch.setattr(progress, "REPORTED_FROM_ROWS", 1)
    reports = []
    with progress.reporting(lambda what, done, total: reports.append((what, done, total))):
        result = attribute(model, [5, 17, 3, 99, 42, 7], 11, top_k=10**8, query_top=0)
    assert reports
    totals = {total for _, _, total in reports}
    biggest = max(totals)
    assert biggest >= len(result.ffn_neurons) + len(result.attention_neurons)
    done = [d for _, d, total in reports if total == biggest]
    assert done == sorted(done) and done[-1] == biggest
    assert all(what.startswith("scoring ") for what, _, _ in reports)
    before = len(reports)
    attribute(model, [5, 17, 3, 99, 42, 7], 11, top_k=5, query_top=0)
    assert len(reports) == before  # no reporter outside the block


def test_every_neuron_is_scored_in_bounded_rounds_with_progress_from_the_start(monkeypatch):
    """#37 item 2: every neuron (a k beyond the model's count) is scored a round of at most ROUND_ROWS neurons at a
    time, so the vectors, projections and products in flight are bounded whatever the model's size; the bar starts
    at 0 of the whole count before the first round, rises with each round, and the scores are those of one
    unbounded pass (the dense scores, each neuron scored on its own definition)."""
    from neuron_attribution import attribute
    from neuron_attribution.scoring import exact, progress, value

    from .conftest import tiny_llama

    model = tiny_llama()
    prompt, target = [5, 17, 3, 99, 42, 7], 11
    whole = attribute(model, prompt, target, top_k=10**8, query_top=0, dense=True)
    monkeypatch.setattr(progress, "REPORTED_FROM_ROWS", 1)
    monkeypatch.setattr(value, "ROUND_ROWS", 37)
    largest = []
    original = exact.score_rows

    def counting(ctx, groups, reported=True):
        largest.append(sum(len(g) for g in groups))
        return original(ctx, groups, reported)

    monkeypatch.setattr(value, "score_rows", counting)
    reports = []
    with progress.reporting(lambda what, done, total: reports.append((done, total))):
        rounds = attribute(model, prompt, target, top_k=10**8, query_top=0)
    total = len(whole.ffn_neurons) + len(whole.attention_neurons)
    assert total == whole.dense.ffn.size + whole.dense.attention.size
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert [d for d, _ in reports] == sorted(d for d, _ in reports) and len(reports) > total // 37
    # every round past the first two (heads; head positions with the first neurons) holds at most 37 neurons
    assert max(largest[2:]) <= 37
    for kind in ("ffn_neurons", "attention_neurons"):
        ours = {str(n.index): n.score for n in getattr(rounds, kind)}
        assert ours == {str(n.index): n.score for n in getattr(whole, kind)}
    for n in rounds.ffn_neurons:
        assert n.score == pytest.approx(float(whole.dense.ffn[n.layer, n.neuron]), abs=1e-5)


def _deep_bytes(value, seen: set[int]) -> int:
    """Bytes a Python object holds with everything it refers to, each object counted once."""
    import sys

    if id(value) in seen:
        return 0
    seen.add(id(value))
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(_deep_bytes(k, seen) + _deep_bytes(v, seen) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        size += sum(_deep_bytes(item, seen) for item in value)
    elif hasattr(type(value), "__dataclass_fields__"):
        size += sum(_deep_bytes(getattr(value, name), seen) for name in type(value).__dataclass_fields__)
    return size


def test_every_neurons_result_counts_against_the_memory_budget(cli, tmp_path, monkeypatch):
    """#37 item 2: the returned neurons count against `--max-memory` too. Every neuron of the tiny Llama on a
    6-token prompt, at RESULT_BYTES_PER_NEURON each, goes through with exactly that budget and one row of the
    vocabulary-sized products, the buffers getting what is left, and is refused with one line a byte below it,
    before any scoring; the constant bounds what a returned neuron really takes, measured on the returned
    objects; the CLI exits with code 2 and that line."""
    from neuron_attribution import UserError, attribute
    from neuron_attribution.pipelines import attribute as attribute_module
    from neuron_attribution.pipelines import result_memory
    from neuron_attribution.scoring.buffers import smallest_budget

    from .conftest import save_with_tokenizer, tiny_llama

    model = tiny_llama()
    prompt, target = [5, 17, 3, 99, 42, 7], 11
    s = model.shape
    count = s.n_layers * s.d_ffn + s.n_layers * s.n_heads * s.head_dim * len(prompt)
    need = count * result_memory.RESULT_BYTES_PER_NEURON
    least = smallest_budget(model.hf_model.lm_head.weight.shape[0])
    budgets = []
    real_context = attribute_module.value_context
    monkeypatch.setattr(attribute_module, "value_context",
                        lambda *a, **k: budgets.append(k["memory_budget"]) or real_context(*a, **k))
    result = attribute(model, prompt, target, top_k=10**8, query_top=0, memory_budget=need + least)
    assert budgets == [least]  # the buffers get what the returned neurons leave: one row here
    returned = [*result.ffn_neurons, *result.attention_neurons]
    assert len(returned) == count == result_memory.returned_neurons(s, len(prompt), 10**8)
    seen: set[int] = set()
    assert sum(_deep_bytes(n, seen) for n in returned) / count < result_memory.RESULT_BYTES_PER_NEURON
    with pytest.raises(UserError, match=f"returning {count:,} neurons") as refused:
        attribute(model, prompt, target, top_k=10**8, query_top=0, memory_budget=need + least - 1)
    assert "\n" not in str(refused.value) and "--max-memory" in str(refused.value) and len(budgets) == 1
    assert len(attribute(model, prompt, target, top_k=5, query_top=0, memory_budget=need // 10).ffn_neurons) == 5

    directory = tmp_path / "tiny"
    save_with_tokenizer(model.hf_model, directory)
    run = cli("attribute", "The capital of France is", "--target", "Paris", "--model", str(directory),
              "--top", "100000000", "--max-memory", "1KB")
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.splitlines()[-1] == (
        "error: --max-memory 1KB is too small: returning 600 neurons with their parts takes about 600KB and one row "
        "of the vocabulary-sized products (257 tokens) 2.01KB; give at least 602KB")
