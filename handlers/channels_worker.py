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
   A retry (or fallback step) due inside the user's quiet hours is moved to their
   end instead (:func:`delivery.policy.quiet_wait`): the row stays the queue entry.
   Whether a project has quiet hours at all is read once per project per
   ``DELIVERY_TEMPLATE_CACHE_S`` (:class:`~delivery.dispatcher.policies.Policies`, as
   the dispatcher does); a user's own hours are read per retry only in such a project.

Only ``pending`` notifications are sent: one already consumed through polling (the
user has read it) gets no push, no email and no SMS, and its retries stop.

With ``DELIVERY_CHANNEL_FALLBACK_AFTER_S`` set, a user with destinations on two
channels or more gets the message on one channel at a time (:mod:`handlers.fallback`):
the fan-out sends on the first and records, with its attempts, the message's
``channel_fallbacks`` row; the retry loop claims due rows, retries the current
channel or moves to the next, and records each decision on the row.
:meth:`ChannelsWorker.fan_out` and :meth:`ChannelsWorker.sweep` are the bounded modes
that tests and the benchmark drive directly.
"""

import asyncio
import json
import random
import secrets as token_source
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

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
from delivery.dispatcher.policies import Policies
from delivery.policy import past_deadline, quiet_wait
from delivery.secrets import LazySecretBox, SecretBox
from delivery.settings import Settings
from delivery.store.advance import Pair, SqlAdvanceStore
from delivery.store.channels import (
    AttemptRecord,
    ChannelStore,
    ContactMapping,
    FallbackStep,
    OpenedChannel,
)
from delivery.store.policy import PolicyStore
from delivery.tracing import Carrier, request_id_of
from handlers.base import Channel, Message
from handlers.contacts import Contact, ContactKind, redact
from handlers.fallback import (
    Decision,
    FallbackStatus,
    NextStep,
    after_sends,
    fallback_order,
    next_step,
)
from handlers.fanout import (
    AttemptStatus,
    ChannelAttempt,
    ChannelRouter,
    FanoutJob,
    channels_from_settings,
    plan_fanout,
    provider_http_client,
    summarize,
)
from handlers.notification_channels import (
    ChannelSend,
    ChannelTarget,
    filter_matches,
    send_event,
    subscribed,
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
    note: Mapping[Any, Any],
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
        # The dispatcher's cache of project rules: most projects have no quiet hours,
        # and then a retry costs no read for them (a new one is seen within the TTL,
        # as when the dispatcher decides).
        self._policies = Policies(PolicyStore(engine), ttl_s=settings.template_cache_s)
        self._clocks = SqlAdvanceStore(engine)
        self.lease = lease
        self._rand = rand
        self._on_result = on_result
        self._carriers: dict[str, Carrier] = {}
        """Notification id -> the request id and trace its message carried (bounded)."""
        self._client: httpx.AsyncClient | None = None
        self._router = ChannelRouter(channels, send_timeout=SEND_TIMEOUT) if channels else None
        self._fallback_after = (
            timedelta(seconds=settings.channel_fallback_after_s)
            if settings.channel_fallback_after_s > 0
            else None
        )
        self._token = f"chw_{token_source.token_hex(6)}"
        """This worker's claim on fallback rows."""

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
        """Close the pooled SMTP connections and the providers' HTTP client."""
        if self._router is not None:
            await self._router.aclose()
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

        pending = [nid for nid, status in inputs.statuses.items() if status == "pending"]
        # The store loads full rows only for pending notifications with a contact left
        # to try; the other pending ones are counted, as before, with nothing to send.
        notes = [inputs.notifications[nid] for nid in pending if nid in inputs.notifications]
        # Past its deadline a message is never sent, even before the sweep marks it.
        stale = [n["id"] for n in notes if expired(n, now)]
        if stale:
            log.info("channels.expired_not_sent", notifications=len(stale))
            notes = [n for n in notes if n["id"] not in set(stale)]
        total = FanoutResult(notifications=len(pending) - len(notes))
        if not notes:
            log.debug("channels.no_contacts", notifications=len(pending))
        # Each notification's sends are planned here, then every send of the batch runs
        # at once (``fan_out_many``: one deadline, no task per notification); one traced
        # by its message keeps its own span around its sends.
        planned: list[_Planned] = []
        traced: list[_Planned] = []
        tracing_on = tracing.enabled()
        for note in notes:
            key = (note["project_id"], note["agent_id"], note["user_id"])
            done = inputs.attempted.get(note["id"], set())
            rows = [r for r in inputs.contacts.get(key, []) if r["id"] not in done]
            if note["id"] in inputs.fallbacks:
                # Its first channel is recorded; the fallback row carries it on, and
                # the destinations not yet attempted are the later channels'.
                rows = []
            if not rows:
                total.notifications += 1
                continue
            prefs = inputs.preferences.get(key)
            order = self._order(note, rows, prefs, router)
            if len(order) > 1:
                # One channel now: the later channels' destinations wait for the fallback.
                later = set(order[1:])
                rows = [r for r in rows if ContactKind(r["kind"]) not in later or r["opted_out"]]
            found = self._carriers.pop(note["id"], None) if self._carriers else None
            plan = _Planned(note, rows, prefs, order, found)
            (traced if found is not None and tracing_on else planned).append(plan)
        if traced:
            batched, alone = await asyncio.gather(
                router.fan_out_many([p.job() for p in planned]),
                asyncio.gather(*(self._traced_fan_out(router, p) for p in traced)),
            )
            attempt_lists: list[list[ChannelAttempt]] = [*batched, *alone]
            planned.extend(traced)
        elif planned:
            attempt_lists = await router.fan_out_many([p.job() for p in planned])
        else:
            attempt_lists = []
        records: list[AttemptRecord] = []
        disable: list[tuple[str, str]] = []
        fallbacks: list[dict[str, Any]] = []
        for plan, attempts in zip(planned, attempt_lists, strict=True):
            note = plan.note
            ids = {(r["kind"], r["destination"]): r["id"] for r in plan.rows}
            recs, dis, result = plan_records(
                note, attempts, ids, attempt_number=1, now=now, rand=self._rand
            )
            result.notifications = 1
            if len(plan.order) > 1:
                recs, fallback = self._first_channel(note, plan.order, recs, now)
                fallbacks.append(fallback)
            records.extend(recs)
            disable.extend(dis)
            total.add(result)
            log.debug(
                "channels.fanned_out",
                notification_id=note["id"],
                user_id=note["user_id"],
                **request_id_of(plan.found),
                **summarize(attempts),
            )
        channel_records, channel_result = await self._to_project_channels(inputs.channelled, now)
        records.extend(channel_records)
        total.add(channel_result)
        # One transaction for the batch's contact and channel attempts and its fallback
        # rows, before the ack.
        await self._record(records, disable, now, fallbacks=fallbacks)
        if total.retries_scheduled or fallbacks:
            self._loop.wake()
        if self._on_result is not None:
            self._on_result(total)
        return total

    async def _traced_fan_out(
        self, router: ChannelRouter, plan: "_Planned"
    ) -> list[ChannelAttempt]:
        """One notification's sends inside the span of the trace its message carried."""
        with tracing.span(
            "channels fan-out",
            plan.found,
            kind=SpanKind.CLIENT,
            attributes={"messaging.message.id": plan.note["id"]},
        ):
            [attempts] = await router.fan_out_many([plan.job()])
            return attempts

    def _order(
        self,
        note: Mapping[Any, Any],
        rows: Sequence[ContactMapping],
        prefs: Mapping[str, Sequence[str]] | None,
        router: ChannelRouter,
    ) -> list[ContactKind]:
        """The fallback order for ``note`` (empty when fallback is off)."""
        if self._fallback_after is None:
            return []
        planned = plan_fanout(
            note["check_type"], [contact_of(r) for r in rows], prefs, router.kinds
        )
        sendable = [p.contact for p in planned if p.skip is None]
        return fallback_order(note["check_type"], prefs, sendable)

    def _first_channel(
        self,
        note: Mapping[Any, Any],
        order: Sequence[ContactKind],
        records: Sequence[AttemptRecord],
        now: datetime,
    ) -> tuple[list[AttemptRecord], dict[str, Any]]:
        """
        The first channel's attempts without their retry times, and the message's
        fallback row (recorded with them, in one transaction): the row, not the
        attempts, holds any retry, so one claim at a time decides for the message.
        """
        assert self._fallback_after is not None  # noqa: S101 - only called with fallback on
        first = order[0]
        outcome = after_sends(
            first,
            sent=any(r.status == AttemptStatus.SENT.value for r in records),
            retry_at=[r.next_attempt_at for r in records if r.next_attempt_at is not None],
            deadline=now + self._fallback_after,
            attempt_number=1,
            now=now,
        )
        kinds = [k.value for k in order]
        decisions = [
            Decision(now, first.value, "first", f"channels in order: {', '.join(kinds)}"),
            outcome.decision,
        ]
        row = {
            "notification_id": note["id"],
            "project_id": note["project_id"],
            "agent_id": note["agent_id"],
            "user_id": note["user_id"],
            "order_json": json.dumps(kinds),
            "step": 0,
            "attempt_number": outcome.retry_number,
            "step_deadline": outcome.step_deadline,
            "next_attempt_at": outcome.next_attempt_at,
            "claim": None,
            "sending": False,
            "status": outcome.status.value,
            "decisions_json": json.dumps([d.as_json() for d in decisions]),
            "created_at": now,
            "updated_at": now,
        }
        return [replace(r, next_attempt_at=None) for r in records], row

    async def _record(
        self,
        records: Sequence[AttemptRecord],
        disable: Sequence[tuple[str, str]],
        now: datetime,
        *,
        retried_id: str | None = None,
        fallbacks: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        await self.store.record_attempts(records, retried_id=retried_id, fallbacks=fallbacks)
        _count_sends(records)
        await self._disable(disable, now)

    async def _disable(self, disable: Sequence[tuple[str, str]], now: datetime) -> None:
        for contact_id, reason in disable:
            if await self.store.disable_contact(contact_id, reason, now):
                log.info("channels.destination_disabled", contact_id=contact_id, reason=reason)

    # --- project channels ---------------------------------------------------------

    async def _to_project_channels(
        self, notification_ids: Sequence[str], now: datetime
    ) -> tuple[list[AttemptRecord], FanoutResult]:
        """
        Send each pending notification once to every active project channel subscribed
        to its event type whose filter matches, skipping channels a previous delivery
        of the same message already attempted; the attempts to record.
        """
        if not notification_ids:
            return [], FanoutResult()
        notes, channels, attempted = await self.store.channel_inputs(notification_ids)
        sends: list[tuple[RowMapping, OpenedChannel]] = []
        for note in notes.values():
            if expired(note, now):
                # Past its deadline a message is never sent, even before the sweep.
                continue
            event = json.loads(note["payload_json"] or "{}")
            done = attempted.get(note["id"], set())
            sends.extend(
                (note, channel)
                for channel in channels.get(note["project_id"], [])
                if channel.id not in done
                and subscribed(channel.events, note["event_type"])
                and filter_matches(channel.filter, event)
            )
        if not sends:
            return [], FanoutResult()
        results = await asyncio.gather(
            *(self._send_to_channel(note, channel, 1, now) for note, channel in sends)
        )
        records = [record for record, _ in results]
        total = FanoutResult()
        for _, result in results:
            total.add(result)
        log.debug("channels.project_channels", sends=len(sends), sent=total.sent)
        return records, total

    async def _send_to_channel(
        self, note: RowMapping, channel: OpenedChannel, number: int, now: datetime
    ) -> tuple[AttemptRecord, FanoutResult]:
        """One send of a notification's event to one project channel, as an attempt."""
        event = json.loads(note["payload_json"] or "{}")
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        [send] = await send_event(
            note["project_id"],
            note["event_type"],
            event,
            [ChannelTarget(channel.id, channel.type, channel.config)],
            event_id=event_id or note["id"],
            settings=self.settings,
            clock=self.clock,
            now=note["created_at"],
        )
        return channel_attempt(note, channel.id, send, number, now=now, rand=self._rand)

    # --- retries ------------------------------------------------------------------

    async def sweep(self) -> FanoutResult:
        """
        Bounded mode: make the next attempt of every retry due at ``clock.now()``,
        and the next step of every channel fallback due then.
        """
        router = self._ensure_router()
        claimed = await self.store.claim_due_retries(
            self.clock.now(), lease=self.lease, limit=self.batch
        )
        due = await self.store.claim_due_fallbacks(
            self.clock.now(), lease=self.lease, limit=self.batch, token=self._token
        )
        results = await asyncio.gather(
            *(self._retry(router, row) for row in claimed),
            *(self._fallback(router, row) for row in due),
        )
        total = FanoutResult()
        for result in results:
            total.add(result)
        if (claimed or due) and self._on_result is not None:
            self._on_result(total)
        return total

    async def _fallback(self, router: ChannelRouter, row: RowMapping) -> FanoutResult:
        """One claimed fallback row: decide, write the step, send, record. Never raises."""
        nid = row["notification_id"]
        bound = log.bind(notification_id=nid, step=row["step"])
        try:
            return await self._fallback_step(router, row, bound)
        except Exception:
            # A process edge: the claim's lease makes the row due again.
            bound.exception("channels.fallback_failed", lease_s=self.lease.total_seconds())
            return FanoutResult()

    async def _fallback_step(
        self, router: ChannelRouter, row: RowMapping, bound: Any
    ) -> FanoutResult:
        delay = self._fallback_after or timedelta(0)
        nid = row["notification_id"]
        order: list[str] = json.loads(row["order_json"])
        decisions: list[dict[str, str]] = json.loads(row["decisions_json"])
        now = self.clock.now()
        note, sent_already = await self.store.fallback_facts(nid)
        # Past its deadline a message is no longer pending, swept or not: the
        # fallback stops rather than send it on the next channel.
        pending = note is not None and note["status"] == "pending" and not expired(note, now)
        if row["sending"] and pending and not sent_already:
            # The last worker wrote this step and stopped before recording its
            # result: the send may have happened, so only this channel may go again.
            step = NextStep(
                row["step"],
                row["attempt_number"],
                FallbackStatus.ACTIVE,
                Decision(now, order[row["step"]], "resumed", "a send was cut short; again"),
                row["step_deadline"],
            )
        else:
            step = next_step(
                order,
                step=row["step"],
                attempt_number=row["attempt_number"],
                step_deadline=row["step_deadline"],
                pending=pending,
                sent_already=sent_already,
                delay=delay,
                now=now,
            )
        if step.status is FallbackStatus.ACTIVE and note is not None:
            until = await self._quiet_until(note, now)
            if until is not None:
                # Inside the user's quiet hours: the row waits as it is (the step is
                # decided again then), and holds that wait, so a crash loses nothing.
                kind = order[row["step"]]
                reason = f"inside the user's quiet hours; waiting until {until.isoformat()}"
                decisions.append(Decision(now, kind, "quiet_hours", reason).as_json())
                postponed = FallbackStep(
                    FallbackStatus.ACTIVE.value,
                    row["step"],
                    row["attempt_number"],
                    row["step_deadline"],
                    until,
                    json.dumps(decisions),
                )
                await self.store.postpone_fallback_step(
                    nid, self._token, postponed, sending=bool(row["sending"]), now=now
                )
                bound.info("channels.fallback_quiet_hours", until=until.isoformat())
                return FanoutResult()
        decisions.append(step.decision.as_json())
        if step.status is not FallbackStatus.ACTIVE or note is None:
            await self.store.finish_fallback_step(
                nid,
                self._token,
                [],
                FallbackStep(
                    step.status.value,
                    step.step,
                    step.attempt_number,
                    step.step_deadline,
                    None,
                    json.dumps(decisions),
                ),
                now=now,
            )
            bound.info("channels.fallback_finished", status=step.status.value)
            return FanoutResult()
        started = await self.store.begin_fallback_step(
            nid,
            self._token,
            FallbackStep(
                FallbackStatus.ACTIVE.value,
                step.step,
                step.attempt_number,
                step.step_deadline,
                row["next_attempt_at"],
                json.dumps(decisions),
            ),
            now=now,
        )
        if not started:
            bound.warning("channels.fallback_claim_lost")
            return FanoutResult()
        kind = ContactKind(order[step.step])
        owner = (note["project_id"], note["agent_id"], note["user_id"])
        contacts = [
            c
            for c in await self.store.list_contacts(*owner)
            if c["kind"] == kind.value and not c["disabled"]
        ]
        prefs = await self.store.get_preferences(*owner)
        attempts = (
            await router.fan_out(
                Message.of_notification(note), [contact_of(c) for c in contacts], prefs
            )
            if contacts
            else []
        )
        done_at = self.clock.now()
        records, disable, result = plan_records(
            note,
            attempts,
            {(c["kind"], c["destination"]): c["id"] for c in contacts},
            attempt_number=step.attempt_number,
            now=done_at,
            rand=self._rand,
        )
        outcome = after_sends(
            kind,
            sent=any(r.status == AttemptStatus.SENT.value for r in records),
            retry_at=[r.next_attempt_at for r in records if r.next_attempt_at is not None],
            deadline=step.step_deadline,
            attempt_number=step.attempt_number,
            now=done_at,
        )
        decisions.append(outcome.decision.as_json())
        records = [replace(r, next_attempt_at=None) for r in records]
        await self.store.finish_fallback_step(
            nid,
            self._token,
            records,
            FallbackStep(
                outcome.status.value,
                step.step,
                outcome.retry_number,
                outcome.step_deadline,
                outcome.next_attempt_at,
                json.dumps(decisions),
            ),
            now=done_at,
        )
        _count_sends(records)
        await self._disable(disable, done_at)
        bound.info(
            "channels.fallback_step",
            kind=kind.value,
            decision=outcome.decision.decision,
            **summarize(attempts),
        )
        return result

    async def _retry(self, router: ChannelRouter, row: RowMapping) -> FanoutResult:
        """One claimed retry: attempt it (or record why not) and settle the claim."""
        bound = log.bind(
            notification_id=row["notification_id"],
            contact_id=row["contact_id"],
            attempt_number=row["attempt_number"] + 1,
        )
        try:
            if row["channel_id"] is not None:
                return await self._retry_channel(row)
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
            until = await self._quiet_until(note, now)
            if until is not None:
                # Inside the user's quiet hours: the retry waits for their end (the
                # row stays the durable queue entry; nothing was attempted).
                await self.store.postpone_retry(row["id"], until)
                bound.info("channels.retry_quiet_hours", until=until.isoformat())
                return FanoutResult()
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

    async def _retry_channel(self, row: RowMapping) -> FanoutResult:
        """A due retry of a project channel attempt: send again, or record why not."""
        note = await self.store.get_notification(row["notification_id"])
        channel = await self.store.get_opened_channel(row["channel_id"])
        now = self.clock.now()
        number = row["attempt_number"] + 1
        reason = _why_not_channel(note, channel, now)
        if reason is not None or note is None or channel is None:
            skipped = AttemptRecord(
                project_id=row["project_id"],
                notification_id=row["notification_id"],
                agent_id=row["agent_id"],
                user_id=row["user_id"],
                kind=row["kind"],
                contact_id=None,
                destination=row["destination"],
                status=AttemptStatus.SKIPPED.value,
                reason=reason or "gone",
                response_code=0,
                duration_ms=0,
                attempt_number=number,
                next_attempt_at=None,
                created_at=now,
                channel_id=row["channel_id"],
            )
            await self._record([skipped], [], now, retried_id=row["id"])
            log.info("channels.retry_dropped", channel_id=row["channel_id"], reason=reason)
            return FanoutResult(skipped=1)
        record, result = await self._send_to_channel(note, channel, number, now)
        await self._record([record], [], now, retried_id=row["id"])
        log.info(
            "channels.retried",
            channel_id=channel.id,
            notification_id=note["id"],
            status=record.status,
        )
        return result

    async def _quiet_until(self, note: RowMapping, now: datetime) -> datetime | None:
        """
        Until when a send to ``note``'s user waits for their quiet hours (``None``: not),
        in real time. The hours are judged on the (agent, user) pair's clock, as the
        dispatcher judges them when it defers: an advanced pair is ``offset`` ahead,
        and the deadline (stored in real time) moves onto that clock with it. A project
        where nobody has quiet hours (known per project, cached) costs no read.
        """
        project_id = note["project_id"]
        if not (await self._policies.rules((project_id,)))[project_id].quiet_hours:
            return None
        user = (project_id, note["user_id"])
        hours = (await self._policies.quiet_hours((user,))).get(user)
        if hours is None:
            return None
        pair = Pair(note["project_id"], note["agent_id"], note["user_id"])
        offset = timedelta(seconds=await self._clocks.clock_offset(pair) or 0.0)
        deadline = note.get("expires_at")
        until = quiet_wait(hours, now + offset, None if deadline is None else deadline + offset)
        return None if until is None else until - offset

    async def claim_step(self) -> bool:
        result = await self.sweep()
        # A full batch: there may be more due right now.
        return result.sent + result.failed + result.skipped >= self.batch


@dataclass(slots=True)
class _Planned:
    """One notification of a fan-out batch: the contacts to try now, its fallback order."""

    note: Mapping[Any, Any]
    rows: list[ContactMapping]
    prefs: Mapping[str, Sequence[str]] | None
    order: list[ContactKind]
    found: Carrier | None

    def job(self) -> FanoutJob:
        return (Message.of_notification(self.note), [contact_of(r) for r in self.rows], self.prefs)


def _count_sends(records: Sequence[AttemptRecord]) -> None:
    if records:
        sends = Counter((r.kind, r.status) for r in records)
        for (provider, outcome), n in sends.items():
            metrics.CHANNEL_SENDS.labels(provider, outcome).inc(n)


def _notification_id(data: bytes) -> str:
    return NotificationCreated.model_validate_json(data).notification_id


def expired(note: Mapping[Any, Any], now: datetime) -> bool:
    """Whether ``note``'s deadline (``expires_at``) has passed at ``now``."""
    return past_deadline(note.get("expires_at"), now)


def channel_attempt(
    note: Mapping[Any, Any],
    channel_id: str,
    send: ChannelSend,
    number: int,
    *,
    now: datetime,
    rand: Rand,
) -> tuple[AttemptRecord, FanoutResult]:
    """
    The attempt record of one send to a project channel (pure): a transient failure
    with attempts left gets ``next_attempt_at`` (:func:`handlers.retry.plan_next`),
    so the retry loop sends it again.
    """
    status = send.result["status"]
    result = FanoutResult()
    next_at: datetime | None = None
    if status == "sent":
        result.sent = 1
    elif status == "skipped":
        result.skipped = 1
    else:
        result.failed = 1
        if send.outcome is not None:
            step = plan_next(send.outcome, number, now=now, rand=rand)
            if isinstance(step, RetryAt):
                next_at = step.at
                result.retries_scheduled = 1
    code = getattr(send.outcome, "status_code", 0) if send.outcome is not None else 0
    record = AttemptRecord(
        project_id=note["project_id"],
        notification_id=note["id"],
        agent_id=note["agent_id"],
        user_id=note["user_id"],
        kind=send.result["type"],
        contact_id=None,
        destination=send.destination,
        status=status,
        reason=str(send.result.get("error", "")),
        response_code=int(code or 0),
        duration_ms=send.duration_ms,
        attempt_number=number,
        next_attempt_at=next_at,
        created_at=now,
        channel_id=channel_id,
    )
    return record, result


def _why_not_channel(
    note: RowMapping | None, channel: OpenedChannel | None, now: datetime
) -> str | None:
    """Why a due project channel retry is dropped instead of attempted (pure), or ``None``."""
    if note is None:
        return "notification_gone"
    if note["status"] != "pending":
        return "notification_not_pending"
    if expired(note, now):
        return "notification_expired"
    if channel is None:
        return "channel_removed"
    if not subscribed(channel.events, note["event_type"]):
        return "channel_unsubscribed"
    return None


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
