"""
Push / email / SMS for a tenant who runs only the webhook receiver.

:class:`ChannelForwarder` is a :class:`~handlers.webhooks.receiver.Forwarder`: each
verified delivery becomes a :class:`~handlers.base.Message`, the user's destinations come
from a :class:`ContactDirectory` (:class:`FileContactDirectory` reads them from a JSON
file), and :class:`~handlers.fanout.ChannelRouter` sends through the same FCM, SMTP and
SMS channels the daemon uses. ``delivery receiver --contacts FILE`` wires it up.

No store here: transient failures are retried in-process for a few seconds, and what is
still failing after that is handed back to the sender's durable retry schedule by
raising (see :meth:`ChannelForwarder.forward`).
"""

import asyncio
import json
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Protocol, Self

import structlog

from delivery.errors import InvalidContactError
from handlers.base import Failed, Message
from handlers.contacts import (
    DEFAULT_PREFERENCE,
    Contact,
    ContactKind,
    redact,
    validate_contact,
    validate_preferences,
)
from handlers.fanout import AttemptStatus, ChannelAttempt, ChannelRouter, summarize
from handlers.retry import Rand, next_delay
from handlers.webhooks.receiver import VerifiedEvent

log = structlog.get_logger(__name__)

#: Sends per destination within one :meth:`ChannelForwarder.forward` call.
DEFAULT_MAX_ATTEMPTS: Final = 3
#: Cap on each in-process pause: ``handlers.retry`` asks for 5 s, then 5 min, but the
#: sender is waiting on the open request (15 s timeout by default).
DEFAULT_MAX_DELAY: Final = timedelta(seconds=2)
#: No new round of retries starts after this much time in one call, so the answer
#: reaches the sender before its own timeout and it does not retry a call in progress.
DEFAULT_BUDGET: Final = timedelta(seconds=8)
#: Events whose outcome is remembered across redeliveries (see ``forward``); only events
#: that ended with a raise are kept, so this bounds memory during a long outage.
DEFAULT_LEDGER_SIZE: Final = 10_000

type Sleep = Callable[[float], Awaitable[None]]
type Preferences = Mapping[str, Iterable[ContactKind | str]]
type _Key = tuple[ContactKind, str]


class ForwardingIncompleteError(RuntimeError):
    """
    Some destinations still failed transiently after the in-process retries.

    Raised by :meth:`ChannelForwarder.forward` so that the receiver answers 503 and the
    sender delivers the event again later.

    Attributes:
        event_id: the event.
        pending: the ``(kind, redacted destination)`` pairs still to be sent.
    """

    def __init__(self, event_id: str, pending: Sequence[tuple[str, str]]) -> None:
        self.event_id = event_id
        self.pending = tuple(pending)
        names = ", ".join(f"{kind} {where}" for kind, where in self.pending)
        super().__init__(f"event {event_id}: still failing transiently: {names}")


class ContactDirectory(Protocol):
    """Where a user's destinations and channel preferences come from."""

    async def contacts(self, agent_id: str, user_id: str) -> list[Contact]:
        """The user's destinations, normalised (opted-out ones included); ``[]`` if unknown."""
        ...

    async def preferences(self, agent_id: str, user_id: str) -> Preferences | None:
        """``{check_type or "*": [kind, ...]}`` for the user, or ``None`` (no restriction)."""
        ...


def _text(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    return value if isinstance(value, str) else ""


def message_from_event(event: VerifiedEvent) -> Message:
    """
    The channel message of a verified delivery (pure).

    Tolerant by design: a sender on an older or newer payload version must not make the
    receiver fail, so a missing or non-string field becomes ``""``, and a missing or
    unparseable ``created_at`` becomes the signed timestamp. ``event_id`` is the
    receiver's dedupe key, which the sender also puts in the body.
    """
    payload = event.payload
    created_at: datetime = event.signed_at
    raw_created = payload.get("created_at")
    if isinstance(raw_created, str):
        try:
            parsed = datetime.fromisoformat(raw_created)
        except ValueError:
            parsed = None
        # A naive time would break the channels' aware arithmetic; keep the signed one.
        if parsed is not None and parsed.tzinfo is not None:
            created_at = parsed
    return Message(
        event_id=event.event_id,
        event_type=event.event_type,
        project_id=_text(payload, "project_id"),
        agent_id=_text(payload, "agent_id"),
        user_id=_text(payload, "user_id"),
        message_id=_text(payload, "message_id"),
        check_type=_text(payload, "check_type"),
        intent=_text(payload, "intent"),
        generated_message=_text(payload, "generated_message"),
        created_at=created_at,
        payload=payload,
    )


class ChannelForwarder:
    """
    Forwards each verified event to the user's push / email / SMS destinations.

    Per event: look the user up in ``directory``; fan out with ``router`` (concurrently,
    so one channel failing or hanging never blocks another); resend only the
    destinations that failed transiently, up to ``max_attempts`` sends each, pausing
    per :func:`handlers.retry.next_delay` capped at ``max_delay`` and never starting a
    round after ``budget``. Permanent failures are logged and not retried. Every
    attempt is logged with the destination redacted.

    What the receiver answers:

    * everything sent, skipped (opted out, not preferred, no such channel) or failed
      permanently: ``forward`` returns, the receiver answers 200 and remembers the event;
    * anything still failing transiently, including the case where *every* channel
      did: ``forward`` raises :class:`ForwardingIncompleteError`, so the receiver answers
      503 and the sender redelivers the event on its durable schedule (5 s, 5 min, ...
      about 27.6 h in all). That schedule is far longer than anything a request can wait,
      so an outage of one provider does not lose the message for that channel.

    Raising makes the sender retry the *whole* event, so the forwarder remembers, per
    event, the destinations already settled (sent or permanently failed) and a
    redelivery sends only to the rest: a channel that succeeded is not sent to twice.
    That memory is per process and bounded by ``ledger_size`` (oldest events forgotten
    first); after a restart, or on another replica, a redelivery may repeat a send,
    which the at-least-once contract allows (emails keep one ``Message-ID`` per event,
    so mail clients fold such a repeat).

    Events without ``agent_id``, ``user_id`` or ``generated_message`` (a test ping, say)
    have nothing to send: they are logged and acknowledged.

    Args:
        router: the channels (``channels_from_settings``), with a send timeout.
        directory: the users' destinations and preferences.
        max_attempts: sends per destination per call (at least 1).
        max_delay: cap on each pause between rounds.
        budget: no round starts later than this after the call began.
        ledger_size: events remembered across redeliveries.
        sleep: how to pause (tests pass a fake, so they never wait).
        rand: jitter source for :func:`~handlers.retry.next_delay`.
        timer: monotonic seconds, for ``budget``.
    """

    def __init__(
        self,
        router: ChannelRouter,
        directory: ContactDirectory,
        *,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        max_delay: timedelta = DEFAULT_MAX_DELAY,
        budget: timedelta = DEFAULT_BUDGET,
        ledger_size: int = DEFAULT_LEDGER_SIZE,
        sleep: Sleep = asyncio.sleep,
        rand: Rand = random.random,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self._router = router
        self._directory = directory
        self._max_attempts = max_attempts
        self._max_delay = max_delay
        self._budget_s = budget.total_seconds()
        self._ledger_size = ledger_size
        self._sleep = sleep
        self._rand = rand
        self._timer = timer
        self._settled: OrderedDict[str, set[_Key]] = OrderedDict()

    async def forward(self, event: VerifiedEvent) -> None:
        """
        Send one event to its user's destinations (see the class docstring).

        Raises:
            ForwardingIncompleteError: a destination still fails transiently.
            Exception: whatever the directory raises (the receiver answers 503).
        """
        message = message_from_event(event)
        bound = log.bind(
            event_id=message.event_id, agent_id=message.agent_id, user_id=message.user_id
        )
        if not (message.agent_id and message.user_id and message.generated_message):
            bound.warning("forward.nothing_to_send", event_type=message.event_type)
            return
        contacts = await self._directory.contacts(message.agent_id, message.user_id)
        preferences = await self._directory.preferences(message.agent_id, message.user_id)
        if not contacts:
            bound.info("forward.no_contacts")
            return
        settled = self._settled.get(message.event_id, set())
        # A redelivery of an event that raised before: skip what was settled then.
        todo = [c for c in contacts if (c.kind, c.destination) not in settled]
        pending = await self._send_rounds(message, todo, preferences, settled)
        if not pending:
            self._settled.pop(message.event_id, None)
            return
        self._remember(message.event_id, settled)
        raise ForwardingIncompleteError(
            message.event_id, [(a.kind.value, redact(a.kind, a.destination)) for a in pending]
        )

    async def _send_rounds(
        self,
        message: Message,
        contacts: list[Contact],
        preferences: Preferences | None,
        settled: set[_Key],
    ) -> list[ChannelAttempt]:
        """Fan out, then resend the transient failures; return those still failing."""
        started = self._timer()
        by_key = {(c.kind, c.destination): c for c in contacts}
        todo = contacts
        attempt = 1
        while True:
            attempts = await self._router.fan_out(message, todo, preferences)
            for record in attempts:
                self._log(message, record, attempt)
                if not record.retryable:
                    settled.add((record.kind, record.destination))
            failing = [a for a in attempts if a.retryable]
            log.info(
                "forward.round",
                event_id=message.event_id,
                attempt=attempt,
                **summarize(attempts),
                retrying=len(failing),
            )
            delay = self._next_pause(failing, attempt, started)
            if delay is None:
                return failing
            await self._sleep(delay)
            attempt += 1
            # Only the failing ones go again; they already passed the plan (opt-out,
            # preferences), and passing the preferences again keeps that true.
            todo = [by_key[(a.kind, a.destination)] for a in failing]

    def _next_pause(
        self, failing: Sequence[ChannelAttempt], attempt: int, started: float
    ) -> float | None:
        """Seconds to wait before the next round, or ``None`` to stop here."""
        if not failing or attempt >= self._max_attempts:
            return None
        hints = [a.retry_after for a in failing if a.retry_after is not None]
        hint = max(hints) if hints else None
        if hint is not None and hint > self._max_delay:
            # The provider asked for more than a request can wait (429 / 503 with a long
            # Retry-After): hammering it sooner would be rude and likely fail again, so
            # leave it to the sender's schedule.
            return None
        delay = next_delay(attempt, retry_after=hint, rand=self._rand)
        if delay is None:
            return None
        seconds = min(delay, self._max_delay).total_seconds()
        if self._timer() - started + seconds > self._budget_s:
            return None
        return seconds

    def _remember(self, event_id: str, settled: set[_Key]) -> None:
        self._settled[event_id] = settled
        self._settled.move_to_end(event_id)
        while len(self._settled) > self._ledger_size:
            self._settled.popitem(last=False)

    @staticmethod
    def _log(message: Message, record: ChannelAttempt, attempt: int) -> None:
        fields: dict[str, Any] = {
            "event_id": message.event_id,
            "message_id": message.message_id,
            "kind": record.kind.value,
            "destination": redact(record.kind, record.destination),
            "status": record.status.value,
            "reason": record.reason,
            "attempt": attempt,
            "duration_ms": round(record.duration.total_seconds() * 1000, 1),
        }
        if record.status is AttemptStatus.FAILED and isinstance(record.outcome, Failed):
            # Permanent: nothing here can fix it; the operator may have to edit the
            # contacts file (disable_destination: the provider says it is gone).
            log.warning(
                "forward.attempt.permanent_failure",
                disable_destination=record.disable_destination,
                **fields,
            )
        elif record.status is AttemptStatus.FAILED:
            log.warning("forward.attempt.transient_failure", **fields)
        else:
            log.info("forward.attempt", **fields)


# --------------------------------------------------------------------------- file


class ContactsFileError(ValueError):
    """The contacts file is unreadable or an entry is invalid; the message names it."""


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One user's validated destinations and preferences."""

    contacts: tuple[Contact, ...]
    preferences: dict[str, frozenset[ContactKind]] | None


#: ``agent_id`` value that matches every agent.
ANY_AGENT: Final = DEFAULT_PREFERENCE


class FileContactDirectory:
    """
    A :class:`ContactDirectory` read once from a JSON file.

    Format (UTF-8 JSON)::

        {
          "users": [
            {
              "agent_id": "agent-7",            # optional; "*" (the default) = any agent
              "user_id": "user-42",
              "contacts": [
                {"kind": "fcm",   "destination": "<FCM registration token>"},
                {"kind": "email", "destination": "ada@example.com"},
                {"kind": "sms",   "destination": "+14155550100", "opted_out": true}
              ],
              "preferences": {"*": ["fcm", "email"], "daily_checkin": ["sms"]}  # optional
            }
          ]
        }

    ``kind``, ``destination`` and ``opted_out`` have the contacts API's meaning and are
    validated by :func:`~handlers.contacts.validate_contact` (E.164 numbers, sane email
    addresses, FCM token syntax); ``preferences`` by
    :func:`~handlers.contacts.validate_preferences`. A lookup prefers the entry for the
    exact agent over a ``"*"`` one. Duplicate ``(agent_id, user_id)`` pairs are an error,
    so two entries never silently shadow each other.
    """

    def __init__(self, users: Mapping[tuple[str, str], UserEntry]) -> None:
        self._users = dict(users)

    @classmethod
    def load(cls, path: Path) -> Self:
        """
        Read and validate ``path`` (blocking: call it at start-up).

        Raises:
            ContactsFileError: the file cannot be read or parsed, or an entry is
                invalid; the message names the file and the entry (``users[2]``, its
                user id and the offending field).
        """
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ContactsFileError(f"contacts file {path}: cannot be read: {exc}") from exc
        try:
            return cls.parse(document)
        except ContactsFileError as exc:
            raise ContactsFileError(f"contacts file {path}: {exc}") from None

    @classmethod
    def parse(cls, document: Any) -> Self:
        """
        Validate an already-parsed document (the format in the class docstring).

        Raises:
            ContactsFileError: an entry is invalid; the message names it.
        """
        if not isinstance(document, dict) or not isinstance(document.get("users"), list):
            raise ContactsFileError('the top level must be an object with a "users" list')
        users: dict[tuple[str, str], UserEntry] = {}
        for index, raw in enumerate(document["users"]):
            key, entry = _parse_user(index, raw)
            if key in users:
                raise ContactsFileError(
                    f"users[{index}]: agent {key[0]!r} user {key[1]!r} is listed twice"
                )
            users[key] = entry
        return cls(users)

    def _entry(self, agent_id: str, user_id: str) -> UserEntry | None:
        return self._users.get((agent_id, user_id)) or self._users.get((ANY_AGENT, user_id))

    async def contacts(self, agent_id: str, user_id: str) -> list[Contact]:
        entry = self._entry(agent_id, user_id)
        return list(entry.contacts) if entry else []

    async def preferences(self, agent_id: str, user_id: str) -> Preferences | None:
        entry = self._entry(agent_id, user_id)
        return entry.preferences if entry else None

    def __len__(self) -> int:
        return len(self._users)


def _parse_user(index: int, raw: Any) -> tuple[tuple[str, str], UserEntry]:
    where = f"users[{index}]"
    if not isinstance(raw, dict):
        raise ContactsFileError(f"{where}: must be an object")
    user_id = raw.get("user_id")
    agent_id = raw.get("agent_id", ANY_AGENT)
    if not isinstance(user_id, str) or not user_id:
        raise ContactsFileError(f"{where}: user_id must be a non-empty string")
    if not isinstance(agent_id, str) or not agent_id:
        raise ContactsFileError(f"{where} (user {user_id!r}): agent_id must be a non-empty string")
    where = f"{where} (agent {agent_id!r}, user {user_id!r})"
    raw_contacts = raw.get("contacts", [])
    if not isinstance(raw_contacts, list):
        raise ContactsFileError(f"{where}: contacts must be a list")
    contacts = tuple(
        _parse_contact(f"{where} contacts[{i}]", item) for i, item in enumerate(raw_contacts)
    )
    raw_preferences = raw.get("preferences")
    preferences: dict[str, frozenset[ContactKind]] | None = None
    if raw_preferences is not None:
        if not isinstance(raw_preferences, dict) or not all(
            isinstance(v, list) for v in raw_preferences.values()
        ):
            raise ContactsFileError(f"{where}: preferences must map check types to lists")
        try:
            preferences = validate_preferences(raw_preferences)
        except InvalidContactError as exc:
            raise ContactsFileError(f"{where}: {exc.message}") from None
    return (agent_id, user_id), UserEntry(contacts, preferences)


def _parse_contact(where: str, raw: Any) -> Contact:
    if not isinstance(raw, dict):
        raise ContactsFileError(f"{where}: must be an object")
    kind, destination = raw.get("kind"), raw.get("destination")
    opted_out = raw.get("opted_out", False)
    if not isinstance(kind, str) or not isinstance(destination, str):
        raise ContactsFileError(f"{where}: kind and destination must be strings")
    if not isinstance(opted_out, bool):
        raise ContactsFileError(f"{where}: opted_out must be true or false")
    try:
        return validate_contact(kind, destination, opted_out=opted_out)
    except InvalidContactError as exc:
        raise ContactsFileError(f"{where}: {exc.message}") from None
