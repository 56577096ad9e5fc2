"""`cogedit ui` in a real browser: Debian's Chromium driven by Playwright (Playwright's own browser
download is not reachable from these machines; .ci/run installs the `chromium` package).

A newcomer's walk through the app, on the shipped shapes proxy with few steps: the bundled clip
already chosen, invert it (the frames asked for changed to 4k+1 on the card, the round trip's
verdict), go to Edit with the button, Render with no prompt (one notice, no panel marked failed),
type a box and see its preview, draw a box on the first and the last frame by clicking two corners
on each, render the two starting prompts, wait until both results are
loaded and play, reload and find the inversion still chosen, find it in the gallery, then upload
a text file named .mp4 and see the one-line error while the app keeps answering. The page with
its two results is saved in the test's folder, to look at (docs/webui.png, the README's, comes from
benchmarks/ui_first_edit.py --screenshot, at the page's default steps)."""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# n result videos, each with a frame to show, no error and a length.
PLAYABLE = "(n) => { const v = [...document.querySelectorAll('.edit-result video')]; return v.length == n && v.every(x => x.readyState >= 2 && !x.error && x.duration > 0) }"
PROMPTS = ("a red triangle moving right on a gray background", "a green triangle moving right on a gray background")
# Error badges a failed event leaves on the panels it fills (the toasts are not counted).
BADGES = "() => document.querySelectorAll('[data-testid=status-tracker] .error').length"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: install Debian's chromium package (apt-get install chromium) to run the browser test")


@contextlib.contextmanager
def running_ui(cache_dir: Path) -> Iterator[str]:
    """`cogedit ui` as a user starts it (on the proxy); its URL once it answers."""
    cmd = [sys.executable, "-m", "cli", "ui", "--port", str(free_port()), "--cache-dir", str(cache_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, lines = time.monotonic() + 120, [""]
        while time.monotonic() < deadline and proc.poll() is None and not lines[-1].startswith("cogedit ui: http"):
            if select.select([proc.stdout], [], [], 1.0)[0]:
                lines.append(proc.stdout.readline())
        if not lines[-1].startswith("cogedit ui: http"):
            raise RuntimeError("cogedit ui did not start:\n" + "".join(lines))
        yield lines[-1].split()[2]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chromium(playwright: Any, profile: Path) -> Any:
    """Debian's chromium, headless, with a fresh profile and nothing that calls out."""
    return playwright.chromium.launch_persistent_context(str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})


@pytest.fixture
def app_url(tmp_path):
    with running_ui(tmp_path / "cache") as url:
        yield url


def wait_text(page, selector: str, text: str, timeout_s: float) -> str:
    page.wait_for_function("([s, t]) => document.querySelector(s)?.innerText.includes(t)", arg=[selector, text], timeout=timeout_s * 1000)
    return page.inner_text(selector)


def test_invert_render_two_edits_find_it_in_the_gallery_and_survive_a_bad_upload(app_url, small_clip, tmp_path):
    from playwright.sync_api import sync_playwright

    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file, not a video\n")
    with sync_playwright() as p:
        browser = chromium(p, tmp_path / "profile")
        try:
            page = browser.new_page()
            page.goto(app_url)
            # The bundled shapes clip is chosen from the start: Invert works at once.
            assert "bundled shapes_heldout_4: 17 frames" in wait_text(page, "#source-info", "frames", 60)

            # Invert on the proxy with few steps; 18 frames become 17 (4k+1), and the card says so.
            page.fill("#frames input", "18")
            page.fill("#steps input", "2")
            page.click("#invert-button")
            card = wait_text(page, "#invert-card", "complete", 120)
            inversion_id = card.split()[0]
            assert len(inversion_id) == 12 and "17 frames at 96x144" in card and "2 steps" in card
            assert "frames 18: using 17" in card and re.search(r"round trip \(verify\): (good|poor|failed), latent error", card)

            _edit_tab_guides_a_newcomer(page)

            # Two prompts, one render, around the moving object (the page's default for a bundled shapes clip), pasted into
            # the source; both results must load and play.
            page.fill("#prompts textarea", "\n".join(PROMPTS))
            page.check("#mask-paste input")
            page.click("#render-button")
            page.wait_for_function(PLAYABLE, arg=2, timeout=120_000)
            assert page.evaluate("() => Promise.all([...document.querySelectorAll('.edit-result video')].map(v => v.play().then(() => true)))") == [True, True]
            results = page.inner_text("#results")
            assert all(f"source | {prompt}" in results or prompt in results for prompt in PROMPTS) and results.count("around the object, pasted into the source") == 2
            assert page.evaluate(BADGES) == 0
            page.screenshot(path=str(tmp_path / "edit-tab.png"), full_page=True)  # to look at (the README's is benchmarks/ui_first_edit.py's)

            # A reload keeps the Edit tab's inversion.
            page.reload()
            page.get_by_role("tab", name="Edit").click()
            page.wait_for_function("(i) => document.querySelector('#edit-inversion input')?.value.startsWith(i)", arg=inversion_id, timeout=30_000)

            # The inversion is in the gallery, with its thumbnails and its two edits.
            page.get_by_role("tab", name="Inversions").click()
            gallery = wait_text(page, "#gallery", inversion_id, 30)
            assert "2 edit(s)" in gallery
            page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)", timeout=30_000)

            _a_bad_upload_is_one_line(page, fake, small_clip, tmp_path)
        finally:
            browser.close()


def _edit_tab_guides_a_newcomer(page: Any) -> None:
    """The button goes to Edit; Render with no prompt is one notice and marks no panel failed; the
    box preview follows the box as it is typed, a half-typed box is a hint, an empty one no preview."""
    page.click("#to-edit")
    page.fill("#prompts textarea", "")
    page.click("#render-button")
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=toast-body]')].some(t => t.innerText.includes('write at least one prompt'))", timeout=30_000)
    assert page.evaluate(BADGES) == 0  # no panel marked failed

    # The box preview follows the box as it is typed (no Enter); a half-typed box is a hint, not an error.
    page.type("#mask-box textarea, #mask-box input", "0.3,0.0,0.9", delay=20)
    wait_text(page, "#box-hint", "local edit box takes four fractions", 30)
    page.type("#mask-box textarea, #mask-box input", ",0.45", delay=20)
    page.wait_for_function("() => document.querySelector('#mask-preview img')?.naturalWidth > 0", timeout=30_000)
    # the hint clears once the handler has answered (until then Gradio shows its "processing" status there)
    page.wait_for_function("() => document.querySelector('#box-hint')?.innerText.trim() === ''", timeout=30_000)
    assert page.evaluate(BADGES) == 0
    page.fill("#mask-box textarea, #mask-box input", "")
    _boxes_are_drawn_by_two_clicks_on_the_first_and_last_frames(page)


def _box_value(page: Any, elem_id: str) -> list[float]:
    text = page.input_value(f"#{elem_id} textarea, #{elem_id} input")
    return [float(v) for v in text.split(",")] if text else []


def _boxes_are_drawn_by_two_clicks_on_the_first_and_last_frames(page: Any) -> None:
    """The preview shows the first | last frame (96x144 each, enlarged 2x, 4 px apart: 580 px wide);
    two clicks on a frame draw its box into the box fields. Both are cleared after."""
    preview = page.locator("#mask-preview img")
    page.wait_for_function("() => document.querySelector('#mask-preview img')?.naturalWidth === 580", timeout=30_000)  # no box: both frames, nothing dimmed

    def click(frame: int, fx: float, fy: float) -> None:
        box = preview.bounding_box()  # the image may be shown smaller than its own size (never larger)
        scale = min(box["width"] / 580, box["height"] / 192, 1.0)
        left, top = (box["width"] - 580 * scale) / 2, (box["height"] - 192 * scale) / 2
        preview.click(position={"x": left + (292 * frame + 288 * fx) * scale, "y": top + 192 * fy * scale})

    for frame, field, want in ((0, "mask-box", [0.2, 0.3, 0.5, 0.7]), (1, "mask-box-end", [0.5, 0.1, 0.9, 0.6])):
        click(frame, want[0], want[1])
        click(frame, want[2], want[3])
        page.wait_for_function("(s) => document.querySelector(s)?.value !== ''", arg=f"#{field} textarea, #{field} input", timeout=30_000)
        drawn = _box_value(page, field)
        assert len(drawn) == 4 and all(abs(a - b) <= 0.03 for a, b in zip(drawn, want, strict=True)), (field, drawn)
    assert _box_value(page, "mask-box") and page.evaluate(BADGES) == 0  # the first frame's box stayed while the last one's was drawn
    page.wait_for_function("() => document.querySelector('#box-hint')?.innerText.trim() === ''", timeout=30_000)
    for field in ("mask-box", "mask-box-end"):
        page.fill(f"#{field} textarea, #{field} input", "")
    page.wait_for_function("() => document.querySelector('#mask-preview img')?.naturalWidth === 580", timeout=30_000)


def _a_bad_upload_is_one_line(page: Any, fake: Path, small_clip: Path, tmp_path: Path) -> None:
    """A text file named .mp4: one line that names the problem and the fix, in file names, no
    traceback, no panel marked failed; and the app still answers."""
    page.get_by_role("tab", name="Invert").click()
    page.set_input_files("#upload input[type=file]", str(fake))
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=toast-body]')].some(t => t.innerText.includes('is not a readable video'))", timeout=60_000)
    toast = page.locator("[data-testid=toast-body]", has_text="is not a readable video").first.inner_text()
    message = toast.strip().splitlines()[-1]
    assert message.endswith("fixed.mp4") and "notes.mp4 is not a readable video" in message and "re-encode it" in message
    assert str(tmp_path) not in toast and page.evaluate(BADGES) == 0  # file names, not the upload's hashed path
    assert "Traceback" not in page.content()

    # ... and the app still answers.
    page.click("#upload button[aria-label='Clear']")
    page.set_input_files("#upload input[type=file]", str(small_clip))
    assert "47 frames" in wait_text(page, "#source-info", "47 frames", 60)
