"""Faithfulness beside every score (docs/method.md §5): an attribution's top N FFN and attention value neurons and
top N heads, each switched off alone, and its measured change of log p(target) — log p(target) − log p(contrast)
with a contrast — stored as `measured_change` next to its score; and all the measured value neurons switched off
together (`measured_together`). One padded batch per 16 interventions of the same prompt.

A score is the first-order, frozen-norm effect of adding a neuron's vector to its base (§2); switching the neuron
off runs the whole model again, so the final norm's scale moves, later neurons respond and probabilities
saturate. The two need not agree; this is what lets a user see where they do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UserError
from ..model.interventions import Ablation, last_logits_each
from ..model.loaded import LoadedModel
from ..model.prompts import Prompt
from ..results.attribution import Attribution


def measure_attributions(model: LoadedModel, results: Sequence[Attribution], encoded: Sequence[list[int]], top: int,
                         rerank: bool = False) -> None:
    """Fill in each result's measured changes for its top `top` neurons of each kind (in place); `rerank`: those
    top neurons re-ranked by their measured change, the largest drop of the answer first."""
    for result, ids in zip(results, encoded):
        if result.target.tokens is not None:
            raise UserError("measuring applies to the first answer token; use answer_tokens='first' with it")
        _measure(model, result, ids, top)
        if rerank:
            _rerank(result, top)


def _measure(model: LoadedModel, result: Attribution, ids: list[int], top: int) -> None:
    value_neurons = [*result.ffn_neurons[:top], *result.attention_neurons[:top]]
    measured = [*value_neurons, *result.heads[:top]]
    alone, together = measured_changes(model, ids, result, [item.index for item in measured],
                                       [n.index for n in value_neurons])
    for item, change in zip(measured, alone):
        item.measured_change = change
    result.measured_top, result.measured_together = top, together


def measured_changes(model: LoadedModel, prompt: Prompt, result: Attribution, alone: Sequence,
                     together: Sequence) -> tuple[list[float], float]:
    """The change of log p(target) (minus log p(contrast) with one) with each of `alone` switched off by itself,
    and with all of `together` off at once, in one batched run."""
    ablations = [Ablation(), *(Ablation.of([index]) for index in alone), Ablation.of(list(together))]
    log_probs = torch.log_softmax(last_logits_each(model, [prompt] * len(ablations), ablations).double(), dim=-1)
    outcome = log_probs[:, result.target.id]
    if result.target.contrast is not None:
        outcome = outcome - log_probs[:, result.target.contrast.id]
    changes = (outcome - outcome[0]).tolist()
    return changes[1:-1], changes[-1]


def _rerank(result: Attribution, top: int) -> None:
    for name in ("ffn_neurons", "attention_neurons", "heads"):
        items = getattr(result, name)
        items[:top] = sorted(items[:top], key=lambda item: item.measured_change)
