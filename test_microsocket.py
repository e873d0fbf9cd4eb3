"""Tests for microsocket.py, in the order of its sections.

Run: python3 -m pip install websockets pytest && python3 -m pytest -q

Sans-I/O parts are tested without sockets; end to end uses the `websockets` client against a
server on port 0; what a polite client cannot do goes over a raw socket. Async tests run through
`run()`, which gives every one of them a timeout; an alarm bounds every test as a whole, so a hang
fails instead of stalling the suite. No test sleeps to wait for an event.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import collections
import contextlib
import gc
import html
import inspect
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import tracemalloc
import urllib.error
import urllib.parse
import urllib.request

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


class FakeClock:
    """An injectable clock that only moves when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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


# === 7. Message schema ============================================================================


def _code_of(text: str) -> ms.ClientError:
    with pytest.raises(ms.ClientError) as info:
        ms.decode_client_message(text)
    return info.value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        '{"type": "ping"',
        "[]",
        '[{"type": "ping"}]',
        "1",
        "3.5",
        '"ping"',
        "null",
        "true",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        '{"type": "ping", "x": NaN}',
        '{"type": "ping", "x": Infinity}',
        '{"type": "ping", "x": -Infinity}',
        '{"type": "ping", "x": 1e400}',
        '{"type": "ping", "x": -1e400}',
        '{"type": "ping", "x": ' + "1" * 5000 + "}",
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
    ],
    ids=lambda t: repr(t[:24]) + (f"..({len(t)})" if len(t) > 24 else ""),
)
def test_decode_invalid_json(text):
    """Text that is not one finite JSON object (or nests too deep) is INVALID_JSON."""
    assert _code_of(text).code == "INVALID_JSON"


@pytest.mark.parametrize(
    "text",
    ["{}", '{"type": 5}', '{"type": null}', '{"type": true}', '{"type": ["ping"]}', '{"type": {}}', '{"type": ""}',
     '{"type": "PING"}', '{"type": "nope"}', '{"type": "message"}', '{"type": "pong"}', '{"typ": "ping"}'],
)
def test_decode_unknown_type(text):
    """A missing, non-string or unknown `type` is UNKNOWN_TYPE with field `type`."""
    exc = _code_of(text)
    assert (exc.code, exc.context.get("field")) == ("UNKNOWN_TYPE", "type")


@pytest.mark.parametrize("bad_id", [True, False, None, {}, {"a": 1}, [], [1], ["x"]])
def test_decode_invalid_id(bad_id):
    """An `id` that is not a string or a number is INVALID_MESSAGE with field `id`."""
    exc = _code_of(json.dumps({"type": "ping", "id": bad_id}))
    assert (exc.code, exc.context.get("field")) == ("INVALID_MESSAGE", "id")


@pytest.mark.parametrize("good_id", ["abc", "", 0, -1, 7, 1.5, 10**30])
def test_decode_valid_ids(good_id):
    """String and number ids (including 0 and "") are accepted and kept as sent."""
    msg = ms.decode_client_message(json.dumps({"type": "ping", "id": good_id}))
    assert msg == {"type": "ping", "id": good_id}


def test_decode_every_client_type():
    """Every client message type of the SPEC decodes to the same dict."""
    for kind in ("setup", "subscribe", "unsubscribe", "publish", "replay", "resume", "ack", "refresh", "presence", "ping"):
        assert ms.decode_client_message(json.dumps({"type": kind, "x": [1, {"y": None}]})) == {"type": kind, "x": [1, {"y": None}]}


@pytest.mark.parametrize(
    "topic",
    ["", "x" * 257, "a b", " ", "a\tb", "a\nb", "a\rb", "a\x00b", "\x7f", "a\x85b", "a\x9fb", "a\u2028b", "a\u2029b",
     "a\u00a0b", "a\u3000b", "*", "a*", "prices.*", "\ud800", "a\udfffb"],
    ids=repr,
)
def test_check_topic_invalid(topic):
    """Empty, over 256 chars, whitespace, control chars, '*' and lone surrogates are INVALID_TOPIC with field."""
    with pytest.raises(ms.ClientError) as info:
        ms.check_topic(topic)
    assert info.value.code == "INVALID_TOPIC"
    assert info.value.context["field"] == "topic"


@pytest.mark.parametrize("topic", [None, 5, 1.5, True, ["a"], {"a": 1}, b"a"], ids=repr)
def test_check_topic_not_a_string(topic):
    """A topic that is not a string is INVALID_MESSAGE with field `topic`."""
    with pytest.raises(ms.ClientError) as info:
        ms.check_topic(topic)
    assert (info.value.code, info.value.context["field"]) == ("INVALID_MESSAGE", "topic")


@pytest.mark.parametrize("topic", ["prices.€", "x" * 256, "a", "a.b-c_d/e:f#1", "日本語", "café", "😀"], ids=repr)
def test_check_topic_valid(topic):
    """Unicode topics and a topic of exactly 256 characters are valid and returned unchanged."""
    assert ms.check_topic(topic) == topic


def test_check_topic_length_and_field_are_parameters():
    """check_topic honours a smaller max_length and names the given field."""
    assert ms.check_topic("ab", max_length=2) == "ab"
    with pytest.raises(ms.ClientError) as info:
        ms.check_topic("abc", max_length=2, field="topics")
    assert (info.value.code, info.value.context["field"]) == ("INVALID_TOPIC", "topics")


# === 8. Topic store ===============================================================================


class _CountingDict(dict):
    """A dict that counts lookups and refuses to be iterated (to prove O(own topics) cleanup)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def __iter__(self):
        raise AssertionError("the topic map must not be scanned")

    def keys(self):
        raise AssertionError("the topic map must not be scanned")

    def values(self):
        raise AssertionError("the topic map must not be scanned")

    def items(self):
        raise AssertionError("the topic map must not be scanned")


def _store_and_clients(n: int):
    broker = ms.Broker(ms.Config())
    return ms.TopicStore(), [ms.Client(broker) for _ in range(n)]


def test_topic_store_subscribe_idempotent():
    """Subscribing twice returns True then False and counts one pair."""
    store, (a,) = _store_and_clients(1)
    assert store.subscribe(a, "t") is True
    assert store.subscribe(a, "t") is False
    assert store.count == 1
    assert store.subscribers == {"t": {a}}
    assert a.topics == {"t"}


def test_topic_store_unsubscribe_idempotent_and_removes_empty_topic():
    """Unsubscribing returns True then False, and a topic with no subscriber is removed."""
    store, (a,) = _store_and_clients(1)
    assert store.unsubscribe(a, "t") is False  # never subscribed
    store.subscribe(a, "t")
    assert store.unsubscribe(a, "t") is True
    assert store.unsubscribe(a, "t") is False
    assert store.count == 0
    assert store.subscribers == {}
    assert a.topics == set()


def test_topic_store_shared_topic_survives_one_unsubscribe():
    """A topic stays while another client is still subscribed, and the count is exact."""
    store, (a, b) = _store_and_clients(2)
    store.subscribe(a, "t")
    store.subscribe(b, "t")
    store.subscribe(b, "u")
    assert store.count == 3
    store.unsubscribe(a, "t")
    assert store.subscribers == {"t": {b}, "u": {b}}
    assert store.count == 2


def test_topic_store_remove_client_leaves_nothing_behind():
    """remove_client drops every pair of that client and only those, removing emptied topics."""
    store, (a, b) = _store_and_clients(2)
    for t in ("x", "y", "z"):
        store.subscribe(a, t)
    store.subscribe(b, "y")
    store.remove_client(a)
    assert a.topics == set()
    assert store.subscribers == {"y": {b}}
    assert store.count == 1
    store.remove_client(a)  # twice is harmless
    store.remove_client(b)
    assert store.subscribers == {} and store.count == 0


def test_topic_store_remove_client_touches_only_its_topics():
    """remove_client looks up only the client's own topics and never scans the whole topic map."""
    store, (a, b) = _store_and_clients(2)
    for i in range(2000):
        store.subscribe(b, f"other.{i}")
    store.subscribe(a, "mine.1")
    store.subscribe(a, "mine.2")
    store.subscribe(a, "other.7")
    store.subscribers = _CountingDict(store.subscribers)
    store.remove_client(a)
    assert store.subscribers.lookups <= 2 * 3  # a constant per own topic, not per topic in the store
    assert store.count == 2000
    assert "mine.1" not in store.subscribers and "mine.2" not in store.subscribers
    assert dict.__getitem__(store.subscribers, "other.7") == {b}


# === 9. Dedup =====================================================================================


def test_dedup_duplicate_inside_window_returns_seq():
    """A remembered (user, messageId) returns its seqNo inside the window; other users and ids do not."""
    clock = FakeClock()
    d = ms.Dedup(window=10, clock=clock)
    assert d.get("u", "m1") is None
    d.add("u", "m1", 41)
    assert d.get("u", "m1") == 41
    assert d.get("v", "m1") is None
    assert d.get("u", "m2") is None
    clock.advance(9.999)
    assert d.get("u", "m1") == 41


def test_dedup_forgets_after_window():
    """An entry is forgotten once the window has passed, and the next add purges it."""
    clock = FakeClock()
    d = ms.Dedup(window=10, clock=clock)
    d.add("u", "m1", 1)
    d.add("v", "m1", 2)
    clock.advance(10)
    assert d.get("u", "m1") is None
    assert d.get("v", "m1") is None
    d.add("w", "m9", 3)
    assert len(d) == 1


def test_dedup_readd_expired_id():
    """An id whose entry expired can be added again and is then remembered with its new seqNo."""
    clock = FakeClock()
    d = ms.Dedup(window=10, clock=clock)
    d.add("u", "m1", 1)
    clock.advance(11)
    assert d.get("u", "m1") is None
    d.add("u", "m1", 7)
    assert d.get("u", "m1") == 7
    assert len(d) == 1
    clock.advance(9)
    assert d.get("u", "m1") == 7


def test_dedup_per_user_bound_evicts_that_users_oldest():
    """Over the per-user bound, that user's oldest id goes, even when another user's ids are older."""
    clock = FakeClock()
    d = ms.Dedup(window=100, per_user=3, total=100, clock=clock)
    d.add("v", "old", 100)
    for i in range(1, 5):
        clock.advance(1)
        d.add("u", f"m{i}", i)
    assert d.get("u", "m1") is None
    assert [d.get("u", f"m{i}") for i in (2, 3, 4)] == [2, 3, 4]
    assert d.get("v", "old") == 100
    assert len(d) == 4


def test_dedup_total_bound_evicts_globally_oldest():
    """Over the total bound, the oldest entry of any user goes first."""
    clock = FakeClock()
    d = ms.Dedup(window=100, per_user=100, total=4, clock=clock)
    for user, mid, seq in (("u", "a1", 1), ("v", "b1", 2), ("u", "a2", 3), ("w", "c1", 4)):
        clock.advance(1)
        d.add(user, mid, seq)
    clock.advance(1)
    d.add("w", "c2", 5)
    assert d.get("u", "a1") is None
    assert d.get("v", "b1") == 2
    clock.advance(1)
    d.add("w", "c3", 6)
    assert d.get("v", "b1") is None
    assert [d.get("u", "a2"), d.get("w", "c1"), d.get("w", "c2"), d.get("w", "c3")] == [3, 4, 5, 6]
    assert len(d) == 4


def test_dedup_len_bounded():
    """However many ids are added, len() stays within the total and each user within its bound."""
    clock = FakeClock()
    d = ms.Dedup(window=1e9, per_user=50, total=300, clock=clock)
    for i in range(5000):
        clock.advance(0.001)
        d.add(f"user{i % 13}", f"m{i}", i)
        assert len(d) <= 300
    for u in range(13):
        recent = [i for i in range(5000) if i % 13 == u][-50:]
        assert sum(d.get(f"user{u}", f"m{i}") is not None for i in range(5000) if i % 13 == u) <= 50
        assert d.get(f"user{u}", f"m{recent[-1]}") == recent[-1]


def test_dedup_readd_live_id_moves_it_to_the_young_end():
    """Adding a live id again replaces it without growing, and it is then evicted last."""
    clock = FakeClock()
    d = ms.Dedup(window=100, per_user=2, total=100, clock=clock)
    d.add("u", "a", 1)
    clock.advance(1)
    d.add("u", "b", 2)
    clock.advance(1)
    d.add("u", "a", 9)
    assert len(d) == 2
    clock.advance(1)
    d.add("u", "c", 3)
    assert (d.get("u", "a"), d.get("u", "b"), d.get("u", "c")) == (9, None, 3)


# === 10. History ==================================================================================


def _frame(topic: str, seq: int, size: int = 0) -> bytes:
    """A recognisable fake frame of at least `size` bytes."""
    body = f"{topic}:{seq}".encode()
    return body + b"." * max(0, size - len(body))


def test_history_count_bound_per_topic():
    """Each topic keeps only its max_messages most recent messages; other topics are not affected."""
    h = ms.History(max_messages=3, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    for seq in range(1, 6):
        h.add("a", seq, _frame("a", seq))
    h.add("b", 1, _frame("b", 1))
    assert h.oldest("a") == 3
    assert h.between("a", 1) == [_frame("a", s) for s in (3, 4, 5)]
    assert h.between("b", 1) == [_frame("b", 1)]
    assert h.count == 4
    assert h.bytes == sum(len(_frame("a", s)) for s in (3, 4, 5)) + len(_frame("b", 1))


def test_history_age_bound():
    """Messages older than max_age are dropped (by expire() or the next add), oldest first."""
    clock = FakeClock()
    h = ms.History(max_messages=100, max_age=10, max_bytes=1 << 30, clock=clock)
    h.add("a", 1, _frame("a", 1))
    clock.advance(5)
    h.add("a", 2, _frame("a", 2))
    h.add("b", 1, _frame("b", 1))
    clock.advance(5)
    h.expire()
    assert h.oldest("a") == 2
    assert h.between("a", 1) == [_frame("a", 2)]
    assert h.oldest("b") == 1
    clock.advance(5)
    h.add("c", 1, _frame("c", 1))  # an add expires too
    assert h.oldest("a") is None and h.oldest("b") is None
    assert h.between("a", 1) == []
    assert (h.count, h.bytes) == (1, len(_frame("c", 1)))


def test_history_byte_bound_evicts_globally_oldest():
    """Over max_bytes in total, the oldest message across all topics goes first."""
    h = ms.History(max_messages=100, max_age=1e9, max_bytes=30, clock=FakeClock())
    h.add("a", 1, _frame("a", 1, 10))
    h.add("b", 1, _frame("b", 1, 10))
    h.add("a", 2, _frame("a", 2, 10))
    assert h.bytes == 30 and h.count == 3
    h.add("b", 2, _frame("b", 2, 10))
    assert (h.oldest("a"), h.oldest("b")) == (2, 1)
    h.add("c", 1, _frame("c", 1, 10))
    assert (h.oldest("a"), h.oldest("b"), h.oldest("c")) == (2, 2, 1)
    assert h.bytes == 30
    h.add("c", 2, _frame("c", 2, 25))
    assert h.bytes <= 30
    assert h.between("c", 1) == [_frame("c", 2, 25)]
    assert h.oldest("a") is None and h.oldest("b") is None


def test_history_between_and_oldest():
    """between(topic, first[, last]) returns the retained frames in that range, in order; oldest() the first seqNo."""
    h = ms.History(max_messages=5, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    assert h.oldest("t") is None and h.between("t", 1) == []
    for seq in range(1, 9):
        h.add("t", seq, _frame("t", seq))
    assert h.oldest("t") == 4
    assert h.between("t", 6) == [_frame("t", s) for s in (6, 7, 8)]
    assert h.between("t", 1) == [_frame("t", s) for s in (4, 5, 6, 7, 8)]
    assert h.between("t", 8) == [_frame("t", 8)]
    assert h.between("t", 9) == []
    assert h.between("t", 100) == []
    assert h.between("other", 1) == []
    assert h.between("t", 5, 6) == [_frame("t", 5), _frame("t", 6)]
    assert h.between("t", 1, 4) == [_frame("t", 4)]
    assert h.between("t", 1, 3) == []
    assert h.between("t", 7, 100) == [_frame("t", 7), _frame("t", 8)]


def test_history_off_when_max_messages_is_zero():
    """max_messages=0 retains nothing."""
    h = ms.History(max_messages=0, clock=FakeClock())
    h.add("t", 1, b"x")
    assert (h.oldest("t"), h.between("t", 1), h.count, h.bytes) == (None, [], 0, 0)


def test_history_long_run_keeps_order_storage_bounded():
    """50,000 publishes to one topic with max_messages=10 keep the internal order queue bounded."""
    h = ms.History(max_messages=10, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    for seq in range(1, 50_001):
        h.add("hot", seq, b"m")
        assert len(h._order) <= 2 * h.count + 1100
    assert h.count == 10 and h.oldest("hot") == 49_991


def test_history_long_run_behind_a_long_lived_message_stays_bounded():
    """A long-lived message of another topic at the front does not let stale order entries pile up."""
    h = ms.History(max_messages=10, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    h.add("cold", 1, b"c")
    for seq in range(1, 50_001):
        h.add("hot", seq, b"m")
        assert len(h._order) <= 2 * h.count + 1100
    assert h.oldest("cold") == 1 and h.oldest("hot") == 49_991
    assert h.between("hot", 1) == [b"m"] * 10


# === 12. Broker (sans-I/O) ========================================================================


def replies(client: ms.Client) -> list[dict]:
    """Parse and take every frame in `client.out` (each item is one complete server frame)."""
    out = []
    for item in client.out:
        parsed = ms.Frame.parse(item)
        assert parsed is not None, item
        frame, used = parsed
        assert used == len(item) and frame.fin and frame.opcode == ms.Opcode.TEXT, frame
        out.append(json.loads(frame.payload))
    client.take_output()
    return out


def talk(broker: ms.Broker, client: ms.Client, msg) -> list[dict]:
    """Feed one message (a dict, or raw text) and return every reply it caused."""
    broker.handle(client, msg if isinstance(msg, str) else json.dumps(msg))
    return replies(client)


def one(broker: ms.Broker, client: ms.Client, msg) -> dict:
    """Feed one message and return its single reply."""
    out = talk(broker, client, msg)
    assert len(out) == 1, out
    return out[0]


def new_client(broker: ms.Broker, token: str | None = "alice", bound_topic: str | None = None, topics=None) -> ms.Client:
    """A connected broker client, set up as `token` unless it is None; its outbox emptied."""
    client = ms.Client(broker, bound_topic=bound_topic)
    broker.connect(client)
    if token is not None:
        msg = {"type": "setup", "token": token}
        if topics is not None:
            msg["topics"] = topics
        out = talk(broker, client, msg)
        assert out[0]["type"] == "ready", out
    return client


def assert_error(msg: dict, code: str, **context) -> None:
    assert msg["type"] == "error" and msg["code"] == code, msg
    assert isinstance(msg["message"], str) and msg["message"]
    for key, value in context.items():
        assert msg.get(key) == value, (key, msg)


def assert_usable(broker: ms.Broker, client: ms.Client) -> None:
    """The client still gets answers after an error."""
    assert one(broker, client, {"type": "ping", "id": "still-there"}) == {"type": "pong", "id": "still-there"}


def test_broker_ping_before_setup_is_answered():
    """A ping before setup gets a pong (and leaves the client un-set-up)."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    assert one(broker, c, {"type": "ping"}) == {"type": "pong"}
    assert c.user_id is None


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "subscribe", "topic": "t"},
        {"type": "unsubscribe", "topic": "t"},
        {"type": "publish", "topic": "t", "messageId": "m"},
        {"type": "replay", "topic": "t", "fromSeq": 1},
        {"type": "resume", "sessionId": "s"},
        {"type": "ack", "topic": "t", "seqNo": 1},
        {"type": "refresh", "token": "alice"},
        {"type": "presence", "topic": "t"},
    ],
    ids=lambda m: m["type"],
)
def test_broker_auth_required(msg):
    """Anything but setup or ping before setup is AUTH_REQUIRED (id echoed), and nothing happens."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    assert_error(one(broker, c, {**msg, "id": 3}), "AUTH_REQUIRED", id=3)
    assert broker.topics.count == 0 and broker.published == 0
    assert_usable(broker, c)
    assert one(broker, c, {"type": "setup", "token": "alice"})["type"] == "ready"


@pytest.mark.parametrize("token_fields", [{}, {"token": ""}, {"token": None}, {"token": 5}, {"token": ["alice"]},
                                          {"token": {"sub": "alice"}}, {"token": True}, {"token": "x" * 4097}],
                         ids=["missing", "empty", "null", "number", "list", "object", "bool", "too-long"])
def test_broker_auth_failed(token_fields):
    """setup with a missing, empty, non-string or oversized token is AUTH_FAILED; a later good setup works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    assert_error(one(broker, c, {"type": "setup", **token_fields, "id": "s"}), "AUTH_FAILED", field="token", id="s")
    assert c.user_id is None
    assert_error(one(broker, c, {"type": "subscribe", "topic": "t"}), "AUTH_REQUIRED")
    assert_usable(broker, c)
    assert one(broker, c, {"type": "setup", "token": "alice"})["userId"] == "alice"


def test_broker_already_setup():
    """A second setup is ALREADY_SETUP and changes neither the user nor the subscriptions."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, "alice", topics=["t"])
    session = c.session
    assert_error(one(broker, c, {"type": "setup", "token": "bob", "topics": ["u"], "id": 1}), "ALREADY_SETUP", id=1)
    assert (c.user_id, c.session, c.topics) == ("alice", session, {"t"})
    assert_usable(broker, c)


@pytest.mark.parametrize("text", ["not json", "[]", "1", '{"type": "ping", "x": NaN}', "[" * 5000])
def test_broker_invalid_json(text):
    """Text that is not a JSON object is INVALID_JSON; the client still works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert_error(one(broker, c, text), "INVALID_JSON")
    assert_usable(broker, c)


def test_broker_binary_is_invalid_json():
    """A binary message is INVALID_JSON; the client still works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    broker.handle_binary(c)
    (msg,) = replies(c)
    assert_error(msg, "INVALID_JSON")
    assert_usable(broker, c)


@pytest.mark.parametrize("msg", [{}, {"type": 1}, {"type": "nope"}, {"type": "ready"}], ids=repr)
def test_broker_unknown_type(msg):
    """A missing, non-string or unknown type is UNKNOWN_TYPE with field `type`."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert_error(one(broker, c, msg), "UNKNOWN_TYPE", field="type")
    assert_usable(broker, c)


@pytest.mark.parametrize("msg", [{"type": "nope", "id": 5}, {"id": "x"}], ids=repr)
def test_broker_unknown_type_echoes_id(msg):
    """The error reply to a message with an unknown type still carries the message's (valid) id."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert_error(one(broker, c, msg), "UNKNOWN_TYPE", id=msg["id"])


@pytest.mark.parametrize(
    "msg, field",
    [
        ({"type": "subscribe"}, "topic"),
        ({"type": "subscribe", "topic": 5}, "topic"),
        ({"type": "subscribe", "topic": None}, "topic"),
        ({"type": "unsubscribe"}, "topic"),
        ({"type": "unsubscribe", "topic": ["t"]}, "topic"),
        ({"type": "presence"}, "topic"),
        ({"type": "publish", "messageId": "m"}, "topic"),
        ({"type": "publish", "topic": "t"}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": ""}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": "x" * 257}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": 5}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": None}, "messageId"),
        ({"type": "replay", "fromSeq": 1}, "topic"),
        ({"type": "replay", "topic": "t"}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": 0}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": -3}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": "1"}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": True}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": 1.0}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": None}, "fromSeq"),
        ({"type": "resume"}, "sessionId"),
        ({"type": "resume", "sessionId": 5}, "sessionId"),
        ({"type": "ack", "topic": "t"}, "seqNo"),
        ({"type": "ack", "topic": "t", "seqNo": "1"}, "seqNo"),
        ({"type": "ack", "topic": "t", "seqNo": True}, "seqNo"),
        ({"type": "ack", "topic": "t", "messageId": ""}, "messageId"),
        ({"type": "ack", "seqNo": 1}, "topic"),
        ({"type": "ping", "id": True}, "id"),
        ({"type": "ping", "id": None}, "id"),
        ({"type": "ping", "id": [1]}, "id"),
        ({"type": "ping", "id": {"a": 1}}, "id"),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else v,
)
def test_broker_invalid_message(msg, field):
    """A missing or mistyped field is INVALID_MESSAGE naming that field; nothing changes; the client works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert_error(one(broker, c, msg), "INVALID_MESSAGE", field=field)
    assert broker.published == 0 and broker.topics.count == 0
    assert_usable(broker, c)


def test_broker_invalid_message_carries_topic_and_id():
    """An INVALID_MESSAGE on publish carries the topic it concerns and echoes the id."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert_error(one(broker, c, {"type": "publish", "topic": "t", "messageId": "", "id": "p"}), "INVALID_MESSAGE",
                 field="messageId", topic="t", id="p")


def test_broker_message_id_of_256_chars_is_accepted():
    """A messageId of exactly 256 characters is accepted."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    ack = one(broker, c, {"type": "publish", "topic": "t", "messageId": "m" * 256})
    assert ack == {"type": "ack", "messageId": "m" * 256, "status": "ok", "seqNo": 1}


def test_broker_setup_topics_must_be_a_list():
    """setup.topics that is not an array is INVALID_MESSAGE with field `topics`; the client stays un-set-up."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    assert_error(one(broker, c, {"type": "setup", "token": "a", "topics": "t"}), "INVALID_MESSAGE", field="topics")
    assert c.user_id is None
    assert one(broker, c, {"type": "setup", "token": "a"})["type"] == "ready"


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "publish", "replay", "presence", "ack"])
@pytest.mark.parametrize("topic", ["", "a b", "*", "x" * 257, "a\u2028b"], ids=repr)
def test_broker_invalid_topic(kind, topic):
    """An invalid topic in any message is INVALID_TOPIC with field `topic`; the client still works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    msg = {"type": kind, "topic": topic, "messageId": "m", "fromSeq": 1, "seqNo": 1}
    assert_error(one(broker, c, msg), "INVALID_TOPIC", field="topic")
    assert broker.published == 0 and broker.topics.count == 0
    assert_usable(broker, c)


def test_broker_invalid_topic_in_setup_topics():
    """An invalid topic in setup.topics is INVALID_TOPIC (field `topics`) and refuses the whole setup."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    assert_error(one(broker, c, {"type": "setup", "token": "a", "topics": ["ok", "no way"]}), "INVALID_TOPIC", field="topics")
    assert_error(one(broker, c, {"type": "setup", "token": "a", "topics": ["ok", 5]}), "INVALID_MESSAGE", field="topics")
    assert c.user_id is None and broker.topics.count == 0
    assert [m["type"] for m in talk(broker, c, {"type": "setup", "token": "a", "topics": ["ok"]})] == ["ready", "subscribed"]


def test_broker_topic_locked_on_sub_socket():
    """A sub-socket may only (un)subscribe its own topic (TOPIC_LOCKED otherwise) but may publish anywhere."""
    broker = ms.Broker(ms.Config())
    c = ms.Client(broker, bound_topic="t")
    broker.connect(c)
    out = talk(broker, c, {"type": "setup", "token": "a", "id": 1})
    assert [m["type"] for m in out] == ["ready", "subscribed"]
    assert out[1] == {"type": "subscribed", "topic": "t", "seqNo": 0, "id": 1}
    assert_error(one(broker, c, {"type": "subscribe", "topic": "u", "id": 2}), "TOPIC_LOCKED", topic="u", id=2)
    assert_usable(broker, c)
    assert_error(one(broker, c, {"type": "unsubscribe", "topic": "u"}), "TOPIC_LOCKED", topic="u")
    assert_usable(broker, c)
    assert c.topics == {"t"}
    assert one(broker, c, {"type": "subscribe", "topic": "t"}) == {"type": "subscribed", "topic": "t", "seqNo": 0}
    assert one(broker, c, {"type": "publish", "topic": "u", "messageId": "m"})["status"] == "ok"
    assert one(broker, c, {"type": "unsubscribe", "topic": "t"}) == {"type": "unsubscribed", "topic": "t"}
    assert c.topics == set()


def test_broker_topic_locked_in_setup_topics():
    """setup.topics naming another topic on a sub-socket is TOPIC_LOCKED; a corrected setup works."""
    broker = ms.Broker(ms.Config())
    c = ms.Client(broker, bound_topic="t")
    broker.connect(c)
    assert_error(one(broker, c, {"type": "setup", "token": "a", "topics": ["t", "u"]}), "TOPIC_LOCKED", topic="u", field="topics")
    assert c.user_id is None and c.topics == set()
    out = talk(broker, c, {"type": "setup", "token": "a", "topics": ["t", "t"]})
    assert [(m["type"], m.get("topic")) for m in out] == [("ready", None), ("subscribed", "t")]


def test_broker_too_many_subscriptions_via_subscribe():
    """Over max_subscriptions, subscribe is TOO_MANY_SUBSCRIPTIONS; re-subscribing a held topic is fine."""
    broker = ms.Broker(ms.Config(max_subscriptions=2))
    c = new_client(broker)
    for t in ("a", "b"):
        assert one(broker, c, {"type": "subscribe", "topic": t})["type"] == "subscribed"
    assert_error(one(broker, c, {"type": "subscribe", "topic": "c", "id": 9}), "TOO_MANY_SUBSCRIPTIONS", topic="c", id=9)
    assert c.topics == {"a", "b"}
    assert_usable(broker, c)
    assert one(broker, c, {"type": "subscribe", "topic": "a"})["type"] == "subscribed"
    one(broker, c, {"type": "unsubscribe", "topic": "a"})
    assert one(broker, c, {"type": "subscribe", "topic": "c"})["type"] == "subscribed"
    assert c.topics == {"b", "c"}


def test_broker_too_many_subscriptions_via_setup():
    """A setup whose topics go over the limit is refused whole; the client stays un-set-up; a corrected setup works."""
    broker = ms.Broker(ms.Config(max_subscriptions=2))
    c = new_client(broker, token=None)
    assert_error(one(broker, c, {"type": "setup", "token": "a", "topics": ["a", "b", "c"]}), "TOO_MANY_SUBSCRIPTIONS", field="topics")
    assert c.user_id is None and c.topics == set() and broker.topics.count == 0
    assert_error(one(broker, c, {"type": "subscribe", "topic": "a"}), "AUTH_REQUIRED")
    out = talk(broker, c, {"type": "setup", "token": "a", "topics": ["a", "b", "a"]})
    assert [m["type"] for m in out] == ["ready", "subscribed", "subscribed"]
    assert c.topics == {"a", "b"}


def test_broker_too_many_subscriptions_counts_the_bound_topic():
    """On a sub-socket the URL topic counts towards the limit in setup."""
    broker = ms.Broker(ms.Config(max_subscriptions=1))
    c = ms.Client(broker, bound_topic="t")
    broker.connect(c)
    out = talk(broker, c, {"type": "setup", "token": "a", "topics": ["t"]})
    assert [m["type"] for m in out] == ["ready", "subscribed"]


def _publish(broker, client, topic, message_id, payload=None, **extra) -> list[dict]:
    msg = {"type": "publish", "topic": topic, "messageId": message_id, **extra}
    if payload is not None:
        msg["payload"] = payload
    return talk(broker, client, msg)


def test_broker_replay_unavailable_after_eviction():
    """Replay from an evicted seqNo is REPLAY_UNAVAILABLE with oldestSeq; from a retained one it replays in order."""
    broker = ms.Broker(ms.Config(history_messages=2))
    c = new_client(broker)
    for i in range(1, 6):
        _publish(broker, c, "t", f"m{i}", i)
    assert_error(one(broker, c, {"type": "replay", "topic": "t", "fromSeq": 1, "id": "r"}), "REPLAY_UNAVAILABLE",
                 oldestSeq=4, topic="t", id="r")
    assert_usable(broker, c)
    out = talk(broker, c, {"type": "replay", "topic": "t", "fromSeq": 4, "id": "r2"})
    assert [(m["type"], m.get("seqNo"), m.get("data")) for m in out[:2]] == [("message", 4, 4), ("message", 5, 5)]
    assert out[2] == {"type": "replayed", "topic": "t", "fromSeq": 4, "toSeq": 5, "id": "r2"}
    assert len(out) == 3


def test_broker_replay_wrong_epoch():
    """Replay with another epoch is REPLAY_UNAVAILABLE; with this server's epoch it works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    _publish(broker, c, "t", "m1", 1)
    assert_error(one(broker, c, {"type": "replay", "topic": "t", "fromSeq": 1, "epoch": "not-" + broker.epoch}),
                 "REPLAY_UNAVAILABLE", topic="t")
    assert_usable(broker, c)
    out = talk(broker, c, {"type": "replay", "topic": "t", "fromSeq": 1, "epoch": broker.epoch})
    assert [m["type"] for m in out] == ["message", "replayed"]


def test_broker_replay_after_age_expiry():
    """Messages that aged out of history are REPLAY_UNAVAILABLE, with oldestSeq the next seqNo."""
    clock = FakeClock()
    broker = ms.Broker(ms.Config(history_age=10), clock=clock)
    c = new_client(broker)
    _publish(broker, c, "t", "m1")
    _publish(broker, c, "t", "m2")
    clock.advance(11)
    assert_error(one(broker, c, {"type": "replay", "topic": "t", "fromSeq": 1}), "REPLAY_UNAVAILABLE", oldestSeq=3)


def test_broker_replay_edges():
    """Replay of an empty topic or from beyond the latest sends only `replayed` with toSeq the latest."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert one(broker, c, {"type": "replay", "topic": "empty", "fromSeq": 1}) == {"type": "replayed", "topic": "empty", "fromSeq": 1, "toSeq": 0}
    _publish(broker, c, "t", "m1")
    assert one(broker, c, {"type": "replay", "topic": "t", "fromSeq": 7}) == {"type": "replayed", "topic": "t", "fromSeq": 7, "toSeq": 1}


def test_broker_session_expired():
    """resume of an unknown session is SESSION_EXPIRED; the client still works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert_error(one(broker, c, {"type": "resume", "sessionId": "no-such-session", "id": 4}), "SESSION_EXPIRED", id=4)
    assert_usable(broker, c)


def test_broker_session_expired_for_another_user_or_epoch():
    """resume of another user's session, or with another epoch, is SESSION_EXPIRED."""
    broker = ms.Broker(ms.Config())
    alice = new_client(broker, "alice")
    bob = new_client(broker, "bob")
    assert_error(one(broker, bob, {"type": "resume", "sessionId": alice.session.id}), "SESSION_EXPIRED", field="sessionId")
    other = new_client(broker, "alice")
    msg = {"type": "resume", "sessionId": alice.session.id, "epoch": "x" + broker.epoch}
    assert_error(one(broker, other, msg), "SESSION_EXPIRED", field="sessionId")
    assert_usable(broker, bob)
    assert_usable(broker, other)


def test_broker_rate_limited():
    """Over the publish rate, publish is RATE_LIMITED (not processed, not remembered); after a refill it goes through."""
    clock = FakeClock()
    broker = ms.Broker(ms.Config(publish_rate=1, publish_burst=2), clock=clock)
    c = new_client(broker, topics=["t"])
    assert [m["type"] for m in _publish(broker, c, "t", "m1")] == ["message", "ack"]
    assert [m["type"] for m in _publish(broker, c, "t", "m2")] == ["message", "ack"]
    (err,) = _publish(broker, c, "t", "m3", id=7)
    assert_error(err, "RATE_LIMITED", topic="t", messageId="m3", id=7)
    assert broker.published == 2 and broker.seq["t"] == 2
    assert_usable(broker, c)
    clock.advance(1)
    out = _publish(broker, c, "t", "m3")
    assert out[-1] == {"type": "ack", "messageId": "m3", "status": "ok", "seqNo": 3}
    other = new_client(broker, "bob")  # the bucket is per connection
    assert _publish(broker, other, "t", "b1")[-1]["status"] == "ok"


def test_broker_internal_error_is_contained():
    """An unexpected exception in a handler becomes INTERNAL_ERROR with the id, and the client still works."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)

    def boom(client, msg):
        raise RuntimeError("secret detail")

    broker._handlers["presence"] = boom
    err = one(broker, c, {"type": "presence", "topic": "t", "id": "x"})
    assert_error(err, "INTERNAL_ERROR", id="x")
    assert "secret" not in json.dumps(err)
    assert broker.stats()["errors"]["INTERNAL_ERROR"] == 1
    assert_usable(broker, c)


def test_broker_deep_payload_never_internal_error():
    """Any payload nesting depth is either published or refused as a client error, never INTERNAL_ERROR."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    codes = {}
    for depth in range(1, 1200):
        text = '{"type":"publish","topic":"t","messageId":"d%d","payload":%s}' % (depth, "[" * depth + "]" * depth)
        out = talk(broker, c, text)
        codes[depth] = out[-1].get("code") or out[-1]["type"]
    assert "INTERNAL_ERROR" not in codes.values(), [d for d, code in codes.items() if code == "INTERNAL_ERROR"]


@pytest.mark.parametrize("msg_id", ["abc", 7, 0, 1.5, ""], ids=repr)
def test_broker_id_echoed_on_every_direct_reply(msg_id):
    """ready, subscribed, unsubscribed, ack, replayed, pong, error, presence and refreshed echo the id; messages do not."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    out = talk(broker, c, {"type": "setup", "token": "alice", "topics": ["t"], "id": msg_id})
    assert [(m["type"], m["id"]) for m in out] == [("ready", msg_id), ("subscribed", msg_id)]
    checks = [
        ({"type": "subscribe", "topic": "u"}, "subscribed"),
        ({"type": "unsubscribe", "topic": "u"}, "unsubscribed"),
        ({"type": "replay", "topic": "t", "fromSeq": 1}, "replayed"),
        ({"type": "ping"}, "pong"),
        ({"type": "subscribe", "topic": "bad topic"}, "error"),
        ({"type": "presence", "topic": "t"}, "presence"),
        ({"type": "refresh", "token": "alice"}, "refreshed"),
    ]
    for msg, kind in checks:
        reply = one(broker, c, {**msg, "id": msg_id})
        assert (reply["type"], reply["id"]) == (kind, msg_id), reply
    message, ack = _publish(broker, c, "t", "m1", {"k": 1}, id=msg_id)
    assert message["type"] == "message" and "id" not in message
    assert (ack["type"], ack["id"]) == ("ack", msg_id)
    dup = _publish(broker, c, "t", "m1", id=msg_id)
    assert dup == [{"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1, "id": msg_id}]


def test_broker_no_id_means_no_id_in_reply():
    """A message without id gets a reply without id."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert one(broker, c, {"type": "ping"}) == {"type": "pong"}
    assert "id" not in one(broker, c, {"type": "subscribe", "topic": ""})


def test_broker_subscribe_unsubscribe_idempotent():
    """Subscribing or unsubscribing twice answers both times and changes the store once."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert one(broker, c, {"type": "subscribe", "topic": "t"}) == {"type": "subscribed", "topic": "t", "seqNo": 0}
    assert one(broker, c, {"type": "subscribe", "topic": "t"}) == {"type": "subscribed", "topic": "t", "seqNo": 0}
    assert broker.topics.count == 1
    assert one(broker, c, {"type": "unsubscribe", "topic": "t"}) == {"type": "unsubscribed", "topic": "t"}
    assert one(broker, c, {"type": "unsubscribe", "topic": "t"}) == {"type": "unsubscribed", "topic": "t"}
    assert one(broker, c, {"type": "unsubscribe", "topic": "never"}) == {"type": "unsubscribed", "topic": "never"}
    assert broker.topics.count == 0 and broker.topics.subscribers == {}


def test_broker_subscribed_seq_is_the_topics_latest():
    """subscribed.seqNo is the topic's latest seqNo (0 if none), in subscribe and in setup."""
    broker = ms.Broker(ms.Config())
    pub = new_client(broker, "pub")
    for i in range(3):
        _publish(broker, pub, "t", f"m{i}")
    sub = new_client(broker, "sub")
    assert one(broker, sub, {"type": "subscribe", "topic": "t"})["seqNo"] == 3
    assert one(broker, sub, {"type": "subscribe", "topic": "fresh"})["seqNo"] == 0
    late = ms.Client(broker)
    broker.connect(late)
    out = talk(broker, late, {"type": "setup", "token": "late", "topics": ["t", "fresh"]})
    assert [(m.get("topic"), m.get("seqNo")) for m in out[1:]] == [("t", 3), ("fresh", 0)]


def test_broker_duplicate_publish():
    """A repeated messageId gets ack duplicate with the original seqNo, is not delivered and takes no seqNo."""
    broker = ms.Broker(ms.Config())
    pub = new_client(broker, "pub")
    sub = new_client(broker, "sub", topics=["t"])
    replies(sub)
    assert _publish(broker, pub, "t", "m1", "first") == [{"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}]
    assert [m["data"] for m in replies(sub)] == ["first"]
    _publish(broker, pub, "t", "m2", "second")
    replies(sub)
    assert _publish(broker, pub, "t", "m1", "again") == [{"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}]
    assert replies(sub) == []
    assert _publish(broker, pub, "t", "m3")[0]["seqNo"] == 3
    assert [m["seqNo"] for m in replies(sub)] == [3]
    assert broker.duplicates == 1 and broker.published == 3


def test_broker_dedup_is_across_topics_of_one_user():
    """The same user reusing a messageId on another topic is a duplicate, and that topic's counter does not move."""
    broker = ms.Broker(ms.Config())
    pub = new_client(broker, "pub")
    _publish(broker, pub, "t", "m1")
    assert _publish(broker, pub, "u", "m1")[0] == {"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}
    assert _publish(broker, pub, "u", "m2")[0]["seqNo"] == 1


def test_broker_dedup_is_per_user():
    """Two users publishing the same messageId are both accepted."""
    broker = ms.Broker(ms.Config())
    alice = new_client(broker, "alice")
    bob = new_client(broker, "bob")
    assert _publish(broker, alice, "t", "same")[0] == {"type": "ack", "messageId": "same", "status": "ok", "seqNo": 1}
    assert _publish(broker, bob, "t", "same")[0] == {"type": "ack", "messageId": "same", "status": "ok", "seqNo": 2}


def test_broker_dedup_shared_by_connections_of_one_user():
    """Two connections of one user share the dedup memory."""
    broker = ms.Broker(ms.Config())
    a1 = new_client(broker, "alice")
    a2 = new_client(broker, "alice")
    _publish(broker, a1, "t", "m")
    assert _publish(broker, a2, "t", "m")[0]["status"] == "duplicate"


def test_broker_dedup_window_uses_the_injected_clock():
    """After the dedup window the same messageId is accepted again with a new seqNo."""
    clock = FakeClock()
    broker = ms.Broker(ms.Config(dedup_window=60), clock=clock)
    c = new_client(broker)
    _publish(broker, c, "t", "m")
    clock.advance(59)
    assert _publish(broker, c, "t", "m")[0]["status"] == "duplicate"
    clock.advance(2)
    assert _publish(broker, c, "t", "m")[0] == {"type": "ack", "messageId": "m", "status": "ok", "seqNo": 2}


def test_broker_publisher_gets_own_message_before_ack():
    """A subscribed publisher receives its own message, then the ack."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, topics=["t"])
    out = _publish(broker, c, "t", "m1", {"x": [1, 2]}, id=1)
    assert out == [
        {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m1", "data": {"x": [1, 2]}},
        {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1, "id": 1},
    ]


@pytest.mark.parametrize("payload", [None, 0, False, "", "text", [1, "a", None], {"nested": {"deep": [True]}}, 1.5, "€\ud800"], ids=repr)
def test_broker_payload_delivered_as_data(payload):
    """The payload arrives unchanged as `data`; an absent payload arrives as null."""
    broker = ms.Broker(ms.Config())
    pub = new_client(broker, "pub")
    sub = new_client(broker, "sub", topics=["t"])
    replies(sub)
    msg = {"type": "publish", "topic": "t", "messageId": "m"}
    if payload is not None:
        msg["payload"] = payload
    talk(broker, pub, msg)
    (message,) = replies(sub)
    assert message == {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m", "data": payload}


def test_broker_failed_publish_is_not_remembered():
    """A publish refused for validation or before setup does not consume its messageId."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, token=None)
    assert_error(_publish(broker, c, "t", "m1")[0], "AUTH_REQUIRED")
    one(broker, c, {"type": "setup", "token": "alice"})
    assert_error(_publish(broker, c, "bad topic", "m1")[0], "INVALID_TOPIC")
    assert_error(one(broker, c, {"type": "publish", "messageId": "m1"}), "INVALID_MESSAGE")
    assert _publish(broker, c, "t", "m1")[0] == {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}
    assert len(broker.dedup) == 1


def test_broker_presence_lists_distinct_users():
    """presence lists each subscribed user once, sorted, and follows unsubscribes."""
    broker = ms.Broker(ms.Config())
    a1 = new_client(broker, "alice", topics=["t"])
    new_client(broker, "alice", topics=["t"])
    bob = new_client(broker, "bob", topics=["t"])
    carol = new_client(broker, "carol")
    assert one(broker, carol, {"type": "presence", "topic": "t"}) == {"type": "presence", "topic": "t", "users": ["alice", "bob"], "count": 2}
    one(broker, bob, {"type": "unsubscribe", "topic": "t"})
    one(broker, a1, {"type": "unsubscribe", "topic": "t"})
    assert one(broker, carol, {"type": "presence", "topic": "t"})["users"] == ["alice"]
    assert one(broker, carol, {"type": "presence", "topic": "nobody"}) == {"type": "presence", "topic": "nobody", "users": [], "count": 0}


def test_broker_refresh():
    """refresh with the same user's token is refreshed (expiresAt null); another user's or a bad token is AUTH_FAILED."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, "alice")
    assert one(broker, c, {"type": "refresh", "token": "alice", "id": 1}) == {"type": "refreshed", "expiresAt": None, "id": 1}
    assert_error(one(broker, c, {"type": "refresh", "token": "mallory"}), "AUTH_FAILED", field="token")
    assert_error(one(broker, c, {"type": "refresh", "token": ""}), "AUTH_FAILED", field="token")
    assert_error(one(broker, c, {"type": "refresh"}), "AUTH_FAILED", field="token")
    assert c.user_id == "alice"
    assert_usable(broker, c)


def test_broker_client_ack_has_no_reply():
    """A valid client ack (seqNo and/or messageId) is accepted silently."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker)
    assert talk(broker, c, {"type": "ack", "topic": "t", "seqNo": 1}) == []
    assert talk(broker, c, {"type": "ack", "topic": "t", "messageId": "m"}) == []
    assert talk(broker, c, {"type": "ack", "topic": "t", "seqNo": 1, "messageId": "m", "id": 3}) == []


def test_broker_stats_exact():
    """stats() counts connections, topics, subscriptions, published, delivered and duplicates exactly."""
    broker = ms.Broker(ms.Config())
    a = new_client(broker, "a", topics=["t1", "t2"])
    b = new_client(broker, "b", topics=["t1"])
    c = new_client(broker, "c")
    assert {k: broker.stats()[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 3, "topics": 2, "subscriptions": 3}
    _publish(broker, c, "t1", "m1")  # to a and b
    _publish(broker, c, "t2", "m2")  # to a
    _publish(broker, c, "t3", "m3")  # to nobody
    _publish(broker, c, "t1", "m1")  # duplicate
    _publish(broker, a, "t1", "m1")  # another user: delivered to a and b
    replies(b)
    one(broker, b, {"type": "subscribe", "topic": "t1"})  # idempotent: no change
    stats = broker.stats()
    assert {k: stats[k] for k in ("connections", "topics", "subscriptions", "published", "delivered", "duplicates")} == {
        "connections": 3, "topics": 2, "subscriptions": 3, "published": 4, "delivered": 5, "duplicates": 1,
    }
    broker.disconnect(b)
    assert {k: broker.stats()[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 2, "topics": 2, "subscriptions": 2}
    broker.disconnect(a)
    broker.disconnect(a)  # twice is harmless
    assert {k: broker.stats()[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 1, "topics": 0, "subscriptions": 0}


def test_broker_disconnect_removes_everything():
    """disconnect removes all of a client's subscriptions, empties its topics, and later publishes reach nobody."""
    broker = ms.Broker(ms.Config())
    c = new_client(broker, topics=["a", "b", "c"])
    other = new_client(broker, "o")
    broker.disconnect(c)
    assert broker.topics.subscribers == {} and broker.topics.count == 0 and c.topics == set()
    assert _publish(broker, other, "a", "m")[0]["seqNo"] == 1
    assert broker.delivered == 0 and c.out == []


def test_broker_publish_api_result():
    """Broker.publish returns a PublishResult with status, messageId, seqNo and subscriber count."""
    broker = ms.Broker(ms.Config())
    new_client(broker, "s1", topics=["t"])
    new_client(broker, "s2", topics=["t"])
    assert broker.publish("u", "t", "m", {"a": 1}) == ms.PublishResult("ok", "m", 1, 2)
    assert broker.publish("u", "t", "m", {"a": 1}) == ms.PublishResult("duplicate", "m", 1, 0)
    assert broker.publish("u", "empty", "m2", None) == ms.PublishResult("ok", "m2", 1, 0)


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


# === 13. Documents: docs.html, OpenAPI, AsyncAPI ==================================================
#
# The page, /openapi.json and /asyncapi.json are checked against the server itself: every message
# type, error code, close code and route it has is documented, and nothing more; every `$ref`
# resolves; every example validates against its own schema (with the small JSON Schema validator
# below) and is accepted by a live server.

with open(os.path.join(HERE, "docs.html"), encoding="utf-8") as _f:
    DOCS_HTML = _f.read()
del _f

# Close codes the server itself sends (SPEC §2); 1006 is reported by browsers, 4003 is in the SPEC.
SERVER_CLOSE_CODES = (1000, 1001, 1002, 1007, 1009, 1011, 4000, 4001, 4002)

# Every element id the browser test touches: test_docs_has_every_id_the_browser_test_uses checks them.
BROWSER_IDS = (
    "url", "preset", "connect", "disconnect", "resume", "state", "close-info", "memory", "type", "token",
    "topic", "payload", "payload-err", "preview", "send", "log", "auto", "demo-topic", "demo-query",
    "demo-send", "demo-result", "post-send", "post-result", "stats", "console",
)

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
COMPONENT_KEY = re.compile(r"[a-zA-Z0-9.\-_]+\Z")  # OpenAPI 3.1 and AsyncAPI 3.0 component names


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Report a redirect as it is instead of following it."""

    def redirect_request(self, *args, **kwargs):
        return None


def http_get(port: int, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of one HTTP request to 127.0.0.1:port, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=5) as res:
            return res.status, {k.lower(): v for k, v in res.headers.items()}, res.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


# -- a small JSON Schema (2020-12) validator: the keywords the documents use, and no others

SCHEMA_KEYWORDS = frozenset(
    ("$ref", "type", "const", "enum", "required", "properties", "items", "additionalProperties",
     "minLength", "maxLength", "minimum", "pattern")
)
SCHEMA_ANNOTATIONS = frozenset(("description", "title", "examples", "example", "default", "format", "$comment"))
_JSON_TYPES = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
}


def json_equal(a, b) -> bool:
    """Equality as JSON means it: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def resolve_ref(root: dict, ref: str):
    """The node a local `$ref` ("#/a/b~1c") points to; KeyError if it does not resolve."""
    assert ref.startswith("#/"), f"not a local reference: {ref}"
    node = root
    for part in ref[2:].split("/"):
        part = urllib.parse.unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, list):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(f"{ref}: no {part!r}")
    return node


def schema_errors(value, schema, root: dict, where: str = "$") -> list[str]:
    """What is wrong with `value` under `schema` (empty when valid); refs resolve inside `root`."""
    if schema is True:
        return []
    if schema is False:
        return [f"{where}: no value is allowed here"]
    unknown = set(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
    if unknown:
        return [f"{where}: the test's validator does not know {sorted(unknown)}"]
    errors: list[str] = []
    if "$ref" in schema:
        errors += schema_errors(value, resolve_ref(root, schema["$ref"]), root, where)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_JSON_TYPES[k](value) for k in kinds):
            errors.append(f"{where}: {value!r} is not of type {kinds}")
            return errors
    if "const" in schema and not json_equal(value, schema["const"]):
        errors.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{where}: longer than {schema['maxLength']}")
        if "pattern" in schema:
            pattern = re.sub(r"(?<!\\)\$\Z", r"\\Z", schema["pattern"])  # ECMA `$` is Python's `\Z`
            if not re.search(pattern, value):
                errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if _JSON_TYPES["number"](value) and "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: {value} is under {schema['minimum']}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], root, f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing {key!r}")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], root, f"{where}.{key}")
            elif "additionalProperties" in schema:
                errors += schema_errors(item, schema["additionalProperties"], root, f"{where}.{key}")
    return errors


def iter_refs(node, where: str = "#"):
    """Every ($ref value, location) pair in a document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value, where
            else:
                yield from iter_refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from iter_refs(value, f"{where}/{i}")


def iter_schemas(node):
    """Every schema object under a `schema`/`payload`/`schemas` key, to check the validator covers them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("example", "examples"):
                continue  # values, not schemas
            if key in ("schema", "payload") and isinstance(value, dict):
                yield value
            elif key == "schemas" and isinstance(value, dict):
                yield from value.values()
            else:
                yield from iter_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from iter_schemas(value)


def schema_keywords(schema) -> set[str]:
    """Every keyword used in a schema and its subschemas."""
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    for key in ("properties",):
        for sub in schema.get(key, {}).values():
            found |= schema_keywords(sub)
    for key in ("items", "additionalProperties"):
        found |= schema_keywords(schema.get(key))
    return found


def asyncapi_schema(doc: dict, kind: str, direction: str) -> dict:
    """The payload schema of one message type in the AsyncAPI document."""
    message = doc["components"]["messages"][f"{direction}.{kind}"]
    return message["payload"]


def table_after(anchor: str) -> str:
    """The HTML of the first table after `id="anchor"` in docs.html."""
    start = DOCS_HTML.index(f'id="{anchor}"')
    return DOCS_HTML[start:DOCS_HTML.index("</table>", start)]


def first_cells(table: str) -> list[str]:
    """The text of each row's first cell (without <code>)."""
    return [re.sub(r"</?code>", "", cell) for cell in re.findall(r"<tr><td>(.*?)</td>", table)]


def route_path(pattern: re.Pattern) -> str:
    """An App.routes regex as an OpenAPI path: `/ws/sub/(?P<topic>.+)\\Z` -> `/ws/sub/{topic}`."""
    path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern.pattern)
    path = path.removesuffix(r"\Z").replace("\\.", ".")
    assert not re.search(r"[\\()\[\]*+?^$|]", path), f"cannot turn {pattern.pattern!r} into a path"
    return path


# -- the validator itself


def test_schema_validator_accepts_and_refuses():
    """The test's JSON Schema validator refuses what each keyword forbids and accepts what it allows."""
    root = {"defs": {"n": {"type": "integer", "minimum": 1}}}
    cases = [
        ({"type": "integer"}, 3, True), ({"type": "integer"}, True, False), ({"type": "integer"}, 1.5, False),
        ({"type": ["string", "number"]}, 2.5, True), ({"type": ["string", "number"]}, False, False),
        ({"type": ["integer", "null"]}, None, True), ({"const": True}, 1, False), ({"const": "x"}, "x", True),
        ({"enum": ["ok", "duplicate"]}, "maybe", False), ({"enum": [1]}, 1.0, True),
        ({"type": "string", "minLength": 1}, "", False), ({"type": "string", "maxLength": 2}, "abc", False),
        ({"pattern": r"^[^\s*]+$"}, "a b", False), ({"pattern": r"^[^\s*]+$"}, "a\n", False),
        ({"pattern": r"^[^\s*]+$"}, "prices.btc", True), ({"minimum": 0}, -1, False),
        ({"required": ["a"]}, {"b": 1}, False), ({"properties": {"a": {"type": "string"}}}, {"a": 1}, False),
        ({"items": {"type": "string"}}, ["a", 2], False), ({"additionalProperties": {"type": "integer"}}, {"x": "1"}, False),
        ({"additionalProperties": False}, {"x": 1}, False), ({"$ref": "#/defs/n"}, 0, False), ({"$ref": "#/defs/n"}, 5, True),
        ({"uniqueItems": True}, [], False),  # a keyword the validator does not know is an error, not a pass
    ]
    for schema, value, valid in cases:
        errors = schema_errors(value, schema, root)
        assert (not errors) == valid, (schema, value, errors)


# -- docs.html


def test_docs_lists_every_message_type():
    """docs.html's client and server message tables name exactly the server's CLIENT_TYPES and SERVER_TYPES."""
    assert set(first_cells(table_after("client-messages"))) == set(ms.CLIENT_TYPES)
    assert set(first_cells(table_after("server-messages"))) == set(ms.SERVER_TYPES)
    for kind in ms.CLIENT_TYPES | ms.SERVER_TYPES:
        assert f"<code>{kind}</code>" in DOCS_HTML, kind


def test_docs_lists_every_error_code():
    """docs.html's error table names exactly the server's ERROR_CODES, each with what a client should do."""
    table = table_after("errors")
    assert first_cells(table) == list(ms.ERROR_CODES)
    for row in re.findall(r"<tr><td>.*?</tr>", table):
        assert row.count("<td>") == 3 and not re.search(r"<td>\s*</td>", row), row


def test_docs_lists_every_close_code():
    """Every close code the server sends is in docs.html's close-code table and in the console's explanations."""
    listed = {int(code) for code in first_cells(table_after("close-codes"))}
    assert set(SERVER_CLOSE_CODES) <= listed
    assert listed <= set(SERVER_CLOSE_CODES) | {1006, 4003}, "a close code the SPEC does not have"
    explained = {int(code) for code in re.findall(r"\b(\d{4}): '", DOCS_HTML)}
    assert set(SERVER_CLOSE_CODES) <= explained


def test_docs_lists_every_endpoint():
    """docs.html's endpoint table names every route of /openapi.json (demo and echo on), WebSockets as ws:// URLs."""
    table = table_after("endpoints")
    doc = ms.openapi_document(ms.Config(demo=True, echo=True))
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if "101" in op["responses"]:
                assert f"<code>ws://HOST:PORT{path}</code>" in table, path
            else:
                assert f"<code>{method.upper()} {path}" in table, (method, path)


def test_docs_console_offers_every_client_message():
    """The console's message-type selector offers every client message type."""
    select = re.search(r'<select id="type">(.*?)</select>', DOCS_HTML, re.S).group(1)
    assert set(re.findall(r"<option>(\w+)</option>", select)) == set(ms.CLIENT_TYPES)


def test_docs_examples_match_the_message_schemas():
    """Every example in docs.html's message tables is valid JSON of its row's type and validates against its schema."""
    doc = ms.asyncapi_document(ms.Config())
    for anchor, direction in (("client-messages", "client"), ("server-messages", "server")):
        rows = re.findall(r"<tr><td><code>(\w+)</code></td>(.*?)</tr>", table_after(anchor), re.S)
        assert rows
        for kind, rest in rows:
            example = json.loads(html.unescape(re.findall(r"<code>(\{.*?\})</code>", rest)[-1]))
            assert example["type"] == kind
            assert schema_errors(example, asyncapi_schema(doc, kind, direction), doc) == [], (kind, example)


def test_docs_makes_no_request_to_another_host():
    """docs.html loads nothing from another host: no absolute URL in src/href/action/fetch/import/url(), no //cdn."""
    absolute = r"""(?:https?:)?//"""
    forbidden = [
        rf"""\b(?:src|href|action|poster|srcset)\s*=\s*["']?\s*{absolute}""",
        rf"""\bfetch\(\s*["'`]\s*{absolute}""",
        rf"""\bimport\s*\(?\s*["'`]\s*{absolute}""",
        rf"""\burl\(\s*["']?\s*{absolute}""",
        r"""@import""",
        r"""//cdn""",
        r"""new\s+(?:WebSocket|EventSource|Worker)\(\s*["'`]""",  # only URLs built from the page's origin
    ]
    for pattern in forbidden:
        assert not re.search(pattern, DOCS_HTML, re.I), pattern
    for match in re.finditer(r"https?://[^\s\"'<>`]+", DOCS_HTML):
        raise AssertionError(f"absolute URL in docs.html: {match.group()}")
    assert "location.host" in DOCS_HTML and "'wss://'" in DOCS_HTML, "WebSocket URLs come from the page's origin"


def test_docs_has_every_id_the_browser_test_uses():
    """Every element id the browser tests use (BROWSER_IDS, read from their source) exists exactly once in docs.html."""
    source = "".join(
        inspect.getsource(f) for f in (log_entry, test_browser_console_publish_drop_resume, test_browser_console_gap_and_json_errors)
    )
    assert set(re.findall(r"#([A-Za-z][\w-]*)", source)) == set(BROWSER_IDS)
    for element_id in BROWSER_IDS:
        assert DOCS_HTML.count(f'id="{element_id}"') == 1, element_id
    ids = re.findall(r'\bid="([^"]+)"', DOCS_HTML)
    assert len(ids) == len(set(ids)), "duplicate ids"
    for target in re.findall(r'<label for="([^"]+)"', DOCS_HTML):
        assert target in ids, f"label for a missing id {target!r}"


def test_docs_openapi_and_asyncapi_are_served():
    """/docs serves docs.html as is; /openapi.json and /asyncapi.json are the documents built from the config."""
    with thread_server() as server:
        status, headers, body = http_get(server.port, "/docs")
        assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
        assert body.decode() == DOCS_HTML
        status, headers, body = http_get(server.port, "/openapi.json")
        assert (status, headers["content-type"].split(";")[0]) == (200, "application/json")
        assert json.loads(body) == ms.openapi_document(server.config)
        status, headers, body = http_get(server.port, "/asyncapi.json")
        assert (status, headers["content-type"].split(";")[0]) == (200, "application/json")
        assert json.loads(body) == ms.asyncapi_document(server.config, f"127.0.0.1:{server.port}")


def test_openapi_page_lists_every_documented_path():
    """/openapi is an HTML page listing every documented path, loading nothing from another host."""
    with thread_server() as server:
        status, headers, body = http_get(server.port, "/openapi")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for path in ms.openapi_document(server.config)["paths"]:
        assert f"<code>{html.escape(path)}</code>" in page, path
    assert not re.search(r"""\b(?:src|href)\s*=\s*["']?(?:https?:)?//""", page, re.I)
    assert "<script" not in page and "//cdn" not in page


# -- OpenAPI


def test_openapi_structure():
    """/openapi.json is OpenAPI 3.1.0 with info, operations that all have described responses, and resolving $refs."""
    for demo in (True, False):
        for echo in (True, False):
            doc = ms.openapi_document(ms.Config(demo=demo, echo=echo))
            assert doc["openapi"] == "3.1.0"
            assert doc["info"]["title"] == "microsocket" and doc["info"]["version"] == ms.__version__
            schemes = doc["components"].get("securitySchemes", {})
            for group in doc["components"].values():
                assert all(COMPONENT_KEY.match(name) for name in group), group.keys()
            for path, item in doc["paths"].items():
                assert path.startswith("/"), path
                for method, op in item.items():
                    assert method in HTTP_METHODS, (path, method)
                    assert op.get("summary"), (path, method)
                    assert op["responses"], (path, method)
                    for status, response in op["responses"].items():
                        assert re.fullmatch(r"[1-5]\d\d|[1-5]XX|default", status), (path, status)
                        assert "$ref" in response or response.get("description"), (path, status)
                    names = {p["name"] for p in item.get("parameters", []) + op.get("parameters", []) if p["in"] == "path"}
                    assert names == set(re.findall(r"\{(\w+)\}", path)), (path, names)
                    for p in op.get("parameters", []):
                        assert p["in"] in ("path", "query", "header", "cookie") and (p["in"] != "path" or p["required"] is True)
                    for requirement in op.get("security", []):
                        assert set(requirement) <= set(schemes), requirement
            for ref, where in iter_refs(doc):
                resolve_ref(doc, ref)  # raises when it does not resolve
            for schema in iter_schemas(doc):
                unknown = schema_keywords(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
                assert not unknown, f"the test's validator does not know {unknown}"


def test_openapi_documents_every_route_and_nothing_more():
    """With demo and echo on and off, the (path, method) pairs of /openapi.json are exactly App.routes'."""
    for demo in (True, False):
        for echo in (True, False):
            config = ms.Config(demo=demo, echo=echo)
            app = ms.App(config, ms.Broker(config))
            routes = {(route_path(pattern), method.lower()) for pattern, methods, _ in app.routes for method in methods}
            doc = ms.openapi_document(config)
            documented = {(path, method) for path, item in doc["paths"].items() for method in item if method in HTTP_METHODS}
            assert documented == routes, (demo, echo, documented ^ routes)
            for path, _ in documented:  # and each documented path is one the router matches
                concrete = path.replace("{topic}", "prices")
                assert any(pattern.match(concrete) for pattern, _, _ in app.routes), path
            assert ("/demo/publish/{topic}", "get") in documented if demo else True
            assert (("/echo", "get") in documented) == echo


def test_openapi_error_responses_reference_the_error_schema():
    """Every 4xx/5xx response of every operation is application/json with the Error schema."""
    doc = ms.openapi_document(ms.Config(demo=True, echo=True))
    error = doc["components"]["schemas"]["Error"]
    assert error["required"] == ["error"] and error["properties"]["error"]["type"] == "string"
    count = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, response in op["responses"].items():
                if status[0] in "45":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (path, method, status)
                    count += 1
    assert count >= 10


def test_openapi_examples_validate_against_their_schemas():
    """Every example in /openapi.json (parameters, request bodies, responses) validates against its schema."""
    doc = ms.openapi_document(ms.Config(demo=True, echo=True))
    count = 0
    for path, item in doc["paths"].items():
        for method, op in item.items():
            holders = [p for p in op.get("parameters", [])]
            holders += list(op.get("requestBody", {}).get("content", {}).values())
            for response in op["responses"].values():
                holders += list(response.get("content", {}).values())
            for holder in holders:
                values = [holder["example"]] if "example" in holder else []
                values += [e["value"] for e in holder.get("examples", {}).values()]
                for value in values:
                    assert "schema" in holder, (path, method, holder)
                    assert schema_errors(value, holder["schema"], doc) == [], (path, method, value)
                    count += 1
    assert count >= 10


def test_openapi_request_examples_validate_and_are_accepted():
    """Every request-body example validates against its schema and a live POST of it answers 200 as documented."""
    with thread_server() as server:
        doc = ms.openapi_document(server.config)
        examples = 0
        for path, item in doc["paths"].items():
            for method, op in item.items():
                for media, content in op.get("requestBody", {}).get("content", {}).items():
                    assert media == "application/json"
                    values = [content["example"]] if "example" in content else []
                    values += [e["value"] for e in content.get("examples", {}).values()]
                    assert values, f"{method} {path} has no request example"
                    for value in values:
                        assert schema_errors(value, content["schema"], doc) == [], (path, value)
                        status, headers, body = http_get(
                            server.port, path, method.upper(), json.dumps(value).encode(),
                            {"Authorization": "Bearer demo", "Content-Type": media},
                        )
                        assert status == 200, body
                        answer = op["responses"]["200"]["content"]["application/json"]["schema"]
                        assert schema_errors(json.loads(body), answer, doc) == [], body
                        examples += 1
        assert examples >= 1


def _live_responses(port: int, doc: dict):
    """(path, method, status, response object, media, decoded body) for a plain request to every operation, and for the wrong method."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            concrete = path.replace("{topic}", "prices")
            if "{topic}" in path and not path.startswith("/ws"):
                concrete += "?price=42"
            for verb in (method.upper(), "GET" if method == "post" else "POST"):
                body = json.dumps({"topic": "prices", "data": 1}).encode() if verb == "POST" else None
                headers = {"Authorization": "Bearer demo", "Content-Type": "application/json"} if body else {}
                status, answer_headers, raw = http_get(port, concrete, verb, body, headers)
                assert str(status) in op["responses"], (verb, path, status, raw[:200])
                if verb.lower() != method:
                    assert status == 405 and answer_headers["allow"].startswith(method.upper()), (verb, path)
                media = answer_headers.get("content-type", "").split(";")[0]
                value = json.loads(raw) if media == "application/json" else raw.decode()
                yield path, method, status, op["responses"][str(status)], media, value


def test_openapi_responses_match_the_live_server():
    """Every operation, and the same path with the wrong method, answers a documented status whose body validates against its schema."""
    with thread_server(echo=True) as server:
        doc = ms.openapi_document(server.config)
        seen = set()
        for path, method, status, response, media, value in _live_responses(server.port, doc):
            seen.add((path, method))
            if response.get("content"):
                assert media in response["content"], (path, status, media)
                schema = response["content"][media].get("schema")
                if schema is not None:
                    assert schema_errors(value, schema, doc) == [], (path, status, media, str(value)[:200])
        assert len(seen) == sum(len(item) for item in doc["paths"].values())


# -- AsyncAPI


def test_asyncapi_server_is_the_address_the_client_used():
    """/asyncapi.json names the host and port of the request, not the configured port 0."""
    with thread_server() as server:
        status, _, raw = http_get(server.port, "/asyncapi.json", "GET", None, {})
        assert status == 200
        assert json.loads(raw)["servers"]["local"] == {"host": f"127.0.0.1:{server.port}", "protocol": "ws"}


def test_asyncapi_structure():
    """/asyncapi.json is AsyncAPI 3.0.0 with channels /ws and /ws/sub/{topic} and operations whose refs point into their channel."""
    doc = ms.asyncapi_document(ms.Config())
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "microsocket" and doc["info"]["version"] == ms.__version__
    for server in doc["servers"].values():
        assert server["host"] and server["protocol"] in ("ws", "wss")
    channels = doc["channels"]
    assert sorted(c["address"] for c in channels.values()) == ["/ws", "/ws/sub/{topic}"]
    for name, channel in channels.items():
        assert COMPONENT_KEY.match(name)
        assert set(re.findall(r"\{(\w+)\}", channel["address"])) == set(channel.get("parameters", {})), name
    for group in doc["components"].values():
        assert all(COMPONENT_KEY.match(name) for name in group), group.keys()
    for ref, where in iter_refs(doc):
        resolve_ref(doc, ref)  # raises when it does not resolve
    for schema in iter_schemas(doc):
        unknown = schema_keywords(schema) - SCHEMA_KEYWORDS - SCHEMA_ANNOTATIONS
        assert not unknown, f"the test's validator does not know {unknown}"
    seen = set()
    for name, op in doc["operations"].items():
        assert COMPONENT_KEY.match(name)
        assert op["action"] in ("send", "receive"), name
        channel_ref = op["channel"]["$ref"]
        assert channel_ref.startswith("#/channels/") and resolve_ref(doc, channel_ref) in channels.values()
        channel = resolve_ref(doc, channel_ref)
        assert op["messages"], name
        for message in op["messages"]:
            assert message["$ref"].startswith(channel_ref + "/messages/"), (name, message)
            key = message["$ref"].rsplit("/", 1)[1]
            assert key in channel["messages"], (name, key)
            target = resolve_ref(doc, channel["messages"][key]["$ref"])
            direction = "client" if op["action"] == "receive" else "server"  # written from the server's side
            assert target is doc["components"]["messages"][f"{direction}.{target['name']}"], (name, key)
            seen.add((channel["address"], op["action"], target["name"]))
    for channel in channels.values():
        for kind in ms.CLIENT_TYPES:
            assert (channel["address"], "receive", kind) in seen, (channel["address"], kind)
        for kind in ms.SERVER_TYPES:
            assert (channel["address"], "send", kind) in seen, (channel["address"], kind)


def test_asyncapi_has_a_message_for_every_type():
    """Every client and server type has one message whose payload schema fixes `type` to it, with an example."""
    doc = ms.asyncapi_document(ms.Config())
    messages = doc["components"]["messages"]
    client = {m["name"] for k, m in messages.items() if k.startswith("client.")}
    server = {m["name"] for k, m in messages.items() if k.startswith("server.")}
    assert (client, server) == (set(ms.CLIENT_TYPES), set(ms.SERVER_TYPES))
    assert {kind for kind, *_ in ms.CLIENT_MESSAGES} == set(ms.CLIENT_TYPES)
    assert {kind for kind, *_ in ms.SERVER_MESSAGES} == set(ms.SERVER_TYPES)
    for key, message in messages.items():
        schema = resolve_ref(doc, message["payload"]["$ref"])
        assert schema["properties"]["type"] == {"const": message["name"]}, key
        assert "type" in schema["required"] and message["examples"], key
        assert message["contentType"] == "application/json"


def test_asyncapi_examples_validate_against_their_schema():
    """Each message's example validates against its own payload schema and no other type's."""
    doc = ms.asyncapi_document(ms.Config())
    messages = doc["components"]["messages"]
    for key, message in messages.items():
        for example in message["examples"]:
            assert schema_errors(example["payload"], message["payload"], doc) == [], (key, example)
            direction = key.split(".")[0]
            for other_key, other in messages.items():
                if other_key != key and other_key.startswith(direction + "."):
                    assert schema_errors(example["payload"], other["payload"], doc), (key, other_key)


async def _exchange(ws, msg: dict, barrier: str) -> list[dict]:
    """Send `msg`, then a ping with id `barrier`; return everything received before that pong."""
    await ws.send(json.dumps(msg))
    await ws.send(json.dumps({"type": "ping", "id": barrier}))
    replies = []
    while True:
        reply = await recv_json(ws)
        if reply == {"type": "pong", "id": barrier}:
            return replies
        replies.append(reply)


def test_asyncapi_client_examples_are_accepted_and_server_examples_match():
    """On both channels every client example is accepted by a live server, and every server example has the live reply's fields."""
    doc = ms.asyncapi_document(ms.Config())
    client_examples = {m["name"]: m["examples"][0]["payload"] for k, m in doc["components"]["messages"].items() if k.startswith("client.")}
    server_messages = {m["name"]: m for k, m in doc["components"]["messages"].items() if k.startswith("server.")}
    order = [kind for kind, *_ in ms.CLIENT_MESSAGES]
    assert order[0] == "setup"
    refused = {"INVALID_MESSAGE", "UNKNOWN_TYPE", "INVALID_JSON", "INVALID_TOPIC"}

    async def main():
        observed: dict[str, list[dict]] = collections.defaultdict(list)
        async with serving() as server:
            for channel in doc["channels"].values():
                path = channel["address"].replace("{topic}", "prices")
                async with connect(ws_url(server, path)) as ws:
                    for n, kind in enumerate(order):
                        example = client_examples[kind]
                        replies = await _exchange(ws, example, f"barrier-{n}")
                        for reply in replies:
                            observed[reply["type"]].append(reply)
                            if reply["type"] == "error":
                                assert reply["code"] not in refused, (path, example, reply)
                                assert (kind, reply["code"]) == ("resume", "SESSION_EXPIRED"), (path, example, reply)
                            elif "id" in example and reply["type"] != "message":
                                assert reply.get("id") == example["id"], (example, reply)  # direct replies echo the id
                        expected = {"setup": "ready", "subscribe": "subscribed", "unsubscribe": "unsubscribed",
                                    "publish": "ack", "replay": "replayed", "resume": "error", "refresh": "refreshed",
                                    "presence": "presence", "ping": "pong"}.get(kind)
                        if expected:
                            assert expected in [r["type"] for r in replies], (path, kind, replies)
                        if kind == "ack":
                            assert replies == [], (path, replies)
                    # The resume example with a real session: resumed (the old connection is taken over, 4002).
                    async with connect(ws_url(server, path)) as again:
                        await _exchange(again, client_examples["setup"], "again-1")
                        replies = await _exchange(again, {**client_examples["resume"], "sessionId": observed["ready"][-1]["sessionId"]}, "again-2")
                        assert [r["type"] for r in replies if r["type"] != "message"] == ["resumed"], replies
                        for reply in replies:
                            observed[reply["type"]].append(reply)
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await asyncio.wait_for(ws.recv(), 5)
                    assert closed.value.rcvd.code == 4002
        return observed

    observed = run(main())
    assert set(observed) == set(ms.SERVER_TYPES), set(ms.SERVER_TYPES) - set(observed)
    for kind, replies in observed.items():
        message = server_messages[kind]
        example = message["examples"][0]["payload"]
        for reply in replies:
            assert schema_errors(reply, message["payload"], doc) == [], (kind, reply)
            assert set(reply) - {"id"} == set(example) - {"id"}, (kind, sorted(reply), sorted(example))


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


# === End to end (websockets client) ==============================================================

SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22,}\Z")


async def http_get_json(server: ms.Server, path: str) -> dict:
    """GET `path` on the server with a fresh connection; the parsed JSON body of a 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


async def pong_check(ws, tag) -> None:
    """The connection still answers: ping with an id gets pong with that id."""
    assert await request(ws, {"type": "ping", "id": tag}) == {"type": "pong", "id": tag}


def test_e2e_setup_ready_then_subscribed_in_order():
    """setup with topics gets ready {sessionId, userId, epoch} then one subscribed per topic, in order."""

    async def main():
        async with serving() as server:
            async with connect(ws_url(server)) as ws1, connect(ws_url(server)) as ws2:
                ready = await setup(ws1, "alice", topics=["b", "a", "c"], id="s")
                assert set(ready) == {"type", "sessionId", "userId", "epoch", "id"}
                assert SESSION_ID.match(ready["sessionId"]) and ready["userId"] == "alice" and ready["id"] == "s"
                assert isinstance(ready["epoch"], str) and ready["epoch"]
                subs = [await recv_json(ws1) for _ in range(3)]
                assert subs == [{"type": "subscribed", "topic": t, "seqNo": 0, "id": "s"} for t in ("b", "a", "c")]
                ready2 = await setup(ws2, "alice")
                assert ready2["sessionId"] != ready["sessionId"] and ready2["epoch"] == ready["epoch"]
                await pong_check(ws1, 1)

    run(main())


def test_e2e_session_ids_unique():
    """Every connection gets a different sessionId."""

    async def main():
        async with serving() as server:
            ids = set()
            for _ in range(20):
                async with connect(ws_url(server)) as ws:
                    ids.add((await setup(ws))["sessionId"])
            assert len(ids) == 20

    run(main())


def test_e2e_publish_message_then_ack():
    """A subscribed publisher gets its message then its ack; another subscriber gets the message."""

    async def main():
        async with serving() as server:
            async with connect(ws_url(server)) as pub, connect(ws_url(server)) as sub:
                await setup(pub, "p", topics=["t"])
                await recv_json(pub)
                await setup(sub, "s", topics=["t"])
                await recv_json(sub)
                await pub.send(json.dumps({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"v": 1}, "id": 5}))
                message = {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m1", "data": {"v": 1}}
                assert await recv_json(pub) == message
                assert await recv_json(pub) == {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1, "id": 5}
                assert await recv_json(sub) == message

    run(main())


def test_e2e_sub_socket_percent_decoded_and_locked():
    """/ws/sub/caf%C3%A9 subscribes "café" first after setup, refuses other topics, and may publish."""

    async def main():
        async with serving() as server:
            async with connect(ws_url(server, "/ws/sub/caf%C3%A9")) as ws:
                await setup(ws, "alice", topics=["café"])
                assert await recv_json(ws) == {"type": "subscribed", "topic": "café", "seqNo": 0}
                reply = await request(ws, {"type": "subscribe", "topic": "other", "id": 1})
                assert (reply["type"], reply["code"], reply["topic"], reply["id"]) == ("error", "TOPIC_LOCKED", "other", 1)
                await pong_check(ws, 2)
                await ws.send(json.dumps({"type": "publish", "topic": "café", "messageId": "m"}))
                assert (await recv_json(ws))["type"] == "message"
                assert (await recv_json(ws))["type"] == "ack"
            async with connect(ws_url(server, "/ws/sub/a.b")) as ws:
                await setup(ws, "bob", topics=["a.b", "a.b"])
                assert await recv_json(ws) == {"type": "subscribed", "topic": "a.b", "seqNo": 0}
                await pong_check(ws, 3)  # no second subscribed came first

    run(main())


@pytest.mark.parametrize("path", ["/ws/sub/a%20b", "/ws/sub/%2A", "/ws/sub/%FF", "/ws/sub/a%00b", "/ws/sub/" + "x" * 257])
def test_e2e_sub_socket_invalid_topic_is_400(path):
    """A sub-socket URL with an invalid (decoded) topic fails the handshake with HTTP 400."""

    async def main():
        async with serving() as server:
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                async with connect(ws_url(server, path)):
                    pass
            assert info.value.response.status_code == 400

    run(main())


def test_e2e_every_error_code_keeps_the_connection():
    """Each applicable error code is provoked over a real connection, and a ping still gets a pong after each."""

    async def main():
        # publish_burst=2 at a negligible rate: the third publish is refused, whatever the timing.
        async with serving(max_subscriptions=1, history_messages=1, publish_rate=1e-6, publish_burst=2) as server:
            async with connect(ws_url(server)) as ws, connect(ws_url(server, "/ws/sub/locked")) as sub:
                await pong_check(ws, "before-setup")
                steps = [
                    ({"type": "subscribe", "topic": "t"}, "AUTH_REQUIRED"),
                    ({"type": "setup", "token": ""}, "AUTH_FAILED"),
                    ("this is not json", "INVALID_JSON"),
                    (b"\x00\x01binary", "INVALID_JSON"),
                    ({"type": "dance"}, "UNKNOWN_TYPE"),
                    ({"type": "setup", "token": "alice"}, "ready"),
                    ({"type": "setup", "token": "alice"}, "ALREADY_SETUP"),
                    ({"type": "subscribe"}, "INVALID_MESSAGE"),
                    ({"type": "publish", "topic": "t", "messageId": ""}, "INVALID_MESSAGE"),
                    ({"type": "subscribe", "topic": "a b"}, "INVALID_TOPIC"),
                    ({"type": "subscribe", "topic": "x"}, "subscribed"),
                    ({"type": "subscribe", "topic": "y"}, "TOO_MANY_SUBSCRIPTIONS"),
                    ({"type": "publish", "topic": "z", "messageId": "z1"}, "ack"),
                    ({"type": "publish", "topic": "z", "messageId": "z2"}, "ack"),
                    ({"type": "replay", "topic": "z", "fromSeq": 1}, "REPLAY_UNAVAILABLE"),
                    ({"type": "replay", "topic": "z", "fromSeq": 2, "epoch": "other"}, "REPLAY_UNAVAILABLE"),
                    ({"type": "resume", "sessionId": "unknown"}, "SESSION_EXPIRED"),
                    ({"type": "publish", "topic": "z", "messageId": "z3"}, "RATE_LIMITED"),
                ]
                for i, (msg, expected) in enumerate(steps):
                    await ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))
                    reply = await recv_json(ws)
                    assert reply.get("code", reply["type"]) == expected, (msg, reply)
                    await pong_check(ws, i)
                await setup(sub, "bob")
                assert (await recv_json(sub))["topic"] == "locked"
                for msg in ({"type": "subscribe", "topic": "other"}, {"type": "unsubscribe", "topic": "other"}):
                    reply = await request(sub, msg)
                    assert reply["code"] == "TOPIC_LOCKED", reply
                    await pong_check(sub, msg["type"])
                stats = await http_get_json(server, "/stats")
                assert stats["connections"] == 2

    run(main())


def test_e2e_ordering_three_publishers_five_subscribers():
    """3 publishers x 200 concurrent messages: all 5 subscribers see seqNo 1..600 once, in order, identically."""

    async def main():
        async with serving() as server, contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(connect(ws_url(server))) for _ in range(5)]
            pubs = [await stack.enter_async_context(connect(ws_url(server))) for _ in range(3)]
            for i, ws in enumerate(subs):
                await setup(ws, f"sub{i}", topics=["t"])
                assert (await recv_json(ws))["type"] == "subscribed"
            for i, ws in enumerate(pubs):
                await setup(ws, f"pub{i}")

            async def publisher(i, ws):
                for n in range(200):
                    await ws.send(json.dumps({"type": "publish", "topic": "t", "messageId": f"p{i}-{n}", "payload": n}))
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
                assert [a["messageId"] for a in publisher_acks] == [f"p{i}-{n}" for n in range(200)]
                assert all(a["status"] == "ok" and a["seqNo"] == seq_of[a["messageId"]] for a in publisher_acks)
                mine = [seq_of[f"p{i}-{n}"] for n in range(200)]
                assert mine == sorted(mine)  # one connection's publishes keep their order

    run(main(), timeout=40)


def test_e2e_fan_out_to_500_subscribers():
    """One publish reaches all 500 subscribers; /stats counts them before and shows 0 after they close."""

    async def main():
        async with serving() as server:
            opened = []

            async def subscriber(i):
                ws = await connect(ws_url(server), open_timeout=20, ping_interval=None)
                opened.append(ws)
                await ws.send(json.dumps({"type": "setup", "token": f"u{i}", "topics": ["fan"]}))
                assert (await recv_json(ws, 20))["type"] == "ready"
                assert (await recv_json(ws, 20))["type"] == "subscribed"
                return ws

            try:
                conns = await asyncio.gather(*(subscriber(i) for i in range(500)))
                stats = await http_get_json(server, "/stats")
                assert {k: stats[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 500, "topics": 1, "subscriptions": 500}
                result = server.publish("fan", {"hello": "all"}, message_id="fan-1")
                assert result == ms.PublishResult("ok", "fan-1", 1, 500)
                got = await asyncio.gather(*(recv_json(ws, 20) for ws in conns))
                assert all(m == {"type": "message", "topic": "fan", "seqNo": 1, "messageId": "fan-1", "data": {"hello": "all"}} for m in got)
                await asyncio.gather(*(ws.close() for ws in conns))
                stats = await http_get_json(server, "/stats")
                assert {k: stats[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 0, "topics": 0, "subscriptions": 0}
                assert stats["delivered"] == 500
            finally:
                await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)

    run(main(), timeout=45)


def test_e2e_embedding_publish():
    """server.publish delivers to a subscriber and returns a PublishResult; invalid input raises ValueError."""

    async def main():
        async with serving() as server:
            async with connect(ws_url(server)) as ws:
                await setup(ws, topics=["prices"])
                await recv_json(ws)
                result = server.publish("prices", {"btc": 1})
                assert isinstance(result, ms.PublishResult)
                assert (result.status, result.seq_no, result.subscribers) == ("ok", 1, 1)
                assert result.message_id.startswith("py-")
                assert await recv_json(ws) == {"type": "message", "topic": "prices", "seqNo": 1, "messageId": result.message_id, "data": {"btc": 1}}
                again = server.publish("prices", {"btc": 2}, message_id="tick", user_id="feeder")
                assert (again.status, again.seq_no) == ("ok", 2)
                assert server.publish("prices", {"btc": 3}, message_id="tick", user_id="feeder") == ms.PublishResult("duplicate", "tick", 2, 0)
                assert (await recv_json(ws))["messageId"] == "tick"
                for topic in ("bad topic", "", "x" * 257, "a*", 5, None):
                    with pytest.raises(ValueError):
                        server.publish(topic, {})
                with pytest.raises(ValueError):
                    server.publish("prices", {}, message_id="m" * 257)
                await pong_check(ws, "nothing-else-arrived")

    run(main())


def test_e2e_embedding_publish_empty_message_id_raises():
    """server.publish with an empty message_id (an invalid messageId) raises ValueError."""

    async def main():
        async with serving() as server:
            with pytest.raises(ValueError):
                server.publish("prices", {}, message_id="")

    run(main())


def test_e2e_graceful_close_sends_1001():
    """await server.close() closes every client with 1001 and stops accepting."""

    async def main():
        async with serving() as server:
            port = server.port
            async with connect(ws_url(server)) as ws1, connect(ws_url(server, "/ws/sub/t")) as ws2:
                await setup(ws1)
                await server.close()
                for ws in (ws1, ws2):
                    await asyncio.wait_for(ws.wait_closed(), 5)
                    assert ws.close_code == 1001
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)

    run(main())


# === Command line (subprocess) ===================================================================

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "microsocket.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROSOCKET_")}
    env.update(extra)
    env["COLUMNS"] = "200"
    return env


@contextlib.contextmanager
def cli(*args: str, env: dict | None = None):
    """Start `microsocket.py` with -u; yield (process, queue of stdout lines); always kill it."""
    proc = subprocess.Popen(
        [sys.executable, "-u", SCRIPT, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env or _child_env(),
    )
    lines: queue.Queue = queue.Queue()

    def pump():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def read_banner(lines: queue.Queue, timeout: float = 10) -> str:
    """Stdout up to and including the line with the ws:// URL."""
    text = ""
    while "ws://" not in text:
        line = lines.get(timeout=timeout)
        assert line is not None, f"process ended; printed {text!r}"
        text += line
    return text


def test_open_file_limit_caps_max_connections(monkeypatch):
    """max_connections above the open-file limit is lowered to fit under it (after trying to raise the soft limit)."""

    class FakeResource:
        RLIMIT_NOFILE = 7
        RLIM_INFINITY = -1
        limits = (256, 1000)

        @classmethod
        def getrlimit(cls, which):
            return cls.limits

        @classmethod
        def setrlimit(cls, which, limits):
            cls.limits = limits

    monkeypatch.setattr(ms, "resource", FakeResource)
    config = ms.fit_open_file_limit(ms.Config(max_connections=100_000))
    assert FakeResource.limits == (1000, 1000)  # the soft limit was raised to the hard one
    assert config.max_connections == 1000 - ms.FD_RESERVE
    assert ms.fit_open_file_limit(ms.Config(max_connections=10)).max_connections == 10


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a Unix process limit")
def test_past_the_open_file_limit_handshakes_get_503_not_hangs():
    """With a low open-file limit, WebSocket handshakes past the cap get HTTP 503 instead of hanging on accept."""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-u", SCRIPT, "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, env=_child_env(), preexec_fn=low_limit,
    )
    clients = []
    try:
        assert "ws://" in proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
        statuses = []
        for _ in range(160):
            client = RawClient(port)
            clients.append(client)
            key = base64.b64encode(os.urandom(16)).decode()
            status, _, _ = client.http(
                f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            statuses.append(status)
            if status == 503:
                break
        assert statuses.count(101) == 160 - ms.FD_RESERVE and statuses[-1] == 503
    finally:
        for client in clients:
            client.close()
        proc.kill()
        proc.wait(10)
        err = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert "max-connections 100000 is over what the open-file limit (160) allows" in err
    assert "out of system resource" not in err


async def _close_code_on_signal(proc, port: int, sig: int) -> int:
    async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        await setup(ws)
        proc.send_signal(sig)
        await asyncio.wait_for(ws.wait_closed(), 10)
        return ws.close_code


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_prints_urls_and_shuts_down_on_signal(sig):
    """The CLI prints the docs and ws URLs; on SIGTERM/SIGINT a client gets 1001 and the process exits 0."""
    port = free_port()
    with cli("--port", str(port), "--log-level", "WARNING") as (proc, lines):
        banner = read_banner(lines)
        assert f"http://127.0.0.1:{port}/docs" in banner
        assert f"ws://127.0.0.1:{port}/ws" in banner
        assert run(_close_code_on_signal(proc, port, sig)) == 1001
        assert proc.wait(timeout=10) == 0


def test_cli_port_from_environment():
    """MICROSOCKET_PORT is honoured when --port is not given."""
    port = free_port()
    with cli(env=_child_env(MICROSOCKET_PORT=str(port))) as (proc, lines):
        banner = read_banner(lines)
        assert f"ws://127.0.0.1:{port}/ws" in banner
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_cli_help_lists_every_option():
    """--help lists every Config option (and its environment variable) and exits 0."""
    done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=20, env=_child_env())
    assert done.returncode == 0, done.stderr
    for field in ms.dataclasses.fields(ms.Config):
        special = {"demo": "--no-demo", "allowed_origins": "--allowed-origin"}
        flag = special.get(field.name, "--" + field.name.replace("_", "-"))
        assert flag in done.stdout, flag
        assert "MICROSOCKET_" + field.name.upper() in done.stdout, field.name
    for flag in ("--log-level", "--version"):
        assert flag in done.stdout


@pytest.mark.parametrize(
    "args, env",
    [(["--max-buffer", "-1"], {}), (["--port", "-5"], {}), (["--history-age", "-0.5"], {}), ([], {"MICROSOCKET_MAX_SUBSCRIPTIONS": "-3"})],
    ids=["max-buffer", "port", "history-age", "env"],
)
def test_cli_refuses_negative_limits(args, env):
    """A negative limit, from a flag or the environment, is refused with exit status 2."""
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=20, env=_child_env(**env))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "negative" in done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "port must be 0 to 65535"),
        (["--keyfile", "k.pem"], "--keyfile needs --certfile"),
        (["--certfile", "/nonexistent/cert.pem"], "cannot load the TLS certificate or key (/nonexistent/cert.pem)"),
        (["--certfile", SCRIPT], "cannot load the TLS certificate or key"),  # a file, but not PEM
    ],
    ids=["port-range", "keyfile-alone", "missing-cert", "not-a-cert"],
)
def test_cli_refuses_bad_port_and_tls_files_clearly(args, message):
    """A port out of range or an unusable certificate is refused with exit 2 and says so, without a traceback."""
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=20, env=_child_env())
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_cli_bad_value_is_usage_error():
    """A non-numeric limit is an argparse usage error (exit 2)."""
    done = subprocess.run([sys.executable, SCRIPT, "--max-buffer", "lots"], capture_output=True, text=True, timeout=20, env=_child_env())
    assert done.returncode == 2 and "--max-buffer" in done.stderr


# === Standard library only =======================================================================


def test_imports_only_the_standard_library():
    """Every import in microsocket.py, top level or not, names a standard-library module."""
    with open(SCRIPT, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "__import__", "dynamic import"
    assert names, "no imports found"
    assert names - set(sys.stdlib_module_names) == set()
    assert "importlib" not in names


# === Slow consumer ================================================================================


class SmallWindowClient(RawClient):
    """A RawClient whose receive buffer is small, so that not reading fills the pipe quickly."""

    def __init__(self, port: int, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""


def test_slow_consumer_closed_with_4001_others_get_everything():
    """A subscriber that stops reading is closed with 4001 after a gap-free prefix; a reading one gets every message."""
    pad = "x" * 16384
    with thread_server(max_buffer=65536, close_timeout=30) as server:

        def in_loop(fn):
            async def call():
                return fn()

            return asyncio.run_coroutine_threadsafe(call(), server.loop).result(10)

        slow = SmallWindowClient(server.port)
        normal = RawClient(server.port)
        try:
            for client, name in ((slow, "slow"), (normal, "normal")):
                client.handshake("/ws")
                client.send_json({"type": "setup", "token": name, "topics": ["t"]})
                assert client.recv_json()["type"] == "ready"
                assert client.recv_json()["type"] == "subscribed"
            assert in_loop(lambda: server.broker.connections) == 2
            published = 0
            for i in range(1, 3001):
                result = in_loop(lambda: server.publish("t", {"n": i, "pad": pad}, message_id=f"m{i}"))
                assert result.seq_no == i
                published = i
                assert normal.recv_json()["seqNo"] == i
                if in_loop(lambda: server.broker.connections) == 1:
                    break
            else:
                pytest.fail("the slow consumer was never disconnected")
            for i in range(published + 1, published + 4):
                assert in_loop(lambda: server.publish("t", {"n": i}, message_id=f"m{i}")).subscribers == 1
                assert normal.recv_json()["seqNo"] == i
            seqs = []
            while True:
                frame = slow.recv_frame()
                if frame.opcode == ms.Opcode.CLOSE:
                    code = ms.parse_close(frame.payload)[0]
                    break
                seqs.append(json.loads(frame.payload)["seqNo"])
            assert code == 4001
            assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < published
            slow.send(masked(ms.Opcode.CLOSE, ms.serialize_close(1000)))
            assert slow.at_eof()
            stats = in_loop(server.broker.stats)
            assert stats["connections"] == 1 and stats["disconnects"].get("4001") == 1
        finally:
            slow.close()
            normal.close()


# === Continuity and flow control: helpers ======================================================================================


def make_broker(**options) -> tuple[ms.Broker, FakeClock]:
    """A sans-I/O Broker with Config(**options) and a fake clock."""
    clock = FakeClock()
    return ms.Broker(ms.Config(**options), clock=clock), clock


def parse_frames(data: bytes) -> list[ms.Frame]:
    """Every complete server frame in `data` (which must hold only complete frames)."""
    frames = []
    while data:
        parsed = ms.Frame.parse(data)
        assert parsed is not None, f"incomplete frame in {data[:80]!r}"
        frame, used = parsed
        frames.append(frame)
        data = data[used:]
    return frames


def take(client: ms.Client) -> list[dict]:
    """Empty a fake client's outbox (as the I/O layer would) and return its messages, parsed."""
    data = b"".join(client.out)
    client.out.clear()
    if client.broker is not None:
        client.broker.dirty = [c for c in client.broker.dirty if c is not client]
    out = []
    for frame in parse_frames(data):
        assert frame.opcode == ms.Opcode.TEXT, frame
        out.append(json.loads(frame.payload))
    return out


def send(broker: ms.Broker, client: ms.Client, msg: dict) -> list[dict]:
    """Send one message from a fake client and return everything it then has in its outbox."""
    broker.handle(client, json.dumps(msg))
    return take(client)


def fake_client(broker: ms.Broker, token: str | None = "alice", topics: list[str] | None = None) -> tuple[ms.Client, dict]:
    """A connected fake client, set up as `token` (with `topics`); returns it and its `ready`."""
    client = ms.Client(broker)
    broker.connect(client)
    ready: dict = {}
    if token is not None:
        msg = {"type": "setup", "token": token}
        if topics is not None:
            msg["topics"] = topics
        replies = send(broker, client, msg)
        ready = replies[0]
        assert ready["type"] == "ready", replies
        assert [r["topic"] for r in replies[1:]] == list(topics or []), replies
    return client, ready


def publish_n(broker: ms.Broker, topic: str, n: int, user: str = "pub", size: int = 0) -> list[int]:
    """Publish `n` messages to `topic` as `user` straight into the broker; return their seqNos."""
    seqs = []
    for _ in range(n):
        seq = broker.seq.get(topic, 0) + 1
        result = broker.publish(user, topic, f"{topic}-{seq}", {"n": seq, "pad": "x" * size})
        assert result.status == "ok"
        seqs.append(result.seq_no)
    return seqs


def seqs_of(messages: list[dict], topic: str | None = None) -> list[int]:
    """The seqNos of the `message` frames in `messages` (of one topic when given)."""
    return [m["seqNo"] for m in messages if m["type"] == "message" and (topic is None or m["topic"] == topic)]


async def eventually(predicate, timeout: float = 10, what: str = "condition") -> None:
    """Wait until predicate() is true (checking every few ms), failing after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class AsyncRaw:
    """A raw, non-blocking client socket driven from the event loop that runs the server.

    It reads only when asked, so a test can make it stop reading (a slow consumer) or go silent
    (no pong), and it can send what a polite client cannot (half a frame, half a request head).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, port: int) -> AsyncRaw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def _more(self) -> None:
        chunk = await self.loop.sock_recv(self.sock, 1 << 16)
        if not chunk:
            raise ConnectionError(f"connection closed; unparsed: {self.buffer[:80]!r}")
        self.buffer += chunk

    async def http(self, raw: bytes) -> tuple[int, dict]:
        """Send a request head; return (status, lower-case headers) of the response, body skipped."""
        await self.send(raw)
        while b"\r\n\r\n" not in self.buffer:
            await self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", 0))
        while len(self.buffer) < length:
            await self._more()
        self.buffer = self.buffer[length:]
        return int(lines[0].split()[1]), headers

    async def handshake(self, path: str = "/ws", *extra: str) -> tuple[int, dict]:
        """A WebSocket opening handshake with `extra` header lines; (status, headers)."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", "Host: x", "Upgrade: websocket", "Connection: Upgrade",
                 f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *extra]
        status, headers = await self.http(("\r\n".join(lines) + "\r\n\r\n").encode())
        if status == 101:
            assert headers["sec-websocket-accept"] == ms.accept_key(key)
        return status, headers

    async def recv_frame(self) -> ms.Frame:
        while True:
            parsed = ms.Frame.parse(self.buffer)
            if parsed is not None:
                frame, used = parsed
                self.buffer = self.buffer[used:]
                return frame
            await self._more()

    async def recv_json(self) -> dict:
        frame = await self.recv_frame()
        assert frame.opcode == ms.Opcode.TEXT, frame
        return json.loads(frame.payload)

    async def send_json(self, msg: dict) -> None:
        await self.send(masked(ms.Opcode.TEXT, json.dumps(msg).encode()))

    async def setup(self, token: str = "alice", **fields) -> dict:
        await self.send_json({"type": "setup", "token": token, **fields})
        ready = await self.recv_json()
        assert ready["type"] == "ready", ready
        for _ in fields.get("topics", ()):
            assert (await self.recv_json())["type"] == "subscribed"
        return ready

    async def at_eof(self) -> bool:
        """Read until the server closes TCP (whatever arrives is kept in the buffer)."""
        while True:
            try:
                chunk = await self.loop.sock_recv(self.sock, 1 << 16)
            except ConnectionResetError:
                return True
            if not chunk:
                return True
            self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


async def aio_http_get(port: int, path: str) -> tuple[int, dict, bytes]:
    """GET `path` on a fresh connection from inside the server's event loop."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def get_json(port: int, path: str) -> dict:
    status, _, body = await aio_http_get(port, path)
    assert status == 200, (status, body)
    return json.loads(body)


SEQ_RE = re.compile(r'"seqNo":(\d+)')


def seq_of_text(text: str) -> int:
    """The seqNo of a `message` frame's text without parsing its (possibly large) payload."""
    assert text.startswith('{"type":"message"'), text[:80]
    return int(SEQ_RE.search(text, 0, 200).group(1))


# === 10. History and replay, end to end ========================================================================


def test_replay_after_history_count_bound():
    """A topic keeps its last history_messages messages; replay from an evicted seqNo is refused with oldestSeq."""
    broker, _ = make_broker(history_messages=3)
    client, _ = fake_client(broker)
    publish_n(broker, "t", 5)
    publish_n(broker, "u", 2)
    assert broker.history.count == 5 and broker.history.oldest("t") == 3 and broker.history.oldest("u") == 1
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 3})
    assert seqs_of(replies) == [3, 4, 5]
    assert replies[-1] == {"type": "replayed", "topic": "t", "fromSeq": 3, "toSeq": 5}
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 2, "id": 7})
    assert len(replies) == 1, replies
    assert replies[0]["type"] == "error" and replies[0]["code"] == "REPLAY_UNAVAILABLE"
    assert (replies[0]["oldestSeq"], replies[0]["topic"], replies[0]["id"]) == (3, "t", 7)


def test_replay_after_history_age_bound():
    """A message older than history_age is dropped: replay then reports the oldest still held, or latest + 1."""
    broker, clock = make_broker(history_age=10)
    client, _ = fake_client(broker)
    publish_n(broker, "t", 2)
    clock.advance(6)
    publish_n(broker, "t", 1)
    clock.advance(5)  # seqNos 1-2 are 11 s old, 3 is 5 s old
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 1})
    assert [(r["type"], r.get("code"), r.get("oldestSeq")) for r in replies] == [("error", "REPLAY_UNAVAILABLE", 3)]
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 3})
    assert seqs_of(replies) == [3] and replies[-1]["type"] == "replayed"
    clock.advance(10)  # everything is too old now
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 3})
    assert [(r["type"], r.get("code"), r.get("oldestSeq")) for r in replies] == [("error", "REPLAY_UNAVAILABLE", 4)]
    assert broker.history.count == 0 and broker.history.bytes == 0


def test_history_total_bytes_bound_across_topics():
    """history_bytes bounds all topics together, and the oldest message of any topic goes first."""
    probe, _ = make_broker()
    publish_n(probe, "a", 1)
    size = probe.history.bytes  # every frame below has this size: same topic length, same payload
    broker, _ = make_broker(history_bytes=3 * size)
    client, _ = fake_client(broker)
    for topic in ("a", "b", "a", "b"):  # a1, b1, a2, b2: a1 is the oldest of all
        publish_n(broker, topic, 1)
    assert broker.history.bytes == 3 * size and broker.history.count == 3
    assert (broker.history.oldest("a"), broker.history.oldest("b")) == (2, 1)
    replies = send(broker, client, {"type": "replay", "topic": "a", "fromSeq": 1})
    assert [(r["code"], r["oldestSeq"]) for r in replies] == [("REPLAY_UNAVAILABLE", 2)]
    assert seqs_of(send(broker, client, {"type": "replay", "topic": "b", "fromSeq": 1})) == [1, 2]
    publish_n(broker, "a", 1)  # a3 pushes out b1, now the oldest
    assert (broker.history.oldest("a"), broker.history.oldest("b")) == (2, 2)
    assert broker.history.bytes <= 3 * size


def test_replay_sends_range_as_messages_then_replayed():
    """replay sends fromSeq..latest as the original message frames, then replayed {topic, fromSeq, toSeq} with the id."""
    broker, _ = make_broker()
    client, ready = fake_client(broker)
    publish_n(broker, "t", 5)
    publish_n(broker, "other", 3)
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 2, "epoch": ready["epoch"], "id": "r1"})
    assert [(m["topic"], m["seqNo"], m["messageId"], m["data"]["n"]) for m in replies[:-1]] == [
        ("t", n, f"t-{n}", n) for n in (2, 3, 4, 5)
    ]
    assert all(m["type"] == "message" for m in replies[:-1])
    assert replies[-1] == {"type": "replayed", "topic": "t", "fromSeq": 2, "toSeq": 5, "id": "r1"}
    assert broker.replayed == 4
    # Beyond the latest: nothing, and toSeq is the latest.
    assert send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 9}) == [
        {"type": "replayed", "topic": "t", "fromSeq": 9, "toSeq": 5}
    ]


def test_replay_wrong_epoch_is_unavailable_and_nothing_else():
    """replay with an epoch that is not the server's gets REPLAY_UNAVAILABLE with oldestSeq and no message frame."""
    broker, _ = make_broker()
    client, ready = fake_client(broker)
    publish_n(broker, "t", 3)
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 1, "epoch": ready["epoch"] + "x"})
    assert len(replies) == 1 and replies[0]["type"] == "error"
    assert (replies[0]["code"], replies[0]["oldestSeq"], replies[0]["topic"]) == ("REPLAY_UNAVAILABLE", 1, "t")


def test_replay_huge_from_seq_is_answered_replayed():
    """replay with a huge fromSeq (2**64) beyond the latest sends nothing and answers replayed, as the README says."""
    broker, _ = make_broker()
    client, _ = fake_client(broker)
    publish_n(broker, "t", 1)
    replies = send(broker, client, {"type": "replay", "topic": "t", "fromSeq": 2**64})
    assert replies == [{"type": "replayed", "topic": "t", "fromSeq": 2**64, "toSeq": 1}]


def test_replay_end_to_end():
    """Over a real connection, replay returns the retained messages in order, then replayed."""

    async def main():
        async with serving(history_messages=4) as server:
            for i in range(6):
                server.publish("news", {"i": i}, message_id=f"n{i}")
            async with connect(ws_url(server), ping_interval=None) as ws:
                await setup(ws, "alice")
                await ws.send(json.dumps({"type": "replay", "topic": "news", "fromSeq": 3, "id": 1}))
                got = [await recv_json(ws) for _ in range(5)]
                assert [(m["seqNo"], m["data"]) for m in got[:4]] == [(n, {"i": n - 1}) for n in (3, 4, 5, 6)]
                assert got[4] == {"type": "replayed", "topic": "news", "fromSeq": 3, "toSeq": 6, "id": 1}
                error = await request(ws, {"type": "replay", "topic": "news", "fromSeq": 2})
                assert (error["code"], error["oldestSeq"]) == ("REPLAY_UNAVAILABLE", 3)
                assert (await request(ws, {"type": "ping"}))["type"] == "pong"  # nothing else was sent

    run(main())


# === 12. Topic counters ============================================================================


def test_idle_topic_counter_is_forgotten_after_session_ttl_and_history_age():
    """A topic with no subscriber, no retained message and no resumable session loses its counter; the next publish starts at 1."""
    broker, clock = make_broker(session_ttl=60, history_age=30)
    broker.publish("alice", "t", "m1", 1)
    broker.publish("alice", "t", "m2", 2)
    clock.advance(59)
    broker.history.expire()
    broker.forget_idle_topics()
    assert broker.seq == {"t": 2}  # past the history age, not yet past the session TTL
    clock.advance(2)
    broker.history.expire()
    broker.forget_idle_topics()
    assert broker.seq == {} and broker.stats()["sequenced_topics"] == 0
    assert broker.publish("alice", "t", "m3", 3).seq_no == 1


def test_topic_counter_with_subscribers_or_a_resumable_session_is_kept():
    """A subscribed topic keeps its counter forever; after its last subscriber leaves, for the session TTL at least."""
    broker, clock = make_broker(session_ttl=60, history_age=30)
    client, ready = fake_client(broker, "alice", topics=["t"])
    broker.publish("bob", "t", "m1", 1)
    clock.advance(10_000)
    broker.history.expire()
    broker.forget_idle_topics()
    assert broker.seq == {"t": 1}
    broker.disconnect(client)  # the session stays resumable for 60 s and remembers seqNo 1
    clock.advance(59)
    broker.forget_idle_topics()
    assert broker.seq == {"t": 1}
    again, _ = fake_client(broker, "alice")
    replies = send(broker, again, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies == [{"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"], "replayed": 0, "missed": []}]
    assert broker.publish("bob", "t", "m2", 2).seq_no == 2  # the sequence went on


def test_only_topics_with_a_counter_are_tracked_as_idle():
    """Leaving a topic that was never published to keeps nothing; leaving a published one starts its idle time."""
    broker, clock = make_broker()
    client, _ = fake_client(broker, "alice", topics=["quiet", "busy"])
    broker.publish("bob", "busy", "m1", 1)
    broker.disconnect(client)
    assert list(broker._idle) == ["busy"] and "quiet" not in broker.seq


def test_topic_counter_with_retained_history_is_kept():
    """A counter is not forgotten while history still holds the topic's messages (a replay must stay consistent)."""
    broker, clock = make_broker(session_ttl=10, history_age=100)
    broker.publish("alice", "t", "m1", 1)
    clock.advance(50)
    broker.history.expire()
    broker.forget_idle_topics()
    assert broker.seq == {"t": 1} and broker.history.oldest("t") == 1
    clock.advance(51)
    broker.history.expire()
    broker.forget_idle_topics()
    assert broker.seq == {}


# === 12. Sessions and resume =======================================================================


def detach(broker: ms.Broker, client: ms.Client, reliable: bool = True) -> None:
    """The connection goes away (what the I/O layer does on connection_lost)."""
    take(client)
    broker.disconnect(client, reliable)


def test_session_outlives_connection_for_ttl_then_expires():
    """A detached session can be resumed until session_ttl has passed; then resume gets SESSION_EXPIRED."""
    broker, clock = make_broker(session_ttl=10)
    old, ready = fake_client(broker, topics=["t"])
    publish_n(broker, "t", 2)
    detach(broker, old)
    publish_n(broker, "t", 1)
    assert ready["sessionId"] in broker.sessions and broker.stats()["sessions"] == 1
    clock.advance(9.5)
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [3]
    assert replies[-1]["type"] == "resumed" and replies[-1]["replayed"] == 1

    other, ready2 = fake_client(broker, topics=["t"])
    detach(broker, other)
    clock.advance(10)
    assert ready2["sessionId"] in broker.sessions
    broker.expire_sessions()  # what the server's once-a-second sweep calls
    assert ready2["sessionId"] not in broker.sessions
    late, _ = fake_client(broker)
    replies = send(broker, late, {"type": "resume", "sessionId": ready2["sessionId"], "id": 3})
    assert [(r["type"], r["code"], r["id"]) for r in replies] == [("error", "SESSION_EXPIRED", 3)]


def test_session_expires_exactly_at_ttl_without_other_activity():
    """An expired session is refused by resume itself, even if no sweep ran since it expired."""
    broker, clock = make_broker(session_ttl=5)
    old, ready = fake_client(broker, topics=["t"])
    detach(broker, old)
    clock.advance(5)
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert [r.get("code") for r in replies] == ["SESSION_EXPIRED"]


@pytest.mark.parametrize("who, epoch_suffix", [("mallory", None), ("alice", "-old"), ("alice", "unknown-id")])
def test_resume_refused_is_session_expired_and_changes_nothing(who, epoch_suffix):
    """resume by another user, with a wrong epoch, or of an unknown id is SESSION_EXPIRED; the session stays resumable."""
    broker, _ = make_broker()
    old, ready = fake_client(broker, "alice", topics=["t"])
    detach(broker, old)
    publish_n(broker, "t", 2)
    intruder, intruder_ready = fake_client(broker, who)
    msg = {"type": "resume", "sessionId": ready["sessionId"]}
    if epoch_suffix == "unknown-id":
        msg["sessionId"] = "no-such-session"
    elif epoch_suffix is not None:
        msg["epoch"] = intruder_ready["epoch"] + epoch_suffix
    replies = send(broker, intruder, msg)
    assert [(r["type"], r["code"]) for r in replies] == [("error", "SESSION_EXPIRED")]
    assert intruder.topics == set() and broker.sessions[ready["sessionId"]].client is None
    publish_n(broker, "t", 1)
    assert take(intruder) == []  # not subscribed to anything by the refused resume
    owner, _ = fake_client(broker, "alice")
    replies = send(broker, owner, {"type": "resume", "sessionId": ready["sessionId"], "epoch": ready["epoch"]})
    assert seqs_of(replies) == [1, 2, 3] and replies[-1]["type"] == "resumed"


@pytest.mark.parametrize(
    "given, acked, expected",
    [
        ({"t": 5}, 3, [6, 7, 8]),  # lastSeqPerTopic wins over everything
        (None, 3, [4, 5, 6, 7, 8]),  # else the acknowledged position
        (None, None, [7, 8]),  # else the last seqNo handed to the old connection (6)
    ],
)
def test_resume_position_precedence(given, acked, expected):
    """resume replays after lastSeqPerTopic when given, else after the acked seqNo, else after the last one handed."""
    broker, _ = make_broker()
    old, ready = fake_client(broker, topics=["t"])
    publish_n(broker, "t", 6)
    assert seqs_of(take(old)) == [1, 2, 3, 4, 5, 6]
    if acked is not None:
        assert send(broker, old, {"type": "ack", "topic": "t", "seqNo": acked}) == []  # ack has no reply
    detach(broker, old)
    publish_n(broker, "t", 2)
    new, _ = fake_client(broker)
    msg = {"type": "resume", "sessionId": ready["sessionId"], "id": "r"}
    if given is not None:
        msg["lastSeqPerTopic"] = given
    replies = send(broker, new, msg)
    assert seqs_of(replies) == expected
    assert replies[-1] == {"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"],
                           "replayed": len(expected), "missed": [], "id": "r"}


def test_resume_after_unreliable_disconnect_falls_back_to_subscribe_position():
    """After a slow-consumer disconnect the handed position is not trusted: resume replays from where it subscribed."""
    broker, _ = make_broker()
    publish_n(broker, "t", 2)
    old, ready = fake_client(broker, topics=["t"])
    publish_n(broker, "t", 3)
    detach(broker, old, reliable=False)
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [3, 4, 5]


def test_resumed_reports_missed_when_history_lost_the_gap():
    """When history no longer holds the gap, resumed lists {topic, fromSeq, oldestSeq} and replays what is left."""
    broker, _ = make_broker(history_messages=3)
    old, ready = fake_client(broker, topics=["t", "u"])
    publish_n(broker, "t", 2)
    publish_n(broker, "u", 1)
    take(old)
    detach(broker, old)
    publish_n(broker, "t", 6)  # 3..8; history keeps 6..8
    publish_n(broker, "u", 1)  # 2; nothing missed on u
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies, "t") == [6, 7, 8] and seqs_of(replies, "u") == [2]
    resumed = replies[-1]
    assert resumed["type"] == "resumed" and sorted(resumed["topics"]) == ["t", "u"] and resumed["replayed"] == 4
    assert resumed["missed"] == [{"topic": "t", "fromSeq": 3, "oldestSeq": 6}]


def test_resume_with_nothing_retained_reports_latest_plus_one():
    """With history off, the whole gap is missed and oldestSeq is latest + 1."""
    broker, _ = make_broker(history_messages=0)
    old, ready = fake_client(broker, topics=["t"])
    detach(broker, old)
    publish_n(broker, "t", 4)
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies == [{"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"], "replayed": 0,
                        "missed": [{"topic": "t", "fromSeq": 1, "oldestSeq": 5}]}]


def test_live_delivery_continues_after_resumed():
    """After resumed, new messages of the session's topics reach the new connection live, once."""
    broker, _ = make_broker()
    old, ready = fake_client(broker, topics=["t"])
    detach(broker, old)
    publish_n(broker, "t", 2)
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [1, 2]
    publish_n(broker, "t", 2)
    assert seqs_of(take(new)) == [3, 4]
    assert new.topics == {"t"} and broker.stats()["subscriptions"] == 1
    assert broker.sessions[ready["sessionId"]].client is new
    # The new connection's own session from its setup was replaced by the resumed one.
    assert len(broker.sessions) == 1


def test_resume_on_a_connection_already_subscribed_replays_only_before_its_subscription():
    """For a topic the new connection already receives live, resume replays only what came before that subscription."""
    broker, _ = make_broker()
    old, ready = fake_client(broker, topics=["t"])
    publish_n(broker, "t", 1)
    take(old)
    detach(broker, old)
    publish_n(broker, "t", 2)  # 2, 3: missed
    new, _ = fake_client(broker, topics=["t"])  # subscribed at 3
    publish_n(broker, "t", 1)  # 4: live on the new connection
    assert seqs_of(take(new)) == [4]
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [2, 3]
    publish_n(broker, "t", 1)
    assert seqs_of(take(new)) == [5]


def test_resume_gap_starting_at_oldest_retained_is_not_missed():
    """When history still holds the first seqNo of the gap (fromSeq == oldestSeq), nothing is reported missed."""
    broker, _ = make_broker(history_messages=3)
    old, ready = fake_client(broker, topics=["t"])
    publish_n(broker, "t", 2)
    take(old)
    detach(broker, old)
    publish_n(broker, "t", 3)  # 3..5; history keeps 3..5: the gap exactly
    new, _ = fake_client(broker)
    replies = send(broker, new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [3, 4, 5] and replies[-1]["missed"] == []


def test_resume_of_own_attached_session_replays_nothing_already_received():
    """resume of the session this very connection holds sends nothing it already received live."""
    broker, _ = make_broker()
    client, ready = fake_client(broker, topics=["t"])
    publish_n(broker, "t", 3)
    assert seqs_of(take(client)) == [1, 2, 3]
    replies = send(broker, client, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies == [{"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"], "replayed": 0, "missed": []}]
    publish_n(broker, "t", 1)
    assert seqs_of(take(client)) == [4] and broker.sessions[ready["sessionId"]].client is client


def test_max_sessions_drops_the_oldest_detached_session():
    """With max_sessions=2, a third detached session pushes out the oldest, whose resume is then SESSION_EXPIRED."""
    broker, clock = make_broker(max_sessions=2)
    ids = []
    for _ in range(3):
        client, ready = fake_client(broker, topics=["t"])
        ids.append(ready["sessionId"])
        clock.advance(1)
        detach(broker, client)
    assert set(broker.sessions) == set(ids[1:])
    new, _ = fake_client(broker)
    assert [r.get("code") for r in send(broker, new, {"type": "resume", "sessionId": ids[0]})] == ["SESSION_EXPIRED"]
    assert send(broker, new, {"type": "resume", "sessionId": ids[1]})[-1]["type"] == "resumed"


def test_takeover_in_broker():
    """resume of a session attached to another live connection detaches that one and asks for close 4002."""
    broker, _ = make_broker()
    first, ready = fake_client(broker, topics=["t"])
    second, _ = fake_client(broker)
    replies = send(broker, second, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies[-1]["type"] == "resumed"
    assert first.close_request == ms.CloseCode.SESSION_TAKEN_OVER and first.broker is None
    publish_n(broker, "t", 1)
    assert seqs_of(take(second)) == [1] and first.out == []
    assert broker.stats()["connections"] == 1 and broker.stats()["subscriptions"] == 1


def test_takeover_end_to_end_closes_old_connection_with_4002():
    """A websockets client whose session is resumed elsewhere sees close code 4002; the new one gets the messages."""

    async def main():
        async with serving() as server:
            async with connect(ws_url(server), ping_interval=None) as first, connect(ws_url(server), ping_interval=None) as second:
                ready = await setup(first, "alice", topics=["t"])
                assert (await recv_json(first))["type"] == "subscribed"
                await setup(second, "alice")
                resumed = await request(second, {"type": "resume", "sessionId": ready["sessionId"]})
                assert resumed["type"] == "resumed" and resumed["topics"] == ["t"]
                await asyncio.wait_for(first.wait_closed(), 10)
                assert first.close_code == 4002
                server.publish("t", "after", message_id="m")
                msg = await recv_json(second)
                assert (msg["type"], msg["seqNo"], msg["data"]) == ("message", 1, "after")
            await eventually(lambda: not server.connections, what="connections to close")
            assert server.broker.disconnects[4002] == 1

    run(main())


@pytest.mark.parametrize("how", ["close", "drop"])
def test_resume_while_publishers_keep_publishing_sees_every_seq_exactly_once(how):
    """KEY: two publishers publish throughout a disconnect (clean or dropped TCP), reconnect, setup and resume; the client sees every seqNo once, in order."""

    async def main():
        async with serving(history_messages=100_000, publish_rate=0) as server:
            url = ws_url(server)
            stop = asyncio.Event()

            progress = {"seen": 0, "during_gap": 0}

            async def python_publisher():
                i = 0
                while not stop.is_set():
                    # Stay at most 1000 messages ahead of what the consumer has read (it would be a
                    # slow consumer otherwise): that still leaves room to publish all through its gap.
                    if server.broker.seq.get("t", 0) - progress["seen"] < 1000:
                        server.publish("t", {"from": "py", "i": i})
                        i += 1
                    await asyncio.sleep(0)  # yield to the loop: the publisher runs alongside everything
                return i

            async def ws_publisher():
                async with connect(url, ping_interval=None) as pub:
                    await setup(pub, "bob")
                    i = 0
                    while not stop.is_set():
                        if server.broker.seq.get("t", 0) - progress["seen"] >= 1000:
                            await asyncio.sleep(0)
                            continue
                        ack = await request(pub, {"type": "publish", "topic": "t", "messageId": f"b{i}", "payload": i})
                        assert ack["type"] == "ack" and ack["status"] == "ok", ack
                        i += 1
                    return i

            async def consumer() -> tuple[list[int], dict]:
                seen: list[int] = []
                # max_queue=None: websockets stops reading when 16 messages wait unread, and would
                # then not see the server's close frame behind them until its close timeout.
                first = await connect(url, ping_interval=None, max_queue=None)
                ready = await setup(first, "alice", topics=["t"])
                start = (await recv_json(first))["seqNo"]
                while len(seen) < 300:
                    seen.append(seq_of_text(await asyncio.wait_for(first.recv(), 5)))
                    progress["seen"] = seen[-1]
                gap_start = server.broker.seq["t"]
                if how == "close":  # disconnect; more messages are published meanwhile
                    await first.close()
                else:
                    first.transport.abort()
                second = await connect(url, ping_interval=None)
                await setup(second, "alice")
                await second.send(json.dumps({"type": "resume", "sessionId": ready["sessionId"], "lastSeqPerTopic": {"t": seen[-1]}}))
                replayed = 0
                while True:
                    text = await asyncio.wait_for(second.recv(), 5)
                    if text.startswith('{"type":"resumed"'):
                        resumed = json.loads(text)
                        break
                    seen.append(seq_of_text(text))
                    replayed += 1
                progress["seen"] = seen[-1]
                progress["during_gap"] = seen[-1] - gap_start
                assert resumed["replayed"] == replayed and resumed["missed"] == []
                live = 0
                while live < 300:
                    seen.append(seq_of_text(await asyncio.wait_for(second.recv(), 5)))
                    progress["seen"] = seen[-1]
                    live += 1
                stop.set()
                # Drain to the very last message published.
                while seen[-1] < server.broker.seq["t"]:
                    seen.append(seq_of_text(await asyncio.wait_for(second.recv(), 5)))
                await second.close()
                return [start] + seen, resumed

            py, wsp, (seen, resumed) = await asyncio.gather(python_publisher(), ws_publisher(), consumer())
            start, seen = seen[0], seen[1:]
            assert seen == list(range(start + 1, server.broker.seq["t"] + 1))
            assert resumed["replayed"] > 0 and progress["during_gap"] > 0  # published during the gap
            assert py > 0 and wsp > 0 and py + wsp == server.broker.seq["t"]

    run(main(), timeout=50)


# === 14. Close timeout and shutdown grace ==========================================================


def test_peer_that_never_answers_a_close_is_dropped_after_close_timeout():
    """After the server's close frame (here 4000, no setup), a peer that never answers loses its TCP connection after close_timeout."""

    async def main():
        async with serving(setup_timeout=0.5, close_timeout=0.5) as server:
            raw = await AsyncRaw.open(server.port)
            assert (await raw.handshake())[0] == 101
            frame = await asyncio.wait_for(raw.recv_frame(), 10)
            assert frame.opcode == ms.Opcode.CLOSE and ms.parse_close(frame.payload)[0] == 4000
            assert await asyncio.wait_for(raw.at_eof(), 10)  # no close frame sent back: dropped
            raw.close()

    run(main())


def test_shutdown_drops_peers_that_do_not_close_within_the_grace():
    """Server.close() sends 1001 to everyone and, after shutdown_grace, drops a peer that never answers."""

    async def main():
        server = ms.Server(ms.Config(host="127.0.0.1", port=0, shutdown_grace=0.5, close_timeout=60))
        await server.start()
        raw = await AsyncRaw.open(server.port)
        assert (await raw.handshake())[0] == 101
        await raw.setup("alice")
        async with connect(ws_url(server)) as polite:
            await setup(polite, "bob")
            await asyncio.wait_for(server.close(), 10)  # returns although `raw` never answers
            assert polite.close_code == 1001
        frame = await asyncio.wait_for(raw.recv_frame(), 10)
        assert frame.opcode == ms.Opcode.CLOSE and ms.parse_close(frame.payload)[0] == 1001
        assert await asyncio.wait_for(raw.at_eof(), 10) and not server.connections
        raw.close()

    run(main())


def test_token_over_4096_characters_fails_setup():
    """A token over 4096 characters is AUTH_FAILED; one of exactly 4096 is accepted."""
    broker, _ = make_broker()
    client, _ = fake_client(broker, token=None)
    reply = send(broker, client, {"type": "setup", "token": "x" * 4097})
    assert reply[0]["code"] == "AUTH_FAILED" and reply[0]["field"] == "token"
    assert send(broker, client, {"type": "setup", "token": "x" * 4096})[0]["type"] == "ready"


# === 14. Flow control and liveness =================================================================


def test_slow_consumer_is_closed_4001_others_get_everything_and_it_resumes():
    """A raw client that stops reading is closed with 4001 while 50 others get every message; it then resumes with nothing missing."""

    async def main():
        async with serving(max_buffer=256 << 10, history_messages=10_000) as server:
            broker = server.broker
            slow = await AsyncRaw.open(server.port)
            assert (await slow.handshake())[0] == 101
            ready = await slow.setup("slow", topics=["big"])
            session = broker.sessions[ready["sessionId"]]
            # From here on `slow` reads nothing: the kernel buffers fill up, then the server's.

            n_fast = 50
            fast = [await connect(ws_url(server), ping_interval=None) for _ in range(n_fast)]
            got: list[list[int]] = [[] for _ in range(n_fast)]
            arrived: dict[int, int] = {}
            all_arrived = {"seq": 0, "event": asyncio.Event()}

            async def reader(i: int, ws) -> None:
                while True:
                    seq = seq_of_text(await ws.recv())
                    got[i].append(seq)
                    arrived[seq] = arrived.get(seq, 0) + 1
                    if seq == all_arrived["seq"] and arrived[seq] == n_fast:
                        all_arrived["event"].set()

            for i, ws in enumerate(fast):
                await setup(ws, f"fast{i}", topics=["big"])
                assert (await recv_json(ws))["type"] == "subscribed"
            readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(fast)]

            async def publish_one() -> int:
                all_arrived["event"] = asyncio.Event()
                all_arrived["seq"] = broker.seq.get("big", 0) + 1
                result = server.publish("big", {"pad": "x" * (16 << 10)})
                assert result.seq_no == all_arrived["seq"]
                # Every fast subscriber gets it while the slow one is stuck: nobody waits for it.
                await asyncio.wait_for(all_arrived["event"].wait(), 10)
                return result.seq_no

            published = 0
            while session.client is not None:  # until the slow one is cut (about 4 MiB of kernel buffers)
                assert published < 2000, "the slow consumer was never closed"
                published = await publish_one()
            assert broker.connections == n_fast  # the slow one is gone at once, before its close handshake
            for _ in range(20):  # the others go on
                published = await publish_one()

            # The slow client finally reads: what was written before the cut, then close 4001.
            read = []
            while True:
                frame = await asyncio.wait_for(slow.recv_frame(), 10)
                if frame.opcode == ms.Opcode.CLOSE:
                    assert ms.parse_close(frame.payload)[0] == ms.CloseCode.SLOW_CONSUMER
                    break
                read.append(seq_of_text(frame.payload.decode()))
            await slow.send(masked(ms.Opcode.CLOSE, ms.serialize_close(1000)))
            assert await asyncio.wait_for(slow.at_eof(), 10)
            slow.close()
            assert read == list(range(1, len(read) + 1)) and len(read) < published
            await eventually(lambda: broker.disconnects[4001] == 1, what="the 4001 disconnect to be counted")

            for task in readers:
                task.cancel()
            for i in range(n_fast):
                assert got[i] == list(range(1, published + 1)), f"fast subscriber {i} missed or repeated messages"

            # It resumes on a new connection from what it actually read: nothing is missing, nothing doubled.
            async with connect(ws_url(server), ping_interval=None, max_queue=None) as again:
                await setup(again, "slow")
                last = read[-1] if read else 0
                await again.send(json.dumps({"type": "resume", "sessionId": ready["sessionId"], "lastSeqPerTopic": {"big": last}}))
                replayed = []
                while True:
                    text = await asyncio.wait_for(again.recv(), 10)
                    if text.startswith('{"type":"resumed"'):
                        resumed = json.loads(text)
                        break
                    replayed.append(seq_of_text(text))
                assert resumed["replayed"] == len(replayed) and resumed["missed"] == []
                server.publish("big", {"pad": "live"})
                live = seq_of_text(await asyncio.wait_for(again.recv(), 10))
            assert read + replayed + [live] == list(range(1, published + 2))
            for ws in fast:
                await ws.close()
            metrics = broker.metrics()
            assert 'microsocket_disconnects_total{code="4001"} 1' in metrics

    run(main(), timeout=55)


def test_resume_bigger_than_max_buffer_then_live_message_is_not_a_slow_consumer():
    """A client that reads at full speed, resuming a 16 MiB gap with max_buffer=64 KiB, gets the replay and the next live message, not 4001."""

    async def main():
        async with serving(max_buffer=64 << 10, history_messages=10_000) as server:
            async with connect(ws_url(server), ping_interval=None) as old:
                ready = await setup(old, "alice", topics=["big"])
                await recv_json(old)
            await eventually(lambda: server.broker.sessions[ready["sessionId"]].client is None, what="detach")
            for _ in range(1000):  # the gap: 1000 x 16 KiB
                server.publish("big", {"pad": "x" * (16 << 10)})
            async with connect(ws_url(server), ping_interval=None, max_queue=None) as new:
                await setup(new, "alice")
                await new.send(json.dumps({"type": "resume", "sessionId": ready["sessionId"]}))
                await eventually(lambda: server.broker.replayed == 1000, what="the resume to be handled")
                server.publish("big", {"live": True})  # publishing goes on while the replay is in flight
                seqs = []
                while True:
                    text = await asyncio.wait_for(new.recv(), 10)
                    if text.startswith('{"type":"resumed"'):
                        continue
                    seqs.append(seq_of_text(text))
                    if seqs[-1] == 1001:
                        break
                assert seqs == list(range(1, 1002))

    run(main())


def test_keepalive_silent_client_is_pinged_then_closed_1011_and_its_session_resumes():
    """A raw client that never sends anything gets a ping, then close 1011; its session stays resumable."""

    async def main():
        async with serving(ping_interval=1, ping_timeout=1) as server:
            raw = await AsyncRaw.open(server.port)
            assert (await raw.handshake())[0] == 101
            ready = await raw.setup("alice", topics=["t"])
            first = await asyncio.wait_for(raw.recv_frame(), 10)
            assert first.opcode == ms.Opcode.PING
            second = await asyncio.wait_for(raw.recv_frame(), 10)
            assert second.opcode == ms.Opcode.CLOSE and ms.parse_close(second.payload)[0] == 1011
            raw.close()
            session = server.broker.sessions[ready["sessionId"]]
            assert session.client is None  # detached, not dropped
            server.publish("t", "while away")
            async with connect(ws_url(server), ping_interval=None) as ws:
                await setup(ws, "alice")
                await ws.send(json.dumps({"type": "resume", "sessionId": ready["sessionId"]}))
                msg = await recv_json(ws)
                assert (msg["type"], msg["seqNo"], msg["data"]) == ("message", 1, "while away")
                assert (await recv_json(ws))["type"] == "resumed"

    run(main())


class _Count(logging.Handler):
    """Counts the log records whose message starts with a prefix."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.DEBUG)
        self.prefix = prefix
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.count += 1


def test_keepalive_answering_clients_stay_open_across_several_pings():
    """A websockets client (automatic pongs) and a raw client answering pings by hand stay open across 3 pings."""

    async def main():
        async with serving(ping_interval=1, ping_timeout=1) as server:
            logger = logging.getLogger("test_part_c.keepalive")
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
            pings = _Count("< PING")
            logger.addHandler(pings)
            try:
                async with connect(ws_url(server), ping_interval=None, logger=logger) as ws:
                    await setup(ws, "alice")
                    raw = await AsyncRaw.open(server.port)
                    assert (await raw.handshake())[0] == 101
                    await raw.setup("bob")
                    answered = 0
                    while answered < 3:
                        frame = await asyncio.wait_for(raw.recv_frame(), 10)
                        assert frame.opcode == ms.Opcode.PING, frame
                        await raw.send(masked(ms.Opcode.PONG, frame.payload))
                        answered += 1
                    await eventually(lambda: pings.count >= 3, what="the websockets client to see 3 pings")
                    assert (await request(ws, {"type": "ping"}))["type"] == "pong"
                    assert (await request(ws, {"type": "subscribe", "topic": "t"}))["type"] == "subscribed"
                    assert server.broker.connections == 2 and not server.broker.disconnects
                    raw.close()
            finally:
                logger.removeHandler(pings)

    run(main())


def test_keepalive_sweep_right_after_takeover_does_not_crash():
    """A sweep that falls due for a just-taken-over connection (same loop turn, before its 4002 is flushed) does not raise."""

    async def main():
        interval = 3600.0  # no natural sweep pings anyone during the test; the test plays the sweeps
        async with serving(ping_interval=interval) as server:
            async with connect(ws_url(server), ping_interval=None) as old, connect(ws_url(server), ping_interval=None) as new:
                old_ready = await setup(old, "alice", topics=["t"])
                await recv_json(old)
                new_ready = await setup(new, "alice")
                conns = {c.session.id: c for c in server.connections if c.session is not None}
                old_conn, new_conn = conns[old_ready["sessionId"]], conns[new_ready["sessionId"]]
                now = asyncio.get_running_loop().time()
                old_conn.tick(now)  # a sweep: `old` was active, so it counts as idle from now on
                # Later, in one loop turn: `new`'s resume arrives (data_received), then the sweep that
                # finds `old` idle for the ping interval runs, before the flush that sends 4002.
                server.broker.handle(new_conn, json.dumps({"type": "resume", "sessionId": old_ready["sessionId"]}))
                old_conn.tick(now + 2 * interval)
                await asyncio.wait_for(old.wait_closed(), 10)
                assert old.close_code == 4002
                assert (await recv_json(new))["type"] == "resumed"

    run(main())


def test_setup_timeout_closes_4000():
    """A WebSocket that sends no setup within setup_timeout is closed with 4000."""

    async def main():
        async with serving(setup_timeout=1) as server:
            async with connect(ws_url(server), ping_interval=None) as ws:
                await asyncio.wait_for(ws.wait_closed(), 10)
                assert ws.close_code == 4000
            async with connect(ws_url(server), ping_interval=None) as ok:  # set up in time: stays open
                await setup(ok, "alice")
                closing = await AsyncRaw.open(server.port)  # a witness that the deadline passed
                assert (await closing.handshake())[0] == 101
                frame = await asyncio.wait_for(closing.recv_frame(), 10)
                assert ms.parse_close(frame.payload)[0] == 4000
                closing.close()
                assert (await request(ok, {"type": "ping"}))["type"] == "pong"

    run(main())


def test_handshake_timeout_cuts_incomplete_request_head():
    """A client that sends only part of its request head (slowloris) has its TCP connection closed."""

    async def main():
        async with serving(handshake_timeout=1) as server:
            raw = await AsyncRaw.open(server.port)
            await raw.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
            assert await asyncio.wait_for(raw.at_eof(), 10)
            assert raw.buffer == b""  # no response at all: the head never ended
            raw.close()
            await eventually(lambda: not server.connections, what="the connection to be dropped")
            assert server.broker.connections == 0

    run(main())


def test_rate_limit_token_bucket_and_retry_with_same_message_id():
    """With rate 10/s and burst 5, the 6th immediate publish is RATE_LIMITED and not remembered; a later retry is accepted."""
    broker, clock = make_broker(publish_rate=10, publish_burst=5)
    client, _ = fake_client(broker, topics=["t"])
    for i in range(1, 6):
        replies = send(broker, client, {"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i})
        assert replies[-1] == {"type": "ack", "messageId": f"m{i}", "status": "ok", "seqNo": i}
    replies = send(broker, client, {"type": "publish", "topic": "t", "messageId": "m6", "payload": 6, "id": 9})
    assert len(replies) == 1, replies  # no message frame: nothing was processed
    error = replies[0]
    assert (error["type"], error["code"], error["messageId"], error["topic"], error["id"]) == ("error", "RATE_LIMITED", "m6", "t", 9)
    assert broker.seq["t"] == 5 and broker.dedup.get("alice", "m6") is None
    clock.advance(0.05)  # half a token: still refused
    assert send(broker, client, {"type": "publish", "topic": "t", "messageId": "m6"})[0]["code"] == "RATE_LIMITED"
    clock.advance(0.1)
    replies = send(broker, client, {"type": "publish", "topic": "t", "messageId": "m6", "payload": 6})
    assert seqs_of(replies) == [6] and replies[-1] == {"type": "ack", "messageId": "m6", "status": "ok", "seqNo": 6}
    clock.advance(1)
    replies = send(broker, client, {"type": "publish", "topic": "t", "messageId": "m6", "payload": 6})
    assert replies == [{"type": "ack", "messageId": "m6", "status": "duplicate", "seqNo": 6}]
    # The bucket is per connection: another connection of the same user has its own.
    other, _ = fake_client(broker)
    clock.advance(0)
    for i in range(5):
        assert send(broker, other, {"type": "publish", "topic": "u", "messageId": f"o{i}"})[-1]["status"] == "ok"
    assert send(broker, client, {"type": "publish", "topic": "t", "messageId": "m7"})[-1]["status"] == "ok"


def test_connection_limit_503_at_handshake():
    """With max_connections=2, a third WebSocket handshake gets 503; after one closes, a new one is accepted."""

    async def main():
        async with serving(max_connections=2) as server:
            a = await connect(ws_url(server), ping_interval=None)
            b = await connect(ws_url(server), ping_interval=None)
            third = await AsyncRaw.open(server.port)
            status, headers = await third.handshake()
            assert status == 503 and headers.get("retry-after") == "1"
            third.close()
            with pytest.raises(websockets.exceptions.InvalidStatus) as info:
                await connect(ws_url(server), ping_interval=None)
            assert info.value.response.status_code == 503
            status, _, _ = await aio_http_get(server.port, "/healthz")  # plain HTTP is not limited
            assert status == 200
            await a.close()
            await eventually(lambda: server.broker.connections == 1, what="a connection to close")
            async with connect(ws_url(server), ping_interval=None) as c:
                await setup(c, "carol")
            await b.close()

    run(main())


@pytest.mark.parametrize("origin, status", [("Origin: http://evil", 403), ("Origin: http://good", 101), (None, 101)])
def test_allowed_origins(origin, status):
    """With allowed_origins=("http://good",), another Origin gets 403; http://good and no Origin are accepted."""

    async def main():
        async with serving(allowed_origins=("http://good",)) as server:
            raw = await AsyncRaw.open(server.port)
            got, _ = await raw.handshake("/ws", *([origin] if origin else []))
            assert got == status
            if status == 101:
                await raw.setup("alice")
            raw.close()

    run(main())


def test_graceful_shutdown_closes_everyone_with_1001():
    """server.close() sends 1001 to every client (websockets and raw) and leaves no connection behind."""

    async def main():
        async with serving() as server:
            clients = [await connect(ws_url(server), ping_interval=None) for _ in range(3)]
            for i, ws in enumerate(clients):
                await setup(ws, f"u{i}", topics=["t"])
                await recv_json(ws)
            unset = await connect(ws_url(server), ping_interval=None)  # not even set up
            raw = await AsyncRaw.open(server.port)
            assert (await raw.handshake())[0] == 101
            await raw.setup("raw")

            async def raw_answers_close() -> int:
                frame = await asyncio.wait_for(raw.recv_frame(), 10)
                assert frame.opcode == ms.Opcode.CLOSE
                await raw.send(masked(ms.Opcode.CLOSE, frame.payload))
                return ms.parse_close(frame.payload)[0]

            _, raw_code = await asyncio.gather(server.close(), raw_answers_close())
            assert raw_code == 1001
            for ws in clients + [unset]:
                await asyncio.wait_for(ws.wait_closed(), 10)
                assert ws.close_code == 1001
            raw.close()
            assert not server.connections and server.broker.connections == 0
            assert server.broker.disconnects[1001] == 5
            with pytest.raises(OSError):
                await connect(ws_url(server), ping_interval=None, open_timeout=2)  # no longer listening

    run(main())


# === 14. TLS =======================================================================================


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 made with the openssl command line: (certfile, keyfile)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the TLS test needs the openssl command line to make a self-signed certificate")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return str(cert), str(key)


def test_tls_wss_and_https(certificate):
    """With certfile and keyfile, the port serves wss:// (setup and a publish round trip) and https:// (/healthz)."""
    certfile, keyfile = certificate
    context = ssl.create_default_context(cafile=certfile)  # trusts only this certificate; checks the IP

    async def main():
        async with serving(certfile=certfile, keyfile=keyfile) as server:
            assert server.url.startswith("https://")
            url = f"wss://127.0.0.1:{server.port}/ws"
            async with connect(url, ssl=context, ping_interval=None) as ws:
                await setup(ws, "alice", topics=["secure"])
                assert (await recv_json(ws))["type"] == "subscribed"
                await ws.send(json.dumps({"type": "publish", "topic": "secure", "messageId": "s1", "payload": {"x": 1}}))
                msg, ack = await recv_json(ws), await recv_json(ws)
                assert (msg["type"], msg["seqNo"], msg["data"]) == ("message", 1, {"x": 1})
                assert ack == {"type": "ack", "messageId": "s1", "status": "ok", "seqNo": 1}

            def https_get(path: str) -> tuple[int, bytes]:
                with urllib.request.urlopen(f"https://127.0.0.1:{server.port}{path}", context=context, timeout=10) as response:
                    return response.status, response.read()

            assert await asyncio.to_thread(https_get, "/healthz") == (200, b"ok\n")
            status, body = await asyncio.to_thread(https_get, "/stats")
            assert status == 200 and json.loads(body)["published"] == 1
            # Plain text on the TLS port gets no HTTP answer.
            raw = await AsyncRaw.open(server.port)
            await raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert await asyncio.wait_for(raw.at_eof(), 10) and b"200 OK" not in raw.buffer
            raw.close()

    run(main())


# === 12. Metrics ===================================================================================


def test_metrics_prometheus_format_and_values():
    """/metrics parses with prometheus_client and counts connections, messages, errors, disconnects and both latencies."""
    parser = pytest.importorskip("prometheus_client.parser", reason="the /metrics format check needs prometheus_client")

    async def main():
        async with serving() as server:
            async with connect(ws_url(server), ping_interval=None) as alice:
                await setup(alice, "alice", topics=["t", "u"])
                await recv_json(alice), await recv_json(alice)
                for i in (1, 2, 3):
                    await alice.send(json.dumps({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i}))
                    assert (await recv_json(alice))["type"] == "message"
                    assert (await recv_json(alice))["status"] == "ok"
                    await alice.send(json.dumps({"type": "ack", "topic": "t", "seqNo": i}))
                assert (await request(alice, {"type": "publish", "topic": "t", "messageId": "m1"}))["status"] == "duplicate"
                assert (await request(alice, {"type": "subscribe", "topic": "bad topic"}))["code"] == "INVALID_TOPIC"
                assert (await request(alice, {"type": "nope"}))["code"] == "UNKNOWN_TYPE"
                assert (await request(alice, {"type": "subscribe", "topic": "bad topic"}))["code"] == "INVALID_TOPIC"
                await alice.send(json.dumps({"type": "replay", "topic": "t", "fromSeq": 2}))
                assert [(await recv_json(alice))["type"] for _ in range(3)] == ["message", "message", "replayed"]
                async with connect(ws_url(server), ping_interval=None) as bob:  # closes normally: 1000
                    await setup(bob, "bob", topics=["t"])
                await eventually(lambda: server.broker.disconnects[1000] == 1, what="bob's close to be counted")

                status, headers, body = await aio_http_get(server.port, "/metrics")
                stats = await get_json(server.port, "/stats")
            return status, headers, body.decode(), stats

    status, headers, text, stats = run(main())
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}

    def value(name: str, sample: str = "", **labels: str) -> float:
        """The one sample of family `name` (its `name + sample` series) with exactly these labels."""
        family = families[name]
        wanted = name + (sample or ("_total" if family.type == "counter" else ""))
        matches = [s.value for s in family.samples if s.name == wanted and s.labels == labels]
        assert len(matches) == 1, (name, labels, family.samples)
        return matches[0]

    for name in ("connections", "topics", "subscriptions", "sessions"):
        assert families[f"microsocket_{name}"].type == "gauge"
    assert value("microsocket_connections") == 1 and value("microsocket_topics") == 2
    assert value("microsocket_subscriptions") == 2 and value("microsocket_sessions") == 2  # bob's is resumable
    for name in ("published", "delivered", "replayed", "duplicates", "errors", "disconnects"):
        assert families[f"microsocket_{name}"].type == "counter", name
    assert value("microsocket_published") == 3 and value("microsocket_delivered") == 3
    assert value("microsocket_replayed") == 2 and value("microsocket_duplicates") == 1
    assert value("microsocket_errors", code="INVALID_TOPIC") == 2 and value("microsocket_errors", code="UNKNOWN_TYPE") == 1
    assert value("microsocket_disconnects", code="1000") == 1
    for name, count in (("delivery_latency_seconds", 3), ("ack_latency_seconds", 3)):
        family = families[f"microsocket_{name}"]
        assert family.type == "histogram"
        buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
        bounds = [float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and buckets[-1][0] == "+Inf"
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets are not cumulative"
        assert counts[-1] == value(f"microsocket_{name}", "_count") == count
        assert value(f"microsocket_{name}", "_sum") >= 0
    for kind in ("delivery", "ack"):
        summary = stats["latency"][kind]
        assert summary["count"] == 3
        assert 0 <= summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"], summary
    assert (stats["connections"], stats["topics"], stats["subscriptions"]) == (1, 2, 2)


def test_metrics_latency_histograms_are_bounded_and_percentiles_sane():
    """The latency histograms keep fixed buckets however many observations, and percentiles follow the data."""
    broker, clock = make_broker()
    client, _ = fake_client(broker, topics=["t"])
    for i in range(2000):
        broker.publish("p", "t", f"m{i}", i)
        clock.advance(0.002 if i % 10 else 0.2)  # 90 % take 2 ms, 10 % take 200 ms
        broker.flushed(clock())
        take(client)
    summary = broker.stats()["latency"]["delivery"]
    assert summary["count"] == 2000 and len(broker.delivery_latency.counts) == len(ms.Histogram.BOUNDS) + 1
    assert 1 <= summary["p50_ms"] <= 2.5 and 100 <= summary["p99_ms"] <= 250
    assert broker.stats()["latency"]["ack"] == {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None}


# === Robustness ================================================================================
#
# The property test below runs a reference model of the broker beside a real sans-I/O Broker and
# compares, after every step, every frame each fake connection received, plus the counters. The
# model is written from the SPEC and README (positions, history bounds, takeover, TTL), not from the
# code's data structures.

PROP_TOPICS = ("a", "b", "c")
PROP_USERS = ("u0", "u1")
PROP_SLOTS = 4
PROP_TTL = 5


class BrokerModel:
    """A fake-clock Broker, up to PROP_SLOTS fake connections, and what the SPEC says each should see."""

    def __init__(self, history: int) -> None:
        self.broker, self.clock = make_broker(
            history_messages=history, history_age=1e9, dedup_window=1e9, publish_rate=0, session_ttl=PROP_TTL
        )
        self.history = history
        self.slots: list[dict | None] = [None] * PROP_SLOTS  # {"client", "user", "session", "topics", "live"}
        self.sessions: dict[str, dict] = {}  # id -> {"user", "slot", "positions": {t: [start, acked, handed]}, "detached_at"}
        self.known_ids: list[str] = []  # every sessionId ever handed out, for resume attempts
        self.latest: dict[str, int] = {}
        self.dedup: dict[tuple[str, str], int] = {}
        # (sessionId, topic) -> [start, seqNos received, exact]: while exact, the seqNos must be
        # start+1, start+2, ... with no gap and no repeat, across the connections of that session.
        self.streams: dict[tuple[str, str], list] = {}
        self.server_ids = 0

    # -- model helpers

    def oldest(self, topic: str) -> int | None:
        latest = self.latest.get(topic, 0)
        return max(1, latest - self.history + 1) if latest else None

    def expire(self) -> None:
        now = self.clock()
        for sid, s in list(self.sessions.items()):
            if s["slot"] is None and now - s["detached_at"] >= PROP_TTL:
                del self.sessions[sid]

    def detach(self, slot: int, reliable: bool) -> None:
        conn = self.slots[slot]
        session = self.sessions.get(conn["session"])
        if session is not None and session["slot"] == slot:
            for topic, position in session["positions"].items():
                position[2] = self.latest.get(topic, 0) if reliable else None
            session["slot"] = None
            session["detached_at"] = self.clock()
            self.expire()
        self.slots[slot] = None

    def received(self, slot: int, messages: list[dict], replay: bool) -> None:
        """Record message frames a connection got: per-topic live order, and its session's streams."""
        conn = self.slots[slot]
        for m in messages:
            if m["type"] != "message":
                continue
            topic, seq = m["topic"], m["seqNo"]
            if not replay:
                assert seq > conn["live"].get(topic, 0), f"live {topic} seqNo {seq} after {conn['live'].get(topic)}"
                conn["live"][topic] = seq
            stream = self.streams.get((conn["session"], topic))
            if stream is not None:
                stream[1].append(seq)

    def subscribed(self, slot: int, topic: str) -> None:
        conn = self.slots[slot]
        if topic in conn["topics"]:
            return
        conn["topics"].add(topic)
        latest = self.latest.get(topic, 0)
        self.sessions[conn["session"]]["positions"].setdefault(topic, [latest, 0, None])
        self.streams[(conn["session"], topic)] = [latest, [], True]

    # -- the steps

    def step(self, action: tuple) -> None:
        kind, args = action[0], action[1:]
        if kind not in ("connect", "disconnect", "server_publish", "tick") and self.slots[args[0]] is None:
            # An action on a slot with no connection first opens one (as that slot's usual user):
            # a reconnecting client, which keeps the random walk among live connections.
            self.do_connect(args[0], PROP_USERS[args[0] % 2], [])
            self.check()
        getattr(self, "do_" + kind)(*args)
        self.check()

    def do_connect(self, slot: int, user: str, topics: list[str]) -> None:
        conn = self.slots[slot]
        if conn is not None:  # a second setup on the same connection
            replies = send(self.broker, conn["client"], {"type": "setup", "token": user})
            assert [(r["type"], r["code"]) for r in replies] == [("error", "ALREADY_SETUP")]
            return
        client = ms.Client(self.broker)
        self.broker.connect(client)
        replies = send(self.broker, client, {"type": "setup", "token": user, "topics": topics})
        ready = replies[0]
        assert (ready["type"], ready["userId"], ready["epoch"]) == ("ready", user, self.broker.epoch)
        sid = ready["sessionId"]
        assert sid not in self.known_ids
        self.known_ids.append(sid)
        self.sessions[sid] = {"user": user, "slot": slot, "positions": {}, "detached_at": 0.0}
        self.slots[slot] = {"client": client, "user": user, "session": sid, "topics": set(), "live": {}}
        unique = list(dict.fromkeys(topics))
        assert replies[1:] == [{"type": "subscribed", "topic": t, "seqNo": self.latest.get(t, 0)} for t in unique]
        for topic in unique:
            self.subscribed(slot, topic)

    def do_subscribe(self, slot: int, topic: str) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        replies = send(self.broker, conn["client"], {"type": "subscribe", "topic": topic})
        assert replies == [{"type": "subscribed", "topic": topic, "seqNo": self.latest.get(topic, 0)}]
        self.subscribed(slot, topic)

    def do_unsubscribe(self, slot: int, topic: str) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        replies = send(self.broker, conn["client"], {"type": "unsubscribe", "topic": topic})
        assert replies == [{"type": "unsubscribed", "topic": topic}]
        if topic in conn["topics"]:
            conn["topics"].discard(topic)
            self.sessions[conn["session"]]["positions"].pop(topic)
            del self.streams[(conn["session"], topic)]

    def _fan_out(self, topic: str, message_id: str, data, publisher: int | None) -> tuple[dict, dict[int, list[dict]]]:
        """Publish in the model: (the ack, the frames each other live slot must have received)."""
        user = self.slots[publisher]["user"] if publisher is not None else "server"
        key = (user, message_id)
        if key in self.dedup:
            return {"type": "ack", "messageId": message_id, "status": "duplicate", "seqNo": self.dedup[key]}, {}
        seq = self.latest[topic] = self.latest.get(topic, 0) + 1
        self.dedup[key] = seq
        frame = {"type": "message", "topic": topic, "seqNo": seq, "messageId": message_id, "data": data}
        expected = {i: [frame] for i, c in enumerate(self.slots) if c is not None and topic in c["topics"]}
        return {"type": "ack", "messageId": message_id, "status": "ok", "seqNo": seq}, expected

    def _check_fan_out(self, expected: dict[int, list[dict]], skip: int | None) -> None:
        for i, conn in enumerate(self.slots):
            if conn is None or i == skip:
                continue
            got = take(conn["client"])
            assert got == expected.get(i, []), f"slot {i}: {got} != {expected.get(i, [])}"
            self.received(i, got, replay=False)

    def do_publish(self, slot: int, topic: str, k: int) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        message_id = f"m{k}"
        ack, expected = self._fan_out(topic, message_id, k, slot)
        replies = send(self.broker, conn["client"], {"type": "publish", "topic": topic, "messageId": message_id, "payload": k})
        assert replies == expected.get(slot, []) + [ack]
        self.received(slot, replies, replay=False)
        self._check_fan_out(expected, skip=slot)

    def do_server_publish(self, topic: str) -> None:
        self.server_ids += 1
        message_id = f"s{self.server_ids}"
        ack, expected = self._fan_out(topic, message_id, None, None)
        result = self.broker.publish("server", topic, message_id, None)
        assert (result.status, result.seq_no, result.subscribers) == (ack["status"], ack["seqNo"], len(expected))
        self._check_fan_out(expected, skip=None)

    def do_ack(self, slot: int, topic: str, back: int) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        if conn["topics"]:  # mostly ack a topic it receives, as a client does
            mine = sorted(conn["topics"])
            topic = mine[PROP_TOPICS.index(topic) % len(mine)]
        seq = max(0, self.latest.get(topic, 0) - back)
        assert send(self.broker, conn["client"], {"type": "ack", "topic": topic, "seqNo": seq}) == []
        position = self.sessions[conn["session"]]["positions"].get(topic)
        if position is not None and position[1] < seq <= self.latest.get(topic, 0):
            position[1] = seq

    def do_replay(self, slot: int, topic: str, back: int) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        latest = self.latest.get(topic, 0)
        from_seq = max(1, latest + 1 - back)
        replies = send(self.broker, conn["client"], {"type": "replay", "topic": topic, "fromSeq": from_seq})
        oldest = self.oldest(topic)
        if from_seq <= latest and (oldest is None or from_seq < oldest):
            assert replies == [{"type": "error", "code": "REPLAY_UNAVAILABLE", "message": replies[0].get("message"),
                                "topic": topic, "oldestSeq": oldest or latest + 1}]
            return
        assert seqs_of(replies) == list(range(from_seq, latest + 1)) and len(replies) == latest - from_seq + 2
        assert replies[-1] == {"type": "replayed", "topic": topic, "fromSeq": from_seq, "toSeq": latest}
        # A replay on request is the client's own business: not part of its live order or its session's stream.

    def do_resume(self, slot: int, index: int, give_last: bool) -> None:
        conn = self.slots[slot]
        if conn is None or not self.known_ids:
            return
        # Mostly a session of this user (the interesting case), sometimes anyone's, or an unknown id.
        mine = [s for s in self.known_ids if s in self.sessions and self.sessions[s]["user"] == conn["user"]]
        candidates = mine * 3 + self.known_ids + ["bogus"]
        sid = candidates[index % len(candidates)]
        self.expire()
        target = self.sessions.get(sid)
        given = {}
        if target is not None and give_last:
            for topic in target["positions"]:
                start, got, _ = self.streams[(sid, topic)]
                given[topic] = got[-1] if got else start
        msg = {"type": "resume", "sessionId": sid}
        if give_last:
            msg["lastSeqPerTopic"] = given
        if target is None or target["user"] != conn["user"]:
            replies = send(self.broker, conn["client"], msg)
            assert [(r["type"], r["code"]) for r in replies] == [("error", "SESSION_EXPIRED")], replies
            return
        other = target["slot"] if target["slot"] != slot else None  # resuming its own session: no take-over
        other_client = self.slots[other]["client"] if other is not None else None
        if other is not None:  # take-over: the other connection goes, its positions are "handed"
            self.detach(other, reliable=True)
        own = self.sessions[conn["session"]]
        topics = list(dict.fromkeys(list(target["positions"]) + list(given) + sorted(conn["topics"])))
        expected_frames: dict[str, list[int]] = {}
        missed = []
        positions = {}
        for topic in topics:
            latest = self.latest.get(topic, 0)
            if topic in given:
                after = given[topic]
            elif topic in target["positions"]:
                start, acked, handed = target["positions"][topic]
                after = acked or (handed if handed is not None else start)
            else:
                after = own["positions"][topic][0]
            upto = own["positions"][topic][0] if topic in conn["topics"] else latest
            acked = target["positions"][topic][1] if topic in target["positions"] else 0
            positions[topic] = [upto, acked, None]
            frames = []
            if after < upto:
                oldest = self.oldest(topic)
                if oldest is None or after + 1 < oldest:
                    missed.append({"topic": topic, "fromSeq": after + 1, "oldestSeq": oldest if oldest is not None else latest + 1})
                if oldest is not None:
                    frames = list(range(max(after + 1, oldest), upto + 1))
            expected_frames[topic] = frames
        replies = send(self.broker, conn["client"], msg)
        if other_client is not None:
            assert other_client.close_request == ms.CloseCode.SESSION_TAKEN_OVER and other_client.broker is None
            assert take(other_client) == []
        resumed = replies[-1]
        assert resumed["type"] == "resumed" and all(r["type"] == "message" for r in replies[:-1]), replies
        for topic in topics:
            assert seqs_of(replies[:-1], topic) == expected_frames[topic], (topic, replies)
        assert (resumed["sessionId"], sorted(resumed["topics"]), resumed["replayed"]) == (
            sid, sorted(topics), sum(len(f) for f in expected_frames.values()))
        assert sorted(resumed["missed"], key=lambda m: m["topic"]) == sorted(missed, key=lambda m: m["topic"])
        # The connection now holds the resumed session; its own one from setup is gone.
        old_topics = set(conn["topics"])
        if conn["session"] != sid:
            del self.sessions[conn["session"]]
        for topic in topics:
            stream = self.streams.pop((conn["session"], topic), None)
            if topic in old_topics:  # it already received this topic live: order differs, the set does not
                stream = self.streams.get((sid, topic)) or stream
                if stream is not None:
                    stream[2] = False
                self.streams[(sid, topic)] = stream if stream is not None else [positions[topic][0], [], False]
            elif (sid, topic) not in self.streams:
                self.streams[(sid, topic)] = [given.get(topic, positions[topic][0]), [], True]
            if topic not in given or any(m["topic"] == topic for m in missed):
                self.streams[(sid, topic)][2] = False
        conn["session"] = sid
        conn["topics"] = set(topics)
        target["positions"] = positions
        target["slot"] = slot
        self.received(slot, replies[:-1], replay=True)

    def do_disconnect(self, slot: int, reliable: bool) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        assert take(conn["client"]) == []
        self.broker.disconnect(conn["client"], reliable)
        self.detach(slot, reliable)

    def do_tick(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self.broker.expire_sessions()  # the server's sweep
        self.expire()

    # -- after every step

    def check(self) -> None:
        broker = self.broker
        live = [c for c in self.slots if c is not None]
        for conn in live:
            assert conn["client"].out == [], "a frame nobody expected"
            assert conn["client"].topics == conn["topics"]
        stats = broker.stats()
        recount_subs = sum(len(c["topics"]) for c in live)
        recount_topics = len(set().union(*(c["topics"] for c in live))) if live else 0
        assert (stats["connections"], stats["subscriptions"], stats["topics"]) == (len(live), recount_subs, recount_topics)
        assert {t: {id(c) for c in subs} for t, subs in broker.topics.subscribers.items()} == {
            t: {id(c["client"]) for c in live if t in c["topics"]} for t in set().union(*(c["topics"] for c in live))
        } if live else broker.topics.subscribers == {}
        assert set(broker.sessions) == set(self.sessions) and stats["sessions"] == len(self.sessions)
        for sid, session in self.sessions.items():
            real = broker.sessions[sid]
            assert real.user_id == session["user"]
            assert (real.client is None) == (session["slot"] is None)
            if session["slot"] is not None:
                assert real.client is self.slots[session["slot"]]["client"]
            assert {t: list(p) for t, p in real.positions.items()} == session["positions"]
        for (sid, topic), (start, got, exact) in self.streams.items():
            if exact:
                assert got == list(range(start + 1, start + 1 + len(got))), f"{sid} {topic}: after {start}: {got}"
        assert broker.seq == {t: n for t, n in self.latest.items()}


def test_broker_property_random_sessions_keep_order_and_continuity():
    """Random setup/subscribe/unsubscribe/publish/ack/replay/resume/disconnect steps from 4 clients on 3 topics match the SPEC's model."""
    pytest.importorskip("hypothesis", reason="the property test needs hypothesis (pip install hypothesis)")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    slot = st.integers(0, PROP_SLOTS - 1)
    topic = st.sampled_from(PROP_TOPICS)
    action = st.one_of(
        st.tuples(st.just("connect"), slot, st.sampled_from(PROP_USERS), st.lists(topic, max_size=3)),
        st.tuples(st.just("subscribe"), slot, topic),
        st.tuples(st.just("unsubscribe"), slot, topic),
        st.tuples(st.just("publish"), slot, topic, st.integers(0, 7)),
        st.tuples(st.just("server_publish"), topic),
        st.tuples(st.just("server_publish"), topic),  # twice: publishing is the common case
        st.tuples(st.just("ack"), slot, topic, st.integers(-1, 4)),
        st.tuples(st.just("replay"), slot, topic, st.integers(0, 8)),
        st.tuples(st.just("resume"), slot, st.integers(0, 30), st.booleans()),
        st.tuples(st.just("disconnect"), slot, st.booleans()),
        st.tuples(st.just("tick"), st.sampled_from([0, 1, 2, 5])),
    )

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(history=st.sampled_from([3, 1000]), actions=st.lists(action, min_size=20, max_size=60))
    def check(history, actions):
        model = BrokerModel(history)
        for act in actions:
            model.step(act)

    check()


def _random_client_bytes(rng: random.Random) -> bytes:
    """Client-ish bytes: mostly well-formed masked frames of every opcode, some damaged, some noise, maybe cut short."""
    parts = []
    for _ in range(rng.randint(1, 6)):
        roll = rng.random()
        if roll < 0.1:
            parts.append(rng.randbytes(rng.randint(0, 40)))
            continue
        opcode = rng.choice([0x0, 0x1, 0x1, 0x2, 0x8, 0x9, 0xA, 0x3, 0xB])
        kind = rng.random()
        if opcode == 0x8 and kind < 0.5:
            payload = rng.choice([1000, 1001, 1005, 1006, 999, 4000, 5000]).to_bytes(2, "big") + rng.choice([b"", b"bye", b"\xff"])
        elif kind < 0.4:
            payload = "".join(rng.choice("aé€😀{}\"") for _ in range(rng.randint(0, 50))).encode()
        else:
            payload = rng.randbytes(rng.choice([0, 1, 5, 125, 126, 200, 300]))
        fin = rng.random() < 0.8
        mask = rng.randbytes(4) if rng.random() < 0.95 else None
        frame = bytearray(ms.serialize_frame(opcode, payload, fin, mask))
        if rng.random() < 0.15:
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        parts.append(bytes(frame))
    data = b"".join(parts)
    if rng.random() < 0.3:
        data = data[: rng.randint(0, len(data))]
    return data


def _feed(data: bytes, chunks: list[int], max_size: int) -> tuple[list, str, int | None, int | None, bytes]:
    conn = ms.WebSocketConnection(max_size)
    events = []
    pos = 0
    for size in chunks + [len(data)]:
        events += conn.receive_data(data[pos : pos + size])
        pos += size
    return events, conn.state, conn.close_sent, conn.close_code, conn.data_to_send()


def test_fuzz_websocket_connection_receive_data():
    """Random and truncated client bytes (3000 seeds), whole or in random chunks, raise nothing and end OPEN or CLOSED with 1002/1007/1009 or an echoed close."""
    for seed in range(3000):
        rng = random.Random(seed)
        data = _random_client_bytes(rng)
        max_size = rng.choice([64, 1 << 20])
        whole = _feed(data, [], max_size)
        cuts = [rng.randint(0, 7) for _ in range(rng.randint(0, 30))]
        chunked = _feed(data, cuts, max_size)
        assert whole == chunked, f"seed {seed}: the result depends on how the bytes were split"
        events, state, close_sent, close_code, out = whole
        assert state in (ms.OPEN, ms.CLOSED), (seed, state)
        for opcode, payload in events:
            assert (opcode, type(payload)) in ((ms.Opcode.TEXT, str), (ms.Opcode.BINARY, bytes), (ms.Opcode.PONG, bytes)), seed
        if state == ms.OPEN:
            assert (close_sent, out) == (None, b""), seed
        elif close_sent is not None:  # we failed the connection
            assert close_sent in (1002, 1007, 1009), (seed, close_sent)
            assert parse_frames(out) and ms.parse_close(parse_frames(out)[-1].payload)[0] == close_sent
        else:  # the peer closed: its close frame is echoed
            assert close_code is not None and ms.Frame.parse(out)[0].opcode == ms.Opcode.CLOSE, seed


def test_fuzz_frame_parse_raises_only_protocol_errors():
    """Frame.parse on random bytes (5000 seeds) returns None or a frame, or raises ProtocolError, nothing else."""
    outcomes = set()
    for seed in range(5000):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randint(0, 20)) if seed % 2 else _random_client_bytes(rng)
        try:
            parsed = ms.Frame.parse(data, max_size=rng.choice([None, 100]))
        except ms.ProtocolError as exc:
            assert exc.code in (1002, 1009), exc
            outcomes.add(exc.code)
            continue
        outcomes.add(None if parsed is None else "frame")
        if parsed is not None:
            frame, used = parsed
            assert 2 <= used <= len(data) and len(frame.payload) <= used
    assert outcomes == {None, "frame", 1002, 1009}  # every outcome was exercised


def test_payload_nested_to_the_decoder_limit_is_never_internal_error():
    """A publish whose payload nests as deep as JSON decoding allows is accepted or refused, never INTERNAL_ERROR, and a refusal publishes nothing."""
    broker, _ = make_broker()
    client, _ = fake_client(broker)
    outcomes = set()
    for depth in range(900, 1100):
        before = broker.seq.get("t", 0)
        nested = "[" * depth + "]" * depth
        broker.handle(client, f'{{"type":"publish","topic":"t","messageId":"d{depth}","payload":{nested}}}')
        reply = take(client)[-1]
        outcomes.add(reply.get("code", reply["type"]))
        if reply["type"] == "error":
            assert broker.seq.get("t", 0) == before and broker.dedup.get("alice", f"d{depth}") is None
    assert "INTERNAL_ERROR" not in outcomes and outcomes <= {"ack", "INVALID_MESSAGE", "INVALID_JSON"}
    assert {"ack", "INVALID_JSON"} <= outcomes


_FUZZ_TOPICS = ["t", "u", "t", "u", "", "a b", "x*", "é", "t" * 300, "\x00"]
_FUZZ_REQUIRED = {"setup": ["token"], "subscribe": ["topic"], "unsubscribe": ["topic"], "presence": ["topic"],
                  "publish": ["topic", "messageId"], "replay": ["topic", "fromSeq"], "resume": ["sessionId"],
                  "ack": ["topic", "seqNo"], "refresh": ["token"]}


def _fuzz_value(rng: random.Random, depth: int = 0):
    """Any JSON value (integers within 2**62: a huge fromSeq hits the bug of test_replay_huge_from_seq_is_answered_replayed)."""
    roll = rng.random()
    if roll < 0.1 and depth < 3:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.2 and depth < 3:
        return {rng.choice(["t", "u", "k", ""]): _fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([
        None, True, False, 0, -1, 1, 7, 2**62, -(2**62), 1.5, -0.0, 1e300, "", "t", "u", "a b", "é",
        "x" * rng.randint(0, 300), "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 8))),
    ])


def _fuzz_message(rng: random.Random, session: str, epoch: str) -> str:
    """JSON-ish text: mostly messages of a real type with mostly well-formed fields, sometimes anything."""
    roll = rng.random()
    if roll < 0.05:
        return "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(0, 30)))  # not JSON (mostly)
    if roll < 0.08:
        return rng.choice(["NaN", '{"type": Infinity}', "[" * 5000 + "]" * 5000, '{"type":"ping"', "1e999", '"\ud800"'])
    if roll < 0.13:
        return json.dumps(_fuzz_value(rng))
    kind = rng.choice(sorted(ms.CLIENT_TYPES)) if rng.random() < 0.9 else _fuzz_value(rng)
    good = {
        "id": lambda: rng.choice([1, "a", 0, 3.5]),
        "token": lambda: rng.choice(["alice", "bob", "alice"]),
        "topic": lambda: rng.choice(_FUZZ_TOPICS),
        "topics": lambda: rng.sample(_FUZZ_TOPICS, rng.randint(0, 3)),
        "messageId": lambda: rng.choice(["m1", "m2", "m3", "x" * 300]),
        "payload": lambda: _fuzz_value(rng),
        "fromSeq": lambda: rng.randint(-1, 9),
        "epoch": lambda: rng.choice([epoch, "old"]),
        "sessionId": lambda: rng.choice([session, session, "nope"]),
        "lastSeqPerTopic": lambda: {rng.choice(_FUZZ_TOPICS): rng.randint(-1, 9) for _ in range(rng.randint(0, 2))},
        "seqNo": lambda: rng.randint(-1, 9),
    }
    msg = {"type": kind}
    needed = _FUZZ_REQUIRED.get(kind, []) if isinstance(kind, str) else []
    for field, make in good.items():
        if field in needed or rng.random() < 0.15:
            msg[field] = make() if rng.random() < 0.8 else _fuzz_value(rng)
    if rng.random() < 0.05:
        del msg["type"]
    return json.dumps(msg)


def test_fuzz_broker_random_json_gives_only_spec_error_codes():
    """Random JSON-ish text (400 seeds x 30 messages, two clients) into Broker.handle gets only SPEC replies, never INTERNAL_ERROR."""
    seen = set()
    for seed in range(400):
        rng = random.Random(seed)
        broker, clock = make_broker(history_messages=5)
        gone, ready = fake_client(broker, "alice", topics=["t"])  # a detached session to resume
        publish_n(broker, "t", 7)
        detach(broker, gone)
        clients = [fake_client(broker, None)[0], fake_client(broker, None)[0]]
        for client, token in zip(clients, ("alice", "bob")):
            if rng.random() < 0.8:
                send(broker, client, {"type": "setup", "token": token})
        for _ in range(30):
            text = _fuzz_message(rng, ready["sessionId"], broker.epoch)
            who = rng.randrange(2)
            if clients[who].broker is None:  # taken over by the other's resume: it reconnects
                clients[who] = fake_client(broker, None)[0]
            broker.handle(clients[who], text)
            clock.advance(rng.choice([0, 0.5, 200]))
            for client in clients:
                for reply in take(client) if client.broker is not None else []:
                    assert reply["type"] in ms.SERVER_TYPES, (seed, text, reply)
                    seen.add(reply.get("code", reply["type"]))
                    if reply["type"] == "error":
                        assert reply["code"] in ms.ERROR_CODES and reply["code"] != "INTERNAL_ERROR", (seed, text, reply)
                        assert isinstance(reply["message"], str)
            live = [c for c in clients if c.broker is not None]
            stats = broker.stats()
            assert stats["subscriptions"] == sum(len(c.topics) for c in live), seed
            assert stats["topics"] == len(set().union(*(c.topics for c in live))), seed
    # The fuzz reached every reply a client can get without JWT, ACLs or a backbone.
    assert seen >= {"ready", "subscribed", "unsubscribed", "ack", "message", "replayed", "resumed", "refreshed",
                    "presence", "pong", "AUTH_REQUIRED", "AUTH_FAILED", "ALREADY_SETUP", "INVALID_JSON", "UNKNOWN_TYPE",
                    "INVALID_MESSAGE", "INVALID_TOPIC", "SESSION_EXPIRED", "REPLAY_UNAVAILABLE"}, seen


# -- churn and killed clients

_CHURN_SETUP = masked(ms.Opcode.TEXT, b'{"type":"setup","token":"churn","topics":["t","u"]}')
_CHURN_CLOSE = masked(ms.Opcode.CLOSE, ms.serialize_close(1000))


async def _churn_one(port: int) -> None:
    """Handshake and setup in one write, wait for ready + 2 subscribed, close, read to EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode() + _CHURN_SETUP
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        data = b""
        while data.count(b'"type"') < 3:  # ready, subscribed t, subscribed u
            chunk = await reader.read(4096)
            assert chunk, data
            data += chunk
        writer.write(_CHURN_CLOSE)
        rest = await reader.read()  # the echoed close, then EOF: the server closes TCP first
        assert ms.parse_close(ms.Frame.parse(rest)[0].payload)[0] == 1000
    finally:
        writer.close()


async def _churn(port: int, total: int, batch: int = 200) -> None:
    for _ in range(0, total, batch):
        await asyncio.gather(*(_churn_one(port) for _ in range(batch)))


def test_churn_10000_connections_leaves_stats_at_zero_and_memory_flat():
    """10,000 connections (200 at a time) open, set up and close; /stats returns to 0 and memory grows < 1 MiB."""

    async def main():
        async with serving(session_ttl=0) as server:  # sessions would be kept for their TTL otherwise
            await _churn(server.port, 1000)  # warm-up: caches, free lists, the loop's own structures
            await eventually(lambda: not server.connections, what="warm-up connections to go")
            gc.collect()
            tracemalloc.start()
            try:
                await _churn(server.port, 9000)
                await eventually(lambda: not server.connections, what="churned connections to go")
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            stats = await get_json(server.port, "/stats")
            assert (stats["connections"], stats["topics"], stats["subscriptions"], stats["sessions"]) == (0, 0, 0, 0)
            assert server.broker.disconnects == {1000: 10_000}
            # Bound: < 1 MiB for 9,000 connections, about 116 bytes each: less than one leaked
            # connection object, session or subscription per connection (each is bigger than that).
            assert grown < 1 << 20, f"memory grew by {grown} bytes over 9,000 connections"

    run(main(), timeout=55)


async def _linger_reset(raw: AsyncRaw) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0): a killed client's usual goodbye."""
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_clients_killed_mid_frame_and_mid_handshake_leave_no_state(reset):
    """Clients killed mid-frame, mid-handshake, before setup and mid-close leave connections and subscriptions at 0."""

    async def kill(raw: AsyncRaw) -> None:
        if reset:
            await _linger_reset(raw)
        else:
            raw.close()

    async def main():
        async with serving() as server:
            broker = server.broker
            sessions = []
            for cut in (1, 2, 5, 7, 60):  # mid-frame: a subscribed client sends part of a frame, then dies
                raw = await AsyncRaw.open(server.port)
                assert (await raw.handshake())[0] == 101
                ready = await raw.setup("alice", topics=["t", f"own{cut}"])
                sessions.append(ready["sessionId"])
                frame = masked(ms.Opcode.TEXT, json.dumps({"type": "publish", "topic": "t", "messageId": "x", "payload": "y" * 100}).encode())
                await raw.send(frame[:cut])
                await kill(raw)
            for part in (b"GET", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr", b"GET /ws HTTP/1.1\r\n"):  # mid-handshake
                raw = await AsyncRaw.open(server.port)
                await raw.send(part)
                await kill(raw)
            raw = await AsyncRaw.open(server.port)  # after the 101, before setup
            assert (await raw.handshake())[0] == 101
            await kill(raw)
            raw = await AsyncRaw.open(server.port)  # half a close frame
            assert (await raw.handshake())[0] == 101
            await raw.setup("bob", topics=["t"])
            await raw.send(masked(ms.Opcode.CLOSE, ms.serialize_close(1000))[:3])
            await kill(raw)
            server.publish("t", "to nobody")  # a write to dead connections must not revive anything
            await eventually(lambda: not server.connections, what="every killed connection to be dropped")
            stats = await get_json(server.port, "/stats")
            assert (stats["connections"], stats["topics"], stats["subscriptions"]) == (0, 0, 0)
            assert broker.topics.subscribers == {} and broker.dirty == []
            assert all(broker.sessions[s].client is None for s in sessions)  # resumable, not attached
            assert sum(broker.disconnects.values()) == 7 and broker.disconnects[1006] == 7

    run(main())


# === Browser: the /docs console in Chromium =======================================================
#
# Chromium (Debian's `chromium`) driven by the `playwright` package through executable_path; never
# `playwright install`. Playwright's sync API cannot run inside an asyncio loop, so the server runs
# in its own thread (thread_server). Every wait is one of Playwright's, with a timeout.

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


def in_server_loop(server, fn):
    """Run fn() in the server's event loop thread and return its result."""

    async def call():
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), server.loop).result(5)


def test_browser_console_publish_drop_resume(tmp_path):
    """In Chromium the console connects, sets up, subscribes, publishes, and after two drops resumes with the missed messages."""
    with thread_server() as server, console_page(server.port, tmp_path) as (page, expect):
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
        status, _, body = http_get(port, "/demo/publish/prices?missed=first")
        assert status == 200 and json.loads(body)["seqNo"] == 2
        page.click("#resume")
        expect(log_entry(page, "resumed", session_id)).to_have_count(1)
        expect(log_entry(page, "message", '"missed":"first"')).to_have_count(1)
        assert '"replayed":1' in log_entry(page, "resumed").inner_text()

        # Drop 2: the server closes the connection (1001); a server-side publish meanwhile; resume again.
        in_server_loop(server, lambda: [c.close_websocket(1001, "test drop") for c in list(server.connections)])
        expect(page.locator("#state")).to_have_text("closed")
        expect(page.locator("#close-info")).to_contain_text("1001")
        expect(page.locator("#close-info")).to_contain_text("test drop")
        assert in_server_loop(server, lambda: server.publish("prices", {"missed": "second"})).seq_no == 3
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


def test_browser_console_gap_and_json_errors(tmp_path):
    """In Chromium the console highlights a seqNo gap and says where a payload's JSON is invalid."""
    with thread_server() as server, console_page(server.port, tmp_path) as (page, expect):
        page.uncheck("#auto")  # no automatic replay, so the gap stays visible
        page.click("#connect")
        expect(page.locator("#state")).to_have_text("open")
        send_form(page, "setup")
        expect(log_entry(page, "ready")).to_have_count(1)
        send_form(page, "subscribe")
        expect(log_entry(page, "subscribed")).to_have_count(1)
        http_get(server.port, "/demo/publish/prices?n=1")
        expect(log_entry(page, "message", '"n":"1"')).to_have_count(1)
        send_form(page, "unsubscribe")
        expect(log_entry(page, "unsubscribed")).to_have_count(1)
        http_get(server.port, "/demo/publish/prices?n=2")  # missed: seqNo 2
        send_form(page, "subscribe")
        expect(log_entry(page, "subscribed")).to_have_count(2)
        http_get(server.port, "/demo/publish/prices?n=3")
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
