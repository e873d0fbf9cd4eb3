"""Section 12 of microsocket.py: the broker, sans-I/O, driven with a fake clock.

Every test drives the broker as the I/O layer does, through BrokerDriver (conftest): messages in
through `handle`, replies read back from the client's outbox, and the numbers of /stats. What a
client receives is the contract; the broker's own tables are not looked at. The property test at
the end runs a model of the SPEC beside the broker and compares the streams each client receives.
"""

from __future__ import annotations

import json
import random

import pytest

import microsocket as ms
from conftest import assert_error, parse_frames, seqs_of


def assert_usable(d, client: ms.Peer) -> None:
    """The client still gets answers after an error."""
    assert d.one(client, {"type": "ping", "id": "still-there"}) == {"type": "pong", "id": "still-there"}


def users_on(d, client: ms.Peer, topic: str) -> list[str]:
    """The users subscribed to `topic`, as a `presence` from `client` reports them."""
    return d.one(client, {"type": "presence", "topic": topic})["users"]


def topic_epoch(d, topic: str) -> str:
    """The topic's epoch now, as the `subscribed` of a probe connection of its own reports it (it unsubscribes at once)."""
    probe = d.connect("epoch-probe")
    subscribed = d.one(probe, {"type": "subscribe", "topic": topic})
    assert d.one(probe, {"type": "unsubscribe", "topic": topic}) == {"type": "unsubscribed", "topic": topic}
    assert isinstance(subscribed["epoch"], str) and subscribed["epoch"], subscribed
    return subscribed["epoch"]


def publish_result(d, user: str, topic: str, message_id: str | None, data) -> ms.PublishResult:
    """What Broker.publish_checked (id prefix "api") hands to its completion, once the backbone has answered."""
    results: list = []
    d.broker.publish_checked(user, topic, message_id, data, "api", results.append)
    d.settle()
    (result,) = results
    return result


# -- setup and authentication


def test_broker_ping_before_setup_is_answered(broker_driver):
    """A ping before setup gets a pong (and leaves the client un-set-up)."""
    d = broker_driver()
    c = d.connect(token=None)
    assert d.one(c, {"type": "ping"}) == {"type": "pong"}
    assert_error(d.one(c, {"type": "subscribe", "topic": "t"}), "AUTH_REQUIRED")  # still not set up


@pytest.mark.parametrize(
    "msg",
    [
        {"type": "subscribe", "topic": "t"},
        {"type": "unsubscribe", "topic": "t"},
        {"type": "publish", "topic": "t", "messageId": "m"},
        {"type": "replay", "topic": "t", "fromSeq": 1},
        {"type": "resume", "sessionId": "s"},
        {"type": "ack", "topic": "t", "seqNo": 1},
        {"type": "refresh", "token": "alice"},
        {"type": "presence", "topic": "t"},
    ],
    ids=lambda m: m["type"],
)
def test_broker_auth_required(broker_driver, msg):
    """Anything but setup or ping before setup is AUTH_REQUIRED (id echoed), and nothing happens."""
    d = broker_driver()
    c = d.connect(token=None)
    assert_error(d.one(c, {**msg, "id": 3}), "AUTH_REQUIRED", id=3)
    assert (d.stats()["subscriptions"], d.stats()["published"]) == (0, 0)
    assert_usable(d, c)
    assert d.one(c, {"type": "setup", "token": "alice"})["type"] == "ready"


@pytest.mark.parametrize("token_fields", [{}, {"token": ""}, {"token": None}, {"token": 5}, {"token": ["alice"]},
                                          {"token": {"sub": "alice"}}, {"token": True}, {"token": "x" * 4097}],
                         ids=["missing", "empty", "null", "number", "list", "object", "bool", "too-long"])
def test_broker_auth_failed(broker_driver, token_fields):
    """setup with a missing, empty, non-string or oversized token is AUTH_FAILED; a later good setup works."""
    d = broker_driver()
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", **token_fields, "id": "s"}), "AUTH_FAILED", field="token", id="s")
    assert_error(d.one(c, {"type": "subscribe", "topic": "t"}), "AUTH_REQUIRED")
    assert_usable(d, c)
    assert d.one(c, {"type": "setup", "token": "alice"})["userId"] == "alice"


def test_token_over_4096_characters_fails_setup(broker_driver):
    """A token over 4096 characters is AUTH_FAILED; one of exactly 4096 is accepted."""
    d = broker_driver()
    client = d.connect(token=None)
    reply = d.send(client, {"type": "setup", "token": "x" * 4097})
    assert reply[0]["code"] == "AUTH_FAILED" and reply[0]["field"] == "token"
    assert d.send(client, {"type": "setup", "token": "x" * 4096})[0]["type"] == "ready"


def test_broker_already_setup(broker_driver):
    """A second setup is ALREADY_SETUP and changes neither the user nor the subscriptions."""
    d = broker_driver()
    c = d.connect("alice", topics=["t"])
    assert_error(d.one(c, {"type": "setup", "token": "bob", "topics": ["u"], "id": 1}), "ALREADY_SETUP", id=1)
    assert (users_on(d, c, "t"), users_on(d, c, "u")) == (["alice"], [])
    assert d.stats()["sessions"] == 1  # no second session either
    assert_usable(d, c)


# -- refused messages: each error code, and the connection goes on


@pytest.mark.parametrize("text", ["not json", "[]", "1", '{"type": "ping", "x": NaN}', "[" * 5000])
def test_broker_invalid_json(broker_driver, text):
    """Text that is not a JSON object is INVALID_JSON; the client still works."""
    d = broker_driver()
    c = d.connect()
    assert_error(d.one(c, text), "INVALID_JSON")
    assert_usable(d, c)


def test_broker_binary_is_invalid_json(broker_driver):
    """A binary message is INVALID_JSON; the client still works."""
    d = broker_driver()
    c = d.connect()
    (msg,) = d.binary(c)
    assert_error(msg, "INVALID_JSON")
    assert_usable(d, c)


@pytest.mark.parametrize("msg", [{}, {"type": 1}, {"type": "nope"}, {"type": "ready"}], ids=repr)
def test_broker_unknown_type(broker_driver, msg):
    """A missing, non-string or unknown type is UNKNOWN_TYPE with field `type`."""
    d = broker_driver()
    c = d.connect()
    assert_error(d.one(c, msg), "UNKNOWN_TYPE", field="type")
    assert_usable(d, c)


@pytest.mark.parametrize("msg", [{"type": "nope", "id": 5}, {"id": "x"}], ids=repr)
def test_broker_unknown_type_echoes_id(broker_driver, msg):
    """The error reply to a message with an unknown type still carries the message's (valid) id."""
    d = broker_driver()
    c = d.connect()
    assert_error(d.one(c, msg), "UNKNOWN_TYPE", id=msg["id"])


@pytest.mark.parametrize(
    "msg, field",
    [
        ({"type": "subscribe"}, "topic"),
        ({"type": "subscribe", "topic": 5}, "topic"),
        ({"type": "subscribe", "topic": None}, "topic"),
        ({"type": "unsubscribe"}, "topic"),
        ({"type": "unsubscribe", "topic": ["t"]}, "topic"),
        ({"type": "presence"}, "topic"),
        ({"type": "publish", "messageId": "m"}, "topic"),
        ({"type": "publish", "topic": "t"}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": ""}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": "x" * 257}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": 5}, "messageId"),
        ({"type": "publish", "topic": "t", "messageId": None}, "messageId"),
        ({"type": "replay", "fromSeq": 1}, "topic"),
        ({"type": "replay", "topic": "t"}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": 0}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": -3}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": "1"}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": True}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": 1.0}, "fromSeq"),
        ({"type": "replay", "topic": "t", "fromSeq": None}, "fromSeq"),
        ({"type": "resume"}, "sessionId"),
        ({"type": "resume", "sessionId": 5}, "sessionId"),
        ({"type": "ack", "topic": "t"}, "seqNo"),
        ({"type": "ack", "topic": "t", "seqNo": "1"}, "seqNo"),
        ({"type": "ack", "topic": "t", "seqNo": True}, "seqNo"),
        ({"type": "ack", "topic": "t", "messageId": ""}, "messageId"),
        ({"type": "ack", "seqNo": 1}, "topic"),
        ({"type": "ping", "id": True}, "id"),
        ({"type": "ping", "id": None}, "id"),
        ({"type": "ping", "id": [1]}, "id"),
        ({"type": "ping", "id": {"a": 1}}, "id"),
    ],
    ids=lambda v: json.dumps(v)[:60] if isinstance(v, dict) else v,
)
def test_broker_invalid_message(broker_driver, msg, field):
    """A missing or mistyped field is INVALID_MESSAGE naming that field; nothing changes; the client works."""
    d = broker_driver()
    c = d.connect()
    assert_error(d.one(c, msg), "INVALID_MESSAGE", field=field)
    assert d.stats()["published"] == 0 and d.stats()["subscriptions"] == 0
    assert_usable(d, c)


def test_broker_invalid_message_carries_topic_and_id(broker_driver):
    """An INVALID_MESSAGE on publish carries the topic it concerns and echoes the id."""
    d = broker_driver()
    c = d.connect()
    assert_error(d.one(c, {"type": "publish", "topic": "t", "messageId": "", "id": "p"}), "INVALID_MESSAGE",
                 field="messageId", topic="t", id="p")


def test_broker_message_id_of_256_chars_is_accepted(broker_driver):
    """A messageId of exactly 256 characters is accepted."""
    d = broker_driver()
    c = d.connect()
    ack = d.one(c, {"type": "publish", "topic": "t", "messageId": "m" * 256})
    assert ack == {"type": "ack", "messageId": "m" * 256, "status": "ok", "seqNo": 1}


def test_broker_setup_topics_must_be_a_list(broker_driver):
    """setup.topics that is not an array is INVALID_MESSAGE with field `topics`; the client stays un-set-up."""
    d = broker_driver()
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", "token": "a", "topics": "t"}), "INVALID_MESSAGE", field="topics")
    assert d.one(c, {"type": "setup", "token": "a"})["type"] == "ready"


@pytest.mark.parametrize("kind", ["subscribe", "unsubscribe", "publish", "replay", "presence", "ack"])
@pytest.mark.parametrize("topic", ["", "a b", "*", "x" * 257, "a\u2028b"], ids=repr)
def test_broker_invalid_topic(broker_driver, kind, topic):
    """An invalid topic in any message is INVALID_TOPIC with field `topic`; the client still works."""
    d = broker_driver()
    c = d.connect()
    msg = {"type": kind, "topic": topic, "messageId": "m", "fromSeq": 1, "seqNo": 1}
    assert_error(d.one(c, msg), "INVALID_TOPIC", field="topic")
    assert d.stats()["published"] == 0 and d.stats()["subscriptions"] == 0
    assert_usable(d, c)


def test_broker_invalid_topic_in_setup_topics(broker_driver):
    """An invalid topic in setup.topics is INVALID_TOPIC (field `topics`) and refuses the whole setup."""
    d = broker_driver()
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", "token": "a", "topics": ["ok", "no way"]}), "INVALID_TOPIC", field="topics")
    assert_error(d.one(c, {"type": "setup", "token": "a", "topics": ["ok", 5]}), "INVALID_MESSAGE", field="topics")
    assert d.stats()["subscriptions"] == 0
    assert [m["type"] for m in d.send(c, {"type": "setup", "token": "a", "topics": ["ok"]})] == ["ready", "subscribed"]


def test_broker_topic_locked_on_sub_socket(broker_driver):
    """A sub-socket may only (un)subscribe its own topic (TOPIC_LOCKED otherwise) but may publish anywhere."""
    d = broker_driver()
    c = d.connect(None, bound_topic="t")
    out = d.send(c, {"type": "setup", "token": "a", "id": 1})
    assert [m["type"] for m in out] == ["ready", "subscribed"]
    epoch = out[1]["epoch"]
    assert out[1] == {"type": "subscribed", "topic": "t", "seqNo": 0, "epoch": epoch, "id": 1}
    assert_error(d.one(c, {"type": "subscribe", "topic": "u", "id": 2}), "TOPIC_LOCKED", topic="u", id=2)
    assert_usable(d, c)
    assert_error(d.one(c, {"type": "unsubscribe", "topic": "u"}), "TOPIC_LOCKED", topic="u")
    assert_usable(d, c)
    assert (users_on(d, c, "t"), users_on(d, c, "u")) == (["a"], [])
    assert d.one(c, {"type": "subscribe", "topic": "t"}) == {"type": "subscribed", "topic": "t", "seqNo": 0, "epoch": epoch}
    assert d.one(c, {"type": "publish", "topic": "u", "messageId": "m"})["status"] == "ok"
    assert d.one(c, {"type": "unsubscribe", "topic": "t"}) == {"type": "unsubscribed", "topic": "t"}
    assert users_on(d, c, "t") == [] and d.stats()["subscriptions"] == 0


def test_broker_topic_locked_in_setup_topics(broker_driver):
    """setup.topics naming another topic on a sub-socket is TOPIC_LOCKED; a corrected setup works."""
    d = broker_driver()
    c = d.connect(None, bound_topic="t")
    assert_error(d.one(c, {"type": "setup", "token": "a", "topics": ["t", "u"]}), "TOPIC_LOCKED", topic="u", field="topics")
    assert d.stats()["subscriptions"] == 0
    out = d.send(c, {"type": "setup", "token": "a", "topics": ["t", "t"]})
    assert [(m["type"], m.get("topic")) for m in out] == [("ready", None), ("subscribed", "t")]


def test_broker_too_many_subscriptions_via_subscribe(broker_driver):
    """Over max_subscriptions, subscribe is TOO_MANY_SUBSCRIPTIONS; re-subscribing a held topic is fine."""
    d = broker_driver(max_subscriptions=2)
    c = d.connect()
    for t in ("a", "b"):
        assert d.one(c, {"type": "subscribe", "topic": t})["type"] == "subscribed"
    assert_error(d.one(c, {"type": "subscribe", "topic": "c", "id": 9}), "TOO_MANY_SUBSCRIPTIONS", topic="c", id=9)
    assert [users_on(d, c, t) for t in "abc"] == [["alice"], ["alice"], []]
    assert_usable(d, c)
    assert d.one(c, {"type": "subscribe", "topic": "a"})["type"] == "subscribed"
    d.one(c, {"type": "unsubscribe", "topic": "a"})
    assert d.one(c, {"type": "subscribe", "topic": "c"})["type"] == "subscribed"
    assert [users_on(d, c, t) for t in "abc"] == [[], ["alice"], ["alice"]]


def test_broker_too_many_subscriptions_via_setup(broker_driver):
    """A setup whose topics go over the limit is refused whole; the client stays un-set-up; a corrected setup works."""
    d = broker_driver(max_subscriptions=2)
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", "token": "a", "topics": ["a", "b", "c"]}), "TOO_MANY_SUBSCRIPTIONS", field="topics")
    assert d.stats()["subscriptions"] == 0
    assert_error(d.one(c, {"type": "subscribe", "topic": "a"}), "AUTH_REQUIRED")
    out = d.send(c, {"type": "setup", "token": "a", "topics": ["a", "b", "a"]})
    assert [m["type"] for m in out] == ["ready", "subscribed", "subscribed"]
    assert [users_on(d, c, t) for t in "abc"] == [["a"], ["a"], []]


def test_broker_too_many_subscriptions_counts_the_bound_topic(broker_driver):
    """On a sub-socket the URL topic counts towards the limit in setup: with a limit of 0 its setup is refused."""
    d = broker_driver(max_subscriptions=0)
    c = d.connect(None, bound_topic="t")
    assert_error(d.one(c, {"type": "setup", "token": "a"}), "TOO_MANY_SUBSCRIPTIONS", field="topics")
    assert_error(d.one(c, {"type": "setup", "token": "a", "topics": ["t"]}), "TOO_MANY_SUBSCRIPTIONS", field="topics")
    assert d.stats()["subscriptions"] == 0
    d = broker_driver(max_subscriptions=1)  # room for exactly the bound topic, named again or not
    for topics in (None, ["t"], ["t", "t"]):
        c = d.connect(None, bound_topic="t")
        out = d.send(c, {"type": "setup", "token": "a", **({"topics": topics} if topics else {})})
        assert [(m["type"], m.get("topic")) for m in out] == [("ready", None), ("subscribed", "t")]


def test_broker_internal_error_is_contained(broker_driver, monkeypatch):
    """An unexpected exception while handling a message becomes INTERNAL_ERROR with the id, and the client still works."""
    d = broker_driver()
    c = d.connect()

    def boom(token):
        raise RuntimeError("secret detail")

    monkeypatch.setattr(ms, "authenticate", boom)  # section 11, which refresh calls
    err = d.one(c, {"type": "refresh", "token": "alice", "id": "x"})
    assert_error(err, "INTERNAL_ERROR", id="x")
    assert "secret" not in json.dumps(err)
    assert d.stats()["errors"]["INTERNAL_ERROR"] == 1
    assert_usable(d, c)


def test_payload_nested_to_the_decoder_limit_is_never_internal_error(broker_driver):
    """A publish whose payload nests at any depth up to past what JSON decoding allows is accepted or refused, never INTERNAL_ERROR, and a refusal publishes and remembers nothing."""
    d = broker_driver()
    client = d.connect()
    outcomes = set()
    for depth in range(1, 1200):
        before = d.stats()
        nested = "[" * depth + "]" * depth
        reply = d.send(client, f'{{"type":"publish","topic":"t","messageId":"d{depth}","payload":{nested}}}')[-1]
        outcomes.add(reply.get("code", reply["type"]))
        if reply["type"] == "error":
            after = d.stats()
            assert (after["published"], after["dedup"]) == (before["published"], before["dedup"]), depth
    assert "INTERNAL_ERROR" not in outcomes and outcomes <= {"ack", "INVALID_MESSAGE", "INVALID_JSON"}
    assert {"ack", "INVALID_JSON"} <= outcomes


# -- ids, subscriptions, publishing and dedup


@pytest.mark.parametrize("msg_id", ["abc", 7, 0, 1.5, ""], ids=repr)
def test_broker_id_echoed_on_every_direct_reply(broker_driver, msg_id):
    """ready, subscribed, unsubscribed, ack, replayed, pong, error, presence and refreshed echo the id; messages do not."""
    d = broker_driver()
    c = d.connect(token=None)
    out = d.send(c, {"type": "setup", "token": "alice", "topics": ["t"], "id": msg_id})
    assert [(m["type"], m["id"]) for m in out] == [("ready", msg_id), ("subscribed", msg_id)]
    checks = [
        ({"type": "subscribe", "topic": "u"}, "subscribed"),
        ({"type": "unsubscribe", "topic": "u"}, "unsubscribed"),
        ({"type": "replay", "topic": "t", "fromSeq": 1}, "replayed"),
        ({"type": "ping"}, "pong"),
        ({"type": "subscribe", "topic": "bad topic"}, "error"),
        ({"type": "presence", "topic": "t"}, "presence"),
        ({"type": "refresh", "token": "alice"}, "refreshed"),
    ]
    for msg, kind in checks:
        reply = d.one(c, {**msg, "id": msg_id})
        assert (reply["type"], reply["id"]) == (kind, msg_id), reply
    published = d.publish(c, "t", "m1", {"k": 1}, id=msg_id)
    ((message,), (ack,)) = ([m for m in published if m["type"] == "message"], [m for m in published if m["type"] == "ack"])
    assert "id" not in message
    assert (ack["type"], ack["id"]) == ("ack", msg_id)
    dup = d.publish(c, "t", "m1", id=msg_id)
    assert dup == [{"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1, "id": msg_id}]


def test_broker_no_id_means_no_id_in_reply(broker_driver):
    """A message without id gets a reply without id."""
    d = broker_driver()
    c = d.connect()
    assert d.one(c, {"type": "ping"}) == {"type": "pong"}
    assert "id" not in d.one(c, {"type": "subscribe", "topic": ""})


def test_broker_subscribe_unsubscribe_idempotent(broker_driver):
    """Subscribing or unsubscribing twice answers both times and changes the store once."""
    d = broker_driver()
    c = d.connect()
    first = d.one(c, {"type": "subscribe", "topic": "t"})
    assert first == {"type": "subscribed", "topic": "t", "seqNo": 0, "epoch": first["epoch"]}
    assert d.one(c, {"type": "subscribe", "topic": "t"}) == first
    assert d.stats()["subscriptions"] == 1
    assert d.one(c, {"type": "unsubscribe", "topic": "t"}) == {"type": "unsubscribed", "topic": "t"}
    assert d.one(c, {"type": "unsubscribe", "topic": "t"}) == {"type": "unsubscribed", "topic": "t"}
    assert d.one(c, {"type": "unsubscribe", "topic": "never"}) == {"type": "unsubscribed", "topic": "never"}
    assert (d.stats()["subscriptions"], d.stats()["topics"]) == (0, 0)


def test_broker_subscribed_seq_is_the_topics_latest(broker_driver):
    """subscribed.seqNo is the topic's latest seqNo (0 if none), in subscribe and in setup."""
    d = broker_driver()
    pub = d.connect("pub")
    for i in range(3):
        d.publish(pub, "t", f"m{i}")
    sub = d.connect("sub")
    assert d.one(sub, {"type": "subscribe", "topic": "t"})["seqNo"] == 3
    assert d.one(sub, {"type": "subscribe", "topic": "fresh"})["seqNo"] == 0
    late = d.connect(None)
    out = d.send(late, {"type": "setup", "token": "late", "topics": ["t", "fresh"]})
    assert [(m.get("topic"), m.get("seqNo")) for m in out[1:]] == [("t", 3), ("fresh", 0)]


def test_broker_duplicate_publish(broker_driver):
    """A repeated messageId gets ack duplicate with the original seqNo, is not delivered and takes no seqNo."""
    d = broker_driver()
    pub = d.connect("pub")
    sub = d.connect("sub", topics=["t"])
    d.take(sub)
    assert d.publish(pub, "t", "m1", "first") == [{"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}]
    assert [m["data"] for m in d.take(sub)] == ["first"]
    d.publish(pub, "t", "m2", "second")
    d.take(sub)
    assert d.publish(pub, "t", "m1", "again") == [{"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}]
    assert d.take(sub) == []
    assert d.publish(pub, "t", "m3")[0]["seqNo"] == 3
    assert [m["seqNo"] for m in d.take(sub)] == [3]
    assert (d.stats()["duplicates"], d.stats()["published"]) == (1, 3)


def test_broker_dedup_is_across_topics_of_one_user(broker_driver):
    """The same user reusing a messageId on another topic is a duplicate, and that topic's counter does not move."""
    d = broker_driver()
    pub = d.connect("pub")
    d.publish(pub, "t", "m1")
    assert d.publish(pub, "u", "m1")[0] == {"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}
    assert d.publish(pub, "u", "m2")[0]["seqNo"] == 1


def test_broker_dedup_is_per_user(broker_driver):
    """Two users publishing the same messageId are both accepted."""
    d = broker_driver()
    alice = d.connect("alice")
    bob = d.connect("bob")
    assert d.publish(alice, "t", "same")[0] == {"type": "ack", "messageId": "same", "status": "ok", "seqNo": 1}
    assert d.publish(bob, "t", "same")[0] == {"type": "ack", "messageId": "same", "status": "ok", "seqNo": 2}


def test_broker_dedup_shared_by_connections_of_one_user(broker_driver):
    """Two connections of one user share the dedup memory."""
    d = broker_driver()
    a1 = d.connect("alice")
    a2 = d.connect("alice")
    d.publish(a1, "t", "m")
    assert d.publish(a2, "t", "m")[0]["status"] == "duplicate"


def test_broker_dedup_window_uses_the_injected_clock(broker_driver):
    """After the dedup window the same messageId is accepted again with a new seqNo."""
    d = broker_driver(dedup_window=60)
    c = d.connect()
    d.publish(c, "t", "m")
    d.clock.advance(59)
    assert d.publish(c, "t", "m")[0]["status"] == "duplicate"
    d.clock.advance(2)
    assert d.publish(c, "t", "m")[0] == {"type": "ack", "messageId": "m", "status": "ok", "seqNo": 2}


def test_broker_publisher_gets_ack_before_own_message(broker_driver):
    """A subscribed publisher receives the ack, then its own message (the ack's place is reserved in request order)."""
    d = broker_driver()
    c = d.connect(topics=["t"])
    out = d.publish(c, "t", "m1", {"x": [1, 2]}, id=1)
    assert out == [
        {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1, "id": 1},
        {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m1", "data": {"x": [1, 2]}},
    ]


@pytest.mark.parametrize("payload", [None, 0, False, "", "text", [1, "a", None], {"nested": {"deep": [True]}}, 1.5, "€\ud800"], ids=repr)
def test_broker_payload_delivered_as_data(broker_driver, payload):
    """The payload arrives unchanged as `data`; an absent payload arrives as null."""
    d = broker_driver()
    pub = d.connect("pub")
    sub = d.connect("sub", topics=["t"])
    d.take(sub)
    msg = {"type": "publish", "topic": "t", "messageId": "m"}
    if payload is not None:
        msg["payload"] = payload
    d.send(pub, msg)
    (message,) = d.take(sub)
    assert message == {"type": "message", "topic": "t", "seqNo": 1, "messageId": "m", "data": payload}


def test_broker_failed_publish_is_not_remembered(broker_driver):
    """A publish refused for validation or before setup does not consume its messageId."""
    d = broker_driver()
    c = d.connect(token=None)
    assert_error(d.publish(c, "t", "m1")[0], "AUTH_REQUIRED")
    d.one(c, {"type": "setup", "token": "alice"})
    assert_error(d.publish(c, "bad topic", "m1")[0], "INVALID_TOPIC")
    assert_error(d.one(c, {"type": "publish", "messageId": "m1"}), "INVALID_MESSAGE")
    assert d.publish(c, "t", "m1")[0] == {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}
    assert d.stats()["dedup"] == {"entries": 1}


def test_rate_limit_token_bucket_and_retry_with_same_message_id(broker_driver):
    """With rate 10/s and burst 5, the 6th immediate publish is RATE_LIMITED and not remembered; a later retry is accepted."""
    d = broker_driver(publish_rate=10, publish_burst=5)
    client = d.connect(topics=["t"])
    for i in range(1, 6):
        replies = d.send(client, {"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": i})
        assert replies[0] == {"type": "ack", "messageId": f"m{i}", "status": "ok", "seqNo": i} and seqs_of(replies) == [i]
    replies = d.send(client, {"type": "publish", "topic": "t", "messageId": "m6", "payload": 6, "id": 9})
    assert len(replies) == 1, replies  # no message frame: nothing was processed
    error = replies[0]
    assert (error["type"], error["code"], error["messageId"], error["topic"], error["id"]) == ("error", "RATE_LIMITED", "m6", "t", 9)
    assert d.stats()["published"] == 5 and d.stats()["dedup"] == {"entries": 5}
    d.clock.advance(0.05)  # half a token: still refused
    assert d.send(client, {"type": "publish", "topic": "t", "messageId": "m6"})[0]["code"] == "RATE_LIMITED"
    d.clock.advance(0.1)
    replies = d.send(client, {"type": "publish", "topic": "t", "messageId": "m6", "payload": 6})
    assert seqs_of(replies) == [6] and replies[0] == {"type": "ack", "messageId": "m6", "status": "ok", "seqNo": 6}
    d.clock.advance(1)
    replies = d.send(client, {"type": "publish", "topic": "t", "messageId": "m6", "payload": 6})
    assert replies == [{"type": "ack", "messageId": "m6", "status": "duplicate", "seqNo": 6}]
    # The bucket is per connection: another connection of the same user has its own.
    other = d.connect()
    d.clock.advance(0)
    for i in range(5):
        assert d.send(other, {"type": "publish", "topic": "u", "messageId": f"o{i}"})[-1]["status"] == "ok"
    assert d.send(client, {"type": "publish", "topic": "t", "messageId": "m7"})[0]["status"] == "ok"


def test_broker_presence_lists_distinct_users(broker_driver):
    """presence lists each subscribed user once, sorted, and follows unsubscribes."""
    d = broker_driver()
    a1 = d.connect("alice", topics=["t"])
    d.connect("alice", topics=["t"])
    bob = d.connect("bob", topics=["t"])
    carol = d.connect("carol")
    assert d.one(carol, {"type": "presence", "topic": "t"}) == {"type": "presence", "topic": "t", "users": ["alice", "bob"], "count": 2}
    d.one(bob, {"type": "unsubscribe", "topic": "t"})
    d.one(a1, {"type": "unsubscribe", "topic": "t"})
    assert d.one(carol, {"type": "presence", "topic": "t"})["users"] == ["alice"]
    assert d.one(carol, {"type": "presence", "topic": "nobody"}) == {"type": "presence", "topic": "nobody", "users": [], "count": 0}


def test_broker_refresh(broker_driver):
    """refresh with the same user's token is refreshed (expiresAt null); another user's or a bad token is AUTH_FAILED."""
    d = broker_driver()
    c = d.connect("alice")
    assert d.one(c, {"type": "refresh", "token": "alice", "id": 1}) == {"type": "refreshed", "expiresAt": None, "id": 1}
    assert_error(d.one(c, {"type": "refresh", "token": "mallory"}), "AUTH_FAILED", field="token")
    assert_error(d.one(c, {"type": "refresh", "token": ""}), "AUTH_FAILED", field="token")
    assert_error(d.one(c, {"type": "refresh"}), "AUTH_FAILED", field="token")
    d.one(c, {"type": "subscribe", "topic": "t"})
    assert users_on(d, c, "t") == ["alice"]  # still alice
    assert_usable(d, c)


def test_broker_client_ack_has_no_reply(broker_driver):
    """A valid client ack (seqNo and/or messageId) is accepted silently."""
    d = broker_driver()
    c = d.connect()
    assert d.send(c, {"type": "ack", "topic": "t", "seqNo": 1}) == []
    assert d.send(c, {"type": "ack", "topic": "t", "messageId": "m"}) == []
    assert d.send(c, {"type": "ack", "topic": "t", "seqNo": 1, "messageId": "m", "id": 3}) == []


# -- replay and history


def test_replay_after_history_count_bound(broker_driver):
    """A topic keeps its last history_messages messages; replay from an evicted seqNo is refused with oldestSeq."""
    d = broker_driver(history_messages=3)
    client = d.connect()
    d.server_publish("t", 5)
    d.server_publish("u", 2)
    assert d.stats()["history"]["messages"] == 5
    assert seqs_of(d.send(client, {"type": "replay", "topic": "u", "fromSeq": 1})) == [1, 2]
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 3})
    assert seqs_of(replies) == [3, 4, 5]
    epoch = topic_epoch(d, "t")
    assert replies[-1] == {"type": "replayed", "topic": "t", "fromSeq": 3, "toSeq": 5, "epoch": epoch}
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 2, "id": 7})
    assert len(replies) == 1, replies
    assert replies[0]["type"] == "error" and replies[0]["code"] == "REPLAY_UNAVAILABLE"
    assert (replies[0]["oldestSeq"], replies[0]["topic"], replies[0]["epoch"], replies[0]["id"]) == (3, "t", epoch, 7)


def test_replay_wrong_epoch_is_unavailable_and_nothing_else(broker_driver):
    """replay with an epoch that is not the topic's (another one, or ready's process epoch) gets REPLAY_UNAVAILABLE
    with oldestSeq and the topic's epoch, and no message frame."""
    d = broker_driver()
    client = d.connect()
    ready = d.ready(client)
    d.server_publish("t", 3)
    epoch = topic_epoch(d, "t")
    for wrong in (epoch + "x", ready["epoch"]):
        replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 1, "epoch": wrong})
        assert len(replies) == 1 and replies[0]["type"] == "error"
        assert (replies[0]["code"], replies[0]["oldestSeq"], replies[0]["topic"], replies[0]["epoch"]) == ("REPLAY_UNAVAILABLE", 1, "t", epoch)
    assert d.stats()["replayed"] == 0


def test_replay_after_history_age_bound(broker_driver):
    """A message older than history_age is dropped: replay then reports the oldest still held, or latest + 1."""
    d = broker_driver(history_age=10)
    client = d.connect()
    d.server_publish("t", 2)
    d.clock.advance(6)
    d.server_publish("t", 1)
    d.clock.advance(5)  # seqNos 1-2 are 11 s old, 3 is 5 s old
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 1})
    assert [(r["type"], r.get("code"), r.get("oldestSeq")) for r in replies] == [("error", "REPLAY_UNAVAILABLE", 3)]
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 3})
    assert seqs_of(replies) == [3] and replies[-1]["type"] == "replayed"
    d.clock.advance(10)  # everything is too old now
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 3})
    assert [(r["type"], r.get("code"), r.get("oldestSeq")) for r in replies] == [("error", "REPLAY_UNAVAILABLE", 4)]
    assert d.stats()["history"] == {"messages": 0, "bytes": 0}


def test_history_total_bytes_bound_across_topics(broker_driver):
    """history_bytes bounds all topics together, and the oldest message of any topic goes first."""
    probe = broker_driver()
    probe.server_publish("a", 1)
    size = probe.stats()["history"]["bytes"]  # every frame below has this size: same topic length, same payload
    d = broker_driver(history_bytes=3 * size)
    client = d.connect()
    for topic in ("a", "b", "a", "b"):  # a1, b1, a2, b2: a1 is the oldest of all
        d.server_publish(topic, 1)
    assert d.stats()["history"] == {"messages": 3, "bytes": 3 * size}
    replies = d.send(client, {"type": "replay", "topic": "a", "fromSeq": 1})
    assert [(r["code"], r["oldestSeq"]) for r in replies] == [("REPLAY_UNAVAILABLE", 2)]
    assert seqs_of(d.send(client, {"type": "replay", "topic": "b", "fromSeq": 1})) == [1, 2]
    d.server_publish("a", 1)  # a3 pushes out b1, now the oldest
    assert [(r["code"], r["oldestSeq"]) for r in d.send(client, {"type": "replay", "topic": "b", "fromSeq": 1})] == [("REPLAY_UNAVAILABLE", 2)]
    assert seqs_of(d.send(client, {"type": "replay", "topic": "a", "fromSeq": 2})) == [2, 3]
    assert d.stats()["history"] == {"messages": 3, "bytes": 3 * size}


def test_replay_sends_range_as_messages_then_replayed(broker_driver):
    """replay in the topic's epoch sends fromSeq..latest as the original message frames, then replayed {topic, fromSeq, toSeq, epoch} with the id."""
    d = broker_driver()
    client = d.connect()
    d.server_publish("t", 5)
    d.server_publish("other", 3)
    epoch = topic_epoch(d, "t")
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 2, "epoch": epoch, "id": "r1"})
    assert [(m["topic"], m["seqNo"], m["messageId"], m["data"]["n"]) for m in replies[:-1]] == [
        ("t", n, f"t-{n}", n) for n in (2, 3, 4, 5)
    ]
    assert all(m["type"] == "message" for m in replies[:-1])
    assert replies[-1] == {"type": "replayed", "topic": "t", "fromSeq": 2, "toSeq": 5, "epoch": epoch, "id": "r1"}
    assert d.stats()["replayed"] == 4
    # Beyond the latest: nothing, and toSeq is the latest.
    assert d.send(client, {"type": "replay", "topic": "t", "fromSeq": 9}) == [
        {"type": "replayed", "topic": "t", "fromSeq": 9, "toSeq": 5, "epoch": epoch}
    ]


def test_broker_replay_edges(broker_driver):
    """Replay of an empty topic or from beyond the latest sends only `replayed` with toSeq the latest."""
    d = broker_driver()
    c = d.connect()
    empty = topic_epoch(d, "empty")
    assert d.one(c, {"type": "replay", "topic": "empty", "fromSeq": 1}) == {"type": "replayed", "topic": "empty", "fromSeq": 1, "toSeq": 0, "epoch": empty}
    d.publish(c, "t", "m1")
    epoch = topic_epoch(d, "t")
    assert d.one(c, {"type": "replay", "topic": "t", "fromSeq": 7}) == {"type": "replayed", "topic": "t", "fromSeq": 7, "toSeq": 1, "epoch": epoch}


def test_replay_huge_from_seq_is_answered_replayed(broker_driver):
    """replay with a huge fromSeq (2**64) beyond the latest sends nothing and answers replayed, as the README says."""
    d = broker_driver()
    client = d.connect()
    d.server_publish("t", 1)
    replies = d.send(client, {"type": "replay", "topic": "t", "fromSeq": 2**64})
    assert replies == [{"type": "replayed", "topic": "t", "fromSeq": 2**64, "toSeq": 1, "epoch": topic_epoch(d, "t")}]


# -- topic counters


def test_idle_topic_counter_is_forgotten_after_session_ttl_and_history_age(broker_driver):
    """A topic with no subscriber, no retained message and no resumable session loses its counter; the next publish starts at 1 under a new epoch."""
    d = broker_driver(session_ttl=60, history_age=30)
    assert d.server_publish("t", 2, user="alice") == [1, 2]
    old = topic_epoch(d, "t")
    d.clock.advance(59)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 1  # past the history age, not yet past the session TTL
    d.clock.advance(2)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 0
    assert d.server_publish("t", 1, user="alice") == [1]
    assert topic_epoch(d, "t") != old  # a position held in the old epoch can tell the sequence restarted


def test_topic_counter_with_subscribers_or_a_resumable_session_is_kept(broker_driver):
    """A subscribed topic keeps its counter and epoch forever; after its last subscriber leaves, for the session TTL at least."""
    d = broker_driver(session_ttl=60, history_age=30)
    client = d.connect("alice", topics=["t"])
    ready = d.ready(client)
    epoch = d.subscribed(client, "t")["epoch"]
    assert d.server_publish("t", 1, user="bob") == [1]
    d.clock.advance(10_000)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 1
    d.disconnect(client)  # the session stays resumable for 60 s and remembers seqNo 1
    d.clock.advance(59)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 1
    again = d.connect("alice")
    replies = d.send(again, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies == [{"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"], "replayed": 0, "missed": [],
                        "epochs": {"t": epoch}}]
    assert d.server_publish("t", 1, user="bob") == [2]  # the sequence went on, in the same epoch


def test_idle_time_starts_when_the_last_subscriber_leaves_and_subscribed_topics_have_a_counter(broker_driver):
    """A subscribed topic has a counter and epoch, published to or not; its idle time starts when its last subscriber leaves, and a forgotten one restarts at 1 under a new epoch."""
    d = broker_driver(session_ttl=60, history_age=30, max_sessions=0)  # no session keeps the topic
    client = d.connect("alice", topics=["quiet", "busy"])
    epochs = {topic: d.subscribed(client, topic)["epoch"] for topic in ("quiet", "busy")}
    assert d.stats()["sequenced_topics"] == 2  # each subscribed topic has its epoch, published to or not
    assert d.server_publish("busy", 1, user="bob") == [1]
    d.clock.advance(100)  # idle time does not run while a subscriber is there
    d.sweep()
    assert d.stats()["sequenced_topics"] == 2
    d.disconnect(client)
    d.clock.advance(59)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 2
    d.clock.advance(2)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 0
    assert d.server_publish("busy", 1, user="bob") == [1]
    again = d.connect("carol", topics=["quiet", "busy"])
    for topic, seq_no in (("quiet", 0), ("busy", 1)):
        subscribed = d.subscribed(again, topic)
        assert subscribed == {"type": "subscribed", "topic": topic, "seqNo": seq_no, "epoch": subscribed["epoch"]}
        assert subscribed["epoch"] != epochs[topic], topic


def test_topic_counter_with_retained_history_is_kept(broker_driver):
    """A counter is not forgotten while history still holds the topic's messages (a replay must stay consistent)."""
    d = broker_driver(session_ttl=10, history_age=100)
    assert d.server_publish("t", 1, user="alice") == [1]
    d.clock.advance(50)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 1 and d.stats()["history"]["messages"] == 1
    d.clock.advance(51)
    d.sweep()
    assert d.stats()["sequenced_topics"] == 0


# -- sessions, resume and take-over


def test_session_outlives_connection_for_ttl_then_expires(broker_driver):
    """A detached session can be resumed until session_ttl has passed; then resume gets SESSION_EXPIRED."""
    d = broker_driver(session_ttl=10)
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.server_publish("t", 2)
    d.disconnect(old)
    d.server_publish("t", 1)
    assert d.stats()["sessions"] == 1
    d.clock.advance(9.5)
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [3]
    assert replies[-1]["type"] == "resumed" and replies[-1]["replayed"] == 1

    other = d.connect(topics=["t"])
    ready2 = d.ready(other)
    d.disconnect(other)
    d.clock.advance(10)
    assert d.stats()["sessions"] == 2  # resumed by `new`, and other's: due, but no sweep yet
    d.sweep()
    assert d.stats()["sessions"] == 1
    late = d.connect()
    replies = d.send(late, {"type": "resume", "sessionId": ready2["sessionId"], "id": 3})
    assert [(r["type"], r["code"], r["id"]) for r in replies] == [("error", "SESSION_EXPIRED", 3)]


def test_session_expires_exactly_at_ttl_without_other_activity(broker_driver):
    """An expired session is refused by resume itself, even if no sweep ran since it expired."""
    d = broker_driver(session_ttl=5)
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.disconnect(old)
    d.clock.advance(5)
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert [r.get("code") for r in replies] == ["SESSION_EXPIRED"]


@pytest.mark.parametrize("who, epoch_suffix", [("mallory", None), ("alice", "-old"), ("alice", "unknown-id")])
def test_resume_refused_is_session_expired_and_changes_nothing(broker_driver, who, epoch_suffix):
    """resume by another user, with a wrong epoch, or of an unknown id is SESSION_EXPIRED (field sessionId, id echoed); the session stays resumable."""
    d = broker_driver()
    old = d.connect("alice", topics=["t"])
    ready = d.ready(old)
    d.disconnect(old)
    d.server_publish("t", 2)
    intruder = d.connect(who)
    intruder_ready = d.ready(intruder)
    msg = {"type": "resume", "sessionId": ready["sessionId"], "id": 4}
    if epoch_suffix == "unknown-id":
        msg["sessionId"] = "no-such-session"
    elif epoch_suffix is not None:
        msg["epoch"] = intruder_ready["epoch"] + epoch_suffix
    (error,) = d.send(intruder, msg)
    assert_error(error, "SESSION_EXPIRED", field="sessionId", id=4)
    assert_usable(d, intruder)
    assert d.stats()["subscriptions"] == 0
    d.server_publish("t", 1)
    assert d.take(intruder) == []  # not subscribed to anything by the refused resume
    owner = d.connect("alice")
    replies = d.send(owner, {"type": "resume", "sessionId": ready["sessionId"], "epoch": ready["epoch"]})
    assert seqs_of(replies) == [1, 2, 3] and replies[-1]["type"] == "resumed"


@pytest.mark.parametrize(
    "given, acked, expected",
    [
        ({"t": 5}, 3, [6, 7, 8]),  # lastSeqPerTopic wins over everything
        (None, 3, [4, 5, 6, 7, 8]),  # else the acknowledged position
        (None, None, [7, 8]),  # else the last seqNo handed to the old connection (6)
    ],
)
def test_resume_position_precedence(broker_driver, given, acked, expected):
    """resume replays after lastSeqPerTopic when given, else after the acked seqNo, else after the last one handed."""
    d = broker_driver()
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    epoch = d.subscribed(old, "t")["epoch"]
    d.server_publish("t", 6)
    assert seqs_of(d.take(old)) == [1, 2, 3, 4, 5, 6]
    if acked is not None:
        assert d.send(old, {"type": "ack", "topic": "t", "seqNo": acked}) == []  # ack has no reply
    d.disconnect(old)
    d.server_publish("t", 2)
    new = d.connect()
    msg = {"type": "resume", "sessionId": ready["sessionId"], "id": "r"}
    if given is not None:
        msg["lastSeqPerTopic"] = given
    replies = d.send(new, msg)
    assert seqs_of(replies) == expected
    assert replies[-1] == {"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"],
                           "replayed": len(expected), "missed": [], "epochs": {"t": epoch}, "id": "r"}


def test_resume_after_unreliable_disconnect_falls_back_to_subscribe_position(broker_driver):
    """After a slow-consumer disconnect the handed position is not trusted: resume replays from where it subscribed."""
    d = broker_driver()
    d.server_publish("t", 2)
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.server_publish("t", 3)
    d.disconnect(old, reliable=False)
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [3, 4, 5]


def test_resumed_reports_missed_when_history_lost_the_gap(broker_driver):
    """When history no longer holds the gap, resumed lists {topic, fromSeq, oldestSeq} and replays what is left."""
    d = broker_driver(history_messages=3)
    old = d.connect(topics=["t", "u"])
    ready = d.ready(old)
    d.server_publish("t", 2)
    d.server_publish("u", 1)
    d.take(old)
    d.disconnect(old)
    d.server_publish("t", 6)  # 3..8; history keeps 6..8
    d.server_publish("u", 1)  # 2; nothing missed on u
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies, "t") == [6, 7, 8] and seqs_of(replies, "u") == [2]
    resumed = replies[-1]
    assert resumed["type"] == "resumed" and sorted(resumed["topics"]) == ["t", "u"] and resumed["replayed"] == 4
    assert resumed["missed"] == [{"topic": "t", "fromSeq": 3, "oldestSeq": 6}]


def test_resume_with_nothing_retained_reports_latest_plus_one(broker_driver):
    """With history off, the whole gap is missed and oldestSeq is latest + 1."""
    d = broker_driver(history_messages=0)
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.disconnect(old)
    d.server_publish("t", 4)
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies == [{"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"], "replayed": 0,
                        "missed": [{"topic": "t", "fromSeq": 1, "oldestSeq": 5}], "epochs": {"t": d.subscribed(old, "t")["epoch"]}}]


def test_live_delivery_continues_after_resumed(broker_driver):
    """After resumed, new messages of the session's topics reach the new connection live, once."""
    d = broker_driver()
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.disconnect(old)
    d.server_publish("t", 2)
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [1, 2]
    d.server_publish("t", 2)
    assert seqs_of(d.take(new)) == [3, 4]
    assert users_on(d, new, "t") == ["alice"] and d.stats()["subscriptions"] == 1
    # The new connection's own session from its setup was replaced by the resumed one.
    assert d.stats()["sessions"] == 1


def test_resume_on_a_connection_already_subscribed_replays_only_before_its_subscription(broker_driver):
    """For a topic the new connection already receives live, resume replays only what came before that subscription."""
    d = broker_driver()
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.server_publish("t", 1)
    d.take(old)
    d.disconnect(old)
    d.server_publish("t", 2)  # 2, 3: missed
    new = d.connect(topics=["t"])  # subscribed at 3
    d.server_publish("t", 1)  # 4: live on the new connection
    assert seqs_of(d.take(new)) == [4]
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [2, 3]
    d.server_publish("t", 1)
    assert seqs_of(d.take(new)) == [5]


def test_resume_gap_starting_at_oldest_retained_is_not_missed(broker_driver):
    """When history still holds the first seqNo of the gap (fromSeq == oldestSeq), nothing is reported missed."""
    d = broker_driver(history_messages=3)
    old = d.connect(topics=["t"])
    ready = d.ready(old)
    d.server_publish("t", 2)
    d.take(old)
    d.disconnect(old)
    d.server_publish("t", 3)  # 3..5; history keeps 3..5: the gap exactly
    new = d.connect()
    replies = d.send(new, {"type": "resume", "sessionId": ready["sessionId"]})
    assert seqs_of(replies) == [3, 4, 5] and replies[-1]["missed"] == []


def test_resume_of_own_attached_session_replays_nothing_already_received(broker_driver):
    """resume of the session this very connection holds sends nothing it already received live."""
    d = broker_driver()
    client = d.connect(topics=["t"])
    ready = d.ready(client)
    d.server_publish("t", 3)
    assert seqs_of(d.take(client)) == [1, 2, 3]
    replies = d.send(client, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies == [{"type": "resumed", "sessionId": ready["sessionId"], "topics": ["t"], "replayed": 0, "missed": [],
                        "epochs": {"t": d.subscribed(client, "t")["epoch"]}}]
    d.server_publish("t", 1)
    assert seqs_of(d.take(client)) == [4] and d.stats()["sessions"] == 1


def test_max_sessions_drops_the_oldest_detached_session(broker_driver):
    """With max_sessions=2, a third detached session pushes out the oldest, whose resume is then SESSION_EXPIRED."""
    d = broker_driver(max_sessions=2)
    ids = []
    for _ in range(3):
        client = d.connect(topics=["t"])
        ready = d.ready(client)
        ids.append(ready["sessionId"])
        d.clock.advance(1)
        d.disconnect(client)
    assert d.stats()["sessions"] == 2
    new = d.connect()
    assert [r.get("code") for r in d.send(new, {"type": "resume", "sessionId": ids[0]})] == ["SESSION_EXPIRED"]
    assert d.send(new, {"type": "resume", "sessionId": ids[1]})[-1]["type"] == "resumed"


def test_takeover_in_broker(broker_driver):
    """resume of a session attached to another live connection detaches that one and asks for close 4002."""
    d = broker_driver()
    first = d.connect(topics=["t"])
    ready = d.ready(first)
    second = d.connect()
    replies = d.send(second, {"type": "resume", "sessionId": ready["sessionId"]})
    assert replies[-1]["type"] == "resumed"
    assert d.close_requested(first) == ms.CloseCode.SESSION_TAKEN_OVER and not d.connected(first)
    d.server_publish("t", 1)
    assert seqs_of(d.take(second)) == [1] and d.take(first) == []
    assert d.stats()["connections"] == 1 and d.stats()["subscriptions"] == 1


# -- counters and latency (/stats, /metrics)


def test_broker_stats_exact(broker_driver):
    """stats() counts connections, topics, subscriptions, published, delivered and duplicates exactly."""
    d = broker_driver()
    a = d.connect("a", topics=["t1", "t2"])
    b = d.connect("b", topics=["t1"])
    c = d.connect("c")
    assert {k: d.stats()[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 3, "topics": 2, "subscriptions": 3}
    d.publish(c, "t1", "m1")  # to a and b
    d.publish(c, "t2", "m2")  # to a
    d.publish(c, "t3", "m3")  # to nobody
    d.publish(c, "t1", "m1")  # duplicate
    d.publish(a, "t1", "m1")  # another user: delivered to a and b
    d.take(b)
    d.one(b, {"type": "subscribe", "topic": "t1"})  # idempotent: no change
    stats = d.stats()
    assert {k: stats[k] for k in ("connections", "topics", "subscriptions", "published", "delivered", "duplicates")} == {
        "connections": 3, "topics": 2, "subscriptions": 3, "published": 4, "delivered": 5, "duplicates": 1,
    }
    d.disconnect(b)
    assert {k: d.stats()[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 2, "topics": 2, "subscriptions": 2}
    d.disconnect(a)
    d.disconnect(a)  # twice is harmless
    assert {k: d.stats()[k] for k in ("connections", "topics", "subscriptions")} == {"connections": 1, "topics": 0, "subscriptions": 0}


def test_broker_disconnect_removes_everything(broker_driver):
    """disconnect removes all of a client's subscriptions, empties its topics, and later publishes reach nobody."""
    d = broker_driver()
    c = d.connect(topics=["a", "b", "c"])
    other = d.connect("o")
    d.disconnect(c)
    assert (d.stats()["topics"], d.stats()["subscriptions"]) == (0, 0)
    assert users_on(d, other, "a") == []
    assert d.publish(other, "a", "m")[0]["seqNo"] == 1
    assert d.stats()["delivered"] == 0 and d.take(c) == []


def test_broker_publish_api_result(broker_driver):
    """Broker.publish_checked hands its completion a PublishResult with status, messageId (generated from the prefix when None), seqNo and subscriber count; a refused check raises."""
    d = broker_driver()
    d.connect("s1", topics=["t"])
    d.connect("s2", topics=["t"])
    assert publish_result(d, "u", "t", "m", {"a": 1}) == ms.PublishResult("ok", "m", 1, 2)
    assert publish_result(d, "u", "t", "m", {"a": 1}) == ms.PublishResult("duplicate", "m", 1, 0)
    assert publish_result(d, "u", "empty", "m2", None) == ms.PublishResult("ok", "m2", 1, 0)
    generated = publish_result(d, "u", "t", None, 3)
    assert (generated.status, generated.seq_no, generated.subscribers) == ("ok", 2, 2) and generated.message_id.startswith("api-")
    for topic, message_id, code in (("bad topic", "m3", "INVALID_TOPIC"), ("t", "", "INVALID_MESSAGE"), ("t", "x" * 257, "INVALID_MESSAGE")):
        with pytest.raises(ms.ClientError) as info:
            d.broker.publish_checked("u", topic, message_id, None, "api", lambda result: pytest.fail(f"answered {result}"))
        assert info.value.code == code
    d.settle()
    assert d.stats()["published"] == 3 and d.stats()["duplicates"] == 1


def test_metrics_latency_histograms_are_bounded_and_percentiles_sane(broker_driver):
    """The latency histograms keep fixed buckets however many observations, and percentiles follow the data."""
    d = broker_driver()
    client = d.connect(topics=["t"])
    for i in range(2000):
        d.server_publish("t", user="p")
        d.clock.advance(0.002 if i % 10 else 0.2)  # 90 % take 2 ms, 10 % take 200 ms
        d.flushed()
        d.take(client)
    summary = d.stats()["latency"]["delivery"]
    buckets = [line for line in d.broker.metrics().splitlines() if line.startswith("microsocket_delivery_latency_seconds_bucket")]
    assert summary["count"] == 2000 and len(buckets) == len(ms.Histogram.BOUNDS) + 1
    assert 1 <= summary["p50_ms"] <= 2.5 and 100 <= summary["p99_ms"] <= 250
    assert d.stats()["latency"]["ack"] == {"count": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None}


# -- the property test: a model of the SPEC beside the broker
#
# It runs a reference model beside a real sans-I/O Broker and compares, after every step, every
# frame each fake connection received and the numbers of /stats. The model is written from the
# SPEC and README (positions, history bounds, take-over, TTL), not from the code's data structures.

PROP_TOPICS = ("a", "b", "c")
PROP_USERS = ("u0", "u1")
PROP_SLOTS = 4
PROP_TTL = 5


class BrokerModel:
    """A fake-clock Broker, up to PROP_SLOTS fake connections, and what the SPEC says each should see."""

    def __init__(self, broker_driver, history: int) -> None:
        self.d = broker_driver(
            history_messages=history, history_age=1e9, dedup_window=1e9, publish_rate=0, session_ttl=PROP_TTL
        )
        self.clock = self.d.clock
        self.epoch: str | None = None  # the epoch of the first ready: every later one must be the same
        self.history = history
        self.slots: list[dict | None] = [None] * PROP_SLOTS  # {"client", "user", "session", "topics", "live"}
        self.sessions: dict[str, dict] = {}  # id -> {"user", "slot", "positions": {t: [start, acked, handed]}, "detached_at"}
        self.known_ids: list[str] = []  # every sessionId ever handed out, for resume attempts
        self.latest: dict[str, int] = {}
        # topic -> its epoch, as first reported: no topic is forgotten here (history_age is 1e9), so
        # every later subscribed, replayed, resumed and REPLAY_UNAVAILABLE must name the same one.
        self.epochs: dict[str, str] = {}
        self.dedup: dict[tuple[str, str], int] = {}
        # (sessionId, topic) -> [start, seqNos received, exact]: while exact, the seqNos must be
        # start+1, start+2, ... with no gap and no repeat, across the connections of that session.
        self.streams: dict[tuple[str, str], list] = {}
        self.server_ids = 0

    # -- model helpers

    def epoch_of(self, topic: str, reported: str) -> str:
        """The topic's epoch: the first one reported is recorded, and every later report must be it."""
        assert isinstance(reported, str) and reported, reported
        known = self.epochs.setdefault(topic, reported)
        assert reported == known, f"{topic}: epoch {reported} after {known}"
        return known

    def oldest(self, topic: str) -> int | None:
        latest = self.latest.get(topic, 0)
        return max(1, latest - self.history + 1) if latest else None

    def expire(self) -> None:
        now = self.clock()
        for sid, s in list(self.sessions.items()):
            if s["slot"] is None and now - s["detached_at"] >= PROP_TTL:
                del self.sessions[sid]

    def detach(self, slot: int, reliable: bool) -> None:
        conn = self.slots[slot]
        session = self.sessions.get(conn["session"])
        if session is not None and session["slot"] == slot:
            for topic, position in session["positions"].items():
                position[2] = self.latest.get(topic, 0) if reliable else None
            session["slot"] = None
            session["detached_at"] = self.clock()
            self.expire()
        self.slots[slot] = None

    def received(self, slot: int, messages: list[dict], replay: bool) -> None:
        """Record message frames a connection got: per-topic live order, and its session's streams."""
        conn = self.slots[slot]
        for m in messages:
            if m["type"] != "message":
                continue
            topic, seq = m["topic"], m["seqNo"]
            if not replay:
                assert seq > conn["live"].get(topic, 0), f"live {topic} seqNo {seq} after {conn['live'].get(topic)}"
                conn["live"][topic] = seq
            stream = self.streams.get((conn["session"], topic))
            if stream is not None:
                stream[1].append(seq)

    def subscribed(self, slot: int, topic: str) -> None:
        conn = self.slots[slot]
        if topic in conn["topics"]:
            return
        conn["topics"].add(topic)
        latest = self.latest.get(topic, 0)
        self.sessions[conn["session"]]["positions"].setdefault(topic, [latest, 0, None])
        self.streams[(conn["session"], topic)] = [latest, [], True]

    # -- the steps

    def step(self, action: tuple) -> None:
        kind, args = action[0], action[1:]
        if kind not in ("connect", "disconnect", "server_publish", "tick") and self.slots[args[0]] is None:
            # An action on a slot with no connection first opens one (as that slot's usual user):
            # a reconnecting client, which keeps the random walk among live connections.
            self.do_connect(args[0], PROP_USERS[args[0] % 2], [])
            self.check()
        getattr(self, "do_" + kind)(*args)
        self.check()

    def do_connect(self, slot: int, user: str, topics: list[str]) -> None:
        conn = self.slots[slot]
        if conn is not None:  # a second setup on the same connection
            replies = self.d.send(conn["client"], {"type": "setup", "token": user})
            assert [(r["type"], r["code"]) for r in replies] == [("error", "ALREADY_SETUP")]
            return
        client = self.d.connect(None)
        replies = self.d.send(client, {"type": "setup", "token": user, "topics": topics})
        ready = replies[0]
        self.epoch = self.epoch or ready["epoch"]
        assert (ready["type"], ready["userId"], ready["epoch"]) == ("ready", user, self.epoch)
        sid = ready["sessionId"]
        assert sid not in self.known_ids
        self.known_ids.append(sid)
        self.sessions[sid] = {"user": user, "slot": slot, "positions": {}, "detached_at": 0.0}
        self.slots[slot] = {"client": client, "user": user, "session": sid, "topics": set(), "live": {}}
        unique = list(dict.fromkeys(topics))
        assert [r.get("topic") for r in replies[1:]] == unique, replies
        assert replies[1:] == [{"type": "subscribed", "topic": t, "seqNo": self.latest.get(t, 0), "epoch": self.epoch_of(t, r.get("epoch"))}
                               for t, r in zip(unique, replies[1:])]
        for topic in unique:
            self.subscribed(slot, topic)

    def do_subscribe(self, slot: int, topic: str) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        replies = self.d.send(conn["client"], {"type": "subscribe", "topic": topic})
        assert len(replies) == 1, replies
        epoch = self.epoch_of(topic, replies[0].get("epoch"))
        assert replies == [{"type": "subscribed", "topic": topic, "seqNo": self.latest.get(topic, 0), "epoch": epoch}]
        self.subscribed(slot, topic)

    def do_unsubscribe(self, slot: int, topic: str) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        replies = self.d.send(conn["client"], {"type": "unsubscribe", "topic": topic})
        assert replies == [{"type": "unsubscribed", "topic": topic}]
        if topic in conn["topics"]:
            conn["topics"].discard(topic)
            self.sessions[conn["session"]]["positions"].pop(topic)
            del self.streams[(conn["session"], topic)]

    def _fan_out(self, topic: str, message_id: str, data, publisher: int | None) -> tuple[dict, dict[int, list[dict]]]:
        """Publish in the model: (the ack, the frames each other live slot must have received)."""
        user = self.slots[publisher]["user"] if publisher is not None else "server"
        key = (user, message_id)
        if key in self.dedup:
            return {"type": "ack", "messageId": message_id, "status": "duplicate", "seqNo": self.dedup[key]}, {}
        seq = self.latest[topic] = self.latest.get(topic, 0) + 1
        self.dedup[key] = seq
        frame = {"type": "message", "topic": topic, "seqNo": seq, "messageId": message_id, "data": data}
        expected = {i: [frame] for i, c in enumerate(self.slots) if c is not None and topic in c["topics"]}
        return {"type": "ack", "messageId": message_id, "status": "ok", "seqNo": seq}, expected

    def _check_fan_out(self, expected: dict[int, list[dict]], skip: int | None) -> None:
        for i, conn in enumerate(self.slots):
            if conn is None or i == skip:
                continue
            got = self.d.take(conn["client"])
            assert got == expected.get(i, []), f"slot {i}: {got} != {expected.get(i, [])}"
            self.received(i, got, replay=False)

    def do_publish(self, slot: int, topic: str, k: int) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        message_id = f"m{k}"
        ack, expected = self._fan_out(topic, message_id, k, slot)
        replies = self.d.send(conn["client"], {"type": "publish", "topic": topic, "messageId": message_id, "payload": k})
        # The ack, then its own copy when subscribed (test_broker_publisher_gets_ack_before_own_message).
        assert replies == [ack] + expected.get(slot, [])
        self.received(slot, replies, replay=False)
        self._check_fan_out(expected, skip=slot)

    def do_server_publish(self, topic: str) -> None:
        self.server_ids += 1
        message_id = f"s{self.server_ids}"
        ack, expected = self._fan_out(topic, message_id, None, None)
        result = publish_result(self.d, "server", topic, message_id, None)
        assert (result.status, result.seq_no, result.subscribers) == (ack["status"], ack["seqNo"], len(expected))
        self._check_fan_out(expected, skip=None)

    def do_ack(self, slot: int, topic: str, back: int) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        if conn["topics"]:  # mostly ack a topic it receives, as a client does
            mine = sorted(conn["topics"])
            topic = mine[PROP_TOPICS.index(topic) % len(mine)]
        seq = max(0, self.latest.get(topic, 0) - back)
        assert self.d.send(conn["client"], {"type": "ack", "topic": topic, "seqNo": seq}) == []
        position = self.sessions[conn["session"]]["positions"].get(topic)
        if position is not None and position[1] < seq <= self.latest.get(topic, 0):
            position[1] = seq

    def do_replay(self, slot: int, topic: str, back: int) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        latest = self.latest.get(topic, 0)
        from_seq = max(1, latest + 1 - back)
        replies = self.d.send(conn["client"], {"type": "replay", "topic": topic, "fromSeq": from_seq})
        oldest = self.oldest(topic)
        epoch = self.epoch_of(topic, replies[-1].get("epoch"))
        if from_seq <= latest and (oldest is None or from_seq < oldest):
            assert replies == [{"type": "error", "code": "REPLAY_UNAVAILABLE", "message": replies[0].get("message"),
                                "topic": topic, "oldestSeq": oldest or latest + 1, "epoch": epoch}]
            return
        assert seqs_of(replies) == list(range(from_seq, latest + 1)) and len(replies) == latest - from_seq + 2
        assert replies[-1] == {"type": "replayed", "topic": topic, "fromSeq": from_seq, "toSeq": latest, "epoch": epoch}
        # A replay on request is the client's own business: not part of its live order or its session's stream.

    def do_resume(self, slot: int, index: int, give_last: bool) -> None:
        conn = self.slots[slot]
        if conn is None or not self.known_ids:
            return
        # Mostly a session of this user (the interesting case), sometimes anyone's, or an unknown id.
        mine = [s for s in self.known_ids if s in self.sessions and self.sessions[s]["user"] == conn["user"]]
        candidates = mine * 3 + self.known_ids + ["bogus"]
        sid = candidates[index % len(candidates)]
        self.expire()
        target = self.sessions.get(sid)
        given = {}
        if target is not None and give_last:
            for topic in target["positions"]:
                start, got, _ = self.streams[(sid, topic)]
                given[topic] = got[-1] if got else start
        msg = {"type": "resume", "sessionId": sid}
        if give_last:  # with the epoch of each position: the topic's, as none is ever forgotten here
            msg["lastSeqPerTopic"] = given
            msg["epochs"] = {topic: self.epochs[topic] for topic in given}
        if target is None or target["user"] != conn["user"]:
            replies = self.d.send(conn["client"], msg)
            assert [(r["type"], r["code"]) for r in replies] == [("error", "SESSION_EXPIRED")], replies
            return
        other = target["slot"] if target["slot"] != slot else None  # resuming its own session: no take-over
        other_client = self.slots[other]["client"] if other is not None else None
        if other is not None:  # take-over: the other connection goes, its positions are "handed"
            self.detach(other, reliable=True)
        own = self.sessions[conn["session"]]
        topics = list(dict.fromkeys(list(target["positions"]) + list(given) + sorted(conn["topics"])))
        expected_frames: dict[str, list[int]] = {}
        missed = []
        positions = {}
        for topic in topics:
            latest = self.latest.get(topic, 0)
            if topic in given:
                after = given[topic]
            elif topic in target["positions"]:
                start, acked, handed = target["positions"][topic]
                after = acked or (handed if handed is not None else start)
            else:
                after = own["positions"][topic][0]
            upto = own["positions"][topic][0] if topic in conn["topics"] else latest
            acked = target["positions"][topic][1] if topic in target["positions"] else 0
            positions[topic] = [upto, acked, None]
            frames = []
            if after < upto:
                oldest = self.oldest(topic)
                if oldest is None or after + 1 < oldest:
                    missed.append({"topic": topic, "fromSeq": after + 1, "oldestSeq": oldest if oldest is not None else latest + 1})
                if oldest is not None:
                    frames = list(range(max(after + 1, oldest), upto + 1))
            expected_frames[topic] = frames
        replies = self.d.send(conn["client"], msg)
        if other_client is not None:
            assert self.d.close_requested(other_client) == ms.CloseCode.SESSION_TAKEN_OVER and not self.d.connected(other_client)
            assert self.d.take(other_client) == []
        resumed = replies[-1]
        assert resumed["type"] == "resumed" and all(r["type"] == "message" for r in replies[:-1]), replies
        for topic in topics:
            assert seqs_of(replies[:-1], topic) == expected_frames[topic], (topic, replies)
        assert (resumed["sessionId"], sorted(resumed["topics"]), resumed["replayed"]) == (
            sid, sorted(topics), sum(len(f) for f in expected_frames.values()))
        assert sorted(resumed["missed"], key=lambda m: m["topic"]) == sorted(missed, key=lambda m: m["topic"])
        assert sorted(resumed["epochs"]) == sorted(topics), resumed
        for topic in topics:
            self.epoch_of(topic, resumed["epochs"][topic])
        # The connection now holds the resumed session; its own one from setup is gone.
        old_topics = set(conn["topics"])
        if conn["session"] != sid:
            del self.sessions[conn["session"]]
        for topic in topics:
            stream = self.streams.pop((conn["session"], topic), None)
            if topic in old_topics:  # it already received this topic live: order differs, the set does not
                stream = self.streams.get((sid, topic)) or stream
                if stream is not None:
                    stream[2] = False
                self.streams[(sid, topic)] = stream if stream is not None else [positions[topic][0], [], False]
            elif (sid, topic) not in self.streams:
                self.streams[(sid, topic)] = [given.get(topic, positions[topic][0]), [], True]
            if topic not in given or any(m["topic"] == topic for m in missed):
                self.streams[(sid, topic)][2] = False
        conn["session"] = sid
        conn["topics"] = set(topics)
        target["positions"] = positions
        target["slot"] = slot
        self.received(slot, replies[:-1], replay=True)

    def do_disconnect(self, slot: int, reliable: bool) -> None:
        conn = self.slots[slot]
        if conn is None:
            return
        assert self.d.take(conn["client"]) == []
        self.d.disconnect(conn["client"], reliable)
        self.detach(slot, reliable)

    def do_tick(self, seconds: int) -> None:
        self.clock.advance(seconds)
        self.d.sweep()  # the server's sweep
        self.expire()

    # -- after every step

    def check(self) -> None:
        """After every step: nobody got a frame the model did not expect, /stats agrees with the model, and
        every exact stream is gap-free. The broker's own tables are never looked at: its positions,
        sessions and counters show in what resume replays, what publishes are acked and what each
        connection receives, which the steps compare frame by frame."""
        live = [c for c in self.slots if c is not None]
        for conn in live:
            assert self.d.take(conn["client"]) == [], "a frame nobody expected"
        stats = self.d.stats()
        recount_subs = sum(len(c["topics"]) for c in live)
        recount_topics = len(set().union(*(c["topics"] for c in live))) if live else 0
        assert (stats["connections"], stats["subscriptions"], stats["topics"]) == (len(live), recount_subs, recount_topics)
        assert stats["sessions"] == len(self.sessions)
        assert stats["published"] == sum(self.latest.values())
        for (sid, topic), (start, got, exact) in self.streams.items():
            if exact:
                assert got == list(range(start + 1, start + 1 + len(got))), f"{sid} {topic}: after {start}: {got}"


@pytest.mark.slow
def test_broker_property_random_sessions_keep_order_and_continuity(broker_driver):
    """Random setup/subscribe/unsubscribe/publish/ack/replay/resume/disconnect steps from 4 clients on 3 topics match the SPEC's model."""
    pytest.importorskip("hypothesis", reason="the property test needs hypothesis (pip install hypothesis)")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    slot = st.integers(0, PROP_SLOTS - 1)
    topic = st.sampled_from(PROP_TOPICS)
    action = st.one_of(
        st.tuples(st.just("connect"), slot, st.sampled_from(PROP_USERS), st.lists(topic, max_size=3)),
        st.tuples(st.just("subscribe"), slot, topic),
        st.tuples(st.just("unsubscribe"), slot, topic),
        st.tuples(st.just("publish"), slot, topic, st.integers(0, 7)),
        st.tuples(st.just("server_publish"), topic),
        st.tuples(st.just("server_publish"), topic),  # twice: publishing is the common case
        st.tuples(st.just("ack"), slot, topic, st.integers(-1, 4)),
        st.tuples(st.just("replay"), slot, topic, st.integers(0, 8)),
        st.tuples(st.just("resume"), slot, st.integers(0, 30), st.booleans()),
        st.tuples(st.just("disconnect"), slot, st.booleans()),
        st.tuples(st.just("tick"), st.sampled_from([0, 1, 2, 5])),
    )

    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(history=st.sampled_from([3, 1000]), actions=st.lists(action, min_size=20, max_size=60))
    def check(history, actions):
        model = BrokerModel(broker_driver, history)
        for act in actions:
            model.step(act)

    check()


# -- fuzzing Broker.handle with JSON-ish text

_FUZZ_TOPICS = ["t", "u", "t", "u", "", "a b", "x*", "é", "t" * 300, "\x00"]
_FUZZ_REQUIRED = {"setup": ["token"], "subscribe": ["topic"], "unsubscribe": ["topic"], "presence": ["topic"],
                  "publish": ["topic", "messageId"], "replay": ["topic", "fromSeq"], "resume": ["sessionId"],
                  "ack": ["topic", "seqNo"], "refresh": ["token"]}


def _fuzz_value(rng: random.Random, depth: int = 0):
    """Any JSON value (integers within 2**62: a huge fromSeq hits the bug of test_replay_huge_from_seq_is_answered_replayed)."""
    roll = rng.random()
    if roll < 0.1 and depth < 3:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if roll < 0.2 and depth < 3:
        return {rng.choice(["t", "u", "k", ""]): _fuzz_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([
        None, True, False, 0, -1, 1, 7, 2**62, -(2**62), 1.5, -0.0, 1e300, "", "t", "u", "a b", "é",
        "x" * rng.randint(0, 300), "".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(0, 8))),
    ])


def _fuzz_message(rng: random.Random, session: str, epoch: str, topic_epoch: str) -> str:
    """JSON-ish text: mostly messages of a real type with mostly well-formed fields (epochs: the process's, topic t's, or stale), sometimes anything."""
    roll = rng.random()
    if roll < 0.05:
        return "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(0, 30)))  # not JSON (mostly)
    if roll < 0.08:
        return rng.choice(["NaN", '{"type": Infinity}', "[" * 5000 + "]" * 5000, '{"type":"ping"', "1e999", '"\ud800"'])
    if roll < 0.13:
        return json.dumps(_fuzz_value(rng))
    kind = rng.choice(sorted(ms.CLIENT_TYPES)) if rng.random() < 0.9 else _fuzz_value(rng)
    good = {
        "id": lambda: rng.choice([1, "a", 0, 3.5]),
        "token": lambda: rng.choice(["alice", "bob", "alice"]),
        "topic": lambda: rng.choice(_FUZZ_TOPICS),
        "topics": lambda: rng.sample(_FUZZ_TOPICS, rng.randint(0, 3)),
        "messageId": lambda: rng.choice(["m1", "m2", "m3", "x" * 300]),
        "payload": lambda: _fuzz_value(rng),
        "fromSeq": lambda: rng.randint(-1, 9),
        "epoch": lambda: rng.choice([epoch, topic_epoch, "old"]),
        "epochs": lambda: {rng.choice(_FUZZ_TOPICS): rng.choice([topic_epoch, "old"]) for _ in range(rng.randint(0, 2))},
        "sessionId": lambda: rng.choice([session, session, "nope"]),
        "lastSeqPerTopic": lambda: {rng.choice(_FUZZ_TOPICS): rng.randint(-1, 9) for _ in range(rng.randint(0, 2))},
        "seqNo": lambda: rng.randint(-1, 9),
    }
    msg = {"type": kind}
    needed = _FUZZ_REQUIRED.get(kind, []) if isinstance(kind, str) else []
    for field, make in good.items():
        if field in needed or rng.random() < 0.15:
            msg[field] = make() if rng.random() < 0.8 else _fuzz_value(rng)
    if rng.random() < 0.05:
        del msg["type"]
    return json.dumps(msg)


@pytest.mark.slow
def test_fuzz_broker_random_json_gives_only_spec_error_codes(broker_driver):
    """Random JSON-ish text (400 seeds x 30 messages, two clients) into Broker.handle gets only SPEC replies, never INTERNAL_ERROR."""
    seen = set()
    for seed in range(400):
        rng = random.Random(seed)
        d = broker_driver(history_messages=5)
        gone = d.connect("alice", topics=["t"])  # a detached session to resume
        ready = d.ready(gone)
        topic_epoch = d.subscribed(gone, "t")["epoch"]
        d.server_publish("t", 7)
        d.disconnect(gone)
        clients = [d.connect(None), d.connect(None)]
        for client, token in zip(clients, ("alice", "bob")):
            if rng.random() < 0.8:
                d.send(client, {"type": "setup", "token": token})
        for _ in range(30):
            text = _fuzz_message(rng, ready["sessionId"], ready["epoch"], topic_epoch)
            who = rng.randrange(2)
            if not d.connected(clients[who]):  # taken over by the other's resume: it reconnects
                clients[who] = d.connect(None)
            d.broker.handle(clients[who], text)
            d.clock.advance(rng.choice([0, 0.5, 200]))
            for client in clients:
                for reply in d.take(client) if d.connected(client) else []:
                    assert reply["type"] in ms.SERVER_TYPES, (seed, text, reply)
                    seen.add(reply.get("code", reply["type"]))
                    if reply["type"] == "error":
                        assert reply["code"] in ms.ERROR_CODES and reply["code"] != "INTERNAL_ERROR", (seed, text, reply)
                        assert isinstance(reply["message"], str)
            stats = d.stats()
            assert stats["connections"] == sum(d.connected(c) for c in clients), seed
            assert stats["topics"] <= stats["subscriptions"] <= 2 * len(_FUZZ_TOPICS), seed
    # The fuzz reached every reply a client can get without JWT, ACLs or a backbone.
    assert seen >= {"ready", "subscribed", "unsubscribed", "ack", "message", "replayed", "resumed", "refreshed",
                    "presence", "pong", "AUTH_REQUIRED", "AUTH_FAILED", "ALREADY_SETUP", "INVALID_JSON", "UNKNOWN_TYPE",
                    "INVALID_MESSAGE", "INVALID_TOPIC", "SESSION_EXPIRED", "REPLAY_UNAVAILABLE"}, seen


# -- what a publish sends out fits what clients are told they may receive


def test_outgoing_json_is_utf8_not_escapes(broker_driver):
    """Non-ASCII text goes out as UTF-8 (é is 2 bytes, not the 6 of \\u00e9), and a lone surrogate stays a valid \\u escape."""
    d = broker_driver()
    a = d.connect("alice", topics=["t"])
    d.broker.handle(a, json.dumps({"type": "publish", "topic": "t", "messageId": "m1", "payload": {"text": "é€😀"}}))
    d.broker.handle(a, json.dumps({"type": "publish", "topic": "t", "messageId": "m2", "payload": "\ud800"}))
    d.settle()
    frames = [f.payload for f in parse_frames(a.take_output())]
    assert any("é€😀".encode() in f for f in frames) and not any(b"\\u00e9" in f for f in frames)
    lone = next(f for f in frames if b'"m2"' in f and b'"message"' in f)
    lone.decode("utf-8")  # valid UTF-8 on the wire
    assert b'"data":"\\ud800"' in lone and json.loads(lone)["data"] == "\ud800"


def test_publish_whose_message_would_be_over_the_size_limit_is_refused(broker_driver):
    """A publish whose `message` would be over max_message_size is refused (INVALID_MESSAGE, field payload, the limit named) and takes no seqNo."""
    d = broker_driver(max_message_size=1000)
    a = d.connect("alice", topics=["t"])
    out = d.publish(a, "t", "big", "é" * 480)  # 960 bytes of UTF-8 plus the envelope: over 1000
    assert_error(out[0], "INVALID_MESSAGE", field="payload", messageId="big")
    assert "1000-byte" in out[0]["message"]
    out = d.publish(a, "t", "fits", "x" * 800)
    assert [m["type"] for m in out] == ["ack", "message"] and out[0]["seqNo"] == 1
    assert len(json.dumps(out[1], ensure_ascii=False, separators=(",", ":")).encode()) <= 1000
    with pytest.raises(ms.ClientError):
        d.broker.publish_checked("server", "t", "big2", "é" * 480, "py", lambda r: None)


def test_close_codes_the_protocol_does_not_define_share_one_label(broker_driver):
    """Disconnects are counted by close code, but the codes a client may pick that the protocol does not define (3000-4999 apart from 4000-4003) share the label "other": 2,000 codes from one client make one label, not 2,000."""
    d = broker_driver()
    for code in range(3000, 5000):
        d.broker.closed(code)
    d.broker.closed(ms.CloseCode.NORMAL_CLOSURE)
    d.broker.closed(ms.CloseCode.SLOW_CONSUMER)
    disconnects = d.stats()["disconnects"]
    assert disconnects == {"1000": 1, "4000": 1, "4001": 2, "4002": 1, "4003": 1, "other": 1996}  # 4000-4003 are the protocol's
    labels = [line for line in d.broker.metrics().splitlines() if line.startswith("microsocket_disconnects_total{")]
    assert len(labels) == 6 and 'microsocket_disconnects_total{code="other"} 1996' in labels
