"""What the book core's event objects cost: the core built three ways, next to the bare book.

``bench/book.py`` compares the order book core with a bare matching loop that
builds no events at all. The core must emit typed events (acks, fills,
cancels, expiries, market data), and the foundation issue asks for them as
attrs classes. This benchmark measures how much of the gap that choice is:
it runs bench/book.py's stream (same seed, same turns, same per-block best
of ``--repeat`` runs) through

- ``namedtuple``: the core as it is (events are ``NamedTuple`` classes built
  with ``tuple.__new__``, the cheapest typed construction found);
- ``tuple``: the same source with every event built as a plain tuple (no
  type: nothing downstream could dispatch on it; a lower bound);
- ``attrs``: the same source with every event built as a frozen, slotted attrs
  class with the same fields, called positionally (the issue's kw-only call
  would cost more).

The variants are made from ``actors/cores/book.py``'s own text at run time by
rewriting each ``_new(Event, (...))`` site, so they follow the core as it
changes; the run fails if no site is found. Each variant must end with the
bare book's fills and resting quantity (``book_events.sanity``).

Prints one line per variant: ``book_events.<variant>.ops_per_s`` with the bare
book as ``ceiling`` and ``ratio`` (the figure bench/book.py's target is on).

Usage: python bench/book_events.py [--ops N] [--repeat R] [--seed S]
"""

from __future__ import annotations

# Run as a script, Python puts bench/ first on sys.path; drop it (see bench/book.py).
import sys as _sys
from pathlib import Path as _Path

_HERE = _Path(__file__).parent.resolve()
_sys.path[:] = [p for p in _sys.path if _Path(p or ".").resolve() != _HERE]

import argparse
import importlib.util
import json
import re
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in _sys.path:
    _sys.path.insert(0, str(ROOT))

from protocol import parse_instruments

#: A construction site in the core: ``_new(EventClass, (``.
_SITE = re.compile(r"_new\((\w+), \(")

_ATTRS_PRELUDE = '''
import attrs as _attrs
_ATTRS_EVENTS = {}
def _attrs_event(cls):
    found = _ATTRS_EVENTS.get(cls)
    if found is None:
        found = _ATTRS_EVENTS[cls] = _attrs.make_class(
            cls.__name__, list(cls._fields), frozen=True, slots=True)
    return found
'''


def _load(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = str(ROOT / "actors" / "cores" / "book.py")
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def variants() -> dict[str, types.ModuleType]:
    """The core three ways, each a module with its own ``OrderBook``."""
    source = (ROOT / "actors" / "cores" / "book.py").read_text()
    sites = len(_SITE.findall(source))
    if not sites:
        raise RuntimeError("no _new(Event, (...)) site in actors/cores/book.py: update this bench")
    plain = _SITE.sub("((", source)
    # Each class is made once, on first use, from the NamedTuple's fields; the lookup
    # per event is a dict get, a few tens of ns against the construction measured.
    attrs_source = _SITE.sub(r"_A_\1(*(", source)
    names = sorted(set(_SITE.findall(source)))
    attrs_source += _ATTRS_PRELUDE + "".join(
        f"_A_{n} = _attrs_event({n})\n" for n in names
    )
    return {
        "namedtuple": _load("book_namedtuple", source),
        "tuple": _load("book_tuple", plain),
        "attrs": _load("book_attrs", attrs_source),
    }


def _bench_book() -> Any:
    spec = importlib.util.spec_from_file_location("bench_book", _HERE / "book.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    bb = _bench_book()
    inst = parse_instruments((ROOT / "protocol" / "instruments.toml").read_text())[bb.SYMBOL]
    bare_ops, core_ops = bb.build_stream(inst, args.ops, args.seed)
    core_turns = bb.turns(core_ops)
    per_block = bb.BLOCK // bb.TURN
    bare_blocks = [bare_ops[i:i + bb.BLOCK] for i in range(0, len(bare_ops), bb.BLOCK)]
    core_blocks = [core_turns[i:i + per_block] for i in range(0, len(core_turns), per_block)]
    mods = variants()

    def run_variant(module: types.ModuleType) -> tuple[list[float], Any]:
        # bench/book.py's run_core, with this variant's OrderBook.
        saved = bb.OrderBook
        bb.OrderBook = module.OrderBook
        try:
            result: tuple[list[float], Any] = bb.run_core(inst, core_blocks)
            return result
        finally:
            bb.OrderBook = saved

    fastest: dict[str, list[float]] = {}
    ended: dict[str, tuple[int, int, int]] = {}
    for _ in range(args.repeat):
        for name in [*mods, "bare"]:
            if name == "bare":
                times, book = bb.run_bare(bare_blocks)
            else:
                times, book = run_variant(mods[name])
            ended[name] = bb._ending(book)
            del book
            old = fastest.get(name, times)
            fastest[name] = [min(a, b) for a, b in zip(old, times, strict=True)]
    bare_rate = args.ops / sum(fastest["bare"])
    for name in mods:
        bb._line(f"book_events.{name}.ops_per_s", args.ops / sum(fastest[name]), "ops/s",
                 bare_rate)
    match = all(ended[name] == ended["bare"] for name in mods)
    print(json.dumps({"name": "book_events.sanity", "value": int(match), "unit": "match",
                      "detail": {name: list(ended[name]) for name in [*mods, "bare"]}}),
          flush=True)


if __name__ == "__main__":
    main()
