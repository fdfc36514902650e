"""The two encodings of the same maps: CBOR (binary frames) and JSON (text frames).

``decode_*`` of arbitrary input either returns a valid message or raises
:class:`RemoteProtocolError` with a code from PROTOCOL.md; no other exception
escapes (``tests/test_codec.py`` proves it with hypothesis).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Sequence
from typing import Any, Final

import attrs
import cbor2

from ._errors import ErrorCode, RemoteProtocolError
from ._frames import MarketFrame, ServerFrame, frame_from_map, frame_to_map
from ._requests import Request, request_from_map, request_to_map

DEFAULT_MAX_FRAME: Final = 64 * 1024


class Encoding(enum.StrEnum):
    CBOR = "cbor"
    JSON = "json"

    @property
    def subprotocol(self) -> str:
        return f"emporion.v1.{self.value}"

    @classmethod
    def from_subprotocol(cls, name: str | None) -> Encoding | None:
        """The encoding a WebSocket subprotocol names, or None for unknown/absent."""
        return {"emporion.v1.cbor": cls.CBOR, "emporion.v1.json": cls.JSON}.get(name or "")

    @classmethod
    def of_frame(cls, data: bytes | str) -> Encoding:
        """Binary frames are CBOR, text frames JSON."""
        return cls.JSON if isinstance(data, str) else cls.CBOR


SUBPROTOCOLS: Final = (Encoding.CBOR.subprotocol, Encoding.JSON.subprotocol)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


_json_decoder = json.JSONDecoder(parse_constant=_reject_constant)
_json_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_json_ascii_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def encode_map(obj: dict[str, Any], encoding: Encoding) -> bytes | str:
    """Encode one map: ``bytes`` for CBOR, ``str`` for JSON.

    JSON text is always UTF-8-encodable (a WebSocket text frame must be): a
    lone surrogate, which only a JSON ``\\uXXXX`` escape can produce, goes out
    escaped again rather than raw.

    Raises:
        ValueError: NaN or ±Infinity in JSON, a lone surrogate in CBOR
            (``UnicodeEncodeError``). TypeError: a value JSON cannot encode.
        cbor2.CBOREncodeError: a value CBOR cannot encode.
    """
    if encoding is Encoding.CBOR:
        return cbor2.dumps(obj)
    text = _json_encoder.encode(obj)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return _json_ascii_encoder.encode(obj)
    return text


def decode_map(data: bytes | str, *, max_size: int = DEFAULT_MAX_FRAME) -> object:
    """Decode one frame to plain data (dict, list, str, int…).

    Raises:
        RemoteProtocolError: ``bad_frame`` when the frame is too large or does not decode.
    """
    if len(data) > max_size:
        raise RemoteProtocolError(
            ErrorCode.BAD_FRAME, f"frame of {len(data)} exceeds the limit of {max_size}"
        )
    try:
        if isinstance(data, str):
            return _json_decoder.decode(data)
        if isinstance(data, bytes | bytearray | memoryview):
            return cbor2.loads(bytes(data))
    except Exception as exc:
        raise RemoteProtocolError(
            ErrorCode.BAD_FRAME, f"frame does not decode ({type(exc).__name__})"
        ) from None
    raise RemoteProtocolError(ErrorCode.BAD_FRAME, "a frame is bytes or text")


def decode_request(data: bytes | str, *, max_size: int = DEFAULT_MAX_FRAME) -> Request:
    """Decode and validate one client frame.

    Raises:
        RemoteProtocolError: with the code of what is wrong; never another exception.
    """
    raw = decode_map(data, max_size=max_size)
    try:
        return request_from_map(raw)
    except RemoteProtocolError:
        raise
    except Exception as exc:
        raise RemoteProtocolError(
            ErrorCode.BAD_REQUEST, f"invalid request ({type(exc).__name__})"
        ) from None


def encode_request(request: Request, encoding: Encoding) -> bytes | str:
    return encode_map(request_to_map(request), encoding)


def encode_frame(frame: ServerFrame, encoding: Encoding) -> bytes | str:
    return encode_map(frame_to_map(frame), encoding)


def private_frame_map(events: Iterable[Any], skipped: Sequence[int] = ()) -> dict[str, Any]:
    """The wire map of a ``private`` frame of ``events``: objects with ``seq``, ``kind``,
    ``priority``, ``ts`` and ``data``, such as :class:`PrivateEvent` or the router's
    sequenced events.

    The server's own events need no :class:`PrivateFrame` (and its validation) to be
    sent: the router and the session core have checked them already. The map is the
    one ``frame_to_map`` makes of the frame (``tests/test_protocol.py`` holds them equal).
    """
    out: dict[str, Any] = {
        "type": "private",
        "events": [
            {"seq": e.seq, "kind": e.kind, "priority": e.priority, "ts": e.ts, "data": e.data}
            for e in events
        ],
    }
    if skipped:
        out["skipped"] = list(skipped)
    return out


def decode_frame(data: bytes | str, *, max_size: int = 16 * 1024 * 1024) -> ServerFrame:
    """Decode one server frame (client side)."""
    return frame_from_map(decode_map(data, max_size=max_size))


class MarketFrameTemplate:
    """One market event for many subscribers, encoded once per encoding.

    Subscribers differ only in the per-channel ``seq`` of their frame, so the map
    is encoded once around that value and each subscriber's frame is the two
    halves with its own ``seq`` between them: :meth:`encode` returns exactly what
    :func:`encode_frame` returns for :meth:`frame` of the same ``seq``.

    Raises:
        ValueError, TypeError: the event does not make a valid :class:`MarketFrame`
            (checked once, here).
    """

    __slots__ = ("_after", "_before", "_cbor", "_frame", "_json")

    def __init__(self, *, channel: str, kind: str, ts: int, data: dict[str, Any]) -> None:
        self._frame = MarketFrame(channel=channel, seq=1, kind=kind, ts=ts, data=data)
        wire = frame_to_map(self._frame)
        keys = list(wire)
        at = keys.index("seq")
        #: The wire map's items before ``seq`` and after it.
        self._before = {k: wire[k] for k in keys[:at]}
        self._after = {k: wire[k] for k in keys[at + 1 :]}
        self._cbor: tuple[bytes, bytes] | None = None
        self._json: tuple[str, str] | None = None

    def frame(self, seq: int) -> MarketFrame:
        """The frame this template encodes for ``seq``."""
        return attrs.evolve(self._frame, seq=seq)

    def encode(self, seq: int, encoding: Encoding) -> bytes | str:
        """``encode_frame(self.frame(seq), encoding)``, without encoding the map again.

        Raises:
            Like :func:`encode_map` (the first time for an encoding).
        """
        if type(seq) is not int:  # a bool, an int subclass: as the encoders write it
            return encode_frame(self.frame(seq), encoding)
        if encoding is Encoding.CBOR:
            head, tail = self._cbor or self._cbor_halves()
            return head + _cbor_uint(seq) + tail
        text_head, text_tail = self._json or self._json_halves()
        return f"{text_head}{int.__repr__(seq)}{text_tail}"  # as the JSON encoder writes an int

    def _cbor_halves(self) -> tuple[bytes, bytes]:
        # A map is its header, then each key and value in turn: the two halves are the
        # items of two smaller maps without their headers.
        size = len(self._before) + 1 + len(self._after)
        assert size < 24  # maps this small have a one-byte header
        head = bytes([0xA0 + size]) + cbor2.dumps(self._before)[1:] + cbor2.dumps("seq")
        self._cbor = head, cbor2.dumps(self._after)[1:]
        return self._cbor

    def _json_halves(self) -> tuple[str, str]:
        halves = _json_halves(_json_encoder, self._before, self._after)
        text = halves[0] + halves[1]
        if not text.isascii():
            try:  # as encode_map: text UTF-8 cannot carry goes out escaped
                text.encode("utf-8")
            except UnicodeEncodeError:
                halves = _json_halves(_json_ascii_encoder, self._before, self._after)
        self._json = halves
        return halves


def _json_halves(
    encoder: json.JSONEncoder, before: dict[str, Any], after: dict[str, Any]
) -> tuple[str, str]:
    """The JSON text of the object ``before``, ``"seq": …``, ``after`` (compact
    separators) up to the value of ``seq``, and after it."""
    head = encoder.encode(before)[:-1]  # "{…" without its "}"
    tail = encoder.encode(after)[1:]  # "…}" without its "{"
    return (head + ("," if before else "") + '"seq":',
            ("," if after else "") + tail)


def _cbor_uint(n: int) -> bytes:
    """``cbor2.dumps(n)`` for an int, without an encoder object for the common sizes."""
    if 0 <= n < 24:
        return _CBOR_SMALL[n]
    if 24 <= n < 0x100:
        return b"\x18" + n.to_bytes(1, "big")
    if 0x100 <= n < 0x10000:
        return b"\x19" + n.to_bytes(2, "big")
    if 0x10000 <= n < 0x100000000:
        return b"\x1a" + n.to_bytes(4, "big")
    return cbor2.dumps(n)


_CBOR_SMALL: Final = [bytes((n,)) for n in range(24)]
