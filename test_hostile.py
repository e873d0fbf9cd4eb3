"""Issue 9's hostile clients, one bounded test per attack (bench/hostile.py holds the attacks).

Each test starts microsocket.py as a subprocess (hostile.run_attack: port 0, the port read from the
banner), runs a well-behaved pair beside the attacker in a process of its own (a publisher at 20
messages/s and a subscriber checking loss, duplicates and order; fresh clients that connect, set up
and subscribe), samples the server's RSS from /proc/<pid>/status, and kills every process it
started by PID, whatever happens. Sizes are scaled for CI (each test well under 10 s). Every test
asserts three things: the attacker is refused or closed as documented, the server's memory stays
under a stated bound, and the pair loses nothing with its p99 latency under a generous bound.

Latency bounds are deliberately loose (CI machines are noisy): they tell seconds from
milliseconds, never one millisecond from another. Memory bounds are stated next to each test,
with what the server would hold without the bound under test.

Two tests go beyond issue 9's table, for holes this battery found: a `setup` with many topics
(quadratic in its length) and a bare-connection flood that cuts an active keep-alive client
(eviction by arrival, where the README says by idleness).
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys

import pytest

from conftest import SCRIPT, run

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("hostile", os.path.join(HERE, "bench", "hostile.py"))
hostile = importlib.util.module_from_spec(_spec)
sys.modules["hostile"] = hostile
_spec.loader.exec_module(hostile)

pytestmark = pytest.mark.slow

MiB = 1 << 20
PAIR_P99_MS = 500  # the pair's publish -> receive p99 beside an attacker: milliseconds, not seconds
FRESH_MAX_MS = 1000  # a fresh client's connect + setup + subscribe, the slowest one during the attack
SLACK = 24 * MiB  # allocator and interpreter noise on top of what a bound allows
RSS_CAP_MB = 1024  # the server is killed past this: a test never takes the CI machine down


def attack(name: str, *server_args: str, probe_interval: float | None = None, **params) -> dict:
    """Run one attack of bench/hostile.py against this repository's server; its result."""
    return run(hostile.run_attack(name, SCRIPT, 1.0, list(server_args), params, probe_interval=probe_interval,
                                  rss_cap_mb=RSS_CAP_MB), timeout=55)


def assert_pair_unharmed(r: dict, p99_ms: float = PAIR_P99_MS) -> None:
    """The pair ran, lost nothing, saw no duplicate and nothing out of order, was never disconnected, and its
    p99 latency stayed under the bound."""
    assert not r.get("capped"), f"the server passed {RSS_CAP_MB} MB: {r.get('peak_rss')}"
    assert "error" not in r, r["error"]
    pair = r["pair"]
    assert pair is not None, "the pair did not report"
    assert pair["acked"] >= 5, pair  # it really ran beside the attack
    assert (pair["lost"], pair["duplicates"], pair["out_of_order"]) == (0, 0, 0), pair
    assert pair["disconnects"] == [], pair["disconnects"]
    assert pair["publish_errors"] == {}, pair["publish_errors"]
    assert pair["p99_ms"] < p99_ms, f"pair p99 {pair['p99_ms']} ms (p50 {pair['p50_ms']}, max {pair['max_ms']})"


def assert_fresh_clients(r: dict, max_ms: float = FRESH_MAX_MS) -> None:
    """Fresh clients started during the attack all got in (connect, setup, subscribe), the slowest under max_ms."""
    fresh = r["fresh_clients"]
    assert fresh["n"] >= 1, fresh
    assert fresh["failed"] == 0, fresh
    assert fresh["max_ms"] < max_ms, f"fresh clients: {fresh}"


def assert_growth(r: dict, bound: int, what: str) -> None:
    """The server's RSS grew by less than `bound` bytes during the attack's hot phase (peak, VmHWM included)."""
    assert r["growth"] is not None
    assert r["growth"] < bound, (
        f"RSS grew {r['growth'] / MiB:.0f} MiB during the attack (peak {r['peak_rss'] / MiB:.0f} MiB), "
        f"over the {bound / MiB:.0f} MiB bound: {what}")


# === amplifying requests ===========================================================================


def test_replay_amplify_is_streamed_as_the_socket_drains():
    """A connection that asks 6 replays of a topic holding ~24 MB of history and does not read makes
    the server answer about one replay ahead of the reader (backpressure: the rest wait, input paused),
    and that replay is written as the socket drains, not built whole: from before the history was
    filled to the peak while the client does not read, RSS grows by no more than about the history
    plus --max-buffer (1 MiB here), where building one replay whole adds about two more copies of
    it. Read afterwards, all 6 answers arrive in order, each with its 1000 messages.
    Fails until the long-replay streaming lands."""
    max_buffer = 1 * MiB
    r = attack("replay-amplify", f"--max-buffer={max_buffer}", messages=1000, payload_bytes=24_000, requests=6, hold=2.0,
               read_after=True, read_timeout=20)
    assert r["history_messages"] == 1000
    assert r["answered_while_unread"] <= 2, r  # backpressure: not 6 replays buffered for a client that does not read
    assert (r["answers"], r["answers_in_order"], r["messages_read"]) == (6, True, 6000), r
    assert_pair_unharmed(r)
    bound = r["history_bytes"] + max_buffer + 8 * MiB
    assert r["growth_while_unread"] < bound, (
        f"RSS grew {r['growth_while_unread'] / MiB:.0f} MiB from before the history to the peak while the client did not read, "
        f"over history {r['history_bytes'] / MiB:.0f} MiB + max-buffer + 8 MiB: a replay is built whole instead of sent as the socket drains")


def test_presence_amplify_waits_for_the_reader():
    """300 users with 4096-character ids on one topic make each `presence` answer ~1.2 MB; 30 requests
    in one segment from a client that does not read are answered only while its unread output is
    under --max-buffer (4 MiB): RSS grows by well under the 30 answers (~110 MB with the copies a
    write makes). Read afterwards, every answer comes, each counting the 300 users."""
    r = attack("presence-amplify", users=300, token_len=4096, requests=30, hold=1.5, read_after=True, read_timeout=20)
    assert r["users"] == 300 and r["crowd_failed"] == 0, r
    assert r["answers"] == 30 and r["counts"] == [300], r
    assert_pair_unharmed(r)
    bound = 4 * MiB + 2 * r["answer_bytes_estimate"] + SLACK
    assert r["growth_while_unread"] < bound, (
        f"RSS grew {r['growth_while_unread'] / MiB:.0f} MiB while the client did not read, over {bound / MiB:.0f} MiB: "
        "presence answers are buffered for a client that does not read")


# === the global buffer budget (--max-buffered) ======================================================


def test_fragment_hold_is_closed_1013_past_the_buffer_budget():
    """90 connections arrive at 20 a second, each leaving an unfinished fragmented message just under
    1 MiB: 90 MiB held for clients, with --max-buffered 16 MiB. The budget is checked once a second and
    the largest holders are closed with 1013 (try again later) until the total is under it, so most of
    them are closed, those under the budget stay open, and RSS grows by at most the budget plus one
    second of arrivals (not the 90 MiB). Fails until --max-buffered lands."""
    budget, rate, size = 16 * MiB, 20, hostile.MAX_MESSAGE_SIZE - 1024
    r = attack("fragment-hold", f"--max-buffered={budget}", conns=90, rate=rate, size=size, hold=1.5)
    assert r["conns"] == 90 and r["failed"] == 0, r
    ended = r["ended"]
    assert set(ended) <= {"1013", "open"}, ended  # nothing else closed them
    assert ended.get("1013", 0) >= 90 - budget // size - 4, f"too few closed with 1013: {ended}"
    assert ended.get("open", 0) >= 4, f"holders under the budget must stay open: {ended}"
    assert_pair_unharmed(r)
    assert_growth(r, budget + rate * size + SLACK, "unfinished messages are not bounded in total")


def test_deflate_hold_counts_inflated_bytes_in_the_buffer_budget():
    """60 connections with permessage-deflate each leave an unfinished compressed message of about a
    kilobyte that inflates to just under 1 MiB, with --max-buffered 16 MiB: the budget counts what was
    inflated, not the kilobyte on the wire, so the largest holders are closed with 1013 until the rest
    fit (without that count none would be). They all arrive within one sweep, so RSS may first hold
    them all; the bound checked is the budget plus that one second of arrivals."""
    budget, size = 16 * MiB, hostile.MAX_MESSAGE_SIZE - 64 * 1024
    r = attack("deflate-hold", f"--max-buffered={budget}", conns=60, inflates_to=size, hold=2.0)
    assert r["conns"] == 60 and r["failed"] == 0, r
    assert r["wire_bytes_each"] < 4096, r  # a kilobyte on the wire ...
    ended = r["ended"]
    assert set(ended) <= {"1013", "open"}, ended  # ... and nothing else closed them
    assert ended.get("1013", 0) >= 60 - budget // size - 4, f"too few closed with 1013: {ended}"
    assert ended.get("open", 0) >= 4, f"holders under the budget must stay open: {ended}"
    assert_pair_unharmed(r)
    assert_growth(r, budget + 30 * size + SLACK, "inflated bytes of unfinished messages are not bounded in total")


def test_deflate_bombs_are_closed_1009_having_inflated_only_the_limit():
    """300 compressed messages of 64 KB, each inflating to 64 MiB, from 20 connections at a time: each
    is refused with 1009 once its inflated size passes the 1 MiB limit, RSS does not grow by even one
    bomb's inflated size, and the well-behaved pair beside them is unharmed."""
    r = attack("deflate-bomb", bombs=300, conns=20, inflates_to=64 * MiB, timeout=10.0)
    assert r["failed"] == 0 and r["closes"] == {"1009": 300}, r
    assert r["wire_bytes_each"] < 100_000, r
    assert_pair_unharmed(r)
    assert_growth(r, 64 * MiB, "a bomb was inflated past the message size limit")


def test_slow_readers_are_closed_4001_past_the_buffer_budget():
    """30 subscribers read 32 KiB every 0.5 s while their topic gets 2 MB/s each (60 MB/s of unsent
    data in all), with --max-buffered 16 MiB and a per-connection --max-buffer of 8 MiB (so the
    per-connection limit is not what closes them in the 4 s): the budget closes the largest holders
    with 4001, the reason naming the server's buffer budget, and RSS grows by at most the budget plus
    one and a half seconds of unsent data: the sweep that enforces the budget runs once a second,
    and later than that while the loop is this busy (without the budget: 30 × 8 MB over the 4 s).
    The pair's subscriber, which reads, is never closed. Fails until --max-buffered lands."""
    budget, readers, per_s = 16 * MiB, 30, 2000 * 1000
    r = attack("slow-readers", f"--max-buffered={budget}", f"--max-buffer={8 * MiB}", readers=readers, read_bytes=32768,
               read_every=0.5, rcvbuf=8192, msg_bytes=2000, rate=1000, duration=4.0, drain=2.5)
    assert r["readers"] == readers, r
    budget_closes = sum(n for reason, n in r["reasons"].items() if reason.startswith("4001 ") and "budget" in reason)
    assert budget_closes >= 10, f"too few readers saw a 4001 naming the buffer budget: {r['reasons']}, server: {r['server_disconnects']}"
    assert_pair_unharmed(r)
    assert_growth(r, budget + int(1.5 * readers * per_s) + SLACK, "unsent data is bounded per connection only")


# === topics, sessions ===============================================================================


def test_topic_flood_forgets_the_least_recently_used_topic():
    """6000 publishes to 6000 distinct 256-character topics (6 connections, within the publish burst)
    with --max-topics 1000: every publish is accepted (forgetting is silent), the server keeps at most
    1000 sequenced topics (+ the pair's and probes'), the first topic was forgotten (subscribing says
    seqNo 0: it starts again under a new epoch) and the last one kept (seqNo 1)."""
    r = attack("topic-flood", "--max-topics=1000", topics=6000, conns=6, topic_len=256, burst=2000, rate_limit=1000, timeout=20)
    assert (r["acks"], r["errors"]) == (6000, {}), r
    assert r["sequenced_topics"] <= 1000 + 3, r["sequenced_topics"]
    assert (r["first_topic_seq"], r["last_topic_seq"]) == (0, 1), r
    assert_pair_unharmed(r)
    assert_growth(r, 48 * MiB, "sequenced topics are not bounded")


def test_session_hoard_drops_the_oldest_past_max_session_topics():
    """40 sessions each subscribed to 1000 topics, then closed cleanly (40,000 topic positions kept for
    resume), with --max-session-topics 20000: the oldest detached sessions are dropped until at most
    20,000 positions are kept. The first session's resume gets SESSION_EXPIRED; the last one's resumes
    with its 1000 topics; the server keeps at most 20 of them (+ the pair's and the two resume
    checks')."""
    r = attack("session-hoard", "--max-session-topics=20000", probe_interval=0, sessions=40, topics_per=1000, concurrency=2)
    assert r["failed"] == 0, r
    assert r["first_resume"] == "SESSION_EXPIRED", r
    assert (r["last_resume"], r["last_resume_topics"]) == ("resumed", 1000), r
    assert r["server_sessions"] <= 20 + 2 + 2, r["server_sessions"]
    assert_pair_unharmed(r)
    assert_growth(r, 16 * MiB + SLACK, "sessions are not costed by their topics")


# === frames, fairness ================================================================================


def test_continuation_flood_is_closed_1009_and_others_are_not_delayed():
    """One connection streams zero-length continuation frames (300,000 of them, 1.8 MB) after a first
    fragment: past 1024 fragments averaging under 32 bytes the message is closed with 1009, so the
    server spends milliseconds, not seconds, on it; the pair's p99 and the slowest fresh client's
    connect + setup + subscribe stay under their bounds meanwhile."""
    r = attack("continuation-flood", frames=300_000, chunk_frames=10_000, timeout=5, hold=1.0)
    assert r["close_code"] == 1009, r
    assert r["server_cpu_s"] < 2.0, r["server_cpu_s"]
    assert_pair_unharmed(r)
    assert_fresh_clients(r)
    assert_growth(r, SLACK, "tiny fragments are buffered")


def test_burst_from_many_connections_does_not_stall_fresh_clients():
    """20 connections each send 2500 publishes at once, over their burst of 2000 (--publish-rate 100,
    so the bucket refills slowly however the server spreads the work): the excess is refused with
    RATE_LIMITED, every publish is answered, and because each connection gets a bounded number of
    frames per event-loop turn, a fresh client's connect + setup + subscribe during the burst takes
    under a second and the pair's p99 stays under 500 ms (without fairness: 1-3 s each). Fails until
    fairness per event-loop turn lands."""
    r = attack("burst", "--publish-rate=100", probe_interval=0.1, conns=20, per_conn=2500, timeout=30)
    assert r["acks"] + r["errors"].get("RATE_LIMITED", 0) == 20 * 2500, r
    assert set(r["errors"]) <= {"RATE_LIMITED"}, r["errors"]
    assert r["errors"].get("RATE_LIMITED", 0) >= 1, r
    assert_growth(r, 64 * MiB, "publishes are buffered")
    assert_fresh_clients(r)
    assert_pair_unharmed(r)


def test_setup_with_many_topics_is_refused_at_once():
    """One `setup` with 20,000 distinct topics (170 KB, well under the message size limit) is refused
    with TOO_MANY_SUBSCRIPTIONS (the limit is 1000), within a second, while the pair's p99 and a fresh
    client stay under their bounds. Not in issue 9's table: this battery found it. `Broker._setup`
    removes duplicate topics with a list membership test before it checks the count, which is
    quadratic in the topics given (20,000: ~5 s of server CPU; a 1 MiB message holds ~100,000:
    minutes), and nothing else runs meanwhile. Fails until that is fixed."""
    r = attack("setup-topics", probe_interval=0.1, topics=20_000, timeout=60)
    assert r["reply"] == "TOO_MANY_SUBSCRIPTIONS", r
    assert r["answered_in_s"] < 1.0, f"setup with {r['topics']} topics answered after {r['answered_in_s']} s"
    assert_pair_unharmed(r)
    assert_fresh_clients(r)


# === the outgoing frame, HTTP, file descriptors ======================================================


def test_wide_utf8_publish_is_refused_and_the_frame_fits():
    """A subscriber keeps the common 1 MiB message limit (the websockets default) and resumes when
    closed. A publish of 400,000 'é' (800 KB as UTF-8, 2.4 MB as \\u escapes) is delivered to it
    intact as UTF-8; a publish of ~1 MiB of 'é' (just under the inbound limit, so its `message` would be
    over it) is refused with INVALID_MESSAGE field payload naming the limit. The subscriber is never
    closed (no 1009 / resume loop)."""
    r = attack("wide-utf8", limit=hostile.MAX_MESSAGE_SIZE, under=16, fit_chars=400_000, hold=1.5)
    assert r["wide_publish_bytes"] <= hostile.MAX_MESSAGE_SIZE, r
    assert r["fit_reply"]["type"] == "ack" and r["fit_reply"]["status"] == "ok", r["fit_reply"]
    assert (r["fit_delivered"], r["fit_intact"]) == (1, True), r
    wide = r["wide_reply"]
    assert (wide["type"], wide["code"], wide["field"]) == ("error", "INVALID_MESSAGE", "payload"), wide
    assert str(hostile.MAX_MESSAGE_SIZE) in wide["message"], wide
    assert (r["wide_delivered"], r["subscriber_disconnects"]) == (0, 0), r
    assert_pair_unharmed(r)


def test_http_pipeline_is_answered_as_the_client_reads():
    """3000 pipelined `GET /docs` (~250 MB of answers) from a client that does not read: the server
    stops reading past MAX_HTTP_UNSENT (256 KiB) of unsent answers, so RSS grows by a few MiB, not
    250 MB; when the client reads, its answers come, complete and in order; /healthz still answers."""
    r = attack("http-pipeline", requests=3000, send_for=2.0, hold=1.0, read_after=20)
    assert r["docs_bytes"] > 10_000, r  # docs.html is served: the answers are large
    assert r["read_ok"] == 20, r
    assert r["healthz"] == 200, r
    assert_pair_unharmed(r)
    assert_growth(r, 16 * MiB, "pipelined answers are queued for a client that does not read")


def test_bare_tcp_connections_cannot_exhaust_file_descriptors():
    """With the server's open-file limit at 1024, 1500 TCP connections that never send a byte: past
    --max-pending (lowered to 60 for that limit) the oldest are closed, so the server never runs out of
    descriptors: /healthz answers, a fresh WebSocket client sets up, subscribes and gets its own
    message, the accept() failures (if any) are logged once per interval, not once each, and the
    evictions are logged."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1800:
        pytest.skip(f"the open-file hard limit ({hard}) is too low for 1500 connections")
    r = attack("bare-tcp", server_nofile=1024, conns=1500, connect_timeout=3.0, hold=1.0, check_timeout=3.0)
    assert r["opened"] >= 1400, r
    assert (r["healthz"], r["fresh_client"]) == (200, "ok"), r
    assert r["healthz_ms"] < 2000 and r["fresh_client_ms"] < 2000, r
    assert r["closed_by_server"] >= r["opened"] - 60 - 50, r  # all but about max-pending were closed
    assert r["log_accept_lines"] <= 2 and r["log_tracebacks"] == 0, r["log"]
    assert any("max-pending" in line for line in r["log"]["excerpt"]), r["log"]
    assert_pair_unharmed(r)
    assert_growth(r, 32 * MiB, "bare connections cost memory")


def test_bare_tcp_flood_does_not_cut_an_active_keep_alive_client():
    """A monitoring client keeps one HTTP connection alive and asks /healthz every 50 ms; then bare TCP
    connections arrive, 100 a second, 200 in all, and never send a byte, with --max-pending 50. The
    README says the one idle longest is closed to make room: each bare connection has been idle for
    up to half a second when the next arrives, the poller for at most 50 ms, so the bare ones are
    closed and the poller keeps its connection. Fails now: `ServerConnection.connection_made` closes
    the pending connection that *arrived* first (`next(iter(server.pending))`, never moved when it
    is active), which is the poller, half a second into the flood."""
    r = attack("bare-tcp", "--max-pending=50", conns=200, rate=100, connect_timeout=3.0, hold=0.5, check_timeout=3.0,
               poller=True)
    assert r["opened"] == 200, r
    assert r["closed_by_server"] >= 200 - 50 - 10, r
    assert (r["healthz"], r["fresh_client"]) == (200, "ok"), r
    assert r["poller_error"] is None, f"the keep-alive poller was cut after {r['poller_requests']} requests: {r['poller_error']}"
    assert r["poller_requests"] >= 20, r
    assert_pair_unharmed(r)


def test_a_sigterm_of_the_battery_kills_the_servers_it_started(tmp_path):
    """The servers run in sessions of their own and are killed by PID in a `finally`, which
    Python's default SIGTERM skips. A process that started one through hostile.ServerProcess and
    is then sent SIGTERM (`timeout`, a CI runner) must take the server with it, and still end as
    SIGTERM ends it. Fails if the server outlives it (as it did before the handler)."""
    import signal
    import subprocess
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('hostile', {os.path.join(HERE, 'bench', 'hostile.py')!r})\n"
        "hostile = importlib.util.module_from_spec(spec); sys.modules['hostile'] = hostile; spec.loader.exec_module(hostile)\n"
        f"server = hostile.ServerProcess({SCRIPT!r}, [])\n"
        "server.start()\n"
        "print(server.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(driver)], stdout=subprocess.PIPE, text=True)
    server_pid = None
    try:
        server_pid = int(proc.stdout.readline())
        assert os.path.exists(f"/proc/{server_pid}"), "the server was not running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM  # it ended as the default SIGTERM ends a process
        deadline = time.monotonic() + 10
        while _running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(server_pid), f"server {server_pid} outlived the SIGTERM of the process that started it"
    finally:
        proc.kill()
        proc.wait()
        if server_pid is not None and _running(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed orphan waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
