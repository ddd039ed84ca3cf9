"""Playwright (Python) driving Debian's chromium, with axe-core injected into each page.

Never ``playwright install``: the browser is /usr/bin/chromium (scripts/install-deps.sh test), and axe-core
comes from npm into ``.cache/axe`` (same script). Screenshots go to ``tests/webmail/screenshots/``
(gitignored), one per page and width, so a person can look at them after a run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
AXE = REPO / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SERIOUS = ("serious", "critical")


def require_browser_tools() -> str:
    """axe-core's source; fails (not skips) when the test tools are missing: CI installs them."""
    if not CHROMIUM.exists():
        pytest.fail("chromium is missing: run scripts/install-deps.sh test")
    if not AXE.exists():
        pytest.fail(f"axe-core is missing ({AXE}): run scripts/install-deps.sh test")
    return AXE.read_text()


async def axe_violations(page: Any, axe_source: str) -> list[dict[str, Any]]:
    """Serious and critical axe-core violations of the page (WCAG 2.1 A/AA rules and best practices).

    Injected with ``evaluate`` (DevTools protocol), so the page's CSP, which forbids inline scripts, stays on.
    """
    if not await page.evaluate("() => typeof window.axe !== 'undefined'"):
        await page.evaluate(axe_source)
    result = await page.evaluate(
        "async () => await axe.run(document, {runOnly: {type: 'tag', values: "
        "['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})")
    return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
             "nodes": [n["target"] for n in v["nodes"]][:5]}
            for v in result["violations"] if v["impact"] in SERIOUS]


async def check_page(page: Any, axe_source: str, name: str, width: int, problems: list[str]) -> None:
    """Screenshot, no serious/critical axe violation, no horizontal scrolling at this width."""
    SCREENSHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}-{width}.png"), full_page=True)
    violations = await axe_violations(page, axe_source)
    if violations:
        problems.append(f"{name} at {width}px: {json.dumps(violations, ensure_ascii=False)}")
    overflow = await page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    if overflow > 0:
        problems.append(f"{name} at {width}px scrolls sideways by {overflow}px")


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", html)
