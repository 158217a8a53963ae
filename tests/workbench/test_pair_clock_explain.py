"""
Explain and the timeline of an advanced pair judge "now" on the pair's clock: with no
``at``, explain answers for the pair's now, where the fires advance-time made are in
the past. On SQLite and PostgreSQL, through the served API and the CLI.
"""

import json
from datetime import UTC, datetime, timedelta

import httpx

from delivery.clock import ManualClock
from tests.workbench.test_pair_clock import START, A, U, cli, create_daily, served, z


def test_explain_without_at_answers_for_the_pairs_now(database_url: str) -> None:
    with served(database_url, ManualClock(START)) as (api, client):
        create_daily(client)
        client.workbench.advance_time(A, U, 48)
        answer = httpx.get(
            f"{api.base_url}/api/v1/agents/{A}/users/{U}/timeline/explain",
            headers={"Authorization": f"Bearer {api.keys['alpha']}"},
            timeout=10,
        ).json()
    assert answer["at"] == z(START.replace(day=3))


def test_the_explain_cli_takes_the_pairs_clock(database_url: str) -> None:
    """``delivery explain`` without ``--at`` answers for real now plus the pair's offset."""
    with served(database_url, ManualClock(START)) as (_, client):
        create_daily(client)
        client.workbench.advance_time(A, U, 48)
    before = datetime.now(UTC)
    done = cli(database_url, "explain", "--agent", A, "--user", U, "--json")
    at = datetime.fromisoformat(json.loads(done.stdout)["explanation"]["at"])
    assert before + timedelta(hours=48) <= at <= datetime.now(UTC) + timedelta(hours=48)
