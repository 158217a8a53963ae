"""
Contact destinations at rest, on SQLite and PostgreSQL: rows hold them sealed with a
keyed digest for uniqueness, the API answers them in clear as before, the channels
worker opens them to send, and migration 0007 seals the rows an older version stored.
"""

import hashlib
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import Connection, bindparam, inspect, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.clock import ManualClock
from delivery.secrets import LazySecretBox, SecretBox
from delivery.settings import Settings
from delivery.store.channels import CONTACTS, MASK, ChannelStore
from delivery.store.engine import create_engine
from delivery.store.migrate import (
    SECRETS_ATTRIBUTE,
    alembic_config,
    migrate,
    shipped_head,
    stored_revision,
)
from delivery.store.sql import SqlStore
from delivery.store.types import UTCDateTime
from handlers.channels_worker import ChannelsWorker
from tests.api.notes import add_notifications, notification
from tests.channels.conftest import Api, channel_settings
from tests.handlers.channels.conftest import SmtpServer

A, U = "agent-1", "user-1"
CONTACTS_URL = f"/api/v1/agents/{A}/users/{U}/contacts"
NUMBER, ADDRESS = "+14155550100", "ann@example.com"
TOKEN = "dXNlci0xLWRldmljZQ:APA91bSealedTokenOfUser1"
T0 = datetime(2026, 5, 1, tzinfo=UTC)


async def _stored(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(select(CONTACTS))).mappings()]


def _clear_in(values: list[dict[str, Any]], needles: list[str]) -> list[tuple[str, str]]:
    """(column, needle) pairs where a stored value contains a destination in clear."""
    return [
        (column, needle)
        for row in values
        for column, value in row.items()
        for needle in needles
        if needle in str(value)
    ]


async def test_rows_hold_no_destination_in_clear_and_the_api_answers_as_before(
    api: Api, engine: AsyncEngine, tmp_path: Path
) -> None:
    """
    Contacts added through the API are stored sealed with a keyed (not plain SHA-256)
    digest, listed back in clear, and re-adding one finds it by that digest.
    """
    made = {}
    for kind, destination in (("sms", "+1 (415) 555-0100"), ("email", ADDRESS), ("fcm", TOKEN)):
        response = await api.alpha.post(
            CONTACTS_URL, json={"kind": kind, "destination": destination}
        )
        assert response.status_code == 201, response.text
        made[kind] = response.json()
        api.clock.advance(timedelta(seconds=1))
    assert made["sms"]["destination"] == NUMBER
    listed = (await api.alpha.get(CONTACTS_URL)).json()["contacts"]
    assert [c["destination"] for c in listed] == [NUMBER, ADDRESS, TOKEN]
    one = (await api.alpha.get(f"{CONTACTS_URL}/{made['email']['contact_id']}")).json()
    assert one == made["email"]
    again = await api.alpha.post(CONTACTS_URL, json={"kind": "sms", "destination": NUMBER})
    assert again.status_code == 200
    assert again.json()["contact_id"] == made["sms"]["contact_id"]

    rows = await _stored(engine)
    assert "destination" not in rows[0]
    needles = [NUMBER, NUMBER[2:], ADDRESS, "ann@", TOKEN, TOKEN[-12:]]
    assert _clear_in(rows, needles) == []
    plain = {hashlib.sha256(f"{k}:{d}".encode()).hexdigest() for k, d in made_pairs(made)}
    assert not plain & {r["destination_hash"] for r in rows}
    box = SecretBox.from_settings(channel_settings(tmp_path))
    assert {box.open(r["destination_enc"]) for r in rows} == {NUMBER, ADDRESS, TOKEN}

    # The same number for another user: another digest, so rows cannot be matched.
    other = await api.alpha.post(
        f"/api/v1/agents/{A}/users/user-2/contacts", json={"kind": "sms", "destination": NUMBER}
    )
    assert other.status_code == 201
    digests = [r["destination_hash"] for r in await _stored(engine) if r["kind"] == "sms"]
    assert len(set(digests)) == 2

    if engine.dialect.name == "sqlite":
        # Nothing in the database file or its WAL holds the number, in any table.
        database = Path(str(engine.url.database))
        files = [database, database.with_name(database.name + "-wal")]
        raw = b"".join(f.read_bytes() for f in files if f.exists())
        assert NUMBER[2:].encode() not in raw
        assert ADDRESS.encode() not in raw


def made_pairs(made: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
    return [(kind, entry["destination"]) for kind, entry in made.items()]


async def test_a_foreign_key_masks_in_listings(engine: AsyncEngine, tmp_path: Path) -> None:
    """Contacts sealed under another key list as **** (and are logged), not as an error."""
    project = (await SqlStore(engine).keys.ensure_project("alpha", T0)).id
    mine = ChannelStore(engine, secrets=SecretBox(b"k" * 32))
    made, _ = await mine.add_contact(
        project, A, U, kind="sms", destination=NUMBER, opted_out=False, now=T0
    )
    theirs = ChannelStore(engine, secrets=SecretBox(b"other-key" * 4))
    (listed,) = await theirs.list_contacts(project, A, U)
    assert (listed["id"], listed["destination"]) == (made["id"], MASK)
    assert (await mine.list_contacts(project, A, U))[0]["destination"] == NUMBER


async def test_the_worker_opens_sealed_destinations_and_needs_no_key_without_contacts(
    engine: AsyncEngine, tmp_path: Path, plain_smtp: SmtpServer
) -> None:
    """
    A batch with no contact builds no key (no key file appears); once a contact is
    sealed, the worker opens it and the mail reaches the address.
    """
    clock = ManualClock(T0)
    settings = Settings(
        subject_prefix="test",
        data_dir=tmp_path / "data",
        smtp_host="127.0.0.1",
        smtp_port=plain_smtp.port,
        smtp_security="plain",
        smtp_from="agent@mail.example.com",
    )
    project = (await SqlStore(engine).keys.ensure_project("alpha", T0)).id
    worker = ChannelsWorker(settings, engine, clock=clock, rand=lambda: 0.5)
    try:
        first = notification(project, A, U, 1, clock.now())
        await add_notifications(engine, [first])
        assert (await worker.fan_out([first["id"]])).sent == 0
        assert not (tmp_path / "data" / "secret.key").exists()

        store = ChannelStore(engine, secrets=LazySecretBox(settings))
        await store.add_contact(
            project, A, U, kind="email", destination=ADDRESS, opted_out=False, now=clock.now()
        )
        second = notification(project, A, U, 2, clock.now())
        await add_notifications(engine, [second])
        assert (await worker.fan_out([second["id"]])).sent == 1
    finally:
        await worker.stop()
    assert [e.rcpt_tos for e in plain_smtp.sink.envelopes] == [[ADDRESS]]


# --- migration 0007 ---------------------------------------------------------------------

_LEGACY = [("ct_1", "sms", NUMBER), ("ct_2", "email", ADDRESS), ("ct_3", "fcm", TOKEN)]


async def _legacy_database(url: str) -> AsyncEngine:
    """A database at revision 0006 with a project and contacts stored as then: in clear."""
    await migrate(url, revision="0006")
    engine = create_engine(url)
    at = bindparam("at", type_=UTCDateTime())
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO projects (id, name, created_at) VALUES ('prj_1', 'alpha', :at)"
            ).bindparams(at),
            {"at": T0},
        )
        for n, (contact_id, kind, destination) in enumerate(_LEGACY):
            await conn.execute(
                text(
                    "INSERT INTO contacts (id, project_id, agent_id, user_id, kind, destination,"
                    " destination_hash, opted_out, disabled, created_at, updated_at) VALUES"
                    " (:id, 'prj_1', :agent, :user, :kind, :destination, :digest, :no, :no,"
                    " :at, :at)"
                ).bindparams(at),
                {
                    "id": contact_id,
                    "agent": A,
                    "user": U,
                    "kind": kind,
                    "destination": destination,
                    "digest": hashlib.sha256(f"{kind}:{destination}".encode()).hexdigest(),
                    "no": False,
                    "at": T0.replace(second=n),
                },
            )
    return engine


def _columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("contacts")}


async def test_migration_seals_the_rows_an_older_version_stored(database_url: str) -> None:
    """
    Upgrading a database whose contacts are in clear seals every destination and
    re-keys its digest, so the API finds and answers them as before; downgrading opens
    them again.
    """
    box = SecretBox(b"deployment-key-material-0123456789")
    engine = await _legacy_database(database_url)
    try:
        await migrate(database_url, secrets=lambda: box)
        assert await stored_revision(engine) == shipped_head()
        rows = await _stored(engine)
        assert _clear_in(rows, [d for _, _, d in _LEGACY]) == []
        assert {r["id"]: box.open(r["destination_enc"]) for r in rows} == {
            contact_id: destination for contact_id, _, destination in _LEGACY
        }

        store = ChannelStore(engine, secrets=box)
        listed = await store.list_contacts("prj_1", A, U)
        assert [(c["id"], c["destination"]) for c in listed] == [(i, d) for i, _, d in _LEGACY]
        again, created = await store.add_contact(
            "prj_1", A, U, kind="sms", destination=NUMBER, opted_out=True, now=T0
        )
        assert (again["id"], created, again["opted_out"]) == ("ct_1", False, True)

        def downgrade(conn: Connection) -> set[str]:
            from alembic import command

            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            cfg.attributes[SECRETS_ATTRIBUTE] = lambda: box
            command.downgrade(cfg, "0006")
            return _columns(conn)

        async with engine.begin() as conn:
            columns = await conn.run_sync(downgrade)
        assert "destination" in columns
        assert "destination_enc" not in columns
        async with engine.connect() as conn:
            back = (
                await conn.execute(text("SELECT id, destination, destination_hash FROM contacts"))
            ).all()
        assert sorted(back) == sorted(
            (i, d, hashlib.sha256(f"{k}:{d}".encode()).hexdigest()) for i, k, d in _LEGACY
        )
    finally:
        await engine.dispose()


async def test_migration_without_the_key_fails_and_changes_nothing(database_url: str) -> None:
    """With contacts to seal and no key given, the upgrade raises and leaves 0006 as it was."""
    engine = await _legacy_database(database_url)
    try:
        with pytest.raises(RuntimeError, match="DELIVERY_SECRET_KEY"):
            await migrate(database_url)
        assert await stored_revision(engine) == "0006"
        async with engine.connect() as conn:
            assert "destination_enc" not in await conn.run_sync(_columns)
            clear = (await conn.execute(text("SELECT destination FROM contacts"))).scalars().all()
        assert sorted(clear) == sorted(d for _, _, d in _LEGACY)
    finally:
        await engine.dispose()


async def test_migration_on_a_configured_database_never_invents_a_key(
    database_url: str, tmp_path: Path
) -> None:
    """
    On a DELIVERY_DATABASE_URL database, a migrate run without DELIVERY_SECRET_KEY and
    without a key file refuses (no key file appears, nothing changes) instead of
    sealing with a key the other processes lack; with the deployment's key it seals.
    """
    engine = await _legacy_database(database_url)
    bare = Settings(database_url=database_url, data_dir=tmp_path / "migrate")
    try:
        with pytest.raises(RuntimeError, match="DELIVERY_SECRET_KEY is not set"):
            await migrate(database_url, secrets=partial(SecretBox.for_migration, bare))
        assert not (tmp_path / "migrate" / "secret.key").exists()
        assert await stored_revision(engine) == "0006"

        keyed = bare.model_copy(update={"secret_key": SecretStr("the deployment's key")})
        await migrate(database_url, secrets=partial(SecretBox.for_migration, keyed))
        box = SecretBox(b"the deployment's key")
        assert sorted(box.open(r["destination_enc"]) for r in await _stored(engine)) == sorted(
            d for _, _, d in _LEGACY
        )
    finally:
        await engine.dispose()
