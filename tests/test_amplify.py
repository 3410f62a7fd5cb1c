"""Amplifying neurons (`Ablation.scale`, docs/method.md §5): a neuron's contribution multiplied by k, negative k
included, checked against the same change made in a copy of the weights (the FFN output projection's column,
the attention output projection's columns) and, for a neuron at one source position, against its contribution
computed from the trace."""

from __future__ import annotations

import copy

import pytest
import torch

from neuron_attribution import UserError
from neuron_attribution.model.interventions import Ablation, ablated, last_logits
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.neurons import AttentionIndex, FfnIndex, HeadIndex

from . import reference as ref
from .conftest import tiny_llama

IDS = [5, 17, 3, 99, 42, 7]


def _with_columns_scaled(model, module_of, columns, k):
    """A copy of the model whose given input columns of `module_of(copy's adapter)` are multiplied by k."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        module_of(twin.adapter).weight[:, columns] *= k
    return twin


@pytest.mark.parametrize("k", [2.5, -1.0, 0.0])
def test_scaling_ffn_and_attention_neurons_and_heads_equals_scaling_their_weights(k):
    model = tiny_llama()
    s = model.shape
    cases = [
        (FfnIndex(1, 7), lambda a: a.mlp_output_projection(1), [7]),
        (AttentionIndex(0, 2, 3), lambda a: a.attention_output_projection(0), [s.head_column(2, 3)]),
        (HeadIndex(1, 1), lambda a: a.attention_output_projection(1),
         list(range(s.head_column(1, 0), s.head_column(1, 0) + s.head_dim))),
    ]
    for neuron, module_of, columns in cases:
        scaled = last_logits(model, [IDS], Ablation.of([neuron], scale=k))
        expected = last_logits(_with_columns_scaled(model, module_of, columns, k), [IDS])
        assert torch.allclose(scaled, expected, atol=1e-5), neuron


@pytest.mark.parametrize("k", [3.0, -2.0])
def test_scaling_an_attention_neuron_at_one_source_position(k):
    model = tiny_llama()
    layer, head, dim, position = 1, 3, 5, 2
    trace = trace_token_ids(model, [IDS])[0]
    contribution = ref.attention_neuron_vector(model, trace, layer, head, dim, position)  # at the last position

    def attention_output(ablation: Ablation) -> torch.Tensor:
        """The layer's attention output at the last position, read after the intervention's own hooks."""
        outputs = {}
        with ablated(model, ablation), torch.inference_mode():
            handle = model.adapter.attention(layer).register_forward_hook(
                lambda module, args, output: outputs.update(attention=output[0][0, -1].double()))
            try:
                model.hf_model(torch.tensor([IDS]))
            finally:
                handle.remove()
        return outputs["attention"]

    plain = attention_output(Ablation())
    scaled = attention_output(Ablation(attention_at=[(layer, head, dim, position)], scale=k))
    assert torch.allclose(scaled - plain, (k - 1) * contribution, atol=1e-5)
    unchanged = last_logits(model, [IDS], Ablation(attention_at=[(layer, head, dim, position)], scale=1.0))
    assert torch.equal(unchanged, last_logits(model, [IDS]))


def test_scale_zero_is_switching_off_and_bad_scales_are_refused():
    model = tiny_llama()
    neurons = [FfnIndex(0, 3), AttentionIndex(1, 0, 2, 4)]
    off = last_logits(model, [IDS], Ablation.of(neurons))
    assert torch.equal(off, last_logits(model, [IDS], Ablation.of(neurons, scale=0)))
    with ablated(model, Ablation.of(neurons, scale=4.0)):
        pass
    assert torch.equal(last_logits(model, [IDS]), last_logits(model, [IDS], Ablation()))  # hooks gone
    for bad in (float("nan"), float("inf"), "2", True):
        with pytest.raises(UserError, match="scale must be a finite number"):
            Ablation.of(neurons, scale=bad)
