"""Benchmark: every neuron scored at once (`top_k` beyond the model's count, with parts and projections) against
the floor of one vocabulary-sized product and one exp/log pass per neuron, both measured in this run.

The floor is what any exact method pays: each neuron's log-softmax over the vocabulary needs its row of logits
(d·V multiply-adds) and an exp and a log-sum over them. It is timed on batches of the size scoring uses and
scaled to the number of neurons. Also reported: the time to the first progress report (the bar appears from
the start) and the peak resident memory of the process above the loaded model, under the memory budget given.
Usage:
    .venv/bin/python bench/bench_every_neuron.py [--model gemma-3-270m] [--prompt TEXT] [--max-memory 256MB]
        [--repeats 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

import neuron_attribution as na
from neuron_attribution.pipelines.result_memory import buffers_budget
from neuron_attribution.settings import parse_size
from neuron_attribution.scoring import progress
from neuron_attribution.scoring.exact import rows_per_product

from bench_attribute import device_name


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_per_row(model: na.LoadedModel, rows: int, repeats: int = 5) -> float:
    """Seconds per row of one (rows × d)·(d × V) product followed by an in-place exp and a sum over it."""
    unembedding = model.hf_model.get_output_embeddings().weight.detach().float()
    states = torch.randn(rows, unembedding.shape[1])
    logits = torch.empty(rows, unembedding.shape[0])
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.mm(states, unembedding.T, out=logits)
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        logits.sum(dim=-1).log_()
        times.append(time.perf_counter() - start)
    del unembedding
    return statistics.median(times[1:]) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-memory", default=None, help="the scoring budget (as --max-memory takes it)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    model = na.load_model(args.model)
    budget = {} if args.max_memory is None else {"memory_budget": parse_size(args.max_memory)}
    na.attribute(model, args.prompt, top_k=100)  # weight copies and caches made once per model
    rss_loaded = peak_rss_mb()
    shape = model.shape
    vocabulary = model.hf_model.get_output_embeddings().weight.shape[0]
    n_tokens = len(model.tokenizer(args.prompt)["input_ids"])
    # the returned neurons count against the budget; the products get the rest (pipelines/result_memory.py)
    left = buffers_budget(shape, n_tokens, 10**8, budget.get("memory_budget", na.ScoringOptions().memory_budget),
                          vocabulary, model.adapter.device)
    batch = rows_per_product(vocabulary, left)

    first_report: list[float] = []
    started = [0.0]

    def reporter(what: str, done: int, total: int) -> None:
        if not first_report:
            first_report.append(time.perf_counter() - started[0])

    times, result = [], None
    for _ in range(args.repeats):
        first_report.clear()
        started[0] = time.perf_counter()
        with progress.reporting(reporter):
            result = na.attribute(model, args.prompt, top_k=10**8, query_top=0, **budget)
        times.append(time.perf_counter() - started[0])
    neurons = len(result.ffn_neurons) + len(result.attention_neurons)
    rows = neurons + shape.n_layers * shape.n_heads * (1 + n_tokens)  # the heads and their positions too
    per_row = floor_per_row(model, batch)
    floor = per_row * rows
    every = statistics.median(times)
    peak_above = peak_rss_mb() - rss_loaded
    print(f"model {model.name}; {neurons:,} neurons ({len(result.ffn_neurons):,} FFN, "
          f"{len(result.attention_neurons):,} attention) on a {n_tokens}-token prompt; batches of {batch} rows")
    print(f"every neuron, with parts and projections: {every:.1f} s (median of {args.repeats})")
    print(f"floor, one product + exp/log per row ({rows:,} rows at {per_row * 1e3:.3f} ms): {floor:.1f} s")
    print(f"every neuron / floor: {every / floor:.2f}x; first progress report after {first_report[0]:.2f} s; "
          f"peak memory {peak_above:.0f} MB above the loaded model")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"bench": "every_neuron", "model": model.name, "device": device_name(model.device),
                       "neurons": neurons, "rows": rows, "seconds": every, "floor_seconds": floor,
                       "ratio_to_floor": every / floor, "first_report_seconds": first_report[0],
                       "peak_mb_above_model": peak_above, "max_memory": args.max_memory}, handle, indent=1)


if __name__ == "__main__":
    main()
