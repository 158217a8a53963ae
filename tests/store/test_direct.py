"""
The SQLite driver-thread paths store and read exactly what SQLAlchemy does, and a
failed write changes nothing.
"""

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from delivery.store import direct
from delivery.store.tables import OutboxRow, ProjectRow, ScheduleRow

SCHEDULES = ScheduleRow.__table__  # type: ignore[attr-defined]
OUTBOX = OutboxRow.__table__  # type: ignore[attr-defined]
PROJECTS = ProjectRow.__table__  # type: ignore[attr-defined]

T = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def schedule(i: int, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": f"sch_{i}",
        "project_id": "prj",
        "agent_id": "a",
        "user_id": f"u{i}",
        "cadence_type": "simple",
        "cadence_json": "{}",
        "timezone": "Europe/Berlin",
        "active_window_json": None,
        "intent": "stretch",
        "check_type": "habit",
        "inventory_item_id": None,
        "metadata_json": None,
        "starts_at": None,
        "ends_at": None,
        "anchor_at": T,
        "enabled": True,
        "next_fire_at": T + timedelta(microseconds=7),
        "last_fire_at": None,
        "staged_fire_at": None,
        "claimed_by": None,
        "claimed_until": None,
        "version": 1,
        "created_at": T,
        "updated_at": T,
    }
    row.update(overrides)
    return row


async def stored_text(engine: AsyncEngine, schedule_id: str) -> tuple[Any, ...]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT anchor_at, next_fire_at, ends_at, enabled FROM schedules WHERE id = :i"
                ),
                {"i": schedule_id},
            )
        ).one()
    return tuple(row)


async def test_rows_written_directly_are_stored_as_sqlalchemy_stores_them(
    sqlite: AsyncEngine,
) -> None:
    """Same values in, same bytes on disk, same Python values out (instants and booleans)."""
    plus_two = timezone(timedelta(hours=2))
    values = {
        "next_fire_at": datetime(2026, 10, 25, 2, 59, 59, 999999, tzinfo=plus_two),
        "ends_at": T + timedelta(days=400),
        "enabled": False,
    }
    async with sqlite.begin() as conn:
        await conn.execute(SCHEDULES.insert(), [schedule(1, **values)])
    inserted = await direct.write(
        sqlite,
        lambda db: direct.insert_ignoring_duplicates(
            db, SCHEDULES, [schedule(2, **values)], unique="id"
        ),
    )
    assert inserted == 1
    assert await stored_text(sqlite, "sch_2") == await stored_text(sqlite, "sch_1")

    async with sqlite.connect() as conn:
        by_sqlalchemy = {
            r["id"]: dict(r) for r in (await conn.execute(select(SCHEDULES))).mappings()
        }
    by_direct = await direct.read(
        sqlite, lambda db: direct.select_in(db, SCHEDULES, "id", ["sch_1", "sch_2"])
    )
    assert {r["id"]: r for r in by_direct} == by_sqlalchemy
    assert by_sqlalchemy["sch_2"]["next_fire_at"] == values["next_fire_at"]
    assert by_sqlalchemy["sch_2"]["enabled"] is False


async def test_a_subset_of_columns_is_read_in_the_order_asked(sqlite: AsyncEngine) -> None:
    await direct.write(
        sqlite,
        lambda db: direct.insert_ignoring_duplicates(db, SCHEDULES, [schedule(1)], unique="id"),
    )
    [row] = await direct.read(
        sqlite,
        lambda db: direct.select_in(
            db, SCHEDULES, "id", ["sch_1", "nope"], columns=["next_fire_at", "id"]
        ),
    )
    assert row == {"next_fire_at": T + timedelta(microseconds=7), "id": "sch_1"}


async def test_duplicates_are_skipped_and_counted_out(sqlite: AsyncEngine) -> None:
    def outbox(msg_id: str) -> dict[str, Any]:
        return {
            "subject": "s",
            "msg_id": msg_id,
            "payload": "{}",
            "created_at": T,
            "available_at": T,
        }

    def insert(rows: list[dict[str, Any]]) -> Any:
        return lambda db: direct.insert_ignoring_duplicates(db, OUTBOX, rows, unique="msg_id")

    assert await direct.write(sqlite, insert([outbox("a")])) == 1
    assert await direct.write(sqlite, insert([outbox("a"), outbox("b"), outbox("b")])) == 1


async def test_update_in_changes_only_matching_rows_and_names_them(sqlite: AsyncEngine) -> None:
    rows = [schedule(1), schedule(2, enabled=False), schedule(3)]
    await direct.write(
        sqlite, lambda db: direct.insert_ignoring_duplicates(db, SCHEDULES, rows, unique="id")
    )
    changed = await direct.write(
        sqlite,
        lambda db: direct.update_in(
            db,
            SCHEDULES,
            "id",
            ["sch_1", "sch_2", "sch_9"],
            {"claimed_until": T + timedelta(hours=1), "claimed_by": "me"},
            only_if={"enabled": True},
        ),
    )
    assert changed == ["sch_1"]
    async with sqlite.connect() as conn:
        claimed = (
            await conn.execute(select(SCHEDULES.c.id, SCHEDULES.c.claimed_until).order_by("id"))
        ).all()
    assert [tuple(r) for r in claimed] == [
        ("sch_1", T + timedelta(hours=1)),
        ("sch_2", None),
        ("sch_3", None),
    ]


async def test_a_failing_write_changes_nothing_and_frees_the_writer(sqlite: AsyncEngine) -> None:
    def half_then_fail(db: Any) -> None:
        direct.insert_ignoring_duplicates(db, SCHEDULES, [schedule(1)], unique="id")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await direct.write(sqlite, half_then_fail)
    assert (
        await direct.read(sqlite, lambda db: direct.select_in(db, SCHEDULES, "id", ["sch_1"])) == []
    )
    # The writer lock was released: the next write goes through.
    assert (
        await direct.write(
            sqlite,
            lambda db: direct.insert_ignoring_duplicates(db, SCHEDULES, [schedule(1)], unique="id"),
        )
        == 1
    )


async def test_only_the_table_s_own_column_names_reach_the_sql(sqlite: AsyncEngine) -> None:
    """Identifiers cannot be bound, so a name that is not a column is refused."""
    with pytest.raises(ValueError, match="no column"):
        await direct.read(
            sqlite, lambda db: direct.select_in(db, SCHEDULES, 'id" OR 1=1 --', ["x"])
        )
    with pytest.raises(ValueError, match="no column"):
        await direct.write(
            sqlite,
            lambda db: direct.update_in(db, SCHEDULES, "id", ["x"], {"enabled = 0, id": 1}),
        )


async def test_a_connection_left_in_a_transaction_is_rolled_back_on_return(
    sqlite: AsyncEngine,
) -> None:
    # A function that leaves a write open (misuse of read) must not hand its
    # transaction, and the file's write lock, to the connection's next user.
    def insert_without_commit(db: Any) -> None:
        db.execute("INSERT INTO projects (id, name, created_at) VALUES ('prj2', 'q', 'x')")

    await direct.read(sqlite, insert_without_commit)
    for _ in range(6):  # every pooled connection has been returned at least once
        state = await direct.read(sqlite, lambda db: db.in_transaction)
        assert state is False
    async with sqlite.connect() as conn:
        found = (await conn.execute(text("SELECT count(*) FROM projects"))).scalar()
    assert found == 1
    # The file's write lock went with the rollback: a write goes through at once.
    await direct.write(sqlite, lambda db: db.execute("DELETE FROM projects WHERE id = 'prj'"))


async def test_a_clean_return_skips_the_reset_only_once(sqlite: AsyncEngine) -> None:
    from delivery.store.engine import CLEAN_CHECKIN

    await direct.read(sqlite, lambda db: None)
    pool: Any = sqlite.sync_engine.pool
    async with sqlite.connect() as conn:
        raw = await conn.get_raw_connection()
        # The mark of the previous return is gone once the connection is out again.
        assert CLEAN_CHECKIN not in raw.info
        # An open SQLAlchemy-less transaction, then an ordinary return: rolled back.
        await direct.on_driver_thread(
            conn, lambda db: db.execute("INSERT INTO projects VALUES ('prj3', 'r', 'x')")
        )
    assert pool.checkedout() == 0
    assert await direct.read(sqlite, lambda db: db.in_transaction) is False
    count = await direct.read(
        sqlite, lambda db: db.execute("SELECT count(*) FROM projects").fetchone()[0]
    )
    assert count == 1


async def test_each_column_set_and_order_gets_its_own_insert(sqlite: AsyncEngine) -> None:
    """
    Inserts are prepared once per (table, columns in order, conflict target): rows
    whose columns come in another order, or another conflict target, are still
    stored as SQLAlchemy stores them, and a name that is not a column is refused
    every time.
    """
    values = {"next_fire_at": T + timedelta(hours=3), "enabled": False, "ends_at": T}
    async with sqlite.begin() as conn:
        await conn.execute(SCHEDULES.insert(), [schedule(1, **values)])
    ordered = schedule(2, **values)
    backwards = dict(reversed(list(schedule(3, **values).items())))
    await direct.write(sqlite, lambda db: direct.insert_rows(db, SCHEDULES, [ordered]))
    await direct.write(sqlite, lambda db: direct.insert_rows(db, SCHEDULES, [backwards]))
    inserted = await direct.write(
        sqlite,
        lambda db: direct.insert_ignoring_duplicates(
            db, SCHEDULES, [schedule(4, **values), schedule(1)], unique=("id",)
        ),
    )
    assert inserted == 1
    for sid in ("sch_2", "sch_3", "sch_4"):
        assert await stored_text(sqlite, sid) == await stored_text(sqlite, "sch_1")
    async with sqlite.connect() as conn:
        rows = {r["id"]: dict(r) for r in (await conn.execute(select(SCHEDULES))).mappings()}
    assert rows["sch_3"] == {**rows["sch_1"], "id": "sch_3", "user_id": "u3"}
    for _ in range(2):
        with pytest.raises(ValueError, match="no column"):
            await direct.write(
                sqlite,
                lambda db: direct.insert_rows(db, SCHEDULES, [{**ordered, "id = 1 --": 1}]),
            )


async def test_a_select_is_prepared_per_shape_of_its_conditions(sqlite: AsyncEngine) -> None:
    """
    ``select_where`` is prepared once per shape of call: the same columns compared
    to a value or to NULL, read whole or in part, with or without a bound, each
    read what it asks for.
    """
    rows = [schedule(1, ends_at=None), schedule(2, ends_at=T), schedule(3, ends_at=T)]
    await direct.write(sqlite, lambda db: direct.insert_rows(db, SCHEDULES, rows))

    def ids(**options: Any) -> Any:
        equals = options.pop("equals")
        return direct.read(
            sqlite,
            lambda db: [
                r["id"]
                for r in direct.select_where(db, SCHEDULES, equals, order_by=("id",), **options)
            ],
        )

    for _ in range(2):
        assert await ids(equals={"project_id": "prj", "ends_at": None}) == ["sch_1"]
        assert await ids(equals={"project_id": "prj", "ends_at": T}) == ["sch_2", "sch_3"]
        assert await ids(equals={"project_id": "prj", "ends_at": T}, limit=1) == ["sch_2"]
        assert await ids(equals={"project_id": "other", "ends_at": T}) == []
    later = T + timedelta(hours=1)
    assert await ids(equals={"project_id": "prj"}, after=("ends_at", later)) == ["sch_1"]
    assert await ids(equals={"project_id": "prj"}, after=("ends_at", T - timedelta(1))) == [
        "sch_1",
        "sch_2",
        "sch_3",
    ]
    [only] = await direct.read(
        sqlite,
        lambda db: direct.select_where(
            db, SCHEDULES, {"id": "sch_2"}, columns=("ends_at", "enabled")
        ),
    )
    assert only == {"ends_at": T, "enabled": True}
