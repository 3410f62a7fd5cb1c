"""`evaluate`: switch off the neurons a method finds and measure the gold token (docs/method.md §5). The
protocols themselves are in `protocols.py`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..datasets import Fact, OnError, Skipped
from ..errors import UserError
from ..execution import Backend, LocalBackend
from ..model.loading import LoadedModel
from ..model.prompts import Sentence, encode_facts
from ..results.evaluation import Evaluation
from ..scoring.methods import resolve_methods
from ..settings import Settings, check_positive
from .protocols import PROTOCOLS, Progress, Request

DEFAULT_IG_STEPS = 20


def evaluate(model: LoadedModel, facts: Sequence[Fact], *, protocol: str = "compare",
             methods: str | Sequence[str] | None = None, top: int | None = None, seed: int = 0,
             batch_size: int = 8, on_error: OnError = "skip", skipped: Sequence[Skipped] = (),
             progress: Progress | None = None, ig_steps: int = DEFAULT_IG_STEPS, backend: Backend | None = None,
             settings: Settings | None = None) -> Evaluation:
    """Run one protocol over `facts`. `skipped`: lines already left out while reading them (reported).
    `backend`: where the batches run (default: here, with `settings`)."""
    started = time.perf_counter()
    sentences, left_out = encode_facts(model, facts, on_error)
    all_skipped = [*skipped, *left_out]
    if not sentences:
        raise UserError(f"no usable sentences ({len(all_skipped)} skipped)")
    result = evaluate_sentences(model, sentences, protocol=protocol, methods=methods, top=top, seed=seed,
                                batch_size=batch_size, progress=progress, ig_steps=ig_steps, backend=backend,
                                settings=settings)
    result.skipped = all_skipped
    result.seconds = time.perf_counter() - started
    return result


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
