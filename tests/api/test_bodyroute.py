"""
The hot create POSTs (trigger event, wakeup, schedule) are answered by
:class:`delivery.api.bodyroute.BodyRoute`'s short path when their request is
plain, and by FastAPI's own handler otherwise, with FastAPI's answers.
"""

import asyncio
from typing import Any

import fastapi.routing
import httpx
import pydantic
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse

from delivery.api.auth import _project_id
from delivery.api.bodyroute import BodyRoute, plan_of, post
from delivery.api.routes import events, schedules, wakeups
from tests.api.conftest import Api

DAILY = {"simple": {"frequency": "daily", "times": ["09:00"]}, "timezone": "UTC"}
EVENT = ("/api/v1/agents/a1/events", {"user_id": "u1", "event_type": "signup"}, 200)
WAKEUP = (
    "/api/v1/agents/a1/wakeups",
    {"user_id": "u1", "check_type": "c", "intent": "i", "delay_hours": 1},
    201,
)
JSON = {"content-type": "application/json"}
SCHEDULE = (
    "/api/v1/agents/a1/users/u1/schedules",
    {"cadence": DAILY, "intent": "check in", "check_type": "reminder"},
    201,
)


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths FastAPI's handler solved dependencies for, in order."""
    paths: list[str] = []
    real = fastapi.routing.solve_dependencies

    async def counting(*args: Any, **kwargs: Any) -> Any:
        paths.append(kwargs["request"].url.path)
        return await real(*args, **kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return paths


def test_the_hot_posts_have_a_short_path() -> None:
    """Each of the three POST routes is a BodyRoute whose endpoint the short path can call."""
    posts = [
        route
        for router in (events.router, wakeups.router, schedules.router)
        for route in router.routes
        if "POST" in getattr(route, "methods", ())
    ]
    assert len(posts) == 3
    assert all(isinstance(route, BodyRoute) and plan_of(route) is not None for route in posts)


@pytest.mark.parametrize("key", [None, "k-1"])
async def test_a_plain_request_skips_fastapis_dependency_solving(
    api: Api, solved: list[str], key: str | None
) -> None:
    """Valid JSON bodies are answered without FastAPI's handler, keyed or not."""
    headers = {"Idempotency-Key": key} if key else {}
    for path, body, status in (EVENT, WAKEUP, SCHEDULE):
        response = await api.alpha.post(path, json=body, headers=headers)
        assert response.status_code == status, response.text

    assert solved == []


async def test_anything_else_is_answered_by_fastapi(api: Api, solved: list[str]) -> None:
    """
    A refused field, broken JSON or a bad path id go to FastAPI's handler, which
    answers as it always has (broken JSON is refused there before any dependency).
    """
    path, body, _ = WAKEUP
    refused = await api.alpha.post(path, json={**body, "delay_hours": "1"})
    assert refused.status_code == 400
    assert refused.json()["code"] == "INVALID_REQUEST"
    assert [e["field"] for e in refused.json()["errors"]] == ["delay_hours"]

    broken = await api.alpha.post(
        path, content=b'{"user_id": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 400
    assert broken.json()["errors"][0]["field"] == "body"

    bad_id = await api.alpha.post("/api/v1/agents/a%20b/wakeups", json=body)
    assert bad_id.status_code == 400
    assert bad_id.json()["code"] == "INVALID_ID"

    assert solved == [path, "/api/v1/agents/a b/wakeups"]


async def test_dependency_overrides_reach_the_hot_posts(api: Api) -> None:
    """
    An override (here: every request is beta's) is applied to the three POSTs as to
    any route, whether the overrides dict is changed or replaced.
    """
    app = api.alpha._transport.app  # type: ignore[attr-defined]

    async def beta(request: Request) -> str:
        return api.projects["beta"]

    app.dependency_overrides = {_project_id: beta}
    try:
        for path, body, status in (EVENT, WAKEUP, SCHEDULE):
            response = await api.alpha.post(path, json=body)
            assert response.status_code == status, response.text
    finally:
        app.dependency_overrides = {}
    wakeups_of_beta = await api.beta.get("/api/v1/agents/a1/wakeups", params={"user_id": "u1"})
    assert len(wakeups_of_beta.json()["wakeups"]) == 1
    schedules_of_beta = await api.beta.get("/api/v1/agents/a1/users/u1/schedules")
    assert len(schedules_of_beta.json()["schedules"]) == 1
    wakeups_of_alpha = await api.alpha.get("/api/v1/agents/a1/wakeups", params={"user_id": "u1"})
    assert wakeups_of_alpha.json()["wakeups"] == []


async def test_an_endpoint_reading_the_body_gets_the_bytes_the_short_path_read() -> None:
    """The short path reads the body itself; ``request.body()`` must still answer it."""

    class Item(pydantic.BaseModel):
        name: str

    router = fastapi.APIRouter()

    @post(router, "/items")
    async def create(item: Item, request: Request) -> JSONResponse:
        return JSONResponse({"name": item.name, "body": (await request.body()).decode()})

    (route,) = router.routes
    assert isinstance(route, BodyRoute)
    assert plan_of(route) is not None
    # The router itself serves: an app would wrap it in FastAPI's included-router route.
    transport = httpx.ASGITransport(app=router)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        # Without the bytes kept on the request, the endpoint's read waits forever.
        async with asyncio.timeout(5):
            answer = await client.post("/items", content=b'{"name": "a"}', headers=JSON)
    assert answer.status_code == 200
    assert answer.json() == {"name": "a", "body": '{"name": "a"}'}
