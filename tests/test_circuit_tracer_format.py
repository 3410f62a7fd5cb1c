"""#34 item 5: a circuit in circuit-tracer's graph JSON, validated by circuit-tracer's own pydantic models
(circuit-tracer 0.5.0 from PyPI installed with --no-deps, plus pydantic, into a virtual environment of this test's
own: its requirements pin transformers < 4.58, which this project does not use)."""

from __future__ import annotations

import json
import subprocess
import venv

import pytest

from neuron_attribution.pipelines.circuit import CircuitSettings, circuit
from neuron_attribution.results.circuit_tracer import circuit_tracer_graph

from .conftest import tiny_family, tiny_llama

pytestmark = pytest.mark.slow  # installs circuit-tracer and pydantic from PyPI into an environment of its own
CIRCUIT_TRACER = "circuit-tracer==0.5.0"
VALIDATE = """
import json, sys
from circuit_tracer.frontend.graph_models import Model
data = json.load(open(sys.argv[1]))
model = Model(**data)
print(json.dumps({"nodes": len(model.nodes), "links": len(model.links), "slug": model.metadata.slug,
                  "kinds": sorted({n.feature_type for n in model.nodes})}))
"""


@pytest.fixture(scope="module")
def circuit_tracer_python(tmp_path_factory):
    where = tmp_path_factory.mktemp("circuit-tracer-env")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    for arguments in (["pydantic>=2"], ["--no-deps", CIRCUIT_TRACER]):
        done = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *arguments],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return python


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_family("mixtral")])
def test_circuit_tracers_models_accept_the_file(make, circuit_tracer_python, tmp_path):
    model = make()
    ids = [5, 17, 3, 99, 42, 7, 250]
    graph = circuit(model, ids, 11, settings=CircuitSettings(values=8, per_node=5, max_nodes=40))
    converted = circuit_tracer_graph(graph, ids, model.shape.d_ffn, model.shape.head_dim, slug="tiny")
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(converted))
    done = subprocess.run([circuit_tracer_python, "-c", VALIDATE, str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    checked = json.loads(done.stdout)
    assert checked["nodes"] == len(graph["nodes"]) and checked["links"] == len(graph["links"])
    assert checked["kinds"] == ["cross layer transcoder", "embedding", "logit", "mlp reconstruction error"]
    node_ids = [n["node_id"] for n in converted["nodes"]]
    assert len(set(node_ids)) == len(node_ids)
    assert {link["source"] for link in converted["links"]} | {link["target"] for link in converted["links"]} \
        <= set(node_ids)
    logit = next(n for n in converted["nodes"] if n["feature_type"] == "logit")
    assert logit["is_target_logit"] and logit["node_id"] == f"{model.shape.n_layers + 1}_11_{len(ids) - 1}"


# circuit-tracer's index.html loads its libraries from the web; the test serves npm's copies instead (offline after
# npm's cache). transformer-circuits' d3 + jetpack build is not published: d3-jetpack's d3v7 build stands in for
# it, with its helpers put on d3's own selection (the build bundles two copies of d3-selection) and the one
# helper it lacks, `c.drawAxis(svg)`.
NPM_PACKAGES = {"d3-jetpack@2.3.0": ("package/build/d3v7+jetpack.js", "d3.js"),
                "dagre@0.8.5": ("package/dist/dagre.min.js", "dagre.js"),
                "pako@2.1.0": ("package/dist/pako.min.js", "pako.js")}
SELECTION_HELPERS = """
  ["translate", "append", "insert", "parent", "selectAppend", "tspans", "appendMany", "at", "st", "prop"]
    .forEach(function (name) { selection$1.prototype[name] = selection.prototype[name]; });
  ["translate", "at", "st"].forEach(function (name) { transition$1.prototype[name] = transition.prototype[name]; });
"""
DRAW_AXIS = """(function () {
  var conventions = d3.conventions;
  d3.conventions = function (options) {
    var c = conventions(options);
    c.drawAxis = function (svg) { return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})); };
    return c;
  };
})();
"""
SERVE = """
import sys, time
from circuit_tracer.frontend.local_server import serve
serve(sys.argv[1], frontend_dir=sys.argv[2], port=int(sys.argv[3]))
print("serving", flush=True)
time.sleep(600)
"""


def _offline_frontend(circuit_tracer_python, where):
    """circuit-tracer's own frontend files, its web libraries replaced by npm's copies under vendor/."""
    import re
    import shutil
    import tarfile

    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed here (it fetches the frontend's JavaScript libraries)")
    assets = subprocess.run([circuit_tracer_python, "-c", "from importlib.resources import files; "
                             "print(files('circuit_tracer') / 'frontend/assets')"],
                            capture_output=True, text=True, check=True).stdout.strip()
    site = where / "site"
    shutil.copytree(assets, site)
    (site / "vendor").mkdir()
    packs = where / "packs"
    packs.mkdir()
    done = subprocess.run([npm, "pack", "--silent", *NPM_PACKAGES], cwd=packs, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    for spec, (member, name) in NPM_PACKAGES.items():
        package, version = spec.split("@")
        with tarfile.open(packs / f"{package}-{version}.tgz") as archive:
            text = archive.extractfile(member).read().decode("utf-8")
        if name == "d3.js":
            anchor = "  exports.Adder = Adder;"
            assert text.count(anchor) == 1
            text = text.replace(anchor, SELECTION_HELPERS + anchor)
        (site / "vendor" / name).write_text(text, encoding="utf-8")
    (site / "vendor" / "draw-axis.js").write_text(DRAW_AXIS, encoding="utf-8")
    local = {"d3.js": "./vendor/d3.js'></script><script src='./vendor/draw-axis.js", "dagre.min.js": "./vendor/dagre.js",
             "dagre.js": "./vendor/dagre.js", "pako.min.js": "./vendor/pako.js"}
    index = (site / "index.html").read_text(encoding="utf-8")

    def offline(match: re.Match) -> str:
        name = match.group(1).rsplit("/", 1)[-1]
        return f"<script src='{local[name]}'></script>" if name in local else ""

    index = re.sub(r"<script src='(https?://[^']+)'></script>", offline, index)
    assert "http" not in "".join(re.findall(r"<script[^>]*>", index))
    (site / "index.html").write_text(index, encoding="utf-8")
    return site


def test_circuit_tracers_frontend_draws_the_eiffel_graph_in_chromium(circuit_tracer_python, tmp_path, monkeypatch,
                                                                      capsys):
    """`attribute --graph-format circuit-tracer` on SmolLM2, served by circuit-tracer's own local server from the
    folder the CLI wrote (it lists the graph in graph-metadata.json) and drawn by its own frontend in Chromium:
    every node drawn, no script error."""
    import socket
    import time
    import urllib.request

    from selenium.webdriver.common.by import By

    from .conftest import run_cli
    from .test_explorer import _driver, _wait_for

    data = tmp_path / "graphs"
    data.mkdir()
    code, out, err = run_cli(monkeypatch, capsys, "attribute", "The Eiffel Tower is located in the city of",
                             "--target", " Paris", "--graph", str(data / "eiffel.json"),
                             "--graph-format", "circuit-tracer")
    assert code == 0, err
    assert "Listed it in" in out
    graph = json.loads((data / "eiffel.json").read_text())
    assert [g["slug"] for g in json.loads((data / "graph-metadata.json").read_text())["graphs"]] == ["eiffel"]
    site = _offline_frontend(circuit_tracer_python, tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([circuit_tracer_python, "-c", SERVE, str(data), str(site), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://localhost:{port}/data/graph-metadata.json", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, server.stderr.read()[-2000:]
                time.sleep(0.2)
        driver = _driver()
        driver.get(f"http://localhost:{port}/index.html?slug=eiffel")
        _wait_for(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".node")) >= len(graph["nodes"]), 60)
        assert len(driver.find_elements(By.CSS_SELECTOR, ".node")) == len(graph["nodes"])
        assert "The Eiffel Tower is located in the city of" in driver.find_element(By.TAG_NAME, "body").text
        errors = [entry["message"] for entry in driver.get_log("browser")
                  if entry["level"] == "SEVERE" and "favicon" not in entry["message"]]
        assert not errors, errors
    finally:
        if driver is not None:
            driver.quit()
        server.kill()
        server.wait()
