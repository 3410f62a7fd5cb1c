"""Benchmark: the multi-hop circuit (`circuit`, `attribute --circuit`) on the default model, as a multiple of a
forward pass measured in the same run (medians of --repeats), with its size and completeness. Usage:
    .venv/bin/python bench/bench_circuit.py [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PROMPTS = [("The Eiffel Tower is located in the city of", " Paris"), ("The capital of France is", " Paris"),
           ("The official language of Spain is", " Spanish")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    import neuron_attribution as na

    model = na.load_model()
    na.circuit(model, "Warm up", None)
    rows = []
    for prompt, answer in PROMPTS:
        ids = model.tokenizer(prompt)["input_ids"]
        forward, seconds = [], []
        for _ in range(args.repeats):
            with torch.inference_mode():
                started = time.perf_counter()
                model.hf_model(torch.tensor([ids]), logits_to_keep=1)
                forward.append(time.perf_counter() - started)
            started = time.perf_counter()
            graph = na.circuit(model, prompt, answer)
            seconds.append(time.perf_counter() - started)
        row = {"prompt": prompt, "answer": answer, "tokens": len(ids), "forward_s": statistics.median(forward),
               "circuit_s": statistics.median(seconds),
               "neurons": sum(1 for n in graph["nodes"] if n["kind"] in ("ffn", "attention")),
               "links": len(graph["links"]), "completeness": graph["completeness"]}
        row["ratio"] = row["circuit_s"] / row["forward_s"]
        rows.append(row)
        print(f"{prompt!r:50} {row['circuit_s']:.2f} s = {row['ratio']:.1f}x a forward pass; {row['neurons']} neurons, "
              f"{row['links']} links, completeness {row['completeness']:.4f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"bench": "circuit", "model": model.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
