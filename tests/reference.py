"""Independent, straightforward float64 computations of the method's definitions, for the tests to compare
against. Written from docs/method.md, sharing no code with the package's scoring."""

from __future__ import annotations

import torch

from operator import attrgetter

from .tiny_families import block_of


def model_type(model) -> str:
    return model.hf_model.config.model_type


_BLOCKS: dict[int, tuple] = {}  # id(config) -> (config, its block facts); the config is held so its id stays its own


def block(model):
    """The family's block facts (tests/tiny_families.py), read off its Hugging Face config once per config (the
    loops ask for every neuron)."""
    config = model.hf_model.config
    kept = _BLOCKS.get(id(config))
    if kept is None or kept[0] is not config:
        kept = _BLOCKS[id(config)] = (config, block_of(config.model_type, config))
    return kept[1]


def is_parallel(model) -> bool:
    return bool(block(model).parallel(model.hf_model.config))


def has_post_norms(model) -> bool:
    return block(model).post_norms is not None


def _layer(model, layer):
    return attrgetter(block(model).layers)(model.hf_model)[layer]


def _module(model, layer, name):
    return None if name is None else attrgetter(name)(_layer(model, layer))


def gain(model, module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if weight is None:  # a norm without parameters (OLMo)
        return torch.ones(model.shape.d_model, dtype=torch.float64)
    return weight.detach().double() + block(model).gain_offset


def _eps(module) -> float:
    for name in ("eps", "variance_epsilon", "variance_eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    if not list(module.parameters()):
        return 1e-5  # OlmoLayerNorm: F.layer_norm(..., eps=1e-5) in its forward
    raise AttributeError(f"{type(module).__name__} names no epsilon")


def post_norm_factor(model, layer, kind, raw_output) -> torch.Tensor | None:
    """What the layer's "attention" or "ffn" output o is multiplied by before it is added: γ / rms(o) for a
    post-norm, the residual multiplier (Granite), or None for neither."""
    multiplier = float(block(model).residual_multiplier(model.hf_model.config))
    if not has_post_norms(model):
        return None if multiplier == 1.0 else torch.tensor(multiplier, dtype=torch.float64)
    module = _module(model, layer, block(model).post_norms[0 if kind == "attention" else 1])
    raw = raw_output.double()
    return gain(model, module) / (raw.pow(2).mean() + _eps(module)).sqrt() * multiplier


def ffn_values(model, layer) -> torch.Tensor:
    """(N, d) float64 value vectors of the layer's FFN neurons; in a mixture of experts read from the Hugging Face
    parameters: every expert's columns of down_proj[e], expert by expert, then the shared expert's."""
    facts = block(model)
    if facts.experts is None:
        return model.adapter.layer_weights(layer).ffn_values.double()
    experts = _module(model, layer, facts.experts)
    rows = [experts.down_proj[e].detach().double().T for e in range(experts.down_proj.shape[0])]
    if facts.shared_expert is not None:
        rows.append(_module(model, layer, facts.shared_expert).down_proj.weight.detach().double().T)
    return torch.cat(rows)


def ffn_value(model, layer, row) -> torch.Tensor:
    """(d,) float64 value vector of one FFN neuron (a row of `ffn_values`, without converting the others)."""
    if block(model).experts is None:
        return model.adapter.layer_weights(layer).ffn_values[row].double()
    return ffn_values(model, layer)[row]


def ffn_keys(model, layer) -> dict[str, torch.Tensor]:
    """{"gate", "up"} (N, d) float64 rows in the FFN's flat order (or the dense FFN's own subkeys)."""
    facts = block(model)
    if facts.experts is None:
        return {name: keys.double() for name, keys in model.adapter.layer_weights(layer).ffn_subkeys.items()}
    experts = _module(model, layer, facts.experts)
    halves = [experts.gate_up_proj[e].detach().double().chunk(2, dim=0) for e in range(experts.gate_up_proj.shape[0])]
    gate, up = [h[0] for h in halves], [h[1] for h in halves]
    if facts.shared_expert is not None:
        shared = _module(model, layer, facts.shared_expert)
        gate.append(shared.gate_proj.weight.detach().double())
        up.append(shared.up_proj.weight.detach().double())
    return {"gate": torch.cat(gate), "up": torch.cat(up)}


def expert_coefficients(model, trace, layer, position) -> torch.Tensor:
    """(N,) float64 coefficients of a mixture's FFN at one position from the definition: for each expert the
    router chose (its own module's choice), g_e · SiLU(gate·x̂) · (up·x̂); zero for the others; the shared expert's
    SiLU(gate·x̂)·(up·x̂) times σ(shared gate·x̂)."""
    facts = block(model)
    x = _input_norm(model, layer, ffn_base(model, trace, layer, position))
    with torch.no_grad():
        _, weights, chosen = _module(model, layer, facts.router)(x.float().unsqueeze(0))
    keys = ffn_keys(model, layer)
    m = torch.nn.functional.silu(keys["gate"] @ x) * (keys["up"] @ x)
    width = _module(model, layer, facts.experts).down_proj.shape[2]
    routed = _module(model, layer, facts.experts).down_proj.shape[0] * width
    factor = torch.zeros(len(m), dtype=torch.float64)
    for weight, expert in zip(weights[0].tolist(), chosen[0].tolist()):
        factor[expert * width: (expert + 1) * width] = weight
    if facts.shared_gate is not None:
        gate = _module(model, layer, facts.shared_gate).weight.detach().double()[0]
        factor[routed:] = torch.sigmoid(gate @ x)
    elif facts.shared_expert is not None:
        factor[routed:] = 1.0
    return m * factor


def raw_ffn_output(model, trace, layer, position) -> torch.Tensor:
    out = trace.ffn_coefficients[layer, position].double() @ ffn_values(model, layer)
    bias = model.adapter.layer_weights(layer).ffn_bias
    return out if bias is None else out + bias.double()


def raw_attention_output(model, trace, layer) -> torch.Tensor:
    """The attention output at the last position before any post-norm: the sum over all its neurons."""
    shape = model.shape
    w = model.adapter.layer_weights(layer)
    kv = torch.arange(shape.n_heads) // (shape.n_heads // shape.n_kv_heads)
    values = trace.value_states[layer][:, kv].double()  # (T, H, d_h)
    weighted = trace.attention_weights[layer].double().T.unsqueeze(-1) * values  # (T, H, d_h)
    out = torch.einsum("thn,hnd->d", weighted, w.output_weight.double())
    return out if w.output_bias is None else out + w.output_bias.double()


def ffn_vector(model, trace, layer, neuron, position) -> torch.Tensor:
    vector = trace.ffn_coefficients[layer, position, neuron].double() * ffn_value(model, layer, neuron)
    raw = raw_ffn_output(model, trace, layer, position) if has_post_norms(model) else None  # read by a post-norm only
    factor = post_norm_factor(model, layer, "ffn", raw)
    return vector if factor is None else vector * factor


def ffn_base(model, trace, layer, position=-1) -> torch.Tensor:
    base = trace.layer_inputs[layer, position].double()
    return base if is_parallel(model) else base + trace.attention_outputs[layer, position].double()


_UNEMBEDDING64: list[tuple[torch.Tensor, torch.Tensor]] = []  # (float32 source, float64 copy), the last one


def _unembedding64(model) -> torch.Tensor:
    """The output matrix in float64, made once per model (vocabulary-sized: 1.3 GB for Gemma's 262k tokens).
    The adapter hands out a new tensor object at each call, so the copy is keyed by the memory the source reads;
    the source is kept alongside, so that memory cannot be freed and reused by another model's matrix."""
    source = model.adapter.unembedding[0]
    if not _UNEMBEDDING64 or not _same_memory(_UNEMBEDDING64[0][0], source):
        _UNEMBEDDING64[:] = []  # the old copy goes before the new one is made: one vocabulary-sized copy at a time
        _UNEMBEDDING64[:] = [(source, source.double())]
    return _UNEMBEDDING64[0][1]


def _same_memory(kept: torch.Tensor, source: torch.Tensor) -> bool:
    return (kept.data_ptr(), kept.shape, kept.stride(), kept.dtype, kept.device) == \
        (source.data_ptr(), source.shape, source.stride(), source.dtype, source.device) and \
        kept._version == source._version


_READOUT: list[tuple] = []  # (model, trace, what it was read from, its readout): the last pair, held so ids stay


def _readout(model, trace) -> dict:
    """What final_logits needs beside the residual, read once per model and trace (the loops call it for every
    neuron): the float64 unembedding and bias, the final norm's gain, bias and its scale frozen at the true final
    residual, the logit multiplier and the soft cap. Read again when the weights or the trace change in place."""
    head = model.hf_model.get_output_embeddings()
    final = attrgetter(block(model).final_norm)(model.hf_model)
    read_from = tuple((t.data_ptr(), None if t.is_inference() else t._version)  # inference tensors keep no version
                      for t in (*head.parameters(), *final.parameters(), trace.final_residual)) + \
        (getattr(model.hf_model.config, "final_logit_softcapping", None),)
    if _READOUT and _READOUT[0][0] is model and _READOUT[0][1] is trace and _READOUT[0][2] == read_from:
        return _READOUT[0][3]
    _, bias = model.adapter.unembedding
    h = trace.final_residual[-1].double()
    layernorm = model.adapter.final_norm().kind == "layernorm"
    centred = h - h.mean() if layernorm else h
    readout = {"unembedding": _unembedding64(model), "bias": None if bias is None else bias.double(),
               "gamma": gain(model, final), "layernorm": layernorm,
               "scale": (centred.pow(2).mean() + _eps(final)).sqrt(),
               "norm_bias": None if getattr(final, "bias", None) is None else final.bias.detach().double(),
               "multiplier": block(model).logit_multiplier(model.hf_model.config),
               "cap": getattr(model.hf_model.config, "final_logit_softcapping", None)}
    _READOUT[:] = [(model, trace, read_from, readout)]
    return readout


def final_logits(model, trace, residual: torch.Tensor, reference: bool = False, capped: bool = True) -> torch.Tensor:
    """Logits of a residual vector with the final norm's scale frozen at the true final residual (before the
    final soft-capping with capped=False)."""
    r = _readout(model, trace)
    y = residual.double()
    if r["layernorm"]:
        normed = (y - y.mean()) / r["scale"] * r["gamma"]
        if not reference and r["norm_bias"] is not None:
            normed = normed + r["norm_bias"]
    else:
        normed = y / r["scale"] * r["gamma"]
    logits = r["unembedding"] @ normed
    logits = logits if r["bias"] is None else logits + r["bias"]
    logits = logits * r["multiplier"]
    cap = r["cap"]
    return logits if cap is None or not capped else cap * torch.tanh(logits / cap)


def log_prob(model, trace, residual, target, reference=False) -> float:
    return float(torch.log_softmax(final_logits(model, trace, residual, reference), -1)[target])


def increase(model, trace, base, vector, target, reference=False) -> float:
    """Imp(v | x) = log p(w | x + v) − log p(w | x)."""
    base = base.double()
    return log_prob(model, trace, base + vector.double(), target, reference) - log_prob(model, trace, base, target,
                                                                                       reference)


def ffn_neuron_score(model, trace, layer, neuron, target, reference=False) -> float:
    vector = ffn_vector(model, trace, layer, neuron, trace.n_tokens - 1)
    return increase(model, trace, ffn_base(model, trace, layer), vector, target, reference)


def attention_neuron_vector(model, trace, layer, head, dim, position) -> torch.Tensor:
    shape = model.shape
    w = model.adapter.layer_weights(layer)
    kv = head // (shape.n_heads // shape.n_kv_heads)
    coefficient = trace.attention_weights[layer, head, position].double() * \
        trace.value_states[layer, position, kv, dim].double()
    vector = coefficient * w.output_weight[head, dim].double()
    raw = raw_attention_output(model, trace, layer) if has_post_norms(model) else None  # read by a post-norm only
    factor = post_norm_factor(model, layer, "attention", raw)
    return vector if factor is None else vector * factor


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
        ffn.append(increase(model, trace, ffn_base(model, trace, layer), trace.ffn_outputs[layer, -1], target))
    return attention, ffn


# --- query neurons and layers (docs/method.md §3), loops over the definitions -----------------------------------

def _input_norm_module(model, layer, kind):
    facts = block(model)
    return _module(model, layer, facts.attention_norm if kind == "attention" else facts.ffn_norm)


def _input_gain(model, layer, kind) -> torch.Tensor:
    """γ of the norm in front of the layer's attention or FFN (ones where there is none: OLMo 2)."""
    module = _input_norm_module(model, layer, kind)
    return torch.ones(model.shape.d_model, dtype=torch.float64) if module is None else gain(model, module)


def attention_subkey(model, layer, head, dim, kv_head=None):
    shape = model.shape
    w = model.adapter.layer_weights(layer)
    kv = head // (shape.n_heads // shape.n_kv_heads) if kv_head is None else kv_head
    return w.value_weight[kv, dim].double() * _input_gain(model, layer, "attention")


def _neuron_keys(model, layer, neuron) -> dict[str, torch.Tensor]:
    """One FFN neuron's rows of its input projections, float64 (without converting the other rows)."""
    if block(model).experts is None:
        return {name: rows[neuron].double() for name, rows in model.adapter.layer_weights(layer).ffn_subkeys.items()}
    return {name: rows[neuron] for name, rows in ffn_keys(model, layer).items()}


def ffn_subkeys(model, layer, neuron):
    return {name: key * _input_gain(model, layer, "ffn") for name, key in _neuron_keys(model, layer, neuron).items()}


def _input_norm(model, layer, vector) -> torch.Tensor:
    """The FFN's input norm applied to a residual vector, with its own scale and bias (none for OLMo 2)."""
    v = vector.double()
    module = _input_norm_module(model, layer, "ffn")
    if module is None:
        return v
    if model.shape.norm_kind == "layernorm":
        v = v - v.mean()
    normed = v / (v.pow(2).mean() + _eps(module)).sqrt() * gain(model, module)
    bias = getattr(module, "bias", None)
    return normed if bias is None else normed + bias.detach().double()


def gate_activation(model, g: float) -> float:
    config = model.hf_model.config
    name = block(model).gate_activation or getattr(config, "hidden_activation", None) or config.hidden_act
    x = torch.tensor(g, dtype=torch.float64)
    if name == "silu":
        return float(x * torch.sigmoid(x))
    if name in ("gelu_pytorch_tanh", "gelu_tanh"):
        return float(torch.nn.functional.gelu(x, approximate="tanh"))
    raise ValueError(name)


def swiglu_shares(model, trace, layer, neuron) -> dict[str, float]:
    """How a gated FFN value neuron's score is split between its gate and up subkeys: by elasticity, e_up = 1
    and e_gate = g·act'(g)/act(g) (a central difference here), each share e / (e_gate + e_up)."""
    keys = _neuron_keys(model, layer, neuron)
    if "gate" not in keys:
        return {name: 1.0 for name in keys}
    middle = ffn_base(model, trace, layer, trace.n_tokens - 1)
    g = float(keys["gate"] @ _input_norm(model, layer, middle))
    h = 1e-6
    slope = (gate_activation(model, g + h) - gate_activation(model, g - h)) / (2 * h)
    elasticity = g * slope / gate_activation(model, g)
    return {"gate": elasticity / (1 + elasticity), "up": 1 / (1 + elasticity)}


def query_ffn(model, trace, attention_neurons, ffn_neurons, kv_head_of=None):
    """{part: (L, N)}: part "value" for attention value neurons (layer, head, dim, position, score), and each
    FFN subkey name for FFN value neurons (layer, neuron, score)."""
    shape = model.shape
    parts = {}
    readings = []
    for layer, head, dim, position, score in attention_neurons:
        kv = None if kv_head_of is None else kv_head_of(head)
        readings.append(("value", layer, position, attention_subkey(model, layer, head, dim, kv),
                         residual_components_sum(trace, layer, position, False), score))
    last = trace.n_tokens - 1
    for layer, neuron, score in ffn_neurons:
        middle = residual_components_sum(trace, layer, last, not is_parallel(model))
        shares = swiglu_shares(model, trace, layer, neuron)
        for name, key in ffn_subkeys(model, layer, neuron).items():
            readings.append((name, layer, last, key, middle, score * shares[name]))
    for name, layer, position, key, h, score in readings:
        total = parts.setdefault(name, torch.zeros(shape.n_layers, shape.d_ffn, dtype=torch.float64))
        denominator = float(h @ key)
        for i in range(layer):
            for k in range(shape.d_ffn):
                total[i, k] += float(ffn_vector(model, trace, i, k, position) @ key) / denominator * score
    return parts


def residual_components_sum(trace, layer, position, own_attention):
    """The residual a sublayer of `layer` reads at `position` as the sum of its components, in float64 (a
    bfloat16 residual, rounded at every addition, is not that sum): the denominator of the query shares."""
    total = trace.layer_inputs[0, position].double()
    for i in range(layer):
        total = total + trace.attention_outputs[i, position].double() + trace.ffn_outputs[i, position].double()
    if own_attention:
        total = total + trace.attention_outputs[layer, position].double()
    return total


def query_layers(model, trace, attention_neurons, ffn_neurons):
    """{(kind, component, layer): score} with kind "for_attention" / "for_ffn"; components summed over
    subkeys. The denominator is the sum of the components' own inner products (the decomposition)."""
    result = {}
    last = trace.n_tokens - 1
    readings = [("for_attention", layer, position, attention_subkey(model, layer, head, dim), score, False)
                for layer, head, dim, position, score in attention_neurons]
    for layer, neuron, score in ffn_neurons:
        shares = swiglu_shares(model, trace, layer, neuron)
        for name, key in ffn_subkeys(model, layer, neuron).items():
            readings.append(("for_ffn", layer, last, key, score * shares[name], not is_parallel(model)))
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
