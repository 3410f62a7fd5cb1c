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

import json
import os
import platform
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

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


@contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold DIR/.lock for the duration: a second run on the same directory is refused at once, naming the
    process that holds it. An exclusive flock, so a lock whose process died (even by SIGKILL) is free again."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: runs are not guarded against each other
        yield
        return
    path = directory / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(f"{directory} is in use by a running run ({holder}); wait for it to finish or "
                            "use another --out directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        yield
        path.unlink(missing_ok=True)  # done with the directory: a finished run leaves no lock file
    finally:
        handle.close()


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
