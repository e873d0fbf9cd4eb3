"""Real Redis for the tests: a redis-server process per test, and a blocking RESP client.

A plain module, so conftest.py can take the fixture with one import (`from conftest_redis import
redis_server`) and a test module can too:

    start_redis(tmp_dir, *options)   context manager: a redis-server on a free port, no persistence,
                                     answering PING; stopped by its PID at the end, never left behind
    redis_server                     the fixture around it: RedisAddress(host, port, pid); skips when
                                     there is no redis-server (Debian: apt-get install redis-server)
    RespClient(host, port)           one raw socket spoken to with the section 13 codec: call(),
                                     send() (pipelined), reply(), with a timeout on every read

The server binary is $REDIS_SERVER, else redis-server on the PATH, else Debian's /usr/bin/redis-server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Any, Iterator, NamedTuple

import pytest

try:  # once section 13 of microsocket.py holds the codec
    from microsocket import NEED_MORE, RespParser, encode_command
except ImportError:  # until then, the draft beside this file
    from resp_draft import NEED_MORE, RespParser, encode_command

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
    """A blocking client on one raw socket, speaking RESP through RespParser. Every read has a
    timeout, so a reply that never comes fails the test instead of hanging it."""

    def __init__(self, host: str, port: int, timeout: float = REDIS_READ_TIMEOUT, recv_size: int = 65536) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.parser = RespParser()
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
        self.sock.sendall(b"".join(encode_command(*command) for command in commands))

    def reply(self) -> Any:
        """The next reply (or push), reading as much as it takes."""
        while True:
            reply = self.parser.next_reply()
            if reply is not NEED_MORE:
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
