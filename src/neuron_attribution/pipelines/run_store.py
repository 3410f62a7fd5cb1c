"""A run directory on disk: claiming it, its parts, merging them, reading it back.

Layout of DIR:
    run.json                    what was run: settings, model shape, dataset, versions, the filter's counts
    filter.json                 every fact with its gold rank and whether the filter kept it
    parts/part-000123/*.parquet one batch of sentences, all six tables; written to a temporary directory and
                                renamed into place, so a part is either complete or absent
    <table>.parquet             the parts merged, once every sentence is done
    .lock                       held (flock) by the process running in DIR; the kernel releases it when that
                                process ends, however it ends, so a killed run leaves no lock behind
"""

from __future__ import annotations

import errno
import json
import os
import platform
import shutil
import socket
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

try:
    import fcntl
except ImportError:  # no flock on this platform: runs are not guarded against each other (a warning says so)
    fcntl = None

from ..version import __version__
from ..errors import UserError
from ..files import write_json
from ..results.tables import TABLES

# What a run writes into its directory (and `--overwrite` removes): nothing else there is touched.
LOCK_FILE = ".lock"
RUN_FILES = ("run.json", "filter.json", "parts", "analysis", *(f"{t}.parquet" for t in TABLES))


def check_can_write(directory: Path) -> None:
    """A UserError now, before anything slow, if `directory` could not be made or written; nothing is created."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot write to {directory}: {existing} is not a directory")
    try:  # a real probe: permission bits do not tell for root, read-only mounts or /proc
        os.rmdir(tempfile.mkdtemp(prefix=".write-test-", dir=existing))
    except OSError as error:
        raise UserError(f"cannot write to {directory}: {error.strerror or error}") from None


def prepare_directory(directory: Path) -> None:
    try:
        (directory / "parts").mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {directory}: {error.strerror or error}") from None


def claim(directory: Path, identity: dict, overwrite: bool = False) -> dict:
    """run.json: created for a new directory; for an existing one, it must describe the same run, unless
    `overwrite`, which removes the other run's files first."""
    path = directory / "run.json"
    if path.exists() and overwrite:
        remove_run(directory)
        (directory / "parts").mkdir(parents=True, exist_ok=True)
    if path.exists():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{path} is unreadable; use an empty --out directory") from None
        differences = [f"{key}: {record.get('identity', {}).get(key)!r} there, {value!r} now"
                       for key, value in identity.items() if record.get("identity", {}).get(key) != value]
        if differences:
            raise UserError(f"{directory} holds a different run ({'; '.join(differences)}); "
                            "use another --out directory, or --overwrite to replace it")
        return record
    if (any(p for p in directory.iterdir() if p.name not in ("parts", LOCK_FILE))
            or any((directory / "parts").iterdir())):
        raise UserError(f"{directory} is not empty and holds no run; use an empty or new --out directory")
    record = {"identity": identity, "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": _versions(), "timings": {}}
    write_json(path, record)
    return record


# Directories whose lock this process holds, by (device, inode), with how many `run_lock` blocks hold each: the
# lock is re-entrant within a process (the CLI takes it before loading the model, `run_dataset` again inside).
_HELD: dict[tuple[int, int], int] = {}
_HELD_GUARD = threading.Lock()


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold DIR/.lock for the duration (creating DIR if needed, and removing it again if it is left empty): a
    second run or analysis of the same directory is refused at once, naming the process that holds it. An
    exclusive flock, so a lock whose process died (even by SIGKILL) is free again. Re-entrant within a process.
    Where the filesystem cannot lock, a warning says that runs there are not guarded against each other."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    key = _directory_key(directory)
    with _HELD_GUARD:
        held_here = key in _HELD
        _HELD[key] = _HELD.get(key, 0) + 1
    try:
        if held_here:
            yield
            return
        handle = _acquire(directory)
        try:
            yield
        finally:
            if handle is not None:
                # Unlinked while still held: a process that opened the old file meanwhile finds, once it has
                # locked it, that it is no longer the file at DIR/.lock, and starts again (`_try_lock`).
                (directory / LOCK_FILE).unlink(missing_ok=True)
                handle.close()
    finally:
        with _HELD_GUARD:
            _HELD[key] -= 1
            if not _HELD[key]:
                del _HELD[key]
        if created and not held_here:
            with suppress(OSError):
                directory.rmdir()  # only if empty: nothing was written


def _directory_key(directory: Path) -> tuple[int, int]:
    status = directory.stat()
    return status.st_dev, status.st_ino


def _acquire(directory: Path):
    """The open, locked DIR/.lock with this process named in it; None where locks are not supported here."""
    path = directory / LOCK_FILE
    if fcntl is None:
        _warn_unguarded(directory, OSError("this platform has no flock"))
        return None
    for _ in range(100):
        try:
            handle = open(path, "a+", encoding="utf-8")
        except OSError as error:
            _warn_unguarded(directory, error)
            return None
        state = _try_lock(handle, path)
        if state == "locked":
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            handle.flush()
            return handle
        if state == "busy":
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{directory} is in use by a running run ({holder}); wait for it to finish or "
                            "use another --out directory")
        handle.close()
        if state == "unsupported":
            _warn_unguarded(directory, OSError(f"this filesystem does not support flock on {path}"))
            return None
    raise UserError(f"could not lock {path}: it was replaced 100 times while being locked")


def _try_lock(handle, path: Path) -> str:
    """'locked' (and `handle` is the file at `path`), 'busy' (another process holds it), 'stale' (the file was
    unlinked or replaced after it was opened: open it again) or 'unsupported'."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        return "busy" if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES) else "unsupported"
    opened = os.fstat(handle.fileno())
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return "stale"
    return "locked" if (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino) else "stale"


def _warn_unguarded(directory: Path, error: OSError) -> None:
    warnings.warn(f"cannot lock {directory} ({error.strerror or error}); runs there are not guarded against each "
                  "other", stacklevel=4)


def remove_run(directory: Path, including_lock: bool = False) -> None:
    """Remove what a run wrote into `directory` (and the directory, if nothing else is left). The lock file
    stays unless `including_lock` (its holder is done with the directory)."""
    for name in RUN_FILES + ((LOCK_FILE,) if including_lock else ()):
        path = directory / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for leftover in directory.glob(".*.parquet.*"):
        leftover.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty: the user's own files stay


def _versions() -> dict:
    import torch
    import transformers

    return {"neuron_attribution": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pa.__version__, "python": platform.python_version()}


def completed_ids(parts: Path) -> set[int]:
    """Sentence ids held by complete, readable parts. Leftover temporary directories and parts with an
    unreadable table are removed, so their sentences are attributed again."""
    done: set[int] = set()
    for part in sorted(parts.iterdir()):
        if not part.name.startswith("part-"):
            shutil.rmtree(part, ignore_errors=True)
            continue
        try:
            for table in TABLES:
                pq.read_metadata(part / f"{table}.parquet")
            ids = pq.read_table(part / "sentences.parquet", columns=["sentence_id"]).column(0).to_pylist()
        except (OSError, pa.ArrowException):
            shutil.rmtree(part, ignore_errors=True)
            continue
        if done & set(ids):  # cannot happen with atomic parts; never count a sentence twice
            shutil.rmtree(part, ignore_errors=True)
            continue
        done.update(ids)
    return done


def write_part(parts: Path, first_id: int, tables: dict[str, pa.Table]) -> None:
    final = parts / f"part-{first_id:07d}"
    if final.exists():  # already written: a batch is never stored twice
        return
    temporary = parts / f".tmp-{uuid.uuid4().hex}"
    temporary.mkdir()
    try:
        for name, table in tables.items():
            pq.write_table(table, temporary / f"{name}.parquet")
        _fsync_directory(temporary)
        os.rename(temporary, final)
        _fsync_directory(parts)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _fsync_directory(path: Path) -> None:
    for file in [path, *path.iterdir()] if path.is_dir() else [path]:
        try:
            descriptor = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:
            pass
        finally:
            os.close(descriptor)


def merge_parts(directory: Path) -> None:
    for leftover in directory.glob(".*.parquet.*"):  # from a merge that was interrupted
        leftover.unlink(missing_ok=True)
    parts = sorted((directory / "parts").glob("part-*"))
    for table in TABLES:
        merged = pa.concat_tables([pq.read_table(part / f"{table}.parquet") for part in parts],
                                  promote_options="default")
        merged = merged.sort_by([("sentence_id", "ascending")])
        temporary = directory / f".{table}.parquet.{uuid.uuid4().hex}"
        try:
            pq.write_table(merged, temporary)
            os.replace(temporary, directory / f"{table}.parquet")
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def read_run(directory: Path | str) -> dict:
    path = Path(directory) / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{directory} holds no readable run.json; is it a run directory?") from None
    if not record.get("complete"):
        raise UserError(f"the run in {directory} is not finished; run it again with the same arguments to resume")
    return record
