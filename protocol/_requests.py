"""Client → server requests (PROTOCOL.md, *Client → server requests*).

Each class validates at construction; :func:`request_from_map` turns a decoded
wire map into one of them or raises a typed :class:`RemoteProtocolError`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeAlias

import attrs

from ._commands import ORDER_TYPES, SIDES, TIFS, NewOrder
from ._decimal import parse_decimal
from ._errors import ErrorCode, RemoteProtocolError
from ._instruments import Instrument

#: A request id: any JSON scalar chosen by the client, echoed in the response.
RequestId: TypeAlias = str | int | float | bool | None

CLIENT_ORDER_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,36}")
USER_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
CHANNEL_RE: Final = re.compile(r"(book|trades|ticker)\.([A-Z0-9][A-Z0-9._-]{0,31})")
QUERY_WHAT: Final = ("account", "positions", "orders", "trades", "instruments")
MAX_CHANNELS: Final = 64
MAX_PASSWORD: Final = 256
MAX_ID_TEXT: Final = 64
MAX_SEQ: Final = 2**63 - 1
#: Lone surrogates: a JSON ``\ud800`` escape decodes to one, and UTF-8 cannot carry it.
_SURROGATE_RE: Final = re.compile("[\ud800-\udfff]")

def _strict_int(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    # bool is an int subclass in Python; on the wire true is not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"'{attribute.name}' must be an integer")


_seq = [_strict_int, attrs.validators.ge(0), attrs.validators.le(MAX_SEQ)]


def _request_id(_: Any, __: attrs.Attribute[Any] | None, value: Any) -> None:
    """An id must be echoable in both encodings: it is answered in the connection's.

    So no NaN/Infinity (a CBOR float the strict JSON encoder refuses) and no
    lone surrogate (a JSON escape UTF-8, hence CBOR and the WebSocket, cannot carry).
    """
    if value is None or isinstance(value, bool | int):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SEQ:
            raise ValueError("id out of range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("id must be a finite number")
        return
    if isinstance(value, str) and len(value) <= MAX_ID_TEXT:
        if _SURROGATE_RE.search(value) is not None:
            raise ValueError("id must be valid Unicode text (no lone surrogates)")
        return
    raise ValueError("id must be a JSON scalar (a string of at most 64 characters)")


def _channels(_: Any, __: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not 1 <= len(value) <= MAX_CHANNELS:
        raise ValueError(f"channels must list 1 to {MAX_CHANNELS} channels")
    for ch in value:
        if not isinstance(ch, str) or CHANNEL_RE.fullmatch(ch) is None:
            raise ValueError("a channel is book.SYM, trades.SYM or ticker.SYM")


def _decimal_text(code: ErrorCode, field: str) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def check(_: Any, __: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and parse_decimal(value, field=field, code=code) <= 0:
            raise RemoteProtocolError(code, f"{field} must be positive")

    return check


@attrs.frozen(kw_only=True)
class Login:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    user: str = attrs.field(validator=attrs.validators.matches_re(USER_RE))
    password: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: Cancel this user's open orders when this connection drops (and it was the last).
    cancel_on_disconnect: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )

    @password.validator
    def _password_len(self, _: attrs.Attribute[str], value: str) -> None:
        if len(value) > MAX_PASSWORD:
            raise ValueError(f"password longer than {MAX_PASSWORD}")


@attrs.frozen(kw_only=True)
class Subscribe:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    channels: tuple[str, ...] = attrs.field(converter=tuple, validator=_channels)


@attrs.frozen(kw_only=True)
class Unsubscribe:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    channels: tuple[str, ...] = attrs.field(converter=tuple, validator=_channels)


def _limit_has_price(inst: Place, _: attrs.Attribute[Any], value: str | None) -> None:
    if inst.type == "limit" and value is None:
        raise RemoteProtocolError(ErrorCode.INVALID_PRICE, "a limit order needs a price")
    if inst.type == "market" and value is not None:
        raise RemoteProtocolError(ErrorCode.INVALID_PRICE, "a market order takes no price")


@attrs.frozen(kw_only=True)
class Place:
    """A new order as the client sent it: decimals still strings.

    :meth:`to_new_order` converts it with the instrument's grid (rejecting
    off-grid values) into the integer :class:`NewOrder` the engine uses.
    """

    id: RequestId = attrs.field(default=None, validator=_request_id)
    client_order_id: str = attrs.field(validator=attrs.validators.matches_re(CLIENT_ORDER_ID_RE))
    symbol: str = attrs.field(validator=attrs.validators.instance_of(str))
    side: str = attrs.field(validator=attrs.validators.in_(SIDES))
    type: str = attrs.field(validator=attrs.validators.in_(ORDER_TYPES))
    price: str | None = attrs.field(
        default=None,
        validator=[_decimal_text(ErrorCode.INVALID_PRICE, "price"), _limit_has_price],
    )
    qty: str = attrs.field(validator=_decimal_text(ErrorCode.INVALID_QTY, "qty"))
    tif: str = attrs.field(default="gtc", validator=attrs.validators.in_(TIFS))
    post_only: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))

    def check_grid(self, instrument: Instrument) -> tuple[int | None, int]:
        """Price in ticks (None for market) and qty in lots.

        Raises:
            RemoteProtocolError: ``invalid_price`` / ``invalid_qty`` off the grid.
        """
        ticks = None if self.price is None else instrument.price_to_ticks(self.price)
        return ticks, instrument.qty_to_lots(self.qty)

    def to_new_order(
        self, instrument: Instrument, *, order_id: int, user: str, ts: int
    ) -> NewOrder:
        """The engine command for this request (named constructor)."""
        ticks, lots = self.check_grid(instrument)
        return NewOrder(
            order_id=order_id,
            user=user,
            client_order_id=self.client_order_id,
            symbol=self.symbol,
            side=self.side,
            order_type=self.type,
            price=ticks,
            qty=lots,
            tif=self.tif,
            post_only=self.post_only,
            ts=ts,
        )


def _one_order_ref(inst: Cancel, _: attrs.Attribute[Any], value: str | None) -> None:
    if (inst.order_id is None) == (value is None):
        raise ValueError("cancel takes exactly one of order_id and client_order_id")


@attrs.frozen(kw_only=True)
class Cancel:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    order_id: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            [_strict_int, attrs.validators.gt(0), attrs.validators.le(MAX_SEQ)]
        ),
    )
    client_order_id: str | None = attrs.field(
        default=None,
        validator=[
            attrs.validators.optional(attrs.validators.matches_re(CLIENT_ORDER_ID_RE)),
            _one_order_ref,
        ],
    )


@attrs.frozen(kw_only=True)
class CancelAll:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    symbol: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.instance_of(str))
    )


@attrs.frozen(kw_only=True)
class Query:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    what: str = attrs.field(validator=attrs.validators.in_(QUERY_WHAT))


@attrs.frozen(kw_only=True)
class Resume:
    id: RequestId = attrs.field(default=None, validator=_request_id)
    after_seq: int = attrs.field(validator=_seq)


@attrs.frozen(kw_only=True)
class Ack:
    """Tells the server the client holds every private event up to ``seq``; no response."""

    id: RequestId = attrs.field(default=None, validator=_request_id)
    seq: int = attrs.field(validator=_seq)


@attrs.frozen(kw_only=True)
class Ping:
    id: RequestId = attrs.field(default=None, validator=_request_id)


Request: TypeAlias = (
    Login | Subscribe | Unsubscribe | Place | Cancel | CancelAll | Query | Resume | Ack | Ping
)

#: op name → request class; the one table both codecs use.
REQUEST_TYPES: Final[dict[str, type[Request]]] = {
    "login": Login,
    "subscribe": Subscribe,
    "unsubscribe": Unsubscribe,
    "place": Place,
    "cancel": Cancel,
    "cancel_all": CancelAll,
    "query": Query,
    "resume": Resume,
    "ack": Ack,
    "ping": Ping,
}
OP_OF: Final[dict[type[Request], str]] = {cls: op for op, cls in REQUEST_TYPES.items()}
_FIELDS: Final[dict[type[Request], frozenset[str]]] = {
    cls: frozenset(a.name for a in attrs.fields(cls)) for cls in REQUEST_TYPES.values()
}
_REQUIRED: Final[dict[type[Request], frozenset[str]]] = {
    cls: frozenset(
        a.name for a in attrs.fields(cls) if a.default is attrs.NOTHING
    )
    for cls in REQUEST_TYPES.values()
}
# Fields where a JSON array arrives and a tuple is kept.
_LIST_FIELDS: Final = frozenset({"channels"})


def _safe_id(raw: Mapping[Any, Any]) -> RequestId:
    """The request id to echo in an error, or None when it is not a valid id."""
    value = raw.get("id")
    try:
        _request_id(None, None, value)
    except ValueError:
        return None
    return value


def request_from_map(raw: object) -> Request:
    """Validate a decoded wire map and build the request it describes.

    Raises:
        RemoteProtocolError: ``bad_frame`` (not a map), ``unknown_op``,
            ``bad_request`` (missing, unknown or ill-typed fields),
            ``invalid_price`` / ``invalid_qty`` (malformed decimals). The error's
            ``request_id`` is the client's ``id`` when that id was valid.
    """
    if not isinstance(raw, dict):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a frame must be one map")
    request_id = _safe_id(raw)
    op = raw.get("op")
    if not isinstance(op, str):
        raise _with_id(RemoteProtocolError(ErrorCode.BAD_REQUEST, "op is missing"), request_id)
    cls = REQUEST_TYPES.get(op)
    if cls is None:
        raise _with_id(
            RemoteProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:32]!r}"), request_id
        )
    fields = _FIELDS[cls]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "op":
            continue
        if key not in fields:
            raise _with_id(
                RemoteProtocolError(
                    ErrorCode.BAD_REQUEST, f"{op}: unknown field {str(key)[:32]!r}"
                ),
                request_id,
            )
        if key in _LIST_FIELDS and not isinstance(value, list | tuple):
            raise _with_id(
                RemoteProtocolError(ErrorCode.BAD_REQUEST, f"{op}: {key} must be a list"),
                request_id,
            )
        kwargs[key] = value
    missing = _REQUIRED[cls] - kwargs.keys()
    if missing:
        raise _with_id(
            RemoteProtocolError(
                ErrorCode.BAD_REQUEST, f"{op}: missing field {sorted(missing)[0]}"
            ),
            request_id,
        )
    try:
        return cls(**kwargs)
    except RemoteProtocolError as exc:
        raise _with_id(exc, request_id) from None
    except (TypeError, ValueError) as exc:
        raise _with_id(
            RemoteProtocolError(ErrorCode.BAD_REQUEST, f"{op}: {_short(exc)}"), request_id
        ) from None


def request_to_map(request: Request) -> dict[str, Any]:
    """The wire map of a request (what a client sends); omits unset optional fields."""
    out: dict[str, Any] = {"op": OP_OF[type(request)]}
    for a in attrs.fields(type(request)):
        value = getattr(request, a.name)
        if a.default is not attrs.NOTHING and value == a.default and a.name != "id":
            continue
        if a.name == "id" and value is None:
            continue
        out[a.name] = list(value) if isinstance(value, tuple) else value
    return out


def _short(exc: Exception) -> str:
    first = exc.args[0] if exc.args else ""
    text = first if isinstance(first, str) and first else type(exc).__name__
    # attrs' messages embed the offending value; keep errors short and safe.
    return text[:160]


def _with_id(exc: RemoteProtocolError, request_id: RequestId) -> RemoteProtocolError:
    exc.request_id = request_id
    return exc
