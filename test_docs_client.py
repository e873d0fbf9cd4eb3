"""Browser tests of docs.html: its MicroSocketClient and console, in Chromium, against a live server.

Chromium is Debian's `/usr/bin/chromium`, driven by the `playwright` pip package through
executable_path (never `playwright install`); each test skips with the reason when either is
missing. Playwright's sync API cannot run inside an asyncio loop, so the server runs in its own
thread with an injectable fake clock, and the test calls into that loop for anything that touches
the server (publish, the timer sweep). Every wait has a timeout, and an alarm bounds each test.

Marker: `browser` (registered by the project's conftest.py when there is one; an unregistered
marker is only a warning, so this file does not register it itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import threading
import time
import urllib.parse
import urllib.request

import pytest

import microsocket as ms

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
WAIT_MS = 10_000  # every Playwright wait
TEST_TIMEOUT = 90  # seconds for one test as a whole, enforced by SIGALRM
TOPIC = "prices"

# Chromium's console error when it offered a subprotocol and the server selected none. The page's
# client then retries without one (a server before microsocket.v1); test_client_gets_the_subprotocol
# is the test that says whether this server selects it.
NO_SUBPROTOCOL = "Sent non-empty 'Sec-WebSocket-Protocol' header but no response was received"


@pytest.fixture(autouse=True)
def _test_timeout():
    """Fail a test that runs longer than TEST_TIMEOUT instead of hanging the suite."""

    def expire(signum, frame):
        raise TimeoutError(f"test took longer than {TEST_TIMEOUT} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_TIMEOUT)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


class FakeClock:
    """An injectable clock that only moves when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.contextmanager
def running_server(clock: FakeClock | None = None, **options):
    """A Server on 127.0.0.1, any free port, in its own thread and event loop; yields the Server."""
    ready = threading.Event()
    state: dict = {}

    async def main():
        server = ms.Server(ms.Config(host="127.0.0.1", port=0, **options), clock=clock or time.monotonic)
        await server.start()
        state["server"], state["loop"], state["stop"] = server, asyncio.get_running_loop(), asyncio.Event()
        ready.set()
        await state["stop"].wait()
        await server.close(grace=1.0)

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "server thread did not start"
    try:
        yield state["server"]
    finally:
        state["loop"].call_soon_threadsafe(state["stop"].set)
        thread.join(10)


def in_loop(server, fn):
    """Run fn() in the server's event-loop thread and return its result (5 s at most)."""

    async def call():
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), server.loop).result(5)


def publish(server, topic: str, data) -> ms.PublishResult:
    """await server.publish(topic, data) in the server's loop; its PublishResult."""

    async def call():
        return await server.publish(topic, data)

    return asyncio.run_coroutine_threadsafe(call(), server.loop).result(5)


def get_json(server, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
        return json.loads(response.read())


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def sweep(server) -> str:
    """Run the server's once-a-second timer sweep now, at its clock's time."""
    in_loop(server, server.tick)
    return "Server.tick()"


@contextlib.contextmanager
def docs_page(server):
    """A fresh Chromium page on /docs; fails afterwards on a page error, a console error or a request to another host."""
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.skip("needs the playwright package: python3 -m pip install playwright")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"needs Chromium at {CHROMIUM}: apt-get install -y chromium")
    problems: list[str] = []

    def check_url(url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("data", "blob", "about") and (parsed.hostname, parsed.port) != ("127.0.0.1", server.port):
            problems.append(f"request to another host: {url}")

    def check_console(msg) -> None:
        if msg.type == "error" and NO_SUBPROTOCOL not in msg.text:
            problems.append(f"console error: {msg.text}")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", check_console)
            page.on("request", lambda req: check_url(req.url))
            page.on("websocket", lambda ws: check_url(ws.url))
            page.goto(f"http://127.0.0.1:{server.port}/docs")
            yield page, expect
        finally:
            browser.close()
    assert problems == []


def log_entries(page, kind: str, text: str = "", direction: str = "in"):
    """The console log's entries of one type and direction, optionally containing `text`."""
    entries = page.locator(f'#log .entry[data-type="{kind}"][data-dir="{direction}"]')
    return entries.filter(has_text=text) if text else entries


def send_form(page, kind: str) -> None:
    """Choose a message type in the console's form and press Send."""
    page.select_option("#type", kind)
    page.click("#send")


def connect_and_subscribe(page, expect) -> None:
    """Connect with the console (setup sent by the client on connect) and subscribe to TOPIC."""
    page.check("#autosetup")
    page.click("#connect")
    expect(page.locator("#state")).to_have_text("open")
    expect(log_entries(page, "ready")).to_have_count(1)
    page.select_option("#type", "subscribe")
    page.fill("#topic", TOPIC)
    page.click("#send")
    expect(log_entries(page, "subscribed", f'"topic":"{TOPIC}"')).to_have_count(1)


def verdicts(page, marker: str) -> list[tuple[int, str]]:
    """(seqNo, the client's decision) of every received message whose data contains `marker`, in log order."""
    return page.evaluate(
        """marker => [...document.querySelectorAll('#log .entry[data-type="message"][data-dir="in"]')]
            .filter(d => d._raw.includes(marker))
            .map(d => [JSON.parse(d._raw).seqNo, d.dataset.verdict || ''])""",
        marker,
    )


# === the silent-loss scenario: a topic forgotten while the client was away ========================


def test_client_delivers_every_message_after_the_topic_started_again():
    """After the server forgot an idle topic (its counter restarts at 1), the page's client, coming back, delivers every new message instead of dropping them as duplicates of its old position."""
    clock = FakeClock()
    with running_server(clock, session_ttl=5, history_age=5) as server, docs_page(server) as (page, expect):
        connect_and_subscribe(page, expect)
        before = 8
        for n in range(1, before + 1):
            publish(server, TOPIC, {"round": "before", "n": n})
        expect(log_entries(page, "message", '"round":"before"')).to_have_count(before)
        expect(page.locator('#log .entry[data-type="message"][data-verdict="delivered"]')).to_have_count(before)
        assert page.evaluate(f"window.microsocketClient.positions[{TOPIC!r}].seqNo") == before
        first_epoch = json.loads(log_entries(page, "subscribed").first.locator(".tx").inner_text()).get("epoch")

        # Away: the page disconnects; past max(session TTL, history age) the sweep forgets the
        # session, the retained messages and the topic's counter.
        page.click("#disconnect")
        expect(page.locator("#state")).to_have_text("closed")
        wait_until(lambda: get_json(server, "/stats")["connections"] == 0, "the server to see the close")
        clock.advance(11)
        how = sweep(server)
        stats = get_json(server, "/stats")
        assert (stats["sessions"], stats["sequenced_topics"], stats["history"]["messages"]) == (0, 0, 0), (how, stats)

        # Back: reconnect + resume; the session is gone (SESSION_EXPIRED), so the client subscribes again.
        page.click("#resume")
        expect(log_entries(page, "error", "SESSION_EXPIRED")).to_have_count(1)
        expect(log_entries(page, "subscribed", f'"topic":"{TOPIC}"')).to_have_count(2)
        after = before  # as many as before: under the bug every one of them is at or below the old position
        for n in range(1, after + 1):
            result = publish(server, TOPIC, {"round": "after", "n": n})
            assert result.seq_no == n and result.subscribers == 1, result  # the counter did start again
        expect(log_entries(page, "message", '"round":"after"')).to_have_count(after)
        expect(page.locator('#log .entry[data-type="message"][data-verdict="pending"]')).to_have_count(0)
        second = json.loads(log_entries(page, "subscribed").last.locator(".tx").inner_text())
        got = verdicts(page, '"round":"after"')
        assert got == [[n, "delivered"] for n in range(1, after + 1)], (
            f"messages the client did not deliver after the topic restarted (topic epoch before "
            f"{first_epoch!r}, after {second.get('epoch')!r}): {got}"
        )
        assert page.evaluate(f"window.microsocketClient.positions[{TOPIC!r}]") == {"epoch": second.get("epoch"), "seqNo": after}


# === limits shown on the page are the server's ===================================================


def test_page_shows_the_limits_the_server_runs_with():
    """Every limit the page shows is the running server's configured value from /asyncapi.json, not a default typed into the page."""
    options = dict(
        max_topic_length=77, max_subscriptions=12, max_message_id_length=99, max_message_size=3 * 1024 * 1024,
        max_buffer=5 * 1024 * 1024, max_body_size=2 * 1024 * 1024, session_ttl=33, history_age=44, history_messages=55, setup_timeout=7,
        ping_interval=9, ping_timeout=8, publish_rate=321, publish_burst=654, dedup_window=1234, demo=False,
    )
    with running_server(**options) as server, docs_page(server) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        limits = ms.protocol_limits(server.config)
        assert get_json(server, "/asyncapi.json")["info"]["x-limits"] == limits
        shown = page.evaluate(
            "[...document.querySelectorAll('[data-limit]')].map(e => [e.dataset.limit, e.dataset.value ?? null, e.textContent])"
        )
        keys = {key for key, _, _ in shown}
        assert set(limits) <= keys, f"limits the page does not show: {set(limits) - keys}"
        for key, value, text in shown:
            if key in limits:
                assert value is not None and json.loads(value) == limits[key], (key, value, limits[key])
                assert text and "…" not in text and "not reported" not in text, (key, text)
            else:  # a limit this server does not report: said so, not a number made up by the page
                assert value is None and "not reported" in text, (key, value, text)
        by_key = {key: text for key, _, text in shown}
        assert (by_key["maxTopicLength"], by_key["maxMessageSize"], by_key["sessionTtl"], by_key["publishRate"]) == (
            "77", "3 MiB", "33 s", "321/s",
        )
        assert by_key["demoPublish"] == "off"
        expect(page.locator("#close-info")).to_contain_text("7 s")  # the 4000 hint before connecting
        table = page.locator("#limits + .tw").inner_text()
        for default in ("256", "1 MiB", "120 s", "1,000/s"):
            assert default not in table, f"a default value {default!r} in the limits table of a server configured otherwise"


# === order: ack before the publisher's own message ================================================


def test_ack_is_logged_before_the_publishers_own_message():
    """When the page publishes to a topic it is subscribed to, the log shows the ack before its own copy of the message."""
    with running_server() as server, docs_page(server) as (page, expect):
        connect_and_subscribe(page, expect)
        page.select_option("#type", "publish")
        message_id = json.loads(page.locator("#preview").inner_text())["messageId"]
        page.click("#send")
        expect(log_entries(page, "ack", message_id)).to_have_count(1)
        expect(log_entries(page, "message", message_id)).to_have_count(1)
        order = page.evaluate(
            """id => [...document.querySelectorAll('#log .entry[data-dir="in"]')]
                .filter(d => d._raw.includes(id)).map(d => d.dataset.type)""",
            message_id,
        )
        assert order == ["ack", "message"], order


# === the subprotocol and the shown source =========================================================


def test_client_gets_the_subprotocol():
    """The page's client offers microsocket.v1 and the server selects it: the socket's protocol is microsocket.v1 on the first try."""
    with running_server() as server, docs_page(server) as (page, expect):
        page.click("#connect")
        expect(page.locator("#state")).to_have_text("open")
        opened = page.locator('#log .entry[data-type="open"][data-dir="event"]')
        expect(opened).to_have_count(1)
        assert page.evaluate("window.microsocketClient.ws.protocol") == "microsocket.v1"
        expect(opened).to_contain_text('subprotocol "microsocket.v1"')
        expect(page.locator('#log .entry[data-type="connecting"]')).to_have_count(1)  # no retry without it


def test_shown_client_source_is_the_code_the_console_runs():
    """The MicroSocketClient source shown on the page is exactly the class the console's client is an instance of."""
    with running_server() as server, docs_page(server) as (page, expect):
        shown = page.locator("#client-src").inner_text()
        running = page.evaluate("window.microsocketClient.constructor.toString()")
        assert shown.strip() == running.strip()
        assert "class MicroSocketClient" in shown and "epochs" in shown
