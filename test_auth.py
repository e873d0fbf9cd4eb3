"""Section 11 of microsocket.py: JWT verification, keys, ACLs and signing (its primitives; test_trust.py
tests them through the broker, the routes and the server).

Vectors come from the RFCs themselves: RFC 7515 Appendix A.1 (HS256) and A.2 (RS256) with their
keys, RFC 7519 §3.1, RFC 8785's number table (Appendix B), its sample object (§3.2.2) and its
sorting example (§3.2.3). Tokens the RFCs do not give are built here by hand: HMAC with hmac, and
RS256 with a test-only PKCS#1 v1.5 signer (pow(m, d, n)) that is first shown to reproduce RFC 7515
A.2's signature byte for byte. openssl, cryptography, PyJWT and jcs, when present, cross-check
from outside; each test that needs one says so when it skips.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import json
import math
import os
import random
import re
import shutil
import struct
import subprocess
import sys

import pytest

import microsocket as auth  # section 11's names, as `auth.` for reading
import microsocket as ms
from conftest import FakeClock

HERE = os.path.dirname(os.path.abspath(__file__))
NOW = 1_700_000_000.0  # the fake clock's Unix time for tokens made here


# === helpers =======================================================================================


def b64u(raw: bytes) -> str:
    """base64url without padding, written with the stdlib only (independent of the module)."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def segment(value) -> str:
    """A token segment: raw bytes as they are, anything else as compact JSON."""
    raw = value if isinstance(value, bytes) else json.dumps(value, separators=(",", ":")).encode()
    return b64u(raw)


def hs_token(payload, secret: bytes, header=None) -> str:
    """An HS256 token signed with hmac directly; `header`/`payload` may be raw bytes."""
    head = segment({"alg": "HS256", "typ": "JWT"} if header is None else header)
    body = segment(payload)
    mac = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64u(mac)}"


# RFC 8017 §9.2 note 1: the DER DigestInfo prefix for SHA-256 (written again here, not imported).
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def rsa_sign(message: bytes, n: int, d: int) -> bytes:
    """Test-only RSASSA-PKCS1-v1_5-SIGN with SHA-256 (RFC 8017 §8.2.1): EM, then s = m^d mod n."""
    k = (n.bit_length() + 7) // 8
    t = SHA256_PREFIX + hashlib.sha256(message).digest()
    em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    return pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")


def rs_token(payload, header=None, n: int | None = None, d: int | None = None) -> str:
    """An RS256 token signed by the test signer (default: RFC 7515 A.2's key)."""
    n = RFC_RSA_N if n is None else n
    d = RFC_RSA_D if d is None else d
    head = segment({"alg": "RS256"} if header is None else header)
    body = segment(payload)
    return f"{head}.{body}.{b64u(rsa_sign(f'{head}.{body}'.encode(), n, d))}"


def b64u_int(value: str) -> int:
    return int.from_bytes(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)), "big")


def refusal(verifier, token) -> ms.ClientError:
    """The ClientError a refused token raises; fails if it is accepted or anything else is raised."""
    with pytest.raises(ms.ClientError) as info:
        verifier.verify(token)
    return info.value


def fuzz(strategy, draw_random, check, examples: int = 300) -> None:
    """Run check(value) on values from a hypothesis strategy when hypothesis is installed, else on
    `examples` values from draw_random(rng) with a seeded random.Random (the same run every time)."""
    try:
        import hypothesis
        from hypothesis import HealthCheck, given, settings
    except ImportError:
        rng = random.Random(20240611)
        for _ in range(examples):
            check(draw_random(rng))
        return

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy(hypothesis.strategies))
    def run(value):
        check(value)

    run()


# --- RFC 7515 Appendix A.1 (HS256) and A.2 (RS256); RFC 7519 §3.1 uses the same A.1 token --------

RFC_HS_JWK = {"kty": "oct", "k": "AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3Yj0iPS4hcgUuTwjAzZr1Z9CAow"}
RFC_HS_TOKEN = (
    "eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
)
# A.1.1: "the actual octet sequence representing UTF8(JWS Protected Header)" and the HMAC value.
RFC_HS_HEADER_OCTETS = [123, 34, 116, 121, 112, 34, 58, 34, 74, 87, 84, 34, 44, 13, 10, 32, 34, 97, 108, 103, 34, 58, 34, 72, 83, 50, 53, 54, 34, 125]
RFC_HS_MAC_OCTETS = [116, 24, 223, 180, 151, 153, 224, 37, 79, 250, 96, 125, 216, 173, 187, 186, 22, 212, 37, 77, 105, 214, 191, 240, 91, 88, 5, 88, 83, 132, 141, 121]
RFC_PAYLOAD_BYTES = b'{"iss":"joe",\r\n "exp":1300819380,\r\n "http://example.com/is_root":true}'
RFC_CLAIMS = {"iss": "joe", "exp": 1300819380, "http://example.com/is_root": True}
RFC_EXP = 1300819380

RFC_RSA_JWK = {
    "kty": "RSA",
    "n": "ofgWCuLjybRlzo0tZWJjNiuSfb4p4fAkd_wWJcyQoTbji9k0l8W26mPddxHmfHQp-Vaw-4qPCJrcS2mJPMEzP1Pt0Bm4d4QlL-yRT-SFd2lZS-pCgNMsD1W_YpRPEwOWvG6b32690r2jZ47soMZo9wGzjb_7OMg0LOL-bSf63kpaSHSXndS5z5rexMdbBYUsLA9e-KXBdQOS-UTo7WTBEMa2R2CapHg665xsmtdVMTBQY4uDZlxvb3qCo5ZwKh9kG4LT6_I5IhlJH7aGhyxXFvUK-DWNmoudF8NAco9_h9iaGNj8q2ethFkMLs91kzk2PAcDTW9gb54h4FRWyuXpoQ",
    "e": "AQAB",
}
RFC_RSA_D_B64 = (
    "Eq5xpGnNCivDflJsRQBXHx1hdR1k6Ulwe2JZD50LpXyWPEAeP88vLNO97IjlA7_GQ5sLKMgvfTeXZx9SE-7YwVol2NXOoAJe46sui395IW_GO-pWJ1O0BkTG"
    "oVEn2bKVRUCgu-GjBVaYLU6f3l9kJfFNS3E0QbVdxzubSu3Mkqzjkn439X0M_V51gfpRLI9JYanrC4D4qAdGcopV_0ZHHzQlBjudU2QvXt4ehNYTCBr6XCLQ"
    "UShb1juUO1ZdiYoFaFQT5Tw8bGUl_x_jTj3ccPDVZFD9pIuhLhBOneufuBiB4cS98l2SR_RQyGWSeWjnczT0QU91p1DhOVRuOopznQ"
)
RFC_RSA_N = b64u_int(RFC_RSA_JWK["n"])
RFC_RSA_D = b64u_int(RFC_RSA_D_B64)
RFC_RS_TOKEN = (
    "eyJhbGciOiJSUzI1NiJ9"
    ".eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkzODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ"
    ".cC4hiUPoj9Eetdgtv3hF80EGrhuB__dzERat0XF9g2VtQgr9PJbu3XOiZj5RZmh7AAuHIm4Bh-0Qc_lF5YKt_O8W2Fp5jujGbds9uJdbF9CUAr7t1dnZcAcQ"
    "jbKBYNX4BAynRFdiuB--f_nZLgrnbyTyWzO75vRK5h6xBArLIARNPvkSjtQBMHlb1L07Qe7K0GarZRmB_eSN9383LcOLn6_dO--xi12jzDwusC-eOkHWEsqtF"
    "ZESc6BfI7noOPqvhJ1phCnvWh6IeYI2w9QOYEUipUTI8np6LbgGY9Fs98rqVt5AXLIhWkWywlVmtVrBp0igcN_IoypGlUPQGe77Rw"
)

SECRET = b"a test secret of at least 32 bytes!!"  # the HS256 key of the tokens made here
OTHER_SECRET = b"another secret, also 32 bytes or more"
RSA_PUBLIC_TEXT = json.dumps(RFC_RSA_JWK).encode()  # what an attacker would HMAC with in alg confusion


def rfc_rsa_key(kid=None) -> auth.RS256Key:
    return auth.RS256Key(RFC_RSA_N, 65537, kid)


def good(**claims) -> dict:
    """A valid claim set (sub, exp in an hour), with `claims` added or replaced."""
    return {"sub": "alice", "exp": int(NOW) + 3600, **claims}


# === 0. The module =================================================================================


def test_client_error_is_section_2s():
    """The module raises microsocket's own ClientError, so section 12's one except clause catches it."""
    assert auth.ClientError is ms.ClientError


# === 1. Strict parsing helpers =====================================================================


def test_b64url_round_trip_every_length():
    """b64url_decode inverts b64url_encode for every length 0..64 and for all 256 byte values."""
    for length in range(65):
        raw = bytes((i * 37 + length) % 256 for i in range(length))
        assert auth.b64url_decode(auth.b64url_encode(raw)) == raw
        assert auth.b64url_encode(raw) == b64u(raw)
    assert auth.b64url_decode(b64u(bytes(range(256)))) == bytes(range(256))


@pytest.mark.parametrize(
    "text, why",
    [
        ("e30=", "padding"),
        ("e3 0", "alphabet"),
        ("e3+0", "alphabet ('+' is base64, not base64url)"),
        ("e3/0", "alphabet ('/')"),
        ("e30.", "alphabet ('.')"),
        ("e3\n0", "alphabet (newline)"),
        ("e30aa", "a length of 4n+1"),
        ("e31", "non-canonical: the unused low bits of the last character set"),
        ("QR", "non-canonical (one byte: 4 unused bits)"),
        ("QUF", "non-canonical (two bytes: 2 unused bits)"),
    ],
)
def test_b64url_decode_refuses(text, why):
    """b64url_decode refuses padding, characters outside the base64url alphabet, impossible lengths and non-canonical trailing bits."""
    with pytest.raises(ValueError, match="base64url"):
        auth.b64url_decode(text)


def test_b64url_decode_accepts_canonical_tails():
    """The canonical spellings next to the refused ones decode: "e30" is "{}", "QQ" is "A", "QUE" is "AA"."""
    assert auth.b64url_decode("e30") == b"{}"
    assert auth.b64url_decode("QQ") == b"A"
    assert auth.b64url_decode("QUE") == b"AA"
    assert auth.b64url_decode("") == b""


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"a":1,"a":2}', "duplicate key 'a'"),
        ('{"x":{"b":1,"b":1}}', "duplicate key 'b'"),
        ('[{"a":1,"a":1}]', "duplicate key"),
        ('{"a":NaN}', "NaN"),
        ('{"a":Infinity}', "Infinity"),
        ('{"a":-Infinity}', "-Infinity"),
        ('{"a":1e400}', "out of range"),
        ('{"a":"\\ud800"}', "surrogate"),
        ('["\\udc00x"]', "surrogate"),
        ('{"\\ud83d":1}', "surrogate"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("{'a':1}", "property name"),
        ("", "Expecting value"),
        (b"\xff\xfe", "UTF-8"),
        (b'{"a":"\xc3"}', "UTF-8"),
    ],
)
def test_strict_json_refuses(text, words):
    """strict_json_loads refuses duplicate keys at any depth, NaN/Infinity, overflowing numbers, lone surrogates, deep nesting, non-JSON and non-UTF-8 bytes."""
    with pytest.raises(ValueError) as info:
        auth.strict_json_loads(text)
    assert words in str(info.value)


def test_strict_json_accepts_what_json_allows():
    """Paired surrogate escapes, big ints, whitespace (RFC 7515 A.1 has CRLFs) and UTF-8 bytes parse like json.loads."""
    assert auth.strict_json_loads('{"e":"\\ud83d\\ude00"}') == {"e": "\U0001f600"}
    assert auth.strict_json_loads("[123456789012345678901234567890, 1.5e300, -0.0]") == [123456789012345678901234567890, 1.5e300, -0.0]
    assert auth.strict_json_loads(RFC_PAYLOAD_BYTES) == RFC_CLAIMS
    assert auth.strict_json_loads("é".join(['["', '"]']).encode("utf-8")) == ["é"]


# === 2. Keys =======================================================================================


def test_rfc7515_a1_jwk_loads_as_hs256():
    """RFC 7515 A.1's JWK (kty oct, 64-byte k) loads as one HS256 key without a kid."""
    (key,) = auth.load_jwk_set(json.dumps({"keys": [RFC_HS_JWK]}))
    assert isinstance(key, auth.HS256Key) and key.alg == "HS256" and key.kid is None


def test_rfc7515_a2_public_jwk_loads_as_rs256():
    """RFC 7515 A.2's public JWK (n, e) loads as a 2048-bit RS256 key, with kid, alg and use kept or checked."""
    jwk = {**RFC_RSA_JWK, "kid": "rfc", "alg": "RS256", "use": "sig", "key_ops": ["verify"]}
    (key,) = auth.load_jwk_set(json.dumps({"keys": [jwk]}))
    assert isinstance(key, auth.RS256Key)
    assert (key.kid, key.n, key.e, key.size, key.n.bit_length()) == ("rfc", RFC_RSA_N, 65537, 256, 2048)


def test_jwk_set_keeps_order_and_kinds():
    """A JWK Set with an oct and an RSA key gives both, in order, each its own type."""
    keys = auth.load_jwk_set(json.dumps({"keys": [{**RFC_HS_JWK, "kid": "h"}, {**RFC_RSA_JWK, "kid": "r"}], "extra": 1}))
    assert [(type(k).__name__, k.kid) for k in keys] == [("HS256Key", "h"), ("RS256Key", "r")]


def _jwks(*keys) -> str:
    return json.dumps({"keys": list(keys)})


SHORT_K = b64u(b"x" * 31)
GOOD_K = b64u(b"x" * 32)
SMALL_N = b64u(b"\xff" * 255)  # a 2040-bit modulus


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "not JSON"),
        ('{"keys":[],"keys":[]}', "duplicate key 'keys'"),
        ("[]", 'expected a JSON object {"keys"'),
        ('{"keys":{}}', 'expected a JSON object {"keys"'),
        ('{"keys":[]}', "'keys' is empty"),
        (_jwks("oct"), "key 0: is not a JSON object"),
        (_jwks({"kty": "oct", "k": GOOD_K}, {"kty": "EC", "kid": "ec1"}), "key 1 (kid 'ec1'): 'kty' 'EC' is not supported"),
        (_jwks({"k": GOOD_K}), "key 0: 'kty' None is not supported"),
        (_jwks({"kty": "oct", "k": GOOD_K, "use": "enc"}), "'use' is 'enc'"),
        (_jwks({"kty": "oct", "k": GOOD_K, "key_ops": ["sign"]}), "'key_ops' does not include \"verify\""),
        (_jwks({"kty": "oct", "k": GOOD_K, "alg": "HS512"}), "'alg' 'HS512' does not fit kty 'oct'"),
        (_jwks({"kty": "oct", "k": GOOD_K, "alg": "RS256"}), "'alg' 'RS256' does not fit kty 'oct'"),
        (_jwks({**RFC_RSA_JWK, "alg": "HS256"}), "'alg' 'HS256' does not fit kty 'RSA'"),
        (_jwks({"kty": "oct"}), "needs 'k'"),
        (_jwks({"kty": "oct", "k": GOOD_K + "="}), "'k' is not base64url"),
        (_jwks({"kty": "oct", "k": SHORT_K, "kid": "short"}), "key 0 (kid 'short'): an HS256 key of 31 bytes is too short"),
        (_jwks({"kty": "RSA", "e": "AQAB"}), "needs 'n' and 'e'"),
        (_jwks({"kty": "RSA", "n": SMALL_N, "e": "AQAB"}), "2040 bits is too small"),
        (_jwks({"kty": "RSA", "n": b64u(b"\x00" + RFC_RSA_N.to_bytes(256, "big")), "e": "AQAB"}), "leading zero octet"),
        (_jwks({"kty": "RSA", "n": RFC_RSA_JWK["n"], "e": b64u(b"\x01\x00\x00")}), "public exponent must be odd"),
        (_jwks({"kty": "RSA", "n": RFC_RSA_JWK["n"], "e": "AQ"}), "public exponent must be odd, at least 3"),
        (_jwks({"kty": "RSA", "n": RFC_RSA_JWK["n"], "e": 65537}), "'e' must be a base64url string"),
        (_jwks({**RFC_RSA_JWK, "d": RFC_RSA_D_B64}), "private RSA members (d)"),
        (_jwks({"kty": "oct", "k": GOOD_K, "kid": "a"}, {**RFC_RSA_JWK, "kid": "a"}), "key 1 (kid 'a'): the kid is used by an earlier key"),
        (_jwks({"kty": "oct", "k": GOOD_K, "kid": ""}), "'kid' must be a non-empty string"),
        (_jwks({"kty": "oct", "k": GOOD_K, "kid": 7}), "'kid' must be a non-empty string"),
    ],
)
def test_load_jwk_set_refuses_with_a_clear_message(text, words):
    """Every JWK Set the gateway cannot use exactly as written is a ValueError naming the key (index, kid) and the problem."""
    with pytest.raises(ValueError) as info:
        auth.load_jwk_set(text)
    assert words in str(info.value)
    assert str(info.value).startswith("JWK Set")


def test_rsa_modulus_bound_is_2048_bits_exactly():
    """RS256Key takes an odd 2048-bit modulus and refuses a 2047-bit one (RFC 7518 §3.3)."""
    assert auth.RS256Key((1 << 2047) | 1, 65537).size == 256
    with pytest.raises(ValueError, match="2047 bits"):
        auth.RS256Key((1 << 2046) | 1, 65537)
    with pytest.raises(ValueError, match="even"):
        auth.RS256Key(1 << 2047, 65537)


def test_jwt_secret_counts_utf8_bytes():
    """--jwt-secret needs 32 UTF-8 bytes: 16 'é' (32 bytes) pass, 15 'é' and an 'a' (31 bytes) do not."""
    key = auth.jwt_secret_key("é" * 16)
    token = hs_token(good(), ("é" * 16).encode())
    assert auth.JWTVerifier([key], clock=lambda: NOW).verify(token).sub == "alice"
    with pytest.raises(ValueError, match="31 bytes; at least 32"):
        auth.jwt_secret_key("é" * 15 + "a")
    with pytest.raises(ValueError, match="0 bytes"):
        auth.jwt_secret_key("")
    with pytest.raises(ValueError, match="lone surrogate"):
        auth.jwt_secret_key("\udcff" * 40)


def test_key_reprs_never_show_secrets():
    """repr of an HS256 key, of signing keys and of grants shows ids only, never the secret (they end up in logs)."""
    assert SECRET.decode() not in repr(auth.HS256Key(SECRET, "k1")) and "k1" in repr(auth.HS256Key(SECRET, "k1"))
    keys = auth.SigningKeys.parse(["v1=" + SECRET.decode()])
    assert SECRET.decode() not in repr(keys) and "v1" in repr(keys)
    assert "bits=2048" in repr(rfc_rsa_key())


def test_verifier_configuration_errors():
    """JWTVerifier refuses no keys, two keys sharing a kid, a negative or infinite leeway and an empty audience."""
    with pytest.raises(ValueError, match="at least one key"):
        auth.JWTVerifier([])
    with pytest.raises(ValueError, match="kid 'a'"):
        auth.JWTVerifier([auth.HS256Key(SECRET, "a"), rfc_rsa_key("a")])
    for leeway in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="leeway"):
            auth.JWTVerifier([auth.HS256Key(SECRET)], leeway=leeway)
    with pytest.raises(ValueError, match="audience"):
        auth.JWTVerifier([auth.HS256Key(SECRET)], audience="")


def test_build_verifier_demo_and_jwt():
    """No key gives demo auth (the token is the userId); a secret and a JWK Set together give one verifier holding both."""
    demo = auth.build_verifier()
    assert demo.demo and demo.verify("alice") == auth.Claims("alice", None, None, None)
    with pytest.raises(ms.ClientError) as info:
        demo.verify("")
    assert info.value.code == "AUTH_FAILED"
    with pytest.raises(ValueError, match="need a JWT key"):
        auth.build_verifier(audience="x")
    both = auth.build_verifier(SECRET.decode(), _jwks({**RFC_RSA_JWK, "kid": "r"}), clock=lambda: NOW)
    assert not both.demo
    assert both.verify(hs_token(good(), SECRET)).sub == "alice"
    assert both.verify(rs_token(good(sub="bob"), {"alg": "RS256", "kid": "r"})).sub == "bob"


# === 3. Tokens: the RFC vectors =====================================================================


def test_rfc7515_a1_octets():
    """RFC 7515 A.1.1: the header segment decodes to the RFC's exact octets, the payload to its CRLF text, the signature to its HMAC octets."""
    header, payload, signature = RFC_HS_TOKEN.split(".")
    assert list(auth.b64url_decode(header)) == RFC_HS_HEADER_OCTETS
    assert auth.b64url_decode(payload) == RFC_PAYLOAD_BYTES
    assert list(auth.b64url_decode(signature)) == RFC_HS_MAC_OCTETS


def test_rfc7515_a1_hs256_verifies_with_its_jwk():
    """RFC 7515 A.1's token verifies with its own JWK before its exp, and its payload is the RFC's claim set."""
    keys = auth.load_jwk_set(json.dumps({"keys": [RFC_HS_JWK]}))
    verifier = auth.JWTVerifier(keys, clock=lambda: RFC_EXP - 60)
    assert verifier.decode(RFC_HS_TOKEN) == RFC_CLAIMS


def test_rfc7519_3_1_claims_and_the_missing_sub():
    """RFC 7519 §3.1's JWT (the same token) passes every check up to `sub`, which it lacks: the reason says so, and after exp + leeway it is "expired"."""
    keys = auth.load_jwk_set(json.dumps({"keys": [RFC_HS_JWK]}))
    before = refusal(auth.JWTVerifier(keys, clock=lambda: RFC_EXP - 60), RFC_HS_TOKEN)
    assert before.code == "AUTH_FAILED" and "no 'sub'" in before.message
    assert "expired" in refusal(auth.JWTVerifier(keys, clock=lambda: RFC_EXP + 30), RFC_HS_TOKEN).message
    # inside the leeway the token is not expired yet: the failure is still the missing sub
    assert "no 'sub'" in refusal(auth.JWTVerifier(keys, clock=lambda: RFC_EXP + 29.9), RFC_HS_TOKEN).message


def test_rfc7515_a1_with_the_wrong_key_is_a_bad_signature():
    """A.1's token against any other 64-byte key fails at the signature, before the (sub-less) claims."""
    verifier = auth.JWTVerifier([auth.HS256Key(b"\x00" * 64)], clock=lambda: RFC_EXP - 60)
    assert "signature does not verify" in refusal(verifier, RFC_HS_TOKEN).message


def test_rfc7515_a2_rs256_verifies_with_its_public_key():
    """RFC 7515 A.2's RS256 token verifies, in pure Python, with the public half of the RFC's 2048-bit key."""
    keys = auth.load_jwk_set(json.dumps({"keys": [RFC_RSA_JWK]}))
    assert auth.JWTVerifier(keys, clock=lambda: RFC_EXP - 60).decode(RFC_RS_TOKEN) == RFC_CLAIMS


def test_test_signer_reproduces_rfc7515_a2():
    """The tests' own PKCS#1 v1.5 signer, given A.2's private exponent, makes A.2's signature byte for byte (so tokens it makes are real RS256)."""
    header, payload, signature = RFC_RS_TOKEN.split(".")
    assert b64u(rsa_sign(f"{header}.{payload}".encode(), RFC_RSA_N, RFC_RSA_D)) == signature


def test_rfc7515_a2_any_changed_bit_fails():
    """Flipping any one of 64 spread bits of A.2's signature makes it fail (the comparison covers the whole block)."""
    key = rfc_rsa_key()
    header, payload, signature = RFC_RS_TOKEN.split(".")
    raw = bytearray(base64.urlsafe_b64decode(signature + "=="))
    message = f"{header}.{payload}".encode()
    assert key.verify(message, bytes(raw))
    for bit in range(0, 2048, 32):
        flipped = bytearray(raw)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert not key.verify(message, bytes(flipped)), bit


def test_rs256_refuses_a_bleichenbacher_forgery():
    """With e = 3, a cube root gives a block that starts 00 01 FF 00 DigestInfo H and ends in garbage; a parser would accept it, the whole-block comparison does not."""
    key = auth.RS256Key(RFC_RSA_N, 3)
    message = b"header.payload"
    t = SHA256_PREFIX + hashlib.sha256(message).digest()
    prefix = b"\x00\x01\xff\x00" + t
    target = int.from_bytes(prefix + b"\xff" * (256 - len(prefix)), "big")
    s = _icbrt(target)
    forged = s.to_bytes(256, "big")
    em = pow(s, 3, RFC_RSA_N).to_bytes(256, "big")
    assert em.startswith(prefix) and em != b"\x00\x01" + b"\xff" * (256 - len(t) - 3) + b"\x00" + t  # the forgery is real
    assert not key.verify(message, forged)


def _icbrt(x: int) -> int:
    """The integer cube root (floor) by Newton's method."""
    r = 1 << ((x.bit_length() + 2) // 3)
    while True:
        nr = (2 * r + x // (r * r)) // 3
        if nr >= r:
            break
        r = nr
    while r * r * r > x:
        r -= 1
    return r


def test_rs256_signature_length_and_range():
    """RFC 8017 §8.2.2: a signature one octet short or long, or s >= n, is invalid (not an exception)."""
    key = rfc_rsa_key()
    message = b"x.y"
    good_sig = rsa_sign(message, RFC_RSA_N, RFC_RSA_D)
    assert key.verify(message, good_sig)
    assert not key.verify(message, good_sig[1:])
    assert not key.verify(message, b"\x00" + good_sig)
    assert not key.verify(message, RFC_RSA_N.to_bytes(256, "big"))
    assert not key.verify(message, b"\xff" * 256)
    assert not key.verify(message, b"")


def test_rs256_signature_plus_n_is_refused():
    """s + n has the same residue as a valid s, but RFC 8017 §5.2.2 requires s < n: the second spelling of a signature is refused (no malleability)."""
    key = rfc_rsa_key()
    for i in range(100):  # find a signature small enough that s + n still fits in k octets
        message = f"m{i}".encode()
        s = int.from_bytes(rsa_sign(message, RFC_RSA_N, RFC_RSA_D), "big")
        if s + RFC_RSA_N < 1 << 2048:
            break
    assert key.verify(message, s.to_bytes(256, "big"))
    assert not key.verify(message, (s + RFC_RSA_N).to_bytes(256, "big"))


# === 3. Tokens: claims, key selection, leeway ======================================================


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
def hs(clock) -> auth.JWTVerifier:
    """A verifier with one HS256 key (SECRET, no kid)."""
    return auth.JWTVerifier([auth.HS256Key(SECRET)], clock=clock)


def test_valid_token_gives_claims(hs):
    """A good HS256 token gives sub, exp as written (an int stays an int) and read/write as tuples."""
    claims = hs.verify(hs_token(good(read=["a.*", "b"], write=[]), SECRET))
    assert claims == auth.Claims("alice", int(NOW) + 3600, ("a.*", "b"), ())
    assert type(claims.exp) is int
    float_exp = hs.verify(hs_token({"sub": "bob", "exp": NOW + 0.5}, SECRET))
    assert float_exp.exp == NOW + 0.5
    bare = hs.verify(hs_token({"sub": "carol"}, SECRET))
    assert bare == auth.Claims("carol", None, None, None)


def test_token_of_exactly_8192_bytes_is_accepted(hs):
    """The size bound is inclusive: a valid token of exactly 8192 bytes verifies; one byte more is refused for its size alone."""
    token = None
    for typ in ("J", "JW", "JWT", "JWTx"):  # base64 lengths skip 4n+1, so vary the header too
        for pad in range(6000, 6200):
            candidate = hs_token(good(pad="x" * pad), SECRET, {"alg": "HS256", "typ": typ})
            if len(candidate) == 8192:
                token = candidate
        if token:
            break
    assert token is not None and len(token) == 8192
    assert hs.verify(token).sub == "alice"
    error = refusal(hs, token + "A")
    assert "8193 characters, over the 8192-byte limit" in error.message


def test_leeway_boundaries(clock):
    """exp + leeway <= now is expired and one millisecond earlier is not; nbf - leeway > now and iat - leeway > now are refused, equal is not."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET)], leeway=30, clock=clock)
    exp_token = hs_token({"sub": "a", "exp": NOW}, SECRET)
    clock.now = NOW + 30
    assert "expired" in refusal(verifier, exp_token).message
    clock.now = NOW + 29.999
    assert verifier.verify(exp_token).sub == "a"
    for claim, words in (("nbf", "not valid yet"), ("iat", "issued in the future")):
        token = hs_token({"sub": "a", claim: NOW + 30}, SECRET)
        clock.now = NOW
        assert verifier.verify(token).sub == "a"  # nbf - leeway == now: valid
        clock.now = NOW - 0.001
        assert words in refusal(verifier, token).message


def test_zero_leeway(clock):
    """With --jwt-leeway 0 a token is expired at exp exactly and valid just before."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET)], leeway=0, clock=clock)
    token = hs_token({"sub": "a", "exp": NOW}, SECRET)
    assert "expired" in refusal(verifier, token).message
    clock.now = NOW - 0.001
    assert verifier.verify(token).sub == "a"


def test_audience_and_issuer(clock):
    """With audience and issuer configured: aud as a string or in a list, and the exact iss, pass; anything else is refused without echoing the server's values."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET)], audience="aud-9f3", issuer="https://idp.example", clock=clock)
    ok = {"sub": "a", "iss": "https://idp.example"}
    assert verifier.verify(hs_token({**ok, "aud": "aud-9f3"}, SECRET)).sub == "a"
    assert verifier.verify(hs_token({**ok, "aud": ["other", "aud-9f3"]}, SECRET)).sub == "a"
    cases = [
        ({**ok}, "no 'aud'"),
        ({**ok, "aud": "other"}, "'aud' 'other' does not name this server's audience"),
        ({**ok, "aud": ["x", "y"]}, "'aud' ['x', 'y'] does not name"),
        ({**ok, "aud": []}, "does not name"),
        ({**ok, "aud": ["other", 1]}, "neither a string nor a list of strings"),
        ({**ok, "aud": 5}, "neither a string nor a list"),
        ({**ok, "aud": None}, "neither a string nor a list"),
        ({"sub": "a", "aud": "aud-9f3", "iss": None}, "'iss' None is not this server's issuer"),
        ({"sub": "a", "aud": "aud-9f3"}, "no 'iss'"),
        ({"sub": "a", "aud": "aud-9f3", "iss": "https://evil"}, "'iss' 'https://evil' is not this server's issuer"),
        ({"sub": "a", "aud": "aud-9f3", "iss": ["x"]}, "is not this server's issuer"),
    ]
    for payload, words in cases:
        error = refusal(verifier, hs_token(payload, SECRET))
        assert words in error.message, payload
        assert "idp.example" not in error.message and "aud-9f3" not in error.message


def test_aud_and_iss_ignored_when_not_configured(hs):
    """Without --jwt-audience/--jwt-issuer, any aud or iss (even of an odd type) is not checked (SPEC: "must match when configured")."""
    assert hs.verify(hs_token({"sub": "a", "aud": 5, "iss": ["x"]}, SECRET)).sub == "a"


def test_kid_selects_the_key(clock):
    """With kids, the token's kid picks the key: signed by that key it verifies, signed by another configured key it does not."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET, "a"), auth.HS256Key(OTHER_SECRET, "b")], clock=clock)
    assert verifier.verify(hs_token(good(), OTHER_SECRET, {"alg": "HS256", "kid": "b"})).sub == "alice"
    assert verifier.verify(hs_token(good(), SECRET, {"alg": "HS256", "kid": "a"})).sub == "alice"
    error = refusal(verifier, hs_token(good(), OTHER_SECRET, {"alg": "HS256", "kid": "a"}))
    assert "signature does not verify with key 'a'" in error.message


def test_no_kid_tries_every_key_of_the_type(clock):
    """Without a kid, each HS256 key is tried (rotation without kids), and an RS256 token is tried against the RSA keys only."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET, "a"), rfc_rsa_key("r"), auth.HS256Key(OTHER_SECRET)], clock=clock)
    assert verifier.verify(hs_token(good(), OTHER_SECRET)).sub == "alice"
    assert verifier.verify(hs_token(good(), SECRET)).sub == "alice"
    assert verifier.verify(rs_token(good())).sub == "alice"
    error = refusal(verifier, hs_token(good(), b"x" * 40))
    assert "signature does not verify with the configured HS256 keys" in error.message


def test_unknown_kid_is_refused_even_if_a_key_would_verify(hs):
    """A kid that names no configured key is refused although the kid-less key would verify the signature."""
    error = refusal(hs, hs_token(good(), SECRET, {"alg": "HS256", "kid": "nope"}))
    assert "kid 'nope' is not a configured key" in error.message


def test_alg_confusion_hs256_with_the_rsa_public_key(clock):
    """The classic confusion: HS256 "signed" with the RSA public key as HMAC secret is refused, with the kid of the RSA key or without a kid."""
    rsa_only = auth.JWTVerifier([rfc_rsa_key("r")], clock=clock)
    with_kid = hs_token(good(), RSA_PUBLIC_TEXT, {"alg": "HS256", "kid": "r"})
    assert "alg HS256 does not fit key 'r', an RSA key (RS256 only)" in refusal(rsa_only, with_kid).message
    without = hs_token(good(), RSA_PUBLIC_TEXT)
    assert "no oct key is configured" in refusal(rsa_only, without).message
    n_bytes = hs_token(good(), RFC_RSA_N.to_bytes(256, "big"))
    assert "no oct key" in refusal(rsa_only, n_bytes).message


def test_alg_confusion_rs256_with_an_hmac_key(clock):
    """RS256 naming an HS256 key's kid, or RS256 with only HMAC keys configured, is refused before any RSA arithmetic."""
    hs_only = auth.JWTVerifier([auth.HS256Key(SECRET, "h")], clock=clock)
    assert "does not fit key 'h', an oct key (HS256 only)" in refusal(hs_only, rs_token(good(), {"alg": "RS256", "kid": "h"})).message
    assert "no RSA key is configured" in refusal(hs_only, rs_token(good())).message


def test_signature_is_checked_before_any_claim(hs):
    """A wrongly signed token fails as "signature" even when its claims are expired, sub-less or not JSON at all."""
    for payload in ({"exp": 1}, {"sub": 5, "nbf": NOW * 2}, b"not json", b"[1,2]"):
        assert "signature does not verify" in refusal(hs, hs_token(payload, OTHER_SECRET)).message


def test_claims_are_never_read_for_a_bad_signature(hs, monkeypatch):
    """verify() never reaches check_claims for a bad signature (the claims are not even parsed)."""
    def boom(*_):
        raise AssertionError("claims read before the signature was checked")

    monkeypatch.setattr(hs, "check_claims", boom)
    monkeypatch.setattr(auth, "_numeric_date", boom)
    assert "signature" in refusal(hs, hs_token(good(), OTHER_SECRET)).message


def test_numeric_date_refuses_non_finite_values():
    """_numeric_date refuses an infinite float, NaN and an int beyond a double's range (strict JSON already stops 1e400 in text)."""
    for value in (math.inf, -math.inf, math.nan, 10**400):
        with pytest.raises(ms.ClientError, match="not a finite number"):
            auth._numeric_date({"exp": value}, "exp")
    assert auth._numeric_date({"exp": 10**20}, "exp") == 10**20


# === 3. Tokens: the refusal table ==================================================================

HS_HEADER = {"alg": "HS256"}
B64_BAD_CHAR = "e30*"


def _signed_raw(head: str, body: str, secret: bytes = SECRET) -> str:
    """A token from raw segments, HMAC-signed over them as they are (malformed or not)."""
    return f"{head}.{body}.{b64u(hmac.new(secret, f'{head}.{body}'.encode(), hashlib.sha256).digest())}"


REFUSALS = [
    # shape
    ("not a string: None", None, "must be a string"),
    ("not a string: int", 12345, "must be a string"),
    ("not a string: bytes", b"a.b.c", "must be a string"),
    ("not a string: list", ["a", "b", "c"], "must be a string"),
    ("empty", "", "empty"),
    ("over 8 KiB", "a." + "b" * 8190 + ".c", "over the 8192-byte limit"),
    ("non-ASCII", "eyJ.é.x", "neither base64url nor '.'"),
    ("one part", "abc", "1 part(s)"),
    ("two parts", "abc.def", "2 part(s)"),
    ("four parts", "a.b.c.d", "4 part(s)"),
    ("five parts (JWE)", "a.b.c.d.e", "JWE"),
    ("only dots", "..", "header is malformed"),
    # header
    ("header bad character", B64_BAD_CHAR + ".e30.AA", "header is malformed: not base64url"),
    ("header padded", segment(HS_HEADER) + "=.e30.AA", "header is malformed: not base64url"),
    ("header 4n+1 length", "e30aa.e30.AA", "header is malformed: not base64url"),
    ("header trailing bits", "e31.e30.AA", "canonical"),
    ("header not JSON", segment(b"{alg:HS256}") + ".e30.AA", "header is malformed"),
    ("header not UTF-8", segment(b'{"alg":"\xff"}') + ".e30.AA", "UTF-8"),
    ("header array", segment(["HS256"]) + ".e30.AA", "header is not a JSON object"),
    ("header string", segment("HS256") + ".e30.AA", "header is not a JSON object"),
    ("header duplicate alg", segment(b'{"alg":"HS256","alg":"none"}') + ".e30.AA", "duplicate key 'alg'"),
    ("header NaN", segment(b'{"alg":"HS256","x":NaN}') + ".e30.AA", "NaN"),
    ("no alg", hs_token(good(), SECRET, {"typ": "JWT"}), "no 'alg'"),
    ("alg none", segment({"alg": "none"}) + "." + segment(good()) + ".", "alg 'none'"),
    ("alg none, signed", hs_token(good(), SECRET, {"alg": "none"}), "alg 'none'"),
    ("alg None", hs_token(good(), SECRET, {"alg": "None"}), "alg 'None' is not allowed"),
    ("alg NONE", hs_token(good(), SECRET, {"alg": "NONE"}), "alg 'NONE' is not allowed"),
    ("alg hs256 (case)", hs_token(good(), SECRET, {"alg": "hs256"}), "alg 'hs256' is not allowed"),
    ("alg HS512", hs_token(good(), SECRET, {"alg": "HS512"}), "alg 'HS512' is not allowed"),
    ("alg ES256", hs_token(good(), SECRET, {"alg": "ES256"}), "alg 'ES256' is not allowed"),
    ("alg PS256", hs_token(good(), SECRET, {"alg": "PS256"}), "alg 'PS256' is not allowed"),
    ("alg null", hs_token(good(), SECRET, {"alg": None}), "alg None is not allowed"),
    ("alg list", hs_token(good(), SECRET, {"alg": ["HS256"]}), "alg ['HS256'] is not allowed"),
    ("crit", hs_token(good(), SECRET, {"alg": "HS256", "crit": ["exp"], "exp": 1}), "'crit'"),
    ("crit empty", hs_token(good(), SECRET, {"alg": "HS256", "crit": []}), "'crit'"),
    ("jku", hs_token(good(), SECRET, {"alg": "HS256", "jku": "https://evil/keys"}), "'jku'"),
    ("jwk", hs_token(good(), SECRET, {"alg": "HS256", "jwk": {"kty": "oct", "k": GOOD_K}}), "'jwk'"),
    ("x5u", hs_token(good(), SECRET, {"alg": "HS256", "x5u": "https://evil/cert"}), "'x5u'"),
    ("x5c", hs_token(good(), SECRET, {"alg": "HS256", "x5c": ["MIIB"]}), "'x5c'"),
    ("kid not a string", hs_token(good(), SECRET, {"alg": "HS256", "kid": 1}), "'kid' is not a string"),
    ("kid unknown", hs_token(good(), SECRET, {"alg": "HS256", "kid": "k9"}), "kid 'k9' is not a configured key"),
    # signature
    ("signature bad character", segment(HS_HEADER) + "." + segment(good()) + ".AA*A", "signature is malformed"),
    ("signature padded", hs_token(good(), SECRET) + "=", "signature is malformed"),
    ("signature empty", segment(HS_HEADER) + "." + segment(good()) + ".", "signature does not verify"),
    ("signature truncated", hs_token(good(), SECRET)[:-2], "signature"),
    ("wrong key", hs_token(good(), OTHER_SECRET), "signature does not verify with the configured HS256 key"),
    ("payload swapped", ".".join([segment(HS_HEADER), segment(good(sub="mallory")), hs_token(good(), SECRET).split(".")[2]]), "signature does not verify"),
    ("payload bad base64, signed", _signed_raw(segment(HS_HEADER), "e3*0"), "payload is malformed: not base64url"),
    ("payload trailing bits, signed", _signed_raw(segment(HS_HEADER), "e31"), "payload is malformed"),
    # payload, validly signed
    ("payload not JSON", hs_token(b"sub=alice", SECRET), "payload is malformed"),
    ("payload not UTF-8", hs_token(b'{"sub":"\xc0\xaf"}', SECRET), "UTF-8"),
    ("payload duplicate sub", hs_token(b'{"sub":"alice","sub":"admin"}', SECRET), "duplicate key 'sub'"),
    ("payload Infinity", hs_token(b'{"sub":"a","exp":Infinity}', SECRET), "Infinity"),
    ("payload NaN", hs_token(b'{"sub":"a","exp":NaN}', SECRET), "NaN"),
    ("payload 1e400", hs_token(b'{"sub":"a","exp":1e400}', SECRET), "out of range"),
    ("payload lone surrogate", hs_token(b'{"sub":"\\ud800"}', SECRET), "surrogate"),
    ("payload deep", hs_token(b"[" * 3000 + b"]" * 3000, SECRET), "nested too deeply"),
    ("claims array", hs_token([good()], SECRET), "claims are not a JSON object"),
    ("claims string", hs_token("alice", SECRET), "claims are not a JSON object"),
    # claims
    ("sub missing", hs_token({"exp": int(NOW) + 60}, SECRET), "no 'sub'"),
    ("sub null", hs_token(good(sub=None), SECRET), "'sub' is not a string"),
    ("sub number", hs_token(good(sub=42), SECRET), "'sub' is not a string"),
    ("sub list", hs_token(good(sub=["alice"]), SECRET), "'sub' is not a string"),
    ("sub empty", hs_token(good(sub=""), SECRET), "'sub' is empty"),
    ("exp string", hs_token(good(exp=str(int(NOW) + 60)), SECRET), "'exp' is not a number"),
    ("exp true", hs_token(good(exp=True), SECRET), "'exp' is not a number"),
    ("exp false", hs_token(good(exp=False), SECRET), "'exp' is not a number"),
    ("exp null", hs_token(good(exp=None), SECRET), "'exp' is not a number"),
    ("exp list", hs_token(good(exp=[NOW]), SECRET), "'exp' is not a number"),
    ("exp huge int", hs_token(b'{"sub":"a","exp":1' + b"0" * 400 + b"}", SECRET), "'exp' is not a finite number"),
    ("exp past", hs_token(good(exp=int(NOW) - 31), SECRET), "token expired"),
    ("nbf string", hs_token(good(nbf="0"), SECRET), "'nbf' is not a number"),
    ("nbf true", hs_token(good(nbf=True), SECRET), "'nbf' is not a number"),
    ("nbf future", hs_token(good(nbf=int(NOW) + 31), SECRET), "not valid yet"),
    ("iat string", hs_token(good(iat="now"), SECRET), "'iat' is not a number"),
    ("iat future", hs_token(good(iat=int(NOW) + 31), SECRET), "issued in the future"),
    ("read string", hs_token(good(read="a.*"), SECRET), "'read' is not a list"),
    ("read object", hs_token(good(read={"a": 1}), SECRET), "'read' is not a list"),
    ("read number item", hs_token(good(read=["a", 1]), SECRET), "'read'[1] is not a string"),
    ("read inner star", hs_token(good(read=["a.*.b"]), SECRET), "'read'[0] 'a.*.b': '*' is allowed only as the last character"),
    ("read empty pattern", hs_token(good(read=[""]), SECRET), "'read'[0] is empty"),
    ("write whitespace", hs_token(good(write=["a b"]), SECRET), "'write'[0] 'a b' holds whitespace"),
    ("write null", hs_token(good(write=None), SECRET), "'write' is not a list"),
]


@pytest.fixture
def table_verifier(clock) -> auth.JWTVerifier:
    """The verifier the refusal table runs against: SECRET without a kid."""
    return auth.JWTVerifier([auth.HS256Key(SECRET)], clock=clock)


@pytest.mark.parametrize("token, words", [pytest.param(t, w, id=i) for i, t, w in REFUSALS])
def test_refusal_table(table_verifier, token, words):
    """Each refused token gets AUTH_FAILED (field "token") with a reason naming what is wrong, short, and never the token or its signature."""
    error = refusal(table_verifier, token)
    assert error.code == "AUTH_FAILED"
    assert error.context == {"field": "token"}
    assert words in error.message
    assert len(error.message) < 160
    if isinstance(token, str) and len(token) > 12:
        assert token not in error.message
        for part in token.split("."):
            if len(part) > 12:
                assert part not in error.message


def test_refusal_table_tokens_differ_from_a_good_one_only_where_they_say(table_verifier):
    """The table's builders are sound: the same builders with good inputs make a token that verifies (so each row fails for its own reason)."""
    assert table_verifier.verify(hs_token(good(), SECRET)).sub == "alice"
    assert table_verifier.verify(hs_token(good(read=["a.*"], write=["b"], nbf=int(NOW), iat=int(NOW)), SECRET)).write == ("b",)
    assert table_verifier.verify(_signed_raw(segment(HS_HEADER), segment(good()))).sub == "alice"


# === 3. Tokens: fuzz ===============================================================================


def _only_auth_failed(verifier, token) -> None:
    try:
        verifier.verify(token)
    except ms.ClientError as e:
        assert e.code == "AUTH_FAILED" and e.context == {"field": "token"}
    else:
        raise AssertionError(f"accepted {token!r}")


@pytest.mark.slow
def test_fuzz_random_bytes_only_auth_failed(table_verifier):
    """Random bytes (as latin-1 text) and random text never crash the verifier: every one is AUTH_FAILED."""
    fuzz(
        lambda st: st.one_of(st.binary(max_size=300).map(lambda b: b.decode("latin-1")), st.text(max_size=200)),
        lambda rng: bytes(rng.randrange(256) for _ in range(rng.randrange(300))).decode("latin-1"),
        lambda token: _only_auth_failed(table_verifier, token),
    )


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**63, NOW, 1e308, -0.0, 0.5])
    if kind == 2:
        return rng.choice(["", "HS256", "RS256", "none", "alice", "\u20ac", "*"])
    if kind == 3:
        return rng.choice([{"alg": "HS256"}, {"alg": "RS256", "kid": "r"}, {"alg": "HS256", "kid": 1}])
    if kind == 4:
        return rng.choice([{"sub": "a", "exp": True}, {"sub": "", "read": [1]}, {"sub": "a", "nbf": "x"}])
    if kind < 7:
        return {rng.choice(["alg", "sub", "exp", "kid", "crit", "read", "aud"]): _random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randrange(3))]


def _random_segment(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return segment(_random_json(rng))
    if kind == 1:
        return b64u(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
    if kind == 2:
        return "".join(rng.choice("ABCxyz019-_=+/.*") for _ in range(rng.randrange(12)))
    return segment(json.dumps(_random_json(rng)).encode()[: rng.randrange(30)])


@pytest.mark.slow
def test_fuzz_random_dotted_base64_only_auth_failed(clock):
    """Random dot-separated base64url segments (JSON headers and claims among them) against HS256 and RS256 keys: only ever AUTH_FAILED."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET), rfc_rsa_key("r")], clock=clock)

    def draw(rng):
        return ".".join(_random_segment(rng) for _ in range(rng.choice([3, 3, 3, 2, 4, 5])))

    def strategy(st):
        return st.randoms(use_true_random=False).map(draw)

    fuzz(strategy, draw, lambda token: _only_auth_failed(verifier, token), examples=500)


def test_every_one_character_change_of_a_valid_token_is_refused(clock):
    """Changing any one character of a valid HS256 or RS256 token (to one of four others, or to '.') makes it refused: no spelling but the signed one verifies."""
    verifier = auth.JWTVerifier([auth.HS256Key(SECRET), rfc_rsa_key()], clock=clock)
    for token in (hs_token(good(), SECRET), rs_token(good())):
        assert verifier.verify(token).sub == "alice"
        for i, char in enumerate(token):
            for other in "AQg_.":
                if other != char:
                    _only_auth_failed(verifier, token[:i] + other + token[i + 1 :])


# === 3. Tokens: from outside (openssl, cryptography, PyJWT) =======================================


def test_openssl_made_rs256_token_verifies(tmp_path, clock):
    """A 2048-bit key made by openssl and a token signed with `openssl dgst -sha256 -sign` verify here; the same token under another key does not."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: the independent RS256 signer is missing")
    key = tmp_path / "key.pem"
    subprocess.run([openssl, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)], check=True, capture_output=True)
    modulus = subprocess.run([openssl, "rsa", "-in", str(key), "-noout", "-modulus"], check=True, capture_output=True, text=True).stdout
    n = int(modulus.strip().split("=", 1)[1], 16)
    head, body = segment({"alg": "RS256", "kid": "ossl"}), segment(good(sub="openssl"))
    (tmp_path / "input").write_bytes(f"{head}.{body}".encode())
    signature = subprocess.run([openssl, "dgst", "-sha256", "-sign", str(key), str(tmp_path / "input")], check=True, capture_output=True).stdout
    token = f"{head}.{body}.{b64u(signature)}"
    verifier = auth.JWTVerifier(auth.load_jwk_set(_jwks({"kty": "RSA", "kid": "ossl", "n": b64u(n.to_bytes(256, "big")), "e": "AQAB"})), clock=clock)
    assert verifier.verify(token).sub == "openssl"
    other = auth.JWTVerifier([auth.RS256Key(RFC_RSA_N, 65537, "ossl")], clock=clock)
    assert "signature does not verify" in refusal(other, token).message


def test_cryptography_made_rs256_signatures_verify():
    """RSASSA-PKCS1-v1_5/SHA-256 signatures made by the cryptography package with a 3072-bit key verify here, and a PSS one does not."""
    pytest.importorskip("cryptography", reason="the cross-check needs the cryptography package")
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    numbers = private.public_key().public_numbers()
    key = auth.RS256Key(numbers.n, numbers.e)
    assert key.size == 384
    for message in (b"", b"a.b", os.urandom(1000)):
        assert key.verify(message, private.sign(message, padding.PKCS1v15(), hashes.SHA256()))
        assert not key.verify(message, private.sign(message, padding.PKCS1v15(), hashes.SHA384()))
        pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
        assert not key.verify(message, private.sign(message, pss, hashes.SHA256()))


def test_pyjwt_made_tokens_verify(clock):
    """Tokens encoded by PyJWT (HS256 with a kid; RS256 with the RFC 7515 A.2 key) verify here with the claims it wrote."""
    jwt = pytest.importorskip("jwt", reason="the PyJWT cross-check needs PyJWT (pip install pyjwt cryptography)")
    pytest.importorskip("cryptography", reason="PyJWT needs cryptography for RS256")
    from cryptography.hazmat.primitives.asymmetric import rsa

    verifier = auth.JWTVerifier([auth.HS256Key(SECRET, "h"), rfc_rsa_key("r")], audience="ms", clock=clock)
    claims = {"sub": "pyjwt", "exp": int(NOW) + 60, "aud": ["ms"], "read": ["x.*"]}
    hs = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "h"})
    assert verifier.verify(hs) == auth.Claims("pyjwt", int(NOW) + 60, ("x.*",), None)
    d = RFC_RSA_D
    e = 65537
    p = b64u_int("4BzEEOtIpmVdVEZNCqS7baC4crd0pqnRH_5IB3jw3bcxGn6QLvnEtfdUdiYrqBdss1l58BQ3KhooKeQTa9AB0Hw_Py5PJdTJNPY8cQn7ouZ2KKDcmnPGBY5t7yLc1QlQ5xHdwW1VhvKn-nXqhJTBgIPgtldC-KDV5z-y2XDwGUc")
    q = RFC_RSA_N // p
    assert p * q == RFC_RSA_N
    private = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, RFC_RSA_N)).private_key()
    rs = jwt.encode(claims, private, algorithm="RS256", headers={"kid": "r"})
    assert verifier.verify(rs).sub == "pyjwt"
    # and the other way round: PyJWT accepts the tokens made by this file's test signers
    no_clock = {"verify_exp": False}  # NOW is a fixed past time; PyJWT reads the real clock
    assert jwt.decode(hs_token(good(), SECRET), SECRET, algorithms=["HS256"], options=no_clock)["sub"] == "alice"
    assert jwt.decode(rs_token(good()), private.public_key(), algorithms=["RS256"], options=no_clock)["sub"] == "alice"


# === 4. ACL ========================================================================================


@pytest.mark.parametrize(
    "pattern, parsed",
    [("prices.btc", ("prices.btc", False)), ("prices.*", ("prices.", True)), ("prices*", ("prices", True)), ("*", ("", True)), ("user.{sub}.*", ("user.{sub}.", True))],
)
def test_parse_pattern(pattern, parsed):
    """A pattern is an exact topic, a prefix ending in '*', or '*' (the empty prefix)."""
    assert auth.parse_pattern(pattern) == auth.Pattern(*parsed)


@pytest.mark.parametrize("pattern, words", [("a*b", "only as the last"), ("**", "only as the last"), ("*.x", "only as the last"), ("", "empty"), (5, "not a string"), (None, "not a string"), (" a", "whitespace"), ("a\n", "whitespace"), ("a\x00", "control")])
def test_parse_pattern_refuses(pattern, words):
    """parse_pattern refuses a '*' before the end, empty and non-string patterns, and whitespace or control characters."""
    with pytest.raises(ValueError, match=words):
        auth.parse_pattern(pattern)


def test_acl_exact_prefix_and_everything():
    """Exact patterns match only themselves; "prices.*" matches below prices. only; "prices*" matches pricesx and prices; "*" matches all."""
    grants = auth.Grants(None, "u", auth.Claims("u", None, ("news", "prices.*", "chat*"), ("*",)))
    assert grants.can_read("news") and not grants.can_read("news.x") and not grants.can_read("new")
    assert grants.can_read("prices.btc") and grants.can_read("prices.") and not grants.can_read("prices") and not grants.can_read("pricesx")
    assert grants.can_read("chat") and grants.can_read("chatx") and grants.can_read("chat.room")
    assert not grants.can_read("other")
    assert grants.can_write("anything") and grants.can_write("news")


def test_acl_sub_gives_each_user_a_namespace():
    """"user.{sub}.*" lets alice read user.alice.x and not user.bob.x; bob the other way round."""
    acl = auth.load_acl('{"*": {"read": ["user.{sub}.*"], "write": ["inbox.{sub}"]}}')
    alice, bob = auth.Grants(acl, "alice"), auth.Grants(acl, "bob")
    assert alice.can_read("user.alice.x") and not alice.can_read("user.bob.x")
    assert bob.can_read("user.bob.x") and not bob.can_read("user.alice.x")
    assert alice.can_write("inbox.alice") and not alice.can_write("inbox.alice.x") and not alice.can_write("inbox.bob")


def test_acl_user_id_with_a_star_is_literal():
    """A userId holding '*' is matched literally: "user.{sub}.*" for user "a*" covers user.a*.x but not user.ab.x, and "{sub}" for user "*" is not a wildcard."""
    acl = auth.load_acl('{"*": {"read": ["user.{sub}.*", "{sub}"], "write": ["room.{sub}"]}}')
    star = auth.Grants(acl, "a*")
    assert star.can_read("user.a*.x") and not star.can_read("user.ab.x") and not star.can_read("user.a")
    assert star.can_write("room.a*") and not star.can_write("room.ab") and not star.can_write("room.a")
    everyone = auth.Grants(acl, "*")
    assert everyone.can_read("*") and not everyone.can_read("anything") and not everyone.can_read("user.x.y")
    braces = auth.Grants(acl, "{sub}")  # the placeholder inside a user id is not replaced again
    assert braces.can_read("user.{sub}.x") and not braces.can_read("user.x.y")


def test_no_acl_source_allows_everything():
    """No ACL file and a token without read/write claims (or demo auth): every topic is readable and writable."""
    for claims in (None, auth.Claims("u"), auth.Claims("u", 123)):
        grants = auth.Grants(None, "u", claims)
        assert not grants.restricted and grants.can_read("any") and grants.can_write("any")


def test_default_deny_once_a_source_exists():
    """An ACL file (even one without this user), or a read or write claim (even empty), denies whatever is not granted, both actions."""
    empty_acl = auth.load_acl('{"bob": {"read": ["*"], "write": ["*"]}}')
    alice = auth.Grants(empty_acl, "alice")
    assert alice.restricted and not alice.can_read("t") and not alice.can_write("t")
    reads_only = auth.Grants(None, "alice", auth.Claims("alice", None, ("t",), None))
    assert reads_only.can_read("t") and not reads_only.can_read("u") and not reads_only.can_write("t")
    writes_only = auth.Grants(None, "alice", auth.Claims("alice", None, None, ("t",)))
    assert writes_only.can_write("t") and not writes_only.can_read("t")
    nothing = auth.Grants(None, "alice", auth.Claims("alice", None, (), None))
    assert nothing.restricted and not nothing.can_read("t") and not nothing.can_write("t")
    assert auth.Grants(auth.load_acl("{}"), "alice").restricted  # an empty ACL file is still an ACL


def test_grants_add_up_across_sources():
    """The user's entry, the "*" entry and the token's claims add up; read grants never give write and the other way round."""
    acl = auth.load_acl('{"alice": {"read": ["a"], "write": ["w1"]}, "*": {"read": ["b.*"]}, "bob": {"read": ["c"]}}')
    grants = auth.Grants(acl, "alice", auth.Claims("alice", None, ("c2",), ("w2",)))
    assert all(grants.can_read(t) for t in ("a", "b.x", "c2"))
    assert not grants.can_read("c") and not grants.can_read("w1") and not grants.can_read("d")
    assert grants.can_write("w1") and grants.can_write("w2") and not grants.can_write("a") and not grants.can_write("b.x")
    bob = auth.Grants(acl, "bob")
    assert bob.can_read("c") and bob.can_read("b.y") and not bob.can_read("a") and not bob.can_write("w1")


def test_acl_user_named_star_gets_only_the_star_entry():
    """A user whose id is "*" gets the "*" entry once (no duplicate patterns, no more than everyone)."""
    acl = auth.load_acl('{"*": {"read": ["x"]}}')
    read, write = acl.patterns("*")
    assert read == [auth.Pattern("x", False)] and write == []


def test_grants_index_prefixes_by_length():
    """1,000 prefixes compile to one set per distinct prefix length (here 4), so a check is a handful of set lookups however many patterns there are, and gives the same answers."""
    patterns = tuple(f"t.{i}.*" for i in range(1000)) + ("t.*",) + tuple(f"t.{i}" for i in range(1000)) + ("u",)
    grants = auth.Grants(None, "u", auth.Claims("u", None, patterns, None))
    assert [length for length, _ in grants._read.prefixes] == [2, 4, 5, 6]
    assert grants.can_read("t.5.x") and grants.can_read("t.") and grants.can_read("u") and not grants.can_read("v") and not grants.can_read("t")


def _naive_allows(patterns, user_id, topic) -> bool:
    """The ACL rule as a plain loop: the '*' is read off the pattern as written, then {sub} is replaced."""
    for p in patterns:
        if p.endswith("*"):
            if topic.startswith(p[:-1].replace("{sub}", user_id)):
                return True
        elif p.replace("{sub}", user_id) == topic:
            return True
    return False


@pytest.mark.slow
def test_grants_match_a_naive_matcher():
    """On random patterns, user ids and topics, the compiled grants decide exactly as a plain loop over the patterns does."""
    def draw(rng):
        def word():
            return "".join(rng.choice("ab.") for _ in range(rng.randrange(4)))
        patterns = []
        for _ in range(rng.randrange(6)):
            p = rng.choice(["", "{sub}", "{sub}."]) + word()
            patterns.append(p + "*" if rng.random() < 0.5 or not p else p)
        return patterns, rng.choice(["a", "b", "a*", "ab."]), [word() + rng.choice(["", "a", "a*", "ab.", "a*."]) for _ in range(8)]

    def strategy(st):
        return st.randoms(use_true_random=False).map(draw)

    def check(case):
        patterns, user_id, topics = case
        grants = auth.Grants(None, user_id, auth.Claims(user_id, None, tuple(patterns), ()))
        for topic in topics:
            assert grants.can_read(topic) == _naive_allows(patterns, user_id, topic), (patterns, user_id, topic)

    fuzz(strategy, draw, check, examples=300)


@pytest.mark.parametrize(
    "text, words",
    [
        ("{not json", "ACL file: not JSON"),
        ('{"a": {}, "a": {}}', "duplicate key 'a'"),
        ('[{"read": []}]', "expected a JSON object"),
        ('{"alice": ["x"]}', "ACL file: 'alice': expected {\"read\""),
        ('{"alice": {"reads": ["x"]}}', "ACL file: 'alice': unknown member 'reads'"),
        ('{"alice": {"read": "x"}}', "ACL file: 'alice'.read: expected a list"),
        ('{"alice": {"write": ["ok", "a*b"]}}', "ACL file: 'alice'.write[1] 'a*b': '*' is allowed only as the last"),
        ('{"alice": {"read": [3]}}', "ACL file: 'alice'.read[0] is not a string"),
        ('{"": {"read": ["x"]}}', "an empty userId"),
        ('{"alice": {"read": [NaN]}}', "NaN"),
    ],
)
def test_load_acl_refuses_with_a_clear_message(text, words):
    """load_acl refuses every malformed ACL file with a ValueError naming the entry, action and index."""
    with pytest.raises(ValueError) as info:
        auth.load_acl(text)
    assert words in str(info.value)


def test_load_acl_leaves_out_lists():
    """An entry may leave out read or write: that action grants nothing there (but the file still makes grants restricted)."""
    acl = auth.load_acl('{"alice": {"read": ["x"]}}')
    grants = auth.Grants(acl, "alice")
    assert grants.can_read("x") and not grants.can_write("x") and len(acl) == 1


# === 5. Signing: RFC 8785 canonical JSON ===========================================================

# RFC 8785 Appendix B: IEEE 754 bit patterns and what JCS writes for them.
RFC8785_NUMBERS = [
    ("0000000000000000", "0"),
    ("8000000000000000", "0"),
    ("0000000000000001", "5e-324"),
    ("8000000000000001", "-5e-324"),
    ("7fefffffffffffff", "1.7976931348623157e+308"),
    ("ffefffffffffffff", "-1.7976931348623157e+308"),
    ("4340000000000000", "9007199254740992"),
    ("c340000000000000", "-9007199254740992"),
    ("4430000000000000", "295147905179352830000"),
    ("44b52d02c7e14af5", "9.999999999999997e+22"),
    ("44b52d02c7e14af6", "1e+23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000"),
    ("444b1ae4d6e2ef4f", "999999999999999900000"),
    ("444b1ae4d6e2ef50", "1e+21"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7"),
    ("3eb0c6f7a0b5ed8d", "0.000001"),
    ("41b3de4355555553", "333333333.3333332"),
    ("41b3de4355555554", "333333333.33333325"),
    ("41b3de4355555555", "333333333.3333333"),
    ("41b3de4355555556", "333333333.3333334"),
    ("41b3de4355555557", "333333333.33333343"),
    ("becbf647612f3696", "-0.0000033333333333333333"),
    ("43143ff3c1cb0959", "1424953923781206.2"),
]


@pytest.mark.parametrize("bits, text", RFC8785_NUMBERS)
def test_rfc8785_appendix_b_numbers(bits, text):
    """RFC 8785 Appendix B: each IEEE 754 value is written exactly as the RFC's table says."""
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    assert auth.canonical_json(value) == text


@pytest.mark.parametrize("bits", ["7fffffffffffffff", "7ff0000000000000", "fff0000000000000"])
def test_rfc8785_appendix_b_nan_and_infinity_refused(bits):
    """RFC 8785 Appendix B's NaN and Infinity rows are errors: INVALID_MESSAGE on field payload."""
    value = struct.unpack(">d", bytes.fromhex(bits))[0]
    with pytest.raises(ms.ClientError) as info:
        auth.canonical_json([value])
    assert (info.value.code, info.value.context) == ("INVALID_MESSAGE", {"field": "payload"})


@pytest.mark.parametrize(
    "value, text",
    [
        (1e21, "1e+21"),
        (1e20, "100000000000000000000"),
        (1e-7, "1e-7"),
        (1.5e-7, "1.5e-7"),
        (-1e-7, "-1e-7"),
        (1e-6, "0.000001"),
        (0.1 + 0.2, "0.30000000000000004"),
        (5e-324, "5e-324"),
        (-0.0, "0"),
        (0.0, "0"),
        (2.0, "2"),
        (-2.5, "-2.5"),
        (123.0, "123"),
        (1e300, "1e+300"),
        (float(2**53), "9007199254740992"),
        (float(2**53 + 2), "9007199254740994"),
        (2**53, "9007199254740992"),
        (-(2**53), "-9007199254740992"),
        (0, "0"),
        (-1, "-1"),
        (True, "true"),
        (None, "null"),
        (123456789.125, "123456789.125"),
        (1e16, "10000000000000000"),
        (2**60 * 1.0, "1152921504606847000"),
    ],
)
def test_es_number_edge_cases(value, text):
    """ECMAScript Number::toString edges: the exponent thresholds (1e21, 1e-7), shortest digits (0.1+0.2), the smallest subnormal, -0, 2^53, integral floats."""
    assert auth.canonical_json(value) == text


def test_rfc8785_3_2_2_sample_object():
    """RFC 8785 §3.2.2's sample (numbers, escapes, literals) canonicalizes to the RFC's exact output."""
    sample = json.loads(r'''{
  "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
  "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
  "literals": [null, true, false]
}''')
    expected = '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    assert auth.canonical_json(sample) == expected


def test_rfc8785_3_2_3_sorting_by_utf16_code_units():
    """RFC 8785 §3.2.3: member names sort by UTF-16 code units, so the emoji (D83D DE00) comes before U+FB33, unlike code point order."""
    sample = json.loads(r'''{
  "\u20ac": "Euro Sign",
  "\r": "Carriage Return",
  "\ufb33": "Hebrew Letter Dalet With Dagesh",
  "1": "One",
  "\ud83d\ude00": "Emoji: Grinning Face",
  "\u0080": "Control",
  "\u00f6": "Latin Small Letter O With Diaeresis"
}''')
    names = list(json.loads(auth.canonical_json(sample)))
    assert names == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]
    assert names != sorted(sample)  # Python's code-point order would differ


def test_jcs_string_escapes():
    """JCS strings: short escapes for \\b \\t \\n \\f \\r \" \\\\, lowercase \\u00XX for other controls, and DEL, '/', non-ASCII and U+2028 as themselves."""
    assert auth.canonical_json("\b\t\n\f\r\"\\") == '"\\b\\t\\n\\f\\r\\"\\\\"'
    assert auth.canonical_json("\x00\x01\x1f") == '"\\u0000\\u0001\\u001f"'
    assert auth.canonical_json("\x7f/é\u2028\U0001f600") == '"\x7f/é\u2028\U0001f600"'


def test_canonical_json_structure():
    """No whitespace anywhere, nested objects sorted, arrays (and tuples) kept in order, empty containers kept."""
    value = {"b": [3, 1, {"z": {}, "a": []}], "a": ("x", None), "": 0}
    assert auth.canonical_json(value) == '{"":0,"a":["x",null],"b":[3,1,{"a":[],"z":{}}]}'


@pytest.mark.parametrize(
    "value, words",
    [
        (2**53 + 1, "beyond ±2^53"),
        (-(2**53) - 1, "beyond ±2^53"),
        ({"a": [10**30]}, "beyond ±2^53"),
        (math.nan, "not a finite number"),
        ([math.inf], "not a finite number"),
        ({"x": -math.inf}, "not a finite number"),
        ("\ud800", "lone surrogate"),
        ({"\udc00": 1}, "lone surrogate"),
        ({1: "a"}, "key is a int"),
        ({("a",): 1}, "key is a tuple"),
        ({1, 2}, "a set is not JSON"),
        (b"bytes", "a bytes is not JSON"),
        (object(), "is not JSON"),
    ],
)
def test_canonical_json_refuses_non_ijson(value, words):
    """Integers beyond ±2^53, non-finite floats, lone surrogates, non-string keys and non-JSON types are INVALID_MESSAGE on field payload."""
    with pytest.raises(ms.ClientError) as info:
        auth.canonical_json(value)
    assert (info.value.code, info.value.context) == ("INVALID_MESSAGE", {"field": "payload"})
    assert words in info.value.message


def test_canonical_json_refuses_deep_nesting_without_crashing():
    """A payload nested deeper than the recursion limit is INVALID_MESSAGE, not a RecursionError."""
    value: list = []
    for _ in range(sys.getrecursionlimit() + 100):
        value = [value]
    with pytest.raises(ms.ClientError, match="nested too deeply"):
        auth.canonical_json(value)


ES_NUMBER_SHAPE = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]*[1-9])?(e[+-][1-9][0-9]*)?")


def _significant(text: str) -> str:
    return text.lstrip("-").split("e")[0].replace(".", "").strip("0")


@pytest.mark.slow
def test_es_number_reads_back_as_the_same_double():
    """For random doubles of every magnitude, the JCS text parses back to the same double, has the shortest repr's digits, and the ES shape (no '+' but in an exponent, no trailing zeros after a point)."""
    def draw(rng):
        return struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0]

    def check(x):
        if not math.isfinite(x):
            return
        text = auth.es_number(x)
        assert float(text) == x, (x, text)
        assert _significant(text) == _significant(repr(x)), (x, text)
        assert ES_NUMBER_SHAPE.fullmatch(text), (x, text)
        assert ("e" in text) == (x != 0 and not 1e-6 <= abs(x) < 1e21), (x, text)

    fuzz(lambda st: st.floats(allow_nan=False, allow_infinity=False), draw, check, examples=2000)


def _random_payload(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 4 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-(2**53), 2**53)
    if kind == 2:
        return struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0] if rng.random() < 0.5 else rng.choice([0.5, 1e21, 1e-7, -0.0, 100.0])
    if kind == 3:
        return "".join(rng.choice("aZ\x00\x1f\"\\/é€\U0001f600\ufb33\u2028") for _ in range(rng.randrange(6)))
    if kind < 6:
        return {"".join(rng.choice("ab\U0001f600\ufb33\r") for _ in range(rng.randrange(4))): _random_payload(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [_random_payload(rng, depth + 1) for _ in range(rng.randrange(4))]


def _finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _ijson_strategy(st):
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False),
        st.text(st.characters(exclude_categories=("Cs",)), max_size=8),
    )
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(st.characters(exclude_categories=("Cs",)), max_size=4), inner, max_size=4)), max_leaves=20)


@pytest.mark.slow
def test_canonical_json_parses_back_to_the_same_value():
    """Random I-JSON values: the canonical text is JSON that parses back (numbers as doubles) to an equal value, which canonicalizes to the same text."""
    def check(value):
        if not _finite(value):
            return
        text = auth.canonical_json(value)
        # Read back as JCS reads numbers, as IEEE doubles (a float like 2.0**60 is written as an
        # integer literal beyond 2^53, which is a double too), it is the same value and a fixed point.
        back = json.loads(text, parse_int=lambda s: int(s) if abs(int(s)) <= 2**53 else float(s))
        assert back == value  # -0.0 == 0 and 1.0 == 1 compare equal, as they are one JSON number
        assert auth.canonical_json(back) == text

    fuzz(_ijson_strategy, _random_payload, check, examples=500)


@pytest.mark.slow
def test_canonical_json_matches_the_jcs_package():
    """An independent JCS implementation (the jcs package from PyPI) writes exactly the same text for random I-JSON values and for RFC 8785's numbers."""
    jcs = pytest.importorskip("jcs", reason="the cross-check needs the jcs package (pip install jcs)")
    for bits, text in RFC8785_NUMBERS:
        assert jcs.canonicalize(struct.unpack(">d", bytes.fromhex(bits))[0]).decode() == text  # the reference agrees with the RFC

    def check(value):
        if _finite(value):
            assert auth.canonical_json(value) == jcs.canonicalize(value).decode("utf-8"), value

    fuzz(_ijson_strategy, _random_payload, check, examples=500)


# === 5. Signing: messages and keys =================================================================


def test_sign_message_matches_an_independent_computation():
    """The signature is HMAC-SHA256 over a hand-written canonical text of [topic, seqNo, messageId, data], base64url without padding."""
    key = b"k" * 32
    data = {"b": 1, "a": [1.0, "é", None], "€": 1e21}
    canonical = '["prices.btc",7,"m-1",{"a":[1,"é",null],"b":1,"€":1e+21}]'
    expected = base64.urlsafe_b64encode(hmac.new(key, canonical.encode("utf-8"), hashlib.sha256).digest()).rstrip(b"=").decode()
    assert auth.canonical_json(["prices.btc", 7, "m-1", data]) == canonical
    assert auth.sign_message(key, "prices.btc", 7, "m-1", data) == expected
    assert len(expected) == 43 and "=" not in expected


def test_verify_message():
    """verify_message accepts the signature and refuses any change of topic, seqNo, messageId, data, key or sig, a non-string sig and unsignable data."""
    key = b"k" * 32
    sig = auth.sign_message(key, "t", 1, "m", {"x": 1})
    assert auth.verify_message(key, "t", 1, "m", {"x": 1}, sig)
    assert auth.verify_message(key, "t", 1, "m", {"x": 1.0}, sig)  # 1.0 and 1 are one JSON number
    for args in (("u", 1, "m", {"x": 1}), ("t", 2, "m", {"x": 1}), ("t", 1, "n", {"x": 1}), ("t", 1, "m", {"x": 2}), ("t", 1, "m", [{"x": 1}])):
        assert not auth.verify_message(key, *args, sig)
    assert not auth.verify_message(b"j" * 32, "t", 1, "m", {"x": 1}, sig)
    assert not auth.verify_message(key, "t", 1, "m", {"x": 1}, sig[:-1] + ("A" if sig[-1] != "A" else "B"))
    assert not auth.verify_message(key, "t", 1, "m", {"x": 1}, None)
    assert not auth.verify_message(key, "t", 1, "m", {"x": 1}, sig + "\udcff")
    assert not auth.verify_message(key, "t", 1, "m", {"x": math.nan}, sig)


def test_signing_keys_first_signs_all_verify():
    """--sign-key v2=... --sign-key v1=...: v2 signs; a message signed under v1 before the rotation still verifies; an unknown kid does not."""
    old = auth.SigningKeys.parse(["v1=" + "o" * 32])
    kid, sig_v1 = old.sign("t", 5, "m", {"a": 1})
    assert kid == "v1"
    rotated = auth.SigningKeys.parse(["v2=" + "n" * 32, "v1=" + "o" * 32])
    assert rotated.kid == "v2" and rotated.kids == ("v2", "v1")
    kid, sig_v2 = rotated.sign("t", 5, "m", {"a": 1})
    assert kid == "v2" and sig_v2 != sig_v1
    assert sig_v2 == auth.sign_message(b"n" * 32, "t", 5, "m", {"a": 1})
    assert rotated.verify("v1", sig_v1, "t", 5, "m", {"a": 1})
    assert rotated.verify("v2", sig_v2, "t", 5, "m", {"a": 1})
    assert not rotated.verify("v2", sig_v1, "t", 5, "m", {"a": 1})
    assert not rotated.verify("v3", sig_v2, "t", 5, "m", {"a": 1})
    assert not rotated.verify(None, sig_v2, "t", 5, "m", {"a": 1})


def test_signing_key_secret_keeps_equals_signs():
    """KID=SECRET splits at the first '=': the rest, '=' included, is the secret's UTF-8 bytes."""
    keys = auth.SigningKeys.parse(["k=" + "a=b" * 11])
    assert keys.sign("t", 1, "m", None)[1] == auth.sign_message(("a=b" * 11).encode(), "t", 1, "m", None)


@pytest.mark.parametrize(
    "specs, words",
    [
        ([], "no key given"),
        (["justasecretwithoutakidatall-------"], "expected KID=SECRET"),
        (["=" + "s" * 32], "must be non-empty"),
        (["a b=" + "s" * 32], "without whitespace"),
        (["k=" + "s" * 31], "31 bytes; at least 32"),
        (["k=" + "s" * 32, "k=" + "t" * 32], "given twice"),
    ],
)
def test_signing_keys_refuse(specs, words):
    """SigningKeys.parse refuses no key, a missing '=', an empty or spaced kid, a short secret and a repeated kid; the message never holds the secret."""
    with pytest.raises(ValueError) as info:
        auth.SigningKeys.parse(specs)
    assert words in str(info.value)
    for spec in specs:
        assert spec.partition("=")[2] not in str(info.value) or not spec.partition("=")[2]
    assert "justasecret" not in str(info.value)


def test_signing_refuses_non_ijson_payloads():
    """With signing on, a payload integer beyond 2^53 is refused by sign() as INVALID_MESSAGE on payload; 2^53 itself signs."""
    keys = auth.SigningKeys.parse(["k=" + "s" * 32])
    with pytest.raises(ms.ClientError) as info:
        keys.sign("t", 1, "m", {"n": 2**53 + 1})
    assert (info.value.code, info.value.context) == ("INVALID_MESSAGE", {"field": "payload"})
    assert keys.verify("k", keys.sign("t", 1, "m", {"n": 2**53})[1], "t", 1, "m", {"n": 2**53})
