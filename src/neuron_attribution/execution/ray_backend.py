"""The Ray backend: the same batch functions as the local backend, on Ray actors that each load the model once.

A local cluster is started by default (`workers` actors of one CPU each); `address` joins an existing cluster,
whose nodes need this package and the model. When the settings name a CUDA device (or "auto"), each actor also
asks Ray for `gpus_per_worker` of a GPU (Ray then makes that GPU visible to it, and only that one), so several
workers can share a GPU with fractions; the driver itself needs no GPU. Results come back to the driver, which
alone writes files, so no shared filesystem is needed. An actor that dies is restarted (loading the model
again) and its unfinished batch is run again; the driver keeps one result per batch, so nothing is lost or
counted twice. Each actor uses as many torch threads as the driver, so its float32 arithmetic, and hence every
number, is the driver's.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..settings import Settings, needs_cuda
from . import SetupFunction, WorkFunction

INSTALL_HINT = "--backend ray needs Ray: pip install 'neuron-attribution[ray]'"
RESTARTS = 3
NO_GPU_ON_WORKER = "no CUDA GPU is usable on the Ray worker's node"


AUTH_HINT = ("if the cluster uses token authentication (Ray 2.59 and later turn it on for `ray start --head`), "
             "set RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN or ~/.ray/auth_token")


def require_ray(address: str | None = None):
    """Ray, imported for joining `address` (None: a local cluster of our own). Ray reads its authentication mode
    when it is imported, so that is settled first: joining a cluster whose token is at hand (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, where `ray start` writes it) turns token authentication on, as
    Ray's documentation asks of clients of such clusters."""
    if address and "RAY_AUTH_MODE" not in os.environ and "ray" not in sys.modules and _token_at_hand():
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return ray


def _token_at_hand() -> bool:
    return bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").is_file())


class _Worker:
    """One actor: the model, loaded once from the settings' model spec, and the settings every function gets."""

    def __init__(self, settings: Settings, threads: int):
        import torch

        from ..model.loading import load

        torch.set_num_threads(threads)
        self.settings = settings
        if needs_cuda(settings.model.device) and not torch.cuda.is_available():
            import socket

            raise RuntimeError(f"{NO_GPU_ON_WORKER} {socket.gethostname()} (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!r}, torch {torch.__version__})")
        self.model = load(settings.model)

    def run(self, function: WorkFunction, item: Any) -> Any:
        return function(self.model, self.settings, item)

    def setup(self, function: SetupFunction) -> None:
        function(self.model, self.settings, None)


class RayBackend:
    """`map` over Ray actors. Use as a context manager: the actors (and a local cluster this started) stop
    on leaving it."""

    def __init__(self, settings: Settings, *, workers: int = 2, address: str | None = None,
                 gpus_per_worker: float | None = None):
        if workers <= 0:
            raise UserError("--workers must be a positive number")
        gpus = gpu_share(settings, gpus_per_worker)
        ray = require_ray(address)
        import torch

        self.ray = ray
        self.settings = settings
        self.started_cluster = False
        if not ray.is_initialized():
            try:
                quiet = {"log_to_driver": False, "logging_level": logging.ERROR}  # progress is ours to show
                if address:
                    ray.init(address=address, **quiet)
                else:  # on loopback: a cluster of our own serves only this machine
                    ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
                    self.started_cluster = True
            except (ConnectionError, ValueError, RuntimeError) as error:
                cause = str(error).splitlines()[0]
                if address:
                    raise UserError(f"cannot reach the Ray cluster at {address}: {cause}; {AUTH_HINT}") from None
                raise UserError(f"cannot start a local Ray cluster: {cause}") from None
        if gpus:
            self._check_gpus(workers, gpus)
        actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Worker)
        self.actors = [actor.remote(settings, torch.get_num_threads()) for _ in range(workers)]
        self.gpus_per_worker = gpus

    def _check_gpus(self, workers: int, gpus: float) -> None:
        """Actors asking for more GPUs than the cluster has would wait for ever: refused at once instead."""
        total = self.ray.cluster_resources().get("GPU", 0)
        if workers * gpus > total:
            self.close()
            have = "no GPU" if not total else f"{total:g} GPU{'s' if total != 1 else ''}"
            raise UserError(f"{workers} Ray worker{'s' if workers != 1 else ''} × {gpus:g} GPU "
                            f"(--device {self.settings.model.device}, --gpus-per-worker) need {workers * gpus:g} "
                            f"GPUs, but the Ray cluster has {have}; use fewer --workers, a smaller "
                            "--gpus-per-worker, or --device cpu")

    def __enter__(self) -> RayBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for actor in getattr(self, "actors", []):
            self.ray.kill(actor)
        self.actors = []
        if self.started_cluster:
            self.ray.shutdown()

    def on_every_model(self, function: SetupFunction, progress: Callable[[int, int], None] | None = None) -> None:
        """On every actor at once (no progress: the work is in other processes)."""
        self._get([actor.setup.remote(function) for actor in self.actors], "preparing the workers")

    def _get(self, references, what: str):
        try:
            return self.ray.get(references)
        except self.ray.exceptions.RayError as error:
            raise UserError(f"a Ray worker failed {what} after {RESTARTS} retries: {_cause(error)}") from None

    def map(self, function: WorkFunction, items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """Two batches in flight per actor; results as they finish."""
        ray = self.ray
        pending: dict[Any, tuple[int, Any]] = {}  # reference -> (batch index, actor)
        queue = list(enumerate(items))
        free = [actor for actor in self.actors for _ in range(2)]
        while queue or pending:
            while queue and free:
                index, item = queue.pop(0)
                actor = free.pop(0)
                pending[actor.run.remote(function, item)] = (index, actor)
            ready, _ = ray.wait(list(pending), num_returns=1)
            for reference in ready:
                index, actor = pending.pop(reference)
                result = self._get(reference, f"on batch {index}")
                free.append(actor)
                yield index, result


def gpu_share(settings: Settings, gpus_per_worker: float | None) -> float:
    """The GPU share each actor asks for: none unless the settings name a CUDA device (or "auto")."""
    if not needs_cuda(settings.model.device):
        if gpus_per_worker is not None:
            raise UserError("--gpus-per-worker needs a CUDA device: add --device cuda (or auto)")
        return 0.0
    share = 1.0 if gpus_per_worker is None else float(gpus_per_worker)
    if share <= 0:
        raise UserError(f"--gpus-per-worker must be more than 0, got {share:g}")
    return share


def _cause(error: BaseException) -> str:
    """One line naming what went wrong on the worker. An error the worker's own code raised is named by its own
    message: a failed batch carries it as `cause`; an actor that died in `__init__` ends Ray's traceback with
    it ("RuntimeError: ..."). Anything else (a lost node, say) by Ray's own first line."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException) and str(cause).strip():
        return str(cause).strip().splitlines()[0]
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if getattr(error, "actor_init_failed", False):
        return lines[-1].split(": ", 1)[-1]
    return lines[0]
