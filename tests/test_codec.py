"""The codec never raises anything but a typed protocol error (hypothesis)."""

from __future__ import annotations

import json
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import protocol as p
from protocol import ErrorCode, RemoteProtocolError

FIELD_NAMES = sorted(
    {"op", "id", "user", "password", "channels", "client_order_id", "symbol", "side",
     "type", "price", "qty", "tif", "post_only", "order_id", "what", "after_seq", "seq"}
)
OPS = [*p.REQUEST_TYPES, "nope", ""]

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False) | st.text(max_size=40)
    | st.sampled_from(["buy", "sell", "limit", "market", "gtc", "ioc", "fok", "0.1", "1",
                       "-1", "1e3", "BTC-PERP", "book.BTC-PERP", "instruments", "账户", "\x00"])
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS)},
    optional={name: values for name in FIELD_NAMES if name != "op"},
)
any_map = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), values, max_size=8)


def _decode_is_total(data: bytes | str) -> p.Request | None:
    try:
        req = p.decode_request(data)
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert exc.message and len(exc.message) < 400
        return None
    # A valid request re-encodes to an equal request: no half-validated objects.
    assert p.decode_request(p.encode_request(req, p.Encoding.of_frame(data))) == req
    return req


@settings(max_examples=1500)
@given(st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    _decode_is_total(data)


@settings(max_examples=1500)
@given(st.text(max_size=300))
def test_random_text(data: str) -> None:
    _decode_is_total(data)


@settings(max_examples=1500)
@given(request_like | any_map)
def test_random_maps_in_both_encodings(raw: dict[str, Any]) -> None:
    _decode_is_total(cbor2.dumps(raw))
    try:
        text = json.dumps(raw)
    except (ValueError, TypeError):
        return
    _decode_is_total(text)


@settings(max_examples=800)
@given(st.data())
def test_mutated_valid_frames(data: st.DataObject) -> None:
    valid = p.encode_request(
        p.Place(id=1, client_order_id="c1", symbol="BTC-PERP", side="buy", type="limit",
                price="60000.1", qty="0.001"),
        p.Encoding.CBOR,
    )
    assert isinstance(valid, bytes)
    buf = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if op == "flip" and buf:
            buf[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del buf[i:]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    _decode_is_total(bytes(buf))


def test_semantic_tags_and_oddities_are_typed_errors() -> None:
    nasty: list[bytes | str] = [
        cbor2.dumps({"op": "ping", "id": cbor2.CBORTag(1, 1.5)}),  # datetime tag
        cbor2.dumps({"op": "resume", "after_seq": cbor2.CBORTag(2, b"\x01" * 40)}),  # bignum
        b"\x9f" * 2000,  # deeply nested indefinite arrays
        "[" * 5000 + "]" * 5000,  # deeply nested JSON
        '{"op":"ping","id":1,"id":2}',  # duplicate keys: last wins, still valid
        '{"op":"ping","id":Infinity}',
        b"\xa1\x80\x01",  # a map whose key is a list
        "\udcff",  # a lone surrogate
        b"",
        "",
    ]
    for data in nasty:
        _decode_is_total(data)


def test_oversized_frames_are_bad_frames() -> None:
    big = json.dumps({"op": "ping", "id": "x" * 70_000})
    try:
        p.decode_request(big)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.BAD_FRAME
    else:  # pragma: no cover - the assertion is the test
        raise AssertionError("an oversized frame was accepted")


def test_the_same_map_in_both_encodings() -> None:
    frame = p.PrivateFrame(events=(
        p.PrivateEvent(seq=1, kind="trade_executed", priority=1, ts=2, data={"price": "1.5"}),
    ))
    assert json.loads(p.encode_frame(frame, p.Encoding.JSON)) == cbor2.loads(
        p.encode_frame(frame, p.Encoding.CBOR)
    )


# -- one market event for many subscribers ---------------------------------------------------

_market_data = st.dictionaries(
    st.text(max_size=8), values | st.floats() | st.just(object()), max_size=6)
_seqs = st.integers(min_value=1, max_value=2**64 + 5) | st.sampled_from(
    [1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, 2**64])


def _encoded(encode: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", encode(*args)
    except Exception as exc:
        return "raises", type(exc)


@settings(max_examples=400)
@given(channel=st.sampled_from(["book.BTC-PERP", "trades.ETH-PERP", "ticker.X"]) | st.text(),
       kind=st.sampled_from(["snapshot", "delta", "trade", "ticker"]), ts=st.integers(min_value=-(2**70), max_value=2**70),
       data=_market_data, seqs=st.lists(_seqs, min_size=1, max_size=4))
def test_the_market_template_encodes_what_encode_frame_does(
        channel: str, kind: str, ts: int, data: dict[str, Any], seqs: list[int]) -> None:
    template = p.MarketFrameTemplate(channel=channel, kind=kind, ts=ts, data=data)
    for seq in seqs:  # the halves are made once per encoding, then reused
        frame = p.MarketFrame(channel=channel, seq=seq, kind=kind, ts=ts, data=data)
        assert template.frame(seq) == frame
        for enc in p.Encoding:
            assert _encoded(template.encode, seq, enc) == _encoded(p.encode_frame, frame, enc)
            conn = p.ServerConnection(encoding=enc)
            assert conn.send_market(template, seq) == conn.send(frame)


def test_the_market_template_validates_the_event_once() -> None:
    with pytest.raises(ValueError):
        p.MarketFrameTemplate(channel="book.X", kind="nope", ts=1, data={})
    with pytest.raises(TypeError):
        p.MarketFrameTemplate(channel="book.X", kind="delta", ts="1", data={})  # type: ignore[arg-type]


def test_the_market_template_writes_a_bool_seq_as_the_encoders_do() -> None:
    template = p.MarketFrameTemplate(channel="book.X", kind="delta", ts=1, data={})
    for enc in p.Encoding:
        assert template.encode(True, enc) == p.encode_frame(template.frame(True), enc)
