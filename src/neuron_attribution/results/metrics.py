"""The paper's three metrics on the gold token (docs/method.md §5): reciprocal rank, probability, log probability,
averaged over sentences; lower after an intervention = the switched-off neurons mattered more."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class GoldScores:
    """Per sentence: 1/rank of the gold token (rank 1 = top prediction), its probability and log probability."""

    reciprocal_rank: Tensor  # (n,)
    prob: Tensor
    log_prob: Tensor

    @classmethod
    def of(cls, logits: Tensor, gold: Tensor) -> GoldScores:
        """On the CPU, wherever the logits were computed: results travel to a driver that may have no GPU."""
        logits = logits.detach().to(device="cpu", dtype=torch.float64)
        gold = gold.to("cpu")
        gold_logits = logits.gather(1, gold.unsqueeze(1))
        ranks = (logits > gold_logits).sum(dim=1) + 1
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, gold.unsqueeze(1)).squeeze(1)
        return cls(1.0 / ranks.double(), log_probs.exp(), log_probs)

    @classmethod
    def concat(cls, parts: list[GoldScores]) -> GoldScores:
        return cls(torch.cat([p.reciprocal_rank for p in parts]), torch.cat([p.prob for p in parts]),
                   torch.cat([p.log_prob for p in parts]))

    def subset(self, rows: Tensor) -> GoldScores:
        return GoldScores(self.reciprocal_rank[rows], self.prob[rows], self.log_prob[rows])


@dataclass(frozen=True)
class Metrics:
    """Means over sentences; against the unablated model, the relative decrease (orig − new) / orig of MRR and
    probability, and the drop orig − new of the (negative) log probability."""

    mrr: float
    prob: float
    log_prob: float
    mrr_decrease: float = 0.0
    prob_decrease: float = 0.0
    log_prob_drop: float = 0.0

    @classmethod
    def of(cls, scores: GoldScores, original: Metrics | None = None) -> Metrics:
        mrr, prob, log_prob = (float(t.mean()) if t.numel() else float("nan")
                               for t in (scores.reciprocal_rank, scores.prob, scores.log_prob))
        if original is None:
            return cls(mrr, prob, log_prob)
        return cls(mrr, prob, log_prob, _relative_decrease(original.mrr, mrr),
                   _relative_decrease(original.prob, prob), original.log_prob - log_prob)


def _relative_decrease(original: float, new: float) -> float:
    return (original - new) / original if original else float("nan")
