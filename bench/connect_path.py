#!/usr/bin/env python3
"""Server CPU and memory per WebSocket connection set up, the way bench/loadgen's `connect` makes them (issue 13).

One connection here is what one connection of `loadgen.ts connect` is (Bun's WebSocket client, no
compression): a TCP connect to 127.0.0.1; the upgrade request Bun sends, byte for byte in form

    GET /ws HTTP/1.1 | Host | Connection: Upgrade | Upgrade: websocket | Sec-WebSocket-Version: 13 |
    Sec-WebSocket-Key (random), and nothing else

then, once the 101 has arrived, a masked `{"type":"setup","token":"conn-i"}`; once `ready` has
arrived, a masked `{"type":"subscribe","topic":"ti"}` (a topic of its own, as CONNECT_TOPICS =
CONNECT_CONNS); once `subscribed` has arrived the connection is done and held open, with at most
`--concurrency` (200, CONNECT_CONCURRENCY's default) connections in flight. `--pipelined` sends the
three at once instead: one wake-up of the server per connection rather than three, so the
difference between the two is the cost of those wake-ups.

The client is this process: raw non-blocking sockets and epoll, pinned to CPU 1 (the server to
CPU 0, as bench.py does), so the client's CPU is not the server's. For every run a fresh server
process (`microsocket.py --port 0 --publish-rate 0 --loop LOOP`, the benchmark's preset) is
started, and around each phase its CPU time is read from /proc/PID/schedstat (user + kernel, in
ns; the user/system split from /proc/PID/stat) and its memory from VmRSS:

  connect   server CPU µs per connection (from the first connect to the last `subscribed`), and
            connections/s (wall time: read it as a rate only when the server is the limit,
            srv_cpu_pct near 100);
  held      RSS per held connection: (VmRSS after − before) / N, after `--settle` seconds, and
            the server's CPU per second with the N connections idle (the timer sweep);
  teardown  server CPU µs per connection to forget the N connections after the client resets
            them (SO_LINGER 0: RST, no closing handshake, no TIME_WAIT).

/stats must show N connections and N subscriptions after the connect phase, else the run fails.
Runs alternate between loops and servers (A B A B ...), `--repeats` times; the table gives medians
and the spread (min-max).

Profiles (one extra run each, after the measured ones, for every server and loop):
  --profile        cProfile inside the server during the connect phase only (SIGUSR1 starts it,
                   SIGUSR2 stops it and writes the stats); prints the top functions by own time.
  --callgrind N    the server under valgrind's callgrind, instrumentation on during the connect
                   phase of N connections only (callgrind_control -i on/off): instructions per
                   connection, user space only, repeatable to a fraction of a percent, and the top
                   functions (callgrind_annotate). About 50× slower than a plain run.
  --stages N       no sockets: N connections' bytes fed through the server's ServerConnection in
                   this process (request, setup, subscribe, each flush), wall µs per stage: the
                   server's own code without asyncio or the kernel.

Examples:

  python3 bench/connect_path.py                                     # asyncio and uvloop, 10,000 conns, 3 repeats
  python3 bench/connect_path.py --loop asyncio -n 5000 --profile    # where the time goes
  python3 bench/connect_path.py --loop asyncio --callgrind 1000     # stable instruction counts
  git show main:microsocket.py > /tmp/ms-main.py
  python3 bench/connect_path.py --server main=/tmp/ms-main.py --server new=microsocket.py   # before/after

Standard library only (plus valgrind for --callgrind, uvloop for --loop uvloop). Nothing is written
into the repository: profiles go to --out (default /tmp/microsocket-connect-path).
"""

from __future__ import annotations

import argparse
import base64
import errno
import importlib.util
import json
import os
import re
import resource
import selectors
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
PER_SOURCE_ADDRESS = 10_000  # connections per 127.0.0.x source address (the ephemeral range holds ~28k)
HANDSHAKE_TIMEOUT = 15.0  # seconds without any connection completing: the run has failed (loadgen's HANDSHAKE_TIMEOUT_MS)
RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() resets the connection
T0 = time.monotonic()


def log(*parts: object) -> None:
    print(f"[connect_path {time.monotonic() - T0:6.1f}s]", *parts, file=sys.stderr, flush=True)


# ---- the server process: CPU and RSS from /proc ----------------------------------------------------


def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def cpu_ns(pid: int) -> int:
    """CPU time of a process, all threads, in ns (schedstat: user + kernel, as the scheduler counts it)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def user_sys_ticks(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]), int(fields[12])


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def process_ticks() -> dict[int, int]:
    """utime + stime (clock ticks) of every user process, by PID (kernel threads left out)."""
    ticks = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[1] != "2" and name != "2":  # ppid 2: a kernel thread
            ticks[int(name)] = int(fields[11]) + int(fields[12])
    return ticks


def wait_for_quiet(pid: int, limit_pct: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until processes other than this one and the server use under
    `limit_pct` % of a core over half a second; return what they used last."""
    deadline = time.monotonic() + timeout
    while True:
        a = Sample(pid)
        time.sleep(0.5)
        other = Sample(pid).other_pct(a)
        if other < limit_pct or time.monotonic() > deadline:
            return other
        log(f"other processes use {other:.0f} % of a core: waiting")


class Sample:
    """The server's CPU counters at one moment, with this client's and the whole machine's."""

    def __init__(self, pid: int) -> None:
        self.wall = time.monotonic()
        self.ns = cpu_ns(pid)
        self.user, self.sys = user_sys_ticks(pid)
        self.client = time.process_time()
        self.pid = pid
        self.others = process_ticks()

    def other_pct(self, before: Sample) -> float:
        """CPU % (100 = one core) used by the user processes other than the server and this client in between."""
        wall = max(1e-9, self.wall - before.wall)
        mine = (self.pid, os.getpid())
        ticks = sum(t - before.others.get(pid, 0) for pid, t in self.others.items() if pid not in mine)
        return 100 * ticks / CLK_TCK / wall

    def since(self, before: Sample, n: int) -> dict:
        """CPU per item (µs) and CPU share (%) between `before` and this sample."""
        cpu = (self.ns - before.ns) / 1e3
        wall = max(1e-9, self.wall - before.wall)
        user, system = self.user - before.user, self.sys - before.sys
        return {
            "us_per_conn": round(cpu / max(1, n), 2),
            "srv_cpu_pct": round(100 * cpu / 1e6 / wall, 1),
            "user_share": round(user / max(1, user + system), 3),
            "wall_s": round(wall, 3),
            "client_cpu_pct": round(100 * (self.client - before.client) / wall, 1),
            "other_cpu_pct": round(self.other_pct(before), 1),
        }


class ServerProcess:
    """A server as a subprocess in its own session, pinned to `cpu`; `wrap` runs it under cProfile or callgrind."""

    def __init__(self, path: Path, loop: str, extra: list[str], cpu: int | None, out: Path, wrap: list[str] | None = None) -> None:
        self.out = out
        cmd = [str(path), "--host", "127.0.0.1", "--port", "0", "--publish-rate", "0", "--loop", loop,
               "--log-level", "WARNING", *extra]
        self.cmd = (wrap or [sys.executable]) + cmd

        def child_setup() -> None:
            raise_nofile()
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})

        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out / "server.log"
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log_file,
                                     start_new_session=True, preexec_fn=child_setup)
        self.pid = self.proc.pid
        self.port = self._read_port()

    def _read_port(self) -> int:
        for line in self.proc.stdout:  # the banner: "microsocket X listening on http://127.0.0.1:PORT"
            match = re.search(rb"listening on https?://[^ ]*:(\d+)", line)
            if match:
                return int(match.group(1))
        self.proc.wait()
        raise RuntimeError(f"server exited ({self.proc.returncode}) before listening; see {self.log_path}")

    def stats(self) -> dict:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2])

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


# ---- the client: the loadgen's connect, on raw sockets ---------------------------------------------

CONNECTING, UPGRADING, SETTING_UP, SUBSCRIBING = range(4)


def masked_text_frame(text: str) -> bytes:
    """A client text frame (payload < 126 bytes), masked with a random key as §5.3 requires."""
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    masked = (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")
    return bytes((0x81, 0x80 | len(payload))) + mask + masked


def next_frame(buf: bytearray) -> bytes | None:
    """Take one complete unmasked server frame's payload off `buf`; None if it is not all there yet."""
    if len(buf) < 2:
        return None
    length, start = buf[1] & 0x7F, 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, start = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, start = int.from_bytes(buf[2:10], "big"), 10
    if len(buf) < start + length:
        return None
    payload = bytes(buf[start : start + length])
    del buf[: start + length]
    return payload


class Conn:
    __slots__ = ("sock", "i", "state", "buf")

    def __init__(self, sock: socket.socket, i: int) -> None:
        self.sock, self.i, self.state, self.buf = sock, i, CONNECTING, bytearray()


def connect_all(port: int, n: int, concurrency: int, pipelined: bool, path: str = "/ws") -> list[socket.socket]:
    """Open n connections the loadgen's way, at most `concurrency` in flight; return the held sockets."""
    sel = selectors.EpollSelector()
    held: list[socket.socket] = []
    started = 0
    last_progress = time.monotonic()

    def request(i: int) -> bytes:
        key = base64.b64encode(os.urandom(16)).decode()
        head = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode()
        return head + (setup(i) + subscribe(i) if pipelined else b"")

    def setup(i: int) -> bytes:
        return masked_text_frame(f'{{"type":"setup","token":"conn-{i}"}}')

    def subscribe(i: int) -> bytes:
        return masked_text_frame(f'{{"type":"subscribe","topic":"t{i}"}}')

    def start(i: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        source = f"127.0.0.{1 + i // PER_SOURCE_ADDRESS}"
        if source != "127.0.0.1":
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        err = sock.connect_ex(("127.0.0.1", port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect: {os.strerror(err)}")
        sel.register(sock, selectors.EVENT_WRITE, Conn(sock, i))

    def fail(conn: Conn, why: str) -> None:
        raise RuntimeError(f"connection {conn.i}: {why}")

    while started < min(concurrency, n):
        start(started)
        started += 1
    while len(held) < n:
        events = sel.select(1.0)
        if not events and time.monotonic() - last_progress > HANDSHAKE_TIMEOUT:
            raise RuntimeError(f"no progress for {HANDSHAKE_TIMEOUT:g} s with {len(held)} of {n} connections done")
        for key, _ in events:
            conn: Conn = key.data
            sock = conn.sock
            if conn.state == CONNECTING:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(conn, f"connect: {os.strerror(err)}")
                sock.send(request(conn.i))
                conn.state = UPGRADING
                sel.modify(sock, selectors.EVENT_READ, conn)
                continue
            data = sock.recv(65536)
            if not data:
                fail(conn, "closed by the server")
            buf = conn.buf
            buf += data
            if conn.state == UPGRADING:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    continue
                if not buf.startswith(b"HTTP/1.1 101 "):
                    fail(conn, f"no 101: {bytes(buf[:80])!r}")
                del buf[: end + 4]
                conn.state = SETTING_UP
                if not pipelined:
                    sock.send(setup(conn.i))
            while (payload := next_frame(buf)) is not None:
                if conn.state == SETTING_UP and b'"type":"ready"' in payload:
                    conn.state = SUBSCRIBING
                    if not pipelined:
                        sock.send(subscribe(conn.i))
                elif conn.state == SUBSCRIBING and b'"type":"subscribed"' in payload:
                    sel.unregister(sock)  # done: held open, no longer read
                    held.append(sock)
                    last_progress = time.monotonic()
                    if started < n:
                        start(started)
                        started += 1
                    break
                else:
                    fail(conn, f"unexpected frame {payload[:120]!r}")
    sel.close()
    return held


def reset_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RST)
        sock.close()


def wait_idle(pid: int, quiet_ns: int = 2_000_000, step: float = 0.1, timeout: float = 60.0) -> None:
    """Wait until the server uses less than `quiet_ns` of CPU in `step` seconds (it has caught up)."""
    deadline = time.monotonic() + timeout
    last = cpu_ns(pid)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = cpu_ns(pid)
        if now - last < quiet_ns:
            return
        last = now


# ---- one run --------------------------------------------------------------------------------------


def run_once(opts: argparse.Namespace, label: str, path: Path, loop: str, wrap: str | None = None) -> dict:
    out = opts.out / f"{opts.stamp}-{label}-{loop}"
    n = opts.conns
    wrap_cmd = None
    profile_file = out / "server.pstats"
    callgrind_file = out / "callgrind.out"
    if wrap == "profile":
        wrap_cmd = [sys.executable, str(Path(__file__).resolve()), "_profiled-server", str(profile_file)]
    elif wrap == "callgrind":
        n = opts.callgrind
        wrap_cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={callgrind_file}", sys.executable]
    server = ServerProcess(path, loop, opts.server_arg, opts.server_cpu if opts.pin else None, out, wrap_cmd)
    result: dict = {"label": label, "loop": loop, "conns": n, "concurrency": opts.concurrency,
                    "mode": "pipelined" if opts.pipelined else "loadgen", "wrap": wrap}
    try:
        time.sleep(opts.settle)
        wait_idle(server.pid)
        if opts.wait_idle and not wrap:
            wait_for_quiet(server.pid, opts.noise, opts.wait_idle)
        if wrap == "callgrind":
            subprocess.run(["callgrind_control", "-i", "on", str(server.pid)], check=True, capture_output=True)
        elif wrap == "profile":
            os.kill(server.pid, signal.SIGUSR1)
            time.sleep(0.2)
        rss0 = rss_bytes(server.pid)
        s0 = Sample(server.pid)
        socks = connect_all(server.port, n, opts.concurrency, opts.pipelined)
        s1 = Sample(server.pid)
        if wrap == "callgrind":
            subprocess.run(["callgrind_control", "-d", str(server.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-i", "off", str(server.pid)], check=True, capture_output=True)
        elif wrap == "profile":
            os.kill(server.pid, signal.SIGUSR2)
        connect = s1.since(s0, n)
        result["connect_us_per_conn"] = connect["us_per_conn"]
        result["conns_per_s"] = round(n / connect["wall_s"])
        result["connect_srv_cpu_pct"] = connect["srv_cpu_pct"]
        result["connect_user_share"] = connect["user_share"]
        result["client_cpu_pct"] = connect["client_cpu_pct"]
        result["other_cpu_pct"] = connect["other_cpu_pct"]
        result["noisy"] = connect["other_cpu_pct"] >= opts.noise
        stats = server.stats()
        if stats.get("connections") != n or stats.get("subscriptions") != n:
            raise RuntimeError(f"/stats after connect: {stats.get('connections')} connections, "
                               f"{stats.get('subscriptions')} subscriptions, {n} expected")
        s2 = Sample(server.pid)
        time.sleep(opts.settle)
        s3 = Sample(server.pid)
        result["rss_bytes_per_conn"] = round((rss_bytes(server.pid) - rss0) / n)
        result["idle_us_per_conn_s"] = round((s3.ns - s2.ns) / 1e3 / n / max(1e-9, s3.wall - s2.wall), 3)
        reset_all(socks)
        wait_idle(server.pid)
        s4 = Sample(server.pid)
        result["teardown_us_per_conn"] = round((s4.ns - s3.ns) / 1e3 / n, 2)
        if wrap == "callgrind":
            result.update(callgrind_summary(callgrind_file, n, opts.top))
        elif wrap == "profile":
            for _ in range(100):
                if profile_file.exists():
                    break
                time.sleep(0.1)
            result["profile"] = profile_top(profile_file, n, opts.top)
    finally:
        server.stop()
    return result


def callgrind_summary(base: Path, n: int, top: int) -> dict:
    dumps = sorted(base.parent.glob(base.name + ".*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise RuntimeError(f"no callgrind dump beside {base}")
    dump = dumps[-1]
    total = 0
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
    annotate = subprocess.run(["callgrind_annotate", "--threshold=100", str(dump)], capture_output=True, text=True)
    lines = [line for line in annotate.stdout.splitlines() if re.match(r"\s*[\d,]+ \(", line)]
    return {"callgrind_ir_per_conn": round(total / n), "callgrind_file": str(dump), "callgrind_top": lines[: top + 1]}


def profile_top(path: Path, n: int, top: int) -> list[str]:
    import pstats

    stats = pstats.Stats(str(path))
    rows = []
    total = stats.total_tt  # type: ignore[attr-defined]
    for func, (cc, nc, tt, ct, _callers) in sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]:  # type: ignore[attr-defined]
        filename, line, name = func
        where = f"{Path(filename).name}:{line}({name})" if line else name
        rows.append(f"{1e6 * tt / n:8.2f} µs {100 * tt / total:5.1f} %  {1e6 * ct / n:8.2f} µs cum  {nc / n:6.2f} calls  {where}")
    return [f"profiled total {1e6 * total / n:.1f} µs per connection (cProfile's own overhead included)"] + rows


def profiled_server(out: str, argv: list[str]) -> None:
    """Run SERVER ARGS in this process with cProfile switched on by SIGUSR1 and off (and written to `out`) by SIGUSR2."""
    import cProfile

    path = argv[0]
    spec = importlib.util.spec_from_file_location("microsocket", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["microsocket"] = module
    sys.argv = argv
    spec.loader.exec_module(module)
    profiler = cProfile.Profile()

    def on(signum: int, frame: object) -> None:
        profiler.enable()

    def off(signum: int, frame: object) -> None:
        profiler.disable()
        profiler.dump_stats(out)

    signal.signal(signal.SIGUSR1, on)
    signal.signal(signal.SIGUSR2, off)
    sys.exit(module.main(argv[1:]))


# ---- the same path in-process, without sockets or event loop -----------------------------------


class FakeTransport:
    """Just enough of an asyncio transport for ServerConnection: writes are kept, nothing is sent."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (16384, 65536)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def stages(path: Path, n: int, extra: list[str]) -> dict:
    """Feed n connections' bytes through the server's own ServerConnection in this process (no
    sockets, no event loop, every connection kept): wall µs per connection for each stage."""
    spec = importlib.util.spec_from_file_location("microsocket", path)
    ms = importlib.util.module_from_spec(spec)
    sys.modules["microsocket"] = ms
    spec.loader.exec_module(ms)
    config = ms.config_from_args(ms.build_parser().parse_args(["--port", "0", "--publish-rate", "0", *extra]))
    server = ms.Server(ms.fit_open_file_limit(config))

    class Loop:  # Server._schedule_flush's call_soon: the stages call _flush themselves
        def call_soon(self, *args: object) -> None:
            pass

    server.loop = Loop()
    requests = [(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:3000\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n\r\n").encode()
                for _ in range(n)]
    setups = [masked_text_frame(f'{{"type":"setup","token":"conn-{i}"}}') for i in range(n)]
    subscribes = [masked_text_frame(f'{{"type":"subscribe","topic":"t{i}"}}') for i in range(n)]
    names = ("ServerConnection()", "connection_made", "upgrade request -> 101", "setup", "flush ready",
             "subscribe", "flush subscribed")
    totals = [0.0] * len(names)
    held = []
    clock = time.perf_counter
    cpu0 = time.process_time()
    for i in range(n):
        t0 = clock()
        conn = ms.ServerConnection(server)
        t1 = clock()
        conn.connection_made(FakeTransport())
        t2 = clock()
        conn.data_received(requests[i])
        t3 = clock()
        conn.data_received(setups[i])
        t4 = clock()
        server._flush()
        t5 = clock()
        conn.data_received(subscribes[i])
        t6 = clock()
        server._flush()
        t7 = clock()
        for k, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6)):
            totals[k] += dt
        if len(conn.transport.written) != 3:
            raise RuntimeError(f"connection {i}: {conn.transport.written!r}")
        held.append(conn)
    cpu = time.process_time() - cpu0
    result = {name: round(1e6 * t / n, 2) for name, t in zip(names, totals)}
    result["total (CPU)"] = round(1e6 * cpu / n, 2)
    return result


# ---- report ---------------------------------------------------------------------------------------


def summarise(results: list[dict]) -> str:
    keys = [("connect_us_per_conn", "server CPU µs/conn"), ("conns_per_s", "conns/s"), ("connect_srv_cpu_pct", "server CPU %"),
            ("client_cpu_pct", "client CPU %"), ("other_cpu_pct", "other CPU %"),
            ("connect_user_share", "user share"), ("rss_bytes_per_conn", "RSS B/conn"),
            ("idle_us_per_conn_s", "idle µs/conn/s"), ("teardown_us_per_conn", "teardown µs/conn")]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["label"], r["loop"]), []).append(r)
    lines = ["| server | loop | runs | " + " | ".join(k[1] for k in keys) + " |", "|---|---|---:|" + "---:|" * len(keys)]
    for (label, loop), rs in groups.items():
        cells = []
        for key, _ in keys:
            values = [r[key] for r in rs if r.get(key) is not None]
            if not values:
                cells.append("–")
                continue
            med = statistics.median(values)
            fmt = (lambda v: f"{v:,.0f}") if abs(med) >= 100 else (lambda v: f"{v:.3g}")
            cells.append(fmt(med) + (f" ({fmt(min(values))}–{fmt(max(values))})" if len(values) > 1 else ""))
        lines.append(f"| {label} | {loop} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring (head -60 bench/connect_path.py) for what is measured.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--server", action="append", default=[], metavar="[LABEL=]PATH",
                    help="server script, repeatable to compare versions (default: this repository's microsocket.py)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra server argument (repeatable, e.g. --server-arg=--permessage-deflate)")
    ap.add_argument("--loop", default="asyncio,uvloop", help="event loops to run, comma-separated (the server's --loop)")
    ap.add_argument("-n", "--conns", type=int, default=10_000, help="connections per run (held open together)")
    ap.add_argument("-c", "--concurrency", type=int, default=200, help="handshakes in flight (the loadgen's CONNECT_CONCURRENCY)")
    ap.add_argument("-r", "--repeats", type=int, default=3, help="measured runs per server and loop")
    ap.add_argument("--pipelined", action="store_true", help="send upgrade, setup and subscribe in one write instead of one per reply")
    ap.add_argument("--profile", action="store_true", help="one more run per server and loop under cProfile: the top functions")
    ap.add_argument("--callgrind", type=int, metavar="N", default=0, help="one more run per server and loop of N connections under callgrind")
    ap.add_argument("--stages", type=int, metavar="N", default=0,
                    help="instead: N connections through ServerConnection in this process, without sockets: µs per stage")
    ap.add_argument("--top", type=int, default=30, help="profile rows to print")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait after start-up and before reading RSS")
    ap.add_argument("--wait-idle", type=float, default=60.0, help="seconds to wait, before each run, for other processes to go quiet")
    ap.add_argument("--noise", type=float, default=10.0, help="other processes' CPU %% over which a run is flagged noisy")
    ap.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--client-cpu", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/microsocket-connect-path"), help="server logs and profiles")
    ap.add_argument("--json", action="store_true", help="print every run as a JSON line too")
    opts = ap.parse_args(argv)
    servers = []
    for spec in opts.server or [f"microsocket={REPO / 'microsocket.py'}"]:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = Path(spec).stem, spec
        servers.append((label, Path(path).resolve()))
    opts.servers = servers
    opts.loops = [loop.strip() for loop in opts.loop.split(",") if loop.strip()]
    opts.stamp = time.strftime("%Y%m%d-%H%M%S")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_profiled-server"]:
        profiled_server(argv[1], argv[2:])
        return 0
    opts = parse_args(argv)
    if opts.stages:
        for label, path in opts.servers:
            print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in stages(path, opts.stages, opts.server_arg).items()) + " µs/conn")
        return 0
    hard = raise_nofile()
    if opts.conns + 100 > hard:
        log(f"open-file limit {hard}: at most {hard - 100} connections")
        opts.conns = hard - 100
    if opts.pin:
        os.sched_setaffinity(0, {opts.client_cpu})
    results = []
    for rep in range(opts.repeats):
        for label, path in opts.servers:
            for loop in opts.loops:
                r = run_once(opts, label, path, loop)
                log(f"{label} {loop} run {rep + 1}: {r['connect_us_per_conn']} µs/conn, {r['conns_per_s']} conns/s "
                    f"(server {r['connect_srv_cpu_pct']} %, client {r['client_cpu_pct']} %, other {r['other_cpu_pct']} %), {r['rss_bytes_per_conn']} B/conn, teardown {r['teardown_us_per_conn']} µs/conn")
                results.append(r)
                if opts.json:
                    print(json.dumps(r), flush=True)
    extra = []
    for wrap in (["profile"] if opts.profile else []) + (["callgrind"] if opts.callgrind else []):
        for label, path in opts.servers:
            for loop in opts.loops:
                r = run_once(opts, label, path, loop, wrap)
                extra.append(r)
                if opts.json:
                    print(json.dumps(r), flush=True)
    mode = "pipelined" if opts.pipelined else "one write per reply, as the loadgen"
    print(f"\n{opts.conns} connections, {opts.concurrency} in flight, {mode}; median (min–max) of {opts.repeats}\n")
    if results:
        print(summarise(results))
    for r in extra:
        if r["wrap"] == "profile":
            print(f"\n### cProfile, {r['label']} {r['loop']}, {r['conns']} connections: own time per connection\n")
            print("\n".join(r["profile"]))
        else:
            print(f"\n### callgrind, {r['label']} {r['loop']}, {r['conns']} connections: "
                  f"{r['callgrind_ir_per_conn']:,} instructions per connection ({r['callgrind_file']})\n")
            print("\n".join(r["callgrind_top"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
