"""Section 16 of microsocket.py: the asyncio client, `connect` and `Client`.

Two kinds of peer: the real server in-process (server_factory; a subprocess for the restart), for
the protocol and continuity (drops, slow-consumer closes, takeovers, restarts, token expiry, gaps,
signatures); and FakeServer, a scripted WebSocket server on asyncio streams, for what the real
server never does (wrong handshakes, fragmented and invalid frames, silence, epoch notices).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from typing import Any, Awaitable, Callable

import pytest

import microsocket as mc  # the client's names (mc.connect, mc.Message...), beside ms for the server's
import microsocket as ms
from conftest import FakeClock, cli, free_port, http_request, read_banner, recv_json, run, setup, wait_until

FAST = {"reconnect_delay": 0.02, "max_reconnect_delay": 0.1, "close_timeout": 1.0}  # tests reconnect within ms
SECRET = "test-secret-of-at-least-32-bytes!"  # --jwt-secret
SIGN_SECRET = "signing-secret-of-32-bytes-or-more"


async def take(client: mc.Client, n: int, timeout: float = 10) -> list:
    """The next `n` items of the client's iterator."""
    return [await asyncio.wait_for(anext(client), timeout) for _ in range(n)]


async def until(predicate: Callable[[], Any], timeout: float = 10) -> None:
    """Wait, without blocking the loop, until predicate() is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def drop(server: Any, user: str) -> int:
    """Abort the server side of every connection of `user` (TCP gone, no close frame); how many."""

    def abort() -> int:
        conns = [c for c in list(server.server.connections) if c.user_id == user]
        for conn in conns:
            conn.transport.abort()
        return len(conns)

    return server.call(abort)


def jwt(sub: str = "alice", exp: float | None = None) -> str:
    """An HS256 token under SECRET, made with the standard library as the README shows."""
    b64 = lambda raw: base64.urlsafe_b64encode(raw).rstrip(b"=").decode()  # noqa: E731
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": sub, **({"exp": int(exp)} if exp else {})}).encode())
    sig = b64(hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest())
    return f"{head}.{body}.{sig}"


# === the real server =============================================================================


def test_publish_subscribe_ack_and_requests(server_factory):
    """subscribe gives the position, publish the ack (a repeated messageId: duplicate, the original seqNo), the iterator the message; replay, presence, refresh and unsubscribe answer."""
    server = server_factory()

    async def main():
        async with mc.connect(server.ws_url(), "alice", **FAST) as client:
            sub = await client.subscribe("t")
            assert (sub.topic, sub.seq_no) == ("t", 0) and sub.epoch
            ack = await client.publish("t", {"x": 1})
            assert (ack.status, ack.seq_no) == ("ok", 1) and ack.message_id.startswith("c-")
            assert await client.publish("t", {"x": 9}, message_id=ack.message_id) == mc.Ack(ack.message_id, "duplicate", 1)
            assert await take(client, 1) == [mc.Message("t", 1, ack.message_id, {"x": 1}, sub.epoch)]
            assert await client.replay("t", 1) == [mc.Message("t", 1, ack.message_id, {"x": 1}, sub.epoch)]
            assert await client.presence("t") == mc.Presence("t", ["alice"], 1)
            assert await client.refresh("alice") is None  # demo auth: no exp
            await client.unsubscribe("t")
            assert await client.presence("t") == mc.Presence("t", [], 0)
            assert client.user_id == "alice" and client.session_id and client.epoch

    run(main())


def test_error_replies_are_typed(server_factory, tmp_path):
    """An error reply raises MicrosocketError with the server's code, message and context fields; the connection goes on."""
    acl = tmp_path / "acl.json"
    acl.write_text(json.dumps({"alice": {"read": ["t"], "write": ["t"]}}))
    server = server_factory(acl=str(acl), history_messages=2)

    async def main():
        async with mc.connect(server.ws_url(), "alice", **FAST) as client:
            with pytest.raises(mc.MicrosocketError) as denied:
                await client.publish("u", 1, message_id="m-u")
            assert (denied.value.code, denied.value.topic, denied.value.message_id) == ("ACL_DENIED", "u", "m-u")
            with pytest.raises(mc.MicrosocketError) as bad:
                await client.subscribe("bad topic")
            assert bad.value.code == "INVALID_TOPIC" and bad.value.message
            for i in range(5):
                await client.publish("t", i)
            with pytest.raises(mc.MicrosocketError) as gone:
                await client.replay("t", 1)
            assert gone.value.code == "REPLAY_UNAVAILABLE" and gone.value.context["oldestSeq"] == 4
            assert [m.seq_no for m in await client.replay("t", 4)] == [4, 5]
            assert [m.seq_no for m in await client.replay("t", 4, to_seq=4)] == [4]

    run(main())


def test_auth_failure_raised_by_connect(server_factory):
    """A token the server refuses raises AUTH_FAILED from connect itself, with no reconnect loop."""
    server = server_factory(jwt_secret=SECRET)

    async def main():
        with pytest.raises(mc.MicrosocketError) as failed:
            async with mc.connect(server.ws_url(), "not-a-jwt", **FAST):
                pass
        assert failed.value.code == "AUTH_FAILED"

    run(main())
    wait_until(lambda: server.open_connections() == 0, what="the refused connection to close")


def test_tcp_drops_lose_nothing(server_factory):
    """TCP connections killed on either side mid-stream: the client reconnects and resumes, and every message of two topics published meanwhile arrives once, in order."""
    server = server_factory()

    async def main():
        async with mc.connect(server.ws_url(), "sub", **FAST) as sub, mc.connect(server.ws_url(), "pub", **FAST) as pub:
            await sub.subscribe("a")
            await sub.subscribe("b")
            published = {"a": 0, "b": 0}
            stop = asyncio.Event()

            async def publish() -> None:
                while not stop.is_set():
                    for topic in ("a", "b"):
                        ack = await pub.publish(topic, {"n": published[topic] + 1})
                        published[topic] = ack.seq_no

            publisher = asyncio.create_task(publish())
            for k in range(1, 7):
                await asyncio.sleep(0.03)
                if k % 2:
                    assert await asyncio.to_thread(drop, server, "sub") == 1  # the server's side
                else:
                    sub._conn.transport.abort()  # the client's side
                await until(lambda: sub.reconnects == k)
            await asyncio.sleep(0.03)
            stop.set()
            await publisher
            got: dict[str, list] = {"a": [], "b": []}
            while len(got["a"]) < published["a"] or len(got["b"]) < published["b"]:
                item = await asyncio.wait_for(anext(sub), 10)
                assert isinstance(item, mc.Message), item
                got[item.topic].append(item)
            for topic in ("a", "b"):
                assert [m.seq_no for m in got[topic]] == list(range(1, published[topic] + 1))
                assert all(m.data == {"n": m.seq_no} for m in got[topic])
            assert published["a"] > 50 and sub.reconnects == 6

    run(main())


def test_publish_whose_ack_was_lost_is_deduplicated(server_factory):
    """A publish the server took but whose ack the drop swallowed is sent again with its messageId after the reconnect: ack duplicate with the original seqNo, delivered once."""
    server = server_factory()
    fired = []

    def install() -> None:
        broker = server.server.broker
        original = broker.handle

        def handle(client: Any, text: str) -> None:
            original(client, text)
            if '"publish"' in text and not fired:
                fired.append(text)
                client.transport.abort()  # before the flush: the ack never goes out

        broker.handle = handle

    server.call(install)

    async def main():
        async with mc.connect(server.ws_url(), "alice", **FAST) as client:
            await client.subscribe("t")
            ack = await client.publish("t", {"x": 1})
            assert (ack.status, ack.seq_no) == ("duplicate", 1) and client.reconnects == 1
            assert ack.message_id in fired[0]
            assert (await client.publish("t", {"x": 2})).seq_no == 2
            items = await take(client, 2)
            assert [(m.seq_no, m.data) for m in items] == [(1, {"x": 1}), (2, {"x": 2})]

    run(main())


def test_slow_consumer_close_resumes_without_loss(server_factory):
    """A client that stops taking messages stops reading (max_queue), the server closes it with 4001, and once it reads again it resumes with nothing lost or repeated."""
    server = server_factory(max_buffer=16384)
    pad = "x" * 8000

    async def main():
        async with mc.connect(server.ws_url(), "sub", max_queue=4, **FAST) as client:
            # Small kernel buffers on both ends, so a few hundred KiB fill them (as RawClient's rcvbuf).
            client._conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            server.call(lambda: [c.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
                                 for c in server.server.connections if c.user_id == "sub"])
            await client.subscribe("t")
            for batch in range(40):
                await asyncio.to_thread(server.call, lambda b=batch: [server.server.publish("t", {"i": b * 10 + i, "pad": pad}) for i in range(10)])
            assert server.call(lambda: [c.ws.close_sent for c in server.server.connections if c.user_id == "sub"]) == [4001]
            items = await take(client, 400)
            assert [m.seq_no for m in items] == list(range(1, 401))
            assert [m.data["i"] for m in items] == list(range(400))
            assert client.reconnects == 1 and server.stats()["disconnects"] == {"4001": 1}

    run(main())


def test_queue_bounded_by_max_queue(server_factory):
    """A caller that takes nothing makes the client stop reading at max_queue items queued; taking them reads on, all in order."""
    server = server_factory()

    async def main():
        async with mc.connect(server.ws_url(), "sub", max_queue=10, **FAST) as client:
            await client.subscribe("t")
            await asyncio.to_thread(server.call, lambda: [server.server.publish("t", i) for i in range(1, 301)])
            await until(lambda: client._conn.paused)
            await asyncio.sleep(0.1)
            assert len(client._queue) == 10 and client._conn.paused
            items = await take(client, 300)
            assert [(m.seq_no, m.data) for m in items] == [(i, i) for i in range(1, 301)]
            assert len(client._queue) == 0 and not client._conn.paused and client.reconnects == 0

    run(main())


def test_request_from_the_loop_body_does_not_deadlock(server_factory):
    """Awaiting a request while the queue is full reads on to the reply (the consumer may be the one waiting), then stops reading again."""
    server = server_factory()

    async def main():
        async with mc.connect(server.ws_url(), "sub", max_queue=5, **FAST) as client:
            await client.subscribe("t")
            await asyncio.to_thread(server.call, lambda: [server.server.publish("t", i) for i in range(1, 51)])
            await until(lambda: client._conn.paused)
            seen = []
            async for item in client:
                seen.append(item.seq_no)
                ack = await asyncio.wait_for(client.publish("replies", item.data), 5)
                assert ack.seq_no == item.seq_no
                if len(seen) == 50:
                    break
            assert seen == list(range(1, 51))

    run(main())


def test_takeover_is_surfaced_not_retried(server_factory, wsclient):
    """Another connection resuming the session closes this one with 4002: pending and later calls and the iterator raise ConnectionClosed(4002), and nothing reconnects."""
    server = server_factory()

    async def main():
        async with mc.connect(server.ws_url(), "alice", **FAST) as client:
            await client.subscribe("t")
            async with wsclient.connect(server.ws_url()) as other:
                await setup(other, "alice")
                await other.send(json.dumps({"type": "resume", "sessionId": client.session_id}))
                assert (await recv_json(other))["type"] == "resumed"
                with pytest.raises(mc.ConnectionClosed) as closed:
                    await asyncio.wait_for(anext(client), 5)
                assert closed.value.code == 4002
                with pytest.raises(mc.ConnectionClosed):
                    await client.publish("t", 1)
                await asyncio.sleep(0.2)
                assert client.reconnects == 0 and server.stats()["connections"] == 1

    run(main())


def test_token_refresh_callback_keeps_the_connection(server_factory):
    """token_refresh is called refresh_before seconds ahead of ready.expiresAt; the refreshed token outlives the first one's exp on the server's clock."""
    clock = FakeClock()
    server = server_factory(clock=clock, jwt_secret=SECRET, jwt_leeway=0, ping_interval=0)
    calls = []

    async def new_token() -> str:
        calls.append(time.time())
        return jwt(exp=time.time() + 7200)

    async def main():
        first = time.time() + 3600
        async with mc.connect(server.ws_url(), jwt(exp=first), token_refresh=new_token, refresh_before=3600 - 0.3, **FAST) as client:
            assert client.expires_at == int(first)
            await client.subscribe("t")
            await until(lambda: client.expires_at != int(first))
            assert len(calls) == 1 and client.expires_at > first + 3000
            clock.advance(3601)
            await asyncio.to_thread(server.tick)
            assert (await client.publish("t", 1)).seq_no == 1
            assert [m.seq_no for m in await take(client, 1)] == [1]
            assert client.reconnects == 0 and len(calls) == 1

    run(main())


def test_token_expiry_without_callback_is_surfaced(server_factory):
    """Without token_refresh, the server's close 4003 at exp is raised by the iterator and by calls; the client does not reconnect."""
    clock = FakeClock()
    server = server_factory(clock=clock, jwt_secret=SECRET, jwt_leeway=0, ping_interval=0)

    async def main():
        async with mc.connect(server.ws_url(), jwt(exp=time.time() + 3600), **FAST) as client:
            await client.subscribe("t")
            clock.advance(3601)
            await asyncio.to_thread(server.tick)
            with pytest.raises(mc.ConnectionClosed) as closed:
                await asyncio.wait_for(anext(client), 5)
            assert closed.value.code == 4003
            with pytest.raises(mc.ConnectionClosed):
                await client.subscribe("u")
            assert client.reconnects == 0

    run(main())


def test_gap_in_live_stream_filled_by_replay(server_factory):
    """A message missing from the live stream (seqNo > last + 1 arrives) is fetched with replay before anything after it is delivered."""
    server = server_factory()

    async def main():
        async with mc.connect(server.ws_url(), "alice", **FAST) as client:
            await client.subscribe("t")
            received, lost = client._received_msg, []

            def lossy(msg: dict) -> None:  # as if the wire had lost seqNo 3
                if msg.get("type") == "message" and msg["seqNo"] == 3 and not lost:
                    lost.append(msg)
                    return
                received(msg)

            client._received_msg = lossy
            for i in range(1, 7):
                await client.publish("t", i)
            items = await take(client, 6)
            assert [(m.seq_no, m.data) for m in items] == [(i, i) for i in range(1, 7)]
            assert lost and server.stats()["replayed"] >= 2  # 3 and what came after it before the replay

    run(main())


def test_history_loss_reported_as_missed(server_factory):
    """What history no longer holds when the client resumes is reported as Missed(topic, epoch, from, to, "history") before the retained messages."""
    server = server_factory(history_messages=5)

    def drop_and_publish() -> None:
        for conn in [c for c in list(server.server.connections) if c.user_id == "sub"]:
            conn.transport.abort()
        for i in range(1, 21):
            server.server.publish("t", i)

    async def main():
        async with mc.connect(server.ws_url(), "sub", **FAST) as client:
            epoch = (await client.subscribe("t")).epoch
            await asyncio.to_thread(server.call, drop_and_publish)
            items = await take(client, 6)
            assert items[0] == mc.Missed("t", epoch, 1, 15, "history")
            assert [(m.seq_no, m.data) for m in items[1:]] == [(i, i) for i in range(16, 21)]

    run(main())


def test_signatures_verified(server_factory):
    """With the server's signing keys every message (live and replayed) verifies; with a wrong key, or from an unsigned server, the iterator raises SignatureError per message and goes on."""
    signed = server_factory(sign_keys=(f"k1={SIGN_SECRET}",))
    unsigned = server_factory()

    async def main():
        async with mc.connect(signed.ws_url(), "alice", signing_keys={"k1": SIGN_SECRET.encode()}, **FAST) as client:
            await client.subscribe("t")
            await client.publish("t", {"b": [1, 2.5, "é"], "a": None})
            (item,) = await take(client, 1)
            assert item.kid == "k1" and item.sig and item.data == {"a": None, "b": [1, 2.5, "é"]}
            assert await client.replay("t", 1) == [item]
        for url in (signed.ws_url(), unsigned.ws_url()):
            async with mc.connect(url, "bob", signing_keys={"k1": b"another-key-of-32-bytes-or-more!!"}, **FAST) as client:
                await client.subscribe("s")
                await client.publish("s", 1)
                await client.publish("s", 2)
                for seq in (1, 2):
                    with pytest.raises(mc.SignatureError) as bad:
                        await asyncio.wait_for(anext(client), 5)
                    assert bad.value.code == "BAD_SIGNATURE" and bad.value.item.seq_no == seq
                with pytest.raises(mc.SignatureError):
                    await client.replay("s", 1)

    run(main())


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


def test_wss_verifies_the_certificate(server_factory, certificate):
    """wss:// works with a context that trusts the server's certificate and fails, by default, against a self-signed one."""
    certfile, keyfile = certificate
    server = server_factory(certfile=certfile, keyfile=keyfile)
    url = f"wss://127.0.0.1:{server.port}/ws"

    async def main():
        async with mc.connect(url, "alice", ssl=ssl.create_default_context(cafile=certfile), **FAST) as client:
            await client.subscribe("t")
            await client.publish("t", "secret")
            assert [m.data for m in await take(client, 1)] == ["secret"]
        with pytest.raises(ssl.SSLCertVerificationError):
            await mc.connect(url, "alice", **FAST)

    run(main())


@pytest.mark.slow  # two server processes
def test_server_restart_new_epoch():
    """A server restarted as a new process (new epoch): the client reconnects, reports the old epoch's end as Missed, and delivers the new epoch from seqNo 1, including what was published before it subscribed again."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    with contextlib.ExitStack() as stack:

        def start() -> Any:
            proc, lines = stack.enter_context(cli("--port", str(port), "--log-level", "WARNING"))
            read_banner(lines)
            return proc

        async def main():
            first = await asyncio.to_thread(start)
            async with mc.connect(f"ws://127.0.0.1:{port}/ws", "alice", **FAST) as client:
                await client.subscribe("t")
                for i in range(3):
                    await client.publish("t", i)
                old = await take(client, 3)
                first.terminate()  # SIGTERM: every connection closed with 1001
                await asyncio.to_thread(first.wait, 10)
                await asyncio.to_thread(start)
                for i in range(5):
                    status = (await asyncio.to_thread(http_request, f"{base}/demo/publish/t?n={i}"))[0]
                    assert status == 200
                items = await take(client, 6)
                assert items[0] == mc.Missed("t", old[0].epoch, 4, None, "epoch")
                assert [(m.seq_no, m.data) for m in items[1:]] == [(i + 1, {"n": str(i)}) for i in range(5)]
                assert items[1].epoch != old[0].epoch and client.reconnects == 1

        run(main())


# === a scripted server ===========================================================================


def response(key: str, accept: str | None = None, protocol: str | None = ms.SUBPROTOCOL, extra: tuple = ()) -> bytes:
    """A 101 for `key`, with the accept key, subprotocol and extra header lines given."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {accept or ms.accept_key(key)}"]
    lines += [f"Sec-WebSocket-Protocol: {protocol}"] * bool(protocol) + list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Peer:
    """The server side of one connection to a FakeServer: client frames in (unmasked, masks kept), server frames out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes, index: int) -> None:
        self.reader, self.writer, self.request, self.index = reader, writer, request, index
        self.buffer = b""
        self.masks: list[bytes | None] = []
        self.acks: list[dict] = []

    async def frame(self, timeout: float = 5) -> ms.Frame | None:
        """The next client frame, or None at EOF."""
        while True:
            header = ms.parse_header(self.buffer)
            parsed = ms.Frame.parse(self.buffer)
            if parsed is not None:
                self.masks.append(header.mask)
                self.buffer = self.buffer[parsed[1]:]
                return parsed[0]
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except ConnectionError:
                return None
            if not data:
                return None
            self.buffer += data

    async def recv(self) -> dict:
        """The next client message other than an ack (those are kept in `acks`)."""
        while True:
            frame = await self.frame()
            assert frame is not None and frame.opcode == ms.Opcode.TEXT, frame
            msg = json.loads(frame.payload)
            if msg["type"] != "ack":
                return msg
            self.acks.append(msg)

    async def acked(self, seq: int) -> None:
        """Read until the client has acked `seq`."""
        while not self.acks or self.acks[-1]["seqNo"] < seq:
            frame = await self.frame()
            assert frame is not None, "closed before the ack"
            msg = json.loads(frame.payload)
            if msg["type"] == "ack":
                self.acks.append(msg)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, **msg: Any) -> None:
        self.write(ms.text_frame(json.dumps(msg)))

    async def setup(self, session: str = "s1", epoch: str = "E") -> dict:
        """Read `setup`, answer `ready`."""
        msg = await self.recv()
        assert msg["type"] == "setup", msg
        self.send(type="ready", sessionId=session, userId="alice", epoch=epoch, expiresAt=None, id=msg["id"])
        return msg

    async def reply(self, kind: str, **fields: Any) -> dict:
        """Read a request of type `kind`, answer it with `fields` (and its id)."""
        msg = await self.recv()
        assert msg["type"] == kind, msg
        self.send(**fields, id=msg["id"])
        return msg


class FakeServer:
    """A WebSocket server on 127.0.0.1 that answers each handshake with respond(key), then runs script(peer)."""

    def __init__(self, script: Callable[[Peer], Awaitable[None]], respond: Callable[[str], bytes] = response) -> None:
        self.script, self.respond = script, respond
        self.peers: list[Peer] = []
        self.errors: list[BaseException] = []
        self.tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.errors and exc[0] is None:
            raise self.errors[0]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = re.search(rb"Sec-WebSocket-Key: (\S+)", request).group(1).decode()
        writer.write(self.respond(key))
        peer = Peer(reader, writer, request, len(self.peers))
        self.peers.append(peer)
        self.tasks.append(asyncio.current_task())
        try:
            await self.script(peer)
        except asyncio.CancelledError:
            pass  # the test is over
        except Exception as exc:  # noqa: BLE001 - failed at the end of the test
            self.errors.append(exc)
        finally:
            writer.close()


@pytest.mark.parametrize(
    "respond, status",
    [
        (lambda key: response(key, accept=ms.accept_key("x" + key)), None),
        (lambda key: response(key, protocol=None), None),
        (lambda key: response(key, protocol="other.v1"), None),
        (lambda key: response(key, extra=("Sec-WebSocket-Extensions: permessage-deflate",)), None),
        (lambda key: response(key).replace(b"Upgrade: websocket\r\n", b""), None),
        (lambda key: b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", 403),
    ],
    ids=["wrong-accept", "no-subprotocol", "other-subprotocol", "extension", "no-upgrade", "403"],
)
def test_handshake_response_checked(respond, status):
    """A 101 whose Sec-WebSocket-Accept, Upgrade, subprotocol or extensions are wrong, or another status, fails connect with HandshakeError."""

    async def main():
        async with FakeServer(lambda peer: asyncio.sleep(1), respond) as fake:
            with pytest.raises(mc.HandshakeError) as failed:
                await mc.connect(fake.url, "alice", **FAST)
            assert failed.value.status == status

    run(main())


def test_handshake_request_and_masking():
    """The request carries a fresh 16-byte key, version 13 and the microsocket.v1 offer; every client frame is masked, each with its own key."""

    async def script(peer: Peer) -> None:
        await peer.setup()
        await peer.reply("publish", type="ack", messageId="m", status="ok", seqNo=1)
        await peer.reply("publish", type="ack", messageId="m", status="ok", seqNo=1)
        frame = await peer.frame()
        assert frame.opcode == ms.Opcode.CLOSE and ms.parse_close(frame.payload)[0] == 1000
        peer.write(ms.serialize_frame(ms.Opcode.CLOSE, frame.payload))

    async def main():
        async with FakeServer(script) as fake:
            for _ in range(2):
                async with mc.connect(fake.url, "alice", ping_interval=0, **FAST) as client:
                    await client.publish("t", 1, message_id="m")
                    await client.publish("t", 1, message_id="m")
        keys = []
        for peer in fake.peers:
            assert b"Sec-WebSocket-Version: 13\r\n" in peer.request and b"Sec-WebSocket-Protocol: microsocket.v1\r\n" in peer.request
            key = re.search(rb"Sec-WebSocket-Key: (\S+)", peer.request).group(1)
            assert len(base64.b64decode(key, validate=True)) == 16
            keys.append(key)
            assert len(peer.masks) == 4 and None not in peer.masks and len(set(peer.masks)) == 4
        assert keys[0] != keys[1]

    run(main())


def test_fragments_pings_and_utf8_across_fragments():
    """A fragmented reply with a ping between its fragments is reassembled, the ping answered by a pong with its payload, and text split inside a UTF-8 character decoded."""

    async def script(peer: Peer) -> None:
        msg = await peer.recv()
        ready = json.dumps({"type": "ready", "sessionId": "s1", "userId": "alice", "epoch": "E", "expiresAt": None, "id": msg["id"]}).encode()
        peer.write(ms.serialize_frame(ms.Opcode.TEXT, ready[:10], fin=False))
        peer.write(ms.serialize_frame(ms.Opcode.PING, b"are you there"))
        peer.write(ms.serialize_frame(ms.Opcode.CONT, ready[10:20], fin=False))
        peer.write(ms.serialize_frame(ms.Opcode.CONT, ready[20:]))
        pong = await peer.frame()
        assert (pong.opcode, pong.payload) == (ms.Opcode.PONG, b"are you there")
        await peer.reply("subscribe", type="subscribed", topic="t", seqNo=0, epoch="e1")
        text = json.dumps({"type": "message", "topic": "t", "seqNo": 1, "messageId": "m1", "data": "é" * 5}, ensure_ascii=False).encode()
        cut = text.index("é".encode()) + 1  # inside the two bytes of the first é
        peer.write(ms.serialize_frame(ms.Opcode.TEXT, text[:cut], fin=False))
        peer.write(ms.serialize_frame(ms.Opcode.CONT, text[cut:]))
        await peer.frame()

    async def main():
        async with FakeServer(script) as fake:
            async with mc.connect(fake.url, "alice", ping_interval=0, **FAST) as client:
                await client.subscribe("t")
                assert await take(client, 1) == [mc.Message("t", 1, "m1", "é" * 5, "e1")]

    run(main())


@pytest.mark.parametrize(
    "frames, code",
    [
        ([ms.serialize_frame(ms.Opcode.TEXT, b'{"type": "\xff"}')], 1007),
        ([ms.serialize_frame(ms.Opcode.TEXT, b"x" * 60, fin=False), ms.serialize_frame(ms.Opcode.CONT, b"x" * 60)], 1009),
        ([ms.serialize_frame(ms.Opcode.TEXT, b"x" * 101)], 1009),
        ([ms.serialize_frame(ms.Opcode.TEXT, b"{}", mask=b"abcd")], 1002),
        ([bytes((0xC1, 0x00))], 1002),  # RSV1 without an extension
        ([ms.serialize_frame(ms.Opcode.CONT, b"{}")], 1002),
    ],
    ids=["utf8", "fragments-too-big", "frame-too-big", "masked", "rsv1", "stray-continuation"],
)
def test_protocol_violations_fail_the_connection(frames, code):
    """Invalid UTF-8 (1007), a message over max_message_size (1009) and RFC 6455 violations by the server (1002) are answered with that close code and end the client."""
    seen = []

    async def script(peer: Peer) -> None:
        await peer.setup()
        for frame in frames:
            peer.write(frame)
        close = await peer.frame()
        seen.append(ms.parse_close(close.payload)[0])

    async def main():
        async with FakeServer(script) as fake:
            async with mc.connect(fake.url, "alice", max_message_size=100, ping_interval=0, **FAST) as client:
                with pytest.raises(mc.ConnectionClosed) as closed:
                    await asyncio.wait_for(anext(client), 5)
                assert closed.value.code == code
            assert len(fake.peers) == 1

    run(main())
    assert seen == [code]


@pytest.mark.parametrize("answer", [True, False], ids=["answered", "unanswered"])
def test_close_handshake(answer):
    """aclose sends close 1000 and waits for the server's close frame and TCP close; without an answer it drops TCP itself after close_timeout."""
    dropped = []

    async def script(peer: Peer) -> None:
        await peer.setup()
        close = await peer.frame()
        assert ms.parse_close(close.payload) == (1000, "")
        if answer:
            await asyncio.sleep(0.1)
            peer.write(ms.serialize_frame(ms.Opcode.CLOSE, close.payload))
            return  # §7.1.1: then the server closes TCP first
        dropped.append(await peer.frame(timeout=5) is None)  # the client closed TCP

    async def main():
        async with FakeServer(script) as fake:
            client = await mc.connect(fake.url, "alice", ping_interval=0, close_timeout=1.0)
            started = time.monotonic()
            await client.aclose()
            elapsed = time.monotonic() - started
            assert (0.1 <= elapsed < 0.9) if answer else (1.0 <= elapsed < 3)
            with pytest.raises(StopAsyncIteration):
                await anext(client)
            if not answer:
                await until(lambda: dropped)
                assert dropped == [True]

    run(main())


def test_server_close_is_echoed():
    """A close from the server is answered with a close frame carrying its code; a code outside the reconnect list (4002) ends the client."""
    echoed = []

    async def script(peer: Peer) -> None:
        await peer.setup()
        peer.write(ms.serialize_frame(ms.Opcode.CLOSE, ms.serialize_close(4002, "taken over")))
        frame = await peer.frame()
        echoed.append(ms.parse_close(frame.payload)[0])

    async def main():
        async with FakeServer(script) as fake:
            async with mc.connect(fake.url, "alice", ping_interval=0, **FAST) as client:
                with pytest.raises(mc.ConnectionClosed) as closed:
                    await asyncio.wait_for(anext(client), 5)
                assert (closed.value.code, closed.value.reason) == (4002, "taken over")
                await asyncio.sleep(0.1)
            assert len(fake.peers) == 1

    run(main())
    assert echoed == [4002]


def test_keepalive_drops_a_silent_connection():
    """A connection silent past ping_interval is pinged; with no answer within ping_timeout the client drops it, reconnects and resumes its session."""
    resumes = []

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.setup()
            ping = await peer.frame()
            assert ping.opcode == ms.Opcode.PING
            assert await peer.frame(timeout=2) is None  # never answered: the client goes
        else:
            await peer.setup(session="s2")
            msg = await peer.reply("resume", type="resumed", sessionId="s1", topics=[], replayed=0, missed=[], epochs={})
            resumes.append(msg)
            await peer.frame()

    async def main():
        async with FakeServer(script) as fake:
            async with mc.connect(fake.url, "alice", ping_interval=0.1, ping_timeout=0.1, **FAST) as client:
                await until(lambda: client.reconnects == 1)
                assert client.session_id == "s1"

    run(main())
    assert resumes[0]["sessionId"] == "s1" and resumes[0]["epoch"] == "E"


def test_epoch_notice_resets_the_position():
    """An unasked subscribed at seqNo 0 with a new epoch yields Missed(old epoch, last + 1, None, "epoch"); seqNo 1 of the new epoch follows."""

    async def script(peer: Peer) -> None:
        await peer.setup()
        await peer.reply("subscribe", type="subscribed", topic="t", seqNo=0, epoch="e1")
        for seq in (1, 2):
            peer.send(type="message", topic="t", seqNo=seq, messageId=f"a{seq}", data=seq)
        peer.send(type="subscribed", topic="t", seqNo=0, epoch="e2")
        peer.send(type="message", topic="t", seqNo=1, messageId="b1", data=1)
        await peer.frame()

    async def main():
        async with FakeServer(script) as fake:
            async with mc.connect(fake.url, "alice", ping_interval=0, **FAST) as client:
                await client.subscribe("t")
                assert await take(client, 4) == [
                    mc.Message("t", 1, "a1", 1, "e1"),
                    mc.Message("t", 2, "a2", 2, "e1"),
                    mc.Missed("t", "e1", 3, None, "epoch"),
                    mc.Message("t", 1, "b1", 1, "e2"),
                ]

    run(main())


def test_resume_frames_wait_for_the_epochs():
    """resume sends lastSeqPerTopic, epochs and the server epoch; the replayed gap is held until `resumed` says the topic's new epoch and what history lost, then delivered in that epoch."""
    requests = []

    async def script(peer: Peer) -> None:
        if peer.index == 0:
            await peer.setup()
            await peer.reply("subscribe", type="subscribed", topic="t", seqNo=0, epoch="e1")
            for seq in (1, 2):
                peer.send(type="message", topic="t", seqNo=seq, messageId=f"a{seq}", data=seq)
            await peer.acked(2)
            return  # TCP closed without a close frame: 1006
        await peer.setup(session="s2")
        msg = await peer.recv()
        requests.append(msg)
        for seq in (2, 3):  # the new epoch's history, seqNo 1 no longer retained
            peer.send(type="message", topic="t", seqNo=seq, messageId=f"b{seq}", data=seq)
        peer.send(type="resumed", sessionId="s1", topics=["t"], replayed=2, missed=[{"topic": "t", "fromSeq": 1, "oldestSeq": 2}],
                  epochs={"t": "e2"}, id=msg["id"])
        peer.send(type="message", topic="t", seqNo=4, messageId="b4", data=4)
        await peer.frame()

    async def main():
        async with FakeServer(script) as fake:
            async with mc.connect(fake.url, "alice", ping_interval=0, **FAST) as client:
                await client.subscribe("t")
                assert [m.seq_no for m in await take(client, 2)] == [1, 2]
                assert await take(client, 5) == [
                    mc.Missed("t", "e1", 3, None, "epoch"),
                    mc.Missed("t", "e2", 1, 1, "history"),
                    mc.Message("t", 2, "b2", 2, "e2"),
                    mc.Message("t", 3, "b3", 3, "e2"),
                    mc.Message("t", 4, "b4", 4, "e2"),
                ]

    run(main())
    assert {k: requests[0][k] for k in ("type", "sessionId", "lastSeqPerTopic", "epochs", "epoch")} == {
        "type": "resume", "sessionId": "s1", "lastSeqPerTopic": {"t": 2}, "epochs": {"t": "e1"}, "epoch": "E"}
