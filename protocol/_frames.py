"""Server → client frames and the typed data of every private event kind."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import Any, Final, TypeAlias

import attrs

from ._commands import EVENT_PRIORITY
from ._errors import ErrorCode, RemoteProtocolError
from ._requests import RequestId

_str = attrs.validators.instance_of(str)
_int = attrs.validators.instance_of(int)
_opt_str = attrs.validators.optional(_str)
NOTICE_KINDS: Final = ("resync", "halt", "resume", "maintenance")
MARKET_KINDS: Final = ("snapshot", "delta", "trade", "ticker")


@attrs.frozen(kw_only=True)
class Response:
    """A successful answer to the request with ``id``."""

    id: RequestId
    result: dict[str, Any] = attrs.field(factory=dict, hash=False)


@attrs.frozen(kw_only=True)
class ErrorResponse:
    """A failed request: a code from :class:`ErrorCode` and a message for people."""

    id: RequestId
    code: ErrorCode = attrs.field(converter=ErrorCode)
    message: str = attrs.field(validator=_str)

    @classmethod
    def from_error(cls, exc: RemoteProtocolError) -> ErrorResponse:
        return cls(id=exc.request_id, code=exc.code, message=exc.message)


@attrs.frozen(kw_only=True)
class PrivateEvent:
    """One sequenced private event as it travels on the wire."""

    seq: int = attrs.field(validator=[_int, attrs.validators.gt(0)])
    kind: str = attrs.field(validator=attrs.validators.in_(tuple(EVENT_PRIORITY)))
    priority: int = attrs.field(validator=attrs.validators.in_((0, 1, 2, 3)))
    ts: int = attrs.field(validator=_int)
    data: dict[str, Any] = attrs.field(factory=dict, hash=False)


def _event_tuple(events: Iterable[PrivateEvent]) -> tuple[PrivateEvent, ...]:
    return tuple(events)


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(values)


@attrs.frozen(kw_only=True)
class PrivateFrame:
    """One or more private events of one user, in seq order.

    ``skipped`` lists seqs this connection will never receive because a newer
    value of the same P2/P3 key replaced them (back-pressure conflation), so a
    client can tell conflation from loss.
    """

    events: tuple[PrivateEvent, ...] = attrs.field(converter=_event_tuple)
    skipped: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)

    @events.validator
    def _ordered(self, _: attrs.Attribute[Any], value: tuple[PrivateEvent, ...]) -> None:
        if not value:
            raise ValueError("a private frame carries at least one event")
        seqs = [e.seq for e in value]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ValueError("private events must be in increasing seq order")


@attrs.frozen(kw_only=True)
class MarketFrame:
    """Public market data on one channel, numbered per channel."""

    channel: str = attrs.field(validator=_str)
    seq: int = attrs.field(validator=[_int, attrs.validators.gt(0)])
    kind: str = attrs.field(validator=attrs.validators.in_(MARKET_KINDS))
    ts: int = attrs.field(validator=_int)
    data: dict[str, Any] = attrs.field(factory=dict, hash=False)


@attrs.frozen(kw_only=True)
class Notice:
    """A public, unsequenced notice (halt, resume, maintenance, resync)."""

    kind: str = attrs.field(validator=attrs.validators.in_(NOTICE_KINDS))
    data: dict[str, Any] = attrs.field(factory=dict, hash=False)


@attrs.frozen(kw_only=True)
class Pong:
    id: RequestId
    ts: int = attrs.field(validator=_int)


ServerFrame: TypeAlias = Response | ErrorResponse | PrivateFrame | MarketFrame | Notice | Pong


def frame_to_map(frame: ServerFrame) -> dict[str, Any]:
    """The wire map of a server frame (PROTOCOL.md, *Server → client frames*)."""
    if isinstance(frame, PrivateFrame):
        out: dict[str, Any] = {
            "type": "private",
            "events": [
                {"seq": e.seq, "kind": e.kind, "priority": e.priority, "ts": e.ts, "data": e.data}
                for e in frame.events
            ],
        }
        if frame.skipped:
            out["skipped"] = list(frame.skipped)
        return out
    if isinstance(frame, Response):
        return {"type": "response", "id": frame.id, "ok": True, "result": frame.result}
    if isinstance(frame, ErrorResponse):
        return {
            "type": "response",
            "id": frame.id,
            "ok": False,
            "error": {"code": frame.code.value, "message": frame.message},
        }
    if isinstance(frame, MarketFrame):
        return {
            "type": "market",
            "channel": frame.channel,
            "seq": frame.seq,
            "kind": frame.kind,
            "ts": frame.ts,
            "data": frame.data,
        }
    if isinstance(frame, Notice):
        return {"type": "notice", "kind": frame.kind, "data": frame.data}
    return {"type": "pong", "id": frame.id, "ts": frame.ts}


def frame_from_map(raw: object) -> ServerFrame:
    """Parse a server frame (the client side of the codec).

    Raises:
        RemoteProtocolError: ``bad_frame`` when the map is not a valid server frame.
    """
    try:
        return _frame_from_map(raw)
    except RemoteProtocolError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"bad server frame: {exc}") from None


def _frame_from_map(raw: object) -> ServerFrame:
    if not isinstance(raw, dict):
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a frame must be one map")
    kind = raw["type"]
    if kind == "private":
        return PrivateFrame(
            events=tuple(
                PrivateEvent(
                    seq=e["seq"], kind=e["kind"], priority=e["priority"], ts=e["ts"],
                    data=dict(e["data"]),
                )
                for e in raw["events"]
            ),
            skipped=tuple(int(x) for x in raw.get("skipped", ())),
        )
    if kind == "response":
        if raw["ok"] is True:
            return Response(id=raw.get("id"), result=dict(raw["result"]))
        err = raw["error"]
        return ErrorResponse(id=raw.get("id"), code=err["code"], message=err["message"])
    if kind == "market":
        return MarketFrame(
            channel=raw["channel"], seq=raw["seq"], kind=raw["kind"], ts=raw["ts"],
            data=dict(raw["data"]),
        )
    if kind == "notice":
        return Notice(kind=raw["kind"], data=dict(raw.get("data", {})))
    if kind == "pong":
        return Pong(id=raw.get("id"), ts=raw["ts"])
    raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"unknown frame type {str(kind)[:32]!r}")


# -- typed data of the private event kinds ---------------------------------------------


@attrs.frozen(kw_only=True)
class OrderEventData:
    """``order_accepted`` / ``_partially_filled`` / ``_filled`` / ``_canceled`` /
    ``_expired`` / ``order_rejected`` data. Decimals are wire strings."""

    order_id: int = attrs.field(validator=_int)
    client_order_id: str = attrs.field(validator=_str)
    symbol: str = attrs.field(validator=_str)
    side: str = attrs.field(validator=attrs.validators.in_(("buy", "sell")))
    type: str = attrs.field(validator=attrs.validators.in_(("limit", "market")))
    price: str | None = attrs.field(validator=_opt_str)
    qty: str = attrs.field(validator=_str)
    filled_qty: str = attrs.field(validator=_str)
    remaining_qty: str = attrs.field(validator=_str)
    status: str = attrs.field(validator=_str)
    tif: str | None = attrs.field(default=None, validator=_opt_str)
    code: str | None = attrs.field(default=None, validator=_opt_str)
    reason: str | None = attrs.field(default=None, validator=_opt_str)


@attrs.frozen(kw_only=True)
class TradeData:
    """``trade_executed`` data: one fill of one of the user's orders."""

    trade_id: int = attrs.field(validator=_int)
    order_id: int = attrs.field(validator=_int)
    client_order_id: str | None = attrs.field(default=None, validator=_opt_str)
    symbol: str = attrs.field(validator=_str)
    side: str = attrs.field(validator=attrs.validators.in_(("buy", "sell")))
    price: str = attrs.field(validator=_str)
    qty: str = attrs.field(validator=_str)
    fee: str = attrs.field(validator=_str)
    liquidity: str = attrs.field(validator=attrs.validators.in_(("maker", "taker")))
    realized_pnl: str | None = attrs.field(default=None, validator=_opt_str)


@attrs.frozen(kw_only=True)
class AccountData:
    """``account_update`` data."""

    balance: str = attrs.field(validator=_str)
    available: str = attrs.field(validator=_str)
    frozen: str = attrs.field(validator=_str)
    margin: str = attrs.field(validator=_str)
    position_pnl: str = attrs.field(validator=_str)
    realized_pnl: str = attrs.field(validator=_str)
    risk_ratio: str = attrs.field(validator=_str)
    fees_paid: str | None = attrs.field(default=None, validator=_opt_str)


@attrs.frozen(kw_only=True)
class PositionData:
    """``position_update`` data (net position shown as long or short)."""

    symbol: str = attrs.field(validator=_str)
    long_qty: str = attrs.field(validator=_str)
    short_qty: str = attrs.field(validator=_str)
    long_avg_price: str | None = attrs.field(validator=_opt_str)
    short_avg_price: str | None = attrs.field(validator=_opt_str)
    unrealized_pnl: str = attrs.field(validator=_str)
    realized_pnl: str | None = attrs.field(default=None, validator=_opt_str)
    margin: str | None = attrs.field(default=None, validator=_opt_str)


@attrs.frozen(kw_only=True)
class SystemNoticeData:
    """``system_notice`` data; ``kind`` is e.g. ``resync``."""

    kind: str = attrs.field(validator=_str)
    message: str | None = attrs.field(default=None, validator=_opt_str)
    scope: str | None = attrs.field(default=None, validator=_opt_str)


@attrs.frozen(kw_only=True)
class RiskData:
    """``risk_alert`` / ``margin_call`` data."""

    risk_ratio: str = attrs.field(validator=_str)
    message: str | None = attrs.field(default=None, validator=_opt_str)


EventData: TypeAlias = (
    OrderEventData | TradeData | AccountData | PositionData | SystemNoticeData | RiskData
)

EVENT_DATA_TYPES: Final[dict[str, type[EventData]]] = {
    "order_rejected": OrderEventData,
    "order_accepted": OrderEventData,
    "order_partially_filled": OrderEventData,
    "order_filled": OrderEventData,
    "order_canceled": OrderEventData,
    "order_expired": OrderEventData,
    "trade_executed": TradeData,
    "account_update": AccountData,
    "position_update": PositionData,
    "system_notice": SystemNoticeData,
    "risk_alert": RiskData,
    "margin_call": RiskData,
}


def event_data(kind: str, data: Mapping[str, Any]) -> EventData:
    """The typed data of a private event; extra wire fields are ignored (forward compatible).

    Raises:
        RemoteProtocolError: ``bad_frame`` when the data does not fit the kind.
    """
    cls = EVENT_DATA_TYPES.get(kind)
    if cls is None:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"unknown event kind {kind[:32]!r}")
    names = {a.name for a in attrs.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError) as exc:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, f"{kind}: {exc}") from None
