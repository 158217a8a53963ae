"""/ready says when no scheduler runs (web alone takes writes nothing fires), without failing."""

import asyncio
from datetime import timedelta
from pathlib import Path

import httpx

from delivery.store.facts import SCHEDULER_SEEN, FactStore
from tests.api.conftest import Api
from tests.daemon.test_data_modes import _delivery_run


async def test_ready_warns_until_a_scheduler_beats(api: Api) -> None:
    # This fixture's schema is made from the models, not migrated: that check fails here,
    # and is not what this test is about.
    never = await api.anonymous.get("/ready")
    assert never.json()["warnings"] == ["scheduler"]
    assert "scheduler" not in never.json()["failing"]
    assert "no scheduler has run" in never.json()["checks"]["scheduler"]
    await FactStore(api.store.engine).put(SCHEDULER_SEEN, "sched_1", api.clock.now())
    fresh = await api.anonymous.get("/ready")
    assert fresh.json()["checks"]["scheduler"] == "ok"
    assert "warnings" not in fresh.json()
    api.clock.advance(timedelta(seconds=61))
    silent = await api.anonymous.get("/ready")
    assert silent.json()["warnings"] == ["scheduler"]
    assert "no scheduler seen for 61 s" in silent.json()["checks"]["scheduler"]


async def test_delivery_run_reports_its_own_scheduler(tmp_path: Path) -> None:
    async with (
        _delivery_run(tmp_path / "data", tmp_path / "run.log") as url,
        httpx.AsyncClient() as client,
    ):
        for _ in range(100):
            answer = await client.get(f"{url}/ready")
            if answer.json()["checks"].get("scheduler") == "ok":
                break
            await asyncio.sleep(0.1)
    assert answer.status_code == 200, answer.text
    assert answer.json()["checks"]["scheduler"] == "ok", answer.text
