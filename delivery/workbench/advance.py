"""
The advance itself: read the pair's state through the store, plan (pure),
compose, and have the store commit it all in one transaction.
"""

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.bus.subjects import Subjects
from delivery.cadence import format_utc
from delivery.clock import Clock
from delivery.dispatcher.composers import Composer, TemplateComposer
from delivery.dispatcher.messages import Messages, TemplateBooks, as_composed
from delivery.dispatcher.policies import Policies
from delivery.dispatcher.process import compose_all, notification_batch
from delivery.domain import Draft
from delivery.errors import ConflictError
from delivery.policy import ProjectPolicy, QuietHours
from delivery.store.advance import AdvanceStore, AdvanceWrite, JobClaim, Pair, advance_store
from delivery.store.engine import Engine
from delivery.store.notifications import Written
from delivery.store.policy import PolicyStore, UserOf
from delivery.store.templates import TemplateStore
from delivery.workbench.plan import advance_window, plan_advance, response_body, validate_hours

log = structlog.get_logger(__name__)

_ATTEMPTS = 3


async def advance_time(
    db: AdvanceStore | Engine,
    composer: Composer,
    subjects: Subjects,
    clock: Clock,
    pair: Pair,
    simulated_hours: float,
    *,
    job: JobClaim | None = None,
) -> dict[str, Any]:
    """
    Advance ``pair``'s clock by ``simulated_hours`` and fire what falls due.

    Args:
        db: the store, or the engine to build the SQL store over.
        simulated_hours: validated with :func:`validate_hours`.
        job: the ``async: true`` job this advance runs for; it is marked
            ``succeeded`` in the advance's own transaction, so a job still
            ``running`` after a crash is one whose advance never committed.

    Returns:
        The advance-time response body.

    Raises:
        ConflictError: the pair's clock kept moving under concurrent advances.
        JobLost: ``job``'s lease passed to another runner; nothing was written.
    """
    store = advance_store(db)
    hours = validate_hours(simulated_hours)
    bound = log.bind(
        project_id=pair.project_id, agent_id=pair.agent_id, user_id=pair.user_id, hours=hours
    )
    body = partial(_body, hours)
    for attempt in range(1, _ATTEMPTS + 1):
        now = clock.now()
        offset = await store.clock_offset(pair)
        window = advance_window(now, offset, hours)
        state = await store.pair_state(pair, window.start, window.end)
        plan = plan_advance(pair, window, offset, state)
        # Composed outside the transaction: an LLM call never holds the write lock.
        composed, composers = await _compose(db, composer, plan.drafts)
        policies, quiet = await _rules(db, plan.drafts)
        new_offset_s = (window.end - now).total_seconds()
        write = AdvanceWrite(
            pair=pair,
            old_offset_s=plan.old_offset_s,
            new_offset_s=new_offset_s,
            now=now,
            fires=plan.fires,
            schedule_moves=plan.schedule_moves,
            notifications=notification_batch(
                composed,
                subjects=subjects,
                now=now,
                simulated=True,
                # A fire the scheduler staged in the window may already have a
                # staged notification: this simulated one replaces it.
                replace=[d.source_id for d in plan.drafts if d.schedule_id is not None],
                composers=composers,
                # The dispatcher's policy decisions, on the pair's clock: each
                # message at its own instant, its budget counted among the pair's.
                offsets=dict.fromkeys((d.source_id for d in plan.drafts), new_offset_s),
                policies=policies,
                quiet=quiet,
            ),
        )
        try:
            written = await store.commit_advance(write, job=job, job_result=body)
        except ConflictError:
            bound.warning("advance_time.retry", attempt=attempt)
            if attempt == _ATTEMPTS:
                raise
            continue
        for row in written.rows:
            bound.info(
                "notification.created",
                notification_id=row["id"],
                source_id=row["source_id"],
                fire_at=format_utc(row["fire_at"]),
                status=row["status"],
                **({"reason": row["status_reason"]} if row.get("status_reason") else {}),
            )
        bound.info(
            "advance_time.done",
            window_start=format_utc(window.start),
            window_end=format_utc(window.end),
            fires=len(written.rows),
            lost=sorted(written.lost),
        )
        return body(written)
    raise AssertionError("unreachable")  # pragma: no cover


async def _compose(
    db: AdvanceStore | Engine, composer: Composer, drafts: Sequence[Draft]
) -> tuple[list[tuple[Draft, str, str | None]], Mapping[str, str]]:
    """
    The messages of ``drafts`` as the dispatcher makes them: the project's templates
    (read fresh: an advance is rare and a template just saved must show), or the
    LLM with the template as its fallback; without an engine, ``composer`` alone.
    """
    engine = db if isinstance(db, AsyncEngine) else getattr(db, "engine", None)
    if not isinstance(engine, AsyncEngine):
        return await compose_all(composer, drafts), {}
    llm = None if isinstance(composer, TemplateComposer) else composer
    messages = Messages(TemplateBooks(TemplateStore(engine), ttl_s=0.0), llm)
    return as_composed(await messages.compose(drafts))


async def _rules(
    db: AdvanceStore | Engine, drafts: Sequence[Draft]
) -> tuple[dict[str, ProjectPolicy], dict[UserOf, QuietHours]]:
    """
    The delivery policies the dispatcher would decide ``drafts`` by, read fresh (an
    advance is rare and a policy just saved must apply); none without an engine.
    """
    engine = db if isinstance(db, AsyncEngine) else getattr(db, "engine", None)
    if not isinstance(engine, AsyncEngine):
        return {}, {}
    return await Policies(PolicyStore(engine), ttl_s=0.0).of_drafts(drafts)


def _body(hours: float, written: Written) -> dict[str, Any]:
    return response_body(hours, written.rows)


async def reset_clock(db: AdvanceStore | Engine, clock: Clock, pair: Pair) -> dict[str, Any]:
    """
    Put ``pair``'s clock back on real time.

    What the simulated clock already passed stays passed: fires and skips it
    recorded and the wakeups it executed are history and never fire again. A
    schedule keeps its ``next_fire_at`` (its first tick after what was handled,
    possibly later than real now: the ticks in between were handled on the
    simulated clock) and fires at that instant in real time; a pending wakeup
    fires at its ``scheduled_at`` in real time. Nothing is fired by the reset
    itself, and resetting a pair never advanced changes nothing.

    Returns:
        ``agent_id``, ``user_id``, ``previous_offset_hours`` (0 when never
        advanced) and ``clock``, the pair's now afterwards (real now).
    """
    store = advance_store(db)
    previous = await store.reset_clock(pair)
    now = clock.now()
    log.info(
        "advance_time.clock_reset",
        project_id=pair.project_id,
        agent_id=pair.agent_id,
        user_id=pair.user_id,
        previous_offset_s=previous,
    )
    return {
        "agent_id": pair.agent_id,
        "user_id": pair.user_id,
        "previous_offset_hours": (previous or 0.0) / 3600,
        "clock": format_utc(now),
    }
