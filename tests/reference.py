"""Independent, straightforward float64 computations of the method's definitions, for the tests to compare
against. Written from docs/method.md, sharing no code with the package's scoring."""

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


# --- query neurons and layers (docs/method.md §3), loops over the definitions -----------------------------------

def attention_subkey(model, layer, head, dim, kv_head=None):
    shape = model.shape
    w = model.adapter.layer_weights(layer)
    kv = head // (shape.n_heads // shape.n_kv_heads) if kv_head is None else kv_head
    return w.value_weight[kv, dim].double() * w.attention_norm.weight.double()


def ffn_subkeys(model, layer, neuron):
    w = model.adapter.layer_weights(layer)
    return {name: keys[neuron].double() * w.ffn_norm.weight.double() for name, keys in w.ffn_subkeys.items()}


def query_ffn(model, trace, attention_neurons, ffn_neurons, kv_head_of=None):
    """{part: (L, N)}: part "value" for attention value neurons (layer, head, dim, position, score), and each
    FFN subkey name for FFN value neurons (layer, neuron, score)."""
    shape = model.shape
    parts = {}
    readings = []
    for layer, head, dim, position, score in attention_neurons:
        kv = None if kv_head_of is None else kv_head_of(head)
        readings.append(("value", layer, position, attention_subkey(model, layer, head, dim, kv),
                         trace.layer_inputs[layer, position].double(), score))
    last = trace.n_tokens - 1
    for layer, neuron, score in ffn_neurons:
        middle = trace.layer_inputs[layer, last].double() + trace.attention_outputs[layer, last].double()
        for name, key in ffn_subkeys(model, layer, neuron).items():
            readings.append((name, layer, last, key, middle, score))
    for name, layer, position, key, h, score in readings:
        total = parts.setdefault(name, torch.zeros(shape.n_layers, shape.d_ffn, dtype=torch.float64))
        denominator = float(h @ key)
        for i in range(layer):
            values = model.adapter.layer_weights(i).ffn_values.double()
            for k in range(shape.d_ffn):
                vector = trace.ffn_coefficients[i, position, k].double() * values[k]
                total[i, k] += float(vector @ key) / denominator * score
    return parts


def query_layers(model, trace, attention_neurons, ffn_neurons):
    """{(kind, component, layer): score} with kind "for_attention" / "for_ffn"; components summed over
    subkeys. The denominator is the sum of the components' own inner products (the decomposition)."""
    result = {}
    last = trace.n_tokens - 1
    readings = [("for_attention", layer, position, attention_subkey(model, layer, head, dim), score, False)
                for layer, head, dim, position, score in attention_neurons]
    for layer, neuron, score in ffn_neurons:
        for key in ffn_subkeys(model, layer, neuron).values():
            readings.append(("for_ffn", layer, last, key, score, True))
    for kind, layer, position, key, score, own_attention in readings:
        components = [("embedding", None, trace.layer_inputs[0, position])]
        for i in range(model.shape.n_layers):
            if i < layer or (own_attention and i == layer):
                components.append(("attention", i, trace.attention_outputs[i, position]))
            if i < layer:
                components.append(("ffn", i, trace.ffn_outputs[i, position]))
        dots = [float(u.double() @ key) for _, _, u in components]
        for (component, i, _), dot in zip(components, dots):
            result[(kind, component, i)] = result.get((kind, component, i), 0.0) + dot / sum(dots) * score
    return result
