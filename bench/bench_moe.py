"""Benchmark: attribute() on a mixture of experts against a dense model of the same active size.

Three models, all measured in this run on the same prompts (random token ids of 5-30 tokens):
* a Mixtral-shaped mixture with random weights: SmolLM2-135M's attention and sizes (576 hidden, 30 layers, 9
  heads, 3 KV heads, 49152 tokens) and 8 experts of 768 neurons, 2 active per token, so 1536 active FFN neurons
  per layer and token, as in SmolLM2;
* the dense model of the same active size: a Llama of exactly SmolLM2's shape with random weights;
* the offline default model itself (SmolLM2-135M-Instruct, real weights), for the figure the README quotes.

For each: attribute(top_k=100) as a multiple of one forward pass (median of per-prompt ratios, each time the
median of --repeats), and how many neurons were scored exactly per neuron returned. Usage:
    .venv/bin/python bench/bench_moe.py [--prompts 10] [--repeats 3] [--device cuda] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attribute import device_name, timed  # noqa: E402

import neuron_attribution as na  # noqa: E402
from neuron_attribution.model.loaded import LoadedModel  # noqa: E402

SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)


def random_model(config, name: str, device: str | None) -> LoadedModel:
    torch.manual_seed(0)
    hf_model = tf.AutoModelForCausalLM.from_config(config).eval()
    if device:
        hf_model = hf_model.to(device)
    return LoadedModel.from_hf(hf_model, name=name)


def measure(model: LoadedModel, prompts: list[list[int]], repeats: int) -> dict[str, float]:
    ratios, evaluated = [], []
    attribute = na.attribute
    attribute(model, prompts[0], top_k=100)  # warm-up: weights read once
    for ids in prompts:
        tensor = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            forward = timed(lambda: model.hf_model(tensor), repeats)
        top100 = timed(lambda: attribute(model, ids, top_k=100), repeats)
        result = attribute(model, ids, top_k=100)
        ratios.append(top100 / forward)
        evaluated.append((result.evaluated["ffn"] + result.evaluated["attention"]) / 200)
    return {"top100_per_forward": statistics.median(ratios), "evaluated_per_returned": statistics.median(evaluated)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="cpu (default), cuda, ...")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(1)
    lengths = torch.linspace(5, 30, args.prompts).round().int().tolist()
    prompts = [torch.randint(100, 40000, (n,), generator=generator).tolist() for n in lengths]
    models = {
        "mixture (8 experts of 768, 2 active)": lambda: random_model(
            tf.MixtralConfig(**SMOLLM2, intermediate_size=768, num_local_experts=8, num_experts_per_tok=2,
                             router_jitter_noise=0.0), "random-mixtral", args.device),
        "dense, same active size (1536)": lambda: random_model(
            tf.LlamaConfig(**SMOLLM2, intermediate_size=1536), "random-llama", args.device),
        "SmolLM2-135M-Instruct (real weights)": lambda: na.load_model(None, device=args.device),
    }
    print(f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} random tokens; device "
          f"{args.device or 'cpu'}; torch threads {torch.get_num_threads()}")
    figures = {}
    for label, make in models.items():
        model = make()
        figures[label] = measure(model, prompts, args.repeats)
        print(f"{label:40s} attribute(top_k=100) = {figures[label]['top100_per_forward']:.2f}x forward; "
              f"{figures[label]['evaluated_per_returned']:.2f} neurons scored per neuron returned")
        del model
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"bench": "moe", "device": device_name(torch.device(args.device or "cpu")),
                       "prompts": len(prompts), "figures": figures}, file, indent=1)


if __name__ == "__main__":
    main()
