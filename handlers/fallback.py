"""
Channel fallback, decided by pure code: which channel a message tries first, when
it moves on to the next one, and the sentence recorded for each decision.

With ``DELIVERY_CHANNEL_FALLBACK_AFTER_S`` set, a message goes to ONE channel at a
time, in the user's preference order (the order of their preference list for the
check type, else of ``"*"``, else push -> email -> SMS), instead of to every
channel at once. A channel that has not delivered it (no ``sent`` attempt) within
the delay, or that can no longer (every destination failed for good), hands it to
the next channel with a sendable destination; once one channel has sent it, no
other is tried. Transient failures of the current channel are retried on the
usual schedule while its time lasts. A step that comes due inside the user's quiet
hours waits, on the row, until they end (:func:`delivery.policy.quiet_wait`).

The state lives in one ``channel_fallbacks`` row per message
(:mod:`delivery.store.channels`), claimed under a lease by one worker at a time,
and the channel a step sends to is written before it sends: a worker killed
mid-step is replaced by one that repeats that step on the same channel, never one
that moves on while the first send may have succeeded.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from handlers.contacts import DEFAULT_PREFERENCE, Contact, ContactKind

DEFAULT_ORDER: Final = (ContactKind.FCM, ContactKind.EMAIL, ContactKind.SMS)
"""The order without a preference list: push, then email, then SMS."""


class FallbackStatus(StrEnum):
    """A fallback row's status (the stored values)."""

    ACTIVE = "active"  # a channel is being tried
    DELIVERED = "delivered"  # one channel sent it; no other will
    EXHAUSTED = "exhausted"  # every channel was tried, none sent it
    STOPPED = "stopped"  # the message left the queue (consumed, expired) first


def preferred_order(
    check_type: str, preferences: Mapping[str, Iterable[ContactKind | str]] | None
) -> list[ContactKind]:
    """
    The user's channel order for ``check_type``: their list for it, else their
    ``"*"`` list, else :data:`DEFAULT_ORDER`; unknown kinds and repeats dropped.
    """
    chosen: Iterable[ContactKind | str] = DEFAULT_ORDER
    if preferences:
        if check_type in preferences:
            chosen = preferences[check_type]
        elif DEFAULT_PREFERENCE in preferences:
            chosen = preferences[DEFAULT_PREFERENCE]
    known = {kind.value for kind in ContactKind}
    order: list[ContactKind] = []
    for kind in chosen:
        if str(kind) in known and ContactKind(kind) not in order:
            order.append(ContactKind(kind))
    return order


def fallback_order(
    check_type: str,
    preferences: Mapping[str, Iterable[ContactKind | str]] | None,
    sendable: Iterable[Contact],
) -> list[ContactKind]:
    """The channels to try, in order: the preferred ones with a sendable destination."""
    have = {contact.kind for contact in sendable}
    return [kind for kind in preferred_order(check_type, preferences) if kind in have]


@dataclass(frozen=True, slots=True)
class Decision:
    """One recorded decision: when, on which channel, what and why."""

    at: datetime
    kind: str
    decision: str
    reason: str

    def as_json(self) -> dict[str, str]:
        """The stored form (an entry of the row's ``decisions_json``)."""
        return {
            "at": self.at.isoformat(),
            "kind": self.kind,
            "decision": self.decision,
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """
    What a channel's sends leave the row as.

    Attributes:
        status: the row's status after the step.
        next_attempt_at: when the row is due again (``None``: finished).
        retry_number: the attempt number of the current channel's next retry.
        step_deadline: when the current channel's time ends.
        decision: the recorded decision.
    """

    status: FallbackStatus
    next_attempt_at: datetime | None
    retry_number: int
    step_deadline: datetime
    decision: Decision


def after_sends(
    kind: ContactKind,
    *,
    sent: bool,
    retry_at: Sequence[datetime],
    deadline: datetime,
    attempt_number: int,
    now: datetime,
) -> StepOutcome:
    """
    The row after one round of sends on ``kind`` (pure).

    Sent: delivered, finished. Otherwise the next transient retry if it falls
    before ``deadline``, else the deadline itself (the move to the next channel);
    with no retry left at all, the move happens now.
    """
    if sent:
        return StepOutcome(
            FallbackStatus.DELIVERED,
            None,
            attempt_number,
            deadline,
            Decision(now, kind.value, "delivered", f"{kind.value} sent it; no other channel"),
        )
    soonest = min(retry_at, default=None)
    if soonest is not None and soonest < deadline:
        return StepOutcome(
            FallbackStatus.ACTIVE,
            soonest,
            attempt_number + 1,
            deadline,
            Decision(now, kind.value, "retry", f"{kind.value} failed; retried at {soonest}"),
        )
    if soonest is None:
        # Nothing left to retry on this channel: waiting out its time helps no one.
        return StepOutcome(
            FallbackStatus.ACTIVE,
            now,
            attempt_number,
            now,
            Decision(now, kind.value, "failed", f"{kind.value} failed for good; next channel"),
        )
    return StepOutcome(
        FallbackStatus.ACTIVE,
        deadline,
        attempt_number,
        deadline,
        Decision(now, kind.value, "waiting", f"{kind.value} failed; next channel at {deadline}"),
    )


@dataclass(frozen=True, slots=True)
class NextStep:
    """
    What a due row does now: send on ``order[step]`` (attempt ``attempt_number``),
    or finish with ``status``.
    """

    step: int
    attempt_number: int
    status: FallbackStatus
    decision: Decision
    step_deadline: datetime


def next_step(
    order: Sequence[str],
    *,
    step: int,
    attempt_number: int,
    step_deadline: datetime,
    pending: bool,
    sent_already: bool,
    delay: timedelta,
    now: datetime,
) -> NextStep:
    """
    Decide what a due row does (pure): stop when the message left the queue or a
    channel has sent it; retry the current channel before its deadline; else move
    to the next channel, or give up after the last one.
    """
    kind = order[step]
    if sent_already:
        reason = "a channel has sent it already"
        decision = Decision(now, kind, "delivered", reason)
        return NextStep(step, attempt_number, FallbackStatus.DELIVERED, decision, step_deadline)
    if not pending:
        decision = Decision(now, kind, "stopped", "the message is no longer pending")
        return NextStep(step, attempt_number, FallbackStatus.STOPPED, decision, step_deadline)
    if now < step_deadline:
        reason = f"retry {attempt_number} of {kind}"
        decision = Decision(now, kind, "retry", reason)
        return NextStep(step, attempt_number, FallbackStatus.ACTIVE, decision, step_deadline)
    if step + 1 >= len(order):
        reason = f"{kind} did not deliver it and no channel is left"
        decision = Decision(now, kind, "exhausted", reason)
        return NextStep(step, attempt_number, FallbackStatus.EXHAUSTED, decision, step_deadline)
    following = order[step + 1]
    reason = f"{kind} did not deliver it by {step_deadline}; trying {following}"
    return NextStep(
        step + 1,
        1,
        FallbackStatus.ACTIVE,
        Decision(now, following, "fallback", reason),
        now + delay,
    )
