"""Benchmark: time and peak memory of attribute() and of interventions against prompt length on the default model.

Each length and job runs in a fresh process (peak RSS is per process): load the model, note RSS, run the job on a
prompt of that many tokens, and report its time and peak RSS above the loaded model. Jobs: attribute() (top-100,
query neurons included); one FFN neuron switched off (`last_logits` with an Ablation: the model's fast attention);
one position-specific attention neuron switched off (its hooks read attention weights: eager attention a block of
queries at a time through the KV cache). For scale: the trace alone, and a plain forward pass with the model's fast
attention (logits at the last position). Each figure is the median of `--repeats` processes (peak RSS varies by
some tens of MB from run to run with the allocator). Usage:
    .venv/bin/python bench/bench_length.py [--lengths 16,64,256,1024,4096,8192,16384,32768] [--max-memory 2GB]
        [--repeats 3] [--json FILE]
Lengths past the model's context (8,192 on SmolLM2) lift its limit for the measurement.
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


JOBS = ("attribute", "ffn_off", "attention_at_off")


def measure(length: int, max_memory: str, job: str) -> dict:
    import torch

    import neuron_attribution as na
    from neuron_attribution.model.interventions import last_logits
    from neuron_attribution.model.trace import trace_token_ids
    from neuron_attribution.settings import parse_size

    budget = parse_size(max_memory)
    model = na.load_model()
    config = model.hf_model.config
    if length > config.max_position_embeddings:
        # SmolLM2's context is 8,192 tokens; beyond it the rotary positions are still exact arithmetic, which is
        # all a memory and time measurement needs (the predictions mean little there).
        config.max_position_embeddings = length
    ids = model.tokenizer(TEXT * (length // 10 + 2))["input_ids"][:length]
    ablation = {"ffn_off": na.Ablation.of([na.FfnIndex(27, 846)]),
                "attention_at_off": na.Ablation.of([na.AttentionIndex(23, 4, 38, min(3, length - 1))])}.get(job)
    if ablation is None:
        na.attribute(model, ids[:8], top_k=10)  # first-call set-up (weight views, caches)
    else:
        last_logits(model, [ids[:8]], ablation)
    baseline = _rss_mb()
    started = time.perf_counter()
    if job == "attribute":
        result = na.attribute(model, ids, top_k=100, memory_budget=budget)
    else:
        last_logits(model, [ids], ablation)
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
    row = {"tokens": length, "forward_s": forward, "trace_s": trace_s, f"{job}_s": seconds,
           f"{job}_peak_mb": peak, "memory_budget": max_memory}
    if job == "attribute":
        row["query_neurons"] = len(result.query_neurons)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="16,64,256,1024,4096,8192")
    parser.add_argument("--max-memory", default="2GB")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per length; medians are shown")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=JOBS, default="attribute", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", default=",".join(JOBS), help="which jobs to measure")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.max_memory, args.job)))
        return
    jobs = args.jobs.split(",")
    print(f"{'tokens':>7} {'forward':>9} " + " ".join(f"{job + ' (× fwd, MB)':>30}" for job in jobs))
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        row: dict = {"tokens": length, "repeats": args.repeats}
        for job in jobs:
            runs = []
            for _ in range(args.repeats):
                output = subprocess.run([sys.executable, __file__, "--child", str(length), "--job", job,
                                         "--max-memory", args.max_memory], capture_output=True, text=True,
                                        check=True).stdout
                runs.append(json.loads(output.strip().splitlines()[-1]))
            for key in runs[0]:
                value = statistics.median(run[key] for run in runs) if isinstance(runs[0][key], float) else runs[0][key]
                row[key if key not in ("forward_s", "trace_s") else f"{key}"] = value
            row[f"{job}_ratio"] = statistics.median(run[f"{job}_s"] / run["forward_s"] for run in runs)
        rows.append(row)
        print(f"{row['tokens']:>7} {row['forward_s']:>8.2f}s " + " ".join(
            f"{row[job + '_s']:>12.2f}s {row[job + '_ratio']:>6.1f}× {row[job + '_peak_mb']:>7.0f}" for job in jobs),
            flush=True)
    if args.json:
        figures = {"bench": "length", "model": "SmolLM2-135M-Instruct", "device": "CPU", "max_memory": args.max_memory,
                   "rows": rows}
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
