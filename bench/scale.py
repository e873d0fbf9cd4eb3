#!/usr/bin/env python3
"""Scale and cost-growth benchmark for microsocket.py (issue 5, "Scale and cost growth").

Three phases, each against a fresh server process that this script starts and stops itself:

  idle    N open idle WebSocket connections (handshake + `setup`): server RSS per connection,
          GET /stats latency with and without them, and SIGTERM shutdown time with them open.
  subs    C connections x T topics each (`setup` with a `topics` list): server RSS in total and per
          subscription, and publish->ack throughput to a topic `solo` with exactly one subscriber,
          before and after the C x T subscriptions exist (their ratio should be ~1: a broadcast is
          O(subscribers of that topic)). Then the time to drop them all.
  growth  fan-out to one topic with 1, 10, 100, ... subscribers (fresh server per size): one
          publisher sends M messages with at most W unacknowledged, payload {t: send time (ns), i};
          deliveries/s and publish->deliver p50/p99 per size, with lost/dup/out-of-order checks.

Bench conventions (bench/README.md): loopback only; a fresh server per phase (and per
size) in its own process group, pinned to CPU 0 with taskset, this client pinned to CPU 1; every
phase is bounded in time; the server's process group is killed at the end even on error or signal;
JSON lines go to a results file outside the repository, progress to stderr, markdown tables to stdout.

The client is pure standard library: asyncio Protocols that speak raw RFC 6455 (hand-made masked
frames, a minimal unmasked-frame parser), so tens of thousands of connections fit in one process on
one core. Connections come from several 127.0.0.x source addresses (the ephemeral port range holds
~28k per address). The growth phase can use the shared Bun load generator instead (--growth-client bun; bench/setup.sh installs Bun).

Open files: the script raises RLIMIT_NOFILE (for itself and the server) as far as it may. Where the
hard limit cannot be raised (no CAP_SYS_RESOURCE, e.g. a 20,000 hard limit), the idle phase measures
as many connections as fit under it and records `conns_requested` and `clamped_by_nofile`.

  python3 bench/scale.py --quick              # smoke run, < 1 minute
  python3 bench/scale.py                      # full run (see --help for sizes)
  python3 bench/scale.py --only growth --growth-sizes 1,100,10000 --growth-msgs 500
"""

from __future__ import annotations

import argparse
import array
import asyncio
import atexit
import json
import math
import os
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux >= 4.2
PER_SOURCE_ADDRESS = 4000  # connections per 127.0.0.x source address: the ephemeral range holds ~28k, and
# connect() finds a free port more slowly as the range fills up (kernel time in the client)
T0 = time.monotonic()


def log(*parts: object) -> None:
    print(f"[scale {time.monotonic() - T0:7.1f}s]", *parts, file=sys.stderr, flush=True)


# ---- processes: limits, pinning, RSS and CPU from /proc ----------------------------------------


def raise_nofile(want: int = 1 << 20) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (hard limit too when privileged); returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = want
    target = min(want, nr_open)
    for limits in ((target, target), (min(target, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """CPU time of one process, all threads: from schedstat (ns resolution) when the kernel has it,
    else utime + stime from /proc/PID/stat (clock-tick resolution)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu() -> float:
    return time.process_time()


class Meter:
    """CPU share (100 = one core) of the server and of this client over a window."""

    def __init__(self, server_pid: int | None, child_pid: int | None = None) -> None:
        self.server_pid, self.child_pid = server_pid, child_pid
        self.t = time.monotonic()
        self.s = cpu_seconds(server_pid) if server_pid else 0.0
        self.c = self_cpu() + (cpu_seconds(child_pid) if child_pid else 0.0)

    def end(self) -> dict:
        dt = max(1e-9, time.monotonic() - self.t)
        s = (cpu_seconds(self.server_pid) - self.s) if self.server_pid else 0.0
        c = self_cpu() + (cpu_seconds(self.child_pid) if self.child_pid else 0.0) - self.c
        srv, cli = 100 * s / dt, 100 * c / dt
        bound = "server" if srv >= 90 else "client" if cli >= 85 else "neither"
        return {"srv_cpu_pct": round(srv, 1), "client_cpu_pct": round(cli, 1), "bound": bound, "srv_cpu_s": round(s, 6)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUNNING: dict[int, subprocess.Popen] = {}  # process-group id -> process, for the last-resort cleanup


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(RUNNING.values()):
        if proc.poll() is None:
            kill_group(proc, signal.SIGKILL)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
    RUNNING.clear()


class Server:
    """microsocket.py as a subprocess in its own process group, pinned to the server CPU."""

    def __init__(self, opts: argparse.Namespace, label: str) -> None:
        self.port = free_port()
        self.label = label
        cmd = [sys.executable, str(opts.server), "--port", str(self.port), "--publish-rate", "0",
               "--max-connections", "200000", "--log-level", "WARNING", *opts.server_arg]
        taskset = shutil.which("taskset") if opts.pin else None
        self.cmd = ([taskset, "-c", str(opts.server_cpu)] if taskset else []) + cmd
        pin_cpu = opts.server_cpu if (opts.pin and not taskset) else None

        def child_setup() -> None:
            raise_nofile()
            if pin_cpu is not None:
                try:
                    os.sched_setaffinity(0, {pin_cpu})
                except OSError:
                    pass

        self.log_path = opts.log_dir / f"{opts.stamp}-{label}.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     cwd=str(REPO), start_new_session=True, preexec_fn=child_setup)
        RUNNING[self.proc.pid] = self.proc
        self.pid = self.proc.pid  # taskset execs the server, so this is the server's PID
        self.exit_code: int | None = None

    async def wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} at startup; see {self.log_path}")
            try:
                _, stats = await http_get_json(self.port, "/stats", timeout=2)
                return stats
            except (OSError, asyncio.TimeoutError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /stats within {timeout:g}s; see {self.log_path}")
                await asyncio.sleep(0.05)

    def rss(self) -> int | None:
        return rss_bytes(self.pid)

    async def stop(self, grace: float = 10.0) -> float | None:
        """SIGTERM the process group, wait (the event loop keeps running), then SIGKILL.
        Returns seconds from SIGTERM to exit, None if it had to be killed."""
        if self.proc.poll() is not None:
            self._close()
            return 0.0
        t = time.monotonic()
        kill_group(self.proc, signal.SIGTERM)
        took: float | None = None
        while time.monotonic() - t < grace:
            if self.proc.poll() is not None:
                took = time.monotonic() - t
                break
            await asyncio.sleep(0.02)
        if took is None:
            log(f"{self.label}: server still running {grace:g}s after SIGTERM: SIGKILL")
        kill_group(self.proc, signal.SIGKILL)  # the whole group, even if the leader already exited
        self._close()
        return took

    def kill(self) -> None:
        kill_group(self.proc, signal.SIGKILL)
        self._close()

    def _close(self) -> None:
        try:
            self.exit_code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        RUNNING.pop(self.proc.pid, None)
        if not self.log_file.closed:
            self.log_file.close()

    def log_tail(self, n: int = 5) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return lines[-n:]


# ---- HTTP -----------------------------------------------------------------------------------------


async def http_get_json(port: int, path: str, timeout: float = 10.0) -> tuple[float, dict]:
    """GET on a fresh connection (like curl): (seconds from connect to the full response, JSON body)."""
    t = time.perf_counter()

    async def run() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
            return await reader.read()
        finally:
            writer.close()

    raw = await asyncio.wait_for(run(), timeout)
    took = time.perf_counter() - t
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise ValueError(f"GET {path}: {head[:80]!r}")
    return took, json.loads(body)


async def stats_latency(port: int, n: int, gap: float) -> dict:
    times = []
    for _ in range(n):
        took, _ = await http_get_json(port, "/stats")
        times.append(took * 1000)
        await asyncio.sleep(gap)
    return {"n": n, "p50_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2),
            "min_ms": round(min(times), 2)}


async def wait_stats(port: int, want: dict, timeout: float) -> tuple[bool, dict, float]:
    """Poll /stats until every key in `want` matches; (matched, last stats, seconds waited)."""
    t = time.monotonic()
    stats: dict = {}
    while True:
        try:
            _, stats = await http_get_json(port, "/stats")
        except (OSError, asyncio.TimeoutError, ValueError) as exc:
            stats = {"error": repr(exc)}
        if all(stats.get(k) == v for k, v in want.items()):
            return True, stats, time.monotonic() - t
        if time.monotonic() - t > timeout:
            return False, stats, time.monotonic() - t
        await asyncio.sleep(0.1)


# ---- a minimal WebSocket client -------------------------------------------------------------------

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample key; the server must answer with its accept value
WS_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """One masked client frame (FIN set)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
    key = os.urandom(4)
    if n:
        k = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "little") ^ int.from_bytes(k, "little")).to_bytes(n, "little")
    return head + key + payload


def text(obj: object) -> bytes:
    return client_frame(json.dumps(obj, separators=(",", ":")).encode())


def msg_type(payload: bytes) -> str | None:
    if payload.startswith(b'{"type":"'):
        end = payload.find(b'"', 9)
        if end > 0:
            return payload[9:end].decode()
    try:
        m = json.loads(payload)
    except ValueError:
        return None
    return m.get("type") if isinstance(m, dict) else None


class Totals:
    """Counters shared by every connection of a phase."""

    def __init__(self) -> None:
        self.pings = 0
        self.closes: dict[int, int] = {}
        self.lost_conns = 0
        self.unexpected: list[str] = []  # first few unexpected frames (errors and the like)
        self.unexpected_count = 0

    def odd(self, what: str) -> None:
        self.unexpected_count += 1
        if len(self.unexpected) < 5:
            self.unexpected.append(what[:300])


class WS(asyncio.Protocol):
    """One client connection: HTTP upgrade, then `setup`; done when `ready` and `want` `subscribed`
    frames have arrived. Afterwards text frames go to `on_text(conn, payload, now_ns)`. Answers
    pings and the closing handshake. Outgoing frames queued during a read go out in one write."""

    __slots__ = ("totals", "transport", "request", "setup_frame", "want", "got", "ready", "upgraded", "buf",
                 "waiter", "on_text", "out", "close_code", "open", "__weakref__")

    def __init__(self, totals: Totals, port: int, path: str, setup_frame: bytes, want: int, waiter: asyncio.Future) -> None:
        self.totals = totals
        self.transport = None
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
        self.setup_frame = setup_frame
        self.want = want
        self.got = 0
        self.ready = False
        self.upgraded = False
        self.buf = b""
        self.waiter = waiter
        self.on_text = None
        self.out: list[bytes] = []
        self.close_code: int | None = None
        self.open = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.open = True
        transport.write(self.request)

    def connection_lost(self, exc) -> None:
        self.open = False
        self.totals.lost_conns += 1
        self._fail(f"connection lost ({exc or 'closed by peer'}, close code {self.close_code})")

    def _fail(self, why: str) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError(why))
        self.waiter = None

    def send(self, frame: bytes) -> None:
        self.out.append(frame)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if not self.upgraded:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head = data[:end]
            if not head.startswith(b"HTTP/1.1 101") or WS_ACCEPT not in head:
                self.totals.odd(f"handshake refused: {head[:200]!r}")
                self._fail(f"handshake refused: {head[:120]!r}")
                self.transport.abort()
                return
            self.upgraded = True
            self.transport.write(self.setup_frame)
            data = data[end + 4 :]
        now = time.monotonic_ns()
        pos, n = 0, len(data)
        while n - pos >= 2:
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            if ln < 126:
                start = pos + 2
            elif ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            else:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + ln
            if end > n:
                break
            op = b0 & 0x0F
            payload = data[start:end]
            pos = end
            if op == 1 and b0 & 0x80:
                if self.on_text is not None:
                    self.on_text(self, payload, now)
                else:
                    self._setup_reply(payload)
            elif op == 9:
                self.totals.pings += 1
                self.out.append(client_frame(payload, 0xA))
            elif op == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.totals.closes[self.close_code] = self.totals.closes.get(self.close_code, 0) + 1
                self.out.append(client_frame(payload[:2], 8))
            elif op != 0xA:
                self.totals.odd(f"frame opcode {op} fin {b0 >> 7}")
        if pos < n:
            self.buf = data[pos:]
        if self.out:
            out = self.out
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _setup_reply(self, payload: bytes) -> None:
        kind = msg_type(payload)
        if not self.ready:
            if kind == "ready":
                self.ready = True
            else:
                self.totals.odd(f"before ready: {payload[:200]!r}")
                self._fail(f"expected ready, got {payload[:200]!r}")
                return
        elif kind == "subscribed":
            self.got += 1
        else:
            self.totals.odd(f"during setup: {payload[:200]!r}")
            self._fail(f"expected subscribed, got {payload[:200]!r}")
            return
        if self.got >= self.want:
            w = self.waiter
            self.waiter = None
            if w is not None and not w.done():
                w.set_result(self)
            self.on_text = unexpected_text

    def abort(self) -> None:
        if self.transport is not None and self.open:
            self.transport.abort()


def unexpected_text(conn: WS, payload: bytes, now: int) -> None:
    conn.totals.odd(f"unexpected: {payload[:200]!r}")


class Client:
    """Opens WebSocket connections from several 127.0.0.x source addresses."""

    def __init__(self, port: int, totals: Totals, source_base: int, expected: int) -> None:
        self.port = port
        self.totals = totals
        n_addr = max(1, math.ceil(expected / PER_SOURCE_ADDRESS))
        self.sources = [f"127.0.{source_base}.{k + 1}" for k in range(n_addr)]
        self.conns: list[WS] = []
        self.failures = 0
        self.first_error = ""

    async def open(self, i: int, path: str, setup: bytes, want: int, timeout: float = 20.0) -> WS:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass
        sock.setblocking(False)
        waiter = loop.create_future()
        conn = WS(self.totals, self.port, path, setup, want, waiter)
        try:
            sock.bind((self.sources[i % len(self.sources)], 0))
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", self.port)), timeout)
            await loop.create_connection(lambda: conn, sock=sock)
        except BaseException:
            sock.close()
            raise
        self.conns.append(conn)
        try:
            await asyncio.wait_for(waiter, timeout)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def open_many(self, n: int, concurrency: int, make, timeout: float = 20.0) -> dict:
        """Open n connections, `concurrency` in flight; make(i) -> (path, setup frame, subscribed wanted)."""
        times = array.array("d")
        self.failures, self.first_error = 0, ""
        todo = iter(range(n))
        t0 = time.monotonic()
        progress = [0, t0]

        async def worker() -> None:
            for i in todo:
                path, setup, want = make(i)
                ts = time.perf_counter()
                try:
                    await self.open(i, path, setup, want, timeout)
                    times.append((time.perf_counter() - ts) * 1000)
                except Exception as exc:  # counted, the run goes on
                    self.failures += 1
                    if not self.first_error:
                        self.first_error = f"connection {i}: {exc!r}"
                progress[0] += 1
                if time.monotonic() - progress[1] > 5:
                    progress[1] = time.monotonic()
                    log(f"  {progress[0]}/{n} connections, {self.failures} failed")

        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        elapsed = time.monotonic() - t0
        ok = len(times)
        s = sorted(times)
        pct = lambda q: round(s[min(ok - 1, max(0, math.ceil(q * ok) - 1))], 1) if ok else None  # noqa: E731
        return {"opened": ok, "failed": self.failures, "first_error": self.first_error or None,
                "open_s": round(elapsed, 2), "conns_per_s": round(ok / elapsed) if elapsed else None,
                "connect_p50_ms": pct(0.5), "connect_p99_ms": pct(0.99), "connect_max_ms": pct(1.0)}

    def abort_all(self) -> None:
        for c in self.conns:
            c.abort()
        self.conns.clear()


# ---- publishing with a window ---------------------------------------------------------------------


class Publisher:
    """Sends n publishes on `conn` with at most `window` unacknowledged; acks come back in order."""

    def __init__(self, conn: WS, topic: str, n: int, window: int, prefix: str, prebuilt: bool = False) -> None:
        self.conn, self.topic, self.n, self.window, self.prefix = conn, topic, n, window, prefix
        # Prebuilt frames (payload {i}) keep this client's cost per publish low; otherwise the
        # payload carries the send time {t, i} and is built when sent.
        self.frames = [text({"type": "publish", "topic": topic, "messageId": f"{prefix}-{i}", "payload": {"i": i}})
                       for i in range(n)] if prebuilt else None
        self.sent = self.acked = self.ok = self.errors = 0
        self.send_ns = array.array("q", bytes(8 * n))
        self.ack_lat_us = array.array("d")
        self.first_send = self.last_ack = 0
        self.done = asyncio.get_running_loop().create_future()

    def frame(self, i: int) -> bytes:
        t = time.monotonic_ns()
        self.send_ns[i] = t
        if self.frames is not None:
            return self.frames[i]
        return text({"type": "publish", "topic": self.topic, "messageId": f"{self.prefix}-{i}", "payload": {"t": t, "i": i}})

    def start(self) -> None:
        self.conn.on_text = self.on_text
        self.first_send = time.monotonic_ns()
        k = min(self.window, self.n)
        self.conn.transport.write(b"".join(self.frame(i) for i in range(k)))
        self.sent = k
        if self.n == 0:
            self.done.set_result(None)

    def on_text(self, conn: WS, payload: bytes, now: int) -> None:
        i = self.acked
        if i >= self.n:
            return conn.totals.odd(f"publisher: extra frame {payload[:200]!r}")
        if payload.startswith(b'{"type":"ack"') and b'"status":"ok"' in payload:
            self.ok += 1
        else:
            self.errors += 1
            conn.totals.odd(f"publisher: {payload[:200]!r}")
        self.acked = i + 1
        self.last_ack = now
        self.ack_lat_us.append((now - self.send_ns[i]) / 1000)
        if self.sent < self.n:
            conn.send(self.frame(self.sent))
            self.sent += 1
        if self.acked >= self.n and not self.done.done():
            self.done.set_result(None)

    def result(self) -> dict:
        elapsed = (self.last_ack - self.first_send) / 1e9 if self.last_ack else None
        lat = sorted(self.ack_lat_us)
        pct = lambda q: round(lat[min(len(lat) - 1, max(0, math.ceil(q * len(lat)) - 1))] / 1000, 3) if lat else None  # noqa: E731
        return {"publishes": self.n, "acked": self.acked, "acks_ok": self.ok, "ack_errors": self.errors,
                "acks_per_s": round(self.acked / elapsed) if elapsed else None,
                "ack_p50_ms": pct(0.5), "ack_p99_ms": pct(0.99)}


# ---- phase 1: idle connections --------------------------------------------------------------------


async def phase_idle(opts: argparse.Namespace, out: dict) -> None:
    n = opts.idle_conns
    # One process cannot hold more sockets than its open-file limit (server and client alike), and
    # without CAP_SYS_RESOURCE the hard limit cannot be raised: measure what fits and say so.
    fit = opts.nofile - 100
    if n > fit:
        log(f"idle: {n} connections do not fit under the open-file limit {opts.nofile} (hard limit, not raisable "
            f"here); measuring {fit} instead")
        out.update(conns_requested=n, clamped_by_nofile=opts.nofile)
        n = fit
    server = Server(opts, "idle")
    totals = Totals()
    client = Client(server.port, totals, 1, n + 1)
    out.update(phase="idle", conns=n, concurrency=opts.concurrency, server_cmd=" ".join(server.cmd))
    try:
        await server.wait_ready()
        await asyncio.sleep(0.5)
        out["stats_latency_empty"] = await stats_latency(server.port, opts.stats_requests, 0.05)
        rss0 = server.rss()
        log(f"idle: server pid {server.pid} on port {server.port}, RSS {rss0 / 2**20:.1f} MiB; opening {n} connections")
        setup = text({"type": "setup", "token": "idle"})
        meter = Meter(server.pid)
        out.update(await client.open_many(n, opts.concurrency, lambda i: ("/ws", setup, 0)))
        out.update(meter.end())
        ok, stats, _ = await wait_stats(server.port, {"connections": out["opened"]}, 30)
        out["stats_ok"] = ok and out["opened"] == n
        out["stats"] = {k: stats.get(k) for k in ("connections", "topics", "subscriptions", "sessions")}
        await asyncio.sleep(1.0)
        rss1 = server.rss()
        out["rss_before_mb"] = round(rss0 / 2**20, 1)
        out["rss_after_mb"] = round(rss1 / 2**20, 1)
        out["rss_bytes_per_conn"] = round((rss1 - rss0) / max(1, out["opened"]))
        log(f"idle: {out['opened']} open ({out['conns_per_s']}/s, {out['failed']} failed), /stats connections="
            f"{stats.get('connections')}, RSS {rss1 / 2**20:.1f} MiB = {out['rss_bytes_per_conn']} B/conn")
        meter = Meter(server.pid)
        out["stats_latency"] = await stats_latency(server.port, opts.stats_requests, opts.stats_gap)
        out["idle_srv_cpu_pct"] = meter.end()["srv_cpu_pct"]  # the timer sweep over idle connections
        log(f"idle: /stats p50 {out['stats_latency']['p50_ms']} ms, max {out['stats_latency']['max_ms']} ms "
            f"(empty server: p50 {out['stats_latency_empty']['p50_ms']} ms); server CPU while idle {out['idle_srv_cpu_pct']}%")
        if opts.idle_hold > 0:
            # Keep them open past the server's keepalive interval (20 s): every one gets a ping.
            log(f"idle: holding them {opts.idle_hold:g} s (keepalive pings), /stats every second")
            meter = Meter(server.pid)
            times, t_end = [], time.monotonic() + opts.idle_hold
            while time.monotonic() < t_end:
                took, st = await http_get_json(server.port, "/stats")
                times.append(took * 1000)
                await asyncio.sleep(1.0)
            out["hold_s"] = opts.idle_hold
            out["hold_srv_cpu_pct"] = meter.end()["srv_cpu_pct"]
            out["hold_stats_latency"] = {"n": len(times), "p50_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}
            out["hold_stats_connections"] = st.get("connections")
            log(f"idle: after the hold: {totals.pings} pings answered, /stats connections={st.get('connections')}, "
                f"/stats p50 {out['hold_stats_latency']['p50_ms']} ms max {out['hold_stats_latency']['max_ms']} ms, "
                f"server CPU {out['hold_srv_cpu_pct']}%")
        out["pings_answered"] = totals.pings
        lost_before = totals.lost_conns
        took = await server.stop(grace=opts.shutdown_wait)
        out["sigterm_exit_s"] = round(took, 2) if took is not None else None
        out["server_exit_code"] = server.exit_code
        out["closes_at_shutdown"] = {str(k): v for k, v in sorted(totals.closes.items())}
        out["lost_before_shutdown"] = lost_before
        log(f"idle: SIGTERM -> exit in {out['sigterm_exit_s']} s, exit code {server.exit_code}, close codes {out['closes_at_shutdown']}")
        out["unexpected"] = totals.unexpected_count
        out["unexpected_first"] = totals.unexpected
        out["ok"] = bool(out["stats_ok"] and out["failed"] == 0 and lost_before == 0 and totals.unexpected_count == 0
                         and out.get("hold_stats_connections", n) == n)
    finally:
        client.abort_all()
        server.kill()
        out["server_log_tail"] = server.log_tail()


# ---- phase 2: a million subscriptions -------------------------------------------------------------


async def solo_rounds(client: Client, solo: dict, opts: argparse.Namespace, label: str, server: Server) -> list[dict]:
    # A publisher (and so a dedup user) of its own for each side, so both start from the same state.
    pub = await client.open(0, "/ws", text({"type": "setup", "token": f"publisher-{label}"}), 0)
    rounds = []
    for r in range(opts.solo_rounds):
        before = solo["count"]
        p = Publisher(pub, "solo", opts.solo_msgs, opts.solo_window, f"{label}{r}", prebuilt=True)
        meter = Meter(server.pid)
        p.start()
        await asyncio.wait_for(p.done, opts.solo_timeout)
        res = p.result()
        await asyncio.sleep(0.05)
        res["delivered"] = solo["count"] - before
        res.update(meter.end())
        res["srv_us_per_publish"] = round(res["srv_cpu_s"] * 1e6 / opts.solo_msgs, 2)
        rounds.append(res)
        log(f"subs: solo {label} round {r}: {res['acks_per_s']} acks/s, ack p50 {res['ack_p50_ms']} ms, "
            f"delivered {res['delivered']}/{opts.solo_msgs}, server CPU {res['srv_cpu_pct']}% = {res['srv_us_per_publish']} µs/publish")
    pub.abort()
    client.conns.remove(pub)
    return rounds


async def phase_subs(opts: argparse.Namespace, out: dict) -> None:
    C, T = opts.subs_conns, opts.subs_topics
    K = opts.subs_topic_space or C * T
    server = Server(opts, "subs")
    totals = Totals()
    client = Client(server.port, totals, 2, C + 2)
    out.update(phase="subs", conns=C, topics_per_conn=T, topic_space=K, subscriptions=C * T,
               solo_msgs=opts.solo_msgs, solo_window=opts.solo_window, solo_rounds=opts.solo_rounds,
               server_cmd=" ".join(server.cmd))
    try:
        await server.wait_ready()
        solo = {"count": 0, "last": 0, "bad": 0}

        def on_solo(conn: WS, payload: bytes, now: int) -> None:
            m = json.loads(payload)
            if m.get("type") != "message" or m.get("seqNo") != solo["last"] + 1:
                solo["bad"] += 1
                conn.totals.odd(f"solo: {payload[:200]!r}")
            solo["last"] = m.get("seqNo", solo["last"])
            solo["count"] += 1

        sub = await client.open(0, "/ws/sub/solo", text({"type": "setup", "token": "solo"}), 1)
        sub.on_text = on_solo
        await asyncio.sleep(0.5)
        rss0 = server.rss()
        log(f"subs: server pid {server.pid} port {server.port}, RSS {rss0 / 2**20:.1f} MiB; solo publish before")
        before = await solo_rounds(client, solo, opts, "before", server)

        log(f"subs: opening {C} connections x {T} topics (topic space {K})")
        rss1 = server.rss()

        def make(i: int, prefix: str = ""):
            topics = [f"t{(i * T + j) % K}" for j in range(T)]
            return "/ws", text({"type": "setup", "token": f"{prefix}u{i}", "topics": topics}), len(set(topics))

        meter = Meter(server.pid)
        opened = await client.open_many(C, opts.subs_concurrency, make)
        out.update({f"subs_{k}": v for k, v in opened.items()})
        out.update({f"setup_{k}": v for k, v in meter.end().items()})
        out["subscribe_per_s"] = round(opened["opened"] * T / opened["open_s"]) if opened["open_s"] else None
        want_topics = len({(i * T + j) % K for i in range(opened["opened"]) for j in range(T)}) + 1 if opened["opened"] else 1
        want = {"connections": opened["opened"] + 1, "subscriptions": opened["opened"] * T + 1, "topics": want_topics}
        ok, stats, _ = await wait_stats(server.port, want, 30)
        out["stats_ok"] = ok and opened["opened"] == C
        out["stats"] = {k: stats.get(k) for k in ("connections", "topics", "subscriptions", "sessions")}
        out["stats_expected"] = want
        await asyncio.sleep(1.0)
        rss2 = server.rss()
        subs_n = max(1, opened["opened"] * T)
        out.update(rss_before_mb=round(rss1 / 2**20, 1), rss_after_mb=round(rss2 / 2**20, 1),
                   rss_delta_mb=round((rss2 - rss1) / 2**20, 1), rss_bytes_per_sub=round((rss2 - rss1) / subs_n))
        log(f"subs: {opened['opened']} conns set up in {opened['open_s']} s ({out['subscribe_per_s']} subscriptions/s), "
            f"/stats {out['stats']}, RSS {rss2 / 2**20:.1f} MiB (+{out['rss_delta_mb']} MiB, {out['rss_bytes_per_sub']} B/sub)")
        out["stats_latency"] = await stats_latency(server.port, max(5, opts.stats_requests // 2), opts.stats_gap)
        log("subs: solo publish after")
        after = await solo_rounds(client, solo, opts, "after", server)
        med = lambda rs, k: statistics.median(r[k] for r in rs if r[k] is not None)  # noqa: E731
        out["solo_before"] = before
        out["solo_after"] = after
        out["solo_acks_per_s_before"] = round(med(before, "acks_per_s"))
        out["solo_acks_per_s_after"] = round(med(after, "acks_per_s"))
        out["solo_ratio_after_before"] = round(out["solo_acks_per_s_after"] / out["solo_acks_per_s_before"], 3)
        out["solo_srv_us_per_publish_before"] = med(before, "srv_us_per_publish")
        out["solo_srv_us_per_publish_after"] = med(after, "srv_us_per_publish")
        out["solo_cost_ratio_after_before"] = round(out["solo_srv_us_per_publish_after"] / out["solo_srv_us_per_publish_before"], 3)
        out["solo_ack_p50_ms_before"] = med(before, "ack_p50_ms")
        out["solo_ack_p50_ms_after"] = med(after, "ack_p50_ms")
        out["solo_ack_p99_ms_before"] = med(before, "ack_p99_ms")
        out["solo_ack_p99_ms_after"] = med(after, "ack_p99_ms")
        solo_ok = all(r["acks_ok"] == opts.solo_msgs and r["delivered"] == opts.solo_msgs for r in before + after) and solo["bad"] == 0
        log(f"subs: solo acks/s before {out['solo_acks_per_s_before']}, after {out['solo_acks_per_s_after']}, "
            f"ratio {out['solo_ratio_after_before']}; server CPU per publish before {out['solo_srv_us_per_publish_before']} µs, "
            f"after {out['solo_srv_us_per_publish_after']} µs, ratio {out['solo_cost_ratio_after_before']}")

        # Dropping every subscriber connection: how long until the server has forgotten them.
        t = time.monotonic()
        for c in client.conns[1:]:
            c.abort()
        ok2, stats2, _ = await wait_stats(server.port, {"connections": 1, "subscriptions": 1}, 60)
        out["teardown_s"] = round(time.monotonic() - t, 2)
        out["teardown_ok"] = ok2
        await asyncio.sleep(0.5)
        out["rss_after_teardown_mb"] = round(server.rss() / 2**20, 1)
        out["stats_after_teardown"] = {k: stats2.get(k) for k in ("connections", "topics", "subscriptions", "sessions")}
        log(f"subs: {C} connections dropped, /stats back to {out['stats_after_teardown']} in {out['teardown_s']} s; "
            f"RSS {out['rss_after_teardown_mb']} MiB")
        del client.conns[1:]
        cycles_ok = True
        if opts.subs_cycles > 1:
            # Leak check: the same subscribe / drop cycle again (new users). Retained state (detached
            # sessions for --session-ttl, idle topics) can be shortened with --server-arg.
            out["cycles"] = [{"rss_with_mb": out["rss_after_mb"], "rss_after_drop_mb": out["rss_after_teardown_mb"]}]
            for cycle in range(2, opts.subs_cycles + 1):
                if opts.subs_linger:
                    await asyncio.sleep(opts.subs_linger)
                rss_start = server.rss()
                res = await client.open_many(C, opts.subs_concurrency, lambda i, c=cycle: make(i, f"c{c}-"))
                ok3, st3, _ = await wait_stats(server.port, {"connections": C + 1, "subscriptions": C * T + 1}, 30)
                await asyncio.sleep(1.0)
                rss_with = server.rss()
                for c in client.conns[1:]:
                    c.abort()
                del client.conns[1:]
                ok4, st4, _ = await wait_stats(server.port, {"connections": 1, "subscriptions": 1}, 60)
                await asyncio.sleep(0.5)
                rec = {"rss_start_mb": round(rss_start / 2**20, 1), "rss_with_mb": round(rss_with / 2**20, 1),
                       "rss_after_drop_mb": round(server.rss() / 2**20, 1), "failed": res["failed"],
                       "stats_ok": ok3 and ok4, "sessions_after_drop": st4.get("sessions")}
                out["cycles"].append(rec)
                cycles_ok = cycles_ok and ok3 and ok4 and res["failed"] == 0
                log(f"subs: cycle {cycle}: RSS {rec['rss_start_mb']} -> {rec['rss_with_mb']} with {C * T} subscriptions "
                    f"-> {rec['rss_after_drop_mb']} MiB after dropping them; sessions {rec['sessions_after_drop']}")
        out["pings_answered"] = totals.pings
        out["unexpected"] = totals.unexpected_count
        out["unexpected_first"] = totals.unexpected
        out["ok"] = bool(out["stats_ok"] and solo_ok and ok2 and cycles_ok and totals.unexpected_count == 0)
    finally:
        client.abort_all()
        await server.stop(grace=5)
        out["server_log_tail"] = server.log_tail()


# ---- phase 3: cost growth of one topic's fan-out --------------------------------------------------


class Fanout:
    """What the subscribers of the growth phase saw. The server sends the same bytes to every
    subscriber, so a message is decoded once and looked up by its bytes afterwards."""

    def __init__(self, n_subs: int, n_msgs: int, sample_cap: int) -> None:
        self.cache: dict[bytes, tuple[int, int]] = {}
        self.received = 0
        self.bad = 0  # not seqNo last + 1: lost, duplicate or out of order
        self.other = 0
        self.last_recv = 0
        self.lat_us = array.array("d")
        self.stride = max(1, math.ceil(n_subs * n_msgs / sample_cap))  # latency from every stride-th subscriber

    def handler(self, index: int):
        st = self
        cache = self.cache
        sample = index % self.stride == 0
        lat = self.lat_us
        last = [0]

        def on_text(conn: WS, payload: bytes, now: int) -> None:
            rec = cache.get(payload)
            if rec is None:
                m = json.loads(payload)
                if m.get("type") != "message":
                    st.other += 1
                    return conn.totals.odd(f"subscriber: {payload[:200]!r}")
                rec = cache[payload] = (m["seqNo"], m["data"]["t"])
            seq = rec[0]
            if seq != last[0] + 1:
                st.bad += 1
            last[0] = seq
            st.received += 1
            st.last_recv = now
            if sample:
                lat.append((now - rec[1]) / 1000)

        return on_text, last


async def growth_python(opts: argparse.Namespace, server: Server, S: int, M: int, out: dict) -> None:
    totals = Totals()
    client = Client(server.port, totals, 3, S + 1)
    try:
        setup = text({"type": "setup", "token": "sub"})
        opened = await client.open_many(S, opts.concurrency, lambda i: ("/ws/sub/bench", setup, 1))
        pub = await client.open(S, "/ws", text({"type": "setup", "token": "pub"}), 0)
        out.update(connect_s=opened["open_s"], failed=opened["failed"])
        fan = Fanout(S, M, opts.sample_cap)
        lasts = []
        for i, c in enumerate(client.conns[:S]):
            c.on_text, last = fan.handler(i)
            lasts.append(last)
        ok_stats, stats, _ = await wait_stats(server.port, {"connections": S + 1, "subscriptions": S}, 20)
        expected = opened["opened"] * M
        meter = Meter(server.pid)
        p = Publisher(pub, "bench", M, opts.growth_window, "g")
        p.start()
        deadline = time.monotonic() + opts.growth_timeout
        last_progress, since = -1, time.monotonic()
        while (fan.received < expected or not p.done.done()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            prog = fan.received + p.acked
            if prog != last_progress:
                last_progress, since = prog, time.monotonic()
            elif time.monotonic() - since > opts.idle_timeout:
                log(f"growth {S}: no progress for {opts.idle_timeout:g}s, giving up")
                break
        out.update(meter.end())
        out["srv_us_per_delivery"] = round(out["srv_cpu_s"] * 1e6 / fan.received, 3) if fan.received else None
        elapsed = (fan.last_recv - p.first_send) / 1e9 if fan.last_recv else None
        lat = sorted(fan.lat_us)
        pct = lambda q: round(lat[min(len(lat) - 1, max(0, math.ceil(q * len(lat)) - 1))] / 1000, 3) if lat else None  # noqa: E731
        short = sum(1 for last in lasts if last[0] != M)
        res = p.result()
        out.update(
            deliveries_per_s=round(fan.received / elapsed) if elapsed else None,
            acks_per_s=res["acks_per_s"], lat_p50_ms=pct(0.5), lat_p99_ms=pct(0.99), lat_max_ms=pct(1.0),
            lat_samples=len(lat), expected=expected, delivered=fan.received, lost=expected - fan.received,
            seq_anomalies=fan.bad, subs_short=short, acks_ok=res["acks_ok"], elapsed_s=round(elapsed, 3) if elapsed else None,
            stats_ok=ok_stats, closes={str(k): v for k, v in totals.closes.items()} or None,
            unexpected=totals.unexpected_count, unexpected_first=totals.unexpected,
        )
        out["ok"] = bool(opened["failed"] == 0 and ok_stats and fan.received == expected and fan.bad == 0 and short == 0
                         and res["acks_ok"] == M and totals.unexpected_count == 0 and not totals.closes)
    finally:
        client.abort_all()


async def growth_bun(opts: argparse.Namespace, server: Server, S: int, M: int, out: dict) -> None:
    env = dict(os.environ, HOST="127.0.0.1", PORT=str(server.port), SERVER_PID=str(server.pid), FANOUT_SUBS=str(S),
               FANOUT_MSGS=str(M), FANOUT_WINDOW=str(opts.growth_window), CONNECT_CONCURRENCY=str(opts.concurrency),
               IDLE_TIMEOUT_MS=str(int(opts.idle_timeout * 1000)))
    taskset = shutil.which("taskset") if opts.pin else None
    cmd = ([taskset, "-c", str(opts.client_cpu)] if taskset else []) + [str(opts.bun), "--no-install", str(opts.bench_dir / "loadgen" / "loadgen.ts"), "fanout"]
    proc = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=str(opts.bench_dir), stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), opts.growth_timeout + 60)
    except asyncio.TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise
    finally:
        if proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    lines = [ln for ln in stdout.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"loadgen printed no result: {stderr.decode(errors='replace')[-500:]}")
    r = json.loads(lines[-1])
    out.update(deliveries_per_s=r.get("deliveries_per_s"), acks_per_s=r.get("acks_per_s"), lat_p50_ms=r.get("lat_p50_ms"),
               lat_p99_ms=r.get("lat_p99_ms"), lat_max_ms=r.get("lat_max_ms"), expected=r.get("expected"),
               delivered=r.get("delivered"), lost=r.get("lost"), dup=r.get("dup"), ooo=r.get("ooo"), acks_ok=r.get("acks_ok"),
               elapsed_s=r.get("elapsed_s"), connect_s=r.get("connect_s"), srv_cpu_pct=r.get("srv_cpu_pct"),
               client_cpu_pct=r.get("lg_cpu_pct"), closes=r.get("disconnects"), ok=bool(r.get("ok")))
    srv_s = r.get("srv_cpu_pct", 0) * (r.get("elapsed_s") or 0) / 100  # approximate: the loadgen's window is a bit longer
    out["srv_us_per_delivery"] = round(srv_s * 1e6 / r["delivered"], 3) if r.get("delivered") else None
    out["bound"] = "server" if (out["srv_cpu_pct"] or 0) >= 90 else "client" if (out["client_cpu_pct"] or 0) >= 85 else "neither"


async def phase_growth_one(opts: argparse.Namespace, S: int, out: dict) -> None:
    M = opts.growth_msgs
    if opts.growth_max_deliveries and S * M > opts.growth_max_deliveries:
        M = max(opts.growth_window, opts.growth_max_deliveries // S)
    server = Server(opts, f"growth-{S}")
    out.update(phase="growth", subs=S, msgs=M, window=opts.growth_window, client=opts.growth_client,
               server_cmd=" ".join(server.cmd))
    try:
        await server.wait_ready()
        log(f"growth: {S} subscribers x {M} messages (window {opts.growth_window}, client {opts.growth_client})")
        if opts.growth_client == "bun":
            await growth_bun(opts, server, S, M, out)
        else:
            await growth_python(opts, server, S, M, out)
        out["server_rss_mb"] = round((server.rss() or 0) / 2**20, 1)
        log(f"growth {S}: {out.get('deliveries_per_s')} deliveries/s, p50 {out.get('lat_p50_ms')} ms, p99 {out.get('lat_p99_ms')} ms, "
            f"lost {out.get('lost')}, server CPU {out.get('srv_cpu_pct')}%, client CPU {out.get('client_cpu_pct')}%, ok={out.get('ok')}")
    finally:
        await server.stop(grace=5)
        out["server_log_tail"] = server.log_tail()


# ---- driver ---------------------------------------------------------------------------------------


def fmt(v: object) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.3f}".rstrip("0").rstrip(".") if abs(v) < 100 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(results: list[dict], opts: argparse.Namespace, wall: float) -> str:
    parts = [f"## microsocket scale run {opts.stamp} ({'quick' if opts.quick else 'full'}; {wall:.0f} s; results {opts.results})", ""]
    for r in results:
        if r.get("error"):
            parts.append(f"**{r.get('phase')} {r.get('subs', '')} FAILED**: {r['error']}")
            parts.append("")
    idle = [r for r in results if r.get("phase") == "idle" and "rss_bytes_per_conn" in r]
    if idle:
        r = idle[0]
        parts.append("### Idle connections")
        if r.get("conns_requested"):
            parts.append(f"({r['conns_requested']:,} requested; {r['conns']:,} measured: the open-file hard limit here is "
                         f"{r['clamped_by_nofile']:,} per process and cannot be raised without CAP_SYS_RESOURCE.)")
            parts.append("")
        parts.append(table(
            ["connections", "/stats shows", "failed", "conns/s", "connect p99 ms", "RSS before → after MiB", "RSS B/conn",
             "/stats p50 / max ms (empty)", "/stats p50 / max ms (loaded)", "srv CPU idle %", "pings answered",
             "SIGTERM→exit s", "ok"],
            [[r["conns"], r["stats"].get("connections"), r["failed"], r["conns_per_s"], r["connect_p99_ms"],
              f"{r['rss_before_mb']} → {r['rss_after_mb']}", r["rss_bytes_per_conn"],
              f"{r['stats_latency_empty']['p50_ms']} / {r['stats_latency_empty']['max_ms']}",
              f"{r['stats_latency']['p50_ms']} / {r['stats_latency']['max_ms']}"
              + (f" (hold: {r['hold_stats_latency']['p50_ms']} / {r['hold_stats_latency']['max_ms']})" if r.get("hold_stats_latency") else ""),
              r.get("idle_srv_cpu_pct"), r.get("pings_answered"), r.get("sigterm_exit_s"), r.get("ok")]]))
        parts.append("")
    subs = [r for r in results if r.get("phase") == "subs" and "rss_bytes_per_sub" in r]
    if subs:
        r = subs[0]
        parts.append("### Subscriptions")
        parts.append(table(
            ["conns × topics", "topics (distinct)", "/stats subscriptions", "setup s", "subscriptions/s", "RSS +MiB",
             "RSS B/sub", "/stats p50 / max ms", "drop all s", "ok"],
            [[f"{r['conns']:,} × {r['topics_per_conn']}", r["stats"].get("topics"), r["stats"].get("subscriptions"),
              r["subs_open_s"], r["subscribe_per_s"], r["rss_delta_mb"], r["rss_bytes_per_sub"],
              f"{r['stats_latency']['p50_ms']} / {r['stats_latency']['max_ms']}", r["teardown_s"], r.get("ok")]]))
        parts.append("")
        parts.append(f"Publish→ack to topic `solo` (1 subscriber), {r['solo_msgs']:,} publishes, window {r['solo_window']}, "
                     f"median of {r['solo_rounds']} rounds:")
        parts.append("")
        parts.append(table(
            ["", "acks/s", "ack p50 ms", "ack p99 ms", "server CPU µs/publish", "delivered to solo"],
            [["without the other subscriptions", r["solo_acks_per_s_before"], r["solo_ack_p50_ms_before"], r["solo_ack_p99_ms_before"],
              r["solo_srv_us_per_publish_before"], f"{sum(x['delivered'] for x in r['solo_before']):,}/{r['solo_msgs'] * r['solo_rounds']:,}"],
             [f"with {r['stats'].get('subscriptions', 0) - 1:,} others", r["solo_acks_per_s_after"], r["solo_ack_p50_ms_after"],
              r["solo_ack_p99_ms_after"], r["solo_srv_us_per_publish_after"],
              f"{sum(x['delivered'] for x in r['solo_after']):,}/{r['solo_msgs'] * r['solo_rounds']:,}"],
             ["ratio after / before", r["solo_ratio_after_before"], None, None, r["solo_cost_ratio_after_before"], None]]))
        parts.append("")
    growth = [r for r in results if r.get("phase") == "growth" and "deliveries_per_s" in r]
    if growth:
        parts.append(f"### Fan-out cost growth (one topic, window {growth[0]['window']}, client {growth[0]['client']})")
        parts.append(table(
            ["subscribers", "messages", "deliveries/s", "acks/s", "p50 ms", "p99 ms", "lost", "srv CPU %",
             "srv CPU µs/delivery", "client CPU %", "bound", "ok"],
            [[r["subs"], r["msgs"], r["deliveries_per_s"], r["acks_per_s"], r["lat_p50_ms"], r["lat_p99_ms"], r["lost"],
              r["srv_cpu_pct"], r.get("srv_us_per_delivery"), r["client_cpu_pct"], r["bound"], r["ok"]] for r in growth]))
        parts.append("")
        parts.append("bound = client means this client's core was the limit: deliveries/s is then a lower bound for the "
                     "server, and srv CPU µs/delivery is the server's cost.")
        parts.append("")
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: the whole run takes < 1 minute")
    ap.add_argument("--only", choices=["idle", "subs", "growth"], action="append", help="run only this phase (repeatable)")
    ap.add_argument("--server", type=Path, default=REPO / "microsocket.py", help="the server script")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable, e.g. --server-arg=--ping-interval=0)")
    ap.add_argument("--results", type=Path, help="JSON lines output (default /tmp/microsocket-scale/<timestamp>.jsonl)")
    ap.add_argument("--bench-dir", type=Path, default=REPO / "bench", help="bench folder with loadgen/loadgen.ts (for --growth-client bun)")
    ap.add_argument("--bun", type=Path, default=Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "microsocket-bench")) / "bin" / "bun",
                    help="Bun binary that bench/setup.sh installs")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--phase-timeout", type=float, help="hard limit per phase, seconds (default 300, quick 40)")
    ap.add_argument("--concurrency", type=int, default=500, help="handshakes in flight")
    ap.add_argument("--stats-requests", type=int, default=20)
    ap.add_argument("--stats-gap", type=float, default=0.25, help="seconds between /stats requests")
    ap.add_argument("--idle-hold", type=float, help="phase idle: seconds to keep the connections open past the server's "
                    "20 s keepalive, polling /stats (default 25, quick 0)")
    ap.add_argument("--shutdown-wait", type=float, default=30.0, help="seconds to wait for the server to exit after SIGTERM")
    ap.add_argument("--idle-conns", type=int, help="phase idle: connections (default 50000, quick 2000)")
    ap.add_argument("--subs-conns", type=int, help="phase subs: connections (default 10000, quick 500)")
    ap.add_argument("--subs-topics", type=int, help="phase subs: topics per connection (default 100, quick 20)")
    ap.add_argument("--subs-topic-space", type=int, default=0,
                    help="phase subs: distinct topics; connection i takes topics (i*T+j) mod K; 0 = conns x topics (all distinct)")
    ap.add_argument("--subs-cycles", type=int, default=1, help="phase subs: repeat the subscribe / drop-all cycle "
                    "this many times and report RSS per cycle (leak check)")
    ap.add_argument("--subs-linger", type=float, default=0.0, help="phase subs: seconds to wait between cycles")
    ap.add_argument("--subs-concurrency", type=int, default=100, help="phase subs: setups in flight")
    ap.add_argument("--solo-msgs", type=int, help="publishes per solo round (default 20000, quick 2000)")
    ap.add_argument("--solo-window", type=int, default=32)
    ap.add_argument("--solo-rounds", type=int, default=5)
    ap.add_argument("--solo-timeout", type=float, default=60.0)
    ap.add_argument("--growth-sizes", help="subscriber counts (default 1,10,100,1000,10000; quick 1,10,100,1000)")
    ap.add_argument("--growth-msgs", type=int, help="messages per size (default 2000, quick 300)")
    ap.add_argument("--growth-max-deliveries", type=int,
                    help="cap subscribers x messages per size by sending fewer messages (default 0 = no cap, quick 300000)")
    ap.add_argument("--growth-window", type=int, default=64)
    ap.add_argument("--growth-client", choices=["python", "bun"], default="python",
                    help="python: this script's client; bun: bench/loadgen/loadgen.ts's fanout scenario")
    ap.add_argument("--growth-timeout", type=float, default=120.0, help="seconds per size for the publishing part")
    ap.add_argument("--idle-timeout", type=float, default=10.0, help="give up a growth size after this long without progress")
    ap.add_argument("--sample-cap", type=int, default=2_000_000, help="latency samples kept per size (every k-th subscriber)")
    opts = ap.parse_args(argv)
    q = opts.quick
    dflt = lambda name, full, quick: setattr(opts, name, getattr(opts, name) if getattr(opts, name) is not None else (quick if q else full))  # noqa: E731
    dflt("idle_conns", 50000, 2000)
    dflt("subs_conns", 10000, 500)
    dflt("subs_topics", 100, 20)
    dflt("solo_msgs", 20000, 2000)
    dflt("growth_msgs", 2000, 300)
    dflt("growth_max_deliveries", 0, 300_000)
    dflt("idle_hold", 25.0, 0.0)
    dflt("growth_sizes", "1,10,100,1000,10000", "1,10,100,1000")
    dflt("phase_timeout", 300.0, 40.0)
    if q:
        opts.stats_requests = min(opts.stats_requests, 10)
        opts.stats_gap = min(opts.stats_gap, 0.05)
        opts.solo_rounds = min(opts.solo_rounds, 3)
    opts.sizes = [int(s) for s in opts.growth_sizes.split(",") if s.strip()]
    opts.phases = opts.only or ["idle", "subs", "growth"]
    opts.stamp = time.strftime("%Y%m%d-%H%M%S")
    if opts.results is None:
        opts.results = Path("/tmp/microsocket-scale") / f"{opts.stamp}.jsonl"
    opts.results = opts.results.resolve()
    if opts.results.is_relative_to(REPO):
        ap.error(f"--results must be outside the repository ({REPO})")
    opts.log_dir = opts.results.parent
    opts.server = opts.server.resolve()
    opts.bench_dir = opts.bench_dir.resolve()
    if opts.growth_client == "bun" and "growth" in opts.phases:
        if not opts.bun.exists() or not (opts.bench_dir / "loadgen" / "loadgen.ts").exists():
            ap.error(f"--growth-client bun needs {opts.bun} and {opts.bench_dir}/loadgen/loadgen.ts (run bench/setup.sh)")
    return opts


async def main_async(opts: argparse.Namespace) -> list[dict]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, task.cancel)
    results: list[dict] = []
    jobs = []
    if "idle" in opts.phases:
        jobs.append(("idle", lambda out: phase_idle(opts, out)))
    if "subs" in opts.phases:
        jobs.append(("subs", lambda out: phase_subs(opts, out)))
    if "growth" in opts.phases:
        for S in opts.sizes:
            jobs.append((f"growth-{S}", lambda out, S=S: phase_growth_one(opts, S, out)))
    with open(opts.results, "a") as f:
        for name, job in jobs:
            out: dict = {"run": opts.stamp, "quick": opts.quick}
            t = time.monotonic()
            try:
                await asyncio.wait_for(job(out), opts.phase_timeout)
            except asyncio.TimeoutError:
                out["error"] = f"phase over its {opts.phase_timeout:g}s limit"
                out["ok"] = False
                log(f"{name}: {out['error']}")
            except asyncio.CancelledError:
                out["error"] = "interrupted"
                out["ok"] = False
                results.append(out)
                f.write(json.dumps(out) + "\n")
                raise
            except Exception as exc:
                out["error"] = repr(exc)
                out["ok"] = False
                log(f"{name}: failed: {exc!r}")
            out["phase_s"] = round(time.monotonic() - t, 1)
            out.setdefault("phase", name.split("-")[0])
            results.append(out)
            f.write(json.dumps(out) + "\n")
            f.flush()
            await asyncio.sleep(0.5)  # let sockets of the last phase go away
    return results


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.results.parent.mkdir(parents=True, exist_ok=True)
    nofile = opts.nofile = raise_nofile()
    need = max(opts.idle_conns if "idle" in opts.phases else 0, opts.subs_conns if "subs" in opts.phases else 0,
               max(opts.sizes) if "growth" in opts.phases else 0) + 100
    if nofile < need:
        log(f"warning: open-file limit {nofile} is below the {need} sockets this run needs")
    if opts.pin and (os.cpu_count() or 1) > max(opts.server_cpu, opts.client_cpu):
        os.sched_setaffinity(0, {opts.client_cpu})
    log(f"server {opts.server}, results {opts.results}, phases {opts.phases}, open-file limit {nofile}, "
        f"pinning {'server CPU %d, client CPU %d' % (opts.server_cpu, opts.client_cpu) if opts.pin else 'off'}")
    wall = time.monotonic()
    results: list[dict] = []
    try:
        results = asyncio.run(main_async(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted")
        return 130
    finally:
        _kill_leftovers()
    print(report(results, opts, time.monotonic() - wall))
    bad = [r for r in results if not r.get("ok")]
    if bad:
        log(f"{len(bad)} measurement(s) not ok: " + ", ".join(f"{r.get('phase')} {r.get('subs', '')}".strip() for r in bad))
    log(f"done in {time.monotonic() - wall:.0f} s; results in {opts.results}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
