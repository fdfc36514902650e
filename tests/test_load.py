"""The load probe and verdict of a simulation report (simulations.load), without a run."""

from __future__ import annotations

import time

import trio
import trio.testing

from simulations.load import LAG_BEHIND_MS, LoadProbe, ProcessLoad, assess


def _process(name: str, p99: float | None, cpu_s: float = 1.0) -> ProcessLoad:
    return ProcessLoad(name=name, agents=10, cpu_s=cpu_s, wall_s=2.0,
                       lag_ms={"p50": p99, "p99": p99, "max": p99, "count": 0 if p99 is None
                               else 100})


async def test_the_probe_sees_a_busy_event_loop() -> None:
    probe = LoadProbe("this process", 3)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await trio.testing.wait_all_tasks_blocked()  # the probe is asleep
        probe.start()
        busy_until = time.perf_counter() + 0.06
        while time.perf_counter() < busy_until:  # the loop cannot run anyone for 60 ms
            pass
        await trio.testing.wait_all_tasks_blocked()  # the probe woke, late, and sleeps again
        load = probe.stop()  # and ends its task, so the nursery closes
    assert load.lag_ms["count"] >= 1
    assert load.lag_ms["max"] is not None and load.lag_ms["max"] >= 45.0, load.lag_ms
    assert load.behind
    assert load.cpu_s >= 0.05 and 0 < load.cpu_cores <= 2.0
    assert probe.stop() is load  # the window is closed once
    assert load.to_json()["name"] == "this process" and load.to_json()["agents"] == 3


async def test_lag_before_start_does_not_count() -> None:
    probe = LoadProbe("p", 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe.run)
        await trio.testing.wait_all_tasks_blocked()
        busy_until = time.perf_counter() + 0.03
        while time.perf_counter() < busy_until:
            pass
        await trio.testing.wait_all_tasks_blocked()
        probe.start()
        load = probe.stop()
    assert load.lag_ms["count"] == 0 and load.lag_ms["p99"] is None
    assert not load.behind


def test_a_lagging_process_makes_the_run_saturated() -> None:
    engine = _process("engine + gateway", 2.0)
    agents = _process("agents 0", 300.0, cpu_s=1.9)
    out = assess([engine, agents], nominal_per_s=6000.0, requests_per_s=1500.0)
    assert out["behind"] == ["agents 0"]
    assert out["verdict"].startswith("saturated: the event loop of agents 0 woke tasks up to "
                                     "300 ms late (p99; agents 0 at 0.95 CPU cores)")
    assert "1,500 requests/s, 25 % of their nominal 6,000" in out["verdict"]
    assert "waits for an answer" in out["verdict"]  # short of the nominal rate: say why
    assert out["share_of_nominal"] == 0.25
    assert [p["behind"] for p in out["processes"]] == [False, True]


def test_a_run_that_kept_up_says_so() -> None:
    out = assess([_process("engine + gateway + agents", LAG_BEHIND_MS / 2)],
                 nominal_per_s=120.0, requests_per_s=115.0)
    assert out["behind"] == []
    assert out["verdict"] == ("not saturated: every event loop woke its tasks within 5.0 ms "
                              "(p99); the agents sent 115 requests/s, 96 % of their nominal 120")


def test_no_nominal_rate_means_no_share() -> None:
    out = assess([_process("harness (monitor)", None)], nominal_per_s=0.0, requests_per_s=3.0)
    assert out["share_of_nominal"] is None
    assert out["verdict"] == "not saturated: every event loop woke its tasks within 0.0 ms (p99)"


def test_the_machine_probe_counts_the_cpu_of_the_processes_it_is_given() -> None:
    import os

    from simulations.load import MachineProbe

    probe = MachineProbe(lambda: [os.getpid()])
    probe.start()
    busy_until = time.perf_counter() + 0.12
    while time.perf_counter() < busy_until:  # this process: one core for 120 ms
        pass
    out = probe.stop()
    assert out["cores"] == os.cpu_count() and out["engine_processes"] == 1
    assert 0.5 <= out["engine_cpu_cores"] <= 1.5, out  # clock ticks are 10 ms
    assert out["busy_cores"] is not None and out["busy_cores"] >= 0.5, out
    assert MachineProbe().stop()["engine_cpu_cores"] is None  # no pids: not measured


def test_the_verdict_names_the_engines_processes_and_the_machine() -> None:
    machine = {"cores": 2, "busy_cores": 1.97, "engine_processes": 6,
               "engine_cpu_cores": 1.21}
    out = assess([_process("engine + gateway", 8.0), _process("agents 0", 51.0)],
                 nominal_per_s=1800.0, requests_per_s=320.0, machine=machine)
    assert out["machine"] == machine
    assert ("; the engine's 6 processes used 1.21 CPU cores; the machine was busy 1.97 "
            "of its 2 cores; the agents sent 320 requests/s") in out["verdict"]
