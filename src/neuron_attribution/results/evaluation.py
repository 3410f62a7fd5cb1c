"""What `evaluate` returns: metrics per method (or per protocol row) after switching neurons off."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..datasets import Skipped
from ..files import write_json
from .metrics import Metrics


@dataclass
class Evaluation:
    protocol: str
    model: str
    top: int  # neurons (heads, for the heads protocol) switched off per sentence and method
    n_sentences: int
    methods: dict[str, Metrics]  # "original" first
    skipped: list[Skipped] = field(default_factory=list)
    by_type: dict[str, dict[str, Metrics]] | None = None  # heads: ablated type -> measured type -> metrics
    heads: dict[str, list[tuple[int, int]]] | None = None  # heads: the heads switched off per type
    seconds: float = 0.0
    # The paper's filter, when applied: {"checked": n, "kept": n, "by_type": {type: {"checked", "kept"}}}
    filter: dict | None = None

    def to_dict(self) -> dict:
        payload = {
            "n_sentences": self.n_sentences,
            "top": self.top,
            "model": self.model,
            "protocol": self.protocol,
            "methods": {key: _metrics_dict(m) for key, m in self.methods.items()},
            "n_skipped": len(self.skipped),
            "skipped": [s.to_dict() for s in self.skipped],
            "seconds": round(self.seconds, 2),
        }
        if self.by_type is not None:
            payload["by_type"] = {a: {m: _metrics_dict(x) for m, x in row.items()} for a, row in self.by_type.items()}
        if self.filter is not None:
            payload["filter"] = self.filter
        if self.heads is not None:
            payload["heads"] = {t: [list(h) for h in hs] for t, hs in self.heads.items()}
        return payload

    def save(self, path: Path | str) -> None:
        write_json(path, self.to_dict())


def _metrics_dict(m: Metrics) -> dict:
    return {"mrr": m.mrr, "prob": m.prob, "log_prob": m.log_prob, "mrr_decrease": m.mrr_decrease,
            "prob_decrease": m.prob_decrease, "log_prob_drop": m.log_prob_drop}
