"""Benchmark: whole-process start-up of the CLI, as multiples of a bare transformers import measured in the
same run, and many prompts in one process (`attribute --prompts`).

Each command runs `--repeats` times, interleaved with the reference (`python -c "from
transformers.models.llama.modeling_llama import LlamaForCausalLM"`), so machine load affects both alike; the
medians are compared. The model cache must be warm (run any command once first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
IMPORT = "from transformers.models.llama.modeling_llama import LlamaForCausalLM"
REFERENCE = [sys.executable, "-c", IMPORT]
SETTLED_REFERENCE = [sys.executable, "-c", f"import gc; gc.set_threshold(200_000, 10, 10)\n{IMPORT}\ngc.freeze()"]
COMMANDS = {
    "--help": [str(BIN / "neuron-attribution"), "--help"],
    "--version": [str(BIN / "neuron-attribution"), "--version"],
    "datasets": [str(BIN / "neuron-attribution"), "datasets"],
    "info": [str(BIN / "neuron-attribution"), "info"],
    "attribute": [str(BIN / "neuron-attribution"), "attribute", "The capital of Japan is", "--target", " Tokyo"],
}
PROMPTS = ["The capital of France is", "The capital of Japan is", "The largest planet is", "One, two, three,",
           "The official language of Spain is", "Tim Duncan plays the sport of", "The capital of Italy is",
           "The colour of the sky is", "The month after May is", "Berlin is a city in the country of"]


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=50)
    args = parser.parse_args()
    wall(COMMANDS["info"])  # warm caches
    times: dict[str, list[float]] = {"reference": [], "settled": [], **{name: [] for name in COMMANDS}}
    for _ in range(args.repeats):
        times["reference"].append(wall(REFERENCE))
        times["settled"].append(wall(SETTLED_REFERENCE))
        for name, command in COMMANDS.items():
            times[name].append(wall(command))
    reference = statistics.median(times["reference"])
    settled = statistics.median(times["settled"])
    print(f"bare transformers import (reference): median {reference:.2f} s over {args.repeats} runs")
    print(f"the same import, collector settled as the CLI does: median {settled:.2f} s = "
          f"{settled / reference:4.2f}x reference")
    for name in COMMANDS:
        median = statistics.median(times[name])
        print(f"{name:>10}: median {median:5.2f} s = {median / reference:4.2f}x reference "
              f"({median / settled:4.2f}x the settled import)")
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)]}) + "\n"
                                for i in range(args.prompts)))
        seconds = wall([str(BIN / "neuron-attribution"), "attribute", "--prompts", str(path), "--top", "100",
                        "--json-dir", str(Path(scratch) / "out")])
    print(f"attribute --prompts ({args.prompts} prompts, --top 100, whole process): {seconds:.1f} s = "
          f"{args.prompts / seconds:.2f} prompts/s")


if __name__ == "__main__":
    main()
