"""Loading: local directories, the GGUF cache, and every kind of bad input the issue names."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


from neuron_attribution import UserError, load_model
from neuron_attribution.model.default_model import default_model_gguf
from neuron_attribution.model.model_cache import cache_root

from .conftest import tiny_llama


@pytest.fixture(scope="module")
def saved_tiny_llama(tmp_path_factory, real_model) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama()
    model.hf_model.save_pretrained(directory)
    real_model.tokenizer.save_pretrained(directory)
    return directory


def test_local_directory_round_trip(saved_tiny_llama):
    original = tiny_llama()
    loaded = load_model(saved_tiny_llama)
    assert loaded.shape == original.shape
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad():
        assert torch.allclose(loaded.hf_model(ids).logits, original.hf_model(ids).logits, atol=1e-6)
    assert "local directory" in loaded.source


def test_pickle_checkpoint_refused_without_opt_in(saved_tiny_llama, tmp_path):
    directory = tmp_path / "pickled"
    shutil.copytree(saved_tiny_llama, directory)
    state = {k: v for k, v in tiny_llama().hf_model.state_dict().items()}
    (directory / "model.safetensors").unlink()
    torch.save(state, directory / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickle"):
        load_model(directory)
    with pytest.raises(UserError, match="pickle"):
        load_model(directory / "pytorch_model.bin")
    loaded = load_model(directory, allow_pickle=True)
    assert loaded.shape.n_layers == 3


def test_directory_without_weights(saved_tiny_llama, tmp_path):
    directory = tmp_path / "empty"
    directory.mkdir()
    shutil.copy(saved_tiny_llama / "config.json", directory)
    with pytest.raises(UserError, match="no model weights"):
        load_model(directory)


def test_truncated_safetensors(saved_tiny_llama, tmp_path):
    directory = tmp_path / "truncated"
    shutil.copytree(saved_tiny_llama, directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot load model weights"):
        load_model(directory)


def test_truncated_gguf_leaves_cache_untouched(tmp_path, cli, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(default_model_gguf(cache_root()).read_bytes()[: 1 << 20])
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEURON_ATTRIBUTION_CACHE", str(cache))
    result = cli("info", "--model", str(broken))
    assert result.returncode == 2
    assert "cannot read GGUF file" in result.stderr
    assert "Traceback" not in result.stderr
    # no half-written entry, no staging directory: only the remembered hash of the file
    assert [p.name for p in cache.iterdir()] == ["content-hashes.json"]


def test_unsupported_architecture(tmp_path):
    """A state-space model: no attention and FFN blocks to read."""
    from transformers import MambaConfig, MambaForCausalLM
    config = MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=4)
    MambaForCausalLM(config).save_pretrained(tmp_path)
    from neuron_attribution.model.adapters import ADAPTERS

    supported = ", ".join(sorted(ADAPTERS))  # the registry: adding a family touches no list here
    assert "mamba" not in ADAPTERS and {"llama", "gpt2", "gemma3_text", "falcon"} <= set(ADAPTERS)
    lacks = r"\(state-space layers, not attention: no attention neurons to read\)"
    with pytest.raises(UserError, match=f"unsupported architecture 'mamba' {lacks}; supported: {supported}$"):
        load_model(tmp_path)


@pytest.mark.parametrize("name, message", [
    ("./no/such/dir", "no such model path"),
    ("missing.gguf", "no such file"),
    ("someone/not-a-cached-model", "not in the local Hugging Face cache"),
])
def test_unknown_models(name, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=message):
        load_model(name)


def test_cli_reports_bad_model_in_one_line(cli):
    result = cli("info", "--model", "./no/such/dir")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no such model path: ./no/such/dir"


def test_default_model_info_json(tmp_path, real_model, cli):
    out = tmp_path / "info.json"
    result = cli("info", "--json", str(out))
    assert result.returncode == 0, result.stderr
    import json

    info = json.loads(out.read_text())
    assert (info["family"], info["layers"], info["heads"], info["kv_heads"]) == ("llama", 30, 9, 3)
    assert (info["hidden_size"], info["ffn_neurons_per_layer"], info["vocab_size"]) == (576, 1536, 49152)
    assert info["attention_neurons_per_token"] == 30 * 9 * 64
    assert info["long_prompts"].startswith("fast attention (SDPA)")
    assert "SmolLM2" in info["source"]


# --- Gemma 3 270M from its PyPI chunk packages ------------------------------------------------------------------

def test_gemma_chunks_joined_checked_and_terms_shown(tmp_path, capsys):
    from neuron_attribution.model import gemma_model
    joined = gemma_model.gemma_gguf(tmp_path)
    assert joined == tmp_path / "gemma-3-270m" / gemma_model.FILE
    assert "Gemma Terms of Use" in capsys.readouterr().err
    assert joined.stat().st_size > 200_000_000
    assert gemma_model.gemma_gguf(tmp_path) == joined  # joined once: the second call finds it
    assert "Gemma Terms of Use" not in capsys.readouterr().err
    assert [p.name for p in joined.parent.iterdir()] == [gemma_model.FILE]


def test_gemma_joined_file_with_wrong_sha256_is_refused(tmp_path, monkeypatch):
    from neuron_attribution.model import gemma_model
    monkeypatch.setattr(gemma_model, "_expected_sha256", lambda: "0" * 64)
    with pytest.raises(UserError, match=r"sha256 .* not the published .* refused, nothing cached"):
        gemma_model.gemma_gguf(tmp_path)
    assert list((tmp_path / "gemma-3-270m").iterdir()) == []


def test_gemma_missing_chunk_package_names_the_pip_command(tmp_path, monkeypatch):
    from neuron_attribution.model import gemma_model
    monkeypatch.setattr(gemma_model, "CHUNKS", [*gemma_model.CHUNKS[:3], ("no_such_gemma_part4", "x.part03")])
    with pytest.raises(UserError, match=r"^Gemma 3 270M is not installed .*pip install 'neuron-attribution\[gemma\]'"):
        gemma_model.gemma_gguf(tmp_path)
    assert not (tmp_path / "gemma-3-270m").exists() or not any((tmp_path / "gemma-3-270m").iterdir())
