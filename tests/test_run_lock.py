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

from .conftest import run_cli, tiny_llama

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


def test_a_lock_file_replaced_after_it_was_opened_is_not_taken(tmp_path):
    """The interleaving that let two runs hold one directory: A opens .lock; B, the holder, finishes (unlinks
    it while still holding it, then closes); C creates and locks a new .lock. A's flock on the old file now
    succeeds — and must be seen as stale, since it is not the file at DIR/.lock."""
    import fcntl

    from neuron_attribution.pipelines import run_store

    directory = tmp_path / "run"
    with run_lock(directory):
        opened_by_a = open(directory / LOCK_FILE, "a+", encoding="utf-8")
    with run_lock(directory):  # C holds the new file
        try:
            assert run_store._try_lock(opened_by_a, directory / LOCK_FILE) == "stale"
            fcntl.flock(opened_by_a, fcntl.LOCK_UN)
            with pytest.raises(UserError, match="is in use by a running run"):  # and the directory stays C's
                with _as_another_process(directory):
                    pass
        finally:
            opened_by_a.close()


def _as_another_process(directory: Path):
    """run_lock as another process would take it: not through this process's re-entrant registry."""
    from neuron_attribution.pipelines import run_store

    class _Other:
        def __enter__(self):
            self.handle = run_store._acquire(directory)

        def __exit__(self, *exc):
            if self.handle is not None:
                self.handle.close()
    return _Other()


LOOPER = """
import sys, time
from pathlib import Path
from neuron_attribution.errors import UserError
from neuron_attribution.pipelines.run_store import run_lock
directory, marker, rounds = Path(sys.argv[1]), Path(sys.argv[1]) / "inside", int(sys.argv[2])
entered = overlaps = 0
deadline = time.time() + 60
while entered < rounds and time.time() < deadline:
    try:
        with run_lock(directory):
            entered += 1
            if marker.exists():
                overlaps += 1
            marker.touch()
            time.sleep(0.0005)
            marker.unlink()
    except UserError:
        pass
print(entered, overlaps)
"""


def test_two_processes_taking_and_releasing_the_lock_never_overlap(tmp_path):
    """Two processes enter and leave the lock of one directory 150 times each as fast as they can (each exit
    unlinks the lock file while holding it): never both inside at once."""
    directory = tmp_path / "run"
    directory.mkdir()
    loops = [subprocess.Popen([sys.executable, "-c", LOOPER, str(directory), "150"], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [tuple(int(x) for x in loop.communicate(timeout=120)[0].split()) for loop in loops]
    assert all(entered == 150 for entered, _ in results), results
    assert all(overlaps == 0 for _, overlaps in results), results


def test_only_would_block_means_in_use(tmp_path, monkeypatch):
    """A filesystem without flock (ENOLCK) is not "in use" for ever: the run goes ahead, with a warning."""
    import errno

    from neuron_attribution.pipelines import run_store

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_store.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="not guarded against each other"):
        with run_lock(tmp_path / "run"):
            entered = True
    assert entered


def test_run_and_analyze_are_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """`run` checks the lock before loading the model (under load that took 20 s before a second run was
    refused), and `analyze` takes the lock too (`run --overwrite` deletes analysis/)."""
    from neuron_attribution.cli import datasets as cli_datasets
    from neuron_attribution.pipelines.analyze import analyze_run

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_datasets, "load_driver_model", must_not_load)
    directory = tmp_path / "run"
    directory.mkdir()
    holder = _hold(directory)
    try:
        code, _, err = run_cli(monkeypatch, capsys, "run", "--dataset", "sample", "--out", str(directory))
        assert code == 2 and f"is in use by a running run (pid {holder.pid} on" in err, err
        assert len(err.strip().splitlines()) == 1
        with pytest.raises(UserError, match="is in use by a running run"):
            analyze_run(directory)
        code, _, err = run_cli(monkeypatch, capsys, "analyze", str(directory))
        assert code == 2 and "is in use by a running run" in err, err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in directory.iterdir()) == [LOCK_FILE]  # the refused calls wrote nothing
