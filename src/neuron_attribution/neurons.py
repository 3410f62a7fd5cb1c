"""One identity for every neuron: index types, the model's sizes, and the flat layouts scoring works in.

Scoring treats a kind of neuron as one flat vector of scores (all FFN neurons of all layers, all attention
neurons of all layers and source positions), so a top-k is one search over every layer at once. The flat
layouts are written here once; everything else converts through `ModelShape`:

* FFN neuron (layer, row): flat = layer·N + row, over (L, N). In a mixture-of-experts layer the N rows are every
  expert's neurons, expert by expert (row = expert·N_e + neuron), then the shared expert's (row = E·N_e + neuron);
* a whole expert (layer, expert): its N_e rows, for switching it off;
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
    """An FFN neuron. In a mixture-of-experts layer, `expert` is the routed expert it belongs to and `neuron` its
    place there; None is a dense FFN's neuron, or one of a shared expert's (always active)."""

    layer: int
    neuron: int
    expert: int | None = None

    def __str__(self) -> str:
        if self.expert is None:
            return f"{self.layer}_{self.neuron}"
        return f"{self.layer}_e{self.expert}_{self.neuron}"


class ExpertIndex(NamedTuple):
    """A whole routed expert of a mixture-of-experts layer: every neuron of it, for interventions."""

    layer: int
    expert: int

    def __str__(self) -> str:
        return f"{self.layer}_e{self.expert}"


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


NeuronIndex = Union[FfnIndex, AttentionIndex, HeadIndex, ExpertIndex]

_NEURON_TEXT = re.compile(r"^(\d+)_(\d+)$|^(\d+)_(\d+)_(\d+)(?:@(\d+))?$|^(\d+)\.(\d+)$"
                          r"|^(\d+)_e(\d+)_(\d+)$|^(\d+)_e(\d+)$")


def parse_neuron(text: str) -> NeuronIndex:
    """"24_177" (FFN), "23_4_38@3" or "23_4_38" (attention, at a source position or every one), "21.19" (head),
    "12_e3_45" (neuron 45 of expert 3), "12_e3" (the whole expert)."""
    match = _NEURON_TEXT.match(text.strip())
    if not match:
        raise UserError(f"not a neuron: {text!r}; write layer_neuron (FFN), layer_eEXPERT_neuron (an expert's "
                        "neuron), layer_head_dim@position (attention) or layer.head (head)")
    g = [None if x is None else int(x) for x in match.groups()]
    if g[0] is not None:
        return FfnIndex(g[0], g[1])
    if g[2] is not None:
        return AttentionIndex(g[2], g[3], g[4], g[5])
    if g[6] is not None:
        return HeadIndex(g[6], g[7])
    if g[8] is not None:
        return FfnIndex(g[8], g[10], g[9])
    return ExpertIndex(g[11], g[12])


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
    # A mixture-of-experts FFN (docs/method.md §1): E routed experts of N_e neurons each, k chosen per token; the
    # layer's d_ffn rows are the E·N_e expert neurons, then the shared experts' neurons. 0 experts: a dense FFN.
    n_experts: int = 0
    experts_per_token: int = 0
    expert_ffn: int = 0

    @property
    def expert_rows(self) -> int:
        """Rows of a layer that belong to routed experts (E·N_e; 0 in a dense FFN)."""
        return self.n_experts * self.expert_ffn

    @property
    def shared_ffn(self) -> int:
        """Neurons of a layer outside routed experts: a dense FFN's, or a mixture's shared experts'."""
        return self.d_ffn - self.expert_rows

    def ffn_row(self, index: FfnIndex) -> int:
        """An FFN neuron's row in its layer's flat layout."""
        if index.expert is None:
            return self.expert_rows + index.neuron
        return index.expert * self.expert_ffn + index.neuron

    def ffn_index(self, layer: int, row: int) -> FfnIndex:
        """The FFN neuron at `row` of `layer`'s flat layout."""
        if row < self.expert_rows:
            return FfnIndex(layer, row % self.expert_ffn, row // self.expert_ffn)
        return FfnIndex(layer, row - self.expert_rows)

    def expert_row_range(self, expert: int) -> range:
        return range(expert * self.expert_ffn, (expert + 1) * self.expert_ffn)

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
    def ffn_unflat(self, flat):
        """(layer, neuron) of flat FFN indices; ints or tensors."""
        return flat // self.d_ffn, flat % self.d_ffn

    def ffn_indices(self, flat: Tensor) -> list[FfnIndex]:
        layers, rows = self.ffn_unflat(flat.reshape(-1))
        return [self.ffn_index(l, r) for l, r in zip(layers.tolist(), rows.tolist())]

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
            if index.expert is None:
                inside = inside and 0 <= index.neuron < self.shared_ffn
            else:
                inside = inside and 0 <= index.expert < self.n_experts and 0 <= index.neuron < self.expert_ffn
        elif isinstance(index, ExpertIndex):
            inside = inside and 0 <= index.expert < self.n_experts
        elif isinstance(index, AttentionIndex):
            inside = inside and 0 <= index.head < self.n_heads and 0 <= index.dim < self.head_dim \
                and (index.position is None or index.position >= 0)
        else:
            inside = inside and 0 <= index.head < self.n_heads
        if not inside:
            raise UserError(f"not a neuron of this model: {index} (model: "
                            f"{self.n_layers} layers, {self._ffn_words()}, {self.n_heads} heads of "
                            f"{self.head_dim})")

    def _ffn_words(self) -> str:
        if not self.n_experts:
            return f"{self.d_ffn} FFN neurons"
        shared = f" and {self.shared_ffn} shared-expert neurons" if self.shared_ffn else ", no shared expert"
        return f"{self.n_experts} experts of {self.expert_ffn} neurons{shared}"

    def to_dict(self) -> dict:
        return {"family": self.family, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "n_kv_heads": self.n_kv_heads, "head_dim": self.head_dim, "d_model": self.d_model,
                "d_ffn": self.d_ffn, "vocab_size": self.vocab_size, "max_positions": self.max_positions,
                "ffn_kind": self.ffn_kind, "norm_kind": self.norm_kind,
                "parallel": self.parallel, "post_norms": self.post_norms, "logit_softcap": self.logit_softcap,
                "n_experts": self.n_experts, "experts_per_token": self.experts_per_token,
                "expert_ffn": self.expert_ffn}


def as_index(neuron: NeuronIndex | str | tuple) -> NeuronIndex:
    """An index type from itself, from its text ("25_1120", "23_1_17@2", "21.19", "12_e3_45", "12_e3": see
    `parse_neuron`), from a result's neuron (anything with an `index`), or from the tuple forms ("ffn", layer,
    neuron[, expert]), ("attention", layer, head, dim[, position]), ("head", layer, head) and ("expert", layer,
    expert)."""
    if isinstance(neuron, (FfnIndex, AttentionIndex, HeadIndex, ExpertIndex)):
        return neuron
    if isinstance(neuron, str):
        return parse_neuron(neuron)
    index = getattr(neuron, "index", None)
    if isinstance(index, (FfnIndex, AttentionIndex, HeadIndex, ExpertIndex)):
        return index
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
        if kind == "expert":
            return ExpertIndex(*numbers)
    except (TypeError, ValueError) as error:
        raise UserError(f"not a neuron: {neuron!r} ({error})") from None
    raise UserError(f"not a neuron: {neuron!r}; name it as text ('25_1120', '23_1_17@2', '21.19') or use "
                    "('ffn', layer, neuron), ('attention', layer, head, dim[, position]) or ('head', layer, head)")
