"""
Bad input, one table per resource: each case is a clear 4xx with a stable code and a
message naming the field, never a 500, and nothing is written.
"""

# ruff: noqa: E501 - the case tables read best one case per line

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Table

from delivery.store.bulk import OUTBOX
from delivery.store.sql import SqlStore
from delivery.store.tables import EVENTS, IDEMPOTENCY, INVENTORY, NOTIFICATIONS, SCHEDULES, WAKEUPS
from tests.api.conftest import Api

DAILY = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
SCHEDULE = {"cadence": DAILY, "intent": "check in", "check_type": "reminder"}
SCHEDULES_PATH = "/api/v1/agents/a1/users/u1/schedules"
WATCHED: tuple[Table, ...] = (
    SCHEDULES,
    WAKEUPS,
    EVENTS,
    OUTBOX,
    INVENTORY,
    NOTIFICATIONS,
    IDEMPOTENCY,
)


@dataclass(frozen=True)
class Case:
    """One bad request and the error it must get."""

    id: str
    method: str
    path: str
    status: int
    code: str
    body: Any = None
    raw: bytes | None = None
    field: str | None = None


async def _counts(store: SqlStore) -> dict[str, int]:
    return {t.name: await store.count(t) for t in WATCHED}


async def _check(api: Api, cases: list[Case]) -> None:
    before = await _counts(api.store)
    for case in cases:
        if case.raw is not None:
            response = await api.alpha.request(case.method, case.path, content=case.raw)
        elif case.body is not None:
            response = await api.alpha.request(case.method, case.path, json=case.body)
        else:
            response = await api.alpha.request(case.method, case.path)
        assert response.status_code == case.status, (case.id, response.text)
        assert response.headers["content-type"].startswith("application/json"), case.id
        body = response.json()
        assert body["code"] == case.code, (case.id, body)
        assert body["message"], case.id
        if case.field is not None:
            assert body["errors"][0]["field"] == case.field, (case.id, body)
            assert case.field.split(".")[0] in body["message"], (case.id, body)
    assert await _counts(api.store) == before, "a rejected request wrote something"


def _surrogate(body: dict[str, Any]) -> bytes:
    """``body`` as JSON with every ``SURR`` replaced by the escape of a lone surrogate."""
    return json.dumps(body).replace("SURR", "\\ud800").encode()


def _nested(levels: int) -> dict[str, Any]:
    """``{"d": {"d": ...}}`` with ``levels`` objects below the outer one."""
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {"d": value}
    return value


def _too_deep_for_json() -> bytes:
    """A schedule whose metadata nests arrays deeper than Python's JSON parser recurses."""
    return (
        json.dumps(_schedule(metadata={"a": "DEEP"}))
        .replace('"DEEP"', "[" * 100_000 + "]" * 100_000)
        .encode()
    )


def _schedule(**changes: Any) -> dict[str, Any]:
    body = {**SCHEDULE, **changes}
    return {k: v for k, v in body.items() if v is not None}


async def test_schedule_bad_input(api: Api) -> None:
    """Schedule writes and reads reject malformed input with the documented codes."""
    created = await api.alpha.post(SCHEDULES_PATH, json=SCHEDULE)
    assert created.status_code == 201
    sid = created.json()["schedule_id"]
    one = f"{SCHEDULES_PATH}/{sid}"
    weekly_empty = {"simple": {"frequency": "weekly", "times": ["09:00"], "days_of_week": []}}
    post = "POST"
    cases = [
        Case("missing cadence", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(cadence=None), field="cadence"),
        Case("missing intent", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(intent=None), field="intent"),
        Case("empty intent", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(intent=""), field="intent"),
        Case("cadence as text", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(cadence="daily"), field="cadence"),
        Case("intent as number", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(intent=5), field="intent"),
        Case("long check_type", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(check_type="x" * 129), field="check_type"),
        Case("unknown field", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(cadance=DAILY), field="cadance"),
        Case("malformed json", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", raw=b'{"cadence": ', field="body"),
        Case("body is a list", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", raw=b"[]"),
        Case("no body", post, SCHEDULES_PATH, 400, "INVALID_REQUEST"),
        Case("unknown zone", post, SCHEDULES_PATH, 400, "INVALID_TIMEZONE", _schedule(cadence={**DAILY, "timezone": "Mars/Base"}), field="cadence.timezone"),
        Case("offset zone", post, SCHEDULES_PATH, 400, "INVALID_TIMEZONE", _schedule(cadence={**DAILY, "timezone": "+08:00"}), field="cadence.timezone"),
        Case("no zone", post, SCHEDULES_PATH, 400, "INVALID_TIMEZONE", _schedule(cadence={"simple": DAILY["simple"]})),
        Case("bad time", post, SCHEDULES_PATH, 400, "INVALID_CADENCE", _schedule(cadence={**DAILY, "simple": {"frequency": "daily", "times": ["25:00"]}})),
        Case("empty days", post, SCHEDULES_PATH, 400, "INVALID_CADENCE", _schedule(cadence={**weekly_empty, "timezone": "UTC"})),
        Case("simple and cron", post, SCHEDULES_PATH, 400, "INVALID_CADENCE", _schedule(cadence={**DAILY, "cron": "0 9 * * *"})),
        Case("repeated time", post, SCHEDULES_PATH, 400, "CADENCE_TOO_FREQUENT", _schedule(cadence={**DAILY, "simple": {"frequency": "daily", "times": ["09:00", "09:00"]}})),
        Case("too dense", post, SCHEDULES_PATH, 400, "CADENCE_TOO_DENSE", _schedule(cadence={"cron": "*/5 * * * *", "timezone": "UTC"})),
        Case("window empty days", post, SCHEDULES_PATH, 400, "INVALID_ACTIVE_WINDOW", _schedule(active_window={"days_of_week": []})),
        Case("window bad hours", post, SCHEDULES_PATH, 400, "INVALID_ACTIVE_WINDOW", _schedule(active_window={"hours": {"start": "8am", "end": "22:00"}})),
        Case("ends before starts", post, SCHEDULES_PATH, 400, "INVALID_WINDOW", _schedule(starts_at="2026-06-01T00:00:00Z", ends_at="2026-05-20T00:00:00Z")),
        Case("ends in the past", post, SCHEDULES_PATH, 400, "INVALID_WINDOW", _schedule(ends_at="2026-04-01T00:00:00Z")),
        Case("naive starts_at", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(starts_at="2026-05-01T00:00:00"), field="starts_at"),
        Case("starts_at year 1", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(starts_at="0001-01-01T00:00:00Z"), field="starts_at"),
        Case("starts_at year 9999", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(starts_at="9999-12-30T00:00:00Z"), field="starts_at"),
        Case("ends_at year 9999", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(ends_at="9999-12-31T23:59:59Z"), field="ends_at"),
        Case("ends_at 2200", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(ends_at="2200-01-01T00:00:00Z"), field="ends_at"),
        Case("65 metadata keys", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata={f"k{i}": "v" for i in range(65)}), field="metadata"),
        Case("17 KiB metadata", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata=dict.fromkeys("abc", "v" * 6000)), field="metadata"),
        Case("metadata 11 levels deep", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata=_nested(10)), field="metadata" + ".d" * 10),
        Case("metadata arrays too deep", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata={"a": [[[[[[[[[[1]]]]]]]]]]}), field="metadata.a.0.0.0.0.0.0.0.0.0"),
        Case("metadata past the parser", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", raw=_too_deep_for_json(), field="body"),
        Case("long metadata key", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata={"k" * 129: 1}), field="metadata"),
        Case("long metadata string", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata={"note": "x" * 8001}), field="metadata.note"),
        Case("long nested metadata string", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(metadata={"a": [{"b": "x" * 8001}]}), field="metadata.a.0.b"),
        Case("NUL in intent", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", _schedule(intent="a\x00b"), field="intent"),
        Case("lone surrogate in intent", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", raw=_surrogate(_schedule(intent="SURR")), field="intent"),
        Case("lone surrogate in metadata", post, SCHEDULES_PATH, 400, "INVALID_REQUEST", raw=_surrogate(_schedule(metadata={"k": "SURR"})), field="metadata"),
        Case("item id with slash", post, SCHEDULES_PATH, 400, "INVALID_ID", _schedule(inventory_item_id="a/b"), field="inventory_item_id"),
        Case("unknown item", post, SCHEDULES_PATH, 404, "NOT_FOUND", _schedule(inventory_item_id="inv_nope"), field="inventory_item_id"),
        Case("agent id with slash", "GET", "/api/v1/agents/a/b/users/u1/schedules", 400, "INVALID_ID", field="agent_id"),
        Case("encoded slash", "GET", "/api/v1/agents/a%2Fb/users/u1/schedules", 400, "INVALID_ID"),
        Case("id with space", "GET", "/api/v1/agents/a%20b/users/u1/schedules", 400, "INVALID_ID", field="agent_id"),
        Case("129-char id", "GET", f"/api/v1/agents/{'a' * 129}/users/u1/schedules", 400, "INVALID_ID", field="agent_id"),
        Case("limit 0", "GET", f"{one}/upcoming?limit=0", 400, "INVALID_LIMIT", field="limit"),
        Case("limit 1001", "GET", f"{one}/upcoming?limit=1001", 400, "INVALID_LIMIT", field="limit"),
        Case("limit text", "GET", f"{one}/upcoming?limit=ten", 400, "INVALID_LIMIT", field="limit"),
        Case("unknown schedule", "GET", f"{SCHEDULES_PATH}/sch_nope", 404, "NOT_FOUND", field="schedule_id"),
        Case("other user's schedule", "GET", f"/api/v1/agents/a1/users/u2/schedules/{sid}", 404, "NOT_FOUND"),
        Case("patch enabled text", "PATCH", one, 400, "INVALID_REQUEST", {"enabled": "yes"}, field="enabled"),
        Case("patch bad zone", "PATCH", one, 400, "INVALID_TIMEZONE", {"cadence": {**DAILY, "timezone": "Nowhere"}}),
        Case("patch ends past", "PATCH", one, 400, "INVALID_WINDOW", {"ends_at": "2026-04-30T00:00:00Z"}),
        Case("patch starts_at year 1", "PATCH", one, 400, "INVALID_REQUEST", {"starts_at": "0001-01-01T00:00:00Z"}, field="starts_at"),
        Case("patch ends_at year 9999", "PATCH", one, 400, "INVALID_REQUEST", {"ends_at": "9999-12-31T23:59:59Z"}, field="ends_at"),
        Case("patch unknown field", "PATCH", one, 400, "INVALID_REQUEST", {"next_fire_at": "x"}),
        Case("patch metadata too deep", "PATCH", one, 400, "INVALID_REQUEST", {"metadata": _nested(10)}, field="metadata" + ".d" * 10),
        Case("patch long metadata string", "PATCH", one, 400, "INVALID_REQUEST", {"metadata": {"k": "x" * 8001}}, field="metadata.k"),
        Case("patch unknown schedule", "PATCH", f"{SCHEDULES_PATH}/sch_nope", 404, "NOT_FOUND", {"intent": "x"}),
        Case("wrong method", "PUT", one, 405, "METHOD_NOT_ALLOWED", {"intent": "x"}),
    ]  # fmt: skip
    await _check(api, cases)
    unchanged = (await api.alpha.get(one)).json()
    assert unchanged["intent"] == "check in"
    assert "starts_at" not in unchanged
    assert "ends_at" not in unchanged


async def test_reenabling_past_ends_at_is_invalid_window(api: Api) -> None:
    """A schedule past ends_at is shown disabled; turning it back on is 400 INVALID_WINDOW."""
    created = await api.alpha.post(
        SCHEDULES_PATH, json={**SCHEDULE, "ends_at": "2026-05-03T00:00:00Z"}
    )
    one = f"{SCHEDULES_PATH}/{created.json()['schedule_id']}"
    api.clock.advance(timedelta(days=3))
    shown = (await api.alpha.get(one)).json()
    assert (shown["enabled"], shown["next_fire_at"]) == (False, "")
    await _check(api, [Case("re-enable", "PATCH", one, 400, "INVALID_WINDOW", {"enabled": True})])
    later = await api.alpha.patch(one, json={"enabled": True, "ends_at": ""})
    assert later.status_code == 200
    assert later.json()["enabled"] is True
    assert later.json()["next_fire_at"] == "2026-05-04T09:00:00Z"


async def test_wakeup_bad_input(api: Api) -> None:
    """Wakeup writes and reads reject malformed input."""
    path = "/api/v1/agents/a1/wakeups"
    ok = {"user_id": "u1", "check_type": "birthday", "intent": "wish", "delay_hours": 2}
    done = await api.alpha.post(path, json=ok)
    wid = done.json()["wakeup_id"]
    assert (await api.alpha.delete(f"{path}/{wid}")).status_code == 200
    cases = [
        Case("missing user", "POST", path, 400, "INVALID_REQUEST", {**ok, "user_id": None}, field="user_id"),
        Case("missing check_type", "POST", path, 400, "INVALID_REQUEST", {k: v for k, v in ok.items() if k != "check_type"}, field="check_type"),
        Case("negative delay", "POST", path, 400, "INVALID_REQUEST", {**ok, "delay_hours": -1}, field="delay_hours"),
        Case("float delay", "POST", path, 400, "INVALID_REQUEST", {**ok, "delay_hours": 1.5}, field="delay_hours"),
        Case("text delay", "POST", path, 400, "INVALID_REQUEST", {**ok, "delay_hours": "2"}, field="delay_hours"),
        Case("no time at all", "POST", path, 400, "INVALID_REQUEST", {k: v for k, v in ok.items() if k != "delay_hours"}, field="delay_hours"),
        Case("bad scheduled_at", "POST", path, 400, "INVALID_REQUEST", {**ok, "scheduled_at": "tomorrow"}, field="scheduled_at"),
        Case("scheduled_at year 1", "POST", path, 400, "INVALID_REQUEST", {**ok, "scheduled_at": "0001-01-01T00:00:00Z"}, field="scheduled_at"),
        Case("scheduled_at year 9999", "POST", path, 400, "INVALID_REQUEST", {**ok, "scheduled_at": "9999-12-31T23:59:59Z"}, field="scheduled_at"),
        Case("scheduled_at 2200", "POST", path, 400, "INVALID_REQUEST", {**ok, "scheduled_at": "2200-01-01T00:00:00Z"}, field="scheduled_at"),
        Case("scheduled_at before 1970 by offset", "POST", path, 400, "INVALID_REQUEST", {**ok, "scheduled_at": "1970-01-01T00:30:00+01:00"}, field="scheduled_at"),
        Case("delay past ten years", "POST", path, 400, "INVALID_REQUEST", {**ok, "delay_hours": 87_601}, field="delay_hours"),
        Case("delay beyond int64", "POST", path, 400, "INVALID_REQUEST", {**ok, "delay_hours": 10**30}, field="delay_hours"),
        Case("user id with slash", "POST", path, 400, "INVALID_ID", {**ok, "user_id": "a/b"}, field="user_id"),
        Case("unknown item", "POST", path, 404, "NOT_FOUND", {**ok, "inventory_item_id": "inv_x"}),
        Case("bad status filter", "GET", f"{path}?status=sleeping", 400, "INVALID_REQUEST", field="status"),
        Case("limit 0", "GET", f"{path}?limit=0", 400, "INVALID_LIMIT", field="limit"),
        Case("bad user filter", "GET", f"{path}?user_id=a%20b", 400, "INVALID_ID", field="user_id"),
    ]  # fmt: skip
    await _check(api, cases)


async def test_event_bad_input(api: Api) -> None:
    """Trigger events take string-only metadata and well-formed messages."""
    path = "/api/v1/agents/a1/events"
    ok = {"user_id": "u1", "event_type": "level_up"}
    cases = [
        Case("missing event_type", "POST", path, 400, "INVALID_REQUEST", {"user_id": "u1"}, field="event_type"),
        Case("numeric metadata", "POST", path, 400, "INVALID_REQUEST", {**ok, "metadata": {"level": 5}}, field="metadata.level"),
        Case("65 metadata keys", "POST", path, 400, "INVALID_REQUEST", {**ok, "metadata": {f"k{i}": "v" for i in range(65)}}, field="metadata"),
        Case("long metadata key", "POST", path, 400, "INVALID_REQUEST", {**ok, "metadata": {"k" * 129: "v"}}, field="metadata"),
        Case("long metadata value", "POST", path, 400, "INVALID_REQUEST", {**ok, "metadata": {"k": "v" * 8001}}, field="metadata.k"),
        Case("message without role", "POST", path, 400, "INVALID_REQUEST", {**ok, "messages": [{"content": "hi"}]}, field="messages.0.role"),
        Case("messages not a list", "POST", path, 400, "INVALID_REQUEST", {**ok, "messages": "hi"}, field="messages"),
        Case("bad user id", "POST", path, 400, "INVALID_ID", {**ok, "user_id": "u#1"}, field="user_id"),
        Case("NUL in event_type", "POST", path, 400, "INVALID_REQUEST", {**ok, "event_type": "\x00"}, field="event_type"),
        Case("surrogate in message", "POST", path, 400, "INVALID_REQUEST", raw=_surrogate({**ok, "messages": [{"role": "user", "content": "SURR"}]}), field="messages.0.content"),
        Case("limit 501", "GET", f"{path}?limit=501", 400, "INVALID_LIMIT"),
    ]  # fmt: skip
    await _check(api, cases)


async def test_notification_bad_input(api: Api) -> None:
    """Queue and project-view calls reject bad limits, statuses, ids and bodies."""
    queue = "/api/v1/agents/a1/notifications"
    mine = f"/api/v1/projects/{api.projects['alpha']}/notifications"
    theirs = f"/api/v1/projects/{api.projects['beta']}/notifications"
    cases = [
        Case("limit 0", "GET", f"{queue}?limit=0", 400, "INVALID_LIMIT", field="limit"),
        Case("limit 501", "GET", f"{queue}?limit=501", 400, "INVALID_LIMIT", field="limit"),
        Case("limit -1", "GET", f"{queue}?limit=-1", 400, "INVALID_LIMIT", field="limit"),
        Case("limit text", "GET", f"{queue}?limit=all", 400, "INVALID_LIMIT", field="limit"),
        Case("history limit", "GET", f"{queue}/history?limit=9999", 400, "INVALID_LIMIT"),
        Case("bad status", "GET", f"{queue}?status=read", 400, "INVALID_REQUEST", field="status"),
        Case("bad user id", "GET", f"{queue}?user_id=%2F", 400, "INVALID_ID", field="user_id"),
        Case("consume unknown", "POST", f"{queue}/msg_nope/consume", 404, "NOT_FOUND", field="message_id"),
        Case("foreign project", "GET", theirs, 404, "NOT_FOUND", field="project_id"),
        Case("foreign project ack", "POST", f"{theirs}/acknowledge", 404, "NOT_FOUND", {"notification_ids": []}),
        Case("foreign project ack-all", "POST", f"{theirs}/acknowledge-all", 404, "NOT_FOUND"),
        Case("ack without ids", "POST", f"{mine}/acknowledge", 400, "INVALID_REQUEST", {}, field="notification_ids"),
        Case("ack ids not a list", "POST", f"{mine}/acknowledge", 400, "INVALID_REQUEST", {"notification_ids": "x"}),
        Case("ack bad id", "POST", f"{mine}/acknowledge", 400, "INVALID_ID", {"notification_ids": ["a b"]}),
        Case("project limit", "GET", f"{mine}?limit=0", 400, "INVALID_LIMIT"),
        Case("project status", "GET", f"{mine}?status=done", 400, "INVALID_REQUEST"),
        Case("NUL event_type filter", "GET", f"{mine}?event_type=%00", 400, "INVALID_REQUEST", field="event_type"),
        Case("long event_type filter", "POST", f"{mine}/acknowledge-all?event_type={'e' * 129}", 400, "INVALID_REQUEST", field="event_type"),
    ]  # fmt: skip
    await _check(api, cases)


async def test_queue_bad_agent_id_answers_as_a_declared_path_does(api: Api) -> None:
    """
    The polling read checks its agent id itself (it declares no parameters, for
    speed); a bad one gets exactly the answer of a route whose path FastAPI checks.
    """
    for bad in ("a%20b", "a%0A", "a%2Fb", "a" * 129, "%C3%A9"):
        queue = await api.alpha.get(f"/api/v1/agents/{bad}/notifications?user_id=u1")
        declared = await api.alpha.get(f"/api/v1/agents/{bad}/users/u1/schedules")
        assert (queue.status_code, queue.json()) == (declared.status_code, declared.json()), bad
        assert queue.status_code == 400, bad
        assert queue.json()["code"] == "INVALID_ID", bad


async def test_inventory_bad_input(api: Api) -> None:
    """Inventory writes need an item_type, object properties and a known item."""
    base = "/api/v1/agents/a1/users/u1/inventory"
    cases = [
        Case("missing item_type", "POST", f"{base}/items", 400, "INVALID_REQUEST", {"label": "x"}, field="item_type"),
        Case("properties not object", "POST", f"{base}/items", 400, "INVALID_REQUEST", {"item_type": "m", "properties": [1]}, field="properties"),
        Case("huge properties", "POST", f"{base}/items", 400, "INVALID_REQUEST", {"item_type": "m", "properties": {"x": "y" * 70_000}}, field="properties"),
        Case("bad action", "POST", base, 400, "INVALID_REQUEST", {"action": "explode", "item_type": "m"}, field="action"),
        Case("update no match", "POST", base, 404, "NOT_FOUND", {"action": "update", "item_type": "m", "properties": {}}),
        Case("direct update unknown", "PUT", f"{base}/inv_nope", 404, "NOT_FOUND", {"properties": {}}),
        Case("direct update no props", "PUT", f"{base}/inv_nope", 400, "INVALID_REQUEST", {}, field="properties"),
        Case("get unknown", "GET", f"{base}/inv_nope", 404, "NOT_FOUND"),
        Case("NUL item_type filter", "GET", f"{base}?item_type=%00", 400, "INVALID_REQUEST", field="item_type"),
        Case("query limit", "GET", f"{base}?limit=1001", 400, "INVALID_LIMIT", field="limit"),
    ]  # fmt: skip
    await _check(api, cases)


async def test_unauthorized(api: Api) -> None:
    """Without a valid bearer key every API route is 401 UNAUTHORIZED, before the body is parsed."""
    for header in (None, "Bearer", "Bearer wrong-key", "Basic dXNlcjpwYXNz", "bearer  "):
        headers = {"Authorization": header} if header else {}
        response = await api.anonymous.post(SCHEDULES_PATH, content=b"{not json", headers=headers)
        assert response.status_code == 401, header
        assert response.json()["code"] == "UNAUTHORIZED"
        assert response.json()["message"]
    assert await api.store.count(SCHEDULES) == 0
