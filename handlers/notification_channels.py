"""
Project notification channels (``/api/v1/channels``): which channels an event goes to
(:func:`subscribed`, :func:`filter_matches`, both pure) and sending it once to each
of them, by signed webhook or by email (:func:`deliver_event`).

The API reads the channels and opens their sealed configs; nothing here touches the
store. One channel failing never stops another.
"""

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import structlog

from delivery.cadence.instants import format_utc
from delivery.clock import Clock
from delivery.settings import Settings
from handlers.base import Delivered, Failed, Message, Outcome, Retry
from handlers.contacts import ContactKind, redact
from handlers.email import SmtpChannel, SmtpSecurity
from handlers.webhooks.sender import WebhookChannel, WebhookEndpoint

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ChannelTarget:
    """One channel to deliver to: its id, ``webhook`` or ``email``, and its opened config
    (None when its sealed secrets cannot be opened with this server's key)."""

    id: str
    type: str
    config: Mapping[str, Any] | None


def filter_matches(channel_filter: Mapping[str, Any] | None, payload: Mapping[str, Any]) -> bool:
    """
    The delivery predicate (pure): every known key must hold, unknown keys are ignored.

    ``agents`` / ``users`` / ``check_types``: ``payload.agent_id`` / ``user_id`` /
    ``check_type`` is in the list; ``min_score``: ``payload.score`` is a number at least
    that high (the SDK docs' example ``{"agents": [...], "min_score": 80}``).
    """
    if not channel_filter:
        return True
    for key, field in (("agents", "agent_id"), ("users", "user_id"), ("check_types", "check_type")):
        wanted = channel_filter.get(key)
        if isinstance(wanted, list) and wanted and payload.get(field) not in wanted:
            return False
    minimum = channel_filter.get("min_score")
    if isinstance(minimum, int | float) and not isinstance(minimum, bool):
        score = payload.get("score")
        if (
            not isinstance(score, int | float)
            or isinstance(score, bool)
            or not math.isfinite(score)
            or score < minimum
        ):
            return False
    return True


def subscribed(events: Sequence[str], event_type: str) -> bool:
    """An empty ``events`` list subscribes to everything."""
    return not events or event_type in events


def text_of(event_type: str, payload: Mapping[str, Any]) -> str:
    message = payload.get("generated_message") or payload.get("message")
    if isinstance(message, str) and message.strip():
        return message
    return f"{event_type}\n\n{json.dumps(payload, indent=2, ensure_ascii=False, default=str)}"


async def _deliver_one(
    row: ChannelTarget,
    config: Mapping[str, Any],
    message: Message,
    settings: Settings,
    clock: Clock,
    webhook: WebhookChannel,
) -> tuple[dict[str, Any], Outcome | None]:
    result: dict[str, Any] = {"channel_id": row.id, "type": row.type}
    if row.type == "webhook":
        secret = config.get("secret")
        if not isinstance(secret, str) or not secret:
            return {
                **result,
                "status": "failed",
                "error": "the channel has no signing secret",
            }, None
        auth = config.get("auth_header")
        endpoint = WebhookEndpoint(
            url=str(config.get("url", "")),
            secrets=(secret,),
            auth_header=auth if isinstance(auth, str) and auth else None,
        )
        delivery = await webhook.deliver(message, endpoint)
        outcome = delivery.outcome
    else:
        recipients = config.get("to") or []
        if not recipients:
            return {**result, "status": "skipped", "error": "config.to names no recipient"}, None
        if not settings.smtp_host:
            return {
                **result,
                "status": "failed",
                "error": "email is not configured on this server (DELIVERY_SMTP_HOST)",
            }, None
        try:
            security = SmtpSecurity(settings.smtp_security)
        except ValueError:
            _log.error("channels.smtp_misconfigured", smtp_security=settings.smtp_security)
            return {
                **result,
                "status": "failed",
                "error": "the server's SMTP settings are invalid",
            }, None
        channel = SmtpChannel(
            settings.smtp_host,
            settings.smtp_port,
            str(config.get("from") or settings.smtp_from),
            clock=clock,
            security=security,
            username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else "",
        )
        try:
            outcomes = await asyncio.gather(*(channel.send(message, to) for to in recipients))
        finally:
            await channel.aclose()
        failures = [o for o in outcomes if not isinstance(o, Delivered)]
        outcome = failures[0] if failures else outcomes[0]
    if isinstance(outcome, Delivered):
        return {**result, "status": "sent"}, outcome
    assert isinstance(outcome, Retry | Failed)  # noqa: S101 - Outcome is a closed union
    return {**result, "status": "failed", "error": outcome.reason}, outcome


@dataclass(frozen=True, slots=True)
class ChannelSend:
    """One target's send: the wire result, the provider's outcome (``None`` when nothing
    was sent), how long it took, and the redacted destination it went to."""

    result: dict[str, Any]
    outcome: Outcome | None
    duration_ms: int
    destination: str


def destination_of(target: ChannelTarget) -> str:
    """Where a channel sends, redacted for the attempt log: a webhook's scheme and host
    (a path or query may carry a token), an email channel's first recipient, masked."""
    config = target.config or {}
    if target.type == "webhook":
        parts = urlsplit(str(config.get("url", "")))
        return f"{parts.scheme}://{parts.hostname or ''}"
    recipients = config.get("to") or []
    first = recipients[0] if isinstance(recipients, list) and recipients else ""
    return redact(ContactKind.EMAIL, str(first)) if first else ""


async def deliver_event(
    project: str,
    event_type: str,
    payload: Mapping[str, Any],
    targets: Sequence[ChannelTarget],
    *,
    event_id: str,
    settings: Settings,
    clock: Clock,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """
    Send ``payload`` once to every target; one result per target, in target order
    (``status`` ``sent``, ``failed`` with an ``error``, or ``skipped``).
    """
    sends = await send_event(
        project,
        event_type,
        payload,
        targets,
        event_id=event_id,
        settings=settings,
        clock=clock,
        now=now,
    )
    return [s.result for s in sends]


async def send_event(
    project: str,
    event_type: str,
    payload: Mapping[str, Any],
    targets: Sequence[ChannelTarget],
    *,
    event_id: str,
    settings: Settings,
    clock: Clock,
    now: datetime | None = None,
) -> list[ChannelSend]:
    """:func:`deliver_event` with each send's outcome, duration and destination (to record)."""
    now = now or clock.now()
    envelope = {
        "event_id": event_id,
        "event_type": event_type,
        "created_at": format_utc(now),
        "project_id": project,
        "payload": dict(payload),
    }
    subject = payload.get("subject") or payload.get("title") or event_type
    message = Message(
        event_id=event_id,
        event_type=event_type,
        project_id=project,
        agent_id=str(payload.get("agent_id", "")),
        user_id=str(payload.get("user_id", "")),
        message_id=event_id,
        check_type=str(payload.get("check_type", event_type)),
        intent="",
        generated_message=text_of(event_type, payload),
        created_at=now,
        payload=envelope,
    )
    email_message = dataclasses.replace(message, payload={"subject": str(subject)})
    async with WebhookChannel.from_settings(settings, clock=clock) as webhook:

        async def one(target: ChannelTarget) -> ChannelSend:
            started = time.perf_counter()
            if target.config is None:
                result: dict[str, Any] = {
                    "channel_id": target.id,
                    "type": target.type,
                    "status": "failed",
                    "error": "the channel's secrets cannot be decrypted with this server's key",
                }
                outcome: Outcome | None = None
            else:
                chosen = message if target.type == "webhook" else email_message
                result, outcome = await _deliver_one(
                    target, target.config, chosen, settings, clock, webhook
                )
            took = round((time.perf_counter() - started) * 1000)
            return ChannelSend(result, outcome, took, destination_of(target))

        return list(await asyncio.gather(*(one(t) for t in targets)))
