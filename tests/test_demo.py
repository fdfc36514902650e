"""The main job's in-process demo: invariants hold and a seed replays identically."""

from __future__ import annotations

import io

from rich.console import Console

from gateway.cli import load_instruments, main
from simulations.demo import Demo, run_demo


def test_demo_passes_every_invariant() -> None:
    out = io.StringIO()
    code = run_demo(load_instruments(None), agents=12, seconds=0, steps=400, seed=7,
                    live=False, console=Console(file=out, width=120))
    assert code == 0, out.getvalue()
    assert "FAIL" not in out.getvalue()


def test_same_seed_same_trades() -> None:
    def trades(seed: int) -> list[tuple[str, int, int]]:
        demo = Demo(load_instruments(None), agents=8, seed=seed)
        got: list[tuple[str, int, int]] = []
        original = demo._on_market

        def spy(symbol: str, ev: object) -> None:
            original(symbol, ev)
            if type(ev).__name__ == "PublicTrade":
                got.append((symbol, ev.price, ev.qty))  # type: ignore[attr-defined]

        demo.engine._on_market = spy
        for _ in range(200):
            demo.step()
        return got

    first = trades(3)
    assert first
    assert first == trades(3)
    assert first != trades(4)


def test_a_check_can_fail() -> None:
    demo = Demo(load_instruments(None), agents=4, seed=1)
    for _ in range(50):
        demo.step()
    demo.finish()
    assert all(c.passed for c in demo.checks())
    demo.deposits += 1  # a minor unit appears from nowhere: conservation must notice
    failed = [c.name for c in demo.checks() if not c.passed]
    assert failed == ["cash + fees + unrealized conserved"]
    demo.delivered["trader1"].append(10**6)  # a sequence gap
    assert "private seqs gapless, no duplicates" in [c.name for c in demo.checks() if not c.passed]


def test_cli_runs_the_demo(capsys: object) -> None:
    assert main(["demo", "--steps", "50", "--agents", "4", "--no-live"]) == 0
