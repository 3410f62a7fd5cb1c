"""The cache of converted models: GGUF files dequantised once into safetensors directories, and the joined
Gemma file. An entry is keyed by what determines its bytes — the source file's content hash and the versions
of transformers, gguf and this project's conversion — never by where the source lives, so every virtual
environment with the same packages shares one entry, and a changed source can never be served stale.

Hashing a file costs about a second per 300 MB, so each file's hash is remembered beside the cache, keyed by
its device, inode, size, modification and change times. The change time (ctime) is set by the kernel on every
write and cannot be set back from user space, so a remembered hash is only reused for bytes that did not
change. Entries are written to a temporary directory and renamed into place: a crash leaves no half entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import UserError
from ..files import write_json

try:
    import fcntl
except ImportError:  # no flock: `cache` cannot tell a conversion in progress from an interrupted one
    fcntl = None

CONVERSION_FORMAT = 2  # bump when the conversion below changes what an entry holds
COMPLETE_MARKER = "neuron-attribution-cache.json"
_HASHES = "content-hashes.json"
_HASH_BLOCK = 1 << 20


def cache_root() -> Path:
    configured = os.environ.get("NEURON_ATTRIBUTION_CACHE")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("neuron-attribution"))


def content_sha256(path: Path) -> str:
    """The file's sha256, remembered per (device, inode, size, mtime, ctime) in the cache root."""
    stat = path.stat()
    fingerprint = [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]
    memory_file = cache_root() / _HASHES
    memory = _read_hashes(memory_file)
    key = str(path.resolve())
    held = memory.get(key)
    if held and held.get("fingerprint") == fingerprint:
        return held["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(_HASH_BLOCK), b""):
            digest.update(block)
    memory = {k: v for k, v in _read_hashes(memory_file).items() if Path(k).exists()}  # forget deleted files
    memory[key] = {"fingerprint": fingerprint, "sha256": digest.hexdigest()}
    try:
        write_json(memory_file, memory)
    except UserError:
        pass  # an unwritable cache only costs hashing again
    return digest.hexdigest()


def _read_hashes(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def conversion_versions() -> dict[str, str]:
    """What changes the dequantised bytes besides the source: transformers and gguf read and convert it."""
    return {"transformers": _version("transformers"), "gguf": _version("gguf"), "format": str(CONVERSION_FORMAT)}


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "absent"


@contextmanager
def being_written(path: Path) -> Iterator[None]:
    """Hold an flock on a staging directory or file (`.staging-…`, `.join-…`, `.download-…`) while it is being
    written, so that `cache --stale`/`--clear` in another process leaves it alone (`is_being_written`). The
    kernel drops the lock with the process, so a crashed conversion's leftovers read as unfinished again."""
    if fcntl is None:
        yield
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def is_being_written(path: Path) -> bool:
    """Whether another process holds `being_written` on `path`."""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(descriptor)


def _check_converted(staging: Path) -> None:
    """A UserError unless the conversion's files are in `staging`: it can have been removed meanwhile by a
    `cache --clear` of a version without `being_written`, and an entry holding only its marker must never be
    published."""
    if not any(staging.glob("*.safetensors")):
        raise UserError(f"the conversion in {staging} was removed while it ran; nothing was cached, run the "
                        "command again")


def dequantised(gguf_path: Path, convert: Callable[[Path, Path], None]) -> Path:
    """The cache directory holding `gguf_path` dequantised by `convert(gguf_path, directory)`; made now if no
    entry for these bytes and versions exists."""
    sha256 = content_sha256(gguf_path)
    versions = conversion_versions()
    key = hashlib.sha256(json.dumps([sha256, versions], sort_keys=True).encode()).hexdigest()[:16]
    target = cache_root() / f"{gguf_path.stem}-{key}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Dequantising {gguf_path.name} once into {target} (about 30 s; later loads are fast)...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        with being_written(staging):
            convert(gguf_path, staging)
            _check_converted(staging)
            write_json(staging / COMPLETE_MARKER, {"source": str(gguf_path.resolve()), "sha256": sha256,
                                                   "versions": versions, "created": time.time()})
            _check_converted(staging)
            try:
                os.rename(staging, target)
            except OSError:
                if not (target / COMPLETE_MARKER).is_file():  # not another process finishing first
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Cached in {time.perf_counter() - started:.0f} s.", file=sys.stderr, flush=True)
    return target


# --- listing and removing entries -------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheEntry:
    name: str  # the entry's directory (or file) name in the cache root
    kind: str  # what it holds
    size: int  # bytes on disk
    detail: str  # its source and versions, or why it is stale
    stale: bool = False  # never used again by any version of this project
    in_use: bool = False  # being written by a running process: never removed


def cache_entries() -> list[CacheEntry]:
    """Every entry of the cache root, largest first."""
    root = cache_root()
    if not root.is_dir():
        return []
    entries = [_describe(path) for path in root.iterdir() if path.name != _HASHES]
    return sorted(entries, key=lambda e: -e.size)


def _describe(path: Path) -> CacheEntry:
    size = _size(path)
    if path.name.startswith((".staging-", ".join-", ".download-")):
        if is_being_written(path):
            return CacheEntry(path.name, "being written", size, "a conversion running in another process",
                              in_use=True)
        return CacheEntry(path.name, "unfinished", size, "left by an interrupted conversion", stale=True)
    marker = path / COMPLETE_MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        if "sha256" not in data:
            return CacheEntry(path.name, "dequantised model, old format", size, "keyed by path; never used again",
                              stale=True)
        versions = data.get("versions", {})
        current = versions == conversion_versions()
        detail = (f"{Path(data.get('source', '?')).name} sha256 {data['sha256'][:12]}…, transformers "
                  f"{versions.get('transformers')}, gguf {versions.get('gguf')}"
                  + ("" if current else "; other versions than these, not used by them"))
        return CacheEntry(path.name, "dequantised model", size, detail)
    if path.is_dir() and any(p.suffix == ".gguf" for p in path.iterdir()):
        return CacheEntry(path.name, "GGUF source", size, ", ".join(p.name for p in path.iterdir()))
    return CacheEntry(path.name, "unknown", size, "not made by this version")


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def remove_entry(name: str) -> CacheEntry:
    """Remove one entry by its name; a UserError names the entries there are if `name` is not one."""
    entries = {e.name: e for e in cache_entries()}
    if name not in entries or "/" in name or name in (".", ".."):
        known = ", ".join(entries) or "none"
        raise UserError(f"no cache entry {name!r} in {cache_root()}; entries: {known}")
    path = cache_root() / name
    if entries[name].in_use or is_being_written(path):
        raise UserError(f"cache entry {name!r} is being written by another process; it was left alone")
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    return entries[name]
