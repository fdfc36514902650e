"""The report of one simulation run: ``report.json``, ``report.md`` and PNG charts.

Everything here is a function of a :class:`~simulations.history.History` and the
invariant checks run on it (anything with ``name``, ``passed``, ``detail`` and
``figures`` — :class:`simulations.invariants.Check`), so a report can be built
from a hand-made or deliberately broken history.

Latencies go through an HdrHistogram (microseconds, 1 µs .. 120 s, 3 significant
digits) and are reported in milliseconds. Charts use matplotlib's object API on
the Agg canvas — never ``pyplot``'s global state — so reports can be written from
any thread.

Clocks: order and fault times, progress samples and ``started_ns``/``ended_ns``
are the harness's ``time.monotonic_ns()``; market records carry the engine's
wall-clock ``ts`` and the harness's ``time.time_ns()`` at receipt. The mid-price
chart puts ticker times on the monotonic axis of the faults with
``clock_offset_ns`` (wall - monotonic of the harness process).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

import attrs
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.markup import escape
from rich.table import Table

from .history import FaultRecord, History, MarketRecord
from .load import HIGHEST_US, LOWEST_US, histogram_ms, new_histogram

# -- the checks' shape -----------------------------------------------------------------


class CheckLike(Protocol):
    """What the report reads of one invariant check (:class:`simulations.invariants.Check`)."""

    @property
    def name(self) -> str: ...

    @property
    def passed(self) -> bool: ...

    @property
    def detail(self) -> str: ...

    @property
    def figures(self) -> Mapping[str, Any]: ...


# -- latency -----------------------------------------------------------------------------

#: The measures of :func:`latency_summary`, in report order.
MEASURES: Final = ("submit_to_ack", "submit_to_fill", "market_submit_to_fill",
                    "market_publish_to_receive")
#: Statistic keys of one measure, in report order (all in ms but ``count``).
STATS: Final = ("p50", "p90", "p99", "p999", "max", "count")
_PERCENTILES: Final = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9))


def _us(ns: int) -> int:
    """Nanoseconds → whole microseconds (rounded), clamped to the histogram's range.

    Negative spans (clock skew between engine and harness) count as 0; anything over
    120 s is recorded as 120 s rather than lost.
    """
    return min(max(0, (ns + 500) // 1000), HIGHEST_US)


def latency_samples(history: History) -> dict[str, list[int]]:
    """The raw samples of every measure, in microseconds (clamped as :func:`_us`)."""
    ack: list[int] = []
    fill: list[int] = []
    taker: list[int] = []
    for _, order in history.all_orders():
        if order.acked_ns is not None:
            ack.append(_us(order.acked_ns - order.submitted_ns))
        if order.first_fill_ns is not None:
            fill.append(_us(order.first_fill_ns - order.submitted_ns))
            if order.type == "market":
                taker.append(fill[-1])
    market = [_us(r.received_wall_ns - r.ts) for r in _market_records(history)]
    return {"submit_to_ack": ack, "submit_to_fill": fill, "market_submit_to_fill": taker,
            "market_publish_to_receive": market}


def _market_records(history: History) -> Iterable[MarketRecord]:
    for agent in history.agents.values():
        yield from agent.market
    yield from history.monitor


def _summarize(samples_us: Sequence[int]) -> dict[str, float | None]:
    hist = new_histogram()
    for v in samples_us:
        hist.record_value(v)
    return histogram_ms(hist, _PERCENTILES)


def latency_summary(history: History) -> dict[str, dict[str, float | None]]:
    """measure → {p50, p90, p99, p999, max (ms), count}; an empty measure has None values.

    * ``submit_to_ack``: ``acked_ns - submitted_ns`` of every acknowledged place,
      accepted or refused;
    * ``submit_to_fill``: ``first_fill_ns - submitted_ns`` of every order that filled
      (a resting order's includes the time it rested);
    * ``market_submit_to_fill``: the same for market orders only — the engine's own
      submit→fill-event path, with no waiting for a counterparty;
    * ``market_publish_to_receive``: ``received_wall_ns - ts`` of every market record
      of the agents and the monitor, clamped at 0.

    Values are HdrHistogram's (the highest value equivalent to the bucket: within
    0.1 % of the exact figure).
    """
    return {name: _summarize(samples) for name, samples in latency_samples(history).items()}


# -- the report map ----------------------------------------------------------------------

_NO_EXTRA: Final[Mapping[str, Any]] = MappingProxyType({})


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy: mappings get str keys, sets become sorted lists, Decimals and
    other objects strings, non-finite floats null."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [_jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return sorted(items, key=repr)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return str(value)


def duration_s(history: History) -> float:
    """Seconds from ``started_ns`` to ``ended_ns`` (0 when the run never ended)."""
    if history.ended_ns <= history.started_ns:
        return 0.0
    return (history.ended_ns - history.started_ns) / 1e9


def public_trade_ids(history: History) -> set[tuple[str, int]]:
    """(symbol, trade_id) of every public trade the monitor or an agent saw, live or
    in a trades snapshot.

    Trade ids are per book, hence the symbol.
    """
    out: set[tuple[str, int]] = set()
    for r in _market_records(history):
        if not r.channel.startswith("trades."):
            continue
        if r.kind == "trade":
            rows = [r.data]
        elif r.kind == "snapshot" and isinstance(r.data.get("trades"), list):
            rows = r.data["trades"]
        else:
            continue
        for row in rows:
            tid = row.get("trade_id") if isinstance(row, dict) else None
            if isinstance(tid, int):
                out.add((_symbol(r.channel), tid))
    return out


def _symbol(channel: str) -> str:
    return channel.split(".", 1)[1] if "." in channel else channel


def _fault_map(history: History, fault: FaultRecord) -> dict[str, Any]:
    return {
        "at_s": (fault.at_ns - history.started_ns) / 1e9,
        "kind": fault.kind,
        "target": fault.target,
        "ok": fault.ok,
        "detail": fault.detail,
    }


def _invariants(checks: Sequence[CheckLike]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for check in checks:
        name, n = check.name, 2
        while name in out:  # two checks of one name: keep both
            name, n = f"{check.name} ({n})", n + 1
        figures = getattr(check, "figures", None) or {}
        out[name] = {
            "passed": bool(check.passed),
            "detail": str(check.detail),
            "figures": _jsonable(figures),
        }
    return out


def build_report(
    history: History, checks: Sequence[CheckLike], *, extra: Mapping[str, Any] = _NO_EXTRA
) -> dict[str, Any]:
    """The ``report.json`` map of one run; ``extra`` is merged in last (it may override).

    ``passed`` is true when every check passed (vacuously true with no checks) and
    no agent was given up on as stuck.
    """
    orders = [o for _, o in history.all_orders()]
    acked = [o for o in orders if o.acked_ns is not None]
    duration = duration_s(history)
    invariants = _invariants(checks)
    refusals = Counter(o.error or "unknown" for o in acked if o.ok is False)
    trades = public_trade_ids(history)
    stuck = {user: a.stuck for user, a in sorted(history.agents.items())
             if a.stuck is not None}
    report: dict[str, Any] = {
        "scenario": history.scenario,
        "seed": history.seed,
        "agents": len(history.agents),
        "roles": dict(sorted(Counter(a.role for a in history.agents.values()).items())),
        "symbols": sorted(history.instruments),
        "duration_s": duration,
        "orders": len(orders),
        "orders_acked": len(acked),
        "orders_accepted": sum(1 for o in acked if o.ok),
        "orders_refused": sum(refusals.values()),
        "orders_unacked": len(orders) - len(acked),
        "orders_filled": sum(1 for o in orders if o.first_fill_ns is not None),
        "refusals": dict(sorted(refusals.items())),
        "orders_per_s": len(acked) / duration if duration > 0 else 0.0,
        "trades": len(trades),
        "trades_by_symbol": dict(sorted(Counter(s for s, _ in trades).items())),
        "faults": [_fault_map(history, f) for f in sorted(history.faults, key=lambda f: f.at_ns)],
        "invariants": invariants,
        "failed": [name for name, inv in invariants.items() if not inv["passed"]],
        "latency_ms": latency_summary(history),
        "reconnects": sum(a.reconnects for a in history.agents.values()),
        "gap_resumes": sum(a.gap_resumes for a in history.agents.values()),
        "dead_connections": sum(a.dead_connections for a in history.agents.values()),
        "duplicates_dropped": sum(a.duplicates_dropped for a in history.agents.values()),
        "stuck_agents": stuck,
        # An agent the run gave up on (stuck, see simulations.harness.FINISH_MAX_S)
        # fails the run even if the checks of what the others saw pass.
        "passed": all(inv["passed"] for inv in invariants.values()) and not stuck,
    }
    report.update(_jsonable(dict(extra)))
    return report


# -- charts ------------------------------------------------------------------------------

_FIGSIZE: Final = (6.0, 3.0)
_DPI: Final = 80


def _figure(rows: int = 1) -> tuple[Figure, list[Axes]]:
    height = _FIGSIZE[1] if rows == 1 else min(2.0 * rows, 12.0)
    fig = Figure(figsize=(_FIGSIZE[0], height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)
    return fig, [row[0] for row in axes]


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center",
            color="grey")


def _fault_lines(ax: Axes, faults: Sequence[tuple[float, str, bool]]) -> None:
    """A dashed vertical line per fault at its second, labelled by kind at the top."""
    for at_s, kind, ok in faults:
        color = "tab:red" if ok else "black"
        ax.axvline(at_s, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
        ax.text(at_s, 0.98, kind if ok else f"{kind} (failed)", transform=ax.get_xaxis_transform(),
                rotation=90, ha="right", va="top", fontsize=6, color=color)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=_DPI)


def _chart_latency(samples: Mapping[str, Sequence[int]], path: Path) -> None:
    fig, (ax,) = _figure()
    plotted = False
    for name in ("submit_to_ack", "submit_to_fill"):
        values = sorted(samples.get(name, ()))
        if not values:
            continue
        n = len(values)
        xs = [max(v, LOWEST_US) / 1000.0 for v in values]  # log axis: 0 → 1 µs
        ys = [(i + 1) / n for i in range(n)]
        ax.step(xs, ys, where="post", label=f"{name} (n={n})")
        plotted = True
    if plotted:
        ax.set_xscale("log")
        ax.set_ylim(0.0, 1.02)
        ax.legend(loc="lower right", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    else:
        _no_data(ax)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction ≤ x")
    ax.set_title("order latency CDF", fontsize=9)
    _save(fig, path)


def throughput_series(history: History) -> tuple[list[float], list[float]]:
    """(edges, rates) of acked orders per second between consecutive progress samples.

    ``edges`` are seconds since start, one more than ``rates`` (rate *i* holds from
    ``edges[i]`` to ``edges[i + 1]``); both empty without two distinct samples. The
    counts are cumulative from the start, so ``(started_ns, 0)`` is an implicit
    first sample.
    """
    samples = sorted(history.progress)
    if samples and samples[0][0] > history.started_ns:
        samples.insert(0, (history.started_ns, 0))
    edges: list[float] = []
    rates: list[float] = []
    for (t0, c0), (t1, c1) in itertools.pairwise(samples):
        if t1 <= t0:
            continue
        if not edges:
            edges.append((t0 - history.started_ns) / 1e9)
        edges.append((t1 - history.started_ns) / 1e9)
        rates.append((c1 - c0) * 1e9 / (t1 - t0))
    return edges, rates


def _chart_throughput(history: History, faults: Sequence[tuple[float, str, bool]],
                      path: Path) -> None:
    fig, (ax,) = _figure()
    edges, rates = throughput_series(history)
    if rates:
        ax.stairs(rates, edges, color="tab:blue", linewidth=1.2)
        ax.set_ylim(bottom=0.0)
        ax.grid(True, alpha=0.3)
    else:
        _no_data(ax)
    _fault_lines(ax, faults)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("orders/s")
    ax.set_title("throughput (acknowledged orders per second)", fontsize=9)
    _save(fig, path)


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        d = Decimal(str(value))
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def mid_series(history: History) -> dict[str, tuple[str, list[tuple[int, float]]]]:
    """symbol → (source, [(engine wall ns, price)]) from the monitor's records.

    The mid of each ticker record — ``(best_bid + best_ask) / 2`` when both sides
    are there, else ``last``; a symbol without ticker records falls back to its
    public trade prices (source ``"trade"``).
    """
    ticker: dict[str, list[tuple[int, float]]] = {}
    trades: dict[str, list[tuple[int, float]]] = {}
    for r in history.monitor:
        if r.kind == "ticker" and r.channel.startswith("ticker."):
            bid, ask = _decimal(r.data.get("best_bid")), _decimal(r.data.get("best_ask"))
            price = (bid + ask) / 2 if bid is not None and ask is not None \
                else _decimal(r.data.get("last"))
            points = ticker.setdefault(_symbol(r.channel), [])
            if price is not None:
                points.append((r.ts, float(price)))
        elif r.kind == "trade" and r.channel.startswith("trades."):
            price = _decimal(r.data.get("price"))
            if price is not None:
                trades.setdefault(_symbol(r.channel), []).append((r.ts, float(price)))
    out: dict[str, tuple[str, list[tuple[int, float]]]] = {}
    for symbol in sorted(set(ticker) | set(trades)):
        if ticker.get(symbol):
            out[symbol] = ("mid", sorted(ticker[symbol]))
        elif trades.get(symbol):
            out[symbol] = ("trade", sorted(trades[symbol]))
    return out


def _chart_mid(history: History, faults: Sequence[tuple[float, str, bool]], path: Path,
               clock_offset_ns: int) -> None:
    series = mid_series(history)
    fig, axes = _figure(max(1, len(series)))
    fig.suptitle("mid price per symbol", fontsize=9)
    end_s = duration_s(history)
    if not series:
        _no_data(axes[0])
        _fault_lines(axes[0], faults)
    for ax, (symbol, (source, points)) in zip(axes, series.items(), strict=False):
        xs = [(ts - clock_offset_ns - history.started_ns) / 1e9 for ts, _ in points]
        ys = [p for _, p in points]
        if end_s > xs[-1]:  # the last price holds to the end of the run
            xs, ys = [*xs, end_s], [*ys, ys[-1]]
        ax.step(xs, ys, where="post", linewidth=1.0)
        ax.set_ylabel(symbol if source == "mid" else f"{symbol}\n(last trade)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
        _fault_lines(ax, faults)
    axes[-1].set_xlabel("time since start (s)")
    _save(fig, path)


# -- files -------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ReportFiles:
    """The paths :func:`write_report` wrote."""

    json: Path
    markdown: Path
    latency_png: Path
    throughput_png: Path
    mid_price_png: Path

    def all(self) -> tuple[Path, ...]:
        return (self.json, self.markdown, self.latency_png, self.throughput_png,
                self.mid_price_png)

    @property
    def charts(self) -> tuple[Path, ...]:
        return (self.latency_png, self.throughput_png, self.mid_price_png)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.3f}"


def _md_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", "<br>")


def _figures_str(figures: Any) -> str:
    if isinstance(figures, Mapping):
        return ", ".join(f"{k}={json.dumps(v)}" for k, v in figures.items())
    return json.dumps(figures)


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: headline, summary, invariants, latency, throughput, faults, charts."""
    verdict = "PASS" if report.get("passed") else "FAIL"
    lines = [
        f"# {verdict} — scenario `{report.get('scenario')}`, seed {report.get('seed')}",
        "",
        "| | |",
        "|---|---:|",
        f"| agents | {report.get('agents', 0)} |",
        f"| duration | {report.get('duration_s', 0.0):,.2f} s |",
        f"| orders submitted | {report.get('orders', 0):,} |",
        f"| orders acknowledged | {report.get('orders_acked', 0):,} |",
        f"| orders refused | {report.get('orders_refused', 0):,} |",
        f"| throughput | {report.get('orders_per_s', 0.0):,.1f} orders/s |",
        f"| public trades | {report.get('trades', 0):,} |",
        f"| faults injected | {len(report.get('faults', ()))} |",
        f"| reconnects | {report.get('reconnects', 0):,} |",
        f"| live event gaps repaired (gateway / client resumes) | "
        f"{report.get('gap_repairs', 0) or 0:,} / {report.get('gap_resumes', 0):,} |",
        f"| book snapshots resent after a book restart | "
        f"{report.get('book_refreshes', 0) or 0:,} |",
        "",
        "## Invariants",
        "",
    ]
    invariants: Mapping[str, Mapping[str, Any]] = report.get("invariants", {})
    if invariants:
        lines += ["| check | result | detail | figures |", "|---|---|---|---|"]
        for name, inv in invariants.items():
            lines.append(
                f"| {_md_cell(name)} | {'pass' if inv.get('passed') else '**FAIL**'} "
                f"| {_md_cell(inv.get('detail', ''))} "
                f"| {_md_cell(_figures_str(inv.get('figures', {})))} |"
            )
    else:
        lines.append("No invariant checks ran.")
    lines += [
        "",
        "## Latency (ms)",
        "",
        "| measure | count | p50 | p90 | p99 | p99.9 | max |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    latency: Mapping[str, Mapping[str, float | None]] = report.get("latency_ms", {})
    for measure, s in latency.items():
        lines.append(
            f"| {measure} | {int(s.get('count') or 0):,} | "
            + " | ".join(_fmt_ms(s.get(k)) for k in ("p50", "p90", "p99", "p999", "max"))
            + " |"
        )
    lines += [
        "",
        "## Throughput",
        "",
        f"{report.get('orders_acked', 0):,} orders acknowledged in "
        f"{report.get('duration_s', 0.0):,.2f} s: "
        f"**{report.get('orders_per_s', 0.0):,.1f} orders/s**.",
        "",
    ]
    lines += _load_markdown(report.get("load"))
    lines += [
        "## Faults",
        "",
    ]
    faults: Sequence[Mapping[str, Any]] = report.get("faults", [])
    if faults:
        for f in faults:
            status = "ok" if f.get("ok") else "FAILED"
            detail = f" — {f['detail']}" if f.get("detail") else ""
            lines.append(f"- {f.get('at_s', 0.0):,.3f} s: `{f.get('kind')}` on "
                         f"`{f.get('target')}` ({status}){detail}")
    else:
        lines.append("No faults injected.")
    lines += [
        "",
        "## Charts",
        "",
        "![latency CDF](latency.png)",
        "",
        "![throughput](throughput.png)",
        "",
        "![mid price](mid_price.png)",
        "",
    ]
    return "\n".join(lines)


def _load_markdown(load: Mapping[str, Any] | None) -> list[str]:
    """The ``## Load`` section: the verdict, then CPU and event-loop lag per process."""
    if not load:
        return []
    verdict = str(load.get("verdict", ""))
    lines = ["## Load", "", f"{verdict[:1].upper()}{verdict[1:]}.", ""]

    processes: Sequence[Mapping[str, Any]] = load.get("processes", [])
    if processes:
        lines += ["| process | agents | CPU cores | loop lag p50 | p99 | max (ms) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for p in processes:
            lag: Mapping[str, float | None] = p.get("loop_lag_ms", {})
            lines.append(
                f"| {_md_cell(p.get('name'))} | {p.get('agents', 0):,} | "
                f"{p.get('cpu_cores', 0.0):.2f} | "
                + " | ".join(_fmt_ms(lag.get(k)) for k in ("p50", "p99", "max")) + " |")
        lines.append("")
    return lines


def write_report(
    directory: Path,
    history: History,
    checks: Sequence[CheckLike],
    *,
    extra: Mapping[str, Any] = _NO_EXTRA,
    clock_offset_ns: int | None = None,
) -> ReportFiles:
    """Write report.json, report.md, latency.png, throughput.png and mid_price.png.

    ``clock_offset_ns`` is ``time.time_ns() - time.monotonic_ns()`` of the harness
    process during the run, to place the engine's wall-clock ticker times on the
    monotonic axis of the faults; by default this process's current offset (right
    when the report is written by the process that ran the simulation).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if clock_offset_ns is None:
        clock_offset_ns = time.time_ns() - time.monotonic_ns()
    report = build_report(history, checks, extra=extra)
    files = ReportFiles(
        json=directory / "report.json",
        markdown=directory / "report.md",
        latency_png=directory / "latency.png",
        throughput_png=directory / "throughput.png",
        mid_price_png=directory / "mid_price.png",
    )
    files.json.write_text(json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n",
                          encoding="utf-8")
    files.markdown.write_text(render_markdown(report), encoding="utf-8")
    faults = [((f.at_ns - history.started_ns) / 1e9, f.kind, f.ok) for f in history.faults]
    _chart_latency(latency_samples(history), files.latency_png)
    _chart_throughput(history, faults, files.throughput_png)
    _chart_mid(history, faults, files.mid_price_png, clock_offset_ns)
    return files


# -- terminal ----------------------------------------------------------------------------


def render_table(report: Mapping[str, Any]) -> Table:
    """The final summary for the terminal: verdict, figures, invariants, latencies, faults."""
    passed = bool(report.get("passed"))
    verdict = "[bold green]PASS" if passed else "[bold red]FAIL"
    table = Table(
        title=f"{verdict}[/] — {escape(str(report.get('scenario')))} (seed {report.get('seed')})",
        show_header=False,
    )
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("agents", f"{report.get('agents', 0)}")
    table.add_row("duration", f"{report.get('duration_s', 0.0):,.2f} s")
    table.add_row("orders", f"{report.get('orders', 0):,} submitted, "
                            f"{report.get('orders_acked', 0):,} acked, "
                            f"{report.get('orders_refused', 0):,} refused")
    table.add_row("throughput", f"{report.get('orders_per_s', 0.0):,.1f} orders/s")
    table.add_row("trades", f"{report.get('trades', 0):,}")
    table.add_row("reconnects", f"{report.get('reconnects', 0):,}")
    table.add_row("gaps repaired", f"{report.get('gap_repairs', 0) or 0:,} by the gateway, "
                                   f"{report.get('gap_resumes', 0):,} by client resumes")
    table.add_row("book refreshes", f"{report.get('book_refreshes', 0) or 0:,} snapshots "
                                    "resent after a book restart")
    load: Mapping[str, Any] | None = report.get("load")
    if load:
        for p in load.get("processes", []):
            lag = p.get("loop_lag_ms", {})
            table.add_row(escape(str(p.get("name"))),
                          f"{p.get('cpu_cores', 0.0):.2f} CPU cores, loop lag "
                          f"p99 {_fmt_ms(lag.get('p99'))} ms")
        table.add_row("load", escape(str(load.get("verdict", ""))))
    table.add_section()
    invariants: Mapping[str, Mapping[str, Any]] = report.get("invariants", {})
    for name, inv in invariants.items():
        mark = "[green]✓ pass[/]" if inv.get("passed") else "[red]✗ FAIL[/]"
        detail = escape(str(inv.get("detail") or ""))
        table.add_row(escape(name), f"{mark} {detail}".rstrip())
    if not invariants:
        table.add_row("invariants", "none ran")
    table.add_section()
    latency: Mapping[str, Mapping[str, float | None]] = report.get("latency_ms", {})
    for measure, s in latency.items():
        if not s.get("count"):
            table.add_row(measure, "no samples")
            continue
        table.add_row(measure, f"p50 {_fmt_ms(s.get('p50'))}  p99 {_fmt_ms(s.get('p99'))}  "
                               f"p99.9 {_fmt_ms(s.get('p999'))}  max {_fmt_ms(s.get('max'))} ms"
                               f"  (n={int(s.get('count') or 0):,})")
    faults: Sequence[Mapping[str, Any]] = report.get("faults", [])
    if faults:
        table.add_section()
        for f in faults:
            status = "" if f.get("ok") else " [red](failed)[/]"
            table.add_row(f"fault @ {f.get('at_s', 0.0):,.2f} s",
                          escape(f"{f.get('kind')} → {f.get('target')}") + status)
    return table


__all__ = [
    "MEASURES",
    "STATS",
    "CheckLike",
    "ReportFiles",
    "build_report",
    "duration_s",
    "latency_samples",
    "latency_summary",
    "mid_series",
    "public_trade_ids",
    "render_markdown",
    "render_table",
    "throughput_series",
    "write_report",
]
