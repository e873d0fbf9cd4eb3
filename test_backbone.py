"""Sections 12 and 13: the backbone seam, per-topic epochs, and the I/O edges around them.

The broker-level tests here run once per backbone (conftest's BACKBONES): the in-memory one and
the deferred doubles that answer every request in a later turn, with deliveries in the same or in
a turn of their own. What they check is what clients receive, so the same assertions hold for all.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

import microsocket as ms
from conftest import FakeClock, RawClient, assert_error, http_request, recv_json, seqs_of, setup

# -- per-topic epochs (SPEC 1.1): a seqNo is never reused within an epoch


def forget(d, ttl: float, age: float) -> None:
    """Move the driver's clock past max(session TTL, history age) and sweep: idle topics are forgotten."""
    d.clock.advance(max(ttl, age) + 1)
    d.sweep()


def test_forgotten_topic_starts_again_under_a_new_epoch(broker_driver):
    """A topic forgotten while idle restarts at seqNo 1 under a new epoch, and its old epoch is refused by replay."""
    d = broker_driver(session_ttl=5, history_age=5)
    a = d.connect("alice", topics=[])
    first = d.one(a, {"type": "subscribe", "topic": "t"})
    d.server_publish("t", 4)
    assert seqs_of(d.take(a)) == [1, 2, 3, 4]
    d.disconnect(a)
    forget(d, 5, 5)
    b = d.connect("bob")
    again = d.one(b, {"type": "subscribe", "topic": "t"})
    assert again["seqNo"] == 0 and again["epoch"] != first["epoch"]
    d.server_publish("t", 1)
    assert seqs_of(d.take(b)) == [1]
    old = d.one(b, {"type": "replay", "topic": "t", "fromSeq": 1, "epoch": first["epoch"]})
    assert_error(old, "REPLAY_UNAVAILABLE", topic="t", epoch=again["epoch"])
    current = d.send(b, {"type": "replay", "topic": "t", "fromSeq": 1, "epoch": again["epoch"]})
    assert seqs_of(current) == [1] and current[-1]["epoch"] == again["epoch"]


def test_topic_keeps_its_epoch_while_in_use(broker_driver):
    """A topic that keeps a subscriber is never forgotten: its epoch and counter go on across sweeps."""
    d = broker_driver(session_ttl=5, history_age=5)
    a = d.connect("alice")
    first = d.one(a, {"type": "subscribe", "topic": "t"})
    d.server_publish("t", 2)
    forget(d, 5, 5)
    d.server_publish("t", 1)
    assert seqs_of(d.take(a)) == [1, 2, 3]
    b = d.connect("bob")
    assert d.one(b, {"type": "subscribe", "topic": "t"}) == {"type": "subscribed", "topic": "t", "seqNo": 3, "epoch": first["epoch"]}


def test_resume_with_an_old_epoch_replays_the_current_epoch_from_its_start(broker_driver):
    """A resume whose position is in another epoch of the topic gets the whole current epoch, not nothing."""
    d = broker_driver(session_ttl=600, history_age=5)
    a = d.connect("alice", topics=["t"])
    session = d.ready(a)["sessionId"]
    d.server_publish("t", 3)
    d.take(a)
    b = d.connect("alice")
    out = d.send(b, {"type": "resume", "sessionId": session, "lastSeqPerTopic": {"t": 3}, "epochs": {"t": "another-epoch"}})
    assert seqs_of(out) == [1, 2, 3]
    resumed = out[-1]
    assert resumed["type"] == "resumed" and resumed["replayed"] == 3 and resumed["missed"] == []
    assert resumed["epochs"] == {"t": d.one(b, {"type": "subscribe", "topic": "t"})["epoch"]}


def test_epoch_change_under_a_live_feed_is_announced(broker_driver):
    """When deliveries of a received topic arrive under a new epoch, subscribers get an unasked
    `subscribed` naming it before the message, so they drop their old position."""
    d = broker_driver()
    a = d.connect("alice")
    old = d.one(a, {"type": "subscribe", "topic": "t"})
    d.server_publish("t", 2)
    assert seqs_of(d.take(a)) == [1, 2]
    d.broker.deliver("t", "new-epoch", 1, ms.message_frame("t", 1, "m", b"null"), None)
    out = d.take(a)
    assert out == [
        {"type": "subscribed", "topic": "t", "seqNo": 0, "epoch": "new-epoch"},
        {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m", "data": None},
    ]
    assert old["epoch"] != "new-epoch"


def test_epoch_scenario_end_to_end(server_factory, wsclient):
    """Over the network: a client away past forgetting comes back, sees a new epoch in `subscribed`,
    and receives every new message from seqNo 1 (none dropped as already seen)."""
    clock = FakeClock()
    server = server_factory(clock=clock, session_ttl=5, history_age=5)

    async def scenario() -> None:
        async with wsclient.connect(server.ws_url()) as ws:
            await setup(ws)
            first = await request_json(ws, {"type": "subscribe", "topic": "t"})
            for i in range(5):
                await ws.send(json.dumps({"type": "publish", "topic": "t", "messageId": f"a{i}", "payload": i}))
            got = [await recv_json(ws) for _ in range(10)]
            assert [m["seqNo"] for m in got if m["type"] == "message"] == [1, 2, 3, 4, 5]
        clock.advance(11)
        server.tick()
        async with wsclient.connect(server.ws_url()) as ws:
            await setup(ws)
            again = await request_json(ws, {"type": "subscribe", "topic": "t"})
            assert again["seqNo"] == 0 and again["epoch"] != first["epoch"]
            for i in range(3):
                await ws.send(json.dumps({"type": "publish", "topic": "t", "messageId": f"b{i}", "payload": i}))
            got = [await recv_json(ws) for _ in range(6)]
            assert [(m["type"], m["seqNo"]) for m in got] == [
                ("ack", 1), ("message", 1), ("ack", 2), ("message", 2), ("ack", 3), ("message", 3)
            ]

    server.wait(asyncio.sleep(0))  # the server is up
    asyncio.run(asyncio.wait_for(scenario(), 20))


async def request_json(ws, msg: dict) -> dict:
    await ws.send(json.dumps(msg))
    return await recv_json(ws)


# -- the seam: order per connection, whatever turn the backbone answers in


def test_replies_keep_request_order_and_ack_comes_before_own_message(broker_driver):
    """Pipelined requests are answered in their order, and a publish's ack precedes the publisher's own copy."""
    d = broker_driver()
    a = d.connect("alice")
    for i, msg in enumerate([
        {"type": "subscribe", "topic": "t"},
        {"type": "publish", "topic": "t", "messageId": "m1", "payload": 1},
        {"type": "ping"},
        {"type": "presence", "topic": "t"},
        {"type": "replay", "topic": "t", "fromSeq": 1},
    ]):
        d.broker.handle(a, json.dumps({**msg, "id": i}))
    out = d.take(a)
    replies = [(m["type"], m["id"]) for m in out if "id" in m]
    assert replies == [("subscribed", 0), ("ack", 1), ("pong", 2), ("presence", 3), ("replayed", 4)]
    kinds = [m["type"] for m in out]
    assert kinds.index("message") > kinds.index("ack")  # the live copy comes when the fan-out does, never before its ack
    # The replay covers what was live here before it; the rest follows live: seqNo 1 once, plus once if replayed.
    replayed = next(m for m in out if m["type"] == "replayed")
    assert seqs_of(out) == [1] * (1 + replayed["toSeq"])


@pytest.mark.parametrize("split", [False, True])
def test_deferred_backbone_holds_replies_until_it_answers(split):
    """With a backbone that answers in a later turn, nothing after an unanswered reply is sent early,
    and once it answers the order is the order of requests."""
    late: list = []
    config = ms.Config()
    from conftest import DeferredBackbone

    backbone = DeferredBackbone(ms.MemoryBackbone(config), late.append, split)
    broker = ms.Broker(config, backbone)
    a = ms.Peer(broker)
    broker.connect(a)
    broker.handle(a, json.dumps({"type": "setup", "token": "alice", "topics": ["t"], "id": 1}))
    broker.handle(a, json.dumps({"type": "publish", "topic": "t", "messageId": "m", "id": 2}))
    broker.handle(a, json.dumps({"type": "ping", "id": 3}))
    assert a.out == [] and late  # all of it waits behind the unanswered ready
    while late:
        work, late[:] = list(late), []
        for w in work:
            w()
    frames = [json.loads(f.payload) for f in _frames(a.take_output())]
    assert [(m["type"], m["id"]) for m in frames if "id" in m] == [("ready", 1), ("subscribed", 1), ("ack", 2), ("pong", 3)]
    kinds = [m["type"] for m in frames]
    assert kinds.count("message") == 1 and kinds.index("message") > kinds.index("ack")


def _frames(data: bytes) -> list[ms.Frame]:
    frames = []
    while data:
        frame, used = ms.Frame.parse(data)
        frames.append(frame)
        data = data[used:]
    return frames


def test_resume_while_publishes_land_is_exact(broker_driver):
    """Messages published while a resume's steps are still unanswered arrive once each and in
    order: those before it joined live in the replayed gap (counted by `resumed`), the rest live after."""
    d = broker_driver(session_ttl=600)
    a = d.connect("alice", topics=["t"])
    session = d.ready(a)["sessionId"]
    d.server_publish("t", 3)
    d.take(a)
    d.ack(a, "t", 1)
    d.disconnect(a)
    d.server_publish("t", 2)  # 4, 5 while away
    b = d.connect("alice")
    d.broker.handle(b, json.dumps({"type": "resume", "sessionId": session}))
    for k in range(3):  # 6, 7, 8 published before the resume's answers are in (deferred backbones)
        d.broker.publish_checked("pub", "t", f"live-{k}", k, "test", lambda r: None)
    d.broker.handle(b, json.dumps({"type": "ping", "id": "after"}))
    out = d.take(b)
    kinds = [m["type"] for m in out]
    resumed_at = kinds.index("resumed")
    assert seqs_of(out) == [2, 3, 4, 5, 6, 7, 8]
    gap = seqs_of(out[:resumed_at])
    assert gap[:4] == [2, 3, 4, 5] and out[resumed_at]["replayed"] == len(gap) and out[resumed_at]["missed"] == []
    assert out[-1] == {"type": "pong", "id": "after"}


def test_gap_in_deliveries_is_filled_from_history(broker_driver):
    """A delivery lost between backbone and process is read from history before anything later is delivered."""
    d = broker_driver()
    a = d.connect("alice", topics=["t"])
    deliver = d.broker.deliver
    lost = []

    def lossy(topic, epoch, seq, frame, published_at):
        if seq == 2 and not lost:
            lost.append(seq)  # this one never arrives
            return
        deliver(topic, epoch, seq, frame, published_at)

    d.broker.deliver = lossy  # what the backbone calls
    d.server_publish("t", 4)
    assert lost == [2]
    assert seqs_of(d.take(a)) == [1, 2, 3, 4]


def test_gap_history_no_longer_holds_closes_subscribers_to_resume(broker_driver):
    """A lost delivery that history no longer holds is not skipped: the subscriber is closed (1011) to resume."""
    d = broker_driver(history_messages=1)
    a = d.connect("alice", topics=["t"])
    deliver = d.broker.deliver
    d.broker.deliver = lambda topic, epoch, seq, frame, at: None if seq == 1 else deliver(topic, epoch, seq, frame, at)
    d.server_publish("t", 2)
    assert seqs_of(d.take(a)) == []
    assert d.close_requested(a) == ms.CloseCode.INTERNAL_ERROR


# -- the I/O edges


def test_flush_that_raises_does_not_strand_the_others(server_factory, monkeypatch):
    """One connection whose flush raises is dropped; the other connections of that batch still get their frames."""
    server = server_factory()
    with RawClient(server.port) as victim, RawClient(server.port) as other:
        for c in (victim, other):
            c.handshake()
            c.setup(topics=["t"])
        victims = [conn for conn in server.call(lambda: list(server.server.connections)) if conn.transport.get_extra_info("peername")[1] == victim.sock.getsockname()[1]]
        flush = ms.ServerConnection.flush

        def broken(self):
            if self is victims[0]:
                raise RuntimeError("broken transport")
            flush(self)

        monkeypatch.setattr(ms.ServerConnection, "flush", broken)
        server.publish("t", {"n": 1})
        assert other.recv_json()["seqNo"] == 1
        assert victim.at_eof()


def test_expect_100_continue_gets_an_interim_response(server_factory):
    """A POST with Expect: 100-continue gets `100 Continue` before it sends its body, then the answer."""
    server = server_factory()
    body = json.dumps({"topic": "t", "data": 1}).encode()
    with RawClient(server.port) as c:
        c.send(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer alice\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert c.recv_until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        response = c.http(body)
        assert response.status == 200 and response.json()["seqNo"] == 1


@pytest.mark.parametrize("backbone", ["memory", "deferred"])
def test_pipelined_http_publishes_answer_in_order(server_factory, backbone):
    """Pipelined POST /publish requests on one connection are answered in order, also when the backbone answers late."""
    server = server_factory(backbone=backbone)
    requests = b""
    for i in range(5):
        body = json.dumps({"topic": "t", "messageId": f"m{i}", "data": i}).encode()
        requests += b"POST /publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer a\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    requests += b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    with RawClient(server.port) as c:
        c.send(requests)
        answers = [c.http(b"") for _ in range(6)]
    assert [r.json()["messageId"] for r in answers[:5]] == [f"m{i}" for i in range(5)]
    assert [r.json()["seqNo"] for r in answers[:5]] == [1, 2, 3, 4, 5]
    assert answers[5].body == b"ok\n"


@pytest.mark.parametrize("backbone", ["memory", "deferred", "deferred-split"])
def test_embedding_publish_is_awaitable_on_every_backbone(server_factory, backbone):
    """await Server.publish returns the PublishResult with its seqNo, whichever turn the backbone answers in."""
    server = server_factory(backbone=backbone)
    assert [server.publish("t", i).seq_no for i in range(3)] == [1, 2, 3]
    assert server.publish("t", 0, message_id="x").status == "ok"
    assert server.publish("t", 0, message_id="x").status == "duplicate"


def test_subprotocol_is_selected_when_offered(server_factory, wsclient):
    """A client that offers microsocket.v1 gets it selected; one that offers none is accepted without one."""
    server = server_factory()

    async def check() -> None:
        async with wsclient.connect(server.ws_url(), subprotocols=[ms.SUBPROTOCOL]) as ws:
            assert ws.subprotocol == ms.SUBPROTOCOL
            assert (await setup(ws))["type"] == "ready"
        async with wsclient.connect(server.ws_url("/ws/sub/t"), subprotocols=["other", ms.SUBPROTOCOL]) as ws:
            assert ws.subprotocol == ms.SUBPROTOCOL
        async with wsclient.connect(server.ws_url()) as ws:
            assert ws.subprotocol is None

    asyncio.run(asyncio.wait_for(check(), 10))


def test_subprotocol_not_offered_is_not_answered():
    """A handshake offering only other subprotocols gets no Sec-WebSocket-Protocol header (RFC 6455 §4.2.2)."""
    request = ms.parse_request_head(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chat, Microsocket.v1"
    )
    assert ms.select_subprotocol(request) is None  # tokens are case-sensitive
    assert b"Sec-WebSocket-Protocol" not in ms.handshake_response("dGhlIHNhbXBsZSBub25jZQ==", None)


def test_openapi_page_names_its_icon(server_factory):
    """The /openapi page declares an inline icon, so browsers do not ask for /favicon.ico (a 404)."""
    page = http_request(server_factory().url("/openapi")).body.decode()
    assert '<link rel="icon" href="data:,">' in page


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"port": 70000}, "port must be 0 to 65535"),
        ({"max_buffer": -1}, "max-buffer must not be negative"),
        ({"session_ttl": -0.5}, "session-ttl must not be negative"),
        ({"keyfile": "key.pem"}, "--keyfile needs --certfile"),
    ],
)
def test_config_validates_itself(fields, message):
    """An embedding user building Config gets the same refusal as the command line."""
    with pytest.raises(ValueError, match=message):
        ms.Config(**fields)


def test_timers_follow_the_injected_clock(server_factory):
    """The setup timeout fires when the injected clock passes it, with no real time waited."""
    clock = FakeClock()
    server = server_factory(clock=clock, setup_timeout=30)
    with RawClient(server.port) as c:
        c.handshake()
        server.sync()
        server.tick()
        assert c.pending() == b""  # nothing yet: the clock has not moved
        clock.advance(31)
        server.tick()
        assert c.recv_close() == ms.CloseCode.SETUP_TIMEOUT


class _Recording(ms.Peer):
    """A client that records when the broker pauses and restarts its input."""

    __slots__ = ("paused",)

    def pause_input(self, on: bool) -> None:
        self.paused.append(on)


def recording_client(d) -> tuple[ms.Peer, list[bool]]:
    """A connected client set up as alice, and the list its pause_input calls go to."""
    client = _Recording(d.broker)
    client.paused = []
    d.broker.connect(client)
    d.send(client, {"type": "setup", "token": "alice"})
    return client, client.paused


def test_requests_after_a_running_resume_wait_for_it(broker_driver):
    """While a resume waits for the backbone, the connection's input is paused and later requests
    are held; they run, in order, once `resumed` is sent, and input resumes."""
    d = broker_driver(session_ttl=600)
    a = d.connect("alice", topics=["t"])
    session = d.ready(a)["sessionId"]
    d.disconnect(a)
    b, paused = recording_client(d)
    d.broker.handle(b, json.dumps({"type": "resume", "sessionId": session, "id": "r"}))
    d.broker.handle(b, json.dumps({"type": "subscribe", "topic": "u", "id": "s"}))
    d.broker.handle(b, json.dumps({"type": "ping", "id": "p"}))
    deferred = not isinstance(d.backbone, ms.MemoryBackbone)
    assert paused == ([True] if deferred else [])  # the in-memory backbone answers at once: nothing waits
    out = d.take(b)
    assert [(m["type"], m.get("id")) for m in out] == [("resumed", "r"), ("subscribed", "s"), ("pong", "p")]
    assert paused == ([True, False] if deferred else [])


def test_topics_past_the_bound_forget_the_least_recently_used_idle_one(broker_driver):
    """Past max_topics, creating a topic forgets the least recently used topic nobody receives,
    history included; its next use starts again at 1 under a new epoch, while used topics keep theirs."""
    d = broker_driver(max_topics=3)
    a = d.connect("alice")
    for topic in ("t0", "t1", "t2"):
        d.server_publish(topic)
    d.send(a, {"type": "replay", "topic": "t0", "fromSeq": 1})
    e1 = d.send(a, {"type": "replay", "topic": "t1", "fromSeq": 1})[-1]["epoch"]  # uses: t2 is now the oldest idle one
    d.server_publish("t3")
    assert d.stats()["sequenced_topics"] == 3
    again = d.send(a, {"type": "replay", "topic": "t1", "fromSeq": 1})
    assert seqs_of(again) == [1] and again[-1]["epoch"] == e1  # kept
    gone = d.send(a, {"type": "replay", "topic": "t2", "fromSeq": 1})
    assert seqs_of(gone) == [] and gone[-1]["toSeq"] == 0  # forgotten, history too: a new counter at 0
    assert d.stats()["sequenced_topics"] == 3


def test_topics_with_subscribers_are_never_forgotten_for_the_bound(broker_driver):
    """A topic this process receives keeps its counter and epoch however many other topics come and go."""
    d = broker_driver(max_topics=2)
    a = d.connect("alice")
    first = d.one(a, {"type": "subscribe", "topic": "kept"})
    d.server_publish("kept")
    for k in range(10):
        d.server_publish(f"passing-{k}")
    d.server_publish("kept")
    assert seqs_of(d.take(a)) == [1, 2]
    b = d.connect("bob")
    assert d.one(b, {"type": "subscribe", "topic": "kept"})["epoch"] == first["epoch"]
    assert d.stats()["sequenced_topics"] <= 2


def test_replays_wait_while_the_connection_has_not_read_the_last_one(broker_driver):
    """A replay (or resume, or presence) waits while the connection's unread output is over max_buffer,
    with its input paused: one client asking for the same history again and again holds one copy, not many."""
    d = broker_driver(max_buffer=2000)
    a, paused = recording_client(d)
    d.server_publish("t", 3, size=1000)  # about 3 KB of history
    for k in range(3):
        d.broker.handle(a, json.dumps({"type": "replay", "topic": "t", "fromSeq": 1, "id": k}))
    d.settle()
    assert a.backlog() > 3000 and paused == [True]  # the first is answered; the next two wait
    first = d.take(a)
    assert [m.get("id") for m in first if m["type"] == "replayed"] == [0]
    d.broker.run_inbox(a)  # what the I/O layer does once the socket has drained
    second = d.take(a)
    assert [m.get("id") for m in second if m["type"] == "replayed"] == [1] and seqs_of(second) == [1, 2, 3]
    d.broker.run_inbox(a)
    third = d.take(a)
    assert [m.get("id") for m in third if m["type"] == "replayed"] == [2] and paused == [True, False]


def test_sessions_are_costed_by_the_topics_they_keep(broker_driver):
    """Past max_session_topics positions kept by detached sessions in all, the oldest detached session
    is dropped (its resume gets SESSION_EXPIRED) though max_sessions is far away; a newer one stays."""
    d = broker_driver(max_session_topics=5, max_sessions=100, session_ttl=600)
    old = d.connect("alice", topics=["a", "b", "c"])
    new = d.connect("alice", topics=["d", "e", "f"])
    ids = [d.ready(c)["sessionId"] for c in (old, new)]
    d.disconnect(old)
    d.disconnect(new)  # 6 positions kept: over 5, so the oldest session (3 of them) goes
    assert d.stats()["sessions"] == 1
    c = d.connect("alice")
    assert_error(d.send(c, {"type": "resume", "sessionId": ids[0]})[-1], "SESSION_EXPIRED")
    assert d.send(c, {"type": "resume", "sessionId": ids[1]})[-1]["type"] == "resumed"
