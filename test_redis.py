"""Section 13's Redis backbone against real redis-server processes, and the parts of it that need none.

Most tests here start their own redis-server (conftest.py; skipped, saying why, where the
machine has none) and one or two gateways on it: in-process `ms.Server`s built by conftest's
server_factory with make_backbone("redis", ...), or subprocesses from RUNNER where a gateway has
to die (`kill -9`) or `--workers` starts them. Clients are raw sockets (conftest.RawClient), so a
test can compare the exact bytes a subscriber got live with the bytes a replay sends.

What is covered: the broker-level essentials on Redis (subscribed position and epoch, ack before
the publisher's own message, duplicates, replay, resume, presence; rediss:// over TLS with a verified certificate); two gateways on one Redis
(one seqNo sequence per topic in the same order everywhere, dedup, replay and resume on the other
process, take-over with 4002, presence, signatures); Redis killed, stalled and restarted empty;
`CLIENT KILL TYPE pubsub`, a subscriber link dropped for its output buffer, `SCRIPT FLUSH`; a
gateway killed with -9; `--workers 2`. Tests over about a second are marked `slow`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Iterator

import pytest

import conftest
import microsocket as ms
from conftest import HERE, RawClient, free_port, http_request, wait_until
from conftest import RespClient, redis_server, redis_server_binary, start_redis  # noqa: F401 (fixture)

from microsocket import RedisBackbone, RedisLink, parse_redis_url, run_workers, split_message
from microsocket import _Request, _without_workers

redis = pytest.mark.redis
TIMEOUT = 1.0  # the backbone's request timeout in these tests (the default is 2 s)
LEASE = 3.0  # leases short enough that a dead gateway's presence goes within a test
SIGN_KEY = "k1=" + "s" * 32


# -- helpers


@pytest.fixture
def redis_url(redis_server) -> Iterator[str]:
    """A redis-server of this test's own, as the URL make_backbone("redis", ...) connects to."""
    url = f"redis://{redis_server.host}:{redis_server.port}/0"
    conftest.REDIS_TARGET.update(url=url, timeout=TIMEOUT, lease=LEASE)
    yield url
    conftest.REDIS_TARGET.clear()


@pytest.fixture
def gateway(redis_url, server_factory) -> Callable[..., conftest.ServerHandle]:
    """gateway(**config) -> an in-process server on this test's Redis; call it twice for two processes."""
    return lambda **config: server_factory(backbone="redis", **config)


@pytest.fixture
def backbone(request) -> str:
    """The backbone kind of a test parametrized over "memory" and "redis" (this test's Redis then)."""
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    return request.param


class RedisProcess:
    """A redis-server on a fixed port that a test can kill, stop and start again on that port
    (without persistence, so a restart is an empty Redis: what a crash without AOF looks like)."""

    def __init__(self, tmp_dir: str) -> None:
        self.tmp_dir = tmp_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.tmp_dir, "--logfile", os.path.join(self.tmp_dir, "redis.log")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, "redis-server to answer PING")

    def answers(self) -> bool:
        try:
            with RespClient("127.0.0.1", self.port, timeout=0.5) as client:
                return client.call("PING") == "PONG"
        except OSError:
            return False

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.kill()


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisProcess]:
    """A RedisProcess (killable, restartable on its port), and make_backbone("redis") pointed at it."""
    if redis_server_binary() is None:
        pytest.skip("redis-server not found ($REDIS_SERVER, PATH, /usr/bin): apt-get install redis-server")
    process = RedisProcess(str(tmp_path))
    process.start()
    conftest.REDIS_TARGET.update(url=f"redis://127.0.0.1:{process.port}/0", timeout=TIMEOUT, lease=LEASE)
    try:
        yield process
    finally:
        conftest.REDIS_TARGET.clear()
        process.stop()


class Conn(RawClient):
    """A set-up WebSocket connection over a raw socket: replies and messages as dicts, or frames as bytes."""

    def __init__(self, port: int, token: str | None = "alice", topics: list[str] | None = None, timeout: float = 5) -> None:
        super().__init__(port, timeout=timeout)
        self.handshake()
        self.ready: dict | None = None
        self.subscribed: dict[str, dict] = {}
        if token is not None:
            fields: dict = {"type": "setup", "token": token}
            if topics is not None:
                fields["topics"] = topics
            self.ready = self.ask(fields)
            assert self.ready["type"] == "ready", self.ready
            for _ in topics or ():
                reply = self.recv_json()
                assert reply["type"] == "subscribed", reply
                self.subscribed[reply["topic"]] = reply

    def ask(self, msg: dict) -> dict:
        """Send one message; return the next one received."""
        self.send_json(msg)
        return self.recv_json()

    def messages(self, n: int) -> list[dict]:
        """The next n `message`s (anything else in between is skipped)."""
        out = []
        while len(out) < n:
            msg = self.recv_json()
            if msg["type"] == "message":
                out.append(msg)
        return out

    def bye(self) -> None:
        """Close with a closing handshake (1000), so the server trusts what it had handed over."""
        self.send(conftest.masked(ms.Opcode.CLOSE, ms.serialize_close(1000), mask=os.urandom(4)))
        assert self.recv_close() == 1000
        self.close()

    def until(self, kind: str) -> list[dict]:
        """Everything received up to and including the next message of type `kind`."""
        out = []
        while not out or out[-1]["type"] != kind:
            out.append(self.recv_json())
        return out


def seqs(messages: list[dict]) -> list[int]:
    return [m["seqNo"] for m in messages if m["type"] == "message"]


def redis_client(url: str) -> RespClient:
    target = parse_redis_url(url)
    return RespClient(target.host, target.port)


def backbone_of(handle: conftest.ServerHandle) -> RedisBackbone:
    return handle.server.backbone


# The gateway as a subprocess: `python3 RUNNER --port P --redis URL [--sign-key K]`. It prints its
# ws:// URL when it listens; SIGTERM closes every connection (1001) and exits 0. With
# MICROSOCKET_REUSE_PORT=1 (what run_workers sets) it listens with SO_REUSEPORT (Config.reuse_port).
RUNNER = r'''
import argparse, asyncio, os, signal, sys
sys.path.insert(0, {here!r})
import microsocket as ms
RedisBackbone = ms.RedisBackbone

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--redis", required=True)
parser.add_argument("--lease", type=float, default=15.0)
parser.add_argument("--sign-key", dest="sign_keys", action="append", default=[])
args = parser.parse_args()

async def main():
    loop = asyncio.get_running_loop()
    reuse_port = os.environ.get("MICROSOCKET_REUSE_PORT") == "1"  # what run_workers sets in each worker
    config = ms.Config(host="127.0.0.1", port=args.port, sign_keys=tuple(args.sign_keys), reuse_port=reuse_port)
    backbone = RedisBackbone(config, url=args.redis, timeout=1.0, lease=args.lease)
    await backbone.start()
    server = ms.Server(config, backbone=backbone)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    print(f"ws://127.0.0.1:{{server.port}}/ws worker={{os.environ.get('MICROSOCKET_WORKER', '-')}} process={{backbone.process}}", flush=True)
    await stop.wait()
    await server.close(grace=1.0)
    await backbone.close()

asyncio.run(main())
'''


@pytest.fixture
def runner(tmp_path) -> str:
    """The path of RUNNER, written for this test."""
    path = tmp_path / "gateway.py"
    path.write_text(RUNNER.format(here=HERE))
    return str(path)


@contextlib.contextmanager
def subprocess_gateway(runner: str, url: str, *args: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """A gateway in its own process on `url`; (process, port) once it listens; killed at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-u", runner, "--port", str(port), "--redis", url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("ws://"), (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


# === Without Redis: the URL, the link, the frames, the workers' command line =========================


def test_parse_redis_url():
    """The URL forms of --redis: host, port and database, user and password percent-decoded, rediss for TLS; others refused."""
    assert parse_redis_url("redis://localhost") == ("localhost", 6379, 0, None, None, False)
    assert parse_redis_url("redis://10.0.0.1:7000/3") == ("10.0.0.1", 7000, 3, None, None, False)
    assert parse_redis_url("redis://:p%40ss@h:1/0") == ("h", 1, 0, None, "p@ss", False)
    assert parse_redis_url("rediss://app:secret@h:6380/2") == ("h", 6380, 2, "app", "secret", True)
    assert "secret" not in str(parse_redis_url("redis://app:secret@h:1/0"))
    for bad, words in [("http://h:1", "redis:// or rediss://"), ("redis://h:1/x", "database"), ("redis://h:99999", "port")]:
        with pytest.raises(ValueError, match=words):
            parse_redis_url(bad)


class _Owner:
    """What a RedisLink reports to, recording it."""

    def __init__(self) -> None:
        self.completed: list = []
        self.dropped = 0

    def complete(self, link, request, reply) -> None:
        self.completed.append((request.command, reply))

    def drop(self, link) -> None:
        self.dropped += 1
        link.close()

    def lost(self, link, exc) -> None:
        pass


class _Transport:
    def __init__(self) -> None:
        self.written = b""
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        self.aborted = True


def _link(unasked=None) -> tuple[RedisLink, _Owner, _Transport, list]:
    owner, transport, later = _Owner(), _Transport(), []
    link = RedisLink(owner, "command", later.append, unasked)
    link.connection_made(transport)
    return link, owner, transport, later


def test_link_pipelines_writes_and_matches_replies_in_order():
    """Requests of one turn go out in one write; replies, cut anywhere (here a byte at a time), go
    to the requests in the order they were sent (Redis answers a pipeline in order)."""
    from microsocket import encode_command, encode_reply

    link, owner, transport, later = _link()
    for n in range(3):
        link.request(_Request(("INCR", f"k{n}"), None, lambda r: r, 0.0))
    assert transport.written == b"" and len(later) == 1  # one flush, later in the turn
    later.pop()()
    assert transport.written == b"".join(encode_command("INCR", f"k{n}") for n in range(3))
    replies = encode_reply(1) + encode_reply(b"two") + encode_reply([b"a", None])
    for i in range(len(replies)):
        link.data_received(replies[i : i + 1])
    assert owner.completed == [(("INCR", "k0"), 1), (("INCR", "k1"), b"two"), (("INCR", "k2"), [b"a", None])]


def test_link_hands_unasked_replies_over_and_drops_on_garbage():
    """With no request waiting, a reply is a pub/sub message (to `unasked`); on a command link it
    is a protocol error, and malformed bytes drop the link too (no reply could be matched after)."""
    from microsocket import encode_reply

    pushes: list = []
    link, owner, _, _ = _link(pushes.append)
    link.data_received(encode_reply([b"message", b"ch", b"e:1:{}"]))
    assert pushes == [[b"message", b"ch", b"e:1:{}"]] and owner.dropped == 0
    command, owner, transport, _ = _link()
    command.data_received(b":1\r\n")
    assert owner.dropped == 1 and transport.aborted
    garbage, owner, _, _ = _link(pushes.append)
    garbage.data_received(b"?what\r\n")
    assert owner.dropped == 1


@pytest.mark.parametrize("signed, topic, message_id, data", [
    (False, "t", "m1", b'{"a":1}'),
    (True, "t", "m1", b'{"a":1}'),
    (False, "é:{x}/ü", 'q"uo\\te', b'"caf\xc3\xa9"'),
    (True, "é:{x}/ü", 'q"uo\\te', b'"caf\xc3\xa9"'),
    (False, "\ud800lone", "id😀\udfff", b"[1,2,3]"),  # lone surrogates: not I-JSON, so never signed
])
def test_frame_equals_message_frame_byte_for_byte(signed, topic, message_id, data):
    """A message rebuilt from the script's text (head + seq + tail) is the frame section 7's
    message_frame makes, signature included: live and replayed bytes are one and the same."""
    config = ms.Config(sign_keys=(SIGN_KEY,) if signed else ())
    backbone = RedisBackbone(config)
    head = ms.utf8(f'{{"type":"message","topic":{ms._quote(topic)},"seqNo":')
    tail = ms.utf8(f',"messageId":{ms._quote(message_id)},"data":') + data + b"}"
    signing = ms.SigningKeys.parse(config.sign_keys) if signed else None
    for seq in (1, 12345678901234):
        expected = ms.message_frame(topic, seq, message_id, data, ms.sign_canonical(signing, topic, seq, message_id, data) if signed else None)
        assert backbone._frame(topic, seq, head + str(seq).encode() + tail) == expected
        assert split_message(head + str(seq).encode() + tail) == (seq, message_id, data)


def test_workers_command_line_and_refusals(capsys):
    """--workers is taken out of the workers' command line; without --redis, or with port 0,
    run_workers refuses with exit 2 and says why."""
    assert _without_workers(["--port", "9", "--workers", "4", "--redis", "r", "--workers=2"]) == ["--port", "9", "--redis", "r"]
    assert run_workers(ms.Config(port=3000), ["--workers", "2"], workers=2, redis_url=None) == 2
    assert "--workers needs --redis" in capsys.readouterr().err
    assert run_workers(ms.Config(port=0), [], workers=2, redis_url="redis://h") == 2
    assert "fixed --port" in capsys.readouterr().err


# === One gateway on Redis: the broker-level essentials =============================================


@redis
def test_essentials_on_one_gateway(gateway, redis_url):
    """subscribed names Redis's position and epoch; the ack comes before the publisher's own copy;
    a duplicate takes no seqNo and is not delivered; a late subscriber's seqNo is the latest;
    replay resends the retained messages and refuses another epoch; ready.epoch is Redis's."""
    server = gateway()
    a = Conn(server.port, "alice", topics=["t"])
    epoch = a.subscribed["t"]["epoch"]
    assert a.subscribed["t"]["seqNo"] == 0 and epoch
    with redis_client(redis_url) as r:
        assert a.ready["epoch"] == r.call("GET", "ms:epoch").decode()
    a.send_json({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"n": 1}})
    assert [(m["type"], m["seqNo"]) for m in (a.recv_json(), a.recv_json())] == [("ack", 1), ("message", 1)]
    assert a.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"n": 1}}) == {
        "type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}
    a.send_json({"type": "publish", "topic": "t", "messageId": "m2", "payload": {"n": 2}})
    assert [(m["type"], m["seqNo"]) for m in (a.recv_json(), a.recv_json())] == [("ack", 2), ("message", 2)]
    b = Conn(server.port, "bob")
    assert b.ask({"type": "subscribe", "topic": "t"}) == {"type": "subscribed", "topic": "t", "seqNo": 2, "epoch": epoch}
    b.send_json({"type": "replay", "topic": "t", "fromSeq": 1})
    got = b.until("replayed")
    assert seqs(got) == [1, 2] and got[-1] == {"type": "replayed", "topic": "t", "fromSeq": 1, "toSeq": 2, "epoch": epoch}
    wrong = b.ask({"type": "replay", "topic": "t", "fromSeq": 1, "epoch": "another"})
    assert wrong["code"] == "REPLAY_UNAVAILABLE" and wrong["epoch"] == epoch
    assert b.ask({"type": "presence", "topic": "t"}) == {"type": "presence", "topic": "t", "users": ["alice", "bob"], "count": 2}
    assert server.stats()["sessions"] == 2 and server.stats()["sequenced_topics"] == 1


@redis
def test_resume_on_one_gateway_replays_the_gap(gateway):
    """A client that went away resumes its session: what was published after its last ack is
    replayed, then `resumed`; live messages follow."""
    server = gateway()
    a = Conn(server.port, "alice", topics=["t"])
    server.publish("t", {"n": 1})
    assert seqs(a.messages(1)) == [1]
    a.send_json({"type": "ack", "topic": "t", "seqNo": 1})
    session = a.ready["sessionId"]
    a.bye()
    wait_until(lambda: server.stats()["connections"] == 0, what="the connection to go")
    for n in (2, 3):
        server.publish("t", {"n": n})
    b = Conn(server.port, "alice")
    b.send_json({"type": "resume", "sessionId": session})
    got = b.until("resumed")
    assert seqs(got) == [2, 3] and got[-1]["replayed"] == 2 and got[-1]["missed"] == []
    server.publish("t", {"n": 4})
    assert seqs(b.messages(1)) == [4]


@pytest.mark.parametrize("backbone", ["memory", pytest.param("redis", marks=redis)], indirect=True)
def test_resume_after_a_clean_close_starts_after_what_was_handed(backbone, server_factory):
    """SPEC I6: without lastSeqPerTopic or an ack, a resume replays after the last seqNo handed to
    the old connection, when it ended with a closing handshake (on either backbone)."""
    server = server_factory(backbone=backbone)
    a = Conn(server.port, "alice", topics=["t"])
    server.publish("t", {"n": 1})
    assert seqs(a.messages(1)) == [1]
    a.bye()
    wait_until(lambda: server.stats()["connections"] == 0, what="the connection to go")
    server.publish("t", {"n": 2})
    b = Conn(server.port, "alice")
    b.send_json({"type": "resume", "sessionId": a.ready["sessionId"]})
    assert seqs(b.until("resumed")) == [2]


@redis
def test_backbone_unavailable_before_start_and_for_a_bad_password(redis_url):
    """An unstarted backbone answers BACKBONE_UNAVAILABLE at once; start() with a wrong password
    fails with a ConnectionError that says AUTH failed (and never shows the password)."""
    config = ms.Config()
    answers: list = []
    RedisBackbone(config, url=redis_url).publish("u", "t", "m", b"1", 0.0, answers.append)
    assert answers[0].code == "BACKBONE_UNAVAILABLE"
    target = parse_redis_url(redis_url)
    with RespClient(target.host, target.port) as r:
        assert r.call("CONFIG", "SET", "requirepass", "right-one") == "OK"

    async def start(url: str) -> RedisBackbone:
        backbone = RedisBackbone(config, url=url, timeout=TIMEOUT)
        await backbone.start()
        return backbone

    with pytest.raises(ConnectionError, match="AUTH failed") as refused:
        conftest.run(start(f"redis://:wrong-one@{target.host}:{target.port}/0"))
    assert "wrong-one" not in str(refused.value)

    async def works() -> str:
        backbone = await start(f"redis://:right-one@{target.host}:{target.port}/1")
        try:
            return backbone.epoch
        finally:
            await backbone.close()

    assert conftest.run(works())


@redis
def test_rediss_tls_end_to_end(tmp_path, monkeypatch, server_factory):
    """rediss://: a gateway on a redis-server that speaks only TLS (--port 0 --tls-port P, a
    self-signed certificate for 127.0.0.1 made by openssl) sets up, subscribes and publishes
    (ack seqNo 1, the message delivered).

    How the CA is trusted: RedisBackbone._open uses ssl.create_default_context() (verification on,
    hostname checked against the URL's host) and offers no parameter or variable for a private CA.
    So the test sets SSL_CERT_FILE to the test certificate, which OpenSSL's default verify paths
    (load_default_certs) honour; without it, start() is first shown to refuse the certificate."""
    binary, openssl = redis_server_binary(), shutil.which("openssl")
    if binary is None:
        pytest.skip("redis-server not found ($REDIS_SERVER, PATH, /usr/bin): apt-get install redis-server")
    if openssl is None:
        pytest.skip("the rediss:// test needs the openssl command line to make a certificate")
    cert, key = tmp_path / "redis-cert.pem", tmp_path / "redis-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    port, log_path = free_port(), tmp_path / "redis-tls.log"
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--tls-cert-file", str(cert),
         "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--daemonize", "no", "--dir", str(tmp_path), "--logfile", str(log_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    trusting = ssl.create_default_context(cafile=str(cert))

    def answers() -> bool:
        if proc.poll() is not None:
            return True  # exited: reported below
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw:
                with trusting.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                    return sock.recv(64).startswith(b"+PONG\r\n")
        except OSError:
            return False

    try:
        wait_until(answers, conftest.REDIS_START_TIMEOUT, "redis-server to answer PING over TLS")
        if proc.poll() is not None:
            said = proc.stdout.read() + (log_path.read_text(errors="replace") if log_path.exists() else "")
            if re.search(r"(?i)tls.*(not supported|not compiled|missing implement)|bad directive.*tls|(not supported|missing implement).*tls", said):
                pytest.skip(f"this redis-server was built without TLS: {said.strip()[-200:]}")
            raise AssertionError(f"redis-server with TLS exited with {proc.returncode}:\n{said}")
        url = f"rediss://127.0.0.1:{port}/0"
        conftest.REDIS_TARGET.update(url=url, timeout=TIMEOUT, lease=LEASE)

        monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system store only: the test CA is not in it
        with pytest.raises(ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            conftest.run(RedisBackbone(ms.Config(), url=url, timeout=TIMEOUT).start())

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read when the backbone makes its context
        server = server_factory(backbone="redis")
        a = Conn(server.port, "alice", topics=["t"])
        assert a.subscribed["t"]["seqNo"] == 0 and a.ready["epoch"]
        a.send_json({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"n": 1}})
        ack, message = a.recv_json(), a.recv_json()
        assert (ack["type"], ack["status"], ack["seqNo"]) == ("ack", "ok", 1), ack
        assert (message["type"], message["topic"], message["seqNo"], message.get("data")) == ("message", "t", 1, {"n": 1}), message
        assert backbone_of(server).target.tls and backbone_of(server).healthy()
        a.bye()
        server.close()  # before redis-server stops, so the backbone's close is answered
    finally:
        conftest.REDIS_TARGET.clear()
        conftest._stop(proc)  # SIGTERM to its PID, SIGKILL after REDIS_STOP_TIMEOUT
        proc.stdout.close()


# === Two gateways on one Redis ======================================================================


@redis
def test_concurrent_publishers_on_two_gateways_make_one_sequence(gateway):
    """Two publishers on each of two gateways publish at once: the acks' seqNos are 1..N with none
    twice, and every subscriber (two on each gateway) receives 1..N in the same messageId order."""
    a, b = gateway(), gateway()
    subscribers = [Conn(server.port, f"sub{i}", topics=["t"]) for i, server in enumerate((a, a, b, b))]
    per_publisher, publishers = 150, [(a, "p0"), (a, "p1"), (b, "p2"), (b, "p3")]
    acks: dict[str, list[int]] = {}

    def publish(server: conftest.ServerHandle, user: str) -> None:
        with Conn(server.port, user) as c:
            for i in range(per_publisher):
                c.send_json({"type": "publish", "topic": "t", "messageId": f"{user}-{i}", "payload": i})
            acks[user] = [c.recv_json()["seqNo"] for _ in range(per_publisher)]

    threads = [threading.Thread(target=publish, args=p) for p in publishers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    total = per_publisher * len(publishers)
    assert sorted(s for got in acks.values() for s in got) == list(range(1, total + 1))
    for user, got in acks.items():
        assert got == sorted(got), user  # one connection's publishes keep their order
    orders = []
    for sub in subscribers:
        got = sub.messages(total)
        assert seqs(got) == list(range(1, total + 1))
        orders.append([m["messageId"] for m in got])
    assert all(order == orders[0] for order in orders)


@redis
def test_dedup_across_gateways(gateway):
    """The same user's messageId published on one gateway is a duplicate on the other (the
    original seqNo, not delivered); another user's same messageId is a new message."""
    a, b = gateway(), gateway()
    sub = Conn(b.port, "watcher", topics=["t"])
    on_a = Conn(a.port, "alice")
    assert on_a.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 1})["status"] == "ok"
    on_b = Conn(b.port, "alice")
    assert on_b.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 1}) == {
        "type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}
    bob = Conn(b.port, "bob")
    assert bob.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 2})["seqNo"] == 2
    assert [(m["seqNo"], m["data"]) for m in sub.messages(2)] == [(1, 1), (2, 2)]


@redis
def test_subscribe_replay_and_resume_on_the_other_gateway(gateway):
    """A session set up on one gateway resumes on the other with the gap replayed; a replay on the
    other gateway sends the very bytes the first one delivered live."""
    a, b = gateway(), gateway()
    first = Conn(a.port, "alice", topics=["t"])
    for n in (1, 2):
        b.publish("t", {"n": n})
    live = [first.recv_frame().payload for _ in range(2)]
    first.send_json({"type": "ack", "topic": "t", "seqNo": 2})
    session = first.ready["sessionId"]
    first.bye()
    wait_until(lambda: a.stats()["connections"] == 0, what="the connection to go")
    for n in (3, 4):
        a.publish("t", {"n": n})
    second = Conn(b.port, "alice")
    assert second.ask({"type": "subscribe", "topic": "t"})["seqNo"] == 4
    second.send_json({"type": "replay", "topic": "t", "fromSeq": 1, "id": 7})
    replayed = [second.recv_frame().payload for _ in range(4)]
    assert replayed[:2] == live
    assert second.recv_json()["type"] == "replayed"
    third = Conn(b.port, "alice")
    third.send_json({"type": "resume", "sessionId": session})
    got = third.until("resumed")
    assert seqs(got) == [3, 4] and got[-1]["sessionId"] == session and got[-1]["topics"] == ["t"]
    a.publish("t", {"n": 5})
    assert seqs(third.messages(1)) == [5]


@redis
def test_takeover_across_gateways_closes_the_old_connection_with_4002(gateway):
    """A resume on another gateway takes the session over: the connection holding it on the first
    gateway is closed with 4002, and the resume starts after what the old one was handed."""
    a, b = gateway(), gateway()
    old = Conn(a.port, "alice", topics=["t"])
    for n in (1, 2, 3):
        b.publish("t", {"n": n})
    assert seqs(old.messages(3)) == [1, 2, 3]
    new = Conn(b.port, "alice")
    started = time.monotonic()
    new.send_json({"type": "resume", "sessionId": old.ready["sessionId"]})
    assert old.recv_close() == 4002
    got = new.until("resumed")
    assert time.monotonic() - started < TIMEOUT  # released at once, not waited out
    assert seqs(got) == [] and got[-1]["topics"] == ["t"] and got[-1]["missed"] == []
    b.publish("t", {"n": 4})
    assert seqs(new.messages(1)) == [4]


@redis
def test_takeover_on_the_same_gateway_through_redis(gateway):
    """A resume on the gateway that holds the session closes the old connection with 4002 too."""
    server = gateway()
    old = Conn(server.port, "alice", topics=["t"])
    new = Conn(server.port, "alice")
    new.send_json({"type": "resume", "sessionId": old.ready["sessionId"]})
    assert old.recv_close() == 4002
    assert new.until("resumed")[-1]["topics"] == ["t"]


@redis
def test_presence_across_gateways(gateway):
    """presence on either gateway lists the users subscribed on both, each once, sorted; a user
    whose last connection left is gone from it."""
    a, b = gateway(), gateway()
    kept = [Conn(a.port, "carol", topics=["t"]), Conn(a.port, "alice", topics=["t"]), Conn(b.port, "alice", topics=["t"])]
    bob = Conn(b.port, "bob", topics=["t"])
    for server in (a, b):
        with Conn(server.port, "reader") as reader:
            assert reader.ask({"type": "presence", "topic": "t"}) == {
                "type": "presence", "topic": "t", "users": ["alice", "bob", "carol"], "count": 3}
    bob.bye()
    wait_until(lambda: b.stats()["connections"] == 1, what="bob's connection to go")
    with Conn(a.port, "reader") as reader:
        assert reader.ask({"type": "presence", "topic": "t"})["users"] == ["alice", "carol"]
    assert len(kept) == 3  # (kept open until here)


@redis
def test_signed_messages_are_the_same_bytes_on_every_gateway(gateway):
    """With one signing key on both gateways, a message published on one arrives signed on the
    other, verifiable, and a replay on either sends the same bytes as the live delivery."""
    a, b = gateway(sign_keys=(SIGN_KEY,)), gateway(sign_keys=(SIGN_KEY,))
    sub = Conn(a.port, "alice", topics=["t"])
    b.publish("t", {"price": 1.5, "é": [1, 2]}, message_id="m-1")
    live = sub.recv_frame().payload
    msg = json.loads(live)
    keys = ms.SigningKeys.parse((SIGN_KEY,))
    assert msg["kid"] == "k1" and keys.verify(msg["kid"], msg["sig"], "t", 1, "m-1", msg["data"])
    for server in (a, b):
        with Conn(server.port, "bob") as reader:
            reader.send_json({"type": "replay", "topic": "t", "fromSeq": 1})
            assert reader.recv_frame().payload == live


# === Redis failing ==================================================================================


def _publish_timed(conn: Conn, message_id: str) -> tuple[dict, float]:
    started = time.monotonic()
    reply = conn.ask({"type": "publish", "topic": "t", "messageId": message_id, "payload": message_id})
    return reply, time.monotonic() - started


@redis
@pytest.mark.slow
def test_redis_killed_then_restarted_empty(own_redis, server_factory):
    """Redis killed (-9): a publish gets BACKBONE_UNAVAILABLE within the timeout and the
    connections stay open; Redis back, empty (no persistence): the gateway reconnects by itself,
    subscribers get `subscribed` with the topic's new epoch, and seqNos start again at 1 in it."""
    server = server_factory(backbone="redis")
    sub = Conn(server.port, "alice", topics=["t"])
    old_epoch = sub.subscribed["t"]["epoch"]
    pub = Conn(server.port, "bob")
    assert pub.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 1})["seqNo"] == 1
    assert seqs(sub.messages(1)) == [1]
    own_redis.kill()
    reply, took = _publish_timed(pub, "m2")
    assert reply["code"] == "BACKBONE_UNAVAILABLE" and took < TIMEOUT + 0.5, (reply, took)
    assert pub.ask({"type": "ping"}) == {"type": "pong"}
    assert http_request(server.url("/stats")).json()["connections"] == 2
    assert not backbone_of(server).healthy()  # what /healthz will tell a load balancer
    own_redis.start()
    notice = sub.recv_json()  # the catch-up after the reconnect passes the new epoch on
    assert notice["type"] == "subscribed" and notice["seqNo"] == 0 and notice["epoch"] != old_epoch
    wait_until(lambda: backbone_of(server).healthy(), what="both links back")
    assert pub.ask({"type": "publish", "topic": "t", "messageId": "m2", "payload": 2})["seqNo"] == 1
    assert [(m["seqNo"], m["data"]) for m in sub.messages(1)] == [(1, 2)]
    stale = pub.ask({"type": "replay", "topic": "t", "fromSeq": 1, "epoch": old_epoch})
    assert stale["code"] == "REPLAY_UNAVAILABLE" and stale["epoch"] == notice["epoch"]
    assert Conn(server.port, "carol").ready["epoch"] != sub.ready["epoch"]  # the deployment's epoch changed too
    resumed = Conn(server.port, "alice").ask({"type": "resume", "sessionId": sub.ready["sessionId"], "epoch": sub.ready["epoch"]})
    assert resumed["code"] == "SESSION_EXPIRED"


@redis
@pytest.mark.slow
def test_redis_stalled_then_resumed(own_redis, server_factory):
    """Redis stopped (SIGSTOP): a publish gets BACKBONE_UNAVAILABLE within the timeout; its retry
    with the same messageId once Redis runs again (SIGCONT) is accepted once (ok, or duplicate if
    the first did run), and the subscriber receives every accepted message once, in order."""
    server = server_factory(backbone="redis")
    sub = Conn(server.port, "alice", topics=["t"])
    pub = Conn(server.port, "bob")
    assert pub.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 1})["seqNo"] == 1
    own_redis.signal(signal.SIGSTOP)
    try:
        reply, took = _publish_timed(pub, "m2")
        assert reply["code"] == "BACKBONE_UNAVAILABLE" and took < TIMEOUT + 0.5, (reply, took)
    finally:
        own_redis.signal(signal.SIGCONT)
    deadline = time.monotonic() + 15
    while True:
        retry = pub.ask({"type": "publish", "topic": "t", "messageId": "m2", "payload": 2})
        if retry["type"] == "ack" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert retry["type"] == "ack" and retry["seqNo"] == 2, retry
    assert pub.ask({"type": "publish", "topic": "t", "messageId": "m3", "payload": 3})["seqNo"] == 3
    got = sub.messages(3)
    assert [(m["seqNo"], m["messageId"]) for m in got] == [(1, "m1"), (2, "m2"), (3, "m3")]


@redis
def test_client_kill_pubsub_loses_nothing(gateway, redis_url):
    """CLIENT KILL TYPE pubsub in the middle of a stream of publishes: the gateway reconnects,
    and what was published while it was not subscribed is filled from history, in order, once."""
    a, b = gateway(), gateway()
    sub = Conn(a.port, "alice", topics=["t"])
    pub = Conn(b.port, "bob")
    total = 300
    with redis_client(redis_url) as r:
        for i in range(total):
            pub.send_json({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i})
            if i == 100:
                assert r.call("CLIENT", "KILL", "TYPE", "pubsub") >= 2  # both gateways' links
            if i % 20 == 0:
                time.sleep(0.01)
    assert [pub.recv_json()["seqNo"] for _ in range(total)] == list(range(1, total + 1))
    got = sub.messages(total)
    assert [m["data"] for m in got] == list(range(total))
    wait_until(lambda: backbone_of(a).reconnects >= 1, what="the subscriber link to be back")


@redis
def test_subscriber_link_dropped_for_its_output_buffer_loses_nothing(gateway, redis_url):
    """Redis drops a subscriber connection whose output buffer passes client-output-buffer-limit
    (here every large message does): the messages arrive all the same, from history, in order."""
    server = gateway(max_message_size=1 << 20)
    sub = Conn(server.port, "alice", topics=["t"], timeout=15)
    with redis_client(redis_url) as r:
        assert r.call("CONFIG", "SET", "client-output-buffer-limit", "pubsub 16kb 0 0") == "OK"
    pub = Conn(server.port, "bob")
    pad = "x" * (32 << 10)
    for i in range(20):
        pub.send_json({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": [i, pad]})
    assert [pub.recv_json()["seqNo"] for _ in range(20)] == list(range(1, 21))
    got = sub.messages(20)
    assert [m["data"][0] for m in got] == list(range(20))
    assert backbone_of(server).reconnects >= 1  # the links Redis dropped came back


@redis
@pytest.mark.slow
def test_silent_subscriber_link_is_probed_and_replaced(gateway, redis_url):
    """A subscriber connection that stays open but answers nothing (CLIENT PAUSE ... ALL: Redis
    reads nothing) is found by its PING probe and replaced; deliveries go on afterwards."""
    server = gateway()
    sub = Conn(server.port, "alice", topics=["t"])
    backbone = backbone_of(server)
    silent = server.call(lambda: backbone._sub)
    with redis_client(redis_url) as r:
        assert r.call("CLIENT", "PAUSE", "4000", "ALL") == "OK"  # past a probe (after 1 s of silence) and its timeout
    wait_until(lambda: server.call(lambda: backbone._sub is not None and backbone._sub is not silent), 15,
               "the silent subscriber link to be replaced")
    server.publish("t", {"n": 1})
    assert seqs(sub.messages(1)) == [1]


@redis
def test_script_flush_falls_back_to_eval(gateway, redis_url):
    """After SCRIPT FLUSH, EVALSHA answers NOSCRIPT and the backbone sends the script itself: the
    next publishes go through, in order, and are delivered."""
    server = gateway()
    sub = Conn(server.port, "alice", topics=["t"])
    pub = Conn(server.port, "bob")
    assert pub.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 1})["seqNo"] == 1
    with redis_client(redis_url) as r:
        assert r.call("SCRIPT", "FLUSH") == "OK"
    for i in (2, 3, 4):
        pub.send_json({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i})
    assert [pub.recv_json()["seqNo"] for _ in range(3)] == [2, 3, 4]
    assert seqs(sub.messages(4)) == [1, 2, 3, 4]


# === Gateways dying, and --workers ==================================================================


@redis
@pytest.mark.slow
def test_gateway_killed_9_sessions_resume_elsewhere_and_presence_expires(redis_url, gateway, runner):
    """A gateway killed with -9: its sessions stay resumable on the other gateway (what it had not
    been told was acknowledged is replayed), and its users leave presence within the lease."""
    other = gateway()
    with subprocess_gateway(runner, redis_url, "--lease", str(LEASE)) as (proc, port):
        doomed = Conn(port, "alice", topics=["t"])
        dave = Conn(port, "dave", topics=["t"])
        other.publish("t", {"n": 1})
        assert seqs(doomed.messages(1)) == [1]
        with Conn(other.port, "reader") as reader:
            assert reader.ask({"type": "presence", "topic": "t"})["users"] == ["alice", "dave"]
        proc.kill()
        proc.wait(10)
        dave.close()
    killed = time.monotonic()
    other.publish("t", {"n": 2})
    new = Conn(other.port, "alice")
    new.send_json({"type": "resume", "sessionId": doomed.ready["sessionId"]})
    got = new.until("resumed")
    # Its last positions died with it (nothing acked, nothing handed): from where it subscribed.
    assert seqs(got) == [1, 2] and got[-1]["topics"] == ["t"]
    with Conn(other.port, "reader") as reader:
        while reader.ask({"type": "presence", "topic": "t"})["users"] != ["alice"]:
            assert time.monotonic() < killed + LEASE + 2, "the dead gateway's presence did not expire"
            time.sleep(0.1)
    with redis_client(redis_url) as r:  # alice is there through the living gateway only
        assert r.call("ZRANGE", "ms:{t}:presence", 0, -1) == [f"{backbone_of(other).process}:alice".encode()]


@redis
@pytest.mark.slow
def test_workers_share_one_port_and_one_redis(redis_url, runner, tmp_path):
    """run_workers with 2 workers: both listen on one port (SO_REUSEPORT) and register in Redis; a
    message published on any connection reaches subscribers on every worker; a worker killed is
    started again; SIGTERM to the parent closes every connection with 1001 and exits 0."""
    port = free_port()
    errors = open(tmp_path / "workers.err", "w+")  # the workers' logs, shown if they do not come up
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, microsocket as ms\n"
         "from microsocket import run_workers\n"
         f"sys.exit(run_workers(ms.Config(port={port}), sys.argv[1:], workers=2, redis_url={redis_url!r}, script={runner!r}))",
         "--port", str(port), "--redis", redis_url, "--lease", str(LEASE), "--workers", "2"],
        cwd=HERE, stdout=subprocess.PIPE, stderr=errors, text=True, stdin=subprocess.DEVNULL,
    )
    def workers() -> list[int]:
        ps = subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent.pid)], capture_output=True, text=True)
        return [int(pid) for pid in ps.stdout.split()]

    listening: list[str] = []  # the workers' "ws://..." lines (they share the parent's stdout)
    threading.Thread(target=lambda: listening.extend(line for line in parent.stdout if line.startswith("ws://")), daemon=True).start()
    try:
        with redis_client(redis_url) as r:
            try:
                wait_until(lambda: len(listening) == 2, 30, "two workers listening")
            except AssertionError:
                errors.seek(0)
                raise AssertionError(f"two workers did not come up; their stderr:\n{errors.read()[-3000:]}") from None
            assert {line.split()[1] for line in listening} == {"worker=0", "worker=1"}
            assert r.call("ZCARD", "ms:processes") == 2
            assert r.call("CLIENT", "LIST").decode().count("-command") == 2
            subs = [Conn(port, f"s{i}", topics=["t"]) for i in range(8)]
            with Conn(port, "pub") as pub:
                assert pub.ask({"type": "publish", "topic": "t", "messageId": "m1", "payload": 1})["seqNo"] == 1
            for sub in subs:
                assert seqs(sub.messages(1)) == [1]
            first = workers()
            assert len(first) == 2
            os.kill(first[0], signal.SIGKILL)
            wait_until(lambda: len(listening) == 3, 15, "the worker to be started again")
            assert len(workers()) == 2 and first[0] not in workers()
        late = [Conn(port, f"late{i}", topics=["t"]) for i in range(8)]
        parent.send_signal(signal.SIGTERM)
        assert [c.recv_close() for c in late] == [1001] * 8
        assert parent.wait(20) == 0
        assert workers() == []
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        parent.stdout.close()
        errors.close()


@redis
@pytest.mark.slow
def test_workers_do_not_outlive_a_killed_parent(redis_url, runner):
    """The parent of the workers killed with -9 (no chance to stop them): the workers exit too
    (SIGTERM from PR_SET_PDEATHSIG: they close their connections and leave the registry)."""
    port = free_port()
    parent = subprocess.Popen(
        [sys.executable, "-c", "import sys, microsocket as ms\n"
         "from microsocket import run_workers\n"
         f"sys.exit(run_workers(ms.Config(port={port}), sys.argv[1:], workers=2, redis_url={redis_url!r}, script={runner!r}))",
         "--port", str(port), "--redis", redis_url, "--workers", "2"],
        cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    with redis_client(redis_url) as r:
        try:
            wait_until(lambda: r.call("ZCARD", "ms:processes") == 2, 15, "two workers in the registry")
            workers = [int(pid) for pid in subprocess.run(["ps", "-o", "pid=", "--ppid", str(parent.pid)],
                                                           capture_output=True, text=True).stdout.split()]
            assert len(workers) == 2
        finally:
            parent.kill()
            parent.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in workers), 15, "the workers to exit")
        wait_until(lambda: r.call("ZCARD", "ms:processes") == 0, 15, "the workers to leave the registry")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # not our child: reaped by init, this only tidies up if it were
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(state) and not state.startswith("Z")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@redis
def test_stats_and_metrics_say_which_process_answered_and_how_many_are_alive(gateway):
    """With two gateways on one Redis, /stats and /metrics of each name that process (different ids),
    count the processes alive on the Redis (2), say the backbone is up, and never show where Redis is."""
    a, b = gateway(), gateway()
    ids = []
    for server in (a, b):
        stats = http_request(server.url("/stats")).json()["redis"]
        assert "url" not in stats and stats["connected"] is True
        wait_until(lambda: http_request(server.url("/stats")).json()["redis"]["processes"] == 2, what="both processes registered")
        metrics = http_request(server.url("/metrics")).body.decode()
        assert f'microsocket_process_info{{process="{stats["process"]}"}} 1' in metrics
        assert "microsocket_backbone_up 1" in metrics and "microsocket_backbone_processes 2" in metrics
        assert "redis://" not in metrics and "127.0.0.1" not in json.dumps(stats)
        ids.append(stats["process"])
    assert ids[0] != ids[1]


def test_requests_past_the_backlog_limit_fail_at_once(monkeypatch):
    """While Redis cannot be reached, requests wait for it (each until its deadline) in a backlog of
    at most REDIS_MAX_BACKLOG; past it a request fails at once with BACKBONE_UNAVAILABLE instead of
    piling up in memory."""
    monkeypatch.setattr(ms, "REDIS_MAX_BACKLOG", 3)

    async def scenario() -> tuple[list, int]:
        backbone = RedisBackbone(ms.Config(), url="redis://127.0.0.1:1/0", timeout=5.0)
        backbone.loop = asyncio.get_running_loop()  # as if started, with the link down
        answers: list = []
        for k in range(5):
            backbone.publish("u", "t", f"m{k}", b"1", 0.0, answers.append)
        return answers, len(backbone._unsent)

    answers, held = conftest.run(scenario())
    assert held == 3
    assert [a.code for a in answers] == ["BACKBONE_UNAVAILABLE"] * 2
