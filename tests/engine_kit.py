"""Test kit for the actor engine: boot, a trading client on an EngineLink, views."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from actors.boot import EngineLink, boot_engine
from actors.host import EngineConfig, HostInspect, HostView
from actors.messages import (
    AccountCancel,
    AccountDeposit,
    AccountPlace,
    AccountQuery,
    Delivery,
    Dest,
    Reply,
    ReplyTo,
)
from actors.runtime import running_system
from protocol import NewOrder

ROOT = Path(__file__).resolve().parent.parent


def config(data_dir: Path | None = None, **kw: Any) -> EngineConfig:
    return EngineConfig(
        instruments_toml=(ROOT / "protocol" / "instruments.toml").read_text(),
        data_dir=None if data_dir is None else str(data_dir),
        conflation_window_ns=0,
        **kw,
    )


class Trader:
    """Requests through an EngineLink; collects replies and each user's events."""

    def __init__(self, link: EngineLink, first_order_id: int = 1) -> None:
        self.link = link
        self.ids = itertools.count(1)
        self.order_ids = itertools.count(first_order_id)
        self.replies: dict[int, Reply] = {}
        self.events: dict[str, list[Any]] = {}
        self.market: list[Any] = []

    def _take(self, got: list[Any]) -> None:
        for m in got:
            if isinstance(m, Reply):
                self.replies[int(m.reply_to.request_id)] = m  # type: ignore[arg-type]
            elif isinstance(m, Delivery):
                self.events.setdefault(m.user, []).extend(m.events)
            else:
                self.market.append(m)

    def pump(self, timeout: float = 0.2) -> None:
        self._take(self.link.receive(timeout))

    def request(self, dest: Dest, make: Any) -> Reply:
        rid = next(self.ids)
        self.link.send([(dest, make(ReplyTo(gateway=self.link.gateway_id, conn=1,
                                                request_id=rid)))])
        self._take(self.link.wait_for(
            lambda got: any(isinstance(m, Reply) and m.reply_to.request_id == rid for m in got)))
        return self.replies[rid]

    def deposit(self, user: str, amount: int, ts: int = 1) -> Reply:
        return self.request(Dest("account", user), lambda r: AccountDeposit(
            reply_to=r, user=user, amount=amount, ts=ts))

    def place(self, user: str, cid: str, side: str, price: int | None, qty: int,
              ts: int = 2, **kw: Any) -> Reply:
        order = NewOrder(order_id=next(self.order_ids), user=user, client_order_id=cid,
                         symbol=kw.pop("symbol", "BTC-PERP"), side=side,
                         order_type="limit" if price else "market", price=price, qty=qty,
                         ts=ts, **kw)
        return self.request(Dest("account", user), lambda r: AccountPlace(
            reply_to=r, order=order, ref_price=600000))

    def cancel(self, user: str, order_id: int, ts: int = 3) -> Reply:
        return self.request(Dest("account", user), lambda r: AccountCancel(
            reply_to=r, user=user, order_id=order_id, ts=ts))

    def query(self, user: str, what: str) -> dict[str, Any]:
        reply = self.request(Dest("account", user), lambda r: AccountQuery(
            reply_to=r, user=user, what=what))
        assert reply.ok, reply
        assert reply.result is not None
        return reply.result

    def wait_events(self, user: str, n: int, timeout: float = 10.0) -> list[Any]:
        def enough(got: list[Any]) -> bool:
            have = len(self.events.get(user, [])) + sum(
                len(m.events) for m in got if isinstance(m, Delivery) and m.user == user)
            return have >= n

        if not enough([]):
            self._take(self.link.wait_for(enough, timeout=timeout))
        return self.events[user]

    def seqs(self, user: str) -> list[int]:
        return [e.seq for e in self.events.get(user, [])]

    def kinds(self, user: str) -> list[str]:
        return [e.kind for e in self.events.get(user, [])]


def inspect(link: EngineLink, host_id: str) -> dict[str, Any]:
    link.refresh()
    view = link.asys.ask(link.directory.hosts[host_id], HostInspect(), timedelta(seconds=10))
    assert isinstance(view, HostView), view
    return view.desks


@contextlib.contextmanager
def engine(base: str, data_dir: Path | None = None, *, first_order_id: int = 1,
           **kw: Any) -> Iterator[Trader]:
    with running_system(base) as asys:
        boot_engine(asys, config(data_dir, **kw))
        link = EngineLink(asys, "test")
        yield Trader(link, first_order_id)
