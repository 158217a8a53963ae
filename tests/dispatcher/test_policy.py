"""
The delivery policies at dispatch, on SQLite and PostgreSQL: the attention budget
(decided in the write transaction, so concurrent dispatchers never both spend the
last unit), freshness (deadline and supersede key) and quiet hours (skip, defer,
DST-correct openings).
"""

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.clock import ManualClock
from delivery.dispatcher.composers import TemplateComposer
from delivery.dispatcher.policies import Policies
from delivery.dispatcher.process import Processor
from delivery.domain import SourceKind, SourceRef, notification_id
from delivery.policy import SourcePolicy
from delivery.store.notifications import SqlNotificationStore
from delivery.store.policy import PolicyStore, expire_due
from delivery.store.staging import promote
from tests.dispatcher import rows

NOW = datetime(2026, 5, 2, 10, 30, 5, tzinfo=UTC)


def processor(engine: AsyncEngine, now: datetime = NOW) -> Processor:
    return Processor(
        engine,
        TemplateComposer(),
        Subjects("tpol"),
        ManualClock(now),
        policies=Policies(PolicyStore(engine), ttl_s=0),
    )


async def budget(engine: AsyncEngine, limit: int, window_s: int = 86_400) -> None:
    policy = {"attention_budget": {"limit": limit, "window_seconds": window_s}}
    await PolicyStore(engine).put_policy("proj_1", json.dumps(policy), NOW)


async def event(engine: AsyncEngine, eid: str, **policy: Any) -> SourceRef:
    stored = SourcePolicy(**policy).stored() if policy else None
    await rows.event(engine, eid, policy_json=stored, created_at=NOW - timedelta(seconds=5))
    return SourceRef(SourceKind.EVENT, eid)


async def by_source(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    return {n["source_id"]: n for n in await rows.notifications(engine)}


async def published(engine: AsyncEngine) -> set[str]:
    return {o["msg_id"] for o in await rows.outbox(engine)}


# --- attention budget -----------------------------------------------------------------


async def test_over_budget_lower_priorities_are_suppressed_and_critical_passes(
    engine: AsyncEngine,
) -> None:
    """Budget 1: critical passes and spends the unit; the rest is suppressed, unpublished."""
    await rows.project(engine)
    await budget(engine, limit=1)
    refs = [
        await event(engine, "evt_low", priority="low"),
        await event(engine, "evt_normal"),
        await event(engine, "evt_critical", priority="critical"),
    ]

    result = await processor(engine).process(refs)

    notes = await by_source(engine)
    assert notes["evt_critical"]["status"] == "pending"
    assert notes["evt_critical"]["priority"] == "critical"
    for eid in ("evt_low", "evt_normal"):
        assert (notes[eid]["status"], notes[eid]["status_reason"]) == (
            "suppressed",
            "attention_budget",
        )
    assert await published(engine) == {notification_id("evt_critical")}
    assert result.policy[notification_id("evt_normal")] == "suppressed/attention_budget"


async def test_the_inbox_badge_counts_only_what_the_user_received(engine: AsyncEngine) -> None:
    """Budget 1 and three events: one message reached the user, so the badge says one."""
    await rows.project(engine)
    await budget(engine, limit=1)
    refs = [await event(engine, f"evt_{n}") for n in range(3)]
    await processor(engine).process(refs)
    assert sorted(n["status"] for n in await rows.notifications(engine)) == [
        "pending",
        "suppressed",
        "suppressed",
    ]

    counts = await SqlNotificationStore(engine).inbox_counts("proj_1", "agent_1", user_id="user_1")

    assert (counts.total, counts.unseen, counts.unread, counts.pending) == (1, 1, 1, 1)


async def test_budget_counts_earlier_batches_and_every_agent(engine: AsyncEngine) -> None:
    """The window counts what earlier batches sent the user, whichever agent sent it."""
    await rows.project(engine)
    await budget(engine, limit=2)
    await processor(engine).process([await event(engine, "evt_1")])
    await rows.event(engine, "evt_2", agent_id="agent_2", created_at=NOW)
    await processor(engine).process([SourceRef(SourceKind.EVENT, "evt_2")])
    third = await event(engine, "evt_3", priority="high")
    critical = await event(engine, "evt_4", priority="critical")

    await processor(engine).process([third])
    await processor(engine).process([critical])

    status = {k: v["status"] for k, v in (await by_source(engine)).items()}
    assert status == {
        "evt_1": "pending",
        "evt_2": "pending",
        "evt_3": "suppressed",
        "evt_4": "pending",
    }


async def test_budget_window_rolls(engine: AsyncEngine) -> None:
    """A message older than the window no longer counts."""
    await rows.project(engine)
    await budget(engine, limit=1, window_s=3600)
    await processor(engine, NOW - timedelta(hours=2)).process([await event(engine, "evt_old")])

    await processor(engine).process([await event(engine, "evt_new")])

    assert (await by_source(engine))["evt_new"]["status"] == "pending"


async def test_no_policy_changes_nothing(engine: AsyncEngine) -> None:
    """Without a policy every message passes, with no policy columns set."""
    await rows.project(engine)
    refs = [await event(engine, f"evt_{i}") for i in range(3)]

    await processor(engine).process(refs)

    notes = (await by_source(engine)).values()
    assert {n["status"] for n in notes} == {"pending"}
    assert {(n["priority"], n["expires_at"], n["status_reason"]) for n in notes} == {
        (None, None, None)
    }


async def test_concurrent_dispatchers_never_both_spend_the_last_unit(engine: AsyncEngine) -> None:
    """
    Two dispatchers (their own processors, caches and connections) race over ten
    messages for each of three users with a budget of 1, one message per batch, all
    at once: exactly one message per user is sent.
    """
    await rows.project(engine)
    await budget(engine, limit=1)
    refs = []
    for user in ("user_a", "user_b", "user_c"):
        for i in range(10):
            eid = f"evt_{user}_{i}"
            await rows.event(engine, eid, user_id=user, created_at=NOW - timedelta(seconds=5))
            refs.append(SourceRef(SourceKind.EVENT, eid))
    first, second = processor(engine), processor(engine)

    await asyncio.gather(
        *((first if i % 2 else second).process([ref]) for i, ref in enumerate(refs))
    )

    notes = (await by_source(engine)).values()
    sent = sorted(n["user_id"] for n in notes if n["status"] == "pending")
    assert sent == ["user_a", "user_b", "user_c"]
    assert len(await published(engine)) == 3


# --- freshness ------------------------------------------------------------------------


async def test_message_past_its_deadline_at_composition_is_expired(engine: AsyncEngine) -> None:
    """A ttl already over when the message is written: expired, never published."""
    await rows.project(engine)
    ref = await event(engine, "evt_stale", ttl_seconds=1)

    await processor(engine, NOW + timedelta(minutes=5)).process([ref])

    note = (await by_source(engine))["evt_stale"]
    assert (note["status"], note["status_reason"]) == ("expired", "deadline_passed")
    assert await published(engine) == set()


async def test_pending_message_expires_at_its_deadline(engine: AsyncEngine) -> None:
    """The sweep moves a pending message past its deadline to expired and drops its entry."""
    await rows.project(engine)
    ref = await event(engine, "evt_1", ttl_seconds=600)
    await processor(engine).process([ref])
    note = (await by_source(engine))["evt_1"]
    assert note["status"] == "pending"
    assert note["expires_at"] == NOW - timedelta(seconds=5) + timedelta(seconds=600)

    assert await expire_due(engine, NOW + timedelta(seconds=500)) == []
    assert await expire_due(engine, NOW + timedelta(seconds=600)) == [note["id"]]

    note = (await by_source(engine))["evt_1"]
    assert (note["status"], note["status_reason"]) == ("expired", "deadline_passed")
    assert await published(engine) == set()


async def test_supersede_key_replaces_the_pending_older_message(engine: AsyncEngine) -> None:
    """Same key, same user: the older pending one is superseded; another key is untouched."""
    await rows.project(engine)
    await processor(engine).process([await event(engine, "evt_old", supersede_key="rent")])
    await processor(engine).process([await event(engine, "evt_other", supersede_key="gym")])

    await processor(engine).process([await event(engine, "evt_new", supersede_key="rent")])

    notes = await by_source(engine)
    assert (notes["evt_old"]["status"], notes["evt_old"]["status_reason"]) == (
        "superseded",
        "supersede_key",
    )
    assert notes["evt_new"]["status"] == "pending"
    assert notes["evt_other"]["status"] == "pending"
    assert notification_id("evt_old") not in await published(engine)


async def test_supersede_within_one_batch_keeps_the_latest(engine: AsyncEngine) -> None:
    """Two messages with one key in one batch: only the later one stays."""
    await rows.project(engine)
    await rows.event(engine, "evt_a", policy_json='{"supersede_key":"k"}', created_at=NOW)
    await rows.event(
        engine,
        "evt_b",
        policy_json='{"supersede_key":"k"}',
        created_at=NOW + timedelta(seconds=1),
    )

    await processor(engine, NOW + timedelta(seconds=2)).process(
        [SourceRef(SourceKind.EVENT, "evt_a"), SourceRef(SourceKind.EVENT, "evt_b")]
    )

    notes = await by_source(engine)
    assert (notes["evt_a"]["status"], notes["evt_b"]["status"]) == ("superseded", "pending")


async def test_the_budget_spends_its_last_unit_on_the_newest_of_a_key(
    engine: AsyncEngine,
) -> None:
    """One unit left, two versions of one reminder in a batch: the newer one is sent."""
    await rows.project(engine)
    await budget(engine, limit=1)
    await rows.event(engine, "evt_a", policy_json='{"supersede_key":"k"}', created_at=NOW)
    await rows.event(
        engine,
        "evt_b",
        policy_json='{"supersede_key":"k"}',
        created_at=NOW + timedelta(seconds=1),
    )

    await processor(engine, NOW + timedelta(seconds=2)).process(
        [SourceRef(SourceKind.EVENT, "evt_a"), SourceRef(SourceKind.EVENT, "evt_b")]
    )

    notes = await by_source(engine)
    assert (notes["evt_a"]["status"], notes["evt_b"]["status"]) == ("superseded", "pending")
    assert await published(engine) == {notification_id("evt_b")}


# --- quiet hours ----------------------------------------------------------------------


async def quiet(engine: AsyncEngine, start: int, end: int, zone: str = "America/New_York") -> None:
    await PolicyStore(engine).put_quiet_hours(
        "proj_1", "user_1", timezone=zone, start=start, end=end, now=NOW
    )


async def test_quiet_hours_skip_suppresses(engine: AsyncEngine) -> None:
    """Inside the user's quiet hours (06:30 New York is inside 22:00-07:00): suppressed."""
    await rows.project(engine)
    await quiet(engine, 22 * 60, 7 * 60)

    await processor(engine).process([await event(engine, "evt_1")])  # 06:30 EDT

    note = (await by_source(engine))["evt_1"]
    assert (note["status"], note["status_reason"]) == ("suppressed", "quiet_hours")
    assert await published(engine) == set()


async def test_quiet_hours_of_another_user_do_not_apply(engine: AsyncEngine) -> None:
    """Quiet hours are per user."""
    await rows.project(engine)
    await PolicyStore(engine).put_quiet_hours(
        "proj_1", "user_2", timezone="America/New_York", start=0, end=23 * 60, now=NOW
    )

    await processor(engine).process([await event(engine, "evt_1")])

    assert (await by_source(engine))["evt_1"]["status"] == "pending"


async def test_defer_delivers_at_the_opening(engine: AsyncEngine) -> None:
    """Deferred: staged until 07:00 New York, published then, promoted to pending."""
    await rows.project(engine)
    await quiet(engine, 22 * 60, 7 * 60)

    await processor(engine).process([await event(engine, "evt_1", outside_window="defer")])

    opening = datetime(2026, 5, 2, 11, 0, tzinfo=UTC)  # 07:00 EDT
    note = (await by_source(engine))["evt_1"]
    assert (note["status"], note["status_reason"], note["fire_at"]) == (
        "staged",
        "deferred_quiet_hours",
        opening,
    )
    [entry] = await rows.outbox(engine)
    assert entry["available_at"] == opening
    assert await promote(engine, opening - timedelta(seconds=1)) == 0
    assert await promote(engine, opening) == 1
    assert (await by_source(engine))["evt_1"]["status"] == "pending"


async def test_defer_across_spring_forward_opens_right_after_the_gap(engine: AsyncEngine) -> None:
    """
    Quiet 22:00-02:30 New York; on 2026-03-08 02:30 never happens (02:00 -> 03:00):
    a message deferred at 01:00 EST goes out at 03:00 EDT (07:00 UTC), not a day late.
    """
    await rows.project(engine)
    await quiet(engine, 22 * 60, 2 * 60 + 30)
    at = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)  # 01:00 EST
    await rows.event(engine, "evt_1", policy_json='{"outside_window":"defer"}', created_at=at)

    await processor(engine, at).process([SourceRef(SourceKind.EVENT, "evt_1")])

    note = (await by_source(engine))["evt_1"]
    assert (note["status"], note["fire_at"]) == ("staged", datetime(2026, 3, 8, 7, 0, tzinfo=UTC))


async def test_project_policy_defers_sources_that_say_nothing(engine: AsyncEngine) -> None:
    """The project's outside_window applies to a source without its own."""
    await rows.project(engine)
    await PolicyStore(engine).put_policy("proj_1", '{"outside_window":"defer"}', NOW)
    await quiet(engine, 22 * 60, 7 * 60)

    await processor(engine).process([await event(engine, "evt_1")])

    assert (await by_source(engine))["evt_1"]["status"] == "staged"


async def test_defer_never_goes_past_the_next_regular_fire(engine: AsyncEngine) -> None:
    """A schedule's deferred fire whose opening comes after its next fire is superseded."""
    await rows.project(engine)
    await quiet(engine, 22 * 60, 7 * 60)
    await rows.schedule(
        engine,
        policy_json='{"outside_window":"defer"}',
        next_fire_at=NOW + timedelta(minutes=10),  # before the 07:00 opening
    )
    fid = await rows.fire(engine, "sch_1", NOW - timedelta(seconds=5))

    await processor(engine).process([SourceRef(SourceKind.SCHEDULE, fid)])

    note = (await by_source(engine))[fid]
    assert (note["status"], note["status_reason"]) == ("superseded", "next_regular_fire")
    assert await published(engine) == set()


async def test_deferred_message_past_its_deadline_is_expired(engine: AsyncEngine) -> None:
    """Deferred past its ttl: expired at once rather than sent stale."""
    await rows.project(engine)
    await quiet(engine, 22 * 60, 7 * 60)

    await processor(engine).process(
        [await event(engine, "evt_1", outside_window="defer", ttl_seconds=600)]
    )

    note = (await by_source(engine))["evt_1"]
    assert (note["status"], note["status_reason"]) == ("expired", "deadline_passed")


async def test_concurrent_callers_share_one_read_of_a_project(engine: AsyncEngine) -> None:
    """
    Callers asking at once for a project that is not cached (the channels worker's
    retries of one sweep) wait for one read, then reuse it for the TTL; a caller
    cancelled meanwhile does not cancel the others' read.
    """
    await rows.project(engine)
    source = PolicyStore(engine)
    await source.put_quiet_hours("proj_1", "u1", timezone="UTC", start=0, end=60, now=NOW)
    seconds = [0.0]
    policies = Policies(source, ttl_s=5, clock=lambda: seconds[0])
    cancelled = asyncio.create_task(policies.rules(["proj_1"]))
    await asyncio.sleep(0)
    callers = [asyncio.create_task(policies.rules(["proj_1"])) for _ in range(5)]
    cancelled.cancel()
    for rules in await asyncio.gather(*callers):
        assert rules["proj_1"].quiet_hours
    assert policies.reads == 1
    assert (await policies.rules(["proj_1"]))["proj_1"].quiet_hours
    assert policies.reads == 1
    seconds[0] = 5.0
    await source.delete_quiet_hours("proj_1", "u1")
    assert not (await policies.rules(["proj_1"]))["proj_1"].quiet_hours
    assert policies.reads == 2
