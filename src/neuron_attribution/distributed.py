"""The Ray backend: the same batch functions as the local backend, on Ray actors that each load the model once.

A local cluster is started by default (`workers` actors of one CPU each); `address` joins an existing cluster,
whose nodes need this package and the model. Results come back to the driver, which alone writes files, so no
shared filesystem is needed. An actor that dies is restarted (loading the model again) and its unfinished batch
is run again; the driver keeps one result per batch, so nothing is lost or counted twice. Each actor uses as
many torch threads as the driver, so its float32 arithmetic, and hence every number, is the driver's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError

INSTALL_HINT = "--backend ray needs Ray: pip install 'neuron-attribution[ray]'"
RESTARTS = 3


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


class _Worker:
    """One actor: the model, loaded once, and whatever batch function it is handed."""

    def __init__(self, model_argument: str | None, dtype: str | None, threads: int, allow_pickle: bool,
                 crash_once: tuple[int, str] | None):
        import torch

        from .loading import load_model

        torch.set_num_threads(threads)
        self.model = load_model(model_argument, dtype=dtype, allow_pickle=allow_pickle)
        self.crash_once = crash_once

    def run(self, function: Callable[[Any, Any], Any], index: int, item: Any) -> Any:
        if self.crash_once is not None and index == self.crash_once[0]:
            marker = Path(self.crash_once[1])
            if not marker.exists():  # a test's way to kill a worker in the middle of a batch, once
                marker.write_text("crashed")
                os._exit(1)
        return function(self.model, item)


class RayBackend:
    """`map` over Ray actors. Use as a context manager: the actors (and a local cluster this started) stop
    on leaving it."""

    def __init__(self, model_argument: str | None, *, dtype: str | None = None, workers: int = 2,
                 address: str | None = None, allow_pickle: bool = False,
                 crash_once: tuple[int, str] | None = None):
        if workers <= 0:
            raise UserError("--workers must be a positive number")
        ray = _ray()
        import torch

        self.ray = ray
        self.started_cluster = False
        if not ray.is_initialized():
            try:
                quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # progress is ours to show
                if address:
                    ray.init(address=address, **quiet)
                else:
                    ray.init(num_cpus=workers, include_dashboard=False, **quiet)
                    self.started_cluster = True
            except (ConnectionError, ValueError, RuntimeError) as error:
                raise UserError(f"cannot start or reach the Ray cluster{' at ' + address if address else ''}: "
                                f"{str(error).splitlines()[0]}") from None
        actor = ray.remote(num_cpus=1, max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Worker)
        self.actors = [actor.remote(model_argument, dtype, torch.get_num_threads(), allow_pickle, crash_once)
                       for _ in range(workers)]

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.started_cluster:
            self.ray.shutdown()

    def map(self, function: Callable[[Any, Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Two batches in flight per actor; results as they finish."""
        ray = self.ray
        pending: dict[Any, tuple[int, Any]] = {}  # reference -> (batch index, actor)
        queue = list(enumerate(items))
        free = [actor for actor in self.actors for _ in range(2)]
        while queue or pending:
            while queue and free:
                index, item = queue.pop(0)
                actor = free.pop(0)
                pending[actor.run.remote(function, index, item)] = (index, actor)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for reference in ready:
                index, actor = pending.pop(reference)
                try:
                    result = ray.get(reference)
                except ray.exceptions.RayError as error:
                    raise UserError(f"a Ray worker failed on batch {index} after {RESTARTS} retries: "
                                    f"{str(error).splitlines()[0]}") from None
                free.append(actor)
                yield index, result
