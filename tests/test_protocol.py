"""Wire messages, decimal scales, instruments and the connection state machine (no I/O)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import cbor2
import pytest

import protocol as p
from protocol import ErrorCode, RemoteProtocolError


def _place(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "op": "place", "id": 7, "client_order_id": "c-1", "symbol": "BTC-PERP",
        "side": "buy", "type": "limit", "price": "60000.1", "qty": "0.002",
    }
    base.update(over)
    return base


def _code(raw: object) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as info:
        p.request_from_map(raw)
    return info.value.code


# -- decimals and instruments ----------------------------------------------------------


def test_price_and_qty_become_integers(instruments: dict[str, p.Instrument]) -> None:
    btc = instruments["BTC-PERP"]
    assert btc.price_to_ticks("60000.1") == 600001
    assert btc.qty_to_lots("0.002") == 2
    assert btc.price_str(600001) == "60000.1"
    assert btc.qty_str(2) == "0.002"
    es = instruments["ESZ6"]
    assert es.price_to_ticks("6000.25") == 24001
    assert es.notional(24001, 2) == 24001 * 2 * 125000


def test_a_reported_quantity_may_be_zero(instruments: dict[str, p.Instrument]) -> None:
    btc = instruments["BTC-PERP"]
    assert btc.qty_to_lots("0.000", zero_ok=True) == 0
    assert btc.qty_to_lots("0.002", zero_ok=True) == 2
    for bad in ("-0.001", "0.0015", "junk"):
        with pytest.raises(RemoteProtocolError) as info:
            btc.qty_to_lots(bad, zero_ok=True)
        assert info.value.code is ErrorCode.INVALID_QTY
    with pytest.raises(RemoteProtocolError):
        btc.qty_to_lots("0.000")  # an order's quantity is never zero


@pytest.mark.parametrize(
    ("price", "qty", "code"),
    [
        ("60000.15", "0.001", ErrorCode.INVALID_PRICE),  # off the tick grid
        ("60000.1", "0.0015", ErrorCode.INVALID_QTY),  # off the lot grid
        ("-1", "0.001", ErrorCode.INVALID_PRICE),
        ("0", "0.001", ErrorCode.INVALID_PRICE),
        ("60000.1", "-0.001", ErrorCode.INVALID_QTY),
        ("1e5", "0.001", ErrorCode.INVALID_PRICE),  # no exponents
        ("NaN", "0.001", ErrorCode.INVALID_PRICE),
        ("60000.1", 1, ErrorCode.INVALID_QTY),  # numbers are not decimal strings
        ("６０", "0.001", ErrorCode.INVALID_PRICE),  # unicode digits are junk
    ],
)
def test_off_grid_or_malformed_is_rejected_never_rounded(
    instruments: dict[str, p.Instrument], price: Any, qty: Any, code: ErrorCode
) -> None:
    btc = instruments["BTC-PERP"]

    def convert() -> None:
        btc.price_to_ticks(price)
        btc.qty_to_lots(qty)

    with pytest.raises(RemoteProtocolError) as info:
        convert()
    assert info.value.code is code


def test_band_and_wire_map(instruments: dict[str, p.Instrument]) -> None:
    btc = instruments["BTC-PERP"]
    assert btc.band(600000) == (540000, 660000)
    wire = btc.to_wire()
    assert wire["tick"] == "0.1" and wire["margin_rate"] == "0.05"
    assert wire["ref_price"] == "60000.0" and wire["status"] == "open"
    assert set(wire) >= {
        "symbol", "tick", "lot", "multiplier", "margin_rate", "maker_fee", "taker_fee",
        "ref_price", "price_band", "status",
    }


def test_registry_rejects_inconsistent_scales() -> None:
    with pytest.raises(ValueError, match="multiple"):
        p.parse_instruments(
            "[instruments.X]\ntick='0.00001'\nlot='0.00001'\nmargin_rate='0.1'\n"
            "maker_fee='0'\ntaker_fee='0'\nref_price='1'\nprice_band='0.1'\n"
            "position_limit='1'\n"
        )
    with pytest.raises(ValueError, match="missing field"):
        p.parse_instruments("[instruments.X]\ntick='0.1'\n")


def test_cash_units() -> None:
    assert p.cash_to_units("1000000") == 10_000_000_000
    assert p.cash_str(12345) == "1.2345"
    with pytest.raises(RemoteProtocolError):
        p.cash_to_units("0.00001")
    assert p.ratio_to_str(1, 3, 4) == "0.3333"
    assert p.from_units(5, Decimal("0.25")) == "1.25"


# -- requests --------------------------------------------------------------------------


def test_every_op_round_trips_through_its_map() -> None:
    requests: list[p.Request] = [
        p.Login(id=1, user="alice", password="pw"),
        p.Subscribe(id="s", channels=("book.BTC-PERP", "trades.ETH-PERP")),
        p.Unsubscribe(id=2.5, channels=("ticker.ESZ6",)),
        p.Place(id=3, client_order_id="x", symbol="BTC-PERP", side="sell", type="market",
                qty="1", tif="ioc"),
        p.Place(id=4, client_order_id="y", symbol="BTC-PERP", side="buy", type="limit",
                price="1.5", qty="1", post_only=True),
        p.Cancel(id=5, order_id=12),
        p.Cancel(id=6, client_order_id="y"),
        p.CancelAll(id=7), p.CancelAll(id=8, symbol="BTC-PERP"),
        p.Query(id=9, what="instruments"),
        p.Resume(id=10, after_seq=41),
        p.Ack(seq=41),
        p.Ping(id=None),
    ]
    for req in requests:
        assert p.request_from_map(p.request_to_map(req)) == req
        for enc in p.Encoding:
            assert p.decode_request(p.encode_request(req, enc)) == req


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ([], ErrorCode.BAD_FRAME),
        ("place", ErrorCode.BAD_FRAME),
        ({"id": 1}, ErrorCode.BAD_REQUEST),
        ({"op": 5}, ErrorCode.BAD_REQUEST),
        ({"op": "teleport"}, ErrorCode.UNKNOWN_OP),
        (_place(extra=1), ErrorCode.BAD_REQUEST),
        ({k: v for k, v in _place().items() if k != "qty"}, ErrorCode.BAD_REQUEST),
        (_place(side="long"), ErrorCode.BAD_REQUEST),
        (_place(type="stop"), ErrorCode.BAD_REQUEST),
        (_place(tif="day"), ErrorCode.BAD_REQUEST),
        (_place(client_order_id="x" * 37), ErrorCode.BAD_REQUEST),
        (_place(client_order_id="bad id"), ErrorCode.BAD_REQUEST),
        (_place(client_order_id="ünï"), ErrorCode.BAD_REQUEST),
        (_place(price=None), ErrorCode.INVALID_PRICE),
        (_place(type="market"), ErrorCode.INVALID_PRICE),
        (_place(qty="-1"), ErrorCode.INVALID_QTY),
        (_place(qty=1.5), ErrorCode.INVALID_QTY),
        (_place(post_only="yes"), ErrorCode.BAD_REQUEST),
        (_place(id=[1]), ErrorCode.BAD_REQUEST),
        (_place(id="i" * 65), ErrorCode.BAD_REQUEST),
        ({"op": "cancel", "order_id": 1, "client_order_id": "a"}, ErrorCode.BAD_REQUEST),
        ({"op": "cancel", "order_id": -3}, ErrorCode.BAD_REQUEST),
        ({"op": "cancel", "order_id": True}, ErrorCode.BAD_REQUEST),
        ({"op": "subscribe", "channels": "book.BTC-PERP"}, ErrorCode.BAD_REQUEST),
        ({"op": "subscribe", "channels": []}, ErrorCode.BAD_REQUEST),
        ({"op": "subscribe", "channels": ["depth.BTC-PERP"]}, ErrorCode.BAD_REQUEST),
        ({"op": "subscribe", "channels": ["book.x"] * 65}, ErrorCode.BAD_REQUEST),
        ({"op": "query", "what": "everything"}, ErrorCode.BAD_REQUEST),
        ({"op": "resume", "after_seq": "3"}, ErrorCode.BAD_REQUEST),
        ({"op": "resume", "after_seq": 2**64}, ErrorCode.BAD_REQUEST),
        ({"op": "login", "user": "", "password": "x"}, ErrorCode.BAD_REQUEST),
        ({"op": "login", "user": "a", "password": "x" * 257}, ErrorCode.BAD_REQUEST),
    ],
)
def test_malformed_requests_get_typed_codes(raw: object, code: ErrorCode) -> None:
    assert _code(raw) is code


def test_error_echoes_a_valid_id_only() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        p.request_from_map(_place(qty="x"))
    assert info.value.request_id == 7
    with pytest.raises(RemoteProtocolError) as info:
        p.request_from_map({"op": "nope", "id": {"a": 1}})
    assert info.value.request_id is None


@pytest.mark.parametrize("bad_id", [
    float("nan"), float("inf"), float("-inf"),  # CBOR carries them, strict JSON does not
    "\ud800", "ok\udfff", "\udbff\udc00",  # lone surrogates: UTF-8 cannot carry them
])
def test_an_id_either_encoding_cannot_carry_is_refused(bad_id: object) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        p.request_from_map({"op": "ping", "id": bad_id})
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.request_id is None  # not echoed: it could not be
    # Finite floats and astral characters (a proper pair, not a surrogate) are fine.
    for good in (-0.0, 1e308, "\U0001f4a9", "é"):
        assert p.request_from_map({"op": "ping", "id": good}) == p.Ping(id=good)


def test_place_converts_to_engine_command(instruments: dict[str, p.Instrument]) -> None:
    req = p.request_from_map(_place())
    assert isinstance(req, p.Place)
    order = req.to_new_order(instruments["BTC-PERP"], order_id=9, user="u", ts=5)
    assert (order.price, order.qty, order.side, order.tif) == (600001, 2, "buy", "gtc")
    with pytest.raises(RemoteProtocolError) as info:
        p.Place(**{k: v for k, v in _place(price="0.05").items() if k != "op"}).to_new_order(
            instruments["BTC-PERP"], order_id=9, user="u", ts=5
        )
    assert info.value.code is ErrorCode.INVALID_PRICE


def test_the_connection_refuses_unencodable_ids_in_either_encoding() -> None:
    for enc, frame in [(p.Encoding.CBOR, '{"op":"ping","id":"\\ud800"}'),
                       (p.Encoding.JSON, cbor2.dumps({"op": "ping", "id": float("nan")}))]:
        conn = p.ServerConnection(encoding=enc)
        refusal = conn.receive_frame(frame)
        assert isinstance(refusal, p.BadInput)
        assert refusal.response.code is ErrorCode.BAD_REQUEST
        assert refusal.response.id is None
        out = conn.send(refusal.response)
        assert conn.encode_errors == 0
        assert p.decode_frame(out) == refusal.response


# -- server frames -------------------------------------------------------------------------


def test_json_text_is_always_utf8_encodable() -> None:
    # A lone surrogate can only come from a JSON escape; it goes out escaped again.
    frame = p.Pong(id="a\ud800", ts=1)  # built directly: validation would refuse it
    text = p.encode_frame(frame, p.Encoding.JSON)
    assert isinstance(text, str)
    text.encode("utf-8")
    assert p.decode_frame(text) == frame
    assert p.encode_frame(p.Pong(id="é", ts=1), p.Encoding.JSON) == '{"type":"pong","id":"é","ts":1}'


@pytest.mark.parametrize(("enc", "frame"), [
    (p.Encoding.JSON, p.Response(id=1, result={"x": float("nan")})),  # strict JSON
    (p.Encoding.CBOR, p.Pong(id="\ud800", ts=1)),  # UTF-8 has no lone surrogate
    (p.Encoding.CBOR, p.Response(id=2, result={"x": object()})),
    (p.Encoding.JSON, p.Response(id=3, result={"x": object()})),
])
def test_send_never_raises_an_encode_error(enc: p.Encoding, frame: p.ServerFrame) -> None:
    conn = p.ServerConnection(encoding=enc)
    out = conn.send(frame)
    assert conn.encode_errors == 1
    answer = p.decode_frame(out)
    assert answer == p.ErrorResponse(id=None, code=ErrorCode.INTERNAL, message=(
        "the server could not encode a frame for this connection"))


def test_server_frames_round_trip_in_both_encodings() -> None:
    frames: list[p.ServerFrame] = [
        p.Response(id=7, result={"order_id": 1, "status": "new"}),
        p.ErrorResponse(id=8, code=ErrorCode.INSUFFICIENT_FUNDS, message="need more"),
        p.PrivateFrame(events=(
            p.PrivateEvent(seq=41, kind="order_accepted", priority=1, ts=10, data={"a": "1"}),
            p.PrivateEvent(seq=42, kind="account_update", priority=2, ts=11, data={}),
        )),
        p.MarketFrame(channel="book.BTC-PERP", seq=3, kind="delta", ts=1,
                      data={"bids": [["1.0", "2"]], "asks": []}),
        p.Notice(kind="halt", data={"symbol": "BTC-PERP"}),
        p.Pong(id=9, ts=123),
    ]
    for frame in frames:
        for enc in p.Encoding:
            assert p.decode_frame(p.encode_frame(frame, enc)) == frame
    assert p.frame_to_map(frames[1]) == {
        "type": "response", "id": 8, "ok": False,
        "error": {"code": "insufficient_funds", "message": "need more"},
    }


def test_private_frame_must_be_in_seq_order() -> None:
    e1 = p.PrivateEvent(seq=2, kind="order_filled", priority=1, ts=0)
    e2 = p.PrivateEvent(seq=1, kind="order_filled", priority=1, ts=0)
    with pytest.raises(ValueError, match="increasing"):
        p.PrivateFrame(events=(e1, e2))


def test_event_data_types_validate() -> None:
    data = p.event_data("trade_executed", {
        "trade_id": 1, "order_id": 2, "symbol": "S", "side": "buy", "price": "1",
        "qty": "1", "fee": "0.1", "liquidity": "maker", "future_field": 1,
    })
    assert isinstance(data, p.TradeData)
    with pytest.raises(RemoteProtocolError):
        p.event_data("trade_executed", {"trade_id": "x"})
    with pytest.raises(RemoteProtocolError):
        p.event_data("unknown_kind", {})
    assert set(p.EVENT_DATA_TYPES) == set(p.EVENT_PRIORITY)


def test_user_event_priorities_follow_the_protocol() -> None:
    assert p.UserEvent(user="u", event_id=1, kind="margin_call", ts=0).priority == 0
    assert p.UserEvent(user="u", event_id=1, kind="order_filled", ts=0).priority == 1
    assert p.UserEvent(user="u", event_id=1, kind="position_update", ts=0).priority == 2
    assert p.UserEvent(user="u", event_id=1, kind="system_notice", ts=0).priority == 3
    with pytest.raises(ValueError, match="unknown"):
        p.UserEvent(user="u", event_id=1, kind="gossip", ts=0)


def test_protocol_errors_pickle_with_their_code_and_request_id() -> None:
    import pickle

    exc = RemoteProtocolError(ErrorCode.INVALID_QTY, "qty off grid")
    exc.request_id = 12
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is RemoteProtocolError
    assert (back.code, back.message, back.request_id) == (ErrorCode.INVALID_QTY, "qty off grid", 12)


def test_private_frame_announces_conflated_seqs() -> None:
    frame = p.PrivateFrame(
        events=(p.PrivateEvent(seq=9, kind="account_update", priority=2, ts=1),), skipped=(7, 8)
    )
    for enc in p.Encoding:
        assert p.decode_frame(p.encode_frame(frame, enc)) == frame
    assert p.frame_to_map(frame)["skipped"] == [7, 8]
    plain = p.PrivateFrame(events=frame.events)
    assert "skipped" not in p.frame_to_map(plain)


class _Sequenced:
    """A router-style sequenced event: the attributes a private frame reads, no validation."""

    def __init__(self, seq: int, kind: str, priority: int, ts: int, data: dict[str, Any]) -> None:
        self.seq, self.kind, self.priority, self.ts, self.data = seq, kind, priority, ts, data


@pytest.mark.parametrize("enc", [None, *p.Encoding])
@pytest.mark.parametrize("skipped", [(), (3, 4)])
def test_send_private_is_send_of_the_private_frame(enc: p.Encoding | None,
                                                   skipped: tuple[int, ...]) -> None:
    data: dict[str, Any] = {"order_id": 1, "price": "60000.1", "note": "é\u2603", "code": None}
    events = [_Sequenced(5, "order_accepted", 1, 10, data),
              _Sequenced(6, "account_update", 2, 11, {"balance": "1.0000"})]
    frame = p.PrivateFrame(events=tuple(p.PrivateEvent(
        seq=e.seq, kind=e.kind, priority=e.priority, ts=e.ts, data=dict(e.data))
        for e in events), skipped=skipped)
    conn = p.ServerConnection(encoding=enc)
    out = conn.send_private(events, skipped)
    assert out == conn.send(frame)
    assert type(out) is (bytes if enc is p.Encoding.CBOR else str)
    assert p.private_frame_map(events, skipped) == p.frame_to_map(frame)
    assert conn.encode_errors == 0


@pytest.mark.parametrize(("enc", "data"), [
    (p.Encoding.JSON, {"x": float("nan")}),
    (p.Encoding.CBOR, {"x": "\ud800"}),
    (p.Encoding.CBOR, {"x": object()}),
    (p.Encoding.JSON, {"x": object()}),
])
def test_send_private_never_raises_an_encode_error(enc: p.Encoding, data: dict[str, Any]) -> None:
    conn = p.ServerConnection(encoding=enc)
    out = conn.send_private([_Sequenced(1, "account_update", 2, 1, data)])
    assert conn.encode_errors == 1
    assert p.decode_frame(out) == p.ErrorResponse(id=None, code=ErrorCode.INTERNAL, message=(
        "the server could not encode a frame for this connection"))


def test_send_private_escapes_text_utf8_cannot_carry() -> None:
    events = [_Sequenced(1, "system_notice", 0, 1, {"kind": "resync", "message": "a\ud800"})]
    conn = p.ServerConnection(encoding=p.Encoding.JSON)
    out = conn.send_private(events)
    assert isinstance(out, str) and out.isascii()
    assert out == p.encode_frame(p.PrivateFrame(events=(p.PrivateEvent(
        seq=1, kind="system_notice", priority=0, ts=1, data=events[0].data),)), p.Encoding.JSON)
