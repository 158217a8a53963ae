"""The periodic loop: back-to-back passes on a full batch, wake, backoff, stop."""

import asyncio

import structlog

from delivery.clock import backoff_s
from delivery.loops import PeriodicLoop

log = structlog.get_logger(__name__)


async def test_full_batches_run_back_to_back_then_the_loop_sleeps_until_woken() -> None:
    """A step that reports more work runs again at once; otherwise only a wake runs it."""
    passes: list[int] = []
    ran = asyncio.Event()
    three = asyncio.Event()

    async def step() -> bool:
        passes.append(len(passes))
        ran.set()
        if len(passes) == 3:
            three.set()
        return len(passes) < 3  # three passes back to back, then idle

    loop = PeriodicLoop("test-poll", step, interval_s=3600, log=log)
    loop.start()
    try:
        await asyncio.wait_for(three.wait(), 5)
        await asyncio.sleep(0.05)
        assert len(passes) == 3  # idle now: the interval is an hour
        ran.clear()
        loop.wake()
        await asyncio.wait_for(ran.wait(), 5)
        assert len(passes) == 4
    finally:
        await asyncio.wait_for(loop.stop(), 5)


async def test_a_failing_step_backs_off_and_stop_ends_the_pause() -> None:
    """An exception is logged and paused on, not raised; stop() does not wait the pause out."""
    calls = 0
    failed = asyncio.Event()

    async def step() -> bool:
        nonlocal calls
        calls += 1
        failed.set()
        raise RuntimeError("database down")

    loop = PeriodicLoop("test-fail", step, interval_s=3600, log=log)
    loop.start()
    await asyncio.wait_for(failed.wait(), 5)
    await asyncio.sleep(0.2)
    assert calls == 1  # paused for backoff_s(1) = 1 s, not retried at once
    await asyncio.wait_for(loop.stop(), 0.5)
    assert [backoff_s(n) for n in (1, 2, 3, 6, 7, 20)] == [1.0, 2.0, 4.0, 30.0, 30.0, 30.0]
