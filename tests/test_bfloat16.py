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
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.pipelines.queries import query_scores
from neuron_attribution.scoring import query

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


ADDITIVITY_MAKERS = {"llama": tiny_llama, "gemma2": lambda: tiny_family("gemma2"),
                     "mixtral": lambda: tiny_family("mixtral")}


@pytest.mark.parametrize("family", list(ADDITIVITY_MAKERS))
def test_query_shares_add_up_to_each_score_in_bfloat16(family):
    """docs/method.md §3: one value neuron's shares over every component (and both subkeys) add up to its score.
    A bfloat16 residual is rounded at every addition, so the shares are divided by the sum of the components
    they go to: they add up to the score as exactly in bfloat16 as in float32, for every attention value
    neuron of the prompt (each source position) and every FFN value neuron, one at a time."""
    model = in_bfloat16(ADDITIVITY_MAKERS[family]())
    result = attribute(model, IDS, 11, top_k=10**6)
    trace = trace_token_ids(model, [IDS])[0]
    checked = 0
    values = [([n], []) for n in result.ffn_neurons] + [([], [n]) for n in result.attention_neurons]
    for ffn, attention in values:
        neuron = (ffn or attention)[0]
        scores = query_scores(model, trace, ffn, attention, via="both")
        if scores.skipped:
            continue
        rows = scores.layers.for_ffn + scores.layers.for_attention
        total = sum(row.score for row in rows)
        assert total == pytest.approx(neuron.score, rel=1e-4, abs=1e-6), neuron
        checked += 1
    # Skipped (and reported) are readings whose cosine of h and K' is under bfloat16's resolution, 2⁻⁷: on these
    # tiny random models about one in twenty.
    assert query.near_zero_cosine(torch.bfloat16) == 2 ** -7 and query.near_zero_cosine(torch.float32) == 1e-4
    assert checked >= 0.9 * len(values) and len(values) > 100


def test_recorded_bfloat16_residual_is_not_the_sum_of_its_parts():
    """Why the denominator is the sum of the components: in bfloat16 h·K' and Σu·K' differ (they would make
    the shares add up to h·K'/Σu·K' times the score)."""
    model = in_bfloat16(tiny_llama())
    trace = trace_token_ids(model, [IDS])[0]
    layer = model.shape.n_layers - 1
    parts = query.sum_of_components(trace, layer, 3, own_attention=False)
    recorded = trace.layer_input(layer, 3).double()
    assert not torch.equal(parts, recorded)
    assert torch.allclose(parts, recorded, rtol=0.05, atol=0.05)
