"""The invariants a simulation run must keep, checked on its :class:`~simulations.history.History`.

Every checker is a pure function ``check_xxx(history, instruments) -> Check``:
it reads the history (what the agents and the monitor saw, and the engine's
final state) and never touches the engine, so a test can feed it a
deliberately broken history and watch it fail. :func:`check_all` runs them all.

Wire decimals are turned into integers with the instrument's own conversions
(ticks, lots) and cash strings into minor units of :data:`protocol.CASH_STEP`;
nothing passes through a float. Malformed wire data is a violation of the
checker that met it, never an exception.

What the history cannot show, no checker can prove: a private event lost after
the last one an agent received (the history has no engine-side last seq per
user), or a public trade older than the newest trades the snapshot of the monitor's
next subscription held.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Final

import attrs

from actors.desks import RECENT_TRADES
from protocol import (
    CASH_STEP,
    PPM,
    ErrorCode,
    Instrument,
    RemoteProtocolError,
    parse_decimal,
)

from .history import History, MarketRecord

__all__ = [
    "CHECKERS",
    "Check",
    "check_all",
    "check_books_not_crossed",
    "check_cash_conserved",
    "check_fills_both_sides",
    "check_fills_match_orders",
    "check_market_seqs_gapless",
    "check_net_position_zero",
    "check_orders_accounted",
    "check_private_seqs_gapless",
]

#: How many violations a detail sentence quotes before "+N more".
SHOWN: Final = 3
#: How many trades a ``trades`` snapshot holds at most (the book's newest; see
#: docs/protocol.md, *Market frames*): a full one may lack older trades.
SNAPSHOT_TRADES: Final = RECENT_TRADES

ORDER_KINDS: Final = frozenset({
    "order_accepted", "order_partially_filled", "order_filled",
    "order_canceled", "order_expired", "order_rejected",
})
#: Terminal order event kind → the outcome it records.
TERMINAL: Final[Mapping[str, str]] = {
    "order_filled": "filled",
    "order_canceled": "canceled",
    "order_expired": "expired",
    "order_rejected": "rejected",
}


@attrs.frozen(kw_only=True)
class Check:
    """The verdict of one invariant: its name, whether it held, a sentence, the numbers."""

    name: str
    passed: bool
    detail: str
    figures: dict[str, int | float] = attrs.field(factory=dict, hash=False)


# -- helpers ---------------------------------------------------------------------------


class _BadDataError(Exception):
    """A wire value a checker could not read; becomes a violation."""


def _verdict(
    name: str, violations: Sequence[str], summary: str, figures: dict[str, int | float]
) -> Check:
    figures = {**figures, "violations": len(violations)}
    if not violations:
        return Check(name=name, passed=True, detail=summary, figures=figures)
    shown = "; ".join(violations[:SHOWN])
    more = f"; +{len(violations) - SHOWN} more" if len(violations) > SHOWN else ""
    detail = f"{len(violations)} violation(s): {shown}{more} ({summary})"
    return Check(name=name, passed=False, detail=detail, figures=figures)


def _decimal(text: object, field: str) -> Decimal:
    try:
        return parse_decimal(text, field=field, code=ErrorCode.BAD_FRAME)
    except RemoteProtocolError as exc:
        raise _BadDataError(f"{field} {text!r}: {exc.message}") from None


def _instrument(instruments: Mapping[str, Instrument], symbol: object) -> Instrument:
    inst = instruments.get(symbol) if isinstance(symbol, str) else None
    if inst is None:
        raise _BadDataError(f"unknown symbol {symbol!r}")
    return inst


def _lots(inst: Instrument, text: object, field: str = "qty") -> int:
    """A wire quantity in lots; zero allowed (``filled_qty``, a removed level)."""
    _decimal(text, field)
    try:
        return inst.qty_to_lots(text, zero_ok=True)
    except RemoteProtocolError as exc:
        raise _BadDataError(f"{field} {text!r}: {exc.message}") from None


def _ticks(inst: Instrument, text: object) -> int:
    try:
        return inst.price_to_ticks(text)
    except RemoteProtocolError as exc:
        raise _BadDataError(f"price {text!r}: {exc.message}") from None


def _cash(text: object, field: str) -> int:
    """A signed wire money string in minor units of :data:`CASH_STEP`, exactly."""
    units, rest = divmod(_decimal(text, field), CASH_STEP)
    if rest != 0:
        raise _BadDataError(f"{field} {text!r} is not a multiple of {CASH_STEP}")
    return int(units)


def _symbol_of(channel: str, prefix: str) -> str | None:
    head, _, symbol = channel.partition(".")
    return symbol if head == prefix and symbol else None


def _market_sources(history: History) -> list[tuple[str, list[MarketRecord]]]:
    """``("monitor", records)`` then ``("agent USER", records)`` for each agent."""
    out = [("monitor", history.monitor)]
    out.extend((f"agent {u}", a.market) for u, a in history.agents.items())
    return out


def _streams(records: Iterable[MarketRecord]) -> dict[tuple[str, int], list[MarketRecord]]:
    """Records grouped by (channel, epoch), each group in receipt order."""
    out: dict[tuple[str, int], list[MarketRecord]] = defaultdict(list)
    for rec in records:
        out[(rec.channel, rec.epoch)].append(rec)
    return out


def _non_agent_users(history: History) -> set[str]:
    return set(history.final.users) - set(history.agents)


# -- 1. orders accounted -----------------------------------------------------------------


def check_orders_accounted(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """Every acknowledged order ended exactly one way.

    Proves: each order an agent placed and the engine acknowledged (``ok`` with an
    ``order_id``) either reached exactly one terminal private event (filled,
    canceled, expired, rejected) in its owner's stream, or is among that user's
    final open orders — never neither (a lost order), never both, never two
    terminal events, and no order event follows its terminal one.
    """
    del instruments
    name = "orders_accounted"
    violations: list[str] = []
    outcomes: Counter[str] = Counter()
    refused = unanswered = 0
    for user, agent in history.agents.items():
        # order_id → terminal kinds in receipt order; order events after a terminal one.
        terminal: dict[int, list[str]] = defaultdict(list)
        late: dict[int, str] = {}
        for ev in agent.private:
            if ev.kind not in ORDER_KINDS:
                continue
            oid = ev.data.get("order_id")
            if not isinstance(oid, int):
                violations.append(f"{user}: {ev.kind} seq {ev.seq} has no order_id")
                continue
            if ev.kind in TERMINAL:
                terminal[oid].append(ev.kind)
            elif terminal.get(oid) and oid not in late:
                late[oid] = ev.kind
        final = history.final.users.get(user)
        open_ids = set(final.open_orders) if final is not None else set()
        if final is None and any(r.ok is True for r in agent.orders.values()):
            violations.append(f"{user}: no final state, its open orders are unknown")
        for rec in agent.orders.values():
            if rec.ok is not True or rec.order_id is None:
                if rec.ok is False:
                    refused += 1
                else:
                    unanswered += 1
                continue
            oid = rec.order_id
            ends = terminal.get(oid, [])
            is_open = oid in open_ids
            label = f"{user} order {oid} ({rec.client_order_id})"
            if not ends and not is_open:
                violations.append(f"{label} lost: no terminal event and not open at the end")
                outcomes["lost"] += 1
                continue
            if ends and is_open:
                violations.append(f"{label} both {ends[0]} and open at the end")
            if len(ends) > 1:
                violations.append(f"{label} has {len(ends)} terminal events: {', '.join(ends)}")
            if oid in late:
                violations.append(f"{label} got {late[oid]} after its {ends[0]}")
            outcomes["resting" if is_open and not ends else TERMINAL[ends[0]]] += 1
    acked = sum(outcomes.values())
    order = ("filled", "canceled", "expired", "rejected", "resting", "lost")
    parts = ", ".join(f"{outcomes[k]} {k}" for k in order if outcomes[k])
    summary = f"{acked} acknowledged orders: {parts or 'none'}"
    if refused or unanswered:
        summary += f"; {refused} refused, {unanswered} never answered (not checked)"
    figures: dict[str, int | float] = {"acknowledged": acked, "refused": refused,
                                       "unanswered": unanswered}
    figures.update({k: outcomes[k] for k in order})
    return _verdict(name, violations, summary, figures)


# -- 2. private seqs gapless ---------------------------------------------------------------


def check_private_seqs_gapless(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """No private event was lost, duplicated or reordered.

    Proves: per agent, the seqs received (in receipt order strictly increasing)
    together with the seqs announced as ``skipped`` (conflated) are exactly
    ``s..n``, each once, where ``s`` is the agent's ``first_seq`` (1: the
    harness's agents resume from 0 at their first login, so they see the
    deposit's ``account_update`` too) and ``n`` the engine's last seq for the user
    at the end (``UserFinal.last_seq``; the highest seq seen when unknown) — so a
    loss at the start or at the tail of a stream fails as well.
    """
    del instruments
    name = "private_seqs_gapless"
    violations: list[str] = []
    events = skipped_total = missing_total = dup_total = disorder = 0
    late_starts = before_login = 0
    for user, agent in history.agents.items():
        seqs = [ev.seq for ev in agent.private]
        events += len(seqs)
        skipped_total += len(agent.skipped)
        for prev, cur in itertools.pairwise(seqs):
            if cur <= prev:
                disorder += 1
                violations.append(f"{user}: seq {cur} received after {prev}")
        counts = Counter(seqs)
        counts.update(agent.skipped)
        bad = sorted(s for s in counts if s < 1)
        if bad:
            violations.append(f"{user}: invalid seqs {bad[:5]}")
        dups = sorted(s for s, c in counts.items() if c > 1)
        if dups:
            dup_total += len(dups)
            violations.append(f"{user}: duplicate seqs {dups[:5]}"
                              + (f" (+{len(dups) - 5})" if len(dups) > 5 else ""))
        start = agent.first_seq
        final = history.final.users.get(user)
        n = max(counts, default=start - 1)
        if final is not None and final.last_seq is not None:
            if n > final.last_seq:
                violations.append(f"{user}: saw seq {n} beyond the engine's last seq "
                                  f"{final.last_seq}")
            n = max(n, final.last_seq)
        early = sorted(s for s in counts if s < start)
        if early:
            late_starts += 1
            before_login += len(early)
            violations.append(f"{user}: seqs {early[:5]} before its first seq {start}")
        missing = [s for s in range(start, n + 1) if s not in counts]
        if missing:
            missing_total += len(missing)
            violations.append(f"{user}: missing seqs {missing[:5]}"
                              + (f" (+{len(missing) - 5})" if len(missing) > 5 else "")
                              + f" of {start}..{n}")
    summary = (f"{events} private events and {skipped_total} skipped seqs "
               f"over {len(history.agents)} agents")
    return _verdict(name, violations, summary, {
        "agents": len(history.agents), "events": events, "skipped": skipped_total,
        "missing": missing_total, "duplicates": dup_total, "out_of_order": disorder,
        "late_starts": late_starts, "before_login": before_login})


# -- 3. fills both sides -------------------------------------------------------------------


@attrs.frozen
class _Fill:
    user: str
    liquidity: str
    side: str
    price: int
    qty: int


def check_fills_both_sides(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """Every trade has exactly its two fills and appears once on the public tape.

    Proves: for each ``(symbol, trade_id)`` in the agents' ``trade_executed``
    events there is one maker fill and one taker fill, of different users, on
    opposite sides, at the same price and qty — a trade with one fill is only
    excused (reported ``one-sided (non-agent counterparty)``) when the final
    state lists a user with no agent. The monitor's ``trades.SYMBOL`` channel
    shows each such trade (live, or in the snapshot that starts each epoch) at
    most once per subscription epoch and in at least one epoch, with the same
    price, qty and taker side; and every public trade has its fills. A trade is
    missing only when it fell while the monitor was not subscribed and is older
    than the trades its next subscription's snapshot held (a full snapshot of
    :data:`SNAPSHOT_TRADES`): such trades are counted, not failed.
    """
    name = "fills_both_sides"
    violations: list[str] = []
    fills: dict[tuple[str, int], list[_Fill]] = defaultdict(list)
    n_fills = 0
    for user, agent in history.agents.items():
        for ev in agent.private:
            if ev.kind != "trade_executed":
                continue
            d = ev.data
            try:
                inst = _instrument(instruments, d.get("symbol"))
                tid = d.get("trade_id")
                if not isinstance(tid, int):
                    raise _BadDataError(f"trade_id {tid!r}")
                fill = _Fill(user, str(d.get("liquidity")), str(d.get("side")),
                             _ticks(inst, d.get("price")), _lots(inst, d.get("qty")))
            except _BadDataError as exc:
                violations.append(f"{user} trade_executed seq {ev.seq}: {exc}")
                continue
            n_fills += 1
            fills[(inst.symbol, tid)].append(fill)

    # The public tape: per epoch (its snapshot, then live frames), each trade once.
    public: dict[tuple[str, int], tuple[int, int, str]] = {}
    tapes: dict[str, list[_EpochTape]] = defaultdict(list)
    public_frames = snapshot_trades = 0
    for (channel, epoch), recs in sorted(_streams(history.monitor).items()):
        symbol = _symbol_of(channel, "trades")
        if symbol is None:
            continue
        seen: set[int] = set()
        snapshot: list[int] | None = None
        for rec in recs:
            if rec.kind == "snapshot":
                rows = rec.data.get("trades")
                if not isinstance(rows, list):
                    violations.append(f"public {channel} seq {rec.seq}: a snapshot "
                                      "without a trades list")
                    continue
                if snapshot is not None or seen:
                    violations.append(f"public {channel} seq {rec.seq}: a snapshot "
                                      "after the first frame of its epoch")
                    continue
                snapshot = []
                snapshot_trades += len(rows)
            elif rec.kind == "trade":
                public_frames += 1
                rows = [rec.data]
            else:
                continue
            for d in rows:
                tid = d.get("trade_id") if isinstance(d, dict) else None
                try:
                    inst = _instrument(instruments, symbol)
                    if not isinstance(tid, int):
                        raise _BadDataError(f"trade_id {tid!r}")
                    row = (_ticks(inst, d.get("price")), _lots(inst, d.get("qty")),
                           str(d.get("taker_side")))
                except _BadDataError as exc:
                    violations.append(f"public {channel} seq {rec.seq}: {exc}")
                    continue
                if tid in seen:
                    violations.append(
                        f"public trade {symbol}#{tid} appears twice in epoch {epoch}")
                    continue
                seen.add(tid)
                if rec.kind == "snapshot" and snapshot is not None:
                    snapshot.append(tid)
                before = public.setdefault((symbol, tid), row)
                if before != row:
                    violations.append(f"public trade {symbol}#{tid} differs between epochs")
        tapes[symbol].append(_EpochTape(
            epoch=epoch, high=max(seen, default=0),
            window_low=min(snapshot) if snapshot and len(snapshot) >= SNAPSHOT_TRADES
            else None))

    non_agents = _non_agent_users(history)
    one_sided = before_window = 0
    for (symbol, tid), fs in sorted(fills.items()):
        label = f"trade {symbol}#{tid}"
        makers = [f for f in fs if f.liquidity == "maker"]
        takers = [f for f in fs if f.liquidity == "taker"]
        if len(fs) == 1 and non_agents and len(makers) + len(takers) == 1:
            one_sided += 1
        elif len(makers) != 1 or len(takers) != 1 or len(fs) != 2:
            violations.append(f"{label} has {len(makers)} maker and {len(takers)} taker "
                              f"fill(s) of {len(fs)}: one-sided or duplicated")
        else:
            m, t = makers[0], takers[0]
            if (m.price, m.qty) != (t.price, t.qty):
                violations.append(f"{label}: maker {m.qty}@{m.price} vs taker {t.qty}@{t.price}")
            if {m.side, t.side} != {"buy", "sell"}:
                violations.append(f"{label}: sides {m.side}/{t.side} are not opposite")
            if m.user == t.user:
                violations.append(f"{label}: both fills belong to {m.user}")
        pub = public.get((symbol, tid))
        if pub is None:
            if _before_window(tapes.get(symbol, []), tid):
                before_window += 1
            else:
                saw = ", ".join(f"epoch {t.epoch} up to #{t.high}"
                                for t in tapes.get(symbol, []))
                violations.append(f"{label} has fills but never appeared on the public tape "
                                  f"(the monitor's {symbol} trades: {saw or 'none'})")
            continue
        price, qty, taker_side = pub
        for f in fs:
            if (f.price, f.qty) != (price, qty):
                violations.append(f"{label}: public {qty}@{price} vs {f.user}'s fill "
                                  f"{f.qty}@{f.price}")
            if f.liquidity == "taker" and f.side != taker_side:
                violations.append(f"{label}: public taker side {taker_side} vs fill {f.side}")
    orphans = sorted(k for k in public if k not in fills)
    if orphans and not non_agents:
        violations.extend(f"public trade {s}#{t} has no fills" for s, t in orphans)
    summary = (f"{len(fills)} trades from {n_fills} fills, {len(public)} public trades "
               f"in {public_frames} frames and {snapshot_trades} snapshot rows")
    if one_sided:
        summary += f"; {one_sided} one-sided (non-agent counterparty)"
    if orphans and non_agents:
        summary += f"; {len(orphans)} public trades between non-agents"
    if before_window:
        summary += (f"; {before_window} trades fell while the monitor was not subscribed, "
                    "older than its next snapshot's trades (not on its tape, not failed)")
    return _verdict(name, violations, summary, {
        "trades": len(fills), "fills": n_fills, "public_trades": len(public),
        "public_frames": public_frames, "snapshot_trades": snapshot_trades,
        "one_sided": one_sided, "before_window": before_window})


@attrs.frozen
class _EpochTape:
    """What one subscription epoch of a trades channel showed the monitor.

    ``high``: the highest trade id it saw (snapshot or live; 0 for none).
    ``window_low``: the lowest trade id of its snapshot when the snapshot was full
    (:data:`SNAPSHOT_TRADES` rows: older trades did not fit), else ``None``.
    """

    epoch: int
    high: int
    window_low: int | None


def _before_window(tapes: Sequence[_EpochTape], trade_id: int) -> bool:
    """Whether ``trade_id`` fell while the monitor was not subscribed, too long before
    its next subscription for that subscription's snapshot to hold it.

    ``tapes`` are one symbol's epochs in order. Trade ids grow per symbol, so a trade
    above everything the epochs before one saw and below the lowest of that epoch's
    full snapshot happened between the subscriptions and is older than the book's
    newest trades. Any other missing trade should be on the tape: a trade between
    two subscriptions within the window is in the second one's snapshot, a trade
    before an engine restart in the snapshot of the subscription after it.
    """
    seen = 0
    for tape in tapes:
        if tape.window_low is not None and seen < trade_id < tape.window_low:
            return True
        seen = max(seen, tape.high)
    return False


# -- 4. cash conserved ---------------------------------------------------------------------


def check_cash_conserved(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """No cash was created or destroyed.

    Proves: Σ over the final users of ``balance + fees_paid - realized_pnl``
    equals Σ of the agents' deposits to the minor unit (cash moves only by
    realized PnL and fees), and the same holds per user, so cash never moved
    between accounts outside a trade. Reports the fees collected and Σ realized PnL.
    """
    del instruments
    name = "cash_conserved"
    violations: list[str] = []
    total = fees = realized = 0
    deposits = sum(a.deposit for a in history.agents.values())
    for user in sorted(set(history.agents) | set(history.final.users)):
        final = history.final.users.get(user)
        if final is None:
            violations.append(f"{user}: no final account")
            continue
        acct = final.account
        missing = [k for k in ("balance", "fees_paid", "realized_pnl") if k not in acct]
        if missing:
            violations.append(f"{user}: final account lacks {', '.join(missing)}")
            continue
        net = acct["balance"] + acct["fees_paid"] - acct["realized_pnl"]
        total += net
        fees += acct["fees_paid"]
        realized += acct["realized_pnl"]
        agent = history.agents.get(user)
        if agent is not None and net != agent.deposit:
            violations.append(f"{user}: balance+fees-realized {net} != deposit {agent.deposit} "
                              f"({net - agent.deposit:+d})")
    if total != deposits:
        violations.insert(0, f"Σ balance+fees-realized {total} != Σ deposits {deposits} "
                             f"({total - deposits:+d} minor units)")
    summary = (f"Σ balance+fees-realized {total} vs Σ deposits {deposits} minor units; "
               f"fees collected {fees}, Σ realized pnl {realized}")
    return _verdict(name, violations, summary, {
        "deposits": deposits, "total": total, "fees_collected": fees, "realized_pnl": realized,
        "difference": total - deposits})


# -- 5. net position zero ------------------------------------------------------------------


def check_net_position_zero(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """Every contract bought was sold.

    Proves: per symbol, the users' final net positions (lots) sum to zero.
    """
    name = "net_position_zero"
    sums: dict[str, int] = {s: 0 for s in instruments}
    open_lots: dict[str, int] = {s: 0 for s in instruments}
    for final in history.final.users.values():
        for symbol, qty in final.positions.items():
            sums[symbol] = sums.get(symbol, 0) + qty
            open_lots[symbol] = open_lots.get(symbol, 0) + max(qty, 0)
    violations = [f"{s}: Σ net positions {v:+d} lots" for s, v in sorted(sums.items()) if v]
    summary = ", ".join(f"{s} Σ={v:+d} (long {open_lots[s]})" for s, v in sorted(sums.items()))
    figures: dict[str, int | float] = {f"net.{s}": v for s, v in sums.items()}
    figures["users"] = len(history.final.users)
    return _verdict(name, violations, summary or "no positions", figures)


# -- 6. books not crossed ------------------------------------------------------------------


def _crossed(bids: Iterable[int], asks: Iterable[int]) -> tuple[int, int] | None:
    best_bid, best_ask = max(bids, default=None), min(asks, default=None)
    if best_bid is not None and best_ask is not None and best_bid >= best_ask:
        return best_bid, best_ask
    return None


def _apply_levels(inst: Instrument, side: dict[int, int], rows: object) -> None:
    if not isinstance(rows, list | tuple):
        raise _BadDataError(f"levels {rows!r}")
    for row in rows:
        if not isinstance(row, list | tuple) or len(row) != 2:
            raise _BadDataError(f"level {row!r}")
        price, qty = _ticks(inst, row[0]), _lots(inst, row[1])
        if qty:
            side[price] = qty
        else:
            side.pop(price, None)


def _replay_book_frame(
    inst: Instrument, book: tuple[dict[int, int], dict[int, int]] | None, rec: MarketRecord
) -> tuple[dict[int, int], dict[int, int]]:
    """``book`` (bids, asks; None before any snapshot) after the in-order frame ``rec``:
    a snapshot starts afresh, a delta sets absolute level totals (qty 0 removes).

    Raises:
        _BadDataError: not a snapshot or delta, a delta before any snapshot, bad levels.
    """
    if rec.kind == "snapshot":
        book = ({}, {})
    elif rec.kind != "delta":
        raise _BadDataError(f"unexpected kind {rec.kind!r}")
    elif book is None:
        raise _BadDataError("delta before any snapshot")
    _apply_levels(inst, book[0], rec.data.get("bids", []))
    _apply_levels(inst, book[1], rec.data.get("asks", []))
    return book


def check_books_not_crossed(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """No book was ever seen crossed.

    Proves: each final book has best bid < best ask when both sides exist; and
    replaying every ``book.SYMBOL`` stream the monitor and the agents received
    (per subscription epoch: the snapshot, then deltas of absolute level totals,
    qty 0 removing a level), the book is never crossed after any frame. A seq
    gap ends the replay of that epoch (the book is unknown until the next
    snapshot; the gap itself is :func:`check_market_seqs_gapless`'s), and a delta
    before any snapshot is a violation.
    """
    name = "books_not_crossed"
    violations: list[str] = []
    for symbol, book in sorted(history.final.books.items()):
        hit = _crossed((p for p, _ in book.bids), (p for p, _ in book.asks))
        if hit:
            violations.append(f"final {symbol} book crossed: best bid {hit[0]} >= "
                              f"best ask {hit[1]} ticks")
    frames = unreplayed = 0
    for source, records in _market_sources(history):
        for (channel, epoch), recs in sorted(_streams(records).items()):
            book_symbol = _symbol_of(channel, "book")
            if book_symbol is None:
                continue
            where = f"{source} {channel} epoch {epoch}"
            levels: tuple[dict[int, int], dict[int, int]] | None = None
            last = 0
            for i, rec in enumerate(recs):
                if rec.seq != last + 1:
                    unreplayed += len(recs) - i
                    break
                last = rec.seq
                try:
                    levels = _replay_book_frame(
                        _instrument(instruments, book_symbol), levels, rec)
                except _BadDataError as exc:
                    violations.append(f"{where} seq {rec.seq}: {exc}")
                    unreplayed += len(recs) - i
                    break
                frames += 1
                hit = _crossed(*levels)
                if hit:
                    violations.append(f"{where} seq {rec.seq}: book crossed, best bid "
                                      f"{hit[0]} >= best ask {hit[1]} ticks")
    summary = (f"{len(history.final.books)} final books, {frames} book frames replayed"
               + (f" ({unreplayed} after a gap not replayed)" if unreplayed else ""))
    return _verdict(name, violations, summary, {
        "final_books": len(history.final.books), "frames_checked": frames,
        "frames_not_replayed": unreplayed})


# -- 7. market seqs gapless ----------------------------------------------------------------


def check_market_seqs_gapless(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """No market frame was dropped, duplicated or reordered.

    Proves: for the monitor and every agent, per (channel, subscription epoch),
    the seqs in receipt order are exactly 1, 2, 3, …. Note the gateway drops
    market frames to a slow consumer and leaves exactly such a gap, so a failure
    here may be back-pressure rather than an engine fault; the detail says where.
    """
    del instruments
    name = "market_seqs_gapless"
    violations: list[str] = []
    streams = frames = gaps = 0
    for source, records in _market_sources(history):
        for (channel, epoch), recs in sorted(_streams(records).items()):
            streams += 1
            frames += len(recs)
            expected = 1
            for rec in recs:
                if rec.seq != expected:
                    gaps += 1
                    what = (f"gap of {rec.seq - expected}" if rec.seq > expected
                            else "duplicate or out of order")
                    violations.append(f"{source} {channel} epoch {epoch}: seq {rec.seq} "
                                      f"where {expected} was due ({what})")
                expected = max(expected, rec.seq + 1)
    summary = f"{frames} market frames in {streams} (channel, epoch) streams"
    return _verdict(name, violations, summary,
                    {"streams": streams, "frames": frames, "gaps": gaps})


# -- 8. fills match orders -----------------------------------------------------------------


@attrs.define
class _OrderView:
    symbol: str | None = None
    qty: int | None = None
    filled: int | None = None  # the last order event's filled_qty
    fills: int = 0
    final_kind: str | None = None


def check_fills_match_orders(history: History, instruments: Mapping[str, Instrument]) -> Check:
    """Each order's fills add up to what its events say, and never exceed it.

    Proves: per order, Σ qty of its ``trade_executed`` events equals its final
    ``filled_qty`` (from the final open orders if it rests, else its last order
    event) and never exceeds its qty; an order that ended ``order_filled`` is
    filled completely; and each fill's fee is ``ceil(notional * rate / 1e6)`` at
    the instrument's maker or taker rate.
    """
    name = "fills_match_orders"
    violations: list[str] = []
    orders = n_fills = 0
    fills_lots = 0
    for user, agent in history.agents.items():
        views: dict[int, _OrderView] = defaultdict(_OrderView)
        for rec in agent.orders.values():
            if rec.ok is True and rec.order_id is not None:
                v = views[rec.order_id]
                v.symbol, v.qty = rec.symbol, rec.qty

        def bad(what: str, u: str = user) -> None:
            violations.append(f"{u} {what}")

        for ev in agent.private:
            if ev.kind not in ORDER_KINDS and ev.kind != "trade_executed":
                continue
            d = ev.data
            oid = d.get("order_id")
            if not isinstance(oid, int):
                bad(f"{ev.kind} seq {ev.seq} has no order_id")
                continue
            v = views[oid]
            try:
                inst = _instrument(instruments, d.get("symbol"))
                if v.symbol is not None and v.symbol != inst.symbol:
                    raise _BadDataError(f"symbol {inst.symbol} but order is in {v.symbol}")
                v.symbol = inst.symbol
                if ev.kind == "trade_executed":
                    qty, price = _lots(inst, d.get("qty")), _ticks(inst, d.get("price"))
                    v.fills += qty
                    n_fills += 1
                    fills_lots += qty
                    liq = d.get("liquidity")
                    rate = inst.maker_fee_ppm if liq == "maker" else inst.taker_fee_ppm
                    due = -(-inst.notional(price, qty) * rate // PPM)
                    fee = _cash(d.get("fee"), "fee")
                    if fee != due:
                        bad(f"order {oid} trade {d.get('trade_id')}: fee {fee} where "
                            f"{liq} rate gives {due}")
                else:
                    if v.qty is None:
                        v.qty = _lots(inst, d.get("qty"))
                    v.filled = _lots(inst, d.get("filled_qty"), "filled_qty")
                    if ev.kind in TERMINAL and v.final_kind is None:
                        v.final_kind = ev.kind
            except _BadDataError as exc:
                bad(f"{ev.kind} seq {ev.seq}: {exc}")
        final = history.final.users.get(user)
        for oid, row in (final.open_orders.items() if final is not None else ()):
            v = views[oid]
            try:
                inst = _instrument(instruments, row.get("symbol", v.symbol))
                if v.qty is None:
                    v.qty = _lots(inst, row.get("qty"))
                v.filled = _lots(inst, row.get("filled_qty"), "filled_qty")
                v.symbol = inst.symbol
            except _BadDataError as exc:
                bad(f"open order {oid}: {exc}")
        for oid, v in sorted(views.items()):
            orders += 1
            if v.qty is None:
                bad(f"order {oid}: {v.fills} lots filled on an order never acknowledged "
                    "nor reported")
                continue
            filled = 0 if v.filled is None else v.filled
            if v.fills > v.qty:
                bad(f"order {oid}: fills total {v.fills} lots, exceeding its qty {v.qty}")
            if v.fills != filled:
                bad(f"order {oid}: fills total {v.fills} lots but filled_qty is {filled}")
            if filled > v.qty:
                bad(f"order {oid}: filled_qty {filled} exceeds its qty {v.qty}")
            if v.final_kind == "order_filled" and filled != v.qty:
                bad(f"order {oid}: order_filled with {filled} of {v.qty} lots")
    summary = f"{orders} orders, {n_fills} fills, {fills_lots} lots filled"
    return _verdict(name, violations, summary,
                    {"orders": orders, "fills": n_fills, "lots_filled": fills_lots})


# -- all --------------------------------------------------------------------------------

Checker = Callable[[History, Mapping[str, Instrument]], Check]

CHECKERS: Final[tuple[Checker, ...]] = (
    check_orders_accounted,
    check_private_seqs_gapless,
    check_fills_both_sides,
    check_cash_conserved,
    check_net_position_zero,
    check_books_not_crossed,
    check_market_seqs_gapless,
    check_fills_match_orders,
)


def check_all(history: History, instruments: Mapping[str, Instrument]) -> list[Check]:
    """Every invariant of :data:`CHECKERS`, in that order."""
    return [checker(history, instruments) for checker in CHECKERS]

