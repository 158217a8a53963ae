"""The pure explanation: one case per reason, plain values in, a code and a sentence out."""

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from delivery.errors import InvalidRequestError
from delivery.explain import (
    ExplainFacts,
    FireFacts,
    MessageFacts,
    Reason,
    ScheduleFacts,
    explain,
    parse_window,
)
from delivery.timeline import Kind, Order, TimelineEvent, decode_cursor, encode_cursor

AT = datetime(2026, 5, 1, 9, 0, tzinfo=UTC)
CREATED = datetime(2026, 4, 1, tzinfo=UTC)


def schedule(**changes: object) -> ScheduleFacts:
    base = ScheduleFacts(
        id="sch_1",
        timezone="UTC",
        cadence_json=json.dumps({"simple": {"frequency": "daily", "times": ["09:00"]}}),
        active_window_json=None,
        starts_at=None,
        ends_at=None,
        anchor_at=CREATED,
        enabled=True,
        created_at=CREATED,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def message(**changes: object) -> MessageFacts:
    base = MessageFacts(
        id="msg_1",
        source_id="fire_1",
        source_type="schedule",
        schedule_id="sch_1",
        status="pending",
        fire_at=AT,
        created_at=AT,
        consumed_at=None,
        error=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def facts(**changes: object) -> ExplainFacts:
    base = ExplainFacts(
        at=AT,
        window=timedelta(hours=1),
        now=AT + timedelta(days=1),
        max_lateness=timedelta(hours=1),
        schedules=[schedule()],
        fires=[],
        messages=[],
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def skipped(reason: str, at: datetime = AT) -> FireFacts:
    return FireFacts("fire_1", "sch_1", at, "skipped", reason)


CASES = [
    (
        Reason.DELIVERED,
        facts(messages=[message(status="consumed", consumed_at=AT + timedelta(minutes=5))]),
        "consumed by a poll at 2026-05-01T09:05:00+00:00",
    ),
    (
        Reason.DELIVERED,
        facts(messages=[message(status="consumed", consumed_at=AT, consumed_by_webhook=True)]),
        "a webhook answered 2xx",
    ),
    (Reason.PENDING, facts(messages=[message()]), "still pending in the queue"),
    (
        Reason.PENDING,
        facts(messages=[message(status="staged")], now=AT - timedelta(seconds=30)),
        "shown from 2026-05-01T09:00:00+00:00",
    ),
    (
        Reason.WEBHOOK_FAILING,
        facts(
            messages=[
                message(
                    last_attempt_status=500,
                    last_attempt_at=AT,
                    next_attempt_at=AT + timedelta(minutes=5),
                )
            ]
        ),
        "got HTTP 500; the next retry is at 2026-05-01T09:05:00+00:00",
    ),
    (
        Reason.WEBHOOK_FAILING,
        facts(messages=[message(last_attempt_status=0, last_attempt_at=AT, dead_lettered=True)]),
        "dead-lettered",
    ),
    (
        Reason.COMPOSITION_FAILED,
        facts(messages=[message(status="failed_generation", error="LLM 500")]),
        "composing its message failed (LLM 500)",
    ),
    (Reason.EXPIRED, facts(messages=[message(status="expired")]), "expired"),
    (
        Reason.EXPIRED,
        facts(messages=[message(status="expired", status_reason="deadline_passed")]),
        "expired/deadline_passed",
    ),
    (
        Reason.SUPPRESSED,
        facts(messages=[message(status="suppressed", status_reason="attention_budget")]),
        "suppressed/attention_budget",
    ),
    (
        Reason.SUPPRESSED,
        facts(messages=[message(status="suppressed", status_reason="quiet_hours")]),
        "suppressed/quiet_hours",
    ),
    (
        Reason.SUPERSEDED,
        facts(messages=[message(status="superseded", status_reason="supersede_key")]),
        "same supersede_key",
    ),
    (
        Reason.SUPERSEDED,
        facts(messages=[message(status="superseded", status_reason="next_regular_fire")]),
        "that fire replaced it",
    ),
    (
        Reason.PENDING,
        facts(messages=[message(status="staged", status_reason="deferred_quiet_hours")]),
        "deferred to their end",
    ),
    (
        Reason.DST_GAP,
        facts(
            at=datetime(2027, 3, 14, 7, 30, tzinfo=UTC),
            schedules=[schedule(timezone="America/New_York")],
            fires=[skipped("dst_gap", datetime(2027, 3, 14, 7, 30, tzinfo=UTC))],
        ),
        "02:30 does not exist in America/New_York on 2027-03-14",
    ),
    (
        Reason.OUTSIDE_ACTIVE_WINDOW,
        facts(
            schedules=[
                schedule(
                    active_window_json=json.dumps({"hours": {"start": "10:00", "end": "18:00"}})
                )
            ],
            fires=[skipped("outside_active_window")],
        ),
        "09:00 on Friday 2026-05-01 (UTC) is outside the active window (10:00-18:00)",
    ),
    (
        Reason.MISSED_MAX_LATENESS,
        facts(fires=[skipped("missed_max_lateness")]),
        "more than the maximum lateness (1 h)",
    ),
    (
        Reason.NOT_COMPOSED,
        facts(fires=[FireFacts("fire_1", "sch_1", AT, "fired", None)]),
        "has not been composed yet",
    ),
    (
        Reason.SCHEDULE_ENDED,
        facts(schedules=[schedule(ends_at=AT - timedelta(days=1), enabled=False)]),
        "it had ended",
    ),
    (
        Reason.SCHEDULE_DISABLED,
        facts(schedules=[schedule(enabled=False, disabled_at=AT - timedelta(hours=3))]),
        "disabled since 2026-05-01T06:00:00+00:00",
    ),
    (
        Reason.SCHEDULE_NOT_STARTED,
        facts(schedules=[schedule(starts_at=AT + timedelta(days=2))]),
        "it only starts at",
    ),
    (Reason.NOT_FIRED, facts(now=AT + timedelta(minutes=10)), "no fire was recorded"),
    (Reason.NOT_DUE_YET, facts(now=AT - timedelta(minutes=10)), "still ahead"),
    (
        Reason.NOT_COVERED,
        facts(schedules=[schedule(cadence_json=json.dumps({"cron": "0 20 * * *"}))]),
        "no schedule covered that time",
    ),
    (Reason.NO_SCHEDULE, facts(schedules=[]), "the user has no schedule"),
]


@pytest.mark.parametrize(("code", "given", "phrase"), CASES, ids=[c[0].value for c in CASES])
def test_every_reason(code: Reason, given: ExplainFacts, phrase: str) -> None:
    """Each situation gets its code and a sentence that names what happened."""
    answer = explain(given)
    assert answer.code is code
    assert phrase in answer.sentence
    assert answer.got_message is (code is Reason.DELIVERED)


def test_every_reason_has_a_case() -> None:
    assert {c[0] for c in CASES} == set(Reason)


def test_the_closest_candidate_speaks() -> None:
    """Of two messages in the window, the one nearest the instant is explained."""
    near = message(id="msg_near", fire_at=AT + timedelta(minutes=1), status="failed_generation")
    far = message(id="msg_far", fire_at=AT - timedelta(minutes=50))
    assert explain(facts(messages=[far, near])).message_id == "msg_near"


def test_a_disable_after_the_tick_does_not_explain_it() -> None:
    """Disabled later than the tick: the tick was due while enabled, so it is not_fired."""
    later = schedule(enabled=False, disabled_at=AT + timedelta(hours=5))
    assert explain(facts(schedules=[later])).code is Reason.NOT_FIRED


@pytest.mark.parametrize(
    ("raw", "seconds"), [(None, 3600), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400)]
)
def test_window_forms(raw: str | None, seconds: int) -> None:
    assert parse_window(raw).total_seconds() == seconds


@pytest.mark.parametrize("raw", ["0", "-1h", "8d", "h", "1.5h", "1w", "9" * 12])
def test_bad_windows(raw: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_window(raw)
    assert caught.value.field == "window"


def test_cursor_round_trip() -> None:
    event = TimelineEvent(AT, Kind.FIRE_FIRED, "fire_1", "fired")
    assert decode_cursor(encode_cursor(event.key, Order.DESC), Order.DESC) == event.key
    with pytest.raises(InvalidRequestError):
        decode_cursor(encode_cursor(event.key, Order.DESC), Order.ASC)


def _forged(parts: list[object]) -> str:
    import base64

    raw = json.dumps(parts, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "parts",
    [
        ["2026-01-01T00:00:00", "fire_1", "fire_fired", "asc"],  # naive: server-local time
        ["0001-01-01T00:00:00+14:00", "fire_1", "fire_fired", "asc"],  # overflows in UTC
        ["2026-01-01T00:00:00Z", "fire\x001", "fire_fired", "asc"],  # NUL: PostgreSQL refuses
        ["2026-01-01T00:00:00Z", "", "fire_fired", "asc"],
        ["2026-01-01T00:00:00Z", "fire_1", "x" * 65, "asc"],
    ],
    ids=["naive", "overflow", "nul-ref", "empty-ref", "long-kind"],
)
def test_forged_cursors_are_400_not_500(parts: list[object]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        decode_cursor(_forged(parts), Order.ASC)
    assert caught.value.field == "cursor"
