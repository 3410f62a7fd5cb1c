"""Hooks never outlive a failure, and one model is safe to use from several threads (docs/design.md)."""

from __future__ import annotations

import threading

import pytest
import torch

from neuron_attribution import Ablation, AttentionIndex, attribute
from neuron_attribution.model.interventions import ablated, last_logits
from neuron_attribution.model.trace import trace_token_ids

from .conftest import tiny_family, tiny_llama

IDS = [5, 17, 3, 99, 42, 7, 250]


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.hf_model.modules())


class _Injected(RuntimeError):
    pass


def _failing_at(method, layer_to_fail: int):
    def wrapper(layer, *args, **kwargs):
        if layer == layer_to_fail:
            raise _Injected(f"injected failure at layer {layer}")
        return method(layer, *args, **kwargs)
    return wrapper


def test_a_trace_whose_hooks_fail_to_install_leaves_none(monkeypatch):
    model = tiny_llama()
    before = _hooks(model)
    last = model.shape.n_layers - 1
    monkeypatch.setattr(model.adapter, "mlp_output_projection", _failing_at(model.adapter.mlp_output_projection, last))
    with pytest.raises(_Injected):
        trace_token_ids(model, [IDS])
    assert _hooks(model) == before == 0
    monkeypatch.undo()
    assert trace_token_ids(model, [IDS])[0].n_tokens == len(IDS)  # and the model still traces


@pytest.mark.parametrize("family, failing", [("llama", "attention_output_projection"),
                                             ("mixtral", "attention_output_projection"),
                                             ("mixtral", "mlp_output_projection")])
def test_an_intervention_whose_hooks_fail_to_install_leaves_none(monkeypatch, family, failing):
    """Some hooks are in place when installing another fails — the FFN hooks of layer 0 when the last layer's
    attention hook fails; in a mixture, the experts module's scaling of layer 0 when the same layer's output
    projection fails right after it: all of them are removed, and no intervention stays registered."""
    model = tiny_llama() if family == "llama" else tiny_family("mixtral")
    last = model.shape.n_layers - 1
    neurons = [model.shape.ffn_index(0, 1), model.shape.ffn_index(0, model.shape.d_ffn - 1), AttentionIndex(last, 1, 2)]
    baseline = last_logits(model, [IDS])
    adapter = model.adapter
    layer = last if failing == "attention_output_projection" else 0
    monkeypatch.setattr(adapter, failing, _failing_at(getattr(adapter, failing), layer))
    with pytest.raises(_Injected):
        with ablated(model, Ablation.of(neurons)):
            pass
    monkeypatch.undo()
    assert _hooks(model) == 0 and model.expert_scalings == {}
    assert torch.equal(last_logits(model, [IDS]), baseline)


def test_threads_sharing_a_model_never_see_each_others_interventions():
    """A notebook attributing while `serve` intervenes in the background: the intervention's hooks sit on the shared
    modules, so every use of the model takes its lock; the plain logits never change, the ablated ones always do."""
    model = tiny_llama()
    plain = last_logits(model, [IDS])
    ablation = Ablation.of([model.shape.ffn_index(1, int(trace_token_ids(model, [IDS])[0].ffn_coefficients[1, -1]
                                                         .abs().argmax()))])
    switched_off = last_logits(model, [IDS], ablation)
    assert not torch.equal(plain, switched_off)
    results: dict[str, list[bool]] = {"plain": [], "ablated": [], "scores": []}
    expected_score = attribute(model, IDS, 11, top_k=3).ffn_neurons[0].score

    def intervening():
        for _ in range(30):
            results["ablated"].append(torch.equal(last_logits(model, [IDS], ablation), switched_off))

    def reading():
        for _ in range(30):
            results["plain"].append(torch.equal(last_logits(model, [IDS]), plain))
        for _ in range(5):
            results["scores"].append(attribute(model, IDS, 11, top_k=3).ffn_neurons[0].score == expected_score)

    threads = [threading.Thread(target=intervening), threading.Thread(target=reading)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(results["plain"]) and all(results["ablated"]) and all(results["scores"])
    assert len(results["plain"]) == len(results["ablated"]) == 30 and len(results["scores"]) == 5
    assert _hooks(model) == 0
