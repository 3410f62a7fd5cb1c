"""`attribute --html`: one self-contained page of the attribution graph, drawn by the vendored Cytoscape.js in a
real (headless) Chromium, offline, with markup from the prompt and the tokens kept as text."""

from __future__ import annotations

import json
import re

import pytest

from neuron_attribution import attribute
from neuron_attribution.reports.graph_page import graph_page

from .conftest import tiny_llama
from .test_report import _chromium, _headless

EVIL = '</script><img src=x onerror="document.title=\'owned\'"><!--'


def _page(tmp_path, top: int):
    result = attribute(tiny_llama(), [5, 17, 3, 99, 42, 7], 11, top_k=top, query_via="both")
    result.prompt = EVIL
    result.tokens = [EVIL + str(i) for i in range(len(result.tokens))]
    graph = result.graph(top=2 * top)
    path = tmp_path / "graph.html"
    path.write_text(graph_page(graph), encoding="utf-8")
    return graph, path


def test_the_page_is_self_contained_and_inert(tmp_path):
    graph, path = _page(tmp_path, 8)
    page = path.read_text(encoding="utf-8")
    assert "<img" not in page and EVIL not in page  # the markup is JSON-escaped, never raw
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from anywhere
    assert "Cytoscape Consortium" in page and "default-src 'none'" in page


def test_the_page_draws_the_chosen_circuit_in_chromium(tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed here (CI installs it)")
    graph, path = _page(tmp_path, 8)
    dom = _headless(chromium, "--virtual-time-budget=10000", "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr
    # the default view: the top 20 value neurons (here all 16), their query neurons, every token and the answer
    values = [n for n in graph["nodes"] if n["kind"] in ("ffn", "attention")]
    shown = {n["id"] for n in sorted(values, key=lambda n: -abs(n["score"]))[:20]}
    links = [l for l in graph["links"] if (l["kind"] == "value" and l["source"] in shown) or
             (l["kind"] != "value" and l["target"] in shown)]
    queries = {l["source"] for l in links if l["kind"] == "query"}
    nodes = len(graph["tokens"]) + 1 + len(shown) + len(queries)
    assert f"drawn {nodes} nodes, {len(links)} links" in dom.stdout, dom.stdout[-2000:]
    assert "<img" not in dom.stdout and "owned" not in dom.stdout.split("<title>")[1].split("</title>")[0]


def test_the_page_hides_sink_neurons_behind_a_toggle(tmp_path):
    """#34 item 3: a graph that holds neurons reading the first token draws them only when "show sinks" is ticked;
    by default the page says how many it hides."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium is not installed here (CI installs it)")
    result = attribute(tiny_llama(), [5, 17, 3, 99, 42, 7], 11, top_k=40, query_via="attention")
    graph = result.graph(top=80, sinks=True)
    sinks = {n["id"] for n in graph["nodes"] if n.get("sink")}
    assert sinks
    path = tmp_path / "graph.html"
    path.write_text(graph_page(graph), encoding="utf-8")
    dom = _headless(chromium, "--virtual-time-budget=10000", "--dump-dom", path.as_uri())
    assert dom.returncode == 0, dom.stderr
    values = [n for n in graph["nodes"] if n["kind"] in ("ffn", "attention") and n["id"] not in sinks]
    shown = {n["id"] for n in sorted(values, key=lambda n: -abs(n["score"]))[:20]}
    links = [l for l in graph["links"] if ((l["kind"] == "value" and l["source"] in shown) or
             (l["kind"] != "value" and l["target"] in shown)) and l["source"] not in sinks]
    queries = {l["source"] for l in links if l["kind"] == "query"}
    nodes = len(graph["tokens"]) + 1 + len(shown) + len(queries)
    assert f"drawn {nodes} nodes, {len(links)} links ({len(sinks)} sink neurons hidden)" in dom.stdout, \
        dom.stdout[-1500:]
    assert 'id="sinks"' in dom.stdout


def test_a_nodes_panel_reads_as_names_and_numbers(tmp_path):
    """#34 item 4: the side panel of `attribute --html` is a readable text (kind, name, score, parts, tokens, links by
    name), not a dump of the node's keys (no `expert: null`, no raw `x`)."""
    from .test_explorer import _driver

    graph, path = _page(tmp_path, 8)
    driver = _driver()
    try:
        driver.get(path.as_uri())
        ffn = next(n for n in graph["nodes"] if n["kind"] == "ffn")
        panel = driver.execute_script("return view.describe(arguments[0])", ffn["id"])
    finally:
        driver.quit()
    assert panel.startswith(f"FFN value neuron {ffn['name']}\nscore: {ffn['score']:+.4f}")
    assert "coefficient:" in panel and "to:\n  answer" in panel
    for raw in ("expert:", "x:", "null", "undefined", '"id"'):
        assert raw not in panel, (raw, panel)


def test_the_circuit_page_draws_layers_and_the_strongest_path(tmp_path):
    """#34 item 4: `attribute --html` draws the circuit — the header with prompt, answer, p and top predictions,
    nodes without the residual ones by default, and "highlight the strongest path" naming a path from a token to
    the answer (its share: the product of each link's fraction of its target's incoming |weight|)."""
    from selenium.webdriver.common.by import By

    from neuron_attribution.pipelines.circuit import circuit
    from neuron_attribution.reports.graph_page import circuit_page

    from .test_explorer import _driver, _wait_for

    graph = circuit(tiny_llama(), [5, 17, 3, 99, 42, 7], 11)
    graph["prompt"] = EVIL
    path = tmp_path / "circuit.html"
    path.write_text(circuit_page(graph), encoding="utf-8")
    shown = [n for n in graph["nodes"] if n["kind"] != "residual" and not n.get("sink")]
    links = [l for l in graph["links"] if {l["source"], l["target"]} <= {n["id"] for n in shown}]
    driver = _driver()
    try:
        driver.get(path.as_uri())
        _wait_for(driver, lambda d: "drawn" in d.find_element(By.ID, "graph-status").text, 30)
        assert driver.find_element(By.ID, "graph-status").text == f"drawn {len(shown)} nodes, {len(links)} links"
        assert json.dumps(EVIL) in driver.find_element(By.ID, "title").text and driver.title != "owned"  # as text
        assert "Top predictions:" in driver.find_element(By.ID, "predictions").text
        driver.find_element(By.ID, "strongest").click()
        text = driver.find_element(By.ID, "path").text
        assert text.endswith(")") and " → " in text and "→ answer (share" in text, text
        driver.find_element(By.ID, "residuals").click()
        assert driver.find_element(By.ID, "graph-status").text == \
            f"drawn {len(graph['nodes']) - sum(1 for n in graph['nodes'] if n.get('sink'))} nodes, " \
            f"{sum(1 for l in graph['links'] if not (graph_node(graph, l['source']).get('sink') or graph_node(graph, l['target']).get('sink')))} links"
        assert not driver.find_elements(By.TAG_NAME, "img")
    finally:
        driver.quit()


def graph_node(graph: dict, node_id: str) -> dict:
    return next(n for n in graph["nodes"] if n["id"] == node_id)


@pytest.mark.slow
def test_the_circuit_pages_labels_do_not_overlap(real_model, tmp_path):
    """#34 item 4: on SmolLM2's Eiffel circuit (ten neurons can share the last position's cell of one layer) no two
    node labels overlap: a cell's nodes sit side by side with room for their labels, each position's column as
    wide as its widest cell."""
    from neuron_attribution.pipelines.circuit import circuit
    from neuron_attribution.reports.graph_page import circuit_page

    from .test_explorer import _driver, _wait_for

    graph = circuit(real_model, "The Eiffel Tower is located in the city of", " Paris")
    graph["prompt"] = "The Eiffel Tower is located in the city of"
    path = tmp_path / "circuit.html"
    path.write_text(circuit_page(graph), encoding="utf-8")
    driver = _driver()
    try:
        driver.get(path.as_uri())
        _wait_for(driver, lambda d: "drawn" in d.find_element("id", "graph-status").text, 30)
        for residuals in (False, True):
            if residuals:
                driver.find_element("id", "residuals").click()
            boxes = driver.execute_script(
                "return view.cy.nodes().filter(n => n.data('kind') !== 'axis').map(n => {"
                "const b = n.boundingBox({includeNodes: false, includeLabels: true});"
                "return [n.data('label'), b.x1, b.y1, b.x2, b.y2]; })")
            assert len(boxes) > 20
            for i, (label, x1, y1, x2, y2) in enumerate(boxes):
                assert x2 > x1 and y2 > y1
                for other, u1, v1, u2, v2 in boxes[i + 1:]:
                    overlap = min(x2, u2) - max(x1, u1), min(y2, v2) - max(y1, v1)
                    assert overlap[0] <= 0.5 or overlap[1] <= 0.5, (label, other)
    finally:
        driver.quit()
