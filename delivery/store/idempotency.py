"""
The recorded answers to ``Idempotency-Key`` requests.

A record is written inside the request's unit of work
(:func:`delivery.store.engine.unit_of_work`), so it commits with the writes it
describes or not at all: after a crash a retry finds either the record (and
replays it) or nothing (and runs for the first time).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import delete

from delivery.store.common import StoreBase, owned_values
from delivery.store.engine import Engine, alone_unless_begun
from delivery.store.steps import DeleteIn, InsertIgnoring, Runner, SelectWhere, Steps
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

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine)
        # One call to SQLite's driver thread per operation (delivery.store.steps).
        self._runner = Runner(engine, reader=self._reader)

    async def find_idempotency_record(
        self, project_id: str, route: str, key: str, *, now: datetime
    ) -> IdempotencyRecord | None:
        """
        The live record of ``key`` on ``route``, or None.

        Expired records, and reservation rows (``status_code = 0``) left by
        versions that reserved a key before running the request, count as absent.
        Inside a unit of work that has written, this reads its uncommitted state.
        """
        return await self._runner.read(finding(project_id, route, key, now))

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
        record = idempotency_row(
            project_id,
            route,
            key,
            request_hash,
            status_code=status_code,
            body=body,
            now=now,
            ttl=ttl,
        )
        inserted: int = await self._runner.write(recording(record, now))
        return inserted == 1

    async def purge_idempotency(self, now: datetime) -> int:
        """Delete expired idempotency records; returns how many."""
        async with self.write() as conn:
            result = await conn.execute(delete(IDEMPOTENCY).where(IDEMPOTENCY.c.expires_at <= now))
        return int(result.rowcount or 0)


def idempotency_row(
    project_id: str,
    route: str,
    key: str,
    request_hash: str,
    *,
    status_code: int,
    body: str,
    now: datetime,
    ttl: timedelta,
) -> dict[str, Any]:
    """The row that records the answer to ``key`` on ``route`` (:func:`recording`)."""
    return {
        "project_id": project_id,
        "route": route,
        "key": key,
        "request_hash": request_hash,
        "status_code": status_code,
        "response_body": body,
        "created_at": now,
        "expires_at": now + ttl,
    }


def finding(
    project_id: str, route: str, key: str, now: datetime
) -> Steps[IdempotencyRecord | None]:
    """The live record of ``key`` on ``route``, or None (as ``find_idempotency_record``)."""
    rows: list[dict[str, Any]] = yield SelectWhere(
        IDEMPOTENCY,
        {**owned_values(project_id), "route": route, "key": key},
        columns=("request_hash", "status_code", "response_body", "expires_at"),
    )
    row = rows[0] if rows else None
    if row is None or row["status_code"] == 0 or row["expires_at"] <= now:
        return None
    return IdempotencyRecord(row["request_hash"], row["status_code"], row["response_body"])


@dataclass(frozen=True, slots=True)
class Recorded:
    """
    What a write that records its ``Idempotency-Key`` answer with it did
    (:func:`recorded`).

    Attributes:
        written: the write and its record (if any) were committed.
        replay: when not written, the live record its key already had (answer
            from it); None when that record vanished meanwhile (a purge).
    """

    written: bool
    replay: IdempotencyRecord | None = None
    moved: bool = False
    """
    Not written because the write's ``guard`` refused it (the pair's clock was
    not on the offset the write was built for: :mod:`delivery.store.creates`);
    nothing was recorded either.
    """
    offset_s: float | None = None
    """With ``moved``: the pair's offset the guard found (None: it has none)."""


type Guard = Steps[Recorded | None]
"""
A check run first in a recorded write's transaction: None lets the write go on,
a :class:`Recorded` is the outcome instead (and nothing is written).
"""


def recorded(
    steps: Steps[Any],
    record: Mapping[str, Any] | None,
    now: datetime,
    *,
    guard: Guard | None = None,
) -> Steps[Recorded]:
    """
    ``steps`` (a write) with the record of its answer, in one transaction: the
    record first, and ``steps`` only when it was inserted; when the key already
    had a live record, nothing is written and the outcome carries that record.
    Without a record, just ``steps``. A ``guard`` runs before all of it and may
    refuse the write (its outcome is then the answer).
    """
    if guard is not None:
        refused = yield from guard
        if refused is not None:
            return refused
    if record is not None:
        inserted = yield from recording(record, now)
        if inserted != 1:
            replay = yield from finding(record["project_id"], record["route"], record["key"], now)
            return Recorded(written=False, replay=replay)
    yield from steps
    return Recorded(written=True)


async def write_recorded(
    runner: Runner,
    steps: Steps[Any],
    record: Mapping[str, Any] | None,
    *,
    guard: Guard | None = None,
) -> Recorded:
    """
    Run :func:`recorded` on ``runner`` (a record is live if it had not expired
    when ``record`` was made) in a transaction of its own, unless the request's
    unit of work has written already (then in it:
    :func:`~delivery.store.engine.alone_unless_begun`).
    """
    if record is None:
        if guard is None:
            await runner.write(steps)
            return Recorded(written=True)
        # ``now`` only decides which records are live; there is no record here.
        return await runner.write(recorded(steps, None, _NO_RECORD, guard=guard))
    with alone_unless_begun(runner.engine):
        return await runner.write(recorded(steps, record, record["created_at"], guard=guard))


_NO_RECORD = datetime.min.replace(tzinfo=UTC)


def recording(record: Mapping[str, Any], now: datetime) -> Steps[int]:
    """
    Insert ``record`` unless its key has a live record; how many rows were inserted.

    The insert comes first, as a new key is the common case (one statement;
    reading the key first was a third of a keyed create's SQL work on SQLite's
    driver thread). Only when the key has a row is it read: a dead record
    (expired, or a reservation with status 0 left by older versions) is deleted
    and the insert made again. All of it runs in the write transaction: on SQLite
    it holds the file's writer; on PostgreSQL a concurrent recorder of the same
    key blocks this insert or delete on its row, and this insert then finds its
    record and inserts nothing.
    """
    unique = ("project_id", "route", "key")
    inserted: int = yield InsertIgnoring(IDEMPOTENCY, [record], unique=unique)
    if inserted:
        return inserted
    mine = {**owned_values(record["project_id"]), "route": record["route"]}
    found: list[dict[str, Any]] = yield SelectWhere(
        IDEMPOTENCY, {**mine, "key": record["key"]}, columns=("status_code", "expires_at")
    )
    if found and found[0]["expires_at"] > now and found[0]["status_code"] != 0:
        return 0
    if found:
        yield DeleteIn(IDEMPOTENCY, "key", [record["key"]], only_if=mine)
    # Dead, or gone since the insert (a purge): the key is free again.
    inserted = yield InsertIgnoring(IDEMPOTENCY, [record], unique=unique)
    return inserted
