"""Draft of microsocket.py section 13's Redis wire layer (issue 11): the RESP codec, key layout, scripts.

Not a module of its own for long: everything below the imports is meant to be pasted into
microsocket.py, the limits into section 1 and the rest at the top of section 13, above the Redis
backbone that will use it. Standard library only, and nothing here touches a socket.

    encode_command("SET", "k", b"v", 5)     -> b"*4\\r\\n$3\\r\\nSET\\r\\n$1\\r\\nk\\r\\n$1\\r\\nv\\r\\n$1\\r\\n5\\r\\n"
    parser = RespParser()
    parser.feed(data)                        # whatever the socket gave, however it was cut
    for reply in parser: ...                 # each complete reply, in order; then it waits
    parser.next_reply()                      # one reply, or NEED_MORE

Replies as Python values: simple string -> str, error -> RedisReplyError (a value, not raised),
integer -> int, bulk string -> bytes, null ($-1, *-1, RESP3 _) -> None, array -> list; RESP3 (after
HELLO 3): boolean -> bool, double -> float, big number -> int, verbatim string -> bytes (its
format dropped), blob error -> RedisReplyError, map -> dict, set -> set, push -> Push (a list),
attribute -> dropped (the reply it annotates is returned).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Iterator

# -- to section 1 (Constants and limits) ----------------------------------------------------------

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
                buf = self._buf
                pos = self._pos
                if len(buf) - pos < n + 2:
                    return NEED_MORE  # one comparison per call while a large blob arrives
                if buf[pos + n : pos + n + 2] != b"\r\n":
                    raise RespError("bulk string not followed by CRLF")
                value: Any = bytes(buf[pos : pos + n])
                self._pos = self._scan = pos + n + 2
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
                if kind in _BLOBS:
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
