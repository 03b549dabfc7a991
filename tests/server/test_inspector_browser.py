"""The inspector page in headless Chromium (Debian's ``chromium``, driven by Playwright with
the system browser) against a live ``pagoda serve`` on the bundled SmolLM2: it loads without
console errors, draws as many blocks as /metrics counts, shows a prefix-cache node with one
hit and a prefill chunk followed by decodes after two requests that share a long prefix, and
leaves a screenshot in tests/artifacts/ (or $PAGODA_TEST_ARTIFACTS)."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from server_utils import REPO, ServerProcess, metric_values, start_server, wait_until_idle

from pagoda.models.loader import default_model_path

pytestmark = pytest.mark.slow

KEY = "inspector-browser-secret"
ARTIFACTS = Path(os.environ.get("PAGODA_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
SHARED = ("You are a careful assistant for the harbour office of a small northern town. "
          "Answer questions about tides, ferries, fishing permits and the lighthouse. ") * 6


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # A small token budget: the long prompts below are prefilled in several chunks.
    srv = start_server(default_model_path(), tmp_path_factory.mktemp("inspector-logs"),
                       "--max-num-batched-tokens", "64", "--num-kv-blocks", "1500")
    yield srv
    srv.stop()
    assert "Traceback (most recent call last)" not in srv.log(), srv.log()[-4000:]


class Console:
    """Every console error and uncaught exception of a page."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))


def complete(url: str, prompt: str, max_tokens: int, stream: bool = False) -> None:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for _ in r.iter_bytes():
            pass


def test_page_shows_pool_tree_and_timeline(browser: Any, smol: ServerProcess) -> None:
    wait_until_idle(smol.url)
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    console = Console(page)
    page.goto(smol.url + "/inspect")
    page.wait_for_selector("#conn.live", timeout=30_000)
    page.wait_for_function("+document.getElementById('grid').dataset.drawn > 0", timeout=30_000)

    total = metric_values(smol.url)["pagoda:kv_cache_total_blocks"]
    grid = page.locator("#grid")
    assert int(grid.get_attribute("data-blocks")) == total == 1500
    assert int(grid.get_attribute("data-drawn")) == total

    complete(smol.url, SHARED + "When does the first ferry leave?", 12)
    complete(smol.url, SHARED + "Where can I buy a fishing permit?", 12)
    page.wait_for_selector('#tree .seg[data-hits="1"]', timeout=30_000)
    page.wait_for_function(
        "/[PM][PMD]*D{3}/.test(document.getElementById('timeline').dataset.sequence)",
        timeout=30_000)
    hit = page.locator('#tree .seg[data-hits="1"]').first
    assert int(hit.get_attribute("data-blocks")) >= 4  # the shared prefix: one folded trunk
    # Hovering gives the details.
    hit.locator("circle").hover()
    assert re.search(r"hits 1", page.locator("#tip").inner_text())

    # A running request: its row, and its blocks picked out on the grid when clicked. First
    # the two above leave the table (a row of theirs clicked would be unpicked at the next
    # update, when the page learns they ended).
    page.wait_for_function("!document.querySelector('#req-body tr')", timeout=30_000)
    t = threading.Thread(target=complete, args=(smol.url, SHARED + "Tell me about tides.", 200,
                                                True), daemon=True)
    t.start()
    row = page.locator("#req-body tr").first
    row.wait_for(timeout=60_000)
    row.click()
    page.wait_for_selector("#req-body tr.sel", timeout=10_000)
    assert page.evaluate("window.pagodaInspector.selected") == row.get_attribute("data-id")
    page.mouse.move(0, 0)  # no tooltip in the picture
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "inspector.png"), full_page=True)
    t.join(300)
    # The page followed the stream by its deltas, every one applying to the state it held.
    assert page.evaluate("window.pagodaInspector.deltas") > 0
    assert page.evaluate("window.pagodaInspector.dropped") == 0
    assert console.errors == [], console.errors
    page.close()


@pytest.fixture(scope="module")
def keyed(tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[ServerProcess]:
    srv = start_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--num-kv-blocks", "12000",
                       "--api-key", KEY)
    yield srv
    srv.stop()


def test_page_asks_for_the_key_and_draws_a_big_pool(browser: Any, keyed: ServerProcess) -> None:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(keyed.url + "/inspect")
    page.wait_for_selector("#auth-key", state="visible", timeout=30_000)
    page.fill("#auth-key", KEY)
    page.click("#auth button")
    page.wait_for_selector("#conn.live", timeout=30_000)
    page.wait_for_function("+document.getElementById('grid').dataset.drawn === 12000",
                           timeout=30_000)
    # The key also works from the address's fragment (never sent to the server).
    page2 = browser.new_page()
    console = Console(page2)
    page2.goto(keyed.url + f"/inspect#key={KEY}")
    page2.wait_for_selector("#conn.live", timeout=30_000)
    assert console.errors == []
    page.close()
    page2.close()
