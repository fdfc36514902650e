"""The benchmarks still run and print what they promise (tiny counts; no figure is judged).

Each prints one JSON object per line per figure: ``name``, a numeric ``value`` and
``unit``, and where it is compared ``ceiling`` and ``ratio`` (value / ceiling). A
refactor of the code they drive broke bench/gateway.py once without any test noticing.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

RUNS = {
    "book": ["--ops", "20000", "--repeat", "1"],
    "book_events": ["--ops", "20000", "--repeat", "1"],
    "codec": ["--n", "2000", "--repeat", "1"],
    "journal": ["--events", "2000", "--singles", "200", "--repeat", "1"],
    "actors": ["--quick", "--only", "simple"],
    "gateway": ["--quick", "--only", "push,rtt"],
    "router": ["--users", "50", "--turns", "100", "--repeat", "1"],
}


@pytest.mark.parametrize("bench", sorted(RUNS))
def test_the_benchmark_runs_and_prints_its_figures(bench: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / f"{bench}.py"), *RUNS[bench]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert figures, done.stderr[-3000:]
    for fig in figures:
        assert isinstance(fig["name"], str) and fig["name"].startswith(f"{bench}."), fig
        assert isinstance(fig["value"], int | float) and math.isfinite(fig["value"]), fig
        assert isinstance(fig["unit"], str) and fig["unit"], fig
        if "ceiling" in fig:
            assert fig["ceiling"] > 0, fig
            assert fig["ratio"] == pytest.approx(fig["value"] / fig["ceiling"], rel=0.02,
                                                 abs=1e-3), fig
    assert any("ceiling" in fig for fig in figures), f"{bench}: nothing compared"
    if bench in ("book", "book_events"):  # every core ends with the bare loop's fills and book
        assert [f["value"] for f in figures if f["name"] == f"{bench}.sanity"] == [1]
