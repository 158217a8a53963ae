"""sealed contacts: destinations stored sealed, found by a keyed digest

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Contact destinations (FCM tokens, email addresses, phone numbers) were stored in
clear, with an unkeyed SHA-256 of ``kind:destination`` as their unique key, which
anyone holding the database could reverse by trying every phone number. Now
``destination_enc`` holds the Fernet ciphertext (``delivery.secrets.SecretBox``)
and ``destination_hash`` the box's keyed digest of the owner, kind and destination
(``delivery.store.channels.contact_digest``); ``destination`` is dropped.

Existing rows are sealed here, in the migration's transaction, rather than lazily
on first use: a lazy scheme would keep clear addresses on disk until each row is
next touched, and every lookup would have to try both the old and the new digest
forever. This needs the deployment's key when there are rows: ``delivery migrate``
(and ``web`` / ``run`` / the daemons on start) pass it; the bare ``alembic`` command
does not, and then fails without changing anything.
"""

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import context, op

from delivery.store.migrate import SECRETS_ATTRIBUTE


revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CHUNK = 1000


def _box() -> Any:
    factory: Callable[[], Any] | None = context.config.attributes.get(SECRETS_ATTRIBUTE)
    if factory is None:
        raise RuntimeError(
            "contacts must be sealed (or opened) with the deployment's key: run "
            "`delivery migrate` with DELIVERY_SECRET_KEY set, or with the DELIVERY_DATA_DIR "
            "that holds secret.key, not the alembic command"
        )
    return factory()


def _rows(columns: str) -> Iterator[list[sa.Row[Any]]]:
    """Every contact, in id order, ``_CHUNK`` rows at a time (keyset pages)."""
    bind = op.get_bind()
    after = ""
    while True:
        page = bind.execute(
            sa.text(f"SELECT {columns} FROM contacts WHERE id > :after ORDER BY id LIMIT :n"),
            {"after": after, "n": _CHUNK},
        ).all()
        if not page:
            return
        yield page
        after = page[-1].id


def _digest(box: Any, row: sa.Row[Any], destination: str) -> str:
    # Frozen here as ChannelStore computes it at this revision (contact_digest).
    return box.digest(json.dumps([row.project_id, row.agent_id, row.user_id, row.kind, destination]))


def upgrade() -> None:
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destination_enc', sa.Text(), nullable=True))

    box = None
    seal = sa.text(
        "UPDATE contacts SET destination_enc = :enc, destination_hash = :digest WHERE id = :id"
    )
    for page in _rows("id, project_id, agent_id, user_id, kind, destination"):
        box = box or _box()
        op.get_bind().execute(
            seal,
            [
                {"id": r.id, "enc": box.seal(r.destination), "digest": _digest(box, r, r.destination)}
                for r in page
            ],
        )

    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.alter_column('destination_enc', existing_type=sa.Text(), nullable=False)
        batch_op.drop_column('destination')


def downgrade() -> None:
    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('destination', sa.Text(), nullable=True))

    box = None
    unseal = sa.text(
        "UPDATE contacts SET destination = :destination, destination_hash = :digest WHERE id = :id"
    )
    for page in _rows("id, kind, destination_enc"):
        box = box or _box()
        values = []
        for r in page:
            destination = box.open(r.destination_enc)
            digest = hashlib.sha256(f"{r.kind}:{destination}".encode()).hexdigest()
            values.append({"id": r.id, "destination": destination, "digest": digest})
        op.get_bind().execute(unseal, values)

    with op.batch_alter_table('contacts', schema=None) as batch_op:
        batch_op.alter_column('destination', existing_type=sa.Text(), nullable=False)
        batch_op.drop_column('destination_enc')
