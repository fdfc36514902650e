"""Every desk in one process, on a deterministic message loop (no actor runtime).

The same desks the Thespian hosts run, delivered FIFO per destination in
rounds: each round hands every destination the messages queued for it, in
order, as one turn (``handle`` each, then ``end_turn``), exactly like an actor
handling one batch message. Used by the in-process demo and by tests and
replays that need the engine's semantics on a virtual clock.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from actors.cores.router import RouterTimer
from actors.desks import AccountDesk, BookDesk, Out, RouterDesk
from actors.messages import ROUTER, Dest, RouterAttach, RouterTick
from protocol import Instrument

GatewaySink = Callable[[str, Any], None]
MarketSink = Callable[[str, Any], None]


class LocalEngine:
    """Books, accounts and the router in this process.

    Args:
        instruments: the registry; one book per instrument.
        on_gateway: called with ``(gateway_id, message)`` for every Reply and Delivery.
        on_market: called with ``(symbol, event)`` for every market-data event.
    """

    def __init__(
        self,
        instruments: Mapping[str, Instrument],
        *,
        on_gateway: GatewaySink,
        on_market: MarketSink | None = None,
        replay_capacity: int = 10_000,
        conflation_window_ns: int = 100_000_000,
    ) -> None:
        self.instruments = dict(instruments)
        self.books = {s: BookDesk(i) for s, i in self.instruments.items()}
        self.accounts: dict[str, AccountDesk] = {}
        self.router = RouterDesk(
            replay_capacity=replay_capacity, conflation_window_ns=conflation_window_ns
        )
        self._on_gateway = on_gateway
        self._on_market = on_market
        self._queue: deque[Out] = deque()
        self._timer_at: int | None = None
        self._order_ids = itertools.count(1)
        self.messages = 0

    def next_order_id(self) -> int:
        return next(self._order_ids)

    def account(self, user: str) -> AccountDesk:
        desk = self.accounts.get(user)
        if desk is None:
            desk = self.accounts[user] = AccountDesk(user, self.instruments)
        return desk

    def attach(self, user: str, gateway: str) -> None:
        """Deliver ``user``'s private events to ``gateway``."""
        self.account(user)
        self.send(ROUTER, RouterAttach(user=user, gateway=gateway))

    def send(self, dest: Dest, msg: Any) -> None:
        self._queue.append((dest, msg))

    def _desk(self, dest: Dest) -> AccountDesk | BookDesk | RouterDesk:
        if dest.kind == "account":
            return self.account(dest.key)
        if dest.kind == "book":
            return self.books[dest.key]
        if dest.kind == "router":
            return self.router
        raise ValueError(f"no desk for {dest}")

    def run(self, now_ns: int) -> None:
        """Deliver everything queued (and what it causes) and fire due timers."""
        if self._timer_at is not None and now_ns >= self._timer_at:
            self._timer_at = None
            self.send(ROUTER, RouterTick(now_ns=now_ns))
        while self._queue:
            round_: dict[Dest, list[Any]] = {}
            while self._queue:
                dest, msg = self._queue.popleft()
                round_.setdefault(dest, []).append(msg)
            for dest, msgs in round_.items():
                self._deliver(dest, msgs)

    def _deliver(self, dest: Dest, msgs: list[Any]) -> None:
        if dest.kind == "gateway":
            for m in msgs:
                self._on_gateway(dest.key, m)
            return
        if dest.kind == "market":
            if self._on_market is not None:
                for m in msgs:
                    self._on_market(dest.key, m)
            return
        desk = self._desk(dest)
        out: list[Out] = []
        for m in msgs:
            self.messages += 1
            out += desk.handle(m)
        out += desk.end_turn()
        for d, m in out:
            if d.kind == "timer":
                assert isinstance(m, RouterTimer)
                if self._timer_at is None or m.at_ns < self._timer_at:
                    self._timer_at = m.at_ns
            else:
                self._queue.append((d, m))
