"""Benchmark: how a neuron's score compares with what switching it off does (docs/method.md §5, README "Scores and
what switching off measures").

On one model: the Eiffel prompt's top-10 FFN value neurons with score and measured change of log p(answer), and over
the first sentences of each packaged knowledge type the Spearman rank correlation between score and measured change
of the top-N FFN and attention value neurons (each sentence's own answer), and the time of measuring as a multiple of
the attribution. Usage:
    .venv/bin/python bench/bench_faithfulness.py [--model gemma-3-270m] [--per-type 5] [--top 10] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPT, ANSWER = "The Eiffel Tower is located in the city of", " Paris"


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    for rank, i in enumerate(order):
        ranks[i] = float(rank)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / (va * vb) ** 0.5 if va and vb else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--per-type", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import neuron_attribution as na
    from neuron_attribution.datasets import KNOWLEDGE_TYPES, load_facts

    model = na.load_model(args.model)
    na.attribute(model, "Warm up", top_k=5)
    started = time.perf_counter()
    plain = na.attribute(model, PROMPT, ANSWER, top_k=100)
    attribute_s = time.perf_counter() - started
    started = time.perf_counter()
    result = na.attribute(model, PROMPT, ANSWER, top_k=100, measure=args.top)
    measured_s = time.perf_counter() - started - attribute_s
    print(f"{model.name}: '{PROMPT}' -> '{ANSWER}' p={result.target.prob:.3f}; measuring the top {args.top} of each "
          f"kind took {measured_s:.2f} s = {measured_s / attribute_s:.2f}x the attribution ({attribute_s:.2f} s)")
    print(f"{'neuron':>10} {'score':>9} {'off alone':>10}")
    rows = []
    for n in result.ffn_neurons[:args.top]:
        rows.append({"neuron": str(n.index), "score": n.score, "measured_change": n.measured_change})
        print(f"{str(n.index):>10} {n.score:+9.4f} {n.measured_change:+10.4f}")
    print(f"all {2 * args.top} measured value neurons off together: {result.measured_together:+.4f}")
    scores, changes = [], []
    for kind in KNOWLEDGE_TYPES:
        facts, _ = load_facts(kind, "skip")
        for fact in facts[:args.per_type]:
            one = na.attribute(model, fact.prompt, " " + fact.answer.strip(), top_k=args.top, query_top=0,
                               measure=args.top)
            for n in [*one.ffn_neurons[:args.top], *one.attention_neurons[:args.top]]:
                scores.append(n.score)
                changes.append(-n.measured_change)  # a neuron that helps: positive score, log p drops when off
    rho = spearman(scores, changes)
    print(f"Spearman rank correlation of score and −(measured change) over {len(scores)} value neurons "
          f"({args.per_type} sentences of each of {len(KNOWLEDGE_TYPES)} types, top {args.top} of each kind): {rho:+.3f}")
    if args.json:
        args.json.write_text(json.dumps({"bench": "faithfulness", "model": model.name, "prompt": PROMPT,
                                         "answer": ANSWER, "top": args.top, "eiffel_ffn": rows,
                                         "measured_together": result.measured_together,
                                         "spearman": rho, "neurons": len(scores), "per_type": args.per_type,
                                         "attribute_s": attribute_s, "measure_s": measured_s}, indent=1))
    assert plain.ffn_neurons[0].index == result.ffn_neurons[0].index


if __name__ == "__main__":
    main()
