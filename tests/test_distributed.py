"""The Ray backend on a 2-worker local cluster: the settings reach every worker, the tables and metrics equal
the local backend's, and a worker killed in the middle of a batch is restarted and its batch run again."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from neuron_attribution.datasets import load_facts
from neuron_attribution.pipelines.evaluate import evaluate
from neuron_attribution.pipelines.run import RunArguments, run_dataset
from neuron_attribution.results.tables import TABLES
from neuron_attribution.settings import ScoringOptions, Settings

from .conftest import RAY_GROUP
from .test_runs import FACTS

ray = pytest.importorskip("ray")
from neuron_attribution.execution.ray_backend import RayBackend  # noqa: E402

# The helpers below run on the workers, which may not have the tests on their path: send them by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

BUDGET = 64 * 1024**2


def _report_settings(model, settings, item):
    """A batch function that checks, inside the worker, what the worker was handed."""
    assert settings.scoring.memory_budget == BUDGET, settings
    assert str(model.device) == "cpu"
    return settings.scoring.memory_budget, str(model.device), settings.model.device, os.getpid()


def _crash_once(marker: str, function, model, settings, item):
    """Kill this worker process the first time any batch reaches it (a marker file makes it once)."""
    if not Path(marker).exists():
        Path(marker).write_text("crashed")
        os._exit(1)
    return function(model, settings, item)


class CrashingOnce:
    """A backend wrapper for tests: the first batch kills the worker that runs it."""

    def __init__(self, backend, marker: Path):
        self.backend, self.marker = backend, str(marker)
        self.settings = backend.settings

    def map(self, function, items):
        return self.backend.map(functools.partial(_crash_once, self.marker, function), items)

    def on_every_model(self, function, progress=None):
        self.backend.on_every_model(function, progress)


@RAY_GROUP
@pytest.mark.slow
def test_ray_workers_get_the_settings_match_local_and_survive_a_dead_worker(real_model, tmp_path):
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    arguments = RunArguments(str(facts))
    assert real_model.spec.device == "cpu"
    settings = Settings(real_model.spec, ScoringOptions(top_k=15, memory_budget=BUDGET))
    local = run_dataset(real_model, tmp_path / "local", arguments, settings=settings, batch_size=2)
    marker = tmp_path / "crashed"
    with RayBackend(settings, workers=2) as backend:
        seen = [result for _, result in backend.map(_report_settings, list(range(4)))]
        distributed = run_dataset(real_model, tmp_path / "ray", arguments, batch_size=2,
                                  backend=CrashingOnce(backend, marker))
        loaded, _ = load_facts(str(facts))
        on_ray = evaluate(real_model, loaded, methods="log_prob_increase,norm,random", top=5, batch_size=2,
                          backend=backend)
    assert {(budget, device, spec_device) for budget, device, spec_device, _ in seen} == {(BUDGET, "cpu", "cpu")}
    assert len({pid for *_, pid in seen}) == 2  # both workers answered
    assert marker.exists()  # a worker really died, and its batch was run again
    assert distributed.attributed == local.attributed == 6
    for name in TABLES:
        assert pq.read_table(tmp_path / "ray" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "local" / f"{name}.parquet")), name
    recorded = json.loads((tmp_path / "ray" / "run.json").read_text())["settings"]
    assert recorded["scoring"]["memory_budget"] == BUDGET and recorded["model"]["device"] == "cpu"
    here = evaluate(real_model, loaded, methods="log_prob_increase,norm,random", top=5, batch_size=2,
                    settings=settings)
    assert on_ray.methods == here.methods


@RAY_GROUP
@pytest.mark.slow  # starts a Ray cluster: 18 s
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a worker without CUDA is what is checked")
def test_ray_workers_ask_for_gpus_and_a_worker_without_one_fails_in_one_line():
    """A cluster that advertises one GPU (Ray's resources are declared, so this CPU machine can claim one) gets
    each worker's GPU share asked for; too many shares are refused at once instead of waiting for ever, and a
    worker placed where CUDA is not usable names that cause."""
    from neuron_attribution import UserError
    from neuron_attribution.settings import ModelSpec

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        on_gpu = Settings(ModelSpec(device="cuda"))
        with pytest.raises(UserError, match=r"2 Ray workers × 1 GPU .* need 2 GPUs, but the Ray cluster has 1 GPU"):
            RayBackend(on_gpu, workers=2)
        with RayBackend(on_gpu, workers=2, gpus_per_worker=0.5) as backend:
            assert backend.gpus_per_worker == 0.5
            with pytest.raises(UserError) as failed:
                list(backend.map(_report_settings, [0]))
        message = str(failed.value)
        assert "no CUDA GPU is usable on the Ray worker's node" in message and "CUDA_VISIBLE_DEVICES='0'" in message
        assert "\n" not in message
        with RayBackend(Settings(ModelSpec(device="auto")), workers=1) as backend:
            assert backend.gpus_per_worker == 1.0
        with RayBackend(Settings(), workers=1) as backend:
            assert backend.gpus_per_worker == 0.0
    finally:
        ray.shutdown()
    with pytest.raises(UserError, match="--gpus-per-worker needs a CUDA device"):
        RayBackend(Settings(), workers=1, gpus_per_worker=1)
