"""Draft of microsocket.py section 13's Redis backbone (issue 11): `RedisBackbone` and its helpers.

Like resp_draft.py, not a module of its own for long: everything below the imports goes into
section 13 after the RESP codec, the limits into section 1, `broker_resync` into the Broker as its
`resync` method (see its docstring) and `run_workers` into section 16. Standard library only.

    backbone = RedisBackbone(config, clock, url="redis://127.0.0.1:6379/0", prefix="ms:", timeout=2.0)
    await backbone.start()            # connects, AUTH/SELECT from the URL, loads the scripts
    server = Server(config, clock, backbone=backbone)
    ...
    await server.close()              # every connection detached and closed first
    await backbone.close()            # what they wrote is answered, then both links close
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import logging
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
from typing import Any, Callable, NamedTuple

from microsocket import (
    Broker,
    ClientError,
    Config,
    HistoryRange,
    Opcode,
    Position,
    PublishResult,
    Session,
    SigningKeys,
    TopicPosition,
    _quote,
    serialize_frame,
    sign_canonical,
    utf8,
)
from resp_draft import (
    NEED_MORE,
    SCRIPTS,
    RedisReplyError,
    RespError,
    RespParser,
    check_prefix,
    encode_command,
    history_command,
    key_part,
    parse_delivery,
    publish_command,
    topic_keys,
)

log = logging.getLogger("microsocket")

# -- to section 1 (Constants and limits) ----------------------------------------------------------

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


# === 13. Backbones: Redis =========================================================================
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
            return serialize_frame(Opcode.TEXT, message)
        _, message_id, data = split_message(message)
        kid, sig = sign_canonical(signing, topic, seq, message_id, data)
        return serialize_frame(Opcode.TEXT, b"".join((message[:-1], utf8(f',"kid":{_quote(kid)},"sig":"{sig}"}}'))))

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
            resync = getattr(self.broker, "resync", None)
            if resync is not None:
                resync(topic, position)
            else:
                broker_resync(self.broker, topic, position)

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
        users = self._presence.get(topic)
        if users is None or user_id not in users:
            return
        count = self._subscribed[topic] - 1
        if count:
            self._subscribed[topic] = count
        else:
            del self._subscribed[topic]
        users[user_id] -= 1
        if users[user_id] <= 0:
            del users[user_id]
            if not users:
                del self._presence[topic]
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
            "redis": {
                "url": str(self.target),
                "connected": self.healthy(),
                "process": self.process,
                "processes": self.processes,
                "reconnects": self.reconnects,
                "unavailable": self.unavailable,
            },
        }


# -- to the Broker (section 12), as its method `resync` -------------------------------------------


def broker_resync(broker: Broker, topic: str, position: TopicPosition) -> None:
    """Broker.resync(topic, position): the backbone may have missed deliveries of `topic` (its
    subscription was down for a while, and came back) and says where the topic stands now. A new
    epoch is passed on to the subscribers (an unasked `subscribed`, as for a live epoch change);
    what was published meanwhile is read from history and delivered before anything later, as a
    gap is; what history no longer holds closes the subscribers with 1011, so they resume and are
    told it was missed. A feed still joining or filling a gap does it once ready, unless it learnt
    of another epoch meanwhile (then the position is older than what it knows).

    To paste into the Broker after `deliver`, with `broker` as `self`:

        def resync(self, topic: str, position: TopicPosition) -> None:
            (the body below, `broker` read as `self`)
    """
    self = broker
    feed = self.feeds.get(topic)
    if feed is None:
        return  # not received here any more
    epoch, seq = position
    if not feed.ready:
        known = feed.epoch
        self._when_ready(feed, lambda feed: feed.epoch == known and broker_resync(self, topic, position))
        return
    if epoch != feed.epoch:
        self._new_epoch(topic, feed, epoch)
    if seq > feed.seq:
        feed.ready = False
        self.backbone.history(topic, feed.seq + 1, seq, lambda result: self._gap_read(topic, feed, seq, result))


# -- to section 16 (Command line): --workers N ----------------------------------------------------

WORKER_RESTART_DELAY = 1.0  # seconds before a worker that died is started again ...
WORKER_RESTART_MAX = 30.0  # ... doubled while workers keep dying within a minute, up to this
WORKER_STOP_TIMEOUT = 10.0  # seconds the workers get to close their connections (1001) before SIGKILL


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
