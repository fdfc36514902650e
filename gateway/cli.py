"""The ``emporion`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from protocol import Instrument, parse_instruments


def load_instruments(path: str | None) -> dict[str, Instrument]:
    """The registry at ``path``, or the default shipped with the package."""
    if path is None:
        text = files("protocol").joinpath("instruments.toml").read_text()
    else:
        text = Path(path).read_text()
    return parse_instruments(text)


def _run(args: argparse.Namespace) -> int:
    from simulations.demo import run_demo

    return run_demo(
        load_instruments(args.instruments),
        agents=args.agents,
        seconds=args.seconds,
        steps=args.steps,
        seed=args.seed,
        live=not args.no_live and sys.stdout.isatty(),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emporion", description="The Emporion exchange engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the embedded exchange with simulated traders (in-process demo for now)",
    )
    run.add_argument("--agents", type=int, default=30, help="simulated traders (default 30)")
    run.add_argument("--seconds", type=float, default=5.0, help="wall-clock run time (default 5)")
    run.add_argument("--steps", type=int, default=None,
                     help="stop after this many 1 ms virtual steps instead of --seconds")
    run.add_argument("--seed", type=int, default=1, help="RNG seed: same seed, same trades")
    run.add_argument("--instruments", default=None, help="instrument registry TOML file")
    run.add_argument("--no-live", action="store_true", help="no live table, summary only")
    run.set_defaults(func=_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
