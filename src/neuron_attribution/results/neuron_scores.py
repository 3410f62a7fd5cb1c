"""What `score_neurons` returns: the exact scores of chosen neurons, one per neuron per prompt."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..files import read_json_as, write_json
from ..neurons import NeuronIndex, parse_neuron
from .attribution import TargetInfo


@dataclass
class NeuronScores:
    """scores[i][j]: the log-probability increase of prompt i's target from neuron j (docs/method.md §2);
    coefficients[i][j]: that neuron's coefficient there (None for a head, which has no single one)."""

    neurons: list[NeuronIndex]
    prompts: list[str]
    targets: list[TargetInfo]
    scores: list[list[float]]
    coefficients: list[list[float | None]]
    reference: bool = False

    def as_array(self) -> np.ndarray:
        """(prompts, neurons) scores."""
        return np.array(self.scores, dtype=np.float64).reshape(len(self.prompts), len(self.neurons))

    def to_dict(self) -> dict[str, Any]:
        return {"neurons": [str(n) for n in self.neurons], "prompts": self.prompts,
                "targets": [t.to_dict() for t in self.targets], "scores": self.scores,
                "coefficients": self.coefficients, "reference": self.reference}

    def save(self, path: Path | str) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronScores:
        return cls([parse_neuron(n) for n in data["neurons"]], data["prompts"],
                   [TargetInfo.from_dict(t) for t in data["targets"]], data["scores"], data["coefficients"],
                   data.get("reference", False))

    @classmethod
    def load(cls, path: Path | str) -> NeuronScores:
        return read_json_as(path, cls.from_dict, "neuron scores")


def coefficient_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value
