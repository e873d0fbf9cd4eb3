"""Trust (issue 10), integrated: JWT auth at every entry point, ACLs on every action, token expiry
and refresh, signed messages, bounded presence and the per-user connection limit.

Section 11's primitives (base64url, strict JSON, the key classes, canonical JSON) have unit tests of
their own (test_auth.py); these tests go through what a client or an operator touches: `setup`,
`refresh` and every other message through the broker (BrokerDriver, on a FakeClock, with the
auth's Unix clock tied to it), the HTTP routes in-process (App), the in-process server over the
network, and the command line. Every token here is made in this file, with the standard library
(HS256) or PyJWT with `cryptography` (RS256), never with microsocket's own helpers, and every
signature is checked with an independent RFC 8785 implementation (the `jcs` package).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import json
import logging
import random
import subprocess
import sys
import time
import tracemalloc
import types

import pytest

import microsocket as ms
from conftest import (
    SCRIPT,
    BrokerDriver,
    assert_error,
    child_env,
    cli,
    free_port,
    http_request,
    make_request,
    parse_frames,
    read_banner,
    recv_json,
    request,
    run,
    seqs_of,
    wait_until,
)

WALL = 1_700_000_000  # the Unix time at which the broker-level tests' tokens are judged (FakeClock's start)
SECRET = "trust-tests: an HS256 secret of 41 bytes!"  # over the 32-byte minimum
SECRET_BYTES = SECRET.encode()
OTHER_SECRET = b"another HS256 secret, 32 bytes or more, not the server's"
AUD = "microsocket-tests"
ISS = "https://issuer.example"
REFUSAL_POINTS = ("setup", "refresh", "http")


# -- tokens, made here with the standard library


def b64(raw: bytes) -> str:
    """base64url without padding (RFC 7515 §2), written here rather than taken from microsocket."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def segment(part: dict | str | bytes) -> str:
    """One JWS segment: a dict as compact JSON, a str as its UTF-8 bytes (raw JSON text), bytes as they are."""
    if isinstance(part, dict):
        part = json.dumps(part, separators=(",", ":"))
    if isinstance(part, str):
        part = part.encode()
    return b64(part)


def compact(header: dict | str | bytes, payload: dict | str | bytes, key: bytes | None = SECRET_BYTES) -> str:
    """A compact JWS, HMAC-SHA256 under `key` (None: an empty signature)."""
    signing_input = segment(header) + "." + segment(payload)
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def hs256(sub: str | None = "alice", key: bytes = SECRET_BYTES, header: dict | None = None, **claims) -> str:
    """An HS256 token for `sub`, issued at WALL and valid for an hour unless `claims` say otherwise
    (a claim given as None is left out)."""
    payload = {"sub": sub, "iat": WALL, "exp": WALL + 3600, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return compact({"alg": "HS256", "typ": "JWT", **(header or {})}, payload, key)


def tie_wall(d: BrokerDriver) -> BrokerDriver:
    """Make the broker's Unix clock (exp, nbf, iat) move with its FakeClock, starting at WALL."""
    start = d.clock.now
    d.broker.auth.wall = lambda: WALL + (d.clock.now - start)
    return d


def write_json(tmp_path, name: str, doc) -> str:
    """Write `doc` as JSON to tmp_path/name (a JWK Set, an ACL file); its path."""
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def respond(d: BrokerDriver, app: ms.App, req: ms.Request) -> ms.Response:
    """app.handle(req) as a Response, a PendingResponse (a publishing route) followed until the backbone answered."""
    response = app.handle(req)
    if not isinstance(response, ms.PendingResponse):
        return response
    got: list[ms.Response] = []
    response.then(got.append)
    d.settle()
    (answer,) = got
    return answer


def post_publish(token: str | None, body: dict) -> ms.Request:
    """POST /publish with `Authorization: Bearer <token>` (no Authorization header when None)."""
    headers = [] if token is None else [f"Authorization: Bearer {token}"]
    return make_request("POST", "/publish", *headers, body=json.dumps(body).encode())


def route_json(d: BrokerDriver, path: str) -> dict:
    """GET `path` (a JSON route) from the App around the driver's broker."""
    response = d.app().handle(make_request("GET", path))
    assert response.status == 200, response
    return json.loads(response.body)


def metric_lines(d: BrokerDriver) -> list[str]:
    """The lines of GET /metrics."""
    response = d.app().handle(make_request("GET", "/metrics"))
    assert response.status == 200, response
    return response.body.decode().splitlines()


def assert_refusal_counted(d: BrokerDriver, where: str) -> None:
    """/stats auth_refused and /metrics microsocket_auth_refusals_total show exactly one refusal, at `where`."""
    expected = {point: int(point == where) for point in REFUSAL_POINTS}
    stats = route_json(d, "/stats")
    assert stats["auth_refused"] == expected, stats["auth_refused"]
    assert "INTERNAL_ERROR" not in stats["errors"], stats["errors"]
    lines = metric_lines(d)
    for point, n in expected.items():
        assert f'microsocket_auth_refusals_total{{where="{point}"}} {n}' in lines, point


def assert_refusal_logged(caplog, reason: str, token) -> None:
    """The refusal was logged at INFO on "microsocket" with its reason, and nothing logged shows the token."""
    records = [r for r in caplog.records if r.name == "microsocket" and reason in r.getMessage()]
    assert records and all(r.levelno == logging.INFO for r in records), [r.getMessage() for r in caplog.records]
    if isinstance(token, str) and token:
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert token not in text
        for part in token.split("."):
            if len(part) >= 16:
                assert part not in text, part


# -- the token table

# A 2048-bit RSA public key whose private half nobody holds (the server only ever verifies, and
# checks a key's size and shape): it makes the table's JWK Set hold an RSA key beside the oct key,
# as in the alg-confusion attack, without the cryptography package.
_RSA_N = random.Random(8725).getrandbits(2048) | (1 << 2047) | 1
TABLE_RSA_JWK = {"kty": "RSA", "kid": "rs", "n": b64(_RSA_N.to_bytes(256, "big")), "e": "AQAB"}
TABLE_JWKS = {"keys": [{"kty": "oct", "kid": "hs", "k": b64(SECRET_BYTES)}, TABLE_RSA_JWK]}
GOOD = {"sub": "alice", "aud": AUD, "iss": ISS, "iat": WALL, "exp": WALL + 600}  # exp + leeway = WALL + 630
HS = {"alg": "HS256", "typ": "JWT"}


def claims(**changes) -> dict:
    """GOOD with `changes` (a change to None removes the claim)."""
    out = {**GOOD, **changes}
    return {k: v for k, v in out.items() if v is not None}


def raw_claims(**members: str) -> str:
    """GOOD as raw JSON text, with the members given replaced by raw JSON text (NaN, Infinity, null...)."""
    text = json.dumps({k: v for k, v in GOOD.items() if k not in members}, separators=(",", ":"))[:-1]
    return text + "".join(f',"{name}":{value}' for name, value in members.items()) + "}"


def duplicate_sub() -> str:
    """GOOD as raw JSON text with a second "sub" after the first."""
    return json.dumps(GOOD, separators=(",", ":"))[:-1] + ',"sub":"admin"}'


B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def non_canonical_signature() -> str:
    """A good token whose last base64url character has one of its unused low bits set: the same
    bytes when decoded leniently, but not their one canonical spelling."""
    token = compact(HS, GOOD)
    index = B64_ALPHABET.index(token[-1])
    assert index & 3 == 0  # 32 bytes are 43 characters: the last one carries 2 unused bits
    return token[:-1] + B64_ALPHABET[index | 1]


def standard_alphabet() -> str:
    """A good token spelled in the standard base64 alphabet (+ and /), which base64url does not use."""
    for n in range(100):
        token = compact(HS, claims(n=n))
        if "-" in token or "_" in token:
            return token.replace("-", "+").replace("_", "/")
    raise AssertionError("no token with - or _")


BAD_TOKENS = [
    ("alg-none", lambda: compact({"alg": "none"}, GOOD, None)),
    ("alg-none-signed", lambda: compact({"alg": "none"}, GOOD)),
    ("alg-lowercase-hs256", lambda: compact({"alg": "hs256"}, GOOD)),
    ("alg-HS512", lambda: compact({"alg": "HS512"}, GOOD)),
    ("alg-missing", lambda: compact({"typ": "JWT"}, GOOD)),
    ("alg-not-a-string", lambda: compact({"alg": ["HS256"]}, GOOD)),
    # RS256 named on the HS256 key (HMAC-signed with its secret), and on no key at all
    ("rs256-header-on-hs256-key", lambda: compact({"alg": "RS256", "kid": "hs"}, GOOD)),
    ("rs256-header-hmac-signature", lambda: compact({"alg": "RS256"}, GOOD)),
    # alg confusion: HS256 with the RSA public key's bytes as the HMAC secret
    ("alg-confusion-rsa-kid-jwk-text", lambda: compact({"alg": "HS256", "kid": "rs"}, GOOD, json.dumps(TABLE_RSA_JWK).encode())),
    ("alg-confusion-rsa-kid-n-bytes", lambda: compact({"alg": "HS256", "kid": "rs"}, GOOD, _RSA_N.to_bytes(256, "big"))),
    ("alg-confusion-no-kid-n-bytes", lambda: compact(HS, GOOD, _RSA_N.to_bytes(256, "big"))),
    ("crit", lambda: compact({**HS, "crit": ["exp"]}, GOOD)),
    ("crit-empty", lambda: compact({**HS, "crit": []}, GOOD)),
    ("jku", lambda: compact({**HS, "jku": "https://attacker.example/jwks.json"}, GOOD)),
    ("x5u", lambda: compact({**HS, "x5u": "https://attacker.example/cert.pem"}, GOOD)),
    ("x5c", lambda: compact({**HS, "x5c": ["MIIB"]}, GOOD)),
    # the embedded key is the one the token is signed with: a verifier that used it would accept
    ("jwk-embedded", lambda: compact({**HS, "jwk": {"kty": "oct", "k": b64(OTHER_SECRET)}}, GOOD, OTHER_SECRET)),
    ("kid-unknown", lambda: compact({**HS, "kid": "nope"}, GOOD)),
    ("kid-not-a-string", lambda: compact({**HS, "kid": 7}, GOOD)),
    ("over-8KiB", lambda: compact(HS, claims(pad="x" * 8200))),
    ("b64-padding", lambda: compact(HS, GOOD).replace(".", "=.", 1)),
    ("b64-standard-alphabet", standard_alphabet),
    ("b64-bad-character", lambda: "!" + compact(HS, GOOD)),
    ("b64-non-canonical", non_canonical_signature),
    ("non-ascii", lambda: compact(HS, GOOD) + "\u00e9"),
    ("two-parts", lambda: compact(HS, GOOD).rsplit(".", 1)[0]),
    ("four-parts", lambda: compact(HS, GOOD) + ".x"),
    ("signature-empty", lambda: compact(HS, GOOD, None)),
    ("signature-truncated", lambda: compact(HS, GOOD)[:-4]),
    ("header-not-json", lambda: compact('{alg:"HS256"}', GOOD)),
    ("header-not-an-object", lambda: compact('["HS256"]', GOOD)),
    ("header-duplicate-alg", lambda: compact('{"alg":"none","alg":"HS256"}', GOOD)),
    ("payload-not-json", lambda: compact(HS, '{sub:"alice"}')),
    ("payload-not-an-object", lambda: compact(HS, '["alice"]')),
    ("payload-not-utf8", lambda: compact(HS, b'{"sub":"\xff"}')),
    ("payload-duplicate-sub", lambda: compact(HS, duplicate_sub())),
    ("exp-NaN", lambda: compact(HS, raw_claims(exp="NaN"))),
    ("exp-Infinity", lambda: compact(HS, raw_claims(exp="Infinity"))),
    ("exp-1e400", lambda: compact(HS, raw_claims(exp="1e400"))),
    ("exp-boolean", lambda: compact(HS, claims(exp=True))),
    ("exp-string", lambda: compact(HS, claims(exp=str(WALL + 600)))),
    ("exp-null", lambda: compact(HS, raw_claims(exp="null"))),
    ("nbf-string", lambda: compact(HS, claims(nbf=str(WALL)))),
    ("iat-boolean", lambda: compact(HS, claims(iat=False))),
    ("sub-missing", lambda: compact(HS, claims(sub=None))),
    ("sub-empty", lambda: compact(HS, claims(sub=""))),
    ("sub-number", lambda: compact(HS, claims(sub=42))),
    ("aud-wrong", lambda: compact(HS, claims(aud="another-service"))),
    ("aud-wrong-list", lambda: compact(HS, claims(aud=["another-service", "a-third"]))),
    ("aud-missing", lambda: compact(HS, claims(aud=None))),
    ("iss-wrong", lambda: compact(HS, claims(iss="https://attacker.example"))),
    ("iss-missing", lambda: compact(HS, claims(iss=None))),
    ("expired-beyond-leeway", lambda: compact(HS, claims(exp=WALL - 31))),
    ("expired-at-leeway", lambda: compact(HS, claims(exp=WALL - 30))),
    ("nbf-in-the-future", lambda: compact(HS, claims(nbf=WALL + 31))),
    ("iat-in-the-future", lambda: compact(HS, claims(iat=WALL + 31))),
    ("signed-by-another-key", lambda: compact(HS, GOOD, OTHER_SECRET)),
    ("signed-by-another-key-kid", lambda: compact({**HS, "kid": "hs"}, GOOD, OTHER_SECRET)),
    ("claims-changed-after-signing", lambda: ".".join(
        (p if i != 1 else segment(claims(sub="admin"))) for i, p in enumerate(compact(HS, GOOD).split(".")))),
    ("read-claim-not-a-list", lambda: compact(HS, claims(read="t.*"))),
    ("write-claim-bad-pattern", lambda: compact(HS, claims(write=["a*b"]))),
    ("demo-style-token", lambda: "alice"),
]
BAD_IDS = [name for name, _ in BAD_TOKENS]
# An HTTP head is ASCII (a non-ASCII one is a 400 before any route): those rows are WebSocket-only.
HTTP_BAD_TOKENS = [(name, make) for name, make in BAD_TOKENS if make().isascii()]


@pytest.fixture(scope="module")
def table_keys(tmp_path_factory) -> str:
    """The token table's JWK Set file: the HS256 key (kid "hs") and an RSA key (kid "rs")."""
    return write_json(tmp_path_factory.mktemp("jwks"), "jwks.json", TABLE_JWKS)


def table_driver(table_keys: str) -> BrokerDriver:
    """The token table's broker: JWT with the table's JWK Set, audience and issuer required, leeway 30 s."""
    return tie_wall(BrokerDriver(jwt_keys=table_keys, jwt_audience=AUD, jwt_issuer=ISS))


def test_token_table_good_tokens_are_accepted_everywhere(table_keys):
    """The table's control: a good token, and ones just inside the leeway, pass setup, refresh and POST /publish (so each refusal below is that row's, not a server that refuses all)."""
    good = [
        compact(HS, GOOD),
        compact({**HS, "kid": "hs"}, GOOD),
        compact(HS, claims(exp=WALL - 29)),
        compact(HS, claims(nbf=WALL + 29, iat=WALL + 29)),
        compact(HS, claims(exp=None, aud=["another-service", AUD])),
        compact(HS, claims(pad="x" * 5800)),  # just under 8 KiB
    ]
    for token in good:
        d = table_driver(table_keys)
        c = d.connect(token, topics=["t"])
        assert d.ready(c)["userId"] == "alice"
        assert d.one(c, {"type": "refresh", "token": token})["type"] == "refreshed"
        response = respond(d, d.app(), post_publish(token, {"topic": "t", "messageId": "m", "data": 1}))
        assert response.status == 200, response
        assert route_json(d, "/stats")["auth_refused"] == {point: 0 for point in REFUSAL_POINTS}


@pytest.mark.parametrize("make", [make for _, make in BAD_TOKENS], ids=BAD_IDS)
def test_token_table_setup(table_keys, caplog, make):
    """setup with this token is AUTH_FAILED (field token, id echoed), the connection stays open and not set up, and the refusal is counted and logged with its reason, never the token."""
    caplog.set_level(logging.INFO, logger="microsocket")
    token = make()
    d = table_driver(table_keys)
    c = d.connect(token=None)
    err = d.one(c, {"type": "setup", "token": token, "id": "s"})
    assert_error(err, "AUTH_FAILED", field="token", id="s")
    assert_error(d.one(c, {"type": "subscribe", "topic": "t"}), "AUTH_REQUIRED")  # not set up
    assert_refusal_counted(d, "setup")
    assert_refusal_logged(caplog, err["message"], token)
    assert d.connect(compact(HS, GOOD)) is not None  # the server goes on accepting good tokens
    assert d.one(c, {"type": "setup", "token": compact(HS, GOOD)})["type"] == "ready"  # and so does that connection


@pytest.mark.parametrize("make", [make for _, make in BAD_TOKENS], ids=BAD_IDS)
def test_token_table_refresh(table_keys, caplog, make):
    """refresh with this token is AUTH_FAILED and the connection is unchanged: same user, still subscribed, the old expiry (exp + leeway) still applies; counted and logged without the token."""
    caplog.set_level(logging.INFO, logger="microsocket")
    token = make()
    d = table_driver(table_keys)
    c = d.connect(compact(HS, GOOD), topics=["t"])
    assert d.ready(c)["expiresAt"] == WALL + 600
    err = d.one(c, {"type": "refresh", "token": token, "id": "r"})
    assert_error(err, "AUTH_FAILED", field="token", id="r")
    assert_refusal_counted(d, "refresh")
    assert_refusal_logged(caplog, err["message"], token)
    # Still alice, still subscribed to t.
    d.server_publish("t")
    assert seqs_of(d.take(c), "t") == [1]
    assert d.one(c, {"type": "presence", "topic": "t"})["users"] == ["alice"]
    # The old expiry still holds: not closed before exp + leeway, closed at it.
    start = d.clock.now
    d.clock.now = start + 629.5
    d.sweep()
    assert d.close_requested(c) is None
    d.clock.now = start + 630
    d.sweep()
    assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED


@pytest.mark.parametrize("make", [make for _, make in HTTP_BAD_TOKENS], ids=[name for name, _ in HTTP_BAD_TOKENS])
def test_token_table_post_publish(table_keys, caplog, make):
    """POST /publish with this bearer token is 401 with WWW-Authenticate: Bearer and the reason, nothing is published, and the refusal is counted and logged without the token."""
    caplog.set_level(logging.INFO, logger="microsocket")
    token = make()
    d = table_driver(table_keys)
    watcher = d.connect(compact(HS, GOOD), topics=["t"])
    response = respond(d, d.app(), post_publish(token, {"topic": "t", "messageId": "m", "data": 1}))
    assert response.status == 401, response
    assert dict(response.headers)["WWW-Authenticate"] == 'Bearer error="invalid_token"', response.headers  # RFC 6750 §3.1
    reason = json.loads(response.body)["error"]
    assert reason
    assert d.take(watcher) == [] and d.stats()["published"] == 0
    assert_refusal_counted(d, "http")
    assert_refusal_logged(caplog, reason, token)


@pytest.mark.parametrize("token", [None, "", 42, ["a.b.c"], {"jwt": "a.b.c"}], ids=["missing", "empty", "number", "list", "object"])
def test_token_missing_or_not_a_string_is_refused_at_setup_and_refresh(table_keys, caplog, token):
    """A missing, empty or non-string token is AUTH_FAILED at setup and at refresh (connection unchanged), counted and logged, never a crash."""
    caplog.set_level(logging.INFO, logger="microsocket")
    d = table_driver(table_keys)
    fields = {} if token is None else {"token": token}
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", **fields}), "AUTH_FAILED", field="token")
    ok = d.connect(compact(HS, GOOD), topics=["t"])
    err = d.one(ok, {"type": "refresh", **fields})
    assert_error(err, "AUTH_FAILED", field="token")
    assert route_json(d, "/stats")["auth_refused"] == {"setup": 1, "refresh": 1, "http": 0}
    d.server_publish("t")
    assert seqs_of(d.take(ok), "t") == [1]
    assert [r for r in caplog.records if err["message"] in r.getMessage() and r.levelno == logging.INFO]


@pytest.mark.parametrize("authorization", [None, "Bearer", "Bearer   ", "Basic YWxpY2U6cHc=", "Token abc"],
                         ids=["no-header", "no-token", "blank-token", "basic", "other-scheme"])
def test_post_publish_without_a_bearer_token_is_401(table_keys, caplog, authorization):
    """POST /publish without a bearer token is 401 with WWW-Authenticate: Bearer, counted under "http" and logged; nothing is published."""
    caplog.set_level(logging.INFO, logger="microsocket")
    d = table_driver(table_keys)
    headers = [] if authorization is None else [f"Authorization: {authorization}"]
    req = make_request("POST", "/publish", *headers, body=b'{"topic": "t", "messageId": "m", "data": 1}')
    response = respond(d, d.app(), req)
    assert response.status == 401, response
    # RFC 6750 §3.1: "If the request lacks any authentication information ... the resource server SHOULD NOT include an error code"
    assert dict(response.headers)["WWW-Authenticate"] == "Bearer", response.headers
    assert d.stats()["published"] == 0
    assert_refusal_counted(d, "http")
    assert [r for r in caplog.records if r.name == "microsocket" and r.levelno == logging.INFO and "refused" in r.getMessage()]


def test_post_publish_with_a_good_token_publishes_as_its_sub(table_keys):
    """POST /publish with a good bearer token publishes as the token's sub: dedup is that user's (the same messageId from a setup connection of alice is a duplicate, from bob it is not); "bearer" in lower case works too."""
    d = table_driver(table_keys)
    watcher = d.connect(compact(HS, claims(sub="watcher")), topics=["t"])
    response = respond(d, d.app(), post_publish(compact(HS, GOOD), {"topic": "t", "messageId": "m1", "data": {"x": 1}}))
    assert (response.status, json.loads(response.body)) == (200, {"status": "ok", "messageId": "m1", "seqNo": 1})
    alice = d.connect(compact(HS, GOOD))
    assert d.publish(alice, "t", "m1", {"x": 1}) == [{"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}]
    bob = d.connect(compact(HS, claims(sub="bob")))
    assert d.publish(bob, "t", "m1", {"x": 1})[0]["status"] == "ok"
    lower = make_request("POST", "/publish", f"Authorization: bearer {compact(HS, GOOD)}", body=b'{"topic": "t", "data": 3}')
    assert respond(d, d.app(), lower).status == 200  # the scheme is case-insensitive (RFC 9110 §11.1)
    assert seqs_of(d.take(watcher), "t") == [1, 2, 3]


def test_ready_expires_at_is_the_token_exp(table_keys):
    """ready.expiresAt is the token's exp as written (an int stays an int, a fraction is kept), null without exp; refreshed.expiresAt likewise."""
    d = table_driver(table_keys)
    c = d.connect(compact(HS, claims(exp=WALL + 600)))
    assert d.ready(c)["expiresAt"] == WALL + 600 and isinstance(d.ready(c)["expiresAt"], int)
    assert d.ready(d.connect(compact(HS, claims(exp=WALL + 600.25))))["expiresAt"] == WALL + 600.25
    assert d.ready(d.connect(compact(HS, claims(exp=None))))["expiresAt"] is None
    assert d.one(c, {"type": "refresh", "token": compact(HS, claims(exp=WALL + 900))}) == {"type": "refreshed", "expiresAt": WALL + 900}
    assert d.one(c, {"type": "refresh", "token": compact(HS, claims(exp=None))}) == {"type": "refreshed", "expiresAt": None}


# -- RS256, with tokens made by PyJWT and cryptography


@pytest.fixture(scope="module")
def rsa_keys():
    """Two 2048-bit RSA private keys (cryptography), made once for this module."""
    pytest.importorskip("cryptography", reason="RS256 test keys are made with cryptography: pip install cryptography")
    from cryptography.hazmat.primitives.asymmetric import rsa

    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture
def pyjwt():
    """PyJWT, the independent library that signs the RS256 test tokens."""
    return pytest.importorskip("jwt", reason="RS256 test tokens are made with PyJWT: pip install pyjwt")


def uint(value: int) -> str:
    """A JWK Base64urlUInt (RFC 7518 §2): the minimum octets, big-endian."""
    return b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def rsa_jwk(private_key, kid: str | None = None) -> dict:
    """The public JWK (n, e and an optional kid) of a cryptography RSA key."""
    numbers = private_key.public_key().public_numbers()
    jwk = {"kty": "RSA", "n": uint(numbers.n), "e": uint(numbers.e)}
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def rs256(pyjwt, private_key, kid: str | None = None, **claims_) -> str:
    """An RS256 token signed by PyJWT."""
    return pyjwt.encode(claims_, private_key, algorithm="RS256", headers={"kid": kid} if kid else None)


def test_rs256_end_to_end_with_rotation(server_factory, tmp_path, rsa_keys, pyjwt, wsclient):
    """With a JWK Set of two RSA keys, PyJWT's RS256 tokens are accepted over the network (ready: userId = sub, expiresAt = exp), kid selects the key, a token without kid is tried against both, and one whose kid names the other key is AUTH_FAILED; POST /publish takes the same tokens."""
    k1, k2 = rsa_keys
    server = server_factory(jwt_keys=write_json(tmp_path, "jwks.json", {"keys": [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]}))
    now = int(time.time())
    exp = now + 600

    def token(key, kid, sub="alice"):
        return rs256(pyjwt, key, kid, sub=sub, iat=now, exp=exp)

    async def main():
        for key, kid, sub in ((k1, "k1", "alice"), (k2, "k2", "bob"), (k2, None, "carol"), (k1, None, "dave")):
            async with wsclient.connect(server.ws_url()) as ws:
                ready = await request(ws, {"type": "setup", "token": token(key, kid, sub)})
                assert ready["type"] == "ready", (kid, ready)
                assert (ready["userId"], ready["expiresAt"]) == (sub, exp)
        for key, kid in ((k2, "k1"), (k1, "k2")):
            async with wsclient.connect(server.ws_url()) as ws:
                err = await request(ws, {"type": "setup", "token": token(key, kid)})
                assert_error(err, "AUTH_FAILED", field="token")

    run(main())
    body = json.dumps({"topic": "t", "messageId": "m", "data": 1}).encode()
    ok = http_request(server.url("/publish"), "POST", {"Authorization": f"Bearer {token(k2, 'k2')}"}, body)
    assert ok.status == 200 and ok.json()["seqNo"] == 1, ok
    bad = http_request(server.url("/publish"), "POST", {"Authorization": f"Bearer {token(k2, 'k1')}"}, body)
    assert bad.status == 401 and bad.headers["www-authenticate"].startswith("Bearer"), bad
    assert server.stats()["auth_refused"] == {"setup": 2, "refresh": 0, "http": 1}


def test_rs256_alg_confusion_with_the_real_public_key(tmp_path, rsa_keys, pyjwt):
    """With only an RSA key configured, HS256 tokens HMAC-signed with that public key's bytes (PEM, DER, PKCS#1, JWK text, n) are AUTH_FAILED, with or without its kid; PyJWT's RS256 token on the same broker is accepted."""
    from cryptography.hazmat.primitives import serialization

    key = rsa_keys[0]
    public = key.public_key()
    jwk = rsa_jwk(key, "k1")
    d = tie_wall(BrokerDriver(jwt_keys=write_json(tmp_path, "jwks.json", {"keys": [jwk]})))
    encodings = serialization.Encoding
    formats = serialization.PublicFormat
    secrets_tried = [
        public.public_bytes(encodings.PEM, formats.SubjectPublicKeyInfo),
        public.public_bytes(encodings.DER, formats.SubjectPublicKeyInfo),
        public.public_bytes(encodings.PEM, formats.PKCS1),
        json.dumps(jwk).encode(),
        base64.urlsafe_b64decode(jwk["n"] + "=="),
    ]
    for secret in secrets_tried:
        for header in ({"alg": "HS256"}, {"alg": "HS256", "kid": "k1"}):
            c = d.connect(token=None)
            assert_error(d.one(c, {"type": "setup", "token": compact(header, {"sub": "alice"}, secret)}), "AUTH_FAILED", field="token")
    assert d.stats()["auth_refused"]["setup"] == 2 * len(secrets_tried)
    good = d.connect(rs256(pyjwt, key, "k1", sub="alice", exp=WALL + 60))
    assert d.ready(good)["userId"] == "alice" and d.ready(good)["expiresAt"] == WALL + 60


def test_rs256_header_refused_when_only_an_hs256_key_is_configured(rsa_keys, pyjwt):
    """With only --jwt-secret (an oct key), a genuine RS256 token is AUTH_FAILED: an alg that no configured key's type verifies is refused."""
    d = tie_wall(BrokerDriver(jwt_secret=SECRET))
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", "token": rs256(pyjwt, rsa_keys[0], sub="alice")}), "AUTH_FAILED", field="token")
    assert d.ready(d.connect(hs256("alice")))["userId"] == "alice"


def test_rsa_key_under_2048_bits_refuses_to_start(server_factory, tmp_path):
    """A JWK Set holding a 1024-bit RSA key is a ValueError naming the 2048-bit minimum: the server does not start."""
    pytest.importorskip("cryptography", reason="the small RSA key is made with cryptography: pip install cryptography")
    from cryptography.hazmat.primitives.asymmetric import rsa

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = write_json(tmp_path, "jwks.json", {"keys": [rsa_jwk(small, "old")]})
    with pytest.raises(ValueError, match="2048"):
        server_factory(jwt_keys=path)


@pytest.mark.slow  # a Python subprocess
def test_cli_rsa_key_under_2048_bits_exits_2(tmp_path):
    """The CLI given a JWK Set with a 1024-bit RSA key exits 2 with a message naming the key and the 2048-bit minimum, no traceback."""
    pytest.importorskip("cryptography", reason="the small RSA key is made with cryptography: pip install cryptography")
    from cryptography.hazmat.primitives.asymmetric import rsa

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = write_json(tmp_path, "jwks.json", {"keys": [rsa_jwk(small, "old")]})
    done = subprocess.run([sys.executable, SCRIPT, "--port", "0", "--jwt-keys", path], capture_output=True, text=True,
                          timeout=20, env=child_env())
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "2048" in done.stderr and "old" in done.stderr and "Traceback" not in done.stderr, done.stderr


# -- HS256 through --jwt-secret, and secrets kept out of sight


@pytest.mark.parametrize("secret, ok", [("x" * 31, False), ("x" * 32, True), ("\u00e9" * 15 + "a", False), ("\u00e9" * 15 + "ab", True)],
                         ids=["31-bytes", "32-bytes", "16-chars-31-bytes", "17-chars-32-bytes"])
def test_jwt_secret_minimum_is_32_utf8_bytes(server_factory, secret, ok):
    """--jwt-secret needs at least 32 UTF-8 bytes (not characters): a shorter one is a ValueError naming 32 and the server does not start."""
    if ok:
        assert server_factory(jwt_secret=secret).stats()["connections"] == 0
    else:
        with pytest.raises(ValueError, match="32"):
            server_factory(jwt_secret=secret)


@pytest.mark.slow  # Python subprocesses
@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_short_jwt_secret_exits_2_without_echoing_it(how):
    """The CLI given a secret under 32 bytes (flag or MICROSOCKET_JWT_SECRET) exits 2 naming --jwt-secret and the minimum of 32, without printing the secret."""
    short = "short-Secret-9f3a"
    args = ["--jwt-secret", short] if how == "flag" else []
    env = child_env(**({"MICROSOCKET_JWT_SECRET": short} if how == "env" else {}))
    done = subprocess.run([sys.executable, SCRIPT, "--port", "0", *args], capture_output=True, text=True, timeout=20, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "--jwt-secret" in done.stderr and "32" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert short not in done.stdout + done.stderr


@pytest.mark.slow  # a Python subprocess
def test_cli_help_never_prints_secrets_from_the_environment():
    """--help, with MICROSOCKET_JWT_SECRET and MICROSOCKET_SIGN_KEYS set, prints neither secret."""
    jwt_secret = "env-jwt-secret-" + "Q" * 24
    sign_secret = "env-sign-secret-" + "Z" * 24
    env = child_env(MICROSOCKET_JWT_SECRET=jwt_secret, MICROSOCKET_SIGN_KEYS=f"k9={sign_secret}")
    done = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=20, env=env)
    assert done.returncode == 0, done.stderr
    assert "--jwt-secret" in done.stdout
    assert jwt_secret not in done.stdout + done.stderr and sign_secret not in done.stdout + done.stderr


def test_config_repr_hides_secrets():
    """repr(Config) (what a log line or a traceback would show) holds neither the JWT secret nor a signing secret."""
    config = ms.Config(jwt_secret=SECRET, sign_keys=("k1=" + "s" * 40,))
    assert SECRET not in repr(config) and "s" * 40 not in repr(config)


@pytest.mark.slow  # a Python subprocess
def test_cli_jwt_secret_end_to_end(wsclient):
    """The CLI with --jwt-secret accepts HS256 tokens made with the standard library (ready: userId = sub, expiresAt = exp), refuses a demo-style token with AUTH_FAILED and logs why at INFO, serves no /demo/publish, and never prints the secret."""
    port = free_port()
    now = int(time.time())

    def token(**extra):
        return compact({"alg": "HS256", "typ": "JWT"}, {"sub": "alice", "iat": now, "exp": now + 600, **extra})

    async def main():
        async with wsclient.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            ready = await request(ws, {"type": "setup", "token": token()})
            assert (ready["type"], ready["userId"], ready["expiresAt"]) == ("ready", "alice", now + 600), ready
        async with wsclient.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            err = await request(ws, {"type": "setup", "token": "alice"})
            assert_error(err, "AUTH_FAILED", field="token")
            return err["message"]

    with cli("--port", str(port), "--jwt-secret", SECRET, env=child_env()) as (proc, lines):
        banner = read_banner(lines)
        reason = run(main())
        assert http_request(f"http://127.0.0.1:{port}/demo/publish/t?x=1").status == 404
        wait_until(lambda: any(reason in line and "INFO" in line for line in proc.stderr_lines), what="the refusal in the log")
        log_text = "".join(proc.stderr_lines)
        assert SECRET not in banner + log_text
        assert "demo auth" not in log_text


# -- ACL tables: each action x granted / denied x source


def rw(*patterns: str) -> dict:
    return {"read": list(patterns), "write": list(patterns)}


# source: (ACL file or None, alice's token claims, a topic granted to alice, a topic denied to her)
ACL_SOURCES = {
    "file-user": ({"alice": rw("t.*"), "bob": rw("u.*")}, {}, "t.a", "u.a"),
    "file-star": ({"*": rw("t.*"), "bob": rw("u.*")}, {}, "t.a", "u.a"),
    "claims": (None, rw("t.*"), "t.a", "u.a"),
    "sub-file": ({"*": rw("user.{sub}.*")}, {}, "user.alice.a", "user.bob.a"),
    "sub-claims": (None, rw("user.{sub}.*"), "user.alice.a", "user.bob.a"),
}


def acl_world(broker_driver, tmp_path, acl: dict | None, alice_claims: dict, granted: str, denied: str | None, **config):
    """A JWT broker (--jwt-secret, and --acl when `acl` is given), alice's token, and the token of a
    watcher that may read everything (its `read: ["*"]` claim adds to whatever the file says)."""
    if acl is not None:
        config["acl"] = write_json(tmp_path, "acl.json", acl)
    d = tie_wall(broker_driver(jwt_secret=SECRET, **config))
    return types.SimpleNamespace(d=d, alice=hs256("alice", **alice_claims), watcher=hs256("watcher", read=["*"]),
                                 granted=granted, denied=denied)


def act_subscribe(w, topic: str, allowed: bool) -> None:
    d = w.d
    c = d.connect(w.alice)
    reply = d.one(c, {"type": "subscribe", "topic": topic, "id": "q"})
    d.server_publish(topic)
    got = d.take(c)
    if allowed:
        assert (reply["type"], reply["topic"]) == ("subscribed", topic), reply
        assert seqs_of(got, topic) == [1]
    else:
        assert_error(reply, "ACL_DENIED", topic=topic, id="q")
        assert got == [] and d.stats()["subscriptions"] == 0


def act_setup_topics(w, topic: str, allowed: bool) -> None:
    d = w.d
    c = d.connect(token=None)
    replies = d.send(c, {"type": "setup", "token": w.alice, "topics": [topic], "id": "s"})
    if allowed:
        assert [(r["type"], r.get("topic")) for r in replies] == [("ready", None), ("subscribed", topic)], replies
    else:
        assert len(replies) == 1, replies
        assert_error(replies[0], "ACL_DENIED", topic=topic, id="s")
        assert d.stats()["subscriptions"] == 0
        assert d.one(c, {"type": "setup", "token": w.alice})["type"] == "ready"  # the refused setup left it un-set-up


def act_sub_socket(w, topic: str, allowed: bool) -> None:
    d = w.d
    c = d.connect(token=None, bound_topic=topic)
    replies = d.send(c, {"type": "setup", "token": w.alice, "id": "s"})
    d.server_publish(topic)
    got = d.take(c)
    if allowed:
        assert [(r["type"], r.get("topic")) for r in replies] == [("ready", None), ("subscribed", topic)], replies
        assert seqs_of(got, topic) == [1]
    else:
        assert len(replies) == 1, replies
        assert_error(replies[0], "ACL_DENIED", topic=topic, id="s")
        assert got == [] and d.stats()["subscriptions"] == 0


def act_publish(w, topic: str, allowed: bool) -> None:
    d = w.d
    watcher = d.connect(w.watcher, topics=[topic])
    c = d.connect(w.alice)
    replies = d.publish(c, topic, "m1", {"n": 1}, id="p")
    got = d.take(watcher)
    if allowed:
        assert replies == [{"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1, "id": "p"}]
        assert seqs_of(got, topic) == [1]
    else:
        assert len(replies) == 1, replies
        assert_error(replies[0], "ACL_DENIED", topic=topic, messageId="m1", id="p")
        assert got == [] and d.stats()["published"] == 0


def act_post_publish(w, topic: str, allowed: bool) -> None:
    d = w.d
    watcher = d.connect(w.watcher, topics=[topic])
    response = respond(d, d.app(), post_publish(w.alice, {"topic": topic, "messageId": "m1", "data": {"n": 1}}))
    got = d.take(watcher)
    if allowed:
        assert (response.status, json.loads(response.body)) == (200, {"status": "ok", "messageId": "m1", "seqNo": 1})
        assert seqs_of(got, topic) == [1]
    else:
        assert response.status == 403, response
        assert json.loads(response.body)["error"]
        assert got == [] and d.stats()["published"] == 0


def act_replay(w, topic: str, allowed: bool) -> None:
    d = w.d
    d.server_publish(topic, 2)
    c = d.connect(w.alice)
    replies = d.send(c, {"type": "replay", "topic": topic, "fromSeq": 1, "id": "r"})
    if allowed:
        assert seqs_of(replies, topic) == [1, 2] and replies[-1]["type"] == "replayed", replies
    else:
        assert len(replies) == 1, replies
        assert_error(replies[0], "ACL_DENIED", topic=topic, id="r")


def act_resume(w, topic: str, allowed: bool) -> None:
    """Resume names `topic` in lastSeqPerTopic; when it is denied, a granted topic is resumed beside it."""
    d = w.d
    d.server_publish(topic, 2)
    kept = topic if allowed else w.granted
    if not allowed:
        d.server_publish(kept, 1)
    old = d.connect(w.alice, topics=[kept])
    session_id = d.ready(old)["sessionId"]
    d.disconnect(old)
    new = d.connect(w.alice)
    replies = d.send(new, {"type": "resume", "sessionId": session_id, "lastSeqPerTopic": {kept: 0, topic: 0}, "id": "r"})
    resumed = replies[-1]
    assert resumed["type"] == "resumed", replies
    if allowed:
        assert resumed["topics"] == [topic] and seqs_of(replies, topic) == [1, 2], replies
        assert resumed["replayed"] == 2
    else:
        assert_error(replies[0], "ACL_DENIED", topic=topic, id="r")  # its own error, before `resumed`
        assert [r["type"] for r in replies] == ["error", "message", "resumed"], replies
        assert resumed["topics"] == [kept] and seqs_of(replies, kept) == [1] and seqs_of(replies, topic) == []
        assert resumed["replayed"] == 1 and topic not in resumed["epochs"]
        d.server_publish(topic)  # and it is not subscribed to it now
        d.server_publish(kept)
        assert seqs_of(d.take(new)) == [2]


def act_presence(w, topic: str, allowed: bool) -> None:
    d = w.d
    d.connect(w.watcher, topics=[topic])
    c = d.connect(w.alice)
    reply = d.one(c, {"type": "presence", "topic": topic, "id": "p"})
    if allowed:
        assert reply == {"type": "presence", "topic": topic, "users": ["watcher"], "count": 1, "id": "p"}
    else:
        assert_error(reply, "ACL_DENIED", topic=topic, id="p")


ACTIONS = {
    "subscribe": act_subscribe,
    "setup-topics": act_setup_topics,
    "sub-socket": act_sub_socket,
    "publish": act_publish,
    "post-publish": act_post_publish,
    "replay": act_replay,
    "resume": act_resume,
    "presence": act_presence,
}


@pytest.mark.parametrize("outcome", ["granted", "denied"])
@pytest.mark.parametrize("action", list(ACTIONS))
@pytest.mark.parametrize("source", list(ACL_SOURCES))
def test_acl_table(broker_driver, tmp_path, source, action, outcome):
    """The action on a topic the source grants alice succeeds; on one it does not grant it is ACL_DENIED naming the topic, and nothing happens."""
    acl, alice_claims, granted, denied = ACL_SOURCES[source]
    w = acl_world(broker_driver, tmp_path, acl, alice_claims, granted, denied)
    ACTIONS[action](w, granted if outcome == "granted" else denied, outcome == "granted")


@pytest.mark.parametrize("action", list(ACTIONS))
def test_acl_no_source_allows_everything(broker_driver, tmp_path, action):
    """With JWT on but no ACL file and no read/write claim in the token, every action is allowed on any topic."""
    w = acl_world(broker_driver, tmp_path, None, {}, "t.a", None)
    w.watcher = hs256("watcher")
    ACTIONS[action](w, "u.anything", True)


def test_acl_sources_add_up(broker_driver, tmp_path):
    """Grants from the ACL file (alice's entry and "*") and the token's claims add up; anything none of them grants is denied."""
    acl = {"alice": rw("t.*"), "*": {"read": ["pub.*"]}}
    w = acl_world(broker_driver, tmp_path, acl, rw("u.*"), "t.a", "v.a")
    d = w.d
    c = d.connect(w.alice)
    for topic in ("t.a", "u.a", "pub.news"):
        assert d.one(c, {"type": "subscribe", "topic": topic})["type"] == "subscribed", topic
    assert_error(d.one(c, {"type": "subscribe", "topic": "v.a"}), "ACL_DENIED", topic="v.a")
    assert d.publish(c, "u.a", "m1")[0]["status"] == "ok"
    assert_error(d.publish(c, "pub.news", "m2")[0], "ACL_DENIED", topic="pub.news")  # "*" grants read only


def test_acl_patterns_exact_prefix_and_everything(broker_driver, tmp_path):
    """An exact pattern matches only its topic, `prices.*` matches under `prices.` only, `prices*` matches `pricesx`, `*` matches all (SPEC's examples)."""
    cases = [
        (["prices.btc"], {"prices.btc": True, "prices.btcx": False, "prices": False}),
        (["prices.*"], {"prices.btc": True, "prices.": True, "prices": False, "pricesx": False}),
        (["prices*"], {"pricesx": True, "prices": True, "prices.btc": True, "price": False}),
        (["*"], {"anything": True, "a.b.c": True}),
        ([], {"anything": False}),  # an empty claim is still a source: it grants nothing
    ]
    for patterns, expected in cases:
        w = acl_world(broker_driver, tmp_path, None, {"read": patterns}, "", None)
        c = w.d.connect(w.alice)
        for topic, allowed in expected.items():
            reply = w.d.one(c, {"type": "subscribe", "topic": topic})
            assert (reply["type"] == "subscribed") is allowed, (patterns, topic, reply)


def test_acl_sub_is_the_users_own_id(broker_driver, tmp_path):
    """`{sub}` in an ACL file pattern stands for each user's own id: alice and bob each reach their own namespace and not the other's."""
    w = acl_world(broker_driver, tmp_path, {"*": rw("user.{sub}.*")}, {}, "user.alice.a", "user.bob.a")
    d = w.d
    alice, bob = d.connect(hs256("alice")), d.connect(hs256("bob"))
    assert d.one(alice, {"type": "subscribe", "topic": "user.alice.inbox"})["type"] == "subscribed"
    assert d.one(bob, {"type": "subscribe", "topic": "user.bob.inbox"})["type"] == "subscribed"
    assert_error(d.one(alice, {"type": "subscribe", "topic": "user.bob.inbox"}), "ACL_DENIED", topic="user.bob.inbox")
    assert_error(d.one(bob, {"type": "subscribe", "topic": "user.alice.inbox"}), "ACL_DENIED", topic="user.alice.inbox")
    assert_error(d.one(alice, {"type": "subscribe", "topic": "user.{sub}.inbox"}), "ACL_DENIED", topic="user.{sub}.inbox")


def test_acl_read_only_token_can_publish_nowhere(broker_driver, tmp_path):
    """A token with only a `read` claim is restricted for both actions: it subscribes where it may read and is ACL_DENIED for every publish."""
    w = acl_world(broker_driver, tmp_path, None, {"read": ["*"]}, "t.a", None)
    c = w.d.connect(w.alice)
    assert w.d.one(c, {"type": "subscribe", "topic": "t.a"})["type"] == "subscribed"
    assert_error(w.d.publish(c, "t.a", "m1")[0], "ACL_DENIED", topic="t.a", messageId="m1")


def test_acl_denied_publish_takes_no_seqno_and_is_not_remembered(broker_driver, tmp_path):
    """A publish denied by the ACL (WebSocket and POST /publish) takes no seqNo and is not remembered by dedup: once a refresh grants the topic, the same messageIds are accepted as "ok" with seqNos 1 and 2."""
    w = acl_world(broker_driver, tmp_path, None, rw("t.*"), "t.a", "u.a")
    d = w.d
    watcher = d.connect(w.watcher, topics=["u.a"])
    c = d.connect(w.alice)
    assert_error(d.publish(c, "u.a", "m1", 1)[0], "ACL_DENIED", topic="u.a", messageId="m1")
    assert respond(d, d.app(), post_publish(w.alice, {"topic": "u.a", "messageId": "m2", "data": 2})).status == 403
    wider = hs256("alice", **rw("t.*", "u.*"))
    assert d.one(c, {"type": "refresh", "token": wider})["type"] == "refreshed"
    assert d.publish(c, "u.a", "m1", 1) == [{"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}]
    response = respond(d, d.app(), post_publish(wider, {"topic": "u.a", "messageId": "m2", "data": 2}))
    assert json.loads(response.body) == {"status": "ok", "messageId": "m2", "seqNo": 2}
    assert d.publish(c, "u.a", "m1", 1) == [{"type": "ack", "messageId": "m1", "status": "duplicate", "seqNo": 1}]
    assert [(m["seqNo"], m["data"]) for m in d.take(watcher)] == [(1, 1), (2, 2)]


def test_acl_denials_are_counted_as_errors(broker_driver, tmp_path):
    """Every ACL_DENIED a client is sent counts in /stats errors and /metrics errors_total: subscribe, publish, replay, presence, the topic a resume leaves out, and the subscription a refresh ends."""
    w = acl_world(broker_driver, tmp_path, None, rw("t.*", "u.*"), "t.a", "v.a")
    d = w.d
    c = d.connect(w.alice, topics=["t.a", "u.a"])
    assert_error(d.one(c, {"type": "subscribe", "topic": "v.a"}), "ACL_DENIED")
    assert_error(d.publish(c, "v.a", "m")[0], "ACL_DENIED")
    assert_error(d.one(c, {"type": "replay", "topic": "v.a", "fromSeq": 1}), "ACL_DENIED")
    assert_error(d.one(c, {"type": "presence", "topic": "v.a"}), "ACL_DENIED")
    session_id = d.ready(c)["sessionId"]
    d.disconnect(c)
    c = d.connect(w.alice)
    replies = d.send(c, {"type": "resume", "sessionId": session_id, "lastSeqPerTopic": {"v.a": 0}})
    assert [r.get("code", r["type"]) for r in replies] == ["ACL_DENIED", "resumed"], replies
    replies = d.send(c, {"type": "refresh", "token": hs256("alice", **rw("t.*"))})
    assert [r.get("code", r["type"]) for r in replies] == ["refreshed", "ACL_DENIED"], replies
    assert d.stats()["errors"] == {"ACL_DENIED": 6}
    assert 'microsocket_errors_total{code="ACL_DENIED"} 6' in metric_lines(d)


def test_acl_resume_rechecks_the_sessions_topics_against_the_new_token(broker_driver, tmp_path):
    """A session subscribed under a wider token, resumed (no lastSeqPerTopic) by a connection whose token reads less: each topic it may not read gets its own ACL_DENIED before `resumed` and is left out; the others are resumed with their gap."""
    w = acl_world(broker_driver, tmp_path, None, {"read": ["t.*", "u.*"]}, "t.a", "u.a")
    d = w.d
    old = d.connect(w.alice, topics=["t.a", "u.a", "u.b"])
    session_id = d.ready(old)["sessionId"]
    d.disconnect(old)
    for topic in ("t.a", "u.a", "u.b"):
        d.server_publish(topic)
    new = d.connect(hs256("alice", read=["t.*"]))
    replies = d.send(new, {"type": "resume", "sessionId": session_id})
    assert [r.get("code", r["type"]) for r in replies] == ["ACL_DENIED", "ACL_DENIED", "message", "resumed"], replies
    assert sorted(r["topic"] for r in replies[:2]) == ["u.a", "u.b"]
    assert (replies[2]["topic"], replies[2]["seqNo"]) == ("t.a", 1)
    assert replies[-1]["topics"] == ["t.a"] and replies[-1]["replayed"] == 1
    for topic in ("u.a", "t.a"):
        d.server_publish(topic)
    assert [(m["topic"], m["seqNo"]) for m in d.take(new)] == [("t.a", 2)]


def test_acl_file_applies_in_demo_auth(broker_driver, tmp_path):
    """In demo auth (no JWT key) an ACL file still applies: the userId the token names gets its entry and "*", nothing else."""
    d = broker_driver(acl=write_json(tmp_path, "acl.json", {"alice": rw("t.*"), "*": {"read": ["pub.*"]}}))
    alice, bob = d.connect("alice"), d.connect("bob")
    assert d.one(alice, {"type": "subscribe", "topic": "t.a"})["type"] == "subscribed"
    assert_error(d.one(bob, {"type": "subscribe", "topic": "t.a"}), "ACL_DENIED", topic="t.a")
    assert d.one(bob, {"type": "subscribe", "topic": "pub.x"})["type"] == "subscribed"
    assert_error(d.publish(bob, "pub.x", "m")[0], "ACL_DENIED", topic="pub.x")


@pytest.mark.parametrize("source", ["file-user", "file-star", "sub-file"])
def test_acl_server_publish_naming_a_user(server_factory, tmp_path, source):
    """Server.publish naming a user applies that user's ACL file grants: a denied topic raises PermissionError and takes no seqNo; a granted one is published; without a user it publishes past any ACL."""
    acl, _, granted, denied = ACL_SOURCES[source]
    server = server_factory(jwt_secret=SECRET, acl=write_json(tmp_path, "acl.json", acl))
    with pytest.raises(PermissionError):
        server.publish(denied, {"n": 1}, message_id="m1", user_id="alice")
    result = server.publish(granted, {"n": 1}, message_id="m1", user_id="alice")
    assert (result.status, result.seq_no) == ("ok", 1)
    assert server.publish(denied, {"n": 2}, message_id="m1").seq_no == 1  # as "server": no ACL, and no seqNo was taken


def test_acl_server_publish_without_acl_file_allows_a_named_user(server_factory):
    """Without an ACL file, Server.publish naming a user publishes to any topic."""
    server = server_factory(jwt_secret=SECRET)
    assert server.publish("u.a", 1, message_id="m1", user_id="alice").status == "ok"


def test_acl_end_to_end_over_the_network(server_factory, tmp_path, wsclient):
    """Over the network, with an ACL file: a sub-socket whose URL topic is denied gets ACL_DENIED on setup while a granted one is subscribed, and POST /publish to a denied topic is 403 (nothing published)."""
    server = server_factory(jwt_secret=SECRET, acl=write_json(tmp_path, "acl.json", {"alice": rw("t.*")}))
    now = int(time.time())
    token = compact(HS, {"sub": "alice", "iat": now, "exp": now + 600})

    async def main():
        async with wsclient.connect(server.ws_url("/ws/sub/u.a")) as ws:
            assert_error(await request(ws, {"type": "setup", "token": token}), "ACL_DENIED", topic="u.a")
        async with wsclient.connect(server.ws_url("/ws/sub/t%2Ea")) as ws:
            assert (await request(ws, {"type": "setup", "token": token}))["type"] == "ready"
            assert (await recv_json(ws))["topic"] == "t.a"

    run(main())
    body = json.dumps({"topic": "u.a", "messageId": "m", "data": 1}).encode()
    response = http_request(server.url("/publish"), "POST", {"Authorization": f"Bearer {token}"}, body)
    assert response.status == 403 and response.json()["error"], response
    assert server.stats()["published"] == 0


# -- expiry and refresh, on the fake clock


def expiring_driver(broker_driver, **config) -> BrokerDriver:
    """A JWT broker (leeway 30 s unless configured) whose Unix clock moves with its FakeClock from WALL."""
    return tie_wall(broker_driver(jwt_secret=SECRET, **config))


def at(d: BrokerDriver, seconds: float) -> None:
    """Move the clock to `seconds` after the start (WALL) and run the once-a-second sweep."""
    d.clock.now = 1000.0 + seconds
    d.sweep()


def test_expiry_closes_4003_at_exp_plus_leeway_not_before(broker_driver):
    """A connection whose token has exp = start + 100 is closed with 4003 at exp + leeway (130 s), not a moment before, and keeps receiving until then; one without exp is never closed."""
    d = expiring_driver(broker_driver)
    c = d.connect(hs256("alice", exp=WALL + 100), topics=["t"])
    forever = d.connect(hs256("bob", exp=None), topics=["t"])
    at(d, 129.9)
    assert d.close_requested(c) is None
    d.server_publish("t")
    assert seqs_of(d.take(c)) == [1]
    at(d, 130)
    assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED
    at(d, 10**7)
    assert d.close_requested(forever) is None


def test_expiry_honours_the_configured_leeway(broker_driver):
    """With --jwt-leeway 0 the connection is closed at exp itself; with 5, at exp + 5."""
    for leeway, deadline in ((0, 100), (5, 105)):
        d = expiring_driver(broker_driver, jwt_leeway=leeway)
        c = d.connect(hs256("alice", exp=WALL + 100))
        at(d, deadline - 0.5)
        assert d.close_requested(c) is None, leeway
        at(d, deadline)
        assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED, leeway


def test_refresh_with_a_later_exp_moves_the_expiry(broker_driver):
    """refresh at start + 50 with exp = start + 300 answers refreshed {expiresAt}; the old deadline (130 s) passes without a close, the new one (330 s) closes 4003."""
    d = expiring_driver(broker_driver)
    c = d.connect(hs256("alice", exp=WALL + 100), topics=["t"])
    at(d, 50)
    assert d.one(c, {"type": "refresh", "token": hs256("alice", iat=WALL + 50, exp=WALL + 300), "id": 1}) == {
        "type": "refreshed", "expiresAt": WALL + 300, "id": 1}
    at(d, 131)
    assert d.close_requested(c) is None
    d.server_publish("t")
    assert seqs_of(d.take(c)) == [1]
    at(d, 329.5)
    assert d.close_requested(c) is None
    at(d, 330)
    assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED


def test_refresh_with_an_earlier_exp_or_none(broker_driver):
    """The refreshed token's exp replaces the old one either way: an earlier exp closes earlier; a token without exp means the connection no longer expires."""
    d = expiring_driver(broker_driver)
    sooner = d.connect(hs256("alice", exp=WALL + 1000))
    never = d.connect(hs256("bob", exp=WALL + 100))
    assert d.one(sooner, {"type": "refresh", "token": hs256("alice", exp=WALL + 60)})["expiresAt"] == WALL + 60
    assert d.one(never, {"type": "refresh", "token": hs256("bob", exp=None)}) == {"type": "refreshed", "expiresAt": None}
    at(d, 90)
    assert d.close_requested(sooner) == ms.CloseCode.TOKEN_EXPIRED
    at(d, 10**7)
    assert d.close_requested(never) is None


def test_refresh_naming_another_sub_is_refused_and_changes_nothing(broker_driver, caplog):
    """refresh with a valid token for another sub is AUTH_FAILED (counted and logged); the connection keeps its user, its subscriptions, its grants and its expiry."""
    caplog.set_level(logging.INFO, logger="microsocket")
    d = expiring_driver(broker_driver)
    c = d.connect(hs256("alice", exp=WALL + 100, read=["t.*"], write=["t.*"]), topics=["t.a"])
    mallory = hs256("mallory", exp=WALL + 10_000, read=["*"], write=["*"])
    err = d.one(c, {"type": "refresh", "token": mallory, "id": "r"})
    assert_error(err, "AUTH_FAILED", field="token", id="r")
    assert d.stats()["auth_refused"] == {"setup": 0, "refresh": 1, "http": 0}
    assert [r for r in caplog.records if r.levelno == logging.INFO and err["message"] in r.getMessage()]
    assert_error(d.one(c, {"type": "subscribe", "topic": "u.a"}), "ACL_DENIED", topic="u.a")  # alice's grants still
    assert [(r["type"], r.get("seqNo")) for r in d.publish(c, "t.a", "m1")] == [("ack", 1), ("message", 1)]
    assert d.one(c, {"type": "presence", "topic": "t.a"})["users"] == ["alice"]
    at(d, 129.5)
    assert d.close_requested(c) is None
    at(d, 130)
    assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED


def test_refresh_whose_grants_no_longer_cover_a_subscription_ends_it(broker_driver):
    """After refresh with narrower read grants, each subscription they no longer cover ends with error ACL_DENIED naming it (after `refreshed`); its messages stop, the others go on, and presence no longer lists the user there."""
    d = expiring_driver(broker_driver)
    c = d.connect(hs256("alice", read=["t.*", "u.*"]), topics=["t.a", "u.a", "u.b"])
    watcher = d.connect(hs256("watcher", read=["*"]))
    replies = d.send(c, {"type": "refresh", "token": hs256("alice", read=["t.*"]), "id": "r"})
    assert replies[0] == {"type": "refreshed", "expiresAt": WALL + 3600, "id": "r"}
    assert sorted(r["topic"] for r in replies[1:]) == ["u.a", "u.b"], replies
    for r in replies[1:]:
        assert_error(r, "ACL_DENIED")
    assert d.stats()["subscriptions"] == 1
    for topic in ("u.a", "t.a", "u.b"):
        d.server_publish(topic)
    assert [(m["topic"], m["seqNo"]) for m in d.take(c)] == [("t.a", 1)]
    assert d.one(watcher, {"type": "presence", "topic": "u.a"})["count"] == 0
    assert_error(d.one(c, {"type": "subscribe", "topic": "u.a"}), "ACL_DENIED", topic="u.a")  # the new grants hold


def test_token_accepted_inside_the_leeway_closes_when_it_runs_out(broker_driver):
    """A token whose exp passed 29 s ago (leeway 30) is accepted, and its connection is closed 4003 one second later."""
    d = expiring_driver(broker_driver)
    c = d.connect(hs256("alice", exp=WALL - 29))
    assert d.ready(c)["expiresAt"] == WALL - 29
    at(d, 0.5)
    assert d.close_requested(c) is None
    at(d, 1)
    assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED


def test_connection_closed_4003_can_be_resumed_with_a_new_token(broker_driver):
    """After 4003 the client does what SPEC says (new token, reconnect, resume): the session is resumed with what was published meanwhile."""
    d = expiring_driver(broker_driver)
    c = d.connect(hs256("alice", exp=WALL + 10), topics=["t"])
    session_id = d.ready(c)["sessionId"]
    at(d, 40)
    assert d.close_requested(c) == ms.CloseCode.TOKEN_EXPIRED
    d.disconnect(c)  # what the I/O layer does once the close is sent
    d.server_publish("t", 2)
    new = d.connect(hs256("alice", iat=WALL + 40, exp=WALL + 4000))
    replies = d.send(new, {"type": "resume", "sessionId": session_id})
    assert seqs_of(replies, "t") == [1, 2] and replies[-1]["type"] == "resumed" and replies[-1]["topics"] == ["t"], replies


def test_refresh_in_an_acl_file_world_keeps_the_file_grants(broker_driver, tmp_path):
    """With an ACL file, a refresh (no claims) keeps the file's grants: subscriptions the file covers stay, nothing ends."""
    w = acl_world(broker_driver, tmp_path, {"alice": rw("t.*")}, {}, "t.a", "u.a")
    c = w.d.connect(w.alice, topics=["t.a"])
    assert w.d.send(c, {"type": "refresh", "token": hs256("alice", exp=WALL + 7200)}) == [{"type": "refreshed", "expiresAt": WALL + 7200}]
    w.d.server_publish("t.a")
    assert seqs_of(w.d.take(c)) == [1]


@pytest.mark.slow  # waits for a real token to expire (about 2 s)
def test_expiry_end_to_end_closes_with_4003(server_factory, wsclient):
    """Over the network, on the real clock with --jwt-leeway 0: a connection whose token's exp passes is closed by the server with 4003, not before exp, and /stats counts the 4003."""
    server = server_factory(jwt_secret=SECRET, jwt_leeway=0)
    exp = int(time.time()) + 2
    token = compact(HS, {"sub": "alice", "exp": exp})

    async def main():
        async with wsclient.connect(server.ws_url()) as ws:
            ready = await request(ws, {"type": "setup", "token": token, "topics": ["t"]})
            assert (ready["type"], ready["expiresAt"]) == ("ready", exp), ready
            assert (await recv_json(ws))["type"] == "subscribed"
            with pytest.raises(wsclient.ConnectionClosed) as closed:
                while True:
                    await asyncio.wait_for(ws.recv(), 6)
            assert time.time() >= exp - 0.05
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4003, closed.value

    run(main())
    wait_until(lambda: server.stats()["disconnects"].get("4003") == 1, what="the 4003 in /stats")


def _memory_growth(work) -> int:
    """Bytes still allocated after work() that were not before it (tracemalloc, after a collection)."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


@pytest.mark.slow  # tracemalloc makes it about a second
def test_refresh_storm_keeps_memory_bounded():
    """2,000 refreshes of one connection with the same day-long token leave memory flat: the expiry structure holds one deadline per connection, not one per refresh."""
    d = tie_wall(BrokerDriver(jwt_secret=SECRET))
    token = hs256("alice", exp=WALL + 86_400)
    c = d.connect(token)
    refresh = json.dumps({"type": "refresh", "token": token})

    def storm():
        for _ in range(2_000):
            d.broker.handle(c, refresh)
            c.out.clear()
        d.broker.dirty.clear()

    storm()  # warm-up
    grown = _memory_growth(storm)
    assert grown < 64 << 10, f"memory grew by {grown} bytes over 2,000 refreshes"


@pytest.mark.slow  # tracemalloc makes it about a second
def test_closed_connections_with_long_tokens_leave_nothing_behind():
    """2,000 connections with day-long tokens that set up and close leave memory flat (session TTL 0): nothing keeps a closed connection until its token would have expired."""
    d = tie_wall(BrokerDriver(jwt_secret=SECRET, session_ttl=0))
    token = hs256("alice", exp=WALL + 86_400)
    setup = json.dumps({"type": "setup", "token": token})

    def churn():
        for _ in range(2_000):
            client = ms.Peer(d.broker)
            d.broker.connect(client)
            d.broker.handle(client, setup)
            client.out.clear()
            d.broker.disconnect(client)
        d.broker.dirty.clear()
        d.sweep()  # sessions of TTL 0 go now; the tokens are valid for a day yet

    churn()  # warm-up
    grown = _memory_growth(churn)
    assert d.stats()["connections"] == 0 and d.stats()["sessions"] == 0
    assert grown < 256 << 10, f"memory grew by {grown} bytes over 2,000 closed connections"


# -- /demo/publish and the demo-auth warning


@pytest.mark.parametrize("config, status", [
    ({}, 200),
    ({"demo": False}, 404),
    ({"jwt_secret": SECRET}, 404),
    ({"jwt_secret": SECRET, "demo": True}, 200),
], ids=["demo-auth", "demo-auth-no-demo", "jwt", "jwt-demo"])
def test_demo_publish_route(config, status):
    """GET /demo/publish is on in demo auth, off with JWT, and --demo / --no-demo force it either way."""
    d = BrokerDriver(**config)
    response = respond(d, d.app(), make_request("GET", "/demo/publish/t?x=1"))
    assert response.status == status, response
    assert d.stats()["published"] == (1 if status == 200 else 0)


def test_demo_publish_is_under_the_acl_file_grants_of_demo(tmp_path):
    """With an ACL file, GET /demo/publish publishes only where the file lets the user "demo" write (403 elsewhere, nothing sequenced)."""
    d = BrokerDriver(acl=write_json(tmp_path, "acl.json", {"demo": {"write": ["open.*"]}}))
    assert respond(d, d.app(), make_request("GET", "/demo/publish/open.x?a=1")).status == 200
    assert respond(d, d.app(), make_request("GET", "/demo/publish/closed?a=1")).status == 403
    assert d.stats()["published"] == 1


def test_demo_auth_warns_at_start_and_jwt_does_not(server_factory, caplog):
    """Demo auth logs a WARNING at every start saying so; a JWT server does not; a JWT server with --demo warns that /demo/publish publishes without a token."""
    caplog.set_level(logging.INFO, logger="microsocket")

    def warnings() -> list[str]:
        found = [r.getMessage() for r in caplog.records if r.name == "microsocket" and r.levelno == logging.WARNING]
        caplog.clear()
        return found

    for _ in range(2):
        server_factory()
        assert any("demo auth" in text for text in warnings())
    server_factory(jwt_secret=SECRET)
    assert not any("demo" in text for text in warnings())
    server_factory(jwt_secret=SECRET, demo=True)
    assert any("/demo/publish" in text for text in warnings())


# -- presence and per-user connections


def test_presence_lists_at_most_max_presence_users_sorted_with_the_exact_count(broker_driver):
    """With max_presence 3 and 5 distinct users subscribed (one of them twice), presence lists the first 3 sorted and count 5."""
    d = broker_driver(max_presence=3)
    for user in ("erin", "carol", "alice", "dave", "bob", "alice"):
        d.connect(user, topics=["room"])
    reply = d.one(d.connect("zed"), {"type": "presence", "topic": "room", "id": 1})
    assert reply == {"type": "presence", "topic": "room", "users": ["alice", "bob", "carol"], "count": 5, "id": 1}


def test_presence_limit_zero_lists_nobody_but_counts(broker_driver):
    """With max_presence 0, presence lists no user but still gives the exact count."""
    d = broker_driver(max_presence=0)
    for user in ("a", "b"):
        d.connect(user, topics=["room"])
    assert d.one(d.connect("z"), {"type": "presence", "topic": "room"})["users"] == []
    assert d.one(d.connect("z"), {"type": "presence", "topic": "room"})["count"] == 2


def test_max_connections_per_user(broker_driver):
    """With max_connections_per_user 2, a user's third setup gets TOO_MANY_CONNECTIONS, the connection stays open and un-set-up, other users are unaffected, and once one of the two closes the same connection's setup succeeds."""
    d = broker_driver(max_connections_per_user=2)
    first, _second = d.connect("alice"), d.connect("alice")
    third = d.connect(token=None)
    assert_error(d.one(third, {"type": "setup", "token": "alice", "id": "s"}), "TOO_MANY_CONNECTIONS", id="s")
    assert d.one(third, {"type": "ping"}) == {"type": "pong"}
    assert_error(d.one(third, {"type": "subscribe", "topic": "t"}), "AUTH_REQUIRED")
    assert d.connect("bob") is not None and d.connect("bob") is not None
    d.disconnect(first)
    assert d.one(third, {"type": "setup", "token": "alice"})["userId"] == "alice"
    assert_error(d.one(d.connect(token=None), {"type": "setup", "token": "alice"}), "TOO_MANY_CONNECTIONS")


def test_refused_setup_takes_no_per_user_slot(broker_driver, tmp_path):
    """A setup refused for another reason (ACL_DENIED on setup.topics, AUTH_FAILED) does not count towards max_connections_per_user."""
    d = broker_driver(max_connections_per_user=1, acl=write_json(tmp_path, "acl.json", {"alice": rw("t.*")}))
    c = d.connect(token=None)
    assert_error(d.one(c, {"type": "setup", "token": "alice", "topics": ["u.a"]}), "ACL_DENIED", topic="u.a")
    assert_error(d.one(c, {"type": "setup", "token": ""}), "AUTH_FAILED")
    assert [r["type"] for r in d.send(c, {"type": "setup", "token": "alice", "topics": ["t.a"]})] == ["ready", "subscribed"]
    assert_error(d.one(d.connect(token=None), {"type": "setup", "token": "alice"}), "TOO_MANY_CONNECTIONS")


def test_max_connections_per_user_off_by_default(broker_driver):
    """max_connections_per_user defaults to 0 (off): one user may set up many connections."""
    d = broker_driver()
    for _ in range(10):
        d.connect("alice")
    assert d.stats()["connections"] == 10


# -- signed messages (I7)

K1 = "k1-secret-for-signing-messages-000000"
K0 = "k0-secret-for-signing-messages-111111"
SIGNED = {"sign_keys": (f"k1={K1}", f"k0={K0}")}


@pytest.fixture
def jcs():
    """The `jcs` package: an RFC 8785 implementation independent of microsocket's."""
    return pytest.importorskip("jcs", reason="signatures are checked with an independent RFC 8785 implementation: pip install jcs")


def expected_sig(jcs, secret: str, topic: str, seq_no: int, message_id: str, data) -> str:
    """SPEC 1.1's sig, computed independently: base64url (no padding) of HMAC-SHA256 over jcs.canonicalize([topic, seqNo, messageId, data])."""
    canonical = jcs.canonicalize([topic, seq_no, message_id, data])
    return b64(hmac.new(secret.encode(), canonical, hashlib.sha256).digest())


PAYLOADS = [
    {"b": [1, 2.5, -0.0, 1e-7, 1e21, 123456789.125, 0.1], "a": "\u00e9\u2028\x7f\x01\"\\/", "\ue000": None, "\U0001f600": True, "": {}},
    {"z": {"y": {"x": [[], {}, [None]]}}, "A": "a", "a": "A", "\u00e0": 1, "aa": 2},
    0, -1, 2**53, -(2**53), 5e-324, 1.7976931348623157e308, 0.000001, 1e-7, 333333333.33333329, "text \u0000 \ud7ff", None, True, [],
]


def test_signed_messages_verify_with_an_independent_jcs(broker_driver, jcs):
    """With sign keys k1 (first) and k0, every message (WebSocket publish or publish_checked) carries kid "k1" and a sig equal to an independent RFC 8785 + HMAC-SHA256 computation under k1's secret, and not under k0's."""
    d = broker_driver(**SIGNED)
    topic = "prices.\u20ac"
    sub = d.connect("bob", topics=[topic])
    pub = d.connect("alice")
    for i, payload in enumerate(PAYLOADS):
        assert d.publish(pub, topic, f"m-\u00e9-{i}", payload)[0]["status"] == "ok"
    d.server_publish(topic)
    messages = [m for m in d.take(sub) if m["type"] == "message"]
    assert len(messages) == len(PAYLOADS) + 1
    for m in messages:
        assert m["kid"] == "k1" and isinstance(m["sig"], str) and "=" not in m["sig"], m
        assert m["sig"] == expected_sig(jcs, K1, m["topic"], m["seqNo"], m["messageId"], m["data"]), m
        assert m["sig"] != expected_sig(jcs, K0, m["topic"], m["seqNo"], m["messageId"], m["data"])
    for m, payload in zip(messages, PAYLOADS):
        assert m["data"] == payload  # the same value the publisher sent
        assert m["sig"] == expected_sig(jcs, K1, topic, m["seqNo"], m["messageId"], payload)


def test_unsigned_messages_carry_no_kid_or_sig(broker_driver):
    """Without sign keys a message has no kid and no sig."""
    d = broker_driver()
    sub = d.connect("bob", topics=["t"])
    d.publish(d.connect("alice"), "t", "m", {"a": 1})
    (m,) = d.take(sub)
    assert "kid" not in m and "sig" not in m and m["data"] == {"a": 1}


def test_replay_and_resume_send_the_same_signature(broker_driver, jcs):
    """Replayed and resumed messages carry the very kid and sig they were first delivered with (computed once per publish, kept with the message)."""
    d = broker_driver(**SIGNED)
    live = d.connect("bob", topics=["t"])
    d.publish(d.connect("alice"), "t", "m1", {"n": 1.5})
    d.server_publish("t")
    first = [m for m in d.take(live) if m["type"] == "message"]
    assert [m["seqNo"] for m in first] == [1, 2]
    replayed = d.send(d.connect("carol"), {"type": "replay", "topic": "t", "fromSeq": 1})
    session_id = d.ready(live)["sessionId"]
    d.disconnect(live)
    resumed = d.send(d.connect("bob"), {"type": "resume", "sessionId": session_id, "lastSeqPerTopic": {"t": 0}})
    for again in (replayed, resumed):
        assert [m for m in again if m["type"] == "message"] == first
    for m in first:
        assert m["sig"] == expected_sig(jcs, K1, "t", m["seqNo"], m["messageId"], m["data"])


def raw_texts(d: BrokerDriver, client: ms.Peer) -> list[str]:
    """The text frames the client received, as the exact text on the wire."""
    d.settle()
    data = client.take_output() if client.out else b""
    d.broker.dirty = [c for c in d.broker.dirty if c.out]
    return [frame.payload.decode() for frame in parse_frames(data)]


@pytest.mark.parametrize("raw, canonical", [
    ("2.0", "2"),
    ("1e21", "1e+21"),
    ("1E21", "1e+21"),
    ("-0.0", "0"),
    ("0.0000001", "1e-7"),
    ("100000000000000000000.0", "100000000000000000000"),
    ("1.50", "1.5"),
    ('{"b": 2.0, "a": 1e21, "\\u00e9": "\\u00e9\\u0001"}', '{"a":1e+21,"b":2,"\u00e9":"\u00e9\\u0001"}'),
], ids=["2.0", "1e21", "1E21", "-0.0", "1e-7", "1e20", "1.50", "object"])
def test_signed_data_is_sent_in_rfc8785_form(broker_driver, raw, canonical):
    """With signing on, the message's data is the payload's RFC 8785 text on the wire (ECMAScript numbers, sorted keys, JCS escapes): 2.0 -> 2, 1e21 -> 1e+21."""
    d = broker_driver(**SIGNED)
    sub = d.connect("bob", topics=["t"])
    pub = d.connect("alice")
    acks = d.send(pub, '{"type": "publish", "topic": "t", "messageId": "m", "payload": ' + raw + "}")
    assert acks[0]["status"] == "ok", acks
    (text,) = raw_texts(d, sub)
    assert f'"data":{canonical},"kid":"k1","sig":"' in text, text


@pytest.mark.parametrize("payload", [2**53 + 1, -(2**53) - 1, {"a": [1, 2**64]}, [10**400]], ids=["2^53+1", "-2^53-1", "nested", "huge"])
def test_signing_refuses_integers_beyond_2_53_and_unsigned_accepts_them(broker_driver, payload):
    """With signing on, a payload holding an integer beyond ±2^53 is INVALID_MESSAGE (field payload), takes no seqNo and is not remembered; with signing off it is delivered exactly."""
    signed = broker_driver(**SIGNED)
    sub = signed.connect("bob", topics=["t"])
    pub = signed.connect("alice")
    err = signed.publish(pub, "t", "m1", payload)
    assert len(err) == 1, err
    assert_error(err[0], "INVALID_MESSAGE", field="payload", topic="t", messageId="m1")
    assert signed.publish(pub, "t", "m1", {"fine": 1})[0] == {"type": "ack", "messageId": "m1", "status": "ok", "seqNo": 1}
    assert seqs_of(signed.take(sub)) == [1]
    unsigned = broker_driver()
    sub = unsigned.connect("bob", topics=["t"])
    assert unsigned.publish(unsigned.connect("alice"), "t", "m1", payload)[0]["status"] == "ok"
    (m,) = unsigned.take(sub)
    assert m["data"] == payload


def test_signing_accepts_integers_up_to_2_53(broker_driver, jcs):
    """±2^53 itself is within SPEC's bound ("beyond ±2^53" is refused) and is signed like any number."""
    d = broker_driver(**SIGNED)
    sub = d.connect("bob", topics=["t"])
    pub = d.connect("alice")
    for i, n in enumerate((2**53, -(2**53))):
        assert d.publish(pub, "t", f"m{i}", n)[0]["status"] == "ok"
    for m in d.take(sub):
        assert m["sig"] == expected_sig(jcs, K1, "t", m["seqNo"], m["messageId"], m["data"])


@pytest.mark.parametrize("raw", ['"\\ud800"', '{"k": ["x\\udfff"]}', '{"\\ud83d": 1}'], ids=["string", "nested", "key"])
def test_signing_refuses_lone_surrogates(broker_driver, raw):
    """With signing on, a payload holding a lone surrogate (a \\u escape JSON allows but Unicode text cannot hold) is INVALID_MESSAGE, field payload, and takes no seqNo."""
    d = broker_driver(**SIGNED)
    pub = d.connect("alice")
    reply = d.one(pub, '{"type": "publish", "topic": "t", "messageId": "m", "payload": ' + raw + "}")
    assert_error(reply, "INVALID_MESSAGE", field="payload", topic="t", messageId="m")
    assert d.publish(pub, "t", "m", "fine")[0]["seqNo"] == 1


@pytest.mark.parametrize("signing", [True, False], ids=["signed", "unsigned"])
def test_number_that_overflows_a_double_is_invalid_json(broker_driver, signing):
    """A payload written as 1e400 (which a double cannot hold) is INVALID_JSON as the README documents, signing on or off: the message never reaches the payload check."""
    d = broker_driver(**(SIGNED if signing else {}))
    pub = d.connect("alice")
    reply = d.one(pub, '{"type": "publish", "topic": "t", "messageId": "m", "payload": 1e400}')
    assert_error(reply, "INVALID_JSON")
    assert d.stats()["published"] == 0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_signing_refuses_non_finite_floats_from_python(broker_driver, value):
    """With signing on, publish_checked (Server.publish, HTTP) with a non-finite float in the data is refused with INVALID_MESSAGE field payload, and nothing is sequenced."""
    d = broker_driver(**SIGNED)
    with pytest.raises(ms.ClientError) as refused:
        d.broker.publish_checked("svc", "t", "m1", {"x": [value]}, "py", lambda result: None)
    assert (refused.value.code, refused.value.context.get("field")) == ("INVALID_MESSAGE", "payload")
    assert d.server_publish("t") == [1]


def test_signed_server_publish_end_to_end(server_factory, wsclient, jcs):
    """Over the network, Server.publish and a WebSocket publish on a signing server both reach a subscriber signed with kid k1, verifiable independently."""
    server = server_factory(**SIGNED)

    async def main():
        async with wsclient.connect(server.ws_url()) as ws:
            await request(ws, {"type": "setup", "token": "bob", "topics": ["t"]})
            assert (await recv_json(ws))["type"] == "subscribed"
            await request(ws, {"type": "publish", "topic": "t", "messageId": "ws-1", "payload": {"v": 2.0}})
            got = [await recv_json(ws)]
            await asyncio.to_thread(server.publish, "t", {"v": [1e21]}, message_id="py-1")
            got.append(await recv_json(ws))
            return got

    messages = run(main())
    assert [m["messageId"] for m in messages] == ["ws-1", "py-1"], messages
    for m in messages:
        assert m["kid"] == "k1" and m["sig"] == expected_sig(jcs, K1, "t", m["seqNo"], m["messageId"], m["data"])


def test_users_without_an_acl_entry_share_one_compiled_grants(tmp_path):
    """Users with no ACL entry of their own (and no read/write claims) share one Grants object, so
    a connection costs no compiled ACL of its own; a user with an entry, a token with claims, or a
    "*" entry using {sub} gets its own, with the right answers."""
    auth = ms.Auth(ms.Config(acl=write_json(tmp_path, "acl.json", {"*": {"read": ["pub.*"]}, "alice": {"write": ["a"]}})))
    bob, carol, alice = auth.grants("bob"), auth.grants("carol"), auth.grants("alice")
    assert bob is carol and alice is not bob
    assert bob.can_read("pub.x") and not bob.can_write("a") and alice.can_write("a") and alice.can_read("pub.x")
    claimed = auth.grants("bob", ms.Claims("bob", None, ("own",), None))
    assert claimed is not bob and claimed.can_read("own") and claimed.can_read("pub.x")
    per_user = ms.Auth(ms.Config(acl=write_json(tmp_path, "acl2.json", {"*": {"read": ["u.{sub}.*"]}})))
    dave, erin = per_user.grants("dave"), per_user.grants("erin")
    assert dave is not erin and dave.can_read("u.dave.x") and not dave.can_read("u.erin.x")
