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
