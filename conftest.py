"""Shared helpers and fixtures for the microsocket tests: one per job, each with a docstring.

The test files follow microsocket.py's sections: test_codec (1-3), test_http (4-5), test_websocket
(6), test_schema (7), test_stores (8-10), test_auth (11), test_broker (12), test_routes (14),
test_documents (the page and the two API documents), test_server (15, the I/O layer), test_cli
(16, a subprocess), test_browser (Chromium), and test_microsocket: the black-box protocol tests, the conformance kit,
which only ever get a URL (`kit_url`) and talk to it over the network: an in-process server's,
or another implementation's (`--target URL` or MICROSOCKET_TARGET, below).

One helper per job:

    run(coro)                  run a coroutine to completion, with a timeout
    FakeClock                  the injectable clock: moves only when a test advances it
    masked(...)                a client (masked) frame built by hand
    parse_frames(data)         every complete frame in a buffer
    random_client_bytes(rng)   client-ish bytes for the codec and connection fuzzers
    BrokerDriver, broker_driver  the sans-I/O broker, driven through handle() like the I/O layer;
                               BrokerDriver(**config).app(): an App around it, for route tests
    seqs_of, assert_error      reading what a client received
    make_request(...)          a parsed ms.Request, for in-process handshake and route tests
    parse_response(data)       (status, headers, body) of serialized HTTP response bytes
    upgrade_request(path)      the bytes of an opening handshake
    RawClient                  the raw-socket client (blocking, with timeouts)
    http_request(url, ...)     one HTTP request on a fresh socket (http or https)
    ServerHandle, server_factory  the in-process server: its own thread and event loop; the one
                               place a Server is built (parametrize server_factory to vary it)
    kit_url, KIT_SERVER        the URL the conformance kit talks to: --target's, or an in-process server's
    wait_until(predicate)      poll, for what has no event to wait on
    recv_json, request, setup  the websockets-client helpers; wsclient: the library or a skip
    cli(...), SCRIPT, child_env, free_port, read_banner  the server as a subprocess

Timeouts: every test is bounded by TEST_TIMEOUT (SIGALRM), every coroutine by run()'s timeout and
every socket read by its socket timeout, so a hang fails instead of stalling the suite.

Markers (registered below; nothing is deselected by default, CI runs them all): `slow` (over
about a second), `browser` (Chromium), `redis` (a real redis-server: test_redis.py, test_resp.py),
`conformance` (the kit: every test of test_microsocket.py), `time_limit(seconds)` (a longer limit
than TEST_TIMEOUT). For a quick run: `python3 -m pytest -q -m "not slow and not browser"`.

The conformance kit against another server: `python3 -m pytest -m conformance --target
ws://HOST:PORT`, or MICROSOCKET_TARGET=ws://HOST:PORT in the environment (`--target` wins).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import queue
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import types
import urllib.parse
from typing import Any, Callable, Iterator, NamedTuple

import pytest

import microsocket as ms

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "microsocket.py")
TEST_TIMEOUT = 60  # seconds for any one test, enforced by SIGALRM
RFC_KEY = bytes.fromhex("37fa213d")  # RFC 6455 §5.7's masking key


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers (no config file: the README's test command stays as it is)."""
    config.addinivalue_line("markers", "slow: takes over about a second (CI runs it; -m 'not slow' to skip)")
    config.addinivalue_line("markers", "browser: drives Chromium through playwright (skips when either is missing)")
    config.addinivalue_line("markers", "redis: needs redis-server for the Redis backbone (skips, saying so, when it is absent)")
    config.addinivalue_line("markers", "conformance: the conformance kit (test_microsocket.py): black-box, SPEC clause by clause, "
                                       "against --target URL (or $MICROSOCKET_TARGET) when given, else in-process servers")
    config.addinivalue_line("markers", "time_limit(seconds): this test may run longer than TEST_TIMEOUT")
    kit_target(config)  # a bad URL is a usage error before anything runs


def pytest_addoption(parser: pytest.Parser) -> None:
    """--target: where the conformance kit runs (see kit_url)."""
    parser.addoption(
        "--target", metavar="URL", default=os.environ.get("MICROSOCKET_TARGET") or None,
        help="run the conformance kit (-m conformance) against the server at URL (ws://HOST:PORT or "
             "http://HOST:PORT) instead of in-process servers (default: $MICROSOCKET_TARGET)",
    )


def kit_target(config: pytest.Config) -> str | None:
    """The http:// base URL of --target (or MICROSOCKET_TARGET), or None when neither is given."""
    url = config.getoption("target")
    if not url:
        return None
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "http": "http"}.get(parts.scheme)
    if scheme is None or not parts.hostname or parts.path not in ("", "/", "/ws"):
        raise pytest.UsageError(f"--target / MICROSOCKET_TARGET must be ws://HOST:PORT or http://HOST:PORT, not {url!r}")
    return f"{scheme}://{parts.netloc}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run every broker-level test and every black-box protocol test once per backbone: the
    in-memory one, and the deferred doubles that answer in later turns (the seam is real). Against
    a --target the kit runs once."""
    for fixture in ("broker_driver", "kit_url"):
        if fixture in metafunc.fixturenames and not (fixture == "kit_url" and kit_target(metafunc.config)):
            metafunc.parametrize(fixture, BACKBONES, indirect=True)


# -- timeouts


@pytest.fixture(autouse=True)
def _test_timeout(request):
    """Fail a test that runs longer than TEST_TIMEOUT (or its time_limit) instead of hanging the suite."""
    marker = request.node.get_closest_marker("time_limit")
    seconds = int(marker.args[0]) if marker else TEST_TIMEOUT

    def expire(signum, frame):
        raise TimeoutError(f"test took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run(coro, timeout: float = 30):
    """Run a coroutine to completion in a fresh event loop, failing after `timeout` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


# -- clock and frames


class FakeClock:
    """An injectable clock (`clock=` of Broker, Dedup, History and Server) that only moves when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bytes = RFC_KEY) -> bytes:
    """A client frame (masked), with optional reserved bits, built by hand."""
    data = bytearray(ms.serialize_frame(opcode, payload, fin, mask))
    data[0] |= rsv << 4
    return bytes(data)


def parse_frames(data: bytes) -> list[ms.Frame]:
    """Every frame in `data`, which must hold only complete frames."""
    frames = []
    while data:
        parsed = ms.Frame.parse(data)
        assert parsed is not None, f"incomplete frame in {data[:80]!r}"
        frame, used = parsed
        frames.append(frame)
        data = data[used:]
    return frames


def random_client_bytes(rng: random.Random) -> bytes:
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


# -- the broker, sans-I/O


# -- backbones: the in-memory one, and test doubles that answer later

BACKBONES = ("memory", "deferred", "deferred-split")


class DeferredBackbone:
    """The in-memory backbone, answering late: every completion is held until a later turn of
    `schedule` (an event loop's call_soon, or a queue the test drains), as a remote backbone's
    replies would be. With `split`, deliveries also arrive in a turn of their own, apart from the
    publish's reply (as Redis pub/sub arrives on another connection than the script's result);
    without it they arrive at once, before the publisher's ack is even answered. Requests reach
    the inner backbone at once and in order (one pipelined connection keeps order too)."""

    ANSWERED = frozenset(("publish", "join", "history", "create_session", "get_session", "claim_session", "presence"))
    answers_at_once = False  # not the inner backbone's: this one answers later

    def __init__(self, inner: ms.MemoryBackbone, schedule: Callable[[Callable[[], None]], None], split: bool) -> None:
        self.inner = inner
        self.schedule = schedule
        self.split = split
        self.epoch = inner.epoch
        self.broker: ms.Broker | None = None

    def bind(self, broker: ms.Broker) -> None:
        self.broker = broker
        self.inner.bind(self)  # the inner backbone delivers and takes over through this double

    def deliver(self, *delivery: Any) -> None:
        if self.split:
            self.schedule(lambda: self.broker.deliver(*delivery))
        else:
            self.broker.deliver(*delivery)

    def take_over(self, holder: ms.Peer) -> None:
        self.broker.take_over(holder)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.ANSWERED:
            return method

        def request(*args: Any) -> None:
            *args, done = args
            method(*args, lambda result: self.schedule(lambda: done(result)))

        return request


# Where make_backbone("redis", ...) connects: RedisBackbone keyword arguments (url, prefix, timeout,
# lease), set by test_redis.py's fixtures for the test that uses them.
REDIS_TARGET: dict[str, Any] = {}


def make_backbone(kind: str, config: ms.Config, clock: Callable[[], float], schedule: Callable | None) -> Any:
    """A backbone of `kind` (one of BACKBONES, or "redis": a RedisBackbone on REDIS_TARGET, to be
    started) on `clock`; the deferred ones run late work through `schedule`."""
    if kind == "redis":
        return redis_backbone(config, clock)
    inner = ms.MemoryBackbone(config, clock)
    if kind == "memory":
        return inner
    return DeferredBackbone(inner, schedule, split=kind == "deferred-split")


def redis_backbone(config: ms.Config, clock: Callable[[], float]) -> Any:
    """A RedisBackbone (section 13) on REDIS_TARGET."""
    if not REDIS_TARGET:
        raise RuntimeError("make_backbone('redis', ...) needs REDIS_TARGET: use test_redis.py's redis_url fixture")
    return ms.RedisBackbone(config, clock, **REDIS_TARGET)


class BrokerDriver:
    """A sans-I/O Broker on a FakeClock, driven the way the I/O layer drives it.

    Messages go in through `broker.handle(client, text)`; what a client receives is read back
    from its outbox as decoded frames. Tests look at those messages, `stats()` (what /stats
    shows) and PublishResults, not at the broker's internal tables.
    """

    def __init__(self, backbone: str = "memory", **config: Any) -> None:
        self.clock = FakeClock()
        self._late: list[Callable[[], None]] = []  # what a deferred backbone runs in a later turn
        config = ms.Config(**config)
        self.backbone = make_backbone(backbone, config, self.clock, self._late.append)
        self.broker = ms.Broker(config, self.backbone, clock=self.clock)
        self._ready: dict[int, dict] = {}
        self._subscribed: dict[int, dict[str, dict]] = {}
        self._clients: list[ms.Peer] = []  # kept alive, so that id() stays unique
        self._ids = itertools.count(1)

    def connect(self, token: str | None = "alice", topics: list | None = None, bound_topic: str | None = None) -> ms.Peer:
        """A new connection (a sub-socket when `bound_topic`), set up as `token` unless None; its outbox emptied."""
        client = ms.Peer(self.broker, bound_topic=bound_topic)
        self.broker.connect(client)
        self._clients.append(client)
        if token is not None:
            msg: dict = {"type": "setup", "token": token}
            if topics is not None:
                msg["topics"] = topics
            replies = self.send(client, msg)
            assert replies and replies[0]["type"] == "ready", replies
            assert all(r["type"] == "subscribed" for r in replies[1:]), replies
            self._ready[id(client)] = replies[0]
            self._subscribed[id(client)] = {r["topic"]: r for r in replies[1:]}
        return client

    def ready(self, client: ms.Peer) -> dict:
        """The `ready` that client got from the setup done by connect()."""
        return self._ready[id(client)]

    def subscribed(self, client: ms.Peer, topic: str) -> dict:
        """The `subscribed` that client got for `topic` from the setup done by connect() (its seqNo and epoch)."""
        return self._subscribed[id(client)][topic]

    def settle(self) -> None:
        """Let a deferred backbone answer everything it holds (later turns, in order)."""
        while self._late:
            late, self._late[:] = list(self._late), []
            for work in late:
                work()

    def take(self, client: ms.Peer) -> list[dict]:
        """Settle, then empty a client's outbox as the I/O layer's flush does; its messages decoded."""
        self.settle()
        data = client.take_output() if client.out else b""
        self.broker.dirty = [c for c in self.broker.dirty if c.out]  # the flush empties the dirty list
        out = []
        for frame in parse_frames(data):
            assert frame.fin and frame.opcode == ms.Opcode.TEXT, frame
            out.append(json.loads(frame.payload))
        return out

    def send(self, client: ms.Peer, msg: dict | str) -> list[dict]:
        """Feed one message (a dict, or raw text) from `client` and return everything it then received."""
        self.broker.handle(client, msg if isinstance(msg, str) else json.dumps(msg))
        return self.take(client)

    def one(self, client: ms.Peer, msg: dict | str) -> dict:
        """Feed one message and return its single reply."""
        out = self.send(client, msg)
        assert len(out) == 1, out
        return out[0]

    def binary(self, client: ms.Peer) -> list[dict]:
        """A binary message from `client` (the I/O layer reports it without its bytes); what it received."""
        self.broker.handle_binary(client)
        return self.take(client)

    def publish(self, client: ms.Peer, topic: str, message_id: str, payload: Any = ..., **extra: Any) -> list[dict]:
        """A `publish` from `client` (no payload field when `payload` is left out); what it received."""
        msg = {"type": "publish", "topic": topic, "messageId": message_id, **extra}
        if payload is not ...:
            msg["payload"] = payload
        return self.send(client, msg)

    def server_publish(self, topic: str, n: int = 1, user: str = "pub", size: int = 0) -> list[int]:
        """Publish `n` messages `{"n": k, "pad": ...}` through Broker.publish_checked (as HTTP and Python do), settled; their seqNos."""
        seqs = []
        for _ in range(n):
            k = next(self._ids)
            results: list = []
            self.broker.publish_checked(user, topic, f"{topic}-{k}", {"n": k, "pad": "x" * size}, "test", results.append)
            self.settle()
            (result,) = results
            assert result.status == "ok", result
            seqs.append(result.seq_no)
        return seqs

    def ack(self, client: ms.Peer, topic: str, seq_no: int) -> None:
        """A client `ack`, which has no reply."""
        assert self.send(client, {"type": "ack", "topic": topic, "seqNo": seq_no}) == []

    def disconnect(self, client: ms.Peer, reliable: bool = True) -> None:
        """The connection goes away (what the I/O layer does); `reliable` False: its unsent data was abandoned."""
        self.take(client)
        self.broker.disconnect(client, reliable)

    def connected(self, client: ms.Peer) -> bool:
        """False once the broker has let go of the client (closed, or its session taken over)."""
        return client.broker is not None

    def close_requested(self, client: ms.Peer) -> int | None:
        """The close code the broker asked the I/O layer to send to `client` (4002 on a take-over), or None."""
        return client.close_request

    def sweep(self) -> None:
        """What the server's timer sweep (Server.tick) does to the broker, at the clock's time."""
        self.broker.sweep()
        self.settle()

    def flushed(self) -> None:
        """The I/O layer wrote every outbox now: the broker records publish -> socket latency."""
        self.broker.flushed(self.clock())

    def stats(self) -> dict:
        """What /stats would show."""
        return self.broker.stats()

    def app(self) -> ms.App:
        """The App the server would build around this driver's broker (for in-process route and handshake tests)."""
        return ms.App(self.broker.config, self.broker)


@pytest.fixture
def broker_driver(request) -> Callable[..., BrokerDriver]:
    """Make BrokerDrivers: broker_driver(**config) -> a Broker with Config(**config) on a fresh
    FakeClock, behind the in-memory backbone, or behind a deferred one for tests marked
    `every_backbone` (they run once per kind in BACKBONES)."""
    kind = getattr(request, "param", "memory")
    return lambda **config: BrokerDriver(kind, **config)


def seqs_of(messages: list[dict], topic: str | None = None) -> list[int]:
    """The seqNos of the `message` frames in `messages` (of one topic when given)."""
    return [m["seqNo"] for m in messages if m["type"] == "message" and (topic is None or m["topic"] == topic)]


def assert_error(msg: dict, code: str, **context: Any) -> None:
    """`msg` is an error with this code, a message for people, and these context fields."""
    assert msg["type"] == "error" and msg["code"] == code, msg
    assert isinstance(msg["message"], str) and msg["message"]
    for key, value in context.items():
        assert msg.get(key) == value, (key, msg)


# -- HTTP, sans-I/O and over a socket


def make_request(method: str = "GET", path: str = "/", *headers: str, version: str = "1.1", body: bytes = b"",
                 host: str | None = "test") -> ms.Request:
    """A parsed request, as the server's reader would produce it; `headers` are "Name: value" lines,
    with `Host: {host}` added unless one is given or host is None."""
    lines = [f"{method} {path} HTTP/{version}", *headers]
    if host is not None and not any(h.lower().startswith("host:") for h in headers):
        lines.insert(1, f"Host: {host}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    reader = ms.RequestReader()
    reader.feed(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    request = reader.next_request()
    assert request is not None
    return request


class HTTPResponse(NamedTuple):
    """One HTTP response: status, lower-case headers, body."""

    status: int
    headers: dict
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(data: bytes) -> HTTPResponse:
    """The response in serialized bytes: everything after the head is the body."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    return HTTPResponse(int(lines[0].split()[1]), headers, body)


def upgrade_request(path: str = "/ws", *headers: str, host: str = "x") -> bytes:
    """The bytes of a WebSocket opening handshake with a fresh key; `headers` are extra lines."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawClient:
    """The raw-socket client, for what a polite client cannot send: half a frame, half a head, unmasked frames.

    Blocking, with a timeout on every read; it reads only when asked, so a test can make it stop
    reading (a slow consumer) or stay silent (no pong). `rcvbuf` shrinks its receive buffer.
    """

    def __init__(self, port: int, timeout: float = 5, host: str = "127.0.0.1", rcvbuf: int | None = None,
                 context: ssl.SSLContext | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect((host, port))
        self.sock = context.wrap_socket(sock, server_hostname=host) if context is not None else sock
        self.timeout = timeout
        self.buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; unparsed: {self.buffer[:80]!r}")
        self.buffer += chunk

    def recv_until(self, marker: bytes) -> bytes:
        """Everything up to and including `marker`."""
        while marker not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    def http(self, raw: bytes) -> HTTPResponse:
        """Send raw request bytes (maybe none, for a pipelined one); read one response with its body."""
        if raw:
            self.send(raw)
        head = parse_response(self.recv_until(b"\r\n\r\n"))
        length = int(head.headers.get("content-length", 0))
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return HTTPResponse(head.status, head.headers, body)

    def handshake(self, path: str = "/ws", *headers: str, expect: int | None = 101, host: str = "x") -> HTTPResponse:
        """The opening handshake (extra header lines allowed); checks the status (unless expect is None) and the accept key."""
        raw = upgrade_request(path, *headers, host=host)
        response = self.http(raw)
        if expect is not None:
            assert response.status == expect, response
        if response.status == 101:
            key = next(line.split(": ", 1)[1] for line in raw.decode().split("\r\n") if line.startswith("Sec-WebSocket-Key"))
            assert response.headers["sec-websocket-accept"] == ms.accept_key(key)
        return response

    def recv_frame(self) -> ms.Frame:
        """The next (unmasked) server frame."""
        while True:
            parsed = ms.Frame.parse(self.buffer)
            if parsed is not None:
                frame, used = parsed
                self.buffer = self.buffer[used:]
                return frame
            self._more()

    def recv_close(self) -> int:
        """Read frames until a close frame; return its code (1005 for an empty one)."""
        while True:
            frame = self.recv_frame()
            if frame.opcode == ms.Opcode.CLOSE:
                return ms.parse_close(frame.payload)[0]

    def send_json(self, msg: dict) -> None:
        self.send(masked(ms.Opcode.TEXT, json.dumps(msg).encode(), mask=os.urandom(4)))

    def recv_json(self) -> dict:
        frame = self.recv_frame()
        assert frame.opcode == ms.Opcode.TEXT, frame
        return json.loads(frame.payload)

    def setup(self, token: str = "alice", **fields: Any) -> dict:
        """Send setup; return `ready` after reading one `subscribed` per topic given."""
        self.send_json({"type": "setup", "token": token, **fields})
        ready = self.recv_json()
        assert ready["type"] == "ready", ready
        for _ in dict.fromkeys(fields.get("topics", ())):
            assert self.recv_json()["type"] == "subscribed"
        return ready

    def pending(self) -> bytes:
        """What has arrived and is not read yet, without waiting (the buffer is kept)."""
        self.sock.setblocking(False)
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(self.timeout)
        return self.buffer

    def at_eof(self) -> bool:
        """True once the server has closed the TCP connection (what arrives meanwhile is kept in the buffer)."""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buffer += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True

    def reset(self) -> None:
        """Close with an RST instead of a FIN (SO_LINGER 0): a killed client's usual goodbye."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def http_request(url: str, method: str = "GET", headers: dict | None = None, body: bytes = b"",
                 context: ssl.SSLContext | None = None) -> HTTPResponse:
    """One request to an http(s):// URL on a fresh connection (never through a proxy, redirects not followed)."""
    parts = urllib.parse.urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {target or '/'} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    with RawClient(parts.port, host=parts.hostname, context=context) as client:
        return client.http(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


# -- the in-process server


class ServerHandle:
    """A started ms.Server in its own thread and event loop, with its port, URLs and ways to call into it.

    The server has its own thread so that a test can use blocking sockets, Playwright and the
    websockets client (in the test's own loop) against it alike. Whatever touches the server's
    state goes through call(), which runs it in the server's loop.
    """

    def __init__(self, config: ms.Config, clock: Callable[[], float], backbone: str = "memory") -> None:
        self.clock = clock
        self.backbone_kind = backbone
        self.server: ms.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(config),), daemon=True)
        self._thread.start()
        assert self._started.wait(10), "the server thread did not start"
        if self._error is not None:
            raise self._error

    async def _main(self, config: ms.Config) -> None:
        try:
            loop = asyncio.get_running_loop()
            backbone = make_backbone(self.backbone_kind, config, self.clock, loop.call_soon)
            if self.backbone_kind == "redis":
                await backbone.start()  # connected before the first client (a second start does nothing)
            self.server = ms.Server(config, clock=self.clock, backbone=backbone)  # the one place the tests construct a Server
            await self.server.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self._error = exc
            self._started.set()
            return
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._started.set()
        await self._stop.wait()
        await self.server.close(grace=1.0)
        if self.backbone_kind == "redis":
            await self.server.backbone.close()  # after the connections: their detaches are written first

    @property
    def port(self) -> int:
        return self.server.port

    def url(self, path: str = "") -> str:
        """http://127.0.0.1:PORT + path."""
        return f"http://127.0.0.1:{self.port}{path}"

    def ws_url(self, path: str = "/ws") -> str:
        """ws://127.0.0.1:PORT + path."""
        return f"ws://127.0.0.1:{self.port}{path}"

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) run in the server's loop (one callback: nothing else runs in between); its result."""

        async def call() -> Any:
            return fn(*args)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def wait(self, coro: Any, timeout: float = 20) -> Any:
        """Run a coroutine in the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def tick(self) -> None:
        """Run the server's timer sweep now, at its clock's time, and wait until what it queued is written."""
        self.call(self.server.tick)
        self.sync()

    def sync(self) -> None:
        """Wait until the server's loop has run what is already scheduled (the flush of queued frames, say)."""
        self.call(lambda: None)

    def publish(self, topic: str, data: Any, **kwargs: Any) -> ms.PublishResult:
        """await Server.publish(...), in the server's loop."""

        async def publish() -> ms.PublishResult:
            return await self.server.publish(topic, data, **kwargs)

        return self.wait(publish())

    def stats(self) -> dict:
        """Broker.stats(), the numbers behind /stats."""
        return self.call(self.server.broker.stats)

    def open_connections(self) -> int:
        """The connections the I/O layer still holds (HTTP, WebSocket or closing)."""
        return self.call(lambda: len(self.server.connections))

    def close(self) -> None:
        """Stop the server (close(grace=1)) and its thread."""
        if self.loop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def server_factory():
    """Start in-process servers: server_factory(clock=None, **config) -> ServerHandle on 127.0.0.1, port 0; all stopped afterwards."""
    handles: list[ServerHandle] = []

    def start(clock: Callable[[], float] | None = None, backbone: str = "memory", **config: Any) -> ServerHandle:
        handle = ServerHandle(ms.Config(host="127.0.0.1", port=0, **config), clock or time.monotonic, backbone)
        handles.append(handle)
        return handle

    yield start
    for handle in reversed(handles):
        handle.close()


# The in-process server the kit runs against without --target: the default limits, which the kit
# reads from /asyncapi.json like any other, with the timers shortened so that the tests of the
# setup timeout and the keepalive wait seconds, not half a minute.
KIT_SERVER = {"setup_timeout": 2, "ping_interval": 2, "ping_timeout": 2}


@pytest.fixture
def kit_url(server_factory, request) -> str:
    """The http:// base URL the conformance kit talks to, all it gets: --target's (or
    MICROSOCKET_TARGET's), one server for the whole run; else a fresh in-process server per test
    (KIT_SERVER), once per backbone in BACKBONES (see pytest_generate_tests)."""
    return kit_target(request.config) or server_factory(backbone=getattr(request, "param", "memory"), **KIT_SERVER).url()


def ws_url(base: str, path: str = "/ws") -> str:
    """The ws:// (or wss://) URL of `path` on the server at http(s):// `base`."""
    return base.replace("http", "ws", 1).rstrip("/") + path


def wait_until(predicate: Callable[[], Any], timeout: float = 10, what: str = "condition") -> None:
    """Poll predicate() every few ms until it is true; fail after `timeout` seconds. Only for what has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- the websockets client


@pytest.fixture
def wsclient():
    """The websockets client library (connect, InvalidStatus, ConnectionClosed), or a skip saying it is missing."""
    websockets = pytest.importorskip("websockets", reason="this test uses the websockets client: pip install websockets")
    from websockets.asyncio.client import connect

    return types.SimpleNamespace(connect=connect, InvalidStatus=websockets.exceptions.InvalidStatus,
                                 ConnectionClosed=websockets.exceptions.ConnectionClosed)


async def recv_json(ws, timeout: float = 5) -> dict:
    """The next message from a websockets client, parsed."""
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def request(ws, msg: dict, timeout: float = 5) -> dict:
    """Send one message and return the next one received."""
    await ws.send(json.dumps(msg))
    return await recv_json(ws, timeout)


async def setup(ws, token: str = "alice", **fields: Any) -> dict:
    """Send setup and return `ready` (the `subscribed` replies are left to the caller)."""
    reply = await request(ws, {"type": "setup", "token": token, **fields})
    assert reply["type"] == "ready", reply
    return reply


# -- the server as a subprocess


def free_port() -> int:
    """A TCP port that was free a moment ago (for a subprocess that must be told its port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict:
    """This environment without MICROSOCKET_* variables, plus `extra`, for a server subprocess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROSOCKET_")}
    env.update(extra)
    env["COLUMNS"] = "200"
    return env


@contextlib.contextmanager
def cli(*args: str, env: dict | None = None, preexec_fn: Callable[[], None] | None = None):
    """Start `python3 -u microsocket.py *args`; yield (process, queue of stdout lines, None at the end); always kill it.

    Stderr is read all along into `process.stderr_lines` (a list), so the child never blocks on it.
    """
    proc = subprocess.Popen(
        [sys.executable, "-u", SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True, env=env or child_env(), preexec_fn=preexec_fn,
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    proc.stderr_lines = []

    def pump_stderr() -> None:
        for line in proc.stderr:
            proc.stderr_lines.append(line)

    threading.Thread(target=pump, daemon=True).start()
    err_thread = threading.Thread(target=pump_stderr, daemon=True)
    err_thread.start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        err_thread.join(5)
        proc.stdout.close()
        proc.stderr.close()


def read_banner(lines: queue.Queue, timeout: float = 10) -> str:
    """A CLI child's stdout up to and including the line with the ws:// URL."""
    text = ""
    while "ws://" not in text:
        line = lines.get(timeout=timeout)
        assert line is not None, f"process ended; printed {text!r}"
        text += line
    return text


# -- Redis: a real redis-server per test, and a blocking client for checking what it holds

REDIS_START_TIMEOUT = 10.0  # seconds for a fresh redis-server to answer PING (it loads nothing)
REDIS_STOP_TIMEOUT = 5.0  # seconds after SIGTERM before SIGKILL
REDIS_READ_TIMEOUT = 5.0  # seconds for any one reply in RespClient


def redis_server_binary() -> str | None:
    """The redis-server to run, or None when this machine has none."""
    path = os.environ.get("REDIS_SERVER") or shutil.which("redis-server") or "/usr/bin/redis-server"
    return path if os.access(path, os.X_OK) else None


class RedisAddress(NamedTuple):
    host: str
    port: int
    pid: int


def _free_port(highest: int = 65535) -> int:
    """A TCP port that was free a moment ago, at most `highest`."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= highest:
            return port


def _answers_ping(host: str, port: int) -> bool:
    """True once the server replies +PONG (not -LOADING, not a refused connection). Raw bytes on
    purpose: the fixture must not depend on the codec under test."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG\r\n")
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's PID, SIGKILL if it has not exited after REDIS_STOP_TIMEOUT."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(REDIS_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def start_redis(tmp_dir: str, *options: str, host: str = "127.0.0.1") -> Iterator[RedisAddress]:
    """A redis-server on a free port, without persistence, once it answers PING.

    `options` are extra command-line options ("--cluster-enabled", "yes", ...). Its working
    directory and log are in `tmp_dir`. Stopped by its PID when the block ends, however it ends.
    A port taken between choosing and binding it is retried on another."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no redis-server on this machine")
    # A cluster node also listens on port + 10000 (its bus), so its port must be at most 55535.
    highest = 55535 if "--cluster-enabled" in options else 65535
    for attempt in range(5):
        port = _free_port(highest)
        log_path = os.path.join(tmp_dir, f"redis-{port}.log")
        argv = [binary, "--port", str(port), "--bind", host, "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--dir", tmp_dir, "--logfile", log_path, *options]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + REDIS_START_TIMEOUT
            while proc.poll() is None and not _answers_ping(host, port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING within {REDIS_START_TIMEOUT} s (log: {log_path})")
                time.sleep(0.02)
            if proc.poll() is not None:
                with open(log_path, errors="replace") as f:
                    log = f.read()
                if "Address already in use" in log and attempt < 4:
                    continue
                raise RuntimeError(f"redis-server exited with {proc.returncode}:\n{log}")
            yield RedisAddress(host, port, proc.pid)
            return
        finally:
            _stop(proc)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisAddress]:
    """A redis-server of this test's own: (host, port, pid). Skips when there is none."""
    if redis_server_binary() is None:
        pytest.skip("redis-server not found ($REDIS_SERVER, PATH, /usr/bin): apt-get install redis-server")
    with start_redis(str(tmp_path)) as address:
        yield address


class RespClient:
    """A blocking client on one raw socket, speaking RESP through ms.RespParser. Every read has a
    timeout, so a reply that never comes fails the test instead of hanging it."""

    def __init__(self, host: str, port: int, timeout: float = REDIS_READ_TIMEOUT, recv_size: int = 65536) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.parser = ms.RespParser()
        self.recv_size = recv_size
        self.reads = 0  # recv() calls that returned data, to see how a reply was cut

    def __enter__(self) -> RespClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, *commands: tuple) -> None:
        """Write commands in one go (a pipeline), without reading their replies."""
        self.sock.sendall(b"".join(ms.encode_command(*command) for command in commands))

    def reply(self) -> Any:
        """The next reply (or push), reading as much as it takes."""
        while True:
            reply = self.parser.next_reply()
            if reply is not ms.NEED_MORE:
                return reply
            data = self.sock.recv(self.recv_size)
            if not data:
                raise ConnectionError("Redis closed the connection")
            self.reads += 1
            self.parser.feed(data)

    def call(self, *args: Any) -> Any:
        """One command and its reply."""
        self.send(args)
        return self.reply()
