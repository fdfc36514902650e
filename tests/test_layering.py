"""The sans-I/O layers never import I/O frameworks (STYLE.md rule 1)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"trio", "trio_websocket", "thespian", "socket", "asyncio", "sqlite3"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


SANS_IO = sorted([*ROOT.joinpath("protocol").glob("*.py"), *ROOT.joinpath("actors", "cores").glob("*.py")])


def test_the_layers_exist() -> None:
    names = {p.name for p in SANS_IO}
    assert {"_codec.py", "_connection.py", "book.py", "ledger.py", "router.py", "session.py"} <= names


@pytest.mark.parametrize("path", SANS_IO, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_sans_io_module_imports_no_io_framework(path: Path) -> None:
    bad = _imports(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_checker_sees_an_import(tmp_path: Path) -> None:
    # The checker itself must be able to fail.
    probe = tmp_path / "probe.py"
    probe.write_text("import trio\nfrom thespian.actors import Actor\n")
    assert _imports(probe) >= {"trio", "thespian"}
