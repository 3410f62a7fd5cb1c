"""The README's screenshots, taken in headless Chromium: the explorer's prompt view with a node's panel open and two
neurons switched off, its circuit with the strongest path and the top five value neurons measured, a neuron page of
a run (with --run), and the `attribute --html` circuit page. Usage:
    .venv/bin/python scripts/explorer_screenshots.py [--run DIR] [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from pathlib import Path

import neuron_attribution as na
from neuron_attribution.explorer.app import create_app
from neuron_attribution.explorer.run_index import RunIndex, check_runs
from neuron_attribution.explorer.server import BackgroundServer
from neuron_attribution.explorer.views import Views
from neuron_attribution.reports.graph_page import circuit_page
from neuron_attribution.settings import ScoringOptions

EIFFEL = "The Eiffel Tower is located in the city of"

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_explorer import _driver, _wait_for  # noqa: E402  (the tests' Chromium set-up and wait)


def main() -> None:
    from selenium.webdriver.common.by import By

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    model = na.load_model()
    app = create_app(Views(model, ScoringOptions()), RunIndex(check_runs([args.run] if args.run else [])), token=None)
    with BackgroundServer(app) as url:
        driver = _driver()
        driver.set_window_size(1400, 1500)
        try:
            driver.get(url + "?" + urllib.parse.urlencode({"prompt": "The capital of France is"}))
            _wait_for(driver, lambda d: d.find_element(By.ID, "graph-status").text.startswith("drawn"))
            driver.execute_script("explorer.graph.cy.getElementById('ffn:27_846').emit('tap')")
            for name in ("27_846", "28_1078"):
                driver.find_element(By.CSS_SELECTOR, f'#ffn-table button.pick[data-neuron="{name}"]').click()
            driver.find_element(By.ID, "switch-off").click()
            _wait_for(driver, lambda d: d.find_elements(By.ID, "after-prob"))
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(args.out / "explorer.png"))
            written = ["explorer.png"]
            driver.get(url + "?" + urllib.parse.urlencode({"prompt": EIFFEL, "target": " Paris"}))
            _wait_for(driver, lambda d: d.find_element(By.ID, "circuit-status").text.startswith("drawn"))
            driver.find_element(By.ID, "circuit-strongest").click()
            driver.find_element(By.ID, "select-top").click()
            driver.find_element(By.ID, "measure").click()
            _wait_for(driver, lambda d: d.find_elements(By.ID, "measured-together"))
            driver.execute_script("document.getElementById('selection').scrollIntoView()")
            driver.save_screenshot(str(args.out / "explorer-circuit.png"))
            written.append("explorer-circuit.png")
            if args.run:
                driver.get(url + "neuron/27_846")
                _wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".run-section .hits"))
                driver.save_screenshot(str(args.out / "explorer-neuron.png"))
                written.append("explorer-neuron.png")
            page = args.out / "circuit.html"
            graph = na.circuit(model, EIFFEL, " Paris")
            graph["prompt"] = EIFFEL
            page.write_text(circuit_page(graph), encoding="utf-8")
            driver.set_window_size(1400, 900)
            driver.get(page.resolve().as_uri())
            _wait_for(driver, lambda d: d.find_element(By.ID, "graph-status").text.startswith("drawn"))
            driver.find_element(By.ID, "strongest").click()
            driver.save_screenshot(str(args.out / "circuit.png"))
            page.unlink()
            written.append("circuit.png")
        finally:
            driver.quit()
    print("wrote " + ", ".join(str(args.out / name) for name in written))


if __name__ == "__main__":
    main()
