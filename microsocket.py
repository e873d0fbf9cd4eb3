#!/usr/bin/env python3
"""microsocket: a single-file, zero-dependency Micro Socket pub/sub gateway over WebSocket.

Run it::

    python3 microsocket.py                  # http://127.0.0.1:3000/docs, ws://127.0.0.1:3000/ws
    python3 microsocket.py --help           # every option, each also a MICROSOCKET_* variable

The protocol in ten lines (the full contract is the README's protocol reference):

    client                                  server
    {"type":"setup","token":"alice"}     -> {"type":"ready","sessionId":..,"userId":"alice","epoch":..}
    {"type":"subscribe","topic":"t"}     -> {"type":"subscribed","topic":"t","seqNo":0,"epoch":..}
    {"type":"publish","topic":"t",
     "messageId":"m1","payload":{..}}    -> {"type":"ack","messageId":"m1","status":"ok","seqNo":1} to the
                                            publisher, and {"type":"message","topic":"t","seqNo":1,
                                            "messageId":"m1","data":{..}} to every subscriber
    the same messageId again             -> {"type":"ack",..,"status":"duplicate","seqNo":1}, not delivered
    {"type":"replay","topic":"t","fromSeq":1} -> the retained messages, then {"type":"replayed",..}
    {"type":"resume","sessionId":..}     -> what this session missed, then {"type":"resumed",..}
    anything wrong                       -> {"type":"error","code":"INVALID_TOPIC",..}; the connection stays

Every message is one JSON object in one text frame; a client may add "id" to any message and the
direct reply carries it back; replies keep the order of requests. Topics are sequenced one by one
(seqNo 1, 2, ... within the topic's epoch), deduplicated per user by messageId, and kept in a
bounded history for replay. The shared state sits behind a backbone (this process's memory, or Redis).

Auth: demo auth (any non-empty token is the userId) until a JWT key is given (--jwt-secret,
--jwt-keys: HS256, RS256); then tokens are verified, ACLs apply (--acl, read/write claims), tokens
expire (close 4003) and `refresh` renews them; --sign-key signs every message (RFC 8785, HMAC).
Scale-out: with --redis several processes share one Redis and behave as one gateway; --workers N
starts N of them on one port. --permessage-deflate compresses (RFC 7692), each broadcast once.
What it does not do (yet): Redis Cluster.

Embedding it in an asyncio program::

    server = microsocket.Server(microsocket.Config(port=0))
    await server.start()                    # server.port is the bound port
    await server.publish("prices", {"btc": 1})   # -> PublishResult(status, message_id, seq_no, subscribers)
    await server.close()                    # closes every connection with 1001

A Python client (reconnect, resume, gap fill, epochs, refresh, signatures built in)::

    async with microsocket.connect("ws://127.0.0.1:3000/ws", token="alice") as client:
        await client.subscribe("prices")
        ack = await client.publish("prices", {"btc": 1})        # Ack(message_id, status, seq_no)
        async for item in client:                                # Message, or Missed
            print(item)

From a shell: `python3 microsocket.py sub TOPIC...` prints each message as a JSON line;
`python3 microsocket.py pub TOPIC [DATA]` publishes DATA or each line of stdin.

Contents (each section uses only those above it; grep for "# === N."):

     0. Header              6. WebSocket connection          12. Broker
     1. Constants, limits   7. Pub/sub message schema        13. Backbones
     2. Errors              8. Topic store                   14. HTTP routes
     3. Frame codec         9. Dedup                         15. Server I/O (asyncio)
     4. HTTP/1.1           10. History and sessions          16. Client (asyncio)
     5. WebSocket handshake 11. Auth, ACL, signing            17. Command line
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import codecs
import collections
import dataclasses
import enum
import gc
import hashlib
import heapq
import hmac
import html
import http
import itertools
import json
import logging
import math
import os
import random
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import zlib
from typing import Any, Awaitable, Callable, Iterable, Iterator, NamedTuple, Protocol

try:
    import resource  # the open-file limit (Unix)
except ImportError:  # pragma: no cover - Windows
    resource = None

__all__ = [
    "Config",
    "Server",
    "Broker",
    "Peer",
    "PublishResult",
    "Backbone",
    "MemoryBackbone",
    "WebSocketConnection",
    "Frame",
    "Opcode",
    "CloseCode",
    "ProtocolError",
    "PayloadTooBig",
    "HTTPError",
    "ClientError",
    "connect",
    "Client",
    "Message",
    "Missed",
    "Ack",
    "Subscribed",
    "Presence",
    "MicrosocketError",
    "ConnectionClosed",
    "HandshakeError",
    "SignatureError",
    "main",
]
__version__ = "0.1.0"

log = logging.getLogger("microsocket")


# === 1. Constants and limits ======================================================================
#
# Every limit a hostile or careless peer can push against is named here, with the reason for its
# default. Each one is a field of `Config` (section 15 builds it from the command line) and each one
# has a documented failure: an HTTP status, a close code or an error code.

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3: the fixed GUID of the accept key

DEFAULT_PORT = 3000  # the Micro Socket reference gateway's port
MAX_MESSAGE_SIZE = 1 << 20  # 1 MiB per WebSocket message, across fragments (close 1009)
MAX_HEAD_SIZE = 16 << 10  # 16 KiB request line + headers: browsers send < 8 KiB (HTTP 431)
MAX_HEADERS = 100  # header lines per request (HTTP 431)
MAX_BODY_SIZE = 1 << 20  # 1 MiB HTTP request body, for POST /publish (HTTP 413)
MAX_SUBSCRIPTIONS = 1000  # topics per connection (TOO_MANY_SUBSCRIPTIONS)
MAX_TOPIC_LENGTH = 256  # characters in a topic (INVALID_TOPIC)
MAX_MESSAGE_ID_LENGTH = 256  # characters in a messageId (INVALID_MESSAGE)
MAX_CONNECTIONS = 100_000  # open WebSocket connections per process (HTTP 503 at the handshake)
MAX_PENDING = 1024  # TCP connections not (yet) WebSocket: HTTP, handshakes; past it the oldest is closed
MAX_BUFFER = 4 << 20  # 4 MiB of unsent data for one connection before it is a slow consumer (4001)
# What the server holds on behalf of all clients together: unfinished inbound messages and HTTP
# requests, unsent output. Checked once a second; past it the largest holders are closed (4001 for
# output, 1013 for an unfinished message). 512 MiB: 128 connections at their full max_buffer.
MAX_BUFFERED = 512 << 20
WRITE_CHUNK = 256 << 10  # a batch of output larger than this goes to the socket in pieces, as it drains
DEDUP_WINDOW = 3600.0  # seconds an accepted messageId is remembered per user
DEDUP_PER_USER = 100_000  # remembered messageIds per user; the oldest is forgotten first
DEDUP_TOTAL = 1_000_000  # remembered messageIds in all; about 150 bytes each
HISTORY_MESSAGES = 1000  # retained messages per topic, for replay
HISTORY_AGE = 300.0  # seconds a message stays in history
HISTORY_BYTES = 64 << 20  # retained message bytes across all topics, each counted with HISTORY_ENTRY_COST
# What one retained message costs besides its frame: its (seqNo, time, frame) entry, the (topic,
# seqNo) entry of the arrival order, an int and a float (measured with sys.getsizeof on CPython 3.11).
HISTORY_ENTRY_COST = 192
MAX_TOKEN_SIZE = 8192  # bytes in a token (SPEC 1.1 §3: "Tokens over 8 KiB ... are refused")
JWT_LEEWAY = 30.0  # seconds of clock skew allowed for exp, nbf and iat (--jwt-leeway)
# RFC 7518 §3.2: "A key of the same size as the hash output (for instance, 256 bits for "HS256") or
# larger MUST be used with this algorithm."
MIN_HMAC_KEY_BYTES = 32
# RFC 7518 §3.3: "A key of size 2048 bits or larger MUST be used with these algorithms."
MIN_RSA_BITS = 2048
# SPEC 1.1 "Signing": with signing on, "an integer beyond ±2^53" is not I-JSON. RFC 7493 §2.2 asks
# for [-(2**53)+1, 2**53-1]; ±2**53 itself is exactly a double and JCS writes it unambiguously
# (RFC 8785 Appendix B lists 9007199254740992), so the SPEC's bound is the one kept.
MAX_JSON_INTEGER = 2**53
MAX_PRESENCE = 100  # users listed in one presence answer; its count stays exact
MAX_TOPICS = 100_000  # sequenced topics (a counter, an epoch, maybe history); past it the least recently used idle one is forgotten early
CLOSE_TIMEOUT = 5.0  # seconds to wait for the peer's close frame before dropping TCP
HANDSHAKE_TIMEOUT = 10.0  # seconds to send a complete request head (slowloris), or idle keep-alive
SETUP_TIMEOUT = 10.0  # seconds from the 101 to a successful setup (close 4000)
PING_INTERVAL = 20.0  # seconds of silence before the server pings (0 turns keepalive off)
PING_TIMEOUT = 20.0  # seconds to answer that ping with anything at all (close 1011)
SESSION_TTL = 120.0  # seconds a session outlives its connection, for resume
MAX_SESSIONS = 100_000  # detached sessions kept; the oldest is dropped first
MAX_SESSION_TOPICS = 1_000_000  # topic positions kept by detached sessions in all (~300 bytes each); the oldest session goes first
PUBLISH_RATE = 1000.0  # publishes per second per connection, token bucket (RATE_LIMITED); 0 = no limit
PUBLISH_BURST = 2000  # the bucket's size: a burst allowed on top of the rate
SHUTDOWN_GRACE = 5.0  # seconds for closing handshakes on SIGINT/SIGTERM before connections are dropped
MAX_HTTP_UNSENT = 256 << 10  # unsent HTTP response bytes before a pipelining client's next request waits
FD_RESERVE = 64  # file descriptors kept free of WebSocket connections: the listener, HTTP requests, logs
LISTEN_BACKLOG = 1024  # asyncio's default of 100 drops SYNs when hundreds connect at once
GC_YOUNG_THRESHOLD = 10_000  # the command line's process: allocations between young collections (Python's default: 700)

# Fragments of one message: past MAX_SMALL_FRAGMENTS, the average fragment must be at least
# MIN_FRAGMENT_AVERAGE bytes (close 1009). Each frame costs a parse however small it is, so a
# stream of empty continuation frames would otherwise keep the server busy for one message
# forever; 64-byte fragments (the smallest Autobahn|Testsuite sends, up to 4 MiB) stay allowed.
MAX_SMALL_FRAGMENTS = 1024
MIN_FRAGMENT_AVERAGE = 32

# Frames one connection's input may have parsed per event-loop turn; the rest waits for the next
# turn, after every other connection's (section 6). 64 small publishes are about 1 ms of work.
FRAMES_PER_TURN = 64

# RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
MAX_CONTROL_PAYLOAD = 125

# permessage-deflate, RFC 7692 (sections 3, 5 and 6), on with --permessage-deflate.
# Window bits: §7.1.2 allows 8 to 15. zlib (1.2.9 and later) refuses a raw 8-bit window for
# deflate, yet server_max_window_bits=8 can be honoured: zlib never matches further back than its
# window minus MIN_LOOKAHEAD (262), so a 9-bit compressor's distances stay within 250 bytes, inside
# the 256 the client allowed (test_deflate checks it with an 8-bit inflater). A client that
# promises 8 bits is inflated with 9: a larger inflate window decodes any smaller one.
MIN_WINDOW_BITS = 8
MAX_WINDOW_BITS = 15
MIN_ZLIB_WINDOW_BITS = 9
# Payloads shorter than this are sent uncompressed. Measured with zlib 1.2.13 (level 6, memLevel
# 8) on 300,000 generated server messages (ack, subscribed, pong, error, message... with 0-7
# fields of numbers, words, hex ids): under 48 bytes the compressed frame is larger for most of
# them (all of them under 24 bytes: deflate's fixed Huffman codes spend 8-9 bits a literal, plus
# the block header), 48-63 bytes save a median of 0-1 byte, 64-71 save 2 bytes and from 80 bytes
# on every one was smaller. Every result is checked besides: a frame that does not get smaller
# goes out plain.
DEFLATE_THRESHOLD = 64
DEFLATE_LEVEL = 6  # zlib's default: a broadcast is compressed once, so its cost is shared
DEFLATE_MEM_LEVEL = 8  # zlib's default hash size
# Compressed forms of published messages kept for reuse (the form and the plain frame it stands
# for both count): a broadcast is compressed once for all its subscribers, and a replay or resume
# of recent history sends forms already made. Past the bound the oldest forms are forgotten; a
# replay of older messages compresses them again as the client reads them.
DEFLATE_CACHE_BYTES = 64 << 20
DEFLATE_CACHE_ENTRY_COST = 160  # bytes of one cache entry besides its frames: key tuple, dict slot
# Output of one decompress call while inflating a message: the unit in which its size is checked.
# Small enough that a refused bomb has cost about the limit plus this; 64 calls a MiB, a negligible
# Python overhead beside inflate itself.
INFLATE_STEP = 16 << 10
# Inflated bytes that count as one more frame of FRAMES_PER_TURN: a connection whose small frames
# inflate to much more spends its turn on that (64 KiB inflate in about 0.1 ms).
INFLATE_TURN_UNIT = 64 << 10


class Opcode(enum.IntEnum):
    """Frame opcodes, RFC 6455 §5.2 (names as in the websockets library)."""

    CONT = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


# Two opcodes as plain ints, for the code that runs for every frame: each use of Opcode.TEXT
# is a lookup through EnumType.__getattr__ (CPython 3.11), about ten times the cost of a global.
OP_CONT, OP_TEXT = int(Opcode.CONT), int(Opcode.TEXT)



class CloseCode(enum.IntEnum):
    """Close codes, RFC 6455 §7.4.1, and the four of the Micro Socket protocol (4000-4003)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS_RCVD = 1005  # never on the wire: "no code was present"
    ABNORMAL_CLOSURE = 1006  # never on the wire: "closed without a close frame"
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never on the wire
    SETUP_TIMEOUT = 4000
    SLOW_CONSUMER = 4001
    SESSION_TAKEN_OVER = 4002
    TOKEN_EXPIRED = 4003


# RFC 6455 §7.4.1-§7.4.2: codes a peer may put in a close frame. 1004-1006 and 1015 are reserved
# and "MUST NOT be set as a status code in a Close control frame by an endpoint"; 1012-1014 were
# registered with IANA later; 3000-3999 are for libraries and 4000-4999 for applications.
_WIRE_CLOSE_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))


def is_valid_close_code(code: int) -> bool:
    """True if `code` may appear in a close frame (RFC 6455 §7.4)."""
    return code in _WIRE_CLOSE_CODES or 3000 <= code <= 4999


# The Redis backbone (section 13): its wire limits, then its timing.
# A bulk string's declared length. A history entry is one message (MAX_MESSAGE_SIZE, 1 MiB by
# default) in its JSON envelope; 64 MiB leaves room for a raised --max-message-size. Redis's own
# ceiling (proto-max-bulk-len) is 512 MiB: past this one the link is dropped instead of buffered.
RESP_MAX_BULK = 64 << 20
# Elements of one array, map or set. The longest reply the backbone asks for is one page of
# history (two elements an entry) or a pipeline's worth of EXEC; 1 Mi elements is far past both.
# Lists grow as their elements arrive (at least 3 bytes each on the wire), never preallocated from
# the declared count, so the bound is about what a broken peer can make us wait for.
RESP_MAX_LENGTH = 1 << 20
# Aggregates open inside one another. The backbone's own replies nest 2 deep (a history page); the
# deepest Redis 7.0 builds are COMMAND INFO in RESP3 (9), COMMAND DOCS (8) and XINFO STREAM FULL (7),
# as measured. 16 takes any of them; deeper is a broken or hostile peer.
RESP_MAX_DEPTH = 16
# Bytes of a line (type byte included, CRLF not): a simple string, error, number or header. Redis's are a word or a
# sentence (errors name a script, never its data); a peer sending more without a CRLF is not Redis.
RESP_MAX_LINE = 64 << 10
# Digits of a RESP3 big number: int() of a digit string costs time quadratic in its length.
RESP_MAX_BIG_NUMBER = 1000
# Entries the publish script looks at per call to trim history by age and dedup by window: work
# per publish stays bounded, and since each call adds one entry, trimming keeps up.
REDIS_TRIM_SCAN = 64

REDIS_TIMEOUT = 2.0  # seconds for any request to Redis; past it: BACKBONE_UNAVAILABLE (--redis-timeout)
# An attached session, this process's presence entries and its entry in the process registry live
# this many seconds in Redis unless renewed; this process renews them every third of it. A process
# killed with -9 leaves presence that is gone within the lease, and sessions that stay resumable
# for the session TTL plus at most the lease.
REDIS_LEASE = 15.0
REDIS_BACKOFF_MIN = 0.05  # seconds before the first reconnect attempt; doubled per failure ...
REDIS_BACKOFF_MAX = 2.0  # ... up to this; each wait drawn from [delay/2, delay] (jitter)
# An ack's position is written at most this often per session and topic: a client that acks every
# message costs Redis one write per 50 ms, not one per message. A take-over writes the final
# positions itself, so only a process that dies loses up to this much of its acks (a few messages
# replayed twice on resume, never one lost). A new position (subscribe, resume) goes at once.
REDIS_TRACK_DELAY = 0.05
REDIS_MAX_BACKLOG = 100_000  # requests held while Redis is unreachable; past it they fail at once
REDIS_STATS_INTERVAL = 5.0  # seconds between reads of the figures /stats shows from Redis
REDIS_STATS_TOPICS = 1000  # received topics whose history is counted for /stats (XLEN each)
REDIS_SUBSCRIBE_BATCH = 1000  # channels per SUBSCRIBE when resubscribing after a reconnect
MAX_SEQ = 2**53 - 1  # a seqNo from a client past this is clamped: Lua numbers are doubles
# Entries the publish script looks at per call to trim history by age (and dedup by window). Its
# XRANGE copies whole messages into Lua, so this is per-publish work times the message size:
# measured on Redis 7.0, 1000 publishes of 100 B took 227 ms with REDIS_TRIM_SCAN's 64, 77 ms with 2
# and 102 ms with 4; of 16 KiB, 2505 ms, 324 ms and 380 ms. Each publish adds one entry, so
# trimming up to 4 keeps up (reads skip what is past the age meanwhile; MAXLEN bounds the rest).
REDIS_PUBLISH_SCAN = 4

# --workers N (section 16).
WORKER_RESTART_DELAY = 1.0  # seconds before a worker that died is started again ...
WORKER_RESTART_MAX = 30.0  # ... doubled while workers keep dying within a minute, up to this
WORKER_STOP_TIMEOUT = 10.0  # seconds the workers get to close their connections (1001) before SIGKILL


# === 2. Errors ====================================================================================
#
# Four exceptions, each turned into one kind of answer in one place: ProtocolError into a close
# code (section 6), HTTPError into an HTTP status (section 14), ClientError into an `error` message
# (section 12). Nothing else crosses a section boundary as an exception.


class ProtocolError(Exception):
    """The peer broke RFC 6455: fail the connection with `code` (1002, 1007 or 1009)."""

    def __init__(self, reason: str, code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class PayloadTooBig(ProtocolError):
    """A message would go over the size limit: close 1009 before its bytes are buffered."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, CloseCode.MESSAGE_TOO_BIG)


class HTTPError(Exception):
    """Answer the request with `status` and a JSON body `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class ClientError(Exception):
    """A client message cannot be processed: reply `error {code, message, ...context}`."""

    def __init__(self, code: str, message: str, **context: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context = context


# === 3. Frame codec (sans-I/O) ====================================================================
#
# RFC 6455 §5.2 base framing:
#
#     0               1               2               3
#     |F|R|R|R| opcode|M| len (7)     | extended len (16 or 64), if len is 126 or 127
#     |I|S|S|S|       |A|             | masking key (32), if MASK
#     |N|V|V|V|       |S|             | payload
#
# `parse_header` reads and checks a header; `apply_mask` unmasks a whole buffer at once (one big
# integer XOR, never a Python loop per byte); `serialize_frame` builds a frame. Nothing here knows
# about connections or messages.
#
# permessage-deflate (RFC 7692) is a codec too, so it is here: `compress_message` and `Inflater`
# turn one message's payload into its compressed form and back (§7.2), `Deflater` makes and keeps
# the compressed form of the server's frames. RSV1 is that extension's "Per-Message Compressed"
# bit (§6); negotiation is in section 5, its use per connection in sections 6 and 15.


class FrameHeader(NamedTuple):
    fin: bool
    opcode: int
    mask: bytes | None  # the 4-byte masking key, None when the frame is not masked
    length: int  # payload length
    size: int  # header length in bytes
    rsv1: bool = False  # RSV1: with permessage-deflate, "this message is compressed" (RFC 7692 §6)


class Frame(NamedTuple):
    """One complete frame, for tests and tools: `Frame.parse` and `Frame.serialize`."""

    fin: bool
    opcode: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes, max_size: int | None = None) -> tuple[Frame, int] | None:
        """Parse one frame at the start of `data`: (frame, bytes used), or None if incomplete."""
        header = parse_header(data, 0, max_size)
        if header is None or len(data) < header.size + header.length:
            return None
        payload = bytes(data[header.size : header.size + header.length])
        if header.mask is not None:
            payload = apply_mask(payload, header.mask)
        return cls(header.fin, header.opcode, payload), header.size + header.length

    def serialize(self, mask: bytes | None = None) -> bytes:
        """The frame's bytes, masked with `mask` (4 bytes) when given, as a client must."""
        return serialize_frame(self.opcode, self.payload, self.fin, mask)


def parse_header(
    data: bytes | bytearray, pos: int = 0, max_size: int | None = None, deflate: bool = False
) -> FrameHeader | None:
    """Read the frame header at `data[pos:]`; None until it is complete.

    Raises ProtocolError for what RFC 6455 §5.2 and §5.5 forbid in any frame, and PayloadTooBig
    for a data frame longer than `max_size`, before a byte of its payload is buffered. `deflate`:
    permessage-deflate was negotiated, so RSV1 may be set on a data frame (whether that frame may
    start a message is the connection's to check).
    """
    fields = header_fields(data, pos, max_size, deflate)
    return None if fields is None else FrameHeader(*fields)


def header_fields(
    data: bytes | bytearray, pos: int = 0, max_size: int | None = None, deflate: bool = False
) -> tuple[bool, int, bytes | None, int, int, bool] | None:
    """`parse_header` as a plain tuple, in FrameHeader's order: the connection reads every frame
    with this, since making a NamedTuple costs a Python call (more than the rest of the header)."""
    available = len(data) - pos
    if available < 2:
        return None
    b0 = data[pos]
    b1 = data[pos + 1]
    if b0 & 0x70:
        # §5.2: "If a nonzero value is received and none of the negotiated extensions defines the
        # meaning of such a nonzero value, the receiving endpoint MUST _Fail the WebSocket
        # Connection_." RFC 7692 defines RSV1 only, and only for data frames: §6.1, "An endpoint
        # MUST NOT set the "Per-Message Compressed" bit of control frames".
        if b0 & 0x30:
            raise ProtocolError("reserved bits RSV2 and RSV3 must be 0")
        if not deflate:
            raise ProtocolError("reserved bit RSV1 set without permessage-deflate")
        if b0 & 0x08:
            raise ProtocolError("RSV1 set on a control frame")
    opcode = b0 & 0x0F
    if opcode not in _KNOWN_OPCODES:
        raise ProtocolError(f"unknown opcode {opcode:#x}")
    fin = (b0 & 0x80) != 0
    length = b1 & 0x7F
    size = 2
    if length == 126:
        if available < 4:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]  # 16 bits, network byte order
        size = 4
    elif length == 127:
        if available < 10:
            return None
        length = int.from_bytes(data[pos + 2 : pos + 10], "big")
        if length >> 63:
            raise ProtocolError("the most significant bit of a 64-bit length must be 0")  # §5.2
        size = 10
    if opcode >= 8:
        if not fin:
            raise ProtocolError("control frames must not be fragmented")  # §5.5
        if length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control frame payload over 125 bytes")  # §5.5
    elif max_size is not None and length > max_size:
        raise PayloadTooBig(f"frame of {length} bytes is over the {max_size}-byte limit")
    mask = None
    if b1 & 0x80:
        if available < size + 4:
            return None
        mask = bytes(data[pos + size : pos + size + 4])
        size += 4
    return fin, opcode, mask, length, size, (b0 & 0x40) != 0


_KNOWN_OPCODES = frozenset(int(op) for op in Opcode)


def apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated (RFC 6455 §5.3), as one big-integer operation."""
    n = len(data)
    key = mask * ((n + 3) >> 2)
    return (_from_bytes(data, "little") ^ _from_bytes(key[:n], "little")).to_bytes(n, "little")


_from_bytes = int.from_bytes  # one name to look up, not two: apply_mask runs on every client frame


def serialize_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = None, rsv1: bool = False) -> bytes:
    """One frame. Servers send unmasked frames (§5.1), so one frame can go to many connections.
    `rsv1`: the payload is compressed (the first frame of a permessage-deflate message)."""
    n = len(payload)
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if n < 126:
        header = bytes((b0, mask_bit | n))
    elif n < 65536:
        header = bytes((b0, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((b0, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is not None:
        return header + mask + apply_mask(payload, mask)
    return header + payload


def utf8(text: str) -> bytes:
    """`text` as UTF-8. A lone surrogate (JSON text may carry "\\ud800", UTF-8 cannot) is written as
    that \\u escape again, which in JSON output keeps the text valid JSON and valid UTF-8."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace")


def text_frame(text: str) -> bytes:
    """A server text frame holding `text`. Every reply is one, so the common case (UTF-8 without
    a lone surrogate, under 126 bytes: a one-byte length) is built here, without further calls."""
    try:
        payload = text.encode()
    except UnicodeEncodeError:
        payload = utf8(text)
    if len(payload) < 126:
        return bytes((0x80 | OP_TEXT, len(payload))) + payload  # FIN, TEXT; unmasked
    return serialize_frame(OP_TEXT, payload)


def parse_close(payload: bytes) -> tuple[int, str]:
    """(code, reason) of a close frame's payload, RFC 6455 §5.5.1 and §7.4."""
    if not payload:
        return CloseCode.NO_STATUS_RCVD, ""
    if len(payload) == 1:
        raise ProtocolError("close frame payload of 1 byte")
    code = int.from_bytes(payload[:2], "big")
    if not is_valid_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8") from None
    return code, reason


def serialize_close(code: int, reason: str = "") -> bytes:
    """A close frame's payload; NO_STATUS_RCVD means "no code" and gives an empty payload."""
    if code == CloseCode.NO_STATUS_RCVD:
        return b""
    # Cut a long reason to fit 125 bytes at a character boundary: the peer checks it is UTF-8.
    reason_bytes = reason.encode()[: MAX_CONTROL_PAYLOAD - 2].decode(errors="ignore").encode()
    return code.to_bytes(2, "big") + reason_bytes


# -- permessage-deflate (RFC 7692 §7.2)
#
# The server always takes `server_no_context_takeover` (section 5): each message it sends is
# compressed by a fresh compressor and refers to nothing sent before it. So one compressed frame
# is valid on every connection that negotiated the extension, a broadcast is compressed once, and
# the server keeps no compressor per connection at all.

# §7.2.1: the sender removes "4 octets (that are 0x00 0x00 0xff 0xff) from the tail end";
# §7.2.2: the receiver appends them again before inflating.
DEFLATE_TAIL = b"\x00\x00\xff\xff"
# zlib's deflate cannot match further back than its window minus MIN_LOOKAHEAD (258 + 3 + 1).
_MIN_LOOKAHEAD = 262


def compression_window(length: int, server_max_window_bits: int = MAX_WINDOW_BITS) -> int:
    """The window bits a message of `length` bytes is compressed with: no more than it needs.

    A message shorter than 2**bits - 262 compresses to the same bytes with any window of `bits` or
    more (checked: identical output for 3,000 random messages of 0-40 KB), so sizing the window to
    the message costs nothing in ratio and halves the compressor's set-up for small messages
    (measured: 12 us instead of 23 us for 177 bytes, 9 bits instead of 15). It also lets clients
    with different `server_max_window_bits` share one compressed form: this is its key.
    """
    needed = (length + _MIN_LOOKAHEAD).bit_length()
    return max(MIN_ZLIB_WINDOW_BITS, min(needed, server_max_window_bits))


def compress_message(payload: bytes | memoryview, window_bits: int = MAX_WINDOW_BITS) -> bytes:
    """`payload` compressed as RFC 7692 §7.2.1 asks, with a fresh compressor (no context takeover)."""
    compressor = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, -window_bits, DEFLATE_MEM_LEVEL)
    data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
    # §7.2.1: Z_SYNC_FLUSH ends the data with an empty stored block, "0x00 0x00 0xff 0xff" after
    # its header bits: "Remove 4 octets ... from the tail end." An empty message leaves b"\x00".
    return data[:-4] if data.endswith(DEFLATE_TAIL) else data


def compressed_limit(size: int) -> int:
    """The most bytes deflate can make of `size` bytes (zlib's deflateBound, rounded up): the wire
    limit of a compressed message whose inflated size may be `size`. Random data grows a little."""
    return size + (size >> 12) + (size >> 14) + 64


def deflate_frame(opcode: int, payload: bytes | memoryview, server_max_window_bits: int = MAX_WINDOW_BITS) -> bytes | None:
    """The compressed frame (RSV1 set) for `payload`, or None when the plain frame is as small."""
    if len(payload) < DEFLATE_THRESHOLD:
        return None
    compressed = compress_message(payload, compression_window(len(payload), server_max_window_bits))
    if len(compressed) >= len(payload):
        return None  # random or already compressed data: deflate only adds its block headers
    return serialize_frame(opcode, compressed, rsv1=True)


# The start of a published message's frame payload (section 7): the frames shared by subscribers
# and history, whose compressed forms are worth keeping. Replies are one connection's own.
_SHARED_PAYLOAD = b'{"type":"message"'


class Deflater:
    """The frames to send to connections that negotiated permessage-deflate, made from the plain ones.

    `frame(plain, server_max_window_bits)` is called for every frame written to such a connection.
    A whole (FIN) text or binary message of DEFLATE_THRESHOLD bytes or more is compressed, and sent
    so only if that makes it smaller; control frames and small ones go as they are. The forms of
    published messages are kept, up to `max_bytes`, by the plain frame they stand for: a broadcast
    is compressed once for all its subscribers (one per distinct window, in practice one), and a
    replay of recent history compresses nothing. The counters are in /stats.
    """

    __slots__ = ("max_bytes", "bytes", "_forms", "compressions", "reused", "incompressible", "plain_bytes", "compressed_bytes")

    def __init__(self, max_bytes: int = DEFLATE_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0  # what the kept forms cost, with the plain frames they keep alive
        self._forms: dict[tuple[bytes, int], bytes] = {}  # (plain frame, window bits) -> frame to send; oldest first
        self.compressions = 0  # messages compressed (zlib runs)
        self.reused = 0  # frames sent in a form made before
        self.incompressible = 0  # compressed, but not smaller: sent plain
        self.plain_bytes = 0  # of the messages compressed and sent so: their frames before ...
        self.compressed_bytes = 0  # ... and after

    def frame(self, frame: bytes, server_max_window_bits: int = MAX_WINDOW_BITS) -> bytes:
        """The bytes to send for the server frame `frame` (unmasked, as every server frame)."""
        n = len(frame)
        if n < DEFLATE_THRESHOLD + 2 or (frame[0] != 0x81 and frame[0] != 0x82):
            return frame  # small, fragmented, compressed already, or a control frame (§6.1)
        length = frame[1]
        size = 2 if length < 126 else 4 if length == 126 else 10
        if n - size < DEFLATE_THRESHOLD:
            return frame
        bits = compression_window(n - size, server_max_window_bits)
        shared = frame.startswith(_SHARED_PAYLOAD, size)
        if shared:
            key = (frame, bits)
            form = self._forms.get(key)
            if form is not None:
                self.reused += 1
                return form
        self.compressions += 1
        form = deflate_frame(frame[0] & 0x0F, memoryview(frame)[size:], bits)
        if form is None:
            self.incompressible += 1
            form = frame
        else:
            self.plain_bytes += n
            self.compressed_bytes += len(form)
        if shared:
            self._keep(key, form)
        return form

    @staticmethod
    def _cost(key: tuple[bytes, int], form: bytes) -> int:
        plain = key[0]
        return len(plain) + (len(form) if form is not plain else 0) + DEFLATE_CACHE_ENTRY_COST

    def _keep(self, key: tuple[bytes, int], form: bytes) -> None:
        cost = self._cost(key, form)
        if cost > self.max_bytes:
            return
        forms = self._forms
        forms[key] = form
        self.bytes += cost
        while self.bytes > self.max_bytes:
            oldest = next(iter(forms))
            self.bytes -= self._cost(oldest, forms.pop(oldest))

    def __len__(self) -> int:
        return len(self._forms)


class Inflater:
    """Inflates the compressed messages of one connection, each checked against `max_size`.

    `feed(chunk, last)` takes a compressed message's payload as it arrives (any split: fragments
    or TCP segments) and returns what it inflates to so far; `last` marks the message's end, where
    the `00 00 ff ff` tail is appended (RFC 7692 §7.2.2). The zlib state lives as long as the
    client may refer back to earlier messages: across messages (context takeover: a 32 KiB window
    and about 7 KiB of state at 15 bits) unless `no_context_takeover`, then for one message only.

    Bounded steps: each decompress call produces at most INFLATE_STEP bytes and at most one byte
    more than the message may still grow, so a message inflating past the limit is refused (1009)
    having produced at most limit + 1 bytes, whatever its ratio: memory and time are those of the
    limit, not of the bomb. Python's traps, avoided: `max_length=0` would mean "no limit" (the + 1
    keeps it at 1 or more); `flush()` has no limit (never called: the sync-flush tail makes inflate
    hand out everything); and an empty `unconsumed_tail` does not prove the message fit, because
    inflate may hold output it had no room for (a step that came back full is followed by another,
    with no input if need be, until one comes back short).
    """

    __slots__ = ("window_bits", "no_context_takeover", "max_size", "_zlib", "size")

    def __init__(self, window_bits: int = MAX_WINDOW_BITS, no_context_takeover: bool = False, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self.window_bits = max(window_bits, MIN_ZLIB_WINDOW_BITS)
        self.no_context_takeover = no_context_takeover
        self.max_size = max_size
        self._zlib: Any = None  # zlib's decompressor, made on the first compressed message
        self.size = 0  # inflated bytes of the open message

    def feed(self, chunk: bytes, last: bool) -> bytes:
        """Inflate the next piece of the open message; `last` ends it. PayloadTooBig, or 1007."""
        inflater = self._zlib
        if inflater is None:
            inflater = self._zlib = zlib.decompressobj(-self.window_bits)
        out = self._inflate(inflater, chunk) if chunk else b""
        if last:
            tail = self._inflate(inflater, DEFLATE_TAIL)
            if tail:
                out = out + tail if out else tail
            self.size = 0
            if self.no_context_takeover or inflater.eof:
                # A block with BFINAL set (§7.2.3.4) ends the DEFLATE stream: nothing can follow
                # in it, so the next message starts a new one.
                self._zlib = None
        return out

    def _inflate(self, inflater: Any, data: bytes) -> bytes:
        pieces = []
        view = memoryview(data)
        # The input goes in steps too: after a full output step zlib copies what it has not read
        # into unconsumed_tail, so a step of input bounds that copy (a whole 1 MiB frame would be
        # copied again for each 16 KiB of output of a bomb).
        for start in range(0, len(view), INFLATE_STEP):
            chunk: bytes | memoryview = view[start : start + INFLATE_STEP]
            while True:
                if inflater.eof:
                    # After a final block what follows is ignored, as in §7.2.3.4's own example,
                    # whose payload ends with one more 0x00 (an empty stored block less its tail).
                    return b"".join(pieces)
                allowed = self.max_size - self.size
                step = min(INFLATE_STEP, allowed + 1)  # never 0: max_length=0 would mean no limit
                try:
                    piece = inflater.decompress(chunk, step)
                except zlib.error as exc:
                    # RFC 6455 §7.4.1: 1007, "data within a message that was not consistent with
                    # the type of the message": a compressed message that does not inflate.
                    raise ProtocolError(f"invalid compressed data: {exc}", CloseCode.INVALID_DATA) from None
                if len(piece) > allowed:
                    raise PayloadTooBig(f"message inflates past the {self.max_size}-byte limit")
                self.size += len(piece)
                pieces.append(piece)
                if len(piece) < step:
                    break  # inflate stopped for want of input, not of room: nothing is held back
                # A full step: more may be pending inside inflate even when unconsumed_tail is
                # empty, so inflate again, with no input if need be, until a step comes back short.
                chunk = inflater.unconsumed_tail
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def end_message(self) -> None:
        """Forget a message abandoned midway (the connection is failing): no state carries on."""
        self.size = 0
        self._zlib = None


# === 4. HTTP/1.1 (sans-I/O) =======================================================================
#
# Just enough of RFC 9112 for a WebSocket handshake, a JSON API and a page: a request head parsed
# with limits, bodies by Content-Length only, keep-alive, and responses built as bytes. The reader
# takes bytes and yields complete requests; it never reads from a socket.

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2 token
_REQUEST_LINE = re.compile(r"([A-Z]+) (\S+) HTTP/(\d\.\d)\Z")
_HTTP_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}  # the usual ones, without an int() per digit


@dataclasses.dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    target: str
    path: str  # still percent-encoded
    query: str
    version: tuple[int, int]
    headers: list[tuple[str, str]]  # (lower-case name, value), in order
    body: bytes = b""
    fields: dict[str, list[str]] = dataclasses.field(default_factory=dict, repr=False)  # name -> values

    def __post_init__(self) -> None:
        if not self.fields:
            for name, value in self.headers:
                self.fields.setdefault(name, []).append(value)

    def header(self, name: str) -> str | None:
        """The value of header `name` (lower case), several lines joined with ", "; None if absent."""
        values = self.fields.get(name)
        return ", ".join(values) if values else None

    def header_count(self, name: str) -> int:
        return len(self.fields.get(name, ()))

    def tokens(self, name: str) -> list[str]:
        """A comma-separated header as lower-case tokens: `Connection: keep-alive, Upgrade`."""
        value = self.header(name) or ""
        return [t.strip().lower() for t in value.split(",") if t.strip()]

    @property
    def keep_alive(self) -> bool:
        connection = self.tokens("connection")
        if self.version >= (1, 1):
            return "close" not in connection
        return "keep-alive" in connection


def parse_request_head(head: bytes | bytearray, max_headers: int = MAX_HEADERS) -> Request:
    """Parse a request line and headers (without the final blank line); raise HTTPError."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        # RFC 9110 §5.5: field values are ASCII in practice; anything else is refused, not guessed.
        raise HTTPError(400, "request head is not ASCII") from None
    # RFC 9110 §5.5: a field value holds no control characters, tab aside. CR and LF are allowed
    # only as CRLF pairs (a bare one could smuggle a header): once the pairs are taken out, what
    # is left must be printable ASCII, and tabs.
    flat = text.replace("\r\n", "")
    if not flat.isprintable() and not flat.replace("\t", "").isprintable():
        raise HTTPError(400, "control character in the request head")
    lines = text.split("\r\n")
    match = _REQUEST_LINE.match(lines[0])
    if not match:
        raise HTTPError(400, "malformed request line")
    method, target, version_text = match.groups()
    version = _HTTP_VERSIONS.get(version_text) or (int(version_text[0]), int(version_text[2]))
    if version[0] != 1:
        raise HTTPError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not target.startswith("/"):
        # RFC 9112 §3.2.2: "A server MUST accept the absolute-form in requests"; its authority
        # then stands in for Host (the Host header, required all the same, is ignored).
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() not in ("http", "https") or not rest or rest[0] == "/":
            raise HTTPError(400, "request target must be an absolute path or an absolute http(s) URI")
        slash = rest.find("/")
        query = rest.find("?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        target = rest[cut:] if rest[cut:].startswith("/") else "/" + rest[cut:]
    if len(lines) - 1 > max_headers:
        raise HTTPError(431, f"more than {max_headers} header lines")
    headers = []
    fields: dict[str, list[str]] = {}  # built here, where the lines are read, not again by Request
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        # A name of letters, digits and dashes (nearly every one) needs no regex to be a token.
        if not colon or not (name.replace("-", "").isalnum() or _TOKEN.match(name)):
            # RFC 9112 §5.2: obsolete line folding and whitespace before the colon are rejected.
            raise HTTPError(400, "malformed header line")
        name = name.lower()
        value = value.strip(" \t")
        headers.append((name, value))
        if name in fields:
            fields[name].append(value)
        else:
            fields[name] = [value]
    hosts = len(fields.get("host", ()))
    if hosts > 1 or (hosts == 0 and version >= (1, 1)):
        # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
        # HTTP/1.1 request message that lacks a Host header field and to any request message that
        # contains more than one Host header field line".
        raise HTTPError(400, "a request needs exactly one Host header")
    path, _, query = target.partition("?")
    return Request(method, target, path, query, version, headers, fields=fields)


class RequestReader:
    """Bytes in, complete requests out: `feed(data)` then `next_request()` until None.

    Raises HTTPError for a head over `max_head_size` (431), a body over `max_body_size` (413), a
    bad Content-Length (400) or Transfer-Encoding (411: this server reads Content-Length bodies).
    """

    def __init__(self, max_head_size: int = MAX_HEAD_SIZE, max_body_size: int = MAX_BODY_SIZE) -> None:
        self.buffer = bytearray()
        self.max_head_size = max_head_size
        self.max_body_size = max_body_size
        self._pending: Request | None = None  # head parsed, body not complete yet
        self._body_length = 0
        # RFC 9110 §10.1.1: a client that sent `Expect: 100-continue` waits for a 100 (Continue)
        # before the body; True once such a head is read and its body has not arrived yet. The
        # I/O layer writes the interim response and clears it.
        self.expects_continue = False

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_request(self) -> Request | None:
        if self._pending is None:
            while self.buffer.startswith(b"\r\n"):
                del self.buffer[:2]  # RFC 9112 §2.2: "SHOULD ignore at least one empty line" before a request
            end = self.buffer.find(b"\r\n\r\n", 0, self.max_head_size + 4)
            if end < 0:
                if len(self.buffer) > self.max_head_size:
                    raise HTTPError(431, f"request head over {self.max_head_size} bytes")
                return None
            request = parse_request_head(self.buffer[:end])
            del self.buffer[: end + 4]
            self._body_length = self._content_length(request)
            if not self._body_length:
                return request  # no body: a GET, an upgrade
            self._pending = request
            if len(self.buffer) < self._body_length and request.version >= (1, 1):
                self.expects_continue = "100-continue" in request.tokens("expect")
        if len(self.buffer) < self._body_length:
            return None
        request, self._pending = self._pending, None
        request.body = bytes(self.buffer[: self._body_length])
        del self.buffer[: self._body_length]
        return request

    def _content_length(self, request: Request) -> int:
        fields = request.fields
        if "transfer-encoding" in fields:
            raise HTTPError(411, "Transfer-Encoding is not supported: send a Content-Length")
        if "content-length" not in fields:
            return 0
        values = {v.strip() for v in fields["content-length"]}
        if len(values) > 1 or not next(iter(values)).isdigit():
            raise HTTPError(400, "invalid Content-Length")
        length = int(values.pop())
        if length > self.max_body_size:
            raise HTTPError(413, f"request body over {self.max_body_size} bytes")
        return length


@dataclasses.dataclass
class Response:
    """An HTTP response before serialisation; `head` drops the body but keeps its length."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def serialize(self, keep_alive: bool = True, head: bool = False) -> bytes:
        reason = http.HTTPStatus(self.status).phrase
        lines = [f"HTTP/1.1 {self.status} {reason}", f"Server: microsocket/{__version__}"]
        # Connection options of the response's own (`upgrade` beside a 426) join the one line.
        options = [v for k, v in self.headers if k.lower() == "connection"]
        if self.status != 101:
            if self.body or self.status not in (204, 304):
                lines.append(f"Content-Type: {self.content_type}")
            lines.append(f"Content-Length: {len(self.body)}")
            options.append("keep-alive" if keep_alive else "close")
        if options:
            lines.append("Connection: " + ", ".join(options))
        lines.extend(f"{k}: {v}" for k, v in self.headers if k.lower() != "connection")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode()
        return data if head else data + self.body


class PendingResponse:
    """A response a route gives later, once the backbone has answered: `then(callback)` gets it.
    The connection answers nothing after it until it is resolved, so responses keep their order."""

    __slots__ = ("response", "callback")

    def __init__(self) -> None:
        self.response: Response | None = None
        self.callback: Callable[[Response], None] | None = None

    def resolve(self, response: Response) -> None:
        self.response = response
        callback, self.callback = self.callback, None
        if callback is not None:
            callback(response)

    def then(self, callback: Callable[[Response], None]) -> None:
        if self.response is not None:
            callback(self.response)
        else:
            self.callback = callback


def json_response(status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> Response:
    body = (json.dumps(obj) + "\n").encode()
    return Response(status, body, "application/json", list(headers))


def error_response(error: HTTPError) -> Response:
    return json_response(error.status, {"error": error.message}, error.headers)


# === 5. WebSocket handshake (sans-I/O) ============================================================
#
# RFC 6455 §4.2: check the client's opening handshake, compute Sec-WebSocket-Accept, answer 101.
# One extension is implemented: permessage-deflate (RFC 7692), accepted with --permessage-deflate
# when the client offers it in a form the server can honour (`negotiate`, below); any other is left
# out of the response (§4.2.2: the server selects "zero or more"). One subprotocol is: SUBPROTOCOL, this
# protocol's name, selected when the client offers it; a client that offers none is accepted too,
# and one that offers only others gets no Sec-WebSocket-Protocol back (§4.2.2: "the server MUST
# NOT" echo one it does not speak; the client then decides whether to go on).

SUBPROTOCOL = "microsocket.v1"  # Micro Socket protocol, major version 1 (SPEC 1.x)
_UPGRADE_REQUIRED = [("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13")]


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (§4.2.2 step 5.4)."""
    return _accept(key).decode()


def _accept(key: str) -> bytes:
    """accept_key(key) as bytes, as the 101 carries it."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest())


def check_handshake(request: Request) -> str:
    """Check an upgrade request (§4.2.1); return its Sec-WebSocket-Key or raise HTTPError.
    The single-valued headers are read straight from the parsed fields (this runs for every connection)."""
    fields = request.fields
    if "websocket" not in request.tokens("upgrade"):
        # A browser opening the URL as a page lands here: tell it which protocol to speak.
        raise HTTPError(426, "this endpoint speaks WebSocket", _UPGRADE_REQUIRED)
    if request.method != "GET":
        raise HTTPError(405, "a WebSocket handshake is a GET", [("Allow", "GET")])
    if request.version < (1, 1):
        raise HTTPError(400, "a WebSocket handshake needs HTTP/1.1")
    if "upgrade" not in request.tokens("connection"):
        raise HTTPError(400, "Connection header must contain 'upgrade'")
    if "host" not in fields:
        raise HTTPError(400, "missing Host header")
    if fields.get("sec-websocket-version") != ["13"]:
        # §4.2.2: "...it MUST abort the handshake... and include Sec-WebSocket-Version: 13".
        raise HTTPError(426, "unsupported WebSocket version: use 13", _UPGRADE_REQUIRED)
    keys = fields.get("sec-websocket-key")
    if keys is None or len(keys) != 1:
        raise HTTPError(400, "missing or repeated Sec-WebSocket-Key")
    key = keys[0]
    try:
        raw = base64.b64decode(key.encode(), validate=True)
    except (ValueError, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HTTPError(400, "Sec-WebSocket-Key must be base64 of 16 bytes")
    return key


def select_subprotocol(request: Request) -> str | None:
    """SUBPROTOCOL if the client offered it in Sec-WebSocket-Protocol (tokens are case-sensitive)."""
    for value in request.fields.get("sec-websocket-protocol", ()):
        if SUBPROTOCOL in (token.strip() for token in value.split(",")):
            return SUBPROTOCOL
    return None


_SWITCHING = (
    f"HTTP/1.1 101 Switching Protocols\r\nServer: microsocket/{__version__}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Accept: "
).encode()


def handshake_response(key: str, subprotocol: str | None = None, extensions: str | None = None) -> bytes:
    """The 101 response that completes the handshake (built as bytes: it is on every connection's path)."""
    selected = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
    if extensions:
        selected += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    return b"".join((_SWITCHING, _accept(key), b"\r\n", selected.encode(), b"\r\n"))


# -- permessage-deflate negotiation (RFC 7692 §5-§7)
#
# RFC 6455 §9.1, the grammar of Sec-WebSocket-Extensions:
#
#     Sec-WebSocket-Extensions = extension-list
#     extension-list = 1#extension
#     extension = extension-token *( ";" extension-param )
#     extension-param = token [ "=" (token | quoted-string) ]
#         ; When using the quoted-string syntax variant, the value after quoted-string unescaping
#         ; MUST conform to the 'token' ABNF.
#
# One header may hold several offers and a request may repeat the header; offers keep their order
# across both (RFC 7692 §5: "in preference order"). A syntax error spoils only the offer it is in:
# that offer is skipped and the others are still read, so a strange header costs the compression,
# never the handshake (RFC 6455 §9.1 lets the server accept any subset, including none).
#
# What the server answers, whatever the offer: `server_no_context_takeover` (§7.1.1.1: the server
# may add it "even if the extension negotiation offer being accepted by the response didn't
# include" it), so one compressed frame serves every subscriber (section 3); and
# `client_no_context_takeover` (§7.1.1.2: likewise the server's to add), so between two messages
# a connection keeps no zlib state at all, only while one is being inflated.

PERMESSAGE_DEFLATE = "permessage-deflate"  # RFC 7692 §7
_EXT_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_EXT_QUOTED = re.compile(r'"((?:[^"\\\r\n]|\\[^\r\n])*)"')
_EXT_QUOTED_PAIR = re.compile(r"\\(.)")
_EXT_OWS = re.compile(r"[ \t]*")
_WINDOW_BITS = re.compile(r"[1-9][0-9]?")  # §7.1.2.1: "decimal integer ... without leading zeros"

Offer = tuple[str, list[tuple[str, "str | None"]]]  # (extension name, [(parameter, value or None)])


class DeflateParams(NamedTuple):
    """What a connection agreed to (RFC 7692 §7.1). The server never takes over its own context."""

    server_max_window_bits: int = MAX_WINDOW_BITS  # the window the server's compressor may use, at most
    client_max_window_bits: int = MAX_WINDOW_BITS  # the window the client may use: the server's inflater's
    client_no_context_takeover: bool = True  # the client starts every message afresh


def parse_extensions(value: str) -> list[Offer | None]:
    """The offers in one Sec-WebSocket-Extensions value, in order; None for each malformed one."""
    offers: list[Offer | None] = []
    pos, end = 0, len(value)
    while True:
        pos = _EXT_OWS.match(value, pos).end()
        if pos >= end:
            return offers
        if value[pos] == ",":  # RFC 7230 §7: a list may hold empty elements; they are skipped
            pos += 1
            continue
        offer, pos = _parse_offer(value, pos)
        if offer is None:
            pos = _skip_element(value, pos)
        offers.append(offer)


def _parse_offer(value: str, pos: int) -> tuple[Offer | None, int]:
    match = _EXT_TOKEN.match(value, pos)
    if match is None:
        return None, pos
    name, pos = match.group().lower(), match.end()
    params: list[tuple[str, str | None]] = []
    while True:
        pos = _EXT_OWS.match(value, pos).end()
        if pos >= len(value) or value[pos] == ",":
            return (name, params), pos
        if value[pos] != ";":
            return None, pos
        pos = _EXT_OWS.match(value, pos + 1).end()
        match = _EXT_TOKEN.match(value, pos)
        if match is None:
            return None, pos
        param, pos = match.group().lower(), match.end()
        param_value: str | None = None
        after = _EXT_OWS.match(value, pos).end()
        if after < len(value) and value[after] == "=":
            pos = _EXT_OWS.match(value, after + 1).end()
            match = _EXT_TOKEN.match(value, pos)
            if match is not None:
                param_value = match.group()
            else:
                match = _EXT_QUOTED.match(value, pos)
                if match is None:
                    return None, pos
                param_value = _EXT_QUOTED_PAIR.sub(r"\1", match.group(1))
                if not _EXT_TOKEN.fullmatch(param_value):
                    return None, pos  # RFC 6455 §9.1: the unescaped value "MUST conform to the 'token' ABNF"
            pos = match.end()
        params.append((param, param_value))


def _skip_element(value: str, pos: int) -> int:
    """The position of the next comma outside a quoted string (or the end), after a syntax error."""
    quoted = False
    while pos < len(value):
        char = value[pos]
        if quoted and char == "\\":
            pos += 1
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            return pos
        pos += 1
    return pos


def _window_bits(value: str | None) -> int | None:
    """A window-bits value 8-15 written as RFC 7692 §7.1.2 asks, or None."""
    if value is None or not _WINDOW_BITS.fullmatch(value):
        return None
    bits = int(value)
    return bits if MIN_WINDOW_BITS <= bits <= MAX_WINDOW_BITS else None


def accept_offer(params: list[tuple[str, str | None]]) -> tuple[str, DeflateParams] | None:
    """The response value and agreed parameters for one permessage-deflate offer, or None to decline."""
    seen: dict[str, str | None] = {}
    for name, value in params:
        if name in seen:
            # §7: decline an offer that "has multiple extension parameters with the same name".
            return None
        seen[name] = value
    server_bits = client_bits = MAX_WINDOW_BITS
    for name, value in seen.items():
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None  # §7.1.1: "This extension parameter has no value."
        elif name == "server_max_window_bits":
            bits = _window_bits(value)
            if bits is None:
                return None  # §7.1.2.1: the value is required and must be 8-15
            server_bits = bits  # 8 too: compressed with 9 bits, see MIN_WINDOW_BITS
        elif name == "client_max_window_bits":
            if value is not None:  # §7.1.2.2: valueless, as Chrome and Firefox send it, is "any"
                bits = _window_bits(value)
                if bits is None:
                    return None
                client_bits = bits
        else:
            # §7: decline an offer that "has any extension parameter not defined for use in an offer".
            return None
    answer = [PERMESSAGE_DEFLATE, "server_no_context_takeover", "client_no_context_takeover"]
    if "server_max_window_bits" in seen:
        # §7.1.2.1: accepting the offer means answering "with the same or smaller value".
        answer.append(f"server_max_window_bits={server_bits}")
    if client_bits < MAX_WINDOW_BITS:
        # §7.1.2.2: the answer may hold client_max_window_bits only if the offer did, and then
        # "a value equal to or smaller than the received value": the client's own.
        answer.append(f"client_max_window_bits={client_bits}")
    return "; ".join(answer), _AGREEMENTS[server_bits, max(client_bits, MIN_ZLIB_WINDOW_BITS)]


# Every agreement accept_offer can reach, made once: connections share them, none is made per connection.
_AGREEMENTS = {
    (server, client): DeflateParams(server, client, True)
    for server in range(MIN_WINDOW_BITS, MAX_WINDOW_BITS + 1)
    for client in range(MIN_ZLIB_WINDOW_BITS, MAX_WINDOW_BITS + 1)
}


def negotiate(header_values: Iterable[str]) -> tuple[str | None, DeflateParams | None]:
    """Accept the first permessage-deflate offer the server can honour, from every header value.

    Returns the value for the response's Sec-WebSocket-Extensions header and the agreed
    parameters, or (None, None): then the response has no such header and frames are plain.
    """
    for value in header_values:
        for offer in parse_extensions(value):
            if offer is None or offer[0] != PERMESSAGE_DEFLATE:
                continue  # RFC 6455 §9.1: the server accepts a subset of the offers, maybe none
            accepted = accept_offer(offer[1])
            if accepted is not None:
                return accepted
    return None, None


# === 6. WebSocket connection (sans-I/O) ===========================================================
#
# Theory of operation. `receive_data(bytes)` takes whatever the network delivered and returns the
# events in it, in order: (Opcode.TEXT, str) and (Opcode.BINARY, bytes) for complete messages, and
# (Opcode.PONG, frame) for a pong frame that answers a ping and must be written in its place among
# the replies to the messages around it. A close is handled here: `data_to_send()` hands over the
# close frame to write. The state only moves forward:
#
#     OPEN ──close received──> CLOSED (reply queued; the server then closes TCP, §7.1.1)
#     OPEN ──close()──> CLOSING (close sent) ──close received──> CLOSED
#     OPEN ──protocol error──> CLOSED (close frame with the error's code queued; "_Fail the
#                                      WebSocket Connection_", §7.1.7: the TCP connection goes too)
#
# Data frames are processed as their bytes arrive, not when the frame is complete: a text frame's
# payload goes through an incremental UTF-8 decoder chunk by chunk, so invalid text fails (1007)
# at the fragment, even the TCP segment, where it breaks. The size limit is checked against each
# frame header before its payload is buffered (1009). Every ProtocolError is caught in one place,
# `receive_data`, and becomes a close frame with its code.
#
# Fairness: one call parses at most FRAMES_PER_TURN frames. What is left stays in the buffer and
# `more` says so; the I/O layer stops reading the socket and calls `receive_data(b"")` again in a
# later event-loop turn, after the other connections had theirs. A client that floods small
# publishes or empty frames delays others by one slice of its input, not by all of it.
#
# permessage-deflate (`deflate`, the parameters section 5 agreed): RSV1 on a message's first
# frame says it is compressed (RFC 7692 §6.1); its payload is inflated as it arrives, in bounded
# steps (`Inflater`, section 3), before the UTF-8 check, and its inflated size counts against
# the message size limit (1009) before it is reached. Every INFLATE_TURN_UNIT of inflated output
# counts as one more frame of the turn. Sending is not here: the I/O layer writes the compressed
# form of each frame (`Deflater`, section 3).

OPEN, CLOSING, CLOSED = "OPEN", "CLOSING", "CLOSED"

_utf8_decoder = codecs.getincrementaldecoder("utf-8")


class WebSocketConnection:
    """The server side of one WebSocket connection, without I/O."""

    __slots__ = (
        "state",
        "max_message_size",
        "close_code",
        "close_reason",
        "close_sent",
        "_buffer",
        "_start",
        "more",
        "_header",
        "_remaining",
        "_offset",
        "_message_opcode",
        "_parts",
        "_size",
        "_fragments",
        "_decoder",
        "_out",
        "deflate",
        "_compressed",
        "_inflater",
        "_frame_limit",
    )

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE, deflate: DeflateParams | None = None) -> None:
        self.state = OPEN
        self.max_message_size = max_message_size
        self.deflate = deflate  # permessage-deflate's agreed parameters; None: not negotiated
        self._compressed = False  # the open message is compressed (RSV1 on its first frame)
        self._inflater: Inflater | None = None  # made on the first compressed message
        # A data frame's length is checked against this before its payload is read: the message
        # size limit, or with permessage-deflate what a message of that size can be compressed to
        # (a compressed message's own limit is its inflated size, checked as it inflates).
        self._frame_limit = compressed_limit(max_message_size) if deflate is not None else max_message_size
        self.close_code: int | None = None  # the code received from the peer, once it has closed
        self.close_reason = ""
        self.close_sent: int | None = None  # the code of the close frame we started the handshake with
        self._buffer = b""  # input, parsed up to _start
        self._start = 0
        self.more = False  # frames were left in the buffer for the next call (FRAMES_PER_TURN)
        self._header: FrameHeader | None = None  # the data frame whose payload is arriving
        self._remaining = 0  # payload bytes of that frame still to come
        self._offset = 0  # payload bytes of that frame already unmasked (the mask's phase)
        self._message_opcode = 0  # TEXT or BINARY while a fragmented message is open, else 0
        self._parts: list = []  # str pieces of a text message, bytes pieces of a binary one
        self._size = 0  # bytes of the open message so far
        self._fragments = 0  # frames of the open message so far
        self._decoder: Any = None  # incremental UTF-8 decoder of the open text message
        self._out: list[bytes] = []

    # -- input

    def receive_data(self, data: bytes) -> list[tuple[int, Any]]:
        """Feed bytes from the network; return the messages they complete."""
        if self.state == CLOSED:
            return []
        messages: list[tuple[int, Any]] = []
        if data:
            self._buffer = self._buffer[self._start :] + data if self._buffer else data
            self._start = 0
        try:
            self._parse(messages)
        except ProtocolError as exc:
            self.close(exc.code, exc.reason)
            self.state = CLOSED  # §7.1.7: after a failure nothing more is read
            self._buffer = b""
            self._start = 0
            self.more = False
            self._end_message(abandoned=True)
        return messages

    def _parse(self, messages: list[tuple[int, Any]]) -> None:
        buf = self._buffer
        pos = self._start
        end = len(buf)
        frames = FRAMES_PER_TURN
        deflate = self.deflate is not None
        inflated = 0  # inflated bytes this turn not yet counted as frames
        self.more = False
        while self.state != CLOSED:
            header = self._header
            if header is None:
                if frames <= 0:
                    self.more = pos < end  # the rest waits for the next call
                    break
                if end - pos < 2:
                    break  # not even the start of a header: usually the end of what arrived
                frames -= 1
                if buf[pos] == 0x81 and self.state == OPEN and not self._message_opcode:
                    # The common case, read here without header_fields: a whole text message in
                    # one masked frame (FIN, no RSV bit, opcode 1) with a 7- or 16-bit length, all
                    # of it arrived and within the message limit. Anything else, including every
                    # error, takes the general way below.
                    b1 = buf[pos + 1]
                    if 0x80 <= b1 < 0xFE:
                        length = b1 & 0x7F
                        start = pos + 6
                    elif b1 == 0xFE and end - pos >= 4:
                        length = (buf[pos + 2] << 8) | buf[pos + 3]
                        start = pos + 8
                    else:
                        length = start = end + 1  # not this case
                    if start + length <= end and length <= self.max_message_size:
                        mask = buf[start - 4 : start]
                        pos = start + length
                        try:
                            messages.append((OP_TEXT, apply_mask(buf[start:pos], mask).decode()))
                        except UnicodeDecodeError:
                            raise ProtocolError("invalid UTF-8 in a text message", CloseCode.INVALID_DATA) from None  # §8.1
                        continue
                fields = header_fields(buf, pos, self._frame_limit, deflate)
                if fields is None:
                    break
                fin, opcode, mask, length, size, rsv1 = fields
                if mask is None:
                    # §5.1: "The server MUST close the connection upon receiving a frame that is
                    # not masked."
                    raise ProtocolError("client frames must be masked")
                if opcode >= 8:
                    if end - pos < size + length:
                        break  # control frames are at most 125 bytes: wait for the whole frame
                    start = pos + size
                    pos = start + length
                    self._control(opcode, apply_mask(buf[start:pos], mask), messages)
                    continue
                if fin and opcode != OP_CONT and not rsv1 and not self._message_opcode and self.state == OPEN and end - pos >= size + length:
                    # The common case: a whole message in one frame, and all of it has arrived.
                    # header_fields checked its size against the frame limit, which with
                    # permessage-deflate is a compressed message's: a plain one has the message's.
                    if length > self.max_message_size:
                        raise PayloadTooBig(f"message over the {self.max_message_size}-byte limit")
                    start = pos + size
                    pos = start + length
                    payload = apply_mask(buf[start:pos], mask)
                    if opcode == OP_TEXT:
                        try:
                            payload = payload.decode()
                        except UnicodeDecodeError:
                            raise ProtocolError("invalid UTF-8 in a text message", CloseCode.INVALID_DATA) from None  # §8.1
                    messages.append((opcode, payload))
                    continue
                header = FrameHeader(*fields)  # kept while its payload arrives, maybe over several reads
                self._start_frame(header)
                pos += size
                self._header = header
                self._remaining = length
                self._offset = 0
            # Payload of a data frame: take what has arrived, however little.
            take = min(self._remaining, end - pos)
            if take or not self._remaining:
                chunk = buf[pos : pos + take]
                pos += take
                mask = header.mask
                if self._offset & 3:
                    phase = self._offset & 3
                    mask = mask[phase:] + mask[:phase]
                self._offset += take
                self._remaining -= take
                data = apply_mask(chunk, mask)
                last = not self._remaining and header.fin
                if self._compressed and self.state == OPEN:
                    data = self._inflate(data, last)
                    inflated += len(data)
                    if inflated >= INFLATE_TURN_UNIT:
                        frames -= inflated // INFLATE_TURN_UNIT
                        inflated %= INFLATE_TURN_UNIT
                self._payload(data, last, messages)
                if not self._remaining:
                    self._header = None
                    continue
            break
        if pos < end:
            self._start = pos  # kept by offset: a slice per call would copy the rest again each time
        else:
            self._buffer = b""
            self._start = 0

    def _start_frame(self, header: FrameHeader) -> None:
        if header.opcode == OP_CONT:
            if not self._message_opcode:
                raise ProtocolError("continuation frame without a message to continue")  # §5.4
            if header.rsv1:
                # RFC 7692 §6.1: "An endpoint MUST NOT set the "Per-Message Compressed" bit of
                # ... non-first fragments of a data message."
                raise ProtocolError("RSV1 set on a continuation frame")
        elif self._message_opcode:
            raise ProtocolError("new data frame while a fragmented message is open")  # §5.4
        else:
            self._message_opcode = header.opcode
            self._compressed = header.rsv1
            self._size = 0
            self._fragments = 0
        limit = self._frame_limit if self._compressed else self.max_message_size
        if self._size + header.length > limit:
            raise PayloadTooBig(f"message over the {limit}-byte limit")
        self._size += header.length
        self._fragments += 1
        if self._fragments > MAX_SMALL_FRAGMENTS and self._fragments * MIN_FRAGMENT_AVERAGE > self._size:
            raise PayloadTooBig(f"message in over {MAX_SMALL_FRAGMENTS} fragments of under {MIN_FRAGMENT_AVERAGE} bytes on average")

    def _inflate(self, chunk: bytes, last: bool) -> bytes:
        """A piece of a compressed message, inflated (RFC 7692 §7.2.2)."""
        inflater = self._inflater
        if inflater is None:
            params = self.deflate
            inflater = self._inflater = Inflater(params.client_max_window_bits, params.client_no_context_takeover, self.max_message_size)
        return inflater.feed(chunk, last)

    def _payload(self, chunk: bytes, last: bool, messages: list[tuple[int, Any]]) -> None:
        opcode = self._message_opcode
        if self.state != OPEN:
            if last:
                self._end_message(abandoned=True)
            return  # after our close frame, data is read only to reach the peer's close
        if opcode == OP_TEXT:
            try:
                if last and not self._parts:  # the whole message in one chunk: the common case
                    messages.append((opcode, chunk.decode()))
                    self._end_message()
                    return
                decoder = self._decoder
                if decoder is None:
                    decoder = self._decoder = _utf8_decoder()
                self._parts.append(decoder.decode(chunk, last))
                pending = decoder.getstate()[0]
                if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
                    # ED A0..BF can only start a surrogate, which UTF-8 forbids (RFC 3629 §3);
                    # CPython's decoder waits for a third byte, so fail here, at this fragment.
                    raise UnicodeDecodeError("utf-8", pending, 0, 2, "surrogate")
            except UnicodeDecodeError:
                # §8.1: "When an endpoint is to interpret a byte stream as UTF-8 but finds that
                # the byte stream is not, in fact, a valid UTF-8 stream, that endpoint MUST
                # _Fail the WebSocket Connection_." Code 1007 (§7.4.1).
                raise ProtocolError("invalid UTF-8 in a text message", CloseCode.INVALID_DATA) from None
            if last:
                messages.append((opcode, "".join(self._parts)))
                self._end_message()
        else:
            if last and not self._parts:
                messages.append((opcode, chunk))
            else:
                self._parts.append(chunk)
                if last:
                    messages.append((opcode, b"".join(self._parts)))
            if last:
                self._end_message()

    def _end_message(self, abandoned: bool = False) -> None:
        if abandoned and self._compressed and self._inflater is not None:
            self._inflater.end_message()  # inflated midway: nothing of it may carry on
        self._message_opcode = 0
        self._compressed = False
        self._parts = []
        self._decoder = None
        self._size = 0

    def _control(self, opcode: int, payload: bytes, messages: list[tuple[int, Any]]) -> None:
        if opcode == Opcode.PING:
            if self.state == OPEN:
                # §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
                # response... [with] identical "Application data"".
                messages.append((Opcode.PONG, serialize_frame(Opcode.PONG, payload)))
        elif opcode == Opcode.CLOSE:
            code, reason = parse_close(payload)
            self.close_code, self.close_reason = code, reason
            if self.state == OPEN:
                # §5.5.1: "the endpoint MUST send a Close frame in response", echoing the code.
                self._out.append(serialize_frame(Opcode.CLOSE, serialize_close(code)))
            self.state = CLOSED
            self._end_message(abandoned=True)
        # A pong needs nothing: any input at all counts as a sign of life (section 15).

    def buffered(self) -> int:
        """Bytes of input held: unparsed, and the open message so far (as its frame headers
        declared, and as inflated when it is compressed)."""
        unparsed = len(self._buffer) - self._start
        if self.state != OPEN:
            return unparsed  # what still arrives of an open message is dropped as it is read
        inflated = self._inflater.size if self._compressed and self._inflater is not None else 0
        return unparsed + self._size + inflated

    # -- output

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake (§7.1.2); only the peer's close frame completes it."""
        if self.state == OPEN:
            self._out.append(serialize_frame(Opcode.CLOSE, serialize_close(code, reason)))
            self.close_sent = code
            self.state = CLOSING
            # The peer may be in the middle of a fragmented message: its remaining frames are read
            # and dropped until its close frame arrives (§7.1.1), so the message stays open, but
            # what it held is let go.
            self._parts = []
            self._decoder = None
            if self._inflater is not None:
                self._inflater.end_message()

    def data_to_send(self) -> bytes:
        """The close frame queued by the state machine, once."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data


# === 7. Pub/sub message schema ====================================================================
#
# What a client may send and what it gets back, as dicts. `decode_client_message` turns text into a
# checked dict or raises ClientError with the SPEC's code and the offending field; `encode` turns a
# server message into compact JSON. No state, no I/O.

CLIENT_TYPES = frozenset(
    ("setup", "subscribe", "unsubscribe", "publish", "replay", "resume", "ack", "refresh", "presence", "ping")
)
SERVER_TYPES = frozenset(
    ("ready", "subscribed", "unsubscribed", "ack", "message", "replayed", "resumed", "refreshed", "presence", "pong", "error")
)
ERROR_CODES = (
    "AUTH_REQUIRED",
    "AUTH_FAILED",
    "ALREADY_SETUP",
    "INVALID_JSON",
    "UNKNOWN_TYPE",
    "INVALID_MESSAGE",
    "INVALID_TOPIC",
    "TOPIC_LOCKED",
    "ACL_DENIED",
    "TOO_MANY_SUBSCRIPTIONS",
    "TOO_MANY_CONNECTIONS",
    "RATE_LIMITED",
    "SESSION_EXPIRED",
    "REPLAY_UNAVAILABLE",
    "BACKBONE_UNAVAILABLE",
    "INTERNAL_ERROR",
)
# SPEC codes this version never sends (none: the Redis backbone sends BACKBONE_UNAVAILABLE).
PLANNED_ERROR_CODES: tuple[str, ...] = ()

# Whitespace, C0/C1 controls, surrogates and "*" (reserved for ACL patterns) are not allowed, nor
# Unicode format characters (category Cf: bidi overrides, zero-width joiners and spaces, soft
# hyphens, tags), which make look-alike topic names. Topics are not normalised: two topics are the
# same only when their code points are.
_FORMAT_CHARS = (
    "\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f"
)  # Unicode 15's Cf characters
_BAD_TOPIC_CHAR = re.compile(f"[\\s\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff*{_FORMAT_CHARS}]")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (_INF, -_INF):
        raise ValueError("number out of range")
    return value


_INF = float("inf")
# NaN, Infinity and numbers that overflow to infinity are refused: they could not be sent on as JSON.
_scan = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_parse_float).scan_once
_JSON_SPACE = re.compile(r"[ \t\n\r]*")  # RFC 8259 §2: the whitespace allowed around a value


def _decode(text: str) -> Any:
    """One JSON value, with the checks above. What JSONDecoder.decode does, without its two Python
    calls and two whitespace scans around the scanner (C where CPython has it): this runs on every
    client message, and one that ends where its value ends needs no scan after it."""
    try:
        value, end = _scan(text, _JSON_SPACE.match(text).end())
    except StopIteration:  # the scanner's "no value here"
        raise ValueError("not JSON") from None
    if end != len(text) and _JSON_SPACE.match(text, end).end() != len(text):
        raise ValueError("extra data after the JSON value")
    return value


def _compact_encoder() -> Callable[[Any], str]:
    """Compact JSON, NaN refused, non-ASCII text as itself (sent as UTF-8: "é" is 2 bytes, where
    the escape "\\u00e9" would be 6). JSONEncoder.encode builds a new C encoder on every call (about
    a microsecond, on every reply and every publish); this builds it once, where CPython has it."""
    encoder = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # another Python: the plain, slower path
        return encoder.encode
    c_encode = make(None, encoder.default, json.encoder.encode_basestring, None, ":", ",", False, False, False)
    return lambda obj: "".join(c_encode(obj, 0))


encode = _compact_encoder()


def check_topic(topic: Any, max_length: int = MAX_TOPIC_LENGTH, field: str = "topic") -> str:
    """Return `topic` if it is a valid topic name, else raise ClientError."""
    if not isinstance(topic, str):
        raise ClientError("INVALID_MESSAGE", f"'{field}' must be a string", field=field)
    if not topic:
        raise ClientError("INVALID_TOPIC", "topic is empty", field=field)
    if len(topic) > max_length:
        raise ClientError("INVALID_TOPIC", f"topic is over {max_length} characters", field=field)
    if _BAD_TOPIC_CHAR.search(topic):
        raise ClientError(
            "INVALID_TOPIC", "topic contains whitespace, a control or format character, a lone surrogate or '*'",
            field=field, topic=topic,
        )
    return topic


def decode_client_message(text: str) -> dict:
    """Parse one client message; check `type` and `id`. Field checks are per type (section 12)."""
    try:
        msg = _decode(text)
    except (ValueError, RecursionError):
        raise ClientError("INVALID_JSON", "message is not valid JSON") from None
    if not isinstance(msg, dict):
        raise ClientError("INVALID_JSON", "message must be a JSON object")
    kind = msg.get("type")
    msg_id = msg.get("id")
    if "id" in msg and (isinstance(msg_id, bool) or not isinstance(msg_id, (str, int, float))):
        raise ClientError("INVALID_MESSAGE", "'id' must be a string or a number", field="id")
    # From here on the error is a direct reply, so it carries the id back (context "id").
    if not isinstance(kind, str):
        raise ClientError("UNKNOWN_TYPE", "'type' is missing or not a string", field="type", id=msg_id)
    if kind not in CLIENT_TYPES:
        raise ClientError("UNKNOWN_TYPE", f"unknown message type {kind[:64]!r}", field="type", id=msg_id)
    return msg


def encode_payload(data: Any) -> bytes:
    """A publish's payload as UTF-8 JSON, or ClientError INVALID_MESSAGE: data that decoded as
    JSON but cannot be encoded again (nested deeper than the encoder's recursion allows), or
    non-JSON data from Python code. Checked before anything is sequenced."""
    try:
        return utf8(encode(data))
    except (ValueError, TypeError, RecursionError):
        raise ClientError("INVALID_MESSAGE", "'payload' cannot be sent as JSON (nested too deeply?)", field="payload") from None


_quote = json.encoder.encode_basestring  # a str as a JSON string, in C where CPython has it
# The bytes of a `message` besides its topic, messageId and data, with a seqNo of 20 digits.
_MESSAGE_OVERHEAD = len('{"type":"message","topic":,"seqNo":,"messageId":,"data":}') + 20


def message_frame(topic: str, seq: int, message_id: str, data: bytes, signature: tuple[str, str] | None = None) -> bytes:
    """The frame of one published message: built once, sent to every subscriber, kept in history
    (so replay and resume send the same bytes, signature included). `signature` is (kid, sig)."""
    head = f'{{"type":"message","topic":{_quote(topic)},"seqNo":{seq},"messageId":{_quote(message_id)},"data":'
    try:
        head = head.encode()
    except UnicodeEncodeError:
        head = utf8(head)
    tail = b"}" if signature is None else utf8(f',"kid":{_quote(signature[0])},"sig":"{signature[1]}"}}')
    n = len(head) + len(data) + len(tail)
    # The frame header written here for the usual sizes (FIN, TEXT, unmasked: serialize_frame's).
    if n < 126:
        return b"".join((bytes((0x80 | OP_TEXT, n)), head, data, tail))
    if n < 65536:
        return b"".join((bytes((0x80 | OP_TEXT, 126, n >> 8, n & 0xFF)), head, data, tail))
    return serialize_frame(OP_TEXT, b"".join((head, data, tail)))


def ack_frame(message_id: str, status: str, seq: int, msg_id: Any = None) -> bytes:
    """The frame of a publish's `ack` (status "ok" or "duplicate"), with the request's `id` when it
    had one. Written out like `message_frame`, not encoded from a dict: every publish gets one."""
    text = f'{{"type":"ack","messageId":{_quote(message_id)},"status":"{status}","seqNo":{seq}'
    return text_frame(f"{text}}}" if msg_id is None else f'{text},"id":{encode(msg_id)}}}')


def message_size(topic: str, message_id: str, data: bytes) -> int:
    """The most bytes the `message` of this publish can take (its seqNo not known yet)."""
    return _MESSAGE_OVERHEAD + len(utf8(_quote(topic))) + len(utf8(_quote(message_id))) + len(data)


def require(msg: dict, field: str, kind: type, what: str) -> Any:
    """msg[field] if it is present and of `kind` (a bool is not an int here), else ClientError."""
    value = msg.get(field)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ClientError("INVALID_MESSAGE", f"'{field}' must be {what}", field=field)
    return value


def error_message(code: str, message: str, msg_id: Any = None, **context: Any) -> dict:
    out = {"type": "error", "code": code, "message": message}
    out.update((k, v) for k, v in context.items() if v is not None)
    if msg_id is not None:
        out["id"] = msg_id
    return out

# The wire schema of every message, as JSON Schema: the single source for /asyncapi.json and the
# docs. (type, summary, properties, required, example); `type` and `id` are added to each.
_TOPIC = {"type": "string", "minLength": 1, "maxLength": MAX_TOPIC_LENGTH, "pattern": r"^[^\s*]+$"}
_SEQ = {"type": "integer", "minimum": 0}
_MESSAGE_ID = {"type": "string", "minLength": 1, "maxLength": MAX_MESSAGE_ID_LENGTH}
CLIENT_MESSAGES: list[tuple[str, str, dict, list[str], dict]] = [
    ("setup", "Authenticate; optionally subscribe", {"token": {"type": "string", "minLength": 1}, "topics": {"type": "array", "items": _TOPIC}}, ["token"], {"type": "setup", "token": "alice", "topics": ["prices"], "id": 1}),
    ("subscribe", "Subscribe to a topic (idempotent)", {"topic": _TOPIC}, ["topic"], {"type": "subscribe", "topic": "prices", "id": 2}),
    ("unsubscribe", "Unsubscribe (idempotent)", {"topic": _TOPIC}, ["topic"], {"type": "unsubscribe", "topic": "prices"}),
    ("publish", "Publish a message", {"topic": _TOPIC, "messageId": _MESSAGE_ID, "payload": {}}, ["topic", "messageId"], {"type": "publish", "topic": "prices", "messageId": "m-1", "payload": {"btc": 97000}, "id": 3}),
    ("replay", "Resend retained messages from fromSeq", {"topic": _TOPIC, "fromSeq": {"type": "integer", "minimum": 1}, "epoch": {"type": "string"}}, ["topic", "fromSeq"], {"type": "replay", "topic": "prices", "fromSeq": 1}),
    ("resume", "Re-attach a session and replay its gap", {"sessionId": {"type": "string"}, "lastSeqPerTopic": {"type": "object", "additionalProperties": _SEQ}, "epochs": {"type": "object", "additionalProperties": {"type": "string"}}, "epoch": {"type": "string"}}, ["sessionId"], {"type": "resume", "sessionId": "3q2-7wJ1kXn0nR9yWmHk5A", "lastSeqPerTopic": {"prices": 1}, "epochs": {"prices": "5e27adbe"}}),
    ("ack", "Record the client's position", {"topic": _TOPIC, "seqNo": _SEQ, "messageId": _MESSAGE_ID}, ["topic"], {"type": "ack", "topic": "prices", "seqNo": 1}),
    ("refresh", "Replace the token (same user)", {"token": {"type": "string", "minLength": 1}}, ["token"], {"type": "refresh", "token": "alice"}),
    ("presence", "Who is subscribed to a topic", {"topic": _TOPIC}, ["topic"], {"type": "presence", "topic": "prices"}),
    ("ping", "Application-level ping", {}, [], {"type": "ping", "id": 4}),
]
SERVER_MESSAGES: list[tuple[str, str, dict, list[str], dict]] = [
    ("ready", "setup succeeded", {"sessionId": {"type": "string"}, "userId": {"type": "string"}, "epoch": {"type": "string"}, "expiresAt": {"type": ["number", "null"], "description": "the token's exp (Unix seconds), null without one"}}, ["sessionId", "userId", "epoch", "expiresAt"], {"type": "ready", "sessionId": "3q2-7wJ1kXn0nR9yWmHk5A", "userId": "alice", "epoch": "9f1c2ab0", "expiresAt": None, "id": 1}),
    ("subscribed", "Subscribed; the next message is seqNo + 1 in the topic's epoch (also sent unasked when the topic's counter starts again)", {"topic": _TOPIC, "seqNo": _SEQ, "epoch": {"type": "string"}}, ["topic", "seqNo", "epoch"], {"type": "subscribed", "topic": "prices", "seqNo": 0, "epoch": "5e27adbe", "id": 2}),
    ("unsubscribed", "Unsubscribed", {"topic": _TOPIC}, ["topic"], {"type": "unsubscribed", "topic": "prices"}),
    ("ack", "Publish accepted or duplicate", {"messageId": _MESSAGE_ID, "status": {"enum": ["ok", "duplicate"]}, "seqNo": _SEQ}, ["messageId", "status", "seqNo"], {"type": "ack", "messageId": "m-1", "status": "ok", "seqNo": 1, "id": 3}),
    ("message", "A published message (kid and sig with signing on: HMAC-SHA256 of the RFC 8785 JSON of [topic, seqNo, messageId, data])", {"topic": _TOPIC, "seqNo": _SEQ, "messageId": _MESSAGE_ID, "data": {}, "kid": {"type": "string"}, "sig": {"type": "string", "description": "base64url, no padding"}}, ["topic", "seqNo", "messageId", "data"], {"type": "message", "topic": "prices", "seqNo": 1, "messageId": "m-1", "data": {"btc": 97000}}),
    ("replayed", "Replay finished", {"topic": _TOPIC, "fromSeq": _SEQ, "toSeq": _SEQ, "epoch": {"type": "string"}}, ["topic", "fromSeq", "toSeq", "epoch"], {"type": "replayed", "topic": "prices", "fromSeq": 1, "toSeq": 1, "epoch": "5e27adbe"}),
    ("resumed", "Resume finished", {"sessionId": {"type": "string"}, "topics": {"type": "array", "items": _TOPIC}, "replayed": _SEQ, "missed": {"type": "array", "items": {"type": "object", "required": ["topic", "fromSeq", "oldestSeq"], "properties": {"topic": _TOPIC, "fromSeq": _SEQ, "oldestSeq": _SEQ}}}, "epochs": {"type": "object", "additionalProperties": {"type": "string"}}}, ["sessionId", "topics", "replayed", "missed", "epochs"], {"type": "resumed", "sessionId": "3q2-7wJ1kXn0nR9yWmHk5A", "topics": ["prices"], "replayed": 0, "missed": [], "epochs": {"prices": "5e27adbe"}}),
    ("refreshed", "Token replaced", {"expiresAt": {"type": ["number", "null"]}}, ["expiresAt"], {"type": "refreshed", "expiresAt": None}),
    ("presence", "Distinct users subscribed", {"topic": _TOPIC, "users": {"type": "array", "items": {"type": "string"}}, "count": _SEQ}, ["topic", "users", "count"], {"type": "presence", "topic": "prices", "users": ["alice"], "count": 1}),
    ("pong", "Answer to ping", {}, [], {"type": "pong", "id": 4}),
    ("error", "The message was refused; the connection stays open", {"code": {"enum": list(ERROR_CODES)}, "message": {"type": "string"}, "field": {"type": "string"}, "topic": {"type": "string"}, "messageId": {"type": "string"}, "oldestSeq": _SEQ, "epoch": {"type": "string"}}, ["code", "message"], {"type": "error", "code": "INVALID_TOPIC", "message": "topic is empty", "field": "topic"}),
]


def configured(node: Any, max_topic_length: int, max_message_id_length: int) -> Any:
    """A copy of a schema tree with the topic and messageId length limits this server runs with."""
    if node is _TOPIC:
        return {**_TOPIC, "maxLength": max_topic_length}
    if node is _MESSAGE_ID:
        return {**_MESSAGE_ID, "maxLength": max_message_id_length}
    if isinstance(node, dict):
        return {k: configured(v, max_topic_length, max_message_id_length) for k, v in node.items()}
    if isinstance(node, list):
        return [configured(v, max_topic_length, max_message_id_length) for v in node]
    return node


def message_schema(kind: str, properties: dict, required: list[str]) -> dict:
    """The JSON Schema of one message type."""
    return {
        "type": "object",
        "properties": {"type": {"const": kind}, "id": {"type": ["string", "number"]}, **properties},
        "required": ["type", *required],
    }


# === 8. Topic store ===============================================================================
#
# topic -> set of clients, plus each client's own set of topics (the reverse index), so that
# dropping a connection costs O(its topics) and a broadcast costs O(that topic's subscribers).
# A topic with no subscriber is removed. The count of (topic, client) pairs is kept, not recounted.


class TopicStore:
    def __init__(self) -> None:
        self.subscribers: dict[str, set] = {}
        self.count = 0

    def subscribe(self, client: Peer, topic: str) -> bool:
        """Add; False if it was already there."""
        if topic in client.topics:
            return False
        client.topics.add(topic)
        subs = self.subscribers.get(topic)
        if subs is None:
            subs = self.subscribers[topic] = set()
        subs.add(client)
        self.count += 1
        return True

    def unsubscribe(self, client: Peer, topic: str) -> bool:
        """Remove; False if it was not there."""
        if topic not in client.topics:
            return False
        client.topics.discard(topic)
        subs = self.subscribers[topic]
        subs.discard(client)
        if not subs:
            del self.subscribers[topic]
        self.count -= 1
        return True

    def remove_client(self, client: Peer) -> list[str]:
        """Drop all of a client's subscriptions; return the topics left without subscribers."""
        emptied = []
        for topic in list(client.topics):
            self.unsubscribe(client, topic)
            if topic not in self.subscribers:
                emptied.append(topic)
        return emptied


# === 9. Dedup =====================================================================================
#
# Invariant I2: an accepted (userId, messageId) is remembered for the window; a repeat gets the
# original seqNo back and is not delivered again. Memory is bounded per user and in total, and the
# oldest entry goes first: one ordered map per user, and one global ordered map that fixes the age
# order across users. Time comes from an injectable clock so tests move it instead of sleeping.


class Dedup:
    def __init__(
        self,
        window: float = DEDUP_WINDOW,
        per_user: int = DEDUP_PER_USER,
        total: int = DEDUP_TOTAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.per_user = per_user
        self.total = total
        self.clock = clock
        self._users: dict[str, collections.OrderedDict] = {}  # user -> {messageId: (seqNo, time)}
        self._order: collections.OrderedDict = collections.OrderedDict()  # (user, messageId) -> time
        # The time of the oldest entry as `_expire` last found it; what was forgotten since can only
        # have made the oldest younger. While it is inside the window, an add has nothing to expire.
        self._oldest = -math.inf

    def __len__(self) -> int:
        return len(self._order)

    def get(self, user: str, message_id: str, now: float | None = None) -> int | None:
        """The seqNo of an accepted publish still inside the window, else None."""
        entries = self._users.get(user)
        if entries is None:
            return None
        entry = entries.get(message_id)
        if entry is None or entry[1] <= (self.clock() if now is None else now) - self.window:
            return None
        return entry[0]

    def add(self, user: str, message_id: str, seq: int, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self._oldest <= now - self.window:
            self._expire(now)
        entries = self._users.get(user)
        if entries is None:
            entries = self._users[user] = collections.OrderedDict()
        key = (user, message_id)
        if message_id in entries:  # an expired entry being replaced: it moves to the young end
            del entries[message_id]
            del self._order[key]
        entries[message_id] = (seq, now)
        self._order[key] = now
        if len(entries) > self.per_user:
            self._forget(user, next(iter(entries)))
        if len(self._order) > self.total:
            self._forget(*next(iter(self._order)))

    def _expire(self, now: float) -> None:
        order = self._order
        horizon = now - self.window
        while order:
            key, added = next(iter(order.items()))
            if added > horizon:
                self._oldest = added
                return
            self._forget(*key)
        self._oldest = -math.inf  # nothing remembered: the next add looks again

    def _forget(self, user: str, message_id: str) -> None:
        entries = self._users[user]
        del entries[message_id]
        del self._order[(user, message_id)]
        if not entries:
            del self._users[user]


# === 10. History and sessions =====================================================================
#
# Each topic keeps its most recent messages for `replay`, bounded by count per topic, by age, and
# by bytes across all topics; the oldest goes first. An entry is (seqNo, time, frame bytes): the
# same frame that was broadcast, so a replay re-sends bytes without encoding anything again.
# A `Session` is what outlives a connection for resume: its user and, per topic, a `Position`.


class History:
    def __init__(
        self,
        max_messages: int = HISTORY_MESSAGES,
        max_age: float = HISTORY_AGE,
        max_bytes: int = HISTORY_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_messages = max_messages
        self.max_age = max_age
        self.max_bytes = max_bytes
        self.clock = clock
        self.bytes = 0
        self.count = 0
        self._topics: dict[str, collections.deque] = {}
        # (topic, seqNo) in arrival order across topics, for the age and byte bounds. Entries that
        # the per-topic bound dropped stay until they reach the front or a compaction removes them.
        self._order: collections.deque = collections.deque()
        # The time of the oldest retained message as `expire` last found it; what was dropped since
        # can only have made the oldest younger. While it is within max_age (and the bytes within
        # theirs), an add has nothing to expire.
        self._oldest = -math.inf

    def add(self, topic: str, seq: int, frame: bytes, now: float | None = None) -> None:
        if self.max_messages <= 0:
            return
        now = self.clock() if now is None else now
        entries = self._topics.get(topic)
        if entries is None:
            entries = self._topics[topic] = collections.deque()
        entries.append((seq, now, frame))
        self._order.append((topic, seq))
        self.bytes += len(frame) + HISTORY_ENTRY_COST  # cost(frame)
        self.count += 1
        if len(entries) > self.max_messages:
            self._drop_oldest(topic)
            if len(self._order) > 2 * self.count + 1024:
                self._compact()
        if self._oldest <= now - self.max_age or self.bytes > self.max_bytes:
            self.expire(now)

    def _compact(self) -> None:
        """Drop the order entries of messages already gone: keeps `_order` within 2x the count."""
        topics = self._topics
        self._order = collections.deque(
            (topic, seq) for topic, seq in self._order if topic in topics and seq >= topics[topic][0][0]
        )

    def expire(self, now: float | None = None) -> None:
        """Drop what is over the age or byte bound, oldest first, across topics."""
        horizon = (self.clock() if now is None else now) - self.max_age
        order = self._order
        while order:
            topic, seq = order[0]
            entries = self._topics.get(topic)
            if not entries or entries[0][0] != seq:
                order.popleft()  # already dropped by the per-topic bound
                continue
            if entries[0][1] > horizon and self.bytes <= self.max_bytes:
                self._oldest = entries[0][1]
                return
            self._drop_oldest(topic)
        self._oldest = -math.inf  # nothing retained: the next add looks again

    @staticmethod
    def cost(frame: bytes) -> int:
        """The memory one retained message takes: its frame and its entries (what max_bytes bounds)."""
        return len(frame) + HISTORY_ENTRY_COST

    def forget(self, topic: str) -> None:
        """Drop everything retained of `topic` (its arrival-order entries go when they reach the front)."""
        entries = self._topics.pop(topic, None)
        if entries:
            self.bytes -= sum(self.cost(frame) for _, _, frame in entries)
            self.count -= len(entries)

    def _drop_oldest(self, topic: str) -> None:
        entries = self._topics[topic]
        seq, _, frame = entries.popleft()
        self.bytes -= len(frame) + HISTORY_ENTRY_COST  # cost(frame)
        self.count -= 1
        if not entries:
            del self._topics[topic]
        order = self._order
        if order[0][1] == seq and order[0][0] == topic:
            order.popleft()  # it was the oldest of all topics too (one topic, or topics in turn)

    def oldest(self, topic: str) -> int | None:
        """The oldest retained seqNo of `topic`, None when nothing is retained."""
        entries = self._topics.get(topic)
        return entries[0][0] if entries else None

    def between(self, topic: str, first: int, last: int | None = None) -> list[bytes]:
        """The retained frames with first <= seqNo <= last (to the newest when last is None), in
        order. Retained seqNos of a topic are consecutive, so this is a slice."""
        entries = self._topics.get(topic)
        if not entries:
            return []
        oldest = entries[0][0]
        start = min(len(entries), max(0, first - oldest))  # clamped: a client may send any integer
        stop = len(entries) if last is None else min(len(entries), max(0, last - oldest + 1))
        return [frame for _, _, frame in itertools.islice(entries, start, stop)]


class Position:
    """A session's place in one topic, in one epoch: the seqNo it started from, the last one
    acknowledged (0: none), and the last one handed to its connection when that went away (None
    while attached, or when what was unsent could not be trusted to have arrived)."""

    __slots__ = ("start", "epoch", "acked", "handed")

    def __init__(self, start: int, epoch: str, acked: int = 0, handed: int | None = None) -> None:
        self.start = start
        self.epoch = epoch
        self.acked = acked
        self.handed = handed

    def last(self) -> int:
        """The last seqNo the session is known to have: acknowledged, else handed, else its start."""
        if self.acked:
            return self.acked
        return self.handed if self.handed is not None else self.start

    def copy(self) -> Position:
        return Position(self.start, self.epoch, self.acked, self.handed)

    def values(self) -> tuple:
        """(start, epoch, acked, handed): what Position(*values) makes again."""
        return (self.start, self.epoch, self.acked, self.handed)


class Session:
    """What outlives a connection for the session TTL: its id, user and positions per topic."""

    __slots__ = ("id", "user_id", "positions")

    def __init__(self, session_id: str, user_id: str, positions: dict[str, Position] | None = None) -> None:
        self.id = session_id
        self.user_id = user_id
        self.positions: dict[str, Position] = positions if positions is not None else {}

    def copy(self) -> Session:
        return Session(self.id, self.user_id, {topic: p.copy() for topic, p in self.positions.items()})


# === 11. Auth, ACL and signing ====================================================================
#
# Who a client is, what it may read and write, and the signature a message carries. Three parts,
# none of them doing I/O or keeping state that changes: the broker (section 12) asks them.
#
# - Tokens. Demo mode (no JWT key configured): any non-empty token is the userId. Otherwise a token
#   is a compact JWS (RFC 7515) holding JWT claims (RFC 7519), verified by `JWTVerifier.verify`
#   into `Claims`, or refused with ClientError AUTH_FAILED and a reason an operator can act on
#   (never the token itself). The order is fixed and it is the security argument: size and shape,
#   header, key selection, signature, and only then the claims. RFC 8725 §2.1 ("Weak Signatures
#   and Insufficient Signature Validation") and §3.1 ("Perform Algorithm Verification") are why
#   the allow-list is two names and an `alg` must fit the type of the key that verifies it.
#   HS256 is HMAC-SHA256 compared in constant time; RS256 is verified in pure Python by building
#   the whole expected EMSA-PKCS1-v1_5 encoding and comparing it, never by parsing what the
#   public-key operation produced (that parsing is where Bleichenbacher-style forgeries live).
# - ACLs (invariant I1). A pattern is an exact topic, a prefix ending in `*`, or `*`; `{sub}`
#   stands for the user's id. `Grants` compiles one connection's patterns (ACL file and token
#   claims together) into a set of exact topics and a tuple of prefixes, so a check is one set
#   lookup and one `str.startswith(tuple)`, done once per request, never per subscriber.
# - Signing (invariant I7). RFC 8785 (JCS) canonical JSON, written here, of
#   `[topic, seqNo, messageId, data]`, HMAC-SHA256 under the first `--sign-key`.
#
# Startup problems (a short secret, a bad JWK Set or ACL file) are ValueError with a message that
# names the offending key or entry; section 16 turns them into an exit with that message.

JWT_ALGORITHMS = ("HS256", "RS256")  # the allow-list, case-sensitive (RFC 7515 §4.1.1)
# Header parameters that name or carry a key (RFC 7515 §4.1.2-§4.1.6): a verifier that used them
# would let the token choose its own key. Their presence refuses the token; nothing is fetched.
_KEY_CARRYING_HEADERS = ("jku", "jwk", "x5u", "x5c")


# --- strict parsing helpers ------------------------------------------------------------------------

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_SURROGATE = re.compile("[\ud800-\udfff]")


def b64url_encode(raw: bytes) -> str:
    """base64url without padding (RFC 7515 §2, "Base64url Encoding")."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """The bytes of `text`, base64url without padding, strictly: only the 64 characters of the
    alphabet, no "=", and only the one encoding of those bytes (RFC 4648 §3.5: the unused bits of
    the last character are zero), so a token has exactly one spelling. Else ValueError."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise ValueError("not base64url (only A-Z a-z 0-9 - _, no padding)")
    if len(text) % 4 == 1:
        raise ValueError("not base64url (a length of 4n+1 characters encodes no bytes)")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(raw) != text:
        raise ValueError("not base64url (the last character has unused bits set: not the canonical encoding)")
    return raw


def _refuse_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is out of range")
    return value


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {_show(key)}")
            seen.add(key)
    return obj


_strict_decode = json.JSONDecoder(
    object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_json_constant, parse_float=_finite_float
).decode


def strict_json_loads(text: str | bytes) -> Any:
    """Parse JSON strictly (RFC 8259 plus I-JSON, RFC 7493): bytes must be UTF-8; duplicate keys,
    NaN/Infinity/-Infinity, numbers that overflow a double and lone surrogates are refused (RFC
    7493 §2.3: "Objects in I-JSON messages MUST NOT have members with duplicate names"; RFC 7515
    §5.2 lets a JWS recipient either refuse duplicates or take the last one, and taking the last
    is how a header says two things to two libraries). Raises ValueError."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not UTF-8") from None
    try:
        value = _strict_decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(e.msg + f" at character {e.pos}") from None
    # A lone surrogate can only come from a \u escape (decoded UTF-8 holds none) or from a str
    # given as such; it could never be sent on as UTF-8.
    if ("\\u" in text or _SURROGATE.search(text)) and _SURROGATE.search(json.dumps(value, ensure_ascii=False)):
        raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff), which is not Unicode text")
    return value


def _show(value: Any, limit: int = 40) -> str:
    """A short repr of a value from outside, for an error message (bounded, control characters escaped)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- keys ------------------------------------------------------------------------------------------


class HS256Key:
    """A symmetric key: it verifies HMAC-SHA256 (`alg` HS256) and nothing else. Its repr never
    shows the secret."""

    __slots__ = ("kid", "_secret")
    alg = "HS256"
    kty = "oct"

    def __init__(self, secret: bytes, kid: str | None = None) -> None:
        if len(secret) < MIN_HMAC_KEY_BYTES:
            raise ValueError(
                f"an HS256 key of {len(secret)} bytes is too short: at least {MIN_HMAC_KEY_BYTES} are needed (RFC 7518 §3.2)"
            )
        self.kid = kid
        self._secret = bytes(secret)

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """True if `signature` is the HMAC-SHA256 of `signing_input` (compared in constant time)."""
        expected = hmac.new(self._secret, signing_input, hashlib.sha256).digest()
        return hmac.compare_digest(expected, signature)

    def __repr__(self) -> str:
        return f"HS256Key(kid={self.kid!r})"


# RFC 8017 §9.2, note 1: the DER encoding of DigestInfo for SHA-256, "30 31 30 0d 06 09 60 86 48 01
# 65 03 04 02 01 05 00 04 20 || H", with the NULL parameters (the form RFC 7518 §3.3 signs with).
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


class RS256Key:
    """An RSA public key (n, e): it verifies RSASSA-PKCS1-v1_5 with SHA-256 (`alg` RS256) and
    nothing else. The modulus is at least MIN_RSA_BITS bits."""

    __slots__ = ("kid", "n", "e", "size", "_prefix")
    alg = "RS256"
    kty = "RSA"

    def __init__(self, n: int, e: int, kid: str | None = None) -> None:
        if n.bit_length() < MIN_RSA_BITS:
            raise ValueError(f"an RSA modulus of {n.bit_length()} bits is too small: at least {MIN_RSA_BITS} are needed (RFC 7518 §3.3)")
        if n % 2 == 0:
            raise ValueError("the RSA modulus is even: not a product of two odd primes")
        # e = 1 would make every EM its own signature; an even e has no inverse mod lcm(p-1, q-1).
        if e < 3 or e % 2 == 0 or e >= n:
            raise ValueError("the RSA public exponent must be odd, at least 3 and below the modulus")
        self.kid = kid
        self.n = n
        self.e = e
        self.size = (n.bit_length() + 7) // 8  # k, the length of the modulus in octets
        # RFC 8017 §9.2 EMSA-PKCS1-V1_5-ENCODE, steps 4-5: PS is k - tLen - 3 octets of 0xff and
        # EM = 0x00 || 0x01 || PS || 0x00 || T, T = DigestInfo || H. All but H is fixed per key.
        t_len = len(_SHA256_DIGEST_INFO) + 32
        self._prefix = b"\x00\x01" + b"\xff" * (self.size - t_len - 3) + b"\x00" + _SHA256_DIGEST_INFO

    def verify(self, signing_input: bytes, signature: bytes) -> bool:
        """RFC 8017 §8.2.2 RSASSA-PKCS1-V1_5-VERIFY((n, e), M, S) with SHA-256."""
        # Step 1: "If the length of the signature S is not k octets, output "invalid signature"".
        if len(signature) != self.size:
            return False
        # Step 2, RSAVP1 (§5.2.2): "If the signature representative s is not between 0 and n - 1,
        # output "signature representative out of range"".
        s = int.from_bytes(signature, "big")
        if s >= self.n:
            return False
        em = pow(s, self.e, self.n).to_bytes(self.size, "big")
        # Steps 3-4: build EM' = EMSA-PKCS1-V1_5-ENCODE(M, k) and compare it with EM whole. The
        # decrypted block is never parsed, so there is no parser to fool (no "garbage after the
        # hash", no short padding, no DigestInfo with extra parameters).
        expected = self._prefix + hashlib.sha256(signing_input).digest()
        return hmac.compare_digest(em, expected)

    def __repr__(self) -> str:
        return f"RS256Key(kid={self.kid!r}, bits={self.n.bit_length()})"


Key = HS256Key | RS256Key  # what load_jwk_set returns and JWTVerifier takes

# RFC 7518 §6.3.2: what makes an RSA JWK a private key. The gateway only verifies.
_RSA_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


def _b64url_uint(value: Any, name: str) -> int:
    """A JWK "Base64urlUInt" member (RFC 7518 §2: "The octet sequence MUST utilize the minimum
    number of octets needed to represent the value")."""
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a base64url string")
    raw = b64url_decode(value)
    if not raw:
        raise ValueError(f"'{name}' is empty")
    if raw[0] == 0:
        raise ValueError(f"'{name}' has a leading zero octet (RFC 7518 §2: minimum number of octets)")
    return int.from_bytes(raw, "big")


def _load_jwk(jwk: Any) -> Key:
    if not isinstance(jwk, dict):
        raise ValueError("is not a JSON object")
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise ValueError("'kid' must be a non-empty string")
    if "use" in jwk and jwk["use"] != "sig":
        raise ValueError(f"'use' is {_show(jwk['use'])}: only signature keys (\"sig\") verify tokens")
    if "key_ops" in jwk:
        ops = jwk["key_ops"]
        if not isinstance(ops, list) or not all(isinstance(op, str) for op in ops) or "verify" not in ops:
            raise ValueError("'key_ops' does not include \"verify\"")
    if kty == "oct":
        alg = "HS256"
    elif kty == "RSA":
        alg = "RS256"
    else:
        raise ValueError(f"'kty' {_show(kty)} is not supported: \"oct\" (HS256) or \"RSA\" (RS256)")
    if "alg" in jwk and jwk["alg"] != alg:
        raise ValueError(f"'alg' {_show(jwk['alg'])} does not fit kty {kty!r}: only {alg!r} is accepted")
    if kty == "oct":
        k = jwk.get("k")
        if not isinstance(k, str):
            raise ValueError("an \"oct\" key needs 'k' (base64url)")
        try:
            secret = b64url_decode(k)
        except ValueError as e:
            raise ValueError(f"'k' is {e}") from None
        return HS256Key(secret, kid)
    private = [name for name in _RSA_PRIVATE_MEMBERS if name in jwk]
    if private:
        raise ValueError(f"holds private RSA members ({', '.join(private)}): give the gateway the public key only (n, e)")
    if "n" not in jwk or "e" not in jwk:
        raise ValueError("an \"RSA\" key needs 'n' and 'e' (base64url)")
    return RS256Key(_b64url_uint(jwk["n"], "n"), _b64url_uint(jwk["e"], "e"), kid)


def load_jwk_set(text: str | bytes) -> list[Key]:
    """The keys of a JWK Set (RFC 7517 §5, `{"keys": [...]}`; --jwt-keys): "oct" keys (`k`) for
    HS256, "RSA" keys (`n`, `e`) for RS256, each with an optional `kid` (distinct) and an optional
    `alg` that must fit its `kty`. A key the gateway cannot use is an error, not skipped, so what
    verifies tokens is exactly what the file says. ValueError names the offending key."""
    try:
        doc = strict_json_loads(text)
    except ValueError as e:
        raise ValueError(f"JWK Set: not JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('JWK Set: expected a JSON object {"keys": [...]}')
    if not doc["keys"]:
        raise ValueError("JWK Set: 'keys' is empty")
    keys: list[Key] = []
    kids: set[str] = set()
    for index, jwk in enumerate(doc["keys"]):
        kid = jwk.get("kid") if isinstance(jwk, dict) else None
        name = f"JWK Set: key {index}" + (f" (kid {_show(kid)})" if isinstance(kid, str) else "")
        try:
            key = _load_jwk(jwk)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if key.kid is not None:
            if key.kid in kids:
                raise ValueError(f"{name}: the kid is used by an earlier key; a kid must select one key")
            kids.add(key.kid)
        keys.append(key)
    return keys


def jwt_secret_key(secret: str) -> HS256Key:
    """The HS256 key of --jwt-secret: the UTF-8 bytes of `secret`, at least 32 of them. ValueError."""
    try:
        raw = secret.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("--jwt-secret is not valid text (it holds a lone surrogate)") from None
    if len(raw) < MIN_HMAC_KEY_BYTES:
        raise ValueError(
            f"--jwt-secret is {len(raw)} bytes; at least {MIN_HMAC_KEY_BYTES} are needed (RFC 7518 §3.2), "
            f"e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return HS256Key(raw)


# --- tokens ----------------------------------------------------------------------------------------


class Claims(NamedTuple):
    """What a verified token says. `exp` is the number as the token wrote it (an int stays an
    int, so `ready.expiresAt` echoes it), None without `exp`; `read`/`write` are the topic
    patterns of those claims, None when the claim is absent (an empty list is a tuple: it grants
    nothing, but it is an ACL source)."""

    sub: str
    exp: float | None = None
    read: tuple[str, ...] | None = None
    write: tuple[str, ...] | None = None


def _refuse(reason: str) -> ClientError:
    return ClientError("AUTH_FAILED", reason, field="token")


def authenticate(token: Any) -> str:
    """Demo auth: the userId for `token`, or ClientError AUTH_FAILED."""
    if not isinstance(token, str) or not token:
        raise ClientError("AUTH_FAILED", "a non-empty string 'token' is required", field="token")
    if len(token) > 4096:
        raise ClientError("AUTH_FAILED", "token is over 4096 characters", field="token")
    return token


class DemoVerifier:
    """Demo mode (no JWT key configured): any non-empty token is the userId, with no expiry and
    no claims. The same `verify` as JWTVerifier, so the broker holds one verifier either way."""

    demo = True

    def verify(self, token: Any) -> Claims:
        return Claims(authenticate(token))


class JWTVerifier:
    """Verifies compact JWS tokens (RFC 7515) with HS256 or RS256 and checks their JWT claims
    (RFC 7519). `verify(token)` returns Claims or raises ClientError AUTH_FAILED (field "token")
    with the reason. `clock` is Unix time (exp, nbf and iat are), injectable for tests.

    Key selection: a token with `kid` is verified by the configured key of that kid only (an
    unknown kid is refused even if another key would verify). A token without `kid` is tried
    against every configured key of the type its `alg` names, so one key, or a rotation without
    kids, works; keys of the other type are never tried."""

    demo = False

    def __init__(
        self,
        keys: Iterable[Key],
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = JWT_LEEWAY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = list(keys)
        if not self.keys:
            raise ValueError("JWT verification needs at least one key")
        if not (isinstance(leeway, (int, float)) and math.isfinite(leeway) and leeway >= 0):
            raise ValueError("--jwt-leeway must be a finite number of seconds, 0 or more")
        for name, value in (("--jwt-audience", audience), ("--jwt-issuer", issuer)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        self.audience = audience
        self.issuer = issuer
        self.leeway = float(leeway)
        self.clock = clock
        self._by_kid: dict[str, Key] = {}
        self._by_alg: dict[str, list[Key]] = {alg: [] for alg in JWT_ALGORITHMS}
        for key in self.keys:
            if key.kid is not None:
                if key.kid in self._by_kid:
                    raise ValueError(f"two keys have the kid {key.kid!r}; a kid must select one key")
                self._by_kid[key.kid] = key
            self._by_alg[key.alg].append(key)

    def verify(self, token: Any) -> Claims:
        """Claims of a valid token, else ClientError AUTH_FAILED with the reason."""
        return self.check_claims(self.decode(token))

    def decode(self, token: Any) -> dict:
        """The payload of a token whose header and signature are valid; no claim is looked at."""
        if not isinstance(token, str):
            raise _refuse("'token' must be a string")
        if not token:
            raise _refuse("'token' is empty")
        if len(token) > MAX_TOKEN_SIZE:
            raise _refuse(f"token is {len(token)} characters, over the {MAX_TOKEN_SIZE}-byte limit")
        if not token.isascii():
            raise _refuse("token holds characters that are neither base64url nor '.'")
        parts = token.split(".")
        if len(parts) != 3:
            if len(parts) == 5:
                raise _refuse("token has 5 parts: an encrypted token (JWE) is not accepted, only a signed one (JWS)")
            raise _refuse(f"token has {len(parts)} part(s): a JWS has three, header.payload.signature")
        header_b64, payload_b64, signature_b64 = parts

        # RFC 7515 §5.2 steps 2-4: the header is base64url of UTF-8 of a JSON object.
        try:
            header = strict_json_loads(b64url_decode(header_b64))
        except ValueError as e:
            raise _refuse(f"header is malformed: {e}") from None
        if not isinstance(header, dict):
            raise _refuse("header is not a JSON object")

        # RFC 8725 §3.1: "Libraries MUST enable the caller to specify a supported set of
        # algorithms and MUST NOT use any other algorithms when performing cryptographic operations."
        if "alg" not in header:
            raise _refuse("header has no 'alg'")
        alg = header["alg"]
        if alg == "none":
            raise _refuse("alg 'none' (an unsecured token) is refused")
        if alg not in JWT_ALGORITHMS:  # `in` on a tuple of str: a non-str alg never matches
            raise _refuse(f"alg {_show(alg)} is not allowed: only 'HS256' and 'RS256' (case-sensitive)")
        # RFC 7515 §4.1.11: "If any of the listed extension Header Parameters are not understood
        # and supported by the recipient, then the JWS is invalid." None is supported here.
        if "crit" in header:
            raise _refuse("header has 'crit': no JWS extension is supported (RFC 7515 §4.1.11)")
        for name in _KEY_CARRYING_HEADERS:
            if name in header:
                raise _refuse(f"header has '{name}': a token cannot name or carry its key; only configured keys verify")

        if "kid" in header:
            kid = header["kid"]
            if not isinstance(kid, str):
                raise _refuse("header 'kid' is not a string")
            key = self._by_kid.get(kid)
            if key is None:
                raise _refuse(f"kid {_show(kid)} is not a configured key")
            # RFC 8725 §3.1: "each key MUST be used with exactly one algorithm, and this MUST be
            # checked when the cryptographic operation is performed" (the RS256/HS256 confusion).
            if key.alg != alg:
                raise _refuse(f"alg {alg} does not fit key {_show(kid)}, an {key.kty} key ({key.alg} only)")
            candidates = [key]
            which = f"key {_show(kid)}"
        else:
            candidates = self._by_alg[alg]
            if not candidates:
                kty = "oct" if alg == "HS256" else "RSA"
                raise _refuse(f"alg {alg} but no {kty} key is configured ({alg} cannot be verified)")
            which = f"the configured {alg} key" + ("s" if len(candidates) > 1 else "")

        try:
            signature = b64url_decode(signature_b64)
        except ValueError as e:
            raise _refuse(f"signature is malformed: {e}") from None
        try:
            payload_bytes = b64url_decode(payload_b64)
        except ValueError as e:
            raise _refuse(f"payload is malformed: {e}") from None
        # RFC 7515 §5.2 step 8: the signature is over ASCII(header "." payload), as sent.
        signing_input = (header_b64 + "." + payload_b64).encode("ascii")
        if not any(key.verify(signing_input, signature) for key in candidates):
            raise _refuse(f"signature does not verify with {which}")

        # Only now is the payload read: whatever it says, a trusted key signed it.
        try:
            payload = strict_json_loads(payload_bytes)
        except ValueError as e:
            raise _refuse(f"payload is malformed: {e}") from None
        if not isinstance(payload, dict):
            raise _refuse("claims are not a JSON object")
        return payload

    def check_claims(self, payload: dict) -> Claims:
        """Claims from a signature-checked payload (RFC 7519 §4.1), else AUTH_FAILED."""
        now = self.clock()
        leeway = self.leeway
        # RFC 7519 §4.1.4: "the current date/time MUST be before the expiration date/time".
        exp = _numeric_date(payload, "exp")
        if exp is not None and float(exp) + leeway <= now:
            raise _refuse(f"token expired: exp {exp} is past (now {now:.0f}, leeway {leeway:g} s)")
        # RFC 7519 §4.1.5: "the current date/time MUST be after or equal to the not-before date/time".
        nbf = _numeric_date(payload, "nbf")
        if nbf is not None and float(nbf) - leeway > now:
            raise _refuse(f"token not valid yet: nbf {nbf} (now {now:.0f}, leeway {leeway:g} s)")
        # RFC 7519 §4.1.6 only says when the token was issued; one issued in the future (past the
        # leeway) is a clock or a forgery problem, and SPEC 1.1 refuses it.
        iat = _numeric_date(payload, "iat")
        if iat is not None and float(iat) - leeway > now:
            raise _refuse(f"token issued in the future: iat {iat} (now {now:.0f}, leeway {leeway:g} s)")
        # The configured issuer and audience are not echoed: the client learns only that its own
        # value does not match.
        if self.issuer is not None:
            if "iss" not in payload:
                raise _refuse("token has no 'iss'; this server requires one")
            iss = payload["iss"]
            if iss != self.issuer:
                raise _refuse(f"'iss' {_show(iss)} is not this server's issuer")
        if self.audience is not None:
            # RFC 7519 §4.1.3: "each principal intended to process the JWT MUST identify itself
            # with a value in the audience claim"; "aud" is one string or an array of strings.
            if "aud" not in payload:
                raise _refuse("token has no 'aud'; this server requires one")
            aud = payload["aud"]
            audiences = [aud] if isinstance(aud, str) else aud
            if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
                raise _refuse("'aud' is neither a string nor a list of strings")
            if self.audience not in audiences:
                raise _refuse(f"'aud' {_show(aud)} does not name this server's audience")
        if "sub" not in payload:
            raise _refuse("token has no 'sub' (the user id)")
        sub = payload["sub"]
        if not isinstance(sub, str):
            raise _refuse("'sub' is not a string")
        if not sub:
            raise _refuse("'sub' is empty")
        return Claims(sub, exp, _pattern_claim(payload, "read"), _pattern_claim(payload, "write"))


def _numeric_date(payload: dict, name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2: "A JSON numeric value"), None when absent. Booleans
    (an int in Python), strings and null are refused, so are values that are not finite."""
    if name not in payload:
        return None
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refuse(f"'{name}' is not a number (a NumericDate: seconds since 1970)")
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an int beyond the range of a double
        finite = False
    if not finite:
        raise _refuse(f"'{name}' is not a finite number")
    return value


def _pattern_claim(payload: dict, name: str) -> tuple[str, ...] | None:
    """The `read` or `write` claim: None when absent, else a list of topic patterns."""
    if name not in payload:
        return None
    value = payload[name]
    if not isinstance(value, list):
        raise _refuse(f"'{name}' is not a list of topic patterns")
    for index, pattern in enumerate(value):
        try:
            parse_pattern(pattern)
        except ValueError as e:
            raise _refuse(f"'{name}'[{index}] {e}") from None
    return tuple(value)


def build_verifier(
    jwt_secret: str | None = None,
    jwt_keys: str | bytes | None = None,
    audience: str | None = None,
    issuer: str | None = None,
    leeway: float = JWT_LEEWAY,
    clock: Callable[[], float] = time.time,
) -> JWTVerifier | DemoVerifier:
    """The verifier for the configuration: demo without a key, else JWT with the --jwt-secret key
    (no kid) and the keys of the --jwt-keys text, both when both are given. ValueError."""
    keys: list[Key] = []
    if jwt_secret is not None:
        keys.append(jwt_secret_key(jwt_secret))
    if jwt_keys is not None:
        keys.extend(load_jwk_set(jwt_keys))
    if not keys:
        if audience is not None or issuer is not None:
            raise ValueError("--jwt-audience and --jwt-issuer need a JWT key (--jwt-secret or --jwt-keys)")
        return DemoVerifier()
    return JWTVerifier(keys, audience, issuer, leeway, clock)


# --- ACL -------------------------------------------------------------------------------------------

SUB_PLACEHOLDER = "{sub}"
# A pattern with whitespace or a control character could never match a topic (section 7 refuses
# such topics): it is a typo, refused where it is written.
_BAD_PATTERN_CHAR = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


class Pattern(NamedTuple):
    """A parsed topic pattern: `text` is the exact topic, or the prefix without its `*`; it may
    hold `{sub}`, replaced by the user's id when a connection's grants are compiled."""

    text: str
    prefix: bool


def parse_pattern(pattern: Any) -> Pattern:
    """An exact topic, a prefix ending in `*` (`prices.*`, `prices*`), or `*` (everything).
    Else ValueError. The `*` is decided here, before `{sub}` is replaced: a user id holding a
    `*` is matched literally, never as a wildcard."""
    if not isinstance(pattern, str):
        raise ValueError("is not a string")
    if not pattern:
        raise ValueError("is empty")
    prefix = pattern.endswith("*")
    text = pattern[:-1] if prefix else pattern
    if "*" in text:
        raise ValueError(f"{_show(pattern)}: '*' is allowed only as the last character")
    if _BAD_PATTERN_CHAR.search(pattern):
        raise ValueError(f"{_show(pattern)} holds whitespace or a control character (never in a topic)")
    return Pattern(text, prefix)


class Acl:
    """The ACL file: per userId (or "*", everyone), the read and write patterns."""

    __slots__ = ("_entries",)

    def __init__(self, entries: dict[str, tuple[tuple[Pattern, ...], tuple[Pattern, ...]]]) -> None:
        self._entries = entries

    def patterns(self, user_id: str) -> tuple[list[Pattern], list[Pattern]]:
        """(read, write) patterns that apply to `user_id`: its own entry and the "*" entry."""
        read: list[Pattern] = []
        write: list[Pattern] = []
        for name in (user_id, "*") if user_id != "*" else ("*",):
            entry = self._entries.get(name)
            if entry is not None:
                read.extend(entry[0])
                write.extend(entry[1])
        return read, write

    def __len__(self) -> int:
        return len(self._entries)

    def shared_by(self, user_id: str) -> bool:
        """True when `user_id`'s grants are everyone's: no entry of its own, and no `{sub}` in the
        "*" entry (so one compiled Grants can serve every such user)."""
        if user_id in self._entries and user_id != "*":
            return False
        entry = self._entries.get("*")
        return entry is None or not any(SUB_PLACEHOLDER in p.text for patterns in entry for p in patterns)


def load_acl(text: str | bytes) -> Acl:
    """Parse the ACL file (--acl): a JSON object mapping a userId, or "*" for everyone, to
    `{"read": [patterns], "write": [patterns]}` (either list may be left out: it grants nothing).
    Strict: duplicate keys and unknown members (a "reads" typo) are errors. ValueError names
    the entry."""
    try:
        doc = strict_json_loads(text)
    except ValueError as e:
        raise ValueError(f"ACL file: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError('ACL file: expected a JSON object {"userId or *": {"read": [...], "write": [...]}}')
    entries: dict[str, tuple[tuple[Pattern, ...], tuple[Pattern, ...]]] = {}
    for user_id, entry in doc.items():
        name = f"ACL file: {_show(user_id)}"
        if not user_id:
            raise ValueError(f"{name}: an empty userId matches no one")
        if not isinstance(entry, dict):
            raise ValueError(f'{name}: expected {{"read": [...], "write": [...]}}')
        unknown = sorted(set(entry) - {"read", "write"})
        if unknown:
            raise ValueError(f"{name}: unknown member {_show(unknown[0])} (only 'read' and 'write')")
        lists = []
        for action in ("read", "write"):
            patterns = entry.get(action, [])
            if not isinstance(patterns, list):
                raise ValueError(f"{name}.{action}: expected a list of topic patterns")
            parsed = []
            for index, pattern in enumerate(patterns):
                try:
                    parsed.append(parse_pattern(pattern))
                except ValueError as e:
                    raise ValueError(f"{name}.{action}[{index}] {e}") from None
            lists.append(tuple(parsed))
        entries[user_id] = (lists[0], lists[1])
    return Acl(entries)


class _Rule:
    """One action's compiled patterns: everything, or a set of exact topics and, per prefix length,
    the set of prefixes of that length. A check is one set lookup per distinct prefix length no
    longer than the topic (a handful in practice, at most the topic length), however many
    patterns there are; compiling is linear in them."""

    __slots__ = ("everything", "exact", "prefixes")

    def __init__(self, patterns: Iterable[Pattern], user_id: str) -> None:
        exact: set[str] = set()
        by_length: dict[int, set[str]] = {}
        for pattern in patterns:
            # str.replace is one pass over the pattern: a `*` or a "{sub}" inside the user id stays
            # as it is, and it cannot turn an exact pattern into a prefix (that was decided above).
            text = pattern.text.replace(SUB_PLACEHOLDER, user_id)
            if pattern.prefix:
                by_length.setdefault(len(text), set()).add(text)
            else:
                exact.add(text)
        self.everything = 0 in by_length
        self.exact = frozenset(exact)
        self.prefixes = tuple((length, frozenset(texts)) for length, texts in sorted(by_length.items()))

    def allows(self, topic: str) -> bool:
        if self.everything or topic in self.exact:
            return True
        size = len(topic)
        for length, texts in self.prefixes:
            if length > size:
                return False
            if topic[:length] in texts:
                return True
        return False


class Grants:
    """What one connection may read and write: built once per setup or refresh from the ACL file
    (the user's entry and "*") and the token's `read`/`write` claims, which add up.

    The rule for "an ACL source exists" is per connection: it is restricted when the server has an
    ACL file, or its token carries a `read` or a `write` claim (even an empty list). Restricted,
    anything not granted is denied, both actions: a token that lists only `read` patterns can
    publish nowhere. Unrestricted (no file, no such claim: plain auth), everything is allowed."""

    __slots__ = ("user_id", "restricted", "_read", "_write")

    def __init__(self, acl: Acl | None, user_id: str, claims: Claims | None = None) -> None:
        read: list[Pattern] = []
        write: list[Pattern] = []
        restricted = acl is not None
        if acl is not None:
            read, write = acl.patterns(user_id)
        if claims is not None:
            if claims.read is not None:
                restricted = True
                read.extend(parse_pattern(p) for p in claims.read)
            if claims.write is not None:
                restricted = True
                write.extend(parse_pattern(p) for p in claims.write)
        self.user_id = user_id
        self.restricted = restricted
        self._read = _Rule(read, user_id)
        self._write = _Rule(write, user_id)

    def can_read(self, topic: str) -> bool:
        """May subscribe to, replay, resume and ask presence of `topic`."""
        return not self.restricted or self._read.allows(topic)

    def can_write(self, topic: str) -> bool:
        """May publish to `topic`."""
        return not self.restricted or self._write.allows(topic)

    def __repr__(self) -> str:
        return f"Grants(user_id={self.user_id!r}, restricted={self.restricted})"


# --- signing: RFC 8785 canonical JSON and HMAC-SHA256 ---------------------------------------------


def _not_ijson(why: str) -> ClientError:
    return ClientError("INVALID_MESSAGE", f"payload cannot be signed: {why}", field="payload")


def es_number(value: float) -> str:
    """A double as ECMAScript's Number.prototype.toString writes it (ECMA-262 Number::toString,
    which RFC 8785 §3.2.2.3 adopts): shortest round-trip digits, plain notation for exponents
    -7 < e < 21, else `d.ddde+N` / `d.ddde-N`; -0 is "0". NaN and infinities are not I-JSON."""
    if not math.isfinite(value):
        raise _not_ijson(f"{value!r} is not a finite number (RFC 8785 §3.2.2.3)")
    if value == 0:
        return "0"  # "If m is +0 or -0, return the String "0"."
    integral = value.is_integer()
    if integral and -MAX_JSON_INTEGER <= value <= MAX_JSON_INTEGER:
        return str(int(value))  # every digit exact; no shorter spelling reads back as this double
    if not integral and 1e-4 <= abs(value) < 1e16:
        # The common case: Python's repr writes these positionally with the same shortest digits,
        # exactly as ECMAScript does (the two differ only in where they switch to exponents).
        return repr(value)
    sign = "-" if value < 0 else ""
    # repr is the shortest string that reads back as the same double (David Gay's algorithm, as
    # ECMA-262 asks: "k is as small as possible"). Take its digits s and the n of s × 10^(n-k).
    mantissa, _, exponent = repr(abs(value)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    n = len(whole) + (int(exponent) if exponent else 0)
    stripped = digits.lstrip("0")
    n -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:  # an integer: the digits, then n - k zeros
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:  # the decimal point inside the digits
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:  # "0." then -n zeros, then the digits
        return sign + "0." + "0" * -n + digits
    e = n - 1
    exponent = ("+" if e >= 0 else "-") + str(abs(e))
    if k == 1:
        return sign + digits + "e" + exponent
    return sign + digits[0] + "." + digits[1:] + "e" + exponent


# RFC 8785 §3.2.2.2: JSON.stringify's string rules. The two-character escapes for \b \t \n \f \r "
# and \\, "\u00XX" with lowercase hex for the other controls below U+0020, and every other
# character (DEL, non-ASCII, U+2028) as itself, to be sent as UTF-8.
_JCS_ESCAPE = re.compile(r'[\x00-\x1f"\\]')
_JCS_ESCAPES = {chr(c): f"\\u{c:04x}" for c in range(0x20)}
_JCS_ESCAPES.update({"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"})


def _jcs_string(text: str) -> str:
    if text.isascii() and not _JCS_ESCAPE.search(text):
        return '"' + text + '"'  # the common case: nothing to escape, no surrogate possible
    if _SURROGATE.search(text):  # RFC 7493 §2.1: I-JSON strings are Unicode text, no lone surrogates
        raise _not_ijson("a string holds a lone surrogate (\\ud800-\\udfff), which is not I-JSON")
    return '"' + _JCS_ESCAPE.sub(lambda m: _JCS_ESCAPES[m.group()], text) + '"'


def _utf16_units(key: str) -> bytes:
    # RFC 8785 §3.2.3: "property name strings to be sorted ... as arrays of UTF-16 code units";
    # big-endian bytes compare in the same order as the units they spell.
    return key.encode("utf-16-be", "surrogatepass")


def _jcs(value: Any, out: Callable[[str], Any]) -> None:
    if value is None:
        out("null")
    elif value is True:
        out("true")
    elif value is False:
        out("false")
    elif isinstance(value, str):
        out(_jcs_string(value))
    elif isinstance(value, int):
        if not -MAX_JSON_INTEGER <= value <= MAX_JSON_INTEGER:
            raise _not_ijson("an integer beyond ±2^53 is not I-JSON (RFC 7493 §2.2)")
        out(int.__repr__(value))  # exact: a double holds every integer up to 2^53
    elif isinstance(value, float):
        out(es_number(value))
    elif isinstance(value, (list, tuple)):
        out("[")
        for index, item in enumerate(value):
            if index:
                out(",")
            _jcs(item, out)
        out("]")
    elif isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise _not_ijson(f"an object key is a {type(key).__name__}, not a string")
        out("{")
        # UTF-16 order is code point order unless a key holds a character past U+D7FF.
        order = sorted(value) if all(map(str.isascii, value)) else sorted(value, key=_utf16_units)
        for index, key in enumerate(order):
            if index:
                out(",")
            out(_jcs_string(key))
            out(":")
            _jcs(value[key], out)
        out("}")
    else:
        raise _not_ijson(f"a {type(value).__name__} is not JSON")


def canonical_json(value: Any) -> str:
    """RFC 8785 (JCS) canonical JSON of `value` (None, bool, int, float, str, list, tuple, dict
    with str keys): no whitespace, object members sorted by the UTF-16 code units of their names,
    ECMAScript numbers and strings. What is not I-JSON raises ClientError INVALID_MESSAGE (field
    "payload"): integers beyond ±2^53, non-finite floats, lone surrogates, other types."""
    parts: list[str] = []
    try:
        _jcs(value, parts.append)
    except RecursionError:
        raise _not_ijson("it is nested too deeply") from None
    return "".join(parts)


def _message_mac(key: bytes, topic: str, seq_no: int, message_id: str, data: Any) -> bytes:
    text = canonical_json([topic, seq_no, message_id, data])
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def sign_message(key: bytes, topic: str, seq_no: int, message_id: str, data: Any) -> str:
    """`sig` of a message (SPEC 1.1 "Signing"): base64url without padding of HMAC-SHA256, under
    `key`, of the UTF-8 bytes of the RFC 8785 canonical JSON of [topic, seqNo, messageId, data].
    A `data` that is not I-JSON raises ClientError INVALID_MESSAGE (field "payload")."""
    return b64url_encode(_message_mac(key, topic, seq_no, message_id, data))


def verify_message(key: bytes, topic: str, seq_no: int, message_id: str, data: Any, sig: Any) -> bool:
    """True if `sig` is the signature of the message under `key` (compared in constant time). A
    `sig` that is not a string, or a `data` that could never have been signed, is False."""
    if not isinstance(sig, str):
        return False
    try:
        expected = sign_message(key, topic, seq_no, message_id, data)
    except ClientError:
        return False
    return hmac.compare_digest(expected.encode("ascii"), sig.encode("utf-8", "replace"))


class SigningKeys:
    """The message-signing keys (--sign-key KID=SECRET, repeatable): the first signs, every one
    verifies, so a key can be rotated in (first) while subscribers still hold the old one. The
    repr shows the kids only."""

    __slots__ = ("kid", "_keys")

    def __init__(self, keys: Iterable[tuple[str, bytes]]) -> None:
        self._keys: dict[str, bytes] = {}
        for kid, secret in keys:
            if not isinstance(kid, str) or not kid or _BAD_PATTERN_CHAR.search(kid):
                raise ValueError(f"--sign-key: the kid {_show(kid)} must be non-empty, without whitespace or control characters")
            if kid in self._keys:
                raise ValueError(f"--sign-key: the kid {kid!r} is given twice")
            if len(secret) < MIN_HMAC_KEY_BYTES:
                raise ValueError(
                    f"--sign-key {kid}: the secret is {len(secret)} bytes; at least {MIN_HMAC_KEY_BYTES} are needed (HMAC-SHA256, RFC 7518 §3.2)"
                )
            self._keys[kid] = bytes(secret)
        if not self._keys:
            raise ValueError("--sign-key: no key given")
        self.kid = next(iter(self._keys))  # the signing key's id

    @classmethod
    def parse(cls, specs: Iterable[str]) -> SigningKeys:
        """From `KID=SECRET` strings; SECRET is the UTF-8 bytes after the first "=". ValueError."""
        keys = []
        for spec in specs:
            kid, sep, secret = spec.partition("=")
            if not sep:
                raise ValueError("--sign-key: expected KID=SECRET (no '=' found)")  # not echoed: it may be a secret
            try:
                keys.append((kid, secret.encode("utf-8")))
            except UnicodeEncodeError:
                raise ValueError(f"--sign-key {_show(kid)}: the secret is not valid text") from None
        return cls(keys)

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def sign(self, topic: str, seq_no: int, message_id: str, data: Any) -> tuple[str, str]:
        """(kid, sig) of a message under the signing key; ClientError INVALID_MESSAGE if `data` is not I-JSON."""
        return self.kid, sign_message(self._keys[self.kid], topic, seq_no, message_id, data)

    def verify(self, kid: Any, sig: Any, topic: str, seq_no: int, message_id: str, data: Any) -> bool:
        """True if `sig` verifies under the known key `kid` (an unknown kid is False)."""
        key = self._keys.get(kid) if isinstance(kid, str) else None
        return key is not None and verify_message(key, topic, seq_no, message_id, data, sig)

    def __repr__(self) -> str:
        return f"SigningKeys(kids={self.kids!r})"


def sign_canonical(signing: SigningKeys, topic: str, seq_no: int, message_id: str, data: bytes) -> tuple[str, str]:
    """(kid, sig) of a message whose `data` is already canonical JSON (the broker made it so):
    the canonical array is its elements' canonical forms joined by commas, so the payload is not
    canonicalised again per message."""
    text = b"".join((b"[", canonical_json(topic).encode(), b",", str(seq_no).encode(), b",", canonical_json(message_id).encode(), b",", data, b"]"))
    return signing.kid, b64url_encode(hmac.new(signing._keys[signing.kid], text, hashlib.sha256).digest())


# --- the server's auth, from its Config -----------------------------------------------------------

AUTH_ENTRY_POINTS = ("setup", "refresh", "http")  # where a token is presented (refusals are counted by it)


def demo_auth(config: Config) -> bool:
    """True when no JWT key is configured: any non-empty token is the userId."""
    return not (config.jwt_secret or config.jwt_keys)


def demo_publish(config: Config) -> bool:
    """GET /demo/publish publishes without a token: on with demo auth, off with JWT, unless --demo/--no-demo say."""
    return demo_auth(config) if config.demo is None else config.demo


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None


class Auth:
    """One server's auth: its token verifier, ACL file and signing keys, built from its Config
    (ValueError, with the words the command line prints, for a bad key, file or leeway).
    `wall` is Unix time, which `exp`, `nbf` and `iat` are in; tests replace it."""

    def __init__(self, config: Config, wall: Callable[[], float] = time.time) -> None:
        self.wall = wall
        self.leeway = float(config.jwt_leeway)
        keys = _read_file(config.jwt_keys, "JWK Set (--jwt-keys)") if config.jwt_keys else None
        self.verifier = build_verifier(config.jwt_secret, keys, config.jwt_audience, config.jwt_issuer, config.jwt_leeway, lambda: self.wall())
        self.demo = self.verifier.demo
        self.acl = load_acl(_read_file(config.acl, "ACL file (--acl)")) if config.acl else None
        self.signing = SigningKeys.parse(config.sign_keys) if config.sign_keys else None
        self.refusals: collections.Counter = collections.Counter()  # by entry point
        self._everyone: Grants | None = None  # the ACL file's grants of any user without an entry of its own

    def verify(self, token: Any) -> Claims:
        """The token's Claims, or ClientError AUTH_FAILED with the reason."""
        return self.verifier.verify(token)

    def grants(self, user_id: str, claims: Claims | None = None) -> Grants | None:
        """What `user_id` may read and write, or None when no ACL source applies (everything)."""
        plain = claims is None or (claims.read is None and claims.write is None)
        if self.acl is None and plain:
            return None
        if plain and self.acl.shared_by(user_id):
            # Most users of a large deployment: one compiled object for all of them, not one each.
            if self._everyone is None:
                self._everyone = Grants(self.acl, "*")  # the "*" entry alone: no {sub} in it to fill
            return self._everyone
        return Grants(self.acl, user_id, claims)

    def refused(self, where: str, reason: str) -> None:
        """Count a refused token and log why (never the token), so an operator can see it."""
        self.refusals[where] += 1
        log.info("refused a token (%s): %s", where, reason)

    def sign(self, topic: str, seq_no: int, message_id: str, data: bytes) -> tuple[str, str]:
        return sign_canonical(self.signing, topic, seq_no, message_id, data)


# === 12. Broker ===================================================================================
#
# The application core: it holds this process's connections, what each one subscribed to, one
# `Feed` per topic this process receives, rate limits and the counters behind /stats and /metrics.
# It never awaits and never touches a socket. The shared state (seqNo counters and epochs, dedup,
# history, sessions, presence) lives behind a `Backbone` (section 13): one process's memory, or
# Redis for several processes.
#
# Theory of operation. The broker asks, the backbone answers later: every request that needs an
# answer carries a completion (`done`), which the in-memory backbone calls at once and Redis calls
# when its reply arrives; a result that is an error arrives as a `ClientError` value. What the
# backbone says was published comes back through one delivery path, `Broker.deliver`, for the
# publisher's own process too. Three rules keep that exact:
#
# - Order per connection. A request that waits for an answer reserves a `Slot` in the
#   connection's outgoing stream; anything for that connection after it (later replies, live
#   messages) waits behind the slot until it is filled. So replies keep the order of requests,
#   and a publish's `ack` (its slot was reserved before the backbone even saw the publish) comes
#   before the publisher's own copy of the message, whichever backbone answers first.
# - Join live first. A topic's `Feed` asks the backbone to `join` (start delivering) and only
#   then learns the topic's position; deliveries that arrive before the position are buffered, and
#   those at or below it dropped. `subscribed.seqNo` is that position, so the first message after
#   it is seqNo + 1, never one already counted. A gap in seqNos is filled from history before
#   anything later is delivered.
# - Resume is a barrier. It starts once every earlier request of its connection is answered, and
#   later ones wait (the connection stops reading) until it is: attach live, learn each topic's
#   position, read the gap from history, then send the gap and `resumed` in one slot, ahead of
#   every live message that arrived meanwhile. Nothing lost, nothing twice, nothing reordered.
#
# A broadcast is framed once (by the backbone, which also keeps those bytes in history) and the
# same bytes are appended to every subscriber's outbox; a client whose outbox goes from empty to
# non-empty goes on the `dirty` list, and `wake()` tells the I/O layer once per batch to flush.

ACK_TIMES = 1024  # publish times kept per received topic, for the publish -> ack latency figures


class PublishResult(NamedTuple):
    status: str  # "ok" or "duplicate"
    message_id: str
    seq_no: int
    subscribers: int  # connections subscribed to the topic when it was accepted (0 for a duplicate)


class TopicPosition(NamedTuple):
    """Where a topic stands: its epoch and its latest seqNo (0 before the first publish)."""

    epoch: str
    seq: int


class HistoryRange(NamedTuple):
    """An answer to a history read: the topic's epoch, its oldest retained seqNo (None: nothing
    retained), its latest seqNo, and the retained frames asked for, consecutive and in order."""

    epoch: str
    oldest: int | None
    last: int
    frames: list[bytes]


class Backbone(Protocol):
    """The state several processes share. Methods with `done` answer through it, at once or
    later, with the result or a ClientError (BACKBONE_UNAVAILABLE); the others are writes whose
    order the backbone keeps. Deliveries go to the broker bound with `bind`."""

    epoch: str  # the sequence space as a whole: one process start, or one Redis deployment
    # True only if publish() always calls done() before it returns and before it delivers the
    # message: the broker then sends the ack as it comes instead of reserving its place first.
    answers_at_once: bool = False

    def bind(self, broker: Broker) -> None:
        """Deliver what is published to `broker.deliver`, take-overs to `broker.take_over`."""

    def publish(self, user_id: str, topic: str, message_id: str, data: bytes, now: float, done: Callable) -> None:
        """Dedup, sequence, keep in history and deliver one message (`data`: the payload as
        UTF-8 JSON); done(PublishResult)."""

    def join(self, topic: str, done: Callable) -> None:
        """Start delivering `topic` to this process, then done(TopicPosition) read after joining."""

    def leave(self, topic: str) -> None:
        """Stop delivering `topic` to this process."""

    def history(self, topic: str, first: int, last: int | None, done: Callable) -> None:
        """done(HistoryRange) with the retained frames first..last (None: to the newest)."""

    def create_session(self, session_id: str, user_id: str, holder: Any, now: float, done: Callable) -> None:
        """Store a new session attached to `holder` (a connection); done(None)."""

    def get_session(self, session_id: str, done: Callable) -> None:
        """done(Session) with a copy of the session, or done(None) if unknown or expired."""

    def claim_session(self, session_id: str, holder: Any, done: Callable) -> None:
        """Attach the session to `holder`; the connection that held it is taken over (detached,
        closed with 4002) before done(Session) is called; done(None) if it expired meanwhile."""

    def track(self, session_id: str, topic: str, position: Position | None) -> None:
        """Record a session's position in one topic (None: the session left the topic)."""

    def detach_session(self, session_id: str, holder: Any, positions: dict, now: float) -> None:
        """The holder went away: keep its positions; the session expires after the TTL."""

    def drop_session(self, session_id: str) -> None:
        """Forget a session now (it was replaced by the one a connection resumed)."""

    def presence_add(self, topic: str, user_id: str) -> None:
        """One more connection of `user_id` is subscribed to `topic`."""

    def presence_remove(self, topic: str, user_id: str) -> None:
        """One connection of `user_id` left `topic`."""

    def presence(self, topic: str, done: Callable) -> None:
        """done(list of the distinct users subscribed to `topic`, sorted)."""

    def sweep(self, now: float) -> None:
        """Expire what is past its age: sessions, history, dedup, idle topics."""

    def stats(self) -> dict:
        """Figures for /stats and /metrics: sessions, sequenced_topics, history, dedup."""


class Histogram:
    """Latency histogram with fixed buckets (bounded memory); percentiles by interpolation."""

    BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BOUNDS) + 1)  # the last bucket is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float, n: int = 1) -> None:
        # The first bucket whose bound is >= seconds (Prometheus's "le"), found in C: this runs
        # once per published message at every flush.
        self.counts[bisect.bisect_left(self.BOUNDS, seconds)] += n
        self.sum += seconds * n
        self.count += n

    def percentile(self, q: float) -> float | None:
        """The q-quantile (0..1) in seconds, interpolated inside its bucket; None when empty."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n and seen + n >= rank:
                low = self.BOUNDS[i - 1] if i else 0.0
                high = self.BOUNDS[i] if i < len(self.BOUNDS) else self.BOUNDS[-1]
                return low + (high - low) * max(0.0, rank - seen) / n
            seen += n
        return self.BOUNDS[-1]

    def summary(self) -> dict:
        """Count and p50/p95/p99 in milliseconds, for /stats."""
        out: dict[str, Any] = {"count": self.count}
        for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
            value = self.percentile(q)
            out[name] = None if value is None else round(value * 1000, 3)
        return out


class Feed:
    """One topic as this process receives it: the topic's epoch, the last seqNo delivered here,
    and the publish times of the latest deliveries. Not `ready` while joining or filling a gap:
    deliveries wait in `buffer`, callbacks that need the position in `waiting`."""

    __slots__ = ("epoch", "seq", "ready", "waiting", "buffer", "times")

    def __init__(self) -> None:
        self.epoch = ""
        self.seq = 0
        self.ready = False
        # Made when first needed: most topics of a busy server have one subscriber and few messages.
        self.waiting: list[Callable[[Feed], None]] | None = None
        self.buffer: list[tuple[str, int, bytes, float | None]] | None = None
        self.times: collections.deque | None = None  # publish times of the latest seqNos, up to seq

    def time_of(self, seq: int) -> float | None:
        """When message `seq` was published, if it is among the latest delivered here."""
        back = self.seq - seq
        times = self.times
        return times[-1 - back] if times is not None and 0 <= back < len(times) else None

    def hold(self, *delivery: Any) -> None:
        """Keep a delivery until the feed is ready again."""
        if self.buffer is None:
            self.buffer = []
        self.buffer.append(delivery)




class Slot:
    """A place in a connection's outgoing stream for a reply that is not ready yet."""

    __slots__ = ("frames",)

    def __init__(self) -> None:
        self.frames: list[bytes] | None = None


class Peer:
    """One connection as the broker sees it. The I/O layer subclasses it.

    Outgoing frames go to `out` (written at the end of the event-loop turn), or, while a reply
    ahead of them is not ready, to `held`, in order, with the reply's Slot among them.
    """

    __slots__ = (
        "out",
        "held",
        "held_bytes",
        "inbox",
        "user_id",
        "session",
        "topics",
        "bound_topic",
        "is_echo",
        "broker",
        "close_request",
        "rate_tokens",
        "rate_time",
        "replay_credit",
        "grants",
        "expires",
    )

    def __init__(self, broker: Broker, bound_topic: str | None = None) -> None:
        self.out: list[bytes] = []  # frames waiting for the end of this event-loop turn
        self.held: list | None = None  # frames and Slots behind an unanswered request
        self.held_bytes = 0
        self.inbox: collections.deque | None = None  # requests waiting for a resume to finish
        self.user_id: str | None = None  # set by setup
        self.session: Session | None = None
        self.topics: set[str] = set()
        self.bound_topic = bound_topic  # /ws/sub/{topic}: the only topic it may (un)subscribe
        self.is_echo = False
        self.broker: Broker | None = broker  # None once disconnected
        self.close_request: int | None = None  # a close code the broker asks the I/O layer to send
        self.rate_tokens = float(broker.config.publish_burst)
        self.rate_time = 0.0
        # Bytes of replayed messages not yet known to have drained: a long replay is not a sign
        # of a slow reader, so the slow-consumer check leaves them out (section 15).
        self.replay_credit = 0
        self.grants: Grants | None = None  # what it may read and write; None: everything (no ACL source)
        self.expires: float | None = None  # on the broker's clock: past it, close 4003 (token expired)

    def send(self, frame: bytes) -> None:
        """Queue one frame, after everything queued before it."""
        if self.held:
            self.hold(frame)
        else:
            if not self.out:
                self.broker.mark_dirty(self)
            self.out.append(frame)

    def hold(self, frame: bytes) -> None:
        """Queue a frame behind an unanswered request; past the buffer limit it is a slow consumer."""
        self.held.append(frame)
        self.held_bytes += len(frame)
        if self.held_bytes > self.broker.config.max_buffer and self.close_request is None:
            self.broker.request_close(self, CloseCode.SLOW_CONSUMER)

    def fill(self, slot: Slot, frames: list[bytes]) -> None:
        """Put the reply in its place and release what no longer waits."""
        slot.frames = frames
        held = self.held
        if self.broker is None or held is None or held[0] is not slot:
            return
        out = self.out
        was_empty = not out
        ready = released = 0
        for item in held:
            if item.__class__ is Slot:
                if item.frames is None:
                    break
                out.extend(item.frames)
            else:
                out.append(item)
                released += len(item)
            ready += 1
        if ready == len(held):
            self.held = None
            self.held_bytes = 0
        else:
            del held[:ready]  # one cut, not one per item: a long queue behind a slot stays linear
            self.held_bytes -= released
        if was_empty and out:
            self.broker.mark_dirty(self)
        if self.inbox is not None and self.held is None:
            self.broker.run_inbox(self)

    def pending(self) -> bool:
        """True while a reserved reply is not filled yet."""
        return self.held is not None and any(item.__class__ is Slot for item in self.held)

    def take_output(self) -> bytes:
        """Everything ready to write, as one buffer, once."""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def pause_input(self, paused: bool) -> None:
        """Stop (True) or restart (False) reading requests; the I/O layer pauses the socket."""

    def backlog(self) -> int:
        """Bytes queued for this connection and not yet taken by its reader (the I/O layer adds
        what its socket has not sent)."""
        return sum(map(len, self.out)) + self.held_bytes


def _topic_locked(client: Peer, **context: Any) -> ClientError:
    return ClientError("TOPIC_LOCKED", f"this sub-socket is bound to {client.bound_topic!r}", **context)


# Requests whose answer can be far larger than the request (a replay of a topic's whole history):
# they wait while the connection's unread output is over its buffer limit, so one client cannot
# make the server buffer the same history many times over (backpressure instead of amplification).
AMPLIFYING = frozenset(("replay", "resume", "presence"))


def _acl_denied(action: str, topic: str, message: str | None = None, **context: Any) -> ClientError:
    return ClientError("ACL_DENIED", message or f"not allowed to {action} this topic", topic=topic, **context)


def _error_frame(exc: ClientError, msg_id: Any) -> bytes:
    return text_frame(encode(error_message(exc.code, exc.message, msg_id, **exc.context)))


_DEFINED_CLOSE_CODES = frozenset(CloseCode)


class Broker:
    """The pub/sub core. `handle(client, text)` for WebSocket messages, `publish_checked` for the
    rest; `deliver` and `take_over` are called by the backbone."""

    def __init__(
        self, config: Config, backbone: Backbone, wake: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.backbone = backbone
        self._answers_at_once = getattr(backbone, "answers_at_once", False)
        self.wake = wake
        self.clock = clock
        self.auth = Auth(config)
        # Bytes a signature adds to a message: ,"kid":"...","sig":"..." (43 characters of base64url).
        self._signature_size = len(utf8(f',"kid":{_quote(self.auth.signing.kid)},"sig":""')) + 43 if self.auth.signing else 0
        self.topics = TopicStore()
        self.feeds: dict[str, Feed] = {}  # topic -> Feed, for the topics this process receives
        self.users: collections.Counter = collections.Counter()  # userId -> set-up connections here
        # (deadline on this clock, n, client): tokens that expire, soonest first; a refresh pushes a
        # new entry and the old one is skipped when it comes up (no timer object per connection).
        self.expiries: list[tuple[float, int, Peer]] = []
        self._expiry_order = itertools.count()
        self.dirty: list[Peer] = []
        self.connections = 0
        self.published = 0
        self.delivered = 0
        self.replayed = 0
        self.duplicates = 0
        self.errors: collections.Counter = collections.Counter()
        self.disconnects: collections.Counter = collections.Counter()  # by close code
        self.delivery_latency = Histogram()  # publish -> written to the socket, per delivery
        self.ack_latency = Histogram()  # publish -> client ack, per acknowledged message
        # Compressed forms of frames for connections with permessage-deflate (the I/O layer uses
        # it as it writes): the broker only owns it, for /stats, so every connection shares one.
        self.deflater = Deflater()
        self._unflushed: list[tuple[float, int]] = []  # (publish time, deliveries) since the last flush
        self._slot: Slot | None = None  # the slot the request being handled reserved, if any
        self._handlers: dict[str, Callable[[Peer, dict], None]] = {
            "setup": self._setup,
            "subscribe": self._subscribe,
            "unsubscribe": self._unsubscribe,
            "publish": self._publish,
            "replay": self._replay,
            "resume": self._resume,
            "ack": self._ack,
            "refresh": self._refresh,
            "presence": self._presence,
            "ping": self._ping,
        }
        backbone.bind(self)

    # -- connections, called by the I/O layer

    def connect(self, client: Peer) -> None:
        self.connections += 1

    def disconnect(self, client: Peer, reliable: bool = True) -> None:
        """Forget a connection, O(its topics); its session stays resumable for the TTL.

        `reliable` False means the connection's unsent data was abandoned (slow consumer, no
        closing handshake), so "the last seqNo handed to it" is not known and resume falls back to
        acked or subscribed. Frames held behind an unanswered request were never written either.
        """
        if client.broker is None:
            return
        session = client.session
        if session is not None:
            reliable = reliable and not client.held
            for topic, position in session.positions.items():
                feed = self.feeds.get(topic)
                trusted = reliable and feed is not None and feed.epoch == position.epoch and topic in client.topics
                position.handed = feed.seq if trusted else None
            self.backbone.detach_session(session.id, client, session.positions, self.clock())
        if client.user_id is not None:
            self.users[client.user_id] -= 1
            if not self.users[client.user_id]:
                del self.users[client.user_id]
        topics = list(client.topics)
        emptied = self.topics.remove_client(client)
        for topic in topics:
            self.backbone.presence_remove(topic, client.user_id)
        for topic in emptied:
            self._drop_feed(topic)
        client.broker = None
        client.out.clear()
        client.held = None
        client.inbox = None
        if client.expires is not None:
            client.expires = None
            self._compact_expiries()
        self.connections -= 1

    def closed(self, code: int) -> None:
        """Count a closed WebSocket connection by its close code (1006: no close frame). Codes a
        client picked that this protocol does not define are counted together as "other", so one
        client cannot create thousands of /metrics labels."""
        self.disconnects[code if code in _DEFINED_CLOSE_CODES else "other"] += 1

    def mark_dirty(self, client: Peer) -> None:
        if not self.dirty:
            self.wake()
        self.dirty.append(client)

    def take_dirty(self) -> list[Peer]:
        """The clients with something to write since the last call."""
        dirty, self.dirty = self.dirty, []
        return dirty

    def request_close(self, client: Peer, code: int) -> None:
        """Ask the I/O layer to close `client` with `code` at the next flush."""
        client.close_request = code
        self.mark_dirty(client)

    def flushed(self, now: float) -> None:
        """The I/O layer wrote every outbox: record publish -> socket latency for what it held."""
        for published_at, n in self._unflushed:
            self.delivery_latency.observe(now - published_at, n)
        self._unflushed.clear()

    def sweep(self, now: float | None = None) -> None:
        """Once a second: close connections whose token expired (4003), and let the backbone
        expire sessions, history, dedup and idle topics."""
        now = self.clock() if now is None else now
        expiries = self.expiries
        while expiries and expiries[0][0] <= now:
            deadline, _, client = heapq.heappop(expiries)
            if client.expires == deadline and client.broker is self and client.close_request is None:
                log.info("closing a connection of %r: its token expired and was not refreshed", client.user_id)
                self.request_close(client, CloseCode.TOKEN_EXPIRED)
        self.backbone.sweep(now)

    def _set_expiry(self, client: Peer, exp: float | None) -> None:
        """The token's `exp` (Unix time) as a deadline on this broker's clock, leeway included."""
        if exp is None:
            client.expires = None
            return
        deadline = self.clock() + (exp + self.auth.leeway - self.auth.wall())
        if deadline != client.expires:
            client.expires = deadline
            heapq.heappush(self.expiries, (deadline, next(self._expiry_order), client))
            self._compact_expiries()

    def _compact_expiries(self) -> None:
        """Drop the entries of refreshed and closed connections once they are half the heap, so
        it holds about one entry per live connection however often tokens are refreshed."""
        if len(self.expiries) > 2 * self.connections + 64:
            kept: dict[int, tuple[float, int, Peer]] = {}
            for entry in self.expiries:
                client = entry[2]
                if client.expires == entry[0] and client.broker is self:
                    kept[id(client)] = entry  # one per connection, even if a deadline came back
            self.expiries = list(kept.values())
            heapq.heapify(self.expiries)

    def _identify(self, token: Any, where: str) -> Claims:
        """Verify a token (setup, refresh): its Claims, or AUTH_FAILED, logged and counted."""
        try:
            return self.auth.verify(token)
        except ClientError as exc:
            self.auth.refused(where, exc.message)
            raise

    def _may_read(self, client: Peer, topic: str, **context: Any) -> None:
        if client.grants is not None and not client.grants.can_read(topic):
            raise _acl_denied("read", topic, **context)

    # -- called by the backbone

    def deliver(self, topic: str, epoch: str, seq: int, frame: bytes, published_at: float | None) -> None:
        """One published message of `topic`, from the backbone, to this process's subscribers."""
        feed = self.feeds.get(topic)
        if feed is None:
            return  # not received here (any more)
        if not feed.ready:
            feed.hold(epoch, seq, frame, published_at)
        elif epoch != feed.epoch:  # the topic started again: from 0 in the new epoch, gaps filled as usual
            self._new_epoch(topic, feed, epoch)
            self.deliver(topic, epoch, seq, frame, published_at)
        elif seq == feed.seq + 1:
            self._fan_out(topic, feed, seq, frame, published_at)
        elif seq > feed.seq:  # a gap: fill it from history before anything later
            feed.ready = False
            feed.hold(epoch, seq, frame, published_at)
            self.backbone.history(topic, feed.seq + 1, seq - 1, lambda r: self._gap_read(topic, feed, seq - 1, r))
        # else: at or below what was delivered here already (a repeat): dropped

    def resync(self, topic: str, position: TopicPosition) -> None:
        """Broker.resync(topic, position): the backbone may have missed deliveries of `topic` (its
        subscription was down for a while, and came back) and says where the topic stands now. A new
        epoch is passed on to the subscribers (an unasked `subscribed`, as for a live epoch change);
        what was published meanwhile is read from history and delivered before anything later, as a
        gap is; what history no longer holds closes the subscribers with 1011, so they resume and are
        told it was missed. A feed still joining or filling a gap does it once ready, unless it learnt
        of another epoch meanwhile (then the position is older than what it knows).
        """
        feed = self.feeds.get(topic)
        if feed is None:
            return  # not received here any more
        epoch, seq = position
        if not feed.ready:
            known = feed.epoch
            self._when_ready(feed, lambda feed: feed.epoch == known and self.resync(topic, position))
            return
        if epoch != feed.epoch:
            self._new_epoch(topic, feed, epoch)
        if seq > feed.seq:
            feed.ready = False
            self.backbone.history(topic, feed.seq + 1, seq, lambda result: self._gap_read(topic, feed, seq, result))

    def take_over(self, holder: Peer) -> None:
        """The session `holder` held was resumed elsewhere: detach it now, close it with 4002."""
        if holder.broker is self:
            self.disconnect(holder)
            self.request_close(holder, CloseCode.SESSION_TAKEN_OVER)

    def _fan_out(self, topic: str, feed: Feed, seq: int, frame: bytes, published_at: float | None) -> None:
        feed.seq = seq
        times = feed.times
        if times is None:
            times = feed.times = collections.deque(maxlen=ACK_TIMES)
        times.append(published_at)
        subs = self.topics.subscribers.get(topic)
        if not subs:
            return
        dirty = self.dirty
        if not dirty:
            self.wake()
        for c in subs:
            if c.held:
                c.hold(frame)  # behind a reply that is not ready yet
                continue
            out = c.out
            if not out:
                dirty.append(c)
            out.append(frame)
        n = len(subs)
        self.delivered += n
        if published_at is not None:
            self._unflushed.append((published_at, n))

    def _gap_read(self, topic: str, feed: Feed, upto: int, result: HistoryRange | ClientError) -> None:
        """Messages missing from the live stream were read from history: deliver them, then what
        waited. What history no longer holds cannot be delivered: the subscribers are closed with
        1011 (retry), so their resume reports it as missed instead of skipping it silently."""
        if self.feeds.get(topic) is not feed:
            return
        first = feed.seq + 1
        if isinstance(result, ClientError) or result.oldest is None or result.oldest > first or len(result.frames) < upto - first + 1:
            log.warning("topic %r: seqNo %d..%d missing from the backbone's delivery and history", topic, first, upto)
            for client in list(self.topics.subscribers.get(topic, ())):
                self.disconnect(client, reliable=False)
                self.request_close(client, CloseCode.INTERNAL_ERROR)
            feed.seq = upto
        else:
            for seq, frame in enumerate(result.frames, first):
                self._fan_out(topic, feed, seq, frame, None)
        self._ready(topic, feed)

    def _new_epoch(self, topic: str, feed: Feed, epoch: str) -> None:
        """The topic's counter started again under a new epoch while it was received here: tell
        each subscriber (an unasked `subscribed` at seqNo 0), so clients drop their old position."""
        seq = 0
        feed.epoch = epoch
        feed.seq = seq
        feed.times = None
        notice = text_frame(encode({"type": "subscribed", "topic": topic, "seqNo": seq, "epoch": epoch}))
        for client in self.topics.subscribers.get(topic, ()):
            client.send(notice)
            position = client.session.positions.get(topic)
            if position is not None:
                position.start, position.acked, position.epoch = seq, 0, epoch
                self.backbone.track(client.session.id, topic, position)

    # -- feeds: one per topic this process receives

    def _feed(self, topic: str) -> Feed:
        """The topic's feed, joining the backbone first if this process does not receive it yet."""
        feed = self.feeds.get(topic)
        if feed is None:
            feed = self.feeds[topic] = Feed()
            self.backbone.join(topic, lambda position: self._joined(topic, feed, position))
        return feed

    def _joined(self, topic: str, feed: Feed, position: TopicPosition | ClientError) -> None:
        if self.feeds.get(topic) is not feed:
            return
        if isinstance(position, ClientError):
            # Nobody may be told a position that was never read: the subscribers retry.
            log.warning("topic %r: joining the backbone failed: %s", topic, position.message)
            for client in list(self.topics.subscribers.get(topic, ())):
                self.disconnect(client, reliable=False)
                self.request_close(client, CloseCode.INTERNAL_ERROR)
            del self.feeds[topic]
            return
        feed.epoch, feed.seq = position
        self._ready(topic, feed)

    def _ready(self, topic: str, feed: Feed) -> None:
        """The feed knows its position: answer who waited, then deliver what arrived meanwhile."""
        feed.ready = True
        waiting, feed.waiting = feed.waiting, None
        for callback in waiting or ():
            callback(feed)
        buffer, feed.buffer = feed.buffer, None
        for delivery in buffer or ():
            self.deliver(topic, *delivery)
        if feed.ready and topic not in self.topics.subscribers:
            self._drop_feed(topic)

    def _when_ready(self, feed: Feed, callback: Callable[[Feed], None]) -> None:
        if feed.ready:
            callback(feed)
        elif feed.waiting is None:
            feed.waiting = [callback]
        else:
            feed.waiting.append(callback)

    def _drop_feed(self, topic: str) -> None:
        feed = self.feeds.get(topic)
        if feed is not None and feed.ready and not feed.waiting:
            del self.feeds[topic]
            self.backbone.leave(topic)

    def _join_topic(self, client: Peer, topic: str) -> Feed:
        """Subscribe `client` to `topic` here and now: it receives every later delivery."""
        if self.topics.subscribe(client, topic):
            self.backbone.presence_add(topic, client.user_id)
        return self._feed(topic)

    def _leave_topic(self, client: Peer, topic: str) -> None:
        if self.topics.unsubscribe(client, topic):
            self.backbone.presence_remove(topic, client.user_id)
            if topic not in self.topics.subscribers:
                self._drop_feed(topic)

    # -- messages from clients

    def handle(self, client: Peer, text: str) -> None:
        """Process one text message from `client`; replies go to its outgoing stream."""
        msg_id = None
        self._slot = None
        try:
            msg = decode_client_message(text)
            msg_id = msg.get("id")
            kind = msg["type"]
            if client.inbox is not None or (kind in AMPLIFYING and self._must_wait(client, kind)):
                self._wait(client, msg)  # behind others, behind unanswered requests, or behind unread output
                return
            if client.user_id is None and kind not in ("setup", "ping"):
                raise ClientError("AUTH_REQUIRED", "send 'setup' with a token first")
            self._handlers[kind](client, msg)
            if kind == "resume" and client.held and client.inbox is None:
                client.inbox = collections.deque()  # it is running: what comes next waits for it
                client.pause_input(True)
        except ClientError as exc:
            self._error(client, exc, msg_id)
        except Exception:
            log.exception("unexpected failure handling a message")
            self._error(client, ClientError("INTERNAL_ERROR", "the server failed to handle this message"), msg_id)

    def _dispatch(self, client: Peer, msg: dict) -> None:
        if client.user_id is None and msg["type"] not in ("setup", "ping"):
            raise ClientError("AUTH_REQUIRED", "send 'setup' with a token first")
        self._handlers[msg["type"]](client, msg)

    def _must_wait(self, client: Peer, kind: str) -> bool:
        """A resume waits for the answers before it; a request that can answer with far more than
        it asked waits while the connection's unread output is over the buffer limit."""
        if kind not in AMPLIFYING:
            return False
        # One at a time: the size of an answer not given yet is not known, so it waits for it first.
        return client.pending() or client.backlog() > self.config.max_buffer

    def _wait(self, client: Peer, msg: dict) -> None:
        if client.inbox is None:
            client.inbox = collections.deque()
            client.pause_input(True)
        client.inbox.append(msg)

    def run_inbox(self, client: Peer) -> None:
        """Handle the requests that waited, until one has to wait again."""
        inbox = client.inbox
        while inbox and client.broker is self:
            msg = inbox[0]
            if self._must_wait(client, msg["type"]):
                return
            inbox.popleft()
            self._slot = None
            try:
                self._dispatch(client, msg)
            except ClientError as exc:
                self._error(client, exc, msg.get("id"))
            except Exception:
                log.exception("unexpected failure handling a message")
                self._error(client, ClientError("INTERNAL_ERROR", "the server failed to handle this message"), msg.get("id"))
            if client.held and msg["type"] == "resume":
                return  # it is running: the rest waits for it
        if client.inbox is inbox and not inbox:
            client.inbox = None
            client.pause_input(False)

    def handle_binary(self, client: Peer) -> None:
        self._error(client, ClientError("INVALID_JSON", "binary frames are not accepted: send JSON in a text frame"))

    def _error(self, client: Peer, exc: ClientError, msg_id: Any = None) -> None:
        self.errors[exc.code] += 1
        frame = _error_frame(exc, msg_id)
        slot, self._slot = self._slot, None
        if slot is not None and slot.frames is None:
            client.fill(slot, [frame])  # the request failed after it reserved its place
        else:
            client.send(frame)

    def _reply(self, client: Peer, request: dict, reply: dict) -> None:
        client.send(self._frame(request, reply))

    def _reserve(self, client: Peer) -> Slot:
        """Reserve the place of this request's reply (and remember it, for a failure after this)."""
        slot = self._slot = Slot()
        if client.held is None:
            client.held = [slot]
        else:
            client.held.append(slot)
        return slot

    def _answer(self, client: Peer, slot: Slot, request: dict, make: Callable[[Any], list[bytes]]) -> Callable[[Any], None]:
        """A completion that fills `slot` with make(result), or with the error the result is or
        that make raised. Nothing a completion does can leave the slot empty."""

        def done(result: Any) -> None:
            if client.broker is not self:
                return
            try:
                if isinstance(result, ClientError):
                    raise result
                frames = make(result)
            except Exception as exc:
                self._fail(client, slot, request, exc)
            else:
                client.fill(slot, frames)

        return done

    def _fail(self, client: Peer, slot: Slot | None, request: dict, exc: Exception) -> None:
        """Fill `slot` with the error reply for `exc` (INTERNAL_ERROR for anything unexpected);
        no slot: the request is being answered at once, so the reply is sent."""
        if not isinstance(exc, ClientError):
            log.error("unexpected failure completing a request", exc_info=exc)
            exc = ClientError("INTERNAL_ERROR", "the server failed to handle this message")
        self.errors[exc.code] += 1
        self._answer_in(client, slot, _error_frame(exc, request.get("id")))

    @staticmethod
    def _answer_in(client: Peer, slot: Slot | None, frame: bytes) -> None:
        """The reply goes in its reserved place, or, with none reserved, out now."""
        if slot is None:
            client.send(frame)
        else:
            client.fill(slot, [frame])

    @staticmethod
    def _frame(request: dict, reply: dict) -> bytes:
        """The frame of a direct reply to `request`, with its id echoed."""
        msg_id = request.get("id")
        if msg_id is not None:
            reply["id"] = msg_id
        return text_frame(encode(reply))

    def _setup(self, client: Peer, msg: dict) -> None:
        if client.user_id is not None:
            raise ClientError("ALREADY_SETUP", "this connection is already set up")
        claims = self._identify(msg.get("token"), "setup")
        user_id = claims.sub
        grants = self.auth.grants(user_id, claims)
        limit = self.config.max_connections_per_user
        if limit and self.users[user_id] >= limit:
            raise ClientError("TOO_MANY_CONNECTIONS", f"{user_id!r} has {limit} connections already (the per-user limit)", field="token")
        topics = {} if client.bound_topic is None else {client.bound_topic: None}  # a dict: ordered, without repeats
        requested = msg.get("topics")
        if requested is not None:
            if not isinstance(requested, list):
                raise ClientError("INVALID_MESSAGE", "'topics' must be an array of topics", field="topics")
            limit = self.config.max_subscriptions
            for topic in requested:
                check_topic(topic, self.config.max_topic_length, "topics")
                if client.bound_topic is not None and topic != client.bound_topic:
                    raise _topic_locked(client, field="topics", topic=topic)
                topics[topic] = None
                if len(topics) > limit:  # refused as soon as it is known: linear, however long the list
                    raise self._too_many_subscriptions(field="topics")
        if len(topics) > self.config.max_subscriptions:
            raise self._too_many_subscriptions(field="topics")
        if grants is not None:
            for topic in topics:
                if not grants.can_read(topic):  # a sub-socket's own topic came from its URL, not from 'topics'
                    raise _acl_denied("read", topic, field=None if topic == client.bound_topic else "topics")
        # Checked in full before anything changes: a refused setup leaves the connection as it was.
        client.user_id = user_id
        client.grants = grants
        self.users[user_id] += 1
        self._set_expiry(client, claims.exp)
        session = client.session = Session(secrets.token_urlsafe(16), user_id)  # 128 random bits
        ready = self._frame(msg, {"type": "ready", "sessionId": session.id, "userId": user_id, "epoch": self.backbone.epoch, "expiresAt": claims.exp})
        slot = self._reserve(client)

        def created(result: ClientError | None) -> None:
            if client.broker is self:
                if result is None:
                    client.fill(slot, [ready])
                else:
                    self._fail(client, slot, msg, result)

        self.backbone.create_session(session.id, user_id, client, self.clock(), created)
        for topic in topics:
            self._subscribe_to(client, topic, msg)

    def _too_many_subscriptions(self, **context: Any) -> ClientError:
        return ClientError("TOO_MANY_SUBSCRIPTIONS", f"at most {self.config.max_subscriptions} topics per connection", **context)

    def _topic_of(self, client: Peer, msg: dict, locked: bool) -> str:
        topic = check_topic(msg.get("topic") if "topic" in msg else None, self.config.max_topic_length)
        if locked and client.bound_topic is not None and topic != client.bound_topic:
            raise _topic_locked(client, topic=topic)
        return topic

    def _subscribe(self, client: Peer, msg: dict) -> None:
        topic = self._topic_of(client, msg, locked=True)
        self._may_read(client, topic)
        if topic not in client.topics and len(client.topics) >= self.config.max_subscriptions:
            raise self._too_many_subscriptions(topic=topic)
        self._subscribe_to(client, topic, msg)

    def _subscribe_to(self, client: Peer, topic: str, msg: dict) -> None:
        """Join live now; answer `subscribed` with the position once the feed knows it: at once
        when this process receives the topic already (or the backbone answered the join at once),
        else in a reserved place once the backbone has answered."""
        feed = self._join_topic(client, topic)
        if feed.ready:
            client.send(self._subscribed(client, topic, msg, feed))
            return
        slot = self._reserve(client)
        self._when_ready(feed, self._answer(client, slot, msg, lambda feed: [self._subscribed(client, topic, msg, feed)]))

    def _subscribed(self, client: Peer, topic: str, msg: dict, feed: Feed) -> bytes:
        session = client.session
        if topic in client.topics and topic not in session.positions:  # where this subscription starts
            position = session.positions[topic] = Position(feed.seq, feed.epoch)
            self.backbone.track(session.id, topic, position)
        return self._frame(msg, {"type": "subscribed", "topic": topic, "seqNo": feed.seq, "epoch": feed.epoch})

    def _unsubscribe(self, client: Peer, msg: dict) -> None:
        topic = self._topic_of(client, msg, locked=True)
        if topic in client.topics:
            self._leave_topic(client, topic)
            if client.session.positions.pop(topic, None) is not None:
                self.backbone.track(client.session.id, topic, None)
        self._reply(client, msg, {"type": "unsubscribed", "topic": topic})

    def _publish(self, client: Peer, msg: dict) -> None:
        topic = check_topic(msg.get("topic"), self.config.max_topic_length)  # not locked: a sub-socket may publish anywhere
        message_id = self.check_message_id(msg.get("messageId"), topic)
        if client.grants is not None and not client.grants.can_write(topic):
            raise _acl_denied("write", topic, messageId=message_id)
        rate = self.config.publish_rate
        if rate:
            # Token bucket: refilled at `rate` per second up to `publish_burst`. A refused publish
            # is not processed at all (not remembered by dedup), so the same messageId may retry.
            now = self.clock()
            tokens = min(float(self.config.publish_burst), client.rate_tokens + (now - client.rate_time) * rate)
            client.rate_time = now
            if tokens < 1.0:
                client.rate_tokens = tokens
                raise ClientError(
                    "RATE_LIMITED", f"over {rate:g} publishes per second: retry with the same messageId",
                    topic=topic, messageId=message_id,
                )
            client.rate_tokens = tokens - 1.0
        data = self._payload(topic, message_id, msg.get("payload"))
        # The ack's place in the stream is reserved, unless the backbone answers a publish before
        # its call returns and before it delivers anything (memory): then the ack is simply sent.
        slot = None if self._answers_at_once else self._reserve(client)

        def acked(result: PublishResult | ClientError) -> None:  # the one completion of a publish: on its hot path
            if client.broker is not self:
                return
            try:
                if result.__class__ is not PublishResult:
                    raise result
                self._count(result)
                self._answer_in(client, slot, ack_frame(message_id, result.status, result.seq_no, msg.get("id")))
            except Exception as exc:
                self._fail(client, slot, msg, exc)

        self.backbone.publish(client.user_id, topic, message_id, data, self.clock(), acked)

    def _count(self, result: PublishResult) -> None:
        if result.status == "duplicate":
            self.duplicates += 1
        else:
            self.published += 1

    def publish_checked(
        self, user_id: str, topic: Any, message_id: Any, data: Any, id_prefix: str, done: Callable[[PublishResult | ClientError], None],
        grants: Grants | None = None,
    ) -> None:
        """Check topic, messageId (one is generated, `id_prefix`-..., when None), the publisher's
        grants (None: no ACL applies) and data, then publish; done(PublishResult or ClientError).
        For publishers other than a WebSocket client: POST /publish, /demo/publish and
        Server.publish. A refused check raises."""
        topic = check_topic(topic, self.config.max_topic_length)
        if message_id is None:
            message_id = f"{id_prefix}-{secrets.token_hex(8)}"
        message_id = self.check_message_id(message_id, topic)
        if grants is not None and not grants.can_write(topic):
            raise _acl_denied("write", topic, messageId=message_id)
        data = self._payload(topic, message_id, data)

        def counted(result: PublishResult | ClientError) -> None:
            if not isinstance(result, ClientError):
                self._count(result)
            done(result)

        self.backbone.publish(user_id, topic, message_id, data, self.clock(), counted)

    def _payload(self, topic: str, message_id: str, payload: Any) -> bytes:
        """The payload as UTF-8 JSON, refused when the `message` it makes would be over the message
        size limit: no subscriber, replay or resume is ever sent a frame a client may not take."""
        if self.auth.signing:
            # Signed: the payload is sent as its RFC 8785 canonical JSON (the same value), so the
            # signature is computed over bytes the message carries; not I-JSON is INVALID_MESSAGE.
            try:
                data = canonical_json(payload).encode()
            except ClientError as exc:
                raise ClientError(exc.code, exc.message, field="payload", topic=topic, messageId=message_id) from None
        else:
            data = encode_payload(payload)
        limit = self.config.max_message_size
        extra = self._signature_size
        # Counted exactly only when it could matter: a topic character is at most 4 bytes in the
        # frame, a messageId character at most 6 (a \\u escape).
        if len(data) + _MESSAGE_OVERHEAD + extra + 4 * len(topic) + 6 * len(message_id) + 4 > limit and (
            size := message_size(topic, message_id, data) + extra
        ) > limit:
            raise ClientError(
                "INVALID_MESSAGE",
                f"the message would be {size} bytes, over the {self.config.max_message_size}-byte message size limit",
                field="payload", topic=topic, messageId=message_id,
            )
        return data

    def check_message_id(self, message_id: Any, topic: str | None = None) -> str:
        if not isinstance(message_id, str) or not message_id:
            raise ClientError("INVALID_MESSAGE", "'messageId' must be a non-empty string", field="messageId", topic=topic)
        if len(message_id) > self.config.max_message_id_length:
            raise ClientError(
                "INVALID_MESSAGE",
                f"'messageId' is over {self.config.max_message_id_length} characters",
                field="messageId",
                topic=topic,
            )
        return message_id

    def _replay(self, client: Peer, msg: dict) -> None:
        topic = self._topic_of(client, msg, locked=False)
        self._may_read(client, topic)
        from_seq = require(msg, "fromSeq", int, "an integer >= 1")
        if from_seq < 1:
            raise ClientError("INVALID_MESSAGE", "'fromSeq' must be an integer >= 1", field="fromSeq", topic=topic)
        epoch = msg.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise ClientError("INVALID_MESSAGE", "'epoch' must be a string", field="epoch", topic=topic)
        slot = self._reserve(client)

        def replayed(result: HistoryRange, upto: int | None) -> list[bytes]:
            last = result.last if upto is None else upto
            oldest = result.oldest
            if epoch is not None and epoch != result.epoch:
                raise ClientError(
                    "REPLAY_UNAVAILABLE", "that epoch is not the topic's: its seqNos have restarted",
                    topic=topic, oldestSeq=oldest or result.last + 1, epoch=result.epoch,
                )
            if from_seq <= last and (oldest is None or from_seq < oldest):
                raise ClientError(
                    "REPLAY_UNAVAILABLE", f"history no longer holds seqNo {from_seq}",
                    topic=topic, oldestSeq=oldest or result.last + 1, epoch=result.epoch,
                )
            frames = self._resent(client, result.frames)
            frames.append(self._frame(msg, {"type": "replayed", "topic": topic, "fromSeq": from_seq, "toSeq": last, "epoch": result.epoch}))
            return frames

        def read(upto: int | None) -> None:
            self.backbone.history(topic, from_seq, upto, self._answer(client, slot, msg, lambda result: replayed(result, upto)))

        if topic in client.topics:
            # Live messages of this topic already follow this reply: replay only up to them.
            self._when_ready(self.feeds[topic], lambda feed: read(feed.seq))
        else:
            read(None)

    def _resent(self, client: Peer, frames: list[bytes]) -> list[bytes]:
        """Frames sent again (replay, resume); their bytes are not counted as slowness."""
        client.replay_credit += sum(map(len, frames))
        self.replayed += len(frames)
        return list(frames)

    def _resume(self, client: Peer, msg: dict) -> None:
        session_id = require(msg, "sessionId", str, "a string")
        given = msg.get("lastSeqPerTopic")
        if given is None:
            given = {}
        elif not isinstance(given, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in given.values()
        ):
            raise ClientError("INVALID_MESSAGE", "'lastSeqPerTopic' must map topics to integers >= 0", field="lastSeqPerTopic")
        for topic in given:
            check_topic(topic, self.config.max_topic_length, "lastSeqPerTopic")
        epochs = msg.get("epochs")
        if epochs is None:
            epochs = {}
        elif not isinstance(epochs, dict) or not all(isinstance(v, str) for v in epochs.values()):
            raise ClientError("INVALID_MESSAGE", "'epochs' must map topics to epoch strings", field="epochs")
        epoch = msg.get("epoch")
        if epoch is not None and not isinstance(epoch, str):
            raise ClientError("INVALID_MESSAGE", "'epoch' must be a string", field="epoch")
        slot = self._reserve(client)
        resume = _Resume(client, slot, msg, session_id, given, epochs)

        def found(session: Session | None) -> None:
            if session is None or session.user_id != client.user_id or (epoch is not None and epoch != self.backbone.epoch):
                raise ClientError("SESSION_EXPIRED", "unknown or expired session, another user's, or another epoch", field="sessionId")
            topics = dict.fromkeys(list(session.positions) + list(given) + list(client.topics))
            if client.bound_topic is not None and any(t != client.bound_topic for t in topics):
                raise _topic_locked(client, field="sessionId")
            if client.grants is not None:
                # Each topic is checked again: what this token may not read is left out, each
                # with its own ACL_DENIED before `resumed`.
                for topic in [t for t in topics if not client.grants.can_read(t)]:
                    del topics[topic]
                    resume.denied.append(_error_frame(_acl_denied("read", topic, field="sessionId"), msg.get("id")))
                    self.errors["ACL_DENIED"] += 1
            if len(topics) > self.config.max_subscriptions:
                raise self._too_many_subscriptions(field="sessionId")
            resume.topics = list(topics)
            self.backbone.claim_session(session_id, client, self._step(resume, lambda claimed: self._claimed(resume, claimed)))

        self.backbone.get_session(session_id, self._step(resume, found))

    def _step(self, resume: _Resume, step: Callable[[Any], None]) -> Callable[[Any], None]:
        """A completion of one step of a resume: any failure ends the resume with its error."""

        def done(result: Any) -> None:
            if resume.client.broker is not self or resume.slot.frames is not None:
                return  # gone, or the resume failed already
            try:
                if isinstance(result, ClientError):
                    raise result
                step(result)
            except Exception as exc:
                self._fail(resume.client, resume.slot, resume.msg, exc)

        return done

    def _claimed(self, resume: _Resume, session: Session | None) -> None:
        """The session is this connection's now: attach every topic live, then read each gap."""
        if session is None:
            raise ClientError("SESSION_EXPIRED", "the session expired while resuming", field="sessionId")
        client = resume.client
        own = client.session
        resume.session = session
        resume.live = {topic: own.positions.get(topic) for topic in client.topics}
        if own.id != session.id:
            self.backbone.drop_session(own.id)
        client.session = Session(session.id, session.user_id)
        resume.pending = len(resume.topics) + 1  # one more, taken below, so it cannot end mid-loop
        for topic in resume.topics:
            feed = self._join_topic(client, topic)
            self._when_ready(feed, self._step(resume, lambda feed, topic=topic: self._resume_topic(resume, topic, feed)))
        self._resume_step_done(resume)

    def _resume_topic(self, resume: _Resume, topic: str, feed: Feed) -> None:
        """The topic is live on this connection from feed.seq on: work out the gap before it."""
        client = resume.client
        kept = resume.session.positions.get(topic)
        live = resume.live.get(topic)
        if topic in resume.given:  # the client's own position counts first
            after, held_epoch = resume.given[topic], resume.epochs.get(topic)
        elif kept is not None:
            after, held_epoch = kept.last(), kept.epoch
        elif live is not None:
            after, held_epoch = live.start, live.epoch
        else:
            after, held_epoch = feed.seq, feed.epoch
        if held_epoch is not None and held_epoch != feed.epoch:
            after = 0  # a position in an old epoch means nothing now: the whole current epoch
        # A topic this connection already received live: replay only what came before that.
        upto = live.start if live is not None and live.epoch == feed.epoch else feed.seq
        acked = kept.acked if kept is not None and kept.epoch == feed.epoch else 0
        position = client.session.positions[topic] = Position(upto, feed.epoch, acked)
        self.backbone.track(client.session.id, topic, position)
        resume.topic_epochs[topic] = feed.epoch
        if after < upto:
            gap = self._step(resume, lambda result: self._resume_gap(resume, topic, after, result))
            self.backbone.history(topic, after + 1, upto, gap)
        else:
            self._resume_step_done(resume)

    def _resume_gap(self, resume: _Resume, topic: str, after: int, result: HistoryRange) -> None:
        if result.oldest is None or after + 1 < result.oldest:
            oldest = result.oldest if result.oldest is not None else result.last + 1
            resume.missed.append({"topic": topic, "fromSeq": after + 1, "oldestSeq": oldest})
        resume.frames[topic] = self._resent(resume.client, result.frames)
        self._resume_step_done(resume)

    def _resume_step_done(self, resume: _Resume) -> None:
        resume.pending -= 1
        if resume.pending:
            return
        frames = resume.denied + [frame for topic in resume.topics for frame in resume.frames.get(topic, ())]
        reply = {
            "type": "resumed",
            "sessionId": resume.session_id,
            "topics": resume.topics,
            "replayed": len(frames) - len(resume.denied),
            "missed": resume.missed,
            "epochs": resume.topic_epochs,
        }
        frames.append(self._frame(resume.msg, reply))
        resume.client.fill(resume.slot, frames)

    def _ack(self, client: Peer, msg: dict) -> None:
        topic = self._topic_of(client, msg, locked=False)
        seq_no = None
        if "seqNo" in msg or "messageId" not in msg:
            seq_no = require(msg, "seqNo", int, "an integer")
        if "messageId" in msg:
            self.check_message_id(msg["messageId"], topic)
        position = client.session.positions.get(topic)
        feed = self.feeds.get(topic)
        if seq_no is None or position is None or feed is None or not position.acked < seq_no <= feed.seq:
            return  # nothing new to record: an old, repeated or not-yet-delivered position
        position.acked = seq_no
        self.backbone.track(client.session.id, topic, position)
        published_at = feed.time_of(seq_no)
        if published_at is not None:
            self.ack_latency.observe(self.clock() - published_at)

    def _refresh(self, client: Peer, msg: dict) -> None:
        claims = self._identify(msg.get("token"), "refresh")
        if claims.sub != client.user_id:
            self.auth.refused("refresh", "the new token names another user")
            raise ClientError("AUTH_FAILED", "the new token names another user", field="token")
        client.grants = grants = self.auth.grants(claims.sub, claims)
        self._set_expiry(client, claims.exp)
        self._reply(client, msg, {"type": "refreshed", "expiresAt": claims.exp})
        if grants is not None:
            # The new grants replace the old: a subscription they do not cover ends here.
            for topic in [t for t in client.topics if not grants.can_read(t)]:
                self._leave_topic(client, topic)
                if client.session.positions.pop(topic, None) is not None:
                    self.backbone.track(client.session.id, topic, None)
                self._error(client, _acl_denied("read", topic, message="the refreshed token may not read it: the subscription ended"))

    def _presence(self, client: Peer, msg: dict) -> None:
        topic = self._topic_of(client, msg, locked=False)
        self._may_read(client, topic)
        slot = self._reserve(client)
        limit = self.config.max_presence

        def presence(users: list[str]) -> list[bytes]:
            return [self._frame(msg, {"type": "presence", "topic": topic, "users": users[:limit], "count": len(users)})]

        self.backbone.presence(topic, self._answer(client, slot, msg, presence))

    def _ping(self, client: Peer, msg: dict) -> None:
        self._reply(client, msg, {"type": "pong"})

    # -- figures

    def stats(self) -> dict:
        shared = self.backbone.stats()
        return {
            "connections": self.connections,
            "topics": len(self.topics.subscribers),
            "subscriptions": self.topics.count,
            "published": self.published,
            "delivered": self.delivered,
            "replayed": self.replayed,
            "duplicates": self.duplicates,
            "sessions": shared["sessions"],
            "sequenced_topics": shared["sequenced_topics"],
            "epoch": self.backbone.epoch,
            "history": shared["history"],
            "dedup": shared["dedup"],
            "latency": {"delivery": self.delivery_latency.summary(), "ack": self.ack_latency.summary()},
            "errors": dict(self.errors),
            "auth_refused": {where: self.auth.refusals[where] for where in AUTH_ENTRY_POINTS},
            "disconnects": {str(k): v for k, v in sorted(self.disconnects.items(), key=str)},
            **({"permessage_deflate": self._deflate_stats()} if self.config.permessage_deflate else {}),
            **({"redis": shared["redis"]} if "redis" in shared else {}),
        }

    def _deflate_stats(self) -> dict:
        deflater = self.deflater
        return {
            "compressed": deflater.compressions,
            "reused": deflater.reused,
            "incompressible": deflater.incompressible,
            "bytes_before": deflater.plain_bytes,
            "bytes_after": deflater.compressed_bytes,
            "kept_forms": len(deflater),
            "kept_bytes": deflater.bytes,
        }

    def metrics(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        lines: list[str] = []
        shared = self.backbone.stats()

        def metric(name: str, kind: str, text: str, samples: Iterable[tuple[str, Any]]) -> None:
            lines.append(f"# HELP microsocket_{name} {text}")
            lines.append(f"# TYPE microsocket_{name} {kind}")
            lines.extend(f"microsocket_{name}{labels} {value}" for labels, value in samples)

        metric("connections", "gauge", "Open WebSocket connections.", [("", self.connections)])
        metric("topics", "gauge", "Topics with at least one subscriber.", [("", len(self.topics.subscribers))])
        metric("subscriptions", "gauge", "(topic, connection) pairs.", [("", self.topics.count)])
        metric("sessions", "gauge", "Sessions, attached or resumable.", [("", shared["sessions"])])
        metric("history_messages", "gauge", "Messages retained for replay.", [("", shared["history"]["messages"])])
        metric("published_total", "counter", "Messages accepted and sequenced.", [("", self.published)])
        metric("delivered_total", "counter", "Messages queued to subscribers live.", [("", self.delivered)])
        metric("replayed_total", "counter", "Messages sent again by replay or resume.", [("", self.replayed)])
        metric("duplicates_total", "counter", "Publishes answered as duplicates.", [("", self.duplicates)])
        metric("errors_total", "counter", "Error replies by code.", [(f'{{code="{c}"}}', n) for c, n in sorted(self.errors.items())])
        redis = shared.get("redis")
        if redis is not None:  # several processes on one Redis: say which one answered, and how many there are
            metric("process_info", "gauge", "This process, by its id on the Redis backbone.", [(f'{{process="{redis["process"]}"}}', 1)])
            metric("backbone_up", "gauge", "1 while this process reaches Redis, else 0.", [("", int(bool(redis["connected"])))])
            metric("backbone_processes", "gauge", "Gateway processes alive on this Redis.", [("", redis["processes"] or 0)])
            metric("backbone_reconnects_total", "counter", "Reconnections to Redis.", [("", redis["reconnects"])])
            metric("backbone_unavailable_total", "counter", "Requests answered BACKBONE_UNAVAILABLE.", [("", redis["unavailable"])])
        metric(
            "auth_refusals_total", "counter", "Tokens refused, by where they were presented (the reason is in the log).",
            [(f'{{where="{where}"}}', self.auth.refusals[where]) for where in AUTH_ENTRY_POINTS],
        )
        metric(
            "disconnects_total", "counter", "Closed WebSocket connections by close code (1006: no close frame).",
            [(f'{{code="{c}"}}', n) for c, n in sorted(self.disconnects.items(), key=str)],
        )
        for name, hist, text in (
            ("delivery_latency_seconds", self.delivery_latency, "Publish to written-to-socket, per delivery."),
            ("ack_latency_seconds", self.ack_latency, "Publish to client ack, per acknowledged message."),
        ):
            samples = []
            cumulative = 0
            for bound, n in zip(hist.BOUNDS + (None,), hist.counts):
                cumulative += n
                samples.append((f'_bucket{{le="{"+Inf" if bound is None else repr(bound)}"}}', cumulative))
            samples += [("_sum", repr(hist.sum)), ("_count", hist.count)]
            metric(name, "histogram", text, samples)
        return "\n".join(lines) + "\n"


class _Resume:
    """The state of one resume while its steps complete."""

    __slots__ = (
        "client", "slot", "msg", "session_id", "given", "epochs", "topics", "session", "live", "pending", "frames", "missed",
        "topic_epochs", "denied",
    )

    def __init__(self, client: Peer, slot: Slot, msg: dict, session_id: str, given: dict, epochs: dict) -> None:
        self.client = client
        self.slot = slot
        self.msg = msg
        self.session_id = session_id
        self.given = given  # lastSeqPerTopic
        self.epochs = epochs  # the epochs those positions refer to
        self.topics: list[str] = []
        self.session: Session | None = None  # as the backbone kept it
        self.live: dict[str, Position | None] = {}  # topics this connection received before
        self.pending = 0
        self.frames: dict[str, list[bytes]] = {}
        self.missed: list[dict] = []
        self.topic_epochs: dict[str, str] = {}
        self.denied: list[bytes] = []  # ACL_DENIED errors of topics this token may not read


# === 13. Backbones ================================================================================
#
# The state that several processes would share, behind the interface above. `MemoryBackbone`
# keeps it in this process: topic counters and epochs, dedup (section 9), history (section 10),
# sessions and presence. It answers every request at once through the same completions that an
# asynchronous backbone calls later, so the broker has one code path. A topic's counter and epoch
# are created at its first use and forgotten once nobody has used it for longer than the session
# TTL and the history age; the next use starts it again at 1 under a new epoch, so a client
# holding a position in the old one can always tell.


def _presence_down(presence: dict, subscribed: dict, topic: str, user_id: str) -> bool | None:
    """One connection of `user_id` left `topic`, in a process's counts (topic -> user -> its
    connections, and topic -> connections): None if it was not counted, else True when it was the
    user's last connection to the topic here."""
    users = presence.get(topic)
    if users is None or user_id not in users:
        return None
    count = subscribed[topic] - 1
    if count:
        subscribed[topic] = count
    else:
        del subscribed[topic]
    users[user_id] -= 1
    if users[user_id] > 0:
        return False
    del users[user_id]
    if not users:
        del presence[topic]
    return True


class MemoryBackbone:
    """Everything in this process's memory: the default, and the only backbone of one process.

    State is kept in plain dicts of plain values, one entry per topic or session, rather than an
    object each: on a server with many connections, every long-lived object is one more for the
    garbage collector to walk. An attached session's positions are its connection's own Session
    (the broker's, in this same process): kept here when the connection detaches, read from the
    connection while it is attached. So `track` has nothing to store; a shared backbone stores
    what it is told, for a session resumed on another process after this one is gone."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.epoch = secrets.token_hex(4)  # a fresh sequence space per process start
        self.answers_at_once = True  # publish: done(), then deliver(), all within the call
        self.broker: Broker | None = None
        self.dedup = Dedup(config.dedup_window, config.dedup_per_user, config.dedup_total, clock)
        self.retained = History(config.history_messages, config.history_age, config.history_bytes, clock)
        self._seq: dict[str, int] = {}  # topic -> its latest seqNo, for every topic with a counter
        self._epochs: dict[str, str] = {}  # topic -> its epoch (the same keys as _seq)
        self._joined: set[str] = set()  # topics this process receives (the broker joined them)
        # Topics with a counter that this process does not receive, oldest first: topic -> since
        # when (it was last left, published to or read). See `_forget_idle`.
        self._idle: collections.OrderedDict = collections.OrderedDict()
        self._new_epoch = itertools.count(1)
        # Sessions: sessionId -> userId; -> {topic: Position.values()} once it has a topic; -> the
        # connection holding it while attached; detached ones -> since when, oldest first.
        self._users: dict[str, str] = {}
        self._positions: dict[str, dict[str, tuple]] = {}
        self._holders: dict[str, Any] = {}
        self._detached: collections.OrderedDict = collections.OrderedDict()
        self._kept = 0  # topic positions the detached sessions keep, in all (bounded by max_session_topics)
        self._presence: dict[str, dict[str, int]] = {}  # topic -> user -> connections
        self._subscribed: dict[str, int] = {}  # topic -> connections (the sum of the above)
        self.signing = SigningKeys.parse(config.sign_keys) if config.sign_keys else None  # the first key signs each message

    def bind(self, broker: Broker) -> None:
        self.broker = broker

    def _topic(self, topic: str, now: float) -> str:
        """The topic's epoch, its counter created at 0 if it has none; a use that keeps it from idling."""
        epoch = self._epochs.get(topic)
        if epoch is None:
            if len(self._seq) >= self.config.max_topics and self._idle:
                # The least recently used topic nobody receives is forgotten early (with what
                # history holds of it): its next use starts a new epoch, so nobody is misled.
                self._forget(next(iter(self._idle)))
            # Unique in this process (a counter) and across its restarts (the process's epoch).
            epoch = self._epochs[topic] = f"{self.epoch}.{next(self._new_epoch):x}"
            self._seq[topic] = 0
        if topic not in self._joined:
            self._idle.pop(topic, None)
            self._idle[topic] = now
        return epoch

    def publish(self, user_id: str, topic: str, message_id: str, data: bytes, now: float, done: Callable) -> None:
        seq = self.dedup.get(user_id, message_id, now)
        if seq is not None:
            done(PublishResult("duplicate", message_id, seq, 0))
            return
        epoch = self._epochs.get(topic)
        if epoch is None or topic not in self._joined:  # else a topic in use here: nothing to note
            epoch = self._topic(topic, now)
        seq = self._seq[topic] = self._seq[topic] + 1
        signing = self.signing
        frame = message_frame(topic, seq, message_id, data, sign_canonical(signing, topic, seq, message_id, data) if signing else None)
        self.dedup.add(user_id, message_id, seq, now)
        self.retained.add(topic, seq, frame, now)
        done(PublishResult("ok", message_id, seq, self._subscribed.get(topic, 0)))
        if topic in self._joined:
            self.broker.deliver(topic, epoch, seq, frame, now)

    def join(self, topic: str, done: Callable) -> None:
        self._joined.add(topic)
        self._idle.pop(topic, None)
        epoch = self._topic(topic, 0.0)  # joined: not idle, so the time is not used
        done(TopicPosition(epoch, self._seq[topic]))

    def leave(self, topic: str) -> None:
        if topic in self._joined:
            self._joined.discard(topic)
            self._idle[topic] = self.clock()

    def history(self, topic: str, first: int, last: int | None, done: Callable) -> None:
        now = self.clock()
        epoch = self._topic(topic, now)
        self.retained.expire(now)
        done(HistoryRange(epoch, self.retained.oldest(topic), self._seq[topic], self.retained.between(topic, first, last)))

    # -- sessions

    def create_session(self, session_id: str, user_id: str, holder: Any, now: float, done: Callable) -> None:
        self._users[session_id] = user_id
        self._holders[session_id] = holder
        done(None)

    def _session(self, session_id: str) -> Session:
        """A copy of the session's positions, as the broker gets it: the live ones of the
        connection holding it, else the ones kept when it detached."""
        holder = self._holders.get(session_id)
        if holder is not None and holder.session is not None and holder.session.id == session_id:
            positions = {topic: position.copy() for topic, position in holder.session.positions.items()}
        else:
            positions = {topic: Position(*values) for topic, values in self._positions.get(session_id, {}).items()}
        return Session(session_id, self._users[session_id], positions)

    def get_session(self, session_id: str, done: Callable) -> None:
        self._expire_sessions(self.clock())
        done(self._session(session_id) if session_id in self._users else None)

    def claim_session(self, session_id: str, holder: Any, done: Callable) -> None:
        self._expire_sessions(self.clock())
        if session_id not in self._users:
            done(None)
            return
        other = self._holders.get(session_id)
        if other is not None and other is not holder:
            self.broker.take_over(other)  # detaches it: its positions are saved first
        if session_id in self._detached:  # attached again: its kept positions are live ones now
            self._kept -= len(self._positions.get(session_id, ()))
            del self._detached[session_id]
        self._holders[session_id] = holder
        done(self._session(session_id))

    def track(self, session_id: str, topic: str, position: Position | None) -> None:
        pass  # the holder's Session is the live record in this process (see the class docstring)

    def detach_session(self, session_id: str, holder: Any, positions: dict, now: float) -> None:
        if session_id not in self._users or self._holders.get(session_id) is not holder:
            return  # taken over already: the new holder's positions count
        if positions:
            self._positions[session_id] = {topic: position.values() for topic, position in positions.items()}
            self._kept += len(positions)
        else:
            self._positions.pop(session_id, None)
        del self._holders[session_id]
        self._detached[session_id] = now
        self._expire_sessions(now)
        # Sessions are costed by what they hold: the oldest go while there are too many of them,
        # or while they keep too many topic positions between them.
        while len(self._detached) > self.config.max_sessions or self._kept > self.config.max_session_topics:
            self.drop_session(next(iter(self._detached)))

    def drop_session(self, session_id: str) -> None:
        if session_id in self._detached:
            self._kept -= len(self._positions.get(session_id, ()))
        for table in (self._users, self._positions, self._holders, self._detached):
            table.pop(session_id, None)

    def _expire_sessions(self, now: float) -> None:
        """Drop detached sessions older than the TTL (oldest first)."""
        horizon = now - self.config.session_ttl
        detached = self._detached
        while detached:
            session_id, since = next(iter(detached.items()))
            if since > horizon:
                break
            self.drop_session(session_id)

    # -- presence

    def presence_add(self, topic: str, user_id: str) -> None:
        self._subscribed[topic] = self._subscribed.get(topic, 0) + 1
        users = self._presence.get(topic)
        if users is None:
            self._presence[topic] = {user_id: 1}
        else:
            users[user_id] = users.get(user_id, 0) + 1

    def presence_remove(self, topic: str, user_id: str) -> None:
        _presence_down(self._presence, self._subscribed, topic, user_id)

    def presence(self, topic: str, done: Callable) -> None:
        done(sorted(self._presence.get(topic, ())))

    # -- time

    def sweep(self, now: float) -> None:
        self._expire_sessions(now)
        self.retained.expire(now)
        self._forget_idle(now)

    def _forget_idle(self, now: float) -> None:
        """Forget the counters of topics unused for longer than the session TTL and the history
        age: no resumable session and no retained message refers to them any more. The next use
        starts the topic again at 1 under a new epoch. Keeps the counters bounded by the topics in
        use instead of every topic ever published."""
        wait = max(self.config.session_ttl, self.config.history_age)
        horizon = now - wait
        idle = self._idle
        while idle:
            topic, since = next(iter(idle.items()))
            if since > horizon:
                break
            if self.retained.oldest(topic) is None:
                self._forget(topic)
            else:  # still retained (history_age was raised?): look again later
                del idle[topic]
                idle[topic] = now

    def _forget(self, topic: str) -> None:
        """Forget a topic's counter, epoch and history; it is not received here (idle)."""
        self._idle.pop(topic, None)
        self.retained.forget(topic)
        del self._seq[topic], self._epochs[topic]

    def stats(self) -> dict:
        return {
            "sessions": len(self._users),
            "sequenced_topics": len(self._seq),
            "history": {"messages": self.retained.count, "bytes": self.retained.bytes},
            "dedup": {"entries": len(self.dedup)},
        }



# --- 13a. Talking to Redis: RESP, keys and scripts ----------------------------------------------

# -- section 13: errors (they stay inside the backbone: section 2's four cross sections) ----------


class RespError(Exception):
    """The byte stream from Redis is not RESP, or a reply is over a limit: drop the link.

    The parser cannot find the start of the next reply after this, so it stays failed: every later
    `next_reply` raises the same error. The backbone turns it into BACKBONE_UNAVAILABLE and a
    reconnect, like a closed socket."""


class RedisReplyError(Exception):
    """An error reply (`-NOSCRIPT No matching script...`), returned as a value: the caller decides.

    `message` is the whole text, `prefix` its first word (ERR, NOSCRIPT, WRONGTYPE, BUSY, ...),
    the error's kind by Redis's convention. Raise it if that is what the caller wants."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def prefix(self) -> str:
        return self.message.split(" ", 1)[0]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)

    def __repr__(self) -> str:
        return f"RedisReplyError({self.message!r})"


class Push(list):
    """A RESP3 push (`>`): data Redis sends on its own, such as a pub/sub message after HELLO 3,
    which may arrive between replies. A list, so `reply[0]` is its kind (b"message", ...)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Push({list.__repr__(self)})"


# -- section 13: RESP codec (sans-I/O) ------------------------------------------------------------
#
# RESP2 (https://redis.io/docs/reference/protocol-spec/): every reply starts with a type byte and
# ends its header line with CRLF:
#
#     +OK\r\n                   simple string          :42\r\n            integer
#     -ERR message\r\n          error                  $5\r\nhello\r\n    bulk string ($-1: null)
#     *2\r\n:1\r\n$1\r\nx\r\n     array of 2 replies (*-1: null)
#
# RESP3 adds _ (null), # (t/f), , (double), ( (big number), ! (blob error), = (verbatim), % (map of
# n pairs), ~ (set), > (push) and | (attribute: a map annotating the reply after it). Its streamed
# forms ($?, *? with ; chunks) are refused as malformed lengths: Redis never sends them.
#
# Theory of operation. `feed` appends to one buffer; `next_reply` parses from an offset and keeps,
# between calls, everything it learnt: the aggregates still open (a stack, never recursion), the
# length of a bulk string whose header is read, and how far it already looked for a line end. So
# a large bulk string arriving a byte at a time costs one length comparison per call, not a new
# parse from the start, and a line is searched once for its LF however it was cut: linear time
# on any input. Consumed bytes are dropped from the front once they are half the buffer.
# Malformed input (an unknown type byte, a length that is not strict decimal, a line end other
# than CRLF, a bulk string not followed by CRLF) and input over the limits raise RespError.


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()  # next_reply's answer until a whole reply has arrived (None is a reply)

_DOUBLE = re.compile(rb"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?inf|nan")
_AGGREGATES = frozenset(b"*%~>|")
_BLOBS = frozenset(b"$!=")


class RespParser:
    """Replies from Redis, from bytes fed in any pieces (the model is hiredis's Reader)."""

    __slots__ = ("max_bulk", "max_length", "max_depth", "_buf", "_pos", "_scan", "_bulk", "_stack", "_error")

    def __init__(self, max_bulk: int = RESP_MAX_BULK, max_length: int = RESP_MAX_LENGTH, max_depth: int = RESP_MAX_DEPTH) -> None:
        self.max_bulk = max_bulk
        self.max_length = max_length
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0  # start of what is not parsed yet
        self._scan = 0  # no LF in _buf[_pos:_scan]: where to look on from
        self._bulk: tuple[int, int] | None = None  # (type byte, length) of a blob whose header is read
        self._stack: list[list] = []  # open aggregates: [type byte, elements still to come, items]
        self._error: RespError | None = None

    def feed(self, data: bytes) -> None:
        """Append bytes from the connection, cut anywhere (ignored once the parser has failed)."""
        if self._error is not None:
            return
        buf = self._buf
        pos = self._pos
        if pos and pos * 2 >= len(buf):  # drop what was parsed; amortised, it is copied once
            del buf[:pos]
            self._scan -= pos
            self._pos = 0
        buf += data

    def next_reply(self) -> Any:
        """The next complete reply, or NEED_MORE. Raises RespError (and keeps raising it)."""
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except RespError as exc:
            self._error = exc
            raise

    def __iter__(self) -> Iterator[Any]:
        """Every complete reply fed so far, in order."""
        while True:
            reply = self.next_reply()
            if reply is NEED_MORE:
                return
            yield reply

    def buffered(self) -> int:
        """Bytes fed and not yet consumed by a complete value."""
        return len(self._buf) - self._pos

    def _line(self) -> bytes | None:
        """The line at _pos without its CRLF, consumed; None until its LF has arrived."""
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\n", self._scan)
        if end < 0:
            self._scan = len(buf)
            if self._scan - pos > RESP_MAX_LINE + 1:  # + 1: its CR may be in already
                raise RespError(f"line over {RESP_MAX_LINE} bytes without a CRLF")
            return None
        if end - 1 - pos > RESP_MAX_LINE:
            raise RespError(f"line over {RESP_MAX_LINE} bytes")
        if end == pos or buf[end - 1] != 13:  # 13: CR
            raise RespError("line not ended by CRLF")
        if end - pos == 1:
            raise RespError("empty line where a reply should start")
        line = bytes(buf[pos : end - 1])
        if 13 in line:
            raise RespError("CR inside a line")
        self._pos = self._scan = end + 1
        return line

    def _parse(self) -> Any:
        stack = self._stack
        while True:
            if self._bulk is not None:
                kind, n = self._bulk
                value: Any = self._blob(n)
                if value is None:
                    return NEED_MORE  # one comparison per call while a large blob arrives
                self._bulk = None
                if kind == 0x21:  # ! blob error
                    value = RedisReplyError(value.decode("utf-8", "replace"))
                elif kind == 0x3D:  # = verbatim string: "txt:" then the text
                    if n < 4 or value[3] != 0x3A:
                        raise RespError("verbatim string without its format")
                    value = value[4:]
            else:
                line = self._line()
                if line is None:
                    return NEED_MORE
                kind = line[0]
                rest = line[1:]
                if kind == 0x24 and rest.isdigit() and len(rest) < 10 and (n := int(rest)) <= self.max_bulk:
                    # The usual reply: a bulk string (with a plain length), taken here when all of
                    # it has arrived; anything else about it goes the general way below.
                    value = self._blob(n)
                    if value is None:
                        self._bulk = (kind, n)
                        return NEED_MORE
                elif kind in _BLOBS:
                    n = self._length(rest, kind == 0x24, self.max_bulk, "bulk string")  # $ may be null
                    if n < 0:
                        value = None
                    else:
                        self._bulk = (kind, n)
                        continue
                elif kind in _AGGREGATES:
                    n = self._length(rest, kind == 0x2A, self.max_length, "aggregate")  # * may be null
                    if n < 0:
                        value = None
                    elif n == 0:
                        value = self._build(kind, [])
                        if value is _ATTRIBUTE:
                            continue
                    else:
                        if len(stack) >= self.max_depth:
                            raise RespError(f"replies nested over {self.max_depth} deep")
                        stack.append([kind, n * 2 if kind in b"%|" else n, []])
                        continue
                elif kind == 0x2B:  # + simple string
                    value = rest.decode("utf-8", "replace")
                elif kind == 0x2D:  # - error
                    value = RedisReplyError(rest.decode("utf-8", "replace"))
                elif kind == 0x3A:  # : integer (signed 64-bit)
                    value = self._integer(rest, 19)
                elif kind == 0x5F:  # _ null
                    if rest:
                        raise RespError("null with data")
                    value = None
                elif kind == 0x23:  # # boolean
                    if rest == b"t":
                        value = True
                    elif rest == b"f":
                        value = False
                    else:
                        raise RespError("boolean neither t nor f")
                elif kind == 0x2C:  # , double
                    if len(rest) > 64 or not _DOUBLE.fullmatch(rest):
                        raise RespError("malformed double")
                    value = float(rest)
                elif kind == 0x28:  # ( big number
                    value = self._integer(rest, RESP_MAX_BIG_NUMBER)
                else:
                    raise RespError(f"unknown reply type {bytes((kind,))!r}")
            # A complete value: it ends the reply, or fills the innermost open aggregate.
            while stack:
                top = stack[-1]
                top[2].append(value)
                top[1] -= 1
                if top[1]:
                    break
                stack.pop()
                value = self._build(top[0], top[2])
                if value is _ATTRIBUTE:
                    break  # annotates the value after it, which takes its place
            else:
                return value

    def _blob(self, n: int) -> bytes | None:
        """The n bytes at _pos and the CRLF after them, consumed; None until all have arrived."""
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < n + 2:
            return None
        if buf[pos + n : pos + n + 2] != b"\r\n":
            raise RespError("bulk string not followed by CRLF")
        self._pos = self._scan = pos + n + 2
        return bytes(buf[pos : pos + n])

    @staticmethod
    def _length(digits: bytes, nullable: bool, limit: int, what: str) -> int:
        if digits == b"-1" and nullable:
            return -1
        if not digits.isdigit() or len(digits) > 19:  # strict: int() would take " 1", "+1", "1_0"
            raise RespError(f"malformed {what} length {digits[:20]!r}")
        n = int(digits)
        if n > limit:
            raise RespError(f"{what} of {n} is over the limit of {limit}")
        return n

    @staticmethod
    def _integer(digits: bytes, max_digits: int) -> int:
        body = digits[1:] if digits[:1] in (b"-", b"+") else digits
        if not body.isdigit() or len(body) > max_digits:
            raise RespError(f"malformed integer {digits[:20]!r}")
        return int(digits)

    @staticmethod
    def _build(kind: int, items: list) -> Any:
        if kind == 0x2A:  # *
            return items
        if kind == 0x3E:  # >
            return Push(items)
        if kind == 0x7E:  # ~
            return {_freeze(item) for item in items}
        if kind == 0x7C:  # | attribute: dropped
            return _ATTRIBUTE
        return {_freeze(items[i]): items[i + 1] for i in range(0, len(items), 2)}  # % map


_ATTRIBUTE = object()  # what an attribute builds: not a value, the next one takes its place


def _freeze(value: Any) -> Any:
    """A hashable stand-in for a map key or set member that is an aggregate (rare in Redis)."""
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    if isinstance(value, dict):
        return tuple((key, _freeze(item)) for key, item in value.items())
    if isinstance(value, set):
        return frozenset(value)
    return value


def encode_command(*args: str | bytes | int) -> bytes:
    """One command as Redis reads it: an array of bulk strings.

    str is UTF-8 with "surrogatepass" (a JSON string may hold a lone surrogate, and two topics must
    never share a key: backslash escapes would make "\\ud800" and "\\\\ud800" the same bytes), int
    is its decimal digits, bytes go as they are. Anything else (bool, float, None) is a TypeError:
    Redis would store a spelling we did not choose."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode("utf-8", "surrogatepass")
        elif isinstance(arg, int) and not isinstance(arg, bool):
            arg = b"%d" % arg
        elif isinstance(arg, (bytes, bytearray, memoryview)):
            arg = bytes(arg)
        else:
            raise TypeError(f"a Redis argument must be str, bytes or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_reply(value: Any, resp3: bool = False) -> bytes:
    """A reply as Redis would send it (for tests and fake servers): the inverse of RespParser.

    bytes -> bulk string, str -> simple string, int -> integer, RedisReplyError -> error, list ->
    array, None -> null bulk string ($-1). With `resp3`: None -> _, bool -> #, float -> ,, dict ->
    %, set -> ~, Push -> >, an int beyond 64 bits -> ( big number."""
    if isinstance(value, (bytes, bytearray)):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, RedisReplyError):
        return b"-%s\r\n" % value.message.encode()
    if isinstance(value, str):
        if "\r" in value or "\n" in value:
            raise ValueError("a simple string cannot hold CR or LF")
        return b"+%s\r\n" % value.encode()
    if resp3:
        if value is None:
            return b"_\r\n"
        if isinstance(value, bool):
            return b"#t\r\n" if value else b"#f\r\n"
        if isinstance(value, float):
            text = "inf" if value == float("inf") else "-inf" if value == float("-inf") else "nan" if value != value else repr(value)
            return b",%s\r\n" % text.encode()
        if isinstance(value, dict):
            return b"%%%d\r\n" % len(value) + b"".join(encode_reply(k, True) + encode_reply(v, True) for k, v in value.items())
        if isinstance(value, (set, frozenset)):
            return b"~%d\r\n" % len(value) + b"".join(encode_reply(v, True) for v in value)
        if isinstance(value, Push):
            return b">%d\r\n" % len(value) + b"".join(encode_reply(v, True) for v in value)
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int) and not isinstance(value, bool):
        if -(2**63) <= value < 2**63:
            return b":%d\r\n" % value
        if resp3:
            return b"(%d\r\n" % value
        raise ValueError("RESP2 integers are 64-bit")
    if isinstance(value, (list, tuple)):
        return b"*%d\r\n" % len(value) + b"".join(encode_reply(v, resp3) for v in value)
    raise TypeError(f"no RESP{3 if resp3 else 2} form for {type(value).__name__}")


# -- section 13: key layout -----------------------------------------------------------------------
#
# Every key of one topic carries the topic in a Redis Cluster hash tag, `{...}`: a cluster hashes
# only what is inside the first braces, so a topic's meta hash, history stream and pub/sub channel
# sit in one slot and its publish script runs on one shard. Topics and users are escaped first
# (%, {, } and : as %25, %7B, %7D, %3A): a topic holding "}" would otherwise end the tag early and
# "}x" would give an empty tag (hashed as the whole key, so one topic over several slots), and ":"
# separates a user from a messageId. The escape is one-to-one, so two topics never share a key.
#
#     PREFIX{topic}:meta      hash: epoch (created once), seq (HINCRBY)
#     PREFIX{topic}:history   stream: entry id = seq, fields t (ms, Redis's clock) and m (message)
#     PREFIX{topic}           pub/sub channel: "epoch:seq:message"
#     PREFIX dedup:{user}:seq   hash: messageId -> "seq:epoch"   (SPEC 1.1 I2: keyed by (user,
#     PREFIX dedup:{user}:time  zset: messageId -> ms accepted    messageId), so the user's slot)
#
# On a cluster the dedup keys would be PREFIX{topic}:dedup:USER:seq/time instead (the topic's slot):
# see redis_design.md for what that changes.

_KEY_ESCAPES = str.maketrans({"%": "%25", "{": "%7B", "}": "%7D", ":": "%3A"})


def key_part(text: str) -> str:
    """`text` with %, {, } and : escaped, so it can sit inside a hash tag and between colons."""
    return text.translate(_KEY_ESCAPES)


def check_prefix(prefix: str) -> str:
    """--redis-prefix, refused if it holds a brace: the first `{` of a key must open the tag."""
    if "{" in prefix or "}" in prefix:
        raise ValueError("the Redis prefix must not contain { or }")
    return prefix


def topic_keys(prefix: str, topic: str) -> tuple[str, str, str]:
    """(meta hash, history stream, pub/sub channel) of `topic`: one hash slot."""
    tag = f"{prefix}{{{key_part(topic)}}}"
    return f"{tag}:meta", f"{tag}:history", tag


def dedup_keys(prefix: str, user: str, topic: str | None = None) -> tuple[str, str]:
    """(messageId -> "seq:epoch" hash, messageId -> time zset) of `user`'s dedup window: in the
    user's slot, or, given `topic` (the cluster layout), in the topic's slot for that user."""
    if topic is None:
        tag = f"{prefix}dedup:{{{key_part(user)}}}"
    else:
        tag = f"{prefix}{{{key_part(topic)}}}:dedup:{key_part(user)}"
    return f"{tag}:seq", f"{tag}:time"


# -- section 13: scripts --------------------------------------------------------------------------
#
# A publish is one script, so it is atomic: no other command runs between its steps, and two
# publishes to one topic take their seqs and reach the channel in the same order (SPEC I3). Redis
# does not roll a script back when a command inside it fails (what ran before stays written), so
# every command below is one that cannot fail on keys of the right type, and the one with a
# precondition (XADD's explicit id must be above the stream's last) has it made true first.
# Time is Redis's (TIME), one clock for every process. Lua numbers are doubles: every number that
# goes into a string goes through string.format('%d'), since tostring(1e15) is "1e+15".

PUBLISH_LUA = r"""
-- KEYS: 1 topic meta, 2 topic history, 3 dedup seq hash, 4 dedup time zset
-- ARGV: 1 messageId, 2 message head, 3 message tail, 4 channel, 5 epoch if the topic has none,
--       6 history count, 7 history age ms, 8 dedup window ms, 9 dedup entries per user,
--       10 meta ttl ms (0: the topic is never forgotten), 11 entries looked at to trim
-- Returns {"ok" or "duplicate", seq, epoch, processes that received it (0 for a duplicate)}
local mid = ARGV[1]
local count, age, window = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local per_user, meta_ttl, scan = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local now_ms = string.format('%d', now)

-- 1. Dedup (SPEC I2): an accepted messageId inside the window gets its original seq back, takes no
-- seq and is not published.
local accepted = redis.call('ZSCORE', KEYS[4], mid)
if accepted and tonumber(accepted) > now - window then
  local original = redis.call('HGET', KEYS[3], mid)
  if original then
    local colon = string.find(original, ':', 1, true)
    return {'duplicate', tonumber(string.sub(original, 1, colon - 1)), string.sub(original, colon + 1), 0}
  end
end

-- 2. The topic's epoch, created once: only a topic whose meta is gone (never used, forgotten,
-- flushed, evicted) takes the caller's fresh one, and its seq starts again at 1 under it.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end

-- 3. The seq.
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local seq_text = string.format('%d', seq)
if meta_ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], meta_ttl)
end

-- 4. History: a stream whose entry ids are the seqs, trimmed to `count` entries; entries older
-- than `age` go from its old end, a few per publish, and the whole stream once the topic is quiet.
local message = ARGV[2] .. seq_text .. ARGV[3]
if seq == 1 then
  redis.call('DEL', KEYS[2])  -- a new epoch: whatever an older one left is not its history
end
if count > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', count, seq_text, 't', now_ms, 'm', message)
  local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', scan)
  local old = 0
  for i = 1, #oldest do
    if tonumber(oldest[i][2][2]) > now - age then break end
    old = i
  end
  if old > 0 then
    redis.call('XTRIM', KEYS[2], 'MAXLEN', redis.call('XLEN', KEYS[2]) - old)
  end
  redis.call('PEXPIRE', KEYS[2], age)
end

-- 5. Fan-out: every process subscribed to the topic's channel gets "epoch:seq:message".
local receivers = redis.call('PUBLISH', ARGV[4], epoch .. ':' .. seq_text .. ':' .. message)

-- 6. Remember the messageId for the window; the user's oldest go past the per-user bound.
redis.call('HSET', KEYS[3], mid, seq_text .. ':' .. epoch)
redis.call('ZADD', KEYS[4], now_ms, mid)
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%d', now - window), 'LIMIT', 0, scan)
if #expired > 0 then
  redis.call('HDEL', KEYS[3], unpack(expired))
  redis.call('ZREM', KEYS[4], unpack(expired))
end
local over = redis.call('ZCARD', KEYS[4]) - per_user
if over > 0 then
  local oldest_ids = redis.call('ZRANGE', KEYS[4], 0, math.min(over, scan) - 1)
  redis.call('HDEL', KEYS[3], unpack(oldest_ids))
  redis.call('ZREM', KEYS[4], unpack(oldest_ids))
end
redis.call('PEXPIRE', KEYS[3], window)
redis.call('PEXPIRE', KEYS[4], window)

return {'ok', seq, epoch, receivers}
"""

HISTORY_LUA = r"""
-- KEYS: 1 topic meta, 2 topic history
-- ARGV: 1 first seq wanted, 2 most entries (0: none, just the position), 3 history age ms,
--       4 epoch if the topic has none, 5 meta ttl ms (0: never forgotten), 6 entries per scan
-- Returns {epoch, last seq, oldest retained seq (0: none), {seq, message, seq, message, ...}}
-- Position and entries come from one moment, so a subscriber can tell a gap from the future.
local first, limit, age = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local meta_ttl, scan = tonumber(ARGV[5]), tonumber(ARGV[6])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
local epoch, last = meta[1], tonumber(meta[2]) or 0
if not epoch then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('DEL', KEYS[2])  -- what an older epoch left is not this one's history
end
if meta_ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], meta_ttl)
end
-- The oldest entry still young enough: past the few that age trimming has not reached yet.
local oldest, from = 0, '-'
while true do
  local batch = redis.call('XRANGE', KEYS[2], from, '+', 'COUNT', scan)
  for i = 1, #batch do
    if tonumber(batch[i][2][2]) > now - age then
      oldest = tonumber(string.match(batch[i][1], '^%d+'))
      break
    end
  end
  if oldest > 0 or #batch < scan then break end
  from = string.format('%d', tonumber(string.match(batch[#batch][1], '^%d+')) + 1)
end
local entries = {}
if limit > 0 and oldest > 0 then
  local start = math.max(first, oldest)
  for _, entry in ipairs(redis.call('XRANGE', KEYS[2], string.format('%d', start), '+', 'COUNT', limit)) do
    entries[#entries + 1] = tonumber(string.match(entry[1], '^%d+'))
    entries[#entries + 1] = entry[2][4]
  end
end
return {epoch, last, oldest, entries}
"""

PUBLISH_SHA = hashlib.sha1(PUBLISH_LUA.encode()).hexdigest()  # EVALSHA first, EVAL on NOSCRIPT
HISTORY_SHA = hashlib.sha1(HISTORY_LUA.encode()).hexdigest()

SCRIPTS = {PUBLISH_SHA: PUBLISH_LUA, HISTORY_SHA: HISTORY_LUA}


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def publish_command(prefix: str, user_id: str, topic: str, message_id: str, head: bytes, tail: bytes,
                    new_epoch: str, history_messages: int, history_age: float, dedup_window: float,
                    dedup_per_user: int, meta_ttl: float = 0.0, cluster: bool = False) -> tuple:
    """The EVALSHA of one publish. The message is head + seq + tail (section 7 builds them around
    the seqNo); `new_epoch` is used only by a topic that has none, so make it fresh every time
    (secrets.token_hex(8)): an epoch string must never come back. Times in seconds."""
    meta, history, channel = topic_keys(prefix, topic)
    seqs, times = dedup_keys(prefix, user_id, topic if cluster else None)
    return ("EVALSHA", PUBLISH_SHA, 4, meta, history, seqs, times,
            message_id, head, tail, channel, new_epoch, history_messages, _ms(history_age),
            _ms(dedup_window), dedup_per_user, _ms(meta_ttl), REDIS_TRIM_SCAN)


def history_command(prefix: str, topic: str, first: int, limit: int, history_age: float, new_epoch: str,
                    meta_ttl: float = 0.0) -> tuple:
    """The EVALSHA of a position read (limit 0: join, subscribed.seqNo) or a history page."""
    meta, history, _ = topic_keys(prefix, topic)
    return ("EVALSHA", HISTORY_SHA, 2, meta, history, first, limit, _ms(history_age), new_epoch, _ms(meta_ttl), REDIS_TRIM_SCAN)


def eval_fallback(command: tuple) -> tuple:
    """The same call as EVAL with the script's text, after a NOSCRIPT (SCRIPT FLUSH, a restart, a
    failover to a replica that never saw SCRIPT LOAD): Redis caches the script again on the way."""
    return ("EVAL", SCRIPTS[command[1]], *command[2:])


def parse_delivery(data: bytes) -> tuple[str, int, bytes]:
    """(epoch, seq, message) of a payload from a topic's channel ("epoch:seq:message")."""
    epoch, seq, message = data.split(b":", 2)
    return epoch.decode(), int(seq), message


# --- 13b. The Redis backbone -------------------------------------------------------------------
#
# Several processes share one Redis: each topic's epoch, seqNo and history, dedup, sessions and
# presence live there (the key layout above), fan-out goes through Redis pub/sub, and each process
# keeps only its own connections' topic map. What the broker sees is the same `Backbone` as the
# in-memory one: requests with completions, deliveries to `broker.deliver`, take-overs to
# `broker.take_over`.
#
# Theory of operation.
#
# - Two connections per process. The command connection carries every request, pipelined: each
#   request is written at once (one write per event-loop turn for all of them) and its reply is
#   the next one to arrive, since "Redis processes commands in order and replies in the same
#   order" (https://redis.io/docs/manual/pipelining/). One connection, never a pool, so one
#   client's publishes reach Redis, take their seqNos and are acknowledged in the order it sent
#   them. The subscriber connection is in RESP2 subscribed mode: it SUBSCRIBEs to the channel of
#   each topic this process receives (first local subscriber: SUBSCRIBE; `leave`: UNSUBSCRIBE) and
#   to this process's control channel. Deliveries come only from there, this process's own
#   publishes included, in seqNo order per topic (one channel, one connection: Redis keeps the
#   order of PUBLISH).
# - Join: SUBSCRIBE first, then read the topic's position once Redis confirmed the subscription,
#   so every message after the position arrives on the channel and the broker drops the ones at
#   or below it. History reads come from the topic's stream; a message's frame is built from the
#   text the script kept, by the same function live and replayed (signed here at delivery when
#   signing is on: Redis's Lua has no HMAC-SHA256), so a replay sends the bytes a delivery sent.
# - Deadlines. Every request has one (`timeout`, on the event loop's clock). While Redis is
#   unreachable, requests wait for the reconnect in a bounded backlog; past its deadline a request
#   is answered BACKBONE_UNAVAILABLE. A request written and unanswered past its deadline means the
#   link is stalled: it is dropped, everything waiting on it is answered BACKBONE_UNAVAILABLE, and
#   the process reconnects. A publish whose reply never came may or may not have run in Redis; the
#   client was told to retry, with the same messageId, and dedup makes the retry safe: it is
#   either accepted once or answered `duplicate` with the original seqNo.
# - Reconnect with backoff and jitter (processes that lost Redis together do not come back in the
#   same millisecond). After the subscriber connection comes back, every received topic is
#   subscribed again and its position read; the broker is told (`Broker.resync`) and fills what was
#   published meanwhile from history, exactly like a gap, or passes on a new epoch. After the
#   command connection comes back, this process writes again what it owns: its attached sessions,
#   its presence entries, its registry entry (Redis may have restarted empty).
# - A subscriber connection that looks alive but receives nothing (a half-open TCP connection, a
#   stalled server) is found by a PING when it has been silent for a third of the lease, and
#   replaced when the PONG does not come within the timeout.
# - Sessions are hashes with a TTL: the session TTL once detached, the TTL plus the lease while
#   attached (renewed by the holder's process). `holder` names the connection holding it (this
#   process's id and a number). A resume on another process claims it in one script, which
#   publishes "take over" on the holder process's control channel; that process detaches the
#   connection (its final positions written, "released" published back) and closes it with 4002;
#   the claimer then reads the session. A holder process that is dead (its registry entry ran out)
#   is not waited for, and one that does not answer within the timeout is not waited for longer.
#
# Keys beyond the topic and dedup keys above (P: --redis-prefix; S a sessionId, t a topic, both
# escaped by key_part; X a process id, 12 hex digits, fresh at every start):
#
#     Pepoch                 string: the deployment's epoch (ready.epoch), SET NX at every connect
#     Psession:{S}           hash: user, holder ("X:n"), taking (the holder being taken over),
#                            p:<topic> -> [start, epoch, acked, handed] as JSON; PEXPIRE: the session
#                            TTL once detached, TTL + lease while attached (renewed by X)
#     P{t}:presence          sorted set: "X:user" -> lease end (ms, Redis's TIME); read past the
#                            ones that ran out (a process killed with -9 leaves within the lease)
#     Pprocesses             sorted set: X -> lease end: who is alive (take-over waits, /stats)
#     Pcontrol:X             channel: "takeover\nS\nholder\nclaimer" to X, "released\nS" back
#
# Figures /stats cannot get cheaply from Redis (how many sessions, dedup entries) are this
# process's view; see `stats`.

# KEYS: 1 session hash, 2 process registry. ARGV: 1 the claiming holder, 2 the attached TTL (ms),
# 3 the control channel prefix, 4 this process, 5 the session id.
CLAIM_LUA = r"""
-- Returns false (no such session) or {the previous holder or '', 1 if its process is alive}
if redis.call('HEXISTS', KEYS[1], 'user') == 0 then
  return false
end
local old = redis.call('HGET', KEYS[1], 'holder') or ''
redis.call('HSET', KEYS[1], 'holder', ARGV[1])
if old == '' then
  redis.call('HDEL', KEYS[1], 'taking')
else
  redis.call('HSET', KEYS[1], 'taking', old)
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local alive = 0
if old ~= '' then
  local process = string.match(old, '^[^:]*')
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local lease = redis.call('ZSCORE', KEYS[2], process)
  if lease and tonumber(lease) > now then
    alive = 1
    if process ~= ARGV[4] then
      redis.call('PUBLISH', ARGV[3] .. process, 'takeover\n' .. ARGV[5] .. '\n' .. old .. '\n' .. ARGV[4])
    end
  end
end
return {old, alive}
"""

# KEYS: 1 session hash. ARGV: 1 the holder, 2 the session TTL (ms), 3 the control channel prefix,
# 4 the session id, 5.. position field, value pairs (every position the session keeps).
DETACH_LUA = r"""
-- Returns 1 (detached: it expires after the TTL), 2 (released to the connection taking it over,
-- which is told on its control channel), 0 (not this holder's any more: nothing written)
local holder = redis.call('HGET', KEYS[1], 'holder')
local mode = 0
if holder == ARGV[1] then
  mode = 1
elseif redis.call('HGET', KEYS[1], 'taking') == ARGV[1] then
  mode = 2
else
  return 0
end
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(field, 1, 2) == 'p:' then
    redis.call('HDEL', KEYS[1], field)
  end
end
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
if mode == 1 then
  redis.call('HDEL', KEYS[1], 'holder')
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  redis.call('HDEL', KEYS[1], 'taking')
  if holder then
    redis.call('PUBLISH', ARGV[3] .. string.match(holder, '^[^:]*'), 'released\n' .. ARGV[4])
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[2])  -- the claimer went away as well
  end
end
return mode
"""

# KEYS: 1 session hash. ARGV: 1 user, 2 holder, 3 the attached TTL (ms), 4.. position pairs.
ATTACH_LUA = r"""
-- Creates the session, or renews it (and rewrites its positions) while this holder holds it.
-- Returns 1 (held by this holder), 0 (another holder has it: it was taken over unheard)
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('HGET', KEYS[1], 'holder') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'user', ARGV[1], 'holder', ARGV[2])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: 1 session hash. ARGV: 1 holder, 2 the attached TTL (ms), 3.. field, value pairs ('': delete).
TRACK_LUA = r"""
-- Written only by the holder, or by the one being taken over (its detach comes next): a late
-- write of a connection that lost the session never overwrites the new holder's positions.
local holder = redis.call('HGET', KEYS[1], 'holder')
if holder ~= ARGV[1] and redis.call('HGET', KEYS[1], 'taking') ~= ARGV[1] then
  return 0
end
for i = 3, #ARGV, 2 do
  if ARGV[i + 1] == '' then
    redis.call('HDEL', KEYS[1], ARGV[i])
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

# KEYS: 1 a topic's presence (sorted set: "process:user" -> lease end, ms). ARGV: 1 lease (ms), 2.. members.
PRESENCE_LUA = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local lease = string.format('%d', now + tonumber(ARGV[1]))
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], lease, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return #ARGV - 1
"""

# KEYS: 1 a topic's presence. Returns the members whose lease has not run out (the rest removed).
PRESENCE_READ_LUA = r"""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# KEYS: 1 the process registry (sorted set: process -> lease end, ms). ARGV: 1 process, 2 lease (ms).
HEARTBEAT_LUA = r"""
-- Returns how many processes are alive (their lease has not run out)
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now))
return redis.call('ZCARD', KEYS[1])
"""

CLAIM_SHA, DETACH_SHA, ATTACH_SHA, TRACK_SHA, PRESENCE_SHA, PRESENCE_READ_SHA, HEARTBEAT_SHA = (
    hashlib.sha1(text.encode()).hexdigest()
    for text in (CLAIM_LUA, DETACH_LUA, ATTACH_LUA, TRACK_LUA, PRESENCE_LUA, PRESENCE_READ_LUA, HEARTBEAT_LUA)
)
BACKBONE_SCRIPTS = {
    **SCRIPTS,
    CLAIM_SHA: CLAIM_LUA, DETACH_SHA: DETACH_LUA, ATTACH_SHA: ATTACH_LUA, TRACK_SHA: TRACK_LUA,
    PRESENCE_SHA: PRESENCE_LUA, PRESENCE_READ_SHA: PRESENCE_READ_LUA, HEARTBEAT_SHA: HEARTBEAT_LUA,
}


def _script(sha: str, keys: tuple, *args: Any) -> tuple:
    return ("EVALSHA", sha, len(keys), *keys, *args)


def _millis(seconds: float) -> int:
    return int(seconds * 1000)


class RedisTarget(NamedTuple):
    """Where Redis is, from `--redis redis://[user:password@]host:port/db` (rediss:// for TLS)."""

    host: str
    port: int
    db: int
    username: str | None
    password: str | None = None
    tls: bool = False

    def __str__(self) -> str:  # for logs: never the password
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The RedisTarget of a URL, or ValueError in the words the command line prints.

    The form is Redis's own (https://www.iana.org/assignments/uri-schemes/prov/redis): user and
    password percent-decoded; a password alone (`redis://:secret@host`) is the `default` user's
    (AUTH with one argument); the path is the database number, 0 when absent."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"--redis must be a redis:// or rediss:// URL, not {url[:40]!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("--redis: the port must be a number from 0 to 65535") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"--redis: the database must be a number (redis://host:port/0), not {path[:20]!r}")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    return RedisTarget(parts.hostname or "127.0.0.1", port, int(path or 0), username, password, parts.scheme == "rediss")


def _unavailable(why: str) -> ClientError:
    return ClientError("BACKBONE_UNAVAILABLE", f"Redis {why}: nothing was processed, retry")


def _same(reply: Any) -> Any:
    return reply


def _nothing(reply: Any) -> None:
    return None


class _Request:
    """One command on its way: written, or waiting for the connection; answered once."""

    __slots__ = ("command", "done", "decode", "deadline")

    def __init__(self, command: tuple, done: Callable[[Any], None] | None, decode: Callable[[Any], Any], deadline: float) -> None:
        self.command = command
        self.done = done  # None: nobody waits (a write); a failure is counted and logged
        self.decode = decode  # the reply -> what `done` gets
        self.deadline = deadline


class RedisLink(asyncio.Protocol):
    """One connection to Redis, as little I/O as it can be: bytes in through a RespParser, each
    reply handed with the oldest unanswered request (FIFO) to `owner.complete`, or, when no request
    waits (a subscribed connection's messages), to `unasked`. Writes made in one event-loop turn
    go out in one `transport.write` (`schedule` runs the flush later in the turn). Malformed input
    drops the connection: after it, no reply could be matched to its request."""

    def __init__(self, owner: Any, name: str, schedule: Callable[[Callable[[], None]], Any],
                 unasked: Callable[[Any], None] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.owner = owner
        self.name = name  # "command" or "subscriber", for logs
        self.schedule = schedule
        self.unasked = unasked
        self.clock = clock
        self.parser = RespParser()
        self.waiting: collections.deque[_Request] = collections.deque()
        self.transport: Any = None
        self.out: list[bytes] = []
        self.flushing = False
        self.closed = False
        self.heard = clock()  # when bytes last arrived: a silent subscriber connection is probed

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.heard = self.clock()

    def data_received(self, data: bytes) -> None:
        self.heard = self.clock()
        parser = self.parser
        parser.feed(data)
        try:
            while not self.closed:
                reply = parser.next_reply()
                if reply is NEED_MORE:
                    return
                if self.waiting:
                    self.owner.complete(self, self.waiting.popleft(), reply)
                elif self.unasked is not None:
                    self.unasked(reply)
                else:
                    raise RespError("a reply to no request")
        except RespError as exc:
            log.warning("Redis %s connection: %s; dropping it", self.name, exc)
            self.owner.drop(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(self, exc)

    def request(self, request: _Request) -> None:
        self.waiting.append(request)
        self.send(encode_command(*request.command))

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.out.append(data)
        if not self.flushing:
            self.flushing = True
            self.schedule(self.flush)

    def flush(self) -> None:
        self.flushing = False
        if self.closed or not self.out:
            return
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        self.out.clear()
        self.transport.write(data)

    def close(self) -> None:
        """Abort the connection now (nothing more is read from it)."""
        if not self.closed:
            self.closed = True
            self.out.clear()
            if self.transport is not None:
                self.transport.abort()


class _Topic:
    """A topic this process receives: its channel, the joins waiting for Redis to confirm the
    subscription, whether it is confirmed on the current subscriber connection, and whether it has
    to be caught up (it was received while that connection was down)."""

    __slots__ = ("channel", "joins", "confirmed", "resync")

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self.joins: list[_Join] = []
        self.confirmed = False
        self.resync = False


class _Join:
    """A join waiting for Redis to confirm its subscription (then for its position, whose read has
    a deadline of its own)."""

    __slots__ = ("topic", "done", "deadline", "confirmed")

    def __init__(self, topic: str, done: Callable | None, deadline: float) -> None:
        self.topic = topic
        self.done = done  # None once answered
        self.deadline = deadline
        self.confirmed = False


class _Claim:
    __slots__ = ("done", "deadline")

    def __init__(self, done: Callable, deadline: float) -> None:
        self.done = done
        self.deadline = deadline


_TOPIC_AT = len('{"type":"message","topic":"')
_scanstring = json.decoder.scanstring


def split_message(message: bytes) -> tuple[int, str, bytes]:
    """(seqNo, messageId, data) of a `message` text as section 7 builds it, for signing it here:
    `{"type":"message","topic":..,"seqNo":..,"messageId":..,"data":..}`, data to the last byte."""
    text = message.decode()
    _, end = _scanstring(text, _TOPIC_AT)
    seq_at = end + len(',"seqNo":')
    comma = text.index(",", seq_at)
    message_id, end = _scanstring(text, comma + len(',"messageId":"'))
    data_at = len(text[: end + len(',"data":')].encode())
    return int(text[seq_at:comma]), message_id, message[data_at:-1]


class RedisBackbone:
    """The Backbone on Redis: several processes, one gateway (SPEC 1.1 "Scale-out").

    `url` is `redis://[user:password@]host:port/db` (`rediss://` over TLS); `prefix` starts every
    key and channel (no braces: they are the Cluster hash tags); `timeout` bounds every request;
    `lease` is how long what this process owns outlives it (REDIS_LEASE); `meta_ttl` is how long an
    idle topic keeps its epoch and counter (default: twice the longer of the session TTL and the
    history age; the topics this process receives are kept alive). `await start()` before serving,
    `await close()` after the server closed its connections.

    What is shared and what stays in this process: seqNos, epochs, history, dedup, sessions and
    presence are Redis's; the holder connection of each session attached here, the presence
    counts of this process's connections and the topics it receives are this process's, and are
    written again to Redis after a reconnect."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic, url: str = "redis://127.0.0.1:6379/0",
                 prefix: str = "ms:", timeout: float = REDIS_TIMEOUT, lease: float = REDIS_LEASE, meta_ttl: float | None = None) -> None:
        self.config = config
        self.clock = clock
        self.target = parse_redis_url(url)
        self.prefix = check_prefix(prefix)
        self.timeout = timeout
        self.lease = lease
        self.meta_ttl = 2 * max(config.session_ttl, config.history_age) if meta_ttl is None else meta_ttl
        self.process = secrets.token_hex(6)  # this process in Redis: its holders, presence, control channel
        self.epoch = ""  # the deployment's epoch (Pepoch), read at every connect
        self.broker: Broker | None = None
        self.signing = SigningKeys.parse(config.sign_keys) if config.sign_keys else None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._epoch_numbers = itertools.count(1)
        self._started = False
        self._closing = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._tasks: dict[str, asyncio.Task] = {}  # reconnecting: "command" / "subscriber" -> task
        self._failures = {"command": 0, "subscriber": 0}  # failed attempts since the link was last up
        # The command connection (None while down or not yet set up) and what waits for it.
        self._cmd: RedisLink | None = None
        self._unsent: collections.deque[_Request] = collections.deque()
        # The subscriber connection and the topics this process receives.
        self._sub: RedisLink | None = None
        self._topics: dict[str, _Topic] = {}
        self._channels: dict[bytes, str] = {}  # channel (as Redis sends it) -> topic
        self._joins: collections.deque[_Join] = collections.deque()  # waiting for a confirmation, oldest first
        self._retry: set[str] = set()  # topics whose catch-up read failed: tried again at the next sweep
        self._ping_sent: float | None = None  # a PING on the subscriber connection, unanswered since then
        self._control = f"{self.prefix}control:{self.process}"
        self._control_bytes = self._control.encode()
        # Sessions attached here: sessionId -> (holder token, connection); when each was last renewed
        # (oldest first); sessions detached here and when they expire; positions not yet written.
        self._holders: dict[str, tuple[str, Any]] = {}
        self._renewed: collections.OrderedDict = collections.OrderedDict()
        self._detached: collections.OrderedDict = collections.OrderedDict()
        self._tracks: dict[str, dict[str, Position | None]] = {}
        self._track_timer: asyncio.Handle | None = None
        self._track_soon = False  # the timer is a call_soon: this turn's positions go out at its end
        self._claims: dict[str, _Claim] = {}  # sessions claimed here, waiting for "released"
        self._holder_numbers = itertools.count(1)
        # Presence of this process's connections: topic -> user -> connections; topic -> connections.
        self._presence: dict[str, dict[str, int]] = {}
        self._subscribed: dict[str, int] = {}
        self._presence_renewed = float("-inf")
        self._meta_renewed = float("-inf")
        self._figures_read = float("-inf")
        # Figures for /stats.
        self.processes: int | None = None  # processes alive, from the registry
        self.history_figures: dict[str, Any] = {"messages": 0, "bytes": 0}
        self.reconnects = 0
        self.unavailable = 0  # requests answered BACKBONE_UNAVAILABLE
        self.write_failures = 0  # writes nobody waited for that failed (logged in sweep)

    # -- keys

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{{{key_part(session_id)}}}"

    def _presence_key(self, topic: str) -> str:
        return f"{self.prefix}{{{key_part(topic)}}}:presence"

    def _new_epoch(self) -> str:
        """A candidate epoch for a topic that has none: never the same twice (this process's random
        id and a counter), as an epoch string that came back could be taken for the old sequence."""
        return f"{self.process}.{next(self._epoch_numbers):x}"

    # -- life cycle

    def bind(self, broker: Broker) -> None:
        self.broker = broker

    async def start(self) -> None:
        """Connect both links (ConnectionError, saying why, when Redis cannot be reached), register
        this process, start the watchdog. A second call does nothing."""
        if self._started:
            return
        self._started = True
        self.loop = asyncio.get_running_loop()
        try:
            await self._connect_command()
            await self._connect_subscriber()
        except (OSError, asyncio.TimeoutError, RespError) as exc:
            await self.close()
            raise ConnectionError(f"cannot use Redis at {self.target}: {exc or type(exc).__name__}") from None
        self._watchdog = self.loop.call_later(self._period(), self._watch)
        log.info("Redis backbone: %s, prefix %r, process %s, epoch %s", self.target, self.prefix, self.process, self.epoch)

    async def close(self) -> None:
        """Write what waits (positions, detaches of the connections the server closed), wait up to
        the timeout for the replies, leave the registry and presence, close both links."""
        if self._closing or self.loop is None:
            self._closing = True
            return
        self._closing = True
        for task in list(self._tasks.values()):
            task.cancel()
        for timer in (self._watchdog, self._track_timer):
            if timer is not None:
                timer.cancel()
        cmd = self._cmd
        if cmd is not None:
            self._flush_tracks()
            self._request(("ZREM", f"{self.prefix}processes", self.process))
            for topic, users in self._presence.items():
                self._request(("ZREM", self._presence_key(topic), *(f"{self.process}:{user}" for user in users)))
            deadline = self.loop.time() + self.timeout
            while cmd.waiting and not cmd.closed and self.loop.time() < deadline:
                await asyncio.sleep(0.005)
        for link in (self._cmd, self._sub):
            if link is not None:
                self.drop(link)
        while self._unsent:
            self._finish(self._unsent.popleft(), _unavailable("is being disconnected (the server is stopping)"))

    def healthy(self) -> bool:
        """Both connections to Redis are up (for /healthz: a load balancer takes this process out)."""
        return self._cmd is not None and self._sub is not None

    def _period(self) -> float:
        return max(0.01, min(0.25, self.timeout / 8))

    async def _open(self, name: str, unasked: Callable[[Any], None] | None) -> RedisLink:
        target = self.target
        context = ssl.create_default_context() if target.tls else None
        loop = self.loop
        _, link = await asyncio.wait_for(
            loop.create_connection(
                lambda: RedisLink(self, name, loop.call_soon, unasked, loop.time),
                target.host, target.port, ssl=context, server_hostname=target.host if context else None,
            ),
            self.timeout,
        )
        sock = link.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        return link

    async def _calls(self, link: RedisLink, commands: list[tuple]) -> list:
        """Send commands on a link being set up and wait for every reply (an error reply, or the
        link lost, is a ConnectionError naming the command)."""
        futures = []
        deadline = self.loop.time() + self.timeout
        for command in commands:
            future = self.loop.create_future()
            link.request(_Request(command, lambda reply, f=future: f.done() or f.set_result(reply), _same, deadline))
            futures.append(future)
        replies = await asyncio.wait_for(asyncio.gather(*futures), self.timeout)
        for command, reply in zip(commands, replies):
            if isinstance(reply, (RedisReplyError, ClientError)):
                name = " ".join(command[:2]) if command[0] in ("CLIENT", "SCRIPT") else command[0]  # never AUTH's arguments
                raise ConnectionError(f"{name} failed: {reply.message}")
        return replies

    def _hello(self, name: str) -> list[tuple]:
        """What a new connection says first: AUTH (https://redis.io/commands/auth/: with a username
        on Redis 6's ACLs), SELECT the database, and a name that CLIENT LIST and CLIENT KILL show."""
        target = self.target
        commands: list[tuple] = []
        if target.password is not None:
            commands.append(("AUTH", target.username, target.password) if target.username else ("AUTH", target.password))
        if target.db:
            commands.append(("SELECT", target.db))
        commands.append(("CLIENT", "SETNAME", f"microsocket-{self.process}-{name}"))
        return commands

    async def _connect_command(self) -> None:
        link = await self._open("command", None)
        try:
            epoch_key = f"{self.prefix}epoch"
            hello = self._hello("command")
            # The deployment's epoch: created by the first process to find none, so it changes
            # exactly when Redis lost its data. Scripts are loaded so EVALSHA rarely misses.
            commands = hello + [("SET", epoch_key, secrets.token_hex(8), "NX"), ("GET", epoch_key)]
            commands += [("SCRIPT", "LOAD", text) for text in BACKBONE_SCRIPTS.values()]
            replies = await self._calls(link, commands)
        except BaseException:
            link.close()
            raise
        epoch = replies[len(hello) + 1].decode()
        if self.epoch and epoch != self.epoch:
            log.warning("Redis lost its data (its epoch went from %s to %s): every topic starts a new epoch, "
                        "detached sessions are gone", self.epoch, epoch)
        self.epoch = epoch
        self._cmd = link
        # What waited for the connection goes out now, in its order (the watchdog failed what was
        # past its deadline), then this process writes again what it owns.
        unsent, self._unsent = self._unsent, collections.deque()
        for request in unsent:
            link.request(request)
        self._reassert()

    async def _connect_subscriber(self) -> None:
        link = await self._open("subscriber", self._on_push)
        try:
            await self._calls(link, self._hello("subscriber"))
        except BaseException:
            link.close()
            raise
        self._sub = link
        self._ping_sent = None
        channels = [self._control] + [state.channel for state in self._topics.values()]
        for state in self._topics.values():
            state.confirmed = False
        for i in range(0, len(channels), REDIS_SUBSCRIBE_BATCH):
            link.send(encode_command("SUBSCRIBE", *channels[i : i + REDIS_SUBSCRIBE_BATCH]))

    def drop(self, link: RedisLink) -> None:
        """Give up on a link now (stalled, malformed, closing): its requests fail, a reconnect follows."""
        link.close()
        self.lost(link, None)

    def lost(self, link: RedisLink, exc: Exception | None) -> None:
        """A link went away: fail what waited on it, reconnect (unless closing). Called once per link
        whether the connection was lost or dropped here."""
        link.closed = True
        waiting, link.waiting = link.waiting, collections.deque()
        # These requests were written and not answered: each may or may not have run in Redis.
        # A publish among them is answered BACKBONE_UNAVAILABLE all the same; the client retries
        # with the same messageId and dedup makes the retry safe (one seqNo, or `duplicate`).
        for request in waiting:
            self._finish(request, _unavailable("connection lost before it answered"))
        if link is self._cmd:
            self._cmd = None
            if not self._closing:
                log.warning("lost the Redis command connection (%s); reconnecting", exc or "dropped")
            self._reconnect("command")
        elif link is self._sub:
            self._sub = None
            for state in self._topics.values():
                if state.confirmed:
                    state.confirmed = False
                    state.resync = True  # deliveries may be missed until it is subscribed again
            if not self._closing:
                log.warning("lost the Redis subscriber connection (%s); reconnecting", exc or "dropped")
            self._reconnect("subscriber")

    def _reconnect(self, which: str) -> None:
        if self._closing or which in self._tasks or self.loop is None:
            return
        self._tasks[which] = self.loop.create_task(self._keep_connecting(which))

    async def _keep_connecting(self, which: str) -> None:
        delay = REDIS_BACKOFF_MIN
        try:
            while not self._closing:
                await asyncio.sleep(random.uniform(delay / 2, delay))
                try:
                    await (self._connect_command() if which == "command" else self._connect_subscriber())
                except Exception as exc:  # noqa: BLE001 - whatever it was, try again later
                    self._failures[which] += 1
                    level = logging.WARNING if self._failures[which] in (1, 10) or self._failures[which] % 100 == 0 else logging.DEBUG
                    log.log(level, "cannot reconnect to Redis at %s (%s connection, attempt %d): %s",
                            self.target, which, self._failures[which], exc or type(exc).__name__)
                    delay = min(REDIS_BACKOFF_MAX, delay * 2)
                else:
                    self.reconnects += 1
                    log.warning("reconnected to Redis (%s connection) after %d failed attempts", which, self._failures[which])
                    self._failures[which] = 0
                    return
        finally:
            self._tasks.pop(which, None)

    # -- requests

    def _request(self, command: tuple, done: Callable[[Any], None] | None = None, decode: Callable[[Any], Any] = _same) -> None:
        """Send `command`, or hold it while the connection is down; done(decode(reply)) or
        done(ClientError BACKBONE_UNAVAILABLE) within the timeout."""
        request = _Request(command, done, decode, (self.loop.time() if self.loop else 0.0) + self.timeout)
        if self._cmd is not None:
            self._cmd.request(request)
        elif len(self._unsent) < REDIS_MAX_BACKLOG and not self._closing and self.loop is not None:
            self._unsent.append(request)
        else:
            self._finish(request, _unavailable("cannot be reached"))

    def complete(self, link: RedisLink, request: _Request, reply: Any) -> None:
        """A reply arrived for `request` (RedisLink calls this)."""
        if reply.__class__ is RedisReplyError:
            if reply.prefix == "NOSCRIPT" and request.command[0] == "EVALSHA" and link is self._cmd:
                # The script cache was emptied (SCRIPT FLUSH, a failover): the same call as EVAL,
                # which caches it again. Publishes still in flight behind this one get NOSCRIPT too
                # and are retried in their order; only if another process reloads the script in
                # between can a later one run before an earlier one's retry (redis_design.md).
                request.command = ("EVAL", BACKBONE_SCRIPTS[request.command[1]], *request.command[2:])
                link.request(request)
                return
            log.warning("Redis refused %s: %s", request.command[0], reply.message)
            reply = _unavailable(f"refused the request ({reply.prefix})")
        self._finish(request, reply)

    def _finish(self, request: _Request, reply: Any) -> None:
        if reply.__class__ is ClientError:
            result = reply
            if request.done is None:
                self.write_failures += 1
            else:
                self.unavailable += 1
        else:
            try:
                result = request.decode(reply)
            except Exception:
                log.exception("unexpected reply from Redis to %s: %.200r", request.command[0], reply)
                result = _unavailable("gave an unexpected reply")
        if request.done is not None:
            try:
                request.done(result)
            except Exception:
                log.exception("a completion of the Redis backbone failed")

    def _watch(self) -> None:
        """Every few tenths of a second: what is past its deadline fails, a link that stalls is dropped."""
        loop = self.loop
        self._watchdog = loop.call_later(self._period(), self._watch)
        now = loop.time()
        cmd = self._cmd
        if cmd is not None and cmd.waiting and cmd.waiting[0].deadline <= now:
            log.warning("Redis did not answer within %g s: dropping the command connection and reconnecting", self.timeout)
            self.drop(cmd)
        unsent = self._unsent
        while unsent and unsent[0].deadline <= now:
            self._finish(unsent.popleft(), _unavailable("cannot be reached"))
        joins = self._joins
        stalled = False
        while joins and joins[0].deadline <= now:
            join = joins.popleft()
            state = self._topics.get(join.topic)
            if join.done is None or join.confirmed or state is None:
                continue
            if join in state.joins:
                state.joins.remove(join)
            stalled = stalled or self._sub is not None
            self._answer_join(join.topic, state, join, _unavailable("did not confirm the subscription in time"))
        sub = self._sub
        if sub is not None and (stalled or (self._ping_sent is not None and now - self._ping_sent > self.timeout)):
            log.warning("the Redis subscriber connection is silent past %g s: replacing it", self.timeout)
            self.drop(sub)
        for session_id, claim in list(self._claims.items()):
            if claim.deadline <= now:
                del self._claims[session_id]
                log.info("session %.8s...: its holder did not release it within %g s; resuming from what Redis has",
                         session_id, self.timeout)
                self._read_claimed(session_id, claim.done, clear=True)

    # -- publish, join, history

    def publish(self, user_id: str, topic: str, message_id: str, data: bytes, now: float, done: Callable) -> None:
        # The message as section 7 frames it, cut where the seqNo goes: only the script knows it.
        head = utf8(f'{{"type":"message","topic":{_quote(topic)},"seqNo":')
        tail = b"".join((utf8(f',"messageId":{_quote(message_id)},"data":'), data, b"}"))
        config = self.config
        command = publish_command(
            self.prefix, user_id, topic, message_id, head, tail, self._new_epoch(), config.history_messages,
            config.history_age, config.dedup_window, config.dedup_per_user, self.meta_ttl,
        )[:-1] + (REDIS_PUBLISH_SCAN,)

        def result(reply: list) -> PublishResult:
            status, seq = reply[0], reply[1]
            if status == b"ok":
                # Connections of this process only: Redis's PUBLISH counts processes, not clients.
                return PublishResult("ok", message_id, seq, self._subscribed.get(topic, 0))
            return PublishResult("duplicate", message_id, seq, 0)

        self._request(command, done, result)

    def join(self, topic: str, done: Callable) -> None:
        state = self._topics.get(topic)
        if state is None:
            channel = topic_keys(self.prefix, topic)[2]
            state = self._topics[topic] = _Topic(channel)
            self._channels[channel.encode("utf-8", "surrogatepass")] = topic
        if self.loop is None:
            done(_unavailable("is not connected (the backbone was not started)"))
            return
        join = _Join(topic, done, self.loop.time() + self.timeout)
        state.joins.append(join)
        self._joins.append(join)
        if self._sub is not None:
            self._sub.send(encode_command("SUBSCRIBE", state.channel))

    def _answer_join(self, topic: str, state: _Topic, join: _Join, position: TopicPosition | ClientError) -> None:
        done, join.done = join.done, None
        if done is None:
            return
        if isinstance(position, ClientError) and self._topics.get(topic) is state and not state.joins:
            self._forget_topic(topic)  # the broker drops the feed without a `leave`
        done(position)

    def leave(self, topic: str) -> None:
        if topic in self._topics:
            self._forget_topic(topic)

    def _forget_topic(self, topic: str) -> None:
        state = self._topics.pop(topic)
        self._channels.pop(state.channel.encode("utf-8", "surrogatepass"), None)
        if self._sub is not None:
            self._sub.send(encode_command("UNSUBSCRIBE", state.channel))

    def _read_position(self, topic: str, done: Callable) -> None:
        """The topic's position (history script, no entries): one moment's epoch and latest seqNo."""
        command = history_command(self.prefix, topic, 1, 0, self.config.history_age, self._new_epoch(), self.meta_ttl)
        self._request(command, done, lambda reply: TopicPosition(reply[0].decode(), reply[1]))

    def history(self, topic: str, first: int, last: int | None, done: Callable) -> None:
        first = max(1, min(first, MAX_SEQ))
        most = self.config.history_messages
        limit = most if last is None else max(0, min(last - first + 1, most))
        command = history_command(self.prefix, topic, first, limit, self.config.history_age, self._new_epoch(), self.meta_ttl)

        def result(reply: list) -> HistoryRange:
            epoch, newest, oldest, flat = reply
            frames = []
            for i in range(0, len(flat), 2):
                seq = flat[i]
                if last is not None and seq > last:
                    break
                frames.append(self._frame(topic, seq, flat[i + 1]))
            return HistoryRange(epoch.decode(), oldest or None, newest, frames)

        self._request(command, done, result)

    def _frame(self, topic: str, seq: int, message: bytes) -> bytes:
        """The frame of a message the script kept: what section 7's message_frame builds, byte for
        byte, for a delivery and for a replay alike (signed here: the script cannot sign)."""
        signing = self.signing
        if signing is None:
            return serialize_frame(OP_TEXT, message)
        _, message_id, data = split_message(message)
        kid, sig = sign_canonical(signing, topic, seq, message_id, data)
        return serialize_frame(OP_TEXT, b"".join((message[:-1], utf8(f',"kid":{_quote(kid)},"sig":"{sig}"}}'))))

    # -- the subscriber connection

    def _on_push(self, reply: Any) -> None:
        """What the subscriber connection receives: messages, confirmations, PONGs."""
        try:
            kind = reply[0]
            if kind == b"message":
                channel = reply[1]
                topic = self._channels.get(channel)
                if topic is not None:
                    epoch, seq, message = parse_delivery(reply[2])
                    # Published at: processes share no clock, so latency here runs from arrival.
                    self.broker.deliver(topic, epoch, seq, self._frame(topic, seq, message), self.clock())
                elif channel == self._control_bytes:
                    self._on_control(reply[2])
            elif kind == b"subscribe":
                self._confirmed(reply[1])
            elif kind == b"pong":
                self._ping_sent = None
        except Exception:
            log.exception("failed to handle %.200r from the Redis subscriber connection", reply)

    def _confirmed(self, channel: bytes) -> None:
        topic = self._channels.get(channel)
        state = self._topics.get(topic) if topic is not None else None
        if state is None:
            return  # the control channel, or a topic left meanwhile
        state.confirmed = True
        if state.joins:
            # Subscribed: from here on every message is delivered, so the position read now
            # leaves nothing between it and the first delivery (the broker drops what is at or
            # below it).
            joins, state.joins = state.joins, []
            for join in joins:
                join.confirmed = True
                self._read_position(topic, lambda position, join=join: self._answer_join(topic, state, join, position))
            state.resync = False
        elif state.resync:
            self._catch_up(topic, state)

    def _catch_up(self, topic: str, state: _Topic) -> None:
        state.resync = False

        def read(position: TopicPosition | ClientError) -> None:
            if self._topics.get(topic) is not state:
                return
            if isinstance(position, ClientError):
                state.resync = True
                self._retry.add(topic)  # tried again at the next sweep
                return
            self.broker.resync(topic, position)

        self._read_position(topic, read)

    def _on_control(self, payload: bytes) -> None:
        parts = payload.decode("utf-8", "replace").split("\n")
        if parts[0] == "takeover" and len(parts) == 4:
            self._take_over(parts[1], parts[2], parts[3])
        elif parts[0] == "released" and len(parts) == 2:
            claim = self._claims.pop(parts[1], None)
            if claim is not None:
                self._read_claimed(parts[1], claim.done, clear=False)

    def _take_over(self, session_id: str, token: str, claimer: str) -> None:
        """Another process claimed a session held here: detach its connection (the broker calls
        detach_session, whose script writes the final positions and says "released") and close it
        with 4002. Not held here any more: say "released" at once."""
        held = self._holders.get(session_id)
        if held is not None and held[0] == token:
            self.broker.take_over(held[1])
            if self._holders.get(session_id) is not held:
                return
            del self._holders[session_id]  # the broker had let go of it already: release it here
            self._renewed.pop(session_id, None)
        self._request(("PUBLISH", f"{self.prefix}control:{claimer}", f"released\n{session_id}"))

    # -- sessions

    def _holder_token(self) -> str:
        return f"{self.process}:{next(self._holder_numbers)}"

    def _attach(self, session_id: str, token: str, holder: Any) -> None:
        self._holders[session_id] = (token, holder)
        self._detached.pop(session_id, None)
        self._renewed.pop(session_id, None)
        self._renewed[session_id] = self._now()

    def _now(self) -> float:
        """The event loop's clock: Redis expires keys in real time, so leases are renewed by it
        (the injected `clock` is the broker's, which tests may stop)."""
        return self.loop.time() if self.loop is not None else 0.0

    @staticmethod
    def _position_pairs(positions: dict) -> list:
        """A session's positions as hash fields: p:<topic> -> [start, epoch, acked, handed] as JSON."""
        pairs: list = []
        for topic, position in positions.items():
            pairs.append("p:" + topic)
            pairs.append(json.dumps(position.values(), separators=(",", ":")))
        return pairs

    def _attached_ttl(self) -> int:
        return _millis(self.config.session_ttl + self.lease)

    def create_session(self, session_id: str, user_id: str, holder: Any, now: float, done: Callable) -> None:
        token = self._holder_token()
        self._attach(session_id, token, holder)
        self._request(_script(ATTACH_SHA, (self._session_key(session_id),), user_id, token, self._attached_ttl()), done, _nothing)

    def _session_of(self, session_id: str, reply: list | None) -> Session | None:
        fields = {reply[i]: reply[i + 1] for i in range(0, len(reply or ()), 2)}
        user = fields.get(b"user")
        if user is None:
            return None
        positions = {}
        for field, value in fields.items():
            if field.startswith(b"p:"):
                try:
                    positions[field[2:].decode("utf-8", "surrogatepass")] = Position(*json.loads(value))
                except (ValueError, TypeError):
                    log.warning("session %.8s...: unreadable position %.80r ignored", session_id, value)
        return Session(session_id, user.decode("utf-8", "surrogatepass"), positions)

    def get_session(self, session_id: str, done: Callable) -> None:
        self._flush_tracks()  # this process's own positions land before the read
        self._request(("HGETALL", self._session_key(session_id)), done, lambda reply: self._session_of(session_id, reply))

    def claim_session(self, session_id: str, holder: Any, done: Callable) -> None:
        token = self._holder_token()

        def claimed(reply: list | None | ClientError) -> None:
            if reply is None or isinstance(reply, ClientError):
                done(reply)
                return
            old, alive = reply[0].decode(), reply[1]
            held = self._holders.get(session_id)
            if old and old.split(":", 1)[0] == self.process:
                if held is not None and held[0] == old and held[1] is not holder:
                    self.broker.take_over(held[1])  # its detach is written before the read below
                self._attach(session_id, token, holder)
                self._read_claimed(session_id, done, clear=True)
            elif old and alive:
                self._attach(session_id, token, holder)
                previous = self._claims.pop(session_id, None)
                if previous is not None:
                    previous.done(None)  # claimed again meanwhile: the earlier claim lost
                self._claims[session_id] = _Claim(done, self.loop.time() + self.timeout)
            else:  # unheld, or its process is gone: Redis has what it last wrote
                self._attach(session_id, token, holder)
                self._read_claimed(session_id, done, clear=bool(old))

        key = self._session_key(session_id)
        command = _script(CLAIM_SHA, (key, f"{self.prefix}processes"), token, self._attached_ttl(), f"{self.prefix}control:",
                          self.process, session_id)
        self._request(command, claimed)

    def _read_claimed(self, session_id: str, done: Callable, clear: bool) -> None:
        """Read a claimed session; `clear`: first forget the holder being taken over (it did not
        release it in time, or is gone), so a late write of its cannot land over the new holder's."""
        key = self._session_key(session_id)
        if clear:
            self._request(("HDEL", key, "taking"))
        self._request(("HGETALL", key), done, lambda reply: self._session_of(session_id, reply))

    def track(self, session_id: str, topic: str, position: Position | None) -> None:
        """Record a position, written with the others of this turn (a topic the session starts or
        stops following: a resume elsewhere must see it) or within REDIS_TRACK_DELAY (an ack)."""
        if session_id not in self._holders or self.loop is None:
            return
        self._tracks.setdefault(session_id, {})[topic] = position
        if position is None or not position.acked:
            if not self._track_soon:
                if self._track_timer is not None:
                    self._track_timer.cancel()
                self._track_timer = self.loop.call_soon(self._flush_tracks)
                self._track_soon = True
        elif self._track_timer is None:
            self._track_timer = self.loop.call_later(REDIS_TRACK_DELAY, self._flush_tracks)

    def _flush_tracks(self) -> None:
        """Write the positions tracked since the last flush, one script per session."""
        if self._track_timer is not None:
            self._track_timer.cancel()
            self._track_timer = None
        self._track_soon = False
        tracks, self._tracks = self._tracks, {}
        ttl = self._attached_ttl()
        for session_id, positions in tracks.items():
            held = self._holders.get(session_id)
            if held is None:
                continue
            pairs: list = []
            for topic, position in positions.items():
                pairs.append("p:" + topic)
                pairs.append("" if position is None else json.dumps(position.values(), separators=(",", ":")))
            self._request(_script(TRACK_SHA, (self._session_key(session_id),), held[0], ttl, *pairs))

    def detach_session(self, session_id: str, holder: Any, positions: dict, now: float) -> None:
        self._tracks.pop(session_id, None)  # the final positions are below
        held = self._holders.get(session_id)
        if held is None or held[1] is not holder:
            return  # taken over already: the new holder's positions count
        del self._holders[session_id]
        self._renewed.pop(session_id, None)
        self._detached[session_id] = self._now() + self.config.session_ttl
        self._prune_detached(self._now())
        key = self._session_key(session_id)
        command = _script(DETACH_SHA, (key,), held[0], _millis(self.config.session_ttl), f"{self.prefix}control:", session_id,
                          *self._position_pairs(positions))
        self._request(command)

    def _prune_detached(self, now: float) -> None:
        """Forget the sessions detached here whose TTL has run out (Redis expired them)."""
        detached = self._detached
        while detached:
            session_id, expires = next(iter(detached.items()))
            if expires > now:
                break
            del detached[session_id]

    def drop_session(self, session_id: str) -> None:
        self._tracks.pop(session_id, None)
        self._holders.pop(session_id, None)
        self._renewed.pop(session_id, None)
        self._detached.pop(session_id, None)
        self._request(("DEL", self._session_key(session_id)))

    def _assert_session(self, session_id: str) -> None:
        """Renew an attached session's lease and write its positions; if another holder has it (a
        take-over this process did not hear of), take its connection over now."""
        held = self._holders.get(session_id)
        if held is None:
            return
        token, client = held
        session = getattr(client, "session", None)
        if session is None or session.id != session_id:
            return  # its connection is between sessions (a resume is running): the next renewal

        def checked(result: int | ClientError) -> None:
            if result == 0 and self._holders.get(session_id) is held:
                log.info("session %.8s... was taken over while this process could not hear it: closing its connection", session_id)
                self.broker.take_over(client)
                if self._holders.get(session_id) is held:
                    del self._holders[session_id]
                    self._renewed.pop(session_id, None)

        key = self._session_key(session_id)
        self._request(_script(ATTACH_SHA, (key,), session.user_id, token, self._attached_ttl(), *self._position_pairs(session.positions)),
                      checked)

    # -- presence

    def _member(self, user_id: str) -> str:
        return f"{self.process}:{user_id}"

    def presence_add(self, topic: str, user_id: str) -> None:
        self._subscribed[topic] = self._subscribed.get(topic, 0) + 1
        users = self._presence.get(topic)
        if users is None:
            users = self._presence[topic] = {}
        n = users.get(user_id, 0)
        users[user_id] = n + 1
        if not n:
            self._request(_script(PRESENCE_SHA, (self._presence_key(topic),), _millis(self.lease), self._member(user_id)))

    def presence_remove(self, topic: str, user_id: str) -> None:
        if _presence_down(self._presence, self._subscribed, topic, user_id):  # the user's last connection here
            self._request(("ZREM", self._presence_key(topic), self._member(user_id)))

    def presence(self, topic: str, done: Callable) -> None:
        def users(members: list) -> list[str]:
            return sorted({member.split(b":", 1)[1].decode("utf-8", "surrogatepass") for member in members})

        self._request(_script(PRESENCE_READ_SHA, (self._presence_key(topic),)), done, users)

    def _renew_presence(self) -> None:
        lease = _millis(self.lease)
        self._request(_script(HEARTBEAT_SHA, (f"{self.prefix}processes",), self.process, lease), self._count_processes)
        for topic, users in self._presence.items():
            self._request(_script(PRESENCE_SHA, (self._presence_key(topic),), lease, *map(self._member, users)))

    def _count_processes(self, result: int | ClientError) -> None:
        if not isinstance(result, ClientError):
            self.processes = result

    def _reassert(self) -> None:
        """After a (re)connect: this process's registry entry, presence and attached sessions,
        written again (Redis may have restarted empty, or missed writes while unreachable)."""
        self._presence_renewed = self._now()
        self._renew_presence()
        for session_id in list(self._holders):
            self._assert_session(session_id)

    # -- time

    def sweep(self, now: float) -> None:
        """Once a second (Broker.sweep): renew leases, probe silent links, catch up what failed to,
        read the figures, report failed writes. Timed on the event loop's clock, not `now`."""
        if self.loop is None or self._closing:
            return
        now = self.loop.time()
        third = self.lease / 3
        if now - self._presence_renewed >= third:
            self._presence_renewed = now
            self._renew_presence()
        renewed = self._renewed
        while renewed:
            session_id, when = next(iter(renewed.items()))
            if now - when < third:
                break
            del renewed[session_id]
            renewed[session_id] = now  # to the end: renewed now, or looked at again in a third of the lease
            self._assert_session(session_id)
        self._prune_detached(now)
        if self.meta_ttl and now - self._meta_renewed >= self.meta_ttl / 3:
            # The topics received here are in use: their epochs and counters must not be forgotten.
            self._meta_renewed = now
            ttl = _millis(self.meta_ttl)
            for topic in self._topics:
                self._request(("PEXPIRE", topic_keys(self.prefix, topic)[0], ttl))
        for topic in list(self._retry):
            state = self._topics.get(topic)
            if state is None or state.confirmed:
                self._retry.discard(topic)
                if state is not None and state.resync:
                    self._catch_up(topic, state)
        sub = self._sub
        if sub is not None and self._ping_sent is None and now - sub.heard >= min(third, 5.0):
            self._ping_sent = now
            sub.send(encode_command("PING"))
        cmd = self._cmd
        if cmd is not None and not cmd.waiting and now - cmd.heard >= min(third, 5.0):
            self._request(("PING",))  # a stalled Redis is found even when nothing is asked of it
        if now - self._figures_read >= REDIS_STATS_INTERVAL:
            self._figures_read = now
            self._read_figures()
        if self.write_failures:
            log.warning("%d writes to Redis failed since the last report (positions, presence or detaches: "
                        "they are written again after the reconnect)", self.write_failures)
            self.write_failures = 0

    def _read_figures(self) -> None:
        topics = list(itertools.islice(self._topics, REDIS_STATS_TOPICS))
        figures = {"messages": 0, "bytes": 0}
        if not topics:
            self.history_figures = figures
            return
        left = [2 * len(topics)]

        def add(name: str) -> Callable[[Any], None]:
            def added(result: Any) -> None:
                if isinstance(result, int):
                    figures[name] += result
                left[0] -= 1
                if not left[0]:
                    self.history_figures = figures
            return added

        for topic in topics:
            key = topic_keys(self.prefix, topic)[1]
            self._request(("XLEN", key), add("messages"))
            self._request(("MEMORY", "USAGE", key), add("bytes"))

    def stats(self) -> dict:
        """The figures the memory backbone gives, from this process's view where Redis has no
        cheap answer: `sessions` are the sessions attached here plus those detached here and not
        yet expired (with one process: all of them); `sequenced_topics` the topics received here;
        `history` the messages and bytes Redis retains for them (read every few seconds);
        `dedup.entries` None (per-user windows in Redis, not counted). `redis` says what only this
        backbone has: connected, this process's id, the processes alive, reconnects."""
        self._prune_detached(self._now())
        return {
            "sessions": len(self._holders) + len(self._detached),
            "sequenced_topics": len(self._topics),
            "history": dict(self.history_figures),
            "dedup": {"entries": None},
            "redis": {  # where Redis is stays out of /stats, which anyone may read
                "connected": self.healthy(),
                "process": self.process,
                "processes": self.processes,
                "reconnects": self.reconnects,
                "unavailable": self.unavailable,
            },
        }


# === 14. HTTP routes ==============================================================================
#
# A route table from (path pattern, method) to a handler; a handler takes a Request and returns a
# Response or raises HTTPError, and `App.handle` turns every failure into a JSON error in one
# place. WebSocket endpoints return an `Upgrade` instead: the I/O layer then switches protocols.
# Routes that publish wait for the backbone, so they return a `PendingResponse` (section 4).
# Nothing here does I/O, so every route can be tested in-process.


class Upgrade(NamedTuple):
    """The request is a valid WebSocket handshake for `kind` ("ws", "sub" or "echo")."""

    kind: str
    response: bytes
    topic: str | None = None
    deflate: DeflateParams | None = None  # permessage-deflate was negotiated with these parameters


_BUILTIN_DOCS = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>microsocket</title>
<link rel="icon" href="data:,"><style>body{font:16px/1.5 system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}</style></head>
<body><h1>microsocket</h1><p>docs.html was not found beside the server, so this is the short version.</p>
<ul><li><code>ws://HOST/ws</code>: one connection, many topics</li>
<li><code>ws://HOST/ws/sub/{topic}</code>: a connection bound to one topic</li>
<li><a href="/stats"><code>GET /stats</code></a>, <a href="/healthz"><code>GET /healthz</code></a>,
<a href="/openapi"><code>GET /openapi</code></a>, <code>GET /demo/publish/{topic}?k=v</code>,
<code>POST /publish</code></li></ul></body></html>
"""


class App:
    """Routes HTTP requests; holds no connection state."""

    def __init__(self, config: Config, broker: Broker) -> None:
        self.config = config
        self.broker = broker
        self.docs = self._load_docs()
        self._demo_ids = itertools.count(1)
        get = ("GET", "HEAD")  # HEAD wherever GET has no side effect
        self.routes: list[tuple[re.Pattern, tuple[str, ...], Callable[..., Any]]] = [
            (re.compile(r"/\Z"), get, self.index),
            (re.compile(r"/docs\Z"), get, self.docs_page),
            (re.compile(r"/ws\Z"), get, self.websocket),
            (re.compile(r"/ws/sub/(?P<topic>.+)\Z"), get, self.websocket_sub),
            (re.compile(r"/stats\Z"), get, self.stats),
            (re.compile(r"/metrics\Z"), get, self.metrics),
            (re.compile(r"/healthz\Z"), get, self.healthz),
            (re.compile(r"/openapi\.json\Z"), get, self.openapi_json),
            (re.compile(r"/openapi\Z"), get, self.openapi_page),
            (re.compile(r"/asyncapi\.json\Z"), get, self.asyncapi_json),
            (re.compile(r"/publish\Z"), ("POST",), self.post_publish),
        ]
        if demo_publish(config):  # GET only: a HEAD must not publish
            self.routes.append((re.compile(r"/demo/publish/(?P<topic>.+)\Z"), ("GET",), self.demo_publish))
        if config.echo:
            self.routes.append((re.compile(r"/echo\Z"), get, self.echo))
        # A fixed path (/ws above all, on every connection's way in) is found with one dict lookup;
        # only the paths with a parameter are matched against their patterns, in order.
        self._fixed = {
            re.sub(r"\\(.)", r"\1", pattern.pattern.removesuffix("\\Z")): (pattern, methods, handler)
            for pattern, methods, handler in self.routes if not pattern.groupindex
        }
        self._parameterised = [route for route in self.routes if route[0].groupindex]

    def _load_docs(self) -> bytes:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "docs.html")
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError:
            return _BUILTIN_DOCS.encode()

    def handle(self, request: Request) -> Response | Upgrade | PendingResponse:
        """Dispatch; every failure becomes a JSON error response here."""
        try:
            handler, params = self._route(request)
            return handler(request, **params)
        except HTTPError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected failure handling %s %s", request.method, request.path)
            return error_response(HTTPError(500, "internal server error"))

    def _route(self, request: Request) -> tuple[Callable[..., Any], dict]:
        fixed = self._fixed.get(request.path)
        for pattern, methods, handler in (fixed,) if fixed is not None else self._parameterised:
            match = pattern.match(request.path)
            if match is None:
                continue
            if request.method not in methods:
                raise HTTPError(405, f"method {request.method} not allowed", [("Allow", ", ".join(methods))])
            return handler, match.groupdict()
        raise HTTPError(404, "not found")

    # -- WebSocket endpoints

    def websocket(self, request: Request) -> Upgrade:
        return self._upgrade(request, "ws", select_subprotocol(request))

    def websocket_sub(self, request: Request, topic: str) -> Upgrade:
        return self._upgrade(request, "sub", select_subprotocol(request), topic)

    def echo(self, request: Request) -> Upgrade:
        return self._upgrade(request, "echo")

    def _upgrade(self, request: Request, kind: str, subprotocol: str | None = None, topic: str | None = None) -> Upgrade:
        key = self._check_upgrade(request)
        if topic is not None:
            topic = _url_topic(topic, self.config.max_topic_length)
        extensions = params = None
        if self.config.permessage_deflate:
            extensions, params = negotiate(request.fields.get("sec-websocket-extensions", ()))
        return Upgrade(kind, handshake_response(key, subprotocol, extensions), topic, params)

    def _check_upgrade(self, request: Request) -> str:
        key = check_handshake(request)
        origin = request.header("origin")
        if self.config.allowed_origins and origin is not None and origin not in self.config.allowed_origins:
            raise HTTPError(403, f"origin {origin!r} is not allowed")
        if self.broker.connections >= self.config.max_connections:
            raise HTTPError(503, f"connection limit ({self.config.max_connections}) reached: try again later", [("Retry-After", "1")])
        return key

    # -- pages and JSON

    def index(self, request: Request) -> Response:
        return Response(302, b"", "text/plain", [("Location", "/docs")])

    def docs_page(self, request: Request) -> Response:
        return Response(200, self.docs, "text/html; charset=utf-8")

    def healthz(self, request: Request) -> Response:
        """200 "ok"; 503 while the backbone (Redis) cannot be reached, so a load balancer sends new
        clients to a process that can serve them."""
        healthy = getattr(self.broker.backbone, "healthy", None)
        if healthy is not None and not healthy():
            raise HTTPError(503, "the backbone (Redis) cannot be reached")
        return Response(200, b"ok\n", "text/plain; charset=utf-8")

    def stats(self, request: Request) -> Response:
        return json_response(200, self.broker.stats(), [("Cache-Control", "no-store")])

    def metrics(self, request: Request) -> Response:
        return Response(200, self.broker.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8", [("Cache-Control", "no-store")])

    def openapi_json(self, request: Request) -> Response:
        return json_response(200, openapi_document(self.config))

    def asyncapi_json(self, request: Request) -> Response:
        return json_response(200, asyncapi_document(self.config, request.header("host")))

    def openapi_page(self, request: Request) -> Response:
        return Response(200, openapi_html(openapi_document(self.config)).encode(), "text/html; charset=utf-8")

    # -- publishing over HTTP

    def demo_publish(self, request: Request, topic: str) -> Response:
        topic = _url_topic(topic, self.config.max_topic_length)
        try:
            data = dict(urllib.parse.parse_qsl(request.query, keep_blank_values=True, errors="strict"))
        except UnicodeDecodeError:
            raise HTTPError(400, "query string is not valid UTF-8") from None
        message_id = f"demo-{next(self._demo_ids)}-{secrets.token_hex(4)}"
        return self._publish("demo", topic, message_id, data, lambda r: {
            "ok": True, "topic": topic, "messageId": r.message_id, "seqNo": r.seq_no, "subscribers": r.subscribers,
        }, self.broker.auth.grants("demo"))  # the ACL file's grants for the user "demo", if there is one

    def post_publish(self, request: Request) -> Response:
        scheme, _, token = (request.header("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self.broker.auth.refused("http", "no bearer token")
            raise HTTPError(401, "send Authorization: Bearer <token>", [("WWW-Authenticate", "Bearer")])
        try:
            claims = self.broker.auth.verify(token.strip())
        except ClientError as exc:
            self.broker.auth.refused("http", exc.message)
            raise HTTPError(401, exc.message, [("WWW-Authenticate", 'Bearer error="invalid_token"')]) from None
        user_id, grants = claims.sub, self.broker.auth.grants(claims.sub, claims)
        try:
            body = _decode(request.body.decode())
        except (ValueError, RecursionError):
            raise HTTPError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HTTPError(400, 'body must be a JSON object {"topic", "messageId"?, "data"}')
        return self._publish(user_id, body.get("topic"), body.get("messageId"), body.get("data"), lambda r: {
            "status": r.status, "messageId": r.message_id, "seqNo": r.seq_no,
        }, grants)

    def _publish(
        self, user_id: str, topic: Any, message_id: Any, data: Any, answer: Callable[[PublishResult], dict], grants: Grants | None = None
    ) -> PendingResponse:
        """Publish through the broker; the response is answer(result) once the backbone has it."""
        pending = PendingResponse()

        def done(result: PublishResult | ClientError) -> None:
            if isinstance(result, ClientError):
                status = 503 if result.code == "BACKBONE_UNAVAILABLE" else 400
                pending.resolve(error_response(HTTPError(status, result.message)))
            else:
                pending.resolve(json_response(200, answer(result)))

        try:
            self.broker.publish_checked(user_id, topic, message_id, data, "http", done, grants)
        except ClientError as exc:
            raise HTTPError(403 if exc.code == "ACL_DENIED" else 400, exc.message) from None
        return pending


def _url_topic(raw: str, max_length: int) -> str:
    """The topic in a URL path segment, percent-decoded as UTF-8 and checked; else HTTP 400."""
    try:
        topic = urllib.parse.unquote(raw, errors="strict")
        return check_topic(topic, max_length)
    except UnicodeDecodeError:
        raise HTTPError(400, "topic is not valid UTF-8") from None
    except ClientError as exc:
        raise HTTPError(400, f"invalid topic: {exc.message}") from None


def openapi_document(config: Config) -> dict:
    """OpenAPI 3.1 description of the HTTP routes, with schemas and examples."""

    def error(example: str) -> dict:
        return {
            "description": example,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}, "example": {"error": example}}},
        }

    def body(ref: str, text: str, example: Any) -> dict:
        return {"description": text, "content": {"application/json": {"schema": {"$ref": ref}, "example": example}}}

    def page(text: str, media: str = "text/html") -> dict:
        return {"description": text, "content": {media: {"schema": {"type": "object" if media == "application/json" else "string"}}}}

    not_allowed = error("method POST not allowed")
    upgrade_errors = {
        "400": error("Sec-WebSocket-Key must be base64 of 16 bytes"),
        "403": error("origin 'https://elsewhere.example' is not allowed"),
        "426": error("this endpoint speaks WebSocket"),
        "503": error(f"connection limit ({config.max_connections}) reached: try again later"),
        "405": not_allowed,
    }
    topic_parameter = {"name": "topic", "in": "path", "required": True, "description": "percent-encoded UTF-8", "schema": _TOPIC}
    stats_example = {"connections": 2, "topics": 1, "subscriptions": 2, "published": 10, "delivered": 20, "replayed": 0, "duplicates": 1, "sessions": 2}
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "Redirect to /docs", "responses": {"302": {"description": "to /docs (Location header)"}, "405": not_allowed}}},
        "/docs": {"get": {"summary": "Protocol reference and live console", "responses": {"200": page("HTML page"), "405": not_allowed}}},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}, "example": "ok\n"}}}, "405": not_allowed}}},
        "/stats": {"get": {"summary": "Counters (exact at every moment)", "responses": {"200": body("#/components/schemas/Stats", "current counters", stats_example), "405": not_allowed}}},
        "/metrics": {"get": {"summary": "Prometheus text exposition", "responses": {"200": page("metrics", "text/plain"), "405": not_allowed}}},
        "/openapi.json": {"get": {"summary": "This document", "responses": {"200": page("OpenAPI 3.1", "application/json"), "405": not_allowed}}},
        "/openapi": {"get": {"summary": "This document as a page", "responses": {"200": page("HTML page"), "405": not_allowed}}},
        "/asyncapi.json": {"get": {"summary": "AsyncAPI 3.0 document of the WebSocket protocol", "responses": {"200": page("AsyncAPI 3.0", "application/json"), "405": not_allowed}}},
        "/publish": {
            "post": {
                "summary": "Publish a message as the token's user (same auth, checks and dedup as a WebSocket publish)",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/PublishRequest"},
                            "example": {"topic": "prices", "messageId": "order-1", "data": {"btc": 97000}},
                        }
                    },
                },
                "responses": {
                    "200": body("#/components/schemas/PublishResponse", "accepted, or a duplicate with the original seqNo", {"status": "ok", "messageId": "order-1", "seqNo": 1}),
                    "400": error("body is not valid JSON"),
                    "401": error("send Authorization: Bearer <token>"),
                    "403": error("not allowed to write this topic"),
                    "405": error("method GET not allowed"),
                    "411": error("Transfer-Encoding is not supported: send a Content-Length"),
                    "413": error(f"request body over {config.max_body_size} bytes"),
                },
            }
        },
        "/ws": {"get": {"summary": "WebSocket: one connection, many topics (messages: /asyncapi.json)", "responses": {"101": {"description": "switching protocols"}, **upgrade_errors}}},
        "/ws/sub/{topic}": {
            "get": {
                "summary": "WebSocket bound to one topic, subscribed after setup",
                "parameters": [topic_parameter],
                "responses": {"101": {"description": "switching protocols"}, **upgrade_errors},
            }
        },
    }
    if demo_publish(config):
        paths["/demo/publish/{topic}"] = {
            "get": {
                "summary": "Publish the query parameters (values stay strings) as a message from user 'demo'",
                "parameters": [
                    topic_parameter,
                    {"name": "params", "in": "query", "style": "form", "explode": True, "schema": {"type": "object", "additionalProperties": {"type": "string"}}, "example": {"k": "v"}},
                ],
                "responses": {
                    "200": body("#/components/schemas/DemoPublishResponse", "published", {"ok": True, "topic": "prices", "messageId": "demo-1-9f1c2ab0", "seqNo": 1, "subscribers": 0}),
                    "400": error("invalid topic: topic is empty"),
                    "405": not_allowed,
                },
            }
        }
    if config.echo:
        paths["/echo"] = {"get": {"summary": "WebSocket echo, for conformance testing", "responses": {"101": {"description": "switching protocols"}, **upgrade_errors}}}
    integer = {"type": "integer", "minimum": 0}
    document = {
        "openapi": "3.1.0",
        "info": {"title": "microsocket", "version": __version__, "description": "HTTP API of the Micro Socket pub/sub gateway. The WebSocket messages are in /asyncapi.json."},
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "any non-empty token in demo auth; a JWT (HS256 or RS256) when the server has a key"}},
            "schemas": {
                "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
                "Stats": {
                    "type": "object",
                    "required": ["connections", "topics", "subscriptions"],
                    "properties": {k: integer for k in ("connections", "topics", "subscriptions", "published", "delivered", "replayed", "duplicates", "sessions")},
                },
                "PublishRequest": {
                    "type": "object",
                    "required": ["topic"],
                    "properties": {"topic": _TOPIC, "messageId": _MESSAGE_ID, "data": {}},
                },
                "PublishResponse": {
                    "type": "object",
                    "required": ["status", "messageId", "seqNo"],
                    "properties": {"status": {"enum": ["ok", "duplicate"]}, "messageId": {"type": "string"}, "seqNo": integer},
                },
                "DemoPublishResponse": {
                    "type": "object",
                    "required": ["ok", "topic", "messageId", "seqNo", "subscribers"],
                    "properties": {"ok": {"const": True}, "topic": {"type": "string"}, "messageId": {"type": "string"}, "seqNo": integer, "subscribers": integer},
                },
            },
        },
    }
    return configured(document, config.max_topic_length, config.max_message_id_length)


def protocol_limits(config: Config) -> dict:
    """The limits a client can run into, as this server is configured (camelCase, seconds, bytes)."""
    return {
        "maxMessageSize": config.max_message_size,
        "maxTopicLength": config.max_topic_length,
        "maxMessageIdLength": config.max_message_id_length,
        "maxSubscriptions": config.max_subscriptions,
        "maxConnections": config.max_connections,
        "maxPending": config.max_pending,
        "maxBuffer": config.max_buffer,
        "maxBuffered": config.max_buffered,
        "maxHeadSize": config.max_head_size,
        "maxBodySize": config.max_body_size,
        "maxSessions": config.max_sessions,
        "maxSessionTopics": config.max_session_topics,
        "dedupPerUser": config.dedup_per_user,
        "dedupTotal": config.dedup_total,
        "historyBytes": config.history_bytes,
        "maxTopics": config.max_topics,
        "handshakeTimeout": config.handshake_timeout,
        "closeTimeout": config.close_timeout,
        "publishRate": config.publish_rate,
        "publishBurst": config.publish_burst,
        "dedupWindow": config.dedup_window,
        "historyMessages": config.history_messages,
        "historyAge": config.history_age,
        "sessionTtl": config.session_ttl,
        "setupTimeout": config.setup_timeout,
        "pingInterval": config.ping_interval,
        "pingTimeout": config.ping_timeout,
        "demoPublish": demo_publish(config),
        "maxPresence": config.max_presence,
        "maxConnectionsPerUser": config.max_connections_per_user,
        "jwtLeeway": config.jwt_leeway,
        "demoAuth": demo_auth(config),
        "signing": bool(config.sign_keys),
        "permessageDeflate": config.permessage_deflate,
        "echo": config.echo,
    }


def asyncapi_document(config: Config, host: str | None = None) -> dict:
    """AsyncAPI 3.0 description of the WebSocket protocol, from CLIENT_MESSAGES and SERVER_MESSAGES.

    Operations are written from the server's side: it receives client messages, sends the others.
    """
    messages: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    for direction, table in (("client", CLIENT_MESSAGES), ("server", SERVER_MESSAGES)):
        for kind, summary, properties, required, example in table:
            name = f"{direction}.{kind}"
            properties = configured(properties, config.max_topic_length, config.max_message_id_length)
            schemas[name] = message_schema(kind, properties, required)
            messages[name] = {
                "name": kind,
                "title": f"{kind} ({'client to server' if direction == 'client' else 'server to client'})",
                "summary": summary,
                "contentType": "application/json",
                "payload": {"$ref": f"#/components/schemas/{name}"},
                "examples": [{"payload": example}],
            }
    channel_messages = {name: {"$ref": f"#/components/messages/{name}"} for name in messages}
    channels = {
        "ws": {"address": "/ws", "title": "One connection, many topics", "messages": channel_messages},
        "wsSub": {
            "address": "/ws/sub/{topic}",
            "title": "A connection bound to one topic (subscribed after setup)",
            "parameters": {"topic": {"description": "the topic, percent-encoded"}},
            "messages": channel_messages,
        },
    }
    operations = {}
    for channel in channels:
        for name in messages:
            direction, kind = name.split(".")
            operations[f"{channel}.{'receive' if direction == 'client' else 'send'}.{kind}"] = {
                "action": "receive" if direction == "client" else "send",
                "channel": {"$ref": f"#/channels/{channel}"},
                "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"}],
            }
    if host is None:  # the address clients used (the request's Host), else the configured one
        host = (config.host if ":" not in config.host else f"[{config.host}]") + f":{config.port}"
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "microsocket",
            "version": __version__,
            "description": "Micro Socket pub/sub over WebSocket: every message is one JSON object in one text frame.",
            # The limits this server runs with, so pages and clients show the live values, not copies.
            "x-limits": protocol_limits(config),
        },
        "defaultContentType": "application/json",
        "servers": {"local": {"host": host, "protocol": "wss" if config.certfile else "ws"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }



def openapi_html(doc: dict) -> str:
    """A self-contained page listing the OpenAPI document's operations (no network loads)."""
    rows = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = ", ".join(op.get("responses", {}))
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op.get('summary', ''))}</td><td>{codes}</td></tr>"
            )
    raw = html.escape(json.dumps(doc, indent=2))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8"><title>microsocket API</title>'
        '<link rel="icon" href="data:,">'  # no /favicon.ico request (it would be a 404)
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}"
        "table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ccc;padding:.3rem;text-align:left}"
        "pre{background:#f4f4f4;padding:1rem;overflow:auto}</style></head><body>"
        f"<h1>{html.escape(doc['info']['title'])} HTTP API {html.escape(doc['info']['version'])}</h1>"
        '<p>OpenAPI 3.1 document: <a href="/openapi.json">/openapi.json</a>. WebSocket messages: <a href="/docs">/docs</a>.</p>'
        "<table><tr><th>method</th><th>path</th><th>what</th><th>responses</th></tr>" + "".join(rows) + "</table>"
        f"<h2>Document</h2><pre>{raw}</pre></body></html>"
    )


# === 15. Server I/O (asyncio) =====================================================================
#
# The only section that uses asyncio. One `ServerConnection` per TCP connection, an
# asyncio.Protocol: no task and no await per connection or per message. It starts in HTTP mode and
# switches to WebSocket mode after a 101. Outgoing frames collect in the client's outbox; at the end
# of each event-loop turn `Server._flush` writes every dirty outbox with one transport.write, so a
# burst of deliveries costs one syscall per connection, not one per message. A connection that
# still has more than `max_buffer` unsent when more is to be written is a slow consumer: closed
# with 4001, without holding anyone else back. A batch over WRITE_CHUNK (a long replay) is written
# only as far as the socket takes it; the rest is the connection's `stream`, continued from
# resume_writing as the client reads. Input is handled FRAMES_PER_TURN frames per turn (section 6):
# the rest waits, the socket unread, for a later turn.
#
# Timers: one tick a second walks the connections (no timer object per connection). It cuts an
# HTTP connection whose request head is not complete within the handshake timeout (slowloris, and
# idle keep-alive), closes with 4000 a WebSocket that has not sent `setup` within the setup timeout,
# pings a connection that has been silent for the ping interval, and closes with 1011 one that then
# stays silent for the ping timeout. Any bytes received count as a sign of life. The same sweep adds
# up what every connection holds (`buffered`): over --max-buffered, the largest holders are closed.

TICK = 1.0  # seconds between timer sweeps: the resolution of every timeout above
_CLOSE_REASONS = {CloseCode.SESSION_TAKEN_OVER: "session taken over by another connection", CloseCode.TOKEN_EXPIRED: "token expired"}


class ServerConnection(Peer, asyncio.Protocol):
    __slots__ = (
        "server", "transport", "reader", "ws", "closing_since", "lost", "deadline", "active", "idle_since", "ping_sent",
        "answering", "backlogged", "input_held", "deferred", "stream", "stream_bytes", "deflate",
    )

    def __init__(self, server: Server) -> None:
        Peer.__init__(self, server.broker)
        self.server = server
        self.transport: Any = None
        self.reader: RequestReader | None = RequestReader(server.config.max_head_size, server.config.max_body_size)
        self.ws: WebSocketConnection | None = None
        self.closing_since: float | None = None  # when our close frame went out, waiting for theirs
        self.lost = False
        self.deadline = server.clock() + server.config.handshake_timeout  # HTTP head, then setup
        self.active = False  # bytes arrived since the last tick
        self.idle_since = 0.0
        self.ping_sent = 0.0  # when our keepalive ping went out; 0 when none is outstanding
        self.answering = False  # an HTTP response is pending: later requests wait for it
        self.backlogged = False  # HTTP responses unsent past MAX_HTTP_UNSENT: later requests wait for the client to read
        self.input_held = False  # the broker holds this connection's requests (pause_input)
        self.deferred = False  # input is left for a later turn (FRAMES_PER_TURN): reading stops meanwhile
        self.stream: list[bytes] | None = None  # frames not written yet: the socket took enough for now
        self.stream_bytes = 0
        self.deflate: DeflateParams | None = None  # permessage-deflate agreed: frames go out compressed

    # -- asyncio callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        server.connections.add(self)
        self._count_as_pending()

    def _count_as_pending(self) -> None:
        """Count this connection among those that are not (or no longer) WebSocket connections."""
        server = self.server
        pending = server.pending
        pending[self] = None
        if len(pending) > server.config.max_pending:
            # Bare TCP connections that never send a request must not use up the file
            # descriptors: the one idle longest makes room, so fresh clients (and /healthz) get in.
            oldest = next(iter(pending))
            del pending[oldest]
            oldest.transport.abort()
            server.evicted += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.connections.discard(self)
        self.server.pending.pop(self, None)
        ws = self.ws
        if ws is not None:
            if self.broker is not None:
                self.broker.disconnect(self, reliable=False)  # dropped without a closing handshake
            code = ws.close_sent if ws.close_sent is not None else ws.close_code
            self.server.broker.closed(code if code is not None else CloseCode.ABNORMAL_CLOSURE)

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.ws is not None:
            self._websocket_data(data)
        elif self.reader is not None:
            pending = self.server.pending
            if self in pending:
                pending.move_to_end(self)  # active: the one idle longest is evicted first
            self._http_data(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed peer gets no more answers

    # -- HTTP mode

    def _http_data(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while self.reader is not None and not self.lost and not self.answering and not self.backlogged:
            try:
                request = reader.next_request()
            except HTTPError as exc:
                self._respond(error_response(exc), keep_alive=False, head=False)
                return
            if request is None:
                if reader.expects_continue:
                    reader.expects_continue = False
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            result = self.server.app.handle(request)
            if isinstance(result, Upgrade):
                self._upgrade(result, bytes(reader.buffer))
                return
            if isinstance(result, PendingResponse):
                self.answering = True
                self.transport.pause_reading()  # nothing more is read until this is answered
                result.then(lambda response, request=request: self._answered(response, request))
                continue
            self.deadline = self.server.clock() + self.server.config.handshake_timeout
            self._respond(result, request.keep_alive, request.method == "HEAD")
            if self.reader is not None and self.transport.get_write_buffer_size() > MAX_HTTP_UNSENT:
                # A client that pipelines requests and does not read their answers is answered as
                # it reads: the rest waits (and the socket is not read) until resume_writing.
                self.backlogged = True
                self.transport.pause_reading()
                return

    def resume_writing(self) -> None:
        """asyncio: the unsent data drained below the low-water mark. Go on with the rest of a long
        answer, then with the requests that waited."""
        if self.stream is not None and not self.lost:
            stream, self.stream, self.stream_bytes = self.stream, None, 0
            self._write(stream)
            self._spend_credit()
        if self.inbox is not None and self.broker is not None and not self.lost:
            self.broker.run_inbox(self)  # WebSocket requests that waited for the client to read
        if self.backlogged and not self.lost and self.reader is not None:
            self.backlogged = False
            if not self.answering:
                self.transport.resume_reading()
                self._http_data(b"")

    def _answered(self, response: Response, request: Request) -> None:
        """A pending response is ready: write it, then go on with requests that came after it."""
        self.answering = False
        if self.lost or self.reader is None:
            return
        self.deadline = self.server.clock() + self.server.config.handshake_timeout
        self._respond(response, request.keep_alive, request.method == "HEAD")
        if self.reader is not None and not self.backlogged:
            self.transport.resume_reading()
            self._http_data(b"")

    def _respond(self, response: Response, keep_alive: bool, head: bool) -> None:
        self.transport.write(response.serialize(keep_alive, head))
        if not keep_alive:
            self.reader = None
            self.transport.close()

    def _upgrade(self, upgrade: Upgrade, rest: bytes) -> None:
        self.server.pending.pop(self, None)  # a WebSocket now: max_connections counts it
        self.reader = None
        self.transport.write(upgrade.response)
        self.ws = WebSocketConnection(self.server.config.max_message_size, upgrade.deflate)
        self.deflate = upgrade.deflate
        self.bound_topic = upgrade.topic
        self.is_echo = upgrade.kind == "echo"
        self.deadline = self.server.clock() + self.server.config.setup_timeout
        self.broker.connect(self)
        if rest:
            self._websocket_data(rest)

    # -- WebSocket mode

    def _websocket_data(self, data: bytes) -> None:
        ws = self.ws
        if ws.state == CLOSED:
            return  # failed, and waiting for the peer to close: what it still sends is dropped
        events = ws.receive_data(data)
        broker = self.broker
        if events and broker is not None:
            echo = self.is_echo
            for opcode, payload in events:
                if opcode == OP_TEXT:
                    if echo:
                        self.send(serialize_frame(opcode, payload.encode()))
                    else:
                        broker.handle(self, payload)
                elif opcode == Opcode.PONG:
                    self.send(payload)  # the answer to a ping, in its place
                elif echo:
                    self.send(serialize_frame(opcode, payload))
                else:
                    broker.handle_binary(self)
        if ws.state != OPEN:
            self._finish(ws.data_to_send())
        if ws.more and not self.lost:
            self._defer()

    def _defer(self) -> None:
        """Parse the rest of the input in a later turn, after the other connections had theirs."""
        if not self.deferred:
            self.deferred = True
            self.transport.pause_reading()
            self.server.loop.call_soon(self._next_slice)

    def _next_slice(self) -> None:
        self.deferred = False
        if self.lost or self.input_held:
            return  # pause_input(False) goes on with it
        self._websocket_data(b"")
        if not self.deferred and not self.input_held and not self.lost:
            self.transport.resume_reading()

    def backlog(self) -> int:
        return Peer.backlog(self) + self.stream_bytes + (self.transport.get_write_buffer_size() if self.transport is not None else 0)

    def pause_input(self, paused: bool) -> None:
        """The broker holds this connection's requests (a resume runs, or its output is unread): stop reading meanwhile."""
        if self.lost or self.transport is None:
            return
        self.input_held = paused
        if paused:
            self.transport.pause_reading()
        elif self.ws is not None and self.ws.more:
            self._defer()  # frames already read wait first
        elif not self.deferred:
            self.transport.resume_reading()

    def close_websocket(self, code: int, reason: str = "", reliable: bool = True) -> None:
        """Start the closing handshake from the server side (1001, 4001, ...)."""
        ws = self.ws
        if ws is None or self.lost or ws.state != OPEN:
            return
        if self.broker is not None and not reliable:
            self.broker.disconnect(self, reliable=False)
        ws.close(code, reason)
        self._finish(ws.data_to_send())

    def _finish(self, last: bytes) -> None:
        """Write what is queued and the close frame; stop delivering to this client."""
        transport = self.transport
        # The rest of a long answer goes first, then the outbox, then the close frame.
        frames = self.stream or []
        self.stream, self.stream_bytes = None, 0
        if self.broker is not None and self.out:
            frames += self.out
            self.out.clear()
        if frames:
            last = b"".join(self._wire(frames)) + last
        if self.broker is not None:
            # "Last handed" is trusted only when the peer ended the connection with a close frame.
            self.broker.disconnect(self, reliable=self.ws.close_code is not None)
        if last:
            transport.write(last)
        if self.ws.state == CLOSED and self.ws.close_code is None and transport.can_write_eof():
            # This side failed the connection (§7.1.7) while the peer may still be sending (the
            # rest of a message over the limit): closing now would answer that data with a TCP
            # reset, which can destroy the close frame before the peer reads it. So the close
            # frame is followed by a FIN, and what still arrives is read and dropped until the
            # peer closes too, or close_timeout has passed.
            transport.write_eof()
            transport.resume_reading()
            if self.closing_since is None:
                self.closing_since = self.server.clock()
            # Not a WebSocket connection any more: it counts against --max-pending, so clients
            # that fail and never close cannot hold more sockets than that.
            self._count_as_pending()
        elif self.ws.state == CLOSED:
            transport.close()  # §7.1.1: the server closes the TCP connection first
        elif self.closing_since is None:
            self.closing_since = self.server.clock()  # the sweep drops TCP after close_timeout

    def flush(self) -> None:
        """Write the outbox, or close a slow consumer.

        A consumer is slow when what it has not yet taken from earlier writes is over the limit
        when more is to be written. Measured before the write, so one message larger than the
        limit (a 16 MiB echo) is not mistaken for a reader that stopped, and without the bytes of
        a replay or resume that have not drained yet (`replay_credit`), so a long catch-up is not
        either.
        """
        if self.close_request is not None:
            code, self.close_request = self.close_request, None
            self.close_websocket(code, _CLOSE_REASONS.get(code, ""))
            return
        if self.lost or self.broker is None or not self.out:
            return
        unsent = self.transport.get_write_buffer_size() + self.stream_bytes
        if unsent - self.replay_credit > self.server.config.max_buffer:
            log.info("closing a slow consumer: %d bytes unsent", unsent)
            self.shed(CloseCode.SLOW_CONSUMER, "slow consumer: outgoing buffer over the limit")
            return
        if self.stream is not None:
            # A long answer is still going out as the socket drains: what follows queues behind it.
            out = self.out
            self.stream += out
            self.stream_bytes += sum(map(len, out))
            out.clear()
        else:
            self._write(self.out)
        self._spend_credit()
        if self.inbox is not None and self.held is None:
            # Requests that waited for this output to be written: the socket took it (or
            # resume_writing will say when it has drained).
            self.broker.run_inbox(self)

    def _write(self, frames: list[bytes]) -> None:
        """Write `frames` in order, and empty the list. A batch over WRITE_CHUNK goes in pieces,
        and only while the socket's buffer is under its high-water mark: the rest becomes the
        stream, which resume_writing continues as the client reads. So a replay of a topic's
        whole history is never copied into one buffer, nor held twice."""
        transport = self.transport
        if len(frames) == 1:
            transport.write(frames[0] if self.deflate is None else self.server.broker.deflater.frame(frames[0], self.deflate.server_max_window_bits))
        elif sum(map(len, frames)) <= WRITE_CHUNK:
            transport.write(b"".join(self._wire(frames)))
        else:
            high = transport.get_write_buffer_limits()[1]
            start = size = 0
            for end, frame in enumerate(frames, 1):
                size += len(frame)
                if size < WRITE_CHUNK and end < len(frames):
                    continue
                # Compressed as they go out: a long replay costs the compressor only what the
                # client reads.
                transport.write(b"".join(self._wire(frames[start:end])))
                start, size = end, 0
                if end < len(frames) and transport.get_write_buffer_size() > high:
                    # Over the high-water mark asyncio has paused us: resume_writing will follow.
                    self.stream = frames[end:]
                    self.stream_bytes = sum(map(len, self.stream))
                    break
        frames.clear()

    def _wire(self, frames: list[bytes]) -> list[bytes]:
        """The frames as they go on the wire: compressed where permessage-deflate was agreed."""
        if self.deflate is None:
            return frames
        deflate, bits = self.server.broker.deflater.frame, self.deflate.server_max_window_bits
        return [deflate(frame, bits) for frame in frames]

    def _spend_credit(self) -> None:
        if self.replay_credit:
            # Output drains in order, so the replayed bytes still unsent are at most what is
            # unsent now: the credit shrinks as the client reads.
            self.replay_credit = min(self.replay_credit, self.transport.get_write_buffer_size() + self.stream_bytes)

    def shed(self, code: int, reason: str) -> None:
        """Drop what is queued for this client and close it with `code` (4001: its output is
        over a limit). Not sent: the client resumes from history."""
        self.out.clear()
        self.stream, self.stream_bytes = None, 0
        self.close_websocket(code, reason, reliable=False)

    def buffered(self) -> int:
        """Bytes this connection makes the server hold: input not handled yet, output not sent
        yet. A connection already closing counts 0: it is on its way out (close_timeout)."""
        if self.lost or self.closing_since is not None or self.transport is None:
            return 0
        held = self.transport.get_write_buffer_size()
        if self.ws is not None:
            return held + self.ws.buffered() + self.stream_bytes + Peer.backlog(self)
        if self.reader is not None:
            return held + len(self.reader.buffer)
        return held

    def over_budget(self) -> None:
        """Closed to keep the server within --max-buffered: by what it holds most of."""
        if self.ws is None:
            self.transport.abort()  # an HTTP request whose head or body is unfinished
        elif self.ws.buffered() > self.buffered() // 2:
            self.close_websocket(CloseCode.TRY_AGAIN_LATER, "server buffer budget reached: unfinished message dropped")
        else:
            self.shed(CloseCode.SLOW_CONSUMER, "server buffer budget reached: unsent data dropped")

    def tick(self, now: float) -> None:
        """Apply the timeouts (called once per TICK, with the server's clock)."""
        ws = self.ws
        if ws is None:
            if self.reader is not None and now > self.deadline:
                self.reader = None
                self.transport.close()  # request head not complete in time (or idle keep-alive)
            return
        if self.closing_since is not None:
            if now - self.closing_since >= self.server.config.close_timeout:
                self.transport.abort()  # no close frame from the peer in time
            return
        if ws.state != OPEN or self.is_echo or self.broker is None:
            return  # closing already (a taken-over session waits for its close request)
        config = self.server.config
        if self.user_id is None and now > self.deadline:
            self.close_websocket(CloseCode.SETUP_TIMEOUT, f"no setup within {config.setup_timeout:g} s")
        elif self.active:
            self.active = False
            self.idle_since = now
            self.ping_sent = 0.0
        elif self.ping_sent:
            if now - self.ping_sent > config.ping_timeout:
                # What is still unsent may never arrive: resume must not trust "last handed".
                self.close_websocket(CloseCode.INTERNAL_ERROR, "no pong in time", reliable=False)
        elif config.ping_interval and now - self.idle_since >= config.ping_interval:
            self.ping_sent = now
            self.send(serialize_frame(Opcode.PING, b""))


class Server:
    """The gateway: `await start()`, `publish(...)`, `await close()`; or `serve_forever()`."""

    def __init__(
        self, config: Config | None = None, clock: Callable[[], float] = time.monotonic, backbone: Backbone | None = None
    ) -> None:
        self.config = config or Config()
        self.clock = clock  # every timer reads this clock: tests move it, then call tick()
        if backbone is None:
            config = self.config
            if config.redis:
                backbone = RedisBackbone(config, clock, url=config.redis, prefix=config.redis_prefix, timeout=config.redis_timeout)
            else:
                backbone = MemoryBackbone(config, clock)
        self.backbone = backbone
        self.broker = Broker(self.config, self.backbone, self._schedule_flush, clock)
        self.app = App(self.config, self.broker)
        self.connections: set[ServerConnection] = set()
        self.pending: collections.OrderedDict = collections.OrderedDict()  # not WebSocket (yet), oldest first
        self.evicted = 0  # pending connections closed to make room since the last sweep (logged there)
        self.buffered = 0  # bytes held for clients at the last sweep (input not handled, output not sent)
        self.shed = 0  # connections closed to stay within max_buffered, since start
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._server: asyncio.AbstractServer | None = None
        self._flush_scheduled = False
        self._ticker: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        start = getattr(self.backbone, "start", None)  # a backbone with connections of its own (Redis)
        if start is not None:
            await start()
        self._server = await self.loop.create_server(
            lambda: ServerConnection(self),
            self.config.host,
            self.config.port,
            backlog=LISTEN_BACKLOG,
            ssl=tls_context(self.config),
            reuse_port=self.config.reuse_port or None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = self.loop.call_later(TICK, self._tick)
        if self.broker.auth.demo:
            log.warning("demo auth: any non-empty token is accepted and becomes the userId; "
                        "give --jwt-secret or --jwt-keys before this server faces the internet")
        if demo_publish(self.config) and not self.broker.auth.demo:
            log.warning("--demo: GET /demo/publish publishes without a token")

    @property
    def url(self) -> str:
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        scheme = "https" if self.config.certfile else "http"
        return f"{scheme}://{host}:{self.port}"

    def publish(self, topic: str, data: Any, message_id: str | None = None, user_id: str | None = None) -> asyncio.Future:
        """Publish from Python code, with the same checks, seqNo and dedup as a client publish.

        Returns a future of the PublishResult: `await server.publish(...)`. The publish is sent at
        once, awaited or not. Without `user_id` it publishes as "server", past any ACL; naming a
        user applies that user's grants from the ACL file (PermissionError when denied). A bad
        topic, messageId or payload raises ValueError here; a failure of the backbone is raised
        by the future.
        """
        future = self.loop.create_future()

        def done(result: PublishResult | ClientError) -> None:
            if future.done():
                return
            if isinstance(result, ClientError):
                future.set_exception(ValueError(result.message))
            else:
                future.set_result(result)

        grants = None if user_id is None else self.broker.auth.grants(user_id)
        try:
            self.broker.publish_checked("server" if user_id is None else user_id, topic, message_id, data, "py", done, grants)
        except ClientError as exc:
            raise (PermissionError if exc.code == "ACL_DENIED" else ValueError)(exc.message) from None
        return future

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self.loop is not None:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for conn in self.broker.take_dirty():
            try:
                conn.flush()
            except Exception:  # one broken connection must not strand the others of the batch
                log.exception("flush failed for a connection; dropping it")
                conn.transport.abort()
        self.broker.flushed(self.clock())

    def _tick(self) -> None:
        self._ticker = self.loop.call_later(TICK, self._tick)  # first: a failure below cannot stop the timers
        self.tick()

    def tick(self) -> None:
        """Run the timer sweep now, at the server clock's time: timeouts, keepalive pings, and
        forgetting expired sessions, history and idle topics. The event loop calls it every TICK."""
        now = self.clock()
        if self.evicted:
            log.warning("closed %d connections that had not finished a request (or had failed and were not closed by "
                        "the client), to stay within max-pending %d",
                        self.evicted, self.config.max_pending)
            self.evicted = 0
        held = 0
        for conn in list(self.connections):
            try:
                conn.tick(now)
                held += conn.buffered()
            except Exception:
                log.exception("timer sweep failed for a connection; dropping it")
                conn.transport.abort()
        self.buffered = held
        if held > self.config.max_buffered > 0:
            self._shed(held)
        self.broker.sweep(now)

    def _shed(self, held: int) -> None:
        """Over --max-buffered: close the largest holders until what is held fits again."""
        budget = self.config.max_buffered
        holders = sorted(((conn.buffered(), id(conn), conn) for conn in self.connections), reverse=True)
        closed = 0
        for size, _, conn in holders:
            if held <= budget or not size:
                break
            conn.over_budget()
            held -= size
            closed += 1
        self.shed += closed
        log.warning("server buffer budget reached (max-buffered %d bytes): closed the %d connections holding most", budget, closed)

    async def close(self, code: int = CloseCode.GOING_AWAY, grace: float | None = None) -> None:
        """Stop accepting, flush, close every connection with `code`, wait up to `grace` seconds."""
        if self._server is None:
            return
        grace = self.config.shutdown_grace if grace is None else grace
        self._server.close()
        self._ticker.cancel()
        self._flush()
        for conn in list(self.connections):
            if conn.ws is not None:
                conn.close_websocket(code, "server shutting down")
            else:
                conn.transport.close()
        deadline = self.loop.time() + grace
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.transport.abort()
        await asyncio.sleep(0)
        close = getattr(self.backbone, "close", None)
        if close is not None:
            await close()  # after every connection was detached: what they wrote is answered first
        self._server = None

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Start, print the URLs, serve until `stop` is set, then close."""
        await self.start()
        ws_url = self.url.replace("http", "ws", 1)
        print(f"microsocket {__version__} listening on {self.url}", flush=True)
        print(f"  docs and console  {self.url}/docs", flush=True)
        print(f"  WebSocket         {ws_url}/ws", flush=True)
        stop = stop or asyncio.Event()
        await stop.wait()
        log.info("shutting down")
        await self.close()


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A server TLS context from --certfile/--keyfile (I7), or None for plain TCP."""
    if not config.certfile:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.certfile, config.keyfile or None)
    return context


# === 16. Client (asyncio) =========================================================================
#
# A subscriber's and publisher's side of the protocol, for Python services: `connect(url, token)`
# gives a `Client` that keeps one *session* alive over as many TCP connections as it takes.
#
# Theory of operation. Three layers, as on the server side:
#
# - `handshake_request` / `check_response`: the opening handshake, sans-I/O (RFC 6455 §4.1).
# - `_Connection`, an asyncio.Protocol: one TCP connection. It checks the 101, then reads frames
#   with section 3's codec (server frames are unmasked, §5.1; fragments reassembled, text checked
#   as UTF-8 fragment by fragment, the message size bounded before a payload is buffered), answers
#   pings, echoes a close, and writes every frame masked with a fresh random key (§5.3). A
#   Protocol rather than streams for the reason the server has one, and one more: a reply is
#   acted on inside `data_received`, before the next frame of the same read is looked at. The
#   message after `subscribed {seqNo: N}` may be in the same TCP segment; with a reader task and
#   awaiting callers it would be examined before subscribe()'s coroutine had set the position.
#   Backpressure: while the caller has not taken `max_queue` items, the socket is not read and
#   what was read already is not parsed, so the queue holds at most that many; except while a
#   caller awaits a reply (`async for m in client: await client.publish(...)` must not deadlock).
# - `Client`: requests carry an `id` and are matched by it; a supervisor task reconnects (backoff
#   with jitter) after the close codes in RECONNECT_CODES, sends `setup`, then `resume`, then the
#   requests that were not answered (each is idempotent: a publish keeps its messageId, so a retry
#   is deduplicated). Anything else ends the client: the error is raised by pending calls and, once
#   the items already received are taken, by the iterator.
#
# Exactly once, in order, per topic. Each topic holds (epoch, last, known): the last seqNo handed
# to the iterator's queue and the highest one known to exist. A message `last + 1` is taken; one
# at or below `last` is a repeat and dropped; one beyond `last + 1` is a gap: it is dropped too,
# `known` remembers it, and `replay {fromSeq: last + 1, epoch}` fetches the gap and everything up
# to what the server delivered before its reply (live messages follow the reply), so nothing is
# held out of order. History that no longer holds a gap (REPLAY_UNAVAILABLE, or `resumed.missed`)
# becomes a `Missed` item before the messages after it. A new epoch (an unasked `subscribed`, or
# another epoch in `subscribed`, `resumed.epochs`) yields `Missed(..., to_seq=None)` for the old
# epoch and starts again from 0, filling the new epoch from its seqNo 1. Frames that arrive during
# a `resume` are held until `resumed` says each topic's epoch (the replayed gap does not carry it);
# past `max_queue` of them they are dropped and fetched again by replay.
#
# Positions go to the server as `ack {topic, seqNo}` once the iterator has handed a message over
# (coalesced per event-loop turn), and `resume` always sends the client's own lastSeqPerTopic.

CLIENT_OPEN_TIMEOUT = 10.0  # seconds for TCP, TLS and the 101 together (the server allows HANDSHAKE_TIMEOUT for a head)
# Items received and not yet taken by `async for`. Past it the socket is not read: the server's
# buffer fills, it closes with 4001 and the client resumes from history (SPEC I4), instead of
# either side buffering without bound. Reading starts again at half, and goes on while a caller
# awaits a reply (that caller may be the consumer). Memory: about max_queue times the message size
# (as in the websockets library's max_queue).
CLIENT_MAX_QUEUE = 1000
RECONNECT_DELAY = 0.25  # seconds before the first reconnect attempt; doubled per failed attempt ...
RECONNECT_MAX_DELAY = 30.0  # ... up to this. Each wait is drawn from [delay/2, delay] (jitter): the
# clients a restart dropped together do not all come back in the same instant.
REFRESH_BEFORE = 60.0  # seconds before ready.expiresAt that token_refresh is called; the server closes at exp + its leeway
FILL_RETRY = 1.0  # seconds before a gap fill refused for a passing reason (BACKBONE_UNAVAILABLE) is asked again
# SPEC §2 close codes whose "client" column says reconnect; 1012 (service restart) and 1013 (try
# again later: the server's buffer budget) are RFC 6455 §7.4's temporary conditions.
RECONNECT_CODES = frozenset((1001, 1006, 1011, 1012, 1013, 4000, 4001))
_CLOSE_TEXT = {
    CloseCode.NORMAL_CLOSURE: "closed",
    CloseCode.SESSION_TAKEN_OVER: "session taken over by another connection",
    CloseCode.TOKEN_EXPIRED: "token expired",
}


class Message(NamedTuple):
    """A delivered message; `kid` and `sig` when the server signs."""

    topic: str
    seq_no: int
    message_id: str
    data: Any
    epoch: str  # the topic's epoch this seqNo belongs to
    kid: str | None = None
    sig: str | None = None


class Missed(NamedTuple):
    """What will not be delivered on `topic`: seqNos from_seq..to_seq of `epoch`. `reason`:
    "history" (no longer retained), "epoch" (the topic's sequence started again; to_seq is None:
    whatever the old epoch held after from_seq - 1, if anything) or "unsubscribed" (the server
    ended the subscription, ACL_DENIED after a refresh or at resume; to_seq is None)."""

    topic: str
    epoch: str
    from_seq: int
    to_seq: int | None
    reason: str


class Ack(NamedTuple):
    message_id: str
    status: str  # "ok", or "duplicate": published before (seq_no is the original's)
    seq_no: int


class Subscribed(NamedTuple):
    topic: str
    seq_no: int  # the topic's latest when subscribed: the first message delivered is seq_no + 1
    epoch: str


class Presence(NamedTuple):
    topic: str
    users: list[str]
    count: int


class MicrosocketError(Exception):
    """An `error` reply, raised by the call that made the request: `code` is the server's error
    code ("ACL_DENIED", ...), `message` its text, `context` its other fields (`topic`,
    `messageId`, `field`, `oldestSeq`, `epoch`); the first three are attributes too."""

    def __init__(self, code: Any, message: str, **context: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.context = context
        self.topic = context.get("topic")
        self.message_id = context.get("messageId")
        self.field = context.get("field")


class ConnectionClosed(MicrosocketError):
    """The client stopped for good; `code` is the close code (an int) that ended it: 4002 (session
    taken over), 4003 (token expired), 1002/1007/1009 (a protocol failure), 1000 (closed)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason or _CLOSE_TEXT.get(code, "connection closed"))
        self.reason = reason


class HandshakeError(MicrosocketError):
    """The opening handshake failed; `status` is the HTTP status when the server answered one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__("HANDSHAKE_FAILED", message, status=status)
        self.status = status


class SignatureError(MicrosocketError):
    """Raised by the iterator for a message whose `sig` is missing or does not verify under the
    client's signing keys; `item` is the Message. It counts as delivered: iterating goes on after it."""

    def __init__(self, item: Message) -> None:
        super().__init__("BAD_SIGNATURE", "missing or invalid message signature", topic=item.topic, messageId=item.message_id)
        self.item = item


def error_from(reply: dict) -> MicrosocketError:
    """The exception for an `error` reply."""
    context = {k: v for k, v in reply.items() if k not in ("type", "code", "message", "id")}
    return MicrosocketError(reply.get("code"), str(reply.get("message", "")), **context)


class _Lost(Exception):
    """Internal: the connection a request was sent on ended before its reply (close code, reason)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


# -- the opening handshake (sans-I/O)


def handshake_request(host: str, path: str, key: str) -> bytes:
    """The client's opening handshake (RFC 6455 §4.1), offering SUBPROTOCOL and no extension."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        f"User-Agent: microsocket/{__version__}\r\n\r\n"
    ).encode()


def check_response(head: bytes, key: str) -> None:
    """Check the response head (without its CRLF CRLF) to handshake_request; raise HandshakeError.
    §4.1: "The client MUST validate the server's response as follows"."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status, _, phrase = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not (status.isdigit() and len(status) == 3):
        raise HandshakeError(f"not an HTTP response: {lines[0][:80]!r}")
    if status != "101":  # step 1: anything else is answered "per HTTP procedures": here, an error
        raise HandshakeError(f"the server answered {status} {phrase}".rstrip(), int(status))
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HandshakeError(f"malformed header line {line[:80]!r}")
        fields.setdefault(name.strip().lower(), []).append(value.strip())

    def tokens(name: str) -> set[str]:
        return {token.strip().lower() for value in fields.get(name, ()) for token in value.split(",")}

    if "websocket" not in tokens("upgrade"):  # step 2
        raise HandshakeError("the 101 has no 'Upgrade: websocket'")
    if "upgrade" not in tokens("connection"):  # step 3
        raise HandshakeError("the 101 has no 'Connection: Upgrade'")
    if fields.get("sec-websocket-accept") != [accept_key(key)]:  # step 4
        raise HandshakeError("Sec-WebSocket-Accept does not match the key sent")
    if fields.get("sec-websocket-extensions"):  # step 5: none was offered, so none may be in use
        raise HandshakeError("the server selected an extension that was not offered")
    # Step 6 fails a subprotocol that was not offered; this client also fails its absence: a
    # server that does not select microsocket.v1 does not say it speaks this protocol's version 1.
    if fields.get("sec-websocket-protocol") != [SUBPROTOCOL]:
        raise HandshakeError(f"the server did not select the {SUBPROTOCOL} subprotocol")


# -- one TCP connection


class _Connection(asyncio.Protocol):
    """One TCP connection of a Client: the 101, then frames. Complete text messages go to
    `client._received(self, text)`; `lost` resolves to (close code, reason) when TCP is gone,
    1006 when no close frame came."""

    def __init__(self, client: Client, request: bytes, key: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.request = request
        self.key = key
        self.opened: asyncio.Future = self.loop.create_future()  # done once the 101 is checked
        self.lost: asyncio.Future = self.loop.create_future()
        self.transport: Any = None
        self.buffer = bytearray()
        self.state = OPEN
        self.close_received: tuple[int, str] | None = None
        self.failed: int | None = None  # the code this side failed the connection with (§7.1.7)
        self.paused = False
        self.last_seen = self.loop.time()  # any bytes at all count as a sign of life
        self.max_size = client.max_message_size
        self._opcode = 0  # TEXT or BINARY while a message is open
        self._parts: list = []
        self._size = 0
        self._decoder: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.last_seen = self.loop.time()
        self.buffer += data
        if not self.opened.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD_SIZE:
                    self._refuse(HandshakeError(f"response head over {MAX_HEAD_SIZE} bytes"))
                return
            head = bytes(self.buffer[:end])
            del self.buffer[: end + 4]
            try:
                check_response(head, self.key)
            except HandshakeError as exc:
                self._refuse(exc)
                return
            self.opened.set_result(None)
        self._parse()

    def _refuse(self, exc: HandshakeError) -> None:
        self.opened.set_exception(exc)
        self.state = CLOSED
        self.transport.abort()

    def _parse(self) -> None:
        buf = self.buffer
        pos = 0
        try:
            while self.state != CLOSED and not self.paused:  # paused: the rest waits in the buffer
                header = parse_header(buf, pos, self.max_size)  # a frame over the limit: 1009 before buffering it
                if header is None or len(buf) - pos < header.size + header.length:
                    break
                if header.mask is not None:
                    # §5.1: "A client MUST close a connection if it detects a masked frame."
                    raise ProtocolError("server frames must not be masked")
                start = pos + header.size
                pos = start + header.length
                self._frame(header.opcode, header.fin, bytes(buf[start:pos]))
        except ProtocolError as exc:
            self.fail(exc.code, exc.reason)
            return
        del buf[:pos]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode >= Opcode.CLOSE:
            self._control(opcode, payload)
            return
        if opcode == Opcode.CONT:
            if not self._opcode:
                raise ProtocolError("continuation frame without a message to continue")  # §5.4
        elif self._opcode:
            raise ProtocolError("new data frame while a fragmented message is open")  # §5.4
        else:
            self._opcode, self._size = opcode, 0
            self._decoder = _utf8_decoder() if opcode == Opcode.TEXT else None
        self._size += len(payload)
        if self._size > self.max_size:
            raise PayloadTooBig(f"message over the {self.max_size}-byte limit")
        if self._decoder is not None:
            try:
                payload = self._decoder.decode(payload, fin)
            except UnicodeDecodeError:
                # §8.1: text that is not UTF-8 "MUST _Fail the WebSocket Connection_" (1007).
                raise ProtocolError("invalid UTF-8 in a text message", CloseCode.INVALID_DATA) from None
        self._parts.append(payload)
        if fin:
            parts, text = self._parts, self._opcode == Opcode.TEXT
            self._parts, self._opcode, self._decoder = [], 0, None
            if self.state != OPEN:
                return  # after our close frame, data is read only to reach the server's
            if text:
                self.client._received(self, "".join(parts))
            else:
                log.warning("client: a binary message from the server, ignored (SPEC §2: text frames only)")

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode == Opcode.PING:
            # §5.5.2: "Upon receipt of a Ping frame, an endpoint MUST send a Pong frame in
            # response", with "identical "Application data"".
            self._write(Opcode.PONG, payload)
        elif opcode == Opcode.CLOSE:
            self.close_received = parse_close(payload)
            if self.state == OPEN:
                # §5.5.1: "the endpoint MUST send a Close frame in response", echoing the code.
                self._write(Opcode.CLOSE, serialize_close(self.close_received[0]))
            self.state = CLOSED
            # §7.1.1: the server closes TCP first; if it does not in time, the client does.
            self.loop.call_later(self.client.close_timeout, self.abort)
        # A pong needs nothing: last_seen moved already.

    def _write(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            # §5.3: every client frame is masked, with "a fresh masking key" that "MUST be derived
            # from a strong source of entropy" (os.urandom).
            self.transport.write(serialize_frame(opcode, payload, mask=os.urandom(4)))

    def send(self, text: str) -> None:
        if self.state == OPEN:
            self._write(Opcode.TEXT, utf8(text))

    def ping(self) -> None:
        if self.state == OPEN:
            self._write(Opcode.PING, b"")

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake (§7.1.2); TCP goes when the server answers, or after close_timeout."""
        if self.state == OPEN:
            self._write(Opcode.CLOSE, serialize_close(code, reason))
            self.state = CLOSING
            self.loop.call_later(self.client.close_timeout, self.abort)
        elif self.transport is not None and not self.opened.done():
            self.transport.abort()

    def fail(self, code: int, reason: str) -> None:
        """_Fail the WebSocket Connection_ (§7.1.7): a close frame with `code`, then close TCP."""
        if self.state == OPEN:
            self._write(Opcode.CLOSE, serialize_close(code, reason))
        self.failed = code
        self.state = CLOSED
        log.warning("client: failing the connection with %d: %s", code, reason)
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause(self, paused: bool) -> None:
        """Stop (True) or go on (False) reading: frames already read wait unparsed meanwhile."""
        if paused != self.paused and self.transport is not None:
            self.paused = paused
            (self.transport.pause_reading if paused else self.transport.resume_reading)()
            if not paused and self.buffer and self.opened.done():
                self._parse()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffer and self.opened.done() and self.state != CLOSED:
            self.paused = False
            self._parse()  # what was read before TCP went, a close frame perhaps (4002 must not look like 1006)
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("the connection closed during the opening handshake"))
        if self.close_received is not None:
            code, reason = self.close_received
        elif self.failed is not None:
            code, reason = self.failed, ""
        else:
            code, reason = CloseCode.ABNORMAL_CLOSURE, str(exc or "")
        self.state = CLOSED
        if not self.lost.done():
            self.lost.set_result((code, reason))
        self.client._lost(self, code, reason)


# -- the client


class _Call:
    """A request waiting for its reply. `conn`: sent on that connection only (setup, resume, a gap
    fill), forgotten when it ends; None: the caller's, sent again after a reconnect until answered."""

    __slots__ = ("msg", "text", "conn", "on_reply", "future")

    def __init__(self, msg: dict, conn: _Connection | None, on_reply: Callable[[dict], None] | None, future: asyncio.Future | None) -> None:
        self.msg = msg
        self.text = encode(msg)  # here, so a payload that is not JSON raises in the caller (TypeError, ValueError)
        self.conn = conn
        self.on_reply = on_reply  # called inside data_received, before the next frame is looked at
        self.future = future


class _Stream:
    """One subscribed topic: `last` is the last seqNo queued for the caller (None until the first
    `subscribed` says where it starts), `known` the highest seqNo known to exist, in `epoch`."""

    __slots__ = ("topic", "epoch", "last", "known", "filling")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.epoch = ""
        self.last: int | None = None
        self.known = 0
        self.filling = False  # a replay for the gap last+1..known is on its way


class Client:
    """A Micro Socket session that outlives its connections; see `connect` and the section preface.

    Iterate it (`async for item in client`) for `Message` and `Missed` items; it raises
    `ConnectionClosed` (or `MicrosocketError` AUTH_FAILED) once the session cannot go on, and stops
    after `aclose()`. Every request method raises MicrosocketError on an `error` reply.
    """

    def __init__(
        self,
        url: str,
        token: str,
        *,
        token_refresh: Callable[[], Awaitable[str]] | None = None,
        refresh_before: float = REFRESH_BEFORE,
        signing_keys: dict[str, bytes] | None = None,
        ssl: ssl.SSLContext | None = None,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_queue: int = CLIENT_MAX_QUEUE,
        reconnect_delay: float = RECONNECT_DELAY,
        max_reconnect_delay: float = RECONNECT_MAX_DELAY,
        open_timeout: float = CLIENT_OPEN_TIMEOUT,
        close_timeout: float = CLOSE_TIMEOUT,
        ping_interval: float = PING_INTERVAL,
        ping_timeout: float = PING_TIMEOUT,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        secure = parts.scheme == "wss"
        self._host = parts.hostname
        self._port = parts.port or (443 if secure else 80)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._host_header = host if parts.port is None else f"{host}:{parts.port}"
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._ssl = _tls_context(secure, ssl)
        self._token = token
        self._token_refresh = token_refresh
        self._refresh_before = refresh_before
        self._signing = SigningKeys(signing_keys.items()) if signing_keys else None  # ValueError as for --sign-key
        self.max_message_size = max_message_size
        self.max_queue = max_queue
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.open_timeout = open_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.session_id: str | None = None
        self.user_id: str | None = None
        self.epoch: str | None = None  # ready.epoch of the server the session lives on
        self.expires_at: float | None = None  # the token's exp (Unix time), from ready / refreshed
        self.reconnects = 0  # successful re-attachments after a lost connection
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._awaited = 0  # calls in _calls that a caller awaits (they have a future)
        self._topics: dict[str, _Stream] = {}
        self._queue: collections.deque = collections.deque()  # Message, Missed, SignatureError
        self._wakeup: asyncio.Future | None = None
        self._acks: dict[str, tuple[str, int]] = {}  # topic -> (epoch, seqNo) handed over, not yet acked
        self._ack_scheduled = False
        self._replays: dict[str, list[tuple[int, int | None, dict]]] = {}  # replay() calls collecting messages
        self._holding: list[dict] | None = None  # frames held while a resume runs
        self._held_past: dict[str, int] = {}  # topic -> highest seqNo dropped while holding was full
        self._conn: _Connection | None = None
        self._open = False  # attached: the caller's requests go straight to the wire
        self._failure: MicrosocketError | None = None
        self._closing = False
        self._supervisor: asyncio.Task | None = None
        self._refresher: asyncio.Task | None = None

    # -- life cycle

    async def __aenter__(self) -> Client:
        return await self._start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    def __await__(self) -> Any:
        return self._start().__await__()

    async def _start(self) -> Client:
        """Open the first connection and set up; its failures are raised as they are (OSError,
        HandshakeError, MicrosocketError AUTH_FAILED, ...): a wrong URL or token fails at once."""
        if self._supervisor is None:
            try:
                await self._attach()
            except BaseException as exc:
                await self.aclose()
                if isinstance(exc, _Lost):  # closed during setup: said as the close it was
                    raise ConnectionClosed(exc.code, exc.reason) from None
                raise
            self._supervisor = asyncio.get_running_loop().create_task(self._supervise())
        return self

    async def aclose(self) -> None:
        """Close: ack what was handed over, then the closing handshake (1000), waiting up to
        close_timeout for the server's close frame. Pending calls raise ConnectionClosed(1000)."""
        if self._closing:
            return
        self._closing = True
        for task in (self._supervisor, self._refresher):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        conn = self._conn
        if conn is not None and conn.transport is not None and not conn.lost.done():  # it got as far as TCP
            self._send_acks()
            conn.close()
            await asyncio.wait([conn.lost], timeout=self.close_timeout)
            conn.abort()
        self._finish(ConnectionClosed(CloseCode.NORMAL_CLOSURE, "closed by the client"))

    def _finish(self, exc: MicrosocketError) -> None:
        """No more requests: every pending call raises `exc`; the iterator does too after the queue
        (or stops, when the caller closed)."""
        if self._failure is None:
            self._failure = exc
        for call in self._calls.values():
            if call.future is not None and not call.future.done():
                call.future.set_exception(exc)
                call.future.exception()  # retrieved: a caller that gave up must not make a warning
        self._calls.clear()
        self._awaited = 0
        self._wake()
        if self._refresher is not None:
            self._refresher.cancel()

    def _fail(self, exc: MicrosocketError) -> None:
        log.warning("client: the session ends: %s", exc)
        self._finish(exc)
        if self._conn is not None:
            self._conn.close()

    async def _supervise(self) -> None:
        """Watch the connection; after a close code in RECONNECT_CODES, attach again with backoff."""
        attempt = 0
        while True:
            code, reason = await self._watch(self._conn)
            while True:
                if self._closing:
                    return
                if code not in RECONNECT_CODES:
                    self._fail(ConnectionClosed(code, reason))
                    return
                delay = min(self.max_reconnect_delay, self.reconnect_delay * 2**attempt)
                attempt += 1
                await asyncio.sleep(random.uniform(delay / 2, delay))
                try:
                    await self._attach()
                except _Lost as lost:
                    code, reason = lost.code, lost.reason
                    continue
                except (OSError, asyncio.TimeoutError) as exc:
                    if isinstance(exc, ssl.SSLCertVerificationError):
                        self._fail(HandshakeError(f"TLS: {exc}"))
                        return
                    log.info("client: reconnect attempt %d failed: %s", attempt, exc)
                    code = CloseCode.ABNORMAL_CLOSURE
                    continue
                except MicrosocketError as exc:
                    if _transient(exc):
                        log.info("client: reconnect attempt %d failed: %s", attempt, exc)
                        code = CloseCode.TRY_AGAIN_LATER
                        continue
                    self._fail(exc)
                    return
                except Exception as exc:  # token_refresh failed, or a bug: said, never a silent stop
                    log.exception("client: reconnecting failed")
                    self._fail(MicrosocketError("CLIENT_ERROR", f"reconnecting failed: {exc!r}"))
                    return
                attempt = 0
                self.reconnects += 1
                break

    async def _watch(self, conn: _Connection) -> tuple[int, str]:
        """Wait for `conn` to end. Silent for ping_interval: ping it (§5.5.2); still silent after
        ping_timeout: drop it (1006), so a half-open TCP connection is noticed. Not while paused."""
        loop = asyncio.get_running_loop()
        while not conn.lost.done():
            idle = loop.time() - conn.last_seen
            interval = self.ping_interval
            if not interval or conn.paused or idle < interval:
                await asyncio.wait([conn.lost], timeout=(interval - idle if idle < interval else interval) or None)
                continue
            conn.ping()
            sent = loop.time()
            await asyncio.wait([conn.lost], timeout=self.ping_timeout)
            if conn.last_seen < sent and not conn.paused and not conn.lost.done():
                log.info("client: no answer to a ping in %g s: dropping the connection", self.ping_timeout)
                conn.abort()
                await asyncio.wait([conn.lost])
        return conn.lost.result()

    async def _open_connection(self) -> _Connection:
        key = base64.b64encode(os.urandom(16)).decode()  # §4.1: "a randomly selected 16-byte value"
        conn = _Connection(self, handshake_request(self._host_header, self._path, key), key)
        loop = asyncio.get_running_loop()
        self._conn = conn
        try:
            await asyncio.wait_for(self._connect(loop, conn), self.open_timeout)
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _connect(self, loop: asyncio.AbstractEventLoop, conn: _Connection) -> None:
        server_hostname = self._host if self._ssl is not None else None
        await loop.create_connection(lambda: conn, self._host, self._port, ssl=self._ssl, server_hostname=server_hostname)
        await conn.opened

    async def _attach(self) -> None:
        """One connection: handshake, setup, then (after the first) resume; then the requests and
        acks that waited. Raises what stopped it; the supervisor decides whether to retry."""
        if self._token_refresh is not None and self.expires_at is not None and time.time() > self.expires_at - self._refresh_before:
            self._token = await self._token_refresh()  # coming back after the token ran out
        conn = await self._open_connection()
        try:
            ready = await self._call({"type": "setup", "token": self._token}, conn)
            self.user_id, self.expires_at = ready["userId"], ready.get("expiresAt")
            if self.session_id is None:
                self.session_id, self.epoch = ready["sessionId"], ready["epoch"]
            else:
                await self._resume(conn, ready)
        except BaseException:
            conn.close()
            raise
        self._open = True
        for call in list(self._calls.values()):
            if call.conn is None:
                conn.send(call.text)  # in the order they were made: replies keep it
        self._send_acks()
        self._schedule_refresh()

    async def _resume(self, conn: _Connection, ready: dict) -> None:
        """SPEC I6: re-attach the session's topics with the client's own positions and epochs.
        An expired session (or a restarted server) is replaced by the new one: every topic is
        subscribed again, and what the new position skips is filled by replay (or reported)."""
        positions = {t: s.last for t, s in self._topics.items() if s.last is not None}
        msg = {"type": "resume", "sessionId": self.session_id, "lastSeqPerTopic": positions,
               "epochs": {t: self._topics[t].epoch for t in positions}, "epoch": self.epoch}
        self._holding, self._held_past = [], {}
        try:
            await self._call(msg, conn, self._resumed)
        except MicrosocketError as exc:
            if exc.code != "SESSION_EXPIRED":
                raise
            log.info("client: session %s expired (or the server restarted): subscribing again", self.session_id)
            self.session_id, self.epoch = ready["sessionId"], ready["epoch"]
            for stream in self._topics.values():
                if stream.last is not None:
                    self._resubscribe(stream)
        finally:
            self._holding = None

    def _resumed(self, reply: dict) -> None:
        """The `resumed` reply (or the error), acted on before anything after it is read."""
        held, self._holding = self._holding or [], None
        if reply.get("type") != "resumed":
            return
        for topic, epoch in reply.get("epochs", {}).items():
            stream = self._topics.get(topic)
            if stream is not None and stream.last is not None and epoch != stream.epoch:
                self._new_epoch(stream, epoch, 0)
        for gap in reply.get("missed", ()):
            stream = self._topics.get(gap["topic"])
            if stream is not None and stream.last is not None:
                self._skip(stream, gap["oldestSeq"] - 1, "history")
        for msg in held:
            self._received_msg(msg)
        for topic, seq in self._held_past.items():
            stream = self._topics.get(topic)
            if stream is not None:
                stream.known = max(stream.known, seq)
        attached = set(reply.get("topics", ()))
        for topic in attached - self._topics.keys():
            self._send({"type": "unsubscribe", "topic": topic}, self._conn)  # left while it was away
        for stream in list(self._topics.values()):
            if stream.last is None:
                continue  # its subscribe is among the calls sent again
            if stream.topic in attached:
                self._fill(stream)
            else:
                self._resubscribe(stream)

    def _schedule_refresh(self) -> None:
        if self._refresher is not None and self._refresher is not asyncio.current_task():
            self._refresher.cancel()
        self._refresher = None
        if self._token_refresh is not None and self.expires_at is not None and not self._closing:
            delay = max(0.0, self.expires_at - self._refresh_before - time.time())
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_later(delay))

    async def _refresh_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await self.refresh(await self._token_refresh())
        except Exception as exc:  # the token service or the server refused: 4003 at expiry says the rest
            log.warning("client: refreshing the token failed: %r (the server closes with 4003 at expiry)", exc)

    # -- requests

    def _send(self, msg: dict, conn: _Connection | None = None, on_reply: Callable[[dict], None] | None = None,
              future: asyncio.Future | None = None) -> None:
        """Register a request under a new id and send it now, or once attached (conn None)."""
        msg["id"] = msg_id = next(self._ids)
        call = self._calls[msg_id] = _Call(msg, conn, on_reply, future)
        if future is not None:
            self._awaited += 1
            self._backpressure()  # its reply may be behind frames not read yet
        if conn is not None and conn.lost.done():  # gone before it could be sent: as if it went with it
            self._forget(msg_id)
            if future is not None:
                future.set_exception(_Lost(*conn.lost.result()))
        elif conn is not None:
            conn.send(call.text)
        elif self._open:
            self._conn.send(call.text)

    def _forget(self, msg_id: int) -> _Call | None:
        call = self._calls.pop(msg_id, None)
        if call is not None and call.future is not None:
            self._awaited -= 1
        return call

    async def _call(self, msg: dict, conn: _Connection | None = None, on_reply: Callable[[dict], None] | None = None) -> dict:
        """Send a request and return its reply; an `error` reply is raised as MicrosocketError."""
        if self._failure is not None:
            raise self._failure
        future = asyncio.get_running_loop().create_future()
        self._send(msg, conn, on_reply, future)
        try:
            reply = await future
        finally:
            self._forget(msg["id"])  # a caller that gave up is not sent again
        if reply.get("type") == "error":
            raise error_from(reply)
        return reply

    async def subscribe(self, topic: str) -> Subscribed:
        """Subscribe (idempotent); messages after the returned seq_no follow in the iterator."""
        stream = self._topics.get(topic)
        if stream is None:
            stream = self._topics[topic] = _Stream(topic)

        def subscribed(reply: dict) -> None:
            if self._topics.get(topic) is not stream:
                return  # unsubscribed meanwhile
            if reply.get("type") == "error":
                if stream.last is None:
                    del self._topics[topic]
            else:
                self._position(stream, reply["seqNo"], reply["epoch"])

        reply = await self._call({"type": "subscribe", "topic": topic}, on_reply=subscribed)
        return Subscribed(topic, reply["seqNo"], reply["epoch"])

    async def unsubscribe(self, topic: str) -> None:
        """Unsubscribe (idempotent): nothing more of `topic` is queued from now on."""
        self._topics.pop(topic, None)
        await self._call({"type": "unsubscribe", "topic": topic})

    async def publish(self, topic: str, payload: Any = None, message_id: str | None = None) -> Ack:
        """Publish; the Ack says "ok" or "duplicate" and the seqNo. Without `message_id` one is
        made; either way it is kept when the request is sent again after a reconnect, so a
        publish whose ack was lost is answered "duplicate" instead of published twice."""
        message_id = message_id or f"c-{secrets.token_hex(12)}"
        reply = await self._call({"type": "publish", "topic": topic, "messageId": message_id, "payload": payload})
        return Ack(reply["messageId"], reply["status"], reply["seqNo"])

    async def replay(self, topic: str, from_seq: int, to_seq: int | None = None) -> list[Message]:
        """The retained messages from_seq..to_seq (to the latest when None), in order; not
        passed to the iterator (those of a subscribed topic come there once anyway). History that
        no longer holds from_seq raises REPLAY_UNAVAILABLE (context: oldestSeq, epoch); a bad
        signature raises SignatureError."""
        got: dict[int, dict] = {}
        entry = (from_seq, to_seq, got)
        self._replays.setdefault(topic, []).append(entry)
        try:
            reply = await self._call({"type": "replay", "topic": topic, "fromSeq": from_seq})
        finally:
            entries = self._replays[topic]
            entries.remove(entry)
            if not entries:
                del self._replays[topic]
        last = reply["toSeq"] if to_seq is None else min(to_seq, reply["toSeq"])
        items = [self._item(got[seq], reply["epoch"]) for seq in sorted(got) if seq <= last]
        for item in items:
            if isinstance(item, SignatureError):
                raise item
        return items

    async def presence(self, topic: str) -> Presence:
        """Who is subscribed to `topic`: the users (sorted, at most the server's limit) and the exact count."""
        reply = await self._call({"type": "presence", "topic": topic})
        return Presence(reply["topic"], reply["users"], reply["count"])

    async def refresh(self, token: str) -> float | None:
        """Replace the token (same user); returns the new expiresAt. Later reconnects use it."""
        reply = await self._call({"type": "refresh", "token": token})
        self._token, self.expires_at = token, reply.get("expiresAt")
        self._schedule_refresh()
        return self.expires_at

    # -- what the server sends

    def _received(self, conn: _Connection, text: str) -> None:
        if conn is not self._conn:
            return
        try:
            msg = json.loads(text)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError:
            log.warning("client: a server message that is not a JSON object, ignored")
            return
        try:
            self._received_msg(msg)
        except Exception:  # a malformed reply must not stop the connection's reading
            log.exception("client: failed to handle %r", text[:200])

    def _received_msg(self, msg: dict) -> None:
        kind, msg_id = msg.get("type"), msg.get("id")
        if self._holding is not None and msg_id is None:
            if kind != "message" or len(self._holding) < self.max_queue:
                self._holding.append(msg)
            else:  # dropped, to be fetched again by replay once `resumed` says the epochs
                self._held_past[msg["topic"]] = max(self._held_past.get(msg["topic"], 0), msg["seqNo"])
            return
        if kind == "message":
            self._message(msg)
        elif msg_id is not None:
            call = self._calls.get(msg_id)
            if call is None:
                return  # its caller gave up
            if kind == "error" and msg.get("code") == "ACL_DENIED" and call.msg["type"] == "resume":
                self._ended(msg.get("topic"))  # one per refused topic, before `resumed`
                return
            self._forget(msg_id)
            if call.on_reply is not None:
                call.on_reply(msg)
            if call.future is not None and not call.future.done():
                call.future.set_result(msg)
                self._backpressure()
        elif kind == "subscribed":  # unasked: the topic's counter started again in a new epoch
            stream = self._topics.get(msg["topic"])
            if stream is not None and stream.last is not None and msg["epoch"] != stream.epoch:
                self._new_epoch(stream, msg["epoch"], msg["seqNo"])
        elif kind == "error" and msg.get("code") == "ACL_DENIED" and msg.get("topic"):
            self._ended(msg["topic"])  # a refreshed token no longer covers it
        else:
            log.warning("client: unexpected %s from the server: %s", kind, msg.get("message", ""))

    def _message(self, msg: dict) -> None:
        topic, seq = msg["topic"], msg["seqNo"]
        for first, last, got in self._replays.get(topic, ()):
            if first <= seq and (last is None or seq <= last):
                got[seq] = msg
        stream = self._topics.get(topic)
        if stream is None or stream.last is None or seq <= stream.last:
            return  # not (yet) subscribed, or a repeat
        if seq == stream.last + 1:
            stream.last = seq
            stream.known = max(stream.known, seq)
            self._put(self._item(msg, stream.epoch))
        else:  # a gap: this one comes again with the replay that fills it
            stream.known = max(stream.known, seq)
            self._fill(stream)

    def _item(self, msg: dict, epoch: str) -> Message | SignatureError:
        item = Message(msg["topic"], msg["seqNo"], msg["messageId"], msg.get("data"), epoch, msg.get("kid"), msg.get("sig"))
        signing = self._signing
        if signing is not None and not signing.verify(item.kid, item.sig, item.topic, item.seq_no, item.message_id, item.data):
            return SignatureError(item)
        return item

    def _position(self, stream: _Stream, seq: int, epoch: str) -> None:
        """A `subscribed` for the stream: where a new subscription starts, or a gap (or a new
        epoch) for one that had a position."""
        if stream.last is None:
            stream.epoch, stream.last, stream.known = epoch, seq, seq
            return
        if epoch != stream.epoch:
            self._new_epoch(stream, epoch, 0)
        stream.known = max(stream.known, seq)
        self._fill(stream)

    def _new_epoch(self, stream: _Stream, epoch: str, seq: int) -> None:
        self._put(Missed(stream.topic, stream.epoch, stream.last + 1, None, "epoch"))
        stream.epoch, stream.last, stream.known, stream.filling = epoch, seq, seq, False

    def _skip(self, stream: _Stream, upto: int, reason: str) -> None:
        """Report last+1..upto as missed and go on after it."""
        if upto > stream.last:
            self._put(Missed(stream.topic, stream.epoch, stream.last + 1, upto, reason))
            stream.last = upto
            stream.known = max(stream.known, upto)

    def _ended(self, topic: Any) -> None:
        stream = self._topics.pop(topic, None)
        if stream is not None and stream.last is not None:
            self._put(Missed(topic, stream.epoch, stream.last + 1, None, "unsubscribed"))

    def _resubscribe(self, stream: _Stream) -> None:
        def subscribed(reply: dict) -> None:
            if self._topics.get(stream.topic) is stream:
                if reply.get("type") == "error":
                    self._ended(stream.topic)
                else:
                    self._position(stream, reply["seqNo"], reply["epoch"])

        self._send({"type": "subscribe", "topic": stream.topic}, self._conn, subscribed)

    def _fill(self, stream: _Stream) -> None:
        """Ask for the gap last+1..known, unless a replay for it is on its way already."""
        if stream.filling or stream.known <= stream.last or self._conn is None or self._conn.state != OPEN:
            return
        stream.filling = True
        epoch = stream.epoch

        def filled(reply: dict) -> None:
            if self._topics.get(stream.topic) is not stream or stream.epoch != epoch:
                return  # unsubscribed, or a new epoch started meanwhile
            stream.filling = False
            if reply.get("type") == "replayed":
                # The replay ran up to what was delivered before its reply: everything known.
                self._skip(stream, stream.known, "history")
            elif reply.get("code") == "REPLAY_UNAVAILABLE":
                if reply.get("epoch") == epoch:
                    self._skip(stream, reply["oldestSeq"] - 1, "history")
                    self._fill(stream)
                else:
                    self._new_epoch(stream, reply.get("epoch", ""), 0)
            else:
                log.info("client: gap fill of %r refused (%s): asking again", stream.topic, reply.get("code"))
                asyncio.get_running_loop().call_later(FILL_RETRY, self._fill, stream)

        self._send({"type": "replay", "topic": stream.topic, "fromSeq": stream.last + 1, "epoch": epoch}, self._conn, filled)

    def _lost(self, conn: _Connection, code: int, reason: str) -> None:
        """The connection ended: what was sent on it alone is forgotten (the resume covers it)."""
        if conn is not self._conn:
            return
        self._open = False
        lost = _Lost(code, reason)
        for msg_id, call in list(self._calls.items()):
            if call.conn is conn:
                self._forget(msg_id)
                if call.future is not None and not call.future.done():
                    call.future.set_exception(lost)
        for stream in self._topics.values():
            stream.filling = False

    # -- the iterator

    def _put(self, item: Any) -> None:
        self._queue.append(item)
        self._wake()
        if len(self._queue) >= self.max_queue:
            self._backpressure()

    def _backpressure(self) -> None:
        """Read while the caller has fewer than max_queue items to take (again from half of it),
        or while a caller awaits a reply: that caller may be the one who takes them, and its reply
        is behind what the server sent before it (bounded by the server's --max-buffer)."""
        conn = self._conn
        if conn is not None:
            if self._awaited or len(self._queue) <= self.max_queue // 2:
                conn.pause(False)
            elif len(self._queue) >= self.max_queue:
                conn.pause(True)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def __aiter__(self) -> Client:
        return self

    async def __anext__(self) -> Message | Missed:
        while not self._queue:
            if self._failure is not None:
                if self._closing:
                    raise StopAsyncIteration
                raise self._failure
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        item = self._queue.popleft()
        if len(self._queue) == self.max_queue // 2:
            self._backpressure()
        message = item.item if isinstance(item, SignatureError) else item
        if isinstance(message, Message):
            self._acks[message.topic] = (message.epoch, message.seq_no)
            if not self._ack_scheduled:
                self._ack_scheduled = True
                asyncio.get_running_loop().call_soon(self._send_acks)
        if isinstance(item, SignatureError):
            raise item
        return item

    def _send_acks(self) -> None:
        """`ack` the last message handed over per topic: the server's record of the position."""
        self._ack_scheduled = False
        if not self._open or self._conn is None:
            return  # kept for after the reconnect
        for topic, (epoch, seq) in self._acks.items():
            stream = self._topics.get(topic)
            if stream is not None and stream.epoch == epoch:
                self._conn.send(encode({"type": "ack", "topic": topic, "seqNo": seq}))
        self._acks.clear()


def _transient(exc: MicrosocketError) -> bool:
    """A refusal worth retrying later: the backbone or a limit, not the token or the request."""
    if isinstance(exc, HandshakeError):
        return exc.status is not None and (exc.status == 429 or exc.status >= 500)
    return exc.code in ("BACKBONE_UNAVAILABLE", "INTERNAL_ERROR", "TOO_MANY_CONNECTIONS")


def _tls_context(secure: bool, context: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """wss://: the given context, else the default one (certificates and host name verified)."""
    if not secure:
        if context is not None:
            raise ValueError("ssl= needs a wss:// URL")
        return None
    return context if context is not None else ssl.create_default_context()


def connect(url: str, token: str, **options: Any) -> Client:
    """A Client for `url` (ws:// or wss://, path /ws), authenticated with `token`: use it as
    `async with connect(...) as client:` (closed at the end) or `client = await connect(...)`.

    Options (keyword-only): `token_refresh` (async callable returning a new token; called
    `refresh_before` seconds before ready.expiresAt, and before reconnecting with an expired one),
    `signing_keys` ({kid: secret bytes}: every message must carry a valid `sig`, else the iterator
    raises SignatureError), `ssl` (an SSLContext for wss://), `max_message_size` (1009 past it),
    `max_queue`, `reconnect_delay`, `max_reconnect_delay`, `open_timeout`, `close_timeout`,
    `ping_interval` (0: no keepalive pings), `ping_timeout`.
    """
    return Client(url, token, **options)


# === 17. Command line =============================================================================
#
# One frozen Config, built from the command line in main() and passed down. Every option can also
# come from a MICROSOCKET_* environment variable (used as the argparse default).


@dataclasses.dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_message_size: int = MAX_MESSAGE_SIZE
    max_head_size: int = MAX_HEAD_SIZE
    max_body_size: int = MAX_BODY_SIZE
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    max_topic_length: int = MAX_TOPIC_LENGTH
    max_message_id_length: int = MAX_MESSAGE_ID_LENGTH
    max_connections: int = MAX_CONNECTIONS
    max_pending: int = MAX_PENDING
    max_buffer: int = MAX_BUFFER
    max_buffered: int = MAX_BUFFERED
    dedup_window: float = DEDUP_WINDOW
    dedup_per_user: int = DEDUP_PER_USER
    dedup_total: int = DEDUP_TOTAL
    history_messages: int = HISTORY_MESSAGES
    history_age: float = HISTORY_AGE
    history_bytes: int = HISTORY_BYTES
    max_topics: int = MAX_TOPICS
    close_timeout: float = CLOSE_TIMEOUT
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    setup_timeout: float = SETUP_TIMEOUT
    ping_interval: float = PING_INTERVAL
    ping_timeout: float = PING_TIMEOUT
    session_ttl: float = SESSION_TTL
    max_sessions: int = MAX_SESSIONS
    max_session_topics: int = MAX_SESSION_TOPICS
    publish_rate: float = PUBLISH_RATE
    publish_burst: int = PUBLISH_BURST
    shutdown_grace: float = SHUTDOWN_GRACE
    allowed_origins: tuple[str, ...] = ()
    certfile: str = ""
    keyfile: str = ""
    echo: bool = False
    permessage_deflate: bool = False  # accept RFC 7692 compression from clients that offer it
    demo: bool | None = None  # GET /demo/publish: None = on with demo auth, off with JWT
    jwt_secret: str | None = dataclasses.field(default=None, repr=False)
    jwt_keys: str | None = None  # path of a JWK Set file
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    jwt_leeway: float = JWT_LEEWAY
    acl: str | None = None  # path of the ACL file
    sign_keys: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # "KID=SECRET", the first signs
    max_presence: int = MAX_PRESENCE
    max_connections_per_user: int = 0  # 0 = no limit
    redis: str | None = dataclasses.field(default=None, repr=False)  # the URL may hold a password
    redis_prefix: str = "ms:"
    redis_timeout: float = REDIS_TIMEOUT
    workers: int = 1
    reuse_port: bool = False  # set in each worker by --workers: several processes listen on one port

    def __post_init__(self) -> None:
        """Refuse a configuration that cannot work, with the same words the CLI uses (ValueError)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{field.name.replace('_', '-')} must not be negative")
        if self.port > 65535:
            raise ValueError("port must be 0 to 65535")
        if self.keyfile and not self.certfile:
            raise ValueError("--keyfile needs --certfile")
        if self.redis:
            parse_redis_url(self.redis)
        check_prefix(self.redis_prefix)
        if not self.redis_timeout > 0:
            raise ValueError("redis-timeout must be more than 0 seconds")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.workers > 1 and not self.redis:
            raise ValueError("--workers needs --redis: the processes share their state (seqNos, dedup, history, sessions) through it")


# (flag, Config field, type, help); the default comes from Config or the environment.
_OPTIONS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, "address to listen on"),
    ("--port", "port", int, "TCP port, 0 for any free port"),
    ("--max-message-size", "max_message_size", int, "largest WebSocket message in bytes, across fragments; over it: close 1009"),
    ("--max-head-size", "max_head_size", int, "largest HTTP request line + headers in bytes; over it: HTTP 431"),
    ("--max-body-size", "max_body_size", int, "largest HTTP request body in bytes; over it: HTTP 413"),
    ("--max-subscriptions", "max_subscriptions", int, "topics per connection; over it: TOO_MANY_SUBSCRIPTIONS"),
    ("--max-topic-length", "max_topic_length", int, "characters in a topic; over it: INVALID_TOPIC"),
    ("--max-message-id-length", "max_message_id_length", int, "characters in a messageId; over it: INVALID_MESSAGE"),
    ("--max-connections", "max_connections", int, "open WebSocket connections; over it: HTTP 503"),
    ("--max-pending", "max_pending", int, "TCP connections that are not WebSocket (yet, or any more: failed, waiting for the client to close); over it the oldest is closed"),
    ("--max-buffer", "max_buffer", int, "unsent bytes per connection; over it: close 4001 (slow consumer)"),
    ("--max-connections-per-user", "max_connections_per_user", int, "set-up connections per userId (0 = no limit); over it: setup gets TOO_MANY_CONNECTIONS"),
    ("--max-presence", "max_presence", int, "users listed in a presence answer (its count stays exact)"),
    ("--jwt-secret", "jwt_secret", str, "HS256 key: the UTF-8 bytes of SECRET, at least 32; turns demo auth off"),
    ("--jwt-keys", "jwt_keys", str, "a JWK Set file: oct keys (HS256) and RSA keys (RS256, 2048 bits or more), each with an optional kid; turns demo auth off"),
    ("--jwt-audience", "jwt_audience", str, "the aud a token must name"),
    ("--jwt-issuer", "jwt_issuer", str, "the iss a token must name"),
    ("--jwt-leeway", "jwt_leeway", float, "seconds of clock skew allowed for exp, nbf and iat"),
    ("--acl", "acl", str, "the ACL file: JSON, userId or \"*\" -> {\"read\": [patterns], \"write\": [patterns]}; once given, what is not granted is denied"),
    ("--redis", "redis", str, "share state with other processes through this Redis: redis://[user:password@]host:port/db, rediss:// for TLS"),
    ("--redis-prefix", "redis_prefix", str, "prefix of every Redis key and channel (no { or })"),
    ("--redis-timeout", "redis_timeout", float, "seconds for any Redis request; past it: BACKBONE_UNAVAILABLE"),
    ("--workers", "workers", int, "processes serving this port (SO_REUSEPORT), sharing --redis; one that dies is restarted"),
    ("--max-buffered", "max_buffered", int, "bytes held for all clients together (unfinished input, unsent output); over it the largest holders are closed: 4001 for output, 1013 for an unfinished message"),
    ("--dedup-window", "dedup_window", float, "seconds a messageId is remembered per user"),
    ("--dedup-per-user", "dedup_per_user", int, "messageIds remembered per user (oldest forgotten first)"),
    ("--dedup-total", "dedup_total", int, "messageIds remembered in all (oldest forgotten first)"),
    ("--history-messages", "history_messages", int, "messages kept per topic for replay (0 turns history off)"),
    ("--history-age", "history_age", float, "seconds a message is kept for replay"),
    ("--history-bytes", "history_bytes", int, "bytes of messages kept for replay across all topics"),
    ("--max-topics", "max_topics", int, "sequenced topics kept; past it the least recently used idle one is forgotten early (its next use starts a new epoch)"),
    ("--close-timeout", "close_timeout", float, "seconds to wait for the peer's close frame"),
    ("--handshake-timeout", "handshake_timeout", float, "seconds to send a complete HTTP request head; past it: TCP closed"),
    ("--setup-timeout", "setup_timeout", float, "seconds from connect to setup; past it: close 4000"),
    ("--ping-interval", "ping_interval", float, "seconds of silence before a keepalive ping (0: no pings)"),
    ("--ping-timeout", "ping_timeout", float, "seconds to answer a keepalive ping; past it: close 1011"),
    ("--session-ttl", "session_ttl", float, "seconds a session outlives its connection, for resume"),
    ("--max-sessions", "max_sessions", int, "resumable sessions kept (oldest dropped first)"),
    ("--max-session-topics", "max_session_topics", int, "topic positions kept by resumable sessions in all (oldest session dropped first)"),
    ("--publish-rate", "publish_rate", float, "publishes per second per connection (0: no limit); past it: RATE_LIMITED"),
    ("--publish-burst", "publish_burst", int, "publishes allowed in a burst on top of the rate"),
    ("--shutdown-grace", "shutdown_grace", float, "seconds for closing handshakes at shutdown"),
    ("--certfile", "certfile", str, "TLS certificate (PEM): serve https:// and wss://"),
    ("--keyfile", "keyfile", str, "TLS private key (PEM), if not in the certificate file"),
]


def _env(name: str) -> str:
    return "MICROSOCKET_" + name.upper()


def _env_flag(field: str, default: bool) -> bool:
    value = os.environ.get(_env(field))
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microsocket.py",
        description="Micro Socket pub/sub gateway over WebSocket (RFC 6455), standard library only. "
        "Every option can also be set with the environment variable shown, e.g. MICROSOCKET_PORT=8080.",
        epilog="The client on the command line: `microsocket.py sub TOPIC... [--url URL] [--token TOKEN]` prints each "
        "message as a JSON line; `microsocket.py pub TOPIC [DATA]` publishes DATA or each line of stdin and prints "
        "the acks (`microsocket.py sub --help`, `microsocket.py pub --help`).",
    )
    defaults = Config()
    for flag, field, kind, text in _OPTIONS:
        default = os.environ.get(_env(field), getattr(defaults, field))
        shown = "unset" if field in ("jwt_secret", "redis") else "%(default)s"  # a secret (or a URL with a password) is never printed
        parser.add_argument(flag, dest=field, type=kind, default=default, metavar=kind.__name__.upper(), help=f"{text} [{_env(field)}] (default: {shown})")
    origins = os.environ.get("MICROSOCKET_ALLOWED_ORIGINS", "")
    parser.add_argument("--allowed-origin", dest="allowed_origins", action="append", default=None, metavar="ORIGIN", help="accept WebSocket handshakes only from this Origin (repeatable); others get HTTP 403; requests without Origin (non-browser clients) are accepted [MICROSOCKET_ALLOWED_ORIGINS, comma-separated] (default: any origin)")
    parser.set_defaults(allowed_origins_env=tuple(o.strip() for o in origins.split(",") if o.strip()))
    parser.add_argument("--reuse-port", action="store_true", default=_env_flag("reuse_port", False), help="listen with SO_REUSEPORT, beside other processes on the same port (what --workers sets in each worker) [MICROSOCKET_REUSE_PORT] (default: %(default)s)")
    parser.add_argument("--echo", action="store_true", default=_env_flag("echo", False), help="serve ws://.../echo, which echoes every message, for Autobahn|Testsuite [MICROSOCKET_ECHO] (default: %(default)s)")
    parser.add_argument("--permessage-deflate", action="store_true", default=_env_flag("permessage_deflate", False), help="accept permessage-deflate (RFC 7692) from clients that offer it: each broadcast compressed once, for every subscriber that negotiated it; costs CPU per message, saves bandwidth on JSON [MICROSOCKET_PERMESSAGE_DEFLATE] (default: %(default)s)")
    demo = os.environ.get("MICROSOCKET_DEMO")
    parser.add_argument("--demo", dest="demo", action="store_const", const=True, default=None if demo is None else _env_flag("demo", True), help="turn GET /demo/publish/{topic} on, even with JWT auth (it publishes without a token) [MICROSOCKET_DEMO=1] (default: on with demo auth, off with JWT)")
    parser.add_argument("--no-demo", dest="demo", action="store_const", const=False, help="turn GET /demo/publish/{topic} off [MICROSOCKET_DEMO=0]")
    parser.add_argument("--sign-key", dest="sign_keys", action="append", default=None, metavar="KID=SECRET", help="sign every message with HMAC-SHA256 under SECRET (UTF-8, at least 32 bytes), named KID; repeatable: the first signs, all are listed for rotation [MICROSOCKET_SIGN_KEYS, comma-separated] (default: no signing)")
    parser.add_argument("--loop", default=os.environ.get("MICROSOCKET_LOOP", "asyncio"), choices=list(EVENT_LOOPS), help="the event loop: asyncio's own; uvloop (a faster one, pip install uvloop; the server refuses to start without it); auto: uvloop if it is installed, else asyncio's [MICROSOCKET_LOOP] (default: %(default)s)")
    parser.add_argument("--log-level", default=os.environ.get("MICROSOCKET_LOG_LEVEL", "INFO"), choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper, help="log verbosity [MICROSOCKET_LOG_LEVEL] (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"microsocket {__version__}")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    fields = {f.name for f in dataclasses.fields(Config)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["allowed_origins"] = tuple(args.allowed_origins) if args.allowed_origins else args.allowed_origins_env
    keys = os.environ.get("MICROSOCKET_SIGN_KEYS", "")
    values["sign_keys"] = tuple(args.sign_keys) if args.sign_keys else tuple(k.strip() for k in keys.split(",") if k.strip())
    return Config(**values)


def fit_open_file_limit(config: Config) -> Config:
    """Raise the soft open-file limit to the hard one, and keep max_connections (plus max_pending
    and FD_RESERVE) under it.

    Past the limit, accept() fails with EMFILE: clients hang instead of getting a 503, and
    CPython's asyncio (before 3.13) then logs the failure in a tight loop. Connections over the
    cap get the documented 503 instead. Returns the config, with max_connections lowered if needed.
    """
    if resource is None:
        return config
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    budget = max(2, soft - FD_RESERVE)
    # Pending (not yet WebSocket) connections get their share first: all they ask for when the
    # limit is generous, a sixteenth of it (at least 16) when it is tight.
    pending = min(config.max_pending, max(16, budget // 16))
    if pending < config.max_pending:
        log.info("max-pending %d is over what the open-file limit (%d) allows: using %d", config.max_pending, soft, pending)
        config = dataclasses.replace(config, max_pending=pending)
    usable = max(1, budget - pending)
    if config.max_connections > usable:
        # A warning when the operator asked for more; the default capped is only worth a note.
        level = logging.INFO if config.max_connections == MAX_CONNECTIONS else logging.WARNING
        log.log(
            level,
            "max-connections %d is over what the open-file limit (%d) allows: using %d (raise `ulimit -n` for more)",
            config.max_connections, soft, usable,
        )
        config = dataclasses.replace(config, max_connections=usable)
    return config


ACCEPT_ERROR_INTERVAL = 10.0  # seconds between two log lines about failing accept() calls


def quiet_accept_errors(clock: Callable[[], float] = time.monotonic) -> Callable[[Any, dict], None]:
    """An event-loop exception handler that reports failing accept() calls (EMFILE: out of file
    descriptors) once per ACCEPT_ERROR_INTERVAL with a count, instead of a traceback each; anything
    else goes to the loop's default handler. Installed by main() only (it is the loop's, not ours)."""
    failed = 0
    logged = -ACCEPT_ERROR_INTERVAL

    def handler(loop: Any, context: dict) -> None:
        nonlocal failed, logged
        if not context.get("message", "").startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        failed += 1
        now = clock()
        if now - logged >= ACCEPT_ERROR_INTERVAL:
            log.error("accept() failed %d time(s) since the last report (%s): raise `ulimit -n` or lower --max-connections/--max-pending",
                      failed, context.get("exception"))
            failed = 0
            logged = now

    return handler


def _usage_error(message: str) -> int:
    print(f"microsocket.py: error: {message}", file=sys.stderr)
    return 2


def _without_workers(argv: list[str]) -> list[str]:
    """The command line with --workers N (or --workers=N) taken out."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def _die_with_parent() -> None:
    """In a worker, before it runs: Linux's PR_SET_PDEATHSIG (prctl(2)), so the worker gets SIGTERM
    when the parent dies, even by SIGKILL. Elsewhere nothing: the parent's exit path stops them."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def run_workers(config: Config, argv: list[str], workers: int | None = None, redis_url: str | None = None,
                script: str | None = None) -> int:
    """--workers N: N processes of this command line (without --workers) sharing one port with
    SO_REUSEPORT (the kernel spreads new connections over them, Linux 3.9+: socket(7)) and one
    Redis. Refuses (exit 2) without --redis: processes that do not share state would each have
    their own seqNos, dedup and sessions behind one address. The parent only supervises: it
    forwards SIGINT/SIGTERM to every worker (each closes its connections with 1001 and exits 0),
    starts again a worker that died (with a growing delay if they keep dying), and exits 0 once
    every worker has exited after a signal (1 if one did not exit cleanly). Every worker is in
    the parent's process group, gets SIGTERM from the parent's exit path, and (Linux) SIGTERM if
    the parent is killed, so none is orphaned.

    `workers` and `redis_url` default to config.workers and config.redis (the fields section 16
    adds); `script` to this program. Each worker is told MICROSOCKET_REUSE_PORT=1 (Server.start then
    listens with reuse_port=True) and MICROSOCKET_WORKER=i (its number, for its logs)."""
    workers = getattr(config, "workers", 1) if workers is None else workers
    redis_url = getattr(config, "redis", None) if redis_url is None else redis_url
    if workers < 1:
        print("microsocket.py: error: --workers must be at least 1", file=sys.stderr)
        return 2
    if not redis_url:
        print("microsocket.py: error: --workers needs --redis: the workers share seqNos, dedup, sessions and presence "
              "through Redis, and without it each would be a separate gateway behind one port", file=sys.stderr)
        return 2
    if not hasattr(socket, "SO_REUSEPORT"):
        print("microsocket.py: error: --workers needs SO_REUSEPORT, which this platform does not have", file=sys.stderr)
        return 2
    if config.port == 0:
        print("microsocket.py: error: --workers needs a fixed --port: each worker would get another free port", file=sys.stderr)
        return 2
    command = [sys.executable, script or os.path.abspath(sys.argv[0]), *_without_workers(argv)]
    children: dict[int, subprocess.Popen] = {}
    stopping = [False]
    delay = WORKER_RESTART_DELAY
    deaths: collections.deque = collections.deque()

    def spawn(i: int) -> None:
        env = dict(os.environ, MICROSOCKET_REUSE_PORT="1", MICROSOCKET_WORKER=str(i))
        children[i] = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def stop(signum: int, frame: Any) -> None:
        stopping[0] = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    clean = True
    try:
        for i in range(workers):
            spawn(i)
        while children:
            time.sleep(0.1)
            for i, child in list(children.items()):
                code = child.poll()
                if code is None:
                    continue
                if stopping[0]:
                    del children[i]
                    clean = clean and code == 0
                    continue
                now = time.monotonic()
                deaths.append(now)
                while deaths and deaths[0] < now - 60:
                    deaths.popleft()
                delay = WORKER_RESTART_DELAY if len(deaths) <= 1 else min(WORKER_RESTART_MAX, delay * 2)
                print(f"microsocket.py: worker {i} exited with {code}; starting it again in {delay:g} s", file=sys.stderr, flush=True)
                end = time.monotonic() + delay
                while time.monotonic() < end and not stopping[0]:
                    time.sleep(0.05)
                if stopping[0]:
                    del children[i]
                else:
                    spawn(i)
    finally:
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        for child in children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if clean else 1


EVENT_LOOPS = ("asyncio", "uvloop", "auto")


def event_loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    """The event loop `--loop` asks for, and its name. uvloop is an optional accelerator, imported
    only here: the module itself never needs it. ValueError when "uvloop" is asked for and absent."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"--loop must be one of {', '.join(EVENT_LOOPS)}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise ValueError("--loop uvloop: the uvloop package is not installed (python3 -m pip install uvloop)") from None
        else:
            return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


def tune_gc(young: int = GC_YOUNG_THRESHOLD) -> int:
    """The garbage collector set for a long-running server process: the command line's, never a
    program's that embeds Server. What exists at start-up (modules, classes, the configuration, the
    event loop) lives as long as the process, so it is collected once and then frozen: no later
    collection walks it again. Young collections run every `young` allocations instead of 700.
    With thousands of connections held, collections walk everything that survived, so both matter:
    side by side (bench/connect_path.py, 10,000 connections held) it took 8-15 % less server CPU per
    connection on uvloop and, within the runs' spread, less on asyncio, with the same memory per
    connection (README, Performance). Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, old)
    return gc.get_freeze_count()


# -- `sub` and `pub`: the client on the command line (section 16)

CLIENT_COMMANDS = ("sub", "pub")
DEFAULT_URL = f"ws://127.0.0.1:{DEFAULT_PORT}/ws"


def build_client_parser(command: str) -> argparse.ArgumentParser:
    """The options of `microsocket.py sub` and `microsocket.py pub`."""
    if command == "sub":
        parser = argparse.ArgumentParser(
            prog="microsocket.py sub",
            description="Subscribe to TOPICs and print each message as one JSON line on stdout ({topic, seqNo, "
            "messageId, data, epoch}), in order, once each: after a dropped connection or a server restart the "
            "client reconnects and resumes. What cannot be delivered any more is said on stderr. Ctrl-C stops it.",
        )
        parser.add_argument("topics", nargs="+", metavar="TOPIC", help="a topic to subscribe to")
    else:
        parser = argparse.ArgumentParser(
            prog="microsocket.py pub",
            description="Publish DATA to TOPIC, or, without DATA, each line of stdin as one message; print each "
            "ack as one JSON line ({messageId, status, seqNo}). DATA (and each line) is sent as JSON when it is "
            "JSON, else as a string. Exit 1 if any publish was refused (the error is on stderr).",
        )
        parser.add_argument("topic", metavar="TOPIC", help="the topic to publish to")
        parser.add_argument("data", nargs="?", metavar="DATA", help="the payload (default: read stdin, one message per line)")
        parser.add_argument("--message-id", help="the messageId of DATA (default: a fresh one; the same one again is deduplicated)")
    parser.add_argument("--url", default=os.environ.get("MICROSOCKET_URL", DEFAULT_URL), help="the server's WebSocket URL [MICROSOCKET_URL] (default: %(default)s)")
    parser.add_argument("--token", default=os.environ.get("MICROSOCKET_TOKEN", os.environ.get("USER") or "cli"), help="the setup token: any name in demo auth, a JWT otherwise [MICROSOCKET_TOKEN] (default: $USER)")
    return parser


def _payload_of(text: str) -> Any:
    """A command-line payload: its JSON value when it is JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


async def run_sub(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    async with connect(args.url, args.token) as client:
        for topic in dict.fromkeys(args.topics):
            await client.subscribe(topic)
        async for item in client:
            if isinstance(item, Missed):
                end = "" if item.to_seq is None else f"..{item.to_seq}"
                print(f"microsocket.py sub: {item.topic}: seqNo {item.from_seq}{end} of epoch {item.epoch} missed ({item.reason})", file=sys.stderr, flush=True)
                continue
            line = {"topic": item.topic, "seqNo": item.seq_no, "messageId": item.message_id, "data": item.data, "epoch": item.epoch}
            if item.sig is not None:
                line.update(kid=item.kid, sig=item.sig)
            print(json.dumps(line, ensure_ascii=False, separators=(",", ":")), file=out, flush=True)
    return 0


async def run_pub(args: argparse.Namespace, lines: Iterable[str] | None = None, out: Any = None) -> int:
    out = out or sys.stdout
    refused = 0
    async with connect(args.url, args.token) as client:

        async def publish(text: str, message_id: str | None = None) -> None:
            nonlocal refused
            try:
                ack = await client.publish(args.topic, _payload_of(text), message_id)
            except ConnectionClosed:
                raise
            except MicrosocketError as exc:
                refused += 1
                print(f"microsocket.py pub: refused: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
                return
            print(json.dumps({"messageId": ack.message_id, "status": ack.status, "seqNo": ack.seq_no}), file=out, flush=True)

        if args.data is not None:
            await publish(args.data, args.message_id)
        else:
            loop = asyncio.get_running_loop()
            source = iter(lines) if lines is not None else None
            while True:
                # stdin is read in a thread: a slow pipe must not stop the client's event loop
                line = next(source, None) if source is not None else await loop.run_in_executor(None, sys.stdin.readline)
                if not line:
                    break
                line = line.rstrip("\r\n")
                if line:
                    await publish(line)
    return 1 if refused else 0


def client_main(argv: list[str]) -> int:
    """`microsocket.py sub ...` and `microsocket.py pub ...`."""
    command, rest = argv[0], argv[1:]
    args = build_client_parser(command).parse_args(rest)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    name = f"microsocket.py {command}"
    try:
        return asyncio.run(run_sub(args) if command == "sub" else run_pub(args))
    except KeyboardInterrupt:
        return 0
    except ConnectionClosed as exc:
        print(f"{name}: error: the server ended the session: {exc.code} {exc.message}", file=sys.stderr)
        return 1
    except (MicrosocketError, OSError, ValueError) as exc:
        print(f"{name}: error: {args.url}: {exc}", file=sys.stderr)
        return 1


def run_on(loop_factory: Callable[[], asyncio.AbstractEventLoop], main: Awaitable[None]) -> None:
    """asyncio.run on a loop from `loop_factory` (asyncio.Runner does it from Python 3.11 on)."""
    if hasattr(asyncio, "Runner"):
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main)
        return
    loop = loop_factory()  # Python 3.10
    try:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(main)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments and arguments[0] in CLIENT_COMMANDS:
        return client_main(arguments)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        Auth(config)  # keys, ACL file and signing keys are read and checked before listening
        loop_factory, loop_name = event_loop_factory(args.loop)
    except ValueError as exc:
        return _usage_error(str(exc))
    try:
        tls_context(config)  # load it once here, so a bad certificate is not reported as "cannot listen"
    except (OSError, ssl.SSLError) as exc:
        return _usage_error(f"cannot load the TLS certificate or key ({config.certfile}): {exc}")
    if config.workers > 1:
        return run_workers(config, sys.argv[1:] if argv is None else list(argv))
    config = fit_open_file_limit(config)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(quiet_accept_errors())
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if loop_name != "asyncio":
            log.info("event loop: %s", loop_name)
        frozen = tune_gc()
        log.debug("garbage collector: %d start-up objects frozen, young collections every %d allocations", frozen, GC_YOUNG_THRESHOLD)
        await Server(config).serve_forever(stop)

    try:
        run_on(loop_factory, run())
    except ConnectionError as exc:  # an OSError too: Redis, not the listening socket
        print(f"microsocket.py: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"microsocket.py: error: cannot listen on {config.host}:{config.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
