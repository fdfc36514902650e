"""How loaded each process of a run was, so that its latencies can be read honestly.

A simulation measures the engine with a load generator on the same machine. When
a process runs out of CPU, its trio event loop runs ready tasks late, and every
latency measured in that process grows by the wait, whoever caused it; and since
each agent waits for an answer before it draws its next pause (a closed loop),
the run then sends less than its scenario's nominal rate instead of queueing
without bound. Neither shows in the latency figures themselves.

So each process of a run — the harness process (which hosts the embedded engine
and gateway) and every agent process — runs a :class:`LoadProbe` over the trading
phase: its CPU time (``time.process_time``, every thread) and its **event-loop
lag**, how late a task that sleeps :data:`LAG_PERIOD_S` is woken (trio's
scheduler runs a woken task only when the tasks ahead of it yielded). The lag is
the direct measure: a loop that keeps up wakes the probe within a millisecond.
:func:`assess` turns the probes, the nominal and the achieved rate into the
report's ``load`` section and a one-line verdict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import trio
from hdrh.histogram import HdrHistogram

#: The probe's sleep. 100 wake-ups a second cost nothing measurable.
LAG_PERIOD_S: Final = 0.01
#: A process whose event loop wakes the probe this late (p99) or later is "behind":
#: every latency it measures may include that much waiting in the process itself.
LAG_BEHIND_MS: Final = 10.0
#: Below this share of the nominal rate the run is called short of its offered load.
SHORT_OF_NOMINAL: Final = 0.8

#: The range of the run's HdrHistograms, in µs (1 µs to 120 s), 3 significant digits.
LOWEST_US: Final = 1
HIGHEST_US: Final = 120_000_000
SIGNIFICANT: Final = 3


def new_histogram() -> HdrHistogram:
    """An empty histogram of microseconds over the run's range."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT)


def histogram_ms(hist: HdrHistogram,
                 percentiles: Sequence[tuple[str, float]]) -> dict[str, float | None]:
    """``{name: value at that percentile, max}`` in ms and ``count``, from a histogram of
    µs; the values are None when it is empty."""
    n = int(hist.get_total_count())
    out: dict[str, float | None] = {
        name: hist.get_value_at_percentile(pct) / 1000.0 if n else None
        for name, pct in percentiles}
    out["max"] = hist.get_max_value() / 1000.0 if n else None
    out["count"] = n
    return out


@attrs.define(kw_only=True)
class ProcessLoad:
    """One process over the trading phase."""

    name: str  # what runs there: "engine + gateway", "agents 0", ...
    agents: int  # simulated agents in this process
    cpu_s: float  # CPU seconds (all threads) over the window
    wall_s: float  # the window
    lag_ms: dict[str, float | None]  # p50, p99, max (ms) and count of the probe's lag

    @property
    def cpu_cores(self) -> float:
        """CPU used, in cores (1.0 = one core busy the whole window)."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def behind(self) -> bool:
        p99 = self.lag_ms.get("p99")
        return p99 is not None and p99 >= LAG_BEHIND_MS

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "agents": self.agents, "cpu_s": round(self.cpu_s, 3),
                "wall_s": round(self.wall_s, 3), "cpu_cores": round(self.cpu_cores, 3),
                "loop_lag_ms": self.lag_ms, "behind": self.behind}


class LoadProbe:
    """CPU time and event-loop lag of this process between :meth:`start` and :meth:`stop`.

    Run :meth:`run` as a task of the process's trio loop; only the lag measured
    between ``start`` and ``stop`` counts (connecting a thousand agents is not the
    trading phase), and ``stop`` ends the task.
    """

    def __init__(self, name: str, agents: int) -> None:
        self.name = name
        self.agents = agents
        self._hist = new_histogram()
        self._counting = False
        self._cpu0 = 0.0
        self._wall0 = 0.0
        self._result: ProcessLoad | None = None
        self._scope = trio.CancelScope()

    async def run(self) -> None:
        """Sleep :data:`LAG_PERIOD_S` over and over, recording how late each wake-up
        is, until :meth:`stop`."""
        hist = self._hist
        with self._scope:
            while True:
                before = trio.current_time()
                await trio.sleep(LAG_PERIOD_S)
                if self._counting:
                    late = trio.current_time() - before - LAG_PERIOD_S
                    hist.record_value(min(max(1, round(late * 1e6)), HIGHEST_US))

    def start(self) -> None:
        self._hist.reset()
        self._cpu0 = time.process_time()
        self._wall0 = time.monotonic()
        self._counting = True

    def stop(self) -> ProcessLoad:
        """The figures of the window (the same object if called again)."""
        if self._result is None:
            self._counting = False
            self._scope.cancel()
            lag = histogram_ms(self._hist, (("p50", 50.0), ("p99", 99.0)))
            self._result = ProcessLoad(
                name=self.name, agents=self.agents, cpu_s=time.process_time() - self._cpu0,
                wall_s=time.monotonic() - self._wall0, lag_ms=lag)
        return self._result


class MachineProbe:
    """The whole machine's busy CPU (``/proc/stat``) and, optionally, that of other
    processes by pid (``/proc/PID/stat``), between :meth:`start` and :meth:`stop`.

    A multi-process engine's hosts are not this run's trio processes, yet they take
    the same cores: without them a load section would blame the agents' process for
    a lag that the engine's CPU caused. A process that exits within the window (a
    killed host) leaves its CPU time out; one started within it (its successor)
    counts whole; ``stop`` says how many processes it found at the end. Where
    ``/proc`` is missing, the figures are None.
    """

    def __init__(self, pids: Callable[[], list[int]] | None = None) -> None:
        self._pids = pids
        self._machine0: tuple[int, int] | None = None
        self._procs0: dict[int, int] = {}
        self._wall0 = 0.0

    def start(self) -> None:
        self._wall0 = time.monotonic()
        self._machine0 = _machine_jiffies()
        self._procs0 = _process_jiffies(self._pids() if self._pids else [])

    def stop(self) -> dict[str, Any]:
        """``{cores, busy_cores, engine_processes, engine_cpu_cores}`` over the window
        (``engine_*`` None without pids)."""
        wall = time.monotonic() - self._wall0
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        cores = os.cpu_count() or 1
        busy: float | None = None
        end = _machine_jiffies()
        if self._machine0 is not None and end is not None and end[1] > self._machine0[1]:
            share = (end[0] - self._machine0[0]) / (end[1] - self._machine0[1])
            busy = round(share * cores, 3)
        out: dict[str, Any] = {"cores": cores, "busy_cores": busy,
                               "engine_processes": None, "engine_cpu_cores": None}
        if self._pids is not None and wall > 0:
            now = _process_jiffies(self._pids())
            # Started within the window (a re-created host): all of its time counts.
            used = sum(t - self._procs0.get(pid, 0) for pid, t in now.items())
            out["engine_processes"] = len(now)
            out["engine_cpu_cores"] = round(used / tick / wall, 3)
        return out


def _machine_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user/nice
    return total - idle, total


def _process_jiffies(pids: list[int]) -> dict[int, int]:
    """utime + stime of each pid still running, in clock ticks."""
    out: dict[int, int] = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[pid] = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return out


def assess(processes: Sequence[ProcessLoad], *, nominal_per_s: float,
           requests_per_s: float, machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's ``load`` section: the processes, the rates, and a verdict.

    Args:
        processes: the probes of the run's processes.
        nominal_per_s: the agents' decisions per second if every answer came at once
            (the sum of the scenario's per-agent rates).
        requests_per_s: places and cancels the agents actually sent, per second.
        machine: :meth:`MachineProbe.stop`'s figures, if measured.

    Returns:
        ``{nominal_requests_per_s, requests_per_s, share_of_nominal, processes,
        machine, behind, verdict}``; ``behind`` names the processes whose event loop
        lagged :data:`LAG_BEHIND_MS` or more at p99.
    """
    share = requests_per_s / nominal_per_s if nominal_per_s > 0 else None
    behind = [p for p in processes if p.behind]
    if behind:
        worst = max(behind, key=lambda p: p.lag_ms["p99"] or 0.0)
        names = ", ".join(p.name for p in behind)
        verdict = (f"saturated: the event loop of {names} woke tasks up to "
                   f"{worst.lag_ms['p99']:,.0f} ms late (p99; {worst.name} at "
                   f"{worst.cpu_cores:.2f} CPU cores), so the latencies include that "
                   "waiting inside the run's own processes")
    else:
        lags = [p.lag_ms["p99"] for p in processes if p.lag_ms["p99"] is not None]
        verdict = ("not saturated: every event loop woke its tasks within "
                   f"{max(lags, default=0.0):,.1f} ms (p99)")
    if machine:
        if machine.get("engine_cpu_cores") is not None:
            verdict += (f"; the engine's {machine['engine_processes']} processes used "
                        f"{machine['engine_cpu_cores']:.2f} CPU cores")
        if machine.get("busy_cores") is not None:
            verdict += (f"; the machine was busy {machine['busy_cores']:.2f} of its "
                        f"{machine['cores']} cores")
    if share is not None:
        verdict += (f"; the agents sent {requests_per_s:,.0f} requests/s, "
                    f"{100 * share:.0f} % of their nominal {nominal_per_s:,.0f}")
        if share < SHORT_OF_NOMINAL:
            verdict += " (each agent waits for an answer before its next decision)"
    return {
        "nominal_requests_per_s": round(nominal_per_s, 1),
        "requests_per_s": round(requests_per_s, 1),
        "share_of_nominal": None if share is None else round(share, 3),
        "processes": [p.to_json() for p in processes],
        "machine": machine,
        "behind": [p.name for p in behind],
        "verdict": verdict,
    }


__all__ = ["LAG_BEHIND_MS", "LAG_PERIOD_S", "LoadProbe", "MachineProbe", "ProcessLoad",
           "assess"]
