"""Screenshots of a real MLflow run page (Overview and Model metrics) with headless Chromium, for the README.

Driven through Playwright (the Python package only; the browser is the system's Chromium, Debian's `chromium`), so
that the page can be waited on and used as a reviewer would: charts drawn, and every sample-image card's step slider
moved to its last step with the images loaded. A plain `chromium --screenshot` cannot do either: the image slider opens
at step 0, and the images load after the page goes quiet.

    python launch/mlflow_screenshot.py RUN_URL OUT_DIR [--chromium /usr/bin/chromium] [--timeout 120]

writes OUT_DIR/overview.png, OUT_DIR/metrics.png and OUT_DIR/samples.png (one sample card full screen).
Called by launch/mlflow-screenshot.sh.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_url", help="the run's page, e.g. http://HOST:PORT/#/experiments/1/runs/RUN_ID")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each page to be ready")
    parser.add_argument("--height", type=int, default=1500)
    parser.add_argument("--full-screen-key", default="samples/T0.7", help="the image card also shot full screen")
    args = parser.parse_args()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright is not installed: .venv/bin/python -m pip install playwright (the Python package is enough:"
              " the system's chromium is used)", file=sys.stderr)
        return 2
    if not args.chromium:
        print("no chromium: apt-get install -y chromium (or pass --chromium PATH)", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    timeout_ms = args.timeout * 1000
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": args.height})
        page.set_default_timeout(timeout_ms)

        page.goto(f"{args.run_url}?workflowType=machine_learning")
        page.get_by_text("Description").first.wait_for()
        page.get_by_text("Parameters").first.wait_for()
        page.wait_for_timeout(3000)   # the MLflow UI polls the server, so the network never goes idle
        page.screenshot(path=str(args.out_dir / "overview.png"))

        page.goto(f"{args.run_url}/model-metrics?workflowType=machine_learning")
        page.get_by_text("bits_per_dim").first.wait_for()
        page.locator(".js-plotly-plot").first.wait_for()
        page.get_by_role("slider").first.wait_for()
        page.wait_for_timeout(3000)
        sliders = page.get_by_role("slider")
        moved = 0
        for i in range(sliders.count()):   # every image card: its step box set to the last logged step
            slider = sliders.nth(i)
            last = slider.get_attribute("aria-valuemax")
            box = slider.locator("xpath=ancestor::*[.//input][1]").locator("input").first
            if last is not None and box.count():
                box.fill(last)
                box.press("Enter")
                moved += 1
        if moved:   # the cards show a spinner until their image has loaded
            page.wait_for_function(
                "() => { const imgs = [...document.querySelectorAll('img')].filter("
                "i => i.src.includes('get-artifact'));"
                " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }")
        page.get_by_text("bits_per_dim").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)   # the charts' last redraw
        page.screenshot(path=str(args.out_dir / "metrics.png"))

        # The cards are small (MLflow lists the run's params above each image): one grid full screen as well.
        card = page.get_by_test_id("experiment-view-compare-runs-card").filter(
            has=page.get_by_text(args.full_screen_key, exact=True))
        card.locator("button:not([data-testid])").first.click()
        dialog = page.get_by_role("dialog")
        dialog.wait_for()
        dialog.locator("img").first.wait_for()
        page.wait_for_function(
            "() => [...document.querySelectorAll('[role=dialog] img')].every(i => i.complete && i.naturalWidth > 0)")
        page.wait_for_timeout(1000)
        dialog.screenshot(path=str(args.out_dir / "samples.png"))
        images = page.evaluate(
            "() => [...document.querySelectorAll('img')].filter(i => i.src.includes('get-artifact')"
            " && i.naturalWidth > 0).length")
        browser.close()
    print(f"screenshots in {args.out_dir}: {moved} image slider(s) moved to the last step, {images} image(s) shown")
    return 0


if __name__ == "__main__":
    sys.exit(main())
