"""Intent blocks, golden: exactly the documented text, and the wakeup / event variants."""

from datetime import UTC, datetime

import pytest

from delivery.dispatcher.compose import event_block, schedule_block, wakeup_block
from delivery.dispatcher.composers import TemplateComposer
from delivery.domain import IntentBlock, InventoryItem, SourceKind

# The documented "Scheduled Reminders" block, verbatim (its page lost its line breaks).
SEED_BLOCK = (
    "[PROACTIVE WAKEUP — SCHEDULED REMINDER]Why you're reaching out: check in on how the user "
    "is feelingScheduled fire time (user's local): 2026-05-02T09:00:00+08:00Reference item "
    "(from inventory): Daily Vitamin D dosage: 1000 IU form: softgel timing_notes: take with "
    "foodAdditional context: campaign: daily_checkin_v2"
)
VITAMIN_D = InventoryItem(
    label="Daily Vitamin D",
    properties={"timing_notes": "take with food", "dosage": "1000 IU", "form": "softgel"},
)


def test_schedule_block_is_the_seed_block() -> None:
    """With an item and metadata, the block's lines joined are the documented text byte for byte."""
    block = schedule_block(
        intent="check in on how the user is feeling",
        check_type="reminder",
        fire_at_local="2026-05-02T09:00:00+08:00",
        item=VITAMIN_D,
        metadata={"campaign": "daily_checkin_v2"},
    )
    assert block.text.replace("\n", "") == SEED_BLOCK
    assert block.text == (
        "[PROACTIVE WAKEUP — SCHEDULED REMINDER]\n"
        "Why you're reaching out: check in on how the user is feeling\n"
        "Scheduled fire time (user's local): 2026-05-02T09:00:00+08:00\n"
        "Reference item (from inventory): Daily Vitamin D dosage: 1000 IU form: softgel "
        "timing_notes: take with food\n"
        "Additional context: campaign: daily_checkin_v2"
    )


def test_schedule_block_without_item_or_metadata() -> None:
    """No item and no metadata: both optional sections are omitted ("present only if")."""
    block = schedule_block(
        intent="check in on how the user is feeling",
        check_type="reminder",
        fire_at_local="2026-05-02T09:00:00+08:00",
        item=None,
        metadata=None,
    )
    assert block.text == (
        "[PROACTIVE WAKEUP — SCHEDULED REMINDER]\n"
        "Why you're reaching out: check in on how the user is feeling\n"
        "Scheduled fire time (user's local): 2026-05-02T09:00:00+08:00"
    )


def test_schedule_block_metadata_only_is_additional_context() -> None:
    """Metadata without an item renders every pair, sorted, as Additional context."""
    block = schedule_block(
        intent="remind the user to take their amoxicillin",
        check_type="reminder",
        fire_at_local="2026-05-01T08:00:00+08:00",
        item=None,
        metadata={"variant": "b", "reminder_category": "medication", "n": 3},
    )
    assert block.text.splitlines()[-1] == (
        "Additional context: n: 3 reminder_category: medication variant: b"
    )


def test_wakeup_block_with_all_fields() -> None:
    """The wakeup variant carries check type, UTC fire time, occasion, topic and description."""
    block = wakeup_block(
        intent="wish the user a happy birthday",
        check_type="birthday",
        fire_at=datetime(2026, 6, 15, 9, tzinfo=UTC),
        occasion="Sarah's 30th birthday",
        interest_topic="celebration and birthday traditions",
        event_description="User is turning 30 and wants a surprise party",
    )
    assert block.kind is SourceKind.WAKEUP
    assert block.text == (
        "[PROACTIVE WAKEUP — ONE-OFF WAKEUP]\n"
        "Why you're reaching out: wish the user a happy birthday\n"
        "Check type: birthday\n"
        "Scheduled fire time (UTC): 2026-06-15T09:00:00Z\n"
        "Occasion: Sarah's 30th birthday\n"
        "Interest topic: celebration and birthday traditions\n"
        "Event description: User is turning 30 and wants a surprise party"
    )


def test_wakeup_block_omits_unset_fields() -> None:
    """Unset optional wakeup fields produce no line at all."""
    block = wakeup_block(
        intent="remind the user about their dentist appointment",
        check_type="appointment_reminder",
        fire_at=datetime(2026, 5, 1, 2, tzinfo=UTC),
        occasion=None,
        interest_topic="",
        event_description=None,
    )
    assert block.text.splitlines() == [
        "[PROACTIVE WAKEUP — ONE-OFF WAKEUP]",
        "Why you're reaching out: remind the user about their dentist appointment",
        "Check type: appointment_reminder",
        "Scheduled fire time (UTC): 2026-05-01T02:00:00Z",
    ]


def test_event_block_with_metadata_and_messages() -> None:
    """The trigger-event variant: type, description, time, metadata, then the recent turns."""
    block = event_block(
        event_type="level_up",
        event_description="The user just reached level 25.",
        occurred_at=datetime(2026, 5, 2, 10, 30, tzinfo=UTC),
        metadata={"previous_level": "24", "new_level": "25"},
        language="en",
        messages=[{"role": "user", "content": "yes!"}, {"role": "assistant", "content": "gg"}],
    )
    assert block.text == (
        "[PROACTIVE WAKEUP — TRIGGER EVENT]\n"
        "Event type: level_up\n"
        "What happened: The user just reached level 25.\n"
        "Event time (UTC): 2026-05-02T10:30:00Z\n"
        "Additional context: new_level: 25 previous_level: 24\n"
        "Recent conversation:\n"
        "user: yes!\n"
        "assistant: gg"
    )
    assert block.check_type == "level_up"


def test_event_block_minimal_and_language() -> None:
    """Only the type is required; a non-default language is passed on to the composer."""
    block = event_block(
        event_type="order_shipped",
        event_description=None,
        occurred_at=datetime(2026, 5, 2, 10, 30, tzinfo=UTC),
        metadata=None,
        language="ja",
    )
    assert block.text.splitlines() == [
        "[PROACTIVE WAKEUP — TRIGGER EVENT]",
        "Event type: order_shipped",
        "Event time (UTC): 2026-05-02T10:30:00Z",
        "Reply in language: ja",
    ]


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (
            schedule_block(
                intent="check in on how the user is feeling",
                check_type="reminder",
                fire_at_local="2026-05-02T09:00:00+08:00",
                item=VITAMIN_D,
                metadata=None,
            ),
            "Check in on how the user is feeling. Daily Vitamin D (dosage: 1000 IU, "
            "form: softgel, timing_notes: take with food).",
        ),
        (
            wakeup_block(
                intent="wish the user a happy birthday",
                check_type="birthday",
                fire_at=datetime(2026, 6, 15, 9, tzinfo=UTC),
                occasion="Sarah's 30th birthday",
                interest_topic=None,
                event_description=None,
            ),
            "Wish the user a happy birthday. Occasion: Sarah's 30th birthday.",
        ),
        (
            event_block(
                event_type="level_up",
                event_description="The user just reached level 25",
                occurred_at=datetime(2026, 5, 2, tzinfo=UTC),
                metadata=None,
            ),
            "About your level up: The user just reached level 25.",
        ),
    ],
    ids=["schedule-with-item", "wakeup-with-occasion", "event"],
)
async def test_template_composer_is_deterministic(block: IntentBlock, expected: str) -> None:
    """The template composer renders the same text for the same block, with no network."""
    composer = TemplateComposer()
    assert await composer.compose(block) == expected
    assert await composer.compose(block) == expected
