"""One table of the benchmark figures that bench_attribute.py, bench_run.py and bench_every_neuron.py wrote with
--json: each step as a multiple of the same machine's forward pass, one column per model and device, the stored
CPU figures (bench/figures/, measured on the project's 2-core CPU machine) beside the new ones. Usage:
    .venv/bin/python bench/summary.py DIR [DIR ...]        (every *.json in each DIR, then bench/figures/)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STORED = Path(__file__).parent / "figures"
ROWS = [  # (label, how to read it from a figures file)
    ("forward pass, ms", lambda f: f.get("forward_ms"), "{:.1f}"),
    ("attribute(top_k=100) / forward", lambda f: f.get("ratios_to_forward", {}).get("top100"), "{:.2f}x"),
    ("attribute(top_k=300) / forward", lambda f: f.get("ratios_to_forward", {}).get("top300"), "{:.2f}x"),
    ("score_neurons (20 neurons) / forward", lambda f: f.get("ratios_to_forward", {}).get("score_neurons"),
     "{:.2f}x"),
    ("contrast (top-100) / forward", lambda f: f.get("ratios_to_forward", {}).get("contrast"), "{:.2f}x"),
    ("query neurons (top-30) / forward", lambda f: f.get("ratios_to_forward", {}).get("query"), "{:.2f}x"),
    ("neurons scored per neuron returned", lambda f: f.get("evaluated_per_returned"), "{:.2f}"),
    ("peak above the model, MB", lambda f: f.get("peak_mb"), "{:.0f}"),
    ("run: sentences/s (best batch size)", lambda f: max(f["sentences_per_second"].values())
     if "sentences_per_second" in f else None, "{:.2f}"),
    ("run: one sentence / forward", lambda f: f.get("ratios_to_forward", {}).get("run_sentence"), "{:.1f}x"),
    ("every neuron / its floor", lambda f: f.get("ratio_to_floor"), "{:.2f}x"),
]


def load(directory: Path) -> list[dict]:
    figures = []
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("bench") in ("attribute", "run", "every_neuron"):
            figures.append(data)
    return figures


def columns(figures: list[dict]) -> dict[tuple[str, str], dict]:
    """(model, device) -> the attribute and run figures merged."""
    merged: dict[tuple[str, str], dict] = {}
    for f in figures:
        merged.setdefault((f["model"], f["device"]), {}).update(
            {k: v for k, v in f.items() if k != "ratios_to_forward"})
        merged[(f["model"], f["device"])].setdefault("ratios_to_forward", {}).update(f.get("ratios_to_forward", {}))
    return merged


def table(merged: dict[tuple[str, str], dict]) -> str:
    keys = sorted(merged, key=lambda k: (k[0], "CPU" in k[1]))  # per model: the new device first, then the CPU
    headers = ["figure"] + [f"{model} on {device}" for model, device in keys]
    rows = [headers]
    for label, read, form in ROWS:
        cells = []
        for key in keys:
            value = read(merged[key])
            cells.append("-" if value is None else form.format(value))
        if any(c != "-" for c in cells):
            rows.append([label] + cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> None:
    directories = [Path(a) for a in sys.argv[1:]] or [Path("out/gpu-check")]
    figures = [f for d in directories for f in load(d)] + load(STORED)
    if not figures:
        sys.exit("summary: no figures found")
    print(table(columns(figures)))


if __name__ == "__main__":
    main()
