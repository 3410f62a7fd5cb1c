"""`evaluate`: switch off the neurons a method finds and measure the gold token (docs/method.md §5). The
protocols themselves are in `protocols.py`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..datasets import Fact, OnError, Skipped
from ..errors import UserError
from ..execution import Backend, LocalBackend
from ..model.loaded import LoadedModel
from ..model.prompts import Sentence, encode_facts
from ..results.evaluation import Evaluation
from ..scoring.methods import resolve_methods
from ..settings import DEFAULT_IG_STEPS, Settings, check_positive
from .filter import Checked, filter_facts
from .protocols import PROTOCOLS, Progress, Request



def evaluate(model: LoadedModel, facts: Sequence[Fact], *, protocol: str = "compare",
             methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
             batch_size: int = 8, on_error: OnError = "skip", skipped: Sequence[Skipped] = (),
             progress: Progress | None = None, ig_steps: int = DEFAULT_IG_STEPS, backend: Backend | None = None,
             settings: Settings | None = None, filter: bool = True) -> Evaluation:
    """Run one protocol over `facts`. `skipped`: lines already left out while reading them (reported).
    `backend`: where the batches run (default: here, with `settings`). `filter`: keep only the facts the model
    knows, as the paper does (docs/method.md §6); the counts are in the result's `filter`."""
    started = time.perf_counter()
    if filter:
        checked, left_out = filter_facts(model, facts, on_error=on_error, progress=None if progress is None else (
            lambda done, total: progress("filtering facts", done, total)))
        sentences = [Sentence(c.fact, c.ids, c.target) for c in checked if c.kept]
    else:
        sentences, left_out = encode_facts(model, facts, on_error)
    all_skipped = [*skipped, *left_out]
    if not sentences:
        reason = (f"no fact is left after the filter: {len(checked)} checked, none known to the model "
                  "(--no-filter keeps every line)" if filter else "no usable sentences")
        raise UserError(f"{reason}; {len(all_skipped)} lines skipped")
    result = evaluate_sentences(model, sentences, protocol=protocol, methods=methods, top=top, seed=seed,
                                batch_size=batch_size, progress=progress, ig_steps=ig_steps, backend=backend,
                                settings=settings)
    result.skipped = all_skipped
    if filter:
        result.filter = _filter_counts(checked)
    result.seconds = time.perf_counter() - started
    return result


def _filter_counts(checked: Sequence[Checked]) -> dict:
    by_type: dict[str, dict[str, int]] = {}
    for c in checked:
        counts = by_type.setdefault(c.fact.type_name, {"checked": 0, "kept": 0})
        counts["checked"] += 1
        counts["kept"] += int(c.kept)
    return {"checked": len(checked), "kept": sum(int(c.kept) for c in checked), "by_type": by_type}


def evaluate_sentences(model: LoadedModel, sentences: Sequence[Sentence], *, protocol: str = "compare",
                       methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
                       batch_size: int = 8, progress: Progress | None = None, ig_steps: int = DEFAULT_IG_STEPS,
                       backend: Backend | None = None, settings: Settings | None = None) -> Evaluation:
    """`evaluate` for sentences already tokenised."""
    check_protocol(protocol)
    if top is not None:
        check_positive("--top", top)
    check_positive("--batch-size", batch_size)
    if not sentences:
        raise UserError("no sentences to evaluate")
    backend = backend or LocalBackend(model, settings)
    if protocol == "query" and not backend.settings.scoring.query_top:
        raise UserError("the query protocol needs query neurons: --query-top must be at least 1")
    started = time.perf_counter()
    report = progress or (lambda what, done, total: None)
    sentences = list(sentences)
    batches = [sentences[i: i + batch_size] for i in range(0, len(sentences), batch_size)]
    keys = tuple(resolve_methods(methods)) if protocol == "compare" else ()
    request = Request(protocol, top, keys, seed, ig_steps)
    result = PROTOCOLS[protocol]().evaluate(model, backend, sentences, batches, request, report)
    result.seconds = time.perf_counter() - started
    return result


def check_protocol(name: str) -> None:
    if name not in PROTOCOLS:
        raise UserError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")


def protocols_help() -> str:
    """One line per protocol for the CLI's help."""
    return "; ".join(f"{key}: {protocol.description}" for key, protocol in PROTOCOLS.items())
