"""Sections 8-10 of microsocket.py: the topic store, dedup and history (sans-I/O units).

Each store is driven through its own methods on a FakeClock: bounds by count, age and bytes,
eviction order, and memory that stays bounded over long runs.
"""

from __future__ import annotations

import gc
import tracemalloc

import microsocket as ms
from conftest import BrokerDriver, FakeClock


# === 8. Topic store ===============================================================================


class _CountingDict(dict):
    """A dict that counts lookups and refuses to be iterated (to prove O(own topics) cleanup)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.lookups = 0

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def __iter__(self):
        raise AssertionError("the topic map must not be scanned")

    def keys(self):
        raise AssertionError("the topic map must not be scanned")

    def values(self):
        raise AssertionError("the topic map must not be scanned")

    def items(self):
        raise AssertionError("the topic map must not be scanned")


def _store_and_clients(n: int):
    broker = BrokerDriver().broker  # a Client needs a broker (with its backbone); the store itself never asks it anything
    return ms.TopicStore(), [ms.Peer(broker) for _ in range(n)]


def test_topic_store_subscribe_idempotent():
    """Subscribing twice returns True then False and counts one pair."""
    store, (a,) = _store_and_clients(1)
    assert store.subscribe(a, "t") is True
    assert store.subscribe(a, "t") is False
    assert store.count == 1
    assert store.subscribers == {"t": {a}}
    assert a.topics == {"t"}


def test_topic_store_unsubscribe_idempotent_and_removes_empty_topic():
    """Unsubscribing returns True then False, and a topic with no subscriber is removed."""
    store, (a,) = _store_and_clients(1)
    assert store.unsubscribe(a, "t") is False  # never subscribed
    store.subscribe(a, "t")
    assert store.unsubscribe(a, "t") is True
    assert store.unsubscribe(a, "t") is False
    assert store.count == 0
    assert store.subscribers == {}
    assert a.topics == set()


def test_topic_store_shared_topic_survives_one_unsubscribe():
    """A topic stays while another client is still subscribed, and the count is exact."""
    store, (a, b) = _store_and_clients(2)
    store.subscribe(a, "t")
    store.subscribe(b, "t")
    store.subscribe(b, "u")
    assert store.count == 3
    store.unsubscribe(a, "t")
    assert store.subscribers == {"t": {b}, "u": {b}}
    assert store.count == 2


def test_topic_store_remove_client_leaves_nothing_behind():
    """remove_client drops every pair of that client and only those, removing emptied topics."""
    store, (a, b) = _store_and_clients(2)
    for t in ("x", "y", "z"):
        store.subscribe(a, t)
    store.subscribe(b, "y")
    store.remove_client(a)
    assert a.topics == set()
    assert store.subscribers == {"y": {b}}
    assert store.count == 1
    store.remove_client(a)  # twice is harmless
    store.remove_client(b)
    assert store.subscribers == {} and store.count == 0


def test_topic_store_remove_client_touches_only_its_topics():
    """remove_client looks up only the client's own topics and never scans the whole topic map."""
    store, (a, b) = _store_and_clients(2)
    for i in range(2000):
        store.subscribe(b, f"other.{i}")
    store.subscribe(a, "mine.1")
    store.subscribe(a, "mine.2")
    store.subscribe(a, "other.7")
    store.subscribers = _CountingDict(store.subscribers)
    store.remove_client(a)
    assert store.subscribers.lookups <= 2 * 3  # a constant per own topic, not per topic in the store
    assert store.count == 2000
    assert "mine.1" not in store.subscribers and "mine.2" not in store.subscribers
    assert dict.__getitem__(store.subscribers, "other.7") == {b}


# === 9. Dedup =====================================================================================


def test_dedup_duplicate_inside_window_returns_seq():
    """A remembered (user, messageId) returns its seqNo inside the window; other users and ids do not."""
    clock = FakeClock()
    d = ms.Dedup(window=10, clock=clock)
    assert d.get("u", "m1") is None
    d.add("u", "m1", 41)
    assert d.get("u", "m1") == 41
    assert d.get("v", "m1") is None
    assert d.get("u", "m2") is None
    clock.advance(9.999)
    assert d.get("u", "m1") == 41


def test_dedup_forgets_after_window():
    """An entry is forgotten once the window has passed, and the next add purges it."""
    clock = FakeClock()
    d = ms.Dedup(window=10, clock=clock)
    d.add("u", "m1", 1)
    d.add("v", "m1", 2)
    clock.advance(10)
    assert d.get("u", "m1") is None
    assert d.get("v", "m1") is None
    d.add("w", "m9", 3)
    assert len(d) == 1


def test_dedup_readd_expired_id():
    """An id whose entry expired can be added again and is then remembered with its new seqNo."""
    clock = FakeClock()
    d = ms.Dedup(window=10, clock=clock)
    d.add("u", "m1", 1)
    clock.advance(11)
    assert d.get("u", "m1") is None
    d.add("u", "m1", 7)
    assert d.get("u", "m1") == 7
    assert len(d) == 1
    clock.advance(9)
    assert d.get("u", "m1") == 7


def test_dedup_per_user_bound_evicts_that_users_oldest():
    """Over the per-user bound, that user's oldest id goes, even when another user's ids are older."""
    clock = FakeClock()
    d = ms.Dedup(window=100, per_user=3, total=100, clock=clock)
    d.add("v", "old", 100)
    for i in range(1, 5):
        clock.advance(1)
        d.add("u", f"m{i}", i)
    assert d.get("u", "m1") is None
    assert [d.get("u", f"m{i}") for i in (2, 3, 4)] == [2, 3, 4]
    assert d.get("v", "old") == 100
    assert len(d) == 4


def test_dedup_total_bound_evicts_globally_oldest():
    """Over the total bound, the oldest entry of any user goes first."""
    clock = FakeClock()
    d = ms.Dedup(window=100, per_user=100, total=4, clock=clock)
    for user, mid, seq in (("u", "a1", 1), ("v", "b1", 2), ("u", "a2", 3), ("w", "c1", 4)):
        clock.advance(1)
        d.add(user, mid, seq)
    clock.advance(1)
    d.add("w", "c2", 5)
    assert d.get("u", "a1") is None
    assert d.get("v", "b1") == 2
    clock.advance(1)
    d.add("w", "c3", 6)
    assert d.get("v", "b1") is None
    assert [d.get("u", "a2"), d.get("w", "c1"), d.get("w", "c2"), d.get("w", "c3")] == [3, 4, 5, 6]
    assert len(d) == 4


def test_dedup_len_bounded():
    """However many ids are added, len() stays within the total and each user within its bound."""
    clock = FakeClock()
    d = ms.Dedup(window=1e9, per_user=50, total=300, clock=clock)
    for i in range(5000):
        clock.advance(0.001)
        d.add(f"user{i % 13}", f"m{i}", i)
        assert len(d) <= 300
    for u in range(13):
        recent = [i for i in range(5000) if i % 13 == u][-50:]
        assert sum(d.get(f"user{u}", f"m{i}") is not None for i in range(5000) if i % 13 == u) <= 50
        assert d.get(f"user{u}", f"m{recent[-1]}") == recent[-1]


def test_dedup_readd_live_id_moves_it_to_the_young_end():
    """Adding a live id again replaces it without growing, and it is then evicted last."""
    clock = FakeClock()
    d = ms.Dedup(window=100, per_user=2, total=100, clock=clock)
    d.add("u", "a", 1)
    clock.advance(1)
    d.add("u", "b", 2)
    clock.advance(1)
    d.add("u", "a", 9)
    assert len(d) == 2
    clock.advance(1)
    d.add("u", "c", 3)
    assert (d.get("u", "a"), d.get("u", "b"), d.get("u", "c")) == (9, None, 3)


# === 10. History ==================================================================================


def _frame(topic: str, seq: int, size: int = 0) -> bytes:
    """A recognisable fake frame of at least `size` bytes."""
    body = f"{topic}:{seq}".encode()
    return body + b"." * max(0, size - len(body))


def test_history_count_bound_per_topic():
    """Each topic keeps only its max_messages most recent messages; other topics are not affected."""
    h = ms.History(max_messages=3, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    for seq in range(1, 6):
        h.add("a", seq, _frame("a", seq))
    h.add("b", 1, _frame("b", 1))
    assert h.oldest("a") == 3
    assert h.between("a", 1) == [_frame("a", s) for s in (3, 4, 5)]
    assert h.between("b", 1) == [_frame("b", 1)]
    assert h.count == 4
    assert h.bytes == sum(ms.History.cost(_frame("a", s)) for s in (3, 4, 5)) + ms.History.cost(_frame("b", 1))


def test_history_age_bound():
    """Messages older than max_age are dropped (by expire() or the next add), oldest first."""
    clock = FakeClock()
    h = ms.History(max_messages=100, max_age=10, max_bytes=1 << 30, clock=clock)
    h.add("a", 1, _frame("a", 1))
    clock.advance(5)
    h.add("a", 2, _frame("a", 2))
    h.add("b", 1, _frame("b", 1))
    clock.advance(5)
    h.expire()
    assert h.oldest("a") == 2
    assert h.between("a", 1) == [_frame("a", 2)]
    assert h.oldest("b") == 1
    clock.advance(5)
    h.add("c", 1, _frame("c", 1))  # an add expires too
    assert h.oldest("a") is None and h.oldest("b") is None
    assert h.between("a", 1) == []
    assert (h.count, h.bytes) == (1, ms.History.cost(_frame("c", 1)))


def test_history_byte_bound_evicts_globally_oldest():
    """Over max_bytes in total (frames and what each entry costs), the oldest message across all topics goes first."""
    one = ms.History.cost(_frame("a", 1, 10))  # a 10-byte frame and its entries
    h = ms.History(max_messages=100, max_age=1e9, max_bytes=3 * one, clock=FakeClock())
    h.add("a", 1, _frame("a", 1, 10))
    h.add("b", 1, _frame("b", 1, 10))
    h.add("a", 2, _frame("a", 2, 10))
    assert h.bytes == 3 * one and h.count == 3
    h.add("b", 2, _frame("b", 2, 10))
    assert (h.oldest("a"), h.oldest("b")) == (2, 1)
    h.add("c", 1, _frame("c", 1, 10))
    assert (h.oldest("a"), h.oldest("b"), h.oldest("c")) == (2, 2, 1)
    assert h.bytes == 3 * one
    big = _frame("c", 2, 2 * one)  # fits the bound only alone
    h.add("c", 2, big)
    assert h.bytes <= 3 * one
    assert h.between("c", 1) == [big]
    assert h.oldest("a") is None and h.oldest("b") is None


def test_history_between_and_oldest():
    """between(topic, first[, last]) returns the retained frames in that range, in order; oldest() the first seqNo."""
    h = ms.History(max_messages=5, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    assert h.oldest("t") is None and h.between("t", 1) == []
    for seq in range(1, 9):
        h.add("t", seq, _frame("t", seq))
    assert h.oldest("t") == 4
    assert h.between("t", 6) == [_frame("t", s) for s in (6, 7, 8)]
    assert h.between("t", 1) == [_frame("t", s) for s in (4, 5, 6, 7, 8)]
    assert h.between("t", 8) == [_frame("t", 8)]
    assert h.between("t", 9) == []
    assert h.between("t", 100) == []
    assert h.between("other", 1) == []
    assert h.between("t", 5, 6) == [_frame("t", 5), _frame("t", 6)]
    assert h.between("t", 1, 4) == [_frame("t", 4)]
    assert h.between("t", 1, 3) == []
    assert h.between("t", 7, 100) == [_frame("t", 7), _frame("t", 8)]


def test_history_off_when_max_messages_is_zero():
    """max_messages=0 retains nothing."""
    h = ms.History(max_messages=0, clock=FakeClock())
    h.add("t", 1, b"x")
    assert (h.oldest("t"), h.between("t", 1), h.count, h.bytes) == (None, [], 0, 0)


def _memory_growth(add, first: int, last: int) -> int:
    """Bytes still allocated after calls first..last of add(i) that were not after calls 1..first-1."""
    for i in range(1, first):
        add(i)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(first, last + 1):
            add(i)
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()


def test_history_long_run_keeps_memory_bounded():
    """50,000 publishes to one topic with max_messages=10 leave memory flat: no per-message bookkeeping piles up."""
    h = ms.History(max_messages=10, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    grown = _memory_growth(lambda seq: h.add("hot", seq, b"m"), 5_000, 50_000)
    assert grown < 64 << 10, f"memory grew by {grown} bytes over 45,000 publishes that retain 10"
    assert h.count == 10 and h.oldest("hot") == 49_991


def test_history_long_run_behind_a_long_lived_message_stays_bounded():
    """A long-lived message of another topic at the front of the eviction order does not let stale entries pile up."""
    h = ms.History(max_messages=10, max_age=1e9, max_bytes=1 << 30, clock=FakeClock())
    h.add("cold", 1, b"c")
    grown = _memory_growth(lambda seq: h.add("hot", seq, b"m"), 5_000, 50_000)
    assert grown < 64 << 10, f"memory grew by {grown} bytes over 45,000 publishes behind a long-lived message"
    assert h.oldest("cold") == 1 and h.oldest("hot") == 49_991
    assert h.between("hot", 1) == [b"m"] * 10
