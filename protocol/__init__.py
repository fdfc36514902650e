"""Emporion's sans-I/O wire protocol: messages, codecs, validation, the connection.

Imports neither trio nor thespian (``tests/test_layering.py`` enforces it).
"""

from __future__ import annotations

from ._commands import (
    EVENT_PRIORITY,
    BookDelta,
    BookEvent,
    CancelOrder,
    CancelRejected,
    CancelUserOrders,
    Fill,
    NewOrder,
    OrderAccepted,
    OrderCanceled,
    OrderExpired,
    OrderRejected,
    PublicTrade,
    TickerUpdate,
    UserEvent,
)
from ._decimal import from_units, parse_decimal, ratio_to_str, to_units
from ._errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from ._instruments import (
    CASH_STEP,
    PPM,
    Instrument,
    cash_str,
    cash_to_units,
    parse_instruments,
    rate_str,
)

__all__ = [
    "CASH_STEP",
    "PPM",
    "BookDelta",
    "BookEvent",
    "CancelOrder",
    "CancelRejected",
    "CancelUserOrders",
    "ErrorCode",
    "Fill",
    "Instrument",
    "LocalProtocolError",
    "NewOrder",
    "OrderAccepted",
    "OrderCanceled",
    "OrderExpired",
    "OrderRejected",
    "ProtocolError",
    "PublicTrade",
    "RemoteProtocolError",
    "TickerUpdate",
    "UserEvent",
    "EVENT_PRIORITY",
    "cash_str",
    "cash_to_units",
    "from_units",
    "parse_decimal",
    "parse_instruments",
    "rate_str",
    "ratio_to_str",
    "to_units",
]
