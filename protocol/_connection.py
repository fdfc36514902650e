"""The sans-I/O server side of one client connection, in the h11/wsproto manner.

Frames in → request events out; frames to send in → bytes/text out. No sockets:
the gateway feeds it what the WebSocket delivered and writes what it returns.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import attrs
import cbor2

from ._codec import (
    DEFAULT_MAX_FRAME,
    Encoding,
    MarketFrameTemplate,
    decode_request,
    encode_frame,
    encode_map,
    private_frame_map,
)
from ._errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from ._frames import ErrorResponse, ServerFrame
from ._instruments import Instrument
from ._requests import (
    Login,
    Ping,
    Place,
    Query,
    Request,
    RequestId,
    Subscribe,
    Unsubscribe,
)


class ConnectionState(enum.Enum):
    ANONYMOUS = "anonymous"
    LOGGED_IN = "logged_in"
    CLOSED = "closed"


class ConnectionEvent(enum.Enum):
    LOGIN_OK = "login_ok"
    LOGIN_FAILED = "login_failed"
    CLOSE = "close"


#: The connection state machine, one table: (state, event) → next state.
TRANSITIONS: Final[dict[tuple[ConnectionState, ConnectionEvent], ConnectionState]] = {
    (ConnectionState.ANONYMOUS, ConnectionEvent.LOGIN_OK): ConnectionState.LOGGED_IN,
    (ConnectionState.ANONYMOUS, ConnectionEvent.LOGIN_FAILED): ConnectionState.ANONYMOUS,
    (ConnectionState.ANONYMOUS, ConnectionEvent.CLOSE): ConnectionState.CLOSED,
    (ConnectionState.LOGGED_IN, ConnectionEvent.CLOSE): ConnectionState.CLOSED,
    (ConnectionState.CLOSED, ConnectionEvent.CLOSE): ConnectionState.CLOSED,
}

#: Ops that work before login (``query`` only for ``instruments``).
_PUBLIC_OPS: Final = (Login, Ping, Subscribe, Unsubscribe)

POLICY_VIOLATION: Final = 1008

log = logging.getLogger(__name__)


@attrs.frozen(kw_only=True)
class BadInput:
    """A frame the connection refused; ``response`` is the error to send back."""

    response: ErrorResponse


class ServerConnection:
    """Protocol state of one client connection.

    Args:
        encoding: fixed by the negotiated subprotocol, or None to take the
            encoding of the client's first frame.
        instruments: the registry, so ``place`` is checked for a known symbol
            and for prices/qtys on the grid before it reaches the engine.
        max_frame: the largest frame accepted, in bytes/characters.
        max_consecutive_bad: after this many bad frames in a row the
            connection asks to be closed with code 1008.
    """

    def __init__(
        self,
        *,
        encoding: Encoding | None = None,
        instruments: Mapping[str, Instrument] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_consecutive_bad: int = 32,
    ) -> None:
        self.encoding = encoding
        self.state = ConnectionState.ANONYMOUS
        self.user: str | None = None
        self._instruments = instruments
        self._max_frame = max_frame
        self._max_bad = max_consecutive_bad
        self._bad_in_a_row = 0
        self.frames_in = 0
        self.bad_frames = 0
        #: Frames :meth:`send` could not encode (each replaced by an ``internal`` error).
        self.encode_errors = 0

    # -- state machine -------------------------------------------------------------

    def _transition(self, event: ConnectionEvent) -> None:
        try:
            self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise LocalProtocolError(
                ErrorCode.INTERNAL, f"{event.value} is illegal in state {self.state.value}"
            ) from None

    def login_succeeded(self, user: str) -> None:
        """The engine accepted the login: private ops are now allowed."""
        self._transition(ConnectionEvent.LOGIN_OK)
        self.user = user

    def login_failed(self) -> None:
        self._transition(ConnectionEvent.LOGIN_FAILED)

    def close(self) -> None:
        self._transition(ConnectionEvent.CLOSE)

    @property
    def should_close(self) -> bool:
        """True once the client kept sending bad frames: close with 1008."""
        return self._bad_in_a_row >= self._max_bad

    # -- data in -------------------------------------------------------------------

    def receive_frame(self, data: bytes | str) -> Request | BadInput:
        """Turn one WebSocket message into a request event or a refusal.

        Raises:
            LocalProtocolError: the connection is closed.
        """
        if self.state is ConnectionState.CLOSED:
            raise LocalProtocolError(ErrorCode.INTERNAL, "the connection is closed")
        self.frames_in += 1
        if self.encoding is None:
            self.encoding = Encoding.of_frame(data)
        try:
            request = decode_request(data, max_size=self._max_frame)
            self._check_state(request)
            if isinstance(request, Place) and self._instruments is not None:
                instrument = self._instruments.get(request.symbol)
                if instrument is None:
                    raise _StateError(
                        ErrorCode.UNKNOWN_SYMBOL,
                        f"unknown symbol {request.symbol[:32]!r}",
                        request.id,
                    )
                try:
                    request.check_grid(instrument)
                except RemoteProtocolError as exc:
                    exc.request_id = request.id
                    raise
        except RemoteProtocolError as exc:
            if exc.code in (ErrorCode.BAD_FRAME, ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_OP):
                self._bad_in_a_row += 1
                self.bad_frames += 1
            return BadInput(response=ErrorResponse.from_error(exc))
        self._bad_in_a_row = 0
        return request

    def _check_state(self, request: Request) -> None:
        if isinstance(request, Login):
            if self.state is ConnectionState.LOGGED_IN:
                raise _StateError(ErrorCode.BAD_REQUEST, "already logged in", request.id)
            return
        if self.state is ConnectionState.LOGGED_IN or isinstance(request, _PUBLIC_OPS):
            return
        if isinstance(request, Query) and request.what == "instruments":
            return
        raise _StateError(ErrorCode.NOT_LOGGED_IN, "log in first", request.id)

    # -- data out ------------------------------------------------------------------

    def send(self, frame: ServerFrame) -> bytes | str:
        """Encode a frame for this client, in its encoding (JSON until one is known).

        Never raises: a frame the encoding cannot carry (our bug, since request
        ids are validated for both encodings) is logged and replaced by an
        ``internal`` error with ``id`` null, so the client still gets an answer.
        """
        encoding = self.encoding or Encoding.JSON
        try:
            return encode_frame(frame, encoding)
        except _ENCODE_ERRORS:
            return self._unencodable(type(frame).__name__, encoding)

    def send_private(self, events: Iterable[Any], skipped: Sequence[int] = ()) -> bytes | str:
        """Encode a ``private`` frame of the server's own sequenced events.

        What ``send(PrivateFrame(events=..., skipped=...))`` returns, without building
        the frame (see :func:`private_frame_map`: the events are not validated again).
        Never raises, like :meth:`send`.
        """
        encoding = self.encoding or Encoding.JSON
        try:
            return encode_map(private_frame_map(events, skipped), encoding)
        except _ENCODE_ERRORS:
            return self._unencodable("PrivateFrame", encoding)

    def send_market(self, template: MarketFrameTemplate, seq: int) -> bytes | str:
        """Encode ``template``'s market frame with this connection's ``seq``: what
        ``send(template.frame(seq))`` returns. Never raises, like :meth:`send`."""
        encoding = self.encoding or Encoding.JSON
        try:
            return template.encode(seq, encoding)
        except _ENCODE_ERRORS:
            return self._unencodable("MarketFrame", encoding)

    def _unencodable(self, what: str, encoding: Encoding) -> bytes | str:
        self.encode_errors += 1
        log.exception("cannot encode a %s frame in %s", what, encoding)
        return encode_frame(
            ErrorResponse(
                id=None,
                code=ErrorCode.INTERNAL,
                message="the server could not encode a frame for this connection",
            ),
            encoding,
        )


_ENCODE_ERRORS: Final = (ValueError, TypeError, OverflowError, cbor2.CBOREncodeError)


class _StateError(RemoteProtocolError):
    """A refusal that already knows the request id to echo."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId) -> None:
        super().__init__(code, message)
        self.request_id = request_id
