"""Switching neurons off through hooks (METHOD.md §5). The model's weights are never touched: hooks are
installed for the duration of a `with` block and removed on the way out, exceptions included.

* FFN neuron (layer, neuron): its coefficient is zeroed at every position (input of the FFN output projection).
* Attention neuron (layer, head, dim): its column of the heads' concatenated output is zeroed at every
  position (input of the attention output projection); a whole head zeroes its d_h columns.
* Position-specific attention neuron (layer, head, dim, source position): its contribution
  α_{t,head,p}·v_{p,kv(head),dim}·W_O[head, dim] is subtracted from the attention output at every query
  position t. This is exact for grouped-query models too, where zeroing the shared value state itself would
  also silence the other query heads that read the same KV head.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .loading import LoadedModel
from .trace import PaddedBatch


@dataclass(frozen=True)
class Ablation:
    """What to switch off. All indices are 0-based."""

    ffn: Sequence[tuple[int, int]] = ()  # (layer, neuron)
    attention: Sequence[tuple[int, int, int]] = ()  # (layer, head, dim), every source position
    attention_at: Sequence[tuple[int, int, int, int]] = ()  # (layer, head, dim, source position)
    heads: Sequence[tuple[int, int]] = ()  # (layer, head)

    def __len__(self) -> int:
        return len(self.ffn) + len(self.attention) + len(self.attention_at) + len(self.heads)


@dataclass
class _Plan:
    """Ablation grouped by layer, checked against the model's shape."""

    ffn: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    head_columns: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    positioned: dict[int, list[tuple[int, int, int]]] = field(default_factory=lambda: defaultdict(list))


def _plan(model: LoadedModel, ablation: Ablation) -> _Plan:
    s = model.shape
    plan = _Plan()

    def check(condition: bool, what: object) -> None:
        if not condition:
            raise UserError(f"not a neuron of this model: {what!r}")

    for layer, neuron in ablation.ffn:
        check(0 <= layer < s.n_layers and 0 <= neuron < s.d_ffn, ("ffn", layer, neuron))
        plan.ffn[layer].append(neuron)
    for layer, head, dim in ablation.attention:
        check(0 <= layer < s.n_layers and 0 <= head < s.n_heads and 0 <= dim < s.head_dim,
              ("attention", layer, head, dim))
        plan.head_columns[layer].append(head * s.head_dim + dim)
    for layer, head in ablation.heads:
        check(0 <= layer < s.n_layers and 0 <= head < s.n_heads, ("head", layer, head))
        plan.head_columns[layer].extend(range(head * s.head_dim, (head + 1) * s.head_dim))
    for layer, head, dim, position in ablation.attention_at:
        check(0 <= layer < s.n_layers and 0 <= head < s.n_heads and 0 <= dim < s.head_dim and position >= 0,
              ("attention", layer, head, dim, position))
        plan.positioned[layer].append((head, dim, position))
    return plan


def _zero_columns(columns: list[int]):
    index = torch.tensor(sorted(set(columns)))

    def hook(module, args):
        hidden = args[0].clone()
        hidden[..., index.to(hidden.device)] = 0
        return (hidden, *args[1:])
    return hook


class _PositionedAttention:
    """Subtracts chosen (head, dim, source position) contributions from one layer's attention output."""

    def __init__(self, model: LoadedModel, layer: int, neurons: list[tuple[int, int, int]]):
        self.adapter, self.layer, self.neurons = model.adapter, layer, neurons
        self.shape = model.shape
        self.values: torch.Tensor | None = None

    def capture_values(self, module, args, output) -> None:
        self.values = self.adapter.values_from_output(self.layer, output)  # (B, T, H_kv, d_h)

    def subtract(self, module, args, output):
        attention_output, weights = output[0], output[1]
        if weights is None or self.values is None:
            raise RuntimeError("position-specific ablation needs eager attention weights and value states")
        output_weight = self.adapter.layer_weights(self.layer).output_weight  # (H, d_h, d)
        correction = torch.zeros_like(attention_output)
        for head, dim, position in self.neurons:
            if position >= attention_output.shape[1]:
                continue  # the prompt is shorter than this source position: nothing to remove
            direction = output_weight[head, dim].to(attention_output.device)
            value = self.values[:, position, self.shape.kv_head_of(head), dim]  # (B,)
            alpha = weights[:, head, :, position]  # (B, T): every query position's weight on p
            correction += (alpha * value.unsqueeze(-1)).unsqueeze(-1) * direction.to(correction.dtype)
        return (attention_output - correction, *output[1:])


@contextmanager
def ablated(model: LoadedModel, ablation: Ablation) -> Iterator[LoadedModel]:
    """Run the model with the given neurons switched off, inside the `with` block only."""
    plan = _plan(model, ablation)
    adapter = model.adapter
    handles = []
    try:
        for layer, neurons in plan.ffn.items():
            handles.append(adapter.mlp_output_projection(layer).register_forward_pre_hook(_zero_columns(neurons)))
        for layer, columns in plan.head_columns.items():
            handles.append(adapter.attention_output_projection(layer).register_forward_pre_hook(
                _zero_columns(columns)))
        for layer, neurons in plan.positioned.items():
            positioned = _PositionedAttention(model, layer, neurons)
            handles.append(adapter.value_source(layer).register_forward_hook(positioned.capture_values))
            handles.append(adapter.attention(layer).register_forward_hook(positioned.subtract))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def last_logits(model: LoadedModel, batch: Sequence[Sequence[int]], ablation: Ablation | None = None,
                batch_size: int = 16) -> torch.Tensor:
    """(n, V) float32 next-token logits for token-id prompts, with `ablation` switched off if given."""
    chunks = []
    with ablated(model, ablation or Ablation()), torch.inference_mode():
        for start in range(0, len(batch), batch_size):
            padded = PaddedBatch.of(batch[start: start + batch_size])
            chunks.append(padded.last_logits(padded.run(model)))
    return torch.cat(chunks) if chunks else torch.empty(0, model.shape.vocab_size)
