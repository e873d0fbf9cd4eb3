"""Section 15 of microsocket.py: the server's I/O, in-process.

The server runs in its own thread (ServerHandle); tests talk to it over real sockets: the raw
client for what a polite client cannot send, the websockets client for the rest. Timers run on a
FakeClock: a test moves the clock and calls `server.tick()`, so no test waits for a timeout to pass
in real time (the shutdown grace, which uses real time, is the one exception, 0.5 s).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import re
import shutil
import ssl
import subprocess
import time
import sys
import tracemalloc

import pytest

import microsocket as ms
from conftest import (
    FakeClock,
    RawClient,
    http_request,
    masked,
    parse_response,
    recv_json,
    request,
    run,
    setup,
    upgrade_request,
    wait_until,
)

SEQ_RE = re.compile(r'"seqNo":(\d+)')


def seq_of_text(text: str) -> int:
    """The seqNo of a `message` frame's text without parsing its (possibly large) payload."""
    assert text.startswith('{"type":"message"'), text[:80]
    return int(SEQ_RE.search(text, 0, 200).group(1))


async def pong_check(ws, tag) -> None:
    """The connection still answers: ping with an id gets pong with that id."""
    assert await request(ws, {"type": "ping", "id": tag}) == {"type": "pong", "id": tag}


# === WebSocket protocol violations and control frames, over a raw socket ==========================
# (the close codes of the violations themselves, and the echo of a client's close, are SPEC's:
# test_microsocket.py, the conformance kit, checks them over the network)


def test_raw_replies_before_violation_are_sent_first(server_factory):
    """Replies to messages in the same segment as a violation are written before the 1002 close frame."""
    server = server_factory()
    with RawClient(server.port) as client:
        client.handshake()
        client.send(masked(ms.Opcode.TEXT, b'{"type":"ping","id":1}') + ms.serialize_frame(ms.Opcode.TEXT, b"unmasked"))
        assert client.recv_json() == {"type": "pong", "id": 1}
        assert client.recv_close() == 1002
        assert client.at_eof()


def test_raw_frames_in_the_handshake_segment(server_factory):
    """Frames sent in the same segment as the upgrade request are read as WebSocket data after the 101."""
    server = server_factory()
    with RawClient(server.port) as client:
        client.send(upgrade_request("/ws") + masked(ms.Opcode.TEXT, b'{"type":"ping","id":7}'))
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
def test_raw_message_over_max_size_is_1009(server_factory, data):
    """With max_message_size=1000 a 1000-byte message echoes back and a 1001-byte one, whole or fragmented, is closed with 1009."""
    server = server_factory(max_message_size=1000, echo=True)
    with RawClient(server.port) as client:
        client.handshake("/echo")
        client.send(masked(ms.Opcode.TEXT, b"a" * 500, fin=False) + masked(ms.Opcode.CONT, b"a" * 500))
        assert client.recv_frame() == ms.Frame(True, ms.Opcode.TEXT, b"a" * 1000)
        client.send(data)
        assert client.recv_close() == 1009
        assert client.at_eof()


def test_failed_connection_reads_and_drops_what_the_peer_still_sends(server_factory):
    """A client still sending the rest of a message over the limit after the 1009 is not reset: the
    server follows its close frame with a FIN and reads (and drops) what keeps coming, so the close
    frame cannot be destroyed by a reset. The client's later sends succeed, it reads a clean EOF,
    and the server keeps no connection once the client has closed."""
    server = server_factory(max_message_size=1000, echo=True)
    with RawClient(server.port) as client:
        client.handshake("/echo")
        mask = os.urandom(4)
        header = bytes((0x81, 0xFF)) + (200_000).to_bytes(8, "big") + mask  # declares 200 kB: over the limit
        client.send(header + b"a" * 100)
        assert client.recv_close() == 1009
        for _ in range(5):  # the rest of the message: had the server closed its socket, these would be reset
            client.send(b"a" * 40_000)
            time.sleep(0.05)
        assert client.sock.recv(65536) == b"" and not client.buffer  # a FIN after the close frame, not a reset
    deadline = time.monotonic() + 5
    while server.server.connections and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.server.connections


def test_raw_ping_gets_pong_in_order(server_factory):
    """A ping gets a pong with the same payload, written between the replies to the messages around it."""
    server = server_factory()
    with RawClient(server.port) as client:
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


@pytest.mark.parametrize("kind", ["binary", "text"])
def test_echo_16_mib(server_factory, wsclient, kind):
    """A 16 MiB message goes through /echo (max_message_size 16 MiB) and comes back intact."""
    size = 16 << 20
    if kind == "binary":
        message = os.urandom(size)
    else:  # multi-byte characters, so TCP chunks split them
        unit = "κόσμε ✓ "
        message = unit * (size // len(unit.encode()))
    server = server_factory(echo=True, max_message_size=size)

    async def main():
        async with wsclient.connect(server.ws_url("/echo"), max_size=None) as ws:
            await ws.send(message)
            assert await asyncio.wait_for(ws.recv(), 20) == message

    run(main(), timeout=45)


# === HTTP on a connection: HEAD, keep-alive, errors that close it ===================================


@pytest.mark.parametrize("path", ["/", "/docs", "/healthz", "/stats", "/openapi.json", "/openapi", "/nope", "/ws"])
def test_head_is_get_without_body(server_factory, path):
    """HEAD gets GET's status and headers, Content-Length included, and no body: the next response follows at once."""
    get = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    server = server_factory()
    with RawClient(server.port) as client:
        status, headers, body = client.http(get)
        client.send(get.replace(b"GET", b"HEAD", 1))
        head_status, head_headers, _ = parse_response(client.recv_until(b"\r\n\r\n"))  # no body follows
        assert client.http(get) == (status, headers, body)
    assert (head_status, head_headers) == (status, headers)
    assert int(head_headers["content-length"]) == len(body)


def test_keep_alive_and_connection_close(server_factory):
    """Two pipelined requests are answered on one socket; `Connection: close` is answered, then the server closes."""
    server = server_factory()
    with RawClient(server.port) as client:
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(2):
            status, headers, body = client.http(b"")
            assert (status, headers["connection"], body.strip()) == (200, "keep-alive", b"ok")
        status, headers, _ = client.http(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (status, headers["connection"]) == (200, "close")
        assert client.at_eof()


def test_http10_closes_without_keep_alive(server_factory):
    """An HTTP/1.0 request without `Connection: keep-alive` is answered, then the connection is closed."""
    server = server_factory()
    with RawClient(server.port) as client:
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
def test_http_errors(server_factory, raw, status, headers, closes):
    """HTTP errors are JSON {"error": ...} with the right status and headers; errors in the request itself close the connection."""
    server = server_factory()
    with RawClient(server.port) as client:
        got_status, got_headers, body = client.http(raw)
        assert got_status == status
        assert headers.items() <= got_headers.items()
        assert got_headers["content-type"].startswith("application/json")
        assert isinstance(json.loads(body)["error"], str)
        if closes:
            assert client.at_eof()
        else:
            assert client.http(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200


# === Embedding: Server.publish ======================================================================


def test_embedding_publish(server_factory, wsclient):
    """server.publish delivers to a subscriber and returns a PublishResult; invalid input, an empty message_id included, raises ValueError."""
    server = server_factory()

    async def main():
        async with wsclient.connect(server.ws_url()) as ws:
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
            for message_id in ("m" * 257, ""):
                with pytest.raises(ValueError):
                    server.publish("prices", {}, message_id=message_id)
            await pong_check(ws, "nothing-else-arrived")

    run(main())


# === Timers, on the fake clock ======================================================================


def test_handshake_timeout_cuts_incomplete_request_head(server_factory):
    """A client whose request head is not complete within handshake_timeout (slowloris) has its TCP connection closed, with no response."""
    clock = FakeClock()
    server = server_factory(clock=clock, handshake_timeout=10)
    with RawClient(server.port) as raw:
        raw.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        server.sync()
        clock.advance(9.5)
        server.tick()
        assert server.open_connections() == 1  # not yet
        clock.advance(1)
        server.tick()
        assert raw.at_eof()
        assert raw.buffer == b""  # no response at all: the head never ended
    wait_until(lambda: server.open_connections() == 0, what="the connection to be dropped")
    assert server.stats()["connections"] == 0


def test_setup_timeout_closes_4000(server_factory, wsclient):
    """A WebSocket that sends no setup within setup_timeout is closed with 4000; one that did stays open."""
    clock = FakeClock()
    server = server_factory(clock=clock, setup_timeout=10)

    async def main():
        async with wsclient.connect(server.ws_url(), ping_interval=None) as late, \
                wsclient.connect(server.ws_url(), ping_interval=None) as ok:
            await setup(ok, "alice")
            server.sync()  # `late`'s setup deadline is set after its 101 went out
            clock.advance(9.5)
            server.tick()
            await pong_check(late, "before-the-deadline")  # ping is allowed before setup
            clock.advance(1)
            server.tick()
            await asyncio.wait_for(late.wait_closed(), 10)
            assert late.close_code == 4000
            await pong_check(ok, "set-up-in-time")

    run(main())


def test_peer_that_never_answers_a_close_is_dropped_after_close_timeout(server_factory):
    """After the server's close frame (here 4000, no setup), a peer that never answers loses its TCP connection after close_timeout."""
    clock = FakeClock()
    server = server_factory(clock=clock, setup_timeout=10, close_timeout=5)
    with RawClient(server.port) as raw:
        raw.handshake()
        server.sync()  # the 101 is written before the setup deadline is set: let the server finish
        clock.advance(11)
        server.tick()
        assert raw.recv_close() == 4000
        clock.advance(4.5)
        server.tick()
        assert server.open_connections() == 1  # still waiting for the peer's close frame
        clock.advance(1)
        server.tick()
        assert raw.at_eof()  # no close frame sent back: dropped


def test_failed_connection_whose_peer_never_closes_is_dropped_after_close_timeout(server_factory):
    """A connection failed for a violation (1002) waits for its peer to close for close_timeout, no
    longer: a client that keeps its socket open is dropped then, and the server holds nothing of it."""
    clock = FakeClock()
    server = server_factory(clock=clock, close_timeout=5)
    with RawClient(server.port) as raw:
        raw.handshake()
        raw.send(ms.serialize_frame(ms.Opcode.TEXT, b"{}"))  # unmasked: 1002
        assert raw.recv_close() == 1002
        server.sync()
        clock.advance(4.5)
        server.tick()
        assert server.open_connections() == 1  # half-closed, reading what the client still sends
        clock.advance(1)
        server.tick()
        wait_until(lambda: server.open_connections() == 0, what="the failed connection to be dropped")


def test_keepalive_silent_client_is_pinged_then_closed_1011_and_its_session_resumes(server_factory, wsclient):
    """A client silent for ping_interval gets a ping, silent ping_timeout more gets close 1011; its session stays resumable."""
    clock = FakeClock()
    server = server_factory(clock=clock, ping_interval=20, ping_timeout=20)
    with RawClient(server.port) as raw:
        raw.handshake()
        ready = raw.setup("alice", topics=["t"])
        server.tick()  # the setup was a sign of life: the silence starts now
        clock.advance(19.5)
        server.tick()
        assert raw.pending() == b""  # not silent for long enough yet
        clock.advance(1)
        server.tick()
        assert raw.recv_frame().opcode == ms.Opcode.PING
        clock.advance(19.5)
        server.tick()
        assert raw.pending() == b""
        clock.advance(1)
        server.tick()
        assert raw.recv_close() == 1011
    wait_until(lambda: server.stats()["connections"] == 0, what="the connection to go")
    assert server.stats()["sessions"] == 1  # detached, not dropped
    server.publish("t", "while away")

    async def main():
        async with wsclient.connect(server.ws_url(), ping_interval=None) as ws:
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


def test_keepalive_answering_clients_stay_open_across_several_pings(server_factory, wsclient):
    """A websockets client (automatic pongs) and a raw client answering pings by hand stay open across 3 pings."""
    clock = FakeClock()
    server = server_factory(clock=clock, ping_interval=20, ping_timeout=20)
    logger = logging.getLogger("test_server.keepalive")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    pings = _Count("< PING")
    logger.addHandler(pings)

    async def main():
        async with wsclient.connect(server.ws_url(), ping_interval=None, logger=logger) as ws:
            await setup(ws, "alice")
            with RawClient(server.port) as raw:
                raw.handshake()
                raw.setup("bob")
                for n in range(1, 4):
                    server.tick()  # what arrived since the last sweep counts as a sign of life
                    clock.advance(20)
                    server.tick()  # silent for the ping interval: both are pinged
                    frame = raw.recv_frame()
                    assert frame.opcode == ms.Opcode.PING, frame
                    raw.send(masked(ms.Opcode.PONG, frame.payload))
                    for _ in range(500):  # the websockets client answers in its own time
                        if pings.count >= n:
                            break
                        await asyncio.sleep(0.01)
                    assert pings.count == n
                    await pong_check(ws, n)
                    clock.advance(20)  # the pongs arrived: no close, however long the next sweep waits
                    server.tick()
                assert (await request(ws, {"type": "subscribe", "topic": "t"}))["type"] == "subscribed"
                stats = server.stats()
                assert stats["connections"] == 2 and stats["disconnects"] == {}

    try:
        run(main())
    finally:
        logger.removeHandler(pings)


def test_keepalive_sweep_right_after_takeover_does_not_crash(server_factory, wsclient):
    """A sweep that falls due for a just-taken-over connection (same loop turn, before its 4002 is flushed) does not raise."""
    clock = FakeClock()
    server = server_factory(clock=clock, ping_interval=20)

    async def main():
        async with wsclient.connect(server.ws_url(), ping_interval=None) as old, \
                wsclient.connect(server.ws_url(), ping_interval=None) as new:
            old_ready = await setup(old, "alice", topics=["t"])
            await recv_json(old)
            new_ready = await setup(new, "alice")

            def race() -> None:
                srv = server.server
                conns = {c.session.id: c for c in srv.connections if c.session is not None}
                srv.tick()  # a sweep: both were active, so they count as idle from now on
                clock.advance(40)
                # In one loop turn: `new`'s resume arrives, then the sweep that finds `old` idle for
                # the ping interval runs, before the flush that sends 4002.
                srv.broker.handle(conns[new_ready["sessionId"]], json.dumps({"type": "resume", "sessionId": old_ready["sessionId"]}))
                srv.tick()

            server.call(race)
            await asyncio.wait_for(old.wait_closed(), 10)
            assert old.close_code == 4002
            assert (await recv_json(new))["type"] == "resumed"

    run(main())


# === Flow control: slow consumers and long catch-ups ================================================


@pytest.mark.slow
def test_slow_consumer_is_closed_4001_others_get_everything_and_it_resumes(server_factory, wsclient):
    """A raw client that stops reading is closed with 4001 while 50 others get every message; it then resumes with nothing missing."""
    server = server_factory(max_buffer=256 << 10, history_messages=10_000)

    async def main():
        slow = RawClient(server.port, timeout=10, rcvbuf=4096)
        slow.handshake()
        ready = slow.setup("slow", topics=["big"])
        # From here on `slow` reads nothing: the kernel buffers fill up, then the server's.

        n_fast = 50
        fast = [await wsclient.connect(server.ws_url(), ping_interval=None) for _ in range(n_fast)]
        got: list[list[int]] = [[] for _ in range(n_fast)]
        arrived: dict[int, int] = {}
        waiting = {"seq": 0, "event": asyncio.Event()}

        async def reader(i: int, ws) -> None:
            while True:
                seq = seq_of_text(await ws.recv())
                got[i].append(seq)
                arrived[seq] = arrived.get(seq, 0) + 1
                if seq == waiting["seq"] and arrived[seq] == n_fast:
                    waiting["event"].set()

        for i, ws in enumerate(fast):
            await setup(ws, f"fast{i}", topics=["big"])
            assert (await recv_json(ws))["type"] == "subscribed"
        readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(fast)]
        published = 0

        async def publish_one() -> int:
            waiting["event"] = asyncio.Event()
            waiting["seq"] = published + 1
            result = server.publish("big", {"pad": "x" * (16 << 10)})
            assert result.seq_no == waiting["seq"]
            # Every fast subscriber gets it while the slow one is stuck: nobody waits for it.
            await asyncio.wait_for(waiting["event"].wait(), 10)
            return result.seq_no

        while server.stats()["connections"] == n_fast + 1:  # until the slow one is cut (a few MiB of buffers)
            assert published < 2000, "the slow consumer was never closed"
            published = await publish_one()
        assert server.stats()["connections"] == n_fast  # gone at once, before its close handshake
        for _ in range(20):  # the others go on
            published = await publish_one()

        # The slow client finally reads: what was written before the cut, then close 4001.
        read = []
        while True:
            frame = await asyncio.to_thread(slow.recv_frame)
            if frame.opcode == ms.Opcode.CLOSE:
                assert ms.parse_close(frame.payload)[0] == ms.CloseCode.SLOW_CONSUMER
                break
            read.append(seq_of_text(frame.payload.decode()))
        slow.send(masked(ms.Opcode.CLOSE, ms.serialize_close(1000)))
        assert await asyncio.to_thread(slow.at_eof)
        slow.close()
        assert read == list(range(1, len(read) + 1)) and len(read) < published
        for task in readers:
            task.cancel()
        for i in range(n_fast):
            assert got[i] == list(range(1, published + 1)), f"fast subscriber {i} missed or repeated messages"

        # It resumes on a new connection from what it actually read: nothing is missing, nothing doubled.
        async with wsclient.connect(server.ws_url(), ping_interval=None, max_queue=None) as again:
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

    run(main(), timeout=55)
    assert server.stats()["disconnects"].get("4001") == 1
    assert 'microsocket_disconnects_total{code="4001"} 1' in http_request(server.url("/metrics")).body.decode()


def test_resume_bigger_than_max_buffer_then_live_message_is_not_a_slow_consumer(server_factory, wsclient):
    """A client that reads at full speed, resuming a 16 MiB gap with max_buffer=64 KiB, gets the replay and the next live message, not 4001."""
    server = server_factory(max_buffer=64 << 10, history_messages=10_000)

    async def main():
        async with wsclient.connect(server.ws_url(), ping_interval=None) as old:
            ready = await setup(old, "alice", topics=["big"])
            await recv_json(old)
        wait_until(lambda: server.stats()["connections"] == 0, what="the old connection to go")
        server.call(lambda: [server.server.publish("big", {"pad": "x" * (16 << 10)}) for _ in range(1000)])  # the gap
        async with wsclient.connect(server.ws_url(), ping_interval=None, max_queue=None) as new:
            await setup(new, "alice")
            await new.send(json.dumps({"type": "resume", "sessionId": ready["sessionId"]}))
            for _ in range(1000):
                if server.stats()["replayed"] == 1000:
                    break
                await asyncio.sleep(0.005)
            assert server.stats()["replayed"] == 1000
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
        assert server.stats()["disconnects"].get("4001") is None

    run(main())


# === Limits: connections, origins ===================================================================


def test_connection_limit_503_at_handshake(server_factory, wsclient):
    """With max_connections=2, a third WebSocket handshake gets 503 (with Retry-After) and the others still work; after one closes, a new one is accepted."""
    server = server_factory(max_connections=2)

    async def main():
        a = await wsclient.connect(server.ws_url(), ping_interval=None)
        b = await wsclient.connect(server.ws_url(), ping_interval=None)
        with RawClient(server.port) as third:
            response = third.handshake(expect=503)
            assert response.headers.get("retry-after") == "1"
        with pytest.raises(wsclient.InvalidStatus) as info:
            await wsclient.connect(server.ws_url(), ping_interval=None)
        assert info.value.response.status_code == 503
        assert http_request(server.url("/healthz")).status == 200  # plain HTTP is not limited
        await pong_check(a, "still-served")
        await a.close()
        wait_until(lambda: server.stats()["connections"] == 1, what="a connection to close")
        async with wsclient.connect(server.ws_url(), ping_interval=None) as c:
            await setup(c, "carol")
        await b.close()

    run(main())


@pytest.mark.parametrize("origin, status", [("Origin: http://evil", 403), ("Origin: http://good", 101), (None, 101)])
def test_allowed_origins(server_factory, origin, status):
    """With allowed_origins=("http://good",), another Origin gets 403; http://good and no Origin are accepted."""
    server = server_factory(allowed_origins=("http://good",))
    with RawClient(server.port) as raw:
        raw.handshake("/ws", *([origin] if origin else []), expect=status)
        if status == 101:
            raw.setup("alice")


# === Shutdown =======================================================================================


def test_graceful_shutdown_closes_everyone_with_1001(server_factory, wsclient):
    """server.close() sends 1001 to every client (set up or not, /ws, sub-socket and raw), stops listening and leaves no connection behind."""
    server = server_factory()

    async def main():
        clients = [await wsclient.connect(server.ws_url(), ping_interval=None) for _ in range(3)]
        for i, ws in enumerate(clients):
            await setup(ws, f"u{i}", topics=["t"])
            await recv_json(ws)
        clients.append(await wsclient.connect(server.ws_url(), ping_interval=None))  # not even set up
        clients.append(await wsclient.connect(server.ws_url("/ws/sub/t"), ping_interval=None))  # a sub-socket
        raw = RawClient(server.port, timeout=10)
        raw.handshake()
        raw.setup("raw")

        def raw_answers_close() -> int:
            frame = raw.recv_frame()
            assert frame.opcode == ms.Opcode.CLOSE
            raw.send(masked(ms.Opcode.CLOSE, frame.payload))
            return ms.parse_close(frame.payload)[0]

        _, raw_code = await asyncio.gather(asyncio.to_thread(server.wait, server.server.close()), asyncio.to_thread(raw_answers_close))
        assert raw_code == 1001
        for ws in clients:
            await asyncio.wait_for(ws.wait_closed(), 10)
            assert ws.close_code == 1001
        raw.close()
        assert server.open_connections() == 0 and server.stats()["connections"] == 0
        assert server.stats()["disconnects"] == {"1001": 6}
        with pytest.raises(OSError):
            await wsclient.connect(server.ws_url(), ping_interval=None, open_timeout=2)  # no longer listening

    run(main())


def test_shutdown_drops_peers_that_do_not_close_within_the_grace(server_factory, wsclient):
    """Server.close() sends 1001 to everyone and, after shutdown_grace (real time), drops a peer that never answers."""
    server = server_factory(shutdown_grace=0.5, close_timeout=60)
    raw = RawClient(server.port, timeout=10)
    raw.handshake()
    raw.setup("alice")

    async def main():
        async with wsclient.connect(server.ws_url()) as polite:
            await setup(polite, "bob")
            await asyncio.to_thread(server.wait, server.server.close(), 10)  # returns although `raw` never answers
            assert polite.close_code == 1001

    run(main())
    assert raw.recv_close() == 1001
    assert raw.at_eof() and server.open_connections() == 0
    raw.close()


# === TLS ============================================================================================


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


def test_tls_wss_and_https(server_factory, wsclient, certificate):
    """With certfile and keyfile, the port serves wss:// (setup and a publish round trip) and https:// (/healthz, /stats), and plain HTTP gets no answer."""
    certfile, keyfile = certificate
    context = ssl.create_default_context(cafile=certfile)  # trusts only this certificate; checks the IP
    server = server_factory(certfile=certfile, keyfile=keyfile)
    assert server.server.url.startswith("https://")

    async def main():
        async with wsclient.connect(f"wss://127.0.0.1:{server.port}/ws", ssl=context, ping_interval=None) as ws:
            await setup(ws, "alice", topics=["secure"])
            assert (await recv_json(ws))["type"] == "subscribed"
            await ws.send(json.dumps({"type": "publish", "topic": "secure", "messageId": "s1", "payload": {"x": 1}}))
            replies = [await recv_json(ws), await recv_json(ws)]
            (msg,) = [r for r in replies if r["type"] == "message"]
            assert (msg["seqNo"], msg["data"]) == (1, {"x": 1})
            assert [r for r in replies if r["type"] == "ack"] == [{"type": "ack", "messageId": "s1", "status": "ok", "seqNo": 1}]

    run(main())
    https = f"https://127.0.0.1:{server.port}"
    assert http_request(https + "/healthz", context=context)[::2] == (200, b"ok\n")
    status, _, body = http_request(https + "/stats", context=context)
    assert status == 200 and json.loads(body)["published"] == 1
    with RawClient(server.port) as raw:  # plain text on the TLS port gets no HTTP answer
        raw.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.at_eof() and b"200 OK" not in raw.buffer


# === Metrics over HTTP ==============================================================================


def test_metrics_prometheus_format_and_values(server_factory, wsclient):
    """/metrics parses with prometheus_client and counts connections, messages, errors, disconnects and both latencies."""
    parser = pytest.importorskip("prometheus_client.parser", reason="the /metrics format check needs prometheus_client")
    server = server_factory()

    async def main():
        async with wsclient.connect(server.ws_url(), ping_interval=None) as alice:
            await setup(alice, "alice", topics=["t", "u"])
            await recv_json(alice), await recv_json(alice)
            for i in (1, 2, 3):
                await alice.send(json.dumps({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i}))
                assert sorted([(await recv_json(alice))["type"], (await recv_json(alice))["type"]]) == ["ack", "message"]
                await alice.send(json.dumps({"type": "ack", "topic": "t", "seqNo": i}))
            assert (await request(alice, {"type": "publish", "topic": "t", "messageId": "m1"}))["status"] == "duplicate"
            assert (await request(alice, {"type": "subscribe", "topic": "bad topic"}))["code"] == "INVALID_TOPIC"
            assert (await request(alice, {"type": "nope"}))["code"] == "UNKNOWN_TYPE"
            assert (await request(alice, {"type": "subscribe", "topic": "bad topic"}))["code"] == "INVALID_TOPIC"
            await alice.send(json.dumps({"type": "replay", "topic": "t", "fromSeq": 2}))
            assert [(await recv_json(alice))["type"] for _ in range(3)] == ["message", "message", "replayed"]
            async with wsclient.connect(server.ws_url(), ping_interval=None) as bob:  # closes normally: 1000
                await setup(bob, "bob", topics=["t"])
            wait_until(lambda: server.stats()["disconnects"].get("1000") == 1, what="bob's close to be counted")
            return http_request(server.url("/metrics")), http_request(server.url("/stats")).json()

    (status, headers, body), stats = run(main())
    text = body.decode()
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


# === Robustness: churn and killed clients ===========================================================

# The churning client runs in a process of its own, so that the server (in this process) is
# measured alone and the two do not share one interpreter lock.
_CHURN_CLIENT = r"""
import asyncio, base64, os, sys
port, total, batch = map(int, sys.argv[1:4])
setup, close = bytes.fromhex(sys.argv[4]), bytes.fromhex(sys.argv[5])

async def one():
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode() + setup)
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        data = b""
        while data.count(b'"type"') < 3:  # ready, subscribed t, subscribed u
            chunk = await reader.read(4096)
            assert chunk, data
            data += chunk
        writer.write(close)
        rest = await reader.read()  # the echoed close, then EOF: the server closes TCP first
        assert rest[:4] == b"\x88\x02\x03\xe8", rest  # close 1000, unmasked
    finally:
        writer.close()

async def main():
    for _ in range(0, total, batch):
        await asyncio.gather(*(one() for _ in range(batch)))

asyncio.run(main())
"""


def _churn(port: int, total: int, batch: int = 200) -> None:
    """`total` connections, `batch` at a time, each: handshake and setup in one write, ready + 2 subscribed, close, EOF."""
    setup = masked(ms.Opcode.TEXT, b'{"type":"setup","token":"churn","topics":["t","u"]}')
    close = masked(ms.Opcode.CLOSE, ms.serialize_close(1000))
    subprocess.run([sys.executable, "-c", _CHURN_CLIENT, str(port), str(total), str(batch), setup.hex(), close.hex()],
                   check=True, timeout=50)


@pytest.mark.slow
def test_churn_10000_connections_leaves_stats_at_zero_and_memory_flat(server_factory):
    """10,000 connections (200 at a time) open, set up and close; /stats returns to 0 and memory grows < 1 MiB."""
    server = server_factory(session_ttl=0)  # sessions would be kept for their TTL otherwise
    _churn(server.port, 1000)  # warm-up: caches, free lists, the loop's own structures
    wait_until(lambda: server.open_connections() == 0, what="warm-up connections to go")
    gc.collect()
    tracemalloc.start()
    try:
        _churn(server.port, 9000)
        wait_until(lambda: server.open_connections() == 0, what="churned connections to go")
        server.call(gc.collect)
        grown = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    stats = http_request(server.url("/stats")).json()
    assert (stats["connections"], stats["topics"], stats["subscriptions"], stats["sessions"]) == (0, 0, 0, 0)
    assert stats["disconnects"] == {"1000": 10_000}
    # Bound: < 1 MiB for 9,000 connections, about 116 bytes each: less than one leaked
    # connection object, session or subscription per connection (each is bigger than that).
    assert grown < 1 << 20, f"memory grew by {grown} bytes over 9,000 connections"


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_clients_killed_mid_frame_and_mid_handshake_leave_no_state(server_factory, reset):
    """Clients killed mid-frame, mid-handshake, before setup and mid-close leave connections and subscriptions at 0, their sessions resumable."""
    server = server_factory()

    def kill(raw: RawClient) -> None:
        raw.reset() if reset else raw.close()

    sessions = []
    for cut in (1, 2, 5, 7, 60):  # mid-frame: a subscribed client sends part of a frame, then dies
        raw = RawClient(server.port)
        raw.handshake()
        sessions.append(raw.setup("alice", topics=["t", f"own{cut}"])["sessionId"])
        frame = masked(ms.Opcode.TEXT, json.dumps({"type": "publish", "topic": "t", "messageId": "x", "payload": "y" * 100}).encode())
        raw.send(frame[:cut])
        kill(raw)
    for part in (b"GET", b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr", b"GET /ws HTTP/1.1\r\n"):  # mid-handshake
        raw = RawClient(server.port)
        raw.send(part)
        kill(raw)
    raw = RawClient(server.port)  # after the 101, before setup
    raw.handshake()
    kill(raw)
    raw = RawClient(server.port)  # half a close frame
    raw.handshake()
    raw.setup("bob", topics=["t"])
    raw.send(masked(ms.Opcode.CLOSE, ms.serialize_close(1000))[:3])
    kill(raw)
    server.publish("t", "to nobody")  # a write to dead connections must not revive anything
    wait_until(lambda: server.open_connections() == 0, what="every killed connection to be dropped")
    stats = http_request(server.url("/stats")).json()
    assert (stats["connections"], stats["topics"], stats["subscriptions"]) == (0, 0, 0)
    assert stats["disconnects"] == {"1006": 7} and stats["sessions"] == 6
    with RawClient(server.port) as again:  # resumable: detached, not attached to a dead connection
        again.handshake()
        again.setup("alice")
        again.send_json({"type": "resume", "sessionId": sessions[0]})
        replies = [again.recv_json(), again.recv_json()]
        assert [r["type"] for r in replies] == ["message", "resumed"] and replies[0]["data"] == "to nobody"


def test_pipelined_requests_of_a_client_that_does_not_read_are_answered_as_it_reads(server_factory):
    """20,000 pipelined GET /docs from a client that never reads do not queue 1 GB of answers: the
    server stops at MAX_HTTP_UNSENT unsent (plus one answer), and serves the rest as the client reads."""
    server = server_factory()
    request = b"GET /docs HTTP/1.1\r\nHost: x\r\n\r\n"
    page = len(http_request(server.url("/docs")).body)
    with RawClient(server.port, rcvbuf=4096) as c:
        c.sock.setblocking(False)
        sent = 0
        try:
            for _ in range(20_000):
                c.sock.send(request)
                sent += 1
        except BlockingIOError:
            pass  # the server stopped reading: TCP pushes back on the client
        c.sock.settimeout(5)
        server.sync()
        unsent = server.call(lambda: max(conn.transport.get_write_buffer_size() for conn in server.server.connections))
        assert unsent <= ms.MAX_HTTP_UNSENT + page + 4096, unsent
        assert sent < 20_000 or unsent < 10 * (ms.MAX_HTTP_UNSENT + page)
        # Reading drains it, and the server goes on answering in order.
        for _ in range(20):
            assert c.http(b"").status == 200


def test_repeated_replays_from_a_client_that_does_not_read_hold_one_copy(server_factory):
    """24 replays of a 2 MB history in one segment, never read: the server queues about one replay
    (not 24), and the client gets all 24, in order, once it reads."""
    server = server_factory(max_buffer=256 << 10, history_bytes=64 << 20, publish_rate=0)
    for k in range(200):
        server.publish("t", "x" * 10_000)
    with RawClient(server.port, rcvbuf=4096, timeout=20) as c:
        c.handshake()
        c.setup()
        c.send(b"".join(masked(ms.Opcode.TEXT, json.dumps({"type": "replay", "topic": "t", "fromSeq": 1, "id": k}).encode(), mask=os.urandom(4)) for k in range(24)))
        server.sync()
        queued = server.call(lambda: max(conn.backlog() for conn in server.server.connections))
        assert queued < 2 * 2_100_000, queued  # one replay's worth (2 MB), not 24 (48 MB)
        replayed = []
        while len(replayed) < 24:
            msg = c.recv_json()
            if msg["type"] == "replayed":
                replayed.append(msg["id"])
        assert replayed == list(range(24))


def test_bare_tcp_connections_past_max_pending_make_room_for_new_ones(server_factory):
    """Connections that never send a request are bounded by max_pending: past it the one idle longest
    is closed at once, so a fresh client (here /healthz) is still served; WebSocket connections do not count."""
    server = server_factory(max_pending=3)
    with RawClient(server.port) as ws:
        ws.handshake()  # a WebSocket: not pending any more
        bare = [RawClient(server.port) for _ in range(5)]
        try:
            server.sync()
            wait_until(lambda: server.call(lambda: len(server.server.pending)) == 3, what="the pending set to shrink")
            assert [c.at_eof() for c in bare[:2]] == [True, True]  # the two oldest were closed
            assert http_request(server.url("/healthz")).status == 200  # room for a fresh one
            assert ws.setup()["type"] == "ready"
        finally:
            for c in bare:
                c.close()


def test_failed_connections_that_linger_count_against_max_pending(server_factory):
    """A failed WebSocket connection waiting for its client to close counts against max_pending:
    clients that fail (here 1002, an unmasked frame) and never close cannot hold more sockets than
    that; past it the oldest is closed at once, and a fresh client is still served."""
    server = server_factory(max_pending=3)
    failed = []
    try:
        for _ in range(5):
            c = RawClient(server.port)
            c.handshake()
            c.send(ms.serialize_frame(ms.Opcode.TEXT, b"{}"))  # unmasked: 1002
            assert c.recv_close() == 1002
            failed.append(c)
        server.sync()
        assert server.call(lambda: len(server.server.pending)) == 3
        assert server.call(lambda: sum(1 for conn in server.server.connections if conn.ws is not None)) == 3
        assert http_request(server.url("/healthz")).status == 200  # the oldest two were closed to make room
    finally:
        for c in failed:
            c.close()


def test_accept_errors_are_logged_once_per_interval_with_a_count(caplog):
    """A storm of failing accept() calls (EMFILE) is one log line per interval with a count, not a traceback each."""
    clock = FakeClock()
    handler = ms.quiet_accept_errors(clock)
    context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    with caplog.at_level(logging.ERROR, logger="microsocket"):
        for _ in range(50_000):
            handler(None, context)
        clock.advance(ms.ACCEPT_ERROR_INTERVAL)
        handler(None, context)
    lines = [r.getMessage() for r in caplog.records if "accept() failed" in r.getMessage()]
    assert len(lines) == 2 and "failed 1 time" in lines[0] and "failed 50000 time" in lines[1]


def test_long_replay_is_written_as_the_socket_drains(server_factory):
    """A replay of 20 MB of history to a client that does not read is not copied into the socket's
    buffer: the server writes pieces while the socket takes them and keeps the rest as references
    (the stream); a live message published meanwhile queues behind it, and once the client reads,
    everything arrives in order."""
    server = server_factory(max_buffer=1 << 20, history_bytes=64 << 20, publish_rate=0)
    for _ in range(400):
        server.publish("t", "x" * 50_000)
    with RawClient(server.port, rcvbuf=4096, timeout=20) as c:
        c.handshake()
        c.setup(topics=["t"])
        c.send_json({"type": "replay", "topic": "t", "fromSeq": 1})
        server.sync()
        wait_until(lambda: server.call(lambda: any(conn.stream for conn in server.server.connections)), what="the stream")
        unsent, streamed = server.call(lambda: next((conn.transport.get_write_buffer_size(), conn.stream_bytes)
                                                   for conn in server.server.connections if conn.stream))
        assert unsent < 1 << 20 and streamed > 15_000_000, (unsent, streamed)
        server.publish("t", "live")
        seqs = []
        while True:
            msg = c.recv_json()
            if msg["type"] == "message":
                seqs.append(msg["seqNo"])
            if msg["type"] == "message" and msg["data"] == "live":
                break
        assert seqs == list(range(1, 401)) + [401]
        assert server.call(lambda: [conn.stream for conn in server.server.connections]) == [None]


def test_input_is_parsed_a_slice_per_turn_and_none_is_lost(server_factory):
    """Ten slices' worth of pings and publishes in one segment: the connection's input is handled
    FRAMES_PER_TURN frames at a time (reading stops in between), and every answer comes, in order;
    a resume among them (which holds what follows) does not lose or reorder the rest either."""
    server = server_factory(publish_rate=0)
    n = ms.FRAMES_PER_TURN * 10
    with RawClient(server.port, timeout=10) as c:
        c.handshake()
        session = c.setup(topics=["t"])["sessionId"]
        batch = [masked(ms.Opcode.TEXT, json.dumps({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i, "id": i}).encode(), mask=os.urandom(4)) for i in range(n)]
        batch.insert(n // 2, masked(ms.Opcode.TEXT, json.dumps({"type": "resume", "sessionId": session, "id": "r"}).encode(), mask=os.urandom(4)))
        batch.insert(n // 3, masked(ms.Opcode.PING, b"p", mask=os.urandom(4)))
        c.send(b"".join(batch))
        acks, payloads, resumed, pongs = [], [], 0, 0
        while len(acks) < n or len(payloads) < n or not resumed or not pongs:
            frame = c.recv_frame()
            if frame.opcode == ms.Opcode.PONG:
                pongs += 1
                continue
            msg = json.loads(frame.payload)
            if msg["type"] == "ack":
                acks.append(msg["id"])
            elif msg["type"] == "message":
                payloads.append(msg["data"])
            elif msg["type"] == "resumed":
                resumed += 1
        assert acks == list(range(n)) and payloads == list(range(n)) and (resumed, pongs) == (1, 1)


def test_buffer_budget_closes_the_largest_unfinished_message_with_1013(server_factory):
    """Over --max-buffered, the sweep closes the connections holding most until the total fits:
    here the one holding the largest unfinished message, with 1013; smaller holders stay open and
    can finish their messages."""
    server = server_factory(max_buffered=3 << 20)
    clients = [RawClient(server.port, timeout=10) for _ in range(4)]
    try:
        for c, size in zip(clients, (1_000_000, 900_000, 800_000, 700_000)):
            c.handshake()
            c.setup()
            c.send(masked(ms.Opcode.TEXT, b'{"type":"ping","pad":"' + b"x" * size, fin=False, mask=os.urandom(4)))
        wait_until(lambda: server.call(lambda: sum(conn.buffered() for conn in server.server.connections)) >= 3_400_000, what="the messages to be held")
        server.call(server.server.tick)
        assert clients[0].recv_close() == ms.CloseCode.TRY_AGAIN_LATER
        for c in clients[1:]:
            c.send(masked(ms.Opcode.CONT, b'"}', mask=os.urandom(4)))
            assert c.recv_json()["type"] == "pong"
        assert server.call(lambda: server.server.shed) == 1
    finally:
        for c in clients:
            c.close()


def test_buffer_budget_closes_the_largest_unsent_output_with_4001(server_factory):
    """Over --max-buffered because subscribers do not read, the sweep closes the one with most
    unsent output with 4001 and drops what it held (it resumes); a subscriber that reads keeps
    getting everything."""
    server = server_factory(max_buffered=1 << 20, max_buffer=8 << 20, publish_rate=0)
    with RawClient(server.port, rcvbuf=4096, timeout=20) as stuck, RawClient(server.port, timeout=20) as reader:
        for c in (stuck, reader):
            c.handshake()
            c.setup(topics=["t"])
        held = [0]
        for k in range(400):  # until what the kernel takes is full and the server holds the rest
            server.publish("t", "y" * 50_000)
            assert reader.recv_json()["seqNo"] == k + 1
            held = server.call(lambda: sorted(conn.buffered() for conn in server.server.connections))
            if held[-1] > 2 << 20:
                break
        assert held[0] < 100_000 and held[-1] > 2 << 20, held
        server.call(server.server.tick)
        assert server.call(lambda: server.server.shed) == 1
        assert stuck.recv_close() == ms.CloseCode.SLOW_CONSUMER
        server.publish("t", "after")
        assert reader.recv_json()["data"] == "after"


def test_clean_close_keeps_last_handed_so_resume_replays_nothing(server_factory):
    """A client that received seqNo 1-3 (without acking) and closed with a close frame resumes
    from the last seqNo handed to it: `resume` without lastSeqPerTopic replays nothing; a client
    whose TCP connection just dropped gets 1-3 again (last handed is not trusted then)."""
    server = server_factory()
    with RawClient(server.port) as first:
        first.handshake()
        session = first.setup(topics=["clean"])["sessionId"]
        for k in range(3):
            server.publish("clean", k)
        assert [first.recv_json()["seqNo"] for _ in range(3)] == [1, 2, 3]
        first.send(masked(ms.Opcode.CLOSE, ms.serialize_close(1000), mask=os.urandom(4)))
        assert first.recv_close() == 1000
    with RawClient(server.port) as second:
        second.handshake()
        second.setup()
        second.send_json({"type": "resume", "sessionId": session})
        resumed = second.recv_json()
        assert resumed["type"] == "resumed" and resumed["replayed"] == 0, resumed
    with RawClient(server.port) as third:
        third.handshake()
        session = third.setup(topics=["dropped"])["sessionId"]
        for k in range(3):
            server.publish("dropped", k)
        assert [third.recv_json()["seqNo"] for _ in range(3)] == [1, 2, 3]
        third.reset()
    wait_until(lambda: server.call(lambda: server.server.broker.connections) == 0, what="the dropped connection to go")
    with RawClient(server.port) as fourth:
        fourth.handshake()
        fourth.setup()
        fourth.send_json({"type": "resume", "sessionId": session})
        seqs = []
        while (msg := fourth.recv_json())["type"] == "message":
            seqs.append(msg["seqNo"])
        assert msg["type"] == "resumed" and seqs == [1, 2, 3], (msg, seqs)


def test_the_dedup_floor_answers_the_dedup_exchange_as_microsocket_does():
    """bench/peers/dedup_floor.py is what compare runs measure the `dedup` scenario's least cost
    against, so it must do that scenario's work, not less: a sub-socket set up and subscribed, a
    new messageId acked "ok" with the next seqNo and delivered once, a repeat from the same user
    acked "duplicate" with the first seqNo and not delivered, the same id from another user new.
    Fails if the floor skips the lookup, the delivery or the seqNo."""
    import websockets

    floor = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench", "peers", "dedup_floor.py")
    proc = subprocess.Popen([sys.executable, floor, "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline().rsplit(":", 1)[1])

        async def exchange():
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws/sub/dedup") as sub, \
                    websockets.connect(f"ws://127.0.0.1:{port}/ws") as a, websockets.connect(f"ws://127.0.0.1:{port}/ws") as b:
                await sub.send(json.dumps({"type": "setup", "token": "s"}))
                assert [json.loads(await sub.recv())["type"] for _ in range(2)] == ["ready", "subscribed"]
                for ws, user in ((a, "a"), (b, "b")):
                    await ws.send(json.dumps({"type": "setup", "token": user}))
                    assert json.loads(await ws.recv())["userId"] == user
                for mid in ("x", "y", "x"):
                    await a.send(json.dumps({"type": "publish", "topic": "dedup", "messageId": mid, "payload": {"pad": "p" * 200}}))
                acks = [json.loads(await a.recv()) for _ in range(3)]
                await b.send(json.dumps({"type": "publish", "topic": "dedup", "messageId": "x", "payload": {}}))
                ack_b = json.loads(await b.recv())
                got = [json.loads(await sub.recv()) for _ in range(3)]
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(sub.recv(), 0.3)  # the repeat was not delivered
                return acks, ack_b, got

        acks, ack_b, got = asyncio.run(exchange())
        assert [(m["messageId"], m["seqNo"], m["status"]) for m in acks] == [("x", 1, "ok"), ("y", 2, "ok"), ("x", 1, "duplicate")]
        assert (ack_b["seqNo"], ack_b["status"]) == (3, "ok")
        assert [(m["type"], m["userId"], m["messageId"], m["seqNo"]) for m in got] == [
            ("message", "a", "x", 1), ("message", "a", "y", 2), ("message", "b", "x", 3)]
        assert got[0]["data"] == {"pad": "p" * 200}
    finally:
        proc.kill()
        proc.wait()
