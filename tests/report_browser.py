"""Open a replab report in headless Chromium (Debian's ``chromium``, driven by Playwright's
Python package; no browser download, no network) and check it against ``summary.json``."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from replab.experiments.report import fmt, lookup

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/lib/chromium/chromium")


def chromium_path() -> str | None:
    env = os.environ.get("REPLAB_CHROMIUM")
    if env:
        return env
    for p in CHROMIUM_CANDIDATES:
        if Path(p).is_file():
            return p
    return shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser():
    """``playwright.sync_api`` and a Chromium path, or skip with the reason (CI must have both:
    ``make test`` installs them; REPLAB_REQUIRE_BROWSER=1 turns the skip into a failure)."""
    why = None
    try:
        from playwright import sync_api
    except ImportError:
        sync_api, why = None, "the playwright package is not installed (pip install playwright)"
    exe = chromium_path()
    if why is None and exe is None:
        why = "no Chromium found (apt-get install chromium, or set REPLAB_CHROMIUM)"
    if why is not None:
        if os.environ.get("REPLAB_REQUIRE_BROWSER"):
            pytest.fail(why)
        pytest.skip(why)
    return sync_api, exe


def check_report(run_dir, screenshot_dir) -> dict:
    """Open ``run_dir/report.html``: no console errors, every image loaded, every marked number
    equal to ``summary.json``; save a full-page screenshot. Returns what was checked."""
    sync_api, exe = require_browser()
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    errors, requests = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((run_dir / "report.html").resolve().as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.alt, e.complete, e.naturalWidth])")
            numbers = page.eval_on_selector_all(
                "span.num", "els => els.map(e => [e.dataset.key, e.dataset.spec, e.textContent])")
            headline_keys = page.eval_on_selector_all("#headline span.num", "els => els.map(e => e.dataset.key)")
            Path(screenshot_dir).mkdir(parents=True, exist_ok=True)
            shot = Path(screenshot_dir) / f"{summary['experiment']}.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert not errors, f"console errors: {errors}"
    external = [u for u in requests if not u.startswith(("file:", "data:", "about:"))]
    assert not external, f"the report fetched {external}"
    assert images, "the report shows no figure"
    broken = [alt for alt, complete, width in images if not complete or width <= 0]
    assert not broken, f"images that did not load: {broken}"
    assert sorted(headline_keys) == sorted(f"headline.{k}" for k in summary["headline"])
    for key, spec, shown in numbers:      # the shown text is summary.json's value, formatted
        expected = lookup(summary, key)
        assert shown == fmt(expected, spec or None), (key, shown, expected)
        if isinstance(expected, float) and math.isfinite(expected):
            digits = shown.replace(",", "").rstrip("%")
            value = float(digits) / (100 if shown.endswith("%") else 1)
            assert math.isclose(value, expected, rel_tol=0.06, abs_tol=0.006), (key, shown, expected)
    return {"images": len(images), "numbers": len(numbers), "screenshot": str(shot)}
