"""``Idempotency-Key``: replay, reuse with another body, 5xx not stored, record and write atomic."""

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from delivery.api import create_app
from delivery.api.app import purge_idempotency_forever
from delivery.bus.subjects import DEFAULT_SUBJECT_PREFIX, Subjects
from delivery.planning import Skip
from delivery.settings import Settings
from delivery.store.creates import ExpectedOffset, offset_guard, row_values
from delivery.store.idempotency import Recorded, write_recorded
from delivery.store.inventory import InventoryStore
from delivery.store.schedules import ScheduleStore
from delivery.store.sql import SqlStore
from delivery.store.steps import Call, InsertRows, inserting
from delivery.store.tables import (
    IDEMPOTENCY,
    INVENTORY,
    OFFSETS,
    SCHEDULES,
    WAKEUPS,
    InventoryItemRow,
    ScheduleRow,
    WakeupRow,
)
from delivery.store.wakeups import WakeupStore
from tests.api.conftest import START, Api

PATH = "/api/v1/agents/a1/users/u1/schedules"
CADENCE = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
BODY = {
    "cadence": CADENCE,
    "intent": "check in",
    "check_type": "reminder",
}


async def test_same_key_replays_first_response(api: Api) -> None:
    """A retried POST with the same key and body gets the first response; one row is made."""
    headers = {"Idempotency-Key": "k" * 32}
    first = await api.alpha.post(PATH, json=BODY, headers=headers)
    second = await api.alpha.post(PATH, json=BODY, headers=headers)
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert await api.store.count(SCHEDULES) == 1

    # Another route, or another project, with the same key is independent.
    other = await api.alpha.post("/api/v1/agents/a1/users/u2/schedules", json=BODY, headers=headers)
    assert other.json()["schedule_id"] != first.json()["schedule_id"]
    theirs = await api.beta.post(PATH, json=BODY, headers=headers)
    assert theirs.status_code == 201
    assert await api.store.count(SCHEDULES) == 3

    # Without a key, every POST executes.
    await api.alpha.post(PATH, json=BODY)
    assert await api.store.count(SCHEDULES) == 4
    # GET and DELETE never consult the table.
    records = await api.store.count(IDEMPOTENCY)
    for method in ("GET", "DELETE"):
        await api.alpha.request(method, f"{PATH}/sch_x", headers={"Idempotency-Key": "x"})
    assert await api.store.count(IDEMPOTENCY) == records

    # Recorded bodies are sealed, whatever they carry (not only signing secrets).
    async with api.store.engine.connect() as conn:
        stored = [
            r[0]
            for r in await conn.execute(
                IDEMPOTENCY.select().with_only_columns(IDEMPOTENCY.c.response_body)
            )
        ]
    assert len(stored) == records == 3
    assert all(body.startswith("sealed:") and "check in" not in body for body in stored)


async def test_same_key_other_body_is_409(api: Api) -> None:
    """Reusing a key with a different body is 409 IDEMPOTENCY_KEY_REUSED and writes nothing."""
    headers = {"Idempotency-Key": "reused"}
    assert (await api.alpha.post(PATH, json=BODY, headers=headers)).status_code == 201
    changed = await api.alpha.post(PATH, json={**BODY, "intent": "other"}, headers=headers)
    assert changed.status_code == 409
    assert changed.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert changed.json()["errors"][0]["field"] == "Idempotency-Key"
    assert await api.store.count(SCHEDULES) == 1


async def test_client_errors_are_replayed(api: Api) -> None:
    """A 4xx answer is stored too: the retry gets the same error without re-validating."""
    headers = {"Idempotency-Key": "bad-one"}
    bad = {**BODY, "cadence": {**CADENCE, "timezone": "Mars/Base"}}
    first = await api.alpha.post(PATH, json=bad, headers=headers)
    again = await api.alpha.post(PATH, json=bad, headers=headers)
    assert first.status_code == again.status_code == 400
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"


class _FailOnceWakeups(WakeupStore):
    """Wakeups whose first insert fails, as a database fault would."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.calls = 0

    async def insert_wakeup(
        self,
        row: WakeupRow | Mapping[str, Any],
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("database unreachable")
        return await super().insert_wakeup(row, record=record, expected=expected)


async def test_server_errors_are_not_stored(api: Api) -> None:
    """A 5xx releases the key, so the SDK's retry with the same key runs again."""
    store = SqlStore(api.store.engine)
    store.wakeups = failing = _FailOnceWakeups(api.store.engine)
    app = create_app(Settings(subject_prefix="test"), store, api.clock)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {**api.alpha.headers, "Idempotency-Key": "flaky"}
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        wakeup = {"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 1}
        with capture_logs(processors=[merge_contextvars]) as logs:
            failed = await client.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
        assert failed.status_code == 500
        assert failed.json()["code"] == "INTERNAL"
        crash = next(e for e in logs if e["event"] == "unhandled error")
        assert crash["error"] == "RuntimeError"
        assert crash["request_id"].startswith("req_")
        access = next(e for e in logs if e["event"] == "request")
        assert (access["status"], access["request_id"]) == (500, crash["request_id"])
        assert await api.store.count(IDEMPOTENCY) == 0
        retried = await client.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
        assert retried.status_code == 201
        assert "idempotent-replayed" not in retried.headers
    assert failing.calls == 2
    assert await api.store.count(WAKEUPS) == 1


class _BrokenWaker:
    def wake(self) -> None:
        raise RuntimeError("daemon unreachable")


async def test_waker_faults_do_not_fail_committed_writes(api: Api) -> None:
    """The write is durable before the waker runs, so a waker fault is logged, not a 500."""
    app = create_app(Settings(subject_prefix="test"), api.store, api.clock, _BrokenWaker())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://api.test",
        headers=api.alpha.headers,
    ) as client:
        with capture_logs() as logs:
            made = await client.post(PATH, json=BODY)
    assert made.status_code == 201
    assert any(e["event"] == "waker failed" for e in logs)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_expired_records_are_purged(api: Api) -> None:
    """
    The app's background purge deletes records once their 24 h are over (the purge
    statement itself runs on both databases in tests/store/test_sql.py).
    """
    await api.alpha.post(PATH, json=BODY, headers={"Idempotency-Key": "old"})
    assert await api.store.count(IDEMPOTENCY) == 1
    api.clock.advance(timedelta(hours=24))
    task = asyncio.create_task(purge_idempotency_forever(api.store, api.clock, 0.01))
    try:
        async with asyncio.timeout(10):
            while await api.store.count(IDEMPOTENCY):  # noqa: ASYNC110 - polls the database
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class _PausedSchedules(ScheduleStore):
    """A store whose first schedule insert holds its request open until released."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Subjects(DEFAULT_SUBJECT_PREFIX))
        self.inserts = 0
        self.inserted = asyncio.Event()
        self.release = asyncio.Event()

    async def insert_schedule(
        self,
        row: ScheduleRow | Mapping[str, Any],
        skips: Sequence[Skip] = (),
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        self.inserts += 1
        first = self.inserts == 1
        outcome = await super().insert_schedule(row, skips, record=record, expected=expected)
        if first:
            self.inserted.set()
            await self.release.wait()
        return outcome


async def test_concurrent_retry_gets_the_first_answer(api: Api) -> None:
    """A retry arriving while the first request still runs gets one answer for both, one row."""
    store = SqlStore(api.store.engine)
    store.schedules = paused = _PausedSchedules(api.store.engine)
    app = create_app(Settings(subject_prefix="test"), store, api.clock)
    headers = {**api.alpha.headers, "Idempotency-Key": "slow"}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test", headers=headers
    ) as client:
        first = asyncio.create_task(client.post(PATH, json=BODY))
        await asyncio.wait_for(paused.inserted.wait(), 10)
        retry = asyncio.create_task(client.post(PATH, json=BODY))
        await asyncio.sleep(0.2)
        assert not first.done()
        paused.release.set()
        answers = await asyncio.wait_for(asyncio.gather(first, retry), 20)
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0].json() == answers[1].json()
    assert [a.headers.get("idempotent-replayed") for a in answers].count("true") == 1
    assert await api.store.count(SCHEDULES) == 1
    assert await api.store.count(IDEMPOTENCY) == 1


class _WriteThenFailItems(InventoryStore):
    """Inventory whose first insert writes the row and then fails, as a lost connection would."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, subjects=Subjects(DEFAULT_SUBJECT_PREFIX))
        self.calls = 0

    async def insert_item(self, row: InventoryItemRow) -> None:
        self.calls += 1
        await super().insert_item(row)
        if self.calls == 1:
            raise RuntimeError("connection lost after the insert")


async def test_a_failed_request_leaves_neither_its_writes_nor_its_key(api: Api) -> None:
    """Writes made before a 5xx roll back with it, so the retry makes the resource exactly once."""
    store = SqlStore(api.store.engine)
    store.inventory = _WriteThenFailItems(api.store.engine)
    app = create_app(Settings(subject_prefix="test"), store, api.clock)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {**api.alpha.headers, "Idempotency-Key": "half-done"}
    path = "/api/v1/agents/a1/users/u1/inventory/items"
    item = {"item_type": "medication", "label": "aspirin"}
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        failed = await client.post(path, json=item, headers=headers)
        assert failed.status_code == 500
        assert await api.store.count(INVENTORY) == 0
        assert await api.store.count(IDEMPOTENCY) == 0
        retried = await client.post(path, json=item, headers=headers)
        replayed = await client.post(path, json=item, headers=headers)
    assert retried.status_code == replayed.status_code == 201
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == retried.json()
    assert await api.store.count(INVENTORY) == 1


def _fail(_: object) -> None:
    raise RuntimeError("connection lost after the insert")


async def _fail_core(_: object) -> None:
    _fail(None)


class _RecordedThenFailWakeups(WakeupStore):
    """
    Wakeups whose first write inserts the row and its key's record, then fails
    in the same transaction (a fault between the statements).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.calls = 0

    async def insert_wakeup(
        self,
        row: WakeupRow | Mapping[str, Any],
        *,
        record: Mapping[str, Any] | None = None,
        expected: ExpectedOffset | None = None,
    ) -> Recorded:
        self.calls += 1
        if self.calls > 1:
            return await super().insert_wakeup(row, record=record, expected=expected)
        failing = inserting(
            InsertRows(WAKEUPS, [row_values(row)]),
            Call(_fail, _fail_core),
        )
        return await write_recorded(self._runner, failing, record, guard=offset_guard(expected))


async def test_a_failed_self_recorded_write_leaves_neither_row_nor_key(api: Api) -> None:
    """
    A wakeup records its key with its own write: a fault inside that write rolls
    back the row and the record together, so the retry makes the wakeup once.
    """
    store = SqlStore(api.store.engine)
    store.wakeups = _RecordedThenFailWakeups(api.store.engine)
    app = create_app(Settings(subject_prefix="test"), store, api.clock)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    headers = {**api.alpha.headers, "Idempotency-Key": "half-done"}
    wakeup = {"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 1}
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        failed = await client.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
        assert failed.status_code == 500
        assert await api.store.count(WAKEUPS) == 0
        assert await api.store.count(IDEMPOTENCY) == 0
        retried = await client.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
        replayed = await client.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
    assert retried.status_code == replayed.status_code == 201
    assert replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == retried.json()
    assert await api.store.count(WAKEUPS) == 1


@pytest.mark.parametrize("kind", ["wakeup", "schedule"])
async def test_self_recording_routes_replay_and_refuse_reuse(api: Api, kind: str) -> None:
    """
    Wakeups and schedules record their key with their write; a retry runs the route
    again, and still gets the first answer (nothing written twice), a reused key 409.
    """
    if kind == "wakeup":
        path, table = "/api/v1/agents/a1/wakeups", WAKEUPS
        body: dict[str, Any] = {"user_id": "u1", "check_type": "c", "intent": "i"}
        body["delay_hours"] = 1
    else:
        path, table, body = PATH, SCHEDULES, BODY
    headers = {"Idempotency-Key": f"self-{kind}"}
    first = await api.alpha.post(path, json=body, headers=headers)
    again = await api.alpha.post(path, json=body, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    reused = await api.alpha.post(path, json={**body, "intent": "other"}, headers=headers)
    assert reused.status_code == 409
    assert reused.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await api.store.count(table) == 1
    assert await api.store.count(IDEMPOTENCY) == 1
    # The key's record is sealed like every other.
    async with api.store.engine.connect() as conn:
        [stored] = [
            r[0]
            for r in await conn.execute(
                IDEMPOTENCY.select().with_only_columns(IDEMPOTENCY.c.response_body)
            )
        ]
    assert stored.startswith("sealed:")


async def test_a_retry_the_route_would_now_refuse_replays_the_first_answer(api: Api) -> None:
    """
    A wakeup's retry runs the route again; one that its checks now refuse (its
    instant is past by then) still gets the first answer, not a 400.
    """
    headers = {"Idempotency-Key": "late-retry"}
    at = (api.clock.now() + timedelta(hours=1)).isoformat()
    wakeup = {"user_id": "u1", "check_type": "c", "intent": "i", "scheduled_at": at}
    first = await api.alpha.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
    assert first.status_code == 201
    api.clock.advance(timedelta(hours=3))
    unkeyed = await api.alpha.post("/api/v1/agents/a1/wakeups", json=wakeup)
    assert unkeyed.status_code == 400
    retried = await api.alpha.post("/api/v1/agents/a1/wakeups", json=wakeup, headers=headers)
    assert retried.status_code == 201
    assert retried.json() == first.json()
    assert retried.headers["idempotent-replayed"] == "true"
    assert await api.store.count(WAKEUPS) == 1


async def _advance(api: Api, agent: str, user: str, hours: float) -> None:
    """Give the pair an advance-time offset, as advance-time would (its rows aside)."""
    async with api.store.engine.begin() as conn:
        await conn.execute(
            OFFSETS.insert().values(
                project_id=api.projects["alpha"],
                agent_id=agent,
                user_id=user,
                offset_s=hours * 3600,
                updated_at=START,
            )
        )


async def test_a_keyed_create_on_an_advanced_pair_is_built_on_its_clock(api: Api) -> None:
    """
    A keyed wakeup on an advanced pair is built for real time first; its write finds
    the offset and writes nothing, and the route builds it again on the pair's clock:
    one row, due in real time, and its answer recorded and replayed.
    """
    await _advance(api, "a1", "u1", 24)
    body = {"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 1}
    headers = {"Idempotency-Key": "pair-1"}

    first = await api.alpha.post("/api/v1/agents/a1/wakeups", json=body, headers=headers)
    again = await api.alpha.post("/api/v1/agents/a1/wakeups", json=body, headers=headers)

    assert first.status_code == 201, first.text
    assert first.json()["scheduled_at"] == "2026-05-02T01:00:00Z"
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers.get("idempotent-replayed") == "true"
    async with api.store.engine.connect() as conn:
        rows = (await conn.execute(select(WAKEUPS.c.id, WAKEUPS.c.due_at))).all()
    due = START + timedelta(hours=1)
    assert [(r.id, r.due_at) for r in rows] == [(first.json()["wakeup_id"], due)]


async def test_a_refusal_on_an_advanced_pair_clock_is_recorded(api: Api) -> None:
    """
    A keyed wakeup whose instant real time has not reached but its pair's clock has
    long passed: its write on the real-time guess is refused by the pair's offset,
    and the 400 the pair's clock gives is recorded like any 4xx (the retry replays it).
    """
    await _advance(api, "a1", "u1", 24)
    body = {
        "user_id": "u1",
        "check_type": "c",
        "intent": "i",
        "scheduled_at": "2026-05-01T03:00:00Z",
        "delay_hours": 0,
    }
    headers = {"Idempotency-Key": "pair-late"}

    first = await api.alpha.post("/api/v1/agents/a1/wakeups", json=body, headers=headers)
    again = await api.alpha.post("/api/v1/agents/a1/wakeups", json=body, headers=headers)

    assert (first.status_code, first.json()["code"]) == (400, "SCHEDULED_AT_IN_PAST")
    assert (again.status_code, again.json()) == (400, first.json())
    assert again.headers.get("idempotent-replayed") == "true"
    assert await api.store.count(WAKEUPS) == 0
