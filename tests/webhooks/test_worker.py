"""
The delivery worker end to end: real receivers under uvicorn, the durable queue on
SQLite and PostgreSQL, retries driven by a ManualClock through the bounded sweep.
"""

import asyncio
import dataclasses
import hashlib
import hmac
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

import nats
from sqlalchemy import select, update
from standardwebhooks import Webhook
from starlette.types import Receive, Scope, Send

from delivery.bus.stream import ensure_stream
from delivery.bus.subjects import Subjects
from delivery.store import direct
from delivery.store.tables import DELIVERIES, ENDPOINTS, NOTIFICATIONS
from delivery.store.webhooks import (
    ClaimedDelivery,
    NewNotification,
    WebhookStore,
    _sqlite_claim,
)
from handlers.retry import MAX_ATTEMPTS, SCHEDULE
from handlers.webhooks.signing import verify
from tests.handlers.webhooks.stub import Reply
from tests.webhooks.conftest import Rig
from tests.webhooks.helpers import EVENT, add_notifications, notification_row, webhook_settings


async def _notification(rig: Rig, nid: str) -> dict[str, object]:
    async with rig.engine.connect() as conn:
        row = (
            (await conn.execute(select(NOTIFICATIONS).where(NOTIFICATIONS.c.id == nid)))
            .mappings()
            .one()
        )
    return dict(row)


async def test_retries_until_delivered_and_consumes(rig: Rig) -> None:
    """500, then 503 with Retry-After, then 200: retried on schedule, same event id, consumed."""
    receiver, url = rig.receiver(
        Reply(500, b"boom"), Reply(503, headers=(("Retry-After", "900"),)), Reply(200)
    )
    secret = await rig.register(url, auth_header="Bearer tenant-token")
    worker = rig.worker()
    (created,) = await rig.notify(1)
    assert await worker.enqueue([created]) == 1
    assert await worker.enqueue([created]) == 0  # a redelivered message queues nothing

    first = await worker.sweep()
    assert (first.claimed, first.retried) == (1, 1)
    assert (await worker.sweep()).claimed == 0  # not due before the 5 s step
    rig.clock.advance(SCHEDULE[1])
    second = await worker.sweep()
    assert second.retried == 1
    rig.clock.advance(SCHEDULE[2])  # the schedule says 5 min ...
    assert (await worker.sweep()).claimed == 0  # ... but Retry-After asked for 15
    rig.clock.advance(timedelta(minutes=10))
    third = await worker.sweep()
    assert third.delivered == 1

    assert len(receiver.requests) == 3
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert ids == {created.notification_id}
    last = receiver.requests[-1]
    assert last.headers["authorization"] == "Bearer tenant-token"
    verify(last.body, last.headers, [secret], now=rig.clock.now())

    note = await _notification(rig, created.notification_id)
    assert note["status"] == "consumed"
    assert note["consumed_at"] == rig.clock.now()
    (delivery,) = await rig.webhooks.deliveries()
    assert (delivery["status"], delivery["attempt_count"]) == ("delivered", 3)

    attempts = await rig.attempts()
    assert [(a["attempt_number"], a["status"], a["response_code"]) for a in attempts] == [
        (3, "success", 200),
        (2, "failed", 503),
        (1, "failed", 500),
    ]
    assert attempts[2]["response_body"] == "boom"
    assert attempts[2]["error_message"] == "HTTP 500"
    assert created.notification_id in attempts[0]["request_body"]
    assert set(attempts[0]) <= {
        "attempt_id",
        "attempt_number",
        "event_type",
        "project_id",
        "webhook_url",
        "status",
        "response_code",
        "duration_ms",
        "created_at",
        "error_message",
        "request_body",
        "response_body",
    }


async def test_the_sqlite_enqueue_leaves_the_rows_of_the_general_path(rig: Rig) -> None:
    """
    Enqueued in one call to SQLite's driver thread or through SQLAlchemy (the form on
    PostgreSQL), the same notifications leave the same delivery rows: one per
    notification with an active endpoint, none for a disabled endpoint or a project
    without one, repeats counted out.
    """
    _, url = rig.receiver(Reply(200))
    await rig.register(url)
    await rig.register(url, event_type="on_trigger_event")
    e = ENDPOINTS.c
    async with rig.engine.begin() as conn:
        await conn.execute(
            update(ENDPOINTS).where(e.event_type == "on_trigger_event").values(is_active=False)
        )
    general = WebhookStore(rig.engine)
    general.capabilities = dataclasses.replace(general.capabilities, driver_thread=False)
    for store, first in ((rig.webhooks, 1), (general, 11)):
        queued = await rig.notify(first, first + 1)
        disabled = await rig.notify(first + 2, event_type="on_trigger_event")
        unregistered = await rig.notify(first + 3, project="beta")
        wanted = [
            NewNotification(n.notification_id, n.project_id, n.event_type)
            for n in (*queued, *disabled, *unregistered)
        ]
        assert await store.enqueue(wanted, now=rig.clock.now()) == 2
        assert await store.enqueue(wanted, now=rig.clock.now()) == 0

    d = DELIVERIES.c
    async with rig.engine.connect() as conn:
        rows = [r._asdict() for r in await conn.execute(select(DELIVERIES).order_by(d.event_id))]
    assert sorted(int(r["event_id"].rsplit("_", 1)[1]) for r in rows) == [1, 2, 11, 12]
    for row in rows:
        for key in ("id", "notification_id", "event_id"):
            row.pop(key)
    assert rows[0] == rows[1] == rows[2] == rows[3]
    assert (rows[0]["status"], rows[0]["round_start"], rows[0]["force_send"]) == (
        "pending",
        0,
        False,
    )


async def test_timeout_then_410_disables_the_endpoint(rig: Rig) -> None:
    """A timeout is retried; 410 Gone dead-letters the delivery and disables the endpoint."""
    receiver, url = rig.receiver(Reply(200, delay_s=2.0), Reply(410))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])

    assert (await worker.sweep()).retried == 1
    rig.clock.advance(SCHEDULE[1])
    assert (await worker.sweep()).dead == 1

    attempts = await rig.attempts()
    assert [(a["attempt_number"], a["response_code"]) for a in attempts] == [(2, 410), (1, 0)]
    assert attempts[1]["error_message"].startswith("timeout")
    listed = (await rig.api.get("/api/v1/webhooks")).json()["webhooks"]
    assert listed[0]["is_active"] is False
    (delivery,) = await rig.webhooks.deliveries()
    assert delivery["status"] == "dead"
    assert (await _notification(rig, created.notification_id))["status"] == "pending"

    # Disabled: new notifications are not queued, until the URL is registered again.
    (later,) = await rig.notify(2)
    assert await worker.enqueue([later]) == 0
    await rig.register(url)
    assert (await rig.api.get("/api/v1/webhooks")).json()["webhooks"][0]["is_active"] is True
    assert await worker.enqueue([later]) == 1
    assert len(receiver.requests) == 2


async def test_dead_letter_after_the_last_attempt(rig: Rig) -> None:
    """A receiver that always fails gets exactly MAX_ATTEMPTS attempts, then a dead letter."""
    receiver, url = rig.receiver(Reply(500))
    await rig.register(url)
    worker = rig.worker()
    (created,) = await rig.notify(1)
    await worker.enqueue([created])
    for _ in range(MAX_ATTEMPTS + 2):
        await worker.sweep()
        rig.clock.advance(timedelta(hours=11))
    assert len(receiver.requests) == MAX_ATTEMPTS
    (delivery,) = await rig.webhooks.deliveries()
    assert (delivery["status"], delivery["attempt_count"]) == ("dead", MAX_ATTEMPTS)
    assert f"after {MAX_ATTEMPTS} attempts" in delivery["last_error"]
    attempts = await rig.attempts()
    assert [a["attempt_number"] for a in attempts] == list(range(MAX_ATTEMPTS, 0, -1))


async def test_a_message_consumed_by_polling_is_not_sent(rig: Rig) -> None:
    """Consumed first by polling -> the delivery is skipped, nothing sent."""
    receiver, url = rig.receiver(Reply(200))
    await rig.register(url)
    worker = rig.worker()
    first, second = await rig.notify(1, 2)
    await worker.enqueue([first, second])
    consumed = await rig.api.post(
        f"/api/v1/agents/agent-1/notifications/{first.notification_id}/consume"
    )
    assert consumed.status_code == 200
    result = await worker.sweep()
    assert (result.skipped, result.delivered) == (1, 1)
    assert [r.headers["webhook-id"] for r in receiver.requests] == [second.notification_id]
    statuses = {d["notification_id"]: d["status"] for d in await rig.webhooks.deliveries()}
    assert statuses == {first.notification_id: "skipped", second.notification_id: "delivered"}
    assert len(await rig.attempts()) == 1


async def test_rotation_signs_with_both_secrets_for_a_day(rig: Rig) -> None:
    """After a rotation both secrets verify a delivery; after 24 h only the new one."""
    receiver, url = rig.receiver(Reply(200))
    old = await rig.register(url)
    rotated = await rig.api.post(f"/api/v1/webhooks/{EVENT}/rotate-secret")
    new = rotated.json()["signing_secret"]
    worker = rig.worker()
    first, second = await rig.notify(1, 2)
    await worker.enqueue([first])
    await worker.sweep()
    rig.clock.advance(timedelta(hours=24, seconds=1))
    await worker.enqueue([second])
    await worker.sweep()
    during, after = receiver.requests
    for secret in (old, new):
        verify(during.body, during.headers, [secret], now=rig.clock.now() - timedelta(hours=24))
        Webhook(secret).verify(during.body, during.headers)
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    verify(after.body, after.headers, [new], now=rig.clock.now())


def verify_webhook_signature(raw_body: str, signature_header: str, secret: str) -> bool:
    """The Sonzai docs' TypeScript ``verifyWebhookSignature``, ported line by line."""
    # Strip whsec_ prefix if present
    key = secret[6:] if secret.startswith("whsec_") else secret
    # Parse header: t={timestamp},v1={sig}  (Object.fromEntries: the last key wins;
    # JS destructuring of p.split("=") keeps the first two parts)
    parts = {kv[0]: (kv[1] if len(kv) > 1 else None) for kv in
             (p.split("=") for p in signature_header.split(","))}  # fmt: skip
    timestamp = parts.get("t")
    received_sig = parts.get("v1")
    if not timestamp or not received_sig:
        return False
    expected_sig = hmac.new(
        key.encode(), f"{timestamp}.{raw_body}".encode(), hashlib.sha256
    ).hexdigest()
    # crypto.timingSafeEqual throws on a length mismatch (an Express 500).
    if len(received_sig.encode()) != len(expected_sig.encode()):
        raise ValueError("Input buffers must have the same byte length")
    return hmac.compare_digest(received_sig.encode(), expected_sig.encode())


@dataclass
class DocsReceiver:
    """The docs' Express handler: 401 unless ``verify_webhook_signature`` passes."""

    secret: str = ""
    answers: list[int] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        sig = headers.get("sonzai-signature", "")
        try:
            status = 200 if verify_webhook_signature(body.decode(), sig, self.secret) else 401
        except ValueError:
            status = 500
        self.answers.append(status)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok" if status == 200 else b"no"})


async def test_rotation_keeps_the_docs_verifier_working_for_either_secret(rig: Rig) -> None:
    """
    After a rotation, a receiver running the docs' sample verifier (which keeps only
    the last ``v1``) verifies every first attempt once it holds the new secret; one
    still holding the old secret refuses the first attempt and verifies the retry 5 s
    later. After the 24 h overlap only the new secret signs.
    """
    updated, lagging = DocsReceiver(), DocsReceiver()
    other_event = "on_recurring_event_due"
    await rig.register(rig.serve(updated) + "/hook")
    lagging.secret = await rig.register(rig.serve(lagging) + "/hook", event_type=other_event)
    rotated = await rig.api.post(f"/api/v1/webhooks/{EVENT}/rotate-secret")
    updated.secret = rotated.json()["signing_secret"]
    assert (await rig.api.post(f"/api/v1/webhooks/{other_event}/rotate-secret")).is_success
    worker = rig.worker()
    assert await worker.enqueue(await rig.notify(1)) == 1
    assert (await worker.sweep()).delivered == 1
    assert updated.answers == [200]
    (late,) = await rig.notify(2, event_type=other_event)
    await worker.enqueue([late])
    assert (await worker.sweep()).retried == 1
    rig.clock.advance(SCHEDULE[1])
    assert (await worker.sweep()).delivered == 1
    assert lagging.answers == [401, 200]

    rig.clock.advance(timedelta(hours=24))
    (after,) = await rig.notify(3)
    await worker.enqueue([after])
    assert (await worker.sweep()).delivered == 1
    assert updated.answers == [200, 200]


async def test_consumer_and_loop_deliver_from_jetstream(
    rig: Rig, nats_url: str, subject_prefix: str
) -> None:
    """
    The running worker consumes notification.created from its durable consumer and
    delivers; a slow endpoint does not hold up another project's fast one.
    """
    slow, slow_url = rig.receiver(Reply(200, delay_s=1.5))
    fast, fast_url = rig.receiver(Reply(200))
    await rig.register(slow_url)
    await rig.register(fast_url, project="beta")
    settings = webhook_settings(subject_prefix=subject_prefix, webhook_timeout_s=5.0)
    order: list[str] = []
    both = asyncio.Event()

    def finished(claimed: ClaimedDelivery, outcome: str) -> None:
        order.append(f"{claimed.project_id}:{outcome}")
        if len(order) == 2:
            both.set()

    worker = rig.worker(settings=settings, nats_url=nats_url, on_finished=finished)
    (slow_note,) = await rig.notify(1)
    row = notification_row(rig.projects["beta"], 1, rig.clock.now())
    row["id"] = "msg_beta_1"
    await add_notifications(rig.engine, [row])
    fast_note = slow_note.model_copy(
        update={"notification_id": "msg_beta_1", "project_id": rig.projects["beta"]}
    )
    await worker.start()

    subjects = Subjects(subject_prefix)
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_stream(js, subjects)
        for note in (slow_note, fast_note):
            await js.publish(
                subjects.notification_created,
                note.model_dump_json().encode(),
                headers={"Nats-Msg-Id": note.notification_id},
            )
        await asyncio.wait_for(both.wait(), timeout=15)
    finally:
        await nc.jetstream().delete_stream(subjects.stream)
        await nc.close()
    # The fast endpoint was served while the slow one was still answering.
    assert order == [f"{rig.projects['beta']}:delivered", f"{rig.projects['alpha']}:delivered"]
    assert len(slow.requests) == len(fast.requests) == 1
    assert (await _notification(rig, "msg_beta_1"))["status"] == "consumed"
    assert (await _notification(rig, slow_note.notification_id))["status"] == "consumed"


async def test_claims_are_capped_per_endpoint(rig: Rig) -> None:
    """A backlog for one endpoint leaves claim room for another's deliveries."""
    _, url = rig.receiver(Reply(200))
    await rig.register(url)
    await rig.register(url, project="beta")
    alpha_notes = await rig.notify(1, 2, 3, 4, 5)
    beta_notes = await rig.notify(1, 2, project="beta", at=rig.clock.now())
    worker = rig.worker()
    assert await worker.enqueue([*alpha_notes, *beta_notes]) == 7
    claimed = await rig.claim(4, per_endpoint=2, in_flight={})
    by_project = sorted(c.project_id for c in claimed)
    assert by_project == sorted([rig.projects["alpha"]] * 2 + [rig.projects["beta"]] * 2)
    # An endpoint already at its cap gets nothing more; the others' rows still come.
    alpha_endpoint = next(c.endpoint_id for c in claimed if c.project_id == rig.projects["alpha"])
    more = await rig.claim(4, per_endpoint=2, in_flight={alpha_endpoint: 2})
    assert more == []


async def test_the_sqlite_claim_counts_on_a_copy_of_the_load_it_is_given(rig: Rig) -> None:
    """
    SQLite's claim function adds what it takes to each endpoint's load as it goes, on
    its own copy: the map it was given is the same afterwards. (PostgreSQL's claim
    reads the map in its statement; the same call leaves it alone too.)
    """
    _, url = rig.receiver(Reply(200))
    await rig.register(url)
    worker = rig.worker()
    assert await worker.enqueue(await rig.notify(1, 2, 3)) == 3
    (endpoint,) = await rig.webhooks.list_endpoints(rig.projects["alpha"])
    load = {endpoint["id"]: 1}
    if rig.engine.dialect.name == "sqlite":
        now = rig.clock.now()
        claim = partial(
            _sqlite_claim,
            now=now,
            lease_end=now + timedelta(minutes=1),
            worker_id="w1",
            full=[],
            limit=3,
            window=12,
            per_endpoint=3,
            in_flight=load,
        )
        rows, _notes = await direct.write(rig.engine, claim)
    else:
        rows = await rig.claim(3, per_endpoint=3, in_flight=load)
    assert len(rows) == 2  # room for 2 beside the one in flight
    assert load == {endpoint["id"]: 1}


async def test_a_capped_endpoints_backlog_does_not_hide_others(rig: Rig) -> None:
    """
    An endpoint at its cap whose backlog is due first, and is longer than the rows a
    claim looks at, still leaves another endpoint's later delivery claimable.
    """
    await rig.backlogs(10, 1)
    first = await rig.claim(1)
    alpha_endpoint = first[0].endpoint_id
    assert first[0].project_id == rig.projects["alpha"]
    # limit 1 looks at 4 rows; alpha has 9 more due before beta's one.
    claimed = await rig.claim(1, per_endpoint=1, in_flight={alpha_endpoint: 1})
    assert [c.project_id for c in claimed] == [rig.projects["beta"]]
