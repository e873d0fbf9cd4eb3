#!/usr/bin/env python3
"""The floor of the `dedup` scenario on asyncio: the least a correct Micro Socket server written in
Python does per publish there, so that what microsocket.py spends beyond it is its own.

`bench/loadgen/loadgen.ts dedup` opens /ws/sub/dedup (one subscriber) and two /ws publishers, each
sending `setup`, then pipelined publishes with a messageId each, most of them repeats. For that
exchange this server does, per read and per publish, what any server must:

  - the HTTP upgrade, with the accept value computed (RFC 6455 §4.2.2), for any path (a request
    without a key is answered with the counts of GET /stats, which the harness polls);
  - every client frame parsed and unmasked, in pieces or many to a read (text frames, FIN set,
    payloads under 64 KiB: what the loadgen sends; anything else closes the connection);
  - every message decoded with `json.loads`;
  - `setup` answered with `ready`; the topic of a /ws/sub/TOPIC path subscribed at once;
  - `publish`: the (user, messageId) pair looked up in a dict; a new one gets the topic's next
    seqNo, is remembered, and its `message` (encoded once with `json.dumps`) goes to each
    subscriber of the topic; a repeat is acked `duplicate` with the seqNo it got first;
  - one `transport.write` per connection per event-loop turn.

Nothing else: no limits or timeouts, no history, sessions or ACL, no dedup window, no checks of
topic or messageId, no close handshake. It is not a Micro Socket server for any other use: it
measures what asyncio, the frame codec and `json` cost per publish, against which microsocket.py
and Bun are compared:

  bench/compare.sh -r 3 -s dedup microsocket floor='python3 bench/peers/dedup_floor.py --port {port}' elysia

Arguments (asyncio_floor.py's main): --host, --port, --loop (asyncio, or uvloop when installed); the rest are ignored.
Standard library only (uvloop for --loop uvloop).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

from asyncio_floor import GUID, main  # beside this file: the argument handling and serving are the other floor's

# The frame helpers below are written here, not imported from microsocket.py (whose apply_mask and
# text_frame do the same): the floor must not depend on the server it is the floor of.


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def unmask(mask: bytes, data: bytes) -> bytes:
    """XOR data with the 4-byte mask, as one big integer (the fastest way in pure Python)."""
    n = len(data)
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


class Hub:
    def __init__(self) -> None:
        self.subscribers: dict[str, set[FloorConnection]] = {}
        self.seq: dict[str, int] = {}
        self.accepted: dict[tuple[str, str], int] = {}  # (user, messageId) -> seqNo
        self.connections: set[FloorConnection] = set()  # upgraded
        self.dirty: list[FloorConnection] = []
        self.flush_scheduled = False

    def flush(self) -> None:
        self.flush_scheduled = False
        dirty, self.dirty = self.dirty, []
        for conn in dirty:
            out, conn.out = conn.out, []
            conn.transport.write(b"".join(out))


HUB = Hub()


class FloorConnection(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.websocket = False
        self.user: str | None = None
        self.topic: str | None = None
        self.out: list[bytes] = []

    def connection_lost(self, exc: Exception | None) -> None:
        HUB.connections.discard(self)
        if self.topic is not None:
            HUB.subscribers[self.topic].discard(self)

    def send(self, frame: bytes) -> None:
        if not self.out:
            HUB.dirty.append(self)
            if not HUB.flush_scheduled:
                HUB.flush_scheduled = True
                asyncio.get_running_loop().call_soon(HUB.flush)
        self.out.append(frame)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.websocket:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            self.upgrade(buffer[:end].decode("latin-1"))
            if not self.websocket:
                return
            buffer = buffer[end + 4:]
        pos, size = 0, len(buffer)
        while size - pos >= 6:
            b0, b1 = buffer[pos], buffer[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 8:
                    break
                n, head = int.from_bytes(buffer[pos + 2:pos + 4], "big"), 4
            if b0 != 0x81 or not b1 & 0x80 or n == 127:
                self.transport.close()  # not what the loadgen sends
                return
            end = pos + head + 4 + n
            if end > size:
                break
            self.message(json.loads(unmask(buffer[pos + head:pos + head + 4], buffer[pos + head + 4:end])))
            pos = end
        self.buffer = buffer[pos:]

    def upgrade(self, head: str) -> None:
        lines = head.split("\r\n")
        path = lines[0].split(" ")[1]
        key = next((line.partition(":")[2].strip() for line in lines if line.lower().startswith("sec-websocket-key:")), None)
        if key is None:  # GET /stats, as the harness asks before a run
            n = len(HUB.connections)
            body = json.dumps({"connections": n, "topics": len(HUB.subscribers), "subscriptions": sum(map(len, HUB.subscribers.values()))}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()
            return
        HUB.connections.add(self)
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept)
        self.websocket = True
        if path.startswith("/ws/sub/"):
            self.topic = path[len("/ws/sub/"):]
            HUB.subscribers.setdefault(self.topic, set()).add(self)

    def message(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == "publish":
            topic, message_id = msg["topic"], msg["messageId"]
            key = (self.user, message_id)
            seq = HUB.accepted.get(key)
            if seq is not None:
                self.send(text_frame(json.dumps({"type": "ack", "messageId": message_id, "seqNo": seq, "status": "duplicate"}).encode()))
                return
            seq = HUB.accepted[key] = HUB.seq[topic] = HUB.seq.get(topic, 0) + 1
            frame = text_frame(json.dumps({"type": "message", "topic": topic, "seqNo": seq, "messageId": message_id,
                                           "userId": self.user, "data": msg["payload"]}).encode())
            for subscriber in HUB.subscribers.get(topic, ()):
                subscriber.send(frame)
            self.send(text_frame(json.dumps({"type": "ack", "messageId": message_id, "seqNo": seq, "status": "ok"}).encode()))
        elif kind == "setup":
            self.user = msg["token"]
            self.send(text_frame(json.dumps({"type": "ready", "sessionId": "floor", "userId": self.user}).encode()))
            if self.topic is not None:
                self.send(text_frame(json.dumps({"type": "subscribed", "topic": self.topic, "seqNo": HUB.seq.get(self.topic, 0)}).encode()))


if __name__ == "__main__":
    main(FloorConnection, "dedup floor")
