"""Benchmark: time and peak memory of attribute() against prompt length on the default model.

Each length runs in a fresh process (peak RSS is per process): load the model, note RSS, run attribute() on a
prompt of that many tokens (top-100, query neurons included), and report its time and peak RSS above the loaded
model. For scale: the trace alone, and a plain forward pass with the model's fast attention (logits at the last
position, as the trace computes them). Each figure is the median of
`--repeats` processes (peak RSS varies by some tens of MB from run to run with the allocator). Usage:
    .venv/bin/python bench/bench_length.py [--lengths 16,64,256,1024,4096,8192] [--max-memory 2GB] [--repeats 3]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import resource
import subprocess
import sys
import time
from pathlib import Path

TEXT = ("The history of the city goes back many centuries, and its people have traded, built, argued and "
        "written about their streets, rivers, markets and neighbours in every age. ")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(length: int, max_memory: str) -> dict:
    import torch

    import neuron_attribution as na
    from neuron_attribution.model.trace import trace_token_ids
    from neuron_attribution.settings import parse_size

    budget = parse_size(max_memory)
    model = na.load_model()
    ids = model.tokenizer(TEXT * (length // 10 + 2))["input_ids"][:length]
    na.attribute(model, ids[:8], top_k=10)  # first-call set-up (weight views, caches)
    baseline = _rss_mb()
    started = time.perf_counter()
    result = na.attribute(model, ids, top_k=100, memory_budget=budget)
    seconds = time.perf_counter() - started
    peak = _rss_mb() - baseline
    started = time.perf_counter()
    trace_token_ids(model, [ids])
    trace_s = time.perf_counter() - started
    with torch.inference_mode():
        hf_model = model.hf_model
        hf_model.set_attn_implementation("sdpa")
        started = time.perf_counter()
        hf_model(torch.tensor([ids]), logits_to_keep=1)
        forward = time.perf_counter() - started
        hf_model.set_attn_implementation("eager")
    return {"tokens": length, "forward_s": forward, "trace_s": trace_s, "attribute_s": seconds,
            "peak_mb_above_model": peak, "query_neurons": len(result.query_neurons), "memory_budget": max_memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,64,256,1024,4096,8192")
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per length; medians are shown")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.max_memory)))
        return
    print(f"{'tokens':>7} {'forward':>9} {'trace':>8} {'attribute':>10} {'ratio':>6} {'peak MB above model':>20}")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        runs = []
        for _ in range(args.repeats):
            output = subprocess.run([sys.executable, __file__, "--child", str(length), "--max-memory",
                                     args.max_memory], capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
        row = {key: statistics.median(run[key] for run in runs) if isinstance(runs[0][key], float) else runs[0][key]
               for key in runs[0]}
        row["repeats"] = args.repeats
        rows.append(row)
        print(f"{row['tokens']:>7} {row['forward_s']:>8.2f}s {row['trace_s']:>7.2f}s {row['attribute_s']:>9.2f}s "
              f"{row['attribute_s'] / row['forward_s']:>6.1f} {row['peak_mb_above_model']:>20.0f}", flush=True)
    if args.json:
        figures = {"bench": "length", "model": "SmolLM2-135M-Instruct", "device": "CPU", "max_memory": args.max_memory,
                   "rows": rows}
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
