"""Record and replay: a live gateway session over real sockets, re-fed into a fresh
LocalEngine, gives the same trades, balances and P0/P1 event streams; a tampered
record does not."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from gateway_kit import client, running_gateway
from rich.console import Console

from actors.messages import AccountPlace
from gateway.bridge import (
    DIGESTS,
    BridgeOptions,
    EngineBridge,
    OpenAccounts,
    RecordedCall,
    RecordedInput,
    RecordError,
    RecordFooter,
    RecordReader,
    RecordWriter,
)
from simulations.replay import main, replay

EMPTY = hashlib.sha256(b"").hexdigest()


async def _ok(c: Any, op: str, **fields: Any) -> dict[str, Any]:
    r = await c.call(op, **fields)
    assert r.get("ok"), r
    result = r["result"]
    assert isinstance(result, dict)
    return result


async def record_session(path: Path) -> None:
    """Three users trade over real sockets: resting and crossing limit orders on two
    books, a partial fill, cancels, a cancel_all, a market order, queries."""
    async with running_gateway(record=str(path)) as gw:
        done = gw.bridge.open_account("erin")  # a typed call: recorded as data
        with trio.fail_after(10):
            await trio.to_thread.run_sync(done.wait, abandon_on_cancel=True)
        async with client(gw, "json") as alice, client(gw, "cbor") as bob, \
                client(gw, "json") as carol:
            for c, user in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
                await _ok(c, "login", user=user, password="pw")
            await _ok(alice, "place", client_order_id="a1", symbol="BTC-PERP", side="sell",
                      type="limit", price="60001.0", qty="0.005")
            await _ok(alice, "place", client_order_id="a2", symbol="BTC-PERP", side="sell",
                      type="limit", price="60003.0", qty="0.004")
            await _ok(carol, "place", client_order_id="c1", symbol="BTC-PERP", side="buy",
                      type="limit", price="59990.0", qty="0.006")
            buy = await _ok(bob, "place", client_order_id="b1", symbol="BTC-PERP", side="buy",
                            type="limit", price="60002.0", qty="0.003")
            assert buy["status"] == "filled"
            await _ok(alice, "cancel", client_order_id="a2")
            await _ok(carol, "place", client_order_id="c2", symbol="ETH-PERP", side="sell",
                      type="limit", price="3000.50", qty="0.50")
            await _ok(bob, "place", client_order_id="b2", symbol="ETH-PERP", side="buy",
                      type="limit", price="3001.00", qty="0.80")
            market = await _ok(alice, "place", client_order_id="a3", symbol="BTC-PERP",
                               side="sell", type="market", qty="0.002")
            assert market["status"] == "filled"
            await _ok(carol, "place", client_order_id="c3", symbol="ETH-PERP", side="sell",
                      type="limit", price="3005.00", qty="0.20")
            assert (await _ok(carol, "cancel_all"))["canceled"] >= 2
            await _ok(bob, "query", what="positions")
            await bob.events_until(8)
    # Leaving running_gateway stopped the bridge: the footer is written.


def _frames(path: Path) -> tuple[dict[str, Any], list[Any]]:
    with RecordReader(path) as reader:
        return reader.header, list(reader)


async def test_a_recorded_session_replays_to_the_same_digests(tmp_path: Path) -> None:
    path = tmp_path / "session.rec"
    await record_session(path)
    header, frames = _frames(path)
    assert header["format"] == "emporion-record"
    assert header["recovered_turns"] == 0
    footer = frames[-1]
    assert isinstance(footer, RecordFooter) and footer.error is None
    assert any(isinstance(f, RecordedCall) and f.call == OpenAccounts(users=("erin",))
               for f in frames)
    assert footer.balances is not None
    assert footer.balances["bob"]["positions"]["positions"], "bob traded: he holds positions"
    assert {"alice", "bob", "carol", "dave", "erin"} <= set(footer.users)

    result = replay(path)
    assert result.ok, (result.differences, result.notes)
    assert result.recorded == footer.digests
    for name in DIGESTS:
        assert result.replayed[name] == result.recorded[name] != EMPTY
    assert result.counts["trades"] == footer.counts["trades"] >= 3
    assert result.counts["events"] == footer.counts["events"] > 10
    assert result.counts["users"] == len(footer.users)

    out = io.StringIO()
    assert main(path, Console(file=out, width=120)) == 0
    text = out.getvalue()
    assert all(result.recorded[name][:16] in text for name in DIGESTS)  # type: ignore[index]


def _tamper_first_resting_sell(frames: list[Any]) -> list[Any]:
    """Lower the price of alice's first order (a resting sell that bob's buy hits)."""
    out: list[Any] = []
    done = False
    for f in frames:
        if not done and isinstance(f, RecordedInput):
            batches = []
            for host, items in f.batches:
                new_items = []
                for dest, item in items:
                    if (not done and isinstance(item, AccountPlace)
                            and item.order.client_order_id == "a1"):
                        assert item.order.price is not None
                        order = attrs.evolve(item.order, price=item.order.price - 5)
                        item = attrs.evolve(item, order=order)
                        done = True
                    new_items.append((dest, item))
                batches.append((host, tuple(new_items)))
            f = attrs.evolve(f, batches=tuple(batches))
        out.append(f)
    assert done, "the session placed a1"
    return out


async def test_a_tampered_input_is_caught(tmp_path: Path) -> None:
    path = tmp_path / "session.rec"
    await record_session(path)
    header, frames = _frames(path)
    forged = tmp_path / "forged.rec"
    writer = RecordWriter(forged, header)
    for f in _tamper_first_resting_sell(frames):
        writer.frame(f)
    writer.close()

    result = replay(forged)
    assert not result.ok
    assert not (result.matched["trades"] and result.matched["balances"])
    assert "trades" in result.differences
    assert "60001.0" not in result.differences["trades"]  # prices are ticks: 600010 vs 600005
    assert "600005" in result.differences["trades"]
    out = io.StringIO()
    assert main(forged, Console(file=out, width=120)) == 1
    assert "NO" in out.getvalue()


async def test_replaying_twice_gives_the_same_digests(tmp_path: Path) -> None:
    path = tmp_path / "session.rec"
    await record_session(path)
    first, second = replay(path), replay(path)
    assert first.replayed == second.replayed
    assert first.counts == second.counts
    assert first.ok and second.ok


async def test_a_torn_record_still_replays_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "session.rec"
    await record_session(path)
    data = path.read_bytes()
    torn = tmp_path / "torn.rec"
    torn.write_bytes(data[:-7])  # the footer's frame is cut short
    with RecordReader(torn) as reader:
        frames = list(reader)
        assert reader.truncated
    assert not any(isinstance(f, RecordFooter) for f in frames)
    result = replay(torn)
    assert result.matched["trades"] and result.matched["events"]
    assert not result.matched["balances"] and not result.ok
    assert any("no footer" in n for n in result.notes)

    bad = tmp_path / "bad.rec"
    bad.write_bytes(b"not a record at all")
    try:
        replay(bad)
    except RecordError:
        pass
    else:
        raise AssertionError("a non-record file was replayed")
    damaged = tmp_path / "damaged.rec"
    damaged.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    out = io.StringIO()
    assert main(damaged, Console(file=out, width=120)) == 2


async def test_a_recording_needs_the_engine_config(tmp_path: Path) -> None:
    path = tmp_path / "attached.rec"
    bridge = EngineBridge(BridgeOptions(base="multiprocTCPBase", admin_port=1, record=str(path)))
    with pytest.raises(RuntimeError, match="engine's config"):
        await bridge.start(lambda msgs: None)
    assert not path.exists()
