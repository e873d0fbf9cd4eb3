#!/usr/bin/env python3
"""The floor of connection setup on asyncio: the least an asyncio.Protocol server can do for the
connection `bench/connect_path.py` (and the loadgen's `connect`) makes, so that what
microsocket.py spends beyond it is its own.

It answers the upgrade with a 101 (the accept value computed, as a client checks it), the first
frame after it with a canned `ready` and the second with a canned `subscribed`, without reading
either: no JSON, no frame parsing, no protocol state, no timers. GET /stats gives the counts
connect_path checks. It is not a Micro Socket server; it measures asyncio and the kernel.

  python3 bench/connect_path.py --server floor=bench/peers/asyncio_floor.py --server microsocket=microsocket.py --loop asyncio,uvloop

Arguments are the ones connect_path passes to a server: --host, --port, --loop (asyncio, or
uvloop when installed); the rest are ignored. Standard library only (uvloop for --loop uvloop).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import resource
import sys
from collections.abc import Callable

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
LISTEN_BACKLOG = 1024  # microsocket.py's: asyncio's 100 drops SYNs when 200 connect at once


def text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    return bytes((0x81, len(payload))) + payload


READY = text_frame('{"type":"ready","sessionId":"floor-session-of-22-chars","userId":"floor","epoch":"0"}')
SUBSCRIBED = text_frame('{"type":"subscribed","topic":"t","seqNo":0,"epoch":"0.1"}')
upgraded: set[FloorConnection] = set()


class FloorConnection(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.state = 0  # 0: HTTP, 1: upgraded, 2: ready sent, 3: subscribed sent
        self.head = b""

    def data_received(self, data: bytes) -> None:
        if self.state == 0:
            self.head += data
            if b"\r\n\r\n" in self.head:
                self.request(self.head.decode("latin-1"))
        elif self.state == 1:
            self.transport.write(READY)
            self.state = 2
        elif self.state == 2:
            self.transport.write(SUBSCRIBED)
            self.state = 3

    def request(self, head: str) -> None:
        if head.startswith("GET /stats "):
            n = len(upgraded)
            body = json.dumps({"connections": n, "topics": n, "subscriptions": n}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                                 b"Connection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()
            return
        key = next(line.partition(":")[2].strip() for line in head.split("\r\n") if line.lower().startswith("sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: %s\r\n\r\n" % accept)
        self.state = 1
        upgraded.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        upgraded.discard(self)


async def serve(factory: Callable[[], asyncio.Protocol], name: str, host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(factory, host, port, backlog=LISTEN_BACKLOG)
    print(f"{name} listening on http://{host}:{server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


def main(factory: Callable[[], asyncio.Protocol] = FloorConnection, name: str = "asyncio floor") -> None:
    """Serve `factory`'s connections with the arguments connect_path and bench.py pass (dedup_floor.py's too)."""
    ap = argparse.ArgumentParser(description=(sys.modules["__main__"].__doc__ or __doc__).split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    opts, _ = ap.parse_known_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # thousands of held connections
    if opts.loop == "uvloop":
        import uvloop

        uvloop.run(serve(factory, name, opts.host, opts.port))
    else:
        asyncio.run(serve(factory, name, opts.host, opts.port))


if __name__ == "__main__":
    main()
