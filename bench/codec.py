"""Codec throughput: a private frame carrying one 12-field event, CBOR and JSON.

Our path (frame object → map → bytes and back, with validation) is measured next
to the bare ceiling (the library's dumps/loads of the same ready-made map) in
the same run. Prints one JSON object per line per figure.

Usage: python bench/codec.py [--n N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import cbor2

import protocol as p

EVENT_DATA: dict[str, Any] = {
    "order_id": 123456789,
    "client_order_id": "mm-7-000123",
    "symbol": "BTC-PERP",
    "side": "buy",
    "type": "limit",
    "price": "60000.1",
    "qty": "0.250",
    "filled_qty": "0.100",
    "remaining_qty": "0.150",
    "status": "partially_filled",
    "code": None,
    "reason": None,
}
assert len(EVENT_DATA) == 12

FRAME = p.PrivateFrame(
    events=(
        p.PrivateEvent(
            seq=41, kind="order_partially_filled", priority=1, ts=1_700_000_000_000_000_000,
            data=EVENT_DATA,
        ),
    )
)


def _rate(fn: Callable[[], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def _line(name: str, value: float, unit: str, ceiling: float | None = None) -> None:
    out: dict[str, Any] = {"name": name, "value": round(value, 1), "unit": unit}
    if ceiling is not None:
        out["ceiling"] = round(ceiling, 1)
        out["ratio"] = round(value / ceiling, 3)
    print(json.dumps(out), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    wire_map = p.frame_to_map(FRAME)
    json_enc = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    for enc in p.Encoding:
        data = p.encode_frame(FRAME, enc)
        assert p.decode_frame(data) == FRAME
        if enc is p.Encoding.CBOR:
            bare_enc: Callable[[], object] = lambda: cbor2.dumps(wire_map)  # noqa: E731
            bare_dec: Callable[[], object] = lambda d=data: cbor2.loads(d)  # type: ignore[misc]  # noqa: E731
        else:
            bare_enc = lambda: json_enc.encode(wire_map)  # noqa: E731
            bare_dec = lambda d=data: json.loads(d)  # type: ignore[misc]  # noqa: E731
        ceiling_e = _rate(bare_enc, args.n, args.repeat)
        ours_e = _rate(lambda: p.encode_frame(FRAME, enc), args.n, args.repeat)  # noqa: B023
        ceiling_d = _rate(bare_dec, args.n, args.repeat)
        ours_d = _rate(lambda: p.decode_frame(data), args.n, args.repeat)  # noqa: B023
        _line(f"codec.{enc.value}.encode_per_s", ours_e, "frames/s", ceiling_e)
        _line(f"codec.{enc.value}.decode_per_s", ours_d, "frames/s", ceiling_d)
        _line(f"codec.{enc.value}.frame_bytes", len(data if isinstance(data, bytes)
                                                   else data.encode()), "bytes")
    # The inbound path the gateway runs for every client frame: decode + validate.
    place = p.encode_request(
        p.Place(id=1, client_order_id="c1", symbol="BTC-PERP", side="buy", type="limit",
                price="60000.1", qty="0.001"),
        p.Encoding.CBOR,
    )
    assert isinstance(place, bytes)
    ceiling = _rate(lambda: cbor2.loads(place), args.n, args.repeat)
    ours = _rate(lambda: p.decode_request(place), args.n, args.repeat)
    _line("codec.cbor.decode_request_per_s", ours, "frames/s", ceiling)


if __name__ == "__main__":
    main()
