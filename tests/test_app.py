"""`emporion run`'s engine: gateway, demo users and simulated traders, stopping by itself."""

from __future__ import annotations

import io
from pathlib import Path

import trio
from rich.console import Console

from gateway.app import RunOptions, run_exchange
from gateway.cli import load_instruments


async def test_run_trades_and_stops_cleanly(tmp_path: Path) -> None:
    out = io.StringIO()
    opts = RunOptions(port=0, data_dir=tmp_path, seconds=3, live=False, agents=4, demo_users=2)
    code = await run_exchange(opts, load_instruments(None), lambda u, p: p == "demo",
                              Console(file=out, width=140))
    text = out.getvalue()
    assert code == 0, text
    assert "stopped cleanly" in text
    assert "demo1" in text
    assert (tmp_path / "journal.sqlite3").exists()
    assert " 0 orders/s" not in text, text  # the simulated traders traded
    await trio.lowlevel.checkpoint()
