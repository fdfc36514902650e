"""simulations.live: the monitor's market stream checked frame by frame during a run."""

from __future__ import annotations

from typing import Any

from gateway.cli import load_instruments
from simulations.history import MarketRecord
from simulations.live import LiveMarketCheck

INSTRUMENTS = load_instruments(None)  # BTC-PERP: tick 0.1, lot 0.001


def rec(channel: str, seq: int, kind: str, epoch: int = 1, **data: Any) -> MarketRecord:
    return MarketRecord(channel=channel, seq=seq, kind=kind, epoch=epoch, ts=seq,
                        received_wall_ns=1_000 + seq, data=data)


def fed(*records: MarketRecord) -> LiveMarketCheck:
    check = LiveMarketCheck(INSTRUMENTS)
    for r in records:
        check.feed(r)
    return check


BOOK = "book.BTC-PERP"


def test_a_clean_stream_passes() -> None:
    check = fed(
        rec(BOOK, 1, "snapshot", bids=[["60000.0", "0.002"]], asks=[["60001.0", "0.001"]]),
        rec(BOOK, 2, "delta", bids=[["60000.5", "0.001"]]),
        rec(BOOK, 3, "delta", asks=[["60001.0", "0"]]),  # qty 0 removes the level
        rec(BOOK, 4, "delta", asks=[["60000.6", "0.003"]]),
        rec("trades.BTC-PERP", 1, "trade"),
        rec("trades.BTC-PERP", 2, "trade"),
        rec(BOOK, 1, "snapshot", epoch=2, bids=[], asks=[]),  # a resubscription restarts
    )
    assert check.passed and check.status() == "ok"
    assert check.to_json()["frames"] == 7


def test_a_crossed_book_fails_at_the_frame_that_crossed_it() -> None:
    check = fed(
        rec(BOOK, 1, "snapshot", bids=[["60000.0", "0.002"]], asks=[["60001.0", "0.001"]]),
        rec(BOOK, 2, "delta", bids=[["60001.0", "0.001"]]),  # bid = ask
    )
    assert not check.passed and check.status() == "FAIL (1)"
    assert check.violations == [
        f"{BOOK} epoch 1 seq 2: book crossed, best bid 600010 >= best ask 600010 ticks"]
    assert check.first_violation_ns == 1_002


def test_gaps_duplicates_and_deltas_without_a_snapshot_fail() -> None:
    check = fed(
        rec("trades.BTC-PERP", 1, "trade"),
        rec("trades.BTC-PERP", 3, "trade"),  # gap
        rec("trades.BTC-PERP", 3, "trade"),  # duplicate
        rec("book.ETH-PERP", 1, "delta", bids=[["3000.00", "1.00"]]),  # no snapshot first
    )
    assert check.violation_count == 3
    assert "gap of 1" in check.violations[0]
    assert "duplicate or out of order" in check.violations[1]
    assert "delta before any snapshot" in check.violations[2]


def test_after_a_gap_a_book_is_not_replayed_until_its_next_snapshot() -> None:
    check = fed(
        rec(BOOK, 1, "snapshot", bids=[["60000.0", "0.002"]], asks=[["60001.0", "0.001"]]),
        rec(BOOK, 3, "delta", bids=[["60005.0", "0.001"]]),  # gap: the book is unknown
        rec(BOOK, 4, "delta", bids=[["60006.0", "0.001"]]),  # would look crossed: skipped
    )
    assert check.violation_count == 1 and "gap of 1" in check.violations[0]
