"""Independent, straightforward float64 computations of the method's definitions, for the tests to compare
against. Written from METHOD.md, sharing no code with the package's scoring."""

from __future__ import annotations

import torch


def final_logits(model, trace, residual: torch.Tensor, reference: bool = False) -> torch.Tensor:
    """Logits of a residual vector with the final norm's scale frozen at the true final residual."""
    norm = model.adapter.final_norm()
    unembedding, bias = model.adapter.unembedding
    h = trace.final_residual[-1].double()
    y = residual.double()
    gamma = norm.weight.double()
    if norm.kind == "layernorm":
        scale = ((h - h.mean()).pow(2).mean() + norm.eps).sqrt()
        normed = (y - y.mean()) / scale * gamma
        if not reference:
            normed = normed + norm.bias.double()
    else:
        scale = (h.pow(2).mean() + norm.eps).sqrt()
        normed = y / scale * gamma
    logits = unembedding.double() @ normed
    return logits if bias is None else logits + bias.double()


def log_prob(model, trace, residual, target, reference=False) -> float:
    return float(torch.log_softmax(final_logits(model, trace, residual, reference), -1)[target])


def increase(model, trace, base, vector, target, reference=False) -> float:
    """Imp(v | x) = log p(w | x + v) − log p(w | x)."""
    base = base.double()
    return log_prob(model, trace, base + vector.double(), target, reference) - log_prob(model, trace, base, target,
                                                                                       reference)


def ffn_neuron_score(model, trace, layer, neuron, target, reference=False) -> float:
    w = model.adapter.layer_weights(layer)
    base = trace.layer_inputs[layer, -1].double() + trace.attention_outputs[layer, -1].double()
    vector = trace.ffn_coefficients[layer, -1, neuron].double() * w.ffn_values[neuron].double()
    return increase(model, trace, base, vector, target, reference)


def attention_neuron_vector(model, trace, layer, head, dim, position) -> torch.Tensor:
    shape = model.shape
    w = model.adapter.layer_weights(layer)
    kv = head // (shape.n_heads // shape.n_kv_heads)
    coefficient = trace.attention_weights[layer, head, position].double() * \
        trace.value_states[layer, position, kv, dim].double()
    return coefficient * w.output_weight[head, dim].double()


def attention_neuron_score(model, trace, layer, head, dim, position, target, reference=False) -> float:
    vector = attention_neuron_vector(model, trace, layer, head, dim, position)
    return increase(model, trace, trace.layer_inputs[layer, -1], vector, target, reference)


def head_score(model, trace, layer, head, target) -> float:
    shape = model.shape
    vector = sum(attention_neuron_vector(model, trace, layer, head, n, p)
                 for n in range(shape.head_dim) for p in range(trace.n_tokens))
    return increase(model, trace, trace.layer_inputs[layer, -1], vector, target)


def layer_scores(model, trace, target) -> tuple[list[float], list[float]]:
    attention, ffn = [], []
    for layer in range(model.shape.n_layers):
        before = trace.layer_inputs[layer, -1].double()
        attention.append(increase(model, trace, before, trace.attention_outputs[layer, -1], target))
        middle = before + trace.attention_outputs[layer, -1].double()
        ffn.append(increase(model, trace, middle, trace.ffn_outputs[layer, -1], target))
    return attention, ffn
