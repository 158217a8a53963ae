"""
Attempts recorded together (the worker's group commit), on SQLite and PostgreSQL: one
transaction applies each attempt as separate calls would, in order, and one bad attempt
costs only its own record.
"""

import asyncio
import dataclasses
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from delivery.store.tables import DELIVERIES, ENDPOINTS, NOTIFICATIONS
from delivery.store.webhooks import (
    ATTEMPTS,
    SUCCESS,
    AttemptRecord,
    ClaimedDelivery,
    NextState,
    RecordedAttempt,
    WebhookStore,
)
from handlers.webhooks.worker import AttemptRecorder
from tests.webhooks.conftest import Rig


def _attempt(claimed: ClaimedDelivery, at: datetime, *, ok: bool, n: int = 1) -> AttemptRecord:
    return AttemptRecord(
        attempt_id=f"att_{claimed.delivery_id}_{n}",
        attempt_number=claimed.attempt_number,
        event_id=claimed.event_id,
        webhook_url=claimed.url,
        status=SUCCESS if ok else "failed",
        response_code=200 if ok else 500,
        duration_ms=3,
        created_at=at,
        request_body="{}",
        response_body=None,
        error_message=None if ok else "HTTP 500",
    )


def _delivered(c: ClaimedDelivery, at: datetime, *, n: int = 1) -> RecordedAttempt:
    """Attempt ``n`` of ``c`` answered 2xx at ``at``: delivered."""
    return RecordedAttempt(c, _attempt(c, at, ok=True, n=n), NextState(delivered=True), at)


def _retried(
    c: ClaimedDelivery, at: datetime, retry_at: datetime, *, reason: str = "500", n: int = 1
) -> RecordedAttempt:
    """Attempt ``n`` of ``c`` failed at ``at``: tried again at ``retry_at``."""
    return RecordedAttempt(
        c, _attempt(c, at, ok=False, n=n), NextState(retry_at=retry_at, reason=reason), at
    )


def _dead(
    c: ClaimedDelivery, at: datetime, *, reason: str = "gave up", n: int = 1
) -> RecordedAttempt:
    """Attempt ``n`` of ``c`` failed at ``at``: dead-lettered."""
    return RecordedAttempt(
        c, _attempt(c, at, ok=False, n=n), NextState(dead=True, reason=reason), at
    )


async def _claimed(rig: Rig, count: int) -> list[ClaimedDelivery]:
    _receiver, url = rig.receiver()
    await rig.register(url)
    worker = rig.worker()
    await worker.enqueue(await rig.notify(*range(1, count + 1)))
    claimed = await rig.claim(count)
    assert len(claimed) == count
    return sorted(claimed, key=lambda c: c.event_id)


async def test_one_batch_applies_each_next_state(rig: Rig) -> None:
    """Delivered, retried and dead in one transaction: each row gets its own state."""
    ok, retry, dead = await _claimed(rig, 3)
    now = rig.clock.now()
    later = now + timedelta(minutes=5)
    found = await rig.webhooks.record_attempts(
        [
            _delivered(ok, now),
            _retried(retry, now, later),
            _dead(dead, now),
        ]
    )
    assert found == [None, None, None]
    d, n = DELIVERIES.c, NOTIFICATIONS.c
    async with rig.engine.connect() as conn:
        rows = {
            r.event_id: r
            for r in await conn.execute(
                select(d.event_id, d.status, d.next_attempt_at, d.last_error, d.attempt_count)
            )
        }
        notes = dict((await conn.execute(select(n.id, n.status))).all())
        attempts = (await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one()
    assert attempts == 3
    assert (rows[ok.event_id].status, rows[ok.event_id].last_error) == ("delivered", None)
    assert (rows[retry.event_id].status, rows[retry.event_id].next_attempt_at) == (
        "pending",
        later,
    )
    assert (rows[dead.event_id].status, rows[dead.event_id].last_error) == ("dead", "gave up")
    assert {r.attempt_count for r in rows.values()} == {1}
    # Only the delivered one consumes its notification.
    assert notes == {ok.event_id: "consumed", retry.event_id: "pending", dead.event_id: "pending"}


async def test_endpoint_streak_follows_the_order_of_the_batch(rig: Rig) -> None:
    """Failure, success, failure in one batch: the streak restarts at the last failure."""
    first, middle, last = await _claimed(rig, 3)
    t0 = rig.clock.now()
    t1, t2 = t0 + timedelta(seconds=1), t0 + timedelta(seconds=2)
    retry_at = t0 + timedelta(minutes=5)
    await rig.webhooks.record_attempts(
        [_retried(first, t0, retry_at), _delivered(middle, t1), _retried(last, t2, retry_at)]
    )
    (endpoint,) = await rig.webhooks.list_endpoints(rig.projects["alpha"])
    assert endpoint["failing_since"] == t2
    # And a success last ends the streak.
    again = await rig.claim(2, now=t0 + timedelta(minutes=5))
    at = t0 + timedelta(minutes=5)
    await rig.webhooks.record_attempts([_delivered(c, at, n=2) for c in again])
    (endpoint,) = await rig.webhooks.list_endpoints(rig.projects["alpha"])
    assert endpoint["failing_since"] is None


async def test_a_bad_attempt_fails_alone(rig: Rig) -> None:
    """
    An attempt whose row cannot be written (a repeated attempt id) fails its own
    sender; the attempts that finished with it are recorded all the same.
    """
    claimed = await _claimed(rig, 4)
    now = rig.clock.now()
    recorder = AttemptRecorder(rig.webhooks, disable_after=None)
    items = [_delivered(c, now) for c in claimed]
    # The second attempt reuses the first one's id: its insert collides.
    clash = RecordedAttempt(
        claimed[1],
        AttemptRecord(**{**_fields(items[1].attempt), "attempt_id": items[0].attempt.attempt_id}),
        NextState(delivered=True),
        now,
    )
    items[1] = clash
    results = await asyncio.gather(*(recorder.record(i) for i in items), return_exceptions=True)
    await recorder.drain()

    assert [isinstance(r, Exception) for r in results] == [False, True, False, False]
    d = DELIVERIES.c
    async with rig.engine.connect() as conn:
        states = dict((await conn.execute(select(d.event_id, d.status))).all())
    assert states == {
        claimed[0].event_id: "delivered",
        claimed[1].event_id: "pending",  # left for its lease to make due again
        claimed[2].event_id: "delivered",
        claimed[3].event_id: "delivered",
    }


def _fields(record: AttemptRecord) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__dataclass_fields__}


async def test_batches_failing_on_two_endpoints_in_opposite_orders_do_not_deadlock(
    rig: Rig,
) -> None:
    """
    Two replicas' batches fail on the same two endpoints, one batch A then B, the other
    B then A, at the same time: each endpoint row is locked in key order, so on
    PostgreSQL neither waits for the other in a cycle (a deadlock aborts one batch).
    """
    _receiver, url = rig.receiver()
    await rig.register(url)
    await rig.register(url, event_type="on_trigger_event")
    worker = rig.worker()
    rounds = 8
    await worker.enqueue(await rig.notify(*range(1, 2 * rounds + 1)))
    await worker.enqueue(
        await rig.notify(*range(101, 101 + 2 * rounds), event_type="on_trigger_event")
    )
    claimed = await rig.claim(4 * rounds)
    by_type: dict[str, list[ClaimedDelivery]] = {}
    for c in claimed:
        by_type.setdefault(c.event_type, []).append(c)
    a, b = by_type["on_wakeup_ready"], by_type["on_trigger_event"]
    assert len(a) == len(b) == 2 * rounds
    now = rig.clock.now()

    def failed(c: ClaimedDelivery) -> RecordedAttempt:
        return _retried(c, now, now + timedelta(minutes=5))

    for r in range(rounds):
        # Only the first failure of a streak locks its endpoint row: start afresh.
        async with rig.engine.begin() as conn:
            await conn.execute(update(ENDPOINTS).values(failing_since=None))
        one = [failed(a[2 * r]), failed(b[2 * r])]
        other = [failed(b[2 * r + 1]), failed(a[2 * r + 1])]
        await asyncio.gather(rig.webhooks.record_attempts(one), rig.webhooks.record_attempts(other))
    async with rig.engine.connect() as conn:
        attempts = (await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one()
    assert attempts == 4 * rounds


async def test_a_2xx_for_a_delivery_finished_meanwhile_consumes_nothing(rig: Rig) -> None:
    """
    A success recorded after its delivery was finished by someone else (dead when its
    endpoint went, delivered through another worker's lease) is kept as an attempt,
    but consumes the notification only through a delivery it finishes itself.
    """
    finished, live = await _claimed(rig, 2)
    now = rig.clock.now()
    await rig.webhooks.finish_without_attempt(
        finished.delivery_id, status="dead", reason="endpoint deleted", now=now
    )
    await rig.webhooks.record_attempts([_delivered(c, now) for c in (finished, live)])
    d, n = DELIVERIES.c, NOTIFICATIONS.c
    async with rig.engine.connect() as conn:
        deliveries = dict((await conn.execute(select(d.event_id, d.status))).all())
        notes = dict((await conn.execute(select(n.id, n.status))).all())
        attempts = (await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one()
    assert attempts == 2
    assert deliveries == {finished.event_id: "dead", live.event_id: "delivered"}
    assert notes[finished.event_id] == "pending"
    assert notes[live.event_id] == "consumed"


def _state_of(
    rows: dict[str, Any], notes: dict[str, Any], c: ClaimedDelivery
) -> tuple[object, ...]:
    r, n = rows[c.event_id], notes[c.event_id]
    return (
        r.status,
        r.attempt_count,
        r.next_attempt_at,
        r.last_error,
        r.delivered_at,
        r.claimed_by,
        r.updated_at,
        n.status,
        n.consumed_at,
    )


async def test_set_based_and_row_by_row_recording_agree(rig: Rig) -> None:
    """
    The same batch recorded in one set of statements (the store's form on PostgreSQL)
    and row by row (its form on SQLite) leaves the same rows: delivered, retried,
    dead, a 2xx for a delivery finished meanwhile, a 2xx whose notification polling
    consumed first, each at its own instant.
    """
    claimed = await _claimed(rig, 10)
    t0 = rig.clock.now()
    at = [t0 + timedelta(seconds=s) for s in range(1, 6)]
    later = t0 + timedelta(minutes=7)
    batches: list[list[RecordedAttempt]] = []
    for half in (claimed[:5], claimed[5:]):
        ok, retry, dead, finished, polled = half
        await _finished_and_polled(rig, finished, polled, t0)
        # Not in key order: the store orders what it locks.
        batches.append(
            [
                _delivered(polled, at[4]),
                _retried(retry, at[1], later, reason="HTTP 500"),
                _delivered(ok, at[0]),
                _delivered(finished, at[3]),
                _dead(dead, at[2]),
            ]
        )
    await rig.webhooks.record_attempts(batches[0])
    row_by_row = WebhookStore(rig.engine)
    row_by_row.single_writer = True  # the per-row form, whatever the database
    await row_by_row.record_attempts(batches[1])

    async with rig.engine.connect() as conn:
        rows = {r.event_id: r for r in await conn.execute(select(DELIVERIES))}
        notes = {r.id: r for r in await conn.execute(select(NOTIFICATIONS))}
        attempts = (await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one()
    assert attempts == 10
    sets = [_state_of(rows, notes, c) for c in claimed[:5]]
    singles = [_state_of(rows, notes, c) for c in claimed[5:]]
    assert sets == singles
    ok_state, retry_state, dead_state, finished_state, polled_state = sets
    assert ok_state == ("delivered", 1, None, None, at[0], None, at[0], "consumed", at[0])
    assert retry_state == ("pending", 1, later, "HTTP 500", None, None, at[1], "pending", None)
    assert dead_state == ("dead", 1, None, "gave up", None, None, at[2], "pending", None)
    # Finished meanwhile: left as it was, and its notification too.
    assert finished_state[0] == "dead"
    assert finished_state[7:] == ("pending", None)
    # Consumed by polling first: delivered now, consumed at polling's instant.
    assert polled_state == ("delivered", 1, None, None, at[4], None, at[4], "consumed", t0)


async def test_replicas_recording_the_same_deliveries_in_opposite_orders_do_not_deadlock(
    rig: Rig,
) -> None:
    """
    Two replicas record 2xx for the same deliveries at once (a lease that ended while
    the first attempt was in flight), one batch A then B, the other B then A: the
    deliveries and notifications are locked in key order, so on PostgreSQL neither
    waits for the other in a cycle, and each notification is consumed once.
    """
    rounds = 8
    claimed = await _claimed(rig, 2 * rounds)
    now = rig.clock.now()

    def ok(c: ClaimedDelivery, n: int) -> RecordedAttempt:
        return _delivered(c, now, n=n)

    for r in range(rounds):
        a, b = claimed[2 * r], claimed[2 * r + 1]
        await asyncio.gather(
            rig.webhooks.record_attempts([ok(a, 1), ok(b, 1)]),
            rig.webhooks.record_attempts([ok(b, 2), ok(a, 2)]),
        )
    d, n = DELIVERIES.c, NOTIFICATIONS.c
    async with rig.engine.connect() as conn:
        deliveries = set((await conn.execute(select(d.status))).scalars())
        notes = set((await conn.execute(select(n.status))).scalars())
        attempts = (await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one()
    assert attempts == 4 * rounds
    assert deliveries == {"delivered"}
    assert notes == {"consumed"}


async def test_one_delivery_twice_in_a_batch_ends_as_row_by_row(rig: Rig) -> None:
    """
    A delivery recorded twice in one batch (its lease ended while the first attempt
    was in flight, and the same worker claimed it again): set-based and row by row
    leave the same rows. A retry then a later retry: the later one stands; a success
    then a retry: delivered, the retry changes nothing; a retry then death: dead.
    """
    claimed = await _claimed(rig, 6)
    t0 = rig.clock.now()
    t1, t2 = t0 + timedelta(seconds=1), t0 + timedelta(seconds=2)
    r1, r2 = t0 + timedelta(minutes=5), t0 + timedelta(minutes=9)

    def batch(
        retries: ClaimedDelivery, ok: ClaimedDelivery, dies: ClaimedDelivery
    ) -> list[RecordedAttempt]:
        return [
            _retried(retries, t1, r1, reason="first"),
            _delivered(ok, t1),
            _retried(dies, t1, r1, reason="first"),
            _retried(retries, t2, r2, reason="second", n=2),
            _retried(ok, t2, r2, reason="second", n=2),
            _dead(dies, t2, n=2),
        ]

    await rig.webhooks.record_attempts(batch(*claimed[:3]))
    row_by_row = WebhookStore(rig.engine)
    row_by_row.single_writer = True  # the per-row form, whatever the database
    await row_by_row.record_attempts(batch(*claimed[3:]))

    async with rig.engine.connect() as conn:
        rows = {r.event_id: r for r in await conn.execute(select(DELIVERIES))}
        notes = {r.id: r for r in await conn.execute(select(NOTIFICATIONS))}
    sets = [_state_of(rows, notes, c) for c in claimed[:3]]
    singles = [_state_of(rows, notes, c) for c in claimed[3:]]
    assert sets == singles
    retries, ok, dies = sets
    assert retries[:4] == ("pending", 1, r2, "second")
    assert ok[0] == "delivered"
    assert ok[7:] == ("consumed", t1)
    assert dies[0] == "dead"


async def test_a_batch_of_2xx_in_one_call_leaves_the_rows_of_the_general_path(rig: Rig) -> None:
    """
    A batch whose attempts all succeeded is written in one call to SQLite's driver
    thread; it leaves what the general path leaves: the attempts' fields, the
    deliveries and notifications (one finished meanwhile, one consumed by polling
    first), the endpoint's streak ended, each at its own instant.
    """
    claimed = await _claimed(rig, 6)
    t0 = rig.clock.now()
    at = [t0 + timedelta(seconds=s) for s in range(1, 4)]
    e = ENDPOINTS.c
    general = WebhookStore(rig.engine)
    general.capabilities = dataclasses.replace(general.capabilities, driver_thread=False)
    for store, half in ((rig.webhooks, claimed[:3]), (general, claimed[3:])):
        ok, finished, polled = half
        await _finished_and_polled(rig, finished, polled, t0)
        async with rig.engine.begin() as conn:
            await conn.execute(update(ENDPOINTS).values(failing_since=t0))
        found = await store.record_attempts(
            [_delivered(c, when) for c, when in ((polled, at[2]), (ok, at[0]), (finished, at[1]))]
        )
        assert found == [None, None, None]
        async with rig.engine.connect() as conn:
            streak = (await conn.execute(select(e.failing_since))).scalar_one()
        assert streak is None

    a = ATTEMPTS.c
    async with rig.engine.connect() as conn:
        rows = {r.event_id: r for r in await conn.execute(select(DELIVERIES))}
        notes = {r.id: r for r in await conn.execute(select(NOTIFICATIONS))}
        attempts = {
            r.delivery_id: r._asdict() for r in await conn.execute(select(ATTEMPTS).order_by(a.seq))
        }
    direct_states = [_state_of(rows, notes, c) for c in claimed[:3]]
    general_states = [_state_of(rows, notes, c) for c in claimed[3:]]
    assert direct_states == general_states
    assert direct_states[0] == ("delivered", 1, None, None, at[0], None, at[0], "consumed", at[0])
    assert direct_states[1][0] == "dead"
    assert direct_states[1][7:] == ("pending", None)
    assert direct_states[2] == ("delivered", 1, None, None, at[2], None, at[2], "consumed", t0)
    for mine, theirs in zip(claimed[:3], claimed[3:], strict=True):
        one, other = attempts[mine.delivery_id], attempts[theirs.delivery_id]
        for key in ("seq", "id", "delivery_id", "event_id"):
            one.pop(key), other.pop(key)
        assert one == other
    assert attempts[claimed[0].delivery_id]["agent_id"] is not None


async def _finished_and_polled(
    rig: Rig, finished: ClaimedDelivery, polled: ClaimedDelivery, at: datetime
) -> None:
    """
    Two claimed deliveries overtaken before their attempts are recorded: ``finished``
    ended without one (its endpoint deleted), ``polled``'s notification consumed by a
    poll.
    """
    await rig.webhooks.finish_without_attempt(
        finished.delivery_id, status="dead", reason="endpoint deleted", now=at
    )
    n = NOTIFICATIONS.c
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(NOTIFICATIONS)
            .where(n.id == polled.event_id)
            .values(status="consumed", consumed_at=at)
        )
