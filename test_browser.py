"""The /docs page in Chromium: the console (connect, set up, publish, drop, resume, gaps, JSON
errors) and its MicroSocketClient (per-topic epochs after a topic starts again, the live limits,
ack before the publisher's own message, the microsocket.v1 subprotocol, the source it shows), and
permessage-deflate as Chromium negotiates it by itself (or gets none from a server without it).

Chromium (Debian's `chromium`) is driven by the `playwright` package through executable_path;
never `playwright install`. Playwright's sync API cannot run inside an asyncio loop, which is why
the in-process server has a thread of its own (ServerHandle). Every wait is one of Playwright's,
with a timeout. Every test skips, saying what is missing, without playwright or Chromium.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import os
import shutil
import time
import urllib.parse

import pytest

import microsocket as ms
from conftest import HERE, FakeClock, http_request, wait_until

pytestmark = [pytest.mark.browser, pytest.mark.slow]


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-proxy-server",
]
WAIT_MS = 10_000
TOPIC = "prices"


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


# === the JS client: per-topic epochs, live limits, order, subprotocol, shown source ===============


def connect_and_subscribe(page, expect) -> None:
    """Connect with the console (setup sent by the client on connect) and subscribe to TOPIC."""
    page.check("#autosetup")
    page.click("#connect")
    expect(page.locator("#state")).to_have_text("open")
    expect(log_entry(page, "ready")).to_have_count(1)
    page.select_option("#type", "subscribe")
    page.fill("#topic", TOPIC)
    page.click("#send")
    expect(log_entry(page, "subscribed", f'"topic":"{TOPIC}"')).to_have_count(1)


def verdicts(page, marker: str) -> list[tuple[int, str]]:
    """(seqNo, the client's decision) of every received message whose data contains `marker`, in log order."""
    return page.evaluate(
        """marker => [...document.querySelectorAll('#log .entry[data-type="message"][data-dir="in"]')]
            .filter(d => d._raw.includes(marker))
            .map(d => [JSON.parse(d._raw).seqNo, d.dataset.verdict || ''])""",
        marker,
    )


# === the silent-loss scenario: a topic forgotten while the client was away ========================


def test_client_delivers_every_message_after_the_topic_started_again(server_factory, tmp_path):
    """After the server forgot an idle topic (its counter restarts at 1), the page's client, coming back, delivers every new message instead of dropping them as duplicates of its old position."""
    clock = FakeClock()
    server = server_factory(clock=clock, session_ttl=5, history_age=5)
    with console_page(server.port, tmp_path) as (page, expect):
        connect_and_subscribe(page, expect)
        before = 8
        for n in range(1, before + 1):
            server.publish(TOPIC, {"round": "before", "n": n})
        expect(log_entry(page, "message", '"round":"before"')).to_have_count(before)
        expect(page.locator('#log .entry[data-type="message"][data-verdict="delivered"]')).to_have_count(before)
        assert page.evaluate(f"window.microsocketClient.positions[{TOPIC!r}].seqNo") == before
        first_epoch = json.loads(log_entry(page, "subscribed").first.locator(".tx").inner_text()).get("epoch")

        # Away: the page disconnects; past max(session TTL, history age) the sweep forgets the
        # session, the retained messages and the topic's counter.
        page.click("#disconnect")
        expect(page.locator("#state")).to_have_text("closed")
        wait_until(lambda: server.stats()["connections"] == 0, what="the server to see the close")
        clock.advance(11)
        server.tick()
        stats = server.stats()
        assert (stats["sessions"], stats["sequenced_topics"], stats["history"]["messages"]) == (0, 0, 0), stats

        # Back: reconnect + resume; the session is gone (SESSION_EXPIRED), so the client subscribes again.
        page.click("#resume")
        expect(log_entry(page, "error", "SESSION_EXPIRED")).to_have_count(1)
        expect(log_entry(page, "subscribed", f'"topic":"{TOPIC}"')).to_have_count(2)
        after = before  # as many as before: under the bug every one of them is at or below the old position
        for n in range(1, after + 1):
            result = server.publish(TOPIC, {"round": "after", "n": n})
            assert result.seq_no == n and result.subscribers == 1, result  # the counter did start again
        expect(log_entry(page, "message", '"round":"after"')).to_have_count(after)
        expect(page.locator('#log .entry[data-type="message"][data-verdict="pending"]')).to_have_count(0)
        second = json.loads(log_entry(page, "subscribed").last.locator(".tx").inner_text())
        got = verdicts(page, '"round":"after"')
        assert got == [[n, "delivered"] for n in range(1, after + 1)], (
            f"messages the client did not deliver after the topic restarted (topic epoch before "
            f"{first_epoch!r}, after {second.get('epoch')!r}): {got}"
        )
        assert page.evaluate(f"window.microsocketClient.positions[{TOPIC!r}]") == {"epoch": second.get("epoch"), "seqNo": after}


# === limits shown on the page are the server's ===================================================


def test_page_shows_the_limits_the_server_runs_with(server_factory, tmp_path):
    """Every limit the page shows is the running server's configured value from /asyncapi.json, not a default typed into the page."""
    options = dict(
        max_topic_length=77, max_subscriptions=12, max_message_id_length=99, max_message_size=3 * 1024 * 1024,
        max_buffer=5 * 1024 * 1024, max_body_size=2 * 1024 * 1024, session_ttl=33, history_age=44, history_messages=55, setup_timeout=7,
        ping_interval=9, ping_timeout=8, publish_rate=321, publish_burst=654, dedup_window=1234, demo=False,
    )
    server = server_factory(**options)
    with console_page(server.port, tmp_path) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        limits = ms.protocol_limits(server.server.config)
        assert http_request(server.url("/asyncapi.json")).json()["info"]["x-limits"] == limits
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


def test_ack_is_logged_before_the_publishers_own_message(server_factory, tmp_path):
    """When the page publishes to a topic it is subscribed to, the log shows the ack before its own copy of the message."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        connect_and_subscribe(page, expect)
        page.select_option("#type", "publish")
        message_id = json.loads(page.locator("#preview").inner_text())["messageId"]
        page.click("#send")
        expect(log_entry(page, "ack", message_id)).to_have_count(1)
        expect(log_entry(page, "message", message_id)).to_have_count(1)
        order = page.evaluate(
            """id => [...document.querySelectorAll('#log .entry[data-dir="in"]')]
                .filter(d => d._raw.includes(id)).map(d => d.dataset.type)""",
            message_id,
        )
        assert order == ["ack", "message"], order


# === the subprotocol and the shown source =========================================================


def test_client_gets_the_subprotocol(server_factory, tmp_path):
    """The page's client offers microsocket.v1 and the server selects it: the socket's protocol is microsocket.v1 on the first try."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        page.click("#connect")
        expect(page.locator("#state")).to_have_text("open")
        opened = page.locator('#log .entry[data-type="open"][data-dir="event"]')
        expect(opened).to_have_count(1)
        assert page.evaluate("window.microsocketClient.ws.protocol") == "microsocket.v1"
        expect(opened).to_contain_text('subprotocol "microsocket.v1"')
        expect(page.locator('#log .entry[data-type="connecting"]')).to_have_count(1)  # no retry without it


def test_shown_client_source_is_the_code_the_console_runs(server_factory, tmp_path):
    """The MicroSocketClient source shown on the page is exactly the class the console's client is an instance of."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        shown = page.locator("#client-src").inner_text()
        running = page.evaluate("window.microsocketClient.constructor.toString()")
        assert shown.strip() == running.strip()
        assert "class MicroSocketClient" in shown and "epochs" in shown


# === signed messages: the console checks each message's sig =======================================

SIGN_SECRET = "a-signing-secret-of-at-least-32-bytes"
# RFC 8785 §3.2.3's sorting example (keys ordered by UTF-16 code units, not by code points: the
# emoji, a surrogate pair, sorts before U+FB33) and numbers whose ECMAScript form differs from
# Python's repr: what the page's own JCS must write exactly as the server's to verify.
TRICKY = {
    "case": "tricky",
    "sort": {"\u20ac": "Euro Sign", "\r": "Carriage Return", "\ufb33": "Hebrew Letter Dalet With Dagesh",
             "1": "One", "\U0001f600": "Emoji: Grinning Face", "\u0080": "Control", "\u00f6": "Latin Small Letter O With Diaeresis"},
    "numbers": [2.0, 1e21, 1e-7, -0.0, 0.1, 333333333.33333329, 9007199254740992, -1.5e-300, 4.35],
    "strings": ["\u2028", "\x7f", "\x1f\"\\/", "é"],
}


def signature_of(page, marker: str) -> tuple[str | None, dict]:
    """(the console's signature verdict, the message as received) of the one received message whose text contains `marker`."""
    entry = log_entry(page, "message", marker)
    return entry.get_attribute("data-signature"), json.loads(entry.evaluate("d => d._raw"))


def test_console_verifies_message_signatures(server_factory, tmp_path):
    """With the server's --sign-key KID=SECRET in the console's signing key field, every message
    (one published by the page, one from the server with RFC 8785's key-order and number cases) is
    shown as "signature ok"; with a wrong secret for that kid as "signature bad"; with another kid as
    "unknown kid"; without a key as signed but not checked."""
    server = server_factory(sign_keys=("k1=" + SIGN_SECRET,))
    with console_page(server.port, tmp_path) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        expect(page.locator("#sign-hint")).to_contain_text("this server signs every message")
        page.fill("#sign-key", "k1=" + SIGN_SECRET)
        expect(page.locator("#sign-hint")).to_contain_text('checked against key "k1"')
        connect_and_subscribe(page, expect)

        page.select_option("#type", "publish")
        page.fill("#payload", '{"price": 42.0, "sym": "BTC", "z": {"b": [1e21, -0.5], "a": null}}')
        message_id = json.loads(page.locator("#preview").inner_text())["messageId"]
        page.click("#send")
        expect(log_entry(page, "message", message_id)).to_have_attribute("data-signature", "ok")
        expect(log_entry(page, "message", message_id).locator(".sig")).to_have_text("signature ok")
        verdict, msg = signature_of(page, message_id)
        assert msg["kid"] == "k1" and msg["sig"] == ms.sign_message(SIGN_SECRET.encode(), TOPIC, msg["seqNo"], message_id, msg["data"])

        server.publish(TOPIC, TRICKY)
        expect(log_entry(page, "message", '"case":"tricky"')).to_have_attribute("data-signature", "ok")

        # The same kid with another secret: every signature is bad.
        page.fill("#sign-key", "k1=" + "x" * 40)
        server.publish(TOPIC, {"case": "wrong-secret"})
        expect(log_entry(page, "message", '"case":"wrong-secret"')).to_have_attribute("data-signature", "bad")
        expect(log_entry(page, "message", '"case":"wrong-secret"').locator(".sig")).to_have_text("signature bad")

        # A key for another kid only: the message names a key the page does not hold.
        page.fill("#sign-key", "k2=" + SIGN_SECRET)
        server.publish(TOPIC, {"case": "other-kid"})
        expect(log_entry(page, "message", '"case":"other-kid"')).to_have_attribute("data-signature", "unknown-kid")

        # No key: signed, not checked.
        page.fill("#sign-key", "")
        server.publish(TOPIC, {"case": "no-key"})
        expect(log_entry(page, "message", '"case":"no-key"')).to_have_attribute("data-signature", "unchecked")

        # The right key again: a replay of the first messages verifies (history keeps the signature).
        page.fill("#sign-key", "k1=" + SIGN_SECRET)
        page.select_option("#type", "replay")
        page.fill("#fromSeq", "1")
        page.click("#send")
        expect(log_entry(page, "replayed")).to_have_count(1)
        replayed = page.locator('#log .entry[data-type="message"][data-dir="in"][data-signature="ok"]')
        expect(replayed).to_have_count(2 + 5)  # the two verified before, and all five again


def test_console_marks_unsigned_messages_when_a_key_is_given(server_factory, tmp_path):
    """With a signing key in the console but a server that does not sign, each message is shown as
    "unsigned" (a stripped signature is not taken for a good one), and the hint says the server does not sign."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        page.fill("#sign-key", "k1=" + SIGN_SECRET)
        expect(page.locator("#sign-hint")).to_contain_text("this server does not sign")
        connect_and_subscribe(page, expect)
        server.publish(TOPIC, {"case": "plain"})
        expect(log_entry(page, "message", '"case":"plain"')).to_have_attribute("data-signature", "unsigned")
        expect(log_entry(page, "message", '"case":"plain"').locator(".sig")).to_have_text("unsigned")


# === JWT auth: the token hint, expiresAt, refresh and 4003 ========================================

JWT_SECRET = "a-jwt-secret-of-at-least-thirty-two-bytes"


def hs256_token(secret: str, **claims) -> str:
    """A compact JWS (HS256) of `claims`, made with the standard library only."""
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = b64(hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


def iso(exp: int) -> str:
    """Unix seconds as the console writes them (Date.toISOString without milliseconds)."""
    return datetime.datetime.fromtimestamp(exp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_console_shows_expiry_refreshes_and_explains_4003(server_factory, tmp_path):
    """With JWT auth the token hint asks for a JWT; the console shows ready's expiresAt, its Refresh
    token button sends refresh and shows the refreshed expiresAt (which keeps the connection open past
    the first exp); a token for another user gets AUTH_FAILED and changes nothing; once a refreshed
    short token's exp has passed, the server closes with 4003 and the console says why."""
    clock = FakeClock()
    server = server_factory(clock=clock, jwt_secret=JWT_SECRET, jwt_leeway=0)
    now = int(time.time())
    first, second, last = now + 60, now + 7200, now + 30
    with console_page(server.port, tmp_path) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        expect(page.locator("#token-hint")).to_contain_text("JWT auth: paste a JWT")
        expect(page.locator("#demo-hint")).to_contain_text("off")  # /demo/publish is off with JWT auth
        page.fill("#token", hs256_token(JWT_SECRET, sub="alice", exp=first))
        page.check("#autosetup")
        page.click("#connect")
        expect(log_entry(page, "ready", '"userId":"alice"')).to_have_count(1)
        assert json.loads(log_entry(page, "ready").locator(".tx").inner_text())["expiresAt"] == first
        expect(page.locator("#expiry")).to_contain_text(f"alice expires: {iso(first)} (in ")

        page.fill("#token", hs256_token(JWT_SECRET, sub="alice", exp=second))
        page.click("#refresh")
        expect(log_entry(page, "refreshed", f'"expiresAt":{second}')).to_have_count(1)
        expect(page.locator("#expiry")).to_contain_text(iso(second))
        clock.advance(120)  # past the first token's exp on the server's clock
        server.tick()
        expect(page.locator("#state")).to_have_text("open")

        page.fill("#token", hs256_token(JWT_SECRET, sub="bob", exp=second))
        page.click("#refresh")
        expect(log_entry(page, "error", "AUTH_FAILED")).to_have_count(1)
        expect(log_entry(page, "error", "AUTH_FAILED")).to_contain_text("the new token names another user")
        expect(page.locator("#expiry")).to_contain_text(iso(second))
        assert server.stats()["auth_refused"]["refresh"] == 1

        page.fill("#token", hs256_token(JWT_SECRET, sub="alice", exp=last))
        page.click("#refresh")
        expect(log_entry(page, "refreshed", f'"expiresAt":{last}')).to_have_count(1)
        clock.advance(60)
        server.tick()
        expect(page.locator("#state")).to_have_text("closed")
        expect(page.locator("#close-info")).to_contain_text("4003")
        expect(page.locator("#close-info")).to_contain_text("token expired")


def test_client_drops_topics_the_token_may_no_longer_read(server_factory, tmp_path):
    """A resume with a token that may not read one of the session's topics gets ACL_DENIED for it and
    still completes with `resumed` (the client neither takes the error for the resume's answer nor
    keeps the topic); a refresh whose grants no longer cover a subscription ends it, and the client
    drops that topic too."""
    server = server_factory(jwt_secret=JWT_SECRET)
    both = hs256_token(JWT_SECRET, sub="alice", read=["prices", "news"], write=["*"])
    prices_only = hs256_token(JWT_SECRET, sub="alice", read=["prices"])
    nothing = hs256_token(JWT_SECRET, sub="alice", read=[])
    with console_page(server.port, tmp_path) as (page, expect):
        page.fill("#token", both)
        connect_and_subscribe(page, expect)
        page.fill("#topic", "news")
        page.click("#send")
        expect(log_entry(page, "subscribed", '"topic":"news"')).to_have_count(1)
        server.publish("news", {"n": 1})
        expect(log_entry(page, "message", '"n":1')).to_have_count(1)

        page.click("#disconnect")
        expect(page.locator("#state")).to_have_text("closed")
        wait_until(lambda: server.stats()["connections"] == 0, what="the server to see the close")
        server.publish("news", {"n": 2})
        page.fill("#token", prices_only)
        page.click("#resume")
        expect(log_entry(page, "resumed")).to_have_count(1)
        denied = log_entry(page, "error", "ACL_DENIED")
        expect(denied).to_have_count(1)
        expect(denied).to_contain_text('"topic":"news"')
        resumed = json.loads(log_entry(page, "resumed").locator(".tx").inner_text())
        assert resumed["topics"] == ["prices"] and resumed["replayed"] == 0, resumed
        expect(log_entry(page, "message", '"n":2')).to_have_count(0)
        state = page.evaluate("c => ({topics: [...c.topics], wanted: [...c.wanted], positions: Object.keys(c.positions), pending: c.pending.size, held: c.held})",
                              page.evaluate_handle("window.microsocketClient"))
        assert state == {"topics": ["prices"], "wanted": ["prices"], "positions": ["prices"], "pending": 0, "held": None}, state

        page.fill("#token", nothing)
        page.click("#refresh")
        expect(log_entry(page, "refreshed")).to_have_count(1)
        ended = log_entry(page, "error", "the subscription ended")
        expect(ended).to_have_count(1)
        expect(ended).to_contain_text('"topic":"prices"')
        assert page.evaluate("c => [...c.topics, ...c.wanted]", page.evaluate_handle("window.microsocketClient")) == []
        assert server.stats()["subscriptions"] == 0


# === permessage-deflate: negotiated by Chromium itself when the server accepts it =================


def opened_line(page, expect):
    """Connect with the console (setup on connect), subscribe to TOPIC; the log's one `open` entry."""
    connect_and_subscribe(page, expect)
    opened = page.locator('#log .entry[data-type="open"][data-dir="event"]')
    expect(opened).to_have_count(1)
    return opened


def deflate_stats(server) -> dict:
    """The permessage_deflate object of /stats, read over HTTP."""
    response = http_request(server.url("/stats"))
    assert response.status == 200
    return response.json()["permessage_deflate"]


def test_chromium_negotiates_permessage_deflate_and_gets_compressed_messages(server_factory, tmp_path):
    """With --permessage-deflate, Chromium negotiates permessage-deflate by itself (ws.extensions, the console's open line, the server's side of the connection), and a published message of a few hundred bytes, compressed by the server, arrives and is shown intact."""
    server = server_factory(permessage_deflate=True)
    with console_page(server.port, tmp_path) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        expect(page.locator('#compression + p [data-limit="permessageDeflate"]')).to_have_text("on")
        opened = opened_line(page, expect)
        extensions = page.evaluate("window.microsocketClient.ws.extensions")
        assert extensions.split(";")[0].strip() == "permessage-deflate", extensions
        assert "server_no_context_takeover" in extensions and "client_no_context_takeover" in extensions, extensions
        expect(opened).to_contain_text(f"extensions {json.dumps(extensions)}")
        agreed = server.call(lambda: [c.deflate for c in server.server.connections if getattr(c, "deflate", None) is not None])
        assert agreed == [ms.DeflateParams(ms.MAX_WINDOW_BITS, ms.MAX_WINDOW_BITS, True)], agreed

        # A message of a few hundred bytes published over HTTP: compressed once by the server, for
        # this one subscriber, and nothing else compressed meanwhile (the page's ack has no reply).
        before = deflate_stats(server)
        note = "compressible " * 30 + "end"
        status, _, body = http_request(server.url("/demo/publish/prices?note=" + urllib.parse.quote(note)))
        assert status == 200, body
        entry = log_entry(page, "message", "compressible compressible")
        expect(entry).to_have_count(1)
        raw = entry.evaluate("d => d._raw")
        received = json.loads(raw)
        assert received["data"] == {"note": note} and received["messageId"] == json.loads(body)["messageId"], received
        entry.click()  # the pretty-printed JSON shows the whole value, not only the line's start
        expect(entry.locator("pre")).to_contain_text(note)
        after = deflate_stats(server)
        plain_frame = len(ms.serialize_frame(ms.Opcode.TEXT, raw.encode()))
        assert after["compressed"] == before["compressed"] + 1, (before, after)
        assert after["bytes_before"] - before["bytes_before"] == plain_frame, (before, after, plain_frame)
        assert 0 < after["bytes_after"] - before["bytes_after"] < plain_frame // 2, (before, after, plain_frame)
        assert after["kept_forms"] == before["kept_forms"] + 1, (before, after)

        # The console's own publish: Chromium sends it compressed (it deflates what it sends once the
        # extension is agreed), the server inflates it, acks it and sends the message back compressed.
        page.select_option("#type", "publish")
        page.fill("#payload", json.dumps({"text": "round trip " * 40}))
        message_id = json.loads(page.locator("#preview").inner_text())["messageId"]
        page.click("#send")
        expect(log_entry(page, "ack", message_id)).to_have_count(1)
        own = log_entry(page, "message", message_id)
        expect(own).to_have_count(1)
        assert json.loads(own.evaluate("d => d._raw"))["data"] == {"text": "round trip " * 40}
        assert deflate_stats(server)["compressed"] > after["compressed"]
        expect(page.locator("#state")).to_have_text("open")


def test_chromium_gets_no_extension_from_a_server_without_permessage_deflate(server_factory, tmp_path):
    """Without --permessage-deflate the server accepts no extension: Chromium's ws.extensions is empty and the console's open line says "extensions none"."""
    server = server_factory()
    with console_page(server.port, tmp_path) as (page, expect):
        expect(page.locator("body")).to_have_attribute("data-limits", "loaded")
        expect(page.locator('#compression + p [data-limit="permessageDeflate"]')).to_have_text("off")
        opened = opened_line(page, expect)
        assert page.evaluate("window.microsocketClient.ws.extensions") == ""
        expect(opened).to_contain_text("extensions none")
        assert "permessage_deflate" not in http_request(server.url("/stats")).json()
        http_request(server.url("/demo/publish/prices?note=" + "plain%20" * 40))
        expect(log_entry(page, "message", "plain plain")).to_have_count(1)
