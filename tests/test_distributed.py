"""The Ray backend on a 2-worker local cluster: the same tables and metrics as the local backend, with a worker
killed in the middle of a batch."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from neuron_attribution.datasets import load_facts
from neuron_attribution.evaluation import evaluate
from neuron_attribution.runs import TABLES, RunArguments, run_dataset

from .test_runs import FACTS

ray = pytest.importorskip("ray")
from neuron_attribution.distributed import RayBackend  # noqa: E402


@pytest.mark.slow
def test_ray_backend_matches_local_and_survives_a_dead_worker(real_model, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    arguments = RunArguments(str(facts), None, 15, "skip")
    local = run_dataset(real_model, tmp_path / "local", arguments, batch_size=2)
    marker = tmp_path / "crashed"
    with RayBackend(None, workers=2, crash_once=(1, str(marker))) as backend:
        distributed = run_dataset(real_model, tmp_path / "ray", arguments, batch_size=2, backend=backend)
        loaded, _ = load_facts(str(facts))
        on_ray = evaluate(real_model, loaded, methods="log_prob_increase,norm,random", top=5, batch_size=2,
                          backend=backend)
    assert marker.exists()  # the worker holding batch 1 really died, and the batch was run again
    assert distributed.attributed == local.attributed == 6
    for name in TABLES:
        assert pq.read_table(tmp_path / "ray" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "local" / f"{name}.parquet")), name
    here = evaluate(real_model, loaded, methods="log_prob_increase,norm,random", top=5, batch_size=2)
    assert on_ray.methods == here.methods
