"""The simulation harness end to end (real gateway, real sockets) and its scenarios."""

from __future__ import annotations

import json
import re
from pathlib import Path

import attrs
import pytest
import trio
from rich.console import Console

from gateway.cli import instruments_toml
from protocol import parse_instruments
from simulations import harness
from simulations.harness import SimOptions, simulate
from simulations.invariants import Check
from simulations.scenario import (
    ENGINE_FAULTS,
    FAULT_KINDS,
    ScenarioError,
    builtin_names,
    load_scenario,
    parse_scenario,
)


def test_the_shipped_scenarios_load() -> None:
    assert builtin_names() == ["basic", "faults", "stress"]
    faults = load_scenario("faults")
    kinds = {f.kind for f in faults.faults}
    # Each actor kind is killed at least once, plus client drops and an engine restart.
    assert {"kill_book", "kill_account", "kill_router", "kill_session", "drop_client",
            "restart_engine"} <= kinds
    assert load_scenario("stress").agents == 1000


@pytest.mark.parametrize(("text", "message"), [
    ("[run]\nagents = 0\n", "agents"),
    ("[run]\nagents = 5\nseconds = -1\n", "seconds"),
    ("[run]\nbogus = 1\n", "bogus"),
    ("[mix]\nwizard = 1\n", "wizard"),
    ("[[faults]]\nat = 1\nkind = 'meteor'\n", "meteor"),
    ("[[faults]]\nat = -2\nkind = 'kill_book'\n", "at"),
    ("[run]\ndeposit = 'lots'\n", "deposit"),
    ("not toml [", "TOML"),
])
def test_bad_scenarios_name_the_field(text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(text, name="t")


def test_unknown_scenario_lists_the_shipped_ones() -> None:
    with pytest.raises(ScenarioError, match="basic, faults, stress"):
        load_scenario("nope")


def test_roles_follow_the_mix_deterministically() -> None:
    sc = parse_scenario("[run]\nagents = 10\n[mix]\nmaker = 1\nnoise = 1\n", name="t")
    roles = sc.roles()
    assert roles.count("maker") == 5 and roles.count("noise") == 5
    assert roles == sc.roles()
    assert roles[:2] == ["maker", "noise"]  # interleaved: any prefix has the mix


async def test_a_short_simulation_with_every_fault_passes_every_invariant(
        tmp_path: Path) -> None:
    sc = load_scenario("faults")
    # Compress the schedule: 50 agents, a few seconds, one fault of each kind.
    faults = tuple(attrs.evolve(f, at=0.5 + 0.35 * i) for i, f in enumerate(sc.faults))
    sc = attrs.evolve(sc, agents=50, seconds=5.0, faults=faults)
    assert {f.kind for f in sc.faults} == set(FAULT_KINDS)
    with open(tmp_path / "console.txt", "w") as out:
        result = await simulate(SimOptions(scenario=sc, report_dir=tmp_path / "report",
                                           data_dir=tmp_path / "data", live=False),
                                Console(file=out))
    failed = {c.name: c.detail for c in result.checks if not c.passed}
    assert not failed, failed
    assert len(result.checks) >= 7
    h = result.history
    assert len(h.agents) == 50
    # Every engine fault happened and was recovered from.
    done = {f.kind for f in h.faults if f.ok}
    assert set(ENGINE_FAULTS) <= done, h.faults
    assert result.report["host_restarts"] == {
        k: 1 for k in result.report["host_restarts"]}  # each killed host came back once
    assert len(result.report["host_restarts"]) == 3  # a book, an account, the router
    assert result.report["engine_restarts"] == 1
    assert result.report["reconnects"] >= 50  # the engine restart reconnected everyone
    # Real trading happened around the faults.
    assert result.report["trades"] > 10
    assert result.report["orders_acked"] > 100
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["passed"] is True
    assert set(report["latency_ms"]) >= {"submit_to_ack", "submit_to_fill"}
    live = report["live_checks"]  # the monitor's stream, checked while it ran
    assert live["passed"] is True and live["violations"] == 0 and live["frames"] > 100, live
    for chart in ("latency.png", "throughput.png", "mid_price.png"):
        assert (tmp_path / "report" / chart).read_bytes().startswith(b"\x89PNG")
    # The agents ran in this process: one probe covers engine, gateway and agents.
    load = report["load"]
    assert [(p["name"], p["agents"]) for p in load["processes"]] == [
        ("engine + gateway + agents", 50)]
    assert load["processes"][0]["loop_lag_ms"]["count"] > 100  # ~100 wake-ups a second
    assert load["requests_per_s"] > 0 and load["nominal_requests_per_s"] == sum(
        sc.rates[role] for role in sc.roles())
    assert "## Load" in (tmp_path / "report" / "report.md").read_text()


async def test_agents_in_a_client_process_report_their_own_load(tmp_path: Path) -> None:
    sc = attrs.evolve(load_scenario("basic"), agents=6, seconds=1.5, market_data="shared")
    with open(tmp_path / "console.txt", "w") as out:
        result = await simulate(SimOptions(scenario=sc, data_dir=tmp_path / "data",
                                           processes=1, live=False), Console(file=out))
    assert result.passed, [(c.name, c.detail) for c in result.checks if not c.passed]
    assert len(result.history.agents) == 6 and result.report["orders_acked"] > 0
    # One shared ticker feed for the process, logged under its first agent.
    tickers = {a.user: sum(r.kind == "ticker" for r in a.market)
               for a in result.history.agents.values()}
    first = result.history.agents[min(tickers)].user
    assert tickers.pop(first) > 0 and set(tickers.values()) == {0}, tickers
    load = result.report["load"]
    harness_proc, agents_proc = load["processes"]
    assert (harness_proc["name"], harness_proc["agents"]) == ("engine + gateway", 0)
    assert (agents_proc["name"], agents_proc["agents"]) == ("agents 0", 6)
    for proc in (harness_proc, agents_proc):
        assert proc["loop_lag_ms"]["count"] > 10 and proc["cpu_s"] > 0, proc
        assert 1.0 < proc["wall_s"] < 10.0
    sent = sum(len(a.orders) + a.cancels for a in result.history.agents.values())
    assert load["requests_per_s"] == round(sent / result.report["duration_s"], 1)
    assert load["verdict"].split(":")[0] in ("saturated", "not saturated")


async def test_a_recorded_simulation_replays_to_the_same_digests(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.replay import replay

    sc = attrs.evolve(load_scenario("basic"), agents=12, seconds=2.0)
    record = tmp_path / "run.rec"
    monkeypatch.setattr(harness, "LOG_EVERY_S", 0.5)
    with open(tmp_path / "console.txt", "w") as out:
        result = await simulate(SimOptions(scenario=sc, data_dir=tmp_path / "data",
                                           record=record, live=False), Console(file=out))
    assert result.passed
    # Without a live view, the run logs plain status lines.
    status = re.findall(r"^basic: \d+ s, \d+ orders acked \([\d,]+/s\), \d+ connections, \d+ trades, "
                        r"faults 0/0, live checks ok$",
                        (tmp_path / "console.txt").read_text(), re.M)
    assert len(status) >= 2, (tmp_path / "console.txt").read_text()
    replayed = await trio.to_thread.run_sync(replay, record)
    assert replayed.ok, replayed.differences
    assert set(replayed.matched) == {"trades", "balances", "events"}
    assert replayed.counts["trades"] == result.report["trades"] > 0


def test_the_command_line_scales_the_rates_and_refuses_a_bad_scale(
        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import build_parser, main, simulate_scenario

    stress = load_scenario("stress")
    args = build_parser().parse_args(["simulate", "--scenario", "stress", "--rate-scale",
                                      "0.25", "--agents", "40", "--seconds", "3"])
    sc = simulate_scenario(args)
    assert sc.rates == {role: rate / 4 for role, rate in stress.rates.items()}
    assert (sc.agents, sc.seconds, sc.mix) == (40, 3.0, stress.mix)
    assert main(["simulate", "--rate-scale", "0"]) == 2
    assert "--rate-scale must be > 0, not 0.0" in capsys.readouterr().err


@pytest.mark.parametrize(("feed", "shared"), [("shared", True), ("agent", False)])
def test_agents_of_a_shared_feed_share_its_prices(feed: str, shared: bool) -> None:
    from simulations.agents import Control

    sc = attrs.evolve(load_scenario("basic"), agents=4, market_data=feed)
    instruments = parse_instruments(instruments_toml(None))
    spec = harness.GroupSpec(url="ws://127.0.0.1:1/v1", password="sim", scenario=sc,
                             instruments=instruments, users=("a", "b", "c", "d"),
                             indices=(0, 1, 2, 3), budget=None)
    agents = harness.AgentGroup(spec, Control()).agents
    symbol = sc.symbols[0]
    agents[0].on_ticks(symbol, 12_345)  # what the shared feed does with a ticker
    assert [a.mid[symbol] == 12_345 for a in agents] == [True] + [shared] * 3
    assert [a.last_trades[symbol] == [12_345] for a in agents] == [True] + [shared] * 3


async def test_under_multiproc_tcp_base_the_kills_are_real_and_nothing_is_lost(
        tmp_path: Path) -> None:
    """The engine booted as its own processes: each host kill is a kill -9 of the host's
    process, the engine restart a kill -9 of all of them and a boot on the same data."""
    sc = load_scenario("faults")
    engine_faults = [f for f in sc.faults if f.kind in ENGINE_FAULTS]
    faults = tuple(attrs.evolve(f, at=0.6 + 0.5 * i) for i, f in enumerate(engine_faults))
    sc = attrs.evolve(sc, agents=16, seconds=4.5, faults=faults)
    with open(tmp_path / "console.txt", "w") as out:
        result = await simulate(SimOptions(scenario=sc, data_dir=tmp_path / "data", live=False,
                                           base="multiprocTCPBase", account_shards=2),
                                Console(file=out))
    failed = {c.name: c.detail for c in result.checks if not c.passed}
    assert not failed, failed
    done = {f.kind: f for f in result.history.faults if f.ok}
    assert set(ENGINE_FAULTS) <= set(done), result.history.faults
    for kind in ("kill_book", "kill_account", "kill_router"):
        assert "killed with SIGKILL" in done[kind].detail, done[kind]
    assert result.report["base"] == "multiprocTCPBase"
    assert result.report["engine_restarts"] == 1
    assert len(result.report["host_restarts"]) == 3  # a book, an account shard, the router
    assert result.report["orders_acked"] > 50
    # Gaps a router kill leaves in live delivery are the gateway's to fill, not the
    # clients': their gap watch (2 s) never had to resume.
    assert isinstance(result.report["gap_repairs"], int)
    assert result.report["gap_resumes"] == 0
    machine = result.report["load"]["machine"]  # the engine's own processes are measured
    assert machine["engine_processes"] >= 6 and machine["engine_cpu_cores"] > 0, machine
    # Nothing of the engine outlives the run (the test's own processes are by pid).
    from actors.operations import read_engine_file
    assert read_engine_file(tmp_path / "data") is None


async def test_an_agent_that_never_finishes_fails_the_run_instead_of_hanging_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A multi-process faults run once hung for good after trading: the harness waited
    # for every agent without a bound. Now it gives up after FINISH_MAX_S, names the
    # agent and its phase, and the run fails.
    from simulations.agents import SimAgent

    monkeypatch.setattr(harness, "FINISH_MAX_S", 2.0)
    monkeypatch.setattr(harness, "SETTLE_MAX_S", 2.0)
    real_trade = SimAgent.trade
    stuck_user: list[str] = []

    async def trade(self: SimAgent, client: object) -> None:
        if not stuck_user:
            stuck_user.append(self.log.user)
            await trio.sleep_forever()  # whatever it waits for never comes
        await real_trade(self, client)

    monkeypatch.setattr(SimAgent, "trade", trade)
    sc = attrs.evolve(load_scenario("basic"), agents=4, seconds=1.0, faults=())
    with open(tmp_path / "console.txt", "w") as out, trio.fail_after(60):
        result = await simulate(SimOptions(scenario=sc, data_dir=tmp_path / "data",
                                           live=False), Console(file=out))
    assert not result.passed
    # (An agent still in a long pause when the group gave up is named too.)
    stuck = result.report["stuck_agents"]
    assert stuck[stuck_user[0]] == "trading (the group gave up trading)"
    assert set(stuck.values()) == {"trading (the group gave up trading)"}
    assert f"{stuck_user[0]}: stuck in trading" in result.report["agent_errors"]


@pytest.mark.parametrize("stuck", [{}, {"sim0007": "trading (the group gave up finishing)"}])
def test_a_stuck_agent_fails_the_exit_code_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stuck: dict[str, str]
) -> None:
    # report.json's ``passed`` counted stuck agents; the exit code looked only at the
    # checks, so a CI job reading it passed a run that had given up on an agent.
    checks = [Check(name="seqs_gapless", passed=True, detail="ok")]
    report = {"scenario": "basic", "seed": 1, "stuck_agents": stuck,
              "passed": not stuck}

    async def fake_simulate(options: SimOptions, console: Console) -> harness.SimResult:
        return harness.SimResult(history=None, checks=checks, report=report)  # type: ignore[arg-type]

    monkeypatch.setattr(harness, "simulate", fake_simulate)
    out = Console(record=True, width=200)
    code = harness.run_simulation(SimOptions(scenario=load_scenario("basic"),
                                             report_dir=tmp_path), out)
    text = out.export_text()
    assert code == (1 if stuck else 0)
    if stuck:
        assert "1 agent(s) stuck: sim0007 (trading" in text
    else:
        assert "all invariants passed" in text
