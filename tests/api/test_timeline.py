"""
The timeline and its explanation, each reason made for real (schedules through the API,
fires by advance-time or the scheduler, a composer answering 500), on both databases.
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from delivery.api import create_app
from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import build_composer
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef
from delivery.scheduler import Scheduler
from delivery.settings import Settings
from delivery.store.sql import SqlStore
from tests.api.conftest import START, Api
from tests.fixtures.http import ServeApp

A, U = "agent_t", "user_t"
USER = f"/api/v1/agents/{A}/users/{U}"
TIMELINE = f"{USER}/timeline"


def daily(time: str, zone: str = "UTC") -> dict[str, Any]:
    return {"simple": {"frequency": "daily", "times": [time]}, "timezone": zone}


async def create(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post(
        f"{USER}/schedules", json={"intent": "check in", "check_type": "reminder", **body}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["schedule_id"])


async def advance(client: httpx.AsyncClient, hours: float) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/workbench/advance-time",
        json={"agent_id": A, "user_id": U, "simulated_hours": hours},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def events(client: httpx.AsyncClient, path: str = TIMELINE, **params: str) -> list[Any]:
    """Every event, following cursors (small pages, so paging is exercised too)."""
    found: list[Any] = []
    query = {"limit": "7", **params}
    while True:
        response = await client.get(path, params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        found += page["events"]
        if not page["has_more"]:
            return found
        query["cursor"] = page["next_cursor"]


async def why(client: httpx.AsyncClient, at: datetime, path: str = TIMELINE, **params: str) -> Any:
    response = await client.get(
        f"{path}/explain", params={"at": at.isoformat().replace("+00:00", "Z"), **params}
    )
    assert response.status_code == 200, response.text
    return response.json()


def kinds(found: list[Any]) -> list[str]:
    return [e["kind"] for e in found]


async def test_dst_gap(api: Api) -> None:
    """02:30 New York on the spring-forward day is skipped, and both views say which rule."""
    api.clock.set(datetime(2027, 3, 13, 0, 0, tzinfo=UTC))
    sid = await create(api.alpha, cadence=daily("02:30", "America/New_York"))
    await advance(api.alpha, 48)
    found = await events(api.alpha)
    skipped = [e for e in found if e["kind"] == "fire.skipped"]
    assert len(skipped) == 1
    assert skipped[0]["detail"]["reason"] == "dst_gap"
    assert "02:30 does not exist in America/New_York on 2027-03-14" in skipped[0]["summary"]
    assert skipped[0]["timezone"] == "America/New_York"
    assert skipped[0]["local_at"].endswith("-04:00")
    assert kinds(found)[0] == "schedule.created"
    answer = await why(api.alpha, datetime(2027, 3, 14, 7, 30, tzinfo=UTC))
    assert answer["code"] == "dst_gap"
    assert answer["got_message"] is False
    assert answer["schedule_id"] == sid
    assert "02:30 does not exist in America/New_York on 2027-03-14" in answer["sentence"]


async def test_outside_active_window(api: Api) -> None:
    """A weekday-only schedule skips Saturday 09:00 Singapore, naming the window."""
    await create(
        api.alpha,
        cadence=daily("09:00", "Asia/Singapore"),
        active_window={"days_of_week": ["mon", "tue", "wed", "thu", "fri"]},
    )
    await advance(api.alpha, 48)  # Friday 2026-05-01 and Saturday 2026-05-02
    found = await events(api.alpha)
    skipped = [e for e in found if e["kind"] == "fire.skipped"]
    assert [e["detail"]["reason"] for e in skipped] == ["outside_active_window"]
    assert "09:00 on Saturday 2026-05-02 (Asia/Singapore)" in skipped[0]["summary"]
    answer = await why(api.alpha, datetime(2026, 5, 2, 1, 0, tzinfo=UTC))
    assert answer["code"] == "outside_active_window"
    assert "outside the active window (mon, tue, wed, thu, fri)" in answer["sentence"]
    friday = await why(api.alpha, datetime(2026, 5, 1, 1, 0, tzinfo=UTC))
    assert friday["code"] == "pending"
    assert "still pending in the queue" in friday["sentence"]


async def test_disabled_schedule(api: Api) -> None:
    """A schedule disabled through the API: the change is on the timeline, the tick explained."""
    sid = await create(api.alpha, cadence=daily("09:00"))
    api.clock.advance(timedelta(hours=1))
    patched = await api.alpha.patch(f"{USER}/schedules/{sid}", json={"enabled": False})
    assert patched.status_code == 200, patched.text
    found = await events(api.alpha, f"{USER}/schedules/{sid}/timeline")
    assert kinds(found) == ["schedule.created", "schedule.disabled"]
    assert found[1]["detail"]["fields"] == ["enabled"]
    answer = await why(api.alpha, datetime(2026, 5, 2, 9, 0, tzinfo=UTC))
    assert answer["code"] == "schedule_disabled"
    assert f"schedule {sid} would have fired at 2026-05-02T09:00:00+00:00" in answer["sentence"]
    assert "disabled since 2026-05-01T01:00:00+00:00" in answer["sentence"]


async def test_ended_schedule(api: Api) -> None:
    """Past its ends_at the schedule is over: ``schedule.ended`` and ``schedule_ended``."""
    ends = START + timedelta(days=1, hours=12)
    await create(api.alpha, cadence=daily("09:00"), ends_at="2026-05-02T12:00:00Z")
    api.clock.set(START + timedelta(days=4))
    found = await events(api.alpha)
    assert "schedule.ended" in kinds(found)
    ended = next(e for e in found if e["kind"] == "schedule.ended")
    assert ended["at"] == "2026-05-02T12:00:00Z"
    answer = await why(api.alpha, datetime(2026, 5, 3, 9, 0, tzinfo=UTC))
    assert answer["code"] == "schedule_ended"
    assert f"its ends_at is {ends.isoformat()} (UTC)" in answer["sentence"]


async def test_downtime_past_the_maximum_lateness(api: Api) -> None:
    """The scheduler first runs three hours after 09:00: the fire is recorded as missed."""
    await create(api.alpha, cadence=daily("09:00"))
    scheduler = Scheduler(api.store.engine, Subjects("test"), max_lateness=timedelta(hours=1))
    await scheduler.tick(datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
    api.clock.set(datetime(2026, 5, 1, 12, 0, tzinfo=UTC))
    found = await events(api.alpha)
    skipped = [e for e in found if e["kind"] == "fire.skipped"]
    assert [e["detail"]["reason"] for e in skipped] == ["missed_max_lateness"]
    assert "more than the maximum lateness (1 h)" in skipped[0]["summary"]
    answer = await why(api.alpha, datetime(2026, 5, 1, 9, 0, tzinfo=UTC))
    assert answer["code"] == "missed_max_lateness"
    assert "the scheduler was down or behind" in answer["sentence"]


async def test_not_fired_while_the_daemon_is_down(api: Api) -> None:
    """Due and no scheduler ran yet (within the lateness): ``not_fired``."""
    await create(api.alpha, cadence=daily("09:00"))
    api.clock.set(datetime(2026, 5, 1, 9, 30, tzinfo=UTC))
    answer = await why(api.alpha, datetime(2026, 5, 1, 9, 0, tzinfo=UTC))
    assert answer["code"] == "not_fired"
    assert "no fire was recorded" in answer["sentence"]


async def test_pending_then_consumed_by_poll(api: Api) -> None:
    """A composed message waits in the queue; once polled it was delivered, by a poll."""
    await create(api.alpha, cadence=daily("09:00"))
    await advance(api.alpha, 12)
    at = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    pending = await why(api.alpha, at)
    assert pending["code"] == "pending"
    message = pending["message_id"]
    found = await events(api.alpha)
    assert kinds(found) == ["schedule.created", "fire.fired", "notification.composed"]
    assert "pending in the queue" in found[2]["summary"]
    api.clock.set(datetime(2026, 5, 1, 11, 0, tzinfo=UTC))  # after the simulated fire
    consumed = await api.alpha.post(f"/api/v1/agents/{A}/notifications/{message}/consume")
    assert consumed.status_code == 200, consumed.text
    answer = await why(api.alpha, at)
    assert answer["code"] == "delivered"
    assert answer["got_message"] is True
    assert "consumed by a poll" in answer["sentence"]
    last = (await events(api.alpha))[-1]
    assert (last["kind"], last["detail"]["by"]) == ("notification.consumed", "poll")


async def test_no_schedule(api: Api) -> None:
    """A user with nothing at all: ``no_schedule``; one whose schedule ticks elsewhere:
    ``not_covered``."""
    answer = await why(api.alpha, datetime(2026, 5, 1, 9, 0, tzinfo=UTC))
    assert answer["code"] == "no_schedule"
    assert answer["sentence"].startswith("No: the user has no schedule")
    assert (await api.alpha.get(TIMELINE)).json()["timezone"] == {"name": "UTC", "source": "utc"}
    await create(api.alpha, cadence=daily("20:00", "Asia/Singapore"))
    answer = await why(api.alpha, datetime(2026, 5, 1, 9, 0, tzinfo=UTC))
    assert answer["code"] == "not_covered"
    assert "daily 20:00 Asia/Singapore" in answer["sentence"]


@asynccontextmanager
async def app_client(api: Api, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Alpha's client over a second app on the same database, with other settings."""
    store = SqlStore(api.store.engine)
    key = await store.keys.create_api_key(api.projects["alpha"], START)
    app = create_app(settings, store, api.clock)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api.test",
        headers={"Authorization": f"Bearer {key}"},
    ) as client:
        try:
            yield client
        finally:
            # Served without a lifespan: close the app's composer (its HTTP client) here.
            await app.state.ctx.composer.aclose()


def failing_llm() -> Starlette:
    async def chat(_request: Request) -> JSONResponse:
        return JSONResponse({"error": "model overloaded"}, status_code=500)

    return Starlette(routes=[Route("/{path:path}", chat, methods=["POST"])])


async def test_composition_failed(api: Api, http_server: ServeApp) -> None:
    """
    An LLM answering 500 to a composer used without the message step (the dispatcher's
    and advance-time's step falls back to the template instead): the message is kept as
    failed_generation, and said so.
    """
    url = http_server(failing_llm())
    settings = Settings(subject_prefix="test", composer="llm", llm_base_url=url)
    engine = api.store.engine
    await create(api.alpha, cadence=daily("09:00"))
    nine = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
    fired = await Scheduler(engine, Subjects("test")).tick(nine)
    composer = build_composer(settings)
    try:
        processor = Processor(engine, composer, Subjects("test"), ManualClock(nine))
        await processor.process([SourceRef(SourceKind.SCHEDULE, fid) for fid in fired.fire_ids])
    finally:
        await composer.aclose()
    found = await events(api.alpha)
    failed = [e for e in found if e["kind"] == "notification.failed_generation"]
    assert len(failed) == 1
    assert "500" in failed[0]["detail"]["error"]
    answer = await why(api.alpha, nine)
    assert answer["code"] == "composition_failed"
    assert "composing its message failed" in answer["sentence"]
    assert "500" in answer["sentence"]


async def test_another_projects_ids_are_not_found(api: Api) -> None:
    """Beta gets 404 for alpha's schedule on both schedule routes and sees nothing of alpha."""
    sid = await create(api.alpha, cadence=daily("09:00"))
    await advance(api.alpha, 12)
    for path in (f"{USER}/schedules/{sid}/timeline", f"{USER}/schedules/{sid}/timeline/explain"):
        response = await api.beta.get(path)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["code"] == "NOT_FOUND"
        assert (await api.alpha.get(path)).status_code == 200
    assert (await api.beta.get(TIMELINE)).json()["events"] == []
    assert (await why(api.beta, datetime(2026, 5, 1, 9, tzinfo=UTC)))["code"] == "no_schedule"
    unknown = await api.alpha.get(f"{USER}/schedules/sch_nope/timeline")
    assert unknown.status_code == 404
    # A deleted schedule keeps its story (its fires go with it; the history stays).
    assert (await api.alpha.delete(f"{USER}/schedules/{sid}")).status_code == 200
    after = await events(api.alpha, f"{USER}/schedules/{sid}/timeline")
    assert kinds(after) == ["schedule.created", "schedule.deleted", "notification.composed"]


async def test_pages_cover_everything_once_in_both_orders(api: Api) -> None:
    """Cursor pages of 7 give the one-page answer, in both orders, without repeats."""
    await create(
        api.alpha,
        cadence={"simple": {"frequency": "interval_hours", "interval_hours": 1}, "timezone": "UTC"},
    )
    await create(api.alpha, cadence=daily("09:00"), active_window={"days_of_week": ["sun"]})
    await api.alpha.post(f"/api/v1/agents/{A}/events", json={"user_id": U, "event_type": "e"})
    await advance(api.alpha, 30)
    whole = (await api.alpha.get(TIMELINE, params={"limit": "500"})).json()
    assert whole["has_more"] is False
    everything = whole["events"]
    assert len(everything) > 60
    key: Callable[[Any], tuple[str, str, str]] = lambda e: (e["at"], e["ref"], e["kind"])  # noqa: E731
    assert [key(e) for e in everything] == sorted(key(e) for e in everything)
    ascending = await events(api.alpha)
    descending = await events(api.alpha, order="desc")
    assert ascending == everything
    assert descending == everything[::-1]
    assert len({key(e) for e in ascending}) == len(ascending)
    window = await events(api.alpha, since="2026-05-01T05:00:00Z", until="2026-05-01T10:00:00Z")
    assert window == [
        e for e in everything if "2026-05-01T05:00:00Z" <= e["at"] < "2026-05-01T10:00:00Z"
    ]


@pytest.mark.parametrize(
    ("params", "code", "field"),
    [
        ({"since": "yesterday"}, "INVALID_REQUEST", "since"),
        ({"until": "2026-05-01T00:00:00"}, "INVALID_REQUEST", "until"),
        (
            {"since": "2026-05-02T00:00:00Z", "until": "2026-05-01T00:00:00Z"},
            "INVALID_REQUEST",
            "since",
        ),
        ({"cursor": "not-a-cursor"}, "INVALID_REQUEST", "cursor"),
        ({"cursor": "W10"}, "INVALID_REQUEST", "cursor"),
        ({"limit": "0"}, "INVALID_LIMIT", "limit"),
        ({"limit": "501"}, "INVALID_LIMIT", "limit"),
        ({"limit": "ten"}, "INVALID_LIMIT", "limit"),
        ({"order": "sideways"}, "INVALID_REQUEST", "order"),
    ],
)
async def test_bad_timeline_input_is_400(
    api: Api, params: dict[str, str], code: str, field: str
) -> None:
    """Bad input is a 400 naming the field, on both timelines, never a 500."""
    sid = await create(api.alpha, cadence=daily("09:00"))
    for path in (TIMELINE, f"{USER}/schedules/{sid}/timeline"):
        response = await api.alpha.get(path, params=params)
        assert response.status_code == 400, response.text
        body = response.json()
        assert (body["code"], body["errors"][0]["field"]) == (code, field)


async def test_a_cursor_is_bound_to_its_order(api: Api) -> None:
    """A cursor made for asc is refused with desc, naming the cursor."""
    await create(
        api.alpha,
        cadence={"simple": {"frequency": "interval_hours", "interval_hours": 1}, "timezone": "UTC"},
    )
    await advance(api.alpha, 5)
    page = (await api.alpha.get(TIMELINE, params={"limit": "2"})).json()
    response = await api.alpha.get(
        TIMELINE, params={"limit": "2", "order": "desc", "cursor": page["next_cursor"]}
    )
    assert response.status_code == 400
    assert response.json()["errors"][0]["field"] == "cursor"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"at": "noon"}, "at"),
        ({"at": "2026-05-01T09:00:00Z", "window": "forever"}, "window"),
        ({"at": "2026-05-01T09:00:00Z", "window": "8d"}, "window"),
        ({"at": "2026-05-01T09:00:00Z", "window": "0"}, "window"),
    ],
)
async def test_bad_explain_input_is_400(api: Api, params: dict[str, str], field: str) -> None:
    """Explain refuses a bad instant or window with INVALID_REQUEST naming it."""
    sid = await create(api.alpha, cadence=daily("09:00"))
    for path in (f"{TIMELINE}/explain", f"{USER}/schedules/{sid}/timeline/explain"):
        response = await api.alpha.get(path, params=params)
        assert response.status_code == 400, response.text
        body = response.json()
        assert (body["code"], body["errors"][0]["field"]) == ("INVALID_REQUEST", field)
