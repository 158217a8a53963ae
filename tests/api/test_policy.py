"""
The delivery policy over the API, on SQLite and PostgreSQL: the project policy
(off until set, replaced whole), users' quiet hours, the per-source fields on
schedules, wakeups and events, bad input refused naming the field, tenancy.
"""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from delivery.api.openapi import EXAMPLES
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.scheduler import Scheduler
from delivery.store.tables import (
    NOTIFICATIONS,
    POLICIES,
    QUIET_HOURS,
    NotificationRow,
    ScheduleRow,
    WakeupRow,
)
from tests.api.conftest import Api
from tests.dispatcher import rows

OFF = {"attention_budget": None, "outside_window": None}


async def test_policy_is_off_until_set_then_replaced_whole(api: Api) -> None:
    """GET answers every rule null; PUT stores the body; a second PUT replaces it."""
    assert (await api.alpha.get("/api/v1/policy")).json() == OFF

    put = await api.alpha.put("/api/v1/policy", json=EXAMPLES["PolicyBody"])
    assert put.status_code == 200, put.text
    assert put.json() == {
        "attention_budget": {"limit": 3, "window_seconds": 86400},
        "outside_window": "defer",
    }
    assert (await api.alpha.get("/api/v1/policy")).json() == put.json()

    again = await api.alpha.put("/api/v1/policy", json={"outside_window": "skip"})
    assert again.json() == {"attention_budget": None, "outside_window": "skip"}
    assert await api.store.count(POLICIES) == 1


async def test_policy_is_per_project(api: Api) -> None:
    """Another project's policy is not read, and its project-scoped route is 404."""
    await api.alpha.put("/api/v1/policy", json=EXAMPLES["PolicyBody"])
    assert (await api.beta.get("/api/v1/policy")).json() == OFF
    alpha = api.projects["alpha"]
    assert (await api.alpha.get(f"/api/v1/projects/{alpha}/policy")).json()["outside_window"]
    assert (await api.beta.get(f"/api/v1/projects/{alpha}/policy")).status_code == 404


async def test_bad_policy_is_400_naming_the_field(api: Api) -> None:
    """Unknown actions, a zero window, unknown keys: 400, nothing written."""
    for body, field in (
        ({"outside_window": "later"}, "outside_window"),
        ({"attention_budget": {"limit": 3, "window_seconds": 0}}, "window_seconds"),
        ({"attention_budget": {"limit": -1, "window_seconds": 3600}}, "limit"),
        ({"quiet": True}, "quiet"),
    ):
        response = await api.alpha.put("/api/v1/policy", json=body)
        assert response.status_code == 400, body
        assert field in response.text
    assert await api.store.count(POLICIES) == 0


async def test_quiet_hours_set_read_delete(api: Api) -> None:
    """PUT, GET, DELETE (then 204 and 404), per user."""
    path = "/api/v1/policy/users/user_1/quiet_hours"
    assert (await api.alpha.get(path)).status_code == 404
    put = await api.alpha.put(path, json=EXAMPLES["QuietHoursBody"])
    assert put.status_code == 200, put.text
    expected = {
        "user_id": "user_1",
        "timezone": "America/New_York",
        "start": "22:00",
        "end": "07:30",
    }
    assert put.json() == expected
    assert (await api.alpha.get(path)).json() == expected
    assert (await api.beta.get(path)).status_code == 404
    deleted = await api.alpha.delete(path)
    assert (deleted.status_code, deleted.json()) == (200, {"success": True})
    assert (await api.alpha.delete(path)).status_code == 204
    assert await api.store.count(QUIET_HOURS) == 0


async def test_bad_quiet_hours_are_400(api: Api) -> None:
    """An unknown zone, a malformed time or an empty window: 400 naming the field."""
    path = "/api/v1/policy/users/user_1/quiet_hours"
    for body, code, field in (
        (
            {"timezone": "Mars/Olympus", "start": "22:00", "end": "07:00"},
            "INVALID_TIMEZONE",
            "timezone",
        ),
        ({"timezone": "UTC", "start": "25:00", "end": "07:00"}, "INVALID_REQUEST", "start"),
        ({"timezone": "UTC", "start": "07:00", "end": "07:00"}, "INVALID_REQUEST", "end"),
    ):
        response = await api.alpha.put(path, json=body)
        assert response.status_code == 400, body
        assert response.json()["code"] == code
        assert field in response.json()["message"]
    assert await api.store.count(QUIET_HOURS) == 0


async def test_wakeup_stores_its_policy_fields(api: Api) -> None:
    """priority, outside_window, ttl_seconds, expires_at, supersede_key are stored additively."""
    body = {
        **EXAMPLES["WakeupCreate"],
        "expires_at": "2030-01-01T00:00:00Z",
        "supersede_key": "interview",
    }
    response = await api.alpha.post("/api/v1/agents/agent_1/wakeups", json=body)
    assert response.status_code == 201, response.text
    assert set(response.json()) == {"wakeup_id", "scheduled_at"}
    stored = await rows.row(api.store.engine, WakeupRow, response.json()["wakeup_id"])
    assert json.loads(stored["policy_json"]) == {
        "priority": "high",
        "outside_window": "defer",
        "ttl_seconds": 21600,
        "expires_at": "2030-01-01T00:00:00+00:00",
        "supersede_key": "interview",
    }


async def test_bad_source_policy_fields_are_400(api: Api) -> None:
    """An unknown priority, a bad deadline or outside_window on an event: 400, no row."""
    wakeups = "/api/v1/agents/agent_1/wakeups"
    base = {"user_id": "user_1", "check_type": "x", "intent": "y", "delay_hours": 1}
    for body, field in (
        ({**base, "priority": "urgent"}, "priority"),
        ({**base, "ttl_seconds": 0}, "ttl_seconds"),
        ({**base, "expires_at": "tomorrow"}, "expires_at"),
    ):
        response = await api.alpha.post(wakeups, json=body)
        assert response.status_code == 400, body
        assert field in response.text
    event = {"user_id": "user_1", "event_type": "x", "outside_window": "defer"}
    response = await api.alpha.post("/api/v1/agents/agent_1/events", json=event)
    assert response.status_code == 400
    assert "outside_window" in response.text
    assert await api.store.count(WakeupRow.__table__) == 0  # type: ignore[attr-defined]


async def test_policy_decisions_are_on_the_timeline_and_explained(api: Api) -> None:
    """A message over the budget shows suppressed/attention_budget, and explain says why."""
    await api.alpha.put(
        "/api/v1/policy", json={"attention_budget": {"limit": 1, "window_seconds": 86400}}
    )
    user = "/api/v1/agents/agent_t/users/user_t"
    sent = []
    for minutes in (0, 5):
        at = api.clock.now()
        response = await api.alpha.post(
            "/api/v1/agents/agent_t/events", json={"user_id": "user_t", "event_type": "nudge"}
        )
        assert response.status_code in (200, 201, 202), response.text
        refs = [SourceRef(SourceKind.EVENT, response.json()["event_id"])]
        await Processor(
            api.store.engine, TemplateComposer(), Subjects("tl"), ManualClock(at)
        ).process(refs)
        sent.append(at)
        api.clock.advance(timedelta(minutes=5 + minutes))

    page = (await api.alpha.get(f"{user}/timeline")).json()
    composed = [e for e in page["events"] if e["kind"] == "notification.composed"]
    assert [e["detail"].get("reason") for e in composed] == [None, "attention_budget"]
    assert "suppressed/attention_budget" in composed[1]["summary"]

    explained = await api.alpha.get(
        f"{user}/timeline/explain",
        params={"at": sent[1].isoformat().replace("+00:00", "Z")},
    )
    assert explained.status_code == 200, explained.text
    assert explained.json()["code"] == "suppressed"
    assert "attention budget" in explained.json()["sentence"]


SCHEDULES = "/api/v1/agents/agent_p/users/user_p/schedules"
POLICY_KEYS = {"priority", "ttl_seconds", "expires_at", "supersede_key", "outside_window"}


async def _stored_policy(api: Api, sid: str) -> dict[str, Any]:
    stored = await rows.row(api.store.engine, ScheduleRow, sid)
    return json.loads(stored["policy_json"]) if stored["policy_json"] else {}


async def _fire_and_compose(api: Api, at: datetime) -> dict[str, Any]:
    """The scheduler fires at ``at`` and the dispatcher composes: the new message."""
    fired = await Scheduler(api.store.engine, Subjects("test")).tick(at)
    assert len(fired.fire_ids) == 1
    processor = Processor(api.store.engine, TemplateComposer(), Subjects("test"), ManualClock(at))
    await processor.process([SourceRef(SourceKind.SCHEDULE, fid) for fid in fired.fire_ids])
    async with api.store.engine.connect() as conn:
        found = (
            (await conn.execute(NOTIFICATIONS.select().where(NOTIFICATIONS.c.fire_at == at)))
            .mappings()
            .one()
        )
    return dict(found)


async def test_schedule_policy_fields_are_patched_and_apply_to_later_fires(api: Api) -> None:
    """
    PATCH sets, replaces and (with null) clears the policy fields; the response never
    echoes them; a message made before keeps its policy, the next fire's has the new one.
    """
    body = {
        "cadence": {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"},
        "intent": "check in",
        "check_type": "check_in",
        "priority": "high",
        "ttl_seconds": 600,
        "supersede_key": "daily",
    }
    created = await api.alpha.post(SCHEDULES, json=body)
    assert created.status_code == 201, created.text
    sid = created.json()["schedule_id"]
    first_fire = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    first = await _fire_and_compose(api, first_fire)
    assert (first["priority"], first["supersede_key"]) == ("high", "daily")
    assert first["expires_at"] == first_fire + timedelta(seconds=600)

    api.clock.set(first_fire + timedelta(hours=1))
    patch = {
        "priority": "critical",
        "ttl_seconds": None,
        "expires_at": "2030-01-01T00:00:00Z",
        "supersede_key": None,
        "outside_window": "defer",
    }
    patched = await api.alpha.patch(f"{SCHEDULES}/{sid}", json=patch)
    assert patched.status_code == 200, patched.text
    assert not POLICY_KEYS & set(patched.json())
    got = await api.alpha.get(f"{SCHEDULES}/{sid}")
    assert set(got.json()) == set(patched.json())
    assert await _stored_policy(api, sid) == {
        "priority": "critical",
        "expires_at": "2030-01-01T00:00:00+00:00",
        "outside_window": "defer",
    }

    second_fire = first_fire + timedelta(days=1)
    second = await _fire_and_compose(api, second_fire)
    assert (second["priority"], second["supersede_key"]) == ("critical", None)
    assert second["expires_at"] == datetime(2030, 1, 1, tzinfo=UTC)
    kept = await rows.row(api.store.engine, NotificationRow, first["id"])
    assert kept["priority"] == "high"  # made before the change: unchanged

    # Absent fields stay; null clears one; clearing all stores nothing.
    await api.alpha.patch(f"{SCHEDULES}/{sid}", json={"intent": "new intent"})
    assert (await _stored_policy(api, sid))["priority"] == "critical"
    cleared = await api.alpha.patch(
        f"{SCHEDULES}/{sid}",
        json={"priority": None, "expires_at": None, "outside_window": None},
    )
    assert cleared.status_code == 200, cleared.text
    assert await _stored_policy(api, sid) == {}


async def test_bad_schedule_policy_patch_is_400_as_at_creation(api: Api) -> None:
    """Each bad policy field: the creation's code, the field named, nothing written."""
    body = {
        "cadence": {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"},
        "intent": "check in",
        "check_type": "check_in",
        "priority": "high",
    }
    created = await api.alpha.post(SCHEDULES, json=body)
    sid = created.json()["schedule_id"]
    before = await rows.row(api.store.engine, ScheduleRow, sid)
    for bad, field in (
        ({"priority": "urgent"}, "priority"),
        ({"ttl_seconds": 0}, "ttl_seconds"),
        ({"ttl_seconds": "soon"}, "ttl_seconds"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"expires_at": "2030-01-01T00:00:00"}, "expires_at"),
        ({"supersede_key": ""}, "supersede_key"),
        ({"outside_window": "later"}, "outside_window"),
    ):
        at_creation = await api.alpha.post(SCHEDULES, json={**body, **bad})
        response = await api.alpha.patch(f"{SCHEDULES}/{sid}", json={"intent": "x", **bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["code"] == at_creation.json()["code"], bad
        assert field in response.json()["message"], (bad, response.text)
    assert await rows.row(api.store.engine, ScheduleRow, sid) == before
    assert len((await api.alpha.get(SCHEDULES)).json()["schedules"]) == 1
