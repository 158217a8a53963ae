"""
SIGKILL a real server in the middle of concurrent idempotent creations, restart it, and
retry every key: each answers 2xx at once and each resource exists exactly once.
"""

from pathlib import Path

import pytest

from tests.api.crash_workload import run_workload, server_for

KEYS = 250


@pytest.mark.slow
async def test_sigkill_mid_stream_then_retry_every_key(database_url: str, tmp_path: Path) -> None:
    """After a SIGKILL mid-stream, every retried key answers 2xx within seconds, no duplicates."""
    async with server_for(database_url, tmp_path) as server:
        outcome = await run_workload(server, database_url, keys=KEYS, kill_after=KEYS // 3)
    assert len(outcome.answered_before_kill) >= KEYS // 3
    assert len(outcome.answered_before_kill) < KEYS, "the stream finished before the kill"
    # Nothing is left reserved by the dead process: no retry has to wait for one.
    assert outcome.retries == 0, outcome.refusals
    assert outcome.slowest_s < 10
    # Every answered key was replayed, not rerun; every key wrote its resource once.
    assert outcome.replayed_after_restart >= len(outcome.answered_before_kill)
    assert sorted(outcome.written) == [f"k-{n:05d}" for n in range(KEYS)]
    assert set(outcome.written.values()) == {1}


@pytest.mark.slow
async def test_sigkill_mid_event_storm_then_retry_every_key(
    database_url: str, tmp_path: Path
) -> None:
    """
    Trigger events only, 64 at a time, so they are written in grouped transactions:
    after a SIGKILL mid-batch every retried key answers 2xx, each event exists once.
    """
    keys = 600
    async with server_for(database_url, tmp_path) as server:
        outcome = await run_workload(
            server, database_url, keys=keys, kill_after=keys // 3, concurrency=64, kinds=("event",)
        )
    assert keys // 3 <= len(outcome.answered_before_kill) < keys
    assert outcome.retries == 0, outcome.refusals
    assert outcome.replayed_after_restart >= len(outcome.answered_before_kill)
    assert sorted(outcome.written) == [f"k-{n:05d}" for n in range(keys)]
    assert set(outcome.written.values()) == {1}


@pytest.mark.slow
async def test_sigkill_mid_self_recorded_creations_then_retry_every_key(
    database_url: str, tmp_path: Path
) -> None:
    """
    Wakeups and schedules, 32 at a time: each records its key in its own write's
    transaction. After a SIGKILL mid-stream every retried key answers 2xx (the
    answered ones replayed), and each resource exists once.
    """
    keys = 300
    async with server_for(database_url, tmp_path) as server:
        outcome = await run_workload(
            server,
            database_url,
            keys=keys,
            kill_after=keys // 3,
            concurrency=32,
            kinds=("wakeup", "schedule"),
        )
    assert keys // 3 <= len(outcome.answered_before_kill) < keys
    assert outcome.retries == 0, outcome.refusals
    assert outcome.replayed_after_restart >= len(outcome.answered_before_kill)
    assert sorted(outcome.written) == [f"k-{n:05d}" for n in range(keys)]
    assert set(outcome.written.values()) == {1}
