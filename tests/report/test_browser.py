"""The leaderboard in a real headless browser: Debian's Chromium (/usr/bin/chromium, installed by
scripts/setup.sh) driven by Playwright, never a browser Playwright downloads itself. The page opens from
file:// with no console errors and no network request, a click on a header sorts its table, links to the
per-attention pages resolve, and a screenshot is taken (into pytest's tmp dir).

The table sorting of the page's own script (numbers numerically, text naturally, empty cells last) on a
table of chosen cells. Without Chromium the tests skip with the reason; under CI=true that skip fails
(tests/conftest.py): set-up installs Chromium there."""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import pytest

import cab.report
from cab.report import render_report
from tests.report.test_report import HOSTILE, RESULTS, write_store
from tests.report.test_report_tasks import task_results

CHROMIUM = "/usr/bin/chromium"
SORTABLE = Path(cab.report.__file__).parent / "templates" / "sortable.js"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing_browser() -> "str | None":
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)) and shutil.which("chromium") is None:
        return f"Chromium is not installed at {CHROMIUM} (scripts/setup.sh installs Debian's chromium)"
    return None


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    reason = _missing_browser()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("browser")
    db = write_store(root / "cab.sqlite", [r for r in RESULTS if r.cell.attention != "evil_attn"] + task_results())
    index = render_report(db, root / "site", fidelity_budget_s=0)
    executable = CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(root / "profile"), executable_path=executable, args=FLAGS, headless=True,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.new_page()
            problems, requests = [], []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
            page.goto(index.as_uri())
            page.wait_for_load_state("load")
            yield page, index, problems, requests, root
        finally:
            context.close()


def test_page_loads_from_file_without_console_errors_or_network(browser_page):
    page, index, problems, requests, root = browser_page
    assert page.title() == "cab leaderboard"
    assert problems == []  # no console errors, no script errors, and the hostile name raised no alert
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    assert page.locator("#support-matrix").is_visible()
    assert HOSTILE in page.locator("#support-matrix").inner_text()
    # figures are decoded by the browser (a broken data URI has naturalWidth 0)
    widths = page.eval_on_selector_all("figure.plot img", "imgs => imgs.map(i => i.naturalWidth)")
    assert widths and all(w > 0 for w in widths)
    shot = root / "overview.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000


def test_clicking_a_header_sorts_the_table(browser_page):
    page, *_ = browser_page
    table = page.locator("#board-CS")
    header = table.locator("thead th", has_text="recall · accuracy")
    column = table.locator("thead th").all_inner_texts().index(header.inner_text())

    def values():
        cells = table.locator("tbody tr").evaluate_all(
            f"rows => rows.map(r => r.cells[{column}].getAttribute('data-sort'))")
        return [float(v) if v else None for v in cells]

    header.click()
    up = values()
    assert header.get_attribute("aria-sort") == "ascending"
    numbers = [v for v in up if v is not None]
    assert numbers == sorted(numbers) and len(numbers) >= 3
    header.click()
    down = [v for v in values() if v is not None]
    assert header.get_attribute("aria-sort") == "descending" and down == sorted(down, reverse=True)


def test_links_to_attention_pages_resolve(browser_page):
    page, index, problems, _, root = browser_page
    hrefs = page.eval_on_selector_all("a.attn", "links => links.map(a => a.href)")
    assert hrefs and all(h.startswith("file://") for h in hrefs)
    performer = page.locator("#board-CS a.attn", has_text="performer").first
    performer.click()
    page.wait_for_load_state("load")
    assert page.locator("#attention-name").inner_text() == "performer"
    assert page.locator("#attention-results tbody tr").count() >= 3
    page.screenshot(path=str(root / "performer.png"))
    page.locator("#back-to-index").click()
    page.wait_for_load_state("load")
    assert page.url == index.as_uri()
    hostile = page.locator("#support-matrix a.attn", has_text=HOSTILE)
    hostile.click()
    page.wait_for_load_state("load")
    assert page.locator("#attention-name").inner_text() == HOSTILE
    assert problems == []


def _sort_with_the_page_script(page, cells) -> "tuple[list, list]":
    """One column of `cells` ((text, data-sort or None)) in a table.sortable with the report's sortable.js,
    in a fresh tab: the column's texts after one header click and after a second."""
    tab = page.context.new_page()
    try:
        rows = "".join(f"<tr><td{'' if key is None else f' data-sort={html.escape(key, quote=True)!r}'}>"
                       f"{html.escape(text)}</td></tr>" for text, key in cells)
        tab.set_content(f"<table class='sortable'><thead><tr><th>x</th></tr></thead><tbody>{rows}</tbody></table>")
        tab.add_script_tag(path=str(SORTABLE))
        header, column = tab.locator("th"), tab.locator("tbody td")
        header.click()
        up = column.all_inner_texts()
        header.click()
        return up, column.all_inner_texts()
    finally:
        tab.close()


def test_sorting_is_numeric_and_keeps_empty_cells_last(browser_page):
    page, *_ = browser_page
    cells = [("10 ms", "10"), ("\u2014", ""), ("9 ms", "9"), ("oom", ""), ("100 ms", "1e2")]
    up, down = _sort_with_the_page_script(page, cells)
    assert up[:3] == ["9 ms", "10 ms", "100 ms"] and set(up[3:]) == {"\u2014", "oom"}
    assert down[:3] == ["100 ms", "10 ms", "9 ms"] and set(down[3:]) == {"\u2014", "oom"}
    up, _ = _sort_with_the_page_script(page, [("b10", None), ("b9", None), ("A1", None)])
    assert up == ["A1", "b9", "b10"]  # natural order, case-insensitive


def test_the_main_page_of_a_quick_run_sized_store_fits_fifteen_screens(browser_page):
    """75 attentions in four patterns: the main page is at most 15 screens of 1400x1000 and 2 MB, nothing
    overflows to the right, and on a pattern page every figure is shown whole (its legend inside the image)."""
    from tests.report.test_rankings import many_results

    page, _, problems, _, root = browser_page
    index = render_report(write_store(root / "big.sqlite", many_results(73)), root / "big", fidelity_budget_s=0)
    assert index.stat().st_size <= 2_000_000
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    height, width = page.evaluate("[document.documentElement.scrollHeight, document.documentElement.scrollWidth]")
    assert height <= 15 * 1000 and width <= 1400, (height, width)
    empty = page.eval_on_selector_all("main > section", "s => s.filter(x => x.innerText.trim() === '' || "
                                      "(x.querySelector('h2') && x.innerText.trim() === "
                                      "x.querySelector('h2').innerText.trim())).map(x => x.id)")
    assert empty == []
    page.screenshot(path=str(root / "big-top.png"))
    page.goto((index.parent / "pattern" / "NS.html").as_uri())
    page.wait_for_load_state("load")
    boxes = page.eval_on_selector_all("figure.plot img", "imgs => imgs.map(i => [i.naturalWidth, "
                                      "i.getBoundingClientRect().right, i.parentElement.getBoundingClientRect().right,"
                                      " document.documentElement.clientWidth])")
    assert boxes
    for natural, right, figure_right, viewport in boxes:
        assert natural > 0 and right <= figure_right + 1 and right <= viewport
    assert problems == []
