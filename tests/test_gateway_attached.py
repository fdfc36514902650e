"""`emporion gateway --engine` in front of a booted multiprocTCPBase engine, all real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
from test_gateway_stop import a_signal_closes_with_1001

from actors.runtime import free_port
from gateway.client import ClientError, open_client

CLI = [sys.executable, "-m", "gateway.cli"]


async def test_gateway_attached_to_a_booted_engine(tmp_path: Path) -> None:
    admin = free_port()
    port = free_port()
    data = str(tmp_path)
    gateway: subprocess.Popen[str] | None = None
    try:
        subprocess.run([*CLI, "users", "add", "erin", "--password", "pw", "--deposit", "10",
                        "--data-dir", data], check=True, capture_output=True, text=True)
        boot = subprocess.run([*CLI, "boot", "--admin-port", str(admin), "--data-dir", data],
                              capture_output=True, text=True, timeout=120)
        assert boot.returncode == 0, boot.stderr
        gateway = subprocess.Popen(
            [*CLI, "gateway", "--engine", f"127.0.0.1:{admin}", "--port", str(port),
             "--data-dir", data], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert gateway.stdout is not None
        line = await trio.to_thread.run_sync(gateway.stdout.readline)  # its "listening" line
        assert "emporion gateway on" in line, line + (gateway.stderr.read() if gateway.stderr
                                                      else "")
        async with open_client(f"ws://127.0.0.1:{port}/v1", "erin", "pw") as erin:
            account = await erin.query("account")
            assert account["balance"] == "0.0000"
            try:
                await erin.place("BTC-PERP", "buy", "limit", qty="0.001", price="60000.0")
            except ClientError as exc:
                assert exc.code == "insufficient_funds"  # the account actor answered
            else:
                raise AssertionError("an unfunded order was accepted")
        # SIGTERM shuts it down: a connected client gets 1001, the process exits 0.
        await a_signal_closes_with_1001(gateway, signal.SIGTERM, port, "erin", "pw")
        assert await trio.to_thread.run_sync(lambda: gateway.wait(timeout=30)) == 0
    finally:
        if gateway is not None:
            if gateway.poll() is None:
                os.kill(gateway.pid, signal.SIGKILL)
                gateway.wait()
            for pipe in (gateway.stdout, gateway.stderr):
                if pipe is not None:
                    pipe.close()
        subprocess.run([*CLI, "shutdown", "--data-dir", data], capture_output=True, timeout=120)
