"""The two encodings of the same maps: CBOR (binary frames) and JSON (text frames).

``decode_*`` of arbitrary input either returns a valid message or raises
:class:`RemoteProtocolError` with a code from PROTOCOL.md; no other exception
escapes (``tests/test_codec.py`` proves it with hypothesis).
"""

from __future__ import annotations

import enum
import json
from typing import Any, Final

import cbor2

from ._errors import ErrorCode, RemoteProtocolError
from ._frames import ServerFrame, frame_from_map, frame_to_map
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


def decode_frame(data: bytes | str, *, max_size: int = 16 * 1024 * 1024) -> ServerFrame:
    """Decode one server frame (client side)."""
    return frame_from_map(decode_map(data, max_size=max_size))
