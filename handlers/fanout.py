"""
Fan one message out to a user's contacts: a pure plan (who is sent to, who is skipped
and why) and a thin async shell that runs the sends concurrently and times them.

No storage here: the caller (the handlers daemon, the receiver's forwarder) loads the
contacts and preferences, and persists the returned :class:`ChannelAttempt` records,
disables destinations whose outcome says so, and schedules retries via
``handlers.retry``.
"""

import asyncio
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Final

import httpx
import structlog

from delivery.clock import Clock
from delivery.settings import Settings
from handlers.base import Channel, Delivered, Failed, Message, Outcome, Retry
from handlers.contacts import Contact, ContactKind, channels_for, redact
from handlers.email import SmtpChannel
from handlers.fcm import FcmChannel
from handlers.provider_http import ProviderHttpClient
from handlers.sms import SmsChannel

log = structlog.get_logger(__name__)

#: Default bound on one send, so a hung provider cannot hold a fan-out for ever.
DEFAULT_SEND_TIMEOUT: Final = timedelta(seconds=60)

FanoutJob = tuple[Message, Iterable[Contact], Mapping[str, Iterable[ContactKind | str]] | None]
"""One message, its contacts and the user's preferences, for :meth:`ChannelRouter.fan_out_many`."""


class AttemptStatus(StrEnum):
    """Channel delivery status; the values are the wire values."""

    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"


class SkipReason(StrEnum):
    """Why a contact was not sent to; stored as the attempt's ``reason``."""

    OPTED_OUT = "opted_out"  # the contact's opt-out flag is set
    NOT_PREFERRED = "not_preferred"  # the user's preferences exclude this channel
    NO_CHANNEL = "channel_not_configured"  # the operator configured no such provider


@dataclass(frozen=True, slots=True)
class PlannedSend:
    """One step of a fan-out plan: send to ``contact`` unless ``skip`` says why not."""

    contact: Contact
    skip: SkipReason | None = None


@dataclass(frozen=True, slots=True)
class ChannelAttempt:
    """
    The record of one (channel, destination) attempt for one message.

    Attributes:
        kind: the channel.
        destination: the normalised destination.
        status: ``sent``, ``failed`` or ``skipped``.
        reason: the skip reason, the provider's failure reason, or ``""`` when sent.
        duration: wall time spent in the channel (zero when skipped).
        outcome: the channel's :data:`Outcome`, ``None`` when skipped. A ``Retry``
            means "schedule again" (``retry_after`` is the server's hint); a ``Failed``
            with ``disable_destination`` means the caller should disable the contact.
    """

    kind: ContactKind
    destination: str
    status: AttemptStatus
    reason: str
    duration: timedelta
    outcome: Outcome | None = None

    @property
    def retryable(self) -> bool:
        """True when the failure was transient and another attempt may succeed."""
        return isinstance(self.outcome, Retry)

    @property
    def retry_after(self) -> timedelta | None:
        """The provider's Retry-After, when it sent one."""
        return self.outcome.after if isinstance(self.outcome, Retry) else None

    @property
    def disable_destination(self) -> bool:
        """True when the provider says this destination will never work again."""
        return isinstance(self.outcome, Failed) and self.outcome.disable_destination


def plan_fanout(
    check_type: str,
    contacts: Iterable[Contact],
    preferences: Mapping[str, Iterable[ContactKind | str]] | None,
    available: Iterable[ContactKind],
) -> list[PlannedSend]:
    """
    Decide, per contact, whether to send (pure).

    Contacts are taken in order and de-duplicated on ``(kind, destination)``, so one
    message never reaches one destination twice. A contact is skipped when it opted out
    (checked first: that is the user's explicit word), when
    :func:`~handlers.contacts.channels_for` excludes its kind for ``check_type``, or
    when no channel of its kind is ``available``.
    """
    allowed = channels_for(check_type, preferences)
    configured = frozenset(available)
    seen: set[tuple[ContactKind, str]] = set()
    plan: list[PlannedSend] = []
    for contact in contacts:
        key = (contact.kind, contact.destination)
        if key in seen:
            continue
        seen.add(key)
        if contact.opted_out:
            plan.append(PlannedSend(contact, SkipReason.OPTED_OUT))
        elif contact.kind not in allowed:
            plan.append(PlannedSend(contact, SkipReason.NOT_PREFERRED))
        elif contact.kind not in configured:
            plan.append(PlannedSend(contact, SkipReason.NO_CHANNEL))
        else:
            plan.append(PlannedSend(contact))
    return plan


class ChannelRouter:
    """
    Sends one message to all of a user's active contacts, concurrently.

    Guarantees: every planned contact gets exactly one :class:`ChannelAttempt`, in the
    order of ``contacts``; a channel that is slow (past ``send_timeout``), returns a
    failure or even raises never delays or prevents the other sends; ``fan_out`` itself
    only raises on cancellation.

    Args:
        channels: the configured channel per kind; a kind without one is skipped with
            ``channel_not_configured``.
        send_timeout: bound on each send; a send that exceeds it is a ``Retry``. ``None``
            leaves timeouts to the channels' own clients.
        timer: monotonic seconds, for durations (tests may pass a fake).
    """

    def __init__(
        self,
        channels: Mapping[ContactKind, Channel],
        *,
        send_timeout: timedelta | None = DEFAULT_SEND_TIMEOUT,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._channels = dict(channels)
        self._timeout = send_timeout.total_seconds() if send_timeout is not None else None
        self._timer = timer

    @property
    def kinds(self) -> frozenset[ContactKind]:
        """The channel kinds configured (the others' contacts are skipped)."""
        return frozenset(self._channels)

    async def aclose(self) -> None:
        """Close what the channels keep open between sends (the SMTP pool)."""
        for channel in self._channels.values():
            if isinstance(channel, SmtpChannel):
                await channel.aclose()

    async def fan_out(
        self,
        message: Message,
        contacts: Iterable[Contact],
        preferences: Mapping[str, Iterable[ContactKind | str]] | None = None,
    ) -> list[ChannelAttempt]:
        """Send ``message`` per :func:`plan_fanout`; return one attempt per planned contact."""
        [attempts] = await self.fan_out_many([(message, contacts, preferences)])
        return attempts

    async def fan_out_many(self, jobs: Sequence[FanoutJob]) -> list[list[ChannelAttempt]]:
        """
        :meth:`fan_out` for several messages at once: every send of every job runs
        concurrently under one deadline; one list of attempts per job, in job order.

        A batch of 64 notifications used to cost a task and a ``gather`` per message
        and an ``asyncio.timeout`` per send (about 15% of the channels worker's CPU
        under py-spy in ``bench/bench_channels_worker.py``). The sends start together,
        so one ``asyncio.wait`` with the send timeout bounds each as its own timeout
        did; the sends still running then are cancelled, and their clean-up (a
        discarded SMTP connection) finishes before this returns, or before a
        cancellation of the caller goes on.
        """
        loop = asyncio.get_running_loop()
        started = self._timer()
        results: list[list[ChannelAttempt | None]] = []
        sends: list[
            tuple[asyncio.Task[tuple[Outcome, float]], list[ChannelAttempt | None], int]
        ] = []
        sending: list[tuple[Message, Contact]] = []
        for message, contacts, preferences in jobs:
            plan = plan_fanout(message.check_type, contacts, preferences, self._channels)
            row: list[ChannelAttempt | None] = []
            for step in plan:
                contact = step.contact
                if step.skip is not None:
                    row.append(
                        ChannelAttempt(
                            contact.kind,
                            contact.destination,
                            AttemptStatus.SKIPPED,
                            step.skip,
                            timedelta(0),
                        )
                    )
                    continue
                task = loop.create_task(self._send(self._channels[contact.kind], message, contact))
                sends.append((task, row, len(row)))
                sending.append((message, contact))
                row.append(None)
            results.append(row)
        if sends:
            tasks = [task for task, _, _ in sends]
            try:
                _, pending = await asyncio.wait(tasks, timeout=self._timeout)
            except BaseException:
                for task in tasks:
                    task.cancel()
                # As gather did: the sends' clean-up (a connection closed, a pool
                # slot given back) finishes before the cancellation goes on, so
                # none of it runs after the channel is closed.
                await asyncio.wait(tasks)
                raise
            if pending:
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
            for (task, row, at), (message, contact) in zip(sends, sending, strict=True):
                if task.cancelled():
                    outcome: Outcome = self._timed_out(message, contact)
                    duration = max(self._timer() - started, 0.0)
                else:
                    outcome, duration = task.result()
                row[at] = _attempt(contact, outcome, duration)
        return [[a for a in row if a is not None] for row in results]

    def _timed_out(self, message: Message, contact: Contact) -> Retry:
        log.warning(
            "fanout.send.timeout",
            event_id=message.event_id,
            kind=contact.kind.value,
            destination=redact(contact.kind, contact.destination),
            timeout_s=self._timeout,
        )
        return Retry(f"{contact.kind.value} send timed out after {self._timeout}s")

    async def _send(
        self, channel: Channel, message: Message, contact: Contact
    ) -> tuple[Outcome, float]:
        """One send and its wall time in seconds; never raises but for cancellation."""
        started = self._timer()
        try:
            outcome = await channel.send(message, contact.destination)
        except Exception as exc:
            # Channels promise not to raise; one that does has a bug. Isolating it here is
            # what keeps "one channel failing never blocks another" true. Retry, not
            # Failed: the message is not the problem and the retry budget bounds the cost.
            log.exception(
                "fanout.send.crashed",
                event_id=message.event_id,
                kind=contact.kind.value,
                destination=redact(contact.kind, contact.destination),
            )
            outcome = Retry(f"{contact.kind.value} channel error: {exc!r}")
        return outcome, max(self._timer() - started, 0.0)


def _attempt(contact: Contact, outcome: Outcome, duration_s: float) -> ChannelAttempt:
    duration = timedelta(seconds=duration_s)
    if isinstance(outcome, Delivered):
        return ChannelAttempt(
            contact.kind, contact.destination, AttemptStatus.SENT, "", duration, outcome
        )
    return ChannelAttempt(
        contact.kind, contact.destination, AttemptStatus.FAILED, outcome.reason, duration, outcome
    )


def summarize(attempts: Sequence[ChannelAttempt]) -> dict[str, int]:
    """Counts per status, for log lines and the benchmark (pure)."""
    counts = {status.value: 0 for status in AttemptStatus}
    for attempt in attempts:
        counts[attempt.status.value] += 1
    return counts


def provider_http_client(*, timeout: timedelta = timedelta(seconds=30)) -> httpx.AsyncClient:
    """
    The httpx client for the FCM and SMS channels (the caller closes it).

    aiohttp-backed (``httpx_aiohttp``), as the webhook sender is: httpx's own pool
    re-checks every idle connection on every request (encode/httpx#3215), which cost
    about 45% of fan-out throughput in ``bench/bench_channels.py``. Provider URLs are
    operator settings, not tenant input, so no SSRF guard is needed here; proxies from
    the environment are honoured, as egress to Google and Twilio may need them. Its
    :class:`~handlers.provider_http.ProviderHttpClient` also keeps the connections of
    the channels' plain HTTP/1.1 path (:class:`~handlers.provider_http.DirectPost`).
    """
    return ProviderHttpClient(
        timeout=timeout.total_seconds(),
        limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
    )


def channels_from_settings(
    settings: Settings,
    *,
    client: httpx.AsyncClient,
    clock: Clock,
    smtp_tls_context: ssl.SSLContext | None = None,
) -> dict[ContactKind, Channel]:
    """
    The channels the operator configured, for a :class:`ChannelRouter`.

    A provider with none of its settings is simply absent (its contacts are skipped as
    ``channel_not_configured``); one that is half-configured is a start-up error, so a
    typo never silently drops a channel. The reads of the FCM key file happen here,
    once, at start-up.

    Raises:
        ValueError: a provider is partly configured or its settings are invalid.
        OSError: the FCM service-account file cannot be read.
    """
    channels: dict[ContactKind, Channel] = {}
    if settings.fcm_service_account_file is not None:
        channels[ContactKind.FCM] = FcmChannel.from_settings(settings, client=client, clock=clock)
    if settings.smtp_host or settings.smtp_from:
        channels[ContactKind.EMAIL] = SmtpChannel.from_settings(
            settings, clock=clock, tls_context=smtp_tls_context
        )
    if settings.sms_account_sid or settings.sms_auth_token is not None or settings.sms_from:
        channels[ContactKind.SMS] = SmsChannel.from_settings(settings, client=client, clock=clock)
    log.info("channels.configured", kinds=sorted(kind.value for kind in channels))
    return channels
