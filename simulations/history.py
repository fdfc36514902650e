"""What a simulation saw: the data the invariant checkers and the report read.

The harness fills a :class:`History` while the run goes on (each agent its own
:class:`AgentLog`, a monitor connection the public channels, the fault injector
the :class:`FaultRecord` timeline) and, after the run, the engine's final state
(:class:`FinalState`). Everything here is plain data — the checkers in
:mod:`simulations.invariants` and the report in :mod:`simulations.report` are
pure functions of it, so each can be fed a deliberately broken history.

Units: quantities and prices are the wire's decimal strings turned into
integer lots and ticks of the instrument (``Instrument.qty_from_str`` style),
cash in integer minor units (``CASH_STEP``); times are ``time.monotonic_ns()``
of the harness process unless a field says otherwise.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.define(kw_only=True)
class PlacedOrder:
    """One ``place`` an agent sent, keyed by its client order id."""

    client_order_id: str
    symbol: str
    side: str  # "buy" / "sell"
    type: str  # "limit" / "market"
    qty: int  # lots
    price: int | None  # ticks, None for market orders
    submitted_ns: int
    #: When the response arrived, and what it said.
    acked_ns: int | None = None
    ok: bool | None = None
    order_id: int | None = None
    error: str | None = None  # error code of a refused place
    #: When the first ``trade_executed`` of this order reached the agent.
    first_fill_ns: int | None = None


@attrs.define(kw_only=True)
class PrivateRecord:
    """One private event as the SDK handed it to the agent (after its dedup)."""

    seq: int
    kind: str
    received_ns: int
    data: dict[str, Any] = attrs.field(factory=dict)  # the wire map (decimal strings)


@attrs.define(kw_only=True)
class MarketRecord:
    """One market frame an agent or the monitor received."""

    channel: str  # "book.BTC-PERP", "trades.BTC-PERP", "ticker.BTC-PERP"
    seq: int
    kind: str  # "snapshot" / "delta" / "trade" / "ticker"
    #: Subscription epoch: +1 on every (re)subscription of this channel by this
    #: connection owner (a reconnect resubscribes). Seqs restart per epoch.
    epoch: int
    ts: int  # the engine's event time, ns since the epoch (wall clock)
    received_wall_ns: int  # time.time_ns() at receipt, for publish→receive latency
    data: dict[str, Any] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class AgentLog:
    """Everything one agent (one user, one logical connection) did and saw."""

    user: str
    role: str  # "maker" / "noise" / "momentum" / "reconnector" / ...
    orders: dict[str, PlacedOrder] = attrs.field(factory=dict)  # by client_order_id
    private: list[PrivateRecord] = attrs.field(factory=list)
    #: Seqs a ``private`` frame announced as ``skipped`` (P2/P3 conflation).
    skipped: set[int] = attrs.field(factory=set)
    #: Private events the SDK dropped because it had already handed them out
    #: (replay overlapping live delivery) — information, not a failure.
    duplicates_dropped: int = 0
    market: list[MarketRecord] = attrs.field(factory=list)
    reconnects: int = 0
    #: Resumes the agent's client sent over a gap that lasted (gateway.client's
    #: ``gap_timeout_s``): gaps the gateway did not repair.
    gap_resumes: int = 0
    #: Connections the agent's client dropped because a request got no answer at all
    #: (gateway.client's ``answer_timeout_s``): dead connections that looked open.
    dead_connections: int = 0
    cancels: int = 0  # cancel requests sent (the places are ``orders``)
    #: The phase the agent was stuck in when its group gave up on it (None: it finished).
    stuck: str | None = None
    deposit: int = 0  # minor units deposited for this user before the run
    #: The seq the agent's stream must start at: 1 when it resumed from 0 at its first
    #: login (the harness's agents do), else the login's ``last_seq + 1``.
    first_seq: int = 1


@attrs.define(kw_only=True)
class FaultRecord:
    """One injected fault: what, on which target, when, and how it went."""

    at_ns: int
    kind: str  # "kill_book", "kill_account", "kill_router", "kill_session",
    #            "raise", "drop_client", "delay_frames", "duplicate_frames", "restart_engine"
    target: str
    ok: bool = True
    detail: str = ""


@attrs.define(kw_only=True)
class UserFinal:
    """One user's state as the engine reports it after the run (``query``)."""

    user: str
    #: ``query account``: balance, available, frozen, margin, position_pnl,
    #: realized_pnl, fees_paid, risk_ratio — as minor-unit integers.
    account: dict[str, int]
    #: symbol → signed net position in lots (``long_qty - short_qty``).
    positions: dict[str, int]
    #: The open orders (``query orders``): order_id → the wire map.
    open_orders: dict[int, dict[str, Any]]
    #: The engine's last private seq for the user at the end (a final ``resume``'s
    #: ``to_seq``); None when unknown. The agent's stream must reach it.
    last_seq: int | None = None


@attrs.define(kw_only=True)
class BookFinal:
    """One book's final depth from the engine: [(price ticks, qty lots)], best first."""

    symbol: str
    bids: list[tuple[int, int]]
    asks: list[tuple[int, int]]


@attrs.define(kw_only=True)
class FinalState:
    users: dict[str, UserFinal] = attrs.field(factory=dict)
    books: dict[str, BookFinal] = attrs.field(factory=dict)


@attrs.define(kw_only=True)
class History:
    """One simulation run, start to end."""

    seed: int
    scenario: str
    started_ns: int
    ended_ns: int = 0
    #: symbol → (tick decimal string, lot decimal string), for the report's units.
    instruments: dict[str, tuple[str, str]] = attrs.field(factory=dict)
    agents: dict[str, AgentLog] = attrs.field(factory=dict)  # by user
    #: The monitor's public-channel log (it subscribes to every trades/book channel
    #: and never drops its connection).
    monitor: list[MarketRecord] = attrs.field(factory=list)
    faults: list[FaultRecord] = attrs.field(factory=list)
    final: FinalState = attrs.field(factory=FinalState)
    #: Throughput samples: (monotonic ns, cumulative orders acknowledged).
    progress: list[tuple[int, int]] = attrs.field(factory=list)

    def all_orders(self) -> list[tuple[str, PlacedOrder]]:
        return [(a.user, o) for a in self.agents.values() for o in a.orders.values()]


__all__ = [
    "AgentLog",
    "BookFinal",
    "FaultRecord",
    "FinalState",
    "History",
    "MarketRecord",
    "PlacedOrder",
    "PrivateRecord",
    "UserFinal",
]
