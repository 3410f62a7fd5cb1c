"""The paper's per-model filter (METHOD.md §6): keep a sentence when the gold answer's first token is in the
model's top 10 and scores above the first token of every other candidate answer of its type."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .datasets import Fact, OnError, Skipped, candidate_answers
from .errors import UserError
from .interventions import last_logits
from .loading import LoadedModel
from .prompts import encode_prompt, encode_target

TOP_RANK = 10


@dataclass(frozen=True)
class Checked:
    """One fact after the filter."""

    fact: Fact
    ids: list[int]
    target: int
    rank: int  # of the gold token among all tokens, 1 = top
    kept: bool
    reason: str  # why it was dropped ("" when kept)


def filter_facts(model: LoadedModel, facts: Sequence[Fact], *, on_error: OnError = "skip",
                 candidates: dict[str, list[str]] | None = None, batch_size: int = 16,
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[Checked], list[Skipped]]:
    """Every usable fact, checked; facts the model cannot take at all (a prompt too long, say) are skipped."""
    candidates = candidate_answers() if candidates is None else candidates
    encoded, skipped = [], []
    for fact in facts:
        try:
            ids = encode_prompt(model, fact.prompt)
            encoded.append((fact, ids, encode_target(model, ids, fact.prompt, fact.answer).id))
        except UserError as error:
            if on_error == "stop":
                raise UserError(f"{fact.source}:{fact.line}: {error}") from None
            skipped.append(Skipped(fact.source, fact.line, str(error), fact.prompt))
    checked: list[Checked] = []
    rivals = _RivalTokens(model, candidates)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start: start + batch_size]
        logits = last_logits(model, [ids for _, ids, _ in chunk], batch_size=batch_size)
        for (fact, ids, target), row in zip(chunk, logits):
            checked.append(_check(fact, ids, target, row, rivals.of(fact)))
        if progress is not None:
            progress(min(start + batch_size, len(encoded)), len(encoded))
    return checked, skipped


def _check(fact: Fact, ids: list[int], target: int, logits: torch.Tensor, rivals: list[int]) -> Checked:
    rank = int((logits > logits[target]).sum()) + 1
    if rank > TOP_RANK:
        return Checked(fact, ids, target, rank, False, f"gold answer ranks {rank}, not in the top {TOP_RANK}")
    beaten_by = [r for r in rivals if r != target and logits[r] >= logits[target]]
    if beaten_by:
        return Checked(fact, ids, target, rank, False, "another candidate answer scores higher")
    return Checked(fact, ids, target, rank, True, "")


class _RivalTokens:
    """First tokens of a type's candidate answers, as they follow a prompt (with a leading space where the
    prompt does not end in one). Tokenised once per type and prompt ending."""

    def __init__(self, model: LoadedModel, candidates: dict[str, list[str]]):
        self.model, self.candidates = model, candidates
        self.cache: dict[tuple[str, bool], list[int]] = {}

    def of(self, fact: Fact) -> list[int]:
        answers = self.candidates.get(fact.type or "", [])
        if not answers:
            return []
        ends_in_space = fact.prompt[-1:].isspace()
        key = (fact.type or "", ends_in_space)
        if key not in self.cache:
            context = "x " if ends_in_space else "x"
            ids = encode_prompt(self.model, context)
            self.cache[key] = sorted({encode_target(self.model, ids, context, answer).id for answer in answers})
        return self.cache[key]
