"""From `cogedit ui` to a rendered proxy edit in the browser, as a newcomer does it: start the app
on a fresh cache, open the page (the bundled shapes clip is already chosen), Invert with the
page's defaults (the proxy's 17 frames at 96x144, 10 steps, verified), go to Edit with the
button, Render the two prompts it starts with, and stop the clock once both results are loaded
and playable in Chromium. With --screenshot, the page then (the README's picture of the app).

    python benchmarks/ui_first_edit.py [--out benchmarks/results/ui_first_edit.json] [--screenshot docs/webui.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_webui_browser import PLAYABLE, chromium, running_ui, wait_text  # noqa: E402

CLIP = "shapes_heldout_4"  # the one the page starts with


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ui_first_edit.json"))
    parser.add_argument("--screenshot", type=Path, default=None, help="save the page with its two results here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    marks: dict[str, float] = {}
    load_before = os.getloadavg()
    start = time.monotonic()
    with running_ui(work / "cache") as url, sync_playwright() as p:
        marks["server answers"] = time.monotonic() - start
        browser = chromium(p, work / "profile")
        page = browser.new_page()
        page.goto(url)
        wait_text(page, "#source-info", f"bundled {CLIP}", 60)
        marks["clip shown"] = time.monotonic() - start
        page.click("#invert-button")
        wait_text(page, "#invert-card", "complete", 600)
        marks["inverted"] = time.monotonic() - start
        page.click("#to-edit")
        page.click("#render-button")
        page.wait_for_function(PLAYABLE, arg=2, timeout=600_000)
        marks["two edits playable"] = time.monotonic() - start
        card = page.inner_text("#invert-card")
        if args.screenshot:
            page.wait_for_timeout(1500)  # the videos' first frames drawn
            page.screenshot(path=str(args.screenshot), full_page=True)
        browser.close()
    result = {
        "what": "seconds from starting `cogedit ui` (fresh cache, the shapes proxy, the page's defaults) to two rendered edits playable in headless Chromium",
        "marks_s": {k: round(v, 1) for k, v in marks.items()},
        "inversion": " ".join(card.split()),
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "torch's default"),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/ui_first_edit.py",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
