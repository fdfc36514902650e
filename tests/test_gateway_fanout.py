"""The gateway's fan-out encodes each frame as the protocol would, once where it can.

No engine and no sockets: engine output goes straight into ``Gateway._from_engine``
and each connection's frames are read from its outbound channel.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio

import protocol as p
from actors.cores.router import SequencedEvent
from actors.cores.session import SessionConfig
from actors.messages import Delivery
from gateway.cli import load_instruments
from gateway.server import Gateway, GatewayConfig, _Conn


@attrs.define
class _Options:
    gateway_id: str = "gw-test"


class _Bridge:
    """Takes requests and drops them: the tests feed the engine's output by hand."""

    def __init__(self) -> None:
        self.options = _Options()
        self.submitted: list[Any] = []

    def submit(self, dest: Any, item: Any) -> None:
        self.submitted.append((dest, item))


def _gateway(config: GatewayConfig | None = None) -> Gateway:
    return Gateway(_Bridge(), load_instruments(None), lambda u, pw: True,  # type: ignore[arg-type]
                   config)


def _connect(gw: Gateway, user: str | None, enc: p.Encoding | None) -> tuple[_Conn, Any]:
    send, receive = trio.open_memory_channel[bytes | str](1000)
    proto = p.ServerConnection(encoding=enc, instruments=gw.instruments)
    conn = _Conn(id=len(gw.conns) + 1, ws=None, proto=proto, send=send)  # type: ignore[arg-type]
    gw.conns[conn.id] = conn
    gw.hub.open(conn.id)
    if user is not None:
        gw.hub.login(conn.id, user, 0, last_seq=0)
        proto.login_succeeded(user)
    return conn, receive


def _frames(receive: Any) -> list[bytes | str]:
    out = []
    while True:
        try:
            out.append(receive.receive_nowait())
        except trio.WouldBlock:
            return out


def _event(seq: int, kind: str = "account_update", **data: Any) -> SequencedEvent:
    return SequencedEvent(user="alice", seq=seq, kind=kind, priority=p.EVENT_PRIORITY[kind],
                          ts=1_700_000_000_000_000_000 + seq, data=data, event_id=seq)


def test_a_users_sessions_get_the_private_frame_encoded_once_per_encoding() -> None:
    gw = _gateway()
    conns = [_connect(gw, "alice", enc)
             for enc in (p.Encoding.CBOR, p.Encoding.JSON, p.Encoding.CBOR, None)]
    _, bob = _connect(gw, "bob", p.Encoding.CBOR)
    events = (_event(1, balance="10.0000", note="é"), _event(2, "order_accepted", order_id=7))
    gw._from_engine([Delivery(user="alice", events=events)])
    expected = p.PrivateFrame(events=tuple(p.PrivateEvent(
        seq=e.seq, kind=e.kind, priority=e.priority, ts=e.ts, data=dict(e.data))
        for e in events))
    got = [_frames(receive) for _, receive in conns]
    for (conn, _), frames in zip(conns, got, strict=True):
        assert frames == [conn.proto.send(expected)]
    assert got[0][0] is got[2][0]  # one encoding for both CBOR sessions
    assert _frames(bob) == []
    assert gw.frames_out == 4


def test_a_session_that_conflated_gets_its_own_frame() -> None:
    # c2 does not ack: with a window of 1 its P2 updates are held, and conflated.
    gw = _gateway(GatewayConfig(session=SessionConfig(window=1)))
    (c1, r1), (_, r2) = (_connect(gw, "alice", p.Encoding.JSON) for _ in range(2))
    gw._from_engine([Delivery(user="alice", events=(_event(1, balance="1.0000"),))])
    gw.hub.ack(c1.id, 1)
    gw._from_engine([Delivery(user="alice", events=(_event(2, balance="2.0000"),
                                                     _event(3, balance="3.0000")))])
    gw._from_engine([Delivery(user="alice", events=(
        _event(4, "order_accepted", order_id=1),))])
    f1 = [p.decode_frame(f) for f in _frames(r1)]
    f2 = [p.decode_frame(f) for f in _frames(r2)]
    # The last delivery sends seqs 3 and 4 to both; only c2's frame announces 2 skipped.
    assert [[e.seq for e in f.events] for f in f1] == [[1], [2], [3, 4]]  # type: ignore[union-attr]
    assert [[e.seq for e in f.events] for f in f2] == [[1], [3, 4]]  # type: ignore[union-attr]
    assert [f.skipped for f in f1] == [(), (), ()]  # type: ignore[union-attr]
    assert [f.skipped for f in f2] == [(), (2,)]  # type: ignore[union-attr]


def _subscribe(gw: Gateway, conn: _Conn, channel: str) -> None:
    """As the gateway does on ``subscribe`` (and on the snapshot, for ``book``)."""
    conn.subs.add(channel)
    gw._subscribers.setdefault(channel, {})[conn.id] = conn


def test_market_subscribers_each_get_their_own_seq_in_the_frame_the_protocol_makes() -> None:
    gw = _gateway()
    subs = [_connect(gw, None, enc) for enc in (p.Encoding.CBOR, p.Encoding.JSON, None,
                                                p.Encoding.CBOR, p.Encoding.JSON)]
    (late, late_r), (gone, gone_r) = subs[3], subs[4]
    for conn, _ in subs:
        _subscribe(gw, conn, "trades.BTC-PERP")
    _subscribe(gw, subs[0][0], "ticker.BTC-PERP")
    late.chan_seq["trades.BTC-PERP"] = 40  # subscribed earlier: its seq is ahead
    gone.closed = True
    trades = [p.PublicTrade(symbol="BTC-PERP", trade_id=i, price=600_000 + i, qty=3,
                            taker_side="buy", ts=100 + i) for i in (1, 2)]
    ticker = p.TickerUpdate(symbol="BTC-PERP", last=600_002, best_bid=None,
                            best_ask=600_010, volume_24h=6, ts=103)
    gw._from_engine([*trades, ticker])
    inst = gw.instruments["BTC-PERP"]

    def trade_frame(t: p.PublicTrade, seq: int) -> p.MarketFrame:
        return p.MarketFrame(channel="trades.BTC-PERP", seq=seq, kind="trade", ts=t.ts, data={
            "trade_id": t.trade_id, "price": inst.price_str(t.price),
            "qty": inst.qty_str(t.qty), "taker_side": "buy"})

    for conn, receive in subs[:3]:
        want = [trade_frame(t, seq) for seq, t in enumerate(trades, 1)]
        if conn is subs[0][0]:
            want.append(p.MarketFrame(channel="ticker.BTC-PERP", seq=1, kind="ticker", ts=103,
                                      data={"last": "60000.2", "best_bid": None,
                                            "best_ask": "60001.0", "volume_24h": "0.006"}))
        assert _frames(receive) == [conn.proto.send(f) for f in want]
    assert _frames(late_r) == [late.proto.send(trade_frame(t, seq))
                               for seq, t in zip((41, 42), trades, strict=True)]
    assert _frames(gone_r) == []
    assert gw.trades == 2


def test_market_data_nobody_subscribed_to_still_moves_the_last_price() -> None:
    gw = _gateway()
    _, receive = _connect(gw, None, p.Encoding.JSON)
    gw._from_engine([p.PublicTrade(symbol="BTC-PERP", trade_id=1, price=612_345, qty=1,
                                   taker_side="sell", ts=1),
                     p.BookDelta(symbol="BTC-PERP", bids=((612_340, 5),), asks=(), ts=2)])
    assert _frames(receive) == []
    assert gw.trades == 1
    assert gw._last_price == {"BTC-PERP": 612_345}
