"""
The recorded answers to ``Idempotency-Key`` requests.

A record is written inside the request's unit of work
(:func:`delivery.store.engine.unit_of_work`), so it commits with the writes it
describes or not at all: after a crash a retry finds either the record (and
replays it) or nothing (and runs for the first time).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from sqlalchemy import delete, select

from delivery.store.common import StoreBase, insert_ignoring_duplicates, owned
from delivery.store.tables import IDEMPOTENCY


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """
    The recorded answer to an ``Idempotency-Key`` (:meth:`Idempotency.find_idempotency_record`).

    Attributes:
        request_hash: SHA-256 of the first request's body; another body with the
            same key is a reuse, not a retry.
        status_code: the first answer's status.
        body: the first answer's body, as stored (sealed by the API).
    """

    request_hash: str
    status_code: int
    body: str


class Idempotency(Protocol):
    """
    Idempotency records, keyed by (project, route, key).

    Invariants: at most one live record per key; an expired record, or a
    reservation row (``status_code = 0``) of an older version, counts as absent.
    """

    async def find_idempotency_record(
        self, project_id: str, route: str, key: str, *, now: datetime
    ) -> IdempotencyRecord | None:
        """The live record of ``key`` on ``route``, or None."""
        ...

    async def record_idempotency(
        self,
        project_id: str,
        route: str,
        key: str,
        request_hash: str,
        *,
        status_code: int,
        body: str,
        now: datetime,
        ttl: timedelta,
    ) -> bool:
        """Record the answer to ``key`` unless a live record exists; whether it was recorded."""
        ...

    async def purge_idempotency(self, now: datetime) -> int:
        """Delete expired records; how many."""
        ...


class IdempotencyStore(StoreBase):
    """:class:`Idempotency` on SQLite and PostgreSQL."""

    async def find_idempotency_record(
        self, project_id: str, route: str, key: str, *, now: datetime
    ) -> IdempotencyRecord | None:
        """
        The live record of ``key`` on ``route``, or None.

        Expired records, and reservation rows (``status_code = 0``) left by
        versions that reserved a key before running the request, count as absent.
        Inside a unit of work that has written, this reads its uncommitted state.
        """
        i = IDEMPOTENCY.c
        async with self.read() as conn:
            row = (
                await conn.execute(
                    select(i.request_hash, i.status_code, i.response_body, i.expires_at).where(
                        *owned(IDEMPOTENCY, project_id), i.route == route, i.key == key
                    )
                )
            ).one_or_none()
        if row is None or row.status_code == 0 or row.expires_at <= now:
            return None
        return IdempotencyRecord(row.request_hash, row.status_code, row.response_body)

    async def record_idempotency(
        self,
        project_id: str,
        route: str,
        key: str,
        request_hash: str,
        *,
        status_code: int,
        body: str,
        now: datetime,
        ttl: timedelta,
    ) -> bool:
        """
        Record the answer to ``key``, unless a live record exists already.

        Called inside the request's unit of work, so the record commits with the
        writes it describes, or not at all. Of two concurrent requests with one
        key, the later insert waits for the earlier transaction (PostgreSQL's
        unique index, SQLite's single writer) and then finds its record.

        Returns:
            False when another request recorded ``key`` first: the caller rolls
            its writes back and answers from that record.
        """
        i = IDEMPOTENCY.c
        async with self.write() as conn:
            await conn.execute(
                delete(IDEMPOTENCY).where(
                    *owned(IDEMPOTENCY, project_id),
                    i.route == route,
                    i.key == key,
                    (i.expires_at <= now) | (i.status_code == 0),
                )
            )
            inserted = await insert_ignoring_duplicates(
                conn,
                IDEMPOTENCY,
                [
                    {
                        "project_id": project_id,
                        "route": route,
                        "key": key,
                        "request_hash": request_hash,
                        "status_code": status_code,
                        "response_body": body,
                        "created_at": now,
                        "expires_at": now + ttl,
                    }
                ],
                unique=["project_id", "route", "key"],
            )
        return inserted == 1

    async def purge_idempotency(self, now: datetime) -> int:
        """Delete expired idempotency records; returns how many."""
        async with self.write() as conn:
            result = await conn.execute(delete(IDEMPOTENCY).where(IDEMPOTENCY.c.expires_at <= now))
        return int(result.rowcount or 0)
