"""
The push / email / SMS worker: JetStream in, one fan-out
per notification through :class:`handlers.fanout.ChannelRouter`, every attempt
recorded, transient failures retried from a durable queue in the database.

Two halves, both restartable at any instant:

1. **Fan-out.** A durable JetStream pull consumer (``channels``, shared by every
   handlers replica) reads ``<prefix>.notification.created``. For each batch it reads
   the notifications, their users' active contacts and preferences in at most five
   queries (:meth:`ChannelStore.fanout_inputs`; one when no user in the batch has a
   contact, the common case in a burst), fans out concurrently, records one attempt
   per (channel, destination) in one transaction, disables destinations a provider
   declared dead, and only then acks. A redelivered message skips the contacts that
   already have an attempt, so a destination is not sent to twice.
2. **Retries.** A transient failure's attempt row carries ``next_attempt_at``
   (:func:`handlers.retry.plan_next`: backoff with jitter, ``Retry-After`` honoured).
   A loop claims due rows under a lease (``SKIP LOCKED`` on PostgreSQL), makes the
   next attempt, and records it while clearing the claimed row, in one transaction.

Only ``pending`` notifications are sent: one already consumed through polling (the
user has read it) gets no push, no email and no SMS, and its retries stop.
:meth:`ChannelsWorker.fan_out` and :meth:`ChannelsWorker.sweep` are the bounded modes
that tests and the benchmark drive directly.
"""

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
import structlog
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from opentelemetry.trace import SpanKind
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery import metrics, tracing
from delivery.bus.consumers import settle_batch
from delivery.bus.messages import NotificationCreated
from delivery.clock import Clock
from delivery.secrets import LazySecretBox, SecretBox
from delivery.settings import Settings
from delivery.store.channels import AttemptRecord, ChannelStore, ContactMapping
from delivery.tracing import Carrier, request_id_of
from handlers.base import Channel, Message
from handlers.contacts import Contact, ContactKind, redact
from handlers.fanout import (
    AttemptStatus,
    ChannelAttempt,
    ChannelRouter,
    channels_from_settings,
    provider_http_client,
    summarize,
)
from handlers.queue import QueueWorker
from handlers.retry import DeadLetter, Rand, RetryAt, plan_next

log = structlog.get_logger(__name__)

DURABLE = "channels"
"""The JetStream durable consumer every handlers replica shares."""
SEND_TIMEOUT = timedelta(seconds=60)
"""Bound on one provider call (``ChannelRouter``'s per-send timeout)."""
ACK_WAIT_S = 3 * SEND_TIMEOUT.total_seconds()
"""A batch's sends run concurrently, so one batch takes about one send timeout."""
NAK_DELAY_S = 5.0
"""Back-off before JetStream redelivers a batch that could not be read or recorded."""
BATCH = 64
"""Notifications pulled (and fanned out concurrently) at once."""
BATCH_WAIT_S = 0.1
"""How long a pull waits to fill a batch: the latency floor of a lone message."""
LEASE = SEND_TIMEOUT + timedelta(seconds=60)
"""A claimed retry outlives its send by this much before another worker may retake it."""
MAX_CARRIERS = 10_000
"""Request ids / trace contexts kept for notifications not yet fanned out."""


@dataclass(slots=True)
class FanoutResult:
    """What one :meth:`ChannelsWorker.fan_out` or :meth:`ChannelsWorker.sweep` did."""

    notifications: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    retries_scheduled: int = 0
    disabled: int = 0

    def add(self, other: "FanoutResult") -> None:
        """Accumulate ``other`` into this result."""
        self.notifications += other.notifications
        self.sent += other.sent
        self.failed += other.failed
        self.skipped += other.skipped
        self.retries_scheduled += other.retries_scheduled
        self.disabled += other.disabled


def contact_of(row: ContactMapping) -> Contact:
    """The fan-out's view of a contact row."""
    return Contact(ContactKind(row["kind"]), row["destination"], bool(row["opted_out"]))


def plan_records(
    note: RowMapping,
    attempts: Sequence[ChannelAttempt],
    contact_ids: Mapping[tuple[str, str], str],
    *,
    attempt_number: int,
    now: datetime,
    rand: Rand,
) -> tuple[list[AttemptRecord], list[tuple[str, str]], FanoutResult]:
    """
    Turn fan-out attempts into rows to record (pure).

    Returns:
        The attempt records (a transient failure with attempts left gets
        ``next_attempt_at``), the ``(contact_id, reason)`` pairs to disable, and counts.
    """
    records: list[AttemptRecord] = []
    disable: list[tuple[str, str]] = []
    result = FanoutResult()
    for attempt in attempts:
        contact_id = contact_ids.get((attempt.kind.value, attempt.destination))
        next_at: datetime | None = None
        if attempt.status is AttemptStatus.SENT:
            result.sent += 1
        elif attempt.status is AttemptStatus.SKIPPED:
            result.skipped += 1
        else:
            result.failed += 1
            assert attempt.outcome is not None  # noqa: S101 - failed attempts carry one
            step = plan_next(attempt.outcome, attempt_number, now=now, rand=rand)
            if isinstance(step, RetryAt):
                next_at = step.at
                result.retries_scheduled += 1
            elif isinstance(step, DeadLetter) and step.disable_destination and contact_id:
                disable.append((contact_id, attempt.reason))
        status_code = getattr(attempt.outcome, "status_code", 0) if attempt.outcome else 0
        records.append(
            AttemptRecord(
                project_id=note["project_id"],
                notification_id=note["id"],
                agent_id=note["agent_id"],
                user_id=note["user_id"],
                kind=attempt.kind.value,
                contact_id=contact_id,
                destination=redact(attempt.kind, attempt.destination),
                status=attempt.status.value,
                reason=attempt.reason,
                response_code=int(status_code or 0),
                duration_ms=round(attempt.duration.total_seconds() * 1000),
                attempt_number=attempt_number,
                next_attempt_at=next_at,
                created_at=now,
            )
        )
    result.disabled = len(disable)
    return records, disable, result


class ChannelsWorker(QueueWorker):
    """
    Fans ``notification.created`` out to users' contacts and retries what failed.

    Args:
        settings: subject prefix, ``fcm_*``, ``smtp_*``, ``sms_*`` and
            ``tick_interval_s`` are read.
        engine: the store's engine (schema migrated); not disposed of here.
        clock: "now" for attempts and retry times.
        nats_url: the JetStream server; ``None`` runs the retry loop only (tests then
            call :meth:`fan_out`).
        channels: the channel per kind; built from ``settings`` on :meth:`start` when
            omitted (with an httpx client this worker owns and closes).
        batch: pull size, and retries claimed per sweep.
        poll_interval: the retry loop's sleep; ``settings.tick_interval_s`` by default.
        lease: how long a claimed retry is held.
        rand: jitter source for :func:`handlers.retry.plan_next`.
        on_result: called after each recorded batch or sweep (metrics, and tests
            waiting on an event instead of sleeping).
        secrets: opens contact destinations; by default the deployment's box from
            ``settings``, built when a batch first has a contact to open.
    """

    name = "channels"
    durable = DURABLE
    ack_wait_s = ACK_WAIT_S
    pull_wait_s = BATCH_WAIT_S
    graceful_timeout_s = ACK_WAIT_S
    # NEW: when the consumer is first created (a deployment that adds this worker) it
    # must not push the stream's whole week of history to people's phones. Once it
    # exists, the durable consumer resumes where it stopped.
    deliver_policy = DeliverPolicy.NEW

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        clock: Clock,
        nats_url: str | None = None,
        channels: Mapping[ContactKind, Channel] | None = None,
        batch: int = BATCH,
        poll_interval: timedelta | None = None,
        lease: timedelta = LEASE,
        rand: Rand = random.random,
        on_result: Callable[[FanoutResult], None] | None = None,
        secrets: SecretBox | LazySecretBox | None = None,
    ) -> None:
        super().__init__(
            settings,
            clock=clock,
            nats_url=nats_url,
            batch=batch,
            poll_interval=poll_interval,
            log=log,
        )
        self.store = ChannelStore(engine, secrets=secrets or LazySecretBox(settings))
        self.lease = lease
        self._rand = rand
        self._on_result = on_result
        self._carriers: dict[str, Carrier] = {}
        """Notification id -> the request id and trace its message carried (bounded)."""
        self._client: httpx.AsyncClient | None = None
        self._router = ChannelRouter(channels, send_timeout=SEND_TIMEOUT) if channels else None

    @classmethod
    def from_settings(
        cls, settings: Settings, engine: AsyncEngine, *, nats_url: str | None, clock: Clock
    ) -> "ChannelsWorker":
        """The worker as the handlers process runs it (``handlers.runner``)."""
        return cls(settings, engine, clock=clock, nats_url=nats_url)

    # --- lifecycle ----------------------------------------------------------------

    def _ensure_router(self) -> ChannelRouter:
        if self._router is None:
            self._client = provider_http_client(timeout=SEND_TIMEOUT)
            channels = channels_from_settings(self.settings, client=self._client, clock=self.clock)
            self._router = ChannelRouter(channels, send_timeout=SEND_TIMEOUT)
        return self._router

    async def before_start(self) -> None:
        """
        Build the channels, so a half-configured provider fails at start-up.

        Raises:
            ValueError: a provider is partly configured (``channels_from_settings``).
        """
        self._ensure_router()

    async def after_stop(self) -> None:
        """Close the providers' HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._router = None

    # --- fan-out ------------------------------------------------------------------

    async def handle_batch(self, raws: Sequence[Msg]) -> FanoutResult:
        """Decode, fan out, record, ack (the subscriber; errors stop here: a process edge)."""
        return await settle_batch(
            raws,
            decode=_notification_id,
            process=self.fan_out,
            failed=FanoutResult,
            ident=str,
            log=log,
            event="channels",
            nak_delay_s=NAK_DELAY_S,
            on_carrier=self._keep_carrier,
        )

    def _keep_carrier(self, notification_id: str, found: Carrier) -> None:
        # Used by the first fan-out, in memory only: a retry logs without it.
        if len(self._carriers) >= MAX_CARRIERS:
            del self._carriers[next(iter(self._carriers))]
        self._carriers[notification_id] = found

    async def fan_out(self, notification_ids: Sequence[str]) -> FanoutResult:
        """
        Bounded mode: fan each named notification out to its user's contacts and record
        every attempt (one transaction for the batch). Unknown and non-pending
        notifications are passed over.
        """
        router = self._ensure_router()
        inputs = await self.store.fanout_inputs(list(dict.fromkeys(notification_ids)))
        now = self.clock.now()

        async def one(
            note: RowMapping,
        ) -> tuple[list[AttemptRecord], list[tuple[str, str]], FanoutResult]:
            key = (note["project_id"], note["agent_id"], note["user_id"])
            done = inputs.attempted.get(note["id"], set())
            rows = [r for r in inputs.contacts.get(key, []) if r["id"] not in done]
            if not rows:
                return [], [], FanoutResult(notifications=1)
            found = self._carriers.pop(note["id"], None) if self._carriers else None
            with (
                tracing.span(
                    "channels fan-out",
                    found,
                    kind=SpanKind.CLIENT,
                    attributes={"messaging.message.id": note["id"]},
                )
                if found is not None
                else contextlib.nullcontext()
            ):
                attempts = await router.fan_out(
                    Message.of_notification(note),
                    [contact_of(r) for r in rows],
                    inputs.preferences.get(key),
                )
            ids = {(r["kind"], r["destination"]): r["id"] for r in rows}
            records, disable, result = plan_records(
                note, attempts, ids, attempt_number=1, now=now, rand=self._rand
            )
            result.notifications = 1
            log.debug(
                "channels.fanned_out",
                notification_id=note["id"],
                user_id=note["user_id"],
                **request_id_of(found),
                **summarize(attempts),
            )
            return records, disable, result

        pending = [nid for nid, status in inputs.statuses.items() if status == "pending"]
        # The store loads full rows only for pending notifications with a contact left
        # to try; the other pending ones are counted, as before, with nothing to send.
        notes = [inputs.notifications[nid] for nid in pending if nid in inputs.notifications]
        # Past its deadline a message is never sent, even before the sweep marks it.
        stale = [n["id"] for n in notes if expired(n, now)]
        if stale:
            log.info("channels.expired_not_sent", notifications=len(stale))
            notes = [n for n in notes if n["id"] not in set(stale)]
        outcomes = await asyncio.gather(*(one(n) for n in notes))
        total = FanoutResult(notifications=len(pending) - len(notes))
        if not notes:
            log.debug("channels.no_contacts", notifications=len(pending))
        records: list[AttemptRecord] = []
        disable: list[tuple[str, str]] = []
        for recs, dis, res in outcomes:
            records.extend(recs)
            disable.extend(dis)
            total.add(res)
        await self._record(records, disable, now)
        if total.retries_scheduled:
            self._loop.wake()
        if self._on_result is not None:
            self._on_result(total)
        return total

    async def _record(
        self,
        records: Sequence[AttemptRecord],
        disable: Sequence[tuple[str, str]],
        now: datetime,
        *,
        retried_id: str | None = None,
    ) -> None:
        await self.store.record_attempts(records, retried_id=retried_id)
        if records:
            sends = Counter((r.kind, r.status) for r in records)
            for (provider, outcome), n in sends.items():
                metrics.CHANNEL_SENDS.labels(provider, outcome).inc(n)
        for contact_id, reason in disable:
            if await self.store.disable_contact(contact_id, reason, now):
                log.info("channels.destination_disabled", contact_id=contact_id, reason=reason)

    # --- retries ------------------------------------------------------------------

    async def sweep(self) -> FanoutResult:
        """Bounded mode: make the next attempt of every retry due at ``clock.now()``."""
        router = self._ensure_router()
        claimed = await self.store.claim_due_retries(
            self.clock.now(), lease=self.lease, limit=self.batch
        )
        results = await asyncio.gather(*(self._retry(router, row) for row in claimed))
        total = FanoutResult()
        for result in results:
            total.add(result)
        if claimed and self._on_result is not None:
            self._on_result(total)
        return total

    async def _retry(self, router: ChannelRouter, row: RowMapping) -> FanoutResult:
        """One claimed retry: attempt it (or record why not) and settle the claim."""
        bound = log.bind(
            notification_id=row["notification_id"],
            contact_id=row["contact_id"],
            attempt_number=row["attempt_number"] + 1,
        )
        try:
            note = await self.store.get_notification(row["notification_id"])
            contact = (
                await self.store.get_contact_by_id(row["contact_id"]) if row["contact_id"] else None
            )
            now = self.clock.now()
            number = row["attempt_number"] + 1
            reason = _why_not(note, contact, now)
            if reason is not None or note is None or contact is None:
                skipped = AttemptRecord(
                    project_id=row["project_id"],
                    notification_id=row["notification_id"],
                    agent_id=row["agent_id"],
                    user_id=row["user_id"],
                    kind=row["kind"],
                    contact_id=row["contact_id"],
                    destination=row["destination"],
                    status=AttemptStatus.SKIPPED.value,
                    reason=reason or "gone",
                    response_code=0,
                    duration_ms=0,
                    attempt_number=number,
                    next_attempt_at=None,
                    created_at=now,
                )
                await self._record([skipped], [], now, retried_id=row["id"])
                bound.info("channels.retry_dropped", reason=reason)
                return FanoutResult(skipped=1)
            prefs = await self.store.get_preferences(
                note["project_id"], note["agent_id"], note["user_id"]
            )
            attempts = await router.fan_out(
                Message.of_notification(note), [contact_of(contact)], prefs
            )
            records, disable, result = plan_records(
                note,
                attempts,
                {(contact["kind"], contact["destination"]): contact["id"]},
                attempt_number=number,
                now=now,
                rand=self._rand,
            )
            await self._record(records, disable, now, retried_id=row["id"])
            bound.info("channels.retried", **summarize(attempts))
            return result
        except Exception:
            # A process edge: the claim's lease makes the retry due again, so an
            # unexpected error (database blip) delays it instead of losing it.
            bound.exception("channels.retry_failed", lease_s=self.lease.total_seconds())
            return FanoutResult()

    async def claim_step(self) -> bool:
        result = await self.sweep()
        # A full batch: there may be more due right now.
        return result.sent + result.failed + result.skipped >= self.batch


def _notification_id(data: bytes) -> str:
    return NotificationCreated.model_validate_json(data).notification_id


def expired(note: RowMapping, now: datetime) -> bool:
    """Whether ``note``'s deadline (``expires_at``) has passed at ``now``."""
    deadline = note.get("expires_at")
    return deadline is not None and deadline <= now


def _why_not(note: RowMapping | None, contact: ContactMapping | None, now: datetime) -> str | None:
    """Why a due retry is dropped instead of attempted (pure), or ``None``."""
    if note is None:
        return "notification_gone"
    if note["status"] != "pending":
        return "notification_not_pending"
    if expired(note, now):
        return "notification_expired"
    if contact is None:
        return "contact_removed"
    if contact["disabled"]:
        return "contact_disabled"
    return None


def build_channels_worker(
    settings: Settings, engine: AsyncEngine, nats_url: str | None, clock: Clock
) -> ChannelsWorker:
    """The ``handlers.runner`` factory: the worker as the handlers process runs it."""
    return ChannelsWorker.from_settings(settings, engine, nats_url=nats_url, clock=clock)
