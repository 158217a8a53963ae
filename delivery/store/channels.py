"""
Persistence for push, email and SMS: contacts, channel preferences, notification channels and the
channel attempts log (which is also the durable retry queue).

Every tenant-facing method takes the caller's ``project_id`` and filters on it, so a
foreign id behaves exactly like an unknown one. Writes run in one
transaction each through :meth:`SqlStore.write` (``BEGIN IMMEDIATE`` on SQLite).
Channel secrets never reach a row in clear: :class:`ChannelConfigCodec` splits them
out of the config and seals them with :class:`delivery.secrets.SecretBox`. Nor do
contact destinations: a row holds the sealed destination and its keyed digest
(:func:`contact_digest`), and every contact read returns it opened, under the
``destination`` key, as before.
"""

import json
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Final

import structlog
from sqlalchemy import (
    ColumnElement,
    Select,
    TextClause,
    and_,
    delete,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from delivery.errors import InvalidContactError
from delivery.secrets import LazySecretBox, SecretBox, SecretDecryptError
from delivery.store import direct
from delivery.store.common import (
    StoreBase,
    canonical_json,
    insert_ignoring_duplicates,
    new_id,
    owned,
)
from delivery.store.engine import any_row
from delivery.store.tables import CHANNEL_ATTEMPTS as ATTEMPTS
from delivery.store.tables import CHANNEL_FALLBACKS as FALLBACKS
from delivery.store.tables import CHANNELS, CONTACTS, NOTIFICATIONS, PREFERENCES

MAX_CONTACTS_PER_USER: Final = 50
"""Bounds one fan-out (and one user's rows): far above any real user's devices."""

MASK: Final = "****"
_SECRET_WORDS: Final = ("secret", "password", "token", "api_key", "apikey", "auth")
_log = structlog.get_logger(__name__)

type ContactMapping = Mapping[str, Any]
"""A contact as the store returns it: the row's columns, ``destination`` opened."""


def contact_digest(
    box: SecretBox, project_id: str, agent_id: str, user_id: str, kind: str, destination: str
) -> str:
    """
    The unique key of a normalised destination of one user: the box's keyed digest of
    the owner, the kind and the destination. The owner is part of it so that equal
    destinations of two users cannot be matched by their digests either.
    """
    return box.digest(json.dumps([project_id, agent_id, user_id, kind, destination]))


def is_secret_key(key: str) -> bool:
    """True for config keys whose values are credentials (``api_key``, ``secret``, ...)."""
    lowered = key.lower()
    return any(word in lowered for word in _SECRET_WORDS)


def mask(value: Any) -> str:
    """
    The masked form of a secret: ``****`` plus its last four characters when it is long
    enough (16+) that four characters reveal nothing useful, else just ``****``.
    """
    text = value if isinstance(value, str) else json.dumps(value)
    return f"{MASK}{text[-4:]}" if len(text) >= 16 else MASK


@dataclass(frozen=True, slots=True)
class SealedConfig:
    """A channel config as stored: non-secret keys in clear, secret keys sealed."""

    config_json: str
    secrets_enc: str | None


class ChannelConfigCodec:
    """
    Splits a channel config into clear and sealed parts, and masks or opens it on read.

    Args:
        box: the deployment's :class:`SecretBox` (``DELIVERY_SECRET_KEY`` or the key file).
    """

    def __init__(self, box: SecretBox) -> None:
        self._box = box

    def seal(self, config: Mapping[str, Any]) -> SealedConfig:
        """Store form of ``config``: secret keys are removed from the JSON and sealed."""
        plain = {k: v for k, v in config.items() if not is_secret_key(k)}
        secret = {k: v for k, v in config.items() if is_secret_key(k)}
        sealed = self._box.seal(canonical_json(secret)) if secret else None
        return SealedConfig(canonical_json(plain), sealed)

    def secrets(self, secrets_enc: str | None) -> dict[str, Any]:
        """
        The sealed part in clear (for delivery only, never for a response).

        Raises:
            delivery.secrets.SecretDecryptError: another key sealed it.
        """
        if not secrets_enc:
            return {}
        opened: dict[str, Any] = json.loads(self._box.open(secrets_enc))
        return opened

    def full(self, row: RowMapping) -> dict[str, Any]:
        """The whole config in clear, for delivery."""
        config: dict[str, Any] = json.loads(row["config_json"])
        config.update(self.secrets(row["secrets_enc"]))
        return config

    def masked(self, row: RowMapping) -> dict[str, Any]:
        """The config as every read shows it: secret values replaced by :func:`mask`."""
        config: dict[str, Any] = json.loads(row["config_json"])
        for key, value in self.secrets(row["secrets_enc"]).items():
            config[key] = mask(value)
        return config

    def merge_masked(self, new: Mapping[str, Any], old_secrets_enc: str | None) -> dict[str, Any]:
        """
        ``new`` with every secret value that is still the masked form of the stored one
        replaced by the stored secret: a client that reads a channel and writes it back
        (PUT is a full replace) must not overwrite a secret with its mask.
        """
        old = self.secrets(old_secrets_enc)
        merged = dict(new)
        for key, value in new.items():
            if key in old and is_secret_key(key) and value == mask(old[key]):
                merged[key] = old[key]
        return merged


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One channel attempt to insert (column names of ``channel_attempts``)."""

    project_id: str
    notification_id: str
    agent_id: str
    user_id: str
    kind: str
    contact_id: str | None
    destination: str
    status: str
    reason: str
    response_code: int
    duration_ms: int
    attempt_number: int
    next_attempt_at: datetime | None
    created_at: datetime
    channel_id: str | None = None

    def values(self) -> dict[str, Any]:
        """The row to insert, with a fresh ``cha_`` id."""
        return dict(zip(ATTEMPT_COLUMNS, self.row(), strict=True))

    def row(self) -> tuple[Any, ...]:
        """:meth:`values` as a tuple in :data:`ATTEMPT_COLUMNS` order (no dict per row)."""
        return (
            new_id("cha"),
            self.project_id,
            self.notification_id,
            self.agent_id,
            self.user_id,
            self.kind,
            self.contact_id,
            self.channel_id,
            self.destination[:255],
            self.status,
            self.reason,
            self.response_code,
            self.duration_ms,
            self.attempt_number,
            self.next_attempt_at,
            self.created_at,
        )


ATTEMPT_COLUMNS: Final = (
    "id",
    "project_id",
    "notification_id",
    "agent_id",
    "user_id",
    "kind",
    "contact_id",
    "channel_id",
    "destination",
    "status",
    "reason",
    "response_code",
    "duration_ms",
    "attempt_number",
    "next_attempt_at",
    "created_at",
)
"""The columns of :meth:`AttemptRecord.row`, in its order."""


@dataclass(frozen=True, slots=True)
class OpenedChannel:
    """A project channel to send to: its row's id, type, events and filter, and its
    whole config in clear (``None`` when this server's key does not open its secrets)."""

    id: str
    project_id: str
    type: str
    events: list[str]
    filter: dict[str, Any] | None
    config: dict[str, Any] | None


type UserKey = tuple[str, str, str]
"""(project_id, agent_id, user_id)."""


@dataclass(frozen=True, slots=True)
class FanoutInputs:
    """
    What :meth:`ChannelStore.fanout_inputs` read for one batch.

    ``statuses`` names every notification found; ``notifications`` holds the full rows
    of only the pending ones whose user has a contact left to try, and ``contacts``,
    ``preferences`` and ``attempted`` cover only those.
    """

    statuses: dict[str, str]
    notifications: dict[str, Mapping[Any, Any]]
    contacts: dict[UserKey, list[ContactMapping]]
    preferences: dict[UserKey, dict[str, list[str]]]
    attempted: dict[str, set[str]]
    fallbacks: set[str] = field(default_factory=set)
    """Those with a channel fallback row: their fan-out is done, the row goes on."""

    channelled: tuple[str, ...] = ()
    """Pending notifications whose project has an active notification channel."""


@dataclass(frozen=True, slots=True)
class FallbackStep:
    """
    A fallback row's next state, written with the sends' attempts
    (:meth:`ChannelStore.finish_fallback_step`) or before a send
    (:meth:`ChannelStore.begin_fallback_step`).
    """

    status: str
    step: int
    attempt_number: int
    step_deadline: datetime
    next_attempt_at: datetime | None
    decisions_json: str


def _chunks[T](items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


_SQLITE_CLEAR_RETRY = "UPDATE channel_attempts SET next_attempt_at = NULL WHERE id = ?"


def _sqlite_record(
    attempts: direct.PreparedInsert,
    fallbacks: direct.PreparedInsert,
    retried_id: str | None,
    db: sqlite3.Connection,
) -> None:
    """
    :meth:`ChannelStore.record_attempts` on SQLite, in one call to the driver's thread
    inside the write transaction: the same statements, in the same order.
    """
    attempts.run(db)
    fallbacks.run(db)
    if retried_id is not None:
        db.execute(_SQLITE_CLEAR_RETRY, (retried_id,))


def _fanout_probe(which: ColumnElement[bool] | TextClause) -> Select[str, str, bool, bool]:
    """
    The first read of :meth:`ChannelStore.fanout_inputs` for the notifications ``which``
    picks: each one's id and status, whether its user has an active contact it was not
    yet attempted to (``reachable``), and whether its project has an active
    notification channel (``channelled``).
    """
    n, c, a, ch = NOTIFICATIONS.c, CONTACTS.c, ATTEMPTS.c, CHANNELS.c
    # The same filter as the worker applies to the rows read after it: active, and no
    # attempt for this notification yet (ix_contacts_owner and
    # ix_channel_attempts_notification answer both subqueries). The inner one is
    # correlated explicitly: auto-correlation reaches only the enclosing select, so
    # ``notifications`` would otherwise be joined in again, unfiltered.
    untried = ~(
        select(a.id)
        .where(a.notification_id == n.id, a.contact_id == c.id)
        .correlate_except(ATTEMPTS)
        .exists()
    )
    reachable = (
        select(c.id)
        .where(
            c.project_id == n.project_id,
            c.agent_id == n.agent_id,
            c.user_id == n.user_id,
            c.disabled.is_(False),
            untried,
        )
        .exists()
        .label("reachable")
    )
    # Most projects have no channel (ix_notification_channels_project).
    channelled = (
        select(ch.id)
        .where(ch.project_id == n.project_id, ch.active.is_(True))
        .exists()
        .label("channelled")
    )
    return select(n.id, n.status, reachable, channelled).where(which)


_SQLITE_PROBE: Final = str(
    _fanout_probe(text("notifications.id IN ({marks})")).compile(dialect=sqlite_dialect())
)
"""The probe as SQLAlchemy renders it for SQLite, with the id list's marks to format in."""
_SQLITE_CONTACTS = (
    "SELECT {columns} FROM contacts WHERE (project_id, agent_id, user_id) IN (VALUES {owners}) "
    "AND disabled IS 0 ORDER BY created_at, id"
)
_SQLITE_PREFERENCES = (
    "SELECT project_id, agent_id, user_id, preferences_json FROM channel_preferences "
    "WHERE (project_id, agent_id, user_id) IN (VALUES {owners})"
)
_SQLITE_ATTEMPTED = (
    "SELECT notification_id, contact_id FROM channel_attempts "
    "WHERE notification_id IN ({marks}) AND contact_id IS NOT NULL"
)
_SQLITE_FALLBACKS = (
    "SELECT notification_id FROM channel_fallbacks WHERE notification_id IN ({marks})"
)
_OWNERS_PER_QUERY: Final = direct.MAX_VARIABLES // 3


@dataclass(slots=True)
class _FanoutRows:
    """
    What a fan-out batch's reads found, on either path (:func:`_sqlite_fanout_reads`,
    :func:`_fanout_reads`): rows as mappings, destinations still sealed.
    """

    probe: list[tuple[str, str, Any, Any]]
    """(id, status, reachable, channelled); SQLite answers the two flags 0/1."""
    notes: list[Mapping[Any, Any]] = field(default_factory=list)
    contacts: list[Mapping[Any, Any]] = field(default_factory=list)
    preferences: list[tuple[str, str, str, str]] = field(default_factory=list)
    attempted: list[tuple[str, str]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)

    def wanted(self) -> list[str]:
        """The pending notifications whose user has a contact left to try."""
        # Only pending notifications are sent (one already read by polling gets no
        # push), so a consumed one is never worth its full row.
        return [nid for nid, status, reach, _ in self.probe if status == "pending" and reach]

    def owners(self) -> list[UserKey]:
        """The users of :attr:`notes`, sorted."""
        return sorted({(r["project_id"], r["agent_id"], r["user_id"]) for r in self.notes})


def _in_chunks(db: sqlite3.Connection, sql: str, values: Sequence[str]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(values, direct.MAX_VARIABLES):
        rows.extend(db.execute(sql.format(marks=direct.marks(len(chunk))), chunk).fetchall())
    return rows


def _by_owner(db: sqlite3.Connection, sql: str, keys: Sequence[UserKey]) -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = []
    for chunk in _chunks(keys, _OWNERS_PER_QUERY):
        owners = ",".join(["(?,?,?)"] * len(chunk))
        params = [part for key in chunk for part in key]
        rows.extend(db.execute(sql.format(owners=owners), params).fetchall())
    return rows


def _sqlite_fanout_reads(notification_ids: Sequence[str], db: sqlite3.Connection) -> _FanoutRows:
    """
    :meth:`ChannelStore.fanout_inputs`' reads on SQLite, in one call to the driver's
    thread: the same statements as its SQLAlchemy path, without a loop round trip and
    SQLAlchemy's compiling and row processing per statement (through SQLAlchemy the
    batch's reads were about a tenth of the channels worker's CPU in
    ``bench/bench_channels_worker.py``). As there, no transaction spans the reads:
    pysqlite opens none for a ``SELECT``.
    """
    read = _FanoutRows(_in_chunks(db, _SQLITE_PROBE, notification_ids))
    wanted = read.wanted()
    if not wanted:
        return read
    read.notes = list(direct.select_in(db, NOTIFICATIONS, "id", wanted))
    keys = read.owners()
    contacts = direct.codec(CONTACTS)
    columns = ",".join(f'"{name}"' for name in contacts.columns)
    read.contacts = [
        contacts.row(values)
        for values in _by_owner(
            db, _SQLITE_CONTACTS.format(columns=columns, owners="{owners}"), keys
        )
    ]
    read.preferences = [tuple(r) for r in _by_owner(db, _SQLITE_PREFERENCES, keys)]
    read.attempted = [tuple(r) for r in _in_chunks(db, _SQLITE_ATTEMPTED, wanted)]
    read.fallbacks = [r[0] for r in _in_chunks(db, _SQLITE_FALLBACKS, wanted)]
    return read


async def _fanout_reads(conn: AsyncConnection, notification_ids: Sequence[str]) -> _FanoutRows:
    """:meth:`ChannelStore.fanout_inputs`' reads through SQLAlchemy (PostgreSQL)."""
    n, c, p, a, f = NOTIFICATIONS.c, CONTACTS.c, PREFERENCES.c, ATTEMPTS.c, FALLBACKS.c
    probe = await conn.execute(_fanout_probe(n.id.in_(notification_ids)))
    read = _FanoutRows([(nid, status, reach, chan) for nid, status, reach, chan in probe])
    wanted = read.wanted()
    if not wanted:
        return read
    notes = await conn.execute(select(NOTIFICATIONS).where(n.id.in_(wanted)))
    read.notes = list(notes.mappings())
    for chunk in _chunks(read.owners(), 500):
        owner = tuple_(c.project_id, c.agent_id, c.user_id).in_(chunk)
        contacts = await conn.execute(
            select(CONTACTS).where(owner, c.disabled.is_(False)).order_by(c.created_at, c.id)
        )
        read.contacts.extend(contacts.mappings())
        preferences = await conn.execute(
            select(p.project_id, p.agent_id, p.user_id, p.preferences_json).where(
                tuple_(p.project_id, p.agent_id, p.user_id).in_(chunk)
            )
        )
        read.preferences.extend((r[0], r[1], r[2], r[3]) for r in preferences)
    attempted = await conn.execute(
        select(a.notification_id, a.contact_id).where(
            a.notification_id.in_(wanted), a.contact_id.is_not(None)
        )
    )
    read.attempted = [(nid, cid) for nid, cid in attempted]
    fallbacks = await conn.execute(select(f.notification_id).where(f.notification_id.in_(wanted)))
    read.fallbacks = list(fallbacks.scalars())
    return read


class ChannelStore(StoreBase):
    """
    Contacts, preferences, project channels and channel attempts over one engine
    (the schema must exist).

    The store never closes the engine; its owner does.

    Args:
        engine: the database.
        secrets: the deployment's box, which seals and opens contact destinations;
            a :class:`LazySecretBox` is built only when a contact is first written
            or read. Contact methods raise ``RuntimeError`` without one.
    """

    def __init__(
        self, engine: AsyncEngine, *, secrets: SecretBox | LazySecretBox | None = None
    ) -> None:
        super().__init__(engine)
        self._postgres = engine.dialect.name == "postgresql"
        self._secrets = secrets

    async def _box(self) -> SecretBox:
        if self._secrets is None:
            raise RuntimeError("this ChannelStore has no SecretBox: contacts need one")
        if isinstance(self._secrets, LazySecretBox):
            return await self._secrets.get()
        return self._secrets

    @staticmethod
    def _opened(box: SecretBox, row: Mapping[Any, Any], *, strict: bool) -> dict[str, Any]:
        """
        ``row`` with ``destination`` in clear in place of ``destination_enc``.

        ``strict`` (delivery) raises :class:`SecretDecryptError` for a destination this
        key does not open; otherwise (API reads) it shows as :data:`MASK` and is
        logged, so a changed key does not make a user's contacts unlistable or
        undeletable.
        """
        contact = dict(row)
        sealed = contact.pop("destination_enc")
        try:
            contact["destination"] = box.open(sealed)
        except SecretDecryptError:
            if strict:
                raise
            _log.error("contacts.destination_undecryptable", contact_id=row["id"])
            contact["destination"] = MASK
        return contact

    # --- contacts ---------------------------------------------------------------

    async def add_contact(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        *,
        kind: str,
        destination: str,
        opted_out: bool,
        now: datetime,
    ) -> tuple[ContactMapping, bool]:
        """
        Add a normalised destination, or update it when it already exists.

        Adding an existing destination sets its ``opted_out`` and re-enables it if a
        provider had disabled it: an app re-registers a token it was given again.

        Returns:
            The contact and whether it was created.

        Raises:
            InvalidContactError: the user already has :data:`MAX_CONTACTS_PER_USER`.
        """
        c = CONTACTS.c
        box = await self._box()
        digest = contact_digest(box, project_id, agent_id, user_id, kind, destination)
        # Sealed before the transaction, not while it holds SQLite's one writer.
        sealed = box.seal(destination)
        owner = and_(*owned(CONTACTS, project_id, agent_id=agent_id, user_id=user_id))
        async with self.write() as conn:
            changed = await conn.execute(
                update(CONTACTS)
                .where(owner, c.kind == kind, c.destination_hash == digest)
                .values(
                    opted_out=opted_out,
                    disabled=False,
                    disabled_reason=None,
                    disabled_at=None,
                    updated_at=now,
                )
            )
            created = not changed.rowcount
            if created:
                count = (
                    await conn.execute(select(func.count()).select_from(CONTACTS).where(owner))
                ).scalar_one()
                if count >= MAX_CONTACTS_PER_USER:
                    raise InvalidContactError(
                        "destination",
                        f"a user can have at most {MAX_CONTACTS_PER_USER} contacts; "
                        "remove one first",
                    )
                await insert_ignoring_duplicates(
                    conn,
                    CONTACTS,
                    [
                        {
                            "id": new_id("ct"),
                            "project_id": project_id,
                            "agent_id": agent_id,
                            "user_id": user_id,
                            "kind": kind,
                            "destination_enc": sealed,
                            "destination_hash": digest,
                            "opted_out": opted_out,
                            "disabled": False,
                            "disabled_reason": None,
                            "disabled_at": None,
                            "created_at": now,
                            "updated_at": now,
                        }
                    ],
                    unique=["project_id", "agent_id", "user_id", "kind", "destination_hash"],
                )
            row = (
                (
                    await conn.execute(
                        select(CONTACTS).where(owner, c.kind == kind, c.destination_hash == digest)
                    )
                )
                .mappings()
                .one()
            )
        return self._opened(box, row, strict=False), created

    async def list_contacts(
        self, project_id: str, agent_id: str, user_id: str
    ) -> list[ContactMapping]:
        """A user's contacts, oldest first (disabled and opted-out ones included)."""
        c = CONTACTS.c
        stmt = (
            select(CONTACTS)
            .where(*owned(CONTACTS, project_id, agent_id=agent_id, user_id=user_id))
            .order_by(c.created_at, c.id)
        )
        async with self.read() as conn:
            rows = (await conn.execute(stmt)).mappings().all()
        if not rows:
            return []
        box = await self._box()
        return [self._opened(box, row, strict=False) for row in rows]

    async def get_contact(
        self, project_id: str, agent_id: str, user_id: str, contact_id: str
    ) -> ContactMapping | None:
        """One contact, or ``None`` (unknown or another owner's)."""
        stmt = select(CONTACTS).where(
            *owned(CONTACTS, project_id, agent_id=agent_id, user_id=user_id, id=contact_id)
        )
        async with self.read() as conn:
            row = (await conn.execute(stmt)).mappings().one_or_none()
        return None if row is None else self._opened(await self._box(), row, strict=False)

    async def set_opted_out(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        contact_id: str,
        *,
        opted_out: bool,
        now: datetime,
    ) -> ContactMapping | None:
        """Set a contact's opt-out flag; ``None`` when there is no such contact."""
        owner = and_(
            *owned(CONTACTS, project_id, agent_id=agent_id, user_id=user_id, id=contact_id)
        )
        async with self.write() as conn:
            await conn.execute(
                update(CONTACTS).where(owner).values(opted_out=opted_out, updated_at=now)
            )
            row = (await conn.execute(select(CONTACTS).where(owner))).mappings().one_or_none()
        return None if row is None else self._opened(await self._box(), row, strict=False)

    async def delete_contact(
        self, project_id: str, agent_id: str, user_id: str, contact_id: str
    ) -> bool:
        """Remove a contact; ``False`` when there was none."""
        async with self.write() as conn:
            result = await conn.execute(
                delete(CONTACTS).where(
                    *owned(CONTACTS, project_id, agent_id=agent_id, user_id=user_id, id=contact_id)
                )
            )
        return bool(result.rowcount)

    async def disable_contact(self, contact_id: str, reason: str, now: datetime) -> bool:
        """
        Mark a destination dead (the provider said so: unregistered token, unsubscribed
        number, non-existent mailbox). Worker-side, so not scoped by project.
        """
        c = CONTACTS.c
        async with self.write() as conn:
            result = await conn.execute(
                update(CONTACTS)
                .where(c.id == contact_id, c.disabled.is_(False))
                .values(disabled=True, disabled_reason=reason, disabled_at=now, updated_at=now)
            )
        return bool(result.rowcount)

    # --- preferences ------------------------------------------------------------

    async def get_preferences(
        self, project_id: str, agent_id: str, user_id: str
    ) -> dict[str, list[str]]:
        """A user's preferences (``{}`` when never set: every channel allowed)."""
        p = PREFERENCES.c
        stmt = select(p.preferences_json).where(
            *owned(PREFERENCES, project_id, agent_id=agent_id, user_id=user_id)
        )
        async with self.read() as conn:
            text = (await conn.execute(stmt)).scalar_one_or_none()
        prefs: dict[str, list[str]] = json.loads(text) if text else {}
        return prefs

    async def put_preferences(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        preferences: Mapping[str, Sequence[str]],
        now: datetime,
    ) -> None:
        """
        Replace a user's preferences (already validated); ``{}`` clears them. Each
        list keeps its order (the channel fallback's order), repeats dropped.
        """
        stored = canonical_json({k: list(dict.fromkeys(v)) for k, v in preferences.items()})
        owner = and_(*owned(PREFERENCES, project_id, agent_id=agent_id, user_id=user_id))
        async with self.write() as conn:
            changed = await conn.execute(
                update(PREFERENCES).where(owner).values(preferences_json=stored, updated_at=now)
            )
            if not changed.rowcount:
                await insert_ignoring_duplicates(
                    conn,
                    PREFERENCES,
                    [
                        {
                            "project_id": project_id,
                            "agent_id": agent_id,
                            "user_id": user_id,
                            "preferences_json": stored,
                            "updated_at": now,
                        }
                    ],
                    unique=["project_id", "agent_id", "user_id"],
                )

    # --- notification channels --------------------------------------------------

    async def insert_channel(self, values: Mapping[str, Any]) -> None:
        """Insert a channel row (``notification_channels`` column names)."""
        async with self.write() as conn:
            await conn.execute(CHANNELS.insert().values(**values))

    async def list_channels(
        self, project_id: str, *, active_only: bool = False
    ) -> Sequence[RowMapping]:
        """The project's channels, oldest first."""
        ch = CHANNELS.c
        stmt = select(CHANNELS).where(*owned(CHANNELS, project_id))
        if active_only:
            stmt = stmt.where(ch.active.is_(True))
        async with self.read() as conn:
            return (await conn.execute(stmt.order_by(ch.created_at, ch.id))).mappings().all()

    async def get_channel(self, project_id: str, channel_id: str) -> RowMapping | None:
        """One channel, or ``None`` (unknown or another project's)."""
        stmt = select(CHANNELS).where(*owned(CHANNELS, project_id, id=channel_id))
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().one_or_none()

    async def replace_channel(
        self, project_id: str, channel_id: str, values: Mapping[str, Any]
    ) -> RowMapping | None:
        """Overwrite a channel's writable columns; ``None`` when there is no such channel."""
        owner = and_(*owned(CHANNELS, project_id, id=channel_id))
        async with self.write() as conn:
            await conn.execute(update(CHANNELS).where(owner).values(**values))
            return (await conn.execute(select(CHANNELS).where(owner))).mappings().one_or_none()

    async def delete_channel(self, project_id: str, channel_id: str) -> bool:
        """Remove a channel; ``False`` when there was none."""
        async with self.write() as conn:
            result = await conn.execute(
                delete(CHANNELS).where(*owned(CHANNELS, project_id, id=channel_id))
            )
        return bool(result.rowcount)

    # --- project channels for the worker ---------------------------------------

    def _open_channel(self, box: SecretBox, row: RowMapping) -> OpenedChannel:
        try:
            config: dict[str, Any] | None = ChannelConfigCodec(box).full(row)
        except SecretDecryptError:
            _log.error("channels.config_undecryptable", channel_id=row["id"])
            config = None
        return OpenedChannel(
            id=row["id"],
            project_id=row["project_id"],
            type=row["type"],
            events=list(json.loads(row["events_json"] or "[]")),
            filter=json.loads(row["filter_json"]) if row["filter_json"] else None,
            config=config,
        )

    async def channel_inputs(
        self, notification_ids: Sequence[str]
    ) -> tuple[dict[str, RowMapping], dict[str, list[OpenedChannel]], dict[str, set[str]]]:
        """
        What routing notifications to project channels reads: those still pending
        whose project has an active channel (full rows), those projects' active
        channels (opened), and per notification the channels already attempted (a
        JetStream redelivery must not send twice). The worker asks only for the
        notifications :meth:`fanout_inputs` found ``channelled``, so a batch of
        projects without channels costs nothing more than that probe.
        """
        if not notification_ids:
            return {}, {}, {}
        n, ch, a = NOTIFICATIONS.c, CHANNELS.c, ATTEMPTS.c
        has_channel = (
            select(ch.id)
            .where(ch.project_id == n.project_id, ch.active.is_(True))
            .correlate(NOTIFICATIONS)
            .exists()
        )
        notes: dict[str, RowMapping] = {}
        async with self.read() as conn:
            for chunk in _chunks(list(notification_ids), 500):
                found = await conn.execute(
                    select(NOTIFICATIONS).where(n.id.in_(chunk), n.status == "pending", has_channel)
                )
                notes.update({r["id"]: r for r in found.mappings()})
            if not notes:
                return {}, {}, {}
            projects = sorted({r["project_id"] for r in notes.values()})
            rows = (
                (
                    await conn.execute(
                        select(CHANNELS)
                        .where(ch.project_id.in_(projects), ch.active.is_(True))
                        .order_by(ch.created_at, ch.id)
                    )
                )
                .mappings()
                .all()
            )
            done = (
                await conn.execute(
                    select(a.notification_id, a.channel_id).where(
                        a.notification_id.in_(sorted(notes)), a.channel_id.is_not(None)
                    )
                )
            ).all()
        box = await self._box()
        channels: dict[str, list[OpenedChannel]] = {}
        for row in rows:
            channels.setdefault(row["project_id"], []).append(self._open_channel(box, row))
        attempted: dict[str, set[str]] = {}
        for notification_id, channel_id in done:
            attempted.setdefault(notification_id, set()).add(channel_id)
        return notes, channels, attempted

    async def get_opened_channel(self, channel_id: str) -> OpenedChannel | None:
        """An active channel by id, opened (worker-side: a retry names it)."""
        ch = CHANNELS.c
        async with self.read() as conn:
            row = (
                (await conn.execute(select(CHANNELS).where(ch.id == channel_id, ch.active)))
                .mappings()
                .one_or_none()
            )
        return None if row is None else self._open_channel(await self._box(), row)

    async def list_channel_attempts(
        self, project_id: str, channel_id: str, *, limit: int
    ) -> Sequence[RowMapping]:
        """One project channel's attempts, newest first (``ix_channel_attempts_channel``)."""
        a = ATTEMPTS.c
        stmt = (
            select(ATTEMPTS)
            .where(*owned(ATTEMPTS, project_id), a.channel_id == channel_id)
            .order_by(a.created_at.desc(), a.attempt_number.desc(), a.id)
            .limit(limit)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()

    # --- notifications and attempts --------------------------------------------

    async def get_notification(self, notification_id: str) -> RowMapping | None:
        """A notification row by id (worker-side: the NATS message names it)."""
        n = NOTIFICATIONS.c
        async with self.read() as conn:
            return (
                (await conn.execute(select(NOTIFICATIONS).where(n.id == notification_id)))
                .mappings()
                .one_or_none()
            )

    async def fanout_inputs(self, notification_ids: Sequence[str]) -> FanoutInputs:
        """
        Everything a batch of fan-outs reads: the notifications, their users' active
        contacts and preferences, and the contacts already attempted per notification
        (a JetStream redelivery must not send twice to a destination the first delivery
        reached).

        A first query reads only each notification's status, whether its user has
        an active contact it was not yet attempted to, and whether its project has an
        active notification channel (``channelled``, for :meth:`channel_inputs`). In
        a burst most users have no contact at all, so a batch where none has one costs
        that one query; the full
        rows (with their payloads), contacts, preferences and attempts are then read,
        in four more queries, only for the pending notifications that have one.

        Raises:
            delivery.secrets.SecretDecryptError: a destination does not open with this
                key (the batch fails and is redelivered, rather than sent to no one).
        """
        if not notification_ids:
            return FanoutInputs({}, {}, {}, {}, {})
        if self.capabilities.driver_thread:
            read = await direct.read(self.engine, partial(_sqlite_fanout_reads, notification_ids))
        else:
            async with self.read() as conn:
                read = await _fanout_reads(conn, notification_ids)
        statuses: dict[str, str] = {}
        channelled: list[str] = []
        for nid, status, _, has_channel in read.probe:
            statuses[nid] = status
            if status == "pending" and has_channel:  # SQLite answers 0/1
                channelled.append(nid)
        if not read.notes:
            return FanoutInputs(statuses, {}, {}, {}, {}, channelled=tuple(channelled))
        notes: dict[str, Mapping[Any, Any]] = {r["id"]: r for r in read.notes}
        contacts: dict[UserKey, list[ContactMapping]] = {}
        if read.contacts:
            # The probe found a contact, so the box is needed (and exists) from here on.
            box = await self._box()
            for row in read.contacts:
                key = (row["project_id"], row["agent_id"], row["user_id"])
                contacts.setdefault(key, []).append(self._opened(box, row, strict=True))
        prefs = {(pid, aid, uid): json.loads(stored) for pid, aid, uid, stored in read.preferences}
        attempted: dict[str, set[str]] = {}
        for nid, cid in read.attempted:
            attempted.setdefault(nid, set()).add(cid)
        return FanoutInputs(
            statuses, notes, contacts, prefs, attempted, set(read.fallbacks), tuple(channelled)
        )

    async def get_contact_by_id(self, contact_id: str) -> ContactMapping | None:
        """
        A contact by id (worker-side: a retry names it).

        Raises:
            delivery.secrets.SecretDecryptError: its destination does not open.
        """
        async with self.read() as conn:
            row = (
                (await conn.execute(select(CONTACTS).where(CONTACTS.c.id == contact_id)))
                .mappings()
                .one_or_none()
            )
        return None if row is None else self._opened(await self._box(), row, strict=True)

    async def record_attempts(
        self,
        records: Sequence[AttemptRecord],
        *,
        retried_id: str | None = None,
        fallbacks: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """
        Insert attempt rows; when ``retried_id`` names the retry queue entry these
        attempts answer, its ``next_attempt_at`` is cleared in the same transaction, so
        the queue entry and its result can never both exist or both be missing.
        ``fallbacks`` (``channel_fallbacks`` rows of the messages whose first channel
        these attempts are) are inserted in that transaction too, once per message.
        """
        if not records and retried_id is None and not fallbacks:
            # Nothing to write: skip the empty transaction (on SQLite a BEGIN IMMEDIATE
            # that queues for the write lock behind the scheduler, once per batch).
            return
        if self.capabilities.driver_thread:
            # One call to SQLite's thread for the whole batch, the rows converted here:
            # through SQLAlchemy a batch's 192 rows were about a tenth of the channels
            # worker's CPU (bind processing of every instant, the insertmanyvalues
            # rendering, a loop round trip per statement) in
            # ``bench/bench_channels_worker.py``.
            await direct.write(
                self.engine,
                partial(
                    _sqlite_record,
                    direct.prepare_insert_rows(
                        ATTEMPTS, ATTEMPT_COLUMNS, [r.row() for r in records]
                    ),
                    direct.prepare_insert(FALLBACKS, fallbacks, unique=["notification_id"]),
                    retried_id,
                ),
            )
            return
        async with self.write() as conn:
            if records:
                await conn.execute(ATTEMPTS.insert(), [r.values() for r in records])
            if fallbacks:
                await insert_ignoring_duplicates(
                    conn, FALLBACKS, fallbacks, unique=["notification_id"]
                )
            if retried_id is not None:
                await conn.execute(
                    update(ATTEMPTS).where(ATTEMPTS.c.id == retried_id).values(next_attempt_at=None)
                )

    async def claim_due_retries(
        self, now: datetime, *, lease: timedelta, limit: int
    ) -> Sequence[RowMapping]:
        """
        Claim retry queue entries due at ``now``: their ``next_attempt_at`` moves to
        ``now + lease``, so another worker skips them and a worker that dies mid-retry
        leaves them due again after the lease (at-least-once, never lost).

        PostgreSQL locks the picked rows ``FOR UPDATE SKIP LOCKED`` so replicas claim
        disjoint sets; SQLite has one writer at a time anyway.
        """
        a = ATTEMPTS.c
        pick = (
            select(ATTEMPTS)
            .where(a.next_attempt_at.is_not(None), a.next_attempt_at <= now)
            .order_by(a.next_attempt_at)
            .limit(limit)
        )
        if not await any_row(self.engine, pick):
            return []
        if self._postgres:
            pick = pick.with_for_update(skip_locked=True)
        async with self.write() as conn:
            rows = (await conn.execute(pick)).mappings().all()
            if rows:
                await conn.execute(
                    update(ATTEMPTS)
                    .where(a.id.in_([r["id"] for r in rows]))
                    .values(next_attempt_at=now + lease)
                )
        return rows

    # --- channel fallback ------------------------------------------------------

    async def claim_due_fallbacks(
        self, now: datetime, *, lease: timedelta, limit: int, token: str
    ) -> Sequence[RowMapping]:
        """
        Claim fallback rows due at ``now`` for one worker: ``claim`` becomes
        ``token`` and ``next_attempt_at`` the lease's end, so a killed worker's row
        is due again by itself (``SKIP LOCKED`` on PostgreSQL, as the retries).
        Returns the rows as they are after the claim.
        """
        f = FALLBACKS.c
        pick = (
            select(f.notification_id)
            .where(f.next_attempt_at.is_not(None), f.next_attempt_at <= now)
            .order_by(f.next_attempt_at)
            .limit(limit)
        )
        if not await any_row(self.engine, pick):
            return []
        if self._postgres:
            pick = pick.with_for_update(skip_locked=True)
        async with self.write() as conn:
            ids = list((await conn.execute(pick)).scalars())
            if not ids:
                return []
            await conn.execute(
                update(FALLBACKS)
                .where(f.notification_id.in_(ids))
                .values(next_attempt_at=now + lease, claim=token, updated_at=now)
            )
            return (
                (await conn.execute(select(FALLBACKS).where(f.notification_id.in_(ids))))
                .mappings()
                .all()
            )

    async def fallback_facts(self, notification_id: str) -> tuple[RowMapping | None, bool]:
        """The notification row (``None`` if gone) and whether any channel has sent it."""
        a = ATTEMPTS.c
        async with self.read() as conn:
            note = (
                (
                    await conn.execute(
                        select(NOTIFICATIONS).where(NOTIFICATIONS.c.id == notification_id)
                    )
                )
                .mappings()
                .one_or_none()
            )
            sent = await conn.execute(
                select(a.id)
                # The user's own channels only: a project channel's send is not the
                # user's delivery.
                .where(
                    a.notification_id == notification_id,
                    a.status == "sent",
                    a.channel_id.is_(None),
                )
                .limit(1)
            )
            return note, sent.first() is not None

    async def begin_fallback_step(
        self, notification_id: str, token: str, step: FallbackStep, *, now: datetime
    ) -> bool:
        """
        Write the step a claimed row takes before any send (``sending`` set while it
        stays active); False when the claim was lost (the lease ran out and another
        worker holds the row), and then nothing may be sent.
        """
        active = step.next_attempt_at is not None
        return await self._update_fallback(
            None, notification_id, token, step, sending=active, keep_claim=active, now=now
        )

    async def finish_fallback_step(
        self,
        notification_id: str,
        token: str,
        records: Sequence[AttemptRecord],
        step: FallbackStep,
        *,
        now: datetime,
    ) -> bool:
        """
        Record a step's attempts and the row's next state in one transaction; the
        row changes only while ``token`` still holds it (the attempts are recorded
        either way: they happened).
        """
        async with self.write() as conn:
            if records:
                await conn.execute(ATTEMPTS.insert(), [r.values() for r in records])
            return await self._update_fallback(
                conn, notification_id, token, step, sending=False, keep_claim=False, now=now
            )

    async def postpone_fallback_step(
        self, notification_id: str, token: str, step: FallbackStep, *, sending: bool, now: datetime
    ) -> bool:
        """
        Put a claimed row back unchanged but for its decisions and ``next_attempt_at``
        (the step waits; nothing was sent), keeping ``sending`` as it was so that a
        step cut short is still repeated on its channel; False when the claim was lost.
        """
        return await self._update_fallback(
            None, notification_id, token, step, sending=sending, keep_claim=False, now=now
        )

    async def postpone_retry(self, attempt_id: str, at: datetime) -> None:
        """Move a claimed retry queue entry to ``at`` (nothing was attempted)."""
        async with self.write() as conn:
            await conn.execute(
                update(ATTEMPTS)
                .where(ATTEMPTS.c.id == attempt_id, ATTEMPTS.c.next_attempt_at.is_not(None))
                .values(next_attempt_at=at)
            )

    async def _update_fallback(
        self,
        conn: Any,
        notification_id: str,
        token: str,
        step: FallbackStep,
        *,
        sending: bool,
        keep_claim: bool,
        now: datetime,
    ) -> bool:
        f = FALLBACKS.c
        values: dict[str, Any] = {
            "status": step.status,
            "step": step.step,
            "attempt_number": step.attempt_number,
            "step_deadline": step.step_deadline,
            "decisions_json": step.decisions_json,
            "sending": sending,
            "updated_at": now,
        }
        if not keep_claim:
            values |= {"claim": None, "next_attempt_at": step.next_attempt_at}
        stmt = (
            update(FALLBACKS)
            .where(f.notification_id == notification_id, f.claim == token)
            .values(**values)
        )
        if conn is not None:
            return bool((await conn.execute(stmt)).rowcount)
        async with self.write() as own:
            return bool((await own.execute(stmt)).rowcount)

    async def get_fallback(self, notification_id: str) -> RowMapping | None:
        """One message's fallback row (operators, tests)."""
        f = FALLBACKS.c
        async with self.read() as conn:
            return (
                (await conn.execute(select(FALLBACKS).where(f.notification_id == notification_id)))
                .mappings()
                .one_or_none()
            )

    async def list_attempts(
        self,
        project_id: str,
        agent_id: str,
        user_id: str,
        *,
        notification_id: str | None,
        limit: int,
    ) -> Sequence[RowMapping]:
        """A user's channel attempts, newest first, optionally for one notification."""
        a = ATTEMPTS.c
        conds = owned(ATTEMPTS, project_id, agent_id=agent_id, user_id=user_id)
        if notification_id is not None:
            conds.append(a.notification_id == notification_id)
        stmt = (
            select(ATTEMPTS)
            .where(*conds)
            .order_by(a.created_at.desc(), a.attempt_number.desc(), a.id)
            .limit(limit)
        )
        async with self.read() as conn:
            return (await conn.execute(stmt)).mappings().all()
