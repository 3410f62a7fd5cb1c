"""Models that run in bfloat16: scoring reads their weights where they are, converted to float32 a chunk of rows
at a time (model/weights.py), never as a float32 copy of the model. On tiny bfloat16 configs of three families
(Llama with grouped-query attention, GPT-2 with biases and LayerNorm, Phi-2 with its parallel block, partial
rotary embedding and q/k norms), every score equals a float64 loop over the definitions with those very bfloat16 weights and the
activations the bfloat16 forward pass produced — with chunks of 3 rows, so that every chunked path is taken."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import attribute, score_neurons
from neuron_attribution.model import weights
from neuron_attribution.model.loaded import LoadedModel

from .conftest import tiny_family, tiny_gpt2, tiny_llama
from .test_families import _dense_ranking, check_every_neuron_and_head
from .test_query import _check_against_reference

IDS = [5, 17, 3, 99, 42, 7, 250]
ATOL = 2e-5  # float32 arithmetic on bfloat16 values against float64 on the same values


def in_bfloat16(model: LoadedModel) -> LoadedModel:
    return LoadedModel.from_hf(model.hf_model.to(torch.bfloat16), name=f"{model.name}-bf16")


MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "phi": lambda: tiny_family("phi")}


@pytest.fixture(params=list(MAKERS))
def bf16_model(request, monkeypatch) -> LoadedModel:
    model = in_bfloat16(MAKERS[request.param]())
    monkeypatch.setattr(weights, "CHUNK_BYTES", 3 * 4 * model.shape.d_model)  # 3 rows a chunk
    return model


def test_every_score_equals_a_float64_loop_over_the_bfloat16_weights_and_activations(bf16_model):
    model, target = bf16_model, 11
    assert next(model.hf_model.parameters()).dtype == torch.bfloat16
    _, result = check_every_neuron_and_head(model, IDS, target, ATOL)
    assert [(n.layer, n.neuron) for n in result.ffn_neurons] == _dense_ranking(result.dense.ffn, 10)
    chosen = score_neurons(model, IDS, target, [n.index for n in result.ffn_neurons[:4]])
    assert chosen.scores[0] == pytest.approx([n.score for n in result.ffn_neurons[:4]], abs=1e-6)


def test_query_shares_on_bfloat16(bf16_model):
    """Every FFN neuron's query score (both paths). The query layers are left out here: their reference takes
    the residual as exactly the sum of its parts, which a bfloat16 residual, rounded at every addition, is not
    (to about 1e-3); they are compared in float32 in tests/test_query.py and tests/test_families.py."""
    _check_against_reference(bf16_model, IDS, 11, k=5, atol=ATOL, via="both", layers=False)


def test_the_weights_are_read_in_place():
    """No float32 copy of a bfloat16 model's matrices is kept: the stacks hold the parameters themselves."""
    model = in_bfloat16(tiny_llama())
    attribute(model, IDS, 11, top_k=5)
    adapter = model.adapter
    for layer, matrix in enumerate(adapter.ffn_value_stack.layers):
        down = model.hf_model.model.layers[layer].mlp.down_proj.weight
        assert matrix.weight.dtype == torch.bfloat16 and matrix.weight.data_ptr() == down.data_ptr()
    assert adapter.unembedding_matrix.weight.data_ptr() == model.hf_model.lm_head.weight.data_ptr()
    float32 = LoadedModel.from_hf(tiny_llama().hf_model, name="f32")
    attribute(float32, IDS, 11, top_k=5)
    assert all(m.in_place for m in float32.adapter.ffn_value_stack.layers)  # read whole, as they are
