"""
On SQLite the channel store reads a fan-out batch and writes its attempts on the
driver's thread with its own statements; PostgreSQL takes the SQLAlchemy path. Both
paths run here on the same SQLite file and must read, and write, the same rows.
"""

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store import direct
from delivery.store.channels import ATTEMPTS, AttemptRecord, ChannelStore, FanoutInputs
from delivery.store.sql import SqlStore
from delivery.store.tables import CHANNEL_FALLBACKS
from tests.api.notes import add_notifications, notification

T = datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
A = "agent-1"


def _general(store: ChannelStore, box: SecretBox) -> ChannelStore:
    """The same store taking the portable (SQLAlchemy) path on the same engine."""
    twin = ChannelStore(store.engine, secrets=box)
    twin.capabilities = dataclasses.replace(store.capabilities, driver_thread=False)
    return twin


def _plain(inputs: FanoutInputs) -> dict[str, Any]:
    """``inputs`` with every row as a plain dict, comparable whichever path read it."""
    return {
        "statuses": inputs.statuses,
        "notifications": {k: dict(v) for k, v in inputs.notifications.items()},
        "contacts": {k: [dict(c) for c in v] for k, v in inputs.contacts.items()},
        "preferences": inputs.preferences,
        "attempted": inputs.attempted,
        "fallbacks": inputs.fallbacks,
        "channelled": inputs.channelled,
    }


def _attempt(project: str, note: dict[str, Any], contact: str | None, status: str) -> AttemptRecord:
    return AttemptRecord(
        project_id=project,
        notification_id=note["id"],
        agent_id=A,
        user_id=note["user_id"],
        kind="email",
        contact_id=contact,
        destination="someone@example.com",
        status=status,
        reason="" if status == "sent" else "smtp 451",
        response_code=250 if status == "sent" else 451,
        duration_ms=12,
        attempt_number=1,
        next_attempt_at=None if status == "sent" else T + timedelta(minutes=5),
        created_at=T,
    )


def _fallback(project: str, note: dict[str, Any]) -> dict[str, Any]:
    """A ``channel_fallbacks`` row for ``note``: email first, then SMS."""
    return {
        "notification_id": note["id"],
        "project_id": project,
        "agent_id": A,
        "user_id": note["user_id"],
        "order_json": '["email","sms"]',
        "step": 0,
        "attempt_number": 1,
        "step_deadline": T + timedelta(minutes=10),
        "next_attempt_at": T + timedelta(minutes=10),
        "claim": None,
        "sending": False,
        "status": "active",
        "decisions_json": "[]",
        "created_at": T,
        "updated_at": T,
    }


async def test_a_fanout_batch_reads_the_same_on_both_paths(sqlite: AsyncEngine, tmp_path: Path):
    project = (await SqlStore(sqlite).keys.ensure_project("alpha", T)).id
    box = SecretBox.from_settings(Settings(data_dir=tmp_path))
    store = ChannelStore(sqlite, secrets=box)
    contacts = {}
    for user, destination, opted_out in [
        ("user-1", "one@example.com", False),
        ("user-2", "two@example.com", False),
        ("user-2", "two-quiet@example.com", True),
        ("user-3", "three@example.com", False),
    ]:
        made, _ = await store.add_contact(
            project, A, user, kind="email", destination=destination, opted_out=opted_out, now=T
        )
        contacts[destination] = made["id"]
    await store.disable_contact(contacts["three@example.com"], "mailbox does not exist", T)
    await store.put_preferences(project, A, "user-2", {"*": ["email"]}, T)
    notes = [notification(project, A, f"user-{i}", i, T) for i in range(5)]
    await add_notifications(sqlite, notes)
    await SqlStore(sqlite).notifications.consume_notification(project, A, notes[0]["id"], T)
    # user-2's first contact was tried for its message, the second not yet.
    await store.record_attempts([_attempt(project, notes[2], contacts["two@example.com"], "sent")])
    # More ids than one statement may bind: the batch's messages are in its second chunk.
    unknown = [f"msg_unknown_{i}" for i in range(direct.MAX_VARIABLES + 50)]
    ids = unknown + [n["id"] for n in notes]

    direct_read = await store.fanout_inputs(ids)
    general_read = await _general(store, box).fanout_inputs(ids)

    assert _plain(direct_read) == _plain(general_read)
    # Not two empty answers: user-1 and user-2 have contacts left to try.
    assert sorted(direct_read.notifications) == sorted([notes[1]["id"], notes[2]["id"]])
    assert direct_read.attempted == {notes[2]["id"]: {contacts["two@example.com"]}}


async def test_attempts_are_written_the_same_on_both_paths(sqlite: AsyncEngine, tmp_path: Path):
    project = (await SqlStore(sqlite).keys.ensure_project("alpha", T)).id
    box = SecretBox.from_settings(Settings(data_dir=tmp_path))
    store = ChannelStore(sqlite, secrets=box)
    # One user's four messages: the rows of two paths differ in nothing but their ids.
    notes = [notification(project, A, "user-1", i, T) for i in range(4)]
    await add_notifications(sqlite, notes)
    # One retry queue entry per path, each answered by the batch written after it.
    await store.record_attempts([_attempt(project, notes[0], "con_a", "failed")])
    await store.record_attempts([_attempt(project, notes[1], "con_a", "failed")])
    async with sqlite.connect() as conn:
        queued = {
            r.notification_id: r.id
            for r in await conn.execute(select(ATTEMPTS.c.notification_id, ATTEMPTS.c.id))
        }

    await store.record_attempts(
        [
            _attempt(project, notes[2], "con_b", "sent"),
            _attempt(project, notes[2], None, "skipped"),
        ],
        retried_id=queued[notes[0]["id"]],
        fallbacks=[_fallback(project, notes[2])],
    )
    await _general(store, box).record_attempts(
        [
            _attempt(project, notes[3], "con_b", "sent"),
            _attempt(project, notes[3], None, "skipped"),
        ],
        retried_id=queued[notes[1]["id"]],
        fallbacks=[_fallback(project, notes[3])],
    )

    async with sqlite.connect() as conn:
        rows = [dict(r) for r in (await conn.execute(select(ATTEMPTS))).mappings()]
    by_note: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        assert row.pop("id").startswith("cha_")
        by_note.setdefault(row.pop("notification_id"), []).append(row)

    def ordered(note: dict[str, Any]) -> list[dict[str, Any]]:
        return sorted(by_note[note["id"]], key=lambda r: r["status"])

    assert ordered(notes[2]) == ordered(notes[3])
    assert len(ordered(notes[2])) == 2
    async with sqlite.connect() as conn:
        fallbacks = {
            r["notification_id"]: {k: v for k, v in r.items() if k != "notification_id"}
            for r in (await conn.execute(select(CHANNEL_FALLBACKS))).mappings()
        }
    assert fallbacks[notes[2]["id"]] == fallbacks[notes[3]["id"]]
    # Each path cleared the retry queue entry it answered, and only that one.
    assert ordered(notes[0]) == ordered(notes[1])
    assert [r["next_attempt_at"] for r in ordered(notes[0])] == [None]
