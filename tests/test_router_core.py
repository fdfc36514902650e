"""The notification router core (actors/cores/router.py): plain pytest, no I/O, no actors."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.cores.router import (
    Router,
    RouterDeliver,
    RouterEffect,
    RouterStats,
    RouterTimer,
    SequencedEvent,
)
from protocol import EVENT_PRIORITY, ErrorCode, RemoteProtocolError, UserEvent

MS = 1_000_000
WINDOW = 100 * MS


def ev(
    user: str, event_id: int, kind: str = "order_accepted", key: str = "", ts: int = 0
) -> UserEvent:
    return UserEvent(user=user, event_id=event_id, kind=kind, key=key, data={"n": event_id}, ts=ts)


def deliveries(effects: Sequence[RouterEffect]) -> dict[str, tuple[SequencedEvent, ...]]:
    out: dict[str, tuple[SequencedEvent, ...]] = {}
    for effect in effects:
        if isinstance(effect, RouterDeliver):
            assert effect.user not in out, "one delivery per user per call"
            assert all(e.user == effect.user for e in effect.events)
            out[effect.user] = effect.events
    return out


def timers(effects: Sequence[RouterEffect]) -> list[int]:
    return [e.at_ns for e in effects if isinstance(e, RouterTimer)]


def seqs(events: Sequence[SequencedEvent]) -> list[int]:
    return [e.seq for e in events]


# -- sequencing ----------------------------------------------------------------------


def test_seqs_start_at_one_and_are_gapless_per_user() -> None:
    r = Router()
    out = deliveries(r.publish([ev("a", 1), ev("b", 1), ev("a", 2), ev("a", 3)], now_ns=0))
    assert seqs(out["a"]) == [1, 2, 3]
    assert seqs(out["b"]) == [1]
    out = deliveries(r.publish([ev("a", 4), ev("b", 2)], now_ns=1))
    assert seqs(out["a"]) == [4]
    assert seqs(out["b"]) == [2]
    assert r.last_seq("a") == 4
    assert r.last_seq("b") == 2
    assert r.last_seq("nobody") == 0


def test_one_delivery_per_user_per_call_in_first_touched_order() -> None:
    r = Router()
    effects = r.publish([ev("b", 1), ev("a", 1), ev("b", 2), ev("a", 2), ev("b", 3)], 0)
    assert [type(e) for e in effects] == [RouterDeliver, RouterDeliver]
    assert [e.user for e in effects if isinstance(e, RouterDeliver)] == ["b", "a"]


def test_sequenced_event_carries_the_user_event_and_has_the_wire_shape() -> None:
    r = Router()
    [event] = deliveries(r.publish([ev("a", 7, kind="order_rejected", ts=42)], 5))["a"]
    assert event == SequencedEvent(
        user="a",
        seq=1,
        kind="order_rejected",
        priority=0,
        ts=42,
        data={"n": 7},
        event_id=7,
        key="",
    )
    wire = event.to_wire()
    assert wire == {"seq": 1, "kind": "order_rejected", "priority": 0, "ts": 42, "data": {"n": 7}}
    assert wire["data"] is not event.data


def test_empty_publish_returns_nothing() -> None:
    assert Router().publish([], 0) == []


# -- dedup --------------------------------------------------------------------------


def test_an_event_id_seen_before_is_dropped_and_counted() -> None:
    r = Router()
    r.publish([ev("a", 1), ev("a", 2)], 0)
    out = deliveries(r.publish([ev("a", 2), ev("a", 3), ev("a", 3), ev("b", 2)], 1))
    assert [e.event_id for e in out["a"]] == [3]
    assert seqs(out["a"]) == [3]
    assert seqs(out["b"]) == [1]  # ids are per user
    assert r.stats().deduplicated == 2
    assert r.stats().published == 4


def test_a_batch_of_only_duplicates_delivers_nothing() -> None:
    r = Router()
    r.publish([ev("a", 1)], 0)
    assert r.publish([ev("a", 1)], 1) == []


def test_dedup_memory_is_bounded_but_at_least_the_replay_log() -> None:
    r = Router(replay_capacity=3)
    r.publish([ev("a", i) for i in range(1, 5)], 0)  # ids 1..4, memory holds 2..4
    out = deliveries(r.publish([ev("a", 1), ev("a", 4)], 1))
    assert [e.event_id for e in out["a"]] == [1]  # 1 was forgotten, 4 was not
    with pytest.raises(ValueError, match="dedup_capacity"):
        Router(replay_capacity=3, dedup_capacity=2)


def test_a_conflated_away_event_id_still_counts_as_seen() -> None:
    r = Router()
    r.publish([ev("a", 1, "account_update"), ev("a", 2, "account_update")], 0)
    r.tick(WINDOW)
    assert r.publish([ev("a", 1, "account_update")], WINDOW + 1) == []


# -- conflation ------------------------------------------------------------------------


def test_p2_waits_for_the_window_and_asks_for_a_timer() -> None:
    r = Router()
    effects = r.publish([ev("a", 1, "account_update")], now_ns=10)
    assert effects == [RouterTimer(at_ns=10 + WINDOW)]
    assert r.last_seq("a") == 0
    assert r.tick(10 + WINDOW - 1) == []
    out = deliveries(r.tick(10 + WINDOW))
    assert [(e.seq, e.event_id) for e in out["a"]] == [(1, 1)]
    assert r.tick(10 + 10 * WINDOW) == []


def test_conflation_keeps_the_latest_value_per_kind_and_key() -> None:
    r = Router()
    r.publish(
        [
            ev("a", 1, "position_update", key="BTC"),
            ev("a", 2, "position_update", key="ETH"),
            ev("a", 3, "account_update"),
        ],
        now_ns=0,
    )
    effects = r.publish(
        [ev("a", 4, "position_update", key="BTC"), ev("a", 5, "account_update")], now_ns=50 * MS
    )
    assert effects == []  # already pending: no second timer, nothing due
    out = deliveries(r.tick(WINDOW))
    # Survivors, in the order their latest values arrived.
    assert [(e.seq, e.event_id) for e in out["a"]] == [(1, 2), (2, 4), (3, 5)]
    stats = r.stats()
    assert (stats.conflated, stats.delivered, stats.pending) == (2, 3, 0)


def test_system_notice_p3_conflates_like_p2() -> None:
    r = Router()
    r.publish([ev("a", 1, "system_notice"), ev("a", 2, "system_notice")], 0)
    out = deliveries(r.tick(WINDOW))
    assert [e.event_id for e in out["a"]] == [2]


def test_window_zero_disables_conflation() -> None:
    r = Router(conflation_window_ns=0)
    out = deliveries(r.publish([ev("a", 1, "account_update"), ev("a", 2, "account_update")], 0))
    assert [e.event_id for e in out["a"]] == [1, 2]


def test_p1_does_not_force_out_pending_p2_before_its_window() -> None:
    r = Router()
    r.publish([ev("a", 1, "account_update")], 0)
    out = deliveries(r.publish([ev("a", 2, "order_filled")], 10 * MS))
    assert [(e.seq, e.event_id) for e in out["a"]] == [(1, 2)]
    out = deliveries(r.tick(WINDOW))
    assert [(e.seq, e.event_id) for e in out["a"]] == [(2, 1)]


def test_publish_flushes_due_pending_before_sequencing_p0_p1() -> None:
    r = Router()
    r.publish([ev("a", 1, "account_update"), ev("b", 1, "account_update")], 0)
    effects = r.publish([ev("a", 2, "order_filled")], WINDOW)  # the timer has not fired yet
    out = deliveries(effects)
    assert [(e.seq, e.event_id) for e in out["a"]] == [(1, 1), (2, 2)]
    assert [(e.seq, e.event_id) for e in out["b"]] == [(1, 1)]
    assert timers(effects) == []


def test_one_timer_outstanding_and_rearmed_after_it_fires() -> None:
    r = Router()
    assert timers(r.publish([ev("a", 1, "account_update")], 0)) == [WINDOW]
    assert timers(r.publish([ev("b", 1, "account_update")], 30 * MS)) == []
    effects = r.tick(WINDOW)
    assert seqs(deliveries(effects)["a"]) == [1]
    assert timers(effects) == [30 * MS + WINDOW]
    effects = r.tick(30 * MS + WINDOW)
    assert seqs(deliveries(effects)["b"]) == [1]
    assert timers(effects) == []


def test_a_new_pending_after_the_armed_time_waits_for_the_armed_wakeup() -> None:
    r = Router()
    r.publish([ev("a", 1, "account_update")], 0)
    # The armed wakeup (at WINDOW) is still on its way when this arrives.
    effects = r.publish([ev("a", 2, "account_update")], WINDOW + 5)
    assert seqs(deliveries(effects)["a"]) == [1]
    assert timers(effects) == []
    assert timers(r.tick(WINDOW + 6)) == [2 * WINDOW + 5]


# -- replay ------------------------------------------------------------------------


def test_replay_returns_exactly_the_events_after_a_seq() -> None:
    r = Router()
    r.publish([ev("a", i) for i in range(1, 6)], 0)
    assert seqs(r.replay("a", 0)) == [1, 2, 3, 4, 5]
    assert seqs(r.replay("a", 3)) == [4, 5]
    assert r.replay("a", 5) == ()
    assert r.replay("nobody", 0) == ()


def test_replay_unavailable_once_evicted() -> None:
    r = Router(replay_capacity=3)
    r.publish([ev("a", i) for i in range(1, 6)], 0)  # log holds 3..5
    assert seqs(r.replay("a", 2)) == [3, 4, 5]
    for after in (0, 1):
        with pytest.raises(RemoteProtocolError) as info:
            r.replay("a", after)
        assert info.value.code is ErrorCode.REPLAY_UNAVAILABLE


@pytest.mark.parametrize(("user", "after"), [("a", 3), ("a", -1), ("nobody", 1)])
def test_replay_beyond_the_last_seq_is_a_bad_request(user: str, after: int) -> None:
    r = Router()
    r.publish([ev("a", 1), ev("a", 2)], 0)
    with pytest.raises(RemoteProtocolError) as info:
        r.replay(user, after)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_pending_events_are_not_in_the_replay_until_flushed() -> None:
    r = Router()
    r.publish([ev("a", 1), ev("a", 2, "account_update")], 0)
    assert seqs(r.replay("a", 0)) == [1]
    r.tick(WINDOW)
    assert seqs(r.replay("a", 0)) == [1, 2]


# -- robustness ------------------------------------------------------------------------


def test_bad_input_changes_nothing() -> None:
    r = Router()
    r.publish([ev("a", 1, "account_update")], 0)
    before = pickle.dumps(r)
    with pytest.raises(TypeError):
        r.publish([ev("a", 2), "junk"], WINDOW)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="now_ns"):
        r.publish([ev("a", 2)], -1)
    assert pickle.dumps(r) == before


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="replay_capacity"):
        Router(replay_capacity=0)
    with pytest.raises(ValueError, match="window"):
        Router(conflation_window_ns=-1)


def test_router_pickles_mid_window_and_continues_identically() -> None:
    r = Router(replay_capacity=4)
    r.publish([ev("a", 1), ev("a", 2, "account_update"), ev("a", 1)], 0)
    clone = pickle.loads(pickle.dumps(r))
    deep = copy.deepcopy(r)
    expected = r.tick(WINDOW)
    assert seqs(deliveries(expected)["a"]) == [2]
    for other in (clone, deep):
        assert other.tick(WINDOW) == expected
        assert other.stats() == r.stats()
        assert other.replay("a", 0) == r.replay("a", 0)


def _log(r: Router, user: str) -> list[SequencedEvent]:
    """The user's whole replay log (capacity 4 in these tests)."""
    return r.replay(user, max(0, r.last_seq(user) - 4))


def _continue_identically(r: Router, other: Router) -> None:
    assert other.stats() == r.stats()
    for user in ("a", "b"):
        assert other.last_seq(user) == r.last_seq(user)
        assert _log(other, user) == _log(r, user)
    more = [ev("a", 10 + i) for i in range(6)] + [ev("b", 3, "account_update")]
    assert other.publish(more, WINDOW) == r.publish(more, WINDOW)
    assert other.tick(3 * WINDOW) == r.tick(3 * WINDOW)
    assert _log(other, "a") == _log(r, "a")
    with pytest.raises(RemoteProtocolError):  # the same capacity cut both logs
        other.replay("a", r.last_seq("a") - 5)


def test_a_router_through_the_journal_pickler_continues_identically() -> None:
    # Lanes pickle their replay logs as tuples of field values (a host snapshot's
    # pickle of every log): the log comes back with its capacity and its events.
    from actors.journal import _dumps

    r = Router(replay_capacity=4)
    r.publish([ev("a", 1), ev("a", 2, "account_update"), ev("b", 1), ev("b", 2)], 0)
    r.publish([ev("a", i) for i in range(3, 8)], 1)
    _continue_identically(r, pickle.loads(_dumps(r)))


def test_a_lane_pickled_field_by_field_still_loads() -> None:
    # Snapshots written before lanes had their own reduce hold them the journal's
    # attrs way: _attrs_restore(_Lane, names, values).
    import io

    import attrs

    from actors.cores.router import _Lane
    from actors.journal import _attrs_restore

    class OldPickler(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            if type(obj) is _Lane:
                names = tuple(f.name for f in attrs.fields(_Lane))
                return _attrs_restore, (_Lane, names, tuple(getattr(obj, n) for n in names))
            return NotImplemented

    r = Router(replay_capacity=4)
    r.publish([ev("a", 1), ev("a", 2, "account_update"), ev("b", 1)], 0)
    buffer = io.BytesIO()
    OldPickler(buffer, 5).dump(r)
    assert b"_restore_lane" not in buffer.getvalue()
    _continue_identically(r, pickle.loads(buffer.getvalue()))


def test_stats_is_a_frozen_snapshot() -> None:
    r = Router()
    r.publish([ev("a", 1), ev("b", 1, "account_update"), ev("b", 2, "account_update")], 0)
    stats = r.stats()
    assert stats == RouterStats(
        published=3, delivered=1, deduplicated=0, conflated=1, pending=1, users=2
    )
    with pytest.raises(AttributeError):
        stats.published = 9  # type: ignore[misc]


# -- properties ------------------------------------------------------------------------

USERS = ("a", "b", "c")
KINDS = sorted(EVENT_PRIORITY)


@st.composite
def operations(draw: st.DrawFn) -> list[tuple[int, list[tuple[str, str, str, bool]]]]:
    """A list of turns: (time step, batch of (user, kind, key, reuse-an-old-id))."""
    turn = st.tuples(
        st.integers(0, 2 * WINDOW),
        st.lists(
            st.tuples(
                st.sampled_from(USERS),
                st.sampled_from(KINDS),
                st.sampled_from(("", "BTC", "ETH")),
                st.booleans(),
            ),
            max_size=8,
        ),
    )
    return draw(st.lists(turn, min_size=1, max_size=25))


@given(ops=operations(), data=st.data())
def test_property_gapless_exactly_once_with_replay_cut(
    ops: list[tuple[int, list[tuple[str, str, str, bool]]]], data: st.DataObject
) -> None:
    r = Router()
    now = 0
    next_id = dict.fromkeys(USERS, 0)
    accepted: dict[str, list[UserEvent]] = {u: [] for u in USERS}
    live: dict[str, list[SequencedEvent]] = {u: [] for u in USERS}
    # The reconnecting client of each user: cut at a random turn and seq.
    cut_turn = {u: data.draw(st.integers(0, len(ops)), label=f"cut turn {u}") for u in USERS}
    cut: dict[str, tuple[int, list[SequencedEvent]]] = {}
    after_cut: dict[str, list[SequencedEvent]] = {u: [] for u in USERS}

    def record(effects: list[RouterEffect]) -> None:
        for user, events in deliveries(effects).items():
            live[user].extend(events)
            if user in cut:
                after_cut[user].extend(events)

    def take_cuts(turn: int) -> None:
        for user in USERS:
            if cut_turn[user] == turn and user not in cut:
                c = data.draw(st.integers(0, r.last_seq(user)), label=f"cut seq {user}")
                cut[user] = (c, list(r.replay(user, c)))

    for turn, (step, batch) in enumerate(ops):
        take_cuts(turn)
        now += step
        if data.draw(st.booleans(), label="tick first"):
            record(r.tick(now))
        events: list[UserEvent] = []
        for user, kind, key, reuse in batch:
            if reuse and next_id[user] > 0:
                event_id = data.draw(st.integers(1, next_id[user]), label="reused id")
            else:
                next_id[user] += 1
                event_id = next_id[user]
            event = ev(user, event_id, kind, key, ts=now)
            if all(a.event_id != event_id for a in accepted[user]) and all(
                e.event_id != event_id for e in events if e.user == user
            ):
                accepted[user].append(event)
            events.append(event)
        record(r.publish(events, now))
    take_cuts(len(ops))
    now += 10 * WINDOW
    record(r.tick(now))
    assert r.tick(now + 10 * WINDOW) == []

    for user in USERS:
        n = r.last_seq(user)
        # Gapless, no duplicates, in order.
        assert seqs(live[user]) == list(range(1, n + 1))
        # Replay after the cut + live after the cut cover the rest exactly once.
        c, replayed = cut[user]
        assert seqs(replayed) + seqs(after_cut[user]) == list(range(c + 1, n + 1))
        assert replayed == live[user][c : c + len(replayed)]
        # Each accepted event is delivered at most once; P0/P1 exactly once.
        delivered_ids = [e.event_id for e in live[user]]
        assert len(delivered_ids) == len(set(delivered_ids))
        by_id = {e.event_id: e for e in accepted[user]}
        assert set(delivered_ids) <= set(by_id)
        for event in accepted[user]:
            if event.priority <= 1:
                assert event.event_id in delivered_ids
        # P2/P3: the latest value per (kind, key) is delivered, and delivered last.
        latest: dict[tuple[str, str], int] = {}
        for event in accepted[user]:
            if event.priority >= 2:
                latest[(event.kind, event.key)] = event.event_id
        last_delivered: dict[tuple[str, str], int] = {}
        for e in live[user]:
            if e.priority >= 2:
                last_delivered[(e.kind, e.key)] = e.event_id
        assert last_delivered == latest
    stats = r.stats()
    assert stats.delivered == sum(len(v) for v in live.values())
    assert stats.published == sum(len(v) for v in accepted.values())
    assert stats.published == stats.delivered + stats.conflated


# -- the chunked replay log -------------------------------------------------------------


@given(
    capacity=st.integers(1, 80),
    n=st.integers(0, 200),
    pickled_at=st.integers(0, 200),
    encoding=st.sampled_from(["journal", "chunk-less", "field-by-field"]),
)
def test_replay_log_keeps_exactly_the_last_capacity_events_across_pickling(
    capacity: int, n: int, pickled_at: int, encoding: str
) -> None:
    # The log freezes its events into pickled chunks (32 a chunk, or capacity if
    # smaller) and expires whole chunks; replay must still return exactly the
    # events a plain bounded deque would hold, before and after a snapshot round
    # trip in the middle, including snapshots written by earlier lane encodings.
    import io
    from collections import deque

    from actors.cores.router import _Lane, _restore_lane, _seq_values
    from actors.journal import _attrs_restore, _dumps

    class OldPickler(pickle.Pickler):
        def reducer_override(self, obj: object) -> object:
            if type(obj) is not _Lane:
                return NotImplemented
            events = obj.log.after(0)
            accepted = obj.seen.accepted()  # the dedup memory was a set and a deque
            seen_ids, seen_order = set(accepted), deque(accepted)
            if encoding == "chunk-less":  # the reduce before chunking
                return _restore_lane, (obj.last_seq, capacity, list(map(_seq_values, events)),
                                       seen_ids, seen_order, obj.pending, obj.due_ns)
            # Field by field, before lanes had a reduce: the fields of that time.
            names = ("last_seq", "log", "seen_ids", "seen_order", "pending", "due_ns")
            values = (obj.last_seq, deque(events, maxlen=capacity), seen_ids, seen_order,
                      obj.pending, obj.due_ns)
            return _attrs_restore, (_Lane, names, values)

    r = Router(replay_capacity=capacity, conflation_window_ns=0)
    model: deque[SequencedEvent] = deque(maxlen=capacity)
    for i in range(1, n + 1):
        if i == pickled_at:
            if encoding == "journal":
                r = pickle.loads(_dumps(r))
            else:
                buffer = io.BytesIO()
                OldPickler(buffer, 5).dump(r)
                r = pickle.loads(buffer.getvalue())
        model.extend(deliveries(r.publish([ev("a", i)], i))["a"])
    assert r.last_seq("a") == n
    first = model[0].seq if model else 1
    for after in range(n + 1):
        if after + 1 < first:
            with pytest.raises(RemoteProtocolError) as info:
                r.replay("a", after)
            assert info.value.code == ErrorCode.REPLAY_UNAVAILABLE
        else:
            assert list(r.replay("a", after)) == list(model)[after + 1 - first:]
    if n:  # the dedup memory came through the round trip as well
        assert r.publish([ev("a", n)], n + 1) == []
        assert r.stats().deduplicated == 1


@given(
    ids=st.lists(st.integers(1, 60), max_size=120),
    consecutive=st.integers(0, 80),
    capacity=st.one_of(st.none(), st.integers(1, 40)),
    pickled_at=st.integers(0, 200),
)
def test_dedup_memory_is_exactly_the_last_capacity_accepted_ids(
    ids: list[int], consecutive: int, capacity: int | None, pickled_at: int
) -> None:
    # Runs while ids only grow, a set after the first id below the highest: either
    # way the memory must answer as a set of the last ``capacity`` accepted ids does,
    # also after a pickle round trip (a snapshot) at any point.
    from collections import deque

    from actors.cores.router import _Seen
    from actors.journal import _dumps

    stream = list(range(1, consecutive + 1)) + [consecutive + i for i in ids]
    seen = _Seen()
    model: deque[int] = deque()
    for k, event_id in enumerate(stream):
        if k == pickled_at:
            seen = pickle.loads(_dumps(seen))
        expected = event_id not in model
        if expected:
            model.append(event_id)
            if capacity is not None and len(model) > capacity:
                model.popleft()
        assert seen.add(event_id, capacity) is expected, (k, event_id)
        assert seen.accepted() == list(model)


def test_growing_event_ids_are_remembered_as_one_run() -> None:
    # The engine's case: one ledger numbers a user's events 1, 2, 3, ...; the memory
    # of the default 10,000 ids is two ints, not a set (which every snapshot pickled).
    r = Router(conflation_window_ns=0)
    for i in range(1, 12_001, 100):
        r.publish([ev("a", j) for j in range(i, i + 100)], i)
    seen = r._lanes["a"].seen
    assert seen.runs is not None and [list(run) for run in seen.runs] == [[2_001, 12_000]]
    assert r.publish([ev("a", 2_001), ev("a", 12_000)], 13_000) == []
    assert [e.event_id for e in deliveries(r.publish([ev("a", 2_000)], 13_001))["a"]] == [
        2_000]  # forgotten: accepted again, and the memory becomes a set
    assert seen.runs is None and seen.ids is not None and len(seen.ids) == 10_000


# -- stored (spilled) chunks ---------------------------------------------------------------


@given(
    capacity=st.integers(1, 100),
    n=st.integers(0, 250),
    spill_every=st.integers(1, 60),
    pickled_at=st.integers(0, 250),
)
def test_spilled_chunks_replay_exactly_and_the_store_holds_only_the_live_ones(
    capacity: int, n: int, spill_every: int, pickled_at: int
) -> None:
    # The host stores what spill() hands over and deletes what it says expired; the
    # log keeps only the seqs of the stored chunks. Replay through the store must
    # still be exactly a bounded deque's content, across a snapshot round trip, and
    # the store must not grow past the log.
    from collections import deque

    from actors.journal import _dumps

    store: dict[tuple[str, int], bytes] = {}

    def spill(r: Router) -> None:
        puts, drops = r.spill()
        for user, first, blob in puts:
            assert (user, first) not in store
            store[(user, first)] = blob
        for user, first in drops:
            del store[(user, first)]  # only stored ones are reported

    r = Router(replay_capacity=capacity, conflation_window_ns=0)
    model: deque[SequencedEvent] = deque(maxlen=capacity)
    for i in range(1, n + 1):
        if i == pickled_at:
            r = pickle.loads(_dumps(r))
        model.extend(deliveries(r.publish([ev("a", i)], i))["a"])
        if i % spill_every == 0:
            spill(r)
    spill(r)
    log = r._lanes["a"].log if n else None
    if log is not None:
        assert not log.chunks  # all stored now: the log keeps where they are, no more
        assert set(store) == {("a", log.stored_first + i * log.size)
                              for i in range(log.stored)}
    first = model[0].seq if model else 1

    def load(user: str, seq: int) -> bytes | None:
        return store.get((user, seq))

    for after in range(first - 1, n + 1):
        assert list(r.replay("a", after, load)) == list(model)[after + 1 - first:]
    if log is not None and log.stored:  # without the store, those events are gone
        with pytest.raises(RemoteProtocolError) as info:
            r.replay("a", first - 1)
        assert info.value.code == ErrorCode.REPLAY_UNAVAILABLE
    # A snapshot of the spilled router holds seqs, not the stored bytes: it stays
    # small whatever the log's length (the tail, under a chunk, is all it holds).
    assert len(_dumps(r)) < 6_000


def test_a_router_pickled_before_spilling_existed_spills_its_chunks_on_the_first_call() -> None:
    from actors.cores.router import _Lane, _restore_chunked_lane, _seq_values

    class OldPickler(pickle.Pickler):  # the reduce before stored chunks and _Seen
        def reducer_override(self, obj: object) -> object:
            if type(obj) is not _Lane:
                return NotImplemented
            log = obj.log
            accepted = obj.seen.accepted()
            return _restore_chunked_lane, (obj.last_seq, log.capacity, list(log.chunks),
                                           list(map(_seq_values, log.tail)), set(accepted),
                                           deque(accepted), obj.pending, obj.due_ns)

    import io
    from collections import deque

    r = Router(replay_capacity=100, conflation_window_ns=0)
    r.publish([ev("a", i) for i in range(1, 71)], 1)  # two chunks and a tail of 6
    buffer = io.BytesIO()
    OldPickler(buffer, 5).dump(r)
    old = pickle.loads(buffer.getvalue())
    old.__dict__.pop("_unspilled", None)
    restored = pickle.loads(pickle.dumps(old))  # as if written without the attribute
    puts, drops = restored.spill()
    assert [(u, first) for u, first, _ in puts] == [("a", 1), ("a", 33)] and drops == []
    store = {(u, first): blob for u, first, blob in puts}
    assert [e.seq for e in restored.replay("a", 0, lambda u, f: store.get((u, f)))] == list(
        range(1, 71))
