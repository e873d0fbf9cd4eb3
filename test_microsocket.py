"""Tests for microsocket.py, in the order of its sections.

Run: python3 -m pip install websockets pytest && python3 -m pytest -q

Sans-I/O parts are tested without sockets; end to end uses the `websockets` client against a
server on port 0; what a polite client cannot do goes over a raw socket. Async tests run through
`run()`, which gives every one of them a timeout; an alarm bounds every test as a whole, so a hang
fails instead of stalling the suite. No test sleeps to wait for an event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

import microsocket as ms

websockets = pytest.importorskip("websockets", reason="the end-to-end tests need the websockets client")
from websockets.asyncio.client import connect  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_TIMEOUT = 60  # seconds for any one test, enforced by SIGALRM


# === helpers ======================================================================================


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


def run(coro, timeout: float = 30):
    """Run a coroutine to completion with a timeout."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def serving(**options):
    """A started Server on 127.0.0.1, port 0, with Config(**options); closed afterwards."""
    server = ms.Server(ms.Config(host="127.0.0.1", port=0, **options))
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace=1.0)


def ws_url(server: ms.Server, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{server.port}{path}"


async def recv_json(ws, timeout: float = 5) -> dict:
    """The next message from a websockets client, parsed."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def request(ws, msg: dict, timeout: float = 5) -> dict:
    """Send one message and return the next one received."""
    await ws.send(json.dumps(msg))
    return await recv_json(ws, timeout)


async def setup(ws, token: str = "alice", **fields) -> dict:
    """Send setup and return `ready` (the `subscribed` replies are left to the caller)."""
    reply = await request(ws, {"type": "setup", "token": token, **fields})
    assert reply["type"] == "ready", reply
    return reply


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A client frame (masked), with optional reserved bits, built by hand."""
    data = bytearray(ms.serialize_frame(opcode, payload, fin, mask))
    data[0] |= rsv << 4
    return bytes(data)


class RawClient:
    """A blocking socket client for what a polite client cannot send (sync, with timeouts)."""

    def __init__(self, port: int, timeout: float = 5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_until(self, marker: bytes) -> bytes:
        while marker not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before {marker!r}; got {self.buffer!r}")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def http(self, raw: bytes) -> tuple[int, dict, bytes]:
        """Send a raw request; return (status, headers, body) of the response."""
        self.send(raw)
        head = self.recv_until(b"\r\n\r\n").decode()
        lines = head.split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buffer += chunk
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def handshake(self, path: str = "/ws") -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        status, headers, _ = self.http(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert status == 101, (status, headers)
        assert headers["sec-websocket-accept"] == ms.accept_key(key)

    def recv_frame(self) -> ms.Frame:
        """The next (unmasked) server frame."""
        while True:
            parsed = ms.Frame.parse(self.buffer)
            if parsed is not None:
                frame, used = parsed
                self.buffer = self.buffer[used:]
                return frame
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed before a complete frame")
            self.buffer += chunk

    def recv_close(self) -> int:
        """Read frames until a close frame; return its code (1005 for an empty one)."""
        while True:
            frame = self.recv_frame()
            if frame.opcode == ms.Opcode.CLOSE:
                return ms.parse_close(frame.payload)[0]

    def send_json(self, msg: dict) -> None:
        self.send(masked(ms.Opcode.TEXT, json.dumps(msg).encode()))

    def recv_json(self) -> dict:
        frame = self.recv_frame()
        assert frame.opcode == ms.Opcode.TEXT, frame
        return json.loads(frame.payload)

    def at_eof(self) -> bool:
        """True once the server has closed the TCP connection (after reading what is left)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def thread_server(**options):
    """A Server running in its own thread (for blocking raw-socket tests); yields its port."""
    import threading

    ready = threading.Event()
    state: dict = {}

    async def main():
        server = ms.Server(ms.Config(host="127.0.0.1", port=0, **options))
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


# === 3. Frame codec ===============================================================================

RFC_KEY = bytes.fromhex("37fa213d")  # RFC 6455 §5.7's masking key


def test_rfc_unmasked_hello():
    """RFC 6455 §5.7: an unmasked "Hello" text frame is 81 05 48 65 6c 6c 6f, both ways."""
    wire = bytes.fromhex("810548656c6c6f")
    assert ms.serialize_frame(ms.Opcode.TEXT, b"Hello") == wire
    assert ms.Frame.parse(wire) == (ms.Frame(True, ms.Opcode.TEXT, b"Hello"), 7)


def test_rfc_masked_hello():
    """RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d is 81 85 37 fa 21 3d 7f 9f 4d 51 58, both ways."""
    wire = bytes.fromhex("818537fa213d7f9f4d5158")
    assert ms.serialize_frame(ms.Opcode.TEXT, b"Hello", mask=RFC_KEY) == wire
    assert ms.Frame(True, ms.Opcode.TEXT, b"Hello").serialize(RFC_KEY) == wire
    assert ms.Frame.parse(wire) == (ms.Frame(True, ms.Opcode.TEXT, b"Hello"), 11)
    header = ms.parse_header(wire)
    assert (header.fin, header.opcode, header.mask, header.length, header.size) == (True, 1, RFC_KEY, 5, 6)


@pytest.mark.parametrize("length, header_size", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
@pytest.mark.parametrize("mask", [None, RFC_KEY])
def test_serialize_frame_length_edges(length, header_size, mask):
    """The 7/16/64-bit length forms switch at 126 and 65536, and every size round-trips through Frame.parse."""
    payload = os.urandom(length)
    wire = ms.serialize_frame(ms.Opcode.BINARY, payload, mask=mask)
    size = header_size + (4 if mask else 0)
    assert len(wire) == size + length
    assert ms.parse_header(wire).size == size
    assert ms.Frame.parse(wire) == (ms.Frame(True, ms.Opcode.BINARY, payload), len(wire))


@pytest.mark.parametrize("length", [0, 5, 126, 65536])
@pytest.mark.parametrize("mask", [None, RFC_KEY])
def test_parse_header_truncated_prefix_is_none(length, mask):
    """Every prefix shorter than the header gives None from parse_header (and Frame.parse), never an error."""
    wire = ms.serialize_frame(ms.Opcode.TEXT, b"a" * length, fin=False, mask=mask)
    size = ms.parse_header(wire).size
    for n in range(size):
        assert ms.parse_header(wire[:n]) is None, n
    for n in (size, len(wire) - 1) if length else ():
        assert ms.Frame.parse(wire[:n]) is None, n


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(bytes((0x81 | rsv << 4, 0)), id=f"rsv{rsv}") for rsv in (1, 2, 4, 7)
    ]
    + [pytest.param(bytes((0x80 | op, 0)), id=f"opcode{op:#x}") for op in (*range(3, 8), *range(0xB, 0x10))]
    + [
        pytest.param(b"\x09\x00", id="fragmented-ping"),
        pytest.param(b"\x08\x00", id="fragmented-close"),
        pytest.param(b"\x0a\x00", id="fragmented-pong"),
        pytest.param(b"\x89\x7e\x00\x7e", id="ping-126"),
        pytest.param(b"\x88\x7e\x00\x7e", id="close-126"),
        pytest.param(b"\x82\x7f\x80" + bytes(7), id="64bit-msb"),
    ],
)
def test_parse_header_violations_are_1002(wire):
    """Reserved bits, unknown opcodes, fragmented or long control frames and a 64-bit length with its MSB set are 1002."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_header(wire + bytes(20), 0, 1 << 20)
    assert info.value.code == 1002
    assert not isinstance(info.value, ms.PayloadTooBig)


def test_data_frame_over_max_size_is_payload_too_big():
    """A data frame longer than max_size raises PayloadTooBig (1009) from its header alone; max_size itself is fine."""
    assert ms.parse_header(ms.serialize_frame(ms.Opcode.BINARY, bytes(10)), 0, 10).length == 10
    header_only = ms.serialize_frame(ms.Opcode.BINARY, bytes(70000))[:10]
    with pytest.raises(ms.PayloadTooBig) as info:
        ms.parse_header(header_only, 0, 65536)
    assert info.value.code == 1009


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 1000])
def test_apply_mask_matches_naive_xor(length):
    """apply_mask equals a per-byte XOR with the repeated key and is its own inverse."""
    data, key = os.urandom(length), os.urandom(4)
    masked_data = ms.apply_mask(data, key)
    assert masked_data == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert ms.apply_mask(masked_data, key) == data


def test_parse_close_empty_and_one_byte():
    """An empty close payload means 1005 (and 1005 serializes to nothing); a 1-byte payload is a 1002 error."""
    assert ms.parse_close(b"") == (1005, "")
    assert ms.serialize_close(1005) == b""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_close(b"\x03")
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_parse_close_invalid_codes(code):
    """Codes that may not appear in a close frame (RFC 6455 §7.4) are a 1002 error."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_close(code.to_bytes(2, "big"))
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 3000, 4999])
def test_close_valid_codes_round_trip(code):
    """Valid close codes with a UTF-8 reason round-trip through serialize_close and parse_close."""
    assert ms.parse_close(ms.serialize_close(code, "bye ✓")) == (code, "bye ✓")
    assert ms.parse_close(ms.serialize_close(code)) == (code, "")


def test_parse_close_invalid_utf8_reason():
    """A close reason that is not UTF-8 is a 1002 error."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_close(b"\x03\xe8ok\xff")
    assert info.value.code == 1002



def test_serialize_close_long_reason_stays_valid_utf8():
    """A reason too long for a control frame is shortened to at most 125 bytes of still-valid UTF-8."""
    payload = ms.serialize_close(1000, "é" * 100)
    assert len(payload) <= 125
    assert ms.parse_close(payload)[0] == 1000


def test_accept_key_rfc_example():
    """RFC 6455 §1.3: the key dGhlIHNhbXBsZSBub25jZQ== gives s3pPLMBiTxaQ9kYGzzhZRbK+xOo=."""
    assert ms.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


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


def test_parse_request_head_max_headers_is_allowed():
    """Exactly MAX_HEADERS header lines are accepted."""
    assert len(ms.parse_request_head(b"GET / HTTP/1.1" + b"\r\nX: y" * ms.MAX_HEADERS).headers) == ms.MAX_HEADERS


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
    reader.feed(b"POST /publish HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhe")
    assert reader.next_request() is None
    reader.feed(b"llo" + b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
    requests = [reader.next_request() for _ in range(4)]
    assert [(r.method, r.path, r.body) for r in requests[:3]] == [("POST", "/publish", b"hello"), ("GET", "/a", b""), ("GET", "/b", b"")]
    assert requests[3] is None


def test_request_reader_head_limit():
    """A head of exactly max_head_size bytes is read; one byte more is 431, even before the blank line arrives."""
    head = b"GET / HTTP/1.1\r\nX: "
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


def app_handle(request: ms.Request, **config) -> ms.Response | ms.Upgrade:
    """Route a request through a fresh App, as the server does."""
    return ms.App(ms.Config(**config), ms.Broker(ms.Config(**config))).handle(request)


def parse_response(data: bytes) -> tuple[int, dict, bytes]:
    """(status, lower-case headers, body) of serialized response bytes."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


UPGRADE_REQUIRED = {"upgrade": "websocket", "sec-websocket-version": "13"}


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
        ({"Host": None}, 400, {}),
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


@pytest.mark.parametrize(
    "changes",
    [{}, {"Connection": "keep-alive, Upgrade"}, {"Connection": "keep-alive,UPGRADE"}, {"Upgrade": "WebSocket"}],
)
def test_handshake_accepts_token_lists_any_case(changes):
    """Connection and Upgrade are case-insensitive token lists: `Connection: keep-alive, Upgrade` is a valid handshake."""
    assert ms.check_handshake(handshake_request(**changes)) == RFC_WS_KEY


def test_handshake_101_response():
    """The 101 carries Upgrade, Connection and the RFC's accept value, and no subprotocol or extension although both were offered."""
    request = handshake_request(
        Sec_WebSocket_Protocol="chat, superchat", Sec_WebSocket_Extensions="permessage-deflate; client_max_window_bits"
    )
    upgrade = app_handle(request)
    assert isinstance(upgrade, ms.Upgrade) and upgrade.kind == "ws"
    status, headers, body = parse_response(upgrade.response)
    assert (status, body) == (101, b"")
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert headers["upgrade"].lower() == "websocket" and "upgrade" in headers["connection"].lower()
    assert "sec-websocket-protocol" not in headers and "sec-websocket-extensions" not in headers


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


# === 6. WebSocket connection ======================================================================


def sent_close(conn: ms.WebSocketConnection) -> int:
    """The code of the close frame the connection queued (1005 for an empty one); fails if it queued anything else."""
    data = conn.data_to_send()
    frame, used = ms.Frame.parse(data)
    assert frame.opcode == ms.Opcode.CLOSE and used == len(data), data
    return ms.parse_close(frame.payload)[0]


def assert_failed(conn: ms.WebSocketConnection, code: int) -> None:
    """The connection failed with `code`: close frame queued, state CLOSED."""
    assert sent_close(conn) == code
    assert conn.state == ms.CLOSED


def test_connection_text_and_binary():
    """Complete text and binary frames come out as (TEXT, str) and (BINARY, bytes) events, in order."""
    conn = ms.WebSocketConnection()
    data = masked(ms.Opcode.TEXT, "héllo".encode()) + masked(ms.Opcode.BINARY, b"\x00\xff") + masked(ms.Opcode.TEXT, b"")
    assert conn.receive_data(data) == [(ms.Opcode.TEXT, "héllo"), (ms.Opcode.BINARY, b"\x00\xff"), (ms.Opcode.TEXT, "")]
    assert conn.state == ms.OPEN and conn.data_to_send() == b""


def test_connection_message_fed_one_byte_at_a_time():
    """A fragmented message with a ping inside, fed one byte at a time, gives the pong then the whole text."""
    conn = ms.WebSocketConnection()
    text = "κόσμε, hello, wörld".encode()
    data = (
        masked(ms.Opcode.TEXT, text[:7], fin=False, mask=os.urandom(4))
        + masked(ms.Opcode.PING, b"p", mask=os.urandom(4))
        + masked(ms.Opcode.CONT, text[7:], mask=os.urandom(4))
    )
    events = []
    for byte in data:
        events += conn.receive_data(bytes((byte,)))
    assert events == [(ms.Opcode.PONG, ms.serialize_frame(ms.Opcode.PONG, b"p")), (ms.Opcode.TEXT, text.decode())]


def test_connection_fragmented_messages():
    """TEXT + CONT + CONT and BINARY + CONT come out as single messages."""
    conn = ms.WebSocketConnection()
    data = (
        masked(ms.Opcode.TEXT, b"He", fin=False)
        + masked(ms.Opcode.CONT, b"", fin=False)
        + masked(ms.Opcode.CONT, b"llo")
        + masked(ms.Opcode.BINARY, b"\x01", fin=False)
        + masked(ms.Opcode.CONT, b"\x02")
    )
    assert conn.receive_data(data) == [(ms.Opcode.TEXT, "Hello"), (ms.Opcode.BINARY, b"\x01\x02")]


def test_connection_ping_inside_fragmented_message_is_answered_in_order():
    """A ping between fragments gives (PONG, pong frame with the same payload) before the message it interrupted."""
    conn = ms.WebSocketConnection()
    events = conn.receive_data(masked(ms.Opcode.TEXT, b"a", fin=False) + masked(ms.Opcode.PING, b"ping!"))
    assert events == [(ms.Opcode.PONG, ms.serialize_frame(ms.Opcode.PONG, b"ping!"))]
    assert conn.receive_data(masked(ms.Opcode.CONT, b"b")) == [(ms.Opcode.TEXT, "ab")]


def test_connection_ping_payload_echoed_and_pong_ignored():
    """A ping's payload (up to 125 bytes) comes back in the pong; an unsolicited pong gives nothing."""
    conn = ms.WebSocketConnection()
    payload = os.urandom(125)
    assert conn.receive_data(masked(ms.Opcode.PING, payload)) == [(ms.Opcode.PONG, ms.serialize_frame(ms.Opcode.PONG, payload))]
    assert conn.receive_data(masked(ms.Opcode.PONG, b"x")) == []
    assert conn.state == ms.OPEN


@pytest.mark.parametrize(
    "data, code",
    [
        pytest.param(ms.serialize_frame(ms.Opcode.TEXT, b"hi"), 1002, id="unmasked"),
        pytest.param(masked(ms.Opcode.TEXT, b"hi", rsv=4), 1002, id="rsv1"),
        pytest.param(masked(3, b""), 1002, id="opcode3"),
        pytest.param(masked(ms.Opcode.PING, b"", fin=False), 1002, id="fragmented-ping"),
        pytest.param(masked(ms.Opcode.PING, bytes(126)), 1002, id="ping-126"),
        pytest.param(masked(ms.Opcode.CONT, b"x"), 1002, id="continuation-without-start"),
        pytest.param(masked(ms.Opcode.TEXT, b"a", fin=False) + masked(ms.Opcode.TEXT, b"b"), 1002, id="text-inside-fragmented"),
        pytest.param(masked(ms.Opcode.TEXT, b"a", fin=False) + masked(ms.Opcode.BINARY, b"b"), 1002, id="binary-inside-fragmented"),
        pytest.param(masked(ms.Opcode.CLOSE, b"\x03"), 1002, id="close-1-byte"),
        pytest.param(masked(ms.Opcode.CLOSE, (1004).to_bytes(2, "big")), 1002, id="close-1004"),
        pytest.param(masked(ms.Opcode.CLOSE, (999).to_bytes(2, "big")), 1002, id="close-999"),
        pytest.param(masked(ms.Opcode.CLOSE, b"\x03\xe8\xff"), 1002, id="close-bad-utf8-reason"),
        pytest.param(masked(ms.Opcode.TEXT, b"ok\xff"), 1007, id="invalid-utf8"),
        pytest.param(masked(ms.Opcode.TEXT, b"\xed\xa0\x80"), 1007, id="utf8-surrogate"),
    ],
)
def test_connection_violations(data, code):
    """Each violation fails the connection: a close frame with its code is queued, the state is CLOSED, and later data is ignored."""
    conn = ms.WebSocketConnection()
    conn.receive_data(data)
    assert_failed(conn, code)
    assert conn.receive_data(masked(ms.Opcode.TEXT, b"after")) == []
    assert conn.data_to_send() == b""


def test_connection_invalid_utf8_fails_at_its_fragment():
    """Invalid UTF-8 in fragment 2 fails with 1007 as fragment 2 arrives, before fragment 3 is sent."""
    conn = ms.WebSocketConnection()
    assert conn.receive_data(masked(ms.Opcode.TEXT, "κόσμε".encode(), fin=False)) == []
    assert conn.state == ms.OPEN and conn.data_to_send() == b""
    conn.receive_data(masked(ms.Opcode.CONT, b"\xf4\x90\x80\x80", fin=False))
    assert_failed(conn, 1007)


def test_connection_invalid_utf8_fails_at_its_chunk():
    """Within one frame fed in chunks, the invalid byte in chunk 2 fails the connection (1007) after chunk 2."""
    conn = ms.WebSocketConnection()
    frame = masked(ms.Opcode.TEXT, "κόσμε".encode() + b"\xf4\x90" + b"abc" * 10)
    header_and_valid = ms.parse_header(frame).size + len("κόσμε".encode())
    assert conn.receive_data(frame[:header_and_valid]) == [] and conn.state == ms.OPEN
    conn.receive_data(frame[header_and_valid : header_and_valid + 2])
    assert_failed(conn, 1007)


def test_connection_surrogate_prefix_fails_at_its_fragment():
    """ED A0 can only start a surrogate, which UTF-8 forbids, so a fragment ending with it fails (1007) at once."""
    conn = ms.WebSocketConnection()
    conn.receive_data(masked(ms.Opcode.TEXT, b"ab\xed\xa0", fin=False))
    assert conn.state == ms.CLOSED


def test_connection_utf8_character_split_across_fragments():
    """A multi-byte character split across fragments (and across chunks) is valid text."""
    conn = ms.WebSocketConnection()
    euro = "€".encode()  # e2 82 ac
    data = (
        masked(ms.Opcode.TEXT, b"x" + euro[:1], fin=False)
        + masked(ms.Opcode.CONT, euro[1:2], fin=False)
        + masked(ms.Opcode.CONT, euro[2:])
    )
    events = []
    for i in range(0, len(data), 3):
        events += conn.receive_data(data[i : i + 3])
    assert events == [(ms.Opcode.TEXT, "x€")]
    assert conn.state == ms.OPEN


def test_connection_message_size_limit_across_fragments():
    """A message may reach max_message_size; the header of the fragment that goes over it alone fails the connection with 1009."""
    conn = ms.WebSocketConnection(max_message_size=10)
    exactly = masked(ms.Opcode.BINARY, bytes(6), fin=False) + masked(ms.Opcode.CONT, bytes(4))
    assert conn.receive_data(exactly) == [(ms.Opcode.BINARY, bytes(10))]
    assert conn.receive_data(masked(ms.Opcode.TEXT, b"123456", fin=False)) == []
    over = masked(ms.Opcode.CONT, b"12345")
    conn.receive_data(over[: ms.parse_header(over).size])
    assert_failed(conn, 1009)


def test_connection_single_frame_over_limit_fails_from_header():
    """A single frame longer than max_message_size fails with 1009 from its header alone."""
    conn = ms.WebSocketConnection(max_message_size=1000)
    frame = masked(ms.Opcode.TEXT, b"a" * 1001)
    conn.receive_data(frame[:8])
    assert_failed(conn, 1009)


@pytest.mark.parametrize("payload, code", [(b"", 1005), ((1000).to_bytes(2, "big"), 1000), ((4321).to_bytes(2, "big") + b"bye", 4321)])
def test_connection_close_received_is_echoed(payload, code):
    """A peer's close is answered with a close echoing its code, and the state becomes CLOSED."""
    conn = ms.WebSocketConnection()
    assert conn.receive_data(masked(ms.Opcode.CLOSE, payload)) == []
    assert_failed(conn, code)
    assert conn.close_code == code


def test_connection_close_inside_fragmented_message():
    """A close between fragments completes the closing handshake and drops the unfinished message."""
    conn = ms.WebSocketConnection()
    events = conn.receive_data(masked(ms.Opcode.TEXT, b"part", fin=False) + masked(ms.Opcode.CLOSE, ms.serialize_close(1000)))
    assert events == []
    assert_failed(conn, 1000)
    assert conn.receive_data(masked(ms.Opcode.CONT, b"rest")) == []


def test_connection_server_close_then_peer_close():
    """close() sends a close and moves to CLOSING, where data is ignored; the peer's close then moves to CLOSED, sending nothing."""
    conn = ms.WebSocketConnection()
    conn.close(1001, "going away")
    assert conn.state == ms.CLOSING
    assert sent_close(conn) == 1001
    conn.close(1000)  # a second close() does nothing
    assert conn.data_to_send() == b""
    assert conn.receive_data(masked(ms.Opcode.TEXT, b"late") + masked(ms.Opcode.PING, b"p")) == []
    assert conn.state == ms.CLOSING
    conn.receive_data(masked(ms.Opcode.CLOSE, ms.serialize_close(1001)))
    assert conn.state == ms.CLOSED and conn.close_code == 1001
    assert conn.data_to_send() == b""


# === 13. HTTP routes ==============================================================================


def http_call(port: int, method: str, path: str, *headers: str, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request on a fresh socket: (status, lower-case headers, body); `headers` are "Name: value" lines."""
    lines = [f"{method} {path} HTTP/1.1", "Host: x", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    with contextlib.closing(RawClient(port)) as client:
        return client.http(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


ROUTE_PATHS = {"/", "/docs", "/healthz", "/stats", "/openapi.json", "/openapi", "/publish"}
ROUTE_PATHS |= {"/ws", "/ws/sub/{topic}", "/demo/publish/{topic}"}


def route_paths(app: ms.App) -> set[str]:
    """The paths of the App's route table, written the OpenAPI way (`/ws/sub/{topic}`)."""
    paths = (re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern) for pattern, _, _ in app.routes)
    return {path.replace("\\Z", "").replace("\\.", ".") for path in paths}


def test_index_redirects_to_docs():
    """GET / is a 302 to /docs."""
    with thread_server() as server:
        status, headers, _ = http_call(server.port, "GET", "/")
    assert (status, headers["location"]) == (302, "/docs")


def test_docs_page_is_docs_html():
    """GET /docs serves docs.html from beside the module as text/html."""
    with thread_server() as server:
        status, headers, body = http_call(server.port, "GET", "/docs")
    with open(os.path.join(HERE, "docs.html"), "rb") as f:
        assert body == f.read()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"microsocket" in body


def test_healthz():
    """GET /healthz answers 200 "ok"."""
    with thread_server() as server:
        status, _, body = http_call(server.port, "GET", "/healthz")
    assert (status, body.strip()) == (200, b"ok")


def test_stats_counts_exactly():
    """/stats counts connections, topics, subscriptions, published, delivered and duplicates, and drops a closed connection at once."""

    async def main():
        async with serving() as server:
            stats = lambda: asyncio.to_thread(lambda: json.loads(http_call(server.port, "GET", "/stats")[2]))  # noqa: E731
            got = await stats()
            assert (got["connections"], got["topics"], got["subscriptions"]) == (0, 0, 0)
            async with connect(ws_url(server)) as a, connect(ws_url(server)) as b:
                await setup(a, "alice", topics=["t", "u"])
                await setup(b, "bob", topics=["t"])
                for ws, n in ((a, 2), (b, 1)):
                    for _ in range(n):
                        assert (await recv_json(ws))["type"] == "subscribed"
                assert server.publish("t", 1, message_id="m1").status == "ok"
                assert server.publish("t", 1, message_id="m1").status == "duplicate"
                for ws in (a, b):
                    assert (await recv_json(ws))["seqNo"] == 1
                got = await stats()
                expected = {"connections": 2, "topics": 2, "subscriptions": 3, "published": 1, "delivered": 2, "duplicates": 1}
                assert {k: got[k] for k in expected} == expected
                await a.close()
                got = await stats()
                assert (got["connections"], got["topics"], got["subscriptions"]) == (1, 1, 1)

    run(main())


@pytest.mark.parametrize(
    "options, paths",
    [({}, ROUTE_PATHS), ({"demo": False}, ROUTE_PATHS - {"/demo/publish/{topic}"}), ({"echo": True}, ROUTE_PATHS | {"/echo"})],
)
def test_openapi_json_lists_every_route(options, paths):
    """/openapi.json is an OpenAPI 3.1 document whose paths are exactly the server's routes, each with responses."""
    with thread_server(**options) as server:
        status, headers, body = http_call(server.port, "GET", "/openapi.json")
        routes = route_paths(server.app)
    doc = json.loads(body)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert doc["openapi"].startswith("3.1") and doc["info"]["title"]
    assert set(doc["paths"]) == routes
    assert paths <= routes
    assert ("/demo/publish/{topic}" in routes) == options.get("demo", True)
    assert ("/echo" in routes) == options.get("echo", False)
    assert set(doc["paths"]["/publish"]) == {"post"}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"], path


def test_openapi_page_is_self_contained():
    """/openapi is an HTML page naming every route that loads no script or style from the network."""
    with thread_server() as server:
        status, headers, body = http_call(server.port, "GET", "/openapi")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|@import|url\(\s*["']?(?:https?:)?//""", page, re.I)
    for path in ROUTE_PATHS:
        assert f"<code>{path}</code>" in page, path


@pytest.mark.parametrize("path", ["/", "/docs", "/healthz", "/stats", "/openapi.json", "/openapi", "/nope", "/ws"])
def test_head_is_get_without_body(path):
    """HEAD gets GET's status and headers, Content-Length included, and no body: the next response follows at once."""
    get = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        status, headers, body = client.http(get)
        client.send(get.replace(b"GET", b"HEAD", 1))
        head_status, head_headers, _ = parse_response(client.recv_until(b"\r\n\r\n"))
        assert client.http(get) == (status, headers, body)
    assert (head_status, head_headers) == (status, headers)
    assert int(head_headers["content-length"]) == len(body)


def test_keep_alive_and_connection_close():
    """Two pipelined requests are answered on one socket; `Connection: close` is answered, then the server closes."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(2):
            status, headers, body = client.http(b"")
            assert (status, headers["connection"], body.strip()) == (200, "keep-alive", b"ok")
        status, headers, _ = client.http(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (status, headers["connection"]) == (200, "close")
        assert client.at_eof()


def test_http10_closes_without_keep_alive():
    """An HTTP/1.0 request without `Connection: keep-alive` is answered, then the connection is closed."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        status, headers, _ = client.http(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (status, headers["connection"]) == (200, "close")
        assert client.at_eof()


@pytest.mark.parametrize(
    "raw, status, headers, closes",
    [
        pytest.param(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, {}, False, id="404"),
        pytest.param(b"GET /publish HTTP/1.1\r\nHost: x\r\n\r\n", 405, {"allow": "POST"}, False, id="405"),
        pytest.param(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426, {"upgrade": "websocket"}, False, id="ws-as-page-426"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (16 << 10) + b"\r\n\r\n", 431, {}, True, id="head-431"),
        pytest.param(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\nContent-Length: 1048577\r\n\r\n", 413, {}, True, id="body-413"
        ),
        pytest.param(b"POST /publish HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", 411, {}, True, id="chunked-411"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505, {}, True, id="505"),
    ],
)
def test_http_errors(raw, status, headers, closes):
    """HTTP errors are JSON {"error": ...} with the right status and headers; errors in the request itself close the connection."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        got_status, got_headers, body = client.http(raw)
        assert got_status == status
        assert headers.items() <= got_headers.items()
        assert got_headers["content-type"].startswith("application/json")
        assert isinstance(json.loads(body)["error"], str)
        if closes:
            assert client.at_eof()
        else:
            assert client.http(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


def test_demo_publish():
    """GET /demo/publish/{topic}?k=v publishes {"k": "v"} as a new seqNo and reports the subscribers it reached."""

    async def main():
        async with serving() as server:
            demo = lambda: asyncio.to_thread(http_call, server.port, "GET", "/demo/publish/prices?k=v")  # noqa: E731
            status, _, body = await demo()
            first = json.loads(body)
            assert status == 200 and isinstance(first.pop("messageId"), str)
            assert first == {"ok": True, "topic": "prices", "seqNo": 1, "subscribers": 0}
            async with connect(ws_url(server)) as ws:
                await setup(ws, topics=["prices"])
                assert await recv_json(ws) == {"type": "subscribed", "topic": "prices", "seqNo": 1}
                second = json.loads((await demo())[2])
                assert (second["seqNo"], second["subscribers"]) == (2, 1)
                message = await recv_json(ws)
                assert message == {"type": "message", "topic": "prices", "seqNo": 2, "messageId": second["messageId"], "data": {"k": "v"}}

    run(main())


def test_demo_publish_off():
    """With demo=False, /demo/publish/{topic} is 404."""
    with thread_server(demo=False) as server:
        assert http_call(server.port, "GET", "/demo/publish/prices?k=v")[0] == 404


def test_post_publish():
    """POST /publish needs a Bearer token, a JSON object and a valid topic; it dedups by messageId per user."""
    with thread_server() as server:

        def post(body, *headers: str):
            status, got_headers, data = http_call(server.port, "POST", "/publish", *headers, body=body)
            return status, got_headers, json.loads(data)

        as_alice, as_bob = "Authorization: Bearer alice", "Authorization: bearer bob"
        ok = json.dumps({"topic": "t", "messageId": "m1", "data": {"x": 1}}).encode()
        for headers in ((), ("Authorization: Basic YTpi",), ("Authorization: Bearer ",)):
            status, got_headers, data = post(ok, *headers)
            assert status == 401 and got_headers["www-authenticate"].lower().startswith("bearer") and "error" in data
        for bad in (b"{nope", b"\xff", b"[1]", b'{"topic": "two words", "data": 1}', b'{"topic": "t", "messageId": 5}', b'{"data": 1}'):
            status, _, data = post(bad, as_alice)
            assert status == 400 and "error" in data, bad
        assert post(ok, as_alice)[::2] == (200, {"status": "ok", "messageId": "m1", "seqNo": 1})
        assert post(ok, as_alice)[::2] == (200, {"status": "duplicate", "messageId": "m1", "seqNo": 1})
        assert post(ok, as_bob)[::2] == (200, {"status": "ok", "messageId": "m1", "seqNo": 2})
        status, _, data = post(b'{"topic": "t", "data": null}', as_alice)
        assert (status, data["status"], data["seqNo"]) == (200, "ok", 3) and data["messageId"]


def test_max_connections_503():
    """With max_connections=1 a second WebSocket handshake gets 503, and the first connection still works."""

    async def main():
        async with serving(max_connections=1) as server:
            async with connect(ws_url(server)) as ws:
                with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                    await connect(ws_url(server))
                assert info.value.response.status_code == 503
                assert await request(ws, {"type": "ping"}) == {"type": "pong"}

    run(main())


# === 14. Server I/O: WebSocket protocol violations ================================================


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
def test_raw_violation_closes_with_code(data, code):
    """A violation a polite client cannot make gets a close frame with its code, then the server closes TCP."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        client.handshake()
        client.send(data)
        assert client.recv_close() == code
        assert client.at_eof()


def test_raw_replies_before_violation_are_sent_first():
    """Replies to messages in the same segment as a violation are written before the 1002 close frame."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        client.handshake()
        client.send(masked(ms.Opcode.TEXT, b'{"type":"ping","id":1}') + ms.serialize_frame(ms.Opcode.TEXT, b"unmasked"))
        assert client.recv_json() == {"type": "pong", "id": 1}
        assert client.recv_close() == 1002
        assert client.at_eof()


def test_raw_frames_in_the_handshake_segment():
    """Frames sent in the same segment as the upgrade request are read as WebSocket data after the 101."""
    key = base64.b64encode(os.urandom(16)).decode()
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        client.send(
            f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
            + masked(ms.Opcode.TEXT, b'{"type":"ping","id":7}')
        )
        assert client.recv_until(b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
        assert client.recv_json() == {"type": "pong", "id": 7}


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(masked(ms.Opcode.TEXT, b"a" * 1001), id="one-frame"),
        pytest.param(masked(ms.Opcode.TEXT, b"a" * 600, fin=False) + masked(ms.Opcode.CONT, b"a" * 401), id="fragments"),
        pytest.param(masked(ms.Opcode.BINARY, b"a" * 1000, fin=False) + masked(ms.Opcode.CONT, b"a"), id="binary-fragments"),
    ],
)
def test_raw_message_over_max_size_is_1009(data):
    """With max_message_size=1000 a 1000-byte message echoes back and a 1001-byte one, whole or fragmented, is closed with 1009."""
    with thread_server(max_message_size=1000, echo=True) as server, contextlib.closing(RawClient(server.port)) as client:
        client.handshake("/echo")
        client.send(masked(ms.Opcode.TEXT, b"a" * 500, fin=False) + masked(ms.Opcode.CONT, b"a" * 500))
        assert client.recv_frame() == ms.Frame(True, ms.Opcode.TEXT, b"a" * 1000)
        client.send(data)
        assert client.recv_close() == 1009
        assert client.at_eof()


def test_raw_ping_gets_pong_in_order():
    """A ping gets a pong with the same payload, written between the replies to the messages around it."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        client.handshake()
        payload = os.urandom(125)
        client.send(
            masked(ms.Opcode.TEXT, b'{"type":"ping","id":1}')
            + masked(ms.Opcode.PING, payload)
            + masked(ms.Opcode.TEXT, b'{"type":"ping","id":2}')
        )
        assert client.recv_json() == {"type": "pong", "id": 1}
        assert client.recv_frame() == ms.Frame(True, ms.Opcode.PONG, payload)
        assert client.recv_json() == {"type": "pong", "id": 2}


@pytest.mark.parametrize("payload, code", [(b"", 1005), (ms.serialize_close(1000, "done"), 1000), (ms.serialize_close(4321), 4321)])
def test_raw_client_close_is_echoed(payload, code):
    """A client close gets a close echoing its code, then the server closes TCP."""
    with thread_server() as server, contextlib.closing(RawClient(server.port)) as client:
        client.handshake()
        client.send(masked(ms.Opcode.CLOSE, payload))
        assert client.recv_close() == code
        assert client.at_eof()


def test_binary_frame_on_ws_is_invalid_json():
    """A binary frame on /ws gets error INVALID_JSON and the connection stays usable."""

    async def main():
        async with serving() as server, connect(ws_url(server)) as ws:
            await ws.send(b'{"type":"ping"}')
            reply = await recv_json(ws)
            assert (reply["type"], reply["code"]) == ("error", "INVALID_JSON")
            assert await request(ws, {"type": "ping", "id": "after"}) == {"type": "pong", "id": "after"}

    run(main())


@pytest.mark.parametrize("kind", ["binary", "text"])
def test_echo_16_mib(kind):
    """A 16 MiB message goes through /echo (max_message_size 16 MiB) and comes back intact."""
    size = 16 << 20
    if kind == "binary":
        message = os.urandom(size)
    else:  # multi-byte characters, so TCP chunks split them
        unit = "κόσμε ✓ "
        message = unit * (size // len(unit.encode()))

    async def main():
        async with serving(echo=True, max_message_size=size) as server:
            async with connect(ws_url(server, "/echo"), max_size=None) as ws:
                await ws.send(message)
                assert await asyncio.wait_for(ws.recv(), 20) == message

    run(main(), timeout=45)


def test_echo_off_by_default():
    """Without echo=True, a WebSocket handshake on /echo is 404."""
    key = base64.b64encode(os.urandom(16)).decode()
    with thread_server() as server:
        upgrade = ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13")
        status, _, body = http_call(server.port, "GET", "/echo", *upgrade)
    assert status == 404 and "error" in json.loads(body)
