#!/usr/bin/env python3
"""The CPU cost of trust, measured in-process (no network): verifying one HS256 and one RS256
token, checking a topic against a user's compiled grants (1,000 patterns), and signing one
message. Prints the median of several runs, in microseconds per operation.

    python3 bench/trust.py            # needs only the standard library (RS256 keys come from
                                      # `cryptography` when installed, else from `openssl`)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import microsocket as ms  # noqa: E402


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def per_op(fn, n: int, runs: int = 5) -> float:
    """Median over `runs` of the seconds per call of fn, called n times, in microseconds."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(times)


def rsa_key() -> tuple[int, int, int]:
    """(n, e, d) of a fresh 2048-bit RSA key."""
    try:
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = key.private_numbers()
        return numbers.public_numbers.n, numbers.public_numbers.e, numbers.d
    except ImportError:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.pem")
            subprocess.run(["openssl", "genrsa", "-out", path, "2048"], check=True, capture_output=True)
            text = subprocess.run(["openssl", "rsa", "-in", path, "-text", "-noout"], check=True, capture_output=True, text=True).stdout
        fields, name = {}, None
        for line in text.splitlines():
            if not line.startswith(" ") and ":" in line:
                name = line.split(":")[0].strip()
                fields[name] = line.split(":", 1)[1].strip()
            elif name:
                fields[name] += line.strip()
        n = int(fields["modulus"].replace(":", ""), 16)
        e = int(fields["publicExponent"].split()[0])
        d = int(fields["privateExponent"].replace(":", ""), 16)
        return n, e, d


def main() -> None:
    now = int(time.time())
    claims = {"sub": "alice", "exp": now + 3600, "iat": now}
    secret = "s" * 40
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    hs = f"{head}.{body}.{b64(hmac.new(secret.encode(), f'{head}.{body}'.encode(), hashlib.sha256).digest())}"
    hs_verifier = ms.build_verifier(jwt_secret=secret)
    print(f"HS256 verify     {per_op(lambda: hs_verifier.verify(hs), 20_000):8.1f} us/token")

    n, e, d = rsa_key()
    k = (n.bit_length() + 7) // 8
    rhead = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": "r1"}).encode())
    signing_input = f"{rhead}.{body}".encode()
    prefix = bytes.fromhex("3031300d060960864801650304020105000420")
    t = prefix + hashlib.sha256(signing_input).digest()
    em = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
    sig = pow(int.from_bytes(em, "big"), d, n).to_bytes(k, "big")
    rs = f"{rhead}.{body}.{b64(sig)}"
    jwks = json.dumps({"keys": [{"kty": "RSA", "kid": "r1", "n": b64(n.to_bytes(k, 'big')), "e": b64(e.to_bytes(3, 'big'))}]})
    rs_verifier = ms.build_verifier(jwt_keys=jwks)
    print(f"RS256 verify     {per_op(lambda: rs_verifier.verify(rs), 1_000):8.1f} us/token (2048-bit key, e = {e})")

    acl = ms.load_acl(json.dumps({"alice": {"read": [f"feed.{i}.*" for i in range(500)] + [f"topic.{i}" for i in range(500)]}}))
    grants = ms.Grants(acl, "alice")
    print(f"grants compile   {per_op(lambda: ms.Grants(acl, 'alice'), 200):8.1f} us (1,000 patterns, once per setup or refresh)")
    print(f"can_read (hit)   {per_op(lambda: grants.can_read('feed.499.x'), 100_000):8.2f} us/check")
    print(f"can_read (miss)  {per_op(lambda: grants.can_read('other.topic'), 100_000):8.2f} us/check")

    keys = ms.SigningKeys.parse(["k1=" + "q" * 40])
    data = ms.canonical_json({"price": 101.25, "symbol": "BTC", "ts": now}).encode()
    auth = ms.Auth(ms.Config(sign_keys=("k1=" + "q" * 40,)))
    print(f"canonical JSON   {per_op(lambda: ms.canonical_json({'price': 101.25, 'symbol': 'BTC', 'ts': now}), 20_000):8.1f} us/payload (3 members)")
    print(f"sign             {per_op(lambda: auth.sign('prices', 12345, 'm-1', data), 20_000):8.1f} us/message (once per publish, never per subscriber)")
    assert keys.verify("k1", auth.sign("prices", 1, "m", data)[1], "prices", 1, "m", json.loads(data))


if __name__ == "__main__":
    main()
