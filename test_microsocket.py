"""The conformance kit: the Micro Socket protocol end to end, black-box, SPEC clause by clause.

Every test here gets one base URL (`kit_url`) and talks to it over the network only: the
`websockets` client, a raw socket for frames a polite client cannot send (framed with
microsocket.py's codec, which test_codec.py checks against RFC 6455's own examples), and plain
HTTP. So the same tests run against any implementation:

    python3 -m pytest -m conformance                                   # in-process servers
    python3 -m pytest -m conformance --target ws://127.0.0.1:3000      # another server
    MICROSOCKET_TARGET=ws://127.0.0.1:3000 python3 -m pytest -m conformance

Each test's docstring starts with the SPEC clause it checks (`SPEC §3 Dedup: ...`: the numbered
sections and headings of SPEC 1.1, the protocol contract: §1 Endpoints, §2 Messages, Client → server,
Server → client, Error codes, Close codes, §3 Semantics: Auth, Dedup, Ordering, ...); test_cli.py
checks that they all do. The kit assumes what SPEC makes the default: demo auth (any non-empty
token is the userId) and no ACL source; extra fields in a message (a signature, say) are allowed
everywhere. It never assumes this implementation's limits: it reads them where the target publishes them (microsocket's
`GET /asyncapi.json`, `info["x-limits"]`) and skips, saying which, the tests that need one it does
not know; the only numbers it takes from SPEC itself are the 256-character topic and messageId
bounds, when the target publishes none. A timer the kit would have to wait out for longer than
KIT_MAX_WAIT seconds is skipped too. Every test uses topics and user ids of its own, so against a
shared server no test sees another's messages, dedup or sessions.

Not in the kit, because they need the server configured or controlled (they are tested in-process
in the other files): JWT auth, ACLs, signing, the Origin check, shutdown (1001), scale-out, the
latency figures (SPEC names no fields for them), and everything README.md marks as this server's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import urllib.parse
import uuid
from typing import Any

import pytest

import microsocket as ms
from conftest import RawClient, assert_error, http_request, masked, parse_response, recv_json, request, run

websockets = pytest.importorskip("websockets", reason="the conformance kit needs the websockets client: pip install websockets")
from websockets.asyncio.client import connect  # noqa: E402

pytestmark = pytest.mark.conformance

KIT_MAX_WAIT = 12  # seconds: the longest timer (setup timeout, keepalive) the kit waits out
SPEC_TOPIC_LENGTH = 256  # SPEC §2 Error codes: INVALID_TOPIC "over 256 chars"
SPEC_MESSAGE_ID_LENGTH = 256  # SPEC §2 Client → server: publish `messageId` "≤ 256 chars"
_LIMITS: dict[str, dict | None] = {}  # base URL -> its published limits (None: it publishes none)


# -- the client side: one Target per test


class Target:
    """The server under test, as the kit sees it: a base URL, the limits it publishes, fresh names."""

    _run = uuid.uuid4().hex[:6]  # names differ from one run of the kit to the next
    _names = itertools.count(1)

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/")
        parts = urllib.parse.urlsplit(self.base)
        self.host, self.port, self.netloc = parts.hostname, parts.port or 80, parts.netloc

    def name(self, kind: str = "t") -> str:
        """A topic or user id no other test (of this run, or of an earlier one) uses."""
        return f"{kind}-{self._run}-{next(self._names)}"

    def ws(self, path: str = "/ws") -> str:
        return "ws" + self.base[len("http"):] + path

    def connect(self, path: str = "/ws", **kwargs: Any):
        """A websockets client connection (an async context manager, or awaitable)."""
        return connect(self.ws(path), open_timeout=10, **kwargs)

    def raw(self, **kwargs: Any) -> RawClient:
        """A raw-socket client (its handshake needs host=self.netloc: some servers route by Host)."""
        return RawClient(self.port, host=self.host, **kwargs)

    def raw_ws(self, **kwargs: Any) -> RawClient:
        """A raw-socket client after a successful opening handshake on /ws."""
        client = self.raw(**kwargs)
        try:
            client.handshake(host=self.netloc)
        except BaseException:
            client.close()
            raise
        return client

    def get(self, path: str, method: str = "GET", headers: dict | None = None, body: bytes = b""):
        """One HTTP request on a fresh connection: (status, lower-case headers, body)."""
        return http_request(self.base + path, method, headers, body)

    async def aget(self, path: str, method: str = "GET", headers: dict | None = None, body: bytes = b""):
        return await asyncio.to_thread(self.get, path, method, headers, body)

    async def stats(self) -> dict:
        response = await self.aget("/stats")
        assert response.status == 200, response
        return response.json()

    async def settled_stats(self) -> dict:
        """/stats once two reads 50 ms apart agree on the three counts (an earlier test's
        connections may still be closing on a shared server)."""
        keys = ("connections", "topics", "subscriptions")
        last = await self.stats()
        for _ in range(60):
            await asyncio.sleep(0.05)
            now = await self.stats()
            if all(now[k] == last[k] for k in keys):
                return now
            last = now
        return last

    async def wait_stats(self, expected: dict, timeout: float = 3) -> dict:
        """/stats once its counts are `expected` (a closed connection may take a moment to go)."""
        got = await self.stats()
        for _ in range(int(timeout / 0.02)):
            if all(got[k] == v for k, v in expected.items()):
                break
            await asyncio.sleep(0.02)
            got = await self.stats()
        return got

    def limits(self) -> dict | None:
        """The limits the target publishes (`info["x-limits"]` of GET /asyncapi.json), or None."""
        if self.base not in _LIMITS:
            found = None
            try:
                response = self.get("/asyncapi.json")
                if response.status == 200:
                    found = response.json().get("info", {}).get("x-limits")
            except (OSError, ValueError, AttributeError):
                pass
            _LIMITS[self.base] = found if isinstance(found, dict) else None
        return _LIMITS[self.base]

    def limit(self, key: str, what: str) -> Any:
        """The published limit `key`, or a skip saying that `what` is unknown."""
        limits = self.limits()
        if limits is None:
            pytest.skip(f"the target publishes no limits (GET /asyncapi.json info.x-limits): {what} unknown")
        if key not in limits:
            pytest.skip(f"the target's published limits have no {key}: {what} unknown")
        return limits[key]

    def limit_or_spec(self, key: str, spec: int) -> int:
        """The published limit `key`, else SPEC's own number for it."""
        return (self.limits() or {}).get(key, spec)

    def need_burst(self, n: int) -> None:
        """Skip when the target's publish rate limit refuses n publishes sent at once."""
        limits = self.limits() or {}
        if limits.get("publishRate") and limits.get("publishBurst", n) < n:
            pytest.skip(f"the target's publish burst ({limits['publishBurst']}) is under the {n} publishes this test sends at once")

    def wait_for(self, seconds: float, what: str) -> float:
        """`seconds`, or a skip when the kit would wait longer than KIT_MAX_WAIT for `what`."""
        if not seconds or seconds > KIT_MAX_WAIT:
            pytest.skip(f"the target's {what} is {seconds} s: off, or over the kit's wait of {KIT_MAX_WAIT} s")
        return seconds


@pytest.fixture
def target(kit_url) -> Target:
    """The server under test. The kit speaks demo auth: a target that says it verifies JWTs is skipped."""
    t = Target(kit_url)
    if (t.limits() or {}).get("demoAuth") is False:
        pytest.skip("the target verifies JWTs; the kit needs demo auth (any non-empty token is the userId)")
    return t


async def send(ws, msg: dict | str | bytes) -> None:
    await ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))


async def set_up(ws, token: str, topics: list | None = None, replies: int | None = None) -> tuple[dict, list[dict]]:
    """setup; (ready, the `subscribed` replies: one per distinct topic, or `replies` of them)."""
    msg = {"type": "setup", "token": token}
    if topics is not None:
        msg["topics"] = topics
    ready = await request(ws, msg)
    assert ready["type"] == "ready", ready
    n = len(dict.fromkeys(topics or ())) if replies is None else replies
    subscribed = [await recv_json(ws) for _ in range(n)]
    assert [s["type"] for s in subscribed] == ["subscribed"] * n, subscribed
    return ready, subscribed


async def still_open(ws, target: Target) -> None:
    """The connection (set up) still answers: unsubscribe from a topic it never had gets `unsubscribed`."""
    topic = target.name("probe")
    reply = await request(ws, {"type": "unsubscribe", "topic": topic})
    assert (reply["type"], reply.get("topic")) == ("unsubscribed", topic), reply


async def still_open_not_set_up(ws, target: Target) -> None:
    """The connection still answers and is still not set up: AUTH_REQUIRED, then a setup works."""
    assert_error(await request(ws, {"type": "subscribe", "topic": target.name()}), "AUTH_REQUIRED")
    await set_up(ws, target.name("u"))


async def publish(ws, topic: str, message_id: str, payload: Any = None, **extra: Any) -> dict:
    """A publish and its reply (the publisher is not subscribed to `topic`)."""
    return await request(ws, {"type": "publish", "topic": topic, "messageId": message_id, "payload": payload, **extra})


async def publish_many(ws, topic: str, n: int, prefix: str) -> list[dict]:
    """n publishes sent at once; their n acks (the publisher is not subscribed to `topic`)."""
    for i in range(n):
        await send(ws, {"type": "publish", "topic": topic, "messageId": f"{prefix}-{i}", "payload": {"i": i}})
    acks = [await recv_json(ws, 10) for _ in range(n)]
    assert all(a["type"] == "ack" and a["status"] == "ok" for a in acks), [a for a in acks if a.get("status") != "ok"][:3]
    return acks


async def http_publish(target: Target, user: str, body: dict) -> dict:
    """POST /publish as `user`; the JSON answer of a 200."""
    response = await target.aget("/publish", "POST", {"Authorization": f"Bearer {user}", "Content-Type": "application/json"},
                                 json.dumps(body).encode())
    assert response.status == 200, response
    return response.json()


async def until_not_message(ws) -> list[dict]:
    """Every message received up to and including the first reply of another type."""
    got = [await recv_json(ws, 10)]
    while got[-1]["type"] == "message":
        got.append(await recv_json(ws, 10))
    return got


def message(topic: str, seq_no: int, message_id: str, data: Any) -> dict:
    return {"type": "message", "topic": topic, "seqNo": seq_no, "messageId": message_id, "data": data}


def fields(msg: dict, *names: str) -> dict:
    """`type` and the given fields of a message (a check of what SPEC requires, leaving room for more fields)."""
    return {k: msg.get(k) for k in ("type", *names)}


def pick(answer: dict, *names: str) -> dict:
    """The given fields of an HTTP answer."""
    return {k: answer.get(k) for k in names}


def seq_of_text(text: str) -> int:
    """The seqNo of a `message` frame without parsing its (possibly large) payload."""
    return json.loads(text)["seqNo"] if len(text) < 4096 else int(re.search(r'"seqNo"\s*:\s*(\d+)', text).group(1))


def head_and_rest(target: Target, raw: bytes) -> tuple[int, dict, bytes]:
    """Send a request that asks for `Connection: close`; its status, headers and every byte after the head."""
    with target.raw() as client:
        client.send(raw)
        status, headers, _ = parse_response(client.recv_until(b"\r\n\r\n"))
        client.at_eof()
        return status, headers, client.buffer


# === §1 Endpoints ===================================================================================


def test_stats_reports_connections_topics_and_subscriptions(target):
    """SPEC §1 Endpoints: GET /stats is JSON with at least the integers connections, topics and subscriptions."""
    response = target.get("/stats")
    assert response.status == 200 and response.headers.get("content-type", "").startswith("application/json"), response
    stats = response.json()
    for key in ("connections", "topics", "subscriptions"):
        assert isinstance(stats[key], int) and not isinstance(stats[key], bool) and stats[key] >= 0, (key, stats)


def test_stats_counts_follow_connections_and_subscriptions(target):
    """SPEC §1 Endpoints: /stats counts open WebSocket connections, topics with a subscriber and (topic, connection) pairs; a closed connection leaves them."""

    async def main():
        before = await target.settled_stats()
        t, u = target.name(), target.name()
        async with target.connect() as a, target.connect() as b:
            await set_up(a, target.name("alice"), topics=[t, u])
            await set_up(b, target.name("bob"), topics=[t])
            delta = {"connections": 2, "topics": 2, "subscriptions": 3}
            got = await target.wait_stats({k: before[k] + v for k, v in delta.items()})
            assert {k: got[k] - before[k] for k in delta} == delta
            await a.close()
            delta = {"connections": 1, "topics": 1, "subscriptions": 1}
            got = await target.wait_stats({k: before[k] + v for k, v in delta.items()})
            assert {k: got[k] - before[k] for k in delta} == delta

    run(main())


def test_demo_publish_publishes_query_values_as_strings(target):
    """SPEC §1 Endpoints: GET /demo/publish/{topic}?k=v publishes {"k": "v"} as user demo and answers {ok, topic, messageId, seqNo, subscribers}."""
    if (target.limits() or {}).get("demoPublish") is False:
        pytest.skip("the target has /demo/publish switched off")

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"), topics=[topic])
            response = await target.aget(f"/demo/publish/{topic}?hello=world&n=1")
            assert response.status == 200, response
            answer = response.json()
            assert pick(answer, "ok", "topic", "seqNo", "subscribers") == {"ok": True, "topic": topic, "seqNo": 1, "subscribers": 1}
            assert isinstance(answer["messageId"], str) and answer["messageId"]
            got = await recv_json(ws)
            assert fields(got, "topic", "seqNo", "messageId", "data") == message(topic, 1, answer["messageId"], {"hello": "world", "n": "1"})

    run(main())


def test_post_publish_answers_status_message_id_and_seq_no(target):
    """SPEC §1 Endpoints: POST /publish with a bearer token publishes {topic, messageId, data} and answers {status: "ok", messageId, seqNo}; a subscriber gets it."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"), topics=[topic])
            answer = await http_publish(target, target.name("feeder"), {"topic": topic, "messageId": "m1", "data": {"v": [1, "two"]}})
            assert pick(answer, "status", "messageId", "seqNo") == {"status": "ok", "messageId": "m1", "seqNo": 1}
            assert fields(await recv_json(ws), "topic", "seqNo", "messageId", "data") == message(topic, 1, "m1", {"v": [1, "two"]})

    run(main())


def test_post_publish_generates_a_message_id_when_absent(target):
    """SPEC §1 Endpoints: POST /publish without a messageId (it is optional) answers with the messageId it gave the message."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"), topics=[topic])
            answer = await http_publish(target, target.name("feeder"), {"topic": topic, "data": 7})
            assert answer["status"] == "ok" and isinstance(answer["messageId"], str) and answer["messageId"], answer
            got = await recv_json(ws)
            assert (got["messageId"], got["seqNo"], got["data"]) == (answer["messageId"], answer["seqNo"], 7)

    run(main())


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Basic YWxpY2U6eA=="], ids=["none", "empty", "basic"])
def test_post_publish_without_a_bearer_token_is_401(target, authorization):
    """SPEC §1 Endpoints, §3 Auth: POST /publish without a (non-empty) bearer token is 401 with a JSON error, and publishes nothing."""
    topic = target.name()
    headers = {"Content-Type": "application/json"} | ({"Authorization": authorization} if authorization else {})
    response = target.get("/publish", "POST", headers, json.dumps({"topic": topic, "messageId": "m", "data": 1}).encode())
    assert response.status == 401, response
    assert isinstance(response.json()["error"], str)
    answer = run(http_publish(target, target.name("feeder"), {"topic": topic, "messageId": "m", "data": 1}))
    assert answer["seqNo"] == 1, "the refused request took a seqNo"


def test_healthz_answers_200_ok(target):
    """SPEC §1 Endpoints: GET /healthz is 200 "ok"."""
    response = target.get("/healthz")
    assert (response.status, response.body.strip()) == (200, b"ok"), response


def test_index_redirects_to_docs(target):
    """SPEC §1 Endpoints: GET / redirects to /docs."""
    response = target.get("/")
    assert response.status in (301, 302, 303, 307, 308), response
    assert urllib.parse.urlsplit(response.headers.get("location", "")).path == "/docs", response.headers


def test_docs_is_an_html_page(target):
    """SPEC §1 Endpoints: GET /docs is an HTML page (docs.html: the protocol reference and console)."""
    response = target.get("/docs")
    assert response.status == 200 and response.headers.get("content-type", "").startswith("text/html"), response
    assert b"<html" in response.body[:1000].lower()


def test_openapi_json_is_an_openapi_3_1_document(target):
    """SPEC §1 Endpoints: GET /openapi.json is an OpenAPI 3.1 document of the HTTP API (its paths include /stats and /publish)."""
    response = target.get("/openapi.json")
    assert response.status == 200 and response.headers.get("content-type", "").startswith("application/json"), response
    doc = response.json()
    assert str(doc.get("openapi", "")).startswith("3.1"), doc.get("openapi")
    assert isinstance(doc.get("info"), dict) and {"/stats", "/publish"} <= set(doc.get("paths", {})), sorted(doc.get("paths", {}))


def test_openapi_page_is_self_contained(target):
    """SPEC §1 Endpoints: GET /openapi is an HTML view of that document that loads nothing from another host."""
    response = target.get("/openapi")
    assert response.status == 200 and response.headers.get("content-type", "").startswith("text/html"), response
    page = response.body.decode("utf-8", "replace")
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?\s*(?:https?:)?//|@import|url\(\s*["']?\s*(?:https?:)?//""", page, re.I)


def test_metrics_is_prometheus_text(target):
    """SPEC §1 Endpoints: GET /metrics is Prometheus text exposition: comments and `name{labels} value` samples."""
    response = target.get("/metrics")
    assert response.status == 200 and response.headers.get("content-type", "").startswith("text/plain"), response
    sample = re.compile(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*,?\})? '
                        r'[-+]?(\d+(\.\d*)?([eE][-+]?\d+)?|\.\d+|NaN|[-+]?Inf)( -?\d+)?\Z')
    lines = [line for line in response.body.decode().splitlines() if line and not line.startswith("#")]
    assert lines, "no samples"
    for line in lines:
        assert sample.match(line), line


@pytest.mark.parametrize("path", ["/", "/docs", "/healthz", "/stats", "/openapi.json", "/openapi", "/metrics"])
def test_head_is_get_without_body(target, path):
    """SPEC §1 Endpoints: HEAD works wherever GET does: GET's status, type and length, and no body."""
    request_of = lambda method: f"{method} {path} HTTP/1.1\r\nHost: {target.netloc}\r\nConnection: close\r\n\r\n".encode()  # noqa: E731
    status, headers, body = head_and_rest(target, request_of("GET"))
    if status >= 400:
        pytest.skip(f"GET {path} is {status} here (its own test says so): nothing for HEAD to match")
    head_status, head_headers, head_body = head_and_rest(target, request_of("HEAD"))
    assert head_status == status and head_body == b"", (head_status, head_body[:80])
    assert head_headers.get("content-type") == headers.get("content-type")
    if "content-length" in head_headers and path not in ("/stats", "/metrics"):  # those two may change in between
        assert int(head_headers["content-length"]) == len(body)


def _http_error_request(target: Target, case: str) -> tuple[bytes, int, dict]:
    """The raw request of an HTTP error case, its status and the headers it must carry."""
    host = f"Host: {target.netloc}\r\n"
    if case == "404":
        return f"GET /nope-{target.name()} HTTP/1.1\r\n{host}\r\n".encode(), 404, {}
    if case == "405":
        return f"GET /publish HTTP/1.1\r\n{host}\r\n".encode(), 405, {"allow": "POST"}
    if case == "426":
        return f"GET /ws HTTP/1.1\r\n{host}\r\n".encode(), 426, {"upgrade": "websocket"}
    if case == "400":
        body = b'{"topic": "t", "data": '
        return (f"POST /publish HTTP/1.1\r\n{host}Authorization: Bearer {target.name('u')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body, 400, {}
    if case == "413":
        size = target.limit("maxBodySize", "the body size limit") + 1
        return (f"POST /publish HTTP/1.1\r\n{host}Authorization: Bearer {target.name('u')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {size}\r\n\r\n").encode(), 413, {"body": size}
    if case == "431":
        size = target.limit("maxHeadSize", "the request head size limit")
        return f"GET /stats HTTP/1.1\r\n{host}X-Big: {'a' * size}\r\n\r\n".encode(), 431, {}
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["400", "404", "405", "413", "426", "431"])
def test_http_errors_are_json_with_their_status(target, case):
    """SPEC §1 Endpoints: HTTP errors are JSON {"error": "..."} with the right status: 400 (a body that is not JSON), 404, 405 with Allow, 413 (body over the limit), 426 with Upgrade: websocket, 431 (head over the limit)."""
    raw, status, headers = _http_error_request(target, case)
    body_size = headers.pop("body", 0)
    with target.raw(timeout=10) as client:
        client.send(raw)
        if body_size:  # a server may answer 413 from Content-Length alone, or read the body first
            client.sock.settimeout(2)
            try:
                response = client.http(b"")
            except TimeoutError:
                client.sock.settimeout(10)
                with contextlib.suppress(OSError):
                    client.send(b"x" * body_size)
                response = client.http(b"")
        else:
            response = client.http(b"")
    got_status, got_headers, body = response
    assert got_status == status, (got_status, body[:200])
    for name, value in headers.items():
        assert value.lower() in got_headers.get(name, "").lower(), (name, got_headers)
    assert got_headers.get("content-type", "").startswith("application/json"), got_headers
    assert isinstance(json.loads(body)["error"], str)


def test_connection_limit_is_503_at_the_handshake(target):
    """SPEC §3 Limits: past the connection limit the handshake is refused with HTTP 503; a place freed is taken again."""
    limit = target.limit("maxConnections", "the connection limit")
    if limit > 1000:
        pytest.skip(f"the target's connection limit ({limit}) is more connections than the kit opens")

    async def main():
        opened = []
        try:
            open_now = (await target.settled_stats())["connections"]
            for _ in range(limit - open_now):
                opened.append(await target.connect())
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                await target.connect()
            assert info.value.response.status_code == 503
            await opened.pop().close()
            await target.wait_stats({"connections": limit - 1})
            opened.append(await target.connect())
        finally:
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)

    run(main(), timeout=50)


@pytest.mark.parametrize("path", ["/ws/sub/a%20b", "/ws/sub/%2A", "/ws/sub/a%09b", "/ws/sub/%FF", "/ws/sub/a%00b", "long"])
def test_sub_socket_with_an_invalid_topic_is_400(target, path):
    """SPEC §1 Endpoints (/ws/sub/{topic}, URL-decoded), §2 Error codes (INVALID_TOPIC): a sub-socket URL whose topic is invalid (whitespace, `*`, control characters, not UTF-8, too long) fails the handshake with 400."""
    if path == "long":
        path = "/ws/sub/" + "x" * (target.limit_or_spec("maxTopicLength", SPEC_TOPIC_LENGTH) + 1)

    async def main():
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with target.connect(path):
                pass
        assert info.value.response.status_code == 400

    run(main())


# === §2 Messages ====================================================================================


async def _reply_with_id(target: Target, kind: str, tag: Any) -> dict:
    """Provoke the direct reply `kind` to a message carrying "id": tag; that reply."""
    async with target.connect() as ws:
        user, topic = target.name("u"), target.name()
        if kind == "ready":
            return await request(ws, {"type": "setup", "token": user, "id": tag})
        if kind == "pong":
            return await request(ws, {"type": "ping", "id": tag})
        if kind == "resumed":
            async with target.connect() as old:
                ready, _ = await set_up(old, user, topics=[topic])
            await set_up(ws, user)
            return await request(ws, {"type": "resume", "sessionId": ready["sessionId"], "id": tag})
        await set_up(ws, user)
        if kind == "replayed":
            await publish(ws, topic, "m")
            await send(ws, {"type": "replay", "topic": topic, "fromSeq": 1, "id": tag})
            return (await until_not_message(ws))[-1]
        msg = {"subscribed": {"type": "subscribe", "topic": topic}, "unsubscribed": {"type": "unsubscribe", "topic": topic},
               "ack": {"type": "publish", "topic": topic, "messageId": "m"}, "error": {"type": "dance", "topic": topic}}[kind]
        return await request(ws, {**msg, "id": tag})


@pytest.mark.parametrize("kind, tag", [("ready", "s-1"), ("subscribed", 2), ("unsubscribed", "u-3"), ("ack", 4),
                                       ("replayed", "r-5"), ("resumed", 6), ("pong", "p-7"), ("error", 8)])
def test_every_direct_reply_echoes_the_request_id(target, kind, tag):
    """SPEC §2 Messages: a client message may carry "id" (a string or a number); the direct reply to it (ready, subscribed, unsubscribed, ack, replayed, resumed, pong, error) carries the same id."""
    reply = run(_reply_with_id(target, kind, tag))
    assert (reply["type"], reply.get("id")) == (kind, tag), reply


def test_every_server_message_is_one_json_object_text_frame(target):
    """SPEC §2 Messages: every WebSocket message the server sends is one UTF-8 text frame holding one JSON object with a string type."""
    topic = target.name()
    with target.raw_ws() as client:
        for msg in ({"type": "setup", "token": target.name("u"), "topics": [topic]}, {"type": "publish", "topic": topic, "messageId": "m", "payload": "é"},
                    {"type": "subscribe", "topic": "a b"}):
            client.send_json(msg)
        for _ in range(5):  # ready, subscribed, ack, message (either order), error
            frame = client.recv_frame()
            assert frame.fin and frame.opcode == ms.Opcode.TEXT, frame
            got = json.loads(frame.payload.decode("utf-8"))
            assert isinstance(got, dict) and isinstance(got.get("type"), str), got


# === §2 Client → server =============================================================================


def test_setup_gets_ready_then_one_subscribed_per_topic_in_order(target):
    """SPEC §2 Client → server (setup), §3 Auth (demo): ready {sessionId, userId: the token, epoch, expiresAt: null}, then one subscribed {topic, seqNo: 0, epoch} per topic, in order; a topic's epoch is the same for every connection."""

    async def main():
        user, topics = target.name("alice"), [target.name() for _ in range(3)]
        async with target.connect() as ws1, target.connect() as ws2:
            ready, subs = await set_up(ws1, user, topics=topics)
            assert isinstance(ready.get("sessionId"), str) and ready["sessionId"], ready
            assert ready.get("userId") == user and ready.get("expiresAt", "absent") is None, ready
            assert isinstance(ready.get("epoch"), str) and ready["epoch"], ready
            assert [fields(s, "topic", "seqNo") for s in subs] == [{"type": "subscribed", "topic": t, "seqNo": 0} for t in topics]
            epochs = {s["topic"]: s.get("epoch") for s in subs}
            assert all(isinstance(e, str) and e for e in epochs.values()), epochs
            ready2, subs2 = await set_up(ws2, target.name("bob"), topics=[topics[1]])
            assert ready2["sessionId"] != ready["sessionId"] and ready2.get("epoch") == ready["epoch"]
            assert subs2[0].get("epoch") == epochs[topics[1]]
            await still_open(ws1, target)

    run(main())


def test_setup_topics_listed_twice_are_subscribed_once(target):
    """SPEC §2 Client → server (setup, subscribe: idempotent): a topic named twice in setup.topics is one subscription; a message arrives once."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"), topics=[topic, topic])
            await still_open(ws, target)  # no second subscribed came first
            ack = await publish(ws, topic, "m")
            replies = [ack, await recv_json(ws)]
            assert sorted(r["type"] for r in replies) == ["ack", "message"], replies
            await still_open(ws, target)  # and no second message

    run(main())


def test_ping_gets_pong_before_and_after_setup(target):
    """SPEC §2 Client → server (ping), §2 Error codes (AUTH_REQUIRED: anything but setup or ping): ping gets pong, before setup too."""

    async def main():
        async with target.connect() as ws:
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"
            await set_up(ws, target.name("u"))
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"

    run(main())


def test_subscribe_reports_the_latest_seq_no_and_is_idempotent(target):
    """SPEC §2 Client → server (subscribe): subscribed {topic, seqNo} names the topic's latest seqNo (0 if none); subscribing again changes nothing: one copy of the next message."""

    async def main():
        topic = target.name()
        async with target.connect() as pub, target.connect() as sub:
            await set_up(pub, target.name("pub"))
            await set_up(sub, target.name("sub"))
            assert fields(await request(sub, {"type": "subscribe", "topic": topic}), "topic", "seqNo") == {"type": "subscribed", "topic": topic, "seqNo": 0}
            await publish_many(pub, topic, 3, "m")
            for n in (1, 2, 3):
                assert (await recv_json(sub))["seqNo"] == n
            assert fields(await request(sub, {"type": "subscribe", "topic": topic}), "topic", "seqNo") == {"type": "subscribed", "topic": topic, "seqNo": 3}
            await publish(pub, topic, "m4")
            assert (await recv_json(sub))["seqNo"] == 4
            await still_open(sub, target)  # and not a second copy

    run(main())


def test_unsubscribe_is_idempotent_and_stops_delivery(target):
    """SPEC §2 Client → server (unsubscribe): unsubscribed {topic}, again when repeated; no message of that topic arrives after it."""

    async def main():
        topic = target.name()
        async with target.connect() as pub, target.connect() as sub:
            await set_up(pub, target.name("pub"))
            await set_up(sub, target.name("sub"), topics=[topic])
            for _ in range(2):
                assert fields(await request(sub, {"type": "unsubscribe", "topic": topic}), "topic") == {"type": "unsubscribed", "topic": topic}
            await publish(pub, topic, "m")
            await still_open(sub, target)  # the probe's reply is the next thing it gets

    run(main())


def test_publish_gets_ack_and_every_subscriber_the_message(target):
    """SPEC §2 Client → server (publish), §3 Ordering: ack {messageId, status: "ok", seqNo: 1} on a new topic; every subscriber, the publisher included, gets message {topic, seqNo, messageId, data}."""

    async def main():
        topic = target.name()
        async with target.connect() as pub, target.connect() as sub:
            await set_up(pub, target.name("p"), topics=[topic])
            await set_up(sub, target.name("s"), topics=[topic])
            await send(pub, {"type": "publish", "topic": topic, "messageId": "m1", "payload": {"v": 1}})
            expected = message(topic, 1, "m1", {"v": 1})
            got = {m["type"]: m for m in [await recv_json(pub), await recv_json(pub)]}
            assert fields(got["ack"], "messageId", "status", "seqNo") == {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}
            assert fields(got["message"], "topic", "seqNo", "messageId", "data") == expected
            assert fields(await recv_json(sub), "topic", "seqNo", "messageId", "data") == expected

    run(main())


@pytest.mark.parametrize("payload", [None, 0, -1.5, "é ✓ 😀", "", [], [1, [2, [3]]], {}, {"a": {"b": [True, False, None]}}, ...],
                         ids=["null", "zero", "float", "unicode", "empty-string", "empty-list", "nested-list", "empty-object", "object", "absent"])
def test_publish_payload_is_any_json(target, payload):
    """SPEC §2 Client → server (publish): `payload` is any JSON and arrives as the message's `data` unchanged; an absent payload is null."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"), topics=[topic])
            msg = {"type": "publish", "topic": topic, "messageId": "m"}
            if payload is not ...:
                msg["payload"] = payload
            await send(ws, msg)
            got = {m["type"]: m for m in [await recv_json(ws), await recv_json(ws)]}
            assert got["ack"]["status"] == "ok", got
            assert "data" in got["message"] and got["message"]["data"] == (None if payload is ... else payload), got["message"]

    run(main())


def test_message_id_up_to_the_length_limit(target):
    """SPEC §2 Client → server (publish: messageId ≤ 256 chars, or the configured limit), §3 Limits: a messageId of the limit is accepted, one more character is INVALID_MESSAGE naming messageId."""
    limit = target.limit_or_spec("maxMessageIdLength", SPEC_MESSAGE_ID_LENGTH)

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            assert (await publish(ws, topic, "é" * limit))["status"] == "ok"
            assert_error(await publish(ws, topic, "x" * (limit + 1)), "INVALID_MESSAGE", field="messageId")
            await still_open(ws, target)

    run(main())


def test_topic_up_to_the_length_limit(target):
    """SPEC §2 Error codes (INVALID_TOPIC: over 256 chars, or the configured limit), §3 Limits: a topic of the limit is accepted, one more character is INVALID_TOPIC."""
    limit = target.limit_or_spec("maxTopicLength", SPEC_TOPIC_LENGTH)

    async def main():
        base = target.name()
        topic = (base + "x" * limit)[:limit]
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            assert fields(await request(ws, {"type": "subscribe", "topic": topic}), "topic") == {"type": "subscribed", "topic": topic}
            assert_error(await request(ws, {"type": "subscribe", "topic": topic + "x"}), "INVALID_TOPIC")
            await still_open(ws, target)

    run(main())


def test_replay_sends_the_retained_messages_then_replayed(target):
    """SPEC §2 Client → server (replay), §3 History, §3 Epochs: replay {topic, fromSeq} gets messages fromSeq..latest in order, then replayed {topic, fromSeq, toSeq, epoch}, the epoch subscribed names."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            await publish_many(ws, topic, 5, "n")
            await send(ws, {"type": "replay", "topic": topic, "fromSeq": 2})
            got = await until_not_message(ws)
            assert len(got) == 5 and [fields(m, "seqNo", "messageId", "data") for m in got[:4]] == [
                {"type": "message", "seqNo": n, "messageId": f"n-{n - 1}", "data": {"i": n - 1}} for n in (2, 3, 4, 5)]
            assert fields(got[4], "topic", "fromSeq", "toSeq") == {"type": "replayed", "topic": topic, "fromSeq": 2, "toSeq": 5}
            subscribed = await request(ws, {"type": "subscribe", "topic": topic})
            assert isinstance(got[4].get("epoch"), str) and got[4]["epoch"] == subscribed.get("epoch"), (got[4], subscribed)
            await send(ws, {"type": "replay", "topic": topic, "fromSeq": 5, "epoch": subscribed["epoch"]})
            last = await until_not_message(ws)
            assert [m["type"] for m in last] == ["message", "replayed"] and last[1]["toSeq"] == 5, last
            await still_open(ws, target)

    run(main())


def test_replay_from_before_the_oldest_retained_is_replay_unavailable(target):
    """SPEC §3 History (bounded by count), §2 Error codes (REPLAY_UNAVAILABLE: carries oldestSeq and the topic's epoch): with history H, after H + 2 messages replay from 1 or 2 is refused, from 3 is served."""
    history = target.limit("historyMessages", "the history size per topic")
    if not 0 < history <= 5000:
        pytest.skip(f"the target keeps {history} messages per topic: not a number the kit publishes past")
    target.need_burst(history + 2)

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            await publish_many(ws, topic, history + 2, "n")
            epoch = (await request(ws, {"type": "subscribe", "topic": topic}))["epoch"]
            await request(ws, {"type": "unsubscribe", "topic": topic})
            for from_seq in (1, 2):
                error = await request(ws, {"type": "replay", "topic": topic, "fromSeq": from_seq})
                assert_error(error, "REPLAY_UNAVAILABLE", oldestSeq=3, epoch=epoch)
            await send(ws, {"type": "replay", "topic": topic, "fromSeq": 3})
            got = await until_not_message(ws)
            assert [m.get("seqNo") for m in got[:-1]] == list(range(3, history + 3))
            assert fields(got[-1], "fromSeq", "toSeq") == {"type": "replayed", "fromSeq": 3, "toSeq": history + 2}

    run(main())


def test_replay_with_another_epoch_is_replay_unavailable(target):
    """SPEC §3 Epochs, §2 Error codes (REPLAY_UNAVAILABLE): replay with an epoch that is not the topic's is refused, naming the topic's epoch and oldestSeq."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            await publish_many(ws, topic, 2, "n")
            epoch = (await request(ws, {"type": "subscribe", "topic": topic}))["epoch"]
            await request(ws, {"type": "unsubscribe", "topic": topic})
            error = await request(ws, {"type": "replay", "topic": topic, "fromSeq": 1, "epoch": epoch + "-old"})
            assert_error(error, "REPLAY_UNAVAILABLE", oldestSeq=1, epoch=epoch)
            await still_open(ws, target)

    run(main())


async def _session_with_gap(target: Target, user: str, topic: str, seen: int, gap: int, ack: bool = False) -> str:
    """A session of `user` on `topic` that received messages 1..seen (acknowledging the last when
    `ack`) and closed cleanly; then `gap` more are published. Its sessionId."""
    async with target.connect() as old, target.connect() as pub:
        ready, _ = await set_up(old, user, topics=[topic])
        await set_up(pub, target.name("pub"))
        await publish_many(pub, topic, seen, "a")
        assert [(await recv_json(old))["seqNo"] for _ in range(seen)] == list(range(1, seen + 1))
        if ack:
            await send(old, {"type": "ack", "topic": topic, "seqNo": seen})
        await old.close()
        await publish_many(pub, topic, gap, "b")
    return ready["sessionId"]


async def _resume(ws, msg: dict) -> tuple[list[dict], dict]:
    """Send a resume; (the messages replayed, `resumed`)."""
    await send(ws, msg)
    replayed = []
    while (reply := await recv_json(ws, 10))["type"] == "message":
        replayed.append(reply)
    assert reply["type"] == "resumed", reply
    return replayed, reply


def test_resume_replays_the_gap_after_last_seq_per_topic(target):
    """SPEC §2 Client → server (resume), §3 Sessions (I6), §3 Epochs: resume {sessionId, lastSeqPerTopic} replays the messages after it, then resumed {sessionId, topics, replayed, missed: [], epochs}; live messages follow."""

    async def main():
        user, topic = target.name("alice"), target.name()
        session = await _session_with_gap(target, user, topic, seen=3, gap=2)
        async with target.connect() as new, target.connect() as pub:
            await set_up(new, user)
            replayed, resumed = await _resume(new, {"type": "resume", "sessionId": session, "lastSeqPerTopic": {topic: 2}})
            assert [(m["topic"], m["seqNo"]) for m in replayed] == [(topic, 3), (topic, 4), (topic, 5)]
            assert fields(resumed, "sessionId", "topics", "replayed", "missed") == {
                "type": "resumed", "sessionId": session, "topics": [topic], "replayed": 3, "missed": []}
            assert isinstance(resumed.get("epochs"), dict) and isinstance(resumed["epochs"].get(topic), str), resumed
            await set_up(pub, target.name("pub"))
            await publish(pub, topic, "live")
            assert fields(await recv_json(new), "topic", "seqNo", "messageId") == {"type": "message", "topic": topic, "seqNo": 6, "messageId": "live"}

    run(main())


def test_resume_without_positions_continues_after_what_was_acknowledged(target):
    """SPEC §3 Sessions (I6): resume without lastSeqPerTopic replays after the session's position: here what the old connection acknowledged (ack), which is also the last it was handed before its clean close."""

    async def main():
        user, topic = target.name("alice"), target.name()
        session = await _session_with_gap(target, user, topic, seen=3, gap=2, ack=True)
        async with target.connect() as new:
            await set_up(new, user)
            replayed, resumed = await _resume(new, {"type": "resume", "sessionId": session})
            assert [m["seqNo"] for m in replayed] == [4, 5] and resumed.get("replayed") == 2, (replayed, resumed)

    run(main())


def test_resume_reports_what_history_no_longer_holds_as_missed(target):
    """SPEC §2 Server → client (resumed.missed: {topic, fromSeq, oldestSeq}), §3 History: a gap older than the history is reported in missed; what is retained is replayed."""
    history = target.limit("historyMessages", "the history size per topic")
    if not 0 < history <= 5000:
        pytest.skip(f"the target keeps {history} messages per topic: not a number the kit publishes past")
    target.need_burst(history + 2)

    async def main():
        user, topic = target.name("alice"), target.name()
        session = await _session_with_gap(target, user, topic, seen=0, gap=history + 2)
        async with target.connect() as new:
            await set_up(new, user)
            replayed, resumed = await _resume(new, {"type": "resume", "sessionId": session, "lastSeqPerTopic": {topic: 0}})
            assert [m["seqNo"] for m in replayed] == list(range(3, history + 3))
            assert resumed.get("missed") == [{"topic": topic, "fromSeq": 1, "oldestSeq": 3}], resumed

    run(main())


def test_resume_of_another_users_session_is_session_expired(target):
    """SPEC §2 Error codes (SESSION_EXPIRED: one of another user), §3 Sessions (same user): bob cannot resume alice's session, and alice still can."""

    async def main():
        alice, topic = target.name("alice"), target.name()
        session = await _session_with_gap(target, alice, topic, seen=1, gap=1)
        async with target.connect() as bob, target.connect() as again:
            await set_up(bob, target.name("bob"))
            assert_error(await request(bob, {"type": "resume", "sessionId": session}), "SESSION_EXPIRED")
            await still_open(bob, target)
            await set_up(again, alice)
            replayed, _ = await _resume(again, {"type": "resume", "sessionId": session})
            assert [m["seqNo"] for m in replayed] == [2]

    run(main())


def test_resume_with_another_server_epoch_is_session_expired(target):
    """SPEC §2 Client → server (resume: epoch?), §2 Error codes (SESSION_EXPIRED: an epoch that is not the server's): the right epoch resumes, another is refused."""

    async def main():
        user, topic = target.name("alice"), target.name()
        session = await _session_with_gap(target, user, topic, seen=1, gap=0)
        async with target.connect() as ws:
            ready, _ = await set_up(ws, user)
            assert_error(await request(ws, {"type": "resume", "sessionId": session, "epoch": ready["epoch"] + "-old"}), "SESSION_EXPIRED")
            _, resumed = await _resume(ws, {"type": "resume", "sessionId": session, "epoch": ready["epoch"]})
            assert resumed.get("topics") == [topic], resumed

    run(main())


def test_takeover_closes_the_old_connection_with_4002(target):
    """SPEC §3 Sessions, §2 Close codes (4002): a session resumed on another connection while attached to a live one closes the old one with 4002; the new one gets the messages."""

    async def main():
        user, topic = target.name("alice"), target.name()
        async with target.connect() as first, target.connect() as second:
            ready, _ = await set_up(first, user, topics=[topic])
            await set_up(second, user)
            _, resumed = await _resume(second, {"type": "resume", "sessionId": ready["sessionId"]})
            assert resumed.get("topics") == [topic], resumed
            await asyncio.wait_for(first.wait_closed(), 10)
            assert first.close_code == 4002
            await http_publish(target, target.name("feeder"), {"topic": topic, "messageId": "m", "data": "after"})
            assert fields(await recv_json(second), "seqNo", "data") == {"type": "message", "seqNo": 1, "data": "after"}

    run(main())


def test_ack_has_no_reply(target):
    """SPEC §2 Client → server (ack: "none"): ack {topic, seqNo} and ack {topic, messageId} get no reply."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"), topics=[topic])
            await send(ws, {"type": "publish", "topic": topic, "messageId": "m"})
            got = {m["type"]: m for m in [await recv_json(ws), await recv_json(ws)]}
            await send(ws, {"type": "ack", "topic": topic, "seqNo": got["message"]["seqNo"]})
            await send(ws, {"type": "ack", "topic": topic, "messageId": "m"})
            await still_open(ws, target)

    run(main())


def test_refresh_with_the_same_user_is_refreshed_and_another_is_auth_failed(target):
    """SPEC §2 Client → server (refresh), §2 Error codes (AUTH_FAILED: refresh naming another user): in demo auth refresh {token: the same user} gets refreshed {expiresAt: null}; another user's token is refused and changes nothing."""

    async def main():
        user, topic = target.name("alice"), target.name()
        async with target.connect() as ws:
            await set_up(ws, user, topics=[topic])
            reply = await request(ws, {"type": "refresh", "token": user})
            assert (reply["type"], reply.get("expiresAt", "absent")) == ("refreshed", None), reply
            assert_error(await request(ws, {"type": "refresh", "token": target.name("mallory")}), "AUTH_FAILED")
            presence = await request(ws, {"type": "presence", "topic": topic})
            assert presence.get("users") == [user], presence

    run(main())


def test_presence_lists_the_distinct_users_sorted_with_their_count(target):
    """SPEC §2 Client → server (presence): presence {topic, users, count}: the distinct users subscribed now, sorted, and their exact count."""

    async def main():
        topic = target.name()
        users = sorted(target.name(k) for k in ("carol", "alice", "bob"))
        async with contextlib.AsyncExitStack() as stack:
            conns = [await stack.enter_async_context(target.connect()) for _ in range(4)]
            for ws, user in zip(conns, [users[2], users[0], users[1], users[0]]):  # alice twice
                await set_up(ws, user, topics=[topic])
            reply = await request(conns[0], {"type": "presence", "topic": topic})
            assert fields(reply, "topic", "users", "count") == {"type": "presence", "topic": topic, "users": users, "count": 3}
            await conns[2].close()
            reply = await request(conns[0], {"type": "presence", "topic": topic})
            assert (reply.get("users"), reply.get("count")) == ([users[0], users[2]], 2), reply

    run(main())


def test_presence_lists_at_most_the_presence_limit(target):
    """SPEC §2 Client → server (presence: at most the presence limit of them in users; count is exact): past the limit the list stops, the count does not."""
    limit = target.limit("maxPresence", "the presence limit")
    if limit > 50:
        pytest.skip(f"the target lists {limit} users: more connections than the kit opens for it")

    async def main():
        topic = target.name()
        users = sorted(target.name("u") for _ in range(limit + 2))
        async with contextlib.AsyncExitStack() as stack:
            for user in users:
                await set_up(await stack.enter_async_context(target.connect()), user, topics=[topic])
            async with target.connect() as ws:
                await set_up(ws, target.name("asker"))
                reply = await request(ws, {"type": "presence", "topic": topic})
                assert (reply.get("count"), len(reply.get("users", ()))) == (limit + 2, limit), reply
                assert reply["users"] == sorted(reply["users"]) and set(reply["users"]) <= set(users)

    run(main())


# === §2 Error codes =================================================================================

# (id, set up first? (None: no, and SPEC does not say whether it is set up afterwards), what is
# sent, the error code, its `field` when SPEC says it names one)
ERROR_CASES = [
    ("auth-required-subscribe", False, {"type": "subscribe", "topic": "{t}"}, "AUTH_REQUIRED", None),
    ("auth-required-publish", False, {"type": "publish", "topic": "{t}", "messageId": "m"}, "AUTH_REQUIRED", None),
    ("auth-failed-empty-token", False, {"type": "setup", "token": ""}, "AUTH_FAILED", None),
    ("auth-failed-no-token", False, {"type": "setup"}, "AUTH_FAILED", None),
    ("auth-failed-number-token", False, {"type": "setup", "token": 5}, "AUTH_FAILED", None),
    ("already-setup", True, {"type": "setup", "token": "{u}"}, "ALREADY_SETUP", None),
    ("invalid-json-text", True, "this is not json", "INVALID_JSON", None),
    ("invalid-json-array", True, "[1, 2]", "INVALID_JSON", None),
    ("invalid-json-string", True, '"setup"', "INVALID_JSON", None),
    ("invalid-json-binary", True, b'{"type": "ping"}', "INVALID_JSON", None),
    ("unknown-type-missing", True, {"topic": "{t}"}, "UNKNOWN_TYPE", None),
    ("unknown-type-number", True, {"type": 7, "topic": "{t}"}, "UNKNOWN_TYPE", None),
    ("unknown-type", True, {"type": "dance", "topic": "{t}"}, "UNKNOWN_TYPE", None),
    ("invalid-message-no-topic", True, {"type": "subscribe"}, "INVALID_MESSAGE", "topic"),
    ("invalid-message-topic-number", True, {"type": "subscribe", "topic": 5}, "INVALID_MESSAGE", "topic"),
    ("invalid-message-no-message-id", True, {"type": "publish", "topic": "{t}"}, "INVALID_MESSAGE", "messageId"),
    ("invalid-message-empty-message-id", True, {"type": "publish", "topic": "{t}", "messageId": ""}, "INVALID_MESSAGE", "messageId"),
    ("invalid-message-number-message-id", True, {"type": "publish", "topic": "{t}", "messageId": 1}, "INVALID_MESSAGE", "messageId"),
    ("invalid-message-from-seq-0", True, {"type": "replay", "topic": "{t}", "fromSeq": 0}, "INVALID_MESSAGE", "fromSeq"),
    ("invalid-message-from-seq-string", True, {"type": "replay", "topic": "{t}", "fromSeq": "1"}, "INVALID_MESSAGE", "fromSeq"),
    ("invalid-message-no-session-id", True, {"type": "resume"}, "INVALID_MESSAGE", "sessionId"),
    ("invalid-topic-empty", True, {"type": "subscribe", "topic": ""}, "INVALID_TOPIC", None),
    ("invalid-topic-space", True, {"type": "subscribe", "topic": "a b"}, "INVALID_TOPIC", None),
    ("invalid-topic-tab", True, {"type": "subscribe", "topic": "a\tb"}, "INVALID_TOPIC", None),
    ("invalid-topic-newline", True, {"type": "subscribe", "topic": "a\nb"}, "INVALID_TOPIC", None),
    ("invalid-topic-control", True, {"type": "subscribe", "topic": "a\x01b"}, "INVALID_TOPIC", None),
    ("invalid-topic-star", True, {"type": "subscribe", "topic": "a*"}, "INVALID_TOPIC", None),
    ("invalid-topic-publish", True, {"type": "publish", "topic": "a b", "messageId": "m"}, "INVALID_TOPIC", None),
    ("invalid-topic-setup", None, {"type": "setup", "token": "{u}", "topics": ["{t}", "a b"]}, "INVALID_TOPIC", None),
    ("session-expired-unknown", True, {"type": "resume", "sessionId": "no-such-session"}, "SESSION_EXPIRED", None),
]


@pytest.mark.parametrize("case, set_up_first, msg, code, field", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_error_code_keeps_the_connection_open(target, case, set_up_first, msg, code, field):
    """SPEC §2 Error codes: each error is {type: "error", code, message} (with `field` for INVALID_MESSAGE), and the connection stays open, as it was."""

    async def main():
        fill = {"{t}": target.name(), "{u}": target.name("u")}
        text = msg if isinstance(msg, (str, bytes)) else json.dumps(msg)
        for key, value in fill.items():
            text = text.replace(key, value) if isinstance(text, str) else text
        async with target.connect() as ws:
            if set_up_first:
                await set_up(ws, target.name("u"))
            await send(ws, text)
            error = await recv_json(ws)
            assert_error(error, code, **({"field": field} if field else {}))
            if set_up_first:
                await still_open(ws, target)
            elif set_up_first is None:
                assert (await request(ws, {"type": "ping"}))["type"] == "pong"
            else:
                await still_open_not_set_up(ws, target)

    run(main())


def test_sub_socket_is_percent_decoded_and_locked_to_its_topic(target):
    """SPEC §1 Endpoints (/ws/sub/{topic}), §2 Error codes (TOPIC_LOCKED): /ws/sub/caf%C3%A9 is subscribed to "café" after setup, refuses to subscribe to or unsubscribe from another topic, and may publish."""

    async def main():
        topic = target.name("café")
        path = "/ws/sub/" + urllib.parse.quote(topic)
        async with target.connect(path) as ws:
            _, subs = await set_up(ws, target.name("alice"), replies=1)
            assert fields(subs[0], "topic", "seqNo") == {"type": "subscribed", "topic": topic, "seqNo": 0}
            other = target.name()
            for kind in ("subscribe", "unsubscribe"):
                assert_error(await request(ws, {"type": kind, "topic": other}), "TOPIC_LOCKED")
            await send(ws, {"type": "publish", "topic": topic, "messageId": "m"})
            assert sorted([(await recv_json(ws))["type"], (await recv_json(ws))["type"]]) == ["ack", "message"]
            assert fields(await request(ws, {"type": "subscribe", "topic": topic}), "topic", "seqNo") == {"type": "subscribed", "topic": topic, "seqNo": 1}
        async with target.connect(path) as ws:
            _, subs = await set_up(ws, target.name("bob"), topics=[topic, topic], replies=1)
            assert subs[0]["topic"] == topic
            assert_error(await request(ws, {"type": "subscribe", "topic": target.name()}), "TOPIC_LOCKED")  # no second subscribed came first

    run(main())


def test_too_many_subscriptions(target):
    """SPEC §2 Error codes (TOO_MANY_SUBSCRIPTIONS), §3 Limits (subscriptions per connection): up to the limit subscribe works, one more is refused, and the connection stays open."""
    limit = target.limit("maxSubscriptions", "the subscription limit per connection")
    if limit > 10_000:
        pytest.skip(f"the target allows {limit} subscriptions per connection: more than the kit makes")

    async def main():
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            topics = [target.name() for _ in range(limit + 1)]
            for topic in topics[:-1]:
                await send(ws, {"type": "subscribe", "topic": topic})
            assert [(await recv_json(ws, 10))["type"] for _ in range(limit)] == ["subscribed"] * limit
            assert_error(await request(ws, {"type": "subscribe", "topic": topics[-1]}), "TOO_MANY_SUBSCRIPTIONS")
            await still_open(ws, target)
            assert (await request(ws, {"type": "subscribe", "topic": topics[0]}))["type"] == "subscribed"  # idempotent: still fine

    run(main())


@pytest.mark.slow
def test_rate_limited_publish_is_not_processed(target):
    """SPEC §2 Error codes (RATE_LIMITED: nothing was processed, retry with the same messageId), §3 Limits (publish rate): past the burst publishes are refused; the refused messageId is accepted later, not a duplicate."""
    rate = target.limit("publishRate", "the publish rate limit")
    burst = target.limit("publishBurst", "the publish burst")
    if not rate:
        pytest.skip("the target has no publish rate limit (0)")
    n = int(burst + 3 * rate + 10)
    if n > 20_000 or 1 / rate > KIT_MAX_WAIT / 2:
        pytest.skip(f"a publish rate of {rate}/s with a burst of {burst} takes too long to exceed or to recover from")

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            for i in range(n):
                await send(ws, {"type": "publish", "topic": topic, "messageId": f"m{i}", "payload": i})
            replies = [await recv_json(ws, 20) for _ in range(n)]
            limited = [r for r in replies if r["type"] == "error"]
            assert limited and all(r["code"] == "RATE_LIMITED" for r in limited), limited[:3]
            acks = [r for r in replies if r["type"] == "ack"]
            assert [a["seqNo"] for a in acks] == list(range(1, len(acks) + 1)), "a refused publish took a seqNo"
            refused = limited[0].get("messageId") or next(f"m{i}" for i, r in enumerate(replies) if r["type"] == "error")
            await asyncio.sleep(2 / rate + 0.05)
            ack = await publish(ws, topic, refused)
            assert (ack["type"], ack.get("status"), ack.get("seqNo")) == ("ack", "ok", len(acks) + 1), ack

    run(main(), timeout=50)


# === §2 Close codes =================================================================================


@pytest.mark.parametrize("payload, code", [(b"", 1005), (ms.serialize_close(1000, "done"), 1000), (ms.serialize_close(4321), 4321)],
                         ids=["empty", "1000", "4321"])
def test_client_close_is_echoed(target, payload, code):
    """SPEC §2 Close codes (1000: normal close, echoed; RFC 6455 §5.5.1): a client close gets a close echoing its code (none for an empty one), then the server closes TCP."""
    with target.raw_ws() as client:
        client.send(masked(ms.Opcode.CLOSE, payload))
        assert client.recv_close() == code
        assert client.at_eof()


@pytest.mark.parametrize(
    "data, code",
    [
        pytest.param(ms.serialize_frame(ms.Opcode.TEXT, b'{"type":"ping"}'), 1002, id="unmasked"),
        *(pytest.param(masked(ms.Opcode.TEXT, b"x", rsv=rsv), 1002, id=f"rsv{rsv}") for rsv in (1, 2, 4)),
        pytest.param(masked(3, b""), 1002, id="opcode3"),
        pytest.param(masked(0xB, b""), 1002, id="opcode0xb"),
        pytest.param(masked(ms.Opcode.PING, b"p", fin=False), 1002, id="fragmented-ping"),
        pytest.param(masked(ms.Opcode.PING, b"p" * 126), 1002, id="ping-126"),
        pytest.param(masked(ms.Opcode.CLOSE, (1004).to_bytes(2, "big")), 1002, id="close-1004"),
        pytest.param(masked(ms.Opcode.CLOSE, b"\x03"), 1002, id="close-1-byte"),
        pytest.param(masked(ms.Opcode.CONT, b"x"), 1002, id="continuation-out-of-place"),
        pytest.param(masked(ms.Opcode.TEXT, b"{", fin=False) + masked(ms.Opcode.TEXT, b"}"), 1002, id="text-inside-fragmented"),
        pytest.param(masked(ms.Opcode.TEXT, b'{"type":"\xff"}'), 1007, id="invalid-utf8"),
        pytest.param(masked(ms.Opcode.TEXT, b"{", fin=False) + masked(ms.Opcode.CONT, b"\xc0\xaf}"), 1007, id="invalid-utf8-fragment"),
    ],
)
def test_protocol_violation_closes_with_its_code(target, data, code):
    """SPEC §2 Close codes (1002: RFC 6455 violation: unmasked frame, reserved bits, bad opcode, fragmented or oversized control frame, bad close code, continuation out of place; 1007: not UTF-8): a close frame with that code, then the server closes TCP."""
    with target.raw_ws() as client:
        client.send(data)
        assert client.recv_close() == code
        assert client.at_eof()


@pytest.mark.parametrize("how", ["one-frame", "fragments"])
def test_message_over_the_size_limit_is_1009(target, how):
    """SPEC §2 Close codes (1009), §3 Limits (message size): a message of the limit is read (and answered), one a byte over it, whole or in fragments, is closed with 1009."""
    limit = target.limit("maxMessageSize", "the message size limit")
    if limit > 64 << 20:
        pytest.skip(f"the target's message size limit ({limit} bytes) is more than the kit sends")
    head = b'{"type": "ping", "pad": "'
    fits = head + b"a" * (limit - len(head) - 2) + b'"}'
    over = b"a" * (limit + 1)
    with target.raw_ws(timeout=20) as client:
        client.send(masked(ms.Opcode.TEXT, fits))
        assert client.recv_json()["type"] == "pong"
        if how == "one-frame":
            client.send(masked(ms.Opcode.TEXT, over))
        else:
            half = limit // 2
            client.send(masked(ms.Opcode.TEXT, over[:half], fin=False) + masked(ms.Opcode.CONT, over[half:]))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):  # it may stop reading what follows the limit
            assert client.recv_close() == 1009
            return
        raise AssertionError("the connection was reset before a 1009 close frame arrived")


@pytest.mark.slow
def test_no_setup_within_the_setup_timeout_is_4000(target):
    """SPEC §2 Close codes (4000), §3 Limits (setup timeout): a connection that sends no setup is closed with 4000 once the setup timeout has passed, not before."""
    timeout = target.wait_for(target.limit("setupTimeout", "the setup timeout"), "setup timeout")

    async def main():
        async with target.connect() as ws:
            start = asyncio.get_running_loop().time()
            await asyncio.wait_for(ws.wait_closed(), timeout + 5)
            elapsed = asyncio.get_running_loop().time() - start
        assert ws.close_code == 4000, ws.close_code
        assert elapsed > timeout * 0.5, f"closed after {elapsed:.1f} s, the setup timeout is {timeout} s"

    run(main(), timeout=timeout + 10)


# === §3 Semantics ===================================================================================


def test_dedup_repeat_gets_the_original_seq_no_and_is_not_delivered(target):
    """SPEC §3 Dedup (I2): a repeated messageId gets ack duplicate with the original seqNo, is not delivered, and takes no seqNo."""

    async def main():
        topic = target.name()
        async with target.connect() as pub, target.connect() as sub:
            await set_up(pub, target.name("p"))
            await set_up(sub, target.name("s"), topics=[topic])
            acks = [await publish(pub, topic, "m1", 1), await publish(pub, topic, "m1", 2), await publish(pub, topic, "m2", 3)]
            assert [fields(a, "messageId", "status") for a in acks] == [
                {"type": "ack", "messageId": m, "status": status} for m, status in (("m1", "ok"), ("m1", "duplicate"), ("m2", "ok"))]
            got = [await recv_json(sub) for _ in range(2)]
            assert [(m["seqNo"], m["messageId"], m["data"]) for m in got] == [(1, "m1", 1), (2, "m2", 3)]
            await still_open(sub, target)  # the duplicate was not delivered
            assert [a.get("seqNo") for a in acks] == [1, 1, 2]

    run(main())


def test_dedup_is_per_user_across_connections(target):
    """SPEC §3 Dedup (I2: keyed by userId and messageId): another user's same messageId is accepted; the same user's, from another connection, is a duplicate."""

    async def main():
        topic, alice = target.name(), target.name("alice")
        async with target.connect() as a1, target.connect() as a2, target.connect() as b:
            await set_up(a1, alice)
            await set_up(a2, alice)
            await set_up(b, target.name("bob"))
            acks = [await publish(a1, topic, "m"), await publish(b, topic, "m"), await publish(a2, topic, "m")]
            assert [a.get("status") for a in acks] == ["ok", "ok", "duplicate"], acks
            assert [a.get("seqNo") for a in acks] == [1, 2, 1]

    run(main())


def test_dedup_spans_topics(target):
    """SPEC §3 Dedup (I2: keyed by userId and messageId, not topic): the same user's messageId on another topic is a duplicate, with the original's seqNo, and is not delivered there."""

    async def main():
        t1, t2 = target.name(), target.name()
        async with target.connect() as pub, target.connect() as sub:
            await set_up(pub, target.name("p"))
            await set_up(sub, target.name("s"), topics=[t2])
            await publish_many(pub, t1, 2, "x")
            ack = await publish(pub, t2, "x-1")
            assert ack.get("status") == "duplicate", ack
            await still_open(sub, target)  # not delivered on t2
            assert ack.get("seqNo") == 2

    run(main())


def test_dedup_forgets_a_refused_publish(target):
    """SPEC §3 Dedup (I2: a publish that failed is not remembered): a messageId refused (invalid topic) is accepted when corrected."""

    async def main():
        topic = target.name()
        async with target.connect() as ws:
            await set_up(ws, target.name("u"))
            assert_error(await publish(ws, "a b", "m"), "INVALID_TOPIC")
            assert fields(await publish(ws, topic, "m"), "status", "seqNo") == {"type": "ack", "status": "ok", "seqNo": 1}

    run(main())


def test_dedup_is_shared_by_websocket_and_post_publish(target):
    """SPEC §1 Endpoints (POST /publish: the same dedup as a WebSocket publish), §3 Dedup: a messageId published over HTTP is a duplicate over the WebSocket for the same user, and the other way round."""

    async def main():
        topic, user = target.name(), target.name("feeder")
        async with target.connect() as ws:
            await set_up(ws, user)
            assert (await http_publish(target, user, {"topic": topic, "messageId": "h", "data": 1}))["seqNo"] == 1
            assert fields(await publish(ws, topic, "h"), "status", "seqNo") == {"type": "ack", "status": "duplicate", "seqNo": 1}
            assert (await publish(ws, topic, "w"))["seqNo"] == 2
            answer = await http_publish(target, user, {"topic": topic, "messageId": "w", "data": 2})
            assert (answer["status"], answer["seqNo"]) == ("duplicate", 2)

    run(main())


def test_ordering_three_publishers_five_subscribers(target):
    """SPEC §3 Ordering (I3): 3 publishers x 200 concurrent messages: all 5 subscribers see seqNo 1..600 once, in order, identically; one connection's publishes keep their order."""
    target.need_burst(200)

    async def main():
        topic = target.name()
        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(target.connect()) for _ in range(5)]
            pubs = [await stack.enter_async_context(target.connect()) for _ in range(3)]
            for ws in subs:
                await set_up(ws, target.name("sub"), topics=[topic])
            for ws in pubs:
                await set_up(ws, target.name("pub"))

            async def publisher(i, ws):
                for n in range(200):
                    await send(ws, {"type": "publish", "topic": topic, "messageId": f"p{i}-{n}", "payload": n})
                return [await recv_json(ws, 10) for _ in range(200)]

            async def subscriber(ws):
                return [await recv_json(ws, 10) for _ in range(600)]

            results = await asyncio.gather(*(subscriber(ws) for ws in subs), *(publisher(i, ws) for i, ws in enumerate(pubs)))
            seen, acks = results[:5], results[5:]
            order = [m["messageId"] for m in seen[0]]
            for msgs in seen:
                assert [m["type"] for m in msgs] == ["message"] * 600
                assert [m["seqNo"] for m in msgs] == list(range(1, 601))
                assert [m["messageId"] for m in msgs] == order
            assert sorted(order) == sorted(f"p{i}-{n}" for i in range(3) for n in range(200))
            seq_of = {m["messageId"]: m["seqNo"] for m in seen[0]}
            for i, publisher_acks in enumerate(acks):
                assert [a.get("messageId") for a in publisher_acks] == [f"p{i}-{n}" for n in range(200)]
                wrong = [a for a in publisher_acks if a.get("status") != "ok" or a.get("seqNo") != seq_of[a["messageId"]]]
                assert not wrong, f"acks that are not ok with the seqNo delivered: {wrong[:2]}"
                mine = [seq_of[f"p{i}-{n}"] for n in range(200)]
                assert mine == sorted(mine)

    run(main(), timeout=40)


@pytest.mark.slow
def test_fan_out_to_500_subscribers(target):
    """SPEC §3 Ordering (every connection subscribed when a message is published receives it), §1 Endpoints (/stats): one publish reaches 500 subscribers (fewer under a lower connection limit); /stats counts them, and none once they closed."""
    limit = (target.limits() or {}).get("maxConnections")

    async def main():
        base = await target.settled_stats()
        n = 500 if limit is None else min(500, limit - base["connections"] - 2)
        if n < 10:
            pytest.skip(f"the target's connection limit ({limit}) leaves room for {n} subscribers")
        topic = target.name()
        opened = []

        async def subscriber(i):
            ws = await connect(target.ws(), open_timeout=20, ping_interval=None)
            opened.append(ws)
            await send(ws, {"type": "setup", "token": target.name("u"), "topics": [topic]})
            assert (await recv_json(ws, 20))["type"] == "ready"
            assert (await recv_json(ws, 20))["type"] == "subscribed"
            return ws

        try:
            conns = await asyncio.gather(*(subscriber(i) for i in range(n)))
            expected = {"connections": base["connections"] + n, "topics": base["topics"] + 1, "subscriptions": base["subscriptions"] + n}
            stats = await target.wait_stats(expected)
            assert {k: stats[k] for k in expected} == expected
            async with target.connect() as pub:
                await set_up(pub, target.name("pub"))
                ack = await publish(pub, topic, "fan", {"hello": "all"})
            got = await asyncio.gather(*(recv_json(ws, 20) for ws in conns))
            assert ack.get("status") == "ok", ack
            assert all(fields(m, "topic", "seqNo", "messageId", "data") == message(topic, 1, "fan", {"hello": "all"}) for m in got), got[0]
            await asyncio.gather(*(ws.close() for ws in conns))
            expected = {k: base[k] for k in ("connections", "topics", "subscriptions")}
            stats = await target.wait_stats(expected)
            assert {k: stats[k] for k in expected} == expected
        finally:
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)

    run(main(), timeout=45)


def test_session_ids_are_unique_and_unguessable(target):
    """SPEC §3 Sessions (an unguessable sessionId): 20 connections get 20 different sessionIds, each at least 16 characters (room for 96 random bits in base64)."""

    async def main():
        ids = set()
        for _ in range(20):
            async with target.connect() as ws:
                ids.add((await set_up(ws, target.name("u")))[0]["sessionId"])
        assert len(ids) == 20
        assert all(isinstance(i, str) and len(i) >= 16 for i in ids), sorted(ids)[:3]

    run(main())


@pytest.mark.parametrize("how", ["close", "drop"])
def test_messages_published_during_a_resume_are_neither_lost_nor_repeated(target, how):
    """SPEC §3 Sessions (I6: messages published while the replay runs are neither lost nor duplicated nor reordered): two publishers publish all through a disconnect (a clean close, or TCP dropped), the reconnect and the resume; the client sees every seqNo once, in order."""
    history = target.limit("historyMessages", "the history size per topic")
    if history < 40:
        pytest.skip(f"the target keeps {history} messages per topic: too few for a gap to fill")
    window = min(1000, history // 4)  # how far the publishers may run ahead of what the consumer read
    rate = (target.limits() or {}).get("publishRate") or 0

    async def main():
        topic = target.name()
        stop = asyncio.Event()
        progress = {"seen": 0, "latest": 0, "during_gap": 0}

        async def publisher(name: str) -> list[int]:
            seqs = []
            async with target.connect() as pub:
                await set_up(pub, target.name(name))
                i = 0
                while not stop.is_set():
                    if progress["latest"] - progress["seen"] >= window:
                        await asyncio.sleep(0.001)
                        continue
                    ack = await publish(pub, topic, f"{name}{i}", i)
                    if ack["type"] == "error" and ack["code"] == "RATE_LIMITED":
                        await asyncio.sleep(2 / rate if rate else 0.01)
                        continue  # the same messageId again
                    assert ack["type"] == "ack" and ack["status"] == "ok", ack
                    seqs.append(ack["seqNo"])
                    progress["latest"] = max(progress["latest"], ack["seqNo"])
                    i += 1
            return seqs

        async def consumer() -> tuple[list[int], dict]:
            seen: list[int] = []
            user = target.name("alice")
            # max_queue=None: websockets stops reading when 16 messages wait unread, and would
            # then not see the server's close frame behind them until its close timeout.
            first = await connect(target.ws(), ping_interval=None, max_queue=None)
            ready, (subscribed,) = await set_up(first, user, topics=[topic])
            while len(seen) < 300:
                seen.append(seq_of_text(await asyncio.wait_for(first.recv(), 5)))
                progress["seen"] = seen[-1]
            gap_start = progress["latest"]
            if how == "close":
                await first.close()
            else:
                first.transport.abort()
            async with target.connect(ping_interval=None) as second:
                await set_up(second, user)
                await send(second, {"type": "resume", "sessionId": ready["sessionId"], "lastSeqPerTopic": {topic: seen[-1]}})
                replayed = 0
                while (reply := json.loads(await asyncio.wait_for(second.recv(), 5)))["type"] == "message":
                    seen.append(reply["seqNo"])
                    replayed += 1
                assert reply["type"] == "resumed", reply
                resumed = reply
                progress["seen"] = seen[-1]
                progress["during_gap"] = seen[-1] - gap_start
                assert resumed.get("replayed") == replayed and resumed.get("missed") == [], resumed
                while len(seen) < 600:
                    seen.append(seq_of_text(await asyncio.wait_for(second.recv(), 5)))
                    progress["seen"] = seen[-1]
                stop.set()
                await asyncio.sleep(0.05)
                while not all(task.done() for task in publishers):
                    await asyncio.sleep(0.01)
                last = progress["latest"]
                while seen[-1] < last:  # drain to the very last message published
                    seen.append(seq_of_text(await asyncio.wait_for(second.recv(), 5)))
            return [subscribed["seqNo"]] + seen, resumed

        publishers = [asyncio.ensure_future(publisher(name)) for name in ("bob", "carol")]
        seen, resumed = await consumer()
        acked = [seq for task in publishers for seq in task.result()]
        start, seen = seen[0], seen[1:]
        assert seen == list(range(start + 1, start + len(acked) + 1))
        assert sorted(acked) == seen
        assert resumed["replayed"] > 0 and progress["during_gap"] > 0  # published during the gap

    run(main(), timeout=50)


def test_slow_consumer_is_closed_with_4001(target):
    """SPEC §3 Slow consumers (I4), §2 Close codes (4001): a subscriber that stops reading is closed with 4001 once its unsent data passes the buffer limit; what it was sent before is in order, nothing skipped."""
    max_buffer = target.limit("maxBuffer", "the outgoing buffer limit")
    size = min(64 << 10, target.limit_or_spec("maxMessageSize", 1 << 20) // 2)
    budget = 2 * max_buffer + (16 << 20)  # the limit, with room for what the kernel buffers on both sides
    n_max = budget // size + 1
    if n_max > 5000:
        pytest.skip(f"the target's buffer limit ({max_buffer} bytes) takes more publishes than the kit makes to pass")
    burst = (target.limits() or {}).get("publishBurst") or n_max
    rate = (target.limits() or {}).get("publishRate") or 0

    async def main():
        topic = target.name()
        slow = target.raw_ws(timeout=10, rcvbuf=4096)
        heartbeat = None
        try:
            slow.setup(target.name("slow"), topics=[topic])
            # From here on `slow` reads nothing: the kernel buffers fill up, then the server's. It
            # sends an unsolicited pong now and then (RFC 6455 §5.5.3: a heartbeat), so that a
            # short keepalive does not close it first.

            async def beat() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    slow.send(masked(ms.Opcode.PONG, b""))

            heartbeat = asyncio.ensure_future(beat())
            async with contextlib.AsyncExitStack() as stack:
                pubs = [await stack.enter_async_context(target.connect()) for _ in range(min(20, math.ceil(n_max / max(burst, 1)) + 1))]
                for ws in pubs:
                    await set_up(ws, target.name("pub"))
                before = await target.settled_stats()
                published = 0
                pad = "x" * (size - 200)
                for i in range(n_max):
                    while True:
                        ack = await publish(pubs[i % len(pubs)], topic, f"m{i}", {"pad": pad})
                        if ack["type"] == "error" and ack["code"] == "RATE_LIMITED":
                            await asyncio.sleep(1 / rate if rate else 0.01)
                            continue
                        assert ack["type"] == "ack", ack
                        break
                    published += 1
                    if i % 8 == 7 and (await target.stats())["connections"] < before["connections"]:
                        break
            heartbeat.cancel()
            # The slow client finally reads: what was written before the cut, then close 4001.
            slow.sock.settimeout(3)
            read = []
            while True:
                frame = await asyncio.to_thread(slow.recv_frame)
                if frame.opcode == ms.Opcode.CLOSE:
                    assert ms.parse_close(frame.payload)[0] == 4001
                    break
                if frame.opcode == ms.Opcode.TEXT:
                    read.append(seq_of_text(frame.payload.decode()))
            assert read == list(range(1, len(read) + 1)), f"{len(read)} of {published} read, not 1..n: {read[:5]}"
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            slow.close()

    run(main(), timeout=55)


@pytest.mark.slow
def test_silent_connection_is_pinged_then_closed_with_1011(target):
    """SPEC §3 Keepalive, §2 Close codes (1011: no pong in time): a connection that sends nothing is pinged, and closed with 1011 when it does not answer."""
    interval = target.limit("pingInterval", "the ping interval")
    timeout = target.limit("pingTimeout", "the ping timeout")
    target.wait_for(interval + timeout if interval else 0, "ping interval + ping timeout")
    with target.raw_ws(timeout=interval + timeout + 5) as client:
        client.setup(target.name("u"))
        pings = 0
        while (frame := client.recv_frame()).opcode != ms.Opcode.CLOSE:
            pings += frame.opcode == ms.Opcode.PING
        assert pings >= 1 and ms.parse_close(frame.payload)[0] == 1011, (pings, frame)


def _deflate_or_skip(ws) -> None:
    """Skip unless the connection negotiated permessage-deflate (optional in SPEC)."""
    if "permessage-deflate" not in (ws.response.headers.get("Sec-WebSocket-Extensions") or ""):
        pytest.skip("the target does not negotiate permessage-deflate (optional: SPEC §3 Compression)")


def test_compressed_messages_go_both_ways(target):
    """SPEC §3 Compression (optional, RFC 7692): with permessage-deflate negotiated, a large compressible publish and its broadcast arrive intact."""

    async def main():
        topic = target.name()
        async with target.connect(compression="deflate") as ws:
            _deflate_or_skip(ws)
            await set_up(ws, target.name("u"), topics=[topic])
            payload = {"text": "compressible " * 2000, "n": list(range(100))}
            await send(ws, {"type": "publish", "topic": topic, "messageId": "m", "payload": payload})
            got = {m["type"]: m for m in [await recv_json(ws), await recv_json(ws)]}
            assert got["message"]["data"] == payload and got["ack"]["status"] == "ok"

    run(main())


def test_compressed_message_inflating_past_the_limit_is_1009(target):
    """SPEC §3 Compression (the decompressed size counts against the message size limit), §2 Close codes (1009): a small compressed frame that inflates past the limit is closed with 1009."""

    async def main():
        async with target.connect(compression="deflate", ping_interval=None) as ws:
            _deflate_or_skip(ws)
            limit = target.limit("maxMessageSize", "the message size limit")
            await ws.send('{"type": "ping", "pad": "' + "a" * limit + '"}')
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 1009, ws.close_code

    run(main())
