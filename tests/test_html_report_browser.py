"""The HTML report in a real browser (Debian's chromium through Selenium): the waterfall and
the histogram render with a size, the console stays clean, and a phone-wide window needs no
horizontal scrolling."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roundtrip.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
)
TIMEOUT = 30

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="chromium and chromium-driver are needed (Debian: chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    assert main(["probe", "--count", "3", "--html", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    browser.set_page_load_timeout(TIMEOUT)
    try:
        yield browser
    finally:
        browser.quit()


def _open(driver: Any, page: Path, width: int) -> None:
    driver.set_window_size(width, 900)
    driver.get(page.as_uri())
    driver.get_log("browser")  # drop anything logged before this page


def _sizes(driver: Any, selector: str) -> list[tuple[float, float]]:
    return [
        (float(r["width"]), float(r["height"]))
        for r in driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map(e => e.getBoundingClientRect().toJSON())",
            selector,
        )
    ]


def _severe(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


@pytest.mark.parametrize("width", [1280, 390])
def test_html_report_browser_plots_render_without_console_errors(
    driver: Any, report: Path, width: int
) -> None:
    _open(driver, report, width)
    waterfall_bars = _sizes(driver, "table.waterfall svg")
    histograms = _sizes(driver, "section.path figure svg")
    assert waterfall_bars and all(w > 0 and h > 0 for w, h in waterfall_bars)
    assert len(histograms) == 2 and all(w > 0 and h > 0 for w, h in histograms)
    assert _severe(driver) == []


def test_html_report_browser_console_check_sees_errors(driver: Any, tmp_path: Path) -> None:
    # The twin: a page that does log an error is caught by the same check.
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><title>x</title><script>console.error('boom')</script>")
    driver.set_window_size(800, 600)
    driver.get(page.as_uri())
    assert any("boom" in entry["message"] for entry in _severe(driver))


def _overflow(driver: Any) -> int:
    return int(
        driver.execute_script(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
    )


def test_html_report_browser_phone_width_has_no_horizontal_overflow(
    driver: Any, report: Path
) -> None:
    _open(driver, report, 390)
    # Open every transcript too: their long lines must wrap, not widen the page.
    driver.execute_script("document.querySelectorAll('details').forEach(d => d.open = true)")
    assert _overflow(driver) <= 0


def test_html_report_browser_overflow_check_sees_a_wide_page(driver: Any, tmp_path: Path) -> None:
    page = tmp_path / "wide.html"
    page.write_text(
        '<!DOCTYPE html><meta name="viewport" content="width=device-width">'
        "<pre>" + "x" * 400 + "</pre>"
    )
    driver.set_window_size(390, 900)
    driver.get(page.as_uri())
    assert _overflow(driver) > 0
