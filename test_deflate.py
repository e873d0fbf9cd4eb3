"""permessage-deflate (RFC 7692) in microsocket.py: sections 3, 5, 6, 14 and 15.

Byte-level tests use RFC 7692's own examples (§7.2.3: "Hello" compressed, fragmented, with a shared
LZ77 window, in a stored block, with BFINAL, in two blocks). Ported from the deflate-draft
branch's test_deflate.py to the integrated API: negotiation (section 5), compression and the
Deflater (section 3), RSV bits in parse_header, the Inflater, and the connection's inflater
parameters. Nothing here opens a socket.

A window is checked with `strict_inflate`, which inflates one output byte per call: zlib checks a
back-reference only against its window plus what the current call has written, so inflating a
whole message in one call would accept distances far past a small window.
"""

from __future__ import annotations

import json
import os
import random
import tracemalloc
import zlib

import pytest

import microsocket as ms
from conftest import masked

HELLO = bytes.fromhex("f2 48 cd c9 c9 07 00")  # RFC 7692 §7.2.3.1: "Hello", one compressed block
HELLO_AGAIN = bytes.fromhex("f2 00 11 00 00")  # §7.2.3.2: the second "Hello", referring to the first
RSV1, RSV2, RSV3 = 4, 2, 1  # masked(..., rsv=...) values: rsv << 4 is the bit in the first byte
# What the server always answers (section 5): both sides start every message afresh.
PMD = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


def client_compressor(window_bits: int = 15) -> zlib._Compress:
    """A client's compressor with context takeover: one zlib stream for every message."""
    return zlib.compressobj(6, zlib.DEFLATED, -window_bits)


def client_message(compressor: zlib._Compress, payload: bytes) -> bytes:
    """One message from `client_compressor`, its tail removed (RFC 7692 §7.2.1)."""
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(ms.DEFLATE_TAIL)
    return data[:-4]


def inflate_all(inflater: ms.Inflater, payload: bytes, pieces: int = 1, rng: random.Random | None = None) -> bytes:
    """Feed one compressed message to `inflater` in `pieces` random splits; the inflated message."""
    rng = rng or random.Random(0)
    cuts = sorted(rng.randrange(len(payload) + 1) for _ in range(pieces - 1))
    bounds = [0, *cuts, len(payload)]
    out = [inflater.feed(payload[a:b], i == len(bounds) - 2) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    return b"".join(out)


def strict_inflate(data: bytes, window_bits: int) -> bytes:
    """Inflate one compressed message (tail removed) with a `window_bits` window, strictly: one
    output byte per call, so a back-reference further than the window fails (zlib.error)."""
    inflater = zlib.decompressobj(-window_bits)
    data = bytes(data) + ms.DEFLATE_TAIL
    out = bytearray()
    pos, pending = 0, b""
    while not inflater.eof:
        if not pending:
            if pos >= len(data):
                piece = inflater.decompress(b"", 1)
                if not piece:
                    break
                out += piece
                continue
            pending, pos = data[pos : pos + 64], pos + 64  # small input slices: unconsumed_tail stays cheap to copy
        out += inflater.decompress(pending, 1)
        pending = inflater.unconsumed_tail
    return bytes(out)


def far_reference(distance: int = 30_000) -> bytes:
    """Random bytes whose last 300 repeat its first 300, `distance` bytes back: a 15-bit
    compressor refers back that far, so only a window of more than `distance` inflates it."""
    rng = random.Random(distance)
    head = rng.randbytes(300)
    return head + rng.randbytes(distance - 300) + head


def compressed_payload(frame: bytes) -> bytes:
    """The payload of one unmasked frame with RSV1 set (Frame.parse refuses RSV1 without deflate)."""
    header = ms.parse_header(frame, 0, None, True)
    assert header is not None and header.rsv1 and len(frame) == header.size + header.length, frame[:16]
    return frame[header.size :]


# === Negotiation (section 5) =======================================================================

NEGOTIATION = [
    # (header values, response value, (server bits, client bits, client_no_context_takeover))
    (["permessage-deflate"], PMD, (15, 15, True)),
    (["permessage-deflate; client_max_window_bits"], PMD, (15, 15, True)),  # Chrome's offer
    (["permessage-deflate; client_max_window_bits=10"], PMD + "; client_max_window_bits=10", (15, 10, True)),
    (["permessage-deflate; client_max_window_bits=8"], PMD + "; client_max_window_bits=8", (15, 9, True)),  # inflated with 9
    (["permessage-deflate; client_max_window_bits=15"], PMD, (15, 15, True)),
    (['permessage-deflate; client_max_window_bits="12"'], PMD + "; client_max_window_bits=12", (15, 12, True)),
    (["permessage-deflate; server_max_window_bits=9"], PMD + "; server_max_window_bits=9", (9, 15, True)),
    (["permessage-deflate; server_max_window_bits=8"], PMD + "; server_max_window_bits=8", (8, 15, True)),
    (["permessage-deflate; server_max_window_bits=15"], PMD + "; server_max_window_bits=15", (15, 15, True)),
    (['permessage-deflate; server_max_window_bits="11"'], PMD + "; server_max_window_bits=11", (11, 15, True)),
    (["permessage-deflate; client_no_context_takeover"], PMD, (15, 15, True)),
    (["permessage-deflate; server_no_context_takeover"], PMD, (15, 15, True)),
    (
        ["permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12; client_max_window_bits=11"],
        PMD + "; server_max_window_bits=12; client_max_window_bits=11",
        (12, 11, True),
    ),
    (["PerMessage-Deflate; Client_Max_Window_Bits"], PMD, (15, 15, True)),  # names are case-insensitive
    (["permessage-deflate ; server_max_window_bits = 10"], PMD + "; server_max_window_bits=10", (10, 15, True)),  # optional whitespace
    # Several offers, in one header and across headers: the first one that can be honoured.
    (["permessage-deflate; server_max_window_bits=7, permessage-deflate; client_max_window_bits"], PMD, (15, 15, True)),
    (["x-webkit-deflate-frame", "permessage-deflate; client_max_window_bits=9"], PMD + "; client_max_window_bits=9", (15, 9, True)),
    (["permessage-deflate; foo, permessage-deflate; server_max_window_bits=10"], PMD + "; server_max_window_bits=10", (10, 15, True)),
    (["permessage-deflate; server_max_window_bits=11", "permessage-deflate; server_max_window_bits=10"], PMD + "; server_max_window_bits=11", (11, 15, True)),
    ([" , ,permessage-deflate ,"], PMD, (15, 15, True)),  # empty list elements are skipped
    # Malformed offers are skipped, the rest of the header is still read (a comma inside quotes
    # does not end the spoiled offer).
    (['foo; bar="a,b", permessage-deflate'], PMD, (15, 15, True)),
    (["permessage-deflate; =10, permessage-deflate"], PMD, (15, 15, True)),
    (['permessage-deflate; client_max_window_bits="1 0", permessage-deflate'], PMD, (15, 15, True)),
    (['permessage-deflate; client_max_window_bits="10', "permessage-deflate"], PMD, (15, 15, True)),  # a quote ends with its header
    # Declined (no header in the response), the handshake goes on without compression.
    ([], None, None),
    ([""], None, None),
    (["x-webkit-deflate-frame"], None, None),
    (["permessage-deflate; server_max_window_bits"], None, None),  # the value is required
    (["permessage-deflate; server_max_window_bits=16"], None, None),
    (["permessage-deflate; server_max_window_bits=010"], None, None),  # leading zero
    (["permessage-deflate; client_max_window_bits=7"], None, None),
    (["permessage-deflate; client_max_window_bits=ten"], None, None),
    (["permessage-deflate; client_max_window_bits="], None, None),
    (["permessage-deflate; server_no_context_takeover=1"], None, None),  # takes no value
    (["permessage-deflate; client_no_context_takeover; client_no_context_takeover"], None, None),  # twice
    (["permessage-deflate; server_max_window_bits=10; Server_Max_Window_Bits=10"], None, None),  # twice, in another case
    (["permessage-deflate; mystery"], None, None),  # not defined for an offer
    (["permessage-deflate;;"], None, None),
    (["permessage-deflate; client_max_window_bits=\"10"], None, None),  # unterminated quote
    (["permessage-deflate client_max_window_bits"], None, None),  # missing ";"
    (["permessage-deflate; client_max_window_bits=\"a\\\"b\""], None, None),  # unescaped value not a token
]


@pytest.mark.parametrize(("headers", "answer", "params"), NEGOTIATION)
def test_negotiation_table(headers, answer, params):
    """Each offer (one or several headers) gets the answer and agreed parameters in the table."""
    got_answer, got_params = ms.negotiate(headers)
    assert got_answer == answer
    assert (tuple(got_params) if got_params else None) == params


@pytest.mark.parametrize("headers", [row[0] for row in NEGOTIATION if row[1] is not None])
def test_negotiation_answer_is_an_acceptable_offer_with_both_no_context_takeovers(headers):
    """Every answer is one well-formed permessage-deflate element with both no_context_takeover flags, which the server would accept as it stands with the same parameters."""
    answer, params = ms.negotiate(headers)
    [(name, answer_params)] = ms.parse_extensions(answer)
    assert name == ms.PERMESSAGE_DEFLATE
    names = [param for param, _ in answer_params]
    assert "server_no_context_takeover" in names and "client_no_context_takeover" in names
    assert params.client_no_context_takeover is True
    again, params_again = ms.accept_offer(answer_params)
    assert (again, params_again) == (answer, params)


def test_negotiation_client_window_answered_only_when_offered_smaller():
    """client_max_window_bits is in the answer only when the offer carried a value under 15 (RFC 7692 §7.1.2.2), and the inflater's window follows it."""
    for offer, bits in [("permessage-deflate", None), ("permessage-deflate; client_max_window_bits", None),
                        ("permessage-deflate; client_max_window_bits=15", None), ("permessage-deflate; client_max_window_bits=11", 11)]:
        answer, params = ms.negotiate([offer])
        answered = dict(ms.parse_extensions(answer)[0][1]).get("client_max_window_bits")
        assert answered == (None if bits is None else str(bits)), offer
        assert params.client_max_window_bits == (bits or 15)


def test_deflate_params_defaults():
    """DeflateParams() means the RFC's defaults with the server's own choice: 15-bit windows and no client context takeover."""
    assert ms.DeflateParams() == (15, 15, True)


def test_parse_extensions_keeps_order_and_marks_malformed():
    """parse_extensions returns every offer in order, with its parameters, and None for a broken one."""
    assert ms.parse_extensions('a; x=1; y="2", b;;, c ; z') == [("a", [("x", "1"), ("y", "2")]), None, ("c", [("z", None)])]


# === Compressing (section 3) =======================================================================


def test_compress_hello_matches_rfc():
    """"Hello" compresses to RFC 7692 §7.2.3.1's bytes; as a frame, c1 07 (text) or c2 07 (binary) before them."""
    assert ms.compress_message(b"Hello") == HELLO
    assert ms.serialize_frame(ms.Opcode.TEXT, HELLO, rsv1=True) == bytes.fromhex("c1 07") + HELLO
    assert ms.serialize_frame(ms.Opcode.BINARY, HELLO, rsv1=True) == bytes.fromhex("c2 07") + HELLO


def test_compress_without_context_takeover_repeats_itself():
    """A fresh compressor per message: the second "Hello" is the same 7 bytes, never §7.2.3.2's 5."""
    assert ms.compress_message(b"Hello") == ms.compress_message(b"Hello") == HELLO


def test_compress_empty_message():
    """An empty message compresses to the single byte 0x00 (an empty stored block less its tail)."""
    assert ms.compress_message(b"") == b"\x00"
    assert ms.Inflater().feed(b"\x00", True) == b""


@pytest.mark.parametrize("n", [125, 126, 65535, 65536])
def test_compressed_frame_length_edges(n):
    """RSV1 frames use the 7-bit, 16-bit and 64-bit lengths at RFC 6455's edges, like plain frames."""
    data = bytes(n)
    frame = ms.serialize_frame(ms.Opcode.BINARY, data, rsv1=True)
    plain = ms.serialize_frame(ms.Opcode.BINARY, data)
    assert frame[0] == plain[0] | 0x40 and frame[1:] == plain[1:]


def test_compressed_first_fragment_has_rsv1_without_fin():
    """A first fragment of a compressed message keeps RSV1 and clears FIN."""
    assert ms.serialize_frame(ms.Opcode.TEXT, b"\xf2\x48\xcd", fin=False, rsv1=True) == bytes.fromhex("41 03 f2 48 cd")


def test_deflate_frame_threshold_and_incompressible():
    """deflate_frame declines short payloads and data that deflate does not shrink; it shrinks JSON."""
    assert ms.deflate_frame(ms.Opcode.TEXT, b'{"type":"pong"}') is None
    assert len(ms.compress_message(b'{"type":"pong"}')) > len(b'{"type":"pong"}')  # why the threshold exists
    assert ms.deflate_frame(ms.Opcode.BINARY, random.Random(1).randbytes(4096)) is None
    payload = json.dumps({"type": "message", "topic": "prices", "seqNo": 7, "messageId": "m-7", "data": {"btc": 97000, "eth": 3100, "sol": 150}}).encode()
    frame = ms.deflate_frame(ms.Opcode.TEXT, payload)
    assert frame is not None and len(frame) < len(ms.serialize_frame(ms.Opcode.TEXT, payload))
    assert frame[0] == 0xC1
    assert ms.Inflater().feed(compressed_payload(frame), True) == payload


def test_strict_inflate_catches_a_window_too_small():
    """The window check used below can fail: a message referring 30,000 bytes back inflates strictly with 15 bits, not with 9."""
    payload = far_reference()
    data = ms.compress_message(payload, 15)
    assert strict_inflate(data, 15) == payload
    with pytest.raises(zlib.error):
        strict_inflate(data, 9)


@pytest.mark.parametrize("server_bits", [8, 9, 10, 12, 15])
@pytest.mark.parametrize("size", [0, 64, 250, 300, 5000, 40_000])
def test_compressed_message_fits_negotiated_window(server_bits, size):
    """What the server sends inflates, strictly, with the smallest window it agreed to (server_max_window_bits)."""
    rng = random.Random(size)
    payload = b"".join(rng.choice([b"alpha", b"beta", b"gamma", b"delta", rng.randbytes(3)]) for _ in range(size // 4))[:size]
    data = ms.compress_message(payload, ms.compression_window(len(payload), server_bits))
    assert strict_inflate(data, server_bits) == payload


def test_compression_window_shares_forms():
    """Small messages need 9 bits whatever the clients allow, so they have one compressed form; large ones get the client's limit."""
    assert {ms.compression_window(200, bits) for bits in (8, 9, 10, 15)} == {9}
    assert ms.compression_window(100_000, 8) == 9  # zlib's smallest; its matches stay within 250 bytes
    assert ms.compression_window(100_000, 15) == 15 and ms.compression_window(100_000, 10) == 10
    # The smallest window of which the message is shorter than the reach (2**bits - 262), never more than allowed.
    for length in (0, 249, 250, 251, 761, 762, 5000, 32_505, 32_506):
        bits = ms.compression_window(length)
        assert bits == 9 or (1 << (bits - 1)) - 262 <= length, (length, bits)
        assert bits == 15 or (1 << bits) - 262 > length, (length, bits)


# === Deflater: the compressed forms of server frames (section 3) ===================================


def test_deflater_broadcast_compressed_once_per_window(monkeypatch):
    """Subscribers with different server_max_window_bits share the forms their windows allow: one zlib run per distinct window."""
    calls = []
    real = ms.compress_message
    monkeypatch.setattr(ms, "compress_message", lambda payload, bits=15: calls.append(bits) or real(payload, bits))
    payload = json.dumps({"type": "message", "topic": "t", "seqNo": 1, "messageId": "m", "data": list(range(2000))}, separators=(",", ":")).encode()
    plain = ms.serialize_frame(ms.Opcode.TEXT, payload)
    deflater = ms.Deflater()
    sent = [deflater.frame(plain, bits) for bits in [15, 10, 14] * 100]
    windows = {ms.compression_window(len(payload), bits) for bits in (15, 10, 14)}
    assert len(windows) == 2  # 15 and 14 need the same window for this size: one form
    assert sorted(calls) == sorted(windows)
    assert len({id(f) for f in sent}) == 2
    for form, bits in zip(sent[:3], (15, 10, 14)):
        assert strict_inflate(compressed_payload(form), bits) == payload


def test_deflater_small_message_never_compressed(monkeypatch):
    """A broadcast under the threshold costs no compressor call at all and goes as it is."""
    monkeypatch.setattr(ms, "compress_message", lambda *a: pytest.fail("compressed"))
    deflater = ms.Deflater()
    plain = ms.serialize_frame(ms.Opcode.TEXT, b'{"type":"message","topic":"t"}')
    assert deflater.frame(plain) is plain
    assert (deflater.compressions, deflater.reused, deflater.incompressible) == (0, 0, 0) and len(deflater) == 0


# === RSV bits in parse_header (section 3) ===========================================================


@pytest.mark.parametrize(
    ("b0", "deflate", "result"),
    [
        (0x81, False, False),  # plain text frame
        (0x81, True, False),  # plain text frame, extension negotiated
        (0xC1, True, True),  # compressed text frame
        (0x42, True, True),  # first fragment of a compressed binary message
        (0xC0, True, True),  # RSV1 on a continuation frame: the connection refuses it (below)
        (0xC1, False, ms.ProtocolError),  # RSV1 without the extension
        (0xC9, True, ms.ProtocolError),  # RSV1 on a ping
        (0xCA, True, ms.ProtocolError),  # RSV1 on a pong
        (0xC8, True, ms.ProtocolError),  # RSV1 on a close
        (0xA1, True, ms.ProtocolError),  # RSV2
        (0x91, True, ms.ProtocolError),  # RSV3
        (0xE1, True, ms.ProtocolError),  # RSV1 and RSV2
    ],
)
def test_parse_header_reserved_bits(b0, deflate, result):
    """parse_header takes RSV1 on a data frame only once deflate is negotiated; RSV1 on control frames and RSV2/3 are 1002."""
    data = bytes((b0, 0x80)) + b"\x00\x00\x00\x00"
    if result is ms.ProtocolError:
        with pytest.raises(ms.ProtocolError) as info:
            ms.parse_header(data, 0, None, deflate)
        assert info.value.code == ms.CloseCode.PROTOCOL_ERROR
    else:
        header = ms.parse_header(data, 0, None, deflate)
        assert header.rsv1 is result and header.opcode == b0 & 0x0F


# === Inflater (section 3): RFC 7692's examples ======================================================


def test_inflate_rfc_hello():
    """§7.2.3.1: 0xf2 0x48 0xcd 0xc9 0xc9 0x07 0x00 inflates to "Hello"."""
    assert ms.Inflater().feed(HELLO, True) == b"Hello"


def test_inflate_rfc_hello_fragmented():
    """§7.2.3.1: the same message in two fragments (f2 48 cd, then c9 c9 07 00) inflates to "Hello"."""
    inflater = ms.Inflater()
    assert inflater.feed(bytes.fromhex("f2 48 cd"), False) + inflater.feed(bytes.fromhex("c9 c9 07 00"), True) == b"Hello"


def test_inflate_rfc_shared_window():
    """§7.2.3.2: with context takeover, the second "Hello" is 0xf2 0x00 0x11 0x00 0x00."""
    inflater = ms.Inflater()
    assert inflater.feed(HELLO, True) == b"Hello"
    assert inflater.feed(HELLO_AGAIN, True) == b"Hello"
    # ... which is what a client compressor with context takeover produces.
    compressor = client_compressor()
    assert client_message(compressor, b"Hello") == HELLO
    assert client_message(compressor, b"Hello") == HELLO_AGAIN


def test_inflate_rfc_shared_window_refused_without_takeover():
    """With client_no_context_takeover, a message referring to the previous one is invalid data (1007)."""
    inflater = ms.Inflater(no_context_takeover=True)
    assert inflater.feed(HELLO, True) == b"Hello"
    with pytest.raises(ms.ProtocolError) as info:
        inflater.feed(HELLO_AGAIN, True)
    assert info.value.code == ms.CloseCode.INVALID_DATA


@pytest.mark.parametrize(
    "payload",
    [
        "00 05 00 fa ff 48 65 6c 6c 6f 00",  # §7.2.3.3: a DEFLATE block with no compression
        "f3 48 cd c9 c9 07 00 00",  # §7.2.3.4: a DEFLATE block with BFINAL set
        "f2 48 05 00 00 00 ff ff ca c9 c9 07 00",  # §7.2.3.5: two DEFLATE blocks in one message
    ],
)
def test_inflate_rfc_other_forms(payload):
    """RFC 7692 §7.2.3.3-5: "Hello" stored, with BFINAL, and in two blocks, all inflate to "Hello"."""
    inflater = ms.Inflater()
    assert inflater.feed(bytes.fromhex(payload), True) == b"Hello"
    assert inflater.feed(HELLO, True) == b"Hello"  # and the connection goes on (a new stream after BFINAL)


# === Inflater: round trips ==========================================================================


@pytest.mark.parametrize("window_bits", [9, 12, 15])
def test_round_trip_with_context_takeover(window_bits):
    """Messages of a client keeping its window inflate back, whatever way their bytes are split."""
    rng = random.Random(window_bits)
    compressor = client_compressor(window_bits)
    inflater = ms.Inflater(window_bits)
    for i in range(50):
        payload = json.dumps({"type": "publish", "topic": "t", "messageId": f"m{i}", "payload": {"n": i, "text": "hello " * rng.randrange(200)}}).encode()
        assert inflate_all(inflater, client_message(compressor, payload), rng.randrange(1, 6), rng) == payload


def test_round_trip_without_context_takeover():
    """Messages compressed afresh each time inflate with a per-message inflater, which is dropped after."""
    rng = random.Random(2)
    inflater = ms.Inflater(no_context_takeover=True)
    for size in (0, 1, 100, 5000, 200_000):
        payload = rng.randbytes(size // 2) + b"ab" * (size // 4)
        assert inflate_all(inflater, ms.compress_message(payload), 3, rng) == payload
        assert inflater._zlib is None and inflater.size == 0  # no state kept between messages


# === Inflater: limits and errors ====================================================================

LIMIT = 64 << 10
# What inflating costs besides the message itself: zlib's state at 15 bits (a 32 KiB window and
# about 7 KiB, allocated through PyMem, so tracemalloc sees it), one output step and one step of
# unread input (unconsumed_tail).
INFLATE_OVERHEAD = (40 << 10) + 2 * ms.INFLATE_STEP + (4 << 10)


def bomb(size: int) -> bytes:
    """A compressed message of `size` zero bytes (about 1000:1), built without holding it whole."""
    compressor = client_compressor()
    chunk = bytes(1 << 20)
    parts = [compressor.compress(chunk) for _ in range(size >> 20)]
    parts.append(compressor.compress(bytes(size & ((1 << 20) - 1))))
    parts.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[:-4]


def test_bomb_refused_within_the_limit():
    """A 16 KiB message inflating to 16 MiB is refused (1009) having allocated no more than about the limit."""
    data = bomb(16 << 20)
    assert len(data) < 20_000
    inflater = ms.Inflater(max_size=LIMIT)
    tracemalloc.start()
    try:
        with pytest.raises(ms.PayloadTooBig) as info:
            inflater.feed(data, True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.code == ms.CloseCode.MESSAGE_TOO_BIG
    assert peak < LIMIT + INFLATE_OVERHEAD, peak  # not the 16 MiB it would inflate to


def test_bomb_in_fragments_refused():
    """The decompressed size adds up across fragments: a bomb split in 1 KiB frames is refused too."""
    data = bomb(4 << 20)
    inflater = ms.Inflater(max_size=LIMIT)
    tracemalloc.start()
    try:
        with pytest.raises(ms.PayloadTooBig):
            for start in range(0, len(data), 1024):
                inflater.feed(data[start : start + 1024], start + 1024 >= len(data))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < LIMIT + INFLATE_OVERHEAD, peak


@pytest.mark.parametrize("pieces", [1, 7])
def test_limit_is_exact(pieces):
    """A message inflating to exactly the limit is accepted; one byte more is refused, in any split."""
    rng = random.Random(pieces)
    exact = rng.randbytes(LIMIT // 2) + bytes(LIMIT // 2)
    assert inflate_all(ms.Inflater(max_size=LIMIT), ms.compress_message(exact), pieces, rng) == exact
    with pytest.raises(ms.PayloadTooBig):
        inflate_all(ms.Inflater(max_size=LIMIT), ms.compress_message(exact + b"x"), pieces, rng)


def test_limit_holds_when_output_is_pending():
    """Output inflate holds back (all input consumed, empty unconsumed_tail, max_length reached) still counts."""
    size = 2000
    data = ms.compress_message(bytes(size))  # runs of 258-byte matches: output outruns input
    trap = None
    for cut in range(1, len(data)):  # a fragment boundary, and a limit, where zlib looks done but is not
        for limit in range(1, size):
            raw = zlib.decompressobj(-15)
            out = raw.decompress(data[:cut], limit)
            if len(out) == limit and not raw.unconsumed_tail and raw.decompress(b"", size):
                trap = cut, limit
                break
        if trap:
            break
    assert trap is not None
    cut, limit = trap
    with pytest.raises(ms.PayloadTooBig):
        ms.Inflater(max_size=limit).feed(data[:cut], False)
    inflater = ms.Inflater(max_size=size)
    assert inflater.feed(data[:cut], False) + inflater.feed(data[cut:], True) == bytes(size)


def test_limit_per_message_with_context_takeover():
    """The limit is per message: many messages under it, on one kept window, are all accepted."""
    compressor = client_compressor()
    inflater = ms.Inflater(max_size=LIMIT)
    for _ in range(20):
        payload = bytes(LIMIT - 10)
        assert inflater.feed(client_message(compressor, payload), True) == payload


@pytest.mark.parametrize(
    "payload",
    [
        "ff ff ff ff",  # BTYPE 11: a reserved block type
        "00 05 00 00 00 48 65",  # a stored block whose NLEN is not LEN's complement
        "f2 00 11 00 00",  # a back-reference with nothing behind it (§7.2.3.2 on a fresh window)
    ],
)
def test_invalid_deflate_data_is_1007(payload):
    """Data that does not inflate fails the connection with 1007 (ProtocolError, INVALID_DATA)."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.Inflater().feed(bytes.fromhex(payload), True)
    assert info.value.code == ms.CloseCode.INVALID_DATA
    assert not isinstance(info.value, ms.PayloadTooBig)


def test_end_message_forgets_state():
    """end_message drops a half-inflated message and its window."""
    inflater = ms.Inflater()
    inflater.feed(bytes.fromhex("f2 48 cd"), False)
    assert inflater.size > 0
    inflater.end_message()
    assert inflater._zlib is None and inflater.size == 0
    assert inflater.feed(HELLO, True) == b"Hello"


# === The connection with permessage-deflate (section 6, sans-I/O) ===================================


def sent_close(conn: ms.WebSocketConnection) -> int:
    """The code of the close frame the connection queued; fails if it queued anything else."""
    data = conn.data_to_send()
    frame, used = ms.Frame.parse(data)
    assert frame.opcode == ms.Opcode.CLOSE and used == len(data), data
    return ms.parse_close(frame.payload)[0]


def assert_failed(conn: ms.WebSocketConnection, code: int) -> None:
    """The connection failed with `code`: close frame queued, state CLOSED."""
    assert sent_close(conn) == code
    assert conn.state == ms.CLOSED


def deflate_conn(max_message_size: int = ms.MAX_MESSAGE_SIZE, **params) -> ms.WebSocketConnection:
    """A connection that agreed permessage-deflate, as the server answers it (DeflateParams(**params))."""
    return ms.WebSocketConnection(max_message_size, ms.DeflateParams(**params))


def compressed(opcode: int, payload: bytes, window_bits: int = 15) -> bytes:
    """A client's compressed message in one frame: masked, RSV1 set, compressed afresh."""
    return masked(opcode, ms.compress_message(payload, window_bits), rsv=RSV1, mask=os.urandom(4))


def test_connection_client_context_takeover_refused_as_agreed():
    """The server agreed client_no_context_takeover: a message referring back to the previous one (§7.2.3.2) is 1007; allowed, it is "Hello"."""
    data = masked(ms.Opcode.TEXT, HELLO, rsv=RSV1) + masked(ms.Opcode.TEXT, HELLO_AGAIN, rsv=RSV1)
    conn = deflate_conn()
    assert conn.receive_data(data) == [(ms.Opcode.TEXT, "Hello")]
    assert_failed(conn, 1007)
    taking_over = deflate_conn(client_no_context_takeover=False)
    assert taking_over.receive_data(data) == [(ms.Opcode.TEXT, "Hello"), (ms.Opcode.TEXT, "Hello")]


def test_connection_inflates_with_the_agreed_client_window():
    """The connection inflates with the client_max_window_bits it agreed: a back-reference past a 9-bit window is 1007 there, fine with 15 bits."""
    payload = far_reference()
    assert ms.INFLATE_STEP + 512 < 30_000  # the reference reaches past what a 9-bit inflater can see in one step
    frame = compressed(ms.Opcode.BINARY, payload, 15)
    assert deflate_conn(client_max_window_bits=15).receive_data(frame) == [(ms.Opcode.BINARY, payload)]
    narrow = deflate_conn(client_max_window_bits=9)
    assert narrow.receive_data(frame) == []
    assert_failed(narrow, 1007)


# === The websockets library's extension against ours, without a socket ==============================


@pytest.mark.parametrize(
    "client_options",
    [
        {"client_max_window_bits": True},  # the websockets client's default offer (Chrome's too)
        {"client_max_window_bits": 10, "server_max_window_bits": 11},
        {"server_max_window_bits": 8},  # the client inflates with a 256-byte window
        {"client_no_context_takeover": True, "server_no_context_takeover": True},
    ],
)
def test_websockets_library_interop(client_options):
    """The websockets library accepts our answer, and each side inflates what the other compressed."""
    pmd = pytest.importorskip("websockets.extensions.permessage_deflate")
    from websockets.frames import Frame, Opcode
    from websockets.headers import build_extension, parse_extension

    factory = pmd.ClientPerMessageDeflateFactory(**client_options)
    answer, params = ms.negotiate([build_extension([(factory.name, factory.get_request_params())])])
    assert answer is not None
    [(name, response_params)] = parse_extension(answer)
    client = factory.process_response_params(response_params, [])  # raises if the answer breaks RFC 7692
    assert client.remote_no_context_takeover and client.local_no_context_takeover
    conn = ms.WebSocketConnection(ms.MAX_MESSAGE_SIZE, params)
    rng = random.Random(7)
    for i in range(20):
        payload = json.dumps({"type": "publish", "messageId": f"m{i}", "payload": ["hello", i] * rng.randrange(2000)}).encode()
        frame = client.encode(Frame(Opcode.TEXT, payload))
        assert frame.rsv1
        assert conn.receive_data(masked(ms.Opcode.TEXT, bytes(frame.data), rsv=RSV1, mask=os.urandom(4))) == [(ms.Opcode.TEXT, payload.decode())]
        ours = ms.Deflater().frame(ms.serialize_frame(ms.Opcode.TEXT, payload), params.server_max_window_bits)
        assert ours[0] == 0xC1
        data = compressed_payload(ours)
        assert client.decode(Frame(Opcode.TEXT, data, rsv1=True)).data == payload
        assert strict_inflate(data, params.server_max_window_bits) == payload
