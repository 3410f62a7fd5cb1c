"""Benchmark: the explorer as a researcher uses it, in headless Chromium (selenium + chromium-driver).

Measures, as medians over a few repetitions in one run:
  * a 5–10-token prompt's view: from clicking "Attribute" to the graph drawn (each prompt new to the server),
  * an intervention round trip: from clicking "switch off" to the new probability shown,
  * a neuron page of the loaded run: from opening the URL to its sentences shown,
  * start-up: `serve` until its API answers, beside `attribute` on one prompt from start to exit (both are
    fresh processes; the run is indexed during serve's start-up).
Usage:
    .venv/bin/python bench/bench_explorer.py --run DIR [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import neuron_attribution as na
from neuron_attribution.explorer.app import create_app
from neuron_attribution.explorer.run_index import RunIndex, check_runs
from neuron_attribution.explorer.server import BackgroundServer, open_socket
from neuron_attribution.explorer.views import Views
from neuron_attribution.settings import ScoringOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_explorer import _driver  # noqa: E402  (the tests' own Chromium set-up)

PROMPTS = ["The capital of France is", "The official language of Brazil is", "Tim Duncan plays the sport of",
           "The month after March is", "The largest planet in our solar system is",
           "The Eiffel Tower is located in the city of", "Bananas are usually the colour"]


def _wait(predicate, seconds: float = 120) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        try:
            if predicate():
                return
        except Exception:  # an element not there yet
            pass
        time.sleep(0.01)
    raise TimeoutError("the page did not get there")


def browser_timings(url: str, repeats: int) -> dict[str, list[float]]:
    from selenium.webdriver.common.by import By

    driver = _driver()
    found = lambda css: driver.find_elements(By.CSS_SELECTOR, css)  # noqa: E731
    times: dict[str, list[float]] = {"prompt_view_s": [], "intervention_s": [], "neuron_page_s": []}
    try:
        driver.get(url)
        _wait(lambda: found("#prompt"))
        for prompt in PROMPTS[:repeats]:
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(prompt)
            driver.execute_script("document.getElementById('results').replaceChildren()")
            started = time.perf_counter()
            driver.find_element(By.ID, "go").click()
            _wait(lambda: driver.find_element(By.ID, "graph-status").text.startswith("drawn"))
            times["prompt_view_s"].append(time.perf_counter() - started)
            for row in found("#ffn-table button.pick")[:2]:
                row.click()
            started = time.perf_counter()
            driver.find_element(By.ID, "switch-off").click()
            _wait(lambda: found("#after-prob"))
            times["intervention_s"].append(time.perf_counter() - started)
        for neuron in ("27_846", "24_1005", "28_1078", "23.4", "23_4_38")[:repeats]:
            started = time.perf_counter()
            driver.get(url + "neuron/" + neuron)
            _wait(lambda: found(".run-section .hits") and found("#sentences-0 tbody tr, #per-type-0 tbody tr"))
            times["neuron_page_s"].append(time.perf_counter() - started)
    finally:
        driver.quit()
    return times


def start_up(run: Path, repeats: int) -> dict[str, list[float]]:
    serve, attribute = [], []
    for _ in range(repeats):
        port = open_socket("127.0.0.1", 0)
        number = port.getsockname()[1]
        port.close()
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-m", "neuron_attribution", "serve", "--port", str(number),
                                    "--run", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{number}/api/info", timeout=1).status == 200)
            serve.append(time.perf_counter() - started)
        finally:
            process.terminate()
            process.wait(30)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neuron_attribution", "attribute", PROMPTS[0]], check=True,
                       capture_output=True)
        attribute.append(time.perf_counter() - started)
    return {"serve_ready_s": serve, "attribute_process_s": attribute}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = check_runs([args.run])
    model = na.load_model()
    started = time.perf_counter()
    index = RunIndex(runs)
    indexing = time.perf_counter() - started
    with BackgroundServer(create_app(Views(model, ScoringOptions()), index, token=None)) as url:
        times = browser_timings(url, args.repeats)
    times.update(start_up(args.run, min(args.repeats, 3)))
    medians = {name: statistics.median(values) for name, values in times.items()}
    figures = {"sentences": runs[0].record.get("sentences"), "index_s": indexing, **medians,
               "samples": times}
    for name, value in medians.items():
        print(f"{name:22s} median {value:6.2f} s   ({', '.join(f'{v:.2f}' for v in times[name])})")
    print(f"indexing the run ({figures['sentences']} sentences): {indexing:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
