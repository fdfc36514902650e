from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from protocol import Instrument, parse_instruments

ROOT = Path(__file__).resolve().parent.parent

# CI machines are shared and slow: no deadline flakiness, a fixed example budget.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")


@pytest.fixture(scope="session")
def instruments() -> dict[str, Instrument]:
    return parse_instruments((ROOT / "protocol" / "instruments.toml").read_text())


@pytest.fixture(autouse=True)
def _no_leaked_journal_connections():  # type: ignore[no-untyped-def]
    """Every journal a test's hosts opened in this process is closed by its end.

    A host that exits (cleanly or by an injected fault) must release its hold on
    the shared per-thread SQLite connection; a leak keeps the file open for ever.
    """
    from actors.journal import _SHARED

    before = set(_SHARED)
    yield
    leaked = set(_SHARED) - before
    assert not leaked, f"journal connections left open: {sorted(k[0] for k in leaked)}"
