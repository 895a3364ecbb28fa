"""Debian's Chromium driven by Playwright for the console's tests; never a browser downloaded by a tool."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
WIDTHS = {"desktop": (1280, 860), "phone": (390, 844)}


def chromium_path() -> str:
    """Debian's chromium, or skip (fail where PATCHBAY_REQUIRE_BROWSER=1, as in CI)."""
    found = os.environ.get("PATCHBAY_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    message = "no chromium on this machine: the console's browser tests need Debian's `chromium` (apt install chromium)"
    if os.environ.get("PATCHBAY_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class ConsoleLog:
    """What the page printed to its console: errors and warnings are failures of the page."""

    problems: list[str] = field(default_factory=list)

    def watch(self, page) -> None:
        """Record the page's console errors and warnings, uncaught exceptions and failed requests."""
        page.on("console", lambda m: self.problems.append(f"{m.type}: {m.text} ({page.url})")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e} ({page.url})"))

    def take(self) -> list[str]:
        """The problems so far, forgetting them."""
        taken, self.problems = self.problems, []
        return taken


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright's Browser)."""
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


UNLABELLED_CONTROLS = """() => [...document.querySelectorAll("input, select, textarea, button")]
  .filter((el) => el.type !== "hidden" && el.getClientRects().length)
  .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute("aria-label")
    && !el.getAttribute("aria-labelledby") && !(el.tagName === "BUTTON" && el.textContent.trim()))
  .map((el) => el.outerHTML.slice(0, 120))"""


def unlabelled_controls(page) -> list[str]:
    """The visible form controls and buttons that have no label, aria-label or text."""
    return page.evaluate(UNLABELLED_CONTROLS)


def screenshot(page, name: str) -> Path:
    """Save the page at both widths to tests/artifacts/console/<name>-<width>.png (not committed), checking
    at each that nothing overflows sideways and every control has a label."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    original = page.viewport_size
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        page.wait_for_timeout(300)  # let responsive charts relayout
        overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert overflow <= 1, f"{name} overflows {overflow}px sideways at {width}px"
        assert unlabelled_controls(page) == [], f"{name} at {width}px"
        page.screenshot(path=str(ARTIFACTS / f"{name}-{label}.png"), full_page=True)
    page.set_viewport_size(original)
    return ARTIFACTS / f"{name}-desktop.png"
