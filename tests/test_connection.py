"""The sans-I/O server connection: frames in → events out, the state table."""

from __future__ import annotations

import json

import cbor2
import pytest

import protocol as p
from protocol import ConnectionEvent, ConnectionState, ErrorCode


def _conn(instruments: dict[str, p.Instrument], **kw: object) -> p.ServerConnection:
    return p.ServerConnection(instruments=instruments, **kw)  # type: ignore[arg-type]


def _place(**over: object) -> str:
    base = {"op": "place", "id": 1, "client_order_id": "a", "symbol": "BTC-PERP",
            "side": "buy", "type": "limit", "price": "60000.1", "qty": "0.001"}
    base.update(over)
    return json.dumps(base)


def _error(event: object) -> p.ErrorResponse:
    assert isinstance(event, p.BadInput), event
    return event.response


def test_state_table_is_complete_and_strict() -> None:
    states = {s for s, _ in p.TRANSITIONS} | set(p.TRANSITIONS.values())
    assert states == set(ConnectionState)
    conn = p.ServerConnection()
    conn.close()
    with pytest.raises(p.LocalProtocolError):
        conn.login_succeeded("u")
    with pytest.raises(p.LocalProtocolError):
        conn.receive_frame('{"op":"ping"}')
    assert (ConnectionState.LOGGED_IN, ConnectionEvent.LOGIN_OK) not in p.TRANSITIONS


def test_private_ops_need_login(instruments: dict[str, p.Instrument]) -> None:
    conn = _conn(instruments)
    assert _error(conn.receive_frame(_place())).code is ErrorCode.NOT_LOGGED_IN
    assert _error(conn.receive_frame(_place())).id == 1
    assert _error(conn.receive_frame('{"op":"query","what":"account","id":2}')).code is (
        ErrorCode.NOT_LOGGED_IN
    )
    # Public ops work anonymously.
    assert isinstance(conn.receive_frame('{"op":"ping","id":3}'), p.Ping)
    assert isinstance(conn.receive_frame('{"op":"query","what":"instruments"}'), p.Query)
    assert isinstance(conn.receive_frame('{"op":"subscribe","channels":["book.BTC-PERP"]}'),
                      p.Subscribe)
    login = conn.receive_frame('{"op":"login","user":"alice","password":"pw","id":4}')
    assert isinstance(login, p.Login)
    conn.login_succeeded("alice")
    assert conn.state is ConnectionState.LOGGED_IN and conn.user == "alice"
    assert isinstance(conn.receive_frame(_place()), p.Place)
    again = conn.receive_frame('{"op":"login","user":"alice","password":"pw","id":5}')
    assert _error(again).code is ErrorCode.BAD_REQUEST


def test_place_is_checked_against_the_registry(instruments: dict[str, p.Instrument]) -> None:
    conn = _conn(instruments)
    conn.login_succeeded("u")
    assert _error(conn.receive_frame(_place(symbol="DOGE"))).code is ErrorCode.UNKNOWN_SYMBOL
    off = _error(conn.receive_frame(_place(price="60000.15", id=9)))
    assert (off.code, off.id) == (ErrorCode.INVALID_PRICE, 9)
    assert _error(conn.receive_frame(_place(qty="0.0001"))).code is ErrorCode.INVALID_QTY


def test_encoding_follows_the_first_frame(instruments: dict[str, p.Instrument]) -> None:
    conn = _conn(instruments)
    conn.receive_frame(cbor2.dumps({"op": "ping", "id": 1}))
    assert conn.encoding is p.Encoding.CBOR
    out = conn.send(p.Pong(id=1, ts=5))
    assert isinstance(out, bytes) and cbor2.loads(out) == {"type": "pong", "id": 1, "ts": 5}
    fixed = _conn(instruments, encoding=p.Encoding.JSON)
    fixed.receive_frame(cbor2.dumps({"op": "ping", "id": 1}))
    assert isinstance(fixed.send(p.Pong(id=1, ts=5)), str)


def test_repeated_abuse_asks_for_close_but_good_frames_forgive(
    instruments: dict[str, p.Instrument],
) -> None:
    conn = _conn(instruments, max_consecutive_bad=3)
    for _ in range(2):
        assert _error(conn.receive_frame(b"\xff")).code is ErrorCode.BAD_FRAME
    assert isinstance(conn.receive_frame('{"op":"ping"}'), p.Ping)
    assert not conn.should_close
    for _ in range(3):
        conn.receive_frame("{")
    assert conn.should_close
    assert p.POLICY_VIOLATION == 1008
    # Business errors (e.g. not logged in) are not abuse.
    polite = _conn(instruments, max_consecutive_bad=3)
    for _ in range(5):
        polite.receive_frame(_place())
    assert not polite.should_close


def test_oversized_frame_is_refused_and_connection_kept(
    instruments: dict[str, p.Instrument],
) -> None:
    conn = _conn(instruments, max_frame=100)
    assert _error(conn.receive_frame("x" * 101)).code is ErrorCode.BAD_FRAME
    assert isinstance(conn.receive_frame('{"op":"ping"}'), p.Ping)
    assert conn.state is ConnectionState.ANONYMOUS
