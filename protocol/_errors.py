"""Error codes of the wire protocol and the typed exceptions that carry them."""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Every error code a client can see (PROTOCOL.md, *Errors*)."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    NOT_LOGGED_IN = "not_logged_in"
    AUTH_FAILED = "auth_failed"
    FORBIDDEN = "forbidden"
    UNKNOWN_SYMBOL = "unknown_symbol"
    INVALID_PRICE = "invalid_price"
    INVALID_QTY = "invalid_qty"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    POSITION_LIMIT = "position_limit"
    UNKNOWN_ORDER = "unknown_order"
    MARKET_HALTED = "market_halted"
    RATE_LIMITED = "rate_limited"
    TOO_MANY_SESSIONS = "too_many_sessions"
    REPLAY_UNAVAILABLE = "replay_unavailable"
    TIMEOUT = "timeout"
    INTERNAL = "internal"


class ProtocolError(Exception):
    """A typed protocol error: a code from :class:`ErrorCode` and a message for people.

    Args:
        code: the error code sent to the client.
        message: a human-readable explanation (never a traceback).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        #: The client's request ``id`` to echo in the error response, when known.
        self.request_id: str | int | float | bool | None = None

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries (multiprocTCPBase pickles messages);
        # the default reduce would call __init__ with the formatted string.
        return (type(self), (self.code, self.message), {"request_id": self.request_id})


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid (its fault): answer with an error frame."""


class LocalProtocolError(ProtocolError):
    """This side tried to do something the protocol forbids (our fault)."""
