"""
What the SDK promises at the edges, on SQLite and PostgreSQL: idempotent deletes,
schedules that can never fire refused, wakeups in the distant past refused, pending
wakeups by default, paged notification history, a missing inventory item explained,
and cron's ``a/n``. Through the official SDK where it has the method, else HTTP.
"""

from datetime import timedelta
from typing import Any

import httpx
import pytest
import sonzai
from sonzai._generated.resources.wakeups import Wakeups

from delivery.clock import ManualClock
from tests.api.conftest import START, Api
from tests.api.notes import add_notifications, notification
from tests.api.server import serve_api

A, U = "agent-1", "user-1"
DAILY = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
NIGHT = {"simple": {"frequency": "daily", "times": ["03:00"]}, "timezone": "UTC"}
DAYTIME = {"hours": {"start": "08:00", "end": "20:00"}}
SCHEDULES = f"/api/v1/agents/{A}/users/{U}/schedules"


def _field(exc: sonzai.APIError) -> str | None:
    assert exc.body is not None
    assert exc.body.errors
    return exc.body.errors[0].field


def _raw(served: Any) -> httpx.Client:
    return httpx.Client(
        base_url=served.base_url, headers={"Authorization": f"Bearer {served.keys['alpha']}"}
    )


def test_every_delete_is_idempotent(database_url: str) -> None:
    """A second delete, or a delete of an id that never existed, succeeds and changes nothing."""
    with (
        serve_api(database_url, ManualClock(START)) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
        _raw(served) as raw,
    ):
        sid = client.schedules.create(
            A, U, cadence=DAILY, intent="i", check_type="reminder"
        ).schedule_id
        assert client.schedules.delete(A, U, sid).success
        assert client.schedules.delete(A, U, sid).success  # the SDK's documented 204
        assert raw.delete(f"{SCHEDULES}/{sid}").status_code == 204
        assert raw.delete(f"{SCHEDULES}/sch_never").status_code == 204

        assert client.webhooks.delete("on_wakeup_ready").success
        assert client.webhooks.delete_for_project(served.projects["alpha"], "on_wakeup_ready")
        assert raw.delete("/api/v1/webhooks/on_wakeup_ready").status_code == 204

        assert client.channels.delete("ch_never") is None
        assert raw.delete("/api/v1/channels/ch_never").status_code == 204

        item = client.agents.inventory.create(A, U, item_type="medication", label="Ibuprofen")
        for _ in range(2):
            gone = client.agents.inventory.direct_delete(A, U, item.fact_id)
            assert (gone.status, gone.fact_id) == ("deleted", item.fact_id)

        contacts = f"/api/v1/agents/{A}/users/{U}/contacts"
        made = raw.post(contacts, json={"kind": "email", "destination": "a@example.com"})
        contact = f"{contacts}/{made.json()['contact_id']}"
        assert [raw.delete(contact).status_code for _ in range(2)] == [204, 204]

        wakeups = f"/api/v1/agents/{A}/wakeups"
        wid = client.agents.schedule_wakeup(
            A, user_id=U, check_type="c", intent="i", delay_hours=2
        ).wakeup_id
        first, again = raw.delete(f"{wakeups}/{wid}"), raw.delete(f"{wakeups}/{wid}")
        assert first.json() == again.json() == {"wakeup_id": wid, "status": "cancelled"}
        assert raw.delete(f"{wakeups}/wk_never").status_code == 204
        assert len(Wakeups(client._http).list_wakeups(A, status="cancelled").wakeups or []) == 1


def test_a_schedule_that_can_never_fire_is_refused(database_url: str) -> None:
    """
    Daily 03:00 inside an 08:00-20:00 window, or an ends_at before the first tick, is
    400 naming the field, on create and on PATCH, and writes nothing.
    """
    with (
        serve_api(database_url, ManualClock(START)) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        with pytest.raises(sonzai.BadRequestError) as refused:
            client.schedules.create(
                A, U, cadence=NIGHT, active_window=DAYTIME, intent="i", check_type="reminder"
            )
        assert (refused.value.code, _field(refused.value)) == (
            "INVALID_ACTIVE_WINDOW",
            "active_window",
        )
        assert "active_window" in str(refused.value)
        with pytest.raises(sonzai.BadRequestError) as too_soon:
            # START is midnight: 09:00 is after an ends_at of 08:00.
            client.schedules.create(
                A, U, cadence=DAILY, ends_at="2026-05-01T08:00:00Z", intent="i", check_type="r"
            )
        assert (too_soon.value.code, _field(too_soon.value)) == ("INVALID_WINDOW", "ends_at")
        assert client.schedules.list(A, U).schedules == []

        made = client.schedules.create(
            A, U, cadence=NIGHT, intent="i", check_type="reminder", ends_at="2026-06-01T00:00:00Z"
        )
        with pytest.raises(sonzai.BadRequestError) as patched:
            client.schedules.update(A, U, made.schedule_id, active_window=DAYTIME)
        assert _field(patched.value) == "active_window"
        with pytest.raises(sonzai.BadRequestError) as narrowed:
            client.schedules.update(A, U, made.schedule_id, ends_at="2026-05-01T02:00:00Z")
        assert _field(narrowed.value) == "ends_at"
        kept = client.schedules.get(A, U, made.schedule_id)
        assert not kept.active_window
        assert kept.ends_at == "2026-06-01T00:00:00Z"
        assert kept.next_fire_at == "2026-05-01T03:00:00Z"
        # Moving the tick inside the window together with it is fine.
        inside = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
        moved = client.schedules.update(
            A, U, made.schedule_id, cadence=inside, active_window=DAYTIME
        )
        assert moved.next_fire_at == "2026-05-01T09:00:00Z"


def test_wakeups_far_in_the_past_are_refused_and_lists_show_pending(database_url: str) -> None:
    """
    scheduled_at older than the maximum lateness is 400 SCHEDULED_AT_IN_PAST; one just
    late is accepted. get_wakeups lists pending wakeups only; status asks for others.
    """
    clock = ManualClock(START)
    with (
        serve_api(database_url, clock) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
        _raw(served) as raw,
    ):
        with pytest.raises(sonzai.BadRequestError) as refused:
            client.agents.schedule_wakeup(
                A,
                user_id=U,
                check_type="birthday",
                intent="i",
                delay_hours=0,
                scheduled_at="2021-05-01T09:00:00Z",
            )
        assert (refused.value.code, _field(refused.value)) == (
            "SCHEDULED_AT_IN_PAST",
            "scheduled_at",
        )
        assert "scheduled_at" in str(refused.value)
        assert raw.get(f"/api/v1/agents/{A}/wakeups", params={"status": "all"}).json() == {
            "wakeups": []
        }
        late = client.agents.schedule_wakeup(
            A,
            user_id=U,
            check_type="c",
            intent="late but not stale",
            delay_hours=0,
            scheduled_at="2026-04-30T23:30:00Z",  # 30 min ago; the default lateness is 1 h
        )
        keep = client.agents.schedule_wakeup(
            A, user_id=U, check_type="c", intent="i", delay_hours=1
        )
        drop = client.agents.schedule_wakeup(
            A, user_id=U, check_type="c", intent="i", delay_hours=2
        )
        assert raw.delete(f"/api/v1/agents/{A}/wakeups/{drop.wakeup_id}").status_code == 200

        pending = client.agents.get_wakeups(A, user_id=U).wakeups
        assert [w.wakeup_id for w in pending] == [late.wakeup_id, keep.wakeup_id]
        assert {w.status for w in pending} == {"pending"}
        listed = Wakeups(client._http)
        cancelled = listed.list_wakeups(A, status="cancelled").wakeups or []
        assert [w.wakeup_id for w in cancelled] == [drop.wakeup_id]
        every = raw.get(f"/api/v1/agents/{A}/wakeups", params={"status": "all"}).json()
        assert len(every["wakeups"]) == 3
        bad = raw.get(f"/api/v1/agents/{A}/wakeups", params={"status": "asleep"})
        assert (bad.status_code, bad.json()["errors"][0]["field"]) == (400, "status")


def test_a_missing_inventory_item_says_which_and_how_to_make_one(database_url: str) -> None:
    """The docs' schedule example with an item id that does not exist: 404 explaining it."""
    with (
        serve_api(database_url, ManualClock(START)) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        with pytest.raises(sonzai.NotFoundError) as missing:
            client.schedules.create(
                "agent_abc",
                "user_123",
                cadence={
                    "simple": {"frequency": "daily", "times": ["08:00"]},
                    "timezone": "Asia/Singapore",
                },
                intent="remind the user about their medication",
                check_type="reminder",
                inventory_item_id="inv_01HX...",
            )
        message = str(missing.value)
        assert missing.value.code == "NOT_FOUND"
        assert "'inv_01HX...'" in message
        assert "POST /api/v1/agents/agent_abc/users/user_123/inventory" in message
        assert "inventory_item_id" in message
        assert client.schedules.list("agent_abc", "user_123").schedules == []
        # The SDK's schedule_wakeup has no inventory_item_id; the API takes one.
        wakeup = {"user_id": U, "check_type": "c", "intent": "i", "delay_hours": 1}
        with _raw(served) as raw:
            linked = raw.post(
                f"/api/v1/agents/{A}/wakeups", json={**wakeup, "inventory_item_id": "inv_x"}
            )
        assert linked.status_code == 404
        assert linked.json()["errors"][0]["field"] == "inventory_item_id"
        assert f"POST /api/v1/agents/{A}/users/{U}/inventory" in linked.json()["message"]


def test_cron_a_step_from_a_start_value(database_url: str) -> None:
    """``5/15`` is ``5-59/15``: the SDK's create accepts it and the preview shows it."""
    with (
        serve_api(database_url, ManualClock(START)) as served,
        sonzai.Sonzai(api_key=served.keys["alpha"], base_url=served.base_url) as client,
    ):
        made = client.schedules.create(
            A, U, cadence={"cron": "5/15 9 * * *", "timezone": "UTC"}, intent="i", check_type="r"
        )
        upcoming = client.schedules.upcoming(A, U, made.schedule_id, limit=5).upcoming
        assert upcoming == [
            "2026-05-01T09:05:00Z",
            "2026-05-01T09:20:00Z",
            "2026-05-01T09:35:00Z",
            "2026-05-01T09:50:00Z",
            "2026-05-02T09:05:00Z",
        ]


async def test_notification_history_pages_with_a_cursor(api: Api) -> None:
    """
    History past one page: ``X-Next-Cursor`` (and ``Link: rel="next"``) lead to the next
    page, newest first, no row lost or repeated even with equal timestamps; a bad
    cursor is 400 naming it.
    """
    project = api.projects["alpha"]
    rows = [notification(project, A, U, n, START) for n in range(7)]
    for n, row in enumerate(rows):
        row["created_at"] = START + timedelta(minutes=n // 2)  # pairs share an instant
    await add_notifications(api.store.engine, rows)
    path = f"/api/v1/agents/{A}/notifications/history"
    seen: list[str] = []
    page = await api.alpha.get(path, params={"limit": 3})
    pages = 1
    while True:
        assert page.status_code == 200
        seen.extend(n["message_id"] for n in page.json()["notifications"])
        assert set(page.json()) == {"notifications"}  # the SDK model forbids other keys
        cursor = page.headers.get("X-Next-Cursor")
        if cursor is None:
            assert "Link" not in page.headers
            break
        assert page.headers["Link"].endswith('>; rel="next"')
        assert f"cursor={cursor}" in page.headers["Link"]
        page = await api.alpha.get(path, params={"limit": 3, "cursor": cursor})
        pages += 1
    whole = (await api.alpha.get(path, params={"limit": 500})).json()["notifications"]
    assert seen == [n["message_id"] for n in whole]
    assert len(seen) == len(set(seen)) == 7
    assert pages == 3
    assert "X-Next-Cursor" not in (await api.alpha.get(path, params={"limit": 7})).headers
    # Another tenant's cursor reveals nothing.
    first = await api.alpha.get(path, params={"limit": 1})
    other = await api.beta.get(path, params={"cursor": first.headers["X-Next-Cursor"]})
    assert other.json() == {"notifications": []}
    for bad in ("nope", "x" * 300, "bm90IGEgY3Vyc29y"):
        refused = await api.alpha.get(path, params={"cursor": bad})
        assert refused.status_code == 400, bad
        assert (refused.json()["code"], refused.json()["errors"][0]["field"]) == (
            "INVALID_REQUEST",
            "cursor",
        )
