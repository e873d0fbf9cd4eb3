"""Section 13's Redis wire layer: the RESP codec (sans-I/O), the key layout and the Lua scripts.

The codec tests use byte strings only: every reply type, every way of cutting the input (a byte
at a time, at every offset), the limits, malformed input. The rest talks to a real redis-server
started per test (conftest.py; skipped with the reason when the machine has none), through
a raw socket and this codec: pipelining, scripts, NOSCRIPT, pub/sub, RESP3, and the publish and
history scripts of the Redis backbone.
"""

from __future__ import annotations

import random
import secrets
import time

import pytest

from conftest import RespClient, redis_server, redis_server_binary, start_redis  # noqa: F401 (fixture)

import microsocket as resp  # section 13's RESP codec, key layout and scripts

NEED_MORE = resp.NEED_MORE
RespError = resp.RespError
RedisReplyError = resp.RedisReplyError


def parse_all(data: bytes, chunks: list[int] | None = None, **limits: int) -> list:
    """Every reply in `data`, fed whole, or in pieces of the sizes in `chunks` (the rest at the end)."""
    parser = resp.RespParser(**limits)
    replies = []
    pos = 0
    for size in chunks or ():
        parser.feed(data[pos : pos + size])
        pos += size
        replies.extend(parser)
    parser.feed(data[pos:])
    replies.extend(parser)
    assert parser.next_reply() is NEED_MORE
    return replies


def byte_at_a_time(data: bytes, **limits: int) -> list:
    """Every reply in `data`, fed one byte per call, asking for replies after each byte."""
    parser = resp.RespParser(**limits)
    replies = []
    for i in range(len(data)):
        parser.feed(data[i : i + 1])
        replies.extend(parser)
    return replies


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster hashes keys with (cluster spec, appendix A)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return crc


def hash_slot(key: str) -> int:
    """The Redis Cluster slot of `key`: only the first non-empty {tag} is hashed, if there is one."""
    raw = key.encode("utf-8", "surrogatepass")
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % 16384


# === Commands =====================================================================================


def test_encode_command_is_an_array_of_bulk_strings():
    """A command is *N then one $len bulk string per argument: str as UTF-8, int as decimal, bytes as is."""
    assert resp.encode_command("SET", "k", b"v", 5) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n$1\r\n5\r\n"
    assert resp.encode_command("GET", "é") == b"*2\r\n$3\r\nGET\r\n$2\r\n\xc3\xa9\r\n"
    assert resp.encode_command("INCRBY", "n", -12) == b"*3\r\n$6\r\nINCRBY\r\n$1\r\nn\r\n$3\r\n-12\r\n"
    assert resp.encode_command("PING") == b"*1\r\n$4\r\nPING\r\n"


def test_encode_command_binary_and_empty_arguments():
    """Bulk strings are length-prefixed, so CRLF, NUL and the empty string go through unchanged."""
    assert resp.encode_command(b"", b"\r\n\x00") == b"*2\r\n$0\r\n\r\n$3\r\n\r\n\x00\r\n"
    assert resp.encode_command(bytearray(b"ab"), memoryview(b"c")) == b"*2\r\n$2\r\nab\r\n$1\r\nc\r\n"


def test_encode_command_lone_surrogate_stays_distinct():
    """A lone surrogate (JSON may carry "\\ud800") encodes, and not as the same bytes as its escape."""
    assert resp.encode_command("\ud800") != resp.encode_command("\\ud800")
    assert resp.encode_command("\ud800") == b"*1\r\n$3\r\n\xed\xa0\x80\r\n"


@pytest.mark.parametrize("bad", [True, 1.5, None, object()])
def test_encode_command_refuses_other_types(bad):
    """bool, float, None and other objects are a TypeError: Redis would store a spelling nobody chose."""
    with pytest.raises(TypeError):
        resp.encode_command("SET", "k", bad)


# === Reply types ==================================================================================

REPLIES = [
    (b"+OK\r\n", "OK"),
    (b"+\r\n", ""),
    (b"-ERR unknown command\r\n", RedisReplyError("ERR unknown command")),
    (b":0\r\n", 0),
    (b":-9223372036854775808\r\n", -(2**63)),
    (b":9223372036854775807\r\n", 2**63 - 1),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$4\r\n\r\n\r\n\r\n", b"\r\n\r\n"),
    (b"$-1\r\n", None),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (b"*3\r\n:1\r\n$1\r\nx\r\n+y\r\n", [1, b"x", "y"]),
    (b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$4\r\ndata\r\n", [b"message", b"ch", b"data"]),
    (b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n", [b"subscribe", b"ch", 1]),
    # RESP3
    (b"_\r\n", None),
    (b"#t\r\n", True),
    (b"#f\r\n", False),
    (b",1.5\r\n", 1.5),
    (b",-2\r\n", -2.0),
    (b",1e10\r\n", 1e10),
    (b",inf\r\n", float("inf")),
    (b",-inf\r\n", float("-inf")),
    (b"(3492890328409238509324850943850943825024385\r\n", 3492890328409238509324850943850943825024385),
    (b"!21\r\nSYNTAX invalid syntax\r\n", RedisReplyError("SYNTAX invalid syntax")),
    (b"=15\r\ntxt:Some string\r\n", b"Some string"),
    (b"%2\r\n+first\r\n:1\r\n$6\r\nsecond\r\n:2\r\n", {"first": 1, b"second": 2}),
    (b"%0\r\n", {}),
    (b"~2\r\n$1\r\na\r\n$1\r\nb\r\n", {b"a", b"b"}),
    (b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$1\r\nx\r\n", resp.Push([b"message", b"ch", b"x"])),
]


@pytest.mark.parametrize("wire, value", REPLIES, ids=[repr(w[:12]) for w, _ in REPLIES])
def test_each_reply_type(wire, value):
    """Each RESP2 and RESP3 reply type parses to its Python value and type, with nothing left over."""
    parser = resp.RespParser()
    parser.feed(wire)
    reply = parser.next_reply()
    assert reply == value and type(reply) is type(value)
    assert parser.next_reply() is NEED_MORE
    assert parser.buffered() == 0


def test_simple_string_and_bulk_string_differ():
    """+OK is a str and $2 OK is bytes: a status is never mistaken for stored data."""
    assert parse_all(b"+OK\r\n$2\r\nOK\r\n") == ["OK", b"OK"]


def test_nan_double():
    """A RESP3 ,nan is a float NaN."""
    (value,) = parse_all(b",nan\r\n")
    assert value != value


def test_error_reply_is_a_value_with_its_prefix():
    """An error reply is returned, not raised, and carries its kind (NOSCRIPT, WRONGTYPE) as `prefix`."""
    replies = parse_all(b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
                        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n+OK\r\n")
    noscript, wrongtype, ok = replies
    assert isinstance(noscript, RedisReplyError) and isinstance(noscript, Exception)
    assert noscript.prefix == "NOSCRIPT" and noscript.message == "NOSCRIPT No matching script. Please use EVAL."
    assert wrongtype.prefix == "WRONGTYPE"
    assert ok == "OK"  # the stream goes on after an error
    with pytest.raises(RedisReplyError, match="NOSCRIPT"):
        raise noscript


def test_error_inside_an_array():
    """An error inside an array (EXEC, a script's table) is one element, the others stay."""
    assert parse_all(b"*3\r\n+OK\r\n-ERR no\r\n:1\r\n") == [["OK", RedisReplyError("ERR no"), 1]]


def test_null_forms():
    """$-1, *-1 and _ are None, alone and inside arrays; $0 and *0 are empty, not null."""
    assert parse_all(b"$-1\r\n*-1\r\n_\r\n*3\r\n$-1\r\n*-1\r\n_\r\n$0\r\n\r\n*0\r\n") == [None, None, None, [None, None, None], b"", []]


def test_nested_arrays():
    """Arrays nest (as XRANGE and script replies do): [[id, [field, value]], [], [[[]]]]."""
    wire = b"*3\r\n*2\r\n$3\r\n1-0\r\n*2\r\n$1\r\nt\r\n:5\r\n*0\r\n*1\r\n*1\r\n*0\r\n"
    assert parse_all(wire) == [[[b"1-0", [b"t", 5]], [], [[[]]]]]


def test_nested_resp3_aggregates():
    """Maps, sets and pushes nest in each other; an aggregate used as a map key or set member is frozen."""
    wire = b"%2\r\n*2\r\n:1\r\n:2\r\n~1\r\n:3\r\n+k\r\n>1\r\n%1\r\n+a\r\n:1\r\n"
    assert parse_all(wire) == [{(1, 2): {3}, "k": resp.Push([{"a": 1}])}]
    assert parse_all(b"~1\r\n*2\r\n:1\r\n*1\r\n:2\r\n") == [{(1, (2,))}]


def test_attributes_are_dropped():
    """A RESP3 attribute (|) annotates the reply after it: that reply is returned, alone or inside an array."""
    assert parse_all(b"|1\r\n+ttl\r\n:3600\r\n$1\r\nv\r\n") == [b"v"]
    assert parse_all(b"*2\r\n:1\r\n|1\r\n+a\r\n*1\r\n:0\r\n:2\r\n|0\r\n+x\r\n") == [[1, 2], "x"]


def test_pipelined_replies_in_order():
    """Several replies in one feed come out one per call, in order, then NEED_MORE."""
    parser = resp.RespParser()
    parser.feed(b":1\r\n:2\r\n:3\r\n:4")
    assert [parser.next_reply() for _ in range(4)] == [1, 2, 3, NEED_MORE]
    parser.feed(b"\r\n")
    assert list(parser) == [4]


# === Any cut of the input =========================================================================

CORPUS = b"".join(wire for wire, _ in REPLIES) + b"".join(
    (
        resp.encode_reply([[b"message", b"ms:{t}", b'ab12:7:{"seqNo":7}\r\n'], RedisReplyError("ERR x")]),
        resp.encode_reply([b"ok", 1, b"0123456789abcdef", 0]),
        b"|1\r\n+key\r\n*0\r\n$3\r\nend\r\n",  # an attribute, then the reply it annotates
        resp.encode_reply(b"x" * 300),
    )
)


def test_corpus_byte_at_a_time_equals_whole():
    """The corpus of every reply type gives the same replies fed a byte at a time as fed whole."""
    whole = parse_all(CORPUS)
    assert len(whole) == len(REPLIES) + 4
    assert repr(byte_at_a_time(CORPUS)) == repr(whole)  # repr: NaN != NaN, but it prints the same


def test_corpus_split_at_every_offset():
    """Cut in two at every offset of the corpus, the replies are the same as uncut."""
    whole = repr(parse_all(CORPUS))
    for cut in range(len(CORPUS) + 1):
        assert repr(parse_all(CORPUS, [cut])) == whole, cut


def test_corpus_random_chunks():
    """Cut into random pieces (seeded, 200 ways), the replies are the same as uncut."""
    whole = repr(parse_all(CORPUS))
    rng = random.Random(11)
    for _ in range(200):
        chunks = [rng.randint(0, 40) for _ in range(len(CORPUS) // 10)]
        assert repr(parse_all(CORPUS, chunks)) == whole


def test_incomplete_input_is_need_more_never_an_error():
    """Every strict prefix of a valid reply stream gives NEED_MORE after its complete replies, no error."""
    whole = parse_all(CORPUS)
    for n in range(len(CORPUS)):
        got = parse_all(CORPUS[:n])
        assert repr(got) == repr(whole[: len(got)])


@pytest.mark.parametrize("value", [value for _, value in REPLIES if not isinstance(value, float)], ids=repr)
def test_encode_reply_round_trips(value):
    """encode_reply is the parser's inverse: parse(encode_reply(v)) == v (RESP3 forms with resp3=True)."""
    assert parse_all(resp.encode_reply(value, resp3=True)) == [value]


def test_encode_reply_resp2_forms():
    """In RESP2, None is $-1 and a Push is a plain array; RESP3-only types are refused."""
    assert resp.encode_reply(None) == b"$-1\r\n"
    assert resp.encode_reply([b"a", 1, "OK", RedisReplyError("ERR e")]) == b"*4\r\n$1\r\na\r\n:1\r\n+OK\r\n-ERR e\r\n"
    for value in (True, 1.5, {}):
        with pytest.raises(TypeError):
            resp.encode_reply(value)


# === Linear time and bounded memory ===============================================================


def test_big_bulk_string_in_small_chunks_reads_its_header_once(monkeypatch):
    """An 8 MiB bulk string fed in 1 KiB pieces, and 256 KiB fed a byte at a time, complete after one
    header parse each: while the body arrives each call is a length check, never a new parse."""
    lines = []
    real_line = resp.RespParser._line
    monkeypatch.setattr(resp.RespParser, "_line", lambda self: lines.append(1) or real_line(self))
    for size, step in ((8 << 20, 1024), (256 << 10, 1)):
        lines.clear()
        body = bytes(range(256)) * (size // 256)
        wire = b"$%d\r\n%s\r\n" % (size, body)
        parser = resp.RespParser()
        header = wire.index(b"\n") + 1
        parser.feed(wire[:header])
        assert parser.next_reply() is NEED_MORE
        calls = 0
        for pos in range(header, len(wire), step):
            parser.feed(wire[pos : pos + step])
            reply = parser.next_reply()
            calls += 1
        assert reply == body
        assert calls == -(-(len(wire) - header) // step)
        assert len(lines) == 1  # the header line, and no line search while the body arrived


def test_long_line_searched_once(monkeypatch):
    """A 60 KB simple string fed a byte at a time is searched for its LF once per new byte, not from
    its start on every call: the bytes searched in all are about the bytes fed."""
    searched = []
    real_line = resp.RespParser._line

    def counting(self):
        searched.append(len(self._buf) - self._scan)
        return real_line(self)

    monkeypatch.setattr(resp.RespParser, "_line", counting)
    text = "x" * 60_000
    wire = b"+%s\r\n" % text.encode()
    assert byte_at_a_time(wire) == [text]
    assert sum(searched) <= len(wire) + len(searched)


def test_many_replies_keep_the_buffer_small():
    """100,000 replies fed in 4 KiB pieces: consumed bytes are dropped, the buffer never holds more
    than a couple of pieces."""
    wire = b"".join(b":%d\r\n" % i for i in range(100_000))
    parser = resp.RespParser()
    largest = count = 0
    for pos in range(0, len(wire), 4096):
        parser.feed(wire[pos : pos + 4096])
        largest = max(largest, len(parser._buf))
        for reply in parser:
            assert reply == count
            count += 1
    assert count == 100_000
    assert largest <= 2 * 4096 + 32


def test_wide_array_arriving_slowly():
    """An array of 30,000 elements fed 3 bytes at a time completes, each element parsed once."""
    wire = b"*30000\r\n" + b":7\r\n" * 30_000
    (reply,) = parse_all(wire, [3] * (len(wire) // 3))
    assert reply == [7] * 30_000


# === Limits =======================================================================================


def test_bulk_over_the_limit_fails_at_its_header():
    """A bulk string declared longer than max_bulk is refused from its header, before its body arrives."""
    parser = resp.RespParser(max_bulk=1000)
    parser.feed(b"$1000\r\n")
    assert parser.next_reply() is NEED_MORE
    parser = resp.RespParser(max_bulk=1000)
    parser.feed(b"$1001\r\n")
    with pytest.raises(RespError, match="over the limit"):
        parser.next_reply()
    assert resp.RESP_MAX_BULK >= 1 << 20  # a default-size message fits


@pytest.mark.parametrize("prefix", [b"*", b"%", b"~", b">"])
def test_aggregate_over_the_length_limit(prefix):
    """An array, map, set or push declaring more than max_length elements fails at its header."""
    assert parse_all(prefix + b"3\r\n" + b":1\r\n" * (6 if prefix == b"%" else 3), max_length=3)
    with pytest.raises(RespError, match="over the limit"):
        parse_all(prefix + b"4\r\n", max_length=3)


def test_nesting_over_the_depth_limit():
    """Aggregates nested max_depth deep parse; one more level fails as soon as it opens."""
    assert parse_all(b"*1\r\n" * 4 + b":1\r\n", max_depth=4) == [[[[[1]]]]]
    with pytest.raises(RespError, match="nested"):
        parse_all(b"*1\r\n" * 5, max_depth=4)
    with pytest.raises(RespError):
        parse_all(b"*1\r\n" * (resp.RESP_MAX_DEPTH + 1) + b":1\r\n")


def test_line_over_the_limit():
    """A line of RESP_MAX_LINE bytes parses; one byte more fails, and without its CRLF it fails as soon as
    it is past the limit, not when (if ever) the LF comes."""
    limit = resp.RESP_MAX_LINE
    assert parse_all(b"+" + b"x" * (limit - 1) + b"\r\n") == ["x" * (limit - 1)]
    with pytest.raises(RespError, match="line over"):
        parse_all(b"+" + b"x" * limit + b"\r\n")
    parser = resp.RespParser()
    parser.feed(b"+" + b"x" * (limit - 1) + b"\r")
    assert parser.next_reply() is NEED_MORE
    parser = resp.RespParser()
    parser.feed(b"-" + b"x" * limit)
    assert parser.next_reply() is NEED_MORE
    parser.feed(b"x")
    with pytest.raises(RespError, match="line over .* without a CRLF"):
        parser.next_reply()


def test_big_number_over_the_digit_limit():
    """A RESP3 big number longer than RESP_MAX_BIG_NUMBER digits is refused (int() would be slow)."""
    assert parse_all(b"(" + b"9" * resp.RESP_MAX_BIG_NUMBER + b"\r\n")
    with pytest.raises(RespError):
        parse_all(b"(" + b"9" * (resp.RESP_MAX_BIG_NUMBER + 1) + b"\r\n")


# === Malformed input ==============================================================================

MALFORMED = [
    (b"?what\r\n", "unknown reply type"),
    (b"OK\r\n", "unknown reply type"),
    (b"\r\n", "empty line"),
    (b"+OK\n", "CRLF"),
    (b"+O\rK\r\n", "CR inside"),
    (b"$abc\r\n", "length"),
    (b"$\r\n", "length"),
    (b"$-2\r\n", "length"),
    (b"$ 5\r\n", "length"),
    (b"$+5\r\n", "length"),
    (b"$1_0\r\n", "length"),
    (b"$99999999999999999999\r\n", "length"),
    (b"*-2\r\n", "length"),
    (b"*1x\r\n", "length"),
    (b"%-1\r\n", "length"),
    (b"!-1\r\n", "length"),
    (b"$3\r\nabcde\r\n", "not followed by CRLF"),
    (b"$3\r\nabc\n\r", "not followed by CRLF"),
    (b":\r\n", "integer"),
    (b":12a\r\n", "integer"),
    (b": 1\r\n", "integer"),
    (b":1_000\r\n", "integer"),
    (b":12345678901234567890\r\n", "integer"),
    (b"$?\r\n", "length"),
    (b"_x\r\n", "null"),
    (b"#x\r\n", "boolean"),
    (b",1.2.3\r\n", "double"),
    (b",\r\n", "double"),
    (b",infinity\r\n", "double"),
    (b"=3\r\nabc\r\n", "verbatim"),
    (b"*2\r\n:1\r\n?\r\n", "unknown reply type"),
]


@pytest.mark.parametrize("wire, match", MALFORMED, ids=[repr(w) for w, _ in MALFORMED])
def test_malformed_input_raises(wire, match):
    """Malformed RESP (bad type byte, bad length, a line end other than CRLF, junk after a bulk string)
    raises RespError, fed whole or a byte at a time."""
    with pytest.raises(RespError, match=match):
        parse_all(wire)
    with pytest.raises(RespError, match=match):
        byte_at_a_time(wire)


def test_error_is_sticky():
    """After a RespError the parser stays failed: later calls raise the same error, input is ignored."""
    parser = resp.RespParser()
    parser.feed(b":1\r\n?\r\n:2\r\n")
    assert parser.next_reply() == 1
    with pytest.raises(RespError) as first:
        parser.next_reply()
    parser.feed(b":3\r\n")
    with pytest.raises(RespError) as second:
        parser.next_reply()
    assert second.value is first.value


def test_lf_without_cr_fails_at_once():
    """A bare LF ends the wait: the parser fails there instead of waiting for a CRLF that never comes."""
    parser = resp.RespParser()
    for byte in b"+OK":
        parser.feed(bytes((byte,)))
        assert parser.next_reply() is NEED_MORE
    parser.feed(b"\n")
    with pytest.raises(RespError):
        parser.next_reply()


# === Key layout ===================================================================================


def test_crc16_matches_the_cluster_spec():
    """The test's CRC16 gives the cluster spec's check value (0x31C3 for "123456789")."""
    assert crc16(b"123456789") == 0x31C3


@pytest.mark.parametrize("topic", ["prices", "a}b", "}x", "{", "a:b", "%7D", "é", "\ud800", "x" * 256])
def test_topic_keys_share_one_slot(topic):
    """A topic's meta, history and channel hash to one cluster slot, whatever braces it holds."""
    meta, history, channel = resp.topic_keys("ms:", topic)
    assert hash_slot(meta) == hash_slot(history) == hash_slot(channel)
    assert hash_slot(meta) == crc16(resp.key_part(topic).encode("utf-8", "surrogatepass")) % 16384
    seqs, times = resp.dedup_keys("ms:", "alice", topic)
    assert hash_slot(seqs) == hash_slot(times) == hash_slot(meta)


def test_keys_never_shared_by_two_topics_or_users():
    """The escape is one-to-one: topics or users that look alike once escaped still get their own keys."""
    topics = ["a}b", "a%7Db", "a%257Db", "a:b", "a%3Ab", "ab", "{ab}"]
    assert len({resp.topic_keys("ms:", t)[0] for t in topics}) == len(topics)
    pairs = [("a:b", "c"), ("a", "b:c")]
    assert len({resp.dedup_keys("ms:", user, "t") for user, _ in pairs}) == 2
    assert resp.dedup_keys("ms:", "a:b") != resp.dedup_keys("ms:", "a")


def test_dedup_keys_live_in_the_users_slot():
    """By default a user's dedup keys share the user's slot, whatever the topic (SPEC I2: per user)."""
    seqs, times = resp.dedup_keys("ms:", "alice")
    assert hash_slot(seqs) == hash_slot(times) == crc16(b"alice") % 16384
    assert seqs == "ms:dedup:{alice}:seq"


def test_prefix_with_a_brace_is_refused():
    """A prefix holding { or } would move the hash tag: check_prefix refuses it."""
    assert resp.check_prefix("ms:") == "ms:"
    for bad in ("ms{", "}ms:"):
        with pytest.raises(ValueError):
            resp.check_prefix(bad)


def test_parse_delivery():
    """A channel payload "epoch:seq:message" splits at its first two colons; the message keeps its own."""
    assert resp.parse_delivery(b"ab12:7:{\"a\":1}") == ("ab12", 7, b'{"a":1}')


# === Real Redis ===================================================================================

redis = pytest.mark.redis


@redis
def test_redis_server_fixture(redis_server):
    """The fixture's server answers PING on its port; its PID is a live process."""
    import os

    host, port, pid = redis_server
    os.kill(pid, 0)
    with RespClient(host, port) as client:
        assert client.call("PING") == "PONG"
        assert client.call("CONFIG", "GET", "save") == [b"save", b""]
        assert client.call("CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]


@redis
def test_fixture_stops_the_server(tmp_path):
    """start_redis stops its server by PID when the block ends, even by an exception: no process left."""
    import os

    if redis_server_binary() is None:
        pytest.skip("redis-server not found ($REDIS_SERVER, PATH, /usr/bin): apt-get install redis-server")
    with pytest.raises(KeyError):
        with start_redis(str(tmp_path)) as (_, _, pid):
            raise KeyError("the test failed")
    with pytest.raises(ProcessLookupError):  # reaped, not a zombie
        os.kill(pid, 0)


@redis
def test_set_get(redis_server):
    """SET answers +OK, GET the bytes stored (CRLF and NUL inside), a missing key $-1 (None)."""
    with RespClient(redis_server.host, redis_server.port) as client:
        assert client.call("SET", "k", b"v\r\n\x00") == "OK"
        assert client.call("GET", "k") == b"v\r\n\x00"
        assert client.call("GET", "missing") is None
        assert client.call("SET", "é", "ü") == "OK" and client.call("GET", "é") == "ü".encode()


@redis
def test_pipelined_incrs_in_order(redis_server):
    """1,000 INCRs written in one go come back as 1..1000, in order."""
    with RespClient(redis_server.host, redis_server.port) as client:
        client.send(*[("INCR", "n")] * 1000)
        assert [client.reply() for _ in range(1000)] == list(range(1, 1001))
        assert client.call("GET", "n") == b"1000"


@redis
def test_eval_tiny_script(redis_server):
    """EVAL of a tiny script: a Lua table becomes an array (false -> null), a status a simple string."""
    script = "return {1, 'two', {3, false}, redis.status_reply('FINE'), KEYS[1], ARGV[1]}"
    with RespClient(redis_server.host, redis_server.port) as client:
        assert client.call("EVAL", script, 1, "k", "a") == [1, b"two", [3, None], "FINE", b"k", b"a"]


@redis
def test_evalsha_noscript(redis_server):
    """EVALSHA of an unknown script answers an error value with the NOSCRIPT prefix; after SCRIPT LOAD it
    runs; after SCRIPT FLUSH it is NOSCRIPT again (what the backbone's EVAL fallback is for)."""
    script = "return 7"
    with RespClient(redis_server.host, redis_server.port) as client:
        sha = client.call("SCRIPT", "LOAD", script).decode()
        client.call("SCRIPT", "FLUSH")
        error = client.call("EVALSHA", sha, 0)
        assert isinstance(error, RedisReplyError) and error.prefix == "NOSCRIPT"
        assert client.call("EVAL", script, 0) == 7  # EVAL caches it again
        assert client.call("EVALSHA", sha, 0) == 7


@redis
def test_error_reply_then_the_connection_goes_on(redis_server):
    """A WRONGTYPE error is a value; the next command on the same connection is answered normally."""
    with RespClient(redis_server.host, redis_server.port) as client:
        client.send(("LPUSH", "list", "x"), ("GET", "list"), ("PING",))
        assert client.reply() == 1
        error = client.reply()
        assert isinstance(error, RedisReplyError) and error.prefix == "WRONGTYPE"
        assert client.reply() == "PONG"


@redis
def test_subscribe_and_publish(redis_server):
    """SUBSCRIBE answers ["subscribe", channel, 1]; a PUBLISH from a second connection arrives as
    ["message", channel, data]."""
    host, port, _ = redis_server
    with RespClient(host, port) as sub, RespClient(host, port) as pub:
        assert sub.call("SUBSCRIBE", "ms:{t}") == [b"subscribe", b"ms:{t}", 1]
        assert pub.call("PUBLISH", "ms:{t}", b"hello\r\n") == 1
        assert sub.reply() == [b"message", b"ms:{t}", b"hello\r\n"]
        assert sub.call("PING") == [b"pong", b""]  # RESP2, subscribed: even PING answers in pub/sub form


@redis
def test_reply_split_across_tcp_segments(redis_server):
    """A 4 MiB GET reply arrives in many recv() pieces and parses to the value; read a byte per recv(),
    a nested reply parses the same."""
    value = bytes(range(256)) * (4 << 12)
    host, port, _ = redis_server
    with RespClient(host, port) as client:
        client.call("SET", "big", value)
        client.reads = 0
        assert client.call("GET", "big") == value
        assert client.reads > 1
    with RespClient(host, port, recv_size=1) as client:
        reply = client.call("EVAL", "return {1, {'a', {'b'}}, 'c'}", 0)
        assert reply == [1, [b"a", [b"b"]], b"c"]
        assert client.reads == len(b"*3\r\n:1\r\n*2\r\n$1\r\na\r\n*1\r\n$1\r\nb\r\n$1\r\nc\r\n")


@redis
def test_resp3_replies(redis_server):
    """After HELLO 3 Redis answers a map, and sends _, ',', ~, %, = and > (pub/sub pushes): all parsed;
    a script answers RESP2 forms until it calls redis.setresp(3), and truncates Lua numbers even then."""
    host, port, _ = redis_server
    with RespClient(host, port) as client, RespClient(host, port) as pub:
        hello = client.call("HELLO", 3)
        assert isinstance(hello, dict) and hello[b"proto"] == 3 and hello[b"server"] == b"redis"
        assert client.call("GET", "missing") is None
        client.call("ZADD", "z", "1.5", "m")
        assert client.call("ZSCORE", "z", "m") == 1.5
        client.call("SADD", "s", "a", "b")
        assert client.call("SMEMBERS", "s") == {b"a", b"b"}
        client.call("HSET", "h", "f", "v")
        assert client.call("HGETALL", "h") == {b"f": b"v"}
        assert client.call("INFO", "server").startswith(b"# Server")  # a verbatim string, format dropped
        assert client.call("EVAL", "return {true, 3.7}", 0) == [1, 3]  # a script answers RESP2 forms...
        assert client.call("EVAL", "redis.setresp(3); return {true, false, {double=0.5}, 3.7}", 0) == [True, False, 0.5, 3]
        assert client.call("EVAL", "return {double=3.7}", 0) == 3.7  # sent as ,3.7000000000000002
        subscribed = client.call("SUBSCRIBE", "c")
        assert type(subscribed) is resp.Push and subscribed == [b"subscribe", b"c", 1]
        pub.call("PUBLISH", "c", "x")
        assert client.reply() == resp.Push([b"message", b"c", b"x"])
        assert client.call("PING") == "PONG"  # RESP3 keeps ordinary replies while subscribed


@redis
def test_deepest_redis_replies_fit_the_limits(redis_server):
    """COMMAND DOCS (nested 8 deep), COMMAND INFO in RESP3 (9) and XINFO STREAM FULL with a consumer
    group and a pending entry (7) parse with the default limits: RESP_MAX_DEPTH is not too tight."""

    def depth(value) -> int:
        if isinstance(value, dict):
            value = [*value.keys(), *value.values()]
        if isinstance(value, (list, tuple, set, frozenset)):
            return 1 + max(map(depth, value), default=0)
        return 0

    with RespClient(redis_server.host, redis_server.port) as client:
        client.call("XADD", "s", "*", "f", "v")
        client.call("XGROUP", "CREATE", "s", "g", "0")
        client.call("XREADGROUP", "GROUP", "g", "c", "STREAMS", "s", ">")
        depths = [depth(client.call("COMMAND", "DOCS", "XADD")), depth(client.call("XINFO", "STREAM", "s", "FULL"))]
        client.call("HELLO", 3)
        depths += [depth(client.call("COMMAND", "DOCS", "XADD")), depth(client.call("COMMAND", "INFO", "XADD"))]
        assert depths == [8, 7, 8, 9] and max(depths) <= resp.RESP_MAX_DEPTH


@redis
def test_script_error_keeps_earlier_writes(redis_server):
    """Redis does not roll a script back: a command failing inside it leaves what ran before it written.
    (Why the publish script orders its commands so that none of them can fail.)"""
    with RespClient(redis_server.host, redis_server.port) as client:
        error = client.call("EVAL", "redis.call('SET', KEYS[1], 'v'); return redis.call('INCR', KEYS[1])", 1, "k")
        assert isinstance(error, RedisReplyError) and error.prefix == "ERR"
        assert client.call("GET", "k") == b"v"
        # And a Lua table stops at its first nil: {1, nil, 3} is a one-element array.
        assert client.call("EVAL", "return {1, nil, 3}", 0) == [1]


# === The publish and history scripts ==============================================================

LIMITS = dict(history_messages=1000, history_age=300.0, dedup_window=3600.0, dedup_per_user=100_000)


def script(client: RespClient, command: tuple):
    """EVALSHA, and EVAL with the script's text on NOSCRIPT; an error reply fails the test."""
    reply = client.call(*command)
    if isinstance(reply, RedisReplyError) and reply.prefix == "NOSCRIPT":
        reply = client.call(*resp.eval_fallback(command))
    if isinstance(reply, RedisReplyError):
        raise reply
    return reply


def publish(client: RespClient, topic: str, message_id: str, data: bytes = b"null", user: str = "alice",
            prefix: str = "ms:", cluster: bool = False, **limits) -> tuple:
    """The publish script for one message: (status, seq, epoch, receivers)."""
    head = b'{"type":"message","topic":"%s","seqNo":' % topic.encode()
    tail = b',"messageId":"%s","data":%s}' % (message_id.encode(), data)
    command = resp.publish_command(prefix, user, topic, message_id, head, tail, secrets.token_hex(8),
                                   cluster=cluster, **{**LIMITS, **limits})
    status, seq, epoch, receivers = script(client, command)
    return status.decode(), seq, epoch.decode(), receivers


def history(client: RespClient, topic: str, first: int = 1, limit: int = 100, history_age: float = 300.0) -> tuple:
    """The history script: (epoch, last seq, oldest seq, [(seq, message), ...])."""
    epoch, last, oldest, flat = script(client, resp.history_command("ms:", topic, first, limit, history_age, secrets.token_hex(8)))
    return epoch.decode(), last, oldest, list(zip(flat[::2], flat[1::2]))


@redis
def test_publish_script_sequences(redis_server):
    """Two publishes to a topic take seq 1 and 2 under one epoch, and go to the topic's channel as
    "epoch:seq:message" with the seq inside the message."""
    host, port, _ = redis_server
    with RespClient(host, port) as client, RespClient(host, port) as sub:
        channel = resp.topic_keys("ms:", "t")[2]
        sub.call("SUBSCRIBE", channel)
        first = publish(client, "t", "m1", b'{"a":1}')
        second = publish(client, "t", "m2")
        assert first[:2] == ("ok", 1) and second[:2] == ("ok", 2)
        assert first[2] == second[2] and first[3] == second[3] == 1
        kind, name, payload = sub.reply()
        assert (kind, name) == (b"message", channel.encode())
        assert resp.parse_delivery(payload) == (first[2], 1, b'{"type":"message","topic":"t","seqNo":1,"messageId":"m1","data":{"a":1}}')
        assert resp.parse_delivery(sub.reply()[2])[:2] == (first[2], 2)
        assert publish(client, "other", "m3")[:2] == ("ok", 1)  # seqs are per topic


@redis
def test_publish_script_duplicate(redis_server):
    """A messageId the user already published returns the original seq and epoch, takes no seq and
    publishes nothing (the subscriber's next message is the one after it); another user's same
    messageId is a new message, the same user's on another topic a duplicate (dedup is per user)."""
    host, port, _ = redis_server
    with RespClient(host, port) as client, RespClient(host, port) as sub:
        sub.call("SUBSCRIBE", resp.topic_keys("ms:", "t")[2])
        status, seq, epoch, _ = publish(client, "t", "m1")
        assert (status, seq) == ("ok", 1)
        assert publish(client, "t", "m1") == ("duplicate", 1, epoch, 0)
        assert publish(client, "u", "m1") == ("duplicate", 1, epoch, 0)
        assert publish(client, "t", "m1", user="bob")[:2] == ("ok", 2)
        assert publish(client, "t", "m2")[:2] == ("ok", 3)
        assert [resp.parse_delivery(sub.reply()[2])[1] for _ in range(3)] == [1, 2, 3]
        assert client.call("HGET", resp.topic_keys("ms:", "t")[0], "seq") == b"3"
        assert history(client, "t")[1:3] == (3, 1)


@redis
def test_epoch_created_once_and_new_after_flushall(redis_server):
    """The topic's epoch is the first caller's candidate and survives later calls with other candidates;
    after FLUSHALL the topic starts again at seq 1 under a new epoch, with none of the old history."""
    with RespClient(redis_server.host, redis_server.port) as client:
        epochs = {publish(client, "t", f"m{i}")[2] for i in range(5)}
        assert len(epochs) == 1
        (old,) = epochs
        assert client.call("HGET", resp.topic_keys("ms:", "t")[0], "epoch").decode() == old
        assert history(client, "t", limit=0)[:2] == (old, 5)
        assert client.call("FLUSHALL") == "OK"
        status, seq, new, _ = publish(client, "t", "m0")  # forgotten with the rest: not a duplicate
        assert (status, seq) == ("ok", 1) and new != old
        assert [s for s, _ in history(client, "t")[3]] == [1]


@redis
def test_history_script_reads_a_range(redis_server):
    """The history script answers epoch, last and oldest seq and the messages from a seq, with a limit;
    on a topic never used it creates the epoch and answers last 0, nothing retained."""
    with RespClient(redis_server.host, redis_server.port) as client:
        epoch, last, oldest, entries = history(client, "fresh")
        assert (last, oldest, entries) == (0, 0, [])
        assert publish(client, "fresh", "m1")[2] == epoch  # the epoch a read created is the one kept
        for i in range(2, 6):
            publish(client, "fresh", f"m{i}")
        epoch2, last, oldest, entries = history(client, "fresh", first=3, limit=2)
        assert (epoch2, last, oldest) == (epoch, 5, 1)
        assert [seq for seq, _ in entries] == [3, 4]
        assert entries[0][1].startswith(b'{"type":"message","topic":"fresh","seqNo":3,')


@redis
def test_history_trimmed_by_count(redis_server):
    """With history_messages 3, five publishes leave seqs 3..5; the oldest retained is 3."""
    with RespClient(redis_server.host, redis_server.port) as client:
        for i in range(5):
            publish(client, "t", f"m{i}", history_messages=3)
        _, last, oldest, entries = history(client, "t")
        assert (last, oldest, [s for s, _ in entries]) == (5, 3, [3, 4, 5])
        assert client.call("XLEN", resp.topic_keys("ms:", "t")[1]) == 3


@redis
def test_history_expires_by_age(redis_server):
    """Entries older than history_age are skipped by a read at once and trimmed by the next publish;
    the stream key itself expires with them."""
    age = 0.3
    with RespClient(redis_server.host, redis_server.port) as client:
        publish(client, "t", "m1", history_age=age)
        publish(client, "t", "m2", history_age=age)
        stream = resp.topic_keys("ms:", "t")[1]
        assert 0 < client.call("PTTL", stream) <= 300
        time.sleep(age + 0.1)
        assert history(client, "t", history_age=age)[1:] == (2, 0, [])
        publish(client, "t", "m3", history_age=age)
        assert client.call("XLEN", stream) == 1
        assert history(client, "t", history_age=age)[1:3] == (3, 3)
        time.sleep(age + 0.1)
        assert client.call("EXISTS", stream) == 0


@redis
def test_dedup_window_expires(redis_server):
    """After the dedup window a messageId is new again: it takes the next seq."""
    with RespClient(redis_server.host, redis_server.port) as client:
        assert publish(client, "t", "m1", dedup_window=0.2)[:2] == ("ok", 1)
        assert publish(client, "t", "m1", dedup_window=0.2)[:2] == ("duplicate", 1)
        time.sleep(0.3)
        assert publish(client, "t", "m1", dedup_window=0.2)[:2] == ("ok", 2)
        seqs, times = resp.dedup_keys("ms:", "alice")
        assert client.call("ZCARD", times) == 1 and client.call("HLEN", seqs) == 1


@redis
def test_dedup_bounded_per_user(redis_server):
    """Past dedup_per_user remembered messageIds, the user's oldest is forgotten first."""
    with RespClient(redis_server.host, redis_server.port) as client:
        for mid in ("a", "b", "c"):
            publish(client, "t", mid, dedup_per_user=2)
        seqs, times = resp.dedup_keys("ms:", "alice")
        assert client.call("ZRANGE", times, 0, -1) == [b"b", b"c"]
        assert client.call("HLEN", seqs) == 2
        assert publish(client, "t", "c", dedup_per_user=2)[:2] == ("duplicate", 3)
        assert publish(client, "t", "a", dedup_per_user=2)[:2] == ("ok", 4)


@redis
def test_meta_lost_alone_starts_a_new_epoch_without_old_history(redis_server):
    """If the meta hash goes (evicted, expired) while the stream stays, the next read or publish starts
    a new epoch and drops the old entries: they are not passed off as the new epoch's."""
    with RespClient(redis_server.host, redis_server.port) as client:
        old = publish(client, "t", "m1")[2]
        publish(client, "t", "m2")
        meta, stream, _ = resp.topic_keys("ms:", "t")
        client.call("DEL", meta)
        epoch, last, oldest, entries = history(client, "t")
        assert epoch != old and (last, oldest, entries) == (0, 0, [])
        assert client.call("EXISTS", stream) == 0
        assert publish(client, "t", "m3")[1:3] == (1, epoch)


@redis
def test_meta_ttl_forgets_an_idle_topic(redis_server):
    """With meta_ttl, a topic nobody publishes to is forgotten: its next publish is seq 1 of a new epoch."""
    with RespClient(redis_server.host, redis_server.port) as client:
        old = publish(client, "t", "m1", meta_ttl=0.2)[2]
        assert 0 < client.call("PTTL", resp.topic_keys("ms:", "t")[0]) <= 200
        time.sleep(0.3)
        status, seq, epoch, _ = publish(client, "t", "m2", meta_ttl=0.2)
        assert (status, seq) == ("ok", 1) and epoch != old


@redis
def test_publish_script_with_awkward_names(redis_server):
    """Topics, users and messageIds with braces, colons, percent signs and non-ASCII work, each apart."""
    with RespClient(redis_server.host, redis_server.port) as client:
        names = ["a}b", "a%7Db", "{x}", "é:ü", "}"]
        for name in names:
            assert publish(client, name, name, user=name)[:2] == ("ok", 1)
        for name in names:
            assert publish(client, name, name, user=name)[:2] == ("duplicate", 1)
            assert history(client, name)[1] == 1


@redis
@pytest.mark.slow
def test_cluster_slots(tmp_path):
    """On a (one-node) Redis Cluster: CLUSTER KEYSLOT agrees with the key layout (a topic's keys in one
    slot); the publish script with the cluster layout (dedup in the topic's slot) runs, while the
    standalone layout (dedup in the user's slot) is refused with CROSSSLOT."""
    if redis_server_binary() is None:
        pytest.skip("redis-server not found ($REDIS_SERVER, PATH, /usr/bin): apt-get install redis-server")
    options = ("--cluster-enabled", "yes", "--cluster-config-file", str(tmp_path / "nodes.conf"))
    with start_redis(str(tmp_path), *options) as (host, port, _), RespClient(host, port) as client:
        assert client.call("CLUSTER", "ADDSLOTSRANGE", 0, 16383) == "OK"
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in client.call("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster did not become ok"
            time.sleep(0.05)
        for topic in ("prices", "a}b", "}x", "é"):
            keys = [*resp.topic_keys("ms:", topic), *resp.dedup_keys("ms:", "bob", topic)]
            slots = {client.call("CLUSTER", "KEYSLOT", key) for key in keys}
            assert slots == {hash_slot(keys[0])}
        assert client.call("CLUSTER", "KEYSLOT", resp.dedup_keys("ms:", "bob")[0]) == hash_slot("bob")
        assert publish(client, "prices", "m1", user="bob", cluster=True)[:2] == ("ok", 1)
        assert publish(client, "prices", "m1", user="bob", cluster=True)[:2] == ("duplicate", 1)
        with pytest.raises(RedisReplyError, match="CROSSSLOT"):
            publish(client, "prices", "m2", user="bob")
