"""Section 16 of microsocket.py: the command line, run as a subprocess.

The CLI's checks and messages, its banner, the environment variables, signals, and the open-file
limit that caps --max-connections, and --loop. Last, the conformance kit (test_microsocket.py) run
against `python3 microsocket.py` by its URL, as against any other implementation.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import microsocket as ms
from conftest import HERE, SCRIPT, RawClient, child_env, cli, free_port, http_request, read_banner, run, setup, wait_until


@pytest.mark.slow  # a Python subprocess each
def test_cli_help_lists_every_option():
    """--help lists every Config option (and its environment variable) and exits 0."""
    done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=20, env=child_env())
    assert done.returncode == 0, done.stderr
    for field in ms.dataclasses.fields(ms.Config):
        special = {"demo": "--no-demo", "allowed_origins": "--allowed-origin", "sign_keys": "--sign-key"}
        flag = special.get(field.name, "--" + field.name.replace("_", "-"))
        assert flag in done.stdout, flag
        assert "MICROSOCKET_" + field.name.upper() in done.stdout, field.name
    for flag in ("--log-level", "--version"):
        assert flag in done.stdout


@pytest.mark.slow  # a Python subprocess each
@pytest.mark.parametrize(
    "args, env",
    [(["--max-buffer", "-1"], {}), (["--port", "-5"], {}), (["--history-age", "-0.5"], {}), ([], {"MICROSOCKET_MAX_SUBSCRIPTIONS": "-3"})],
    ids=["max-buffer", "port", "history-age", "env"],
)
def test_cli_refuses_negative_limits(args, env):
    """A negative limit, from a flag or the environment, is refused with exit status 2."""
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=20, env=child_env(**env))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "negative" in done.stderr


@pytest.mark.slow  # a Python subprocess each
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
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=20, env=child_env())
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow  # a Python subprocess each
def test_cli_bad_value_is_usage_error():
    """A non-numeric limit is an argparse usage error (exit 2)."""
    done = subprocess.run([sys.executable, SCRIPT, "--max-buffer", "lots"], capture_output=True, text=True, timeout=20, env=child_env())
    assert done.returncode == 2 and "--max-buffer" in done.stderr


@pytest.mark.slow  # a Python subprocess each
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_prints_urls_and_shuts_down_on_signal(sig, wsclient):
    """The CLI prints the docs and ws URLs; on SIGTERM/SIGINT a client gets 1001 and the process exits 0."""
    port = free_port()

    async def close_code_on_signal(proc) -> int:
        async with wsclient.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            await setup(ws)
            proc.send_signal(sig)
            await asyncio.wait_for(ws.wait_closed(), 10)
            return ws.close_code

    with cli("--port", str(port), "--log-level", "WARNING") as (proc, lines):
        banner = read_banner(lines)
        assert f"http://127.0.0.1:{port}/docs" in banner
        assert f"ws://127.0.0.1:{port}/ws" in banner
        assert run(close_code_on_signal(proc)) == 1001
        assert proc.wait(timeout=10) == 0


@pytest.mark.slow  # a Python subprocess each
def test_cli_port_from_environment():
    """MICROSOCKET_PORT is honoured when --port is not given."""
    port = free_port()
    with cli(env=child_env(MICROSOCKET_PORT=str(port))) as (proc, lines):
        banner = read_banner(lines)
        assert f"ws://127.0.0.1:{port}/ws" in banner
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_open_file_limit_caps_max_connections(monkeypatch):
    """max_connections and max_pending above the open-file limit are lowered to fit under it together (after trying to raise the soft limit)."""

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
    # The pending connections' share (a sixteenth of a tight budget) and the WebSocket ones fill it exactly.
    assert config.max_pending == (1000 - ms.FD_RESERVE) // 16
    assert config.max_connections + config.max_pending == 1000 - ms.FD_RESERVE
    small = ms.fit_open_file_limit(ms.Config(max_connections=10, max_pending=20))
    assert (small.max_connections, small.max_pending) == (10, 20)


@pytest.mark.slow  # a Python subprocess each
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a Unix process limit (fork and setrlimit)")
def test_past_the_open_file_limit_handshakes_get_503_not_hangs():
    """With a low open-file limit, WebSocket handshakes past the cap get HTTP 503 instead of hanging on accept."""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    port = free_port()
    clients = []
    with cli("--port", str(port), preexec_fn=low_limit) as (proc, lines):
        try:
            read_banner(lines)
            statuses = []
            for _ in range(160):
                client = RawClient(port)
                clients.append(client)
                statuses.append(client.handshake(expect=None).status)
                if statuses[-1] == 503:
                    break
            pending = max(16, (160 - ms.FD_RESERVE) // 16)  # the pending connections' share of a tight budget
            assert statuses.count(101) == 160 - ms.FD_RESERVE - pending and statuses[-1] == 503
        finally:
            for client in clients:
                client.close()
    err = "".join(proc.stderr_lines)
    assert "max-connections 100000 is over what the open-file limit (160) allows" in err
    assert "out of system resource" not in err


# -- --loop: asyncio's event loop, or uvloop when it is installed


def _has_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def test_tune_gc_freezes_what_exists_and_raises_the_young_threshold():
    """tune_gc() moves every object alive now out of later collections (gc.get_freeze_count) and
    sets the young threshold it is given, leaving the older generations' thresholds as they were;
    an object made after it is collected as usual."""
    import gc

    saved = gc.get_threshold()
    try:
        frozen = ms.tune_gc(young=5000)
        assert frozen == gc.get_freeze_count() > 1000  # the modules' objects, at least
        assert gc.get_threshold() == (5000, saved[1], saved[2])

        class Cycle:
            pass

        a, b = Cycle(), Cycle()
        a.other, b.other = b, a  # a cycle made after the freeze: still garbage the collector finds
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*saved)


def test_the_server_process_tunes_its_garbage_collector():
    """The command line's server calls tune_gc() before it serves (its debug log says how many
    start-up objects it froze and the young threshold)."""
    with cli("--port", "0", "--log-level", "DEBUG") as (proc, lines):
        while (line := lines.get(timeout=20)) is not None and "listening on" not in line:
            pass
        wait_until(lambda: any("garbage collector:" in line for line in proc.stderr_lines), timeout=5, what="the gc log line")
        line = next(line for line in proc.stderr_lines if "garbage collector:" in line)
        match = re.search(r"garbage collector: (\d+) start-up objects frozen, young collections every (\d+) allocations", line)
        assert match and int(match.group(1)) > 1000 and int(match.group(2)) == ms.GC_YOUNG_THRESHOLD, line


def test_event_loop_factory_picks_what_is_asked():
    """--loop asyncio is asyncio's own loop; auto is uvloop exactly when it is installed; a wrong name is refused."""
    factory, name = ms.event_loop_factory("asyncio")
    assert (factory, name) == (asyncio.new_event_loop, "asyncio")
    factory, name = ms.event_loop_factory("auto")
    assert name == ("uvloop" if _has_uvloop() else "asyncio")
    loop = factory()
    try:
        assert type(loop).__module__.split(".")[0] == name
    finally:
        loop.close()
    with pytest.raises(ValueError, match="--loop must be one of"):
        ms.event_loop_factory("trio")


@pytest.fixture
def without_uvloop(tmp_path) -> dict:
    """A child environment where `import uvloop` fails as it does where uvloop is not installed
    (a package of that name first on the path that raises ImportError), so the test runs here too."""
    shim = tmp_path / "uvloop"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'uvloop'\", name='uvloop')\n")
    path = os.environ.get("PYTHONPATH")
    return child_env(PYTHONPATH=str(tmp_path) + (os.pathsep + path if path else ""))


def test_loop_uvloop_without_uvloop_is_a_usage_error(without_uvloop):
    """--loop uvloop where uvloop is not installed stops at start (exit 2) and says how to install it."""
    done = subprocess.run([sys.executable, SCRIPT, "--loop", "uvloop"], capture_output=True, text=True, timeout=20, env=without_uvloop)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "pip install uvloop" in done.stderr and "Traceback" not in done.stderr


def test_loop_auto_without_uvloop_runs_on_asyncio(without_uvloop):
    """--loop auto (the default) where uvloop is not installed is no error: the server starts on
    asyncio's loop (its log names a loop only when it is not asyncio's, before the demo-auth
    warning that start() logs)."""
    with cli("--port", "0", "--loop", "auto", env=without_uvloop) as (proc, lines):
        seen = []
        while (line := lines.get(timeout=20)) is not None:
            seen.append(line)
            if "listening on" in line:
                break
        assert any("listening on" in line for line in seen), (seen, proc.stderr_lines)
        wait_until(lambda: any("demo auth" in line for line in proc.stderr_lines), timeout=5)
        assert not [line for line in proc.stderr_lines if "event loop:" in line], proc.stderr_lines


@pytest.mark.slow  # a Python subprocess
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_server_serves_pubsub_on_each_event_loop(loop, wsclient):
    """On either event loop the CLI server sets up, subscribes, publishes and delivers, and stops with 1001 on SIGTERM."""
    if loop == "uvloop" and not _has_uvloop():
        pytest.skip("uvloop is not installed: python3 -m pip install uvloop")
    port = free_port()

    async def round_trip(proc) -> tuple[dict, dict, int]:
        async with wsclient.connect(f"ws://127.0.0.1:{port}/ws") as a, wsclient.connect(f"ws://127.0.0.1:{port}/ws") as b:
            await setup(a, "alice")
            await setup(b, "bob")
            await b.send(json.dumps({"type": "subscribe", "topic": "t"}))
            assert json.loads(await b.recv())["type"] == "subscribed"
            await a.send(json.dumps({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"x": "y" * 100}}))
            ack = json.loads(await a.recv())
            message = json.loads(await b.recv())
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(b.wait_closed(), 10)
            return ack, message, b.close_code

    with cli("--port", str(port), "--loop", loop, "--log-level", "INFO") as (proc, lines):
        read_banner(lines)
        ack, message, code = run(round_trip(proc))
        assert ack["status"] == "ok" and ack["seqNo"] == 1
        assert message["data"] == {"x": "y" * 100} and message["seqNo"] == 1
        assert code == 1001
        assert proc.wait(timeout=10) == 0
    named = any("event loop: uvloop" in line for line in proc.stderr_lines)
    assert named == (loop == "uvloop")


# -- the conformance kit against this server, by URL

# Limits far from the defaults, so that the run shows the kit reading them (GET /asyncapi.json)
# rather than assuming them, each small enough for its test to reach it; short timers; compression on.
KIT_ARGS = (
    "--max-subscriptions", "20", "--history-messages", "64", "--publish-rate", "200", "--publish-burst", "300",
    "--max-message-size", "65536", "--max-head-size", "4096", "--max-body-size", "4096", "--max-buffer", "262144",
    "--max-connections", "300", "--max-presence", "3", "--max-topic-length", "64", "--max-message-id-length", "32",
    "--setup-timeout", "2", "--ping-interval", "2", "--ping-timeout", "2", "--permessage-deflate",
)


@pytest.mark.slow
@pytest.mark.time_limit(240)
def test_conformance_kit_against_microsocket_by_url(tmp_path):
    """`python3 microsocket.py` (limits set far from the defaults) passes the whole conformance kit run at its URL: 0 failed, 0 skipped."""
    report = tmp_path / "kit.xml"
    with cli("--port", "0", "--log-level", "WARNING", *KIT_ARGS) as (proc, lines):
        url = re.search(r"ws://\S+/ws", read_banner(lines)).group()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "conformance", "-rfEs", f"--junitxml={report}",
             os.path.join(HERE, "test_microsocket.py")],
            cwd=HERE, env=child_env(MICROSOCKET_TARGET=url), capture_output=True, text=True, timeout=220,
        )
        assert proc.poll() is None, "the server died during the run"
    root = ET.parse(report).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "failures", "errors", "skipped")}
    assert done.returncode == 0 and counts["tests"] > 100, done.stdout[-3000:]
    assert (counts["failures"], counts["errors"], counts["skipped"]) == (0, 0, 0), done.stdout[-3000:]


# The clauses a kit test may name: SPEC.md's numbered sections and their headings (version 1.1).
SPEC_CLAUSES = (
    "§1 Endpoints", "§2 Messages", "§2 Client → server", "§2 Server → client", "§2 Error codes", "§2 Close codes",
    "§3 Auth", "§3 ACL", "§3 Dedup", "§3 Ordering", "§3 Epochs", "§3 History", "§3 Sessions", "§3 Slow consumers",
    "§3 Latency", "§3 Signing", "§3 Compression", "§3 Keepalive", "§3 Limits", "§3 Shutdown", "§3 Scale-out",
    "§4 Configuration names",
)


def test_every_conformance_test_names_its_spec_clause():
    """Every test of the conformance kit opens its docstring with the SPEC clause it checks ("SPEC §3 Dedup ..."), and only kit tests are in its file."""
    import test_microsocket as kit

    tests = {name: fn for name, fn in vars(kit).items() if name.startswith("test_") and callable(fn)}
    assert len(tests) > 40
    clause = re.compile("SPEC (" + "|".join(map(re.escape, SPEC_CLAUSES)) + r")\b")
    for name, fn in tests.items():
        assert clause.match(fn.__doc__ or ""), f"{name}: {(fn.__doc__ or '')[:60]!r}"
    assert kit.pytestmark.name == "conformance"  # the whole file is the kit


# -- `sub` and `pub`: the client on the command line


def _client_command(*args: str, stdin: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], input=stdin, capture_output=True, text=True, timeout=timeout, env=child_env())


def _next_json(lines, timeout: float = 10) -> dict:
    line = lines.get(timeout=timeout)
    assert line is not None, "the sub process ended"
    return json.loads(line)


@pytest.mark.slow  # Python subprocesses
def test_pub_and_sub_on_the_command_line():
    """`pub TOPIC DATA` and `pub TOPIC` < lines print one ack per message as JSON; `sub` prints each message as
    one JSON line in order, DATA as JSON when it is JSON, else as a string; a refused publish exits 1 naming the code."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    with cli("--port", str(port), "--log-level", "WARNING") as (server, lines):
        read_banner(lines)
        with cli("sub", "prices", "news", "--url", url, "--token", "reader") as (sub, sub_lines):
            wait_until(lambda: _subscribers(port) == 2, timeout=10)
            done = _client_command("pub", "prices", '{"btc": 97000}', "--url", url, "--token", "writer")
            assert done.returncode == 0, done.stderr
            ack = json.loads(done.stdout)
            assert ack["status"] == "ok" and ack["seqNo"] == 1
            done = _client_command("pub", "news", "--url", url, stdin='hello world\n\n[1, 2]\n')
            assert done.returncode == 0, done.stderr
            assert [json.loads(line)["seqNo"] for line in done.stdout.splitlines()] == [1, 2]  # the empty line is skipped
            got = [_next_json(sub_lines) for _ in range(3)]
            assert got[0]["topic"] == "prices" and got[0]["data"] == {"btc": 97000} and got[0]["messageId"] == ack["messageId"]
            assert [(m["topic"], m["seqNo"], m["data"]) for m in got[1:]] == [("news", 1, "hello world"), ("news", 2, [1, 2])]
            refused = _client_command("pub", "bad topic", "x", "--url", url)
            assert refused.returncode == 1 and "INVALID_TOPIC" in refused.stderr, refused.stderr
            again = _client_command("pub", "prices", "1", "--url", url, "--message-id", ack["messageId"], "--token", "writer")
            assert json.loads(again.stdout) == {**ack, "status": "duplicate"}


def _subscribers(port: int) -> int:
    try:
        response = http_request(f"http://127.0.0.1:{port}/stats")
    except OSError:
        return -1  # not listening (yet)
    return json.loads(response.body)["subscriptions"] if response.status == 200 else -1


@pytest.mark.slow  # Python subprocesses, a server restart
def test_sub_survives_a_server_restart():
    """`sub` goes on after its server is killed and started again on the same port: it reconnects by
    itself, says on stderr that the topic's epoch changed, and prints the new epoch's messages."""
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws"
    with cli("--port", str(port), "--log-level", "WARNING") as (server, lines):
        read_banner(lines)
        with cli("sub", "t", "--url", url) as (sub, sub_lines):
            wait_until(lambda: _subscribers(port) == 1, timeout=10)
            assert _client_command("pub", "t", "before", "--url", url).returncode == 0
            first = _next_json(sub_lines)
            assert (first["seqNo"], first["data"]) == (1, "before")
            server.kill()
            server.wait(10)
            with cli("--port", str(port), "--log-level", "WARNING") as (server2, lines2):
                read_banner(lines2)
                wait_until(lambda: _subscribers(port) == 1, timeout=20)  # it came back and subscribed again
                assert _client_command("pub", "t", "after", "--url", url).returncode == 0
                second = _next_json(sub_lines, timeout=20)
                assert (second["seqNo"], second["data"]) == (1, "after") and second["epoch"] != first["epoch"]
            assert sub.poll() is None  # still running
    assert any("epoch" in line and "missed" in line for line in sub.stderr_lines), sub.stderr_lines


@pytest.mark.slow  # a Python subprocess
def test_sub_says_why_it_cannot_connect():
    """`sub` against a port nothing listens on exits 1 with the URL and the reason, without a traceback."""
    done = _client_command("sub", "t", "--url", f"ws://127.0.0.1:{free_port()}/ws")
    assert done.returncode == 1 and ("Connect call failed" in done.stderr or "refused" in done.stderr.lower()), done.stderr
    assert "Traceback" not in done.stderr
