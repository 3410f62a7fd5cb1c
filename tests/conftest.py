"""Models for the tests: tiny random GPT-2 and Llama-with-GQA built from configs, and the real default model."""

from __future__ import annotations

import os

from neuron_attribution.cli import quiet_import_chatter

quiet_import_chatter()  # before torch: importing the library imports torchao, whose warnings reach a worker's stderr

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from neuron_attribution import LoadedModel, load_model

from .tiny_families import FAMILIES, OTHER_FAMILIES, TINY_VOCAB  # noqa: F401  (re-exported to the tests)

MOST_WORKERS = 4  # each worker holds its own models (SmolLM2, Gemma 3 270M): a few GB each at most

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Workers share the cores: torch's default is a thread per core in every worker, which oversubscribes them
    # (measured on 2 cores: the quick tier took 5 min in 2 workers at torch's default, 2 min at a thread each).
    # The processes a test starts get the same count through OMP_NUM_THREADS, which torch reads at start-up: the
    # thread count changes how a product's sums are split, so a run resumed in a subprocess is bit-identical to
    # the worker's own run only when both use the same count.
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)


# Tests that start Ray clusters run one after another in one worker: `ray stop --force`, which joining a cluster by
# address needs, ends every Ray cluster of the machine, another worker's too.
RAY_GROUP = pytest.mark.xdist_group("ray")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a worker per core, at most MOST_WORKERS; none where the command names
    single tests (file::test), whose few seconds would go to starting workers."""
    if any("::" in str(argument) for argument in config.args):
        return 0
    return max(1, min(MOST_WORKERS, os.cpu_count() or 1))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random biases and norm gains too, so that every bias and gain in the decomposition is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "ln" in name or "norm" in name:
                parameter.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                parameter.copy_(0.3 * noise if parameter.dim() > 1 else 0.1 * noise)


def tiny_gpt2() -> LoadedModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=32, n_inner=48, vocab_size=TINY_VOCAB, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    _randomise(model, 1)
    return LoadedModel.from_hf(model, name="tiny-gpt2")


_SWIGLU_FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_llama_like(family: str, n_layers: int = 2, seed: int = 4) -> LoadedModel:
    """Llama with grouped-query attention (2 KV heads for 4 query heads), and Mistral and Qwen2 (q/k/v
    biases), which the Llama adapter covers."""
    config_class, model_class = _SWIGLU_FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(hidden_size=32, intermediate_size=40, num_hidden_layers=n_layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
                          tie_word_embeddings=False, head_dim=8)
    model = model_class(config)
    _randomise(model, seed)
    return LoadedModel.from_hf(model, name=f"tiny-{family}")




def tiny_family(family: str, parallel: bool = True, seed: int = 6) -> LoadedModel:
    """A tiny random model of one of the registry's families (tests/tiny_families.py; gpt_neox with
    `parallel=False`: its sequential block)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    if family == "gpt_neox" and not parallel:
        family = "gpt_neox_sequential"
    model = AutoModelForCausalLM.from_config(FAMILIES[family].config())
    _randomise(model, seed)
    model.eval()
    return LoadedModel.from_hf(model, name=f"tiny-{family}")


def save_with_tokenizer(hf_model, directory, words=("The", "capital", "of", "France", "is", "Paris")) -> None:
    """A model directory `--model` loads: the model's weights and a word-level tokenizer of `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf_model.save_pretrained(directory)
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate([*words, "[UNK]"])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(directory)


def tiny_llama() -> LoadedModel:
    return tiny_llama_like("llama", n_layers=3, seed=2)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request) -> LoadedModel:
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """A test that loads the real model is slow whether it says so or not: the quick loop (-m "not slow") runs
    without it. Runs before pytest's own marker selection."""
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    # The slow tests first: run in workers, a minute-long test collected last would run alone at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    return load_model()


PROMPTS = ["The capital of France is", "Tim Duncan plays the sport of", "In 1999, the colour of the sky was",
           "One, two, three,"]


@pytest.fixture(scope="session")
def token_batches() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, TINY_VOCAB, (n,), generator=generator).tolist() for n in (5, 9, 1, 7)]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The console entry point in this process (no interpreter start-up, no second model load): its exit code,
    stdout and stderr."""
    import sys

    from neuron_attribution.cli import main

    monkeypatch.setattr(sys, "argv", ["neuron-attribution", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def cli(monkeypatch, capsys, request):
    """The console entry point in this process, reported as `subprocess.run` reports a process (returncode,
    stdout, stderr): no interpreter start-up, and each model spec is loaded once per session (the default model
    is the session's `real_model`). Exit codes, signals and start-up keep their real-process tests."""
    import subprocess

    from neuron_attribution.model import loading

    real_load = loading.load

    def load_once(spec):
        if spec not in _session_models:
            default = spec.name is None and spec.dtype in (None, "float32") and spec.device in (None, "cpu") \
                and not spec.allow_pickle and not spec.trust_remote_code and spec.quantization is None
            _session_models[spec] = request.getfixturevalue("real_model") if default else real_load(spec)
        return _session_models[spec]

    monkeypatch.setattr(loading, "load", load_once)

    def invoke(*args: str) -> subprocess.CompletedProcess:
        code, out, err = run_cli(monkeypatch, capsys, *args)
        return subprocess.CompletedProcess(["neuron-attribution", *args], code, out, err)

    return invoke


# model spec → the model the in-process CLI loaded for it: each is loaded once in a test session
_session_models: dict = {}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails a test whose command reads a model's files: the errors under test must come before any work."""
    from neuron_attribution.model import loading

    def refuse(name):
        raise AssertionError(f"the model {name or 'default'} was read before the error")

    monkeypatch.setattr(loading, "source_for", refuse)
