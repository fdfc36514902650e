"""A client whose risk ratio rises past 0.8 gets a P0 ``risk_alert`` over the socket.

The ledger checks its ratio at the end of the account's turn; this follows the
event from there through the router and the gateway to the user's connection.
"""

from __future__ import annotations

from typing import Any

import trio
from gateway_kit import MILLION, client, running_gateway

from actors.messages import AccountDeposit, Dest
from protocol import CASH_STEP

SYMBOL = "BTC-PERP"


def _order(cid: str, side: str) -> dict[str, Any]:
    return {"client_order_id": cid, "symbol": SYMBOL, "side": side, "type": "limit",
            "price": "59000.0", "qty": "1.000"}


async def test_a_risk_alert_reaches_the_client_after_the_fill_that_raised_it() -> None:
    async with running_gateway() as gw, client(gw, "json") as alice, \
            client(gw, "json") as bob:
        assert (await alice.call("login", user="alice", password="pw"))["ok"]
        assert (await bob.call("login", user="bob", password="pw"))["ok"]
        # Leave alice 3,650 USDT: 1 BTC at 59000 takes 2,950 of margin and a 29.5 fee,
        # so her ratio becomes 2950 / 3620.5 = 0.814804585, rounded half-even to 8 places.
        keep = int(3_650 / CASH_STEP)
        gw.bridge.submit(Dest("account", "alice"), AccountDeposit(
            reply_to=None, user="alice", amount=keep - MILLION, ts=2))
        with trio.fail_after(10):
            while not any(e["kind"] == "account_update"
                          and e["data"]["balance"] == "3650.0000" for e in alice.private):
                await alice.frame()
        assert (await bob.call("place", **_order("s1", "sell")))["ok"]
        assert (await alice.call("place", **_order("b1", "buy")))["ok"]
        with trio.fail_after(10):
            while not any(e["kind"] == "risk_alert" for e in alice.private):
                await alice.frame()
        kinds = [e["kind"] for e in alice.private]
        alert = alice.private[kinds.index("risk_alert")]
        assert alert["priority"] == 0
        assert alert["data"]["risk_ratio"] == "0.81480459"
        # It follows the fill that raised it (both are sequenced at once; the turn's
        # account_update is P2 and may be conflated into a later seq).
        fill = max(i for i, e in enumerate(alice.private)
                   if e["kind"] == "trade_executed" and e["data"]["client_order_id"] == "b1")
        assert fill < kinds.index("risk_alert")
        # Bob, far from his margin, gets none.
        assert not any(e["kind"] in ("risk_alert", "margin_call") for e in bob.private)
