"""
Trigger events written in grouped transactions (``delivery.api.ingest``): under
concurrency each accepted event is written once with its outbox message and its
``Idempotency-Key`` record, and no request is answered 2xx before its commit.
"""

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.responses import JSONResponse

from delivery.api import create_app
from delivery.api.schemas import EventAccepted
from delivery.handoff import Handoff
from delivery.settings import Settings
from delivery.store.creates import row_values
from delivery.store.engine import begin_immediate, create_engine
from delivery.store.events import EventOutcome, EventStore, EventWrite, _accepting
from delivery.store.sql import SqlStore
from delivery.store.steps import Steps
from delivery.store.tables import EVENTS, IDEMPOTENCY, OUTBOX
from tests.api.conftest import Api

PATH = "/api/v1/agents/a1/events"


def _event(n: int) -> dict[str, str]:
    return {"user_id": f"u{n % 7}", "event_type": "order_shipped", "event_description": f"#{n}"}


class _RecordingEvents(EventStore):
    """Events that remember the size of every batch, and can hold one before it is written."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.batches: list[int] = []
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        self.batches.append(len(writes))
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        return await super().accept_events(writes, now)


def _client(api: Api, events: EventStore, handoff: Handoff | None = None) -> httpx.AsyncClient:
    store = SqlStore(api.store.engine)
    store.events = events
    app = create_app(Settings(subject_prefix="test"), store, api.clock, handoff=handoff)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
        base_url="http://api.test",
        headers=api.alpha.headers,
    )


async def _written(api: Api) -> tuple[set[str], int, int]:
    """The event ids written, and how many outbox messages and idempotency records."""
    async with api.store.engine.connect() as conn:
        ids = {r[0] for r in await conn.execute(EVENTS.select().with_only_columns(EVENTS.c.id))}
    return ids, await api.store.count(OUTBOX), await api.store.count(IDEMPOTENCY)


@pytest.mark.parametrize("key", [None, "k-bytes"])
async def test_the_acceptance_is_the_models_json_byte_for_byte(api: Api, key: str | None) -> None:
    """
    The route writes its answer's bytes itself: they are what ``JSONResponse`` makes of
    ``EventAccepted``, with its headers, first time and replayed.
    """
    headers = {"Idempotency-Key": key} if key else {}
    first = await api.alpha.post(PATH, json=_event(1), headers=headers)
    event_id = first.json()["event_id"]
    model = JSONResponse(EventAccepted(accepted=True, event_id=event_id).model_dump())

    assert first.status_code == 200
    assert first.content == model.body
    assert first.headers["content-type"] == "application/json"
    assert first.headers["content-length"] == str(len(model.body))
    if key:
        again = await api.alpha.post(PATH, json=_event(1), headers=headers)
        assert again.content == model.body


async def test_concurrent_events_are_grouped_and_each_written_once(api: Api) -> None:
    """
    Many concurrent posts, each key sent twice at once and some without a key: the
    writes are grouped, every key has one event, one outbox message and one
    record, and both its answers name that event.
    """
    events = _RecordingEvents(api.store.engine)
    keyed = 60
    async with _client(api, events) as client:
        posts = [
            client.post(PATH, json=_event(n), headers={"Idempotency-Key": f"key-{n}"})
            for n in range(keyed)
            for _ in range(2)
        ]
        posts += [client.post(PATH, json=_event(1000 + n)) for n in range(20)]
        # The same key with another body: refused, not written.
        posts.append(client.post(PATH, json=_event(999), headers={"Idempotency-Key": "key-0"}))
        answers = await asyncio.gather(*posts)
    reused = answers.pop()
    assert reused.status_code in (200, 409)  # 200 only if it won the race for the key
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.is_error]
    assert max(events.batches) > 1, events.batches
    ids, outbox, records = await _written(api)
    assert len(ids) == outbox == keyed + 20
    assert records == keyed
    for n in range(keyed):
        first, second = answers[2 * n], answers[2 * n + 1]
        if reused.status_code == 200 and n == 0:
            continue
        assert first.json() == second.json()
        assert first.json()["event_id"] in ids
        replayed = [a.headers.get("idempotent-replayed") for a in (first, second)]
        assert replayed.count("true") == 1, replayed
    assert {a.json()["event_id"] for a in answers} == ids
    if reused.status_code == 409:
        assert reused.json()["code"] == "IDEMPOTENCY_KEY_REUSED"


async def test_no_answer_before_the_batch_commits(api: Api) -> None:
    """While a batch is being written its requests wait; they are answered after its commit."""
    events = _RecordingEvents(api.store.engine)
    events.hold = asyncio.Event()
    async with _client(api, events) as client:
        posts = [
            asyncio.create_task(
                client.post(PATH, json=_event(n), headers={"Idempotency-Key": f"held-{n}"})
            )
            for n in range(10)
        ]
        await asyncio.wait_for(events.holding.wait(), 10)
        await asyncio.sleep(0.2)
        assert not any(p.done() for p in posts)
        assert (await _written(api))[0] == set()
        events.hold.set()
        answers = await asyncio.wait_for(asyncio.gather(*posts), 20)
    assert [a.status_code for a in answers] == [200] * 10
    ids, outbox, records = await _written(api)
    assert {a.json()["event_id"] for a in answers} == ids
    assert len(ids) == outbox == records == 10


def _then_fail(steps: Steps[list[EventOutcome]]) -> Steps[list[EventOutcome]]:
    outcomes = yield from steps
    raise RuntimeError(f"connection lost after writing {len(outcomes)} events")


class _FailingEvents(EventStore):
    """Events whose batches write everything and then fail inside the transaction."""

    def __init__(self, engine: AsyncEngine, *, larger_than: int) -> None:
        super().__init__(engine)
        self.larger_than = larger_than
        self.failed = 0

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        if len(writes) > self.larger_than:
            self.failed += 1
            return await self._runner.write(_then_fail(_accepting(writes, now)))
        return await super().accept_events(writes, now)


async def test_a_failed_batch_is_rolled_back_and_answered_as_a_failure(api: Api) -> None:
    """A failed batch rolls back whole, its requests get a 5xx, their retries write once."""
    async with _client(api, _FailingEvents(api.store.engine, larger_than=0)) as client:
        posts = [
            client.post(PATH, json=_event(n), headers={"Idempotency-Key": f"lost-{n}"})
            for n in range(3)
        ]
        failed = await asyncio.gather(*posts)
    assert [a.status_code for a in failed] == [500] * 3
    assert await _written(api) == (set(), 0, 0)
    async with _client(api, EventStore(api.store.engine)) as client:
        retried = await _post_keyed(client, "lost", 3)
    assert [a.status_code for a in retried] == [200] * 3
    assert not any(a.headers.get("idempotent-replayed") for a in retried)
    ids, outbox, records = await _written(api)
    assert len(ids) == outbox == records == 3


class _RefusingEvents(EventStore):
    """
    Events whose batches of more than one hold a row the database refuses (its
    project does not exist: a real foreign-key error); alone, each row is as sent.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.refused = 0
        self.batches: list[int] = []

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        self.batches.append(len(writes))
        if len(writes) > 1:
            self.refused += 1
            bad = replace(writes[-1], row={**row_values(writes[-1].row), "project_id": "proj_gone"})
            writes = [*writes[:-1], bad]
        return await super().accept_events(writes, now)


async def test_a_batch_refused_for_a_row_is_retried_one_event_at_a_time(api: Api) -> None:
    """A batch refused for one of its rows is rewritten event by event, once each."""
    events = _RefusingEvents(api.store.engine)
    async with _client(api, events) as client:
        answers = await _post_keyed(client, "split", 12)
    assert events.refused >= 1, events.batches
    assert [a.status_code for a in answers] == [200] * 12
    ids, outbox, records = await _written(api)
    assert {a.json()["event_id"] for a in answers} == ids
    assert len(ids) == outbox == records == 12


async def test_a_split_batch_hands_each_event_over_once(api: Api) -> None:
    """
    With an in-process hand-off, a batch refused for a row gives its room back and each
    event written alone is handed over once; every grant is released.
    """
    handoff = Handoff(100, timedelta(seconds=30))
    events = _RefusingEvents(api.store.engine)
    async with _client(api, events, handoff) as client:
        answers = await _post_keyed(client, "hand", 12)
    assert events.refused >= 1, events.batches
    assert [a.status_code for a in answers] == [200] * 12
    handed = await handoff.take(100, 0.0)
    assert sorted(ref.id for ref in handed) == sorted(a.json()["event_id"] for a in answers)
    handoff.done(len(handed))
    assert handoff.reserve(100) == 100, "a grant was not given back"


async def test_a_failed_batch_hands_nothing_over(api: Api) -> None:
    """A batch that did not commit hands none of its events over and gives its room back."""
    handoff = Handoff(100, timedelta(seconds=30))
    async with _client(api, _FailingEvents(api.store.engine, larger_than=0), handoff) as client:
        failed = await asyncio.gather(*(client.post(PATH, json=_event(n)) for n in range(3)))
    assert [a.status_code for a in failed] == [500] * 3
    assert len(handoff) == 0
    assert handoff.reserve(100) == 100, "a grant was not given back"


async def test_a_batch_failing_otherwise_is_not_split(api: Api) -> None:
    """A fault that is not one row's (here: after the writes) fails the batch's requests."""
    events = _FailingEvents(api.store.engine, larger_than=1)
    async with _client(api, events) as client:
        answers = await _post_keyed(client, "fault", 12)
    assert events.failed >= 1
    assert 500 in [a.status_code for a in answers]
    ids, outbox, records = await _written(api)
    ok = {a.json()["event_id"] for a in answers if a.status_code == 200}
    assert ok == ids
    assert len(ids) == outbox == records


async def _post_keyed(client: httpx.AsyncClient, prefix: str, count: int) -> list[httpx.Response]:
    """``count`` events posted at once, each with its own key (``{prefix}-{n}``)."""
    return await asyncio.gather(
        *(
            client.post(PATH, json=_event(n), headers={"Idempotency-Key": f"{prefix}-{n}"})
            for n in range(count)
        )
    )


def _short_lock_wait(api: Api) -> AsyncEngine:
    """
    An engine on the API's database whose writers give up on a held lock after 100 ms
    (SQLite's ``busy_timeout`` is 30 s, PostgreSQL waits forever by default).
    """
    url = api.store.engine.url.render_as_string(hide_password=False)
    if api.store.engine.dialect.name != "sqlite":
        # A session setting from the start, on every connection the pool opens (a SET
        # in a connect hook lives in a transaction that a rollback takes back).
        return create_async_engine(url, connect_args={"server_settings": {"lock_timeout": "100ms"}})
    short = create_engine(url)

    def shorten(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=100")
        cursor.close()

    event.listen(short.sync_engine, "connect", shorten)
    return short


@contextlib.asynccontextmanager
async def _write_lock_held(api: Api, until: asyncio.Event) -> AsyncIterator[None]:
    """
    Another connection takes the events' write lock and holds it until ``until`` is
    set, at the latest when the block exits: released on what the test waits for,
    not after a time that a loaded machine may outrun.
    """
    taken = asyncio.Event()

    async def hold() -> None:
        async with api.store.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                await begin_immediate(conn)
            else:
                await conn.execute(text("LOCK TABLE trigger_events IN EXCLUSIVE MODE"))
            taken.set()
            await until.wait()
            await conn.rollback()

    holder = asyncio.create_task(hold())
    await asyncio.wait_for(taken.wait(), 10)
    try:
        yield
    finally:
        until.set()
        await holder


async def test_a_batch_that_meets_a_held_lock_is_written_again_whole(api: Api) -> None:
    """
    A second connection holds the write lock longer than the writers wait for it: the
    batch is written again whole after a back-off, never split into one transaction
    per event (each of which would wait for the lock again), and every request is
    answered from its one commit.
    """
    short = _short_lock_wait(api)
    try:
        events = _AttemptedEvents(short)
        # Held until a batch has met it, then released for the batch's next try.
        async with _client(api, events) as client, _write_lock_held(api, events.met):
            answers = await _post_keyed(client, "lock", 6)
    finally:
        await short.dispose()
    assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
    ids, outbox, records = await _written(api)
    assert {a.json()["event_id"] for a in answers} == ids
    assert len(ids) == outbox == records == 6
    # The lock outlasted a wait, and each batch that met it went again as it was.
    attempts = events.attempts
    assert any(failed for _, failed in attempts), attempts
    for (size, failed), (next_size, _) in itertools.pairwise(attempts):
        if failed:
            assert next_size == size, attempts
    assert not attempts[-1][1], attempts


async def test_a_lock_held_past_every_retry_is_a_503_and_records_nothing(api: Api) -> None:
    """
    The lock outlasts every wait and back-off: each request is told the database is
    busy (503, retry after a second), not that the service failed, and nothing of the
    batch is recorded, so the client's retry with the same key is its first write.
    The lock is held until both answers are in.
    """
    short = _short_lock_wait(api)
    try:
        async with (
            _client(api, EventStore(short)) as client,
            _write_lock_held(api, asyncio.Event()),
        ):
            answers = await _post_keyed(client, "held", 2)
    finally:
        await short.dispose()
    assert [a.status_code for a in answers] == [503] * 2, [a.text for a in answers]
    for answer in answers:
        assert answer.json()["code"] == "DATABASE_UNAVAILABLE"
        assert answer.headers["Retry-After"] == "1"
    assert await _written(api) == (set(), 0, 0)


class _AttemptedEvents(EventStore):
    """Events that remember each batch's size and whether its write failed."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.attempts: list[tuple[int, bool]] = []
        self.met = asyncio.Event()

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        try:
            outcomes = await super().accept_events(writes, now)
        except Exception:
            self.attempts.append((len(writes), True))
            self.met.set()
            raise
        self.attempts.append((len(writes), False))
        return outcomes


class _BackendKilledEvents(EventStore):
    """Its first batch runs after PostgreSQL terminated the connection's backend."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.killed = False

    async def accept_events(
        self, writes: Sequence[EventWrite], now: datetime
    ) -> list[EventOutcome]:
        if not self.killed:
            self.killed = True
            async with self.write() as conn:
                # The server ends this very session, as a failover or an operator would.
                await conn.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
                await conn.execute(EVENTS.insert().values(**row_values(writes[0].row)))
        return await super().accept_events(writes, now)


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_a_lost_database_answers_503_and_the_retry_writes_once(api: Api) -> None:
    """The grouped write keeps the 503 of a lost connection; nothing of it is recorded."""
    async with _client(api, _BackendKilledEvents(api.store.engine)) as client:
        headers = {"Idempotency-Key": "failover"}
        lost = await client.post(PATH, json=_event(1), headers=headers)
        assert (lost.status_code, lost.json()["code"]) == (503, "DATABASE_UNAVAILABLE")
        assert await _written(api) == (set(), 0, 0)
        retried = await client.post(PATH, json=_event(1), headers=headers)
    assert retried.status_code == 200, retried.text
    ids, outbox, records = await _written(api)
    assert ids == {retried.json()["event_id"]}
    assert outbox == records == 1


async def test_retries_are_answered_from_the_record(api: Api) -> None:
    """
    The route checks its key in its own write: a retry replays the first answer,
    another body with the key is 409, a recorded 400 is replayed; one event.
    """
    headers = {"Idempotency-Key": "again"}
    first = await api.alpha.post(PATH, json=_event(1), headers=headers)
    retry = await api.alpha.post(PATH, json=_event(1), headers=headers)
    assert first.status_code == retry.status_code == 200
    assert retry.json() == first.json()
    assert retry.headers["idempotent-replayed"] == "true"
    other = await api.alpha.post(PATH, json=_event(2), headers=headers)
    assert (other.status_code, other.json()["code"]) == (409, "IDEMPOTENCY_KEY_REUSED")
    bad = {**_event(3), "metadata": {"k": "v" * 100_000}}
    refused = await api.alpha.post(PATH, json=bad, headers={"Idempotency-Key": "bad"})
    replayed = await api.alpha.post(PATH, json=bad, headers={"Idempotency-Key": "bad"})
    assert refused.status_code == replayed.status_code == 400
    assert replayed.json() == refused.json()
    assert replayed.headers["idempotent-replayed"] == "true"
    ids, outbox, records = await _written(api)
    assert ids == {first.json()["event_id"]}
    assert (outbox, records) == (1, 2)


async def test_shutdown_waits_for_the_batch_being_written(api: Api) -> None:
    """The app's shutdown lets a batch in its write commit before the engine goes away."""
    events = _RecordingEvents(api.store.engine)
    events.hold = asyncio.Event()
    store = SqlStore(api.store.engine)
    store.events = events
    app = create_app(Settings(subject_prefix="test"), store, api.clock)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://api.test", headers=api.alpha.headers
    ) as client:
        async with app.router.lifespan_context(app):
            post = asyncio.create_task(client.post(PATH, json=_event(1)))
            await asyncio.wait_for(events.holding.wait(), 10)
            asyncio.get_running_loop().call_later(0.3, events.hold.set)
        # The shutdown returned only after the held batch committed.
        assert len((await _written(api))[0]) == 1
        assert (await asyncio.wait_for(post, 10)).status_code == 200


async def test_a_shutdown_during_the_back_off_answers_the_batch(api: Api) -> None:
    """
    The app stops while a locked batch waits to be written again: its requests are
    answered with an error at once (nothing was written), not left waiting.
    """
    short = _short_lock_wait(api)
    try:
        events = _AttemptedEvents(short)
        store = SqlStore(api.store.engine)
        store.events = events
        app = create_app(Settings(subject_prefix="test"), store, api.clock)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with (
            httpx.AsyncClient(
                transport=transport, base_url="http://api.test", headers=api.alpha.headers
            ) as client,
            _write_lock_held(api, asyncio.Event()),
        ):
            post = asyncio.create_task(client.post(PATH, json=_event(1)))
            await asyncio.wait_for(events.met.wait(), 10)
            await app.state.ctx.ingest.aclose(timeout_s=0.0)
            answer = await asyncio.wait_for(post, 10)
    finally:
        await short.dispose()
    assert answer.status_code == 500
    assert events.attempts[0] == (1, True)
    assert await _written(api) == (set(), 0, 0)
