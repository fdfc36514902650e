"""The durability journal: round trips, turns, snapshots, corruption, crashes, fsync policies."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.journal import (
    FILE_NAME,
    Discarded,
    Journal,
    JournalCompacted,
    JournalCorrupted,
    JournalError,
    Snapshot,
)

ROOT = Path(__file__).resolve().parent.parent
BOOK = "book:BTC-PERP"


@attrs.frozen(kw_only=True)
class JournalTestOrder:
    order_id: int
    side: str
    price: int
    qty: int


@attrs.frozen(kw_only=True)
class JournalTestState:
    orders: tuple[JournalTestOrder, ...]


@attrs.frozen
class JournalTestVanishing:
    value: int


def _orders(first: int, n: int) -> list[JournalTestOrder]:
    return [
        JournalTestOrder(order_id=i, side="buy" if i % 2 else "sell", price=60_000 + i, qty=i)
        for i in range(first, first + n)
    ]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal.open(tmp_path)
    yield j
    j.close()


def _raw(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / FILE_NAME, isolation_level=None)


def _fill(tmp_path: Path, n: int, *, per_turn: int = 1) -> list[JournalTestOrder]:
    records = _orders(1, n)
    with Journal.open(tmp_path) as j:
        for i in range(0, n, per_turn):
            with j.turn():
                j.append(BOOK, records[i : i + per_turn])
    return records


# -- round trips --------------------------------------------------------------------------


def test_memory_round_trip_of_frozen_attrs_records() -> None:
    with Journal(":memory:") as j:
        assert j.append(BOOK, _orders(1, 3)) == 3
        assert j.append(BOOK, _orders(4, 2)) == 5
        assert list(j.read(BOOK)) == []  # staged is not visible
        assert j.last_offset(BOOK) == 0
        j.commit()
        got = list(j.read(BOOK))
        assert got == list(enumerate(_orders(1, 5), start=1))
        assert all(isinstance(r, JournalTestOrder) for _, r in got)
        assert list(j.read(BOOK, after=3)) == [(4, _orders(4, 1)[0]), (5, _orders(5, 1)[0])]
        assert j.last_offset(BOOK) == 5
        assert j.statistics().records == 5
        assert j.statistics().commits == 1


def test_offsets_are_per_stream_and_consecutive(journal: Journal) -> None:
    with journal.turn():
        assert journal.append("account:alice", ["a1", "a2"]) == 2
        assert journal.append("router", ["r1"]) == 1
        assert journal.append("account:alice", ["a3"]) == 3
        assert journal.append("account:alice", []) == 3
    with journal.turn():
        assert journal.append("router", ["r2", "r3"]) == 3
    assert [o for o, _ in journal.read("account:alice")] == [1, 2, 3]
    assert list(journal.read("router")) == [(1, "r1"), (2, "r2"), (3, "r3")]
    assert journal.streams() == ["account:alice", "router"]
    assert journal.last_offset("nobody") == 0
    assert list(journal.read("nobody")) == []


def test_read_pages_through_a_long_stream(journal: Journal) -> None:
    with journal.turn():
        journal.append(BOOK, list(range(1, 1301)))
    assert [r for _, r in journal.read(BOOK)] == list(range(1, 1301))
    assert [o for o, _ in journal.read(BOOK, after=1000)] == list(range(1001, 1301))


def test_turn_discards_everything_staged_when_the_body_raises(journal: Journal) -> None:
    with journal.turn():
        journal.append(BOOK, ["kept"])
    with pytest.raises(RuntimeError, match="handler failed"), journal.turn():
        assert journal.append(BOOK, ["lost-1", "lost-2"]) == 3
        journal.snapshot(BOOK, 3, "lost-state")
        raise RuntimeError("handler failed")
    assert journal.statistics().staged_records == 0
    # The re-run of the handler gets the same offsets: nothing was left behind.
    with journal.turn():
        assert journal.append(BOOK, ["retried"]) == 2
    assert list(journal.read(BOOK)) == [(1, "kept"), (2, "retried")]
    assert journal.latest_snapshot(BOOK) is None


def test_turns_do_not_nest_nor_adopt_stray_records(journal: Journal) -> None:
    with journal.turn(), pytest.raises(JournalError, match="nest"), journal.turn():
        pass
    journal.append(BOOK, ["stray"])
    with pytest.raises(JournalError, match="staged"), journal.turn():
        pass
    journal.discard()
    with journal.turn():
        assert journal.append(BOOK, ["x"]) == 1


def test_an_unpicklable_record_stages_nothing(journal: Journal) -> None:
    with pytest.raises((pickle.PicklingError, AttributeError)):
        journal.append(BOOK, ["fine", lambda: None])
    assert journal.statistics().staged_records == 0
    assert journal.append(BOOK, ["fine"]) == 1
    # The journal's reused pickler starts afresh after the failed record.
    assert journal.append(BOOK, [_orders(1, 2)]) == 2
    journal.commit()
    assert list(journal.read(BOOK)) == [(1, "fine"), (2, _orders(1, 2))]


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        Journal.open(tmp_path, fsync="sometimes")
    with pytest.raises(ValueError, match="sync_interval"):
        Journal.open(tmp_path, sync_interval=-1)
    with Journal.open(tmp_path) as j:
        for bad in ("", "a\0b"):
            with pytest.raises(ValueError, match="stream"):
                j.append(bad, [1])
        with pytest.raises(ValueError, match="outside"):
            j.snapshot(BOOK, 1, "state")  # nothing at offset 1 yet
    j.close()  # idempotent
    assert j.closed
    with pytest.raises(JournalError, match="closed"):
        j.append(BOOK, [1])


def test_reopen_after_close_gives_the_same_records(tmp_path: Path) -> None:
    records = _fill(tmp_path, 20, per_turn=7)
    assert (tmp_path / FILE_NAME).exists()
    with Journal.open(tmp_path) as j:
        assert list(j.read(BOOK)) == list(enumerate(records, start=1))
        assert j.last_offset(BOOK) == 20
        assert j.streams() == [BOOK]
        with j.turn():
            assert j.append(BOOK, ["next"]) == 21
    with Journal.open(tmp_path) as j:
        assert j.last_offset(BOOK) == 21


def test_close_discards_what_is_staged(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        j.append(BOOK, ["never committed"])
    with Journal.open(tmp_path) as j:
        assert list(j.read(BOOK)) == []


def test_two_writers_share_the_file_with_disjoint_streams(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as a, Journal.open(tmp_path) as b:
        for i in range(5):
            with a.turn():
                a.append("account:alice", [i])
            with b.turn():
                b.append("account:bob", [i])
        assert [r for _, r in b.read("account:alice")] == list(range(5))
        assert a.streams() == ["account:alice", "account:bob"]


def test_a_failed_commit_discards_the_turn(tmp_path: Path) -> None:
    with Journal.open(tmp_path, busy_timeout=0) as j:
        with j.turn():
            j.append(BOOK, ["one"])
        blocker = _raw(tmp_path)
        try:
            blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            with pytest.raises(JournalError, match="commit failed"), j.turn():
                j.append(BOOK, ["two"])
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert j.statistics().staged_records == 0
        with j.turn():
            assert j.append(BOOK, ["two again"]) == 2
        assert list(j.read(BOOK)) == [(1, "one"), (2, "two again")]


# -- snapshots and recovery ---------------------------------------------------------------


def test_recovery_is_the_latest_snapshot_plus_the_records_after_it(tmp_path: Path) -> None:
    records = _orders(1, 12)
    with Journal.open(tmp_path) as j:
        with j.turn():
            j.append(BOOK, records[:4])
            j.snapshot(BOOK, 4, JournalTestState(orders=tuple(records[:4])))
        with j.turn():
            last = j.append(BOOK, records[4:9])
            j.snapshot(BOOK, last, JournalTestState(orders=tuple(records[:9])))
        with j.turn():
            j.append(BOOK, records[9:])
    with Journal.open(tmp_path) as j:
        assert j.latest_snapshot(BOOK) == Snapshot(9, JournalTestState(orders=tuple(records[:9])))
        rec = j.recover(BOOK)
        assert rec.snapshot == Snapshot(9, JournalTestState(orders=tuple(records[:9])))
        assert rec.records == [(10, records[9]), (11, records[10]), (12, records[11])]
        assert rec.discarded == [] and rec.discarded_snapshots == []
        assert rec.last_offset == 12


def test_recovery_without_snapshot_replays_everything(tmp_path: Path) -> None:
    records = _fill(tmp_path, 5)
    with Journal.open(tmp_path) as j:
        rec = j.recover(BOOK)
        assert rec.snapshot is None
        assert rec.records == list(enumerate(records, start=1))
        empty = j.recover("router")
        assert (empty.snapshot, empty.records, empty.last_offset) == (None, [], 0)


def test_a_damaged_latest_snapshot_falls_back_to_an_older_one(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        for n in (3, 6):
            with j.turn():
                last = j.append(BOOK, list(range(n - 2, n + 1)))
                j.snapshot(BOOK, last, f"state@{last}")
    raw = _raw(tmp_path)
    raw.execute("UPDATE snapshots SET state = x'00' || state WHERE seq = 6")
    raw.close()
    with Journal.open(tmp_path) as j:
        with pytest.raises(JournalCorrupted) as info:
            j.latest_snapshot(BOOK)
        assert (info.value.stream, info.value.offset) == (BOOK, 6)
        rec = j.recover(BOOK)
        assert rec.snapshot == Snapshot(3, "state@3")
        assert [o for o, _ in rec.records] == [4, 5, 6]
        assert rec.discarded_snapshots == [Discarded(6, "snapshot checksum mismatch")]
        assert j.latest_snapshot(BOOK) == Snapshot(3, "state@3")


def test_compaction_deletes_covered_records(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        with j.turn():
            j.append(BOOK, list(range(1, 11)))
            j.snapshot(BOOK, 4, "s4")
            j.snapshot(BOOK, 8, "s8")
        with pytest.raises(ValueError, match="newest snapshot"):
            j.compact(BOOK, 9)
        with j.turn():
            j.compact(BOOK, 8)
        with pytest.raises(JournalCompacted):
            list(j.read(BOOK))
        assert list(j.read(BOOK, after=8)) == [(9, 9), (10, 10)]
    with Journal.open(tmp_path) as j:
        rec = j.recover(BOOK)
        assert rec.snapshot == Snapshot(8, "s8")
        assert rec.records == [(9, 9), (10, 10)]
        raw = _raw(tmp_path)
        assert raw.execute("SELECT seq FROM snapshots").fetchall() == [(8,)]
        assert raw.execute("SELECT min(seq) FROM records").fetchone() == (9,)
        raw.close()
        # Compacting everything keeps the offsets going.
        with j.turn():
            j.snapshot(BOOK, 10, "s10")
            j.compact(BOOK, 10)
    with Journal.open(tmp_path) as j:
        assert j.last_offset(BOOK) == 10
        assert j.recover(BOOK).snapshot == Snapshot(10, "s10")
        with j.turn():
            assert j.append(BOOK, ["after"]) == 11


def test_compacted_records_without_a_valid_snapshot_are_corruption(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j, j.turn():
        j.append(BOOK, [1, 2, 3])
        j.snapshot(BOOK, 2, "s2")
        j.compact(BOOK, 2)
    raw = _raw(tmp_path)
    raw.execute("UPDATE snapshots SET checksum = x''")
    raw.close()
    with Journal.open(tmp_path) as j, pytest.raises(JournalCorrupted, match="compacted"):
        j.recover(BOOK)


# -- corruption ---------------------------------------------------------------------------

TAIL_DAMAGE = {
    "flipped payload bytes": "UPDATE records SET payload = flip(payload) WHERE stream = ? AND seq = ?",
    "deleted checksum": "UPDATE records SET checksum = x'' WHERE stream = ? AND seq = ?",
    "truncated payload": (
        "UPDATE records SET payload = substr(payload, 1, length(payload) / 2)"
        " WHERE stream = ? AND seq = ?"
    ),
}


def _damage(tmp_path: Path, how: str, stream: str, offset: int) -> None:
    raw = _raw(tmp_path)
    # SQLite has no bitwise NOT on blobs: flip every bit in Python.
    raw.create_function("flip", 1, lambda b: bytes(x ^ 0xFF for x in b), deterministic=True)
    assert raw.execute(TAIL_DAMAGE[how], (stream, offset)).rowcount == 1
    raw.close()


@pytest.mark.parametrize("how", sorted(TAIL_DAMAGE))
def test_a_damaged_tail_record_is_reported_discarded_and_appends_continue(
    tmp_path: Path, how: str
) -> None:
    records = _fill(tmp_path, 6)
    _damage(tmp_path, how, BOOK, 6)
    with Journal.open(tmp_path) as j:
        with pytest.raises(JournalCorrupted) as info:
            list(j.read(BOOK))  # read never hands out a damaged record
        assert info.value.offset == 6
        rec = j.recover(BOOK)
        assert [r for _, r in rec.records] == records[:5]
        assert len(rec.discarded) == 1 and rec.discarded[0].offset == 6
        assert "checksum" in rec.discarded[0].reason
        assert rec.last_offset == 5 == j.last_offset(BOOK)
        with j.turn():
            assert j.append(BOOK, ["replacement"]) == 6
    with Journal.open(tmp_path) as j:
        again = j.recover(BOOK)
        assert again.discarded == []
        assert [o for o, _ in again.records] == [1, 2, 3, 4, 5, 6]
        assert again.records[-1] == (6, "replacement")


def test_several_damaged_tail_records_are_all_discarded(tmp_path: Path) -> None:
    _fill(tmp_path, 8)
    _damage(tmp_path, "flipped payload bytes", BOOK, 6)
    _damage(tmp_path, "deleted checksum", BOOK, 8)
    raw = _raw(tmp_path)
    raw.execute("DELETE FROM records WHERE seq = 7")  # and a gap inside the torn tail
    raw.close()
    with Journal.open(tmp_path) as j:
        rec = j.recover(BOOK)
        assert [o for o, _ in rec.records] == [1, 2, 3, 4, 5]
        assert rec.discarded == [
            Discarded(6, "checksum mismatch"),
            Discarded(8, "checksum missing"),
        ]
        with j.turn():
            assert j.append(BOOK, ["x"]) == 6


def test_tail_damage_after_a_snapshot_keeps_the_snapshot(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j, j.turn():
        j.append(BOOK, [1, 2, 3, 4])
        j.snapshot(BOOK, 2, "s2")
    _damage(tmp_path, "truncated payload", BOOK, 4)
    with Journal.open(tmp_path) as j:
        rec = j.recover(BOOK)
        assert rec.snapshot == Snapshot(2, "s2")
        assert rec.records == [(3, 3)]
        assert [d.offset for d in rec.discarded] == [4]


@pytest.mark.parametrize("how", sorted(TAIL_DAMAGE))
def test_damage_in_the_middle_raises_and_changes_nothing(tmp_path: Path, how: str) -> None:
    _fill(tmp_path, 6)
    _damage(tmp_path, how, BOOK, 3)
    with Journal.open(tmp_path) as j:
        with pytest.raises(JournalCorrupted) as info:
            j.recover(BOOK)
        assert (info.value.stream, info.value.offset) == (BOOK, 3)
        assert BOOK in str(info.value) and "offset 3" in str(info.value)
        with pytest.raises(JournalCorrupted):
            list(j.read(BOOK))
    raw = _raw(tmp_path)
    assert raw.execute("SELECT count(*) FROM records").fetchone() == (6,)
    raw.close()


def test_a_gap_in_the_middle_is_corruption(tmp_path: Path) -> None:
    _fill(tmp_path, 6)
    raw = _raw(tmp_path)
    raw.execute("DELETE FROM records WHERE seq = 4")
    raw.close()
    with Journal.open(tmp_path) as j:
        with pytest.raises(JournalCorrupted, match="missing") as info:
            j.recover(BOOK)
        assert info.value.offset == 4
        with pytest.raises(JournalCorrupted, match="missing"):
            list(j.read(BOOK, after=2))
        assert list(j.read(BOOK, after=4)) == [(5, _orders(5, 1)[0]), (6, _orders(6, 1)[0])]


def test_a_moved_record_fails_its_checksum(tmp_path: Path) -> None:
    _fill(tmp_path, 3)
    raw = _raw(tmp_path)
    raw.execute("UPDATE records SET stream = 'account:mallory' WHERE seq = 3")
    raw.close()
    with Journal.open(tmp_path) as j:
        with pytest.raises(JournalCorrupted, match="checksum mismatch"):
            list(j.read("account:mallory", after=2))
        assert [o for o, _ in j.recover(BOOK).records] == [1, 2]


def test_an_intact_record_that_does_not_unpickle_is_never_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Journal.open(tmp_path) as j, j.turn():
        j.append(BOOK, ["ok", JournalTestVanishing(1)])
    monkeypatch.delattr(sys.modules[__name__], "JournalTestVanishing")
    with Journal.open(tmp_path) as j:
        with pytest.raises(JournalCorrupted, match="does not unpickle") as info:
            j.recover(BOOK)
        assert info.value.offset == 2
        with pytest.raises(JournalCorrupted, match="does not unpickle"):
            list(j.read(BOOK))
    raw = _raw(tmp_path)
    assert raw.execute("SELECT count(*) FROM records").fetchone() == (2,)
    raw.close()


# -- crashes and fsync policies -----------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
from actors.journal import Journal

journal = Journal.open(Path(sys.argv[1]), fsync=sys.argv[2], sync_interval=4)
for turn in range(int(sys.argv[3])):
    with journal.turn():
        journal.append("crash", [{"turn": turn, "i": i} for i in range(10)])
journal.append("crash", ["staged, never committed"])
print("committed", journal.last_offset("crash"), flush=True)
sys.stdin.read()  # stay alive until killed
"""


@pytest.mark.parametrize("policy", ["always", "batch", "off"])
def test_sigkill_right_after_commit_loses_nothing(tmp_path: Path, policy: str) -> None:
    turns = 7
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), policy, str(turns)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, text=True,
    ) as child:
        assert child.stdout is not None
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    assert line.split() == ["committed", str(turns * 10)]
    with Journal.open(tmp_path, fsync=policy) as j:
        rec = j.recover("crash")
        assert rec.discarded == []
        assert [r for _, r in rec.records] == [
            {"turn": t, "i": i} for t in range(turns) for i in range(10)
        ]
        assert rec.last_offset == turns * 10


@pytest.mark.parametrize(
    ("policy", "synchronous", "synced"), [("always", 2, 7), ("batch", 1, 2), ("off", 0, 0)]
)
def test_each_fsync_policy(tmp_path: Path, policy: str, synchronous: int, synced: int) -> None:
    statements: list[str] = []
    with Journal.open(tmp_path, fsync=policy, sync_interval=3) as j:
        assert j._db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert j._db.execute("PRAGMA synchronous").fetchone() == (synchronous,)
        j._db.set_trace_callback(statements.append)
        for i in range(7):
            with j.turn():
                j.append(BOOK, [i])
        with j.turn():
            pass  # an empty turn commits nothing
        j._db.set_trace_callback(None)
        assert j._db.execute("PRAGMA synchronous").fetchone() == (synchronous,)
        stats = j.statistics()
        assert (stats.commits, stats.records, stats.synced_commits) == (7, 7, synced)
    assert statements.count("BEGIN IMMEDIATE") == 7
    if policy == "batch":
        # Every 3rd commit runs at synchronous=FULL, which fsyncs the WAL.
        fulls = [i for i, s in enumerate(statements) if s == "PRAGMA synchronous=FULL"]
        assert len(fulls) == 2
        assert all(statements[i + 1] == "BEGIN IMMEDIATE" for i in fulls)
    else:
        assert not any(s.startswith("PRAGMA synchronous") for s in statements)
    with Journal.open(tmp_path) as j:
        assert [r for _, r in j.read(BOOK)] == list(range(7))


def test_batch_with_interval_one_syncs_every_commit(tmp_path: Path) -> None:
    with Journal.open(tmp_path, fsync="batch", sync_interval=1) as j:
        for i in range(3):
            with j.turn():
                j.append(BOOK, [i])
        assert j.statistics().synced_commits == 3
    with Journal.open(tmp_path, fsync="batch", sync_interval=0) as j:
        with j.turn():
            j.append(BOOK, [3])
        assert j.statistics().synced_commits == 0


# -- a model check ------------------------------------------------------------------------

turn_plans = st.lists(
    st.tuples(
        st.sampled_from(["account:alice", "account:bob", "router"]),
        st.lists(st.integers(), max_size=4),
        st.booleans(),  # the handler raises
    ),
    max_size=25,
)


@given(plan=turn_plans)
def test_committed_turns_are_exactly_what_reads_back(plan: list[tuple[str, list[int], bool]]) -> None:
    model: dict[str, list[int]] = {}
    with Journal(":memory:") as j:
        for stream, records, fails in plan:
            try:
                with j.turn():
                    last = j.append(stream, records)
                    assert last == len(model.get(stream, [])) + len(records)
                    if fails:
                        raise RuntimeError("poisoned")
            except RuntimeError:
                continue
            model.setdefault(stream, []).extend(records)
        for stream, records in model.items():
            assert list(j.read(stream)) == list(enumerate(records, start=1))
            assert j.last_offset(stream) == len(records)


def test_journals_of_one_thread_can_share_a_connection(tmp_path: Path) -> None:
    from actors.journal import _SHARED

    a = Journal.open(tmp_path, share=True)
    b = Journal.open(tmp_path, share=True)
    assert a._conn is b._conn  # one connection, warm page cache for both
    a.append("host:a", ["a1"])
    a.commit()
    b.append("host:b", ["b1", "b2"])
    b.commit()
    a.close()
    assert not b.closed
    b.append("host:b", ["b3"])
    b.commit()
    assert [r for _, r in b.read("host:b")] == ["b1", "b2", "b3"]
    b.close()
    assert not [key for key in _SHARED if key[0].startswith(str(tmp_path.resolve()))]
    with Journal.open(tmp_path) as c:
        assert [r for _, r in c.read("host:a")] == ["a1"]


def _other_reader(tmp_path: Path, stream: str) -> list[Any]:
    with Journal.open(tmp_path) as other:  # its own connection: sees committed data only
        return [r for _, r in other.read(stream)]


def test_deferred_journals_commit_once_per_pass(tmp_path: Path) -> None:
    from actors.journal import flush_shared

    a = Journal.open(tmp_path, share=True, defer=True)
    b = Journal.open(tmp_path, share=True, defer=True)
    try:
        a.append("host:a", ["a1"])
        a.commit()
        b.append("host:b", ["b1"])
        b.commit()
        # Written into the pass's transaction: this connection sees it (a restarted
        # host's recovery reads through it), another connection does not yet.
        assert [r for _, r in b.read("host:a")] == ["a1"]
        assert b.last_offset("host:b") == 1
        assert _other_reader(tmp_path, "host:a") == []
        assert flush_shared() == 1
        assert _other_reader(tmp_path, "host:a") == ["a1"]
        assert _other_reader(tmp_path, "host:b") == ["b1"]
        assert flush_shared() == 0  # nothing open: nothing to do
    finally:
        a.close()
        b.close()


def test_a_failed_deferred_turn_rolls_back_alone(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import actors.journal as journal_module
    from actors.journal import flush_shared

    a = Journal.open(tmp_path, share=True, defer=True)
    b = Journal.open(tmp_path, share=True, defer=True)
    try:
        a.append("host:a", ["a1"])
        a.commit()
        b.append("host:b", ["b1"])
        monkeypatch.setattr(journal_module, "_INSERT_RECORD", "INSERT INTO nowhere VALUES (?)")
        with pytest.raises(JournalError):
            b.commit()
        monkeypatch.undo()
        b.append("host:b", ["b1 again"])
        b.commit()
        flush_shared()
        assert _other_reader(tmp_path, "host:a") == ["a1"]  # the earlier turn stayed
        assert _other_reader(tmp_path, "host:b") == ["b1 again"]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("surfaces_at", ["pass_commit", "next_statement"])
def test_a_failed_buffered_write_fails_the_whole_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, surfaces_at: str
) -> None:
    # The common deferred turn (one record, a known stream) is only buffered; the
    # buffer is written at the pass's commit or before the next statement on the
    # connection. A failed write rolls the pass back and flush_shared refuses to
    # commit anything of it: nothing of the pass becomes durable, not even what it
    # wrote after the failure, and the earlier passes stay.
    import actors.journal as journal_module
    from actors.journal import flush_shared

    a = Journal.open(tmp_path, share=True, defer=True)
    b = Journal.open(tmp_path, share=True, defer=True)
    try:
        a.append("host:a", ["a1"])
        a.commit()
        b.append("host:b", ["b1"])
        b.commit()
        assert flush_shared() == 1
        a.append("host:a", ["a2"])
        a.commit()  # buffered: the INSERT has not run
        monkeypatch.setattr(journal_module, "_INSERT_RECORD", "INSERT INTO nowhere VALUES (?)")
        if surfaces_at == "next_statement":
            with pytest.raises(JournalError, match="buffered"):
                b.snapshot("host:b", 1, "state")  # stages only
                b.commit()  # not a one-record turn: writes the buffer first
            monkeypatch.undo()
            b.append("host:b", ["b2, after the failure"])
            b.commit()
        with pytest.raises(JournalError, match="buffered"):
            flush_shared()
        monkeypatch.undo()
        assert _other_reader(tmp_path, "host:a") == ["a1"]
        assert _other_reader(tmp_path, "host:b") == ["b1"]
        assert flush_shared() == 0  # the failure is reported once; the connection works
    finally:
        a.close()
        b.close()
    with Journal.open(tmp_path) as j:
        assert [r for _, r in j.read("host:a")] == ["a1"]
        assert [r for _, r in j.read("host:b")] == ["b1"]


def test_a_deferred_reader_sees_the_buffered_records_of_the_pass(tmp_path: Path) -> None:
    # A restarted host recovers on the shared connection in the middle of a pass:
    # it must see the records other journals buffered (and its own dead
    # predecessor's), in order, before they are committed.
    a = Journal.open(tmp_path, share=True, defer=True)
    b = Journal.open(tmp_path, share=True, defer=True)
    try:
        for i in range(3):
            a.append("host:a", [f"a{i}"])
            a.commit()
        assert [r for _, r in b.recover("host:a").records] == ["a0", "a1", "a2"]
        assert _other_reader(tmp_path, "host:a") == []  # not committed yet
    finally:
        a.close()
        b.close()
    assert _other_reader(tmp_path, "host:a") == ["a0", "a1", "a2"]


def test_closing_the_last_deferred_journal_commits_the_pass(tmp_path: Path) -> None:
    a = Journal.open(tmp_path, share=True, defer=True)
    b = Journal.open(tmp_path, share=True, defer=True)
    a.append("host:a", ["a1"])
    a.commit()
    a.close()  # another journal still holds the connection: the pass stays open
    assert _other_reader(tmp_path, "host:a") == []
    b.close()  # the last one: commits what the pass wrote
    assert _other_reader(tmp_path, "host:a") == ["a1"]


def test_defer_needs_a_shared_connection(tmp_path: Path) -> None:
    with Journal.open(tmp_path, defer=True) as j:  # not shared: commits per turn
        assert not j.defer
        j.append("s", ["x"])
        j.commit()
        assert _other_reader(tmp_path, "s") == ["x"]


def test_a_journal_with_the_earlier_without_rowid_tables_still_works(tmp_path: Path) -> None:
    # Journals written before records/snapshots became rowid tables keep working.
    db = _raw(tmp_path)
    db.execute("PRAGMA journal_mode=WAL")
    for table, blob in (("records", "payload"), ("snapshots", "state")):
        db.execute(
            f"CREATE TABLE {table} (stream TEXT NOT NULL, seq INTEGER NOT NULL,"
            f" {blob} BLOB NOT NULL, checksum BLOB NOT NULL, PRIMARY KEY (stream, seq))"
            " WITHOUT ROWID"
        )
    db.execute(
        "CREATE TABLE streams (name TEXT PRIMARY KEY, base INTEGER NOT NULL DEFAULT 0)"
        " WITHOUT ROWID"
    )
    db.execute("PRAGMA user_version=1")
    db.close()
    orders = _orders(1, 6)
    with Journal.open(tmp_path) as j:
        with j.turn():
            j.append(BOOK, orders[:3])
            j.snapshot(BOOK, 3, JournalTestState(orders=tuple(orders[:3])))
        with j.turn():
            j.append(BOOK, orders[3:])
    with Journal.open(tmp_path) as j:
        rec = j.recover(BOOK)
        assert rec.snapshot == Snapshot(3, JournalTestState(orders=tuple(orders[:3])))
        assert rec.records == list(enumerate(orders[3:], start=4))
        assert list(j.read(BOOK)) == list(enumerate(orders, start=1))
    kinds = _raw(tmp_path).execute(
        "SELECT sql LIKE '%WITHOUT ROWID' FROM sqlite_master WHERE name = 'records'"
    ).fetchone()
    assert kinds == (1,)


@attrs.frozen
class JournalTestReduced:
    value: int

    def __reduce__(self) -> tuple[Any, ...]:
        return (JournalTestReduced, (self.value * 1,))


@attrs.define
class JournalTestMutable:
    items: list[int]
    one: JournalTestVanishing | None = None


def test_records_pickle_attrs_compactly_and_old_pickles_still_load(tmp_path: Path) -> None:
    import enum
    from decimal import Decimal

    from actors import journal as journal_module
    from actors.cores.ledger import OrderState

    record = (
        _orders(1, 2),
        JournalTestReduced(7),
        JournalTestMutable(items=[1, 2], one=JournalTestVanishing(3)),
        Decimal("0.1"),
        JournalTestOrder,  # a class: pickled by name
        enum.Enum,  # a class with a metaclass
        OrderState.OPEN,
    )
    compact = journal_module._dumps(record)
    assert b"_attrs_restore" in compact
    assert pickle.loads(compact) == record
    # A field-by-field encoding: no attrs __getstate__ dicts, field names once.
    assert compact.count(b"order_id") == 1
    with Journal.open(tmp_path) as j:
        with j.turn():
            j.append(BOOK, [record[:5]])
        # A record pickled the default (attrs __getstate__) way, as older journals hold.
        old = pickle.dumps(_orders(3, 1), protocol=5)
        from actors.journal import _RECORD_PERSON, _checksum

        j._db.execute(
            "INSERT INTO records VALUES (?, ?, ?, ?)",
            (BOOK, 2, old, _checksum(_RECORD_PERSON, BOOK, 2, old)),
        )
    with Journal.open(tmp_path) as j:
        assert j.recover(BOOK).records == [(1, record[:5]), (2, _orders(3, 1))]


# -- the record encoding --------------------------------------------------------------------

FIXTURE = ROOT / "tests" / "fixtures" / "journal_pickle_v1.sqlite3"


def _same(a: object, b: object) -> bool:
    """Equal, and of the same types all the way down (attrs fields, containers)."""
    if type(a) is not type(b) or a != b:
        return False
    if attrs.has(type(a)):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in attrs.fields(type(a)))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)  # type: ignore[index]
    if isinstance(a, tuple | list):
        return all(_same(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[call-overload]
    return True


def test_records_and_snapshots_written_before_the_record_encoding_still_load(
    tmp_path: Path,
) -> None:
    # The fixture was written by the journal of commit fd9551b (records pickled with
    # _attrs_restore per attrs object): see tests/journal_records.py.
    from journal_records import STREAM, engine_records, snapshot_state

    (tmp_path / FILE_NAME).write_bytes(FIXTURE.read_bytes())
    expected = engine_records()
    with Journal.open(tmp_path) as j:
        payloads = [p for (p,) in j._db.execute("SELECT payload FROM records ORDER BY seq")]
        assert all(b"_attrs_restore" in p for p in payloads)  # really the old encoding
        read = list(j.read(STREAM))
        assert [o for o, _ in read] == [1, 2, 3, 4]
        assert all(_same(r, e) for (_, r), e in zip(read, expected, strict=True))
    with Journal.open(tmp_path) as j:
        recovery = j.recover(STREAM)
        assert recovery.snapshot is not None and recovery.snapshot.offset == 2
        assert _same(recovery.snapshot.state, snapshot_state())
        assert [o for o, _ in recovery.records] == [3, 4]
        assert all(_same(r, e) for (_, r), e in zip(recovery.records, expected[2:], strict=True))
        with j.turn():  # and new records continue the stream
            assert j.append(STREAM, expected[:1]) == 5
        assert _same(list(j.read(STREAM, 4)), [(5, expected[0])])


def test_every_engine_message_round_trips_through_the_record_encoding(tmp_path: Path) -> None:
    from journal_records import STREAM, engine_records, messages

    from actors.journal import _dumps_record

    records = engine_records()
    with Journal.open(tmp_path) as j:
        for record in records:
            assert j._encode(record) == _dumps_record(record)
            assert _same(pickle.loads(_dumps_record(record)), record)
        for message in messages():  # each one alone, as a record of its own
            assert _same(pickle.loads(j._encode(message)), message)
        with j.turn():
            j.append(STREAM, records)
            j.snapshot(STREAM, 4, records)
    with Journal.open(tmp_path) as j:
        recovery = j.recover(STREAM)
        assert recovery.snapshot is not None and _same(recovery.snapshot.state, records)
        assert _same(list(j.read(STREAM)), list(enumerate(records, 1)))


def test_the_record_encoding_writes_one_global_and_each_class_tag_once() -> None:
    import pickletools

    from journal_records import engine_records

    from actors.journal import _dumps_record
    from actors.messages import Dest

    fills = [m for _, m in engine_records()[1].items if type(m).__name__ == "Fill"]
    dest = Dest("account", "u17")
    record = engine_records()[1].__class__(origin="o", seq=1, items=tuple(
        (dest, f) for f in fills * 3))
    data = _dumps_record(record)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(data)]
    strings = [arg for name, arg in ops if name == "SHORT_BINUNICODE"]
    assert [n for n, _ in ops].count("STACK_GLOBAL") == 1
    assert strings[:2] == ["actors.journal", "_restore"]
    assert strings.count("protocol._commands:Fill") == 1  # memoized per record
    assert strings.count("actors.messages:Dest kind key") == 1
    assert "actors.host:EngineBatch origin seq items" in strings
    assert b"_attrs_restore" not in data and b"trade_id" not in data
    assert pickle.loads(data) == record


def test_a_record_whose_class_changed_does_not_load(tmp_path: Path) -> None:
    from actors.journal import _RECORD_PERSON, _checksum, _restore

    class Forged:
        def __init__(self, *args: object) -> None:
            self.args = args

        def __reduce__(self) -> tuple[Any, ...]:
            return _restore, self.args

    bad = [
        ("actors.messages:Dest kind nosuchfield", "account", "u1"),  # a field renamed
        ("actors.messages:Dest kind key", "account"),  # a field dropped
        ("actors.messages:Dest key", "u1"),  # a field without a default added
        ("actors.messages:NoSuchMessage a", 1),  # a class removed
        ("protocol._commands:Fill", 1, 2),  # a NamedTuple with other fields
        ("no tag", 1),
    ]
    for i, args in enumerate(bad, 1):
        stream = f"s{i}"
        payload = pickle.dumps(Forged(*args), protocol=5)
        with Journal.open(tmp_path) as j:
            j._db.execute(
                "INSERT INTO records VALUES (?, ?, ?, ?)",
                (stream, 1, payload, _checksum(_RECORD_PERSON, stream, 1, payload)),
            )
            with pytest.raises(JournalCorrupted, match="does not unpickle"):
                j.recover(stream)


def test_a_record_written_before_a_field_with_a_default_was_added_gets_the_default(
    tmp_path: Path,
) -> None:
    from actors.journal import _RECORD_PERSON, _checksum, _restore
    from protocol import CancelUserOrders

    class Old:
        def __reduce__(self) -> tuple[Any, ...]:
            # CancelUserOrders as the record encoding wrote it before ``order_ids``.
            return _restore, ("protocol._commands:CancelUserOrders user symbol ts",
                              "u1", "BTC-PERP", 7)

    payload = pickle.dumps([Old(), Old()], protocol=5)
    with Journal.open(tmp_path) as j:
        j._db.execute("INSERT INTO records VALUES (?, ?, ?, ?)",
                      ("s", 1, payload, _checksum(_RECORD_PERSON, "s", 1, payload)))
        [(_, record)] = j.recover("s").records
    want = CancelUserOrders(user="u1", symbol="BTC-PERP", ts=7)
    assert record == [want, want] and record[0].order_ids is None
    assert pickle.loads(pickle.dumps(record)) == record  # whole again: it pickles


def test_a_big_snapshot_leaves_the_record_pickler_small() -> None:
    # pickle's clear_memo keeps a memo table's size: records pickled after a big
    # snapshot by the same pickler each paid for clearing it (~230 us, measured).
    with Journal(":memory:") as j, j.turn():
        j.append(BOOK, [_orders(1, 3)])
        j.snapshot(BOOK, 1, {i: (str(i), (i,)) for i in range(20_000)})
        j.append(BOOK, [_orders(1, 3)])
        assert len(j._pickler.memo.copy()) < 100


def test_a_deferring_connection_is_checkpointed_by_a_background_thread(tmp_path: Path) -> None:
    # SQLite's autocheckpoint ran inside the pass commit on the engine thread; a
    # deferring connection turns it off and a thread of its own checkpoints the WAL.
    import threading

    import actors.journal as journal_module
    from actors.journal import flush_shared

    a = Journal.open(tmp_path, share=True, defer=True)
    try:
        entry = next(e for e in journal_module._SHARED.values() if e[0] is a._conn)
        checkpointer = entry[journal_module._CHECKPOINTER]
        assert checkpointer is not None
        assert a._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for i in range(50):
            a.append("host:a", [f"a{i}" * 100])
            a.commit()
        flush_shared()
        checkpointer.done.clear()
        assert checkpointer.done.wait(10)  # the next round, after the commit
        assert checkpointer.last is not None
        busy, frames, done = checkpointer.last
        assert busy == 0 and frames > 0 and done == frames
        assert _other_reader(tmp_path, "host:a") == [f"a{i}" * 100 for i in range(50)]
    finally:
        a.close()
    assert not any(t.name == "journal-checkpointer" for t in threading.enumerate())


# -- blobs ---------------------------------------------------------------------------------


def test_blobs_are_written_with_the_turn_and_read_back(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        with j.turn():
            j.append("router", ["turn 1"])
            j.put_blobs("router", [("alice", 1, b"chunk a1"), ("bob", 1, b"chunk b1")])
        assert j.get_blob("router", "alice", 1) == b"chunk a1"
        assert j.get_blob("router", "alice", 33) is None  # never written
        assert j.get_blob("book:X", "alice", 1) is None  # per stream
        with j.turn():
            j.put_blobs("router", [("alice", 33, b"chunk a33"), ("alice", 1, b"again")])
            j.drop_blobs("router", [("bob", 1), ("carol", 5)])  # a missing one: no error
    with Journal.open(tmp_path) as j:  # durable, and another connection sees it
        assert j.get_blob("router", "alice", 1) == b"again"  # a put replaces
        assert j.get_blob("router", "alice", 33) == b"chunk a33"
        assert j.get_blob("router", "bob", 1) is None


def test_blobs_of_a_failed_turn_are_discarded(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j:
        with pytest.raises(RuntimeError), j.turn():
            j.put_blobs("router", [("alice", 1, b"lost")])
            raise RuntimeError("the handler failed")
        with j.turn():  # nothing staged is left over: the turn starts clean
            j.append("router", ["next"])
        assert j.get_blob("router", "alice", 1) is None


def test_a_damaged_blob_raises_corrupted(tmp_path: Path) -> None:
    with Journal.open(tmp_path) as j, j.turn():
        j.put_blobs("router", [("alice", 1, b"chunk")])
    db = _raw(tmp_path)
    db.execute("UPDATE blobs SET data = ? WHERE name = 'alice'", (b"chunK",))
    db.close()
    with Journal.open(tmp_path) as j, pytest.raises(JournalCorrupted, match="alice"):
        j.get_blob("router", "alice", 1)


def test_deferred_blobs_are_read_before_the_pass_commits(tmp_path: Path) -> None:
    import actors.journal as journal_module
    from actors.journal import flush_shared

    a = Journal.open(tmp_path, share=True, defer=True)
    try:
        a.append("router", ["r1"])
        a.put_blobs("router", [("alice", 1, b"chunk")])
        a.commit()
        assert a.get_blob("router", "alice", 1) == b"chunk"  # the pass's own write
        with Journal.open(tmp_path) as other:
            assert other.get_blob("router", "alice", 1) is None  # not committed yet
        assert flush_shared() == 1
        with Journal.open(tmp_path) as other:
            assert other.get_blob("router", "alice", 1) == b"chunk"
        # A known stream's one-record turns are buffered with their blob changes, in
        # order: a put, then its drop, then another put.
        for turn, (puts, drops) in enumerate([([("bob", 1, b"b1")], []),
                                              ([], [("bob", 1), ("alice", 1)]),
                                              ([("bob", 1, b"b1 again")], [])]):
            a.append("router", [f"r{turn + 2}"])
            a.put_blobs("router", puts)
            a.drop_blobs("router", drops)
            a.commit()
        assert a._shared is not None  # both buffered, not yet written:
        assert a._shared[journal_module._PENDING] and a._shared[journal_module._PENDING_BLOBS]
        assert a.get_blob("router", "bob", 1) == b"b1 again"  # a read writes them first
        assert a.get_blob("router", "alice", 1) is None
        assert flush_shared() == 1
        with Journal.open(tmp_path) as other:
            assert other.get_blob("router", "bob", 1) == b"b1 again"
            assert [r for _, r in other.read("router")] == ["r1", "r2", "r3", "r4"]
    finally:
        a.close()


def test_a_version_1_journal_is_upgraded_with_the_blobs_table(tmp_path: Path) -> None:
    db = _raw(tmp_path)
    db.execute("PRAGMA journal_mode=WAL")
    for table, blob in (("records", "payload"), ("snapshots", "state")):
        db.execute(f"CREATE TABLE {table} (stream TEXT NOT NULL, seq INTEGER NOT NULL,"
                   f" {blob} BLOB NOT NULL, checksum BLOB NOT NULL, PRIMARY KEY (stream, seq))")
    db.execute("CREATE TABLE streams (name TEXT PRIMARY KEY, base INTEGER NOT NULL DEFAULT 0)"
               " WITHOUT ROWID")
    db.execute("PRAGMA user_version=1")
    db.close()
    with Journal.open(tmp_path) as j, j.turn():
        j.append(BOOK, _orders(1, 1))
        j.put_blobs(BOOK, [("x", 1, b"blob")])
    with Journal.open(tmp_path) as j:
        assert j.get_blob(BOOK, "x", 1) == b"blob"
        assert [o for _, o in j.read(BOOK)] == _orders(1, 1)
    assert _raw(tmp_path).execute("PRAGMA user_version").fetchone() == (2,)
