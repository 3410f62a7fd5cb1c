"""The README's screenshots of the explorer, taken in headless Chromium: the prompt view with a node's panel open
and two neurons switched off, and a neuron page of a run. Usage:
    .venv/bin/python scripts/explorer_screenshots.py --run DIR [--out docs]
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
from neuron_attribution.settings import ScoringOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_explorer import _driver, _wait_for  # noqa: E402  (the tests' Chromium set-up and wait)


def main() -> None:
    from selenium.webdriver.common.by import By

    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    app = create_app(Views(na.load_model(), ScoringOptions()), RunIndex(check_runs([args.run])), token=None)
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
            driver.get(url + "neuron/27_846")
            _wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".run-section .hits"))
            driver.save_screenshot(str(args.out / "explorer-neuron.png"))
        finally:
            driver.quit()
    print(f"wrote {args.out / 'explorer.png'} and {args.out / 'explorer-neuron.png'}")


if __name__ == "__main__":
    main()
