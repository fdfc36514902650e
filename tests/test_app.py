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


def test_cli_users_add_and_list(tmp_path: Path, capsys: object) -> None:
    from gateway.cli import main

    users = str(tmp_path / "users.json")
    assert main(["users", "add", "erin", "--deposit", "2500.5", "--password", "s3cret",
                 "--users-file", users]) == 0
    assert main(["users", "list", "--users-file", users]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "erin\t2500.5000" in out
    assert "s3cret" not in (tmp_path / "users.json").read_text()
    assert main(["users", "add", "erin", "--password", "x", "--users-file", users]) == 1
