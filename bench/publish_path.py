#!/usr/bin/env python3
"""CPU per publish of microsocket.py's publish path: decode, validate, dedup, sequence, history,
encode, frame, queue, and (with --via server) write.

Two ways in, both measured in this process with getrusage() (user + system CPU):

  broker  (default) everything the server does per publish except the socket: masked client
          frames go through the real `WebSocketConnection.receive_data`, each text message through
          `Broker.handle` on a `MemoryBackbone`, and every dirty outbox is taken as the I/O layer's
          flush takes it (`take_dirty`, `take_output`, `flushed`). No event loop, no syscalls.
  server  a real `Server` on 127.0.0.1 in this process's event loop, driven by a raw-socket client
          in a child process (its CPU is not counted): each publisher pipelines its publishes with
          at most --window unacknowledged and reads its acks, the subscribers read everything. This
          adds what asyncio costs: data_received, one transport.write per connection per turn, the
          flush callback and the syscalls.

The defaults are the benchmark's (`bench/run.sh` runs `microsocket.py --publish-rate 0`): history,
sessions, dedup and the latency figures on, the publish rate limit off. Scenarios:

  publish  --topics publishers, each on its own topic with --subscribers sub-sockets
           (/ws/sub/TOPIC); each publish {"type":"publish","topic":..,"messageId":<uuid>,
           "payload":{"n":k,"s":"some text"}}. `--topics 100 --subscribers 10 --batch 16` is the
           shape of the load benchmark's pubsub scenario.
  dedup    the load benchmark's dedup scenario: user A publishes --ids messageIds --repeat times
           each (shuffled), user B the same ids once, one subscriber; a repeat is acked
           "duplicate" and not delivered. "Per publish" is per ack.

--redis (server only) puts the server on a Redis backbone: a fresh `redis-server` (no persistence)
on a free port, stopped by its PID afterwards; each publish is then one EVALSHA round trip and its
delivery comes back over the subscriber link. Redis's own CPU per publish is read from /proc and
shown beside the server's, and the wall time per publish too (with --topics 1 --window 1, that is
the round trip: publish in, ack out). --split (with --redis) is the fan-out that arrives from
Redis: the publishers connect to a second gateway in a child process (its CPU is not counted), the
subscribers to the measured one, which then only delivers.

--batch (broker only) is how many publishes of each publisher one read delivers before the
turn's flush, as when a client pipelines them into one TCP segment.

Each run builds a fresh broker (or server), warms it up, then times --publishes publishes; the
figure is the minimum over --runs (the least disturbed by other processes), the median beside it.
--module PATH (repeatable) measures other copies of microsocket.py, alternating runs between them
(A B A B ...) so that drift on a shared machine hits each alike. --profile prints cProfile's top
entries (it inflates small functions: confirm a finding with the plain figure). --callgrind
counts instructions per publish with valgrind: two runs of different lengths, whose difference
cancels start-up, so the figure hardly moves with the machine's load.

  python3 bench/publish_path.py                                   # broker path, 2 subscribers
  python3 bench/publish_path.py --scenario dedup
  python3 bench/publish_path.py --topics 100 --subscribers 10 --batch 16
  python3 bench/publish_path.py --via server --topics 4 --window 16
  python3 bench/publish_path.py --via server --redis --topics 4 --window 16   # through Redis
  python3 bench/publish_path.py --via server --redis --topics 1 --window 1    # one round trip at a time
  python3 bench/publish_path.py --via server --redis --split --subscribers 10 # a process that only delivers
  python3 bench/publish_path.py --profile
  python3 bench/publish_path.py --callgrind --publishes 4000
  git show main:microsocket.py > /tmp/old.py && python3 bench/publish_path.py --module /tmp/old.py --module microsocket.py
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import cProfile
import gc
import importlib.util
import io
import itertools
import json
import logging
import os
import pstats
import random
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, NamedTuple

REPO = Path(__file__).resolve().parent.parent
WARMUP = 2000  # publishes before the clock starts: history fills, dicts and caches reach their size


def load_module(path: str, index: int) -> ModuleType:
    """Import one copy of microsocket.py under a name of its own (several may be compared)."""
    name = "microsocket" if index == 0 else f"microsocket_{index}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses looks its module up while the class is built
    spec.loader.exec_module(module)
    return module


# -- what clients send


def client_frame(ms: ModuleType, text: str, rng: random.Random) -> bytes:
    """A client text frame: masked with a fresh key, as RFC 6455 §5.3 asks of every client."""
    return ms.serialize_frame(ms.Opcode.TEXT, text.encode(), mask=rng.randbytes(4))


def publishes(args: argparse.Namespace, count: int, rng: random.Random) -> list[tuple[int, str]]:
    """(publisher index, message text) in the order they are sent."""
    if args.scenario == "dedup":
        # As bench/loadgen/loadgen.ts: A sends ids 0..N-1 R times each in a shuffled order, B each once.
        ids_a = [k % args.ids for k in range(args.ids * args.repeat)]
        rng.shuffle(ids_a)
        out = []
        k = 0
        while len(out) < count:
            for user in (0, 1):
                ids = ids_a if user == 0 else range(args.ids)
                i = ids[k % len(ids)]
                out.append((user, json.dumps({"type": "publish", "topic": "dedup", "messageId": f"id-{i}", "payload": {"u": "ab"[user]}})))
            k += 1
        return out[:count]
    out = []
    for k in range(count):
        p = k % args.topics
        message_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        out.append((p, json.dumps({"type": "publish", "topic": f"topic-{p}", "messageId": message_id, "payload": {"n": k, "s": "some text"}})))
    return out


def layout(args: argparse.Namespace) -> tuple[list[str], list[tuple[str, str]]]:
    """(publisher tokens, (subscriber token, topic)) of the scenario."""
    if args.scenario == "dedup":
        return ["user-a", "user-b"], [("dedup-sub", "dedup")]
    return [f"pub-{p}" for p in range(args.topics)], [(f"sub-{p}-{s}", f"topic-{p}") for p in range(args.topics) for s in range(args.subscribers)]


# -- broker: the sans-I/O path


class BrokerRig:
    """A broker on a MemoryBackbone with its clients set up, driven as section 15 drives it."""

    def __init__(self, ms: ModuleType, args: argparse.Namespace) -> None:
        self.ms = ms
        self.config = ms.Config(publish_rate=0)
        self.broker = ms.Broker(self.config, ms.MemoryBackbone(self.config))
        self.rng = random.Random(1)
        self.received = 0  # bytes written to clients
        publishers, subscribers = layout(args)
        self.subscribers = [self.connect(token, topic) for token, topic in subscribers]
        self.publishers = [self.connect(token, None) for token in publishers]

    def connect(self, token: str, bound_topic: str | None) -> tuple[Any, Any]:
        ms = self.ms
        peer_class = getattr(ms, "Peer", None) or ms.Client  # named Client before the Python client came
        client = peer_class(self.broker, bound_topic=bound_topic)
        self.broker.connect(client)
        conn = ms.WebSocketConnection(self.config.max_message_size)
        self.feed((client, conn), client_frame(ms, json.dumps({"type": "setup", "token": token}), self.rng))
        self.flush()
        return client, conn

    def feed(self, pair: tuple[Any, Any], data: bytes) -> None:
        """One read from a client's socket: ServerConnection._websocket_data without the echo."""
        client, conn = pair
        handle = self.broker.handle
        events = conn.receive_data(data)
        while True:
            for _, text in events:
                handle(client, text)
            if not conn.more:
                break
            events = conn.receive_data(b"")  # FRAMES_PER_TURN: the rest in a later turn

    def flush(self) -> None:
        """The end of the event-loop turn: every dirty outbox taken as one buffer."""
        for client in self.broker.take_dirty():
            if client.out:
                self.received += len(client.take_output())
        self.broker.flushed(time.monotonic())

    def turns(self, frames: list[tuple[int, bytes]], batch: int) -> list[list[tuple[int, bytes]]]:
        """Group the frames into turns: up to `batch` of each publisher per read, one read per publisher."""
        out = []
        for start in range(0, len(frames), batch * len(self.publishers)):
            chunk = frames[start : start + batch * len(self.publishers)]
            reads: dict[int, list[bytes]] = {}
            for p, frame in chunk:
                reads.setdefault(p, []).append(frame)
            out.append([(p, b"".join(parts)) for p, parts in reads.items()])
        return out

    def run(self, turns: list[list[tuple[int, bytes]]]) -> None:
        publishers = self.publishers
        for turn in turns:
            for p, data in turn:
                self.feed(publishers[p], data)
            self.flush()


class Cpu(NamedTuple):
    """CPU seconds per publish: user + system, and the system part (syscalls, loopback TCP); with
    --via server also Redis's CPU (--redis) and the wall time, per publish."""

    total: float
    system: float
    redis: float = 0.0
    wall: float = 0.0


RUN_NUMBERS = itertools.count(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Until something accepts on 127.0.0.1:port; SystemExit if `proc` exits first or it takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} before listening on {port}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise SystemExit(f"nothing listening on {port} after {timeout:.0f} s")


def start_redis() -> tuple[subprocess.Popen, str]:
    """A throw-away redis-server on a free port: no RDB, no AOF. Stopped by its PID (stop_redis)."""
    binary = shutil.which(os.environ.get("REDIS_SERVER", "redis-server"))
    if binary is None:
        raise SystemExit("--redis needs redis-server (apt-get install redis-server, or REDIS_SERVER=path)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    asyncio.run(wait_listening(port, proc))
    return proc, f"redis://127.0.0.1:{port}/0"


def stop_redis(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def redis_cpu(args: argparse.Namespace) -> float:
    """CPU seconds the Redis of --redis has used so far (/proc/PID/stat utime + stime); 0 without one."""
    if args.redis_proc is None:
        return 0.0
    with open(f"/proc/{args.redis_proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu(start: Any, end: Any, publishes: int) -> Cpu:
    """From two getrusage() readings (microsecond resolution, where os.times() has ticks of 10 ms)."""
    system = end.ru_stime - start.ru_stime
    return Cpu((end.ru_utime - start.ru_utime + system) / publishes, system / publishes)


def broker_once(ms: ModuleType, args: argparse.Namespace, profile: cProfile.Profile | None = None) -> Cpu:
    """CPU seconds per publish of one fresh broker (after WARMUP publishes)."""
    rng = random.Random(2)
    rig = BrokerRig(ms, args)
    # --prepare: frames made for more publishes than are timed, so that runs of different lengths
    # prepare alike (--callgrind subtracts one from the other).
    texts = publishes(args, WARMUP + max(args.publishes, args.prepare), rng)
    frames = [(p, client_frame(ms, text, rng)) for p, text in texts]
    warm = rig.turns(frames[:WARMUP], args.batch)
    timed = rig.turns(frames[WARMUP : WARMUP + args.publishes], args.batch)
    rig.turns(frames[WARMUP + args.publishes :], args.batch)  # the rest: prepared alike, not sent
    rig.run(warm)
    gc.collect()
    if profile is not None:
        profile.enable()
    start = resource.getrusage(resource.RUSAGE_SELF)
    rig.run(timed)
    end = resource.getrusage(resource.RUSAGE_SELF)
    if profile is not None:
        profile.disable()
    stats = rig.broker.stats()
    expected = WARMUP + args.publishes
    if stats["published"] + stats["duplicates"] != expected or sum(stats["errors"].values()):
        raise SystemExit(f"the broker did not accept every publish: {stats}")
    return cpu(start, end, args.publishes)


# -- server: a real Server on 127.0.0.1, a raw-socket client in a child process


def server_once(ms: ModuleType, args: argparse.Namespace, profile: cProfile.Profile | None = None) -> Cpu:
    """CPU seconds (this process: the server) per publish, from the client's first publish to its last ack."""

    async def main() -> Cpu:
        # Each run on Redis under keys of its own: the runs send the same messageIds, which an earlier
        # run's dedup entries would answer "duplicate" (and never deliver).
        prefix = f"bench{next(RUN_NUMBERS)}:"
        server = ms.Server(ms.Config(port=0, publish_rate=0, redis=args.redis_url, redis_prefix=prefix))
        await server.start()
        client_args = ["--client", str(server.port)]
        publisher_gateway = None
        if args.split:
            pub_port = free_port()
            publisher_gateway = subprocess.Popen(
                [sys.executable, ms.__file__, "--port", str(pub_port), "--redis", args.redis_url, "--redis-prefix", prefix, "--publish-rate", "0", "--log-level", "ERROR"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await wait_listening(pub_port, publisher_gateway)
            client_args += ["--pub-port", str(pub_port)]
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, *client_args, "--publishes", str(args.publishes), *scenario_args(args),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            line = await asyncio.wait_for(child.stdout.readline(), 60)
            if line.strip() != b"connected":
                raise SystemExit(f"client: {line!r}")
            if profile is not None:
                profile.enable()
            start = resource.getrusage(resource.RUSAGE_SELF)
            redis_start, wall_start = redis_cpu(args), time.monotonic()
            line = await asyncio.wait_for(child.stdout.readline(), 600)
            end = resource.getrusage(resource.RUSAGE_SELF)
            redis_end, wall_end = redis_cpu(args), time.monotonic()
            if profile is not None:
                profile.disable()
            if not line.startswith(b"done"):
                raise SystemExit(f"client: {line!r}")
            count = int(line.split()[1])
        finally:
            if child.returncode is None:
                child.kill()
            await child.wait()
            if publisher_gateway is not None:
                publisher_gateway.terminate()
                publisher_gateway.wait(10)
            await server.close(grace=1)
        stats = server.broker.stats()
        if sum(stats["errors"].values()):
            raise SystemExit(f"errors: {stats['errors']}")
        return cpu(start, end, count)._replace(redis=(redis_end - redis_start) / count, wall=(wall_end - wall_start) / count)

    return asyncio.run(main())


def scenario_args(args: argparse.Namespace) -> list[str]:
    """The options that shape the scenario, for a child process (the client, or a run under valgrind)."""
    return ["--scenario", args.scenario, "--topics", str(args.topics), "--subscribers", str(args.subscribers),
            "--window", str(args.window), "--ids", str(args.ids), "--repeat", str(args.repeat)]


class RawSocket:
    """One client connection: handshake, then masked frames out and unmasked frames counted in."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(4096)
        if not head.startswith(b"HTTP/1.1 101"):
            raise SystemExit(f"handshake refused: {head[:80]!r}")
        self.buffer = head.split(b"\r\n\r\n", 1)[1]
        self.frames = 0  # complete frames received, pings left out
        self.pongs: list[bytes] = []  # payloads of pings to answer

    def read(self) -> None:
        data = self.sock.recv(1 << 18)
        if not data:
            raise SystemExit("the server closed a connection")
        buf = self.buffer + data
        pos, end = 0, len(buf)
        while end - pos >= 2:  # server frames: unmasked
            n = buf[pos + 1] & 0x7F
            size = 2
            if n == 126:
                if end - pos < 4:
                    break
                n, size = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, size = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if end - pos < size + n:
                break
            if buf[pos] & 0x0F == 0x9:  # the server's keepalive ping (a slow run): answered, not counted
                self.pongs.append(buf[pos + size : pos + size + n])
            else:
                self.frames += 1
            pos += size + n
        self.buffer = buf[pos:]

    def wait_frames(self, n: int) -> None:
        while self.frames < n:
            self.read()


def client_main(port: int, args: argparse.Namespace) -> None:
    """The child process of --via server: connect, say so, publish everything, say done."""
    import microsocket as ms  # only for serialize_frame: the client's frames

    rng = random.Random(3)
    publishers, subscribers = layout(args)
    subs = []
    for token, topic in subscribers:
        s = RawSocket(port, f"/ws/sub/{topic}")
        s.sock.sendall(client_frame(ms, json.dumps({"type": "setup", "token": token}), rng))
        subs.append(s)
    pubs = []
    for token in publishers:
        s = RawSocket(args.pub_port or port, "/ws")
        s.sock.sendall(client_frame(ms, json.dumps({"type": "setup", "token": token}), rng))
        pubs.append(s)
    for s in subs:
        s.wait_frames(2)  # ready, subscribed
    for s in pubs:
        s.wait_frames(1)  # ready
    texts = publishes(args, args.publishes, rng)
    queues: list[list[bytes]] = [[] for _ in pubs]
    for p, text in texts:
        queues[p].append(client_frame(ms, text, rng))
    # In dedup only the first publish of each (user, messageId) is delivered: count them, so any
    # --publishes works (it need not cover the whole pattern of --ids x (--repeat + 1)).
    delivered = args.publishes if args.scenario != "dedup" else len({(p, json.loads(t)["messageId"]) for p, t in texts})
    print("connected", flush=True)
    sel = selectors.DefaultSelector()
    for s in subs + pubs:
        s.sock.setblocking(False)
        sel.register(s.sock, selectors.EVENT_READ, s)
    sent = [0] * len(pubs)
    base = [s.frames for s in pubs]

    def pump(i: int) -> None:
        s = pubs[i]
        acked = s.frames - base[i]
        stop = min(len(queues[i]), acked + args.window)
        if stop > sent[i]:
            s.sock.setblocking(True)
            s.sock.sendall(b"".join(queues[i][sent[i] : stop]))
            s.sock.setblocking(False)
            sent[i] = stop

    for i in range(len(pubs)):
        pump(i)
    sub_base = [s.frames for s in subs]
    # Each subscriber receives its topic's share; in dedup only the first of each (user, id).
    want = [delivered if args.scenario == "dedup" else sum(1 for p, _ in texts if f"topic-{p}" == topic) for _, topic in subscribers]
    index = {id(s): i for i, s in enumerate(pubs)}

    def finished() -> bool:
        return all(pubs[i].frames - base[i] >= len(queues[i]) for i in range(len(pubs))) and all(
            subs[j].frames - sub_base[j] >= want[j] for j in range(len(subs)))

    while not finished():
        for key, _ in sel.select(30):
            s = key.data
            s.read()
            while s.pongs:
                s.sock.setblocking(True)
                s.sock.sendall(ms.serialize_frame(0xA, s.pongs.pop(0), mask=rng.randbytes(4)))
                s.sock.setblocking(False)
            if id(s) in index:
                pump(index[id(s)])
    print(f"done {args.publishes}", flush=True)


# -- callgrind: instructions per publish


def callgrind(args: argparse.Namespace, module: str) -> float:
    """Instructions per publish: (Ir of a run of 2n publishes - Ir of a run of n) / n.

    The two runs differ only in their timed publishes (both prepare the frames of 2n), so
    start-up, imports, warm-up and the client's side cancel.
    Both use PYTHONHASHSEED=0 and byte code compiled beforehand (a cache directory of their own),
    so that neither spends instructions the other does not."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--callgrind needs valgrind (apt-get install valgrind)")
    n = args.publishes
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPYCACHEPREFIX": os.path.join(tmp, "pycache")}
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        base = [sys.executable, __file__, "--module", module, "--runs", "1", "--via", args.via, "--batch", str(args.batch), *scenario_args(args)]
        subprocess.run([*base, "--publishes", "10"], check=True, env=env, stdout=subprocess.DEVNULL)  # writes the byte code
        counts = []
        for size in (n, 2 * n):
            out = os.path.join(tmp, f"callgrind.{size}")
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *base, "--publishes", str(size), "--prepare", str(2 * n)]
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if args.keep_callgrind:
                shutil.copy(out, f"{args.keep_callgrind}.{size}")
            match = re.search(r"^(?:summary|totals): (\d+)", Path(out).read_text(errors="replace"), re.M)
            counts.append(int(match.group(1)))
    return (counts[1] - counts[0]) / n


# -- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="publish_path.py", description=__doc__.split("\n\n")[0],
        epilog="See the module docstring (the top of this file) for what each figure includes.",
    )
    parser.add_argument("--via", choices=("broker", "server"), default="broker", help="the sans-I/O broker path, or a real Server on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--scenario", choices=("publish", "dedup"), default="publish", help="(default: %(default)s)")
    parser.add_argument("--topics", type=int, default=1, help="publishers, each on its own topic (publish scenario) (default: %(default)s)")
    parser.add_argument("--subscribers", type=int, default=2, help="sub-sockets per topic (publish scenario) (default: %(default)s)")
    parser.add_argument("--publishes", type=int, default=20000, help="timed publishes per run (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=7, help="runs per module; the minimum is reported (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=1, help="broker: publishes per read per publisher before the turn's flush (default: %(default)s)")
    parser.add_argument("--window", type=int, default=16, help="server: unacknowledged publishes per publisher (default: %(default)s)")
    parser.add_argument("--ids", type=int, default=1000, help="dedup: distinct messageIds (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="dedup: times user A sends each id (default: %(default)s)")
    parser.add_argument("--module", action="append", default=None, metavar="PATH", help="a microsocket.py to measure; repeat to compare (default: the one beside bench/)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top entries (tottime) of one run per module")
    parser.add_argument("--top", type=int, default=15, help="entries --profile prints (default: %(default)s)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions per publish with valgrind instead of timing")
    parser.add_argument("--keep-callgrind", metavar="PREFIX", help="--callgrind: keep the two output files as PREFIX.N (for callgrind_annotate)")
    parser.add_argument("--json", action="store_true", help="one JSON line per module instead of text")
    parser.add_argument("--prepare", type=int, default=0, help=argparse.SUPPRESS)  # --callgrind: frames made for this many
    parser.add_argument("--redis", action="store_true", help="server: on a Redis backbone (a fresh redis-server on a free port); Redis's CPU is shown too")
    parser.add_argument("--split", action="store_true", help="--redis: publishers on a second gateway (a child process), so the measured one only delivers")
    parser.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)  # the child of --via server
    parser.add_argument("--pub-port", type=int, default=None, help=argparse.SUPPRESS)  # the child's publishers' port (--split)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.client is not None:
        sys.path.insert(0, str(REPO))
        client_main(args.client, args)
        return 0
    paths = args.module or [str(REPO / "microsocket.py")]
    if (args.redis and (args.via != "server" or args.callgrind)) or (args.split and not args.redis):
        raise SystemExit("--redis needs --via server (and no --callgrind), and --split needs --redis")
    args.redis_proc, args.redis_url = start_redis() if args.redis else (None, None)
    try:
        return measure(args, paths)
    finally:
        if args.redis_proc is not None:
            stop_redis(args.redis_proc)


def measure(args: argparse.Namespace, paths: list[str]) -> int:
    if args.callgrind:
        for path in paths:
            ir = callgrind(args, path)
            print(json.dumps({"module": path, "instructions_per_publish": round(ir)}) if args.json else f"{path}: {ir:,.0f} instructions per publish")
        return 0
    modules = [load_module(path, i) for i, path in enumerate(paths)]
    logging.getLogger("microsocket").setLevel(logging.ERROR)  # not the demo-auth warning of every server started
    once: Callable[..., Cpu] = broker_once if args.via == "broker" else server_once
    if args.profile:
        for path, ms in zip(paths, modules):
            profile = cProfile.Profile()
            per = once(ms, args, profile)
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
            print(f"== {path}: {per.total * 1e6:.2f} µs per publish under cProfile")
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))
        return 0
    results: dict[str, list[Cpu]] = {path: [] for path in paths}
    for _ in range(args.runs):
        for path, ms in zip(paths, modules):  # A B A B: drift hits each alike
            results[path].append(once(ms, args))
    for path, runs in results.items():
        best = min(runs)
        median = statistics.median(r.total for r in runs)
        if args.json:
            print(json.dumps({"module": path, "via": args.via, "scenario": args.scenario, "redis": args.redis, "split": args.split,
                              "us_per_publish_min": round(best.total * 1e6, 3),
                              "us_system_of_min": round(best.system * 1e6, 3), "us_per_publish_median": round(median * 1e6, 3),
                              "redis_us_per_publish_median": round(statistics.median(r.redis for r in runs) * 1e6, 3),
                              "wall_us_per_publish_median": round(statistics.median(r.wall for r in runs) * 1e6, 3),
                              "runs": [round(r.total * 1e6, 3) for r in runs]}))
        else:
            system = f", {best.system * 1e6:.2f} of it system" if args.via == "server" else ""
            print(f"{path}: {best.total * 1e6:.2f} µs per publish (min of {len(runs)}{system}; median {median * 1e6:.2f})")
            if args.via == "server":
                redis = f"; Redis {statistics.median(r.redis for r in runs) * 1e6:.2f} µs CPU per publish" if args.redis else ""
                print(f"  wall {statistics.median(r.wall for r in runs) * 1e6:.2f} µs per publish (median){redis}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
