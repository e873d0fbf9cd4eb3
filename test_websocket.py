"""Section 6 of microsocket.py: the WebSocket connection state machine (sans-I/O).

WebSocketConnection is driven with byte strings (receive_data) and read back through its events
and data_to_send(): fragments, incremental UTF-8, ping/pong, the close handshake, and every
violation's close code. No socket is opened.
"""

from __future__ import annotations

import os
import random

import pytest

import microsocket as ms
from conftest import masked, parse_frames, random_client_bytes


def sent_close(conn: ms.WebSocketConnection) -> int:
    """The code of the close frame the connection queued (1005 for an empty one); fails if it queued anything else."""
    data = conn.data_to_send()
    frame, used = ms.Frame.parse(data)
    assert frame.opcode == ms.Opcode.CLOSE and used == len(data), data
    return ms.parse_close(frame.payload)[0]


def receive_all(conn: ms.WebSocketConnection, data: bytes) -> list:
    """Feed `data`, then call again while the connection says it left frames for a later turn (as the I/O layer does)."""
    events = conn.receive_data(data)
    while conn.more:
        events += conn.receive_data(b"")
    return events


def assert_failed(conn: ms.WebSocketConnection, code: int) -> None:
    """The connection failed with `code`: close frame queued, state CLOSED."""
    assert sent_close(conn) == code
    assert conn.state == ms.CLOSED


def test_connection_text_and_binary():
    """Complete text and binary frames come out as (TEXT, str) and (BINARY, bytes) events, in order."""
    conn = ms.WebSocketConnection()
    data = masked(ms.Opcode.TEXT, "héllo".encode()) + masked(ms.Opcode.BINARY, b"\x00\xff") + masked(ms.Opcode.TEXT, b"")
    assert conn.receive_data(data) == [(ms.Opcode.TEXT, "héllo"), (ms.Opcode.BINARY, b"\x00\xff"), (ms.Opcode.TEXT, "")]
    assert conn.state == ms.OPEN and conn.data_to_send() == b""


def test_connection_message_fed_one_byte_at_a_time():
    """A fragmented message with a ping inside, fed one byte at a time, gives the pong then the whole text."""
    conn = ms.WebSocketConnection()
    text = "κόσμε, hello, wörld".encode()
    data = (
        masked(ms.Opcode.TEXT, text[:7], fin=False, mask=os.urandom(4))
        + masked(ms.Opcode.PING, b"p", mask=os.urandom(4))
        + masked(ms.Opcode.CONT, text[7:], mask=os.urandom(4))
    )
    events = []
    for byte in data:
        events += conn.receive_data(bytes((byte,)))
    assert events == [(ms.Opcode.PONG, ms.serialize_frame(ms.Opcode.PONG, b"p")), (ms.Opcode.TEXT, text.decode())]


def test_connection_fragmented_messages():
    """TEXT + CONT + CONT and BINARY + CONT come out as single messages."""
    conn = ms.WebSocketConnection()
    data = (
        masked(ms.Opcode.TEXT, b"He", fin=False)
        + masked(ms.Opcode.CONT, b"", fin=False)
        + masked(ms.Opcode.CONT, b"llo")
        + masked(ms.Opcode.BINARY, b"\x01", fin=False)
        + masked(ms.Opcode.CONT, b"\x02")
    )
    assert conn.receive_data(data) == [(ms.Opcode.TEXT, "Hello"), (ms.Opcode.BINARY, b"\x01\x02")]


def test_connection_ping_inside_fragmented_message_is_answered_in_order():
    """A ping between fragments gives (PONG, pong frame with the same payload) before the message it interrupted."""
    conn = ms.WebSocketConnection()
    events = conn.receive_data(masked(ms.Opcode.TEXT, b"a", fin=False) + masked(ms.Opcode.PING, b"ping!"))
    assert events == [(ms.Opcode.PONG, ms.serialize_frame(ms.Opcode.PONG, b"ping!"))]
    assert conn.receive_data(masked(ms.Opcode.CONT, b"b")) == [(ms.Opcode.TEXT, "ab")]


def test_connection_ping_payload_echoed_and_pong_ignored():
    """A ping's payload (up to 125 bytes) comes back in the pong; an unsolicited pong gives nothing."""
    conn = ms.WebSocketConnection()
    payload = os.urandom(125)
    assert conn.receive_data(masked(ms.Opcode.PING, payload)) == [(ms.Opcode.PONG, ms.serialize_frame(ms.Opcode.PONG, payload))]
    assert conn.receive_data(masked(ms.Opcode.PONG, b"x")) == []
    assert conn.state == ms.OPEN


@pytest.mark.parametrize(
    "data, code",
    [
        pytest.param(ms.serialize_frame(ms.Opcode.TEXT, b"hi"), 1002, id="unmasked"),
        pytest.param(masked(ms.Opcode.TEXT, b"hi", rsv=4), 1002, id="rsv1"),
        pytest.param(masked(3, b""), 1002, id="opcode3"),
        pytest.param(masked(ms.Opcode.PING, b"", fin=False), 1002, id="fragmented-ping"),
        pytest.param(masked(ms.Opcode.PING, bytes(126)), 1002, id="ping-126"),
        pytest.param(masked(ms.Opcode.CONT, b"x"), 1002, id="continuation-without-start"),
        pytest.param(masked(ms.Opcode.TEXT, b"a", fin=False) + masked(ms.Opcode.TEXT, b"b"), 1002, id="text-inside-fragmented"),
        pytest.param(masked(ms.Opcode.TEXT, b"a", fin=False) + masked(ms.Opcode.BINARY, b"b"), 1002, id="binary-inside-fragmented"),
        pytest.param(masked(ms.Opcode.CLOSE, b"\x03"), 1002, id="close-1-byte"),
        pytest.param(masked(ms.Opcode.CLOSE, (1004).to_bytes(2, "big")), 1002, id="close-1004"),
        pytest.param(masked(ms.Opcode.CLOSE, (999).to_bytes(2, "big")), 1002, id="close-999"),
        pytest.param(masked(ms.Opcode.CLOSE, b"\x03\xe8\xff"), 1002, id="close-bad-utf8-reason"),
        pytest.param(masked(ms.Opcode.TEXT, b"ok\xff"), 1007, id="invalid-utf8"),
        pytest.param(masked(ms.Opcode.TEXT, b"\xed\xa0\x80"), 1007, id="utf8-surrogate"),
    ],
)
def test_connection_violations(data, code):
    """Each violation fails the connection: a close frame with its code is queued, the state is CLOSED, and later data is ignored."""
    conn = ms.WebSocketConnection()
    conn.receive_data(data)
    assert_failed(conn, code)
    assert conn.receive_data(masked(ms.Opcode.TEXT, b"after")) == []
    assert conn.data_to_send() == b""


def test_connection_invalid_utf8_fails_at_its_fragment():
    """Invalid UTF-8 in fragment 2 fails with 1007 as fragment 2 arrives, before fragment 3 is sent."""
    conn = ms.WebSocketConnection()
    assert conn.receive_data(masked(ms.Opcode.TEXT, "κόσμε".encode(), fin=False)) == []
    assert conn.state == ms.OPEN and conn.data_to_send() == b""
    conn.receive_data(masked(ms.Opcode.CONT, b"\xf4\x90\x80\x80", fin=False))
    assert_failed(conn, 1007)


def test_connection_invalid_utf8_fails_at_its_chunk():
    """Within one frame fed in chunks, the invalid byte in chunk 2 fails the connection (1007) after chunk 2."""
    conn = ms.WebSocketConnection()
    frame = masked(ms.Opcode.TEXT, "κόσμε".encode() + b"\xf4\x90" + b"abc" * 10)
    header_and_valid = ms.parse_header(frame).size + len("κόσμε".encode())
    assert conn.receive_data(frame[:header_and_valid]) == [] and conn.state == ms.OPEN
    conn.receive_data(frame[header_and_valid : header_and_valid + 2])
    assert_failed(conn, 1007)


def test_connection_surrogate_prefix_fails_at_its_fragment():
    """ED A0 can only start a surrogate, which UTF-8 forbids, so a fragment ending with it fails (1007) at once."""
    conn = ms.WebSocketConnection()
    conn.receive_data(masked(ms.Opcode.TEXT, b"ab\xed\xa0", fin=False))
    assert conn.state == ms.CLOSED


def test_connection_utf8_character_split_across_fragments():
    """A multi-byte character split across fragments (and across chunks) is valid text."""
    conn = ms.WebSocketConnection()
    euro = "€".encode()  # e2 82 ac
    data = (
        masked(ms.Opcode.TEXT, b"x" + euro[:1], fin=False)
        + masked(ms.Opcode.CONT, euro[1:2], fin=False)
        + masked(ms.Opcode.CONT, euro[2:])
    )
    events = []
    for i in range(0, len(data), 3):
        events += conn.receive_data(data[i : i + 3])
    assert events == [(ms.Opcode.TEXT, "x€")]
    assert conn.state == ms.OPEN


def test_connection_message_size_limit_across_fragments():
    """A message may reach max_message_size; the header of the fragment that goes over it alone fails the connection with 1009."""
    conn = ms.WebSocketConnection(max_message_size=10)
    exactly = masked(ms.Opcode.BINARY, bytes(6), fin=False) + masked(ms.Opcode.CONT, bytes(4))
    assert conn.receive_data(exactly) == [(ms.Opcode.BINARY, bytes(10))]
    assert conn.receive_data(masked(ms.Opcode.TEXT, b"123456", fin=False)) == []
    over = masked(ms.Opcode.CONT, b"12345")
    conn.receive_data(over[: ms.parse_header(over).size])
    assert_failed(conn, 1009)


def test_connection_single_frame_over_limit_fails_from_header():
    """A single frame longer than max_message_size fails with 1009 from its header alone."""
    conn = ms.WebSocketConnection(max_message_size=1000)
    frame = masked(ms.Opcode.TEXT, b"a" * 1001)
    conn.receive_data(frame[:8])
    assert_failed(conn, 1009)


@pytest.mark.parametrize("payload, code", [(b"", 1005), ((1000).to_bytes(2, "big"), 1000), ((4321).to_bytes(2, "big") + b"bye", 4321)])
def test_connection_close_received_is_echoed(payload, code):
    """A peer's close is answered with a close echoing its code, and the state becomes CLOSED."""
    conn = ms.WebSocketConnection()
    assert conn.receive_data(masked(ms.Opcode.CLOSE, payload)) == []
    assert_failed(conn, code)
    assert conn.close_code == code


def test_connection_close_inside_fragmented_message():
    """A close between fragments completes the closing handshake and drops the unfinished message."""
    conn = ms.WebSocketConnection()
    events = conn.receive_data(masked(ms.Opcode.TEXT, b"part", fin=False) + masked(ms.Opcode.CLOSE, ms.serialize_close(1000)))
    assert events == []
    assert_failed(conn, 1000)
    assert conn.receive_data(masked(ms.Opcode.CONT, b"rest")) == []


def test_connection_server_close_then_peer_close():
    """close() sends a close and moves to CLOSING, where data is ignored; the peer's close then moves to CLOSED, sending nothing."""
    conn = ms.WebSocketConnection()
    conn.close(1001, "going away")
    assert conn.state == ms.CLOSING
    assert sent_close(conn) == 1001
    conn.close(1000)  # a second close() does nothing
    assert conn.data_to_send() == b""
    assert conn.receive_data(masked(ms.Opcode.TEXT, b"late") + masked(ms.Opcode.PING, b"p")) == []
    assert conn.state == ms.CLOSING
    conn.receive_data(masked(ms.Opcode.CLOSE, ms.serialize_close(1001)))
    assert conn.state == ms.CLOSED and conn.close_code == 1001
    assert conn.data_to_send() == b""


def _feed(data: bytes, chunks: list[int], max_size: int) -> tuple[list, str, int | None, int | None, bytes]:
    conn = ms.WebSocketConnection(max_size)
    events = []
    pos = 0
    for size in chunks + [len(data)]:
        events += receive_all(conn, data[pos : pos + size])
        pos += size
    return events, conn.state, conn.close_sent, conn.close_code, conn.data_to_send()


def test_fuzz_websocket_connection_receive_data():
    """Random and truncated client bytes (3000 seeds), whole or in random chunks, raise nothing and end OPEN or CLOSED with 1002/1007/1009 or an echoed close."""
    for seed in range(3000):
        rng = random.Random(seed)
        data = random_client_bytes(rng)
        max_size = rng.choice([64, 1 << 20])
        whole = _feed(data, [], max_size)
        cuts = [rng.randint(0, 7) for _ in range(rng.randint(0, 30))]
        chunked = _feed(data, cuts, max_size)
        assert whole == chunked, f"seed {seed}: the result depends on how the bytes were split"
        events, state, close_sent, close_code, out = whole
        assert state in (ms.OPEN, ms.CLOSED), (seed, state)
        for opcode, payload in events:
            assert (opcode, type(payload)) in ((ms.Opcode.TEXT, str), (ms.Opcode.BINARY, bytes), (ms.Opcode.PONG, bytes)), seed
        if state == ms.OPEN:
            assert (close_sent, out) == (None, b""), seed
        elif close_sent is not None:  # we failed the connection
            assert close_sent in (1002, 1007, 1009), (seed, close_sent)
            assert parse_frames(out) and ms.parse_close(parse_frames(out)[-1].payload)[0] == close_sent
        else:  # the peer closed: its close frame is echoed
            assert close_code is not None and ms.Frame.parse(out)[0].opcode == ms.Opcode.CLOSE, seed


def test_flood_of_empty_fragments_is_closed_1009():
    """A message sent as thousands of empty continuation frames is failed with 1009 once past MAX_SMALL_FRAGMENTS, instead of costing a parse per frame for ever."""
    ws = ms.WebSocketConnection()
    data = masked(ms.Opcode.TEXT, b"x", fin=False) + masked(ms.Opcode.CONT, b"", fin=False) * (ms.MAX_SMALL_FRAGMENTS + 5)
    assert receive_all(ws, data) == []
    assert ws.state == ms.CLOSED and ws.close_sent == ms.CloseCode.MESSAGE_TOO_BIG


def test_many_fragments_of_a_fair_size_are_fine():
    """Fragments averaging MIN_FRAGMENT_AVERAGE bytes or more may be as many as the size limit allows (Autobahn 9.3: 64-byte fragments)."""
    size = ms.MIN_FRAGMENT_AVERAGE * 2
    count = 4 * ms.MAX_SMALL_FRAGMENTS
    ws = ms.WebSocketConnection(max_message_size=size * (count + 1))
    data = masked(ms.Opcode.TEXT, b"a" * size, fin=False) + masked(ms.Opcode.CONT, b"b" * size, fin=False) * (count - 1)
    data += masked(ms.Opcode.CONT, b"c" * size, fin=True)
    ((opcode, text),) = receive_all(ws, data)
    assert opcode == ms.Opcode.TEXT and len(text) == size * (count + 1) and ws.state == ms.OPEN


def test_one_call_parses_at_most_frames_per_turn_and_the_rest_follows():
    """Fairness: one receive_data call handles at most FRAMES_PER_TURN frames and sets `more`; calls with no new bytes go on where it stopped, in order, and bytes arriving meanwhile queue behind the rest."""
    n = ms.FRAMES_PER_TURN * 2 + 5
    data = b"".join(masked(ms.Opcode.TEXT, str(i).encode()) for i in range(n))
    conn = ms.WebSocketConnection()
    first = conn.receive_data(data)
    assert len(first) == ms.FRAMES_PER_TURN and conn.more
    second = conn.receive_data(masked(ms.Opcode.TEXT, b"late"))  # arrives before the rest was parsed
    assert len(second) == ms.FRAMES_PER_TURN and conn.more
    rest = receive_all(conn, b"")
    assert not conn.more and conn.buffered() == 0
    texts = [text for _, text in first + second + rest]
    assert texts == [str(i) for i in range(n)] + ["late"]


def test_control_frames_and_empty_fragments_count_against_the_turn():
    """Pings and empty continuation frames are frames too: a flood of them is cut into slices of FRAMES_PER_TURN like anything else."""
    conn = ms.WebSocketConnection()
    assert len(conn.receive_data(masked(ms.Opcode.PING, b"") * (ms.FRAMES_PER_TURN + 1))) == ms.FRAMES_PER_TURN and conn.more
    assert len(conn.receive_data(b"")) == 1 and not conn.more
    conn.receive_data(masked(ms.Opcode.TEXT, b"x", fin=False) + masked(ms.Opcode.CONT, b"", fin=False) * (ms.FRAMES_PER_TURN * 3))
    assert conn.more and conn.state == ms.OPEN


def test_buffered_counts_unparsed_input_and_the_open_message():
    """buffered() is what the connection holds for the peer: bytes not parsed yet plus the open message's size, and 0 once the message ends (the server's buffer budget reads it)."""
    conn = ms.WebSocketConnection()
    conn.receive_data(masked(ms.Opcode.TEXT, b"a" * 1000, fin=False))
    assert conn.buffered() == 1000
    partial = masked(ms.Opcode.CONT, b"b" * 10)
    conn.receive_data(partial[:3])  # not even a whole header
    assert conn.buffered() == 1003
    conn.receive_data(partial[3:])
    assert conn.buffered() == 0
