"""The analyses on hand-made tables, and report.html as a person sees it: escaped, and rendered by Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import matplotlib.image
import pytest

from neuron_attribution.pipelines.analyze import Analysis, LayerSummary, _sharing, _value_histograms, analyze_run
from neuron_attribution.reports.html import render_html, write_report
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings

EVIL = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'


def test_value_histogram_ranks_both_kinds_together():
    ffn = {"sentence_id": [0, 0, 0], "score": [0.9, 0.5, 0.1], "layer": [2, 1, 0]}
    attention = {"sentence_id": [0, 0], "score": [0.7, 0.2], "layer": [1, 0]}
    histogram = _value_histograms(ffn, attention, {0: "t"}, ["t"], 3, top=3)
    assert histogram == {"t": {"attention": [0.0, 1.0, 0.0], "ffn": [0.0, 1.0, 1.0]}}  # 0.9, 0.7, 0.5 are top 3


def test_sharing_counts_neurons_common_to_more_than_half():
    rows = {"sentence_id": [0, 0, 1, 1, 2], "rank": [1, 2, 1, 2, 1], "layer": [1, 1, 1, 2, 1],
            "neuron": [5, 6, 5, 7, 5], "head": [0] * 5, "dim": [0] * 5}
    tables = {"ffn_neurons": rows, "attention_neurons": rows, "query_neurons": rows}
    shares = _sharing(tables, {0: "t", 1: "t", 2: "t"}, ["t"], top=300)
    # (1, 5) is in all three sentences; nothing else in more than half: shares 1/2, 1/2, 1/1
    assert shares["t"]["ffn_value"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def _hand_made_analysis(top: int = 300) -> Analysis:
    summary = LayerSummary([0.1, 0.2], [0.3, 0.4], 0.3, 0.7, [("ffn", 1, 0.4), ("attention", 0, 0.1)])
    return Analysis(
        directory="d", model=EVIL, dataset=EVIL, n_layers=2, n_heads=2, top=top, counts={EVIL: 1},
        layers={EVIL: summary}, value_histograms={EVIL: {"attention": [1, 2], "ffn": [3, 4]}},
        query_histograms={EVIL: {"query_only": [1, 0], "query_value": [0, 1]}},
        top_heads={EVIL: [(1, 0, 0.5)]}, head_overlap={EVIL: {EVIL: 1}}, geographic_heads=[],
        sharing={EVIL: {"ffn_value": 0.5, "attention_value": 0.2, "query": 0.1}},
        examples={EVIL: [{"sentence_id": 0, "prompt": EVIL, "target": EVIL, "prob": 0.5,
                          "ffn_neurons": [{"layer": 1, "neuron": 2, "score": 0.3, "tokens": [EVIL, "<b>"],
                                           "direct": -0.1, "push_rank": 40692}],
                          "attention_neurons": [{"layer": 1, "head": 0, "dim": 3, "position": 0, "token": EVIL,
                                                 "score": 0.2}]}]},
        interventions={EVIL: {"original": {"mrr": 1.0, "prob": 0.5, "log_prob": -0.7, "mrr_decrease": 0.0,
                                           "prob_decrease": 0.0, "log_prob_drop": 0.0}}},
        head_interventions={EVIL: {EVIL: {"mrr": 1.0, "prob": 0.5, "log_prob": -0.7, "mrr_decrease": 0.1,
                                          "prob_decrease": 0.0, "log_prob_drop": 0.0}}},
        intervention_sentences={EVIL: 1},
        suppression={EVIL: {"ffn": {"suppressing": 0.24, "median_push_rank": 4323.5},
                            "attention": {"suppressing": 0.08, "median_push_rank": None}}})


def test_the_suppression_summary_counts_each_sentences_top_neurons():
    from neuron_attribution.pipelines.analyze import _suppression

    rows = {"sentence_id": [0, 0, 1, 1], "rank": [1, 2, 1, 11], "score": [1.0, 0.5, -0.2, 3.0],
            "direct_score": [0.1, 0.4, 0.1, 0.2], "target_push_rank": [900, 10, 950, 999]}
    tables = {"ffn_neurons": rows, "attention_neurons": {**rows, "target_push_rank": [None] * 4}}
    found = _suppression(tables, {0: "t", 1: "t"}, ["t"], vocab_size=1000)
    # ranked 11th is outside the top 10; a negative score never wins; rank 900 of 1000 with a positive score does
    assert found["t"]["ffn"] == {"suppressing": pytest.approx(1 / 3), "median_push_rank": 900.0}
    assert found["t"]["attention"] == {"suppressing": None, "median_push_rank": None}  # a contrastive run
    assert _suppression(tables, {0: "t", 1: "t"}, ["t"], vocab_size=None) == {}


def test_every_label_follows_the_runs_top_k(monkeypatch):
    """A run made with --top 100 is analysed and labelled as top-100: tables, captions and figure titles."""
    from neuron_attribution.reports import html

    analysis = _hand_made_analysis(top=100)
    page = render_html(analysis, {})
    assert "top-100 value neurons" in page and "top-100 query" in page and "top-100 of more than half" in page
    assert "top-300" not in page  # no leftover of the old fixed k
    assert "Pushing the answer up, or the others down" in page and "24.0%" in page and "4,324" in page
    assert "+24.0%" not in page  # a share, not a change
    assert "40,692" in page and "-0.100" in page
    titles = []
    monkeypatch.setattr(html, "_png", lambda figure: titles.append(figure._suptitle.get_text()) or b"")
    html.value_histogram_figure(analysis)
    html.query_histogram_figure(analysis)
    assert titles == ["Where the top-100 value neurons sit",
                      "Where the top-100 query FFN neurons sit (via attention value neurons)"]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, list]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_markup_from_tokens_and_prompts_stays_inert():
    page = render_html(_hand_made_analysis(), {})
    parser = _Tags()
    parser.feed(page)
    tags = {tag for tag, _ in parser.tags}
    assert "script" not in tags
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "caption",
                    "thead", "tbody", "tr", "th", "td", "figure", "img", "q", "b"}
    assert not [a for _, attrs in parser.tags for a, _ in attrs if a.startswith("on")]
    assert "img" not in tags  # no figures were given, so any img would be injected
    text = "".join(parser.text)
    assert EVIL in text and "'<b>'" in text  # shown to the reader as text


FACTS = [{"prompt": "The capital of France is", "answer": "Paris", "type": "capital", "contrast": " London"},
         {"prompt": "The capital of Italy is", "answer": "Rome", "type": "capital"},
         {"prompt": "The official language of Spain is", "answer": "Spanish", "type": "language"},
         {"prompt": "Berlin is a city in the country of", "answer": "Germany", "type": "country"}]


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        pytest.fail("Chromium is missing: .ci/run installs it (apt-get install chromium)")
    return found


def _headless(chromium: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=180)


@pytest.mark.slow
def test_report_renders_in_chromium(real_model, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed here (CI installs it)")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    run_dataset(real_model, tmp_path / "run", RunArguments(str(facts)), settings=run_settings(real_model, 30),
                batch_size=4)
    analysis = analyze_run(tmp_path / "run", per_type=1, load=lambda spec: real_model)
    assert analysis.top == 30
    report = write_report(analysis, tmp_path / "analysis")
    assert {p.name for p in (tmp_path / "analysis").iterdir()} >= {
        "report.html", "analysis.json", "layer_scores.png", "value_neurons_by_layer.png", "query_neurons_by_layer.png",
        "head_overlap.png", "sharing.png", "interventions.png"}
    dom = _headless(chromium, "--dump-dom", report.as_uri())
    assert dom.returncode == 0, dom.stderr
    for text in ("Attention and FFN layers (Table 3 style)", "top-10 value layers", "Where the value and query",
                 "Heads in the top 10 of language, capital and country alike", "Sharing", "Interventions",
                 "random (value)", "The capital of France is", "capital", "language", "country",
                 "top-30 value neurons", "rather than"):
        assert text in dom.stdout, text
    screenshot = tmp_path / "report.png"
    shot = _headless(chromium, f"--screenshot={screenshot}", "--window-size=1200,2400", report.as_uri())
    assert shot.returncode == 0 and screenshot.exists(), shot.stderr
    pixels = matplotlib.image.imread(str(screenshot))
    assert pixels.std() > 0.05  # text, tables and plots, not a blank page
    assert (pixels[..., :3].min(axis=-1) < 0.2).mean() > 0.005  # dark ink somewhere
