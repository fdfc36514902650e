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
