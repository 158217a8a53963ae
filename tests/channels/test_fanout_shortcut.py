"""
The channels worker's cheap path (issue "burst"), on SQLite and PostgreSQL: a batch in
which no user has a contact left to try costs one query that reads no payload, no
preferences and writes nothing; a mixed batch still sends to exactly the users with
contacts, reading full rows for only their notifications.

Statements are counted with a ``before_cursor_execute`` listener on the engine and, on
SQLite, on the raw connection of the store's driver-thread calls, so what is asserted
is what reached the database driver.
"""

import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.clock import ManualClock
from delivery.secrets import SecretBox
from delivery.settings import Settings
from delivery.store import direct
from delivery.store.channels import ATTEMPTS, ChannelStore
from delivery.store.sql import SqlStore
from handlers.channels_worker import ChannelsWorker, FanoutResult
from tests.api.notes import add_notifications, notification
from tests.handlers.channels.conftest import SmtpServer

A = "agent-1"


@dataclass
class Statements:
    """SQL the engine sent while :func:`statements` listened: (text, parameters)."""

    seen: list[tuple[str, Any]] = field(default_factory=list)

    def clear(self) -> None:
        self.seen.clear()

    def texts(self) -> list[str]:
        return [text for text, _ in self.seen]

    def mentioning(self, word: str) -> list[tuple[str, Any]]:
        return [(text, params) for text, params in self.seen if word in text]


class _Recording:
    """A raw ``sqlite3`` connection that notes each statement run on it, then runs it."""

    def __init__(self, db: sqlite3.Connection, log: Statements) -> None:
        self._db = db
        self._log = log

    def execute(self, text: str, params: Any = ()) -> sqlite3.Cursor:
        self._log.seen.append((text, params))
        return self._db.execute(text, params)

    def executemany(self, text: str, params: Any) -> sqlite3.Cursor:
        params = list(params)
        self._log.seen.append((text, params))
        return self._db.executemany(text, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


@pytest.fixture
def statements(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> Iterator[Statements]:
    """
    Every statement executed on ``engine`` (the worker's store shares it): through
    SQLAlchemy, and on SQLite also those the store runs on the driver's thread
    itself (:mod:`delivery.store.direct`), which SQLAlchemy's events do not see.
    """
    log = Statements()

    def record(
        conn: object, cursor: object, text: str, params: Any, context: object, many: bool
    ) -> None:
        log.seen.append((text, params))

    on_thread = direct.on_driver_thread

    async def recorded(conn: Any, fn: Callable[[Any], Any]) -> Any:
        return await on_thread(conn, lambda db: fn(_Recording(db, log)))

    monkeypatch.setattr(direct, "on_driver_thread", recorded)
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        yield log
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)


@pytest.fixture
async def worker(
    engine: AsyncEngine, tmp_path: Path, plain_smtp: SmtpServer, clock: ManualClock
) -> AsyncIterator[ChannelsWorker]:
    """A bounded-mode worker whose only provider is a real local SMTP server."""
    settings = Settings(
        subject_prefix="test",
        data_dir=tmp_path,
        nats_url="",
        smtp_host="127.0.0.1",
        smtp_port=plain_smtp.port,
        smtp_security="plain",
        smtp_from="agent@mail.example.com",
    )
    made = ChannelsWorker(settings, engine, clock=clock, rand=lambda: 0.5)
    try:
        yield made
    finally:
        await made.stop()


@pytest.fixture
async def alpha(
    engine: AsyncEngine, clock: ManualClock, tmp_path: Path
) -> tuple[str, ChannelStore]:
    """
    Project alpha's id and the channel store both tests write contacts through, with
    the worker's key (the key file in the same data folder).
    """
    project = (await SqlStore(engine).keys.ensure_project("alpha", clock.now())).id
    box = SecretBox.from_settings(Settings(data_dir=tmp_path))
    return project, ChannelStore(engine, secrets=box)


async def _attempt_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one())


async def _notes(
    engine: AsyncEngine, project: str, users: list[str], clock: ManualClock, first: int = 0
) -> list[dict[str, Any]]:
    rows = [notification(project, A, user, first + i, clock.now()) for i, user in enumerate(users)]
    await add_notifications(engine, rows)
    return rows


async def test_batch_without_contacts_costs_one_read(
    engine: AsyncEngine,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    statements: Statements,
    alpha: tuple[str, ChannelStore],
) -> None:
    """No user with a usable contact: one SELECT, no payload, no preferences, no write."""
    project, store = alpha
    # A disabled contact is not one to try, yet preferences exist: neither is read.
    dead, _ = await store.add_contact(
        project, A, "user-dead", kind="email", destination="dead@example.com",
        opted_out=False, now=clock.now(),
    )  # fmt: skip
    await store.disable_contact(dead["id"], "mailbox does not exist", clock.now())
    await store.put_preferences(project, A, "user-0", {"*": ["email"]}, clock.now())
    users = [f"user-{i}" for i in range(20)] + ["user-dead"]
    rows = await _notes(engine, project, users, clock)
    # Another project's user with a contact must not make this batch "reachable".
    other = (await SqlStore(engine).keys.ensure_project("beta", clock.now())).id
    await store.add_contact(
        other, A, "user-0", kind="email", destination="beta@example.com",
        opted_out=False, now=clock.now(),
    )  # fmt: skip
    statements.clear()

    result = await worker.fan_out([r["id"] for r in rows] + ["msg_unknown"])

    assert result == FanoutResult(notifications=len(rows))
    assert len(statements.seen) == 1, statements.texts()
    (text,) = statements.texts()
    assert text.lstrip().upper().startswith("SELECT")
    for absent in ("payload_json", "generated_message", "channel_preferences", "INSERT"):
        assert absent not in text, f"{absent} in {text}"
    assert plain_smtp.sink.envelopes == []
    assert await _attempt_count(engine) == 0


async def test_mixed_batch_sends_exactly_to_users_with_contacts(
    engine: AsyncEngine,
    worker: ChannelsWorker,
    clock: ManualClock,
    plain_smtp: SmtpServer,
    statements: Statements,
    alpha: tuple[str, ChannelStore],
) -> None:
    """Only users with contacts get mail and attempts; only their rows are read in full."""
    project, store = alpha
    for user, destination, opted_out in [
        ("user-1", "one@example.com", False),
        ("user-4", "four@example.com", False),
        ("user-4", "four-quiet@example.com", True),
    ]:
        await store.add_contact(
            project, A, user, kind="email", destination=destination, opted_out=opted_out,
            now=clock.now(),
        )  # fmt: skip
        clock.advance(timedelta(seconds=1))
    rows = await _notes(engine, project, [f"user-{i}" for i in range(6)], clock)
    # A consumed notification of a user with a contact: found, but not pending.
    (read,) = await _notes(engine, project, ["user-1"], clock, first=100)
    await SqlStore(engine).notifications.consume_notification(project, A, read["id"], clock.now())
    ids = [r["id"] for r in [*rows, read]]
    statements.clear()

    result = await worker.fan_out(ids)

    assert (result.notifications, result.sent, result.skipped, result.failed) == (6, 2, 1, 0)
    assert sorted(e.rcpt_tos[0] for e in plain_smtp.sink.envelopes) == [
        "four@example.com",
        "one@example.com",
    ]
    attempts = [
        (a["user_id"], a["notification_id"], a["status"], a["reason"])
        for user in ("user-1", "user-4")
        for a in await store.list_attempts(project, A, user, notification_id=None, limit=9)
    ]
    assert sorted(attempts) == [
        ("user-1", rows[1]["id"], "sent", ""),
        ("user-4", rows[4]["id"], "sent", ""),
        ("user-4", rows[4]["id"], "skipped", "opted_out"),
    ]
    assert await _attempt_count(engine) == 3, "no attempt for users without contacts"
    # Full rows were read only for the pending notifications of users with contacts.
    (full,) = statements.mentioning("payload_json")
    assert set(_flatten(full[1])) == {rows[1]["id"], rows[4]["id"]}

    # A redelivery of the batch: every contact already has its attempt, so it is the
    # cheap path again, and nothing is sent twice.
    statements.clear()
    again = await worker.fan_out(ids)
    assert again == FanoutResult(notifications=6)
    assert len(statements.seen) == 1, statements.texts()
    assert plain_smtp.sink.count == 2
    assert await _attempt_count(engine) == 3

    # A contact added later is tried for the notifications already fanned out.
    await store.add_contact(
        project, A, "user-2", kind="email", destination="two@example.com",
        opted_out=False, now=clock.now(),
    )  # fmt: skip
    late = await worker.fan_out(ids)
    assert (late.notifications, late.sent) == (6, 1)
    assert plain_smtp.sink.envelopes[-1].rcpt_tos == ["two@example.com"]


def _flatten(params: Any) -> list[Any]:
    """The scalar values of a statement's parameters (tuple, list or dict, any driver)."""
    if isinstance(params, dict):
        return [v for value in params.values() for v in _flatten(value)]
    if isinstance(params, list | tuple):
        return [v for value in params for v in _flatten(value)]
    return [params]
