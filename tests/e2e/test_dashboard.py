"""The dashboard page in a real headless Chromium, on a real aggregator with real agents.

Needs Debian's Chromium at /usr/bin/chromium and Playwright for Python (`apt-get install -y
chromium`, `pip install playwright`); skips, saying so, without them. Playwright drives the
system's Chromium: `playwright install` (a download) is never needed.

FEDLOOP_UPDATE_DOCS_SCREENSHOT=1 also writes the screenshot to docs/dashboard.png.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.processes import Server

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "dashboard.png"
ROUNDS = 6


@pytest.fixture
def page() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed: pip install playwright"
    )
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "console",
                lambda message: errors.append(message.text) if message.type == "error" else None,
            )
            page.errors = errors
            yield page
        finally:
            browser.close()


def sync_api() -> Any:
    return pytest.importorskip("playwright.sync_api")


def text(page: Any, selector: str) -> str:
    result: str = page.locator(selector).inner_text()
    return result


def test_dashboard_shows_the_run_live(
    page: Any, make_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = make_server(
        rounds=ROUNDS,
        min_agents=2,
        aggregation_threshold=1.0,
        round_timeout=120,
        evaluate={"engine": "engines:ShiftEngine"},
    )
    page.goto(server.url + "/")
    # Before any agent: no model, no round, no charts.
    expect = sync_api().expect
    # Waits use locators: the page's Content-Security-Policy forbids eval, which
    # wait_for_function needs.
    expect(page.locator("#run-state")).to_have_text(re.compile("waiting"))
    assert text(page, "#global-round") == "none"
    assert page.locator("figure.chart").count() == 0

    server.start_agent("site-a", "--set", "offset=1", "--set", "delay=0.4")
    server.start_agent("site-b", "--set", "offset=3", "--set", "delay=0.4")

    # The page follows the run without being reloaded.
    expect(page.locator("#global-round")).to_have_text(
        re.compile(r"^([2-9]|\d\d+)$"), timeout=60_000
    )
    page.wait_for_selector('#agents tr[data-agent="site-a"]')
    assert page.locator("#agents tbody tr").count() == 2
    page.wait_for_selector("figure.chart[data-metric='global.mean']")
    if os.environ.get("FEDLOOP_UPDATE_DOCS_SCREENSHOT") == "1":
        page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)

    server.wait_for(lambda s: s["finished"], timeout=120)
    expect(page.locator("#run-state")).to_have_text("finished", timeout=10_000)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    assert text(page, "#round") == str(ROUNDS)
    assert text(page, "#rounds-planned").strip() == f"of {ROUNDS}"
    assert text(page, "#global-round") == str(ROUNDS)
    assert text(page, "#agents-total") == "2"
    for name in ("site-a", "site-b"):
        row = page.locator(f'#agents tr[data-agent="{name}"]')
        assert row.locator(".badge").inner_text() in {"connected", "idle"}
        assert "ago" in row.inner_text() or "just now" in row.inner_text()

    # Global metric: one point per global model, rounds 0 … ROUNDS.
    chart = page.locator("figure.chart[data-metric='global.mean']")
    assert chart.get_attribute("data-points") == str(ROUNDS + 1)
    assert chart.locator("path.series").get_attribute("d").count("L") == ROUNDS
    # Local metric: a line per agent and the mean, one point per aggregated round.
    local = page.locator("figure.chart[data-metric='local.loss']")
    assert local.get_attribute("data-points") == str(3 * ROUNDS)
    series = local.locator("path.series")
    assert sorted(series.nth(i).get_attribute("data-series") for i in range(3)) == [
        "mean",
        "site-a",
        "site-b",
    ]
    assert page.locator("figure.chart[data-metric='round.seconds']").count() == 1
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    assert page.errors == []
