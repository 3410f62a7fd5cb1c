"""A run directory is used by one run at a time (#23 item 5): a second run is refused at once, naming the
process that holds it; a lock whose process was killed is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuron_attribution import UserError
from neuron_attribution.pipelines.run import RunArguments, run_dataset
from neuron_attribution.pipelines.run_store import LOCK_FILE, run_lock

from .conftest import tiny_llama

HOLDER = """
import sys, time
from pathlib import Path
from neuron_attribution.pipelines.run_store import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold(directory: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    holder = _hold(directory)
    try:
        with pytest.raises(UserError, match=rf"is in use by a running run \(pid {holder.pid} on "):
            run_dataset(tiny_llama(), directory, RunArguments(str(tmp_path / "facts.jsonl"), None, "skip"))
        assert (directory / LOCK_FILE).exists()  # the refused call touched nothing of the holder's
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert (directory / LOCK_FILE).exists()  # left behind by the killed run ...
    started = time.perf_counter()
    with run_lock(directory):  # ... and free: the kernel released it with the process
        assert f"pid {os.getpid()} " in (directory / LOCK_FILE).read_text()
    assert time.perf_counter() - started < 5
    assert not (directory / LOCK_FILE).exists()  # a finished holder removes its lock file


def test_lock_is_released_when_the_run_fails(tmp_path):
    directory = tmp_path / "run"
    with pytest.raises(UserError):  # no such dataset
        run_dataset(tiny_llama(), directory, RunArguments(str(tmp_path / "missing.jsonl"), None, "skip"))
    assert not directory.exists()  # nothing worth keeping: no directory, no lock file left
    with run_lock(tmp_path):
        pass
