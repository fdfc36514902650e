"""The simulation report: latency figures, report.json, report.md, charts, terminal table."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from rich.console import Console

from simulations.history import AgentLog, FaultRecord, History, MarketRecord, PlacedOrder
from simulations.report import (
    MEASURES,
    STATS,
    ReportFiles,
    build_report,
    latency_summary,
    mid_series,
    public_trade_ids,
    render_markdown,
    render_table,
    throughput_series,
    write_report,
)

PNG = b"\x89PNG\r\n\x1a\n"
MS = 1_000_000
S = 1_000_000_000
T0 = 5_000 * S  # monotonic start
WALL0 = 1_700_000_000 * S  # wall clock at T0
OFFSET = WALL0 - T0  # wall - monotonic


@attrs.define
class FakeCheck:
    name: str
    passed: bool
    detail: str = ""
    figures: dict[str, Any] = attrs.field(factory=dict)


def order(i: int, *, at_ms: int, ack_ms: int | None, fill_ms: int | None = None,
          ok: bool = True) -> PlacedOrder:
    sub = T0 + at_ms * MS
    return PlacedOrder(
        client_order_id=f"c{i}", symbol="BTC-PERP", side="buy" if i % 2 else "sell",
        type="limit", qty=1, price=600_000, submitted_ns=sub,
        acked_ns=None if ack_ms is None else sub + ack_ms * MS,
        ok=None if ack_ms is None else ok,
        error=None if ok or ack_ms is None else "insufficient_margin",
        first_fill_ns=None if fill_ms is None else sub + fill_ms * MS,
    )


def market(channel: str, kind: str, seq: int, *, at_ms: int, latency_ms: int,
           data: dict[str, Any]) -> MarketRecord:
    ts = WALL0 + at_ms * MS
    return MarketRecord(channel=channel, seq=seq, kind=kind, epoch=1, ts=ts,
                        received_wall_ns=ts + latency_ms * MS, data=data)


def trade(seq: int, trade_id: int, *, at_ms: int, latency_ms: int, price: str) -> MarketRecord:
    return market("trades.BTC-PERP", "trade", seq, at_ms=at_ms, latency_ms=latency_ms,
                  data={"trade_id": trade_id, "price": price, "qty": "0.001",
                        "taker_side": "buy"})


def ticker(seq: int, *, at_ms: int, bid: str | None, ask: str | None,
           last: str | None) -> MarketRecord:
    return market("ticker.BTC-PERP", "ticker", seq, at_ms=at_ms, latency_ms=1,
                  data={"last": last, "best_bid": bid, "best_ask": ask, "volume_24h": "1"})


def make_history() -> History:
    """Two agents, 12 orders; ack latencies 1..10 ms (+ one refused at 20 ms, one unacked)."""
    maker = AgentLog(user="alice", role="maker", reconnects=1, gap_resumes=2)
    noise = AgentLog(user="bob", role="noise", reconnects=2)
    for i in range(1, 6):  # acks 1..5 ms, fills at 10*i ms
        maker.orders[f"c{i}"] = order(i, at_ms=100 * i, ack_ms=i, fill_ms=10 * i)
    for i in range(6, 11):  # acks 6..10 ms, no fills
        noise.orders[f"c{i}"] = order(i, at_ms=100 * i, ack_ms=i)
    noise.orders["c11"] = order(11, at_ms=1_200, ack_ms=20, ok=False)
    noise.orders["c12"] = order(12, at_ms=1_300, ack_ms=None)
    # an agent also sees trade 1 (the same public trade the monitor sees)
    maker.market.append(trade(1, 1, at_ms=150, latency_ms=4, price="60000.0"))
    monitor = [
        trade(1, 1, at_ms=150, latency_ms=2, price="60000.0"),
        trade(2, 2, at_ms=700, latency_ms=2, price="60010.0"),
        trade(3, 3, at_ms=1_100, latency_ms=-3, price="60005.0"),  # skewed clock: 0
        ticker(1, at_ms=0, bid="59990.0", ask="60010.0", last=None),  # mid 60000
        ticker(2, at_ms=800, bid=None, ask="60030.0", last="60020.0"),  # last 60020
        ticker(3, at_ms=1_500, bid="60000.0", ask="60001.0", last="60020.0"),  # 60000.5
    ]
    return History(
        seed=42, scenario="smoke", started_ns=T0, ended_ns=T0 + 2 * S,
        instruments={"BTC-PERP": ("0.1", "0.001")},
        agents={"alice": maker, "bob": noise},
        monitor=monitor,
        faults=[FaultRecord(at_ns=T0 + S, kind="kill_book", target="BTC-PERP", ok=True,
                            detail="restarted in 12 ms")],
        progress=[(T0 + S // 2, 5), (T0 + S, 10), (T0 + 3 * S // 2, 11), (T0 + 2 * S, 11)],
    )


CHECKS = [
    FakeCheck("cash conserved", True, "sum 0", {"delta": 0}),
    FakeCheck("books not crossed", True, "3 books", {"books": 3, "symbols": {"BTC-PERP"}}),
]


def approx(value: float) -> Any:
    return pytest.approx(value, rel=1e-3)  # HdrHistogram, 3 significant digits


def test_latency_figures() -> None:
    lat = latency_summary(make_history())
    assert list(lat) == list(MEASURES)
    assert all(list(s) == list(STATS) for s in lat.values())
    ack = lat["submit_to_ack"]  # 1..10 ms and 20 ms (the refusal counts)
    assert ack["count"] == 11
    assert ack["p50"] == approx(6.0)
    assert ack["p90"] == approx(10.0)
    assert ack["p99"] == approx(20.0)
    assert ack["p999"] == approx(20.0)
    assert ack["max"] == approx(20.0)
    fill = lat["submit_to_fill"]  # 10, 20, 30, 40, 50 ms
    assert fill["count"] == 5
    assert fill["p50"] == approx(30.0)
    assert fill["max"] == approx(50.0)
    assert lat["market_submit_to_fill"]["count"] == 0  # all of them limit orders
    h = make_history()
    filled = [o for _, o in h.all_orders() if o.first_fill_ns is not None]
    filled[0].type = "market"  # the 10 ms one
    taker = latency_summary(h)["market_submit_to_fill"]
    assert taker["count"] == 1
    first_fill = filled[0].first_fill_ns
    assert first_fill is not None
    assert taker["max"] == approx((first_fill - filled[0].submitted_ns) / 1e6)
    mkt = lat["market_publish_to_receive"]  # monitor 2, 2, 0, 1, 1, 1 and the agent's 4
    assert mkt["count"] == 7
    assert mkt["p50"] == approx(1.0)
    assert mkt["max"] == approx(4.0)
    assert mkt["p90"] == approx(2.0)  # 6th of the 7 sorted samples


def test_empty_measure_is_null() -> None:
    lat = latency_summary(History(seed=1, scenario="empty", started_ns=T0))
    for s in lat.values():
        assert s["count"] == 0
        assert all(s[k] is None for k in STATS if k != "count")


def test_report_keys_and_types_survive_json() -> None:
    report = build_report(make_history(), CHECKS, extra={"engine": "local", "params": (1, 2)})
    back = json.loads(json.dumps(report, allow_nan=False))
    assert back == report | {"params": [1, 2]}
    types = {
        "scenario": str, "seed": int, "agents": int, "duration_s": float, "orders": int,
        "orders_acked": int, "orders_per_s": float, "trades": int, "faults": list,
        "invariants": dict, "latency_ms": dict, "reconnects": int, "passed": bool,
    }
    for key, t in types.items():
        assert isinstance(back[key], t), key
    assert back["scenario"] == "smoke" and back["seed"] == 42
    assert back["agents"] == 2
    assert back["duration_s"] == 2.0
    assert back["orders"] == 12
    assert back["orders_acked"] == 11
    assert back["orders_refused"] == 1
    assert back["refusals"] == {"insufficient_margin": 1}
    assert back["orders_per_s"] == pytest.approx(5.5)
    assert back["trades"] == 3  # trade 1 seen twice counts once
    assert back["reconnects"] == 3
    assert back["gap_resumes"] == 2
    assert back["faults"] == [{"at_s": 1.0, "kind": "kill_book", "target": "BTC-PERP",
                               "ok": True, "detail": "restarted in 12 ms"}]
    assert back["invariants"]["books not crossed"] == {
        "passed": True, "detail": "3 books", "figures": {"books": 3, "symbols": ["BTC-PERP"]}}
    assert back["passed"] is True
    assert back["failed"] == []
    assert back["engine"] == "local"
    assert back["latency_ms"]["submit_to_fill"]["count"] == 5


def test_a_failing_check_fails_the_report() -> None:
    checks = [*CHECKS, FakeCheck("positions net to zero", False, "BTC-PERP: +3", {"net": 3})]
    report = build_report(make_history(), checks)
    assert report["passed"] is False
    assert report["failed"] == ["positions net to zero"]
    assert report["invariants"]["positions net to zero"]["passed"] is False
    md = render_markdown(report)
    assert md.startswith("# FAIL")
    assert "**FAIL**" in md
    assert render_markdown(build_report(make_history(), CHECKS)).startswith("# PASS")


def test_duplicate_check_names_are_kept() -> None:
    report = build_report(make_history(), [FakeCheck("x", True), FakeCheck("x", False)])
    assert set(report["invariants"]) == {"x", "x (2)"}
    assert report["passed"] is False


def test_series() -> None:
    h = make_history()
    edges, rates = throughput_series(h)
    assert edges == [0.0, 0.5, 1.0, 1.5, 2.0]  # (start, 0) is the implicit first sample
    assert rates == pytest.approx([10.0, 10.0, 2.0, 0.0])
    h.progress = [(T0, 0), (T0, 0), (T0 + S, 4)]
    assert throughput_series(h) == ([0.0, 1.0], [4.0])
    h.progress = [(T0 + S, 4)]
    assert throughput_series(h) == ([0.0, 1.0], [4.0])
    h.progress = [(T0, 0)]
    assert throughput_series(h) == ([], [])
    (source, points), = mid_series(h).values()
    assert source == "mid"
    assert [p for _, p in points] == [60000.0, 60020.0, 60000.5]


def test_write_report(tmp_path: Path) -> None:
    checks = [*CHECKS, FakeCheck("pipes | and\nnewlines", False, "a|b")]
    files = write_report(tmp_path / "out", make_history(), checks, extra={"note": "hi"},
                         clock_offset_ns=OFFSET)
    assert isinstance(files, ReportFiles)
    assert all(p.parent == tmp_path / "out" for p in files.all())
    assert [p.name for p in files.all()] == [
        "report.json", "report.md", "latency.png", "throughput.png", "mid_price.png"]
    report = json.loads(files.json.read_text())
    assert report["note"] == "hi" and report["passed"] is False
    assert files.json.read_text().startswith('{\n  "agents": 2,')  # indent 2, sorted keys
    md = files.markdown.read_text()
    for needle in ("# FAIL", "## Invariants", "## Latency (ms)", "submit_to_ack",
                   "## Throughput", "5.5 orders/s", "`kill_book` on `BTC-PERP`",
                   "pipes \\| and<br>newlines", "latency.png"):
        assert needle in md, needle
    for png in files.charts:
        data = png.read_bytes()
        assert data.startswith(PNG), png
        assert len(data) > 1_000


def test_empty_history_still_writes_everything(tmp_path: Path) -> None:
    empty = History(seed=0, scenario="empty", started_ns=T0)
    files = write_report(tmp_path, empty, [])
    report = json.loads(files.json.read_text())
    assert report["orders"] == 0 and report["trades"] == 0 and report["faults"] == []
    assert report["duration_s"] == 0.0 and report["orders_per_s"] == 0.0
    assert report["passed"] is True  # vacuously: no checks ran
    assert report["latency_ms"]["submit_to_ack"] == {
        "p50": None, "p90": None, "p99": None, "p999": None, "max": None, "count": 0}
    assert "No faults injected." in files.markdown.read_text()
    for png in files.charts:
        assert png.read_bytes().startswith(PNG)


def test_odd_data_still_renders(tmp_path: Path) -> None:
    """Faults but no samples; tickers without prices; a trades-only symbol; huge latencies."""
    h = History(seed=3, scenario="odd", started_ns=T0, ended_ns=T0 + S)
    h.faults.append(FaultRecord(at_ns=T0 + S // 3, kind="drop_client", target="bob", ok=False))
    h.monitor.append(ticker(1, at_ms=10, bid=None, ask=None, last=None))
    h.monitor.append(market("trades.ETH-PERP", "trade", 1, at_ms=5, latency_ms=1,
                            data={"trade_id": 9, "price": "3000.00", "qty": "1",
                                  "taker_side": "sell"}))
    log = AgentLog(user="bob", role="noise")
    log.orders["c1"] = order(1, at_ms=0, ack_ms=500_000, fill_ms=0)  # 500 s: clamped to 120 s
    h.agents["bob"] = log
    assert set(mid_series(h)) == {"ETH-PERP"}  # BTC tickers carried no price
    lat = latency_summary(h)
    assert lat["submit_to_ack"]["max"] == approx(120_000.0)
    assert lat["submit_to_fill"]["max"] == 0.0
    files = write_report(tmp_path, h, [], clock_offset_ns=OFFSET)
    for png in files.charts:
        assert png.read_bytes().startswith(PNG)
    assert "(FAILED)" in files.markdown.read_text()


def test_render_table() -> None:
    checks = [*CHECKS, FakeCheck("gapless [private]", False, "seq [3] missing")]
    report = build_report(make_history(), checks)
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(render_table(report))
    text = out.getvalue()
    for needle in ("FAIL", "smoke", "5.5 orders/s", "cash conserved", "gapless [private]",
                   "seq [3] missing", "submit_to_ack", "kill_book",
                   "0 by the gateway, 2 by client resumes"):
        assert needle in text, needle
    empty = build_report(History(seed=0, scenario="empty", started_ns=T0), [])
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(render_table(empty))
    assert "PASS" in out.getvalue() and "no samples" in out.getvalue()


def test_the_load_section_renders_in_both_summaries() -> None:
    from simulations.load import ProcessLoad, assess

    procs = [ProcessLoad(name="engine + gateway", agents=0, cpu_s=1.6, wall_s=2.0,
                         lag_ms={"p50": 1.0, "p99": 51.0, "max": 80.0, "count": 180}),
             ProcessLoad(name="agents 0", agents=1000, cpu_s=1.9, wall_s=2.0,
                         lag_ms={"p50": 23.0, "p99": 326.0, "max": 357.0, "count": 150})]
    load = assess(procs, nominal_per_s=6000.0, requests_per_s=1421.0)
    report = build_report(make_history(), CHECKS, extra={"load": load})
    assert json.loads(json.dumps(report))["load"]["behind"] == ["engine + gateway", "agents 0"]
    md = render_markdown(report)
    assert "## Load\n\nSaturated: the event loop of engine + gateway, agents 0 woke tasks up " \
           "to 326 ms late (p99; agents 0 at 0.95 CPU cores)" in md
    assert "| agents 0 | 1,000 | 0.95 | 23.000 | 326.000 | 357.000 |" in md
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(render_table(report))
    text = out.getvalue()
    assert "0.80 CPU cores, loop lag p99 51.000 ms" in text and "saturated: the event" in text
    assert "## Load" not in render_markdown(build_report(make_history(), CHECKS))


def test_trades_in_a_snapshot_count_once_with_the_live_ones() -> None:
    h = make_history()
    live = public_trade_ids(h)
    rows = [{"trade_id": tid, "price": "60000.0", "qty": "0.001", "taker_side": "buy",
             "ts": 1} for tid in (1, 99)]
    h.monitor.append(market("trades.BTC-PERP", "snapshot", 1, at_ms=5, latency_ms=1,
                            data={"trades": rows}))
    assert ("BTC-PERP", 1) in live
    assert public_trade_ids(h) == live | {("BTC-PERP", 99)}
