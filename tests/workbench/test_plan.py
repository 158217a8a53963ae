"""Advance-time's planner alone: plain values in, a plan out, no database."""

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from delivery.planning import fire_id
from delivery.store.advance import Pair, PairState
from delivery.workbench import advance_window, plan_advance

NOW = datetime(2026, 5, 1, 0, 0, tzinfo=UTC)
PAIR = Pair("proj_1", "agent_1", "user_1")


def at(day: int, hour: int) -> datetime:
    return datetime(2026, 5, day, hour, tzinfo=UTC)


def schedule(**over: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": "sch_1",
        "project_id": PAIR.project_id,
        "agent_id": PAIR.agent_id,
        "user_id": PAIR.user_id,
        "cadence_json": json.dumps({"simple": {"frequency": "daily", "times": ["09:00"]}}),
        "timezone": "UTC",
        "active_window_json": None,
        "starts_at": None,
        "ends_at": None,
        "anchor_at": NOW,
        "intent": "stretch",
        "check_type": "habit",
        "inventory_item_id": None,
        "metadata_json": None,
        "next_fire_at": at(1, 9),
        "last_fire_at": None,
        "version": 3,
    }
    row.update(over)
    return row


def wakeup() -> dict[str, Any]:
    return {
        "id": "wk_1",
        "project_id": PAIR.project_id,
        "agent_id": PAIR.agent_id,
        "user_id": PAIR.user_id,
        "check_type": "birthday",
        "intent": "wish a happy birthday",
        "scheduled_at": at(2, 9),
        "occasion": None,
        "interest_topic": None,
        "event_description": None,
        "inventory_item_id": None,
    }


def test_the_plan_is_a_value_of_the_state_read() -> None:
    """Two days from an offset of one day: the window, fires in order, drafts, the move."""
    window = advance_window(NOW, 86_400.0, 48)
    state = PairState([schedule()], [wakeup()], {})
    plan = plan_advance(PAIR, window, 86_400.0, state)

    assert (window.start, window.end) == (at(2, 0), at(4, 0))
    assert [f["id"] for f in plan.fires] == [fire_id("sch_1", at(2, 9)), fire_id("sch_1", at(3, 9))]
    assert [(d.source_id, d.fire_at) for d in plan.drafts] == [
        (fire_id("sch_1", at(2, 9)), at(2, 9)),
        ("wk_1", at(2, 9)),
        (fire_id("sch_1", at(3, 9)), at(3, 9)),
    ]
    assert plan.schedule_moves == [
        {
            "id": "sch_1",
            "version": 3,
            "next_fire_at": at(4, 9),
            "last_fire_at": at(3, 9),
            "enabled": True,
            "staged_fire_at": None,
        }
    ]
    assert plan_advance(PAIR, window, 86_400.0, state) == plan


def test_a_schedule_ending_in_the_window_is_disabled_and_its_skips_recorded() -> None:
    """Ticks outside the active window are skipped fires; an ended schedule stops."""
    window = advance_window(NOW, None, 72)
    state = PairState(
        [
            schedule(
                ends_at=at(3, 12),
                active_window_json=json.dumps({"hours": {"start": "10:00", "end": "18:00"}}),
            )
        ],
        [],
        {},
    )
    plan = plan_advance(PAIR, window, None, state)

    assert [(f["fire_at"], f["status"]) for f in plan.fires] == [
        (at(1, 9), "skipped"),
        (at(2, 9), "skipped"),
        (at(3, 9), "skipped"),
    ]
    assert plan.drafts == []
    [move] = plan.schedule_moves
    assert (move["next_fire_at"], move["enabled"], move["last_fire_at"]) == (None, False, None)
    assert window.end - window.start == timedelta(hours=72)
