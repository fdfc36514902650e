"""The agents' shared pause timer (simulations.agents.Pauses), on trio's mock clock."""

from __future__ import annotations

import trio
import trio.testing

from simulations.agents import Pauses


async def _woken(pauses: Pauses, delays: list[float]) -> list[tuple[float, float]]:
    """Start one task per delay (in list order); the (delay, wake time) of each, in the
    order they woke."""
    woke: list[tuple[float, float]] = []
    start = trio.current_time()

    async def one(delay: float) -> None:
        await pauses.sleep(delay)
        woke.append((delay, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        await nursery.start(pauses.run)
        async with trio.open_nursery() as sleepers:
            for delay in delays:
                sleepers.start_soon(one, delay)
        nursery.cancel_scope.cancel()
    return woke


def test_pauses_end_at_their_deadlines_in_deadline_order() -> None:
    # A long pause first, then shorter ones: each shorter one must wake the timer
    # early (it was asleep until the long one's deadline).
    clock = trio.testing.MockClock(autojump_threshold=0)
    delays = [10.0, 1.0, 2.5, 0.5, 2.5, 0.0]
    woke = trio.run(_woken, Pauses(), delays, clock=clock)
    assert woke == sorted(((d, d) for d in delays), key=lambda x: x[0])
    assert [d for d, _ in woke][-3:] == [2.5, 2.5, 10.0]


def test_a_pause_is_cancellable_and_the_timer_goes_on() -> None:
    async def main() -> list[str]:
        pauses = Pauses()
        seen: list[str] = []
        async with trio.open_nursery() as nursery:
            await nursery.start(pauses.run)
            with trio.move_on_after(1.0):
                await pauses.sleep(5.0)  # cancelled at 1 s: its entry wakes nobody later
                seen.append("not cancelled")
            seen.append(f"cancelled at {trio.current_time():g}")
            await pauses.sleep(2.0)
            seen.append(f"woke at {trio.current_time():g}")
            nursery.cancel_scope.cancel()
        return seen

    seen = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen == ["cancelled at 1", "woke at 3"]
