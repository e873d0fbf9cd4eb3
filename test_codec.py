"""Sections 1-3 of microsocket.py: the module itself, constants, errors and the frame codec (sans-I/O).

Byte-level tests use RFC 6455's own examples (masked "Hello" with key 37 fa 21 3d) and the
125/126/65535/65536 length edges. Nothing here opens a socket or needs more than pytest.
"""

from __future__ import annotations

import ast
import json
import os
import random
import sys

import pytest

import microsocket as ms
from conftest import RFC_KEY, SCRIPT, random_client_bytes


# === 0. The module =================================================================================


OPTIONAL_ACCELERATORS = {"uvloop"}  # --loop uvloop: imported only when asked for, never required


def test_imports_only_the_standard_library():
    """Every import in microsocket.py, top level or not, names a standard-library module, except an
    optional accelerator imported inside a function, in a try whose handler catches ImportError."""
    with open(SCRIPT, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import"
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "__import__", "dynamic import"
        elif isinstance(node, ast.FunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Try) and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in inner.handlers):
                    for stmt in inner.body:
                        if isinstance(stmt, ast.Import):
                            guarded.update(alias.name.split(".")[0] for alias in stmt.names)
    assert names, "no imports found"
    outside = names - set(sys.stdlib_module_names)
    assert outside <= OPTIONAL_ACCELERATORS, f"not in the standard library: {outside - OPTIONAL_ACCELERATORS}"
    assert outside <= guarded, f"an optional accelerator imported outside a function's try/except ImportError: {outside - guarded}"
    assert "importlib" not in names


# === 3. Frame codec ===============================================================================


def test_rfc_unmasked_hello():
    """RFC 6455 §5.7: an unmasked "Hello" text frame is 81 05 48 65 6c 6c 6f, both ways."""
    wire = bytes.fromhex("810548656c6c6f")
    assert ms.serialize_frame(ms.Opcode.TEXT, b"Hello") == wire
    assert ms.Frame.parse(wire) == (ms.Frame(True, ms.Opcode.TEXT, b"Hello"), 7)


def test_rfc_masked_hello():
    """RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d is 81 85 37 fa 21 3d 7f 9f 4d 51 58, both ways."""
    wire = bytes.fromhex("818537fa213d7f9f4d5158")
    assert ms.serialize_frame(ms.Opcode.TEXT, b"Hello", mask=RFC_KEY) == wire
    assert ms.Frame(True, ms.Opcode.TEXT, b"Hello").serialize(RFC_KEY) == wire
    assert ms.Frame.parse(wire) == (ms.Frame(True, ms.Opcode.TEXT, b"Hello"), 11)
    header = ms.parse_header(wire)
    assert (header.fin, header.opcode, header.mask, header.length, header.size) == (True, 1, RFC_KEY, 5, 6)


@pytest.mark.parametrize("length, header_size", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
@pytest.mark.parametrize("mask", [None, RFC_KEY])
def test_serialize_frame_length_edges(length, header_size, mask):
    """The 7/16/64-bit length forms switch at 126 and 65536, and every size round-trips through Frame.parse."""
    payload = os.urandom(length)
    wire = ms.serialize_frame(ms.Opcode.BINARY, payload, mask=mask)
    size = header_size + (4 if mask else 0)
    assert len(wire) == size + length
    assert ms.parse_header(wire).size == size
    assert ms.Frame.parse(wire) == (ms.Frame(True, ms.Opcode.BINARY, payload), len(wire))


@pytest.mark.parametrize("frame_length", [125, 126, 127, 65535, 65536, 70000])
@pytest.mark.parametrize("signed", [False, True])
def test_message_frame_header_at_every_length_form(frame_length, signed):
    """message_frame writes its own header for 7- and 16-bit lengths: at each side of 126 and 65536
    the frame parses whole, FIN and TEXT, and holds the message's JSON (data, signature)."""
    signature = ("k1", "c2ln") if signed else None
    empty = len(ms.message_frame("t", 7, "m", b'""', signature)) - 2  # the payload with data "" (a 2-byte header)
    data = b'"' + b"a" * (frame_length - empty) + b'"'
    wire = ms.message_frame("t", 7, "m", data, signature)
    frame, used = ms.Frame.parse(wire)
    assert used == len(wire) and frame.fin and frame.opcode == ms.Opcode.TEXT
    assert len(frame.payload) == frame_length
    message = json.loads(frame.payload)
    assert message["data"] == data[1:-1].decode() and message["seqNo"] == 7
    assert (message.get("kid"), message.get("sig")) == (signature or (None, None))


@pytest.mark.parametrize("length", [0, 5, 126, 65536])
@pytest.mark.parametrize("mask", [None, RFC_KEY])
def test_parse_header_truncated_prefix_is_none(length, mask):
    """Every prefix shorter than the header gives None from parse_header (and Frame.parse), never an error."""
    wire = ms.serialize_frame(ms.Opcode.TEXT, b"a" * length, fin=False, mask=mask)
    size = ms.parse_header(wire).size
    for n in range(size):
        assert ms.parse_header(wire[:n]) is None, n
    for n in (size, len(wire) - 1) if length else ():
        assert ms.Frame.parse(wire[:n]) is None, n


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(bytes((0x81 | rsv << 4, 0)), id=f"rsv{rsv}") for rsv in (1, 2, 4, 7)
    ]
    + [pytest.param(bytes((0x80 | op, 0)), id=f"opcode{op:#x}") for op in (*range(3, 8), *range(0xB, 0x10))]
    + [
        pytest.param(b"\x09\x00", id="fragmented-ping"),
        pytest.param(b"\x08\x00", id="fragmented-close"),
        pytest.param(b"\x0a\x00", id="fragmented-pong"),
        pytest.param(b"\x89\x7e\x00\x7e", id="ping-126"),
        pytest.param(b"\x88\x7e\x00\x7e", id="close-126"),
        pytest.param(b"\x82\x7f\x80" + bytes(7), id="64bit-msb"),
    ],
)
def test_parse_header_violations_are_1002(wire):
    """Reserved bits, unknown opcodes, fragmented or long control frames and a 64-bit length with its MSB set are 1002."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_header(wire + bytes(20), 0, 1 << 20)
    assert info.value.code == 1002
    assert not isinstance(info.value, ms.PayloadTooBig)


def test_data_frame_over_max_size_is_payload_too_big():
    """A data frame longer than max_size raises PayloadTooBig (1009) from its header alone; max_size itself is fine."""
    assert ms.parse_header(ms.serialize_frame(ms.Opcode.BINARY, bytes(10)), 0, 10).length == 10
    header_only = ms.serialize_frame(ms.Opcode.BINARY, bytes(70000))[:10]
    with pytest.raises(ms.PayloadTooBig) as info:
        ms.parse_header(header_only, 0, 65536)
    assert info.value.code == 1009


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 1000])
def test_apply_mask_matches_naive_xor(length):
    """apply_mask equals a per-byte XOR with the repeated key and is its own inverse."""
    data, key = os.urandom(length), os.urandom(4)
    masked_data = ms.apply_mask(data, key)
    assert masked_data == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert ms.apply_mask(masked_data, key) == data


def test_parse_close_empty_and_one_byte():
    """An empty close payload means 1005 (and 1005 serializes to nothing); a 1-byte payload is a 1002 error."""
    assert ms.parse_close(b"") == (1005, "")
    assert ms.serialize_close(1005) == b""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_close(b"\x03")
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000])
def test_parse_close_invalid_codes(code):
    """Codes that may not appear in a close frame (RFC 6455 §7.4) are a 1002 error."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_close(code.to_bytes(2, "big"))
    assert info.value.code == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1012, 3000, 4999])
def test_close_valid_codes_round_trip(code):
    """Valid close codes with a UTF-8 reason round-trip through serialize_close and parse_close."""
    assert ms.parse_close(ms.serialize_close(code, "bye ✓")) == (code, "bye ✓")
    assert ms.parse_close(ms.serialize_close(code)) == (code, "")


def test_parse_close_invalid_utf8_reason():
    """A close reason that is not UTF-8 is a 1002 error."""
    with pytest.raises(ms.ProtocolError) as info:
        ms.parse_close(b"\x03\xe8ok\xff")
    assert info.value.code == 1002


def test_serialize_close_long_reason_stays_valid_utf8():
    """A reason too long for a control frame is shortened to at most 125 bytes of still-valid UTF-8."""
    payload = ms.serialize_close(1000, "é" * 100)
    assert len(payload) <= 125
    assert ms.parse_close(payload)[0] == 1000


def test_fuzz_frame_parse_raises_only_protocol_errors():
    """Frame.parse on random bytes (5000 seeds) returns None or a frame, or raises ProtocolError, nothing else."""
    outcomes = set()
    for seed in range(5000):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randint(0, 20)) if seed % 2 else random_client_bytes(rng)
        try:
            parsed = ms.Frame.parse(data, max_size=rng.choice([None, 100]))
        except ms.ProtocolError as exc:
            assert exc.code in (1002, 1009), exc
            outcomes.add(exc.code)
            continue
        outcomes.add(None if parsed is None else "frame")
        if parsed is not None:
            frame, used = parsed
            assert 2 <= used <= len(data) and len(frame.payload) <= used
    assert outcomes == {None, "frame", 1002, 1009}  # every outcome was exercised
