"""
``delivery explain`` through the console script, on a migrated SQLite and PostgreSQL
database: a fire missed while the scheduler was down, told as text and as JSON.
"""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from delivery.bus.subjects import Subjects
from delivery.cadence import compile_schedule, next_fire
from delivery.scheduler import Scheduler
from delivery.store.common import canonical_json
from delivery.store.engine import create_engine
from delivery.store.migrate import migrate
from delivery.store.sql import SqlStore
from delivery.store.tables import ScheduleRow

START = datetime(2026, 5, 1, tzinfo=UTC)
CADENCE = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "Europe/Berlin"}


async def missed_fire(database_url: str) -> str:
    """A daily 09:00 Berlin schedule the scheduler first reaches at 12:00 Berlin."""
    await migrate(database_url)
    engine = create_engine(database_url)
    try:
        store = SqlStore(engine)
        project = await store.keys.ensure_project("demo", START)
        await store.keys.ensure_project("other", START)
        compiled = compile_schedule(CADENCE, None, created_at=START)
        row = ScheduleRow(
            id="sch_cli",
            project_id=project.id,
            agent_id="agent_abc",
            user_id="user_123",
            cadence_type="simple",
            cadence_json=canonical_json(compiled.cadence),
            timezone="Europe/Berlin",
            intent="check in",
            check_type="reminder",
            anchor_at=compiled.anchor,
            next_fire_at=next_fire(compiled, START),
            created_at=START,
            updated_at=START,
        )
        await store.schedules.insert_schedule(row)
        scheduler = Scheduler(engine, Subjects("cli"), max_lateness=timedelta(hours=1))
        await scheduler.tick(datetime(2026, 5, 1, 10, 0, tzinfo=UTC))
    finally:
        await engine.dispose()
    return project.id


def run(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    env["DELIVERY_DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, "-m", "delivery", "explain", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def test_explain_prints_the_story_and_the_reason(database_url: str) -> None:
    """Plain text off a terminal (no colour codes), the same answer as JSON."""
    project_id = await missed_fire(database_url)
    who = ("--agent", "agent_abc", "--user", "user_123", "--at", "2026-05-01T07:00:00Z")
    text = run(database_url, *who, "--project", "demo")
    assert text.returncode == 0, text.stderr
    assert "\x1b[" not in text.stdout
    assert "fire.skipped" in text.stdout
    assert "2026-05-01T09:00:00+02:00" in text.stdout
    assert "missed_max_lateness at 2026-05-01T07:00:00Z" in text.stdout
    assert "more than the maximum lateness (1 h)" in text.stdout

    as_json = run(database_url, *who, "--project", project_id, "--json", "--schedule", "sch_cli")
    assert as_json.returncode == 0, as_json.stderr
    body = json.loads(as_json.stdout)
    assert body["explanation"]["code"] == "missed_max_lateness"
    assert body["explanation"]["local_at"] == "2026-05-01T09:00:00+02:00"
    assert [e["kind"] for e in body["events"]] == ["schedule.created", "fire.skipped"]

    other = run(database_url, *who, "--project", "other", "--json")
    assert json.loads(other.stdout)["explanation"]["code"] == "no_schedule"


async def test_explain_refuses_bad_input(database_url: str) -> None:
    """Bad input exits 1 with the error code and the option named."""
    await missed_fire(database_url)
    who = ("--agent", "agent_abc", "--user", "user_123")
    cases = [
        (("--at", "noon", "--project", "demo"), "INVALID_REQUEST", "--at"),
        (("--project", "nope"), "NOT_FOUND", "--project"),
        ((), "INVALID_REQUEST", "--project is required"),
        (("--project", "demo", "--schedule", "sch_nope"), "NOT_FOUND", "--schedule"),
        (("--project", "demo", "--window", "1y"), "INVALID_REQUEST", "window"),
    ]
    for args, code, named in cases:
        out = run(database_url, *who, *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith(f"error {code}:"), (args, out.stderr)
        assert named in out.stderr
