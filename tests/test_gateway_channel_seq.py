"""A market channel's ``seq`` starts at 1 at every subscription, ``ticker`` included.

``book`` and ``trades`` channels restart their count with the snapshot that
opens each subscription; a ``ticker`` channel has no snapshot, and once went on
from the previous subscription's count, which a client checking for gaps took
for lost frames.
"""

from __future__ import annotations

from typing import Any

import trio
from gateway_kit import Client
from test_gateway_book_restart import SYMBOL
from test_gateway_trades_snapshot import _fills, _trade, _with_watcher

TICKER = f"ticker.{SYMBOL}"


async def _tickers(c: Client, n: int) -> list[dict[str, Any]]:
    """Read ``c``'s frames until it holds ``n`` ticker frames; return them."""
    with trio.fail_after(10):
        while True:
            got = [f for f in c.market if f["channel"] == TICKER]
            if len(got) >= n:
                return got
            await c.frame()


async def test_a_ticker_resubscription_counts_from_one_again() -> None:
    async with _with_watcher() as (_gw, alice, bob, carol):
        assert (await carol.call("subscribe", channels=[TICKER]))["ok"]
        await _trade(bob, alice, 0)
        await _fills(alice, 1)
        first = await _tickers(carol, 1)
        assert [f["seq"] for f in first] == list(range(1, len(first) + 1))
        assert (await carol.call("unsubscribe", channels=[TICKER]))["ok"]
        carol.market.clear()
        assert (await carol.call("subscribe", channels=[TICKER]))["ok"]
        await _trade(bob, alice, 1)
        await _fills(alice, 2)
        again = await _tickers(carol, 1)
        assert again[0]["seq"] == 1
        assert again[0]["data"]["last"] == "59000.0"
