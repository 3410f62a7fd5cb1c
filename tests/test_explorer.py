"""The explorer (`neuron-attribution serve`), served for real (uvicorn on a loopback port) over the default model
and a small run, and driven in Chromium by selenium with Debian's chromium-driver: the graph shows the
attribution's top items, a clicked node's panel, interventions equal to the library's, neuron pages equal to
loops over the run's rows, inert markup, 4xx for bad requests, and 50 requests from 10 clients."""

from __future__ import annotations

import json
import re
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("duckdb")

from neuron_attribution import Ablation, FfnIndex, last_logits, parse_neuron, project  # noqa: E402
from neuron_attribution.explorer.app import create_app  # noqa: E402
from neuron_attribution.explorer.run_index import RunIndex, check_runs  # noqa: E402
from neuron_attribution.explorer.server import BackgroundServer, open_socket  # noqa: E402
from neuron_attribution.explorer.views import Views  # noqa: E402
from neuron_attribution.pipelines.attribute import attribute  # noqa: E402
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings  # noqa: E402
from neuron_attribution.settings import ScoringOptions  # noqa: E402

PROMPT = "The capital of France is"
FACTS = [{"prompt": "The capital of France is", "answer": "Paris", "type": "capital"},
         {"prompt": "The capital of Italy is", "answer": "Rome", "type": "capital"},
         {"prompt": "The official language of France is", "answer": "French", "type": "language"},
         {"prompt": "The official language of Spain is", "answer": "Spanish", "type": "language"},
         {"prompt": "Berlin is a city in the country of", "answer": "Germany", "type": "country"}]
RUN_TOP = 40


@pytest.fixture(scope="module")
def run_dir(real_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("explorer")
    facts = directory / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    run_dataset(real_model, directory / "run", RunArguments(str(facts)), settings=run_settings(real_model, RUN_TOP),
                batch_size=5)
    return directory / "run"


@pytest.fixture(scope="module")
def views(real_model) -> Views:
    return Views(real_model, ScoringOptions())


@pytest.fixture(scope="module")
def server(views, run_dir):
    app = create_app(views, RunIndex(check_runs([run_dir])), token=None)  # the guard has its own tests
    with BackgroundServer(app) as url:
        yield url


def _get(url: str, headers: dict | None = None) -> tuple[int, dict]:
    return _send(urllib.request.Request(url, headers=headers or {}))


def _post(url: str, body, content_type: str = "application/json") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _send(urllib.request.Request(url, data=data, headers={"content-type": content_type}, method="POST"))


def _send(request) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except json.JSONDecodeError:
            return error.code, {"text": body.decode(errors="replace")}


def _probability(model, prompt: str, token_id: int, ablation: Ablation | None = None) -> float:
    return float(torch.softmax(last_logits(model, [prompt], ablation)[0].double(), -1)[token_id])


# -- the API, against the library and loops over the run's rows ------------------------------------------------


def test_interventions_over_http_equal_the_librarys(server, real_model):
    neurons = ["27_846", "28_1078", "23_4_38@3", "24.7"]
    target = attribute(real_model, PROMPT, top_k=5, query_top=0).target
    for scale in (0.0, 3.0, -1.0):
        status, data = _post(server + "api/intervene", {"prompt": PROMPT, "neurons": neurons, "scale": scale})
        assert status == 200, data
        expected = _probability(real_model, PROMPT, target.id, Ablation.of([parse_neuron(n) for n in neurons], scale))
        assert data["after"]["prob"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert data["before"]["prob"] == pytest.approx(target.prob, rel=1e-5)
        assert data["target"]["id"] == target.id
    assert data["after"]["prob"] != pytest.approx(data["before"]["prob"], abs=1e-4)  # the neurons matter


def test_bad_requests_get_a_4xx_with_a_message(server):
    cases = [
        (_get(server + "api/neuron/99_1"), 404, "not a neuron of this model"),
        (_get(server + "api/neuron/abc"), 400, "not a neuron"),
        (_post(server + "api/attribute", b"{not json"), 400, "not valid JSON"),
        (_post(server + "api/attribute", {"prompt": PROMPT}, "text/plain"), 415, "application/json"),
        (_post(server + "api/attribute", ["a list"]), 400, "JSON object"),
        (_post(server + "api/attribute", {"prompt": "word " * 9000}), 400, "context holds 8192"),
        (_post(server + "api/attribute", {"prompt": PROMPT, "target": "   "}), 400, "target is empty"),
        (_post(server + "api/attribute", {"prompt": PROMPT, "top": 0}), 400, "top must be"),
        (_post(server + "api/intervene", {"prompt": PROMPT, "neurons": ["27_99999"]}), 400, "not a neuron of"),
        (_post(server + "api/intervene", {"prompt": PROMPT, "neurons": "27_846"}), 400, "neurons must be"),
        (_post(server + "api/intervene", {"prompt": PROMPT, "neurons": ["27_846"], "scale": "x"}), 400, "scale"),
        (_get(server + "api/search?q=" + urllib.parse.quote(" Parisian")), 400, "2 tokens"),
        (_get(server + "api/runs/7"), 404, "no run 7"),
        (_post(server + "api/attribute", b"x" * (70 * 1024)), 413, "over 64 KB"),
        # #35 item 9: messages in the page's words — its controls' labels, neurons by their names
        (_post(server + "api/attribute", {"prompt": PROMPT, "target": " Paris", "contrast": " London",
                                          "answer_tokens": "all"}), 400, "use “Answer tokens: first” with it"),
        (_get(server + "api/neuron/99_99999"), 404, "not a neuron of this model: 99_99999 (model"),
    ]
    for (status, body), expected_status, message in cases:
        assert status == expected_status, (body, message)
        assert message in body.get("error", ""), body
        assert "Traceback" not in json.dumps(body)
        assert not re.search(r"Index\(|\w='", body.get("error", "")), body  # no repr, no Python spelling
    # Nothing outside the package's assets and the loaded runs can be named.
    for path in ("assets/..%2F..%2Fapp.py", "assets/explorer.js/../../app.py", "../../etc/passwd", "api/runs/-1"):
        status, body = _get(server + path)
        assert status == 404, (path, body)
    assert _get(server + "api/info", {"Host": "attacker.example"})[0] == 400  # DNS rebinding


def test_neuron_page_data_equals_a_loop_over_the_runs_rows(server, run_dir, real_model):
    ffn = pq.read_table(run_dir / "ffn_neurons.parquet").to_pylist()
    sentences = {row["sentence_id"]: row for row in pq.read_table(run_dir / "sentences.parquet").to_pylist()}
    counts = defaultdict(int)
    for row in ffn:
        counts[(row["layer"], row["neuron"])] += 1
    (layer, neuron), _ = max(counts.items(), key=lambda item: (item[1], item[0]))
    mine = [row for row in ffn if (row["layer"], row["neuron"]) == (layer, neuron)]
    status, data = _get(server + f"api/neuron/{layer}_{neuron}")
    assert status == 200, data
    (run,) = data["runs"]
    assert run["hits"] == len(mine) and run["top_k"] == RUN_TOP
    assert [(s["sentence_id"], s["rank"]) for s in run["sentences_with"]] == \
        [(r["sentence_id"], r["rank"]) for r in sorted(mine, key=lambda r: -r["score"])]
    assert run["sentences_with"][0]["prompt"] == sentences[run["sentences_with"][0]["sentence_id"]]["prompt"]
    for row in run["per_type"]:
        scores = [r["score"] for r in mine if r["type"] == row["type"]]
        assert row["hits"] == len(scores)
        assert row["sentences"] == sum(s["type"] == row["type"] for s in sentences.values())
        if scores:
            assert row["mean"] == pytest.approx(float(np.mean(scores)))
            assert row["median"] == pytest.approx(float(np.median(scores)))
        # #35 item 4: which end it pushes (the coefficient's sign) and how often it wins by suppressing
        of_type = [r for r in mine if r["type"] == row["type"]]
        assert row["top_end"] == sum(r["coefficient"] >= 0 for r in of_type)
        assert row["bottom_end"] == sum(r["coefficient"] < 0 for r in of_type)
        assert row["by_suppressing"] == sum(r["score"] > 0 and r["target_push_rank"] > real_model.shape.vocab_size / 2
                                            for r in of_type)
    by_sentence = {r["sentence_id"]: r for r in mine}
    for s in run["sentences_with"]:
        row = by_sentence[s["sentence_id"]]
        assert s["coefficient"] == pytest.approx(row["coefficient"]) and s["target_push_rank"] == row["target_push_rank"]
        assert s["wins_by_suppressing"] == (row["score"] > 0 and row["target_push_rank"] > real_model.shape.vocab_size / 2)
    assert sum(b["count"] for b in run["histogram"]) == len(mine)
    # Its vocabulary projection is the library's.
    assert data["projection"]["top_tokens"] == project(real_model, FfnIndex(layer, neuron), 20).top_tokens


def test_run_view_equals_a_loop_over_the_runs_rows(server, run_dir):
    status, data = _get(server + "api/runs/0")
    assert status == 200, data
    sentences = pq.read_table(run_dir / "sentences.parquet").to_pylist()
    assert [s["prompt"] for s in data["sentences"]] == [s["prompt"] for s in sentences]
    assert {t["type"]: t["sentences"] for t in data["types"]} == \
        {t: sum(s["type"] == t for s in sentences) for t in {s["type"] for s in sentences}}
    heads = pq.read_table(run_dir / "heads.parquet").to_pylist()
    for kind in {h["type"] for h in heads}:
        totals = defaultdict(list)
        for h in heads:
            if h["type"] == kind:
                totals[f"{h['layer']}.{h['head']}"].append(h["score"])
        best = sorted(totals, key=lambda name: -np.mean(totals[name]))[:10]
        assert [h["name"] for h in data["heads"] if h["type"] == kind] == best
    layers = pq.read_table(run_dir / "layers.parquet").to_pylist()
    capital_23 = [r["attention"] for r in layers if r["type"] == "capital" and r["layer"] == 23]
    (row,) = [r for r in data["layers"] if r["type"] == "capital" and r["layer"] == 23]
    assert row["attention"] == pytest.approx(float(np.mean(capital_23)))
    ffn = pq.read_table(run_dir / "ffn_neurons.parquet").to_pylist()
    for n in data["neurons"]:  # how often each listed neuron pushed its projection's bottom end (#35 item 4)
        mine = [r for r in ffn if r["type"] == n["type"] and f"{r['layer']}_{r['neuron']}" == n["name"]
                and r["rank"] <= 10]
        assert n["sentences"] == len(mine) and n["bottom_end"] == sum(r["coefficient"] < 0 for r in mine)


def test_token_search_equals_the_definition(server, real_model):
    """z of a neuron for ' Paris': its projection logit less the vocabulary's mean, over the projection's
    standard deviation, computed here in float64 from the weights for a whole layer."""
    status, data = _get(server + "api/search?q=" + urllib.parse.quote("' Paris'"))
    assert status == 200, data
    token = data["token_id"]
    hf = real_model.hf_model
    unembedding = hf.lm_head.weight.detach().double()
    gain = hf.model.norm.weight.detach().double()
    layer = data["ffn"]["promote"][0]["layer"]
    values = hf.model.layers[layer].mlp.down_proj.weight.detach().double().T  # (N, d)
    logits = (values * gain) @ unembedding.T  # (N, V)
    z = (logits[:, token] - logits.mean(-1)) / logits.std(-1, unbiased=False)
    found = [r for r in data["ffn"]["promote"] if r["layer"] == layer]
    for row in found:
        assert row["z"] == pytest.approx(float(z[int(row["name"].split("_")[1])]), rel=1e-3)
    cutoff = min(r["z"] for r in data["ffn"]["promote"])
    assert {f"{layer}_{n}" for n in (z > cutoff + 1e-3).nonzero().flatten().tolist()} <= {r["name"] for r in found}
    assert data["ffn"]["suppress"][0]["z"] < 0 < data["ffn"]["promote"][0]["z"]


def test_fifty_requests_from_ten_clients_while_the_server_stays_responsive(server):
    bodies = [{"prompt": f"The capital of {country} is", "neurons": ["27_846", "23_4_38@3"], "scale": 0}
              for country in ("France", "Italy", "Spain", "Germany", "Japan")]
    seen_waiting: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            status, queue = _get(server + "api/queue")
            assert status == 200
            seen_waiting.append(queue["pending"])

    def request(i: int) -> int:
        if i % 5 == 4:
            return _get(server + "api/neuron/27_846")[0]
        return _post(server + "api/intervene", bodies[i % len(bodies)])[0]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(request, range(50)))
    finally:
        done.set()
        watcher.join()
    assert statuses == [200] * 50
    # The event loop answered while model work was queued behind other requests.
    assert max(seen_waiting) >= 2


# -- the command line ------------------------------------------------------------------------------------------


def test_serve_refuses_what_is_no_run_and_a_port_in_use(tmp_path, cli, no_model_loads):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text(json.dumps({"complete": False}))
    for args, message in ((["--run", str(tmp_path / "nothing")], "no such directory"),
                          (["--run", str(tmp_path)], "no readable run.json"),
                          (["--run", str(tmp_path / "half")], "is not finished"),
                          (["--port", "70000"], "a port is 0 to 65535")):
        result = cli("serve", *args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    taken = open_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        result = cli("serve", "--port", str(port))
        assert result.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in result.stderr, result.stderr
    finally:
        taken.close()


# -- in the browser --------------------------------------------------------------------------------------------


def _driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium or chromium-driver is missing: .ci/run installs them")
        pytest.skip("Chromium and chromium-driver are not installed here (CI installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1400",
                     "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking"):
        options.add_argument(argument)
    options.binary_location = chromium
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the pages' script errors, for get_log
    return webdriver.Chrome(service=Service(chromedriver), options=options)


@pytest.fixture(scope="module")
def browser():
    driver = _driver()
    yield driver
    driver.quit()


def _wait_for(driver, condition, seconds: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds).until(condition)


def _text(driver, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def test_the_prompt_view_in_a_browser(server, browser, real_model):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    browser.get(server)
    box = _wait_for(browser, lambda d: d.find_element(By.ID, "prompt"))
    box.clear()
    box.send_keys(PROMPT)
    browser.find_element(By.ID, "go").click()
    _wait_for(browser, lambda d: d.find_elements(By.ID, "graph-status") and (
        _text(d, "graph-status").startswith("drawn") or "Error" in _text(d, "status")))
    assert _text(browser, "graph-status").startswith("drawn"), _text(browser, "status")
    assert browser.current_url.endswith("?" + urllib.parse.urlencode({"prompt": PROMPT}))  # a link to this view
    # The graph's value neurons are the attribution's top 20 by |score|.
    result = attribute(real_model, PROMPT)
    expected = {n["id"] for n in result.graph(top=20)["nodes"] if n["kind"] in ("ffn", "attention")}
    drawn = set(browser.execute_script(
        "return explorer.graph.cy.nodes().filter(n => ['ffn', 'attention'].includes(n.data('kind'))).map(n => n.id())"))
    assert drawn == expected
    assert _text(browser, "target-prob") == f"{result.target.prob:.6f}"

    # A real click on the strongest FFN neuron opens its panel.
    top_ffn = f"ffn:{result.ffn_neurons[0].layer}_{result.ffn_neurons[0].neuron}"
    x, y = browser.execute_script(
        "const p = explorer.graph.cy.getElementById(arguments[0]).renderedPosition(); return [p.x, p.y];", top_ffn)
    graph = browser.find_element(By.ID, "graph")
    ActionChains(browser).move_to_element_with_offset(graph, x - graph.size["width"] / 2,
                                                      y - graph.size["height"] / 2).click().perform()
    _wait_for(browser, lambda d: top_ffn.split(":")[1] in _text(d, "side-title"), 10)
    assert f"score: {result.ffn_neurons[0].score:.4f}" in _text(browser, "side-numbers")
    # Select two neurons and switch them off: the page shows the library's probability.
    browser.find_element(By.CSS_SELECTOR, "#side button.pick").click()
    second = f"{result.ffn_neurons[1].layer}_{result.ffn_neurons[1].neuron}"
    browser.find_element(By.CSS_SELECTOR, f'#ffn-table button.pick[data-neuron="{second}"]').click()
    browser.find_element(By.ID, "switch-off").click()
    _wait_for(browser, lambda d: d.find_elements(By.ID, "after-prob"), 60)
    names = [top_ffn.split(":")[1], second]
    expected_off = _probability(real_model, PROMPT, result.target.id, Ablation.of([parse_neuron(n) for n in names]))
    shown = browser.find_element(By.ID, "after-prob")
    assert shown.text == f"{expected_off:.6f}"
    assert float(shown.get_attribute("data-prob")) == pytest.approx(expected_off, rel=1e-9)
    # Amplify ×3. (The expectation first: hooks are installed on the shared model, so this thread must not run
    # it while the server's model thread does.)
    expected_up = _probability(real_model, PROMPT, result.target.id,
                               Ablation.of([parse_neuron(n) for n in names], scale=3))
    scale = browser.find_element(By.ID, "scale")
    scale.clear()
    scale.send_keys("3")
    browser.find_element(By.ID, "amplify").click()
    _wait_for(browser, lambda d: "×3" in _text(d, "intervention") and d.find_elements(By.ID, "after-prob"), 60)
    assert _text(browser, "after-prob") == f"{expected_up:.6f}", _text(browser, "intervention")
    # Measure each alone: one row per selected neuron, its score beside the measured change, and all together.
    together = float(torch.log_softmax(last_logits(real_model, [PROMPT], Ablation.of([parse_neuron(n) for n in names]))
                                       [0].double(), -1)[result.target.id]
                     - torch.log_softmax(last_logits(real_model, [PROMPT])[0].double(), -1)[result.target.id])
    browser.find_element(By.ID, "measure").click()
    _wait_for(browser, lambda d: d.find_elements(By.ID, "measured-together"), 60)
    rows = browser.find_elements(By.CSS_SELECTOR, "#measured tbody tr")
    assert [row.find_elements(By.TAG_NAME, "td")[0].text for row in rows] == names
    assert float(_text(browser, "measured-together")) == pytest.approx(together, abs=2e-4)
    # "Select the top N": the N value neurons with the largest |score|, FFN and attention, replace the selection.
    count = browser.find_element(By.ID, "top-count")
    count.clear()
    count.send_keys("5")
    browser.find_element(By.ID, "select-top").click()
    top5 = sorted([*result.ffn_neurons, *result.attention_neurons], key=lambda n: -abs(n.score))[:5]
    chips = {chip.text.split("\n")[0].rstrip("×").strip()
             for chip in browser.find_elements(By.CSS_SELECTOR, "#picked .chip")}
    assert chips == {str(n.index) for n in top5}, chips
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_markup_in_a_prompt_stays_inert_text(server, browser):
    from selenium.webdriver.common.by import By

    evil = 'Hi <img src=x onerror="window.pwned=1"><script>window.pwned=2</script> is'
    browser.get(server + "?" + urllib.parse.urlencode({"prompt": evil}))
    _wait_for(browser, lambda d: _text(d, "graph-status").startswith("drawn") or "Error" in _text(d, "status"))
    assert browser.execute_script("return window.pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#view img, #view script")
    tokens = "".join(span.text for span in browser.find_elements(By.CSS_SELECTOR, "#summary .tokens span"))
    assert "<img" in tokens.replace(" ", "") and "<script>" in tokens.replace(" ", "")


def test_the_page_says_what_it_scored_when_it_is_not_what_was_typed(server, browser, real_model):
    """#35 items 7 and 8: the target `<b>x</b>` was scored as `' <'` (a space added, the first token only) and the
    page said nothing; it says both now, names the whole answer, and with every token scored says so."""
    from selenium.webdriver.common.by import By

    browser.get(server + "?" + urllib.parse.urlencode({"prompt": PROMPT, "target": "<b>x</b>"}))
    _wait_for(browser, lambda d: _text(d, "graph-status").startswith("drawn") or "Error" in _text(d, "status"))
    note = _text(browser, "answer-note")
    assert 'a leading space was added to "<b>x</b>"' in note, note
    answer = attribute(real_model, PROMPT, "<b>x</b>", top_k=5, query_top=0).target
    assert answer.answer == " <b>x</b>" and answer.text == " <"
    assert f'is {answer.n_answer_tokens} tokens and only the first, " <", is scored' in note, note
    assert 'Answer " <b>x</b>", first token " <"' in _text(browser, "summary")
    assert not browser.find_elements(By.CSS_SELECTOR, "#view b b")  # the markup stayed text
    browser.get(server + "?" + urllib.parse.urlencode({"prompt": "The Golden Gate Bridge is in", "target": " San Francisco",
                                                       "answer_tokens": "all"}))
    _wait_for(browser, lambda d: _text(d, "graph-status").startswith("drawn") or "Error" in _text(d, "status"))
    assert "every answer token is scored" in _text(browser, "answer-note")
    assert 'Answer " San Francisco"' in _text(browser, "summary")


def test_a_neuron_page_of_a_loaded_run_in_a_browser(server, browser, run_dir):
    from selenium.webdriver.common.by import By

    ffn = pq.read_table(run_dir / "ffn_neurons.parquet").to_pylist()
    hits = sum((row["layer"], row["neuron"]) == (27, 846) for row in ffn)
    browser.get(server + "neuron/27_846")
    _wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".run-section .hits"))
    assert _text(browser, "neuron-title").startswith("FFN neuron 27_846")
    assert browser.find_element(By.CSS_SELECTOR, ".run-section .hits").text == str(hits)
    rows = browser.find_elements(By.CSS_SELECTOR, "#sentences-0 tbody tr")
    assert len(rows) == hits
    # each sentence says which end of the projection 27_846 pushes there: its coefficient's sign
    signs = {row["sentence_id"]: row["coefficient"] >= 0 for row in ffn if (row["layer"], row["neuron"]) == (27, 846)}
    shown = [r.find_element(By.CSS_SELECTOR, "td.pushes").text for r in rows]
    assert sorted(shown) == sorted("top end" if positive else "bottom end" for positive in signs.values())
    assert len(browser.find_elements(By.CSS_SELECTOR, "#top-tokens tbody tr")) == 20
    # A sentence links to its prompt view.
    link = rows[0].find_element(By.TAG_NAME, "a")
    assert "/?prompt=" in link.get_attribute("href")
    # The run view lists every sentence and opens a head page.
    browser.get(server + "run/0")
    _wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#run-sentences tbody tr"))
    n_sentences = pq.read_metadata(run_dir / "sentences.parquet").num_rows
    assert len(browser.find_elements(By.CSS_SELECTOR, "#run-sentences tbody tr")) == n_sentences
    # #35 item 1: the header counts the sentences (it read "[object Object],…") and no two layer labels touch
    header = browser.find_element(By.CSS_SELECTOR, "#run-title + p").text
    assert f" · {n_sentences} sentences · " in header and "object" not in header, header
    for chart in browser.find_elements(By.CSS_SELECTOR, "svg[id^='layers-']"):
        boxes = browser.execute_script(
            "return [...arguments[0].querySelectorAll('text')].filter(t => /^\\d+$/.test(t.textContent))"
            ".map(t => { const b = t.getBBox(); return [b.x, b.x + b.width]; })", chart)
        assert len(boxes) >= 5
        assert all(right + 2 <= left for (_, right), (left, _) in zip(boxes, boxes[1:])), boxes
    browser.get(server + "search?q=" + urllib.parse.quote("' Paris'"))
    _wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ffn-promote tbody tr"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#ffn-promote tbody tr")) == 30
    assert not browser.find_elements(By.ID, "other-variant")  # quoted: exactly what was asked for
    # #35 item 10: what the runs found comes before the weight tables
    order = browser.execute_script("const all = [...document.querySelectorAll('#view *')];"
                                   "return [all.indexOf(document.getElementById('run-promoting')),"
                                   "all.indexOf(document.getElementById('ffn-promote'))]")
    assert 0 <= order[0] < order[1], order
    # Paris without quotes searches the no-space token and says so, linking the word after a space
    browser.get(server + "search?q=Paris")
    _wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ffn-promote tbody tr"))
    note = _text(browser, "other-variant")
    assert 'Searched "Paris"' in note and 'another token, " Paris"' in note, note
    browser.find_element(By.ID, "other-variant-link").click()
    _wait_for(browser, lambda d: "%20Paris" in d.current_url or "+Paris" in d.current_url)
    _wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ffn-promote tbody tr"))
    assert '" Paris"' in browser.find_element(By.TAG_NAME, "h2").text
    assert not browser.find_elements(By.ID, "other-variant")


# -- a mixture of experts: expert neurons by name, through the API and on the page --------------------------------

@pytest.fixture(scope="module")
def mixture(real_model):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    from neuron_attribution.model.loaded import LoadedModel

    torch.manual_seed(0)
    config = Qwen2MoeConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=real_model.shape.vocab_size, num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=32, shared_expert_intermediate_size=48,
                            max_position_embeddings=256, tie_word_embeddings=False)
    return LoadedModel.from_hf(Qwen2MoeForCausalLM(config), real_model.tokenizer, name="tiny-qwen2-moe")


@pytest.fixture(scope="module")
def mixture_server(mixture):
    with BackgroundServer(create_app(Views(mixture, ScoringOptions()), RunIndex([]), token=None)) as url:
        yield url


def test_expert_neurons_in_the_explorer(mixture_server, mixture, browser):
    from selenium.webdriver.common.by import By

    status, page = _post(mixture_server + "api/attribute", {"prompt": PROMPT, "top": 40})
    assert status == 200, page
    result = attribute(mixture, PROMPT)
    shown = len(page["ffn_neurons"])
    assert [n["name"] for n in page["ffn_neurons"]] == [str(n.index) for n in result.ffn_neurons[:shown]]
    expert_neuron = next(n.index for n in attribute(mixture, PROMPT, top_k=200).ffn_neurons if n.expert is not None)
    neurons = [str(expert_neuron), f"{expert_neuron.layer}_e{(expert_neuron.expert + 1) % 8}"]
    for scale in (0.0, 2.0):
        status, data = _post(mixture_server + "api/intervene", {"prompt": PROMPT, "neurons": neurons, "scale": scale})
        assert status == 200, data
        expected = _probability(mixture, PROMPT, result.target.id, Ablation.of([parse_neuron(n) for n in neurons],
                                                                               scale))
        assert data["after"]["prob"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    status, data = _get(mixture_server + f"api/neuron/{expert_neuron}")
    assert status == 200 and data["expert"] == expert_neuron.expert
    assert data["projection"]["top_tokens"] == project(mixture, expert_neuron, 20).top_tokens
    status, data = _get(mixture_server + f"api/neuron/{expert_neuron.layer}_e0")
    assert status == 400 and "a whole expert has no single vector" in data["error"]
    browser.get(mixture_server + f"neuron/{expert_neuron}")
    _wait_for(browser, lambda d: d.find_elements(By.ID, "neuron-title"))
    assert _text(browser, "neuron-title") == (f"FFN neuron {expert_neuron} (layer {expert_neuron.layer}, expert "
                                              f"{expert_neuron.expert}, neuron {expert_neuron.neuron})")


@pytest.fixture(scope="module")
def wide_run_dir(real_model, tmp_path_factory) -> Path:
    """Three sentences at top 300: attention neurons there sit at several source positions of one sentence."""
    directory = tmp_path_factory.mktemp("explorer-wide")
    facts = directory / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS[:3]))
    run_dataset(real_model, directory / "run", RunArguments(str(facts)), settings=run_settings(real_model, 300),
                batch_size=3)
    return directory / "run"


def test_an_attention_neurons_page_counts_sentences_not_positions(wide_run_dir):
    """An attention neuron has a row per source position: its page counts sentences (never "12 of 6") and
    summarises each by its best position there; checked against a loop over the Parquet rows."""
    run_dir = wide_run_dir
    index = RunIndex(check_runs([run_dir]))
    rows = pq.read_table(run_dir / "attention_neurons.parquet").to_pylist()
    sentences = {row["sentence_id"]: row for row in pq.read_table(run_dir / "sentences.parquet").to_pylist()}
    by_neuron: dict[tuple[int, int, int], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_neuron[(row["layer"], row["head"], row["dim"])][row["sentence_id"]].append(row)
    # the neuron with the most rows per sentence: several positions in the same sentences
    neuron, per_sentence = max(by_neuron.items(),
                               key=lambda item: (sum(len(v) for v in item[1].values()) - len(item[1]), item[0]))
    assert sum(len(v) for v in per_sentence.values()) > len(per_sentence)  # the case that was counted twice
    best = {sid: max(found, key=lambda r: (r["score"], -r["position"])) for sid, found in per_sentence.items()}
    (run,) = index.neuron_view(parse_neuron("{}_{}_{}".format(*neuron)))
    assert run["hits"] == len(per_sentence) <= len(sentences)
    assert [(s["sentence_id"], s["position"], s["positions"]) for s in run["sentences_with"]] == \
        [(sid, r["position"], len(per_sentence[sid])) for sid, r in sorted(best.items(), key=lambda i: -i[1]["score"])]
    for row in run["per_type"]:
        scores = [r["score"] for sid, r in best.items() if r["type"] == row["type"]]
        assert row["hits"] == len(scores) <= row["sentences"]
        if scores:
            assert row["mean"] == pytest.approx(float(np.mean(scores)))
            assert row["median"] == pytest.approx(float(np.median(scores)))
            assert row["max"] == pytest.approx(max(scores))
    assert sum(b["count"] for b in run["histogram"]) == len(per_sentence)
    # a position-specific name shows that position's rows only
    sid, first = next(iter(best.items()))
    (run,) = index.neuron_view(parse_neuron("{}_{}_{}@{}".format(*neuron, first["position"])))
    at_position = [r for found in per_sentence.values() for r in found if r["position"] == first["position"]]
    assert run["hits"] == len(at_position)


def test_the_page_chooses_the_query_path(server, real_model):
    """#34 item 4: the prompt view takes query_via (kept in the page's URL), the library's choice for the query
    neurons; an unknown path is a 400 with a one-line message."""
    status, data = _post(server + "api/attribute", {"prompt": PROMPT, "query_via": "ffn", "top": 20})
    assert status == 200, data
    expected = attribute(real_model, PROMPT, top_k=20, query_via="ffn")
    assert data["query_via"] == "ffn" and data["query"]["query_via"] == "ffn"
    assert [q["name"] for q in data["query_neurons"][:5]] == [str(q.index) for q in expected.query_neurons[:5]]
    status, data = _post(server + "api/attribute", {"prompt": PROMPT, "query_via": "sideways"})
    assert status == 400 and "query_via must be one of attention, ffn, both" in data["error"]


def test_measuring_the_selection_over_http_equals_the_library(server, real_model):
    """#34 items 2 and 4: the page's "measure each alone" switches each selected neuron off alone (and all
    together); every change equals the library's `last_logits` with that Ablation, computed here."""
    neurons = ["25_1120", "27_846", "23_4_38@3", "23.4"]
    status, data = _post(server + "api/measure", {"prompt": PROMPT, "neurons": neurons})
    assert status == 200, data
    target = data["target"]["id"]

    def log_p(ablation=None):
        return float(torch.log_softmax(last_logits(real_model, [PROMPT], ablation)[0].double(), -1)[target])

    before = log_p()
    for row, name in zip(data["alone"], neurons):
        assert row["neuron"] == name
        assert row["measured_change"] == pytest.approx(log_p(Ablation.of([parse_neuron(name)])) - before, abs=2e-5)
    together = log_p(Ablation.of([parse_neuron(n) for n in neurons])) - before
    assert data["together"] == pytest.approx(together, abs=2e-5)  # batched vs alone: float32 rounding
    status, data = _post(server + "api/measure", {"prompt": PROMPT, "neurons": ["99_1"]})
    assert status == 400 and "not a neuron of" in data["error"]


def test_the_prompt_view_draws_the_circuit(server, browser, real_model):
    """#34 item 4: the prompt view draws the multi-hop circuit — the library's `circuit` for the prompt, without
    residual nodes and sinks until asked — and highlights the strongest path from a token to the answer."""
    from selenium.webdriver.common.by import By

    from neuron_attribution import circuit

    status, data = _post(server + "api/attribute", {"prompt": PROMPT, "top": 20})
    assert status == 200, data
    expected = circuit(real_model, PROMPT)
    assert sorted(n["id"] for n in data["circuit"]["nodes"]) == sorted(n["id"] for n in expected["nodes"])
    shown = [n for n in data["circuit"]["nodes"] if n["kind"] != "residual" and not n.get("sink")]
    ids = {n["id"] for n in shown}
    links = [l for l in data["circuit"]["links"] if l["source"] in ids and l["target"] in ids]
    browser.get(server + "?" + urllib.parse.urlencode({"prompt": PROMPT}))
    _wait_for(browser, lambda d: d.find_elements(By.ID, "circuit-status") and
              "drawn" in _text(d, "circuit-status"), 120)
    assert _text(browser, "circuit-status") == f"drawn {len(shown)} nodes, {len(links)} links"
    browser.find_element(By.ID, "circuit-strongest").click()
    assert "→ answer (share" in _text(browser, "circuit-path")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
