"""Section 7 of microsocket.py: the pub/sub message schema (decode and validate client messages).

decode_client_message and check_topic are pure functions: text or values in, a dict or a
ClientError with the SPEC's code and field out.
"""

from __future__ import annotations

import json

import pytest

import microsocket as ms


def _code_of(text: str) -> ms.ClientError:
    with pytest.raises(ms.ClientError) as info:
        ms.decode_client_message(text)
    return info.value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        '{"type": "ping"',
        "[]",
        '[{"type": "ping"}]',
        "1",
        "3.5",
        '"ping"',
        "null",
        "true",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e400",
        '{"type": "ping", "x": NaN}',
        '{"type": "ping", "x": Infinity}',
        '{"type": "ping", "x": -Infinity}',
        '{"type": "ping", "x": 1e400}',
        '{"type": "ping", "x": -1e400}',
        '{"type": "ping", "x": ' + "1" * 5000 + "}",
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
    ],
    ids=lambda t: repr(t[:24]) + (f"..({len(t)})" if len(t) > 24 else ""),
)
def test_decode_invalid_json(text):
    """Text that is not one finite JSON object (or nests too deep) is INVALID_JSON."""
    assert _code_of(text).code == "INVALID_JSON"


@pytest.mark.parametrize(
    "text",
    ["{}", '{"type": 5}', '{"type": null}', '{"type": true}', '{"type": ["ping"]}', '{"type": {}}', '{"type": ""}',
     '{"type": "PING"}', '{"type": "nope"}', '{"type": "message"}', '{"type": "pong"}', '{"typ": "ping"}'],
)
def test_decode_unknown_type(text):
    """A missing, non-string or unknown `type` is UNKNOWN_TYPE with field `type`."""
    exc = _code_of(text)
    assert (exc.code, exc.context.get("field")) == ("UNKNOWN_TYPE", "type")


@pytest.mark.parametrize("bad_id", [True, False, None, {}, {"a": 1}, [], [1], ["x"]])
def test_decode_invalid_id(bad_id):
    """An `id` that is not a string or a number is INVALID_MESSAGE with field `id`."""
    exc = _code_of(json.dumps({"type": "ping", "id": bad_id}))
    assert (exc.code, exc.context.get("field")) == ("INVALID_MESSAGE", "id")


@pytest.mark.parametrize("good_id", ["abc", "", 0, -1, 7, 1.5, 10**30])
def test_decode_valid_ids(good_id):
    """String and number ids (including 0 and "") are accepted and kept as sent."""
    msg = ms.decode_client_message(json.dumps({"type": "ping", "id": good_id}))
    assert msg == {"type": "ping", "id": good_id}


def test_decode_every_client_type():
    """Every client message type of the SPEC decodes to the same dict."""
    for kind in ("setup", "subscribe", "unsubscribe", "publish", "replay", "resume", "ack", "refresh", "presence", "ping"):
        assert ms.decode_client_message(json.dumps({"type": kind, "x": [1, {"y": None}]})) == {"type": kind, "x": [1, {"y": None}]}


@pytest.mark.parametrize(
    "topic",
    ["", "x" * 257, "a b", " ", "a\tb", "a\nb", "a\rb", "a\x00b", "\x7f", "a\x85b", "a\x9fb", "a\u2028b", "a\u2029b",
     "a\u00a0b", "a\u3000b", "*", "a*", "prices.*", "\ud800", "a\udfffb"],
    ids=repr,
)
def test_check_topic_invalid(topic):
    """Empty, over 256 chars, whitespace, control chars, '*' and lone surrogates are INVALID_TOPIC with field."""
    with pytest.raises(ms.ClientError) as info:
        ms.check_topic(topic)
    assert info.value.code == "INVALID_TOPIC"
    assert info.value.context["field"] == "topic"


@pytest.mark.parametrize("topic", [None, 5, 1.5, True, ["a"], {"a": 1}, b"a"], ids=repr)
def test_check_topic_not_a_string(topic):
    """A topic that is not a string is INVALID_MESSAGE with field `topic`."""
    with pytest.raises(ms.ClientError) as info:
        ms.check_topic(topic)
    assert (info.value.code, info.value.context["field"]) == ("INVALID_MESSAGE", "topic")


@pytest.mark.parametrize("topic", ["prices.€", "x" * 256, "a", "a.b-c_d/e:f#1", "日本語", "café", "😀"], ids=repr)
def test_check_topic_valid(topic):
    """Unicode topics and a topic of exactly 256 characters are valid and returned unchanged."""
    assert ms.check_topic(topic) == topic


def test_check_topic_length_and_field_are_parameters():
    """check_topic honours a smaller max_length and names the given field."""
    assert ms.check_topic("ab", max_length=2) == "ab"
    with pytest.raises(ms.ClientError) as info:
        ms.check_topic("abc", max_length=2, field="topics")
    assert (info.value.code, info.value.context["field"]) == ("INVALID_TOPIC", "topics")


def test_topics_refuse_every_unicode_format_character():
    """Every Unicode format character (category Cf: bidi overrides, zero-width spaces and joiners, tags) is refused in a topic, so look-alike topics cannot be made."""
    import sys
    import unicodedata

    format_chars = [chr(cp) for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)) == "Cf"]
    assert len(format_chars) > 150  # the scan found them (a broken scan would pass vacuously)
    accepted = [hex(ord(c)) for c in format_chars if _topic_ok(f"prices{c}btc")]
    assert accepted == []


def test_topics_keep_other_non_ascii_text_as_is():
    """Letters of any script are allowed, and topics are not normalised: NFC and NFD spellings are two topics."""
    import unicodedata

    nfc = unicodedata.normalize("NFC", "prix.café")
    nfd = unicodedata.normalize("NFD", "prix.café")
    assert ms.check_topic(nfc) == nfc and ms.check_topic(nfd) == nfd and nfc != nfd
    assert ms.check_topic("価格.東京") == "価格.東京"


def _topic_ok(topic: str) -> bool:
    try:
        ms.check_topic(topic)
    except ms.ClientError as exc:
        assert exc.code == "INVALID_TOPIC", exc.code
        return False
    return True
