"""Invariant checks *during* a run: the monitor's market stream, frame by frame.

The checkers of :mod:`simulations.invariants` run after the run over everything
every agent and the monitor saw. Two of them also work incrementally, so a long
run shows a violation when it happens (in the live table and in report.json as
``live_checks``) instead of only at the end:

* ``market_seqs_gapless``: per (channel, subscription epoch) the seqs arrive as
  1, 2, 3, …;
* ``books_not_crossed``: each ``book.SYMBOL`` stream, replayed from its snapshot
  (deltas carry absolute level totals, qty 0 removes a level), is never crossed
  after a frame; a gap ends the replay of that epoch until the next snapshot.

The rules are the post-run checkers' (the same helpers); the post-run checks
stay the verdict (they also cover the agents' own streams).
"""

from __future__ import annotations

from collections.abc import Mapping

from protocol import Instrument
from simulations.history import MarketRecord
from simulations.invariants import (
    _BadDataError,
    _crossed,
    _instrument,
    _replay_book_frame,
    _symbol_of,
)

#: Violations kept in full (the count goes on).
KEEP = 20


class LiveMarketCheck:
    """Feed it each market record of one connection, in receipt order."""

    def __init__(self, instruments: Mapping[str, Instrument]) -> None:
        self.instruments = instruments
        self.frames = 0
        self.violation_count = 0
        self.violations: list[str] = []
        #: Wall-clock ns of the first violation's frame receipt, if any.
        self.first_violation_ns: int | None = None
        self._expected: dict[tuple[str, int], int] = {}
        #: (channel, epoch) → (bids, asks) being replayed; None: unknown (after a gap).
        self._books: dict[tuple[str, int], tuple[dict[int, int], dict[int, int]] | None] = {}

    @property
    def passed(self) -> bool:
        return self.violation_count == 0

    def _violate(self, rec: MarketRecord, what: str) -> None:
        self.violation_count += 1
        if self.first_violation_ns is None:
            self.first_violation_ns = rec.received_wall_ns
        if len(self.violations) < KEEP:
            self.violations.append(f"{rec.channel} epoch {rec.epoch} seq {rec.seq}: {what}")

    def feed(self, rec: MarketRecord) -> None:
        self.frames += 1
        stream = (rec.channel, rec.epoch)
        expected = self._expected.get(stream, 1)
        in_order = rec.seq == expected
        if not in_order:
            what = (f"gap of {rec.seq - expected}" if rec.seq > expected
                    else "duplicate or out of order")
            self._violate(rec, f"seq where {expected} was due ({what})")
        self._expected[stream] = max(expected, rec.seq + 1)
        symbol = _symbol_of(rec.channel, "book")
        if symbol is None:
            return
        if not in_order:
            self._books[stream] = None  # unknown until the next snapshot
            if rec.kind != "snapshot":
                return
        book = self._books.get(stream)
        if book is None and stream in self._books and rec.kind == "delta":
            return  # after a gap: not replayable until a snapshot (the gap is reported)
        try:
            book = _replay_book_frame(_instrument(self.instruments, symbol), book, rec)
        except _BadDataError as exc:
            self._violate(rec, str(exc))
            self._books[stream] = None
            return
        self._books[stream] = book
        hit = _crossed(book[0], book[1])
        if hit:
            self._violate(rec, f"book crossed, best bid {hit[0]} >= best ask {hit[1]} ticks")

    def status(self) -> str:
        """A short line for the live table."""
        return "ok" if self.passed else f"FAIL ({self.violation_count})"

    def to_json(self) -> dict[str, object]:
        return {"passed": self.passed, "frames": self.frames,
                "violations": self.violation_count, "detail": list(self.violations),
                "first_violation_ns": self.first_violation_ns}
