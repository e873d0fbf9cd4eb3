#!/usr/bin/env python3
"""Issue 9's hostile-client battery: each attack of the issue's table against a microsocket.py it starts itself.

    python3 bench/hostile.py                                   # every attack, the repository's server
    python3 bench/hostile.py --server /tmp/ms-before/microsocket.py --only replay-amplify --json
    python3 bench/hostile.py --scale 0.2 --server-arg=--max-buffered=67108864

For each attack a fresh server process is started (`python3 SERVER --host 127.0.0.1 --port 0`, plus
any `--server-arg`; the port is read from its banner), and a well-behaved pair runs beside the
attacker in a process of its own (this file with --pair-child): a publisher sending 20 messages/s
to its own topic and a subscriber checking every one of them (no loss, no duplicate, in order,
publish -> receive latency), plus a fresh client every 0.25 s that connects, sets up and subscribes
(its latency says whether newcomers still get in). Meanwhile a thread samples the server's RSS
(VmRSS, VmHWM in /proc/PID/status); an attack is stopped, and the server killed, when RSS passes
--rss-cap (default 2048 MB), and reported as "> cap". Per attack: what the server did to the
attacker (close codes seen, error codes, /stats deltas), peak RSS, server CPU seconds, the pair's
p50/p99 latency and lost count, the fresh clients' latency. The end is a markdown table (or JSON
with --json).

Standard library plus `websockets` (the pair only). Nothing here imports microsocket.py, so it runs
against older versions too: no server flag is passed unless given with --server-arg, except that
bare-tcp runs its server with a lower open-file limit (RLIMIT_NOFILE, set in the child) so that the
attack can exhaust it, and says so, and the deflate attacks add --permessage-deflate (they offer it
and stop, saying so, when the server does not accept it). Every process started is killed by its PID in a finally.

test_hostile.py imports this file (importlib) and calls `run_attack(name, params=..., server_args=...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import json
import math
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from typing import Any, Awaitable, Callable

HERE = os.path.dirname(os.path.abspath(__file__))
THIS = os.path.abspath(__file__)
DEFAULT_SERVER = os.path.join(os.path.dirname(HERE), "microsocket.py")
HOST = "127.0.0.1"
MiB = 1 << 20
MAX_MESSAGE_SIZE = 1 << 20  # the servers' default message size limit (both versions)
BANNER = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")
ZERO_MASK = b"\0\0\0\0"  # a valid masking key that costs the attacker nothing (the server unmasks all the same)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# === WebSocket frames (client side) ==================================================================


def _xor(data: bytes, mask: bytes) -> bytes:
    n = len(data)
    if not n or mask == ZERO_MASK:
        return data
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def frame_header(opcode: int, length: int, fin: bool = True, mask: bytes = ZERO_MASK) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    if length < 126:
        head = bytes((b0, 0x80 | length))
    elif length < 65536:
        head = bytes((b0, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + length.to_bytes(8, "big")
    return head + mask


def frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None) -> bytes:
    """A masked client frame (a random key unless one is given)."""
    mask = os.urandom(4) if mask is None else mask
    return frame_header(opcode, len(payload), fin, mask) + _xor(payload, mask)


def text(obj: Any) -> bytes:
    """One JSON message as a masked text frame."""
    return frame(0x1, json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode())


def close_frame(code: int = 1000) -> bytes:
    return frame(0x8, code.to_bytes(2, "big"))


class FrameStream:
    """Server frames out of a byte stream, incrementally. Keeps only the first `keep` bytes of a
    payload over SMALL bytes (None: all of every payload), so a stream of large frames can be
    skimmed without holding it; small frames (replies) are always kept whole."""

    SMALL = 4096

    def __init__(self, keep: int | None = None) -> None:
        self.buf = bytearray()
        self.keep = keep
        self.cur: list | None = None  # [opcode, length, kept, remaining, compressed]

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """The frames `data` completes: (opcode, payload length, payload or its first `keep` bytes)."""
        out = []
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while True:
            if self.cur is None:
                if end - pos < 2:
                    break
                b0, b1 = buf[pos], buf[pos + 1]
                n, p = b1 & 0x7F, pos + 2
                if n == 126:
                    if end - p < 2:
                        break
                    n, p = int.from_bytes(buf[p:p + 2], "big"), p + 2
                elif n == 127:
                    if end - p < 8:
                        break
                    n, p = int.from_bytes(buf[p:p + 8], "big"), p + 8
                if b1 & 0x80:
                    p += 4  # server frames are not masked; tolerate it anyway
                    if p > end:
                        break
                pos = p
                self.cur = [b0 & 0x0F, n, bytearray(), n, bool(b0 & 0x40)]
            cur = self.cur
            take = min(cur[3], end - pos)
            room = cur[1] if self.keep is None or cur[1] <= self.SMALL else self.keep
            if len(cur[2]) < room and take:
                cur[2] += buf[pos:pos + min(take, room - len(cur[2]))]
            pos += take
            cur[3] -= take
            if cur[3]:
                break
            payload = bytes(cur[2])
            if cur[4] and len(payload) == cur[1]:
                # permessage-deflate: the server compresses each message on its own (no context
                # takeover), so it inflates alone (RFC 7692 §7.2.2: the tail is appended again).
                payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
            out.append((cur[0], cur[1], payload))
            self.cur = None
        del buf[:pos]
        return out


def parse_close(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")


# === raw sockets ========================================================================================


class Closed(Exception):
    """The server closed the WebSocket (code, reason) or the TCP connection (code None)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed {code} {reason!r}")
        self.code, self.reason = code, reason


class Refused(Exception):
    """The handshake got another answer than 101 (its status), or no answer."""

    def __init__(self, status: int | None, head: str = "") -> None:
        super().__init__(f"handshake refused: {status} {head[:80]!r}")
        self.status = status


async def tcp_connect(port: int, rcvbuf: int | None = None, timeout: float = 10) -> socket.socket:
    """A connected non-blocking TCP socket to 127.0.0.1:port (SO_RCVBUF set before connecting, so the
    window it advertises stays small)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (HOST, port)), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): nothing is left for the server to flush."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        sock.close()


class RawWS:
    """A raw WebSocket client on a non-blocking socket (loop.sock_* calls: no hidden read buffer,
    so a client that does not read really does not read)."""

    def __init__(self, sock: socket.socket, keep: int | None = None) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.stream = FrameStream(keep)
        self.frames: collections.deque = collections.deque()
        self.close_code: int | None = None
        self.close_reason = ""
        self.eof = False
        self.received = 0  # bytes

    @classmethod
    async def open(cls, port: int, path: str = "/ws", rcvbuf: int | None = None, timeout: float = 10,
                   keep: int | None = None, extensions: str | None = None) -> RawWS:
        """Connect and hand-shake; `extensions` is offered in Sec-WebSocket-Extensions, and what the
        server answered is in `ws.extensions` ("" for nothing)."""
        sock = await tcp_connect(port, rcvbuf, timeout)
        ws = cls(sock, keep)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            offer = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
            await ws.send(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = await asyncio.wait_for(ws.loop.sock_recv(sock, 4096), timeout)
                if not chunk:
                    raise Refused(None, head.decode("latin-1"))
                head += chunk
            head, _, rest = head.partition(b"\r\n\r\n")
            status = head.split(b" ", 2)[1] if head.startswith(b"HTTP/1.1 ") else b"0"
            if status != b"101":
                raise Refused(int(status), head.decode("latin-1"))
            found = re.search(rb"(?im)^sec-websocket-extensions:[ \t]*(.*?)[ \t]*$", head)
            ws.extensions = found.group(1).decode("latin-1") if found else ""
            if rest:
                ws._take(rest)
        except BaseException:
            sock.close()
            raise
        return ws

    async def send(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def send_json(self, obj: Any) -> None:
        await self.send(text(obj))

    def _take(self, data: bytes) -> None:
        self.received += len(data)
        for opcode, length, payload in self.stream.feed(data):
            if opcode == 0x8 and self.close_code is None:
                self.close_code, self.close_reason = parse_close(payload)
            self.frames.append((opcode, length, payload))

    async def read_some(self, n: int = 65536) -> bool:
        """One recv of up to n bytes; False at EOF (or a reset)."""
        if self.eof:
            return False
        try:
            chunk = await self.loop.sock_recv(self.sock, n)
        except (ConnectionError, OSError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._take(chunk)
        return True

    async def recv_frame(self, timeout: float = 10) -> tuple[int, int, bytes]:
        deadline = time.monotonic() + timeout
        while not self.frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError("no frame in time")
            if not await asyncio.wait_for(self.read_some(), left):
                raise Closed(self.close_code, self.close_reason)
        return self.frames.popleft()

    async def recv_json(self, timeout: float = 10) -> dict:
        """The next text message, parsed; pings are skipped; Closed on a close frame or EOF."""
        while True:
            opcode, _, payload = await self.recv_frame(timeout)
            if opcode == 0x1:
                return json.loads(payload)
            if opcode == 0x8:
                raise Closed(*parse_close(payload))

    async def setup(self, token: str, topics: list[str] | None = None, timeout: float = 20) -> dict:
        msg: dict = {"type": "setup", "token": token}
        if topics is not None:
            msg["topics"] = topics
        await self.send_json(msg)
        ready = await self.recv_json(timeout)
        if ready.get("type") != "ready":
            raise RuntimeError(f"setup refused: {ready}")
        for _ in dict.fromkeys(topics or ()):
            reply = await self.recv_json(timeout)
            if reply.get("type") != "subscribed":
                raise RuntimeError(f"setup topic refused: {reply}")
        return ready

    async def drain(self, seconds: float, until: Callable[[], bool] | None = None) -> None:
        """Read as fast as the server sends, for up to `seconds`, until EOF or until() is true."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(asyncio.TimeoutError):
            while not self.eof and not (until and until()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.wait_for(self.read_some(1 << 18), left)

    def close(self) -> None:
        abort(self.sock)


async def http_get(port: int, path: str, timeout: float = 5) -> tuple[int, dict, bytes]:
    """One GET on a fresh connection (Connection: close): status, headers, body."""

    async def get() -> tuple[int, dict, bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read(-1)
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body

    return await asyncio.wait_for(get(), timeout)


async def server_limits(port: int) -> dict:
    """The limits a server publishes in its AsyncAPI document (`x-limits`), {} when it has none."""
    try:
        status, _, body = await http_get(port, "/asyncapi.json")
        doc = json.loads(body) if status == 200 else {}
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return {}
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("x-limits"), dict):
                return node["x-limits"]
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return {}


async def server_stats(port: int, timeout: float = 5) -> dict | None:
    try:
        status, _, body = await http_get(port, "/stats", timeout)
        return json.loads(body) if status == 200 else None
    except (OSError, asyncio.TimeoutError, ValueError, IndexError):
        return None


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# === the server process, its memory ===================================================================


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes ({} once it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    out[name] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


_LIVE_SERVERS: set[int] = set()  # PIDs of the servers started and not yet killed


def _install_sigterm_cleanup() -> None:
    """The servers run in sessions of their own (a Ctrl-C of the battery does not reach them first)
    and are killed by PID in a `finally`, which Python's default SIGTERM skips: it ends the process
    at once. So, while the default is in place, a SIGTERM (`timeout`, a CI runner stopping a job)
    kills the servers still running and then ends this process as the default would."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, frame: object) -> None:
        for pid in list(_LIVE_SERVERS):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)


class ServerProcess:
    """`python3 -u SERVER --host 127.0.0.1 --port 0 ARGS` with its stdout and stderr in files."""

    def __init__(self, path: str, args: list[str], nofile: int | None = None) -> None:
        self.path = os.path.abspath(path)
        self.args = list(args)
        self.nofile = nofile
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._out = tempfile.TemporaryFile()
        self._err = tempfile.TemporaryFile()

    def start(self, timeout: float = 30) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICROSOCKET_")}
        nofile = self.nofile

        def limit() -> None:
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(
            [sys.executable, "-u", self.path, "--host", HOST, "--port", "0", *self.args],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err, env=env, preexec_fn=limit,
            start_new_session=True,  # a Ctrl-C of the battery does not reach it first; it is killed by PID
        )
        _LIVE_SERVERS.add(self.proc.pid)
        _install_sigterm_cleanup()
        deadline = time.monotonic() + timeout
        while True:
            self._out.seek(0)
            match = BANNER.search(self._out.read().decode("utf-8", "replace"))
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._out.seek(0)
                raise RuntimeError(f"the server did not start (exit {self.proc.poll()}): stdout {self._out.read()[-500:]!r}, "
                                   f"stderr {self.log()[-1500:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        self._err.seek(0)
        return self._err.read().decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            if self.proc.poll() is not None:
                _LIVE_SERVERS.discard(self.proc.pid)

    def cleanup(self) -> None:
        self.kill()
        self._out.close()
        self._err.close()


class RssSampler(threading.Thread):
    """Samples a process's VmRSS every `interval` s; past `cap` bytes it kills the process and calls on_cap()."""

    def __init__(self, pid: int, cap: int, on_cap: Callable[[], None], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.cap, self.on_cap, self.interval = pid, cap, on_cap, interval
        self.done = threading.Event()
        self.capped = False
        self.max_rss = 0
        self.hwm = 0
        self.mark_rss: int | None = None
        self.mark_hwm = 0
        self.max_since_mark = 0
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.done.is_set():
            status = proc_status(self.pid)
            if not status:
                return
            rss, hwm = status.get("VmRSS", 0), status.get("VmHWM", 0)
            with self.lock:
                self.max_rss = max(self.max_rss, rss)
                self.hwm = max(self.hwm, hwm)
                self.max_since_mark = max(self.max_since_mark, rss)
            if rss > self.cap:
                self.capped = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.on_cap()
                return
            self.done.wait(self.interval)

    def mark(self) -> None:
        """The attack's hot phase starts: RSS growth is counted from here."""
        status = proc_status(self.pid)
        with self.lock:
            self.mark_rss = status.get("VmRSS", 0)
            self.mark_hwm = status.get("VmHWM", 0)
            self.max_since_mark = self.mark_rss

    def figures(self) -> dict:
        status = proc_status(self.pid)
        with self.lock:
            hwm = max(self.hwm, status.get("VmHWM", 0))
            peak = max(hwm, self.max_rss)
            since = self.max_since_mark
            if hwm > self.mark_hwm:  # the peak came after the mark (VmHWM never goes down)
                since = max(since, hwm)
            return {
                "peak_rss": peak,
                "rss_at_hot": self.mark_rss,
                "peak_since_hot": since if self.mark_rss is not None else None,
                "growth": since - self.mark_rss if self.mark_rss is not None else None,
                "rss_now": status.get("VmRSS"),
            }

    def stop(self) -> None:
        self.done.set()


# === the well-behaved pair (a child process) ============================================================


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


async def pair_child(port: int, rate: float, probe_interval: float, topic: str) -> None:
    """The pair: one publisher, one subscriber on `topic`, and fresh-client probes. Prints `ready`,
    runs until a line arrives on stdin, then prints one JSON line with what it saw."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    url = f"ws://{HOST}:{port}/ws"
    sent: dict[int, float] = {}  # i -> monotonic time sent
    acked: dict[int, int] = {}  # i -> seqNo
    pub_errors: collections.Counter = collections.Counter()
    received: set[int] = set()
    samples: list[tuple[float, float]] = []  # (sent at, latency s)
    duplicates = out_of_order = 0
    last_seq = 0
    disconnects: list[dict] = []
    probes: list[tuple[float, float | None, str]] = []  # (started at, latency s or None, error)
    stop = asyncio.Event()
    session: dict = {}

    async def subscriber_connect(resume: bool):
        ws = await connect(url, open_timeout=10, max_size=None, ping_interval=None, close_timeout=1)
        await ws.send(json.dumps({"type": "setup", "token": "pair-sub"}))
        ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if resume and session:
            await ws.send(json.dumps({"type": "resume", "sessionId": session["id"], "lastSeqPerTopic": {topic: last_seq}}))
        else:
            session["id"] = ready["sessionId"]
            await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") != "subscribed":
                pass
        return ws

    async def subscriber(ws) -> None:
        nonlocal duplicates, out_of_order, last_seq
        while True:
            try:
                raw = await ws.recv()
            except ConnectionClosed as exc:
                if stop.is_set() and not exc.rcvd:
                    return
                disconnects.append({"who": "subscriber", "rcvd": exc.rcvd.code if exc.rcvd else None,
                                    "sent": exc.sent.code if exc.sent else None, "at": time.monotonic()})
                while not stop.is_set():
                    try:
                        ws = await subscriber_connect(resume=True)
                        break
                    except Exception:  # noqa: BLE001 - keep trying until told to stop
                        await asyncio.sleep(0.5)
                else:
                    return
                continue
            now = time.monotonic()
            msg = json.loads(raw)
            if msg.get("type") == "resumed" and "sessionId" in msg:
                session["id"] = msg["sessionId"]
            if msg.get("type") != "message" or msg.get("topic") != topic:
                continue
            seq, i = msg["seqNo"], msg["data"]["i"]
            if seq <= last_seq:
                if i in received:
                    continue  # a resume sends again what may have been lost: not a duplicate delivery
                out_of_order += 1
            elif seq != last_seq + 1 and last_seq:
                out_of_order += 1
            last_seq = max(last_seq, seq)
            if i in received:
                duplicates += 1
                continue
            received.add(i)
            samples.append((msg["data"]["t"], now - msg["data"]["t"]))

    async def publisher() -> None:
        ws = None
        i = 0
        interval = 1.0 / rate
        next_at = time.monotonic()

        async def reader(ws) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg.get("type") == "ack":
                        acked[int(msg["messageId"][1:])] = msg["seqNo"]
                    elif msg.get("type") == "error":
                        pub_errors[msg.get("code")] += 1

        readers = []
        while not stop.is_set():
            if ws is None:
                try:
                    ws = await connect(url, open_timeout=10, ping_interval=None, close_timeout=1)
                    await ws.send(json.dumps({"type": "setup", "token": "pair-pub"}))
                    readers.append(asyncio.create_task(reader(ws)))
                except Exception:  # noqa: BLE001
                    ws = None
                    await asyncio.sleep(0.5)
                    continue
            i += 1
            now = time.monotonic()
            sent[i] = now
            try:
                await ws.send(json.dumps({"type": "publish", "topic": topic, "messageId": f"p{i}", "payload": {"i": i, "t": now}}))
            except ConnectionClosed as exc:
                disconnects.append({"who": "publisher", "rcvd": exc.rcvd.code if exc.rcvd else None, "at": now})
                del sent[i]
                i -= 1
                ws = None
                continue
            next_at += interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        await asyncio.sleep(0)
        # wait for the outstanding acks, then leave the reader running for the final drain
        deadline = time.monotonic() + 5
        while len(acked) + sum(pub_errors.values()) < len(sent) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def prober() -> None:
        while not stop.is_set():
            started = time.monotonic()
            error = ""
            latency = None
            ws = None
            try:
                async def probe():
                    nonlocal ws
                    ws = await connect(url, open_timeout=None, ping_interval=None, close_timeout=0.5)
                    await ws.send(json.dumps({"type": "setup", "token": "probe", "id": 1}))
                    await ws.recv()
                    await ws.send(json.dumps({"type": "subscribe", "topic": "probe", "id": 2}))
                    reply = json.loads(await ws.recv())
                    if reply.get("type") != "subscribed":
                        raise RuntimeError(f"subscribe got {reply.get('type')}")
                await asyncio.wait_for(probe(), 5)
                latency = time.monotonic() - started
            except Exception as exc:  # noqa: BLE001 - a failed probe is a measurement
                error = type(exc).__name__
            finally:
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 1)
            probes.append((started, latency, error))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, probe_interval - (time.monotonic() - started)))

    sub = await subscriber_connect(resume=False)
    sub_task = asyncio.create_task(subscriber(sub))
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)
    print("ready", flush=True)
    tasks = [asyncio.create_task(publisher())]
    if probe_interval > 0:
        tasks.append(asyncio.create_task(prober()))
    await stop.wait()
    loop.remove_reader(sys.stdin.fileno())
    await asyncio.gather(*tasks, return_exceptions=True)
    deadline = time.monotonic() + 3
    while any(i not in received for i in acked) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    sub_task.cancel()
    lost = sorted(i for i in acked if i not in received)
    print(json.dumps({
        "published": len(sent), "acked": len(acked), "received": len(received), "lost": len(lost),
        "lost_ids": lost[:20], "duplicates": duplicates, "out_of_order": out_of_order,
        "publish_errors": dict(pub_errors), "disconnects": disconnects,
        "samples": samples, "probes": probes,
    }), flush=True)


class Pair:
    """The pair's child process: start() waits for `ready`, stop() returns its JSON."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, port: int, rate: float, probe_interval: float, topic: str = "hostile.pair") -> Pair:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, THIS, "--pair-child", "--port", str(port), "--pair-rate", str(rate),
            "--probe-interval", str(probe_interval), "--pair-topic", topic,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        pair = cls(proc)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            if line.strip() != b"ready":
                raise RuntimeError(f"the pair did not start: {line!r}")
        except BaseException:
            await pair.close()
            raise
        return pair

    async def stop(self) -> dict | None:
        try:
            self.proc.stdin.write(b"stop\n")
            await self.proc.stdin.drain()
            line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
            return json.loads(line) if line else None
        except (OSError, asyncio.TimeoutError, ValueError):
            return None
        finally:
            await self.close()

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    async def close(self) -> None:
        """Kill it (by PID) and reap it, so nothing of it outlives the event loop."""
        self.kill()
        with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
            await asyncio.wait_for(self.proc.wait(), 10)


# === attacks ===========================================================================================


class Capped(Exception):
    """The server's RSS passed the cap: it was killed, the attack stopped."""


class Context:
    """What an attack gets: the port, a way to mark its hot phase, sockets it opened (closed by the
    runner), notes for the report, and a stop event set when the server is killed at the cap."""

    def __init__(self, server: ServerProcess, sampler: RssSampler, stopped: asyncio.Event) -> None:
        self.server = server
        self.port = server.port
        self.sampler = sampler
        self.stopped = stopped
        self.sockets: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.window: list[float | None] = [None, None]
        self.cpu_at_hot: float | None = None

    def hot(self) -> None:
        """The attack proper starts (after its preparation): memory and the fresh clients are measured from here."""
        self.sampler.mark()
        self.cpu_at_hot = proc_cpu(self.server.pid)
        self.window[0] = time.monotonic()

    def cold(self) -> None:
        if self.window[1] is None:
            self.window[1] = time.monotonic()

    def keep(self, thing: Any) -> Any:
        self.sockets.append(thing)
        return thing

    def task(self, coro: Awaitable) -> asyncio.Task:
        t = asyncio.ensure_future(coro)
        self.tasks.append(t)
        return t

    async def sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stopped.wait(), seconds)
        if self.stopped.is_set():
            raise Capped()

    async def stats(self) -> dict | None:
        return await server_stats(self.port)

    def close_all(self) -> None:
        for t in self.tasks:
            t.cancel()
        for s in self.sockets:
            if isinstance(s, RawWS):
                s.close()
            elif isinstance(s, socket.socket):
                abort(s)


async def gather_limited(n: int, limit: int, make: Callable[[int], Awaitable]) -> list:
    """make(i) for i in range(n), at most `limit` at a time; exceptions returned, not raised."""
    sem = asyncio.Semaphore(limit)

    async def one(i: int):
        async with sem:
            return await make(i)

    return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def counter_delta(before: dict | None, after: dict | None, key: str) -> dict:
    b = (before or {}).get(key) or {}
    a = (after or {}).get(key) or {}
    return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}


async def count_replies(ws: RawWS, expect: int, timeout: float, what: bytes = b'"type":"ack"') -> collections.Counter:
    """Read until `expect` replies (acks and errors) have come; count them by kind."""
    counts: collections.Counter = collections.Counter()
    deadline = time.monotonic() + timeout
    while counts["ack"] + counts["error"] < expect and time.monotonic() < deadline:
        while ws.frames:
            opcode, _, payload = ws.frames.popleft()
            if opcode != 0x1:
                continue
            if what in payload[:40]:
                counts["ack"] += 1
            elif payload.startswith(b'{"type":"error"'):
                counts["error"] += 1
                code = re.search(rb'"code":"([A-Z_]+)"', payload)
                counts[code.group(1).decode() if code else "?"] += 1
        if counts["ack"] + counts["error"] >= expect:
            break
        try:
            if not await asyncio.wait_for(ws.read_some(1 << 18), max(0.01, deadline - time.monotonic())):
                break
        except asyncio.TimeoutError:
            break
    return counts


# -- replay-amplify


async def fill_history(port: int, topic: str, messages: int, payload_bytes: int, token: str = "filler") -> int:
    """Publish `messages` messages of `payload_bytes` to `topic`; the number acked."""
    ws = await RawWS.open(port)
    try:
        await ws.setup(token)
        payload = "x" * payload_bytes
        acked = 0
        batch = 100
        for start in range(0, messages, batch):
            n = min(batch, messages - start)
            await ws.send(b"".join(text({"type": "publish", "topic": topic, "messageId": f"f{start + k}", "payload": payload})
                                   for k in range(n)))
            acked += (await count_replies(ws, n, 30))["ack"]
        return acked
    finally:
        ws.close()


async def replay_amplify(ctx: Context, p: dict) -> dict:
    """A topic full of history; one connection sends many replay {fromSeq: 1} and never reads."""
    topic = "hostile.history"
    rss_before = proc_status(ctx.server.pid).get("VmRSS", 0)
    acked = await fill_history(ctx.port, topic, p["messages"], p["payload_bytes"])
    before = await ctx.stats()
    retained = (before or {}).get("history", {}).get("bytes")
    ws = ctx.keep(await RawWS.open(ctx.port, rcvbuf=4096, keep=256))
    await ws.setup("replayer")
    ctx.hot()
    n = p["requests"]
    await ws.send(b"".join(text({"type": "replay", "topic": topic, "fromSeq": 1, "id": k}) for k in range(n)))
    await ctx.sleep(p["hold"])
    during = await ctx.stats()
    unread = ctx.sampler.figures()
    replayed = ((during or {}).get("replayed", 0) - (before or {}).get("replayed", 0))
    result = {
        "history_messages": acked, "history_bytes": retained, "requests": n, "request_bytes": len(text({"type": "replay", "topic": topic, "fromSeq": 1, "id": 0})) * n,
        "replayed_while_unread": replayed, "answered_while_unread": round(replayed / acked, 2) if acked else None,
        # RSS before the history was filled, and its peak while the client did not read: what the
        # history and the unread replays cost together
        "rss_before_history": rss_before, "peak_while_unread": unread["peak_since_hot"],
        "growth_while_unread": unread["peak_since_hot"] - rss_before,
    }
    did = f"{result['answered_while_unread']:g} of {n} replays answered while the client did not read"
    if p.get("read_after"):
        ctx.cold()
        with contextlib.suppress(OSError):  # read fast now
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        answers, messages, order_ok = [], 0, True
        deadline = time.monotonic() + p["read_timeout"]
        while len(answers) < n and time.monotonic() < deadline:
            try:
                opcode, _, payload = await ws.recv_frame(max(0.01, deadline - time.monotonic()))
            except (asyncio.TimeoutError, Closed):
                break
            if opcode != 0x1:
                continue
            if payload.startswith(b'{"type":"message"'):
                messages += 1
            elif payload.startswith(b'{"type":"replayed"'):
                msg = json.loads(payload)
                order_ok &= msg.get("id") == len(answers)
                answers.append(msg)
        result.update(answers=len(answers), answers_in_order=order_ok, messages_read=messages,
                      to_seq=[a.get("toSeq") for a in answers][:3])
        did += f"; on reading, {len(answers)} of {n} came{' in order' if order_ok else ' OUT OF ORDER'}"
    result["did"] = did
    return result


# -- presence-amplify


async def open_crowd(ctx: Context, n: int, token: Callable[[int], str], topics: list[str], limit: int = 100) -> tuple[list[RawWS], int]:
    async def one(i: int) -> RawWS:
        ws = await RawWS.open(ctx.port, timeout=30)
        ctx.keep(ws)
        await ws.setup(token(i), topics, timeout=30)
        return ws

    results = await gather_limited(n, limit, one)
    return [r for r in results if isinstance(r, RawWS)], sum(1 for r in results if not isinstance(r, RawWS))


async def presence_amplify(ctx: Context, p: dict) -> dict:
    """Many users with long tokens on one topic; one client sends many presence requests in one segment, never reads."""
    topic = "hostile.crowd"
    pad = "x" * p["token_len"]
    crowd, failed = await open_crowd(ctx, p["users"], lambda i: f"u{i:06d}{pad}"[: p["token_len"]], [topic])
    ws = ctx.keep(await RawWS.open(ctx.port, rcvbuf=4096, keep=512))
    await ws.setup("presence-attacker")
    ctx.hot()
    n = p["requests"]
    await ws.send(b"".join(text({"type": "presence", "topic": topic, "id": k}) for k in range(n)))
    await ctx.sleep(p["hold"])
    answer_bytes = len(crowd) * (p["token_len"] + 3) + 60
    result = {"users": len(crowd), "crowd_failed": failed, "requests": n, "answer_bytes_estimate": answer_bytes,
              "growth_while_unread": ctx.sampler.figures()["growth"]}
    did = f"{n} presence asks of ~{answer_bytes / MiB:.1f} MB answers each"
    if p.get("read_after"):
        ctx.cold()
        with contextlib.suppress(OSError):  # read fast now
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        answers, counts, sizes = 0, set(), set()
        deadline = time.monotonic() + p["read_timeout"]
        while answers < n and time.monotonic() < deadline:
            try:
                opcode, length, payload = await ws.recv_frame(max(0.01, deadline - time.monotonic()))
            except (asyncio.TimeoutError, Closed):
                break
            if opcode == 0x1 and payload.startswith(b'{"type":"presence"'):
                answers += 1
                sizes.add(length)
        # the count of one answer, from a fresh small request
        await ws.send_json({"type": "presence", "topic": topic, "id": "last"})
        with contextlib.suppress(asyncio.TimeoutError, Closed):
            ws.stream.keep = None
            while True:
                opcode, length, payload = await ws.recv_frame(5)
                if opcode == 0x1 and payload.startswith(b'{"type":"presence"'):
                    counts.add(json.loads(payload)["count"])
                    sizes.add(length)
                    break
        result.update(answers=answers, answer_sizes=sorted(sizes), counts=sorted(counts))
        did += f"; on reading, {answers} of {n} came"
        if sizes:
            did += f" ({max(sizes) / MiB:.1f} MB frames)"
    result["did"] = did
    return result


# -- fragment-hold


async def watch_close(ws: RawWS) -> None:
    """Read (and drop) what arrives until EOF, keeping the close code."""
    with contextlib.suppress(Exception):
        while await ws.read_some(65536):
            ws.frames.clear()


def close_summary(conns: list[RawWS]) -> collections.Counter:
    """How the connections ended: by close code, 'eof' (TCP closed without a close frame), 'open'."""
    ended: collections.Counter = collections.Counter()
    for ws in conns:
        if ws.close_code is not None:
            ended[str(ws.close_code)] += 1
        elif ws.eof:
            ended["eof"] += 1
        else:
            ended["open"] += 1
    return ended


def describe(ended: collections.Counter) -> str:
    parts = [f"{n} {'closed ' + k if k.isdigit() else k}" for k, n in sorted(ended.items(), key=lambda kv: (not kv[0].isdigit(), kv[0]))]
    return ", ".join(parts) if parts else "nothing"


async def fragment_hold(ctx: Context, p: dict) -> dict:
    """Many connections each holding an unfinished fragmented message just under the message size limit."""
    size = p["size"]
    body = b"a" * size
    header = frame_header(0x1, size, fin=False)
    conns: list[RawWS] = []
    failed = 0
    reasons: collections.Counter = collections.Counter()
    ctx.hot()
    interval = 1.0 / p["rate"] if p.get("rate") else 0.0
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failed
        if interval:
            await asyncio.sleep(max(0.0, started + i * interval - time.monotonic()))
        try:
            ws = ctx.keep(await RawWS.open(ctx.port, timeout=20, keep=256))
            await ws.setup(f"frag{i}")
            await ws.send(header)
            await ws.send(body)
            conns.append(ws)
            ctx.task(watch_close(ws))
        except (OSError, Refused, Closed, asyncio.TimeoutError, RuntimeError):
            failed += 1

    await gather_limited(p["conns"], 50, one)
    sent = time.monotonic() - started
    await ctx.sleep(p["hold"])
    for ws in conns:
        if ws.close_code is not None:
            reasons[ws.close_reason] += 1
    ended = close_summary(conns)
    return {"conns": len(conns), "failed": failed, "bytes_each": size, "held_bytes": len(conns) * size, "sent_in_s": round(sent, 2),
            "ended": dict(ended), "reasons": dict(reasons),
            "did": f"{len(conns)} × {size / MiB:.2f} MB unfinished: {describe(ended)}" + (f" ({failed} failed to connect)" if failed else "")}


# -- deflate-hold and deflate-bomb: compressed messages (permessage-deflate, RFC 7692)

DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"  # what Chrome offers


def compressed(size: int) -> bytes:
    """`size` bytes of "a" as one permessage-deflate message payload (raw deflate, sync flush, tail
    removed), compressed a MiB at a time: a gigabyte bomb is made without holding a gigabyte."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"a" * MiB
    out = [compressor.compress(chunk[: min(MiB, size - done)]) for done in range(0, size, MiB)]
    out.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(out)[:-4]


def compressed_frame(payload: bytes, fin: bool = True) -> bytes:
    """A masked text frame with RSV1 set (the first frame of a compressed message)."""
    data = frame(0x1, payload, fin)
    return bytes((data[0] | 0x40,)) + data[1:]


async def open_deflate(ctx: Context, token: str) -> RawWS:
    """A set-up connection that negotiated permessage-deflate, or RuntimeError saying the server did not."""
    ws = ctx.keep(await RawWS.open(ctx.port, timeout=20, keep=256, extensions=DEFLATE_OFFER))
    if "permessage-deflate" not in ws.extensions:
        raise RuntimeError("the server did not accept permessage-deflate (start it with --permessage-deflate)")
    await ws.setup(token)
    return ws


async def deflate_hold(ctx: Context, p: dict) -> dict:
    """Many connections each holding an unfinished compressed message that inflates to just under the
    limit: about a kilobyte on the wire each, a megabyte in the server unless it counts what it inflated."""
    payload = compressed(p["inflates_to"])
    first = compressed_frame(payload, fin=False)
    conns: list[RawWS] = []
    failed = 0
    ctx.hot()
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failed
        try:
            ws = await open_deflate(ctx, f"dhold{i}")
            await ws.send(first)
            conns.append(ws)
            ctx.task(watch_close(ws))
        except (OSError, Refused, Closed, asyncio.TimeoutError):
            failed += 1

    first_conn = await open_deflate(ctx, "dhold-first")  # fails the attack at once on a server without the extension
    first_conn.close()
    await gather_limited(p["conns"], 50, one)
    sent = time.monotonic() - started
    await ctx.sleep(p["hold"])
    ended = close_summary(conns)
    return {"conns": len(conns), "failed": failed, "wire_bytes_each": len(first), "inflates_to": p["inflates_to"],
            "sent_in_s": round(sent, 2), "ended": dict(ended),
            "did": f"{len(conns)} × {len(first):,} B inflating to {p['inflates_to'] / MiB:.2f} MB, unfinished: {describe(ended)}"
                   + (f" ({failed} failed to connect)" if failed else "")}


async def deflate_bomb(ctx: Context, p: dict) -> dict:
    """Compressed messages that inflate far past the limit (a few KB each inflating to `inflates_to`),
    sent by `conns` connections at a time, each reconnecting after its close, `bombs` in all."""
    payload = compressed(p["inflates_to"])
    bomb = compressed_frame(payload)
    codes: collections.Counter = collections.Counter()
    times: list[float] = []
    failed = 0
    first_conn = await open_deflate(ctx, "dbomb-first")
    first_conn.close()
    ctx.hot()
    started = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failed
        try:
            ws = await open_deflate(ctx, f"dbomb{i}")
            sent = time.monotonic()
            await ws.send(bomb)
            with contextlib.suppress(asyncio.TimeoutError):
                await watch_close_for(ws, p["timeout"])
            times.append(time.monotonic() - sent)
            codes[str(ws.close_code) if ws.close_code is not None else ("eof" if ws.eof else "open")] += 1
            ws.close()
        except (OSError, Refused, Closed, asyncio.TimeoutError):
            failed += 1

    await gather_limited(p["bombs"], p["conns"], one)
    elapsed = time.monotonic() - started
    ctx.cold()
    cpu = proc_cpu(ctx.server.pid)
    cpu_each = None if cpu is None or ctx.cpu_at_hot is None or not times else (cpu - ctx.cpu_at_hot) / len(times)
    times.sort()
    return {"bombs": len(times), "failed": failed, "wire_bytes_each": len(bomb), "inflates_to": p["inflates_to"],
            "closes": dict(codes), "elapsed_s": round(elapsed, 2),
            "close_p99_ms": round(times[int(0.99 * (len(times) - 1))] * 1000, 1) if times else None,
            "server_cpu_ms_each": None if cpu_each is None else round(cpu_each * 1000, 2),
            "did": f"{len(times)} bombs of {len(bomb):,} B → {p['inflates_to'] / MiB:,.0f} MB: {describe(codes)}"
                   + (f", {cpu_each * 1000:.1f} ms of server CPU each (handshake and setup included)" if cpu_each is not None else "")}


async def watch_close_for(ws: RawWS, timeout: float) -> None:
    """Read until the server closes (close frame or EOF), for at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ws.eof and ws.close_code is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError("the server did not close")
        await asyncio.wait_for(ws.read_some(), left)


# -- slow-readers


async def slow_readers(ctx: Context, p: dict) -> dict:
    """Many subscribers that read a little every so often while a topic gets heavy traffic."""
    topic = "hostile.heavy"

    async def one(i: int) -> RawWS:
        ws = await RawWS.open(ctx.port, rcvbuf=p["rcvbuf"], timeout=30, keep=256)
        ctx.keep(ws)
        await ws.setup(f"slow{i}", [topic], timeout=30)
        return ws

    readers = [r for r in await gather_limited(p["readers"], 100, one) if isinstance(r, RawWS)]
    publisher = ctx.keep(await RawWS.open(ctx.port, keep=128))
    await publisher.setup("heavy-publisher")
    stop_reading = asyncio.Event()

    async def read_slowly(ws: RawWS) -> None:
        with contextlib.suppress(Exception):
            while not stop_reading.is_set() and not ws.eof:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_reading.wait(), p["read_every"] * random.uniform(0.8, 1.2))
                if stop_reading.is_set() or not await ws.read_some(p["read_bytes"]):
                    break
                ws.frames.clear()

    slow = [ctx.task(read_slowly(ws)) for ws in readers]
    acks: collections.Counter = collections.Counter()

    async def ack_reader() -> None:
        with contextlib.suppress(Exception):
            while await publisher.read_some():
                while publisher.frames:
                    _, _, payload = publisher.frames.popleft()
                    acks["ack" if payload.startswith(b'{"type":"ack"') else "other"] += 1

    ctx.task(ack_reader())
    payload = "y" * p["msg_bytes"]
    ctx.hot()
    before = await ctx.stats()
    started = time.monotonic()
    sent = 0
    tick = 0.02
    while time.monotonic() - started < p["duration"]:
        due = int((time.monotonic() - started) * p["rate"]) - sent
        if due > 0:
            await publisher.send(b"".join(text({"type": "publish", "topic": topic, "messageId": f"h{sent + k}", "payload": payload})
                                          for k in range(due)))
            sent += due
        await ctx.sleep(tick)
    ctx.cold()
    stop_reading.set()
    await asyncio.gather(*slow, return_exceptions=True)
    # the drain: every reader reads what it can, fast, to find its close frame (if it was closed)
    for ws in readers:
        with contextlib.suppress(OSError):
            ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    drained = await asyncio.gather(*(ws.drain(p["drain"], until=lambda ws=ws: ws.close_code is not None) for ws in readers),
                                   return_exceptions=True)
    drain_errors = collections.Counter(type(d).__name__ for d in drained if isinstance(d, BaseException))
    ended = close_summary(readers)
    for ws in readers:  # the server counts each by the close code it sent (1006: it had not closed it)
        ws.close()
    await ctx.sleep(0.5)
    after = await ctx.stats()
    disc = {k: v for k, v in counter_delta(before, after, "disconnects").items() if k != "1000"}  # 1000: the probes
    reasons = collections.Counter(f"{ws.close_code} {ws.close_reason}" for ws in readers if ws.close_code is not None)
    return {"readers": len(readers), "published": sent, "acks": acks["ack"], "msg_bytes": p["msg_bytes"], "rate": p["rate"],
            "ended": dict(ended), "reasons": dict(reasons), "drain_errors": dict(drain_errors),
            "server_disconnects": disc,
            "did": f"{len(readers)} slow readers of {p['rate'] * p['msg_bytes'] / 1e6:.1f} MB/s each: server closed "
                   f"{', '.join(f'{n} with {c}' for c, n in sorted(disc.items()) if c != '1006') or 'none'}"
                   + (f" ('{reasons.most_common(1)[0][0].split(' ', 1)[1]}')" if reasons else "")
                   + (f", {disc['1006']} not closed" if disc.get("1006") else "")}


# -- topic-flood


async def topic_flood(ctx: Context, p: dict) -> dict:
    """Publishing to very many distinct topics over several connections (within the publish rate)."""
    total, conns_n = p["topics"], p["conns"]
    pad = "x" * p["topic_len"]
    name = lambda i: f"flood.{i:09d}.{pad}"[: p["topic_len"]]  # noqa: E731
    conns = []
    for i in range(conns_n):
        ws = ctx.keep(await RawWS.open(ctx.port, keep=64))
        await ws.setup(f"flooder{i}")
        conns.append(ws)
    counts: collections.Counter = collections.Counter()
    ctx.hot()
    started = time.monotonic()
    burst, rate = p["burst"], p["rate_limit"]

    async def flood(c: int, ws: RawWS) -> None:
        mine = list(range(c, total, conns_n))
        sent = 0
        t0 = time.monotonic()

        async def read() -> collections.Counter:
            return await count_replies(ws, len(mine), p["timeout"])

        reader = asyncio.ensure_future(read())
        try:
            while sent < len(mine):
                allowed = int(burst + rate * (time.monotonic() - t0)) - sent - 5
                n = min(max(0, allowed), len(mine) - sent, 2000)
                if n:
                    await ws.send(b"".join(text({"type": "publish", "topic": name(i), "messageId": f"m{i}", "payload": i})
                                           for i in mine[sent:sent + n]))
                    sent += n
                else:
                    await ctx.sleep(0.05)
            counts.update(await reader)
        finally:
            reader.cancel()

    await asyncio.gather(*(flood(c, ws) for c, ws in enumerate(conns)))
    elapsed = time.monotonic() - started
    ctx.cold()
    stats = await ctx.stats() or {}
    # was the first topic forgotten? Its subscribe says its latest seqNo (0: a new epoch, counter forgotten)
    probe = ctx.keep(await RawWS.open(ctx.port))
    await probe.setup("flood-check")
    await probe.send_json({"type": "subscribe", "topic": name(0)})
    first = await probe.recv_json()
    await probe.send_json({"type": "subscribe", "topic": name(total - 1)})
    last = await probe.recv_json()
    seq_topics = stats.get("sequenced_topics")
    errors = {k: v for k, v in counts.items() if k not in ("ack", "error")}
    return {"topics": total, "conns": conns_n, "acks": counts["ack"], "errors": errors, "elapsed_s": round(elapsed, 2),
            "rate_per_s": round(total / elapsed) if elapsed else None, "sequenced_topics": seq_topics,
            "history": stats.get("history"), "dedup": stats.get("dedup"),
            "first_topic_seq": first.get("seqNo"), "last_topic_seq": last.get("seqNo"),
            "did": f"{counts['ack']} of {total} publishes acked ({', '.join(f'{n} {k}' for k, n in errors.items()) or 'none refused'}), "
                   f"{total / elapsed:,.0f}/s; server keeps {seq_topics} sequenced topics; first topic "
                   + ("forgotten" if first.get("seqNo") == 0 else "kept")}


# -- continuation-flood


async def continuation_flood(ctx: Context, p: dict) -> dict:
    """One connection streams zero-length continuation frames after a first fragment."""
    ws = ctx.keep(await RawWS.open(ctx.port, keep=256))
    await ws.setup("continuer")
    answered: list[float] = []

    async def watch() -> None:  # the close, or the pong that answers the message once it is complete
        with contextlib.suppress(Exception):
            while await ws.read_some(65536):
                while ws.frames:
                    opcode, _, payload = ws.frames.popleft()
                    if opcode == 0x1 and b'"pong"' in payload:
                        answered.append(time.monotonic())

    ctx.task(watch())
    empty = frame_header(0x0, 0, fin=False)  # 6 bytes
    per_chunk = p["chunk_frames"]
    chunk = empty * per_chunk
    ctx.hot()
    started = time.monotonic()
    sent = 0
    error = ""
    try:
        await ws.send(frame(0x1, b'{"type":"ping","id":"', fin=False))
        while sent < p["frames"] and ws.close_code is None and not ws.eof:
            n = min(per_chunk, p["frames"] - sent)
            await asyncio.wait_for(ws.send(chunk if n == per_chunk else empty * n), p["timeout"])
            sent += n
        if ws.close_code is None and not ws.eof:
            await ws.send(frame(0x0, b'x"}', fin=True))
    except (OSError, asyncio.TimeoutError) as exc:
        error = type(exc).__name__
    sent_s = time.monotonic() - started
    deadline = time.monotonic() + p["timeout"]
    while ws.close_code is None and not ws.eof and not answered and time.monotonic() < deadline:
        await ctx.sleep(0.02)
    await ctx.sleep(p.get("hold", 0.3))
    ctx.cold()
    code = ws.close_code
    took = (answered[0] - started) if answered else None
    return {"frames_sent": sent, "bytes_sent": sent * len(empty), "sent_in_s": round(sent_s, 2), "close_code": code,
            "close_reason": ws.close_reason, "send_error": error,
            "did": (f"closed {code} '{ws.close_reason}' within {sent_s:.2f} s (the client had written {sent:,} frames into the socket)"
                    if code is not None else f"no close: {sent:,} empty frames taken as one message"
                    + (f", answered after {took:.1f} s" if took is not None else ", not answered"))}


# -- wide-utf8


def wide_payload(chars: int) -> str:
    return "é" * chars


def publish_size(topic: str, message_id: str, chars: int) -> int:
    return len(json.dumps({"type": "publish", "topic": topic, "messageId": message_id, "payload": wide_payload(chars)},
                          separators=(",", ":"), ensure_ascii=False).encode())


async def wide_utf8(ctx: Context, p: dict) -> dict:
    """A publish of ~1 MiB of 'é' (2 bytes each in UTF-8, 6 as a \\u escape) to a topic whose subscriber keeps
    the common 1 MiB message limit and reconnects and resumes when it is closed."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    topic = "hostile.wide"
    url = f"ws://{HOST}:{ctx.port}/ws"
    limit = p["limit"]
    # the largest publish under the inbound limit (the widest message a client can send)
    wide_chars = (limit - publish_size(topic, "wide", 0) - p["under"]) // 2
    fit_chars = p["fit_chars"]
    got: list[tuple[int, int, bool]] = []  # (seqNo, chars, intact)
    disconnects: list = []
    state: dict = {"last": 0}
    stop = asyncio.Event()

    async def subscriber() -> None:
        ws = await connect(url, max_size=limit, ping_interval=None, close_timeout=1)  # the websockets default limit
        await ws.send(json.dumps({"type": "setup", "token": "wide-sub"}))
        ready = json.loads(await ws.recv())
        state["session"] = ready["sessionId"]
        await ws.send(json.dumps({"type": "subscribe", "topic": topic}))
        state["subscribed"] = json.loads(await ws.recv())
        while not stop.is_set():
            try:
                msg = json.loads(await ws.recv())
            except ConnectionClosed as exc:
                if stop.is_set():
                    return
                disconnects.append(exc.sent.code if exc.sent else (exc.rcvd.code if exc.rcvd else None))
                ws = await connect(url, max_size=limit, ping_interval=None, close_timeout=1)
                await ws.send(json.dumps({"type": "setup", "token": "wide-sub"}))
                json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "resume", "sessionId": state["session"], "lastSeqPerTopic": {topic: state["last"]}}))
                continue
            if msg.get("type") == "resumed":
                state["session"] = msg["sessionId"]
            if msg.get("type") == "message" and msg.get("topic") == topic:
                data = msg["data"]
                got.append((msg["seqNo"], len(data), data == wide_payload(len(data))))
                state["last"] = max(state["last"], msg["seqNo"])

    sub = ctx.task(subscriber())
    await ctx.sleep(0.3)
    pub = ctx.keep(await RawWS.open(ctx.port))
    await pub.setup("wide-pub")
    ctx.hot()
    replies = {}
    for mid, chars in (("fit", fit_chars), ("wide", wide_chars)):
        await pub.send_json({"type": "publish", "topic": topic, "messageId": mid, "payload": wide_payload(chars)})
        replies[mid] = await pub.recv_json(10)
    await ctx.sleep(p["hold"])
    ctx.cold()
    stop.set()
    sub.cancel()
    wide_reply = replies["wide"]
    fit_got = [g for g in got if g[1] == fit_chars]
    wide_got = [g for g in got if g[1] == wide_chars]
    result = {
        "fit_chars": fit_chars, "fit_publish_bytes": publish_size(topic, "fit", fit_chars),
        "wide_chars": wide_chars, "wide_publish_bytes": publish_size(topic, "wide", wide_chars),
        "fit_reply": replies["fit"], "wide_reply": {k: v for k, v in wide_reply.items()},
        "fit_delivered": len(fit_got), "fit_intact": all(g[2] for g in fit_got) if fit_got else None,
        "wide_delivered": len(wide_got), "subscriber_disconnects": len(disconnects),
        "disconnect_codes": dict(collections.Counter(map(str, disconnects))),
    }
    if wide_reply.get("type") == "error":
        did = f"wide publish refused {wide_reply.get('code')} field {wide_reply.get('field')}"
    else:
        did = f"wide publish {wide_reply.get('type')} {wide_reply.get('status', '')}".rstrip()
    did += f"; fit one delivered {len(fit_got)}×; subscriber (1 MiB limit) "
    did += (f"closed {len(disconnects)}× ({', '.join(f'{n}× {c}' for c, n in result['disconnect_codes'].items())}) in {p['hold']:g} s"
            if disconnects else "never closed")
    result["did"] = did
    return result


# -- http-pipeline


async def http_pipeline(ctx: Context, p: dict) -> dict:
    """Thousands of pipelined GET /docs from a client that never reads."""
    _, _, body = await http_get(ctx.port, "/docs")
    size = len(body)
    sock = ctx.keep(await tcp_connect(ctx.port, rcvbuf=4096))
    loop = asyncio.get_running_loop()
    request = f"GET /docs HTTP/1.1\r\nHost: {HOST}:{ctx.port}\r\n\r\n".encode()
    n = p["requests"]
    data = request * n
    ctx.hot()
    sent = 0
    step = 4096
    deadline = time.monotonic() + p["send_for"]
    while sent < len(data) and time.monotonic() < deadline:
        try:
            await asyncio.wait_for(loop.sock_sendall(sock, data[sent:sent + step]), max(0.01, deadline - time.monotonic()))
            sent += min(step, len(data) - sent)
        except asyncio.TimeoutError:
            break
        except OSError:
            break
    sent_requests = sent // len(request)
    await ctx.sleep(p["hold"])
    ctx.cold()
    held = ctx.sampler.figures()["growth"]
    result = {"docs_bytes": size, "requests": n, "requests_sent": sent_requests,
              "would_queue_bytes": sent_requests * size}
    did = (f"{sent_requests:,} of {n:,} requests sent ({sent / 1e3:,.0f} KB) and nothing read: the server held "
           f"{held / 1e6:,.0f} MB more ({sent_requests * size / 1e6:,.0f} MB if every answer were queued)")
    if p.get("read_after"):
        good = 0
        buf = b""
        end = time.monotonic() + 10
        while good < p["read_after"] and time.monotonic() < end:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 18), 5)
            except (asyncio.TimeoutError, OSError):
                break
            if not chunk:
                break
            buf += chunk
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end < 0:
                    break
                head = buf[:head_end].decode("latin-1")
                length = int(re.search(r"(?i)content-length: (\d+)", head).group(1))
                if len(buf) < head_end + 4 + length:
                    break
                if head.startswith("HTTP/1.1 200") and length == size:
                    good += 1
                buf = buf[head_end + 4 + length:]
        result["read_ok"] = good
        did += f"; on reading, {good} answers of {size:,} bytes, in order"
    status, _, _ = await http_get(ctx.port, "/healthz")
    result["healthz"] = status
    result["did"] = did
    return result


# -- session-hoard


async def session_hoard(ctx: Context, p: dict) -> dict:
    """Many detached sessions, each subscribed to many topics (one subscribe each, then a clean close).
    Subscribes rather than `setup.topics`: a long `setup.topics` costs the server time quadratic in
    its length (see setup-topics), which would measure that instead of what sessions keep."""
    subscribes = b"".join(text({"type": "subscribe", "topic": f"hoard.{j}"}) for j in range(p["topics_per"]))
    ids: list[str | None] = [None] * p["sessions"]
    failed = 0
    ctx.hot()

    async def one(i: int) -> None:
        nonlocal failed
        try:
            ws = ctx.keep(await RawWS.open(ctx.port, timeout=30, keep=256))
            token = f"hoarder{i}"
            await ws.send(text({"type": "setup", "token": token}) + subscribes + close_frame(1000))
            ready = await ws.recv_json(60)
            ids[i] = ready.get("sessionId")
            ws.stream.keep = 0
            await ws.drain(60)  # the subscribed replies, the close echo, then EOF
            ws.close()
        except (OSError, Refused, Closed, asyncio.TimeoutError, ValueError):
            failed += 1

    started = time.monotonic()
    await gather_limited(p["sessions"], p["concurrency"], one)
    elapsed = time.monotonic() - started
    ctx.cold()
    stats = await ctx.stats() or {}
    growth = ctx.sampler.figures()["growth"] or 0
    positions = (p["sessions"] - failed) * p["topics_per"]
    per_position = growth / positions if positions else 0
    limits = await server_limits(ctx.port)
    # The most topic positions detached sessions may keep: the sessions cap times the topics per
    # connection, or the positions cap where the server has one (--max-session-topics).
    worst_positions = limits.get("maxSessions", 0) * limits.get("maxSubscriptions", p["topics_per"])
    if limits.get("maxSessionTopics"):
        worst_positions = min(worst_positions, limits["maxSessionTopics"])

    async def resume(i: int) -> dict:
        ws = ctx.keep(await RawWS.open(ctx.port))
        await ws.setup(f"hoarder{i}")
        await ws.send_json({"type": "resume", "sessionId": ids[i]})
        while True:
            msg = await ws.recv_json(30)
            if msg.get("type") in ("resumed", "error"):
                ws.close()
                return msg

    first = await resume(0) if ids[0] else {}
    last = await resume(p["sessions"] - 1) if ids[-1] else {}
    kept = stats.get("sessions")
    first_ok = first.get("type") == "resumed"
    return {"sessions": p["sessions"], "topics_per": p["topics_per"], "failed": failed, "elapsed_s": round(elapsed, 2),
            "server_sessions": kept, "first_resume": first.get("type") if first_ok else first.get("code"),
            "first_resume_topics": len(first.get("topics", [])), "last_resume": last.get("type") if last.get("type") == "resumed" else last.get("code"),
            "last_resume_topics": len(last.get("topics", [])), "bytes_per_position": round(per_position),
            "limits": {k: limits.get(k) for k in ("maxSessions", "maxSessionTopics", "maxSubscriptions")},
            "worst_case_bytes": round(worst_positions * per_position),
            "did": f"{p['sessions']:,} sessions × {p['topics_per']:,} topics detached in {elapsed:.1f} s "
                   f"({per_position:,.0f} B per topic kept); server keeps {kept:,} sessions, oldest "
                   f"{'resumable' if first_ok else 'dropped (' + str(first.get('code')) + ')'}; its limits allow "
                   f"{worst_positions:,} positions: ~{worst_positions * per_position / 1e9:,.1f} GB"}


# -- burst


async def burst(ctx: Context, p: dict) -> dict:
    """Many connections spending their whole publish burst at once."""
    conns = []
    for i in range(p["conns"]):
        ws = ctx.keep(await RawWS.open(ctx.port, keep=64))
        await ws.setup(f"burster{i}")
        conns.append(ws)
    blobs = [b"".join(text({"type": "publish", "topic": f"burst.{i}", "messageId": f"b{k}", "payload": k}) for k in range(p["per_conn"]))
             for i in range(len(conns))]
    await ctx.sleep(0.5)  # fresh-client probes before the burst, for comparison
    ctx.hot()
    started = time.monotonic()
    readers = [asyncio.ensure_future(count_replies(ws, p["per_conn"], p["timeout"])) for ws in conns]
    await asyncio.gather(*(ws.send(blob) for ws, blob in zip(conns, blobs)))
    counts: collections.Counter = collections.Counter()
    for c in await asyncio.gather(*readers):
        counts.update(c)
    elapsed = time.monotonic() - started
    ctx.cold()
    errors = {k: v for k, v in counts.items() if k not in ("ack", "error")}
    total = p["conns"] * p["per_conn"]
    return {"publishes": total, "acks": counts["ack"], "errors": errors, "answered_in_s": round(elapsed, 2),
            "did": f"{total:,} publishes at once: {counts['ack']:,} acked, "
                   f"{', '.join(f'{n:,} {k}' for k, n in errors.items()) or 'none refused'}, all answered in {elapsed:.1f} s"}


# -- setup-topics (not in the table: found by this battery)


async def setup_topics(ctx: Context, p: dict) -> dict:
    """One `setup` whose `topics` array holds many distinct topics (over --max-subscriptions, so it must be
    refused): how long the server takes to say so, and what the others wait meanwhile."""
    n = p["topics"]
    data = text({"type": "setup", "token": "setup-topics", "topics": [f"s{i}" for i in range(n)]})
    ws = ctx.keep(await RawWS.open(ctx.port))
    ctx.hot()
    started = time.monotonic()
    await ws.send(data)
    reply = await ws.recv_json(p["timeout"])
    took = time.monotonic() - started
    await ctx.sleep(0.3)
    ctx.cold()
    return {"topics": n, "bytes": len(data), "reply": reply.get("code") or reply.get("type"), "answered_in_s": round(took, 3),
            "did": f"one setup of {len(data) / 1e3:,.0f} KB with {n:,} topics: {reply.get('code') or reply.get('type')} after {took:.2f} s"}


# -- bare-tcp


async def bare_tcp(ctx: Context, p: dict) -> dict:
    """Many bare TCP connections that never send a byte; then /healthz and a fresh WebSocket client."""
    limit = raise_nofile()
    n = min(p["conns"], limit - 100)
    socks: list[socket.socket] = []
    failed: collections.Counter = collections.Counter()
    poller = {"requests": 0, "error": None}
    stop_polling = asyncio.Event()

    async def poll() -> None:
        """A monitoring client: one keep-alive connection asking /healthz every 50 ms, opened before the flood."""
        try:
            reader, writer = await asyncio.open_connection(HOST, ctx.port)
        except OSError as exc:
            poller["error"] = type(exc).__name__
            return
        try:
            while not stop_polling.is_set():
                writer.write(f"GET /healthz HTTP/1.1\r\nHost: {HOST}:{ctx.port}\r\n\r\n".encode())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
                await asyncio.wait_for(reader.readexactly(length), 5)
                poller["requests"] += 1
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_polling.wait(), 0.05)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, AttributeError) as exc:
            poller["error"] = type(exc).__name__
        finally:
            writer.close()

    polling = ctx.task(poll()) if p.get("poller") else None
    await asyncio.sleep(0.2 if polling else 0)
    ctx.hot()

    interval = 1.0 / p["rate"] if p.get("rate") else 0.0

    async def one(i: int) -> None:
        if interval:
            await asyncio.sleep(max(0.0, started + i * interval - time.monotonic()))
        try:
            socks.append(ctx.keep(await tcp_connect(ctx.port, timeout=p["connect_timeout"])))
        except asyncio.TimeoutError:
            failed["timeout"] += 1
        except OSError as exc:
            failed[type(exc).__name__] += 1

    started = time.monotonic()
    await gather_limited(n, 500 if not interval else n, one)
    opened = time.monotonic() - started
    await ctx.sleep(p["hold"])
    # /healthz and a fresh client, while the bare connections are held
    checks = {}
    t0 = time.monotonic()
    try:
        status, _, _ = await http_get(ctx.port, "/healthz", timeout=p["check_timeout"])
        checks["healthz"] = status
    except (OSError, asyncio.TimeoutError) as exc:
        checks["healthz"] = type(exc).__name__
    checks["healthz_ms"] = round((time.monotonic() - t0) * 1000, 1)
    t0 = time.monotonic()
    try:
        ws = ctx.keep(await RawWS.open(ctx.port, timeout=p["check_timeout"]))
        await ws.setup("fresh", ["fresh.topic"], timeout=p["check_timeout"])
        await ws.send_json({"type": "publish", "topic": "fresh.topic", "messageId": "x1", "payload": 1})
        replies = [await ws.recv_json(p["check_timeout"]) for _ in range(2)]
        checks["fresh_client"] = "ok" if {r.get("type") for r in replies} == {"ack", "message"} else str(replies)
    except (OSError, Refused, Closed, asyncio.TimeoutError, RuntimeError) as exc:
        checks["fresh_client"] = type(exc).__name__
    checks["fresh_client_ms"] = round((time.monotonic() - t0) * 1000, 1)
    ctx.cold()
    stop_polling.set()
    if polling is not None:
        await asyncio.gather(polling, return_exceptions=True)
        checks["poller_requests"], checks["poller_error"] = poller["requests"], poller["error"]
    # how many of the bare connections has the server closed?
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    lines = ctx.server.log().splitlines()
    accept_lines = sum(1 for line in lines if "accept" in line.lower())
    tracebacks = sum(1 for line in lines if line.startswith("Traceback"))
    return {"conns": n, "opened": len(socks), "failed": dict(failed), "opened_in_s": round(opened, 2), "closed_by_server": closed,
            "server_nofile": p.get("server_nofile"), **checks, "log_lines": len(lines), "log_accept_lines": accept_lines,
            "log_tracebacks": tracebacks,
            "did": f"{len(socks):,} of {n:,} bare connections opened (server open-file limit {p.get('server_nofile')}), "
                   f"{closed:,} closed by the server; /healthz {checks['healthz']} in {checks['healthz_ms']:.0f} ms, "
                   f"fresh client {checks['fresh_client']} in {checks['fresh_client_ms']:.0f} ms; "
                   + (f"a keep-alive /healthz poller {'cut (' + poller['error'] + ') after ' if poller['error'] else 'kept for '}"
                      f"{poller['requests']} requests; " if polling is not None else "")
                   + f"log {len(lines):,} lines ({tracebacks:,} tracebacks)"}


# === the battery ===========================================================================================


def _sc(value: float, scale: float, least: int = 1) -> int:
    return max(least, int(round(value * scale)))


# name -> (function, params(scale)): sizes for scale 1 finish in under ~20 s each on 2 cores and keep
# the unhardened server (4f7195d) well under 3 GB.
ATTACKS: dict[str, tuple[Callable, Callable[[float], dict]]] = {
    "replay-amplify": (replay_amplify, lambda s: {
        "messages": min(1000, _sc(1000, s)), "payload_bytes": min(60_000, _sc(48_000, s, 100)), "requests": _sc(10, s),
        "hold": 4.0, "read_after": False, "read_timeout": 30}),
    "presence-amplify": (presence_amplify, lambda s: {
        "users": _sc(2000, s), "token_len": 4096, "requests": _sc(40, s), "hold": 4.0, "read_after": False, "read_timeout": 30}),
    "fragment-hold": (fragment_hold, lambda s: {
        "conns": _sc(1000, s), "size": MAX_MESSAGE_SIZE - 1024, "rate": 0, "hold": 4.0}),
    "deflate-hold": (deflate_hold, lambda s: {
        "conns": _sc(1000, s), "inflates_to": MAX_MESSAGE_SIZE - 64 * 1024, "hold": 4.0, "server_args": ["--permessage-deflate"]}),
    "deflate-bomb": (deflate_bomb, lambda s: {
        "bombs": _sc(2000, s), "conns": 50, "inflates_to": 64 * MiB, "timeout": 10.0, "server_args": ["--permessage-deflate"]}),
    "slow-readers": (slow_readers, lambda s: {
        "readers": _sc(200, s), "read_bytes": 32768, "read_every": 0.5, "rcvbuf": 8192, "msg_bytes": 2000, "rate": 500,
        "duration": 10.0, "drain": 5.0}),
    "topic-flood": (topic_flood, lambda s: {
        "topics": _sc(200_000, s), "conns": _sc(20, s), "topic_len": 256, "burst": 2000, "rate_limit": 1000, "timeout": 60}),
    "continuation-flood": (continuation_flood, lambda s: {
        "frames": _sc(2_600_000, s), "chunk_frames": 10_000, "timeout": 30}),
    "wide-utf8": (wide_utf8, lambda s: {
        "limit": MAX_MESSAGE_SIZE, "under": 16, "fit_chars": 400_000, "hold": 5.0}),
    "http-pipeline": (http_pipeline, lambda s: {
        "requests": _sc(12_000, s), "send_for": 3.0, "hold": 3.0, "read_after": 0}),
    "session-hoard": (session_hoard, lambda s: {
        "sessions": _sc(500, s), "topics_per": 1000, "concurrency": 10}),
    "burst": (burst, lambda s: {
        "conns": _sc(40, s), "per_conn": 2000, "timeout": 60}),
    "setup-topics": (setup_topics, lambda s: {"topics": _sc(30_000, s), "timeout": 120}),
    "bare-tcp": (bare_tcp, lambda s: {
        "conns": _sc(6000, s), "server_nofile": 4096, "connect_timeout": 3.0, "hold": 2.0, "check_timeout": 5.0, "poller": True}),
}
PROBE_INTERVAL = {"burst": 0.1, "continuation-flood": 0.1, "setup-topics": 0.1}


def latency_figures(samples: list, window: tuple | None = None) -> dict:
    values = [lat for t, lat in samples if window is None or (window[0] <= t <= window[1])]
    return {"n": len(values), "p50_ms": _ms(percentile(values, 0.50)), "p99_ms": _ms(percentile(values, 0.99)),
            "max_ms": _ms(max(values) if values else None)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def run_attack(name: str, server: str = DEFAULT_SERVER, scale: float = 1.0, server_args: list[str] | tuple = (),
                     params: dict | None = None, pair_rate: float = 20.0, probe_interval: float | None = None,
                     rss_cap_mb: float = 2048) -> dict:
    """Run one attack against a fresh server: start it, the pair beside it, the attack, then stop all.
    The result: the attack's own findings, the server's memory and CPU, the pair's figures."""
    fn, defaults = ATTACKS[name]
    p = defaults(scale)
    p.update(params or {})
    args = list(server_args) + [a for a in p.get("server_args", ()) if a not in server_args]
    srv = ServerProcess(server, args, nofile=p.get("server_nofile"))
    pair: Pair | None = None
    sampler: RssSampler | None = None
    ctx: Context | None = None
    result: dict = {"attack": name, "server": os.path.abspath(server), "server_args": args, "params": p}
    if p.get("server_nofile"):
        result["note"] = f"server run with RLIMIT_NOFILE {p['server_nofile']}"
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    started = time.monotonic()
    try:
        srv.start()
        sampler = RssSampler(srv.pid, int(rss_cap_mb * MiB), lambda: loop.call_soon_threadsafe(stopped.set))
        sampler.start()
        stats_before = await server_stats(srv.port)
        result["rss_at_start"] = proc_status(srv.pid).get("VmRSS")
        pair = await Pair.start(srv.port, pair_rate, probe_interval if probe_interval is not None else PROBE_INTERVAL.get(name, 0.25))
        ctx = Context(srv, sampler, stopped)
        attack = asyncio.ensure_future(fn(ctx, p))
        capped = asyncio.ensure_future(stopped.wait())
        await asyncio.wait({attack, capped}, return_when=asyncio.FIRST_COMPLETED)
        if attack.done() and not attack.cancelled() and attack.exception() is None:
            result.update(attack.result())
        elif attack.done() and not isinstance(attack.exception(), Capped):
            exc = attack.exception()
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["did"] = f"attack failed: {type(exc).__name__}: {exc}"[:200]
        else:
            attack.cancel()
            with contextlib.suppress(BaseException):
                await attack
        capped.cancel()
        if sampler.capped:
            result["capped"] = True
            result["did"] = f"RSS over the {rss_cap_mb:g} MB cap: server killed, attack stopped " + (f"({result['did']})" if "did" in result else "")
        ctx.cold()
        window = (ctx.window[0] or started, ctx.window[1])
        result["hot_s"] = round(window[1] - window[0], 2)
        cpu_now = proc_cpu(srv.pid)
        if ctx.cpu_at_hot is not None and cpu_now is not None:
            result["server_cpu_s"] = round(cpu_now - ctx.cpu_at_hot, 2)
        result.update(sampler.figures())
        stats_after = await server_stats(srv.port) if srv.alive() else None
        result["errors_delta"] = counter_delta(stats_before, stats_after, "errors")
        result["disconnects_delta"] = counter_delta(stats_before, stats_after, "disconnects")
        ctx.close_all()
        ctx = None
        pair_result = await pair.stop()
        pair = None
        if pair_result is not None:
            result["pair"] = {k: v for k, v in pair_result.items() if k not in ("samples", "probes")}
            result["pair"].update(latency_figures(pair_result["samples"]))
            result["pair_hot"] = latency_figures(pair_result["samples"], window)
            hot = [pr for pr in pair_result["probes"] if window[0] <= pr[0] <= window[1]]
            result["fresh_clients"] = {
                "n": len(hot), "failed": sum(1 for pr in hot if pr[1] is None),
                **{k: v for k, v in latency_figures([(t, lat) for t, lat, _ in hot if lat is not None]).items() if k != "n"},
                "errors": dict(collections.Counter(e for _, _, e in hot if e)),
            }
        else:
            result["pair"] = None
        lines = srv.log().splitlines()
        result["log"] = {"lines": len(lines), "warnings": sum(" WARNING " in line for line in lines),
                         "errors": sum(" ERROR " in line for line in lines), "tracebacks": sum(line.startswith("Traceback") for line in lines),
                         "excerpt": lines[:20] + (["..."] + lines[-20:] if len(lines) > 40 else lines[20:])}
    finally:
        if ctx is not None:
            ctx.close_all()
        if pair is not None:
            pair.kill()  # at once, whatever happens next
            with contextlib.suppress(BaseException):
                await pair.close()
        if sampler is not None:
            sampler.stop()
            sampler.join(2)
        srv.cleanup()
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def mb(n: int | None) -> str:
    return "—" if n is None else f"{n / MiB:,.0f}"


def table(results: list[dict], rss_cap_mb: float) -> str:
    lines = ["| attack | what the server did | peak RSS MB | pair p99 ms | pair lost |", "|---|---|---|---|---|"]
    for r in results:
        pair = r.get("pair") or {}
        peak = f"> {rss_cap_mb:g} (cap)" if r.get("capped") else mb(r.get("peak_rss"))
        did = r.get("did", "")
        fresh = r.get("fresh_clients") or {}
        if r["attack"] in ("burst", "continuation-flood", "bare-tcp", "topic-flood", "setup-topics") and fresh.get("n"):
            did += f"; fresh clients max {fresh.get('max_ms')} ms" + (f", {fresh['failed']} of {fresh['n']} failed" if fresh.get("failed") else "")
        disc = pair.get("disconnects")
        lost = "—" if not pair else f"{pair.get('lost')}" + (f" ({len(disc)} disconnects)" if disc else "")
        p99 = pair.get("p99_ms")
        lines.append(f"| {r['attack']} | {did.replace('|', '/')} | {peak} | {'—' if p99 is None else f'{p99:,.0f}'} | {lost} |")
    return "\n".join(lines)


async def battery(names: list[str], server: str, scale: float, server_args: list[str], rss_cap_mb: float, pair_rate: float) -> list[dict]:
    results = []
    for name in names:
        log(f"== {name} (scale {scale:g}) against {server}")
        try:
            r = await run_attack(name, server, scale, server_args, pair_rate=pair_rate, rss_cap_mb=rss_cap_mb)
        except Exception as exc:  # noqa: BLE001 - one attack that cannot run does not stop the battery
            r = {"attack": name, "error": f"{type(exc).__name__}: {exc}", "did": f"could not run: {type(exc).__name__}: {str(exc)[:200]}",
                 "elapsed_s": None}
        pair = r.get("pair") or {}
        log(f"   {r.get('did')}; peak RSS {mb(r.get('peak_rss'))} MB; pair p99 {pair.get('p99_ms')} ms, lost {pair.get('lost')}; {r['elapsed_s']} s")
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="attacks: " + ", ".join(ATTACKS))
    parser.add_argument("--server", default=DEFAULT_SERVER, help="the microsocket.py to run (default: the repository's)")
    parser.add_argument("--only", action="append", choices=list(ATTACKS), metavar="NAME", help="run only this attack (repeatable)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplier on counts and sizes (default 1)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG", help="an extra server flag (repeatable; use --server-arg=--flag=value)")
    parser.add_argument("--rss-cap", type=float, default=2048, metavar="MB", help="kill the server and stop the attack past this RSS (default 2048)")
    parser.add_argument("--pair-rate", type=float, default=20.0, help="the pair's publishes per second (default 20)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--pair-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--probe-interval", type=float, default=0.25, help=argparse.SUPPRESS)
    parser.add_argument("--pair-topic", default="hostile.pair", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pair_child:
        asyncio.run(pair_child(args.port, args.pair_rate, args.probe_interval, args.pair_topic))
        return 0
    raise_nofile()
    names = args.only or list(ATTACKS)
    results = asyncio.run(battery(names, args.server, args.scale, args.server_arg, args.rss_cap, args.pair_rate))
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print(table(results, args.rss_cap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
