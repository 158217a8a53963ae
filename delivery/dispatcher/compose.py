"""
Fire, wakeup or trigger event -> the intent block the agent receives.

Pure: no clock, no I/O. The shell (:mod:`delivery.dispatcher.process`,
:mod:`delivery.workbench`) reads the rows and hands plain values in.

Every block is one section per line. The Sonzai docs print the scheduled-reminder
block with its line breaks collapsed; joining our lines with ``""`` gives that
text byte for byte, which is what the golden tests check.
"""

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from delivery.cadence.instants import format_utc
from delivery.domain import IntentBlock, InventoryItem, SourceKind, scalar_text, sorted_pairs

SCHEDULE_HEADER = "[PROACTIVE WAKEUP — SCHEDULED REMINDER]"
"""The stable header an agent detects (as the Sonzai "Scheduled Reminders" docs show)."""
WAKEUP_HEADER = "[PROACTIVE WAKEUP — ONE-OFF WAKEUP]"
"""Our wakeup variant: the Sonzai "Wakeups" docs name the fields, not the header."""
EVENT_HEADER = "[PROACTIVE WAKEUP — TRIGGER EVENT]"
"""Our trigger-event variant of the header, for a Sonzai "TriggerEvent"."""


def _render_pairs(pairs: Sequence[tuple[str, str]]) -> str:
    return " ".join(f"{k}: {v}" for k, v in pairs)


def _item_line(item: InventoryItem | None) -> list[str]:
    # The Sonzai docs: "present only if inventory_item_id was set and the item still
    # exists. The item's label and all of its properties are included."
    if item is None:
        return []
    parts = [item.label] if item.label else []
    rendered = _render_pairs(item.pairs())
    if rendered:
        parts.append(rendered)
    return [f"Reference item (from inventory): {' '.join(parts)}"]


def _context_line(context: tuple[tuple[str, str], ...]) -> list[str]:
    # The Sonzai docs: "present only if metadata was set. All metadata key-value pairs".
    if not context:
        return []
    return [f"Additional context: {_render_pairs(context)}"]


def schedule_block(
    *,
    intent: str,
    check_type: str,
    fire_at_local: str,
    item: InventoryItem | None,
    metadata: Mapping[str, Any] | None,
) -> IntentBlock:
    """
    The scheduled-reminder block, exactly as the Sonzai "Scheduled Reminders" docs show it.

    Args:
        intent: the schedule's ``intent``, verbatim.
        check_type: the schedule's ``check_type`` (not rendered; the documented block has none).
        fire_at_local: the fire instant in the schedule's zone with its offset.
        item: the live inventory item, or ``None`` when unset or deleted.
        metadata: the schedule's ``metadata``, or ``None``.
    """
    context = sorted_pairs(metadata)
    lines = [
        SCHEDULE_HEADER,
        f"Why you're reaching out: {intent}",
        f"Scheduled fire time (user's local): {fire_at_local}",
        *_item_line(item),
        *_context_line(context),
    ]
    return IntentBlock(
        kind=SourceKind.SCHEDULE,
        text="\n".join(lines),
        intent=intent,
        check_type=check_type,
        fire_at_local=fire_at_local,
        item=item,
        context=context,
    )


def wakeup_block(
    *,
    intent: str,
    check_type: str,
    fire_at: datetime,
    occasion: str | None,
    interest_topic: str | None,
    event_description: str | None,
    item: InventoryItem | None = None,
) -> IntentBlock:
    """
    The one-off wakeup block: the scheduled-reminder layout plus the wakeup fields.

    The Sonzai "Wakeups" docs: the agent sees ``check_type`` as context, and
    ``occasion``, ``interest_topic`` and ``event_description`` "are included in
    the agent's wakeup block at fire time" when set. A wakeup has no zone, so
    its fire time is the authoritative UTC ``scheduled_at``.
    """
    fire_at_utc = format_utc(fire_at)
    details = tuple(
        (label, value)
        for label, value in (
            ("Occasion", occasion),
            ("Interest topic", interest_topic),
            ("Event description", event_description),
        )
        if value
    )
    lines = [
        WAKEUP_HEADER,
        f"Why you're reaching out: {intent}",
        f"Check type: {check_type}",
        f"Scheduled fire time (UTC): {fire_at_utc}",
        *(f"{label}: {value}" for label, value in details),
        *_item_line(item),
    ]
    return IntentBlock(
        kind=SourceKind.WAKEUP,
        text="\n".join(lines),
        intent=intent,
        check_type=check_type,
        fire_at_local=fire_at_utc,
        item=item,
        details=details,
    )


def event_block(
    *,
    event_type: str,
    event_description: str | None,
    occurred_at: datetime,
    metadata: Mapping[str, Any] | None,
    language: str | None = None,
    messages: Sequence[Mapping[str, Any]] = (),
) -> IntentBlock:
    """
    The trigger-event block: what happened, its string metadata, recent turns.

    The Sonzai "TriggerEvent" docs: ``event_description`` "is for the LLM", metadata
    is extra context, and ``messages`` ground the reaction in the conversation
    that just ended. ``language`` is rendered only when it is not the default
    ``en``.
    """
    context = sorted_pairs(metadata)
    occurred_utc = format_utc(occurred_at)
    details: list[tuple[str, str]] = [("Event type", event_type)]
    if event_description:
        details.append(("What happened", event_description))
    details.append(("Event time (UTC)", occurred_utc))
    if language and language != "en":
        details.append(("Reply in language", language))
    lines = [EVENT_HEADER, *(f"{label}: {value}" for label, value in details)]
    lines += _context_line(context)
    turns = [m for m in messages if m.get("content")]
    if turns:
        lines.append("Recent conversation:")
        lines += [
            f"{scalar_text(m.get('role', 'user'))}: {scalar_text(m['content'])}" for m in turns
        ]
    return IntentBlock(
        kind=SourceKind.EVENT,
        text="\n".join(lines),
        intent=event_description or "",
        check_type=event_type,
        fire_at_local=occurred_utc,
        context=context,
        details=tuple(details),
    )
