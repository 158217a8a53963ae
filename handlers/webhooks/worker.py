"""
The webhook delivery worker: JetStream in, durable retry queue in
the database, signed POSTs out.

Two halves, both restartable at any instant:

1. **Enqueue.** A durable JetStream pull consumer (``webhooks``, shared by every
   handlers replica) reads ``<prefix>.notification.created`` and inserts one
   ``webhook_deliveries`` row per notification whose project has an active endpoint
   for its event type, then acks. A crash before the ack redelivers the message and
   the unique (notification, endpoint) absorbs it.
2. **Sweep.** A loop claims due deliveries (a lease; ``SKIP LOCKED`` on PostgreSQL),
   sends each with :class:`~handlers.webhooks.sender.WebhookChannel` as its own task
   (a slow endpoint never blocks the others), and records every attempt with the
   delivery's next state in one transaction, shared by group commit with the
   attempts that finished alongside it (:class:`AttemptRecorder`): a 2xx consumes
   the notification (as a polling consume would), a failure is rescheduled by
   :func:`handlers.retry.plan_next` (``Retry-After`` honoured), a 410 or a failing
   streak of
   ``DELIVERY_WEBHOOK_DISABLE_AFTER_S`` disables the endpoint (with a project
   notification), the last failure dead-letters. A notification consumed by
   polling first is ``skipped``, not sent.

:meth:`WebhookWorker.sweep` is the bounded mode: one claim-and-send pass at
the clock's "now", returning what it did, so tests drive retries with a ``ManualClock``.
"""

import asyncio
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import structlog
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery import metrics, tracing
from delivery.bus.consumers import settle_batch
from delivery.bus.messages import NotificationCreated
from delivery.clock import Clock
from delivery.policy import past_deadline
from delivery.secrets import SecretBox, SecretDecryptError
from delivery.settings import Settings
from delivery.store.webhooks import (
    DEAD,
    SKIPPED,
    AttemptRecord,
    ClaimedDelivery,
    EndpointDisabled,
    NewNotification,
    NextState,
    RecordedAttempt,
    WebhookStore,
)
from delivery.tracing import Carrier, request_id_of
from handlers.base import Message
from handlers.queue import QueueWorker
from handlers.retry import DeadLetter, Done, Rand, RetryAt, plan_next
from handlers.webhooks.sender import WebhookChannel, WebhookEndpoint
from handlers.webhooks.signing import active_secrets

log = structlog.get_logger(__name__)

DURABLE = "webhooks"
"""The JetStream durable consumer every handlers replica shares."""
ACK_WAIT_S = 60.0
"""Enqueueing a batch is one transaction; a minute is generous."""
NAK_DELAY_S = 5.0
"""Back-off before JetStream redelivers a batch whose enqueue failed (database down)."""
BATCH = 256
"""Pull size and claim size."""
BATCH_WAIT_S = 0.1
"""How long a pull waits to fill a batch: the latency floor of a lone message."""
LEASE_MARGIN = timedelta(seconds=60)
"""A claim outlives the send timeout by this much before another worker may retake it."""
STOP_GRACE = timedelta(seconds=10)
"""How long stopping waits for in-flight sends before cancelling them."""
MAX_CARRIERS = 10_000
"""Request ids / trace contexts kept for deliveries not yet attempted."""
MAX_OPENED = 4096
"""Opened secrets kept in memory (endpoints' signing secrets and auth headers)."""
RECORD_BATCH = 512
"""The most attempts recorded in one transaction."""
UNREADABLE_SECRET_DELAY = timedelta(minutes=5)
"""A secret that does not decrypt (wrong ``DELIVERY_SECRET_KEY``) waits for the operator."""


@dataclass(slots=True)
class SweepResult:
    """What one :meth:`WebhookWorker.sweep` did."""

    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead: int = 0
    skipped: int = 0
    errors: int = 0


class AttemptRecorder:
    """
    Group commit of attempts: every send waits for its attempt to be recorded, and
    the attempts that finish while one transaction runs go into the next together.

    One transaction per attempt (five statements and the SQLite writer lock each)
    capped the worker far below what the sender does; now the database work per
    attempt shrinks as the load grows, with no added wait for a lone attempt. A
    batch that fails (one bad row) is recorded again one attempt at a time, so only
    that attempt's sender sees the error (and its claim's lease retries it).

    Args:
        store: the webhook store.
        disable_after: the failing streak that disables an endpoint.
        limit: the most attempts in one transaction.
    """

    def __init__(
        self, store: WebhookStore, *, disable_after: timedelta | None, limit: int = RECORD_BATCH
    ) -> None:
        self._store = store
        self._disable_after = disable_after
        self._limit = limit
        self._waiting: list[tuple[RecordedAttempt, asyncio.Future[EndpointDisabled | None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, item: RecordedAttempt) -> EndpointDisabled | None:
        """Record ``item`` (with others); returns the disable it caused, or ``None``."""
        found: asyncio.Future[EndpointDisabled | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, found))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await found

    async def drain(self) -> None:
        """Wait until every attempt handed over so far is recorded (or has failed)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.wait([self._flusher])

    async def _flush(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._limit]
            del self._waiting[: self._limit]
            try:
                results = await self._store.record_attempts(
                    [item for item, _ in batch], disable_after=self._disable_after
                )
            except Exception:
                log.warning("webhook.record_batch_failed", size=len(batch), exc_info=True)
                await self._one_by_one(batch)
                continue
            for (_item, found), result in zip(batch, results, strict=True):
                if not found.done():  # its sender may have been cancelled at stop
                    found.set_result(result)

    async def _one_by_one(
        self, batch: list[tuple[RecordedAttempt, asyncio.Future[EndpointDisabled | None]]]
    ) -> None:
        for item, found in batch:
            try:
                (result,) = await self._store.record_attempts(
                    [item], disable_after=self._disable_after
                )
            except Exception as exc:
                if not found.done():
                    found.set_exception(exc)
                continue
            if not found.done():
                found.set_result(result)


def _message(claimed: ClaimedDelivery) -> Message:
    assert claimed.notification is not None  # noqa: S101 - callers check first
    # The delivery's own event id and type: one notification may go to several endpoints.
    return Message.of_notification(
        claimed.notification, event_id=claimed.event_id, event_type=claimed.event_type
    )


class WebhookWorker(QueueWorker):
    """
    Consumes ``notification.created``, keeps the delivery queue, sends and retries.

    Args:
        settings: subject prefix, ``webhook_*`` and the secret key are read.
        engine: the store's engine (schema migrated); not disposed of here.
        clock: "now" for claims, retries, signatures and attempt times.
        nats_url: the JetStream server; ``None`` runs the sweep loop only (enqueue
            then happens through :meth:`enqueue`, e.g. in tests).
        channel: the sender; built from ``settings`` when omitted (and then closed
            by :meth:`stop`).
        box: opens sealed secrets; built from ``settings`` on :meth:`start` (or first
            use) when omitted.
        lease: how long a claim lasts; default send timeout + 60 s.
        batch: pull size and claim size.
        poll_interval: the sweep loop's longest sleep when nothing woke it.
        rand: jitter source for :func:`handlers.retry.plan_next`.
        worker_id: the claim owner's name (random by default).
        on_finished: called after each claimed delivery is settled, with the
            :class:`ClaimedDelivery` and its outcome (``delivered``, ``retry``,
            ``dead``, ``skipped``): metrics, and tests waiting on an event.
    """

    name = "webhook"
    durable = DURABLE
    ack_wait_s = ACK_WAIT_S
    pull_wait_s = BATCH_WAIT_S
    graceful_timeout_s = 30.0

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        clock: Clock,
        nats_url: str | None = None,
        channel: WebhookChannel | None = None,
        box: SecretBox | None = None,
        lease: timedelta | None = None,
        batch: int = BATCH,
        poll_interval: timedelta | None = None,
        rand: Rand = random.random,
        worker_id: str | None = None,
        on_finished: Callable[[ClaimedDelivery, str], None] | None = None,
    ) -> None:
        self.worker_id = worker_id or f"whw_{secrets.token_hex(6)}"
        super().__init__(
            settings,
            clock=clock,
            nats_url=nats_url,
            batch=batch,
            poll_interval=poll_interval,
            log=log.bind(worker_id=self.worker_id),
        )
        self.store = WebhookStore(engine)
        self._own_channel = channel is None
        self._channel = channel
        self._box = box
        self.lease = lease or timedelta(seconds=settings.webhook_timeout_s) + LEASE_MARGIN
        self._rand = rand
        # The loop keeps up to twice the channel's global bound claimed, so the channel
        # always has work queued; per endpoint it claims no more than the channel sends
        # at once to one origin, so a slow receiver's backlog stays in the database.
        self._max_in_flight = 2 * settings.webhook_max_in_flight
        self._per_endpoint = settings.webhook_per_endpoint
        # An endpoint that keeps failing is disabled rather than retried for ever.
        self._disable_after = (
            timedelta(seconds=settings.webhook_disable_after_s)
            if settings.webhook_disable_after_s > 0
            else None
        )
        self._endpoint_load: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._on_finished = on_finished
        self._carriers: dict[str, Carrier] = {}
        """Notification id -> the request id and trace its message carried (bounded)."""
        self._opened: dict[str, str] = {}
        """Sealed secret -> its clear text (bounded by :data:`MAX_OPENED`)."""
        self._recorder = AttemptRecorder(self.store, disable_after=self._disable_after)
        self._counters: dict[tuple[str, int], Any] = {}
        """(outcome, response code) -> its child of ``WEBHOOK_DELIVERIES``."""

    @classmethod
    def from_settings(
        cls, settings: Settings, engine: AsyncEngine, *, nats_url: str | None, clock: Clock
    ) -> "WebhookWorker":
        """The worker as the handlers process runs it (``handlers.runner``)."""
        return cls(settings, engine, clock=clock, nats_url=nats_url)

    # --- lifecycle ----------------------------------------------------------------

    async def _ensure_parts(self) -> tuple[SecretBox, WebhookChannel]:
        if self._box is None:
            self._box = await asyncio.to_thread(SecretBox.from_settings, self.settings)
        if self._channel is None:
            self._channel = WebhookChannel.from_settings(self.settings, clock=self.clock)
        return self._box, self._channel

    async def before_start(self) -> None:
        """
        Release this deployment's stale claims (SQLite only: one handlers process, so
        any claim left is a killed process's).

        The secret box and the channel are built on the first delivery, so a process
        with no webhooks never creates ``data_dir/secret.key``.
        """
        if self.store.single_writer:
            released = await self.store.release_claims(now=self.clock.now())
            if released:
                self._log.info("webhook.claims_released", count=released)

    async def after_stop(self) -> None:
        """
        Give in-flight sends :data:`STOP_GRACE` to finish, then cancel the rest (their
        claims expire or are released at the next start), release this worker's
        claims and close the channel if it is ours.
        """
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=STOP_GRACE.total_seconds())
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        # Attempts already made are still recorded (a cancelled send's waiter is gone,
        # its record is not), so nothing sent goes unrecorded at a graceful stop.
        await self._recorder.drain()
        if not self.store.single_writer:
            await self.store.release_claims(now=self.clock.now(), worker_id=self.worker_id)
        if self._own_channel and self._channel is not None:
            await self._channel.aclose()
            self._channel = None

    # --- enqueue ------------------------------------------------------------------

    async def handle_batch(self, raws: Sequence[Msg]) -> int:
        """
        Decode, enqueue, ack (the subscriber; errors stop here: a process edge).

        Returns:
            How many deliveries were queued.
        """
        return await settle_batch(
            raws,
            decode=NotificationCreated.model_validate_json,
            process=self.enqueue,
            failed=int,
            ident=lambda created: created.notification_id,
            log=self._log,
            event="webhook",
            nak_delay_s=NAK_DELAY_S,
            on_carrier=self._keep_carrier,
        )

    def _keep_carrier(self, created: NotificationCreated, found: Carrier) -> None:
        # Kept in memory only: the delivery row does not store it, so an attempt
        # after a restart logs without the request id and starts its own trace.
        if len(self._carriers) >= MAX_CARRIERS:
            del self._carriers[next(iter(self._carriers))]
        self._carriers[created.notification_id] = found

    async def enqueue(self, items: Sequence[NewNotification | NotificationCreated]) -> int:
        """
        Queue a delivery, due now, for each notification with an active endpoint;
        repeats are no-ops. Wakes the sweep loop when something was queued.
        """
        wanted = [
            i
            if isinstance(i, NewNotification)
            else NewNotification(i.notification_id, i.project_id, i.event_type)
            for i in items
        ]
        queued = await self.store.enqueue(wanted, now=self.clock.now())
        if queued:
            self._log.debug("webhook.enqueued", count=queued, received=len(wanted))
            self.wake()
        return queued

    # --- sweep --------------------------------------------------------------------

    async def sweep(self, *, limit: int | None = None) -> SweepResult:
        """
        Bounded mode: claim what is due at ``clock.now()`` (up to ``limit``, default
        the batch size), make one attempt each concurrently, wait for all of them.
        """
        claimed = await self.store.claim_due(
            now=self.clock.now(),
            limit=limit or self.batch,
            lease=self.lease,
            worker_id=self.worker_id,
        )
        result = SweepResult(claimed=len(claimed))
        await asyncio.gather(*(self._process(c, result) for c in claimed))
        return result

    async def claim_step(self) -> bool:
        """Claim what fits in the free slots and start sending it; True on a full claim."""
        free = self._max_in_flight - len(self._tasks)
        if free <= 0:
            return False  # a finishing send wakes the loop (_task_done)
        limit = min(self.batch, free)
        claimed = await self.store.claim_due(
            now=self.clock.now(),
            limit=limit,
            lease=self.lease,
            worker_id=self.worker_id,
            per_endpoint=self._per_endpoint,
            in_flight=self._endpoint_load,
        )
        for c in claimed:
            self._endpoint_load[c.endpoint_id] = self._endpoint_load.get(c.endpoint_id, 0) + 1
            task = asyncio.create_task(self._process(c, SweepResult()))
            self._tasks.add(task)
            task.add_done_callback(partial(self._task_done, c.endpoint_id))
        # A full batch: there may be more due right now.
        return len(claimed) == limit

    def _task_done(self, endpoint_id: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        load = self._endpoint_load.get(endpoint_id, 0) - 1
        if load > 0:
            self._endpoint_load[endpoint_id] = load
        else:
            self._endpoint_load.pop(endpoint_id, None)
        # A freed slot (overall, or for a saturated endpoint) may let a claim proceed.
        if len(self._tasks) == self._max_in_flight - 1 or load == self._per_endpoint - 1:
            self._loop.wake()

    async def _process(self, claimed: ClaimedDelivery, result: SweepResult) -> None:
        """One claimed delivery: skip, or attempt and record. Never raises."""
        message_id = claimed.notification["id"] if claimed.notification is not None else None
        found = self._carriers.get(message_id) if message_id is not None else None
        # Every line of the attempt (the sender's too) names the message and the
        # request that caused it; each delivery runs in a task of its own.
        ids = structlog.contextvars.bind_contextvars(message_id=message_id, **request_id_of(found))
        try:
            if found is not None and tracing.enabled():
                with tracing.span(
                    "webhook attempt",
                    found,
                    kind=SpanKind.CLIENT,
                    attributes={
                        "messaging.message.id": message_id or "",
                        "delivery.attempt": claimed.attempt_number,
                    },
                ):
                    await self._attempt(claimed, result)
            else:
                await self._attempt(claimed, result)
        except Exception:
            # A process edge: the claim's lease makes the delivery due again, so an
            # unexpected error (database blip) delays it instead of losing it.
            result.errors += 1
            self._bound(claimed).exception(
                "webhook.process_failed", lease_s=self.lease.total_seconds()
            )
        finally:
            structlog.contextvars.reset_contextvars(**ids)

    async def _skip(
        self,
        claimed: ClaimedDelivery,
        reason: str,
        result: SweepResult,
        now: datetime,
    ) -> None:
        """Finish ``claimed`` without sending it, recording why."""
        await self.store.finish_without_attempt(
            claimed.delivery_id, status=SKIPPED, reason=reason, now=now
        )
        result.skipped += 1
        self._bound(claimed).info("webhook.skipped", reason=reason)
        metrics.WEBHOOK_DELIVERIES.labels("skipped", "none").inc()
        self._finished(claimed, "skipped")

    async def _attempt(self, claimed: ClaimedDelivery, result: SweepResult) -> None:
        box, channel = self._box, self._channel
        if box is None or channel is None:
            # Built once, at the first delivery; a coroutine call per delivery after
            # that was about 1% of the worker's CPU under py-spy.
            box, channel = await self._ensure_parts()
        now = self.clock.now()
        note = claimed.notification
        forced = claimed.force_send and note is not None and note["status"] == "consumed"
        if note is None or (note["status"] != "pending" and not forced):
            # A message consumed by polling first is not sent, unless an operator asked
            # for this re-send; an expired or missing one never is.
            status = "missing" if note is None else note["status"]
            await self._skip(claimed, f"notification is {status}; not sent", result, now)
            return
        deadline = note["expires_at"]
        if past_deadline(deadline, now):
            # Never sent after its deadline, retries included, even before the
            # expiry sweep marks it expired.
            reason = f"notification expired at {deadline.isoformat()}; not sent"
            await self._skip(claimed, reason, result, now)
            return
        if not claimed.endpoint_active or not claimed.url:
            reason = "endpoint disabled or deleted"
            await self.store.finish_without_attempt(
                claimed.delivery_id, status=DEAD, reason=reason, now=now
            )
            result.dead += 1
            self._bound(claimed).warning("webhook.dead", reason=reason)
            metrics.WEBHOOK_DELIVERIES.labels("dead", "none").inc()
            self._finished(claimed, "dead")
            return
        try:
            current = self._open(box, claimed.secret_enc)
            previous = (
                self._open(box, claimed.previous_secret_enc)
                if claimed.previous_secret_enc
                else None
            )
            auth = self._open(box, claimed.auth_header_enc) if claimed.auth_header_enc else None
        except SecretDecryptError:
            # Not the receiver's fault and not fixed by sending: wait for the operator
            # to restore DELIVERY_SECRET_KEY; the attempt count is untouched.
            await self.store.postpone(
                claimed.delivery_id, at=now + UNREADABLE_SECRET_DELAY, now=now
            )
            result.errors += 1
            self._bound(claimed).error(
                "webhook.secret_unreadable", retry_in_s=UNREADABLE_SECRET_DELAY.seconds
            )
            return
        endpoint = WebhookEndpoint(
            url=claimed.url,
            # Both secrets sign for 24 h after a rotation, so receivers can roll; the
            # order alternates per attempt for receivers that read only one signature.
            secrets=active_secrets(
                current,
                previous,
                claimed.rotated_at,
                now=now,
                attempt_number=claimed.attempt_number,
            ),
            auth_header=auth,
        )
        delivery = await channel.deliver(
            _message(claimed), endpoint, attempt_number=claimed.attempt_number
        )
        done_at = self.clock.now()
        # A re-send starts a fresh retry round; attempt numbers keep rising on the wire.
        step = plan_next(
            delivery.outcome,
            claimed.attempt_number - claimed.round_start,
            now=done_at,
            rand=self._rand,
        )
        match step:
            case Done():
                state = NextState(delivered=True)
                result.delivered += 1
            case RetryAt(at=at):
                state = NextState(retry_at=at, reason=delivery.attempt.error_message)
                result.retried += 1
            case DeadLetter(reason=reason, disable_destination=disable):
                state = NextState(
                    dead=True, reason=reason, disable_reason=reason if disable else None
                )
                result.dead += 1
        a = delivery.attempt
        record = AttemptRecord(
            attempt_id=a.attempt_id,
            attempt_number=a.attempt_number,
            event_id=a.event_id,
            webhook_url=a.webhook_url,
            status=a.status.value,
            response_code=a.response_code,
            duration_ms=a.duration_ms,
            created_at=a.created_at,
            request_body=a.request_body,
            response_body=a.response_body,
            error_message=a.error_message,
        )
        disabled = await self._recorder.record(RecordedAttempt(claimed, record, state, done_at))
        outcome = "retry" if state.retry_at is not None else "dead" if state.dead else "delivered"
        counter = self._counters.get((outcome, a.response_code))
        if counter is None:
            # One child per (outcome, status): labels() validates and looks the pair up
            # under a lock each time. Bounded: four outcomes by the statuses there are.
            counter = metrics.WEBHOOK_DELIVERIES.labels(
                outcome, metrics.status_class(a.response_code)
            )
            self._counters[(outcome, a.response_code)] = counter
        counter.inc()
        metrics.WEBHOOK_DURATION.observe(a.duration_ms / 1000)
        if disabled is not None:
            metrics.WEBHOOK_ENDPOINTS_DISABLED.inc()
            self._bound(claimed).warning(
                "webhook.endpoint_disabled",
                endpoint_id=disabled.endpoint_id,
                reason=disabled.reason,
                recover_since=disabled.recover_since.isoformat(),
                notification_id=disabled.notification_id,
            )
        if state.retry_at is not None:
            self._bound(claimed).info(
                "webhook.retry_scheduled", retry_at=state.retry_at.isoformat()
            )
        elif state.dead:
            self._bound(claimed).warning(
                "webhook.dead_lettered",
                reason=state.reason,
                endpoint_disabled=state.disable_reason is not None,
            )
        self._finished(claimed, outcome)

    def _open(self, box: SecretBox, sealed: str) -> str:
        """
        ``box.open(sealed)``, remembered: every delivery to an endpoint carries the
        same sealed text, and decrypting it each time was a visible share of the
        worker's CPU. A rotation seals anew (another text), so nothing goes stale.

        Raises:
            SecretDecryptError: the text does not open with this deployment's key.
        """
        opened = self._opened.get(sealed)
        if opened is None:
            opened = box.open(sealed)
            if len(self._opened) >= MAX_OPENED:
                self._opened.clear()
            self._opened[sealed] = opened
        return opened

    def _bound(self, claimed: ClaimedDelivery) -> Any:
        """
        The worker's logger bound to ``claimed``'s ids, made when a line is written:
        a delivered attempt writes none, and binding for each one was a visible share
        of the worker's CPU under py-spy in ``bench/bench_webhooks_e2e.py``.
        """
        return self._log.bind(
            delivery_id=claimed.delivery_id,
            event_id=claimed.event_id,
            event_type=claimed.event_type,
            project_id=claimed.project_id,
            attempt_number=claimed.attempt_number,
        )

    def _finished(self, claimed: ClaimedDelivery, outcome: str) -> None:
        if self._on_finished is not None:
            self._on_finished(claimed, outcome)
