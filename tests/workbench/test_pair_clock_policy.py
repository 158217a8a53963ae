"""
The delivery policies on an advanced pair's clock: the attention budget counts the
pair's messages on its clock, a deferral is released when the pair's clock reaches
the opening, a deadline passes on the pair's clock, and advance-time decides its
fires by the dispatcher's rules and records each decision. Through the served API
(the SDK, HTTP where it has no method) with the real scheduler, dispatcher and
relay steps on the same database, on SQLite and PostgreSQL.
"""

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.store.engine import create_engine
from delivery.store.policy import expire_due
from delivery.store.staging import promote
from delivery.store.tables import NOTIFICATIONS, OUTBOX
from tests.api.server import ServedApi
from tests.workbench.test_pair_clock import (
    START,
    SUBJECTS,
    A,
    U,
    _run,
    at,
    scheduler_pass,
    served,
    timeline,
    z,
)

B = "agent_other"


def call(api: ServedApi, method: str, path: str, body: Any = None) -> httpx.Response:
    """One authorised request as project alpha (the routes the SDK has no method for)."""
    response = httpx.request(
        method,
        f"{api.base_url}{path}",
        json=body,
        headers={"Authorization": f"Bearer {api.keys['alpha']}"},
        timeout=10,
    )
    assert response.status_code < 300, response.text
    return response


def budget(api: ServedApi, limit: int, window_s: int) -> None:
    call(
        api,
        "PUT",
        "/api/v1/policy",
        {"attention_budget": {"limit": limit, "window_seconds": window_s}},
    )


def wakeup(api: ServedApi, agent: str = A, **fields: Any) -> str:
    body = {"user_id": U, "check_type": "check_in", "intent": "ask how it went", **fields}
    created = call(api, "POST", f"/api/v1/agents/{agent}/wakeups", body).json()
    wakeup_id: str = created["wakeup_id"]
    return wakeup_id


def daily(api: ServedApi, hour: int, **fields: Any) -> str:
    body = {
        **fields,
        "cadence": {
            "simple": {"frequency": "daily", "times": [f"{hour:02d}:00"]},
            "timezone": "UTC",
        },
        "intent": "check in on the user",
        "check_type": "reminder",
    }
    created = call(api, "POST", f"/api/v1/agents/{A}/users/{U}/schedules", body).json()
    schedule_id: str = created["schedule_id"]
    return schedule_id


def on_engine[T](database_url: str, use: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """``use`` on a fresh engine over the database, disposed after."""

    async def run() -> T:
        engine = create_engine(database_url)
        try:
            return await use(engine)
        finally:
            await engine.dispose()

    return _run(run())


def notes(database_url: str) -> dict[str, dict[str, Any]]:
    """Every notification row, by source id."""

    async def read(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
        async with engine.connect() as conn:
            rows = (await conn.execute(select(NOTIFICATIONS))).mappings().all()
        return {r["source_id"]: dict(r) for r in rows}

    return on_engine(database_url, read)


def relay_promote(database_url: str, real_now: datetime) -> int:
    return on_engine(database_url, lambda engine: promote(engine, real_now))


def sweep(database_url: str, real_now: datetime) -> list[str]:
    return on_engine(database_url, lambda engine: expire_due(engine, real_now))


def available_at(database_url: str, msg_id: str) -> datetime:
    async def read(engine: AsyncEngine) -> datetime:
        async with engine.connect() as conn:
            found: datetime = (
                await conn.execute(select(OUTBOX.c.available_at).where(OUTBOX.c.msg_id == msg_id))
            ).scalar_one()
        return found

    return on_engine(database_url, read)


def test_budget_counts_an_advanced_pair_on_its_clock(database_url: str) -> None:
    """
    Two messages a day; a daily schedule advanced 7 days leaves seven messages dated on
    the pair's clock, one a day. An hour later (the pair's 8 May 01:00) two wakeups fire:
    the window ending at the pair's now holds one message (7 May 09:00), so the high one
    passes and the normal one is over. A wakeup of the user's other agent, on real time,
    counts none of the advanced pair's messages and passes.
    """
    with served(database_url, ManualClock(START)) as (api, client):
        budget(api, 2, 86_400)
        daily(api, 9)
        result = client.workbench.advance_time(A, U, 168)
        assert len(result.wakeups_executed) == 7
        high = wakeup(api, delay_hours=1, priority="high")
        normal = wakeup(api, delay_hours=1)
        other = wakeup(api, agent=B, delay_hours=1)

        fired = _run(scheduler_pass(database_url, START + timedelta(hours=1)))

    assert sorted(fired) == sorted([high, normal, other])
    rows = notes(database_url)
    assert sum(r["status"] == "pending" for r in rows.values()) == 7 + 2
    assert (rows[high]["status"], rows[high]["created_at"]) == ("pending", at(8, 1))
    assert (rows[normal]["status"], rows[normal]["status_reason"]) == (
        "suppressed",
        "attention_budget",
    )
    assert (rows[other]["status"], rows[other]["created_at"]) == (
        "pending",
        START + timedelta(hours=1),
    )


def test_advance_time_applies_the_budget_at_each_fire(database_url: str) -> None:
    """
    Two messages a day, three schedules a day (09, 10, 11): advancing 7 days decides each
    fire in the window ending at its own instant on the pair's clock, so 09:00 and 10:00
    pass every day and 11:00 is suppressed, each recorded on the timeline as the
    dispatcher records it (``suppressed/attention_budget``).
    """
    with served(database_url, ManualClock(START)) as (api, client):
        budget(api, 2, 86_400)
        for hour in (9, 10, 11):
            daily(api, hour)
        client.workbench.advance_time(A, U, 168)
        events = timeline(api)

    composed = [e for e in events if e["kind"] == "notification.composed"]
    assert len(composed) == 21
    over = [e for e in composed if e["detail"].get("reason") == "attention_budget"]
    assert [e["at"] for e in over] == [z(at(day, 11)) for day in range(1, 8)]
    assert all("suppressed/attention_budget" in e["summary"] for e in over)
    rows = notes(database_url)
    assert sorted(r["fire_at"] for r in rows.values() if r["status"] == "pending") == sorted(
        at(day, hour) for day in range(1, 8) for hour in (9, 10)
    )


def test_a_deadline_passes_on_the_pair_clock(database_url: str) -> None:
    """
    On a pair advanced 48 h, a wakeup with ``ttl_seconds`` of an hour fires at the pair's
    49 h: its deadline is the pair's 50 h, real 02:00. Before it the message is listed;
    at it, the list leaves it out, consume refuses it and the sweep expires it. A second
    one is listed until an advance takes the pair's clock past its deadline.
    """
    clock = ManualClock(START)
    with served(database_url, clock) as (api, client):
        client.workbench.advance_time(A, U, 48)
        first = wakeup(api, delay_hours=1, ttl_seconds=3600)
        assert _run(scheduler_pass(database_url, START + timedelta(hours=1))) == [first]

        clock.set(START + timedelta(hours=1, minutes=59))
        assert [
            n.wakeup_id for n in client.agents.notifications.list(A, user_id=U).notifications
        ] == [first]
        assert sweep(database_url, clock.now()) == []
        clock.set(START + timedelta(hours=2))
        assert client.agents.notifications.list(A, user_id=U).notifications == []
        [note_id] = [r["id"] for r in notes(database_url).values()]
        refused = httpx.post(
            f"{api.base_url}/api/v1/agents/{A}/notifications/{note_id}/consume",
            headers={"Authorization": f"Bearer {api.keys['alpha']}"},
            timeout=10,
        )
        assert refused.status_code == 409, refused.text
        assert sweep(database_url, clock.now()) == [note_id]

        second = wakeup(api, delay_hours=1, ttl_seconds=3600)  # the pair's 51 h, until 52 h
        assert _run(scheduler_pass(database_url, START + timedelta(hours=3))) == [second]
        clock.set(START + timedelta(hours=3, minutes=10))
        listed = client.agents.notifications.list(A, user_id=U).notifications
        assert [n.wakeup_id for n in listed] == [second]
        client.workbench.advance_time(A, U, 1)  # the pair's 52 h 10
        assert client.agents.notifications.list(A, user_id=U).notifications == []

    assert notes(database_url)[second]["expires_at"] < START + timedelta(hours=3, minutes=10)


def test_a_deferral_is_released_when_the_pair_clock_opens(database_url: str) -> None:
    """
    Quiet hours 22:00-07:00 UTC; a pair advanced 48 h. A deferring wakeup due at the
    pair's 3 May 01:00 (real 01:00) is held until the pair's 07:00: real 07:00, when the
    relay releases it, dated the pair's 07:00.
    """
    clock = ManualClock(START)
    with served(database_url, clock) as (api, client):
        call(
            api,
            "PUT",
            f"/api/v1/policy/users/{U}/quiet_hours",
            {"timezone": "UTC", "start": "22:00", "end": "07:00"},
        )
        client.workbench.advance_time(A, U, 48)
        held = wakeup(api, delay_hours=1, outside_window="defer")
        assert _run(scheduler_pass(database_url, START + timedelta(hours=1))) == [held]
        row = notes(database_url)[held]
        assert (row["status"], row["status_reason"]) == ("staged", "deferred_quiet_hours")
        assert available_at(database_url, row["id"]) == START + timedelta(hours=7)

        assert relay_promote(database_url, START + timedelta(hours=6, minutes=59)) == 0
        assert relay_promote(database_url, START + timedelta(hours=7)) == 1
        clock.set(START + timedelta(hours=7))
        [note] = client.agents.notifications.list(A, user_id=U).notifications

    assert (note.wakeup_id, note.created_at) == (held, z(at(3, 7)))
    assert notes(database_url)[held]["fire_at"] == at(3, 7)


def test_advance_time_defers_into_the_pair_quiet_hours_opening(database_url: str) -> None:
    """
    Quiet hours 22:00-07:00 UTC, a deferring schedule at 23:00, advanced 48 h (the
    pair's 3 May 00:00): 1 May 23:00 is held until 2 May 07:00, which the pair's clock
    has passed, so the relay releases it at once, dated then; 2 May 23:00 is held until
    3 May 07:00, 7 real hours ahead.
    """
    clock = ManualClock(START)
    with served(database_url, clock) as (api, client):
        call(
            api,
            "PUT",
            f"/api/v1/policy/users/{U}/quiet_hours",
            {"timezone": "UTC", "start": "22:00", "end": "07:00"},
        )
        daily(api, 23, outside_window="defer")
        client.workbench.advance_time(A, U, 48)
        held = {r["fire_at"]: r for r in notes(database_url).values()}
        assert {(r["status"], r["status_reason"]) for r in held.values()} == {
            ("staged", "deferred_quiet_hours")
        }
        assert sorted(held) == [START - timedelta(hours=17), START + timedelta(hours=7)]

        assert relay_promote(database_url, START) == 1
        [note] = client.agents.notifications.list(A, user_id=U).notifications
        assert (note.check_type, note.created_at) == ("reminder", z(at(2, 7)))
        assert relay_promote(database_url, START + timedelta(hours=7)) == 1
        clock.set(START + timedelta(hours=7))
        listed = client.agents.notifications.list(A, user_id=U).notifications
        assert [n.created_at for n in listed] == [z(at(2, 7)), z(at(3, 7))]


def test_after_a_reset_the_pairs_future_dated_messages_spend_no_real_time_budget(
    database_url: str,
) -> None:
    """
    Two messages a day; a daily schedule advanced 7 days leaves seven messages dated on
    the old clock, days ahead of real time, and a reset puts the pair back on real
    time. A wakeup of the user's other agent an hour later counts only what is dated
    in the real window ending then (none), so it passes.
    """
    with served(database_url, ManualClock(START)) as (api, client):
        budget(api, 2, 86_400)
        daily(api, 9)
        client.workbench.advance_time(A, U, 168)
        call(api, "POST", "/api/v1/workbench/reset-clock", {"agent_id": A, "user_id": U})
        other = wakeup(api, agent=B, delay_hours=1)

        assert _run(scheduler_pass(database_url, START + timedelta(hours=1))) == [other]

    assert notes(database_url)[other]["status"] == "pending"


def test_an_advanced_pairs_trigger_events_are_budgeted_on_its_clock(database_url: str) -> None:
    """
    A trigger event carries no offset of its own: the dispatcher reads its pair's. Two
    messages a day, seven of them dated on a pair advanced 7 days; two events an hour
    later (the pair's 8 May 01:00) find one message in the window ending there, so the
    high one passes, dated on the pair's clock, and the normal one is over.
    """
    with served(database_url, ManualClock(START)) as (api, client):
        budget(api, 2, 86_400)
        daily(api, 9)
        client.workbench.advance_time(A, U, 168)
        path = f"/api/v1/agents/{A}/events"
        body = {"user_id": U, "event_type": "nudge"}
        high = call(api, "POST", path, {**body, "priority": "high"}).json()["event_id"]
        normal = call(api, "POST", path, body).json()["event_id"]

    processor = partial(
        Processor, composer=TemplateComposer(), subjects=SUBJECTS, clock=ManualClock(at(1, 1))
    )
    refs = [SourceRef(SourceKind.EVENT, high), SourceRef(SourceKind.EVENT, normal)]
    on_engine(database_url, lambda engine: processor(engine).process(refs))
    rows = notes(database_url)
    assert (rows[high]["status"], rows[high]["created_at"]) == ("pending", at(8, 1))
    assert (rows[normal]["status"], rows[normal]["status_reason"]) == (
        "suppressed",
        "attention_budget",
    )
