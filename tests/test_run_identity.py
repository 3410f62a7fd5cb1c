"""A run's identity holds its model's weights and the versions that change the numbers (#33 item 3): re-saved
weights at the same `--model DIR`, or another transformers, never resume into the same tables."""

from __future__ import annotations

import json

import pytest
import torch

from neuron_attribution import UserError
from neuron_attribution.model import fingerprint
from neuron_attribution.pipelines.run import RunArguments, run_settings
from neuron_attribution.pipelines.run_store import claim

from .conftest import tiny_llama


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURON_ATTRIBUTION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_files_are_identified_by_their_content_and_the_hash_is_remembered(tmp_path, cache, monkeypatch):
    model = tiny_llama()
    directory = tmp_path / "model"
    model.hf_model.save_pretrained(directory)
    files = fingerprint.weight_files_in(directory)
    assert [p.name for p in files] == ["config.json", "model.safetensors"]
    first = fingerprint.weights_fingerprint(model.hf_model, files)
    assert first.startswith("files:")
    remembered = json.loads((cache / "content-hashes.json").read_text())
    assert {str(p) for p in files} <= set(remembered)
    calls = []
    monkeypatch.setattr(fingerprint, "content_sha256", lambda p: calls.append(p) or remembered[str(p)]["sha256"])
    assert fingerprint.weights_fingerprint(model.hf_model, files) == first
    monkeypatch.undo()
    with torch.no_grad():
        model.hf_model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    model.hf_model.save_pretrained(directory)  # re-saved weights at the same path
    assert fingerprint.weights_fingerprint(model.hf_model, fingerprint.weight_files_in(directory)) != first


def test_models_in_memory_are_identified_by_their_parameters():
    a, b = tiny_llama(), tiny_llama()
    assert a.weights_fingerprint() == b.weights_fingerprint()
    assert a.weights_fingerprint().startswith("parameters:")
    with torch.no_grad():
        b.hf_model.model.layers[1].self_attn.o_proj.weight.mul_(1.01)
    assert a.weights_fingerprint() != b.weights_fingerprint()


def test_a_run_refuses_other_weights_or_versions_naming_what_differs(tmp_path, monkeypatch):
    import transformers

    model = tiny_llama()
    settings = run_settings(model, 5)
    arguments = RunArguments("sample")
    directory = tmp_path / "run"
    (directory / "parts").mkdir(parents=True)
    claim(directory, arguments.identity(model, settings, 4))
    assert claim(directory, arguments.identity(model, settings, 4))["identity"]["weights"].startswith("parameters:")
    other = tiny_llama()
    with torch.no_grad():
        other.hf_model.lm_head.weight.mul_(2.0)
    with pytest.raises(UserError, match=r"holds a different run \(weights: 'parameters:"):
        claim(directory, arguments.identity(other, settings, 4))
    monkeypatch.setattr(transformers, "__version__", "9.9.9")
    with pytest.raises(UserError, match=r"transformers: '[^']+' there, '9.9.9' now"):
        claim(directory, arguments.identity(model, settings, 4))
