"""Sections 4-5 of microsocket.py: HTTP/1.1 request parsing and responses, and the WebSocket handshake (sans-I/O).

Requests are bytes in, Request objects or HTTPError statuses out; the handshake is checked through
check_handshake and through App.handle, as the server routes it. No socket is opened.
"""

from __future__ import annotations

import base64
import json

import pytest

import microsocket as ms
from conftest import BrokerDriver, parse_response


# === 4. HTTP/1.1 ==================================================================================


def test_parse_request_head_good():
    """A request line and headers parse into method, path, query, version and lower-case headers."""
    req = ms.parse_request_head(b"GET /ws/sub/a%20b?x=1&y=2 HTTP/1.1\r\nHost: example\r\nX-Thing: \t v 1 \r\nX-Thing: w")
    assert (req.method, req.target, req.version) == ("GET", "/ws/sub/a%20b?x=1&y=2", (1, 1))
    assert (req.path, req.query) == ("/ws/sub/a%20b", "x=1&y=2")
    assert req.headers == [("host", "example"), ("x-thing", "v 1"), ("x-thing", "w")]
    assert req.header("x-thing") == "v 1, w" and req.header_count("x-thing") == 2 and req.header("absent") is None


@pytest.mark.parametrize(
    "version, connection, tokens, keep_alive",
    [
        ("1.1", None, [], True),
        ("1.1", ["close"], ["close"], False),
        ("1.1", ["Keep-Alive, Upgrade"], ["keep-alive", "upgrade"], True),
        ("1.1", ["keep-alive", "CLOSE"], ["keep-alive", "close"], False),
        ("1.0", None, [], False),
        ("1.0", ["Keep-Alive"], ["keep-alive"], True),
        ("1.0", ["close"], ["close"], False),
    ],
)
def test_request_tokens_and_keep_alive(version, connection, tokens, keep_alive):
    """Connection is a case-insensitive token list (over several lines too); HTTP/1.1 keeps alive by default, 1.0 only on request."""
    lines = [f"GET / HTTP/{version}", "Host: x"] + [f"Connection: {v}" for v in connection or ()]
    req = ms.parse_request_head("\r\n".join(lines).encode())
    assert req.tokens("connection") == tokens
    assert req.keep_alive is keep_alive


@pytest.mark.parametrize(
    "head, status",
    [
        (b"GET /\r\nHost: x", 400),
        (b"get / HTTP/1.1", 400),
        (b"GET  / HTTP/1.1", 400),
        (b"GET / HTTP/1.1 extra", 400),
        (b"GET / HTTP/1.x", 400),
        (b"GET http://x/ HTTP/1.1", 400),
        (b"GET / HTTP/2.0", 505),
        (b"GET / HTTP/0.9", 505),
        ("GET /é HTTP/1.1".encode(), 400),
        ("GET / HTTP/1.1\r\nX-Name: é".encode(), 400),
        (b"GET / HTTP/1.1\r\nX-A: b\r\n folded", 400),
        (b"GET / HTTP/1.1\r\nX-A: b\r\n\tfolded: c", 400),
        (b"GET / HTTP/1.1\r\nBad Name: x", 400),
        (b"GET / HTTP/1.1\r\nX-A : x", 400),
        (b"GET / HTTP/1.1\r\nno colon", 400),
        (b"GET / HTTP/1.1\r\nX-A: a\x01b", 400),
        (b"GET / HTTP/1.1" + b"\r\nX: y" * (ms.MAX_HEADERS + 1), 431),
    ],
)
def test_parse_request_head_errors(head, status):
    """Bad request lines, other HTTP versions, non-ASCII, obs-fold, bad header lines and too many headers get their status."""
    with pytest.raises(ms.HTTPError) as info:
        ms.parse_request_head(head)
    assert info.value.status == status


@pytest.mark.parametrize("value", ["a\rb", "a\nb", "a\r", "\nX: smuggled", "a\x7fb", "a\x00b", "a\x1bb", "a\r\r\nb"])
def test_parse_request_head_refuses_control_characters(value):
    """A bare CR or LF (a smuggled header), DEL or any other control character but tab is 400; tabs are kept."""
    with pytest.raises(ms.HTTPError) as info:
        ms.parse_request_head(f"GET / HTTP/1.1\r\nHost: x\r\nX-A: {value}".encode())
    assert info.value.status == 400 and "control character" in info.value.message
    assert ms.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-A:\ta\tb\t").header("x-a") == "a\tb"


def test_parse_request_head_max_headers_is_allowed():
    """Exactly MAX_HEADERS header lines are accepted."""
    head = b"GET / HTTP/1.1\r\nHost: x" + b"\r\nX: y" * (ms.MAX_HEADERS - 1)
    assert len(ms.parse_request_head(head).headers) == ms.MAX_HEADERS


def test_request_reader_split_across_feeds():
    """A request fed one byte at a time comes out once, when its last byte arrives."""
    reader = ms.RequestReader()
    raw = b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n"
    for byte in raw[:-1]:
        reader.feed(bytes((byte,)))
        assert reader.next_request() is None
    reader.feed(raw[-1:])
    assert reader.next_request().path == "/stats"
    assert reader.next_request() is None


def test_request_reader_pipelined_with_body():
    """Pipelined requests, one with a Content-Length body split across feeds, come out in order with their bodies."""
    reader = ms.RequestReader()
    reader.feed(b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhe")
    assert reader.next_request() is None
    reader.feed(b"llo" + b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
    requests = [reader.next_request() for _ in range(4)]
    assert [(r.method, r.path, r.body) for r in requests[:3]] == [("POST", "/publish", b"hello"), ("GET", "/a", b""), ("GET", "/b", b"")]
    assert requests[3] is None


def test_request_reader_head_limit():
    """A head of exactly max_head_size bytes is read; one byte more is 431, even before the blank line arrives."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\nX: "
    exact = head + b"a" * (100 - len(head))
    reader = ms.RequestReader(max_head_size=100)
    reader.feed(exact + b"\r\n\r\n")
    assert reader.next_request().header("x") == "a" * (100 - len(head))
    for data in (exact + b"a\r\n\r\n", exact + b"a"):
        reader = ms.RequestReader(max_head_size=100)
        reader.feed(data)
        with pytest.raises(ms.HTTPError) as info:
            reader.next_request()
        assert info.value.status == 431


@pytest.mark.parametrize(
    "headers, status",
    [
        ([b"Content-Length: 11"], 413),
        ([b"Content-Length: abc"], 400),
        ([b"Content-Length: -1"], 400),
        ([b"Content-Length: 1.5"], 400),
        ([b"Content-Length: "], 400),
        ([b"Content-Length: 5", b"Content-Length: 6"], 400),
        ([b"Transfer-Encoding: chunked"], 411),
        ([b"Transfer-Encoding: chunked", b"Content-Length: 5"], 411),
    ],
)
def test_request_reader_body_errors(headers, status):
    """A body over the limit is 413 from the head alone; a bad or conflicting Content-Length is 400; Transfer-Encoding is 411."""
    reader = ms.RequestReader(max_body_size=10)
    reader.feed(b"\r\n".join([b"POST /publish HTTP/1.1", b"Host: x", *headers]) + b"\r\n\r\n")
    with pytest.raises(ms.HTTPError) as info:
        reader.next_request()
    assert info.value.status == status


def test_response_serialize():
    """A response has status line, Content-Type, Content-Length, Connection and extra headers; HEAD keeps the length, drops the body."""
    resp = ms.Response(200, b"hi", "text/plain", [("X-Extra", "1")])
    full = resp.serialize()
    assert full.startswith(b"HTTP/1.1 200 OK\r\n") and full.endswith(b"\r\n\r\nhi")
    for line in (b"Content-Type: text/plain", b"Content-Length: 2", b"Connection: keep-alive", b"X-Extra: 1"):
        assert b"\r\n" + line + b"\r\n" in full
    assert resp.serialize(head=True) == full[:-2]
    assert b"\r\nConnection: close\r\n" in resp.serialize(keep_alive=False)
    switching = ms.Response(101, headers=[("Upgrade", "websocket")]).serialize()
    assert switching.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and b"Content-Length" not in switching


# === 5. WebSocket handshake =======================================================================


RFC_WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def handshake_request(method: str = "GET", path: str = "/ws", version: str = "1.1", **changes: str | None) -> ms.Request:
    """A parsed upgrade request; keyword arguments (underscores for dashes) replace or, with None, drop a header."""
    headers = {"Host": "x", "Upgrade": "websocket", "Connection": "Upgrade"}
    headers.update({"Sec-WebSocket-Key": RFC_WS_KEY, "Sec-WebSocket-Version": "13"})
    for name, value in changes.items():
        name = name.replace("_", "-")
        headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
        if value is not None:
            headers[name] = value
    lines = [f"{method} {path} HTTP/{version}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ms.parse_request_head("\r\n".join(lines).encode())


def app_handle(request: ms.Request, **config) -> ms.Response | ms.Upgrade | ms.PendingResponse:
    """Route a request through a fresh App (around a BrokerDriver's broker), as the server does."""
    return BrokerDriver(**config).app().handle(request)


UPGRADE_REQUIRED = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-version": "13"}


def test_accept_key_rfc_example():
    """RFC 6455 §1.3: the key dGhlIHNhbXBsZSBub25jZQ== gives s3pPLMBiTxaQ9kYGzzhZRbK+xOo=."""
    assert ms.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_request_without_one_host_is_400():
    """RFC 9112 §3.2: an HTTP/1.1 request without Host, or any request with two, is 400; HTTP/1.0 may omit it."""
    for head in (b"GET /ws HTTP/1.1\r\nUpgrade: websocket", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b", b"GET / HTTP/1.0\r\nHost: a\r\nHost: a"):
        with pytest.raises(ms.HTTPError) as info:
            ms.parse_request_head(head)
        assert info.value.status == 400 and "Host" in info.value.message
    assert ms.parse_request_head(b"GET /stats HTTP/1.0").path == "/stats"


@pytest.mark.parametrize(
    "target, path, query",
    [
        ("http://example.com/stats", "/stats", ""),
        ("http://example.com:3000/ws/sub/a%20b?x=1", "/ws/sub/a%20b", "x=1"),
        ("HTTPS://example.com", "/", ""),
        ("http://example.com?q", "/", "q"),
    ],
)
def test_absolute_form_target_is_accepted(target, path, query):
    """RFC 9112 §3.2.2: a server MUST accept the absolute-form; its path and query are routed as usual."""
    request = ms.parse_request_head(f"GET {target} HTTP/1.1\r\nHost: example.com".encode())
    assert (request.path, request.query) == (path, query)


@pytest.mark.parametrize("target", ["*", "example.com/x", "ftp://example.com/x", "http:///x", "http://"])
def test_other_targets_are_400(target):
    """Targets that are neither an absolute path nor an absolute http(s) URI are refused with 400."""
    with pytest.raises(ms.HTTPError) as info:
        ms.parse_request_head(f"GET {target} HTTP/1.1\r\nHost: x".encode())
    assert info.value.status == 400


@pytest.mark.parametrize(
    "changes, status, headers",
    [
        ({"Upgrade": None}, 426, UPGRADE_REQUIRED),
        ({"Upgrade": "h2c"}, 426, UPGRADE_REQUIRED),
        ({"Sec-WebSocket-Version": "8"}, 426, UPGRADE_REQUIRED),
        ({"Sec-WebSocket-Version": None}, 426, UPGRADE_REQUIRED),
        ({"Connection": None}, 400, {}),
        ({"Connection": "keep-alive"}, 400, {}),
        ({"Sec-WebSocket-Key": None}, 400, {}),
        ({"Sec-WebSocket-Key": "not base64 at all!"}, 400, {}),
        ({"Sec-WebSocket-Key": base64.b64encode(bytes(15)).decode()}, 400, {}),
        ({"Sec-WebSocket-Key": base64.b64encode(bytes(17)).decode()}, 400, {}),
        ({"version": "1.0"}, 400, {}),
    ],
)
def test_handshake_failures(changes, status, headers):
    """Each handshake failure gets its status and headers, both from check_handshake and through App.handle as a JSON error."""
    changes = dict(changes)
    request = handshake_request(version=changes.pop("version", "1.1"), **changes)
    with pytest.raises(ms.HTTPError) as info:
        ms.check_handshake(request)
    assert info.value.status == status
    response = app_handle(request)
    assert isinstance(response, ms.Response) and response.status == status
    sent = {k.lower(): v for k, v in response.headers}
    assert headers.items() <= sent.items()
    assert "error" in json.loads(response.body)
    for keep_alive, option in ((True, "keep-alive"), (False, "close")):  # one Connection line, options merged
        head = response.serialize(keep_alive).split(b"\r\n\r\n")[0].decode().split("\r\n")
        connection = [line.split(": ", 1)[1] for line in head if line.lower().startswith("connection:")]
        assert connection == (["Upgrade, " + option] if status == 426 else [option]), head


@pytest.mark.parametrize(
    "changes",
    [{}, {"Connection": "keep-alive, Upgrade"}, {"Connection": "keep-alive,UPGRADE"}, {"Upgrade": "WebSocket"}],
)
def test_handshake_accepts_token_lists_any_case(changes):
    """Connection and Upgrade are case-insensitive token lists: `Connection: keep-alive, Upgrade` is a valid handshake."""
    assert ms.check_handshake(handshake_request(**changes)) == RFC_WS_KEY


@pytest.mark.parametrize(
    "extra, status",
    [
        ("Connection: keep-alive\r\nConnection: Upgrade", None),  # the token may be on any of the lines
        ("Upgrade: h2c\r\nUpgrade: websocket", None),
        ("Sec-WebSocket-Version: 13\r\nSec-WebSocket-Version: 13", 426),  # §4.2.1: one version, not a list
        (f"Sec-WebSocket-Key: {RFC_WS_KEY}\r\nSec-WebSocket-Key: {RFC_WS_KEY}", 400),
    ],
)
def test_handshake_reads_repeated_header_lines(extra, status):
    """Repeated Connection and Upgrade lines are one token list; a repeated Sec-WebSocket-Version or
    Sec-WebSocket-Key is refused even when both lines are valid."""
    names = {line.split(":")[0] for line in extra.split("\r\n")}
    base = [("Host", "x"), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", RFC_WS_KEY), ("Sec-WebSocket-Version", "13")]
    lines = ["GET /ws HTTP/1.1"] + [f"{k}: {v}" for k, v in base if k not in names] + [extra]
    request = ms.parse_request_head("\r\n".join(lines).encode())
    if status is None:
        assert ms.check_handshake(request) == RFC_WS_KEY
    else:
        with pytest.raises(ms.HTTPError) as info:
            ms.check_handshake(request)
        assert info.value.status == status


def test_route_fixed_paths_and_parameters():
    """Every fixed path routes to its own handler by dict lookup, parameterised paths by their pattern,
    and a fixed path with something after it is not taken for the fixed one."""
    app = BrokerDriver(echo=True).app()
    for pattern, methods, handler in app.routes:
        if not pattern.groupindex:
            path = pattern.pattern.removesuffix("\\Z").replace("\\", "")
            assert app._route(ms.Request(methods[0], path, path, "", (1, 1), []))[0] == handler
    found, params = app._route(ms.Request("GET", "/ws/sub/a", "/ws/sub/a", "", (1, 1), []))
    assert found == app.websocket_sub and params == {"topic": "a"}
    for path in ("/wsx", "/ws/", "/docs/x", "/nowhere"):
        with pytest.raises(ms.HTTPError) as info:
            app._route(ms.Request("GET", path, path, "", (1, 1), []))
        assert info.value.status == 404, path


def test_handshake_101_response():
    """The 101 carries Upgrade, Connection and the RFC's accept value, no extension although one was offered, and
    Sec-WebSocket-Protocol: microsocket.v1 only when the client offered it (never another offered subprotocol)."""
    extensions = "permessage-deflate; client_max_window_bits"
    for offered, selected in (("chat, superchat", None), ("chat, microsocket.v1", ms.SUBPROTOCOL), (None, None)):
        request = handshake_request(Sec_WebSocket_Protocol=offered, Sec_WebSocket_Extensions=extensions)
        upgrade = app_handle(request)
        assert isinstance(upgrade, ms.Upgrade) and upgrade.kind == "ws"
        assert upgrade.response == ms.handshake_response(RFC_WS_KEY, selected)
        status, headers, body = parse_response(upgrade.response)
        assert (status, body) == (101, b"")
        assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
        assert headers.get("sec-websocket-protocol") == selected, offered
        assert "sec-websocket-extensions" not in headers


def test_handshake_sub_socket_and_echo_paths():
    """/ws/sub/{topic} upgrades bound to its URL-decoded topic; /echo upgrades only when echo is on."""
    upgrade = app_handle(handshake_request(path="/ws/sub/prices%2Ebtc"))
    assert (upgrade.kind, upgrade.topic) == ("sub", "prices.btc")
    assert app_handle(handshake_request(path="/ws/sub/a%20b")).status == 400
    assert app_handle(handshake_request(path="/echo"), echo=True).kind == "echo"
    assert app_handle(handshake_request(path="/echo")).status == 404


def test_handshake_origin_check():
    """With allowed_origins set, another Origin is 403; the allowed one and a request without Origin upgrade."""
    allowed = {"allowed_origins": ("https://good.example",)}
    assert app_handle(handshake_request(Origin="https://evil.example"), **allowed).status == 403
    assert isinstance(app_handle(handshake_request(Origin="https://good.example"), **allowed), ms.Upgrade)
    assert isinstance(app_handle(handshake_request(), **allowed), ms.Upgrade)
    assert isinstance(app_handle(handshake_request(Origin="https://evil.example")), ms.Upgrade)


def test_handshake_wrong_method_and_unknown_path():
    """POST /ws is 405 with Allow listing GET (and HEAD); an unknown path is 404."""
    response = app_handle(handshake_request(method="POST"))
    assert response.status == 405
    allow = {m.strip() for m in dict(response.headers)["Allow"].split(",")}
    assert "GET" in allow and allow <= {"GET", "HEAD"}
    assert app_handle(handshake_request(path="/nope")).status == 404
