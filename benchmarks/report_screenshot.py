"""`catdog report` and `catdog explain` timed on a run of the shared photos, and the report's screenshot.

Times, each as a separate `catdog` process (start-up included):
- `catdog report --run RUN` twice: first as a user would meet it (evaluation and label_issues.csv as the run has
  them), then again with everything reused (the floor: Grad-CAM on the mistakes, bootstrap, page);
- `catdog explain --run RUN` on 10 validation photos, against `catdog predict --backend torch` on the same 10
  photos in the same run (the baseline: what a prediction alone costs).
Then Chromium (Debian's, headless) renders the report offline and saves a full-page screenshot.

    python benchmarks/report_screenshot.py [--run /tmp/explain-default] [--screenshot docs/report-default.png]

The default run: catdog train --data ../shared/data/dogs-vs-cats/train --out /tmp/explain-default; catdog evaluate
--run /tmp/explain-default.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CATDOG, ROOT, machine_description, run_timed  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def screenshot(report: Path, target: Path) -> None:
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1150, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        temporary = target.with_suffix(".tmp.png")
        page.screenshot(path=str(temporary), full_page=True)
        browser.close()
    picture = Image.open(temporary).convert("RGB")
    picture.thumbnail((800, 100_000))  # half the width: a readable overview at a few hundred KB
    picture.quantize(256).save(target, optimize=True)
    temporary.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/tmp/explain-default")
    parser.add_argument("--screenshot", default=str(ROOT / "docs" / "report-default.png"))
    arguments = parser.parse_args()
    run = Path(arguments.run)
    split = json.loads((run / "split.json").read_text())
    photos = [str(Path(split["root"]) / name) for name in split["val"][:5] + split["val"][-5:]]  # 5 cats, 5 dogs
    print(f"run {run}; {machine_description()}")
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.html"
        for attempt in ("first", "again"):
            seconds, output = run_timed(CATDOG + ["report", "--run", str(run), "--output", str(report)])
            print(f"catdog report ({attempt}): {seconds:.1f} s, {report.stat().st_size / 1e6:.2f} MB")
            for line in output.splitlines():
                print("    " + line)
        explain_seconds, _ = run_timed(CATDOG + ["explain", "--run", str(run), *photos, "--output", str(Path(scratch) / "explain")])
        predict_seconds, _ = run_timed(CATDOG + ["predict", "--run", str(run), *photos, "--backend", "torch",
                                                 "--output", str(Path(scratch) / "predictions.csv"), "--no-progress"])
        print(f"catdog explain, 10 photos: {explain_seconds:.1f} s; catdog predict --backend torch, same photos: "
              f"{predict_seconds:.1f} s (explain / predict = {explain_seconds / predict_seconds:.2f})")
        target = Path(arguments.screenshot)
        target.parent.mkdir(parents=True, exist_ok=True)
        screenshot(report, target)
        print(f"screenshot: {target} ({target.stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
