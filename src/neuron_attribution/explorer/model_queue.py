"""Model work, one request at a time, off the event loop: the model and its hooks are not safe to share
between threads, and one forward pass at a time is also the fastest on a CPU. Requests wait in order; the
queue says how many are waiting and what runs, so that a page can show it while the server stays responsive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

Result = TypeVar("Result")

# Requests that may wait for the model at once (the running one included); past that a request is refused with
# 429 at once, so that a flood (a page firing requests in a loop) cannot queue work without end.
MAX_PENDING = 32


class QueueFull(Exception):
    """The model queue holds its maximum of waiting requests."""


@dataclass
class ModelQueue:
    pending: int = 0  # requests submitted and not finished, the running one included
    running: str | None = None  # what the model does now
    finished: int = 0
    max_pending: int = MAX_PENDING
    refused: int = 0
    _executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="model"), repr=False)

    async def run(self, what: str, work: Callable[[], Result]) -> Result:
        """`work()` on the model thread once the requests before it are done; the event loop serves other
        requests meanwhile. `pending` is only changed on the event loop's thread. QueueFull, at once, when
        `max_pending` requests are waiting already."""
        if self.pending >= self.max_pending:
            self.refused += 1
            raise QueueFull(f"the model is busy with {self.pending} requests; try again in a moment")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, what, work)
        finally:
            self.pending -= 1
            self.finished += 1

    def _call(self, what: str, work: Callable[[], Result]) -> Result:
        self.running = what
        try:
            return work()
        finally:
            self.running = None

    def status(self) -> dict[str, object]:
        return {"pending": self.pending, "running": self.running, "finished": self.finished,
                "max_pending": self.max_pending, "refused": self.refused}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
