"""Benchmark: sentences per second of `run` on the default model, at several batch sizes.

Each batch size runs the same kept sentences (the first N of each knowledge type) into a fresh directory; the
filter is run once beforehand and its time reported apart. A sentence's time is also given as a multiple of
one forward pass over it (median over the sentences, measured in this run). Usage:
    .venv/bin/python bench/bench_run.py [--per-type 6] [--batch-sizes 1,8,32] [--top 300] [--device cuda]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

import neuron_attribution as na
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings

from bench_attribute import device_name, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-type", type=int, default=6, help="kept sentences of each knowledge type")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--top", type=int, default=300)
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1 ...")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    model = na.load_model(device=args.device)
    rates = {}
    arguments = RunArguments("knowledge", args.per_type)
    settings = run_settings(model, args.top)
    with tempfile.TemporaryDirectory() as scratch:
        first = Path(scratch) / "first"
        started = time.perf_counter()
        summary = run_dataset(model, first, arguments, settings=settings, batch_size=sizes[0])
        print(f"model {model.name}; {sum(summary.used.values())} sentences ({args.per_type} per type), "
              f"top {args.top}; first call (filter + attribution, batch {sizes[0]}) "
              f"{time.perf_counter() - started:.1f} s")
        for size in sizes:
            directory = Path(scratch) / f"batch-{size}"
            directory.mkdir()
            shutil.copy(first / "filter.json", directory / "filter.json")  # the filter is not what is measured
            shutil.copy(first / "run.json", directory / "run.json")
            _reset_identity(directory, size)
            started = time.perf_counter()
            result = run_dataset(model, directory, arguments, settings=settings, batch_size=size)
            seconds = time.perf_counter() - started
            rates[size] = result.attributed / seconds
            print(f"batch size {size:3d}: {result.attributed} sentences in {seconds:6.1f} s = "
                  f"{rates[size]:5.2f} sentences/s")
        prompts = pq.read_table(first / "sentences.parquet", columns=["prompt"]).column(0).to_pylist()
    forward = statistics.median(_forward_seconds(model, prompt) for prompt in prompts)
    best = max(rates, key=rates.get)
    print(f"forward pass: median {forward * 1e3:.1f} ms; a sentence at batch size {best} takes "
          f"{1 / rates[best] / forward:.1f}x one forward pass")
    if args.json:
        figures = {"bench": "run", "model": model.name, "device": device_name(model.device), "top": args.top,
                   "sentences_per_second": {str(k): v for k, v in rates.items()}, "forward_ms": forward * 1e3,
                   "ratios_to_forward": {"run_sentence": 1 / rates[best] / forward}}
        Path(args.json).write_text(json.dumps(figures, indent=1), encoding="utf-8")


def _forward_seconds(model, prompt: str) -> float:
    ids = torch.tensor([model.tokenizer(prompt)["input_ids"]], device=model.device)
    with torch.inference_mode():
        return timed(lambda: model.hf_model(ids), 3)


def _reset_identity(directory: Path, batch_size: int) -> None:
    """A copied run.json describes the first batch size: make it this one's, with no parts done yet."""
    record = json.loads((directory / "run.json").read_text())
    record["identity"]["batch_size"] = batch_size
    record["complete"] = False
    (directory / "run.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
