"""Progress of long scoring, for whoever is watching: a surface (the CLI's progress bar) sets a reporter for the
work it runs; scoring reports (what, done, total) to it and knows nothing of how it is shown. Without a reporter
(the library, a run's workers) reports go nowhere."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Reporter = Callable[[str, int, int], None]

_reporter: ContextVar[Reporter | None] = ContextVar("scoring_progress", default=None)

# Scoring this many rows (one vocabulary-sized product each) takes long enough on a CPU to be worth a progress bar.
REPORTED_FROM_ROWS = 4096


@contextmanager
def reporting(reporter: Reporter) -> Iterator[None]:
    token = _reporter.set(reporter)
    try:
        yield
    finally:
        _reporter.reset(token)


def report(what: str, done: int, total: int) -> None:
    reporter = _reporter.get()
    if reporter is not None and total >= REPORTED_FROM_ROWS:
        reporter(what, done, total)
