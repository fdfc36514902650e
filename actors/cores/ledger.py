"""The account ledger core: one user's cash, frozen funds, net positions, fees and orders.

A pure, deterministic, picklable object (no I/O, no clock, no randomness): the
Account actor's shell feeds it commands and book events with the current time
and turns the returned :class:`~protocol.UserEvent` lists into messages.

Units: cash, fees, margin and PnL are integer minor units of
:data:`protocol.CASH_STEP`; prices are ticks, sizes lots, rates ppm. A cost
basis is kept in tick·lots (sum of ``price * qty``), so it is exact; it turns
into cash through ``Instrument.value_per_tick_lot``.

Decisions (the contract of this module):

* **Net positions.** One signed net quantity per symbol: a buy first reduces a
  short and only the rest opens a long (and vice versa). The wire's
  ``long_qty``/``short_qty`` pair reports it with one side always zero.
  :meth:`Ledger.position` returns ``(net_qty, cost)`` with ``cost >= 0`` the
  tick·lot cost of the open quantity. Closing ``c`` of ``|q|`` lots removes
  ``cost * c // |q|`` of the cost (all of it when the position closes), so
  realized PnL over a round trip is exactly exit value minus entry value.
* **Position margin** is the initial margin on the *entry* notional
  (``ceil(cost * value_per_tick_lot * margin_ppm / 1e6)`` per symbol); price
  moves enter through unrealized PnL instead.
* **Available** = ``cash - frozen - position margin + min(0, unrealized)``,
  with unrealized summed over all symbols (cross margin: a gain on one symbol
  offsets a loss on another, but unrealized gains are never spendable).
* **Marks.** Unrealized PnL uses the last price recorded by :meth:`Ledger.mark`
  or by this user's own fills, else the instrument's ``ref_price``.
* **Risk ratio** = position margin / equity (``cash + unrealized``), ``"0"``
  without a position; equity is clamped at one minor unit so a bankrupt account
  shows a huge ratio rather than a negative or zero one.
* **Pre-trade check** (:meth:`Ledger.place`): known symbol, client order id
  never used, position limit, then funds. Funds required = initial margin +
  ``max(taker fee, 0)`` on the order's notional (a market order is valued at
  the worst price of the band around the reference). The amount is frozen
  against the order and released exactly: a fill releases
  ``frozen_remaining * fill_qty // remaining_before`` (everything left on the
  last fill), a reject/cancel/expiry releases everything left. A reducing order
  freezes like an opening one (conservative; no reduce-only relief).
* **Duplicates.** A ``client_order_id`` is unique per user for ever. Reusing
  one makes :meth:`Ledger.place` raise :class:`DuplicateOrder` carrying the
  original :class:`OrderRecord` (state unchanged); the gateway answers with the
  original response plus ``duplicate: true``. A place that fails the
  pre-trade check does *not* consume its client order id (an error changes no
  state), so it may be retried.
* **Fees** are ``ceil(notional * rate / 1e6)`` at the maker or taker rate, for
  negative (rebate) rates too, so the rebate is rounded toward zero. The same
  integer is taken from the account and added to :attr:`Ledger.fees_paid`;
  the exchange's fee pool is the sum of ``fees_paid`` over all ledgers.
* **Transactional.** Every method validates everything and computes the new
  state into locals before committing it; an exception leaves the ledger as it
  was (Thespian re-runs a handler that raised).
* **Events.** Event ids come from a per-ledger counter, so a replay yields the
  same ids. Order events carry ``order_id``, ``client_order_id``, ``symbol``,
  ``side``, ``type``, ``price``, ``qty``, ``filled_qty``, ``remaining_qty``
  (untraded quantity) and ``status``. Accepts, rejects, cancels and expiries
  are followed by an ``account_update`` because they change ``frozen`` and
  ``available`` (an accept reports the funds frozen at placement).
* **Coalesced updates** (``coalesce_updates=True``, as the account actor runs
  it): fills, closes and cash moves do not emit ``position_update`` /
  ``account_update`` each; they mark the symbol and the account dirty, and
  :meth:`Ledger.flush_updates` (the end of the actor's turn) emits one
  ``position_update`` per changed symbol and one ``account_update`` with the
  state after the whole turn. The protocol allows it (P2 events may be
  conflated to the latest value per key), and it is most of the ledger's
  work: two maps of ~15 decimal strings per fill and side, which the router's
  conflation would mostly drop anyway.
* **Risk** (P0 ``risk_alert`` and ``margin_call``): the risk ratio is position
  margin over equity (cash plus unrealized PnL at the ledger's marks, the
  prices of the account's own last trades). When it rises to
  :data:`RISK_ALERT_RATIO_PPM` (0.8) the ledger emits one ``risk_alert``; when
  equity no longer covers the margin (ratio 1 or more, or equity not positive)
  one ``margin_call``. Each once per rise into its band: the ledger remembers
  the band it reported and reports again only after the ratio fell below it.
  Checked after the state changed: at the end of a turn (after
  :meth:`Ledger.flush_updates`' updates) when coalescing, else after each fill
  and cash move.
"""

from __future__ import annotations

import enum
import operator
from collections import deque
from collections.abc import Callable, Mapping
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Final

import attrs

from protocol import (
    CASH_STEP,
    PPM,
    CancelRejected,
    ErrorCode,
    Fill,
    Instrument,
    LocalProtocolError,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderRejected,
    RemoteProtocolError,
    UserEvent,
    from_units,
    ratio_to_str,
)

__all__ = [
    "ORDER_TRANSITIONS",
    "RISK_ALERT_RATIO_PPM",
    "DuplicateOrder",
    "IllegalTransition",
    "Ledger",
    "LedgerBookEvent",
    "OrderInput",
    "OrderRecord",
    "OrderState",
    "next_order_state",
    "order_to_wire",
]


# -- the order lifecycle ----------------------------------------------------------------


class OrderState(enum.StrEnum):
    """The states of an order; the value is the wire ``status`` string."""

    PENDING = "pending"
    OPEN = "open"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    EXPIRED = "expired"
    REJECTED = "rejected"


class OrderInput(enum.StrEnum):
    """What happens to an order (the book's answers, as lifecycle inputs)."""

    ACCEPT = "accept"
    REJECT = "reject"
    PARTIAL_FILL = "partial_fill"
    FINAL_FILL = "final_fill"
    CANCEL = "cancel"
    EXPIRE = "expire"


_S = OrderState
_I = OrderInput

#: The order lifecycle, the only place it is defined: ``(state, input) -> next state``.
#: ``(pending, expire)`` is allowed because a book may expire an incoming order
#: (post-only that would cross, unfillable FOK) without acknowledging it first.
ORDER_TRANSITIONS: Final[Mapping[tuple[OrderState, OrderInput], OrderState]] = MappingProxyType(
    {
        (_S.PENDING, _I.ACCEPT): _S.OPEN,
        (_S.PENDING, _I.REJECT): _S.REJECTED,
        (_S.PENDING, _I.EXPIRE): _S.EXPIRED,
        (_S.OPEN, _I.PARTIAL_FILL): _S.PARTIALLY_FILLED,
        (_S.OPEN, _I.FINAL_FILL): _S.FILLED,
        (_S.OPEN, _I.CANCEL): _S.CANCELED,
        (_S.OPEN, _I.EXPIRE): _S.EXPIRED,
        (_S.PARTIALLY_FILLED, _I.PARTIAL_FILL): _S.PARTIALLY_FILLED,
        (_S.PARTIALLY_FILLED, _I.FINAL_FILL): _S.FILLED,
        (_S.PARTIALLY_FILLED, _I.CANCEL): _S.CANCELED,
        (_S.PARTIALLY_FILLED, _I.EXPIRE): _S.EXPIRED,
    }
)

#: States in which an order holds frozen funds and counts against the position limit.
LIVE_STATES: Final = frozenset({_S.PENDING, _S.OPEN, _S.PARTIALLY_FILLED})

# The members the per-fill path names, as plain globals: ``OrderState.FILLED`` goes
# through the enum class's attribute lookup, ~10x a global load on Python 3.11.
_FILLED: Final = _S.FILLED
_ACCEPT: Final = _I.ACCEPT
_PARTIAL_FILL: Final = _I.PARTIAL_FILL
_FINAL_FILL: Final = _I.FINAL_FILL


class IllegalTransition(LocalProtocolError):  # noqa: N818 - the name the design uses
    """A book event does not fit the order's lifecycle (an engine bug, code ``internal``).

    Args:
        order_id: the order concerned.
        state: its current state.
        event: the input that has no transition from ``state``.
    """

    def __init__(self, order_id: int, state: OrderState, event: OrderInput) -> None:
        super().__init__(
            ErrorCode.INTERNAL, f"order {order_id}: illegal transition {state} --{event}-->"
        )
        self.order_id = order_id
        self.state = state
        self.event = event

    def __reduce__(self) -> tuple[type[IllegalTransition], tuple[int, OrderState, OrderInput]]:
        return (type(self), (self.order_id, self.state, self.event))


def next_order_state(order_id: int, state: OrderState, event: OrderInput) -> OrderState:
    """Look ``(state, event)`` up in :data:`ORDER_TRANSITIONS`.

    Raises:
        IllegalTransition: the table has no such transition.
    """
    try:
        return ORDER_TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(order_id, state, event) from None


# -- decimal strings ----------------------------------------------------------------------

#: Beyond this many digits ``Decimal`` arithmetic (28 significant digits) would round:
#: leave such values to :func:`protocol.from_units`, which does exactly that.
_EXACT_DIGITS_LIMIT: Final = 10**27

_FORMATTERS: dict[Decimal, Callable[[int], str]] = {}


def units_formatter(step: Decimal) -> Callable[[int], str]:
    """A function rendering ``units`` of ``step`` exactly as :func:`protocol.from_units`
    does, with integer arithmetic (``Decimal`` formatting was ~12 % of an engine turn).

    ``units * step`` is ``units * m * 10**e`` for the normalized step ``m·10**e``, so
    its plain string with ``-e`` decimals is the integer ``units * m`` with a point
    inserted. Memoized per step.
    """
    known = _FORMATTERS.get(step)
    if known is not None:
        return known
    _, digits, exponent = step.normalize().as_tuple()
    assert isinstance(exponent, int)
    mantissa = int("".join(map(str, digits)))
    if exponent >= 0:
        mantissa *= 10**exponent
    places = max(0, -exponent)
    zero = f"0.{'0' * places}" if places else "0"

    def fmt(units: int) -> str:
        if not units:  # common: the flat side of a position, no PnL yet, nothing frozen
            return zero
        value = units * mantissa
        if not -_EXACT_DIGITS_LIMIT < value < _EXACT_DIGITS_LIMIT:
            return from_units(units, step)
        if places == 0:
            return str(value)
        if value < 0:
            text = str(-value).rjust(places + 1, "0")
            return f"-{text[:-places]}.{text[-places:]}"
        text = str(value).rjust(places + 1, "0")
        return f"{text[:-places]}.{text[-places:]}"

    _FORMATTERS[step] = fmt
    return fmt


#: Integer minor units → wire money string (``protocol.cash_str``, integer arithmetic).
cash_str: Final = units_formatter(CASH_STEP)

#: Entries a :class:`_Strings` memo holds before it starts again from empty.
_MEMO_LIMIT: Final = 4096


class _Strings(dict[int, str]):
    """``units`` → :func:`units_formatter` string of one step, memoized: ``memo[units]``.

    Prices and sizes repeat: an order's price and size are rendered again on every
    event of the order, and the orders of a book sit on a few prices. A hit is one
    C dict lookup instead of a Python call; in bench/actors.py ~12.8 strings were
    formatted per fill, most of them already seen. The memo holds at most
    :data:`_MEMO_LIMIT` entries (cleared when full: a pure function needs no
    eviction order), so a long run over a wandering price stays bounded.
    """

    __slots__ = ("_fmt",)

    def __init__(self, step: Decimal) -> None:
        super().__init__()
        self._fmt = units_formatter(step)

    def __missing__(self, units: int) -> str:
        if len(self) >= _MEMO_LIMIT:
            self.clear()
        text = self[units] = self._fmt(units)
        return text


class _StringsByStep(dict[Decimal, _Strings]):
    """Step → its :class:`_Strings` memo, made on first use (``_STRINGS[inst.tick]``:
    a C lookup, where ``units_formatter(inst.tick)`` was a Python call per use)."""

    def __missing__(self, step: Decimal) -> _Strings:
        memo = self[step] = _Strings(step)
        return memo


_STRINGS: Final = _StringsByStep()


# -- records ------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class OrderRecord:
    """One order as the ledger knows it (immutable; the ledger replaces it on change).

    ``frozen`` is what the pre-trade check froze, ``frozen_remaining`` what is
    still frozen; ``fees`` the fees charged on its fills so far. ``code`` and
    ``reason`` explain a reject, cancel or expiry.
    """

    order_id: int
    client_order_id: str
    symbol: str
    side: str
    order_type: str
    price: int | None
    qty: int
    tif: str
    post_only: bool
    ts: int
    status: OrderState = OrderState.PENDING
    filled_qty: int = 0
    frozen: int = 0
    frozen_remaining: int = 0
    fees: int = 0
    code: str = ""
    reason: str = ""

    @property
    def remaining_qty(self) -> int:
        """The untraded quantity (the open quantity while the order is live)."""
        return self.qty - self.filled_qty

    @property
    def is_live(self) -> bool:
        """Whether the order still holds frozen funds (pending, open or partially filled)."""
        return self.status in LIVE_STATES


def order_to_wire(record: OrderRecord, instrument: Instrument) -> dict[str, object]:
    """The wire map of an order (order events, ``query orders``)."""
    return _order_wire(record, _STRINGS[instrument.tick], _STRINGS[instrument.lot])


def _order_wire(record: OrderRecord, prices: _Strings, qtys: _Strings) -> dict[str, object]:
    price, qty, filled = record.price, record.qty, record.filled_qty
    return {
        "order_id": record.order_id,
        "client_order_id": record.client_order_id,
        "symbol": record.symbol,
        "side": record.side,
        "type": record.order_type,
        "price": None if price is None else prices[price],
        "qty": qtys[qty],
        "filled_qty": qtys[filled],
        "remaining_qty": qtys[qty - filled],
        # ``_value_`` is ``.value`` without the enum property's Python-level __get__.
        "status": record.status._value_,
        "tif": record.tif,
    }


_RECORD_FIELDS: Final = tuple(a.name for a in attrs.fields(OrderRecord))
_record_values: Final = operator.attrgetter(*_RECORD_FIELDS)


def _replace(record: OrderRecord, **changes: object) -> OrderRecord:
    """``attrs.evolve`` for :class:`OrderRecord`: the same ``__init__`` call, but the
    values come from one C ``attrgetter`` call instead of evolve's per-field Python
    loop (evolve was ~4 % of the engine thread in bench/actors.py, py-spy)."""
    values: dict[str, Any] = dict(zip(_RECORD_FIELDS, _record_values(record), strict=True))
    values.update(changes)
    return OrderRecord(**values)


def _after_fill(
    rec: OrderRecord, status: OrderState, qty: int, release: int, fee: int
) -> OrderRecord:
    """``rec`` after a fill of ``qty`` lots: :func:`_replace` spelled out field by field,
    which costs ~60 % of it on the fill path (a test checks the two agree)."""
    return OrderRecord(
        order_id=rec.order_id,
        client_order_id=rec.client_order_id,
        symbol=rec.symbol,
        side=rec.side,
        order_type=rec.order_type,
        price=rec.price,
        qty=rec.qty,
        tif=rec.tif,
        post_only=rec.post_only,
        ts=rec.ts,
        status=status,
        filled_qty=rec.filled_qty + qty,
        frozen=rec.frozen,
        frozen_remaining=rec.frozen_remaining - release,
        fees=rec.fees + fee,
        code=rec.code,
        reason=rec.reason,
    )


def _with_status(rec: OrderRecord, status: OrderState) -> OrderRecord:
    """``rec`` in ``status`` (an accept): :func:`_replace` spelled out, like
    :func:`_after_fill` (a test checks the two agree)."""
    return OrderRecord(
        order_id=rec.order_id,
        client_order_id=rec.client_order_id,
        symbol=rec.symbol,
        side=rec.side,
        order_type=rec.order_type,
        price=rec.price,
        qty=rec.qty,
        tif=rec.tif,
        post_only=rec.post_only,
        ts=rec.ts,
        status=status,
        filled_qty=rec.filled_qty,
        frozen=rec.frozen,
        frozen_remaining=rec.frozen_remaining,
        fees=rec.fees,
        code=rec.code,
        reason=rec.reason,
    )


@attrs.frozen(kw_only=True)
class _Position:
    qty: int = 0  # signed net lots
    cost: int = 0  # tick·lots of the open quantity, >= 0
    realized: int = 0  # minor units, this symbol


_FLAT: Final = _Position()


@attrs.frozen(kw_only=True)
class _Balances:
    cash: int = 0
    frozen: int = 0
    fees_paid: int = 0
    realized_pnl: int = 0


def _replace_balances(bal: _Balances, **changes: int) -> _Balances:
    values = {"cash": bal.cash, "frozen": bal.frozen, "fees_paid": bal.fees_paid,
              "realized_pnl": bal.realized_pnl}
    values.update(changes)
    return _Balances(**values)


class DuplicateOrder(Exception):  # noqa: N818 - a normal outcome, not an error
    """:meth:`Ledger.place` was given a ``client_order_id`` this user already used.

    Nothing changed. The gateway answers with the original order's response
    and ``duplicate: true``.

    Args:
        original: the order first placed under that client order id, or None
            when its record is forgotten (see :data:`CLOSED_KEPT`).
        result: the original's ``order_id``, ``client_order_id`` and ``status``
            (its state now), known either way.
    """

    def __init__(self, original: OrderRecord | None, result: dict[str, object]) -> None:
        super().__init__(original, result)  # both: an exception unpickles as cls(*args)
        self.original = original
        self.result = result


#: A ledger keeps the whole record of this many most recently closed orders (for
#: queries, late cancels and duplicate answers); of older ones it keeps the order id
#: under its client order id (unique for ever) and the final status, ints and
#: strings the collector does not track, so a long-lived account's memory and
#: snapshot stop growing by a record per order (see :meth:`Ledger.forget_closed`).
CLOSED_KEPT = 1_000

#: The risk ratio (position margin / equity, in parts per million) at which the
#: ledger emits a ``risk_alert``; at 1,000,000 (equity no longer covers the
#: margin) it emits a ``margin_call``.
RISK_ALERT_RATIO_PPM: Final = 800_000

#: The book events a ledger handles.
LedgerBookEvent = (
    OrderAccepted | OrderRejected | Fill | OrderCanceled | OrderExpired | CancelRejected
)


# -- arithmetic -----------------------------------------------------------------------------
# Ceil division is spelled ``-(-a // b)`` in place: a helper was one more call per fill.


def _fee(instrument: Instrument, notional: int, rate_ppm: int) -> int:
    # One rounding for every fee: ceil, so a rebate (negative rate) rounds toward zero.
    return -(-(notional * rate_ppm) // PPM)


def _margin(instrument: Instrument, notional: int) -> int:
    return -(-(notional * instrument.margin_ppm) // PPM)


def _trade(
    position: _Position, buy: bool, price: int, qty: int, value: int
) -> tuple[_Position, int]:
    """Apply a trade to a net position; return it and the realized PnL (minor units)."""
    net, cost = position.qty, position.cost
    realized_ticks = 0
    opened = qty
    if net != 0 and (net > 0) != buy:  # the trade reduces the position first
        size = abs(net)
        closed = min(qty, size)
        removed = cost if closed == size else cost * closed // size
        exit_value = price * closed
        realized_ticks = exit_value - removed if net > 0 else removed - exit_value
        cost -= removed
        net += closed if buy else -closed
        opened = qty - closed
    if opened:
        cost += price * opened
        net += opened if buy else -opened
    realized = realized_ticks * value
    return _Position(qty=net, cost=cost, realized=position.realized + realized), realized


def _unrealized(instrument: Instrument, position: _Position, mark: int) -> int:
    signed_cost = position.cost if position.qty >= 0 else -position.cost
    return (mark * position.qty - signed_cost) * instrument.value_per_tick_lot


def _position_margin(instrument: Instrument, position: _Position) -> int:
    return _margin(instrument, position.cost * instrument.value_per_tick_lot)


#: Tick → the quantum of an average price (four more decimals than the tick).
_AVG_QUANTA: dict[Decimal, Decimal] = {}
#: Tick → ``(mantissa * 10**(max(exponent, 0) + 4), places)`` for the integer path.
_AVG_SCALES: dict[Decimal, tuple[int, int]] = {}
#: ``Decimal``'s default precision: the integer paths below reproduce its results
#: only while no intermediate needs more significant digits than this.
_DECIMAL_DIGITS: Final = 28


def _avg_price_str(instrument: Instrument, cost: int, qty: int) -> str:
    """``cost * tick / qty`` with four more decimals than the tick, half-even.

    Integer arithmetic where it gives exactly what the ``Decimal`` formula
    (:func:`_avg_price_decimal`) gives, which is ~5x slower and ran for every
    position update: ``Decimal`` rounds the quotient to 28 significant digits
    before quantizing, which can only differ from one exact rounding when the
    remainder lies within ``0.5e-(28 - digits)`` of a half, impossible unless
    ``qty > 10**(28 - digits)``; that case and products beyond 28 digits take the
    ``Decimal`` path (a test compares the two).
    """
    if qty == 0:
        return "0"
    tick = instrument.tick
    scale = _AVG_SCALES.get(tick)
    if scale is None:
        _, tick_digits, exponent = tick.normalize().as_tuple()
        assert isinstance(exponent, int)
        mantissa = int("".join(map(str, tick_digits)))
        scale = _AVG_SCALES[tick] = (
            mantissa * 10 ** (max(exponent, 0) + 4), max(0, -exponent) + 4)
    factor, places = scale
    if cost < 0 or cost * factor >= 10**_DECIMAL_DIGITS:
        return _avg_price_decimal(tick, cost, qty)
    text = _half_even_str(cost * factor, qty, places)
    return _avg_price_decimal(tick, cost, qty) if text is None else text


def _half_even_str(scaled: int, denominator: int, places: int) -> str | None:
    """``scaled / denominator / 10**places`` rounded half-even to ``places`` decimals,
    as ``Decimal`` division then ``quantize`` give it, or ``None`` where they might
    not (see :func:`_avg_price_str`): a quotient past 28 digits, or a denominator
    large enough for the 28-digit rounding to land on a half."""
    q, r = divmod(scaled, denominator)
    digits = len(str(q))
    if digits > _DECIMAL_DIGITS or denominator > 10 ** (_DECIMAL_DIGITS - digits):
        return None
    if 2 * r > denominator or (2 * r == denominator and q & 1):
        q += 1
    text = str(q).rjust(places + 1, "0")
    return f"{text[:-places]}.{text[-places:]}"


def _avg_price_decimal(tick: Decimal, cost: int, qty: int) -> str:
    """:func:`_avg_price_str` the ``Decimal`` way (the reference it must equal)."""
    quantum = _AVG_QUANTA.get(tick)
    if quantum is None:
        exponent = tick.normalize().as_tuple().exponent
        places = (max(0, -exponent) if isinstance(exponent, int) else 0) + 4
        quantum = _AVG_QUANTA[tick] = Decimal(1).scaleb(-places)
    value = Decimal(cost) * tick / Decimal(qty)
    return f"{value.quantize(quantum):f}"


#: Decimals of a risk ratio (as :func:`protocol.ratio_to_str` renders it).
_RATIO_PLACES: Final = 8


def _ratio_str(numerator: int, denominator: int) -> str:
    """:func:`protocol.ratio_to_str` for ``numerator >= 0 < denominator``, in integers
    where that is exact (the same argument as :func:`_avg_price_str`'s)."""
    if numerator < 0 or denominator <= 0:
        return ratio_to_str(numerator, denominator)
    text = _half_even_str(numerator * 10**_RATIO_PLACES, denominator, _RATIO_PLACES)
    return ratio_to_str(numerator, denominator) if text is None else text


def _check_amount(amount: int) -> None:
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise RemoteProtocolError(ErrorCode.BAD_REQUEST, "amount must be positive")


def _check_ts(ts: int) -> None:
    if isinstance(ts, bool) or not isinstance(ts, int) or ts < 0:
        raise LocalProtocolError(ErrorCode.INTERNAL, f"bad timestamp {ts!r}")


def _internal(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.INTERNAL, message)


_new_object: Final = object.__new__
_set_field: Final = object.__setattr__


def _user_event(
    user: str, event_id: int, kind: str, key: str, data: dict[str, object], ts: int
) -> UserEvent:
    """A :class:`~protocol.UserEvent` built without its validators, as unpickling builds one.

    The validators (event id positive, kind known, ts not negative) hold by
    construction here: ids come from the ledger's counter (>= 1), kinds are this
    module's literals and every entry point checks ``ts``. Skipping them halves
    the cost of the ~5 events of each fill (tests check the fields still match).
    """
    event: UserEvent = _new_object(UserEvent)
    _set_field(event, "user", user)
    _set_field(event, "event_id", event_id)
    _set_field(event, "kind", kind)
    _set_field(event, "key", key)
    _set_field(event, "data", data)
    _set_field(event, "ts", ts)
    return event


class _Emitter:
    """Numbers the events of one command from the ledger's counter (committed at the end)."""

    def __init__(self, user: str, next_id: int, ts: int) -> None:
        self.user = user
        self.next_id = next_id
        self.ts = ts
        self.events: list[UserEvent] = []

    def add(self, kind: str, data: dict[str, object], key: str = "") -> None:
        self.events.append(_user_event(self.user, self.next_id, kind, key, data, self.ts))
        self.next_id += 1


# -- the ledger -----------------------------------------------------------------------------


class Ledger:
    """One user's futures-style margin account in one currency.

    Args:
        user: the account's user name.
        instruments: the tradable instruments by symbol.
        next_event_id: the first event id to use (a restored ledger continues its count).

    Raises:
        ValueError: ``next_event_id`` is not positive.
    """

    def __init__(
        self,
        user: str,
        instruments: Mapping[str, Instrument],
        *,
        next_event_id: int = 1,
        coalesce_updates: bool = False,
    ) -> None:
        if next_event_id < 1:
            raise ValueError("next_event_id must be positive")
        self.user = user
        #: Whether P2 updates wait for :meth:`flush_updates` (see the module docstring).
        self.coalesce_updates = coalesce_updates
        # What flush_updates will report: changed symbols (in change order), whether
        # the account changed, and the time of the last change.
        self._dirty_positions: dict[str, None] = {}
        self._dirty_account = False
        self._dirty_ts = 0
        #: The risk band last reported: 0 none, 1 risk_alert, 2 margin_call.
        self._risk_level = 0
        self._instruments: dict[str, Instrument] = dict(instruments)
        self._bal = _Balances()
        self._positions: dict[str, _Position] = {}
        self._marks: dict[str, int] = {}
        self._orders: dict[int, OrderRecord] = {}
        self._by_client_id: dict[str, int] = {}
        self._live: dict[int, None] = {}  # live order ids, in placing order
        #: Ids of the closed orders still in ``_orders``, oldest closed first; and the
        #: final status of those forgotten (see :data:`CLOSED_KEPT`).
        self._closed: deque[int] = deque()
        self._forgotten: dict[int, str] = {}
        #: Untraded lots of the live orders per (symbol, side), no zero entries: the
        #: position-limit check reads it instead of scanning every live order (the
        #: scan grew with the resting orders). Derived state: not pickled, rebuilt on load.
        self._open_qty: dict[tuple[str, str], int] = {}
        self._next_event_id = next_event_id

    def __getstate__(self) -> dict[str, Any]:
        state = dict(vars(self))
        del state["_open_qty"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also loads snapshots pickled before ``_open_qty`` existed: it is always rebuilt.
        # Snapshots from before coalescing existed get its defaults (off, nothing dirty).
        vars(self).update(
            {"coalesce_updates": False, "_dirty_positions": {}, "_dirty_account": False,
             "_dirty_ts": 0, "_forgotten": {}, "_risk_level": 0, **state}
        )
        if "_closed" not in state:
            # Pickled before closed orders were forgotten: every closed order is still
            # here; their closing order is lost, so the oldest placed go first.
            live = self._live
            self._closed = deque(sorted(oid for oid in self._orders if oid not in live))
        self._open_qty = self._scan_open_qty()

    # -- integer accessors -------------------------------------------------------------

    @property
    def cash(self) -> int:
        """Cash balance (minor units): deposits - withdrawals + realized PnL - fees."""
        return self._bal.cash

    @property
    def frozen(self) -> int:
        """Funds frozen against live orders (minor units)."""
        return self._bal.frozen

    @property
    def fees_paid(self) -> int:
        """Net fees charged to this account (rebates negative), minor units."""
        return self._bal.fees_paid

    @property
    def realized_pnl(self) -> int:
        """Realized PnL over all symbols (minor units, before fees)."""
        return self._bal.realized_pnl

    @property
    def position_margin(self) -> int:
        """Initial margin of all open positions on their entry notional (minor units)."""
        return self._total_margin(self._positions)

    @property
    def available(self) -> int:
        """``cash - frozen - position margin + min(0, unrealized at the marks)``."""
        return self._available(self._bal, self._positions, self._marks)

    @property
    def next_event_id(self) -> int:
        """The id the next event will get."""
        return self._next_event_id

    def position(self, symbol: str) -> tuple[int, int]:
        """``(net_qty, cost)``: signed lots and the tick·lot cost of the open quantity."""
        pos = self._positions.get(symbol, _FLAT)
        return pos.qty, pos.cost

    def unrealized(self, symbol: str, mark_price: int) -> int:
        """Unrealized PnL (minor units) of the position in ``symbol`` at ``mark_price`` ticks."""
        pos = self._positions.get(symbol, _FLAT)
        return _unrealized(self._instrument(symbol), pos, mark_price)

    def equity(self, marks: Mapping[str, int] | None = None) -> int:
        """Cash plus unrealized PnL, at ``marks`` where given, else at the recorded marks."""
        chosen = dict(self._marks)
        if marks:
            chosen.update(marks)
        return self._bal.cash + self._total_unrealized(self._positions, chosen)

    def mark(self, symbol: str, price_ticks: int) -> None:
        """Record the last price of ``symbol`` for unrealized PnL and the risk ratio.

        Raises:
            RemoteProtocolError: ``unknown_symbol``, or ``invalid_price`` if not positive.
        """
        self._instrument(symbol)
        if price_ticks <= 0:
            raise RemoteProtocolError(ErrorCode.INVALID_PRICE, "a mark price must be positive")
        self._marks[symbol] = price_ticks

    # -- queries -------------------------------------------------------------------------

    def account_view(self) -> dict[str, object]:
        """The wire ``account`` map (decimal strings)."""
        return self._account_data(self._bal, self._positions, self._marks)

    def positions_view(self) -> list[dict[str, object]]:
        """The wire ``positions`` maps, one per symbol ever traded, by symbol."""
        return [
            self._position_data(symbol, self._positions[symbol], self._marks)
            for symbol in sorted(self._positions)
        ]

    def open_orders(self) -> list[dict[str, object]]:
        """Wire maps of the live orders (pending, open, partially filled), by order id."""
        return [
            order_to_wire(self._orders[oid], self._instruments[self._orders[oid].symbol])
            for oid in sorted(self._live)
        ]

    def open_order_ids(self, symbol: str | None = None) -> list[int]:
        """Ids of the live orders, optionally of one symbol, ascending."""
        return sorted(
            oid for oid in self._live if symbol is None or self._orders[oid].symbol == symbol
        )

    def order(self, order_id: int) -> OrderRecord | None:
        """The order with this id, in any state, or ``None`` (also once it is closed
        and forgotten: see :meth:`forget_closed`)."""
        return self._orders.get(order_id)

    def order_by_client_id(self, client_order_id: str) -> OrderRecord | None:
        """The order placed under this client order id (ids are never reused), or
        ``None`` (also once it is closed and forgotten)."""
        oid = self._by_client_id.get(client_order_id)
        return None if oid is None else self._orders.get(oid)

    def forget_closed(self, keep: int | None = None) -> int:
        """Drop the records of all but the ``keep`` (default :data:`CLOSED_KEPT`) most
        recently closed orders; returns how many went. A forgotten order's client
        order id stays taken (a repeat is still answered as a duplicate, with the
        order id and final status) and it is no longer open, so a cancel of it is
        ``unknown_order`` either way.

        The account desk calls this at the end of each turn, after the turn's
        replies read the records of the orders it closed.
        """
        closed = self._closed
        if keep is None:
            keep = CLOSED_KEPT
        orders = self._orders
        forgotten = self._forgotten
        n = 0
        while len(closed) > keep:
            oid = closed.popleft()
            forgotten[oid] = orders.pop(oid).status.value
            n += 1
        return n

    def account_update(self, ts: int) -> list[UserEvent]:
        """An ``account_update`` event of the current state (e.g. after marks moved)."""
        _check_ts(ts)
        em = _Emitter(self.user, self._next_event_id, ts)
        em.add("account_update", self.account_view(), key="account")
        self._next_event_id = em.next_id
        return em.events

    def flush_updates(self) -> list[UserEvent]:
        """The coalesced P2 updates since the last flush (``coalesce_updates`` mode).

        Returns:
            One ``position_update`` per symbol whose position changed, in the order
            they first changed, then one ``account_update`` if anything changed; all
            with the current state and the time of the last change. Empty if
            nothing changed (always, when not coalescing).
        """
        if not self._dirty_account:
            return []
        em = _Emitter(self.user, self._next_event_id, self._dirty_ts)
        for symbol in self._dirty_positions:
            pos = self._positions.get(symbol, _FLAT)
            em.add("position_update", self._position_data(symbol, pos, self._marks), key=symbol)
        totals = self._totals(self._positions, self._marks)
        em.add("account_update", self._account_data(self._bal, self._positions, self._marks,
                                                    totals), key="account")
        self._dirty_positions = {}
        self._dirty_account = False
        self._next_event_id = em.next_id
        return em.events + self._risk_events(self._dirty_ts, totals)

    def _risk_events(self, ts: int, totals: tuple[int, int] | None = None) -> list[UserEvent]:
        """A ``risk_alert`` or ``margin_call`` if the risk ratio rose into a band not
        reported yet (see the module docstring, *Risk*); forgets a band it fell below.
        ``totals``: :meth:`_totals` of the current state, when the caller has them."""
        margin, unrealized = totals or self._totals(self._positions, self._marks)
        equity = self._bal.cash + unrealized
        if not margin:
            level = 0
        elif equity <= margin:
            level = 2
        elif margin * 1_000_000 >= equity * RISK_ALERT_RATIO_PPM:
            level = 1
        else:
            level = 0
        reported = self._risk_level
        self._risk_level = level
        if level <= reported:
            return []
        ratio = _ratio_str(margin, max(equity, 1))
        if level == 2:
            kind = "margin_call"
            message = (f"equity {cash_str(equity)} no longer covers the position margin "
                       f"{cash_str(margin)} (risk ratio {ratio}): deposit or reduce positions")
        else:
            kind = "risk_alert"
            message = (f"risk ratio {ratio} reached {RISK_ALERT_RATIO_PPM / 1_000_000:g}: "
                       f"position margin {cash_str(margin)} against equity {cash_str(equity)}")
        em = _Emitter(self.user, self._next_event_id, ts)
        em.add(kind, {"risk_ratio": ratio, "message": message})
        self._next_event_id = em.next_id
        return em.events

    def _mark_dirty(self, ts: int, symbol: str | None = None) -> None:
        self._dirty_account = True
        self._dirty_ts = ts
        if symbol is not None:
            self._dirty_positions[symbol] = None

    def system_notice(self, kind: str, message: str, ts: int) -> list[UserEvent]:
        """A sequenced ``system_notice`` for this user (e.g. ``resync`` after a restart).

        It takes an event id from the ledger's counter, so a journal replay
        reproduces it and the router deduplicates a re-emitted copy.
        """
        _check_ts(ts)
        em = _Emitter(self.user, self._next_event_id, ts)
        em.add("system_notice", {"kind": kind, "message": message}, key=kind)
        self._next_event_id = em.next_id
        return em.events

    # -- cash ----------------------------------------------------------------------------

    def deposit(self, amount: int, ts: int) -> list[UserEvent]:
        """Credit ``amount`` minor units.

        Returns:
            One ``account_update`` event (none when coalescing: :meth:`flush_updates`
            reports it).

        Raises:
            RemoteProtocolError: ``bad_request`` if ``amount`` is not a positive integer.
        """
        _check_amount(amount)
        return self._move_cash(amount, ts)

    def withdraw(self, amount: int, ts: int) -> list[UserEvent]:
        """Debit ``amount`` minor units if that much is available.

        Returns:
            One ``account_update`` event (none when coalescing: :meth:`flush_updates`
            reports it).

        Raises:
            RemoteProtocolError: ``bad_request`` if ``amount`` is not a positive
                integer; ``insufficient_funds`` if it exceeds :attr:`available`.
        """
        _check_amount(amount)
        available = self.available
        if amount > available:
            raise RemoteProtocolError(
                ErrorCode.INSUFFICIENT_FUNDS,
                f"withdrawal of {cash_str(amount)} exceeds available {cash_str(available)}",
            )
        return self._move_cash(-amount, ts)

    def _move_cash(self, delta: int, ts: int) -> list[UserEvent]:
        _check_ts(ts)
        bal = _replace_balances(self._bal, cash=self._bal.cash + delta)
        if self.coalesce_updates:
            self._bal = bal
            self._mark_dirty(ts)
            return []
        em = _Emitter(self.user, self._next_event_id, ts)
        em.add("account_update", self._account_data(bal, self._positions, self._marks), "account")
        self._bal = bal
        self._next_event_id = em.next_id
        return em.events + self._risk_events(ts)

    # -- pre-trade check -----------------------------------------------------------------

    def place(self, order: NewOrder, ref_price: int) -> list[UserEvent]:
        """Risk-check ``order``, freeze its funds and record it as pending.

        Args:
            order: the order, with integer price/qty and an ``order_id`` chosen by the caller.
            ref_price: the band's reference price (ticks), used to value a market order.

        Returns:
            ``[]``: events follow when the book answers.

        Raises:
            RemoteProtocolError: ``unknown_symbol``, ``position_limit`` or
                ``insufficient_funds``; the ledger is unchanged.
            DuplicateOrder: the client order id was used before; the ledger is unchanged.
            LocalProtocolError: ``internal``: the order is for another user, its
                order id is already taken, or a market order has no positive ``ref_price``.
        """
        if order.user != self.user:
            raise _internal(f"order for {order.user!r} sent to the ledger of {self.user!r}")
        inst = self._instruments.get(order.symbol)
        if inst is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_SYMBOL, f"unknown symbol {order.symbol}")
        original_id = self._by_client_id.get(order.client_order_id)
        if original_id is not None:
            original = self._orders.get(original_id)
            status = (original.status.value if original is not None
                      else self._forgotten[original_id])
            raise DuplicateOrder(original, {"order_id": original_id,
                                            "client_order_id": order.client_order_id,
                                            "status": status})
        if order.order_id in self._orders:
            raise _internal(f"order id {order.order_id} is already taken")
        _check_ts(order.ts)

        buy = order.side == "buy"
        net = self._positions.get(order.symbol, _FLAT).qty
        side_key = (order.symbol, order.side)
        open_same_side = self._open_qty.get(side_key, 0)
        exposure = max(net if buy else -net, 0) + open_same_side + order.qty
        if exposure > inst.position_limit:
            raise RemoteProtocolError(
                ErrorCode.POSITION_LIMIT,
                f"{'long' if buy else 'short'} exposure {inst.qty_str(exposure)} would exceed "
                f"the limit {inst.qty_str(inst.position_limit)}",
            )

        if order.price is None:
            if ref_price <= 0:
                raise _internal("a market order needs a positive reference price")
            low, high = inst.band(ref_price)
            price = high if buy else low
        else:
            price = order.price
        notional = inst.notional(price, order.qty)
        required = _margin(inst, notional) + max(_fee(inst, notional, inst.taker_fee_ppm), 0)
        available = self.available
        if required > available:
            raise RemoteProtocolError(
                ErrorCode.INSUFFICIENT_FUNDS,
                f"order needs {cash_str(required)} (margin and fee), "
                f"available {cash_str(available)}",
            )

        record = OrderRecord(
            order_id=order.order_id,
            client_order_id=order.client_order_id,
            symbol=order.symbol,
            side=order.side,
            order_type=order.order_type,
            price=order.price,
            qty=order.qty,
            tif=order.tif,
            post_only=order.post_only,
            ts=order.ts,
            frozen=required,
            frozen_remaining=required,
        )
        self._orders[record.order_id] = record
        self._by_client_id[record.client_order_id] = record.order_id
        self._live[record.order_id] = None
        self._open_qty[side_key] = open_same_side + order.qty
        # _replace_balances spelled out: its dict and ** cost ~2,500 instructions (callgrind).
        bal = self._bal
        self._bal = _Balances(cash=bal.cash, frozen=bal.frozen + required,
                              fees_paid=bal.fees_paid, realized_pnl=bal.realized_pnl)
        return []

    # -- book events ---------------------------------------------------------------------

    def on_book_event(self, ev: LedgerBookEvent) -> list[UserEvent]:
        """Apply the book's answer about this user's order(s).

        Returns:
            The user's private events, in order (when coalescing, without the
            ``position_update``/``account_update`` that :meth:`flush_updates` reports).

        Raises:
            IllegalTransition: the event does not fit the order's lifecycle.
            LocalProtocolError: ``internal``: the event names an unknown order, another
                user, or disagrees with the ledger's record (quantities, side, symbol).
        """
        ts = ev.ts
        if type(ts) is not int or ts < 0:  # _check_ts's common case without its call
            _check_ts(ts)
        if isinstance(ev, Fill):
            return self._on_fill(ev)
        if isinstance(ev, CancelRejected):
            return []  # the caller answers the cancel request; nothing changes here
        if ev.user != self.user:
            raise _internal(f"event for {ev.user!r} sent to the ledger of {self.user!r}")
        rec = self._record(ev.order_id, ev.symbol)
        if isinstance(ev, OrderAccepted):
            return self._on_accepted(rec, ev)
        if isinstance(ev, OrderRejected):
            return self._close(
                rec, _I.REJECT, "order_rejected", ev.ts, code=ev.code, reason=ev.reason
            )
        event = _I.CANCEL if isinstance(ev, OrderCanceled) else _I.EXPIRE
        next_order_state(rec.order_id, rec.status, event)  # a lifecycle error comes first
        if ev.remaining != rec.remaining_qty:
            raise _internal(
                f"order {rec.order_id}: book says {ev.remaining} lots remain, "
                f"the ledger {rec.remaining_qty}"
            )
        kind = "order_canceled" if event is _I.CANCEL else "order_expired"
        return self._close(rec, event, kind, ev.ts, reason=ev.reason)

    def _on_accepted(self, rec: OrderRecord, ev: OrderAccepted) -> list[UserEvent]:
        new = _with_status(rec, next_order_state(rec.order_id, rec.status, _ACCEPT))
        event_id = self._next_event_id
        data = order_to_wire(new, self._instruments[new.symbol])
        events = [_user_event(self.user, event_id, "order_accepted", "", data, ev.ts)]
        self._orders[new.order_id] = new
        self._next_event_id = event_id + 1
        # The order's funds were frozen at placement: ``frozen`` and ``available``
        # changed, so an account_update follows, as after a reject, cancel or expiry.
        if self.coalesce_updates:
            self._mark_dirty(ev.ts)
        else:
            events.append(_user_event(
                self.user, event_id + 1, "account_update", "account",
                self._account_data(self._bal, self._positions, self._marks), ev.ts))
            self._next_event_id = event_id + 2
        return events

    def _close(
        self,
        rec: OrderRecord,
        event: OrderInput,
        kind: str,
        ts: int,
        *,
        code: str = "",
        reason: str = "",
    ) -> list[UserEvent]:
        """Reject, cancel or expire: release everything still frozen for the order."""
        state = next_order_state(rec.order_id, rec.status, event)
        new = _replace(rec, status=state, frozen_remaining=0, code=code, reason=reason)
        bal = _replace_balances(self._bal, frozen=self._bal.frozen - rec.frozen_remaining)
        data = order_to_wire(new, self._instruments[new.symbol])
        if code:
            data["code"] = code
        data["reason"] = reason
        em = _Emitter(self.user, self._next_event_id, ts)
        em.add(kind, data)
        if not self.coalesce_updates:
            em.add(
                "account_update", self._account_data(bal, self._positions, self._marks), "account"
            )
        self._orders[new.order_id] = new
        self._live.pop(new.order_id, None)
        self._closed.append(new.order_id)
        self._take_open(rec, rec.remaining_qty)
        self._bal = bal
        self._next_event_id = em.next_id
        if self.coalesce_updates:
            self._mark_dirty(ts)
        return em.events

    def _on_fill(self, ev: Fill) -> list[UserEvent]:
        inst = self._instruments.get(ev.symbol)
        if inst is None:
            raise _internal(f"fill in unknown symbol {ev.symbol}")
        if ev.taker_side not in ("buy", "sell"):
            raise _internal(f"fill {ev.trade_id}: bad taker side {ev.taker_side!r}")
        if ev.qty <= 0 or ev.price <= 0:
            raise _internal(f"fill {ev.trade_id}: price and qty must be positive")
        maker_side = "sell" if ev.taker_side == "buy" else "buy"
        sides: list[tuple[str, str, int, str, int]] = []
        if ev.maker_user == self.user:
            sides.append(
                (
                    "maker",
                    maker_side,
                    ev.maker_order_id,
                    ev.maker_client_order_id,
                    ev.maker_remaining,
                )
            )
        if ev.taker_user == self.user:
            sides.append(
                (
                    "taker",
                    ev.taker_side,
                    ev.taker_order_id,
                    ev.taker_client_order_id,
                    ev.taker_remaining,
                )
            )
        if not sides:
            raise _internal(f"fill {ev.trade_id} does not concern {self.user!r}")
        if len(sides) == 2 and ev.maker_order_id == ev.taker_order_id:
            raise _internal(f"fill {ev.trade_id}: an order cannot trade with itself")

        # Validate every side before touching anything.
        records: list[tuple[str, OrderRecord, OrderState, int]] = []
        for liquidity, side, order_id, client_order_id, remaining_after in sides:
            rec = self._record(order_id, ev.symbol)
            remaining_before = rec.qty - rec.filled_qty
            final = remaining_after == 0
            state = next_order_state(
                order_id, rec.status, _FINAL_FILL if final else _PARTIAL_FILL
            )
            if rec.side != side or rec.client_order_id != client_order_id:
                raise _internal(f"fill {ev.trade_id}: order {order_id} side or client id differs")
            if remaining_after < 0 or remaining_before - ev.qty != remaining_after:
                raise _internal(
                    f"fill {ev.trade_id}: order {order_id} had {remaining_before} lots, "
                    f"traded {ev.qty}, book says {remaining_after} remain"
                )
            records.append((liquidity, rec, state, remaining_before))

        # Compute the new state into locals. The events are built here rather than by
        # an _Emitter, whose add() was one more Python call per event.
        symbol, price, qty, ts, user = ev.symbol, ev.price, ev.qty, ev.ts, self.user
        bal = self._bal
        pos = self._positions.get(symbol, _FLAT)
        notional = inst.notional(price, qty)
        prices, qtys, cash = _STRINGS[inst.tick], _STRINGS[inst.lot], _STRINGS[CASH_STEP]
        price_text, qty_text = prices[price], qtys[qty]
        next_id = self._next_event_id
        events: list[UserEvent] = []
        new_records: list[OrderRecord] = []
        for liquidity, rec, state, remaining_before in records:
            rate = inst.maker_fee_ppm if liquidity == "maker" else inst.taker_fee_ppm
            fee = _fee(inst, notional, rate)
            if state is _FILLED:
                release = rec.frozen_remaining
            else:
                release = rec.frozen_remaining * qty // remaining_before
            pos, realized = _trade(pos, rec.side == "buy", price, qty, inst.value_per_tick_lot)
            bal = _Balances(
                cash=bal.cash + realized - fee,
                frozen=bal.frozen - release,
                fees_paid=bal.fees_paid + fee,
                realized_pnl=bal.realized_pnl + realized,
            )
            new = _after_fill(rec, state, qty, release, fee)
            new_records.append(new)
            data: dict[str, object] = {
                "trade_id": ev.trade_id,
                "order_id": rec.order_id,
                "client_order_id": rec.client_order_id,
                "symbol": symbol,
                "side": rec.side,
                "price": price_text,
                "qty": qty_text,
                "fee": cash[fee],
                "liquidity": liquidity,
                "realized_pnl": cash[realized],
            }
            events.append(_user_event(user, next_id, "trade_executed", "", data, ts))
            kind = "order_filled" if state is _FILLED else "order_partially_filled"
            data = _order_wire(new, prices, qtys)
            events.append(_user_event(user, next_id + 1, kind, "", data, ts))
            next_id += 2
        coalesce = self.coalesce_updates
        if not coalesce:
            # The updates show the state after the fill before it is committed.
            positions = {**self._positions, symbol: pos}
            marks = {**self._marks, symbol: price}
            data = self._position_data(symbol, pos, marks)
            events.append(_user_event(user, next_id, "position_update", symbol, data, ts))
            data = self._account_data(bal, positions, marks)
            events.append(_user_event(user, next_id + 1, "account_update", "account", data, ts))
            next_id += 2

        # Commit.
        for new in new_records:
            self._orders[new.order_id] = new
            if new.status not in LIVE_STATES:
                self._live.pop(new.order_id, None)
                self._closed.append(new.order_id)
            self._take_open(new, qty)
        if coalesce:
            # Nothing left to compute from the new maps: set the entries in place
            # (the same key order as the copies) instead of copying both per fill.
            self._positions[symbol] = pos
            self._marks[symbol] = price
        else:
            self._positions = positions
            self._marks = marks
        self._bal = bal
        self._next_event_id = next_id
        if coalesce:
            self._dirty_account = True
            self._dirty_ts = ts
            self._dirty_positions[symbol] = None
            return events
        return events + self._risk_events(ts)

    # -- internals -----------------------------------------------------------------------

    def _instrument(self, symbol: str) -> Instrument:
        inst = self._instruments.get(symbol)
        if inst is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_SYMBOL, f"unknown symbol {symbol}")
        return inst

    def _record(self, order_id: int, symbol: str) -> OrderRecord:
        rec = self._orders.get(order_id)
        if rec is None:
            raise _internal(f"{self.user!r} has no order {order_id}")
        if rec.symbol != symbol:
            raise _internal(f"order {order_id} is in {rec.symbol}, not {symbol}")
        return rec

    def _take_open(self, rec: OrderRecord, qty: int) -> None:
        """Count ``qty`` lots of ``rec`` as no longer open (traded, canceled, ...)."""
        key = (rec.symbol, rec.side)
        left = self._open_qty[key] - qty
        if left:
            self._open_qty[key] = left
        else:
            del self._open_qty[key]

    def _scan_open_qty(self) -> dict[tuple[str, str], int]:
        """:attr:`_open_qty` computed from the live orders (what it must always equal)."""
        open_qty: dict[tuple[str, str], int] = {}
        for oid in self._live:
            rec = self._orders[oid]
            key = (rec.symbol, rec.side)
            open_qty[key] = open_qty.get(key, 0) + rec.remaining_qty
        return open_qty

    def _mark_of(self, symbol: str, marks: Mapping[str, int]) -> int:
        return marks.get(symbol, self._instruments[symbol].ref_price)

    def _total_unrealized(
        self, positions: Mapping[str, _Position], marks: Mapping[str, int]
    ) -> int:
        return sum(
            _unrealized(self._instruments[sym], pos, self._mark_of(sym, marks))
            for sym, pos in positions.items()
            if pos.qty
        )

    def _total_margin(self, positions: Mapping[str, _Position]) -> int:
        return sum(_position_margin(self._instruments[s], p) for s, p in positions.items())

    def _totals(
        self, positions: Mapping[str, _Position], marks: Mapping[str, int]
    ) -> tuple[int, int]:
        """``(position margin, unrealized PnL)`` over all symbols, in one pass."""
        margin = unrealized = 0
        instruments = self._instruments
        for symbol, pos in positions.items():
            inst = instruments[symbol]
            margin += _position_margin(inst, pos)
            if pos.qty:
                unrealized += _unrealized(inst, pos, marks.get(symbol, inst.ref_price))
        return margin, unrealized

    def _available(
        self, bal: _Balances, positions: Mapping[str, _Position], marks: Mapping[str, int]
    ) -> int:
        margin, unrealized = self._totals(positions, marks)
        return bal.cash - bal.frozen - margin + min(0, unrealized)

    def _account_data(
        self,
        bal: _Balances,
        positions: Mapping[str, _Position],
        marks: Mapping[str, int],
        totals: tuple[int, int] | None = None,
    ) -> dict[str, object]:
        margin, unrealized = totals or self._totals(positions, marks)
        available = bal.cash - bal.frozen - margin + min(0, unrealized)
        equity = bal.cash + unrealized
        return {
            "balance": cash_str(bal.cash),
            "available": cash_str(available),
            "frozen": cash_str(bal.frozen),
            "margin": cash_str(margin),
            "position_pnl": cash_str(unrealized),
            "realized_pnl": cash_str(bal.realized_pnl),
            "fees_paid": cash_str(bal.fees_paid),
            "risk_ratio": "0" if margin == 0 else _ratio_str(margin, max(equity, 1)),
        }

    def _position_data(
        self, symbol: str, pos: _Position, marks: Mapping[str, int]
    ) -> dict[str, object]:
        inst = self._instruments[symbol]
        qtys = _STRINGS[inst.lot]
        long_qty, short_qty = max(pos.qty, 0), max(-pos.qty, 0)
        return {
            "symbol": symbol,
            "long_qty": qtys[long_qty],
            "short_qty": qtys[short_qty],
            "long_avg_price": _avg_price_str(inst, pos.cost if long_qty else 0, long_qty),
            "short_avg_price": _avg_price_str(inst, pos.cost if short_qty else 0, short_qty),
            "unrealized_pnl": cash_str(_unrealized(inst, pos, self._mark_of(symbol, marks))),
            "realized_pnl": cash_str(pos.realized),
            "margin": cash_str(_position_margin(inst, pos)),
        }
