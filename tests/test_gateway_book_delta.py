"""A book delta removes a level with qty ``"0"``, exactly as PROTOCOL.md writes it.

Quantities are decimal strings with the lot's decimals (BTC-PERP: ``"0.001"``);
zero once went out as ``"0.000"``, and a client that compares with ``"0"`` never
removed the level.
"""

from __future__ import annotations

from gateway_kit import client, running_gateway
from test_gateway_book_restart import CHANNEL, _market_frame, _order


async def test_a_removed_level_is_qty_zero() -> None:
    async with running_gateway() as gw, client(gw, "json") as alice, \
            client(gw, "json") as carol:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await carol.call("subscribe", channels=[CHANNEL]))["ok"]
        snap = await _market_frame(carol, "snapshot", 0)
        placed = await alice.call("place", **_order("q1", "buy"))
        assert placed["ok"]
        added = await _market_frame(carol, "delta", snap["seq"])
        assert added["data"]["bids"] == [["59000.0", "0.001"]]
        assert (await alice.call("cancel", order_id=placed["result"]["order_id"]))["ok"]
        removed = await _market_frame(carol, "delta", added["seq"])
        assert removed["data"]["bids"] == [["59000.0", "0"]]
