"""Scenarios: what a simulation runs — agents, their mix and rates, the fault schedule.

A scenario is a TOML file (see ``simulations/scenarios/`` for the shipped
``basic``, ``faults`` and ``stress``, and docs/simulations.md)::

    [run]
    agents = 50          # one WebSocket connection and one user each
    seconds = 10         # or: orders = 20000 (an order budget; whichever ends first)
    seed = 1
    symbols = ["BTC-PERP", "ETH-PERP"]
    deposit = "1000000"  # quote currency per agent
    market_data = "auto"  # "agent", "shared" (one ticker feed per client process);
                          # auto: shared above 100 agents

    [mix]                # relative weights of the roles
    maker = 3
    noise = 4

    [rates]              # decisions (place or cancel) per second per agent of each role
    maker = 4.0

    [[faults]]
    at = 2.5             # seconds after the agents start
    kind = "kill_account"
    target = "any"       # a symbol, a user, or "any" (chosen from the seed)

Command-line options override ``[run]`` values. Invalid files fail with a
:class:`ScenarioError` naming the field, before anything starts.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from importlib.resources import files
from pathlib import Path
from typing import Any, Final

import attrs

ROLES: Final = ("maker", "noise", "momentum", "reconnector")
ENGINE_FAULTS: Final = ("kill_book", "kill_account", "kill_router", "kill_session", "raise",
                        "restart_engine")
CLIENT_FAULTS: Final = ("drop_client", "delay_frames", "duplicate_frames")
FAULT_KINDS: Final = ENGINE_FAULTS + CLIENT_FAULTS
DEFAULT_RATES: Final = {"maker": 4.0, "noise": 2.0, "momentum": 1.0, "reconnector": 2.0}


class ScenarioError(ValueError):
    """A scenario file or option that cannot run; the message names the field."""


@attrs.frozen(kw_only=True)
class FaultSpec:
    at: float  # seconds after the agents start
    kind: str
    target: str | None = None


@attrs.frozen(kw_only=True)
class Scenario:
    name: str
    agents: int = 50
    seconds: float | None = 10.0
    orders: int | None = None
    seed: int = 1
    symbols: tuple[str, ...] = ("BTC-PERP", "ETH-PERP")
    deposit: Decimal = Decimal(1_000_000)
    #: ``agent``: every agent subscribes to the tickers itself. ``shared``: one feed
    #: connection per client process subscribes and hands prices to its agents —
    #: how a trading firm runs many order-entry sessions (1,000 agents each taking
    #: every ticker would make the load generator, not the exchange, the bottleneck).
    market_data: str = "auto"

    def feed(self) -> str:
        """The effective market-data mode: ``auto`` is ``shared`` above 100 agents."""
        if self.market_data == "auto":
            return "shared" if self.agents > 100 else "agent"
        return self.market_data
    mix: Mapping[str, float] = attrs.field(factory=lambda: {"maker": 3, "noise": 4,
                                                            "momentum": 2, "reconnector": 1})
    rates: Mapping[str, float] = attrs.field(factory=lambda: dict(DEFAULT_RATES))
    faults: tuple[FaultSpec, ...] = ()

    def roles(self) -> list[str]:
        """The role of each agent, in agent order: a deterministic split by weight
        (largest remainder), interleaved so any prefix of agents has a similar mix."""
        total = sum(self.mix.values())
        if total <= 0:
            return ["noise"] * self.agents
        exact = {r: self.agents * w / total for r, w in self.mix.items() if w > 0}
        counts = {r: int(v) for r, v in exact.items()}
        rest = self.agents - sum(counts.values())
        for r in sorted(exact, key=lambda r: (counts[r] - exact[r], r))[:rest]:
            counts[r] += 1
        out: list[str] = []
        left = dict(counts)
        while len(out) < self.agents:
            for r in ROLES:
                if left.get(r, 0) > 0:
                    out.append(r)
                    left[r] -= 1
        return out


def builtin_names() -> list[str]:
    return sorted(p.name.removesuffix(".toml") for p in _builtin_dir().iterdir()
                  if p.name.endswith(".toml"))


def _builtin_dir() -> Any:
    return files("simulations").joinpath("scenarios")


def load_scenario(name_or_path: str) -> Scenario:
    """A shipped scenario by name (``basic``, ``faults``, ``stress``) or a TOML file.

    Raises:
        ScenarioError: unknown name, unreadable file, or an invalid field.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        try:
            text = path.read_text()
        except OSError as exc:
            raise ScenarioError(f"cannot read scenario {name_or_path}: {exc}") from None
        name = path.stem
    else:
        resource = _builtin_dir().joinpath(f"{name_or_path}.toml")
        if not resource.is_file():
            raise ScenarioError(f"unknown scenario {name_or_path!r}; shipped: "
                                f"{', '.join(builtin_names())} (or a path to a .toml file)")
        text = resource.read_text()
        name = name_or_path
    return parse_scenario(text, name=name)


def parse_scenario(text: str, *, name: str = "custom") -> Scenario:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"scenario {name}: not valid TOML: {exc}") from None
    unknown = set(raw) - {"run", "mix", "rates", "faults"}
    if unknown:
        raise ScenarioError(f"scenario {name}: unknown section(s) {sorted(unknown)}")
    run = dict(raw.get("run", {}))
    fields: dict[str, Any] = {"name": name}
    for key in ("agents", "seconds", "orders", "seed", "symbols", "deposit", "market_data"):
        if key in run:
            fields[key] = run.pop(key)
    if run:
        raise ScenarioError(f"scenario {name}: unknown [run] field(s) {sorted(run)}")
    if "mix" in raw:
        fields["mix"] = raw["mix"]
    rates = dict(DEFAULT_RATES)
    rates.update(raw.get("rates", {}))
    fields["rates"] = rates
    faults = []
    for i, f in enumerate(raw.get("faults", [])):
        extra = set(f) - {"at", "kind", "target"}
        if extra:
            raise ScenarioError(f"scenario {name}: faults[{i}]: unknown field(s) {sorted(extra)}")
        faults.append(FaultSpec(at=f.get("at", -1), kind=f.get("kind", ""),
                                target=f.get("target")))
    fields["faults"] = tuple(faults)
    return validate(Scenario(**fields))


def validate(s: Scenario) -> Scenario:
    """Check every field; returns the scenario with normalised types."""
    def need(cond: bool, what: str) -> None:
        if not cond:
            raise ScenarioError(f"scenario {s.name}: {what}")

    need(isinstance(s.agents, int) and s.agents >= 1, f"agents must be an integer >= 1, "
                                                      f"not {s.agents!r}")
    need(s.seconds is None or (isinstance(s.seconds, int | float) and s.seconds > 0),
         f"seconds must be > 0, not {s.seconds!r}")
    need(s.orders is None or (isinstance(s.orders, int) and s.orders >= 1),
         f"orders must be an integer >= 1, not {s.orders!r}")
    need(s.seconds is not None or s.orders is not None, "give seconds or orders (or both)")
    need(isinstance(s.seed, int), f"seed must be an integer, not {s.seed!r}")
    need(isinstance(s.symbols, list | tuple) and len(s.symbols) > 0
         and all(isinstance(x, str) for x in s.symbols), "symbols must be a list of symbols")
    need(s.market_data in ("agent", "shared", "auto"),
         f"market_data must be 'agent', 'shared' or 'auto', not {s.market_data!r}")
    try:
        deposit = Decimal(str(s.deposit))
    except InvalidOperation:
        deposit = Decimal(-1)
    need(deposit > 0, f"deposit must be a positive decimal, not {s.deposit!r}")
    for table, values in (("mix", s.mix), ("rates", s.rates)):
        for role, v in values.items():
            need(role in ROLES, f"[{table}]: unknown role {role!r}; roles: {', '.join(ROLES)}")
            need(isinstance(v, int | float) and v >= 0, f"[{table}] {role} must be >= 0")
    need(sum(s.mix.values()) > 0, "[mix] needs at least one role with a weight > 0")
    for f in s.faults:
        need(f.kind in FAULT_KINDS, f"fault kind {f.kind!r} unknown; kinds: "
                                    f"{', '.join(FAULT_KINDS)}")
        need(isinstance(f.at, int | float) and f.at >= 0, f"fault {f.kind}: at must be >= 0")
        need(f.target is None or isinstance(f.target, str), f"fault {f.kind}: target must be "
                                                            "a string")
    return attrs.evolve(s, symbols=tuple(s.symbols), deposit=deposit,
                        seconds=None if s.seconds is None else float(s.seconds),
                        mix={k: float(v) for k, v in s.mix.items()},
                        rates={k: float(v) for k, v in s.rates.items()},
                        faults=tuple(sorted(s.faults, key=lambda f: f.at)))


__all__ = [
    "CLIENT_FAULTS",
    "ENGINE_FAULTS",
    "FAULT_KINDS",
    "ROLES",
    "FaultSpec",
    "Scenario",
    "ScenarioError",
    "builtin_names",
    "load_scenario",
    "parse_scenario",
    "validate",
]
