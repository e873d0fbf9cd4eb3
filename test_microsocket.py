"""The Micro Socket protocol end to end, black-box: only a URL, the network and the websockets client.

These tests never look inside the server: each gets a base URL from the `live_url` fixture and
talks to it with the `websockets` client and plain HTTP (/stats, /demo/publish, POST /publish).
They are meant to become a conformance kit that can run against another implementation's URL, so
keep them free of in-process internals. Layer by layer tests of microsocket.py itself are in the
other test_*.py files, in the order of its sections (see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import pytest

from conftest import http_request, recv_json, request, run, setup, ws_url

websockets = pytest.importorskip("websockets", reason="the end-to-end tests need the websockets client: pip install websockets")
from websockets.asyncio.client import connect  # noqa: E402


async def get_json(base: str, path: str) -> dict:
    """GET `path` of the server at `base`; the JSON body of a 200."""
    response = await asyncio.to_thread(http_request, base + path)
    assert response.status == 200, response
    return response.json()


async def publish(base: str, topic: str, data, message_id: str, user: str = "feeder") -> dict:
    """POST /publish as `user`; the JSON answer {status, messageId, seqNo}."""
    body = json.dumps({"topic": topic, "messageId": message_id, "data": data}).encode()
    response = await asyncio.to_thread(http_request, base + "/publish", "POST", {"Authorization": f"Bearer {user}"}, body)
    assert response.status == 200, response
    return response.json()


async def pong_check(ws, tag) -> None:
    """The connection still answers: ping with an id gets pong with that id."""
    assert await request(ws, {"type": "ping", "id": tag}) == {"type": "pong", "id": tag}


SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22,}\Z")


def test_e2e_setup_ready_then_subscribed_in_order(live_url):
    """setup with topics gets ready {sessionId, userId, epoch, expiresAt: null} then one subscribed {topic, seqNo, epoch} per topic, in order, each topic's epoch the same for every connection."""

    async def main():
        base = live_url()
        async with connect(ws_url(base)) as ws1, connect(ws_url(base)) as ws2:
            ready = await setup(ws1, "alice", topics=["b", "a", "c"], id="s")
            assert set(ready) == {"type", "sessionId", "userId", "epoch", "expiresAt", "id"}
            assert SESSION_ID.match(ready["sessionId"]) and ready["userId"] == "alice" and ready["id"] == "s"
            assert isinstance(ready["epoch"], str) and ready["epoch"] and ready["expiresAt"] is None
            subs = [await recv_json(ws1) for _ in range(3)]
            epochs = {sub.get("topic"): sub.get("epoch") for sub in subs}
            assert subs == [{"type": "subscribed", "topic": t, "seqNo": 0, "epoch": epochs[t], "id": "s"} for t in ("b", "a", "c")]
            assert all(isinstance(epoch, str) and epoch for epoch in epochs.values()), epochs
            ready2 = await setup(ws2, "alice", topics=["a"])
            assert ready2["sessionId"] != ready["sessionId"] and ready2["epoch"] == ready["epoch"]
            assert await recv_json(ws2) == {"type": "subscribed", "topic": "a", "seqNo": 0, "epoch": epochs["a"]}
            await pong_check(ws1, 1)

    run(main())


def test_e2e_session_ids_unique(live_url):
    """Every connection gets a different sessionId."""

    async def main():
        base = live_url()
        ids = set()
        for _ in range(20):
            async with connect(ws_url(base)) as ws:
                ids.add((await setup(ws))["sessionId"])
        assert len(ids) == 20

    run(main())


def test_e2e_publish_ack_then_message(live_url):
    """A subscribed publisher gets its ack then its own message; another subscriber gets the message."""

    async def main():
        base = live_url()
        async with connect(ws_url(base)) as pub, connect(ws_url(base)) as sub:
            await setup(pub, "p", topics=["t"])
            await recv_json(pub)
            await setup(sub, "s", topics=["t"])
            await recv_json(sub)
            await pub.send(json.dumps({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"v": 1}, "id": 5}))
            message = {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m1", "data": {"v": 1}}
            assert await recv_json(pub) == {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1, "id": 5}
            assert await recv_json(pub) == message
            assert await recv_json(sub) == message

    run(main())


def test_e2e_sub_socket_percent_decoded_and_locked(live_url):
    """/ws/sub/caf%C3%A9 subscribes "café" first after setup, refuses other topics, and may publish."""

    async def main():
        base = live_url()
        async with connect(ws_url(base, "/ws/sub/caf%C3%A9")) as ws:
            await setup(ws, "alice", topics=["café"])
            subscribed = await recv_json(ws)
            epoch = subscribed.get("epoch")
            assert subscribed == {"type": "subscribed", "topic": "café", "seqNo": 0, "epoch": epoch} and isinstance(epoch, str) and epoch
            reply = await request(ws, {"type": "subscribe", "topic": "other", "id": 1})
            assert (reply["type"], reply["code"], reply["topic"], reply["id"]) == ("error", "TOPIC_LOCKED", "other", 1)
            await pong_check(ws, 2)
            await ws.send(json.dumps({"type": "publish", "topic": "café", "messageId": "m"}))
            assert (await recv_json(ws))["type"] == "ack"
            assert (await recv_json(ws))["type"] == "message"
            assert await request(ws, {"type": "subscribe", "topic": "café"}) == {"type": "subscribed", "topic": "café", "seqNo": 1, "epoch": epoch}
        async with connect(ws_url(base, "/ws/sub/a.b")) as ws:
            await setup(ws, "bob", topics=["a.b", "a.b"])
            subscribed = await recv_json(ws)
            assert subscribed == {"type": "subscribed", "topic": "a.b", "seqNo": 0, "epoch": subscribed.get("epoch")}
            await pong_check(ws, 3)  # no second subscribed came first

    run(main())


@pytest.mark.parametrize("path", ["/ws/sub/a%20b", "/ws/sub/%2A", "/ws/sub/%FF", "/ws/sub/a%00b", "/ws/sub/" + "x" * 257])
def test_e2e_sub_socket_invalid_topic_is_400(live_url, path):
    """A sub-socket URL with an invalid (decoded) topic fails the handshake with HTTP 400."""

    async def main():
        base = live_url()
        with pytest.raises(websockets.exceptions.InvalidStatus) as info:
            async with connect(ws_url(base, path)):
                pass
        assert info.value.response.status_code == 400

    run(main())


def test_e2e_every_error_code_keeps_the_connection(live_url):
    """Each applicable error code is provoked over a real connection, and a ping still gets a pong after each."""

    async def main():
        # publish_burst=2 at a negligible rate: the third publish is refused, whatever the timing.
        base = live_url(max_subscriptions=1, history_messages=1, publish_rate=1e-6, publish_burst=2)
        async with connect(ws_url(base)) as ws, connect(ws_url(base, "/ws/sub/locked")) as sub:
            await pong_check(ws, "before-setup")
            steps = [
                ({"type": "subscribe", "topic": "t"}, "AUTH_REQUIRED"),
                ({"type": "setup", "token": ""}, "AUTH_FAILED"),
                ("this is not json", "INVALID_JSON"),
                (b"\x00\x01binary", "INVALID_JSON"),
                ({"type": "dance"}, "UNKNOWN_TYPE"),
                ({"type": "setup", "token": "alice"}, "ready"),
                ({"type": "setup", "token": "alice"}, "ALREADY_SETUP"),
                ({"type": "subscribe"}, "INVALID_MESSAGE"),
                ({"type": "publish", "topic": "t", "messageId": ""}, "INVALID_MESSAGE"),
                ({"type": "subscribe", "topic": "a b"}, "INVALID_TOPIC"),
                ({"type": "subscribe", "topic": "x"}, "subscribed"),
                ({"type": "subscribe", "topic": "y"}, "TOO_MANY_SUBSCRIPTIONS"),
                ({"type": "publish", "topic": "z", "messageId": "z1"}, "ack"),
                ({"type": "publish", "topic": "z", "messageId": "z2"}, "ack"),
                ({"type": "replay", "topic": "z", "fromSeq": 1}, "REPLAY_UNAVAILABLE"),
                ({"type": "replay", "topic": "z", "fromSeq": 2, "epoch": "other"}, "REPLAY_UNAVAILABLE"),
                ({"type": "resume", "sessionId": "unknown"}, "SESSION_EXPIRED"),
                ({"type": "publish", "topic": "z", "messageId": "z3"}, "RATE_LIMITED"),
            ]
            for i, (msg, expected) in enumerate(steps):
                await ws.send(msg if isinstance(msg, (str, bytes)) else json.dumps(msg))
                reply = await recv_json(ws)
                assert reply.get("code", reply["type"]) == expected, (msg, reply)
                await pong_check(ws, i)
            await setup(sub, "bob")
            assert (await recv_json(sub))["topic"] == "locked"
            for msg in ({"type": "subscribe", "topic": "other"}, {"type": "unsubscribe", "topic": "other"}):
                reply = await request(sub, msg)
                assert reply["code"] == "TOPIC_LOCKED", reply
                await pong_check(sub, msg["type"])
            stats = await get_json(base, "/stats")
            assert stats["connections"] == 2

    run(main())


def test_stats_counts_exactly(live_url):
    """/stats counts connections, topics, subscriptions, published, delivered and duplicates, and drops a closed connection at once."""

    async def main():
        base = live_url()
        stats = lambda: get_json(base, "/stats")  # noqa: E731
        got = await stats()
        assert (got["connections"], got["topics"], got["subscriptions"]) == (0, 0, 0)
        async with connect(ws_url(base)) as a, connect(ws_url(base)) as b:
            await setup(a, "alice", topics=["t", "u"])
            await setup(b, "bob", topics=["t"])
            for ws, n in ((a, 2), (b, 1)):
                for _ in range(n):
                    assert (await recv_json(ws))["type"] == "subscribed"
            assert (await publish(base, "t", 1, "m1"))["status"] == "ok"
            assert (await publish(base, "t", 1, "m1"))["status"] == "duplicate"
            for ws in (a, b):
                assert (await recv_json(ws))["seqNo"] == 1
            got = await stats()
            expected = {"connections": 2, "topics": 2, "subscriptions": 3, "published": 1, "delivered": 2, "duplicates": 1}
            assert {k: got[k] for k in expected} == expected
            await a.close()
            got = await stats()
            assert (got["connections"], got["topics"], got["subscriptions"]) == (1, 1, 1)

    run(main())


def test_e2e_ordering_three_publishers_five_subscribers(live_url):
    """3 publishers x 200 concurrent messages: all 5 subscribers see seqNo 1..600 once, in order, identically."""

    async def main():
        base = live_url()
        async with contextlib.AsyncExitStack() as stack:
            subs = [await stack.enter_async_context(connect(ws_url(base))) for _ in range(5)]
            pubs = [await stack.enter_async_context(connect(ws_url(base))) for _ in range(3)]
            for i, ws in enumerate(subs):
                await setup(ws, f"sub{i}", topics=["t"])
                assert (await recv_json(ws))["type"] == "subscribed"
            for i, ws in enumerate(pubs):
                await setup(ws, f"pub{i}")

            async def publisher(i, ws):
                for n in range(200):
                    await ws.send(json.dumps({"type": "publish", "topic": "t", "messageId": f"p{i}-{n}", "payload": n}))
                return [await recv_json(ws, 10) for _ in range(200)]

            async def subscriber(ws):
                return [await recv_json(ws, 10) for _ in range(600)]

            results = await asyncio.gather(*(subscriber(ws) for ws in subs), *(publisher(i, ws) for i, ws in enumerate(pubs)))
            seen, acks = results[:5], results[5:]
            order = [m["messageId"] for m in seen[0]]
            for msgs in seen:
                assert [m["type"] for m in msgs] == ["message"] * 600
                assert [m["seqNo"] for m in msgs] == list(range(1, 601))
                assert [m["messageId"] for m in msgs] == order
            assert sorted(order) == sorted(f"p{i}-{n}" for i in range(3) for n in range(200))
            seq_of = {m["messageId"]: m["seqNo"] for m in seen[0]}
            for i, publisher_acks in enumerate(acks):
                assert [a["messageId"] for a in publisher_acks] == [f"p{i}-{n}" for n in range(200)]
                assert all(a["status"] == "ok" and a["seqNo"] == seq_of[a["messageId"]] for a in publisher_acks)
                mine = [seq_of[f"p{i}-{n}"] for n in range(200)]
                assert mine == sorted(mine)  # one connection's publishes keep their order

    run(main(), timeout=40)


@pytest.mark.slow
def test_e2e_fan_out_to_500_subscribers(live_url):
    """One publish reaches all 500 subscribers; /stats counts them before and shows 0 after they close."""

    async def main():
        base = live_url()
        opened = []

        async def subscriber(i):
            ws = await connect(ws_url(base), open_timeout=20, ping_interval=None)
            opened.append(ws)
            await ws.send(json.dumps({"type": "setup", "token": f"u{i}", "topics": ["fan"]}))
            assert (await recv_json(ws, 20))["type"] == "ready"
            assert (await recv_json(ws, 20))["type"] == "subscribed"
            return ws

        try:
            conns = await asyncio.gather(*(subscriber(i) for i in range(500)))
            stats = await get_json(base, "/stats")
            assert {k: stats[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 500, "topics": 1, "subscriptions": 500}
            result = (await asyncio.to_thread(http_request, base + "/demo/publish/fan?hello=all")).json()
            assert (result["seqNo"], result["subscribers"]) == (1, 500)
            got = await asyncio.gather(*(recv_json(ws, 20) for ws in conns))
            expected = {"type": "message", "topic": "fan", "seqNo": 1, "messageId": result["messageId"], "data": {"hello": "all"}}
            assert all(m == expected for m in got)
            await asyncio.gather(*(ws.close() for ws in conns))
            stats = await get_json(base, "/stats")
            assert {k: stats[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 0, "topics": 0, "subscriptions": 0}
            assert stats["delivered"] == 500
        finally:
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)

    run(main(), timeout=45)


def test_replay_end_to_end(live_url):
    """Over a real connection, replay returns the retained messages in order, then replayed with the topic's epoch; one from before the oldest, or with another epoch, is REPLAY_UNAVAILABLE."""

    async def main():
        base = live_url(history_messages=4)
        for i in range(6):
            await publish(base, "news", {"i": i}, f"n{i}")
        async with connect(ws_url(base), ping_interval=None) as ws:
            await setup(ws, "alice")
            await ws.send(json.dumps({"type": "replay", "topic": "news", "fromSeq": 3, "id": 1}))
            got = [await recv_json(ws) for _ in range(5)]
            assert [(m["seqNo"], m["data"]) for m in got[:4]] == [(n, {"i": n - 1}) for n in (3, 4, 5, 6)]
            epoch = got[4].get("epoch")
            assert got[4] == {"type": "replayed", "topic": "news", "fromSeq": 3, "toSeq": 6, "epoch": epoch, "id": 1}
            error = await request(ws, {"type": "replay", "topic": "news", "fromSeq": 2})
            assert (error["code"], error["oldestSeq"], error["epoch"]) == ("REPLAY_UNAVAILABLE", 3, epoch)
            await ws.send(json.dumps({"type": "replay", "topic": "news", "fromSeq": 6, "epoch": epoch}))
            assert [await recv_json(ws) for _ in range(2)][1] == {"type": "replayed", "topic": "news", "fromSeq": 6, "toSeq": 6, "epoch": epoch}
            error = await request(ws, {"type": "replay", "topic": "news", "fromSeq": 6, "epoch": epoch + "-old"})
            assert (error["code"], error["oldestSeq"], error["epoch"]) == ("REPLAY_UNAVAILABLE", 3, epoch)
            assert (await request(ws, {"type": "ping"}))["type"] == "pong"  # nothing else was sent
            assert await request(ws, {"type": "subscribe", "topic": "news"}) == {"type": "subscribed", "topic": "news", "seqNo": 6, "epoch": epoch}

    run(main())


def test_takeover_end_to_end_closes_old_connection_with_4002(live_url):
    """A websockets client whose session is resumed elsewhere sees close code 4002; the new one gets the messages."""

    async def main():
        base = live_url()
        async with connect(ws_url(base), ping_interval=None) as first, connect(ws_url(base), ping_interval=None) as second:
            ready = await setup(first, "alice", topics=["t"])
            assert (await recv_json(first))["type"] == "subscribed"
            await setup(second, "alice")
            resumed = await request(second, {"type": "resume", "sessionId": ready["sessionId"]})
            assert resumed["type"] == "resumed" and resumed["topics"] == ["t"]
            await asyncio.wait_for(first.wait_closed(), 10)
            assert first.close_code == 4002
            await publish(base, "t", "after", "m")
            msg = await recv_json(second)
            assert (msg["type"], msg["seqNo"], msg["data"]) == ("message", 1, "after")
        for _ in range(200):  # the take-over is counted once its closing handshake is over
            if (await get_json(base, "/stats"))["disconnects"].get("4002") == 1:
                break
            await asyncio.sleep(0.01)
        assert (await get_json(base, "/stats"))["disconnects"].get("4002") == 1

    run(main())
