"""Scores are computed where the model's output head is (docs/method.md §2, "on the model's device"). Only a CPU
is available here: these tests run the device-following code with the CPU as the device, and check that every
tensor the scoring reads sits on the device the adapter names, and that pipeline steps run with it as default."""

from __future__ import annotations

import torch

from neuron_attribution import attribute
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.scoring.buffers import default_device, scratch
from neuron_attribution.scoring.context import on_scoring_device, value_context

from .conftest import tiny_family, tiny_llama


def _tensors(obj):
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value


def test_trace_and_weights_live_on_the_scoring_device():
    for model in (tiny_llama(), tiny_family("gemma3_text")):
        device = model.adapter.device
        assert device == model.hf_model.lm_head.weight.device
        trace = trace_token_ids(model, [[3, 4, 5, 6]])[0]
        assert {t.device for t in _tensors(trace) if t is not trace.token_ids} == {device}
        weights = model.adapter.layer_weights(1)
        assert {t.device for t in _tensors(weights)} == {device}
        assert model.adapter.all_ffn_values.device == device and model.adapter.unembedding[0].device == device
        ctx = value_context(model, trace, 7)
        assert ctx.base_log_probs.device == device and ctx.normalised_states.device == device


def test_pipeline_steps_run_with_the_scoring_device_as_default():
    model = tiny_llama()
    seen = []

    @on_scoring_device
    def step(m, x):
        seen.append((default_device(), scratch.buffer("probe", 2, 3).device))
        return x + 1

    assert step(model, 1) == 2
    assert seen == [(model.adapter.device, model.adapter.device)]
    assert default_device() == torch.device("cpu")  # restored afterwards
    result = attribute(model, [3, 4, 5, 6], 7, top_k=5)
    assert len(result.ffn_neurons) == 5
