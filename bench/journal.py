"""Journal throughput per fsync policy, next to bare SQLite with the same pragmas.

Our path (``Journal.append`` of frozen attrs events — pickling, checksums,
staging — then ``commit`` in one transaction per turn) is measured next to the
bare ceiling: ``executemany`` of the same pickled payload bytes into a table
with the same key, in a WAL file with the same ``synchronous`` pragma, one
transaction per turn, no pickling and no checksums. Figures: turns of 100
events (``events_per_s``) and turns of one event (``single_events_per_s``),
per policy; then reading back (``read.events_per_s``, ceiling: the bare SELECT
of the payloads, unpickled). ``batch`` uses the default ``sync_interval``, so
its ratio includes the periodic fsync the bare NORMAL ceiling never does.

Each run uses a fresh file in a temporary directory; best of ``--repeat``.
Prints one JSON object per line per figure.

Usage: python bench/journal.py [--events N] [--singles N] [--repeat R]
"""

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path, where this very file
# (bench/actors.py) would shadow the real ``actors`` package: drop it.
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import json
import pickle
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from actors.journal import FILE_NAME, FSYNC_POLICIES, Journal

STREAM = "book:BTC-PERP"
TURN = 100
SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "off": "OFF"}


@attrs.frozen(kw_only=True)
class BenchFill:
    """A fill-sized event, shaped like the engine's (integers, a few strings)."""

    order_id: int
    client_order_id: str
    user: str
    symbol: str
    side: str
    price: int
    qty: int
    filled_qty: int
    remaining_qty: int
    fee: int
    trade_id: int
    ts: int


def _events(n: int) -> list[BenchFill]:
    return [
        BenchFill(
            order_id=1_000_000 + i, client_order_id=f"mm-7-{i:06d}", user=f"user{i % 97}",
            symbol="BTC-PERP", side="buy" if i % 2 else "sell", price=600_001 + i % 50,
            qty=250, filled_qty=100, remaining_qty=150, fee=12, trade_id=i,
            ts=1_700_000_000_000_000_000 + i,
        )
        for i in range(n)
    ]


def _journal_write(events: list[BenchFill], per_turn: int, policy: str) -> float:
    with tempfile.TemporaryDirectory() as tmp, Journal.open(Path(tmp), fsync=policy) as j:
        t0 = time.perf_counter()
        for i in range(0, len(events), per_turn):
            with j.turn():
                j.append(STREAM, events[i : i + per_turn])
        elapsed = time.perf_counter() - t0
        assert j.last_offset(STREAM) == len(events)
    return elapsed


def _bare_connection(path: Path, policy: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={SYNCHRONOUS[policy]}")
    db.execute(
        "CREATE TABLE records (stream TEXT NOT NULL, seq INTEGER NOT NULL, payload BLOB NOT NULL,"
        " PRIMARY KEY (stream, seq)) WITHOUT ROWID"
    )
    return db


def _bare_write(payloads: list[bytes], per_turn: int, policy: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        db = _bare_connection(Path(tmp) / FILE_NAME, policy)
        try:
            t0 = time.perf_counter()
            for i in range(0, len(payloads), per_turn):
                rows = [(STREAM, i + k + 1, p) for k, p in enumerate(payloads[i : i + per_turn])]
                db.execute("BEGIN IMMEDIATE")
                db.executemany("INSERT INTO records VALUES (?, ?, ?)", rows)
                db.execute("COMMIT")
            return time.perf_counter() - t0
        finally:
            db.close()


def _read_figures(events: list[BenchFill]) -> tuple[float, float]:
    payloads = [pickle.dumps(e, protocol=5) for e in events]
    with tempfile.TemporaryDirectory() as tmp:
        with Journal.open(Path(tmp), fsync="off") as j, j.turn():
            j.append(STREAM, events)
        t0 = time.perf_counter()
        with Journal.open(Path(tmp)) as j:
            n = sum(1 for _ in j.read(STREAM))
        ours = time.perf_counter() - t0
        assert n == len(events)
    with tempfile.TemporaryDirectory() as tmp:
        db = _bare_connection(Path(tmp) / FILE_NAME, "off")
        db.executemany(
            "INSERT INTO records VALUES (?, ?, ?)",
            [(STREAM, i + 1, p) for i, p in enumerate(payloads)],
        )
        t0 = time.perf_counter()
        rows = db.execute(
            "SELECT seq, payload FROM records WHERE stream = ? ORDER BY seq", (STREAM,)
        ).fetchall()
        n = sum(1 for _, p in rows if pickle.loads(p) is not None)
        bare = time.perf_counter() - t0
        db.close()
        assert n == len(events)
    return ours, bare


def _best(run: Callable[[], float], repeat: int) -> float:
    return min(run() for _ in range(repeat))


def _line(name: str, n: int, seconds: float, ceiling_seconds: float) -> None:
    value, ceiling = n / seconds, n / ceiling_seconds
    out: dict[str, Any] = {
        "name": name, "value": round(value, 1), "unit": "events/s",
        "ceiling": round(ceiling, 1), "ratio": round(value / ceiling, 3),
    }
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=20_000, help="events per run, turns of 100")
    ap.add_argument("--singles", type=int, default=2_000, help="one-event turns per run")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    events = _events(args.events)
    payloads = [pickle.dumps(e, protocol=5) for e in events]
    for policy in FSYNC_POLICIES:
        ours = _best(lambda: _journal_write(events, TURN, policy), args.repeat)  # noqa: B023
        bare = _best(lambda: _bare_write(payloads, TURN, policy), args.repeat)  # noqa: B023
        _line(f"journal.{policy}.events_per_s", len(events), ours, bare)
    for policy in FSYNC_POLICIES:
        # Every commit of "always" waits for an fsync: fewer of them keep the run short.
        n = args.singles // 10 if policy == "always" else args.singles
        ours = _best(lambda: _journal_write(events[:n], 1, policy), args.repeat)  # noqa: B023
        bare = _best(lambda: _bare_write(payloads[:n], 1, policy), args.repeat)  # noqa: B023
        _line(f"journal.{policy}.single_events_per_s", n, ours, bare)
    ours, bare = _read_figures(events)
    _line("journal.read.events_per_s", len(events), ours, bare)


if __name__ == "__main__":
    main()
