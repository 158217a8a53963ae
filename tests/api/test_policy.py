"""
The delivery policy over the API, on SQLite and PostgreSQL: the project policy
(off until set, replaced whole), users' quiet hours, the per-source fields on
schedules, wakeups and events, bad input refused naming the field, tenancy.
"""

import json
from datetime import timedelta

from delivery.api.openapi import EXAMPLES
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.store.tables import POLICIES, QUIET_HOURS, WakeupRow
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
