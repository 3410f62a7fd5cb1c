"""The decomposition of docs/method.md §1 holds numerically, checked from the model's own computation."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import trace_token_ids
from neuron_attribution.model.readout import LinearReadout

from .conftest import PROMPTS, tiny_llama_like


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def check_residual_sum(trace) -> None:
    rebuilt = trace.layer_inputs[0] + trace.attention_outputs.sum(0) + trace.ffn_outputs.sum(0)
    assert _relative_error(rebuilt, trace.final_residual) < 1e-5


def check_ffn_neurons(model, trace) -> None:
    for layer in range(trace.n_layers):
        w = model.adapter.layer_weights(layer)
        rebuilt = trace.ffn_coefficients[layer] @ w.ffn_values
        if w.ffn_bias is not None:
            rebuilt = rebuilt + w.ffn_bias
        assert _relative_error(rebuilt, trace.ffn_outputs[layer]) < 1e-5


def check_attention_neurons(model, trace) -> None:
    shape = model.shape
    for layer in range(trace.n_layers):
        w = model.adapter.layer_weights(layer)
        total = torch.zeros(shape.d_model, dtype=torch.float64)
        # One attention neuron at a time: (head j, dim n, source p), coefficient α·v, vector W_O[j, n].
        for head in range(shape.n_heads):
            kv = head // (shape.n_heads // shape.n_kv_heads)
            for position in range(trace.n_tokens):
                alpha = trace.attention_weights[layer, head, position].double()
                for dim in range(shape.head_dim):
                    coefficient = alpha * trace.value_states[layer, position, kv, dim].double()
                    total += coefficient * w.output_weight[head, dim].double()
        if w.output_bias is not None:
            total += w.output_bias.double()
        assert _relative_error(total, trace.attention_outputs[layer, -1]) < 1e-5


def check_readout(model, trace) -> None:
    unembedding, bias = model.adapter.unembedding
    readout = LinearReadout.at(model.adapter.final_norm(), unembedding, bias, trace.final_residual[-1])
    logits = readout.base_logits(trace.final_residual[-1])
    assert float((logits - trace.logits).abs().max()) < 1e-4


def test_decomposition_tiny(tiny_model, token_batches):
    for ids in token_batches:
        trace = trace_token_ids(tiny_model, [ids])[0]
        check_residual_sum(trace)
        check_ffn_neurons(tiny_model, trace)
        check_attention_neurons(tiny_model, trace)
        check_readout(tiny_model, trace)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_decomposition_llama_like_families(family, token_batches):
    model = tiny_llama_like(family)
    if family == "qwen2":
        assert model.adapter.layer_weights(0).value_bias is not None
    for ids in token_batches[:2]:
        trace = trace_token_ids(model, [ids])[0]
        check_residual_sum(trace)
        check_ffn_neurons(model, trace)
        check_attention_neurons(model, trace)
        check_readout(model, trace)


def test_value_states_match_projection(tiny_model, token_batches):
    """The captured value state is W_V·norm(h) + b for the layer's own input norm."""
    trace = trace_token_ids(tiny_model, [token_batches[0]])[0]
    w = tiny_model.adapter.layer_weights(1)
    h = trace.layer_inputs[1]
    norm = w.attention_norm
    if norm.kind == "layernorm":
        x = torch.nn.functional.layer_norm(h, h.shape[-1:], norm.weight, norm.bias, norm.eps)
    else:
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
    values = torch.einsum("gnd,td->tgn", w.value_weight, x)
    if w.value_bias is not None:
        values = values + w.value_bias
    assert torch.allclose(values, trace.value_states[1], atol=1e-5)


def test_padded_batch_equals_one_by_one(tiny_model, token_batches):
    batched = trace_token_ids(tiny_model, token_batches)
    for ids, together in zip(token_batches, batched):
        alone = trace_token_ids(tiny_model, [ids])[0]
        assert torch.equal(alone.token_ids, together.token_ids)
        for field in ("layer_inputs", "attention_outputs", "ffn_coefficients", "ffn_outputs",
                      "attention_weights", "value_states", "final_residual", "logits"):
            # Float32 rounding differs with the batch shape (kernels block differently): compare at the
            # tensor's own scale, not element by element, or entries near zero fail on noise.
            expected = getattr(alone, field)
            scale = max(1.0, float(expected.abs().max()))
            assert torch.allclose(expected, getattr(together, field), atol=1e-5 * scale, rtol=1e-4), field


def test_model_logits_match_plain_forward(tiny_model, token_batches):
    ids = token_batches[1]
    trace = trace_token_ids(tiny_model, [ids])[0]
    with torch.no_grad():
        plain = tiny_model.hf_model(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(trace.logits, plain, atol=1e-5)


@pytest.mark.slow
def test_decomposition_real_model(real_model):
    ids = [real_model.tokenizer(p)["input_ids"] for p in PROMPTS]
    traces = trace_token_ids(real_model, ids)
    for trace in traces:
        check_residual_sum(trace)
        check_ffn_neurons(real_model, trace)
        check_readout(real_model, trace)
    check_attention_neurons(real_model, traces[0])
    alone = trace_token_ids(real_model, [ids[1]])[0]
    assert torch.allclose(alone.logits, traces[1].logits, atol=1e-4)
    assert torch.allclose(alone.ffn_coefficients, traces[1].ffn_coefficients, atol=1e-4)
