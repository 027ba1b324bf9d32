"""The status page at ``/`` in a real headless Chromium (Debian's package).

``natsconn run`` serves two ``generate -> drop`` pipelines; Playwright's Python
package drives ``/usr/bin/chromium`` (``executable_path``; Playwright's own
browser download is never used). The tests show: the page renders, its figures
equal ``/pipelines`` at the same moment, a screenshot is kept under
``tests/artifacts/``, the buttons pause, resume and restart with the token, a
wrong token gets the 401 problem document, a read-only bridge has no buttons, and
the accessibility basics hold (labels, ``lang``, contrast >= 4.5:1, no horizontal
scrolling at 375 px).

Chromium is installed by ``scripts/chromium install`` (from ``scripts/test``);
when it is missing, the fixture runs that script rather than skipping.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, Playwright, sync_playwright

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "page-test-token-7f3a"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


# ----------------------------------------------------------------------- the browser


def _chromium() -> str:
    """Debian's chromium; installed with apt-get (scripts/chromium) when missing."""
    found = subprocess.run([str(ROOT / "scripts" / "chromium"), "path"],
                           capture_output=True, text=True, check=False)
    if found.returncode != 0:
        subprocess.run([str(ROOT / "scripts" / "chromium"), "install"], check=True)
        found = subprocess.run([str(ROOT / "scripts" / "chromium"), "path"],
                               capture_output=True, text=True, check=True)
    return found.stdout.strip()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[BrowserContext]:
    # A fresh profile (--user-data-dir) for every run of the module.
    with tempfile.TemporaryDirectory(prefix="natsconn-chromium-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=_chromium(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser: BrowserContext) -> Iterator[Page]:
    p = browser.new_page()
    p.set_viewport_size({"width": 1280, "height": 900})
    p.set_default_timeout(10_000)
    try:
        yield p
    finally:
        p.close()


# ------------------------------------------------------------------------ the bridge


@dataclass
class Bridge:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())

    def post(self, path: str, token: str | None = TOKEN) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(self.url + path, data=b"", method="POST",
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def pipelines(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.get("/pipelines")["pipelines"]}

    def wait(self, what: str, check: Any, timeout: float = 20.0) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"natsconn exited:\n{self.log.read_text()}"
            try:
                state = self.pipelines()
                if check(state):
                    return state
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(tmp: Path, token: bool) -> Iterator[Bridge]:
    port = _free_port()
    lines = ["http:", f"  address: 127.0.0.1:{port}"]
    if token:
        (tmp / "admin-token").write_text(TOKEN + "\n")
        lines.append(f"  admin_token_file: {tmp / 'admin-token'}")
    lines += [
        "pipelines:",
        "  - name: orders",
        "    source: {type: generate, rate: 400, size: 64}",
        "    sink: {type: drop}",
        "  - name: audit",
        "    source: {type: generate, rate: 50, size: 64}",
        "    sink: {type: drop}",
    ]
    (tmp / "pipelines.yaml").write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "NATSCONN_ADMIN_TOKEN"}
    log = tmp / "natsconn.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "connector.cli", "run", str(tmp / "pipelines.yaml")],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    bridge = Bridge(f"http://127.0.0.1:{port}", proc, log)
    try:
        # Both running, and the sampler has two samples: rates and the chart are drawn.
        bridge.wait("both pipelines running with a throughput history", lambda s: len(s) == 2
                    and all(p["state"] == "running" and len(p["history"]) >= 2
                            for p in s.values()), timeout=60)
        yield bridge
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    assert TOKEN not in log.read_text(), "the admin token was logged"


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    yield from _start(tmp_path, token=True)


@pytest.fixture
def read_only_bridge(tmp_path: Path) -> Iterator[Bridge]:
    yield from _start(tmp_path, token=False)


# ------------------------------------------------------------------------ the page


def _number(text: str) -> float:
    return float(text.replace(",", "").strip())


def figures(page: Page, name: str) -> dict[str, str]:
    """The data-field values of one pipeline's card, as the page shows them."""
    card = page.locator(f'section.pipeline[data-pipeline="{name}"]')
    out: dict[str, str] = card.evaluate(
        "c => Object.fromEntries([...c.querySelectorAll('[data-field]')]"
        ".map(e => [e.dataset.field, e.textContent.trim()]))")
    return out


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"status page screenshot: {path}")
    return path


def card(page: Page, name: str) -> Any:
    return page.locator(f'section.pipeline[data-pipeline="{name}"]')


def button(page: Page, name: str, verb: str) -> Any:
    return card(page, name).get_by_role("button", name=f"{verb.capitalize()} {name}",
                                        exact=True)


def press(page: Page, name: str, verb: str, token: str) -> Any:
    """Type the token into the card's field and press the button for ``verb``;
    the response of the navigation that follows."""
    card(page, name).get_by_label("admin token").fill(token)
    with page.expect_navigation() as nav:
        button(page, name, verb).click()
    return nav.value


# -------------------------------------------------------------------------- tests


def test_the_page_renders_and_its_figures_equal_the_api(bridge: Bridge, page: Page) -> None:
    # A paused pipeline stands still, so its figures must be equal exactly; the
    # running one's counters must lie between the API's reads before and after.
    assert bridge.post("/pipelines/audit/pause") == 202
    still = bridge.wait("audit paused with nothing in flight", lambda s:
                        s["audit"]["state"] == "paused"
                        and s["audit"]["in_flight"]["messages"] == 0)
    time.sleep(0.3)
    before = bridge.pipelines()
    response = page.goto(bridge.url + "/")
    assert response is not None and response.status == 200
    assert response.headers["content-type"].startswith("text/html")
    after = bridge.pipelines()

    assert page.title() == "natsconn: 2 pipeline(s)"
    assert page.locator("h1").inner_text() == "natsconn"
    cards = page.locator("section.pipeline")
    assert [cards.nth(i).get_attribute("data-pipeline") for i in range(cards.count())] \
        == ["orders", "audit"]
    assert page.locator("script").count() == 0, "the page must work without script"
    refresh = page.locator('meta[http-equiv="refresh"]').get_attribute("content")
    assert refresh is not None and int(refresh) > 0
    for name in ("orders", "audit"):
        chart = card(page, name).locator("figure.chart")
        assert chart.count() == 1, f"{name}: no throughput chart"
        assert chart.locator("svg polyline").get_attribute("points")
        assert chart.locator("figcaption").inner_text().startswith("written / s over the last")
    path = screenshot(page, "status-page.png")
    assert path.stat().st_size > 5_000, "the screenshot is (nearly) empty"

    # The paused pipeline: every figure equals the API's.
    audit = figures(page, "audit")
    api = after["audit"]
    assert before["audit"]["totals"] == api["totals"], "the paused pipeline moved"
    assert audit["state"] == api["state"] == "paused"
    assert _number(audit["in_flight"]) == api["in_flight"]["messages"] == 0
    assert _number(audit["max_in_flight"]) == api["in_flight"]["max_messages"] > 0
    assert int(audit["restarts"]) == api["restarts"]
    assert _number(audit["written"]) == api["totals"]["written"] > 0
    assert _number(audit["dead_lettered"]) == api["totals"]["dead_lettered"]
    assert _number(audit["lag"]) == api["lag"]
    assert still["audit"]["totals"]["written"] == api["totals"]["written"]

    # The running pipeline: fixed figures equal, counters between before and after.
    orders = figures(page, "orders")
    assert orders["state"] == before["orders"]["state"] == after["orders"]["state"] \
        == "running"
    assert _number(orders["max_in_flight"]) == after["orders"]["in_flight"]["max_messages"]
    assert 0 <= _number(orders["in_flight"]) <= after["orders"]["in_flight"]["max_messages"]
    assert int(orders["restarts"]) == after["orders"]["restarts"] == 0
    written = _number(orders["written"])
    assert before["orders"]["totals"]["written"] <= written \
        <= after["orders"]["totals"]["written"], (before["orders"]["totals"], written,
                                                  after["orders"]["totals"])
    assert written > 0
    # Rates: the sampler's, every 2 s; at 400/s the page's must be near the API's.
    assert abs(_number(orders["written_per_second"])
               - after["orders"]["rates"]["written_per_second"]) <= 80


def test_the_buttons_pause_resume_and_restart_with_the_token(bridge: Bridge,
                                                             page: Page) -> None:
    page.goto(bridge.url + "/")
    assert button(page, "orders", "pause").count() == 1
    assert button(page, "orders", "resume").count() == 0

    nav = press(page, "orders", "pause", TOKEN)
    assert nav.status == 200 and nav.url == bridge.url + "/", "expected 303 back to /"
    state = bridge.wait("orders paused", lambda s: s["orders"]["state"] == "paused")
    assert state["orders"]["paused"] is True
    assert state["audit"]["state"] == "running", "pausing one paused the other"
    page.goto(bridge.url + "/")
    assert figures(page, "orders")["state"] == "paused"
    assert button(page, "orders", "resume").count() == 1, "a paused pipeline offers Resume"
    assert button(page, "orders", "pause").count() == 0
    screenshot(page, "status-page-paused.png")

    written = bridge.pipelines()["orders"]["totals"]["written"]
    nav = press(page, "orders", "resume", TOKEN)
    assert nav.status == 200 and nav.url == bridge.url + "/"
    bridge.wait("orders running and writing again", lambda s:
                s["orders"]["state"] == "running" and not s["orders"]["paused"]
                and s["orders"]["totals"]["written"] > written)
    page.goto(bridge.url + "/")
    assert button(page, "orders", "pause").count() == 1
    assert figures(page, "orders")["state"] == "running"

    # Restart: asked for, so counted in reloads, not in restarts (failures).
    nav = press(page, "audit", "restart", TOKEN)
    assert nav.status == 200 and nav.url == bridge.url + "/"
    state = bridge.wait("audit restarted", lambda s: s["audit"]["reloads"] == 1
                        and s["audit"]["state"] == "running")
    assert state["audit"]["restarts"] == 0
    page.goto(bridge.url + "/")
    audit = figures(page, "audit")
    assert audit["restarts"] == "0"
    assert "(+1 asked for)" in card(page, "audit").locator(
        '[data-field="restarts"]').locator("xpath=..").inner_text()


def test_a_wrong_token_gets_the_401_problem(bridge: Bridge, page: Page) -> None:
    page.goto(bridge.url + "/")
    nav = press(page, "orders", "pause", "not-the-token")
    assert nav.status == 401
    assert nav.headers["content-type"] == "application/problem+json"
    problem = json.loads(page.locator("body").inner_text())
    assert problem["status"] == 401 and problem["title"] == "Unauthorized"
    assert problem["instance"] == "/pipelines/orders/pause"
    assert "not-the-token" not in page.content()
    time.sleep(0.3)
    assert bridge.pipelines()["orders"]["state"] == "running", "a wrong token paused it"
    assert bridge.post("/pipelines/orders/pause", token=None) == 401


def test_a_token_being_typed_survives_the_refresh(bridge: Bridge, page: Page) -> None:
    page.goto(bridge.url + "/")
    page.get_by_role("link", name="stop refreshing").click()
    page.wait_for_url("**/?refresh=off")
    assert page.locator('meta[http-equiv="refresh"]').count() == 0
    field = card(page, "orders").get_by_label("admin token")
    field.fill(TOKEN[:6])  # halfway through typing it
    page.wait_for_timeout(6_500)
    assert card(page, "orders").get_by_label("admin token").input_value() == TOKEN[:6]


def test_without_a_token_the_page_has_no_buttons(read_only_bridge: Bridge, page: Page) -> None:
    response = page.goto(read_only_bridge.url + "/")
    assert response is not None and response.status == 200
    assert page.locator("section.pipeline").count() == 2
    assert page.locator("form, button, input").count() == 0
    assert "read-only" in page.locator("header").inner_text()
    assert read_only_bridge.post("/pipelines/orders/pause") == 403


# ----------------------------------------------------------------- accessibility

# Every element with its own visible text: its colour and the colour behind it,
# composited over the ancestors' backgrounds (and the white canvas).
_COLOURS = """() => {
  const rgba = c => {
    const m = c.match(/rgba?\\(([^)]*)\\)/);
    if (!m) throw new Error('unexpected colour ' + c);
    const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1];
  };
  const over = (top, under) => {
    const a = top[3];
    return [0, 1, 2].map(i => top[i] * a + under[i] * (1 - a)).concat([1]);
  };
  const behind = el => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) layers.push(rgba(getComputedStyle(e).backgroundColor));
    let bg = [255, 255, 255, 1];
    for (const layer of layers.reverse()) bg = over(layer, bg);
    return bg;
  };
  const out = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (el.closest('svg')) continue;
    const own = [...el.childNodes].filter(n => n.nodeType === 3 && n.textContent.trim());
    if (!own.length || !el.getClientRects().length) continue;
    const style = getComputedStyle(el);
    if (style.visibility === 'hidden' || style.display === 'none') continue;
    const bg = behind(el);
    out.push({text: own.map(n => n.textContent.trim()).join(' ').slice(0, 40),
              tag: el.tagName.toLowerCase() + (el.className ? '.' + el.className : ''),
              fg: over(rgba(style.color), bg), bg});
  }
  return out;
}"""


def _luminance(rgb: list[float]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(fg: list[float], bg: list[float]) -> float:
    hi, lo = sorted((_luminance(fg), _luminance(bg)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_ratio_formula() -> None:
    assert contrast([0, 0, 0], [255, 255, 255]) == pytest.approx(21.0)
    assert contrast([118, 118, 118], [255, 255, 255]) == pytest.approx(4.54, abs=0.01)


def test_accessibility_basics(bridge: Bridge, page: Page) -> None:
    # One pipeline paused, so the page shows both state colours and both forms.
    assert bridge.post("/pipelines/audit/pause") == 202
    bridge.wait("audit paused", lambda s: s["audit"]["state"] == "paused")
    page.goto(bridge.url + "/")

    lang = page.locator("html").get_attribute("lang")
    assert lang and re.fullmatch(r"[a-z]{2,3}(-[A-Za-z0-9]+)*", lang), lang

    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => e.type !== 'hidden')
        .filter(e => !(e.labels && [...e.labels].some(l => l.textContent.trim()))
                     && !(e.getAttribute('aria-label') || '').trim())
        .map(e => e.outerHTML)""")
    assert page.locator("input").count() == 2, "expected a token field per pipeline"
    assert unlabelled == []
    nameless = page.evaluate("""() => [...document.querySelectorAll('button, a')]
        .filter(e => !e.textContent.trim() && !e.getAttribute('aria-label'))
        .map(e => e.outerHTML)""")
    assert nameless == []

    texts = page.evaluate(_COLOURS)
    assert len(texts) > 20, texts
    low = [(t["tag"], t["text"], round(contrast(t["fg"], t["bg"]), 2)) for t in texts
           if contrast(t["fg"], t["bg"]) < 4.5]
    assert low == [], f"text below 4.5:1 contrast: {low}"
    kinds = {t["tag"] for t in texts}
    assert {"span.state state-running", "span.state state-paused", "button",
            "button.secondary"} <= kinds, kinds

    page.set_viewport_size({"width": 375, "height": 800})
    page.goto(bridge.url + "/")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"horizontal scrolling at 375 px: the page is {width} px wide"
    wide = page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > 375.5)
        .map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : ''))""")
    assert wide == [], f"elements past the right edge at 375 px: {wide}"
    screenshot(page, "status-page-375px.png")
