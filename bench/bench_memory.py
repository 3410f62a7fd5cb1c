"""Benchmark: memory and time of each step on big models, built offline from configs with real shapes and random
weights, in bfloat16, on this CPU (no download; about 14 GB for Llama-2-7B, 16 GB for Llama-3-8B: run one at a
time, nothing else beside it).

For each step: its peak resident memory above the loaded model (the kernel's high-water mark, reset before each
step through /proc/self/clear_refs) and its time as a multiple of one forward pass. Usage:
    .venv/bin/python bench/bench_memory.py [--shape llama-2-7b|llama-3-8b|small] [--tokens 12] [--json FILE]
        [--quantization bnb-4bit --directory DIR]

With --quantization the random model is saved once to DIR (safetensors, with a word-level tokenizer; about 14 GB
for Llama-2-7B) and loaded from there as a user would, quantized while loading: `load_model(DIR, dtype="bfloat16",
quantization=...)` (about 4 GB for Llama-2-7B in 4-bit).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-2-7B: 32 layers, hidden 4,096, FFN 11,008, 32 heads, vocabulary 32,000 (13.5 GB in bfloat16)
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    # Llama-3-8B: grouped-query attention with 8 KV heads, FFN 14,336, vocabulary 128,256 (16 GB)
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    # a quick check of the script itself
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048),
}


def resident_mb() -> float:
    return _status_kb("VmRSS") / 1024


def anonymous_mb() -> float:
    """Resident memory not backed by a file: what the process itself holds. transformers leaves a loaded
    checkpoint's safetensors file mapped, and the pages loading read stay resident (and counted in VmRSS) until
    the kernel needs them back; they are clean file pages, not memory the model holds."""
    return _status_kb("RssAnon") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def build(shape: str):
    """A random-weight Llama of the given shape in bfloat16, made in place (no float32 detour)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuron_attribution import LoadedModel

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        generator = torch.Generator().manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.fill_(1.0)
                else:
                    parameter.normal_(0.0, 0.02, generator=generator)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    return LoadedModel.from_hf(model, name=f"random {shape}")


def saved(shape: str, directory: Path) -> Path:
    """The random model of `shape` saved in `directory` (made once), with a tokenizer so that it loads as any
    model directory does."""
    if (directory / "config.json").is_file():
        return directory
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = build(shape)
    model.hf_model.save_pretrained(directory)
    words = {f"w{i}": i for i in range(SHAPES[shape]["vocab_size"] - 1)} | {"[UNK]": SHAPES[shape]["vocab_size"] - 1}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(directory)
    return directory


def load_quantized(shape: str, directory: Path, quantization: str):
    from neuron_attribution import load_model

    return load_model(saved(shape, directory), dtype="bfloat16", quantization=quantization)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    parser.add_argument("--tokens", type=int, default=12, help="prompt length")
    parser.add_argument("--json", default=None)
    parser.add_argument("--quantization", default=None, help="load the model quantized (bnb-4bit, bnb-8bit, ...)")
    parser.add_argument("--directory", type=Path, default=None, help="where the random model is saved (with "
                        "--quantization)")
    args = parser.parse_args()
    if args.quantization and args.directory is None:
        parser.error("--quantization needs --directory")
    if args.quantization:
        saved(args.shape, args.directory)  # in a process of its own would be cleaner; freed before measuring

    from neuron_attribution import attribute, score_neurons
    from neuron_attribution.datasets import Fact
    from neuron_attribution.model.prompts import Sentence
    from neuron_attribution.pipelines.evaluate import evaluate_sentences

    import gc

    gc.collect()
    before, anonymous_before = resident_mb(), anonymous_mb()
    started = time.perf_counter()
    model = load_quantized(args.shape, args.directory, args.quantization) if args.quantization else build(args.shape)
    loaded, model_anonymous = resident_mb(), anonymous_mb() - anonymous_before
    print(f"{model.name}: built in {time.perf_counter() - started:.0f} s; resident {loaded:.0f} MB "
          f"({loaded - before:.0f} MB for the model, {model_anonymous:.0f} MB of it not file pages); torch threads "
          f"{torch.get_num_threads()}", flush=True)
    ids = torch.randint(100, 30000, (args.tokens,), generator=torch.Generator().manual_seed(1)).tolist()

    def forward():
        with torch.inference_mode():
            return model.hf_model(torch.tensor([ids])).logits[0, -1]

    target = int(forward().argmax())
    n_layers = model.shape.n_layers
    figures: dict[str, dict] = {}
    steps = [
        ("forward", forward),
        ("attribute(top_k=100) with query neurons", lambda: attribute(model, ids, target, top_k=100)),
        ("score_neurons (10 neurons)", lambda: score_neurons(
            model, ids, target, [f"{layer % n_layers}_{7 * layer}" for layer in range(5)] +
            [f"{layer % n_layers}_1_{layer}@{args.tokens - 1}" for layer in range(5)])),
        ("evaluate, one sentence (value protocol, top 30)", lambda: evaluate_sentences(
            model, [Sentence(Fact("", "", "t", "bench", 0), ids, target)], protocol="value", top=30)),
    ]
    for name, step in steps:
        reset_peak()
        base = resident_mb()
        started = time.perf_counter()
        step()
        seconds = time.perf_counter() - started
        figures[name] = {"seconds": seconds, "peak_above_model_mb": peak_mb() - loaded, "peak_above_start_mb":
                         peak_mb() - base}
        ratio = seconds / figures["forward"]["seconds"]
        print(f"{name:50s} {seconds:7.1f} s = {ratio:5.1f}x forward; peak {figures[name]['peak_above_model_mb']:7.0f}"
              f" MB above the loaded model", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": "memory", "shape": args.shape, "tokens": args.tokens,
                                               "quantization": args.quantization, "model_mb": loaded - before,
                                               "model_anonymous_mb": model_anonymous,
                                               "steps": figures}, indent=1))


if __name__ == "__main__":
    main()
