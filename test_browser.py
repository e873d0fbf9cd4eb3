"""The /docs console in Chromium: connect, set up, publish, drop, resume, gaps and JSON errors.

Chromium (Debian's `chromium`) is driven by the `playwright` package through executable_path;
never `playwright install`. Playwright's sync API cannot run inside an asyncio loop, which is why
the in-process server has a thread of its own (ServerHandle). Every wait is one of Playwright's,
with a timeout. Both tests skip, saying what is missing, without playwright or Chromium.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import urllib.parse

import pytest

from conftest import HERE, http_request

pytestmark = [pytest.mark.browser, pytest.mark.slow]


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-proxy-server",
]
WAIT_MS = 10_000


def _playwright():
    """The sync Playwright API, or a skip saying what is missing."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("the browser test needs the playwright package: python3 -m pip install playwright")
    if shutil.which("chromium") is None:
        pytest.skip("the browser test needs Chromium: apt-get install -y chromium")
    return sync_playwright, expect


@contextlib.contextmanager
def console_page(port: int, tmp_path):
    """A fresh Chromium page on /docs; fails afterwards on a page error or a request to another host."""
    sync_playwright, expect = _playwright()
    problems: list[str] = []

    def check_url(url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme in ("data", "blob", "about"):
            return
        if parsed.hostname != "127.0.0.1" or parsed.port != port:
            problems.append(f"request to another host: {url}")

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=shutil.which("chromium"), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900}, color_scheme="light",
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: msg.type == "error" and problems.append(f"console error: {msg.text}"))
            page.on("request", lambda req: check_url(req.url))
            page.on("websocket", lambda ws: check_url(ws.url))
            page.goto(f"http://127.0.0.1:{port}/docs")
            yield page, expect
        finally:
            context.close()
    assert problems == []


def log_entry(page, kind: str, text: str = "", direction: str = "in"):
    """The log entries of one type and direction, optionally containing `text`."""
    entries = page.locator(f'#log .entry[data-type="{kind}"][data-dir="{direction}"]')
    return entries.filter(has_text=text) if text else entries


def send_form(page, kind: str) -> None:
    """Choose a message type in the console's form and press Send."""
    page.select_option("#type", kind)
    page.click("#send")


def test_browser_console_publish_drop_resume(server_factory, tmp_path):
    """In Chromium the console connects, sets up, subscribes, publishes, and after two drops resumes with the missed messages."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        port = server.port
        expect(page.locator("#preset")).to_have_value("/ws")
        expect(page.locator("#url")).to_have_value(f"ws://127.0.0.1:{port}/ws")  # built from the page's origin
        expect(page.locator("#token")).to_have_value("demo")
        expect(page.locator("#topic")).to_have_value("prices")
        page.click("#connect")
        expect(page.locator("#state")).to_have_text("open")

        send_form(page, "setup")
        expect(log_entry(page, "ready")).to_have_count(1)
        session_id = json.loads(log_entry(page, "ready").locator(".tx").inner_text())["sessionId"]
        expect(page.locator("#memory")).to_contain_text(session_id)

        send_form(page, "subscribe")
        expect(log_entry(page, "subscribed", '"topic":"prices"')).to_have_count(1)

        page.select_option("#type", "publish")
        frame = json.loads(page.locator("#preview").inner_text())  # the live preview is the exact frame
        assert (frame["type"], frame["topic"], frame["payload"]) == ("publish", "prices", {"price": 42, "sym": "BTC"})
        page.click("#send")
        expect(log_entry(page, "publish", frame["messageId"], "out")).to_have_count(1)
        expect(log_entry(page, "ack", frame["messageId"])).to_have_count(1)
        expect(log_entry(page, "message", frame["messageId"])).to_have_count(1)
        assert '"status":"ok"' in log_entry(page, "ack").inner_text()

        # Drop 1: the Disconnect button (close 1000); publish over HTTP meanwhile; reconnect + resume.
        page.click("#disconnect")
        expect(page.locator("#state")).to_have_text("closed")
        expect(page.locator("#close-info")).to_contain_text("1000")
        status, _, body = http_request(server.url("/demo/publish/prices?missed=first"))
        assert status == 200 and json.loads(body)["seqNo"] == 2
        page.click("#resume")
        expect(log_entry(page, "resumed", session_id)).to_have_count(1)
        expect(log_entry(page, "message", '"missed":"first"')).to_have_count(1)
        assert '"replayed":1' in log_entry(page, "resumed").inner_text()

        # Drop 2: the server closes the connection (1001); a server-side publish meanwhile; resume again.
        server.call(lambda: [c.close_websocket(1001, "test drop") for c in list(server.server.connections)])
        expect(page.locator("#state")).to_have_text("closed")
        expect(page.locator("#close-info")).to_contain_text("1001")
        expect(page.locator("#close-info")).to_contain_text("test drop")
        assert server.publish("prices", {"missed": "second"}).seq_no == 3
        page.click("#resume")
        expect(log_entry(page, "resumed", session_id)).to_have_count(2)
        expect(log_entry(page, "message", '"missed":"second"')).to_have_count(1)
        expect(page.locator("#state")).to_have_text("open")
        expect(page.locator("#log .entry.gap")).to_have_count(0)  # a resume leaves no gap

        # The HTTP panel: the /demo/publish form and the POST /publish form, each delivered live.
        page.fill("#demo-topic", "prices")
        page.fill("#demo-query", "via=demo-form")
        page.click("#demo-send")
        expect(page.locator("#demo-result")).to_contain_text("200")
        expect(page.locator("#demo-result")).to_contain_text("GET /demo/publish/prices?via=demo-form HTTP/1.1")
        expect(log_entry(page, "message", '"via":"demo-form"')).to_have_count(1)
        page.click("#post-send")
        expect(page.locator("#post-result")).to_contain_text('"status": "ok"')
        expect(log_entry(page, "message", '"price":43')).to_have_count(1)
        expect(page.locator("#stats")).to_contain_text('"connections": 1')

        # The console's two cards down to the bottom of the log (small enough to commit: < 200 KB).
        log_entry(page, "resumed").last.click()  # pretty-printed JSON on click
        expect(log_entry(page, "resumed").last.locator("pre")).to_contain_text('"replayed": 1')
        page.evaluate("document.querySelector('#log').scrollTop = 1e9; window.scrollTo(0, 0)")
        page.mouse.move(0, 0)  # no hover highlight in the picture
        grid, log = page.locator("#console + .grid").bounding_box(), page.locator("#log").bounding_box()
        clip = {"x": grid["x"], "y": grid["y"], "width": grid["width"], "height": log["y"] + log["height"] + 13 - grid["y"]}
        shot = tmp_path / "console.png"
        page.screenshot(path=str(shot), clip=clip)
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("MICROSOCKET_SCREENSHOT") == "1":
            os.makedirs(os.path.join(HERE, "docs"), exist_ok=True)
            with open(os.path.join(HERE, "docs", "console.png"), "wb") as f:
                f.write(data)


def test_browser_console_gap_and_json_errors(server_factory, tmp_path):
    """In Chromium the console highlights a seqNo gap and says where a payload's JSON is invalid."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        page.uncheck("#auto")  # no automatic replay, so the gap stays visible
        page.click("#connect")
        expect(page.locator("#state")).to_have_text("open")
        send_form(page, "setup")
        expect(log_entry(page, "ready")).to_have_count(1)
        send_form(page, "subscribe")
        expect(log_entry(page, "subscribed")).to_have_count(1)
        http_request(server.url("/demo/publish/prices?n=1"))
        expect(log_entry(page, "message", '"n":"1"')).to_have_count(1)
        send_form(page, "unsubscribe")
        expect(log_entry(page, "unsubscribed")).to_have_count(1)
        http_request(server.url("/demo/publish/prices?n=2"))  # missed: seqNo 2
        send_form(page, "subscribe")
        expect(log_entry(page, "subscribed")).to_have_count(2)
        http_request(server.url("/demo/publish/prices?n=3"))
        gap = page.locator("#log .entry.gap")
        expect(gap).to_have_count(1)
        expect(gap).to_contain_text('"n":"3"')
        expect(gap).to_contain_text("gap: seqNo 2 missing")

        page.select_option("#type", "publish")
        page.fill("#payload", '{"price": 42,,}')
        expect(page.locator("#payload-err")).to_contain_text("line 1, column 14")
        expect(page.locator("#send")).to_be_disabled()
        page.fill("#payload", '{"price": 42}')
        expect(page.locator("#payload-err")).to_have_text("")
        expect(page.locator("#send")).to_be_enabled()
