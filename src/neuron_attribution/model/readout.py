"""The model's output head with the final norm linearised (docs/method.md §2), and the vocabulary projection.

The norm's scale is frozen at its value on the true final residual h_T^L, so logits become linear in any
vector added to the residual: z(x + c·u) = z(x) + c·δ(u), δ(u) = U(γ ⊙ centre(u))·scale. Soft-capped models
(Gemma 2) cap those logits, c·tanh(z/c), after the linear part. LayerNorm's bias
(and an unembedding bias) is added once, to base logits only, so z(h_T^L) equals the model's own logits.
`reference=True` drops the LayerNorm bias, as the authors' GPT-2 code does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .adapters import NormParams
from .weights import Matrix, as_matrix


@dataclass(frozen=True)
class LinearReadout:
    norm: NormParams
    unembedding: Matrix  # (V, d), read where it lives
    scale: float  # frozen 1/rms or 1/std of the final residual
    constant_logits: Tensor  # (V,): U·β (+ output bias), added once to a base
    max_unembedding_norm: float  # max_v ‖U_v‖, for bounding how far a vector can move any logit
    has_constant: bool  # whether constant_logits is non-zero
    softcap: float | None = None  # final logits soft-capped as c·tanh(z/c) (Gemma 2); logits are then not linear

    @classmethod
    def at(cls, norm: NormParams, unembedding: Matrix | Tensor, unembedding_bias: Tensor | None,
           final_residual: Tensor, *, reference: bool = False, max_unembedding_norm: float | None = None,
           softcap: float | None = None) -> LinearReadout:
        unembedding = as_matrix(unembedding)
        scale = float(norm.own_scale(final_residual.double()))
        constant = torch.zeros(unembedding.shape[0], device=unembedding.device)
        if norm.bias is not None and not reference:
            constant = constant + unembedding.times_transposed(norm.bias.unsqueeze(0))[0]
        if unembedding_bias is not None:
            constant = constant + unembedding_bias
        if max_unembedding_norm is None:
            max_unembedding_norm = float(unembedding.norms().max())
        return cls(norm, unembedding, scale, constant, max_unembedding_norm, bool(constant.any()), softcap)

    def normalise(self, vectors: Tensor) -> Tensor:
        """γ ⊙ centre(u) · scale for each row: the linear part of the final norm."""
        return self.norm.linear_part(vectors, self.scale)

    def max_logit_change(self, vectors: Tensor) -> Tensor:
        """Per row, a bound on max_v |δ_v(u)| (Cauchy–Schwarz: ‖normalise(u)‖ · max_v ‖U_v‖); soft-capping
        only shrinks changes (tanh is 1-Lipschitz), so it bounds capped logits too."""
        return self.normalise(vectors).norm(dim=-1) * self.max_unembedding_norm

    def base_logits(self, residuals: Tensor) -> Tensor:
        """Logits of full residual states (constant term included)."""
        return self.logits_of_normalised(self.normalise(residuals))

    def logits_of_normalised(self, normalised: Tensor, out: Tensor | None = None) -> Tensor:
        """U·n + constant for rows n already through `normalise`. Most RMSNorm models have no constant, and
        then no vocabulary-sized pass is spent adding zeros. `out`: a (rows, V) buffer to write into."""
        return self.finish_logits(self.unembedding.times_transposed(normalised, out=out))

    def finish_logits(self, logits: Tensor) -> Tensor:
        """Products U·n of states made into their logits, in place: the constant added, soft-capped where the
        model caps."""
        if self.has_constant:
            logits.add_(self.constant_logits)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def capped(self, logits: Tensor) -> Tensor:
        """The model's final soft-capping, c·tanh(z/c), where it has one; otherwise the logits as they are."""
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def pullback(self, covectors: Tensor) -> Tensor:
        """For r in vocabulary-dual space ((..., d) rows already multiplied by U), the vector k with
        k·u = r·normalise(u) for every u: the adjoint of `normalise`."""
        return self.norm.adjoint(covectors, self.scale)


def project_to_vocabulary(norm: NormParams, unembedding: Matrix | Tensor, vectors: Tensor,
                          out: Tensor | None = None) -> Tensor:
    """U(γ ⊙ centre(u)) for each row u: a vector read through the final norm's gain (no scale, no bias) into
    the vocabulary. The one vocabulary projection of neurons' vectors (docs/method.md §2)."""
    return as_matrix(unembedding).times_transposed(norm.linear_part(vectors), out=out)
