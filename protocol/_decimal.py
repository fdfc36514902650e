"""Decimal strings at the edge, integers inside.

Prices become integer ticks, sizes integer lots and money integer minor units.
A value off its grid is rejected, never rounded silently.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from ._errors import ErrorCode, RemoteProtocolError

# Plain decimal notation only: no exponent, no sign on positives, no NaN/inf,
# at most 30 significant characters so a hostile string cannot cost much.
_DECIMAL_RE = re.compile(r"-?(0|[1-9][0-9]{0,19})(\.[0-9]{1,18})?")


def parse_decimal(text: object, *, field: str, code: ErrorCode) -> Decimal:
    """Parse a wire decimal string strictly.

    Args:
        text: the wire value; must be a ``str`` such as ``"101.25"``.
        field: the field name, for the error message.
        code: the error code to raise on failure.

    Returns:
        The exact :class:`~decimal.Decimal`.

    Raises:
        RemoteProtocolError: ``text`` is not a plain decimal string.
    """
    if not isinstance(text, str) or _DECIMAL_RE.fullmatch(text) is None:
        raise RemoteProtocolError(code, f"{field} must be a decimal string like \"101.25\"")
    try:
        return Decimal(text)
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        raise RemoteProtocolError(code, f"{field} is not a decimal") from None


def to_units(value: Decimal, step: Decimal, *, field: str, code: ErrorCode) -> int:
    """Convert a decimal to an integer count of ``step``; reject values off the grid.

    Raises:
        RemoteProtocolError: ``value`` is not a positive multiple of ``step``.
    """
    if value <= 0:
        raise RemoteProtocolError(code, f"{field} must be positive")
    units, rest = divmod(value, step)
    if rest != 0:
        raise RemoteProtocolError(code, f"{field} {value} is not a multiple of {step}")
    return int(units)


def from_units(units: int, step: Decimal) -> str:
    """Render ``units * step`` as a plain decimal string with the step's exponent."""
    value = Decimal(units) * step
    exponent = step.normalize().as_tuple().exponent
    assert isinstance(exponent, int)
    places = max(0, -exponent)
    return f"{value:.{places}f}"


def ratio_to_str(numerator: int, denominator: int, places: int = 8) -> str:
    """Render an exact ratio of integers as a decimal string (display only)."""
    if denominator == 0:
        return "0"
    q = (Decimal(numerator) / Decimal(denominator)).quantize(Decimal(1).scaleb(-places))
    return f"{q:f}"
