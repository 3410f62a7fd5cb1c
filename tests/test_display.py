"""Notebook display: Attribution._repr_html_ renders the terminal report's tables, escaped, and shows in Chromium."""

from __future__ import annotations

from html.parser import HTMLParser

import matplotlib.image
import pytest

from neuron_attribution import attribute

from .conftest import tiny_llama
from .test_report import _chromium, _headless

EVIL = '"><img src=x onerror=alert(1)><script>alert(2)</script>'


class _Elements(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def _evil_result():
    result = attribute(tiny_llama(), [5, 17, 3, 99, 42, 7], 11, top_k=12, contrast=40, query_via="both")
    result.prompt = EVIL
    result.ffn_neurons[0].promoted_tokens[0] = EVIL
    result.attention_neurons[0].token = EVIL
    result.head_positions[0].token = EVIL
    return result


def test_html_has_every_table_and_is_escaped():
    result = _evil_result()
    page = result._repr_html_()
    parsed = _Elements()
    parsed.feed(page)
    assert "script" not in parsed.tags and "img" not in parsed.tags  # the injected markup stays text
    text = "".join(parsed.text)
    assert EVIL in text or repr(EVIL) in text
    for caption in ("Layer scores", "Top heads", "Top FFN value neurons", "Top attention value neurons",
                    "Top query FFN neurons (activate the top attention and FFN value neurons)", "contrast",
                    "suppresses", "direct"):
        assert caption in text, caption
    n = result.ffn_neurons[1]
    assert f"{n.layer}_{n.neuron}" in text and f"{n.score:+.4f}" in text
    assert parsed.tags.count("tr") >= 3 * 10 + result.layers.attention.__len__()


def test_html_shows_in_chromium(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed here (CI installs it)")
    page = tmp_path / "attribution.html"
    page.write_text("<!doctype html><meta charset='utf-8'><body>" + _evil_result()._repr_html_() + "</body>",
                    encoding="utf-8")
    dom = _headless(chromium, "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr
    assert "Top FFN value neurons" in dom.stdout and "<script>alert" not in dom.stdout
    shot = tmp_path / "shot.png"
    done = _headless(chromium, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri())
    assert done.returncode == 0 and shot.exists(), done.stderr
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.std() > 0.05 and (pixels[..., :3].min(axis=-1) < 0.2).mean() > 0.002


@pytest.mark.parametrize("width", [60, 80, 200])
def test_terminal_tables_never_cut_a_neuron_name(width):
    """#35 item 3: at 80 columns (piped through tee) the tables printed '23_1_… @ 2'. Every name of every table
    is printed whole at any width; token columns fold or, where they cannot fit, are left out with a note."""
    from rich.console import Console

    from neuron_attribution.reports.terminal import print_attribution
    from neuron_attribution.results.layout import attribution_tables

    result = attribute(tiny_llama(), [5, 17, 3, 99, 42, 7], 11, top_k=12, query_via="both")
    console = Console(width=width, record=True, file=open("/dev/null", "w"), color_system=None)
    print_attribution(console, result, rows=12)
    printed = console.export_text()
    names = [row[i] for layout in attribution_tables(result, 12) for row in layout.rows
             for i, column in enumerate(layout.columns) if column.whole]
    assert len(names) > 20 and any("@" in name for name in names)
    lines = printed.splitlines()
    for name in names:
        assert any(f"│ {name} " in line for line in lines), (name, width)
    assert "…" not in printed
    assert all(len(line) <= width for line in lines)
    if width <= 80:
        assert "left out at" in printed


def test_a_contrasts_tables_leave_out_the_normaliser_that_cancels():
    """#35 item 6: with a contrast the −ΔLSE column printed -0.0000 in every row; it is left out, once explained,
    and every neuron's normaliser change is indeed zero there (score = direct)."""
    from neuron_attribution.results.layout import attribution_tables

    model = tiny_llama()
    plain = attribute(model, [5, 17, 3, 99, 42, 7], 11, top_k=6)
    contrasted = attribute(model, [5, 17, 3, 99, 42, 7], 11, top_k=6, contrast=40)
    for n in [*contrasted.ffn_neurons, *contrasted.attention_neurons]:
        assert abs(n.normaliser_change) < 1e-5 and n.direct_score == pytest.approx(n.score, abs=1e-5)
    for result, shown in ((plain, True), (contrasted, False)):
        tables = [t for t in attribution_tables(result, 6) if t.title.startswith(("Top FFN value", "Top attention value"))]
        assert len(tables) == 2
        for table in tables:
            assert ("−ΔLSE" in [c.name for c in table.columns]) == shown
            assert all(len(row) == len(table.columns) for row in table.rows)
        captions = " ".join(t.caption for t in tables)  # said once, under the FFN table
        assert captions.count("the log-normaliser cancels") == (0 if shown else 1)
