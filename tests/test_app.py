"""`emporion run`'s engine: gateway, demo users and simulated traders, stopping by itself."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import attrs
import trio
from rich.console import Console
from test_gateway_stop import a_signal_closes_with_1001

from actors.runtime import free_port
from gateway.app import RunOptions, run_exchange
from gateway.cli import instruments_toml


def _quoted(text: str, symbol: str) -> bool:
    """Whether the final view's row of ``symbol`` shows a price (a live book quoted it)."""
    return re.search(rf"│ {re.escape(symbol)} +│ +\d", text) is not None


async def test_run_trades_and_stops_cleanly(tmp_path: Path) -> None:
    out = io.StringIO()
    opts = RunOptions(port=0, data_dir=tmp_path, seconds=3, live=False, agents=4, demo_users=2)
    code = await run_exchange(opts, instruments_toml(None), lambda u, p: p == "demo",
                              Console(file=out, width=140))
    text = out.getvalue()
    assert code == 0, text
    assert "stopped cleanly" in text
    assert "demo1" in text
    assert (tmp_path / "journal.sqlite3").exists()
    assert any(_quoted(text, s) for s in ("BTC-PERP", "ETH-PERP", "ESZ6")), text  # traders quoted
    # Every trader has disconnected when the summary prints: it shows the peak.
    peak = re.search(r"peak\s+(\d+)\s+connections", text)
    assert peak is not None and int(peak.group(1)) >= 4, text
    # The summary's lines wrap at the console's width, not the table's, and it no
    # longer offers Ctrl-C.
    assert re.search(r"Emporion on ws://\S+ — peak \d+ connections, [\d.]+ trades/s, "
                     r"\d+ orders/s\n", text), text
    summary = text[text.index("— peak"):]
    assert "refused " in summary and "Ctrl-C" not in summary, text
    await trio.lowlevel.checkpoint()


async def test_cli_run_shuts_down_on_sigint_closing_connections_with_1001(
        tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "run", "--port", str(port), "--data-dir",
         str(tmp_path), "--agents", "0", "--demo-users", "1", "--no-live"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with trio.fail_after(60):
            line = await trio.to_thread.run_sync(proc.stdout.readline)
        assert "listening on" in line, line
        await a_signal_closes_with_1001(proc, signal.SIGINT, port, "demo1", "demo")
        out, err = await trio.to_thread.run_sync(proc.communicate, None, 60)
        assert proc.returncode == 0, err
        assert "stopped cleanly" in out, out
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate()


_CUSTOM = """
[instruments.SOL-PERP]
kind = "perpetual"
quote = "USDT"
tick = "0.01"
lot = "0.1"
multiplier = "1"
margin_rate = "0.1"
maker_fee = "0.0002"
taker_fee = "0.0005"
ref_price = "150.00"
price_band = "0.1"
position_limit = "10000"
"""


async def test_run_serves_a_custom_registry_in_the_engine_too(tmp_path: Path) -> None:
    # The engine's books come from the same registry as the gateway's validation:
    # with only SOL-PERP in it, the traders' SOL-PERP orders rest in a real book.
    out = io.StringIO()
    opts = RunOptions(port=0, data_dir=tmp_path, seconds=3, live=False, agents=4, demo_users=1)
    code = await run_exchange(opts, _CUSTOM, lambda u, p: p == "demo", Console(file=out, width=140))
    text = out.getvalue()
    assert code == 0, text
    assert "BTC-PERP" not in text, text
    assert _quoted(text, "SOL-PERP"), text


def test_cli_run_reports_an_unreadable_registry(tmp_path: Path, capsys: object) -> None:
    from gateway.cli import main

    code = main(["run", "--instruments", str(tmp_path / "missing.toml"),
                 "--data-dir", str(tmp_path), "--seconds", "1", "--port", "0"])
    assert code == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert "instrument registry" in err and "missing.toml" in err


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


def test_simulated_traders_cap_their_positions_by_notional() -> None:
    from gateway.app import POSITION_NOTIONAL, max_position_lots
    from gateway.cli import load_instruments

    inst = load_instruments(None)
    # BTC-PERP: 60,000.0 x 0.001 x 1 = 60 per lot; ESZ6: 6,000.00 x 1 x 50 = 300,000 per lot.
    assert max_position_lots(inst["BTC-PERP"]) == int(POSITION_NOTIONAL / 60)
    assert max_position_lots(inst["ESZ6"]) == int(POSITION_NOTIONAL / 300_000)
    tiny = attrs.evolve(inst["ESZ6"], multiplier=Decimal(10_000_000))
    assert max_position_lots(tiny) == 1  # never below one lot
