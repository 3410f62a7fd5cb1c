"""Which neurons' vocabulary projections single a token out (the explorer's token search): for every FFN and
attention neuron u, the token's projection logit less the vocabulary's mean, in standard deviations of that
neuron's projection over the vocabulary,

    z(u, t) = (U_t − mean_v U_v) · L(u) / sqrt(uᵀ Lᵀ Cov(U) L u),

L the final norm's linear part. Everything is weights: the numerator is one d-sized dot per neuron (through the
norm's adjoint); the denominator needs one d×d covariance of the unembedding (V·d² multiply-adds) and a d×d
product per neuron (L·N·d²: about a second for SmolLM2 on a CPU, minutes for a 7B model there), computed once and
kept, where the weights live, in float32 over rows centred first (no cancellation).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.adapters import FamilyAdapter

KINDS = ("ffn", "attention")


class TokenSearch:
    """z of every FFN and attention neuron for any token, with the vocabulary statistics computed once."""

    def __init__(self, adapter: FamilyAdapter):
        self.adapter = adapter
        self._spread: dict[str, Tensor] | None = None

    def stacks(self) -> dict[str, object]:
        return {"ffn": self.adapter.ffn_value_stack, "attention": self.adapter.output_weight_stack}

    def scores(self, token_id: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Per kind: ((L, R) centred projection logits of the token, (L, R) their z)."""
        spread = self.spread()
        direction = self.centred_direction(token_id)
        result = {}
        for kind, stack in self.stacks().items():
            logit = stack.dots(direction.expand(stack.n_layers, -1))
            result[kind] = (logit, logit / spread[kind])
        return result

    def centred_direction(self, token_id: int) -> Tensor:
        """k with k·u = (U_t − mean_v U_v)·L(u) for every vector u: the token's centred projection logit as one
        dot product (the final norm's adjoint)."""
        row = self.adapter.unembedding_matrix.rows(torch.tensor([token_id], device="cpu"))[0]
        centred = row - self.spread()["mean"].to(row.device)
        return self.adapter.final_norm().adjoint(centred.unsqueeze(0))[0]

    def spread(self) -> dict[str, Tensor]:
        """The vocabulary's mean unembedding row ("mean") and each neuron's standard deviation of its projection
        logits over the vocabulary, (L, R) per kind."""
        if self._spread is None:
            mean, covariance = _unembedding_moments(self.adapter.unembedding_matrix)
            norm = self.adapter.final_norm()
            device = self.adapter.ffn_value_stack.device
            half = norm.adjoint(covariance.to(device))  # Cov·L
            quadratic = norm.adjoint(half.T.contiguous())  # Lᵀ·Cov·L
            spread = {"mean": mean}
            for kind, stack in self.stacks().items():
                variance = torch.empty(stack.n_layers * stack.n_rows, device=device)
                for first, block in stack.chunks():
                    variance[first: first + len(block)] = ((block @ quadratic) * block).sum(-1)
                spread[kind] = variance.clamp_min(1e-30).sqrt().reshape(stack.n_layers, -1)
            self._spread = spread
        return self._spread


def _unembedding_moments(unembedding) -> tuple[Tensor, Tensor]:
    """(d,) mean row (summed in float64) and (d, d) covariance of the rows, read a chunk at a time."""
    n, d = unembedding.shape
    where = unembedding.weight.device
    total = torch.zeros(d, dtype=torch.float64, device=where)
    for _, block in unembedding.chunks():
        total += block.double().sum(0)
    mean = (total / n).float()
    covariance = torch.zeros(d, d, device=where)  # of rows centred first: no cancellation in float32
    for _, block in unembedding.chunks():
        centred = block - mean
        covariance += centred.T @ centred
    return mean, covariance / n
