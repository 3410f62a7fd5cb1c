"""Benchmark: attribute() against one forward pass and against dense scoring.

Prints medians over 20 prompts of 5–30 tokens, all measured in this run. Usage:
    .venv/bin/python bench/bench_attribute.py [--model gemma-3-270m] [--device cuda] [--dense-prompts 3] [--repeats 3]
        [--json FILE]
On a GPU, times are taken after synchronising and the peak is the device's allocated memory. `--json` writes the
figures (each step as a multiple of the forward pass) for bench/summary.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

import neuron_attribution as na
from neuron_attribution import attribute
from neuron_attribution.pipelines.queries import query_scores
from neuron_attribution.pipelines.score import score_neurons
from neuron_attribution.scoring.context import value_context
from neuron_attribution.scoring import value
from neuron_attribution.model.trace import trace_token_ids

PROMPTS = [
    "The capital of France is",
    "Tim Duncan plays the sport of",
    "The official language of Brazil is",
    "The Eiffel Tower is located in the city of",
    "Bananas are usually the colour",
    "The month after March is",
    "In arithmetic, two plus two equals",
    "The Great Wall is a famous landmark in the country of",
    "In Japan, most people speak the language called",
    "The largest planet in our solar system is",
    "After a long winter, the first month of spring in the northern hemisphere is usually",
    "Lionel Messi, who was born in Rosario and became one of the best footballers of all time, plays the sport of",
    "The chemical symbol for gold is",
    "Berlin is the capital city of",
    "Snow is white and grass is",
    "The number of days in a week is",
    "Shakespeare wrote his plays in the language of",
    "If you mix blue and yellow paint together, the colour you get is",
    "The company that makes the iPhone is called",
    "Madrid, with its museums, parks and long history as a royal seat, is the capital of the country of",
]


def synchronise() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        synchronise()
        start = time.perf_counter()
        function()
        synchronise()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-prompts", type=int, default=3, help="dense scoring is slow: on this many prompts")
    parser.add_argument("--model", default=None, help="default: the offline SmolLM2-135M-Instruct")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts")
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--quantization", default=None, help="load the model quantized: bnb-4bit, bnb-8bit, ...")
    args = parser.parse_args()

    model = na.load_model(args.model, device=args.device, quantization=args.quantization)
    if args.quantization:
        model.name = f"{model.name} ({args.quantization})"
    device = model.device
    tokenizer = model.tokenizer
    prompts = PROMPTS[: args.prompts]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    print(f"model: {model.name} on {device}; {len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens; "
          f"torch threads {torch.get_num_threads()}")
    attribute(model, PROMPTS[0], top_k=100)  # float32 weight copies are made once per model
    rss_before = peak_mb(device)

    forward, top100, top300, evaluated100, evaluated300, queries, chosen = [], [], [], [], [], [], []
    contrastive, via, three_tokens, one_token = [], {"attention": [], "ffn": [], "both": []}, [], []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]], device=device)
        with torch.inference_mode():
            forward.append(timed(lambda: model.hf_model(ids), args.repeats))
        top100.append(timed(lambda: attribute(model, prompt, top_k=100), args.repeats))
        top300.append(timed(lambda: attribute(model, prompt, top_k=300), args.repeats))
        r100, r300 = attribute(model, prompt, top_k=100), attribute(model, prompt, top_k=300)
        trace = trace_token_ids(model, [ids[0].tolist()])[0]
        queries.append(timed(lambda: query_scores(model, trace, r100.ffn_neurons[:30], r100.attention_neurons[:30]),
                             args.repeats))
        twenty = [n.index for n in r100.ffn_neurons[:10]] + [n.index for n in r100.attention_neurons[:10]]
        chosen.append(timed(lambda: score_neurons(model, prompt, None, twenty), args.repeats))
        second = r100.predictions[1].id  # contrast: the runner-up
        contrastive.append(timed(lambda: attribute(model, prompt, r100.target.id, top_k=100, contrast=second),
                                 args.repeats))
        for path, times in via.items():
            times.append(timed(lambda: query_scores(model, trace, r100.ffn_neurons[:30], r100.attention_neurons[:30],
                                                    path), args.repeats))
        answer = [r100.target.id, r100.predictions[1].id, r100.predictions[2].id]  # any three tokens
        three_tokens.append(timed(lambda: attribute(model, prompt, answer, top_k=100, answer_tokens="all"),
                                  args.repeats))
        one_token.append(timed(lambda: attribute(model, prompt, answer[:1], top_k=100, answer_tokens="all"),
                               args.repeats))
        evaluated100.append((r100.evaluated["ffn"] + r100.evaluated["attention"]) / 200)
        evaluated300.append((r300.evaluated["ffn"] + r300.evaluated["attention"]) / 600)
    attribution_peak = peak_mb(device) - rss_before

    dense = []
    for prompt in prompts[: args.dense_prompts]:
        ids = tokenizer(prompt)["input_ids"]

        def dense_scoring():
            trace = trace_token_ids(model, [ids])[0]
            ctx = value_context(model, trace, int(trace.logits.argmax()))
            value.dense_ffn_scores(ctx)
            value.dense_attention_scores(ctx)

        start = time.perf_counter()
        dense_scoring()
        dense.append(time.perf_counter() - start)

    median = statistics.median
    ratio100 = median(t / f for t, f in zip(top100, forward))
    ratio300 = median(t / f for t, f in zip(top300, forward))
    dense_ratio = median(d / t for d, t in zip(dense, top100)) if dense else float("nan")
    print(f"forward pass (transformers, eager attention):   median {median(forward) * 1e3:8.1f} ms")
    print(f"attribute(top_k=100):                         median {median(top100) * 1e3:8.1f} ms  "
          f"= {ratio100:.1f}x forward (median of per-prompt ratios)")
    print(f"attribute(top_k=300):                         median {median(top300) * 1e3:8.1f} ms  "
          f"= {ratio300:.1f}x forward")
    print(f"query neurons and layers (top-30 value neurons of each kind): median {median(queries) * 1e3:.1f} ms  "
          f"= {median(q / f for q, f in zip(queries, forward)):.2f}x forward")
    print(f"score_neurons, 20 chosen neurons (10 FFN + 10 attention): median {median(chosen) * 1e3:.1f} ms  "
          f"= {median(c / f for c, f in zip(chosen, forward)):.2f}x forward")
    print(f"contrastive attribute(top_k=100, contrast=runner-up): median {median(contrastive) * 1e3:.1f} ms  "
          f"= {median(c / f for c, f in zip(contrastive, forward)):.2f}x forward")
    print("query scoring by path (top-30 value neurons):      " + ", ".join(
        f"{path} {median(q / f for q, f in zip(times, forward)):.2f}x" for path, times in via.items()) + " forward")
    print(f"answer_tokens='all', 3 tokens vs 1 token:          median {median(three_tokens) * 1e3:.1f} ms vs "
          f"{median(one_token) * 1e3:.1f} ms = {median(t / o for t, o in zip(three_tokens, one_token)):.2f}x "
          f"(target <= 3x)")
    if dense:
        print(f"dense, every neuron ({len(dense)} prompts):              median {median(dense):8.1f} s    "
              f"= {dense_ratio:.0f}x attribute(top_k=100)")
    else:
        print("dense, every neuron: skipped (--dense-prompts 0)")
    print(f"neurons scored exactly per neuron returned:     top-100 {median(evaluated100):.2f}, "
          f"top-300 {median(evaluated300):.2f} (median)")
    what = "peak allocated growth" if device.type == "cuda" else "peak RSS growth"
    print(f"attribution peak memory above the loaded model: {max(attribution_peak, 0):.0f} MB ({what})")
    if args.json:
        ratios = {"top100": ratio100, "top300": ratio300,
                  "score_neurons": median(c / f for c, f in zip(chosen, forward)),
                  "contrast": median(c / f for c, f in zip(contrastive, forward)),
                  "query": median(q / f for q, f in zip(queries, forward))}
        figures = {"bench": "attribute", "model": model.name, "device": device_name(device), "prompts": len(prompts),
                   "forward_ms": median(forward) * 1e3, "ratios_to_forward": ratios,
                   "evaluated_per_returned": median(evaluated100), "peak_mb": max(attribution_peak, 0)}
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
