"""
One clock per (agent, user): after advance-time, every read and write of the pair
(schedule create, ``upcoming``, ``next_fire_at`` on re-enable, wakeup
``delay_hours`` and ``scheduled_at``, what the scheduler considers due, history
order) runs on real now + the pair's offset, and a reset puts it back on real
time. Through the official ``sonzai`` SDK against the served API (HTTP where the
SDK has no method), with the real scheduler and dispatcher steps on the same
database, on SQLite and PostgreSQL.
"""

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sonzai
from sqlalchemy import select

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.app import decode
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind
from delivery.planning import fire_id
from delivery.scheduler import Scheduler
from delivery.store.engine import create_engine
from delivery.store.tables import OUTBOX, WAKEUPS
from tests.api.server import ServedApi, serve_api

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
DAILY_9_UTC = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
A, U = "agent_abc", "user_123"
SUBJECTS = Subjects("test")
CLI = (sys.executable, "-m", "delivery")


def at(day: int, hour: int = 9) -> datetime:
    return datetime(2026, 5, day, hour, tzinfo=UTC)


def z(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


@contextmanager
def served(database_url: str, clock: ManualClock) -> Iterator[tuple[ServedApi, sonzai.Sonzai]]:
    with (
        serve_api(database_url, clock) as api,
        sonzai.Sonzai(api_key=api.keys["alpha"], base_url=api.base_url) as client,
    ):
        yield api, client


def create_daily(client: sonzai.Sonzai, **extra: Any) -> Any:
    return client.schedules.create(
        A, U, cadence=DAILY_9_UTC, intent="check in on the user", check_type="reminder", **extra
    )


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``delivery *args --project alpha`` on the database, checked to succeed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env["DELIVERY_DATABASE_URL"] = database_url
    done = subprocess.run(
        [*CLI, *args, "--project", "alpha"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done


def timeline(api: ServedApi) -> list[dict[str, Any]]:
    """The pair's timeline, oldest first (HTTP: the SDK has no timeline method)."""
    found: list[dict[str, Any]] = []
    params = {"limit": "200", "order": "asc"}
    headers = {"Authorization": f"Bearer {api.keys['alpha']}"}
    url = f"{api.base_url}/api/v1/agents/{A}/users/{U}/timeline"
    while True:
        page = httpx.get(url, params=params, headers=headers, timeout=10).json()
        found += page["events"]
        if not page.get("next_cursor"):
            return found
        params["cursor"] = page["next_cursor"]


async def scheduler_pass(database_url: str, real_now: datetime) -> list[str]:
    """One real scheduler tick at ``real_now``, then the dispatcher's step on what it queued."""
    engine = create_engine(database_url)
    try:
        result = await Scheduler(engine, SUBJECTS).drain(real_now)
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(OUTBOX.c.subject, OUTBOX.c.payload).where(
                        OUTBOX.c.subject.in_([SUBJECTS.fire_created, SUBJECTS.wakeup_due]),
                        OUTBOX.c.created_at == real_now,
                    )
                )
            ).all()
        refs = [
            decode(
                SourceKind.SCHEDULE if subject == SUBJECTS.fire_created else SourceKind.WAKEUP,
                payload.encode(),
            )
            for subject, payload in rows
        ]
        if refs:
            processor = Processor(engine, TemplateComposer(), SUBJECTS, ManualClock(real_now))
            await processor.process(refs)
        return [*result.fire_ids, *(r.id for r in refs if r.kind is SourceKind.WAKEUP)]
    finally:
        await engine.dispose()


def test_upcoming_starts_at_the_pair_clock(database_url: str) -> None:
    """Daily 09:00, advance 48 h: ``upcoming`` starts after what fired in simulated time."""
    with served(database_url, ManualClock(START)) as (_, client):
        created = create_daily(client)
        client.workbench.advance_time(A, U, 48)

        listed = client.schedules.upcoming(A, U, created.schedule_id, limit=3).upcoming

        assert listed == [z(at(3)), z(at(4)), z(at(5))]
        assert client.schedules.get(A, U, created.schedule_id).next_fire_at == z(at(3))


def test_wakeup_delay_and_scheduled_at_count_on_the_pair_clock(database_url: str) -> None:
    """On an advanced pair ``delay_hours=1`` is an hour of its clock; a 2 h advance fires it."""
    with served(database_url, ManualClock(START)) as (_, client):
        client.workbench.advance_time(A, U, 24)

        wakeup = client.agents.schedule_wakeup(
            A, user_id=U, check_type="check_in", intent="ask how the day went", delay_hours=1
        )
        assert wakeup.scheduled_at == z(START + timedelta(hours=25))
        result = client.workbench.advance_time(A, U, 2)

        assert [w.wakeup_id for w in result.wakeups_executed] == [wakeup.wakeup_id]
        assert client.agents.get_wakeups(A, user_id=U).wakeups == []
        # An instant real time has not reached yet but the pair's clock has long
        # passed is in the pair's past, beyond the maximum lateness.
        with pytest.raises(sonzai.BadRequestError) as refused:
            client.agents.schedule_wakeup(
                A,
                user_id=U,
                check_type="check_in",
                intent="too late",
                scheduled_at=z(START + timedelta(hours=3)),
                delay_hours=0,
            )
        assert refused.value.code == "SCHEDULED_AT_IN_PAST"


def test_a_cancelled_pair_wakeup_is_stamped_on_the_pair_clock(database_url: str) -> None:
    """Cancelling on a pair advanced 24 h stamps ``cancelled_at`` 24 h ahead of real now."""
    with served(database_url, ManualClock(START)) as (api, client):
        client.workbench.advance_time(A, U, 24)
        wakeup = client.agents.schedule_wakeup(
            A, user_id=U, check_type="check_in", intent="ask how the day went", delay_hours=5
        )
        # HTTP: the SDK has no cancel method.
        cancelled = httpx.delete(
            f"{api.base_url}/api/v1/agents/{A}/wakeups/{wakeup.wakeup_id}",
            headers={"Authorization": f"Bearer {api.keys['alpha']}"},
            timeout=10,
        )
        assert cancelled.status_code == 200, cancelled.text

    async def stamped() -> datetime:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return (
                    await conn.execute(
                        select(WAKEUPS.c.cancelled_at).where(WAKEUPS.c.id == wakeup.wakeup_id)
                    )
                ).scalar_one()
        finally:
            await engine.dispose()

    assert asyncio.run(stamped()) == START + timedelta(hours=24)


def test_ticks_between_real_now_and_the_pair_clock_are_recorded_skipped(
    database_url: str,
) -> None:
    """
    A daily schedule created on a pair advanced 195 h: its first fire is the pair's next
    09:00, and the eight 09:00 ticks between real now and the pair's clock are on the
    timeline as skipped ``before_pair_clock``, never fired, not even by the scheduler.
    """
    with served(database_url, ManualClock(START)) as (api, client):
        client.workbench.advance_time(A, U, 195)  # the pair's clock: 2026-05-09T03:00Z

        created = create_daily(client)

        assert created.next_fire_at == z(at(9))
        skipped = [e for e in timeline(api) if e["kind"] == "fire.skipped"]
        assert [e["at"] for e in skipped] == [z(at(day)) for day in range(1, 9)]
        assert {e["detail"]["reason"] for e in skipped} == {"before_pair_clock"}
        assert "advanced clock" in skipped[0]["summary"]
        # Real time passing those instants fires none of them.
        fired = _run(scheduler_pass(database_url, at(1, 10)))
        assert fired == []
        assert not [e for e in timeline(api) if e["kind"] == "fire.fired"]


def test_an_advanced_pair_fires_as_its_own_clock_passes(database_url: str) -> None:
    """
    Real time keeps running on top of the offset: advanced 48 h at 00:00, the pair's
    09:00 comes 9 real hours later and the scheduler fires it then, once, and its
    message is stamped on the pair's clock, so history lists it after the simulated ones.
    """
    clock = ManualClock(START)
    with served(database_url, clock) as (_, client):
        created = create_daily(client)
        client.workbench.advance_time(A, U, 48)

        assert _run(scheduler_pass(database_url, START + timedelta(hours=8, minutes=59))) == []
        fired = _run(scheduler_pass(database_url, START + timedelta(hours=9)))
        again = _run(scheduler_pass(database_url, START + timedelta(hours=9, minutes=30)))

        assert fired == [fire_id(created.schedule_id, at(3))]
        assert again == []
        clock.set(START + timedelta(hours=9, minutes=30))
        assert client.schedules.get(A, U, created.schedule_id).next_fire_at == z(at(4))
        history = client.agents.notifications.history(A).notifications
        assert [n.created_at for n in history] == [z(at(3)), z(at(2)), z(at(1))]


def test_a_pair_wakeup_fires_when_its_clock_reaches_it(database_url: str) -> None:
    """A wakeup an hour ahead on an advanced pair fires an hour later in real time."""
    with served(database_url, ManualClock(START)) as (_, client):
        client.workbench.advance_time(A, U, 48)
        wakeup = client.agents.schedule_wakeup(
            A, user_id=U, check_type="check_in", intent="ask how the day went", delay_hours=1
        )

        assert _run(scheduler_pass(database_url, START + timedelta(minutes=59))) == []
        assert _run(scheduler_pass(database_url, START + timedelta(hours=1))) == [wakeup.wakeup_id]
        assert client.agents.get_wakeups(A, user_id=U).wakeups == []
        [note] = client.agents.notifications.list(A, user_id=U).notifications
        assert (note.wakeup_id, note.created_at) == (
            wakeup.wakeup_id,
            z(START + timedelta(hours=49)),
        )


def test_reenabling_never_sets_next_fire_at_in_the_pair_past(database_url: str) -> None:
    """
    Re-enabling mid-course after an advance continues from the pair's clock; a course
    that ended on the pair's clock cannot be re-enabled (its ``ends_at`` has passed).
    """
    with served(database_url, ManualClock(START)) as (_, client):
        running = create_daily(client)
        course = create_daily(client, ends_at=z(at(4, 0)))
        client.schedules.update(A, U, running.schedule_id, enabled=False)
        client.workbench.advance_time(A, U, 96)  # the pair's clock: 2026-05-05T00:00Z

        resumed = client.schedules.update(A, U, running.schedule_id, enabled=True)
        assert resumed.next_fire_at == z(at(5))
        assert client.schedules.get(A, U, course.schedule_id).enabled is False
        with pytest.raises(sonzai.BadRequestError) as refused:
            client.schedules.update(A, U, course.schedule_id, enabled=True)
        assert refused.value.code == "INVALID_WINDOW"
        assert "ends_at" in str(refused.value)


def test_reset_puts_the_pair_back_on_real_time(database_url: str) -> None:
    """
    Reset: the offset goes, instants already on the schedule stay (the ticks the pair's
    clock passed fired in simulated time and do not fire again), and the next one is
    due at its instant in real time.
    """
    headers_key = "alpha"
    with served(database_url, ManualClock(START)) as (api, client):
        created = create_daily(client)
        client.workbench.advance_time(A, U, 48)

        answer = httpx.post(
            f"{api.base_url}/api/v1/workbench/reset-clock",
            json={"agent_id": A, "user_id": U},
            headers={"Authorization": f"Bearer {api.keys[headers_key]}"},
            timeout=10,
        )

        assert answer.status_code == 200, answer.text
        assert answer.json() == {
            "agent_id": A,
            "user_id": U,
            "previous_offset_hours": 48.0,
            "clock": z(START),
        }
        assert client.schedules.get(A, U, created.schedule_id).next_fire_at == z(at(3))
        assert client.schedules.upcoming(A, U, created.schedule_id, limit=2).upcoming == [
            z(at(3)),
            z(at(4)),
        ]
        assert _run(scheduler_pass(database_url, at(1, 9))) == []
        assert _run(scheduler_pass(database_url, at(3, 9))) == [fire_id(created.schedule_id, at(3))]
        wakeup = client.agents.schedule_wakeup(
            A, user_id=U, check_type="check_in", intent="now", delay_hours=1
        )
        assert wakeup.scheduled_at == z(START + timedelta(hours=1))
        again = httpx.post(
            f"{api.base_url}/api/v1/workbench/reset-clock",
            json={"agent_id": A, "user_id": U},
            headers={"Authorization": f"Bearer {api.keys[headers_key]}"},
            timeout=10,
        )
        assert again.json()["previous_offset_hours"] == 0.0
        bad = httpx.post(
            f"{api.base_url}/api/v1/workbench/reset-clock",
            json={"agent_id": A},
            headers={"Authorization": f"Bearer {api.keys[headers_key]}"},
            timeout=10,
        )
        assert bad.status_code == 400
        assert bad.json()["errors"][0]["field"] == "user_id"


def test_reset_clock_from_the_cli(database_url: str) -> None:
    """``delivery workbench reset-clock`` resets the pair in the settings' database."""
    with served(database_url, ManualClock(START)) as (_, client):
        client.workbench.advance_time(A, U, 30)
        done = cli(database_url, "workbench", "reset-clock", "--agent", A, "--user", U)
        assert json.loads(done.stdout)["previous_offset_hours"] == 30.0
        wakeup = client.agents.schedule_wakeup(
            A, user_id=U, check_type="check_in", intent="now", delay_hours=1
        )
        assert wakeup.scheduled_at == z(START + timedelta(hours=1))


def test_advance_composes_with_the_project_template(database_url: str) -> None:
    """Advance-time writes its messages as the dispatcher does: the project's template first."""
    with served(database_url, ManualClock(START)) as (api, client):
        saved = httpx.post(
            f"{api.base_url}/api/v1/templates",
            json={
                "check_type": "reminder",
                "source": "schedule",
                "body": "Ping at {{ local_clock }}",
            },
            headers={"Authorization": f"Bearer {api.keys['alpha']}"},
            timeout=10,
        )
        assert saved.status_code == 201, saved.text
        create_daily(client)

        result = client.workbench.advance_time(A, U, 24)

        assert [w.generated_message for w in result.wakeups_executed] == ["Ping at 09:00"]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)
