"""LayerNorm and RMSNorm as parameters: the only place that branches on the kind of norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...neurons import NormKind


@dataclass(frozen=True)
class NormParams:
    """A LayerNorm or RMSNorm, as parameters. The only place that branches on the kind of norm."""

    kind: NormKind
    weight: Tensor  # (d,): the effective gain γ
    bias: Tensor | None  # (d,), LayerNorm only
    eps: float

    def linear_part(self, vectors: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """γ ⊙ centre(u) · scale for each row u: the norm with its scale frozen at `scale`, bias left out.
        Linear in u (LayerNorm's centring subtracts each row's own mean)."""
        if self.kind == "layernorm":
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return vectors * (self.weight * scale)

    def own_scale(self, vectors: Tensor) -> Tensor:
        """1/rms (RMSNorm) or 1/std (LayerNorm) of each row: the scale the norm applies to it."""
        if self.kind == "identity":
            return torch.ones(*vectors.shape[:-1], 1, dtype=vectors.dtype, device=vectors.device)
        if self.kind == "layernorm":
            vectors = vectors - vectors.mean(dim=-1, keepdim=True)
        return torch.rsqrt(vectors.pow(2).mean(dim=-1, keepdim=True) + self.eps)

    def apply_without_bias(self, vectors: Tensor) -> Tensor:
        """The norm as the model applies it to each row, with the row's own scale, bias left out."""
        return self.linear_part(vectors, self.own_scale(vectors))

    def apply(self, vectors: Tensor) -> Tensor:
        """The norm as the model applies it to each row, bias included."""
        normed = self.apply_without_bias(vectors)
        return normed if self.bias is None else normed + self.bias

    def adjoint(self, covectors: Tensor, scale: float | Tensor = 1.0) -> Tensor:
        """The adjoint of `linear_part`: k with k·u = r·linear_part(u) for every u, for each row r."""
        k = covectors * (self.weight * scale)
        if self.kind == "layernorm":
            k = k - k.mean(dim=-1, keepdim=True)
        return k


def as_f32(t: Tensor) -> Tensor:
    """A float32 tensor with t's values, on t's device. A float32 weight is shared, not copied (scoring only reads
    weights; after changing the model's weights in place, call `forget_weights`)."""
    return t.detach().to(dtype=torch.float32)


def norm_from_module(module: nn.Module, kind: NormKind, gain_offset: float = 0.0) -> NormParams:
    """`gain_offset`: Gemma's RMSNorm and Nemotron's LayerNorm1P multiply by 1 + weight; the effective gain is
    weight + 1."""
    weight = as_f32(module.weight)
    weight = weight + gain_offset if gain_offset else weight
    if kind == "layernorm":
        bias = getattr(module, "bias", None)
        return NormParams("layernorm", weight, None if bias is None else as_f32(bias), _epsilon(module))
    return NormParams("rmsnorm", weight, None, _epsilon(module))


def _epsilon(module: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "layer_norm_eps"):
        value = getattr(module, name, None)
        if value is not None:
            return float(value)
    raise TypeError(f"{type(module).__name__} names no epsilon")


def identity_norm(d_model: int, device: torch.device) -> NormParams:
    """The 'norm' of a sublayer that reads the residual as it is (OLMo 2 has no pre-norms)."""
    return NormParams("identity", torch.ones(d_model, device=device), None, 0.0)
