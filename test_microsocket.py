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
