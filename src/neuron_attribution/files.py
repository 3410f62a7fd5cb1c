"""Writing results: atomically (temporary file in the same directory, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    write_chunks_atomic(path, [data])


def write_chunks_atomic(path: Path | str, chunks: Iterable[bytes]) -> None:
    """The chunks, in order, as the file's whole content: written to a temporary file beside it, then renamed, so
    the file is whole or absent; the content is never held in memory at once."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    try:
        with os.fdopen(handle, "wb") as stream:
            for chunk in chunks:
                stream.write(chunk)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; a written file follows the umask
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def write_json(path: Path | str, payload: Any) -> None:
    """`json.dumps(payload, indent=2, ensure_ascii=False)` and a newline, encoded as it goes: every neuron's result
    is a few hundred MB of text, which is never held whole (nor its bytes beside it)."""
    encoder = json.JSONEncoder(indent=2, ensure_ascii=False)
    write_chunks_atomic(path, _batched_utf8(encoder.iterencode(payload)))


def _batched_utf8(pieces: Iterable[str], size: int = 1 << 16) -> Iterator[bytes]:
    """The pieces (json's are a few characters each), UTF-8 encoded in batches of about `size` characters, then a
    final newline."""
    batch: list[str] = []
    length = 0
    for piece in pieces:
        batch.append(piece)
        length += len(piece)
        if length >= size:
            yield "".join(batch).encode("utf-8")
            batch, length = [], 0
    batch.append("\n")
    yield "".join(batch).encode("utf-8")


def read_json_as(path: Path | str, build, what: str):
    """build(the JSON data in `path`), with one UserError for an unreadable file or data that does not fit."""
    try:
        return build(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read {what} from {path}: {error}") from None
