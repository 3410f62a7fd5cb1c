"""One identity for every neuron: index types, the model's sizes, and the flat layouts scoring works in.

Scoring treats a kind of neuron as one flat vector of scores (all FFN neurons of all layers, all attention
neurons of all layers and source positions), so a top-k is one search over every layer at once. The flat
layouts are written here once; everything else converts through `ModelShape`:

* FFN neuron (layer, neuron): flat = layer·N + neuron, over (L, N);
* attention neuron (layer, head, dim, position): flat over (L, H, d_h, T), T the prompt's length;
* head (layer, head): flat = layer·H + head, over (L, H);
* an attention neuron's column in the heads' concatenated output (the input of W_O): head·d_h + dim.

The index types are named tuples, so they unpack, hash, sort and compare like plain tuples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Union

from .errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

NormKind = Literal["layernorm", "rmsnorm", "identity"]  # identity: a sublayer that reads the raw residual
FfnKind = Literal["gelu", "swiglu", "relu", "relu2"]  # one key per neuron, except SwiGLU's gate and up


class FfnIndex(NamedTuple):
    layer: int
    neuron: int

    def __str__(self) -> str:
        return f"{self.layer}_{self.neuron}"


class AttentionIndex(NamedTuple):
    """An attention neuron. `position` is the source position it reads; None means every position (a
    weight-level neuron, as switched off by zeroing its column of W_O)."""

    layer: int
    head: int
    dim: int
    position: int | None = None

    def __str__(self) -> str:
        where = "" if self.position is None else f"@{self.position}"
        return f"{self.layer}_{self.head}_{self.dim}{where}"


class HeadIndex(NamedTuple):
    layer: int
    head: int

    def __str__(self) -> str:
        return f"{self.layer}.{self.head}"


NeuronIndex = Union[FfnIndex, AttentionIndex, HeadIndex]

_NEURON_TEXT = re.compile(r"^(\d+)_(\d+)$|^(\d+)_(\d+)_(\d+)(?:@(\d+))?$|^(\d+)\.(\d+)$")


def parse_neuron(text: str) -> NeuronIndex:
    """"24_177" (FFN), "23_4_38@3" or "23_4_38" (attention, at a source position or every one), "21.19" (head)."""
    match = _NEURON_TEXT.match(text.strip())
    if not match:
        raise UserError(f"not a neuron: {text!r}; write layer_neuron (FFN), layer_head_dim@position "
                        "(attention) or layer.head (head)")
    g = match.groups()
    if g[0] is not None:
        return FfnIndex(int(g[0]), int(g[1]))
    if g[2] is not None:
        return AttentionIndex(int(g[2]), int(g[3]), int(g[4]), None if g[5] is None else int(g[5]))
    return HeadIndex(int(g[6]), int(g[7]))


@dataclass(frozen=True)
class ModelShape:
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_model: int
    d_ffn: int
    vocab_size: int
    max_positions: int | None
    ffn_kind: FfnKind
    norm_kind: NormKind
    # The block's topology (docs/method.md §1): attention and FFN both read h^{l-1} and add to it (GPT-J, Phi-2,
    # Pythia); each sublayer's output is normalised before it is added (Gemma 2/3, OLMo 2); final logits are
    # soft-capped, z' = c·tanh(z/c) (Gemma 2).
    parallel: bool = False
    post_norms: bool = False
    logit_softcap: float | None = None

    @property
    def heads_per_kv_head(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def attention_neurons_per_token(self) -> int:
        """Attention neurons per source position and layer, summed over layers."""
        return self.n_layers * self.n_heads * self.head_dim

    def kv_head_of(self, head):
        """The KV head a query head reads (grouped-query attention); ints or tensors."""
        return head // self.heads_per_kv_head

    # --- flat layouts ---------------------------------------------------------------------------------------
    def ffn_flat(self, layer, neuron):
        return layer * self.d_ffn + neuron

    def ffn_unflat(self, flat):
        """(layer, neuron) of flat FFN indices; ints or tensors."""
        return flat // self.d_ffn, flat % self.d_ffn

    def ffn_indices(self, flat: Tensor) -> list[FfnIndex]:
        layers, neurons = self.ffn_unflat(flat.reshape(-1))
        return [FfnIndex(l, n) for l, n in zip(layers.tolist(), neurons.tolist())]

    def attention_grid(self, n_tokens: int) -> tuple[int, int, int, int]:
        return (self.n_layers, self.n_heads, self.head_dim, n_tokens)

    def attention_unflat(self, flat: Tensor, n_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(layer, head, dim, position) tensors of flat attention-neuron indices."""
        import torch  # here, not at the top: the index types are used where torch need not be loaded

        return torch.unravel_index(flat, self.attention_grid(n_tokens))

    def attention_flat(self, layer, head, dim, position, n_tokens: int):
        """The flat index of attention neurons over (L, H, d_h, n_tokens); ints or tensors."""
        return ((layer * self.n_heads + head) * self.head_dim + dim) * n_tokens + position

    def output_vector_key(self, layer, column):
        """An id of attention output vector (layer, column of W_O's input) that no flat FFN index takes: keys
        the weight-only caches that FFN and attention neurons share. Ints or tensors."""
        return self.n_layers * self.d_ffn + layer * (self.n_heads * self.head_dim) + column

    def attention_indices(self, flat: Tensor, n_tokens: int) -> list[AttentionIndex]:
        parts = self.attention_unflat(flat.reshape(-1), n_tokens)
        return [AttentionIndex(*row) for row in zip(*(part.tolist() for part in parts))]

    def head_unflat(self, flat):
        return flat // self.n_heads, flat % self.n_heads

    def head_indices(self, flat: Tensor) -> list[HeadIndex]:
        layers, heads = self.head_unflat(flat.reshape(-1))
        return [HeadIndex(l, h) for l, h in zip(layers.tolist(), heads.tolist())]

    def head_column(self, head, dim):
        """An attention neuron's column in the heads' concatenated output (the input of W_O)."""
        return head * self.head_dim + dim

    # --- checks -----------------------------------------------------------------------------------------------
    def check(self, index: NeuronIndex) -> None:
        """A UserError unless `index` names a neuron or head of this model."""
        inside = 0 <= index.layer < self.n_layers
        if isinstance(index, FfnIndex):
            inside = inside and 0 <= index.neuron < self.d_ffn
        elif isinstance(index, AttentionIndex):
            inside = inside and 0 <= index.head < self.n_heads and 0 <= index.dim < self.head_dim \
                and (index.position is None or index.position >= 0)
        else:
            inside = inside and 0 <= index.head < self.n_heads
        if not inside:
            raise UserError(f"not a neuron of this model: {type(index).__name__}{tuple(index)} (model: "
                            f"{self.n_layers} layers, {self.d_ffn} FFN neurons, {self.n_heads} heads of "
                            f"{self.head_dim})")

    def to_dict(self) -> dict:
        return {"family": self.family, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "d_model": self.d_model,
                "d_ffn": self.d_ffn, "vocab_size": self.vocab_size, "max_positions": self.max_positions,
                "ffn_kind": self.ffn_kind, "norm_kind": self.norm_kind,
                "parallel": self.parallel, "post_norms": self.post_norms, "logit_softcap": self.logit_softcap}


def as_index(neuron: NeuronIndex | tuple) -> NeuronIndex:
    """An index type from itself or from the tuple forms ("ffn", layer, neuron), ("attention", layer, head, dim
    [, position]) and ("head", layer, head)."""
    if isinstance(neuron, (FfnIndex, AttentionIndex, HeadIndex)):
        return neuron
    try:
        kind, *rest = neuron
        numbers = [int(x) if x is not None else None for x in rest]
        if any(isinstance(x, bool) for x in rest):
            raise TypeError("a neuron's numbers are whole numbers")
        if kind == "ffn":
            return FfnIndex(*numbers)
        if kind == "attention":
            return AttentionIndex(*numbers)
        if kind == "head":
            return HeadIndex(*numbers)
    except (TypeError, ValueError) as error:
        raise UserError(f"not a neuron: {neuron!r} ({error})") from None
    raise UserError(f"not a neuron: {neuron!r}; use ('ffn', layer, neuron), ('attention', layer, head, dim"
                    "[, position]) or ('head', layer, head)")
