"""
The official sonzai SDK (sync and async), unchanged, against the API served by uvicorn,
on SQLite and PostgreSQL: every in-scope H method, plus the strict G / G* models as
shape checks.
"""

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sonzai
from sonzai._generated.resources.events import AsyncEvents, Events
from sonzai._generated.resources.wakeups import AsyncWakeups, Wakeups
from sqlalchemy import select

from delivery.clock import ManualClock
from delivery.store.bulk import OUTBOX as OUTBOX_TABLE
from delivery.store.engine import create_engine
from delivery.store.tables import EVENTS as TRIGGER_EVENTS_TABLE
from tests.api.notes import add_notifications, notification
from tests.api.server import serve_api

START = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
CADENCE = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "Asia/Singapore"}
A, U = "agent-1", "user-1"


async def _seed_notifications(url: str, project_id: str) -> None:
    engine = create_engine(url)
    try:
        rows = [notification(project_id, A, U, n, START) for n in range(1, 4)]
        rows.append(notification(project_id, A, "user-2", 4, START, source_type="wakeup"))
        await add_notifications(engine, rows)
    finally:
        await engine.dispose()


async def _event_rows(url: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            events = (await conn.execute(select(TRIGGER_EVENTS_TABLE.c.id))).scalars().all()
            outbox = (
                await conn.execute(
                    select(OUTBOX_TABLE.c.subject, OUTBOX_TABLE.c.msg_id, OUTBOX_TABLE.c.payload)
                )
            ).all()
        return list(events), [tuple(r) for r in outbox]
    finally:
        await engine.dispose()


def test_sync_sdk_drives_every_call(database_url: str) -> None:
    """Each H method of the sync client round-trips; G / G* models accept every response."""
    clock = ManualClock(START)
    with (
        serve_api(database_url, clock) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        # Inventory item first: the schedule links to it.
        item = client.agents.inventory.create(
            A, U, item_type="medication", label="Ibuprofen", properties={"dosage": "500mg"}
        )
        assert item.status == "added"
        assert item.fact_id.startswith("inv_")
        assert item.inventory_item_id == item.fact_id

        created = client.schedules.create(
            A,
            U,
            cadence=CADENCE,
            intent="check in",
            check_type="reminder",
            active_window={"hours": {"start": "08:00", "end": "22:00"}},
            inventory_item_id=item.fact_id,
            metadata={"campaign": "x"},
            starts_at="2026-05-01T00:00:00Z",
            ends_at="2026-05-14T23:59:59Z",
        )
        assert created.next_fire_at == "2026-05-01T01:00:00Z"
        assert created.next_fire_at_local == "2026-05-01T09:00:00+08:00"
        assert created.enabled is True
        sid = created.schedule_id
        assert sid.startswith("sch_")

        got = client.schedules.get(A, U, sid)
        assert json.loads(got.cadence) == CADENCE
        canonical = json.dumps(json.loads(got.cadence), sort_keys=True, separators=(",", ":"))
        assert got.cadence == canonical
        assert got.metadata == '{"campaign":"x"}'
        assert got.inventory_item_id == item.fact_id
        assert got.timezone == "Asia/Singapore"
        assert got.next_fire_at == "2026-05-01T01:00:00Z"
        assert got.ends_at == "2026-05-14T23:59:59Z"
        dto = client.schedules.get_schedule(A, U, sid)  # G: extra keys forbidden
        assert dto.schedule_id == sid
        assert [s.schedule_id for s in client.schedules.list(A, U).schedules] == [sid]
        assert len(client.schedules.list_schedules(A, U).schedules or []) == 1
        assert client.schedules.list(A, "nobody").schedules == []

        upcoming = client.schedules.upcoming(A, U, sid, limit=3)
        assert upcoming.upcoming == [
            "2026-05-01T01:00:00Z",
            "2026-05-02T01:00:00Z",
            "2026-05-03T01:00:00Z",
        ]
        client.schedules.upcoming_schedule(A, U, sid, limit=2)

        off = client.schedules.update(A, U, sid, enabled=False)
        assert off.enabled is False
        assert off.next_fire_at == ""
        assert client.schedules.upcoming(A, U, sid).upcoming == []
        on = client.schedules.update(
            A, U, sid, enabled=True, cadence={**CADENCE, "timezone": "Europe/London"}
        )
        assert on.enabled is True
        assert on.timezone == "Europe/London"
        assert on.next_fire_at == "2026-05-01T08:00:00Z"  # 09:00 BST
        assert client.schedules.update(A, U, sid, intent="new").intent == "new"

        bad: list[tuple[dict[str, Any], dict[str, Any] | None, str | None, str]] = [
            ({**CADENCE, "timezone": "Mars/Base"}, None, None, "INVALID_TIMEZONE"),
            ({**CADENCE, "timezone": "+08:00"}, None, None, "INVALID_TIMEZONE"),
            (CADENCE, {"days_of_week": []}, None, "INVALID_ACTIVE_WINDOW"),
            (CADENCE, None, "2026-04-01T00:00:00Z", "INVALID_WINDOW"),
            (CADENCE, None, "9999-12-31T23:59:59Z", "INVALID_REQUEST"),
            ({"cron": "* * * * *", "timezone": "UTC"}, None, None, "CADENCE_TOO_DENSE"),
        ]
        for cadence, window, ends_at, code in bad:
            with pytest.raises(sonzai.BadRequestError) as caught:
                client.schedules.create(
                    A,
                    U,
                    cadence=cadence,
                    intent="x",
                    check_type="reminder",
                    active_window=window,
                    ends_at=ends_at,
                )
            assert caught.value.code == code, (cadence, window, ends_at)
        assert len(client.schedules.list(A, U).schedules) == 1
        with pytest.raises(sonzai.BadRequestError) as caught:
            client.schedules.list("team/agent", U)  # the SDK does not escape '/'
        assert caught.value.code == "INVALID_ID"

        # Wakeups: scheduled_at wins over delay_hours.
        birthday = client.agents.schedule_wakeup(
            A,
            user_id=U,
            check_type="birthday",
            intent="wish",
            delay_hours=48,
            scheduled_at="2026-06-15T09:00:00Z",
            occasion="30th birthday",
        )
        assert birthday.scheduled_at == "2026-06-15T09:00:00Z"
        soon = client.agents.schedule_wakeup(
            A, user_id=U, check_type="follow_up", intent="ask", delay_hours=2
        )
        assert soon.scheduled_at == "2026-05-01T02:00:00Z"
        strict = Wakeups(client._http).schedule_wakeup(  # G*: exactly two keys
            A, user_id="user-2", check_type="x", intent="y", delay_hours=0
        )
        assert strict.scheduled_at == "2026-05-01T00:00:00Z"
        for placeholder in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"):
            with pytest.raises(sonzai.BadRequestError) as caught:
                client.agents.schedule_wakeup(
                    A,
                    user_id=U,
                    check_type="x",
                    intent="y",
                    delay_hours=1,
                    scheduled_at=placeholder,
                )
            assert caught.value.code == "INVALID_REQUEST"
            assert "scheduled_at" in str(caught.value)
        listed = client.agents.get_wakeups(A, user_id=U).wakeups
        assert [w.wakeup_id for w in listed] == [soon.wakeup_id, birthday.wakeup_id]
        assert listed[1].occasion == "30th birthday"
        assert len(Wakeups(client._http).list_wakeups(A, status="pending").wakeups or []) == 3
        with httpx.Client(
            base_url=served.base_url, headers={"Authorization": f"Bearer {served.keys['alpha']}"}
        ) as raw:
            cancel = raw.delete(f"/api/v1/agents/{A}/wakeups/{soon.wakeup_id}")
            assert cancel.json() == {"wakeup_id": soon.wakeup_id, "status": "cancelled"}
            again = raw.delete(f"/api/v1/agents/{A}/wakeups/{soon.wakeup_id}")
            assert again.json() == cancel.json()  # idempotent
            live = raw.get(f"/api/v1/agents/{A}/users/{U}/inventory/{item.fact_id}").json()
            assert live["properties"] == {"dosage": "500mg"}
        assert len(Wakeups(client._http).list_wakeups(A, status="cancelled").wakeups or []) == 1

        # Trigger events: the event row and its outbox message.
        accepted = client.agents.trigger_backend_event(
            A,
            user_id=U,
            event_type="level_up",
            event_description="cleared chapter 5",
            metadata={"level": "5"},
            messages=[{"role": "user", "content": "hi"}],
        )
        assert accepted.accepted is True
        assert accepted.event_id.startswith("evt_")
        strict_event = Events(client._http).trigger_backend_event(
            A, user_id=U, event_type="achievement"
        )
        events, outbox = asyncio.run(_event_rows(database_url))
        assert set(events) == {accepted.event_id, strict_event.event_id}
        assert (
            "test.event.accepted",
            accepted.event_id,
            json.dumps({"event_id": accepted.event_id, "version": 1}, separators=(",", ":")),
        ) in outbox

        # The polling queue.
        asyncio.run(_seed_notifications(database_url, served.projects["alpha"]))
        pending = client.agents.notifications.list(A, user_id=U).notifications
        assert [n.generated_message for n in pending] == ["hello 1", "hello 2", "hello 3"]
        assert pending[0].intent == "check in"
        assert pending[0].wakeup_id == ""
        strict_list = client.agents.notifications.list_notifications(A, limit=10).notifications
        assert strict_list is not None  # G
        assert len(strict_list) == 4
        wakeup_note = next(n for n in strict_list if n.user_id == "user-2")
        assert wakeup_note.wakeup_id == "wk_4"
        first = pending[0].message_id
        assert client.agents.notifications.consume(A, first).success is True
        assert client.agents.notifications.consume(A, first).success is True  # retry-safe
        with pytest.raises(sonzai.NotFoundError):
            client.agents.notifications.consume(A, "msg_unknown")
        assert len(client.agents.notifications.list(A, user_id=U).notifications) == 2
        consumed = client.agents.notifications.list(A, status="consumed").notifications
        assert [n.message_id for n in consumed] == [first]
        assert consumed[0].consumed_at == "2026-05-01T00:00:00Z"
        history = client.agents.notifications.history(A).notifications
        assert len(history) == 4
        assert history[-1].message_id == first  # newest first
        client.agents.notifications.get_notification_history(A, limit=2)  # G
        with pytest.raises(sonzai.BadRequestError) as caught:
            client.agents.notifications.list(A, limit=501)
        assert caught.value.code == "INVALID_LIMIT"

        # The project view over the same rows.
        project_id = served.projects["alpha"]
        plist = client.project_notifications.list(project_id)
        assert plist.count == 4
        strict_p = client.project_notifications.list_project_notifications(project_id).notifications
        assert strict_p is not None  # G
        assert strict_p[0].payload == {"message_id": "msg_1", "n": 1}
        ids = [n.notification_id for n in strict_p]
        assert client.project_notifications.acknowledge(project_id, ids[:1]).acknowledged == 1
        assert client.project_notifications.acknowledge(project_id, ids[:1]).acknowledged == 0
        rest = client.project_notifications.acknowledge_all(project_id, agent_id=A)
        assert rest.acknowledged == 3
        assert client.project_notifications.list(project_id).count == 0
        with pytest.raises(sonzai.NotFoundError):
            client.project_notifications.list(served.projects["beta"])

        # Inventory writes the schedule reads live.
        groups = client.agents.inventory.query(A, U).to_list()
        assert [(g.group, g.values) for g in groups] == [("medication", {"count": 1})]
        updated = client.agents.inventory.direct_update(
            A, U, item.fact_id, properties={"dosage": "250mg", "with_food": True}
        )
        assert (updated.status, updated.fact_id) == ("updated", item.fact_id)
        via_action = client.agents.inventory.update(
            A, U, action="update", item_type="medication", label="Ibuprofen", properties={"n": 2}
        )
        assert via_action.status == "updated"
        assert client.agents.inventory.direct_delete(A, U, item.fact_id).status == "deleted"
        # Idempotent: deleting it again answers the same.
        assert client.agents.inventory.direct_delete(A, U, item.fact_id).status == "deleted"

        assert client.schedules.delete(A, U, sid).success is True
        with pytest.raises(sonzai.NotFoundError) as missing:
            client.schedules.get(A, U, sid)
        assert missing.value.code == "NOT_FOUND"


async def test_async_sdk_drives_every_call(database_url: str) -> None:
    """The async client sends the same requests and parses the same responses."""
    clock = ManualClock(START)
    with serve_api(database_url, clock) as served:
        async with sonzai.AsyncSonzai(
            api_key=served.keys["beta"], base_url=served.base_url
        ) as client:
            item = await client.agents.inventory.create(A, U, item_type="plant")
            created = await client.schedules.create(
                A,
                U,
                cadence={"cron": "0 9 * * 1-5", "timezone": "America/New_York"},
                intent="water",
                check_type="reminder",
                inventory_item_id=item.fact_id,
            )
            assert created.next_fire_at == "2026-05-01T13:00:00Z"  # Friday 09:00 EDT
            assert created.next_fire_at_local == "2026-05-01T09:00:00-04:00"
            sid = created.schedule_id
            got = await client.schedules.get(A, U, sid)
            assert got.cadence_type == "cron"
            await client.schedules.get_schedule(A, U, sid)
            assert len((await client.schedules.list(A, U)).schedules) == 1
            up = await client.schedules.upcoming(A, U, sid, limit=2)
            assert up.upcoming == ["2026-05-01T13:00:00Z", "2026-05-04T13:00:00Z"]
            patched = await client.schedules.update(A, U, sid, metadata={"k": "v"})
            assert patched.metadata == '{"k":"v"}'
            cleared = await client.schedules.update(A, U, sid, metadata={})
            assert "metadata" not in cleared.model_dump(exclude_defaults=True)
            with pytest.raises(sonzai.BadRequestError) as caught:
                await client.schedules.update(A, U, sid, cadence={"cron": "61 * * * *"})
            assert caught.value.code in {"INVALID_CADENCE", "INVALID_TIMEZONE"}

            wk = await client.agents.schedule_wakeup(
                A, user_id=U, check_type="check_in", intent="say hi", delay_hours=1
            )
            assert wk.scheduled_at == "2026-05-01T01:00:00Z"
            await AsyncWakeups(client._http).schedule_wakeup(
                A, user_id=U, check_type="x", intent="y", delay_hours=3
            )
            assert len((await client.agents.get_wakeups(A)).wakeups) == 2
            assert len((await AsyncWakeups(client._http).list_wakeups(A)).wakeups or []) == 2
            ev = await client.agents.trigger_backend_event(A, user_id=U, event_type="milestone")
            assert ev.accepted is True
            await AsyncEvents(client._http).trigger_backend_event(A, user_id=U, event_type="m")

            await _seed_notifications(database_url, served.projects["beta"])
            pending = (await client.agents.notifications.list(A)).notifications
            assert len(pending) == 4
            assert (await client.agents.notifications.consume(A, pending[0].message_id)).success
            assert len((await client.agents.notifications.history(A)).notifications) == 4
            await client.agents.notifications.list_notifications(A)
            project_id = served.projects["beta"]
            listing = await client.project_notifications.list(project_id, limit=2)
            assert listing.count == 2
            await client.project_notifications.list_project_notifications(project_id)
            acked = await client.project_notifications.acknowledge_all(project_id)
            assert acked.acknowledged == 4

            assert (
                await client.agents.inventory.direct_update(A, U, item.fact_id, properties={"a": 1})
            ).status == "updated"
            assert (await client.agents.inventory.direct_delete(A, U, item.fact_id)).status == (
                "deleted"
            )
            assert (await client.schedules.delete(A, U, sid)).success is True
            assert (await client.schedules.delete(A, U, sid)).success is True  # 204: idempotent
