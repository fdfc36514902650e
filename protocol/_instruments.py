"""Instrument specifications: the per-symbol scales that turn wire decimals into integers."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import attrs

from ._decimal import from_units, parse_decimal, to_units
from ._errors import ErrorCode, RemoteProtocolError

#: Cash is held in integer minor units of the quote currency: 1 unit = 0.0001.
CASH_STEP = Decimal("0.0001")
#: Rates (fees, margin, price band) are held in integer parts per million.
RATE_STEP = Decimal("0.000001")
PPM = 1_000_000

SYMBOL_RE = re.compile(r"[A-Z0-9][A-Z0-9._-]{0,31}")


def _positive(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


@attrs.frozen(kw_only=True)
class Instrument:
    """One tradable contract.

    Prices are integer ticks, sizes integer lots, money integer minor units of
    :data:`CASH_STEP`, rates integer ppm. ``value_per_tick_lot`` is the cash value,
    in minor units, of one tick of price on one lot: it must be an integer, so
    every notional, fee and PnL is exact.
    """

    symbol: str = attrs.field(validator=attrs.validators.matches_re(SYMBOL_RE))
    kind: str = attrs.field(validator=attrs.validators.in_(("perpetual", "future")))
    quote: str = "USDT"
    tick: Decimal = attrs.field(validator=_positive)
    lot: Decimal = attrs.field(validator=_positive)
    multiplier: Decimal = attrs.field(validator=_positive)
    margin_ppm: int = attrs.field(validator=_positive)
    maker_fee_ppm: int
    taker_fee_ppm: int
    ref_price: int = attrs.field(validator=_positive)
    band_ppm: int = attrs.field(validator=_positive)
    position_limit: int = attrs.field(validator=_positive)
    status: str = attrs.field(default="open", validator=attrs.validators.in_(("open", "halted")))
    value_per_tick_lot: int = attrs.field(init=False)

    @value_per_tick_lot.default
    def _value_per_tick_lot(self) -> int:
        value = self.tick * self.lot * self.multiplier / CASH_STEP
        if value != value.to_integral_value():
            raise ValueError(
                f"{self.symbol}: tick*lot*multiplier must be a multiple of {CASH_STEP}"
            )
        return int(value)

    # -- conversions at the edge -------------------------------------------------

    def price_to_ticks(self, text: object) -> int:
        """Wire price string → ticks. Raises ``invalid_price`` when off the grid."""
        value = parse_decimal(text, field="price", code=ErrorCode.INVALID_PRICE)
        return to_units(value, self.tick, field="price", code=ErrorCode.INVALID_PRICE)

    def qty_to_lots(self, text: object, *, zero_ok: bool = False) -> int:
        """Wire qty string → lots. Raises ``invalid_qty`` when off the grid.

        ``zero_ok``: zero is 0 lots rather than an error (a quantity the server
        reports, such as a flat position's ``long_qty``, not an order's).
        """
        value = parse_decimal(text, field="qty", code=ErrorCode.INVALID_QTY)
        if zero_ok and value == 0:
            return 0
        return to_units(value, self.lot, field="qty", code=ErrorCode.INVALID_QTY)

    def price_str(self, ticks: int) -> str:
        return from_units(ticks, self.tick)

    def qty_str(self, lots: int) -> str:
        return from_units(lots, self.lot)

    def band(self, ref_ticks: int) -> tuple[int, int]:
        """The lowest and highest price (ticks) accepted around ``ref_ticks``."""
        width = ref_ticks * self.band_ppm
        low = -((-(ref_ticks * PPM - width)) // PPM)  # ceil
        high = (ref_ticks * PPM + width) // PPM
        return max(1, low), high

    def notional(self, price_ticks: int, qty_lots: int) -> int:
        """Cash value (minor units) of ``qty_lots`` at ``price_ticks``."""
        return price_ticks * qty_lots * self.value_per_tick_lot

    def to_wire(self, ref_ticks: int | None = None) -> dict[str, str]:
        """The ``query instruments`` map of this instrument."""
        return {
            "symbol": self.symbol,
            "kind": self.kind,
            "quote": self.quote,
            "tick": _dec(self.tick),
            "lot": _dec(self.lot),
            "multiplier": _dec(self.multiplier),
            "margin_rate": rate_str(self.margin_ppm),
            "maker_fee": rate_str(self.maker_fee_ppm),
            "taker_fee": rate_str(self.taker_fee_ppm),
            "ref_price": self.price_str(self.ref_price if ref_ticks is None else ref_ticks),
            "price_band": rate_str(self.band_ppm),
            "position_limit": self.qty_str(self.position_limit),
            "status": self.status,
        }


def _dec(value: Decimal) -> str:
    return f"{value.normalize():f}"


def rate_str(ppm: int) -> str:
    return _dec(Decimal(ppm) * RATE_STEP)


def cash_to_units(text: object, *, field: str = "amount") -> int:
    """Wire money string → integer minor units (may be zero, never negative)."""
    value = parse_decimal(text, field=field, code=ErrorCode.BAD_REQUEST)
    units, rest = divmod(value, CASH_STEP)
    if rest != 0 or value < 0:
        raise RemoteProtocolError(
            ErrorCode.BAD_REQUEST, f"{field} must be a non-negative multiple of {CASH_STEP}"
        )
    return int(units)


def cash_str(units: int) -> str:
    """Integer minor units → wire money string."""
    return from_units(units, CASH_STEP)


def _rate(value: object, name: str) -> int:
    d = Decimal(str(value))
    ppm = d / RATE_STEP
    if ppm != ppm.to_integral_value():
        raise ValueError(f"{name} {value} has more precision than {RATE_STEP}")
    return int(ppm)


def instrument_from_mapping(symbol: str, spec: Mapping[str, Any]) -> Instrument:
    """Build an :class:`Instrument` from one TOML table (decimals as strings or numbers)."""
    tick = Decimal(str(spec["tick"]))
    lot = Decimal(str(spec["lot"]))
    ref = Decimal(str(spec["ref_price"]))
    ref_ticks, rest = divmod(ref, tick)
    if rest:
        raise ValueError(f"{symbol}: ref_price {ref} is off the tick grid {tick}")
    limit = Decimal(str(spec["position_limit"]))
    limit_lots, rest = divmod(limit, lot)
    if rest:
        raise ValueError(f"{symbol}: position_limit {limit} is off the lot grid {lot}")
    return Instrument(
        symbol=symbol,
        kind=str(spec.get("kind", "perpetual")),
        quote=str(spec.get("quote", "USDT")),
        tick=tick,
        lot=lot,
        multiplier=Decimal(str(spec.get("multiplier", "1"))),
        margin_ppm=_rate(spec["margin_rate"], "margin_rate"),
        maker_fee_ppm=_rate(spec["maker_fee"], "maker_fee"),
        taker_fee_ppm=_rate(spec["taker_fee"], "taker_fee"),
        ref_price=int(ref_ticks),
        band_ppm=_rate(spec["price_band"], "price_band"),
        position_limit=int(limit_lots),
        status=str(spec.get("status", "open")),
    )


def parse_instruments(toml_text: str) -> dict[str, Instrument]:
    """Parse an instrument registry (TOML: one ``[instruments.SYMBOL]`` table each).

    Raises:
        ValueError: a table is missing a field or has an inconsistent scale.
    """
    doc = tomllib.loads(toml_text)
    tables = doc.get("instruments", {})
    if not isinstance(tables, dict) or not tables:
        raise ValueError("the registry has no [instruments.SYMBOL] tables")
    out: dict[str, Instrument] = {}
    for symbol, spec in tables.items():
        try:
            out[symbol] = instrument_from_mapping(symbol, spec)
        except KeyError as exc:
            raise ValueError(f"{symbol}: missing field {exc.args[0]}") from None
    return out
