"""The paper's per-model filter (docs/method.md §6): keep a sentence when the gold answer's first token is in the
model's top 10 and scores above the first token of every other candidate answer of its type."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..datasets import Fact, OnError, Skipped, candidate_answers
from ..model.interventions import last_logits
from ..model.loaded import LoadedModel
from ..model.prompts import encode_facts, encode_prompt, encode_target

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
                 enough: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> tuple[list[Checked], list[Skipped]]:
    """Every usable fact, checked; facts the model cannot take at all (a prompt too long, say) are skipped.
    With `enough`, a type's facts stop being checked once that many of them were kept (in file order)."""
    candidates = candidate_answers() if candidates is None else candidates
    sentences, skipped = encode_facts(model, facts, on_error)
    encoded = [(s.fact, s.ids, s.target) for s in sentences]
    checked: list[Checked] = []
    rivals = _RivalTokens(model, candidates)
    kept: dict[str | None, int] = {}
    pending = list(encoded)
    while pending:
        if enough is not None:
            pending = [e for e in pending if kept.get(e[0].type, 0) < enough]
        chunk, pending = pending[:batch_size], pending[batch_size:]
        if not chunk:
            break
        logits = last_logits(model, [ids for _, ids, _ in chunk], batch_size=batch_size)
        for (fact, ids, target), row in zip(chunk, logits):
            verdict = _check(fact, ids, target, row, rivals.of(fact))
            if enough is None or kept.get(fact.type, 0) < enough:
                checked.append(verdict)
                kept[fact.type] = kept.get(fact.type, 0) + verdict.kept
        if progress is not None:  # counts what the summary counts: facts checked, of those still to check
            still = [e for e in pending if enough is None or kept.get(e[0].type, 0) < enough]
            progress(len(checked), len(checked) + len(still))
    if progress is not None:
        progress(len(checked), len(checked))
    position = {id(fact): i for i, (fact, _, _) in enumerate(encoded)}
    checked.sort(key=lambda c: position[id(c.fact)])  # file order, whatever order the types were checked in
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
