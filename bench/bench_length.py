"""Benchmark: time and peak memory of attribute() against prompt length on the default model.

Each length runs in a fresh process (peak RSS is per process): load the model, note RSS, run attribute() on a
prompt of that many tokens (top-100, query neurons included), and report time and peak RSS above the loaded
model, with a plain forward pass for scale. Usage:
    .venv/bin/python bench/bench_length.py [--lengths 16,64,256,1024] [--max-memory 2GB]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TEXT = ("The history of the city goes back many centuries, and its people have traded, built, argued and "
        "written about their streets, rivers, markets and neighbours in every age. ")


def measure(length: int, max_memory: str) -> dict:
    import torch

    import neuron_attribution as na
    from neuron_attribution.settings import parse_size

    budget = parse_size(max_memory)
    model = na.load_model()
    ids = model.tokenizer(TEXT * (length // 10 + 2))["input_ids"][:length]
    na.attribute(model, ids[:8], top_k=10)  # float32 weight copies, made once per model
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with torch.inference_mode():
        started = time.perf_counter()
        model.hf_model(torch.tensor([ids]))
        forward = time.perf_counter() - started
    started = time.perf_counter()
    na.attribute(model, ids, top_k=100, memory_budget=budget)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"tokens": length, "forward_s": forward, "attribute_s": seconds, "peak_mb_above_model": peak - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,64,256,1024")
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.max_memory)))
        return
    print(f"{'tokens':>7} {'forward':>9} {'attribute':>10} {'ratio':>6} {'peak MB above model':>20}")
    for length in (int(x) for x in args.lengths.split(",")):
        output = subprocess.run([sys.executable, __file__, "--child", str(length), "--max-memory", args.max_memory],
                                capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{row['tokens']:>7} {row['forward_s']:>8.2f}s {row['attribute_s']:>9.2f}s "
              f"{row['attribute_s'] / row['forward_s']:>6.1f} {row['peak_mb_above_model']:>20.0f}")


if __name__ == "__main__":
    main()
