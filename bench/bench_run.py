"""Benchmark: sentences per second of `run` on the default model, at several batch sizes.

Each batch size runs the same kept sentences (the first N of each knowledge type) into a fresh directory; the
filter is run once beforehand and its time reported apart. Usage:
    .venv/bin/python bench/bench_run.py [--per-type 6] [--batch-sizes 1,8,32] [--top 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import neuron_attribution as na
from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-type", type=int, default=6, help="kept sentences of each knowledge type")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--top", type=int, default=300)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]

    model = na.load_model()
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
            print(f"batch size {size:3d}: {result.attributed} sentences in {seconds:6.1f} s = "
                  f"{result.attributed / seconds:5.2f} sentences/s")


def _reset_identity(directory: Path, batch_size: int) -> None:
    """A copied run.json describes the first batch size: make it this one's, with no parts done yet."""
    record = json.loads((directory / "run.json").read_text())
    record["identity"]["batch_size"] = batch_size
    record["complete"] = False
    (directory / "run.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
